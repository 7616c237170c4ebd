//! The web console: server-rendered pages for operators, providers and clients, served
//! by `surplus-controller serve` under `/console/`.
//!
//! Thinner than the API: a page calls the API's own handlers in the process (the same
//! authorization, the same answers, the same errors) and renders what they return, so
//! the console shows and allows exactly what the API allows the signed-in token, and a
//! page another role may not see is the API's 403 rendered as a page. A capability adds
//! its pages by writing a module with a `routes()` like [`fleet`], [`instances`] and
//! [`money`] and adding it to [`router`]; the layout's navigation (`view::page`) lists
//! the pages per role.
//!
//! - Sign-in with an API token; the session is a random id in a cookie (HttpOnly,
//!   SameSite=Strict, Path=/console, Secure when the request came over HTTPS), kept in
//!   the controller's memory ([`Sessions`]) with an expiry (`console_session_ttl`).
//!   Each request checks the token again, so revoking a token ends its sessions; a
//!   restart of the controller ends them all.
//! - Every state-changing request is a POST form carrying the session's CSRF token,
//!   checked before the handler runs, and refused when its `Origin` is another site.
//! - No script at all: live parts refresh themselves (`<meta http-equiv="refresh">`)
//!   and confirmations are pages. The Content-Security-Policy allows only the
//!   console's own stylesheet, which is compiled into the binary.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{Markup, html};
use surplus_market::records::Role;
use surplus_protocol::clock::UnixMillis;

use crate::app::Controller;
use crate::datadir::api_token_hash;
use crate::http::{ApiError, Caller};
use crate::store::Principal;

mod api_docs;
mod brokerage;
mod buy;
mod fleet;
mod instances;
mod market;
mod money;
mod pools;
mod providers;
mod usage;
mod view;

/// The session cookie.
const COOKIE: &str = "surplus_session";

/// The stylesheet, compiled in.
const STYLE: &str = include_str!("console.css");

/// The Content-Security-Policy of every console answer: the console's own stylesheet
/// and nothing else (no script, no frames, forms only to itself).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Signed-in browsers: session id (its hash) to the token it was opened with.
#[derive(Debug, Default)]
pub struct Sessions(std::sync::Mutex<HashMap<String, Session>>);

/// Most sessions one API token holds at once; signing in again past it ends the
/// oldest.
const SESSIONS_PER_TOKEN: usize = 16;
/// Most sessions in all; past it, signing in ends the one closest to its expiry.
const SESSIONS_MAX: usize = 10_000;

#[derive(Debug, Clone)]
struct Session {
    /// The API token's stored hash: the principal is looked up on every request.
    token_hash: String,
    /// The token every form of this session carries.
    csrf: String,
    expires_at_ms: UnixMillis,
}

impl Sessions {
    /// Opens a session for the token with `token_hash`; returns its id (the cookie).
    fn open(&self, token_hash: String, now_ms: UnixMillis, ttl_ms: i64) -> String {
        let (id, key) = crate::datadir::new_api_token();
        let (csrf, _) = crate::datadir::new_api_token();
        let mut map = self.0.lock().expect("sessions poisoned");
        map.retain(|_, s| s.expires_at_ms > now_ms);
        let oldest = |map: &HashMap<String, Session>, same_token: bool| {
            map.iter()
                .filter(|(_, s)| !same_token || s.token_hash == token_hash)
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| k.clone())
        };
        if map.values().filter(|s| s.token_hash == token_hash).count() >= SESSIONS_PER_TOKEN {
            if let Some(k) = oldest(&map, true) {
                map.remove(&k);
            }
        }
        if map.len() >= SESSIONS_MAX {
            if let Some(k) = oldest(&map, false) {
                map.remove(&k);
            }
        }
        map.insert(
            key,
            Session {
                token_hash,
                csrf,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
            },
        );
        id
    }

    fn get(&self, id: &str, now_ms: UnixMillis) -> Option<Session> {
        let key = api_token_hash(id);
        let mut map = self.0.lock().expect("sessions poisoned");
        match map.get(&key) {
            Some(s) if s.expires_at_ms > now_ms => Some(s.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, id: &str) {
        self.0
            .lock()
            .expect("sessions poisoned")
            .remove(&api_token_hash(id));
    }

    /// Sessions open now (expired ones included until they are next looked at).
    pub fn len(&self) -> usize {
        self.0.lock().expect("sessions poisoned").len()
    }

    /// No session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The signed-in user of a console request, put in by [`signed_in`].
#[derive(Debug, Clone)]
pub(crate) struct Signed {
    pub principal: Principal,
    pub csrf: String,
}

/// The fields of a POSTed form, read (and its CSRF token checked) by [`signed_in`].
#[derive(Debug, Clone, Default)]
pub(crate) struct FormFields(pub Vec<(String, String)>);

impl FormFields {
    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key` (a repeated field: the ticked boxes of a group).
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of `key`, trimmed, when it is not empty.
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }
}

/// A filter form as the API's query takes it: the fields the user filled in (an empty
/// field means "any", so it is left out).
#[derive(Debug, Default)]
pub(crate) struct Filled(Vec<(String, String)>);

impl Filled {
    /// The filled-in fields of `query`.
    pub fn of(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .map(|(k, v)| (k, v.trim().to_owned()))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        )
    }

    /// The first value of `key`, or `""`.
    pub fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }

    /// The fields as a query string, for the API's handler.
    pub fn query(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(&self.0)
            .finish()
    }
}

/// A console failure, rendered as a page with its status.
#[derive(Debug)]
pub(crate) struct PageError {
    status: StatusCode,
    message: String,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let message = match e.field() {
            Some(field) if !e.message().contains(field) => format!("{field}: {}", e.message()),
            _ => e.message().to_owned(),
        };
        Self::new(e.status(), message)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let title = match self.status {
            StatusCode::FORBIDDEN => "Not allowed".to_owned(),
            StatusCode::NOT_FOUND => "Not found".to_owned(),
            s => format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or("Error")),
        };
        let body = view::bare(
            &title,
            html! {
                h1 { (title) }
                p.error role="alert" { (self.message) }
                p { a href="/console/" { "Back to the console" } }
            },
        );
        (self.status, body).into_response()
    }
}

pub(crate) type Page = Result<Markup, PageError>;

/// The console's routes, under `/console/`.
pub(crate) fn router(ctl: Arc<Controller>) -> Router<Arc<Controller>> {
    let pages = Router::new()
        .route("/console/", get(home))
        .route("/console/sign-out", axum::routing::post(sign_out))
        .merge(api_docs::routes())
        .merge(brokerage::routes())
        .merge(buy::routes())
        .merge(fleet::routes())
        .merge(instances::routes())
        .merge(market::routes())
        .merge(money::routes())
        .merge(pools::routes())
        .merge(providers::routes())
        .merge(usage::routes())
        .route_layer(middleware::from_fn_with_state(ctl, signed_in));
    Router::new()
        .merge(pages)
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/console.css", get(style))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/", get(|| async { Redirect::to("/console/") }))
        .method_not_allowed_fallback(|method: Method| async move {
            PageError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("This page does not answer {method}."),
            )
        })
        .route(
            "/console/{*rest}",
            axum::routing::any(|| async {
                PageError::new(StatusCode::NOT_FOUND, "There is no such page.")
            }),
        )
        .layer(middleware::from_fn(security_headers))
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
        .into_response()
}

/// The value of cookie `name`, when the request carries exactly one: a second one of
/// the same name was planted by someone else (another path, a sibling site), and
/// which of them is ours cannot be told.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Did the request come over HTTPS (directly, or through a proxy that says so)?
fn over_https(request_headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    uri.scheme_str() == Some("https")
        || request_headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// A POST from another site is refused whatever it carries. Browsers say where a
/// request comes from in `Sec-Fetch-Site`, which a proxy in front does not rewrite;
/// without it, `Origin` must name the host the request was sent to (a request with
/// neither is not from a browser's form).
fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        // `none`: typed or bookmarked by the user.
        return site == "same-origin" || site == "none";
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    origin_host.is_some() && origin_host == host
}

/// Where `/console/sign-in?next=...` may send a browser back: a console path only.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/console/")
                && !n.contains("..")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/console/".to_owned(),
    }
}

/// Most bytes of a sign-in form (a token and where to go next).
const SIGN_IN_MAX_BYTES: usize = 4096;

/// Reads a form body within the API's limits.
async fn read_form(
    ctl: &Controller,
    request: Request,
) -> Result<(axum::http::request::Parts, FormFields), PageError> {
    read_form_within(ctl, request, ctl.app.config.http_max_body_bytes).await
}

/// Reads a form body of at most `limit` bytes within the API's read timeout.
async fn read_form_within(
    ctl: &Controller,
    request: Request,
    limit: usize,
) -> Result<(axum::http::request::Parts, FormFields), PageError> {
    let config = crate::config::ControllerConfig {
        http_max_body_bytes: limit.min(ctl.app.config.http_max_body_bytes),
        http_body_read_timeout: ctl.app.config.http_body_read_timeout,
        ..crate::config::ControllerConfig::default()
    };
    let request = crate::http::read_body(&config, request).await?;
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, config.http_max_body_bytes)
        .await
        .map_err(|e| PageError::bad_request(format!("reading the form: {e}")))?;
    let fields = form_urlencoded::parse(&bytes).into_owned().collect();
    Ok((parts, FormFields(fields)))
}

/// The sign-in gate of every page but sign-in itself: a live session whose token is
/// still valid, and on a POST the session's CSRF token and a same-site origin.
async fn signed_in(State(ctl): State<Arc<Controller>>, request: Request, next: Next) -> Response {
    let now = ctl.app.clock.now_ms();
    let to_sign_in = |request: &Request| {
        // Back to the page after signing in; a form's target is no page to go back to.
        let next = match *request.method() {
            Method::GET => request
                .uri()
                .path_and_query()
                .map_or("/console/", |p| p.as_str()),
            _ => "/console/",
        }
        .to_owned();
        let to = format!(
            "/console/sign-in?next={}",
            form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        Redirect::to(&to).into_response()
    };
    let Some(id) = cookie(request.headers(), COOKIE).map(str::to_owned) else {
        return to_sign_in(&request);
    };
    let Some(session) = ctl.console.get(&id, now) else {
        return to_sign_in(&request);
    };
    let principal = match ctl.app.store.api_principal(&session.token_hash).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            // The token was revoked: its sessions end with it.
            ctl.console.close(&id);
            return to_sign_in(&request);
        }
        Err(e) => return PageError::from(ApiError::from(e)).into_response(),
    };
    let mut request = request;
    if request.method() == Method::POST {
        if !same_origin(request.headers()) {
            return PageError::new(
                StatusCode::FORBIDDEN,
                "this form was sent from another site",
            )
            .into_response();
        }
        let (parts, fields) = match read_form(&ctl, request).await {
            Ok(read) => read,
            Err(e) => return e.into_response(),
        };
        let sent = fields.get("csrf").unwrap_or("");
        if !constant_time_eq(sent.as_bytes(), session.csrf.as_bytes()) {
            return PageError::new(
                StatusCode::FORBIDDEN,
                "this form is out of date or was not sent from the console; reload the page and try again",
            )
            .into_response();
        }
        request = Request::from_parts(parts, axum::body::Body::empty());
        request.extensions_mut().insert(fields);
    }
    request.extensions_mut().insert(Caller(principal.clone()));
    request.extensions_mut().insert(Signed {
        principal,
        csrf: session.csrf,
    });
    next.run(request).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Signed {
    type Rejection = PageError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, PageError> {
        parts
            .extensions
            .get::<Signed>()
            .cloned()
            .ok_or_else(|| PageError::new(StatusCode::UNAUTHORIZED, "sign in first"))
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for FormFields {
    type Rejection = PageError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, PageError> {
        Ok(parts
            .extensions
            .get::<FormFields>()
            .cloned()
            .unwrap_or_default())
    }
}

/// The first page: the fleet for admins, instances for clients, the statement for
/// providers, balances for pool owners.
async fn home(signed: Signed) -> Redirect {
    match signed.principal.role {
        Role::Admin => Redirect::to("/console/fleet"),
        Role::Client => Redirect::to("/console/instances"),
        Role::Provider => Redirect::to("/console/fleet"),
        Role::PoolOwner => Redirect::to("/console/balances"),
    }
}

#[derive(serde::Deserialize, Default)]
struct SignInQuery {
    next: Option<String>,
}

async fn sign_in_page(query: axum::extract::Query<SignInQuery>) -> Markup {
    sign_in_form(query.next.as_deref(), None)
}

fn sign_in_form(next: Option<&str>, error: Option<&str>) -> Markup {
    view::bare(
        "Sign in",
        html! {
            h1 { "Sign in to Surplus" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/console/sign-in" {
                input type="hidden" name="next" value=(safe_next(next));
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                button type="submit" { "Sign in" }
            }
            p.hint { "An API token from " code { "surplus-controller init" } " (the admin's) or from "
                code { "surplus api-tokens create" } "." }
        },
    )
}

async fn sign_in(State(ctl): State<Arc<Controller>>, request: Request) -> Response {
    if !same_origin(request.headers()) {
        return PageError::new(
            StatusCode::FORBIDDEN,
            "this form was sent from another site",
        )
        .into_response();
    }
    let https = over_https(request.headers(), request.uri());
    // Anyone may post here: read little, and not for long.
    let (_, fields) = match read_form_within(&ctl, request, SIGN_IN_MAX_BYTES).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let next = safe_next(fields.get("next"));
    let token = fields.get("token").unwrap_or("").trim();
    let hash = api_token_hash(token);
    match ctl.app.store.api_principal(&hash).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return (
                StatusCode::UNAUTHORIZED,
                sign_in_form(Some(&next), Some("Unknown or revoked API token.")),
            )
                .into_response();
        }
        Err(e) => return PageError::from(ApiError::from(e)).into_response(),
    }
    let ttl = ctl.app.config.console_session_ttl;
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let id = ctl.console.open(hash, ctl.app.clock.now_ms(), ttl_ms);
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl.as_secs(),
        if https { "; Secure" } else { "" }
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to(&next)).into_response()
}

async fn sign_out(State(ctl): State<Arc<Controller>>, request: Request) -> Response {
    if let Some(id) = cookie(request.headers(), COOKIE) {
        ctl.console.close(id);
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/console/sign-in"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_in_the_console() {
        assert_eq!(
            safe_next(Some("/console/fleet?status=online")),
            "/console/fleet?status=online"
        );
        for hostile in [
            "https://evil.example/",
            "//evil.example/console/",
            "/v1/agents",
            "/console/../v1/agents",
            "/console/a\\b",
            "/console/a\nb",
            "/console/ä",
        ] {
            assert_eq!(safe_next(Some(hostile)), "/console/", "{hostile}");
        }
        assert_eq!(safe_next(None), "/console/");
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7080"));
        assert!(
            same_origin(&h),
            "no Origin: not a browser's cross-site form"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:7080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
        // Behind a proxy that rewrites Host, the browser's own word decides.
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://console.example"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(!same_origin(&h), "a sibling subdomain is another site");
    }

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::default();
        let id = s.open("hash".into(), 1_000, 500);
        assert_eq!(s.get(&id, 1_499).map(|s| s.token_hash), Some("hash".into()));
        assert!(s.get(&id, 1_500).is_none(), "expired at its end");
        assert!(s.is_empty(), "an expired session is dropped when met");
        let id = s.open("hash".into(), 2_000, 500);
        assert!(s.get("spl_not-a-session", 2_001).is_none());
        s.close(&id);
        assert!(s.get(&id, 2_001).is_none());
        // One token cannot pile up sessions: the oldest makes room.
        let first = s.open("busy".into(), 3_000, 1_000_000);
        for n in 1..=SESSIONS_PER_TOKEN as i64 {
            s.open("busy".into(), 3_000 + n, 1_000_000);
        }
        assert_eq!(s.len(), SESSIONS_PER_TOKEN);
        assert!(s.get(&first, 3_100).is_none(), "the oldest ended");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; surplus_session=xyz; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
        // A second cookie of the name, planted under a longer path: neither counts.
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("surplus_session=planted; surplus_session=xyz"),
        );
        assert_eq!(cookie(&h, COOKIE), None);
    }
}
