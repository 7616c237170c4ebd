//! `surplus`: the client CLI over the controller's HTTP API.
//!
//! The controller URL and API token come from flags, then `SURPLUS_CONTROLLER` /
//! `SURPLUS_TOKEN`, then `~/.config/surplus/cli.toml` (`controller = "..."`,
//! `token = "..."`); a bare `host:port` means `http://host:port`. Tables for people,
//! `--json` for scripts.

#[path = "surplus/billing_cli.rs"]
mod billing_cli;
#[path = "surplus/control_cli.rs"]
mod control_cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::de::DeserializeOwned;
use serde_json::json;
use surplus_controller::agents::CreatedToken;
use surplus_controller::api::{AgentDetail, AgentView, CreateTokenRequest, ErrorBody};
use surplus_controller::http::RunView;
use surplus_controller::store::RunStatus;
use surplus_controller::validation::ValidationOptions;

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

#[derive(Subcommand)]
enum Command {
    /// Registered agents.
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Join tokens.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Run validation tests (benchmarks, security checks) on an agent and show the result.
    Validate {
        /// Agent id.
        agent: String,
        /// Run the benchmark suite (default: both, when neither is named).
        #[arg(long)]
        bench: bool,
        /// Run the security checks.
        #[arg(long)]
        security: bool,
        /// Small benchmark sizes: a smoke test, not a measurement.
        #[arg(long)]
        quick: bool,
        /// Benchmark time budget.
        #[arg(long, default_value = "60s")]
        budget: String,
        /// Timed repetitions of each measurement.
        #[arg(long, default_value_t = 5)]
        repetitions: u32,
        /// Order the run and print its id without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Validation runs.
    Validations {
        #[command(subcommand)]
        command: ValidationsCommand,
    },
    /// Run an instance (RunInstances): `surplus run --cpus 0.5 --memory 64MiB -- /bin/sleep 600`.
    Run(control_cli::RunArgs),
    /// Start stopped instances.
    Start {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Stop instances (SIGTERM, then SIGKILL after the agent's grace period).
    Stop {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Restart running instances.
    Reboot {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Terminate instances: stop them and remove what the host holds for them.
    Terminate {
        /// Instance ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Describe instances (DescribeInstances, or DescribeInstanceStatus with --status).
    Describe(control_cli::DescribeArgs),
    /// The end of an instance's output: its standard output, then its standard error
    /// (on stderr).
    Logs {
        /// Instance id.
        id: String,
        /// Most bytes of each stream, from the end.
        #[arg(long, default_value_t = 65536)]
        max_bytes: u32,
    },
    /// Change an instance's limits or labels (ModifyInstanceAttribute); only what is
    /// given changes: `surplus modify i-... --cpus 0.5 --label team=red`.
    Modify(control_cli::ModifyArgs),
    /// Volumes and snapshots.
    Volumes {
        #[command(subcommand)]
        command: control_cli::VolumesCommand,
    },
    /// Usage history by hour or day.
    Usage(billing_cli::UsageArgs),
    /// Invoices: one per client and period across providers.
    Invoices {
        #[command(subcommand)]
        command: billing_cli::InvoicesCommand,
    },
    /// A provider's statement: charges, commission, payouts, balance.
    Statements {
        /// Provider account (admins; providers get their own).
        #[arg(long)]
        provider: Option<String>,
    },
    /// Ledger balances and account policies.
    Ledger {
        #[command(subcommand)]
        command: billing_cli::LedgerCommand,
    },
    /// Rate and post a period's usage (admin): `--from-ms`/`--to-ms` on whole hours.
    Bill {
        /// Period start, ms since the epoch.
        #[arg(long)]
        from_ms: i64,
        /// Period end (exclusive).
        #[arg(long)]
        to_ms: i64,
    },
    /// Record a client's payment (admin).
    Pay(billing_cli::MoneyArgs),
    /// Record a payout to a provider (admin).
    Payout(billing_cli::MoneyArgs),
    /// Set an agent's sampling periods: `surplus metering <agent> --instance 30s`.
    Metering {
        /// Agent id.
        agent: String,
        /// Instance meters' period.
        #[arg(long)]
        instance: Option<String>,
        /// Host meters' period.
        #[arg(long)]
        host: Option<String>,
        /// Subscription meters' period.
        #[arg(long)]
        subscription: Option<String>,
    },
    /// Set the rate card of instances run on an agent from now on (a JSON price plan:
    /// `{"currency":"EUR","per_instance_hour":12}`).
    PricePlan {
        /// Agent id.
        agent: String,
        /// The plan, as JSON.
        plan: String,
    },
    /// API tokens for accounts (admin).
    ApiTokens {
        #[command(subcommand)]
        command: ApiTokensCommand,
    },
}

#[derive(Subcommand)]
enum ApiTokensCommand {
    /// Create an API token for an account; it is printed once.
    Create {
        /// Account name.
        #[arg(long)]
        account: String,
        /// client, provider, pool_owner or admin.
        #[arg(long, default_value = "client")]
        role: String,
    },
}

#[derive(Subcommand)]
enum ValidationsCommand {
    /// Runs of an agent, newest first.
    List {
        /// Agent id.
        agent: String,
    },
    /// One run with its results.
    Show {
        /// Run id.
        run: String,
    },
    /// Stop a running run.
    Cancel {
        /// Run id.
        run: String,
    },
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// List agents.
    List,
    /// Show one agent with its inventory and sessions.
    Show {
        /// Agent id.
        id: String,
    },
    /// Revoke an agent: its session is closed and it cannot reconnect.
    Revoke {
        /// Agent id.
        id: String,
    },
    /// Measure the round trip controller → agent → controller.
    Ping {
        /// Agent id.
        id: String,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a one-time join token.
    Create {
        /// Lifetime such as 30m or 2h (default: the controller's).
        #[arg(long)]
        ttl: Option<String>,
        /// Label for the agent that enrolls, key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    controller: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{}", self.base.trim_end_matches('/'), path);
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.map_err(|e| {
            // reqwest's own message hides the cause (refused, TLS, DNS): show the chain.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            anyhow::anyhow!("cannot reach the controller at {}: {why}", self.base)
        })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .context("reading the controller's answer")?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .with_context(|| format!("unexpected answer from {url}"));
        }
        let detail = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|e| format!("{} ({})", e.message, e.error))
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("the controller refused the API token: {detail}");
        }
        bail!("{status}: {detail}");
    }
}

fn when(ms: Option<i64>, now: i64) -> String {
    match ms {
        None => "never".into(),
        Some(t) if now >= t => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(((now - t) / 1000) as u64))
        ),
        Some(t) => format!(
            "in {}",
            humantime::format_duration(std::time::Duration::from_secs(((t - now) / 1000) as u64))
        ),
    }
}

fn agents_table(agents: &[AgentView]) -> Table {
    let now = surplus_protocol::clock::SystemClock.now();
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "ID",
        "HOST",
        "STATUS",
        "LAST SEEN",
        "UPTIME",
        "CPUS",
        "MEMORY",
        "LABELS",
    ]);
    for a in agents {
        table.add_row([
            a.id.to_string(),
            a.hostname.clone(),
            format!("{:?}", a.status).to_lowercase(),
            when(a.last_seen_ms, now),
            a.uptime_ratio
                .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
            a.cpus.map_or("-".into(), |c| c.to_string()),
            a.memory_bytes.map_or("-".into(), |m| {
                format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64)
            }),
            a.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    table
}

trait Now {
    fn now(&self) -> i64;
}

impl Now for surplus_protocol::clock::SystemClock {
    fn now(&self) -> i64 {
        surplus_protocol::clock::Clock::now_ms(self)
    }
}

/// Follows a run with a progress bar until it ends; Ctrl-C cancels the run.
async fn wait_for_run(client: &Client, run_id: uuid::Uuid, quiet: bool) -> anyhow::Result<RunView> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(1)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} ({elapsed})")
            .expect("static template"),
    );
    let mut cancelled = false;
    loop {
        let run: RunView = client
            .call(
                reqwest::Method::GET,
                &format!("/v1/validations/{run_id}"),
                None,
            )
            .await?;
        if run.run.status != RunStatus::Running {
            bar.finish_and_clear();
            return Ok(run);
        }
        if let Some(p) = &run.progress {
            bar.set_length(u64::from(p.total.max(1)));
            bar.set_position(u64::from(p.done));
            bar.set_message(p.step.clone());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = tokio::signal::ctrl_c(), if !cancelled => {
                cancelled = true;
                bar.set_message("cancelling");
                let _: serde_json::Value = client.call(reqwest::Method::POST, &format!("/v1/validations/{run_id}/cancel"), None).await?;
            }
        }
    }
}

fn show_run(run: &RunView) {
    let r = &run.run;
    println!(
        "validation run {} on agent {}: {}",
        r.id,
        r.agent_id,
        r.status.as_str()
    );
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
    if let Some(b) = &r.bench {
        println!(
            "{:<20} {:>14} {:<8} {:>7} {:>7}",
            "benchmark", "value", "unit", "cv", "score"
        );
        for x in b["results"].as_array().into_iter().flatten() {
            let score = x["score"]
                .as_f64()
                .filter(|s| *s > 0.0)
                .map_or("-".into(), |s| format!("{s:.2}"));
            println!(
                "{:<20} {:>14.1} {:<8} {:>6.1}% {:>7}",
                x["id"].as_str().unwrap_or("?"),
                x["value"].as_f64().unwrap_or(0.0),
                x["unit"].as_str().unwrap_or(""),
                x["cv"].as_f64().unwrap_or(0.0) * 100.0,
                score
            );
        }
        for s in b["skipped"].as_array().into_iter().flatten() {
            println!("skipped: {}", s.as_str().unwrap_or(""));
        }
        println!(
            "composite score {:.2}",
            b["composite_score"].as_f64().unwrap_or(0.0)
        );
    }
    if let Some(s) = &r.security {
        for f in s["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["status"] == "fail")
        {
            println!(
                "FAIL {:<9} {:<30} {}",
                f["severity"].as_str().unwrap_or(""),
                f["id"].as_str().unwrap_or(""),
                f["evidence"].as_str().unwrap_or("")
            );
        }
        println!(
            "hardening index {} / 100 ({})",
            s["hardening_index"].as_u64().unwrap_or(0),
            s["band"].as_str().unwrap_or("")
        );
    }
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce()) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("API values serialize")
        );
    } else {
        human();
    }
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
    let base = control_cli::base_url(
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
    let get = reqwest::Method::GET;
    let post = reqwest::Method::POST;
    match cli.command {
        Command::Agents {
            command: AgentsCommand::List,
        } => {
            let agents: Vec<AgentView> = client.call(get, "/v1/agents", None).await?;
            print(cli.json, &agents, || println!("{}", agents_table(&agents)));
        }
        Command::Agents {
            command: AgentsCommand::Show { id },
        } => {
            let detail: AgentDetail = client.call(get, &format!("/v1/agents/{id}"), None).await?;
            print(cli.json, &detail, || {
                println!("{}", agents_table(std::slice::from_ref(&detail.agent)));
                println!(
                    "certificate {} expires {}",
                    detail.agent.cert_serial,
                    when(
                        Some(detail.agent.cert_not_after_ms),
                        surplus_protocol::clock::SystemClock.now()
                    )
                );
                if let Some(inv) = &detail.inventory {
                    println!(
                        "inventory:\n{}",
                        serde_json::to_string_pretty(inv).expect("json")
                    );
                }
                println!("sessions (newest first):");
                for s in &detail.sessions {
                    println!(
                        "  {}  from {}  {}",
                        s.id,
                        s.remote_addr,
                        s.end_reason.as_deref().unwrap_or("open")
                    );
                }
                println!("inventory changes: {}", detail.inventory_history.len());
            });
        }
        Command::Agents {
            command: AgentsCommand::Revoke { id },
        } => {
            let agent: AgentView = client
                .call(post, &format!("/v1/agents/{id}/revoke"), None)
                .await?;
            print(cli.json, &agent, || println!("agent {} revoked", agent.id));
        }
        Command::Agents {
            command: AgentsCommand::Ping { id },
        } => {
            let answer: serde_json::Value = client
                .call(post, &format!("/v1/agents/{id}/ping"), None)
                .await?;
            print(cli.json, &answer, || {
                println!(
                    "agent {id} answered in {:.2} ms",
                    answer["rtt_ms"].as_f64().unwrap_or(0.0)
                )
            });
        }
        Command::Validate {
            agent,
            bench,
            security,
            quick,
            budget,
            repetitions,
            no_wait,
        } => {
            let (bench, security) = if bench || security {
                (bench, security)
            } else {
                (true, true)
            };
            let options = ValidationOptions {
                bench,
                security,
                quick,
                budget,
                repetitions,
                ..ValidationOptions::default()
            };
            let run: RunView = client
                .call(
                    post,
                    &format!("/v1/agents/{agent}/validation"),
                    Some(serde_json::to_value(options)?),
                )
                .await?;
            if no_wait {
                print(cli.json, &run, || {
                    println!("validation run {} ordered", run.run.id)
                });
                return Ok(());
            }
            let run = wait_for_run(&client, run.run.id, cli.json).await?;
            print(cli.json, &run, || show_run(&run));
        }
        Command::Validations {
            command: ValidationsCommand::List { agent },
        } => {
            let runs: serde_json::Value = client
                .call(get, &format!("/v1/agents/{agent}/validation"), None)
                .await?;
            let history: Vec<RunView> = serde_json::from_value(runs["history"].clone())?;
            print(cli.json, &history, || {
                let mut table = Table::new();
                table.load_preset(UTF8_BORDERS_ONLY);
                table.set_header([
                    "RUN",
                    "STATUS",
                    "ORDERED",
                    "COMPOSITE",
                    "HARDENING",
                    "ERROR",
                ]);
                let now = surplus_protocol::clock::SystemClock.now();
                for r in &history {
                    table.add_row([
                        r.run.id.to_string(),
                        r.run.status.as_str().to_owned(),
                        when(Some(r.run.requested_at_ms), now),
                        r.run
                            .bench
                            .as_ref()
                            .and_then(|b| b["composite_score"].as_f64())
                            .map_or("-".into(), |c| format!("{c:.2}")),
                        r.run
                            .security
                            .as_ref()
                            .and_then(|s| s["hardening_index"].as_u64())
                            .map_or("-".into(), |h| h.to_string()),
                        r.run.error.clone().unwrap_or_default(),
                    ]);
                }
                println!("{table}");
            });
        }
        Command::Validations {
            command: ValidationsCommand::Show { run },
        } => {
            let run: RunView = client
                .call(get, &format!("/v1/validations/{run}"), None)
                .await?;
            print(cli.json, &run, || show_run(&run));
        }
        Command::Validations {
            command: ValidationsCommand::Cancel { run },
        } => {
            let answer: serde_json::Value = client
                .call(post, &format!("/v1/validations/{run}/cancel"), None)
                .await?;
            print(cli.json, &answer, || {
                println!("validation run {run}: cancellation sent")
            });
        }
        Command::Run(args) => control(&client, cli.json, control_cli::run_body(args)?).await?,
        Command::Start { ids } => {
            control(
                &client,
                cli.json,
                json!({ "action": "StartInstances", "ids": ids }),
            )
            .await?
        }
        Command::Stop { ids } => {
            control(
                &client,
                cli.json,
                json!({ "action": "StopInstances", "ids": ids }),
            )
            .await?
        }
        Command::Reboot { ids } => {
            control(
                &client,
                cli.json,
                json!({ "action": "RebootInstances", "ids": ids }),
            )
            .await?
        }
        Command::Terminate { ids } => {
            control(
                &client,
                cli.json,
                json!({ "action": "TerminateInstances", "ids": ids }),
            )
            .await?
        }
        Command::Describe(args) => {
            control(&client, cli.json, control_cli::describe_body(&args)?).await?
        }
        Command::Modify(args) => {
            control(&client, cli.json, control_cli::modify_body(&args)?).await?
        }
        Command::Volumes { command } => {
            control(&client, cli.json, control_cli::volumes_body(command)?).await?
        }
        Command::Logs { id, max_bytes } => {
            let logs: surplus_protocol::control::InstanceLogs = client
                .call(
                    get,
                    &format!("/v1/instances/{id}/logs?max_bytes={max_bytes}"),
                    None,
                )
                .await?;
            print(cli.json, &logs, || control_cli::show_logs(&logs));
        }
        Command::Usage(args) => {
            let u: serde_json::Value = client.call(get, &args.query(), None).await?;
            print(cli.json, &u, || billing_cli::show_usage(&u));
        }
        Command::Invoices { command } => {
            let (path, lines) = match &command {
                billing_cli::InvoicesCommand::List { client: Some(c) } => {
                    (format!("/v1/invoices?client={c}"), false)
                }
                billing_cli::InvoicesCommand::List { client: None } => {
                    ("/v1/invoices".into(), false)
                }
                billing_cli::InvoicesCommand::Show { id } => (format!("/v1/invoices/{id}"), true),
            };
            let v: serde_json::Value = client.call(get, &path, None).await?;
            let list = match &v {
                serde_json::Value::Array(a) => a.clone(),
                one => vec![one.clone()],
            };
            print(cli.json, &v, || billing_cli::show_invoices(&list, lines));
        }
        Command::Statements { provider } => {
            let path = match provider {
                Some(p) => format!("/v1/statements?provider={p}"),
                None => "/v1/statements".into(),
            };
            let v: serde_json::Value = client.call(get, &path, None).await?;
            print(cli.json, &v, || billing_cli::show_statement(&v));
        }
        Command::Ledger {
            command: billing_cli::LedgerCommand::Balance { account },
        } => {
            let path = match account {
                Some(a) => format!("/v1/ledger/balances?account={a}"),
                None => "/v1/ledger/balances".into(),
            };
            let v: serde_json::Value = client.call(get, &path, None).await?;
            print(cli.json, &v, || billing_cli::show_balances(&v));
        }
        Command::Ledger {
            command: billing_cli::LedgerCommand::Policy { account, prepaid },
        } => {
            let v: serde_json::Value = client
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/ledger/accounts/{account}"),
                    Some(json!({ "allow_negative": !prepaid })),
                )
                .await?;
            print(cli.json, &v, || {
                println!("{account}: allow_negative = {}", !prepaid)
            });
        }
        Command::Bill { from_ms, to_ms } => {
            let v: serde_json::Value = client
                .call(
                    post,
                    "/v1/billing/runs",
                    Some(json!({"from_ms": from_ms, "to_ms": to_ms})),
                )
                .await?;
            print(cli.json, &v, || {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            });
        }
        Command::Pay(args) => {
            let v: serde_json::Value = client.call(post, "/v1/payments", Some(args.body())).await?;
            print(cli.json, &v, || println!("{}: {}", args.key, v["result"]));
        }
        Command::Payout(args) => {
            let v: serde_json::Value = client.call(post, "/v1/payouts", Some(args.body())).await?;
            print(cli.json, &v, || println!("{}: {}", args.key, v["result"]));
        }
        Command::Metering {
            agent,
            instance,
            host,
            subscription,
        } => {
            let v: serde_json::Value = client
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/agents/{agent}/metering"),
                    Some(json!({"instance": instance, "host": host, "subscription": subscription})),
                )
                .await?;
            print(cli.json, &v, || {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            });
        }
        Command::PricePlan { agent, plan } => {
            let plan: serde_json::Value =
                serde_json::from_str(&plan).context("the price plan is not JSON")?;
            let v: serde_json::Value = client
                .call(
                    reqwest::Method::PUT,
                    &format!("/v1/agents/{agent}/price-plan"),
                    Some(plan),
                )
                .await?;
            print(cli.json, &v, || {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default())
            });
        }
        Command::ApiTokens {
            command: ApiTokensCommand::Create { account, role },
        } => {
            let created: serde_json::Value = client
                .call(
                    post,
                    "/v1/api-tokens",
                    Some(json!({ "account": account, "role": role })),
                )
                .await?;
            print(cli.json, &created, || {
                println!("{}", created["token"].as_str().unwrap_or_default());
                eprintln!("API token for account {account} ({role}); it is not shown again");
            });
        }
        Command::Tokens {
            command: TokensCommand::Create { ttl, labels },
        } => {
            let labels = surplus_controller::parse_labels(&labels)?;
            let body = serde_json::to_value(CreateTokenRequest { ttl, labels })?;
            let created: CreatedToken = client.call(post, "/v1/tokens", Some(body)).await?;
            print(cli.json, &created, || {
                println!("{}", created.token);
                eprintln!(
                    "enrolls at {}; CA {}",
                    created.enroll_addresses.join(", "),
                    created.ca_fingerprint
                );
            });
        }
    }
    Ok(())
}

/// One `POST /v1/control`, printed as a table or JSON.
async fn control(client: &Client, json: bool, body: serde_json::Value) -> anyhow::Result<()> {
    let response: surplus_controller::control::ControlResponse = client
        .call(reqwest::Method::POST, "/v1/control", Some(body))
        .await?;
    print(json, &response, || control_cli::show(&response));
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    surplus_runtime::end_quietly_on_closed_pipe();
    surplus_runtime::exit_code(main_inner(Cli::parse()).await)
}
