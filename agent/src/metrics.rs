//! The agent's own Prometheus metrics, served at `GET /metrics` on `metrics_listen`
//! when it is set (off by default; loopback only, checked when the configuration is
//! loaded).
//!
//! Counters are incremented where things happen (the session, the usage sender, the
//! controller's streams); the session gauge is held by a guard that the session drops
//! however it ends; the spool's figures are read from the spool when scraped, so none
//! of them can drift from the truth. This module owns the endpoint and the names; it
//! never changes what the agent does. `docs/agent-metrics.md` lists every metric.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode, header};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use surplus_protocol::control::{ControlFailure, FailureKind};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::spool::Spool;

type Labels = Vec<(&'static str, &'static str)>;

/// The content type of the exposition (prometheus-client writes OpenMetrics text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; more wait for a free slot.
const MAX_CONNECTIONS: usize = 4;

/// How long a scraper may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent's counters and the handles its gauges are read from.
#[derive(Debug)]
pub struct AgentMetrics {
    /// 1 while a session with the controller is open.
    session_connected: Gauge,
    /// Sessions opened (hello answered).
    sessions_opened: Counter,
    /// New session attempts after a session ended or could not open.
    reconnects: Counter,
    /// Heartbeats sent and acknowledged.
    heartbeats: Counter,
    /// Certificates renewed.
    certificate_renewals: Counter,
    /// End of validity of the certificate in use, Unix milliseconds (0: none loaded).
    certificate_not_after_ms: AtomicI64,
    /// Usage records sent to the controller, resent ones included.
    usage_records_sent: Counter,
    /// Usage records whose commit the controller acknowledged.
    usage_records_acknowledged: Counter,
    /// Usage batches by result.
    usage_batches: Family<Labels, Counter>,
    /// Control commands by operation and outcome.
    control_commands: Family<Labels, Counter>,
    /// Seconds spent on control commands, by operation.
    control_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Validation runs by outcome.
    validation_runs: Family<Labels, Counter>,
    /// The usage spool, once metering started.
    spool: OnceLock<Arc<Mutex<Spool>>>,
    /// Where the endpoint listens, once bound.
    local_addr: OnceLock<SocketAddr>,
}

/// The `result` labels of usage batches.
const USAGE_RESULTS: [&str; 4] = ["committed", "busy", "refused", "undelivered"];

impl Default for AgentMetrics {
    /// Every counter at zero. The families whose labels are few and known in advance
    /// (usage batch results, validation outcomes) start with each series at 0, so a
    /// scrape shows them before the first event and `rate()` sees the first one.
    fn default() -> Self {
        let m = Self {
            session_connected: Gauge::default(),
            sessions_opened: Counter::default(),
            reconnects: Counter::default(),
            heartbeats: Counter::default(),
            certificate_renewals: Counter::default(),
            certificate_not_after_ms: AtomicI64::new(0),
            usage_records_sent: Counter::default(),
            usage_records_acknowledged: Counter::default(),
            usage_batches: Family::default(),
            control_commands: Family::default(),
            control_seconds: Family::default(),
            validation_runs: Family::default(),
            spool: OnceLock::new(),
            local_addr: OnceLock::new(),
        };
        for result in USAGE_RESULTS {
            drop(m.usage_batches.get_or_create(&vec![("result", result)]));
        }
        for outcome in [
            RunOutcome::Completed,
            RunOutcome::Cancelled,
            RunOutcome::Undelivered,
        ] {
            drop(
                m.validation_runs
                    .get_or_create(&vec![("outcome", outcome.label())]),
            );
        }
        m
    }
}

/// Holds the session gauge at 1; dropping it (however the session ends) sets it to 0.
#[must_use = "the session counts as connected only while this is held"]
pub struct Connected<'a>(&'a AgentMetrics);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.session_connected.set(0);
    }
}

/// How a validation run ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Its report was written to the controller.
    Completed,
    /// It was cancelled (by the controller or because the session ended) and its
    /// partial report was written.
    Cancelled,
    /// Its report could not be delivered.
    Undelivered,
}

impl RunOutcome {
    fn label(self) -> &'static str {
        match self {
            RunOutcome::Completed => "completed",
            RunOutcome::Cancelled => "cancelled",
            RunOutcome::Undelivered => "undelivered",
        }
    }
}

/// The `outcome` label of a control command's answer.
pub fn control_outcome<T>(outcome: &Result<T, ControlFailure>) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(f) => match f.kind {
            FailureKind::InvalidParameter => "invalid_parameter",
            FailureKind::NotFound => "not_found",
            FailureKind::Unsupported => "unsupported",
            FailureKind::Conflict => "conflict",
            FailureKind::Driver => "driver",
        },
    }
}

impl AgentMetrics {
    /// Marks a session open until the returned guard is dropped.
    pub fn session_opened(&self) -> Connected<'_> {
        self.sessions_opened.inc();
        self.session_connected.set(1);
        Connected(self)
    }

    /// Counts a new attempt after a session ended or failed to open.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// Counts an acknowledged heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Records the certificate in use (at start and after each renewal).
    pub fn certificate(&self, not_after_ms: i64, renewed: bool) {
        self.certificate_not_after_ms
            .store(not_after_ms, Ordering::Relaxed);
        if renewed {
            self.certificate_renewals.inc();
        }
    }

    /// Counts a usage batch of `records` sent.
    pub fn usage_sent(&self, records: usize) {
        self.usage_records_sent.inc_by(records as u64);
    }

    /// Counts the answer to a usage batch of `records`: `committed` (they are
    /// acknowledged), `busy`, `refused` or `undelivered`.
    pub fn usage_result(&self, result: &'static str, records: usize) {
        debug_assert!(USAGE_RESULTS.contains(&result), "{result}");
        self.usage_batches
            .get_or_create(&vec![("result", result)])
            .inc();
        if result == "committed" {
            self.usage_records_acknowledged.inc_by(records as u64);
        }
    }

    /// Counts a control command, its outcome and the time it took.
    pub fn control(&self, operation: &'static str, outcome: &'static str, took: Duration) {
        self.control_commands
            .get_or_create(&vec![("operation", operation), ("outcome", outcome)])
            .inc();
        self.control_seconds
            .get_or_create(&vec![("operation", operation)])
            .inc_by(took.as_secs_f64());
    }

    /// Counts a validation run's end.
    pub fn validation(&self, outcome: RunOutcome) {
        self.validation_runs
            .get_or_create(&vec![("outcome", outcome.label())])
            .inc();
    }

    /// Gives the scrape the spool to read its figures from.
    pub fn watch_spool(&self, spool: Arc<Mutex<Spool>>) {
        let _ = self.spool.set(spool);
    }

    /// Where the endpoint listens, once it does (`None` when `metrics_listen` is off).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr.get().copied()
    }

    /// The text exposition. Reads the spool, so it may wait for a write in progress:
    /// call it off the async threads.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("surplus_agent");
        registry.register(
            "build",
            "The agent's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "session_connected",
            "1 while a session with the controller is open, else 0",
            self.session_connected.clone(),
        );
        registry.register(
            "sessions_opened",
            "Sessions opened with the controller (hello answered)",
            self.sessions_opened.clone(),
        );
        registry.register(
            "reconnects",
            "New session attempts after a session ended or could not open",
            self.reconnects.clone(),
        );
        registry.register(
            "heartbeats",
            "Heartbeats sent and acknowledged by the controller",
            self.heartbeats.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "End of validity of the agent's certificate, Unix seconds",
            ConstGauge::new(self.certificate_not_after_ms.load(Ordering::Relaxed) / 1000),
        );
        registry.register(
            "certificate_renewals",
            "Certificates renewed since the agent started",
            self.certificate_renewals.clone(),
        );
        registry.register(
            "usage_records_sent",
            "Usage records sent to the controller, resent ones included",
            self.usage_records_sent.clone(),
        );
        registry.register(
            "usage_records_acknowledged",
            "Usage records whose commit the controller acknowledged",
            self.usage_records_acknowledged.clone(),
        );
        registry.register(
            "usage_batches",
            "Usage batches sent, by result",
            self.usage_batches.clone(),
        );
        registry.register(
            "control_commands",
            "Control commands from the controller, by operation and outcome",
            self.control_commands.clone(),
        );
        registry.register(
            "control_seconds",
            "Seconds spent carrying out control commands, by operation",
            self.control_seconds.clone(),
        );
        registry.register(
            "validation_runs",
            "Validation runs ordered by the controller, by outcome",
            self.validation_runs.clone(),
        );
        let spool = self
            .spool
            .get()
            .map(|s| s.lock().expect("spool poisoned").state())
            .unwrap_or_default();
        registry.register(
            "spool_records",
            "Usage records in the spool not yet acknowledged by the controller",
            ConstGauge::new(spool.pending_records as i64),
        );
        registry.register(
            "spool_bytes",
            "Bytes of the usage spool on disk",
            ConstGauge::new(spool.bytes as i64),
        );
        registry.register(
            "spool_merged_records",
            "Usage records merged into coarser ones because the spool was full",
            ConstCounter::new(spool.merged_records),
        );
        registry.register(
            "spool_discarded_records",
            "Damaged usage records skipped when the spool was read",
            ConstCounter::new(spool.discarded_records),
        );
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

/// Binds `addr`, remembering the bound address in `metrics`.
pub async fn bind(metrics: &AgentMetrics, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let _ = metrics.local_addr.set(bound);
    tracing::info!(address = %bound, "metrics served at http://{bound}/metrics");
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until `cancel` fires: HTTP/1.1, a few
/// connections at a time, the request head within a few seconds.
pub async fn serve(listener: TcpListener, metrics: Arc<AgentMetrics>, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "metrics connection not accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let metrics = metrics.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(request, metrics).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                done = connection => if let Err(e) = done {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
            }
            drop(permit);
        });
    }
}

async fn answer<B>(request: Request<B>, metrics: Arc<AgentMetrics>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("static response parts")
    };
    if request.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: the agent serves /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let Ok(body) = tokio::task::spawn_blocking(move || metrics.render()).await else {
        return reply(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n");
    };
    Response::builder()
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_its_labels() {
        let m = AgentMetrics::default();
        let connected = m.session_opened();
        m.heartbeat();
        m.heartbeat();
        m.certificate(1_900_000_000_123, false);
        m.usage_sent(3);
        m.usage_result("committed", 3);
        m.control("RunInstances", "ok", Duration::from_millis(5));
        m.control("StopInstances", "not_found", Duration::ZERO);
        m.validation(RunOutcome::Cancelled);
        let text = m.render();
        for line in [
            "surplus_agent_session_connected 1",
            "surplus_agent_sessions_opened_total 1",
            "surplus_agent_reconnects_total 0",
            "surplus_agent_heartbeats_total 2",
            "surplus_agent_certificate_expiry_seconds 1900000000",
            "surplus_agent_usage_records_sent_total 3",
            "surplus_agent_usage_records_acknowledged_total 3",
            "surplus_agent_usage_batches_total{result=\"committed\"} 1",
            "surplus_agent_control_commands_total{operation=\"RunInstances\",outcome=\"ok\"} 1",
            "surplus_agent_control_commands_total{operation=\"StopInstances\",outcome=\"not_found\"} 1",
            "surplus_agent_validation_runs_total{outcome=\"cancelled\"} 1",
            "surplus_agent_validation_runs_total{outcome=\"completed\"} 0",
            "surplus_agent_usage_batches_total{result=\"busy\"} 0",
            "surplus_agent_spool_records 0",
            "surplus_agent_spool_bytes 0",
            "surplus_agent_spool_merged_records_total 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.contains("surplus_agent_build_info{version="), "{text}");
        assert!(text.ends_with("# EOF\n"));
        drop(connected);
        assert!(m.render().contains("surplus_agent_session_connected 0"));
    }

    #[test]
    fn control_outcomes_are_the_failure_kinds() {
        let ok: Result<(), ControlFailure> = Ok(());
        assert_eq!(control_outcome(&ok), "ok");
        let refused: Result<(), _> = Err(ControlFailure::new(FailureKind::Conflict, "running"));
        assert_eq!(control_outcome(&refused), "conflict");
    }
}
