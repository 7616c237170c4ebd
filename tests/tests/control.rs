//! The primary control interface end to end: the compatibility kit against the
//! process (real cgroups), docker (the real engine) and mapped (the shipped mapping of
//! the Docker Engine API) drivers; re-adoption after an agent restart; hostile values.

use std::sync::Arc;
use std::time::Duration;

use surplus_agent::compat::run_suite;
use surplus_agent::control::ControlConfig;
use surplus_agent::control::{self, ControlPlane, DriverKind};
use surplus_protocol::clock::{self, Clock};
use surplus_protocol::control::*;
use surplus_tests::{CgroupGuard, control_config};

async fn plane(driver: DriverKind, tag: &str, dir: &std::path::Path) -> Arc<ControlPlane> {
    plane_with(&control_config(driver, tag), dir, clock::system()).await
}

/// A control plane over the driver `config` names, its book under `dir`.
async fn plane_with(
    config: &ControlConfig,
    dir: &std::path::Path,
    clock: Arc<dyn Clock>,
) -> Arc<ControlPlane> {
    let driver = control::open_driver(config, dir).await.unwrap_or_else(|e| {
        panic!(
            "the {:?} driver must start on this host (root, cgroups, docker): {e}",
            config.driver
        )
    });
    ControlPlane::open(driver, dir.join("control"), clock, config)
        .await
        .expect("book opens")
}

/// The compatibility kit against the driver `config` names.
async fn kit_report(config: &ControlConfig, dir: &std::path::Path) -> CompatReport {
    let plane = plane_with(config, dir, clock::system()).await;
    run_suite(
        &plane,
        &control::compat_profile(config),
        clock::system().now_ms(),
    )
    .await
}

fn cgroups(tag: &str) -> CgroupGuard {
    CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    )
}

async fn kit(driver: DriverKind, tag: &str) {
    let _cgroups = cgroups(tag);
    let dir = tempfile::tempdir().unwrap();
    let report = kit_report(&control_config(driver, tag), dir.path()).await;
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(failed.is_empty(), "{tag}: failed checks {failed:#?}");
    assert_eq!(
        report.checks.len(),
        COMPUTE_OPERATIONS.len() + STORAGE_OPERATIONS.len()
    );
    assert_eq!(report.level, CompatLevel::Fully, "{tag}");
    // The kit ran with the sandbox on, and says so: never the agent's own user by
    // default, capabilities dropped and a process limit where the driver enforces them.
    let isolation = &report.isolation;
    assert!(
        !isolation.host_user,
        "{tag}: allow_host_user is off by default"
    );
    match driver {
        DriverKind::Process => {
            assert!(
                isolation.own_user && isolation.capabilities_dropped,
                "{isolation:?}"
            );
            assert_eq!(isolation.default_pids, Some(512));
            assert!(isolation.volume_sizes_enforced, "{isolation:?}");
        }
        DriverKind::Docker => {
            assert!(isolation.capabilities_dropped, "{isolation:?}");
            assert!(isolation.user_namespaces.is_some(), "{isolation:?}");
            assert_eq!(isolation.default_pids, Some(512));
        }
        _ => assert!(!isolation.notes.is_empty(), "{isolation:?}"),
    }
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

/// A provider whose API covers compute but whose storage is two programs and no
/// snapshots: the kit runs the programs (allow-listed, argv only), reports snapshots as
/// unsupported, and rates the driver highly, not fully, compatible.
#[tokio::test]
async fn a_partial_mapping_with_programs_is_rated_by_what_it_supports() {
    let dir = tempfile::tempdir().unwrap();
    let volumes = dir.path().join("provider-volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    let docker = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/mapped-docker.toml"
    ))
    .unwrap();
    // The shipped compute operations, a constant naming where volumes go, and the
    // engine's container id captured as the instance's native id.
    let compute = docker[..docker.find("[[ops.volume_create.steps]]").unwrap()]
        .replace(
            "[constants]\n",
            &format!("[constants]\nvolumes_dir = \"{}\"\n", volumes.display()),
        )
        .replacen(
            "accept = [201, 409]",
            "accept = [201]\ncapture = { native_id = \"/Id\" }",
            1,
        );
    let mapping = format!(
        r#"allowed_programs = ["/bin/mkdir", "/bin/rm", "/bin/echo"]
{compute}
[[ops.volume_create.steps]]
program = "/bin/mkdir"
args = ["-p", "{{{{volumes_dir}}}}/{{{{volume_id}}}}"]

[[ops.volume_create.steps]]
program = "/bin/echo"
args = ['{{"Name": "{{{{volumes_dir}}}}/{{{{volume_id}}}}"}}']

[[ops.volume_delete.steps]]
program = "/bin/rm"
args = ["-rf", "--", "{{{{volume_native_id}}}}"]
"#
    );
    let file = dir.path().join("partial.toml");
    std::fs::write(&file, mapping).unwrap();
    let mut config = control_config(DriverKind::Mapped, "partial");
    config.mapped.file = file;
    let plane = plane_with(&config, dir.path(), clock::system()).await;
    let report = run_suite(
        &plane,
        &control::compat_profile(&config),
        clock::system().now_ms(),
    )
    .await;
    let by_op = |op: &str| {
        report
            .checks
            .iter()
            .find(|c| c.operation == op)
            .unwrap()
            .clone()
    };
    for op in COMPUTE_OPERATIONS
        .iter()
        .chain(&["volume-create", "volume-attach", "volume-delete"])
    {
        assert!(by_op(op).passed, "{op}: {:?}", by_op(op).message);
    }
    let snapshot = by_op("snapshot");
    assert!(!snapshot.passed);
    assert!(
        snapshot
            .message
            .unwrap()
            .contains("does not support snapshot")
    );
    assert_eq!(report.level, CompatLevel::Highly);
    match call(&plane, Command::DescribeInstances(Filters::default())).await {
        ControlReply::Instances(list) => {
            assert_eq!(list.len(), 2);
            for i in list {
                let native = i.native_id.unwrap();
                assert!(
                    native.len() == 64 && native.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{native}"
                );
            }
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(&volumes).unwrap().count(),
        0,
        "the delete program ran"
    );
}

/// The mapped driver over TCP: the shipped Docker mapping pointed at a TCP address
/// that relays to the engine's socket (as a provider's API on another port would be).
#[tokio::test]
async fn the_mapped_driver_speaks_http_over_tcp_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let relay = tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut unix = tokio::net::UnixStream::connect("/var/run/docker.sock")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let docker = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/mapped-docker.toml"
    ))
    .unwrap();
    let over_tcp = docker.replace(
        "unix_socket = \"/var/run/docker.sock\"",
        &format!("address = \"{address}\""),
    );
    assert_ne!(over_tcp, docker);
    let file = dir.path().join("tcp.toml");
    std::fs::write(&file, over_tcp).unwrap();
    let mut config = control_config(DriverKind::Mapped, "tcp");
    config.mapped.file = file;
    let report = kit_report(&config, dir.path()).await;
    assert_eq!(report.level, CompatLevel::Fully, "{:#?}", report.checks);
    relay.abort();
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
    let _cgroups = cgroups("readopt");
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

    // The process dies behind the agent's back: the state says so, with a reason. (The
    // group also holds the sandbox's supervisor and init; the client's program is PID 2
    // of the instance's namespace, and the others end with it.)
    let group = std::fs::read_to_string(format!(
        "{}/cgroup.procs",
        again.native_id.as_deref().unwrap()
    ))
    .unwrap();
    let workload = group
        .lines()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("2"))
        })
        .expect("the workload is in the group");
    kill9(workload.trim().parse().unwrap());
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

/// An agent started with a relative `--data-dir`: the sandbox is built after the child
/// changed to `/`, so the driver works with absolute paths.
#[tokio::test]
async fn a_relative_data_directory_works() {
    let _cgroups = cgroups("relative");
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count() - 1);
    let relative = std::path::PathBuf::from(up).join(dir.path().strip_prefix("/").unwrap());
    assert!(relative.is_relative());
    let plane = plane(DriverKind::Process, "relative", &relative).await;
    let id = new_id(INSTANCE_PREFIX);
    call(
        &plane,
        Command::RunInstances {
            instance_id: id.clone(),
            spec: spec(&["sleep", "600"]),
        },
    )
    .await;
    assert_eq!(describe(&plane, &id).await.state, InstanceState::Running);
    call(
        &plane,
        Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids: vec![id],
        },
    )
    .await;
}

#[tokio::test]
async fn a_start_that_fails_is_an_error_and_leaves_a_terminated_record() {
    let _cgroups = cgroups("fails");
    let dir = tempfile::tempdir().unwrap();
    let plane = plane(DriverKind::Process, "fails", dir.path()).await;
    let id = new_id(INSTANCE_PREFIX);
    let e = plane
        .handle(Command::RunInstances {
            instance_id: id.clone(),
            spec: spec(&["/nonexistent/program"]),
        })
        .await
        .expect_err("nothing to start");
    assert_eq!(e.kind, FailureKind::Driver);
    assert!(e.message.contains("/nonexistent/program"), "{e}");
    let record = describe(&plane, &id).await;
    assert_eq!(record.state, InstanceState::Terminated);
    assert!(record.state_reason.unwrap().starts_with("failed to start"));
    // Operations on it say why they cannot run.
    let e = plane
        .handle(Command::Lifecycle {
            op: Lifecycle::Start,
            ids: vec![id],
        })
        .await
        .expect_err("terminated is final");
    assert_eq!(e.kind, FailureKind::Conflict);
}

#[tokio::test]
async fn terminated_instances_are_forgotten_after_the_retention() {
    let _cgroups = cgroups("retention");
    let dir = tempfile::tempdir().unwrap();
    let config = control_config(DriverKind::Process, "retention");
    let clock = clock::ManualClock::new(1_700_000_000_000);
    let plane = plane_with(&config, dir.path(), clock.clone()).await;
    let id = new_id(INSTANCE_PREFIX);
    call(
        &plane,
        Command::RunInstances {
            instance_id: id.clone(),
            spec: spec(&["sleep", "600"]),
        },
    )
    .await;
    call(
        &plane,
        Command::Lifecycle {
            op: Lifecycle::Terminate,
            ids: vec![id.clone()],
        },
    )
    .await;
    clock.advance_ms(59 * 60 * 1000);
    assert_eq!(
        describe(&plane, &id).await.state,
        InstanceState::Terminated,
        "kept within the hour"
    );
    clock.advance_ms(2 * 60 * 1000);
    match call(&plane, Command::DescribeInstances(Filters::default())).await {
        ControlReply::Instances(list) => assert!(list.is_empty(), "{list:?}"),
        other => panic!("{other:?}"),
    }
    assert!(
        !dir.path()
            .join(format!("control/instances/{id}.json"))
            .exists()
    );
}

#[tokio::test]
async fn hostile_values_are_refused_or_passed_literally() {
    let _cgroups = cgroups("hostile");
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

mod through_the_controller {
    use std::time::Duration;

    use serde_json::{Value, json};
    use surplus_agent::control::DriverKind;
    use surplus_api::control::ControlResponse;
    use surplus_controller::registry::RegistryEvent;
    use surplus_protocol::clock;
    use surplus_protocol::control::InstanceState;
    use surplus_tests::{
        BUSYBOX_IMAGE, CgroupGuard, RunningAgent, TestController, bin, control_config,
    };

    /// `surplus <args> --json` as a user runs it; the parsed answer, or the error text.
    async fn cli(tc: &TestController, token: &str, args: &[&str]) -> Result<Value, String> {
        tc.cli(token, args).await
    }

    fn response(v: Value) -> ControlResponse {
        serde_json::from_value(v).expect("a control response")
    }

    fn instance_id(v: Value) -> String {
        match response(v) {
            ControlResponse::Instances(l) => l[0].instance.id.clone(),
            other => panic!("{other:?}"),
        }
    }

    async fn state_via_cli(tc: &TestController, id: &str) -> InstanceState {
        match response(cli(tc, &tc.admin_token, &["describe", id]).await.unwrap()) {
            ControlResponse::Instances(l) => l[0].instance.state,
            other => panic!("{other:?}"),
        }
    }

    async fn lifecycle(tc: &TestController, id: &str, verb: &str, want: InstanceState) {
        let v = cli(tc, &tc.admin_token, &[verb, id])
            .await
            .unwrap_or_else(|e| panic!("{verb}: {e}"));
        match response(v) {
            ControlResponse::StateChanges(c) => assert_eq!(c[0].current, want, "{verb}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(state_via_cli(tc, id).await, want, "describe after {verb}");
    }

    async fn online(driver: DriverKind, tag: &str) -> (TestController, RunningAgent, CgroupGuard) {
        let guard = CgroupGuard(control_config(driver, tag).process.cgroup_parent);
        let tc = TestController::start().await;
        let mut events = tc.events();
        let (mut config, identity) = tc.enroll(tag, &[]).await;
        config.control = control_config(driver, tag);
        let agent = RunningAgent::spawn(config, clock::system());
        let id = identity.agent_id;
        events
            .until("agent online", |e| *e == RegistryEvent::Online(id))
            .await;
        (tc, agent, guard)
    }

    /// What the host itself says the limits are: the cgroup files, or the engine.
    async fn host_limits(driver: DriverKind, tag: &str, id: &str) -> (String, String) {
        match driver {
            DriverKind::Process => {
                let parent = control_config(driver, tag).process.cgroup_parent;
                let read = |p: String| std::fs::read_to_string(p).unwrap().trim().to_owned();
                (
                    read(format!("/sys/fs/cgroup/cpu/{parent}/{id}/cpu.cfs_quota_us")),
                    read(format!(
                        "/sys/fs/cgroup/memory/{parent}/{id}/memory.limit_in_bytes"
                    )),
                )
            }
            _ => {
                let out = tokio::process::Command::new("docker")
                    .args([
                        "inspect",
                        "-f",
                        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
                        &format!("surplus-{id}"),
                    ])
                    .output()
                    .await
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                let (a, b) = text.split_once(' ').expect("two figures");
                (a.to_owned(), b.to_owned())
            }
        }
    }

    async fn full_lifecycle(driver: DriverKind, tag: &str, expected: (&str, &str)) {
        let (tc, agent, _cgroups) = online(driver, tag).await;
        let mut run = vec![
            "run",
            "--cpus",
            "0.5",
            "--memory",
            "64MiB",
            "--pids",
            "64",
            "--label",
            "team=blue",
        ];
        if driver != DriverKind::Process {
            run.extend(["--image", BUSYBOX_IMAGE]);
        }
        run.extend(["--", "sleep", "600"]);
        let id = instance_id(cli(&tc, &tc.admin_token, &run).await.unwrap());

        let status = cli(&tc, &tc.admin_token, &["describe", "--status", &id])
            .await
            .unwrap();
        assert_eq!(status["statuses"][0]["state"], "running");
        assert_eq!(
            status["statuses"][0]["applied"],
            json!({"millicpus": 500, "memory_bytes": 64 << 20, "pids": 64})
        );
        let (cpu, mem) = host_limits(driver, tag, &id).await;
        assert_eq!(
            (cpu.as_str(), mem.as_str()),
            expected,
            "limits as the host applies them"
        );

        lifecycle(&tc, &id, "stop", InstanceState::Stopped).await;
        lifecycle(&tc, &id, "start", InstanceState::Running).await;
        lifecycle(&tc, &id, "reboot", InstanceState::Running).await;
        lifecycle(&tc, &id, "terminate", InstanceState::Terminated).await;

        let created = cli(
            &tc,
            &tc.admin_token,
            &["volumes", "create", "--size", "64MiB", "--name", "scratch"],
        )
        .await
        .unwrap();
        let vol = created["volumes"][0]["id"].as_str().unwrap().to_owned();
        let mut with_volume = vec!["run", "--volume"];
        let attach = format!("{vol}:/data");
        with_volume.push(&attach);
        if driver != DriverKind::Process {
            with_volume.extend(["--image", BUSYBOX_IMAGE]);
        }
        with_volume.extend(["--", "sleep", "600"]);
        let user = instance_id(cli(&tc, &tc.admin_token, &with_volume).await.unwrap());
        let listed = cli(&tc, &tc.admin_token, &["volumes", "list"])
            .await
            .unwrap();
        assert_eq!(listed["volumes"][0]["state"], "in-use");
        assert_eq!(listed["volumes"][0]["attached_to"], user.as_str());
        let snap = cli(&tc, &tc.admin_token, &["volumes", "snapshot", &vol])
            .await
            .unwrap();
        assert!(std::path::Path::new(snap["snapshot"]["location"].as_str().unwrap()).exists());
        let refused = cli(&tc, &tc.admin_token, &["volumes", "delete", &vol])
            .await
            .unwrap_err();
        assert!(
            refused.contains("409") && refused.contains("attached"),
            "{refused}"
        );
        lifecycle(&tc, &user, "terminate", InstanceState::Terminated).await;
        let deleted = cli(&tc, &tc.admin_token, &["volumes", "delete", &vol])
            .await
            .unwrap();
        assert_eq!(deleted["volumes"][0]["state"], "deleted");
        agent.stop().await;
    }

    #[tokio::test]
    async fn the_full_lifecycle_through_the_cli_on_the_process_driver() {
        full_lifecycle(DriverKind::Process, "cli-process", ("50000", "67108864")).await;
    }

    #[tokio::test]
    async fn the_full_lifecycle_through_the_cli_on_the_docker_driver() {
        full_lifecycle(DriverKind::Docker, "cli-docker", ("500000000", "67108864")).await;
    }

    #[tokio::test]
    async fn the_full_lifecycle_through_the_cli_on_the_mapped_driver() {
        full_lifecycle(DriverKind::Mapped, "cli-mapped", ("500000000", "67108864")).await;
    }

    #[tokio::test]
    async fn surplus_modify_changes_what_it_is_given() {
        let (tc, agent, _cgroups) = online(DriverKind::Process, "cli-modify").await;
        let ran = cli(
            &tc,
            &tc.admin_token,
            &[
                "run",
                "--cpus",
                "0.5",
                "--label",
                "team=blue",
                "--",
                "sleep",
                "600",
            ],
        )
        .await
        .unwrap();
        let id = instance_id(ran);
        let changed = cli(
            &tc,
            &tc.admin_token,
            &["modify", &id, "--cpus", "0.25", "--label", "team=red"],
        )
        .await
        .unwrap();
        assert!(
            matches!(response(changed), ControlResponse::Attribute { ref instance_id, .. } if *instance_id == id)
        );
        let status = cli(&tc, &tc.admin_token, &["describe", "--status", &id])
            .await
            .unwrap();
        assert_eq!(
            status["statuses"][0]["applied"]["millicpus"], 250,
            "{status}"
        );
        match response(cli(&tc, &tc.admin_token, &["describe", &id]).await.unwrap()) {
            ControlResponse::Instances(l) => {
                assert_eq!(l[0].instance.spec.labels["team"], "red");
            }
            other => panic!("{other:?}"),
        }
        let refused = cli(&tc, &tc.admin_token, &["modify", &id])
            .await
            .unwrap_err();
        assert!(refused.contains("nothing to modify"), "{refused}");
        lifecycle(&tc, &id, "terminate", InstanceState::Terminated).await;
        agent.stop().await;
    }

    async fn post(tc: &TestController, token: &str, body: Value) -> (u16, Value) {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/control", tc.url()))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    #[tokio::test]
    async fn tokens_make_runs_idempotent_and_only_owners_control_instances() {
        let (tc, agent, _cgroups) = online(DriverKind::Process, "api").await;
        let (_, alice) = tc
            .api_post(
                "/v1/api-tokens",
                json!({"account": "alice", "role": "client"}),
            )
            .await;
        let (_, mallory) = tc
            .api_post(
                "/v1/api-tokens",
                json!({"account": "mallory", "role": "client"}),
            )
            .await;
        let (alice, mallory) = (
            alice["token"].as_str().unwrap(),
            mallory["token"].as_str().unwrap(),
        );

        let run = json!({"action": "RunInstances", "client_token": "deploy-42", "command": ["sleep", "600"]});
        let (s1, first) = post(&tc, alice, run.clone()).await;
        let (s2, second) = post(&tc, alice, run.clone()).await;
        assert_eq!((s1, s2), (200, 200), "{first} {second}");
        let id = first["instances"][0]["id"].as_str().unwrap().to_owned();
        assert_eq!(
            second["instances"][0]["id"],
            id.as_str(),
            "one instance for one token"
        );
        let (_, status) = post(
            &tc,
            alice,
            json!({"action": "DescribeInstanceStatus", "ids": [id]}),
        )
        .await;
        assert_eq!(status["statuses"][0]["processes"], 1, "started once");
        let (s, e) = post(&tc, alice, json!({"action": "RunInstances", "client_token": "deploy-42", "command": ["sleep", "1"]})).await;
        assert_eq!(
            (s, e["error"].as_str()),
            (409, Some("conflict")),
            "a token reused for another request: {e}"
        );

        for verb in ["StopInstances", "TerminateInstances"] {
            let (s, e) = post(&tc, mallory, json!({"action": verb, "ids": [id]})).await;
            assert_eq!(
                (s, e["error"].as_str()),
                (403, Some("forbidden")),
                "{verb}: {e}"
            );
        }
        let (_, mine) = post(&tc, mallory, json!({"action": "DescribeInstances"})).await;
        assert_eq!(
            mine["instances"],
            json!([]),
            "others' instances are not listed"
        );
        let (s, e) = post(
            &tc,
            alice,
            json!({"action": "StopInstances", "ids": ["i-00000000000000ff"]}),
        )
        .await;
        assert_eq!(s, 404, "{e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("i-00000000000000ff")
        );
        for (body, field) in [
            (json!({"action": "Reticulate"}), "action"),
            (
                json!({"action": "RunInstances", "name": "x; rm -rf /", "command": ["true"]}),
                "name",
            ),
            (
                json!({"action": "RunInstances", "command": ["true"], "volumes": [{"volume_id": "vol-../../etc", "mount_path": "/d"}]}),
                "volumes[0].volume_id",
            ),
            (
                json!({"action": "RunInstances", "limits": {"memory_bytes": "much"}}),
                "limits.memory_bytes",
            ),
            (
                json!({"action": "CreateVolume", "size_bytes": 1, "colour": "red"}),
                "colour",
            ),
        ] {
            let (s, e) = post(&tc, alice, body).await;
            assert_eq!((s, e["field"].as_str()), (400, Some(field)), "{e}");
        }
        let (s, stopped) = post(&tc, alice, json!({"action": "StopInstances", "ids": [id]})).await;
        assert_eq!(s, 200, "{stopped}");

        // The agent goes away: commands say which agent and when it was last seen;
        // descriptions show the last known record, marked stale.
        let agent_id = agent.id;
        let mut events = tc.events();
        agent.stop().await;
        events
            .until(
                "agent gone",
                |e| matches!(e, RegistryEvent::Disconnected(a) if *a == agent_id),
            )
            .await;
        let (s, e) = post(&tc, alice, json!({"action": "StartInstances", "ids": [id]})).await;
        assert_eq!(
            (s, e["error"].as_str()),
            (503, Some("agent_offline")),
            "{e}"
        );
        assert_eq!(e["agent_id"], agent_id.to_string());
        assert!(e["last_seen_ms"].as_i64().is_some());
        let (s, cached) = post(
            &tc,
            alice,
            json!({"action": "DescribeInstances", "ids": [id]}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(cached["instances"][0]["stale"], true);
        assert_eq!(cached["instances"][0]["state"], "stopped");
    }

    /// Runs an instance that ignores SIGTERM, so a stop waits out the grace period.
    async fn run_stubborn(tc: &TestController) -> String {
        let (_, ran) = tc
            .api_post(
                "/v1/control",
                json!({"action": "RunInstances", "command": ["sh", "-c", "trap '' TERM; sleep 600 & wait"]}),
            )
            .await;
        ran["instances"][0]["id"]
            .as_str()
            .expect("an instance")
            .to_owned()
    }

    /// Polls DescribeInstances until the instance is in `state` (real processes and
    /// signals: there is no event to await), at most 15 s.
    async fn until_state(tc: &TestController, id: &str, state: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (_, d) = tc
                .api_post(
                    "/v1/control",
                    json!({"action": "DescribeInstances", "ids": [id]}),
                )
                .await;
            if d["instances"][0]["state"] == state {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never {state}: {d}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_command_longer_than_the_control_timeout_is_a_504_and_still_completes() {
        let tag = "slow";
        let _cgroups = CgroupGuard(
            control_config(DriverKind::Process, tag)
                .process
                .cgroup_parent,
        );
        let config = surplus_controller::ControllerConfig {
            control_timeout: Duration::from_secs(1),
            ..surplus_tests::test_config()
        };
        let tc = TestController::start_with(config, clock::system()).await;
        let mut events = tc.events();
        let (mut agent_config, identity) = tc.enroll(tag, &[]).await;
        agent_config.control = control_config(DriverKind::Process, tag);
        agent_config.control.stop_grace = Duration::from_secs(3);
        let agent = RunningAgent::spawn(agent_config, clock::system());
        let agent_id = identity.agent_id;
        events
            .until("online", |e| *e == RegistryEvent::Online(agent_id))
            .await;
        let id = run_stubborn(&tc).await;
        let (s, e) = tc
            .api_post(
                "/v1/control",
                json!({"action": "StopInstances", "ids": [id]}),
            )
            .await;
        assert_eq!(
            (s, e["error"].as_str()),
            (504, Some("agent_timeout")),
            "{e}"
        );
        assert_eq!(e["agent_id"], agent_id.to_string());
        // The agent finishes the stop (SIGKILL after the grace period) on its own.
        until_state(&tc, &id, "stopped").await;
        agent.stop().await;
    }

    #[tokio::test]
    async fn terminated_is_final_and_old_ones_are_listed_only_by_id() {
        let tag = "final";
        let _cgroups = CgroupGuard(
            control_config(DriverKind::Process, tag)
                .process
                .cgroup_parent,
        );
        let config = surplus_controller::ControllerConfig {
            terminated_retention: Duration::ZERO,
            ..surplus_tests::test_config()
        };
        let tc = TestController::start_with(config, clock::system()).await;
        let mut events = tc.events();
        let (mut agent_config, identity) = tc.enroll(tag, &[]).await;
        agent_config.control = control_config(DriverKind::Process, tag);
        agent_config.control.terminated_retention = Duration::ZERO;
        let agent = RunningAgent::spawn(agent_config, clock::system());
        events
            .until("online", |e| *e == RegistryEvent::Online(identity.agent_id))
            .await;
        let (_, ran) = tc
            .api_post(
                "/v1/control",
                json!({"action": "RunInstances", "command": ["sleep", "600"]}),
            )
            .await;
        let id = ran["instances"][0]["id"]
            .as_str()
            .expect("an instance")
            .to_owned();
        tc.api_post(
            "/v1/control",
            json!({"action": "TerminateInstances", "ids": [id]}),
        )
        .await;
        let (_, all) = tc
            .api_post("/v1/control", json!({"action": "DescribeInstances"}))
            .await;
        assert_eq!(
            all["instances"],
            json!([]),
            "past the retention, not listed"
        );
        let (_, one) = tc
            .api_post(
                "/v1/control",
                json!({"action": "DescribeInstances", "ids": [id]}),
            )
            .await;
        assert_eq!(one["instances"][0]["state"], "terminated", "{one}");
        let (s, again) = tc
            .api_post(
                "/v1/control",
                json!({"action": "TerminateInstances", "ids": [id]}),
            )
            .await;
        assert_eq!(
            (s, again["state_changes"][0]["current"].as_str()),
            (200, Some("terminated"))
        );
        let (s, e) = tc
            .api_post(
                "/v1/control",
                json!({"action": "StartInstances", "ids": [id]}),
            )
            .await;
        assert_eq!((s, e["error"].as_str()), (409, Some("conflict")), "{e}");
        let (s, st) = tc
            .api_post(
                "/v1/control",
                json!({"action": "DescribeInstanceStatus", "ids": [id]}),
            )
            .await;
        assert_eq!(
            (s, st["statuses"][0]["state"].as_str()),
            (200, Some("terminated"))
        );
        agent.stop().await;
    }

    /// A real `surplus-agent` process, killed with SIGKILL in the middle of a stop.
    struct AgentProcess(std::process::Child);

    impl Drop for AgentProcess {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn agent_process(config: &std::path::Path, dir: &std::path::Path) -> AgentProcess {
        AgentProcess(
            std::process::Command::new(bin("surplus-agent"))
                .arg("--config")
                .arg(config)
                .arg("--data-dir")
                .arg(dir)
                .arg("run")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("surplus-agent starts"),
        )
    }

    #[tokio::test]
    async fn an_agent_killed_mid_command_fails_the_command_and_is_reconciled_on_return() {
        let tag = "killed";
        let _cgroups = CgroupGuard(
            control_config(DriverKind::Process, tag)
                .process
                .cgroup_parent,
        );
        let tc = TestController::start().await;
        let (config, identity) = tc.enroll(tag, &[]).await;
        let agent_id = identity.agent_id;
        let file = tc.root.path().join("agent.toml");
        std::fs::write(
            &file,
            format!(
                "reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\nidle_timeout = \"5s\"\nkeep_alive = \"1s\"\n\n[control]\ndriver = \"process\"\nstop_grace = \"3s\"\n\n[control.process]\ncgroup_parent = \"{}\"\n",
                control_config(DriverKind::Process, tag).process.cgroup_parent
            ),
        )
        .unwrap();

        // The compatibility kit, run by an operator on the host and reported.
        let compat = tokio::process::Command::new(bin("surplus-agent"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(&config.data_dir)
            .args(["compat", "--report"])
            .output()
            .await
            .unwrap();
        assert!(
            compat.status.success(),
            "{}",
            String::from_utf8_lossy(&compat.stderr)
        );
        let (s, report) = tc.api_get(&format!("/v1/agents/{agent_id}/compat")).await;
        assert_eq!(
            (s, report["level"].as_str()),
            (200, Some("fully")),
            "{report}"
        );
        assert_eq!(report["checks"].as_array().unwrap().len(), 11);

        let mut events = tc.events();
        let mut process = agent_process(&file, &config.data_dir);
        events
            .until("agent online", |e| *e == RegistryEvent::Online(agent_id))
            .await;
        let id = run_stubborn(&tc).await;
        let url = tc.url();
        let token = tc.admin_token.clone();
        let stop_id = id.clone();
        let stopping = tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/control"))
                .bearer_auth(token)
                .json(&json!({"action": "StopInstances", "ids": [stop_id]}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        });
        until_state(&tc, &id, "stopping").await;
        process.0.kill().unwrap();
        process.0.wait().unwrap();
        let (s, e) = stopping.await.unwrap();
        // The connection loss ends the command, not the 20 s control timeout.
        assert_eq!(
            (s, e["error"].as_str()),
            (503, Some("agent_offline")),
            "{e}"
        );

        // Back again: the interrupted stop is settled against the host (the processes
        // ignored SIGTERM and were never killed), without a second copy.
        let mut events = tc.events();
        let _process = agent_process(&file, &config.data_dir);
        events
            .until("reconciled", |e| *e == RegistryEvent::Reconciled(agent_id))
            .await;
        let (_, d) = tc
            .api_post(
                "/v1/control",
                json!({"action": "DescribeInstances", "ids": [id]}),
            )
            .await;
        assert_eq!(d["instances"][0]["state"], "running", "{d}");
        assert_eq!(d["instances"][0]["stale"], false);
        let (_, st) = tc
            .api_post(
                "/v1/control",
                json!({"action": "DescribeInstanceStatus", "ids": [id]}),
            )
            .await;
        assert_eq!(
            st["statuses"][0]["processes"], 2,
            "sh and sleep, once: {st}"
        );
        let (s, t) = tc
            .api_post(
                "/v1/control",
                json!({"action": "TerminateInstances", "ids": [id]}),
            )
            .await;
        assert_eq!(
            (s, t["state_changes"][0]["current"].as_str()),
            (200, Some("terminated")),
            "{t}"
        );
    }
}
