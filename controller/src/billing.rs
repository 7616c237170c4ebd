//! Rating and billing, as plain functions: a price plan and an instance's usage in a
//! period give charges; charges give one balanced posting per instance and period
//! (client debited, provider credited, commission to the marketplace).
//!
//! Rates are integer minor units per unit (cents per instance-hour, per vCPU-hour, per
//! GB-hour of memory, per GB transferred). Each charge is computed exactly with 128-bit
//! integers and rounded once, half up, to the minor unit; partial hours count in
//! proportion (down to the millisecond). GB are 10^9 bytes.

use serde::{Deserialize, Serialize};

use crate::ledger::{self, Entry, Posting};

/// The agent label naming the provider account a host's earnings go to (set from the
/// join token; a provider's own tokens always carry their account).
pub const PROVIDER_LABEL: &str = "provider";
/// The provider account of hosts without a `provider` label: the operator's own.
pub const HOUSE_PROVIDER: &str = "house";

const MS_PER_HOUR: u128 = 3_600_000;
const BYTES_PER_GB: u128 = 1_000_000_000;

/// A rate card attached to an instance when it is run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct PeriodUsage {
    /// Milliseconds running.
    pub running_ms: u64,
    /// CPU time, ns.
    pub cpu_ns: u64,
    /// Memory integrated over time, byte-ms.
    pub memory_byte_ms: u64,
    /// Network bytes in and out.
    pub net_bytes: u64,
    /// Disk bytes read and written.
    pub disk_bytes: u64,
    /// The instance's CPU limit, millicpus.
    pub millicpus: Option<u32>,
}

/// One line of a bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
fn prorate(rate: i64, numerator: u128, denominator: u128) -> i64 {
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
    match usage.millicpus {
        Some(m) => line(
            "vcpu_hours",
            "vCPU-hour",
            plan.per_vcpu_hour,
            usage.running_ms as f64 * f64::from(m) / 1000.0 / 3.6e6,
            prorate(
                plan.per_vcpu_hour,
                running * u128::from(m),
                1000 * MS_PER_HOUR,
            ),
        ),
        None => line(
            "vcpu_hours",
            "vCPU-hour (used)",
            plan.per_vcpu_hour,
            usage.cpu_ns as f64 / 3.6e12,
            prorate(
                plan.per_vcpu_hour,
                u128::from(usage.cpu_ns),
                MS_PER_HOUR * 1_000_000,
            ),
        ),
    }
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

/// Commission on `amount` at `bps` basis points, rounded half up.
pub fn commission(amount: i64, bps: u32) -> i64 {
    prorate(amount, u128::from(bps), 10_000)
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
pub struct Period {
    /// Start.
    pub from_ms: i64,
    /// End (exclusive).
    pub to_ms: i64,
}

impl Period {
    /// Checks the period is non-empty and on whole hours (usage is aggregated by hour).
    pub fn validate(&self) -> Result<(), String> {
        if self.to_ms <= self.from_ms {
            return Err(format!(
                "to ({}) must be after from ({})",
                self.to_ms, self.from_ms
            ));
        }
        if self.from_ms % 3_600_000 != 0 || self.to_ms % 3_600_000 != 0 {
            return Err("from and to must be on whole hours (UTC)".into());
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
            surplus_certs::sha256(format!("{client}|{}|{}", self.from_ms, self.to_ms).as_bytes());
        format!("inv-{}", &surplus_certs::hex(&digest)[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                    millicpus: Some(1500),
                    cpu_ns: 1,
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
                meter: "vcpu_hours",
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
        assert_eq!(amount_of(&charges, "vcpu_hours"), 5);
    }

    #[test]
    fn commission_splits_without_losing_a_cent() {
        for amount in [0, 1, 99, 12_345, 1_000_000_007] {
            for bps in [0, 1, 999, 1000, 10_000] {
                let p = bill_posting("k", "alice", "bob", "EUR", amount, bps);
                assert_eq!(p.entries.iter().map(|e| e.amount).sum::<i64>(), 0);
            }
        }
        assert_eq!(commission(1000, 1000), 100);
        assert_eq!(commission(5, 1000), 1, "0.5 rounds up");
    }

    #[test]
    fn periods_are_whole_hours() {
        assert!(
            Period {
                from_ms: 0,
                to_ms: 3_600_000
            }
            .validate()
            .is_ok()
        );
        assert!(
            Period {
                from_ms: 0,
                to_ms: 1
            }
            .validate()
            .is_err()
        );
        assert!(
            Period {
                from_ms: 3_600_000,
                to_ms: 0
            }
            .validate()
            .is_err()
        );
    }
}
