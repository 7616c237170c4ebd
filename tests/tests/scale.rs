//! A reduced run of the load generator: 200 simulated agents (real enrollment, real
//! mutual-TLS QUIC sessions) against a real controller process for 20 s, with
//! heartbeats every second, usage every two seconds (every fifth batch sent twice, as
//! if its acknowledgement had been lost) and control commands through the API. It
//! asserts correctness under load, not speed: every agent online, every usage record
//! stored exactly once with the right counter totals, every control command answered.

use std::process::Command;

use serde_json::Value;
use surplus_tests::bin;

#[test]
fn two_hundred_agents_are_all_online_every_record_stored_once_every_command_answered() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(bin("surplus-loadgen"))
        .args([
            "agents",
            "--agents",
            "200",
            "--duration",
            "20s",
            "--heartbeat",
            "1s",
            "--usage-period",
            "2s",
            "--usage-records",
            "8",
            "--resend-every",
            "5",
            "--control-rate",
            "20",
            "--control-delay",
            "5ms",
            "--concurrency",
            "32",
            "--agents-per-socket",
            "50",
            "--dir",
        ])
        .arg(dir.path().join("run"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "surplus-loadgen failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let n = |path: &[&str]| -> u64 {
        let mut v = &r;
        for p in path {
            v = &v[*p];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("{path:?} is not a count in {r:#}"))
    };
    let context = format!("{stdout}\n{r:#}");

    assert_eq!(r["problems"], Value::Array(vec![]), "{context}");
    assert_eq!(r["errors"], serde_json::json!({}), "{context}");
    // Every agent enrolled with its own token, connected and is online.
    assert_eq!(n(&["enrollment", "count"]), 200, "{context}");
    assert_eq!(n(&["connected_at_end"]), 200, "{context}");
    assert_eq!(n(&["online_at_end"]), 200, "{context}");
    assert!(n(&["heartbeats", "acked"]) >= 200 * 15, "{context}");

    // Usage: every record created is a row, once; resent batches were recognised.
    let created = n(&["usage", "created"]);
    assert!(created >= 200 * 8 * 8, "{context}");
    assert_eq!(n(&["usage", "acked"]), created, "{context}");
    assert_eq!(n(&["usage", "stored"]), created, "{context}");
    assert_eq!(n(&["usage", "rows_in_database"]), created, "{context}");
    assert_eq!(n(&["usage", "agents_with_gaps_or_extras"]), 0, "{context}");
    assert_eq!(n(&["usage", "agents_with_wrong_totals"]), 0, "{context}");
    assert_eq!(n(&["usage", "rejected"]), 0, "{context}");
    let resent = n(&["usage", "resent_batches"]);
    assert!(resent >= 200, "{context}");
    assert!(n(&["usage", "duplicates"]) >= resent * 8, "{context}");

    // Control: every command through the API answered, by the agent it was for.
    let sent = n(&["control", "sent"]);
    assert!(sent >= 200, "{context}");
    assert_eq!(n(&["control", "ok"]), sent, "{context}");
    assert_eq!(n(&["control", "failed"]), 0, "{context}");
    assert!(n(&["control", "received_by_agents"]) >= sent, "{context}");
    assert_eq!(
        n(&["control", "answered_by_agents"]),
        n(&["control", "received_by_agents"]),
        "{context}"
    );
    // The controller was sampled throughout.
    assert!(
        r["controller"]["samples"].as_array().unwrap().len() >= 20,
        "{context}"
    );
}

/// Batches that arrive together share a group commit, and each still gets its own
/// answer: all new records stored once, every resent batch recognised in full, even
/// when the resend lands in the same transaction as the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_usage_batches_share_commits_and_each_gets_its_own_answer() {
    concurrent_batches(surplus_tests::TestController::start().await).await;
}

/// The same on PostgreSQL, where group commits run in several lanes at once: an
/// agent's batches still commit in order and each record is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_usage_batches_share_commits_and_each_gets_its_own_answer_on_postgres() {
    let config = surplus_controller::config::ControllerConfig {
        database_url: surplus_tests::postgres::fresh_database().await,
        ..surplus_tests::test_config()
    };
    let tc =
        surplus_tests::TestController::start_with(config, surplus_protocol::clock::system()).await;
    assert!(
        tc.ctl().app.store.ingest_lanes() > 1,
        "PostgreSQL commits in lanes"
    );
    concurrent_batches(tc).await;
}

async fn concurrent_batches(tc: surplus_tests::TestController) {
    use surplus_protocol::Message;
    use surplus_protocol::usage::{Reading, Subject, UsageBatch, UsageRecord, meters};

    let mut agents = Vec::new();
    for i in 0..8 {
        agents.push(tc.enroll(&format!("a{i}"), &[]).await.1.agent_id);
    }
    let batch = |b: u64| UsageBatch {
        records: (0..10)
            .map(|i| UsageRecord {
                epoch: 7,
                seq: b * 10 + i,
                subject: Subject::Host,
                meter: format!("{}.{i}", meters::HOST_CPU_BUSY_MS),
                start_ms: 0,
                end_ms: 1000,
                reading: Reading::Counter {
                    generation: 1,
                    total: b * 100 + i,
                },
                samples: 1,
            })
            .collect(),
        spool: Default::default(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (a, agent) in agents.iter().enumerate() {
        for b in 0..50u64 {
            let sends = if b % 10 == 0 { 2 } else { 1 };
            for _ in 0..sends {
                let (ctl, agent, batch) = (tc.ctl().clone(), *agent, batch(b));
                tasks.spawn(async move { (a, ctl.metering.ingest(agent, batch).await) });
            }
        }
    }
    let (mut stored, mut duplicates, mut answers) = (0u64, 0u64, 0u64);
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (_, Message::UsageAck(ack)) => {
                assert_eq!(ack.rejected, 0);
                assert_eq!(ack.stored + ack.duplicates, 10, "{ack:?}");
                stored += u64::from(ack.stored);
                duplicates += u64::from(ack.duplicates);
                answers += 1;
            }
            (a, other) => panic!("agent {a}: {other:?}"),
        }
    }
    assert_eq!(answers, 8 * 55);
    assert_eq!(stored, 8 * 50 * 10);
    assert_eq!(duplicates, 8 * 5 * 10);
    // Every record is stored once, under its own agent (the batches above race each
    // other, so the order of commits, and with it the counters' deltas, is not fixed).
    for agent in &agents {
        let rows = tc
            .ctl()
            .app
            .store
            .usage(&surplus_controller::store::UsageQuery {
                agent_id: Some(*agent),
                subject: None,
                account: None,
                owner_role: None,
                meter: None,
                from_ms: -1,
                to_ms: 2000,
                bucket_ms: 3_600_000,
            })
            .await
            .expect("usage read");
        assert_eq!(rows.len(), 10, "agent {agent}: {rows:?}");
        for row in rows {
            assert_eq!(row.records, 50, "agent {agent}: {row:?}");
        }
    }
    let commits = tc.ctl().app.metrics.usage_commits.get();
    assert!(
        commits < answers,
        "{commits} commits for {answers} batches arriving together: none shared"
    );
}

/// Past its queue limit the controller refuses batches as busy at once instead of
/// queueing without bound; a refused batch is stored when sent again, and once the
/// queue drained every batch is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overfull_ingest_queue_answers_busy_and_loses_nothing() {
    use surplus_protocol::usage::{Reading, Subject, UsageBatch, UsageRecord};
    use surplus_protocol::{ErrorCode, Message};

    let tc = surplus_tests::TestController::start().await;
    let agent = tc.enroll("a", &[]).await.1.agent_id;
    let batch = |b: u64| UsageBatch {
        records: (0..100)
            .map(|i| UsageRecord {
                epoch: 1,
                seq: b * 100 + i,
                subject: Subject::Host,
                meter: "memory_used_bytes".into(),
                start_ms: 0,
                end_ms: 1000,
                reading: Reading::Gauge {
                    last: 1,
                    peak: 1,
                    mean: 1,
                },
                samples: 1,
            })
            .collect(),
        spool: Default::default(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for b in 0..500u64 {
        let ctl = tc.ctl().clone();
        tasks.spawn(async move { (b, ctl.metering.ingest(agent, batch(b)).await) });
    }
    let (mut stored, mut busy) = (0u64, Vec::new());
    while let Some(done) = tasks.join_next().await {
        match done.unwrap() {
            (_, Message::UsageAck(ack)) => stored += u64::from(ack.stored),
            (b, Message::Error(e)) if e.code == ErrorCode::Busy => busy.push(b),
            (b, other) => panic!("batch {b}: {other:?}"),
        }
    }
    assert!(
        !busy.is_empty(),
        "50,000 records at once stayed under the queue limit"
    );
    for b in busy {
        match tc.ctl().metering.ingest(agent, batch(b)).await {
            Message::UsageAck(ack) => stored += u64::from(ack.stored),
            other => panic!("batch {b} sent again alone: {other:?}"),
        }
    }
    assert_eq!(stored, 500 * 100, "every record stored exactly once");
}

/// The controller process a load generator started: its pid and API address.
fn controller_of(loadgen: u32) -> Option<(i32, String)> {
    for entry in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: the fields after the command name.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid != Some(loadgen) || !cmdline.split(|b| *b == 0).any(|a| a == b"serve") {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        let http = environ.split(|b| *b == 0).find_map(|kv| {
            std::str::from_utf8(kv)
                .ok()?
                .strip_prefix("SURPLUS_CONTROLLER_HTTP_LISTEN=")
                .map(str::to_owned)
        })?;
        return Some((pid, http));
    }
    None
}

/// `GET /v1/health` over a bare connection: the connected agents it reports.
fn connected_agents(http: &str) -> Option<u64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(http).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    s.write_all(format!("GET /v1/health HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes())
        .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n")?.1).ok()?;
    body["connected_agents"].as_u64()
}

/// A run whose controller dies mid-way still writes the report of what it measured
/// until then, names the phase that failed, and exits 1.
#[test]
fn a_run_whose_controller_dies_reports_what_it_measured_and_where_it_failed() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let mut loadgen = Command::new(bin("surplus-loadgen"))
        .args([
            "agents",
            "--agents",
            "20",
            "--duration",
            "12s",
            "--heartbeat",
            "1s",
            "--usage-period",
            "2s",
            "--usage-records",
            "4",
            "--control-rate",
            "5",
            "--dir",
        ])
        .arg(dir.path().join("run"))
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (pid, http) = loop {
        if let Some(found) = controller_of(loadgen.id()) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the load generator started no controller"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // Into the steady phase: every simulated agent connected, then a little more.
    while connected_agents(&http) != Some(20) {
        assert!(Instant::now() < deadline, "the agents did not all connect");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = loadgen.wait().unwrap();
    assert_eq!(status.code(), Some(1), "a failed run exits 1");
    let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["failed_phase"], "steady", "{r:#}");
    assert_eq!(r["phase"], "steady", "{r:#}");
    assert_eq!(
        r["enrollment"]["count"], 20,
        "what was measured is kept: {r:#}"
    );
    assert!(
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().starts_with("the steady phase failed")),
        "{r:#}"
    );
}
