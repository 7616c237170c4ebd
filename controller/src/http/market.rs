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
                    "unknown" => StatusCode::NOT_FOUND,
                    "minimum" | "term" | "validity" | "not_cheaper" | "units" => {
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
