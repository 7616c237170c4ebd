//! The records the controller keeps that every layer shows: the store saves and
//! loads them, `surplus-api` sends them, the decisions here read them. Plain data,
//! with the one text form each enum is stored and sent in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

/// The text form of a unit enum variant (what serde writes: `on_demand`, `fully`);
/// empty for a value that is not a plain string.
pub fn name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The unit enum variant a text form names (the reverse of [`name_of`]).
pub fn from_name<T: serde::de::DeserializeOwned>(text: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

/// The text forms of several values, joined with `, `.
pub fn names_of<'a, T: Serialize + 'a>(values: impl IntoIterator<Item = &'a T>) -> String {
    values
        .into_iter()
        .map(name_of)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A stored value that is none of an enum's forms (a corrupt row, a newer writer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is unknown")]
pub struct UnknownValue {
    /// What was parsed (`agent status`, `role`, ...).
    pub what: &'static str,
    /// The text found.
    pub value: String,
}

impl UnknownValue {
    fn new(what: &'static str, value: &str) -> Self {
        Self {
            what,
            value: value.to_owned(),
        }
    }
}

/// Labels: ordered key/value pairs.
pub type Labels = BTreeMap<String, String>;

/// Agent status as the registry shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// Enrolled, never connected.
    Enrolled,
    /// Connected and heartbeating.
    Online,
    /// Disconnected or heartbeats missed.
    Unreachable,
    /// Refused for good.
    Revoked,
}

impl AgentStatus {
    /// Storage form.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Enrolled => "enrolled",
            AgentStatus::Online => "online",
            AgentStatus::Unreachable => "unreachable",
            AgentStatus::Revoked => "revoked",
        }
    }

    /// Parses the storage form.
    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "enrolled" => AgentStatus::Enrolled,
            "online" => AgentStatus::Online,
            "unreachable" => AgentStatus::Unreachable,
            "revoked" => AgentStatus::Revoked,
            other => return Err(UnknownValue::new("agent status", other)),
        })
    }
}

/// One agent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionRecord {
    /// Session id.
    pub id: Uuid,
    /// Agent id.
    pub agent_id: Uuid,
    /// Peer address.
    pub remote_addr: String,
    /// Agent software version.
    pub agent_version: String,
    /// Start.
    pub started_at_ms: UnixMillis,
    /// End, when ended.
    pub ended_at_ms: Option<UnixMillis>,
    /// Why it ended.
    pub end_reason: Option<String>,
}

/// Roles of API principals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Sells capacity: its own hosts and listings.
    Provider,
    /// Buys capacity: its own reservations.
    Client,
    /// Runs a private pool.
    PoolOwner,
}

impl Role {
    /// Storage form.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Provider => "provider",
            Role::Client => "client",
            Role::PoolOwner => "pool_owner",
        }
    }

    /// Parses the storage form.
    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "admin" => Role::Admin,
            "provider" => Role::Provider,
            "client" => Role::Client,
            "pool_owner" => Role::PoolOwner,
            other => return Err(UnknownValue::new("role", other)),
        })
    }
}

/// Where a validation run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Ordered, not finished.
    Running,
    /// Finished with results.
    Succeeded,
    /// Stopped on request; results are partial.
    Cancelled,
    /// Ended without results (agent lost, controller restarted, timeout).
    Failed,
}

impl RunStatus {
    /// Storage form.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Failed => "failed",
        }
    }

    /// Parses the storage form.
    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "cancelled" => RunStatus::Cancelled,
            "failed" => RunStatus::Failed,
            other => return Err(UnknownValue::new("run status", other)),
        })
    }
}

/// A validation run as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationRun {
    /// Run id.
    pub id: Uuid,
    /// The agent measured.
    pub agent_id: Uuid,
    /// Who ordered it.
    pub requested_by: String,
    /// When.
    pub requested_at_ms: UnixMillis,
    /// What was ordered (JSON of the request).
    pub request: serde_json::Value,
    /// Where it stands.
    pub status: RunStatus,
    /// When it ended.
    pub finished_at_ms: Option<UnixMillis>,
    /// Agent version that measured.
    pub agent_version: Option<String>,
    /// Benchmark report (JSON).
    pub bench: Option<serde_json::Value>,
    /// Security report (JSON).
    pub security: Option<serde_json::Value>,
    /// Why it failed.
    pub error: Option<String>,
}

/// One bucket of usage history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    /// Start of the bucket.
    pub bucket_start_ms: UnixMillis,
    /// The agent.
    pub agent_id: Uuid,
    /// `host` or an instance id.
    pub subject: String,
    /// The meter.
    pub meter: String,
    /// `counter` or `gauge`.
    pub kind: String,
    /// Counters: the usage in the bucket (sum of deltas).
    pub total: Option<i64>,
    /// Gauges: the highest peak in the bucket.
    pub peak: Option<i64>,
    /// Gauges: the time-weighted mean over the bucket.
    pub mean: Option<i64>,
    /// Records in the bucket.
    pub records: i64,
}

/// One invoice line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvoiceLine {
    /// `inv-...`.
    pub invoice_id: String,
    /// The client account.
    pub client: String,
    /// The provider account.
    pub provider: String,
    /// Period start.
    pub from_ms: UnixMillis,
    /// Period end (exclusive).
    pub to_ms: UnixMillis,
    /// The instance.
    pub instance_id: String,
    /// The charge.
    #[serde(flatten)]
    pub charge: crate::billing::Charge,
    /// The marketplace's share of this line.
    pub commission: i64,
    /// Currency.
    pub currency: String,
    /// The posting that carries it.
    pub posting_key: String,
    /// `charge` (the period's first posting) or `adjustment` (late usage, rated by a
    /// later run: the difference to what was billed before).
    pub kind: String,
}

/// A posting as stored, with one account's share of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountEntry {
    /// Posting key.
    pub key: String,
    /// Posting kind.
    pub kind: String,
    /// Memo.
    pub memo: String,
    /// Currency.
    pub currency: String,
    /// This account's amount.
    pub amount: i64,
    /// When.
    pub posted_at_ms: UnixMillis,
}
