//! `cargo bench -p surplus-tests --bench usage_ingest`: the controller's ingest of
//! usage records (batches of 500 through `Store::ingest_usage`: validation, duplicate
//! detection, the owner lookup of each instance a batch names, counter deltas and
//! cursors, the spool state, one transaction per batch), on SQLite and on PostgreSQL,
//! each side by side with a bare batched insert of the same rows; and the agent spool's
//! append cost (fsync per record and per batch). Numbers go to docs/PERFORMANCE.md.
//!
//! Like is compared with like:
//!
//! - the bare insert writes into the store's own `usage_records` table: its
//!   statements are read from the controller's migrations (and the applied schemas
//!   are compared), one multi-row `INSERT` per batch of the same rows the store
//!   stores, one transaction per batch;
//! - the checkpoint policy is the store's: on SQLite commits never checkpoint
//!   (`wal_autocheckpoint=0` on the writing connection) and a passive checkpoint runs
//!   beside the writer every second, as the controller's maintenance task does; on
//!   PostgreSQL the server checkpoints by itself;
//! - batches hold host records and records of instances the store knows (claimed
//!   before the clock starts), so the owner lookup runs;
//! - both databases are durable: SQLite in WAL mode with `synchronous=FULL` (the
//!   store's settings), PostgreSQL with its defaults (`fsync=on`,
//!   `synchronous_commit=on`): a server of the bench's own
//!   (`surplus_tests::postgres::Server::start`), not the tests' shared one, which runs
//!   with `fsync=off`;
//! - after each side the stored rows are counted and their counter deltas summed
//!   against what was sent (exactly once), and the store is sent its first batch again,
//!   which must be recognised as duplicates.
//!
//! The PostgreSQL server comes from Debian's `postgresql` package; without it the bench
//! fails saying so.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use surplus_agent::spool::{Spool, SpoolLimits};
use surplus_controller::store::postgres::PgStore;
use surplus_controller::store::sqlite::SqliteStore;
use surplus_controller::store::{Claim, InstanceRow, NewAgent, NewJoinToken, Role, Store};
use surplus_protocol::control::{Instance, InstanceState, RunSpec};
use surplus_protocol::usage::{Reading, SpoolState, Subject, UsageRecord, meters};
use surplus_tests::postgres::Server;
use uuid::Uuid;

const RECORDS: usize = 50_000;
const BATCH: usize = 500;
/// Instances on the agent; each period has the host's records and theirs.
const INSTANCES: usize = 10;
const PERIOD_MS: i64 = 60_000;
const BASE_MS: i64 = 1_800_000_000_000;
const ACCOUNT: &str = "bench-account";
/// The host's meters per period: (meter, counter?).
const HOST_METERS: &[(&str, bool)] = &[
    (meters::HOST_CPU_BUSY_MS, true),
    (meters::HOST_CPU_TOTAL_MS, true),
    (meters::HOST_MEMORY_USED_BYTES, false),
];
/// An instance's meters per period.
const INSTANCE_METERS: &[(&str, bool)] = &[
    (meters::CPU_NS, true),
    (meters::MEMORY_BYTE_MS, true),
    (meters::DISK_READ_BYTES, true),
    (meters::DISK_WRITE_BYTES, true),
    (meters::NET_RX_BYTES, true),
    (meters::NET_TX_BYTES, true),
    (meters::STATE_MS_RUNNING, true),
    (meters::MEMORY_BYTES, false),
];
const INSERT_COLUMNS: &str = "INSERT INTO usage_records (agent_id, epoch, seq, subject, account, \
    meter, start_ms, end_ms, kind, generation, total, delta, last, peak, mean, samples, \
    received_at_ms) ";

/// One row as the store stores it (the bare side inserts these).
struct Row {
    epoch: i64,
    seq: i64,
    subject: String,
    account: Option<&'static str>,
    meter: &'static str,
    start_ms: i64,
    end_ms: i64,
    kind: &'static str,
    generation: Option<i64>,
    total: Option<i64>,
    delta: i64,
    last: Option<i64>,
    peak: Option<i64>,
    mean: Option<i64>,
    samples: i64,
}

/// What is sent, and what must be stored once it was.
struct Workload {
    instances: Vec<String>,
    records: Vec<UsageRecord>,
    rows: Vec<Row>,
    /// The controller's clock at ingest: the end of the last period.
    now_ms: i64,
    /// The counter deltas of all records.
    delta_sum: i64,
    /// Records of instances (stored with the instance's account).
    instance_records: i64,
}

/// Periods of one agent with [`INSTANCES`] instances, oldest first, until [`RECORDS`]:
/// gap-free sequence numbers, counters rising by a fixed step per period.
fn workload() -> Workload {
    let instances: Vec<String> = (1..=INSTANCES).map(|i| format!("i-{i:016x}")).collect();
    let mut w = Workload {
        instances,
        records: Vec::with_capacity(RECORDS),
        rows: Vec::with_capacity(RECORDS),
        now_ms: 0,
        delta_sum: 0,
        instance_records: 0,
    };
    let mut period = 0u64;
    'periods: loop {
        period += 1;
        let start_ms = BASE_MS + (period as i64 - 1) * PERIOD_MS;
        let end_ms = start_ms + PERIOD_MS;
        w.now_ms = end_ms;
        let subjects = std::iter::once((Subject::Host, HOST_METERS)).chain(
            w.instances
                .iter()
                .map(|id| (Subject::Instance(id.clone()), INSTANCE_METERS)),
        );
        for (subject, meter_list) in subjects {
            for (m, &(meter, counter)) in meter_list.iter().enumerate() {
                if w.records.len() == RECORDS {
                    break 'periods;
                }
                let seq = w.records.len() as u64;
                let step = 1_000 + m as u64;
                let reading = if counter {
                    Reading::Counter {
                        generation: 1,
                        total: period * step,
                    }
                } else {
                    Reading::Gauge {
                        last: 100 + period,
                        peak: 300 + period,
                        mean: 200 + period,
                    }
                };
                let instance = matches!(subject, Subject::Instance(_));
                w.instance_records += i64::from(instance);
                // A counter's first reading counts whole, every later one adds a step.
                let delta = if counter { step as i64 } else { 0 };
                w.delta_sum += delta;
                let (generation, total, last, peak, mean) = match reading {
                    Reading::Counter { generation, total } => (
                        Some(generation as i64),
                        Some(total as i64),
                        None,
                        None,
                        None,
                    ),
                    Reading::Gauge { last, peak, mean } => (
                        None,
                        None,
                        Some(last as i64),
                        Some(peak as i64),
                        Some(mean as i64),
                    ),
                };
                w.rows.push(Row {
                    epoch: 1,
                    seq: seq as i64,
                    subject: subject.as_str().to_owned(),
                    account: instance.then_some(ACCOUNT),
                    meter,
                    start_ms,
                    end_ms,
                    kind: if counter { "counter" } else { "gauge" },
                    generation,
                    total,
                    delta,
                    last,
                    peak,
                    mean,
                    samples: 1,
                });
                w.records.push(UsageRecord {
                    epoch: 1,
                    seq,
                    subject: subject.clone(),
                    meter: meter.to_owned(),
                    start_ms,
                    end_ms,
                    reading,
                    samples: 1,
                });
            }
        }
    }
    w
}

/// A database seen from the bench: to create the bare table, insert, count and compare
/// schemas.
enum Db {
    Sqlite {
        /// The one writing connection, as the store has it.
        writer: SqlitePool,
        /// Readers (and the checkpoints beside the writer).
        reader: SqlitePool,
    },
    Postgres(PgPool),
}

impl Db {
    /// The store's connection settings: WAL, `synchronous=FULL`, and a writer that
    /// never checkpoints in a commit.
    async fn sqlite(path: &Path) -> Db {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .unwrap();
        let reader = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap();
        Db::Sqlite { writer, reader }
    }

    async fn postgres(url: &str) -> Db {
        Db::Postgres(PgPool::connect(url).await.unwrap())
    }

    fn backend(&self) -> &'static str {
        match self {
            Db::Sqlite { .. } => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// Creates `usage_records` with its indexes as the controller's migrations do.
    async fn create_usage_table(&self) {
        for statement in usage_schema(self.backend()) {
            let done = match self {
                Db::Sqlite { writer, .. } => {
                    sqlx::query(&statement).execute(writer).await.map(drop)
                }
                Db::Postgres(pool) => sqlx::query(&statement).execute(pool).await.map(drop),
            };
            done.unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
    }

    /// The applied shape of `usage_records`: columns and indexes.
    async fn usage_table_shape(&self) -> Vec<String> {
        match self {
            Db::Sqlite { reader, .. } => sqlx::query_scalar::<_, Option<String>>(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'usage_records' ORDER BY name",
            )
            .fetch_all(reader)
            .await
            .unwrap()
            .into_iter()
            .map(|sql| normalise(&sql.unwrap_or_else(|| "(automatic index)".into())))
            .collect(),
            Db::Postgres(pool) => sqlx::query_scalar::<_, String>(
                "SELECT * FROM (SELECT column_name || ' ' || data_type || ' ' || is_nullable \
                 FROM information_schema.columns WHERE table_name = 'usage_records' \
                 ORDER BY ordinal_position) AS c \
                 UNION ALL SELECT * FROM (SELECT indexdef FROM pg_indexes \
                 WHERE tablename = 'usage_records' ORDER BY indexname) AS i",
            )
            .fetch_all(pool)
            .await
            .unwrap(),
        }
    }

    /// Stored rows: (count, sum of counter deltas, rows with an account).
    async fn stored(&self) -> (i64, i64, i64) {
        const Q: &str = "SELECT COUNT(*), CAST(COALESCE(SUM(delta), 0) AS BIGINT), COUNT(account) \
             FROM usage_records";
        match self {
            Db::Sqlite { reader, .. } => sqlx::query_as(Q).fetch_one(reader).await,
            Db::Postgres(pool) => sqlx::query_as(Q).fetch_one(pool).await,
        }
        .unwrap()
    }

    /// The bare side: each batch's rows in one multi-row `INSERT`, one transaction per
    /// batch (on SQLite holding the write lock from the start, as the store's do).
    async fn insert(&self, agent: &str, now_ms: i64, rows: &[Row]) {
        macro_rules! insert {
            ($db:ty, $tx:expr) => {{
                let mut tx = $tx;
                let mut q = sqlx::QueryBuilder::<$db>::new(INSERT_COLUMNS);
                q.push_values(rows, |mut b, r| {
                    b.push_bind(agent)
                        .push_bind(r.epoch)
                        .push_bind(r.seq)
                        .push_bind(&r.subject)
                        .push_bind(r.account)
                        .push_bind(r.meter)
                        .push_bind(r.start_ms)
                        .push_bind(r.end_ms)
                        .push_bind(r.kind)
                        .push_bind(r.generation)
                        .push_bind(r.total)
                        .push_bind(r.delta)
                        .push_bind(r.last)
                        .push_bind(r.peak)
                        .push_bind(r.mean)
                        .push_bind(r.samples)
                        .push_bind(now_ms);
                });
                let done = q.build().execute(&mut *tx).await.unwrap();
                assert_eq!(done.rows_affected(), rows.len() as u64);
                tx.commit().await.unwrap();
            }};
        }
        match self {
            Db::Sqlite { writer, .. } => insert!(
                sqlx::Sqlite,
                writer.begin_with("BEGIN IMMEDIATE").await.unwrap()
            ),
            Db::Postgres(pool) => insert!(sqlx::Postgres, pool.begin().await.unwrap()),
        }
    }

    /// The store's checkpoint policy for the bare side: on SQLite a passive checkpoint
    /// beside the writer every second; PostgreSQL checkpoints by itself.
    fn checkpoints(&self) -> Option<tokio::task::JoinHandle<()>> {
        let Db::Sqlite { reader, .. } = self else {
            return None;
        };
        let reader = reader.clone();
        Some(every_second(move || {
            let reader = reader.clone();
            async move {
                sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&reader)
                    .await
                    .unwrap();
            }
        }))
    }
}

/// Whitespace collapsed, comments dropped: to compare statements as written.
fn normalise(sql: &str) -> String {
    sql.lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The statements of the controller's migrations for `backend` that create or change
/// `usage_records` or its indexes, in migration order.
fn usage_schema(backend: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../controller/migrations")
        .join(backend);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut statements = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let text: String = text
            .lines()
            .map(|l| l.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for statement in text.split(';') {
            let n = normalise(statement).to_lowercase();
            let on_usage = n.contains(" on usage_records ") || n.contains(" on usage_records(");
            if n.starts_with("create table usage_records ")
                || n.starts_with("create table usage_records(")
                || n.starts_with("alter table usage_records ")
                || (n.starts_with("create ") && n.contains(" index ") && on_usage)
            {
                statements.push(statement.trim().to_owned());
            }
        }
    }
    assert!(
        statements
            .first()
            .is_some_and(|s| normalise(s).to_lowercase().starts_with("create table")),
        "no CREATE TABLE usage_records in {}",
        dir.display()
    );
    statements
}

/// Runs `f` every second until the handle is aborted.
fn every_second<F, Fut>(f: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            f().await;
        }
    })
}

/// Panics unless `db` holds exactly the rows of `w`, once each.
async fn check_exactly_once(side: &str, db: &Db, w: &Workload) {
    let (count, delta_sum, with_account) = db.stored().await;
    assert!(
        count == RECORDS as i64,
        "{side}: {count} usage rows stored for {RECORDS} records sent: every record must be \
         stored exactly once"
    );
    assert!(
        delta_sum == w.delta_sum && with_account == w.instance_records,
        "{side}: stored counter deltas sum to {delta_sum} (sent {}) and {with_account} rows \
         carry an instance's account (sent {} instance records): every record must be \
         stored exactly once, with its owner",
        w.delta_sum,
        w.instance_records
    );
}

/// `Store::ingest_usage` of the whole workload, one batch after the other, with the
/// controller's checkpoint policy; records per second.
async fn through_store(name: &str, store: Arc<dyn Store>, db: &Db, w: &Workload) -> Rates {
    // An enrolled agent hosting the instances the records name.
    let agent = Uuid::now_v7();
    store
        .create_join_token(&NewJoinToken {
            id: Uuid::now_v7(),
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
    for id in &w.instances {
        let row = InstanceRow {
            agent_id: agent,
            account: ACCOUNT.into(),
            owner_role: Role::Client,
            client_token: None,
            request_hash: "bench".into(),
            record: Instance {
                id: id.clone(),
                spec: RunSpec::default(),
                state: InstanceState::Running,
                state_reason: None,
                driver: "process".into(),
                native_id: None,
                launched_at_ms: BASE_MS,
                state_changed_at_ms: BASE_MS,
            },
            created_at_ms: BASE_MS,
            updated_at_ms: BASE_MS,
            started_at_ms: Some(BASE_MS),
            contradiction: None,
        };
        assert_eq!(
            store.claim_instance(&row, None).await.unwrap(),
            Claim::Created
        );
    }
    let spool = SpoolState {
        pending_records: BATCH as u64,
        bytes: 100 * BATCH as u64,
        merged_records: 0,
        discarded_records: 0,
    };
    // As the controller's maintenance task does.
    let checkpoints = {
        let store = store.clone();
        every_second(move || {
            let store = store.clone();
            async move { store.checkpoint().await.unwrap() }
        })
    };
    let mut timer = Timer::start();
    for chunk in w.records.chunks(BATCH) {
        let out = store
            .ingest_usage(agent, chunk, &spool, w.now_ms)
            .await
            .unwrap();
        assert!(
            out.stored as usize == chunk.len() && out.duplicates == 0 && out.rejected.is_empty(),
            "{name}: a batch of {} new records was ingested as {out:?}",
            chunk.len()
        );
        timer.batch_done();
    }
    let rates = timer.rates();
    checkpoints.abort();
    // The first batch again (its acknowledgement was lost): recognised, not stored.
    let again = store
        .ingest_usage(agent, &w.records[..BATCH], &spool, w.now_ms)
        .await
        .unwrap();
    assert!(
        again.stored == 0 && again.duplicates as usize == BATCH && again.rejected.is_empty(),
        "{name}: a batch sent again was ingested as {again:?}: it must be recognised as \
         {BATCH} duplicates"
    );
    check_exactly_once(name, db, w).await;
    rates
}

/// The bare batched insert of the same rows into the same table; records per second.
async fn bare(name: &str, db: &Db, w: &Workload) -> Rates {
    db.create_usage_table().await;
    let agent = Uuid::now_v7().to_string();
    let checkpoints = db.checkpoints();
    let mut timer = Timer::start();
    for chunk in w.rows.chunks(BATCH) {
        db.insert(&agent, w.now_ms, chunk).await;
        timer.batch_done();
    }
    let rates = timer.rates();
    if let Some(c) = checkpoints {
        c.abort();
    }
    check_exactly_once(name, db, w).await;
    rates
}

/// When each batch was done.
struct Timer {
    started: Instant,
    done: Vec<Duration>,
}

/// Records per second: over the whole run, over its first and over its last tenth of
/// batches (does ingest slow down as the table grows?).
struct Rates {
    all: f64,
    first_tenth: f64,
    last_tenth: f64,
}

impl Timer {
    fn start() -> Timer {
        Timer {
            started: Instant::now(),
            done: Vec::with_capacity(RECORDS / BATCH),
        }
    }

    fn batch_done(&mut self) {
        self.done.push(self.started.elapsed());
    }

    fn rates(&self) -> Rates {
        let n = self.done.len();
        let tenth = (n / 10).max(1);
        let rate = |from: Duration, to: Duration, batches: usize| {
            (batches * BATCH) as f64 / (to - from).as_secs_f64()
        };
        Rates {
            all: RECORDS as f64 / self.done[n - 1].as_secs_f64(),
            first_tenth: rate(Duration::ZERO, self.done[tenth - 1], tenth),
            last_tenth: rate(self.done[n - 1 - tenth], self.done[n - 1], tenth),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Before anything is measured: PostgreSQL is there, or the bench fails saying so.
    Server::check_installed();
    let w = workload();
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{RECORDS} records of one agent (host and {INSTANCES} instances; {} instance \
         records), batches of {BATCH}:",
        w.instance_records
    );

    // SQLite: the store's file and settings.
    let path = dir.path().join("ingest.db");
    let store = Arc::new(SqliteStore::open(&path).await.unwrap());
    let db = Db::sqlite(&path).await;
    let sqlite_store = through_store("SQLite, Store::ingest_usage", store, &db, &w).await;
    let bare_db = Db::sqlite(&dir.path().join("bare.db")).await;
    let sqlite_bare = bare("SQLite, bare insert", &bare_db, &w).await;
    assert_eq!(
        db.usage_table_shape().await,
        bare_db.usage_table_shape().await,
        "the bare table must have the store's shape and indexes"
    );
    report("SQLite", &sqlite_store, &sqlite_bare);

    // PostgreSQL: the same path on a durable server.
    // Durable, like the store's SQLite (PostgreSQL's defaults), unlike the tests'
    // shared server.
    let pg = Server::start(&["fsync=on", "synchronous_commit=on"]);
    let url = pg.fresh_database().await;
    let store = Arc::new(PgStore::open(&url).await.unwrap());
    let db = Db::postgres(&url).await;
    let pg_store = through_store("PostgreSQL, Store::ingest_usage", store, &db, &w).await;
    let bare_db = Db::postgres(&pg.fresh_database().await).await;
    let pg_bare = bare("PostgreSQL, bare insert", &bare_db, &w).await;
    assert_eq!(
        db.usage_table_shape().await,
        bare_db.usage_table_shape().await,
        "the bare table must have the store's shape and indexes"
    );
    report("PostgreSQL", &pg_store, &pg_bare);
    println!(
        "PostgreSQL / SQLite through the store: {:.2}",
        pg_store.all / sqlite_store.all
    );
    pg.stop();

    let (mut spool, _) = Spool::open(&dir.path().join("spool"), SpoolLimits::default()).unwrap();
    let n = 500;
    let started = Instant::now();
    for i in 0..n {
        spool.append(vec![w.records[i].clone()]).unwrap();
    }
    let per_record = started.elapsed() / n as u32;
    let started = Instant::now();
    let batches = 20;
    for b in 0..batches {
        spool
            .append(w.records[b * BATCH..(b + 1) * BATCH].to_vec())
            .unwrap();
    }
    let per_batch = started.elapsed() / batches as u32;
    println!("spool append, one record + fsync: {per_record:?} per record");
    println!(
        "spool append, {BATCH} records + one fsync: {per_batch:?} per batch ({:?} per record)",
        per_batch / BATCH as u32
    );
}

fn report(backend: &str, store: &Rates, bare: &Rates) {
    for (what, r) in [
        ("Store::ingest_usage", store),
        ("bare batched insert", bare),
    ] {
        println!(
            "  {backend:<10} {what:<19} {:>7.0} records/s (first tenth {:>7.0}, last tenth \
             {:>7.0}), stored exactly once",
            r.all, r.first_tenth, r.last_tenth
        );
    }
    println!("  {backend:<10} ratio {:.2}", store.all / bare.all);
}
