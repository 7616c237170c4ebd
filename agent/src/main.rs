//! `surplus-agent`: enroll this host, run the agent, or show what it reports.

use std::path::PathBuf;
use std::process::ExitCode;

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

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
