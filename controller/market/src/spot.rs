//! The spot market (issue 16): per resource class, bids with a maximum price and a
//! quantity, cleared on a period and on demand at one uniform price.
//!
//! Owns: whether a bid may be made ([`check_bid`]), which bids a class's capacity goes
//! to and the one price they all pay ([`clear`], with the naive [`reference`](mod@reference) that
//! gives the same answer), which allocations a clearing takes away
//! ([`interruptions`]), and when the market clears ([`SpotMarket`]). Must not: read a
//! clock, keep a timer, draw a random number or touch a store. Time is an argument;
//! the shell stores [`SpotMarket`] as rows and claims each due clearing with a
//! conditional update on [`SpotMarket::next_clearing_at_ms`], so several controller
//! replicas clear a market once.
//!
//! # Classes
//!
//! A class is a string key (a resource class in a zone, such as `"medium/eu-1a"`) with
//! its [`Supply`]: a capacity in units and the provider's minimum price. Prices are
//! [`Price`]s, minor units per unit-hour. Classes clear independently of each other;
//! a bid names one class.
//!
//! # Rules
//!
//! 1. **Refused when made.** [`check_bid`] refuses a bid in a class that is not
//!    offered (`unknown_class`), a bid for no units (`quantity`), a bid whose maximum
//!    is below the provider minimum (`minimum`, naming both prices: the minimum is
//!    enforced when the bid is made, not at the clearing), and an all-or-nothing bid
//!    for more units than the class's whole capacity (`all_or_nothing`: it could
//!    never be filled, yet it would set the price by rule 5 and keep every cheaper bid
//!    out at no cost to its bidder).
//! 2. **Who takes part.** A clearing takes the supplies and bids as they are then. A
//!    bid takes part in its class's clearing when it would pass [`check_bid`] against
//!    the class's supply at that moment. One that would not (the provider raised its
//!    minimum or cut its capacity after the bid was made, or the class is no longer
//!    offered) neither wins nor sets the price; it is not removed, and takes part
//!    again once it passes. When `supplies` names a class twice, the first counts.
//!    Bid ids are unique (the market refuses a second bid with an id it holds).
//! 3. **Rank.** Bids are ranked by maximum price, highest first; ties go to the
//!    earlier bid (`placed_at_ms`), then to the lower bid id. The rank is total, so the
//!    order bids are given in never matters.
//! 4. **Fill.** Walking the ranking with the capacity left, a bid whose quantity fits
//!    is filled whole. The first bid that does not fit is the *marginal bid*: if it may
//!    be filled in part it gets whatever capacity is left (possibly nothing, when the
//!    capacity ran out exactly before it), and the capacity is then used up; if it is
//!    all-or-nothing it gets nothing and the capacity left stays left.
//! 5. **Price.** The uniform price is the marginal bid's maximum, or the provider
//!    minimum when there is no marginal bid (every bid taking part was filled whole:
//!    supply meets demand). The marginal bid is the highest losing bid: every bid
//!    ranked before it was filled whole and every bid after it has a maximum no higher,
//!    so this is the issue's "highest losing bid or the provider minimum, whichever is
//!    higher" (a bid taking part is never below the minimum). A bid filled in part
//!    counts as losing for the rest of its quantity, so it pays its own maximum. Every
//!    winner pays the price, which is never above its maximum.
//! 6. **After the marginal bid.** The walk goes on only among bids that can pay the
//!    price, i.e. those tied with the marginal bid's maximum (ranked later by time or
//!    id), by rule 4 again: whole if they fit, in part if they may, otherwise nothing.
//!    This matters only after an all-or-nothing marginal bid, which leaves capacity:
//!    a smaller bid *at the same price* may still take it, a *cheaper* bid may not,
//!    and the capacity stays unsold when no tied bid takes it (see below why).
//! 7. **Edge cases.** No bids, or supply exceeding demand: everything is filled and
//!    the price is the minimum. Zero capacity: nothing is allocated, and the price is
//!    still the rule's (the best bid that may be filled in part, or the minimum) — a
//!    record of unmet demand at which nothing is charged. An all-or-nothing bid that
//!    fits exactly is filled whole and sets nothing.
//! 8. **Interruption** ([`interruptions`]). Every clearing allocates from scratch. An
//!    allocation of the previous clearing whose bid is still live and gets less now is
//!    interrupted: `price_above_max` when the new price is above the bid's maximum,
//!    `class_withdrawn` when its class is no longer offered, `outbid` otherwise
//!    (better-ranked bids took the capacity, or it shrank). A cancelled bid's
//!    allocation ends by its holder's own act and is not an interruption.
//! 9. **When** ([`SpotMarket`]). A market clears every `period_ms` (default
//!    [`DEFAULT_PERIOD_MS`], 10 s) and on demand ([`SpotMarket::request_clearing`]).
//!    A clearing polled late clears once and skips the periods it missed; an on-demand
//!    clearing leaves the periodic schedule as it was.
//!
//! 10. **Hosts** ([`assign`]). A unit is one host; the shell holds a bid's units as
//!     reservations. After a clearing, a bid holding more hosts than it was allocated
//!     (counting only those not already under notice) gives notice on the surplus,
//!     the most recently started first (then the higher reservation id), for the
//!     rule 8 reason ([`reason`]); a notice is never withdrawn. A bid allocated more
//!     than it holds gets free hosts, in the allocations' rank and the hosts' id
//!     order, as many as there are: a host under notice is still its holder's until
//!     the grace ends, so the bid that took its capacity gets it at the first
//!     clearing after that. A bid that is no longer live holds nothing (its holder
//!     released its hosts when it cancelled).
//!
//! # Why cheaper bids lose after an all-or-nothing marginal bid
//!
//! Filling them instead (and lowering the price to the cheapest winner so that nobody
//! pays above its maximum) would let one added bid lower the price. With capacity 10,
//! bids A (100, 10 units, all-or-nothing), L (60, 5 units), M (40, 1 unit): A is filled
//! and the price is 60, L's. Add X (200, 1 unit): X is filled and A no longer fits. If
//! L and M were filled, M would win at 40 and the price would have fallen from 60 with
//! more demand. Under rule 6 A is the marginal bid, the price is 100, X alone wins and
//! 9 units stay unsold. The price depends only on the ranking, the quantities and the
//! capacity — the maximum of the first bid at which the running total of quantities
//! passes the capacity — so adding a bid only moves that point earlier in the ranking,
//! to a bid with a maximum at least as high: the price never falls when demand is
//! added. The cost is capacity left unsold behind an all-or-nothing bid that does not
//! fit; rule 1 bounds it, since a bid that can never fit is refused.
//!
//! # Invariants (checked by property tests)
//!
//! The units allocated in a class never exceed its capacity; an all-or-nothing bid is
//! filled whole or not at all; every winner's maximum is at least the price, and the
//! price at least the minimum; with supply fixed the price never falls when a bid is
//! added; the order of the bids given never matters; [`clear`] and
//! [`reference::clear_naive`] give the same clearing.
//!
//! # Cost
//!
//! [`clear`] sorts the bids once (by class, then rank): O(n log n) for n bids, plus
//! O(k log k) for k classes. [`reference::clear_naive`] picks the best remaining bid of
//! a class by a scan each time: O(n²) within a class.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use crate::Refusal;
use crate::refuse;

/// A price: minor units of the market's currency per unit-hour.
pub type Price = u64;

/// The default time between two periodic clearings of a market: 10 s.
pub const DEFAULT_PERIOD_MS: i64 = 10_000;

/// One bid for capacity in one class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bid {
    /// The bid's id (unique; the last tie-break: the lower id ranks first).
    pub id: Uuid,
    /// The class it bids in.
    pub class: String,
    /// The client who bids.
    pub client: String,
    /// The most it pays per unit-hour.
    pub max_price: Price,
    /// How many units it wants.
    pub quantity: u32,
    /// Filled whole or not at all (`false`: it may be filled in part).
    pub all_or_nothing: bool,
    /// When the market received it (the first tie-break: the earlier bid ranks first).
    pub placed_at_ms: UnixMillis,
}

/// What a provider offers in one class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Supply {
    /// The class.
    pub class: String,
    /// Units offered.
    pub capacity: u32,
    /// The provider minimum: no bid below it is taken, and no price is below it.
    pub minimum: Price,
}

/// Units of one class given to one bid by a clearing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Allocation {
    /// The bid.
    pub bid: Uuid,
    /// Units given (at least one; the bid's whole quantity unless it was the marginal
    /// bid or tied with it).
    pub quantity: u32,
    /// The bid's maximum (so that a later clearing can say why it was interrupted).
    pub max_price: Price,
}

/// The outcome of one class's clearing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassClearing {
    /// The class.
    pub class: String,
    /// Its capacity at the clearing.
    pub capacity: u32,
    /// Its provider minimum at the clearing.
    pub minimum: Price,
    /// The uniform price every allocation pays (rule 5).
    pub price: Price,
    /// The marginal bid, whose maximum is the price; `None` when every bid taking part
    /// was filled whole and the price is the minimum.
    pub marginal: Option<Uuid>,
    /// The allocations, in the bids' rank.
    pub allocations: Vec<Allocation>,
}

impl ClassClearing {
    /// Units allocated in all.
    pub fn allocated(&self) -> u64 {
        self.allocations.iter().map(|a| u64::from(a.quantity)).sum()
    }
}

/// The outcome of one clearing: one entry per offered class, in class order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Clearing {
    /// Each offered class's outcome, sorted by class key.
    pub classes: Vec<ClassClearing>,
}

impl Clearing {
    /// The outcome of `class`, if it was offered.
    pub fn class(&self, class: &str) -> Option<&ClassClearing> {
        self.classes
            .binary_search_by(|c| c.class.as_str().cmp(class))
            .ok()
            .map(|i| &self.classes[i])
    }
}

/// Why an allocation was taken away (rule 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InterruptReason {
    /// The new price is above the bid's maximum.
    PriceAboveMax,
    /// The price is within the bid's maximum, but better-ranked bids took the capacity
    /// or the capacity shrank.
    Outbid,
    /// The class is no longer offered.
    ClassWithdrawn,
}

/// An allocation that a clearing took away in whole or in part; the shell sends its
/// notice with the grace the listing promised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Interruption {
    /// The class.
    pub class: String,
    /// The bid whose allocation shrank.
    pub bid: Uuid,
    /// Units it held after the previous clearing.
    pub held: u32,
    /// Units it keeps (fewer than `held`; zero when it lost everything).
    pub kept: u32,
    /// Why.
    pub reason: InterruptReason,
    /// The class's new price (`None` when it is no longer offered).
    pub price: Option<Price>,
    /// The bid's maximum.
    pub max_price: Price,
}

/// Whether `bid` may be made against `supply`, its class's supply (`None`, or a supply
/// of another class: the class is not offered). Rule 1; rule 2 applies the same check
/// at every clearing.
pub fn check_bid(bid: &Bid, supply: Option<&Supply>) -> Result<(), Refusal> {
    let Some(supply) = supply.filter(|s| s.class == bid.class) else {
        return Err(refuse(
            "unknown_class",
            format!("no capacity is offered in class {}", bid.class),
        ));
    };
    if bid.quantity == 0 {
        return Err(refuse("quantity", "a bid must be for at least one unit"));
    }
    if bid.max_price < supply.minimum {
        return Err(refuse(
            "minimum",
            format!(
                "the maximum price {} is below the provider minimum {} in class {}",
                bid.max_price, supply.minimum, supply.class
            ),
        ));
    }
    if bid.all_or_nothing && bid.quantity > supply.capacity {
        return Err(refuse(
            "all_or_nothing",
            format!(
                "an all-or-nothing bid for {} units can never be filled from the capacity of {} in class {}",
                bid.quantity, supply.capacity, supply.class
            ),
        ));
    }
    Ok(())
}

/// Rule 2: whether `bid` takes part in the clearing of `supply`'s class.
fn takes_part(bid: &Bid, supply: &Supply) -> bool {
    check_bid(bid, Some(supply)).is_ok()
}

/// The offered classes, sorted by key, the first supply of a class counting.
fn offered(supplies: &[Supply]) -> Vec<&Supply> {
    let mut classes: Vec<&Supply> = supplies.iter().collect();
    classes.sort_by(|a, b| a.class.cmp(&b.class)); // stable: the first stays first
    classes.dedup_by(|later, first| later.class == first.class);
    classes
}

/// Rules 4 to 6 over one class's bids, given in rank order.
fn fill<'a>(supply: &Supply, ranked: impl IntoIterator<Item = &'a Bid>) -> ClassClearing {
    let mut left = supply.capacity;
    let mut marginal: Option<&Bid> = None;
    let mut allocations = Vec::new();
    for bid in ranked {
        if let Some(m) = marginal {
            if left == 0 || bid.max_price < m.max_price {
                break;
            }
        }
        if bid.quantity <= left {
            left -= bid.quantity;
            allocations.push(allocation(bid, bid.quantity));
            continue;
        }
        marginal = marginal.or(Some(bid));
        if !bid.all_or_nothing && left > 0 {
            allocations.push(allocation(bid, left));
            left = 0;
        }
    }
    ClassClearing {
        class: supply.class.clone(),
        capacity: supply.capacity,
        minimum: supply.minimum,
        price: marginal.map_or(supply.minimum, |m| m.max_price.max(supply.minimum)),
        marginal: marginal.map(|m| m.id),
        allocations,
    }
}

fn allocation(bid: &Bid, quantity: u32) -> Allocation {
    Allocation {
        bid: bid.id,
        quantity,
        max_price: bid.max_price,
    }
}

/// Clears every offered class of `supplies` against `bids` by the rules of the module
/// doc: one [`ClassClearing`] per offered class (with or without bids), sorted by
/// class. Bids in classes not offered take no part. Sorts the bids once: O(n log n).
pub fn clear(supplies: &[Supply], bids: &[Bid]) -> Clearing {
    let classes = offered(supplies);
    let position: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, s)| (s.class.as_str(), i))
        .collect();
    // (class position, rank key, index in `bids`): one sort groups by class and ranks.
    let mut ranked: Vec<(usize, Reverse<Price>, UnixMillis, u128, usize)> = bids
        .iter()
        .enumerate()
        .filter_map(|(i, bid)| {
            let class = *position.get(bid.class.as_str())?;
            takes_part(bid, classes[class]).then_some((
                class,
                Reverse(bid.max_price),
                bid.placed_at_ms,
                bid.id.as_u128(), // big-endian: orders as `Uuid` does
                i,
            ))
        })
        .collect();
    ranked.sort_unstable();
    let mut rest = &ranked[..];
    let classes = classes
        .iter()
        .enumerate()
        .map(|(class, supply)| {
            let (mine, tail) = rest.split_at(rest.partition_point(|key| key.0 == class));
            rest = tail;
            fill(supply, mine.iter().map(|key| &bids[key.4]))
        })
        .collect();
    Clearing { classes }
}

/// The same rule as [`clear`], written to be obviously right rather than fast: for the
/// property test that proves [`clear`] equal to it and for the benchmark that measures
/// the two side by side.
pub mod reference {
    use std::collections::BTreeMap;

    use super::{Bid, ClassClearing, Clearing, Supply, allocation, takes_part};

    /// Whether `a` ranks before `b`: the higher maximum, then the earlier bid, then the
    /// lower id.
    fn ranks_before(a: &Bid, b: &Bid) -> bool {
        if a.max_price != b.max_price {
            return a.max_price > b.max_price;
        }
        if a.placed_at_ms != b.placed_at_ms {
            return a.placed_at_ms < b.placed_at_ms;
        }
        a.id < b.id
    }

    /// Clears each class by taking its best remaining bid, one at a time, and applying
    /// the rules to it: O(n²) within a class.
    pub fn clear_naive(supplies: &[Supply], bids: &[Bid]) -> Clearing {
        let mut offered: BTreeMap<&str, &Supply> = BTreeMap::new();
        for supply in supplies {
            offered.entry(supply.class.as_str()).or_insert(supply);
        }
        let mut by_class: BTreeMap<&str, Vec<&Bid>> = BTreeMap::new();
        for bid in bids {
            by_class.entry(bid.class.as_str()).or_default().push(bid);
        }
        let classes = offered
            .into_iter()
            .map(|(class, supply)| {
                let mut waiting: Vec<&Bid> = by_class
                    .remove(class)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|bid| takes_part(bid, supply))
                    .collect();
                let mut left = supply.capacity;
                let mut marginal: Option<&Bid> = None;
                let mut allocations = Vec::new();
                while !waiting.is_empty() {
                    let mut best = 0;
                    for i in 1..waiting.len() {
                        if ranks_before(waiting[i], waiting[best]) {
                            best = i;
                        }
                    }
                    let bid = waiting.remove(best);
                    let can_pay = marginal.is_none_or(|m| bid.max_price >= m.max_price);
                    if !can_pay {
                        continue;
                    }
                    if bid.quantity <= left {
                        allocations.push(allocation(bid, bid.quantity));
                        left -= bid.quantity;
                    } else {
                        if marginal.is_none() {
                            marginal = Some(bid);
                        }
                        if !bid.all_or_nothing && left > 0 {
                            allocations.push(allocation(bid, left));
                            left = 0;
                        }
                    }
                }
                let price = match marginal {
                    Some(m) => m.max_price.max(supply.minimum),
                    None => supply.minimum,
                };
                ClassClearing {
                    class: supply.class.clone(),
                    capacity: supply.capacity,
                    minimum: supply.minimum,
                    price,
                    marginal: marginal.map(|m| m.id),
                    allocations,
                }
            })
            .collect();
        Clearing { classes }
    }
}

/// The allocations of `previous` that `next` takes away in whole or in part (rule 8),
/// in `previous`'s order. `live` are the bids that took part in `next`; an allocation
/// of a bid not among them was cancelled by its holder and is not an interruption.
pub fn interruptions(previous: &Clearing, next: &Clearing, live: &[Bid]) -> Vec<Interruption> {
    let live: HashSet<Uuid> = live.iter().map(|b| b.id).collect();
    let kept: HashMap<Uuid, u32> = next
        .classes
        .iter()
        .flat_map(|c| c.allocations.iter().map(|a| (a.bid, a.quantity)))
        .collect();
    let mut out = Vec::new();
    for class in &previous.classes {
        let after = next.class(&class.class);
        for held in class.allocations.iter().filter(|a| live.contains(&a.bid)) {
            let now = kept.get(&held.bid).copied().unwrap_or(0);
            if now >= held.quantity {
                continue;
            }
            let reason = match after {
                None => InterruptReason::ClassWithdrawn,
                Some(c) if c.price > held.max_price => InterruptReason::PriceAboveMax,
                Some(_) => InterruptReason::Outbid,
            };
            out.push(Interruption {
                class: class.class.clone(),
                bid: held.bid,
                held: held.quantity,
                kept: now,
                reason,
                price: after.map(|c| c.price),
                max_price: held.max_price,
            });
        }
    }
    out
}

/// One host a bid holds, as the shell's reservation of it (rule 10).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The reservation.
    pub reservation: Uuid,
    /// The bid it was given to.
    pub bid: Uuid,
    /// When it started.
    pub started_at_ms: UnixMillis,
    /// Whether it is under notice already (it counts for nothing then).
    pub noticed: bool,
}

/// What a clearing does to the hosts of its class (rule 10).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Assignment {
    /// Reservations to give notice, with why.
    pub notices: Vec<(Uuid, InterruptReason)>,
    /// Free hosts given to each bid, in the allocations' rank.
    pub fills: Vec<(Uuid, Vec<Uuid>)>,
}

/// Why a bid holding more than `class` allocates it loses the rest (rule 8): its
/// maximum below the new price, else outbid.
pub fn reason(class: &ClassClearing, max_price: Price) -> InterruptReason {
    if class.price > max_price {
        InterruptReason::PriceAboveMax
    } else {
        InterruptReason::Outbid
    }
}

/// The hosts a clearing takes and gives (rule 10): `class` is the clearing of the
/// class, `bids` its live bids, `held` the reservations its bids hold, `free` the
/// class's hosts nobody holds.
pub fn assign(class: &ClassClearing, bids: &[Bid], held: &[Held], free: &[Uuid]) -> Assignment {
    let allocated: HashMap<Uuid, u32> = class
        .allocations
        .iter()
        .map(|a| (a.bid, a.quantity))
        .collect();
    let max: HashMap<Uuid, Price> = bids.iter().map(|b| (b.id, b.max_price)).collect();
    let mut holding: HashMap<Uuid, Vec<&Held>> = HashMap::new();
    for h in held
        .iter()
        .filter(|h| !h.noticed && max.contains_key(&h.bid))
    {
        holding.entry(h.bid).or_default().push(h);
    }
    let mut out = Assignment::default();
    let mut surplus: Vec<(Uuid, Vec<&Held>)> = holding.into_iter().collect();
    surplus.sort_by_key(|(bid, _)| *bid);
    let mut count: HashMap<Uuid, u32> = HashMap::new();
    for (bid, mut hs) in surplus {
        let keep = allocated.get(&bid).copied().unwrap_or(0) as usize;
        count.insert(bid, hs.len().min(keep) as u32);
        if hs.len() <= keep {
            continue;
        }
        // The newest go first; the earliest keep their hosts.
        hs.sort_by_key(|h| (Reverse(h.started_at_ms), Reverse(h.reservation)));
        let why = reason(class, max[&bid]);
        for h in &hs[..hs.len() - keep] {
            out.notices.push((h.reservation, why));
        }
    }
    out.notices.sort_by_key(|(id, _)| *id);
    let mut free = {
        let mut f: Vec<Uuid> = free.to_vec();
        f.sort();
        f.dedup();
        f.into_iter()
    };
    for a in &class.allocations {
        let have = count.get(&a.bid).copied().unwrap_or(0);
        let want = a.quantity.saturating_sub(have) as usize;
        let hosts: Vec<Uuid> = free.by_ref().take(want).collect();
        if !hosts.is_empty() {
            out.fills.push((a.bid, hosts));
        }
    }
    out
}

/// What one clearing of a [`SpotMarket`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cleared {
    /// When it cleared.
    pub at_ms: UnixMillis,
    /// It was asked for ([`SpotMarket::request_clearing`]) rather than due by the period.
    pub on_demand: bool,
    /// Each class's price and allocations.
    pub clearing: Clearing,
    /// The allocations of the previous clearing it took away.
    pub interruptions: Vec<Interruption>,
}

/// A spot market over time in the engine shape of `docs/ARCHITECTURE.md`: supplies,
/// bids and cancellations come in through `handle_*`, a due clearing comes out of
/// [`SpotMarket::poll_clearing`], and [`SpotMarket::next_deadline`] says when to poll.
/// Whole in its fields, so the shell stores it as rows and rebuilds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotMarket {
    /// Time between periodic clearings (at least 1 ms).
    pub period_ms: i64,
    /// When the next periodic clearing is due.
    pub next_clearing_at_ms: UnixMillis,
    /// When a clearing on demand was asked for, if one is pending.
    pub requested_at_ms: Option<UnixMillis>,
    /// Each offered class's supply, sorted by class.
    pub supplies: Vec<Supply>,
    /// The live bids, in arrival order.
    pub bids: Vec<Bid>,
    /// The last clearing, against which the next one's interruptions are found.
    pub last: Option<Clearing>,
}

impl SpotMarket {
    /// A market opened at `now_ms` that clears every `period_ms` (a period below 1 ms
    /// is taken as 1 ms), first at `now_ms + period_ms`.
    pub fn new(period_ms: i64, now_ms: UnixMillis) -> Self {
        let period_ms = period_ms.max(1);
        Self {
            period_ms,
            next_clearing_at_ms: now_ms.saturating_add(period_ms),
            requested_at_ms: None,
            supplies: Vec::new(),
            bids: Vec::new(),
            last: None,
        }
    }

    /// The supply of `class`, if it is offered.
    pub fn supply(&self, class: &str) -> Option<&Supply> {
        self.supplies
            .binary_search_by(|s| s.class.as_str().cmp(class))
            .ok()
            .map(|i| &self.supplies[i])
    }

    /// Offers `supply` (or replaces its class's capacity and minimum). Bids already
    /// made stay; one that no longer passes [`check_bid`] takes no part until it does
    /// (rule 2). Capacity zero keeps the class offered with nothing to sell.
    pub fn handle_supply(&mut self, supply: Supply) {
        match self
            .supplies
            .binary_search_by(|s| s.class.cmp(&supply.class))
        {
            Ok(i) => self.supplies[i] = supply,
            Err(i) => self.supplies.insert(i, supply),
        }
    }

    /// Takes `bid`, made at `now_ms`: its `placed_at_ms` becomes `now_ms` (the order of
    /// arrival breaks ties). Refused by [`check_bid`] against its class's supply, or as
    /// a `duplicate` when the market holds a bid with its id.
    pub fn handle_bid(&mut self, now_ms: UnixMillis, mut bid: Bid) -> Result<(), Refusal> {
        if self.bids.iter().any(|b| b.id == bid.id) {
            return Err(refuse(
                "duplicate",
                format!("bid {} exists already", bid.id),
            ));
        }
        check_bid(&bid, self.supply(&bid.class))?;
        bid.placed_at_ms = now_ms;
        self.bids.push(bid);
        Ok(())
    }

    /// Withdraws the bid `id` and hands it back; its allocation, if any, ends by the
    /// holder's act (not an interruption). Refused as `unknown_bid` when it is not live.
    pub fn handle_cancel(&mut self, id: Uuid) -> Result<Bid, Refusal> {
        let i = self
            .bids
            .iter()
            .position(|b| b.id == id)
            .ok_or_else(|| refuse("unknown_bid", format!("bid {id} is not live")))?;
        Ok(self.bids.remove(i))
    }

    /// Asks for a clearing on demand at `now_ms` (the earliest request counts).
    pub fn request_clearing(&mut self, now_ms: UnixMillis) {
        self.requested_at_ms = Some(self.requested_at_ms.map_or(now_ms, |t| t.min(now_ms)));
    }

    /// When [`SpotMarket::poll_clearing`] is next due: the periodic clearing, or a
    /// requested one if earlier.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        Some(self.requested_at_ms.map_or(self.next_clearing_at_ms, |t| {
            t.min(self.next_clearing_at_ms)
        }))
    }

    /// Clears the market at `now_ms` if a clearing is due (the period came, or one was
    /// requested); `None` otherwise. A late poll clears once and schedules the next
    /// periodic clearing for the first period boundary after `now_ms`.
    pub fn poll_clearing(&mut self, now_ms: UnixMillis) -> Option<Cleared> {
        let periodic = now_ms >= self.next_clearing_at_ms;
        let requested = self.requested_at_ms.is_some_and(|t| now_ms >= t);
        if !periodic && !requested {
            return None;
        }
        if periodic {
            let period = self.period_ms.max(1);
            let missed = now_ms.saturating_sub(self.next_clearing_at_ms) / period;
            self.next_clearing_at_ms = self
                .next_clearing_at_ms
                .saturating_add(period.saturating_mul(missed.saturating_add(1)));
        }
        self.requested_at_ms = None;
        let clearing = clear(&self.supplies, &self.bids);
        let interruptions = self
            .last
            .as_ref()
            .map(|last| interruptions(last, &clearing, &self.bids))
            .unwrap_or_default();
        self.last = Some(clearing.clone());
        Some(Cleared {
            at_ms: now_ms,
            on_demand: !periodic,
            clearing,
            interruptions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Bid `n` in class `c`: (maximum, quantity, all-or-nothing, placed at).
    fn bid(n: u128, max_price: Price, quantity: u32, aon: bool, at: UnixMillis) -> Bid {
        Bid {
            id: id(n),
            class: "c".into(),
            client: format!("client-{n}"),
            max_price,
            quantity,
            all_or_nothing: aon,
            placed_at_ms: at,
        }
    }

    fn supply(class: &str, capacity: u32, minimum: Price) -> Supply {
        Supply {
            class: class.into(),
            capacity,
            minimum,
        }
    }

    /// Clears class `c` both ways, checks the two agree, and returns its price and
    /// allocations as (bid number, units).
    fn check(capacity: u32, minimum: Price, bids: &[Bid]) -> (Price, Vec<(u128, u32)>) {
        let supplies = [supply("c", capacity, minimum)];
        let fast = clear(&supplies, bids);
        assert_eq!(fast, reference::clear_naive(&supplies, bids));
        let c = fast.class("c").expect("class c is offered");
        let allocations = c
            .allocations
            .iter()
            .map(|a| (a.bid.as_u128(), a.quantity))
            .collect();
        (c.price, allocations)
    }

    /// Each case: (rule it pins, capacity, minimum, bids, price, allocations as (bid,
    /// units) in rank order).
    #[test]
    fn a_class_clears_by_the_rules() {
        type Case = (&'static str, u32, Price, Vec<Bid>, Price, Vec<(u128, u32)>);
        let cases: Vec<Case> = vec![
            (
                "the highest bids win, in rank order",
                3,
                10,
                vec![
                    bid(1, 50, 1, false, 0),
                    bid(2, 70, 1, false, 0),
                    bid(3, 60, 1, false, 0),
                    bid(4, 40, 1, false, 0),
                ],
                40,
                vec![(2, 1), (3, 1), (1, 1)],
            ),
            (
                "the price is the highest losing bid",
                2,
                10,
                vec![
                    bid(1, 90, 1, false, 0),
                    bid(2, 80, 1, false, 0),
                    bid(3, 60, 1, false, 0),
                    bid(4, 70, 1, false, 0),
                ],
                70,
                vec![(1, 1), (2, 1)],
            ),
            (
                "the price is the minimum when supply exceeds demand",
                10,
                25,
                vec![bid(1, 90, 3, false, 0), bid(2, 80, 2, true, 0)],
                25,
                vec![(1, 3), (2, 2)],
            ),
            (
                "the price is the minimum when supply meets demand exactly",
                5,
                25,
                vec![bid(1, 90, 3, false, 0), bid(2, 80, 2, false, 0)],
                25,
                vec![(1, 3), (2, 2)],
            ),
            (
                "a losing bid at the minimum sets the price at the minimum",
                1,
                25,
                vec![bid(1, 90, 1, false, 0), bid(2, 25, 1, false, 0)],
                25,
                vec![(1, 1)],
            ),
            (
                "the price is the minimum when there are no bids",
                4,
                25,
                vec![],
                25,
                vec![],
            ),
            (
                "a tie goes to the earlier bid",
                1,
                10,
                vec![bid(1, 50, 1, false, 20), bid(2, 50, 1, false, 10)],
                50,
                vec![(2, 1)],
            ),
            (
                "a tie at the same time goes to the lower id",
                1,
                10,
                vec![bid(7, 50, 1, false, 10), bid(3, 50, 1, false, 10)],
                50,
                vec![(3, 1)],
            ),
            (
                "a bid is filled in part with what is left and pays its own maximum",
                5,
                10,
                vec![
                    bid(1, 90, 3, false, 0),
                    bid(2, 80, 4, false, 0),
                    bid(3, 70, 1, false, 0),
                ],
                80,
                vec![(1, 3), (2, 2)],
            ),
            (
                "a divisible bid after the capacity ran out exactly gets nothing and sets the price",
                3,
                10,
                vec![bid(1, 90, 3, false, 0), bid(2, 80, 4, false, 0)],
                80,
                vec![(1, 3)],
            ),
            (
                "an all-or-nothing bid that fits exactly is filled whole",
                5,
                10,
                vec![bid(1, 90, 2, false, 0), bid(2, 80, 3, true, 0)],
                10,
                vec![(1, 2), (2, 3)],
            ),
            (
                "an all-or-nothing bid that does not fit gets nothing, sets the price, and a smaller later bid at that price is filled",
                5,
                10,
                vec![
                    bid(1, 90, 3, false, 0),
                    bid(2, 80, 4, true, 0),
                    bid(3, 80, 2, false, 5),
                ],
                80,
                vec![(1, 3), (3, 2)],
            ),
            (
                "a bid tied with an all-or-nothing marginal bid may be filled in part",
                5,
                10,
                vec![
                    bid(1, 90, 3, false, 0),
                    bid(2, 80, 4, true, 0),
                    bid(3, 80, 3, false, 5),
                ],
                80,
                vec![(1, 3), (3, 2)],
            ),
            (
                "winners never pay above their maximum: a cheaper bid after an all-or-nothing marginal bid loses, and capacity stays unsold",
                10,
                10,
                vec![
                    bid(1, 100, 8, false, 0),
                    bid(2, 90, 5, true, 0),
                    bid(3, 80, 2, false, 0),
                ],
                90,
                vec![(1, 8)],
            ),
            (
                "zero capacity allocates nothing and the best divisible bid is the price",
                0,
                10,
                vec![bid(1, 90, 1, false, 0), bid(2, 80, 1, false, 0)],
                90,
                vec![],
            ),
            (
                "a bid below a minimum raised after it was made takes no part",
                1,
                50,
                vec![bid(1, 40, 2, false, 0), bid(2, 60, 1, false, 0)],
                50,
                vec![(2, 1)],
            ),
            (
                "an all-or-nothing bid for more than the capacity takes no part and sets no price",
                3,
                10,
                vec![bid(1, 90, 4, true, 0), bid(2, 50, 2, false, 0)],
                10,
                vec![(2, 2)],
            ),
            (
                "a bid for no units takes no part",
                1,
                10,
                vec![bid(1, 90, 0, false, 0), bid(2, 50, 1, false, 0)],
                10,
                vec![(2, 1)],
            ),
        ];
        for (rule, capacity, minimum, bids, price, allocations) in cases {
            assert_eq!(
                check(capacity, minimum, &bids),
                (price, allocations),
                "{rule}"
            );
        }
    }

    #[test]
    fn classes_clear_apart_in_class_order_and_the_first_supply_of_a_class_counts() {
        let mut other = bid(2, 70, 1, false, 0);
        other.class = "b".into();
        let mut unoffered = bid(3, 99, 1, false, 0);
        unoffered.class = "z".into();
        let bids = [bid(1, 50, 1, false, 0), other, unoffered];
        let supplies = [supply("c", 1, 5), supply("b", 0, 7), supply("c", 9, 1)];
        let clearing = clear(&supplies, &bids);
        assert_eq!(clearing, reference::clear_naive(&supplies, &bids));
        let summary: Vec<_> = clearing
            .classes
            .iter()
            .map(|c| (c.class.as_str(), c.capacity, c.price, c.allocated()))
            .collect();
        assert_eq!(summary, [("b", 0, 70, 0), ("c", 1, 5, 1)]);
        assert_eq!(clearing.class("b").unwrap().marginal, Some(id(2)));
        assert_eq!(clearing.class("z"), None);
    }

    /// Each case: (rule it pins, the bid, the supply, the refusal's rule or `None`, the
    /// values its message must name).
    #[test]
    fn bids_are_checked_when_made() {
        let c = supply("c", 10, 50);
        let mut elsewhere = bid(1, 60, 1, false, 0);
        elsewhere.class = "z".into();
        type Case = (
            &'static str,
            Bid,
            Option<Supply>,
            Option<&'static str>,
            Vec<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "a bid at the minimum is taken",
                bid(1, 50, 3, false, 0),
                Some(c.clone()),
                None,
                vec![],
            ),
            (
                "a bid below the minimum is refused when made, naming both prices",
                bid(1, 40, 3, false, 0),
                Some(c.clone()),
                Some("minimum"),
                vec!["40", "50"],
            ),
            (
                "a bid for no units is refused",
                bid(1, 60, 0, false, 0),
                Some(c.clone()),
                Some("quantity"),
                vec![],
            ),
            (
                "a bid in a class not offered is refused",
                bid(1, 60, 1, false, 0),
                None,
                Some("unknown_class"),
                vec!["c"],
            ),
            (
                "a supply of another class does not offer the bid's class",
                elsewhere,
                Some(c.clone()),
                Some("unknown_class"),
                vec!["z"],
            ),
            (
                "an all-or-nothing bid for more than the capacity is refused",
                bid(1, 60, 12, true, 0),
                Some(c.clone()),
                Some("all_or_nothing"),
                vec!["12", "10"],
            ),
            (
                "a divisible bid for more than the capacity is taken",
                bid(1, 60, 12, false, 0),
                Some(c.clone()),
                None,
                vec![],
            ),
        ];
        for (rule, b, s, want, values) in cases {
            let got = check_bid(&b, s.as_ref());
            assert_eq!(got.as_ref().err().map(|r| r.rule), want, "{rule}");
            if let Err(refusal) = got {
                for value in values {
                    assert!(refusal.message.contains(value), "{rule}: {refusal}");
                }
            }
        }
    }

    /// Each case: (rule it pins, the supply and bids of the previous clearing, those of
    /// the next, the interruptions as (bid, held, kept, reason)).
    #[test]
    fn a_clearing_interrupts_what_it_takes_away() {
        use InterruptReason::*;
        type Market = (Vec<Supply>, Vec<Bid>);
        type Case = (
            &'static str,
            Market,
            Market,
            Vec<(u128, u32, u32, InterruptReason)>,
        );
        let two = vec![supply("c", 2, 10)];
        let held = vec![bid(1, 60, 1, false, 0), bid(2, 50, 1, false, 0)];
        let outbid_by = |more: Vec<Bid>| [held.clone(), more].concat();
        let cases: Vec<Case> = vec![
            (
                "an allocation whose maximum is below the new price is interrupted for price, one within it is outbid",
                (two.clone(), held.clone()),
                (
                    two.clone(),
                    outbid_by(vec![bid(3, 80, 1, false, 1), bid(4, 70, 1, false, 1)]),
                ),
                vec![(1, 1, 0, Outbid), (2, 1, 0, PriceAboveMax)],
            ),
            (
                "an unchanged allocation is not interrupted",
                (two.clone(), held.clone()),
                (two.clone(), outbid_by(vec![bid(3, 5, 1, false, 1)])),
                vec![],
            ),
            (
                "a cancelled bid is not interrupted",
                (two.clone(), held.clone()),
                (two.clone(), vec![held[1].clone(), bid(3, 70, 1, false, 1)]),
                vec![],
            ),
            (
                "an allocation cut in part says what it keeps",
                (vec![supply("c", 5, 10)], vec![bid(1, 60, 5, false, 0)]),
                (
                    vec![supply("c", 5, 10)],
                    vec![bid(1, 60, 5, false, 0), bid(2, 80, 2, false, 1)],
                ),
                vec![(1, 5, 3, Outbid)],
            ),
            (
                "a minimum raised above a winner's maximum interrupts it for price",
                (two.clone(), held.clone()),
                (vec![supply("c", 2, 55)], held.clone()),
                vec![(2, 1, 0, PriceAboveMax)],
            ),
            (
                "a class no longer offered interrupts its allocations",
                (two.clone(), held.clone()),
                (vec![], held.clone()),
                vec![(1, 1, 0, ClassWithdrawn), (2, 1, 0, ClassWithdrawn)],
            ),
        ];
        for (rule, (s0, b0), (s1, b1), want) in cases {
            let next = clear(&s1, &b1);
            let got: Vec<_> = interruptions(&clear(&s0, &b0), &next, &b1)
                .into_iter()
                .map(|i| {
                    assert_eq!(i.price, next.class("c").map(|c| c.price), "{rule}");
                    (i.bid.as_u128(), i.held, i.kept, i.reason)
                })
                .collect();
            assert_eq!(got, want, "{rule}");
        }
    }

    #[test]
    fn the_market_clears_on_its_period_and_skips_the_periods_it_missed() {
        let mut m = SpotMarket::new(DEFAULT_PERIOD_MS, 0);
        m.handle_supply(supply("c", 1, 10));
        assert_eq!(m.next_deadline(), Some(10_000));
        assert_eq!(m.poll_clearing(9_999), None);
        let first = m.poll_clearing(10_000).expect("due");
        assert!(!first.on_demand);
        assert_eq!(first.clearing.class("c").unwrap().price, 10);
        assert_eq!(m.next_deadline(), Some(20_000));
        assert_eq!(m.poll_clearing(10_001), None, "cleared once");
        m.poll_clearing(35_000).expect("late but due");
        assert_eq!(m.next_deadline(), Some(40_000));
        assert_eq!(m.poll_clearing(39_999), None);
    }

    #[test]
    fn a_clearing_on_demand_leaves_the_period_as_it_was() {
        let mut m = SpotMarket::new(10_000, 0);
        m.request_clearing(3_000);
        m.request_clearing(4_000);
        assert_eq!(m.next_deadline(), Some(3_000));
        assert_eq!(m.poll_clearing(2_999), None);
        assert!(m.poll_clearing(3_000).expect("requested").on_demand);
        assert_eq!(m.next_deadline(), Some(10_000));
        assert_eq!(m.poll_clearing(3_001), None);
        assert!(!m.poll_clearing(10_000).expect("periodic").on_demand);
    }

    #[test]
    fn bids_are_stamped_refused_or_cancelled_and_a_refusal_changes_nothing() {
        let mut m = SpotMarket::new(10_000, 0);
        m.handle_supply(supply("c", 2, 50));
        m.handle_bid(7, bid(1, 60, 1, false, 999)).unwrap();
        assert_eq!(m.bids[0].placed_at_ms, 7, "the market's time breaks ties");
        let before = m.clone();
        let refused = [
            m.handle_bid(8, bid(1, 70, 1, false, 0)).unwrap_err(),
            m.handle_bid(8, bid(2, 40, 1, false, 0)).unwrap_err(),
            m.handle_bid(8, bid(3, 60, 3, true, 0)).unwrap_err(),
            m.handle_cancel(id(9)).unwrap_err(),
        ];
        assert_eq!(
            refused.map(|r| r.rule),
            ["duplicate", "minimum", "all_or_nothing", "unknown_bid"]
        );
        assert_eq!(m, before);
        assert_eq!(m.handle_cancel(id(1)).unwrap().id, id(1));
        assert!(m.bids.is_empty());
        // A lower minimum replaces the class's supply; the once refused bid is taken.
        m.handle_supply(supply("c", 2, 30));
        assert_eq!(m.supplies.len(), 1);
        m.handle_bid(9, bid(2, 40, 1, false, 0)).unwrap();
    }

    #[test]
    fn a_market_rebuilt_from_its_row_interrupts_the_outbid_holder() {
        let mut m = SpotMarket::new(10_000, 0);
        m.handle_supply(supply("c", 1, 10));
        m.handle_bid(1, bid(1, 50, 1, false, 0)).unwrap();
        let first = m.poll_clearing(10_000).unwrap();
        assert_eq!(first.clearing.class("c").unwrap().allocations.len(), 1);
        assert!(first.interruptions.is_empty());
        m.handle_bid(10_500, bid(2, 80, 1, false, 0)).unwrap();
        // The controller stops here; the row is all that is left.
        let row = serde_json::to_string(&m).unwrap();
        let mut rebuilt: SpotMarket = serde_json::from_str(&row).unwrap();
        assert_eq!(rebuilt, m);
        rebuilt.request_clearing(11_000);
        let second = rebuilt.poll_clearing(11_000).unwrap();
        assert_eq!(second.clearing.class("c").unwrap().price, 50);
        assert_eq!(
            second.interruptions,
            [Interruption {
                class: "c".into(),
                bid: id(1),
                held: 1,
                kept: 0,
                reason: InterruptReason::Outbid,
                price: Some(50),
                max_price: 50,
            }]
        );
    }

    /// Supplies over classes `c0`..`c2` (a class may be missing or given twice) and up
    /// to 30 bids over `c0`..`c3` with small ranges, so that ties, bids below the
    /// minimum, bids for no units and all-or-nothing bids that do not fit are common.
    fn market() -> impl Strategy<Value = (Vec<Supply>, Vec<Bid>)> {
        let supplies = proptest::collection::vec((0u8..3, 0u32..12, 0u64..4), 0..5);
        let bids = proptest::collection::vec(
            (0u8..4, 0u64..8, 0u32..6, any::<bool>(), 0i64..4, 0u128..8),
            0..30,
        );
        (supplies, bids).prop_map(|(supplies, bids)| {
            let supplies = supplies
                .into_iter()
                .map(|(k, capacity, minimum)| supply(&format!("c{k}"), capacity, minimum))
                .collect();
            let bids = bids
                .into_iter()
                .enumerate()
                .map(|(i, (k, max, quantity, aon, at, seed))| Bid {
                    class: format!("c{k}"),
                    // Unique, but not in the order given.
                    ..bid(seed * 100 + i as u128, max, quantity, aon, at)
                })
                .collect();
            (supplies, bids)
        })
    }

    proptest! {
        /// Allocations never exceed capacity; each is of a bid taking part, at most
        /// once, for at least one unit and no more than it asked; an all-or-nothing
        /// bid is filled whole or not at all.
        #[test]
        fn allocations_never_exceed_capacity((supplies, bids) in market()) {
            let clearing = clear(&supplies, &bids);
            let mut seen = HashSet::new();
            for c in &clearing.classes {
                prop_assert!(c.allocated() <= u64::from(c.capacity), "{c:?}");
                for a in &c.allocations {
                    prop_assert!(seen.insert(a.bid), "{:?} allocated twice", a.bid);
                    let b = bids.iter().find(|b| b.id == a.bid).unwrap();
                    prop_assert_eq!(&b.class, &c.class);
                    prop_assert!(a.quantity >= 1 && a.quantity <= b.quantity);
                    prop_assert!(!b.all_or_nothing || a.quantity == b.quantity);
                }
            }
        }

        /// Every winner's maximum is at least the price, and the price at least the
        /// minimum.
        #[test]
        fn winners_never_pay_above_their_maximum((supplies, bids) in market()) {
            for c in &clear(&supplies, &bids).classes {
                prop_assert!(c.price >= c.minimum, "{c:?}");
                for a in &c.allocations {
                    prop_assert!(a.max_price >= c.price, "{c:?}");
                }
            }
        }

        /// With supply fixed, adding a bid never lowers any class's price.
        #[test]
        fn the_price_never_falls_when_demand_is_added(
            (supplies, bids) in market(),
            (k, max, quantity, aon, at) in (0u8..4, 0u64..8, 0u32..6, any::<bool>(), 0i64..4),
        ) {
            let before = clear(&supplies, &bids);
            let extra = Bid { class: format!("c{k}"), ..bid(u128::MAX, max, quantity, aon, at) };
            let after = clear(&supplies, &[bids, vec![extra]].concat());
            for (b, a) in before.classes.iter().zip(&after.classes) {
                prop_assert!(a.price >= b.price, "{b:?} then {a:?}");
            }
        }

        /// The sorting implementation gives the naive reference's answer.
        #[test]
        fn clear_equals_the_naive_reference((supplies, bids) in market()) {
            prop_assert_eq!(clear(&supplies, &bids), reference::clear_naive(&supplies, &bids));
        }

        /// The order the bids are given in never matters.
        #[test]
        fn the_order_of_the_bids_does_not_matter(
            ((supplies, bids), shuffled) in market().prop_flat_map(|(s, b)| {
                let shuffled = Just(b.clone()).prop_shuffle();
                (Just((s, b)), shuffled)
            }),
        ) {
            prop_assert_eq!(clear(&supplies, &bids), clear(&supplies, &shuffled));
        }
    }

    fn held(r: u128, b: u128, at: UnixMillis, noticed: bool) -> Held {
        Held {
            reservation: id(r),
            bid: id(b),
            started_at_ms: at,
            noticed,
        }
    }

    /// Rule 10, case by case: (name, capacity, bids, held, free hosts, notices as
    /// (reservation, reason), fills as (bid, hosts)).
    #[test]
    fn assign_table() {
        use InterruptReason::{Outbid, PriceAboveMax};
        type Case = (
            &'static str,
            u32,
            Vec<Bid>,
            Vec<Held>,
            Vec<u128>,
            Vec<(u128, InterruptReason)>,
            Vec<(u128, Vec<u128>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "a first clearing fills from the free hosts in id order",
                2,
                vec![bid(1, 50, 1, false, 0), bid(2, 40, 1, false, 1)],
                vec![],
                vec![12, 11],
                vec![],
                vec![(1, vec![11]), (2, vec![12])],
            ),
            (
                "a bid holding its allocation keeps it and gets nothing more",
                1,
                vec![bid(1, 50, 1, false, 0)],
                vec![held(100, 1, 0, false)],
                vec![],
                vec![],
                vec![],
            ),
            (
                "outbid within its maximum: notice, and the winner waits for the host",
                1,
                vec![bid(1, 50, 1, false, 0), bid(2, 80, 1, false, 1)],
                vec![held(100, 1, 0, false)],
                vec![],
                vec![(100, Outbid)],
                vec![],
            ),
            (
                "priced out: the marginal price above its maximum",
                1,
                vec![
                    bid(1, 50, 1, false, 0),
                    bid(2, 80, 1, false, 1),
                    bid(3, 60, 1, false, 2),
                ],
                vec![held(100, 1, 0, false)],
                vec![],
                vec![(100, PriceAboveMax)],
                vec![],
            ),
            (
                "a partial loss gives up the newest host first",
                2,
                vec![bid(1, 50, 3, false, 0), bid(2, 80, 1, false, 1)],
                vec![held(100, 1, 5, false), held(101, 1, 9, false)],
                vec![],
                vec![(101, Outbid)],
                vec![],
            ),
            (
                "a host under notice counts for nothing: the bid is filled again from a free host",
                2,
                vec![bid(1, 50, 1, false, 0)],
                vec![held(100, 1, 0, true)],
                vec![7],
                vec![],
                vec![(1, vec![7])],
            ),
            (
                "a cancelled bid's hosts are not the clearing's to take",
                1,
                vec![bid(2, 80, 1, false, 1)],
                vec![held(100, 1, 0, false)],
                vec![],
                vec![],
                vec![],
            ),
            (
                "fewer free hosts than wanted: the better-ranked bid first",
                2,
                vec![bid(1, 50, 1, false, 0), bid(2, 80, 1, false, 1)],
                vec![],
                vec![9],
                vec![],
                vec![(2, vec![9])],
            ),
        ];
        for (name, capacity, bids, held, free, notices, fills) in cases {
            let clearing = clear(&[supply("c", capacity, 10)], &bids);
            let class = clearing.class("c").unwrap();
            let free: Vec<Uuid> = free.into_iter().map(id).collect();
            let got = assign(class, &bids, &held, &free);
            let want = Assignment {
                notices: notices.into_iter().map(|(r, why)| (id(r), why)).collect(),
                fills: fills
                    .into_iter()
                    .map(|(b, hs)| (id(b), hs.into_iter().map(id).collect()))
                    .collect(),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    proptest! {
        /// After an assignment no bid holds more hosts (not under notice) than it was
        /// allocated, no free host is given twice, and the hosts held in all never
        /// exceed the capacity plus those under notice.
        #[test]
        fn assign_never_exceeds_the_allocation(
            (supplies, bids) in market(),
            holds in proptest::collection::vec((0usize..40, 0i64..5, any::<bool>()), 0..12),
            free in proptest::collection::vec(0u128..30, 0..12),
        ) {
            let clearing = clear(&supplies, &bids);
            for class in &clearing.classes {
                let live: Vec<Bid> = bids.iter().filter(|b| b.class == class.class).cloned().collect();
                if live.is_empty() { continue; }
                let held: Vec<Held> = holds.iter().enumerate().map(|(n, (b, at, noticed))| Held {
                    reservation: id(1_000 + n as u128),
                    bid: live[b % live.len()].id,
                    started_at_ms: *at,
                    noticed: *noticed,
                }).collect();
                let free: Vec<Uuid> = free.iter().map(|n| id(5_000 + n)).collect();
                let a = assign(class, &live, &held, &free);
                let noticed: HashSet<Uuid> = a.notices.iter().map(|(r, _)| *r).collect();
                let mut given = HashSet::new();
                for b in &live {
                    let keeps = held.iter().filter(|h| h.bid == b.id && !h.noticed && !noticed.contains(&h.reservation)).count();
                    let gets: usize = a.fills.iter().filter(|(x, _)| *x == b.id).map(|(_, hs)| hs.len()).sum();
                    let allocated = class.allocations.iter().find(|x| x.bid == b.id).map_or(0, |x| x.quantity as usize);
                    prop_assert!(keeps + gets <= allocated.max(keeps), "{b:?}: keeps {keeps} gets {gets} of {allocated}");
                    prop_assert!(keeps <= allocated, "{b:?} keeps {keeps} of {allocated}");
                }
                for (_, hs) in &a.fills {
                    for h in hs {
                        prop_assert!(given.insert(*h), "host {h} given twice");
                        prop_assert!(free.contains(h));
                    }
                }
                for (r, _) in &a.notices {
                    prop_assert!(held.iter().any(|h| h.reservation == *r && !h.noticed), "noticed {r} twice");
                }
            }
        }
    }
}
