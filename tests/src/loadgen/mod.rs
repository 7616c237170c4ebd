//! The load generator: many simulated agents against one real controller process.
//!
//! Every simulated agent enrolls through its own join token over the real enrollment
//! endpoint, holds a real mutually authenticated QUIC session, heartbeats, reports an
//! inventory, sends usage batches and answers control commands; meanwhile control
//! commands go through the controller's HTTP API, and the controller process's CPU,
//! memory, descriptors and threads are sampled from `/proc`. At the end the usage the
//! agents created is checked against the controller's database, record by record.
//! `surplus-loadgen agents` is the command; docs/PERFORMANCE.md has the numbers.

pub mod footprint;
pub mod proc;
pub mod sim;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use quinn::Endpoint;
use serde::Serialize;
use serde_json::{Value, json};
use surplus_agent::config::AgentConfig;
use surplus_protocol::clock::{Clock, SystemClock};
use surplus_protocol::token::JoinToken;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use proc::{ControllerProcess, ProcSample, Sampler};
use sim::{Behaviour, SimAgent, Stats};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `surplus-controller` binary.
    pub controller_bin: PathBuf,
    /// Where the controller's data directory and log go.
    pub dir: PathBuf,
    /// Simulated agents.
    pub agents: usize,
    /// Steady phase, after every agent connected.
    pub duration: Duration,
    /// Heartbeat period the controller asks for.
    pub heartbeat: Duration,
    /// What the simulated agents do.
    pub behaviour: Behaviour,
    /// Control commands per second through the API during the steady phase.
    pub control_rate: f64,
    /// Enrollments and first connections in flight at once.
    pub concurrency: usize,
    /// Agents per client UDP socket.
    pub agents_per_socket: usize,
    /// More `SURPLUS_CONTROLLER_*` settings.
    pub controller_env: Vec<(String, String)>,
    /// The controller's database when it is PostgreSQL (else the embedded SQLite),
    /// and the server's root process, sampled beside the controller.
    pub postgres: Option<(String, u32)>,
}

/// Latency figures, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    /// From round trips in microseconds.
    pub fn of(mut us: Vec<u32>) -> Self {
        us.sort_unstable();
        let at = |p: f64| {
            if us.is_empty() {
                return 0.0;
            }
            let i = ((us.len() - 1) as f64 * p).round() as usize;
            f64::from(us[i]) / 1000.0
        };
        Self {
            count: us.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

/// One phase that did `count` things.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    /// How many.
    pub count: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// `count / seconds`.
    pub per_second: f64,
    /// Per item.
    pub latency: Latency,
}

impl Phase {
    fn of(count: usize, took: Duration, us: Vec<u32>) -> Self {
        let seconds = took.as_secs_f64();
        Self {
            count,
            seconds,
            per_second: if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            },
            latency: Latency::of(us),
        }
    }
}

/// Heartbeats during the steady phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Heartbeats {
    /// Acknowledged heartbeats over the whole run.
    pub acked: u64,
    /// Acknowledged per second during the steady phase.
    pub per_second: f64,
    /// Round trip, agent to controller and back.
    pub latency: Latency,
}

/// Usage delivery and its check against the database.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    /// Records the agents created.
    pub created: u64,
    /// Records the agents had acknowledged when the run ended.
    pub acked: u64,
    /// Batches committed.
    pub batches: u64,
    /// Stored for the first time, by the controller's acknowledgements.
    pub stored: u64,
    /// Recognised as duplicates (every deliberately resent batch).
    pub duplicates: u64,
    /// Refused.
    pub rejected: u64,
    /// Batches deliberately sent twice.
    pub resent_batches: u64,
    /// Batches refused as busy (the ingest queue was full) and sent again later.
    pub busy_refusals: u64,
    /// Records committed per second during the steady phase.
    pub per_second: f64,
    /// Batch round trip (send to commit acknowledgement).
    pub latency: Latency,
    /// Rows in the controller's `usage_records` of the simulated agents.
    pub rows_in_database: u64,
    /// Agents whose rows are not a gap-free prefix of their records, once each,
    /// covering every acknowledged one.
    pub agents_with_gaps_or_extras: u64,
    /// Agents whose stored CPU deltas do not add up to the counter's final total.
    pub agents_with_wrong_totals: u64,
}

/// Control commands through the API.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Control {
    /// Requests sent to the API.
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Any other answer, or none.
    pub failed: u64,
    /// Commands the simulated agents received (reconciliations on connect included).
    pub received_by_agents: u64,
    /// Answers the simulated agents wrote back.
    pub answered_by_agents: u64,
    /// API round trip, all actions.
    pub latency: Latency,
    /// API round trip per action.
    pub by_action: BTreeMap<String, Latency>,
}

/// The controller process over the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerFigures {
    /// Mean CPU over the steady phase, percent of one core.
    pub steady_cpu_percent: f64,
    /// Highest one-second CPU sample, percent of one core.
    pub peak_cpu_percent: f64,
    /// Resident set before any agent enrolled, MiB.
    pub rss_idle_mib: f64,
    /// Resident set at the end of the steady phase, MiB.
    pub rss_end_mib: f64,
    /// Peak resident set (`VmHWM`), MiB.
    pub rss_peak_mib: f64,
    /// `(rss_end - rss_idle) / agents`, KiB.
    pub kib_per_agent: f64,
    /// Most open descriptors.
    pub max_fds: u64,
    /// Threads at the end.
    pub threads: u64,
    /// The samples, one per second.
    pub samples: Vec<ProcSample>,
}

/// The database server's processes over the steady phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DatabaseFigures {
    /// Mean CPU over the steady phase, percent of one core.
    pub steady_cpu_percent: f64,
    /// Highest one-second CPU sample, percent of one core.
    pub peak_cpu_percent: f64,
    /// Summed proportional set size at the end of the steady phase, MiB.
    pub pss_end_mib: f64,
    /// Highest summed proportional set size sampled, MiB.
    pub pss_peak_mib: f64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Simulated agents.
    pub agents: usize,
    /// Steady phase, seconds.
    pub steady_seconds: f64,
    /// Heartbeat period, seconds.
    pub heartbeat_seconds: f64,
    /// Usage period, seconds.
    pub usage_period_seconds: f64,
    /// Join tokens created through the API.
    pub tokens: Phase,
    /// Enrollments over the enrollment endpoint.
    pub enrollment: Phase,
    /// First sessions (handshake, hello, inventory).
    pub connect: Phase,
    /// Sessions open at the end of the steady phase, as the agents see it.
    pub connected_at_end: u64,
    /// Agents the controller lists online at the end of the steady phase.
    pub online_at_end: u64,
    /// Sessions opened, reconnections included.
    pub sessions_opened: u64,
    /// Heartbeats.
    pub heartbeats: Heartbeats,
    /// Usage.
    pub usage: Usage,
    /// Control.
    pub control: Control,
    /// The controller process.
    pub controller: ControllerFigures,
    /// The database: `sqlite` (inside the controller process) or `postgres`.
    pub database: String,
    /// PostgreSQL's own processes (postmaster and backends), when it is the database:
    /// CPU of all of them, memory as their summed proportional set size.
    pub postgres: Option<DatabaseFigures>,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Correctness findings; empty when every agent was online, every record stored
    /// exactly once and every control command answered.
    pub problems: Vec<String>,
    /// The phase the run reached (`start`, `enrollment`, `sessions`, `steady`,
    /// `drain`, `verification`, `done`).
    pub phase: String,
    /// The phase that failed, when one did: everything before it was measured.
    pub failed_phase: Option<String>,
}

struct Api {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

fn agent_config() -> AgentConfig {
    AgentConfig {
        request_timeout: Duration::from_secs(30),
        ..AgentConfig::default()
    }
}

/// Creates a token and enrolls one agent with it; the two round trips in µs.
async fn enroll_one(
    api: &Api,
    endpoint: &Endpoint,
    config: &AgentConfig,
    i: usize,
) -> anyhow::Result<(SimAgent, u32, u32)> {
    let started = Instant::now();
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "/v1/tokens",
            Some(json!({"ttl": "2h", "labels": {"loadgen": "yes"}})),
        )
        .await?;
    if status != 201 {
        bail!("token refused: {status} {created}");
    }
    let token_us = started.elapsed().as_micros() as u32;
    let text = created["token"]
        .as_str()
        .context("no token in the answer")?;
    let token = JoinToken::parse(text)?;
    let started = Instant::now();
    let identity = surplus_agent::enroll::request_identity(
        Some(endpoint),
        &token,
        &format!("sim-{i}"),
        config,
        SystemClock.now_ms(),
    )
    .await?;
    Ok((
        SimAgent::new(identity),
        token_us,
        started.elapsed().as_micros() as u32,
    ))
}

/// Runs the whole scenario and returns what it measured.
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let o = options;
    std::fs::create_dir_all(&o.dir).with_context(|| format!("creating {}", o.dir.display()))?;
    let mut env = vec![(
        "SURPLUS_CONTROLLER_HEARTBEAT_INTERVAL".to_owned(),
        format!("{}ms", o.heartbeat.as_millis()),
    )];
    env.extend(o.controller_env.iter().cloned());
    if let Some((url, _)) = &o.postgres {
        env.push(("SURPLUS_CONTROLLER_DATABASE_URL".to_owned(), url.clone()));
    }
    let controller = ControllerProcess::start(
        &o.controller_bin,
        &o.dir,
        &env,
        o.postgres.as_ref().map(|(url, _)| url.as_str()),
    )
    .await?;
    let mut report = Report {
        agents: o.agents,
        steady_seconds: o.duration.as_secs_f64(),
        heartbeat_seconds: o.heartbeat.as_secs_f64(),
        usage_period_seconds: o.behaviour.usage_period.as_secs_f64(),
        phase: "start".to_owned(),
        ..Report::default()
    };
    // A run that fails still reports what it measured until then, and where it failed.
    if let Err(e) = drive(&o, &controller, &mut report).await {
        report.failed_phase = Some(report.phase.clone());
        report
            .problems
            .push(format!("the {} phase failed: {e:#}", report.phase));
    }
    if let Err(e) = controller.stop().await {
        report
            .problems
            .push(format!("the controller did not stop cleanly: {e:#}"));
    }
    Ok(report)
}

async fn drive(
    o: &Options,
    controller: &ControllerProcess,
    report: &mut Report,
) -> anyhow::Result<()> {
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(o.concurrency.max(16))
            .build()?,
        url: controller.url.clone(),
        token: controller.admin_token.clone(),
    });
    let mut sampler = Sampler::new(controller.pid)?;
    report.database = if o.postgres.is_some() {
        "postgres"
    } else {
        "sqlite"
    }
    .to_owned();
    let mut db_sampler = match &o.postgres {
        Some((_, pid)) => Some(Sampler::tree(*pid)?),
        None => None,
    };
    report.controller.rss_idle_mib = sampler.last().rss_bytes as f64 / 1048576.0;
    let sockets = o.agents.div_ceil(o.agents_per_socket.max(1)).max(1);
    let endpoints: Vec<Endpoint> = (0..sockets)
        .map(|_| Endpoint::client("127.0.0.1:0".parse().expect("literal")))
        .collect::<Result<_, _>>()
        .context("opening the simulated agents' UDP sockets")?;
    let config = Arc::new(agent_config());
    let inventory = Arc::new(
        tokio::task::spawn_blocking(|| {
            surplus_agent::inventory::InventoryCollector::new(Duration::from_secs(3600))
                .collect(SystemClock.now_ms())
        })
        .await?,
    );
    let stats = Arc::new(Stats::default());

    // Enrollment: a join token each, through the API, then the enrollment endpoint.
    report.phase = "enrollment".to_owned();
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..o.agents {
        let (api, gate, config) = (api.clone(), gate.clone(), config.clone());
        let endpoint = endpoints[i % sockets].clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            enroll_one(&api, &endpoint, &config, i).await
        });
    }
    let mut sims = Vec::with_capacity(o.agents);
    let (mut token_us, mut enroll_us) = (Vec::new(), Vec::new());
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok((sim, t, e)) => {
                sims.push(Arc::new(sim));
                token_us.push(t);
                enroll_us.push(e);
            }
            Err(e) => stats.error(format!("enrollment: {e:#}")),
        }
    }
    let took = started.elapsed();
    let token_total: f64 = token_us.iter().map(|u| f64::from(*u)).sum::<f64>() / 1e6;
    let enroll_total: f64 = enroll_us.iter().map(|u| f64::from(*u)).sum::<f64>() / 1e6;
    // The two steps alternate in every task: split the wall time by their share.
    let share = |part: f64| took.mul_f64(part / (token_total + enroll_total).max(1e-9));
    report.tokens = Phase::of(token_us.len(), share(token_total), token_us);
    report.enrollment = Phase::of(enroll_us.len(), share(enroll_total), enroll_us);
    if sims.len() < o.agents {
        report.problems.push(format!(
            "{} of {} agents could not enroll",
            o.agents - sims.len(),
            o.agents
        ));
    }
    sampler.sample()?;

    // Sessions: every agent connects; the first connections are gated like enrollment.
    report.phase = "sessions".to_owned();
    let behaviour = Arc::new(o.behaviour.clone());
    let (drain, stop) = (CancellationToken::new(), CancellationToken::new());
    let started = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for (i, sim) in sims.iter().enumerate() {
        let endpoint = endpoints[i % sockets].clone();
        let args = (
            sim.clone(),
            config.clone(),
            inventory.clone(),
            behaviour.clone(),
            stats.clone(),
            drain.clone(),
            stop.clone(),
        );
        let gate = gate.clone();
        agents.spawn(async move {
            // Held until the first session is up (or failed), so that connecting is
            // measured at a known concurrency.
            let first = gate.acquire_owned().await.ok();
            let (sim, config, inventory, behaviour, stats, drain, stop) = args;
            sim::run(
                sim, endpoint, config, inventory, behaviour, stats, drain, stop, first,
            )
            .await;
        });
    }
    let deadline =
        Instant::now() + Duration::from_secs(120) + Duration::from_millis(20 * o.agents as u64);
    while stats.inventories.load(Ordering::Relaxed) < sims.len() as u64 && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.connect = Phase::of(
        stats.inventories.load(Ordering::Relaxed) as usize,
        started.elapsed(),
        Vec::new(),
    );
    if report.connect.count < sims.len() {
        report.problems.push(format!(
            "only {} of {} agents connected within the deadline",
            report.connect.count,
            sims.len()
        ));
    }

    // Steady phase: sample the controller, run control commands through the API.
    report.phase = "steady".to_owned();
    sampler.sample()?;
    if let Some(d) = db_sampler.as_mut() {
        d.samples.clear();
        d.sample()?;
    }
    let db_before = db_sampler
        .as_ref()
        .map(|d| (d.last().cpu_ticks, Instant::now()));
    let control = tokio::spawn(control_load(
        api.clone(),
        sims.iter().map(|s| s.identity.agent_id).collect(),
        o.control_rate,
        o.duration,
    ));
    let cpu_before = proc::read(controller.pid)?.cpu_ticks;
    let (hb_before, usage_before) = (
        stats.heartbeats_acked.load(Ordering::Relaxed),
        stats.usage_stored.load(Ordering::Relaxed),
    );
    stats.heartbeat_us.lock().expect("stats").clear();
    stats.usage_us.lock().expect("stats").clear();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < o.duration {
        tick.tick().await;
        sampler.sample()?;
        if let Some(d) = db_sampler.as_mut() {
            d.sample()?;
        }
    }
    if let (Some(d), Some((ticks, at))) = (db_sampler.as_ref(), db_before) {
        let secs = at.elapsed().as_secs_f64().max(1e-3);
        report.postgres = Some(DatabaseFigures {
            steady_cpu_percent: (d.last().cpu_ticks - ticks) as f64
                / proc::clock_ticks() as f64
                / secs
                * 100.0,
            peak_cpu_percent: d.samples.iter().map(|s| s.cpu_percent).fold(0.0, f64::max),
            pss_end_mib: d.last().rss_bytes as f64 / 1048576.0,
            pss_peak_mib: d.samples.iter().map(|s| s.rss_mib).fold(0.0, f64::max),
        });
    }
    let steady = started.elapsed().as_secs_f64();
    let cpu_after = proc::read(controller.pid)?.cpu_ticks;
    report.controller.steady_cpu_percent =
        (cpu_after - cpu_before) as f64 / proc::clock_ticks() as f64 / steady * 100.0;
    report.heartbeats.per_second =
        (stats.heartbeats_acked.load(Ordering::Relaxed) - hb_before) as f64 / steady;
    report.heartbeats.latency = Latency::of(std::mem::take(
        &mut *stats.heartbeat_us.lock().expect("stats"),
    ));
    report.usage.per_second =
        (stats.usage_stored.load(Ordering::Relaxed) - usage_before) as f64 / steady;
    report.usage.latency = Latency::of(std::mem::take(&mut *stats.usage_us.lock().expect("stats")));
    report.control = control.await??;
    report.connected_at_end = stats.connected.load(Ordering::Relaxed);
    let end = sampler.last();
    report.controller.rss_end_mib = end.rss_bytes as f64 / 1048576.0;
    report.controller.rss_peak_mib = end.peak_rss_bytes as f64 / 1048576.0;
    report.controller.threads = end.threads;
    report.controller.kib_per_agent =
        (report.controller.rss_end_mib - report.controller.rss_idle_mib) * 1024.0
            / o.agents.max(1) as f64;

    // Who the controller holds online.
    let (status, listed) = api.call(reqwest::Method::GET, "/v1/agents", None).await?;
    if status != 200 {
        bail!("GET /v1/agents answered {status}: {listed}");
    }
    let ours: std::collections::HashSet<Uuid> = sims.iter().map(|s| s.identity.agent_id).collect();
    report.online_at_end = listed
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| v["status"] == "online" && v["connected"] == true)
                .filter_map(|v| v["id"].as_str()?.parse::<Uuid>().ok())
                .filter(|id| ours.contains(id))
                .count() as u64
        })
        .unwrap_or(0);
    if report.online_at_end < sims.len() as u64 {
        report.problems.push(format!(
            "the controller lists {} of {} agents online",
            report.online_at_end,
            sims.len()
        ));
    }

    // Drain: no new usage; wait until every created record is acknowledged.
    report.phase = "drain".to_owned();
    drain.cancel();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && sims.iter().any(|s| {
            let x = s.sent();
            x.acked < x.created
        })
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    while agents.join_next().await.is_some() {}
    for e in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
    }
    sampler.sample()?;
    report.controller.max_fds = sampler.samples.iter().map(|s| s.fds).max().unwrap_or(0);
    report.controller.peak_cpu_percent = sampler
        .samples
        .iter()
        .map(|s| s.cpu_percent)
        .fold(0.0, f64::max);
    report.controller.samples = sampler.samples.clone();

    let sent: Vec<(Uuid, sim::Sent)> = sims
        .iter()
        .map(|s| (s.identity.agent_id, s.sent()))
        .collect();
    report.usage.created = stats.usage_created.load(Ordering::Relaxed);
    report.usage.acked = sent.iter().map(|(_, s)| s.acked).sum();
    report.usage.batches = stats.usage_batches.load(Ordering::Relaxed);
    report.usage.stored = stats.usage_stored.load(Ordering::Relaxed);
    report.usage.duplicates = stats.usage_duplicates.load(Ordering::Relaxed);
    report.usage.rejected = stats.usage_rejected.load(Ordering::Relaxed);
    report.usage.resent_batches = stats.usage_resent_batches.load(Ordering::Relaxed);
    report.usage.busy_refusals = stats.usage_busy.load(Ordering::Relaxed);
    let database = o.postgres.as_ref().map(|(url, _)| url.as_str());
    report.phase = "verification".to_owned();
    verify_usage(&controller.data_dir, database, &sent, report).await?;

    report.sessions_opened = stats.sessions_opened.load(Ordering::Relaxed);
    report.heartbeats.acked = stats.heartbeats_acked.load(Ordering::Relaxed);
    report.control.received_by_agents = stats.control_received.load(Ordering::Relaxed);
    report.control.answered_by_agents = stats.control_answered.load(Ordering::Relaxed);
    report.errors = stats.errors.lock().expect("stats").clone();
    if report.control.failed > 0 {
        report
            .problems
            .push(format!("{} control commands failed", report.control.failed));
    }
    if report.control.answered_by_agents < report.control.received_by_agents {
        report.problems.push(format!(
            "the agents answered {} of {} control commands",
            report.control.answered_by_agents, report.control.received_by_agents
        ));
    }
    report.phase = "done".to_owned();
    Ok(())
}

/// Reads the controller's database: every agent's rows must be its sequence numbers
/// from 0, once each, without gaps, covering every acknowledged record; when all were
/// delivered, its CPU deltas must add up to its counter's total.
async fn verify_usage(
    data_dir: &std::path::Path,
    postgres: Option<&str>,
    sent: &[(Uuid, sim::Sent)],
    report: &mut Report,
) -> anyhow::Result<()> {
    // One statement for both backends (PostgreSQL's COUNT and SUM are not BIGINT).
    const PER_AGENT: &str = "SELECT agent_id, epoch, CAST(COUNT(*) AS BIGINT), MIN(seq), MAX(seq), \
         CAST(SUM(CASE WHEN meter = 'cpu_busy_ms' THEN delta ELSE 0 END) AS BIGINT) \
         FROM usage_records GROUP BY agent_id, epoch";
    type PerAgent = (String, i64, i64, i64, i64, i64);
    let rows: Vec<PerAgent> = match postgres {
        Some(url) => {
            let pool = sqlx::PgPool::connect(url)
                .await
                .context("connecting to the controller's PostgreSQL database")?;
            let rows = sqlx::query_as(PER_AGENT).fetch_all(&pool).await?;
            pool.close().await;
            rows
        }
        None => {
            let path = data_dir.join("controller.db");
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true);
            let pool = sqlx::SqlitePool::connect_with(options)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let rows = sqlx::query_as(PER_AGENT).fetch_all(&pool).await?;
            pool.close().await;
            rows
        }
    };
    let mut stored: BTreeMap<(String, i64), (i64, i64, i64, i64)> = BTreeMap::new();
    for (agent, epoch, n, lo, hi, busy) in rows {
        stored.insert((agent, epoch), (n, lo, hi, busy));
    }
    for (id, s) in sent {
        let key = (id.to_string(), s.epoch as i64);
        let (n, lo, hi, busy) = stored.remove(&key).unwrap_or((0, -1, -1, 0));
        report.usage.rows_in_database += n as u64;
        // Rows are a gap-free prefix of what the agent created, once each, and hold
        // at least every record it had acknowledged (records sent but not yet
        // acknowledged may or may not be committed).
        let exact = if n == 0 {
            s.acked == 0
        } else {
            lo == 0 && hi + 1 == n && n as u64 >= s.acked && (n as u64) <= s.created
        };
        if !exact {
            report.usage.agents_with_gaps_or_extras += 1;
        } else if n as u64 == s.created && busy as u64 != s.cpu_busy_total {
            report.usage.agents_with_wrong_totals += 1;
        }
    }
    let u = &report.usage;
    let mut problems = Vec::new();
    if u.acked < u.created {
        problems.push(format!(
            "{} of {} usage records were never acknowledged",
            u.created - u.acked,
            u.created
        ));
    }
    if u.agents_with_gaps_or_extras > 0 {
        problems.push(format!(
            "{} agents' usage rows are not exactly their records once each",
            u.agents_with_gaps_or_extras
        ));
    }
    if u.agents_with_wrong_totals > 0 {
        problems.push(format!(
            "{} agents' stored CPU deltas do not add up to their counter",
            u.agents_with_wrong_totals
        ));
    }
    if u.stored != u.created || u.rows_in_database != u.created {
        problems.push(format!(
            "{} records created, {} acknowledged as stored, {} rows in the database",
            u.created, u.stored, u.rows_in_database
        ));
    }
    if u.rejected > 0 {
        problems.push(format!("{} usage records rejected", u.rejected));
    }
    report.problems.extend(problems);
    Ok(())
}

/// Control commands at `rate` per second for `duration`: each picks an agent at
/// random, runs an instance there if it has none yet, and otherwise describes it.
async fn control_load(
    api: Arc<Api>,
    agents: Vec<Uuid>,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Control> {
    let mut out = Control::default();
    if rate <= 0.0 || agents.is_empty() {
        return Ok(out);
    }
    let instances: Arc<tokio::sync::Mutex<BTreeMap<Uuid, String>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let agent = agents[rand::random_range(0..agents.len())];
        let (api, instances) = (api.clone(), instances.clone());
        tasks.spawn(async move {
            let known = instances.lock().await.get(&agent).cloned();
            let (action, body) = match &known {
                Some(id) => ("DescribeInstances", json!({"action": "DescribeInstances", "ids": [id]})),
                None => ("RunInstances", json!({"action": "RunInstances", "agent_id": agent, "command": ["sleep", "infinity"]})),
            };
            let t = Instant::now();
            let answer = api.call(reqwest::Method::POST, "/v1/control", Some(body)).await;
            let us = t.elapsed().as_micros() as u32;
            let ok = match &answer {
                Ok((200 | 201, v)) => {
                    if known.is_none() {
                        if let Some(id) = v["instances"][0]["id"].as_str() {
                            instances.lock().await.insert(agent, id.to_owned());
                        }
                    }
                    v["instances"].as_array().is_some_and(|a| a.len() == 1)
                }
                _ => false,
            };
            if !ok {
                tracing::warn!(action, ?answer, "control command failed");
            }
            (action, us, ok)
        });
    }
    let mut all = Vec::new();
    let mut by_action: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (action, us, ok) = done?;
        out.sent += 1;
        if ok {
            out.ok += 1;
        } else {
            out.failed += 1;
        }
        all.push(us);
        by_action.entry(action.to_owned()).or_default().push(us);
    }
    out.latency = Latency::of(all);
    out.by_action = by_action
        .into_iter()
        .map(|(k, v)| (k, Latency::of(v)))
        .collect();
    Ok(out)
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec!["measure", "value"]);
    let lat = |l: &Latency| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
        )
    };
    let mut rows: Vec<(String, String)> = vec![
        (
            "agents".into(),
            format!(
                "{} (heartbeat {} s, usage every {} s, steady {} s)",
                r.agents, r.heartbeat_seconds, r.usage_period_seconds, r.steady_seconds
            ),
        ),
        (
            "join tokens (API)".into(),
            format!(
                "{} at {:.0}/s; {}",
                r.tokens.count,
                r.tokens.per_second,
                lat(&r.tokens.latency)
            ),
        ),
        (
            "enrollments (QUIC)".into(),
            format!(
                "{} at {:.0}/s; {}",
                r.enrollment.count,
                r.enrollment.per_second,
                lat(&r.enrollment.latency)
            ),
        ),
        (
            "first sessions".into(),
            format!(
                "{} in {:.1} s ({:.0}/s)",
                r.connect.count, r.connect.seconds, r.connect.per_second
            ),
        ),
        (
            "connected / online at end".into(),
            format!(
                "{} / {} (sessions opened {})",
                r.connected_at_end, r.online_at_end, r.sessions_opened
            ),
        ),
        (
            "heartbeats".into(),
            format!(
                "{:.0}/s; {}",
                r.heartbeats.per_second,
                lat(&r.heartbeats.latency)
            ),
        ),
        (
            "usage records".into(),
            format!(
                "{} created, {} acked, {} rows; {:.0}/s committed",
                r.usage.created, r.usage.acked, r.usage.rows_in_database, r.usage.per_second
            ),
        ),
        (
            "usage exactly once".into(),
            format!(
                "{} resent batches, {} duplicates recognised, {} busy refusals, {} agents with gaps or extras, {} with wrong totals",
                r.usage.resent_batches,
                r.usage.duplicates,
                r.usage.busy_refusals,
                r.usage.agents_with_gaps_or_extras,
                r.usage.agents_with_wrong_totals
            ),
        ),
        ("usage batch".into(), lat(&r.usage.latency)),
        (
            "control (API)".into(),
            format!(
                "{} sent, {} ok, {} failed; {}",
                r.control.sent,
                r.control.ok,
                r.control.failed,
                lat(&r.control.latency)
            ),
        ),
        (
            "controller CPU".into(),
            format!(
                "{:.1}% of a core steady, {:.0}% peak second",
                r.controller.steady_cpu_percent, r.controller.peak_cpu_percent
            ),
        ),
        (
            "controller memory".into(),
            format!(
                "{:.0} MiB idle, {:.0} MiB at end, {:.0} MiB peak, {:.1} KiB per agent",
                r.controller.rss_idle_mib,
                r.controller.rss_end_mib,
                r.controller.rss_peak_mib,
                r.controller.kib_per_agent
            ),
        ),
        (
            "controller fds / threads".into(),
            format!("{} / {}", r.controller.max_fds, r.controller.threads),
        ),
        ("database".into(), r.database.clone()),
    ];
    if let Some(pg) = &r.postgres {
        rows.push((
            "PostgreSQL CPU".into(),
            format!(
                "{:.1}% of a core steady, {:.0}% peak second",
                pg.steady_cpu_percent, pg.peak_cpu_percent
            ),
        ));
        rows.push((
            "PostgreSQL memory (PSS)".into(),
            format!(
                "{:.0} MiB at end, {:.0} MiB peak",
                pg.pss_end_mib, pg.pss_peak_mib
            ),
        ));
    }
    for (k, v) in rows {
        t.add_row(vec![k, v]);
    }
    for (action, l) in &r.control.by_action {
        t.add_row(vec![format!("  {action}"), lat(l)]);
    }
    for (kind, n) in &r.errors {
        t.add_row(vec![format!("error: {kind}"), n.to_string()]);
    }
    for p in &r.problems {
        t.add_row(vec!["PROBLEM".to_owned(), p.clone()]);
    }
    t.to_string()
}
