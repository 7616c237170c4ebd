//! The auction engines of issue 16 for one lot of capacity (one listing's slot):
//! English ascending, Dutch descending, sealed first-price and sealed second-price.
//!
//! An [`Auction`] is a state machine in the engine shape of `docs/ARCHITECTURE.md`:
//! [`Auction::handle_bid`] takes a bid at a time the shell passes in,
//! [`Auction::poll_close`] hands back the [`Outcome`] once, and
//! [`Auction::next_deadline`] says when the shell must poll. It never reads a clock,
//! draws a random number or makes an id. It is whole in its fields: the shell stores it
//! as a row after every step and rebuilds it, and a rebuilt auction behaves exactly as
//! the one it was stored from.
//!
//! # Rules common to every engine
//!
//! - **Creation.** An auction is open from `starts_at_ms` (inclusive) to `ends_at_ms`
//!   (exclusive), and `ends_at_ms` must be after `starts_at_ms` (rule `times`). Its
//!   reserve (English, sealed) or its floor (Dutch) is never below the provider's
//!   minimum price: one below it is refused when the auction is made (rule
//!   `provider_minimum`), so a sale never happens below the minimum.
//! - **Bids are judged when they are made**, never at the close: a bid before the start
//!   is refused (`not_started`), a bid at or after the end, or after a buy-now or a
//!   Dutch take ended the auction, is refused (`ended`), a bid whose id is already in
//!   the auction or was replaced in it is refused (`duplicate_bid`, so a retried
//!   request is recognised), a
//!   bid without a bidder is refused (`bidder`), and a bid below the provider minimum
//!   is refused (`provider_minimum`) before any rule of the engine is asked. A refusal
//!   names its rule and the numbers, and changes nothing.
//! - **The close happens exactly once.** [`Auction::poll_close`] returns the outcome
//!   the first time it is called at or after the end (or at any time after a buy-now or
//!   a Dutch take) and `None` before and ever after; the outcome stays in
//!   [`Auction::outcome`]. The shell applies it with a conditional update on the stored
//!   row (closed only if it was not), so two replicas never both apply it. The
//!   outcome's time is the moment the auction was decided (its end, or the take), not
//!   the moment it was polled, so every replica computes the same outcome.
//! - **Tie-breaks** (sealed bids, the only engines where equal amounts compete): the
//!   higher amount first, then the earlier bid, then the lower bid id.
//!
//! # English ascending ([`Kind::English`])
//!
//! The first bid must be at least the reserve (`reserve`); every later bid at least
//! the current price (the highest bid so far) plus the increment (`increment`). Any
//! bidder may bid, the current leader too. The highest bid at the end wins and pays its
//! amount; with no bid there is no sale (every accepted bid met the reserve). A bid at
//! or above the buy-now price ends the auction at once and its bidder pays the buy-now
//! price, as long as the buy-now price is still at least the lowest acceptable bid;
//! once bidding has passed it, the buy-now price is withdrawn and bids follow the
//! increment alone. An accepted bid reports the previous leader as superseded, whose
//! hold the shell may release.
//!
//! # Dutch descending ([`Kind::Dutch`])
//!
//! The price starts at `start` and falls by `decrement` every `every_ms` after the
//! start, never below the `floor` ([`Auction::current_price`]). The first bid at or
//! above the current price (`price` refuses one below it) wins at once at the current
//! price, whatever it offered above it, and ends the auction; later bids are refused
//! (`ended`). With no taker by the end there is no sale.
//!
//! # Sealed first-price and second-price ([`Kind::SealedFirst`], [`Kind::SealedSecond`])
//!
//! Any bid at or above the reserve (`reserve`) is accepted until the end. A bidder has
//! one bid: a later bid from the same bidder replaces its earlier one (any amount at or
//! above the reserve, higher or lower), takes the later bid's time for the tie-break,
//! and reports the earlier one as superseded. Until the close no amount and no bidder
//! is shown ([`Auction::public_view`] gives only their number); after it, every bid.
//! The highest bid (by the tie-breaks) wins. First-price: it pays its amount.
//! Second-price: it pays the highest losing bid or the reserve, whichever is higher,
//! which is never more than its own bid. With no bid there is no sale.

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use crate::Refusal;
use crate::refuse;

/// An amount of money in minor units (cents) of the listing's currency.
pub type Price = u64;

/// Which engine an auction runs, with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kind {
    /// Ascending open bids; the highest at the end wins and pays its bid.
    English {
        /// The lowest first bid.
        reserve: Price,
        /// How much every later bid must exceed the current price by, at least 1.
        increment: Price,
        /// A bid at or above it ends the auction at once at this price (at least the
        /// reserve).
        buy_now: Option<Price>,
    },
    /// A price falling on a schedule; the first taker wins at the current price.
    Dutch {
        /// The price at the start.
        start: Price,
        /// How much the price falls at each step, at least 1.
        decrement: Price,
        /// The time between steps, at least 1 ms.
        every_ms: i64,
        /// The price never falls below it (at most `start`).
        floor: Price,
    },
    /// Hidden bids; the highest wins and pays its bid.
    SealedFirst {
        /// The lowest bid accepted.
        reserve: Price,
    },
    /// Hidden bids; the highest wins and pays the highest losing bid or the reserve,
    /// whichever is higher.
    SealedSecond {
        /// The lowest bid accepted, and the lowest price paid.
        reserve: Price,
    },
}

impl Kind {
    /// The lowest price the auction can sell at: the reserve, or the Dutch floor.
    pub fn lowest_price(&self) -> Price {
        match *self {
            Kind::English { reserve, .. }
            | Kind::SealedFirst { reserve }
            | Kind::SealedSecond { reserve } => reserve,
            Kind::Dutch { floor, .. } => floor,
        }
    }

    fn sealed(&self) -> bool {
        matches!(self, Kind::SealedFirst { .. } | Kind::SealedSecond { .. })
    }
}

/// A bid as the client makes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bid {
    /// The bid's id (made by the shell; a retried request carries the same one).
    pub id: Uuid,
    /// The bidding client's account.
    pub bidder: String,
    /// The most the bidder will pay.
    pub amount: Price,
}

/// A bid the auction accepted, with the time it was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlacedBid {
    /// The bid's id.
    pub id: Uuid,
    /// The bidding client's account.
    pub bidder: String,
    /// The most the bidder will pay.
    pub amount: Price,
    /// When it was accepted.
    pub at_ms: UnixMillis,
}

/// What an accepted bid did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The bid accepted.
    pub bid: Uuid,
    /// The bid that can no longer win because of this one (English: the previous
    /// leader; sealed: the same bidder's earlier bid, replaced): its hold can be
    /// released.
    pub superseded: Option<Uuid>,
    /// The bid ended the auction (a buy-now or a Dutch take): [`Auction::poll_close`]
    /// returns the outcome now.
    pub ends: bool,
}

/// Why an auction ended as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// English: the highest bid at the end won and pays its amount.
    HighestBid,
    /// English: a bid at or above the buy-now price ended it at once at that price.
    BuyNow,
    /// Dutch: the first taker won at the price of that moment.
    Taken,
    /// Sealed first-price: the highest bid won and pays its amount.
    FirstPrice,
    /// Sealed second-price: the highest bid won and pays the highest losing bid or
    /// the reserve, whichever is higher.
    SecondPrice,
    /// No sale: no bid (every accepted bid met the reserve), or no Dutch taker before
    /// the end.
    NoSale,
}

/// The winner of an auction and what it pays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Winner {
    /// The winning bid.
    pub bid: Uuid,
    /// Its bidder.
    pub bidder: String,
    /// What it pays: never more than its bid, never less than the provider minimum.
    pub price: Price,
}

/// How an auction ended; computed once, by [`Auction::poll_close`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Outcome {
    /// The auction.
    pub auction: Uuid,
    /// The winner, if there was a sale.
    pub winner: Option<Winner>,
    /// Why.
    pub reason: Reason,
    /// When it was decided: the end time, or the moment of a buy-now or a Dutch take.
    pub decided_at_ms: UnixMillis,
}

/// Where an auction is at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before its start: bids are refused.
    Upcoming,
    /// Taking bids.
    Open,
    /// No longer taking bids (its end passed, or a buy-now or a Dutch take), not
    /// closed yet: [`Auction::poll_close`] returns its outcome.
    Ended,
    /// Closed: its outcome is recorded.
    Closed,
}

/// What anyone may see of an auction: before the close, no amount or bidder of a
/// sealed bid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublicView {
    /// The auction.
    pub auction: Uuid,
    /// Its engine and parameters (the reserve is public: a bid below it is refused).
    pub kind: Kind,
    /// Where it is.
    pub phase: Phase,
    /// Opens at.
    pub starts_at_ms: UnixMillis,
    /// Ends at.
    pub ends_at_ms: UnixMillis,
    /// English: the highest bid; Dutch: the price now (or the price taken); sealed:
    /// none.
    pub current_price: Option<Price>,
    /// The lowest bid accepted now; none when it takes no bids.
    pub lowest_acceptable: Option<Price>,
    /// How many bids it holds.
    pub bid_count: usize,
    /// Its bids in the order they were made; empty for a sealed auction before the
    /// close.
    pub bids: Vec<PlacedBid>,
    /// Its outcome, once closed.
    pub outcome: Option<Outcome>,
}

/// One auction of one lot, from creation to its close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Auction {
    /// The auction's id.
    pub id: Uuid,
    /// Its engine and parameters.
    pub kind: Kind,
    /// The provider's minimum price: nothing sells below it.
    pub provider_minimum: Price,
    /// Opens at (inclusive).
    pub starts_at_ms: UnixMillis,
    /// Ends at (exclusive: a bid at this time is refused).
    pub ends_at_ms: UnixMillis,
    /// The accepted bids in the order they were made (a sealed bid replaced by its
    /// bidder's later one is gone). Sealed amounts are here: show clients
    /// [`Auction::public_view`], not this.
    pub bids: Vec<PlacedBid>,
    /// The ids of sealed bids replaced by their bidder's later one: a replaced bid
    /// sent again is a `duplicate_bid` too, not a new bid.
    #[serde(default)]
    pub replaced: Vec<Uuid>,
    /// When a buy-now or a Dutch take ended it before its end time.
    pub ended_early_at_ms: Option<UnixMillis>,
    /// Its outcome, once closed.
    pub outcome: Option<Outcome>,
}

impl Auction {
    /// A new auction, checked: the end after the start, the reserve or floor at least
    /// the provider minimum, an English increment of at least 1 and a buy-now price of
    /// at least the reserve, a Dutch decrement of at least 1 every at least 1 ms from a
    /// start of at least the floor.
    pub fn new(
        id: Uuid,
        kind: Kind,
        provider_minimum: Price,
        starts_at_ms: UnixMillis,
        ends_at_ms: UnixMillis,
    ) -> Result<Self, Refusal> {
        if ends_at_ms <= starts_at_ms {
            return Err(refuse(
                "times",
                format!("the end {ends_at_ms} is not after the start {starts_at_ms}"),
            ));
        }
        let lowest = kind.lowest_price();
        if lowest < provider_minimum {
            let what = match kind {
                Kind::Dutch { .. } => "floor",
                _ => "reserve",
            };
            return Err(refuse(
                "provider_minimum",
                format!("the {what} {lowest} is below the provider minimum {provider_minimum}"),
            ));
        }
        match kind {
            Kind::English {
                reserve,
                increment,
                buy_now,
            } => {
                if increment == 0 {
                    return Err(refuse("increment", "the increment must be at least 1"));
                }
                if let Some(buy_now) = buy_now.filter(|b| *b < reserve) {
                    return Err(refuse(
                        "buy_now",
                        format!("the buy-now price {buy_now} is below the reserve {reserve}"),
                    ));
                }
            }
            Kind::Dutch {
                start,
                decrement,
                every_ms,
                floor,
            } => {
                if decrement == 0 || every_ms < 1 {
                    return Err(refuse(
                        "schedule",
                        format!(
                            "the price must fall by at least 1 every at least 1 ms \
                             (it falls by {decrement} every {every_ms} ms)"
                        ),
                    ));
                }
                if start < floor {
                    return Err(refuse(
                        "schedule",
                        format!("the start price {start} is below the floor {floor}"),
                    ));
                }
            }
            Kind::SealedFirst { .. } | Kind::SealedSecond { .. } => {}
        }
        Ok(Self {
            id,
            kind,
            provider_minimum,
            starts_at_ms,
            ends_at_ms,
            bids: Vec::new(),
            replaced: Vec::new(),
            ended_early_at_ms: None,
            outcome: None,
        })
    }

    /// Where the auction is at `now_ms`.
    pub fn phase(&self, now_ms: UnixMillis) -> Phase {
        if self.outcome.is_some() {
            Phase::Closed
        } else if self.ended_early_at_ms.is_some() || now_ms >= self.ends_at_ms {
            Phase::Ended
        } else if now_ms < self.starts_at_ms {
            Phase::Upcoming
        } else {
            Phase::Open
        }
    }

    /// The Dutch price at `now_ms`: the start price before and at the start, then
    /// `decrement` less for every whole `every_ms` since, never below the floor. After
    /// a take it stays the price taken. `None` for the other engines.
    pub fn current_price(&self, now_ms: UnixMillis) -> Option<Price> {
        let Kind::Dutch {
            start,
            decrement,
            every_ms,
            floor,
        } = self.kind
        else {
            return None;
        };
        let at = self.ended_early_at_ms.unwrap_or(now_ms);
        let steps = (at.saturating_sub(self.starts_at_ms).max(0) / every_ms.max(1)) as u64;
        Some(
            start
                .saturating_sub(decrement.saturating_mul(steps))
                .max(floor),
        )
    }

    /// The lowest bid the auction accepts at `now_ms`, or `None` when it takes no bids
    /// then (English: the reserve, then the highest bid plus the increment; Dutch: the
    /// current price; sealed: the reserve).
    pub fn lowest_acceptable(&self, now_ms: UnixMillis) -> Option<Price> {
        if self.phase(now_ms) != Phase::Open {
            return None;
        }
        let lowest = match self.kind {
            Kind::English {
                reserve, increment, ..
            } => match self.bids.last() {
                None => reserve,
                Some(leader) => leader.amount.saturating_add(increment),
            },
            Kind::Dutch { .. } => self.current_price(now_ms)?,
            Kind::SealedFirst { reserve } | Kind::SealedSecond { reserve } => reserve,
        };
        Some(lowest.max(self.provider_minimum))
    }

    /// A bid made at `now_ms`: accepted, or refused with the rule and the numbers (and
    /// nothing changed). See the module's doc for each engine's rules.
    pub fn handle_bid(&mut self, now_ms: UnixMillis, bid: Bid) -> Result<Accepted, Refusal> {
        match self.phase(now_ms) {
            Phase::Upcoming => {
                return Err(refuse(
                    "not_started",
                    format!(
                        "the auction opens at {}; the bid came at {now_ms}",
                        self.starts_at_ms
                    ),
                ));
            }
            Phase::Ended | Phase::Closed => {
                let when = match self.ended_early_at_ms {
                    Some(at) if at < self.ends_at_ms => format!("it was taken at {at}"),
                    _ => format!("it ended at {}", self.ends_at_ms),
                };
                return Err(refuse("ended", format!("the bid came at {now_ms}; {when}")));
            }
            Phase::Open => {}
        }
        if self.bids.iter().any(|b| b.id == bid.id) || self.replaced.contains(&bid.id) {
            return Err(refuse(
                "duplicate_bid",
                format!("bid {} was made already", bid.id),
            ));
        }
        if bid.bidder.is_empty() {
            return Err(refuse("bidder", "the bid names no bidder"));
        }
        if bid.amount < self.provider_minimum {
            return Err(refuse(
                "provider_minimum",
                format!(
                    "the bid {} is below the provider minimum {}",
                    bid.amount, self.provider_minimum
                ),
            ));
        }
        let placed = PlacedBid {
            id: bid.id,
            bidder: bid.bidder,
            amount: bid.amount,
            at_ms: now_ms,
        };
        match self.kind {
            Kind::English {
                reserve,
                increment,
                buy_now,
            } => {
                let leader = self.bids.last().map(|b| (b.id, b.amount));
                let lowest = match leader {
                    None if placed.amount < reserve => {
                        return Err(refuse(
                            "reserve",
                            format!("the bid {} is below the reserve {reserve}", placed.amount),
                        ));
                    }
                    None => reserve,
                    Some((_, current)) => {
                        let lowest = current.saturating_add(increment);
                        if placed.amount < lowest {
                            return Err(refuse(
                                "increment",
                                format!(
                                    "the bid {} is below the current price {current} plus \
                                     the increment {increment} ({lowest})",
                                    placed.amount
                                ),
                            ));
                        }
                        lowest
                    }
                };
                let ends = buy_now.is_some_and(|b| b >= lowest && placed.amount >= b);
                self.bids.push(placed);
                if ends {
                    self.ended_early_at_ms = Some(now_ms);
                }
                Ok(Accepted {
                    bid: bid.id,
                    superseded: leader.map(|(id, _)| id),
                    ends,
                })
            }
            Kind::Dutch { .. } => {
                let current = self.current_price(now_ms).expect("a Dutch auction");
                if placed.amount < current {
                    return Err(refuse(
                        "price",
                        format!(
                            "the bid {} is below the current price {current}",
                            placed.amount
                        ),
                    ));
                }
                self.bids.push(placed);
                self.ended_early_at_ms = Some(now_ms);
                Ok(Accepted {
                    bid: bid.id,
                    superseded: None,
                    ends: true,
                })
            }
            Kind::SealedFirst { reserve } | Kind::SealedSecond { reserve } => {
                if placed.amount < reserve {
                    return Err(refuse(
                        "reserve",
                        format!("the bid {} is below the reserve {reserve}", placed.amount),
                    ));
                }
                let earlier = self.bids.iter().position(|b| b.bidder == placed.bidder);
                let superseded = earlier.map(|i| self.bids.remove(i).id);
                self.replaced.extend(superseded);
                self.bids.push(placed);
                Ok(Accepted {
                    bid: bid.id,
                    superseded,
                    ends: false,
                })
            }
        }
    }

    /// The outcome, the first time this is called once the auction has ended (its end
    /// time reached, or a buy-now or a Dutch take); `None` before and ever after.
    pub fn poll_close(&mut self, now_ms: UnixMillis) -> Option<Outcome> {
        if self.phase(now_ms) != Phase::Ended {
            return None;
        }
        let outcome = self.decide();
        self.outcome = Some(outcome.clone());
        Some(outcome)
    }

    /// Whether the outcome is recorded.
    pub fn is_closed(&self) -> bool {
        self.outcome.is_some()
    }

    /// When the shell must call [`Auction::poll_close`]: the end time, or the moment
    /// of a buy-now or a Dutch take (already due); `None` once closed.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        if self.outcome.is_some() {
            None
        } else {
            Some(self.ended_early_at_ms.unwrap_or(self.ends_at_ms))
        }
    }

    /// What anyone may see at `now_ms`: everything of an open auction, of a sealed
    /// one before the close only its parameters and its number of bids.
    pub fn public_view(&self, now_ms: UnixMillis) -> PublicView {
        let phase = self.phase(now_ms);
        let hidden = self.kind.sealed() && phase != Phase::Closed;
        let current_price = match self.kind {
            Kind::English { .. } => self.bids.last().map(|b| b.amount),
            Kind::Dutch { .. } => self.current_price(now_ms),
            Kind::SealedFirst { .. } | Kind::SealedSecond { .. } => None,
        };
        PublicView {
            auction: self.id,
            kind: self.kind,
            phase,
            starts_at_ms: self.starts_at_ms,
            ends_at_ms: self.ends_at_ms,
            current_price,
            lowest_acceptable: self.lowest_acceptable(now_ms),
            bid_count: self.bids.len(),
            bids: if hidden {
                Vec::new()
            } else {
                self.bids.clone()
            },
            outcome: self.outcome.clone(),
        }
    }

    /// The outcome from the bids (the auction has ended).
    fn decide(&self) -> Outcome {
        let decided_at_ms = self.ended_early_at_ms.unwrap_or(self.ends_at_ms);
        let win = |b: &PlacedBid, price: Price| Winner {
            bid: b.id,
            bidder: b.bidder.clone(),
            price,
        };
        let (winner, reason) = match self.kind {
            Kind::English { buy_now, .. } => match (self.bids.last(), buy_now) {
                (Some(b), Some(price)) if self.ended_early_at_ms.is_some() => {
                    (Some(win(b, price)), Reason::BuyNow)
                }
                (Some(b), _) => (Some(win(b, b.amount)), Reason::HighestBid),
                (None, _) => (None, Reason::NoSale),
            },
            Kind::Dutch { .. } => match self.bids.first() {
                Some(b) => {
                    let price = self.current_price(decided_at_ms).expect("a Dutch auction");
                    (Some(win(b, price)), Reason::Taken)
                }
                None => (None, Reason::NoSale),
            },
            Kind::SealedFirst { .. } => match ranked(&self.bids).first() {
                Some(b) => (Some(win(b, b.amount)), Reason::FirstPrice),
                None => (None, Reason::NoSale),
            },
            Kind::SealedSecond { reserve } => match ranked(&self.bids)[..] {
                [] => (None, Reason::NoSale),
                [first] => (Some(win(first, reserve)), Reason::SecondPrice),
                [first, second, ..] => (
                    Some(win(first, second.amount.max(reserve))),
                    Reason::SecondPrice,
                ),
            },
        };
        Outcome {
            auction: self.id,
            winner,
            reason,
            decided_at_ms,
        }
    }
}

/// Bids best first: the higher amount, then the earlier bid, then the lower id.
fn ranked(bids: &[PlacedBid]) -> Vec<&PlacedBid> {
    let mut ranked: Vec<&PlacedBid> = bids.iter().collect();
    ranked.sort_by(|a, b| {
        b.amount
            .cmp(&a.amount)
            .then(a.at_ms.cmp(&b.at_ms))
            .then(a.id.cmp(&b.id))
    });
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every auction in the tables opens at 1000 and ends at 2000, for a provider
    /// whose minimum is 100.
    const START: UnixMillis = 1_000;
    const END: UnixMillis = 2_000;
    const MINIMUM: Price = 100;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn english(reserve: Price, increment: Price, buy_now: Option<Price>) -> Kind {
        Kind::English {
            reserve,
            increment,
            buy_now,
        }
    }

    fn dutch(start: Price, decrement: Price, every_ms: i64, floor: Price) -> Kind {
        Kind::Dutch {
            start,
            decrement,
            every_ms,
            floor,
        }
    }

    fn bid(n: u128, bidder: &str, amount: Price) -> Bid {
        Bid {
            id: id(n),
            bidder: bidder.into(),
            amount,
        }
    }

    /// Runs `bids` as (time, bidder, amount), the nth with id n (from 1), on a new
    /// auction of `kind`, then polls the close at the end: each bid's refusal rule
    /// (`ok` when accepted) and the winner as (bidder, price) with the reason.
    fn check(
        kind: Kind,
        bids: &[(UnixMillis, &str, Price)],
    ) -> (Vec<&'static str>, Option<(String, Price)>, Reason) {
        let mut a = Auction::new(id(99), kind, MINIMUM, START, END).expect("a valid auction");
        let results = bids
            .iter()
            .enumerate()
            .map(|(i, &(at, bidder, amount))| {
                match a.handle_bid(at, bid(i as u128 + 1, bidder, amount)) {
                    Ok(_) => "ok",
                    Err(r) => r.rule,
                }
            })
            .collect();
        let outcome = a.poll_close(END).expect("the close at the end");
        assert_eq!(a.poll_close(END), None, "closed twice");
        let winner = outcome.winner.map(|w| (w.bidder, w.price));
        (results, winner, outcome.reason)
    }

    type Case = (
        &'static str,
        Kind,
        Vec<(UnixMillis, &'static str, Price)>,
        Vec<&'static str>,
        Option<(&'static str, Price)>,
        Reason,
    );

    fn run(cases: Vec<Case>) {
        for (rule, kind, bids, want_results, want_winner, want_reason) in cases {
            let (results, winner, reason) = check(kind, &bids);
            assert_eq!(results, want_results, "{rule}");
            assert_eq!(
                winner,
                want_winner.map(|(b, p)| (b.to_owned(), p)),
                "{rule}"
            );
            assert_eq!(reason, want_reason, "{rule}");
        }
    }

    /// Each case: (rule it pins, engine, its parameters, the provider minimum, the
    /// refusal's rule or `ok`).
    #[test]
    fn an_auction_is_checked_when_it_is_made() {
        let sealed = Kind::SealedSecond { reserve: 100 };
        for (rule, kind, minimum, start, end, want) in [
            (
                "a valid English auction",
                english(100, 5, Some(500)),
                100,
                0,
                1,
                "ok",
            ),
            (
                "a valid Dutch auction",
                dutch(500, 10, 100, 100),
                100,
                0,
                1,
                "ok",
            ),
            ("a valid sealed auction", sealed, 100, 0, 1, "ok"),
            (
                "a fixed Dutch price",
                dutch(100, 1, 1, 100),
                100,
                0,
                1,
                "ok",
            ),
            ("the end must follow the start", sealed, 100, 5, 5, "times"),
            ("an end before the start", sealed, 100, 5, 4, "times"),
            (
                "an English reserve below the provider minimum",
                english(99, 5, None),
                100,
                0,
                1,
                "provider_minimum",
            ),
            (
                "a sealed first-price reserve below the provider minimum",
                Kind::SealedFirst { reserve: 50 },
                100,
                0,
                1,
                "provider_minimum",
            ),
            (
                "a sealed second-price reserve below the provider minimum",
                Kind::SealedSecond { reserve: 50 },
                100,
                0,
                1,
                "provider_minimum",
            ),
            (
                "a Dutch floor below the provider minimum",
                dutch(500, 10, 100, 99),
                100,
                0,
                1,
                "provider_minimum",
            ),
            (
                "an increment of 0",
                english(100, 0, None),
                100,
                0,
                1,
                "increment",
            ),
            (
                "a buy-now price below the reserve",
                english(100, 5, Some(99)),
                0,
                0,
                1,
                "buy_now",
            ),
            (
                "a buy-now price at the reserve",
                english(100, 5, Some(100)),
                0,
                0,
                1,
                "ok",
            ),
            (
                "a Dutch decrement of 0",
                dutch(500, 0, 100, 100),
                0,
                0,
                1,
                "schedule",
            ),
            (
                "a Dutch step of 0 ms",
                dutch(500, 10, 0, 100),
                0,
                0,
                1,
                "schedule",
            ),
            (
                "a Dutch start below the floor",
                dutch(99, 10, 10, 100),
                0,
                0,
                1,
                "schedule",
            ),
        ] {
            let got = match Auction::new(id(1), kind, minimum, start, end) {
                Ok(_) => "ok",
                Err(r) => r.rule,
            };
            assert_eq!(got, want, "{rule}");
        }
    }

    /// Each case: (rule it pins, engine, bids as (time, bidder, amount), each bid's
    /// refusal rule or `ok`, the winner as (bidder, price), the reason).
    #[test]
    fn english_bids_rise_by_the_increment_and_the_highest_wins() {
        let kind = english(200, 10, Some(500));
        run(vec![
            (
                "no bid: no sale",
                kind,
                vec![],
                vec![],
                None,
                Reason::NoSale,
            ),
            (
                "the highest bid wins at its bid",
                kind,
                vec![(1_000, "a", 200), (1_100, "b", 210), (1_200, "a", 300)],
                vec!["ok", "ok", "ok"],
                Some(("a", 300)),
                Reason::HighestBid,
            ),
            (
                "the first bid must meet the reserve",
                kind,
                vec![(1_000, "a", 199), (1_001, "a", 200)],
                vec!["reserve", "ok"],
                Some(("a", 200)),
                Reason::HighestBid,
            ),
            (
                "a bid below the provider minimum is refused when it is made",
                kind,
                vec![(1_000, "a", 99)],
                vec!["provider_minimum"],
                None,
                Reason::NoSale,
            ),
            (
                "a later bid must reach the current price plus the increment",
                kind,
                vec![(1_000, "a", 200), (1_001, "b", 209), (1_002, "b", 210)],
                vec!["ok", "increment", "ok"],
                Some(("b", 210)),
                Reason::HighestBid,
            ),
            (
                "an equal bid is refused: no ties in an English auction",
                kind,
                vec![(1_000, "a", 250), (1_001, "b", 250)],
                vec!["ok", "increment"],
                Some(("a", 250)),
                Reason::HighestBid,
            ),
            (
                "a bid before the start is refused",
                kind,
                vec![(999, "a", 300)],
                vec!["not_started"],
                None,
                Reason::NoSale,
            ),
            (
                "a bid at the end time is after the end",
                kind,
                vec![(1_500, "a", 200), (2_000, "b", 400)],
                vec!["ok", "ended"],
                Some(("a", 200)),
                Reason::HighestBid,
            ),
            (
                "a bid at the buy-now price ends it at once at that price",
                kind,
                vec![(1_000, "a", 200), (1_100, "b", 500), (1_200, "c", 900)],
                vec!["ok", "ok", "ended"],
                Some(("b", 500)),
                Reason::BuyNow,
            ),
            (
                "a bid above the buy-now price pays the buy-now price",
                kind,
                vec![(1_000, "a", 800)],
                vec!["ok"],
                Some(("a", 500)),
                Reason::BuyNow,
            ),
            (
                "once bidding passes the buy-now price it is withdrawn",
                kind,
                vec![(1_000, "a", 495), (1_100, "b", 505), (1_200, "a", 600)],
                vec!["ok", "ok", "ok"],
                Some(("a", 600)),
                Reason::HighestBid,
            ),
            (
                "without a buy-now price any amount is a bid",
                english(200, 10, None),
                vec![(1_000, "a", 10_000), (1_100, "b", 10_010)],
                vec!["ok", "ok"],
                Some(("b", 10_010)),
                Reason::HighestBid,
            ),
            (
                "the leader may raise its own bid",
                kind,
                vec![(1_000, "a", 200), (1_100, "a", 220)],
                vec!["ok", "ok"],
                Some(("a", 220)),
                Reason::HighestBid,
            ),
        ]);
    }

    /// Each case: (rule it pins, time, the Dutch price then), for a price from 500
    /// falling by 30 every 100 ms from 1000 to a floor of 150.
    #[test]
    fn the_dutch_price_steps_down_on_schedule_to_the_floor() {
        let a = Auction::new(id(1), dutch(500, 30, 100, 150), MINIMUM, START, END).unwrap();
        for (rule, at, want) in [
            ("the start price before the start", 0, 500),
            ("the start price at the start", 1_000, 500),
            ("unchanged within the first step", 1_099, 500),
            ("one step down after one period", 1_100, 470),
            ("unchanged within a step", 1_199, 470),
            ("two steps down", 1_200, 440),
            ("eleven steps down", 2_100, 170),
            ("never below the floor", 1_300_000, 150),
            ("the floor far beyond the end", i64::MAX, 150),
        ] {
            assert_eq!(a.current_price(at), Some(want), "{rule}");
        }
        let english = Auction::new(id(2), english(200, 1, None), MINIMUM, START, END).unwrap();
        assert_eq!(
            english.current_price(1_500),
            None,
            "only a Dutch auction has one"
        );
    }

    /// Each case as in [`english_bids_rise_by_the_increment_and_the_highest_wins`];
    /// the price is 500 falling by 50 every 100 ms to a floor of 200.
    #[test]
    fn the_first_dutch_taker_wins_at_the_current_price() {
        let kind = dutch(500, 50, 100, 200);
        run(vec![
            (
                "no taker: no sale",
                kind,
                vec![],
                vec![],
                None,
                Reason::NoSale,
            ),
            (
                "the first taker wins at the current price",
                kind,
                vec![(1_250, "a", 400)],
                vec!["ok"],
                Some(("a", 400)),
                Reason::Taken,
            ),
            (
                "a taker offering more pays the current price",
                kind,
                vec![(1_250, "a", 1_000)],
                vec!["ok"],
                Some(("a", 400)),
                Reason::Taken,
            ),
            (
                "a bid below the current price is refused",
                kind,
                vec![(1_000, "a", 450), (1_100, "a", 450)],
                vec!["price", "ok"],
                Some(("a", 450)),
                Reason::Taken,
            ),
            (
                "a second taker is refused",
                kind,
                vec![(1_100, "a", 450), (1_101, "b", 1_000)],
                vec!["ok", "ended"],
                Some(("a", 450)),
                Reason::Taken,
            ),
            (
                "a taker at the floor",
                kind,
                vec![(1_999, "a", 200)],
                vec!["ok"],
                Some(("a", 200)),
                Reason::Taken,
            ),
            (
                "a bid below the provider minimum is refused when it is made",
                kind,
                vec![(1_900, "a", 99)],
                vec!["provider_minimum"],
                None,
                Reason::NoSale,
            ),
            (
                "a taker before the start is refused",
                kind,
                vec![(999, "a", 500)],
                vec!["not_started"],
                None,
                Reason::NoSale,
            ),
            (
                "the floor with no taker at the end: no sale",
                kind,
                vec![(2_000, "a", 200)],
                vec!["ended"],
                None,
                Reason::NoSale,
            ),
        ]);
    }

    /// Each case as in [`english_bids_rise_by_the_increment_and_the_highest_wins`].
    #[test]
    fn sealed_bids_win_at_the_first_or_the_second_price() {
        let first = Kind::SealedFirst { reserve: 150 };
        let second = Kind::SealedSecond { reserve: 150 };
        run(vec![
            (
                "first-price: no bid, no sale",
                first,
                vec![],
                vec![],
                None,
                Reason::NoSale,
            ),
            (
                "first-price: the highest pays its bid",
                first,
                vec![(1_000, "a", 300), (1_100, "b", 400), (1_200, "c", 350)],
                vec!["ok", "ok", "ok"],
                Some(("b", 400)),
                Reason::FirstPrice,
            ),
            (
                "first-price: a bid below the reserve is refused",
                first,
                vec![(1_000, "a", 149)],
                vec!["reserve"],
                None,
                Reason::NoSale,
            ),
            (
                "a bid below the provider minimum is refused when it is made",
                first,
                vec![(1_000, "a", 50)],
                vec!["provider_minimum"],
                None,
                Reason::NoSale,
            ),
            (
                "second-price: the highest pays the second-highest",
                second,
                vec![(1_000, "a", 300), (1_100, "b", 400), (1_200, "c", 350)],
                vec!["ok", "ok", "ok"],
                Some(("b", 350)),
                Reason::SecondPrice,
            ),
            (
                "second-price: a lone bid pays the reserve",
                second,
                vec![(1_000, "a", 300)],
                vec!["ok"],
                Some(("a", 150)),
                Reason::SecondPrice,
            ),
            (
                "second-price: a bid at the reserve pays the reserve",
                second,
                vec![(1_000, "a", 150)],
                vec!["ok"],
                Some(("a", 150)),
                Reason::SecondPrice,
            ),
            (
                "a later bid from the same bidder replaces its earlier one",
                second,
                vec![(1_000, "a", 900), (1_100, "b", 300), (1_200, "a", 200)],
                vec!["ok", "ok", "ok"],
                Some(("b", 200)),
                Reason::SecondPrice,
            ),
            (
                "a bid at the end time is refused",
                second,
                vec![(2_000, "a", 300)],
                vec!["ended"],
                None,
                Reason::NoSale,
            ),
            (
                "a bid before the start is refused",
                first,
                vec![(0, "a", 300)],
                vec!["not_started"],
                None,
                Reason::NoSale,
            ),
        ]);
    }

    /// Each case as in [`english_bids_rise_by_the_increment_and_the_highest_wins`].
    #[test]
    fn ties_go_to_the_earlier_bid_then_the_lower_id() {
        let first = Kind::SealedFirst { reserve: 150 };
        let second = Kind::SealedSecond { reserve: 150 };
        run(vec![
            (
                "equal amounts: the earlier bid wins",
                first,
                vec![(1_100, "a", 300), (1_000, "b", 300)],
                vec!["ok", "ok"],
                Some(("b", 300)),
                Reason::FirstPrice,
            ),
            (
                "equal amounts at the same time: the lower id wins",
                first,
                vec![(1_000, "a", 300), (1_000, "b", 300)],
                vec!["ok", "ok"],
                Some(("a", 300)),
                Reason::FirstPrice,
            ),
            (
                "a tie in second-price pays the tied amount",
                second,
                vec![(1_000, "a", 300), (1_000, "b", 300), (1_000, "c", 200)],
                vec!["ok", "ok", "ok"],
                Some(("a", 300)),
                Reason::SecondPrice,
            ),
            (
                "a replaced bid takes its later time in the tie-break",
                first,
                vec![(1_000, "a", 300), (1_100, "b", 300), (1_200, "a", 300)],
                vec!["ok", "ok", "ok"],
                Some(("b", 300)),
                Reason::FirstPrice,
            ),
        ]);
    }

    #[test]
    fn sealed_amounts_are_hidden_until_the_close() {
        let mut a = Auction::new(
            id(1),
            Kind::SealedSecond { reserve: 150 },
            MINIMUM,
            START,
            END,
        )
        .unwrap();
        a.handle_bid(1_100, bid(1, "a", 300)).unwrap();
        a.handle_bid(1_200, bid(2, "b", 400)).unwrap();
        for (rule, at) in [("while open", 1_500), ("ended but not closed", 2_500)] {
            let view = a.public_view(at);
            assert_eq!(view.bid_count, 2, "{rule}");
            assert!(view.bids.is_empty(), "{rule}");
            assert_eq!(view.current_price, None, "{rule}");
            assert_eq!(view.outcome, None, "{rule}");
            let json = serde_json::to_string(&view).unwrap();
            assert!(
                !json.contains("300") && !json.contains("400") && !json.contains("\"b\""),
                "{rule}: {json}"
            );
        }
        a.poll_close(2_500).unwrap();
        let view = a.public_view(2_500);
        assert_eq!(view.phase, Phase::Closed);
        assert_eq!(
            view.bids.iter().map(|b| b.amount).collect::<Vec<_>>(),
            [300, 400]
        );
        assert_eq!(view.outcome.unwrap().winner.unwrap().price, 300);
        // An English auction is open: its bids are shown at once.
        let mut e = Auction::new(id(2), english(200, 10, None), MINIMUM, START, END).unwrap();
        e.handle_bid(1_100, bid(1, "a", 250)).unwrap();
        let view = e.public_view(1_200);
        assert_eq!(
            (view.current_price, view.lowest_acceptable, view.bids.len()),
            (Some(250), Some(260), 1)
        );
    }

    #[test]
    fn the_close_happens_exactly_once() {
        let mut a = Auction::new(id(1), english(200, 10, None), MINIMUM, START, END).unwrap();
        a.handle_bid(1_100, bid(1, "a", 250)).unwrap();
        assert_eq!(a.next_deadline(), Some(END));
        assert_eq!(a.poll_close(1_999), None, "not before the end");
        let outcome = a.poll_close(2_000).expect("at the end");
        assert_eq!(outcome.decided_at_ms, END);
        assert_eq!(a.outcome.as_ref(), Some(&outcome));
        assert_eq!(a.poll_close(2_000), None);
        assert_eq!(a.poll_close(9_999), None);
        assert_eq!(a.next_deadline(), None);
        assert!(a.is_closed());
        assert_eq!(
            a.handle_bid(3_000, bid(2, "b", 900)).unwrap_err().rule,
            "ended"
        );

        // A take closes at the next poll, even before the end, once.
        let mut d = Auction::new(id(2), dutch(500, 50, 100, 200), MINIMUM, START, END).unwrap();
        let accepted = d.handle_bid(1_300, bid(1, "a", 350)).unwrap();
        assert!(accepted.ends);
        assert_eq!(d.next_deadline(), Some(1_300));
        let outcome = d.poll_close(1_301).expect("right after the take");
        assert_eq!(
            (outcome.decided_at_ms, outcome.reason),
            (1_300, Reason::Taken)
        );
        assert_eq!(d.poll_close(5_000), None);
    }

    #[test]
    fn an_accepted_bid_names_the_bid_whose_hold_can_be_released() {
        let mut e = Auction::new(id(1), english(200, 10, Some(900)), MINIMUM, START, END).unwrap();
        let first = e.handle_bid(1_100, bid(1, "a", 250)).unwrap();
        assert_eq!(
            first,
            Accepted {
                bid: id(1),
                superseded: None,
                ends: false
            }
        );
        let second = e.handle_bid(1_200, bid(2, "b", 300)).unwrap();
        assert_eq!(second.superseded, Some(id(1)), "the outbid leader");
        let mut s = Auction::new(
            id(2),
            Kind::SealedFirst { reserve: 150 },
            MINIMUM,
            START,
            END,
        )
        .unwrap();
        s.handle_bid(1_100, bid(1, "a", 250)).unwrap();
        s.handle_bid(1_150, bid(2, "b", 250)).unwrap();
        let replaced = s.handle_bid(1_200, bid(3, "a", 300)).unwrap();
        assert_eq!(replaced.superseded, Some(id(1)), "the bidder's earlier bid");
        assert_eq!(s.bids.len(), 2);
        // The replaced bid sent again (a late retry) does not come back.
        let again = s.handle_bid(1_300, bid(1, "a", 250)).unwrap_err();
        assert_eq!(again.rule, "duplicate_bid");
        assert_eq!(s.bids.len(), 2);
    }

    /// Each case: (rule it pins, the refused bid at 1500 on an English auction with a
    /// leading bid of 300, the refusal's rule, numbers its message names).
    #[test]
    fn a_refusal_names_the_rule_and_the_numbers_and_changes_nothing() {
        let mut before = Auction::new(id(1), english(200, 10, None), MINIMUM, START, END).unwrap();
        before.handle_bid(1_100, bid(1, "a", 300)).unwrap();
        for (rule, at, refused, want, numbers) in [
            (
                "below the increment",
                1_500,
                bid(2, "b", 305),
                "increment",
                &["305", "300", "10", "310"][..],
            ),
            (
                "below the provider minimum",
                1_500,
                bid(2, "b", 50),
                "provider_minimum",
                &["50", "100"],
            ),
            (
                "after the end",
                2_001,
                bid(2, "b", 900),
                "ended",
                &["2001", "2000"],
            ),
            (
                "before the start",
                10,
                bid(2, "b", 900),
                "not_started",
                &["10", "1000"],
            ),
            (
                "the same bid again",
                1_500,
                bid(1, "a", 900),
                "duplicate_bid",
                &[],
            ),
            ("no bidder", 1_500, bid(2, "", 900), "bidder", &[]),
        ] {
            let mut a = before.clone();
            let refusal = a.handle_bid(at, refused).unwrap_err();
            assert_eq!(refusal.rule, want, "{rule}");
            for n in numbers {
                assert!(refusal.message.contains(n), "{rule}: {refusal}");
            }
            assert_eq!(a, before, "{rule}: a refused bid changed the auction");
        }
    }

    /// An input in the generated runs: a bid (time, bidder, amount) or a poll (time).
    #[derive(Debug, Clone)]
    enum Input {
        Bid(UnixMillis, u8, Price),
        Poll(UnixMillis),
    }

    fn inputs() -> impl Strategy<Value = Vec<Input>> {
        let input = prop_oneof![
            3 => (900i64..2_100, 0u8..4, 0u64..700).prop_map(|(t, b, a)| Input::Bid(t, b, a)),
            1 => (900i64..2_100).prop_map(Input::Poll),
        ];
        proptest::collection::vec(input, 0..30)
    }

    fn kinds() -> impl Strategy<Value = Kind> {
        prop_oneof![
            (100u64..300, 1u64..50, proptest::option::of(300u64..600))
                .prop_map(|(r, i, b)| english(r, i, b)),
            (300u64..700, 1u64..50, 1i64..200, 100u64..300)
                .prop_map(|(s, d, e, f)| dutch(s, d, e, f)),
            (100u64..400).prop_map(|reserve| Kind::SealedFirst { reserve }),
            (100u64..400).prop_map(|reserve| Kind::SealedSecond { reserve }),
        ]
    }

    /// What one input did, to compare runs.
    type Step = Result<Result<Accepted, Refusal>, Option<Outcome>>;

    /// Applies `inputs` (the nth bid with id n), rebuilding the auction from its JSON
    /// row before the input at `reload_at`.
    fn apply(a: &mut Auction, inputs: &[Input], reload_at: Option<usize>) -> Vec<Step> {
        let mut steps = Vec::new();
        for (i, input) in inputs.iter().enumerate() {
            if reload_at == Some(i) {
                let row = serde_json::to_string(&*a).unwrap();
                *a = serde_json::from_str(&row).unwrap();
            }
            steps.push(match *input {
                Input::Bid(t, b, amount) => {
                    Ok(a.handle_bid(t, bid(i as u128 + 1, &format!("client-{b}"), amount)))
                }
                Input::Poll(t) => Err(a.poll_close(t)),
            });
        }
        steps
    }

    proptest! {
        /// In a second-price auction the winner is the highest bid by the
        /// tie-breaks and pays the highest losing bid or the reserve, whichever is
        /// higher, and never more than its bid.
        #[test]
        fn the_second_price_winner_pays_the_highest_losing_bid_or_the_reserve(
            reserve in 100u64..400,
            bids in proptest::collection::vec((1_000i64..2_000, 0u8..6, 0u64..700), 0..20),
        ) {
            let mut a = Auction::new(id(1), Kind::SealedSecond { reserve }, MINIMUM, START, END).unwrap();
            for (i, &(t, b, amount)) in bids.iter().enumerate() {
                let accepted = a.handle_bid(t, bid(i as u128 + 1, &format!("client-{b}"), amount));
                prop_assert_eq!(accepted.is_ok(), amount >= reserve);
            }
            let live = a.bids.clone();
            let outcome = a.poll_close(END).unwrap();
            match outcome.winner {
                None => prop_assert!(live.is_empty()),
                Some(w) => {
                    let mine = live.iter().find(|b| b.id == w.bid).unwrap();
                    let highest_losing = live.iter().filter(|b| b.id != w.bid).map(|b| b.amount).max();
                    prop_assert_eq!(w.price, highest_losing.unwrap_or(0).max(reserve));
                    prop_assert!(w.price <= mine.amount);
                    prop_assert!(w.price >= MINIMUM);
                    for other in live.iter().filter(|b| b.id != w.bid) {
                        prop_assert!(
                            (mine.amount, std::cmp::Reverse(mine.at_ms), std::cmp::Reverse(mine.id))
                                > (other.amount, std::cmp::Reverse(other.at_ms), std::cmp::Reverse(other.id))
                        );
                    }
                }
            }
        }

        /// Accepted English bids are at least the reserve, rise by at least the
        /// increment each, and the last wins at its bid (or the buy-now price).
        #[test]
        fn english_bids_rise_by_at_least_the_increment(
            reserve in 100u64..300,
            increment in 1u64..50,
            buy_now in proptest::option::of(300u64..600),
            bids in proptest::collection::vec((0u8..4, 0u64..700), 0..30),
        ) {
            let mut a = Auction::new(id(1), english(reserve, increment, buy_now), MINIMUM, START, END).unwrap();
            let mut accepted: Vec<Price> = Vec::new();
            for (i, &(b, amount)) in bids.iter().enumerate() {
                let lowest = a.lowest_acceptable(1_500);
                match a.handle_bid(1_500, bid(i as u128 + 1, &format!("client-{b}"), amount)) {
                    Ok(_) => {
                        prop_assert!(Some(amount) >= lowest && lowest.is_some());
                        accepted.push(amount);
                    }
                    Err(r) => prop_assert!(
                        lowest.is_none_or(|l| amount < l),
                        "{} refused with {} while the lowest was {:?}", amount, r, lowest
                    ),
                }
            }
            prop_assert!(accepted.first().is_none_or(|f| *f >= reserve));
            prop_assert!(accepted.windows(2).all(|w| w[1] >= w[0] + increment));
            let outcome = a.poll_close(END).unwrap();
            let price = outcome.winner.map(|w| w.price);
            match outcome.reason {
                Reason::BuyNow => prop_assert_eq!(price, buy_now),
                _ => prop_assert_eq!(price, accepted.last().copied()),
            }
        }

        /// The Dutch price never rises with time and stays between the floor and
        /// the start.
        #[test]
        fn the_dutch_price_never_rises_and_never_passes_the_floor(
            start in 100u64..10_000,
            fall in 0u64..10_000,
            decrement in 1u64..1_000,
            every_ms in 1i64..10_000,
            mut times in proptest::collection::vec(any::<i64>(), 1..20),
        ) {
            let floor = start.saturating_sub(fall).max(MINIMUM).min(start);
            let a = Auction::new(id(1), dutch(start, decrement, every_ms, floor), MINIMUM, START, END).unwrap();
            times.sort_unstable();
            let prices: Vec<Price> = times.iter().map(|t| a.current_price(*t).unwrap()).collect();
            prop_assert!(prices.windows(2).all(|w| w[1] <= w[0]));
            prop_assert!(prices.iter().all(|p| (floor..=start).contains(p)));
        }

        /// Whatever the engine and the order of bids and polls, the close returns an
        /// outcome exactly once when a poll comes at or after the end (or after a
        /// take), never before, and never twice.
        #[test]
        fn the_close_returns_an_outcome_exactly_once(kind in kinds(), inputs in inputs()) {
            let mut a = Auction::new(id(1), kind, MINIMUM, START, END).unwrap();
            let steps = apply(&mut a, &inputs, None);
            let closes: Vec<&Outcome> = steps.iter().filter_map(|s| s.as_ref().err()?.as_ref()).collect();
            prop_assert!(closes.len() <= 1);
            let polled_after_end = inputs.iter().any(|i| matches!(i, Input::Poll(t) if *t >= END));
            if polled_after_end {
                prop_assert_eq!(closes.len(), 1);
            }
            if let Some(outcome) = closes.first() {
                prop_assert_eq!(a.outcome.as_ref(), Some(*outcome));
                if let Some(w) = &outcome.winner {
                    prop_assert!(w.price >= MINIMUM);
                    prop_assert!(w.price <= a.bids.iter().find(|b| b.id == w.bid).unwrap().amount);
                }
            }
            // A last poll after the end closes it if nothing did yet; then never again.
            let was_closed = a.is_closed();
            prop_assert_eq!(a.poll_close(i64::MAX).is_some(), !was_closed);
            prop_assert_eq!(a.poll_close(i64::MAX), None);
        }

        /// An auction rebuilt from its JSON row at any point behaves exactly as the
        /// one it was stored from.
        #[test]
        fn a_rebuilt_auction_behaves_identically(
            kind in kinds(),
            inputs in inputs(),
            reload in any::<proptest::sample::Index>(),
        ) {
            let mut straight = Auction::new(id(1), kind, MINIMUM, START, END).unwrap();
            let mut rebuilt = straight.clone();
            let reload_at = reload.index(inputs.len() + 1);
            let want = apply(&mut straight, &inputs, None);
            let got = apply(&mut rebuilt, &inputs, Some(reload_at));
            prop_assert_eq!(got, want);
            prop_assert_eq!(rebuilt, straight);
        }
    }
}
