//! Security validation results (A4): what the agent found, as the controller stores it.

use serde::{Deserialize, Serialize};

/// How much a failed check matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; does not lower the index.
    Info,
    /// Minor hardening gap.
    Low,
    /// A real weakness.
    Medium,
    /// A serious weakness.
    High,
    /// Exposes the host outright.
    Critical,
}

impl Severity {
    /// Weight in the hardening index.
    pub fn weight(self) -> u32 {
        match self {
            Severity::Info => 0,
            Severity::Low => 1,
            Severity::Medium => 3,
            Severity::High => 6,
            Severity::Critical => 10,
        }
    }
}

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// The host meets the rule.
    Pass,
    /// The host breaks the rule.
    Fail,
    /// The rule does not apply here (service absent, needs the live kernel).
    NotApplicable,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Finding {
    /// Stable id, e.g. `ssh.permit_root_login`.
    pub id: String,
    /// What the check looks at.
    pub title: String,
    /// How much a failure matters.
    pub severity: Severity,
    /// Outcome.
    pub status: CheckStatus,
    /// What was read, and where.
    pub evidence: String,
    /// How to fix a failure.
    pub remediation: String,
}

/// A whole security validation run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecurityReport {
    /// The root directory the checks read through (`/` on a live host).
    pub root: String,
    /// Whether kernel and process checks saw the running system.
    pub live: bool,
    /// Every check, in a stable order.
    pub findings: Vec<Finding>,
    /// 0-100: the weighted share of applicable checks that pass.
    pub hardening_index: u8,
    /// The index in words.
    pub band: String,
}

/// The hardening index of `findings` and its band: the severity-weighted share of
/// applicable checks that pass. `Info` checks and checks that do not apply count for
/// nothing; a host with nothing applicable scores 100.
pub fn hardening_index(findings: &[Finding]) -> (u8, &'static str) {
    let (mut passed, mut total) = (0u32, 0u32);
    for f in findings {
        let w = f.severity.weight();
        match f.status {
            CheckStatus::Pass => {
                passed += w;
                total += w;
            }
            CheckStatus::Fail => total += w,
            CheckStatus::NotApplicable => {}
        }
    }
    let index = (passed * 100).checked_div(total).map_or(100, |i| i as u8);
    let band = match index {
        90..=100 => "hardened",
        75..=89 => "good",
        50..=74 => "fair",
        25..=49 => "weak",
        _ => "exposed",
    };
    (index, band)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(severity: Severity, status: CheckStatus) -> Finding {
        Finding {
            id: "x".into(),
            title: "x".into(),
            severity,
            status,
            evidence: String::new(),
            remediation: String::new(),
        }
    }

    #[test]
    fn index_weighs_failures_by_severity_and_ignores_what_does_not_apply() {
        use CheckStatus::*;
        use Severity::*;
        assert_eq!(hardening_index(&[]), (100, "hardened"));
        assert_eq!(
            hardening_index(&[f(Critical, Fail), f(Low, NotApplicable)]),
            (0, "exposed")
        );
        assert_eq!(
            hardening_index(&[f(Critical, Pass), f(Medium, Fail), f(Info, Fail)]),
            (76, "good")
        );
        assert_eq!(
            hardening_index(&[f(High, Pass), f(High, Fail)]),
            (50, "fair")
        );
    }
}
