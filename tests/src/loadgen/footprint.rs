//! The agent's footprint next to Prometheus node_exporter on the same host, in one
//! run: both started at once and left idle (the agent connected to a real controller,
//! heartbeating and metering at its defaults, its own metrics endpoint on; both
//! scraped every 15 s), their CPU and resident memory read from `/proc`; then the
//! agent runs the full validation suite and its peak RSS is read. The agent must stay
//! online through the whole idle window (one session, connected at every scrape,
//! heartbeats acknowledged all along): an agent stuck reconnecting does less work and
//! would look cheaper, so such a run fails. `surplus-loadgen footprint` is the command.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use super::Api;
use super::proc::{self, ControllerProcess, Sampler};

/// What to compare.
#[derive(Debug, Clone)]
pub struct FootprintOptions {
    /// The `surplus-agent` binary.
    pub agent_bin: PathBuf,
    /// The `surplus-controller` binary.
    pub controller_bin: PathBuf,
    /// The node_exporter binary.
    pub node_exporter_bin: PathBuf,
    /// Working directory.
    pub dir: PathBuf,
    /// Idle phase.
    pub duration: Duration,
    /// Scrape period of node_exporter and of the agent's metrics.
    pub scrape: Duration,
    /// Run the validation suite afterwards and report the agent's peak RSS.
    pub validation: bool,
}

/// One process over the idle phase.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessFootprint {
    /// Binary on disk, bytes.
    pub binary_bytes: u64,
    /// Whether the binary carries a symbol table (`.symtab`): stripped binaries do not.
    pub binary_has_symbols: bool,
    /// CPU over the idle phase, seconds.
    pub cpu_seconds: f64,
    /// CPU over the idle phase, percent of one core.
    pub cpu_percent: f64,
    /// Mean resident set over the idle phase, MiB.
    pub rss_mean_mib: f64,
    /// Resident set at the end of the idle phase, MiB.
    pub rss_end_mib: f64,
    /// Peak resident set over the idle phase (`VmHWM`), MiB.
    pub rss_peak_mib: f64,
    /// Threads at the end.
    pub threads: u64,
}

/// The comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FootprintReport {
    /// Idle phase, seconds.
    pub seconds: f64,
    /// Scrape period of both, seconds.
    pub scrape_seconds: f64,
    /// Scrapes made, and bytes of the last one.
    pub scrapes: u64,
    /// Size of the last scrape, bytes.
    pub scrape_bytes: u64,
    /// Size of the last scrape of the agent's own metrics, bytes.
    pub agent_scrape_bytes: u64,
    /// What the agent's own metrics said over the idle phase.
    pub agent_online: OnlineCheck,
    /// `surplus-agent`.
    pub agent: ProcessFootprint,
    /// `prometheus-node-exporter`.
    pub node_exporter: ProcessFootprint,
    /// The agent's peak RSS after the full validation suite (benchmarks and security
    /// checks), MiB.
    pub agent_peak_rss_validation_mib: Option<f64>,
    /// How long that suite took, seconds.
    pub validation_seconds: Option<f64>,
}

/// The agent's session over the idle phase, from its own metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OnlineCheck {
    /// Scrapes of the agent that found its session connected.
    pub connected_scrapes: u64,
    /// Sessions the agent opened in its life (1: it never reconnected).
    pub sessions_opened: u64,
    /// Reconnection attempts in its life.
    pub reconnects: u64,
    /// Heartbeats acknowledged over the idle phase.
    pub heartbeats: u64,
}

/// The value of the sample `name` (without labels) in a text exposition.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The agent's session figures from one scrape of its metrics.
#[derive(Debug, Clone, Copy)]
struct SessionFigures {
    connected: f64,
    opened: f64,
    reconnects: f64,
    heartbeats: f64,
}

async fn scrape_agent(http: &reqwest::Client, url: &str) -> anyhow::Result<(SessionFigures, u64)> {
    let text = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("the agent's metrics at {url} did not answer"))?
        .text()
        .await?;
    let get = |name: &str| {
        sample(&text, name).with_context(|| format!("the agent's metrics lack {name}"))
    };
    Ok((
        SessionFigures {
            connected: get("surplus_agent_session_connected")?,
            opened: get("surplus_agent_sessions_opened_total")?,
            reconnects: get("surplus_agent_reconnects_total")?,
            heartbeats: get("surplus_agent_heartbeats_total")?,
        },
        text.len() as u64,
    ))
}

/// Fails unless the agent was online at this scrape and has had one session only.
fn check_online(at: Duration, f: &SessionFigures) -> anyhow::Result<()> {
    if f.connected != 1.0 || f.opened != 1.0 || f.reconnects != 0.0 {
        bail!(
            "the agent did not stay online through the idle window: {:.0} s in, \
             surplus_agent_session_connected = {}, sessions opened = {}, reconnects = {} \
             (want 1, 1, 0). An agent that reconnects does less work than one that \
             reports, so the figures of this run would flatter it",
            at.as_secs_f64(),
            f.connected,
            f.opened,
            f.reconnects
        );
    }
    Ok(())
}

fn has_symtab(path: &Path) -> bool {
    std::process::Command::new("readelf")
        .args(["-S", "-W"])
        .arg(path)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(".symtab"))
        .unwrap_or(false)
}

struct Killed(tokio::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Runs the comparison.
pub async fn run(o: FootprintOptions) -> anyhow::Result<FootprintReport> {
    for (what, p) in [
        ("surplus-agent", &o.agent_bin),
        ("node_exporter", &o.node_exporter_bin),
    ] {
        if !p.exists() {
            bail!(
                "{what} not found at {} (node_exporter: `apt-get install prometheus-node-exporter`)",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(&o.dir)?;
    let ctl = ControllerProcess::start(&o.controller_bin, &o.dir, &[], None).await?;
    let result = measure(&o, &ctl).await;
    let _ = ctl.stop().await;
    result.map_err(|e| {
        // The working directory is usually temporary: say what the agent logged.
        let log = std::fs::read_to_string(o.dir.join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            e
        } else {
            anyhow::anyhow!("{e:#}\n\nthe agent's last log lines:\n{tail}")
        }
    })
}

async fn measure(o: &FootprintOptions, ctl: &ControllerProcess) -> anyhow::Result<FootprintReport> {
    let http = reqwest::Client::new();
    let api = Api {
        http: http.clone(),
        url: ctl.url.clone(),
        token: ctl.admin_token.clone(),
    };
    let (status, created) = api
        .call(reqwest::Method::POST, "/v1/tokens", Some(json!({})))
        .await?;
    if status != 201 {
        bail!("token refused: {status} {created}");
    }
    let token = created["token"].as_str().context("no token")?;
    let agent_dir = o.dir.join("agent");
    let out = tokio::process::Command::new(&o.agent_bin)
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", token])
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "surplus-agent enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agent_log = std::fs::File::create(o.dir.join("agent.log"))?;
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let agent = Killed(
        tokio::process::Command::new(&o.agent_bin)
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("run")
            .env(
                "SURPLUS_AGENT_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .stdout(Stdio::null())
            .stderr(agent_log)
            .kill_on_drop(true)
            .spawn()?,
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let exporter = Killed(
        tokio::process::Command::new(&o.node_exporter_bin)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?,
    );
    let agent_pid = agent.0.id().context("agent exited")?;
    let exporter_pid = exporter.0.id().context("node_exporter exited")?;

    // Both settle (the agent's first inventory and connection) before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut samplers = [Sampler::new(agent_pid)?, Sampler::new(exporter_pid)?];
    let scrape_url = format!("http://127.0.0.1:{port}/metrics");
    let agent_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let mut report = FootprintReport {
        scrape_seconds: o.scrape.as_secs_f64(),
        ..FootprintReport::default()
    };
    let (first, _) = scrape_agent(&http, &agent_url).await?;
    check_online(Duration::ZERO, &first)?;
    let started = Instant::now();
    let mut next_scrape = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < o.duration {
        tick.tick().await;
        if Instant::now() >= next_scrape {
            next_scrape += o.scrape;
            let body = http.get(&scrape_url).send().await?.bytes().await?;
            report.scrapes += 1;
            report.scrape_bytes = body.len() as u64;
            let (figures, bytes) = scrape_agent(&http, &agent_url).await?;
            check_online(started.elapsed(), &figures)?;
            report.agent_online.connected_scrapes += 1;
            report.agent_scrape_bytes = bytes;
        }
        for s in &mut samplers {
            s.sample().context("a measured process exited")?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    // The window's end counts too: a session lost after the last scrape shows here.
    let (end, _) = scrape_agent(&http, &agent_url).await?;
    check_online(started.elapsed(), &end)?;
    report.agent_online.sessions_opened = end.opened as u64;
    report.agent_online.reconnects = end.reconnects as u64;
    report.agent_online.heartbeats = (end.heartbeats - first.heartbeats) as u64;
    // Heartbeats every 10 s by default: an agent that reported all along acknowledged
    // most of them (one missing at each end of the window at most).
    let expected = (report.seconds / 10.0).floor() as u64;
    if report.agent_online.heartbeats + 2 < expected {
        bail!(
            "the agent stayed connected but acknowledged {} heartbeats in {:.0} s (about {} \
             expected at its default period): it was not reporting",
            report.agent_online.heartbeats,
            report.seconds,
            expected
        );
    }
    let figures = |s: &Sampler, bin: &Path| -> ProcessFootprint {
        let last = s.last();
        let n = s.samples.len().max(1) as f64;
        ProcessFootprint {
            binary_bytes: std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0),
            binary_has_symbols: has_symtab(bin),
            cpu_seconds: s.mean_cpu_percent() / 100.0 * report.seconds,
            cpu_percent: s.mean_cpu_percent(),
            rss_mean_mib: s.samples.iter().map(|x| x.rss_mib).sum::<f64>() / n,
            rss_end_mib: last.rss_bytes as f64 / 1048576.0,
            rss_peak_mib: last.peak_rss_bytes as f64 / 1048576.0,
            threads: last.threads,
        }
    };
    report.agent = figures(&samplers[0], &o.agent_bin);
    report.node_exporter = figures(&samplers[1], &o.node_exporter_bin);
    drop(exporter);

    if o.validation {
        let identity = surplus_agent::identity::Identity::load(&agent_dir)?;
        let started = Instant::now();
        let (status, run) = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/agents/{}/validation", identity.agent_id),
                Some(json!({})),
            )
            .await?;
        if status != 202 {
            bail!("validation not ordered: {status} {run}");
        }
        let run_id = run["id"]
            .as_str()
            .or(run["run"]["id"].as_str())
            .context("no run id")?
            .to_owned();
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (_, v) = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/validations/{run_id}"),
                    None,
                )
                .await?;
            let status = v["status"]
                .as_str()
                .or(v["run"]["status"].as_str())
                .unwrap_or("running")
                .to_owned();
            if status != "running" {
                if status != "succeeded" {
                    bail!("the validation run ended {status}: {v}");
                }
                break;
            }
            if started.elapsed() > Duration::from_secs(900) {
                bail!("the validation run did not finish within 15 minutes");
            }
        }
        report.validation_seconds = Some(started.elapsed().as_secs_f64());
        report.agent_peak_rss_validation_mib =
            Some(proc::read(agent_pid)?.peak_rss_bytes as f64 / 1048576.0);
    }
    drop(agent);
    Ok(report)
}

/// The comparison as a table.
pub fn table(r: &FootprintReport) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec!["", "surplus-agent", "node_exporter"]);
    let (a, n) = (&r.agent, &r.node_exporter);
    let row = |k: &str, f: &dyn Fn(&ProcessFootprint) -> String| vec![k.to_owned(), f(a), f(n)];
    t.add_row(row("binary", &|p| {
        format!(
            "{:.1} MiB{}",
            p.binary_bytes as f64 / 1048576.0,
            if p.binary_has_symbols {
                " (not stripped)"
            } else {
                " (stripped)"
            }
        )
    }));
    t.add_row(row("idle CPU", &|p| {
        format!(
            "{:.3}% of a core ({:.2} s in {:.0} s)",
            p.cpu_percent, p.cpu_seconds, r.seconds
        )
    }));
    t.add_row(row("RSS mean / end", &|p| {
        format!("{:.1} / {:.1} MiB", p.rss_mean_mib, p.rss_end_mib)
    }));
    t.add_row(row("RSS peak (idle)", &|p| {
        format!("{:.1} MiB", p.rss_peak_mib)
    }));
    t.add_row(row("threads", &|p| p.threads.to_string()));
    t.add_row(vec![
        "scraped".to_owned(),
        format!(
            "{} times every {} s, {} bytes each (its own metrics)",
            r.agent_online.connected_scrapes, r.scrape_seconds, r.agent_scrape_bytes
        ),
        format!(
            "{} times every {} s, {} bytes each",
            r.scrapes, r.scrape_seconds, r.scrape_bytes
        ),
    ]);
    t.add_row(vec![
        "online".to_owned(),
        format!(
            "connected at every scrape, {} session, {} reconnects, {} heartbeats",
            r.agent_online.sessions_opened, r.agent_online.reconnects, r.agent_online.heartbeats
        ),
        String::new(),
    ]);
    if let (Some(peak), Some(secs)) = (r.agent_peak_rss_validation_mib, r.validation_seconds) {
        t.add_row(vec![
            "peak RSS, validation suite".to_owned(),
            format!("{peak:.1} MiB ({secs:.0} s suite)"),
            String::new(),
        ]);
    }
    t.to_string()
}
