//! Providers of capacity and their business agreements (issue 15's policy): admins
//! record them; a provider reads its own.

use surplus_api::resell::*;
use surplus_market::resell::{FieldError, validate_agreement, validate_provider};

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
    ]
}

/// The supported platforms in force: as stored, else [`Platforms::standard`].
pub(crate) async fn platforms(ctl: &Controller) -> Result<Platforms, ApiError> {
    match ctl.app.store.setting("platforms").await? {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("platforms: {e}")).into()),
        None => Ok(Platforms::standard()),
    }
}

/// The size categories in force: as stored, else [`Categories::standard`].
pub(crate) async fn categories(ctl: &Controller) -> Result<Categories, ApiError> {
    match ctl.app.store.setting("categories").await? {
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("categories: {e}")).into()),
        None => Ok(Categories::standard()),
    }
}

/// The platforms a resell request may claim (every token may read them).
#[utoipa::path(get, path = "/v1/platforms", tag = "resell", responses((status = 200, description = "The supported platforms", body = Platforms)))]
async fn get_platforms(
    State(ctl): State<Arc<Controller>>,
    _caller: Caller,
) -> ApiResult<Platforms> {
    Ok(Json(platforms(&ctl).await?))
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
    Ok(Json(categories(&ctl).await?))
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
fn invalid(errors: Vec<FieldError>) -> ApiError {
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
async fn put_provider(
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
    let q = billing::query_map(query.as_deref(), &["provider"])?;
    let provider = match caller.0.role {
        Role::Admin => q.get("provider").cloned(),
        _ => {
            if let Some(p) = q.get("provider") {
                may_read(&caller, p)?;
            }
            Some(caller.0.account.clone())
        }
    };
    Ok(Json(ctl.app.store.agreements(provider.as_deref()).await?))
}

/// Makes a business agreement with a provider (admins): its validity, the kinds of
/// capacity and pricing modes it allows, the commission and the most hosts.
#[utoipa::path(post, path = "/v1/agreements", tag = "resell", request_body = AgreementRequest, responses((status = 201, description = "The agreement", body = Agreement)))]
async fn create_agreement(
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
async fn end_agreement(
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
