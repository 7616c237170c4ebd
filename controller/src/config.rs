//! Controller configuration: `controller.toml` in the data directory (written
//! commented by `surplus-controller init`) plus `SURPLUS_CONTROLLER_*` overrides.
//! Every field has a default; `deploy/controller.example.toml` is loaded by a test.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use surplus_runtime::LogFormat;

/// Everything the controller can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerConfig {
    /// Where the controller keeps its state: `postgres://user:password@host/db`, or
    /// `sqlite://PATH` (a relative path is inside the data directory); empty (the
    /// default) is the embedded `sqlite://<data_dir>/controller.db`.
    pub database_url: String,
    /// UDP address of the mutually authenticated agent sessions.
    pub session_listen: SocketAddr,
    /// UDP address of the enrollment endpoint (join token for certificate).
    pub enroll_listen: SocketAddr,
    /// UDP address of peer links with other controllers (federation, issue 18).
    pub peer_listen: SocketAddr,
    /// TCP address of the HTTP API; loopback by default.
    pub http_listen: SocketAddr,
    /// How long a client may take to send a request's line and headers, from when the
    /// connection opens or its previous response was sent; past it the connection is
    /// closed (a half-sent request does not hold a connection).
    #[serde(with = "humantime_serde")]
    pub http_header_read_timeout: Duration,
    /// How long a client may take to send a request's whole body once its headers
    /// arrived; past it the API answers 408 and closes the connection.
    #[serde(with = "humantime_serde")]
    pub http_body_read_timeout: Duration,
    /// Most HTTP connections served at once; more wait in the listen backlog until one
    /// ends. Keep it below the process's open-file limit.
    pub http_max_connections: usize,
    /// Largest request body in bytes (413 beyond).
    pub http_max_body_bytes: usize,
    /// Longest request target (path and query) in bytes (414 beyond).
    pub http_max_uri_bytes: usize,
    /// Most bytes of request headers, counting each as name, value and 4 separator
    /// bytes (431 beyond; so are more than 100 headers).
    pub http_max_header_bytes: usize,
    /// Names (DNS names or IP addresses) in the controller's server certificate; the
    /// first is the TLS server name agents verify.
    pub server_names: Vec<String>,
    /// Session addresses agents are told to use (`host:port`); empty: derived from
    /// `session_listen` and the first server name.
    pub advertise_session: Vec<String>,
    /// Enrollment addresses written into join tokens; empty: derived likewise.
    pub advertise_enroll: Vec<String>,
    /// Peer-link addresses given to controllers that peer with this one; empty:
    /// derived likewise.
    pub advertise_peer: Vec<String>,
    /// How long after a minute ends a host cloud waits for its agents' usage of it
    /// before sending that minute to its brokers (usage arriving later is not sent).
    #[serde(with = "humantime_serde")]
    pub peer_usage_lag: Duration,
    /// Lifetime of agent certificates.
    #[serde(with = "humantime_serde")]
    pub agent_cert_lifetime: Duration,
    /// How far agent certificates are back-dated to tolerate clock skew.
    #[serde(with = "humantime_serde")]
    pub cert_backdate: Duration,
    /// Default lifetime of join tokens.
    #[serde(with = "humantime_serde")]
    pub join_token_ttl: Duration,
    /// How long a console sign-in lasts.
    #[serde(with = "humantime_serde")]
    pub console_session_ttl: Duration,
    /// Heartbeat period agents are told to keep.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats after which an agent is `unreachable`.
    pub missed_heartbeats: u32,
    /// How often revocations made by other processes are picked up from storage.
    #[serde(with = "humantime_serde")]
    pub revocation_poll: Duration,
    /// A silent session is dropped after this long.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// QUIC keep-alive period; zero (the default) sends none: the agents' heartbeats
    /// and keep-alives keep each session and its NAT binding alive.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long one exchange may take before its stream is reset.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a control command may take on the agent (a stop waits for the
    /// instance's grace period) before the API answers 504.
    #[serde(with = "humantime_serde")]
    pub control_timeout: Duration,
    /// How long terminated instances are listed by DescribeInstances without ids
    /// (they stay stored, and are described when asked for by id).
    #[serde(with = "humantime_serde")]
    pub terminated_retention: Duration,
    /// The marketplace's commission on every charge, in basis points (1000 = 10%).
    pub commission_bps: u32,
    /// How long after a period ends a billing run waits for the hosts' usage of it;
    /// past it the period is billed with what arrived, and usage that comes later is
    /// billed by a later run as an adjustment.
    #[serde(with = "humantime_serde")]
    pub billing_grace: Duration,
    /// How far back a billing run looks for late usage of periods billed before.
    #[serde(with = "humantime_serde")]
    pub adjustment_window: Duration,
    /// What a prepaid client must keep beyond an instance's upfront fee to run it, in
    /// minor units of the host's currency.
    pub prepaid_minimum: i64,
    /// The resell pipeline: how hosts are validated and judged.
    pub resell: ResellConfig,
    /// The market's timers and prices (`[market]`).
    pub market: MarketConfig,
    /// Webhooks may be on loopback, private and link-local addresses (off: only public
    /// ones, so that an account cannot make the controller call its own network).
    pub webhook_allow_private: bool,
    /// Largest frame accepted or sent, bytes.
    pub max_frame_size: usize,
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// Log filter in `tracing` syntax.
    pub log_filter: String,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            database_url: String::new(),
            session_listen: "0.0.0.0:7070".parse().expect("literal"),
            enroll_listen: "0.0.0.0:7071".parse().expect("literal"),
            peer_listen: "0.0.0.0:7072".parse().expect("literal"),
            http_listen: "127.0.0.1:7080".parse().expect("literal"),
            http_header_read_timeout: Duration::from_secs(10),
            http_body_read_timeout: Duration::from_secs(30),
            http_max_connections: 512,
            http_max_body_bytes: 2 << 20,
            http_max_uri_bytes: 8 << 10,
            http_max_header_bytes: 16 << 10,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            advertise_session: Vec::new(),
            advertise_enroll: Vec::new(),
            advertise_peer: Vec::new(),
            peer_usage_lag: Duration::from_secs(90),
            agent_cert_lifetime: Duration::from_secs(24 * 3600),
            cert_backdate: Duration::from_secs(300),
            join_token_ttl: Duration::from_secs(30 * 60),
            console_session_ttl: Duration::from_secs(12 * 3600),
            heartbeat_interval: Duration::from_secs(10),
            missed_heartbeats: 3,
            revocation_poll: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::ZERO,
            request_timeout: Duration::from_secs(10),
            control_timeout: Duration::from_secs(60),
            terminated_retention: Duration::from_secs(3600),
            commission_bps: 1000,
            billing_grace: Duration::from_secs(30 * 60),
            adjustment_window: Duration::from_secs(30 * 86_400),
            prepaid_minimum: 0,
            resell: ResellConfig::default(),
            market: MarketConfig::default(),
            webhook_allow_private: false,
            max_frame_size: surplus_protocol::DEFAULT_MAX_FRAME,
            log_format: LogFormat::Human,
            log_filter: "info".into(),
        }
    }
}

/// How the resell pipeline validates and judges a provider's hosts (`[resell]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResellConfig {
    /// The validation run ordered on every host of a request (benchmarks and security
    /// checks; `bench` and `security` must both be on).
    pub validation: surplus_api::validation::ValidationOptions,
    /// How long a request's validation may take in all; hosts not judged by then fail.
    #[serde(with = "humantime_serde")]
    pub validation_timeout: Duration,
    /// The least hardening index (0 to 100) a host must reach.
    pub min_hardening: u8,
    /// How far below a claim a measurement may fall and still conform.
    pub tolerances: surplus_market::acceptance::Tolerances,
    /// Time between a listing's scheduled re-tests.
    #[serde(with = "humantime_serde")]
    pub retest_interval: Duration,
    /// The acceptance rules whose failure at a re-test delists (`spec`, `category`,
    /// `hardening`, `critical_findings`, `compatibility`, `validation`); any other
    /// failure keeps the listing, ranked lower (but a host that cannot be judged at
    /// the re-test after a failed one always delists).
    pub delist_on: Vec<String>,
    /// How far back the ratings shown on listings go.
    #[serde(with = "humantime_serde")]
    pub rating_window: Duration,
}

impl ResellConfig {
    /// The re-test policy of the market crate.
    pub fn retest_policy(&self) -> surplus_market::quality::RetestPolicy {
        surplus_market::quality::RetestPolicy {
            interval_ms: self.retest_interval.as_millis() as i64,
            delist_on: self.delist_on.iter().cloned().collect(),
        }
    }
}

impl Default for ResellConfig {
    fn default() -> Self {
        Self {
            validation: surplus_api::validation::ValidationOptions::default(),
            validation_timeout: Duration::from_secs(30 * 60),
            min_hardening: 40,
            tolerances: surplus_market::acceptance::Tolerances::default(),
            retest_interval: Duration::from_secs(24 * 3600),
            delist_on: surplus_market::quality::RetestPolicy::default()
                .delist_on
                .into_iter()
                .collect(),
            rating_window: Duration::from_secs(90 * 86_400),
        }
    }
}

/// The market's timers and prices (`[market]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MarketConfig {
    /// How often reservation terms that ended are recorded and the instances of
    /// reservations that ended are stopped.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How long an immediate quote holds.
    #[serde(with = "humantime_serde")]
    pub quote_validity: Duration,
    /// How far back the guidance beside a bid form looks.
    #[serde(with = "humantime_serde")]
    pub guidance_window: Duration,
    /// The grace of an interruption's notice: the holder keeps the host (and pays
    /// for it) this long after the notice, then its instances are stopped.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How long before a term ends its holder is told.
    #[serde(with = "humantime_serde")]
    pub expiry_lead: Duration,
    /// How often each listing's spot market clears (it also clears on demand).
    #[serde(with = "humantime_serde")]
    pub spot_period: Duration,
    /// The marketplace operator's own provider account, if it sells capacity too: when
    /// more of its listed hosts than `utilisation_threshold` are reserved, searches
    /// show idle third-party capacity first.
    pub primary_provider: Option<String>,
    /// The share of the primary provider's hosts held (0 to 1) above which idle
    /// third-party capacity ranks first.
    pub utilisation_threshold: f64,
}

impl Default for MarketConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            quote_validity: Duration::from_millis(
                surplus_market::quote::DEFAULT_VALIDITY_MS as u64,
            ),
            guidance_window: Duration::from_secs(7 * 86_400),
            grace: Duration::from_millis(surplus_market::interrupt::DEFAULT_GRACE_MS as u64),
            expiry_lead: Duration::from_millis(
                surplus_market::interrupt::DEFAULT_EXPIRY_LEAD_MS as u64,
            ),
            spot_period: Duration::from_millis(surplus_market::spot::DEFAULT_PERIOD_MS as u64),
            primary_provider: None,
            utilisation_threshold: surplus_market::interrupt::DEFAULT_UTILISATION_THRESHOLD,
        }
    }
}

fn advertised(explicit: &[String], listen: SocketAddr, names: &[String]) -> Vec<String> {
    if !explicit.is_empty() {
        return explicit.to_vec();
    }
    let host = if listen.ip().is_unspecified() {
        names.first().cloned().unwrap_or_else(|| "localhost".into())
    } else {
        listen.ip().to_string()
    };
    vec![format!("{host}:{}", listen.port())]
}

impl ControllerConfig {
    /// Loads defaults, then `file` when it exists, then `SURPLUS_CONTROLLER_*` variables.
    pub fn load(file: &Path) -> Result<Self, config::ConfigError> {
        Self::load_with_env(file, None)
    }

    /// As [`ControllerConfig::load`], reading variables from `env` instead of the
    /// process environment when given (tests).
    pub fn load_with_env(
        file: &Path,
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, config::ConfigError> {
        config::Config::builder()
            .add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(false),
            )
            .add_source(
                config::Environment::with_prefix("SURPLUS_CONTROLLER")
                    .prefix_separator("_")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("server_names")
                    .with_list_parse_key("advertise_session")
                    .with_list_parse_key("advertise_enroll")
                    .with_list_parse_key("advertise_peer")
                    .source(env),
            )
            .build()?
            .try_deserialize()
    }

    /// Session addresses given to agents at enrollment.
    pub fn session_addresses(&self) -> Vec<String> {
        advertised(
            &self.advertise_session,
            self.session_listen,
            &self.server_names,
        )
    }

    /// Enrollment addresses written into join tokens.
    pub fn enroll_addresses(&self) -> Vec<String> {
        advertised(
            &self.advertise_enroll,
            self.enroll_listen,
            &self.server_names,
        )
    }

    /// Peer-link addresses given to controllers that peer with this one.
    pub fn peer_addresses(&self) -> Vec<String> {
        advertised(&self.advertise_peer, self.peer_listen, &self.server_names)
    }

    /// Refuses settings the controller cannot run with, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("http_max_connections", self.http_max_connections),
            ("http_max_body_bytes", self.http_max_body_bytes),
            ("http_max_uri_bytes", self.http_max_uri_bytes),
            ("http_max_header_bytes", self.http_max_header_bytes),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("{field} must be more than zero"));
            }
        }
        if self.http_max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(format!(
                "http_max_connections must be at most {}",
                tokio::sync::Semaphore::MAX_PERMITS
            ));
        }
        for (field, value) in [
            ("http_header_read_timeout", self.http_header_read_timeout),
            ("http_body_read_timeout", self.http_body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(format!("{field} must be more than zero"));
            }
        }
        let v = &self.resell.validation;
        if !(v.bench && v.security) {
            return Err(
                "resell.validation must run both bench and security: hosts are judged by both"
                    .into(),
            );
        }
        crate::validation::request(v, uuid::Uuid::nil())
            .map_err(|e| format!("resell.validation: {e}"))?;
        if self.resell.validation_timeout.is_zero() {
            return Err("resell.validation_timeout must be more than zero".into());
        }
        const RULES: [&str; 6] = [
            "spec",
            "category",
            "hardening",
            "critical_findings",
            "compatibility",
            "validation",
        ];
        if let Some(r) = self
            .resell
            .delist_on
            .iter()
            .find(|r| !RULES.contains(&r.as_str()))
        {
            return Err(format!(
                "resell.delist_on: {r:?} is not a rule ({})",
                RULES.join(", ")
            ));
        }
        if self.resell.retest_interval.is_zero() {
            return Err("resell.retest_interval must be more than zero".into());
        }
        if self.resell.min_hardening > 100 {
            return Err("resell.min_hardening must be at most 100".into());
        }
        for (name, d) in [
            ("market.tick", self.market.tick),
            ("market.quote_validity", self.market.quote_validity),
            ("market.guidance_window", self.market.guidance_window),
            ("market.grace", self.market.grace),
            ("market.expiry_lead", self.market.expiry_lead),
            ("market.spot_period", self.market.spot_period),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be more than zero"));
            }
        }
        if !(0.0..=1.0).contains(&self.market.utilisation_threshold) {
            return Err("market.utilisation_threshold must be from 0 to 1".into());
        }
        Ok(())
    }

    /// The TLS name agents verify.
    pub fn server_name(&self) -> String {
        self.server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section of `deploy/controller.example.toml`, uncommented and loaded.
    fn example_section(name: &str) -> (ControllerConfig, String) {
        let example = crate::datadir::DEFAULT_CONFIG;
        let start = example
            .find(&format!("# [{name}]"))
            .unwrap_or_else(|| panic!("a [{name}] section"));
        let section: String = example[start..]
            .lines()
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &section).unwrap();
        let loaded = ControllerConfig::load_with_env(file.path(), Some(Default::default()))
            .unwrap_or_else(|e| panic!("{section}: {e}"));
        assert_eq!(loaded.validate(), Ok(()));
        (loaded, section)
    }

    /// The `[resell]` section of the example, uncommented, is the defaults it says it
    /// is.
    #[test]
    fn the_example_resell_section_states_the_defaults() {
        let (loaded, section) = example_section("resell");
        assert_eq!(loaded.resell, ResellConfig::default(), "{section}");
    }

    /// So is the `[market]` section, but for its example of a primary provider.
    #[test]
    fn the_example_market_section_states_the_defaults() {
        let (loaded, section) = example_section("market");
        let expected = MarketConfig {
            primary_provider: Some("acme".into()),
            ..MarketConfig::default()
        };
        assert_eq!(loaded.market, expected, "{section}");
    }
}
