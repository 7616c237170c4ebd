//! Delivery of the outbox's notices to an account's webhook: when a failed attempt is
//! tried again, and when delivery is given up.

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;

/// One attempt to deliver a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryAttempt {
    /// 1 for the first.
    pub attempt: u32,
    /// When.
    pub at_ms: UnixMillis,
    /// `delivered` or why not (`HTTP 500`, `connection refused`, ...).
    pub outcome: String,
}

/// The most attempts to deliver one notice.
pub const MAX_ATTEMPTS: u32 = 12;

/// When to try again after `attempts` failed attempts, the last at `now_ms`: after 1 s,
/// doubling each time (never more than an hour; with [`MAX_ATTEMPTS`] the longest
/// wait is 1024 s, about 34 minutes in all); `None` once [`MAX_ATTEMPTS`] were made
/// (the notice stays readable through the API, its attempts recorded).
pub fn retry_at(attempts: u32, now_ms: UnixMillis) -> Option<UnixMillis> {
    if attempts >= MAX_ATTEMPTS {
        return None;
    }
    let delay_ms = 1_000_i64
        .saturating_mul(1_i64 << attempts.saturating_sub(1).min(20))
        .min(3_600_000);
    Some(now_ms.saturating_add(delay_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_back_off_doubling_then_stop() {
        let delays: Vec<Option<i64>> = (1..=MAX_ATTEMPTS).map(|n| retry_at(n, 0)).collect();
        assert_eq!(
            &delays[..4],
            [Some(1_000), Some(2_000), Some(4_000), Some(8_000)]
        );
        assert_eq!(delays[11], None, "the twelfth failure gives up");
        assert_eq!(retry_at(11, 0), Some(1_024_000));
        assert!(delays.iter().flatten().all(|d| *d <= 3_600_000));
        assert!(
            delays.windows(2).all(|w| w[1].is_none() || w[0] <= w[1]),
            "never sooner"
        );
    }
}
