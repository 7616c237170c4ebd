//! Private pools (issue 17), first part: who of a pool's users holds which of its
//! slots in one allocation cycle ([`admit`]), the decaying usage that makes a heavy
//! user yield to a light one ([`decay`]), and what a request the pool cannot serve
//! bursts into ([`burst`]).
//!
//! Owns the rules; must not read a clock, make an id or touch a store. Time is an
//! argument, and every decision comes with its reason ([`Why`]), so that `surplus
//! pools explain` can say which rule and which numbers made it.
//!
//! # Admission ([`admit`])
//!
//! 1. **Refused when made** ([`check_request`]): a request from someone who is not a
//!    member of the pool (`not_member`), for no slot (`count`), with a bid below the
//!    pool's minimum (`below_minimum`) or above its maximum (`above_maximum`).
//! 2. **Rank.** Requests taking part are ranked by bid, highest first; then by the
//!    user's decayed usage, lightest first (a heavy user yields to a light one at the
//!    same bid); then the earlier request; then the lower id. The rank is total.
//! 3. **Keep or preempt.** Without preemption, what a request already holds is kept
//!    (as long as the request still takes part and its user still is a member) before
//!    anything is handed out. With preemption, every cycle allocates from scratch in
//!    rank order, and a holder ranked out loses its slots (`preempted`, naming the
//!    request that took them).
//! 4. **Fill.** In rank order, each request gets as many slots as it still wants, up
//!    to the slots left and to the per-user cap (all of a user's requests together), in
//!    part if need be; a request keeps the slots it held first, then takes the lowest
//!    free slot ids. One that gets fewer than it wants waits for the rest, with the
//!    reason (`pool_full`, `user_cap`).
//!
//! # Burst ([`burst`])
//!
//! What a request the pool cannot fill spills into, under the owner's stored policy:
//! nothing without one (`no_burst_policy`: "pool full, no burst policy"); else the
//! owner's own unallocated slots first (free of charge), then market offers, cheapest
//! first (then the lower offer id), each only at or below the policy's maximum price
//! per unit-hour and only while the period's spending plus this burst's cost (price ×
//! hours, per unit) stays within the budget. What cannot be had is named:
//! `above_maximum_price` when no offer is cheap enough, `budget_spent` when the
//! budget would be passed.
//!
//! # Invariants (checked by property tests)
//!
//! A slot is given to one request at most; only members hold slots; no user holds
//! more than the cap; without preemption nobody loses what it held while it still
//! takes part; a burst never pays above the maximum price and never passes the budget.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use crate::Refusal;
use crate::refuse;

/// A price in the pool's currency per slot-hour.
pub type Price = u64;

/// A pool's allocation rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Policy {
    /// The least a bid may be.
    pub minimum: Price,
    /// The most a bid may be, if capped.
    pub maximum: Option<Price>,
    /// The most slots one user holds at once, if capped.
    pub cap_per_user: Option<u32>,
    /// Whether a cycle may take slots from a holder ranked out.
    pub preemptible: bool,
}

/// A user's request for slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Request {
    /// The request.
    pub id: Uuid,
    /// Its user.
    pub user: String,
    /// Slots wanted.
    pub count: u32,
    /// Its bid per slot-hour.
    pub bid: Price,
    /// When it was made.
    pub placed_at_ms: UnixMillis,
}

/// Why a request holds, waits or lost its slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Why {
    /// It holds all it asked for.
    Holds {
        /// Its place in the rank (0 is first).
        rank: usize,
    },
    /// It holds fewer than it asked for (or none) because the pool has no slot left.
    PoolFull {
        /// Its place in the rank.
        rank: usize,
        /// Slots it holds.
        got: u32,
        /// Slots it asked for.
        wanted: u32,
    },
    /// Its user holds the per-user cap.
    UserCap {
        /// The cap.
        cap: u32,
        /// Slots it holds.
        got: u32,
        /// Slots it asked for.
        wanted: u32,
    },
    /// It lost slots it held to a better-ranked request.
    Preempted {
        /// Slots it lost.
        lost: u32,
        /// The request ranked first among those that took them.
        by: Uuid,
    },
}

/// One cycle's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Admission {
    /// Slots each request holds after the cycle (requests with none are left out).
    pub holds: BTreeMap<Uuid, Vec<Uuid>>,
    /// Why each request taking part holds what it holds.
    pub why: BTreeMap<Uuid, Why>,
}

/// Whether `request` may be made in a pool with `policy` whose members are `members`
/// (rule 1).
pub fn check_request(
    policy: &Policy,
    members: &BTreeSet<String>,
    request: &Request,
) -> Result<(), Refusal> {
    if !members.contains(&request.user) {
        return Err(refuse(
            "not_member",
            format!("{} is not a member of this pool", request.user),
        ));
    }
    if request.count == 0 {
        return Err(refuse("count", "a request is for at least one slot"));
    }
    if request.bid < policy.minimum {
        return Err(refuse(
            "below_minimum",
            format!(
                "the bid {} is below the pool's minimum {}",
                request.bid, policy.minimum
            ),
        ));
    }
    if let Some(max) = policy.maximum.filter(|m| request.bid > *m) {
        return Err(refuse(
            "above_maximum",
            format!("the bid {} is above the pool's maximum {max}", request.bid),
        ));
    }
    Ok(())
}

/// A user's usage after `elapsed_ms` of decay with half-life `half_life_ms`, plus what
/// it used since (`added`, in slot-hours): older use counts less and less.
pub fn decay(usage: f64, elapsed_ms: i64, half_life_ms: i64, added: f64) -> f64 {
    let halvings = elapsed_ms.max(0) as f64 / half_life_ms.max(1) as f64;
    usage.max(0.0) * 0.5f64.powf(halvings) + added.max(0.0)
}

/// One allocation cycle (rules 2 to 4): `slots` are the pool's, `requests` those made
/// (refused ones take no part), `usage` each user's decayed usage, `held` what each
/// request held before the cycle.
pub fn admit(
    policy: &Policy,
    members: &BTreeSet<String>,
    slots: &[Uuid],
    requests: &[Request],
    usage: &BTreeMap<String, f64>,
    held: &BTreeMap<Uuid, Vec<Uuid>>,
) -> Admission {
    let pool: BTreeSet<Uuid> = slots.iter().copied().collect();
    let mut taking: Vec<&Request> = requests
        .iter()
        .filter(|r| check_request(policy, members, r).is_ok())
        .collect();
    let weight = |user: &str| usage.get(user).copied().unwrap_or(0.0);
    taking.sort_by(|a, b| {
        Reverse(a.bid)
            .cmp(&Reverse(b.bid))
            .then(weight(&a.user).total_cmp(&weight(&b.user)))
            .then(a.placed_at_ms.cmp(&b.placed_at_ms))
            .then(a.id.cmp(&b.id))
    });
    let mut free = pool.clone();
    let mut out = Admission::default();
    let mut per_user: BTreeMap<&str, u32> = BTreeMap::new();
    let previously = |r: &Request| -> Vec<Uuid> {
        held.get(&r.id)
            .map(|s| s.iter().filter(|x| pool.contains(x)).copied().collect())
            .unwrap_or_default()
    };
    // Rule 3 without preemption: what a request held is kept first.
    if !policy.preemptible {
        for r in &taking {
            let mut keep: Vec<Uuid> = previously(r)
                .into_iter()
                .filter(|s| free.contains(s))
                .take(r.count as usize)
                .collect();
            if let Some(cap) = policy.cap_per_user {
                let used = per_user.get(r.user.as_str()).copied().unwrap_or(0);
                keep.truncate(cap.saturating_sub(used) as usize);
            }
            for s in &keep {
                free.remove(s);
            }
            *per_user.entry(r.user.as_str()).or_default() += keep.len() as u32;
            if !keep.is_empty() {
                out.holds.insert(r.id, keep);
            }
        }
    }
    // Rule 4: fill in rank order.
    let mut first_taker: Option<Uuid> = None;
    for (rank, r) in taking.iter().enumerate() {
        let mut have = out.holds.remove(&r.id).unwrap_or_default();
        let mut room = r.count.saturating_sub(have.len() as u32);
        let mut capped = false;
        if let Some(cap) = policy.cap_per_user {
            let used = per_user.get(r.user.as_str()).copied().unwrap_or(0);
            let left = cap.saturating_sub(used);
            if left < room {
                room = left;
                capped = true;
            }
        }
        // Its own former slots first, then the lowest free ids.
        let mine: Vec<Uuid> = previously(r)
            .into_iter()
            .filter(|s| free.contains(s))
            .collect();
        let rest: Vec<Uuid> = free.iter().copied().collect();
        let take: Vec<Uuid> = mine
            .iter()
            .chain(rest.iter().filter(|s| !mine.contains(s)))
            .take(room as usize)
            .copied()
            .collect();
        for s in &take {
            free.remove(s);
        }
        if !take.is_empty() && first_taker.is_none() {
            first_taker = Some(r.id);
        }
        *per_user.entry(r.user.as_str()).or_default() += take.len() as u32;
        have.extend(take);
        let got = have.len() as u32;
        let why = if got >= r.count {
            Why::Holds { rank }
        } else if capped {
            Why::UserCap {
                cap: policy.cap_per_user.unwrap_or(0),
                got,
                wanted: r.count,
            }
        } else {
            Why::PoolFull {
                rank,
                got,
                wanted: r.count,
            }
        };
        out.why.insert(r.id, why);
        if !have.is_empty() {
            out.holds.insert(r.id, have);
        }
    }
    // Rule 3 with preemption: a holder that lost slots says to whom.
    if policy.preemptible {
        for r in &taking {
            let before = previously(r);
            let now: BTreeSet<Uuid> = out
                .holds
                .get(&r.id)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            let lost = before.iter().filter(|s| !now.contains(s)).count() as u32;
            if lost > 0 {
                let by = taking
                    .iter()
                    .find(|o| {
                        o.id != r.id
                            && out
                                .holds
                                .get(&o.id)
                                .is_some_and(|h| h.iter().any(|s| before.contains(s)))
                    })
                    .map_or_else(|| first_taker.unwrap_or(r.id), |o| o.id);
                out.why.insert(r.id, Why::Preempted { lost, by });
            }
        }
    }
    out
}

/// The owner's stored burst policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstPolicy {
    /// The most a burst pays per unit-hour.
    pub max_price: Price,
    /// The most bursts spend in a budget period.
    pub budget: Price,
}

/// A market offer a burst may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketOffer {
    /// The listing.
    pub listing: String,
    /// Its price per unit-hour.
    pub price: Price,
    /// Units it has free.
    pub available: u32,
}

/// Where one burst unit comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum Unit {
    /// One of the owner's own slots outside any pool.
    Own {
        /// The slot.
        slot: Uuid,
    },
    /// A unit of a market listing, at its price.
    Market {
        /// The listing.
        listing: String,
        /// Per unit-hour.
        price: Price,
    },
}

/// What a burst decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Burst {
    /// The units taken, own first.
    pub units: Vec<Unit>,
    /// What they cost for the hours asked, charged to the budget.
    pub cost: Price,
    /// Why fewer units than wanted were taken, if so.
    pub short: Option<Refusal>,
}

/// Bursts `wanted` units for `hours` (rule of [`burst`](self#burst)): `spent` is the
/// budget period's spending so far, `own_free` the owner's slots outside any pool,
/// `offers` the market's.
pub fn burst(
    policy: Option<&BurstPolicy>,
    wanted: u32,
    hours: u32,
    spent: Price,
    own_free: &[Uuid],
    offers: &[MarketOffer],
) -> Burst {
    let Some(policy) = policy else {
        return Burst {
            units: Vec::new(),
            cost: 0,
            short: Some(refuse("no_burst_policy", "pool full, no burst policy")),
        };
    };
    let mut units: Vec<Unit> = own_free
        .iter()
        .take(wanted as usize)
        .map(|s| Unit::Own { slot: *s })
        .collect();
    let mut cost: Price = 0;
    let mut short = None;
    let mut market: Vec<&MarketOffer> = offers.iter().filter(|o| o.available > 0).collect();
    market.sort_by(|a, b| a.price.cmp(&b.price).then(a.listing.cmp(&b.listing)));
    'offers: for o in market {
        for _ in 0..o.available {
            if units.len() >= wanted as usize {
                break 'offers;
            }
            if o.price > policy.max_price {
                short = Some(refuse(
                    "above_maximum_price",
                    format!(
                        "the cheapest offer left costs {} a unit-hour, above the burst maximum {}",
                        o.price, policy.max_price
                    ),
                ));
                break 'offers;
            }
            let each = o.price.saturating_mul(u64::from(hours));
            if spent.saturating_add(cost).saturating_add(each) > policy.budget {
                short = Some(refuse(
                    "budget_spent",
                    format!(
                        "a unit for {hours} h costs {each}; {} of the budget {} is spent",
                        spent.saturating_add(cost),
                        policy.budget
                    ),
                ));
                break 'offers;
            }
            cost += each;
            units.push(Unit::Market {
                listing: o.listing.clone(),
                price: o.price,
            });
        }
    }
    if units.len() < wanted as usize && short.is_none() {
        short = Some(refuse(
            "no_capacity",
            format!(
                "{} of {wanted} units found: nothing else is free",
                units.len()
            ),
        ));
    }
    Burst { units, cost, short }
}

/// How a pool prices what it allocates (the pool's bidding method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Method {
    /// English, ascending: a bid may only be raised; each holder pays its own bid.
    English,
    /// Dutch, descending: the pool asks a price that falls by `step` each cycle that
    /// ends with a slot free (from the maximum, down to the minimum) and rises by
    /// `step` each cycle that ends with a request waiting; only bids at or above it
    /// take part, and every holder pays it.
    Dutch {
        /// Change of the asking price per cycle.
        step: Price,
    },
    /// Spot-like with a minimum: every holder pays the cycle's price, the best bid
    /// left waiting (or the minimum when none waits), never above its own bid.
    Spot,
    /// No bidding: a pool whose request type is a fixed price (see
    /// [`Settings::method_in_force`]); every holder pays the minimum, and requests
    /// rank as at equal bids (the lighter user first, then the earlier request).
    Fixed,
}

/// Whether `method` lets a bid of `old` become `new` (made at any time; a bid below
/// the minimum is kept, and takes no part in the cycles until raised).
pub fn check_rebid(method: Method, old: Price, new: Price) -> Result<(), Refusal> {
    if method == Method::English && new < old {
        return Err(refuse(
            "ascending",
            format!("an English pool's bids only rise: {new} is below the bid {old}"),
        ));
    }
    Ok(())
}

/// The first asking price of a pool with `method` (the Dutch clock starts at the
/// maximum, or at the minimum when uncapped).
pub fn opening_price(method: Method, policy: &Policy) -> Price {
    match method {
        Method::Dutch { .. } => policy.maximum.unwrap_or(policy.minimum),
        _ => policy.minimum,
    }
}

/// Who may hold a pool's slots: a pool's own members, or, for pools merged into one
/// market, the entities with their users, slots and lending limits
/// ([`crate::cohort`]).
#[derive(Debug, Clone, Copy)]
pub enum Members<'a> {
    /// One owner's pool and its members.
    Single(&'a BTreeSet<String>),
    /// A merged pool (its policy and slots are the cycle's own).
    Merged(&'a crate::cohort::MergedPool),
}

impl Members<'_> {
    /// Whether `user` may take part.
    pub fn admits(&self, user: &str) -> bool {
        match self {
            Members::Single(m) => m.contains(user),
            Members::Merged(m) => m.entity_of(user).is_some_and(|e| m.member(e).is_some()),
        }
    }

    fn admit(
        &self,
        policy: &Policy,
        slots: &[Uuid],
        requests: &[Request],
        usage: &BTreeMap<String, f64>,
        held: &BTreeMap<Uuid, Vec<Uuid>>,
    ) -> (Admission, BTreeMap<Uuid, crate::cohort::MergedWhy>) {
        match self {
            Members::Single(m) => (
                admit(policy, m, slots, requests, usage, held),
                BTreeMap::new(),
            ),
            Members::Merged(m) => {
                let live: BTreeSet<&Uuid> = slots.iter().collect();
                let mut pool = (*m).clone();
                pool.policy = policy.clone();
                pool.slots.retain(|s| live.contains(&s.id));
                let out = crate::cohort::admit_merged(&pool, requests, usage, held);
                (out.admission, out.merged_why)
            }
        }
    }
}

/// One cycle under a bidding method: the admission, what each holder pays per
/// slot-hour until the next cycle, and the asking price of the next cycle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cycle {
    /// Who holds which slots, and why.
    pub admission: Admission,
    /// Why, where a rule of merged pools decided.
    pub merged_why: BTreeMap<Uuid, crate::cohort::MergedWhy>,
    /// The price each request holding slots pays per slot-hour.
    pub prices: BTreeMap<Uuid, Price>,
    /// The asking price after this cycle.
    pub asking: Price,
}

/// One allocation cycle under `method` ([`admit`] among the requests that take part,
/// then the prices): under Dutch, a bid below `asking` takes no part in this cycle.
#[allow(clippy::too_many_arguments)]
pub fn cycle(
    method: Method,
    policy: &Policy,
    asking: Price,
    members: Members<'_>,
    slots: &[Uuid],
    requests: &[Request],
    usage: &BTreeMap<String, f64>,
    held: &BTreeMap<Uuid, Vec<Uuid>>,
) -> Cycle {
    let asking = asking.max(policy.minimum);
    let taking: Vec<Request> = match method {
        Method::Dutch { .. } => requests
            .iter()
            .filter(|r| r.bid >= asking)
            .cloned()
            .collect(),
        // At a fixed price every request stands as if it bid the minimum.
        Method::Fixed => requests
            .iter()
            .map(|r| Request {
                bid: policy.minimum,
                ..r.clone()
            })
            .collect(),
        _ => requests.to_vec(),
    };
    let (admission, merged_why) = members.admit(policy, slots, &taking, usage, held);
    let held_count = |id: &Uuid| admission.holds.get(id).map_or(0, |h| h.len() as u32);
    let waiting_best = taking
        .iter()
        .filter(|r| admission.why.contains_key(&r.id) && held_count(&r.id) < r.count)
        .map(|r| r.bid)
        .max();
    let free = slots
        .len()
        .saturating_sub(admission.holds.values().map(Vec::len).sum());
    let mut prices = BTreeMap::new();
    for r in &taking {
        if held_count(&r.id) == 0 {
            continue;
        }
        let price = match method {
            Method::English => r.bid,
            Method::Dutch { .. } => asking.min(r.bid),
            Method::Spot => waiting_best
                .unwrap_or(policy.minimum)
                .max(policy.minimum)
                .min(r.bid),
            Method::Fixed => policy.minimum,
        };
        prices.insert(r.id, price);
    }
    let next = match method {
        Method::Dutch { step } => {
            let top = policy.maximum.unwrap_or(Price::MAX);
            if free > 0 {
                asking.saturating_sub(step).max(policy.minimum)
            } else if waiting_best.is_some() {
                asking.saturating_add(step).min(top)
            } else {
                asking
            }
        }
        _ => policy.minimum,
    };
    Cycle {
        admission,
        merged_why,
        prices,
        asking: next,
    }
}

/// What holding a slot from `from_ms` to `to_ms` at `price` per slot-hour costs, in
/// minor units of the pool's currency, rounded half up.
pub fn charge(price: Price, from_ms: UnixMillis, to_ms: UnixMillis) -> i64 {
    let rate = i64::try_from(price).unwrap_or(i64::MAX);
    let held = to_ms.saturating_sub(from_ms).max(0) as u128;
    crate::billing::prorate(rate, held, 3_600_000)
}

/// A user's decayed usage at `now_ms` from the stretches its requests held slots
/// (`(from, to)`, one per slot): each slot-hour counts half as much per
/// `half_life_ms` that passed since it ended.
pub fn usage_of(
    stretches: &[(UnixMillis, UnixMillis)],
    now_ms: UnixMillis,
    half_life_ms: i64,
) -> f64 {
    stretches
        .iter()
        .map(|(from, to)| {
            let to = (*to).min(now_ms);
            let hours = to.saturating_sub(*from).max(0) as f64 / 3_600_000.0;
            decay(hours, now_ms.saturating_sub(to), half_life_ms, 0.0)
        })
        .sum()
}

/// What a pool's currency is (each is a ledger currency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CurrencyKind {
    /// Money in a named currency: users pay from their own balance in it.
    Money,
    /// The pool's own credits, issued by its owner to its users.
    Credits,
    /// Units such as CPU-hours, issued by its owner like credits.
    Units,
}

/// A pool's burst policy as its owner stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BurstSettings {
    /// The owner's client account that holds (and pays for) what is burst into.
    pub account: String,
    /// The most a burst pays per host-hour, in `currency`.
    pub max_price: Price,
    /// The most bursts spend in a budget period, in `currency`.
    pub budget: Price,
    /// The money bursts are paid in (the market listing's currency).
    pub currency: String,
    /// The budget period.
    pub period_ms: i64,
    /// How long a burst is kept at least (and charged to the budget up front).
    pub min_hours: u32,
}

/// What a pool's requests are (FIG. 11's request type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    /// Bids, decided by the bidding method.
    #[default]
    Auction,
    /// A fixed price, the pool's minimum, for everyone; no bidding.
    FixedPrice,
}

/// A pool's settings (FIG. 11): its policy, bidding method, currency and timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Settings {
    /// Bids or a fixed price.
    #[serde(default)]
    pub request_type: RequestType,
    /// The allocation rules.
    pub policy: Policy,
    /// The bidding method.
    pub method: Method,
    /// The ledger currency bids and charges are in.
    pub currency: String,
    /// What that currency is.
    pub currency_kind: CurrencyKind,
    /// How often allocations are re-decided.
    pub cycle_ms: i64,
    /// How long a user keeps a slot it lost.
    pub notice_ms: i64,
    /// Half-life of a user's usage in the fairness rank.
    pub half_life_ms: i64,
    /// The most users the pool admits.
    pub max_users: u32,
    /// The owner's burst policy, if any.
    pub burst: Option<BurstSettings>,
}

impl Settings {
    /// The method a cycle prices by: the bidding method, or [`Method::Fixed`] for a
    /// fixed-price pool.
    pub fn method_in_force(&self) -> Method {
        match self.request_type {
            RequestType::Auction => self.method,
            RequestType::FixedPrice => Method::Fixed,
        }
    }
}

/// Checks settings a pool owner gives, naming each bad field.
pub fn check_settings(s: &Settings) -> Result<(), Vec<(&'static str, String)>> {
    let mut bad = Vec::new();
    if let Some(max) = s.policy.maximum.filter(|m| *m < s.policy.minimum) {
        bad.push((
            "maximum",
            format!("{max} is below the minimum {}", s.policy.minimum),
        ));
    }
    if s.policy.cap_per_user == Some(0) {
        bad.push(("cap_per_user", "a cap is at least one slot".into()));
    }
    if let Method::Dutch { step } = s.method {
        if s.policy.maximum.is_none() {
            bad.push((
                "maximum",
                "a Dutch pool's clock starts at its maximum".into(),
            ));
        }
        if step == 0 {
            bad.push(("step", "a Dutch pool's price moves by at least 1".into()));
        }
    }
    if let Err(e) = crate::ledger::validate_currency(&s.currency) {
        bad.push(("currency", e));
    }
    for (field, ms, least) in [
        ("cycle_ms", s.cycle_ms, 1_000),
        ("notice_ms", s.notice_ms, 0),
        ("half_life_ms", s.half_life_ms, 1),
    ] {
        if ms < least || ms > 366 * 86_400_000 {
            bad.push((field, format!("{ms}: from {least} ms to a year")));
        }
    }
    if s.max_users == 0 {
        bad.push(("max_users", "a pool admits at least one user".into()));
    }
    if let Some(b) = &s.burst {
        if let Err(e) = crate::ledger::validate_currency(&b.currency) {
            bad.push(("burst.currency", e));
        }
        if b.period_ms < 60_000 || b.period_ms > 366 * 86_400_000 {
            bad.push((
                "burst.period_ms",
                format!("{}: from a minute to a year", b.period_ms),
            ));
        }
        if b.min_hours == 0 || b.min_hours > 8784 {
            bad.push((
                "burst.min_hours",
                format!("{}: from 1 to 8784", b.min_hours),
            ));
        }
    }
    if bad.is_empty() { Ok(()) } else { Err(bad) }
}

/// The start of the budget period `now_ms` falls in.
pub fn period_start(now_ms: UnixMillis, period_ms: i64) -> UnixMillis {
    now_ms - now_ms.rem_euclid(period_ms.max(1))
}

/// What a slot is (the FIG. 10 list): kept as it was when it joined the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SlotFacts {
    /// `reservation` (its pricing mode in `mode`) or `host`.
    pub kind: String,
    /// The reservation's pricing mode (`on_demand`, `reserved`, `spot`, ...).
    pub mode: Option<String>,
    /// The listing it was reserved from.
    pub listing: Option<String>,
    /// The instance type (size category).
    pub instance_type: Option<String>,
    /// CPUs and memory.
    pub cpus: Option<u32>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// Operating system.
    pub platform: Option<String>,
    /// Zone.
    pub zone: Option<String>,
    /// Shared or dedicated host.
    pub tenancy: String,
    /// When its term ends, if it does.
    pub until_ms: Option<UnixMillis>,
}

/// A slot as a cycle sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// The slot (its reservation's id, or its host's).
    pub id: Uuid,
    /// When its owner's hold of it ends (a term's end), if it does.
    pub until_ms: Option<UnixMillis>,
    /// Whether it is leaving the pool (taken back by its owner).
    pub leaving: bool,
}

/// A slot given to a request, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Allocation {
    /// The allocation.
    pub id: Uuid,
    /// The request it serves.
    pub request: Uuid,
    /// The request's user.
    pub user: String,
    /// The slot.
    pub slot: Uuid,
    /// Per slot-hour, until repriced.
    pub price: Price,
    /// From when the user holds the slot (later than when it was made while the slot's
    /// previous holder is under notice).
    pub from_ms: UnixMillis,
    /// When it ends, if known: the slot's term end, or the deadline of its notice.
    pub until_ms: Option<UnixMillis>,
    /// Whether it was given notice (it ends at `until_ms` and is kept no more).
    pub noticed: bool,
    /// Up to when it was charged.
    pub charged_to_ms: UnixMillis,
}

impl Allocation {
    /// Whether its user holds the slot at `now_ms`.
    pub fn holds_at(&self, now_ms: UnixMillis) -> bool {
        self.from_ms <= now_ms && self.until_ms.is_none_or(|u| u > now_ms)
    }
}

/// An allocation a cycle makes (the shell gives it an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    /// The request served.
    pub request: Uuid,
    /// Its user.
    pub user: String,
    /// The slot.
    pub slot: Uuid,
    /// Per slot-hour.
    pub price: Price,
    /// From when it holds the slot.
    pub from_ms: UnixMillis,
    /// The slot's term end, if any.
    pub until_ms: Option<UnixMillis>,
}

/// A stretch of an allocation charged to its user, in the pool's currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charged {
    /// The allocation.
    pub allocation: Uuid,
    /// Its request.
    pub request: Uuid,
    /// The user who pays.
    pub user: String,
    /// The slot.
    pub slot: Uuid,
    /// The stretch.
    pub from_ms: UnixMillis,
    /// Its end (the allocation is charged up to here).
    pub to_ms: UnixMillis,
    /// Per slot-hour.
    pub price: Price,
    /// What it costs ([`charge`]).
    pub amount: i64,
}

/// What one cycle of a pool reads.
#[derive(Debug, Clone, Copy)]
pub struct CycleInput<'a> {
    /// The bidding method.
    pub method: Method,
    /// The policy.
    pub policy: &'a Policy,
    /// The asking price (Dutch).
    pub asking: Price,
    /// Who may hold slots.
    pub members: Members<'a>,
    /// The pool's slots.
    pub slots: &'a [SlotState],
    /// The requests not cancelled.
    pub requests: &'a [Request],
    /// The allocations not over.
    pub allocations: &'a [Allocation],
    /// Each user's decayed usage.
    pub usage: &'a BTreeMap<String, f64>,
    /// Now.
    pub now_ms: UnixMillis,
    /// The pool's notice period.
    pub notice_ms: i64,
}

/// What one cycle decides ([`plan`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The admission and prices.
    pub cycle: Cycle,
    /// Allocations given notice, with their deadline.
    pub ended: Vec<(Uuid, UnixMillis)>,
    /// Allocations made.
    pub made: Vec<Made>,
    /// Allocations kept at a new price.
    pub repriced: Vec<(Uuid, Price)>,
    /// What each allocation owes since it was last charged (then charged up to
    /// `to_ms`; an amount of zero is not posted).
    pub charges: Vec<Charged>,
    /// The slots the cycle offered (in the pool, within their term, not leaving).
    pub offered: Vec<Uuid>,
}

/// One cycle of a pool (the rule of a cycle): first what each allocation owes up to
/// now at its price; then [`cycle`] over the slots still in the pool and within their
/// term, each request keeping (as held) the allocations not under notice; an
/// allocation the cycle no longer gives its request gets notice and ends after the
/// pool's notice period (or at its slot's term end, if sooner); a slot given to
/// another request is held by it from the previous holder's deadline, so two users
/// never hold one slot at once; kept allocations take the cycle's price.
///
/// A slot that could be held by nobody new is not offered: one kept whose term ends
/// within the notice period (the next holder would start at its end) stays with the
/// request keeping it while that request takes part, outside the cycle, not counted
/// against its count, its user's cap or an entity's lending limits; one nobody keeps
/// whose term ends by the deadline of its last holder's notice is given to nobody.
/// (Found by the seeded simulation `tests/pool_term.rs`.)
pub fn plan(input: CycleInput<'_>) -> Plan {
    let now = input.now_ms;
    let mut out = Plan::default();
    for a in input.allocations {
        // Never past its slot's end: a slot that ended takes what held it with it.
        let slot_end = input
            .slots
            .iter()
            .find(|s| s.id == a.slot)
            .and_then(|s| s.until_ms)
            .unwrap_or(i64::MAX);
        let end = a.until_ms.map_or(now, |u| u.min(now)).min(slot_end);
        let from = a.from_ms.max(a.charged_to_ms);
        if end > from {
            out.charges.push(Charged {
                allocation: a.id,
                request: a.request,
                user: a.user.clone(),
                slot: a.slot,
                from_ms: from,
                to_ms: end,
                price: a.price,
                amount: charge(a.price, from, end),
            });
        }
    }
    let kept = |a: &Allocation| !a.noticed && a.until_ms.is_none_or(|u| u > now);
    // A slot is offered while someone could still hold it: within its term, and,
    // when nobody keeps it, its term ending after the notice of whoever leaves it.
    let noticed_until = |slot: Uuid| {
        input
            .allocations
            .iter()
            .filter(|a| a.slot == slot && a.noticed)
            .filter_map(|a| a.until_ms)
            .max()
            .unwrap_or(now)
    };
    // A slot kept whose term ends within the notice period could be handed to nobody
    // (the next holder would start at its end): it stays with the request keeping it,
    // outside the cycle, while that request takes part; it is not counted against
    // the request's count nor its user's cap.
    let notice_end = now.saturating_add(input.notice_ms.max(0));
    let asking = input.asking.max(input.policy.minimum);
    let takes_part = |r: &Request| {
        input.members.admits(&r.user)
            && r.bid >= input.policy.minimum
            && input.policy.maximum.is_none_or(|m| r.bid <= m)
            && (!matches!(input.method, Method::Dutch { .. }) || r.bid >= asking)
    };
    let by_request: BTreeMap<Uuid, &Request> = input.requests.iter().map(|r| (r.id, r)).collect();
    let ending = |s: &SlotState| s.until_ms.is_some_and(|u| u <= notice_end);
    let mut carried: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    let mut frozen: BTreeSet<Uuid> = BTreeSet::new();
    for a in input.allocations.iter().filter(|a| kept(a)) {
        let Some(slot) = input.slots.iter().find(|s| s.id == a.slot) else {
            continue;
        };
        if slot.leaving || !ending(slot) || slot.until_ms.is_some_and(|u| u <= now) {
            continue;
        }
        frozen.insert(a.slot);
        if by_request.get(&a.request).is_some_and(|r| takes_part(r)) {
            carried.entry(a.request).or_default().push(a.slot);
        }
    }
    let live: BTreeMap<Uuid, &SlotState> = input
        .slots
        .iter()
        .filter(|s| !s.leaving && s.until_ms.is_none_or(|u| u > now))
        .filter(|s| !frozen.contains(&s.id))
        .filter(|s| {
            let kept_by_someone = input.allocations.iter().any(|a| a.slot == s.id && kept(a));
            kept_by_someone || s.until_ms.is_none_or(|u| u > noticed_until(s.id))
        })
        .map(|s| (s.id, s))
        .collect();
    let mut held: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
    for a in input.allocations.iter().filter(|a| kept(a)) {
        if live.contains_key(&a.slot) {
            held.entry(a.request).or_default().push(a.slot);
        }
    }
    // What each request still wants beyond what it carries.
    let wanting: Vec<Request> = input
        .requests
        .iter()
        .filter_map(|r| {
            let k = carried.get(&r.id).map_or(0, |c| c.len() as u32);
            (r.count > k).then(|| Request {
                count: r.count - k,
                ..r.clone()
            })
        })
        .collect();
    let slot_ids: Vec<Uuid> = live.keys().copied().collect();
    out.offered = slot_ids.clone();
    out.cycle = cycle(
        input.method,
        input.policy,
        input.asking,
        input.members,
        &slot_ids,
        &wanting,
        input.usage,
        &held,
    );
    for (request, slots) in &carried {
        let k = slots.len() as u32;
        out.cycle
            .admission
            .holds
            .entry(*request)
            .or_default()
            .extend(slots.iter().copied());
        let why = out.cycle.admission.why.get(request).cloned();
        out.cycle.admission.why.insert(
            *request,
            match why {
                Some(Why::PoolFull { rank, got, wanted }) => Why::PoolFull {
                    rank,
                    got: got + k,
                    wanted: wanted + k,
                },
                Some(Why::UserCap { cap, got, wanted }) => Why::UserCap {
                    cap,
                    got: got + k,
                    wanted: wanted + k,
                },
                Some(other) => other,
                // It wants nothing more: it holds all it asked for; its rank is
                // that of its bid among the requests taking part.
                None => Why::Holds {
                    rank: input
                        .requests
                        .iter()
                        .filter(|o| takes_part(o))
                        .filter(|o| {
                            (o.bid, Reverse(o.placed_at_ms))
                                > (
                                    by_request[request].bid,
                                    Reverse(by_request[request].placed_at_ms),
                                )
                        })
                        .count(),
                },
            },
        );
    }
    let holds = &out.cycle.admission.holds;
    let gives = |request: Uuid, slot: Uuid| holds.get(&request).is_some_and(|s| s.contains(&slot));
    // Until when each slot stays with a holder that is leaving it.
    let mut busy_until: BTreeMap<Uuid, UnixMillis> = BTreeMap::new();
    for a in input.allocations {
        let deadline = if kept(a) && !gives(a.request, a.slot) {
            let mut deadline = now.saturating_add(input.notice_ms.max(0));
            if let Some(u) = a.until_ms {
                deadline = deadline.min(u);
            }
            if let Some(u) = input
                .slots
                .iter()
                .find(|s| s.id == a.slot)
                .and_then(|s| s.until_ms)
            {
                deadline = deadline.min(u);
            }
            out.ended.push((a.id, deadline.max(now)));
            deadline.max(now)
        } else if a.noticed {
            a.until_ms.unwrap_or(now)
        } else {
            continue;
        };
        let e = busy_until.entry(a.slot).or_insert(deadline);
        *e = (*e).max(deadline);
    }
    for (request, slots) in holds {
        let priced = out.cycle.prices.get(request).copied();
        let price = priced.unwrap_or(input.policy.minimum);
        for slot in slots {
            let existing = input
                .allocations
                .iter()
                .find(|a| kept(a) && a.request == *request && a.slot == *slot);
            match existing {
                Some(a) if priced.is_some() && a.price != price => out.repriced.push((a.id, price)),
                Some(_) => {}
                None => out.made.push(Made {
                    request: *request,
                    user: by_request
                        .get(request)
                        .map(|r| r.user.clone())
                        .unwrap_or_default(),
                    slot: *slot,
                    price,
                    from_ms: busy_until.get(slot).copied().unwrap_or(now).max(now),
                    until_ms: live.get(slot).and_then(|s| s.until_ms),
                }),
            }
        }
    }
    // A slot handed on at a deadline at or after its term's end would never be held:
    // it is not given, and its request is told it is short by it.
    let (never, made): (Vec<Made>, Vec<Made>) = std::mem::take(&mut out.made)
        .into_iter()
        .partition(|m| m.until_ms.is_some_and(|u| m.from_ms >= u));
    out.made = made;
    for m in never {
        let holds = &mut out.cycle.admission.holds;
        if let Some(slots) = holds.get_mut(&m.request) {
            slots.retain(|s| *s != m.slot);
            if slots.is_empty() {
                holds.remove(&m.request);
            }
        }
        let got = holds.get(&m.request).map_or(0, |s| s.len() as u32);
        if let Some(why) = out.cycle.admission.why.get_mut(&m.request) {
            *why = match *why {
                Why::Holds { rank } | Why::PoolFull { rank, .. } => Why::PoolFull {
                    rank,
                    got,
                    wanted: by_request.get(&m.request).map_or(got, |r| r.count),
                },
                Why::UserCap { cap, wanted, .. } => Why::UserCap { cap, got, wanted },
                ref other => other.clone(),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn req(n: u128, user: &str, count: u32, bid: Price, at: i64) -> Request {
        Request {
            id: id(n),
            user: user.into(),
            count,
            bid,
            placed_at_ms: at,
        }
    }

    fn members(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    fn policy(preemptible: bool, cap: Option<u32>) -> Policy {
        Policy {
            minimum: 10,
            maximum: Some(100),
            cap_per_user: cap,
            preemptible,
        }
    }

    #[test]
    fn a_request_is_refused_when_made_by_rule() {
        let p = policy(false, None);
        let m = members(&["a"]);
        let cases = [
            ("a stranger", req(1, "x", 1, 20, 0), Some("not_member")),
            ("no slot", req(1, "a", 0, 20, 0), Some("count")),
            (
                "below the minimum",
                req(1, "a", 1, 9, 0),
                Some("below_minimum"),
            ),
            (
                "above the maximum",
                req(1, "a", 1, 101, 0),
                Some("above_maximum"),
            ),
            ("at the minimum", req(1, "a", 1, 10, 0), None),
        ];
        for (name, r, rule) in cases {
            assert_eq!(
                check_request(&p, &m, &r).err().map(|e| e.rule),
                rule,
                "{name}"
            );
        }
    }

    #[test]
    fn admission_table() {
        let m = members(&["a", "b", "c"]);
        let slots = [id(101), id(102)];
        let none: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
        let no_usage: BTreeMap<String, f64> = BTreeMap::new();
        // Higher bid first; at the same bid the lighter user.
        let usage: BTreeMap<String, f64> = [("a".to_owned(), 5.0), ("b".to_owned(), 1.0)].into();
        let got = admit(
            &policy(false, None),
            &m,
            &slots,
            &[
                req(1, "a", 1, 20, 0),
                req(2, "b", 1, 20, 5),
                req(3, "c", 1, 30, 9),
            ],
            &usage,
            &none,
        );
        assert_eq!(
            got.holds.get(&id(3)),
            Some(&vec![id(101)]),
            "the highest bid"
        );
        assert_eq!(
            got.holds.get(&id(2)),
            Some(&vec![id(102)]),
            "the lighter user"
        );
        assert_eq!(
            got.why[&id(1)],
            Why::PoolFull {
                rank: 2,
                got: 0,
                wanted: 1
            }
        );

        // Without preemption a holder keeps its slot against a higher bid.
        let held: BTreeMap<Uuid, Vec<Uuid>> = [(id(1), vec![id(101)])].into();
        let got = admit(
            &policy(false, None),
            &m,
            &slots[..1],
            &[req(1, "a", 1, 20, 0), req(2, "b", 1, 90, 5)],
            &no_usage,
            &held,
        );
        assert_eq!(got.holds.get(&id(1)), Some(&vec![id(101)]));
        assert!(matches!(got.why[&id(2)], Why::PoolFull { got: 0, .. }));

        // With preemption it loses it, and says to whom.
        let got = admit(
            &policy(true, None),
            &m,
            &slots[..1],
            &[req(1, "a", 1, 20, 0), req(2, "b", 1, 90, 5)],
            &no_usage,
            &held,
        );
        assert_eq!(got.holds.get(&id(2)), Some(&vec![id(101)]));
        assert_eq!(got.why[&id(1)], Why::Preempted { lost: 1, by: id(2) });

        // A user's requests together stay within the cap.
        let got = admit(
            &policy(false, Some(1)),
            &m,
            &slots,
            &[req(1, "a", 1, 50, 0), req(2, "a", 1, 40, 1)],
            &no_usage,
            &none,
        );
        assert_eq!(got.holds.len(), 1);
        assert_eq!(
            got.why[&id(2)],
            Why::UserCap {
                cap: 1,
                got: 0,
                wanted: 1
            }
        );

        // A request below the minimum, or a stranger's, takes no part.
        let got = admit(
            &policy(false, None),
            &m,
            &slots,
            &[req(1, "a", 1, 5, 0), req(2, "x", 1, 50, 0)],
            &no_usage,
            &none,
        );
        assert!(got.holds.is_empty() && got.why.is_empty());
    }

    #[test]
    fn usage_decays_by_half_lives() {
        assert_eq!(decay(8.0, 0, 1_000, 0.0), 8.0);
        assert_eq!(decay(8.0, 1_000, 1_000, 0.0), 4.0);
        assert_eq!(decay(8.0, 3_000, 1_000, 1.0), 2.0);
    }

    #[test]
    fn each_bidding_method_prices_its_holders() {
        let m = members(&["a", "b", "c"]);
        let slots = [id(101), id(102)];
        let none = BTreeMap::new();
        let usage = BTreeMap::new();
        let p = policy(true, None);
        let reqs = [
            req(1, "a", 1, 50, 0),
            req(2, "b", 1, 40, 1),
            req(3, "c", 1, 30, 2),
        ];
        // English: each pays its own bid.
        let c = cycle(
            Method::English,
            &p,
            10,
            Members::Single(&m),
            &slots,
            &reqs,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(1), 50), (id(2), 40)].into());
        // Spot: every holder pays the best bid left waiting.
        let c = cycle(
            Method::Spot,
            &p,
            10,
            Members::Single(&m),
            &slots,
            &reqs,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(1), 30), (id(2), 30)].into());
        // ... or the minimum when nobody waits.
        let c = cycle(
            Method::Spot,
            &p,
            10,
            Members::Single(&m),
            &slots,
            &reqs[..2],
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(1), 10), (id(2), 10)].into());
        // Dutch: only bids at or above the asking price take part, and pay it; a
        // request left waiting raises the next asking price.
        let dutch = Method::Dutch { step: 5 };
        let c = cycle(
            dutch,
            &p,
            45,
            Members::Single(&m),
            &slots,
            &reqs,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(1), 45)].into());
        assert!(
            !c.admission.why.contains_key(&id(2)),
            "40 < 45 takes no part"
        );
        assert_eq!(c.asking, 40, "a slot stayed free: the price falls");
        let c = cycle(
            dutch,
            &p,
            30,
            Members::Single(&m),
            &slots,
            &reqs,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(1), 30), (id(2), 30)].into());
        assert_eq!(c.asking, 35, "a request waits: the price rises");
        let c = cycle(
            dutch,
            &p,
            12,
            Members::Single(&m),
            &slots,
            &reqs[..1],
            &usage,
            &none,
        );
        assert_eq!(c.asking, 10, "never below the minimum");
        assert_eq!(opening_price(dutch, &p), 100);
        assert_eq!(opening_price(Method::Spot, &p), 10);
        // A fixed price: no bidding; the earlier request ranks first whatever it
        // bid, and pays the minimum.
        let late_and_high = [req(4, "a", 1, 90, 9), req(5, "b", 1, 15, 1)];
        let c = cycle(
            Method::English,
            &p,
            10,
            Members::Single(&m),
            &slots[..1],
            &late_and_high,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(4), 90)].into());
        let c = cycle(
            Method::Fixed,
            &p,
            10,
            Members::Single(&m),
            &slots[..1],
            &late_and_high,
            &usage,
            &none,
        );
        assert_eq!(c.prices, [(id(5), 10)].into());
        let fixed = Settings {
            request_type: RequestType::FixedPrice,
            policy: p.clone(),
            method: Method::English,
            currency: "LAB".into(),
            currency_kind: CurrencyKind::Credits,
            cycle_ms: 60_000,
            notice_ms: 0,
            half_life_ms: 1,
            max_users: 1,
            burst: None,
        };
        assert_eq!(fixed.method_in_force(), Method::Fixed);
    }

    #[test]
    fn an_english_bid_only_rises() {
        assert_eq!(
            check_rebid(Method::English, 20, 19).unwrap_err().rule,
            "ascending"
        );
        assert!(check_rebid(Method::English, 20, 21).is_ok());
        assert!(
            check_rebid(Method::Spot, 20, 5).is_ok(),
            "below the minimum is kept"
        );
        assert!(check_rebid(Method::Dutch { step: 1 }, 20, 5).is_ok());
    }

    #[test]
    fn charges_and_usage_follow_the_hours_held() {
        assert_eq!(charge(100, 0, 3_600_000), 100);
        assert_eq!(charge(100, 0, 1_800_000), 50);
        assert_eq!(charge(3, 0, 600_000), 1, "half up: 0.5");
        assert_eq!(charge(100, 10, 0), 0, "a stretch backwards costs nothing");
        let h = 3_600_000;
        // Two slot-hours ending now count 2; one ended a half-life ago counts half.
        assert!((usage_of(&[(0, 2 * h)], 2 * h, h) - 2.0).abs() < 1e-9);
        assert!((usage_of(&[(0, h)], 2 * h, h) - 0.5).abs() < 1e-9);
        // A stretch still running counts up to now.
        assert!((usage_of(&[(0, 10 * h)], h, h) - 1.0).abs() < 1e-9);
    }

    fn alloc(n: u128, request: u128, user: &str, slot: u128, price: Price) -> Allocation {
        Allocation {
            id: id(n),
            request: id(request),
            user: user.into(),
            slot: id(slot),
            price,
            from_ms: 0,
            until_ms: None,
            noticed: false,
            charged_to_ms: 0,
        }
    }

    fn slot(n: u128) -> SlotState {
        SlotState {
            id: id(n),
            until_ms: None,
            leaving: false,
        }
    }

    #[test]
    fn a_cycle_charges_gives_notice_and_hands_a_slot_on_at_the_deadline() {
        let h = 3_600_000;
        let m = members(&["a", "b"]);
        let p = policy(true, None);
        let slots = [slot(101)];
        let held = [alloc(7, 1, "a", 101, 20)];
        let reqs = [req(1, "a", 1, 20, 0), req(2, "b", 1, 90, 5)];
        let input = CycleInput {
            method: Method::English,
            policy: &p,
            asking: 10,
            members: Members::Single(&m),
            slots: &slots,
            requests: &reqs,
            allocations: &held,
            usage: &BTreeMap::new(),
            now_ms: h,
            notice_ms: 60_000,
        };
        let plan = plan(input);
        assert_eq!(plan.charges.len(), 1);
        assert_eq!((plan.charges[0].amount, plan.charges[0].to_ms), (20, h));
        assert_eq!(plan.ended, vec![(id(7), h + 60_000)], "a's notice");
        assert_eq!(plan.made.len(), 1);
        assert_eq!(
            (
                plan.made[0].request,
                plan.made[0].from_ms,
                plan.made[0].price
            ),
            (id(2), h + 60_000, 90),
            "b holds it from a's deadline, at its bid"
        );

        // A slot whose term ended, or that leaves, is given to nobody, and what held it
        // ends (at the term's end at the latest).
        let mut gone = slot(101);
        gone.until_ms = Some(h + 1000);
        let slots = [gone];
        let plan = super::plan(CycleInput {
            slots: &slots,
            requests: &reqs[..1],
            ..input
        });
        assert!(plan.ended.is_empty(), "kept until the term ends");
        let plan = super::plan(CycleInput {
            slots: &slots,
            requests: &reqs[..1],
            now_ms: h + 1000,
            ..input
        });
        assert_eq!(plan.ended, vec![(id(7), h + 1000)]);
        assert!(plan.made.is_empty());
        let mut leaving = slot(101);
        leaving.leaving = true;
        let plan = super::plan(CycleInput {
            slots: &[leaving],
            requests: &reqs[..1],
            ..input
        });
        assert_eq!(plan.ended, vec![(id(7), h + 60_000)]);

        // A request cancelled (gone from the requests) or whose user was removed
        // loses its slot with notice; a bid lowered below the minimum too.
        for (name, reqs, members) in [
            ("cancelled", vec![], m.clone()),
            ("removed", vec![req(1, "a", 1, 20, 0)], members(&["b"])),
            ("below the minimum", vec![req(1, "a", 1, 1, 0)], m.clone()),
        ] {
            let plan = super::plan(CycleInput {
                requests: &reqs,
                members: Members::Single(&members),
                ..input
            });
            assert_eq!(plan.ended, vec![(id(7), h + 60_000)], "{name}");
        }

        // Kept at the cycle's price (spot: the minimum when nobody waits).
        let plan = super::plan(CycleInput {
            method: Method::Spot,
            requests: &reqs[..1],
            ..input
        });
        assert_eq!(plan.repriced, vec![(id(7), 10)]);
        assert!(plan.ended.is_empty() && plan.made.is_empty());
    }

    #[test]
    fn a_slot_ending_within_the_notice_stays_with_its_holder() {
        let h = 3_600_000;
        let m = members(&["a", "b"]);
        let p = policy(true, None);
        let mut ending = slot(101);
        ending.until_ms = Some(2 * h);
        let slots = [ending, slot(102)];
        let held = [alloc(7, 1, "a", 101, 20)];
        // b outbids a, but a's slot ends within the notice: b gets the other one,
        // and a keeps its slot to the end of its term.
        let reqs = [req(1, "a", 1, 20, 0), req(2, "b", 1, 90, 5)];
        let input = CycleInput {
            method: Method::English,
            policy: &p,
            asking: 10,
            members: Members::Single(&m),
            slots: &slots,
            requests: &reqs,
            allocations: &held,
            usage: &BTreeMap::new(),
            now_ms: 2 * h - 600_000,
            notice_ms: 900_000,
        };
        let plan = plan(input);
        assert!(plan.ended.is_empty(), "{plan:?}");
        assert_eq!(
            plan.made
                .iter()
                .map(|m| (m.request, m.slot))
                .collect::<Vec<_>>(),
            [(id(2), id(102))]
        );
        assert_eq!(plan.cycle.admission.holds[&id(1)], [id(101)]);
        assert!(matches!(
            plan.cycle.admission.why[&id(1)],
            Why::Holds { .. }
        ));
        // With only that slot, b waits (and would burst) rather than being handed a
        // slot it could never hold.
        let plan = super::plan(CycleInput {
            slots: &slots[..1],
            ..input
        });
        assert!(plan.made.is_empty() && plan.ended.is_empty(), "{plan:?}");
        assert!(matches!(
            plan.cycle.admission.why[&id(2)],
            Why::PoolFull { got: 0, .. }
        ));
        // a's request gone: its allocation ends at the term, and nobody gets the slot.
        let plan = super::plan(CycleInput {
            slots: &slots[..1],
            requests: &reqs[1..],
            ..input
        });
        assert_eq!(plan.ended, [(id(7), 2 * h)]);
        assert!(plan.made.is_empty(), "{plan:?}");
    }

    /// Applies a plan to the stored allocations, as the store does.
    fn apply(allocations: &mut Vec<Allocation>, plan: &Plan, next_id: &mut u128) {
        for c in &plan.charges {
            if let Some(a) = allocations.iter_mut().find(|a| a.id == c.allocation) {
                a.charged_to_ms = c.to_ms;
            }
        }
        for (a, until) in &plan.ended {
            let a = allocations.iter_mut().find(|x| x.id == *a).unwrap();
            a.until_ms = Some(*until);
            a.noticed = true;
        }
        for (a, price) in &plan.repriced {
            allocations.iter_mut().find(|x| x.id == *a).unwrap().price = *price;
        }
        for m in &plan.made {
            *next_id += 1;
            allocations.push(Allocation {
                id: id(*next_id),
                request: m.request,
                user: m.user.clone(),
                slot: m.slot,
                price: m.price,
                from_ms: m.from_ms,
                until_ms: m.until_ms,
                noticed: false,
                charged_to_ms: m.from_ms,
            });
        }
    }

    proptest! {
        /// Over a run of cycles with requests coming and going: no two allocations of
        /// one slot overlap in time, only members hold slots, and every stretch held
        /// is charged exactly once at its price.
        #[test]
        fn cycles_never_give_a_slot_twice(
            steps in proptest::collection::vec(
                (0u128..6, 0u32..3, 0u64..120, any::<bool>()),
                1..30,
            ),
            preemptible: bool,
            method in 0u8..3,
        ) {
            let method = match method {
                0 => Method::English,
                1 => Method::Dutch { step: 7 },
                _ => Method::Spot,
            };
            let p = policy(preemptible, Some(2));
            let users = ["a", "b", "c"];
            let mut members = members(&users);
            let slots: Vec<SlotState> = (101..104).map(slot).collect();
            let mut requests: Vec<Request> = Vec::new();
            let mut allocations: Vec<Allocation> = Vec::new();
            let mut asking = opening_price(method, &p);
            let mut charged_ms: BTreeMap<Uuid, i64> = BTreeMap::new();
            let mut next_id = 1000;
            let step_ms = 600_000;
            for (n, (who, count, bid, cancel)) in steps.into_iter().enumerate() {
                let now = (n as i64 + 1) * step_ms;
                let user = users[(who % 3) as usize];
                if cancel {
                    requests.retain(|r| r.user != user);
                    if who == 5 {
                        members.remove(user);
                    }
                } else {
                    requests.push(req(who * 100 + n as u128, user, count, bid, now));
                }
                let live: Vec<Allocation> = allocations
                    .iter()
                    .filter(|a| a.until_ms.is_none_or(|u| u > a.charged_to_ms))
                    .cloned()
                    .collect();
                let plan = plan(CycleInput {
                    method,
                    policy: &p,
                    asking,
                    members: Members::Single(&members),
                    slots: &slots,
                    requests: &requests,
                    allocations: &live,
                    usage: &BTreeMap::new(),
                    now_ms: now,
                    notice_ms: 900_000,
                });
                for c in &plan.charges {
                    prop_assert_eq!(c.amount, charge(c.price, c.from_ms, c.to_ms));
                    *charged_ms.entry(c.allocation).or_default() += c.to_ms - c.from_ms;
                }
                for m in &plan.made {
                    prop_assert!(members.contains(&m.user), "{} is no member", m.user);
                }
                asking = plan.cycle.asking;
                apply(&mut allocations, &plan, &mut next_id);
                for (i, a) in allocations.iter().enumerate() {
                    for b in &allocations[i + 1..] {
                        if a.slot != b.slot {
                            continue;
                        }
                        let a_end = a.until_ms.unwrap_or(i64::MAX);
                        let b_end = b.until_ms.unwrap_or(i64::MAX);
                        prop_assert!(
                            a_end <= b.from_ms || b_end <= a.from_ms,
                            "slot {} held twice: {:?} and {:?}", a.slot, a, b
                        );
                    }
                }
            }
            // Every stretch held is charged once: what each allocation was charged for
            // is exactly from its start to where it was charged up to.
            for a in &allocations {
                let held = (a.charged_to_ms - a.from_ms).max(0);
                prop_assert_eq!(charged_ms.get(&a.id).copied().unwrap_or(0), held);
            }
        }
    }

    #[test]
    fn burst_table() {
        let p = BurstPolicy {
            max_price: 50,
            budget: 200,
        };
        let offer = |l: &str, price, available| MarketOffer {
            listing: l.into(),
            price,
            available,
        };
        let b = burst(None, 1, 1, 0, &[], &[offer("l", 10, 5)]);
        assert_eq!(b.short.map(|r| r.rule), Some("no_burst_policy"));
        // Own slots first, then the cheapest offer.
        let b = burst(
            Some(&p),
            3,
            2,
            0,
            &[id(7)],
            &[offer("dear", 40, 5), offer("cheap", 30, 1)],
        );
        assert_eq!(
            b.units,
            [
                Unit::Own { slot: id(7) },
                Unit::Market {
                    listing: "cheap".into(),
                    price: 30
                },
                Unit::Market {
                    listing: "dear".into(),
                    price: 40
                },
            ]
        );
        assert_eq!((b.cost, b.short), (140, None));
        // Never above the maximum price.
        let b = burst(Some(&p), 1, 1, 0, &[], &[offer("dear", 60, 5)]);
        assert!(b.units.is_empty());
        assert_eq!(b.short.map(|r| r.rule), Some("above_maximum_price"));
        // Never past the budget: 180 spent, a unit costs 30.
        let b = burst(Some(&p), 1, 1, 180, &[], &[offer("cheap", 30, 5)]);
        assert_eq!(b.short.map(|r| r.rule), Some("budget_spent"));
        // Nothing free.
        let b = burst(Some(&p), 2, 1, 0, &[], &[offer("cheap", 30, 1)]);
        assert_eq!(
            (b.units.len(), b.short.map(|r| r.rule)),
            (1, Some("no_capacity"))
        );
    }

    /// Requests, the pool's slots, what each request held, preemptible, the cap.
    type Scenario = (
        Vec<Request>,
        Vec<Uuid>,
        BTreeMap<Uuid, Vec<Uuid>>,
        bool,
        Option<u32>,
    );

    fn scenario() -> impl Strategy<Value = Scenario> {
        let requests = proptest::collection::vec((0usize..4, 0u32..4, 0u64..120, 0i64..5), 0..10);
        (
            requests,
            0usize..8,
            proptest::collection::vec((0usize..10, 0u128..10), 0..8),
            any::<bool>(),
            proptest::option::of(1u32..3),
        )
            .prop_map(|(rs, n_slots, held, preemptible, cap)| {
                let users = ["a", "b", "c", "x"];
                let requests: Vec<Request> = rs
                    .iter()
                    .enumerate()
                    .map(|(i, (u, count, bid, at))| {
                        req(i as u128 + 1, users[*u], *count, *bid, *at)
                    })
                    .collect();
                let slots: Vec<Uuid> = (0..n_slots).map(|s| id(100 + s as u128)).collect();
                let mut before: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
                let mut used = BTreeSet::new();
                for (r, s) in held {
                    if let Some(r) = requests.get(r) {
                        if used.insert(s) {
                            before.entry(r.id).or_default().push(id(100 + s));
                        }
                    }
                }
                (requests, slots, before, preemptible, cap)
            })
    }

    proptest! {
        /// A slot goes to one request at most, only members hold slots, nobody holds
        /// more than the cap or than it asked for, and without preemption a request
        /// still taking part keeps what it held (up to its count and the cap).
        #[test]
        fn admission_invariants((requests, slots, held, preemptible, cap) in scenario()) {
            let m = members(&["a", "b", "c"]);
            let p = Policy { minimum: 10, maximum: Some(100), cap_per_user: cap, preemptible };
            let out = admit(&p, &m, &slots, &requests, &BTreeMap::new(), &held);
            let mut seen = BTreeSet::new();
            let mut per_user: BTreeMap<&str, u32> = BTreeMap::new();
            for (r, got) in &out.holds {
                let r = requests.iter().find(|x| x.id == *r).unwrap();
                prop_assert!(m.contains(&r.user));
                prop_assert!(got.len() as u32 <= r.count);
                for s in got {
                    prop_assert!(slots.contains(s));
                    prop_assert!(seen.insert(*s), "slot {s} given twice");
                }
                *per_user.entry(r.user.as_str()).or_default() += got.len() as u32;
            }
            if let Some(cap) = cap {
                prop_assert!(per_user.values().all(|n| *n <= cap), "{per_user:?}");
            }
            if !preemptible && cap.is_none() {
                for r in requests.iter().filter(|r| check_request(&p, &m, r).is_ok()) {
                    let before: BTreeSet<Uuid> = held.get(&r.id).into_iter().flatten().filter(|s| slots.contains(s)).copied().collect();
                    let now: BTreeSet<Uuid> = out.holds.get(&r.id).into_iter().flatten().copied().collect();
                    let kept = before.intersection(&now).count();
                    prop_assert!(kept >= before.len().min(r.count as usize), "{r:?} lost slots");
                }
            }
        }

        /// A burst never pays above the maximum price and never passes the budget.
        #[test]
        fn bursts_stay_within_price_and_budget(
            max_price in 0u64..100,
            budget in 0u64..1_000,
            spent in 0u64..1_000,
            wanted in 0u32..10,
            hours in 1u32..5,
            offers in proptest::collection::vec((0u64..150, 0u32..4), 0..6),
        ) {
            let p = BurstPolicy { max_price, budget };
            let offers: Vec<MarketOffer> = offers.iter().enumerate().map(|(i, (price, available))| MarketOffer { listing: format!("l{i}"), price: *price, available: *available }).collect();
            let b = burst(Some(&p), wanted, hours, spent.min(budget), &[], &offers);
            prop_assert!(b.units.len() <= wanted as usize);
            prop_assert!(spent.min(budget) + b.cost <= budget);
            for u in &b.units {
                if let Unit::Market { price, .. } = u {
                    prop_assert!(*price <= max_price);
                }
            }
        }
    }
}
