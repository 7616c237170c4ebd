//! What the seeded simulations (`market_day.rs`, `pool_term.rs`) share: their one
//! source of chance and the seeds a run replays.

use std::fmt;

use surplus_market::Refusal;
use uuid::Uuid;

/// Asserts `$cond`, the message starting with where the simulation is (`$ctx`).
macro_rules! ensure {
    ($ctx:expr, $cond:expr, $($msg:tt)+) => {
        assert!($cond, "{}: {}", $ctx, format_args!($($msg)+))
    };
}

/// Where a simulation is (its seed and step): every failure names it.
pub trait Where: fmt::Display + Copy {
    /// `result`'s value, or a failure naming where and `what`.
    fn ok<T, E: fmt::Debug>(self, result: Result<T, E>, what: impl fmt::Display) -> T {
        result.unwrap_or_else(|e| panic!("{self}: {what}: {e:?}"))
    }

    /// Fails unless `result` is refused by `rule`.
    fn refused<T: fmt::Debug>(
        self,
        result: Result<T, Refusal>,
        rule: &str,
        what: impl fmt::Display,
    ) {
        match result {
            Ok(v) => panic!("{self}: {what}: expected the refusal `{rule}`, got {v:?}"),
            Err(e) => assert_eq!(e.rule, rule, "{self}: {what}: {e}"),
        }
    }
}

/// SplitMix64: a simulation's only source of chance, so a seed replays its run.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n > 0`; the modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    pub fn uuid(&mut self) -> Uuid {
        Uuid::from_u64_pair(self.next_u64(), self.next_u64())
    }
}

/// The seeds of a run: `SURPLUS_SIM_SEED` (hex with `0x`, or decimal) or `default`
/// first, then `runs - 1` derived from it.
pub fn seeds(default: u64, runs: usize) -> Vec<u64> {
    let base = match std::env::var("SURPLUS_SIM_SEED") {
        Err(_) => default,
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
                None => text.replace('_', "").parse(),
            };
            parsed.unwrap_or_else(|e| panic!("SURPLUS_SIM_SEED={text:?} is not a u64 ({e})"))
        }
    };
    let mut derive = SplitMix64(base);
    std::iter::once(base)
        .chain((1..runs).map(|_| derive.next_u64()))
        .collect()
}
