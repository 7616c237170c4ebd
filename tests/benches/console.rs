//! `cargo bench -p surplus-tests --bench console`: how long the console's fleet page
//! takes against a loadgen-sized registry (10,000 agents, each with an inventory like
//! a real host's), through HTTP with a signed-in session: the first page in the
//! default order, a later page in another order, a search, and the API's own
//! `GET /v1/agents` beside them; on SQLite, then on PostgreSQL (a throwaway server the
//! bench starts). Numbers go to docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnectOptions;
use surplus_tests::TestController;

const AGENTS: usize = 10_000;
const ROUNDS: usize = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Writes `AGENTS` enrolled agents into the database behind `$pool` (SQLite or
/// PostgreSQL: the statement is the same), a third of them seen recently, each with a
/// host-sized inventory.
macro_rules! fill {
    ($pool:expr, $now:expr) => {{
        let now: i64 = $now;
        let mut tx = $pool.begin().await.unwrap();
        for n in 0..AGENTS {
            let inventory = serde_json::json!({
                "os": {"name": "Debian GNU/Linux", "version": "12", "kernel": "6.1.0-18-amd64"},
                "cpu": {"vendor": "GenuineIntel", "model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
                        "logical_cpus": 8 + (n % 4) * 8, "physical_cores": 4 + (n % 4) * 4,
                        "flags": ["avx2", "avx512f", "aes", "sha_ni", "vmx"]},
                "memory": {"total_bytes": (16u64 << 30) * (1 + (n as u64 % 8)), "swap_bytes": 0},
                "disks": [{"name": "nvme0n1", "bytes": 960u64 << 30, "rotational": false}],
                "nics": [{"name": "eth0", "speed_mbps": 10_000, "mac": "02:00:00:00:00:01"}],
                "gpus": [],
            });
            sqlx::query(
                "INSERT INTO agents (id, hostname, labels, status, cert_serial, cert_not_after_ms, \
                 agent_version, enrolled_at_ms, first_seen_ms, last_seen_ms, online_since_ms, \
                 online_total_ms, inventory, join_token_id, inventory_cpus, inventory_memory_bytes, \
                 inventory_os, inventory_gpus) \
                 VALUES ($1, $2, $3, $4, $5, $6, '0.1.0', $7, $7, $8, $9, $10, $11, 'bench', $12, $13, \
                 'Debian GNU/Linux 12', 0)",
            )
            .bind(uuid::Uuid::from_u128(n as u128 + 1).to_string())
            .bind(format!("host-{n:05}"))
            .bind(format!(r#"{{"zone":"zone-{}"}}"#, n % 12))
            .bind(if n % 3 == 0 { "online" } else { "unreachable" })
            .bind(format!("{n:032x}"))
            .bind(now + 86_400_000)
            .bind(now - 86_400_000)
            .bind(now - (n as i64 % 3600) * 1000)
            .bind((n % 3 == 0).then_some(now - 3_600_000))
            .bind(3_600_000_i64)
            .bind(inventory.to_string())
            .bind(inventory["cpu"]["logical_cpus"].as_i64())
            .bind(inventory["memory"]["total_bytes"].as_i64())
            .execute(&mut *tx)
            .await
            .expect("agent row");
        }
        tx.commit().await.unwrap();
        $pool.close().await;
    }};
}

async fn measure(
    http: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    bearer: Option<&str>,
) -> (Duration, Duration, usize) {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut size = 0;
    // The first request is not counted: it warms the database's cache and statements.
    for round in 0..=ROUNDS {
        let mut r = http.get(url);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        if let Some(t) = bearer {
            r = r.bearer_auth(t);
        }
        let start = Instant::now();
        let response = r.send().await.expect("answer");
        assert_eq!(response.status(), 200, "{url}");
        size = response.bytes().await.expect("body").len();
        if round > 0 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), size)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("{AGENTS} agents; {ROUNDS} requests each, one at a time, after one not counted");
    for backend in ["sqlite", "postgres"] {
        println!("\n{backend}");
        let tc = if backend == "sqlite" {
            let tc = TestController::start().await;
            let path = tc.dir.path().join("controller.db");
            let pool = sqlx::SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
                .await
                .expect("controller.db opens");
            fill!(pool, tc.clock.now_ms());
            tc
        } else {
            let url = surplus_tests::postgres::fresh_database().await;
            let config = surplus_controller::ControllerConfig {
                database_url: url.clone(),
                ..surplus_tests::test_config()
            };
            let tc = TestController::start_with(config, surplus_protocol::clock::system()).await;
            let pool = sqlx::PgPool::connect(&url).await.expect("database opens");
            fill!(pool, tc.clock.now_ms());
            tc
        };
        run(&tc).await;
    }
}

async fn run(tc: &TestController) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = tc.url();
    let signed = http
        .post(format!("{base}/console/sign-in"))
        .form(&[("token", tc.admin_token.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = signed.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // The store's read of every agent alone, which the page and the API share.
    let mut reads = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let agents = tc.ctl().app.store.agents().await.expect("agents");
        reads.push(start.elapsed());
        assert_eq!(agents.len(), AGENTS);
    }
    reads.sort();
    println!(
        "{:32} p50 {:>9.2?}  p99 {:>9.2?}",
        "store: every agent",
        percentile(&reads, 0.5),
        percentile(&reads, 0.99)
    );
    for (what, path) in [
        ("fleet, first page", "/console/fleet"),
        (
            "fleet, page 40 by last seen",
            "/console/fleet?sort=last_seen&page=40",
        ),
        (
            "fleet, page 50 by uptime",
            "/console/fleet?sort=uptime&page=50",
        ),
        (
            "fleet, online in one zone",
            "/console/fleet?status=online&q=zone%3Dzone-7",
        ),
    ] {
        let (p50, p99, size) = measure(&http, &format!("{base}{path}"), Some(&cookie), None).await;
        println!("{what:32} p50 {p50:>9.2?}  p99 {p99:>9.2?}  {size} bytes");
    }
    let (p50, p99, size) = measure(
        &http,
        &format!("{base}/v1/agents"),
        None,
        Some(&tc.admin_token),
    )
    .await;
    println!(
        "{:32} p50 {p50:>9.2?}  p99 {p99:>9.2?}  {size} bytes",
        "GET /v1/agents (JSON, all)"
    );
}
