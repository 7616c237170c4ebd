//! The host inventory (the "system specification" of source 000, FIG. 2).
//!
//! Every field the host may be unable to tell is optional: an agent reports what it
//! found and never invents a value. Volatile figures (free memory, uptime) are not part
//! of the inventory, so that two collections of an unchanged host are equal; they travel
//! in heartbeats instead.

use serde::{Deserialize, Serialize};

use crate::clock::UnixMillis;

/// Everything the agent knows about its host's hardware and software.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inventory {
    /// When this inventory was collected (not part of its digest).
    pub collected_at_ms: UnixMillis,
    /// Host name.
    pub hostname: Option<String>,
    /// Processors.
    pub cpu: CpuInfo,
    /// Memory.
    pub memory: MemoryInfo,
    /// NUMA nodes, empty when the host exposes none.
    pub numa_nodes: Vec<NumaNode>,
    /// Block devices with their mounts.
    pub disks: Vec<Disk>,
    /// Network interfaces.
    pub nics: Vec<Nic>,
    /// Display and compute adapters.
    pub gpus: Vec<Gpu>,
    /// Operating system.
    pub os: OsInfo,
    /// Hypervisor and container detection.
    pub virtualization: Virtualization,
    /// Package manager facts, when one is present.
    pub packages: Option<PackageInfo>,
    /// Boot time, seconds since the epoch.
    pub boot_time_secs: Option<u64>,
}

/// Processor facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuInfo {
    /// Vendor id, e.g. `GenuineIntel`, `AuthenticAMD`.
    pub vendor: Option<String>,
    /// Model name.
    pub brand: Option<String>,
    /// Physical packages.
    pub sockets: Option<u32>,
    /// Physical cores over all sockets.
    pub physical_cores: Option<u32>,
    /// Logical processors (hardware threads) online.
    pub logical_cpus: u32,
    /// Base frequency, MHz.
    pub base_mhz: Option<u32>,
    /// Maximum frequency, MHz.
    pub max_mhz: Option<u32>,
    /// Instruction-set flags, sorted.
    pub flags: Vec<String>,
    /// Caches of the first CPU, by level.
    pub caches: Vec<CacheInfo>,
}

/// One CPU cache.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CacheInfo {
    /// 1, 2, 3...
    pub level: u8,
    /// `Data`, `Instruction` or `Unified`.
    pub kind: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// How many logical CPUs share it.
    pub shared_by_cpus: Option<u32>,
}

/// Memory facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemoryInfo {
    /// Total usable RAM, bytes (`MemTotal`).
    pub total_bytes: u64,
    /// Total swap, bytes.
    pub swap_total_bytes: u64,
}

/// One NUMA node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NumaNode {
    /// Node number.
    pub id: u32,
    /// CPU list as the kernel prints it (`0-7,16-23`).
    pub cpus: String,
    /// Memory attached to the node, bytes.
    pub memory_bytes: Option<u64>,
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Disk {
    /// Kernel name, e.g. `nvme0n1`, `sda`, `vda`.
    pub device: String,
    /// Model string.
    pub model: Option<String>,
    /// Capacity, bytes.
    pub capacity_bytes: Option<u64>,
    /// `Some(true)` for spinning disks (HDD), `Some(false)` for SSD and NVMe.
    pub rotational: Option<bool>,
    /// Removable media.
    pub removable: Option<bool>,
    /// File systems mounted from this device or its partitions.
    pub mounts: Vec<Mount>,
}

/// One mounted file system.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Mount {
    /// Where it is mounted.
    pub mount_point: String,
    /// File system type.
    pub filesystem: String,
    /// Size, bytes.
    pub total_bytes: u64,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Nic {
    /// Interface name.
    pub name: String,
    /// Hardware address.
    pub mac: Option<String>,
    /// Link speed, Mbit/s, when the driver reports it.
    pub speed_mbps: Option<u32>,
    /// MTU.
    pub mtu: Option<u32>,
    /// No backing device in `/sys/class/net/<name>/device` (bridges, veth, loopback).
    pub is_virtual: bool,
}

/// One display or compute adapter.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Gpu {
    /// PCI address.
    pub pci_address: String,
    /// PCI vendor id, e.g. `0x10de`.
    pub vendor_id: String,
    /// PCI device id.
    pub device_id: String,
    /// Vendor name when the id is well known.
    pub vendor: Option<String>,
    /// Model, from `nvidia-smi` when available.
    pub model: Option<String>,
    /// Memory, bytes, from `nvidia-smi` when available.
    pub memory_bytes: Option<u64>,
}

/// Operating-system facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OsInfo {
    /// Distribution name.
    pub name: Option<String>,
    /// Distribution version.
    pub version: Option<String>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// CPU architecture the agent was built for.
    pub arch: String,
}

/// What the host runs on.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Virtualization {
    /// Hypervisor detected (`kvm`, `vmware`, `xen`, `hyper-v`, ...), `None` on bare metal
    /// or when nothing says so.
    pub hypervisor: Option<String>,
    /// Container runtime detected (`docker`, `podman`, `lxc`, ...).
    pub container: Option<String>,
    /// DMI system vendor.
    pub dmi_vendor: Option<String>,
    /// DMI product name.
    pub dmi_product: Option<String>,
    /// The CPU reports the `hypervisor` flag.
    pub cpu_hypervisor_flag: bool,
}

/// Package manager facts.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PackageInfo {
    /// `dpkg` or `rpm`.
    pub manager: String,
    /// Installed packages.
    pub installed: u32,
    /// Upgrades pending according to the local package index, when it could be read.
    pub pending_updates: Option<u32>,
    /// Of those, from a security origin.
    pub pending_security_updates: Option<u32>,
}

/// SHA-256 of the inventory without its collection time: equal for an unchanged host.
/// The agent sends it in heartbeats and the controller compares it with the stored
/// inventory's, so both compute it here, from the same encoding.
pub fn digest(inventory: &Inventory) -> [u8; 32] {
    let mut stable = inventory.clone();
    stable.collected_at_ms = 0;
    let bytes = crate::codec::encode_value(&stable).expect("inventory encodes");
    use sha2::Digest;
    sha2::Sha256::digest(&bytes).into()
}
