//! `surplus usage`, `invoices`, `statements`, `ledger`, `billing`, `payments`,
//! `payouts`, `metering` and `price-plan`: thin over the API, tables or `--json`.

use clap::{Args, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::{Value, json};

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

/// `surplus ledger`.
#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Balances (of your account, or `--account` for admins).
    Balance {
        /// `client:<name>`, `provider:<name>`, `marketplace` or `external`.
        #[arg(long)]
        account: Option<String>,
    },
    /// Whether an account may go below zero (admin): `--prepaid` forbids it.
    Policy {
        /// Account.
        account: String,
        /// Forbid a negative balance (prepaid credit).
        #[arg(long)]
        prepaid: bool,
    },
}

/// Money in or out (admin).
#[derive(Args)]
pub struct MoneyArgs {
    /// Client (payments) or provider (payouts) account name.
    #[arg(long)]
    pub account: String,
    /// Currency code.
    #[arg(long)]
    pub currency: String,
    /// Minor units.
    #[arg(long)]
    pub amount: i64,
    /// Payments: topup, upfront or settlement.
    #[arg(long)]
    pub kind: Option<String>,
    /// Idempotency key: sending the same request again posts nothing twice.
    #[arg(long)]
    pub key: String,
}

impl MoneyArgs {
    /// The request body.
    pub fn body(&self) -> Value {
        let mut b = json!({"account": self.account, "currency": self.currency, "amount": self.amount, "key": self.key});
        if let Some(k) = &self.kind {
            b["kind"] = k.clone().into();
        }
        b
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header);
    t
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints a usage answer.
pub fn show_usage(u: &Value) {
    let mut t = table(&[
        "BUCKET (ms)",
        "SUBJECT",
        "METER",
        "TOTAL",
        "PEAK",
        "MEAN",
        "RECORDS",
    ]);
    for r in u["rows"].as_array().into_iter().flatten() {
        t.add_row([
            text(&r["bucket_start_ms"]),
            text(&r["subject"]),
            text(&r["meter"]),
            text(&r["total"]),
            text(&r["peak"]),
            text(&r["mean"]),
            text(&r["records"]),
        ]);
    }
    println!("{t}");
}

/// Prints invoices (list) or one invoice with lines.
pub fn show_invoices(invoices: &[Value], lines: bool) {
    for inv in invoices {
        let totals: Vec<String> = inv["totals"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(c, a)| format!("{} {c}", text(a)))
            .collect();
        println!(
            "{}  client {}  period {}..{}  total {}",
            text(&inv["invoice_id"]),
            text(&inv["client"]),
            text(&inv["from_ms"]),
            text(&inv["to_ms"]),
            totals.join(", ")
        );
        if lines {
            let mut t = table(&[
                "PROVIDER", "INSTANCE", "METER", "QUANTITY", "UNIT", "RATE", "AMOUNT",
            ]);
            for l in inv["lines"].as_array().into_iter().flatten() {
                t.add_row([
                    text(&l["provider"]),
                    text(&l["instance_id"]),
                    text(&l["meter"]),
                    l["quantity"]
                        .as_f64()
                        .map_or("-".into(), |q| format!("{q:.4}")),
                    text(&l["unit"]),
                    text(&l["rate"]),
                    format!("{} {}", text(&l["amount"]), text(&l["currency"])),
                ]);
            }
            println!("{t}");
        }
    }
}

/// Prints balances.
pub fn show_balances(b: &Value) {
    let mut t = table(&["ACCOUNT", "CURRENCY", "BALANCE"]);
    for r in b.as_array().into_iter().flatten() {
        t.add_row([
            text(&r["account"]),
            text(&r["currency"]),
            text(&r["balance"]),
        ]);
    }
    println!("{t}");
}

/// Prints a statement.
pub fn show_statement(s: &Value) {
    let mut t = table(&[
        "CURRENCY",
        "GROSS",
        "COMMISSION",
        "NET",
        "PAID OUT",
        "BALANCE",
    ]);
    for (c, gross) in s["gross"].as_object().into_iter().flatten() {
        t.add_row([
            c.clone(),
            text(gross),
            text(&s["commission"][c]),
            text(&s["net"][c]),
            text(&s["payouts"][c]),
            text(&s["balance"][c]),
        ]);
    }
    println!("provider {}", text(&s["provider"]));
    println!("{t}");
}
