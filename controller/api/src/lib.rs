//! Every body the Surplus HTTP API takes and gives, and its JSON error body: one
//! definition shared by the server (`surplus-controller`), the `surplus` CLI and,
//! later, the web console and the OpenAPI description. Plain data: no HTTP framework,
//! no storage, no I/O.
//!
//! The records the controller keeps and shows as they are (sessions, validation runs,
//! usage rows, invoice lines, and their status enums) are defined in
//! `surplus-market` and re-exported here, so the server and its clients share them
//! too.

pub mod agents;
pub mod billing;
pub mod brokerage;
pub mod control;
pub mod market;
pub mod pools;
pub mod resell;
pub mod validation;

use serde::{Deserialize, Serialize};

pub use surplus_market::records::{
    AgentStatus, InvoiceLine, Labels, Role, RunStatus, SessionRecord, UsageRow, ValidationRun,
};

/// `GET /v1/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok` when the controller answers.
    pub status: String,
    /// The controller's version.
    pub version: String,
    /// Agents with an open session.
    pub connected_agents: usize,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
