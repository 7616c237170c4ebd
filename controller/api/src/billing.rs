//! Metering periods, usage, billing runs, payments and payouts, the ledger, invoices
//! and statements.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use surplus_market::billing::PricePlan;
use surplus_market::ledger::Applied;
use surplus_protocol::usage::MeteringPeriods;

use crate::{InvoiceLine, UsageRow};

/// `PUT /v1/agents/{id}/metering` body: periods such as `"30s"`; absent ones stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MeteringRequest {
    /// Instance meters.
    #[serde(default)]
    pub instance: Option<String>,
    /// Host meters.
    #[serde(default)]
    pub host: Option<String>,
    /// Subscription meters.
    #[serde(default)]
    pub subscription: Option<String>,
}

/// `GET|PUT /v1/agents/{id}/metering` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MeteringView {
    /// The agent.
    pub agent_id: Uuid,
    /// Periods set through the API (the agent's configuration applies otherwise).
    pub periods: Option<MeteringPeriods>,
    /// Whether the connected agent applied them now (`false`: it gets them when it
    /// connects).
    pub delivered: bool,
    /// When the new periods start (the next boundary), when delivered.
    pub effective_from_ms: Option<i64>,
    /// The agent's spool as last reported.
    pub spool: Option<surplus_protocol::usage::SpoolState>,
}

/// `GET /v1/usage` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageView {
    /// `hour` or `day`.
    pub granularity: String,
    /// Start of the range.
    pub from_ms: i64,
    /// End of the range.
    pub to_ms: i64,
    /// Buckets, oldest first.
    pub rows: Vec<UsageRow>,
}

/// `POST /v1/billing/runs` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BillingRunRequest {
    /// Period start, ms, on a whole hour.
    pub from_ms: i64,
    /// Period end (exclusive), ms, on a whole hour.
    pub to_ms: i64,
}

/// `POST /v1/payments` and `POST /v1/payouts` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MoneyRequest {
    /// The client (payments) or provider (payouts) account name.
    pub account: String,
    /// Currency code.
    pub currency: String,
    /// Minor units, more than zero.
    pub amount: i64,
    /// Payments: `topup` (prepaid credit), `upfront` or `settlement`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Idempotency key: the same request sent again posts nothing twice.
    pub key: String,
}

/// Answer of a posting.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PostingView {
    /// The key.
    pub key: String,
    /// `posted` or `duplicate`.
    pub result: Applied,
    /// Balances of the accounts touched, after the posting.
    pub balances: Vec<BalanceView>,
}

/// One balance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalanceView {
    /// Account.
    pub account: String,
    /// Currency.
    pub currency: String,
    /// Minor units.
    pub balance: i64,
}

/// `PUT /v1/ledger/accounts/{account}` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AccountPolicy {
    /// Whether the account may go below zero (`false` makes a client prepaid).
    pub allow_negative: bool,
}

/// An invoice: one client's charges of one period across every provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvoiceView {
    /// `inv-...`.
    pub invoice_id: String,
    /// The client.
    pub client: String,
    /// Period start.
    pub from_ms: i64,
    /// Period end (exclusive).
    pub to_ms: i64,
    /// Total per currency.
    pub totals: BTreeMap<String, i64>,
    /// Lines, grouped by provider, then instance, then meter.
    pub lines: Vec<InvoiceLine>,
}

/// A provider's statement over a range.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatementView {
    /// The provider account.
    pub provider: String,
    /// Range start.
    pub from_ms: i64,
    /// Range end.
    pub to_ms: i64,
    /// Charged to clients, per currency.
    pub gross: BTreeMap<String, i64>,
    /// The marketplace's commission, per currency.
    pub commission: BTreeMap<String, i64>,
    /// Earned: gross less commission, per currency.
    pub net: BTreeMap<String, i64>,
    /// Paid out in the range, per currency.
    pub payouts: BTreeMap<String, i64>,
    /// Current balance (earned and not paid out), per currency.
    pub balance: BTreeMap<String, i64>,
    /// The lines.
    pub lines: Vec<InvoiceLine>,
}

/// A billing run's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingRun {
    /// The period.
    pub from_ms: i64,
    /// End of the period (exclusive).
    pub to_ms: i64,
    /// Instances whose charges were posted now.
    pub posted: u32,
    /// Instances already billed for this period with the same usage (a repeated run).
    pub already_billed: u32,
    /// Instances with nothing to charge.
    pub nothing_due: u32,
    /// Instances run by an admin: the operator's own, not billed to anyone.
    pub not_billed: u32,
    /// Instances whose charges could not be posted, with the reason.
    pub failed: Vec<BillingFailure>,
    /// Total charged now for this period, per currency.
    pub charged: std::collections::BTreeMap<String, i64>,
    /// Late usage billed now, of this period or of earlier ones: the difference to
    /// what was billed before.
    pub adjustments: Vec<Adjustment>,
}

/// An instance a billing run could not post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingFailure {
    /// The instance.
    pub instance_id: String,
    /// Its client.
    pub client: String,
    /// Why.
    pub reason: String,
}

/// Late usage of one instance and period, billed by a later run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Adjustment {
    /// The instance.
    pub instance_id: String,
    /// Its client.
    pub client: String,
    /// The period the usage belongs to.
    pub from_ms: i64,
    /// End of that period.
    pub to_ms: i64,
    /// What was charged now (negative: credited).
    pub amount: i64,
    /// Currency.
    pub currency: String,
}

/// An agent whose usage of a period has not all arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaitingFor {
    /// The agent.
    pub agent_id: Uuid,
    /// The end of its latest usage record stored (`None`: none yet).
    pub usage_through_ms: Option<i64>,
}

/// `PUT /v1/ledger/accounts/{account}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountPolicyView {
    /// The account.
    pub account: String,
    /// Whether it may go below zero.
    pub allow_negative: bool,
}
