//! Harness for the end-to-end tests: a controller on loopback ports in a temporary data
//! directory, agents enrolled through real join tokens, and waiting on registry events
//! instead of sleeping. The load generator (`surplus-loadgen`) lives here too: it is
//! test tooling, built from the same crates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use surplus_agent::control::{ControlConfig, DriverKind};
use surplus_agent::{AgentConfig, Identity, Runner, SessionError};
use surplus_controller::datadir::{self, DataDir};
use surplus_controller::registry::RegistryEvent;
use surplus_controller::{Controller, ControllerConfig, RunningController};
use surplus_protocol::clock::{self, Clock};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub mod browser;
pub mod loadgen;
pub mod openapi;
pub mod postgres;

/// How long any wait in a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A controller under test.
pub struct TestController {
    /// Temporary root (data directory and agents' directories).
    pub root: tempfile::TempDir,
    /// The controller's data directory.
    pub dir: DataDir,
    /// The admin API token.
    pub admin_token: String,
    /// The configuration it runs with (bound ports after the first start).
    pub config: ControllerConfig,
    /// Its clock.
    pub clock: Arc<dyn Clock>,
    running: Option<RunningController>,
}

/// Fast settings for tests: loopback, ephemeral ports, short heartbeats.
pub fn test_config() -> ControllerConfig {
    ControllerConfig {
        session_listen: "127.0.0.1:0".parse().expect("literal"),
        enroll_listen: "127.0.0.1:0".parse().expect("literal"),
        peer_listen: "127.0.0.1:0".parse().expect("literal"),
        http_listen: "127.0.0.1:0".parse().expect("literal"),
        heartbeat_interval: Duration::from_millis(500),
        missed_heartbeats: 4,
        revocation_poll: Duration::from_millis(200),
        request_timeout: Duration::from_secs(5),
        control_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(3),
        keep_alive: Duration::from_millis(500),
        ..ControllerConfig::default()
    }
}

impl TestController {
    /// Initialises and starts a controller with [`test_config`] and the system clock.
    pub async fn start() -> Self {
        Self::start_with(test_config(), clock::system()).await
    }

    /// Initialises and starts a controller with `config` and `clock`.
    pub async fn start_with(config: ControllerConfig, clock: Arc<dyn Clock>) -> Self {
        // `RUST_LOG=surplus_agent=debug cargo test -- --nocapture` shows what happened.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let root = tempfile::tempdir().expect("temporary directory");
        let dir = DataDir::new(root.path().join("controller"));
        // A `database_url` in `config` (a PostgreSQL test database) is initialised too.
        let url = Some(config.database_url.as_str()).filter(|u| !u.is_empty());
        let report = datadir::init(&dir, &[], url, clock.now_ms())
            .await
            .expect("init");
        let mut me = Self {
            root,
            dir,
            admin_token: report.admin_token,
            config,
            clock,
            running: None,
        };
        me.boot().await;
        me
    }

    async fn boot(&mut self) {
        // After an in-process shutdown, quinn releases a UDP socket when its endpoint
        // driver next runs; a restart may have to wait for that. (A real restart is a
        // new process.) A handle leaked by the old controller would exhaust this.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let running = loop {
            match surplus_controller::start(&self.dir, self.config.clone(), self.clock.clone())
                .await
            {
                Ok(r) => break r,
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && format!("{e:#}").contains("in use") =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("controller starts: {e:#}"),
            }
        };
        // Keep the bound ports so a restart comes back on the same addresses.
        self.config.session_listen = running.session_addr;
        self.config.enroll_listen = running.enroll_addr;
        self.config.peer_listen = running.peer_addr;
        self.config.http_listen = running.http_addr;
        self.running = Some(running);
    }

    /// The running controller.
    pub fn ctl(&self) -> &Arc<Controller> {
        &self
            .running
            .as_ref()
            .expect("controller is running")
            .controller
    }

    /// The HTTP API base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.config.http_listen)
    }

    /// Registry events from now on.
    pub fn events(&self) -> Events {
        Events(self.ctl().app.registry.subscribe())
    }

    /// Waits until every agent in `ids` holds a session, however long ago it came:
    /// unlike an event alone, a connection made before the caller looked is not missed.
    pub async fn until_connected(&self, what: &str, ids: &[uuid::Uuid]) {
        // Subscribed first, then looked: a session attached before is seen by the look,
        // one attached after by its event (published once the session is attached).
        let mut events = self.ctl().app.registry.subscribe();
        let all = async {
            while !ids.iter().all(|id| self.ctl().app.link.is_connected(*id)) {
                if let Err(broadcast::error::RecvError::Closed) = events.recv().await {
                    panic!("controller stopped while waiting for {what}");
                }
            }
        };
        assert!(
            tokio::time::timeout(PATIENCE, all).await.is_ok(),
            "timed out waiting for {what}"
        );
    }

    /// Stops the controller.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts it again on the same data directory and ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.boot().await;
    }

    /// A join token.
    pub async fn token(&self, labels: &[(&str, &str)]) -> String {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        self.ctl()
            .agents
            .create_join_token(Duration::from_secs(600), labels, "test")
            .await
            .expect("token")
            .token
    }

    /// A fresh agent data directory under the test root.
    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.root.path().join("agents").join(name)
    }

    /// Enrolls an agent named `name` with a fresh token.
    pub async fn enroll(&self, name: &str, labels: &[(&str, &str)]) -> (AgentConfig, Identity) {
        let config = agent_config(&self.agent_dir(name));
        let token = self.token(labels).await;
        let identity = surplus_agent::enroll::enroll(&token, &config, self.clock.now_ms())
            .await
            .expect("enrollment");
        (config, identity)
    }

    /// An authenticated GET on the API, as JSON.
    pub async fn api_get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .expect("API reachable");
        let status = r.status().as_u16();
        (status, r.json().await.expect("JSON body"))
    }

    /// An authenticated POST on the API, as JSON.
    pub async fn api_post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.api_as(&self.admin_token, reqwest::Method::POST, path, Some(body))
            .await
    }

    /// A request on the API with `token`, a JSON body if given; the status and the JSON
    /// answer.
    pub async fn api_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.expect("API reachable");
        let status = r.status().as_u16();
        let bytes = r.bytes().await.expect("a body");
        // 204 has none: null.
        if status == 204 && bytes.is_empty() {
            return (status, serde_json::Value::Null);
        }
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    /// `surplus <args> --json` run as a user runs it, with `token`: the parsed
    /// answer, or the error text.
    pub async fn cli(&self, token: &str, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = tokio::process::Command::new(bin("surplus"))
            .args(["--controller", &self.url(), "--token", token, "--json"])
            .args(args)
            .env_remove("SURPLUS_CONFIG")
            .env("HOME", self.root.path())
            .output()
            .await
            .expect("surplus runs");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("--json prints JSON"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// An API token for `account` in `role`, made with the admin token.
    pub async fn token_for(&self, account: &str, role: &str) -> String {
        let (status, body) = self
            .api_post(
                "/v1/api-tokens",
                serde_json::json!({"account": account, "role": role}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("a token").to_owned()
    }
}

/// Agent settings for tests: quick reconnects and timeouts.
pub fn agent_config(data_dir: &Path) -> AgentConfig {
    AgentConfig {
        data_dir: data_dir.to_path_buf(),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        request_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        keep_alive: Duration::from_secs(1),
        // Control tests choose a driver; the others leave the host alone.
        control: ControlConfig {
            driver: DriverKind::None,
            ..ControlConfig::default()
        },
        ..AgentConfig::default()
    }
}

/// The name of the image container tests run: busybox from Debian's `busybox-static`,
/// imported into the local engine (there is no registry to pull from).
pub const BUSYBOX_IMAGE: &str = "surplus/busybox:latest";

/// Makes [`BUSYBOX_IMAGE`] unless the engine has it: a root file system holding the
/// static busybox and a link per applet, `docker import`ed. Fails with what is missing.
pub fn busybox_image() -> &'static str {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        import_image(BUSYBOX_IMAGE, &[]);
        *built = true;
    }
    BUSYBOX_IMAGE
}

/// The name of the image the isolation tests run: [`BUSYBOX_IMAGE`]'s files plus
/// `/bin/euid`, a static program that prints its effective uid.
pub const PROBE_IMAGE: &str = "surplus/probe:latest";

/// Makes [`PROBE_IMAGE`] unless the engine has it.
pub fn probe_image() -> &'static str {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built {
        let dir = tempfile::tempdir().expect("temporary directory");
        let euid = euid_probe(dir.path());
        import_image(PROBE_IMAGE, &[(&euid, "bin/euid")]);
        *built = true;
    }
    PROBE_IMAGE
}

/// Compiles, into `dir`, a static program that prints its effective uid: the probe of
/// whether a set-uid-root binary raises a process's privileges (busybox's own applets
/// drop them by themselves, so they cannot tell). Needs `gcc` and `libc6-dev`.
pub fn euid_probe(dir: &Path) -> PathBuf {
    let source = dir.join("euid.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <unistd.h>\nint main(void) { printf(\"%d\\n\", (int)geteuid()); return 0; }\n",
    )
    .unwrap();
    let out = dir.join("euid");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .output()
        .expect("gcc must be installed for the isolation tests (Debian: gcc, libc6-dev)");
    assert!(
        built.status.success(),
        "gcc -static failed (Debian's libc6-dev provides the static C library): {}",
        String::from_utf8_lossy(&built.stderr)
    );
    out
}

/// `docker import`s, as `tag`, a root file system of Debian's static busybox with a
/// link per applet, plus `extra` files (host path, path in the image), unless the engine
/// has the image already.
fn import_image(tag: &str, extra: &[(&Path, &str)]) {
    let docker = |args: &[&str]| std::process::Command::new("docker").args(args).output();
    let have = docker(&["image", "inspect", tag])
        .expect("the docker CLI must be installed for the container driver tests");
    if have.status.success() {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (.ci/run does)"
    );
    let root = tempfile::tempdir().expect("temporary directory");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(busybox, bin.join("busybox")).unwrap();
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for d in ["tmp", "data", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    for (from, to) in extra {
        std::fs::copy(from, root.path().join(to)).unwrap();
    }
    let tar = std::process::Command::new("tar")
        .args(["-C", &root.path().display().to_string(), "-c", "."])
        .output()
        .expect("tar runs");
    assert!(tar.status.success(), "tar of the image root failed");
    let mut import = std::process::Command::new("docker")
        .args(["import", "-", tag])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker import starts");
    use std::io::Write;
    import.stdin.take().unwrap().write_all(&tar.stdout).unwrap();
    assert!(
        import.wait().unwrap().success(),
        "docker import of {tag} failed"
    );
}

/// A control configuration for tests: a short stop grace, a cgroup parent of its own
/// (tests run side by side), the busybox image, and the shipped Docker mapping.
pub fn control_config(driver: DriverKind, tag: &str) -> ControlConfig {
    let mut c = ControlConfig {
        driver,
        stop_grace: Duration::from_secs(2),
        ..ControlConfig::default()
    };
    c.process.cgroup_parent = format!("surplus-test-{}-{tag}", std::process::id());
    if matches!(driver, DriverKind::Docker | DriverKind::Mapped) {
        c.compat_image = busybox_image().into();
        c.docker.helper_image = BUSYBOX_IMAGE.into();
    }
    c.mapped.file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mapped-docker.toml");
    c
}

/// Removes a test's cgroups when it ends, however it ends: kills what is left in them,
/// then removes the instance groups and their parent.
pub struct CgroupGuard(pub String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for controller in ["cpu", "memory", "pids", "cpuacct", "blkio"] {
            let parent = Path::new("/sys/fs/cgroup").join(controller).join(&self.0);
            let Ok(entries) = std::fs::read_dir(&parent) else {
                continue;
            };
            for entry in entries.flatten().filter(|e| e.path().is_dir()) {
                for _ in 0..50 {
                    let procs = std::fs::read_to_string(entry.path().join("cgroup.procs"))
                        .unwrap_or_default();
                    for pid in procs.lines() {
                        let _ = std::process::Command::new("kill")
                            .args(["-9", pid])
                            .status();
                    }
                    if std::fs::remove_dir(entry.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // A group just emptied may stay busy for a moment while the kernel frees it.
            for _ in 0..50 {
                if std::fs::remove_dir(&parent).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A UDP port free on loopback now (for a separate process to bind).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port on loopback")
        .port()
}

/// A TCP port free on loopback now (for a separate process to bind).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free TCP port on loopback")
        .port()
}

/// A workspace binary (`surplus`, `surplus-agent`, ...) from `target/<profile>`, next to
/// the test's own `deps/` directory. `cargo test --workspace` builds them first.
/// Runs `surplus-controller init` on the data directory `data` (on the PostgreSQL
/// database `database_url`, else SQLite) and returns the admin API token it prints once.
pub fn init_controller(data: &Path, database_url: Option<&str>) -> String {
    let mut init = std::process::Command::new(bin("surplus-controller"));
    init.arg("--data-dir")
        .arg(data)
        .args(["init", "--server-name", "localhost"]);
    if let Some(url) = database_url {
        init.args(["--database-url", url]);
    }
    let out = init.output().expect("running surplus-controller init");
    assert!(
        out.status.success(),
        "surplus-controller init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("admin API token (shown once, stored hashed): "))
        .expect("admin token printed")
        .to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds every binary",
        path.display()
    );
    path
}

/// An agent running in a task.
pub struct RunningAgent {
    /// Its id.
    pub id: Uuid,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), SessionError>>,
}

impl RunningAgent {
    /// Runs the agent enrolled in `config.data_dir`.
    pub fn spawn(config: AgentConfig, clock: Arc<dyn Clock>) -> Self {
        Self::spawn_runner(Runner::new(config, clock).expect("identity present"))
    }

    fn spawn_runner(runner: Runner) -> Self {
        let cancel = CancellationToken::new();
        let agent_id = runner.agent_id();
        let task = tokio::spawn(runner.run(cancel.clone()));
        Self {
            id: agent_id,
            cancel,
            task,
        }
    }

    /// Runs the agent with a control plane of the caller's making.
    pub fn spawn_with_control(
        config: AgentConfig,
        clock: Arc<dyn Clock>,
        control: Arc<surplus_agent::control::ControlPlane>,
    ) -> Self {
        Self::spawn_runner(
            Runner::new(config, clock)
                .expect("identity present")
                .with_control(control),
        )
    }

    /// Waits for the agent to stop on its own (it does only when retrying cannot help).
    pub async fn finished(self) -> Result<(), SessionError> {
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("agent stops in time")
            .expect("agent task does not panic")
    }

    /// Stops the agent.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(PATIENCE, self.task).await;
    }
}

/// Registry events, with waiting helpers.
pub struct Events(broadcast::Receiver<RegistryEvent>);

impl Events {
    /// Waits until `want` has seen an event it accepts; fails the test after [`PATIENCE`].
    pub async fn until(&mut self, what: &str, mut want: impl FnMut(&RegistryEvent) -> bool) {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                match self.0.recv().await {
                    Ok(e) if want(&e) => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        panic!("controller stopped while waiting for {what}")
                    }
                }
            }
        })
        .await;
        assert!(found.is_ok(), "timed out waiting for {what}");
    }

    /// Waits until every id in `ids` has produced an event `kind` accepts.
    pub async fn until_all(
        &mut self,
        what: &str,
        ids: &[Uuid],
        kind: impl Fn(&RegistryEvent) -> Option<Uuid>,
    ) {
        let mut left: std::collections::HashSet<Uuid> = ids.iter().copied().collect();
        self.until(what, |e| {
            if let Some(id) = kind(e) {
                left.remove(&id);
            }
            left.is_empty()
        })
        .await;
    }
}

/// A listing `id` of `provider`'s `hosts`, stored as an accepted resell request leaves
/// it (the pipeline's validation is the resell tests' business): in size category
/// `small`, zone `<provider>-1`, selling `modes` at `price` an hour (minor units of
/// EUR) with the provider's `minimum`, with `interruptibility` and a promised grace of
/// 3 s.
pub async fn list_hosts(
    ctl: &Controller,
    id: &str,
    provider: &str,
    hosts: &[Uuid],
    modes: &[surplus_market::resell::PricingMode],
    (price, minimum): (u64, u64),
    interruptibility: surplus_market::resell::Interruptibility,
) {
    use surplus_controller::store::{Listing, Pipeline, ResellRow, ResellStep};
    let now = ctl.app.clock.now_ms();
    let zone = format!("{provider}-1");
    let doc: surplus_market::resell::ResellRequest = serde_json::from_value(serde_json::json!({
        "contact": format!("ops@{provider}.example"),
        "resource_sets": [{"kind": "compute", "zone": zone, "hosts": hosts, "system": {}, "compatibility": {"level": "bare_metal"}}],
        "pricing": {"modes": modes, "currency": "EUR", "minimum_price": minimum, "immediate_price": price},
        "interruptibility": interruptibility,
        "goal": "none",
        "grace_ms": 3_000
    }))
    .expect("a resell request");
    let request = Uuid::now_v7();
    let with_sets: Vec<(Uuid, usize)> = hosts.iter().map(|h| (*h, 0)).collect();
    let mut pipeline = Pipeline::new(request, &with_sets, now);
    pipeline.stage = surplus_market::pipeline::Stage::Accepted;
    pipeline.listed = true;
    pipeline.notified = true;
    let row = ResellRow {
        id: request,
        provider: provider.into(),
        document: doc,
        pipeline,
        version: 0,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let store = &ctl.app.store;
    store.create_resell_request(&row).await.expect("stored");
    let listing = Listing {
        id: id.into(),
        request,
        provider: provider.into(),
        zone,
        kind: surplus_market::resell::ResourceKind::Compute,
        category: "small".into(),
        set: 0,
        hosts: hosts.to_vec(),
        score: 1.0,
        hardening_index: 70,
        compat_level: surplus_protocol::control::CompatLevel::Fully,
        operations: vec!["run".into()],
        pricing_modes: modes.iter().copied().collect(),
        interruptibility,
        currency: "EUR".into(),
        price,
        available: hosts.len() as u32,
        rating: None,
        uptime: None,
        utilisation: None,
        listed: true,
        failed_retest: false,
        created_at_ms: now,
        next_retest_at_ms: None,
        last_retest_at_ms: None,
        retest: None,
        grace_ms: Some(3_000),
    };
    let step = ResellStep {
        listings: vec![listing],
        notices: vec![],
    };
    assert!(
        store
            .advance_resell_request(&row, &step, now)
            .await
            .expect("stored"),
        "the request's step applies"
    );
}

/// Records `provider` as accepted with an agreement in force for a day, selling
/// compute in every pricing mode, through the API as an admin would.
pub async fn accept_provider(tc: &TestController, provider: &str) {
    let (status, body) = tc
        .api_as(
            &tc.admin_token,
            reqwest::Method::PUT,
            &format!("/v1/providers/{provider}"),
            Some(serde_json::json!({"name": provider, "contact": format!("ops@{provider}.example"), "zones": [format!("{provider}-1")], "accepted": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let until = tc.clock.now_ms() + 86_400_000;
    let (status, body) = tc
        .api_post(
            "/v1/agreements",
            serde_json::json!({"provider": provider, "valid_until_ms": until, "resource_kinds": ["compute"], "pricing_modes": ["spot", "auction", "immediate", "on_demand", "reserved"], "commission_bps": 1000, "max_hosts": 100}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// `n` enrolled hosts of `provider`, which the store shows online, and the provider
/// accepted with an agreement.
pub async fn online_hosts(tc: &TestController, provider: &str, n: usize) -> Vec<Uuid> {
    let store = tc.ctl().app.store.clone();
    let now = tc.clock.now_ms();
    let mut hosts = Vec::new();
    for i in 0..n {
        let name = format!("{provider}-host-{i}");
        let (_, identity) = tc.enroll(&name, &[("provider", provider)]).await;
        store
            .set_status(
                identity.agent_id,
                surplus_controller::store::AgentStatus::Online,
                now,
            )
            .await
            .unwrap();
        hosts.push(identity.agent_id);
    }
    accept_provider(tc, provider).await;
    hosts
}
