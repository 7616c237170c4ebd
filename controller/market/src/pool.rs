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
