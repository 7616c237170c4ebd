//! `cargo bench -p surplus-tests --bench usage_ingest`: the controller's ingest of
//! usage records into SQLite (batches of 500 through `Store::ingest_usage`: validation,
//! duplicate detection, counter deltas, one transaction per batch) side by side with a
//! bare batched insert loop of the same rows into a table of the same shape, on the
//! same machine; and the agent spool's append cost (fsync per record and per batch).
//! Numbers go to docs/PERFORMANCE.md.

use std::time::Instant;

use surplus_agent::spool::{Spool, SpoolLimits};
use surplus_controller::store::sqlite::SqliteStore;
use surplus_controller::store::{NewAgent, NewJoinToken, RegistryStore, UsageStore};
use surplus_protocol::usage::{Reading, Subject, UsageRecord};

const RECORDS: u64 = 50_000;
const BATCH: usize = 500;

fn record(seq: u64) -> UsageRecord {
    UsageRecord {
        epoch: 1,
        seq,
        subject: Subject::Host,
        meter: format!("m{}", seq % 10),
        start_ms: seq as i64 * 1000,
        end_ms: seq as i64 * 1000 + 1000,
        reading: Reading::Counter {
            generation: 1,
            total: seq * 7,
        },
        samples: 1,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("ingest.db"))
        .await
        .unwrap();
    // An enrolled agent: the metering row (the spool's state) refers to it.
    let agent = uuid::Uuid::now_v7();
    store
        .create_join_token(&NewJoinToken {
            id: uuid::Uuid::now_v7(),
            secret_hash: "bench".into(),
            labels: Default::default(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            created_by: "bench".into(),
        })
        .await
        .unwrap();
    store
        .enroll_agent(
            "bench",
            0,
            &NewAgent {
                id: agent,
                hostname: "bench".into(),
                agent_version: "0".into(),
                cert_serial: "01".into(),
                cert_issued_at_ms: 0,
                cert_not_after_ms: i64::MAX,
            },
        )
        .await
        .unwrap();
    let records: Vec<UsageRecord> = (0..RECORDS).map(record).collect();
    let started = Instant::now();
    for chunk in records.chunks(BATCH) {
        store
            .ingest_usage(agent, chunk, &Default::default(), 0)
            .await
            .unwrap();
    }
    let ingest = RECORDS as f64 / started.elapsed().as_secs_f64();

    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("bare.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full),
    )
    .await
    .unwrap();
    sqlx::query("CREATE TABLE r (agent_id TEXT, epoch BIGINT, seq BIGINT, subject TEXT, meter TEXT, start_ms BIGINT, end_ms BIGINT, generation BIGINT, total BIGINT, PRIMARY KEY (agent_id, epoch, seq))")
        .execute(&pool)
        .await
        .unwrap();
    let started = Instant::now();
    for chunk in records.chunks(BATCH) {
        let mut tx = pool.begin().await.unwrap();
        for r in chunk {
            let Reading::Counter { generation, total } = r.reading else {
                unreachable!()
            };
            sqlx::query("INSERT INTO r VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
                .bind(agent.to_string())
                .bind(r.epoch as i64)
                .bind(r.seq as i64)
                .bind(r.subject.as_str())
                .bind(&r.meter)
                .bind(r.start_ms)
                .bind(r.end_ms)
                .bind(generation as i64)
                .bind(total as i64)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
    let bare = RECORDS as f64 / started.elapsed().as_secs_f64();
    println!("ingest (Store::ingest_usage, batches of {BATCH}): {ingest:.0} records/s");
    println!("bare batched insert loop, same rows:            {bare:.0} records/s");
    println!("ratio: {:.2}", ingest / bare);

    let (mut spool, _) = Spool::open(&dir.path().join("spool"), SpoolLimits::default()).unwrap();
    let n = 500;
    let started = Instant::now();
    for i in 0..n {
        spool.append(vec![record(i)]).unwrap();
    }
    let per_record = started.elapsed() / n as u32;
    let started = Instant::now();
    let batches = 20;
    for b in 0..batches {
        spool
            .append((0..BATCH as u64).map(|i| record(b * 1000 + i)).collect())
            .unwrap();
    }
    let per_batch = started.elapsed() / batches as u32;
    println!("spool append, one record + fsync: {per_record:?} per record");
    println!(
        "spool append, {BATCH} records + one fsync: {per_batch:?} per batch ({:?} per record)",
        per_batch / BATCH as u32
    );
}
