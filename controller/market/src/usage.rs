//! What a batch of usage records does to the stored usage: which records are new,
//! which were seen before, which are refused and why, and what each counter adds.
//!
//! The store reads what the decision needs (the batch's keys already stored, the
//! counter cursors of its subjects, the owner of each instance it names) and applies
//! the [`BatchPlan`] in the transaction it read in. Both backends ingest through
//! [`plan_batch`], so the rules are written once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use surplus_protocol::clock::UnixMillis;
use surplus_protocol::usage::{Reading, Subject, UsageRecord, counter_delta, validate_record};

/// A record's key within one agent's usage: (boot epoch, sequence number), as the
/// database stores it (values past `i64::MAX` saturate, and are refused anyway).
pub type Key = (i64, i64);

/// A counter's cursor: (generation, total) of the last reading counted.
pub type Cursor = (u64, u64);

/// Who an instance belongs to, as the controller recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The agent that hosts it.
    pub agent_id: String,
    /// The account that ran it.
    pub account: String,
}

/// What the store holds that a batch's outcome depends on.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// Keys of the batch already stored for this agent.
    pub keys: HashSet<Key>,
    /// Cursors per (subject, meter) of the batch's subjects.
    pub cursors: HashMap<(String, String), Cursor>,
    /// The owner of each instance the batch names; an instance missing here is
    /// unknown to the controller.
    pub owners: HashMap<String, Owner>,
}

/// The record's key as stored.
pub fn key_of(r: &UsageRecord) -> Key {
    (
        i64::try_from(r.epoch).unwrap_or(i64::MAX),
        i64::try_from(r.seq).unwrap_or(i64::MAX),
    )
}

/// The subjects of a batch (to read their cursors) and the instances it names (to
/// read their owners).
pub fn subjects(records: &[UsageRecord]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut subjects = BTreeSet::new();
    let mut instances = BTreeSet::new();
    for r in records {
        subjects.insert(r.subject.as_str().to_owned());
        if let Subject::Instance(id) = &r.subject {
            instances.insert(id.clone());
        }
    }
    (subjects, instances)
}

/// One new usage row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRow {
    /// Boot epoch.
    pub epoch: i64,
    /// Sequence number.
    pub seq: i64,
    /// `host`, an instance id or a subscription.
    pub subject: String,
    /// The instance's account (instances only).
    pub account: Option<String>,
    /// The meter.
    pub meter: String,
    /// Start of its period.
    pub start_ms: UnixMillis,
    /// End of its period.
    pub end_ms: UnixMillis,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Counters: the reading's generation.
    pub generation: Option<i64>,
    /// Counters: the cumulative total.
    pub total: Option<i64>,
    /// Counters: what the record adds since the cursor (0 for gauges).
    pub delta: i64,
    /// Gauges: the last value.
    pub last: Option<i64>,
    /// Gauges: the peak.
    pub peak: Option<i64>,
    /// Gauges: the time-weighted mean.
    pub mean: Option<i64>,
    /// Samples behind it.
    pub samples: u32,
}

/// A record refused, kept aside with the reason; never counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Boot epoch.
    pub epoch: u64,
    /// Sequence number.
    pub seq: u64,
    /// Why.
    pub reason: String,
    /// The record as received, for people.
    pub record: String,
}

/// What to write for a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// New rows, in the batch's order.
    pub rows: Vec<NewRow>,
    /// Refused records (a refusal stored before counts as a duplicate when stored).
    pub rejected: Vec<Rejected>,
    /// Records stored before, or earlier in the same batch.
    pub duplicates: u32,
    /// The cursors the batch moved, with their new values.
    pub cursors: BTreeMap<(String, String), Cursor>,
}

/// Decides what `records` from `agent_id` do, received at `now_ms`:
///
/// - a record that fails [`validate_record`], names an instance unknown to the
///   controller or hosted by another agent, or carries a value past `i64::MAX` is
///   refused with the reason;
/// - a record whose key is stored, or came earlier in the batch, is a duplicate and
///   moves nothing;
/// - any other is new: a counter adds [`counter_delta`] from its cursor (a new
///   generation is a reset) and moves the cursor.
pub fn plan_batch(
    agent_id: &str,
    records: &[UsageRecord],
    stored: &Stored,
    now_ms: UnixMillis,
) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut seen: HashSet<Key> = HashSet::new();
    for r in records {
        let key = key_of(r);
        let (account, problem) = check_record(agent_id, r, stored, now_ms);
        if let Some(reason) = problem {
            plan.rejected.push(Rejected {
                epoch: r.epoch,
                seq: r.seq,
                reason,
                record: format!("{r:?}"),
            });
            continue;
        }
        if stored.keys.contains(&key) || !seen.insert(key) {
            plan.duplicates += 1;
            continue;
        }
        let subject = r.subject.as_str().to_owned();
        let row = match r.reading {
            Reading::Counter { generation, total } => {
                let ck = (subject.clone(), r.meter.clone());
                let previous = plan
                    .cursors
                    .get(&ck)
                    .or_else(|| stored.cursors.get(&ck))
                    .copied();
                let delta = counter_delta(previous, generation, total);
                plan.cursors.insert(ck, (generation, total));
                NewRow {
                    kind: "counter",
                    generation: Some(generation as i64),
                    total: Some(total as i64),
                    delta: i64::try_from(delta).unwrap_or(i64::MAX),
                    last: None,
                    peak: None,
                    mean: None,
                    ..row_base(key, subject, account, r)
                }
            }
            Reading::Gauge { last, peak, mean } => NewRow {
                kind: "gauge",
                generation: None,
                total: None,
                delta: 0,
                last: Some(last as i64),
                peak: Some(peak as i64),
                mean: Some(mean as i64),
                ..row_base(key, subject, account, r)
            },
        };
        plan.rows.push(row);
    }
    plan
}

/// The account of the record's instance, or why the record is refused.
fn check_record(
    agent_id: &str,
    r: &UsageRecord,
    stored: &Stored,
    now_ms: UnixMillis,
) -> (Option<String>, Option<String>) {
    if let Err(problem) = validate_record(r, now_ms) {
        return (None, Some(problem));
    }
    let mut account = None;
    if let Subject::Instance(id) = &r.subject {
        match stored.owners.get(id) {
            Some(o) if o.agent_id == agent_id => account = Some(o.account.clone()),
            Some(_) => {
                return (
                    None,
                    Some(format!("instance {id} is not hosted by this agent")),
                );
            }
            None => {
                return (
                    None,
                    Some(format!("instance {id} is unknown to the controller")),
                );
            }
        }
    }
    let values: &[u64] = match &r.reading {
        Reading::Counter { generation, total } => &[*generation, *total],
        Reading::Gauge { last, peak, mean } => &[*last, *peak, *mean],
    };
    if values.iter().any(|v| i64::try_from(*v).is_err()) {
        return (None, Some("a value exceeds 2^63".into()));
    }
    (account, None)
}

fn row_base(key: Key, subject: String, account: Option<String>, r: &UsageRecord) -> NewRow {
    NewRow {
        epoch: key.0,
        seq: key.1,
        subject,
        account,
        meter: r.meter.clone(),
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        kind: "counter",
        generation: None,
        total: None,
        delta: 0,
        last: None,
        peak: None,
        mean: None,
        samples: r.samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "agent-a";

    fn counter(seq: u64, subject: Subject, generation: u64, total: u64) -> UsageRecord {
        UsageRecord {
            epoch: 1,
            seq,
            subject,
            meter: "cpu_us".into(),
            start_ms: 1_000 * seq as i64,
            end_ms: 1_000 * (seq as i64 + 1),
            reading: Reading::Counter { generation, total },
            samples: 1,
        }
    }

    fn owned(instance: &str, agent: &str) -> Stored {
        let mut s = Stored::default();
        s.owners.insert(
            instance.into(),
            Owner {
                agent_id: agent.into(),
                account: "alice".into(),
            },
        );
        s
    }

    /// `check(stored, records, expected (stored deltas, duplicates, refusals))`
    fn check(
        stored: &Stored,
        records: &[UsageRecord],
        deltas: &[i64],
        dups: u32,
        refused: &[&str],
    ) {
        let plan = plan_batch(AGENT, records, stored, 1_000_000);
        let got: Vec<i64> = plan.rows.iter().map(|r| r.delta).collect();
        assert_eq!(got, deltas, "deltas");
        assert_eq!(plan.duplicates, dups, "duplicates");
        let reasons: Vec<&str> = plan.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(reasons.len(), refused.len(), "refusals: {reasons:?}");
        for (got, want) in reasons.iter().zip(refused) {
            assert!(got.contains(want), "{got:?} should say {want:?}");
        }
    }

    #[test]
    fn counters_add_what_they_moved_since_their_cursor() {
        let mut s = Stored::default();
        s.cursors.insert(("host".into(), "cpu_us".into()), (0, 100));
        check(
            &s,
            &[
                counter(1, Subject::Host, 0, 150),
                counter(2, Subject::Host, 0, 175),
            ],
            &[50, 25],
            0,
            &[],
        );
    }

    #[test]
    fn a_new_generation_is_a_reset_and_counts_from_zero() {
        let mut s = Stored::default();
        s.cursors
            .insert(("host".into(), "cpu_us".into()), (0, 1_000));
        check(&s, &[counter(1, Subject::Host, 1, 40)], &[40], 0, &[]);
    }

    #[test]
    fn a_stored_key_or_a_repeat_in_the_batch_is_a_duplicate() {
        let mut s = Stored::default();
        s.keys.insert((1, 1));
        check(
            &s,
            &[
                counter(1, Subject::Host, 0, 10),
                counter(2, Subject::Host, 0, 30),
                counter(2, Subject::Host, 0, 30),
            ],
            &[30],
            2,
            &[],
        );
    }

    #[test]
    fn an_instance_must_be_known_and_hosted_by_the_agent_that_reports_it() {
        let i = Subject::Instance("i-0000000000000001".into());
        check(
            &Stored::default(),
            &[counter(1, i.clone(), 0, 5)],
            &[],
            0,
            &["unknown"],
        );
        check(
            &owned("i-0000000000000001", "agent-b"),
            &[counter(1, i.clone(), 0, 5)],
            &[],
            0,
            &["not hosted"],
        );
        let plan = plan_batch(
            AGENT,
            &[counter(1, i, 0, 5)],
            &owned("i-0000000000000001", AGENT),
            1_000_000,
        );
        assert_eq!(plan.rows[0].account.as_deref(), Some("alice"));
    }

    #[test]
    fn values_past_i64_are_refused_not_wrapped() {
        check(
            &Stored::default(),
            &[counter(1, Subject::Host, 0, u64::MAX)],
            &[],
            0,
            &["2^63"],
        );
    }

    #[test]
    fn a_refused_record_moves_no_cursor() {
        let records = [
            counter(1, Subject::Instance("i-00000000000000ff".into()), 0, 500),
            counter(2, Subject::Host, 0, 7),
        ];
        let plan = plan_batch(AGENT, &records, &Stored::default(), 1_000_000);
        assert_eq!(plan.cursors.len(), 1);
        assert_eq!(plan.cursors[&("host".into(), "cpu_us".into())], (0, 7));
    }
}
