//! Rating and billing, as plain functions: a price plan and an instance's usage in a
//! period give charges; charges give one balanced posting per instance and period
//! (client debited, provider credited, commission to the marketplace).
//!
//! Rates are integer minor units per unit (cents per instance-hour, per vCPU-hour, per
//! GB-hour of memory, per GB transferred). Each charge is computed exactly with 128-bit
//! integers and rounded once, half up, to the minor unit; partial hours count in
//! proportion (down to the millisecond). GB are 10^9 bytes.

use serde::{Deserialize, Serialize};

use surplus_protocol::clock::UnixMillis;

use crate::ledger::{self, Entry, Posting};

/// A billing period recorded by a run, with when its usage was last rated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BilledPeriod {
    /// Start.
    pub from_ms: i64,
    /// End (exclusive).
    pub to_ms: i64,
    /// When its usage was last rated; records received after it are late.
    pub checked_at_ms: i64,
}

/// The agent label naming the provider account a host's earnings go to (set from the
/// join token; a provider's own tokens always carry their account).
pub const PROVIDER_LABEL: &str = "provider";
/// The provider account of hosts without a `provider` label: the operator's own.
pub const HOUSE_PROVIDER: &str = "house";

/// The provider account a host sells for: its agent's `provider` label, or the
/// marketplace's own [`HOUSE_PROVIDER`] for a host without one.
pub fn provider_of(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .get(PROVIDER_LABEL)
        .cloned()
        .unwrap_or_else(|| HOUSE_PROVIDER.to_owned())
}

const MS_PER_HOUR: u128 = 3_600_000;
const BYTES_PER_GB: u128 = 1_000_000_000;

/// A rate card attached to an instance when it is run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PricePlan {
    /// Currency of every rate.
    pub currency: String,
    /// Per hour the instance runs.
    #[serde(default)]
    pub per_instance_hour: i64,
    /// Per vCPU-hour: the instance's CPU limit times the hours it ran, or, without a
    /// limit, the CPU time it used.
    #[serde(default)]
    pub per_vcpu_hour: i64,
    /// Per GB-hour of memory actually used (measured, integrated over time).
    #[serde(default)]
    pub per_gb_hour: i64,
    /// Per GB of network traffic, in and out.
    #[serde(default)]
    pub per_gb_network: i64,
    /// Per GB read from or written to disk.
    #[serde(default)]
    pub per_gb_disk_io: i64,
    /// Once, in the period the instance was run.
    #[serde(default)]
    pub upfront: i64,
}

impl PricePlan {
    /// Names the first bad field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        ledger::validate_currency(&self.currency).map_err(|e| ("currency".to_owned(), e))?;
        for (field, v) in [
            ("per_instance_hour", self.per_instance_hour),
            ("per_vcpu_hour", self.per_vcpu_hour),
            ("per_gb_hour", self.per_gb_hour),
            ("per_gb_network", self.per_gb_network),
            ("per_gb_disk_io", self.per_gb_disk_io),
            ("upfront", self.upfront),
        ] {
            if !(0..=1_000_000_000_000).contains(&v) {
                return Err((
                    field.to_owned(),
                    format!("{v}: rates are 0 to 10^12 minor units"),
                ));
            }
        }
        Ok(())
    }
}

/// An instance's usage in one period, from the metering deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeriodUsage {
    /// Milliseconds running.
    pub running_ms: u64,
    /// Running time weighted by the CPU limit in force at the time, in thousandths of
    /// a vCPU times ms, over the parts of the period with a CPU limit (see
    /// [`cpu_usage`]).
    pub limited_vcpu_mms: u128,
    /// CPU time used in the parts of the period without a CPU limit, ns.
    pub cpu_ns: u64,
    /// Memory integrated over time, byte-ms.
    pub memory_byte_ms: u64,
    /// Network bytes in and out.
    pub net_bytes: u64,
    /// Disk bytes read and written.
    pub disk_bytes: u64,
}

/// One usage record's delta and the period it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Start, ms.
    pub start_ms: i64,
    /// End, ms.
    pub end_ms: i64,
    /// What it adds to its counter.
    pub delta: u64,
}

/// The CPU limit in force at `t`, from changes `(from_ms, millicpus)` sorted by time
/// (the first one also holds before it: an instance has no earlier limits).
fn limit_at(history: &[(i64, Option<u32>)], t: i64) -> Option<u32> {
    history
        .iter()
        .rev()
        .find(|(from, _)| *from <= t)
        .or(history.first())
        .and_then(|(_, m)| *m)
}

/// Splits `[start, end)` at the limit changes inside it: `(length, limit)` per part.
fn parts(history: &[(i64, Option<u32>)], start: i64, end: i64) -> Vec<(u128, Option<u32>)> {
    let mut cuts: Vec<i64> = history
        .iter()
        .map(|(from, _)| *from)
        .filter(|t| *t > start && *t < end)
        .collect();
    cuts.dedup();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut at = start;
    for cut in cuts.into_iter().chain(std::iter::once(end)) {
        out.push(((cut - at) as u128, limit_at(history, at)));
        at = cut;
    }
    out
}

/// The CPU side of an instance's usage, rated by the limits in force during each part
/// of its period: `running` (ms running per record) weighted by the CPU limit at the
/// time (thousandths of a vCPU times ms), and `cpu` (ns used per record) counted only
/// where no limit was in force. A record's delta is spread evenly over its period; one
/// of zero length counts at its start. Pure.
pub fn cpu_usage(running: &[Span], cpu: &[Span], history: &[(i64, Option<u32>)]) -> (u128, u64) {
    let mut limited = 0u128;
    for s in running {
        if s.end_ms <= s.start_ms {
            limited += u128::from(s.delta) * u128::from(limit_at(history, s.start_ms).unwrap_or(0));
            continue;
        }
        let len = (s.end_ms - s.start_ms) as u128;
        let weighted: u128 = parts(history, s.start_ms, s.end_ms)
            .into_iter()
            .map(|(part, m)| part * u128::from(m.unwrap_or(0)))
            .sum();
        limited += u128::from(s.delta) * weighted / len;
    }
    let mut unlimited = 0u128;
    for s in cpu {
        if s.end_ms <= s.start_ms {
            if limit_at(history, s.start_ms).is_none() {
                unlimited += u128::from(s.delta);
            }
            continue;
        }
        let len = (s.end_ms - s.start_ms) as u128;
        let free: u128 = parts(history, s.start_ms, s.end_ms)
            .into_iter()
            .filter(|(_, m)| m.is_none())
            .map(|(part, _)| part)
            .sum();
        unlimited += u128::from(s.delta) * free / len;
    }
    (limited, u64::try_from(unlimited).unwrap_or(u64::MAX))
}

/// One line of a bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Charge {
    /// `instance_hours`, `vcpu_hours`, `memory_gb_hours`, `network_gb`, `disk_io_gb`,
    /// `upfront`.
    pub meter: String,
    /// Quantity in `unit`, for people (the amount is computed from exact integers).
    pub quantity: f64,
    /// The unit.
    pub unit: String,
    /// The rate per unit.
    pub rate: i64,
    /// Minor units.
    pub amount: i64,
}

/// `rate * numerator / denominator`, rounded half up.
pub(crate) fn prorate(rate: i64, numerator: u128, denominator: u128) -> i64 {
    let rate = u128::try_from(rate.max(0)).unwrap_or(0);
    let exact = rate * numerator;
    let amount = (exact + denominator / 2) / denominator;
    i64::try_from(amount).unwrap_or(i64::MAX)
}

/// The charges of one instance for one period. Zero lines are left out.
pub fn rate(plan: &PricePlan, usage: &PeriodUsage, upfront_due: bool) -> Vec<Charge> {
    let mut out = Vec::new();
    let mut line = |meter: &str, unit: &str, rate: i64, quantity: f64, amount: i64| {
        if amount > 0 {
            out.push(Charge {
                meter: meter.into(),
                quantity,
                unit: unit.into(),
                rate,
                amount,
            });
        }
    };
    if upfront_due {
        line("upfront", "fee", plan.upfront, 1.0, plan.upfront);
    }
    let running = u128::from(usage.running_ms);
    line(
        "instance_hours",
        "instance-hour",
        plan.per_instance_hour,
        usage.running_ms as f64 / 3.6e6,
        prorate(plan.per_instance_hour, running, MS_PER_HOUR),
    );
    // The CPU limit times the time running where a limit was in force, the CPU used
    // where none was.
    line(
        "vcpu_hours",
        "vCPU-hour",
        plan.per_vcpu_hour,
        usage.limited_vcpu_mms as f64 / 1000.0 / 3.6e6,
        prorate(
            plan.per_vcpu_hour,
            usage.limited_vcpu_mms,
            1000 * MS_PER_HOUR,
        ),
    );
    line(
        "vcpu_hours_used",
        "vCPU-hour (used)",
        plan.per_vcpu_hour,
        usage.cpu_ns as f64 / 3.6e12,
        prorate(
            plan.per_vcpu_hour,
            u128::from(usage.cpu_ns),
            MS_PER_HOUR * 1_000_000,
        ),
    );
    line(
        "memory_gb_hours",
        "GB-hour",
        plan.per_gb_hour,
        usage.memory_byte_ms as f64 / 1e9 / 3.6e6,
        prorate(
            plan.per_gb_hour,
            u128::from(usage.memory_byte_ms),
            BYTES_PER_GB * MS_PER_HOUR,
        ),
    );
    line(
        "network_gb",
        "GB",
        plan.per_gb_network,
        usage.net_bytes as f64 / 1e9,
        prorate(
            plan.per_gb_network,
            u128::from(usage.net_bytes),
            BYTES_PER_GB,
        ),
    );
    line(
        "disk_io_gb",
        "GB",
        plan.per_gb_disk_io,
        usage.disk_bytes as f64 / 1e9,
        prorate(
            plan.per_gb_disk_io,
            u128::from(usage.disk_bytes),
            BYTES_PER_GB,
        ),
    );
    out
}

/// Running time of one instance in a period is at most the period: a host that reports
/// more (a hostile agent's counters) is cut to it, and the limit-weighted time with it
/// in proportion. Pure.
pub fn cap_running(running_ms: u64, limited_vcpu_mms: u128, period_ms: i64) -> (u64, u128) {
    let period = u64::try_from(period_ms.max(0)).unwrap_or(0);
    if running_ms <= period {
        return (running_ms, limited_vcpu_mms);
    }
    (
        period,
        limited_vcpu_mms * u128::from(period) / u128::from(running_ms),
    )
}

/// What changed between the charges of a period rated now and what was billed for it
/// (per meter): one line per meter whose amount differs, with the difference. Pure.
pub fn differences(
    now: &[Charge],
    billed: &std::collections::BTreeMap<String, (i64, f64)>,
) -> Vec<Charge> {
    let mut out = Vec::new();
    for c in now {
        let (amount, quantity) = billed.get(&c.meter).copied().unwrap_or((0, 0.0));
        if c.amount != amount {
            out.push(Charge {
                amount: c.amount - amount,
                quantity: c.quantity - quantity,
                ..c.clone()
            });
        }
    }
    for (meter, (amount, quantity)) in billed {
        if *amount != 0 && !now.iter().any(|c| &c.meter == meter) {
            out.push(Charge {
                meter: meter.clone(),
                quantity: -quantity,
                unit: String::new(),
                rate: 0,
                amount: -amount,
            });
        }
    }
    out
}

/// Which (instance, period) pairs have late usage: a record `(subject, end_ms,
/// received_at_ms)` counts in the billed period whose `(from, to]` holds its end, and is
/// late when it was received after that period was last rated. Sorted, each pair once.
/// Pure.
pub fn late_periods(
    periods: &[BilledPeriod],
    received: &[(String, i64, i64)],
) -> Vec<(String, (i64, i64))> {
    let mut out: Vec<(String, (i64, i64))> = received
        .iter()
        .filter_map(|(subject, end, at)| {
            let p = periods
                .iter()
                .find(|p| p.from_ms < *end && *end <= p.to_ms && *at > p.checked_at_ms)?;
            Some((subject.clone(), (p.from_ms, p.to_ms)))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Commission on `amount` at `bps` basis points, rounded half up; a credit (negative
/// amount) gives the commission back the same way.
pub fn commission(amount: i64, bps: u32) -> i64 {
    if amount < 0 {
        -prorate(amount.saturating_neg(), u128::from(bps), 10_000)
    } else {
        prorate(amount, u128::from(bps), 10_000)
    }
}

/// The commission on a provider's sales in a period that starts at `at_ms`: that of
/// its agreement in force then (the newest, if several are), else `default_bps` (the
/// marketplace's own hosts and providers without an agreement). At most 100%.
pub fn commission_bps_at(
    agreements: &[crate::resell::Agreement],
    at_ms: UnixMillis,
    default_bps: u32,
) -> u32 {
    crate::resell::agreement_in_force(agreements, at_ms)
        .map_or(default_bps, |a| a.commission_bps)
        .min(10_000)
}

/// The posting of a charge of `amount`: the client pays it, the marketplace keeps its
/// commission, the provider gets the rest.
pub fn bill_posting(
    key: &str,
    client: &str,
    provider: &str,
    currency: &str,
    amount: i64,
    commission_bps: u32,
) -> Posting {
    let fee = commission(amount, commission_bps);
    let mut entries = vec![
        Entry {
            account: ledger::client(client),
            currency: currency.into(),
            amount: -amount,
        },
        Entry {
            account: ledger::provider(provider),
            currency: currency.into(),
            amount: amount - fee,
        },
    ];
    if fee != 0 {
        entries.push(Entry {
            account: ledger::MARKETPLACE.into(),
            currency: currency.into(),
            amount: fee,
        });
    }
    Posting {
        key: key.to_owned(),
        kind: "usage".into(),
        memo: format!("usage of {client} on {provider}"),
        entries,
    }
}

/// A billing period: `[from_ms, to_ms)`, whole hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Period {
    /// Start.
    pub from_ms: i64,
    /// End (exclusive).
    pub to_ms: i64,
}

/// The longest period one billing run covers: 31 days.
pub const MAX_PERIOD_MS: i64 = 31 * 86_400_000;

impl Period {
    /// Checks the period covers closed, whole hours in the past at `now_ms`: on whole
    /// hours (usage is aggregated by hour), not before 1970, ended by now, at most
    /// [`MAX_PERIOD_MS`] long.
    pub fn validate(&self, now_ms: i64) -> Result<(), String> {
        if self.to_ms <= self.from_ms {
            return Err(format!(
                "to_ms ({}) must be after from_ms ({})",
                self.to_ms, self.from_ms
            ));
        }
        if self.from_ms % 3_600_000 != 0 || self.to_ms % 3_600_000 != 0 {
            return Err("from_ms and to_ms must be on whole hours (UTC)".into());
        }
        if self.from_ms < 0 {
            return Err(format!("from_ms ({}) is before 1970", self.from_ms));
        }
        if self.to_ms - self.from_ms > MAX_PERIOD_MS {
            return Err(format!(
                "{} hours is longer than a billing run covers (at most {} hours)",
                (self.to_ms - self.from_ms) / 3_600_000,
                MAX_PERIOD_MS / 3_600_000
            ));
        }
        if self.to_ms > now_ms {
            return Err(format!(
                "the period ends at {}, after now ({now_ms}): only closed hours are billed",
                self.to_ms
            ));
        }
        Ok(())
    }

    /// The posting key of one instance's charges in this period.
    pub fn key(&self, instance_id: &str) -> String {
        format!("usage:{instance_id}:{}:{}", self.from_ms, self.to_ms)
    }

    /// The invoice id of a client for this period.
    pub fn invoice_id(&self, client: &str) -> String {
        let digest =
            ledger::sha256_hex(format!("{client}|{}|{}", self.from_ms, self.to_ms).as_bytes());
        format!("inv-{}", &digest[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: (rule it pins, agreements as (created, from, until, bps), the time,
    /// the commission).
    #[test]
    fn the_commission_is_the_agreement_in_force_else_the_default() {
        let agreement = |n: i64, from, until, bps| crate::resell::Agreement {
            id: format!("agr-{n}"),
            provider: "bob".into(),
            valid_from_ms: from,
            valid_until_ms: until,
            resource_kinds: Default::default(),
            pricing_modes: Default::default(),
            commission_bps: bps,
            max_hosts: 1,
            max_cpus: None,
            created_at_ms: n,
        };
        let cases = [
            ("no agreement: the default", vec![], 50, 1000),
            (
                "the agreement in force",
                vec![agreement(1, 0, 100, 1500)],
                50,
                1500,
            ),
            (
                "an ended agreement: the default",
                vec![agreement(1, 0, 100, 1500)],
                100,
                1000,
            ),
            (
                "not yet in force: the default",
                vec![agreement(1, 60, 100, 1500)],
                50,
                1000,
            ),
            (
                "of two in force, the newer",
                vec![agreement(1, 0, 100, 1500), agreement(2, 0, 100, 700)],
                50,
                700,
            ),
            (
                "never above 100%",
                vec![agreement(1, 0, 100, 20_000)],
                50,
                10_000,
            ),
        ];
        for (rule, agreements, at, want) in cases {
            assert_eq!(commission_bps_at(&agreements, at, 1000), want, "{rule}");
        }
    }

    fn plan() -> PricePlan {
        PricePlan {
            currency: "EUR".into(),
            per_instance_hour: 0,
            per_vcpu_hour: 0,
            per_gb_hour: 0,
            per_gb_network: 0,
            per_gb_disk_io: 0,
            upfront: 0,
        }
    }

    fn amount_of(charges: &[Charge], meter: &str) -> i64 {
        charges
            .iter()
            .find(|c| c.meter == meter)
            .map_or(0, |c| c.amount)
    }

    /// One row per price-plan component, partial hours included.
    #[test]
    fn each_component_rates_as_specified() {
        struct Case {
            name: &'static str,
            plan: PricePlan,
            usage: PeriodUsage,
            upfront: bool,
            meter: &'static str,
            amount: i64,
        }
        let hour = 3_600_000;
        let cases = [
            Case {
                name: "one instance-hour",
                plan: PricePlan {
                    per_instance_hour: 120,
                    ..plan()
                },
                usage: PeriodUsage {
                    running_ms: hour,
                    ..Default::default()
                },
                upfront: false,
                meter: "instance_hours",
                amount: 120,
            },
            Case {
                name: "a quarter hour",
                plan: PricePlan {
                    per_instance_hour: 120,
                    ..plan()
                },
                usage: PeriodUsage {
                    running_ms: hour / 4,
                    ..Default::default()
                },
                upfront: false,
                meter: "instance_hours",
                amount: 30,
            },
            Case {
                name: "half a minor unit rounds up",
                plan: PricePlan {
                    per_instance_hour: 1,
                    ..plan()
                },
                usage: PeriodUsage {
                    running_ms: hour / 2,
                    ..Default::default()
                },
                upfront: false,
                meter: "instance_hours",
                amount: 1,
            },
            Case {
                name: "just under half rounds down",
                plan: PricePlan {
                    per_instance_hour: 1,
                    ..plan()
                },
                usage: PeriodUsage {
                    running_ms: hour / 2 - 1,
                    ..Default::default()
                },
                upfront: false,
                meter: "instance_hours",
                amount: 0,
            },
            Case {
                name: "vCPU-hours from the limit: 1.5 vCPU for 2 h",
                plan: PricePlan {
                    per_vcpu_hour: 100,
                    ..plan()
                },
                usage: PeriodUsage {
                    running_ms: 2 * hour,
                    limited_vcpu_mms: u128::from(2 * hour) * 1500,
                    ..Default::default()
                },
                upfront: false,
                meter: "vcpu_hours",
                amount: 300,
            },
            Case {
                name: "vCPU-hours used without a limit: 30 CPU-minutes",
                plan: PricePlan {
                    per_vcpu_hour: 100,
                    ..plan()
                },
                usage: PeriodUsage {
                    cpu_ns: 1_800_000_000_000,
                    ..Default::default()
                },
                upfront: false,
                meter: "vcpu_hours_used",
                amount: 50,
            },
            Case {
                name: "2 GB for 3 h",
                plan: PricePlan {
                    per_gb_hour: 10,
                    ..plan()
                },
                usage: PeriodUsage {
                    memory_byte_ms: 2_000_000_000 * 3 * hour,
                    ..Default::default()
                },
                upfront: false,
                meter: "memory_gb_hours",
                amount: 60,
            },
            Case {
                name: "network 2.5 GB",
                plan: PricePlan {
                    per_gb_network: 8,
                    ..plan()
                },
                usage: PeriodUsage {
                    net_bytes: 2_500_000_000,
                    ..Default::default()
                },
                upfront: false,
                meter: "network_gb",
                amount: 20,
            },
            Case {
                name: "disk 0.1 GB",
                plan: PricePlan {
                    per_gb_disk_io: 5,
                    ..plan()
                },
                usage: PeriodUsage {
                    disk_bytes: 100_000_000,
                    ..Default::default()
                },
                upfront: false,
                meter: "disk_io_gb",
                amount: 1,
            },
            Case {
                name: "upfront fee once",
                plan: PricePlan {
                    upfront: 999,
                    ..plan()
                },
                usage: PeriodUsage::default(),
                upfront: true,
                meter: "upfront",
                amount: 999,
            },
            Case {
                name: "upfront fee not due",
                plan: PricePlan {
                    upfront: 999,
                    ..plan()
                },
                usage: PeriodUsage::default(),
                upfront: false,
                meter: "upfront",
                amount: 0,
            },
        ];
        for c in cases {
            let charges = rate(&c.plan, &c.usage, c.upfront);
            assert_eq!(amount_of(&charges, c.meter), c.amount, "{}", c.name);
            assert!(
                charges.iter().all(|ch| ch.amount > 0),
                "{}: no zero lines",
                c.name
            );
        }
    }

    /// A counter reset inside a period (the instance restarted) is already resolved in
    /// the deltas: rating the sum of two runs equals rating their total.
    #[test]
    fn usage_across_a_counter_reset_rates_as_its_sum() {
        use surplus_protocol::usage::counter_delta;
        let p = PricePlan {
            per_vcpu_hour: 3600,
            ..plan()
        };
        // Readings: 1 s, 3 s, then the instance restarts (new generation) and reads 2 s.
        let readings = [
            (1, 1_000_000_000u64),
            (1, 3_000_000_000),
            (2, 2_000_000_000),
        ];
        let mut prev = None;
        let mut cpu_ns = 0;
        for (g, t) in readings {
            cpu_ns += counter_delta(prev, g, t);
            prev = Some((g, t));
        }
        assert_eq!(cpu_ns, 5_000_000_000);
        let charges = rate(
            &p,
            &PeriodUsage {
                cpu_ns,
                ..Default::default()
            },
            false,
        );
        // 5 CPU-seconds at 3600 per hour = 5.
        assert_eq!(amount_of(&charges, "vcpu_hours_used"), 5);
    }

    #[test]
    fn commission_splits_without_losing_a_cent() {
        for amount in [0, 1, 99, 12_345, 1_000_000_007, -1, -12_345] {
            for bps in [0, 1, 999, 1000, 10_000] {
                let p = bill_posting("k", "alice", "bob", "EUR", amount, bps);
                assert_eq!(p.entries.iter().map(|e| e.amount).sum::<i64>(), 0);
            }
        }
        assert_eq!(commission(1000, 1000), 100);
        assert_eq!(commission(5, 1000), 1, "0.5 rounds up");
        assert_eq!(
            commission(-1000, 1000),
            -100,
            "a credit returns the commission"
        );
    }

    #[test]
    fn periods_are_closed_whole_hours_in_the_past() {
        const H: i64 = 3_600_000;
        let now = 1_000 * H + 1_234;
        let check = |from_ms, to_ms| Period { from_ms, to_ms }.validate(now);
        assert!(check(998 * H, 1_000 * H).is_ok(), "closed and past");
        for (from, to, why) in [
            (0, 1, "not whole hours"),
            (H, 0, "backwards"),
            (1_000 * H, 1_001 * H, "the current hour has not ended"),
            (1_001 * H, 1_002 * H, "the future"),
            (
                -9_223_372_036_800_000_000,
                9_223_372_036_800_000_000,
                "any period",
            ),
            (-H, 0, "before 1970"),
            (0, 1_000 * H, "longer than a month"),
        ] {
            assert!(check(from, to).is_err(), "{why}");
        }
    }

    #[test]
    fn no_instance_runs_longer_than_the_period() {
        const H: i64 = 3_600_000;
        assert_eq!(cap_running(1_000, 500_000, H), (1_000, 500_000));
        // An agent that claims ten hours in one hour at 1 vCPU: one hour at 1 vCPU.
        assert_eq!(
            cap_running(10 * H as u64, 10 * H as u128 * 1000, H),
            (H as u64, H as u128 * 1000)
        );
    }

    #[test]
    fn late_usage_belongs_to_the_period_its_record_ends_in() {
        const H: i64 = 3_600_000;
        let periods = [
            BilledPeriod {
                from_ms: 0,
                to_ms: H,
                checked_at_ms: H + 100,
            },
            BilledPeriod {
                from_ms: H,
                to_ms: 2 * H,
                checked_at_ms: 2 * H + 100,
            },
        ];
        let received = [
            ("i-a".to_owned(), H, H + 200),         // late for the first hour
            ("i-a".to_owned(), H - 5, H + 300),     // the same pair again
            ("i-b".to_owned(), H, H + 50),          // before the first hour was rated
            ("i-b".to_owned(), 2 * H, 2 * H + 200), // late for the second
            ("i-c".to_owned(), 3 * H, 3 * H),       // in no billed period
        ];
        assert_eq!(
            late_periods(&periods, &received),
            vec![("i-a".to_owned(), (0, H)), ("i-b".to_owned(), (H, 2 * H)),]
        );
    }

    fn spans(list: &[(i64, i64, u64)]) -> Vec<Span> {
        list.iter()
            .map(|&(start_ms, end_ms, delta)| Span {
                start_ms,
                end_ms,
                delta,
            })
            .collect()
    }

    /// A limit changed at 30 min inside one hour-long record: each half is rated with
    /// its own limit; the CPU used counts only in the half without a limit.
    #[test]
    fn each_part_of_a_period_is_rated_with_its_own_limits() {
        const H: i64 = 3_600_000;
        let running = spans(&[(0, H, H as u64)]);
        let cpu = spans(&[(0, H, 1_000_000)]);
        // 2 vCPU, then 0.5 from 30 min on.
        let history = [(0, Some(2000)), (H / 2, Some(500))];
        let (limited, used) = cpu_usage(&running, &cpu, &history);
        assert_eq!(limited, (H / 2) as u128 * 2000 + (H / 2) as u128 * 500);
        assert_eq!(used, 0);
        // No limit, then 1 vCPU.
        let history = [(0, None), (H / 2, Some(1000))];
        let (limited, used) = cpu_usage(&running, &cpu, &history);
        assert_eq!(limited, (H / 2) as u128 * 1000);
        assert_eq!(
            used, 500_000,
            "half the CPU used falls in the unlimited half"
        );
    }

    proptest::proptest! {
        /// With one limit throughout, rating by parts is the limit times the time
        /// running; without one, it is the CPU used; splitting the history where the
        /// limit does not change changes nothing; a higher limit never rates lower.
        #[test]
        fn rating_by_parts_agrees_with_the_simple_cases(
            records in proptest::collection::vec((0i64..10_000, 1i64..5_000, 0u64..5_000, 0u64..1_000_000), 1..20),
            limit in 10u32..5000,
            cut in 0i64..20_000,
            bump in 1u32..1000,
        ) {
            let running: Vec<Span> = records.iter().map(|&(s, len, d, _)| Span { start_ms: s, end_ms: s + len, delta: d.min(len as u64) }).collect();
            let cpu: Vec<Span> = records.iter().map(|&(s, len, _, c)| Span { start_ms: s, end_ms: s + len, delta: c }).collect();
            let total_running: u128 = running.iter().map(|s| u128::from(s.delta)).sum();
            let total_cpu: u64 = cpu.iter().map(|s| s.delta).sum();
            let (limited, used) = cpu_usage(&running, &cpu, &[(0, Some(limit))]);
            proptest::prop_assert_eq!(limited, total_running * u128::from(limit));
            proptest::prop_assert_eq!(used, 0);
            let (limited, used) = cpu_usage(&running, &cpu, &[(0, None)]);
            proptest::prop_assert_eq!(limited, 0);
            proptest::prop_assert_eq!(used, total_cpu);
            // The same limit split in two parts, up to one rounding per record.
            let (split, _) = cpu_usage(&running, &cpu, &[(0, Some(limit)), (cut, Some(limit))]);
            let whole = total_running * u128::from(limit);
            proptest::prop_assert!(split <= whole && whole - split <= running.len() as u128);
            let (higher, _) = cpu_usage(&running, &cpu, &[(0, Some(limit)), (cut, Some(limit + bump))]);
            proptest::prop_assert!(higher >= split);
        }
    }
}
