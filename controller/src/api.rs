//! JSON shapes of the HTTP API, shared by the server and the `surplus` CLI.

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::registry::measured_uptime;
use crate::store::{AgentRecord, AgentStatus, Labels, SessionRecord};

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code (`not_found`, `bad_request`, `unauthorized`, ...).
    pub error: String,
    /// What went wrong, for people.
    pub message: String,
    /// The request field at fault, for `bad_request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The agent concerned, for agent errors (`agent_offline`, `agent_timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<uuid::Uuid>,
    /// When that agent was last seen, for `agent_offline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    /// The numbers behind a refusal (`waiting_for` of `usage_pending`, `balance` and
    /// `needed` of `insufficient_funds`, ...).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/api-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApiTokenRequest {
    /// The account the token acts for.
    pub account: String,
    /// `client`, `provider`, `pool_owner` or `admin`.
    pub role: String,
    /// A note on what the token is for.
    #[serde(default)]
    pub label: Option<String>,
}

/// An agent as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    /// Agent id.
    pub id: Uuid,
    /// Host name.
    pub hostname: String,
    /// Labels.
    pub labels: Labels,
    /// Registry status.
    pub status: AgentStatus,
    /// Connected right now.
    pub connected: bool,
    /// Agent software version.
    pub agent_version: String,
    /// Current certificate serial.
    pub cert_serial: String,
    /// Current certificate expiry.
    pub cert_not_after_ms: UnixMillis,
    /// Enrollment time.
    pub enrolled_at_ms: UnixMillis,
    /// First session.
    pub first_seen_ms: Option<UnixMillis>,
    /// Last heartbeat or session event.
    pub last_seen_ms: Option<UnixMillis>,
    /// Time online since first seen, ms.
    pub online_ms: i64,
    /// Measured uptime as a fraction of the time since first seen.
    pub uptime_ratio: Option<f64>,
    /// Revocation time.
    pub revoked_at_ms: Option<UnixMillis>,
    /// Logical CPUs from the inventory.
    pub cpus: Option<u64>,
    /// Memory from the inventory, bytes.
    pub memory_bytes: Option<u64>,
    /// OS name and version from the inventory.
    pub os: Option<String>,
    /// How the host isolates client instances (`host_user` when the provider runs
    /// them as the agent's own user).
    pub isolation: Option<surplus_protocol::control::Isolation>,
}

impl AgentView {
    /// The view of a stored agent at `now_ms`.
    pub fn new(a: &AgentRecord, connected: bool, now_ms: UnixMillis) -> Self {
        let (online_ms, uptime_ratio) = measured_uptime(
            a.first_seen_ms,
            a.online_total_ms,
            a.online_since_ms,
            now_ms,
        );
        let inv = a.inventory.as_ref();
        let os = inv.and_then(|i| {
            let name = i.pointer("/os/name")?.as_str()?;
            let version = i
                .pointer("/os/version")
                .and_then(|v| v.as_str())
                .unwrap_or("");
            Some(format!("{name} {version}").trim().to_owned())
        });
        Self {
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
            cpus: inv.and_then(|i| i.pointer("/cpu/logical_cpus")?.as_u64()),
            memory_bytes: inv.and_then(|i| i.pointer("/memory/total_bytes")?.as_u64()),
            os,
            isolation: a.isolation.clone(),
        }
    }
}

/// One entry of an agent's inventory history (without the inventory body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InventoryChangeView {
    /// When recorded.
    pub recorded_at_ms: UnixMillis,
    /// Hex SHA-256.
    pub digest: String,
}

/// `GET /v1/agents/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The agent.
    #[serde(flatten)]
    pub agent: AgentView,
    /// Current inventory.
    pub inventory: Option<serde_json::Value>,
    /// Recent sessions, newest first.
    pub sessions: Vec<SessionRecord>,
    /// Inventory changes, newest first.
    pub inventory_history: Vec<InventoryChangeView>,
}

/// `POST /v1/tokens` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime such as `30m` or `2h`; the configured default when absent.
    pub ttl: Option<String>,
    /// Labels given to the agent that enrolls with the token.
    #[serde(default)]
    pub labels: Labels,
}
