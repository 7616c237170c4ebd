//! Quality maintenance of listings (C3): what a re-test does to a listing, and clients'
//! satisfaction ratings.
//!
//! A listing's hosts are validated again on a schedule and on demand, and judged by the
//! same acceptance criteria as when they were listed ([`crate::resell::assess`]). What
//! follows is decided here: a pass clears a failed re-test and relists a delisted
//! listing; a failure of a serious rule (configurable: a critical finding, a spec below
//! the claim, ...) delists it; any other failure keeps it listed but ranked lower
//! ([`crate::catalog::rank`]'s `failed_retest_factor`). Every change the provider must
//! hear of comes back as an [`Advisory`] naming the failed criteria with measured
//! against required values.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::CompatLevel;
use uuid::Uuid;

use crate::catalog::Categories;
use crate::listings::Listing;
use crate::resell::{Assessment, Criterion};

/// How re-tests are scheduled and judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetestPolicy {
    /// Time between a listing's re-tests.
    pub interval_ms: i64,
    /// The acceptance rules (`spec`, `category`, `hardening`, `critical_findings`,
    /// `compatibility`, `validation`) whose failure delists; any other failure ranks
    /// the listing lower.
    pub delist_on: BTreeSet<String>,
}

impl Default for RetestPolicy {
    fn default() -> Self {
        Self {
            interval_ms: 24 * 3_600_000,
            delist_on: ["spec", "category", "critical_findings", "compatibility"]
                .map(String::from)
                .into(),
        }
    }
}

/// A re-test under way: the run ordered on each host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Retest {
    /// When it started.
    pub started_at_ms: UnixMillis,
    /// Each host with its validation run.
    pub runs: Vec<(Uuid, Uuid)>,
    /// Ordered on demand (`false`: by the schedule).
    pub on_demand: bool,
}

/// What the provider is told after a re-test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Advisory {
    /// `listing.delisted`, `listing.advisory` (failed, still listed, ranked lower) or
    /// `listing.relisted`.
    pub kind: String,
    /// The listing.
    pub listing: String,
    /// Each failed criterion with its host: the test, claimed, measured and required.
    pub failed: Vec<(Uuid, Criterion)>,
}

/// One host's re-test: its assessment, or why it could not be judged.
pub type HostResult = (Uuid, Result<Assessment, String>);

/// The listing after a re-test of its hosts (`results`, one per host) ended at
/// `now_ms`, and the advisory its provider gets, if any. A host that could not be
/// judged fails the `validation` rule with the reason as its measurement; a host
/// measured now in a smaller category of `categories` than the listing's fails the
/// `category` rule (the listing offers what the measurements imply).
///
/// What delists: a failed rule in `policy.delist_on`, or a host that could not be
/// judged at a re-test following a failed one (a provider does not keep a listing
/// that would fail by keeping its agent away from re-tests).
pub fn after_retest(
    listing: &Listing,
    results: &[HostResult],
    policy: &RetestPolicy,
    categories: &Categories,
    now_ms: UnixMillis,
) -> (Listing, Option<Advisory>) {
    let rank = |name: &str| categories.list().iter().position(|c| c.name == name);
    let mut next = listing.clone();
    next.retest = None;
    next.next_retest_at_ms = Some(now_ms.saturating_add(policy.interval_ms));
    next.last_retest_at_ms = Some(now_ms);
    let mut failed: Vec<(Uuid, Criterion)> = Vec::new();
    for (host, result) in results {
        match result {
            Ok(a) => {
                failed.extend(
                    a.criteria
                        .iter()
                        .filter(|c| !c.passed)
                        .map(|c| (*host, c.clone())),
                );
                // Below the smallest category is a failed `category` criterion
                // already; a category unknown now (the settings changed) is not
                // compared.
                let smaller = match (
                    a.category.as_deref().and_then(rank),
                    rank(&listing.category),
                ) {
                    (Some(now), Some(listed)) => now < listed,
                    _ => false,
                };
                if smaller {
                    failed.push((
                        *host,
                        Criterion {
                            rule: "category".into(),
                            field: Some("category".into()),
                            passed: false,
                            claimed: Some(listing.category.clone()),
                            measured: a.category.clone(),
                            required: Some(format!("at least {}", listing.category)),
                        },
                    ));
                }
            }
            Err(why) => failed.push((
                *host,
                Criterion {
                    rule: "validation".into(),
                    field: None,
                    passed: false,
                    claimed: None,
                    measured: Some(why.clone()),
                    required: Some("a completed validation run".into()),
                },
            )),
        }
    }
    // The figures shown are the weakest host's, as measured now.
    let measured: Vec<_> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|a| &a.measured))
        .collect();
    if measured.len() == results.len() && !measured.is_empty() {
        next.score = measured
            .iter()
            .map(|m| m.score)
            .fold(f64::INFINITY, f64::min);
        next.hardening_index = measured
            .iter()
            .map(|m| m.hardening_index)
            .min()
            .unwrap_or(0);
        next.compat_level = measured
            .iter()
            .map(|m| m.compat_level.unwrap_or(CompatLevel::Incompatible))
            .min_by_key(|l| crate::listings::compat_rank(*l))
            .unwrap_or(CompatLevel::Incompatible);
    }
    let advisory = |kind: &str, failed: Vec<(Uuid, Criterion)>| {
        Some(Advisory {
            kind: kind.into(),
            listing: listing.id.clone(),
            failed,
        })
    };
    if failed.is_empty() {
        next.failed_retest = false;
        if listing.listed {
            return (next, None);
        }
        next.listed = true;
        return (next, advisory("listing.relisted", failed));
    }
    next.failed_retest = true;
    let serious = failed.iter().any(|(_, c)| {
        policy.delist_on.contains(&c.rule) || (c.rule == "validation" && listing.failed_retest)
    });
    if serious && listing.listed {
        next.listed = false;
        (next, advisory("listing.delisted", failed))
    } else {
        (next, advisory("listing.advisory", failed))
    }
}

/// The share of CPU time its hosts were busy: their metered busy CPU time over their
/// metered total CPU time (the host meters `cpu_busy_ms` and `cpu_total_ms`, summed
/// over the window and the hosts, so a larger host weighs more); `None` without
/// any total. Busy time beyond the total (a clock step on the host) counts as full.
pub fn utilisation(busy_ms: i64, total_ms: i64) -> Option<f64> {
    (total_ms > 0).then(|| busy_ms.clamp(0, total_ms) as f64 / total_ms as f64)
}

/// A client's satisfaction rating of a provider, for one instance it ran on the
/// provider's capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rating {
    /// The client's account (shown to that client and admins only; empty otherwise).
    pub client: String,
    /// The instance it rates its use of (likewise).
    pub instance: String,
    /// The provider rated.
    pub provider: String,
    /// 1 to 5.
    pub score: u8,
    /// What the client says, at most 1000 characters.
    pub comment: String,
    /// When it was given.
    pub created_at_ms: UnixMillis,
}

/// Why a rating is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RatingError {
    /// The score is not 1 to 5, or the comment too long.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// Only the client that ran the instance on this provider's capacity may rate.
    #[error("{0}")]
    NotYours(String),
}

/// Whether `client` may rate its use of an instance owned by `owner` (a client
/// account) on a host of `host_provider`, which `ran` (it started at least once), with
/// `score` and `comment`.
pub fn check_rating(
    client: &str,
    owner: &str,
    host_provider: &str,
    ran: bool,
    score: u8,
    comment: &str,
) -> Result<(), RatingError> {
    if !(1..=5).contains(&score) {
        return Err(RatingError::Invalid {
            field: "score",
            message: format!("{score} is not a rating from 1 to 5"),
        });
    }
    if comment.chars().count() > 1000 {
        return Err(RatingError::Invalid {
            field: "comment",
            message: "more than 1000 characters".into(),
        });
    }
    if client != owner {
        return Err(RatingError::NotYours(
            "only the client that ran the instance may rate it".into(),
        ));
    }
    if !ran {
        return Err(RatingError::NotYours(
            "the instance never ran: there is no use to rate".into(),
        ));
    }
    if host_provider.is_empty() {
        return Err(RatingError::NotYours(
            "the instance's host has no provider".into(),
        ));
    }
    Ok(())
}

/// The average score of the ratings given at or after `since_ms`; `None` without any.
pub fn average(ratings: &[Rating], since_ms: UnixMillis) -> Option<f64> {
    let recent: Vec<u8> = ratings
        .iter()
        .filter(|r| r.created_at_ms >= since_ms)
        .map(|r| r.score)
        .collect();
    (!recent.is_empty())
        .then(|| recent.iter().map(|s| f64::from(*s)).sum::<f64>() / recent.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resell::MeasuredFacts;

    fn listing() -> Listing {
        serde_json::from_value(serde_json::json!({
            "id": "lst-1", "request": Uuid::from_u128(1), "provider": "bob", "zone": "z",
            "kind": "compute", "category": "small", "set": 0, "hosts": [Uuid::from_u128(2)],
            "score": 1.0, "hardening_index": 80, "compat_level": "fully", "operations": [],
            "pricing_modes": ["spot"], "interruptibility": "price_based", "currency": "EUR",
            "price": 10, "available": 1, "rating": null, "uptime": null, "listed": true,
            "failed_retest": false, "created_at_ms": 0
        }))
        .unwrap()
    }

    fn assessed(failing: &[&str], score: f64) -> Result<Assessment, String> {
        let mut criteria: Vec<Criterion> = ["spec", "hardening", "critical_findings"]
            .iter()
            .map(|rule| Criterion {
                rule: (*rule).into(),
                field: None,
                passed: !failing.contains(rule),
                claimed: None,
                measured: Some("m".into()),
                required: Some("r".into()),
            })
            .collect();
        criteria.sort_by(|a, b| a.rule.cmp(&b.rule));
        Ok(Assessment {
            criteria,
            category: Some("small".into()),
            measured: MeasuredFacts {
                score,
                hardening_index: 70,
                compat_level: Some(CompatLevel::Highly),
                operations: vec![],
            },
        })
    }

    /// Each case: (rule it pins, listed before, failed before, host result, listed
    /// after, failed after, the advisory's kind).
    #[test]
    fn a_retest_keeps_ranks_lower_delists_or_relists() {
        let host = Uuid::from_u128(2);
        let policy = RetestPolicy::default();
        type Case = (
            &'static str,
            bool,
            bool,
            Result<Assessment, String>,
            bool,
            bool,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "a pass keeps a listing listed, silently",
                true,
                false,
                assessed(&[], 1.1),
                true,
                false,
                None,
            ),
            (
                "a pass clears a failed re-test",
                true,
                true,
                assessed(&[], 1.1),
                true,
                false,
                None,
            ),
            (
                "a pass relists a delisted listing",
                false,
                true,
                assessed(&[], 1.1),
                true,
                false,
                Some("listing.relisted"),
            ),
            (
                "a critical finding delists",
                true,
                false,
                assessed(&["critical_findings"], 1.1),
                false,
                true,
                Some("listing.delisted"),
            ),
            (
                "a spec below the claim delists",
                true,
                false,
                assessed(&["spec"], 1.1),
                false,
                true,
                Some("listing.delisted"),
            ),
            (
                "a hardening index below the minimum ranks lower",
                true,
                false,
                assessed(&["hardening"], 1.1),
                true,
                true,
                Some("listing.advisory"),
            ),
            (
                "a run that could not end ranks lower",
                true,
                false,
                Err("the agent is offline".into()),
                true,
                true,
                Some("listing.advisory"),
            ),
            (
                "a host that cannot be judged after a failed re-test delists",
                true,
                true,
                Err("the agent is offline".into()),
                false,
                true,
                Some("listing.delisted"),
            ),
            (
                "a delisted listing failing again stays delisted",
                false,
                true,
                assessed(&["spec"], 1.1),
                false,
                true,
                Some("listing.advisory"),
            ),
        ];
        for (rule, listed, failed, result, want_listed, want_failed, want_kind) in cases {
            let before = Listing {
                listed,
                failed_retest: failed,
                ..listing()
            };
            let (after, advisory) = after_retest(
                &before,
                &[(host, result)],
                &policy,
                &Categories::standard(),
                1_000,
            );
            assert_eq!(
                (after.listed, after.failed_retest),
                (want_listed, want_failed),
                "{rule}"
            );
            assert_eq!(
                advisory.as_ref().map(|a| a.kind.as_str()),
                want_kind,
                "{rule}"
            );
            assert_eq!(
                after.next_retest_at_ms,
                Some(1_000 + policy.interval_ms),
                "{rule}"
            );
            assert_eq!(after.retest, None, "{rule}");
            if let Some(a) = advisory.filter(|a| a.kind != "listing.relisted") {
                assert!(
                    !a.failed.is_empty() && a.failed.iter().all(|(h, c)| *h == host && !c.passed),
                    "{rule}: names what failed"
                );
            }
        }
        // The figures shown follow the measurements.
        let (after, _) = after_retest(
            &listing(),
            &[(host, assessed(&[], 0.7))],
            &policy,
            &Categories::standard(),
            5,
        );
        assert_eq!(
            (after.score, after.hardening_index, after.compat_level),
            (0.7, 70, CompatLevel::Highly)
        );
    }

    /// Each case: (rule it pins, the listing's category, the category measured now,
    /// listed after).
    #[test]
    fn a_retest_measuring_a_smaller_category_delists() {
        let host = Uuid::from_u128(2);
        for (rule, listed_as, measured, still_listed) in [
            ("the same category passes", "medium", "medium", true),
            (
                "a larger one passes (it is offered as listed)",
                "small",
                "large",
                true,
            ),
            (
                "a smaller one fails the category rule",
                "large",
                "medium",
                false,
            ),
            (
                "a category no longer defined is not compared",
                "huge",
                "small",
                true,
            ),
        ] {
            let before = Listing {
                category: listed_as.into(),
                ..listing()
            };
            let mut result = assessed(&[], 1.1);
            if let Ok(a) = &mut result {
                a.category = Some(measured.into());
            }
            let (after, advisory) = after_retest(
                &before,
                &[(host, result)],
                &RetestPolicy::default(),
                &Categories::standard(),
                9,
            );
            assert_eq!(after.listed, still_listed, "{rule}");
            if !still_listed {
                let a = advisory.expect("an advisory");
                assert_eq!(a.kind, "listing.delisted", "{rule}");
                let c = &a.failed[0].1;
                assert_eq!(
                    (c.rule.as_str(), c.claimed.as_deref(), c.measured.as_deref()),
                    ("category", Some(listed_as), Some(measured)),
                    "{rule}"
                );
            }
        }
    }

    #[test]
    fn only_the_instances_client_rates_with_a_score_from_1_to_5() {
        assert_eq!(
            check_rating("alice", "alice", "bob", true, 5, "fine"),
            Ok(())
        );
        assert!(
            matches!(
                check_rating("alice", "alice", "bob", false, 5, ""),
                Err(RatingError::NotYours(_))
            ),
            "an instance that never started was not used"
        );
        assert!(matches!(
            check_rating("alice", "alice", "bob", true, 0, ""),
            Err(RatingError::Invalid { field: "score", .. })
        ));
        assert!(matches!(
            check_rating("alice", "alice", "bob", true, 6, ""),
            Err(RatingError::Invalid { field: "score", .. })
        ));
        assert!(matches!(
            check_rating("alice", "alice", "bob", true, 3, &"x".repeat(1001)),
            Err(RatingError::Invalid {
                field: "comment",
                ..
            })
        ));
        assert!(matches!(
            check_rating("carol", "alice", "bob", true, 3, ""),
            Err(RatingError::NotYours(_))
        ));
    }

    /// Each case: (rule it pins, busy, total, utilisation).
    #[test]
    fn utilisation_is_busy_over_total_cpu_time() {
        for (rule, busy, total, want) in [
            ("no usage yet: unknown", 0, 0, None),
            ("idle", 0, 1_000, Some(0.0)),
            ("a quarter busy", 250, 1_000, Some(0.25)),
            (
                "busy beyond the total counts as full",
                1_500,
                1_000,
                Some(1.0),
            ),
            ("a negative busy time counts as idle", -5, 1_000, Some(0.0)),
        ] {
            assert_eq!(utilisation(busy, total), want, "{rule}");
        }
    }

    #[test]
    fn the_average_counts_the_window_only() {
        let r = |score, at| Rating {
            client: "a".into(),
            instance: format!("i-{at}"),
            provider: "bob".into(),
            score,
            comment: String::new(),
            created_at_ms: at,
        };
        assert_eq!(average(&[], 0), None);
        assert_eq!(average(&[r(1, 5), r(4, 10), r(5, 20)], 10), Some(4.5));
        assert_eq!(average(&[r(1, 5)], 10), None);
    }
}
