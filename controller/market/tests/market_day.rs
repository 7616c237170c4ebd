//! A seeded simulation of one market day (issue 16, "Correctness and concurrency").
//!
//! Providers with hosts, listings, clients, spot bids, English and sealed second-price
//! auctions, on-demand, quoted and long-term reservations, releases, provider reclaims,
//! goal changes and term expiries are driven together through the pure engines of
//! `surplus-market`, in steps of one simulated minute over 24 hours (busier at 08-10 h
//! and 18-20 h). The simulation plays the controller's shell; the engines decide.
//! After every step it checks what the issue promises:
//!
//! 1. a host is held by at most one reservation at the step's instant (found with
//!    [`Reservation::holds_at`] over every reservation, not through the book's own
//!    bookkeeping, then compared with [`Book::holder_of`]);
//! 2. per spot class, the units allocated never exceed the capacity offered;
//! 3. with supply fixed, one more spot bid never lowers a clearing price;
//! 4. a sealed second-price winner pays the highest losing bid or the reserve,
//!    whichever is higher, and never more than its bid (expected from the bids sent);
//! 5. a do-not-interrupt reservation is active, released by its holder or expired
//!    exactly at its term: never interrupted;
//! 6. money sums to zero in every currency, and the ledger took every posting.
//!
//! Every run prints `market day seed: 0x...` and every assertion names the seed and the
//! step; replay a failure with
//! `SURPLUS_SIM_SEED=0x... cargo test -p surplus-market --test market_day` (that seed
//! runs first, then seven derived from it).
//!
//! # How the shell is modelled
//!
//! - **Units.** Every host is one unit, of one listing; one [`Book`] holds every
//!   reservation. A host on auction or withdrawn by its provider is not passed as
//!   available to anything else.
//! - **Spot.** Each listing is a spot class with its own [`SpotMarket`] (clearing every
//!   5 minutes, and on demand). Before each poll the class's supply is set to its hosts
//!   that are neither on auction, withdrawn, nor held by a reservation other than a spot
//!   one. A clearing allocates from scratch, and the simulation mirrors its allocations
//!   as reservations: a bid that holds `k` spot reservations and is now allocated
//!   `q < k` units must appear in the clearing's interruptions (held `k`, kept `q`),
//!   and `k - q` of its reservations end through [`Book::handle_interrupt`] with the
//!   interruption's cause at the clearing's instant (the grace is collapsed: the
//!   market has already given the units away); a bid allocated `q > k` units reserves
//!   `q - k` more hosts with mode spot and price-based interruptibility. Spot holders
//!   are charged each minute at the class's latest clearing price. Cancelling a bid
//!   releases its reservations (the holder's act, no interruption).
//! - **Auctions** sell one free host of a listing for a term; the price is paid once
//!   at the close and the winner gets a reservation of that host.
//! - **Reclaims.** A provider reclaims 1-2 units: victims chosen by
//!   [`interrupt::choose_reclaim`] under its current goal, asked of the book with
//!   [`Book::check_interrupt`] (refused when the goal recorded with the reservation
//!   does not allow it), noticed with [`interrupt::notice`], and ended by
//!   [`Book::handle_interrupt`] at the notice's deadline; the host is then withdrawn
//!   for 1-3 hours.
//! - **Money.** Hourly use is metered per reservation and posted every hour, one
//!   posting per client and provider, through [`Ledger`] with the provider's
//!   commission; upfront fees and auction prices are posted at once; clients top up,
//!   providers are paid out. Each provider sells in one of two currencies.
//!
//! The book is rebuilt from its rows every hour without the reservations that ended
//! and are no longer needed (as the shell loads it); those are checked once more
//! (invariant 5) when they leave it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use surplus_market::auction::{self, Auction, Kind, Phase, Reason};
use surplus_market::billing::bill_posting;
use surplus_market::interrupt::{self, Candidate, Cause, DEFAULT_GRACE_MS};
use surplus_market::ledger::{self, Applied, Ledger, Posting};
use surplus_market::quote::{self, Quote, Term};
use surplus_market::resell::{Goal, Interruptibility, PricingMode};
use surplus_market::reservations::{Book, EndReason, Request, Reservation, State};
use surplus_market::spot::{self, SpotMarket, Supply};
use uuid::Uuid;

#[macro_use]
mod sim;
use sim::{SplitMix64, Where};

const DEFAULT_SEED: u64 = 0x5EED_DA7E_2026_0016;
/// The given (or default) seed and this many minus one derived from it.
const RUNS: usize = 8;
/// 2026-01-01T00:00:00Z.
const DAY_START_MS: i64 = 1_767_225_600_000;
const STEP_MS: i64 = 60_000;
const STEPS: i64 = 24 * 60;
const HOUR_MS: i64 = 3_600_000;
const SPOT_PERIOD_MS: i64 = 5 * 60_000;
const CURRENCIES: [&str; 2] = ["EUR", "USD"];
const GOALS: [Goal; 4] = [
    Goal::None,
    Goal::MaximiseRevenue,
    Goal::MaximiseUtilisation,
    Goal::CapacityBackAtShortNotice,
];
const INTERRUPTIBILITIES: [Interruptibility; 4] = [
    Interruptibility::DontCare,
    Interruptibility::PriceBased,
    Interruptibility::FulfilmentBased,
    Interruptibility::NoInterruptions,
];

/// Where the simulation is: every assertion message starts with it.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    seed: u64,
    step: i64,
    now: i64,
}

impl fmt::Display for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "market day seed 0x{:016x}, step {} ({:02}:{:02})",
            self.seed,
            self.step,
            (self.now - DAY_START_MS) / HOUR_MS,
            (self.now - DAY_START_MS) % HOUR_MS / 60_000
        )
    }
}

impl sim::Where for Ctx {}

/// What may interrupt a reservation, written from the table of `interrupt`'s rule 1
/// rather than through the engine: `Err` names the refusal's rule.
fn allowed(i: Interruptibility, goal: Goal, cause: Cause) -> Result<(), &'static str> {
    use Interruptibility::*;
    let price = matches!(cause, Cause::Outbid | Cause::PriceAboveMax);
    let price_regime = match (i, goal) {
        (NoInterruptions, _) | (DontCare, Goal::MaximiseUtilisation) => {
            return Err("do_not_interrupt");
        }
        (DontCare, Goal::CapacityBackAtShortNotice) => return Ok(()),
        (PriceBased, _) | (DontCare, Goal::None | Goal::MaximiseRevenue) => true,
        (FulfilmentBased, _) => false,
    };
    match (price_regime, price) {
        (true, true) | (false, false) => Ok(()),
        (false, true) => Err("not_price_based"),
        (true, false) => Err("not_fulfilment_based"),
    }
}

fn do_not_interrupt(r: &Reservation) -> bool {
    allowed(r.interruptibility, r.goal, Cause::Outbid) == Err("do_not_interrupt")
}

fn mode_name(mode: PricingMode) -> &'static str {
    match mode {
        PricingMode::Spot => "spot",
        PricingMode::Auction => "auction",
        PricingMode::Immediate => "immediate",
        PricingMode::OnDemand => "on_demand",
        PricingMode::Reserved => "reserved",
    }
}

struct Provider {
    name: String,
    goal: Goal,
    currency: &'static str,
    commission_bps: u32,
}

struct Listing {
    /// Also its spot class.
    name: String,
    provider: usize,
    hosts: Vec<Uuid>,
    minimum: u64,
    on_demand: u64,
    term: Term,
    interruptibility: Interruptibility,
    grace_ms: i64,
    market: SpotMarket,
    /// The capacity of the last clearing.
    offered: u32,
    /// The price of the last clearing (the minimum before the first).
    price: u64,
}

/// A live spot bid and the reservations that mirror its allocation.
struct SpotHolding {
    listing: usize,
    client: String,
    max_price: u64,
    reservations: Vec<Uuid>,
    /// When its client cancels it (its work is done).
    until: i64,
}

/// An auction bid as the simulation sent it and the auction accepted it.
#[derive(Debug, Clone)]
struct Sent {
    id: Uuid,
    bidder: String,
    amount: u64,
    at_ms: i64,
}

struct Lot {
    auction: Auction,
    listing: usize,
    host: Uuid,
    term_ms: i64,
    /// English: every accepted bid in order; sealed: each bidder's latest.
    sent: Vec<Sent>,
    bought_now: bool,
}

struct Reclaim {
    reservation: Uuid,
    deadline_ms: i64,
}

/// Use of one reservation, in price × milliseconds, and what was charged for it.
struct Meter {
    client: String,
    provider: usize,
    price_ms: u128,
    charged: u64,
}

#[derive(Debug, Default)]
struct Stats {
    reserved: BTreeMap<&'static str, u64>,
    sold_out: u64,
    spot_bids: u64,
    spot_clearings: u64,
    spot_interruptions: u64,
    monotone_checks: u64,
    second_price_sales: u64,
    english_sales: u64,
    no_sales: u64,
    reclaims: u64,
    reclaims_refused: u64,
    expiries: u64,
    do_not_interrupt: u64,
    do_not_interrupt_expired: u64,
    releases: u64,
    refused_interrupts: u64,
    postings: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        for (mode, n) in &o.reserved {
            *self.reserved.entry(*mode).or_default() += n;
        }
        self.sold_out += o.sold_out;
        self.spot_bids += o.spot_bids;
        self.spot_clearings += o.spot_clearings;
        self.spot_interruptions += o.spot_interruptions;
        self.monotone_checks += o.monotone_checks;
        self.second_price_sales += o.second_price_sales;
        self.english_sales += o.english_sales;
        self.no_sales += o.no_sales;
        self.reclaims += o.reclaims;
        self.reclaims_refused += o.reclaims_refused;
        self.expiries += o.expiries;
        self.do_not_interrupt += o.do_not_interrupt;
        self.do_not_interrupt_expired += o.do_not_interrupt_expired;
        self.releases += o.releases;
        self.refused_interrupts += o.refused_interrupts;
        self.postings += o.postings;
    }
}

struct Sim {
    ctx: Ctx,
    rng: SplitMix64,
    providers: Vec<Provider>,
    listings: Vec<Listing>,
    host_listing: BTreeMap<Uuid, usize>,
    clients: Vec<String>,
    book: Book,
    /// Reservations still metered: not ended before the last step began.
    live: BTreeSet<Uuid>,
    meters: BTreeMap<Uuid, Meter>,
    /// Reservations their holder released through the simulation.
    released: BTreeSet<Uuid>,
    /// Live spot bids by id.
    spot: BTreeMap<Uuid, SpotHolding>,
    on_auction: BTreeSet<Uuid>,
    /// Hosts a reclaim took back, until when.
    withdrawn: BTreeMap<Uuid, i64>,
    lots: Vec<Lot>,
    /// Auctions closed in this step, for the step's invariants.
    closed: Vec<(Lot, auction::Outcome)>,
    reclaims: Vec<Reclaim>,
    /// Quotes a client accepts a step later.
    quotes: Vec<(Quote, String, usize)>,
    ledger: Ledger,
    keys: u64,
    stats: Stats,
}

impl Drop for Sim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{}: failed; replay with SURPLUS_SIM_SEED=0x{:016x} cargo test -p surplus-market --test market_day",
                self.ctx, self.ctx.seed
            );
        }
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let ctx = Ctx {
            seed,
            step: 0,
            now: DAY_START_MS,
        };
        let mut rng = SplitMix64(seed);
        let providers: Vec<Provider> = (0..rng.range(2, 4) as usize)
            .map(|p| Provider {
                name: format!("p{p}"),
                goal: GOALS[rng.index(GOALS.len())],
                currency: CURRENCIES[p % CURRENCIES.len()],
                commission_bps: rng.range(0, 2_500) as u32,
            })
            .collect();
        let mut listings = Vec::new();
        let mut host_listing = BTreeMap::new();
        for p in 0..providers.len() {
            for l in 0..rng.range(1, 3) {
                let name = format!("p{p}-l{l}");
                let mut hosts: Vec<Uuid> = (0..rng.range(2, 6)).map(|_| rng.uuid()).collect();
                hosts.sort();
                let minimum = rng.range(6, 30) * 10;
                let on_demand = minimum * rng.range(120, 200) / 100;
                let term = Term {
                    upfront: on_demand * rng.range(2, 10),
                    hourly: (on_demand * 70 / 100).max(minimum),
                    term_ms: rng.range(1, 6) as i64 * HOUR_MS,
                };
                ctx.ok(quote::check_term(&term, on_demand, minimum), "a term");
                let grace_ms = ctx.ok(
                    interrupt::check_listing_grace(rng.range(0, 300) as i64 * 1_000),
                    "a grace",
                );
                let opened = DAY_START_MS - rng.below(SPOT_PERIOD_MS as u64) as i64;
                let mut market = SpotMarket::new(SPOT_PERIOD_MS, opened);
                market.handle_supply(Supply {
                    class: name.clone(),
                    capacity: hosts.len() as u32,
                    minimum,
                });
                for h in &hosts {
                    host_listing.insert(*h, listings.len());
                }
                listings.push(Listing {
                    name,
                    provider: p,
                    offered: hosts.len() as u32,
                    hosts,
                    minimum,
                    on_demand,
                    term,
                    interruptibility: INTERRUPTIBILITIES[rng.index(INTERRUPTIBILITIES.len())],
                    grace_ms,
                    market,
                    price: minimum,
                });
            }
        }
        let clients = (0..rng.range(5, 9)).map(|c| format!("c{c}")).collect();
        Sim {
            ctx,
            rng,
            providers,
            listings,
            host_listing,
            clients,
            book: Book::default(),
            live: BTreeSet::new(),
            meters: BTreeMap::new(),
            released: BTreeSet::new(),
            spot: BTreeMap::new(),
            on_auction: BTreeSet::new(),
            withdrawn: BTreeMap::new(),
            lots: Vec::new(),
            closed: Vec::new(),
            reclaims: Vec::new(),
            quotes: Vec::new(),
            ledger: Ledger::default(),
            keys: 0,
            stats: Stats::default(),
        }
    }

    fn run(mut self) -> Stats {
        for step in 1..=STEPS {
            self.step(step);
        }
        std::mem::take(&mut self.stats)
    }

    fn step(&mut self, step: i64) {
        let prev = self.ctx.now;
        self.ctx.step = step;
        self.ctx.now = DAY_START_MS + step * STEP_MS;
        self.meter(prev);
        self.expire(prev);
        let now = self.ctx.now;
        self.withdrawn.retain(|_, back| *back > now);
        self.finish_reclaims();
        self.close_auctions();
        self.client_actions();
        self.provider_actions();
        self.clear_spot_markets();
        self.close_auctions();
        if (now - DAY_START_MS) % HOUR_MS == 0 {
            self.bill();
            self.pay_out();
            self.prune();
        }
        self.check_invariants();
    }

    fn busy(&self) -> u64 {
        match (self.ctx.now - DAY_START_MS) / HOUR_MS {
            8 | 9 | 18 | 19 => 3,
            _ => 1,
        }
    }

    fn client(&mut self) -> String {
        let i = self.rng.index(self.clients.len());
        self.clients[i].clone()
    }

    /// The hosts of listing `i` that may be given to a new reservation of it.
    fn available(&self, i: usize) -> Vec<Uuid> {
        self.listings[i]
            .hosts
            .iter()
            .filter(|h| !self.on_auction.contains(h) && !self.withdrawn.contains_key(h))
            .copied()
            .collect()
    }

    fn key(&mut self, what: &str) -> String {
        self.keys += 1;
        format!("{what}-{}", self.keys)
    }

    /// Applies `posting`, which must be taken; now and then applies it again, which
    /// must change nothing (a retried posting is recognised by its key).
    fn post(&mut self, posting: Posting) {
        let ctx = self.ctx;
        let applied = self.ledger.apply(&posting);
        ensure!(
            ctx,
            applied == Ok(Applied::Posted),
            "the ledger did not take posting {}: {applied:?}",
            posting.key
        );
        self.stats.postings += 1;
        if self.rng.chance(50) {
            let after = self.ledger.balances.clone();
            let again = self.ledger.apply(&posting);
            ensure!(
                ctx,
                again == Ok(Applied::Duplicate) && self.ledger.balances == after,
                "posting {} applied twice: {again:?}",
                posting.key
            );
        }
    }

    fn charge(&mut self, kind: &str, key: String, client: &str, provider: usize, amount: u64) {
        if amount == 0 {
            return;
        }
        let p = &self.providers[provider];
        let posting = Posting {
            kind: kind.into(),
            ..bill_posting(
                &key,
                client,
                &p.name,
                p.currency,
                amount as i64,
                p.commission_bps,
            )
        };
        self.post(posting);
    }

    /// Starts metering reservations just made.
    fn admit(&mut self, made: &[Reservation]) {
        for r in made {
            let listing = self.host_listing[&r.host];
            self.live.insert(r.id);
            self.meters.insert(
                r.id,
                Meter {
                    client: r.holder.clone(),
                    provider: self.listings[listing].provider,
                    price_ms: 0,
                    charged: 0,
                },
            );
            *self.stats.reserved.entry(mode_name(r.mode)).or_default() += 1;
            if do_not_interrupt(r) {
                self.stats.do_not_interrupt += 1;
            }
        }
    }

    /// Meters `[prev, now)` for every live reservation: its price, or for spot the
    /// class's price of the last clearing before `now`.
    fn meter(&mut self, prev: i64) {
        let ctx = self.ctx;
        let now = ctx.now;
        let mut ended = Vec::new();
        for id in &self.live {
            let r = self.book.get(*id);
            ensure!(ctx, r.is_some(), "live reservation {id} left the book");
            let r = r.expect("checked");
            let (start, end) = r.billing_window(now);
            let overlap = (end.min(now) - start.max(prev)).max(0);
            let rate = if r.mode == PricingMode::Spot {
                self.listings[self.host_listing[&r.host]].price
            } else {
                r.price
            };
            let meter = self
                .meters
                .get_mut(id)
                .expect("every live reservation has a meter");
            meter.price_ms += u128::from(rate) * overlap as u128;
            if r.end_ms().is_some_and(|e| e <= now) {
                ended.push(*id);
            }
        }
        for id in ended {
            self.live.remove(&id);
        }
    }

    fn expire(&mut self, prev: i64) {
        let ctx = self.ctx;
        // A term that ended is over even before its expiry is recorded: neither its
        // holder nor any cause can end it again.
        let over: Vec<(Uuid, String)> = self
            .book
            .reservations()
            .filter(|r| r.state == State::Active && r.ends_at_ms.is_some_and(|e| e <= ctx.now))
            .map(|r| (r.id, r.holder.clone()))
            .collect();
        for (id, holder) in over {
            if self.rng.chance(300) {
                let got = self.book.handle_release(ctx.now, id, &holder);
                ctx.refused(got, "ended", format_args!("release of {id} after its term"));
                let cause = Cause::ALL[self.rng.index(Cause::ALL.len())];
                let got = self.book.handle_interrupt(ctx.now, id, cause);
                ctx.refused(got, "ended", format_args!("{cause} on {id} after its term"));
            }
        }
        for e in self.book.poll_expired(ctx.now) {
            let r = ctx.ok(
                self.book.get(e.reservation).ok_or("gone"),
                "an expired reservation",
            );
            ensure!(
                ctx,
                e.why == EndReason::Expired
                    && Some(e.at_ms) == r.ends_at_ms
                    && e.at_ms > prev
                    && e.at_ms <= ctx.now,
                "an expiry must end {} at its term {:?}, reported once: {e:?}",
                r.id,
                r.ends_at_ms
            );
            self.stats.expiries += 1;
            if do_not_interrupt(r) {
                self.stats.do_not_interrupt_expired += 1;
            }
        }
    }

    fn finish_reclaims(&mut self) {
        let ctx = self.ctx;
        let now = ctx.now;
        let (due, later): (Vec<Reclaim>, Vec<Reclaim>) = std::mem::take(&mut self.reclaims)
            .into_iter()
            .partition(|r| r.deadline_ms <= now);
        self.reclaims = later;
        for reclaim in due {
            let id = reclaim.reservation;
            let r = ctx.ok(self.book.get(id).cloned().ok_or("gone"), "a reclaimed one");
            let already_ended = r.end_ms().is_some_and(|e| e <= now);
            let got = self.book.handle_interrupt(now, id, Cause::ProviderReclaim);
            if already_ended {
                ctx.refused(
                    got,
                    "ended",
                    format_args!("reclaim of {id}, ended in its grace"),
                );
                continue;
            }
            let ended = ctx.ok(
                got,
                format_args!("reclaim of {id} at its notice's deadline"),
            );
            ensure!(
                ctx,
                ended.at_ms == now
                    && ended.why
                        == (EndReason::Interrupted {
                            cause: Cause::ProviderReclaim,
                        })
                    && allowed(r.interruptibility, r.goal, Cause::ProviderReclaim).is_ok(),
                "the book reclaimed {r:?} as {ended:?}"
            );
            self.stats.reclaims += 1;
            let back = now + self.rng.range(1, 3) as i64 * HOUR_MS;
            self.withdrawn.insert(r.host, back);
        }
    }

    fn close_auctions(&mut self) {
        let mut i = 0;
        while i < self.lots.len() {
            match self.lots[i].auction.poll_close(self.ctx.now) {
                Some(outcome) => {
                    let lot = self.lots.remove(i);
                    self.settle(lot, outcome);
                }
                None => i += 1,
            }
        }
    }

    /// The outcome the simulation expects from the bids it sent: the winner's bid,
    /// bidder and price, and the reason.
    fn expected_outcome(lot: &Lot) -> (Option<(Uuid, String, u64)>, Reason) {
        let win = |s: &Sent, price: u64| Some((s.id, s.bidder.clone(), price));
        match lot.auction.kind {
            Kind::SealedSecond { reserve } => {
                let mut ranked: Vec<&Sent> = lot.sent.iter().collect();
                ranked.sort_by(|a, b| {
                    b.amount
                        .cmp(&a.amount)
                        .then(a.at_ms.cmp(&b.at_ms))
                        .then(a.id.cmp(&b.id))
                });
                match ranked[..] {
                    [] => (None, Reason::NoSale),
                    [first] => (win(first, reserve), Reason::SecondPrice),
                    [first, second, ..] => {
                        (win(first, second.amount.max(reserve)), Reason::SecondPrice)
                    }
                }
            }
            Kind::English { buy_now, .. } => match (lot.sent.last(), buy_now) {
                (None, _) => (None, Reason::NoSale),
                (Some(last), Some(price)) if lot.bought_now => (win(last, price), Reason::BuyNow),
                (Some(last), _) => (win(last, last.amount), Reason::HighestBid),
            },
            other => unreachable!("the simulation runs no {other:?}"),
        }
    }

    fn settle(&mut self, lot: Lot, outcome: auction::Outcome) {
        let ctx = self.ctx;
        let (winner, reason) = Self::expected_outcome(&lot);
        let got = outcome
            .winner
            .as_ref()
            .map(|w| (w.bid, w.bidder.clone(), w.price));
        ensure!(
            ctx,
            outcome.auction == lot.auction.id && outcome.reason == reason && got == winner,
            "auction {:?} with the bids {:?} closed as {outcome:?}, expected {winner:?} ({reason:?})",
            lot.auction.kind,
            lot.sent
        );
        let decided = if lot.bought_now {
            outcome.decided_at_ms <= ctx.now
        } else {
            outcome.decided_at_ms == lot.auction.ends_at_ms
        };
        ensure!(ctx, decided, "decided at {}", outcome.decided_at_ms);
        self.on_auction.remove(&lot.host);
        if let Some(w) = &outcome.winner {
            let listing = &self.listings[lot.listing];
            let request = Request {
                ids: vec![self.rng.uuid()],
                listing: listing.name.clone(),
                holder: w.bidder.clone(),
                mode: PricingMode::Auction,
                interruptibility: listing.interruptibility,
                goal: self.providers[listing.provider].goal,
                price: 0,
                upfront: w.price,
                term_ms: Some(lot.term_ms),
            };
            let made = ctx.ok(
                self.book.handle_reserve(ctx.now, request, &[lot.host]),
                format_args!("the lot of auction {}", lot.auction.id),
            );
            ensure!(ctx, made[0].host == lot.host, "the winner got another host");
            self.admit(&made);
            let provider = self.listings[lot.listing].provider;
            let key = format!("auction-{}", lot.auction.id);
            self.charge("auction", key, &w.bidder, provider, w.price);
            match lot.auction.kind {
                Kind::SealedSecond { .. } => self.stats.second_price_sales += 1,
                _ => self.stats.english_sales += 1,
            }
        } else {
            self.stats.no_sales += 1;
        }
        self.closed.push((lot, outcome));
    }

    fn client_actions(&mut self) {
        let busy = self.busy();
        for (quote, client, listing) in std::mem::take(&mut self.quotes) {
            self.accept_quote(quote, client, listing);
        }
        if self.rng.chance(300 * busy) {
            self.spot_bid();
        }
        let now = self.ctx.now;
        let done: Vec<Uuid> = (self.spot.iter())
            .filter(|(_, h)| h.until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.cancel_spot_bid(id);
        }
        if self.rng.chance(20) && !self.spot.is_empty() {
            let nth = self.rng.index(self.spot.len());
            let id = *self.spot.keys().nth(nth).expect("in range");
            self.cancel_spot_bid(id);
        }
        if self.rng.chance(80 * busy) {
            self.on_demand();
        }
        if self.rng.chance(50) {
            self.immediate_quote();
        }
        if self.rng.chance(40 * busy) {
            self.long_term();
        }
        if self.rng.chance(60) {
            self.release();
        }
        if self.rng.chance(20) {
            self.release_by_another();
        }
        if self.rng.chance(30) {
            self.try_interrupt();
        }
        self.auction_bids(busy);
        if self.rng.chance(20) {
            let client = self.client();
            let currency = CURRENCIES[self.rng.index(CURRENCIES.len())];
            let amount = self.rng.range(100, 10_000) as i64;
            let key = self.key("topup");
            self.post(ledger::payment(&key, "topup", &client, currency, amount));
        }
    }

    fn spot_bid(&mut self) {
        let ctx = self.ctx;
        let i = self.rng.index(self.listings.len());
        if self.spot.values().filter(|h| h.listing == i).count() >= 6 {
            return;
        }
        let client = self.client();
        let l = &self.listings[i];
        let bid = spot::Bid {
            id: self.rng.uuid(),
            class: l.name.clone(),
            client,
            max_price: l.minimum * self.rng.range(70, 250) / 100,
            quantity: self.rng.range(1, 3) as u32,
            all_or_nothing: self.rng.chance(250),
            placed_at_ms: 0,
        };
        let supply = ctx.ok(l.market.supply(&l.name).cloned().ok_or("none"), "a supply");
        let expected = if bid.max_price < supply.minimum {
            Some("minimum")
        } else if bid.all_or_nothing && bid.quantity > supply.capacity {
            Some("all_or_nothing")
        } else {
            None
        };
        let got = self.listings[i].market.handle_bid(ctx.now, bid.clone());
        match (got, expected) {
            (Ok(()), None) => {
                self.spot.insert(
                    bid.id,
                    SpotHolding {
                        listing: i,
                        client: bid.client,
                        max_price: bid.max_price,
                        reservations: Vec::new(),
                        until: ctx.now + self.rng.range(20, 180) as i64 * 60_000,
                    },
                );
                self.stats.spot_bids += 1;
                if self.rng.chance(300) {
                    self.listings[i].market.request_clearing(ctx.now);
                }
            }
            (Err(e), Some(rule)) => ensure!(ctx, e.rule == rule, "{bid:?} against {supply:?}: {e}"),
            (got, expected) => {
                panic!("{ctx}: {bid:?} against {supply:?}: {got:?}, expected {expected:?}")
            }
        }
    }

    fn cancel_spot_bid(&mut self, id: Uuid) {
        let ctx = self.ctx;
        let holding = self.spot.remove(&id).expect("present");
        let cancelled = self.listings[holding.listing].market.handle_cancel(id);
        ctx.ok(cancelled, format_args!("cancel spot bid {id}"));
        for rid in holding.reservations {
            let ended = self.book.handle_release(ctx.now, rid, &holding.client);
            ctx.ok(
                ended,
                format_args!("release {rid} of cancelled spot bid {id}"),
            );
            self.released.insert(rid);
            self.stats.releases += 1;
        }
    }

    /// Reserves for `request` on listing `i`: the reservations, or `None` when sold out
    /// (the only refusal a well-formed request may get).
    fn reserve(&mut self, i: usize, request: Request) -> Option<Vec<Reservation>> {
        let ctx = self.ctx;
        let available = self.available(i);
        let wanted = request.ids.len();
        match self
            .book
            .handle_reserve(ctx.now, request.clone(), &available)
        {
            Ok(made) => {
                ensure!(
                    ctx,
                    made.len() == wanted
                        && made.iter().all(|r| available.contains(&r.host)
                            && r.starts_at_ms == ctx.now
                            && r.holder == request.holder
                            && r.price == request.price),
                    "{request:?} made {made:?} from {available:?}"
                );
                self.admit(&made);
                Some(made)
            }
            Err(e) => {
                ensure!(ctx, e.rule == "sold_out", "{request:?} refused: {e}");
                self.stats.sold_out += 1;
                None
            }
        }
    }

    fn request(&mut self, i: usize, mode: PricingMode, price: u64) -> Request {
        let units = self.rng.range(1, 2);
        let holder = self.client();
        let l = &self.listings[i];
        Request {
            ids: (0..units).map(|_| self.rng.uuid()).collect(),
            listing: l.name.clone(),
            holder,
            mode,
            interruptibility: l.interruptibility,
            goal: self.providers[l.provider].goal,
            price,
            upfront: 0,
            term_ms: None,
        }
    }

    fn on_demand(&mut self) {
        let i = self.rng.index(self.listings.len());
        let l = &self.listings[i];
        let price = self
            .ctx
            .ok(quote::on_demand(l.on_demand, l.minimum), "on-demand rate");
        let request = self.request(i, PricingMode::OnDemand, price);
        self.reserve(i, request);
    }

    fn immediate_quote(&mut self) {
        let ctx = self.ctx;
        let i = self.rng.index(self.listings.len());
        let l = &self.listings[i];
        let (minimum, name) = (l.minimum, l.name.clone());
        let below = self.rng.chance(100);
        let price = if below {
            minimum - 1
        } else {
            l.on_demand * self.rng.range(90, 110) / 100
        };
        let issued = quote::issue(
            self.rng.uuid(),
            &name,
            price,
            minimum,
            ctx.now,
            quote::DEFAULT_VALIDITY_MS,
        );
        if below {
            ctx.refused(issued, "minimum", "a quote below the minimum");
            return;
        }
        let quote = ctx.ok(issued, "a quote");
        let client = self.client();
        if self.rng.chance(700) {
            self.accept_quote(quote, client, i);
        } else {
            self.quotes.push((quote, client, i));
        }
    }

    fn accept_quote(&mut self, quote: Quote, client: String, i: usize) {
        let ctx = self.ctx;
        let got = quote::accept(&quote, ctx.now);
        if ctx.now >= quote.valid_until_ms {
            ctx.refused(got, "expired", format_args!("{quote:?} accepted late"));
            return;
        }
        let price = ctx.ok(got, format_args!("{quote:?} accepted in time"));
        ensure!(
            ctx,
            price == quote.price,
            "a quote is honoured at its price"
        );
        let request = Request {
            holder: client,
            ..self.request(i, PricingMode::Immediate, price)
        };
        self.reserve(i, request);
    }

    fn long_term(&mut self) {
        let ctx = self.ctx;
        let i = self.rng.index(self.listings.len());
        let term = self.listings[i].term;
        let request = Request {
            interruptibility: Interruptibility::NoInterruptions,
            ..self.request(i, PricingMode::OnDemand, 0)
        }
        .with_term(&term);
        let Some(made) = self.reserve(i, request) else {
            return;
        };
        let provider = self.listings[i].provider;
        for r in made {
            ensure!(
                ctx,
                r.mode == PricingMode::Reserved
                    && r.upfront == term.upfront
                    && r.price == term.hourly
                    && r.ends_at_ms == Some(ctx.now + term.term_ms),
                "a long-term reservation {r:?} of {term:?}"
            );
            self.charge(
                "upfront",
                format!("upfront-{}", r.id),
                &r.holder,
                provider,
                r.upfront,
            );
        }
    }

    /// Live reservations holding their host from now on, optionally without spot ones.
    fn holding(&self, with_spot: bool) -> Vec<Reservation> {
        self.live
            .iter()
            .filter_map(|id| self.book.get(*id))
            .filter(|r| r.holds_from(self.ctx.now) && (with_spot || r.mode != PricingMode::Spot))
            .cloned()
            .collect()
    }

    fn release(&mut self) {
        let ctx = self.ctx;
        let rs = self.holding(false);
        if rs.is_empty() {
            return;
        }
        let r = &rs[self.rng.index(rs.len())];
        // A term is mostly kept to its end.
        if r.ends_at_ms.is_some() && !self.rng.chance(200) {
            return;
        }
        let ended = ctx.ok(
            self.book.handle_release(ctx.now, r.id, &r.holder),
            format_args!("release of {} by its holder", r.id),
        );
        ensure!(
            ctx,
            ended.at_ms == ctx.now && ended.why == EndReason::Released,
            "{ended:?}"
        );
        self.released.insert(r.id);
        self.stats.releases += 1;
    }

    fn release_by_another(&mut self) {
        let ctx = self.ctx;
        let rs = self.holding(true);
        if rs.is_empty() {
            return;
        }
        let r = &rs[self.rng.index(rs.len())];
        let other = self.client();
        if other == r.holder {
            return;
        }
        let got = self.book.handle_release(ctx.now, r.id, &other);
        ctx.refused(
            got,
            "not_holder",
            format_args!("{other} releasing {}", r.id),
        );
    }

    /// Asks the book to interrupt a live reservation for a random cause: a cause its
    /// interruptibility refuses must be refused by that rule (nothing changes); an
    /// allowed one is only checked, not applied.
    fn try_interrupt(&mut self) {
        let ctx = self.ctx;
        let rs = self.holding(true);
        if rs.is_empty() {
            return;
        }
        let r = &rs[self.rng.index(rs.len())];
        let cause = Cause::ALL[self.rng.index(Cause::ALL.len())];
        match allowed(r.interruptibility, r.goal, cause) {
            Err(rule) => {
                let got = self.book.handle_interrupt(ctx.now, r.id, cause);
                ctx.refused(got, rule, format_args!("{cause} on {r:?}"));
                self.stats.refused_interrupts += 1;
            }
            Ok(()) => {
                let got = self.book.check_interrupt(ctx.now, r.id, cause);
                ctx.ok(got, format_args!("{cause} on {r:?}"));
            }
        }
    }

    fn auction_bids(&mut self, busy: u64) {
        let ctx = self.ctx;
        let now = ctx.now;
        for li in 0..self.lots.len() {
            if !self.rng.chance(250 * busy) {
                continue;
            }
            for _ in 0..self.rng.range(1, 2) {
                if self.lots[li].auction.phase(now) != Phase::Open {
                    break;
                }
                let bidder = self.client();
                let id = self.rng.uuid();
                let low = self.rng.chance(150);
                let lot = &self.lots[li];
                let minimum = lot.auction.provider_minimum;
                let lowest = ctx.ok(
                    lot.auction.lowest_acceptable(now).ok_or("none"),
                    "an open auction's lowest acceptable bid",
                );
                let (amount, below_rule) = match lot.auction.kind {
                    Kind::English { .. } => {
                        let amount = if low {
                            lowest.saturating_sub(self.rng.range(1, 20))
                        } else {
                            lowest + self.rng.below(lowest / 5 + 1)
                        };
                        let rule = if lot.sent.is_empty() {
                            "reserve"
                        } else {
                            "increment"
                        };
                        (amount, rule)
                    }
                    Kind::SealedSecond { reserve } => {
                        (reserve * self.rng.range(80, 220) / 100, "reserve")
                    }
                    other => unreachable!("the simulation runs no {other:?}"),
                };
                let expected = if amount < minimum {
                    Some("provider_minimum")
                } else if amount < lowest {
                    Some(below_rule)
                } else {
                    None
                };
                let ends = match lot.auction.kind {
                    Kind::English {
                        buy_now: Some(b), ..
                    } => b >= lowest && amount >= b,
                    _ => false,
                };
                let superseded = match lot.auction.kind {
                    Kind::English { .. } => lot.sent.last().map(|s| s.id),
                    _ => lot.sent.iter().find(|s| s.bidder == bidder).map(|s| s.id),
                };
                let bid = auction::Bid {
                    id,
                    bidder: bidder.clone(),
                    amount,
                };
                let english = matches!(lot.auction.kind, Kind::English { .. });
                let lot = &mut self.lots[li];
                let got = lot.auction.handle_bid(now, bid);
                let Some(rule) = expected else {
                    let accepted = ctx.ok(got, format_args!("bid {amount} (lowest {lowest})"));
                    ensure!(
                        ctx,
                        accepted.bid == id
                            && accepted.ends == ends
                            && accepted.superseded == superseded,
                        "bid {amount} on {:?}: {accepted:?}",
                        lot.auction.kind
                    );
                    lot.sent.retain(|s| english || s.bidder != bidder);
                    lot.sent.push(Sent {
                        id,
                        bidder,
                        amount,
                        at_ms: now,
                    });
                    lot.bought_now |= ends;
                    continue;
                };
                ctx.refused(got, rule, format_args!("bid {amount} (lowest {lowest})"));
            }
        }
    }

    fn provider_actions(&mut self) {
        if self.rng.chance(40) {
            self.reclaim();
        }
        if self.rng.chance(30) {
            self.new_auction();
        }
        for p in 0..self.providers.len() {
            if self.rng.chance(2) {
                self.providers[p].goal = GOALS[self.rng.index(GOALS.len())];
            }
        }
    }

    fn reclaim(&mut self) {
        let ctx = self.ctx;
        let p = self.rng.index(self.providers.len());
        let goal = self.providers[p].goal;
        let pending: BTreeSet<Uuid> = self.reclaims.iter().map(|r| r.reservation).collect();
        let mine: Vec<Reservation> = self
            .holding(true)
            .into_iter()
            .filter(|r| {
                !pending.contains(&r.id) && self.listings[self.host_listing[&r.host]].provider == p
            })
            .collect();
        let candidates: Vec<Candidate> = mine
            .iter()
            .map(|r| Candidate {
                reservation: r.id,
                host: r.host,
                interruptibility: r.interruptibility,
                price: r.price,
                started_at_ms: r.starts_at_ms,
                goal: Some(r.goal),
            })
            .collect();
        let count = self.rng.range(1, 2) as usize;
        let chosen = interrupt::choose_reclaim(&candidates, count, goal);
        // Each by the goal recorded with it; cheapest first, then the most recently
        // started, then the lowest id.
        let mut expected: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| {
                allowed(
                    c.interruptibility,
                    c.goal.unwrap_or(goal),
                    Cause::ProviderReclaim,
                )
                .is_ok()
            })
            .collect();
        expected.sort_by_key(|c| (c.price, std::cmp::Reverse(c.started_at_ms), c.reservation));
        let expected: Vec<Uuid> = expected.iter().take(count).map(|c| c.reservation).collect();
        ensure!(
            ctx,
            chosen == expected,
            "a reclaim of {count} under {goal:?} from {candidates:?} chose {chosen:?}, expected {expected:?}"
        );
        for id in chosen {
            let r = mine.iter().find(|r| r.id == id).expect("a candidate");
            let l = &self.listings[self.host_listing[&r.host]];
            match self
                .book
                .check_interrupt(ctx.now, id, Cause::ProviderReclaim)
            {
                Ok(_) => {
                    ensure!(
                        ctx,
                        allowed(r.interruptibility, r.goal, Cause::ProviderReclaim).is_ok(),
                        "the book lets a reclaim take {r:?}"
                    );
                    let notice = interrupt::notice(
                        ctx.now,
                        Cause::ProviderReclaim,
                        Some(l.grace_ms),
                        DEFAULT_GRACE_MS,
                    );
                    let grace = l.grace_ms.max(DEFAULT_GRACE_MS);
                    ensure!(
                        ctx,
                        notice.grace_ms == grace && notice.deadline_ms == ctx.now + grace,
                        "{notice:?} for a listing's grace of {} ms",
                        l.grace_ms
                    );
                    self.reclaims.push(Reclaim {
                        reservation: id,
                        deadline_ms: notice.deadline_ms,
                    });
                }
                Err(e) => {
                    // The goal changed since it was sold: the one recorded decides.
                    ensure!(
                        ctx,
                        allowed(r.interruptibility, r.goal, Cause::ProviderReclaim) == Err(e.rule),
                        "the book refused a reclaim of {r:?}: {e}"
                    );
                    self.stats.reclaims_refused += 1;
                }
            }
        }
    }

    fn new_auction(&mut self) {
        let ctx = self.ctx;
        let now = ctx.now;
        let i = self.rng.index(self.listings.len());
        let free: Vec<Uuid> = self
            .available(i)
            .into_iter()
            .filter(|h| {
                !self
                    .book
                    .reservations()
                    .any(|r| r.host == *h && r.holds_from(now))
            })
            .collect();
        let Some(&host) = free.first() else {
            return;
        };
        let minimum = self.listings[i].minimum;
        let id = self.rng.uuid();
        let ends = now + self.rng.range(20, 90) as i64 * 60_000;
        if self.rng.chance(100) {
            let kind = Kind::SealedSecond {
                reserve: minimum - 1,
            };
            let made = Auction::new(id, kind, minimum, now, ends);
            ctx.refused(made, "provider_minimum", "a reserve below the minimum");
            return;
        }
        let reserve = minimum * self.rng.range(100, 150) / 100;
        let kind = if self.rng.chance(500) {
            Kind::English {
                reserve,
                increment: (minimum / 10).max(1),
                buy_now: self.rng.chance(300).then_some(reserve * 3),
            }
        } else {
            Kind::SealedSecond { reserve }
        };
        let auction = ctx.ok(Auction::new(id, kind, minimum, now, ends), "an auction");
        self.on_auction.insert(host);
        self.lots.push(Lot {
            auction,
            listing: i,
            host,
            term_ms: self.rng.range(1, 4) as i64 * HOUR_MS,
            sent: Vec::new(),
            bought_now: false,
        });
    }

    fn clear_spot_markets(&mut self) {
        let ctx = self.ctx;
        let now = ctx.now;
        let held_otherwise: BTreeSet<Uuid> = self
            .book
            .reservations()
            .filter(|r| r.holds_at(now) && r.mode != PricingMode::Spot)
            .map(|r| r.host)
            .collect();
        for i in 0..self.listings.len() {
            let capacity = self
                .available(i)
                .iter()
                .filter(|h| !held_otherwise.contains(h))
                .count() as u32;
            let l = &mut self.listings[i];
            l.market.handle_supply(Supply {
                class: l.name.clone(),
                capacity,
                minimum: l.minimum,
            });
            if ctx.step % 3 == 0 {
                self.check_monotone(i);
            }
            let l = &mut self.listings[i];
            let (supplies, bids) = (l.market.supplies.clone(), l.market.bids.clone());
            if let Some(cleared) = l.market.poll_clearing(now) {
                self.apply_clearing(i, capacity, &supplies, &bids, cleared);
            }
        }
    }

    /// Invariant 3: with supply fixed, one more random bid never lowers a price.
    fn check_monotone(&mut self, i: usize) {
        let ctx = self.ctx;
        let client = self.client();
        let l = &self.listings[i];
        let extra = spot::Bid {
            id: self.rng.uuid(),
            class: l.name.clone(),
            client,
            max_price: self.rng.below(3 * l.minimum + 1),
            quantity: self.rng.below(5) as u32,
            all_or_nothing: self.rng.chance(300),
            placed_at_ms: DAY_START_MS + self.rng.below((ctx.now - DAY_START_MS) as u64 + 1) as i64,
        };
        let before = spot::clear(&l.market.supplies, &l.market.bids);
        let more = [l.market.bids.clone(), vec![extra.clone()]].concat();
        let after = spot::clear(&l.market.supplies, &more);
        ensure!(
            ctx,
            before.classes.len() == after.classes.len(),
            "a bid changed the classes"
        );
        for (b, a) in before.classes.iter().zip(&after.classes) {
            ensure!(
                ctx,
                a.class == b.class && a.price >= b.price,
                "adding {extra:?} lowered the price of {} from {} to {} (supply {:?}, bids {:?})",
                b.class,
                b.price,
                a.price,
                l.market.supplies,
                l.market.bids
            );
        }
        self.stats.monotone_checks += 1;
    }

    fn apply_clearing(
        &mut self,
        i: usize,
        capacity: u32,
        supplies: &[Supply],
        bids: &[spot::Bid],
        cleared: spot::Cleared,
    ) {
        let ctx = self.ctx;
        let now = ctx.now;
        let name = self.listings[i].name.clone();
        let minimum = self.listings[i].minimum;
        ensure!(
            ctx,
            cleared.at_ms == now && cleared.clearing == spot::clear(supplies, bids),
            "the market cleared {name} otherwise than `clear` does"
        );
        let cc = ctx.ok(cleared.clearing.class(&name).ok_or("absent"), "the class");
        // Invariant 2.
        ensure!(
            ctx,
            cc.capacity == capacity && cc.allocated() <= u64::from(capacity),
            "{name} allocated {} of {} units offered: {cc:?}",
            cc.allocated(),
            capacity
        );
        ensure!(
            ctx,
            cc.price >= minimum && cc.allocations.iter().all(|a| a.max_price >= cc.price),
            "{name} cleared at {} (minimum {minimum}): {cc:?}",
            cc.price
        );
        let allocated: BTreeMap<Uuid, u32> =
            cc.allocations.iter().map(|a| (a.bid, a.quantity)).collect();
        let interrupted: BTreeMap<Uuid, &spot::Interruption> =
            cleared.interruptions.iter().map(|x| (x.bid, x)).collect();
        for x in &cleared.interruptions {
            let held = self.spot.get(&x.bid).map(|h| h.reservations.len() as u32);
            let max_price = self.spot.get(&x.bid).map(|h| h.max_price);
            let reason = if max_price.is_some_and(|m| cc.price > m) {
                spot::InterruptReason::PriceAboveMax
            } else {
                spot::InterruptReason::Outbid
            };
            ensure!(
                ctx,
                x.class == name
                    && held == Some(x.held)
                    && Some(x.max_price) == max_price
                    && x.price == Some(cc.price)
                    && x.reason == reason,
                "interruption {x:?} at {}, but the bid holds {held:?} reservations at most {max_price:?} (expected {reason:?})",
                cc.price
            );
        }
        // Shrink: end what the clearing took away, for the interruption's cause.
        for (bid, holding) in self.spot.iter_mut().filter(|(_, h)| h.listing == i) {
            let k = holding.reservations.len() as u32;
            let q = allocated.get(bid).copied().unwrap_or(0);
            if q >= k {
                ensure!(
                    ctx,
                    !interrupted.contains_key(bid),
                    "{bid} interrupted while it went from {k} to {q} units"
                );
                continue;
            }
            let x = interrupted.get(bid);
            ensure!(
                ctx,
                x.is_some_and(|x| x.kept == q),
                "the clearing cut {bid} from {k} to {q} units; its interruption: {x:?}"
            );
            let cause = Cause::from(x.expect("checked").reason);
            for _ in q..k {
                let rid = holding.reservations.pop().expect("k > q");
                let ended = self.book.handle_interrupt(now, rid, cause);
                ctx.ok(ended, format_args!("spot interruption of {rid} ({cause})"));
                self.stats.spot_interruptions += 1;
            }
        }
        // Grow: reserve what the clearing gave.
        let available = self.available(i);
        let l = &self.listings[i];
        let goal = self.providers[l.provider].goal;
        let mut made_all = Vec::new();
        for (bid, q) in allocated {
            let holding = self.spot.get_mut(&bid);
            ensure!(ctx, holding.is_some(), "{bid} is allocated but not live");
            let holding = holding.expect("checked");
            let k = holding.reservations.len() as u32;
            if q <= k {
                continue;
            }
            let request = Request {
                ids: (k..q).map(|_| self.rng.uuid()).collect(),
                listing: name.clone(),
                holder: holding.client.clone(),
                mode: PricingMode::Spot,
                interruptibility: Interruptibility::PriceBased,
                goal,
                price: cc.price,
                upfront: 0,
                term_ms: None,
            };
            let made = self.book.handle_reserve(now, request, &available);
            let made = ctx.ok(made, format_args!("{} spot units for {bid}", q - k));
            holding.reservations.extend(made.iter().map(|r| r.id));
            made_all.extend(made);
        }
        self.admit(&made_all);
        let l = &mut self.listings[i];
        l.offered = capacity;
        l.price = cc.price;
        self.stats.spot_clearings += 1;
    }

    /// Charges every hour's metered use, one posting per client and provider.
    fn bill(&mut self) {
        let hour = (self.ctx.now - DAY_START_MS) / HOUR_MS;
        let mut due: BTreeMap<(String, usize), u64> = BTreeMap::new();
        for meter in self.meters.values_mut() {
            let total =
                u64::try_from(meter.price_ms.div_ceil(HOUR_MS as u128)).expect("a day's use fits");
            if total > meter.charged {
                *due.entry((meter.client.clone(), meter.provider))
                    .or_default() += total - meter.charged;
                meter.charged = total;
            }
        }
        let live = &self.live;
        self.meters.retain(|id, _| live.contains(id));
        for ((client, provider), amount) in due {
            let key = format!("usage-h{hour}-{client}-{provider}");
            self.charge("usage", key, &client, provider, amount);
        }
    }

    fn pay_out(&mut self) {
        for p in 0..self.providers.len() {
            let account = ledger::provider(&self.providers[p].name);
            let currency = self.providers[p].currency;
            let balance = self
                .ledger
                .balances
                .get(&(account, currency.to_owned()))
                .copied()
                .unwrap_or(0);
            if balance > 0 {
                let amount = self.rng.range(1, balance as u64) as i64;
                let key = self.key("payout");
                let name = self.providers[p].name.clone();
                self.post(ledger::payout(&key, &name, currency, amount));
            }
        }
    }

    /// Rebuilds the book from the rows the shell would load: the reservations still
    /// active, still metered, or named by a pending reclaim.
    fn prune(&mut self) {
        let pending: BTreeSet<Uuid> = self.reclaims.iter().map(|r| r.reservation).collect();
        let (keep, gone): (Vec<Reservation>, Vec<Reservation>) =
            self.book.reservations().cloned().partition(|r| {
                r.state == State::Active || self.live.contains(&r.id) || pending.contains(&r.id)
            });
        for r in &gone {
            self.check_kept_promise(r);
        }
        self.book = Book::from_rows(keep);
    }

    /// Invariant 5 for one reservation.
    fn check_kept_promise(&self, r: &Reservation) {
        let ctx = self.ctx;
        if !do_not_interrupt(r) {
            return;
        }
        let kept = match r.state {
            State::Active => r.ends_at_ms.is_none_or(|end| end > ctx.now),
            State::Ended {
                why: EndReason::Released,
                ..
            } => self.released.contains(&r.id),
            State::Ended {
                why: EndReason::Expired,
                at_ms,
            } => r.ends_at_ms == Some(at_ms),
            State::Ended {
                why: EndReason::Interrupted { .. },
                ..
            } => false,
        };
        ensure!(
            ctx,
            kept,
            "a do-not-interrupt reservation broke its promise: {r:?}"
        );
    }

    fn check_invariants(&mut self) {
        let ctx = self.ctx;
        let now = ctx.now;
        // 1. One holder per host, from the reservations' own intervals.
        let mut holder: BTreeMap<Uuid, &Reservation> = BTreeMap::new();
        for r in self.book.reservations().filter(|r| r.holds_at(now)) {
            if let Some(other) = holder.insert(r.host, r) {
                panic!("{ctx}: host {} is held twice: {other:?} and {r:?}", r.host);
            }
        }
        for host in self.host_listing.keys() {
            let by_book = self.book.holder_of(*host, now).map(|r| r.id);
            ensure!(
                ctx,
                by_book == holder.get(host).map(|r| r.id),
                "holder_of({host}) is {by_book:?}"
            );
            ensure!(
                ctx,
                !holder.contains_key(host)
                    || !(self.on_auction.contains(host) || self.withdrawn.contains_key(host)),
                "host {host} on auction or withdrawn is held"
            );
            // Only the holder controls the host (its holder and one client asked).
            let someone = &self.clients[self.rng.index(self.clients.len())];
            let asked = holder
                .get(host)
                .map(|r| &r.holder)
                .into_iter()
                .chain([someone]);
            for client in asked {
                let holds = holder.get(host).is_some_and(|r| r.holder == *client);
                ensure!(
                    ctx,
                    self.book.may_control(*host, client, now) == holds,
                    "may {client} control {host}? The holder is {:?}",
                    holder.get(host).map(|r| &r.holder)
                );
            }
        }
        // 2. Spot holdings within the capacity offered, mirroring the last clearing.
        let mut spot_held = vec![0u32; self.listings.len()];
        for r in holder.values().filter(|r| r.mode == PricingMode::Spot) {
            spot_held[self.host_listing[&r.host]] += 1;
        }
        for (i, l) in self.listings.iter().enumerate() {
            ensure!(
                ctx,
                spot_held[i] <= l.offered,
                "{} spot units held in {} of {} offered",
                spot_held[i],
                l.name,
                l.offered
            );
        }
        for (bid, h) in &self.spot {
            let last = self.listings[h.listing].market.last.as_ref();
            let allocated = last
                .and_then(|c| c.class(&self.listings[h.listing].name))
                .and_then(|c| c.allocations.iter().find(|a| a.bid == *bid))
                .map_or(0, |a| a.quantity);
            ensure!(
                ctx,
                h.reservations.len() as u32 == allocated
                    && h.reservations.iter().all(|id| holder
                        .get(&self.book.get(*id).expect("in the book").host)
                        .is_some_and(|r| r.id == *id)),
                "spot bid {bid} holds {:?} for {allocated} units allocated",
                h.reservations
            );
        }
        // 4. Second-price winners pay max(reserve, highest losing bid), within their bid.
        for (lot, outcome) in self.closed.drain(..) {
            let (Kind::SealedSecond { reserve }, Some(w)) = (lot.auction.kind, &outcome.winner)
            else {
                continue;
            };
            let bid = lot.sent.iter().find(|s| s.id == w.bid);
            let highest_losing = lot
                .sent
                .iter()
                .filter(|s| s.id != w.bid)
                .map(|s| s.amount)
                .max();
            ensure!(
                ctx,
                w.price == highest_losing.unwrap_or(0).max(reserve)
                    && bid.is_some_and(|b| w.price <= b.amount && w.bidder == b.bidder),
                "a second-price winner {w:?} of {:?} with the bids {:?}",
                lot.auction.kind,
                lot.sent
            );
        }
        // 5. Do-not-interrupt reservations are never revoked.
        for r in self.book.reservations() {
            self.check_kept_promise(r);
        }
        // 6. Money sums to zero in every currency; nobody protected is below zero.
        for (currency, total) in self.ledger.totals() {
            ensure!(ctx, total == 0, "{currency} sums to {total}");
        }
        for ((account, currency), balance) in &self.ledger.balances {
            ensure!(
                ctx,
                *balance >= 0 || self.ledger.allows_negative(account),
                "{account} holds {balance} {currency}"
            );
        }
    }
}

#[test]
fn a_market_day_keeps_every_promise() {
    let seeds = sim::seeds(DEFAULT_SEED, RUNS);
    let base = seeds[0];
    let mut total = Stats::default();
    for seed in seeds {
        eprintln!("market day seed: 0x{seed:016x}");
        let stats = Sim::new(seed).run();
        eprintln!("  {stats:?}");
        total.add(&stats);
    }
    // The day must have exercised what it checks, or it proves nothing.
    let exercised = [
        ("spot clearings", total.spot_clearings),
        ("spot interruptions", total.spot_interruptions),
        ("price monotonicity checks", total.monotone_checks),
        ("second-price sales", total.second_price_sales),
        ("English sales", total.english_sales),
        ("reclaims", total.reclaims),
        ("do-not-interrupt reservations", total.do_not_interrupt),
        ("do-not-interrupt expiries", total.do_not_interrupt_expired),
        ("refused interruptions", total.refused_interrupts),
        ("releases", total.releases),
        ("postings", total.postings),
    ];
    for (what, n) in exercised {
        assert!(
            n > 0,
            "no {what} in {RUNS} market days from seed 0x{base:016x}"
        );
    }
}
