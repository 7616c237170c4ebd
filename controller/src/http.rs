//! The HTTP/JSON API. Thin: it authenticates, parses, calls [`Controller`] or the
//! store, and renders. Every error is `{ "error": code, "message": text }`, including
//! those of the transport: unknown paths (404), methods (405), slow bodies (408),
//! large bodies (413), long targets (414) and large headers (431).
//!
//! Every route is one row of [`routes`], which the router is built from, so the list
//! (and the authorization matrix tested against it) cannot drift from what is served.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Json, Router};
use http_body_util::BodyExt;
use uuid::Uuid;

pub mod billing;

use crate::api::*;
use crate::datadir::api_token_hash;
use crate::link::LinkError;
use crate::service::Controller;
use crate::store::{Principal, Role, StoreError};

/// An API failure.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    agent: Option<(Uuid, Option<i64>)>,
    details: Box<serde_json::Map<String, serde_json::Value>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            agent: None,
            details: Box::default(),
        }
    }
    /// Adds `key` with `value` to the error body (the numbers behind a refusal).
    fn with_detail(mut self, key: &str, value: impl serde::Serialize) -> Self {
        self.details.insert(
            key.to_owned(),
            serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
        );
        self
    }
    fn with_field(mut self, field: String) -> Self {
        self.field = Some(field);
        self
    }
    fn with_agent(mut self, agent_id: Uuid, last_seen_ms: Option<i64>) -> Self {
        self.agent = Some((agent_id, last_seen_ms));
        self
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.code.into(),
                message: self.message,
                field: self.field,
                agent_id: self.agent.map(|a| a.0),
                last_seen_ms: self.agent.and_then(|a| a.1),
                details: *self.details,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            other => {
                tracing::error!(error = %other, "storage failure in API");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "storage failure",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                r.body_text(),
            ),
            _ => ApiError::bad_request(r.body_text()),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The authenticated caller, put in the request by the auth layer.
#[derive(Debug, Clone)]
struct Caller(Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token",
            )
        })
    }
}

impl Caller {
    fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.role == role || self.0.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs the {} role", role.as_str()),
            ))
        }
    }
}

async fn authenticate(
    State(ctl): State<Arc<Controller>>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing bearer token (Authorization: Bearer ...)",
            )
        })?;
    let principal = ctl
        .store
        .api_principal(&api_token_hash(token))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown or revoked API token",
            )
        })?;
    request.extensions_mut().insert(Caller(principal));
    let request = read_body(&ctl.config, request).await?;
    Ok(next.run(request).await)
}

/// Reads the whole body of an authenticated request within
/// `http_body_read_timeout` (408) and `http_max_body_bytes` (413). Only authenticated
/// requests are read, so a stranger cannot make the API hold bodies in memory.
async fn read_body(
    config: &crate::config::ControllerConfig,
    request: Request,
) -> Result<Request, ApiError> {
    let limit = config.http_max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes (http_max_body_bytes)"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let (parts, mut body) = request.into_parts();
    let timeout = config.http_body_read_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} (http_body_read_timeout)",
                        humantime::format_duration(timeout)
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "reading the request body: {e}"
                )));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// Most request headers; hyper's own limit, set above it, refuses more with an empty
/// answer, so this one speaks first.
pub const MAX_HEADERS: usize = 100;

/// Refuses request targets and headers beyond the configured limits with JSON errors
/// (414, 431). hyper's own limits are set above these (see `server`), so these are
/// the ones clients meet.
async fn request_limits(
    State(ctl): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let uri = request.uri();
    let uri_bytes = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let max_uri = ctl.config.http_max_uri_bytes;
    if uri_bytes > max_uri {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is {uri_bytes} bytes, more than {max_uri} (http_max_uri_bytes)"
            ),
        ));
    }
    let headers = request.headers();
    let header_bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let max_headers = ctl.config.http_max_header_bytes;
    if header_bytes > max_headers || headers.len() > MAX_HEADERS {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request has {} headers of {header_bytes} bytes; at most {MAX_HEADERS} of {max_headers} bytes (http_max_header_bytes)",
                headers.len()
            ),
        ));
    }
    Ok(next.run(request).await)
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not served on {}", uri.path()),
    )
}

/// The agent named by a path segment: 400 when it is no UUID, 404 when unknown.
async fn load_agent(ctl: &Controller, text: &str) -> Result<crate::store::AgentRecord, ApiError> {
    let id = parse_id(text)?;
    ctl.store
        .agent(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent {id} not found")))
}

/// The validation run named by a path segment: 400 when it is no UUID, 404 when unknown.
async fn load_run(ctl: &Controller, text: &str) -> Result<crate::store::ValidationRun, ApiError> {
    let id = Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a run id (a UUID)")))?;
    ctl.store
        .validation_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("validation run {id} not found")))
}

fn parse_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not an agent id (a UUID)")))
}

/// Who may call a route at all (each handler then decides what the caller may see).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Public,
    /// A valid bearer token.
    Token,
}

/// One route of the API.
struct Route {
    method: &'static str,
    path: &'static str,
    access: Access,
    service: MethodRouter<Arc<Controller>>,
}

fn route<H, T>(method: &'static str, path: &'static str, access: Access, handler: H) -> Route
where
    H: Handler<T, Arc<Controller>>,
    T: 'static,
{
    let filter = match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        other => panic!("route {path}: method {other} is not GET, POST or PUT"),
    };
    Route {
        method,
        path,
        access,
        service: axum::routing::on(filter, handler),
    }
}

/// Every route of the API, the one list the router is built from.
#[rustfmt::skip]
fn table() -> Vec<Route> {
    use Access::{Public, Token};
    let (get, post, put) = ("GET", "POST", "PUT");
    vec![
        route(get, "/v1/health", Public, health),
        route(get, "/metrics", Public, metrics),
        route(get, "/v1/agents", Token, list_agents),
        route(get, "/v1/agents/{id}", Token, show_agent),
        route(get, "/v1/agents/{id}/inventory/history", Token, inventory_history),
        route(post, "/v1/agents/{id}/revoke", Token, revoke_agent),
        route(post, "/v1/agents/{id}/ping", Token, ping_agent),
        route(post, "/v1/agents/{id}/validation", Token, order_validation),
        route(get, "/v1/agents/{id}/validation", Token, agent_validations),
        route(get, "/v1/validations/{run}", Token, show_validation),
        route(post, "/v1/validations/{run}/cancel", Token, cancel_validation),
        route(post, "/v1/tokens", Token, create_token),
        route(post, "/v1/api-tokens", Token, create_api_token),
        route(post, "/v1/control", Token, control),
        route(get, "/v1/instances", Token, list_instances),
        route(get, "/v1/instances/{id}/logs", Token, instance_logs),
        route(get, "/v1/volumes", Token, list_volumes),
        route(get, "/v1/agents/{id}/compat", Token, agent_compat),
        route(get, "/v1/agents/{id}/metering", Token, billing::get_metering),
        route(put, "/v1/agents/{id}/metering", Token, billing::put_metering),
        route(put, "/v1/agents/{id}/price-plan", Token, billing::put_price_plan),
        route(get, "/v1/usage", Token, billing::usage),
        route(post, "/v1/billing/runs", Token, billing::billing_run),
        route(post, "/v1/payments", Token, billing::payment),
        route(post, "/v1/payouts", Token, billing::payout),
        route(put, "/v1/ledger/accounts/{account}", Token, billing::put_account),
        route(get, "/v1/ledger/balances", Token, billing::balances),
        route(get, "/v1/invoices", Token, billing::invoices),
        route(get, "/v1/invoices/{id}", Token, billing::invoice),
        route(get, "/v1/statements", Token, billing::statements),
    ]
}

/// Every route the API serves: (method, path in the router's syntax, access).
pub fn routes() -> Vec<(&'static str, &'static str, Access)> {
    table()
        .into_iter()
        .map(|r| (r.method, r.path, r.access))
        .collect()
}

/// The API router.
pub fn router(ctl: Arc<Controller>) -> Router {
    let mut public = Router::new();
    let mut authed = Router::new();
    for r in table() {
        match r.access {
            Access::Public => public = public.route(r.path, r.service),
            Access::Token => authed = authed.route(r.path, r.service),
        }
    }
    let authed = authed.route_layer(middleware::from_fn_with_state(ctl.clone(), authenticate));
    Router::new()
        .merge(public)
        .merge(authed)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read and limited by `read_body`; the extractors' own limit must
        // not be lower.
        .layer(DefaultBodyLimit::max(ctl.config.http_max_body_bytes))
        .layer(middleware::from_fn_with_state(ctl.clone(), request_limits))
        .with_state(ctl)
}

async fn health(State(ctl): State<Arc<Controller>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "connected_agents": ctl.registry.connected(),
    }))
}

/// Prometheus text exposition; unauthenticated like most scrape targets (the API
/// listens on loopback by default).
async fn metrics(State(ctl): State<Arc<Controller>>) -> Result<Response, ApiError> {
    let by_status = ctl
        .store
        .agent_status_counts()
        .await?
        .into_iter()
        .map(|(s, n)| (s.as_str(), n))
        .collect();
    let snapshot = crate::metrics::Snapshot {
        connected: ctl.registry.connected() as i64,
        by_status,
    };
    let body = ctl.metrics.render(&snapshot);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}

async fn list_agents(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<Vec<AgentView>> {
    caller.require(Role::Admin)?;
    let now = ctl.clock.now_ms();
    let agents = ctl.store.agents().await?;
    Ok(Json(
        agents
            .iter()
            .map(|a| AgentView::new(a, ctl.link.is_connected(a.id), now))
            .collect(),
    ))
}

async fn show_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AgentDetail> {
    caller.require(Role::Admin)?;
    let agent = load_agent(&ctl, &id).await?;
    let id = agent.id;
    let sessions = ctl.store.sessions(id, 20).await?;
    let history = ctl.store.inventory_history(id, 50).await?;
    Ok(Json(AgentDetail {
        agent: AgentView::new(&agent, ctl.link.is_connected(id), ctl.clock.now_ms()),
        inventory: agent.inventory,
        sessions,
        inventory_history: history
            .into_iter()
            .map(|h| InventoryChangeView {
                recorded_at_ms: h.recorded_at_ms,
                digest: h.digest,
            })
            .collect(),
    }))
}

async fn inventory_history(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Vec<crate::store::InventoryChange>> {
    caller.require(Role::Admin)?;
    let id = load_agent(&ctl, &id).await?.id;
    Ok(Json(ctl.store.inventory_history(id, 1000).await?))
}

async fn revoke_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AgentView> {
    caller.require(Role::Admin)?;
    let id = parse_id(&id)?;
    ctl.revoke(id).await?;
    let agent = ctl
        .store
        .agent(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent {id} not found")))?;
    Ok(Json(AgentView::new(&agent, false, ctl.clock.now_ms())))
}

async fn ping_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    caller.require(Role::Admin)?;
    let agent = load_agent(&ctl, &id).await?;
    let id = agent.id;
    let rtt = ctl.ping(id).await?;
    Ok(Json(
        serde_json::json!({ "agent_id": id, "rtt_ms": rtt.as_secs_f64() * 1000.0 }),
    ))
}

/// A run as the API shows it: the stored record plus live progress while running.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RunView {
    /// The stored run.
    #[serde(flatten)]
    pub run: crate::store::ValidationRun,
    /// Latest progress, while running.
    pub progress: Option<surplus_protocol::messages::ValidationProgress>,
}

fn run_view(ctl: &Controller, run: crate::store::ValidationRun) -> RunView {
    let progress = ctl.validation_progress(run.id).flatten();
    RunView { run, progress }
}

async fn order_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<crate::validation::ValidationOptions>, JsonRejection>,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    caller.require(Role::Admin)?;
    let agent = load_agent(&ctl, &id).await?;
    let id = agent.id;
    let Json(options) = body?;
    match ctl.start_validation(id, &options, &caller.0.account).await {
        Ok(run) => Ok((StatusCode::ACCEPTED, Json(run_view(&ctl, run)))),
        Err(crate::validation::StartError::Invalid(why)) => Err(ApiError::bad_request(why)),
        Err(crate::validation::StartError::Offline) => Err(LinkError::Offline {
            agent_id: id,
            last_seen_ms: agent.last_seen_ms,
        }
        .into()),
        Err(crate::validation::StartError::Store(e)) => Err(e.into()),
    }
}

async fn agent_validations(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    caller.require(Role::Admin)?;
    let id = load_agent(&ctl, &id).await?.id;
    let runs: Vec<RunView> = ctl
        .store
        .validation_runs(id, 100)
        .await?
        .into_iter()
        .map(|r| run_view(&ctl, r))
        .collect();
    let latest = runs
        .iter()
        .find(|r| r.run.status != crate::store::RunStatus::Running);
    Ok(Json(
        serde_json::json!({ "latest": latest, "history": runs }),
    ))
}

async fn show_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(run): Path<String>,
) -> ApiResult<RunView> {
    caller.require(Role::Admin)?;
    let run = load_run(&ctl, &run).await?;
    Ok(Json(run_view(&ctl, run)))
}

async fn cancel_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(run): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require(Role::Admin)?;
    let run = load_run(&ctl, &run).await?;
    let run_id = run.id;
    if run.status != crate::store::RunStatus::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_running",
            format!(
                "validation run {run_id} already ended ({})",
                run.status.as_str()
            ),
        ));
    }
    let was_running = ctl.cancel_validation(&run).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "run_id": run_id, "cancelling": was_running })),
    ))
}

async fn create_token(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<crate::service::CreatedToken>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    let ttl = match body.ttl.as_deref() {
        None => ctl.config.join_token_ttl,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| ApiError::bad_request(format!("ttl {text:?}: {e}")))?,
    };
    if ttl.is_zero() || ttl > std::time::Duration::from_secs(30 * 86_400) {
        return Err(ApiError::bad_request(
            "ttl must be more than zero and at most 30 days",
        ));
    }
    for (k, v) in &body.labels {
        validate_label(k, v)?;
    }
    let created = ctl
        .create_join_token(ttl, body.labels, &caller.0.account)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Labels follow the one rule of the control interface (`protocol::control`): short,
/// printable, and data wherever they go.
pub fn validate_label(key: &str, value: &str) -> Result<(), ApiError> {
    surplus_protocol::control::validate_label(key, value)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field(e.field))
}

impl From<LinkError> for ApiError {
    fn from(e: LinkError) -> Self {
        let message = e.to_string();
        match e {
            LinkError::Offline {
                agent_id,
                last_seen_ms,
            } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "agent_offline", message)
                .with_agent(agent_id, last_seen_ms),
            LinkError::Timeout { agent_id, .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "agent_timeout", message)
                    .with_agent(agent_id, None)
            }
            LinkError::Refused { agent_id, .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "agent_refused", message)
                    .with_agent(agent_id, None)
            }
            LinkError::Failed { agent_id, .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "agent_error", message)
                    .with_agent(agent_id, None)
            }
        }
    }
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

async fn control(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> ApiResult<crate::control::ControlResponse> {
    let Json(body) = body?;
    let request =
        crate::control::parse_request(body).map_err(crate::control::ControlError::from)?;
    Ok(Json(ctl.control(&caller.0, request).await?))
}

/// `GET /v1/instances?state=running&label=k=v&id=i-...`: DescribeInstances as a query.
async fn list_instances(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<crate::control::ControlResponse> {
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
    Ok(Json(ctl.control(&caller.0, request).await?))
}

/// `GET /v1/instances/{id}/logs?max_bytes=N`: the end of an instance's standard output
/// and error, for its owner (and admins).
async fn instance_logs(
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
    match ctl.control(&caller.0, request).await? {
        crate::control::ControlResponse::Logs(l) => Ok(Json(l)),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("unexpected answer {other:?}"),
        )),
    }
}

/// `GET /v1/volumes`: DescribeVolumes of everything the caller may see.
async fn list_volumes(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
) -> ApiResult<crate::control::ControlResponse> {
    let request = crate::control::ControlRequest::DescribeVolumes { ids: vec![] };
    Ok(Json(ctl.control(&caller.0, request).await?))
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

async fn agent_compat(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    let agent = load_agent(&ctl, &id).await?;
    // A host's compatibility results are its provider's business (and admins').
    billing::require_host_owner(&caller, &agent)?;
    let id = agent.id;
    let (report, at) = ctl.store.compat_report(id).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "agent {id} has not reported compatibility results (run surplus-agent compat --report)"
        ))
    })?;
    let mut value = serde_json::to_value(report).expect("report serializes");
    value["reported_at_ms"] = at.into();
    value["agent_id"] = id.to_string().into();
    Ok(Json(value))
}

/// `POST /v1/api-tokens {"account": "alice", "role": "client"}` (admin): a token for an
/// account, shown once.
async fn create_api_token(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<CreateApiTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    surplus_protocol::control::validate_name("account", &body.account)
        .map_err(|e| ApiError::bad_request(e.to_string()).with_field(e.field))?;
    let role = Role::parse(&body.role).map_err(|_| {
        ApiError::bad_request(format!(
            "role: {:?} is not admin, provider, client or pool_owner",
            body.role
        ))
        .with_field("role".into())
    })?;
    let (token, hash) = crate::datadir::new_api_token();
    let principal = Principal {
        account: body.account.clone(),
        role,
    };
    ctl.store
        .create_api_token(
            &hash,
            &principal,
            body.label.as_deref().unwrap_or(""),
            ctl.clock.now_ms(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "account": body.account, "role": role.as_str(), "token": token })),
    ))
}
