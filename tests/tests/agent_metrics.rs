//! The agent's own Prometheus endpoint (`metrics_listen`): what a scrape of a real
//! agent connected to a real controller says about its session, heartbeats,
//! certificate, spool, usage and control commands; that it listens on loopback only,
//! and not at all unless asked.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use surplus_agent::control::DriverKind;
use surplus_agent::{AgentConfig, Runner};
use surplus_protocol::clock;
use surplus_tests::{CgroupGuard, PATIENCE, TestController, bin, control_config, free_tcp_port};
use tokio_util::sync::CancellationToken;

/// One scrape: every sample by its name with labels, as written.
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { text, samples }
    }

    /// The value of the sample written exactly `series` (name and labels).
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series} in\n{}", self.text))
    }

    /// The value of the series if present.
    fn find(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }
}

async fn scrape(url: &str) -> Scrape {
    let r = reqwest::get(url)
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(r.status(), 200, "GET {url}");
    let kind = r.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    Scrape::parse(r.text().await.unwrap())
}

/// Scrapes `url` until `want` accepts the scrape; fails after [`PATIENCE`]. The agent
/// is another task (or process) with its own timers, so there is no event to await.
async fn scrape_until(url: &str, what: &str, want: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let s = scrape(url).await;
        if want(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_connected_agent_reports_its_session_heartbeats_certificate_usage_and_commands() {
    let tag = "agent-metrics";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    let mut tc = TestController::start().await;
    let (mut config, identity) = tc.enroll("metrics", &[]).await;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.control = control_config(DriverKind::Process, tag);
    // Host records every second, so usage flows within the test.
    config.metering.host_period = Duration::from_secs(1);
    config.metering.instance_period = Duration::from_secs(1);
    config.metering.resolution = Duration::from_millis(100);
    let runner = Runner::new(config, clock::system()).unwrap();
    let metrics = runner.metrics();
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(runner.run(cancel.clone()));
    tc.until_connected("the agent's session", &[identity.agent_id])
        .await;
    let addr = metrics
        .local_addr()
        .expect("bound before the session opened");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    let url = format!("http://{addr}/metrics");

    // Connected, one session, heartbeats acknowledged and growing.
    let first = scrape_until(&url, "a heartbeat", |s| {
        s.get("surplus_agent_heartbeats_total") >= 1.0
    })
    .await;
    assert_eq!(first.get("surplus_agent_session_connected"), 1.0);
    assert_eq!(first.get("surplus_agent_sessions_opened_total"), 1.0);
    assert_eq!(first.get("surplus_agent_reconnects_total"), 0.0);
    let beats = first.get("surplus_agent_heartbeats_total");
    scrape_until(&url, "more heartbeats", |s| {
        s.get("surplus_agent_heartbeats_total") >= beats + 2.0
    })
    .await;

    // The certificate in use: the one enrollment wrote, valid for a while yet.
    let expiry = first.get("surplus_agent_certificate_expiry_seconds");
    assert_eq!(expiry, (identity.certificate.not_after_ms / 1000) as f64);
    let now_s = (clock::system().now_ms() / 1000) as f64;
    assert!(
        expiry > now_s + 3600.0 && expiry < now_s + 400.0 * 86400.0,
        "expiry {expiry} against now {now_s}"
    );
    assert!(
        first.text.contains(&format!(
            "surplus_agent_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        first.text
    );

    // Usage: records sent and acknowledged; the spool's gauges are there (segments
    // whose records were all acknowledged are deleted, so they may well read 0).
    let usage = scrape_until(&url, "usage acknowledged", |s| {
        s.get("surplus_agent_usage_records_acknowledged_total") >= 1.0
    })
    .await;
    assert!(
        usage.get("surplus_agent_usage_records_sent_total")
            >= usage.get("surplus_agent_usage_records_acknowledged_total")
    );
    assert!(
        usage
            .find("surplus_agent_usage_batches_total{result=\"committed\"}")
            .unwrap()
            >= 1.0
    );
    for gauge in [
        "surplus_agent_spool_records",
        "surplus_agent_spool_bytes",
        "surplus_agent_spool_merged_records_total",
        "surplus_agent_spool_discarded_records_total",
    ] {
        assert!(usage.get(gauge) >= 0.0, "{gauge}");
    }

    // Control commands through the API, counted by operation and outcome.
    let id = identity.agent_id;
    let (st, run) = tc
        .api_post(
            "/v1/control",
            json!({"action": "RunInstances", "command": ["sleep", "600"], "agent_id": id}),
        )
        .await;
    assert_eq!(st, 200, "{run}");
    let instance = run["instances"][0]["id"].as_str().unwrap().to_owned();
    let (st, stop) = tc
        .api_post(
            "/v1/control",
            json!({"action": "StopInstances", "ids": [instance]}),
        )
        .await;
    assert_eq!(st, 200, "{stop}");
    let (st, failed) = tc
        .api_post(
            "/v1/control",
            json!({"action": "RunInstances", "command": ["/no/such/program"], "agent_id": id}),
        )
        .await;
    assert_eq!(st, 502, "{failed}");
    let (st, gone) = tc
        .api_post(
            "/v1/control",
            json!({"action": "TerminateInstances", "ids": [instance]}),
        )
        .await;
    assert_eq!(st, 200, "{gone}");
    let after = scrape(&url).await;
    let commands = |operation: &str, outcome: &str| {
        after
            .find(&format!(
                "surplus_agent_control_commands_total{{operation=\"{operation}\",outcome=\"{outcome}\"}}"
            ))
            .unwrap_or(0.0)
    };
    assert_eq!(commands("RunInstances", "ok"), 1.0, "{}", after.text);
    assert_eq!(commands("StopInstances", "ok"), 1.0, "{}", after.text);
    assert_eq!(commands("TerminateInstances", "ok"), 1.0, "{}", after.text);
    let refused: f64 = [
        "driver",
        "invalid_parameter",
        "not_found",
        "conflict",
        "unsupported",
    ]
    .iter()
    .map(|o| commands("RunInstances", o))
    .sum();
    assert_eq!(
        refused, 1.0,
        "the failed start is counted as refused:\n{}",
        after.text
    );
    assert!(
        after
            .find("surplus_agent_control_seconds_total{operation=\"RunInstances\"}")
            .unwrap()
            > 0.0
    );

    // Only /metrics, only GET.
    let http = reqwest::Client::new();
    let other = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(other.status(), 404);
    let other = http
        .get(format!("http://{addr}/metricsx"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let post = http.post(&url).send().await.unwrap();
    assert_eq!(post.status(), 405);

    // The controller goes away: the agent says it is not connected and tries again.
    tc.stop().await;
    let lost = scrape_until(&url, "the session lost", |s| {
        s.get("surplus_agent_session_connected") == 0.0
            && s.get("surplus_agent_reconnects_total") >= 1.0
    })
    .await;
    assert_eq!(lost.get("surplus_agent_sessions_opened_total"), 1.0);
    tc.restart().await;
    let back = scrape_until(&url, "the session back", |s| {
        s.get("surplus_agent_session_connected") == 1.0
    })
    .await;
    assert_eq!(back.get("surplus_agent_sessions_opened_total"), 2.0);

    // Stopping the agent stops its endpoint.
    cancel.cancel();
    agent.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "nothing listens once the agent stopped"
    );
}

fn load(file_text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, file_text).unwrap();
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    AgentConfig::load_with_env(Some(&file), Some(env)).map_err(|e| e.to_string())
}

#[test]
fn metrics_listen_is_off_by_default_and_loopback_only() {
    assert_eq!(AgentConfig::default().metrics_listen, None);
    assert_eq!(load("", &[]).unwrap().metrics_listen, None);
    for ok in ["127.0.0.1:9108", "127.0.0.2:0", "[::1]:9108"] {
        let loaded = load(&format!("metrics_listen = \"{ok}\"\n"), &[]).unwrap();
        assert_eq!(loaded.metrics_listen, Some(ok.parse().unwrap()), "{ok}");
    }
    let env = load("", &[("SURPLUS_AGENT_METRICS_LISTEN", "127.0.0.1:9200")]).unwrap();
    assert_eq!(env.metrics_listen, Some("127.0.0.1:9200".parse().unwrap()));
    for refused in [
        "0.0.0.0:9108",
        "192.0.2.7:9108",
        "[::]:9108",
        "[::ffff:127.0.0.1]:9108",
    ] {
        let err = load(&format!("metrics_listen = \"{refused}\"\n"), &[]).unwrap_err();
        assert!(
            err.contains("metrics_listen") && err.contains("loopback"),
            "{refused}: {err}"
        );
    }
    let err = load("", &[("SURPLUS_AGENT_METRICS_LISTEN", "0.0.0.0:9108")]).unwrap_err();
    assert!(
        err.contains("metrics_listen") && err.contains("loopback"),
        "{err}"
    );
    let err = load("metrics_listen = \"localhost\"\n", &[]).unwrap_err();
    assert!(err.contains("metrics_listen"), "{err}");
}

/// The TCP ports `pid` listens on, from its own socket inodes in `/proc`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(fd.path()) {
            let link = link.display().to_string();
            if let Some(inode) = link
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_process(data_dir: &Path, config_text: &str) -> Child {
    let file = data_dir.join("agent.toml");
    std::fs::write(&file, config_text).unwrap();
    Child(
        Command::new(bin("surplus-agent"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("surplus-agent starts"),
    )
}

#[tokio::test]
async fn the_agent_process_listens_for_metrics_only_when_asked_and_only_on_loopback() {
    let tc = TestController::start().await;
    let base =
        "reconnect_min = \"50ms\"\nreconnect_max = \"500ms\"\n[control]\ndriver = \"none\"\n";

    // Asked: exactly one listening socket, the configured one, scraped from outside.
    let (on, on_identity) = tc.enroll("with-metrics", &[]).await;
    let port = free_tcp_port();
    let with = agent_process(
        &on.data_dir,
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n{base}"),
    );
    // Not asked: no listening socket at all.
    let (off, off_identity) = tc.enroll("without-metrics", &[]).await;
    let without = agent_process(&off.data_dir, base);
    tc.until_connected(
        "both agent processes",
        &[on_identity.agent_id, off_identity.agent_id],
    )
    .await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let s = scrape_until(&url, "the session in the process's metrics", |s| {
        s.get("surplus_agent_session_connected") == 1.0
    })
    .await;
    assert_eq!(s.get("surplus_agent_sessions_opened_total"), 1.0);
    assert_eq!(listening_ports(with.0.id()), vec![port]);
    assert_eq!(
        listening_ports(without.0.id()),
        Vec::<u16>::new(),
        "an agent without metrics_listen listens on no TCP port"
    );

    // A non-loopback address stops the agent at start, naming the key.
    let (bad, _) = tc.enroll("public-metrics", &[]).await;
    let mut refused = agent_process(
        &bad.data_dir,
        &format!("metrics_listen = \"0.0.0.0:{port}\"\n{base}"),
    );
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not refuse 0.0.0.0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("metrics_listen") && stderr.contains("loopback"),
        "{stderr}"
    );
}
