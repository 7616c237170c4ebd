//! The primary control interface: `POST /v1/control` requests and answers, and the
//! read-only views.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::control::*;
use uuid::Uuid;

/// A `POST /v1/control` body, as a client writes it: `{"action": "...", ...fields}`.
///
/// The server reads bodies with `surplus_controller::control::parse_request`, which
/// checks every value and names the field at fault; a test there checks that each
/// variant written here is read back as the request it means.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action")]
pub enum ControlCall {
    /// Run an instance.
    RunInstances {
        /// Where to run it; optional when the volumes or a single agent decide.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_id: Option<Uuid>,
        /// Idempotency token: retrying with the same token starts one instance.
        #[serde(skip_serializing_if = "Option::is_none")]
        client_token: Option<String>,
        /// What to run.
        #[serde(flatten)]
        spec: RunSpec,
    },
    /// Start stopped instances.
    StartInstances {
        /// Instances.
        ids: Vec<String>,
    },
    /// Stop instances.
    StopInstances {
        /// Instances.
        ids: Vec<String>,
    },
    /// Restart running instances.
    RebootInstances {
        /// Instances.
        ids: Vec<String>,
    },
    /// Terminate instances.
    TerminateInstances {
        /// Instances.
        ids: Vec<String>,
    },
    /// The caller's instances that pass the filters.
    DescribeInstances(Filters),
    /// What the hosts report of instances (empty: all the caller's).
    DescribeInstanceStatus {
        /// Instances.
        ids: Vec<String>,
    },
    /// One attribute of an instance.
    DescribeInstanceAttribute {
        /// Instance.
        instance_id: String,
        /// Attribute.
        attribute: AttributeName,
    },
    /// Change an instance's limits, labels or both; what is left out stays.
    ModifyInstanceAttribute {
        /// Instance.
        instance_id: String,
        /// The limits to change.
        #[serde(skip_serializing_if = "Option::is_none")]
        limits: Option<LimitsChange>,
        /// The new labels (they replace the old ones).
        #[serde(skip_serializing_if = "Option::is_none")]
        labels: Option<BTreeMap<String, String>>,
    },
    /// Create a volume.
    CreateVolume {
        /// Where.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_id: Option<Uuid>,
        /// A name.
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        /// Size.
        size_bytes: u64,
    },
    /// Delete a volume that is not attached.
    DeleteVolume {
        /// Volume.
        volume_id: String,
    },
    /// The caller's volumes (empty: all of them).
    DescribeVolumes {
        /// Volumes.
        ids: Vec<String>,
    },
    /// Snapshot a volume.
    CreateSnapshot {
        /// Volume.
        volume_id: String,
    },
}

impl ControlCall {
    /// The action's name, as the body carries it.
    pub fn action(&self) -> &'static str {
        match self {
            Self::RunInstances { .. } => "RunInstances",
            Self::StartInstances { .. } => "StartInstances",
            Self::StopInstances { .. } => "StopInstances",
            Self::RebootInstances { .. } => "RebootInstances",
            Self::TerminateInstances { .. } => "TerminateInstances",
            Self::DescribeInstances(_) => "DescribeInstances",
            Self::DescribeInstanceStatus { .. } => "DescribeInstanceStatus",
            Self::DescribeInstanceAttribute { .. } => "DescribeInstanceAttribute",
            Self::ModifyInstanceAttribute { .. } => "ModifyInstanceAttribute",
            Self::CreateVolume { .. } => "CreateVolume",
            Self::DeleteVolume { .. } => "DeleteVolume",
            Self::DescribeVolumes { .. } => "DescribeVolumes",
            Self::CreateSnapshot { .. } => "CreateSnapshot",
        }
    }
}

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
