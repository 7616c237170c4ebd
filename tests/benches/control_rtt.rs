//! `cargo bench -p surplus-tests --bench control_rtt`: the round trip of
//! DescribeInstances from the HTTP API through the controller, over QUIC to the agent
//! and back, at 1 and at 100 concurrent clients, excluding the driver's own work (the
//! agent's driver here answers from memory). Two reference paths show what dominates:
//! `GET /v1/health` (HTTP alone) and DescribeVolumes of nothing (HTTP, authentication
//! and a storage read, no agent). Numbers go to docs/PERFORMANCE.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use surplus_agent::control::{ControlPlane, Driver, DriverError, Mount, Observed};
use surplus_controller::registry::RegistryEvent;
use surplus_protocol::clock;
use surplus_protocol::control::{Instance, Limits, RunSpec, Volume};
use surplus_tests::{RunningAgent, TestController};

/// A driver with no work of its own: what is left is the control path.
struct Instant0;

#[async_trait]
impl Driver for Instant0 {
    fn name(&self) -> String {
        "bench".into()
    }
    async fn run(&self, id: &str, _: &RunSpec, _: &[Mount]) -> Result<String, DriverError> {
        Ok(id.into())
    }
    async fn start(&self, _: &Instance, _: &[Mount]) -> Result<(), DriverError> {
        Ok(())
    }
    async fn stop(&self, _: &Instance, _: Duration) -> Result<(), DriverError> {
        Ok(())
    }
    async fn terminate(&self, _: &Instance, _: Duration) -> Result<(), DriverError> {
        Ok(())
    }
    async fn observe(&self, _: &Instance) -> Result<Observed, DriverError> {
        Ok(Observed {
            running: true,
            ..Default::default()
        })
    }
    async fn set_limits(&self, _: &Instance, _: &Limits) -> Result<(), DriverError> {
        Ok(())
    }
    async fn create_volume(&self, id: &str, _: u64) -> Result<String, DriverError> {
        Ok(id.into())
    }
    async fn delete_volume(&self, _: &Volume) -> Result<(), DriverError> {
        Ok(())
    }
    async fn snapshot(&self, _: &Volume, _: &str) -> Result<(String, u64), DriverError> {
        Ok((String::new(), 0))
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// `clients` tasks, each sending `per_client` requests back to back.
async fn measure(
    tc: &TestController,
    clients: usize,
    per_client: usize,
    request: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> (Duration, Duration, f64) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(200)
        .build()
        .unwrap();
    let request = Arc::new(request);
    // Warm the connections and caches.
    for _ in 0..50 {
        request(&http).send().await.unwrap().bytes().await.unwrap();
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let http = http.clone();
            let request = request.clone();
            tokio::spawn(async move {
                let mut took = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let r = request(&http).send().await.unwrap();
                    assert!(r.status().is_success(), "{}", r.status());
                    r.bytes().await.unwrap();
                    took.push(t.elapsed());
                }
                took
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    all.sort();
    let _ = tc;
    (
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.len() as f64 / wall.as_secs_f64(),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (config, identity) = tc.enroll("bench", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let plane = ControlPlane::open(
        Arc::new(Instant0),
        dir.path().to_owned(),
        clock::system(),
        &config.control,
    )
    .await
    .unwrap();
    let agent = RunningAgent::spawn_with_control(config, clock::system(), plane);
    let id = identity.agent_id;
    events
        .until("online", |e| *e == RegistryEvent::Online(id))
        .await;
    let (_, ran) = tc
        .api_post(
            "/v1/control",
            json!({"action": "RunInstances", "command": ["x"]}),
        )
        .await;
    let instance = ran["instances"][0]["id"]
        .as_str()
        .expect("instance")
        .to_owned();

    let url = tc.url();
    let token = tc.admin_token.clone();
    let describe = {
        let (url, token, instance) = (url.clone(), token.clone(), instance.clone());
        move |c: &reqwest::Client| {
            c.post(format!("{url}/v1/control"))
                .bearer_auth(&token)
                .json(&json!({"action": "DescribeInstances", "ids": [instance]}))
        }
    };
    let storage_only = {
        let (url, token) = (url.clone(), token.clone());
        move |c: &reqwest::Client| {
            c.post(format!("{url}/v1/control"))
                .bearer_auth(&token)
                .json(&json!({"action": "DescribeVolumes"}))
        }
    };
    let health = {
        let url = url.clone();
        move |c: &reqwest::Client| c.get(format!("{url}/v1/health"))
    };
    println!(
        "{:<44} {:>8} {:>11} {:>11} {:>10}",
        "path", "clients", "p50", "p99", "req/s"
    );
    for clients in [1usize, 100] {
        let per = if clients == 1 { 2000 } else { 40 };
        for (name, result) in [
            (
                "GET /v1/health (HTTP only)",
                measure(&tc, clients, per, health.clone()).await,
            ),
            (
                "DescribeVolumes, none (HTTP+auth+SQLite)",
                measure(&tc, clients, per, storage_only.clone()).await,
            ),
            (
                "DescribeInstances (HTTP+auth+SQLite+QUIC)",
                measure(&tc, clients, per, describe.clone()).await,
            ),
        ] {
            let (p50, p99, rate) = result;
            println!(
                "{name:<44} {clients:>8} {:>11} {:>11} {rate:>10.0}",
                ms(p50),
                ms(p99)
            );
        }
    }
    let check: Value = tc
        .api_post(
            "/v1/control",
            json!({"action": "DescribeInstances", "ids": [instance]}),
        )
        .await
        .1;
    assert_eq!(check["instances"][0]["state"], "running");
    agent.stop().await;
}
