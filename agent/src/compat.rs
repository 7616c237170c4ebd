//! The compatibility kit (capability A6): one conformance scenario per operation of
//! the primary control interface, run through a [`ControlPlane`] against whatever
//! driver it has. `surplus-agent compat` runs it on a host and reports the result;
//! `cargo test` runs the same suite against the process, docker and mapped drivers.

use std::collections::BTreeMap;
use std::time::Duration;

use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::*;

use crate::control::ControlPlane;

/// What the suite runs: an image (container drivers) and a command that keeps running.
#[derive(Debug, Clone)]
pub struct CompatProfile {
    /// Image for container drivers; `None` for the process driver.
    pub image: Option<String>,
    /// A command that runs until stopped (`sleep 3600`).
    pub command: Vec<String>,
}

type Step = Result<(), String>;

fn expect(ok: bool, what: impl FnOnce() -> String) -> Step {
    if ok { Ok(()) } else { Err(what()) }
}

struct Suite<'a> {
    plane: &'a ControlPlane,
    profile: &'a CompatProfile,
    checks: Vec<CompatCheck>,
}

impl Suite<'_> {
    fn record(&mut self, operation: &str, outcome: Step) -> bool {
        let passed = outcome.is_ok();
        self.checks.push(CompatCheck {
            operation: operation.into(),
            passed,
            message: outcome.err(),
        });
        passed
    }

    async fn call(&self, command: Command) -> Result<ControlReply, String> {
        let action = command.action();
        self.plane
            .handle(command)
            .await
            .map_err(|e| format!("{action}: {e}"))
    }

    async fn state(&self, id: &str) -> Result<InstanceState, String> {
        match self
            .call(Command::DescribeInstances(Filters {
                ids: vec![id.into()],
                ..Default::default()
            }))
            .await?
        {
            ControlReply::Instances(list) if list.len() == 1 => Ok(list[0].state),
            other => Err(format!("DescribeInstances answered {other:?}")),
        }
    }

    async fn status(&self, id: &str) -> Result<InstanceStatus, String> {
        match self
            .call(Command::DescribeInstanceStatus {
                ids: vec![id.into()],
            })
            .await?
        {
            ControlReply::Statuses(mut s) if s.len() == 1 => Ok(s.remove(0)),
            other => Err(format!("DescribeInstanceStatus answered {other:?}")),
        }
    }

    async fn lifecycle(&self, op: Lifecycle, id: &str, want: InstanceState) -> Step {
        match self
            .call(Command::Lifecycle {
                op,
                ids: vec![id.into()],
            })
            .await?
        {
            ControlReply::StateChanges(c) if c.len() == 1 && c[0].current == want => {}
            other => return Err(format!("{} answered {other:?}", op.as_str())),
        }
        let seen = self.state(id).await?;
        expect(seen == want, || {
            format!("after {} the instance is {seen}, not {want}", op.as_str())
        })
    }

    fn spec(&self, limits: Limits, volumes: Vec<VolumeAttachment>) -> RunSpec {
        RunSpec {
            name: Some("compat".into()),
            image: self.profile.image.clone(),
            command: self.profile.command.clone(),
            env: BTreeMap::from([("SURPLUS_COMPAT".into(), "1".into())]),
            limits,
            ports: vec![],
            labels: BTreeMap::from([("surplus.compat".into(), "yes".into())]),
            volumes,
        }
    }

    async fn run(&self, id: &str, spec: RunSpec) -> Step {
        match self
            .call(Command::RunInstances {
                instance_id: id.into(),
                spec,
            })
            .await?
        {
            ControlReply::Instances(i) if i.len() == 1 && i[0].state == InstanceState::Running => {
                Ok(())
            }
            other => Err(format!("RunInstances answered {other:?}")),
        }
    }

    async fn compute(&mut self) {
        let id = new_id(INSTANCE_PREFIX);
        let first = Limits {
            millicpus: Some(500),
            memory_bytes: Some(64 << 20),
            pids: Some(100),
        };
        let second = Limits {
            millicpus: Some(1000),
            memory_bytes: Some(96 << 20),
            pids: Some(200),
        };
        // A driver that says it limits processes must apply the limit asked for; one
        // that does not is judged on CPU and memory.
        let limits_pids = self.plane.isolation().default_pids.is_some();
        let applies = move |applied: &Limits, asked: &Limits| {
            applied.millicpus == asked.millicpus
                && applied.memory_bytes == asked.memory_bytes
                && (!limits_pids || applied.pids == asked.pids)
        };
        let ran = self.run(&id, self.spec(first, vec![])).await;
        if !self.record("run", ran) {
            for op in &COMPUTE_OPERATIONS[1..] {
                self.record(op, Err("skipped: run failed".into()));
            }
            return;
        }
        let described = async {
            let state = self.state(&id).await?;
            expect(state == InstanceState::Running, || {
                format!("described as {state}")
            })?;
            let status = self.status(&id).await?;
            expect(applies(&status.applied, &first), || {
                format!(
                    "limits read back from the host are {:?}, asked {:?}",
                    status.applied, first
                )
            })?;
            let filtered = self
                .call(Command::DescribeInstances(Filters {
                    labels: BTreeMap::from([("surplus.compat".into(), "yes".into())]),
                    states: vec![InstanceState::Running],
                    ..Default::default()
                }))
                .await?;
            expect(
                matches!(&filtered, ControlReply::Instances(l) if l.iter().any(|i| i.id == id)),
                || "label and state filters do not find the instance".into(),
            )
        }
        .await;
        self.record("describe", described);
        let stopped = self
            .lifecycle(Lifecycle::Stop, &id, InstanceState::Stopped)
            .await;
        self.record("stop", stopped);
        let started = self
            .lifecycle(Lifecycle::Start, &id, InstanceState::Running)
            .await;
        self.record("start", started);
        let rebooted = async {
            self.lifecycle(Lifecycle::Reboot, &id, InstanceState::Running)
                .await?;
            let status = self.status(&id).await?;
            expect(status.state == InstanceState::Running, || {
                "not running after reboot".into()
            })
        }
        .await;
        self.record("reboot", rebooted);
        let modified = async {
            self.call(Command::ModifyInstanceAttribute {
                instance_id: id.clone(),
                limits: Some(second),
                labels: None,
            })
            .await?;
            let status = self.status(&id).await?;
            expect(applies(&status.applied, &second), || {
                format!(
                    "after modify the host applies {:?}, asked {:?}",
                    status.applied, second
                )
            })?;
            match self
                .call(Command::DescribeInstanceAttribute {
                    instance_id: id.clone(),
                    attribute: AttributeName::Limits,
                })
                .await?
            {
                ControlReply::Attribute {
                    value: AttributeValue::Limits(l),
                    ..
                } if l == second => Ok(()),
                other => Err(format!("DescribeInstanceAttribute answered {other:?}")),
            }
        }
        .await;
        self.record("modify", modified);
        let terminated = self
            .lifecycle(Lifecycle::Terminate, &id, InstanceState::Terminated)
            .await;
        self.record("terminate", terminated);
    }

    async fn volume_state(&self, id: &str) -> Result<Volume, String> {
        match self
            .call(Command::DescribeVolumes {
                ids: vec![id.into()],
            })
            .await?
        {
            ControlReply::Volumes(mut v) if v.len() == 1 => Ok(v.remove(0)),
            other => Err(format!("DescribeVolumes answered {other:?}")),
        }
    }

    async fn storage(&mut self) {
        let vol = new_id(VOLUME_PREFIX);
        let created = async {
            self.call(Command::CreateVolume {
                volume_id: vol.clone(),
                name: Some("compat".into()),
                size_bytes: 64 << 20,
            })
            .await?;
            let v = self.volume_state(&vol).await?;
            expect(v.state == VolumeState::Available, || {
                format!("new volume is {}", v.state.as_str())
            })
        }
        .await;
        if !self.record("volume-create", created) {
            for op in &STORAGE_OPERATIONS[1..] {
                self.record(op, Err("skipped: volume-create failed".into()));
            }
            return;
        }
        let id = new_id(INSTANCE_PREFIX);
        let attached = async {
            let mount = VolumeAttachment {
                volume_id: vol.clone(),
                mount_path: "/data".into(),
            };
            self.run(&id, self.spec(Limits::default(), vec![mount]))
                .await?;
            let v = self.volume_state(&vol).await?;
            expect(
                v.state == VolumeState::InUse && v.attached_to.as_deref() == Some(id.as_str()),
                || {
                    format!(
                        "attached volume is {} (attached to {:?})",
                        v.state.as_str(),
                        v.attached_to
                    )
                },
            )?;
            self.lifecycle(Lifecycle::Terminate, &id, InstanceState::Terminated)
                .await?;
            let v = self.volume_state(&vol).await?;
            expect(v.state == VolumeState::Available, || {
                "the volume is not released by terminate".into()
            })
        }
        .await;
        if attached.is_err() {
            let _ = self
                .call(Command::Lifecycle {
                    op: Lifecycle::Terminate,
                    ids: vec![id],
                })
                .await;
        }
        self.record("volume-attach", attached);
        let snapshot = async {
            let snap = new_id(SNAPSHOT_PREFIX);
            match self
                .call(Command::CreateSnapshot {
                    volume_id: vol.clone(),
                    snapshot_id: snap.clone(),
                })
                .await?
            {
                ControlReply::Snapshot(s) if s.id == snap && s.volume_id == vol => {
                    expect(std::path::Path::new(&s.location).exists(), || {
                        format!("the snapshot's location {} does not exist", s.location)
                    })
                }
                other => Err(format!("CreateSnapshot answered {other:?}")),
            }
        }
        .await;
        self.record("snapshot", snapshot);
        let deleted = async {
            self.call(Command::DeleteVolume {
                volume_id: vol.clone(),
            })
            .await?;
            let v = self.volume_state(&vol).await?;
            expect(v.state == VolumeState::Deleted, || {
                format!("deleted volume is {}", v.state.as_str())
            })
        }
        .await;
        self.record("volume-delete", deleted);
    }
}

/// Runs every scenario against `plane` and rates the result.
pub async fn run_suite(
    plane: &ControlPlane,
    profile: &CompatProfile,
    now_ms: UnixMillis,
) -> CompatReport {
    let mut suite = Suite {
        plane,
        profile,
        checks: Vec::new(),
    };
    suite.compute().await;
    suite.storage().await;
    let checks = suite.checks;
    CompatReport {
        driver: plane.driver_name(),
        level: compat_level(&checks),
        checks,
        isolation: plane.isolation(),
        ran_at_ms: now_ms,
    }
}

/// A bound on how long the whole suite may take on a healthy host.
pub const SUITE_BUDGET: Duration = Duration::from_secs(300);
