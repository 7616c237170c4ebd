//! The agent's side of the primary control interface (capability A5).
//!
//! [`ControlPlane`] owns what the interface promises on every host: the book of
//! instances and volumes (kept on disk, so an agent restart re-adopts what runs), the
//! one state model ([`transition`]), validation of every client value, idempotency by
//! the ids the controller chose, filters and attribute reads. A [`Driver`] only
//! translates single native operations into the host's idiom: a cgroup and a process
//! tree ([`process`]), the Docker Engine ([`docker`]), or whatever a provider's mapping
//! file describes ([`mapped`]).

pub mod book;
pub mod cgroup;
pub mod docker;
pub mod loopfs;
pub mod mapped;
pub mod process;
pub mod sandbox;
pub mod users;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use surplus_protocol::clock::{Clock, UnixMillis};
use surplus_protocol::control::*;

use book::Book;

/// Which driver translates the control interface on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Control commands are refused as unsupported.
    None,
    /// Supervised processes in cgroups ("bare metal").
    #[default]
    Process,
    /// The Docker Engine over its Unix socket.
    Docker,
    /// A provider's own API, described by a mapping file.
    Mapped,
}

/// `[control]` in the agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// The driver.
    pub driver: DriverKind,
    /// How long StopInstances waits after SIGTERM (or the engine's stop) before killing.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    /// Largest volume a client may create, in bytes.
    pub max_volume_bytes: u64,
    /// The process limit (`pids.max`) of an instance that asks for none.
    pub default_pids: u32,
    /// How long terminated instances stay in the agent's records (and descriptions).
    #[serde(with = "humantime_serde")]
    pub terminated_retention: Duration,
    /// `[control.process]`.
    pub process: process::ProcessConfig,
    /// `[control.docker]`.
    pub docker: docker::DockerConfig,
    /// `[control.mapped]`.
    pub mapped: mapped::MappedConfig,
    /// Image the compatibility kit runs with container drivers.
    pub compat_image: String,
    /// Command the compatibility kit runs (it must keep running until stopped).
    pub compat_command: Vec<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            driver: DriverKind::Process,
            stop_grace: Duration::from_secs(10),
            max_volume_bytes: 1 << 40,
            default_pids: 512,
            terminated_retention: Duration::from_secs(3600),
            process: process::ProcessConfig::default(),
            docker: docker::DockerConfig::default(),
            mapped: mapped::MappedConfig::default(),
            compat_image: "surplus/busybox:latest".into(),
            compat_command: vec!["sleep".into(), "3600".into()],
        }
    }
}

/// Why a native operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The driver does not translate this operation.
    #[error("the {driver} driver does not support {operation}")]
    Unsupported {
        /// The driver.
        driver: String,
        /// The operation.
        operation: &'static str,
    },
    /// A value cannot be expressed on this host.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The host's interface failed.
    #[error("{0}")]
    Failed(String),
}

impl DriverError {
    /// A failure with context.
    pub fn failed(context: &str, e: impl std::fmt::Display) -> Self {
        DriverError::Failed(format!("{context}: {e}"))
    }
}

impl From<DriverError> for ControlFailure {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Unsupported { .. } => {
                ControlFailure::new(FailureKind::Unsupported, e.to_string())
            }
            DriverError::Invalid(i) => i.into(),
            DriverError::Failed(m) => ControlFailure::new(FailureKind::Driver, m),
        }
    }
}

/// What the host says about an instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The host has no trace of it (container removed, cgroup gone).
    pub gone: bool,
    /// Something runs.
    pub running: bool,
    /// How the last run ended, when known.
    pub exit_code: Option<i32>,
    /// Limits read back from the host.
    pub applied: Limits,
    /// Processes in it, when countable.
    pub processes: Option<u32>,
}

/// A volume attached at run time: the attachment and the volume's native handle.
#[derive(Debug, Clone)]
pub struct Mount {
    /// What the client asked for.
    pub attachment: VolumeAttachment,
    /// The driver's handle of the volume.
    pub native_id: String,
}

/// Native operations of one host idiom. Every method gets values that
/// [`ControlPlane`] has validated; none may hand them to a shell.
#[async_trait]
pub trait Driver: Send + Sync {
    /// `process`, `docker`, `mapped:<name>`.
    fn name(&self) -> String;
    /// How the driver isolates instances, as reported to the controller and by the
    /// compatibility kit.
    fn isolation(&self) -> Isolation {
        Isolation {
            driver: self.name(),
            notes: vec![format!(
                "the {} driver does not isolate instances itself: the provider's system does",
                self.name()
            )],
            ..Default::default()
        }
    }
    /// Creates and starts an instance; idempotent by `id`. Returns the native handle.
    async fn run(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<String, DriverError>;
    /// Starts a stopped instance.
    async fn start(&self, instance: &Instance, mounts: &[Mount]) -> Result<(), DriverError>;
    /// Stops: a polite signal, then force after `grace`.
    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError>;
    /// Restarts a running instance.
    async fn reboot(
        &self,
        instance: &Instance,
        mounts: &[Mount],
        grace: Duration,
    ) -> Result<(), DriverError> {
        self.stop(instance, grace).await?;
        self.start(instance, mounts).await
    }
    /// Stops and removes everything the host holds for it (idempotent).
    async fn terminate(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError>;
    /// Reads the host's view.
    async fn observe(&self, instance: &Instance) -> Result<Observed, DriverError>;
    /// Applies new limits to an existing instance.
    async fn set_limits(&self, instance: &Instance, limits: &Limits) -> Result<(), DriverError>;
    /// Creates a volume; idempotent by `id`. Returns the native handle.
    async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<String, DriverError>;
    /// Deletes a volume (idempotent).
    async fn delete_volume(&self, volume: &Volume) -> Result<(), DriverError>;
    /// Bytes a volume uses, when the driver can tell.
    async fn volume_usage(&self, _volume: &Volume) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }
    /// Copies a volume; returns where the copy is and its size.
    async fn snapshot(
        &self,
        volume: &Volume,
        snapshot_id: &str,
    ) -> Result<(String, u64), DriverError>;
    /// The host's counters for an instance, when the driver can read them.
    async fn usage(&self, _instance: &Instance) -> Result<Option<InstanceUsage>, DriverError> {
        Ok(None)
    }
    /// The end of an instance's output, at most `max_bytes` of each stream.
    async fn logs(
        &self,
        _instance: &Instance,
        _max_bytes: u32,
    ) -> Result<InstanceLogs, DriverError> {
        Err(DriverError::Unsupported {
            driver: self.name(),
            operation: "ReadLogs",
        })
    }
    /// Makes a volume usable again after the agent or the host restarted (mounts it).
    async fn restore_volume(&self, _volume: &Volume) -> Result<(), DriverError> {
        Ok(())
    }
}

/// An instance's counters as the host keeps them. Each is cumulative since the
/// counter's `generation` started (a new container, a new cgroup); `None` where the
/// driver cannot see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceUsage {
    /// Changes whenever the host's counters start again from zero.
    pub generation: u64,
    /// CPU time, ns.
    pub cpu_ns: Option<u64>,
    /// Memory in use now, bytes (a level, not a counter).
    pub memory_bytes: Option<u64>,
    /// Bytes read from block devices.
    pub disk_read_bytes: Option<u64>,
    /// Bytes written to block devices.
    pub disk_write_bytes: Option<u64>,
    /// Network bytes received.
    pub net_rx_bytes: Option<u64>,
    /// Network bytes sent.
    pub net_tx_bytes: Option<u64>,
    /// Identifies the current run (process start time, container start): the same
    /// value later means the instance kept running in between. `None` when stopped or
    /// when the driver cannot tell.
    pub run: Option<u64>,
}

/// A driver that refuses everything: the agent's configuration says `none`, or the
/// configured driver could not start (the reason is in every answer).
pub struct NoDriver {
    reason: String,
}

impl NoDriver {
    /// Refuses with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
    fn refuse<T>(&self) -> Result<T, DriverError> {
        Err(DriverError::Failed(format!(
            "control is unavailable on this agent: {}",
            self.reason
        )))
    }
}

#[async_trait]
impl Driver for NoDriver {
    fn name(&self) -> String {
        "none".into()
    }
    async fn run(&self, _: &str, _: &RunSpec, _: &[Mount]) -> Result<String, DriverError> {
        self.refuse()
    }
    async fn start(&self, _: &Instance, _: &[Mount]) -> Result<(), DriverError> {
        self.refuse()
    }
    async fn stop(&self, _: &Instance, _: Duration) -> Result<(), DriverError> {
        self.refuse()
    }
    async fn terminate(&self, _: &Instance, _: Duration) -> Result<(), DriverError> {
        self.refuse()
    }
    async fn observe(&self, _: &Instance) -> Result<Observed, DriverError> {
        self.refuse()
    }
    async fn set_limits(&self, _: &Instance, _: &Limits) -> Result<(), DriverError> {
        self.refuse()
    }
    async fn create_volume(&self, _: &str, _: u64) -> Result<String, DriverError> {
        self.refuse()
    }
    async fn delete_volume(&self, _: &Volume) -> Result<(), DriverError> {
        self.refuse()
    }
    async fn snapshot(&self, _: &Volume, _: &str) -> Result<(String, u64), DriverError> {
        self.refuse()
    }
}

/// Where a driver keeps snapshots: the configured directory, or
/// `<data_dir>/control/snapshots`; created if missing.
pub fn snapshot_dir(
    configured: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<PathBuf, DriverError> {
    let dir = if configured.as_os_str().is_empty() {
        data_dir.join("control").join("snapshots")
    } else {
        configured.to_owned()
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| DriverError::failed(&dir.display().to_string(), e))?;
    Ok(dir)
}

/// Builds the configured driver. `data_dir` holds logs, volumes and snapshots unless
/// the configuration says otherwise.
pub async fn open_driver(
    config: &ControlConfig,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn Driver>, DriverError> {
    Ok(match config.driver {
        DriverKind::None => Arc::new(NoDriver::new(
            "the agent's configuration sets driver = \"none\"",
        )),
        DriverKind::Process => Arc::new(process::ProcessDriver::open(
            &config.process,
            data_dir,
            config.default_pids,
        )?),
        DriverKind::Docker => Arc::new(
            docker::DockerDriver::open(&config.docker, data_dir, config.default_pids).await?,
        ),
        DriverKind::Mapped => Arc::new(mapped::MappedDriver::open(&config.mapped, data_dir)?),
    })
}

/// The control plane the agent's configuration asks for. A driver that cannot start
/// (no cgroups, no Docker engine, a bad mapping file) is logged and every command is
/// then answered with the reason, so the agent still reports and validates.
pub async fn start(
    config: &crate::AgentConfig,
    clock: Arc<dyn Clock>,
) -> std::io::Result<Arc<ControlPlane>> {
    let driver = match open_driver(&config.control, &config.data_dir).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(driver = ?config.control.driver, error = %e, "control driver unavailable");
            Arc::new(NoDriver::new(
                format!("{:?} driver: {e}", config.control.driver).to_lowercase(),
            ))
        }
    };
    ControlPlane::open(
        driver,
        config.data_dir.join("control"),
        clock,
        &config.control,
    )
    .await
}

/// What the compatibility kit runs with this configuration's driver.
pub fn compat_profile(config: &ControlConfig) -> crate::compat::CompatProfile {
    crate::compat::CompatProfile {
        image: match config.driver {
            DriverKind::Docker | DriverKind::Mapped => Some(config.compat_image.clone()),
            DriverKind::Process | DriverKind::None => None,
        },
        command: config.compat_command.clone(),
    }
}

fn not_found(what: &str, id: &str) -> ControlFailure {
    ControlFailure::new(
        FailureKind::NotFound,
        format!("{what} {id} not found on this agent"),
    )
}

/// The primary control interface on one agent.
pub struct ControlPlane {
    driver: Arc<dyn Driver>,
    book: Book,
    clock: Arc<dyn Clock>,
    grace: Duration,
    max_volume_bytes: u64,
    retention: Duration,
    /// One lock per instance or volume id: operations on one thing are serialised,
    /// operations on different things run side by side.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Counters read just before a stop or terminate, for the meter to pick up.
    usage_notes: std::sync::Mutex<Vec<(String, InstanceUsage, UnixMillis)>>,
}

impl ControlPlane {
    /// A control plane over `driver`, keeping its book in `dir`. Instances left in a
    /// transitional state by an earlier agent process are settled against the host.
    pub async fn open(
        driver: Arc<dyn Driver>,
        dir: PathBuf,
        clock: Arc<dyn Clock>,
        config: &ControlConfig,
    ) -> std::io::Result<Arc<Self>> {
        let book = Book::open(dir)?;
        let plane = Arc::new(Self {
            driver,
            book,
            clock,
            grace: config.stop_grace,
            max_volume_bytes: config.max_volume_bytes,
            retention: config.terminated_retention,
            locks: Default::default(),
            usage_notes: Default::default(),
        });
        plane.recover().await;
        Ok(plane)
    }

    /// The driver's name.
    pub fn driver_name(&self) -> String {
        self.driver.name()
    }

    /// How the driver isolates instances.
    pub fn isolation(&self) -> Isolation {
        self.driver.isolation()
    }

    /// Every instance in the book, terminated ones within the retention included.
    pub fn instances(&self) -> Vec<Instance> {
        self.book.instances()
    }

    /// The host's counters for `instance` (`None` when the driver cannot read them or
    /// the instance is not on the host).
    pub async fn usage(&self, instance: &Instance) -> Option<InstanceUsage> {
        match self.driver.usage(instance).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(instance = %instance.id, error = %e, "usage not readable");
                None
            }
        }
    }

    async fn note_usage(&self, instance: &Instance) {
        if let Some(u) = self.usage(instance).await {
            self.usage_notes
                .lock()
                .expect("usage notes poisoned")
                .push((instance.id.clone(), u, self.clock.now_ms()));
        }
    }

    /// Counters read around stops and terminations since the last call.
    pub fn take_usage_notes(&self) -> Vec<(String, InstanceUsage, UnixMillis)> {
        std::mem::take(&mut *self.usage_notes.lock().expect("usage notes poisoned"))
    }

    fn lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock table poisoned")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    /// Re-reads every instance an earlier agent process left: running ones are
    /// re-adopted, interrupted operations are settled.
    /// Forgets instances terminated longer ago than the retention, so that records
    /// and descriptions do not grow for ever. The controller keeps its own copy.
    fn prune(&self) {
        let now = self.clock.now_ms();
        let horizon = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        for i in self.book.instances() {
            if i.state == InstanceState::Terminated
                && now.saturating_sub(i.state_changed_at_ms) >= horizon
            {
                match self.book.remove_instance(&i.id) {
                    Ok(()) => {
                        self.locks
                            .lock()
                            .expect("lock table poisoned")
                            .remove(&i.id);
                    }
                    Err(e) => {
                        tracing::warn!(instance = %i.id, error = %e, "terminated record not removed")
                    }
                }
            }
        }
    }

    async fn recover(&self) {
        self.prune();
        for volume in self.book.volumes() {
            if volume.state != VolumeState::Deleted {
                if let Err(e) = self.driver.restore_volume(&volume).await {
                    tracing::warn!(volume = %volume.id, error = %e, "volume not usable after restart");
                }
            }
        }
        for instance in self.book.instances() {
            if instance.state == InstanceState::Terminated {
                continue;
            }
            let lock = self.lock(&instance.id);
            let _guard = lock.lock().await;
            let result = if instance.state == InstanceState::ShuttingDown {
                // A terminate was under way: finish it.
                match self.driver.terminate(&instance, self.grace).await {
                    Ok(()) => self.settle(instance, InstanceState::Terminated, None),
                    Err(e) => Err(e.into()),
                }
            } else {
                self.refresh(instance).await.map(|_| ())
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "could not settle an instance after restart");
            }
        }
    }

    fn settle(
        &self,
        mut instance: Instance,
        state: InstanceState,
        reason: Option<String>,
    ) -> Result<(), ControlFailure> {
        if instance.state != state || instance.state_reason != reason {
            instance.state = state;
            instance.state_reason = reason;
            instance.state_changed_at_ms = self.clock.now_ms();
            self.store(&instance)?;
        }
        Ok(())
    }

    fn store(&self, instance: &Instance) -> Result<(), ControlFailure> {
        self.book.put_instance(instance).map_err(|e| {
            ControlFailure::new(
                FailureKind::Driver,
                format!("cannot record the instance: {e}"),
            )
        })
    }

    fn store_volume(&self, volume: &Volume) -> Result<(), ControlFailure> {
        self.book.put_volume(volume).map_err(|e| {
            ControlFailure::new(
                FailureKind::Driver,
                format!("cannot record the volume: {e}"),
            )
        })
    }

    /// Brings a record in line with what the host reports.
    async fn refresh(&self, instance: Instance) -> Result<Instance, ControlFailure> {
        use InstanceState::*;
        if instance.state == Terminated {
            return Ok(instance);
        }
        if instance.native_id.is_none() {
            // RunInstances never reached the host.
            let reason = Some("the agent stopped before the instance was created".to_owned());
            self.settle(instance.clone(), Terminated, reason.clone())?;
            return Ok(Instance {
                state: Terminated,
                state_reason: reason,
                ..instance
            });
        }
        let seen = self.driver.observe(&instance).await?;
        let (state, reason) = match (instance.state, seen.gone, seen.running) {
            (_, true, _) => (
                Terminated,
                Some("the host no longer has this instance (removed outside Surplus)".to_owned()),
            ),
            (_, false, true) => (Running, None),
            (Running | Pending, false, false) => (
                Stopped,
                Some(match seen.exit_code {
                    Some(code) => format!("the instance exited on its own with code {code}"),
                    None => "the instance's processes ended".to_owned(),
                }),
            ),
            (Stopped, false, false) => (Stopped, instance.state_reason.clone()),
            (Stopping, false, false) => (Stopped, None),
            (ShuttingDown | Terminated, false, false) => {
                (instance.state, instance.state_reason.clone())
            }
        };
        if state != instance.state || reason != instance.state_reason {
            let mut updated = instance;
            updated.state = state;
            updated.state_reason = reason;
            updated.state_changed_at_ms = self.clock.now_ms();
            self.store(&updated)?;
            if state == Terminated {
                self.release_volumes(&updated.id)?;
            }
            return Ok(updated);
        }
        Ok(instance)
    }

    /// The record as the host now shows it, and `true`; or, while an operation on it
    /// is under way (a stop waiting out its grace period, a start), the record in its
    /// transitional state and `false`, rather than waiting for it.
    async fn current(&self, instance: Instance) -> Result<(Instance, bool), ControlFailure> {
        let lock = self.lock(&instance.id);
        let guard = lock.try_lock();
        // Re-read: an operation may have finished since the list was taken.
        let latest = self.book.instance(&instance.id).unwrap_or(instance);
        match guard {
            Ok(_guard) => Ok((self.refresh(latest).await?, true)),
            Err(_) => Ok((latest, false)),
        }
    }

    fn mounts(&self, spec: &RunSpec) -> Result<Vec<Mount>, ControlFailure> {
        spec.volumes
            .iter()
            .map(|a| {
                let volume = self
                    .book
                    .volume(&a.volume_id)
                    .filter(|v| v.state != VolumeState::Deleted)
                    .ok_or_else(|| not_found("volume", &a.volume_id))?;
                Ok(Mount {
                    attachment: a.clone(),
                    native_id: volume.native_id.unwrap_or_default(),
                })
            })
            .collect()
    }

    fn release_volumes(&self, instance_id: &str) -> Result<(), ControlFailure> {
        for mut v in self.book.volumes() {
            if v.attached_to.as_deref() == Some(instance_id) {
                v.attached_to = None;
                if v.state == VolumeState::InUse {
                    v.state = VolumeState::Available;
                }
                self.store_volume(&v)?;
            }
        }
        Ok(())
    }

    /// Serves one command.
    pub async fn handle(&self, command: Command) -> Result<ControlReply, ControlFailure> {
        match command {
            Command::RunInstances { instance_id, spec } => self
                .run(instance_id, spec)
                .await
                .map(|i| ControlReply::Instances(vec![i])),
            Command::Lifecycle { op, ids } => {
                let mut changes = Vec::with_capacity(ids.len());
                for id in &ids {
                    validate_id("ids", INSTANCE_PREFIX, id)?;
                }
                for id in ids {
                    changes.push(self.lifecycle(op, &id).await?);
                }
                Ok(ControlReply::StateChanges(changes))
            }
            Command::DescribeInstances(filters) => {
                self.prune();
                let mut out = Vec::new();
                for instance in self.book.instances() {
                    if !filters.ids.is_empty() && !filters.ids.contains(&instance.id) {
                        continue;
                    }
                    let (current, _) = self.current(instance).await?;
                    if filters.matches(&current) {
                        out.push(current);
                    }
                }
                out.sort_by_key(|i| (i.launched_at_ms, i.id.clone()));
                Ok(ControlReply::Instances(out))
            }
            Command::DescribeInstanceStatus { ids } => {
                let mut out = Vec::new();
                let instances = self.book.instances();
                for id in &ids {
                    if !instances.iter().any(|i| &i.id == id) {
                        return Err(not_found("instance", id));
                    }
                }
                for instance in instances {
                    if !ids.is_empty() && !ids.contains(&instance.id) {
                        continue;
                    }
                    let (instance, settled) = self.current(instance).await?;
                    let seen = if instance.state == InstanceState::Terminated || !settled {
                        Observed::default()
                    } else {
                        self.driver.observe(&instance).await?
                    };
                    out.push(InstanceStatus {
                        instance_id: instance.id,
                        state: instance.state,
                        state_reason: instance.state_reason,
                        exit_code: seen.exit_code,
                        applied: seen.applied,
                        processes: seen.processes,
                    });
                }
                Ok(ControlReply::Statuses(out))
            }
            Command::DescribeInstanceAttribute {
                instance_id,
                attribute,
            } => {
                let i = self
                    .book
                    .instance(&instance_id)
                    .ok_or_else(|| not_found("instance", &instance_id))?;
                let value = match attribute {
                    AttributeName::Limits => AttributeValue::Limits(i.spec.limits),
                    AttributeName::Labels => AttributeValue::Labels(i.spec.labels),
                    AttributeName::Command => AttributeValue::Command(i.spec.command),
                    AttributeName::Image => AttributeValue::Image(i.spec.image),
                    AttributeName::Ports => AttributeValue::Ports(i.spec.ports),
                    AttributeName::Volumes => AttributeValue::Volumes(i.spec.volumes),
                };
                Ok(ControlReply::Attribute { instance_id, value })
            }
            Command::ModifyInstanceAttribute {
                instance_id,
                limits,
                labels,
            } => self.modify(instance_id, limits, labels).await,
            Command::CreateVolume {
                volume_id,
                name,
                size_bytes,
            } => self.create_volume(volume_id, name, size_bytes).await,
            Command::DeleteVolume { volume_id } => self.delete_volume(&volume_id).await,
            Command::DescribeVolumes { ids } => {
                let mut out = Vec::new();
                for id in &ids {
                    if self.book.volume(id).is_none() {
                        return Err(not_found("volume", id));
                    }
                }
                for mut v in self.book.volumes() {
                    if !ids.is_empty() && !ids.contains(&v.id) {
                        continue;
                    }
                    if v.state != VolumeState::Deleted {
                        v.used_bytes = self.driver.volume_usage(&v).await?;
                    }
                    out.push(v);
                }
                out.sort_by_key(|v| (v.created_at_ms, v.id.clone()));
                Ok(ControlReply::Volumes(out))
            }
            Command::CreateSnapshot {
                volume_id,
                snapshot_id,
            } => {
                validate_id("snapshot_id", SNAPSHOT_PREFIX, &snapshot_id)?;
                let lock = self.lock(&volume_id);
                let _guard = lock.lock().await;
                let volume = self
                    .book
                    .volume(&volume_id)
                    .filter(|v| v.state != VolumeState::Deleted)
                    .ok_or_else(|| not_found("volume", &volume_id))?;
                let (location, size_bytes) = self.driver.snapshot(&volume, &snapshot_id).await?;
                Ok(ControlReply::Snapshot(Snapshot {
                    id: snapshot_id,
                    volume_id,
                    size_bytes,
                    location,
                    created_at_ms: self.clock.now_ms(),
                }))
            }
            Command::ReadLogs {
                instance_id,
                max_bytes,
            } => {
                validate_id("instance_id", INSTANCE_PREFIX, &instance_id)?;
                if max_bytes == 0 || max_bytes > MAX_LOG_BYTES {
                    return Err(
                        Invalid::new("max_bytes", format!("must be 1 to {MAX_LOG_BYTES}")).into(),
                    );
                }
                let instance = self
                    .book
                    .instance(&instance_id)
                    .ok_or_else(|| not_found("instance", &instance_id))?;
                if instance.state == InstanceState::Terminated {
                    return Err(ControlFailure::new(
                        FailureKind::Conflict,
                        format!("instance {instance_id} is terminated; its output is gone"),
                    ));
                }
                Ok(ControlReply::Logs(
                    self.driver.logs(&instance, max_bytes).await?,
                ))
            }
        }
    }

    async fn run(&self, id: String, spec: RunSpec) -> Result<Instance, ControlFailure> {
        validate_id("instance_id", INSTANCE_PREFIX, &id)?;
        spec.validate()?;
        let lock = self.lock(&id);
        let _guard = lock.lock().await;
        if let Some(existing) = self.book.instance(&id) {
            // A retry of a command that already reached this agent.
            return self.refresh(existing).await;
        }
        let mounts = self.mounts(&spec)?;
        for m in &mounts {
            let v = self
                .book
                .volume(&m.attachment.volume_id)
                .expect("checked by mounts()");
            if let Some(other) = v.attached_to.filter(|_| v.state == VolumeState::InUse) {
                return Err(ControlFailure::new(
                    FailureKind::Conflict,
                    format!("volume {} is attached to {other}", v.id),
                ));
            }
        }
        let now = self.clock.now_ms();
        let mut instance = Instance {
            id: id.clone(),
            spec,
            state: InstanceState::Pending,
            state_reason: None,
            driver: self.driver.name(),
            native_id: None,
            launched_at_ms: now,
            state_changed_at_ms: now,
        };
        self.store(&instance)?;
        for m in &mounts {
            let mut v = self.book.volume(&m.attachment.volume_id).expect("checked");
            v.state = VolumeState::InUse;
            v.attached_to = Some(id.clone());
            self.store_volume(&v)?;
        }
        match self.driver.run(&id, &instance.spec, &mounts).await {
            Ok(native) => {
                instance.native_id = Some(native);
                instance.state = InstanceState::Running;
            }
            Err(e) => {
                let failure: ControlFailure = e.into();
                tracing::warn!(instance = %id, error = %failure, "instance failed to start");
                // Remove whatever the host made of it; the record stays, terminated.
                let _ = self.driver.terminate(&instance, Duration::ZERO).await;
                instance.state = InstanceState::Terminated;
                instance.state_reason = Some(format!("failed to start: {failure}"));
                instance.state_changed_at_ms = self.clock.now_ms();
                self.store(&instance)?;
                self.release_volumes(&id)?;
                return Err(failure);
            }
        }
        instance.state_changed_at_ms = self.clock.now_ms();
        self.store(&instance)?;
        tracing::info!(instance = %id, driver = %instance.driver, "instance running");
        Ok(instance)
    }

    async fn lifecycle(&self, op: Lifecycle, id: &str) -> Result<StateChange, ControlFailure> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let instance = self
            .book
            .instance(id)
            .ok_or_else(|| not_found("instance", id))?;
        let instance = self.refresh(instance).await?;
        let previous = instance.state;
        let (via, to) = match transition(previous, op) {
            Transition::AlreadyThere => {
                return Ok(StateChange {
                    instance_id: id.to_owned(),
                    previous,
                    current: previous,
                });
            }
            Transition::Refused => {
                return Err(ControlFailure::new(
                    FailureKind::Conflict,
                    format!("instance {id} is {previous}; it cannot {}", op.as_str()),
                ));
            }
            Transition::Drive { via, to } => (via, to),
        };
        let mut working = instance.clone();
        working.state = via;
        working.state_reason = None;
        working.state_changed_at_ms = self.clock.now_ms();
        self.store(&working)?;
        let mounts = self.mounts(&instance.spec).unwrap_or_default();
        let done = match op {
            Lifecycle::Start => self.driver.start(&working, &mounts).await,
            Lifecycle::Stop => {
                self.note_usage(&working).await;
                let done = self.driver.stop(&working, self.grace).await;
                self.note_usage(&working).await;
                done
            }
            Lifecycle::Reboot => {
                self.note_usage(&working).await;
                self.driver.reboot(&working, &mounts, self.grace).await
            }
            Lifecycle::Terminate => {
                // The last counters: read while the instance runs (a container's vanish
                // when it stops) and once its processes are gone (a cgroup's are final
                // then), before the host forgets them.
                self.note_usage(&working).await;
                let _ = self.driver.stop(&working, self.grace).await;
                self.note_usage(&working).await;
                self.driver.terminate(&working, self.grace).await
            }
        };
        match done {
            Ok(()) => {
                self.settle(working.clone(), to, None)?;
                if to == InstanceState::Terminated {
                    self.release_volumes(id)?;
                }
                tracing::info!(instance = %id, op = op.as_str(), state = %to, "instance changed state");
                Ok(StateChange {
                    instance_id: id.to_owned(),
                    previous,
                    current: to,
                })
            }
            Err(e) => {
                let failure: ControlFailure = e.into();
                // Back to whatever the host now says, with the failure as the reason.
                let mut back = working;
                back.state = previous;
                self.store(&back)?;
                let settled = self.refresh(back).await.unwrap_or(instance);
                let reason = format!("{} failed: {failure}", op.as_str());
                let state = settled.state;
                self.settle(settled, state, Some(reason))?;
                Err(failure)
            }
        }
    }

    async fn modify(
        &self,
        id: String,
        limits: Option<Limits>,
        labels: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<ControlReply, ControlFailure> {
        if let Some(l) = &limits {
            l.validate("limits")?;
        }
        if let Some(labels) = &labels {
            for (k, v) in labels {
                validate_label(k, v)?;
            }
        }
        if limits.is_none() && labels.is_none() {
            return Err(Invalid::new("limits", "give limits, labels or both").into());
        }
        let lock = self.lock(&id);
        let _guard = lock.lock().await;
        let mut instance = self
            .book
            .instance(&id)
            .ok_or_else(|| not_found("instance", &id))?;
        if instance.state == InstanceState::Terminated {
            return Err(ControlFailure::new(
                FailureKind::Conflict,
                format!("instance {id} is terminated"),
            ));
        }
        if let Some(l) = limits {
            self.driver.set_limits(&instance, &l).await?;
            instance.spec.limits = l;
        }
        if let Some(l) = labels {
            instance.spec.labels = l;
        }
        self.store(&instance)?;
        let value = match limits {
            Some(l) => AttributeValue::Limits(l),
            None => AttributeValue::Labels(instance.spec.labels),
        };
        Ok(ControlReply::Attribute {
            instance_id: id,
            value,
        })
    }

    async fn create_volume(
        &self,
        id: String,
        name: Option<String>,
        size_bytes: u64,
    ) -> Result<ControlReply, ControlFailure> {
        validate_id("volume_id", VOLUME_PREFIX, &id)?;
        if let Some(n) = &name {
            validate_name("name", n)?;
        }
        if size_bytes == 0 || size_bytes > self.max_volume_bytes {
            return Err(Invalid::new(
                "size_bytes",
                format!("must be between 1 and {} bytes", self.max_volume_bytes),
            )
            .into());
        }
        let lock = self.lock(&id);
        let _guard = lock.lock().await;
        if let Some(existing) = self.book.volume(&id) {
            return Ok(ControlReply::Volumes(vec![existing]));
        }
        let native = self.driver.create_volume(&id, size_bytes).await?;
        let volume = Volume {
            id,
            name,
            size_bytes,
            used_bytes: Some(0),
            state: VolumeState::Available,
            attached_to: None,
            native_id: Some(native),
            created_at_ms: self.clock.now_ms(),
        };
        self.store_volume(&volume)?;
        Ok(ControlReply::Volumes(vec![volume]))
    }

    async fn delete_volume(&self, id: &str) -> Result<ControlReply, ControlFailure> {
        let lock = self.lock(id);
        let _guard = lock.lock().await;
        let mut volume = self
            .book
            .volume(id)
            .ok_or_else(|| not_found("volume", id))?;
        if volume.state == VolumeState::InUse {
            return Err(ControlFailure::new(
                FailureKind::Conflict,
                format!(
                    "volume {id} is attached to {}; terminate it first",
                    volume.attached_to.as_deref().unwrap_or("an instance")
                ),
            ));
        }
        if volume.state != VolumeState::Deleted {
            self.driver.delete_volume(&volume).await?;
            volume.state = VolumeState::Deleted;
            volume.used_bytes = None;
            self.store_volume(&volume)?;
        }
        Ok(ControlReply::Volumes(vec![volume]))
    }
}
