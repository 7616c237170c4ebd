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
    ModePrice, Offer, PricingMode, ReservationState, ReserveRequest, svg_chart,
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
    let axum::Json(list) = market::list_reservations(State(ctl.clone()), caller).await?;
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
        },
    ))
}

async fn reserve(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let number = |key: &str| -> Result<Option<u64>, PageError> {
        form.non_empty(key)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| PageError::bad_request(format!("{key}: {v:?} is not a number")))
            })
            .transpose()
    };
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
        count: number("count")?.map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        quote,
        term_hours: number("term_hours")?,
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
