//! Usage metering end to end with real processes: a `surplus-controller` killed with
//! SIGKILL again and again, a `surplus-agent` killed between spooling and
//! acknowledgement, the controller frozen (cut off) for a while, and in the end the
//! controller's totals equal the kernel's counters, every record exactly once, and the
//! agent-kept time running survives the agent's restarts. It runs twice: with the
//! controller on its embedded SQLite database and on PostgreSQL (a throwaway server this
//! test binary starts). (Billing is `billing.rs`, on a moved clock: a run covers closed
//! hours only.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use surplus_agent::control::DriverKind;
use surplus_tests::{CgroupGuard, bin, control_config, free_tcp_port, free_udp_port};

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.id().to_string()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    fn signal(&mut self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
        if signal == "-9" {
            self.0.wait().unwrap();
        }
    }
}

struct Setup {
    root: tempfile::TempDir,
    data: std::path::PathBuf,
    env: Vec<(&'static str, String)>,
    url: String,
    admin: String,
    http: reqwest::Client,
}

impl Setup {
    fn controller(&self) -> Child {
        Child(
            Command::new(bin("surplus-controller"))
                .arg("--data-dir")
                .arg(&self.data)
                .arg("serve")
                .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn agent(&self, config: &std::path::Path, dir: &std::path::Path) -> Child {
        Child(
            Command::new(bin("surplus-agent"))
                .arg("--config")
                .arg(config)
                .arg("--data-dir")
                .arg(dir)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            r = r.json(&b);
        }
        match r.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// Polls until `probe` gives `Some` (the processes are separate: no event to await).
    async fn eventually<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl AsyncFnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn cpuacct_usage(parent: &str, id: &str) -> u64 {
    let path = [
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/cpu",
    ]
    .iter()
    .map(|root| {
        std::path::Path::new(root)
            .join(parent)
            .join(id)
            .join("cpuacct.usage")
    })
    .find(|p| p.exists())
    .unwrap_or_else(|| {
        panic!("no cpuacct.usage for {id}: this test needs the cgroup v1 cpuacct controller")
    });
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The two runs of the scenario measure wall time against running time: they take
/// turns rather than share the two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_controller_and_agent_crashes_exactly_once_on_sqlite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    usage_survives_controller_and_agent_crashes_exactly_once(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_survives_controller_and_agent_crashes_exactly_once_on_postgres() {
    let url = surplus_tests::postgres::fresh_database().await;
    let _turn = ONE_AT_A_TIME.lock().await;
    usage_survives_controller_and_agent_crashes_exactly_once(Some(url)).await;
}

/// The scenario, with the controller's state in `database_url` (PostgreSQL) or, with
/// `None`, in the embedded SQLite file.
async fn usage_survives_controller_and_agent_crashes_exactly_once(database_url: Option<String>) {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("controller");
    let (session, enroll, http) = (free_udp_port(), free_udp_port(), free_tcp_port());
    let env = vec![
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
        ("SURPLUS_CONTROLLER_IDLE_TIMEOUT", "3s".into()),
    ];
    let admin = surplus_tests::init_controller(&data, database_url.as_deref());
    let s = Setup {
        url: format!("http://127.0.0.1:{http}"),
        root,
        data,
        env,
        admin,
        http: reqwest::Client::new(),
    };
    let mut controller = s.controller();
    let (_, created) = s
        .eventually("the API", Duration::from_secs(20), async || {
            let r = s
                .call(
                    reqwest::Method::POST,
                    "/v1/tokens",
                    Some(json!({"labels": {"provider": "bob"}})),
                )
                .await;
            (r.0 == 201).then_some(r)
        })
        .await;
    let token = created["token"].as_str().unwrap().to_owned();
    let agent_dir = s.root.path().join("agent");
    let out = Command::new(bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", &token])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let name = if database_url.is_some() {
        "metering-pg"
    } else {
        "metering"
    };
    let parent = control_config(DriverKind::Process, name)
        .process
        .cgroup_parent;
    let _cgroups = CgroupGuard(parent.clone());
    let config = s.root.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "reconnect_min = \"50ms\"\nreconnect_max = \"300ms\"\nidle_timeout = \"3s\"\nkeep_alive = \"500ms\"\nrequest_timeout = \"3s\"\n\n\
             [control]\ndriver = \"process\"\nstop_grace = \"1s\"\n\n[control.process]\ncgroup_parent = \"{parent}\"\n\n\
             [metering]\ninstance_period = \"200ms\"\nhost_period = \"1s\"\nsubscription_period = \"1s\"\nresolution = \"100ms\"\nbatch_records = 50\n"
        ),
    )
    .unwrap();
    let mut agent = s.agent(&config, &agent_dir);
    let agents = s
        .eventually("the agent online", Duration::from_secs(30), async || {
            let (_, list) = s.call(reqwest::Method::GET, "/v1/agents", None).await;
            let a = list.as_array()?.first()?.clone();
            (a["status"] == "online").then_some(a)
        })
        .await;
    let agent_id = agents["id"].as_str().unwrap().to_owned();

    // The provider's rate card, copied to instances run from now on.
    let (st, plan) = s
        .call(
            reqwest::Method::PUT,
            &format!("/v1/agents/{agent_id}/price-plan"),
            Some(json!({"currency": "EUR", "per_vcpu_hour": 360_000, "per_instance_hour": 3_600, "upfront": 500})),
        )
        .await;
    assert_eq!(st, 200, "{plan}");
    let (st, bad) = s
        .call(
            reqwest::Method::PUT,
            &format!("/v1/agents/{agent_id}/price-plan"),
            Some(json!({"currency": "eur"})),
        )
        .await;
    assert_eq!(
        (st, bad["field"].as_str()),
        (400, Some("currency")),
        "{bad}"
    );

    let started_at = Instant::now();
    let (st, run) = s
        .call(
            reqwest::Method::POST,
            "/v1/control",
            Some(json!({"action": "RunInstances", "command": ["/bin/sh", "-c", "while :; do :; done"], "limits": {"millicpus": 200}})),
        )
        .await;
    assert_eq!(st, 200, "{run}");
    let id = run["instances"][0]["id"].as_str().unwrap().to_owned();

    let usage_of = async |meter: &str| -> Option<i64> {
        let (st, u) = s
            .call(
                reqwest::Method::GET,
                &format!("/v1/usage?instance={id}&meter={meter}&granularity=day&from=0"),
                None,
            )
            .await;
        if st != 200 {
            return None;
        }
        Some(
            u["rows"]
                .as_array()?
                .iter()
                .filter_map(|r| r["total"].as_i64())
                .sum(),
        )
    };
    s.eventually("first usage", Duration::from_secs(20), async || {
        usage_of("cpu_ns").await.filter(|&v| v > 0)
    })
    .await;

    // The controller dies without warning, again and again, while records stream.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        controller.signal("-9");
        tokio::time::sleep(Duration::from_millis(700)).await;
        controller = s.controller();
    }
    // The agent dies too, between spooling and acknowledgement at some point of its
    // 200 ms cycle, and comes back a second later (the instance runs on meanwhile).
    for wait in [900, 1300] {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        agent.signal("-9");
        tokio::time::sleep(Duration::from_secs(1)).await;
        agent = s.agent(&config, &agent_dir);
    }
    // Cut off: the controller is frozen long enough for the session to time out and
    // the spool to grow, then thaws.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    controller.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let spooled = std::fs::read_dir(agent_dir.join("spool"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum::<u64>();
    assert!(
        spooled > 0,
        "records wait in the spool while the controller is away"
    );
    controller.signal("-CONT");

    // Stop: the kernel's counter is final; the controller must come to exactly it.
    let (st, stop) = s
        .eventually("the stop", Duration::from_secs(30), async || {
            let r = s
                .call(
                    reqwest::Method::POST,
                    "/v1/control",
                    Some(json!({"action": "StopInstances", "ids": [id]})),
                )
                .await;
            (r.0 == 200).then_some(r)
        })
        .await;
    assert_eq!(st, 200, "{stop}");
    let stopped_at = Instant::now();
    let kernel = cpuacct_usage(&parent, &id);
    assert!(kernel > 100_000_000, "the busy loop used CPU: {kernel} ns");
    let total = s
        .eventually(
            "the controller's total to reach the kernel's",
            Duration::from_secs(30),
            async || usage_of("cpu_ns").await.filter(|&v| v as u64 >= kernel),
        )
        .await;
    assert_eq!(
        total as u64, kernel,
        "counted exactly once: no loss, no double count"
    );

    // Every record the spool numbered arrived once: no gaps, no duplicates.
    const SEQUENCES: &str = "SELECT COUNT(*), MAX(seq), COUNT(DISTINCT epoch) FROM (SELECT seq, epoch FROM usage_records WHERE agent_id = $1 UNION ALL SELECT seq, epoch FROM usage_rejected WHERE agent_id = $1) AS stored";
    let (count, max_seq, epochs): (i64, i64, i64) = match &database_url {
        Some(url) => {
            let db = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query_as(SEQUENCES)
                .bind(&agent_id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
        None => {
            let db = sqlx::SqlitePool::connect(&format!(
                "sqlite://{}?mode=ro",
                s.data.join("controller.db").display()
            ))
            .await
            .unwrap();
            sqlx::query_as(SEQUENCES)
                .bind(&agent_id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    assert!(epochs >= 3, "three agent processes wrote records: {epochs}");
    assert_eq!(
        count,
        max_seq + 1,
        "sequence numbers 0..={max_seq} each stored once"
    );

    // Time running is counted by the agent, which was killed twice: the restarted
    // agents re-adopted the instance in the same run and counted the time they were
    // away, so the total is the wall time from the start to the stop, less at most the
    // first sample's wait and the stop itself (billing rates it: tests/billing.rs).
    let running_ms = s
        .eventually(
            "the last running time",
            Duration::from_secs(20),
            async || {
                usage_of("state_ms.running").await.filter(|&v| {
                    v as u128 >= (stopped_at - started_at).as_millis().saturating_sub(1_000)
                })
            },
        )
        .await;
    let wall = (stopped_at - started_at).as_millis() as i64;
    assert!(
        running_ms <= wall && wall - running_ms < 1_000,
        "running {running_ms} ms of {wall} ms: the agent's restarts lost time"
    );

    let (_, _) = s
        .call(
            reqwest::Method::POST,
            "/v1/control",
            Some(json!({"action": "TerminateInstances", "ids": [id]})),
        )
        .await;
    drop(agent);
    drop(controller);
}
