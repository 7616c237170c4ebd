//! The usage exchange between controllers (issue 18, C12): what a host cloud sends a
//! broker about the subscribers it hosts, and what the broker keeps of it.
//!
//! # Rules
//!
//! 1. **Minutes** ([`minute_usage`]). A host cloud turns its own metering into rows of
//!    one user, one resource and one minute: the unit-milliseconds used in that minute.
//!    A usage record's delta is spread over the minutes its sampling period covers,
//!    in proportion to the time in each ([`split_by_minute`]), exactly. `os_instances`
//!    is the instances' running time (`state_ms.running`), `cpu_cores` their CPU time
//!    (`cpu_ns`, a core busy for a millisecond is one core-millisecond), `memory_gb`
//!    their memory integrated over time (`memory_byte_ms`, GiB). Sums are taken per
//!    minute before converting, and the conversion rounds down.
//! 2. **Sequence** ([`accept`]). A sender numbers its rows per peer from 1 without
//!    gaps and sends them in order; a row is sent again until the receiver acknowledges
//!    it. The receiver keeps rows after the last one it holds, skips rows it holds
//!    (`duplicate`), and refuses a batch that would leave a gap (`gap`), out of order
//!    (`order`), or with a row that is not a whole minute (`minute`), of an unknown
//!    resource (`resource`), of a user no subscription could name (`user`: 1 to 64
//!    of `[A-Za-z0-9_.-]`), or counting more than a million units over the minute
//!    (`units`): nothing of a refused batch is kept, so a row counts exactly
//!    once however often it arrives.
//! 3. **Periods** ([`used_in_period`]). What a user used of a resource in a
//!    subscription period is its unit-milliseconds over the period divided by the
//!    period's length, rounded up: the time-weighted average of concurrent units, where
//!    any use at all counts as at least one.

use std::collections::BTreeMap;

use surplus_protocol::clock::UnixMillis;
use surplus_protocol::peer::PeerUsageRow;
use surplus_protocol::usage::meters;

pub use crate::Refusal;
use crate::refuse;

/// One minute.
pub const MINUTE_MS: i64 = 60_000;

/// Resources metered by Surplus itself (subscriptions may also name `app.<name>`).
pub const RESOURCES: [&str; 3] = ["os_instances", "cpu_cores", "memory_gb"];

/// Whether `resource` is one a subscription and the exchange may name.
pub fn is_resource(resource: &str) -> bool {
    RESOURCES.contains(&resource)
        || resource.strip_prefix("app.").is_some_and(|name| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Most unit-milliseconds one row may count: a million units busy for the whole minute.
pub const MAX_UNIT_MS: u64 = 1_000_000 * MINUTE_MS as u64;

/// Whether `user` is a name a subscription can carry (and so a ledger account):
/// 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn is_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// A counter's delta from one instance's usage record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterDelta {
    /// The user the instance's account is known as to the broker.
    pub user: String,
    /// The meter (`state_ms.running`, `cpu_ns`, `memory_byte_ms`; others are ignored).
    pub meter: String,
    /// Start of the record's sampling period.
    pub start_ms: UnixMillis,
    /// Its end (exclusive).
    pub end_ms: UnixMillis,
    /// What the record added to its counter.
    pub delta: u64,
}

const GIB: u128 = 1 << 30;

/// Rows (without sequence numbers) of the minutes in `[from, until)`, sorted by
/// minute, user and resource; minutes with no use are left out.
pub fn minute_usage(
    deltas: &[MeterDelta],
    from: UnixMillis,
    until: UnixMillis,
) -> Vec<(String, &'static str, UnixMillis, u64)> {
    let mut sums: BTreeMap<(UnixMillis, &str, &'static str), u128> = BTreeMap::new();
    let first = from.div_euclid(MINUTE_MS) * MINUTE_MS;
    for d in deltas {
        let resource = match d.meter.as_str() {
            meters::STATE_MS_RUNNING => "os_instances",
            meters::CPU_NS => "cpu_cores",
            meters::MEMORY_BYTE_MS => "memory_gb",
            _ => continue,
        };
        for (minute, part) in split_by_minute(d.start_ms, d.end_ms, d.delta) {
            if minute >= first && minute < until {
                *sums.entry((minute, &d.user, resource)).or_default() += u128::from(part);
            }
        }
    }
    sums.into_iter()
        .filter_map(|((minute, user, resource), sum)| {
            let unit_ms = match resource {
                "cpu_cores" => sum / 1_000_000,
                "memory_gb" => sum / GIB,
                _ => sum,
            };
            (unit_ms > 0).then(|| {
                (
                    user.to_owned(),
                    resource,
                    minute,
                    u64::try_from(unit_ms).unwrap_or(u64::MAX),
                )
            })
        })
        .collect()
}

/// A record's delta spread over the minutes its period `[start, end)` covers, in
/// proportion to the time in each; the parts add up to the delta exactly. A record
/// without length counts whole in the minute it starts.
pub fn split_by_minute(start: UnixMillis, end: UnixMillis, delta: u64) -> Vec<(UnixMillis, u64)> {
    let minute_of = |t: UnixMillis| t.div_euclid(MINUTE_MS) * MINUTE_MS;
    if end <= start {
        return vec![(minute_of(start), delta)];
    }
    let len = i128::from(end) - i128::from(start);
    let share =
        |t: UnixMillis| (i128::from(delta) * (i128::from(t) - i128::from(start)) / len) as u64;
    let mut parts = Vec::new();
    let mut m = minute_of(start);
    while m < end {
        let (a, b) = (m.max(start), m.saturating_add(MINUTE_MS).min(end));
        let part = share(b) - share(a);
        if part > 0 {
            parts.push((m, part));
        }
        m = m.saturating_add(MINUTE_MS);
    }
    parts
}

/// What a receiver does with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted<'a> {
    /// The rows to store, in order.
    pub new: Vec<&'a PeerUsageRow>,
    /// Rows it already holds.
    pub duplicates: usize,
    /// The last row held once the new ones are stored: the acknowledgement.
    pub through_seq: u64,
}

/// Checks a batch against the last row the receiver holds (`have`).
pub fn accept(have: u64, rows: &[PeerUsageRow]) -> Result<Accepted<'_>, Refusal> {
    let mut through = have;
    let mut new = Vec::new();
    let mut duplicates = 0;
    let mut previous = 0;
    for row in rows {
        if row.seq <= previous {
            return Err(refuse(
                "order",
                format!(
                    "row {} follows row {previous}: rows go in sequence order",
                    row.seq
                ),
            ));
        }
        previous = row.seq;
        if row.minute_ms.rem_euclid(MINUTE_MS) != 0 {
            return Err(refuse(
                "minute",
                format!(
                    "row {} starts at {} ms, not on a whole minute",
                    row.seq, row.minute_ms
                ),
            ));
        }
        if !is_resource(&row.resource) {
            return Err(refuse(
                "resource",
                format!(
                    "row {} names the unknown resource {:?}",
                    row.seq, row.resource
                ),
            ));
        }
        if !is_user(&row.user) {
            return Err(refuse(
                "user",
                format!(
                    "row {} names the user {:?}: 1 to 64 of letters, digits, `.`, `_`, `-`",
                    row.seq, row.user
                ),
            ));
        }
        if row.unit_ms > MAX_UNIT_MS {
            return Err(refuse(
                "units",
                format!(
                    "row {} counts {} unit-ms in one minute, more than {MAX_UNIT_MS}",
                    row.seq, row.unit_ms
                ),
            ));
        }
        if row.seq <= through {
            duplicates += 1;
            continue;
        }
        if row.seq != through + 1 {
            return Err(refuse(
                "gap",
                format!(
                    "row {} would leave a gap after row {through}: rows {}..{} are missing",
                    row.seq,
                    through + 1,
                    row.seq
                ),
            ));
        }
        through = row.seq;
        new.push(row);
    }
    Ok(Accepted {
        new,
        duplicates,
        through_seq: through,
    })
}

/// Units used in a period of `period_ms` from the unit-milliseconds in it.
pub fn used_in_period(unit_ms: u128, period_ms: i64) -> u64 {
    let period = u128::try_from(period_ms.max(1)).unwrap_or(1);
    u64::try_from(unit_ms.div_ceil(period)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(seq: u64) -> PeerUsageRow {
        PeerUsageRow {
            seq,
            user: "alice".into(),
            resource: "os_instances".into(),
            minute_ms: 60_000 * seq as i64,
            unit_ms: 1000,
        }
    }

    fn delta(user: &str, meter: &str, start_ms: i64, delta: u64) -> MeterDelta {
        MeterDelta {
            user: user.into(),
            meter: meter.into(),
            start_ms,
            end_ms: start_ms,
            delta,
        }
    }

    #[test]
    fn minutes_sum_before_converting_and_leave_out_other_meters() {
        let d = [
            delta("alice", meters::STATE_MS_RUNNING, 0, 30_000),
            delta("alice", meters::STATE_MS_RUNNING, 30_000, 30_000),
            delta("alice", meters::STATE_MS_RUNNING, 60_000, 10_000),
            // Two half-millisecond-less readings still make one core-ms together.
            delta("alice", meters::CPU_NS, 1_000, 600_000),
            delta("alice", meters::CPU_NS, 2_000, 600_000),
            delta("bob", meters::MEMORY_BYTE_MS, 5_000, 3 << 30),
            delta("bob", meters::NET_RX_BYTES, 5_000, 999),
            // Outside the window.
            delta("bob", meters::STATE_MS_RUNNING, 120_000, 5),
        ];
        assert_eq!(
            minute_usage(&d, 0, 120_000),
            vec![
                ("alice".into(), "cpu_cores", 0, 1),
                ("alice".into(), "os_instances", 0, 60_000),
                ("bob".into(), "memory_gb", 0, 3),
                ("alice".into(), "os_instances", 60_000, 10_000),
            ]
        );
    }

    #[test]
    fn a_batch_sent_again_counts_once_and_a_gap_is_refused_whole() {
        let batch: Vec<_> = (1..=3).map(row).collect();
        let first = accept(0, &batch).unwrap();
        assert_eq!(
            (first.new.len(), first.duplicates, first.through_seq),
            (3, 0, 3)
        );
        let again = accept(3, &batch).unwrap();
        assert_eq!(
            (again.new.len(), again.duplicates, again.through_seq),
            (0, 3, 3)
        );
        let overlap: Vec<_> = (2..=5).map(row).collect();
        let o = accept(3, &overlap).unwrap();
        assert_eq!(o.new.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(accept(3, &[row(5)]).unwrap_err().rule, "gap");
        assert_eq!(accept(3, &[row(2), row(1)]).unwrap_err().rule, "order");
        let mut odd = row(1);
        odd.minute_ms += 1;
        assert_eq!(accept(0, &[odd]).unwrap_err().rule, "minute");
        let mut unknown = row(1);
        unknown.resource = "gpus".into();
        assert_eq!(accept(0, &[unknown]).unwrap_err().rule, "resource");
        let mut odd_user = row(1);
        odd_user.user = "bob@here".into();
        assert_eq!(accept(0, &[odd_user]).unwrap_err().rule, "user");
        let mut huge = row(1);
        huge.unit_ms = MAX_UNIT_MS + 1;
        assert_eq!(accept(0, &[huge]).unwrap_err().rule, "units");
        let mut app = row(1);
        app.resource = "app.postgres".into();
        assert!(accept(0, &[app]).is_ok());
    }

    #[test]
    fn a_record_across_a_minute_is_split_by_its_time_in_each() {
        // 1 s of running from 59.5 s: half in each minute.
        assert_eq!(
            split_by_minute(59_500, 60_500, 1_000),
            vec![(0, 500), (60_000, 500)]
        );
        // Odd amounts are kept whole: the parts add up to the delta.
        let parts = split_by_minute(10_000, 190_001, 1_000_003);
        assert_eq!(parts.iter().map(|p| p.1).sum::<u64>(), 1_000_003);
        assert_eq!(parts.len(), 4);
        assert_eq!(split_by_minute(70_000, 70_000, 9), vec![(60_000, 9)]);
        let d = MeterDelta {
            user: "alice".into(),
            meter: meters::STATE_MS_RUNNING.into(),
            start_ms: 59_000,
            end_ms: 61_000,
            delta: 2_000,
        };
        assert_eq!(
            minute_usage(std::slice::from_ref(&d), 60_000, 120_000),
            vec![("alice".into(), "os_instances", 60_000, 1_000)],
            "only the part inside the window"
        );
    }

    #[test]
    fn a_period_uses_the_average_rounded_up() {
        assert_eq!(used_in_period(0, 3_600_000), 0);
        assert_eq!(used_in_period(1, 3_600_000), 1);
        assert_eq!(used_in_period(10 * 3_600_000, 3_600_000), 10);
        assert_eq!(used_in_period(10 * 3_600_000 + 1, 3_600_000), 11);
    }

    proptest! {
        /// However a sender's rows are cut into batches and repeated, the receiver
        /// keeps every row exactly once, in order.
        #[test]
        fn every_row_is_kept_exactly_once(
            n in 0u64..40,
            cuts in proptest::collection::vec((0u64..40, 0u64..40), 0..30),
        ) {
            let all: Vec<_> = (1..=n).map(row).collect();
            let mut have = 0;
            let mut kept = Vec::new();
            for (a, b) in cuts {
                let (lo, hi) = (a.min(b), a.max(b));
                let batch: Vec<_> = all.iter().filter(|r| r.seq > lo && r.seq <= hi).cloned().collect();
                match accept(have, &batch) {
                    Ok(ok) => {
                        kept.extend(ok.new.iter().map(|r| r.seq));
                        have = ok.through_seq;
                    }
                    Err(e) => prop_assert_eq!(e.rule, "gap"),
                }
            }
            // The sender resends from the acknowledgement until all are held.
            let rest: Vec<_> = all.iter().filter(|r| r.seq > have).cloned().collect();
            let ok = accept(have, &rest).unwrap();
            kept.extend(ok.new.iter().map(|r| r.seq));
            prop_assert_eq!(kept, (1..=n).collect::<Vec<_>>());
        }
    }
}
