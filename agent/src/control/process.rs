//! The `process` driver ("bare metal"): an instance is a process tree in its own
//! cgroup and its own sandbox, started without a shell, its output appended to log
//! files.
//!
//! The cgroup is the instance: it holds every process the tree forks, carries the CPU,
//! memory and process limits, says whether anything still runs, and is what stop
//! signals. The sandbox ([`super::sandbox`]) is what the instance sees and may do: its
//! own user (never root unless the provider allows it), no capabilities, its own mount,
//! PID, IPC and UTS namespaces, the host's system directories read-only, a private
//! `/tmp`, and its volumes mounted at their mount paths. Children are put in their own
//! session, so they outlive an agent restart and are re-adopted through their cgroup.
//!
//! Volumes are loop-mounted file-system images of their size ([`super::loopfs`]), so a
//! write past the size fails with ENOSPC inside the instance.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use surplus_protocol::control::*;

use super::cgroup::{Group, Hierarchy};
use super::loopfs::{self, ImageVolumes};
use super::sandbox::{self, SUPERVISORS, SystemPath, User};
use super::users::{UidRange, Users};
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
    /// Run instances as the agent's own user (root), with its capabilities, instead of
    /// a user of their own. Only for a provider's own, trusted workloads: off by
    /// default, and reported to the controller and by the compatibility kit.
    pub allow_host_user: bool,
    /// The first uid (and gid) instances get; each instance has one of its own.
    pub uid_first: u32,
    /// How many uids instances may use (at most that many instances at once).
    pub uid_count: u32,
    /// Host directories an instance sees, read-only (missing ones are skipped).
    pub system_paths: Vec<PathBuf>,
    /// Size of an instance's private `/tmp` (and `/var/tmp`, `/dev/shm`), bytes; its
    /// memory counts against the instance's memory limit.
    pub tmp_size_bytes: u64,
    /// Largest log of one stream of an instance, bytes: past it the log is moved to
    /// `<log>.1` (replacing the one before) and starts again, so an instance's output
    /// takes at most twice this per stream on the agent's disk.
    pub log_max_bytes: u64,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "surplus".into(),
            volume_root: PathBuf::new(),
            allow_host_user: false,
            uid_first: 600_000,
            uid_count: 65_536,
            system_paths: sandbox::DEFAULT_SYSTEM_PATHS
                .iter()
                .map(PathBuf::from)
                .collect(),
            tmp_size_bytes: 256 << 20,
            log_max_bytes: 16 << 20,
        }
    }
}

/// The process driver.
pub struct ProcessDriver {
    hierarchy: Hierarchy,
    parent: String,
    logs: PathBuf,
    volumes: ImageVolumes,
    /// Why volume sizes cannot be enforced on this host, if they cannot.
    volume_check: Result<(), String>,
    snapshots: PathBuf,
    roots: PathBuf,
    users: Users,
    allow_host_user: bool,
    system_paths: Vec<PathBuf>,
    hidden: Vec<PathBuf>,
    tmp_size_bytes: u64,
    default_pids: u32,
    /// Exit codes of children this agent process started: `None` until reaped.
    exits: Arc<Mutex<HashMap<String, Option<i32>>>>,
    /// Stops the log rotation when the driver goes.
    _rotation: tokio_util::sync::DropGuard,
}

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ProcessDriver {
    /// Opens the driver: needs root (the sandbox unshares namespaces, mounts and
    /// switches users), a writable cgroup hierarchy with the pids controller, and uid
    /// range that does not include 0.
    pub fn open(
        config: &ProcessConfig,
        data_dir: &Path,
        default_pids: u32,
    ) -> Result<Self, DriverError> {
        super::validate_name("cgroup_parent", &config.cgroup_parent)?;
        if !nix::unistd::geteuid().is_root() {
            return Err(DriverError::Failed(
                "the process driver's sandbox needs root (namespaces, mounts, a user per instance); run the agent as root"
                    .into(),
            ));
        }
        let hierarchy = Hierarchy::detect(&config.cgroup_root).map_err(DriverError::Failed)?;
        if !hierarchy.limits_pids() {
            return Err(DriverError::Failed(format!(
                "the cgroup {} hierarchy has no pids controller: per-instance process limits cannot be enforced",
                hierarchy.version()
            )));
        }
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
        let range = UidRange {
            first: config.uid_first,
            count: config.uid_count,
        };
        range.validate().map_err(DriverError::Failed)?;
        if let Some(p) = config.system_paths.iter().find(|p| !p.is_absolute()) {
            return Err(DriverError::Failed(format!(
                "system_paths: {} is not an absolute path",
                p.display()
            )));
        }
        // The sandbox is built after the child changed to "/": every path it uses is
        // absolute.
        std::fs::create_dir_all(data_dir)
            .map_err(|e| DriverError::failed(&data_dir.display().to_string(), e))?;
        let data_dir = &std::fs::canonicalize(data_dir)
            .map_err(|e| DriverError::failed(&data_dir.display().to_string(), e))?;
        let volume_root = if config.volume_root.as_os_str().is_empty() {
            data_dir.join("control").join("volumes")
        } else {
            std::path::absolute(&config.volume_root)
                .map_err(|e| DriverError::failed("volume_root", e))?
        };
        let control = data_dir.join("control");
        let logs = control.join("logs");
        let roots = control.join("roots");
        let snapshots = volume_root.join(".snapshots");
        for d in [&volume_root, &logs, &snapshots, &roots] {
            std::fs::create_dir_all(d)
                .map_err(|e| DriverError::failed(&d.display().to_string(), e))?;
        }
        let volumes = ImageVolumes::open(volume_root)?;
        let volume_root = volumes.root().to_owned();
        let users = Users::open(control.join("users.json"), range, Path::new("/etc"))
            .map_err(|e| DriverError::failed("the instance user table", e))?;
        let volume_check = loopfs::check_host();
        if let Err(why) = &volume_check {
            tracing::warn!(reason = %why, "volumes cannot be created on this host");
        }
        if config.allow_host_user {
            tracing::warn!("allow_host_user is on: instances run as the agent's own user");
        }
        let rotation = tokio_util::sync::CancellationToken::new();
        tokio::spawn(rotate_logs(
            logs.clone(),
            config.log_max_bytes.max(4096),
            rotation.clone(),
        ));
        tracing::info!(cgroup = hierarchy.version(), volumes = %volume_root.display(), "process driver ready");
        Ok(Self {
            hierarchy,
            parent: config.cgroup_parent.clone(),
            logs,
            volumes,
            volume_check,
            snapshots,
            roots,
            users,
            allow_host_user: config.allow_host_user,
            system_paths: config.system_paths.clone(),
            hidden: vec![data_dir.to_owned(), volume_root],
            tmp_size_bytes: config.tmp_size_bytes,
            default_pids,
            exits: Default::default(),
            _rotation: rotation.drop_guard(),
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

    /// The limits the host enforces for `limits`: the default process limit when none
    /// is asked for.
    fn effective(&self, limits: &Limits) -> Limits {
        Limits {
            pids: Some(limits.pids.unwrap_or(self.default_pids)),
            ..*limits
        }
    }

    async fn spawn(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<(), DriverError> {
        let Some((program, args)) = spec.command.split_first() else {
            return Err(
                Invalid::new("command", "the process driver needs an executable to run").into(),
            );
        };
        for (n, m) in mounts.iter().enumerate() {
            sandbox::check_mount_path(&m.attachment.mount_path)
                .map_err(|why| Invalid::new(format!("volumes[{n}].mount_path"), why))?;
        }
        let group = self.group(id);
        group
            .create()
            .map_err(|e| DriverError::failed("cannot create the instance's cgroup", e))?;
        group
            .set_limits(&self.effective(&spec.limits), SUPERVISORS)
            .map_err(|e| DriverError::failed("cannot set the instance's limits", e))?;
        let user = if self.allow_host_user {
            User::Host
        } else {
            let uid = self.users.allocate(id).map_err(DriverError::Failed)?;
            User::Own { uid, gid: uid }
        };
        // The volumes: mounted (after a host restart they may not be) and the instance's
        // own user's.
        let mut volumes = Vec::with_capacity(mounts.len());
        for m in mounts {
            let dir = self.volumes.dir(&m.attachment.volume_id);
            let store = self.volumes.clone();
            let vid = m.attachment.volume_id.clone();
            let d = dir.clone();
            tokio::task::spawn_blocking(move || -> Result<(), DriverError> {
                store.ensure_mounted(&vid)?;
                if let User::Own { uid, gid } = user {
                    loopfs::hand_over(&d, uid, gid)
                        .map_err(|e| DriverError::failed("cannot hand the volume over", e))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| DriverError::failed("volume", e))??;
            volumes.push((dir, m.attachment.mount_path.clone()));
        }
        let root = self.roots.join(id);
        std::fs::create_dir_all(&root)
            .map_err(|e| DriverError::failed(&root.display().to_string(), e))?;
        let layout = sandbox::Layout {
            root,
            system_paths: self
                .system_paths
                .iter()
                .filter_map(|p| SystemPath::probe(p))
                .collect(),
            hidden: self.hidden.clone(),
            volumes,
            tmp_size_bytes: self.tmp_size_bytes,
        };
        let ops = sandbox::plan(&layout);
        let (report_read, report_write) = sandbox::report_pipe()
            .map_err(|e| DriverError::failed("cannot make the sandbox's report pipe", e))?;
        let prepared = sandbox::Prepared::new(
            &ops,
            &group.procs_files(),
            id,
            user,
            report_write.as_raw_fd(),
        )
        .map_err(|e| DriverError::failed("cannot prepare the sandbox", e))?;
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
            .env("HOME", "/tmp")
            .envs(&spec.env)
            .env("SURPLUS_INSTANCE_ID", id)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(open(&out)?)
            .stderr(open(&err)?)
            .kill_on_drop(false);
        for (n, m) in mounts.iter().enumerate() {
            command
                .env(format!("SURPLUS_VOLUME_{n}"), &m.attachment.mount_path)
                .env(
                    format!("SURPLUS_VOLUME_{n}_MOUNT"),
                    &m.attachment.mount_path,
                );
        }
        // SAFETY: between fork and exec, `enter` makes only async-signal-safe system
        // calls on memory prepared before the fork (see `sandbox`).
        unsafe {
            command.pre_exec(move || sandbox::enter(&prepared));
        }
        let spawned = command.spawn();
        // Every copy of the write end is gone once the workload exec'd (or the sandbox
        // gave up): the report is complete.
        drop(report_write);
        let report = sandbox::read_report(report_read);
        let mut child = match (spawned, report) {
            (_, Some(report)) => return Err(DriverError::Failed(report.explain(&ops))),
            (Err(e), None) => {
                return Err(DriverError::failed(&format!("cannot start {program:?}"), e));
            }
            (Ok(child), None) => child,
        };
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

/// When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The last `max` bytes of a file (missing: none), and whether anything before them
/// was left out.
fn last_bytes(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let from = len.saturating_sub(max);
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::with_capacity((len - from) as usize);
    file.take(max).read_to_end(&mut bytes)?;
    Ok((bytes, from > 0))
}

/// The last `max` bytes of an instance's log, the rotated one (`<log>.1`) before it
/// when the current one is shorter, and whether anything before them was left out.
pub fn tail(path: &Path, max: u64) -> std::io::Result<(String, bool)> {
    let (mut bytes, mut truncated) = last_bytes(path, max)?;
    let short = max - bytes.len() as u64;
    if short > 0 {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        let (mut before, more) = last_bytes(Path::new(&rotated), short)?;
        if !before.is_empty() {
            before.append(&mut bytes);
            bytes = before;
            truncated = more;
        }
    }
    Ok((String::from_utf8_lossy(&bytes).into_owned(), truncated))
}

/// Keeps every instance log in `dir` under `max` bytes: a longer one is copied to
/// `<log>.1` and emptied (its writer appends, so it goes on from the start). Checks
/// every 5 s until `stop`.
async fn rotate_logs(dir: PathBuf, max: u64, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let dir = dir.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || rotate_once(&dir, max)).await {
            tracing::warn!(error = %e, "instance logs not rotated");
        }
    }
}

/// One round of [`rotate_logs`].
fn rotate_once(dir: &Path, max: u64) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) <= max {
            continue;
        }
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        std::fs::copy(&path, &old)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(0)?;
    }
    Ok(())
}

#[async_trait]
impl Driver for ProcessDriver {
    fn name(&self) -> String {
        "process".into()
    }

    fn isolation(&self) -> Isolation {
        let mut notes = Vec::new();
        if self.allow_host_user {
            notes.push(
                "allow_host_user is on: instances run as the agent's own user, with its capabilities"
                    .to_owned(),
            );
        }
        if let Err(why) = &self.volume_check {
            notes.push(format!("no volumes: {why}"));
        }
        notes.push(
            "instances share the host's network namespace: no network counters, ports are the host's"
                .to_owned(),
        );
        Isolation {
            driver: self.name(),
            host_user: self.allow_host_user,
            own_user: !self.allow_host_user,
            capabilities_dropped: !self.allow_host_user,
            user_namespaces: None,
            default_pids: Some(self.default_pids),
            volume_sizes_enforced: self.volume_check.is_ok(),
            syscall_filter: !self.allow_host_user,
            notes,
        }
    }

    async fn run(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<String, DriverError> {
        let group = self.group(id);
        if !group.pids().unwrap_or_default().is_empty() {
            // Already started by an earlier attempt of the same command.
            return Ok(group.path().display().to_string());
        }
        self.spawn(id, spec, mounts).await?;
        Ok(group.path().display().to_string())
    }

    async fn start(&self, instance: &Instance, mounts: &[Mount]) -> Result<(), DriverError> {
        if self
            .group(&instance.id)
            .pids()
            .unwrap_or_default()
            .is_empty()
        {
            self.spawn(&instance.id, &instance.spec, mounts).await?;
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
        for log in [out, err] {
            let mut rotated = log.as_os_str().to_owned();
            rotated.push(".1");
            let _ = std::fs::remove_file(&log);
            let _ = std::fs::remove_file(rotated);
        }
        let _ = std::fs::remove_dir(self.roots.join(&instance.id));
        self.users
            .release(&instance.id)
            .map_err(|e| DriverError::failed("cannot free the instance's user", e))?;
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
        // The run: when its oldest process (the sandbox's supervisor) started.
        let run = group
            .pids()
            .unwrap_or_default()
            .iter()
            .filter_map(|pid| start_time(*pid))
            .min();
        Ok(Some(super::InstanceUsage {
            generation: u.generation,
            cpu_ns: u.cpu_ns,
            memory_bytes: u.memory_bytes,
            disk_read_bytes: u.disk_read_bytes,
            disk_write_bytes: u.disk_write_bytes,
            net_rx_bytes: None,
            net_tx_bytes: None,
            run,
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
                .read_limits(SUPERVISORS)
                .map_err(|e| DriverError::failed("cannot read the instance's limits", e))?,
            // The sandbox's supervisor and init are not the client's processes.
            processes: Some((pids.len() as u32).saturating_sub(SUPERVISORS)),
        })
    }

    async fn set_limits(&self, instance: &Instance, limits: &Limits) -> Result<(), DriverError> {
        self.group(&instance.id)
            .set_limits(&self.effective(limits), SUPERVISORS)
            .map_err(|e| DriverError::failed("cannot set the instance's limits", e))
    }

    async fn logs(&self, instance: &Instance, max_bytes: u32) -> Result<InstanceLogs, DriverError> {
        let (out, err) = self.log_paths(&instance.id);
        let max = u64::from(max_bytes);
        let read = move || -> std::io::Result<InstanceLogs> {
            let (stdout, a) = tail(&out, max)?;
            let (stderr, b) = tail(&err, max)?;
            Ok(InstanceLogs {
                instance_id: String::new(),
                stdout,
                stderr,
                truncated: a || b,
            })
        };
        let mut logs = tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| DriverError::failed("logs", e))?
            .map_err(|e| DriverError::failed("cannot read the instance's logs", e))?;
        logs.instance_id = instance.id.clone();
        Ok(logs)
    }

    async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<String, DriverError> {
        if let Err(why) = &self.volume_check {
            return Err(DriverError::Failed(why.clone()));
        }
        let dir = self.volumes.create_volume(id, size_bytes).await?;
        Ok(dir.display().to_string())
    }

    async fn restore_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        self.volumes.restore(&volume.id).await
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        self.volumes.remove(&volume.id).await
    }

    async fn volume_usage(&self, volume: &Volume) -> Result<Option<u64>, DriverError> {
        self.volumes.used(&volume.id).await
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        snapshot_id: &str,
    ) -> Result<(String, u64), DriverError> {
        let to = self.snapshots.join(snapshot_id);
        let (store, id, size) = (self.volumes.clone(), volume.id.clone(), volume.size_bytes);
        tokio::task::spawn_blocking(move || {
            let copied = store.copy_out(&id, &to, size).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&to);
            })?;
            Ok((to.display().to_string(), copied))
        })
        .await
        .map_err(|e| DriverError::failed("snapshot", e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A writer that appends (as an instance's stdout does) goes on after a rotation;
    /// the end of the output reads across the rotated log and the current one.
    #[test]
    fn logs_rotate_past_their_size_and_read_across_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("i-1.stdout.log");
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        out.write_all(&[b'a'; 100]).unwrap();
        rotate_once(dir.path(), 64).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(
            std::fs::read(dir.path().join("i-1.stdout.log.1"))
                .unwrap()
                .len(),
            100
        );
        out.write_all(b"bbbb").unwrap();
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            4,
            "appends from the start"
        );
        let (text, truncated) = tail(&log, 10).unwrap();
        assert_eq!(text, "aaaaaabbbb");
        assert!(truncated);
        let (text, truncated) = tail(&log, 1000).unwrap();
        assert_eq!(text.len(), 104);
        assert!(!truncated);
        rotate_once(dir.path(), 64).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 4, "small logs stay");
    }
}
