//! `surplus-agent`: enroll this host, run the agent, or show what it reports.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use surplus_agent::inventory::InventoryCollector;
use surplus_agent::{AgentConfig, LogFormat, Runner};
use surplus_protocol::clock;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "surplus-agent", version, about = "Surplus host agent")]
struct Cli {
    /// Configuration file (TOML); `SURPLUS_AGENT_*` variables override it.
    #[arg(long, short, global = true, env = "SURPLUS_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides the configuration).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Log format (overrides the configuration).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Take capacity on this host back for your own customers (the host's provider):
    /// reservations that allow it are given notice, and their instances stop when the
    /// grace ends. Asks the agent running here, over its session.
    Reclaim {
        /// How many of this host's reservations (default: every one that allows it).
        #[arg(long, conflicts_with = "instance")]
        count: Option<u32>,
        /// The reservation whose holder runs this instance here.
        #[arg(long)]
        instance: Option<String>,
    },
    /// Enroll this host with a one-time join token.
    Enroll {
        /// The join token (`surplus tokens create` or `surplus-controller token create`).
        #[arg(long, env = "SURPLUS_JOIN_TOKEN")]
        token: String,
    },
    /// Connect to the controller and report until stopped (Ctrl-C or SIGTERM).
    Run,
    /// Print the inventory this agent reports.
    Inventory {
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Run the benchmark suite and print what the controller would see.
    Bench {
        /// Time budget for the whole suite, such as 60s.
        #[arg(long, default_value = "60s")]
        budget: humantime::Duration,
        /// Directory for the storage test's scratch file (deleted afterwards).
        #[arg(long, default_value = "/var/tmp")]
        scratch_dir: PathBuf,
        /// Size of the scratch file, MiB.
        #[arg(long, default_value_t = 256)]
        storage_mib: u64,
        /// Timed repetitions of each measurement.
        #[arg(long, default_value_t = 5)]
        repetitions: u32,
        /// Small sizes: a smoke test, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the compatibility kit against the configured control driver: one scenario
    /// per operation of the primary control interface (exit status 1 unless fully
    /// compatible).
    Compat {
        /// Send the results to the controller (opens a short session with this agent's
        /// identity; a running agent's session reconnects right after).
        #[arg(long)]
        report: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the security checks and print the report (exit status 0 whatever it finds).
    Security {
        /// Check the host tree under this directory instead of the running host.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the benchmark suite on a blocking thread with a progress bar; Ctrl-C cancels.
async fn run_bench(
    plan: surplus_protocol::bench::BenchPlan,
) -> anyhow::Result<surplus_protocol::bench::BenchReport> {
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        surplus_agent::runtime::shutdown_signal().await;
        on_signal.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let report = tokio::task::spawn_blocking(move || {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
                .expect("static template"),
        );
        let report = surplus_agent::bench::run(
            &plan,
            surplus_agent::inventory::last_level_cache_bytes(),
            &cancel,
            |p| {
                bar.set_length(u64::from(p.total));
                bar.set_position(u64::from(p.done));
                bar.set_message(p.step);
            },
        );
        bar.finish_and_clear();
        report
    })
    .await?;
    if report.cancelled {
        eprintln!("cancelled: the figures below are incomplete");
    }
    Ok(report)
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let mut config =
        AgentConfig::load(cli.config.as_deref()).context("reading agent configuration")?;
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(format) = cli.log_format {
        config.log_format = format;
    }
    surplus_agent::runtime::init_logs(config.log_format, &config.log_filter);
    let clock = clock::system();
    match cli.command {
        Command::Enroll { token } => {
            let identity = surplus_agent::enroll::enroll(&token, &config, clock.now_ms()).await?;
            println!("enrolled as agent {}", identity.agent_id);
            println!(
                "identity written to {}",
                surplus_agent::Identity::path(&config.data_dir).display()
            );
            println!(
                "start reporting with: surplus-agent run --data-dir {}",
                config.data_dir.display()
            );
        }
        Command::Run => {
            let runner = Runner::new(config, clock)?;
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            tokio::spawn(async move {
                surplus_agent::runtime::shutdown_signal().await;
                tracing::info!("stopping");
                on_signal.cancel();
            });
            runner.run(cancel).await?;
        }
        Command::Bench {
            budget,
            scratch_dir,
            storage_mib,
            repetitions,
            quick,
            json,
        } => {
            let plan = surplus_protocol::bench::BenchPlan {
                budget_ms: Duration::from(budget).as_millis() as u64,
                scratch_dir: scratch_dir.display().to_string(),
                storage_bytes: storage_mib << 20,
                repetitions,
                quick,
            };
            let report = run_bench(plan).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{:<20} {:>14} {:<8} {:>7} {:>7}  note",
                    "benchmark", "value", "unit", "cv", "score"
                );
                for r in &report.results {
                    let score = if r.score > 0.0 {
                        format!("{:.2}", r.score)
                    } else {
                        "-".into()
                    };
                    println!(
                        "{:<20} {:>14.1} {:<8} {:>6.1}% {:>7}  {}",
                        r.id,
                        r.value,
                        r.unit,
                        r.cv * 100.0,
                        score,
                        r.note.as_deref().unwrap_or("")
                    );
                }
                let levels: Vec<String> = report
                    .cache_levels_bytes
                    .iter()
                    .map(|b| format!("{} KiB", b >> 10))
                    .collect();
                println!(
                    "cache levels (from latency): {}",
                    if levels.is_empty() {
                        "-".into()
                    } else {
                        levels.join(", ")
                    }
                );
                for s in &report.skipped {
                    println!("skipped: {s}");
                }
                println!(
                    "composite score {:.2} in {:.1} s",
                    report.composite_score,
                    report.duration_ms as f64 / 1000.0
                );
            }
        }
        Command::Compat { report, json } => {
            let driver = surplus_agent::control::open_driver(&config.control, &config.data_dir)
                .await
                .context("the configured control driver cannot start")?;
            // The suite keeps its own book, so it never touches the agent's instances.
            let book = tempfile_dir(&config.data_dir)?;
            let plane = surplus_agent::control::ControlPlane::open(
                driver,
                book.clone(),
                clock.clone(),
                &config.control,
            )
            .await?;
            let profile = surplus_agent::control::compat_profile(&config.control);
            let result = tokio::time::timeout(
                surplus_agent::compat::SUITE_BUDGET,
                surplus_agent::compat::run_suite(&plane, &profile, clock.now_ms()),
            )
            .await;
            let _ = std::fs::remove_dir_all(&book);
            let result = result.context("the compatibility kit did not finish within 5 minutes")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                for c in &result.checks {
                    println!(
                        "{:<5} {:<14} {}",
                        if c.passed { "pass" } else { "FAIL" },
                        c.operation,
                        c.message.as_deref().unwrap_or("")
                    );
                }
                println!("\n{} driver: {:?} compatible", result.driver, result.level);
            }
            let fully = result.level == surplus_protocol::control::CompatLevel::Fully;
            if report {
                let identity = surplus_agent::Identity::load(&config.data_dir)?;
                let session = surplus_agent::Session::open_with(
                    None,
                    &config,
                    &identity,
                    Some(result.isolation.clone()),
                )
                .await?;
                let ack = session.report_compat(result).await;
                session.close("compat report sent").await;
                println!("reported to the controller as agent {}", ack?.agent_id);
            }
            if !fully {
                anyhow::bail!("the driver is not fully compatible");
            }
        }
        Command::Reclaim { count, instance } => {
            let socket = config.data_dir.join(surplus_agent::local::SOCKET_FILE);
            let request = surplus_agent::local::LocalRequest::Reclaim(
                surplus_protocol::messages::ReclaimRequest { count, instance },
            );
            let answer = surplus_agent::local::ask(&socket, &request)
                .await
                .with_context(|| {
                    format!(
                        "asking the agent at {} (is `surplus-agent run` running here?)",
                        socket.display()
                    )
                })?;
            match answer {
                Ok(taken) if taken.is_empty() => {
                    println!("nothing taken: no reservation on this host allows it")
                }
                Ok(taken) => {
                    for t in taken {
                        println!(
                            "reservation {} given notice: its instances stop at {} (Unix ms)",
                            t.reservation, t.deadline_ms
                        );
                    }
                }
                Err(why) => anyhow::bail!("the controller refused: {why}"),
            }
        }
        Command::Security { root, json } => {
            let host = surplus_agent::security::HostRoot::new(&root, Some(&config.data_dir));
            let report =
                tokio::task::spawn_blocking(move || surplus_agent::security::run(&host)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for f in &report.findings {
                    let status = match f.status {
                        surplus_protocol::security::CheckStatus::Pass => "pass",
                        surplus_protocol::security::CheckStatus::Fail => "FAIL",
                        surplus_protocol::security::CheckStatus::NotApplicable => "n/a",
                    };
                    println!(
                        "{status:<5} {:<9} {:<30} {}",
                        format!("{:?}", f.severity).to_lowercase(),
                        f.id,
                        f.evidence
                    );
                    if f.status == surplus_protocol::security::CheckStatus::Fail {
                        println!("{:46}fix: {}", "", f.remediation);
                    }
                }
                let scope = if report.live {
                    "this host".to_owned()
                } else {
                    format!("the tree under {}", report.root)
                };
                println!(
                    "\nhardening index {} / 100 ({}) for {scope}",
                    report.hardening_index, report.band
                );
            }
        }
        Command::Inventory { json } => {
            let interval = config.package_scan_interval;
            let now = clock.now_ms();
            let inv =
                tokio::task::spawn_blocking(move || InventoryCollector::new(interval).collect(now))
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inv)?);
            } else {
                println!("host        {}", inv.hostname.as_deref().unwrap_or("-"));
                println!(
                    "os          {} {} (kernel {})",
                    inv.os.name.as_deref().unwrap_or("-"),
                    inv.os.version.as_deref().unwrap_or(""),
                    inv.os.kernel.as_deref().unwrap_or("-")
                );
                println!(
                    "cpu         {} x {} ({} logical)",
                    inv.cpu.sockets.unwrap_or(1),
                    inv.cpu.brand.as_deref().unwrap_or("unknown"),
                    inv.cpu.logical_cpus
                );
                println!(
                    "memory      {:.1} GiB",
                    inv.memory.total_bytes as f64 / (1u64 << 30) as f64
                );
                println!(
                    "disks       {}",
                    inv.disks
                        .iter()
                        .map(|d| d.device.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!(
                    "nics        {}",
                    inv.nics
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("gpus        {}", inv.gpus.len());
                println!(
                    "virtual     {}",
                    inv.virtualization
                        .hypervisor
                        .as_deref()
                        .or(inv.virtualization.container.as_deref())
                        .unwrap_or("none detected")
                );
            }
        }
    }
    Ok(())
}

/// A fresh directory for the compatibility kit's own records.
fn tempfile_dir(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join(format!("compat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        surplus_agent::runtime::end_quietly_on_closed_pipe();
    }
    surplus_agent::runtime::exit_code(main_inner(cli).await)
}
