//! The primary control interface end to end: the compatibility kit against the
//! process (real cgroups), docker (the real engine) and mapped (the shipped mapping of
//! the Docker Engine API) drivers; re-adoption after an agent restart; hostile values.

use std::sync::Arc;
use std::time::Duration;

use surplus_agent::compat::run_suite;
use surplus_agent::control::{self, ControlPlane, DriverKind};
use surplus_protocol::clock::{self, Clock};
use surplus_protocol::control::*;
use surplus_tests::control_config;

async fn plane(driver: DriverKind, tag: &str, dir: &std::path::Path) -> Arc<ControlPlane> {
    let config = control_config(driver, tag);
    let driver = control::open_driver(&config, dir)
        .await
        .unwrap_or_else(|e| {
            panic!("the {tag} driver must start on this host (root, cgroups, docker): {e}")
        });
    ControlPlane::open(driver, dir.join("control"), clock::system(), &config)
        .await
        .expect("book opens")
}

async fn kit(driver: DriverKind, tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let plane = plane(driver, tag, dir.path()).await;
    let profile = control::compat_profile(&control_config(driver, tag));
    let report = run_suite(&plane, &profile, clock::system().now_ms()).await;
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{tag}: failed checks {failed:#?}");
    assert_eq!(
        report.checks.len(),
        COMPUTE_OPERATIONS.len() + STORAGE_OPERATIONS.len()
    );
    assert_eq!(report.level, CompatLevel::Fully, "{tag}");
}

#[tokio::test]
async fn the_compatibility_kit_passes_on_the_process_driver() {
    kit(DriverKind::Process, "process").await;
}

#[tokio::test]
async fn the_compatibility_kit_passes_on_the_docker_driver() {
    kit(DriverKind::Docker, "docker").await;
}

#[tokio::test]
async fn the_compatibility_kit_passes_on_the_mapped_docker_api() {
    kit(DriverKind::Mapped, "mapped").await;
}

async fn call(plane: &ControlPlane, command: Command) -> ControlReply {
    let action = command.action();
    plane
        .handle(command)
        .await
        .unwrap_or_else(|e| panic!("{action}: {e}"))
}

async fn describe(plane: &ControlPlane, id: &str) -> Instance {
    match call(
        plane,
        Command::DescribeInstances(Filters {
            ids: vec![id.into()],
            ..Default::default()
        }),
    )
    .await
    {
        ControlReply::Instances(mut l) => l.remove(0),
        other => panic!("{other:?}"),
    }
}

async fn status(plane: &ControlPlane, id: &str) -> InstanceStatus {
    match call(
        plane,
        Command::DescribeInstanceStatus {
            ids: vec![id.into()],
        },
    )
    .await
    {
        ControlReply::Statuses(mut l) => l.remove(0),
        other => panic!("{other:?}"),
    }
}

async fn eventually_state(plane: &ControlPlane, id: &str, want: InstanceState) -> Instance {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let i = describe(plane, id).await;
        if i.state == want {
            return i;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} stays {} (wanted {want})",
            i.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(command: &[&str]) -> RunSpec {
    RunSpec {
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_restarted_agent_readopts_running_processes_and_reports_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let id = new_id(INSTANCE_PREFIX);
    {
        let first = plane(DriverKind::Process, "readopt", dir.path()).await;
        call(
            &first,
            Command::RunInstances {
                instance_id: id.clone(),
                spec: spec(&["sleep", "600"]),
            },
        )
        .await;
        assert_eq!(status(&first, &id).await.processes, Some(1));
    }
    // A new agent process: same book, same host.
    let second = plane(DriverKind::Process, "readopt", dir.path()).await;
    let again = describe(&second, &id).await;
    assert_eq!(
        again.state,
        InstanceState::Running,
        "re-adopted, not orphaned"
    );
    // A retried RunInstances does not start a second copy.
    call(
        &second,
        Command::RunInstances {
            instance_id: id.clone(),
            spec: spec(&["sleep", "600"]),
        },
    )
    .await;
    assert_eq!(
        status(&second, &id).await.processes,
        Some(1),
        "not duplicated"
    );

    // The process dies behind the agent's back: the state says so, with a reason.
    let group = std::fs::read_to_string(format!(
        "{}/cgroup.procs",
        again.native_id.as_deref().unwrap()
    ))
    .unwrap();
    let pid: i32 = group.trim().parse().unwrap();
    kill9(pid);
    let stopped = eventually_state(&second, &id, InstanceState::Stopped).await;
    assert!(stopped.state_reason.unwrap().contains("ended"));
    call(
        &second,
        Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids: vec![id],
        },
    )
    .await;
}

/// SIGKILL, as an operator (or the OOM killer) would.
fn kill9(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn hostile_values_are_refused_or_passed_literally() {
    let dir = tempfile::tempdir().unwrap();
    let plane = plane(DriverKind::Process, "hostile", dir.path()).await;
    let refused = |c: Command| {
        let plane = plane.clone();
        async move { plane.handle(c).await.expect_err("refused") }
    };
    for name in ["a;rm -rf /", "$(id)", "x\"y", "../../etc"] {
        let e = refused(Command::RunInstances {
            instance_id: new_id(INSTANCE_PREFIX),
            spec: RunSpec {
                name: Some(name.into()),
                ..spec(&["true"])
            },
        })
        .await;
        assert_eq!(e.field.as_deref(), Some("name"), "{name}: {e}");
    }
    let e = refused(Command::CreateVolume {
        volume_id: "vol-../../../etc".into(),
        name: None,
        size_bytes: 1,
    })
    .await;
    assert_eq!(e.field.as_deref(), Some("volume_id"));
    let e = refused(Command::CreateVolume {
        volume_id: new_id(VOLUME_PREFIX),
        name: Some("../x".into()),
        size_bytes: 1,
    })
    .await;
    assert_eq!(e.field.as_deref(), Some("name"));

    // Arguments, environment and labels are data: they reach the program unchanged.
    let id = new_id(INSTANCE_PREFIX);
    let hostile = "$(touch /tmp/pwned); `id` \"q\" 'x' ../..";
    let mut s = spec(&["printf", "%s|%s", hostile]);
    s.command.push("$HOME".into());
    s.labels.insert("note".into(), hostile.into());
    call(
        &plane,
        Command::RunInstances {
            instance_id: id.clone(),
            spec: s,
        },
    )
    .await;
    let done = eventually_state(&plane, &id, InstanceState::Stopped).await;
    assert_eq!(done.spec.labels["note"], hostile);
    assert_eq!(status(&plane, &id).await.exit_code, Some(0));
    let out =
        std::fs::read_to_string(dir.path().join(format!("control/logs/{id}.stdout.log"))).unwrap();
    assert_eq!(out, format!("{hostile}|$HOME"));
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    call(
        &plane,
        Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids: vec![id],
        },
    )
    .await;
}
