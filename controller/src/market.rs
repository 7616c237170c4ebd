//! The buying side's shell (issue 16): offers, quotes, reservations, their ends, and
//! who may control a reserved host; the spot market (`market::spot`) and auctions
//! (`market::auctions`) make reservations of the hosts they sell.
//!
//! Thin around `surplus_market`: the offers and their prices are
//! `surplus_market::offers`, quotes and terms `surplus_market::quote`, the book of
//! reserved hosts `surplus_market::reservations`. This module reads what a decision
//! needs, asks, and has the store apply the result in one transaction with its
//! postings (a term's upfront fee, through the ledger's rule: a prepaid client
//! without the funds reserves nothing), its notices and its prices.
//!
//! Ends are timers kept as rows: a term's end is the reservation's `until_ms`, found
//! by [`Market::tick`] on every controller, recorded once under the listing's lock.
//! Stopping what ran on a host is level-triggered: every tick terminates, through
//! the control path, each instance whose owner's reservation of its host ended and
//! who holds the host no more, so a controller that stopped between the two steps
//! finishes the work on its next tick.

use std::collections::BTreeMap;
use std::sync::Arc;

use surplus_api::market::{
    HostAccess, InterruptNotice, InterruptionView, ReclaimRequest, ReservationView, ReserveRequest,
};
use surplus_market::billing;
use surplus_market::offers::{Offer, OfferQuery, OfferStats};
use surplus_market::quote::{self, Quote, Term};
use surplus_market::resell::{FieldError, PricingMode};
pub use surplus_market::reservations::Reservation;
use surplus_market::reservations::{Ended, Request};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::app::App;
use crate::store::{
    ChangeSet, Listing, MarketRefusal, Notice, PostError, Principal, Role, StoreError, StoredQuote,
};

mod auctions;
mod pools;
mod spot;

/// What lets a caller use a host the market or a pool has (the control path's
/// question, [`Market::gate`]).
#[derive(Debug, Clone)]
pub enum Held {
    /// Its reservation of the host (through a pool, the pool's reservation as the
    /// member its allocation holds: its size bounds the member's instances).
    Reservation(Reservation),
    /// A pool's host slot its allocation holds: the pool charges for it, so its
    /// instances carry no rate card.
    PoolHost,
}

impl Held {
    /// The reservation, if it is one.
    pub fn reservation(&self) -> Option<&Reservation> {
        match self {
            Held::Reservation(r) => Some(r),
            Held::PoolHost => None,
        }
    }
}

/// Most hosts one reservation request may ask for.
pub const MAX_COUNT: u32 = 100;

/// The highest price a bid may name, minor units per host-hour (ten billion of a
/// currency's units an hour): every amount the market derives from a bid stays far
/// inside what the ledger and the store hold.
pub const MAX_PRICE: u64 = 1_000_000_000_000;

fn check_price(field: &str, price: u64) -> Result<(), MarketError> {
    if price > MAX_PRICE {
        return Err(invalid(
            field,
            format!("{price}: a price is at most {MAX_PRICE} minor units an hour"),
        ));
    }
    Ok(())
}

/// A client token (that makes a retried request safe) is 1 to 64 characters, none
/// of them control characters (400 otherwise).
fn check_client_token(token: Option<&str>) -> Result<(), MarketError> {
    match token {
        Some(t) if t.is_empty() || t.len() > 64 || t.chars().any(char::is_control) => Err(invalid(
            "client_token",
            "1 to 64 characters, none of them control characters",
        )),
        _ => Ok(()),
    }
}

/// Why a market request failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    /// A value is not acceptable (400), named by its field.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Several values are not acceptable (400).
    #[error("{}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
    Fields(Vec<FieldError>),
    /// No such thing, or not the caller's to see (404).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not (403).
    #[error("{0}")]
    Forbidden(String),
    /// A market rule refused it (409, or 403 for `not_holder`), naming the rule.
    #[error(transparent)]
    Refused(#[from] MarketRefusal),
    /// The ledger refused the money it moves (402 for missing funds).
    #[error(transparent)]
    Ledger(surplus_market::ledger::LedgerError),
    /// Storage failed (500).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PostError> for MarketError {
    fn from(e: PostError) -> Self {
        match e {
            PostError::Ledger(e) => MarketError::Ledger(e),
            PostError::Store(e) => MarketError::Store(e),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> MarketError {
    MarketError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The buying side: offers, quotes, reservations.
#[derive(Debug, Clone)]
pub struct Market {
    app: Arc<App>,
}

impl Market {
    pub(crate) fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    fn now(&self) -> UnixMillis {
        self.app.clock.now_ms()
    }

    fn quote_validity_ms(&self) -> i64 {
        self.app.config.market.quote_validity.as_millis() as i64
    }

    /// The providers that may sell now: on the accepted list, with an agreement in
    /// force.
    pub async fn selling_providers(
        &self,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let now = self.now();
        let agreements = self.app.store.agreements(None).await?;
        Ok(self
            .app
            .store
            .providers()
            .await?
            .into_iter()
            .filter(|p| {
                let theirs: Vec<_> = agreements
                    .iter()
                    .filter(|a| a.provider == p.account)
                    .cloned()
                    .collect();
                p.accepted && surplus_market::resell::agreement_in_force(&theirs, now).is_some()
            })
            .map(|p| p.account)
            .collect())
    }

    /// The hosts of `listing` a reservation may get now: its hosts whose agents are
    /// online (the book then leaves out those held).
    async fn hosts_on_offer(&self, listing: &Listing) -> Result<Vec<Uuid>, StoreError> {
        self.app.store.online_hosts_of(&listing.id).await
    }

    /// The provider's minimum price for `listing` (its request's), and its goal.
    async fn terms_of(
        &self,
        listing: &Listing,
    ) -> Result<(u64, surplus_market::resell::Goal), StoreError> {
        let row = self
            .app
            .store
            .resell_request(listing.request)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("listing {} has no request", listing.id)))?;
        Ok((row.document.pricing.minimum_price, row.document.goal))
    }

    /// The offers matching `pairs` (the query of `GET /v1/offers`), ranked as asked.
    /// `decorated` are the listings of providers that may sell now, with their
    /// rating, uptime and utilisation filled in (`http::resell::find_listings`).
    pub async fn offers(
        &self,
        pairs: &[(String, String)],
        decorated: Vec<Listing>,
    ) -> Result<Vec<Offer>, MarketError> {
        let query = OfferQuery::parse(pairs).map_err(MarketError::Fields)?;
        let now = self.now();
        let listings: Vec<Listing> = decorated.into_iter().filter(|l| l.listed).collect();
        let reservations = self.app.store.listing_reservations(now).await?;
        let mut stats = BTreeMap::new();
        let mut minimums = BTreeMap::new();
        for l in &listings {
            let on_offer = self.hosts_on_offer(l).await?;
            let held = reservations.get(&l.id);
            let free = on_offer
                .iter()
                .filter(|h| held.is_none_or(|r| !r.held.contains(h)))
                .count();
            stats.insert(
                l.id.clone(),
                OfferStats {
                    available: free as u32,
                    past_reservations: held.map_or(0, |r| r.past),
                },
            );
            minimums.insert(l.id.clone(), self.terms_of(l).await?.0);
        }
        let categories = self.categories().await?;
        let mut found = surplus_market::offers::offers(
            &listings,
            &stats,
            &minimums,
            &categories,
            &query,
            now,
            self.quote_validity_ms(),
        );
        // The operator's own capacity busy: idle third-party capacity first (C7).
        if let Some(primary) = &self.app.config.market.primary_provider {
            let (mut held, mut all) = (0usize, 0usize);
            for l in listings.iter().filter(|l| &l.provider == primary) {
                all += l.hosts.len();
                held += reservations.get(&l.id).map_or(0, |r| r.held.len());
            }
            let utilisation = if all == 0 {
                0.0
            } else {
                held as f64 / all as f64
            };
            let prefer = surplus_market::interrupt::prefer_third_party(
                utilisation,
                self.app.config.market.utilisation_threshold,
            );
            surplus_market::interrupt::order_for_load(&mut found, primary, prefer, |o| {
                (o.listing.provider.as_str(), o.available > 0)
            });
        }
        Ok(found)
    }

    async fn categories(&self) -> Result<surplus_market::catalog::Categories, StoreError> {
        crate::resell::categories(self.app.store.as_ref()).await
    }

    /// A listing a client may buy from now: listed, of a provider that may sell.
    async fn buyable(&self, id: &str) -> Result<Listing, MarketError> {
        let listing = self
            .app
            .store
            .listing(id)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("listing {id} not found")))?;
        if !listing.listed || !self.selling_providers().await?.contains(&listing.provider) {
            return Err(MarketRefusal {
                rule: "not_listed",
                message: format!("listing {id} is not offered now"),
            }
            .into());
        }
        Ok(listing)
    }

    /// Gives `caller` an immediate quote for `listing`, held for the configured
    /// validity.
    pub async fn quote(&self, caller: &Principal, listing: &str) -> Result<Quote, MarketError> {
        require_client(caller)?;
        let listing = self.buyable(listing).await?;
        if !listing.pricing_modes.contains(&PricingMode::Immediate) {
            return Err(invalid(
                "listing",
                format!("listing {} does not sell immediate quotes", listing.id),
            ));
        }
        let (minimum, _) = self.terms_of(&listing).await?;
        let q = quote::issue(
            Uuid::now_v7(),
            &listing.id,
            listing.price,
            minimum,
            self.now(),
            self.quote_validity_ms(),
        )?;
        self.app.store.create_quote(&q, &caller.account).await?;
        Ok(q)
    }

    /// Reserves hosts for `caller` as `body` asks; a retry with the same client token
    /// answers with what the first attempt made.
    pub async fn reserve(
        &self,
        caller: &Principal,
        body: ReserveRequest,
    ) -> Result<Vec<ReservationView>, MarketError> {
        require_client(caller)?;
        let count = body.count.unwrap_or(1);
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(invalid(
                "count",
                format!("{count}: a request reserves 1 to {MAX_COUNT} hosts"),
            ));
        }
        check_client_token(body.client_token.as_deref())?;
        let ids: Vec<Uuid> = (0..count)
            .map(|n| match &body.client_token {
                Some(t) => token_id(&caller.account, t, n),
                None => Uuid::now_v7(),
            })
            .collect();
        // A retry is answered from what the first attempt stored.
        if let Some(t) = body.term_hours {
            if !(1..=surplus_market::offers::MAX_PERIOD_HOURS).contains(&t) {
                return Err(invalid(
                    "term_hours",
                    format!(
                        "{t}: a term is 1 to {} hours",
                        surplus_market::offers::MAX_PERIOD_HOURS
                    ),
                ));
            }
        }
        if body.client_token.is_some() {
            if let Some(made) = self.made_before(caller, &ids).await? {
                return same_request(made, &body);
            }
        }
        let listing = self.buyable(&body.listing).await?;
        if !listing.pricing_modes.contains(&body.mode) {
            return Err(invalid(
                "mode",
                format!(
                    "listing {} does not sell {}; it sells {}",
                    listing.id,
                    surplus_market::records::name_of(&body.mode),
                    listing
                        .pricing_modes
                        .iter()
                        .map(surplus_market::records::name_of)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let (minimum, goal) = self.terms_of(&listing).await?;
        let now = self.now();
        let mut quote_used = None;
        let (price, term) = match body.mode {
            PricingMode::OnDemand => (quote::on_demand(listing.price, minimum)?, None),
            PricingMode::Immediate => {
                let id = body.quote.ok_or_else(|| {
                    invalid(
                        "quote",
                        "an immediate reservation accepts a quote (POST /v1/quotes)",
                    )
                })?;
                let q = self.own_quote(caller, id).await?;
                if q.quote.listing != listing.id {
                    return Err(invalid(
                        "quote",
                        format!(
                            "quote {id} prices listing {}, not {}",
                            q.quote.listing, listing.id
                        ),
                    ));
                }
                let price = quote::accept(&q.quote, now)?;
                quote_used = Some(q.quote);
                (price, None)
            }
            PricingMode::Reserved => {
                let prices = surplus_market::offers::terms(
                    &listing,
                    minimum,
                    body.term_hours,
                    now,
                    self.quote_validity_ms(),
                );
                let p = prices
                    .iter()
                    .find(|p| p.mode == PricingMode::Reserved)
                    .ok_or_else(|| {
                        invalid(
                            "mode",
                            format!(
                                "listing {} has no long-term term: its price {} is its minimum",
                                listing.id, listing.price
                            ),
                        )
                    })?;
                let term = Term {
                    upfront: p.upfront,
                    hourly: p.hourly,
                    term_ms: p.term_ms.unwrap_or_default(),
                };
                quote::check_term(&term, listing.price, minimum)?;
                (term.hourly, Some(term))
            }
            PricingMode::Spot | PricingMode::Auction => {
                return Err(invalid(
                    "mode",
                    "spot and auction capacity is bought by bidding (POST /v1/bids), not reserved at a price",
                ));
            }
        };
        if body.quote.is_some() && body.mode != PricingMode::Immediate {
            return Err(invalid(
                "quote",
                "only an immediate reservation accepts a quote",
            ));
        }
        if body.term_hours.is_some() && body.mode != PricingMode::Reserved {
            return Err(invalid(
                "term_hours",
                "only a long-term reservation has a term",
            ));
        }
        let mut request = Request {
            ids: ids.clone(),
            listing: listing.id.clone(),
            holder: caller.account.clone(),
            mode: body.mode,
            interruptibility: listing.interruptibility,
            goal,
            price,
            upfront: 0,
            term_ms: None,
        };
        if let Some(term) = &term {
            request = request.with_term(term);
        }
        self.check_funds(caller, &listing.currency, count, price, term.as_ref())
            .await?;
        let available = self.hosts_on_offer(&listing).await?;
        let bps = self.commission_bps(&listing.provider, now).await?;
        let changes = |made: &[Reservation]| made_changes(&listing, made, quote_used.as_ref(), bps);
        match self
            .app
            .store
            .reserve(
                &listing.id,
                &available,
                request,
                quote_used.as_ref().map(|q| q.id),
                &changes,
                now,
            )
            .await?
        {
            Ok(made) => {
                tracing::info!(listing = %listing.id, holder = %caller.account, count = made.len(), price, "reserved");
                let mut views = Vec::with_capacity(made.len());
                for r in made {
                    views.push(self.view(r).await?);
                }
                Ok(views)
            }
            Err(refusal) if refusal.rule == "duplicate" && body.client_token.is_some() => {
                // Raced a retry of itself: the other attempt stored them.
                match self.made_before(caller, &ids).await? {
                    Some(made) => same_request(made, &body),
                    None => Err(refusal.into()),
                }
            }
            Err(refusal) => Err(refusal.into()),
        }
    }

    /// A prepaid client must be able to pay what a reservation costs at once: each
    /// host's upfront fee and first hour, and the configured prepaid minimum (402
    /// otherwise, nothing reserved). The upfront fee itself is posted with the
    /// reservation, through the ledger's rule, in its transaction.
    async fn check_funds(
        &self,
        caller: &Principal,
        currency: &str,
        count: u32,
        hourly: u64,
        term: Option<&Term>,
    ) -> Result<(), MarketError> {
        let account = surplus_market::ledger::client(&caller.account);
        let Some(balance) = prepaid_balance(self.app.store.as_ref(), &account, currency).await?
        else {
            return Ok(());
        };
        let each = hourly.saturating_add(term.map_or(0, |t| t.upfront));
        let needed = i64::try_from(each.saturating_mul(u64::from(count)))
            .unwrap_or(i64::MAX)
            .saturating_add(self.app.config.prepaid_minimum.max(0));
        if balance < needed {
            return Err(MarketError::Ledger(
                surplus_market::ledger::LedgerError::Insufficient {
                    key: "reservation".into(),
                    account,
                    currency: currency.into(),
                    balance,
                    needed,
                },
            ));
        }
        Ok(())
    }

    async fn own_quote(&self, caller: &Principal, id: Uuid) -> Result<StoredQuote, MarketError> {
        match self.app.store.quote(id).await? {
            Some(q) if q.holder == caller.account => Ok(q),
            _ => Err(MarketError::NotFound(format!("quote {id} not found"))),
        }
    }

    async fn commission_bps(&self, provider: &str, at_ms: UnixMillis) -> Result<u32, StoreError> {
        let agreements = self.app.store.agreements(Some(provider)).await?;
        Ok(billing::commission_bps_at(
            &agreements,
            at_ms,
            self.app.config.commission_bps,
        ))
    }

    /// Whether `caller` is a prepaid client in `currency` (its bids hold funds).
    async fn prepaid(&self, caller: &Principal, currency: &str) -> Result<bool, StoreError> {
        let account = surplus_market::ledger::client(&caller.account);
        Ok(prepaid_balance(self.app.store.as_ref(), &account, currency)
            .await?
            .is_some())
    }

    /// The reservations `ids` if a first attempt made them all for `caller`.
    async fn made_before(
        &self,
        caller: &Principal,
        ids: &[Uuid],
    ) -> Result<Option<Vec<ReservationView>>, MarketError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.app.store.reservation(*id).await? {
                Some(r) if r.holder == caller.account => out.push(self.view(r).await?),
                _ => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// A reservation as its holder sees it, with access details while it holds.
    pub async fn view(&self, r: Reservation) -> Result<ReservationView, StoreError> {
        let listing = self.app.store.listing(&r.listing).await?;
        let currency = listing
            .as_ref()
            .map(|l| l.currency.clone())
            .unwrap_or_default();
        let access = match (&listing, r.holds_from(self.now())) {
            (Some(l), true) => Some(self.access(l, r.host).await?),
            _ => None,
        };
        let interruption = self.app.store.interruption(r.id).await?;
        Ok(ReservationView {
            reservation: r,
            currency,
            access,
            interruption,
        })
    }

    async fn access(&self, listing: &Listing, host: Uuid) -> Result<HostAccess, StoreError> {
        let agent = self.app.store.agent(host).await?;
        let address = self
            .app
            .store
            .sessions(host, 1)
            .await?
            .into_iter()
            .next()
            .map(|s| s.remote_addr);
        let category = self
            .categories()
            .await?
            .list()
            .iter()
            .find(|c| c.name == listing.category)
            .cloned();
        Ok(HostAccess {
            host,
            zone: listing.zone.clone(),
            hostname: agent.map(|a| a.hostname),
            address,
            control_endpoint: format!("POST /v1/control with agent_id {host}"),
            category: listing.category.clone(),
            cores: category.as_ref().map(|c| c.min_cores),
            memory_bytes: category.map(|c| c.min_memory_bytes),
        })
    }

    /// The caller's reservations, newest first.
    pub async fn reservations(
        &self,
        caller: &Principal,
    ) -> Result<Vec<ReservationView>, MarketError> {
        let mut out = Vec::new();
        for r in self.app.store.reservations_of(&caller.account).await? {
            if caller.role == Role::Client {
                out.push(self.view(r).await?);
            }
        }
        Ok(out)
    }

    /// One reservation: its holder's, or any for an admin.
    pub async fn reservation(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<ReservationView, MarketError> {
        match self.app.store.reservation(id).await? {
            Some(r)
                if caller.role == Role::Admin
                    || (caller.role == Role::Client && r.holder == caller.account) =>
            {
                Ok(self.view(r).await?)
            }
            _ => Err(MarketError::NotFound(format!("reservation {id} not found"))),
        }
    }

    /// Ends reservation `id` by its holder now; the holder's instances on the host
    /// are stopped and terminated (now, and by the next tick if the host could not be
    /// reached).
    pub async fn release(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<ReservationView, MarketError> {
        let r = match self.app.store.reservation(id).await? {
            Some(r) => r,
            None => return Err(MarketError::NotFound(format!("reservation {id} not found"))),
        };
        if caller.role != Role::Client {
            return Err(MarketError::Forbidden(
                "only the client that holds a reservation may release it".into(),
            ));
        }
        // A spot host is its bid's: released alone, the next clearing would give the
        // bid a host again.
        if r.mode == PricingMode::Spot && r.holder == caller.account {
            return Err(MarketRefusal {
                rule: "spot_bid",
                message: format!(
                    "reservation {id} is a host won by a spot bid: cancel the bid (POST /v1/bids/{{id}}/cancel; GET /v1/bids lists it) to give its hosts back"
                ),
            }
            .into());
        }
        let now = self.now();
        let listing = self.app.store.listing(&r.listing).await?;
        let changes = |ended: &[Reservation]| ended_changes(listing.as_ref(), ended, "released");
        let ended = self
            .app
            .store
            .release_reservation(&r.listing, id, &caller.account, &changes, now)
            .await??;
        tracing::info!(reservation = %id, holder = %caller.account, host = %ended.host, "released");
        self.wake_pools(std::iter::once((ended.host, ended.reservation)), now)
            .await;
        let r = self
            .app
            .store
            .reservation(id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("reservation {id} vanished")))?;
        Ok(self.view(r).await?)
    }

    /// Records the interruptions and terms that ended, closes the auctions and clears
    /// the spot markets due (the first half of a tick; [`drive`] then has the control path stop what ran
    /// on hosts whose holders hold them no more).
    pub async fn tick(&self) -> Result<Vec<Ended>, MarketError> {
        let now = self.now();
        let lead = self.app.config.market.expiry_lead.as_millis() as i64;
        let due = self.app.store.due_interruptions(now).await?;
        let ending = self
            .app
            .store
            .ending_within(now.saturating_add(lead))
            .await?;
        let clearings = self.app.store.due_spot_markets(now).await?;
        let closing = self.app.store.due_auctions(now).await?;
        let cycling = self.app.store.due_pools(now).await?;
        // Most ticks: nothing due, and nothing more is read.
        if due.is_empty()
            && ending.is_empty()
            && clearings.is_empty()
            && closing.is_empty()
            && cycling.is_empty()
        {
            return Ok(Vec::new());
        }
        let listings: BTreeMap<String, Listing> = self
            .app
            .store
            .listings()
            .await?
            .into_iter()
            .map(|l| (l.id.clone(), l))
            .collect();
        let mut ended = Vec::new();
        // Interruptions whose grace is over first, each at its deadline: one that fell
        // before its term's end is an interruption, however late this tick runs.
        for (listing, id, _) in due {
            let changes =
                |ended: &[Reservation]| ended_changes(listings.get(&listing), ended, "interrupted");
            match self
                .app
                .store
                .apply_interruption(&listing, id, &changes, now)
                .await
            {
                Ok(Some(e)) => {
                    tracing::info!(reservation = %e.reservation, host = %e.host, why = %e.why, "reservation interrupted");
                    ended.push(e);
                }
                Ok(None) => {}
                // One that cannot be applied now does not hold up the others.
                Err(e) => tracing::warn!(reservation = %id, error = %e, "applying an interruption"),
            }
        }
        // Then the terms about to end are announced, before those that ended are
        // recorded, so a term that ended between two ticks is still announced.
        if let Err(e) = self.announce_expiries(&ending, now).await {
            tracing::warn!(error = %e, "announcing the end of terms");
        }
        let changes = |ended: &[Reservation]| {
            let listing = ended.first().and_then(|r| listings.get(&r.listing));
            ended_changes(listing, ended, "expired")
        };
        let expired = self.app.store.expire_reservations(now, &changes).await?;
        for e in &expired {
            tracing::info!(reservation = %e.reservation, host = %e.host, "reservation term ended");
        }
        ended.extend(expired);
        // A pool whose slot's reservation ended re-decides at once.
        self.wake_pools(ended.iter().map(|e| (e.host, e.reservation)), now)
            .await;
        // Auctions close and spot markets clear last, so that the hosts freed above go
        // to the bids that won them.
        self.close_due(closing, &listings, now).await;
        self.clear_due(clearings, &listings, now).await;
        // Pools cycle after, on the capacity their owners hold now.
        self.cycle_due_pools(cycling, now).await;
        Ok(ended)
    }

    /// A reclaim sent by a host's agent (`surplus-agent reclaim`): the host's provider
    /// (its `provider` label) takes back `count` of this host's reservations (every
    /// one that allows it without a count), or the one whose holder runs `instance`
    /// here, as [`Market::reclaim`] does for the API. The answer says why nothing was
    /// taken, in words for the operator at the host.
    pub async fn reclaim_from_host(
        &self,
        host: Uuid,
        request: surplus_protocol::messages::ReclaimRequest,
    ) -> Result<Vec<surplus_protocol::messages::Reclaimed>, String> {
        let agent = match self.app.store.agent(host).await {
            Ok(Some(a)) => a,
            Ok(None) => return Err(format!("agent {host} is not enrolled")),
            Err(e) => {
                tracing::error!(%host, error = %e, "reclaim from a host");
                return Err("storage failure".into());
            }
        };
        let provider = surplus_market::billing::provider_of(&agent.labels);
        let count = match &request.instance {
            Some(id) => match self.app.store.instance(id).await {
                Ok(Some(i))
                    if i.agent_id == host
                        && i.record.state
                            != surplus_protocol::control::InstanceState::Terminated =>
                {
                    match self.app.store.holding(host, self.now()).await {
                        Ok(Some(r)) if r.holder == i.account && i.owner_role == Role::Client => {
                            None
                        }
                        Ok(_) => {
                            return Err(format!(
                                "instance {id} is not run by the client that holds this host now"
                            ));
                        }
                        Err(e) => {
                            tracing::error!(%host, error = %e, "reclaim from a host");
                            return Err("storage failure".into());
                        }
                    }
                }
                Ok(_) => return Err(format!("instance {id} does not run on this host")),
                Err(e) => {
                    tracing::error!(%host, error = %e, "reclaim from a host");
                    return Err("storage failure".into());
                }
            },
            None => request.count,
        };
        let caller = Principal {
            account: provider,
            role: Role::Provider,
        };
        let body = ReclaimRequest {
            host: Some(host),
            listing: None,
            count,
        };
        match self.reclaim(&caller, body).await {
            Ok(taken) => Ok(taken
                .into_iter()
                .map(|t| surplus_protocol::messages::Reclaimed {
                    reservation: t.reservation,
                    deadline_ms: t.notice.deadline_ms,
                })
                .collect()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Tells the holder of each of `ending` (terms that end within
    /// `market.expiry_lead`, as `interrupt::expiry_notice_at` places the notice) that
    /// it does: once (the notice's key is the reservation's, and the outbox keeps a
    /// key once, however many ticks and controllers ask).
    async fn announce_expiries(
        &self,
        ending: &[Reservation],
        now: UnixMillis,
    ) -> Result<(), MarketError> {
        let mut set = ChangeSet::default();
        for r in ending {
            let Some(ends) = r.ends_at_ms else { continue };
            set.notices.push(Notice {
                key: format!("reservation.expiring:{}", r.id),
                recipient: format!("client:{}", r.holder),
                kind: "reservation.expiring".into(),
                body: serde_json::json!({
                    "reservation": r.id,
                    "listing": r.listing,
                    "host": r.host,
                    "ends_at_ms": ends,
                }),
            });
        }
        if !set.notices.is_empty() {
            self.app.store.apply_changes(&set, now).await?;
        }
        Ok(())
    }

    /// A provider takes capacity back (fulfilment-based interruption, A8): of its
    /// reservations held now (on `host`, of `listing`, as asked) that allow it, the
    /// ones `interrupt::choose_reclaim` takes under its goal are given notice with
    /// the grace (`market.grace`): the holder is told (outbox, webhook) and so is the
    /// host's agent, which stops the holder's instances there at the deadline even if
    /// the controller cannot reach it then; at the deadline the tick ends the
    /// reservation. Do-not-interrupt reservations are never taken. Admins reclaim for
    /// the provider of the listing they name.
    pub async fn reclaim(
        &self,
        caller: &Principal,
        body: ReclaimRequest,
    ) -> Result<Vec<InterruptionView>, MarketError> {
        let listings: Vec<Listing> = match (caller.role, &body.listing) {
            (Role::Provider, _) | (Role::Admin, Some(_)) => self
                .app
                .store
                .listings()
                .await?
                .into_iter()
                .filter(|l| caller.role == Role::Admin || l.provider == caller.account)
                .filter(|l| body.listing.as_ref().is_none_or(|id| &l.id == id))
                .collect(),
            (Role::Admin, None) => {
                return Err(invalid(
                    "listing",
                    "an admin reclaims for the listing it names",
                ));
            }
            _ => {
                return Err(MarketError::Forbidden(
                    "taking capacity back needs the provider role".into(),
                ));
            }
        };
        if let Some(id) = &body.listing {
            if listings.is_empty() {
                return Err(MarketError::NotFound(format!("listing {id} not found")));
            }
        }
        if body.count == Some(0) || body.count.is_some_and(|c| c > MAX_COUNT) {
            return Err(invalid("count", format!("1 to {MAX_COUNT} hosts")));
        }
        let now = self.now();
        let mut out = Vec::new();
        for listing in &listings {
            let (_, goal) = self.terms_of(listing).await?;
            let book = self.app.store.reservation_book(&listing.id).await?;
            let mut candidates = Vec::new();
            for r in book.reservations().filter(|r| r.holds_at(now)) {
                if body.host.is_some_and(|h| h != r.host)
                    || self.app.store.interruption(r.id).await?.is_some()
                {
                    continue;
                }
                candidates.push(surplus_market::interrupt::Candidate {
                    reservation: r.id,
                    host: r.host,
                    interruptibility: r.interruptibility,
                    price: r.price,
                    started_at_ms: r.starts_at_ms,
                    goal: Some(r.goal),
                });
            }
            // A count is over every listing; on a host without one, every reservation
            // there that allows it; else one.
            let wanted = match (body.count, body.host) {
                (Some(c), _) => (c as usize).saturating_sub(out.len()),
                (None, Some(_)) => candidates.len(),
                (None, None) => 1usize.saturating_sub(out.len()),
            };
            if wanted == 0 {
                if body.count.is_some() || body.host.is_none() {
                    break;
                }
                continue;
            }
            let taken = surplus_market::interrupt::choose_reclaim(&candidates, wanted, goal);
            if taken.is_empty() {
                continue;
            }
            let grace = self.app.config.market.grace.as_millis() as i64;
            // Never shorter than the listing promises, nor than the default.
            let notice = surplus_market::interrupt::notice(
                now,
                surplus_market::interrupt::Cause::ProviderReclaim,
                listing.grace_ms,
                grace,
            );
            let picks: Vec<(Uuid, InterruptNotice)> =
                taken.iter().map(|id| (*id, notice)).collect();
            // The holder's instances on each host, for its agent to stop at the deadline.
            let mut instances: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
            for r in book.reservations().filter(|r| taken.contains(&r.id)) {
                instances.insert(r.host, self.holder_instances(r).await?);
            }
            let changes =
                |noticed: &[Reservation]| interruption_changes(noticed, &notice, &instances);
            let (noticed, skipped) = self
                .app
                .store
                .notice_interruptions(&listing.id, &picks, &changes, now)
                .await?;
            for refusal in skipped {
                tracing::info!(listing = %listing.id, %refusal, "not taken back");
            }
            for r in noticed {
                tracing::info!(reservation = %r.id, host = %r.host, deadline_ms = notice.deadline_ms, "reservation given notice: the provider takes its capacity back");
                out.push(InterruptionView {
                    reservation: r.id,
                    listing: r.listing.clone(),
                    host: r.host,
                    notice,
                });
            }
        }
        Ok(out)
    }

    /// The holder's instances on a reservation's host, and those of the members of
    /// a pool that holds it as a slot, not terminated.
    async fn holder_instances(&self, r: &Reservation) -> Result<Vec<String>, StoreError> {
        // On a pooled reservation, its members' instances stop with it too.
        let now = self.now();
        let members: std::collections::BTreeSet<String> =
            match self.app.store.pool_slot_on(r.host, now).await? {
                Some(slot) if slot.slot == r.id => self
                    .app
                    .store
                    .pool_allocations(slot.pool, false)
                    .await?
                    .into_iter()
                    .filter(|(a, _)| a.slot == r.id)
                    .map(|(a, _)| a.user)
                    .collect(),
                _ => Default::default(),
            };
        Ok(self
            .app
            .store
            .agent_instances(r.host)
            .await?
            .into_iter()
            .filter(|i| {
                (i.account == r.holder || members.contains(&i.account))
                    && i.owner_role == Role::Client
                    && i.record.state != surplus_protocol::control::InstanceState::Terminated
            })
            .map(|i| i.record.id)
            .collect())
    }

    /// Who may use `host` for `caller` now (run, start, reboot, modify, snapshot:
    /// what keeps or adds work there): on a pooled host, only the member whose
    /// allocation holds it ([`Held::Reservation`] of the pool's reservation as that
    /// member holds it, or [`Held::PoolHost`]); otherwise `Ok(Some(Held::Reservation(r)))`
    /// for the holder of its reservation `r`; `Err` (403) for anyone else while it is reserved, and for everyone on a
    /// host a listing sells that nobody holds (reserve it first); `Ok(None)` on a host
    /// the market does not sell (the owner rules of the control path apply). What
    /// only ends work (stop, terminate, delete a volume) is its owner's to do
    /// anywhere and is not asked here; nor is reading (describe, status, logs), which
    /// the owner rules decide. A host stays sold while its listing is delisted: nobody
    /// uses it until the listing is relisted and the host reserved.
    pub async fn gate(&self, caller: &Principal, host: Uuid) -> Result<Option<Held>, MarketError> {
        let now = self.now();
        // A pooled host is its pool's: only the member holding its allocation uses it.
        if let Some(held) = self.pool_gate(caller, host, now).await? {
            return Ok(Some(held));
        }
        match self.app.store.holding(host, now).await? {
            Some(r) if caller.role == Role::Client && r.holder == caller.account => {
                // Under notice, the host takes no new work: what runs stops at the
                // deadline, and what would start now would not be in the agent's notice.
                if let Some(n) = self.app.store.interruption(r.id).await? {
                    return Err(MarketError::Forbidden(format!(
                        "host {host} is being taken back ({}): its reservation {} ends at {}",
                        surplus_market::records::name_of(&n.cause),
                        r.id,
                        n.deadline_ms
                    )));
                }
                Ok(Some(Held::Reservation(r)))
            }
            Some(r) => Err(MarketError::Forbidden(format!(
                "host {host} is reserved ({}); only the client that holds it may use it",
                r.id
            ))),
            None => match self.app.store.selling_listing(host).await? {
                Some(listing) => Err(MarketError::Forbidden(format!(
                    "host {host} is sold through listing {listing}: reserve it first (POST /v1/reservations)"
                ))),
                None => Ok(None),
            },
        }
    }

    /// The hosts `caller` holds now.
    pub async fn held_hosts(&self, caller: &Principal) -> Result<Vec<Uuid>, StoreError> {
        if caller.role != Role::Client {
            return Ok(Vec::new());
        }
        let now = self.now();
        Ok(self
            .app
            .store
            .reservations_of(&caller.account)
            .await?
            .into_iter()
            .filter(|r| r.holds_at(now))
            .map(|r| r.host)
            .collect())
    }

    /// The size an instance of the holder must fit on a host of `listing`: its
    /// category's CPUs (as millicpus) and memory.
    pub async fn size_of(&self, listing: &str) -> Result<Option<(u32, u64)>, StoreError> {
        let Some(l) = self.app.store.listing(listing).await? else {
            return Ok(None);
        };
        Ok(self
            .categories()
            .await?
            .list()
            .iter()
            .find(|c| c.name == l.category)
            .map(|c| (c.min_cores.saturating_mul(1000), c.min_memory_bytes)))
    }
}

/// The balance in `currency` of `account` when it is prepaid (may not go below
/// zero); `None` when it may.
pub(crate) async fn prepaid_balance(
    store: &dyn crate::store::Store,
    account: &str,
    currency: &str,
) -> Result<Option<i64>, StoreError> {
    let prepaid = store
        .account_policy(account)
        .await?
        .is_some_and(|allow_negative| !allow_negative);
    if !prepaid {
        return Ok(None);
    }
    Ok(Some(
        store
            .balances(Some(account))
            .await?
            .into_iter()
            .find(|(_, c, _)| c == currency)
            .map_or(0, |(_, _, b)| b),
    ))
}

fn require_client(caller: &Principal) -> Result<(), MarketError> {
    if caller.role == Role::Client {
        Ok(())
    } else {
        Err(MarketError::Forbidden(
            "buying capacity needs the client role".into(),
        ))
    }
}

/// The id of the `n`th reservation of a request with client token `token`: the same
/// for a retry, different for another client.
fn token_id(holder: &str, token: &str, n: u32) -> Uuid {
    let digest = surplus_certs::sha256(format!("reservation\0{holder}\0{token}\0{n}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// What making `made` changes beside the book: the upfront fee of each term (the
/// client pays, the provider gets it net of the commission), the provider's notice
/// with the price, the accepted quote's price in the history.
fn made_changes(
    listing: &Listing,
    made: &[Reservation],
    quote: Option<&Quote>,
    commission_bps: u32,
) -> ChangeSet {
    let mut set = ChangeSet::default();
    for r in made.iter().filter(|r| r.upfront > 0) {
        let mut posting = billing::bill_posting(
            &format!("reservation:{}:upfront", r.id),
            &r.holder,
            &listing.provider,
            &listing.currency,
            i64::try_from(r.upfront).unwrap_or(i64::MAX),
            commission_bps,
        );
        posting.kind = "upfront".into();
        posting.memo = format!(
            "upfront fee of reservation {} on listing {}",
            r.id, listing.id
        );
        set.postings.push((posting, Vec::new()));
    }
    if let Some(first) = made.first() {
        set.notices.push(Notice {
            key: format!("reservation.made:{}", first.id),
            recipient: crate::resell::provider_recipient(&listing.provider),
            kind: "reservation.made".into(),
            body: serde_json::json!({
                "listing": listing.id,
                "reservations": made.iter().map(|r| r.id).collect::<Vec<_>>(),
                "hosts": made.iter().map(|r| r.host).collect::<Vec<_>>(),
                "mode": first.mode,
                "price": first.price,
                "upfront": first.upfront,
                "currency": listing.currency,
                "starts_at_ms": first.starts_at_ms,
                "ends_at_ms": first.ends_at_ms,
            }),
        });
    }
    if let Some(q) = quote {
        set.prices.push(price_point(
            listing,
            surplus_market::history::PriceKind::Quote,
            format!("quote:{}", q.id),
            q.price,
            made.first().map_or(q.issued_at_ms, |r| r.starts_at_ms),
        ));
    }
    set
}

/// A price `listing` sold at, for the pricing history.
fn price_point(
    listing: &Listing,
    kind: surplus_market::history::PriceKind,
    id: String,
    price: u64,
    at_ms: UnixMillis,
) -> surplus_market::history::PricePoint {
    surplus_market::history::PricePoint {
        id,
        kind,
        listing: listing.id.clone(),
        provider: listing.provider.clone(),
        zone: listing.zone.clone(),
        category: listing.category.clone(),
        currency: listing.currency.clone(),
        price,
        at_ms,
    }
}

/// The notices of an interruption: to the holder (outbox, API, console, webhook) and
/// to the host's agent, with the instances it stops at the deadline.
fn interruption_changes(
    noticed: &[Reservation],
    notice: &InterruptNotice,
    instances: &BTreeMap<Uuid, Vec<String>>,
) -> ChangeSet {
    let mut set = ChangeSet::default();
    for r in noticed {
        set.notices.push(Notice {
            key: format!("reservation.interrupting:{}", r.id),
            recipient: format!("client:{}", r.holder),
            kind: "reservation.interrupting".into(),
            body: notice_body(r, notice),
        });
        let ids = instances.get(&r.host).cloned().unwrap_or_default();
        set.notices.push(agent_notice(r, notice, ids));
    }
    set
}

/// What a notice of interruption says of a reservation.
fn notice_body(r: &Reservation, n: &InterruptNotice) -> serde_json::Value {
    serde_json::json!({
        "reservation": r.id,
        "listing": r.listing,
        "host": r.host,
        "cause": n.cause,
        "grace_ms": n.grace_ms,
        "deadline_ms": n.deadline_ms,
    })
}

/// The notice to a host's agent: which instances to stop at the deadline.
fn agent_notice(r: &Reservation, n: &InterruptNotice, instances: Vec<String>) -> Notice {
    let mut body = notice_body(r, n);
    body["instances"] = serde_json::json!(instances);
    Notice {
        key: format!("reservation.interrupting:{}:agent", r.id),
        recipient: crate::resell::agent_recipient(r.host),
        kind: "reservation.interrupting".into(),
        body,
    }
}

/// The notices of reservations that ended (`how`: released, expired): to the holder
/// and to the provider.
fn ended_changes(listing: Option<&Listing>, ended: &[Reservation], how: &str) -> ChangeSet {
    let mut set = ChangeSet::default();
    for r in ended {
        let body = serde_json::json!({
            "reservation": r.id,
            "listing": r.listing,
            "host": r.host,
            "how": how,
            "ended_at_ms": r.end_ms(),
        });
        set.notices.push(Notice {
            key: format!("reservation.ended:{}", r.id),
            recipient: format!("client:{}", r.holder),
            kind: "reservation.ended".into(),
            body: body.clone(),
        });
        if let Some(l) = listing {
            set.notices.push(Notice {
                key: format!("reservation.ended:{}:provider", r.id),
                recipient: crate::resell::provider_recipient(&l.provider),
                kind: "reservation.ended".into(),
                body,
            });
        }
    }
    set
}

/// Drives the market's timers until `cancel`: every `market.tick`, records the terms
/// that ended, then has the control path stop what runs on hosts whose holders hold
/// them no more (level-triggered: what a host did not answer is tried again next
/// tick).
pub async fn drive(ctl: Arc<crate::app::Controller>, cancel: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(ctl.app.config.market.tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = ctl.market.tick().await {
            tracing::warn!(error = %e, "market tick");
        }
        ctl.control.stop_unreserved(None).await;
    }
}

/// What a retry with a client token is answered: the reservations the first attempt
/// made, if it asked for the same thing (409 otherwise: the token was used for
/// another request).
fn same_request(
    made: Vec<ReservationView>,
    body: &ReserveRequest,
) -> Result<Vec<ReservationView>, MarketError> {
    let same = made.len() == body.count.unwrap_or(1) as usize
        && made
            .iter()
            .all(|v| v.reservation.listing == body.listing && v.reservation.mode == body.mode);
    if same {
        Ok(made)
    } else {
        Err(MarketRefusal {
            rule: "client_token_reused",
            message: format!(
                "client token {:?} was used for a different request",
                body.client_token.as_deref().unwrap_or_default()
            ),
        }
        .into())
    }
}
