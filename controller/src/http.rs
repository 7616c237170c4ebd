//! The HTTP/JSON API. Thin: it authenticates, parses, calls a capability's service
//! (or reads the store), and renders. Every error is `{ "error": code, "message": text }`, including
//! those of the transport: unknown paths (404), methods (405), slow bodies (408),
//! large bodies (413), long targets (414) and large headers (431).
//!
//! Each capability's module (`agents`, `validation`, `control`, `billing`, `resell`,
//! `market`) lists its own routes; [`routes`] is their union, which the router is
//! built from, so the list (and the authorization matrix tested against it) cannot
//! drift from what is served.
//! The router also mounts the web console (`crate::console`) under `/console/`, whose
//! pages call these handlers; its answers are HTML pages, not JSON.

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
use surplus_api::ErrorBody;
use uuid::Uuid;

pub(crate) mod agents;
pub mod billing;
pub(crate) mod brokerage;
pub(crate) mod control;
pub(crate) mod market;
pub(crate) mod openapi;
pub(crate) mod pools;
pub(crate) mod resell;
pub(crate) mod validation;

pub use agents::{agent_view, validate_label};

use crate::app::Controller;
use crate::datadir::api_token_hash;
use crate::link::LinkError;
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
    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }
    /// The message for people.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }
    /// The field at fault, when one is.
    pub(crate) fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
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

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// The authenticated caller, put in the request by the auth layer (the API's bearer
/// token, or the console's session).
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Principal);

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
    pub(crate) fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.role == role || self.0.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                match role {
                    Role::Admin => "this needs the admin role".to_owned(),
                    _ => format!("this needs the {} or the admin role", role.as_str()),
                },
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
        .app
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
    let request = read_body(&ctl.app.config, request).await?;
    Ok(next.run(request).await)
}

/// Reads the whole body of an authenticated request within
/// `http_body_read_timeout` (408) and `http_max_body_bytes` (413). Only authenticated
/// requests are read, so a stranger cannot make the API hold bodies in memory (the
/// console's sign-in form, which anyone may post, is read with a limit of 4 KiB).
pub(crate) async fn read_body(
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
    let max_uri = ctl.app.config.http_max_uri_bytes;
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
    let max_headers = ctl.app.config.http_max_header_bytes;
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
    ctl.app
        .store
        .agent(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent {id} not found")))
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
        "DELETE" => MethodFilter::DELETE,
        other => panic!("route {path}: method {other} is not GET, POST, PUT or DELETE"),
    };
    Route {
        method,
        path,
        access,
        service: axum::routing::on(filter, handler),
    }
}

/// Every route of the API, the one list the router is built from: the operational
/// ones here, then each capability's own.
fn table() -> Vec<Route> {
    let mut all = vec![
        route("GET", "/v1/health", Access::Public, health),
        route("GET", "/metrics", Access::Public, metrics),
        route(
            "GET",
            "/openapi.json",
            Access::Public,
            openapi::openapi_json,
        ),
    ];
    all.extend(agents::routes());
    all.extend(validation::routes());
    all.extend(control::routes());
    all.extend(billing::routes());
    all.extend(resell::routes());
    all.extend(market::routes());
    all.extend(pools::routes());
    all.extend(brokerage::routes());
    all
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
    // The API's 405 is JSON; the console's routes, merged after, keep their own (a
    // page).
    let api = Router::new()
        .merge(public)
        .merge(authed)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .merge(api)
        .merge(crate::console::router(ctl.clone()))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        // Bodies are read and limited by `read_body`; the extractors' own limit must
        // not be lower.
        .layer(DefaultBodyLimit::max(ctl.app.config.http_max_body_bytes))
        .layer(middleware::from_fn_with_state(ctl.clone(), request_limits))
        .with_state(ctl)
}

/// Whether the controller is up, its version and how many agents are connected.
#[utoipa::path(get, path = "/v1/health", tag = "operations", responses((status = 200, description = "The controller is up", body = surplus_api::Health)))]
async fn health(State(ctl): State<Arc<Controller>>) -> Json<surplus_api::Health> {
    Json(surplus_api::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        connected_agents: ctl.app.registry.connected(),
    })
}

/// Prometheus text exposition; unauthenticated like most scrape targets (the API
/// listens on loopback by default).
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text", body = String)))]
async fn metrics(State(ctl): State<Arc<Controller>>) -> Result<Response, ApiError> {
    let by_status = ctl
        .app
        .store
        .agent_status_counts()
        .await?
        .into_iter()
        .map(|(s, n)| (s.as_str(), n))
        .collect();
    let snapshot = crate::metrics::Snapshot {
        connected: ctl.app.registry.connected() as i64,
        by_status,
    };
    let body = ctl.app.metrics.render(&snapshot);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
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

pub(crate) fn form_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}
