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
