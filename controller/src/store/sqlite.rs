//! The embedded default backend: SQLite in WAL mode with `synchronous=FULL`.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE` ([`SqliteStore::write_tx`]):
//! a deferred transaction that reads first cannot upgrade to a write once another
//! connection has committed, and SQLite refuses it at once with `SQLITE_BUSY` instead
//! of waiting. Taking the write lock up front makes it wait (`busy_timeout`) instead.
//! Writes of this process go through one connection of their own, so they queue in
//! the process rather than in SQLite's busy handler; `busy_timeout` is left for other
//! processes (the `surplus-controller` admin commands).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// SQLite storage.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Readers: WAL lets them run beside the writer.
    pool: SqlitePool,
    /// The one connection that writes. SQLite has one writer at a time anyway; queueing
    /// for it here (a fair async queue) instead of in SQLite's busy handler (which
    /// sleeps and retries with growing pauses) keeps write latency flat under load, and
    /// writers waiting for the lock no longer hold reader connections.
    writer: SqlitePool,
}

impl SqliteStore {
    /// Bulk last-seen times: a JSON array of `[id, at]`.
    const TOUCH: &str = "UPDATE agents SET last_seen_ms = j.at \
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS at FROM json_each($1)) AS j \
         WHERE agents.id = j.id AND (agents.last_seen_ms IS NULL OR agents.last_seen_ms < j.at)";
    /// Host names in the order of their bytes (SQLite's default).
    const AGENT_HOSTNAME_ORDER: &str = "agents.hostname";
    /// The provider of an agent's host: its `provider` label, `house` without one.
    const AGENT_PROVIDER: &str = "COALESCE(json_extract(agents.labels, '$.provider'), 'house')";
    /// The agent has label `$5` with value `$6` (any key: no JSON path is built from it).
    const AGENT_LABEL_IS: &str = "EXISTS (SELECT 1 FROM json_each(agents.labels) \
         WHERE json_each.key = $5 AND json_each.value = $6)";
    /// An agreement's record, read to be changed.
    const AGREEMENT_FOR_UPDATE: &str = "SELECT record FROM agreements WHERE id = $1";
    /// The write transaction already excludes other writers: no row locks needed.
    const AGENT_STATUS_FOR_UPDATE: &str = "SELECT status FROM agents WHERE id = $1";
    const AGENT_DIGEST_FOR_UPDATE: &str = "SELECT inventory_digest FROM agents WHERE id = $1";
    /// One writer connection: a second group commit would only wait for it.
    const INGEST_LANES: usize = 1;
    /// Keys of a batch (JSON `[[epoch, seq], ...]`, between its first and last key) already
    /// stored for an agent.
    const USAGE_STORED_KEYS: &str = "SELECT epoch, seq FROM usage_records WHERE agent_id = $1 \
         AND (epoch, seq) >= ($3, $4) AND (epoch, seq) <= ($5, $6) AND (epoch, seq) IN \
         (SELECT value ->> 0, value ->> 1 FROM json_each($2))";
    /// Cursors of an agent's subjects (a JSON array of names).
    const USAGE_CURSORS: &str = "SELECT subject, meter, generation, total FROM usage_cursors WHERE agent_id = $1 \
         AND subject IN (SELECT value FROM json_each($2))";
    /// Snapshots of volumes (a JSON array of ids), oldest first.
    const SNAPSHOTS_OF: &str = "SELECT record FROM snapshots \
         WHERE volume_id IN (SELECT value FROM json_each($1)) ORDER BY created_at_ms, id";
    /// Hosts and accounts of instances (a JSON array of ids).
    const INSTANCE_OWNERS: &str =
        "SELECT id, agent_id, account FROM instances WHERE id IN (SELECT value FROM json_each($1))";
    /// New usage rows: a JSON array of [`super::sql::usage_row_json`] arrays.
    const INSERT_USAGE: &str = "INSERT INTO usage_records (agent_id, epoch, seq, subject, account, meter, start_ms, \
         end_ms, kind, generation, total, delta, last, peak, mean, samples, received_at_ms) \
         SELECT $1, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
         value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, \
         value ->> 11, value ->> 12, value ->> 13, value ->> 14, $2 FROM json_each($3) \
         WHERE true ON CONFLICT DO NOTHING";
    /// Moved cursors: a JSON array of `[subject, meter, generation, total]`.
    const UPSERT_CURSORS: &str = "INSERT INTO usage_cursors (agent_id, subject, meter, generation, total) \
         SELECT $1, value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($2) \
         WHERE true ON CONFLICT (agent_id, subject, meter) DO UPDATE SET \
         generation = excluded.generation, total = excluded.total";

    fn reader(&self) -> &SqlitePool {
        &self.pool
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    /// A transaction holding the write lock from its first statement.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// Nothing to take: a write transaction (`BEGIN IMMEDIATE`) excludes every other
    /// writer of the database already.
    async fn lock(_conn: &mut sqlx::SqliteConnection, _what: Lock<'_>) -> Result<(), sqlx::Error> {
        Ok(())
    }

    /// Moves committed writes from the write-ahead log into the database without
    /// blocking writers.
    async fn checkpoint_now(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        // Commits do not checkpoint (a checkpoint's writes and fsync would stall the one
        // writer and every write queued behind it); `checkpoint` runs them beside it.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        MIGRATOR.run(&writer).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        Ok(Self { pool, writer })
    }
}

super::sql::sql_stores!(SqliteStore, sqlx::Sqlite, SqliteRow, sqlx::SqliteConnection);
super::pools_sql::pool_sql!(SqliteStore, SqliteRow);
super::federation_sql::federation_sql!(SqliteStore, SqliteRow);
