//! What the store keeps of private pools (issue 17), and the trait both backends
//! implement for them (`pools_sql.rs`).

use std::collections::BTreeMap;

use async_trait::async_trait;
pub use surplus_market::pool::SlotFacts;
use surplus_market::pool::{Allocation, Plan, Settings};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::{ChangeSet, MarketRefusal, PostError, StoreError};

/// A pool as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPool {
    /// The pool.
    pub id: Uuid,
    /// The pool owner account.
    pub owner: String,
    /// Its name, for people.
    pub name: String,
    /// Its settings.
    pub settings: Settings,
    /// The Dutch clock's asking price.
    pub asking: u64,
    /// When its next cycle is due.
    pub next_cycle_at_ms: UnixMillis,
    /// When a cycle was asked for sooner, if it was.
    pub requested_at_ms: Option<UnixMillis>,
    /// When its last cycle ran.
    pub cycled_at_ms: Option<UnixMillis>,
    /// When it was made.
    pub created_at_ms: UnixMillis,
    /// When it is dissolved (its slots gone), if it is.
    pub dissolved_at_ms: Option<UnixMillis>,
}

/// A slot of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSlotRow {
    /// The slot: its reservation's id, or its host's.
    pub slot: Uuid,
    /// The pool.
    pub pool: Uuid,
    /// The pool owner whose slot it is (in a merged pool each keeps its own).
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
    pub added_at_ms: UnixMillis,
    /// When it leaves (taken back), if it does.
    pub leaving_at_ms: Option<UnixMillis>,
}

/// A pool's member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMember {
    /// The client account.
    pub member: String,
    /// The entity (pool owner) whose user it is.
    pub entity: String,
    /// Its name.
    pub name: String,
    /// Its organisation.
    pub organisation: String,
    /// When it was let in.
    pub added_at_ms: UnixMillis,
}

/// An entity of a merged pool (FIG. 14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntity {
    /// The entity (a pool owner account).
    pub entity: String,
    /// What it may change, given at the merge.
    pub rights: std::collections::BTreeSet<surplus_market::cohort::Right>,
    /// The most of its slots its users lend to others' (`None`: all).
    pub lending_limit: Option<u32>,
    /// The most slots its users borrow from others' (`None`: unbounded).
    pub borrowing_limit: Option<u32>,
    /// When it was invited.
    pub invited_at_ms: UnixMillis,
    /// When it joined (`None`: invited only).
    pub joined_at_ms: Option<UnixMillis>,
    /// When it leaves, if it is leaving.
    pub leaving_at_ms: Option<UnixMillis>,
}

/// A member's request as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoolRequest {
    /// The pool.
    pub pool: Uuid,
    /// The request.
    pub request: surplus_market::pool::Request,
    /// When it was cancelled.
    pub cancelled_at_ms: Option<UnixMillis>,
    /// What the last cycle decided of it (`pool::Why`, and a burst's reason).
    pub why: Option<serde_json::Value>,
}

/// One stretch charged to a member (a billing record of FIG. 12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCharge {
    /// The member.
    pub member: String,
    /// Its request.
    pub request: Uuid,
    /// The slot.
    pub slot: Uuid,
    /// The stretch.
    pub from_ms: UnixMillis,
    /// Its end.
    pub to_ms: UnixMillis,
    /// Per slot-hour.
    pub price: u64,
    /// Minor units of `currency`.
    pub amount: i64,
    /// The pool's currency.
    pub currency: String,
}

/// Capacity a pool burst into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolBurst {
    /// The slot (the reservation made, or the owner's own slot).
    pub slot: Uuid,
    /// The request it was made for.
    pub request: Uuid,
    /// `market:{listing}` or `own`.
    pub source: String,
    /// Per host-hour, in the burst policy's currency (0 for the owner's own).
    pub price: u64,
    /// When it started.
    pub started_at_ms: UnixMillis,
    /// When it was given back.
    pub ended_at_ms: Option<UnixMillis>,
}

/// What a cycle reads of its pool, under the pool's lock.
#[derive(Debug, Clone)]
pub struct PoolState {
    /// The pool.
    pub pool: StoredPool,
    /// Its slots, each with the end of its owner's hold (a reservation's term end or
    /// interruption deadline; `Some(now)` for one that ended).
    pub slots: Vec<(PoolSlotRow, Option<UnixMillis>)>,
    /// Its members.
    pub members: Vec<PoolMember>,
    /// Its entities, if it is a merged pool.
    pub entities: Vec<PoolEntity>,
    /// Its requests not cancelled.
    pub requests: Vec<StoredPoolRequest>,
    /// Its allocations not over.
    pub allocations: Vec<Allocation>,
    /// Each member's stretches held, for its decayed usage.
    pub stretches: BTreeMap<String, Vec<(UnixMillis, UnixMillis)>>,
}

/// What the shell decided of a cycle: the plan, what each request is told, and the
/// change set (the charges' postings, the notices).
#[derive(Debug, Clone, Default)]
pub struct PoolDecision {
    /// The plan (`surplus_market::pool::plan`).
    pub plan: Plan,
    /// What each request is told.
    pub why: BTreeMap<Uuid, serde_json::Value>,
    /// Postings and notices.
    pub changes: ChangeSet,
}

/// The decision of a cycle, from what it read.
pub type PoolDecide<'a> = &'a (dyn Fn(&PoolState) -> PoolDecision + Send + Sync);

/// Private pools.
#[async_trait]
pub trait PoolStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new pool.
    async fn create_pool(&self, pool: &StoredPool) -> Result<(), StoreError>;

    /// One pool.
    async fn pool(&self, id: Uuid) -> Result<Option<StoredPool>, StoreError>;

    /// Every pool, oldest first.
    async fn pools(&self) -> Result<Vec<StoredPool>, StoreError>;

    /// Replaces a pool's settings.
    async fn set_pool_settings(&self, id: Uuid, settings: &Settings) -> Result<(), StoreError>;

    /// Lets `owner` pool the capacity of client `account` (the account's own act).
    async fn grant_pool_account(
        &self,
        owner: &str,
        account: &str,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// The client accounts whose capacity `owner` may pool.
    async fn pool_accounts(&self, owner: &str) -> Result<Vec<String>, StoreError>;

    /// Puts a slot in its pool, under the pool's lock: refused as `slot_taken` when
    /// it is in a pool (this one or another) and not yet gone from it.
    async fn add_pool_slot(
        &self,
        slot: &PoolSlotRow,
        now_ms: UnixMillis,
    ) -> Result<Result<(), MarketRefusal>, StoreError>;

    /// Marks a slot as leaving its pool at `leaving_at_ms` (`false`: not in it).
    async fn leave_pool_slot(
        &self,
        pool: Uuid,
        slot: Uuid,
        leaving_at_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// A pool's slots, those gone included until their deadline.
    async fn pool_slots(&self, pool: Uuid) -> Result<Vec<PoolSlotRow>, StoreError>;

    /// The slot of a pool that runs on `host` and has not left at `now_ms`.
    async fn pool_slot_on(
        &self,
        host: Uuid,
        now_ms: UnixMillis,
    ) -> Result<Option<PoolSlotRow>, StoreError>;

    /// The slots `account` holds in any pool (not gone at `now_ms`).
    async fn pooled_slots(&self, now_ms: UnixMillis) -> Result<Vec<Uuid>, StoreError>;

    /// Lets a member in (or updates its name and organisation) if the pool has room
    /// for `max_users`: refused as `pool_full_of_users` otherwise.
    async fn put_pool_member(
        &self,
        pool: Uuid,
        member: &PoolMember,
        max_users: u32,
    ) -> Result<Result<(), MarketRefusal>, StoreError>;

    /// Removes a member (`false`: not one).
    async fn remove_pool_member(&self, pool: Uuid, member: &str) -> Result<bool, StoreError>;

    /// A pool's members.
    async fn pool_members(&self, pool: Uuid) -> Result<Vec<PoolMember>, StoreError>;

    /// The pools `member` is in.
    async fn pools_of_member(&self, member: &str) -> Result<Vec<Uuid>, StoreError>;

    /// Stores a request (`false`: one with its id was stored already).
    async fn place_pool_request(&self, r: &StoredPoolRequest) -> Result<bool, StoreError>;

    /// One request.
    async fn pool_request(&self, id: Uuid) -> Result<Option<StoredPoolRequest>, StoreError>;

    /// A pool's requests, cancelled ones included, oldest first.
    async fn pool_requests(&self, pool: Uuid) -> Result<Vec<StoredPoolRequest>, StoreError>;

    /// Changes a live request's bid under its pool's lock (`false`: none such);
    /// with `only_rise`, refused as `ascending` when lower than the bid it has.
    async fn set_pool_bid(
        &self,
        id: Uuid,
        bid: u64,
        only_rise: bool,
    ) -> Result<Result<bool, MarketRefusal>, StoreError>;

    /// Replaces what a request is told (a burst's reason added to its cycle's).
    async fn set_pool_request_why(
        &self,
        id: Uuid,
        why: &serde_json::Value,
    ) -> Result<(), StoreError>;

    /// Cancels a live request (`false`: none such).
    async fn cancel_pool_request(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError>;

    /// A pool's allocations (`all`: those over too), oldest first, with each one's
    /// host.
    async fn pool_allocations(
        &self,
        pool: Uuid,
        all: bool,
    ) -> Result<Vec<(Allocation, Uuid)>, StoreError>;

    /// A member's allocation of `pool`'s `slot` that holds it at `now_ms`.
    async fn allocation_on(
        &self,
        pool: Uuid,
        slot: Uuid,
        member: &str,
        now_ms: UnixMillis,
    ) -> Result<Option<Allocation>, StoreError>;

    /// A pool's billing records.
    async fn pool_charges(&self, pool: Uuid) -> Result<Vec<PoolCharge>, StoreError>;

    /// Asks for a cycle of `pool` at `now_ms`.
    async fn request_pool_cycle(&self, pool: Uuid, now_ms: UnixMillis) -> Result<(), StoreError>;

    /// The pools whose cycle is due at `now_ms`.
    async fn due_pools(&self, now_ms: UnixMillis) -> Result<Vec<Uuid>, StoreError>;

    /// Runs `pool`'s cycle if it is due at `now_ms`, in one transaction under the
    /// pool's lock: reads its state, has `decide` plan it, and writes the plan (the
    /// allocations made, noticed, repriced and charged, the billing records, what
    /// each request is told, the timers) with the decision's change set. `None` when
    /// it was not due (another controller ran it first).
    async fn run_pool_cycle(
        &self,
        pool: Uuid,
        decide: PoolDecide<'_>,
        now_ms: UnixMillis,
    ) -> Result<Option<PoolDecision>, PostError>;

    /// Invites an entity into a merged pool, or changes its rights and limits.
    async fn put_pool_entity(&self, pool: Uuid, entity: &PoolEntity) -> Result<(), StoreError>;

    /// A pool's entities.
    async fn pool_entities(&self, pool: Uuid) -> Result<Vec<PoolEntity>, StoreError>;

    /// Entity `entity`, invited into `pool`, merges its own pool `from` into it in one
    /// transaction: `from`'s slots and members move (each keeping `entity` as its
    /// owner), its requests (bids in its own currency) are cancelled and `from` is
    /// dissolved. Refused as `not_invited`, `joined` (already), `unknown_pool`,
    /// `dissolved` (`pool` is), `merged` (`from` has entities), `bursting` or
    /// `allocated` (`from` has bursts or allocations not over).
    async fn join_pool(
        &self,
        pool: Uuid,
        from: Uuid,
        entity: &str,
        limits: (Option<u32>, Option<u32>),
        now_ms: UnixMillis,
    ) -> Result<Result<(), MarketRefusal>, StoreError>;

    /// An entity leaves a merged pool at `leaving_at_ms`: its slots leave then
    /// (`false`: it is not in the pool, or leaving already). Refused as
    /// `owner_stays` for the pool's owner and `last_entity` for the last one in it.
    async fn leave_pool_entity(
        &self,
        pool: Uuid,
        entity: &str,
        leaving_at_ms: UnixMillis,
    ) -> Result<Result<bool, MarketRefusal>, StoreError>;

    /// Dissolves a pool at `at_ms`: every slot leaves then and every request is
    /// cancelled now (`false`: dissolved already).
    async fn dissolve_pool(
        &self,
        pool: Uuid,
        at_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Records a burst.
    async fn put_pool_burst(&self, pool: Uuid, burst: &PoolBurst) -> Result<(), StoreError>;

    /// A pool's bursts, oldest first.
    async fn pool_bursts(&self, pool: Uuid) -> Result<Vec<PoolBurst>, StoreError>;

    /// Marks a burst given back at `now_ms`.
    async fn end_pool_burst(&self, slot: Uuid, now_ms: UnixMillis) -> Result<(), StoreError>;
}
