//! Validation runs ordered through the API: the agent measures, the controller stores
//! and returns the results; runs can be cancelled; a run whose agent disconnects ends
//! as failed instead of hanging.

use surplus_controller::registry::RegistryEvent;
use surplus_controller::store::RunStatus;
use surplus_protocol::clock;
use surplus_tests::{RunningAgent, TestController};
use uuid::Uuid;

async fn agent(tc: &TestController, name: &str) -> (RunningAgent, tempfile::TempDir) {
    let scratch = tempfile::tempdir().unwrap();
    let (mut config, _) = tc.enroll(name, &[]).await;
    config.bench_scratch_dir = scratch.path().to_path_buf();
    let mut events = tc.events();
    let agent = RunningAgent::spawn(config, clock::system());
    events
        .until("online", |e| *e == RegistryEvent::Online(agent.id))
        .await;
    (agent, scratch)
}

fn finished(run_id: Uuid) -> impl FnMut(&RegistryEvent) -> bool {
    move |e| matches!(e, RegistryEvent::ValidationFinished { run_id: r, .. } if *r == run_id)
}

fn run_id(body: &serde_json::Value) -> Uuid {
    body["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_results_are_stored_and_returned() {
    let tc = TestController::start().await;
    let (agent, scratch) = agent(&tc, "v").await;
    let mut events = tc.events();
    let (status, body) = tc
        .api_post(&format!("/v1/agents/{}/validation", agent.id), serde_json::json!({ "quick": true, "repetitions": 2, "budget": "300s", "network_bytes": 2_000_000 }))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "running");
    let id = run_id(&body);
    events.until("the run to end", finished(id)).await;

    let (status, run) = tc.api_get(&format!("/v1/validations/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["agent_version"], env!("CARGO_PKG_VERSION"));
    let results = run["bench"]["results"].as_array().unwrap();
    for want in [
        "cpu.int.single",
        "cpu.sha256.multi",
        "memory.triad",
        "memory.latency",
        "storage.seqread",
        "storage.randwrite",
        "network.rtt",
        "network.throughput",
    ] {
        let r = results
            .iter()
            .find(|r| r["id"] == want)
            .unwrap_or_else(|| panic!("missing {want} in {results:?}"));
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(run["bench"]["composite_score"].as_f64().unwrap() > 0.0);
    let findings = run["security"]["findings"].as_array().unwrap();
    assert!(findings.len() >= 30);
    assert!(
        findings
            .iter()
            .any(|f| f["id"] == "agent.key_permissions" && f["status"] == "pass"),
        "the enrolled agent's key is private"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "the scratch file is gone"
    );

    let (status, history) = tc
        .api_get(&format!("/v1/agents/{}/validation", agent.id))
        .await;
    assert_eq!(status, 200);
    assert_eq!(run_id(&history["latest"]), id);
    assert_eq!(history["history"].as_array().unwrap().len(), 1);

    // Bad requests name the problem; unknown runs are 404; ended runs cannot be cancelled.
    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{}/validation", agent.id),
            serde_json::json!({ "bench": false, "security": false }),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, _) = tc
        .api_post(
            &format!("/v1/agents/{}/validation", agent.id),
            serde_json::json!({ "budget": "forever" }),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = tc
        .api_get(&format!("/v1/validations/{}", Uuid::now_v7()))
        .await;
    assert_eq!(status, 404);
    let (status, body) = tc
        .api_post(
            &format!("/v1/validations/{id}/cancel"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (409, Some("not_running")));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_can_be_cancelled() {
    let tc = TestController::start().await;
    let (agent, _scratch) = agent(&tc, "c").await;
    let mut events = tc.events();
    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{}/validation", agent.id),
            serde_json::json!({ "security": false, "budget": "600s" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = run_id(&body);
    events
        .until("progress", |e| *e == RegistryEvent::ValidationProgress(id))
        .await;
    let (status, body) = tc
        .api_post(
            &format!("/v1/validations/{id}/cancel"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["cancelling"], true);
    let mut status = None;
    events
        .until("the cancelled run to end", |e| match e {
            RegistryEvent::ValidationFinished { run_id, status: s } if *run_id == id => {
                status = Some(*s);
                true
            }
            _ => false,
        })
        .await;
    assert_eq!(status, Some(RunStatus::Cancelled));
    let (_, run) = tc.api_get(&format!("/v1/validations/{id}")).await;
    assert_eq!(run["bench"]["cancelled"], true);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fails_when_its_agent_disconnects() {
    let tc = TestController::start().await;
    let (agent, _scratch) = agent(&tc, "d").await;
    let mut events = tc.events();
    let (_, body) = tc
        .api_post(
            &format!("/v1/agents/{}/validation", agent.id),
            serde_json::json!({ "security": false, "budget": "600s" }),
        )
        .await;
    let id = run_id(&body);
    events
        .until("progress", |e| *e == RegistryEvent::ValidationProgress(id))
        .await;
    let agent_id = agent.id;
    agent.stop().await;
    events.until("the run to end", finished(id)).await;
    let (_, run) = tc.api_get(&format!("/v1/validations/{id}")).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"].as_str().unwrap().contains("disconnected"),
        "{run}"
    );

    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{agent_id}/validation"),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("agent_offline")),
        "{body}"
    );
}
