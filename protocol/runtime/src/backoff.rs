//! Reconnect delays: exponential with full jitter, capped.

use std::time::Duration;

/// Delay before reconnect attempt number `attempt` (0-based): a uniformly random
/// fraction `unit` (in `[0, 1)`) of `min * 2^attempt`, never below `min / 2` and never
/// above `max`.
pub fn delay(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let ceiling = min
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max);
    let floor = (min / 2).min(ceiling);
    floor + (ceiling - floor).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn delays_grow_then_cap() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(delay(0, min, max, 1.0), Duration::from_secs(1));
        assert_eq!(delay(3, min, max, 1.0), Duration::from_secs(8));
        assert_eq!(delay(20, min, max, 1.0), max);
        assert_eq!(delay(20, min, max, 0.0), Duration::from_millis(500));
    }

    proptest! {
        #[test]
        fn delays_stay_within_bounds(attempt in 0u32..100, unit in 0.0f64..1.0) {
            let (min, max) = (Duration::from_millis(100), Duration::from_secs(30));
            let d = delay(attempt, min, max, unit);
            prop_assert!(d >= min / 2 && d <= max);
        }
    }
}
