//! Control groups for the process driver, on either hierarchy a host may have: the
//! unified v2 tree (most current distributions) or v1 with separate `cpu` and `memory`
//! controllers (older hosts, some sandboxes). Both are files under a root that tests can
//! point elsewhere; nothing here runs a program.

use std::path::{Path, PathBuf};

use surplus_protocol::control::Limits;

/// CFS period used for CPU quotas, µs.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Which hierarchy a host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// One tree with `cgroup.controllers`.
    V2 {
        /// Mount point (`/sys/fs/cgroup`).
        root: PathBuf,
    },
    /// Separate mounts per controller.
    V1 {
        /// The `cpu` controller's mount.
        cpu: PathBuf,
        /// The `memory` controller's mount.
        memory: PathBuf,
        /// The `cpuacct` controller's mount (CPU time), when the host has one.
        cpuacct: Option<PathBuf>,
        /// The `blkio` controller's mount (disk bytes), when the host has one.
        blkio: Option<PathBuf>,
        /// The `pids` controller's mount (process limits), when the host has one.
        pids: Option<PathBuf>,
    },
}

impl Hierarchy {
    /// Finds what `root` (normally `/sys/fs/cgroup`) offers. A v2 tree counts only if
    /// it can delegate `cpu` and `memory`; a hybrid host (v1 controllers plus an empty
    /// unified tree) is v1.
    pub fn detect(root: &Path) -> Result<Self, String> {
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("cpu") && has("memory") {
                return Ok(Hierarchy::V2 {
                    root: root.to_owned(),
                });
            }
        }
        let cpu = ["cpu", "cpu,cpuacct", "cpuacct,cpu"]
            .iter()
            .map(|n| root.join(n))
            .find(|p| p.join("cpu.cfs_quota_us").exists());
        let memory = root.join("memory");
        let cpuacct = [cpu.clone(), Some(root.join("cpuacct"))]
            .into_iter()
            .flatten()
            .find(|p| p.join("cpuacct.usage").exists());
        let blkio =
            Some(root.join("blkio")).filter(|p| p.join("blkio.throttle.io_service_bytes").exists());
        let pids = Some(root.join("pids")).filter(|p| p.join("cgroup.procs").exists());
        match cpu {
            Some(cpu) if memory.join("memory.limit_in_bytes").exists() => Ok(Hierarchy::V1 {
                cpu,
                memory,
                cpuacct,
                blkio,
                pids,
            }),
            _ => Err(format!(
                "no usable cgroup hierarchy under {}: need cgroup v2 with the cpu and memory controllers, or v1 cpu and memory mounts",
                root.display()
            )),
        }
    }

    /// `v1` or `v2`.
    pub fn version(&self) -> &'static str {
        match self {
            Hierarchy::V2 { .. } => "v2",
            Hierarchy::V1 { .. } => "v1",
        }
    }

    /// Can this hierarchy limit the number of processes of a group?
    pub fn limits_pids(&self) -> bool {
        match self {
            Hierarchy::V2 { root } => std::fs::read_to_string(root.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids")),
            Hierarchy::V1 { pids, .. } => pids.is_some(),
        }
    }
}

/// Counters of one group (see [`Group::usage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupUsage {
    /// Changes when the group is created anew.
    pub generation: u64,
    /// CPU time, ns.
    pub cpu_ns: Option<u64>,
    /// Memory in use, bytes.
    pub memory_bytes: Option<u64>,
    /// Bytes read from block devices.
    pub disk_read_bytes: Option<u64>,
    /// Bytes written to block devices.
    pub disk_write_bytes: Option<u64>,
}

/// The value of `key` in a `key value` per line file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// One instance's group (in both v1 controllers, or one v2 directory).
#[derive(Debug, Clone)]
pub struct Group {
    hierarchy: Hierarchy,
    /// The directories: one for v2, cpu then memory for v1.
    dirs: Vec<PathBuf>,
    /// The directory holding `pids.max`, when the host limits processes.
    pids_dir: Option<PathBuf>,
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl Group {
    /// The group `parent/name` (not created yet).
    pub fn new(hierarchy: &Hierarchy, parent: &str, name: &str) -> Self {
        let (dirs, pids_dir) = match hierarchy {
            Hierarchy::V2 { root } => {
                let dir = root.join(parent).join(name);
                let pids = hierarchy.limits_pids().then(|| dir.clone());
                (vec![dir], pids)
            }
            Hierarchy::V1 {
                cpu,
                memory,
                cpuacct,
                blkio,
                pids,
            } => {
                // cpu and memory first (limits read them by position), then the
                // accounting and pids controllers the process also joins.
                let mut dirs = vec![cpu.join(parent).join(name), memory.join(parent).join(name)];
                for extra in [cpuacct, blkio, pids].into_iter().flatten() {
                    if extra != cpu {
                        dirs.push(extra.join(parent).join(name));
                    }
                }
                (dirs, pids.as_ref().map(|p| p.join(parent).join(name)))
            }
        };
        Self {
            hierarchy: hierarchy.clone(),
            dirs,
            pids_dir,
        }
    }

    /// The first directory, which names the group in records.
    pub fn path(&self) -> &Path {
        &self.dirs[0]
    }

    /// Does the group exist?
    pub fn exists(&self) -> bool {
        self.dirs.iter().all(|d| d.is_dir())
    }

    /// Creates the group (and, on v2, delegates cpu and memory to it).
    pub fn create(&self) -> std::io::Result<()> {
        if let Hierarchy::V2 { root } = &self.hierarchy {
            let parent = self.dirs[0].parent().expect("group has a parent");
            std::fs::create_dir_all(parent)?;
            // Enable the controllers on every level from the root down to the parent.
            let enable = if self.pids_dir.is_some() {
                "+cpu +memory +pids"
            } else {
                "+cpu +memory"
            };
            let mut level = root.clone();
            write(&level.join("cgroup.subtree_control"), enable)?;
            for part in parent.strip_prefix(root).expect("under root").components() {
                level.push(part);
                write(&level.join("cgroup.subtree_control"), enable)?;
            }
        }
        for d in &self.dirs {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }

    /// Files that a child process writes `0` into to join the group before it runs
    /// anything (see the process driver's `pre_exec`).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Applies `limits`; `None` fields lift the limit. The process limit is written as
    /// `limits.pids` plus `pids_overhead` (processes the driver itself keeps in the
    /// group), so that the instance's own processes get exactly what it asked for.
    pub fn set_limits(&self, limits: &Limits, pids_overhead: u32) -> std::io::Result<()> {
        if let Some(dir) = &self.pids_dir {
            let max = limits.pids.map_or("max".to_owned(), |p| {
                (p.saturating_add(pids_overhead)).to_string()
            });
            write(&dir.join("pids.max"), &max)?;
        } else if limits.pids.is_some() {
            return Err(std::io::Error::other(
                "this host has no pids cgroup controller: a process limit cannot be enforced",
            ));
        }
        let quota = limits
            .millicpus
            .map(|m| u64::from(m) * CPU_PERIOD_US / 1000);
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs[0];
                let cpu = match quota {
                    Some(q) => format!("{q} {CPU_PERIOD_US}"),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write(&d.join("cpu.max"), &cpu)?;
                let mem = limits
                    .memory_bytes
                    .map_or("max".to_owned(), |b| b.to_string());
                write(&d.join("memory.max"), &mem)?;
                if d.join("memory.swap.max").exists() {
                    // The limit is on memory, not memory plus swap.
                    write(
                        &d.join("memory.swap.max"),
                        if limits.memory_bytes.is_some() {
                            "0"
                        } else {
                            "max"
                        },
                    )?;
                }
            }
            Hierarchy::V1 { .. } => {
                let (cpu, mem) = (&self.dirs[0], &self.dirs[1]);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                write(
                    &cpu.join("cpu.cfs_quota_us"),
                    &quota.map_or("-1".to_owned(), |q| q.to_string()),
                )?;
                // memsw must stay >= memory: lift it first, set memory, then pin it.
                let memsw = mem.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, "-1")?;
                }
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits
                        .memory_bytes
                        .map_or("-1".to_owned(), |b| b.to_string()),
                )?;
                if let (true, Some(b)) = (memsw.exists(), limits.memory_bytes) {
                    write(&memsw, &b.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Limits as the kernel now enforces them (read back, not remembered); the process
    /// limit less `pids_overhead` (see [`Group::set_limits`]).
    pub fn read_limits(&self, pids_overhead: u32) -> std::io::Result<Limits> {
        let read = |p: PathBuf| -> std::io::Result<String> {
            Ok(std::fs::read_to_string(p)?.trim().to_owned())
        };
        let (quota, period, memory) = match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs[0];
                let cpu = read(d.join("cpu.max"))?;
                let mut parts = cpu.split_whitespace();
                let quota = parts.next().and_then(|q| q.parse::<u64>().ok());
                let period = parts.next().and_then(|p| p.parse::<u64>().ok());
                let memory = read(d.join("memory.max"))?.parse::<u64>().ok();
                (quota, period, memory)
            }
            Hierarchy::V1 { .. } => {
                let quota = read(self.dirs[0].join("cpu.cfs_quota_us"))?
                    .parse::<u64>()
                    .ok();
                let period = read(self.dirs[0].join("cpu.cfs_period_us"))?
                    .parse::<u64>()
                    .ok();
                // v1 reports "no limit" as a huge page-rounded number.
                let memory = read(self.dirs[1].join("memory.limit_in_bytes"))?
                    .parse::<u64>()
                    .ok()
                    .filter(|&b| b < 1 << 62);
                (quota, period, memory)
            }
        };
        let pids = match &self.pids_dir {
            Some(dir) => read(dir.join("pids.max"))?
                .parse::<u32>()
                .ok()
                .map(|p| p.saturating_sub(pids_overhead)),
            None => None,
        };
        Ok(Limits {
            millicpus: match (quota, period) {
                (Some(q), Some(p)) if p > 0 => u32::try_from(q * 1000 / p).ok(),
                _ => None,
            },
            memory_bytes: memory,
            pids,
        })
    }

    /// What the kernel has counted for the group: CPU time, memory in use and block
    /// I/O bytes (each `None` when the host does not account it), and a generation
    /// that changes when the group is created anew (its directory's inode).
    pub fn usage(&self) -> std::io::Result<GroupUsage> {
        use std::os::unix::fs::MetadataExt;
        let generation = std::fs::metadata(&self.dirs[0])?.ino();
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        let mut usage = GroupUsage {
            generation,
            ..Default::default()
        };
        match &self.hierarchy {
            Hierarchy::V2 { .. } => {
                let d = &self.dirs[0];
                usage.cpu_ns = read(d.join("cpu.stat"))
                    .and_then(|t| keyed(&t, "usage_usec"))
                    .map(|us| us * 1000);
                usage.memory_bytes =
                    read(d.join("memory.current")).and_then(|t| t.trim().parse().ok());
                if let Some(io) = read(d.join("io.stat")) {
                    let (mut r, mut w) = (0, 0);
                    for line in io.lines() {
                        for field in line.split_whitespace() {
                            if let Some(v) = field.strip_prefix("rbytes=") {
                                r += v.parse::<u64>().unwrap_or(0);
                            } else if let Some(v) = field.strip_prefix("wbytes=") {
                                w += v.parse::<u64>().unwrap_or(0);
                            }
                        }
                    }
                    usage.disk_read_bytes = Some(r);
                    usage.disk_write_bytes = Some(w);
                }
            }
            Hierarchy::V1 { .. } => {
                for d in &self.dirs {
                    if let Some(t) = read(d.join("cpuacct.usage")) {
                        usage.cpu_ns = t.trim().parse().ok();
                    }
                    if let Some(t) = read(d.join("blkio.throttle.io_service_bytes")) {
                        let (mut r, mut w) = (0, 0);
                        for line in t.lines() {
                            let mut parts = line.split_whitespace();
                            match (parts.next(), parts.next(), parts.next()) {
                                (Some(_dev), Some("Read"), Some(v)) => {
                                    r += v.parse::<u64>().unwrap_or(0)
                                }
                                (Some(_dev), Some("Write"), Some(v)) => {
                                    w += v.parse::<u64>().unwrap_or(0)
                                }
                                _ => {}
                            }
                        }
                        usage.disk_read_bytes = Some(r);
                        usage.disk_write_bytes = Some(w);
                    }
                }
                usage.memory_bytes = read(self.dirs[1].join("memory.usage_in_bytes"))
                    .and_then(|t| t.trim().parse().ok());
            }
        }
        Ok(usage)
    }

    /// Process ids in the group.
    pub fn pids(&self) -> std::io::Result<Vec<i32>> {
        let mut pids = Vec::new();
        for f in self.procs_files() {
            match std::fs::read_to_string(&f) {
                Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Sends `signal` to every process in the group.
    pub fn signal(&self, signal: i32) -> std::io::Result<usize> {
        let pids = self.pids()?;
        for &pid in &pids {
            // SAFETY: kill(2) with a pid read from the group and a valid signal number
            // has no memory effects; a process that already ended gives ESRCH.
            unsafe { libc::kill(pid, signal) };
        }
        Ok(pids.len())
    }

    /// Removes the (empty) group.
    pub fn remove(&self) -> std::io::Result<()> {
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", d.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 tree laid out as the kernel would, in a temporary directory: the files the
    /// driver writes and reads back.
    #[test]
    fn v2_usage_is_read_from_the_kernel_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory io\n").unwrap();
        let h = Hierarchy::detect(root.path()).unwrap();
        let g = Group::new(&h, "surplus", "i-0000000000000002");
        std::fs::create_dir_all(g.path()).unwrap();
        std::fs::write(
            g.path().join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .unwrap();
        std::fs::write(g.path().join("memory.current"), "4096\n").unwrap();
        std::fs::write(
            g.path().join("io.stat"),
            "8:0 rbytes=100 wbytes=20 rios=1 wios=1\n8:16 rbytes=1 wbytes=2\n",
        )
        .unwrap();
        let u = g.usage().unwrap();
        assert_eq!(u.cpu_ns, Some(1_500_000));
        assert_eq!(u.memory_bytes, Some(4096));
        assert_eq!(
            (u.disk_read_bytes, u.disk_write_bytes),
            (Some(101), Some(22))
        );
    }

    #[test]
    fn v2_limits_are_written_and_read_back_in_kernel_format() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let h = Hierarchy::detect(root.path()).unwrap();
        assert_eq!(h.version(), "v2");
        let g = Group::new(&h, "surplus", "i-0000000000000001");
        std::fs::create_dir_all(root.path().join("surplus")).unwrap();
        std::fs::write(root.path().join("surplus/cgroup.subtree_control"), "").unwrap();
        g.create().unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("surplus/cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let limits = Limits {
            millicpus: Some(500),
            memory_bytes: Some(64 << 20),
            pids: Some(100),
        };
        g.set_limits(&limits, 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(g.path().join("pids.max")).unwrap(),
            "102",
            "the driver's own processes do not count against the instance"
        );
        assert_eq!(
            std::fs::read_to_string(g.path().join("cpu.max")).unwrap(),
            "50000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(g.path().join("memory.max")).unwrap(),
            "67108864"
        );
        assert_eq!(g.read_limits(2).unwrap(), limits);
        g.set_limits(&Limits::default(), 2).unwrap();
        assert_eq!(g.read_limits(2).unwrap(), Limits::default());
    }

    #[test]
    fn a_hybrid_host_with_an_empty_unified_tree_is_v1() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "\n").unwrap();
        assert!(Hierarchy::detect(root.path()).is_err());
        std::fs::create_dir_all(root.path().join("cpu,cpuacct")).unwrap();
        std::fs::write(root.path().join("cpu,cpuacct/cpu.cfs_quota_us"), "-1").unwrap();
        std::fs::create_dir_all(root.path().join("memory")).unwrap();
        std::fs::write(root.path().join("memory/memory.limit_in_bytes"), "1").unwrap();
        assert_eq!(Hierarchy::detect(root.path()).unwrap().version(), "v1");
    }
}
