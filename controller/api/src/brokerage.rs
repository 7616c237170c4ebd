//! Federation and brokerage (issue 18): peers and the usage history the broker
//! aggregates from its own metering and its host clouds.

use serde::{Deserialize, Serialize};

/// A peer controller as `GET /v1/peers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeerView {
    /// The peer controller's id (`surplus://controller/<id>` in its certificate).
    pub id: String,
    /// Its name, for people.
    pub name: String,
    /// What it is to this controller: `host-cloud`, `marketplace-cloud` or `broker`.
    pub role: String,
    /// SHA-256 of its CA (pinned at peering), hex.
    pub ca_fingerprint: String,
    /// Its peer-link addresses.
    pub addresses: Vec<String>,
    /// Whether this controller dials it (the joiner dials its inviter).
    pub dials: bool,
    /// What this controller is to it.
    pub our_role: String,
    /// `active` or `removed`.
    pub status: String,
    /// Whether a link to it is up now.
    pub linked: bool,
    /// When it joined, ms since the epoch.
    pub joined_at_ms: i64,
    /// When it was removed.
    pub removed_at_ms: Option<i64>,
    /// When it was last heard from.
    pub last_seen_ms: Option<i64>,
    /// Usage rows made for it (as its host cloud), and how many it acknowledged.
    pub usage_sent: u64,
    /// Usage rows it acknowledged.
    pub usage_acknowledged: u64,
    /// Usage rows received from it (as its broker).
    pub usage_received: u64,
}

/// One user's use of one resource in one minute, from one cloud.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageMinute {
    /// `local` (this controller's own metering) or the host cloud's controller id.
    pub cloud: String,
    /// The user.
    pub user: String,
    /// `os_instances`, `cpu_cores`, `memory_gb`.
    pub resource: String,
    /// Start of the minute, ms since the epoch.
    pub minute_ms: i64,
    /// Units integrated over the minute, unit-milliseconds.
    pub unit_ms: u64,
}

/// `POST /v1/subscriptions`: a user's short-term limit of a resource (made or
/// replaced).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubscriptionCreate {
    /// The user (1 to 64 of letters, digits, `.`, `_`, `-`).
    pub user: String,
    /// `os_instances`, `cpu_cores`, `memory_gb` or `app.<name>`.
    pub resource: String,
    /// The short-term period: 1m, 5m, 10m, 15m, 30m, 1h, 8h, 12h or 24h.
    pub period: String,
    /// Units the user may use in each period without overage.
    pub limit: u64,
    /// Minor units per unit over the limit per period.
    pub overage_rate: i64,
    /// The client account billed the netted overage (default: the user).
    #[serde(default)]
    pub administrator: Option<String>,
    /// The rate's currency (default EUR).
    #[serde(default)]
    pub currency: Option<String>,
    /// When the user's unused capacity may be contributed, every day (UTC), such as
    /// `["09:00-17:00"]`; a window may run past midnight (`22:00-06:00`). Default: at
    /// any time.
    #[serde(default)]
    pub availability: Option<Vec<String>>,
}

/// A subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubscriptionView {
    /// The user.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// The period (`15m`, `1h`, `24h`).
    pub period: String,
    /// The period in ms.
    pub period_ms: i64,
    /// Units per period without overage.
    pub limit: u64,
    /// Minor units per unit over the limit per period.
    pub overage_rate: i64,
    /// The client account billed the overage.
    pub administrator: String,
    /// The rate's currency.
    pub currency: String,
    /// When its unused capacity may be contributed, every day (UTC); empty: at any
    /// time.
    pub availability: Vec<String>,
    /// When it was made, ms since the epoch.
    pub created_at_ms: i64,
    /// When it last changed.
    pub updated_at_ms: i64,
}

/// `GET /v1/brokerage/margins`: the FIG. 4 tables of a window, one per subscriber
/// (its administrator), and what they bill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MarginsView {
    /// The clouds whose usage is in the tables: `local` and the host clouds' ids.
    pub clouds: Vec<String>,
    /// The window's start, ms since the epoch.
    pub from: i64,
    /// The window's end (exclusive).
    pub until: i64,
    /// Per subscriber: its users' margins, netted among them only.
    pub subscribers: Vec<SubscriberMargins>,
    /// Use in the window by users with no subscription of that resource (counted
    /// nowhere, listed so that it is not lost from sight).
    pub unsubscribed: Vec<UsageMinute>,
}

/// One subscriber's margin tables and billing records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubscriberMargins {
    /// The administrator billed (a client account).
    pub administrator: String,
    /// Per resource and period length: cells per user and period, net margins,
    /// offset costs, marginal totals, excess capacity.
    pub table: surplus_market::brokerage::MarginTable,
    /// What the tables bill the administrator (not posted).
    pub billing: Vec<surplus_market::brokerage::BillingRecord>,
}

/// `POST /v1/brokerage/bundles/plan`: a bundle of a resource held over an interval
/// from the estimated contributions of the subscribers under their limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BundlePlanRequest {
    /// The resource, such as `os_instances`.
    pub resource: String,
    /// Units held at every instant of the interval.
    pub amount: u64,
    /// The interval's start, ms since the epoch.
    pub from: i64,
    /// The interval's end (exclusive); or leave it out and give `interval`.
    #[serde(default)]
    pub until: Option<i64>,
    /// How long the interval is, instead of `until`: `{"rule": "common"}` (the least
    /// common multiple of the subscribers' periods), `{"rule": "fixed", "ms": 3600000}`
    /// (1, 2, 12 or 24 hours) or `{"rule": "requested", "ms": N}` (what a marketplace
    /// cloud asked for, up to a day).
    #[serde(default)]
    pub interval: Option<surplus_market::stagger::IntervalRule>,
    /// Also cut the interval into the longest consecutive intervals over each of which
    /// the subscribers, each for the whole of it, hold at least this many units
    /// ([0056]: intervals that change over time to hold a minimum).
    #[serde(default)]
    pub hold_minimum: Option<u64>,
    /// The share of each user's average under-consumption estimated, basis points
    /// (default 5000: 50%).
    #[serde(default)]
    pub share_bps: Option<u32>,
    /// How far back the estimates look, such as `48h` (default `48h`).
    #[serde(default)]
    pub history: Option<String>,
    /// Minor units per unit-hour (default 0).
    #[serde(default)]
    pub rate_per_unit_hour: Option<u64>,
    /// The least a contributor is paid (default 0).
    #[serde(default)]
    pub floor_per_contributor: Option<u64>,
}

/// A planned bundle: the estimates it was made from, and the staggered arrangement
/// with its price, or where it falls short.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundlePlanView {
    /// The interval planned, ms since the epoch (its end from `until` or `interval`).
    pub from: i64,
    /// Its end (exclusive).
    pub until: i64,
    /// The consecutive intervals holding `hold_minimum`, when it was asked.
    pub intervals: Vec<surplus_market::brokerage::Window>,
    /// Each subscriber's estimated contribution.
    pub estimates: Vec<surplus_market::brokerage::Estimate>,
    /// The arrangement, when one holds the amount over the whole interval.
    pub arrangement: Option<surplus_market::stagger::Arrangement>,
    /// Its price.
    pub price: Option<surplus_market::stagger::BundlePrice>,
    /// Where even every estimated contribution together falls short, and by how much.
    pub shortfalls: Vec<surplus_market::stagger::Shortfall>,
}

/// `POST /v1/brokerage/bills`: post the netted overage of a window of whole periods
/// through the ledger and notify each subscriber's administrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BillRequest {
    /// The window's start, ms since the epoch (on every subscription's period grid).
    pub from: i64,
    /// The window's end (exclusive).
    pub until: i64,
    /// Only subscriptions of this period (15m, 1h, ...).
    #[serde(default)]
    pub period: Option<String>,
    /// Only this resource.
    #[serde(default)]
    pub resource: Option<String>,
}

/// One billing record as posted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillView {
    /// The administrator billed (`client:<administrator>` pays).
    pub administrator: String,
    /// The resource.
    pub resource: String,
    /// The period length, ms.
    pub period_ms: i64,
    /// Unit-periods over the limits, netted across the subscriber's users and clouds.
    pub net_over: u64,
    /// Minor units.
    pub amount: i64,
    /// The currency.
    pub currency: String,
    /// The posting's idempotency key: billing a window again posts nothing twice.
    pub key: String,
    /// `posted`, `duplicate` (posted before under this key) or `nothing` (no overage).
    pub outcome: String,
}

/// `POST /v1/brokerage/tenders`: plan a bundle and tender it to marketplace clouds,
/// one after another, each offered what the ones before it left.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TenderRequest {
    /// The bundle, planned as `POST /v1/brokerage/bundles/plan` plans it.
    pub bundle: BundlePlanRequest,
    /// The marketplace clouds (peer controller ids), in the order they are offered it.
    pub clouds: Vec<String>,
    /// The price's currency (default EUR).
    #[serde(default)]
    pub currency: Option<String>,
}

/// A tender this controller sent (`out`, as broker) or answered (`in`, as
/// marketplace cloud).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenderView {
    /// The tender.
    pub id: String,
    /// `out` or `in`.
    pub direction: String,
    /// The bundle it offers (`out` only).
    pub bundle: Option<String>,
    /// The other controller.
    pub peer: String,
    /// The resource.
    pub resource: String,
    /// Units offered.
    pub amount: u64,
    /// The interval's start, ms since the epoch.
    pub from_ms: i64,
    /// The interval's end (exclusive).
    pub until_ms: i64,
    /// The price offered for all of it, minor units.
    pub offered_price: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// `sent`, `accepted`, `part`, `rejected`, `unanswered` or `invalid`.
    pub state: String,
    /// Units taken.
    pub accepted_amount: u64,
    /// What is paid for them.
    pub price: u64,
    /// Why less than the whole was taken, or why the answer did not count.
    pub reason: Option<String>,
    /// When it was sent or received.
    pub created_at_ms: i64,
    /// When it was answered.
    pub answered_at_ms: Option<i64>,
    /// What the broker reported falls short of it (`in` only): spans and units missing.
    pub shortfalls: Vec<surplus_market::provision::Gap>,
}

/// A bundle this controller tendered, with its tenders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundleView {
    /// The bundle.
    pub id: String,
    /// The resource.
    pub resource: String,
    /// Units held at every instant of the interval.
    pub amount: u64,
    /// The interval's start, ms since the epoch.
    pub from_ms: i64,
    /// The interval's end (exclusive).
    pub until_ms: i64,
    /// The price of all of it, minor units.
    pub price: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Who contributes what, when.
    pub arrangement: surplus_market::stagger::Arrangement,
    /// Each contributor to the ledger account its share is paid to.
    pub contributors: std::collections::BTreeMap<String, String>,
    /// Units the marketplace clouds took in all.
    pub placed: u64,
    /// When it was tendered.
    pub created_at_ms: i64,
    /// When the accepted tenders were paid out to the contributors.
    pub settled_at_ms: Option<i64>,
    /// What each subscriber provided so far (kept of its plan or stood in with),
    /// unit-milliseconds: what the payout is split by.
    pub held: std::collections::BTreeMap<String, u64>,
    /// Minute by minute up to the last whose usage arrived: what each contributor
    /// kept, who stood in, and what fell short (once any of it was sold).
    pub provision: Option<surplus_market::provision::Provision>,
    /// Its tenders, in the order they were sent.
    pub tenders: Vec<TenderView>,
}
