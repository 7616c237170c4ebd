//! The buying pages (issue 16, source 000 FIG. 9-12): offers with their filters and
//! ranking, an offer's prices and how long each holds beside the reserve form, the
//! client's reservations with a release button, and the pricing history's chart with
//! the guidance. Every page reads and acts through the API's handlers, so it shows and
//! allows what the API would for the same caller.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::Redirect;
use axum::routing::{get, post};
use maud::{Markup, PreEscaped, html};
use surplus_api::market::{
    AuctionBidRequest, AuctionKind, AuctionRequest, AuctionView, BidRequest, ModePrice, Offer,
    PricingMode, ReservationState, ReserveRequest, svg_chart,
};
use surplus_market::records::name_of;

use super::view::{page, time};
use super::{Filled, FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, market};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/offers", get(offers))
        .route("/console/offers/{id}", get(offer))
        .route("/console/reservations", get(reservations).post(reserve))
        .route("/console/reservations/{id}/release", post(release))
        .route("/console/bids", post(place_bid))
        .route("/console/auctions", get(auctions).post(create_auction))
        .route("/console/auctions/{id}", get(auction))
        .route("/console/auctions/{id}/bids", post(bid_auction))
        .route("/console/bids/{id}/cancel", post(cancel_bid))
        .route("/console/pricing", get(pricing))
}

fn prices(list: &[ModePrice], currency: &str, now: i64) -> Markup {
    html! {
        ul.prices { @for p in list { li data-mode=(name_of(&p.mode)) {
            b { (name_of(&p.mode)) } " " (p.hourly) " " (currency) " / h"
            @if p.upfront > 0 { " + " (p.upfront) " upfront" }
            @if let Some(ms) = p.term_ms { " for " (ms / 3_600_000) " h" }
            @if let Some(until) = p.valid_until_ms { " — holds " ((until - now) / 1000) " s" }
            @else if matches!(p.mode, PricingMode::Spot | PricingMode::Auction) { " — the least a bid may be" }
            @else { " — until the provider changes it" }
            @if let Some(total) = p.total { " (period: " (total) ")" }
            @if let Some(h) = p.break_even_hours { " — cheaper than on-demand after " (h) " h" }
        } } }
    }
}

async fn offers(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    RawQuery(query): RawQuery,
) -> Page {
    let filled = Filled::of(query.as_deref());
    let found: Vec<Offer> = market::find_offers(&ctl, Some(&filled.query())).await?;
    let now = ctl.app.clock.now_ms();
    let field = |name: &str, label: &str| {
        html! { label { (label) " " input name=(name) value=(filled.get(name)) size="8"; } }
    };
    Ok(page(
        "Offers",
        &signed,
        html! {
            h1 { "Offers" }
            form.filters method="get" action="/console/offers" {
                (field("kind", "Kind")) (field("category", "Category"))
                (field("min_cores", "Cores ≥")) (field("min_memory_gb", "Memory GiB ≥"))
                (field("zone", "Zone")) (field("vendors", "Providers"))
                (field("pricing_mode", "Pricing")) (field("interruptibility", "Interruptibility"))
                (field("compat", "Compatibility ≥")) (field("min_rating", "Rating ≥"))
                (field("max_price", "Price ≤")) (field("currency", "Currency"))
                (field("period_hours", "Period (h)")) (field("rank_by", "Rank by"))
                button type="submit" { "Search" }
            }
            table #offers {
                thead { tr {
                    th { "Listing" } th { "Provider" } th { "Zone" } th { "Category" } th { "Score" }
                    th { "Prices" } th { "Available" } th { "Rating" } th { "Reserved before" }
                } }
                tbody { @for o in &found { tr data-listing=(o.listing.id) {
                    td { a href={ "/console/offers/" (o.listing.id) } { code { (o.listing.id) } } }
                    td { (o.listing.provider) } td { (o.listing.zone) } td { (o.listing.category) }
                    td.num { (format!("{:.2}", o.listing.score)) }
                    td { (prices(&o.prices, &o.listing.currency, now)) }
                    td.num { (o.available) }
                    td.num { (o.listing.rating.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into())) }
                    td.num { (o.past_reservations) }
                } } }
            }
            @if found.is_empty() { p.empty { "No offer matches: nothing free now fits these filters." } }
        },
    ))
}

async fn offer(State(ctl): State<Arc<Controller>>, signed: Signed, Path(id): Path<String>) -> Page {
    let view = crate::http::resell::listing_view(&ctl, &id).await?;
    let found: Vec<Offer> = market::find_offers(&ctl, None).await?;
    let o = found.iter().find(|o| o.listing.id == id);
    let history =
        market::price_history(&ctl, Some(&format!("category={}", view.listing.category))).await?;
    let now = ctl.app.clock.now_ms();
    let l = &view.listing;
    let spot = match l.pricing_modes.contains(&PricingMode::Spot) {
        true => Some(
            ctl.market
                .spot(&id)
                .await
                .map_err(crate::http::ApiError::from)?,
        ),
        false => None,
    };
    Ok(page(
        &format!("Offer {id}"),
        &signed,
        html! {
            h1 { "Offer " code { (id) } }
            p { (l.provider) " · " (l.zone) " · " (l.category) " · score " (format!("{:.2}", l.score))
                " · hardening " (l.hardening_index) " · " (name_of(&l.compat_level))
                " · " (name_of(&l.interruptibility)) }
            @match o {
                Some(o) => {
                    h2 { "Prices" }
                    (prices(&o.prices, &l.currency, now))
                    p #available { (o.available) " free now · reserved " (o.past_reservations) " times" }
                    h2 { "Reserve" }
                    form #reserve method="post" action="/console/reservations" {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input type="hidden" name="listing" value=(id);
                        // A form sent twice reserves once.
                        input type="hidden" name="client_token" value=(uuid::Uuid::now_v7());
                        label { "Mode " select name="mode" {
                            @for p in &o.prices { @if !matches!(p.mode, PricingMode::Spot | PricingMode::Auction) {
                                option value=(name_of(&p.mode)) selected[p.mode == PricingMode::OnDemand] { (name_of(&p.mode)) }
                            } }
                        } }
                        label { "Hosts " input name="count" value="1" size="3"; }
                        label { "Term (h, reserved) " input name="term_hours" size="6"; }
                        button type="submit" { "Reserve" }
                    }
                    @if let Some(v) = &spot {
                        h2 { "Bid on the spot market" }
                        p #spot {
                            "Minimum " (v.minimum) " " (v.currency) " / h · " (v.capacity) " host(s) by spot · "
                            @match v.price {
                                Some(p) => { "last cleared at " (p) " " (v.currency) } ,
                                None => "not cleared yet",
                            }
                            @if let Some(t) = v.next_clearing_at_ms { " · next clearing in " (((t - now) / 1000).max(0)) " s" }
                        }
                        @match &v.guidance {
                            Some(g) => p #spot-guidance { "Spot bids won recently at " (g.low) " to " (g.high) " " (v.currency) " (median " (g.median) ")" },
                            None => p #spot-guidance { "No spot price won recently: the minimum is the guide." },
                        }
                        form #bid method="post" action="/console/bids" {
                            input type="hidden" name="csrf" value=(signed.csrf);
                            input type="hidden" name="listing" value=(id);
                            input type="hidden" name="client_token" value=(uuid::Uuid::now_v7());
                            label { "Maximum / h " input name="max_price" value=(v.minimum) size="8"; }
                            label { "Hosts " input name="quantity" value="1" size="3"; }
                            label { input type="checkbox" name="all_or_nothing" value="true"; " all or nothing" }
                            button type="submit" { "Bid" }
                        }
                    }
                }
                None => { p.empty #unavailable { "Not offered now: nothing free, or its provider may not sell." } }
            }
            h2 { "Recent prices in " (l.category) }
            @match &history.guidance {
                Some(g) => p #guidance { "Won recently: " (g.low) " to " (g.high) " (median " (g.median) ", " (g.count) " prices)" },
                None => p #guidance { "Nothing sold recently." },
            }
            h2 { "Validation evidence" }
            ul { @for e in &view.evidence { li { code { (e.host) } " "
                @if let Some(a) = &e.assessment { (if a.accepted() { "accepted" } else { "not accepted" }) } @else { "not judged" }
            } } }
        },
    ))
}

async fn reservations(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let axum::Json(list) = market::list_reservations(State(ctl.clone()), caller.clone()).await?;
    let axum::Json(bids) = market::list_bids(State(ctl.clone()), caller).await?;
    let now = ctl.app.clock.now_ms();
    Ok(page(
        "Reservations",
        &signed,
        html! {
            h1 { "Reservations" }
            table #reservations {
                thead { tr {
                    th { "Reservation" } th { "Listing" } th { "Host" } th { "Mode" } th { "Price / h" }
                    th { "Started" } th { "Ends" } th { "State" } th { "Access" } th {}
                } }
                tbody { @for v in &list { @let r = &v.reservation; tr data-reservation=(r.id) {
                    td { code { (r.id) } } td { (r.listing) } td { code { (r.host) } }
                    td { (name_of(&r.mode)) } td.num { (r.price) " " (v.currency) }
                    td { (time(r.starts_at_ms)) }
                    td { @match r.end_ms() { Some(e) => (time(e)), None => "when released" } }
                    td.state { @match r.state {
                        ReservationState::Active if v.interruption.is_some() => {
                            @let n = v.interruption.expect("matched");
                            "interrupted (" (name_of(&n.cause)) "): stops at " (time(n.deadline_ms))
                            " — " (((n.deadline_ms - now) / 1000).max(0)) " s of grace left"
                        },
                        ReservationState::Active if r.holds_at(now) => "active",
                        ReservationState::Active => "ending",
                        ReservationState::Ended { why, .. } => (why.to_string()),
                    } }
                    td { @if let Some(a) = &v.access { (a.zone) " " (a.address.clone().unwrap_or_default()) } }
                    td { @if r.holds_at(now) {
                        form method="post" action={ "/console/reservations/" (r.id) "/release" } {
                            input type="hidden" name="csrf" value=(signed.csrf);
                            button type="submit" { "Release" }
                        }
                    } }
                } } }
            }
            @if list.is_empty() { p.empty { "No reservation yet: find capacity under " a href="/console/offers" { "Offers" } "." } }
            h2 { "Spot bids" }
            table #bids {
                thead { tr {
                    th { "Bid" } th { "Listing" } th { "Maximum / h" } th { "Hosts" } th { "Placed" }
                    th { "State" } th { "Allocated" } th { "Held" } th {}
                } }
                tbody { @for v in &bids { @let b = &v.bid; tr data-bid=(b.id) {
                    td { code { (b.id) } } td { (b.class) } td.num { (b.max_price) }
                    td.num { (b.quantity) @if b.all_or_nothing { " (all or nothing)" } }
                    td { (time(b.placed_at_ms)) } td.state { (v.state) }
                    td.num { (v.allocated) } td.num { (v.reservations.len()) }
                    td { @if v.cancelled_at_ms.is_none() {
                        form method="post" action={ "/console/bids/" (b.id) "/cancel" } {
                            input type="hidden" name="csrf" value=(signed.csrf);
                            button type="submit" { "Cancel" }
                        }
                    } }
                } } }
            }
            @if bids.is_empty() { p.empty { "No spot bid." } }
        },
    ))
}

async fn reserve(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let mode = form.non_empty("mode").unwrap_or("on_demand");
    let listing = form.non_empty("listing").unwrap_or_default().to_owned();
    let mode: PricingMode = surplus_market::records::from_name(mode)
        .ok_or_else(|| PageError::bad_request(format!("mode: {mode:?} is not a pricing mode")))?;
    // Buying at the immediate price from the console is asking for a quote and
    // accepting it at once.
    let quote = match mode {
        PricingMode::Immediate => {
            let ask = surplus_api::market::QuoteRequest {
                listing: listing.clone(),
            };
            let (_, axum::Json(q)) =
                market::create_quote(State(ctl.clone()), caller.clone(), Ok(axum::Json(ask)))
                    .await?;
            Some(q.id)
        }
        _ => None,
    };
    let body = ReserveRequest {
        listing,
        mode,
        count: number(&form, "count")?.map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        quote,
        term_hours: number(&form, "term_hours")?,
        client_token: form.non_empty("client_token").map(str::to_owned),
    };
    let _ = market::reserve(State(ctl), caller, Ok(axum::Json(body))).await?;
    Ok(Redirect::to("/console/reservations"))
}

async fn release(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let _ = market::release(State(ctl), caller, Path(id)).await?;
    Ok(Redirect::to("/console/reservations"))
}

async fn place_bid(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let body = BidRequest {
        listing: form.non_empty("listing").unwrap_or_default().to_owned(),
        max_price: number(&form, "max_price")?
            .ok_or_else(|| PageError::bad_request("max_price: a bid names its maximum"))?,
        quantity: number(&form, "quantity")?.map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        all_or_nothing: form.non_empty("all_or_nothing").is_some(),
        client_token: form.non_empty("client_token").map(str::to_owned),
    };
    let _ = market::place_bid(State(ctl), caller, Ok(axum::Json(body))).await?;
    Ok(Redirect::to("/console/reservations"))
}

async fn cancel_bid(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let _ = market::cancel_bid(State(ctl), caller, Path(id)).await?;
    Ok(Redirect::to("/console/reservations"))
}

async fn pricing(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    RawQuery(query): RawQuery,
) -> Page {
    let filled = Filled::of(query.as_deref());
    let history = market::price_history(&ctl, Some(&filled.query())).await?;
    let currency = history
        .points
        .last()
        .map(|p| p.currency.clone())
        .unwrap_or_default();
    let field = |name: &str, label: &str| {
        html! { label { (label) " " input name=(name) value=(filled.get(name)) size="8"; } }
    };
    Ok(page(
        "Pricing history",
        &signed,
        html! {
            h1 { "Pricing history" }
            form.filters method="get" action="/console/pricing" {
                (field("kind", "Kind")) (field("category", "Category")) (field("provider", "Provider"))
                (field("zone", "Zone")) (field("currency", "Currency")) (field("bucket", "Bucket"))
                button type="submit" { "Show" }
            }
            figure #chart { (PreEscaped(svg_chart(&history.series, &currency, "Prices capacity sold at"))) }
            @match &history.guidance {
                Some(g) => p #guidance { "Won recently: " (g.low) " to " (g.high) " " (currency) " (median " (g.median) ", " (g.count) " prices)" },
                None => p #guidance { "Nothing sold recently." },
            }
            table #prices {
                thead { tr { th { "At" } th { "Kind" } th { "Listing" } th { "Provider" } th { "Zone" } th { "Category" } th { "Price" } } }
                tbody { @for p in history.points.iter().rev() { tr {
                    td { (time(p.at_ms)) } td { (name_of(&p.kind)) } td { (p.listing) } td { (p.provider) }
                    td { (p.zone) } td { (p.category) } td.num { (p.price) " " (p.currency) }
                } } }
            }
        },
    ))
}

fn auction_type(kind: &AuctionKind) -> &'static str {
    match kind {
        AuctionKind::English { .. } => "English",
        AuctionKind::Dutch { .. } => "Dutch",
        AuctionKind::SealedFirst { .. } => "sealed first-price",
        AuctionKind::SealedSecond { .. } => "sealed second-price",
    }
}

fn auction_row(v: &AuctionView) -> Markup {
    let a = &v.auction;
    html! {
        tr data-auction=(v.id) {
            td { a href={ "/console/auctions/" (v.id) } { code { (v.id) } } }
            td { (v.listing) } td { (auction_type(&a.kind)) } td.state { (name_of(&a.phase)) }
            td { (time(a.ends_at_ms)) }
            td.num { @if let Some(p) = a.current_price { (p) " " (v.currency) } @else { "-" } }
            td.num { (a.bid_count) }
            td { @match a.outcome.as_ref().map(|o| &o.winner) {
                Some(Some(w)) => { (w.bidder) " at " (w.price) " " (v.currency) },
                Some(None) => "no sale",
                None => "-",
            } }
        }
    }
}

async fn auctions(State(ctl): State<Arc<Controller>>, signed: Signed) -> Page {
    let list = ctl
        .market
        .auctions(None, false)
        .await
        .map_err(crate::http::ApiError::from)?;
    let provider = signed.principal.role == crate::store::Role::Provider;
    Ok(page(
        "Auctions",
        &signed,
        html! {
            h1 { "Auctions" }
            table #auctions {
                thead { tr {
                    th { "Auction" } th { "Listing" } th { "Type" } th { "State" } th { "Ends" }
                    th { "Price" } th { "Bids" } th { "Outcome" }
                } }
                tbody { @for v in &list { (auction_row(v)) } }
            }
            @if list.is_empty() { p.empty { "No auction yet." } }
            @if provider {
                h2 { "Auction a host" }
                form #create-auction method="post" action="/console/auctions" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    label { "Listing " input name="listing" size="12"; }
                    label { "Type " select name="type" {
                        option value="english" { "English" } option value="dutch" { "Dutch" }
                        option value="sealed_first" { "sealed first-price" } option value="sealed_second" { "sealed second-price" }
                    } }
                    label { "Reserve " input name="reserve" size="6"; }
                    label { "Increment " input name="increment" size="6"; }
                    label { "Buy now " input name="buy_now" size="6"; }
                    label { "Start " input name="start" size="6"; }
                    label { "Decrement " input name="decrement" size="6"; }
                    label { "Every (ms) " input name="every_ms" size="6"; }
                    label { "Floor " input name="floor" size="6"; }
                    label { "Ends in (s) " input name="ends_in" value="3600" size="6"; }
                    label { "Term (h) " input name="term_hours" size="6"; }
                    button type="submit" { "Create" }
                }
            }
        },
    ))
}

async fn auction(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    Path(id): Path<String>,
) -> Page {
    let axum::Json(v) = market::show_auction(
        State(ctl.clone()),
        Caller(signed.principal.clone()),
        Path(id),
    )
    .await?;
    let a = &v.auction;
    let client = signed.principal.role == crate::store::Role::Client;
    let guidance = market::price_history(&ctl, Some("kind=auction"))
        .await?
        .guidance;
    Ok(page(
        &format!("Auction {}", v.id),
        &signed,
        html! {
            h1 { "Auction " code { (v.id) } }
            p #auction-state { (auction_type(&a.kind)) " auction of a host of " (v.listing) " (" (v.provider) ") · "
                (name_of(&a.phase)) " · ends " (time(a.ends_at_ms))
                @if let Some(t) = v.term_ms { " · the winner holds the host " (t / 3_600_000) " h" } }
            @if let Some(p) = a.current_price { p #current { "Price now: " (p) " " (v.currency) " / h" } }
            @if let Some(p) = a.lowest_acceptable { p #lowest { "Lowest bid accepted now: " (p) " " (v.currency) } }
            @match &guidance {
                Some(g) => p #guidance { "Auctions won recently at " (g.low) " to " (g.high) " (median " (g.median) ")" },
                None => p #guidance { "No auction sold recently." },
            }
            @if client && a.lowest_acceptable.is_some() {
                form #bid method="post" action={ "/console/auctions/" (v.id) "/bids" } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="client_token" value=(uuid::Uuid::now_v7());
                    label { "Bid / h " input name="amount" value=(a.lowest_acceptable.unwrap_or_default()) size="8"; }
                    button type="submit" { "Bid" }
                }
            }
            h2 { "Bids (" (a.bid_count) ")" }
            @if a.bids.is_empty() && a.bid_count > 0 { p #sealed { "Sealed: the bids are shown after the close." } }
            table #auction-bids {
                thead { tr { th { "At" } th { "Bidder" } th { "Amount" } } }
                tbody { @for b in &a.bids { tr { td { (time(b.at_ms)) } td { (b.bidder) } td.num { (b.amount) " " (v.currency) } } } }
            }
            @if let Some(o) = &a.outcome {
                h2 { "Outcome" }
                p #outcome { @match &o.winner {
                    Some(w) => { (w.bidder) " won at " (w.price) " " (v.currency) " / h (" (name_of(&o.reason)) ")" },
                    None => "No sale.",
                } }
            }
        },
    ))
}

async fn create_auction(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let need = |key: &str| -> Result<u64, PageError> {
        number(&form, key)?
            .ok_or_else(|| PageError::bad_request(format!("{key}: needed for this type")))
    };
    let kind = match form.non_empty("type").unwrap_or("english") {
        "english" => AuctionKind::English {
            reserve: need("reserve")?,
            increment: need("increment")?,
            buy_now: number(&form, "buy_now")?,
        },
        "dutch" => AuctionKind::Dutch {
            start: need("start")?,
            decrement: need("decrement")?,
            every_ms: i64::try_from(need("every_ms")?).unwrap_or(i64::MAX),
            floor: need("floor")?,
        },
        "sealed_first" => AuctionKind::SealedFirst {
            reserve: need("reserve")?,
        },
        "sealed_second" => AuctionKind::SealedSecond {
            reserve: need("reserve")?,
        },
        other => {
            return Err(PageError::bad_request(format!(
                "type: {other:?} is not an auction type"
            )));
        }
    };
    let ends_in = i64::try_from(need("ends_in")?).unwrap_or(i64::MAX);
    let body = AuctionRequest {
        listing: form.non_empty("listing").unwrap_or_default().to_owned(),
        kind,
        starts_at_ms: None,
        ends_at_ms: ctl
            .app
            .clock
            .now_ms()
            .saturating_add(ends_in.saturating_mul(1000)),
        term_hours: number(&form, "term_hours")?,
    };
    let (_, axum::Json(v)) =
        market::create_auction(State(ctl), caller, Ok(axum::Json(body))).await?;
    Ok(Redirect::to(&format!("/console/auctions/{}", v.id)))
}

async fn bid_auction(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let amount = number(&form, "amount")?
        .ok_or_else(|| PageError::bad_request("amount: a bid names its amount"))?;
    let body = AuctionBidRequest {
        amount,
        client_token: form.non_empty("client_token").map(str::to_owned),
    };
    let _ = market::bid_auction(State(ctl), caller, Path(id.clone()), Ok(axum::Json(body))).await?;
    Ok(Redirect::to(&format!("/console/auctions/{id}")))
}

/// A form's number field, if filled.
pub(super) fn number(form: &FormFields, key: &str) -> Result<Option<u64>, PageError> {
    form.non_empty(key)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| PageError::bad_request(format!("{key}: {v:?} is not a number")))
        })
        .transpose()
}
