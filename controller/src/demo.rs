//! `surplus-controller demo`: the whole foundation on one machine, in one process.
//!
//! A fresh data directory, a dev CA, a controller on loopback, and one local agent
//! enrolled through a real join token over real QUIC with mutual TLS; the registered
//! agent is printed with its inventory, and it keeps heartbeating until Ctrl-C. Then
//! every instance run through it is terminated (through the control path, as a client
//! would), so nothing outlives the demo's temporary directory.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use surplus_agent::{AgentConfig, Runner};
use surplus_api::control::ControlResponse;
use surplus_protocol::clock;
use tokio_util::sync::CancellationToken;

use crate::app::Controller;
use crate::control::ControlRequest;
use crate::datadir::{self, DataDir};
use crate::registry::RegistryEvent;
use crate::store::{Principal, Role};

/// Terminates every instance that is not terminated yet, as an admin client would
/// (DescribeInstances, then TerminateInstances); returns how many.
async fn terminate_all(ctl: &Controller) -> anyhow::Result<usize> {
    use surplus_protocol::control::{Filters, InstanceState, Lifecycle};
    let admin = Principal {
        account: "admin".into(),
        role: Role::Admin,
    };
    let ControlResponse::Instances(list) = ctl
        .control
        .handle(&admin, ControlRequest::Describe(Filters::default()))
        .await
        .context("describing the demo's instances")?
    else {
        anyhow::bail!("DescribeInstances answered something else than instances");
    };
    let ids: Vec<String> = list
        .into_iter()
        .filter(|v| v.instance.state != InstanceState::Terminated)
        .map(|v| v.instance.id)
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    let count = ids.len();
    ctl.control
        .handle(
            &admin,
            ControlRequest::Lifecycle {
                op: Lifecycle::Terminate,
                ids,
            },
        )
        .await
        .context("terminating the demo's instances")?;
    Ok(count)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// What a running demo offers, for whoever started it (tests).
#[derive(Debug, Clone)]
pub struct Ready {
    /// The API's base URL.
    pub http_url: String,
    /// The admin API token.
    pub admin_token: String,
    /// The local agent.
    pub agent_id: uuid::Uuid,
}

/// Runs the demo until `stop` resolves.
pub async fn run(
    data_dir: Option<PathBuf>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(data_dir, None, stop).await
}

/// [`run`], telling `ready` where the API is once the agent is registered.
pub async fn run_with(
    data_dir: Option<PathBuf>,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let temp;
    let root = match data_dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new()
                .prefix("surplus-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let dir = DataDir::new(root.join("controller"));
    let clock = clock::system();
    let report = datadir::init(
        &dir,
        &["localhost".into(), "127.0.0.1".into()],
        None,
        clock.now_ms(),
    )
    .await?;
    let mut config = dir.load_config()?;
    config.session_listen = "127.0.0.1:0".parse()?;
    config.enroll_listen = "127.0.0.1:0".parse()?;
    config.peer_listen = "127.0.0.1:0".parse()?;
    if std::net::TcpListener::bind(config.http_listen).is_err() {
        config.http_listen = "127.0.0.1:0".parse()?;
    }
    let running = crate::start(&dir, config, clock.clone()).await?;
    let ctl = running.controller.clone();
    let mut events = ctl.app.registry.subscribe();

    println!("Surplus demo");
    println!("  data directory   {}", root.display());
    println!(
        "  CA fingerprint   {}",
        surplus_certs::fingerprint_display(&report.ca_fingerprint)
    );
    println!(
        "  QUIC sessions    {} (enrollment {})",
        running.session_addr, running.enroll_addr
    );
    println!("  HTTP API         {}", running.http_url());
    println!("  admin API token  {}", report.admin_token);
    println!(
        "  web console      {}/console/ (sign in with the admin API token)",
        running.http_url()
    );

    let token = ctl
        .agents
        .create_join_token(
            Duration::from_secs(600),
            [("demo".to_owned(), "true".to_owned())].into(),
            "demo",
        )
        .await?;
    let mut agent_config = AgentConfig {
        data_dir: root.join("agent"),
        ..AgentConfig::default()
    };
    // The local agent runs instances as processes in cgroups of its own (this needs
    // root; without it, control commands are answered with the reason).
    agent_config.control.process.cgroup_parent = "surplus-demo".into();
    agent_config.control.stop_grace = Duration::from_secs(3);
    let identity =
        surplus_agent::enroll::enroll(&token.token, &agent_config, clock.now_ms()).await?;
    println!("  agent enrolled   {}", identity.agent_id);

    let cancel = CancellationToken::new();
    let runner = Runner::new(agent_config, clock.clone())?;
    let agent_task = tokio::spawn(runner.run(cancel.clone()));
    let registered = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(event) = events.recv().await {
            if event == RegistryEvent::InventoryChanged(identity.agent_id) {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(registered, Ok(true)) {
        anyhow::bail!("the local agent did not report its inventory within a minute");
    }

    let agent = ctl
        .app
        .store
        .agent(identity.agent_id)
        .await?
        .context("agent vanished from the registry")?;
    let view = crate::http::agent_view(&agent, None, true, clock.now_ms());
    let inv = agent.inventory.unwrap_or_default();
    println!();
    println!("Registered agent");
    println!("  id        {}", view.id);
    println!("  host      {}", view.hostname);
    println!("  status    {:?}", view.status);
    println!("  labels    {:?}", view.labels);
    println!("  os        {}", view.os.as_deref().unwrap_or("-"));
    println!(
        "  kernel    {}",
        inv.pointer("/os/kernel")
            .and_then(|v| v.as_str())
            .unwrap_or("-")
    );
    println!(
        "  cpu       {} ({} logical)",
        inv.pointer("/cpu/brand")
            .and_then(|v| v.as_str())
            .unwrap_or("-"),
        view.cpus.unwrap_or(0)
    );
    println!("  memory    {}", gib(view.memory_bytes.unwrap_or(0)));
    println!(
        "  disks     {}",
        inv.pointer("/disks")
            .and_then(|d| d.as_array())
            .map_or(0, |d| d.len())
    );
    println!(
        "  nics      {}",
        inv.pointer("/nics")
            .and_then(|d| d.as_array())
            .map_or(0, |d| d.len())
    );
    println!();
    println!("Try, in another terminal:");
    println!(
        "  cargo run --bin surplus -- --controller {} --token {} agents list",
        running.http_url(),
        report.admin_token
    );
    println!(
        "  cargo run --bin surplus -- --controller {} --token {} run --cpus 0.5 --memory 64MiB -- sleep 600",
        running.http_url(),
        report.admin_token
    );
    println!(
        "  cargo run --bin surplus -- --controller {} --token {} describe --status",
        running.http_url(),
        report.admin_token
    );
    println!("Ctrl-C terminates the instances run here, then stops the agent and the controller.");
    if let Some(ready) = ready {
        let _ = ready.send(Ready {
            http_url: running.http_url(),
            admin_token: report.admin_token.clone(),
            agent_id: identity.agent_id,
        });
    }

    stop.await;
    println!("stopping...");
    match terminate_all(&ctl).await {
        Ok(0) => {}
        Ok(n) => println!("terminated {n} instance(s)"),
        // The data directory goes away with the demo: say what may be left behind.
        Err(e) => eprintln!("terminating the demo's instances failed (some may still run): {e:#}"),
    }
    cancel.cancel();
    match agent_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("agent ended with: {e}"),
        Err(e) => eprintln!("agent task failed: {e}"),
    }
    running.shutdown().await;
    println!("stopped cleanly");
    Ok(())
}
