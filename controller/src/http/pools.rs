//! Private pools (issue 17): a pool owner's pools, their slots and members, the
//! members' requests, and the usage and charges per member.

use surplus_api::pools::*;

use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("POST", "/v1/pools", Token, create_pool),
        route("GET", "/v1/pools", Token, list_pools),
        route("GET", "/v1/pools/{id}", Token, show_pool),
        route("DELETE", "/v1/pools/{id}", Token, dissolve_pool),
        route("PUT", "/v1/pools/{id}/policy", Token, set_pool_policy),
        route("POST", "/v1/pools/{id}/entities", Token, invite_pool_entity),
        route("POST", "/v1/pools/{id}/join", Token, join_pool),
        route("PUT", "/v1/pools/{id}/limits", Token, set_pool_limits),
        route("POST", "/v1/pools/{id}/leave", Token, leave_pool),
        route("POST", "/v1/pools/{id}/slots", Token, add_pool_slot),
        route(
            "DELETE",
            "/v1/pools/{id}/slots/{slot}",
            Token,
            remove_pool_slot,
        ),
        route("POST", "/v1/pools/{id}/members", Token, put_pool_member),
        route(
            "DELETE",
            "/v1/pools/{id}/members/{member}",
            Token,
            remove_pool_member,
        ),
        route("POST", "/v1/pools/{id}/credits", Token, credit_pool_member),
        route("POST", "/v1/pools/{id}/requests", Token, place_pool_request),
        route("GET", "/v1/pools/{id}/requests", Token, list_pool_requests),
        route("GET", "/v1/pools/{id}/usage", Token, pool_usage),
        route("POST", "/v1/pools/{id}/cycle", Token, cycle_pool),
        route("POST", "/v1/pool-accounts", Token, grant_pool_account),
        route("GET", "/v1/pool-requests/{id}", Token, show_pool_request),
        route(
            "POST",
            "/v1/pool-requests/{id}/bid",
            Token,
            rebid_pool_request,
        ),
        route(
            "POST",
            "/v1/pool-requests/{id}/cancel",
            Token,
            cancel_pool_request,
        ),
        route(
            "GET",
            "/v1/pool-requests/{id}/explain",
            Token,
            explain_pool_request,
        ),
    ]
}

fn uuid_of(what: &str, field: &str, text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a {what} id (a UUID)"))
            .with_field(field.into())
    })
}

/// Makes a pool (pool owners): its policy, bidding method, currency, cycle and
/// notice periods and burst policy; slots and members are added after.
#[utoipa::path(post, path = "/v1/pools", tag = "pools", request_body = PoolCreate, responses((status = 201, description = "The pool", body = PoolView)))]
pub(crate) async fn create_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<PoolCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.create_pool(&caller.0, body).await?),
    ))
}

/// The pools the caller owns (pool owners), or is a member of (clients); all of
/// them for admins.
#[utoipa::path(get, path = "/v1/pools", tag = "pools", responses((status = 200, description = "The pools", body = Vec<PoolView>)))]
pub(crate) async fn list_pools(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Vec<PoolView>> {
    Ok(Json(ctl.market.pools(&caller.0).await?))
}

/// One pool, with its slots (and who holds each) and members: for its owner and
/// its members only (404 for anyone else).
#[utoipa::path(get, path = "/v1/pools/{id}", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), responses((status = 200, description = "The pool", body = PoolView)))]
pub(crate) async fn show_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.pool(&caller.0, id).await?))
}

/// Changes a pool's settings (its owner): what is left out stays; they apply from
/// the next cycle.
#[utoipa::path(put, path = "/v1/pools/{id}/policy", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = PoolSettingsBody, responses((status = 200, description = "The pool", body = PoolView)))]
pub(crate) async fn set_pool_policy(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<PoolSettingsBody>, JsonRejection>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok(Json(ctl.market.set_pool_policy(&caller.0, id, body).await?))
}

/// Puts a slot in the pool (its owner): a reservation (on-demand, long-term or
/// spot) one of the owner's accounts holds, or a host one of them provides that no
/// listing sells. 409 `slot_taken` when it is in a pool already.
#[utoipa::path(post, path = "/v1/pools/{id}/slots", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = SlotRequest, responses((status = 201, description = "The pool", body = PoolView)))]
pub(crate) async fn add_pool_slot(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<SlotRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.add_pool_slot(&caller.0, id, body.slot).await?),
    ))
}

/// Takes a slot back (its owner): the member holding it keeps it for the pool's
/// notice period, then it leaves the pool.
#[utoipa::path(delete, path = "/v1/pools/{id}/slots/{slot}", tag = "pools", params(("id" = Uuid, Path, description = "The pool"), ("slot" = Uuid, Path, description = "The slot")), responses((status = 200, description = "The pool", body = PoolView)))]
pub(crate) async fn remove_pool_slot(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path((id, slot)): Path<(String, String)>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    let slot = uuid_of("slot", "slot", &slot)?;
    Ok(Json(
        ctl.market.remove_pool_slot(&caller.0, id, slot).await?,
    ))
}

/// Lets a client account in (its owner), with its name and organisation, up to the
/// pool's most users (409 `pool_full_of_users`).
#[utoipa::path(post, path = "/v1/pools/{id}/members", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = MemberRequest, responses((status = 201, description = "The pool", body = PoolView)))]
pub(crate) async fn put_pool_member(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<MemberRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.put_pool_member(&caller.0, id, body).await?),
    ))
}

/// Removes a member (its owner): its requests take no part from a cycle run now,
/// and the slots it holds end after the notice period.
#[utoipa::path(delete, path = "/v1/pools/{id}/members/{member}", tag = "pools", params(("id" = Uuid, Path, description = "The pool"), ("member" = String, Path, description = "The member's account")), responses((status = 200, description = "The pool", body = PoolView)))]
pub(crate) async fn remove_pool_member(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path((id, member)): Path<(String, String)>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(
        ctl.market
            .remove_pool_member(&caller.0, id, &member)
            .await?,
    ))
}

/// Issues the pool's credits (or units) to a member (its owner), through the
/// ledger; a pool in money issues none (409 `money_pool`). A retry with the same
/// `client_token` issues once.
#[utoipa::path(post, path = "/v1/pools/{id}/credits", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = CreditRequest, responses((status = 201, description = "Issued", body = CreditView)))]
pub(crate) async fn credit_pool_member(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<CreditRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreditView>), ApiError> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.credit_pool_member(&caller.0, id, body).await?),
    ))
}

/// A member asks for slots at a bid per slot-hour (clients that are members;
/// anyone else 404 or 409 `not_member`). The next cycle decides; the request then
/// holds its slots while its bid stays at or above the minimum and it keeps winning.
#[utoipa::path(post, path = "/v1/pools/{id}/requests", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = PoolBidRequest, responses((status = 201, description = "The request", body = PoolRequestView)))]
pub(crate) async fn place_pool_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<PoolBidRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PoolRequestView>), ApiError> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.pool_request(&caller.0, id, body).await?),
    ))
}

/// A pool's requests: all of them for its owner, a member's own for a member.
#[utoipa::path(get, path = "/v1/pools/{id}/requests", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), responses((status = 200, description = "The requests, oldest first", body = Vec<PoolRequestView>)))]
pub(crate) async fn list_pool_requests(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Vec<PoolRequestView>> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.pool_requests(&caller.0, id).await?))
}

/// Usage and charges per member (FIG. 12): slot-hours, the billing records, the
/// slots held now with their instances; the owner also sees the bursts and what
/// they spent of the budget. A member sees its own.
#[utoipa::path(get, path = "/v1/pools/{id}/usage", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), responses((status = 200, description = "Usage per member", body = PoolUsageView)))]
pub(crate) async fn pool_usage(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolUsageView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.pool_usage(&caller.0, id).await?))
}

/// Runs the pool's cycle now (its owner), instead of at its next due time.
#[utoipa::path(post, path = "/v1/pools/{id}/cycle", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), responses((status = 200, description = "The pool after the cycle", body = PoolView)))]
pub(crate) async fn cycle_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.cycle_pool_now(&caller.0, id).await?))
}

/// A client lets a pool owner put the reservations it holds in pools, and pay
/// bursts from it; a provider, the hosts it provides that no listing sells.
#[utoipa::path(post, path = "/v1/pool-accounts", tag = "pools", request_body = PoolAccountGrant, responses((status = 204, description = "Granted")))]
pub(crate) async fn grant_pool_account(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<PoolAccountGrant>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body?;
    ctl.market
        .grant_pool_account(&caller.0, &body.owner)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One request, with what the last cycle decided of it and its allocations (the
/// hosts to run on).
#[utoipa::path(get, path = "/v1/pool-requests/{id}", tag = "pools", params(("id" = Uuid, Path, description = "The request")), responses((status = 200, description = "The request", body = PoolRequestView)))]
pub(crate) async fn show_pool_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolRequestView> {
    let id = uuid_of("request", "id", &id)?;
    Ok(Json(ctl.market.pool_request_of(&caller.0, id).await?))
}

/// Changes a request's bid (its member): an English pool's bids only rise (409
/// `ascending`); a bid below the minimum is kept and takes no part, so its slots
/// end with notice at the next cycle.
#[utoipa::path(post, path = "/v1/pool-requests/{id}/bid", tag = "pools", params(("id" = Uuid, Path, description = "The request")), request_body = RebidRequest, responses((status = 200, description = "The request", body = PoolRequestView)))]
pub(crate) async fn rebid_pool_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<RebidRequest>, JsonRejection>,
) -> ApiResult<PoolRequestView> {
    let id = uuid_of("request", "id", &id)?;
    let Json(body) = body?;
    Ok(Json(ctl.market.pool_rebid(&caller.0, id, body.bid).await?))
}

/// Cancels a request (its member): the slots it holds end after the notice period.
#[utoipa::path(post, path = "/v1/pool-requests/{id}/cancel", tag = "pools", params(("id" = Uuid, Path, description = "The request")), responses((status = 200, description = "The request", body = PoolRequestView)))]
pub(crate) async fn cancel_pool_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolRequestView> {
    let id = uuid_of("request", "id", &id)?;
    Ok(Json(ctl.market.cancel_pool_request(&caller.0, id).await?))
}

/// Why a request holds, waits or was preempted: the rule and its numbers, and what
/// its burst did.
#[utoipa::path(get, path = "/v1/pool-requests/{id}/explain", tag = "pools", params(("id" = Uuid, Path, description = "The request")), responses((status = 200, description = "The explanation", body = ExplainView)))]
pub(crate) async fn explain_pool_request(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ExplainView> {
    let id = uuid_of("request", "id", &id)?;
    Ok(Json(ctl.market.explain_pool_request(&caller.0, id).await?))
}

/// Dissolves a pool (its owner, or in a merged pool an entity with the `dissolve`
/// right): its requests are cancelled now and its slots go back to their entities
/// after the notice period, when a last cycle charges what was held.
#[utoipa::path(delete, path = "/v1/pools/{id}", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), responses((status = 200, description = "The pool, dissolving", body = PoolView)))]
pub(crate) async fn dissolve_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.dissolve_pool(&caller.0, id).await?))
}

/// Invites a pool owner into a merged pool (FIG. 14), with the rights it will have
/// (`policy`, `users`, `slots`, `dissolve`); an entity with the `policy` right
/// invites. At the first invitation the pool's owner becomes its first entity, with
/// every right.
#[utoipa::path(post, path = "/v1/pools/{id}/entities", tag = "pools", params(("id" = Uuid, Path, description = "The pool")), request_body = InviteRequest, responses((status = 201, description = "The pool", body = PoolView)))]
pub(crate) async fn invite_pool_entity(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<InviteRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<PoolView>), ApiError> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(ctl.market.invite_pool_entity(&caller.0, id, body).await?),
    ))
}

/// An invited pool owner merges its own pool in (409 `not_invited`, `joined`,
/// `unknown_pool`, `dissolved`, `merged`, `bursting`, `allocated`): that pool's
/// slots (still its own) and members move, its requests (bids in its own currency)
/// end, with its lending and borrowing limits.
#[utoipa::path(post, path = "/v1/pools/{id}/join", tag = "pools", params(("id" = Uuid, Path, description = "The merged pool")), request_body = JoinRequest, responses((status = 200, description = "The merged pool", body = PoolView)))]
pub(crate) async fn join_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok(Json(ctl.market.join_pool(&caller.0, id, body).await?))
}

/// An entity of a merged pool sets how many of its slots its users lend to
/// others' and how many others' slots its users may borrow.
#[utoipa::path(put, path = "/v1/pools/{id}/limits", tag = "pools", params(("id" = Uuid, Path, description = "The merged pool")), request_body = LimitsRequest, responses((status = 200, description = "The merged pool", body = PoolView)))]
pub(crate) async fn set_pool_limits(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<LimitsRequest>, JsonRejection>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    let Json(body) = body?;
    Ok(Json(ctl.market.set_pool_limits(&caller.0, id, body).await?))
}

/// An entity leaves a merged pool: its slots go back to it after the notice period,
/// and the allocations on them, and its users' elsewhere, end then with notice.
#[utoipa::path(post, path = "/v1/pools/{id}/leave", tag = "pools", params(("id" = Uuid, Path, description = "The merged pool")), responses((status = 200, description = "The merged pool", body = PoolView)))]
pub(crate) async fn leave_pool(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PoolView> {
    let id = uuid_of("pool", "id", &id)?;
    Ok(Json(ctl.market.leave_pool(&caller.0, id).await?))
}
