//! Host inventory collection (A2).
//!
//! sysinfo answers what it can portably; `/proc` and `/sys` fill in what it cannot
//! (sockets, caches, NUMA, rotational flags, link speeds, PCI display adapters). Every
//! reader is a small parser over text so it can be tested against captured files. A
//! field the host cannot tell stays `None`: nothing is invented.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use surplus_protocol::clock::UnixMillis;
use surplus_protocol::inventory::*;

fn read(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    read(path)?.parse().ok()
}

/// Collects the inventory, re-reading package facts only every `package_interval`.
#[derive(Debug)]
pub struct InventoryCollector {
    package_interval: Duration,
    packages: Option<(Instant, Option<PackageInfo>)>,
}

impl InventoryCollector {
    /// A collector that refreshes package facts every `package_interval`.
    pub fn new(package_interval: Duration) -> Self {
        Self {
            package_interval,
            packages: None,
        }
    }

    /// The current inventory; blocking (reads files, may start the package manager).
    pub fn collect(&mut self, now_ms: UnixMillis) -> Inventory {
        let stale = self
            .packages
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= self.package_interval);
        if stale {
            self.packages = Some((Instant::now(), packages()));
        }
        let mut inventory = collect_without_packages(now_ms);
        inventory.packages = self.packages.as_ref().and_then(|(_, p)| p.clone());
        inventory
    }
}

/// The inventory digest lives in the protocol crate, where the controller reads it too.
pub use surplus_protocol::inventory::digest;

fn collect_without_packages(now_ms: UnixMillis) -> Inventory {
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    let mut cpu = parse_cpuinfo(&cpuinfo);
    cpu.caches = caches(Path::new("/sys/devices/system/cpu/cpu0/cache"));
    let freq = Path::new("/sys/devices/system/cpu/cpu0/cpufreq");
    cpu.base_mhz = read_u64(freq.join("base_frequency"))
        .map(|khz| (khz / 1000) as u32)
        .or_else(|| cpu.brand.as_deref().and_then(brand_ghz));
    cpu.max_mhz = read_u64(freq.join("cpuinfo_max_freq")).map(|khz| (khz / 1000) as u32);
    if cpu.logical_cpus == 0 {
        cpu.logical_cpus = std::thread::available_parallelism().map_or(0, |n| n.get() as u32);
    }
    let virtualization = virtualization(&cpu);
    Inventory {
        collected_at_ms: now_ms,
        hostname: sysinfo::System::host_name().ok(),
        memory: MemoryInfo {
            total_bytes: meminfo_kb(&meminfo, "MemTotal").unwrap_or(0) * 1024,
            swap_total_bytes: meminfo_kb(&meminfo, "SwapTotal").unwrap_or(0) * 1024,
        },
        cpu,
        numa_nodes: numa_nodes(Path::new("/sys/devices/system/node")),
        disks: disks(Path::new("/sys/block")),
        nics: nics(Path::new("/sys/class/net")),
        gpus: gpus(Path::new("/sys/bus/pci/devices")),
        os: OsInfo {
            name: sysinfo::System::name().ok(),
            version: sysinfo::System::os_version().ok(),
            kernel: sysinfo::System::kernel_version().ok(),
            arch: std::env::consts::ARCH.to_owned(),
        },
        virtualization,
        packages: None,
        boot_time_secs: sysinfo::System::boot_time().ok().filter(|t| *t > 0),
    }
}

/// Size of the last-level data or unified cache of CPU 0, bytes.
pub fn last_level_cache_bytes() -> Option<u64> {
    caches(Path::new("/sys/devices/system/cpu/cpu0/cache"))
        .into_iter()
        .filter(|c| c.kind != "Instruction")
        .max_by_key(|c| c.level)
        .map(|c| c.size_bytes)
}

/// A `/proc/meminfo` value in kB.
pub fn meminfo_kb(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Parses `/proc/cpuinfo` (x86 and ARM layouts).
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut cpu = CpuInfo::default();
    let mut sockets = BTreeSet::new();
    let mut cores = BTreeSet::new();
    let mut physical = None::<String>;
    let mut flags = BTreeSet::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => cpu.logical_cpus += 1,
            "vendor_id" | "CPU implementer" if cpu.vendor.is_none() => {
                cpu.vendor = Some(value.to_owned())
            }
            "model name" | "Model" if cpu.brand.is_none() => cpu.brand = Some(value.to_owned()),
            "physical id" => {
                sockets.insert(value.to_owned());
                physical = Some(value.to_owned());
            }
            "core id" => {
                cores.insert((physical.clone().unwrap_or_default(), value.to_owned()));
            }
            "flags" | "Features" => flags.extend(value.split_whitespace().map(str::to_owned)),
            _ => {}
        }
    }
    if !sockets.is_empty() {
        cpu.sockets = Some(sockets.len() as u32);
    }
    if !cores.is_empty() {
        cpu.physical_cores = Some(cores.len() as u32);
    }
    cpu.flags = flags.into_iter().collect();
    cpu
}

/// The nominal clock in a brand string such as `... CPU @ 2.40GHz`.
pub fn brand_ghz(brand: &str) -> Option<u32> {
    let at = brand.rfind('@')?;
    let ghz: f64 = brand[at + 1..]
        .trim()
        .strip_suffix("GHz")?
        .trim()
        .parse()
        .ok()?;
    Some((ghz * 1000.0).round() as u32)
}

/// A size as sysfs prints cache sizes (`32K`, `1024K`, `8M`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.chars().last()? {
        'K' => (&t[..t.len() - 1], 1024),
        'M' => (&t[..t.len() - 1], 1024 * 1024),
        'G' => (&t[..t.len() - 1], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

/// Number of CPUs in a kernel CPU list (`0-3,8-11`).
pub fn cpulist_len(list: &str) -> Option<u32> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

fn sorted_entries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn caches(dir: &Path) -> Vec<CacheInfo> {
    sorted_entries(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("index"))
        })
        .filter_map(|p| {
            Some(CacheInfo {
                level: read(p.join("level"))?.parse().ok()?,
                kind: read(p.join("type"))?,
                size_bytes: parse_size(&read(p.join("size"))?)?,
                shared_by_cpus: read(p.join("shared_cpu_list")).and_then(|l| cpulist_len(&l)),
            })
        })
        .collect()
}

fn numa_nodes(dir: &Path) -> Vec<NumaNode> {
    sorted_entries(dir)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            let id = name.strip_prefix("node")?.parse().ok()?;
            let meminfo = read(p.join("meminfo")).unwrap_or_default();
            let memory_bytes = meminfo.lines().find_map(|l| {
                let (_, rest) = l.split_once("MemTotal:")?;
                rest.split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
                    .map(|kb| kb * 1024)
            });
            Some(NumaNode {
                id,
                cpus: read(p.join("cpulist")).unwrap_or_default(),
                memory_bytes,
            })
        })
        .collect()
}

fn disks(dir: &Path) -> Vec<Disk> {
    let mounts: Vec<sysinfo::Disk> = sysinfo::Disks::new_with_refreshed_list()
        .map(Vec::from)
        .unwrap_or_default();
    sorted_entries(dir)
        .into_iter()
        .filter_map(|p| {
            let device = p.file_name()?.to_string_lossy().into_owned();
            if ["loop", "ram", "zram", "dm-", "sr", "nbd"]
                .iter()
                .any(|x| device.starts_with(x))
            {
                return None;
            }
            let mut disk_mounts: Vec<Mount> = mounts
                .iter()
                .filter_map(|m| {
                    let name = m.name().to_string_lossy();
                    let part = name.strip_prefix("/dev/")?;
                    (part == device || p.join(part).exists()).then(|| Mount {
                        mount_point: m.mount_point().to_string_lossy().into_owned(),
                        filesystem: m.file_system().to_string_lossy().into_owned(),
                        total_bytes: m.total_space(),
                    })
                })
                .collect();
            disk_mounts.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
            disk_mounts.dedup_by(|a, b| a.mount_point == b.mount_point);
            Some(Disk {
                model: read(p.join("device/model")),
                capacity_bytes: read_u64(p.join("size")).map(|sectors| sectors * 512),
                rotational: read(p.join("queue/rotational")).map(|r| r == "1"),
                removable: read(p.join("removable")).map(|r| r == "1"),
                mounts: disk_mounts,
                device,
            })
        })
        .collect()
}

fn nics(dir: &Path) -> Vec<Nic> {
    sorted_entries(dir)
        .into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            Some(Nic {
                mac: read(p.join("address")).filter(|m| m != "00:00:00:00:00:00"),
                // The kernel reports -1 or refuses the read when the link is down or unknown.
                speed_mbps: read(p.join("speed"))
                    .and_then(|s| s.parse::<i64>().ok())
                    .filter(|s| *s > 0)
                    .map(|s| s as u32),
                mtu: read(p.join("mtu")).and_then(|s| s.parse().ok()),
                is_virtual: !p.join("device").exists(),
                name,
            })
        })
        .collect()
}

fn pci_vendor(id: &str) -> Option<&'static str> {
    Some(match id {
        "0x10de" => "NVIDIA",
        "0x1002" => "AMD",
        "0x8086" => "Intel",
        "0x1af4" => "Red Hat (virtio)",
        "0x1234" => "QEMU",
        "0x15ad" => "VMware",
        "0x1414" => "Microsoft",
        "0x1a03" => "ASPEED",
        "0x102b" => "Matrox",
        _ => return None,
    })
}

fn gpus(dir: &Path) -> Vec<Gpu> {
    let mut gpus: Vec<Gpu> = sorted_entries(dir)
        .into_iter()
        .filter(|p| read(p.join("class")).is_some_and(|c| c.starts_with("0x03")))
        .filter_map(|p| {
            let vendor_id = read(p.join("vendor"))?;
            Some(Gpu {
                pci_address: p.file_name()?.to_string_lossy().into_owned(),
                device_id: read(p.join("device")).unwrap_or_default(),
                vendor: pci_vendor(&vendor_id).map(str::to_owned),
                vendor_id,
                model: None,
                memory_bytes: None,
            })
        })
        .collect();
    if gpus.iter().any(|g| g.vendor_id == "0x10de") {
        nvidia_details(&mut gpus);
    }
    gpus
}

/// Fills model and memory of NVIDIA adapters from `nvidia-smi`, when it is installed.
fn nvidia_details(gpus: &mut [Gpu]) {
    let Ok(out) = Command::new("nvidia-smi")
        .args([
            "--query-gpu=pci.bus_id,name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [bus, name, mib] = fields[..] else {
            continue;
        };
        // nvidia-smi prints 00000000:01:00.0, sysfs 0000:01:00.0
        let bus = bus.to_lowercase();
        if let Some(g) = gpus.iter_mut().find(|g| bus.ends_with(&g.pci_address)) {
            g.model = Some(name.to_owned());
            g.memory_bytes = mib.parse::<u64>().ok().map(|m| m * 1024 * 1024);
        }
    }
}

/// Maps DMI strings to a hypervisor name.
pub fn hypervisor_from_dmi(vendor: &str, product: &str) -> Option<&'static str> {
    let v = vendor.to_lowercase();
    let p = product.to_lowercase();
    Some(
        if v.contains("qemu") || p.contains("kvm") || p.contains("qemu") {
            "kvm"
        } else if v.contains("vmware") {
            "vmware"
        } else if v.contains("xen") || p.contains("hvm domu") {
            "xen"
        } else if v.contains("microsoft") && p.contains("virtual") {
            "hyper-v"
        } else if v.contains("innotek") || p.contains("virtualbox") {
            "virtualbox"
        } else if v.contains("amazon ec2") {
            "aws-nitro"
        } else if v.contains("google") {
            "gce"
        } else if p.contains("openstack") {
            "openstack"
        } else {
            return None;
        },
    )
}

/// Detects a container runtime from the markers it leaves.
pub fn container_from_markers(
    dockerenv: bool,
    containerenv: bool,
    pid1_environ: &str,
    pid1_cgroup: &str,
) -> Option<String> {
    if dockerenv {
        return Some("docker".into());
    }
    if containerenv {
        return Some("podman".into());
    }
    if let Some(value) = pid1_environ
        .split('\0')
        .find_map(|kv| kv.strip_prefix("container="))
    {
        return Some(value.to_owned());
    }
    for (marker, name) in [
        ("kubepods", "kubernetes"),
        ("docker", "docker"),
        ("lxc", "lxc"),
        ("containerd", "containerd"),
    ] {
        if pid1_cgroup.contains(marker) {
            return Some(name.into());
        }
    }
    None
}

fn virtualization(cpu: &CpuInfo) -> Virtualization {
    let dmi_vendor = read("/sys/class/dmi/id/sys_vendor");
    let dmi_product = read("/sys/class/dmi/id/product_name");
    let cpu_hypervisor_flag = cpu.flags.iter().any(|f| f == "hypervisor");
    let mut hypervisor = hypervisor_from_dmi(
        dmi_vendor.as_deref().unwrap_or(""),
        dmi_product.as_deref().unwrap_or(""),
    )
    .map(str::to_owned);
    if hypervisor.is_none() && cpu_hypervisor_flag {
        hypervisor = Some(read("/sys/hypervisor/type").unwrap_or_else(|| "unknown".into()));
    }
    let environ = fs::read("/proc/1/environ")
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    Virtualization {
        hypervisor,
        container: container_from_markers(
            Path::new("/.dockerenv").exists(),
            Path::new("/run/.containerenv").exists(),
            &environ,
            &read("/proc/1/cgroup").unwrap_or_default(),
        ),
        dmi_vendor,
        dmi_product,
        cpu_hypervisor_flag,
    }
}

/// Installed packages in a dpkg status file.
pub fn dpkg_installed(status: &str) -> u32 {
    status
        .lines()
        .filter(|l| l.starts_with("Status: ") && l.ends_with(" installed"))
        .count() as u32
}

/// `(pending, security)` upgrades in `apt-get -s upgrade` output.
pub fn apt_pending(simulation: &str) -> (u32, u32) {
    let inst: Vec<&str> = simulation
        .lines()
        .filter(|l| l.starts_with("Inst "))
        .collect();
    let security = inst
        .iter()
        .filter(|l| l.to_lowercase().contains("security"))
        .count();
    (inst.len() as u32, security as u32)
}

fn packages() -> Option<PackageInfo> {
    if let Some(status) = read("/var/lib/dpkg/status") {
        let pending = Command::new("apt-get")
            .args(["-s", "-o", "Debug::NoLocking=true", "upgrade"])
            .env("LC_ALL", "C")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| apt_pending(&String::from_utf8_lossy(&o.stdout)));
        return Some(PackageInfo {
            manager: "dpkg".into(),
            installed: dpkg_installed(&status),
            pending_updates: pending.map(|p| p.0),
            pending_security_updates: pending.map(|p| p.1),
        });
    }
    let out = Command::new("rpm")
        .args(["-qa", "--qf", "x\n"])
        .output()
        .ok()?;
    out.status.success().then(|| PackageInfo {
        manager: "rpm".into(),
        installed: String::from_utf8_lossy(&out.stdout).lines().count() as u32,
        pending_updates: None,
        pending_security_updates: None,
    })
}

/// Live figures for heartbeats: `(uptime seconds, 1-minute load, memory used bytes)`.
pub fn live_figures() -> (u64, f64, u64) {
    let meminfo = read("/proc/meminfo").unwrap_or_default();
    let used = match (
        meminfo_kb(&meminfo, "MemTotal"),
        meminfo_kb(&meminfo, "MemAvailable"),
    ) {
        (Some(t), Some(a)) => t.saturating_sub(a) * 1024,
        _ => 0,
    };
    (
        sysinfo::System::uptime().unwrap_or(0),
        sysinfo::System::load_average()
            .map(|l| l.one)
            .unwrap_or(0.0),
        used,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu sse2 avx2 hypervisor\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\nphysical id\t: 0\ncore id\t\t: 0\nflags\t\t: fpu sse2 avx2 hypervisor\n\nprocessor\t: 2\nphysical id\t: 1\ncore id\t\t: 0\nflags\t\t: fpu\n";

    #[test]
    fn cpuinfo_counts_sockets_cores_and_threads() {
        let cpu = parse_cpuinfo(CPUINFO);
        assert_eq!(cpu.logical_cpus, 3);
        assert_eq!(cpu.sockets, Some(2));
        assert_eq!(cpu.physical_cores, Some(2));
        assert_eq!(cpu.vendor.as_deref(), Some("GenuineIntel"));
        assert_eq!(cpu.flags, vec!["avx2", "fpu", "hypervisor", "sse2"]);
        assert_eq!(brand_ghz(cpu.brand.as_deref().unwrap()), Some(2400));
    }

    #[test]
    fn cpuinfo_without_topology_leaves_it_unknown() {
        let cpu = parse_cpuinfo("processor : 0\nFeatures : fp asimd\nCPU implementer : 0x41\n");
        assert_eq!(cpu.logical_cpus, 1);
        assert_eq!(cpu.sockets, None);
        assert_eq!(cpu.physical_cores, None);
        assert_eq!(cpu.vendor.as_deref(), Some("0x41"));
    }

    #[test]
    fn sizes_cpulists_and_meminfo_parse() {
        assert_eq!(parse_size("32K"), Some(32 * 1024));
        assert_eq!(parse_size("8M"), Some(8 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(cpulist_len("0-3,8-11"), Some(8));
        assert_eq!(cpulist_len("5"), Some(1));
        assert_eq!(cpulist_len("3-1"), None);
        assert_eq!(
            meminfo_kb("MemTotal:       16384 kB\nMemFree: 1 kB", "MemTotal"),
            Some(16384)
        );
        assert_eq!(meminfo_kb("MemTotalX: 5 kB", "MemTotal"), None);
    }

    #[test]
    fn virtualization_is_named_from_its_markers() {
        assert_eq!(
            hypervisor_from_dmi("QEMU", "Standard PC (Q35 + ICH9, 2009)"),
            Some("kvm")
        );
        assert_eq!(
            hypervisor_from_dmi("Microsoft Corporation", "Virtual Machine"),
            Some("hyper-v")
        );
        assert_eq!(hypervisor_from_dmi("Dell Inc.", "PowerEdge R640"), None);
        assert_eq!(
            container_from_markers(true, false, "", ""),
            Some("docker".into())
        );
        assert_eq!(
            container_from_markers(false, false, "PATH=/bin\0container=lxc\0", ""),
            Some("lxc".into())
        );
        assert_eq!(
            container_from_markers(false, false, "", "0::/kubepods/burstable/pod1"),
            Some("kubernetes".into())
        );
        assert_eq!(
            container_from_markers(false, false, "", "0::/init.scope"),
            None
        );
    }

    #[test]
    fn package_facts_parse() {
        let status = "Package: a\nStatus: install ok installed\n\nPackage: b\nStatus: deinstall ok config-files\n\nPackage: c\nStatus: install ok installed\n";
        assert_eq!(dpkg_installed(status), 2);
        let sim = "Reading package lists...\nInst libssl3 [3.0.11-1~deb12u1] (3.0.11-1~deb12u2 Debian-Security:12/stable-security [amd64])\nInst tzdata [2024a-0+deb12u1] (2025b-0+deb12u1 Debian:12.11/stable [all])\nConf tzdata\n";
        assert_eq!(apt_pending(sim), (2, 1));
    }

    #[test]
    fn digest_ignores_collection_time_only() {
        let mut a = Inventory::default();
        let mut b = a.clone();
        b.collected_at_ms = 99;
        assert_eq!(digest(&a), digest(&b));
        a.memory.total_bytes = 1;
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn this_host_inventory_is_plausible() {
        let inv = InventoryCollector::new(Duration::from_secs(3600)).collect(1);
        assert!(inv.cpu.logical_cpus >= 1);
        assert!(inv.memory.total_bytes > 0);
        // Against the kernel's own answer, not the constant the collector copies.
        let uname = std::process::Command::new("uname")
            .arg("-m")
            .output()
            .unwrap();
        assert_eq!(inv.os.arch, String::from_utf8_lossy(&uname.stdout).trim());
    }
}
