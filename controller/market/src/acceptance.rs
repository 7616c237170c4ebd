//! Does a host's tested specification conform to what its provider claims?
//!
//! Pure: the claim, the measurement and the tolerances go in, every mismatch comes out
//! by field. The resell pipeline (source 000, "acceptance criteria") uses it to accept
//! or reject with reasons. It never reads storage or the clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::Inventory;

/// What a provider claims, or what was measured. Absent fields are not claimed (or
/// were not measured).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Spec {
    /// Logical CPUs.
    pub cores: Option<u32>,
    /// Memory, bytes.
    pub memory_bytes: Option<u64>,
    /// Disk capacity, bytes (all non-removable disks).
    pub disk_bytes: Option<u64>,
    /// Clock, MHz (maximum, else base).
    pub clock_mhz: Option<u32>,
    /// Benchmark scores by name, in normalised units (higher is better).
    pub scores: BTreeMap<String, f64>,
}

impl Spec {
    /// The measured spec of a host: its inventory plus benchmark scores.
    pub fn tested(inventory: &Inventory, scores: BTreeMap<String, f64>) -> Self {
        let disks: u64 = inventory
            .disks
            .iter()
            .filter(|d| d.removable != Some(true))
            .filter_map(|d| d.capacity_bytes)
            .sum();
        Self {
            cores: Some(inventory.cpu.logical_cpus).filter(|c| *c > 0),
            memory_bytes: Some(inventory.memory.total_bytes).filter(|m| *m > 0),
            disk_bytes: Some(disks).filter(|d| *d > 0),
            clock_mhz: inventory.cpu.max_mhz.or(inventory.cpu.base_mhz),
            scores,
        }
    }
}

/// How far below a claim a measurement may fall and still conform.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tolerances {
    /// Fraction for memory (the kernel keeps some for itself).
    pub memory: f64,
    /// Fraction for disk capacity (vendors count in powers of ten).
    pub disk: f64,
    /// Fraction for the clock.
    pub clock: f64,
    /// Fraction for benchmark scores (run-to-run variation).
    pub score: f64,
}

impl Default for Tolerances {
    fn default() -> Self {
        Self {
            memory: 0.05,
            disk: 0.08,
            clock: 0.05,
            score: 0.10,
        }
    }
}

/// One way the tested spec falls short of the claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Mismatch {
    /// `cores`, `memory_bytes`, `disk_bytes`, `clock_mhz` or `scores.<name>`.
    pub field: String,
    /// The claimed value.
    pub claimed: f64,
    /// The measured value, if any was measured.
    pub measured: Option<f64>,
    /// The least measured value that would have conformed.
    pub minimum: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.measured {
            Some(m) => write!(
                f,
                "{}: claimed {}, measured {} (at least {} needed)",
                self.field, self.claimed, m, self.minimum
            ),
            None => write!(f, "{}: claimed {}, not measured", self.field, self.claimed),
        }
    }
}

fn check(
    out: &mut Vec<Mismatch>,
    field: String,
    claimed: Option<f64>,
    measured: Option<f64>,
    tolerance: f64,
) {
    let Some(claimed) = claimed else { return };
    let minimum = claimed * (1.0 - tolerance.clamp(0.0, 1.0));
    match measured {
        Some(m) if m >= minimum => {}
        measured => out.push(Mismatch {
            field,
            claimed,
            measured,
            minimum,
        }),
    }
}

/// Every field where `tested` falls short of `claimed` beyond `tolerances`. More than
/// claimed always conforms. Cores must be met exactly.
pub fn compare(claimed: &Spec, tested: &Spec, tolerances: &Tolerances) -> Vec<Mismatch> {
    let mut out = Vec::new();
    let f = |v: Option<u64>| v.map(|x| x as f64);
    check(
        &mut out,
        "cores".into(),
        claimed.cores.map(f64::from),
        tested.cores.map(f64::from),
        0.0,
    );
    check(
        &mut out,
        "memory_bytes".into(),
        f(claimed.memory_bytes),
        f(tested.memory_bytes),
        tolerances.memory,
    );
    check(
        &mut out,
        "disk_bytes".into(),
        f(claimed.disk_bytes),
        f(tested.disk_bytes),
        tolerances.disk,
    );
    check(
        &mut out,
        "clock_mhz".into(),
        claimed.clock_mhz.map(f64::from),
        tested.clock_mhz.map(f64::from),
        tolerances.clock,
    );
    for (name, value) in &claimed.scores {
        check(
            &mut out,
            format!("scores.{name}"),
            Some(*value),
            tested.scores.get(name).copied(),
            tolerances.score,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    fn claim() -> Spec {
        Spec {
            cores: Some(16),
            memory_bytes: Some(64 * GIB),
            disk_bytes: Some(1_000_000_000_000),
            clock_mhz: Some(3000),
            scores: [
                ("cpu.multi".to_owned(), 8.0),
                ("memory.triad".to_owned(), 2.0),
            ]
            .into(),
        }
    }

    fn fields(m: &[Mismatch]) -> Vec<&str> {
        m.iter().map(|m| m.field.as_str()).collect()
    }

    #[test]
    fn a_host_as_claimed_conforms() {
        assert!(compare(&claim(), &claim(), &Tolerances::default()).is_empty());
    }

    #[test]
    fn shortfalls_within_tolerance_conform_and_beyond_are_named() {
        let t = Tolerances::default();
        let mut tested = claim();
        tested.memory_bytes = Some(62 * GIB); // kernel reserve: -3%
        tested.disk_bytes = Some(960_000_000_000); // decimal vs binary: -4%
        tested.scores.insert("cpu.multi".into(), 7.4); // -7.5%
        assert!(compare(&claim(), &tested, &t).is_empty());

        tested.cores = Some(15);
        tested.memory_bytes = Some(48 * GIB);
        tested.scores.insert("cpu.multi".into(), 6.0);
        tested.scores.remove("memory.triad");
        let m = compare(&claim(), &tested, &t);
        assert_eq!(
            fields(&m),
            [
                "cores",
                "memory_bytes",
                "scores.cpu.multi",
                "scores.memory.triad"
            ]
        );
        assert_eq!(
            m[0].to_string(),
            "cores: claimed 16, measured 15 (at least 16 needed)"
        );
        assert_eq!(m[3].measured, None);
        assert!(m[3].to_string().contains("not measured"));
    }

    #[test]
    fn unclaimed_fields_are_not_judged() {
        let claimed = Spec {
            cores: Some(2),
            ..Spec::default()
        };
        let tested = Spec {
            cores: Some(4),
            ..Spec::default()
        };
        assert!(compare(&claimed, &tested, &Tolerances::default()).is_empty());
    }

    #[test]
    fn the_tested_spec_comes_from_the_inventory() {
        let mut inv = Inventory::default();
        inv.cpu.logical_cpus = 8;
        inv.cpu.base_mhz = Some(2400);
        inv.memory.total_bytes = 32 * GIB;
        inv.disks = vec![
            surplus_protocol::inventory::Disk {
                device: "nvme0n1".into(),
                capacity_bytes: Some(500),
                removable: Some(false),
                ..Default::default()
            },
            surplus_protocol::inventory::Disk {
                device: "sdb".into(),
                capacity_bytes: Some(64),
                removable: Some(true),
                ..Default::default()
            },
        ];
        let s = Spec::tested(&inv, BTreeMap::new());
        assert_eq!(
            (s.cores, s.memory_bytes, s.disk_bytes, s.clock_mhz),
            (Some(8), Some(32 * GIB), Some(500), Some(2400))
        );
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            1u32..256,
            1u64..1 << 40,
            1u64..1 << 44,
            500u32..6000,
            0.1f64..100.0,
        )
            .prop_map(|(c, m, d, k, s)| Spec {
                cores: Some(c),
                memory_bytes: Some(m),
                disk_bytes: Some(d),
                clock_mhz: Some(k),
                scores: [("cpu".to_owned(), s)].into(),
            })
    }

    proptest! {
        #[test]
        fn measuring_more_never_adds_a_mismatch(claimed in spec(), tested in spec(), bump in 1.0f64..4.0) {
            let t = Tolerances::default();
            let before = compare(&claimed, &tested, &t);
            let mut better = tested.clone();
            better.cores = better.cores.map(|c| (c as f64 * bump) as u32);
            better.memory_bytes = better.memory_bytes.map(|m| (m as f64 * bump) as u64);
            better.disk_bytes = better.disk_bytes.map(|d| (d as f64 * bump) as u64);
            better.clock_mhz = better.clock_mhz.map(|k| (k as f64 * bump) as u32);
            for v in better.scores.values_mut() { *v *= bump; }
            let after = compare(&claimed, &better, &t);
            let before_fields: std::collections::BTreeSet<_> = before.iter().map(|m| m.field.clone()).collect();
            prop_assert!(after.iter().all(|m| before_fields.contains(&m.field)));
        }

        /// The oracle is how the tested spec was made: each field falls short of the
        /// claim by a fraction drawn clearly inside or clearly beyond its tolerance
        /// (1% either side), and exactly the fields drawn beyond are named.
        #[test]
        fn exactly_the_fields_short_beyond_their_tolerance_are_named(
            claimed in spec(),
            beyond in proptest::collection::vec(any::<bool>(), 5),
            depth in proptest::collection::vec(0.0f64..1.0, 5),
            missing_cores in 1u32..4,
        ) {
            let t = Tolerances::default();
            let short = |i: usize, tolerance: f64| if beyond[i] {
                tolerance + 0.01 + depth[i] * (0.9 - tolerance)
            } else {
                depth[i] * (tolerance - 0.01)
            };
            // Rounded up, so that a value inside its tolerance never drops below it by
            // rounding; 1% of every claim below is at least one unit, so rounding never
            // lifts a value beyond its tolerance back inside.
            let scale = |v: f64, i: usize, tolerance: f64| (v * (1.0 - short(i, tolerance))).ceil();
            prop_assume!(claimed.memory_bytes >= Some(100) && claimed.disk_bytes >= Some(100));
            let mut tested = claimed.clone();
            if beyond[0] {
                tested.cores = claimed.cores.map(|c| c.saturating_sub(missing_cores));
            }
            tested.memory_bytes = claimed.memory_bytes.map(|m| scale(m as f64, 1, t.memory) as u64);
            tested.disk_bytes = claimed.disk_bytes.map(|d| scale(d as f64, 2, t.disk) as u64);
            tested.clock_mhz = claimed.clock_mhz.map(|k| scale(f64::from(k), 3, t.clock) as u32);
            for v in tested.scores.values_mut() { *v *= 1.0 - short(4, t.score); }
            let expected: Vec<&str> = ["cores", "memory_bytes", "disk_bytes", "clock_mhz", "scores.cpu"]
                .into_iter()
                .zip(&beyond)
                .filter(|(_, b)| **b)
                .map(|(f, _)| f)
                .collect();
            let named: Vec<String> = compare(&claimed, &tested, &t).into_iter().map(|m| m.field).collect();
            prop_assert_eq!(named, expected);
        }
    }
}
