//! The agent's session with the controller, and the loop that keeps one open.
//!
//! A session is one mutually authenticated QUIC connection. It starts with the hello
//! exchange, then sends the inventory, then heartbeats; the inventory is re-sent when
//! it changes or when the controller asks for it; the certificate is renewed about two
//! thirds into its life. The controller opens streams too (ping, validation runs,
//! control commands), each served on its own task. When a session ends the runner
//! reconnects with exponential backoff and jitter, except when the controller says
//! this agent is revoked.

use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use surplus_certs::{agent_csr, cert_info_pem, new_agent_key};
use surplus_protocol::clock::Clock;
use surplus_protocol::messages::*;
use surplus_protocol::quic::{self, ExchangeError, codes};
use surplus_protocol::{Inventory, PROTOCOL_VERSION};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::control::ControlPlane;
use crate::identity::{Identity, IdentityError};
use crate::inventory::{self, InventoryCollector};
use crate::meter::MeterHandle;
use crate::metrics::{self, AgentMetrics, RunOutcome};
use crate::net::{self, ConnectError};
use crate::validation::Validations;
use surplus_protocol::usage::{MeteringAck, UsageBatch};

/// Why a session could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection could not be established.
    #[error("cannot connect to the controller at {addresses}: {source}")]
    Connect {
        /// The addresses tried.
        addresses: String,
        /// The failure.
        source: ConnectError,
    },
    /// The controller refuses this agent's certificate as revoked.
    #[error("this agent has been revoked by the controller; enroll again with a new join token")]
    Revoked,
    /// Controller and agent speak different protocol versions.
    #[error("protocol version mismatch: {0}")]
    VersionMismatch(String),
    /// The controller refused a request.
    #[error("controller refused {what}: {reply}")]
    Refused {
        /// Which request.
        what: &'static str,
        /// The refusal.
        reply: ErrorReply,
    },
    /// The control plane's book could not be opened.
    #[error("cannot open the control records: {0}")]
    Control(std::io::Error),
    /// The usage spool could not be opened.
    #[error("cannot start metering: {0}")]
    Metering(std::io::Error),
    /// The metrics endpoint (`metrics_listen`) could not start.
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why not.
        source: std::io::Error,
    },
    /// The controller answered with the wrong message.
    #[error("unexpected answer to {what}: {got}")]
    Unexpected {
        /// Which request.
        what: &'static str,
        /// What came back.
        got: &'static str,
    },
    /// An exchange failed.
    #[error(transparent)]
    Exchange(#[from] ExchangeError),
    /// The connection closed.
    #[error("session lost: {0}")]
    Lost(ConnectionError),
    /// The identity could not be used or stored.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A certificate operation failed.
    #[error(transparent)]
    Cert(#[from] surplus_certs::CertError),
}

/// Whether a connection error means the controller refuses us as revoked.
pub fn is_revocation(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::ApplicationClosed(close) => close.error_code == codes::CLOSE_REVOKED,
        ConnectionError::ConnectionClosed(close) => {
            u64::from(close.error_code) == codes::TLS_CERTIFICATE_REVOKED
        }
        ConnectionError::TransportError(e) => u64::from(e.code) == codes::TLS_CERTIFICATE_REVOKED,
        _ => false,
    }
}

impl SessionError {
    fn from_exchange(e: ExchangeError) -> Self {
        let conn_err = match &e {
            ExchangeError::Connection(c) => Some(c.clone()),
            _ => None,
        };
        match conn_err {
            Some(c) if is_revocation(&c) => SessionError::Revoked,
            Some(ConnectionError::ApplicationClosed(close))
                if close.error_code == codes::CLOSE_VERSION_MISMATCH =>
            {
                SessionError::VersionMismatch(String::from_utf8_lossy(&close.reason).into_owned())
            }
            Some(c) => SessionError::Lost(c),
            None => SessionError::Exchange(e),
        }
    }

    /// Whether retrying cannot help.
    pub fn is_final(&self) -> bool {
        matches!(self, SessionError::Revoked | SessionError::Identity(_))
    }
}

/// An open, greeted session.
pub struct Session {
    endpoint: Endpoint,
    connection: Connection,
    ack: HelloAck,
    max_frame: usize,
    timeout: Duration,
}

impl Session {
    /// Connects with `identity` and exchanges hellos.
    pub async fn open(config: &AgentConfig, identity: &Identity) -> Result<Self, SessionError> {
        Self::open_with(None, config, identity, None).await
    }

    /// Like [`Session::open`], on `endpoint` when one is given (the load generator's
    /// simulated agents share a few sockets).
    pub async fn open_on(
        endpoint: Option<&Endpoint>,
        config: &AgentConfig,
        identity: &Identity,
    ) -> Result<Self, SessionError> {
        Self::open_with(endpoint, config, identity, None).await
    }

    /// Like [`Session::open_on`], announcing how the host isolates instances.
    pub async fn open_with(
        endpoint: Option<&Endpoint>,
        config: &AgentConfig,
        identity: &Identity,
        isolation: Option<surplus_protocol::control::Isolation>,
    ) -> Result<Self, SessionError> {
        let tls = surplus_certs::session_client_config(
            &identity.ca_pem,
            &identity.certificate.cert_pem,
            &identity.key_pem,
        )?;
        let addresses = if config.controller_addresses.is_empty() {
            &identity.controller_addresses
        } else {
            &config.controller_addresses
        };
        let (endpoint, connection) =
            net::connect_on(endpoint, tls, addresses, &identity.server_name, config)
                .await
                .map_err(|source| match source.connection_error() {
                    Some(e) if is_revocation(e) => SessionError::Revoked,
                    _ => SessionError::Connect {
                        addresses: addresses.join(", "),
                        source,
                    },
                })?;
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            boot_epoch: sysinfo::System::boot_time().unwrap_or(0),
            isolation,
        });
        let answer = quic::request(
            &connection,
            &hello,
            config.max_frame_size,
            config.request_timeout,
        )
        .await
        .map_err(SessionError::from_exchange)?;
        let ack = match answer {
            Message::HelloAck(ack) => ack,
            Message::Error(reply) if reply.code == ErrorCode::VersionMismatch => {
                return Err(SessionError::VersionMismatch(reply.message));
            }
            Message::Error(reply) => {
                return Err(SessionError::Refused {
                    what: "hello",
                    reply,
                });
            }
            other => {
                return Err(SessionError::Unexpected {
                    what: "hello",
                    got: other.kind(),
                });
            }
        };
        Ok(Self {
            endpoint,
            connection,
            ack,
            max_frame: config.max_frame_size,
            timeout: config.request_timeout,
        })
    }

    /// The controller's hello answer.
    pub fn hello_ack(&self) -> &HelloAck {
        &self.ack
    }

    /// The underlying connection (tests use it to send raw frames).
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// One request/response exchange.
    pub async fn request(&self, message: &Message) -> Result<Message, SessionError> {
        quic::request(&self.connection, message, self.max_frame, self.timeout)
            .await
            .map_err(SessionError::from_exchange)
    }

    /// Sends the inventory; returns whether the controller recorded a change.
    pub async fn send_inventory(&self, inventory: Inventory) -> Result<bool, SessionError> {
        match self
            .request(&Message::InventoryReport(Box::new(inventory)))
            .await?
        {
            Message::InventoryAck(ack) => Ok(ack.changed),
            Message::Error(reply) => Err(SessionError::Refused {
                what: "inventory",
                reply,
            }),
            other => Err(SessionError::Unexpected {
                what: "inventory",
                got: other.kind(),
            }),
        }
    }

    /// Asks for a fresh certificate for a freshly generated key and stores it.
    pub async fn renew(
        &self,
        identity: &mut Identity,
        data_dir: &std::path::Path,
        now_ms: surplus_protocol::clock::UnixMillis,
    ) -> Result<(), SessionError> {
        let (key, key_pem) = new_agent_key()?;
        let csr_pem = agent_csr(&key, &identity.agent_id.to_string())?;
        let issued = match self
            .request(&Message::RenewRequest(RenewRequest { csr_pem }))
            .await?
        {
            Message::Renewed(issued) => issued,
            Message::Error(reply) => {
                return Err(SessionError::Refused {
                    what: "renewal",
                    reply,
                });
            }
            other => {
                return Err(SessionError::Unexpected {
                    what: "renewal",
                    got: other.kind(),
                });
            }
        };
        let info = cert_info_pem(&issued.cert_pem)?;
        if info.agent_id != Some(identity.agent_id) || info.public_key != key.public_key_raw() {
            return Err(SessionError::Unexpected {
                what: "renewal",
                got: "a certificate for another agent or key",
            });
        }
        identity.key_pem = key_pem;
        identity.certificate = issued;
        identity.received_at_ms = now_ms;
        identity.save(data_dir)?;
        Ok(())
    }

    /// Sends the compatibility kit's results.
    pub async fn report_compat(
        &self,
        report: surplus_protocol::control::CompatReport,
    ) -> Result<CompatAck, SessionError> {
        match self.request(&Message::CompatReport(report)).await? {
            Message::CompatAck(ack) => Ok(ack),
            Message::Error(reply) => Err(SessionError::Refused {
                what: "compat report",
                reply,
            }),
            other => Err(SessionError::Unexpected {
                what: "compat report",
                got: other.kind(),
            }),
        }
    }

    /// Closes the session politely.
    pub async fn close(self, reason: &str) {
        self.connection
            .close(codes::CLOSE_NORMAL, reason.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// What the streams the controller opens in one session are answered with.
#[derive(Clone)]
struct Serving {
    validations: Arc<Validations>,
    control: Arc<ControlPlane>,
    meter: Arc<MeterHandle>,
    metrics: Arc<AgentMetrics>,
    conn: Connection,
    max_frame: usize,
    /// Where the notices the controller sends about this host are recorded.
    notices: std::path::PathBuf,
    /// This host's clock, and how far the controller's is ahead of it (measured at
    /// hello): an interruption's deadline is the controller's instant.
    clock: Arc<dyn Clock>,
    controller_ahead_ms: i64,
    /// Ends the agent's timers with the agent (as a process's end would).
    cancel: CancellationToken,
}

/// The file under the data directory where the marketplace's notices about this host
/// are recorded, one JSON object per line, newest last.
pub const NOTICES_FILE: &str = "notices.jsonl";

/// Records a notice about this host (the file restarts past 1 MiB).
fn record_notice(path: &std::path::Path, n: &HostNotice) -> std::io::Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 1 << 20) {
        std::fs::remove_file(path)?;
    }
    let body: serde_json::Value = serde_json::from_str(&n.body_json)
        .unwrap_or(serde_json::Value::String(n.body_json.clone()));
    let line = serde_json::json!({
        "key": n.key,
        "kind": n.kind,
        "body": body,
        "created_at_ms": n.created_at_ms,
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    f.sync_data()
}

/// Forgets the session a local request would go over, however the session ends.
struct ClearOnDrop(crate::local::Current);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        if let Ok(mut c) = self.0.lock() {
            *c = None;
        }
    }
}

/// Schedules again the stops of the interruptions recorded in `path` whose deadline
/// is at most an hour past (an agent restarted during a grace still stops the
/// instances at the deadline; older ones were stopped, or terminated, long ago).
/// The controller's lead is not known before a session: none is assumed.
async fn rearm_interruptions(
    control: &Arc<ControlPlane>,
    path: &std::path::Path,
    clock: &dyn Clock,
    cancel: &CancellationToken,
) {
    let Ok(text) = tokio::fs::read_to_string(path).await else {
        return;
    };
    let now = clock.now_ms();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["kind"] != "reservation.interrupting" {
            continue;
        }
        let deadline = v["body"]["deadline_ms"].as_i64().unwrap_or(i64::MIN);
        if deadline < now.saturating_sub(3_600_000) {
            continue;
        }
        let n = HostNotice {
            key: v["key"].as_str().unwrap_or_default().to_owned(),
            kind: "reservation.interrupting".into(),
            body_json: v["body"].to_string(),
            created_at_ms: v["created_at_ms"].as_i64().unwrap_or_default(),
        };
        tracing::info!(key = %n.key, deadline_ms = deadline, "an interruption noticed before this start: its deadline still holds");
        stop_at_deadline(control, &n, clock, 0, cancel);
    }
}

/// Schedules the stop of the instances an interruption's notice names, at its
/// deadline (by this host's clock). A notice delivered twice stops them twice, which
/// changes nothing; a notice that names no instance or no deadline schedules nothing.
fn stop_at_deadline(
    control: &Arc<ControlPlane>,
    n: &HostNotice,
    clock: &dyn Clock,
    controller_ahead_ms: i64,
    cancel: &CancellationToken,
) {
    #[derive(serde::Deserialize)]
    struct Interrupting {
        deadline_ms: i64,
        #[serde(default)]
        instances: Vec<String>,
    }
    let Ok(notice) = serde_json::from_str::<Interrupting>(&n.body_json) else {
        tracing::warn!(key = %n.key, "an interruption's notice without a deadline");
        return;
    };
    if notice.instances.is_empty() {
        return;
    }
    // The deadline on this host's clock: never sooner for a host clock that runs
    // ahead of the controller's.
    let wait_ms = notice
        .deadline_ms
        .saturating_sub(controller_ahead_ms)
        .saturating_sub(clock.now_ms())
        .max(0);
    let control = control.clone();
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            // The agent stops: the notice, recorded, is scheduled again at its start.
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
        }
        tracing::info!(instances = ?notice.instances, "an interruption's grace is over: stopping its instances");
        // One at a time: an instance already gone does not keep the others running.
        for id in notice.instances {
            let command = surplus_protocol::control::Command::Lifecycle {
                op: surplus_protocol::control::Lifecycle::Stop,
                ids: vec![id.clone()],
            };
            if let Err(e) = control.handle(command).await {
                tracing::warn!(instance = %id, error = %e, "stopping an instance of an interruption");
            }
        }
    });
}

/// Answers one stream the controller opened: the one place controller requests are
/// matched. There is no request that runs an arbitrary command.
async fn serve_controller_stream(mut send: SendStream, mut recv: RecvStream, serving: Serving) {
    let Serving {
        validations,
        control,
        meter,
        metrics,
        conn,
        max_frame,
        notices,
        clock,
        controller_ahead_ms,
        cancel,
    } = serving;
    let request = match quic::read_frame(&mut recv, max_frame).await {
        Ok(envelope) => envelope.message,
        Err(e) => {
            tracing::warn!(error = %e, "refusing a bad frame from the controller");
            quic::refuse_stream(&mut send, &mut recv, &e);
            return;
        }
    };
    let answer = match request {
        Message::Ping(ping) => Message::Pong(Pong { nonce: ping.nonce }),
        Message::RunValidation(run) => {
            let run_id = run.run_id;
            tracing::info!(%run_id, bench = run.bench.is_some(), security = run.security, "validation run ordered");
            let outcome = match validations.run(run, &mut send, conn).await {
                Ok(cancelled) => {
                    tracing::info!(%run_id, cancelled, "validation run reported");
                    if cancelled {
                        RunOutcome::Cancelled
                    } else {
                        RunOutcome::Completed
                    }
                }
                Err(e) => {
                    tracing::warn!(%run_id, error = %e, "validation run not delivered");
                    RunOutcome::Undelivered
                }
            };
            metrics.validation(outcome);
            return;
        }
        Message::CancelValidation(c) => Message::CancelAck(CancelAck {
            run_id: c.run_id,
            was_running: validations.cancel(c.run_id),
        }),
        Message::Control(command) => {
            let action = command.action();
            let started = std::time::Instant::now();
            let outcome = control.handle(command).await;
            metrics.control(
                action,
                metrics::control_outcome(&outcome),
                started.elapsed(),
            );
            if let Err(e) = &outcome {
                tracing::info!(action, error = %e, "control command refused");
            }
            Message::ControlResult(outcome)
        }
        Message::SetMetering(periods) => match meter.set_periods(periods) {
            Ok(effective_from_ms) => Message::MeteringAck(MeteringAck {
                periods: meter.periods(),
                effective_from_ms,
            }),
            Err(e) => Message::error(
                ErrorCode::Unexpected,
                format!("metering periods refused: {e}"),
            ),
        },
        Message::HostNotice(n) => {
            if n.kind.starts_with("listing.delisted")
                || n.kind.ends_with("rejected")
                || n.kind.ends_with("advisory")
            {
                tracing::warn!(kind = %n.kind, key = %n.key, details = %n.body_json, "the marketplace says about this host");
            } else {
                tracing::info!(kind = %n.kind, key = %n.key, details = %n.body_json, "the marketplace says about this host");
            }
            // An interruption's deadline is kept here, on the host: its instances stop
            // then even if the controller cannot reach this agent at that moment.
            if n.kind == "reservation.interrupting" {
                stop_at_deadline(&control, &n, clock.as_ref(), controller_ahead_ms, &cancel);
            }
            // An append with fsync: off the runtime's threads.
            let key = n.key.clone();
            match tokio::task::spawn_blocking(move || record_notice(&notices, &n)).await {
                Ok(Ok(())) => Message::HostNoticeAck(HostNoticeAck { key }),
                Ok(Err(e)) => {
                    Message::error(ErrorCode::Internal, format!("notice not recorded: {e}"))
                }
                Err(e) => Message::error(ErrorCode::Internal, format!("notice not recorded: {e}")),
            }
        }
        other => Message::error(
            ErrorCode::Unexpected,
            format!("agent does not serve {}", other.kind()),
        ),
    };
    if let Err(e) = quic::write_frame(&mut send, &answer, max_frame).await {
        tracing::debug!(error = %e, "answer to the controller not delivered");
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends the spool's records in order, in batches, for as long as the session lasts;
/// each batch leaves the spool only once the controller acknowledged its commit.
async fn send_usage(
    conn: Connection,
    meter: Arc<MeterHandle>,
    metrics: Arc<AgentMetrics>,
    max_frame: usize,
    timeout: Duration,
) {
    let mut failures = 0u32;
    loop {
        let spool = meter.spool.clone();
        let max = meter.batch_records;
        let pending = tokio::task::spawn_blocking(move || {
            let s = spool.lock().expect("spool poisoned");
            s.pending(max).map(|records| (records, s.state()))
        })
        .await;
        let (records, state) = match pending {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "usage spool unreadable");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(_) => return,
        };
        let Some(last) = records.last().map(|r| r.seq) else {
            // Nothing waiting: sleep until the meter spools more (or a while passes,
            // in case a wake-up was missed).
            let _ = tokio::time::timeout(Duration::from_secs(5), meter.spooled.notified()).await;
            continue;
        };
        let count = records.len();
        let batch = Message::UsageBatch(UsageBatch {
            records,
            spool: state,
        });
        metrics.usage_sent(count);
        match quic::request(&conn, &batch, max_frame, timeout).await {
            Ok(Message::UsageAck(ack)) => {
                failures = 0;
                metrics.usage_result("committed", count);
                tracing::debug!(
                    records = count,
                    stored = ack.stored,
                    duplicates = ack.duplicates,
                    rejected = ack.rejected,
                    "usage batch committed"
                );
                let spool = meter.spool.clone();
                let acked = tokio::task::spawn_blocking(move || {
                    spool.lock().expect("spool poisoned").ack(last)
                })
                .await;
                if let Ok(Err(e)) = acked {
                    tracing::error!(error = %e, "usage acknowledgement not recorded; the batch will be sent again");
                }
            }
            Ok(Message::Error(reply)) if reply.code == ErrorCode::Busy => {
                // The controller sheds load; the records wait in the spool.
                failures += 1;
                metrics.usage_result("busy", count);
                tracing::debug!("controller busy; usage batch sent again after a pause");
            }
            Ok(other) => {
                failures += 1;
                metrics.usage_result("refused", count);
                tracing::warn!(answer = other.kind(), "usage batch not committed; retrying");
            }
            Err(ExchangeError::Connection(_)) => {
                metrics.usage_result("undelivered", count);
                return;
            }
            Err(e) => {
                failures += 1;
                metrics.usage_result("undelivered", count);
                tracing::warn!(error = %e, "usage batch not delivered; retrying");
            }
        }
        if failures > 0 {
            let wait = Duration::from_millis(200 * u64::from(failures.min(25)));
            tokio::time::sleep(wait).await;
        }
    }
}

struct StopRuns(Arc<Validations>);

impl Drop for StopRuns {
    fn drop(&mut self) {
        self.0.cancel_all();
    }
}

/// Keeps a session open until cancelled or revoked.
pub struct Runner {
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    identity: Identity,
    /// `None` while a collection runs.
    collector: Option<InventoryCollector>,
    /// Made from the configuration when the runner starts, unless given.
    control: Option<Arc<ControlPlane>>,
    /// Its own metrics, counted whether or not they are served.
    metrics: Arc<AgentMetrics>,
}

impl Runner {
    /// A runner for the identity enrolled in `config.data_dir`.
    pub fn new(config: AgentConfig, clock: Arc<dyn Clock>) -> Result<Self, IdentityError> {
        let identity = Identity::load(&config.data_dir)?;
        let collector = Some(InventoryCollector::new(config.package_scan_interval));
        let metrics = Arc::new(AgentMetrics::default());
        metrics.certificate(identity.certificate.not_after_ms, false);
        Ok(Self {
            config,
            clock,
            identity,
            collector,
            control: None,
            metrics,
        })
    }

    /// The runner's metrics (served at `metrics_listen` while it runs, when set).
    pub fn metrics(&self) -> Arc<AgentMetrics> {
        self.metrics.clone()
    }

    /// Uses `control` instead of building one from the configuration.
    pub fn with_control(mut self, control: Arc<ControlPlane>) -> Self {
        self.control = Some(control);
        self
    }

    /// The id of the agent this runner runs.
    pub fn agent_id(&self) -> uuid::Uuid {
        self.identity.agent_id
    }

    /// Runs sessions until `cancel` fires (`Ok`) or retrying cannot help (`Err`).
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), SessionError> {
        // Bound before anything else starts, so a wrong address stops the agent at once.
        let _metrics_server = match self.config.metrics_listen {
            Some(addr) => {
                let refused = |source| SessionError::Metrics { addr, source };
                self.config.check().map_err(|m| {
                    refused(std::io::Error::new(std::io::ErrorKind::InvalidInput, m))
                })?;
                let listener = metrics::bind(&self.metrics, addr).await.map_err(refused)?;
                let stop = cancel.child_token();
                tokio::spawn(metrics::serve(listener, self.metrics.clone(), stop.clone()));
                // However `run` ends, the endpoint stops with it.
                Some(stop.drop_guard())
            }
            None => None,
        };
        let control = match self.control.take() {
            Some(c) => c,
            None => crate::control::start(&self.config, self.clock.clone())
                .await
                .map_err(SessionError::Control)?,
        };
        let meter = crate::meter::start(
            &self.config.data_dir,
            &self.config.metering,
            self.clock.clone(),
            control.clone(),
            cancel.child_token(),
        )
        .map_err(SessionError::Metering)?;
        self.metrics.watch_spool(meter.spool.clone());
        // Deadlines of interruptions noticed before a restart still hold.
        rearm_interruptions(
            &control,
            &self.config.data_dir.join(NOTICES_FILE),
            self.clock.as_ref(),
            &cancel,
        )
        .await;
        // The local socket: requests of commands on this host, over the session.
        let current = crate::local::Current::default();
        let socket = self.config.data_dir.join(crate::local::SOCKET_FILE);
        match crate::local::bind(&socket) {
            Ok(listener) => {
                tokio::spawn(crate::local::serve(
                    listener,
                    current.clone(),
                    self.config.max_frame_size,
                    self.config.request_timeout,
                    cancel.child_token(),
                ));
            }
            Err(e) => {
                tracing::warn!(path = %socket.display(), error = %e, "no local socket: `surplus-agent reclaim` cannot reach this agent");
            }
        }
        let mut attempt = 0u32;
        loop {
            // The session watches `cancel` itself, at points where stopping loses
            // nothing (never in the middle of a renewal).
            match self
                .session(&cancel, &mut attempt, &control, &meter, &current)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_final() => {
                    tracing::error!(agent_id = %self.identity.agent_id, error = %e, "agent stops");
                    return Err(e);
                }
                Err(e) => {
                    let wait = crate::backoff::delay(
                        attempt,
                        self.config.reconnect_min,
                        self.config.reconnect_max,
                        rand::random(),
                    );
                    attempt = attempt.saturating_add(1);
                    self.metrics.reconnect();
                    tracing::warn!(error = %e, retry_in = ?wait, "session ended; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// Starts an inventory collection on the blocking pool; the collector travels with
    /// it and comes back with the result, so heartbeats never wait for a slow scan.
    fn start_collection(&mut self) -> Option<JoinHandle<(InventoryCollector, Inventory)>> {
        let mut collector = self.collector.take()?;
        let now = self.clock.now_ms();
        Some(tokio::task::spawn_blocking(move || {
            let inventory = collector.collect(now);
            (collector, inventory)
        }))
    }

    async fn session(
        &mut self,
        cancel: &CancellationToken,
        attempt: &mut u32,
        control: &Arc<ControlPlane>,
        meter: &Arc<MeterHandle>,
        current: &crate::local::Current,
    ) -> Result<(), SessionError> {
        let session = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            opened = Session::open_with(None, &self.config, &self.identity, Some(control.isolation())) => opened?,
        };
        // Local requests go over this session while it lasts.
        *current.lock().expect("not poisoned") = Some(session.connection.clone());
        let _current = ClearOnDrop(current.clone());
        *attempt = 0;
        let metrics = self.metrics.clone();
        let _connected = metrics.session_opened();
        let ack = session.hello_ack().clone();
        tracing::info!(agent_id = %ack.agent_id, controller = %ack.controller_version, "session open");
        let skew = (ack.server_time_ms - self.clock.now_ms()).abs();
        if skew > 60_000 {
            tracing::warn!(
                skew_ms = skew,
                "agent and controller clocks differ by more than a minute"
            );
        }

        let heartbeat_every = match ack.heartbeat_interval_ms {
            0 => self.config.heartbeat_interval,
            ms => Duration::from_millis(ms),
        };
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(self.config.inventory_interval);
        rescan.tick().await;
        let jitter = rand::random::<f64>() * 2.0 - 1.0;
        let mut seq = 0u64;
        // Digest of the inventory the controller holds; all zero until one was sent.
        let mut reported = [0u8; 32];
        let mut must_send = true;
        let mut collecting = self.start_collection();
        let validations = Validations::new(&self.config);
        // However the session ends, runs it ordered stop.
        let _stop_runs = StopRuns(validations.clone());
        // Usage drains on its own streams, so heartbeats never wait behind a backlog.
        let _sender = AbortOnDrop(tokio::spawn(send_usage(
            session.connection.clone(),
            meter.clone(),
            metrics.clone(),
            self.config.max_frame_size,
            self.config.request_timeout,
        )));

        let serving = Serving {
            validations: validations.clone(),
            control: control.clone(),
            meter: meter.clone(),
            metrics: metrics.clone(),
            conn: session.connection.clone(),
            max_frame: self.config.max_frame_size,
            notices: self.config.data_dir.join(NOTICES_FILE),
            clock: self.clock.clone(),
            controller_ahead_ms: ack.server_time_ms - self.clock.now_ms(),
            cancel: cancel.clone(),
        };

        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    session.close("agent shutting down").await;
                    return Ok(());
                }
                incoming = session.connection.accept_bi() => {
                    let (send, recv) = incoming.map_err(|e| SessionError::from_exchange(e.into()))?;
                    tokio::spawn(serve_controller_stream(send, recv, serving.clone()));
                }
                done = async { collecting.as_mut().expect("guarded by the select condition").await }, if collecting.is_some() => {
                    collecting = None;
                    let (collector, inventory) = done.expect("inventory collection does not panic");
                    self.collector = Some(collector);
                    let digest = inventory::digest(&inventory);
                    if must_send || digest != reported {
                        if !must_send {
                            tracing::info!("inventory changed; reporting it");
                        }
                        session.send_inventory(inventory).await?;
                        reported = digest;
                        must_send = false;
                    }
                }
                _ = heartbeat.tick() => {
                    seq += 1;
                    let (uptime_secs, load_avg_1m, memory_used_bytes) = inventory::live_figures();
                    let beat = Message::Heartbeat(Heartbeat {
                        seq,
                        sent_at_ms: self.clock.now_ms(),
                        uptime_secs,
                        load_avg_1m,
                        memory_used_bytes,
                        inventory_digest: reported,
                    });
                    match session.request(&beat).await? {
                        Message::HeartbeatAck(a) => {
                            metrics.heartbeat();
                            if a.inventory_wanted && !must_send {
                                must_send = true;
                                collecting = collecting.or_else(|| self.start_collection());
                            }
                        }
                        Message::Error(reply) => return Err(SessionError::Refused { what: "heartbeat", reply }),
                        other => return Err(SessionError::Unexpected { what: "heartbeat", got: other.kind() }),
                    }
                    if self.clock.now_ms() >= self.identity.renew_at_ms(jitter) {
                        session.renew(&mut self.identity, &self.config.data_dir, self.clock.now_ms()).await?;
                        metrics.certificate(self.identity.certificate.not_after_ms, true);
                        tracing::info!(serial = %self.identity.certificate.serial, not_after_ms = self.identity.certificate.not_after_ms, "certificate renewed");
                    }
                }
                _ = rescan.tick() => {
                    collecting = collecting.or_else(|| self.start_collection());
                }
            }
        }
    }
}
