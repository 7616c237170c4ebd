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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
        /// Instances (none: all the caller's).
        #[serde(default)]
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
        /// Volumes (none: all the caller's).
        #[serde(default)]
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

/// Parses a size as people write it: `64MiB`, `1GiB`, `512M`, `0.5g`, `4096` (binary
/// units, as container tools read them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown unit {other:?} (use KiB, MiB, GiB or TiB)"
            ));
        }
    };
    let bytes = (number * factor as f64).round();
    if !(bytes.is_finite() && bytes < u64::MAX as f64) {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses a port mapping as people write it: `HOST:INSTANCE`, `HOST:INSTANCE/udp`.
pub fn parse_port(text: &str) -> Result<PortMapping, String> {
    let t = text.trim();
    let (mapping, protocol) = t.split_once('/').unwrap_or((t, "tcp"));
    let (host, instance) = mapping
        .split_once(':')
        .ok_or_else(|| format!("port {t:?} is not HOST:INSTANCE[/udp]"))?;
    let number = |n: &str| {
        n.trim()
            .parse::<u16>()
            .map_err(|_| format!("port {t:?}: {n:?} is not a port number"))
    };
    Ok(PortMapping {
        host_port: number(host)?,
        instance_port: number(instance)?,
        protocol: match protocol {
            "tcp" => PortProtocol::Tcp,
            "udp" => PortProtocol::Udp,
            other => return Err(format!("port {t:?}: {other:?} is neither tcp nor udp")),
        },
    })
}

/// Parses a volume attachment as people write it: `VOLUME_ID:/path`.
pub fn parse_attachment(text: &str) -> Result<VolumeAttachment, String> {
    let t = text.trim();
    let (id, path) = t
        .split_once(':')
        .ok_or_else(|| format!("volume {t:?} is not VOLUME_ID:/path"))?;
    Ok(VolumeAttachment {
        volume_id: id.trim().to_owned(),
        mount_path: path.trim().to_owned(),
    })
}

/// A number of CPUs (`0.5`, `2`) as thousandths of a CPU.
pub fn parse_cpus(cpus: f64) -> Result<u32, String> {
    let m = (cpus * 1000.0).round();
    if !(m.is_finite() && (0.0..=f64::from(u32::MAX)).contains(&m)) {
        return Err(format!("{cpus} is not a number of CPUs"));
    }
    Ok(m as u32)
}

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Its snapshots, oldest first.
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
}

/// The answer of `POST /v1/control`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("0.5GiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn ports_and_attachments_read_as_written() {
        assert_eq!(
            parse_port("8080:80"),
            Ok(PortMapping {
                host_port: 8080,
                instance_port: 80,
                protocol: PortProtocol::Tcp
            })
        );
        assert_eq!(
            parse_port("53:5353/udp").map(|p| p.protocol),
            Ok(PortProtocol::Udp)
        );
        for bad in ["80", "80:http", "99999:1", "1:2/sctp"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_attachment("vol-1:/data").map(|a| a.mount_path),
            Ok("/data".to_owned())
        );
        assert!(parse_attachment("vol-1").is_err());
        assert_eq!(parse_cpus(0.5), Ok(500));
        assert!(parse_cpus(f64::NAN).is_err() && parse_cpus(-1.0).is_err());
    }
}
