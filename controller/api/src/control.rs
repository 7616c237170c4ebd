//! The primary control interface: `POST /v1/control` answers and the read-only views.

use serde::{Deserialize, Serialize};
use surplus_protocol::control::*;
use uuid::Uuid;

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The instance: its spec as recorded, its state as its host reports it.
    #[serde(flatten)]
    pub instance: Instance,
    /// The agent hosting it.
    pub agent_id: Uuid,
    /// The owning account.
    pub account: String,
    /// The agent could not be asked: this is its last known record.
    pub stale: bool,
    /// What the host claims against the recorded spec (never billed), when it does.
    #[serde(default)]
    pub host_contradiction: Option<String>,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeView {
    /// The agent's record.
    #[serde(flatten)]
    pub volume: Volume,
    /// The agent holding it.
    pub agent_id: Uuid,
    /// The owning account.
    pub account: String,
    /// The agent could not be asked: this is its last known record.
    pub stale: bool,
}

/// The answer of `POST /v1/control`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlResponse {
    /// RunInstances, DescribeInstances.
    Instances(Vec<InstanceView>),
    /// Lifecycle operations.
    StateChanges(Vec<StateChange>),
    /// DescribeInstanceStatus.
    Statuses(Vec<InstanceStatus>),
    /// Attribute reads and changes.
    Attribute {
        /// Instance.
        instance_id: String,
        /// Value.
        value: AttributeValue,
    },
    /// Volume operations.
    Volumes(Vec<VolumeView>),
    /// CreateSnapshot.
    Snapshot(Snapshot),
    /// The end of an instance's output.
    Logs(InstanceLogs),
}
