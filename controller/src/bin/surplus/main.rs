//! `surplus`: the client CLI over the controller's HTTP API.
//!
//! The controller URL and API token come from flags, then `SURPLUS_CONTROLLER` /
//! `SURPLUS_TOKEN`, then `~/.config/surplus/cli.toml` (`controller = "..."`,
//! `token = "..."`); a bare `host:port` means `http://host:port`. Tables for people,
//! `--json` for scripts.

mod agents;
mod billing;
mod brokerage;
mod buy;
mod client;
mod control;
mod ledger;
mod market;
mod pools;
mod resell;
mod validation;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use client::Client;

#[derive(Parser)]
#[command(name = "surplus", version, about = "Surplus client")]
struct Cli {
    /// Controller HTTP API base URL (`host:port` alone means `http://host:port`).
    #[arg(long, global = true, env = "SURPLUS_CONTROLLER")]
    controller: Option<String>,
    /// API bearer token.
    #[arg(long, global = true, env = "SURPLUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CLI configuration file.
    #[arg(long, global = true, env = "SURPLUS_CONFIG")]
    config: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for an `https://` controller URL, on top of
    /// the system's (for a TLS proxy with an internal CA).
    #[arg(long, global = true, env = "SURPLUS_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Every verb, each capability's from its own module.
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Agents(agents::Command),
    #[command(flatten)]
    Validation(validation::Command),
    #[command(flatten)]
    Control(control::Command),
    #[command(flatten)]
    Billing(billing::Command),
    #[command(flatten)]
    Ledger(ledger::Command),
    #[command(flatten)]
    Resell(resell::Command),
    #[command(flatten)]
    Market(market::Command),
    #[command(flatten)]
    Buy(buy::Command),
    /// Private pools: make and run your own (pool owner), or bid in one (member).
    Pools {
        #[command(subcommand)]
        command: pools::Command,
    },
    /// Subscribers' short-term limits per resource and period (admin).
    Subscriptions {
        #[command(subcommand)]
        command: brokerage::SubscriptionCommand,
    },
    /// Brokerage of unused subscriptions: margins across users and clouds (admin).
    Brokerage {
        #[command(subcommand)]
        command: brokerage::BrokerageCommand,
    },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    controller: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let config_path = cli.config.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/surplus/cli.toml"))
    });
    let file: FileConfig = match config_path {
        Some(p) if p.exists() => toml::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("reading {}", p.display()))?,
        _ => FileConfig::default(),
    };
    let base = client::base_url(
        &cli.controller
            .or(file.controller)
            .unwrap_or_else(|| "http://127.0.0.1:7080".into()),
    );
    let token = cli
        .token
        .or(file.token)
        .context("no API token: pass --token, set SURPLUS_TOKEN, or put token = \"...\" in ~/.config/surplus/cli.toml")?;
    let mut http = reqwest::Client::builder();
    if let Some(path) = cli.ca_cert.or(file.ca_cert) {
        let pem = std::fs::read(&path)
            .with_context(|| format!("reading CA certificate {}", path.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        http = http.add_root_certificate(ca);
    }
    let client = Client {
        http: http.build().context("building the HTTP client")?,
        base,
        token,
    };
    match cli.command {
        Command::Agents(c) => agents::run(&client, cli.json, c).await,
        Command::Validation(c) => validation::run(&client, cli.json, c).await,
        Command::Control(c) => control::run(&client, cli.json, c).await,
        Command::Billing(c) => billing::run(&client, cli.json, c).await,
        Command::Ledger(c) => ledger::run(&client, cli.json, c).await,
        Command::Resell(c) => resell::run(&client, cli.json, c).await,
        Command::Market(c) => market::run(&client, cli.json, c).await,
        Command::Buy(c) => buy::run(&client, cli.json, c).await,
        Command::Pools { command } => pools::run(&client, cli.json, command).await,
        Command::Subscriptions { command } => {
            brokerage::subscriptions(&client, cli.json, command).await
        }
        Command::Brokerage { command } => brokerage::brokerage(&client, cli.json, command).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    surplus_runtime::end_quietly_on_closed_pipe();
    surplus_runtime::exit_code(main_inner(Cli::parse()).await)
}

#[cfg(test)]
mod tests {
    /// clap's own checks of the whole command line (names, conflicts, requirements),
    /// which otherwise run only when a verb is used.
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
