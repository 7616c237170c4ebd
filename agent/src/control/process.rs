//! The `process` driver ("bare metal"): an instance is a process tree in its own
//! cgroup, started without a shell, its output appended to log files.
//!
//! The cgroup is the instance: it holds every process the tree forks, carries the CPU
//! and memory limits, says whether anything still runs, and is what stop signals. The
//! child joins it before it executes anything (in `pre_exec`), so no fork can escape.
//! Children are put in their own session, so they outlive an agent restart and are
//! re-adopted through their cgroup.
//!
//! This driver cannot mount: an attached volume is a directory under `volume_root`,
//! handed to the instance as `SURPLUS_VOLUME_<n>` (and the requested mount path as
//! `SURPLUS_VOLUME_<n>_MOUNT`).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use surplus_protocol::control::*;

use super::cgroup::{Group, Hierarchy};
use super::{Driver, DriverError, Mount, Observed};

/// `[control.process]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Where the cgroup file systems are mounted.
    pub cgroup_root: PathBuf,
    /// The group under which every instance gets its own.
    pub cgroup_parent: String,
    /// Where volumes and snapshots live; empty means `<data_dir>/control/volumes`.
    pub volume_root: PathBuf,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "surplus".into(),
            volume_root: PathBuf::new(),
        }
    }
}

/// The process driver.
pub struct ProcessDriver {
    hierarchy: Hierarchy,
    parent: String,
    logs: PathBuf,
    volumes: PathBuf,
    /// Exit codes of children this agent process started: `None` until reaped.
    exits: Arc<Mutex<HashMap<String, Option<i32>>>>,
}

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessDriver {
    /// Opens the driver: finds the cgroup hierarchy and checks it is writable.
    pub fn open(config: &ProcessConfig, data_dir: &Path) -> Result<Self, DriverError> {
        super::validate_name("cgroup_parent", &config.cgroup_parent)?;
        let hierarchy = Hierarchy::detect(&config.cgroup_root).map_err(DriverError::Failed)?;
        let probe = Group::new(&hierarchy, &config.cgroup_parent, "probe");
        probe.create().map_err(|e| {
            DriverError::failed(
                &format!(
                    "the process driver needs to create cgroups (cgroup {}; run the agent as root or delegate the group)",
                    hierarchy.version()
                ),
                e,
            )
        })?;
        let _ = probe.remove();
        let volumes = if config.volume_root.as_os_str().is_empty() {
            data_dir.join("control").join("volumes")
        } else {
            config.volume_root.clone()
        };
        let logs = data_dir.join("control").join("logs");
        for d in [&volumes, &logs, &volumes.join(".snapshots")] {
            std::fs::create_dir_all(d)
                .map_err(|e| DriverError::failed(&d.display().to_string(), e))?;
        }
        tracing::info!(cgroup = hierarchy.version(), volumes = %volumes.display(), "process driver ready");
        Ok(Self {
            hierarchy,
            parent: config.cgroup_parent.clone(),
            logs,
            volumes,
            exits: Default::default(),
        })
    }

    fn group(&self, id: &str) -> Group {
        Group::new(&self.hierarchy, &self.parent, id)
    }

    /// Where an instance's standard output and error go.
    pub fn log_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.logs.join(format!("{id}.stdout.log")),
            self.logs.join(format!("{id}.stderr.log")),
        )
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.volumes.join(id)
    }

    fn spawn(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<(), DriverError> {
        let Some((program, args)) = spec.command.split_first() else {
            return Err(
                Invalid::new("command", "the process driver needs an executable to run").into(),
            );
        };
        let group = self.group(id);
        group
            .create()
            .map_err(|e| DriverError::failed("cannot create the instance's cgroup", e))?;
        group
            .set_limits(&spec.limits)
            .map_err(|e| DriverError::failed("cannot set the instance's limits", e))?;
        let (out, err) = self.log_paths(id);
        let open = |p: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| DriverError::failed(&p.display().to_string(), e))
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .envs(&spec.env)
            .env("SURPLUS_INSTANCE_ID", id)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(open(&out)?)
            .stderr(open(&err)?)
            .kill_on_drop(false);
        for (n, m) in mounts.iter().enumerate() {
            command
                .env(
                    format!("SURPLUS_VOLUME_{n}"),
                    self.volume_dir(&m.attachment.volume_id),
                )
                .env(
                    format!("SURPLUS_VOLUME_{n}_MOUNT"),
                    &m.attachment.mount_path,
                );
        }
        let procs: Vec<CString> = group
            .procs_files()
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).expect("paths hold no NUL"))
            .collect();
        // SAFETY: between fork and exec the closure only makes async-signal-safe system
        // calls (setsid, open, write, close) on memory prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let wrote = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if wrote != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| DriverError::failed(&format!("cannot start {program:?}"), e))?;
        self.exits
            .lock()
            .expect("exits poisoned")
            .insert(id.to_owned(), None);
        let exits = self.exits.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await {
                use std::os::unix::process::ExitStatusExt;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                exits.lock().expect("exits poisoned").insert(id, Some(code));
            }
        });
        Ok(())
    }

    /// Signals the group until it is empty: SIGTERM, then SIGKILL after `grace`.
    async fn drain(&self, id: &str, grace: Duration) -> Result<(), DriverError> {
        let group = self.group(id);
        if !group.exists() {
            return Ok(());
        }
        let empty = |g: &Group| g.pids().map(|p| p.is_empty()).unwrap_or(true);
        if !grace.is_zero() {
            group
                .signal(libc::SIGTERM)
                .map_err(|e| DriverError::failed("signal", e))?;
            let deadline = tokio::time::Instant::now() + grace;
            while !empty(&group) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !empty(&group) {
            group
                .signal(libc::SIGKILL)
                .map_err(|e| DriverError::failed("signal", e))?;
            if tokio::time::Instant::now() > deadline {
                return Err(DriverError::Failed(format!(
                    "processes of {id} survived SIGKILL for 10 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Copies a tree; symbolic links are copied as links, never followed.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a properly sized out-parameter.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> String {
        "process".into()
    }

    async fn run(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<String, DriverError> {
        let group = self.group(id);
        if !group.pids().unwrap_or_default().is_empty() {
            // Already started by an earlier attempt of the same command.
            return Ok(group.path().display().to_string());
        }
        self.spawn(id, spec, mounts)?;
        Ok(group.path().display().to_string())
    }

    async fn start(&self, instance: &Instance, mounts: &[Mount]) -> Result<(), DriverError> {
        if self
            .group(&instance.id)
            .pids()
            .unwrap_or_default()
            .is_empty()
        {
            self.spawn(&instance.id, &instance.spec, mounts)?;
        }
        Ok(())
    }

    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        self.drain(&instance.id, grace).await
    }

    async fn terminate(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        self.drain(&instance.id, grace).await?;
        self.group(&instance.id)
            .remove()
            .map_err(|e| DriverError::failed("cannot remove the instance's cgroup", e))?;
        let (out, err) = self.log_paths(&instance.id);
        let _ = std::fs::remove_file(out);
        let _ = std::fs::remove_file(err);
        self.exits
            .lock()
            .expect("exits poisoned")
            .remove(&instance.id);
        Ok(())
    }

    /// CPU, memory and block I/O from the instance's cgroup. Network bytes are not
    /// measurable: the processes share the host's network namespace, so no counter
    /// belongs to them alone.
    async fn usage(
        &self,
        instance: &Instance,
    ) -> Result<Option<super::InstanceUsage>, DriverError> {
        let group = self.group(&instance.id);
        if !group.exists() {
            return Ok(None);
        }
        let u = group
            .usage()
            .map_err(|e| DriverError::failed("cannot read the instance's cgroup", e))?;
        Ok(Some(super::InstanceUsage {
            generation: u.generation,
            cpu_ns: u.cpu_ns,
            memory_bytes: u.memory_bytes,
            disk_read_bytes: u.disk_read_bytes,
            disk_write_bytes: u.disk_write_bytes,
            net_rx_bytes: None,
            net_tx_bytes: None,
        }))
    }

    async fn observe(&self, instance: &Instance) -> Result<Observed, DriverError> {
        let group = self.group(&instance.id);
        if !group.exists() {
            return Ok(Observed {
                gone: true,
                ..Default::default()
            });
        }
        let pids = group
            .pids()
            .map_err(|e| DriverError::failed("cannot read the instance's cgroup", e))?;
        let mut exit_code = None;
        if pids.is_empty() {
            // The group empties as the process exits, a moment before it is reaped:
            // wait briefly for the exit code of a child this agent started.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                let known = self
                    .exits
                    .lock()
                    .expect("exits poisoned")
                    .get(&instance.id)
                    .copied();
                match known {
                    Some(None) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => {
                        exit_code = other.flatten();
                        break;
                    }
                }
            }
        }
        Ok(Observed {
            gone: false,
            running: !pids.is_empty(),
            exit_code,
            applied: group
                .read_limits()
                .map_err(|e| DriverError::failed("cannot read the instance's limits", e))?,
            processes: Some(pids.len() as u32),
        })
    }

    async fn set_limits(&self, instance: &Instance, limits: &Limits) -> Result<(), DriverError> {
        self.group(&instance.id)
            .set_limits(limits)
            .map_err(|e| DriverError::failed("cannot set the instance's limits", e))
    }

    async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<String, DriverError> {
        let dir = self.volume_dir(id);
        let free = free_bytes(&self.volumes).map_err(|e| DriverError::failed("statvfs", e))?;
        if !dir.exists() && free < size_bytes {
            return Err(DriverError::Failed(format!(
                "not enough space for {size_bytes} bytes under {} ({free} free)",
                self.volumes.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| DriverError::failed(&dir.display().to_string(), e))?;
        Ok(dir.display().to_string())
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        match std::fs::remove_dir_all(self.volume_dir(&volume.id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DriverError::failed("cannot delete the volume", e)),
        }
    }

    async fn volume_usage(&self, volume: &Volume) -> Result<Option<u64>, DriverError> {
        let dir = self.volume_dir(&volume.id);
        tokio::task::spawn_blocking(move || dir_size(&dir))
            .await
            .map_err(|e| DriverError::failed("volume usage", e))?
            .map(Some)
            .map_err(|e| DriverError::failed("volume usage", e))
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        snapshot_id: &str,
    ) -> Result<(String, u64), DriverError> {
        let from = self.volume_dir(&volume.id);
        let to = self.volumes.join(".snapshots").join(snapshot_id);
        let size = volume.size_bytes;
        tokio::task::spawn_blocking(move || {
            let used = dir_size(&from)?;
            if used > size {
                return Err(std::io::Error::other(format!(
                    "the volume holds {used} bytes, more than its size of {size}"
                )));
            }
            copy_tree(&from, &to)?;
            Ok((to.display().to_string(), used))
        })
        .await
        .map_err(|e| DriverError::failed("snapshot", e))?
        .map_err(|e| DriverError::failed("snapshot", e))
    }
}
