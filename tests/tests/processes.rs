//! The binaries as an operator uses them: `surplus-controller init / serve / token
//! create / agent revoke`, `surplus-agent enroll / run`, and the `surplus` CLI, each a
//! real process talking over loopback.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use surplus_tests::{bin, free_tcp_port, free_udp_port};

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("process starts")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    /// Waits for the process to exit by itself, at most `limit`.
    fn wait_for_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().expect("child status") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// Runs `probe` until it returns `Some`, at most `limit`; these are processes, so
/// there is no event to await.
fn eventually<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_operator_enrolls_watches_and_revokes_an_agent_with_the_binaries() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("controller");
    let agent_dir = root.path().join("agent");
    let (session, enroll, http) = (free_udp_port(), free_udp_port(), free_tcp_port());
    let url = format!("http://127.0.0.1:{http}");
    let controller_env = [
        (
            "SURPLUS_CONTROLLER_SESSION_LISTEN",
            format!("127.0.0.1:{session}"),
        ),
        (
            "SURPLUS_CONTROLLER_ENROLL_LISTEN",
            format!("127.0.0.1:{enroll}"),
        ),
        (
            "SURPLUS_CONTROLLER_PEER_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_HTTP_LISTEN",
            format!("127.0.0.1:{http}"),
        ),
        ("SURPLUS_CONTROLLER_HEARTBEAT_INTERVAL", "500ms".into()),
        ("SURPLUS_CONTROLLER_REVOCATION_POLL", "300ms".into()),
    ];

    // init prints the admin token once.
    let out = run(Command::new(bin("surplus-controller"))
        .arg("--data-dir")
        .arg(&data)
        .args(["init", "--server-name", "localhost"]));
    assert!(out.status.success(), "init: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let admin = stdout
        .lines()
        .find_map(|l| l.strip_prefix("admin API token (shown once, stored hashed): "))
        .expect("admin token printed")
        .to_owned();
    let again = run(Command::new(bin("surplus-controller"))
        .arg("--data-dir")
        .arg(&data)
        .arg("init"));
    assert!(
        !again.status.success() && text(&again.stderr).contains("already initialised"),
        "a second init refuses"
    );

    let mut serve = Child(
        Command::new(bin("surplus-controller"))
            .arg("--data-dir")
            .arg(&data)
            .arg("serve")
            .envs(controller_env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let surplus = |args: &[&str]| {
        run(Command::new(bin("surplus"))
            .args(["--controller", &url, "--token", &admin])
            .args(args)
            .env_remove("SURPLUS_CONFIG")
            .env("HOME", root.path()))
    };
    eventually("the API to answer", Duration::from_secs(20), || {
        surplus(&["agents", "list", "--json"])
            .status
            .success()
            .then_some(())
    });

    // A join token through the CLI, and enrollment with it.
    let out = surplus(&[
        "tokens", "create", "--ttl", "10m", "--label", "role=cli", "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let out = run(Command::new(bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", &token]));
    assert!(out.status.success(), "enroll: {}", text(&out.stderr));
    let mode = std::fs::metadata(agent_dir.join("identity.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the identity holds the private key and is private"
    );
    let out = run(Command::new(bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", &token]));
    assert!(
        !out.status.success() && text(&out.stderr).contains("already holds"),
        "{}",
        text(&out.stderr)
    );

    let mut agent = Child(
        Command::new(bin("surplus-agent"))
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("run")
            .env("SURPLUS_AGENT_RECONNECT_MIN", "100ms")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let id = eventually(
        "the agent to be online with its inventory",
        Duration::from_secs(30),
        || {
            let out = surplus(&["agents", "list", "--json"]);
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let a = list.as_array()?.first()?;
            (a["status"] == "online" && a["cpus"].is_u64())
                .then(|| a["id"].as_str().unwrap().to_owned())
        },
    );
    let out = surplus(&["agents", "list"]);
    let table = text(&out.stdout);
    assert!(
        table.contains(&id) && table.contains("online") && table.contains("role=cli"),
        "{table}"
    );
    // Security validation through the CLI: ordered, awaited, stored, listed.
    let out = surplus(&["validate", &id, "--security", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let validation: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(validation["status"], "succeeded", "{validation}");
    assert!(validation["security"]["hardening_index"].is_u64());
    let out = surplus(&["validations", "list", &id]);
    assert!(
        out.status.success() && text(&out.stdout).contains("succeeded"),
        "{}",
        text(&out.stdout)
    );
    let out = surplus(&["agents", "ping", &id]);
    assert!(
        out.status.success() && text(&out.stdout).contains("answered in"),
        "{}",
        text(&out.stderr)
    );
    let out = surplus(&["agents", "show", &id]);
    assert!(
        out.status.success() && text(&out.stdout).contains("logical_cpus"),
        "{}",
        text(&out.stdout)
    );

    // The local administration commands work beside a running controller.
    let out = run(Command::new(bin("surplus-controller"))
        .arg("--data-dir")
        .arg(&data)
        .args(["token", "create", "--ttl", "5m", "--label", "a=b"]));
    assert!(
        out.status.success() && text(&out.stdout).starts_with("surplus-join-1."),
        "{}",
        text(&out.stderr)
    );

    // Wrong credentials and an unreachable controller are clear errors.
    let out = run(Command::new(bin("surplus"))
        .args([
            "--controller",
            &url,
            "--token",
            "spl_wrong",
            "agents",
            "list",
        ])
        .env("HOME", root.path()));
    assert!(
        !out.status.success() && text(&out.stderr).contains("refused the API token"),
        "{}",
        text(&out.stderr)
    );
    let out = run(Command::new(bin("surplus"))
        .args([
            "--controller",
            "http://127.0.0.1:9",
            "--token",
            &admin,
            "agents",
            "list",
        ])
        .env("HOME", root.path()));
    assert!(
        !out.status.success() && text(&out.stderr).contains("cannot reach the controller"),
        "{}",
        text(&out.stderr)
    );

    // Revocation from the controller host: the running controller cuts the agent off,
    // and the agent stops, saying why.
    let out = run(Command::new(bin("surplus-controller"))
        .arg("--data-dir")
        .arg(&data)
        .args(["agent", "revoke", &id]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = agent
        .wait_for_exit(Duration::from_secs(20))
        .expect("the revoked agent stops");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(agent.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("revoked"), "{stderr}");

    // SIGTERM stops the controller cleanly.
    let pid = serve.0.id().to_string();
    assert!(
        run(Command::new("kill").args(["-TERM", &pid]))
            .status
            .success()
    );
    let status = serve
        .wait_for_exit(Duration::from_secs(20))
        .expect("the controller stops on SIGTERM");
    assert!(status.success(), "{status}");
}

/// A TLS-terminating proxy in front of `backend`, as an operator would put before the
/// loopback-only API; returns its port.
async fn tls_proxy(backend: std::net::SocketAddr, cert_pem: &str, key_pem: &str) -> u16 {
    use rustls::pki_types::pem::PemObject;
    let chain = surplus_certs::certs_from_pem(cert_pem, "proxy cert").unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(surplus_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

#[test]
fn the_cli_reaches_the_api_through_a_tls_proxy() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tc = surplus_tests::TestController::start().await;
        let now = surplus_protocol::clock::Clock::now_ms(&surplus_protocol::clock::SystemClock);
        let (ca, _) = surplus_certs::CertAuthority::generate("proxy CA", now).unwrap();
        let (cert, key) = ca
            .issue_server(&["localhost".into()], now, 3_600_000)
            .unwrap();
        let port = tls_proxy(tc.config.http_listen, &cert, &key).await;
        let ca_file = tc.root.path().join("proxy-ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let url = format!("https://localhost:{port}");
        let (token, home) = (tc.admin_token.clone(), tc.root.path().to_path_buf());
        let cli = move |extra: &[&str]| {
            let mut cmd = Command::new(bin("surplus"));
            cmd.args(["--controller", &url, "--token", &token])
                .args(extra)
                .env("HOME", &home)
                .env_remove("SURPLUS_CA_CERT");
            run(&mut cmd)
        };
        let ca_arg = ca_file.display().to_string();
        let out = tokio::task::spawn_blocking({
            let cli = cli.clone();
            move || cli(&["--ca-cert", &ca_arg, "agents", "list", "--json"])
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "[]");
        let out = tokio::task::spawn_blocking(move || cli(&["agents", "list"]))
            .await
            .unwrap();
        assert!(!out.status.success(), "an unknown CA is refused");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("cannot reach the controller")
                && stderr.to_lowercase().contains("certificate"),
            "the cause is named: {stderr}"
        );
    });
}

/// The environment of a `surplus-controller serve` on its own loopback ports.
fn serve_env(log_filter: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "SURPLUS_CONTROLLER_SESSION_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_ENROLL_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_PEER_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_HTTP_LISTEN",
            format!("127.0.0.1:{}", free_tcp_port()),
        ),
        ("SURPLUS_CONTROLLER_LOG_FILTER", log_filter.into()),
        ("SURPLUS_CONTROLLER_LOG_FORMAT", "human".into()),
    ]
}

/// `surplus-controller serve` on `data`, its own loopback ports, its log a pipe.
fn serve(data: &std::path::Path) -> Child {
    Child(
        Command::new(bin("surplus-controller"))
            .arg("--data-dir")
            .arg(data)
            .arg("serve")
            .envs(serve_env("info"))
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Reads the controller's log until it says it is serving and returns what it wrote;
/// then the reader is gone, as when the `head` a log is piped into has its line.
fn until_listening(child: &mut Child) -> String {
    let mut logs = std::io::BufReader::new(child.0.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut logs, &mut line).unwrap();
        assert!(n > 0, "the controller ended before serving: {seen}");
        seen.push_str(&line);
        if line.contains("controller listening") {
            return seen;
        }
    }
}

#[test]
fn a_second_controller_on_one_data_directory_refuses_to_start_and_logs_are_plain() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("controller");
    let out = run(Command::new(bin("surplus-controller"))
        .arg("--data-dir")
        .arg(&data)
        .arg("init"));
    assert!(out.status.success(), "init: {}", text(&out.stderr));

    // The first is serving once it says so (its log is a pipe here: plain text).
    let mut first = serve(&data);
    let seen = until_listening(&mut first);
    assert!(
        !seen.contains('\u{1b}'),
        "colour codes in a log written to a pipe: {seen:?}"
    );

    // The second, on other ports, fails at start naming the first's pid.
    let mut second = serve(&data);
    let status = second
        .wait_for_exit(Duration::from_secs(20))
        .expect("the second controller stops by itself");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let pid = first.0.id().to_string();
    assert!(
        stderr.contains("in use by another surplus-controller")
            && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first keeps serving"
    );
    // The first's log pipe is closed by now (its reader is gone): a service does not
    // die of that. Once it has stopped, the directory can be served again.
    assert!(
        run(Command::new("kill").args(["-TERM", &pid]))
            .status
            .success()
    );
    assert!(
        first
            .wait_for_exit(Duration::from_secs(20))
            .expect("the first stops on SIGTERM")
            .success()
    );
    let mut third = serve(&data);
    until_listening(&mut third);
}

/// `command` with its standard output a pipe whose reader is already gone, as with
/// `... | head -1` once head has its line: it must end quietly, without a panic.
fn into_a_closed_pipe(command: &mut Command) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {}: {stderr}",
        command.get_program(),
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_binaries_end_quietly_into_a_closed_pipe_and_take_a_bare_address() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let tc = runtime.block_on(surplus_tests::TestController::start());
    let bare = tc.config.http_listen.to_string();
    let surplus = |args: &[&str]| {
        let mut cmd = Command::new(bin("surplus"));
        cmd.args(["--controller", &bare, "--token", &tc.admin_token])
            .args(args)
            .env_remove("SURPLUS_CONFIG")
            .env("HOME", tc.root.path());
        cmd
    };
    // `--controller 127.0.0.1:7080` means plain HTTP.
    let out = run(&mut surplus(&["--json", "describe"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let described: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(described["instances"], serde_json::json!([]));

    into_a_closed_pipe(&mut surplus(&["--json", "describe"]));
    into_a_closed_pipe(&mut surplus(&["agents", "list"]));
    into_a_closed_pipe(
        Command::new(bin("surplus-agent"))
            .arg("--data-dir")
            .arg(tc.root.path().join("agent"))
            .args(["inventory", "--json"]),
    );
    runtime.block_on(async move { drop(tc) });
}
