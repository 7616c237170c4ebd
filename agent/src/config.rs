//! Agent configuration: a TOML file plus `SURPLUS_AGENT_*` environment overrides.
//!
//! Every field has a default, so an empty file (or none) is a valid configuration.
//! `deploy/agent.example.toml` documents each field and is loaded by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use surplus_runtime::LogFormat;

/// Everything the agent can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the agent keeps its key, certificate and identity.
    pub data_dir: PathBuf,
    /// Heartbeat period used until the controller states its own in the hello answer.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the inventory is collected again; it is re-sent only when it changed.
    #[serde(with = "humantime_serde")]
    pub inventory_interval: Duration,
    /// How often package counts and pending updates are re-read (they cost a process
    /// start of the package manager).
    #[serde(with = "humantime_serde")]
    pub package_scan_interval: Duration,
    /// First reconnect delay after a lost session.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Largest reconnect delay; delays double up to it, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// How long one request may wait for its answer.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A session with no traffic for this long is considered lost.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Keep-alive period of the QUIC connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame_size: usize,
    /// Where the storage benchmark puts its scratch file (deleted after each run).
    pub bench_scratch_dir: PathBuf,
    /// The root directory the security checks of a validation run read: `/` on a host
    /// (the default); the host's root mounted elsewhere when the agent runs in a
    /// container (`/host`), or a prepared tree in tests. Kernel and process checks
    /// look at the running system only when this is `/`.
    pub security_root: PathBuf,
    /// Controller addresses (`host:port`) overriding those received at enrollment.
    pub controller_addresses: Vec<String>,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// Serve the agent's own Prometheus metrics at `http://<this>/metrics`
    /// (`127.0.0.1:9108`). Off when absent (the default); only a loopback address is
    /// accepted.
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter in `tracing` syntax (`info`, `surplus_agent=debug`, ...).
    pub log_filter: String,
    /// `[control]`: the driver that translates control commands on this host.
    pub control: crate::control::ControlConfig,
    /// `[metering]`: sampling periods, the usage spool, counted applications.
    pub metering: crate::meter::MeteringConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/surplus-agent"),
            heartbeat_interval: Duration::from_secs(10),
            inventory_interval: Duration::from_secs(60),
            package_scan_interval: Duration::from_secs(6 * 3600),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_frame_size: surplus_protocol::DEFAULT_MAX_FRAME,
            bench_scratch_dir: PathBuf::from("/var/tmp"),
            security_root: PathBuf::from("/"),
            controller_addresses: Vec::new(),
            log_format: LogFormat::Human,
            metrics_listen: None,
            log_filter: "info".into(),
            control: crate::control::ControlConfig::default(),
            metering: crate::meter::MeteringConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Loads defaults, then `file` if given, then `SURPLUS_AGENT_*` variables
    /// (`SURPLUS_AGENT_HEARTBEAT_INTERVAL=5s`).
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        Self::load_with_env(file, None)
    }

    /// As [`AgentConfig::load`], reading variables from `env` instead of the process
    /// environment when given (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("SURPLUS_AGENT")
                .prefix_separator("_")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("controller_addresses")
                .source(env),
        );
        let config: Self = builder.build()?.try_deserialize()?;
        config.check().map_err(config::ConfigError::Message)?;
        Ok(config)
    }

    /// What the types cannot say: the metrics endpoint is for the host itself, so it
    /// listens on loopback only (a scraper elsewhere reaches it through its own agent,
    /// tunnel or proxy, not through an open port on a provider's host).
    pub fn check(&self) -> Result<(), String> {
        if let Some(addr) = self.metrics_listen {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "metrics_listen = \"{addr}\": the metrics endpoint listens on loopback only \
                     (127.0.0.1 or [::1]); remove metrics_listen to turn it off"
                ));
            }
        }
        Ok(())
    }
}
