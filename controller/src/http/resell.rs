//! Providers of capacity and their business agreements (issue 15's policy): admins
//! record them; a provider reads its own.

use surplus_api::resell::*;
use surplus_market::resell::{validate_agreement, validate_provider};

use crate::store::ResellRow;

use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("GET", "/v1/providers", Token, list_providers),
        route("GET", "/v1/providers/{account}", Token, show_provider),
        route("PUT", "/v1/providers/{account}", Token, put_provider),
        route("GET", "/v1/agreements", Token, list_agreements),
        route("POST", "/v1/agreements", Token, create_agreement),
        route("POST", "/v1/agreements/{id}/end", Token, end_agreement),
        route("GET", "/v1/platforms", Token, get_platforms),
        route("PUT", "/v1/platforms", Token, put_platforms),
        route("GET", "/v1/categories", Token, get_categories),
        route("PUT", "/v1/categories", Token, put_categories),
        route("POST", "/v1/resell-requests", Token, submit_request),
        route("GET", "/v1/resell-requests", Token, list_requests),
        route("GET", "/v1/resell-requests/{id}", Token, show_request),
        route("GET", "/v1/listings", Token, search_listings),
        route("GET", "/v1/listings/{id}", Token, show_listing),
        route("GET", "/v1/notifications", Token, notifications),
        route("POST", "/v1/listings/{id}/retest", Token, retest_listing),
        route("POST", "/v1/ratings", Token, rate),
        route("GET", "/v1/webhook", Token, get_webhook),
        route("PUT", "/v1/webhook", Token, put_webhook),
        route("GET", "/v1/ratings", Token, list_ratings),
    ]
}

/// The platforms a resell request may claim (every token may read them).
#[utoipa::path(get, path = "/v1/platforms", tag = "resell", responses((status = 200, description = "The supported platforms", body = Platforms)))]
async fn get_platforms(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
) -> ApiResult<Platforms> {
    Ok(Json(ctl.resell.platforms().await?))
}

/// Replaces the supported platforms (admins).
#[utoipa::path(put, path = "/v1/platforms", tag = "resell", request_body = Platforms, responses((status = 200, description = "The supported platforms from now on", body = Platforms)))]
async fn put_platforms(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<Platforms>, JsonRejection>,
) -> ApiResult<Platforms> {
    caller.require(Role::Admin)?;
    let Json(p) = body?;
    let problems = p.validate();
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let text = serde_json::to_string(&p).expect("platforms serialize");
    ctl.app
        .store
        .put_setting("platforms", &text, ctl.app.clock.now_ms())
        .await?;
    Ok(Json(p))
}

/// The size categories, smallest first, shared by primary and third-party capacity
/// (every token may read them).
#[utoipa::path(get, path = "/v1/categories", tag = "resell", responses((status = 200, description = "The size categories", body = Categories)))]
async fn get_categories(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
) -> ApiResult<Categories> {
    Ok(Json(ctl.resell.categories().await?))
}

/// Replaces the size categories (admins): smallest first, every threshold at least
/// the previous one's and one above it.
#[utoipa::path(put, path = "/v1/categories", tag = "resell", request_body = Categories, responses((status = 200, description = "The size categories from now on", body = Categories)))]
async fn put_categories(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<Categories> {
    caller.require(Role::Admin)?;
    let Json(value) = body?;
    // Read here rather than by the extractor, so that a list out of order is a 400
    // naming the category rather than a deserialization message.
    let list: Vec<Category> =
        serde_json::from_value(value.get("list").cloned().unwrap_or_default())
            .map_err(|e| ApiError::bad_request(format!("list: {e}")).with_field("list".into()))?;
    let c = Categories::new(list)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("list".into()))?;
    let text = serde_json::to_string(&c).expect("categories serialize");
    ctl.app
        .store
        .put_setting("categories", &text, ctl.app.clock.now_ms())
        .await?;
    Ok(Json(c))
}

/// A 400 naming every bad field at once (the first in `field`, all in `problems`).
pub(super) fn invalid(errors: Vec<FieldError>) -> ApiError {
    let message = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ");
    let first = errors[0].field.clone();
    ApiError::bad_request(message)
        .with_field(first)
        .with_detail("problems", &errors)
}

/// Whose records a listing answers with: `?provider=` (every provider without) for
/// admins, the caller's own for a provider (naming another is refused).
fn provider_scope(caller: &Caller, query: Option<&str>) -> Result<Option<String>, ApiError> {
    let q = billing::query_map(query, &["provider"])?;
    match caller.0.role {
        Role::Admin => Ok(q.get("provider").cloned()),
        _ => {
            if let Some(p) = q.get("provider") {
                may_read(caller, p)?;
            }
            Ok(Some(caller.0.account.clone()))
        }
    }
}

/// A provider sees only itself; admins everyone; others nothing.
fn may_read(caller: &Caller, account: &str) -> Result<(), ApiError> {
    caller.require(Role::Provider)?;
    if caller.0.role == Role::Provider && caller.0.account != account {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("provider {account} is not this account"),
        ));
    }
    Ok(())
}

/// Every provider (admins), or the caller's own profile (providers).
#[utoipa::path(get, path = "/v1/providers", tag = "resell", responses((status = 200, description = "Providers by account", body = Vec<Provider>)))]
pub(crate) async fn list_providers(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Vec<Provider>> {
    caller.require(Role::Provider)?;
    let all = ctl.app.store.providers().await?;
    Ok(Json(
        all.into_iter()
            .filter(|p| caller.0.role == Role::Admin || p.account == caller.0.account)
            .collect(),
    ))
}

/// One provider's profile (admins, or the provider itself).
#[utoipa::path(get, path = "/v1/providers/{account}", tag = "resell", params(("account" = String, Path, description = "The provider's account")), responses((status = 200, description = "The provider", body = Provider)))]
async fn show_provider(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(account): Path<String>,
) -> ApiResult<Provider> {
    may_read(&caller, &account)?;
    ctl.app
        .store
        .provider(&account)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("provider {account} not found")))
}

/// Records a provider or replaces its profile (admins): its name, contact, data
/// centers (availability zones) and place on the accepted-providers list.
#[utoipa::path(put, path = "/v1/providers/{account}", tag = "resell", params(("account" = String, Path, description = "The provider's account")), request_body = ProviderRequest, responses((status = 200, description = "The provider as stored", body = Provider)))]
pub(crate) async fn put_provider(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(account): Path<String>,
    body: Result<Json<ProviderRequest>, JsonRejection>,
) -> ApiResult<Provider> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    surplus_protocol::control::validate_name("account", &account)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field(e.field))?;
    let now = ctl.app.clock.now_ms();
    let provider = Provider {
        account,
        name: body.name,
        contact: body.contact,
        zones: body.zones,
        accepted: body.accepted,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let problems = validate_provider(&provider);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    Ok(Json(ctl.app.store.put_provider(&provider).await?))
}

/// Agreements, newest first: every one or one provider's (admins), the caller's own
/// (providers).
#[utoipa::path(get, path = "/v1/agreements", tag = "resell", params(("provider" = Option<String>, Query, description = "One provider (admins)")), responses((status = 200, description = "Agreements, newest first", body = Vec<Agreement>)))]
pub(crate) async fn list_agreements(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<Agreement>> {
    caller.require(Role::Provider)?;
    let provider = provider_scope(&caller, query.as_deref())?;
    Ok(Json(ctl.app.store.agreements(provider.as_deref()).await?))
}

/// Makes a business agreement with a provider (admins): its validity, the kinds of
/// capacity and pricing modes it allows, the commission and the most hosts.
#[utoipa::path(post, path = "/v1/agreements", tag = "resell", request_body = AgreementRequest, responses((status = 201, description = "The agreement", body = Agreement)))]
pub(crate) async fn create_agreement(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<AgreementRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Agreement>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    let now = ctl.app.clock.now_ms();
    let agreement = Agreement {
        id: surplus_protocol::control::new_id("agr-"),
        provider: body.provider,
        valid_from_ms: body.valid_from_ms.unwrap_or(now),
        valid_until_ms: body.valid_until_ms,
        resource_kinds: body.resource_kinds,
        pricing_modes: body.pricing_modes,
        commission_bps: body.commission_bps,
        max_hosts: body.max_hosts,
        max_cpus: body.max_cpus,
        created_at_ms: now,
    };
    let problems = validate_agreement(&agreement);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    match ctl.app.store.create_agreement(&agreement).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(agreement))),
        Err(StoreError::NotFound(what)) => Err(ApiError::bad_request(format!(
            "provider: {what} is not recorded (PUT /v1/providers/{{account}} first)"
        ))
        .with_field("provider".into())),
        Err(e) => Err(e.into()),
    }
}

/// Ends an agreement now (admins); 409 when it is no longer in force.
#[utoipa::path(post, path = "/v1/agreements/{id}/end", tag = "resell", params(("id" = String, Path, description = "The agreement")), responses((status = 200, description = "The agreement, ended", body = Agreement)))]
pub(crate) async fn end_agreement(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Agreement> {
    caller.require(Role::Admin)?;
    let now = ctl.app.clock.now_ms();
    match ctl.app.store.end_agreement(&id, now).await? {
        Some(a) => Ok(Json(a)),
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("agreement {id} is no longer in force"),
        )),
    }
}

/// A request as the API shows it, with the listings it made.
pub(crate) async fn resell_view(ctl: &Controller, row: ResellRow) -> Result<ResellView, ApiError> {
    Ok(view_with(row, &ctl.app.store.listings().await?))
}

/// A request with the listings of `listings` it made.
fn view_with(row: ResellRow, listings: &[Listing]) -> ResellView {
    ResellView {
        id: row.id,
        provider: row.provider,
        stage: row.pipeline.stage,
        listings: listings
            .iter()
            .filter(|l| l.request == row.id)
            .map(|l| l.id.clone())
            .collect(),
        pipeline: row.pipeline,
        document: row.document,
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    }
}

/// Submits a resell request (FIG. 2): a provider for itself, an admin for the
/// provider it names with `?provider=`. Every problem of the document, and every host
/// that is not an agent enrolled for the provider, is named with its field in one
/// 400, and nothing is stored; a request taken is 202 and moves through the pipeline
/// in the background.
#[utoipa::path(post, path = "/v1/resell-requests", tag = "resell", params(("provider" = Option<String>, Query, description = "The provider (admins only; a provider submits for itself)")), request_body = ResellRequest, responses((status = 202, description = "The request, taken; follow it with GET /v1/resell-requests/{id}", body = ResellView)))]
pub(crate) async fn submit_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
    body: Result<Json<ResellRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ResellView>), ApiError> {
    caller.require(Role::Provider)?;
    let q = billing::query_map(query.as_deref(), &["provider"])?;
    let provider = match (caller.0.role, q.get("provider")) {
        (Role::Admin, Some(p)) => p.clone(),
        (Role::Admin, None) => {
            return Err(ApiError::bad_request(
                "provider: an admin names the provider it submits for (?provider=ACCOUNT)",
            )
            .with_field("provider".into()));
        }
        (_, Some(p)) if *p != caller.0.account => {
            may_read(&caller, p)?;
            unreachable!("may_read refuses another provider")
        }
        _ => caller.0.account.clone(),
    };
    let Json(document) = body?;
    match ctl.resell.submit(&provider, document).await {
        Ok(row) => Ok((StatusCode::ACCEPTED, Json(resell_view(&ctl, row).await?))),
        Err(crate::resell::SubmitError::Invalid(problems)) => Err(invalid(problems)),
        Err(crate::resell::SubmitError::Store(e)) => Err(e.into()),
    }
}

/// Resell requests, newest first: every one or one provider's (admins), the caller's
/// own (providers).
#[utoipa::path(get, path = "/v1/resell-requests", tag = "resell", params(("provider" = Option<String>, Query, description = "One provider (admins)")), responses((status = 200, description = "Requests, newest first", body = Vec<ResellView>)))]
pub(crate) async fn list_requests(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<ResellView>> {
    caller.require(Role::Provider)?;
    let provider = provider_scope(&caller, query.as_deref())?;
    let listings = ctl.app.store.listings().await?;
    Ok(Json(
        ctl.app
            .store
            .resell_requests(provider.as_deref())
            .await?
            .into_iter()
            .map(|row| view_with(row, &listings))
            .collect(),
    ))
}

/// Loads a request its caller may read (its provider, admins).
pub(crate) async fn load_request(
    ctl: &Controller,
    caller: &Caller,
    id: &str,
) -> Result<ResellRow, ApiError> {
    caller.require(Role::Provider)?;
    let not_found = || ApiError::not_found(format!("resell request {id} not found"));
    let uuid: uuid::Uuid = id.parse().map_err(|_| not_found())?;
    let row = ctl
        .app
        .store
        .resell_request(uuid)
        .await?
        .ok_or_else(not_found)?;
    may_read(caller, &row.provider)?;
    Ok(row)
}

/// One resell request with every step of its pipeline (its provider, admins).
#[utoipa::path(get, path = "/v1/resell-requests/{id}", tag = "resell", params(("id" = Uuid, Path, description = "The request")), responses((status = 200, description = "The request", body = ResellView)))]
pub(crate) async fn show_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ResellView> {
    let row = load_request(&ctl, &caller, &id).await?;
    Ok(Json(resell_view(&ctl, row).await?))
}

/// The offered listings that match every filter, in the asked order (every token).
pub(crate) async fn find_listings(
    ctl: &Controller,
    query: Option<&str>,
) -> Result<Vec<Listing>, ApiError> {
    let pairs = crate::http::form_pairs(query.unwrap_or(""));
    let q = ListingQuery::parse(&pairs).map_err(invalid)?;
    let mut all = ctl.app.store.listings().await?;
    // Only what a provider may sell now: accepted, with an agreement in force.
    let selling = ctl.market.selling_providers().await?;
    all.retain(|l| selling.contains(&l.provider));
    decorate(ctl, &mut all).await?;
    let weights = surplus_market::catalog::RankWeights::default();
    Ok(surplus_market::listings::search(&all, &q, &weights)
        .into_iter()
        .cloned()
        .collect())
}

/// Searches the offered listings (every token) of providers that may sell now (on the
/// accepted list, with an agreement in force): filters `kind`, `category`, `zone`,
/// `provider`, `pricing_mode`, `interruptibility`, `compat` (at least), `min_rating`,
/// `min_score`, `max_price`, and `sort` (`rank`, `price`, `score`, `rating`). A
/// parameter that is not one of these is a 400 naming it.
#[utoipa::path(get, path = "/v1/listings", tag = "resell", params(
    ("kind" = Option<String>, Query, description = "compute, storage or bandwidth"),
    ("category" = Option<String>, Query, description = "A size category"),
    ("zone" = Option<String>, Query, description = "An availability zone"),
    ("provider" = Option<String>, Query, description = "A provider's account"),
    ("pricing_mode" = Option<String>, Query, description = "spot, auction, immediate, on_demand or reserved"),
    ("interruptibility" = Option<String>, Query, description = "dont_care, price_based, fulfilment_based or no_interruptions"),
    ("compat" = Option<String>, Query, description = "At least this compatibility level: fully, highly, somewhat or incompatible"),
    ("min_rating" = Option<f64>, Query, description = "At least this average rating, 1 to 5"),
    ("min_score" = Option<f64>, Query, description = "At least this composite score"),
    ("max_price" = Option<u64>, Query, description = "At most this hourly price, minor units (with `currency`)"),
    ("currency" = Option<String>, Query, description = "Priced in this currency (prices compare within one)"),
    ("sort" = Option<String>, Query, description = "rank (default), price, score or rating"),
), responses((status = 200, description = "The matching listings, in order", body = Vec<Listing>)))]
pub(crate) async fn search_listings(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<Listing>> {
    Ok(Json(find_listings(&ctl, query.as_deref()).await?))
}

/// A listing with its hosts' validation evidence (every token).
pub(crate) async fn listing_view(ctl: &Controller, id: &str) -> Result<ListingView, ApiError> {
    let mut listing = ctl
        .app
        .store
        .listing(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("listing {id} not found")))?;
    decorate(ctl, std::slice::from_mut(&mut listing)).await?;
    let row = ctl.app.store.resell_request(listing.request).await?;
    let evidence = listing
        .hosts
        .iter()
        .map(|host| {
            let progress = row
                .as_ref()
                .and_then(|r| r.pipeline.hosts.iter().find(|h| h.host == *host));
            HostEvidence {
                host: *host,
                run: progress.and_then(|p| p.run),
                assessment: progress.and_then(|p| p.assessment.clone()),
            }
        })
        .collect();
    Ok(ListingView { listing, evidence })
}

/// One listing with the validation evidence of its hosts (every token).
#[utoipa::path(get, path = "/v1/listings/{id}", tag = "resell", params(("id" = String, Path, description = "The listing")), responses((status = 200, description = "The listing and its evidence", body = ListingView)))]
pub(crate) async fn show_listing(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ListingView> {
    Ok(Json(listing_view(&ctl, &id).await?))
}

/// The caller's newest `limit` notifications (default 100), oldest first.
pub(crate) async fn notifications_of(
    ctl: &Controller,
    principal: &crate::store::Principal,
    limit: u32,
) -> Result<Vec<NotificationView>, ApiError> {
    let mut out = Vec::new();
    for n in ctl
        .app
        .store
        .notices(&recipient_of(principal), limit)
        .await?
    {
        let attempts = match n.attempts {
            0 => Vec::new(),
            _ => ctl.app.store.attempts(&n.notice.key).await?,
        };
        out.push(NotificationView {
            key: n.notice.key,
            kind: n.notice.kind,
            body: n.notice.body,
            created_at_ms: n.created_at_ms,
            delivered_at_ms: n.delivered_at_ms,
            attempts,
            next_attempt_at_ms: n.next_attempt_at_ms,
        });
    }
    Ok(out)
}

/// The caller's notifications from the outbox, oldest first: a request accepted or
/// rejected, and later advisories, delistings and relistings.
#[utoipa::path(get, path = "/v1/notifications", tag = "resell", params(("limit" = Option<u32>, Query, description = "At most this many (default 100, at most 1000)")), responses((status = 200, description = "The newest notifications, oldest first", body = Vec<NotificationView>)))]
pub(crate) async fn notifications(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<NotificationView>> {
    let q = billing::query_map(query.as_deref(), &["limit"])?;
    let limit = match q.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: {v:?} is not a number from 1 to 1000"))
                    .with_field("limit".into())
            })?,
    };
    Ok(Json(notifications_of(&ctl, &caller.0, limit).await?))
}

/// Fills in what a listing shows that changes by the minute: its provider's average
/// rating over the window, its hosts' measured uptime (the weakest host's) and their
/// CPUs' utilisation over the window from metering.
async fn decorate(ctl: &Controller, listings: &mut [Listing]) -> Result<(), ApiError> {
    if listings.is_empty() {
        return Ok(());
    }
    let now = ctl.app.clock.now_ms();
    let since = now - ctl.app.config.resell.rating_window.as_millis() as i64;
    let ratings = ctl.app.store.ratings(None).await?;
    let mut by_provider: std::collections::BTreeMap<&str, Vec<surplus_market::quality::Rating>> =
        Default::default();
    for r in &ratings {
        by_provider
            .entry(r.provider.as_str())
            .or_default()
            .push(r.clone());
    }
    let mut uptime: std::collections::BTreeMap<uuid::Uuid, Option<f64>> = Default::default();
    // Each host's metered (busy, total) CPU time over the window.
    let mut cpu: std::collections::BTreeMap<uuid::Uuid, (i64, i64)> = Default::default();
    for l in listings.iter() {
        for h in &l.hosts {
            if !cpu.contains_key(h) {
                let rows = ctl
                    .app
                    .store
                    .usage(&crate::store::UsageQuery {
                        agent_id: Some(*h),
                        subject: Some(surplus_protocol::usage::Subject::Host.as_str().to_owned()),
                        account: None,
                        owner_role: None,
                        meter: None,
                        from_ms: since,
                        to_ms: now,
                        bucket_ms: 86_400_000,
                    })
                    .await?;
                let sum = |meter: &str| {
                    rows.iter()
                        .filter(|r| r.meter == meter)
                        .filter_map(|r| r.total)
                        .fold(0_i64, i64::saturating_add)
                };
                use surplus_protocol::usage::meters;
                cpu.insert(
                    *h,
                    (
                        sum(meters::HOST_CPU_BUSY_MS),
                        sum(meters::HOST_CPU_TOTAL_MS),
                    ),
                );
            }
            if !uptime.contains_key(h) {
                let ratio = ctl.app.store.agent(*h).await?.and_then(|a| {
                    crate::registry::measured_uptime(
                        a.first_seen_ms,
                        a.online_total_ms,
                        a.online_since_ms,
                        now,
                    )
                    .1
                });
                uptime.insert(*h, ratio);
            }
        }
    }
    for l in listings.iter_mut() {
        l.rating = by_provider
            .get(l.provider.as_str())
            .and_then(|r| surplus_market::quality::average(r, since));
        l.uptime = l
            .hosts
            .iter()
            .filter_map(|h| uptime.get(h).copied().flatten())
            .reduce(f64::min);
        let (busy, total) = l
            .hosts
            .iter()
            .filter_map(|h| cpu.get(h))
            .fold((0_i64, 0_i64), |(b, t), (hb, ht)| {
                (b.saturating_add(*hb), t.saturating_add(*ht))
            });
        l.utilisation = surplus_market::quality::utilisation(busy, total);
    }
    Ok(())
}

/// Asks for a re-test of a listing's hosts now (admins, or the listing's provider);
/// follow it on the listing (`retest`, `last_retest_at_ms`) and in the provider's
/// notifications.
#[utoipa::path(post, path = "/v1/listings/{id}/retest", tag = "resell", params(("id" = String, Path, description = "The listing")), responses((status = 202, description = "The re-test is asked for", body = ListingView)))]
pub(crate) async fn retest_listing(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<ListingView>), ApiError> {
    caller.require(Role::Provider)?;
    let view = listing_view(&ctl, &id).await?;
    may_read(&caller, &view.listing.provider)?;
    if !ctl.resell.request_retest(&id).await? {
        return Err(ApiError::not_found(format!("listing {id} not found")));
    }
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Rates the provider whose capacity ran one of the caller's instances (clients):
/// a score from 1 to 5 and a comment; one rating per client and instance (409 for a
/// second).
#[utoipa::path(post, path = "/v1/ratings", tag = "resell", request_body = RatingRequest, responses((status = 201, description = "The rating", body = Rating)))]
pub(crate) async fn rate(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<RatingRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Rating>), ApiError> {
    caller.require(Role::Client)?;
    let not_yours = |m: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", m);
    if caller.0.role != Role::Client {
        // An admin runs no instances of its own: nothing it could rate.
        return Err(not_yours(
            "only clients rate the capacity their instances ran on".into(),
        ));
    }
    let Json(body) = body?;
    let instance = ctl
        .app
        .store
        .instance(&body.instance)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("instance {} not found", body.instance)))?;
    let host = ctl.app.store.agent(instance.agent_id).await?;
    let provider = host
        .map(|a| crate::billing::provider_of(&a.labels))
        .unwrap_or_default();
    let owner = if instance.owner_role == Role::Client {
        instance.account.as_str()
    } else {
        ""
    };
    let ran = instance.started_at_ms.is_some();
    surplus_market::quality::check_rating(
        &caller.0.account,
        owner,
        &provider,
        ran,
        body.score,
        &body.comment,
    )
    .map_err(|e| match e {
        surplus_market::quality::RatingError::Invalid { field, message } => {
            ApiError::bad_request(format!("{field}: {message}")).with_field(field.into())
        }
        surplus_market::quality::RatingError::NotYours(m) => not_yours(m),
    })?;
    let rating = Rating {
        client: caller.0.account.clone(),
        instance: body.instance,
        provider,
        score: body.score,
        comment: body.comment,
        created_at_ms: ctl.app.clock.now_ms(),
    };
    if !ctl.app.store.put_rating(&rating).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("instance {} is rated already", rating.instance),
        ));
    }
    Ok((StatusCode::CREATED, Json(rating)))
}

/// Ratings, newest first: of one provider with `?provider=`, else every one (every
/// token); who gave a rating, and for which instance, only admins and that client see.
#[utoipa::path(get, path = "/v1/ratings", tag = "resell", params(("provider" = Option<String>, Query, description = "One provider's")), responses((status = 200, description = "Ratings, newest first", body = Vec<Rating>)))]
pub(crate) async fn list_ratings(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<Rating>> {
    let q = billing::query_map(query.as_deref(), &["provider"])?;
    let me = &caller.0;
    Ok(Json(
        ctl.app
            .store
            .ratings(q.get("provider").map(String::as_str))
            .await?
            .into_iter()
            .map(|r| {
                let theirs =
                    me.role == Role::Admin || (me.role == Role::Client && me.account == r.client);
                if theirs {
                    r
                } else {
                    Rating {
                        client: String::new(),
                        instance: String::new(),
                        ..r
                    }
                }
            })
            .collect(),
    ))
}

/// The outbox recipient a principal reads its notices as (`provider:bob`).
pub(crate) fn recipient_of(p: &crate::store::Principal) -> String {
    format!("{}:{}", p.role.as_str(), p.account)
}

/// Where the caller's notifications are POSTed, if anywhere.
#[utoipa::path(get, path = "/v1/webhook", tag = "resell", responses((status = 200, description = "The caller's webhook", body = Webhook)))]
pub(crate) async fn get_webhook(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Webhook> {
    Ok(Json(Webhook {
        url: ctl.app.store.webhook(&recipient_of(&caller.0)).await?,
    }))
}

/// Sets (or with `null` removes) the caller's webhook: every notification is POSTed
/// to it as JSON, at least once, retried with backoff; each attempt is listed with the
/// notification.
#[utoipa::path(put, path = "/v1/webhook", tag = "resell", request_body = Webhook, responses((status = 200, description = "The caller's webhook from now on", body = Webhook)))]
pub(crate) async fn put_webhook(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<Webhook>, JsonRejection>,
) -> ApiResult<Webhook> {
    let Json(w) = body?;
    if let Some(url) = &w.url {
        crate::notices::check_url(url, ctl.app.config.webhook_allow_private)
            .map_err(|e| ApiError::bad_request(format!("url: {e}")).with_field("url".into()))?;
    }
    ctl.app
        .store
        .set_webhook(
            &recipient_of(&caller.0),
            w.url.as_deref(),
            ctl.app.clock.now_ms(),
        )
        .await?;
    Ok(Json(w))
}
