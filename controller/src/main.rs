//! `surplus-controller`: initialise a data directory, serve, and administer it locally.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use surplus_controller::datadir::{self, DataDir};
use surplus_protocol::clock;
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "surplus-controller", version, about = "Surplus controller")]
struct Cli {
    /// Data directory (CA, database, controller.toml).
    #[arg(
        long,
        global = true,
        env = "SURPLUS_CONTROLLER_DATA_DIR",
        default_value = "/var/lib/surplus-controller"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA, server certificate, database, admin API token and config file.
    Init {
        /// Name agents use to reach this controller (repeatable); the first is verified.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Keep the state in this database instead of the embedded SQLite file, such
        /// as postgres://surplus:PASSWORD@db.example.com/surplus: its migrations are
        /// applied now and the URL is written into controller.toml.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Run the controller until Ctrl-C or SIGTERM.
    Serve,
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Registered agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Peering with other controllers (federation).
    Peer {
        #[command(subcommand)]
        command: PeerCommand,
    },
    /// A fresh controller and one local agent in one process (Ctrl-C stops it).
    #[cfg(feature = "demo")]
    Demo,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a one-time join token.
    Create {
        /// Lifetime, such as 30m or 2h.
        #[arg(long, default_value = "30m")]
        ttl: humantime::Duration,
        /// Label for the agent that enrolls with it, key=value (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Print a one-time peering token for another controller to join with.
    Invite {
        /// What the joining controller will be to this one: host-cloud (it sends the
        /// usage of this controller's subscribers it hosts) or marketplace-cloud (it
        /// receives this controller's brokered bundles).
        #[arg(long)]
        role: String,
        /// Lifetime, such as 30m or 2h.
        #[arg(long, default_value = "30m")]
        ttl: humantime::Duration,
    },
    /// Join the controller that printed TOKEN (it must be running); this controller
    /// then keeps a link to it up while serving.
    Join {
        /// The peering token.
        token: String,
        /// A name for this controller on the other side.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List peers.
    List,
    /// Remove a peer: a running controller drops its CA and closes its link within
    /// seconds; its messages are refused from then on.
    Remove {
        /// Peer controller id.
        id: Uuid,
    },
    /// Send an account's usage to a broker peer from now on.
    Share {
        /// The broker's controller id.
        peer: Uuid,
        /// The client account here.
        account: String,
        /// The user it is known as at the broker (default: the account's name).
        #[arg(long = "as")]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// List agents.
    List,
    /// Revoke an agent; a running controller cuts it off within seconds.
    Revoke {
        /// Agent id.
        id: Uuid,
    },
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    let dir = DataDir::new(&cli.data_dir);
    let clock = clock::system();
    match cli.command {
        Command::Init {
            server_names,
            database_url,
        } => {
            surplus_controller::init_logs(Default::default(), "warn");
            let report =
                datadir::init(&dir, &server_names, database_url.as_deref(), clock.now_ms()).await?;
            println!("initialised {}", dir.path().display());
            println!(
                "CA fingerprint (SHA-256): {}",
                surplus_certs::fingerprint_display(&report.ca_fingerprint)
            );
            println!(
                "admin API token (shown once, stored hashed): {}",
                report.admin_token
            );
            println!("configuration: {}", dir.config_file().display());
        }
        Command::Serve => {
            let config = dir.load_config()?;
            surplus_controller::init_logs(config.log_format, &config.log_filter);
            let running = surplus_controller::start(&dir, config, clock).await?;
            surplus_runtime::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown().await;
        }
        Command::Token {
            command: TokenCommand::Create { ttl, labels },
        } => {
            surplus_controller::init_logs(Default::default(), "warn");
            let config = dir.load_config()?;
            let ca = dir.load_ca()?;
            let store = dir.open_store(&config.database_url).await?;
            let labels = surplus_controller::parse_labels(&labels)?;
            let ctl =
                surplus_controller::Controller::new(config, store, clock, ca, Default::default());
            let ttl: Duration = ttl.into();
            let created = ctl.agents.create_join_token(ttl, labels, "cli").await?;
            println!("{}", created.token);
            eprintln!(
                "expires in {}; enroll with: surplus-agent enroll --token <token>",
                humantime::format_duration(ttl)
            );
        }
        Command::Agent { command } => {
            surplus_controller::init_logs(Default::default(), "warn");
            dir.load_ca()?;
            let config = dir.load_config()?;
            let store = dir.open_store(&config.database_url).await?;
            match command {
                AgentCommand::List => {
                    for a in store.agents().await? {
                        println!("{}  {:<12} {}", a.id, a.status.as_str(), a.hostname);
                    }
                }
                AgentCommand::Revoke { id } => {
                    let newly = store
                        .revoke_agent(id, clock.now_ms())
                        .await
                        .with_context(|| format!("revoking {id}"))?;
                    println!(
                        "{}",
                        if newly {
                            format!("agent {id} revoked")
                        } else {
                            format!("agent {id} was already revoked")
                        }
                    );
                }
            }
        }
        Command::Peer { command } => {
            surplus_controller::init_logs(Default::default(), "warn");
            let config = dir.load_config()?;
            let ca = dir.load_ca()?;
            let store = dir.open_store(&config.database_url).await?;
            let ctl =
                surplus_controller::Controller::new(config, store, clock, ca, Default::default());
            let fed = &ctl.federation;
            match command {
                PeerCommand::Invite { role, ttl } => {
                    let role = surplus_protocol::peer::PeerRole::parse(&role)
                        .filter(|r| *r != surplus_protocol::peer::PeerRole::Broker)
                        .with_context(|| {
                            format!("--role {role:?}: expected host-cloud or marketplace-cloud")
                        })?;
                    let ttl: Duration = ttl.into();
                    let invitation = fed.invite(role, ttl).await?;
                    println!("{}", invitation.token);
                    eprintln!(
                        "expires in {}; on the other controller: surplus-controller peer join <token>",
                        humantime::format_duration(ttl)
                    );
                }
                PeerCommand::Join { token, name } => {
                    let peer = fed.join(&token, &name).await?;
                    println!(
                        "joined {} ({}) as its {}; CA fingerprint {}",
                        peer.id,
                        peer.name,
                        match fed.peer_role_at_broker(&token) {
                            Some(r) => r,
                            None => "peer".into(),
                        },
                        peer.fingerprint
                    );
                }
                PeerCommand::List => {
                    for p in ctl.app.store.peers().await? {
                        println!(
                            "{}  {:<17} {:<8} {}  {}",
                            p.id,
                            p.role.as_str(),
                            if p.removed_at_ms.is_some() {
                                "removed"
                            } else {
                                "active"
                            },
                            p.name,
                            p.addresses.join(",")
                        );
                    }
                }
                PeerCommand::Remove { id } => {
                    if fed.remove(id).await? {
                        println!("peer {id} removed");
                    } else {
                        anyhow::bail!("no active peer {id}");
                    }
                }
                PeerCommand::Share {
                    peer,
                    account,
                    user,
                } => {
                    let user = user.unwrap_or_else(|| account.clone());
                    fed.share(peer, &account, &user).await?;
                    println!("usage of {account} goes to {peer} as user {user} from now on");
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::Demo => {
            surplus_controller::init_logs(Default::default(), "warn");
            surplus_controller::demo::run(None, surplus_runtime::shutdown_signal()).await?;
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if !is_service(&cli.command) {
        surplus_runtime::end_quietly_on_closed_pipe();
    }
    surplus_runtime::exit_code(main_inner(cli).await)
}

/// Long-running commands keep ignoring SIGPIPE, so that a closed log pipe cannot
/// kill them; the others end quietly on one.
fn is_service(command: &Command) -> bool {
    #[cfg(feature = "demo")]
    if matches!(command, Command::Demo) {
        return true;
    }
    matches!(command, Command::Serve)
}
