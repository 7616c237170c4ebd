//! The primary control interface: the one set of operations clients use on every host,
//! whatever the host runs underneath (capability A5).
//!
//! The controller receives these as JSON (`POST /v1/control`), checks who may do what,
//! and sends each [`Command`] over QUIC to the agent hosting the instance; the agent's
//! driver translates it into the host's native idiom and the answer comes back as a
//! [`ControlReply`] or a [`ControlFailure`].
//!
//! Operations are a closed set and every value a client supplies is checked here by
//! [`RunSpec::validate`] and friends before any driver sees it: names, labels, volume
//! ids and paths are typed and bounded, and drivers pass them on literally (argv
//! entries, JSON strings, URL-encoded path segments), never through a shell.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;

/// Instance ids are `i-` and 16 lowercase hex digits; the controller chooses them.
pub const INSTANCE_PREFIX: &str = "i-";
/// Volume ids are `vol-` and 16 lowercase hex digits.
pub const VOLUME_PREFIX: &str = "vol-";
/// Snapshot ids are `snap-` and 16 lowercase hex digits.
pub const SNAPSHOT_PREFIX: &str = "snap-";

/// A fresh id with `prefix` (`i-`, `vol-`, `snap-`).
#[cfg(feature = "net")]
pub fn new_id(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}{n:016x}")
}

/// The one state model of every driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Accepted, not yet running.
    Pending,
    /// Running.
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped; can be started again.
    Stopped,
    /// Being terminated.
    ShuttingDown,
    /// Gone for good; kept for describing.
    Terminated,
}

impl InstanceState {
    /// Every state, in lifecycle order.
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Pending,
        InstanceState::Running,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::ShuttingDown,
        InstanceState::Terminated,
    ];

    /// The name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::ShuttingDown => "shutting-down",
            InstanceState::Terminated => "terminated",
        }
    }

    /// Parses [`InstanceState::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A lifecycle operation on an existing instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Lifecycle {
    /// StartInstances.
    Start,
    /// StopInstances.
    Stop,
    /// RebootInstances.
    Reboot,
    /// TerminateInstances.
    Terminate,
}

impl Lifecycle {
    /// The operation's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Start => "start",
            Lifecycle::Stop => "stop",
            Lifecycle::Reboot => "reboot",
            Lifecycle::Terminate => "terminate",
        }
    }
}

/// What a lifecycle operation does from a given state: the pure core of the state
/// model, shared by every driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing to do: the instance is already where the operation leads.
    AlreadyThere,
    /// Ask the driver, passing through `via` to `to`.
    Drive {
        /// The transitional state shown while the driver works.
        via: InstanceState,
        /// Where the instance ends when the driver succeeds.
        to: InstanceState,
    },
    /// Not allowed from this state.
    Refused,
}

/// The transition `op` makes from `from`.
pub fn transition(from: InstanceState, op: Lifecycle) -> Transition {
    use InstanceState::*;
    use Lifecycle::*;
    match (from, op) {
        (Terminated, Terminate) => Transition::AlreadyThere,
        (Terminated, _) | (ShuttingDown, _) => Transition::Refused,
        (_, Terminate) => Transition::Drive {
            via: ShuttingDown,
            to: Terminated,
        },
        (Running, Start) => Transition::AlreadyThere,
        (Stopped, Stop) => Transition::AlreadyThere,
        (Stopped | Pending | Stopping, Start) => Transition::Drive {
            via: Pending,
            to: Running,
        },
        (Running | Pending | Stopping, Stop) => Transition::Drive {
            via: Stopping,
            to: Stopped,
        },
        (Running, Reboot) => Transition::Drive {
            via: Pending,
            to: Running,
        },
        (Pending | Stopping | Stopped, Reboot) => Transition::Refused,
    }
}

/// CPU, memory and process limits. `None` means unlimited for CPU and memory, and the
/// host's default for processes (every driver enforces one). No `skip_serializing_if`
/// here or anywhere on the wire: bincode is not self-describing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Thousandths of a CPU (`1500` = 1.5 vCPU).
    #[serde(default)]
    pub millicpus: Option<u32>,
    /// Memory in bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Most processes (and threads) the instance may have at once (`pids.max`).
    #[serde(default)]
    pub pids: Option<u32>,
}

/// Smallest memory limit accepted (4 MiB): less cannot start a process.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// Largest process limit accepted: the kernel's own ceiling (`PID_MAX_LIMIT`).
pub const MAX_PIDS: u32 = 4_194_304;

/// A change of limits (ModifyInstanceAttribute): a field that is absent stays as it
/// is, `null` lifts the limit (the host's default for processes), a value sets it.
/// A JSON body only (an absent field is left out when written, which a
/// non-self-describing format such as bincode cannot read back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LimitsChange {
    /// New CPU limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub millicpus: Option<Option<u32>>,
    /// New memory limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_bytes: Option<Option<u64>>,
    /// New process limit.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pids: Option<Option<u32>>,
}

/// A field that is present, even as `null`, is `Some`: absent (the default) is `None`.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl LimitsChange {
    /// Does it change anything?
    pub fn is_empty(&self) -> bool {
        self.millicpus.is_none() && self.memory_bytes.is_none() && self.pids.is_none()
    }

    /// `current` with the named fields changed and every other one kept.
    pub fn apply(&self, current: Limits) -> Limits {
        Limits {
            millicpus: self.millicpus.unwrap_or(current.millicpus),
            memory_bytes: self.memory_bytes.unwrap_or(current.memory_bytes),
            pids: self.pids.unwrap_or(current.pids),
        }
    }
}

impl Limits {
    /// Checks the bounds; `field` prefixes the names in errors.
    pub fn validate(&self, field: &str) -> Result<(), Invalid> {
        if let Some(m) = self.millicpus {
            if !(10..=1_024_000).contains(&m) {
                return Err(Invalid::new(
                    format!("{field}.millicpus"),
                    format!("{m} is outside 10..=1024000 (0.01 to 1024 vCPU)"),
                ));
            }
        }
        if let Some(b) = self.memory_bytes {
            if b < MIN_MEMORY_BYTES {
                return Err(Invalid::new(
                    format!("{field}.memory_bytes"),
                    format!("{b} is below the 4 MiB minimum"),
                ));
            }
        }
        if let Some(p) = self.pids {
            if !(1..=MAX_PIDS).contains(&p) {
                return Err(Invalid::new(
                    format!("{field}.pids"),
                    format!("{p} is outside 1..={MAX_PIDS}"),
                ));
            }
        }
        Ok(())
    }
}

/// Transport of a port mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl PortProtocol {
    /// `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

/// A host port forwarded to an instance port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Port on the host.
    pub host_port: u16,
    /// Port inside the instance.
    pub instance_port: u16,
    /// Transport.
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// A volume attached when an instance is run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The volume.
    pub volume_id: String,
    /// Absolute path inside the instance.
    pub mount_path: String,
}

/// What RunInstances asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// A human name, unique only by convention.
    pub name: Option<String>,
    /// Image reference (container drivers).
    pub image: Option<String>,
    /// Executable and arguments (the process driver needs it; container drivers use it
    /// as the command, overriding the image's).
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// CPU and memory limits.
    pub limits: Limits,
    /// Port mappings.
    pub ports: Vec<PortMapping>,
    /// Labels, for filtering and billing.
    pub labels: BTreeMap<String, String>,
    /// Volumes to attach.
    pub volumes: Vec<VolumeAttachment>,
}

/// A value a client supplied is not acceptable; names the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The field, as a JSON path (`labels.team`, `ports[1].host_port`).
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

impl Invalid {
    /// An error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn check(ok: bool, field: impl FnOnce() -> String, reason: &str) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(field(), reason))
    }
}

/// Instance and volume names: 1-63 of `[A-Za-z0-9_.-]`, starting alphanumeric. No
/// quotes, separators, `$` or `/`, so they are safe as path segments and container names.
pub fn validate_name(field: &str, name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    check(
        ok,
        || field.to_owned(),
        "must be 1-63 characters of [A-Za-z0-9_.-], starting with a letter or digit",
    )
}

/// An id made by [`new_id`] with `prefix`.
pub fn validate_id(field: &str, prefix: &str, id: &str) -> Result<(), Invalid> {
    let ok = id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    check(
        ok,
        || field.to_owned(),
        &format!("must be {prefix} followed by 16 lowercase hex digits"),
    )
}

/// Label keys: 1-63 of `[A-Za-z0-9-_./]`; values: at most 255 characters, none a
/// control character. Values are data: shown and passed on exactly as given.
pub fn validate_label(key: &str, value: &str) -> Result<(), Invalid> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    check(
        key_ok,
        || format!("labels.{key}"),
        "label keys are 1-63 characters of [A-Za-z0-9-_./]",
    )?;
    check(
        value.chars().count() <= 255 && !value.chars().any(char::is_control),
        || format!("labels.{key}"),
        "label values are at most 255 characters, none a control character",
    )
}

/// Image references: what Docker accepts (`name[:tag][@digest]`), at most 255.
pub fn validate_image(image: &str) -> Result<(), Invalid> {
    let ok = !image.is_empty()
        && image.len() <= 255
        && image.starts_with(|c: char| c.is_ascii_alphanumeric())
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        && !image.contains("..");
    check(
        ok,
        || "image".into(),
        "must be an image reference of [A-Za-z0-9._-/:@], starting with a letter or digit",
    )
}

/// Absolute, normalised paths: no `..`, no empty or `.` segment, no NUL, at most 255.
pub fn validate_abs_path(field: &str, path: &str) -> Result<(), Invalid> {
    let ok = path.starts_with('/')
        && path.len() <= 255
        && path.len() > 1
        && !path.contains('\0')
        && path[1..]
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && !s.chars().any(char::is_control));
    check(
        ok,
        || field.to_owned(),
        "must be an absolute path without '..', '.', empty segments or control characters",
    )
}

impl RunSpec {
    /// Checks every client-supplied value.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(name) = &self.name {
            validate_name("name", name)?;
        }
        if let Some(image) = &self.image {
            validate_image(image)?;
        }
        check(
            self.command.len() <= 256,
            || "command".into(),
            "at most 256 arguments",
        )?;
        for (i, arg) in self.command.iter().enumerate() {
            check(
                !arg.contains('\0') && arg.len() <= 4096,
                || format!("command[{i}]"),
                "arguments are at most 4096 bytes and hold no NUL",
            )?;
        }
        check(
            self.env.len() <= 256,
            || "env".into(),
            "at most 256 variables",
        )?;
        for (k, v) in &self.env {
            let key_ok = !k.is_empty()
                && k.len() <= 255
                && k.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            check(
                key_ok,
                || format!("env.{k}"),
                "variable names are [A-Za-z_][A-Za-z0-9_]*",
            )?;
            check(
                !v.contains('\0') && v.len() <= 4096,
                || format!("env.{k}"),
                "values are at most 4096 bytes and hold no NUL",
            )?;
        }
        self.limits.validate("limits")?;
        for (i, p) in self.ports.iter().enumerate() {
            check(
                p.host_port != 0 && p.instance_port != 0,
                || format!("ports[{i}]"),
                "ports are 1-65535",
            )?;
        }
        check(
            self.labels.len() <= 64,
            || "labels".into(),
            "at most 64 labels",
        )?;
        for (k, v) in &self.labels {
            validate_label(k, v)?;
        }
        for (i, v) in self.volumes.iter().enumerate() {
            validate_id(
                &format!("volumes[{i}].volume_id"),
                VOLUME_PREFIX,
                &v.volume_id,
            )?;
            validate_abs_path(&format!("volumes[{i}].mount_path"), &v.mount_path)?;
        }
        Ok(())
    }
}

/// Which instances DescribeInstances returns; empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Filters {
    /// Only these ids.
    pub ids: Vec<String>,
    /// Only instances in one of these states.
    pub states: Vec<InstanceState>,
    /// Only instances carrying every one of these labels.
    pub labels: BTreeMap<String, String>,
}

impl Filters {
    /// Does `instance` pass?
    pub fn matches(&self, instance: &Instance) -> bool {
        (self.ids.is_empty() || self.ids.contains(&instance.id))
            && (self.states.is_empty() || self.states.contains(&instance.state))
            && self
                .labels
                .iter()
                .all(|(k, v)| instance.spec.labels.get(k) == Some(v))
    }
}

/// An instance as every driver describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Instance {
    /// `i-...`.
    pub id: String,
    /// What was asked for.
    pub spec: RunSpec,
    /// Current state.
    pub state: InstanceState,
    /// Why it is in this state, when a failure put it there.
    pub state_reason: Option<String>,
    /// The driver that hosts it (`process`, `docker`, `mapped:<name>`).
    pub driver: String,
    /// The driver's own handle (container id, cgroup path).
    pub native_id: Option<String>,
    /// When RunInstances was accepted.
    pub launched_at_ms: UnixMillis,
    /// When the state last changed.
    pub state_changed_at_ms: UnixMillis,
}

/// What the host reports about a running instance: the observed side of the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceStatus {
    /// `i-...`.
    pub instance_id: String,
    /// Current state.
    pub state: InstanceState,
    /// Why, when a failure caused it.
    pub state_reason: Option<String>,
    /// Exit code of the last run, when it ended and the driver knows it.
    pub exit_code: Option<i32>,
    /// Limits read back from the host (cgroup files, the container engine).
    pub applied: Limits,
    /// Processes in the instance, when the driver can count them.
    pub processes: Option<u32>,
}

/// One instance's move caused by a lifecycle operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateChange {
    /// `i-...`.
    pub instance_id: String,
    /// Before.
    pub previous: InstanceState,
    /// After.
    pub current: InstanceState,
}

/// Attributes DescribeInstanceAttribute can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttributeName {
    /// CPU and memory limits.
    Limits,
    /// Labels.
    Labels,
    /// Command.
    Command,
    /// Image.
    Image,
    /// Port mappings.
    Ports,
    /// Attached volumes.
    Volumes,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttributeValue {
    /// CPU and memory limits.
    Limits(Limits),
    /// Labels.
    Labels(BTreeMap<String, String>),
    /// Command.
    Command(Vec<String>),
    /// Image.
    Image(Option<String>),
    /// Port mappings.
    Ports(Vec<PortMapping>),
    /// Attached volumes.
    Volumes(Vec<VolumeAttachment>),
}

/// Whether a volume is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Free to attach.
    Available,
    /// Attached to an instance that is not terminated.
    InUse,
    /// Deleted; kept for describing.
    Deleted,
}

impl VolumeState {
    /// The name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Available => "available",
            VolumeState::InUse => "in-use",
            VolumeState::Deleted => "deleted",
        }
    }
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Volume {
    /// `vol-...`.
    pub id: String,
    /// A human name.
    pub name: Option<String>,
    /// Size asked for.
    pub size_bytes: u64,
    /// Bytes in use, when the driver can tell.
    pub used_bytes: Option<u64>,
    /// State.
    pub state: VolumeState,
    /// The instance it is attached to.
    pub attached_to: Option<String>,
    /// The driver's own handle (directory, Docker volume name).
    pub native_id: Option<String>,
    /// Creation time.
    pub created_at_ms: UnixMillis,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    /// `snap-...`.
    pub id: String,
    /// The volume.
    pub volume_id: String,
    /// Bytes stored.
    pub size_bytes: u64,
    /// Where the agent keeps it (a directory or an archive file).
    pub location: String,
    /// Creation time.
    pub created_at_ms: UnixMillis,
}

/// One operation of the primary control interface, as the agent receives it. Ids of new
/// things are chosen by the controller so that a retried command is recognised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Command {
    /// Run a new instance (idempotent by `instance_id`).
    RunInstances {
        /// The id to give it.
        instance_id: String,
        /// What to run.
        spec: RunSpec,
    },
    /// Start, stop, reboot or terminate instances.
    Lifecycle {
        /// Which operation.
        op: Lifecycle,
        /// The instances.
        ids: Vec<String>,
    },
    /// Describe instances.
    DescribeInstances(Filters),
    /// Observed status of instances (empty: all).
    DescribeInstanceStatus {
        /// The instances.
        ids: Vec<String>,
    },
    /// Read one attribute.
    DescribeInstanceAttribute {
        /// The instance.
        instance_id: String,
        /// The attribute.
        attribute: AttributeName,
    },
    /// Change limits and/or labels.
    ModifyInstanceAttribute {
        /// The instance.
        instance_id: String,
        /// New limits.
        limits: Option<Limits>,
        /// New labels (replacing the old ones).
        labels: Option<BTreeMap<String, String>>,
    },
    /// Create a volume (idempotent by `volume_id`).
    CreateVolume {
        /// The id to give it.
        volume_id: String,
        /// A human name.
        name: Option<String>,
        /// Size.
        size_bytes: u64,
    },
    /// Delete a volume.
    DeleteVolume {
        /// The volume.
        volume_id: String,
    },
    /// Describe volumes (empty: all).
    DescribeVolumes {
        /// The volumes.
        ids: Vec<String>,
    },
    /// Snapshot a volume.
    CreateSnapshot {
        /// The volume.
        volume_id: String,
        /// The id to give the snapshot.
        snapshot_id: String,
    },
    /// The end of an instance's output (its standard output and error as the host keeps
    /// them).
    ReadLogs {
        /// The instance.
        instance_id: String,
        /// Most bytes of each stream, counted from the end.
        max_bytes: u32,
    },
}

/// Most bytes of one stream that ReadLogs returns.
pub const MAX_LOG_BYTES: u32 = 1 << 20;

impl Command {
    /// The operation's name in the primary control interface.
    pub fn action(&self) -> &'static str {
        match self {
            Command::RunInstances { .. } => "RunInstances",
            Command::Lifecycle { op, .. } => match op {
                Lifecycle::Start => "StartInstances",
                Lifecycle::Stop => "StopInstances",
                Lifecycle::Reboot => "RebootInstances",
                Lifecycle::Terminate => "TerminateInstances",
            },
            Command::DescribeInstances(_) => "DescribeInstances",
            Command::DescribeInstanceStatus { .. } => "DescribeInstanceStatus",
            Command::DescribeInstanceAttribute { .. } => "DescribeInstanceAttribute",
            Command::ModifyInstanceAttribute { .. } => "ModifyInstanceAttribute",
            Command::CreateVolume { .. } => "CreateVolume",
            Command::DeleteVolume { .. } => "DeleteVolume",
            Command::DescribeVolumes { .. } => "DescribeVolumes",
            Command::CreateSnapshot { .. } => "CreateSnapshot",
            Command::ReadLogs { .. } => "ReadLogs",
        }
    }
}

/// The answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ControlReply {
    /// RunInstances, DescribeInstances.
    Instances(Vec<Instance>),
    /// Lifecycle operations.
    StateChanges(Vec<StateChange>),
    /// DescribeInstanceStatus.
    Statuses(Vec<InstanceStatus>),
    /// DescribeInstanceAttribute, ModifyInstanceAttribute.
    Attribute {
        /// The instance.
        instance_id: String,
        /// The value.
        value: AttributeValue,
    },
    /// CreateVolume, DeleteVolume, DescribeVolumes.
    Volumes(Vec<Volume>),
    /// CreateSnapshot.
    Snapshot(Snapshot),
    /// ReadLogs.
    Logs(InstanceLogs),
}

/// The end of an instance's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceLogs {
    /// The instance.
    pub instance_id: String,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Earlier output was left out to keep within the size asked for.
    pub truncated: bool,
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A value is not acceptable (`field` says which).
    InvalidParameter,
    /// No such instance, volume or snapshot.
    NotFound,
    /// The driver does not map this operation.
    Unsupported,
    /// Not possible in the current state.
    Conflict,
    /// The host's own interface failed.
    Driver,
}

/// A failed command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[error("{message}")]
pub struct ControlFailure {
    /// The kind.
    pub kind: FailureKind,
    /// The field at fault, for `InvalidParameter`.
    pub field: Option<String>,
    /// For people.
    pub message: String,
}

impl ControlFailure {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            field: None,
            message: message.into(),
        }
    }
}

impl From<Invalid> for ControlFailure {
    fn from(e: Invalid) -> Self {
        Self {
            kind: FailureKind::InvalidParameter,
            message: e.to_string(),
            field: Some(e.field),
        }
    }
}

/// The outcome of one conformance scenario.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompatCheck {
    /// The operation tested (`run`, `describe`, ..., `volume-delete`).
    pub operation: String,
    /// It behaved as the primary interface says.
    pub passed: bool,
    /// Why not, when it failed.
    pub message: Option<String>,
}

/// How compatible a driver is with the primary control interface (capability A6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CompatLevel {
    /// Every operation passes.
    Fully,
    /// Every compute operation passes.
    Highly,
    /// Some operations pass.
    Somewhat,
    /// None passes.
    Incompatible,
}

/// The compute operations of the conformance suite, in the order they run.
pub const COMPUTE_OPERATIONS: [&str; 7] = [
    "run",
    "describe",
    "stop",
    "start",
    "reboot",
    "modify",
    "terminate",
];
/// The storage operations of the conformance suite, in the order they run.
pub const STORAGE_OPERATIONS: [&str; 4] = [
    "volume-create",
    "volume-attach",
    "snapshot",
    "volume-delete",
];

/// The level of a set of results: a pure function of which operations passed.
pub fn compat_level(checks: &[CompatCheck]) -> CompatLevel {
    let passed = |op: &str| checks.iter().any(|c| c.operation == op && c.passed);
    let compute = COMPUTE_OPERATIONS.iter().all(|op| passed(op));
    let storage = STORAGE_OPERATIONS.iter().all(|op| passed(op));
    if compute && storage {
        CompatLevel::Fully
    } else if compute {
        CompatLevel::Highly
    } else if checks.iter().any(|c| c.passed) {
        CompatLevel::Somewhat
    } else {
        CompatLevel::Incompatible
    }
}

/// A driver's conformance results, sent by `surplus-agent compat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompatReport {
    /// The driver tested.
    pub driver: String,
    /// The level.
    pub level: CompatLevel,
    /// Per-operation results.
    pub checks: Vec<CompatCheck>,
    /// How the driver isolated the instances the suite ran.
    pub isolation: Isolation,
    /// When the suite ran.
    pub ran_at_ms: UnixMillis,
}

/// How a host isolates client instances: what a provider promises its clients and a
/// client can check before it runs anything there. Reported with every session's hello
/// and with the compatibility kit's results.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Isolation {
    /// The driver (`process`, `docker`, `mapped:<name>`, `none`).
    pub driver: String,
    /// Instances run as the agent's own user: the provider turned `allow_host_user`
    /// on. Off by default.
    pub host_user: bool,
    /// Each instance runs as an unprivileged user of its own, never uid 0 (on the host;
    /// inside a container see `user_namespaces`).
    pub own_user: bool,
    /// Every capability is dropped but a documented minimal set, and no-new-privileges
    /// is set.
    pub capabilities_dropped: bool,
    /// Container root is remapped to an unprivileged host user (Docker's user-namespace
    /// remapping); `None` where it does not apply.
    pub user_namespaces: Option<bool>,
    /// The process limit an instance gets when it asks for none.
    pub default_pids: Option<u32>,
    /// Writes past a volume's size fail (ENOSPC).
    pub volume_sizes_enforced: bool,
    /// A system call filter refuses what a workload has no use for (new namespaces,
    /// mounts, kernel keyrings, BPF, ...).
    pub syscall_filter: bool,
    /// What is weaker than the full sandbox, for people.
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hostile_names_and_paths_are_refused() {
        for bad in [
            "a;b", "$(id)", "a\"b", "a'b", "../etc", "a/b", "", "-x", "a b",
        ] {
            assert!(validate_name("name", bad).is_err(), "{bad:?}");
        }
        for bad in ["../x", "/a/../b", "relative", "/a//b", "/", "/a/./b"] {
            assert!(validate_abs_path("p", bad).is_err(), "{bad:?}");
        }
        assert!(validate_id("v", VOLUME_PREFIX, "vol-../../etc/pass").is_err());
        assert!(validate_image("busybox;rm").is_err());
        assert!(validate_image("../x").is_err());
        validate_name("name", "web-1.a_b").unwrap();
        validate_abs_path("p", "/data/x").unwrap();
        validate_image("surplus/busybox:1.35").unwrap();
        // Label values are data: shell syntax is accepted and kept literally.
        validate_label("note", "$(rm -rf /); echo \"x\"").unwrap();
        assert_eq!(
            validate_label("bad key", "x").unwrap_err().field,
            "labels.bad key"
        );
    }

    #[test]
    fn run_spec_errors_name_the_field() {
        let spec = RunSpec {
            limits: Limits {
                millicpus: Some(1),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(spec.validate().unwrap_err().field, "limits.millicpus");
        let spec = RunSpec {
            volumes: vec![VolumeAttachment {
                volume_id: new_id(VOLUME_PREFIX),
                mount_path: "/data/../etc".into(),
            }],
            ..Default::default()
        };
        assert_eq!(spec.validate().unwrap_err().field, "volumes[0].mount_path");
    }

    #[test]
    fn the_level_follows_which_operations_passed() {
        let all: Vec<CompatCheck> = COMPUTE_OPERATIONS
            .iter()
            .chain(STORAGE_OPERATIONS.iter())
            .map(|op| CompatCheck {
                operation: (*op).into(),
                passed: true,
                message: None,
            })
            .collect();
        assert_eq!(compat_level(&all), CompatLevel::Fully);
        let mut no_snapshot = all.clone();
        no_snapshot[9].passed = false;
        assert_eq!(compat_level(&no_snapshot), CompatLevel::Highly);
        let mut no_reboot = all.clone();
        no_reboot[4].passed = false;
        assert_eq!(compat_level(&no_reboot), CompatLevel::Somewhat);
        let none: Vec<_> = all
            .into_iter()
            .map(|c| CompatCheck { passed: false, ..c })
            .collect();
        assert_eq!(compat_level(&none), CompatLevel::Incompatible);
    }

    fn state() -> impl Strategy<Value = InstanceState> {
        proptest::sample::select(InstanceState::ALL.to_vec())
    }

    fn op() -> impl Strategy<Value = Lifecycle> {
        proptest::sample::select(vec![
            Lifecycle::Start,
            Lifecycle::Stop,
            Lifecycle::Reboot,
            Lifecycle::Terminate,
        ])
    }

    proptest! {
        /// Terminated is final; terminate always reaches it; no operation leads
        /// anywhere but running, stopped or terminated.
        #[test]
        fn the_state_model_is_closed(from in state(), op in op()) {
            match transition(from, op) {
                Transition::Drive { via, to } => {
                    prop_assert_ne!(from, InstanceState::Terminated);
                    prop_assert!(matches!(to, InstanceState::Running | InstanceState::Stopped | InstanceState::Terminated));
                    prop_assert!(matches!(via, InstanceState::Pending | InstanceState::Stopping | InstanceState::ShuttingDown));
                    if op == Lifecycle::Terminate { prop_assert_eq!(to, InstanceState::Terminated); }
                }
                Transition::AlreadyThere => prop_assert!(matches!(
                    (from, op),
                    (InstanceState::Running, Lifecycle::Start)
                        | (InstanceState::Stopped, Lifecycle::Stop)
                        | (InstanceState::Terminated, Lifecycle::Terminate)
                )),
                Transition::Refused => prop_assert!(op != Lifecycle::Terminate || from == InstanceState::ShuttingDown),
            }
        }

        /// Names that pass validation contain nothing a shell or a path would read.
        #[test]
        fn valid_names_are_inert(name in "[ -~]{0,70}") {
            if validate_name("n", &name).is_ok() {
                prop_assert!(!name.contains(['/', ';', '$', '`', '"', '\'', ' ', '\\', '(', ')', '&', '|', '<', '>']));
                prop_assert!(name != "." && name != "..");
            }
        }
    }
}
