//! `surplus run|start|stop|reboot|terminate|describe|modify|logs|volumes`: the primary
//! control interface from the command line. Every command but `logs` is one
//! `POST /v1/control` with a `surplus_api::control::ControlCall` body, which the
//! server checks value by value (`control::parse_request`), naming the field at fault.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use surplus_api::control::{
    ControlCall, ControlResponse, parse_attachment, parse_cpus, parse_port,
};
use surplus_protocol::control::{Filters, InstanceState, Limits, LimitsChange, RunSpec};

use crate::client::{Client, print, table};

#[derive(Subcommand)]
pub enum Command {
    /// Run an instance (RunInstances): `surplus run --cpus 0.5 --memory 64MiB -- /bin/sleep 600`.
    Run(RunArgs),
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
    Describe(DescribeArgs),
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
    Modify(ModifyArgs),
    /// Volumes and snapshots.
    Volumes {
        #[command(subcommand)]
        command: VolumesCommand,
    },
}

pub async fn run(client: &Client, json: bool, command: Command) -> anyhow::Result<()> {
    let body = match command {
        Command::Run(args) => run_body(args)?,
        Command::Start { ids } => ControlCall::StartInstances { ids },
        Command::Stop { ids } => ControlCall::StopInstances { ids },
        Command::Reboot { ids } => ControlCall::RebootInstances { ids },
        Command::Terminate { ids } => ControlCall::TerminateInstances { ids },
        Command::Describe(args) => describe_body(&args)?,
        Command::Modify(args) => modify_body(&args)?,
        Command::Volumes { command } => volumes_body(command)?,
        Command::Logs { id, max_bytes } => {
            let logs: surplus_protocol::control::InstanceLogs = client
                .get(&format!("/v1/instances/{id}/logs?max_bytes={max_bytes}"))
                .await?;
            print(json, &logs, || show_logs(&logs));
            return Ok(());
        }
    };
    let response: ControlResponse = client.post("/v1/control", &body).await?;
    print(json, &response, || show(&response));
    Ok(())
}

/// `surplus run`.
#[derive(Args)]
pub struct RunArgs {
    /// Agent to run on (optional when the volumes or a single connected agent decide).
    #[arg(long)]
    agent: Option<String>,
    /// Image (docker and mapped drivers).
    #[arg(long)]
    image: Option<String>,
    /// A name.
    #[arg(long)]
    name: Option<String>,
    /// vCPU limit, such as 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory limit, such as 64MiB or 1GiB.
    #[arg(long)]
    memory: Option<String>,
    /// Most processes at once (the host's default, such as 512, when left out).
    #[arg(long)]
    pids: Option<u32>,
    /// Port mapping HOST:INSTANCE[/udp] (repeatable).
    #[arg(long = "port", short = 'p')]
    ports: Vec<String>,
    /// Label key=value (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Volume to attach, VOLUME_ID:/path (repeatable).
    #[arg(long = "volume", short = 'v')]
    volumes: Vec<String>,
    /// Idempotency token: retrying with the same token starts one instance.
    #[arg(long)]
    client_token: Option<String>,
    /// Executable and arguments (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

/// `surplus describe`.
#[derive(Args)]
pub struct DescribeArgs {
    /// Instance ids (default: all yours).
    ids: Vec<String>,
    /// Only instances in this state (repeatable).
    #[arg(long = "state")]
    states: Vec<String>,
    /// Only instances with this label key=value (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Show what the hosts report (limits read back, processes, exit codes).
    #[arg(long)]
    status: bool,
}

/// `surplus modify`.
#[derive(Args)]
pub struct ModifyArgs {
    /// Instance id.
    id: String,
    /// New vCPU limit, such as 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// New memory limit, such as 64MiB or 1GiB.
    #[arg(long)]
    memory: Option<String>,
    /// Label key=value (repeatable); the labels given replace the instance's labels.
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
}

/// `surplus volumes ...`.
#[derive(Subcommand)]
pub enum VolumesCommand {
    /// Your volumes.
    List,
    /// Create a volume.
    Create {
        /// Size, such as 1GiB.
        #[arg(long)]
        size: String,
        /// A name.
        #[arg(long)]
        name: Option<String>,
        /// Agent to create it on.
        #[arg(long)]
        agent: Option<String>,
    },
    /// Delete a volume (it must not be attached).
    Delete {
        /// Volume id.
        id: String,
    },
    /// Snapshot a volume.
    Snapshot {
        /// Volume id.
        id: String,
    },
}

/// `parse_size` of surplus-api, as a command-line error.
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    surplus_api::control::parse_size(text).map_err(anyhow::Error::msg)
}

fn pairs(args: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    args.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("{what} {kv:?} is not key=value"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The `POST /v1/control` body of `surplus run`.
pub fn run_body(a: RunArgs) -> anyhow::Result<ControlCall> {
    let limits = Limits {
        millicpus: a.cpus.map(millicpus).transpose()?,
        memory_bytes: a.memory.as_deref().map(parse_size).transpose()?,
        pids: a.pids,
    };
    let ports = a
        .ports
        .iter()
        .map(|p| parse_port(p).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let volumes = a
        .volumes
        .iter()
        .map(|v| parse_attachment(v).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    let agent_id = a
        .agent
        .map(|id| {
            id.parse()
                .with_context(|| format!("--agent {id:?} is not an agent id"))
        })
        .transpose()?;
    Ok(ControlCall::RunInstances {
        agent_id,
        client_token: a.client_token,
        spec: RunSpec {
            name: a.name,
            image: a.image,
            command: a.command,
            env: pairs(&a.env, "env")?,
            limits,
            ports,
            labels: pairs(&a.labels, "label")?,
            volumes,
        },
    })
}

/// The `POST /v1/control` body of `surplus modify`: only the fields the user gave, so
/// that the others stay as they are.
pub fn modify_body(a: &ModifyArgs) -> anyhow::Result<ControlCall> {
    let limits = LimitsChange {
        millicpus: a.cpus.map(millicpus).transpose()?.map(Some),
        memory_bytes: a.memory.as_deref().map(parse_size).transpose()?.map(Some),
        pids: None,
    };
    let limits = (!limits.is_empty()).then_some(limits);
    let labels = (!a.labels.is_empty())
        .then(|| pairs(&a.labels, "label"))
        .transpose()?;
    if limits.is_none() && labels.is_none() {
        bail!("nothing to modify: give --cpus, --memory or --label");
    }
    Ok(ControlCall::ModifyInstanceAttribute {
        instance_id: a.id.clone(),
        limits,
        labels,
    })
}

/// `--cpus 0.5` as thousandths of a CPU.
fn millicpus(cpus: f64) -> anyhow::Result<u32> {
    parse_cpus(cpus).map_err(|e| anyhow::anyhow!("--cpus: {e}"))
}

/// The `POST /v1/control` body of `surplus describe`.
pub fn describe_body(a: &DescribeArgs) -> anyhow::Result<ControlCall> {
    if a.status {
        return Ok(ControlCall::DescribeInstanceStatus { ids: a.ids.clone() });
    }
    let states = a
        .states
        .iter()
        .map(|s| {
            InstanceState::parse(s).with_context(|| {
                format!(
                    "--state {s:?}: one of pending, running, stopping, stopped, shutting-down, terminated"
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(ControlCall::DescribeInstances(Filters {
        ids: a.ids.clone(),
        states,
        labels: pairs(&a.labels, "label")?,
    }))
}

/// The body of a volumes command.
pub fn volumes_body(c: VolumesCommand) -> anyhow::Result<ControlCall> {
    Ok(match c {
        VolumesCommand::List => ControlCall::DescribeVolumes { ids: Vec::new() },
        VolumesCommand::Create { size, name, agent } => ControlCall::CreateVolume {
            agent_id: agent
                .map(|id| {
                    id.parse()
                        .with_context(|| format!("--agent {id:?} is not an agent id"))
                })
                .transpose()?,
            name,
            size_bytes: parse_size(&size)?,
        },
        VolumesCommand::Delete { id } => ControlCall::DeleteVolume { volume_id: id },
        VolumesCommand::Snapshot { id } => ControlCall::CreateSnapshot { volume_id: id },
    })
}

fn limits_text(l: &Limits) -> (String, String) {
    (
        l.millicpus
            .map_or("-".into(), |m| format!("{}", m as f64 / 1000.0)),
        l.memory_bytes
            .map_or("-".into(), |b| format!("{} MiB", b >> 20)),
    )
}

/// Prints an instance's output for people: its standard output on stdout, its
/// standard error on stderr.
pub fn show_logs(logs: &surplus_protocol::control::InstanceLogs) {
    use std::io::Write;
    if logs.truncated {
        eprintln!("(earlier output left out)");
    }
    let _ = std::io::stdout().write_all(logs.stdout.as_bytes());
    let _ = std::io::stderr().write_all(logs.stderr.as_bytes());
}

/// Prints a control answer for people.
pub fn show(response: &ControlResponse) {
    match response {
        ControlResponse::Logs(logs) => show_logs(logs),
        ControlResponse::Instances(list) => {
            let mut t = table(&[
                "instance",
                "name",
                "state",
                "agent",
                "image / command",
                "cpus",
                "memory",
                "labels",
                "reason",
            ]);
            for v in list {
                let i = &v.instance;
                let (cpu, mem) = limits_text(&i.spec.limits);
                let what = i
                    .spec
                    .image
                    .clone()
                    .unwrap_or_else(|| i.spec.command.join(" "));
                let labels: Vec<String> = i
                    .spec
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let state = if v.stale {
                    format!("{} (stale)", i.state)
                } else {
                    i.state.to_string()
                };
                t.add_row(vec![
                    i.id.clone(),
                    i.spec.name.clone().unwrap_or_default(),
                    state,
                    v.agent_id.to_string()[..8].to_owned(),
                    what,
                    cpu,
                    mem,
                    labels.join(","),
                    i.state_reason.clone().unwrap_or_default(),
                ]);
            }
            println!("{t}");
        }
        ControlResponse::StateChanges(changes) => {
            for c in changes {
                println!("{}  {} -> {}", c.instance_id, c.previous, c.current);
            }
        }
        ControlResponse::Statuses(list) => {
            let mut t = table(&[
                "instance",
                "state",
                "cpus (applied)",
                "memory (applied)",
                "processes (limit)",
                "exit code",
                "reason",
            ]);
            for s in list {
                let (cpu, mem) = limits_text(&s.applied);
                t.add_row(vec![
                    s.instance_id.clone(),
                    s.state.to_string(),
                    cpu,
                    mem,
                    format!(
                        "{} ({})",
                        s.processes.map_or("-".into(), |p| p.to_string()),
                        s.applied.pids.map_or("-".into(), |p| p.to_string())
                    ),
                    s.exit_code.map_or("-".into(), |c| c.to_string()),
                    s.state_reason.clone().unwrap_or_default(),
                ]);
            }
            println!("{t}");
        }
        ControlResponse::Attribute { instance_id, value } => {
            println!(
                "{instance_id}: {}",
                serde_json::to_string(value).expect("serializes")
            );
        }
        ControlResponse::Volumes(list) => {
            let mut t = table(&[
                "volume",
                "name",
                "state",
                "size",
                "used",
                "attached to",
                "agent",
            ]);
            for v in list {
                let vol = &v.volume;
                t.add_row(vec![
                    vol.id.clone(),
                    vol.name.clone().unwrap_or_default(),
                    vol.state.as_str().to_owned(),
                    format!("{} MiB", vol.size_bytes >> 20),
                    vol.used_bytes.map_or("-".into(), |b| format!("{b} B")),
                    vol.attached_to.clone().unwrap_or_default(),
                    v.agent_id.to_string()[..8].to_owned(),
                ]);
            }
            println!("{t}");
        }
        ControlResponse::Snapshot(s) => {
            println!(
                "{}  of {}  {} bytes at {}",
                s.id, s.volume_id, s.size_bytes, s.location
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn modify(args: &[&str]) -> anyhow::Result<Value> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            modify: ModifyArgs,
        }
        let cli = Cli::try_parse_from(std::iter::once("modify").chain(args.iter().copied()))?;
        Ok(serde_json::to_value(modify_body(&cli.modify)?)?)
    }

    #[test]
    fn modify_sends_only_what_was_given() {
        assert_eq!(
            modify(&["i-0000000000000001", "--cpus", "0.5"]).unwrap(),
            json!({"action": "ModifyInstanceAttribute", "instance_id": "i-0000000000000001", "limits": {"millicpus": 500}})
        );
        assert_eq!(
            modify(&[
                "i-0000000000000001",
                "--memory",
                "64MiB",
                "--label",
                "team=red"
            ])
            .unwrap(),
            json!({"action": "ModifyInstanceAttribute", "instance_id": "i-0000000000000001", "limits": {"memory_bytes": 64 << 20}, "labels": {"team": "red"}})
        );
        assert!(
            modify(&["i-0000000000000001"]).is_err(),
            "nothing to change"
        );
        assert!(modify(&["i-0000000000000001", "--label", "nokey"]).is_err());
    }
}
