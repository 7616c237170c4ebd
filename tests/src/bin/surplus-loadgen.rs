//! `surplus-loadgen`: measures one controller under many simulated agents, and one
//! agent's footprint against Prometheus node_exporter. See docs/PERFORMANCE.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use surplus_tests::loadgen::{self, Options, sim::Behaviour};

#[derive(Parser)]
#[command(
    name = "surplus-loadgen",
    version,
    about = "Load and footprint measurements of Surplus"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Simulated agents against a real controller process on loopback.
    Agents(AgentsArgs),
    /// surplus-agent (its own metrics endpoint on) and Prometheus node_exporter side
    /// by side, both scraped: idle CPU and RSS, binary size, and the agent's peak RSS
    /// during the validation suite. Fails unless the agent stays online through the
    /// whole idle window.
    Footprint(FootprintArgs),
}

#[derive(clap::Args)]
struct FootprintArgs {
    /// Idle phase.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Scrape period of node_exporter and of the agent's metrics.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    scrape: Duration,
    /// Skip the validation suite at the end.
    #[arg(long)]
    no_validation: bool,
    /// The agent binary (default: `surplus-agent` beside this one).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The controller binary (default: `surplus-controller` beside this one).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// node_exporter (Debian package `prometheus-node-exporter`).
    #[arg(long, default_value = "/usr/bin/prometheus-node-exporter")]
    node_exporter_bin: PathBuf,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct AgentsArgs {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Steady phase after every agent connected (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Heartbeat period the controller asks agents to keep.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Usage period of the simulated agents.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    usage_period: Duration,
    /// Usage records per period and agent.
    #[arg(long, default_value_t = 20)]
    usage_records: usize,
    /// Every n-th usage batch is sent twice, as if its acknowledgement was lost (0: never).
    #[arg(long, default_value_t = 5)]
    resend_every: u64,
    /// Control commands per second through the API during the steady phase.
    #[arg(long, default_value_t = 20.0)]
    control_rate: f64,
    /// Time a simulated agent takes to answer a control command.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    control_delay: Duration,
    /// Enrollments and first connections in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Simulated agents per client UDP socket.
    #[arg(long, default_value_t = 250)]
    agents_per_socket: usize,
    /// The controller binary (default: `surplus-controller` beside this one).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Directory for the controller's data and log (default: a temporary one, removed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// More controller settings, `SURPLUS_CONTROLLER_<FIELD>=<value>` (repeatable).
    #[arg(long = "controller-env", value_name = "KEY=VALUE")]
    controller_env: Vec<String>,
    /// Also write the report as JSON to this file (`-`: standard output, no table).
    #[arg(long)]
    json: Option<PathBuf>,
    /// The controller's database: `sqlite` (embedded) or `postgres` (a durable server
    /// of its own, started here from Debian's `postgresql` package and sampled
    /// beside the controller).
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "postgres"])]
    database: String,
}

fn beside_me(name: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.parent()?.join(name);
    p.exists().then_some(p)
}

fn binary(given: Option<PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    given.or_else(|| beside_me(name)).ok_or_else(|| {
        anyhow::anyhow!(
            "{name} not found beside surplus-loadgen; build it (cargo build --release) or pass --{}-bin",
            name.trim_start_matches("surplus-")
        )
    })
}

async fn footprint(a: FootprintArgs) -> anyhow::Result<ExitCode> {
    let temp = tempfile::tempdir()?;
    let report = loadgen::footprint::run(loadgen::footprint::FootprintOptions {
        agent_bin: binary(a.agent_bin, "surplus-agent")?,
        controller_bin: binary(a.controller_bin, "surplus-controller")?,
        node_exporter_bin: a.node_exporter_bin,
        dir: temp.path().to_owned(),
        duration: a.duration,
        scrape: a.scrape,
        validation: !a.no_validation,
    })
    .await?;
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    println!("{}", loadgen::footprint::table(&report));
    Ok(ExitCode::SUCCESS)
}

async fn agents(a: AgentsArgs) -> anyhow::Result<ExitCode> {
    let controller_bin = binary(a.controller_bin, "surplus-controller")?;
    let mut controller_env = Vec::new();
    for kv in &a.controller_env {
        let Some((k, v)) = kv.split_once('=') else {
            anyhow::bail!("--controller-env {kv:?}: expected KEY=VALUE");
        };
        if !k.starts_with("SURPLUS_CONTROLLER_") {
            anyhow::bail!("--controller-env {k}: only SURPLUS_CONTROLLER_* settings");
        }
        controller_env.push((k.to_owned(), v.to_owned()));
    }
    if a.agents == 0 {
        anyhow::bail!("--agents must be at least 1");
    }
    let temp = tempfile::tempdir()?;
    let dir = a.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    // Durable like the embedded SQLite (`synchronous=FULL`), with room for the
    // controller's pool.
    let server = (a.database == "postgres").then(|| {
        surplus_tests::postgres::Server::start(&[
            "fsync=on",
            "synchronous_commit=on",
            "max_connections=300",
        ])
    });
    let postgres = match &server {
        Some(s) => Some((
            s.fresh_database().await,
            s.pid().context("the PostgreSQL server has no process")?,
        )),
        None => None,
    };
    let report = loadgen::run(Options {
        controller_bin,
        dir,
        agents: a.agents,
        duration: a.duration,
        heartbeat: a.heartbeat,
        behaviour: Behaviour {
            usage_period: a.usage_period,
            usage_records: a.usage_records,
            resend_every: a.resend_every,
            control_delay: a.control_delay,
        },
        control_rate: a.control_rate,
        concurrency: a.concurrency,
        agents_per_socket: a.agents_per_socket,
        controller_env,
        postgres,
    })
    .await;
    if let Some(s) = &server {
        s.stop();
    }
    let report = report?;
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => println!("{json}"),
        Some(p) => {
            std::fs::write(p, &json)?;
            println!("{}", loadgen::table(&report));
        }
        None => println!("{}", loadgen::table(&report)),
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "surplus-loadgen: {} problem(s): {}",
            report.problems.len(),
            report.problems.join("; ")
        );
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("surplus-loadgen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Agents(a) => agents(a).await,
            Cmd::Footprint(a) => footprint(a).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("surplus-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}
