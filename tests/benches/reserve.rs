//! `cargo bench -p surplus-tests --bench reserve`: reservations per second through the
//! HTTP API (`POST /v1/reservations`, on demand, one host each) on SQLite and on
//! PostgreSQL, with 1 and with 16 clients at once, each reserving and releasing in a
//! loop over a listing of 64 hosts, so that the book a reservation reads grows as it
//! would. Latency percentiles of the reserve call and the rate of reserve + release
//! pairs. Numbers go to docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use surplus_market::resell::{Interruptibility, PricingMode};
use surplus_protocol::clock;
use surplus_tests::{TestController, list_hosts, online_hosts, test_config};

const HOSTS: usize = 64;
const PER_CLIENT: usize = 200;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn setup(database_url: Option<String>) -> (TestController, Vec<String>) {
    let mut config = test_config();
    if let Some(url) = database_url {
        config.database_url = url;
    }
    let tc = TestController::start_with(config, clock::system()).await;
    let hosts = online_hosts(&tc, "bob", HOSTS).await;
    list_hosts(
        tc.ctl(),
        "lst-bench",
        "bob",
        &hosts,
        &[PricingMode::OnDemand],
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    let mut tokens = Vec::new();
    for n in 0..16 {
        tokens.push(tc.token_for(&format!("client-{n}"), "client").await);
    }
    (tc, tokens)
}

/// `clients` clients each reserving and releasing `PER_CLIENT` times: the reserve
/// latencies, sorted, and pairs per second.
async fn run(tc: &TestController, tokens: &[String], clients: usize) -> (Vec<Duration>, f64) {
    let http = reqwest::Client::new();
    let url = tc.url();
    let started = Instant::now();
    let tasks: Vec<_> = tokens[..clients]
        .iter()
        .cloned()
        .map(|token| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(PER_CLIENT);
                for _ in 0..PER_CLIENT {
                    let t = Instant::now();
                    let r = http
                        .post(format!("{url}/v1/reservations"))
                        .bearer_auth(&token)
                        .json(&json!({"listing": "lst-bench", "mode": "on_demand"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 201);
                    let made: Value = r.json().await.unwrap();
                    latencies.push(t.elapsed());
                    let id = made[0]["reservation"]["id"].as_str().unwrap().to_owned();
                    let r = http
                        .post(format!("{url}/v1/reservations/{id}/release"))
                        .bearer_auth(&token)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 200);
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (all, rate)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!(
        "{:<12} {:>7} {:>10} {:>10} {:>14}",
        "backend", "clients", "p50", "p99", "reserve+release/s"
    );
    for backend in ["sqlite", "postgres"] {
        let url = match backend {
            "postgres" => Some(surplus_tests::postgres::fresh_database().await),
            _ => None,
        };
        let (tc, tokens) = setup(url).await;
        for clients in [1, 16] {
            let (latencies, rate) = run(&tc, &tokens, clients).await;
            println!(
                "{backend:<12} {clients:>7} {:>8.2}ms {:>8.2}ms {rate:>14.0}",
                percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            );
        }
    }
}
