//! The `docker` driver: the Docker Engine API over its Unix socket, through bollard.
//!
//! An instance is the container `surplus-<id>` with the instance's labels plus
//! `surplus.instance`, its limits as `NanoCpus`, `Memory` (swap pinned to the same
//! figure) and `PidsLimit`, its ports as port bindings and its volumes as the Docker
//! volumes `surplus-<vol-id>`. A snapshot is a tar archive of the volume, read through a
//! stopped helper container that mounts it read-only.
//!
//! Containers are hardened beyond the engine's defaults: every capability is dropped
//! but the minimal set in `cap_add` (see [`DEFAULT_CAPABILITIES`]), `no-new-privileges`
//! is set, a pids limit always applies, never privileged mode, and no host path is
//! mounted but the instance's own volumes (so never the engine's socket). When the
//! engine remaps users (`userns-remap`) container root is an unprivileged host user;
//! when it does not, the isolation report says so.
//!
//! A volume is a loop-mounted file-system image of its size ([`super::loopfs`]) that
//! the Docker volume binds, so writes past the size fail with ENOSPC in the container.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerUpdateBody, HostConfig, PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use surplus_protocol::control::*;
use tokio::io::AsyncWriteExt;

use super::loopfs::{self, ImageVolumes};
use super::{Driver, DriverError, Mount, Observed};

/// The capabilities a container keeps (all others are dropped): what common images
/// need to start as root and then run as a user of their own (change owners and modes
/// of their files, switch user and group), bind ports below 1024, and signal their own
/// processes. Left out of the engine's default set: `MKNOD`, `NET_RAW` (raw sockets,
/// spoofing), `SETFCAP`, `SETPCAP`, `SYS_CHROOT`, `AUDIT_WRITE` and `FSETID`.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "NET_BIND_SERVICE",
    "KILL",
];

/// `[control.docker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine's Unix socket.
    pub socket: PathBuf,
    /// A local image holding `/bin/sh`-free busybox or anything else; used only to
    /// read volumes for snapshots (the container is never started).
    pub helper_image: String,
    /// Where snapshot archives go; empty means `<data_dir>/control/snapshots`.
    pub snapshot_dir: PathBuf,
    /// Where volume images are kept and mounted; empty means
    /// `<data_dir>/control/docker-volumes`.
    pub volume_root: PathBuf,
    /// The capabilities containers keep; every other one is dropped.
    pub cap_add: Vec<String>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            helper_image: "surplus/busybox:latest".into(),
            snapshot_dir: PathBuf::new(),
            volume_root: PathBuf::new(),
            cap_add: DEFAULT_CAPABILITIES.iter().map(|c| (*c).into()).collect(),
        }
    }
}

/// The Docker driver.
pub struct DockerDriver {
    docker: Docker,
    helper_image: String,
    snapshots: PathBuf,
    volumes: ImageVolumes,
    /// Why volume sizes cannot be enforced on this host, if they cannot.
    volume_check: Result<(), String>,
    cap_add: Vec<String>,
    default_pids: u32,
    /// The engine remaps container users to unprivileged host users.
    userns: bool,
    /// The engine applies its seccomp profile to containers.
    seccomp: bool,
}

/// The container name of an instance.
pub fn container_name(id: &str) -> String {
    format!("surplus-{id}")
}

/// The Docker volume name of a volume.
pub fn volume_name(id: &str) -> String {
    format!("surplus-{id}")
}

fn engine(context: &str, e: bollard::errors::Error) -> DriverError {
    DriverError::failed(&format!("docker engine: {context}"), e)
}

fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Limits in the engine's terms: `(NanoCpus, Memory, MemorySwap)`; zero lifts a limit.
pub fn engine_limits(limits: &Limits) -> (i64, i64, i64) {
    let nano = limits.millicpus.map_or(0, |m| i64::from(m) * 1_000_000);
    let memory = limits.memory_bytes.map_or(0, |b| b as i64);
    // Swap equal to memory: the limit is on memory, not memory plus swap.
    let swap = if memory > 0 { memory } else { -1 };
    (nano, memory, swap)
}

impl DockerDriver {
    /// Connects to the engine and checks it answers; learns whether it remaps users.
    pub async fn open(
        config: &DockerConfig,
        data_dir: &Path,
        default_pids: u32,
    ) -> Result<Self, DriverError> {
        for cap in &config.cap_add {
            if cap.is_empty() || !cap.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
                return Err(DriverError::Failed(format!(
                    "cap_add: {cap:?} is not a capability name such as CHOWN"
                )));
            }
        }
        let socket = config.socket.display().to_string();
        let docker = Docker::connect_with_unix(&socket, 60, bollard::API_DEFAULT_VERSION)
            .map_err(|e| engine(&format!("cannot use {socket}"), e))?
            .negotiate_version()
            .await
            .map_err(|e| engine(&format!("no engine answers on {socket}"), e))?;
        let info = docker
            .info()
            .await
            .map_err(|e| engine("system information", e))?;
        let options = info.security_options.unwrap_or_default();
        let has = |name: &str| {
            options
                .iter()
                .any(|o| o.split(',').any(|part| part == format!("name={name}")))
        };
        let (userns, seccomp) = (has("userns"), has("seccomp"));
        if !seccomp {
            tracing::warn!("the Docker engine applies no seccomp profile to containers");
        }
        if !userns {
            tracing::warn!(
                "the Docker engine does not remap users (userns-remap): container root is host root, with the capabilities in cap_add"
            );
        }
        let snapshots = super::snapshot_dir(&config.snapshot_dir, data_dir)?;
        let volume_root = if config.volume_root.as_os_str().is_empty() {
            data_dir.join("control").join("docker-volumes")
        } else {
            config.volume_root.clone()
        };
        let volume_check = loopfs::check_host();
        if let Err(why) = &volume_check {
            tracing::warn!(reason = %why, "volumes cannot be created on this host");
        }
        tracing::info!(socket = %socket, api = ?docker.client_version(), userns, "docker driver ready");
        Ok(Self {
            docker,
            helper_image: config.helper_image.clone(),
            snapshots,
            volumes: ImageVolumes::open(volume_root)?,
            volume_check,
            cap_add: config.cap_add.clone(),
            default_pids,
            userns,
            seccomp,
        })
    }

    fn pids_limit(&self, limits: &Limits) -> i64 {
        i64::from(limits.pids.unwrap_or(self.default_pids))
    }

    fn create_body(
        &self,
        id: &str,
        spec: &RunSpec,
        mounts: &[Mount],
    ) -> Result<ContainerCreateBody, DriverError> {
        let image = spec
            .image
            .clone()
            .ok_or_else(|| Invalid::new("image", "the docker driver needs an image"))?;
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert("surplus.instance".into(), id.into());
        let (nano_cpus, memory, memory_swap) = engine_limits(&spec.limits);
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for p in &spec.ports {
            bindings
                .entry(format!("{}/{}", p.instance_port, p.protocol.as_str()))
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: None,
                    host_port: Some(p.host_port.to_string()),
                });
        }
        Ok(ContainerCreateBody {
            image: Some(image),
            cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(labels),
            exposed_ports: Some(bindings.keys().cloned().collect()),
            host_config: Some(HostConfig {
                nano_cpus: Some(nano_cpus),
                memory: Some(memory),
                memory_swap: Some(memory_swap),
                pids_limit: Some(self.pids_limit(&spec.limits)),
                port_bindings: Some(bindings),
                // Only the instance's own volumes, by their Docker names: never a host
                // path, so never the engine's socket.
                binds: Some(
                    mounts
                        .iter()
                        .map(|m| {
                            format!(
                                "{}:{}",
                                volume_name(&m.attachment.volume_id),
                                m.attachment.mount_path
                            )
                        })
                        .collect(),
                ),
                privileged: Some(false),
                // The engine's own logs of the container, bounded like the process
                // driver's.
                log_config: Some(bollard::models::HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), "16m".to_owned()),
                        ("max-file".to_owned(), "2".to_owned()),
                    ])),
                }),
                cap_drop: Some(vec!["ALL".into()]),
                cap_add: Some(self.cap_add.clone()),
                security_opt: Some(vec!["no-new-privileges:true".into()]),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

#[async_trait]
impl Driver for DockerDriver {
    fn name(&self) -> String {
        "docker".into()
    }

    fn isolation(&self) -> Isolation {
        let mut notes = Vec::new();
        if !self.userns {
            notes.push(
                "the engine does not remap users (userns-remap): root in a container is root on the host, with only the capabilities kept".to_owned(),
            );
        }
        if let Err(why) = &self.volume_check {
            notes.push(format!("no volumes: {why}"));
        }
        notes.push(format!("capabilities kept: {}", self.cap_add.join(", ")));
        Isolation {
            driver: self.name(),
            host_user: false,
            own_user: self.userns,
            capabilities_dropped: true,
            user_namespaces: Some(self.userns),
            default_pids: Some(self.default_pids),
            volume_sizes_enforced: self.volume_check.is_ok(),
            syscall_filter: self.seccomp,
            notes,
        }
    }

    async fn run(&self, id: &str, spec: &RunSpec, mounts: &[Mount]) -> Result<String, DriverError> {
        let name = container_name(id);
        let body = self.create_body(id, spec, mounts)?;
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let native = match self.docker.create_container(Some(options), body).await {
            Ok(created) => created.id,
            // A retry: the container exists from the first attempt.
            Err(e) if status_of(&e) == Some(409) => self
                .docker
                .inspect_container(&name, None)
                .await
                .map_err(|e| engine("inspect", e))?
                .id
                .unwrap_or(name.clone()),
            Err(e) => return Err(engine("create container", e)),
        };
        match self.docker.start_container(&native, None).await {
            Ok(()) => Ok(native),
            Err(e) if status_of(&e) == Some(304) => Ok(native),
            Err(e) => Err(engine("start container", e)),
        }
    }

    async fn start(&self, instance: &Instance, _: &[Mount]) -> Result<(), DriverError> {
        match self
            .docker
            .start_container(&container_name(&instance.id), None)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(engine("start container", e)),
        }
    }

    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        let options = StopContainerOptionsBuilder::new()
            .t(grace.as_secs().try_into().unwrap_or(i32::MAX))
            .build();
        match self
            .docker
            .stop_container(&container_name(&instance.id), Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            Err(e) => Err(engine("stop container", e)),
        }
    }

    async fn reboot(
        &self,
        instance: &Instance,
        _: &[Mount],
        grace: Duration,
    ) -> Result<(), DriverError> {
        let options = bollard::query_parameters::RestartContainerOptionsBuilder::new()
            .t(grace.as_secs().try_into().unwrap_or(i32::MAX))
            .build();
        self.docker
            .restart_container(&container_name(&instance.id), Some(options))
            .await
            .map_err(|e| engine("restart container", e))
    }

    async fn terminate(&self, instance: &Instance, grace: Duration) -> Result<(), DriverError> {
        let name = container_name(&instance.id);
        if !grace.is_zero() {
            let _ = self.stop(instance, grace).await;
        }
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(&name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(engine("remove container", e)),
        }
    }

    async fn observe(&self, instance: &Instance) -> Result<Observed, DriverError> {
        let inspected = match self
            .docker
            .inspect_container(&container_name(&instance.id), None)
            .await
        {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => {
                return Ok(Observed {
                    gone: true,
                    ..Default::default()
                });
            }
            Err(e) => return Err(engine("inspect container", e)),
        };
        let state = inspected.state.unwrap_or_default();
        let host = inspected.host_config.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        Ok(Observed {
            gone: false,
            running,
            exit_code: state
                .exit_code
                .filter(|_| {
                    !running
                        && state
                            .finished_at
                            .as_deref()
                            .is_some_and(|f| !f.starts_with("0001"))
                })
                .map(|c| c as i32),
            applied: Limits {
                millicpus: host
                    .nano_cpus
                    .filter(|&n| n > 0)
                    .map(|n| (n / 1_000_000) as u32),
                memory_bytes: host.memory.filter(|&m| m > 0).map(|m| m as u64),
                pids: host
                    .pids_limit
                    .filter(|&p| p > 0)
                    .and_then(|p| u32::try_from(p).ok()),
            },
            processes: None,
        })
    }

    /// The engine's one-shot statistics of a running container: CPU, memory, block I/O
    /// and network. The engine's counters restart with each container start, so the
    /// generation is derived from the start time.
    async fn usage(
        &self,
        instance: &Instance,
    ) -> Result<Option<super::InstanceUsage>, DriverError> {
        let name = container_name(&instance.id);
        let inspected = match self.docker.inspect_container(&name, None).await {
            Ok(i) => i,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(engine("inspect container", e)),
        };
        let state = inspected.state.unwrap_or_default();
        if !state.running.unwrap_or(false) {
            return Ok(None);
        }
        let started = state.started_at.unwrap_or_default();
        let generation = u64::from_be_bytes(
            surplus_certs::sha256(started.as_bytes())[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let options = bollard::query_parameters::StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let Some(stats) = self.docker.stats(&name, Some(options)).next().await else {
            return Ok(None);
        };
        let stats = match stats {
            Ok(s) => s,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(engine("container stats", e)),
        };
        let blkio = stats
            .blkio_stats
            .and_then(|b| b.io_service_bytes_recursive)
            .unwrap_or_default();
        let sum_op = |op: &str| {
            blkio
                .iter()
                .filter(|e| e.op.as_deref().is_some_and(|o| o.eq_ignore_ascii_case(op)))
                .filter_map(|e| e.value)
                .sum::<u64>()
        };
        let networks = stats.networks.unwrap_or_default();
        Ok(Some(super::InstanceUsage {
            generation,
            cpu_ns: stats
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage),
            memory_bytes: stats.memory_stats.and_then(|m| m.usage),
            disk_read_bytes: Some(sum_op("read")),
            disk_write_bytes: Some(sum_op("write")),
            net_rx_bytes: Some(networks.values().filter_map(|n| n.rx_bytes).sum()),
            net_tx_bytes: Some(networks.values().filter_map(|n| n.tx_bytes).sum()),
            // A container's start time names its run.
            run: Some(generation),
        }))
    }

    async fn set_limits(&self, instance: &Instance, limits: &Limits) -> Result<(), DriverError> {
        let (nano, memory, swap) = engine_limits(limits);
        let body = ContainerUpdateBody {
            nano_cpus: Some(nano),
            memory: Some(memory),
            memory_swap: Some(swap),
            pids_limit: Some(self.pids_limit(limits)),
            ..Default::default()
        };
        self.docker
            .update_container(&container_name(&instance.id), body)
            .await
            .map_err(|e| engine("update container", e))
    }

    async fn create_volume(&self, id: &str, size_bytes: u64) -> Result<String, DriverError> {
        if let Err(why) = &self.volume_check {
            return Err(DriverError::Failed(why.clone()));
        }
        let dir = self.volumes.create_volume(id, size_bytes).await?;
        let name = volume_name(id);
        let labels = HashMap::from([
            ("surplus.volume".to_owned(), id.to_owned()),
            ("surplus.size_bytes".to_owned(), size_bytes.to_string()),
        ]);
        // The engine's local driver binds the mounted image: the volume has the size.
        let options = HashMap::from([
            ("type".to_owned(), "none".to_owned()),
            ("o".to_owned(), "bind".to_owned()),
            ("device".to_owned(), dir.display().to_string()),
        ]);
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                driver: Some("local".into()),
                driver_opts: Some(options),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map_err(|e| engine("create volume", e))?;
        Ok(name)
    }

    async fn restore_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        self.volumes.restore(&volume.id).await
    }

    async fn delete_volume(&self, volume: &Volume) -> Result<(), DriverError> {
        let options = RemoveVolumeOptionsBuilder::new().force(false).build();
        match self
            .docker
            .remove_volume(&volume_name(&volume.id), Some(options))
            .await
        {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(engine("remove volume", e)),
        }
        self.volumes.remove(&volume.id).await
    }

    async fn volume_usage(&self, volume: &Volume) -> Result<Option<u64>, DriverError> {
        self.volumes.used(&volume.id).await
    }

    async fn logs(&self, instance: &Instance, max_bytes: u32) -> Result<InstanceLogs, DriverError> {
        let options = bollard::query_parameters::LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("10000")
            .build();
        let mut stream = self
            .docker
            .logs(&container_name(&instance.id), Some(options));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(chunk) = stream.next().await {
            match chunk.map_err(|e| engine("container logs", e))? {
                bollard::container::LogOutput::StdOut { message } => {
                    out.extend_from_slice(&message)
                }
                bollard::container::LogOutput::StdErr { message } => {
                    err.extend_from_slice(&message)
                }
                _ => {}
            }
        }
        let max = max_bytes as usize;
        let cut = |b: &[u8]| -> (String, bool) {
            let from = b.len().saturating_sub(max);
            (String::from_utf8_lossy(&b[from..]).into_owned(), from > 0)
        };
        let (stdout, a) = cut(&out);
        let (stderr, b) = cut(&err);
        Ok(InstanceLogs {
            instance_id: instance.id.clone(),
            stdout,
            stderr,
            truncated: a || b,
        })
    }

    async fn snapshot(
        &self,
        volume: &Volume,
        snapshot_id: &str,
    ) -> Result<(String, u64), DriverError> {
        let helper = format!("surplus-snapshot-{snapshot_id}");
        let body = ContainerCreateBody {
            image: Some(self.helper_image.clone()),
            // Never started, but the engine wants a command for an image without one.
            cmd: Some(vec!["true".into()]),
            labels: Some(HashMap::from([(
                "surplus.snapshot".to_owned(),
                snapshot_id.to_owned(),
            )])),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:/volume:ro", volume_name(&volume.id))]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&helper).build();
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                engine(
                    &format!("create snapshot helper from {}", self.helper_image),
                    e,
                )
            })?;
        let path = self.snapshots.join(format!("{snapshot_id}.tar"));
        let copied = async {
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| DriverError::failed(&path.display().to_string(), e))?;
            let options = DownloadFromContainerOptionsBuilder::new()
                .path("/volume")
                .build();
            let mut stream = self.docker.download_from_container(&helper, Some(options));
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| engine("read volume archive", e))?;
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| DriverError::failed("write snapshot", e))?;
            }
            file.sync_all()
                .await
                .map_err(|e| DriverError::failed("write snapshot", e))?;
            Ok::<u64, DriverError>(size)
        }
        .await;
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        let _ = self.docker.remove_container(&helper, Some(options)).await;
        let size = copied.inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        Ok((path.display().to_string(), size))
    }
}
