//! Agents, join tokens and API tokens.

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::{AgentStatus, Labels, SessionRecord};

/// `POST /v1/api-tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// GPUs from the inventory (0 for none).
    pub gpus: Option<u64>,
    /// The first GPU's model (else its vendor, else its PCI ids).
    pub gpu: Option<String>,
    /// The level of the host driver's last compatibility-kit report.
    pub compat_level: Option<surplus_protocol::control::CompatLevel>,
    /// How the host isolates client instances (`host_user` when the provider runs
    /// them as the agent's own user).
    pub isolation: Option<surplus_protocol::control::Isolation>,
}

/// One entry of an agent's inventory history (without the inventory body).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InventoryChangeView {
    /// When recorded.
    pub recorded_at_ms: UnixMillis,
    /// Hex SHA-256.
    pub digest: String,
}

/// `GET /v1/agents/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Lifetime such as `30m` or `2h`; the configured default when absent.
    pub ttl: Option<String>,
    /// Labels given to the agent that enrolls with the token.
    #[serde(default)]
    pub labels: Labels,
}

/// A join token just created.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedToken {
    /// Token id.
    pub id: Uuid,
    /// The printable token; shown once, only its secret's hash is stored.
    pub token: String,
    /// Expiry.
    pub expires_at_ms: UnixMillis,
    /// Where agents enroll.
    pub enroll_addresses: Vec<String>,
    /// The pinned CA fingerprint, `AB:CD:...`.
    pub ca_fingerprint: String,
    /// Labels agents enrolled with it get.
    pub labels: Labels,
}

/// `POST /v1/agents/{id}/ping` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PingView {
    /// The agent.
    pub agent_id: Uuid,
    /// Round trip controller → agent → controller, ms.
    pub rtt_ms: f64,
}

/// `POST /v1/api-tokens` answer (201): the token, shown once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedApiToken {
    /// The account it acts for.
    pub account: String,
    /// Its role.
    pub role: crate::Role,
    /// The bearer token; only its hash is stored.
    pub token: String,
}

/// `GET /v1/agents/{id}/compat`: the last compatibility-kit results an agent reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompatView {
    /// The agent.
    pub agent_id: Uuid,
    /// When the controller stored the report.
    pub reported_at_ms: UnixMillis,
    /// The results.
    #[serde(flatten)]
    pub report: surplus_protocol::control::CompatReport,
}
