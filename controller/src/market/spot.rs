//! The spot market's shell (issue 16): bids, clearings, and the hosts they give and
//! take.
//!
//! Each listing that sells `spot` is one class of `surplus_market::spot`: one
//! provider's size category in one zone, at one minimum price. Its capacity is its
//! hosts that are online and not held by another kind of reservation. The rules are
//! the engine's ([`surplus_market::spot::clear`], [`surplus_market::spot::assign`]);
//! this module reads the supply, has the store clear the market in one transaction
//! under the listing's lock while its timer row is due (so a clearing happens once
//! however many controllers poll), telling each noticed holder, and its host's agent
//! which instances to stop at the deadline, in the clearing's transaction.
//!
//! A host a bid wins is a reservation (mode `spot`, price-based), used and billed like
//! any other: its holder's instances run there, and a billing run charges it the
//! clearing price in force over each stretch of the period. A clearing that takes a
//! host away gives its holder notice with the listing's grace; at the deadline the
//! market's tick ends the reservation and the next clearing gives the host to the bid
//! that won it. A listing that stops selling spot keeps its bids and hosts as they
//! are until it sells spot again (its clearings change no host meanwhile).

use std::collections::BTreeMap;

use surplus_api::market::{BidRequest, BidView, SpotView};
use surplus_market::interrupt::Cause;
use surplus_market::resell::PricingMode;
use surplus_market::spot::{Bid, Supply};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::{
    ChangeSet, Listing, Market, MarketError, Notice, Principal, Reservation, Role, agent_notice,
    invalid, made_changes, notice_body, price_point, require_client,
};
use crate::store::{HoldChange, SpotCleared, SpotInputs, StoreError, StoredBid};

/// Most hosts one bid may ask for.
pub const MAX_QUANTITY: u32 = super::MAX_COUNT;

impl Market {
    /// Places a bid for the caller (a client) on a listing that sells spot: refused
    /// when it is made if its maximum is below the provider minimum, its quantity is
    /// zero or too large, or it is all-or-nothing for more hosts than the listing
    /// has. A prepaid client's bid holds its maximum for every host for an hour (402
    /// without the funds) until it wins hosts or is cancelled. With a client token, a retry answers with the bid placed the first time.
    /// `true` when it was placed now.
    pub async fn bid(
        &self,
        caller: &Principal,
        body: BidRequest,
    ) -> Result<(BidView, bool), MarketError> {
        require_client(caller)?;
        let quantity = body.quantity.unwrap_or(1);
        if !(1..=MAX_QUANTITY).contains(&quantity) {
            return Err(invalid(
                "quantity",
                format!("{quantity}: a bid is for 1 to {MAX_QUANTITY} hosts"),
            ));
        }
        super::check_price("max_price", body.max_price)?;
        super::check_client_token(body.client_token.as_deref())?;
        let id = match &body.client_token {
            Some(t) => super::token_id(&caller.account, &format!("bid\0{t}"), 0),
            None => Uuid::now_v7(),
        };
        if let Some(b) = self.app.store.spot_bid(id).await? {
            return self.retried(b, &body).await.map(|v| (v, false));
        }
        let listing = self.buyable(&body.listing).await?;
        if !listing.pricing_modes.contains(&PricingMode::Spot) {
            return Err(invalid(
                "listing",
                format!("listing {} does not sell spot capacity", listing.id),
            ));
        }
        let now = self.now();
        let supply = self.supply(&listing, now).await?;
        let bid = Bid {
            id,
            class: listing.id.clone(),
            client: caller.account.clone(),
            max_price: body.max_price,
            quantity,
            all_or_nothing: body.all_or_nothing,
            placed_at_ms: now,
        };
        surplus_market::spot::check_bid(&bid, supply.as_ref().map(|(s, _)| s))?;
        // A prepaid client's bid holds its maximum for every host for an hour, in the
        // bid's transaction (refused, with nothing stored, without the funds); the
        // hold is given back when the bid first wins hosts (they are billed as they
        // are used) or is cancelled.
        let mut changes = ChangeSet::default();
        if self.prepaid(caller, &listing.currency).await? {
            let amount = body.max_price.saturating_mul(u64::from(quantity));
            changes.holds.push(HoldChange::Place {
                key: spot_hold(id),
                client: caller.account.clone(),
                currency: listing.currency.clone(),
                amount: i64::try_from(amount).unwrap_or(i64::MAX),
            });
        }
        let (stored, placed) = self
            .app
            .store
            .place_bid(&bid, self.spot_period_ms(), &changes, now)
            .await?;
        if !placed {
            return self.retried(stored, &body).await.map(|v| (v, false));
        }
        tracing::info!(bid = %id, listing = %listing.id, client = %caller.account, max_price = body.max_price, quantity, "spot bid placed");
        Ok((self.bid_view(stored).await?, true))
    }

    async fn retried(&self, b: StoredBid, body: &BidRequest) -> Result<BidView, MarketError> {
        let same = b.bid.class == body.listing
            && b.bid.max_price == body.max_price
            && b.bid.quantity == body.quantity.unwrap_or(1)
            && b.bid.all_or_nothing == body.all_or_nothing;
        if !same {
            return Err(crate::store::MarketRefusal {
                rule: "client_token_reused",
                message: format!(
                    "client token {:?} was used for a different bid",
                    body.client_token.as_deref().unwrap_or_default()
                ),
            }
            .into());
        }
        Ok(self.bid_view(b).await?)
    }

    fn spot_period_ms(&self) -> i64 {
        self.app.config.market.spot_period.as_millis() as i64
    }

    /// The listing's spot supply now: its hosts online and not held by a
    /// reservation of another kind, at the provider minimum; `None` when it is not
    /// offered or sells no spot.
    async fn supply(
        &self,
        listing: &Listing,
        now: UnixMillis,
    ) -> Result<Option<(Supply, Vec<Uuid>)>, MarketError> {
        if !listing.listed
            || !listing.pricing_modes.contains(&PricingMode::Spot)
            || !self.selling_providers().await?.contains(&listing.provider)
        {
            return Ok(None);
        }
        let (minimum, _) = self.terms_of(listing).await?;
        let available = self.hosts_on_offer(listing).await?;
        let book = self.app.store.reservation_book(&listing.id).await?;
        let taken: std::collections::BTreeSet<Uuid> = book
            .reservations()
            .filter(|r| r.mode != PricingMode::Spot && r.holds_from(now))
            .map(|r| r.host)
            .collect();
        let capacity = available.iter().filter(|h| !taken.contains(h)).count();
        Ok(Some((
            Supply {
                class: listing.id.clone(),
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
                minimum,
            },
            available,
        )))
    }

    /// A bid as its bidder sees it.
    pub async fn bid_view(&self, b: StoredBid) -> Result<BidView, StoreError> {
        let now = self.now();
        let reservations = self
            .app
            .store
            .bid_reservations(b.bid.id)
            .await?
            .into_iter()
            .filter(|r| r.holds_from(now))
            .map(|r| r.id)
            .collect();
        Ok(BidView {
            state: if b.cancelled_at_ms.is_some() {
                "cancelled"
            } else {
                "live"
            }
            .into(),
            cancelled_at_ms: b.cancelled_at_ms,
            allocated: b.allocated,
            reservations,
            bid: b.bid,
        })
    }

    /// The caller's bids, newest first (only clients bid).
    pub async fn bids(&self, caller: &Principal) -> Result<Vec<BidView>, MarketError> {
        if caller.role != Role::Client {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for b in self.app.store.spot_bids_of(&caller.account).await? {
            out.push(self.bid_view(b).await?);
        }
        Ok(out)
    }

    /// One of the caller's bids (404 for anyone else's).
    pub async fn bid_of(&self, caller: &Principal, id: Uuid) -> Result<BidView, MarketError> {
        match self.app.store.spot_bid(id).await? {
            Some(b) if caller.role == Role::Client && b.bid.client == caller.account => {
                Ok(self.bid_view(b).await?)
            }
            _ => Err(MarketError::NotFound(format!("bid {id} not found"))),
        }
    }

    /// Cancels one of the caller's bids: it takes part in no clearing from now on,
    /// and the hosts it holds are released (the holder's act, not an interruption;
    /// billing stops now and the tick stops what ran there).
    pub async fn cancel_bid(&self, caller: &Principal, id: Uuid) -> Result<BidView, MarketError> {
        require_client(caller)?;
        let now = self.now();
        let listing = match self.app.store.spot_bid(id).await? {
            Some(b) if b.bid.client == caller.account => {
                self.app.store.listing(&b.bid.class).await?
            }
            _ => return Err(MarketError::NotFound(format!("bid {id} not found"))),
        };
        let changes = |ended: &[Reservation]| {
            let mut set = super::ended_changes(listing.as_ref(), ended, "released");
            set.holds.push(HoldChange::Release { key: spot_hold(id) });
            set
        };
        let (stored, ended) = self
            .app
            .store
            .cancel_bid(id, &caller.account, &changes, now)
            .await??;
        tracing::info!(bid = %id, released = ended.len(), "spot bid cancelled");
        Ok(self.bid_view(stored).await?)
    }

    /// A listing's spot market as anyone may see it: minimum, capacity, last price,
    /// next clearing, and the guidance (the range of spot prices that won recently in
    /// its provider's category and zone).
    pub async fn spot(&self, listing: &str) -> Result<SpotView, MarketError> {
        let l = self
            .app
            .store
            .listing(listing)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("listing {listing} not found")))?;
        if !l.pricing_modes.contains(&PricingMode::Spot) {
            return Err(MarketError::NotFound(format!(
                "listing {listing} sells no spot capacity"
            )));
        }
        let now = self.now();
        let (minimum, _) = self.terms_of(&l).await?;
        let capacity = self.supply(&l, now).await?.map_or(0, |(s, _)| s.capacity);
        let row = self.app.store.spot_market(listing).await?;
        let window = self.app.config.market.guidance_window.as_millis() as i64;
        let query = surplus_market::history::HistoryQuery {
            kind: Some(surplus_market::history::PriceKind::Spot),
            category: Some(l.category.clone()),
            provider: Some(l.provider.clone()),
            zone: Some(l.zone.clone()),
            currency: Some(l.currency.clone()),
            from_ms: Some(now.saturating_sub(window)),
            ..Default::default()
        };
        let points = self
            .app
            .store
            .price_history(&query, crate::http::market::HISTORY_LIMIT)
            .await?;
        let guidance =
            surplus_market::history::guidance(&points, &l.currency, now.saturating_add(1), window);
        Ok(SpotView {
            listing: l.id.clone(),
            currency: l.currency.clone(),
            minimum,
            capacity,
            price: row.as_ref().and_then(|r| r.price),
            cleared_at_ms: row.as_ref().and_then(|r| r.cleared_at_ms),
            next_clearing_at_ms: row.as_ref().map(|r| match r.requested_at_ms {
                Some(t) => t.min(r.next_clearing_at_ms),
                None => r.next_clearing_at_ms,
            }),
            period_ms: row.as_ref().map(|r| r.period_ms),
            guidance,
        })
    }

    /// Clears a listing's spot market now (on demand): its provider or an admin.
    pub async fn clear_now(
        &self,
        caller: &Principal,
        listing: &str,
    ) -> Result<SpotView, MarketError> {
        let l = self
            .app
            .store
            .listing(listing)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("listing {listing} not found")))?;
        match caller.role {
            Role::Admin => {}
            Role::Provider if l.provider == caller.account => {}
            _ => {
                return Err(MarketError::Forbidden(
                    "a spot market is cleared on demand by its provider or an admin".into(),
                ));
            }
        }
        let now = self.now();
        if !self.app.store.request_clearing(listing, now).await? {
            return Err(MarketError::NotFound(format!(
                "listing {listing} has no spot market yet: nobody has bid on it"
            )));
        }
        self.clear(&l, now).await?;
        self.spot(listing).await
    }

    /// Clears every spot market due at `now` (the tick's part); one that fails does
    /// not hold up the others.
    pub(super) async fn clear_due(
        &self,
        due: Vec<String>,
        listings: &BTreeMap<String, Listing>,
        now: UnixMillis,
    ) {
        for id in due {
            let Some(listing) = listings.get(&id) else {
                continue;
            };
            if let Err(e) = self.clear(listing, now).await {
                tracing::warn!(listing = %id, error = %e, "clearing a spot market");
            }
        }
    }

    /// Clears `listing`'s market if it is due at `now`.
    async fn clear(
        &self,
        listing: &Listing,
        now: UnixMillis,
    ) -> Result<Option<SpotCleared>, MarketError> {
        let supply = self.supply(listing, now).await?;
        let (_, goal) = self.terms_of(listing).await?;
        let grace = self.app.config.market.grace.as_millis() as i64;
        let notice =
            |cause: Cause| surplus_market::interrupt::notice(now, cause, listing.grace_ms, grace);
        let listing_id = listing.id.clone();
        let new_id = |bid: Uuid, n: u32| spot_reservation_id(&listing_id, bid, now, n);
        let available = supply.as_ref().map(|(_, a)| a.clone()).unwrap_or_default();
        let inputs = SpotInputs {
            supply: supply.map(|(s, _)| s),
            available: &available,
            goal,
            notice: &notice,
            new_id: &new_id,
        };
        let changes = |c: &SpotCleared| cleared_changes(listing, c);
        let Some(cleared) = self
            .app
            .store
            .clear_spot(&listing.id, inputs, &changes, now)
            .await?
        else {
            return Ok(None);
        };
        if let Some(class) = cleared.cleared.clearing.class(&listing.id) {
            tracing::info!(listing = %listing.id, price = class.price, capacity = class.capacity, allocated = class.allocated(), made = cleared.made.len(), noticed = cleared.noticed.len(), "spot market cleared");
        }
        Ok(Some(cleared))
    }
}

/// The key of the hold of a spot bid's funds.
fn spot_hold(bid: Uuid) -> String {
    format!("spot-bid:{bid}")
}

/// The id of the `n`th reservation bid `bid` gets at the clearing of `listing` at
/// `at_ms`: the same on every replica, different for every clearing.
fn spot_reservation_id(listing: &str, bid: Uuid, at_ms: UnixMillis, n: u32) -> Uuid {
    let digest = surplus_certs::sha256(format!("spot\0{listing}\0{bid}\0{at_ms}\0{n}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Whether a clearing's price goes into the pricing history: when it gave hosts
/// (every spot reservation has a point at its start), or when a spot reservation
/// holds a host and the price differs from the clearing before or the hour changed
/// since (so a steady price still draws a point an hour on the chart). A clearing
/// with nobody holding is left out, and the next one that gives hosts records its
/// price. So while anyone holds a host, every change of price is a point, and
/// billing, which charges the last point at or before each instant (never above
/// the holder's maximum), charges the clearing price.
fn recorded(c: &SpotCleared, class: &surplus_market::spot::ClassClearing) -> bool {
    const HOUR_MS: i64 = 3_600_000;
    let changed = c.previous.is_none_or(|(at, price)| {
        price != class.price || at.div_euclid(HOUR_MS) != c.cleared.at_ms.div_euclid(HOUR_MS)
    });
    !c.made.is_empty() || (c.holding > 0 && changed)
}

/// What a clearing changes beside its rows: the clearing price in the history (see
/// [`recorded`]), the provider's notice of each host given (with the price), the
/// holds of bids that won given back, and the notice of each host taken back to its
/// holder and to its agent (with the instances it stops at the deadline).
fn cleared_changes(listing: &Listing, c: &SpotCleared) -> ChangeSet {
    let mut set = made_changes(listing, &c.made, None, 0);
    if let Some(class) = c
        .cleared
        .clearing
        .class(&listing.id)
        .filter(|class| recorded(c, class))
    {
        set.prices.push(price_point(
            listing,
            surplus_market::history::PriceKind::Spot,
            format!("spot:{}:{}", listing.id, c.cleared.at_ms),
            class.price,
            c.cleared.at_ms,
        ));
    }
    // A bid that won hosts has what it held given back: its hosts are billed as
    // they are used.
    let mut winners: Vec<Uuid> = c.won.clone();
    winners.dedup();
    for bid in winners {
        set.holds.push(HoldChange::Release {
            key: spot_hold(bid),
        });
    }
    for (r, n) in &c.noticed {
        set.notices.push(Notice {
            key: format!("reservation.interrupting:{}", r.id),
            recipient: format!("client:{}", r.holder),
            kind: "reservation.interrupting".into(),
            body: notice_body(r, n),
        });
        let instances = c.stopping.get(&r.id).cloned().unwrap_or_default();
        set.notices.push(agent_notice(r, n, instances));
    }
    set
}
