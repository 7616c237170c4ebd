//! Federation and brokerage (issue 18): the peers of this controller and the usage
//! history it aggregates from its own metering and its host clouds. Admins only.

use surplus_api::brokerage::*;

use super::billing::query_map;
use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("GET", "/v1/peers", Token, list_peers),
        route("GET", "/v1/brokerage/usage", Token, brokerage_usage),
        route("GET", "/v1/brokerage/margins", Token, brokerage_margins),
        route("POST", "/v1/brokerage/bundles/plan", Token, plan_bundle),
        route("POST", "/v1/brokerage/bills", Token, post_bills),
        route("POST", "/v1/brokerage/tenders", Token, create_tender),
        route("GET", "/v1/brokerage/tenders", Token, list_tenders),
        route("GET", "/v1/brokerage/bundles", Token, list_bundles),
        route("GET", "/v1/brokerage/tender-terms", Token, get_tender_terms),
        route("PUT", "/v1/brokerage/tender-terms", Token, put_tender_terms),
        route("POST", "/v1/subscriptions", Token, create_subscription),
        route("GET", "/v1/subscriptions", Token, list_subscriptions),
        route("GET", "/v1/subscriptions/{user}", Token, show_subscriptions),
    ]
}

/// The controllers this one peers with, and the state of each link and usage
/// exchange (admins).
#[utoipa::path(get, path = "/v1/peers", tag = "brokerage", responses((status = 200, description = "The peers", body = Vec<PeerView>)))]
pub(crate) async fn list_peers(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> Result<Json<Vec<PeerView>>, ApiError> {
    caller.require(Role::Admin)?;
    let peers = ctl.app.store.peers().await?;
    Ok(Json(
        peers
            .into_iter()
            .map(|p| PeerView {
                id: p.id.to_string(),
                linked: ctl.federation.link(p.id).is_some(),
                name: p.name,
                role: p.role.as_str().into(),
                ca_fingerprint: p.fingerprint,
                addresses: p.addresses,
                dials: p.dials,
                our_role: p.our_role.as_str().into(),
                status: if p.removed_at_ms.is_some() {
                    "removed"
                } else {
                    "active"
                }
                .into(),
                joined_at_ms: p.joined_at_ms,
                removed_at_ms: p.removed_at_ms,
                last_seen_ms: p.last_seen_ms,
                usage_sent: p.out_seq,
                usage_acknowledged: p.acked_seq,
                usage_received: p.in_seq,
            })
            .collect(),
    ))
}

/// Longest window one usage query may cover.
const MAX_WINDOW_MS: i64 = 31 * 86_400_000;

/// The aggregate usage history: per user, resource and minute, from this
/// controller's own metering (`cloud` = `local`) and from each host cloud, for
/// minutes in `[from, until)` (ms since the epoch; default the last day), optionally
/// of one `user` or `resource` (admins).
#[utoipa::path(get, path = "/v1/brokerage/usage", tag = "brokerage",
    params(
        ("from" = Option<i64>, Query, description = "Start, ms since the epoch (default: a day before until)"),
        ("until" = Option<i64>, Query, description = "End, ms since the epoch (default: now)"),
        ("user" = Option<String>, Query, description = "Only this user"),
        ("resource" = Option<String>, Query, description = "Only this resource"),
    ),
    responses((status = 200, description = "Usage per minute", body = Vec<UsageMinute>)))]
pub(crate) async fn brokerage_usage(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<Vec<UsageMinute>>, ApiError> {
    caller.require(Role::Admin)?;
    let q = query_map(query.as_deref(), &["from", "until", "user", "resource"])?;
    let time = |key: &str, default: i64| -> Result<i64, ApiError> {
        q.get(key).map_or(Ok(default), |v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::bad_request(format!("{key}: {v:?} is not a time in ms since the epoch"))
                    .with_field(key.into())
            })
        })
    };
    let until = time("until", ctl.app.clock.now_ms())?;
    let from = time("from", until.saturating_sub(86_400_000))?;
    if from >= until || until.saturating_sub(from) > MAX_WINDOW_MS {
        return Err(ApiError::bad_request(format!(
            "from must be before until, and the window at most 31 days (from {from}, until {until})"
        ))
        .with_field("from".into()));
    }
    if let Some(r) = q.get("resource") {
        if !surplus_market::exchange::is_resource(r) {
            return Err(ApiError::bad_request(format!(
                "resource {r:?} is not one of os_instances, cpu_cores, memory_gb, app.<name>"
            ))
            .with_field("resource".into()));
        }
    }
    let keep = |user: &str, resource: &str| {
        q.get("user").is_none_or(|u| u == user) && q.get("resource").is_none_or(|r| r == resource)
    };
    let minute = surplus_market::exchange::MINUTE_MS;
    let deltas = ctl.app.store.local_usage_deltas(None, from, until).await?;
    let mut out: Vec<UsageMinute> = surplus_market::exchange::minute_usage(&deltas, from, until)
        .into_iter()
        .filter(|(user, resource, _, _)| keep(user, resource))
        .map(|(user, resource, minute_ms, unit_ms)| UsageMinute {
            cloud: "local".into(),
            user,
            resource: resource.into(),
            minute_ms,
            unit_ms,
        })
        .collect();
    let from_minute = from.div_euclid(minute) * minute;
    for r in ctl.app.store.peer_usage_in(from_minute, until).await? {
        if keep(&r.row.user, &r.row.resource) {
            out.push(UsageMinute {
                cloud: r.peer.to_string(),
                user: r.row.user,
                resource: r.row.resource,
                minute_ms: r.row.minute_ms,
                unit_ms: r.row.unit_ms,
            });
        }
    }
    out.sort_by(|a, b| {
        (a.minute_ms, &a.cloud, &a.user, &a.resource).cmp(&(
            b.minute_ms,
            &b.cloud,
            &b.user,
            &b.resource,
        ))
    });
    Ok(Json(out))
}

impl From<crate::brokerage::BrokerageError> for ApiError {
    fn from(e: crate::brokerage::BrokerageError) -> Self {
        match e {
            crate::brokerage::BrokerageError::Refused(r) => {
                ApiError::bad_request(r.message).with_field(r.rule.into())
            }
            crate::brokerage::BrokerageError::Store(e) => e.into(),
        }
    }
}

/// Makes or replaces a user's subscription of a resource: its short-term limit per
/// period and the overage rate (admins).
#[utoipa::path(post, path = "/v1/subscriptions", tag = "brokerage", request_body = SubscriptionCreate, responses((status = 201, description = "The subscription", body = SubscriptionView)))]
pub(crate) async fn create_subscription(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<SubscriptionCreate>, JsonRejection>,
) -> Result<(StatusCode, Json<SubscriptionView>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    Ok((
        StatusCode::CREATED,
        Json(crate::brokerage::put_subscription(&ctl, body).await?),
    ))
}

/// Every subscription (admins).
#[utoipa::path(get, path = "/v1/subscriptions", tag = "brokerage", responses((status = 200, description = "The subscriptions", body = Vec<SubscriptionView>)))]
pub(crate) async fn list_subscriptions(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> Result<Json<Vec<SubscriptionView>>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(crate::brokerage::subscriptions(&ctl, None).await?))
}

/// One user's subscriptions (admins); 404 when it has none.
#[utoipa::path(get, path = "/v1/subscriptions/{user}", tag = "brokerage", params(("user" = String, Path, description = "The user")), responses((status = 200, description = "The user's subscriptions", body = Vec<SubscriptionView>)))]
pub(crate) async fn show_subscriptions(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(user): Path<String>,
) -> Result<Json<Vec<SubscriptionView>>, ApiError> {
    caller.require(Role::Admin)?;
    let subs = crate::brokerage::subscriptions(&ctl, Some(&user)).await?;
    if subs.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("user {user:?} has no subscription"),
        ));
    }
    Ok(Json(subs))
}

/// The margins of a window (FIG. 4): per resource and period length, each user's
/// usage across clouds against its limit, the net margins across users and clouds,
/// offset costs, marginal totals, excess capacity, and the billing records they make
/// (admins). `user` narrows to one user's subscriptions, netted across its clouds only.
#[utoipa::path(get, path = "/v1/brokerage/margins", tag = "brokerage",
    params(
        ("user" = Option<String>, Query, description = "Only this user's subscriptions"),
        ("resource" = Option<String>, Query, description = "Only this resource"),
        ("period" = Option<String>, Query, description = "Only subscriptions of this period (15m, 1h, ...)"),
        ("from" = Option<i64>, Query, description = "Window start, ms since the epoch (default: a day before until)"),
        ("until" = Option<i64>, Query, description = "Window end (default: the end of the last whole period)"),
    ),
    responses((status = 200, description = "The margin table", body = MarginsView)))]
pub(crate) async fn brokerage_margins(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<Json<MarginsView>, ApiError> {
    caller.require(Role::Admin)?;
    let q = query_map(
        query.as_deref(),
        &["user", "resource", "period", "from", "until"],
    )?;
    let time = |key: &str| -> Result<Option<i64>, ApiError> {
        q.get(key)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!(
                        "{key}: {v:?} is not a time in ms since the epoch"
                    ))
                    .with_field(key.into())
                })
            })
            .transpose()
    };
    let period_ms = q
        .get("period")
        .map(|p| {
            crate::brokerage::period_ms(p)
                .filter(|ms| surplus_market::brokerage::PERIODS_MS.contains(ms))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "period {p:?} is not one of 1m, 5m, 10m, 15m, 30m, 1h, 8h, 12h, 24h"
                    ))
                    .with_field("period".into())
                })
        })
        .transpose()?;
    let query = crate::brokerage::MarginQuery {
        user: q.get("user").cloned(),
        resource: q.get("resource").cloned(),
        period_ms,
        from: time("from")?,
        until: time("until")?,
    };
    Ok(Json(crate::brokerage::margins(&ctl, &query).await?))
}

/// Plans a bundle of a resource held over an interval from the subscribers'
/// estimated contributions: the staggered arrangement and its price, or the
/// sub-intervals where it falls short and by how much (admins). Nothing is stored.
#[utoipa::path(post, path = "/v1/brokerage/bundles/plan", tag = "brokerage", request_body = BundlePlanRequest, responses((status = 200, description = "The plan", body = BundlePlanView)))]
pub(crate) async fn plan_bundle(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<BundlePlanRequest>, JsonRejection>,
) -> Result<Json<BundlePlanView>, ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    check_plan(&body)?;
    Ok(Json(crate::brokerage::plan_bundle(&ctl, &body).await?))
}

/// A bundle's resource, interval and amount, checked before it is planned.
fn check_plan(body: &BundlePlanRequest) -> Result<(), ApiError> {
    if !surplus_market::exchange::is_resource(&body.resource) {
        return Err(ApiError::bad_request(format!(
            "resource {:?} is not one of os_instances, cpu_cores, memory_gb, app.<name>",
            body.resource
        ))
        .with_field("resource".into()));
    }
    if let Some(until) = body.until
        && (body.from >= until
            || until.saturating_sub(body.from) > surplus_market::stagger::DAY_MS * 7)
    {
        return Err(ApiError::bad_request(format!(
            "the interval {}..{until} must not be empty, and at most 7 days",
            body.from
        ))
        .with_field("until".into()));
    }
    if body.until.is_some() == body.interval.is_some() {
        return Err(ApiError::bad_request(
            "give the interval's end (until) or its rule (interval), one of the two",
        )
        .with_field("until".into()));
    }
    if body.amount == 0 {
        return Err(
            ApiError::bad_request("amount must be more than zero").with_field("amount".into())
        );
    }
    Ok(())
}

/// Plans a bundle and tenders it to marketplace clouds over their peer links, one
/// after another, each offered what the clouds before it left; every tender and
/// answer is recorded. At the interval's end the accepted tenders are paid out to
/// the contributors (admins).
#[utoipa::path(post, path = "/v1/brokerage/tenders", tag = "brokerage", request_body = TenderRequest, responses((status = 201, description = "The bundle and its tenders", body = BundleView)))]
pub(crate) async fn create_tender(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<TenderRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<BundleView>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    check_plan(&body.bundle)?;
    Ok((
        StatusCode::CREATED,
        Json(crate::brokerage::tender(&ctl, &body).await?),
    ))
}

/// The tenders this controller sent (`out`) and answered (`in`), newest first
/// (admins).
#[utoipa::path(get, path = "/v1/brokerage/tenders", tag = "brokerage", responses((status = 200, description = "The tenders", body = Vec<TenderView>)))]
pub(crate) async fn list_tenders(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> Result<Json<Vec<TenderView>>, ApiError> {
    caller.require(Role::Admin)?;
    let tenders = ctl.app.store.tenders(500).await?;
    Ok(Json(crate::brokerage::tender_views(&ctl, &tenders).await?))
}

/// The bundles this controller tendered, newest first, with their tenders and
/// whether they were paid out (admins).
#[utoipa::path(get, path = "/v1/brokerage/bundles", tag = "brokerage", responses((status = 200, description = "The bundles", body = Vec<BundleView>)))]
pub(crate) async fn list_bundles(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> Result<Json<Vec<BundleView>>, ApiError> {
    caller.require(Role::Admin)?;
    let mut out = Vec::new();
    for b in ctl.app.store.bundles(200).await? {
        out.push(crate::brokerage::bundle_view(&ctl, &b).await?);
    }
    Ok(Json(out))
}

/// This controller's standing terms for tenders, as a marketplace cloud: per
/// resource the most it pays per unit-hour and takes of one tender (admins).
#[utoipa::path(get, path = "/v1/brokerage/tender-terms", tag = "brokerage", responses((status = 200, description = "The terms", body = surplus_market::tender::Terms)))]
pub(crate) async fn get_tender_terms(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> Result<Json<surplus_market::tender::Terms>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(crate::brokerage::tender_terms(&ctl).await?))
}

/// Sets this controller's standing terms for tenders; tenders are answered by them
/// from now on (admins).
#[utoipa::path(put, path = "/v1/brokerage/tender-terms", tag = "brokerage", request_body = surplus_market::tender::Terms, responses((status = 200, description = "The terms in force", body = surplus_market::tender::Terms)))]
pub(crate) async fn put_tender_terms(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<surplus_market::tender::Terms>, JsonRejection>,
) -> Result<Json<surplus_market::tender::Terms>, ApiError> {
    caller.require(Role::Admin)?;
    let Json(terms) = body?;
    crate::brokerage::put_tender_terms(&ctl, &terms).await?;
    Ok(Json(terms))
}

/// Posts the netted overage of a window of whole periods (FIG. 4's billing records)
/// through the ledger, each subscriber's administrator paying the house less the
/// marketplace's commission, and notifies the administrator; once per record and
/// window, however often it is asked (admins).
#[utoipa::path(post, path = "/v1/brokerage/bills", tag = "brokerage", request_body = BillRequest, responses((status = 200, description = "Each record and what became of it", body = Vec<BillView>)))]
pub(crate) async fn post_bills(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<BillRequest>, JsonRejection>,
) -> Result<Json<Vec<BillView>>, ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    if body.until <= ctl.app.clock.now_ms() && body.from < body.until {
        Ok(Json(crate::brokerage::bill(&ctl, &body).await?))
    } else {
        Err(ApiError::bad_request(format!(
            "the window {}..{} must be non-empty and in the past",
            body.from, body.until
        ))
        .with_field("until".into()))
    }
}
