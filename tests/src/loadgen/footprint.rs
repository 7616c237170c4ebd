//! The agent's footprint next to Prometheus node_exporter on the same host, in one
//! run: both started at once and left idle (the agent connected to a real controller,
//! heartbeating and metering at its defaults; node_exporter scraped every 15 s), their
//! CPU and resident memory read from `/proc`; then the agent runs the full validation
//! suite and its peak RSS is read. `surplus-loadgen footprint` is the command.

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
    /// node_exporter scrape period.
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
    /// node_exporter scrape period, seconds.
    pub scrape_seconds: f64,
    /// Scrapes made, and bytes of the last one.
    pub scrapes: u64,
    /// Size of the last scrape, bytes.
    pub scrape_bytes: u64,
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
    result
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
    let agent = Killed(
        tokio::process::Command::new(&o.agent_bin)
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("run")
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
    let mut report = FootprintReport {
        scrape_seconds: o.scrape.as_secs_f64(),
        ..FootprintReport::default()
    };
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
        }
        for s in &mut samplers {
            s.sample().context("a measured process exited")?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
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
        "(no scrape; heartbeats and metering)".to_owned(),
        format!(
            "{} times every {} s, {} bytes each",
            r.scrapes, r.scrape_seconds, r.scrape_bytes
        ),
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
