//! The reservation book (issue 16): who holds which unit of capacity, from when until
//! when, and how a reservation ends.
//!
//! Owns: choosing the hosts a reservation gets ([`Book::handle_reserve`]), ending one by
//! release ([`Book::handle_release`]), interruption ([`Book::handle_interrupt`]) or
//! expiry ([`Book::poll_expired`], due at [`Book::next_deadline`]), who may control a
//! host at an instant ([`Book::holder_of`], [`Book::may_control`]) and the window a
//! reservation is billed for ([`Reservation::billing_window`]). Must not: judge prices
//! (the engines of [`crate::spot`], [`crate::auction`] and [`crate::quote`] did, and
//! checked the provider minimum), send notices or count grace periods (the
//! interruption notices are not the book's), read a clock, make an id or touch a
//! store. Time and the new ids are arguments; the book is whole in its rows (it
//! serialises as the list of its [`Reservation`]s), so a rebuilt book behaves exactly
//! as the one it was stored from.
//!
//! # Units and holding
//!
//! A unit of capacity is one host of a listing (an agent id of
//! [`crate::listings::Listing::hosts`]). A reservation holds one host; a request for
//! several units makes one reservation per host. A reservation *holds* its host from
//! `starts_at_ms` (inclusive) to its *end* (exclusive): the instant it was released or
//! interrupted, else its term's end `ends_at_ms`, else never (it lasts until released).
//! Holding is a matter of time, not of bookkeeping: a reservation whose term has passed
//! holds nothing from `ends_at_ms` on, even before [`Book::poll_expired`] records its
//! expiry.
//!
//! # Rules
//!
//! 1. **Reserve** ([`Book::handle_reserve`]). Refused, in this order, with nothing
//!    changed: a request for no unit (`units`, it has no ids); an id given twice or
//!    already in the book (`duplicate`: a retried request is recognised, and the shell
//!    answers it from the stored rows); a term that is not positive (`term`); no
//!    holder (`holder`); more units than are free (`sold_out`, naming the units wanted,
//!    free and available). A host is *free* at `now` when it is among the
//!    `available_hosts` the shell passes (the listing's hosts that are listed and
//!    online; a host listed twice counts once) and no reservation in the book holds it
//!    at `now` or later (its end is at or before `now`). A request is filled whole or
//!    not at all. It gets the lowest free host ids, in ascending order, paired with its
//!    ids in the order given. Each reservation starts at `now`; with a term it ends at
//!    `now + term_ms`. Price, upfront fee, pricing mode and interruptibility are
//!    recorded as given, per host. The shell reads the book and applies the result in
//!    one transaction under the listing's lock, so of 100 concurrent requests for 10
//!    free hosts exactly 10 succeed; the losers read the book after them and get
//!    `sold_out`.
//! 2. **Release** ([`Book::handle_release`]), only by the holder: refused for an unknown
//!    id (`unknown`); for anyone but the holder (`not_holder`, checked before anything
//!    is said about the reservation's state, and naming only the caller); for a
//!    reservation already ended, or whose term ended at or before `now` (`ended`: it
//!    expired at its term, and [`Book::poll_expired`] reports it); before it started
//!    (`before_start`, a clock that ran backwards). It ends at `now`.
//! 3. **Interrupt** ([`Book::handle_interrupt`], [`Book::check_interrupt`]), by the
//!    marketplace for a [`Cause`]: refused for an unknown id (`unknown`), an ended one
//!    (`ended`, as in rule 2), before it started (`before_start`); a do-not-interrupt
//!    reservation is refused whatever the cause (`do_not_interrupt`: never revoked
//!    before its term, whatever happens to prices or to the provider's needs); a cause
//!    its interruptibility did not accept is refused (`not_price_based`,
//!    `not_fulfilment_based`): which causes each interruptibility accepts is the one
//!    rule [`crate::interrupt::may_interrupt`], "don't care" judged by the provider's
//!    goal recorded with the reservation. It ends at `now`: the shell sends
//!    the notice first and calls this when the notice's grace ends, so the holder
//!    keeps control and is billed through the grace.
//! 4. **Expire** ([`Book::poll_expired`]). A reservation with a term ends at exactly
//!    `ends_at_ms`, however late it is polled: every reservation whose term ended at or
//!    before `now` and not yet recorded as ended is ended at its `ends_at_ms`, and
//!    reported once, in the order of their ends and then ids. [`Book::next_deadline`]
//!    is the earliest such end still to record.
//! 5. **Control** ([`Book::holder_of`], [`Book::may_control`]). At an instant a host
//!    has at most one holder: the reservation holding it then (rule 1 makes the holding
//!    intervals of one host disjoint). Only that reservation's holder may control the
//!    host; before its start and from its end on, nobody through it (the shell answers
//!    403).
//! 6. **End and billing.** Every ending comes out as an [`Ended`] naming the host and
//!    the holder: the shell stops and terminates the holder's instances there through
//!    the control path. Billing covers [`Reservation::billing_window`], from the start
//!    to the end (to `now` while it holds): it stops at the instant of the end. A
//!    period is charged ([`Reservation::charge`]) the hourly price for the part of it
//!    within that window, in proportion, rounded half up to a minor unit: a host held
//!    is paid for whether or not anything runs on it, and once however many
//!    instances do (they carry no price plan of their own).
//!
//! # A host that fails is not an interruption
//!
//! There is no "host gone" cause. A host that goes offline or is revoked is an outage
//! of the reservations on it (the shell stops charging for it and reports it against
//! the provider's uptime), not an interruption: the book never ends a do-not-interrupt
//! reservation before its term, so that promise stays absolute here. Such a host drops
//! out of the `available_hosts` the shell passes, so it gets no new reservation.
//!
//! # Invariants (checked by property tests)
//!
//! No host is held by two reservations at any instant; every reservation was given a
//! host that was available and free when it was made; a do-not-interrupt reservation
//! ends only by its holder's release or at its term; a refusal changes nothing; a book
//! rebuilt from its JSON rows at any point behaves identically.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::quote::{Price, Term};

/// An hour, the unit of a reservation's price.
const HOUR_MS: i64 = 3_600_000;
use crate::resell::{Goal, Interruptibility, PricingMode};
use crate::spot::InterruptReason;

pub use crate::interrupt::Cause;

pub use crate::Refusal;
use crate::refuse;

/// A spot clearing's reason, as a cause: a class withdrawn is the provider taking
/// its capacity back.
impl From<InterruptReason> for Cause {
    fn from(reason: InterruptReason) -> Self {
        match reason {
            InterruptReason::Outbid => Cause::Outbid,
            InterruptReason::PriceAboveMax => Cause::PriceAboveMax,
            InterruptReason::ClassWithdrawn => Cause::ProviderReclaim,
        }
    }
}

/// How a reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EndReason {
    /// Its holder released it.
    Released,
    /// Its term ended.
    Expired,
    /// The marketplace interrupted it.
    Interrupted {
        /// Why.
        cause: Cause,
    },
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Released => f.write_str("released"),
            EndReason::Expired => f.write_str("expired"),
            EndReason::Interrupted { cause } => write!(f, "interrupted ({cause})"),
        }
    }
}

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum State {
    /// Not recorded as ended (its term may have passed: see [`Reservation::end_ms`]).
    Active,
    /// Ended.
    Ended {
        /// The instant it ended: control and billing stop then.
        at_ms: UnixMillis,
        /// How.
        why: EndReason,
    },
}

/// One host reserved by one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reservation {
    /// The reservation's id.
    pub id: Uuid,
    /// The listing it was made on.
    pub listing: String,
    /// The host (agent id) it holds.
    pub host: Uuid,
    /// The client account that holds it: the only one that may control the host.
    pub holder: String,
    /// How it was bought.
    pub mode: PricingMode,
    /// Whether and how it may be interrupted.
    pub interruptibility: Interruptibility,
    /// The provider's goal when it was made: what "don't care" allows is judged by it
    /// ([`crate::interrupt::may_interrupt`]).
    pub goal: Goal,
    /// The hourly price of the host, minor units.
    pub price: Price,
    /// The fee paid when it starts, minor units (0 but for long-term terms).
    pub upfront: Price,
    /// When it started.
    pub starts_at_ms: UnixMillis,
    /// When its term ends (`None`: it lasts until released or interrupted).
    pub ends_at_ms: Option<UnixMillis>,
    /// Active or ended.
    pub state: State,
}

impl Reservation {
    /// The instant it stops holding its host: when it was ended, else its term's end;
    /// `None` while it lasts until released.
    pub fn end_ms(&self) -> Option<UnixMillis> {
        match self.state {
            State::Ended { at_ms, .. } => Some(at_ms),
            State::Active => self.ends_at_ms,
        }
    }

    /// Whether it holds its host at `at_ms`: from its start (inclusive) to its end
    /// (exclusive).
    pub fn holds_at(&self, at_ms: UnixMillis) -> bool {
        self.starts_at_ms <= at_ms && self.end_ms().is_none_or(|end| at_ms < end)
    }

    /// Whether it holds its host at `at_ms` or at any later instant (its host is not
    /// free then).
    pub fn holds_from(&self, at_ms: UnixMillis) -> bool {
        self.end_ms().is_none_or(|end| end > at_ms)
    }

    /// The window billed as of `now_ms`: from its start to its end, or to `now_ms`
    /// while it still holds (never before the start).
    pub fn billing_window(&self, now_ms: UnixMillis) -> (UnixMillis, UnixMillis) {
        let end = self.end_ms().map_or(now_ms, |end| end.min(now_ms));
        (self.starts_at_ms, end.max(self.starts_at_ms))
    }

    /// What it owes for the period `[from_ms, to_ms)` as of `now_ms` (rule 6): its
    /// hourly price for the part of the period within its billing window, rounded
    /// half up to a minor unit; `None` when it held the host for none of it or owes
    /// nothing. A host held is charged whether or not anything runs on it, once
    /// however many instances do.
    pub fn charge(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Option<crate::billing::Charge> {
        let (start, end) = self.billing_window(now_ms);
        let held = end.min(to_ms).saturating_sub(start.max(from_ms));
        if held <= 0 {
            return None;
        }
        host_hours("host_hours", held, self.price)
    }

    /// What a spot reservation owes for `[from_ms, to_ms)` as of `now_ms` at the
    /// clearing prices of its class (rule 6 with the price of each period): `prices`
    /// are the clearings as (instant, price), and the price in force at an instant is
    /// that of the last clearing at or before it (its own `price`, the clearing that
    /// gave it the host, before the first), and never more than `cap` (the bid's
    /// maximum: a holder given notice because the price passed its maximum pays no
    /// more than its maximum through the grace). One charge per stretch of one price,
    /// in time order, each rounded half up; none for a stretch that owes nothing.
    pub fn charges_at(
        &self,
        prices: &[(UnixMillis, Price)],
        cap: Option<Price>,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Vec<crate::billing::Charge> {
        let (start, end) = self.billing_window(now_ms);
        let (lo, hi) = (start.max(from_ms), end.min(to_ms));
        if hi <= lo {
            return Vec::new();
        }
        let capped = |p: Price| cap.map_or(p, |c| p.min(c));
        let mut points: Vec<(UnixMillis, Price)> =
            prices.iter().map(|(at, p)| (*at, capped(*p))).collect();
        points.sort();
        // The stretches of one price within [lo, hi).
        let mut price = points
            .iter()
            .rev()
            .find(|(at, _)| *at <= lo)
            .map_or(capped(self.price), |(_, p)| *p);
        let mut stretches: Vec<(i64, Price)> = Vec::new();
        let mut at = lo;
        for (t, p) in points.iter().filter(|(t, _)| *t > lo && *t < hi) {
            if *p != price {
                stretches.push((t - at, price));
                at = *t;
                price = *p;
            }
        }
        stretches.push((hi - at, price));
        stretches
            .into_iter()
            .filter_map(|(held, price)| host_hours("spot_host_hours", held, price))
            .collect()
    }

    fn ended(&self, at_ms: UnixMillis, why: EndReason) -> Ended {
        Ended {
            reservation: self.id,
            listing: self.listing.clone(),
            host: self.host,
            holder: self.holder.clone(),
            at_ms,
            why,
        }
    }
}

/// `held_ms` of a host at `price` an hour under `meter`, rounded half up to a minor
/// unit; `None` when that owes nothing.
fn host_hours(meter: &str, held_ms: i64, price: Price) -> Option<crate::billing::Charge> {
    let rate = i64::try_from(price).unwrap_or(i64::MAX);
    let amount = crate::billing::prorate(rate, held_ms.max(0) as u128, HOUR_MS as u128);
    (amount > 0).then(|| crate::billing::Charge {
        meter: meter.into(),
        quantity: held_ms as f64 / HOUR_MS as f64,
        unit: "host-hour".into(),
        rate,
        amount,
    })
}

/// A reservation that ended: the shell stops and terminates the holder's instances on
/// the host through the control path, and stops billing at `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ended {
    /// The reservation.
    pub reservation: Uuid,
    /// Its listing.
    pub listing: String,
    /// The host it held.
    pub host: Uuid,
    /// The account that held it.
    pub holder: String,
    /// The instant it ended.
    pub at_ms: UnixMillis,
    /// How.
    pub why: EndReason,
}

/// A request for units of one listing, priced by an engine beforehand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Request {
    /// One new reservation id per unit wanted (the shell makes them): their number is
    /// the number of units.
    pub ids: Vec<Uuid>,
    /// The listing.
    pub listing: String,
    /// The client account that will hold the reservations.
    pub holder: String,
    /// How it is bought.
    pub mode: PricingMode,
    /// Whether and how it may be interrupted.
    pub interruptibility: Interruptibility,
    /// The provider's goal now (kept with each reservation).
    pub goal: Goal,
    /// The hourly price per host, minor units.
    pub price: Price,
    /// The fee per host paid at the start, minor units.
    pub upfront: Price,
    /// The term's length (`None`: until released).
    pub term_ms: Option<i64>,
}

impl Request {
    /// This request bought as the long-term `term`: its hourly rate, its upfront fee
    /// and its length.
    pub fn with_term(self, term: &Term) -> Self {
        Request {
            mode: PricingMode::Reserved,
            price: term.hourly,
            upfront: term.upfront,
            term_ms: Some(term.term_ms),
            ..self
        }
    }
}

/// The reservations of one or several listings, keyed by id; stored as its rows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "Vec<Reservation>", into = "Vec<Reservation>")]
pub struct Book {
    reservations: BTreeMap<Uuid, Reservation>,
}

impl From<Vec<Reservation>> for Book {
    fn from(rows: Vec<Reservation>) -> Self {
        Book::from_rows(rows)
    }
}

impl From<Book> for Vec<Reservation> {
    fn from(book: Book) -> Self {
        book.reservations.into_values().collect()
    }
}

impl Book {
    /// A book rebuilt from stored rows, in any order (an id given twice: the last
    /// counts). The shell loads at least the reservations of the hosts concerned that
    /// have not ended, and the one a release or an interruption names.
    pub fn from_rows(rows: impl IntoIterator<Item = Reservation>) -> Self {
        Book {
            reservations: rows.into_iter().map(|r| (r.id, r)).collect(),
        }
    }

    /// Every reservation, by id.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// The reservation `id`.
    pub fn get(&self, id: Uuid) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    /// The hosts of `available_hosts` free at `now_ms` (rule 1), ascending.
    pub fn free(&self, now_ms: UnixMillis, available_hosts: &[Uuid]) -> Vec<Uuid> {
        let held: BTreeSet<Uuid> = self
            .reservations
            .values()
            .filter(|r| r.holds_from(now_ms))
            .map(|r| r.host)
            .collect();
        let available: BTreeSet<Uuid> = available_hosts.iter().copied().collect();
        available.difference(&held).copied().collect()
    }

    /// Reserves `request.ids.len()` free hosts at `now_ms` (rule 1): the new
    /// reservations, in the order of the ids.
    pub fn handle_reserve(
        &mut self,
        now_ms: UnixMillis,
        request: Request,
        available_hosts: &[Uuid],
    ) -> Result<Vec<Reservation>, Refusal> {
        let wanted = request.ids.len();
        if wanted == 0 {
            return Err(refuse(
                "units",
                format!(
                    "a reservation of {} wants at least one unit, not 0",
                    request.listing
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for id in &request.ids {
            if !seen.insert(*id) {
                return Err(refuse(
                    "duplicate",
                    format!("reservation id {id} is given twice in the request"),
                ));
            }
            if self.reservations.contains_key(id) {
                return Err(refuse(
                    "duplicate",
                    format!("reservation id {id} is already in the book"),
                ));
            }
        }
        if let Some(term) = request.term_ms.filter(|t| *t <= 0) {
            return Err(refuse(
                "term",
                format!("a term must be positive, not {term} ms"),
            ));
        }
        if request.holder.is_empty() {
            return Err(refuse(
                "holder",
                format!(
                    "a reservation of {} needs a holder's account",
                    request.listing
                ),
            ));
        }
        let free = self.free(now_ms, available_hosts);
        if free.len() < wanted {
            let available = available_hosts.iter().collect::<BTreeSet<_>>().len();
            return Err(refuse(
                "sold_out",
                format!(
                    "{wanted} units of {} wanted, {} free of {available} available",
                    request.listing,
                    free.len()
                ),
            ));
        }
        let ends_at_ms = request.term_ms.map(|t| now_ms.saturating_add(t));
        let made: Vec<Reservation> = request
            .ids
            .iter()
            .zip(free)
            .map(|(&id, host)| Reservation {
                id,
                listing: request.listing.clone(),
                host,
                holder: request.holder.clone(),
                mode: request.mode,
                interruptibility: request.interruptibility,
                goal: request.goal,
                price: request.price,
                upfront: request.upfront,
                starts_at_ms: now_ms,
                ends_at_ms,
                state: State::Active,
            })
            .collect();
        for r in &made {
            self.reservations.insert(r.id, r.clone());
        }
        Ok(made)
    }

    /// The reservation `id`, if it holds its host from `now_ms` on: refused `unknown`,
    /// `ended` or `before_start` otherwise.
    fn live(&self, now_ms: UnixMillis, id: Uuid) -> Result<&Reservation, Refusal> {
        let r = self
            .reservations
            .get(&id)
            .ok_or_else(|| refuse("unknown", format!("no reservation {id}")))?;
        Self::still_holding(r, now_ms)?;
        Ok(r)
    }

    fn still_holding(r: &Reservation, now_ms: UnixMillis) -> Result<(), Refusal> {
        match (r.state, r.ends_at_ms) {
            (State::Ended { at_ms, why }, _) => Err(refuse(
                "ended",
                format!("reservation {} ended at {at_ms} ({why})", r.id),
            )),
            (State::Active, Some(end)) if end <= now_ms => Err(refuse(
                "ended",
                format!("reservation {} expired at {end}, before {now_ms}", r.id),
            )),
            _ if now_ms < r.starts_at_ms => Err(refuse(
                "before_start",
                format!(
                    "reservation {} starts at {}; {now_ms} is before it",
                    r.id, r.starts_at_ms
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Ends reservation `id` at `now_ms` at the request of `by` (rule 2): only its
    /// holder may.
    pub fn handle_release(
        &mut self,
        now_ms: UnixMillis,
        id: Uuid,
        by: &str,
    ) -> Result<Ended, Refusal> {
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or_else(|| refuse("unknown", format!("no reservation {id}")))?;
        if r.holder != by {
            return Err(refuse(
                "not_holder",
                format!("{by} does not hold reservation {id}"),
            ));
        }
        Self::still_holding(r, now_ms)?;
        let why = EndReason::Released;
        r.state = State::Ended { at_ms: now_ms, why };
        Ok(r.ended(now_ms, why))
    }

    /// Whether reservation `id` may be interrupted at `now_ms` for `cause` (rule 3),
    /// without ending it: the shell asks this before it sends a notice.
    pub fn check_interrupt(
        &self,
        now_ms: UnixMillis,
        id: Uuid,
        cause: Cause,
    ) -> Result<&Reservation, Refusal> {
        let r = self.live(now_ms, id)?;
        crate::interrupt::may_interrupt(r.interruptibility, r.goal, cause)
            .map_err(|e| refuse(e.rule, format!("reservation {id}: {}", e.message)))?;
        Ok(r)
    }

    /// Ends reservation `id` at `now_ms` for `cause` (rule 3), when the notice's grace
    /// has ended.
    pub fn handle_interrupt(
        &mut self,
        now_ms: UnixMillis,
        id: Uuid,
        cause: Cause,
    ) -> Result<Ended, Refusal> {
        self.check_interrupt(now_ms, id, cause)?;
        let r = self
            .reservations
            .get_mut(&id)
            .expect("check_interrupt found the reservation");
        let why = EndReason::Interrupted { cause };
        r.state = State::Ended { at_ms: now_ms, why };
        Ok(r.ended(now_ms, why))
    }

    /// Records every reservation whose term ended at or before `now_ms` as expired at
    /// its term's end (rule 4), and reports each once, by end and then id.
    pub fn poll_expired(&mut self, now_ms: UnixMillis) -> Vec<Ended> {
        let mut ended: Vec<Ended> = self
            .reservations
            .values_mut()
            .filter(|r| r.state == State::Active)
            .filter_map(|r| {
                let end = r.ends_at_ms.filter(|end| *end <= now_ms)?;
                let why = EndReason::Expired;
                r.state = State::Ended { at_ms: end, why };
                Some(r.ended(end, why))
            })
            .collect();
        ended.sort_by_key(|e| (e.at_ms, e.reservation));
        ended
    }

    /// When [`Book::poll_expired`] next has something to record: the earliest term's
    /// end of a reservation not yet recorded as ended.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        self.reservations
            .values()
            .filter(|r| r.state == State::Active)
            .filter_map(|r| r.ends_at_ms)
            .min()
    }

    /// The reservation holding `host` at `now_ms` (rule 5), if any.
    pub fn holder_of(&self, host: Uuid, now_ms: UnixMillis) -> Option<&Reservation> {
        self.reservations
            .values()
            .find(|r| r.host == host && r.holds_at(now_ms))
    }

    /// Whether `account` may send control commands to `host` at `now_ms` (rule 5):
    /// only the holder of the reservation holding it then.
    pub fn may_control(&self, host: Uuid, account: &str, now_ms: UnixMillis) -> bool {
        self.holder_of(host, now_ms)
            .is_some_and(|r| r.holder == account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use Interruptibility::{DontCare, FulfilmentBased, NoInterruptions, PriceBased};

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn request(ids: Vec<Uuid>, holder: &str, i: Interruptibility, term: Option<i64>) -> Request {
        Request {
            ids,
            listing: "lst-1".into(),
            holder: holder.into(),
            mode: PricingMode::OnDemand,
            interruptibility: i,
            // Under this goal "don't care" allows every cause; the goal's part is
            // crate::interrupt's, pinned there and in `dont_care_follows_the_goal_recorded_with_the_reservation`.
            goal: Goal::CapacityBackAtShortNotice,
            price: 30,
            upfront: 0,
            term_ms: term,
        }
    }

    /// Each case: (rule it pins, reservation's start, its end if any, period, now,
    /// the amount owed at 30 an hour).
    #[test]
    fn a_period_is_charged_the_part_of_it_the_host_was_held() {
        type Case = (&'static str, i64, Option<i64>, (i64, i64), i64, Option<i64>);
        const H: i64 = HOUR_MS;
        let cases: [Case; 7] = [
            ("the whole hour held", 0, None, (0, H), 2 * H, Some(30)),
            ("started half way", H / 2, None, (0, H), 2 * H, Some(15)),
            ("ended a third in", 0, Some(H / 3), (0, H), 2 * H, Some(10)),
            (
                "not yet held: before the start",
                H,
                None,
                (0, H),
                2 * H,
                None,
            ),
            (
                "ended before the period",
                0,
                Some(H),
                (H, 2 * H),
                3 * H,
                None,
            ),
            (
                "only to now while it holds",
                0,
                None,
                (0, H),
                H / 2,
                Some(15),
            ),
            (
                "a second, rounded half up to a minor unit",
                0,
                Some(1_000),
                (0, H),
                H,
                None,
            ),
        ];
        for (rule, start, end, (from, to), now, owed) in cases {
            let mut r = Book::default()
                .handle_reserve(
                    start,
                    request(vec![id(1)], "alice", NoInterruptions, None),
                    &[id(9)],
                )
                .unwrap()
                .remove(0);
            if let Some(end) = end {
                r.state = State::Ended {
                    at_ms: end,
                    why: EndReason::Released,
                };
            }
            assert_eq!(r.charge(from, to, now).map(|c| c.amount), owed, "{rule}");
        }
    }

    /// A spot reservation pays each clearing's price for the stretch it was in force:
    /// (name, clearings, period, charges as (hours held in minutes, rate, amount)).
    #[test]
    fn a_spot_reservation_pays_the_clearing_price_of_each_stretch() {
        type Case = (
            &'static str,
            Vec<(i64, Price)>,
            (i64, i64),
            Vec<(i64, i64, i64)>,
        );
        const H: i64 = HOUR_MS;
        const M: i64 = 60_000;
        let cases: Vec<Case> = vec![
            (
                "no clearing since: its own price",
                vec![],
                (0, H),
                vec![(60, 30, 30)],
            ),
            (
                "one change half way",
                vec![(0, 30), (H / 2, 50)],
                (0, H),
                vec![(30, 30, 15), (30, 50, 25)],
            ),
            (
                "a clearing at the same price splits nothing",
                vec![(0, 30), (H / 2, 30)],
                (0, H),
                vec![(60, 30, 30)],
            ),
            (
                "the price in force before the period counts",
                vec![(-H, 40)],
                (0, H),
                vec![(60, 40, 40)],
            ),
            (
                "a clearing at the period's end belongs to the next",
                vec![(H, 90)],
                (0, H),
                vec![(60, 30, 30)],
            ),
            (
                "a stretch owing nothing is left out",
                vec![(0, 30), (1_000, 0)],
                (0, H),
                vec![],
            ),
        ];
        for (name, prices, (from, to), want) in cases {
            let r = Book::default()
                .handle_reserve(0, request(vec![id(1)], "alice", PriceBased, None), &[id(9)])
                .unwrap()
                .remove(0);
            let got: Vec<(i64, i64, i64)> = r
                .charges_at(&prices, None, from, to, 2 * H)
                .iter()
                .map(|c| {
                    (
                        (c.quantity * H as f64 / M as f64).round() as i64,
                        c.rate,
                        c.amount,
                    )
                })
                .collect();
            assert_eq!(got, want, "{name}");
        }
        // Never above the cap: 30 until half way, then 50 capped at 40.
        let r = Book::default()
            .handle_reserve(0, request(vec![id(1)], "alice", PriceBased, None), &[id(9)])
            .unwrap()
            .remove(0);
        let capped: Vec<(i64, i64)> = r
            .charges_at(&[(0, 30), (H / 2, 50)], Some(40), 0, H, 2 * H)
            .iter()
            .map(|c| (c.rate, c.amount))
            .collect();
        assert_eq!(capped, [(30, 15), (40, 20)]);
        // With one price throughout it is the plain charge.
        let r = Book::default()
            .handle_reserve(0, request(vec![id(1)], "alice", PriceBased, None), &[id(9)])
            .unwrap()
            .remove(0);
        assert_eq!(
            r.charges_at(&[], None, 0, H / 3, H)
                .first()
                .map(|c| c.amount),
            r.charge(0, H / 3, H).map(|c| c.amount)
        );
    }

    /// One step of a lifecycle script. Reservations are numbered from 1 in the order
    /// they are made (reservation n has id n); hosts are `id(h)`.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// (time, holder, units, interruptibility, term, available hosts).
        Reserve(
            UnixMillis,
            &'static str,
            u32,
            Interruptibility,
            Option<i64>,
            &'static [u128],
        ),
        /// (time, reservation, by).
        Release(UnixMillis, u128, &'static str),
        /// (time, reservation, cause).
        Interrupt(UnixMillis, u128, Cause),
        /// (time).
        Poll(UnixMillis),
        /// (time, host).
        Holder(UnixMillis, u128),
        /// (time, host, account).
        Control(UnixMillis, u128, &'static str),
        /// (time, reservation).
        Billing(UnixMillis, u128),
        /// The next deadline.
        Deadline,
    }
    use Step::*;

    fn show(e: &Ended) -> String {
        format!(
            "r{} ended at {}: {}",
            e.reservation.as_u128(),
            e.at_ms,
            e.why
        )
    }

    /// Runs `steps` on an empty book: what each did, as text (a refusal as its rule).
    /// A refused step must leave the book as it was.
    fn check(steps: &[Step]) -> Vec<String> {
        let mut book = Book::default();
        let mut next = 1u128;
        let mut out = Vec::new();
        for step in steps {
            let before = book.clone();
            let got: Result<String, Refusal> = match *step {
                Reserve(at, holder, units, i, term, available) => {
                    let ids = (next..next + u128::from(units)).map(id).collect();
                    let hosts: Vec<Uuid> = available.iter().map(|h| id(*h)).collect();
                    book.handle_reserve(at, request(ids, holder, i, term), &hosts)
                        .map(|made| {
                            next += made.len() as u128;
                            made.iter()
                                .map(|r| format!("r{}@h{}", r.id.as_u128(), r.host.as_u128()))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                }
                Release(at, n, by) => book.handle_release(at, id(n), by).map(|e| show(&e)),
                Interrupt(at, n, cause) => {
                    book.handle_interrupt(at, id(n), cause).map(|e| show(&e))
                }
                Poll(at) => {
                    let ended: Vec<String> = book.poll_expired(at).iter().map(show).collect();
                    Ok(if ended.is_empty() {
                        "none".into()
                    } else {
                        ended.join("; ")
                    })
                }
                Holder(at, h) => Ok(book
                    .holder_of(id(h), at)
                    .map_or("nobody".into(), |r| format!("r{}", r.id.as_u128()))),
                Control(at, h, account) => Ok(if book.may_control(id(h), account, at) {
                    "yes".into()
                } else {
                    "no".into()
                }),
                Billing(at, n) => Ok(book
                    .get(id(n))
                    .map(|r| r.billing_window(at))
                    .map_or("unknown".into(), |(s, e)| format!("{s}..{e}"))),
                Deadline => Ok(book
                    .next_deadline()
                    .map_or("none".into(), |d| d.to_string())),
            };
            out.push(match got {
                Ok(text) => text,
                Err(r) => {
                    assert_eq!(
                        book, before,
                        "{step:?} was refused ({r}) but changed the book"
                    );
                    r.rule.to_owned()
                }
            });
        }
        out
    }

    const ALL: &[u128] = &[1, 2, 3];

    /// Each case: (rule it pins, steps, what each step did).
    #[test]
    fn a_reservation_lives_by_the_rules() {
        type Case = (&'static str, Vec<Step>, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            (
                "reserve takes the lowest free host",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, &[3, 1, 2]),
                    Reserve(100, "bob", 1, DontCare, None, &[3, 1, 2]),
                ],
                vec!["r1@h1", "r2@h2"],
            ),
            (
                "several units: the lowest free hosts, all or none",
                vec![
                    Reserve(100, "alice", 2, DontCare, None, ALL),
                    Reserve(100, "bob", 2, DontCare, None, ALL),
                    Reserve(100, "bob", 1, DontCare, None, ALL),
                    Reserve(100, "bob", 1, DontCare, None, ALL),
                ],
                vec!["r1@h1 r2@h2", "sold_out", "r3@h3", "sold_out"],
            ),
            (
                "a host listed twice counts once",
                vec![Reserve(100, "alice", 2, DontCare, None, &[1, 1])],
                vec!["sold_out"],
            ),
            (
                "only the available hosts are free",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, &[2]),
                    Reserve(100, "alice", 1, DontCare, None, &[]),
                ],
                vec!["r1@h2", "sold_out"],
            ),
            (
                "a request for no unit is refused",
                vec![Reserve(100, "alice", 0, DontCare, None, ALL)],
                vec!["units"],
            ),
            (
                "a term that is not positive is refused",
                vec![
                    Reserve(100, "alice", 1, DontCare, Some(0), ALL),
                    Reserve(100, "alice", 1, DontCare, Some(-5), ALL),
                ],
                vec!["term", "term"],
            ),
            (
                "a reservation needs a holder",
                vec![Reserve(100, "", 1, DontCare, None, ALL)],
                vec!["holder"],
            ),
            (
                "release by the holder only",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, ALL),
                    Release(500, 1, "bob"),
                    Release(500, 1, "alice"),
                ],
                vec!["r1@h1", "not_holder", "r1 ended at 500: released"],
            ),
            (
                "release twice is refused, and a stranger hears only not_holder",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, ALL),
                    Release(500, 1, "alice"),
                    Release(600, 1, "alice"),
                    Release(600, 1, "bob"),
                ],
                vec!["r1@h1", "r1 ended at 500: released", "ended", "not_holder"],
            ),
            (
                "an unknown reservation is refused",
                vec![Release(500, 7, "alice"), Interrupt(500, 7, Cause::Outbid)],
                vec!["unknown", "unknown"],
            ),
            (
                "nothing ends before it started",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, ALL),
                    Release(99, 1, "alice"),
                    Interrupt(99, 1, Cause::Outbid),
                ],
                vec!["r1@h1", "before_start", "before_start"],
            ),
            (
                "a released host is free at the same instant",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, &[1]),
                    Release(300, 1, "alice"),
                    Reserve(300, "bob", 1, DontCare, None, &[1]),
                    Holder(299, 1),
                    Holder(300, 1),
                ],
                vec!["r1@h1", "r1 ended at 300: released", "r2@h1", "r1", "r2"],
            ),
            (
                "a clock running backwards never books a held host",
                vec![
                    Reserve(500, "alice", 1, DontCare, None, &[1]),
                    Reserve(300, "bob", 1, DontCare, None, &[1]),
                    Release(900, 1, "alice"),
                    Reserve(800, "bob", 1, DontCare, None, &[1]),
                    Reserve(900, "bob", 1, DontCare, None, &[1]),
                ],
                vec![
                    "r1@h1",
                    "sold_out",
                    "r1 ended at 900: released",
                    "sold_out",
                    "r2@h1",
                ],
            ),
            (
                "expiry at exactly ends_at",
                vec![
                    Reserve(100, "alice", 1, NoInterruptions, Some(100), ALL),
                    Deadline,
                    Poll(199),
                    Holder(199, 1),
                    Holder(200, 1),
                    Poll(200),
                    Poll(200),
                    Deadline,
                ],
                vec![
                    "r1@h1",
                    "200",
                    "none",
                    "r1",
                    "nobody",
                    "r1 ended at 200: expired",
                    "none",
                    "none",
                ],
            ),
            (
                "an expiry polled late ends at its term, not at the poll",
                vec![
                    Reserve(100, "alice", 1, DontCare, Some(100), ALL),
                    Reserve(150, "bob", 1, DontCare, Some(20), ALL),
                    Deadline,
                    Poll(1_000),
                    Billing(2_000, 1),
                ],
                vec![
                    "r1@h1",
                    "r2@h2",
                    "170",
                    "r2 ended at 170: expired; r1 ended at 200: expired",
                    "100..200",
                ],
            ),
            (
                "a term that passed ends it before it is polled",
                vec![
                    Reserve(100, "alice", 1, DontCare, Some(100), &[1]),
                    Release(200, 1, "alice"),
                    Interrupt(200, 1, Cause::Outbid),
                    Control(200, 1, "alice"),
                    Reserve(200, "bob", 1, DontCare, None, &[1]),
                    Poll(300),
                ],
                vec![
                    "r1@h1",
                    "ended",
                    "ended",
                    "no",
                    "r2@h1",
                    "r1 ended at 200: expired",
                ],
            ),
            (
                "interruption ends it at that instant, for a cause it accepted",
                vec![
                    Reserve(100, "alice", 1, PriceBased, None, ALL),
                    Interrupt(300, 1, Cause::ProviderReclaim),
                    Interrupt(300, 1, Cause::PriceAboveMax),
                    Interrupt(400, 1, Cause::Outbid),
                    Billing(1_000, 1),
                ],
                vec![
                    "r1@h1",
                    "not_fulfilment_based",
                    "r1 ended at 300: interrupted (price above max)",
                    "ended",
                    "100..300",
                ],
            ),
            (
                "a do-not-interrupt reservation is never interrupted, then expires",
                vec![
                    Reserve(100, "alice", 1, NoInterruptions, Some(1_000), ALL),
                    Interrupt(200, 1, Cause::Outbid),
                    Interrupt(200, 1, Cause::PriceAboveMax),
                    Interrupt(200, 1, Cause::ProviderReclaim),
                    Poll(1_100),
                ],
                vec![
                    "r1@h1",
                    "do_not_interrupt",
                    "do_not_interrupt",
                    "do_not_interrupt",
                    "r1 ended at 1100: expired",
                ],
            ),
            (
                "control only by the current holder, and by nobody after the end",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, ALL),
                    Control(99, 1, "alice"),
                    Control(100, 1, "alice"),
                    Control(150, 1, "bob"),
                    Control(150, 2, "alice"),
                    Release(400, 1, "alice"),
                    Control(399, 1, "alice"),
                    Control(400, 1, "alice"),
                    Holder(400, 1),
                ],
                vec![
                    "r1@h1",
                    "no",
                    "yes",
                    "no",
                    "no",
                    "r1 ended at 400: released",
                    "yes",
                    "no",
                    "nobody",
                ],
            ),
            (
                "the billing window ends at the end instant",
                vec![
                    Reserve(100, "alice", 1, DontCare, None, ALL),
                    Billing(50, 1),
                    Billing(250, 1),
                    Release(400, 1, "alice"),
                    Billing(250, 1),
                    Billing(9_000, 1),
                ],
                vec![
                    "r1@h1",
                    "100..100",
                    "100..250",
                    "r1 ended at 400: released",
                    "100..250",
                    "100..400",
                ],
            ),
        ];
        for (rule, steps, want) in cases {
            assert_eq!(check(&steps), want, "{rule}");
        }
    }

    /// Each case: (rule it pins, interruptibility, cause, allowed).
    #[test]
    fn each_interruptibility_accepts_its_causes() {
        type Case = (
            &'static str,
            Interruptibility,
            Cause,
            Result<(), &'static str>,
        );
        let cases: [Case; 12] = [
            (
                "do-not-interrupt: not when outbid",
                NoInterruptions,
                Cause::Outbid,
                Err("do_not_interrupt"),
            ),
            (
                "do-not-interrupt: not above its maximum",
                NoInterruptions,
                Cause::PriceAboveMax,
                Err("do_not_interrupt"),
            ),
            (
                "do-not-interrupt: not by a reclaim",
                NoInterruptions,
                Cause::ProviderReclaim,
                Err("do_not_interrupt"),
            ),
            (
                "price-based: when outbid",
                PriceBased,
                Cause::Outbid,
                Ok(()),
            ),
            (
                "price-based: above its maximum",
                PriceBased,
                Cause::PriceAboveMax,
                Ok(()),
            ),
            (
                "price-based: not by a reclaim",
                PriceBased,
                Cause::ProviderReclaim,
                Err("not_fulfilment_based"),
            ),
            (
                "fulfilment-based: not when outbid",
                FulfilmentBased,
                Cause::Outbid,
                Err("not_price_based"),
            ),
            (
                "fulfilment-based: not above a maximum",
                FulfilmentBased,
                Cause::PriceAboveMax,
                Err("not_price_based"),
            ),
            (
                "fulfilment-based: by a reclaim",
                FulfilmentBased,
                Cause::ProviderReclaim,
                Ok(()),
            ),
            ("don't care: when outbid", DontCare, Cause::Outbid, Ok(())),
            (
                "don't care: above a maximum",
                DontCare,
                Cause::PriceAboveMax,
                Ok(()),
            ),
            (
                "don't care: by a reclaim",
                DontCare,
                Cause::ProviderReclaim,
                Ok(()),
            ),
        ];
        for (rule, i, cause, want) in cases {
            let mut book = Book::default();
            book.handle_reserve(0, request(vec![id(1)], "alice", i, None), &[id(1)])
                .unwrap();
            assert_eq!(
                book.check_interrupt(10, id(1), cause)
                    .map(|_| ())
                    .map_err(|r| r.rule),
                want,
                "{rule}"
            );
            assert_eq!(
                crate::interrupt::may_interrupt(i, Goal::CapacityBackAtShortNotice, cause).is_ok(),
                want.is_ok(),
                "{rule}: the book asks the one rule"
            );
            let got = book.handle_interrupt(10, id(1), cause);
            assert_eq!(got.as_ref().map(|_| ()).map_err(|r| r.rule), want, "{rule}");
            if let Ok(e) = got {
                assert_eq!((e.at_ms, e.why), (10, EndReason::Interrupted { cause }));
            }
        }
        assert_eq!(
            Cause::from(InterruptReason::ClassWithdrawn),
            Cause::ProviderReclaim
        );
    }

    /// "Don't care" is judged by the goal the provider had when the reservation was
    /// made, through the one rule of `crate::interrupt`.
    #[test]
    fn dont_care_follows_the_goal_recorded_with_the_reservation() {
        for (rule, goal, cause, want) in [
            (
                "long-term utilisation: never interrupted",
                Goal::MaximiseUtilisation,
                Cause::Outbid,
                Err("do_not_interrupt"),
            ),
            (
                "revenue: by prices",
                Goal::MaximiseRevenue,
                Cause::PriceAboveMax,
                Ok(()),
            ),
            (
                "revenue: not by a reclaim",
                Goal::MaximiseRevenue,
                Cause::ProviderReclaim,
                Err("not_fulfilment_based"),
            ),
            (
                "capacity back at short notice: by a reclaim",
                Goal::CapacityBackAtShortNotice,
                Cause::ProviderReclaim,
                Ok(()),
            ),
        ] {
            let mut book = Book::default();
            let r = Request {
                goal,
                ..request(vec![id(1)], "alice", DontCare, None)
            };
            book.handle_reserve(0, r, &[id(100)]).unwrap();
            assert_eq!(
                book.handle_interrupt(10, id(1), cause)
                    .map(|_| ())
                    .map_err(|r| r.rule),
                want,
                "{rule}"
            );
        }
    }

    #[test]
    fn refusals_name_the_rule_and_the_numbers() {
        let mut book = Book::default();
        let hosts = [id(1), id(2), id(3)];
        book.handle_reserve(0, request(vec![id(10)], "alice", DontCare, None), &hosts)
            .unwrap();
        let sold_out = book
            .handle_reserve(
                0,
                request(vec![id(11), id(12), id(13)], "bob", DontCare, None),
                &hosts,
            )
            .unwrap_err();
        assert_eq!(sold_out.rule, "sold_out");
        assert!(
            sold_out
                .message
                .contains("3 units of lst-1 wanted, 2 free of 3 available"),
            "{sold_out}"
        );
        let duplicate = book
            .handle_reserve(0, request(vec![id(10)], "bob", DontCare, None), &hosts)
            .unwrap_err();
        assert_eq!(duplicate.rule, "duplicate");
        let twice = book
            .handle_reserve(
                0,
                request(vec![id(20), id(20)], "bob", DontCare, None),
                &hosts,
            )
            .unwrap_err();
        assert_eq!(twice.rule, "duplicate");
        let stranger = book.handle_release(5, id(10), "mallory").unwrap_err();
        assert!(
            !stranger.message.contains("alice"),
            "names no holder: {stranger}"
        );
    }

    #[test]
    fn a_long_term_request_takes_the_terms_prices_and_length() {
        let term = Term {
            upfront: 1_000,
            hourly: 20,
            term_ms: 3_600_000,
        };
        let mut book = Book::default();
        let made = book
            .handle_reserve(
                5,
                request(vec![id(1)], "alice", NoInterruptions, None).with_term(&term),
                &[id(9)],
            )
            .unwrap();
        let r = &made[0];
        assert_eq!(
            (r.mode, r.price, r.upfront, r.ends_at_ms),
            (PricingMode::Reserved, 20, 1_000, Some(3_600_005))
        );
    }

    /// An input of the generated runs.
    #[derive(Debug, Clone)]
    enum Input {
        /// (clock step, holder, units, interruptibility, term, available hosts mask).
        Reserve(i64, u8, u32, Interruptibility, Option<i64>, u8),
        /// (clock step, which reservation, by its holder or another).
        Release(i64, prop::sample::Index, bool),
        /// (clock step, which reservation, cause).
        Interrupt(i64, prop::sample::Index, Cause),
        /// (clock step).
        Poll(i64),
    }

    const HOSTS: u128 = 4;

    fn inputs() -> impl Strategy<Value = Vec<Input>> {
        let interruptibility = prop_oneof![
            Just(DontCare),
            Just(PriceBased),
            Just(FulfilmentBased),
            Just(NoInterruptions)
        ];
        let cause = prop_oneof![
            Just(Cause::Outbid),
            Just(Cause::PriceAboveMax),
            Just(Cause::ProviderReclaim)
        ];
        let step = -20i64..60;
        let input = prop_oneof![
            4 => (step.clone(), 0u8..3, 0u32..4, interruptibility,
                  proptest::option::of(-5i64..300), any::<u8>())
                .prop_map(|(d, h, u, i, t, m)| Input::Reserve(d, h, u, i, t, m)),
            2 => (step.clone(), any::<prop::sample::Index>(), any::<bool>())
                .prop_map(|(d, n, own)| Input::Release(d, n, own)),
            2 => (step.clone(), any::<prop::sample::Index>(), cause)
                .prop_map(|(d, n, c)| Input::Interrupt(d, n, c)),
            1 => step.prop_map(Input::Poll),
        ];
        proptest::collection::vec(input, 0..40)
    }

    /// What one input did, to compare runs.
    #[derive(Debug, Clone, PartialEq)]
    enum Did {
        /// (time, available hosts, the hosts free before it by the model, outcome).
        Reserved(
            UnixMillis,
            Vec<Uuid>,
            Vec<Uuid>,
            Result<Vec<Reservation>, Refusal>,
        ),
        /// (time, the reservation named, by whom for a release (`None`: an
        /// interruption), outcome).
        Ended(UnixMillis, Uuid, Option<String>, Result<Ended, Refusal>),
        /// (time, what expired).
        Polled(UnixMillis, Vec<Ended>),
    }

    /// The model of rule 1: the distinct available hosts on which no reservation of
    /// `book` ends after `now` (or never), ascending.
    fn model_free(book: &Book, now: UnixMillis, available: &[Uuid]) -> Vec<Uuid> {
        let mut free: Vec<Uuid> = available
            .iter()
            .copied()
            .filter(|h| {
                book.reservations()
                    .filter(|r| r.host == *h)
                    .all(|r| r.end_ms().is_some_and(|end| end <= now))
            })
            .collect();
        free.sort();
        free.dedup();
        free
    }

    /// The holding intervals of each host are disjoint: no host is held by two
    /// reservations at any instant.
    fn assert_no_host_held_twice(book: &Book) {
        for h in 1..=HOSTS {
            let mut on: Vec<(UnixMillis, Option<UnixMillis>)> = book
                .reservations()
                .filter(|r| r.host == id(h))
                .map(|r| (r.starts_at_ms, r.end_ms()))
                .collect();
            on.sort();
            for w in on.windows(2) {
                assert!(
                    w[0].1.is_some_and(|end| end <= w[1].0),
                    "host {h} held twice: {on:?}"
                );
            }
            for &(start, _) in &on {
                let holders = book
                    .reservations()
                    .filter(|r| r.host == id(h) && r.holds_at(start));
                assert!(
                    holders.count() <= 1,
                    "host {h} held twice at {start}: {on:?}"
                );
            }
        }
    }

    /// Applies `inputs` to `book`, the clock starting at 1000 and moving by each
    /// input's step (backwards too), rebuilding the book from its JSON rows before
    /// the input at `reload_at`; the nth input's reservations get ids 100n, 100n+1...
    /// After every input: a refusal changed nothing and no host is held twice.
    fn apply(book: &mut Book, inputs: &[Input], reload_at: Option<usize>) -> Vec<Did> {
        let mut now = 1_000i64;
        let mut did = Vec::new();
        let pick = |book: &Book, n: &prop::sample::Index| {
            let all: Vec<&Reservation> = book.reservations().collect();
            if all.is_empty() {
                (id(0), "client-x".to_owned())
            } else {
                let r = all[n.index(all.len())];
                (r.id, r.holder.clone())
            }
        };
        for (i, input) in inputs.iter().enumerate() {
            if reload_at == Some(i) {
                let rows = serde_json::to_string(&*book).unwrap();
                *book = serde_json::from_str(&rows).unwrap();
            }
            let before = book.clone();
            let step = match input {
                Input::Reserve(d, holder, units, interruptibility, term, mask) => {
                    now += d;
                    let ids = (0..*units)
                        .map(|k| id(100 * i as u128 + u128::from(k)))
                        .collect();
                    let available: Vec<Uuid> = (0..HOSTS)
                        .filter(|h| mask & (1 << h) != 0)
                        .map(|h| id(h + 1))
                        .collect();
                    let free = model_free(book, now, &available);
                    let holder = format!("client-{holder}");
                    let req = request(ids, &holder, *interruptibility, *term);
                    let got = book.handle_reserve(now, req, &available);
                    Did::Reserved(now, available, free, got)
                }
                Input::Release(d, n, own) => {
                    now += d;
                    let (r, holder) = pick(book, n);
                    let by = if *own { holder } else { "client-x".to_owned() };
                    let got = book.handle_release(now, r, &by);
                    Did::Ended(now, r, Some(by), got)
                }
                Input::Interrupt(d, n, cause) => {
                    now += d;
                    let (r, _) = pick(book, n);
                    Did::Ended(now, r, None, book.handle_interrupt(now, r, *cause))
                }
                Input::Poll(d) => {
                    now += d;
                    Did::Polled(now, book.poll_expired(now))
                }
            };
            if matches!(step, Did::Reserved(.., Err(_)) | Did::Ended(.., Err(_))) {
                assert_eq!(*book, before, "a refusal changed the book: {step:?}");
            }
            assert_no_host_held_twice(book);
            did.push(step);
        }
        did
    }

    proptest! {
        /// (1) No host is held by two reservations at any time (checked after every
        /// input by `apply`); (2) a request is filled exactly when enough available
        /// hosts are free, with the lowest of them, so the hosts held never exceed
        /// those available.
        #[test]
        fn a_host_is_never_held_twice_and_allocations_never_exceed_capacity(inputs in inputs()) {
            let mut book = Book::default();
            for did in apply(&mut book, &inputs, None) {
                let Did::Reserved(now, available, free, got) = did else { continue };
                match got {
                    Ok(made) => {
                        let hosts: Vec<Uuid> = made.iter().map(|r| r.host).collect();
                        prop_assert!(hosts.len() <= free.len());
                        prop_assert_eq!(&hosts[..], &free[..hosts.len()]);
                        let held = book
                            .reservations()
                            .filter(|r| r.holds_at(now) && available.contains(&r.host))
                            .count();
                        prop_assert!(held <= available.len());
                    }
                    Err(r) if r.rule == "sold_out" => {
                        let named = format!("{} free", free.len());
                        prop_assert!(r.message.contains(&named), "{}", r);
                    }
                    Err(_) => {}
                }
            }
        }

        /// (3) A do-not-interrupt reservation ends only by its holder's release or
        /// at exactly its term, and every interruption of one is refused.
        #[test]
        fn a_do_not_interrupt_reservation_is_never_revoked(inputs in inputs()) {
            let mut book = Book::default();
            let did = apply(&mut book, &inputs, None);
            let firm = |id: Uuid| book.get(id).is_some_and(|r| r.interruptibility == NoInterruptions);
            for d in &did {
                match d {
                    Did::Ended(_, r, by, got) if firm(*r) => match (by, got) {
                        (None, got) => prop_assert!(got.is_err(), "interrupted: {:?}", got),
                        (Some(by), Ok(e)) => {
                            prop_assert_eq!(e.why, EndReason::Released);
                            prop_assert_eq!(by, &e.holder);
                        }
                        (Some(_), Err(_)) => {}
                    },
                    Did::Polled(_, ended) => {
                        for e in ended.iter().filter(|e| firm(e.reservation)) {
                            prop_assert_eq!(Some(e.at_ms), book.get(e.reservation).unwrap().ends_at_ms);
                        }
                    }
                    _ => {}
                }
            }
            for r in book.reservations().filter(|r| r.interruptibility == NoInterruptions) {
                match r.state {
                    State::Active | State::Ended { why: EndReason::Released, .. } => {}
                    State::Ended { at_ms, why: EndReason::Expired } => {
                        prop_assert_eq!(Some(at_ms), r.ends_at_ms);
                    }
                    State::Ended { why, .. } => prop_assert!(false, "{} ended: {}", r.id, why),
                }
                for cause in [Cause::Outbid, Cause::PriceAboveMax, Cause::ProviderReclaim] {
                    let at = r.starts_at_ms;
                    prop_assert_eq!(
                        book.clone().handle_interrupt(at, r.id, cause).map_err(|e| e.rule).err(),
                        Some(if r.state == State::Active { "do_not_interrupt" } else { "ended" })
                    );
                }
            }
        }

        /// (4) A book rebuilt from its JSON rows at any point behaves identically.
        #[test]
        fn a_rebuilt_book_behaves_identically(
            inputs in inputs(),
            reload in any::<prop::sample::Index>(),
        ) {
            let mut straight = Book::default();
            let mut rebuilt = Book::default();
            let want = apply(&mut straight, &inputs, None);
            let got = apply(&mut rebuilt, &inputs, Some(reload.index(inputs.len() + 1)));
            prop_assert_eq!(got, want);
            prop_assert_eq!(rebuilt, straight);
        }
    }
}
