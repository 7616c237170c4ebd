//! Merged private pools (issue 17, FIG. 14): the pools of several entities joined into
//! one market for a shared group of users, each slot still its owner's. Who may change
//! the merged pool ([`check_change`]), one allocation cycle with bounded borrowing
//! between the entities ([`admit_merged`]), and what an entity's leaving ends
//! ([`leave`]).
//!
//! Owns the rules; must not read a clock, make an id or touch a store. Time is an
//! argument, and every decision comes with its reason: the single pool's [`Why`] and,
//! where a rule of merged pools decided, a [`MergedWhy`], so that `surplus pools
//! explain` can say which rule and which numbers made it.
//!
//! # Changes ([`check_change`])
//!
//! 1. **Rights are set at the merge.** Each entity is given, when the pools are merged,
//!    the rights it has to change the pool's policy, its users, its slots, and to
//!    dissolve it ([`Right`]). A change by an entity not in the pool is refused
//!    (`not_in_pool`), one by a member without the right too (`no_right`); both name
//!    the entity and the right. Leaving needs no right: an entity's slots are its own.
//!
//! # Admission ([`admit_merged`])
//!
//! 2. **Who takes part.** Only member entities' slots are the pool's. A request takes
//!    part if its user belongs to a member entity ([`MergedPool::users`]) and the single
//!    pool's rule 1 ([`check_request`]) admits it. Requests are ranked as in a single
//!    pool: bid, then the lighter decayed usage, then the earlier, then the lower id.
//! 3. **Own slots first.** A request is served from its own entity's slots first, in
//!    rank order, within the per-user cap (all of a user's requests together),
//!    preferring the slots it held, then the lowest free ids.
//! 4. **Borrowing is bounded.** Only then does a request that wants more borrow other
//!    entities' free slots, in rank order, the ones it held first, then the lowest ids,
//!    and only while (a) the lender's lent count stays within its lending limit and (b)
//!    the borrower's entity's borrowed count stays within its borrowing limit, as in
//!    Kueue's cohorts (no limit: unbounded). One left short while other entities have
//!    free slots says which limit stopped it (`borrowing_limit`, else `lending_limit`);
//!    otherwise the pool is full (`pool_full`).
//! 5. **Lending is conditional.** A lent slot comes back to its owner's users when they
//!    want it, whatever the policy says about preemption: a request short of slots with
//!    none of its own entity's free takes one its entity lent, from the lowest-ranked
//!    borrower first (`reclaimed`, naming the owner and the request that took it). Why:
//!    an entity lends capacity its users leave idle, it does not sell it; without this
//!    a borrower in a pool without preemption could keep a lender's users waiting for
//!    ever. The borrower may in turn take back its own entity's lent slots (rule 5
//!    again, until nothing moves) or borrow elsewhere (rule 4).
//! 6. **Keep or preempt.** Without preemption, what a request held is kept first while
//!    it still takes part: its own entity's slots, then borrowed ones while both limits
//!    still allow (a limit lowered since takes effect at once), up to its count and the
//!    cap. It never loses an own slot, and a borrowed one only by rule 5 or a limit.
//!    With preemption every cycle allocates from scratch by rules 3 to 5; a holder
//!    ranked out loses its slots (`preempted`, naming the first request that took
//!    them), and one served from its own entity again gives back what it borrowed.
//!
//! **Guarantee.** By rules 3, 5 and 6 an entity's users hold their demand (each user's
//! requests up to the cap) or else all of its slots, so never fewer than
//! min(demand, [unlent capacity](Member::unlent)): an entity's users are never pushed
//! below the capacity it did not lend. The lending limit bounds how much of its idle
//! capacity is out at once (so how many of its users' arrivals take a slot back).
//!
//! # Leaving ([`leave`])
//!
//! 7. An entity in the pool may leave at any time (`not_in_pool` otherwise). It takes
//!    its slots back at the end of the notice period; every allocation on them ends
//!    then, whoever holds it, and so do its own users' allocations on the others'
//!    slots (they leave with it). Each is given notice now, with that deadline.
//!
//! # Invariants (checked by property tests)
//!
//! A slot is given to one request at most, and only the pool's; only members' users
//! hold slots; no user holds more than the cap; no entity lends more than its lending
//! limit nor borrows more than its borrowing limit; every entity's users hold at least
//! min(demand, its slots), hence at least min(demand, its unlent capacity); without
//! preemption nobody loses an own slot it held while it still takes part.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use crate::Refusal;
use crate::pool::{Admission, Policy, Request, Why, check_request};
use crate::refuse;

/// What an entity may change in a merged pool, given at the merge (rule 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Right {
    /// Change the pool's [`Policy`].
    Policy,
    /// Add or remove users.
    Users,
    /// Add or remove slots (its own: a slot keeps its owner).
    Slots,
    /// Dissolve the merged pool.
    Dissolve,
}

impl Right {
    /// Its name, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            Right::Policy => "policy",
            Right::Users => "users",
            Right::Slots => "slots",
            Right::Dissolve => "dissolve",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Right::Policy => "change the pool's policy",
            Right::Users => "change the pool's users",
            Right::Slots => "change the pool's slots",
            Right::Dissolve => "dissolve the pool",
        }
    }
}

/// An entity taking part in a merged pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The entity.
    pub entity: String,
    /// What it may change (rule 1).
    pub rights: BTreeSet<Right>,
    /// The most of its slots lent to other entities' users at once; none: unbounded.
    pub lending_limit: Option<u32>,
    /// The most other entities' slots its users borrow at once; none: unbounded.
    pub borrowing_limit: Option<u32>,
}

impl Member {
    /// Of its `slots`, those its lending limit keeps from being lent: its slots minus
    /// the limit, all of them when nothing may be lent, none without a limit.
    pub fn unlent(&self, slots: u32) -> u32 {
        self.lending_limit.map_or(0, |l| slots.saturating_sub(l))
    }
}

/// A slot of a merged pool and the entity that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The slot.
    pub id: Uuid,
    /// Its owner (it keeps it through the merge).
    pub owner: String,
}

/// A merged pool as stored: one policy, the member entities, their slots, their users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedPool {
    /// The pool's allocation rules (shared by all its entities).
    pub policy: Policy,
    /// The entities merged, with their rights and limits.
    pub members: Vec<Member>,
    /// Every slot, with its owner; those of an entity not in `members` take no part.
    pub slots: Vec<Slot>,
    /// Each user's entity.
    pub users: BTreeMap<String, String>,
}

impl MergedPool {
    /// The member `entity`, if it is one.
    pub fn member(&self, entity: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.entity == entity)
    }

    /// The member entity `user` belongs to, if any.
    pub fn entity_of(&self, user: &str) -> Option<&str> {
        let entity = self.users.get(user)?;
        self.member(entity).map(|m| m.entity.as_str())
    }
}

/// Why a merged pool's own rule decided, beside the single pool's [`Why`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum MergedWhy {
    /// Short while others had free slots: its entity borrows its limit (rule 4b).
    BorrowingLimit {
        /// Its entity's borrowing limit.
        limit: u32,
        /// Slots its entity's users borrow.
        borrowed: u32,
        /// Slots it holds.
        got: u32,
        /// Slots it asked for.
        wanted: u32,
    },
    /// Short while others had free slots: their owners lend their limits (rule 4a).
    LendingLimit {
        /// Slots it holds.
        got: u32,
        /// Slots it asked for.
        wanted: u32,
    },
    /// Borrowed slots went back to their owner's users (rule 5).
    Reclaimed {
        /// Slots taken back.
        lost: u32,
        /// The owner (of the first taken back).
        owner: String,
        /// The best-ranked request of the owner's users that took them.
        by: Uuid,
    },
}

/// What an entity lends and borrows after a cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Standing {
    /// Its slots in the pool.
    pub slots: u32,
    /// Of those, held by other entities' users.
    pub lent: u32,
    /// Other entities' slots its users hold.
    pub borrowed: u32,
}

/// One merged cycle's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MergedAdmission {
    /// What each request holds and why, as a single pool says it: a slot taken back by
    /// rule 5 is `preempted` there, and a request a limit left short `pool_full`.
    pub admission: Admission,
    /// The merged pool's own reason, for the requests one of its rules decided (rules
    /// 4 and 5): what `surplus pools explain` shows before the single pool's.
    pub merged_why: BTreeMap<Uuid, MergedWhy>,
    /// Each member entity's standing.
    pub entities: BTreeMap<String, Standing>,
}

/// Whether `entity` may make a change that needs `right` (rule 1).
pub fn check_change(members: &[Member], entity: &str, right: Right) -> Result<(), Refusal> {
    let Some(member) = members.iter().find(|m| m.entity == entity) else {
        return Err(refuse(
            "not_in_pool",
            format!(
                "{entity} is not in this merged pool, so it may not {}",
                right.what()
            ),
        ));
    };
    if member.rights.contains(&right) {
        return Ok(());
    }
    Err(refuse(
        "no_right",
        format!(
            "{entity} may not {}: the `{}` right was not given to it at the merge",
            right.what(),
            right.as_str()
        ),
    ))
}

/// One cycle's working state: who holds what, and what each entity lends and borrows.
struct Cycle<'a> {
    pool: &'a MergedPool,
    /// Requests taking part in rank order, with their user's entity.
    taking: Vec<(&'a Request, &'a str)>,
    /// The pool's slots (members' only) and their owners.
    owner: BTreeMap<Uuid, &'a str>,
    /// What each request held before, within the pool, without repeats.
    before: Vec<Vec<Uuid>>,
    holder: BTreeMap<Uuid, usize>,
    have: Vec<Vec<Uuid>>,
    per_user: BTreeMap<&'a str, u32>,
    lent: BTreeMap<&'a str, u32>,
    borrowed: BTreeMap<&'a str, u32>,
}

impl<'a> Cycle<'a> {
    /// Slots request `i` may still take, and whether the cap is what bounds them.
    fn room(&self, i: usize) -> (u32, bool) {
        let (r, _) = self.taking[i];
        let want = r.count.saturating_sub(self.have[i].len() as u32);
        let Some(cap) = self.pool.policy.cap_per_user else {
            return (want, false);
        };
        let left = cap.saturating_sub(self.per_user.get(r.user.as_str()).copied().unwrap_or(0));
        if left < want {
            (left, true)
        } else {
            (want, false)
        }
    }

    /// Rule 4: whether `lender` may lend one more slot to `borrower`'s users.
    fn may_lend(&self, lender: &str, borrower: &str) -> bool {
        let count = |m: &BTreeMap<&str, u32>, e: &str| m.get(e).copied().unwrap_or(0);
        let lending = self.pool.member(lender).and_then(|m| m.lending_limit);
        let borrowing = self.pool.member(borrower).and_then(|m| m.borrowing_limit);
        lending.is_none_or(|l| count(&self.lent, lender) < l)
            && borrowing.is_none_or(|l| count(&self.borrowed, borrower) < l)
    }

    fn give(&mut self, i: usize, slot: Uuid) {
        let (r, entity) = self.taking[i];
        self.holder.insert(slot, i);
        self.have[i].push(slot);
        *self.per_user.entry(r.user.as_str()).or_default() += 1;
        let owner = self.owner[&slot];
        if owner != entity {
            *self.lent.entry(owner).or_default() += 1;
            *self.borrowed.entry(entity).or_default() += 1;
        }
    }

    fn take(&mut self, slot: Uuid) {
        let Some(i) = self.holder.remove(&slot) else {
            return;
        };
        let (r, entity) = self.taking[i];
        self.have[i].retain(|s| *s != slot);
        *self.per_user.entry(r.user.as_str()).or_default() -= 1;
        let owner = self.owner[&slot];
        if owner != entity {
            *self.lent.entry(owner).or_default() -= 1;
            *self.borrowed.entry(entity).or_default() -= 1;
        }
    }

    /// A free slot `i` may take by `fits` (given the slot's owner): one it held first,
    /// then the lowest id.
    fn free_slot(&self, i: usize, fits: impl Fn(&str) -> bool) -> Option<Uuid> {
        self.before[i]
            .iter()
            .chain(self.owner.keys())
            .find(|s| !self.holder.contains_key(s) && fits(self.owner[*s]))
            .copied()
    }

    /// Rule 5: the slot of `entity` lent to the lowest-ranked borrower (its highest id).
    fn lent_out(&self, entity: &str) -> Option<Uuid> {
        self.holder
            .iter()
            .filter(|(s, i)| self.owner[*s] == entity && self.taking[**i].1 != entity)
            .max_by_key(|(s, i)| (**i, **s))
            .map(|(s, _)| *s)
    }
}

/// One allocation cycle of a merged pool (rules 2 to 6): `requests` those made (refused
/// ones take no part), `usage` each user's decayed usage, `held` what each request held
/// before the cycle.
pub fn admit_merged(
    pool: &MergedPool,
    requests: &[Request],
    usage: &BTreeMap<String, f64>,
    held: &BTreeMap<Uuid, Vec<Uuid>>,
) -> MergedAdmission {
    let mut owner: BTreeMap<Uuid, &str> = BTreeMap::new();
    for s in pool
        .slots
        .iter()
        .filter(|s| pool.member(&s.owner).is_some())
    {
        owner.entry(s.id).or_insert(s.owner.as_str());
    }
    // Rule 2: who takes part, and in which order.
    let users: BTreeSet<String> = pool
        .users
        .keys()
        .filter(|u| pool.entity_of(u).is_some())
        .cloned()
        .collect();
    let mut taking: Vec<(&Request, &str)> = requests
        .iter()
        .filter(|r| check_request(&pool.policy, &users, r).is_ok())
        .filter_map(|r| pool.entity_of(&r.user).map(|e| (r, e)))
        .collect();
    let weight = |user: &str| usage.get(user).copied().unwrap_or(0.0);
    taking.sort_by(|(a, _), (b, _)| {
        Reverse(a.bid)
            .cmp(&Reverse(b.bid))
            .then(weight(&a.user).total_cmp(&weight(&b.user)))
            .then(a.placed_at_ms.cmp(&b.placed_at_ms))
            .then(a.id.cmp(&b.id))
    });
    let before: Vec<Vec<Uuid>> = taking
        .iter()
        .map(|(r, _)| {
            let mut seen = BTreeSet::new();
            held.get(&r.id)
                .into_iter()
                .flatten()
                .filter(|s| owner.contains_key(s) && seen.insert(**s))
                .copied()
                .collect()
        })
        .collect();
    let n = taking.len();
    let mut c = Cycle {
        pool,
        taking,
        owner,
        before,
        holder: BTreeMap::new(),
        have: vec![Vec::new(); n],
        per_user: BTreeMap::new(),
        lent: BTreeMap::new(),
        borrowed: BTreeMap::new(),
    };
    // Rule 6 without preemption: own slots kept first, then borrowed ones within limits.
    if !pool.policy.preemptible {
        for i in 0..n {
            let entity = c.taking[i].1;
            let (own, others): (Vec<Uuid>, Vec<Uuid>) =
                c.before[i].iter().partition(|s| c.owner[*s] == entity);
            for s in own.into_iter().chain(others) {
                let lender = c.owner[&s];
                if c.room(i).0 > 0
                    && !c.holder.contains_key(&s)
                    && (lender == entity || c.may_lend(lender, entity))
                {
                    c.give(i, s);
                }
            }
        }
    }
    // Rules 3 and 5: own slots, then lent ones taken back, until nothing moves.
    loop {
        let mut moved = false;
        for i in 0..n {
            let entity = c.taking[i].1;
            while c.room(i).0 > 0 {
                if let Some(s) = c.free_slot(i, |o| o == entity) {
                    c.give(i, s);
                } else if let Some(s) = c.lent_out(entity) {
                    c.take(s);
                    c.give(i, s);
                    moved = true;
                } else {
                    break;
                }
            }
        }
        if !moved {
            break;
        }
    }
    // Rule 4: borrow within both limits; say which limit left a request short.
    let mut merged_why = BTreeMap::new();
    for i in 0..n {
        let (r, entity) = c.taking[i];
        while c.room(i).0 > 0 {
            match c.free_slot(i, |o| o != entity && c.may_lend(o, entity)) {
                Some(s) => c.give(i, s),
                None => break,
            }
        }
        let (room, capped) = c.room(i);
        if room == 0 || capped || c.free_slot(i, |o| o != entity).is_none() {
            continue;
        }
        let got = c.have[i].len() as u32;
        let borrowed = c.borrowed.get(entity).copied().unwrap_or(0);
        let why = match pool.member(entity).and_then(|m| m.borrowing_limit) {
            Some(limit) if borrowed >= limit => MergedWhy::BorrowingLimit {
                limit,
                borrowed,
                got,
                wanted: r.count,
            },
            _ => MergedWhy::LendingLimit {
                got,
                wanted: r.count,
            },
        };
        merged_why.insert(r.id, why);
    }
    explain(&c, merged_why)
}

/// Each request's reasons (rules 4 to 6) and each entity's standing.
fn explain(c: &Cycle<'_>, mut merged_why: BTreeMap<Uuid, MergedWhy>) -> MergedAdmission {
    let mut admission = Admission::default();
    for (i, (r, entity)) in c.taking.iter().enumerate() {
        let got = c.have[i].len() as u32;
        let mut why = if got >= r.count {
            Why::Holds { rank: i }
        } else if c.room(i).1 {
            Why::UserCap {
                cap: c.pool.policy.cap_per_user.unwrap_or(0),
                got,
                wanted: r.count,
            }
        } else {
            Why::PoolFull {
                rank: i,
                got,
                wanted: r.count,
            }
        };
        // Slots it held that another request holds now, and by whom.
        let lost: Vec<(Uuid, usize)> = c.before[i]
            .iter()
            .filter_map(|s| c.holder.get(s).filter(|j| **j != i).map(|j| (*s, *j)))
            .collect();
        if let Some(by) = lost.iter().map(|(_, j)| *j).min() {
            why = Why::Preempted {
                lost: lost.len() as u32,
                by: c.taking[by].0.id,
            };
            let back: Vec<&(Uuid, usize)> = lost
                .iter()
                .filter(|(s, j)| c.owner[s] != *entity && c.owner[s] == c.taking[*j].1)
                .collect();
            if let Some((slot, j)) = back.iter().min_by_key(|(_, j)| *j) {
                let reclaimed = MergedWhy::Reclaimed {
                    lost: back.len() as u32,
                    owner: c.owner[slot].to_owned(),
                    by: c.taking[*j].0.id,
                };
                merged_why.insert(r.id, reclaimed);
            }
        }
        admission.why.insert(r.id, why);
        if !c.have[i].is_empty() {
            admission.holds.insert(r.id, c.have[i].clone());
        }
    }
    let entities = c
        .pool
        .members
        .iter()
        .map(|m| {
            let e = m.entity.as_str();
            let standing = Standing {
                slots: c.owner.values().filter(|o| **o == e).count() as u32,
                lent: c.lent.get(e).copied().unwrap_or(0),
                borrowed: c.borrowed.get(e).copied().unwrap_or(0),
            };
            (m.entity.clone(), standing)
        })
        .collect();
    MergedAdmission {
        admission,
        merged_why,
        entities,
    }
}

/// What an entity's leaving ends (rule 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    /// The slots it takes back at the deadline.
    pub slots: Vec<Uuid>,
    /// Allocations on those slots, by request, whoever holds them.
    pub on_its_slots: BTreeMap<Uuid, Vec<Uuid>>,
    /// Its users' allocations on the other entities' slots, by request.
    pub of_its_users: BTreeMap<Uuid, Vec<Uuid>>,
    /// When the notice is given.
    pub issued_at_ms: UnixMillis,
    /// When the allocations end and the slots go back: `issued_at_ms + notice_ms`
    /// (saturating; a negative notice counts as none).
    pub deadline_ms: UnixMillis,
}

/// `entity` leaves `pool` at `now_ms` with `notice_ms` of notice (rule 7): `requests`
/// name each request's user, `holds` what each request holds now.
pub fn leave(
    pool: &MergedPool,
    entity: &str,
    requests: &[Request],
    holds: &BTreeMap<Uuid, Vec<Uuid>>,
    now_ms: UnixMillis,
    notice_ms: i64,
) -> Result<Departure, Refusal> {
    if pool.member(entity).is_none() {
        return Err(refuse(
            "not_in_pool",
            format!("{entity} is not in this merged pool, so it cannot leave it"),
        ));
    }
    let mut slots: Vec<Uuid> = Vec::new();
    for s in pool.slots.iter().filter(|s| s.owner == entity) {
        if !slots.contains(&s.id) {
            slots.push(s.id);
        }
    }
    let its_user = |request: &Uuid| {
        requests
            .iter()
            .find(|r| r.id == *request)
            .is_some_and(|r| pool.users.get(&r.user).is_some_and(|e| e == entity))
    };
    let mut on_its_slots = BTreeMap::new();
    let mut of_its_users = BTreeMap::new();
    for (request, held) in holds {
        let (on, off): (Vec<Uuid>, Vec<Uuid>) = held.iter().partition(|s| slots.contains(*s));
        if !on.is_empty() {
            on_its_slots.insert(*request, on);
        }
        if !off.is_empty() && its_user(request) {
            of_its_users.insert(*request, off);
        }
    }
    Ok(Departure {
        slots,
        on_its_slots,
        of_its_users,
        issued_at_ms: now_ms,
        deadline_ms: now_ms.saturating_add(notice_ms.max(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn req(n: u128, user: &str, count: u32, bid: u64) -> Request {
        Request {
            id: id(n),
            user: user.into(),
            count,
            bid,
            placed_at_ms: n as i64,
        }
    }

    fn member(entity: &str, lending: Option<u32>, borrowing: Option<u32>) -> Member {
        Member {
            entity: entity.into(),
            rights: [Right::Users].into(),
            lending_limit: lending,
            borrowing_limit: borrowing,
        }
    }

    /// Users a and b are e's, c is f's, d is g's, z is x's (not a member).
    fn merged(members: Vec<Member>, slots: &[(u128, &str)], preemptible: bool) -> MergedPool {
        MergedPool {
            policy: Policy {
                minimum: 10,
                maximum: Some(100),
                cap_per_user: None,
                preemptible,
            },
            members,
            slots: slots
                .iter()
                .map(|(n, o)| Slot {
                    id: id(*n),
                    owner: (*o).into(),
                })
                .collect(),
            users: [("a", "e"), ("b", "e"), ("c", "f"), ("d", "g"), ("z", "x")]
                .iter()
                .map(|(u, e)| ((*u).to_owned(), (*e).to_owned()))
                .collect(),
        }
    }

    fn check(pool: &MergedPool, requests: &[Request], held: &[(u128, &[u128])]) -> MergedAdmission {
        let held = held
            .iter()
            .map(|(r, s)| (id(*r), s.iter().map(|n| id(*n)).collect()))
            .collect();
        admit_merged(pool, requests, &BTreeMap::new(), &held)
    }

    fn holds(out: &MergedAdmission, r: u128) -> Vec<Uuid> {
        out.admission.holds.get(&id(r)).cloned().unwrap_or_default()
    }

    fn ids(ns: &[u128]) -> Vec<Uuid> {
        ns.iter().map(|n| id(*n)).collect()
    }

    #[test]
    fn a_change_needs_its_right_given_at_the_merge() {
        let mut e = member("e", None, None);
        e.rights = [Right::Policy, Right::Dissolve].into();
        let members = [e, member("f", None, None)];
        let cases = [
            ("e changes the policy", "e", Right::Policy, None),
            ("e dissolves", "e", Right::Dissolve, None),
            ("e changes slots", "e", Right::Slots, Some("no_right")),
            ("f dissolves", "f", Right::Dissolve, Some("no_right")),
            ("f changes users", "f", Right::Users, None),
            ("a stranger", "x", Right::Users, Some("not_in_pool")),
        ];
        for (name, entity, right, rule) in cases {
            let got = check_change(&members, entity, right);
            assert_eq!(got.as_ref().err().map(|e| e.rule), rule, "{name}");
            if let Err(refusal) = got {
                assert!(refusal.message.contains(entity), "{name}: {refusal}");
                assert!(
                    refusal.message.contains(right.as_str()),
                    "{name}: {refusal}"
                );
            }
        }
    }

    #[test]
    fn rights_and_reasons_serialise_by_name() {
        assert_eq!(
            serde_json::to_string(&Right::Dissolve).unwrap(),
            "\"dissolve\""
        );
        let why = MergedWhy::LendingLimit { got: 1, wanted: 2 };
        let json = serde_json::to_string(&why).unwrap();
        assert_eq!(json, r#"{"rule":"lending_limit","got":1,"wanted":2}"#);
        assert_eq!(serde_json::from_str::<MergedWhy>(&json).unwrap(), why);
    }

    #[test]
    fn unlent_capacity_is_slots_less_the_lending_limit() {
        let cases = [
            (Some(0), 4, 4),
            (Some(1), 4, 3),
            (Some(9), 4, 0),
            (None, 4, 0),
        ];
        for (limit, slots, unlent) in cases {
            assert_eq!(member("e", limit, None).unlent(slots), unlent, "{limit:?}");
        }
    }

    #[test]
    fn only_members_users_take_part_on_members_slots() {
        let pool = merged(
            vec![member("e", None, None)],
            &[(101, "e"), (102, "x")],
            false,
        );
        let out = check(
            &pool,
            &[req(1, "z", 1, 90), req(2, "y", 1, 90), req(3, "a", 2, 20)],
            &[],
        );
        assert_eq!(out.admission.holds.keys().collect::<Vec<_>>(), [&id(3)]);
        assert_eq!(holds(&out, 3), ids(&[101]), "x's slot is not the pool's");
        assert_eq!(out.admission.why.len(), 1);
        assert_eq!(out.entities.keys().collect::<Vec<_>>(), ["e"]);
    }

    #[test]
    fn own_slots_first_then_borrowed() {
        let pool = merged(
            vec![member("e", None, None), member("f", None, None)],
            &[(101, "e"), (102, "e"), (201, "f")],
            false,
        );
        // c bids more but is f's: it gets f's slot, then borrows what e's users leave.
        let out = check(&pool, &[req(1, "c", 3, 90), req(2, "a", 1, 20)], &[]);
        assert_eq!(holds(&out, 2), ids(&[101]));
        assert_eq!(holds(&out, 1), ids(&[201, 102]));
        assert_eq!(
            out.entities["e"],
            Standing {
                slots: 2,
                lent: 1,
                borrowed: 0
            }
        );
        assert_eq!(out.entities["f"].borrowed, 1);
        assert!(matches!(
            out.admission.why[&id(1)],
            Why::PoolFull { got: 2, .. }
        ));
        assert!(out.merged_why.is_empty(), "no free slot: the pool is full");
    }

    #[test]
    fn borrowing_stops_at_the_lenders_lending_limit() {
        let pool = merged(
            vec![member("e", Some(1), None), member("f", None, None)],
            &[(101, "e"), (102, "e"), (103, "e")],
            false,
        );
        let out = check(&pool, &[req(1, "c", 3, 50)], &[]);
        assert_eq!(holds(&out, 1), ids(&[101]));
        assert_eq!(out.entities["e"].lent, 1);
        assert_eq!(
            out.merged_why[&id(1)],
            MergedWhy::LendingLimit { got: 1, wanted: 3 }
        );
    }

    #[test]
    fn borrowing_stops_at_the_borrowers_borrowing_limit() {
        let pool = merged(
            vec![member("e", None, None), member("f", None, Some(2))],
            &[(101, "e"), (102, "e"), (103, "e"), (201, "f")],
            false,
        );
        let out = check(&pool, &[req(1, "c", 4, 50)], &[]);
        assert_eq!(holds(&out, 1), ids(&[201, 101, 102]));
        assert_eq!(
            out.merged_why[&id(1)],
            MergedWhy::BorrowingLimit {
                limit: 2,
                borrowed: 2,
                got: 3,
                wanted: 4
            }
        );
    }

    #[test]
    fn a_lent_slot_is_reclaimed_even_without_preemption() {
        for preemptible in [false, true] {
            let pool = merged(
                vec![member("e", None, None), member("f", None, None)],
                &[(101, "e"), (201, "f")],
                preemptible,
            );
            // c held e's slot; e's user a arrives with a lower bid and takes it back.
            let out = check(
                &pool,
                &[req(1, "c", 2, 90), req(2, "a", 1, 20)],
                &[(1, &[101, 201])],
            );
            assert_eq!(holds(&out, 2), ids(&[101]), "preemptible {preemptible}");
            assert_eq!(holds(&out, 1), ids(&[201]), "preemptible {preemptible}");
            assert_eq!(
                out.admission.why[&id(1)],
                Why::Preempted { lost: 1, by: id(2) }
            );
            assert_eq!(
                out.merged_why[&id(1)],
                MergedWhy::Reclaimed {
                    lost: 1,
                    owner: "e".into(),
                    by: id(2)
                }
            );
        }
    }

    #[test]
    fn reclaims_go_round_until_nothing_moves() {
        let pool = merged(
            vec![member("e", None, None), member("f", None, None)],
            &[(101, "e"), (201, "f")],
            false,
        );
        // Each holds the other's slot and nobody is short: nothing moves.
        let swapped: &[(u128, &[u128])] = &[(1, &[201]), (2, &[101])];
        let out = check(&pool, &[req(1, "a", 1, 50), req(2, "c", 1, 50)], swapped);
        assert_eq!(holds(&out, 1), ids(&[201]));
        assert_eq!(holds(&out, 2), ids(&[101]));
        // e's b arrives: it takes 101 back from c, which takes 201 back from a.
        let out = check(
            &pool,
            &[req(1, "a", 1, 50), req(2, "c", 1, 50), req(3, "b", 1, 40)],
            swapped,
        );
        assert_eq!(holds(&out, 3), ids(&[101]));
        assert_eq!(holds(&out, 2), ids(&[201]));
        assert!(!out.admission.holds.contains_key(&id(1)));
        let reclaimed = |owner: &str, by| MergedWhy::Reclaimed {
            lost: 1,
            owner: owner.into(),
            by: id(by),
        };
        assert_eq!(out.merged_why[&id(2)], reclaimed("e", 3));
        assert_eq!(out.merged_why[&id(1)], reclaimed("f", 2));
        assert_eq!(out.entities["e"].lent + out.entities["f"].lent, 0);
    }

    #[test]
    fn without_preemption_a_borrower_keeps_what_its_owner_does_not_need() {
        let pool = merged(
            vec![
                member("e", None, None),
                member("f", None, None),
                member("g", None, None),
            ],
            &[(101, "e"), (102, "e")],
            false,
        );
        let requests = [req(1, "c", 1, 20), req(2, "a", 1, 20), req(3, "d", 1, 90)];
        let out = check(&pool, &requests, &[(1, &[102])]);
        assert_eq!(holds(&out, 1), ids(&[102]), "kept against a better bid");
        assert_eq!(holds(&out, 2), ids(&[101]), "e's user takes the free one");
        assert!(!out.admission.holds.contains_key(&id(3)));
        // With preemption the better bid takes it from the lower-ranked borrower.
        let pool = MergedPool {
            policy: Policy {
                preemptible: true,
                ..pool.policy.clone()
            },
            ..pool
        };
        let out = check(&pool, &requests, &[(1, &[102])]);
        assert_eq!(holds(&out, 3), ids(&[102]));
        assert_eq!(
            out.admission.why[&id(1)],
            Why::Preempted { lost: 1, by: id(3) }
        );
        assert!(!out.merged_why.contains_key(&id(1)), "not its owner's");
    }

    #[test]
    fn a_lowered_limit_takes_effect_at_once() {
        let pool = merged(
            vec![member("e", Some(1), None), member("f", None, None)],
            &[(101, "e"), (102, "e")],
            false,
        );
        let out = check(&pool, &[req(1, "c", 2, 50)], &[(1, &[101, 102])]);
        assert_eq!(holds(&out, 1), ids(&[101]));
        assert_eq!(out.entities["e"].lent, 1);
    }

    #[test]
    fn the_cap_counts_own_and_borrowed_slots() {
        let mut pool = merged(
            vec![member("e", None, None), member("f", None, None)],
            &[(101, "e"), (201, "f"), (202, "f")],
            false,
        );
        pool.policy.cap_per_user = Some(2);
        let out = check(&pool, &[req(1, "a", 2, 50), req(2, "a", 2, 40)], &[]);
        assert_eq!(holds(&out, 1), ids(&[101, 201]));
        assert_eq!(
            out.admission.why[&id(2)],
            Why::UserCap {
                cap: 2,
                got: 0,
                wanted: 2
            }
        );
        assert!(out.merged_why.is_empty());
    }

    #[test]
    fn leaving_ends_allocations_on_its_slots_and_of_its_users() {
        let pool = merged(
            vec![member("e", None, None), member("f", None, None)],
            &[(101, "e"), (102, "e"), (201, "f")],
            false,
        );
        let requests = [req(1, "c", 2, 50), req(2, "a", 1, 50), req(3, "b", 1, 50)];
        let held: BTreeMap<Uuid, Vec<Uuid>> = [
            (id(1), ids(&[201, 101])),
            (id(2), ids(&[102])),
            (id(3), ids(&[201])),
        ]
        .into();
        let d = leave(&pool, "e", &requests, &held, 1_000, 60_000).unwrap();
        assert_eq!(d.slots, ids(&[101, 102]));
        assert_eq!(
            d.on_its_slots,
            [(id(1), ids(&[101])), (id(2), ids(&[102]))].into()
        );
        assert_eq!(d.of_its_users, [(id(3), ids(&[201]))].into());
        assert_eq!((d.issued_at_ms, d.deadline_ms), (1_000, 61_000));
        let d = leave(&pool, "e", &requests, &held, i64::MAX - 1, -5).unwrap();
        assert_eq!(
            d.deadline_ms,
            i64::MAX - 1,
            "a negative notice counts as none"
        );
        let refused = leave(&pool, "x", &requests, &held, 0, 0).unwrap_err();
        assert_eq!(refused.rule, "not_in_pool");
    }

    /// The pool, the requests, what each held.
    type Scenario = (MergedPool, Vec<Request>, BTreeMap<Uuid, Vec<Uuid>>);

    fn scenario() -> impl Strategy<Value = Scenario> {
        let limit = || proptest::option::of(0u32..4);
        (
            proptest::collection::vec((limit(), limit()), 3),
            proptest::collection::vec(0usize..4, 0..10),
            proptest::collection::vec((0usize..6, 0u32..4, 0u64..120), 0..10),
            proptest::collection::vec((0usize..10, 0u128..10), 0..10),
            any::<bool>(),
            proptest::option::of(1u32..4),
        )
            .prop_map(|(limits, owners, rs, held, preemptible, cap)| {
                let entities = ["e", "f", "g", "x"];
                let members = limits
                    .iter()
                    .zip(entities)
                    .map(|((l, b), e)| member(e, *l, *b))
                    .collect();
                let slots: Vec<(u128, &str)> = owners
                    .iter()
                    .enumerate()
                    .map(|(i, o)| (100 + i as u128, entities[*o]))
                    .collect();
                let mut pool = merged(members, &slots, preemptible);
                pool.policy.cap_per_user = cap;
                let users = ["a", "b", "c", "d", "z", "y"];
                let requests: Vec<Request> = rs
                    .iter()
                    .enumerate()
                    .map(|(i, (u, count, bid))| req(i as u128 + 1, users[*u], *count, *bid))
                    .collect();
                let mut before: BTreeMap<Uuid, Vec<Uuid>> = BTreeMap::new();
                let mut used = BTreeSet::new();
                for (r, s) in held {
                    if let Some(r) = requests.get(r) {
                        if used.insert(s) {
                            before.entry(r.id).or_default().push(id(100 + s));
                        }
                    }
                }
                (pool, requests, before)
            })
    }

    proptest! {
        /// A slot goes to one request at most and only the pool's; only members' users
        /// hold slots, within their count and the cap; lending and borrowing stay within
        /// the limits; each entity's users hold min(demand, its slots), so never less
        /// than min(demand, its unlent capacity); without preemption no own slot held
        /// is lost.
        #[test]
        fn merged_admission_invariants((pool, requests, held) in scenario()) {
            let out = admit_merged(&pool, &requests, &BTreeMap::new(), &held);
            let owner: BTreeMap<Uuid, &str> = pool.slots.iter()
                .filter(|s| pool.member(&s.owner).is_some())
                .map(|s| (s.id, s.owner.as_str())).collect();
            let users: BTreeSet<String> = pool.users.keys()
                .filter(|u| pool.entity_of(u).is_some()).cloned().collect();
            let taking: Vec<&Request> = requests.iter()
                .filter(|r| check_request(&pool.policy, &users, r).is_ok()).collect();
            let mut seen = BTreeSet::new();
            let mut per_user: BTreeMap<&str, u32> = BTreeMap::new();
            let mut lent: BTreeMap<&str, u32> = BTreeMap::new();
            let mut borrowed: BTreeMap<&str, u32> = BTreeMap::new();
            let mut holding: BTreeMap<&str, u32> = BTreeMap::new();
            for (r, got) in &out.admission.holds {
                let r = requests.iter().find(|x| x.id == *r).unwrap();
                prop_assert!(taking.contains(&r), "{r:?} takes no part");
                let entity = pool.entity_of(&r.user).unwrap();
                prop_assert!(got.len() as u32 <= r.count);
                for s in got {
                    prop_assert!(seen.insert(*s), "slot {s} given twice");
                    let o = owner.get(s).copied();
                    prop_assert!(o.is_some(), "slot {s} is not the pool's");
                    if o != Some(entity) {
                        *lent.entry(o.unwrap()).or_default() += 1;
                        *borrowed.entry(entity).or_default() += 1;
                    }
                }
                *per_user.entry(r.user.as_str()).or_default() += got.len() as u32;
                *holding.entry(entity).or_default() += got.len() as u32;
            }
            if let Some(cap) = pool.policy.cap_per_user {
                prop_assert!(per_user.values().all(|n| *n <= cap), "{per_user:?}");
            }
            prop_assert_eq!(out.admission.why.len(), taking.len());
            for m in &pool.members {
                let e = m.entity.as_str();
                let standing = out.entities[e];
                prop_assert_eq!(standing.lent, lent.get(e).copied().unwrap_or(0));
                prop_assert_eq!(standing.borrowed, borrowed.get(e).copied().unwrap_or(0));
                prop_assert!(m.lending_limit.is_none_or(|l| standing.lent <= l), "{e} lends {standing:?}");
                prop_assert!(m.borrowing_limit.is_none_or(|l| standing.borrowed <= l), "{e} borrows {standing:?}");
                let mut wants: BTreeMap<&str, u32> = BTreeMap::new();
                for r in taking.iter().filter(|r| pool.entity_of(&r.user) == Some(e)) {
                    *wants.entry(r.user.as_str()).or_default() += r.count;
                }
                let cap = pool.policy.cap_per_user.unwrap_or(u32::MAX);
                let demand: u32 = wants.values().map(|w| (*w).min(cap)).sum();
                let has = holding.get(e).copied().unwrap_or(0);
                prop_assert!(has >= demand.min(standing.slots), "{e}: {has} of {demand}, {standing:?}");
                prop_assert!(has >= demand.min(m.unlent(standing.slots)));
            }
            if !pool.policy.preemptible && pool.policy.cap_per_user.is_none() {
                for r in &taking {
                    let entity = pool.entity_of(&r.user).unwrap();
                    let own_before = held.get(&r.id).into_iter().flatten()
                        .filter(|s| owner.get(s) == Some(&entity)).count();
                    let kept = held.get(&r.id).into_iter().flatten()
                        .filter(|s| owner.get(s) == Some(&entity)
                            && out.admission.holds.get(&r.id).is_some_and(|h| h.contains(s)))
                        .count();
                    prop_assert!(kept >= own_before.min(r.count as usize), "{r:?} lost an own slot");
                }
            }
        }

        /// Leaving ends exactly the allocations on the entity's slots, and its deadline
        /// is never before the notice is given.
        #[test]
        fn leaving_ends_every_allocation_on_its_slots(
            (pool, requests, held) in scenario(),
            which in 0usize..3,
            now in 0i64..1_000,
            notice in -10i64..1_000,
        ) {
            let entity = pool.members[which].entity.clone();
            let d = leave(&pool, &entity, &requests, &held, now, notice).unwrap();
            let on: BTreeSet<Uuid> = d.on_its_slots.values().flatten().copied().collect();
            let expected: BTreeSet<Uuid> = held.values().flatten()
                .filter(|s| pool.slots.iter().any(|x| x.id == **s && x.owner == entity))
                .copied().collect();
            prop_assert_eq!(on, expected);
            prop_assert!(d.of_its_users.values().flatten().all(|s| !d.slots.contains(s)));
            prop_assert!(d.deadline_ms >= now);
        }
    }
}
