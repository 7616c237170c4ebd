//! The primary control interface over HTTP: `POST /v1/control` and the read-only views
//! of instances, logs, volumes and a host's compatibility report.

use surplus_api::control::ControlResponse;

use super::*;

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("POST", "/v1/control", Token, control),
        route("GET", "/v1/instances", Token, list_instances),
        route("GET", "/v1/instances/{id}/logs", Token, instance_logs),
        route("GET", "/v1/volumes", Token, list_volumes),
        route("GET", "/v1/agents/{id}/compat", Token, agent_compat),
    ]
}

impl From<crate::control::ControlError> for ApiError {
    fn from(e: crate::control::ControlError) -> Self {
        use crate::control::ControlError as E;
        use surplus_protocol::control::FailureKind as K;
        let message = e.to_string();
        match e {
            E::Invalid(i) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", i.to_string())
                .with_field(i.field),
            E::NotFound(_) => ApiError::not_found(message),
            E::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            E::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            E::InsufficientFunds {
                account,
                currency,
                balance,
                needed,
            } => ApiError::new(StatusCode::PAYMENT_REQUIRED, "insufficient_funds", message)
                .with_detail("account", account)
                .with_detail("currency", currency)
                .with_detail("balance", balance)
                .with_detail("needed", needed),
            E::Agent { agent_id, failure } => {
                let (status, code) = match failure.kind {
                    K::InvalidParameter => (StatusCode::BAD_REQUEST, "bad_request"),
                    K::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                    K::Unsupported => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
                    K::Conflict => (StatusCode::CONFLICT, "conflict"),
                    K::Driver => (StatusCode::BAD_GATEWAY, "driver_error"),
                };
                let mut error = ApiError::new(status, code, message).with_agent(agent_id, None);
                if let Some(field) = failure.field {
                    error = error.with_field(field);
                }
                error
            }
            E::Link(e) => e.into(),
            E::Store(e) => e.into(),
        }
    }
}

#[utoipa::path(post, path = "/v1/control", tag = "control", request_body = surplus_api::control::ControlCall, responses((status = 200, description = "The operation's answer", body = ControlResponse)))]
pub(crate) async fn control(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<ControlResponse> {
    let Json(body) = body?;
    let request =
        crate::control::parse_request(body).map_err(crate::control::ControlError::from)?;
    Ok(Json(ctl.control.handle(&caller.0, request).await?))
}

/// `GET /v1/instances?state=running&label=k=v&id=i-...`: DescribeInstances as a query.
#[utoipa::path(get, path = "/v1/instances", tag = "control", params(("id" = Option<Vec<String>>, Query, description = "Instance ids (repeatable)", explode = true), ("state" = Option<Vec<String>>, Query, description = "States (repeatable): pending, running, stopped, ...", explode = true), ("label" = Option<Vec<String>>, Query, description = "Labels as key=value (repeatable, all must match)", explode = true)), responses((status = 200, description = "The instances the caller may see", body = ControlResponse)))]
pub(crate) async fn list_instances(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<ControlResponse> {
    let mut filters = surplus_protocol::control::Filters::default();
    for (k, v) in form_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "id" => filters.ids.push(v),
            "state" => filters.states.push(
                surplus_protocol::control::InstanceState::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(format!("state: {v:?} is not an instance state"))
                        .with_field("state".into())
                })?,
            ),
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(format!("label: {v:?} is not key=value"))
                        .with_field("label".into())
                })?;
                filters.labels.insert(lk.to_owned(), lv.to_owned());
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (id, state, label)"
                ))
                .with_field(other.to_owned()));
            }
        }
    }
    let mut body = serde_json::to_value(filters).expect("filters serialize");
    body["action"] = "DescribeInstances".into();
    let request =
        crate::control::parse_request(body).map_err(crate::control::ControlError::from)?;
    Ok(Json(ctl.control.handle(&caller.0, request).await?))
}

/// `GET /v1/instances/{id}/logs?max_bytes=N`: the end of an instance's standard output
/// and error, for its owner (and admins).
#[utoipa::path(get, path = "/v1/instances/{id}/logs", tag = "control", params(("id" = String, Path, description = "The instance"), ("max_bytes" = Option<u64>, Query, description = "At most this many bytes from the end")), responses((status = 200, description = "The tail of the instance's output", body = surplus_protocol::control::InstanceLogs)))]
pub(crate) async fn instance_logs(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<surplus_protocol::control::InstanceLogs> {
    surplus_protocol::control::validate_id("id", surplus_protocol::control::INSTANCE_PREFIX, &id)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field("id".into()))?;
    let mut max_bytes = crate::control::DEFAULT_LOG_BYTES;
    for (k, v) in form_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "max_bytes" => {
                max_bytes = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=surplus_protocol::control::MAX_LOG_BYTES).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "max_bytes: {v:?} is not 1 to {}",
                            surplus_protocol::control::MAX_LOG_BYTES
                        ))
                        .with_field("max_bytes".into())
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?} (max_bytes)"
                ))
                .with_field(other.to_owned()));
            }
        }
    }
    let request = crate::control::ControlRequest::Logs {
        instance_id: id,
        max_bytes,
    };
    match ctl.control.handle(&caller.0, request).await? {
        ControlResponse::Logs(l) => Ok(Json(l)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected answer {other:?}"),
        )),
    }
}

/// `GET /v1/volumes`: DescribeVolumes of everything the caller may see.
#[utoipa::path(get, path = "/v1/volumes", tag = "control", responses((status = 200, description = "The volumes the caller may see", body = ControlResponse)))]
pub(crate) async fn list_volumes(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<ControlResponse> {
    let request = crate::control::ControlRequest::DescribeVolumes { ids: vec![] };
    Ok(Json(ctl.control.handle(&caller.0, request).await?))
}

#[utoipa::path(get, path = "/v1/agents/{id}/compat", tag = "control", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The last compatibility-kit results", body = surplus_api::agents::CompatView)))]
pub(crate) async fn agent_compat(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<surplus_api::agents::CompatView> {
    let agent = load_agent(&ctl, &id).await?;
    // A host's compatibility results are its provider's business (and admins').
    billing::require_host_owner(&caller, &agent)?;
    let id = agent.id;
    let (report, at) = ctl.app.store.compat_report(id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "agent {id} has not reported compatibility results (run surplus-agent compat --report)"
        ))
    })?;
    Ok(Json(surplus_api::agents::CompatView {
        agent_id: id,
        reported_at_ms: at,
        report,
    }))
}
