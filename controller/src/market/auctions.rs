//! The auctions' shell (issue 16): a provider sells one host of a listing by an
//! English, Dutch or sealed auction; clients bid; the auction closes once, and the
//! winner gets a reservation of a free host at the price the engine decided.
//!
//! The rules are `surplus_market::auction`'s. Every step (a bid, a close) is one
//! transaction under the listing's lock on the auction's row; the close is a timer
//! row (`due_at_ms`) that every controller's tick polls, written only while the
//! auction is not closed, so it closes once however many replicas share the
//! database. A buy-now or a Dutch take closes it in the bid's own transaction.

use std::collections::BTreeMap;

use surplus_api::market::{AuctionBidRequest, AuctionRequest, AuctionView};
use surplus_market::auction::{Auction, Bid};
use surplus_market::resell::PricingMode;
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::{
    ChangeSet, Listing, Market, MarketError, Notice, Principal, Role, invalid, made_changes,
    price_point, require_client,
};
use crate::store::{AuctionInputs, AuctionStep, HoldChange, StoreError, StoredAuction};

/// Most auctions one listing answers with.
pub const LIST_LIMIT: u32 = 500;

impl Market {
    /// Puts one host of a listing up for auction: its provider, or an admin. The
    /// listing must sell `auction`; the engine checks its parameters (the reserve or
    /// floor at least the provider minimum, the end after the start, ...) and a
    /// refusal names the rule.
    pub async fn create_auction(
        &self,
        caller: &Principal,
        body: AuctionRequest,
    ) -> Result<AuctionView, MarketError> {
        let listing = self
            .app
            .store
            .listing(&body.listing)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("listing {} not found", body.listing)))?;
        match caller.role {
            Role::Admin => {}
            Role::Provider if listing.provider == caller.account => {}
            _ => {
                return Err(MarketError::Forbidden(
                    "a listing's host is auctioned by its provider or an admin".into(),
                ));
            }
        }
        if !listing.pricing_modes.contains(&PricingMode::Auction) {
            return Err(invalid(
                "listing",
                format!("listing {} does not sell by auction", listing.id),
            ));
        }
        let term_ms = match body.term_hours {
            Some(t) if !(1..=surplus_market::offers::MAX_PERIOD_HOURS).contains(&t) => {
                return Err(invalid(
                    "term_hours",
                    format!(
                        "{t}: a term is 1 to {} hours",
                        surplus_market::offers::MAX_PERIOD_HOURS
                    ),
                ));
            }
            Some(t) => Some(
                i64::try_from(t)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(3_600_000),
            ),
            None => None,
        };
        let now = self.now();
        let (minimum, _) = self.terms_of(&listing).await?;
        let auction = Auction::new(
            Uuid::now_v7(),
            body.kind,
            minimum,
            body.starts_at_ms.unwrap_or(now),
            body.ends_at_ms,
        )
        .map_err(|r| {
            invalid(
                if r.rule == "times" {
                    "ends_at_ms"
                } else {
                    "kind"
                },
                r.to_string(),
            )
        })?;
        let stored = StoredAuction {
            auction,
            listing: listing.id.clone(),
            provider: listing.provider.clone(),
            term_ms,
            reservation: None,
            closed_at_ms: None,
            created_at_ms: now,
        };
        self.app.store.create_auction(&stored).await?;
        tracing::info!(auction = %stored.auction.id, listing = %listing.id, "auction created");
        Ok(view(stored, &listing.currency, now))
    }

    /// Auctions, newest first: of one listing or all, only open ones if asked.
    pub async fn auctions(
        &self,
        listing: Option<&str>,
        open: bool,
    ) -> Result<Vec<AuctionView>, MarketError> {
        let now = self.now();
        let mut currencies: BTreeMap<String, String> = BTreeMap::new();
        let mut out = Vec::new();
        for a in self.app.store.auctions(listing, open, LIST_LIMIT).await? {
            if !currencies.contains_key(&a.listing) {
                let c = self.currency_of(&a.listing).await?;
                currencies.insert(a.listing.clone(), c);
            }
            let currency = currencies[&a.listing].clone();
            out.push(view(a, &currency, now));
        }
        Ok(out)
    }

    async fn currency_of(&self, listing: &str) -> Result<String, MarketError> {
        Ok(self
            .app
            .store
            .listing(listing)
            .await?
            .map(|l| l.currency)
            .unwrap_or_default())
    }

    /// One auction.
    pub async fn auction(&self, id: Uuid) -> Result<AuctionView, MarketError> {
        let a = self
            .app
            .store
            .auction(id)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("auction {id} not found")))?;
        let currency = self.currency_of(&a.listing).await?;
        Ok(view(a, &currency, self.now()))
    }

    /// A client's bid on an auction, judged when it is made (never at the close): a
    /// refusal names the engine's rule and the numbers. A prepaid client's bid holds
    /// its amount for an hour until it is outbid or the auction closes. A bid that ends the auction (a buy-now, a Dutch
    /// take) closes it at once and gives the winner its host.
    pub async fn bid_auction(
        &self,
        caller: &Principal,
        id: Uuid,
        body: AuctionBidRequest,
    ) -> Result<AuctionView, MarketError> {
        require_client(caller)?;
        super::check_price("amount", body.amount)?;
        super::check_client_token(body.client_token.as_deref())?;
        let bid_id = match &body.client_token {
            Some(t) => super::token_id(&caller.account, &format!("auction\0{id}\0{t}"), 0),
            None => Uuid::now_v7(),
        };
        let a = self
            .app
            .store
            .auction(id)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("auction {id} not found")))?;
        // A retry of a bid the auction took is answered as it stands.
        if a.auction.bids.iter().any(|b| b.id == bid_id) || a.auction.replaced.contains(&bid_id) {
            return self.auction(id).await;
        }
        let listing = self
            .app
            .store
            .listing(&a.listing)
            .await?
            .ok_or_else(|| MarketError::NotFound(format!("listing {} not found", a.listing)))?;
        // A prepaid client's bid holds its amount for an hour, in the bid's
        // transaction (402 without the funds, nothing stored); the hold is given
        // back when the bid is outbid or replaced, and every hold at the close.
        let prepaid = self.prepaid(caller, &listing.currency).await?;
        let (_, goal) = self.terms_of(&listing).await?;
        let available = self.hosts_on_offer(&listing).await?;
        let inputs = AuctionInputs {
            available: &available,
            goal,
            interruptibility: listing.interruptibility,
        };
        let now = self.now();
        let bid = Bid {
            id: bid_id,
            bidder: caller.account.clone(),
            amount: body.amount,
        };
        let hold = prepaid.then(|| HoldChange::Place {
            key: auction_hold(bid_id),
            client: caller.account.clone(),
            currency: listing.currency.clone(),
            amount: i64::try_from(body.amount).unwrap_or(i64::MAX),
        });
        let changes = |step: &AuctionStep| step_changes(&listing, step, hold.clone());
        let step = match self
            .app
            .store
            .bid_auction(id, bid, inputs, &changes, now)
            .await?
        {
            Ok(step) => step,
            // Raced a retry of itself: the other attempt placed it.
            Err(r) if r.rule == "duplicate_bid" && body.client_token.is_some() => {
                return self.auction(id).await;
            }
            Err(r) => return Err(r.into()),
        };
        tracing::info!(auction = %id, bidder = %caller.account, amount = body.amount, closed = step.closed.is_some(), "auction bid accepted");
        Ok(view(step.auction, &listing.currency, now))
    }

    /// Closes the auctions due at `now` (the tick's part), reading each listing's
    /// terms and hosts on offer once; one that fails does not hold up the others.
    pub(super) async fn close_due(
        &self,
        due: Vec<(String, Uuid)>,
        listings: &BTreeMap<String, Listing>,
        now: UnixMillis,
    ) {
        let mut by_listing: BTreeMap<&str, Vec<Uuid>> = BTreeMap::new();
        for (listing, id) in &due {
            by_listing.entry(listing).or_default().push(*id);
        }
        for (id, auctions) in by_listing {
            let Some(listing) = listings.get(id) else {
                continue;
            };
            let read = async {
                let (_, goal) = self.terms_of(listing).await?;
                let available = self.hosts_on_offer(listing).await?;
                Ok::<_, StoreError>((goal, available))
            };
            let (goal, available) = match read.await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(listing = %id, error = %e, "closing auctions");
                    continue;
                }
            };
            for auction in auctions {
                let inputs = AuctionInputs {
                    available: &available,
                    goal,
                    interruptibility: listing.interruptibility,
                };
                if let Err(e) = self.close_auction(listing, auction, inputs, now).await {
                    tracing::warn!(auction = %auction, error = %e, "closing an auction");
                }
            }
        }
    }

    async fn close_auction(
        &self,
        listing: &Listing,
        id: Uuid,
        inputs: AuctionInputs<'_>,
        now: UnixMillis,
    ) -> Result<Option<AuctionStep>, MarketError> {
        let changes = |step: &AuctionStep| step_changes(listing, step, None);
        let step = self
            .app
            .store
            .close_auction(id, inputs, &changes, now)
            .await?;
        if let Some(s) = &step {
            tracing::info!(auction = %id, reason = ?s.closed.as_ref().map(|o| o.reason), winner = ?s.made.as_ref().map(|r| &r.holder), "auction closed");
        }
        Ok(step)
    }
}

fn view(a: StoredAuction, currency: &str, now: UnixMillis) -> AuctionView {
    AuctionView {
        id: a.auction.id,
        listing: a.listing,
        provider: a.provider,
        currency: currency.into(),
        term_ms: a.term_ms,
        auction: a.auction.public_view(now),
        reservation: a.reservation,
        closed_at_ms: a.closed_at_ms,
    }
}

/// The key of the hold of an auction bid's funds.
fn auction_hold(bid: Uuid) -> String {
    format!("auction-bid:{bid}")
}

/// What an auction's step changes beside its row: the bidder it outbid is told and
/// its hold given back (before the new bid's hold, `placed`, is taken: a sealed
/// bidder replacing its own bid needs the funds of one of them, not both); at the
/// close, every hold is given back (the winner's reservation is billed as it is
/// used), the sale's price goes into the pricing history, the winner and the
/// provider are told (the provider with the price, as for any reservation), or the
/// winner learns that no host was free to give.
fn step_changes(listing: &Listing, step: &AuctionStep, placed: Option<HoldChange>) -> ChangeSet {
    let a = &step.auction.auction;
    let mut set = match &step.made {
        Some(r) => made_changes(listing, std::slice::from_ref(r), None, 0),
        None => ChangeSet::default(),
    };
    if let Some(old) = step.superseded {
        set.holds.push(HoldChange::Release {
            key: auction_hold(old),
        });
    }
    set.holds.extend(placed);
    if step.closed.is_some() {
        for b in &a.bids {
            set.holds.push(HoldChange::Release {
                key: auction_hold(b.id),
            });
        }
    }
    if let Some(old) = step.superseded {
        let bidder_of = |id: Uuid| a.bids.iter().find(|b| b.id == id).map(|b| b.bidder.clone());
        if let (Some(old_bidder), Some(new)) = (bidder_of(old), step.accepted) {
            if bidder_of(new).as_ref() != Some(&old_bidder) {
                set.notices.push(Notice {
                    key: format!("auction.outbid:{old}"),
                    recipient: format!("client:{old_bidder}"),
                    kind: "auction.outbid".into(),
                    body: serde_json::json!({"auction": a.id, "listing": listing.id, "bid": old}),
                });
            }
        }
    }
    if let Some(o) = &step.closed {
        if let Some(w) = &o.winner {
            set.prices.push(price_point(
                listing,
                surplus_market::history::PriceKind::Auction,
                format!("auction:{}", a.id),
                w.price,
                o.decided_at_ms,
            ));
            set.notices.push(Notice {
                key: format!("auction.won:{}", a.id),
                recipient: format!("client:{}", w.bidder),
                kind: "auction.won".into(),
                body: serde_json::json!({
                    "auction": a.id,
                    "listing": listing.id,
                    "price": w.price,
                    "currency": listing.currency,
                    "reservation": step.made.as_ref().map(|r| r.id),
                    "unfilled": step.unfilled.as_ref().map(|r| r.message.clone()),
                }),
            });
        }
        set.notices.push(Notice {
            key: format!("auction.closed:{}", a.id),
            recipient: crate::resell::provider_recipient(&listing.provider),
            kind: "auction.closed".into(),
            body: serde_json::json!({"auction": a.id, "listing": listing.id, "outcome": o}),
        });
    }
    set
}
