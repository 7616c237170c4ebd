//! Usage metering on the wire: what an agent measures, how a record is keyed, and the
//! pure rules both sides apply to records (counter deltas, merging, validation).
//!
//! A record is one reading of one meter of one subject (the host or an instance) over
//! one period. Where the source has a cumulative counter (CPU time, bytes read) the
//! record carries the counter itself, not the increase: a lost record then loses no
//! usage, because the next one still holds the total. The controller turns counters
//! into deltas with [`counter_delta`]; a counter that starts again from zero (the
//! instance restarted, the agent restarted, the host rebooted) carries a new
//! `generation`, and a counter that went backwards within one generation is treated as
//! a reset too.
//!
//! Every record is keyed by (agent id, epoch, seq): the epoch is fixed when the agent
//! process starts and the sequence number is the record's position in the agent's spool,
//! so a record sent twice is recognised, and the controller counts it once.

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;

/// Meter names. Instance meters first, then host meters, then subscription meters.
pub mod meters {
    /// CPU time used, nanoseconds (counter).
    pub const CPU_NS: &str = "cpu_ns";
    /// Memory in use, bytes (gauge: last, peak and mean over the period).
    pub const MEMORY_BYTES: &str = "memory_bytes";
    /// Memory in use integrated over time, byte-milliseconds (counter kept by the agent).
    pub const MEMORY_BYTE_MS: &str = "memory_byte_ms";
    /// Bytes read from block devices (counter).
    pub const DISK_READ_BYTES: &str = "disk_read_bytes";
    /// Bytes written to block devices (counter).
    pub const DISK_WRITE_BYTES: &str = "disk_write_bytes";
    /// Network bytes received (counter).
    pub const NET_RX_BYTES: &str = "net_rx_bytes";
    /// Network bytes sent (counter).
    pub const NET_TX_BYTES: &str = "net_tx_bytes";
    /// Prefix of the time spent in each state, milliseconds (`state_ms.running`).
    pub const STATE_MS_PREFIX: &str = "state_ms.";
    /// Milliseconds the instance was running (counter kept by the agent).
    pub const STATE_MS_RUNNING: &str = "state_ms.running";

    /// Host CPU time busy (not idle or iowait), milliseconds (counter).
    pub const HOST_CPU_BUSY_MS: &str = "cpu_busy_ms";
    /// Host CPU time in total, milliseconds summed over CPUs (counter).
    pub const HOST_CPU_TOTAL_MS: &str = "cpu_total_ms";
    /// Host memory in use, bytes (gauge).
    pub const HOST_MEMORY_USED_BYTES: &str = "memory_used_bytes";
    /// Host memory installed, bytes (gauge).
    pub const HOST_MEMORY_TOTAL_BYTES: &str = "memory_total_bytes";
    /// Host uptime, seconds (gauge).
    pub const HOST_UPTIME_S: &str = "uptime_s";

    /// Running operating-system instances (gauge with the peak in the period).
    pub const OS_INSTANCES: &str = "os_instances";
    /// Prefix of the application instance counts (`app.postgres`).
    pub const APP_PREFIX: &str = "app.";
}

/// What a record measures.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Subject {
    /// The host as a whole (host and subscription meters).
    Host,
    /// One instance (`i-...`).
    Instance(String),
}

impl Subject {
    /// Storage and display form: `host` or the instance id.
    pub fn as_str(&self) -> &str {
        match self {
            Subject::Host => "host",
            Subject::Instance(id) => id,
        }
    }
}

/// One meter's reading over a record's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Reading {
    /// A cumulative counter: its `total` since it started at zero, and which start
    /// (`generation`) that was.
    Counter {
        /// Identifies one run of the counter; a new generation starts from zero.
        generation: u64,
        /// Value since the counter started.
        total: u64,
    },
    /// A level sampled during the period.
    Gauge {
        /// At the end of the period.
        last: u64,
        /// Highest seen in the period.
        peak: u64,
        /// Time-weighted mean over the period.
        mean: u64,
    },
}

/// One record: one meter of one subject over `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRecord {
    /// The agent process's epoch (fixed when the process starts).
    pub epoch: u64,
    /// Position in the agent's spool; never reused.
    pub seq: u64,
    /// What is measured.
    pub subject: Subject,
    /// Which meter (see [`meters`]).
    pub meter: String,
    /// Start of the period the record covers.
    pub start_ms: UnixMillis,
    /// End of the period.
    pub end_ms: UnixMillis,
    /// The reading.
    pub reading: Reading,
    /// How many sampling periods the record stands for: 1, or more after the spool
    /// merged old records to stay within its size limit.
    pub samples: u32,
}

/// The agent's spool as it stood when a batch was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpoolState {
    /// Records not yet acknowledged, this batch included.
    pub pending_records: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// Records merged into coarser ones since the agent started, because the spool
    /// reached its size limit.
    pub merged_records: u64,
    /// Damaged records found and skipped since the agent started (torn writes, bad
    /// checksums).
    pub discarded_records: u64,
}

/// A batch of records, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageBatch {
    /// The records.
    pub records: Vec<UsageRecord>,
    /// The spool's state.
    pub spool: SpoolState,
}

/// The controller committed a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageAck {
    /// Records stored for the first time.
    pub stored: u32,
    /// Records already stored by an earlier send (recognised by their key).
    pub duplicates: u32,
    /// Records refused and kept aside with the reason (see the controller's log).
    pub rejected: u32,
}

/// Sampling periods in milliseconds, one per meter group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeteringPeriods {
    /// Instance meters.
    pub instance_ms: u64,
    /// Host meters.
    pub host_ms: u64,
    /// Subscription meters.
    pub subscription_ms: u64,
}

impl Default for MeteringPeriods {
    fn default() -> Self {
        Self {
            instance_ms: 60_000,
            host_ms: 60_000,
            subscription_ms: 300_000,
        }
    }
}

/// Shortest accepted sampling period.
pub const MIN_PERIOD_MS: u64 = 100;
/// Longest accepted sampling period (one day).
pub const MAX_PERIOD_MS: u64 = 86_400_000;

impl MeteringPeriods {
    /// Checks every period is within [`MIN_PERIOD_MS`, `MAX_PERIOD_MS`]; names the
    /// first one that is not.
    pub fn validate(&self) -> Result<(), String> {
        for (name, ms) in [
            ("instance", self.instance_ms),
            ("host", self.host_ms),
            ("subscription", self.subscription_ms),
        ] {
            if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&ms) {
                return Err(format!(
                    "{name}: period of {ms} ms is outside {MIN_PERIOD_MS} ms to {MAX_PERIOD_MS} ms"
                ));
            }
        }
        Ok(())
    }
}

/// The agent applied new periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeteringAck {
    /// The periods now in force.
    pub periods: MeteringPeriods,
    /// When the first period of the new length starts (the next boundary).
    pub effective_from_ms: UnixMillis,
}

/// The end of the period containing `now_ms`: periods are aligned to multiples of
/// `period_ms` since the Unix epoch, so every agent's hours start on the hour.
pub fn next_boundary(now_ms: UnixMillis, period_ms: u64) -> UnixMillis {
    let p = i64::try_from(period_ms.max(1)).unwrap_or(i64::MAX);
    (now_ms.div_euclid(p) + 1) * p
}

/// The increase a counter reading stands for, given the previous reading of the same
/// meter (`None` for the first). A new generation, or a value below the previous one,
/// means the counter started again from zero: the whole value is new usage.
pub fn counter_delta(previous: Option<(u64, u64)>, generation: u64, total: u64) -> u64 {
    match previous {
        Some((g, t)) if g == generation && total >= t => total - t,
        _ => total,
    }
}

/// How far past the receiver's clock a record may end: agents' clocks drift, but usage
/// of hours to come would stand for a host that has reported everything.
pub const MAX_FUTURE_MS: i64 = 3_600_000;

/// Why a record is refused at ingest (`now_ms`: the receiver's clock).
pub fn validate_record(r: &UsageRecord, now_ms: UnixMillis) -> Result<(), String> {
    let meter_ok = !r.meter.is_empty()
        && r.meter.len() <= 64
        && r.meter.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
        });
    if !meter_ok {
        return Err(format!(
            "meter {:?}: must be 1 to 64 of a-z, 0-9, '_', '.', '-'",
            r.meter
        ));
    }
    if let Subject::Instance(id) = &r.subject {
        crate::control::validate_id("subject", "i-", id).map_err(|e| e.to_string())?;
    }
    if r.end_ms < r.start_ms {
        return Err(format!(
            "period ends ({}) before it starts ({})",
            r.end_ms, r.start_ms
        ));
    }
    if r.end_ms > now_ms.saturating_add(MAX_FUTURE_MS) {
        return Err(format!(
            "period ends at {}, more than an hour after the controller's clock ({now_ms})",
            r.end_ms
        ));
    }
    if r.samples == 0 {
        return Err("samples: a record stands for at least one period".into());
    }
    if let Reading::Gauge { last, peak, mean } = r.reading
        && (last > peak || mean > peak)
    {
        return Err(format!(
            "gauge reading last {last}, mean {mean} above its peak {peak}"
        ));
    }
    Ok(())
}

/// Merges consecutive records of the same subject and meter into one, oldest first, so
/// that a full spool can shrink without dropping usage. Counters keep the last reading
/// of each generation (they are cumulative, so the dropped readings carried nothing
/// the last one does not); gauges keep the highest peak, the last value and the
/// time-weighted mean. A merged record keeps the key of the last record it absorbed.
/// Records that cannot merge (another generation of a counter, or a counter that went
/// backwards) stay as they are.
pub fn merge(records: Vec<UsageRecord>) -> Vec<UsageRecord> {
    use std::collections::BTreeMap;
    // Index in `out` of the open merge target per (subject, meter).
    let mut open: BTreeMap<(Subject, String), usize> = BTreeMap::new();
    // The previous reading per (subject, meter), merged or not.
    let mut previous: BTreeMap<(Subject, String), Reading> = BTreeMap::new();
    let mut out: Vec<UsageRecord> = Vec::with_capacity(records.len());
    for r in records {
        let key = (r.subject.clone(), r.meter.clone());
        // A counter that went backwards within its generation was reset; if it
        // absorbed later readings the reset could be hidden, so it stays alone and the
        // next reading opens a new target.
        let went_back = matches!(
            (previous.insert(key.clone(), r.reading), r.reading),
            (
                Some(Reading::Counter { generation: ga, total: ta }),
                Reading::Counter { generation: gb, total: tb },
            ) if ga == gb && tb < ta
        );
        let merged = match open.get(&key) {
            Some(&i) if !went_back => merge_two(&out[i], &r).map(|m| (i, m)),
            _ => None,
        };
        match merged {
            Some((i, m)) => out[i] = m,
            None if went_back => {
                open.remove(&key);
                out.push(r);
            }
            None => {
                open.insert(key, out.len());
                out.push(r);
            }
        }
    }
    out.sort_by_key(|r| r.seq);
    out
}

fn merge_two(a: &UsageRecord, b: &UsageRecord) -> Option<UsageRecord> {
    let reading = match (a.reading, b.reading) {
        (
            Reading::Counter {
                generation: ga,
                total: ta,
            },
            Reading::Counter {
                generation: gb,
                total,
            },
        ) if ga == gb && total >= ta => Reading::Counter {
            generation: gb,
            total,
        },
        (
            Reading::Gauge {
                peak: pa, mean: ma, ..
            },
            Reading::Gauge {
                last,
                peak: pb,
                mean: mb,
            },
        ) => {
            let wa = u128::try_from((a.end_ms - a.start_ms).max(0)).unwrap_or(0);
            let wb = u128::try_from((b.end_ms - b.start_ms).max(0)).unwrap_or(0);
            let mean = (u128::from(ma) * wa + u128::from(mb) * wb)
                .checked_div(wa + wb)
                .map_or(ma.max(mb), |m| u64::try_from(m).unwrap_or(u64::MAX));
            Reading::Gauge {
                last,
                peak: pa.max(pb),
                mean: mean.min(pa.max(pb)),
            }
        }
        _ => return None,
    };
    Some(UsageRecord {
        epoch: b.epoch,
        seq: b.seq,
        subject: b.subject.clone(),
        meter: b.meter.clone(),
        start_ms: a.start_ms.min(b.start_ms),
        end_ms: a.end_ms.max(b.end_ms),
        reading,
        samples: a.samples.saturating_add(b.samples),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counter(seq: u64, generation: u64, total: u64) -> UsageRecord {
        UsageRecord {
            epoch: 1,
            seq,
            subject: Subject::Instance("i-0000000000000001".into()),
            meter: meters::CPU_NS.into(),
            start_ms: seq as i64 * 10,
            end_ms: seq as i64 * 10 + 10,
            reading: Reading::Counter { generation, total },
            samples: 1,
        }
    }

    #[test]
    fn deltas_follow_counters_and_their_resets() {
        assert_eq!(counter_delta(None, 1, 50), 50, "first reading counts whole");
        assert_eq!(counter_delta(Some((1, 50)), 1, 80), 30);
        assert_eq!(counter_delta(Some((1, 80)), 1, 80), 0, "same reading again");
        assert_eq!(
            counter_delta(Some((1, 80)), 2, 5),
            5,
            "new generation starts at zero"
        );
        assert_eq!(
            counter_delta(Some((1, 80)), 2, 500),
            500,
            "a new generation counts whole even when it is above the old total"
        );
        assert_eq!(
            counter_delta(Some((1, 80)), 1, 3),
            3,
            "went backwards: reset"
        );
    }

    #[test]
    fn boundaries_are_aligned() {
        assert_eq!(next_boundary(0, 1000), 1000);
        assert_eq!(next_boundary(999, 1000), 1000);
        assert_eq!(next_boundary(1000, 1000), 2000);
        assert_eq!(next_boundary(-1, 1000), 0);
    }

    #[test]
    fn validation_names_the_problem() {
        let now = 1_000_000;
        let mut r = counter(0, 1, 1);
        assert!(validate_record(&r, now).is_ok());
        r.meter = "CPU; drop".into();
        assert!(validate_record(&r, now).unwrap_err().contains("meter"));
        let mut r = counter(0, 1, 1);
        r.subject = Subject::Instance("../etc".into());
        assert!(validate_record(&r, now).unwrap_err().contains("subject"));
        let mut r = counter(0, 1, 1);
        r.end_ms = r.start_ms - 1;
        assert!(validate_record(&r, now).unwrap_err().contains("before"));
        let mut r = counter(0, 1, 1);
        r.end_ms = now + MAX_FUTURE_MS + 1;
        assert!(
            validate_record(&r, now)
                .unwrap_err()
                .contains("after the controller's clock")
        );
        let mut r = counter(0, 1, 1);
        r.reading = Reading::Gauge {
            last: 5,
            peak: 4,
            mean: 1,
        };
        assert!(validate_record(&r, now).unwrap_err().contains("peak"));
        assert!(
            MeteringPeriods {
                host_ms: 10,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .starts_with("host")
        );
    }

    #[test]
    fn gauges_merge_to_peak_last_and_weighted_mean() {
        let g = |seq: u64, start: i64, end: i64, last, peak, mean| UsageRecord {
            reading: Reading::Gauge { last, peak, mean },
            meter: meters::MEMORY_BYTES.into(),
            start_ms: start,
            end_ms: end,
            ..counter(seq, 0, 0)
        };
        let merged = merge(vec![g(1, 0, 10, 5, 8, 4), g(2, 10, 40, 2, 6, 8)]);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].seq, 2);
        assert_eq!((merged[0].start_ms, merged[0].end_ms), (0, 40));
        assert_eq!(
            merged[0].reading,
            Reading::Gauge {
                last: 2,
                peak: 8,
                mean: 7
            }
        );
        assert_eq!(merged[0].samples, 2);
    }

    proptest! {
        /// Merging never changes what a counter sums to: the deltas over the merged
        /// records equal the deltas over the originals.
        #[test]
        fn merging_preserves_counter_totals(steps in proptest::collection::vec((0u64..4, 0u64..1000, any::<bool>()), 1..60)) {
            let mut generation = 0;
            let mut total = 0;
            let mut records = Vec::new();
            for (i, (grow, by, restart)) in steps.into_iter().enumerate() {
                if restart && grow == 0 {
                    generation += 1;
                    total = 0;
                } else if restart && grow == 3 {
                    // Reset without a new generation.
                    total = 0;
                }
                total += by * grow;
                records.push(counter(i as u64, generation, total));
            }
            let sum = |rs: &[UsageRecord]| {
                let mut prev = None;
                let mut sum = 0;
                for r in rs {
                    if let Reading::Counter { generation, total } = r.reading {
                        sum += counter_delta(prev, generation, total);
                        prev = Some((generation, total));
                    }
                }
                sum
            };
            let merged = merge(records.clone());
            prop_assert!(merged.len() <= records.len());
            prop_assert_eq!(sum(&records), sum(&merged));
            prop_assert!(merged.windows(2).all(|w| w[0].seq < w[1].seq));
        }
    }
}
