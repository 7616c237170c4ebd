//! Private pools (issue 17): a pool owner's own market over capacity it holds, the
//! members who bid in it, and the burst beyond it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use surplus_market::cohort::Right;
pub use surplus_market::pool::{
    Allocation, BurstSettings, CurrencyKind, Method, Policy, Request as PoolBid, RequestType,
    Settings, SlotFacts, Why,
};

/// A pool's settings as an owner gives them (`POST /v1/pools`,
/// `PUT /v1/pools/{id}/policy`); what is left out takes its default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PoolSettingsBody {
    /// A name for people (required when creating; set only then).
    #[serde(default)]
    pub name: Option<String>,
    /// `auction` (the default: requests bid, by the bidding method) or
    /// `fixed_price` (everyone pays the minimum; no bidding).
    #[serde(default)]
    pub request_type: Option<RequestType>,
    /// The least a bid may be, per slot-hour (default 0).
    #[serde(default)]
    pub minimum: Option<u64>,
    /// The most a bid may be, per slot-hour (default: uncapped).
    #[serde(default)]
    pub maximum: Option<u64>,
    /// The most slots one user holds at once (default: uncapped).
    #[serde(default)]
    pub cap_per_user: Option<u32>,
    /// Whether a cycle may take slots from a holder outbid (default false).
    #[serde(default)]
    pub preemptible: Option<bool>,
    /// `english` (bids only rise, each pays its bid), `dutch` (a falling asking
    /// price everyone pays; give `step`) or `spot` (the default: everyone pays the
    /// best bid left waiting, or the minimum).
    #[serde(default)]
    pub method: Option<String>,
    /// The Dutch clock's step per cycle.
    #[serde(default)]
    pub step: Option<u64>,
    /// The ledger currency of a pool paid in money (required for it when creating).
    /// A pool's own credits or units are a currency of its own, named by the pool
    /// (leave this out). Set when the pool is made.
    #[serde(default)]
    pub currency: Option<String>,
    /// `money`, `credits` (the default) or `units`.
    #[serde(default)]
    pub currency_kind: Option<CurrencyKind>,
    /// Seconds between cycles (default 60).
    #[serde(default)]
    pub cycle_seconds: Option<u64>,
    /// Seconds a user keeps a slot it lost (default 300).
    #[serde(default)]
    pub notice_seconds: Option<u64>,
    /// Hours for a user's usage to count half in the fairness rank (default 24).
    #[serde(default)]
    pub half_life_hours: Option<u64>,
    /// The most users the pool admits (default 100).
    #[serde(default)]
    pub max_users: Option<u32>,
    /// The burst policy (`null` or left out: none; the request then waits with
    /// "pool full, no burst policy").
    #[serde(default)]
    pub burst: Option<BurstSettings>,
    /// `true` removes the burst policy (`PUT /v1/pools/{id}/policy`).
    #[serde(default)]
    pub remove_burst: Option<bool>,
}

/// `POST /v1/pools`: the settings with the pool's name.
pub type PoolCreate = PoolSettingsBody;

/// A slot of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SlotView {
    /// The slot: its reservation's id, or its host's.
    pub slot: Uuid,
    /// The entity (pool owner) whose slot it is.
    pub entity: String,
    /// The host it runs on.
    pub host: Uuid,
    /// The owner's account that holds it.
    pub account: String,
    /// What it is.
    pub facts: SlotFacts,
    /// Whether it was burst into.
    pub burst: bool,
    /// When it joined.
    pub added_at_ms: i64,
    /// When it leaves the pool, if it is leaving.
    pub leaving_at_ms: Option<i64>,
    /// The member holding it now, if any.
    pub held_by: Option<String>,
}

/// A pool member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberView {
    /// The member's client account.
    pub member: String,
    /// The entity (pool owner) whose user it is.
    pub entity: String,
    /// Its name.
    pub name: String,
    /// Its organisation.
    pub organisation: String,
    /// When it was let in.
    pub added_at_ms: i64,
}

/// A pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolView {
    /// The pool.
    pub id: Uuid,
    /// Its owner (a pool owner account).
    pub owner: String,
    /// Its name.
    pub name: String,
    /// Its settings.
    pub settings: Settings,
    /// The asking price (Dutch pools).
    pub asking: u64,
    /// When the next cycle is due.
    pub next_cycle_at_ms: i64,
    /// When the last cycle ran.
    pub cycled_at_ms: Option<i64>,
    /// When it was made.
    pub created_at_ms: i64,
    /// Its slots.
    pub slots: Vec<SlotView>,
    /// Its members.
    pub members: Vec<MemberView>,
    /// The entities of a merged pool (empty: the owner's own pool).
    pub entities: Vec<EntityView>,
    /// When it is dissolved, if it is.
    pub dissolved_at_ms: Option<i64>,
}

/// An entity of a merged pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EntityView {
    /// The entity (a pool owner account).
    pub entity: String,
    /// What it may change: `policy`, `users`, `slots`, `dissolve`.
    pub rights: Vec<Right>,
    /// The most of its slots lent to other entities' users at once (`null`: no bound).
    pub lending_limit: Option<u32>,
    /// The most other entities' slots its users borrow at once (`null`: no bound).
    pub borrowing_limit: Option<u32>,
    /// When it was invited.
    pub invited_at_ms: i64,
    /// When it joined (`null`: invited only).
    pub joined_at_ms: Option<i64>,
    /// When it leaves, if it is leaving.
    pub leaving_at_ms: Option<i64>,
}

/// `POST /v1/pools/{id}/entities`: invites a pool owner into a merged pool, with
/// the rights it will have.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// The pool owner account.
    pub entity: String,
    /// What it may change: `policy`, `users`, `slots`, `dissolve`.
    #[serde(default)]
    pub rights: Vec<Right>,
}

/// `POST /v1/pools/{id}/join`: an invited entity merges its own pool in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// Its pool, whose slots, members and requests move into the merged pool.
    pub pool: Uuid,
    /// The most of its slots lent to others' users at once (default: no bound).
    #[serde(default)]
    pub lending_limit: Option<u32>,
    /// The most others' slots its users borrow at once (default: no bound).
    #[serde(default)]
    pub borrowing_limit: Option<u32>,
}

/// `PUT /v1/pools/{id}/limits`: an entity's own lending and borrowing limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// The most of its slots lent to others' users at once (`null`: no bound).
    #[serde(default)]
    pub lending_limit: Option<u32>,
    /// The most others' slots its users borrow at once (`null`: no bound).
    #[serde(default)]
    pub borrowing_limit: Option<u32>,
}

/// `POST /v1/pools/{id}/slots`: a reservation the owner's accounts hold, or one of
/// their enrolled hosts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SlotRequest {
    /// The reservation's id, or the host's (agent id).
    pub slot: Uuid,
}

/// `POST /v1/pools/{id}/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    /// The member's client account.
    pub member: String,
    /// Its name (default: the account).
    #[serde(default)]
    pub name: Option<String>,
    /// Its organisation.
    #[serde(default)]
    pub organisation: Option<String>,
}

/// `POST /v1/pool-accounts`: a client account lets a pool owner put its capacity
/// in pools.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PoolAccountGrant {
    /// The pool owner account.
    pub owner: String,
}

/// `POST /v1/pools/{id}/credits`: credits (or units) the owner issues to a member.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// The member.
    pub member: String,
    /// Minor units of the pool's currency.
    pub amount: i64,
    /// Makes a retried request safe: one token, one issue.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// What an issue of credits did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreditView {
    /// The ledger posting's key.
    pub key: String,
    /// The member.
    pub member: String,
    /// Minor units.
    pub amount: i64,
    /// The pool's currency.
    pub currency: String,
    /// `posted`, or `duplicate` for a retry.
    pub applied: String,
}

/// `POST /v1/pools/{id}/requests`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PoolBidRequest {
    /// Slots wanted.
    pub count: u32,
    /// The bid per slot-hour, in the pool's currency.
    pub bid: u64,
    /// Makes a retried request safe.
    #[serde(default)]
    pub client_token: Option<String>,
}

/// `POST /v1/pool-requests/{id}/bid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RebidRequest {
    /// The new bid per slot-hour (below the minimum: it takes no part until raised).
    pub bid: u64,
}

/// A slot given to a request, with its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AllocationView {
    /// The allocation.
    pub allocation: Allocation,
    /// The host to run on (`agent_id` of RunInstances).
    pub host: Uuid,
}

/// A member's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolRequestView {
    /// The pool.
    pub pool: Uuid,
    /// The request.
    pub request: PoolBid,
    /// `live` or `cancelled`.
    pub state: String,
    /// What the last cycle decided of it (`rule` names it; a burst's reason under
    /// `burst`), `null` before its first cycle.
    pub why: Option<serde_json::Value>,
    /// Its allocations not over.
    pub allocations: Vec<AllocationView>,
}

/// `GET /v1/pool-requests/{id}/explain`: why a request holds, waits or was preempted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExplainView {
    /// The request.
    pub request: Uuid,
    /// The rule that decided (`holds`, `pool_full`, `user_cap`, `preempted`,
    /// `below_minimum`, `not_member`, `cancelled`, `not_yet_cycled`, ...).
    pub rule: String,
    /// The decision in words, with its numbers.
    pub explanation: String,
    /// The decision as recorded.
    pub why: Option<serde_json::Value>,
}

/// One stretch charged to a member (a billing record of FIG. 12).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChargeView {
    /// The request.
    pub request: Uuid,
    /// The slot.
    pub slot: Uuid,
    /// The stretch.
    pub from_ms: i64,
    /// Its end.
    pub to_ms: i64,
    /// Per slot-hour.
    pub price: u64,
    /// Minor units of the pool's currency.
    pub amount: i64,
}

/// A member's record in a pool (FIG. 12).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemberUsage {
    /// The member (user id).
    pub member: String,
    /// Slot-hours held.
    pub slot_hours: f64,
    /// What it was charged, minor units of the pool's currency.
    pub charged: i64,
    /// Slots it holds now.
    pub holding: Vec<PoolRecordView>,
    /// Its billing records.
    pub charges: Vec<ChargeView>,
}

/// A slot held by a member, as FIG. 12 lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolRecordView {
    /// The pool's owner (the customer).
    pub customer: String,
    /// The member (user id).
    pub member: String,
    /// Its request.
    pub request: Uuid,
    /// The slot.
    pub slot: Uuid,
    /// The host.
    pub host: Uuid,
    /// The member's instances on it, not terminated.
    pub instances: Vec<String>,
    /// The instance type (size category).
    pub instance_type: Option<String>,
    /// CPUs.
    pub cpus: Option<u32>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Operating system.
    pub platform: Option<String>,
    /// Shared or dedicated.
    pub tenancy: String,
    /// Zone.
    pub zone: Option<String>,
    /// The price it pays per slot-hour (its asking price).
    pub price: u64,
    /// Its bid.
    pub bid: u64,
}

/// `GET /v1/pools/{id}/usage`: usage and charges per member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolUsageView {
    /// The pool.
    pub pool: Uuid,
    /// Its currency.
    pub currency: String,
    /// Per member (a member sees its own only).
    pub members: Vec<MemberUsage>,
    /// Charged in all, minor units (the owner's income from the pool).
    pub total: i64,
    /// What bursts cost the owner in the current budget period, in the burst
    /// policy's currency.
    pub burst_spent: u64,
    /// The bursts.
    pub bursts: Vec<BurstView>,
}

/// Capacity the pool burst into.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BurstView {
    /// The slot (the reservation made on the owner's behalf, or its own).
    pub slot: Uuid,
    /// The request it was made for.
    pub request: Uuid,
    /// `market:{listing}` or `own`.
    pub source: String,
    /// Per host-hour.
    pub price: u64,
    /// When it started.
    pub started_at_ms: i64,
    /// When it was given back.
    pub ended_at_ms: Option<i64>,
}
