//! Buying capacity (issue 16): offers, quotes, reservations and the pricing history.

use surplus_api::market::*;
use surplus_market::history::HistoryQuery;

use crate::market::MarketError;

use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("GET", "/v1/offers", Token, search_offers),
        route("POST", "/v1/quotes", Token, create_quote),
        route("POST", "/v1/reservations", Token, reserve),
        route("GET", "/v1/reservations", Token, list_reservations),
        route("GET", "/v1/reservations/{id}", Token, show_reservation),
        route("POST", "/v1/reservations/{id}/release", Token, release),
        route("POST", "/v1/reclaims", Token, reclaim),
        route("GET", "/v1/pricing/history", Token, pricing_history),
        route("POST", "/v1/bids", Token, place_bid),
        route("GET", "/v1/bids", Token, list_bids),
        route("GET", "/v1/bids/{id}", Token, show_bid),
        route("POST", "/v1/bids/{id}/cancel", Token, cancel_bid),
        route("GET", "/v1/spot/{listing}", Token, show_spot),
        route("POST", "/v1/spot/{listing}/clear", Token, clear_spot),
        route("POST", "/v1/auctions", Token, create_auction),
        route("GET", "/v1/auctions", Token, list_auctions),
        route("GET", "/v1/auctions/{id}", Token, show_auction),
        route("POST", "/v1/auctions/{id}/bids", Token, bid_auction),
    ]
}

impl From<MarketError> for ApiError {
    fn from(e: MarketError) -> Self {
        let message = e.to_string();
        match e {
            MarketError::Invalid { field, .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message).with_field(field)
            }
            MarketError::Fields(errors) => super::resell::invalid(errors),
            MarketError::NotFound(_) => ApiError::not_found(message),
            MarketError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            MarketError::Refused(r) => {
                let status = match r.rule {
                    "not_holder" => StatusCode::FORBIDDEN,
                    "unknown" | "unknown_bid" | "unknown_auction" => StatusCode::NOT_FOUND,
                    "minimum" | "term" | "validity" | "not_cheaper" | "units" | "quantity" => {
                        StatusCode::BAD_REQUEST
                    }
                    _ => StatusCode::CONFLICT,
                };
                ApiError::new(status, r.rule, r.message).with_detail("rule", r.rule)
            }
            MarketError::Ledger(e @ surplus_market::ledger::LedgerError::Insufficient { .. }) => {
                ApiError::new(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_funds",
                    e.to_string(),
                )
            }
            MarketError::Ledger(e) => {
                tracing::error!(error = %e, "a reservation's posting was refused");
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            MarketError::Store(e) => e.into(),
        }
    }
}

/// Offers a client may reserve now, ranked as asked (every token). Filters: `kind`,
/// `category`, `min_cores`, `min_memory_gb`, `zone`, `vendors` (providers, comma
/// separated), `pricing_mode`, `interruptibility`, `compat` (at least), `min_rating`,
/// `max_price` (with `currency`), `period_hours` (the term offered and the cost of
/// the period); ranking `rank_by` (`price`, `score`, `uptime`, `rating`, `mix`) with a
/// mix's weights `w_price`, `w_score`, `w_uptime`, `w_rating`. Each offer shows its
/// price in every mode it sells with how long that price holds, its rating, its past
/// reservations and the hosts available now. An unknown parameter is a 400 naming it.
#[utoipa::path(get, path = "/v1/offers", tag = "market", params(
    ("kind" = Option<String>, Query, description = "compute, storage or bandwidth"),
    ("category" = Option<String>, Query, description = "A size category"),
    ("min_cores" = Option<u32>, Query, description = "At least this many CPUs (by the size category)"),
    ("min_memory_gb" = Option<u64>, Query, description = "At least this much memory, GiB (by the size category)"),
    ("zone" = Option<String>, Query, description = "An availability zone"),
    ("vendors" = Option<String>, Query, description = "Only these providers, comma separated"),
    ("pricing_mode" = Option<String>, Query, description = "spot, auction, immediate, on_demand or reserved"),
    ("interruptibility" = Option<String>, Query, description = "dont_care, price_based, fulfilment_based or no_interruptions"),
    ("compat" = Option<String>, Query, description = "At least this compatibility level"),
    ("min_rating" = Option<f64>, Query, description = "At least this average rating, 1 to 5"),
    ("max_price" = Option<u64>, Query, description = "At most this hourly price, minor units"),
    ("currency" = Option<String>, Query, description = "Priced in this currency"),
    ("period_hours" = Option<u64>, Query, description = "How long the capacity is wanted: the term offered and each mode's cost of the period"),
    ("rank_by" = Option<String>, Query, description = "price, score, uptime, rating or mix (default)"),
    ("w_price" = Option<f64>, Query, description = "A mix's weight of price"),
    ("w_score" = Option<f64>, Query, description = "A mix's weight of the benchmark score"),
    ("w_uptime" = Option<f64>, Query, description = "A mix's weight of uptime"),
    ("w_rating" = Option<f64>, Query, description = "A mix's weight of rating"),
), responses((status = 200, description = "The offers, best first", body = Vec<Offer>)))]
pub(crate) async fn search_offers(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<Offer>> {
    Ok(Json(find_offers(&ctl, query.as_deref()).await?))
}

/// The offers matching a query string (shared with the console).
pub(crate) async fn find_offers(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Vec<Offer>, ApiError> {
    let pairs = crate::http::form_pairs(query.unwrap_or(""));
    // Read the filters first, so that a bad query costs no reads.
    surplus_market::offers::OfferQuery::parse(&pairs).map_err(super::resell::invalid)?;
    let listings = super::resell::find_listings(ctl, None).await?;
    Ok(ctl.market.offers(&pairs, listings).await?)
}

/// An immediate quote: the listing's price, held for the configured validity (60 s
/// by default) for the calling client, honoured once if accepted in time with
/// `POST /v1/reservations` (`mode` `immediate`).
#[utoipa::path(post, path = "/v1/quotes", tag = "market", request_body = QuoteRequest, responses((status = 201, description = "The quote", body = Quote)))]
pub(crate) async fn create_quote(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<QuoteRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Quote>), ApiError> {
    let Json(body) = body?;
    let q = ctl.market.quote(&caller.0, &body.listing).await?;
    Ok((StatusCode::CREATED, Json(q)))
}

/// Reserves hosts of a listing for the calling client: `on_demand`, `immediate`
/// (accepting a quote) or `reserved` (a long-term term, its upfront fee charged now
/// through the ledger). All the hosts asked for or none: 409 `sold_out` when fewer
/// are free. Answers with the access details of each host; the provider is notified
/// with the price. A retry with the same `client_token` answers as the first attempt
/// did, with what it made, and reserves nothing more.
#[utoipa::path(post, path = "/v1/reservations", tag = "market", request_body = ReserveRequest, responses(
    (status = 201, description = "Reserved (or, for a retry with the same client token, what the first attempt reserved)", body = Vec<ReservationView>),
    (status = 409, description = "Refused by a market rule (sold_out, ...)", body = ErrorBody),
    (status = 402, description = "A prepaid client cannot pay the upfront fee", body = ErrorBody),
))]
pub(crate) async fn reserve(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<ReserveRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Vec<ReservationView>>), ApiError> {
    let Json(body) = body?;
    let views = ctl.market.reserve(&caller.0, body).await?;
    Ok((StatusCode::CREATED, Json(views)))
}

/// The calling client's reservations, newest first.
#[utoipa::path(get, path = "/v1/reservations", tag = "market", responses((status = 200, description = "The caller's reservations", body = Vec<ReservationView>)))]
pub(crate) async fn list_reservations(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Vec<ReservationView>> {
    Ok(Json(ctl.market.reservations(&caller.0).await?))
}

fn reservation_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a reservation id (a UUID)"))
            .with_field("id".into())
    })
}

/// One reservation: its holder's, or any for an admin.
#[utoipa::path(get, path = "/v1/reservations/{id}", tag = "market", params(("id" = Uuid, Path, description = "The reservation")), responses((status = 200, description = "The reservation", body = ReservationView)))]
pub(crate) async fn show_reservation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ReservationView> {
    let id = reservation_id(&id)?;
    Ok(Json(ctl.market.reservation(&caller.0, id).await?))
}

/// Ends a reservation now, by its holder: control of the host and billing stop, and
/// the holder's instances there are stopped and terminated.
#[utoipa::path(post, path = "/v1/reservations/{id}/release", tag = "market", params(("id" = Uuid, Path, description = "The reservation")), responses((status = 200, description = "The ended reservation", body = ReservationView)))]
pub(crate) async fn release(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ReservationView> {
    let id = reservation_id(&id)?;
    let view = ctl.market.release(&caller.0, id).await?;
    // The holder's instances there stop now, without holding up the answer; what the
    // host does not answer, the market's next tick stops.
    let (ctl2, host) = (ctl.clone(), view.reservation.host);
    ctl.app
        .tasks
        .spawn(async move { ctl2.control.stop_unreserved(Some(host)).await });
    Ok(Json(view))
}

/// A provider takes capacity back for its own customers (fulfilment-based
/// interruption): of its reservations held now that allow it (`host`, `listing`,
/// `count` choose which: 1 by default, every one on `host`), the cheapest, then the
/// most recent, are given notice with the grace; the holder is told, and the host's
/// agent stops the holder's instances there at the deadline, when the reservation
/// ends. Do-not-interrupt reservations are never taken. An admin names the listing.
#[utoipa::path(post, path = "/v1/reclaims", tag = "market", request_body = ReclaimRequest, responses((status = 202, description = "The reservations given notice (none when none may be taken)", body = Vec<InterruptionView>)))]
pub(crate) async fn reclaim(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<ReclaimRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Vec<InterruptionView>>), ApiError> {
    let Json(body) = body?;
    let taken = ctl.market.reclaim(&caller.0, body).await?;
    Ok((StatusCode::ACCEPTED, Json(taken)))
}

/// Most points `GET /v1/pricing/history` returns.
pub const HISTORY_LIMIT: u32 = 10_000;

/// What capacity sold for (every token): accepted quotes, spot clearings and auction
/// sales, filtered by `kind`, `category`, `provider`, `zone`, `currency`, `from` and
/// `to` (Unix ms), with a chart's series in buckets of `bucket` (`hour` or `day`) and
/// the range of prices that won over the recent period (the guidance beside a bid
/// form). Series and guidance are of one currency: the one asked for, else that of
/// the newest point.
#[utoipa::path(get, path = "/v1/pricing/history", tag = "market", params(
    ("kind" = Option<String>, Query, description = "spot, auction or quote"),
    ("category" = Option<String>, Query, description = "A size category"),
    ("provider" = Option<String>, Query, description = "A provider's account"),
    ("zone" = Option<String>, Query, description = "An availability zone"),
    ("currency" = Option<String>, Query, description = "A currency"),
    ("from" = Option<i64>, Query, description = "From this instant, Unix ms (inclusive)"),
    ("to" = Option<i64>, Query, description = "Until this instant, Unix ms (exclusive)"),
    ("bucket" = Option<String>, Query, description = "hour (default) or day"),
), responses((status = 200, description = "The prices, the chart's series and the guidance", body = PriceHistory)))]
pub(crate) async fn pricing_history(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<PriceHistory> {
    Ok(Json(price_history(&ctl, query.as_deref()).await?))
}

/// The pricing history a query string asks for (shared with the console).
pub(crate) async fn price_history(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<PriceHistory, ApiError> {
    let pairs = crate::http::form_pairs(query.unwrap_or(""));
    let q = HistoryQuery::parse(&pairs).map_err(super::resell::invalid)?;
    let points = ctl.app.store.price_history(&q, HISTORY_LIMIT).await?;
    let currency = q
        .currency
        .clone()
        .or_else(|| points.last().map(|p| p.currency.clone()));
    let (series, guidance) = match &currency {
        Some(c) => (
            surplus_market::history::series(&points, c, q.bucket),
            // Up to and including this instant: a price recorded now counts.
            surplus_market::history::guidance(
                &points,
                c,
                ctl.app.clock.now_ms().saturating_add(1),
                ctl.app.config.market.guidance_window.as_millis() as i64,
            ),
        ),
        None => (Vec::new(), None),
    };
    Ok(PriceHistory {
        points,
        series,
        guidance,
    })
}

/// Bids on a listing's spot market for the calling client: a maximum price per
/// host-hour and a quantity, filled in part unless `all_or_nothing`. The market
/// clears every `market.spot_period` (10 s by default) and on demand at one uniform
/// price: the highest bids win, ties to the earlier bid, then the lower id; the price
/// is the highest losing bid or the provider minimum, whichever is higher. A bid
/// below the minimum is refused now, not at the clearing. Each host won is a
/// reservation (see `GET /v1/reservations`), price-based: a later clearing that the
/// bid loses gives notice with the listing's grace. A retry with the same
/// `client_token` answers with the bid placed the first time.
#[utoipa::path(post, path = "/v1/bids", tag = "market", request_body = BidRequest, responses(
    (status = 201, description = "The bid (or, for a retry with the same client token, the bid placed the first time)", body = BidView),
    (status = 400, description = "Below the provider minimum, or a bad quantity", body = ErrorBody),
    (status = 402, description = "A prepaid client cannot pay its maximum for an hour", body = ErrorBody),
))]
pub(crate) async fn place_bid(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<BidRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<BidView>), ApiError> {
    let Json(body) = body?;
    let (view, _) = ctl.market.bid(&caller.0, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// The calling client's spot bids, newest first.
#[utoipa::path(get, path = "/v1/bids", tag = "market", responses((status = 200, description = "The caller's bids", body = Vec<BidView>)))]
pub(crate) async fn list_bids(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Vec<BidView>> {
    Ok(Json(ctl.market.bids(&caller.0).await?))
}

fn bid_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a bid id (a UUID)")).with_field("id".into())
    })
}

/// One of the calling client's bids: what the last clearing gave it and the hosts
/// it holds.
#[utoipa::path(get, path = "/v1/bids/{id}", tag = "market", params(("id" = Uuid, Path, description = "The bid")), responses((status = 200, description = "The bid", body = BidView)))]
pub(crate) async fn show_bid(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<BidView> {
    let id = bid_id(&id)?;
    Ok(Json(ctl.market.bid_of(&caller.0, id).await?))
}

/// Cancels a bid: it takes part in no clearing from now on, and the hosts it holds
/// are released (billing stops now; the holder's instances there are stopped and
/// terminated).
#[utoipa::path(post, path = "/v1/bids/{id}/cancel", tag = "market", params(("id" = Uuid, Path, description = "The bid")), responses((status = 200, description = "The cancelled bid", body = BidView)))]
pub(crate) async fn cancel_bid(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<BidView> {
    let id = bid_id(&id)?;
    let view = ctl.market.cancel_bid(&caller.0, id).await?;
    let ctl2 = ctl.clone();
    ctl.app
        .tasks
        .spawn(async move { ctl2.control.stop_unreserved(None).await });
    Ok(Json(view))
}

/// A listing's spot market (every token): the provider minimum, the hosts it sells
/// by spot now, the last clearing's price and time, the next clearing, and the
/// guidance beside a bid form (the range of spot prices that won recently for the
/// provider's category in its zone).
#[utoipa::path(get, path = "/v1/spot/{listing}", tag = "market", params(("listing" = String, Path, description = "The listing")), responses((status = 200, description = "The market", body = SpotView)))]
pub(crate) async fn show_spot(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    Path(listing): Path<String>,
) -> ApiResult<SpotView> {
    Ok(Json(ctl.market.spot(&listing).await?))
}

/// Clears a listing's spot market now (on demand), by its provider or an admin; the
/// periodic schedule stays as it was.
#[utoipa::path(post, path = "/v1/spot/{listing}/clear", tag = "market", params(("listing" = String, Path, description = "The listing")), responses((status = 200, description = "The market after the clearing", body = SpotView)))]
pub(crate) async fn clear_spot(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(listing): Path<String>,
) -> ApiResult<SpotView> {
    Ok(Json(ctl.market.clear_now(&caller.0, &listing).await?))
}

/// Puts one host of a listing up for auction (its provider, or an admin): English
/// ascending (reserve, minimum increment, optional buy-now price that ends it at
/// once), Dutch descending (start price, decrement every `every_ms`, floor), sealed
/// first-price or sealed second-price (reserve; bids hidden until the close). The
/// reserve or floor is at least the provider minimum. At the end (or at a buy-now or
/// a Dutch take) it closes once, and the winner gets a reservation of a free host at
/// its price, for `term_hours` or until released.
#[utoipa::path(post, path = "/v1/auctions", tag = "market", request_body = AuctionRequest, responses(
    (status = 201, description = "The auction", body = AuctionView),
    (status = 400, description = "A parameter the engine refuses, named", body = ErrorBody),
))]
pub(crate) async fn create_auction(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<AuctionRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AuctionView>), ApiError> {
    let Json(body) = body?;
    let view = ctl.market.create_auction(&caller.0, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Auctions, newest first (every token): `listing` for one listing's, `open=true`
/// for those not closed. A sealed auction shows no bid until its close.
#[utoipa::path(get, path = "/v1/auctions", tag = "market", params(
    ("listing" = Option<String>, Query, description = "Only this listing's"),
    ("open" = Option<bool>, Query, description = "Only those not closed"),
), responses((status = 200, description = "The auctions", body = Vec<AuctionView>)))]
pub(crate) async fn list_auctions(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<AuctionView>> {
    let mut listing = None;
    let mut open = false;
    for (key, value) in crate::http::form_pairs(query.as_deref().unwrap_or("")) {
        match key.as_str() {
            "listing" => listing = Some(value),
            "open" => {
                open = value.parse().map_err(|_| {
                    ApiError::bad_request(format!("open: {value:?} is not true or false"))
                        .with_field("open".into())
                })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "{other}: not a filter of auctions (listing, open)"
                ))
                .with_field(other.into()));
            }
        }
    }
    Ok(Json(ctl.market.auctions(listing.as_deref(), open).await?))
}

fn auction_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not an auction id (a UUID)"))
            .with_field("id".into())
    })
}

/// One auction (every token): its engine, phase, current and lowest acceptable
/// price, its bids (a sealed auction's only after the close) and its outcome.
#[utoipa::path(get, path = "/v1/auctions/{id}", tag = "market", params(("id" = Uuid, Path, description = "The auction")), responses((status = 200, description = "The auction", body = AuctionView)))]
pub(crate) async fn show_auction(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AuctionView> {
    let id = auction_id(&id)?;
    Ok(Json(ctl.market.auction(id).await?))
}

/// Bids on an auction for the calling client, judged now: refused with the rule and
/// the numbers when it is before the start (`not_started`), at or after the end
/// (`ended`), below the reserve (`reserve`), below the current price plus the
/// increment (`increment`) or below the Dutch price now (`price`). A buy-now bid or
/// a Dutch take closes the auction at once. A retry with the same `client_token` is
/// the same bid.
#[utoipa::path(post, path = "/v1/auctions/{id}/bids", tag = "market", params(("id" = Uuid, Path, description = "The auction")), request_body = AuctionBidRequest, responses(
    (status = 201, description = "The auction after the bid", body = AuctionView),
    (status = 409, description = "Refused by the engine's rule, named", body = ErrorBody),
))]
pub(crate) async fn bid_auction(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<AuctionBidRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<AuctionView>), ApiError> {
    let id = auction_id(&id)?;
    let Json(body) = body?;
    let view = ctl.market.bid_auction(&caller.0, id, body).await?;
    Ok((StatusCode::CREATED, Json(view)))
}
