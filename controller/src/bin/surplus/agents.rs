//! `surplus agents|tokens|api-tokens`: the registry, join tokens and API tokens.

use clap::Subcommand;
use surplus_api::agents::{
    AgentDetail, AgentView, CreateApiTokenRequest, CreateTokenRequest, CreatedApiToken,
    CreatedToken, PingView,
};

use crate::client::{Client, now_ms, print, table, when};

#[derive(Subcommand)]
pub enum Command {
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
    /// API tokens for accounts (admin).
    ApiTokens {
        #[command(subcommand)]
        command: ApiTokensCommand,
    },
}

#[derive(Subcommand)]
pub enum AgentsCommand {
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
pub enum TokensCommand {
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

#[derive(Subcommand)]
pub enum ApiTokensCommand {
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

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agents { command } => agents(client, json, command).await,
        Command::Tokens {
            command: TokensCommand::Create { ttl, labels },
        } => {
            let labels = surplus_controller::parse_labels(&labels)?;
            let created: CreatedToken = client
                .post("/v1/tokens", &CreateTokenRequest { ttl, labels })
                .await?;
            print(json, &created, || {
                println!("{}", created.token);
                eprintln!(
                    "enrolls at {}; CA {}",
                    created.enroll_addresses.join(", "),
                    created.ca_fingerprint
                );
            });
            Ok(())
        }
        Command::ApiTokens {
            command: ApiTokensCommand::Create { account, role },
        } => {
            let body = CreateApiTokenRequest {
                account,
                role,
                label: None,
            };
            let created: CreatedApiToken = client.post("/v1/api-tokens", &body).await?;
            print(json, &created, || {
                println!("{}", created.token);
                eprintln!(
                    "API token for account {} ({}); it is not shown again",
                    created.account,
                    created.role.as_str()
                );
            });
            Ok(())
        }
    }
}

async fn agents(client: &Client, json: bool, command: AgentsCommand) -> anyhow::Result<()> {
    match command {
        AgentsCommand::List => {
            let agents: Vec<AgentView> = client.get("/v1/agents").await?;
            print(json, &agents, || println!("{}", agents_table(&agents)));
        }
        AgentsCommand::Show { id } => {
            let detail: AgentDetail = client.get(&format!("/v1/agents/{id}")).await?;
            print(json, &detail, || show_agent(&detail));
        }
        AgentsCommand::Revoke { id } => {
            let agent: AgentView = client
                .post_empty(&format!("/v1/agents/{id}/revoke"))
                .await?;
            print(json, &agent, || println!("agent {} revoked", agent.id));
        }
        AgentsCommand::Ping { id } => {
            let answer: PingView = client.post_empty(&format!("/v1/agents/{id}/ping")).await?;
            print(json, &answer, || {
                println!(
                    "agent {} answered in {:.2} ms",
                    answer.agent_id, answer.rtt_ms
                )
            });
        }
    }
    Ok(())
}

fn show_agent(detail: &AgentDetail) {
    println!("{}", agents_table(std::slice::from_ref(&detail.agent)));
    println!(
        "certificate {} expires {}",
        detail.agent.cert_serial,
        when(Some(detail.agent.cert_not_after_ms), now_ms())
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
}

fn agents_table(agents: &[AgentView]) -> comfy_table::Table {
    let now = now_ms();
    let mut t = table(&[
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
        t.add_row([
            a.id.to_string(),
            a.hostname.clone(),
            a.status.as_str().to_owned(),
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
    t
}
