//! Agents, join tokens and API tokens: listing, inventory history, revocation, pings.

use surplus_api::agents::*;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::CompatLevel;

use super::*;
use crate::registry::measured_uptime;
use crate::store::{AgentFilter, AgentRecord, AgentSort, AgentStatus, InventoryBrief};

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("GET", "/v1/agents", Token, list_agents),
        route("GET", "/v1/agents/{id}", Token, show_agent),
        route(
            "GET",
            "/v1/agents/{id}/inventory/history",
            Token,
            inventory_history,
        ),
        route("POST", "/v1/agents/{id}/revoke", Token, revoke_agent),
        route("POST", "/v1/agents/{id}/ping", Token, ping_agent),
        route("POST", "/v1/tokens", Token, create_token),
        route("POST", "/v1/api-tokens", Token, create_api_token),
    ]
}

/// The agents the caller may see: every one for an admin, a provider's own hosts
/// (those whose `provider` label names its account); filtered, sorted and paged in the
/// database. `X-Total-Count` says how many the filter selects in all.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    params(
        ("status" = Option<String>, Query, description = "online, unreachable, revoked or enrolled"),
        ("q" = Option<String>, Query, description = "A part of the hostname, the start of the id, or a label as key=value"),
        ("gpu" = Option<String>, Query, description = "yes: hosts with a GPU; no: without"),
        ("compat" = Option<String>, Query, description = "The level of the last compatibility report (fully, highly, somewhat, incompatible), or none"),
        ("sort" = Option<String>, Query, description = "enrolled (default), hostname, status, last_seen, cpus, memory, gpus or uptime"),
        ("limit" = Option<u64>, Query, description = "At most this many (default: all)"),
        ("offset" = Option<u64>, Query, description = "Skipping this many"),
    ),
    responses((
        status = 200,
        description = "Every agent (admins), or the provider's own hosts",
        body = Vec<AgentView>,
        headers(("x-total-count" = u64, description = "How many agents the filter selects, all pages together")),
    ))
)]
pub(crate) async fn list_agents(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Result<([(&'static str, String); 1], Json<Vec<AgentView>>), ApiError> {
    let page = agents_page(&ctl, &caller, query.as_deref()).await?;
    Ok((
        [("x-total-count", page.total.to_string())],
        Json(page.agents),
    ))
}

/// A page of agents as `GET /v1/agents` answers it, with the counts by status the
/// console's fleet page shows beside it.
pub(crate) struct AgentsPage {
    /// The page.
    pub agents: Vec<AgentView>,
    /// How many the filter selects in all.
    pub total: u64,
    /// How many of the caller's agents are in each status (before the filter).
    pub by_status: Vec<(AgentStatus, u64)>,
    /// How many agents have a session open right now (admins only: it counts every
    /// agent).
    pub connected: Option<u64>,
}

/// What `GET /v1/agents` does: who may list, the query read, the page.
pub(crate) async fn agents_page(
    ctl: &Controller,
    caller: &Caller,
    query: Option<&str>,
) -> Result<AgentsPage, ApiError> {
    caller.require(Role::Provider)?;
    let mut filter = agent_filter(query)?;
    if caller.0.role != Role::Admin {
        filter.provider = Some(caller.0.account.clone());
    }
    let now = ctl.app.clock.now_ms();
    let page = ctl.app.store.agent_page(&filter, now).await?;
    Ok(AgentsPage {
        agents: page
            .agents
            .iter()
            .map(|l| {
                agent_view_with(
                    &l.agent,
                    &l.inventory,
                    l.compat,
                    ctl.app.link.is_connected(l.agent.id),
                    now,
                )
            })
            .collect(),
        total: page.total,
        by_status: page.by_status,
        connected: (caller.0.role == Role::Admin).then(|| ctl.app.registry.connected() as u64),
    })
}

/// The filter of `GET /v1/agents?status=&q=&gpu=&compat=&sort=&limit=&offset=`.
fn agent_filter(query: Option<&str>) -> Result<AgentFilter, ApiError> {
    let q = billing::query_map(
        query,
        &["status", "q", "gpu", "compat", "sort", "limit", "offset"],
    )?;
    let bad =
        |field: &str, message: String| ApiError::bad_request(message).with_field(field.into());
    let given = |k: &str| q.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let number = |k: &str| -> Result<Option<u64>, ApiError> {
        given(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(k, format!("{k}: {v:?} is not a whole number")))
            })
            .transpose()
    };
    let mut filter = AgentFilter {
        limit: number("limit")?,
        offset: number("offset")?.unwrap_or(0),
        ..AgentFilter::default()
    };
    if let Some(s) = given("status") {
        filter.status = Some(AgentStatus::parse(s).map_err(|_| {
            bad(
                "status",
                format!("status {s:?} is not online, unreachable, revoked or enrolled"),
            )
        })?);
    }
    if let Some(t) = given("q") {
        match t.split_once('=') {
            Some((k, v)) => filter.label = Some((k.trim().to_owned(), v.trim().to_owned())),
            None => filter.text = Some(t.to_owned()),
        }
    }
    filter.gpu = match given("gpu") {
        None => None,
        Some("yes") => Some(true),
        Some("no") => Some(false),
        Some(other) => return Err(bad("gpu", format!("gpu {other:?} is not yes or no"))),
    };
    filter.compat = match given("compat") {
        None => None,
        Some("none") => Some(None),
        Some(level) => Some(Some(surplus_market::records::from_name(level).ok_or_else(
            || {
                bad(
                    "compat",
                    format!(
                        "compat {level:?} is not fully, highly, somewhat, incompatible or none"
                    ),
                )
            },
        )?)),
    };
    if let Some(s) = given("sort") {
        filter.sort = AgentSort::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, sort)| *sort)
            .ok_or_else(|| {
                let names: Vec<&str> = AgentSort::ALL.iter().map(|(n, _)| *n).collect();
                bad("sort", format!("sort {s:?} is not {}", names.join(", ")))
            })?;
    }
    Ok(filter)
}

#[utoipa::path(get, path = "/v1/agents/{id}", tag = "agents", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The agent with its inventory and sessions", body = AgentDetail)))]
pub(crate) async fn show_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AgentDetail> {
    let agent = load_agent(&ctl, &id).await?;
    billing::require_host_owner(&caller, &agent)?;
    let id = agent.id;
    let sessions = ctl.app.store.sessions(id, 20).await?;
    let history = ctl.app.store.inventory_history(id, 50).await?;
    let compat = compat_level(&ctl, id).await?;
    Ok(Json(AgentDetail {
        agent: agent_view(
            &agent,
            compat,
            ctl.app.link.is_connected(id),
            ctl.app.clock.now_ms(),
        ),
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

#[utoipa::path(get, path = "/v1/agents/{id}/inventory/history", tag = "agents", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The agent's inventories as recorded, newest first (at most 1000)", body = Vec<crate::store::InventoryChange>)))]
async fn inventory_history(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Vec<crate::store::InventoryChange>> {
    let agent = load_agent(&ctl, &id).await?;
    billing::require_host_owner(&caller, &agent)?;
    Ok(Json(ctl.app.store.inventory_history(agent.id, 1000).await?))
}

#[utoipa::path(post, path = "/v1/agents/{id}/revoke", tag = "agents", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The agent, revoked", body = AgentView)))]
pub(crate) async fn revoke_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<AgentView> {
    caller.require(Role::Admin)?;
    let id = parse_id(&id)?;
    ctl.agents.revoke(id).await?;
    let agent = ctl
        .app
        .store
        .agent(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("agent {id} not found")))?;
    let compat = compat_level(&ctl, id).await?;
    Ok(Json(agent_view(
        &agent,
        compat,
        false,
        ctl.app.clock.now_ms(),
    )))
}

/// The level of the agent's last compatibility-kit report.
async fn compat_level(
    ctl: &Controller,
    id: Uuid,
) -> Result<Option<surplus_protocol::control::CompatLevel>, ApiError> {
    Ok(ctl.app.store.compat_report(id).await?.map(|(r, _)| r.level))
}

#[utoipa::path(post, path = "/v1/agents/{id}/ping", tag = "agents", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "The round trip", body = PingView)))]
async fn ping_agent(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<PingView> {
    caller.require(Role::Admin)?;
    let agent = load_agent(&ctl, &id).await?;
    let rtt = ctl.agents.ping(agent.id).await?;
    Ok(Json(PingView {
        agent_id: agent.id,
        rtt_ms: rtt.as_secs_f64() * 1000.0,
    }))
}

#[utoipa::path(post, path = "/v1/tokens", tag = "agents", request_body = CreateTokenRequest, responses((status = 201, description = "A join token for enrolling agents", body = CreatedToken)))]
async fn create_token(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<CreateTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    let ttl = match body.ttl.as_deref() {
        None => ctl.app.config.join_token_ttl,
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
        .agents
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

/// `POST /v1/api-tokens {"account": "alice", "role": "client"}` (admin): a token for an
/// account, shown once.
#[utoipa::path(post, path = "/v1/api-tokens", tag = "agents", request_body = CreateApiTokenRequest, responses((status = 201, description = "An API token (shown once)", body = CreatedApiToken)))]
async fn create_api_token(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<CreateApiTokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedApiToken>), ApiError> {
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
    if role == Role::Provider && body.account == crate::billing::HOUSE_PROVIDER {
        // Hosts without a provider label are the house's: a provider token of that
        // name would own them all.
        return Err(ApiError::bad_request(format!(
            "account: {:?} is the marketplace's own provider (hosts without a provider label); choose another name",
            body.account
        ))
        .with_field("account".into()));
    }
    let (token, hash) = crate::datadir::new_api_token();
    let principal = Principal {
        account: body.account.clone(),
        role,
    };
    ctl.app
        .store
        .create_api_token(
            &hash,
            &principal,
            body.label.as_deref().unwrap_or(""),
            ctl.app.clock.now_ms(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiToken {
            account: body.account,
            role,
            token,
        }),
    ))
}

/// The view of a stored agent at `now_ms`.
pub fn agent_view(
    a: &AgentRecord,
    compat: Option<CompatLevel>,
    connected: bool,
    now_ms: UnixMillis,
) -> AgentView {
    agent_view_with(
        a,
        &InventoryBrief::of(a.inventory.as_ref()),
        compat,
        connected,
        now_ms,
    )
}

/// The view of a stored agent at `now_ms`, its inventory's facts read apart.
pub fn agent_view_with(
    a: &AgentRecord,
    inventory: &InventoryBrief,
    compat: Option<CompatLevel>,
    connected: bool,
    now_ms: UnixMillis,
) -> AgentView {
    let (online_ms, uptime_ratio) = measured_uptime(
        a.first_seen_ms,
        a.online_total_ms,
        a.online_since_ms,
        now_ms,
    );
    AgentView {
        id: a.id,
        hostname: a.hostname.clone(),
        labels: a.labels.clone(),
        status: a.status,
        connected,
        agent_version: a.agent_version.clone(),
        cert_serial: a.cert_serial.clone(),
        cert_not_after_ms: a.cert_not_after_ms,
        enrolled_at_ms: a.enrolled_at_ms,
        first_seen_ms: a.first_seen_ms,
        last_seen_ms: a.last_seen_ms,
        online_ms,
        uptime_ratio,
        revoked_at_ms: a.revoked_at_ms,
        cpus: inventory.cpus,
        memory_bytes: inventory.memory_bytes,
        os: inventory.os.clone(),
        gpus: inventory.gpus,
        gpu: inventory.gpu.clone(),
        compat_level: compat,
        isolation: a.isolation.clone(),
    }
}
