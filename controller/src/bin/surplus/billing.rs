//! `surplus usage|metering|price-plan|bill|invoices|statements`: what hosts measured,
//! how it is rated, and what clients owe and providers earned.

use anyhow::Context;
use clap::{Args, Subcommand};
use surplus_api::billing::{
    BillingRun, BillingRunRequest, InvoiceView, MeteringRequest, MeteringView, PricePlan,
    StatementView, UsageView,
};

use crate::client::{Client, print, table};

#[derive(Subcommand)]
pub enum Command {
    /// Usage history by hour or day.
    Usage(UsageArgs),
    /// Set an agent's sampling periods: `surplus metering <agent> --instance 30s`.
    Metering {
        /// Agent id.
        agent: String,
        /// Instance meters' period.
        #[arg(long)]
        instance: Option<String>,
        /// Host meters' period.
        #[arg(long)]
        host: Option<String>,
        /// Subscription meters' period.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Set the rate card of instances run on an agent from now on (a JSON price plan:
    /// `{"currency":"EUR","per_instance_hour":12}`).
    PricePlan {
        /// Agent id.
        agent: String,
        /// The plan, as JSON.
        plan: String,
    },
    /// Rate and post a period's usage (admin): `--from-ms`/`--to-ms` on whole hours.
    Bill {
        /// Period start, ms since the epoch.
        #[arg(long)]
        from_ms: i64,
        /// Period end (exclusive).
        #[arg(long)]
        to_ms: i64,
    },
    /// Invoices: one per client and period across providers.
    Invoices {
        #[command(subcommand)]
        command: InvoicesCommand,
    },
    /// A provider's statement: charges, commission, payouts, balance.
    Statements {
        /// Provider account (admins; providers get their own).
        #[arg(long)]
        provider: Option<String>,
    },
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Usage(args) => {
            let u: UsageView = client.get(&args.query()).await?;
            print(json, &u, || show_usage(&u));
        }
        Command::Metering {
            agent,
            instance,
            host,
            subscription,
        } => {
            let body = MeteringRequest {
                instance,
                host,
                subscription,
            };
            let v: MeteringView = client
                .put(&format!("/v1/agents/{agent}/metering"), &body)
                .await?;
            print(json, &v, || pretty(&v));
        }
        Command::PricePlan { agent, plan } => {
            let plan: PricePlan = serde_json::from_str(&plan)
                .context("the price plan is not a price plan in JSON")?;
            let v: PricePlan = client
                .put(&format!("/v1/agents/{agent}/price-plan"), &plan)
                .await?;
            print(json, &v, || pretty(&v));
        }
        Command::Bill { from_ms, to_ms } => {
            let v: BillingRun = client
                .post("/v1/billing/runs", &BillingRunRequest { from_ms, to_ms })
                .await?;
            print(json, &v, || pretty(&v));
        }
        Command::Invoices {
            command: InvoicesCommand::List { client: who },
        } => {
            let path = match who {
                Some(c) => format!("/v1/invoices?client={c}"),
                None => "/v1/invoices".into(),
            };
            let list: Vec<InvoiceView> = client.get(&path).await?;
            print(json, &list, || show_invoices(&list, false));
        }
        Command::Invoices {
            command: InvoicesCommand::Show { id },
        } => {
            let one: InvoiceView = client.get(&format!("/v1/invoices/{id}")).await?;
            print(json, &one, || {
                show_invoices(std::slice::from_ref(&one), true)
            });
        }
        Command::Statements { provider } => {
            let path = match provider {
                Some(p) => format!("/v1/statements?provider={p}"),
                None => "/v1/statements".into(),
            };
            let s: StatementView = client.get(&path).await?;
            print(json, &s, || show_statement(&s));
        }
    }
    Ok(())
}

fn pretty(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `surplus usage`.
#[derive(Args)]
pub struct UsageArgs {
    /// One instance.
    #[arg(long)]
    pub instance: Option<String>,
    /// One agent (host).
    #[arg(long)]
    pub agent: Option<String>,
    /// One account (admin).
    #[arg(long)]
    pub account: Option<String>,
    /// One meter (cpu_ns, memory_byte_ms, state_ms.running, ...).
    #[arg(long)]
    pub meter: Option<String>,
    /// Start, ms since the epoch (default: a day before `--to`).
    #[arg(long)]
    pub from: Option<i64>,
    /// End, ms since the epoch (default: now).
    #[arg(long)]
    pub to: Option<i64>,
    /// hour or day.
    #[arg(long, default_value = "hour")]
    pub granularity: String,
}

impl UsageArgs {
    /// The query string.
    pub fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("instance", self.instance.clone()),
            ("agent", self.agent.clone()),
            ("account", self.account.clone()),
            ("meter", self.meter.clone()),
            ("from", self.from.map(|v| v.to_string())),
            ("to", self.to.map(|v| v.to_string())),
            ("granularity", Some(self.granularity.clone())),
        ] {
            if let Some(v) = v {
                q.append_pair(k, &v);
            }
        }
        format!("/v1/usage?{}", q.finish())
    }
}

/// `surplus invoices`.
#[derive(Subcommand)]
pub enum InvoicesCommand {
    /// Invoices, one per client and period.
    List {
        /// One client (admin).
        #[arg(long)]
        client: Option<String>,
    },
    /// One invoice with its lines.
    Show {
        /// Invoice id.
        id: String,
    },
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// Prints a usage answer.
fn show_usage(u: &UsageView) {
    let mut t = table(&[
        "BUCKET (ms)",
        "SUBJECT",
        "METER",
        "TOTAL",
        "PEAK",
        "MEAN",
        "RECORDS",
    ]);
    for r in &u.rows {
        t.add_row([
            r.bucket_start_ms.to_string(),
            r.subject.clone(),
            r.meter.clone(),
            or_dash(r.total),
            or_dash(r.peak),
            or_dash(r.mean),
            r.records.to_string(),
        ]);
    }
    println!("{t}");
}

/// Prints invoices, with their lines when `lines`.
fn show_invoices(invoices: &[InvoiceView], lines: bool) {
    for inv in invoices {
        let totals: Vec<String> = inv.totals.iter().map(|(c, a)| format!("{a} {c}")).collect();
        println!(
            "{}  client {}  period {}..{}  total {}",
            inv.invoice_id,
            inv.client,
            inv.from_ms,
            inv.to_ms,
            totals.join(", ")
        );
        if lines {
            let mut t = table(&[
                "PROVIDER", "INSTANCE", "METER", "QUANTITY", "UNIT", "RATE", "AMOUNT",
            ]);
            for l in &inv.lines {
                t.add_row([
                    l.provider.clone(),
                    l.instance_id.clone(),
                    l.charge.meter.clone(),
                    format!("{:.4}", l.charge.quantity),
                    l.charge.unit.clone(),
                    l.charge.rate.to_string(),
                    format!("{} {}", l.charge.amount, l.currency),
                ]);
            }
            println!("{t}");
        }
    }
}

/// Prints a statement.
fn show_statement(s: &StatementView) {
    let mut t = table(&[
        "CURRENCY",
        "GROSS",
        "COMMISSION",
        "NET",
        "PAID OUT",
        "BALANCE",
    ]);
    for (c, gross) in &s.gross {
        let of = |m: &std::collections::BTreeMap<String, i64>| or_dash(m.get(c));
        t.add_row([
            c.clone(),
            gross.to_string(),
            of(&s.commission),
            of(&s.net),
            of(&s.payouts),
            of(&s.balance),
        ]);
    }
    println!("provider {}", s.provider);
    println!("{t}");
}
