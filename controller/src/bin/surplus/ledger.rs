//! `surplus pay|payout|ledger`: money in and out, balances and account policies.

use clap::{Args, Subcommand};
use surplus_api::billing::{
    AccountPolicy, AccountPolicyView, BalanceView, MoneyRequest, PostingView,
};

use crate::client::{Client, print, table};

#[derive(Subcommand)]
pub enum Command {
    /// Record a client's payment (admin).
    Pay(MoneyArgs),
    /// Record a payout to a provider (admin).
    Payout(MoneyArgs),
    /// Ledger balances and account policies.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Pay(args) => post_money(client, json, "/v1/payments", args).await,
        Command::Payout(args) => post_money(client, json, "/v1/payouts", args).await,
        Command::Ledger {
            command: LedgerCommand::Balance { account },
        } => {
            let path = match account {
                Some(a) => format!("/v1/ledger/balances?account={a}"),
                None => "/v1/ledger/balances".into(),
            };
            let balances: Vec<BalanceView> = client.get(&path).await?;
            print(json, &balances, || show_balances(&balances));
            Ok(())
        }
        Command::Ledger {
            command: LedgerCommand::Policy { account, prepaid },
        } => {
            let body = AccountPolicy {
                allow_negative: !prepaid,
            };
            let v: AccountPolicyView = client
                .put(&format!("/v1/ledger/accounts/{account}"), &body)
                .await?;
            print(json, &v, || {
                println!("{}: allow_negative = {}", v.account, v.allow_negative)
            });
            Ok(())
        }
    }
}

async fn post_money(
    client: &Client,
    json: bool,
    path: &str,
    args: MoneyArgs,
) -> anyhow::Result<()> {
    let body = MoneyRequest {
        account: args.account,
        currency: args.currency,
        amount: args.amount,
        kind: args.kind,
        key: args.key,
    };
    let v: PostingView = client.post(path, &body).await?;
    print(json, &v, || {
        println!(
            "{}: {}",
            v.key,
            serde_json::to_value(v.result).unwrap_or_default()
        )
    });
    Ok(())
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

/// Prints balances.
fn show_balances(balances: &[BalanceView]) {
    let mut t = table(&["ACCOUNT", "CURRENCY", "BALANCE"]);
    for r in balances {
        t.add_row([r.account.clone(), r.currency.clone(), r.balance.to_string()]);
    }
    println!("{t}");
}
