//! PostgreSQL: the schema, kept table for table and column for column the same as
//! SQLite's (`migrations/postgres` pairs with `migrations/sqlite`; a test compares the
//! two applied schemas).
//!
//! [`PgStore`] implements every capability store with the statements SQLite runs
//! (`super::sql`); this file holds what differs: the bulk statements over JSON arrays
//! (`jsonb_array_elements` where SQLite has `json_each`), row locks and advisory locks.
//! Where SQLite takes its one write lock (`BEGIN IMMEDIATE`), PostgreSQL relies on
//! conditional updates under row locks (of two enrollments with one token, the second
//! `UPDATE ... WHERE used_at_ms IS NULL` waits for the first to commit, re-reads the
//! row and matches nothing), unique indexes with `ON CONFLICT DO NOTHING` (instance
//! claims), `SELECT ... FOR UPDATE` (revocation, inventory), and transaction-scoped
//! advisory locks for the steps that read rows which may not exist yet (ledger
//! postings, billing runs, one agent's usage cursors).

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Applies the PostgreSQL migrations to the database at `url`.
///
/// A URL that is not `postgres://`, a server that cannot be reached and a schema
/// written by a newer controller (a migration this binary does not know) are errors
/// that name the problem.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    let pool = connect(url, 1).await?;
    let migrated = run_migrations(&pool, url).await;
    pool.close().await;
    migrated
}

/// A pool of at most `max` connections to `url`, whose errors name the server.
async fn connect(url: &str, max: u32) -> Result<PgPool, StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Config(format!(
            "database URL {url:?} is not a postgres:// URL"
        )));
    }
    PgPoolOptions::new()
        .max_connections(max)
        .connect(url)
        .await
        .map_err(|e| StoreError::Config(format!("cannot reach PostgreSQL at {}: {e}", redact(url))))
}

/// Applies the migrations over `pool` (a pool, not a bare connection: `Migrator::run`
/// over `&mut PgConnection` makes a future rustc cannot prove `Send` for every
/// lifetime).
async fn run_migrations(pool: &PgPool, url: &str) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Config(format!(
            "the database at {} has migration {v}, which this controller does not know: it was written by a newer version",
            redact(url)
        )),
        other => other.into(),
    })
}

/// PostgreSQL storage.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

/// Connections of the controller's pool.
const POOL_CONNECTIONS: u32 = 16;

impl PgStore {
    /// Connects to the database at `url` and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = connect(url, POOL_CONNECTIONS).await?;
        run_migrations(&pool, url).await?;
        Ok(Self { pool })
    }
}

impl PgStore {
    /// Bulk last-seen times: a JSON array of `[id, at]`.
    /// The rows are locked in id order first: two overlapping batches updating in the
    /// order the planner picks could each hold a row the other waits for (deadlock).
    const TOUCH: &str = "WITH j AS (SELECT value ->> 0 AS id, (value ->> 1)::bigint AS at \
         FROM jsonb_array_elements($1::jsonb)), \
         locked AS (SELECT agents.id FROM agents WHERE agents.id IN (SELECT id FROM j) \
         ORDER BY agents.id FOR NO KEY UPDATE) \
         UPDATE agents SET last_seen_ms = j.at FROM j, locked \
         WHERE agents.id = j.id AND agents.id = locked.id \
         AND (agents.last_seen_ms IS NULL OR agents.last_seen_ms < j.at)";
    /// Host names in the order of their bytes, as on SQLite, whatever the database's
    /// collation.
    const AGENT_HOSTNAME_ORDER: &str = "agents.hostname COLLATE \"C\"";
    /// The provider of an agent's host: its `provider` label, `house` without one.
    const AGENT_PROVIDER: &str = "COALESCE(CAST(agents.labels AS jsonb) ->> 'provider', 'house')";
    /// The agent has label `$5` with value `$6`.
    const AGENT_LABEL_IS: &str = "CAST(agents.labels AS jsonb) ->> $5 = $6";
    /// An agreement's record, read to be changed: its row locked until the end.
    const AGREEMENT_FOR_UPDATE: &str = "SELECT record FROM agreements WHERE id = $1 FOR UPDATE";
    /// Read-then-write of one agent's row: held until the transaction ends.
    const AGENT_STATUS_FOR_UPDATE: &str = "SELECT status FROM agents WHERE id = $1 FOR UPDATE";
    const AGENT_DIGEST_FOR_UPDATE: &str =
        "SELECT inventory_digest FROM agents WHERE id = $1 FOR UPDATE";
    /// Group commits at once: a commit is mostly round trips to the server, so others
    /// run meanwhile; four of the pool's [`POOL_CONNECTIONS`], the rest for everything
    /// else.
    const INGEST_LANES: usize = 4;
    /// Keys of a batch (JSON `[[epoch, seq], ...]`, between its first and last key) already
    /// stored for an agent.
    /// The range bounds keep the lookup a primary-key range scan over the batch's keys
    /// whatever the planner estimates for the JSON array: without them it may hash
    /// every stored row of the agent, and ingest slows as the agent's history grows.
    const USAGE_STORED_KEYS: &str = "SELECT epoch, seq FROM usage_records WHERE agent_id = $1 \
         AND (epoch, seq) >= ($3, $4) AND (epoch, seq) <= ($5, $6) AND (epoch, seq) IN \
         (SELECT (value ->> 0)::bigint, (value ->> 1)::bigint FROM jsonb_array_elements($2::jsonb))";
    /// Cursors of an agent's subjects (a JSON array of names).
    const USAGE_CURSORS: &str = "SELECT subject, meter, generation, total FROM usage_cursors WHERE agent_id = $1 \
         AND subject IN (SELECT jsonb_array_elements_text($2::jsonb))";
    /// Hosts and accounts of instances (a JSON array of ids).
    /// Snapshots of volumes (a JSON array of ids), oldest first.
    const SNAPSHOTS_OF: &str = "SELECT record FROM snapshots \
         WHERE volume_id IN (SELECT jsonb_array_elements_text($1::jsonb)) ORDER BY created_at_ms, id";
    const INSTANCE_OWNERS: &str = "SELECT id, agent_id, account FROM instances \
         WHERE id IN (SELECT jsonb_array_elements_text($1::jsonb))";
    /// New usage rows: a JSON array of [`super::sql::usage_row_json`] arrays.
    const INSERT_USAGE: &str = "INSERT INTO usage_records (agent_id, epoch, seq, subject, account, meter, start_ms, \
         end_ms, kind, generation, total, delta, last, peak, mean, samples, received_at_ms) \
         SELECT $1, (value ->> 0)::bigint, (value ->> 1)::bigint, value ->> 2, value ->> 3, value ->> 4, \
         (value ->> 5)::bigint, (value ->> 6)::bigint, value ->> 7, (value ->> 8)::bigint, \
         (value ->> 9)::bigint, (value ->> 10)::bigint, (value ->> 11)::bigint, \
         (value ->> 12)::bigint, (value ->> 13)::bigint, (value ->> 14)::bigint, $2 \
         FROM jsonb_array_elements($3::jsonb) ON CONFLICT DO NOTHING";
    /// Moved cursors: a JSON array of `[subject, meter, generation, total]`.
    const UPSERT_CURSORS: &str = "INSERT INTO usage_cursors (agent_id, subject, meter, generation, total) \
         SELECT $1, value ->> 0, value ->> 1, (value ->> 2)::bigint, (value ->> 3)::bigint \
         FROM jsonb_array_elements($2::jsonb) \
         ON CONFLICT (agent_id, subject, meter) DO UPDATE SET \
         generation = excluded.generation, total = excluded.total";

    fn reader(&self) -> &PgPool {
        &self.pool
    }

    fn writer(&self) -> &PgPool {
        &self.pool
    }

    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// A transaction-scoped advisory lock (released at commit or rollback), so that
    /// several controllers on one database, or concurrent requests of one, never
    /// interleave two read-decide-write steps of one kind. The first key names the
    /// kind; usage locks one agent at a time.
    async fn lock(conn: &mut sqlx::PgConnection, what: Lock<'_>) -> Result<(), sqlx::Error> {
        let query = match what {
            Lock::Ledger => sqlx::query("SELECT pg_advisory_xact_lock(7171, 0)"),
            Lock::Billing => sqlx::query("SELECT pg_advisory_xact_lock(7172, 0)"),
            Lock::Usage(agent) => {
                sqlx::query("SELECT pg_advisory_xact_lock(7173, hashtext($1))").bind(agent)
            }
            Lock::Listing(listing) => {
                sqlx::query("SELECT pg_advisory_xact_lock(7174, hashtext($1))").bind(listing)
            }
            Lock::Pool(pool) => {
                sqlx::query("SELECT pg_advisory_xact_lock(7175, hashtext($1))").bind(pool)
            }
        };
        query.execute(conn).await?;
        Ok(())
    }

    /// PostgreSQL checkpoints by itself.
    async fn checkpoint_now(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

super::sql::sql_stores!(
    PgStore,
    sqlx::Postgres,
    sqlx::postgres::PgRow,
    sqlx::PgConnection
);
super::pools_sql::pool_sql!(PgStore, sqlx::postgres::PgRow);
super::federation_sql::federation_sql!(PgStore, sqlx::postgres::PgRow);

/// `url` without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u@h:5/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[tokio::test]
    async fn a_url_of_another_database_is_refused_by_name() {
        let err = migrate("mysql://h/db").await.unwrap_err().to_string();
        assert!(err.contains("not a postgres:// URL"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = migrate(&format!("postgres://u:pw@127.0.0.1:{port}/db"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot reach PostgreSQL at postgres://u@127.0.0.1"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }
}
