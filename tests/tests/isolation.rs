//! Instances a provider can trust. A hostile client, through the API, runs a script
//! that tries what an attacker would: become root, read the agent's key and spool,
//! reach other instances' files, move itself out of its cgroup, gain privileges from a
//! set-uid binary, exhaust the host's process table, overfill its volume. The process
//! driver (real namespaces, cgroups and loop-mounted volumes) and the Docker driver
//! (the real engine) must hold on every point while the agent and a neighbouring
//! instance carry on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use surplus_agent::control::{ControlConfig, DriverKind};
use surplus_controller::registry::RegistryEvent;
use surplus_protocol::clock;
use surplus_tests::{CgroupGuard, RunningAgent, TestController, control_config, probe_image};

/// What the hostile instance does. Every probe prints `name=value`; a probe that must
/// fail prints `yes` when it succeeded. It ends with the fork flood (which may leave the
/// shell unable to fork), then keeps running so that its cgroup can be inspected.
const HOSTILE: &str = r#"
r() { if "$@" >/dev/null 2>&1; then echo yes; else echo no; fi; }
echo "uid=$(id -u)"
echo "gid=$(id -g)"
echo "identity=$(r cat "$IDENTITY")"
echo "spool=$(r ls "$SPOOL")"
echo "control=$(r ls "$CONTROL")"
echo "agents_dir=$(r test ! -d "$AGENTS_DIR")"
echo "procs_root=$(r sh -c 'echo $$ > /sys/fs/cgroup/memory/cgroup.procs')"
echo "procs_own=$(r sh -c "echo \$\$ > $OWN_PROCS")"
echo "status=$(grep -E '^(NoNewPrivs|Seccomp|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status | tr -d ' \t' | tr '\n' ',')"
echo "suid=$(sh -c "$SUID_TEST" 2>&1)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
echo "fds=$(ls /proc/self/fd | tr '\n' ' ')"
echo "docker_socket=$(r ls /var/run/docker.sock /run/docker.sock)"
echo "volume_write=$(r sh -c 'echo hello > /data/hello')"
echo "enospc=$(dd if=/dev/zero of=/data/big bs=1048576 count=100 2>&1 | grep -c 'No space left')"
rm -f /data/big
echo "tmp_write=$(r sh -c 'echo x > /tmp/x')"
echo "root_write=$(r sh -c 'echo x > /x')"
echo "userns=$(r unshare -U true)"
echo "mount=$(r mount -t tmpfs none /tmp)"
echo "etc_write=$(r sh -c 'echo x >> /etc/passwd')"
echo "flood=start"
( i=0; while [ $i -lt 200 ]; do sleep 5 & i=$((i+1)); echo $i > /tmp/forked; done ) 2>/tmp/forkerr
echo "forked=$(cat /tmp/forked)"
echo "fork_refused=$(grep -c -i -e 'fork' -e 'resource' -e 'again' /tmp/forkerr)"
echo "done=1"
exec sleep 600
"#;

async fn post(tc: &TestController, token: &str, body: Value) -> (u16, Value) {
    tc.api_as(token, reqwest::Method::POST, "/v1/control", Some(body))
        .await
}

/// A control request that must succeed; its answer.
async fn ok(tc: &TestController, token: &str, body: Value) -> Value {
    let (status, answer) = post(tc, token, body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The instance's output through the API (`ReadLogs`), polled until `marker` appears.
async fn output_until(tc: &TestController, token: &str, id: &str, marker: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = tc
            .api_as(
                token,
                reqwest::Method::GET,
                &format!("/v1/instances/{id}/logs"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let out = body["stdout"].as_str().unwrap_or("").to_owned();
        if out.contains(marker) {
            return out;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {marker:?} in the instance's output:\n{out}\nstderr:\n{}",
            body["stderr"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn probes(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn capability_sets(status: &str) -> BTreeMap<String, String> {
    status
        .split(',')
        .filter_map(|kv| kv.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

struct Online {
    tc: TestController,
    agent: RunningAgent,
    agent_dir: PathBuf,
    _cgroups: CgroupGuard,
}

async fn online(
    driver: DriverKind,
    tag: &str,
    adjust: impl FnOnce(&mut ControlConfig, &Path),
) -> Online {
    let cgroups = CgroupGuard(control_config(driver, tag).process.cgroup_parent);
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (mut config, identity) = tc.enroll(tag, &[]).await;
    config.control = control_config(driver, tag);
    adjust(&mut config.control, &config.data_dir);
    let agent_dir = config.data_dir.clone();
    let agent = RunningAgent::spawn(config, clock::system());
    let id = identity.agent_id;
    events
        .until("agent online", |e| *e == RegistryEvent::Online(id))
        .await;
    Online {
        tc,
        agent,
        agent_dir,
        _cgroups: cgroups,
    }
}

async fn volume(tc: &TestController, token: &str, size: u64) -> String {
    let (status, body) = post(
        tc,
        token,
        json!({"action": "CreateVolume", "size_bytes": size, "name": "data"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["volumes"][0]["id"].as_str().unwrap().to_owned()
}

async fn run(tc: &TestController, token: &str, body: Value) -> String {
    let mut body = body;
    body["action"] = "RunInstances".into();
    let (status, answer) = post(tc, token, body).await;
    assert_eq!(status, 200, "{answer}");
    answer["instances"][0]["id"].as_str().unwrap().to_owned()
}

async fn status_of(tc: &TestController, token: &str, id: &str) -> Value {
    let body = ok(
        tc,
        token,
        json!({"action": "DescribeInstanceStatus", "ids": [id]}),
    )
    .await;
    body["statuses"][0].clone()
}

async fn state_of(tc: &TestController, token: &str, id: &str) -> String {
    let body = ok(
        tc,
        token,
        json!({"action": "DescribeInstances", "ids": [id]}),
    )
    .await;
    body["instances"][0]["state"].as_str().unwrap().to_owned()
}

async fn terminate(tc: &TestController, token: &str, ids: &[&str]) {
    ok(
        tc,
        token,
        json!({"action": "TerminateInstances", "ids": ids}),
    )
    .await;
}

/// A root-owned set-uid copy of the effective-uid probe in a directory of its own.
fn setuid_probe(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let probe = surplus_tests::euid_probe(dir);
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o4755)).unwrap();
    probe
}

#[tokio::test]
async fn a_hostile_instance_is_contained_by_the_process_driver() {
    let tag = "hostile-process";
    let suid_dir = tempfile::tempdir().unwrap();
    let suid = setuid_probe(&suid_dir.path().join("suid"));
    let shown = suid_dir.path().to_owned();
    // The directory holding the agent's data directory is made visible to the
    // instance, read-only: the agent's own files inside it must still be out of sight.
    let on = online(DriverKind::Process, tag, |c, agent_dir| {
        c.process.system_paths.push(shown);
        c.process
            .system_paths
            .push(agent_dir.parent().unwrap().to_owned());
    })
    .await;
    let tc = &on.tc;
    // A descriptor the agent holds without close-on-exec (inherited from whoever
    // started it, say): a directory of the host's that would lead out of the view.
    let leaked = std::ffi::CString::new("/").unwrap();
    // SAFETY: open(2) of "/" as a directory; closed at the end of the test.
    let leaked = unsafe { libc::open(leaked.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(leaked > 2);
    let alice = tc.token_for("alice", "client").await;
    let vol = volume(tc, &alice, 64 << 20).await;
    let neighbour = run(tc, &alice, json!({"command": ["sleep", "600"]})).await;
    let parent = control_config(DriverKind::Process, tag)
        .process
        .cgroup_parent;
    let id = {
        // The instance id is not known before RunInstances: the probe of its own
        // cgroup.procs file uses a path found after the start, through /proc/self.
        run(
            tc,
            &alice,
            json!({
                "command": ["/bin/sh", "-c", HOSTILE],
                "env": {
                    "IDENTITY": on.agent_dir.join("identity.json").display().to_string(),
                    "SPOOL": on.agent_dir.join("spool").display().to_string(),
                    "CONTROL": on.agent_dir.join("control").display().to_string(),
                    "AGENTS_DIR": on.agent_dir.parent().unwrap().display().to_string(),
                    "OWN_PROCS": format!("/sys/fs/cgroup/pids/{parent}/$SURPLUS_INSTANCE_ID/cgroup.procs"),
                    "SUID_TEST": suid.display().to_string(),
                },
                "limits": {"pids": 30},
                "volumes": [{"volume_id": vol, "mount_path": "/data"}],
            }),
        )
        .await
    };
    let out = output_until(tc, &alice, &id, "done=1").await;
    let p = probes(&out);
    let uid: u32 = p["uid"].parse().unwrap();
    assert!(
        (600_000..665_536).contains(&uid),
        "runs as a user of its own from the range, not {uid}:\n{out}"
    );
    assert_eq!(p["gid"], p["uid"]);
    for (probe, why) in [
        ("identity", "the agent's key"),
        ("spool", "the agent's spool"),
        ("control", "the agent's records and other instances' files"),
        ("procs_root", "the root cgroup's cgroup.procs"),
        ("procs_own", "its own cgroup.procs"),
        ("docker_socket", "the engine's socket"),
        ("root_write", "the root directory"),
        ("etc_write", "the host's /etc"),
        ("userns", "a user namespace of its own"),
        ("mount", "mounting"),
    ] {
        assert_eq!(p[probe], "no", "{why} must be out of reach:\n{out}");
    }
    assert_eq!(
        p["agents_dir"], "no",
        "the directory holding the agent's data directory is shown on purpose; only the agent's own files are masked"
    );
    let caps = capability_sets(&p["status"]);
    assert_eq!(caps["NoNewPrivs"], "1", "{out}");
    assert_eq!(
        caps["Seccomp"], "2",
        "a system call filter is installed: {out}"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(caps[set], "0000000000000000", "{set} must be empty:\n{out}");
    }
    assert_eq!(
        p["suid"],
        uid.to_string(),
        "a set-uid-root binary must not make it root"
    );
    assert_eq!(p["hostname"], id, "its own host name");
    assert_eq!(
        p["fds"], "0 1 2 3",
        "only its standard streams (and ls's own directory): nothing of the agent's"
    );
    assert_eq!(p["volume_write"], "yes", "its volume is at its mount path");
    assert_eq!(
        p["enospc"], "1",
        "a write past the volume's size is refused:\n{out}"
    );
    assert_eq!(p["tmp_write"], "yes", "a private /tmp");
    let forked: u32 = p["forked"].parse().unwrap();
    assert!(
        forked < 30,
        "the process limit holds: {forked} forked:\n{out}"
    );
    assert_eq!(
        p["fork_refused"], "1",
        "the shell was refused a fork:\n{out}"
    );

    // The host's side: the limit is applied and shown, every process is still in the
    // instance's cgroup, the neighbour and the agent carry on.
    let status = status_of(tc, &alice, &id).await;
    assert_eq!(status["applied"]["pids"], 30, "{status}");
    let pids_max =
        std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{parent}/{id}/pids.max")).unwrap();
    assert_eq!(
        pids_max.trim(),
        "32",
        "the limit plus the sandbox's two processes"
    );
    let members =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{parent}/{id}/cgroup.procs"))
            .unwrap();
    for pid in members.lines() {
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        assert!(
            cgroup.contains(&id),
            "process {pid} left the instance's cgroup:\n{cgroup}"
        );
    }
    assert_eq!(state_of(tc, &alice, &neighbour).await, "running");
    // The file it wrote is in the volume, owned by the instance's user.
    let (s, snap) = post(
        tc,
        &alice,
        json!({"action": "CreateSnapshot", "volume_id": vol}),
    )
    .await;
    terminate(tc, &alice, &[&id, &neighbour]).await;
    assert_eq!(s, 200, "{snap}");
    let copy = Path::new(snap["snapshot"]["location"].as_str().unwrap()).join("hello");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "hello\n");
    let (s, body) = post(
        tc,
        &alice,
        json!({"action": "DeleteVolume", "volume_id": vol}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    on.agent.stop().await;
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(leaked) };
}

#[tokio::test]
async fn a_hostile_container_is_contained_by_the_docker_driver() {
    let tag = "hostile-docker";
    let on = online(DriverKind::Docker, tag, |_, _| {}).await;
    let tc = &on.tc;
    let alice = tc.token_for("alice", "client").await;
    let vol = volume(tc, &alice, 64 << 20).await;
    let neighbour = run(
        tc,
        &alice,
        json!({"image": probe_image(), "command": ["sleep", "600"]}),
    )
    .await;
    let id = run(
        tc,
        &alice,
        json!({
            "image": probe_image(),
            "command": ["sh", "-c", HOSTILE],
            "env": {
                "IDENTITY": on.agent_dir.join("identity.json").display().to_string(),
                "SPOOL": on.agent_dir.join("spool").display().to_string(),
                "CONTROL": on.agent_dir.join("control").display().to_string(),
                "AGENTS_DIR": "/nonexistent",
                "OWN_PROCS": "/sys/fs/cgroup/pids/cgroup.procs",
                // Root in the container switches to an unprivileged user, then runs a
                // set-uid-root copy of busybox: no-new-privileges keeps it unprivileged.
                "SUID_TEST": "cp /bin/euid /tmp/euid && chmod 4755 /tmp/euid && echo nobody:x:65534:65534::/tmp:/bin/sh >> /etc/passwd && echo nobody:x:65534: >> /etc/group && su -s /bin/sh nobody -c /tmp/euid",
            },
            "limits": {"pids": 30},
            "volumes": [{"volume_id": vol, "mount_path": "/data"}],
        }),
    )
    .await;
    let out = output_until(tc, &alice, &id, "done=1").await;
    let p = probes(&out);
    for (probe, why) in [
        ("identity", "the agent's key"),
        ("spool", "the agent's spool"),
        ("control", "the agent's records"),
        ("procs_root", "the cgroup file system"),
        ("procs_own", "its own cgroup.procs"),
        ("docker_socket", "the engine's socket"),
        ("userns", "a user namespace of its own"),
        ("mount", "mounting"),
    ] {
        assert_eq!(p[probe], "no", "{why} must be out of reach:\n{out}");
    }
    let caps = capability_sets(&p["status"]);
    assert_eq!(caps["NoNewPrivs"], "1", "{out}");
    // CHOWN 0, DAC_OVERRIDE 1, FOWNER 3, KILL 5, SETGID 6, SETUID 7, NET_BIND_SERVICE 10.
    let minimal = format!(
        "{:016x}",
        (1u64 << 0) | 1 << 1 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 10
    );
    assert_eq!(
        caps["CapBnd"], minimal,
        "only the minimal set is kept:\n{out}"
    );
    assert_eq!(caps["CapEff"], minimal, "{out}");
    assert_eq!(
        p["suid"], "65534",
        "a set-uid-root binary must not make it root:\n{out}"
    );
    assert_eq!(p["volume_write"], "yes", "its volume is at its mount path");
    assert_eq!(
        p["enospc"], "1",
        "a write past the volume's size is refused:\n{out}"
    );
    let forked: u32 = p["forked"].parse().unwrap();
    assert!(
        forked < 30,
        "the process limit holds: {forked} forked:\n{out}"
    );
    let status = status_of(tc, &alice, &id).await;
    assert_eq!(status["applied"]["pids"], 30, "{status}");
    let inspect = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.HostConfig.Privileged}} {{.HostConfig.PidsLimit}} {{json .HostConfig.SecurityOpt}} {{json .HostConfig.CapDrop}}",
            &format!("surplus-{id}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        r#"false 30 ["no-new-privileges:true"] ["ALL"]"#
    );
    assert_eq!(state_of(tc, &alice, &neighbour).await, "running");
    // Without user-namespace remapping the host's record says so.
    let (_, agents) = tc.api_get("/v1/agents").await;
    let isolation = &agents[0]["isolation"];
    assert_eq!(isolation["driver"], "docker", "{agents}");
    assert_eq!(isolation["capabilities_dropped"], true);
    assert_eq!(isolation["default_pids"], 512);
    assert_eq!(isolation["volume_sizes_enforced"], true);
    if isolation["user_namespaces"] == false {
        assert!(
            isolation["notes"].to_string().contains("userns-remap"),
            "{isolation}"
        );
    }
    terminate(tc, &alice, &[&id, &neighbour]).await;
    let (s, body) = post(
        tc,
        &alice,
        json!({"action": "DeleteVolume", "volume_id": vol}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    on.agent.stop().await;
}

/// A failed step of the sandbox fails the start and names the step; a mount path in the
/// kernel's own views is refused before anything starts. With `allow_host_user` (off by
/// default) the provider runs instances as the agent's user, and the host's record
/// says so.
#[tokio::test]
async fn sandbox_failures_name_their_step_and_host_user_mode_is_reported() {
    let tag = "sandbox-steps";
    let on = online(DriverKind::Process, tag, |_, _| {}).await;
    let tc = &on.tc;
    let alice = tc.token_for("alice", "client").await;
    let vol = volume(tc, &alice, 16 << 20).await;
    let (status, refused) = post(
        tc,
        &alice,
        json!({"action": "RunInstances", "command": ["true"], "volumes": [{"volume_id": vol, "mount_path": "/proc/evil"}]}),
    )
    .await;
    assert_eq!(
        (status, refused["field"].as_str()),
        (400, Some("volumes[0].mount_path")),
        "{refused}"
    );
    // Under a read-only system directory a mount point cannot be made.
    let (status, failed) = post(
        tc,
        &alice,
        json!({"action": "RunInstances", "command": ["true"], "volumes": [{"volume_id": vol, "mount_path": "/usr/surplus-no-such-dir"}]}),
    )
    .await;
    assert_eq!(status, 502, "{failed}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains("sandbox set-up failed: mount")
            && message.contains("at /usr/surplus-no-such-dir")
            && message.contains("Read-only file system"),
        "{message}"
    );
    // A symbolic link planted in a volume cannot lead another volume's mount, nor the
    // directories made for it, out of the view.
    let planted = on.agent_dir.join("control/planted");
    let a = volume(tc, &alice, 16 << 20).await;
    let b = volume(tc, &alice, 16 << 20).await;
    let id = run(
        tc,
        &alice,
        json!({"command": ["/bin/sh", "-c", format!("ln -s {} /a/b && echo done=1 && exec sleep 600", on.agent_dir.join("control").display())],
               "volumes": [{"volume_id": a, "mount_path": "/a"}]}),
    )
    .await;
    output_until(tc, &alice, &id, "done=1").await;
    terminate(tc, &alice, &[&id]).await;
    let (status, failed) = post(
        tc,
        &alice,
        json!({"action": "RunInstances", "command": ["true"], "volumes": [
            {"volume_id": a, "mount_path": "/a"},
            {"volume_id": b, "mount_path": "/a/b/planted"}]}),
    )
    .await;
    assert_eq!(status, 502, "{failed}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains("at /a/b/planted (without following symbolic links)")
            && (message.contains("Not a directory")
                || message.contains("Too many levels of symbolic links")),
        "{message}"
    );
    assert!(!planted.exists(), "nothing was made on the host");
    let (_, agents) = tc.api_get("/v1/agents").await;
    assert_eq!(agents[0]["isolation"]["host_user"], false, "{agents}");
    on.agent.stop().await;

    let tag = "host-user";
    let on = online(DriverKind::Process, tag, |c, _| {
        c.process.allow_host_user = true;
    })
    .await;
    let tc = &on.tc;
    let alice = tc.token_for("alice", "client").await;
    let id = run(
        tc,
        &alice,
        json!({"command": ["/bin/sh", "-c", "echo uid=$(id -u); echo done=1; exec sleep 600"]}),
    )
    .await;
    let out = output_until(tc, &alice, &id, "done=1").await;
    assert_eq!(
        probes(&out)["uid"],
        "0",
        "the provider asked for the agent's user"
    );
    let (_, agents) = tc.api_get("/v1/agents").await;
    let isolation = &agents[0]["isolation"];
    assert_eq!(isolation["host_user"], true, "{agents}");
    assert!(
        isolation["notes"].to_string().contains("allow_host_user"),
        "{isolation}"
    );
    terminate(tc, &alice, &[&id]).await;
    on.agent.stop().await;
}
