//! Benchmark results (A3), as the agent reports them and the controller stores them.
//!
//! Every raw figure comes with its unit, repetitions, run-to-run variation and a score
//! relative to a fixed reference (documented in `docs/PERFORMANCE.md`), so providers
//! are comparable whatever their vendor.

use serde::{Deserialize, Serialize};

/// What a benchmark run should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BenchPlan {
    /// Time budget for the whole suite, ms; steps that would start after it are skipped.
    pub budget_ms: u64,
    /// Directory for the storage test's scratch file.
    pub scratch_dir: String,
    /// Size of the storage scratch file, bytes.
    pub storage_bytes: u64,
    /// Timed repetitions of each measurement (after one warm-up).
    pub repetitions: u32,
    /// Small sizes for tests and smoke runs; figures are less stable.
    pub quick: bool,
}

impl Default for BenchPlan {
    fn default() -> Self {
        Self {
            budget_ms: 60_000,
            scratch_dir: "/var/tmp".into(),
            storage_bytes: 256 << 20,
            repetitions: 5,
            quick: false,
        }
    }
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BenchResult {
    /// Stable id, e.g. `cpu.sha256.single`, `memory.triad`, `storage.randread`.
    pub id: String,
    /// Unit of `value` (`MB/s`, `Mops/s`, `ns`, `IOPS`, `bytes`).
    pub unit: String,
    /// The figure: the median of the repetitions (the best, for bandwidths).
    pub value: f64,
    /// Every timed repetition.
    pub repetitions: Vec<f64>,
    /// Coefficient of variation over the repetitions (standard deviation / mean).
    pub cv: f64,
    /// The reference figure the score is relative to (0 when unscored).
    pub reference: f64,
    /// `value / reference`, inverted for lower-is-better units; 0 when unscored.
    pub score: f64,
    /// How long the measurement took, ms.
    pub duration_ms: u64,
    /// Anything that qualifies the figure.
    pub note: Option<String>,
}

/// A whole benchmark run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BenchReport {
    /// The plan it ran.
    pub plan: BenchPlan,
    /// Every figure, in run order.
    pub results: Vec<BenchResult>,
    /// Cache sizes derived from the latency curve, bytes, smallest first.
    pub cache_levels_bytes: Vec<u64>,
    /// Geometric mean of the scores of scored results.
    pub composite_score: f64,
    /// Steps not run (budget exhausted, unsupported here), with why.
    pub skipped: Vec<String>,
    /// The run was cancelled before it finished.
    pub cancelled: bool,
    /// Wall time of the run, ms.
    pub duration_ms: u64,
}

/// Geometric mean of the positive scores (0 when there are none).
pub fn composite(scores: impl IntoIterator<Item = f64>) -> f64 {
    let (mut log_sum, mut n) = (0.0, 0u32);
    for s in scores.into_iter().filter(|s| *s > 0.0 && s.is_finite()) {
        log_sum += s.ln();
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        (log_sum / f64::from(n)).exp()
    }
}

/// Mean and coefficient of variation of `xs`.
pub fn mean_cv(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, if mean == 0.0 { 0.0 } else { var.sqrt() / mean })
}

/// Median of `xs` (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        assert_eq!(composite([2.0, 8.0]), 4.0);
        assert_eq!(composite([0.0, -1.0]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let (mean, cv) = mean_cv(&[9.0, 11.0]);
        assert_eq!(mean, 10.0);
        assert!((cv - 0.1).abs() < 1e-12);
    }
}
