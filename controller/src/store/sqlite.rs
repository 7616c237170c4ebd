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

pub(super) fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id {s:?}: {e}")))
}

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    s: &str,
    what: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn instance_from_row(row: &SqliteRow) -> Result<InstanceRow, StoreError> {
    Ok(InstanceRow {
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        account: row.try_get("account")?,
        owner_role: Role::parse(row.try_get("owner_role")?)?,
        client_token: row.try_get("client_token")?,
        request_hash: row.try_get("request_hash")?,
        record: parse_json(row.try_get("record")?, "instance record")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        contradiction: row.try_get("contradiction")?,
    })
}

fn volume_from_row(row: &SqliteRow) -> Result<VolumeRow, StoreError> {
    Ok(VolumeRow {
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        account: row.try_get("account")?,
        owner_role: Role::parse(row.try_get("owner_role")?)?,
        record: parse_json(row.try_get("record")?, "volume record")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

pub(super) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

/// Generic over the backend's row type: PostgreSQL reads the same columns.
pub(super) fn agent_from_row<R>(row: &R) -> Result<AgentRecord, StoreError>
where
    R: Row,
    for<'r> &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    let inventory: Option<String> = row.try_get("inventory")?;
    Ok(AgentRecord {
        id: parse_uuid(row.try_get("id")?)?,
        hostname: row.try_get("hostname")?,
        labels: parse_json(row.try_get("labels")?, "labels")?,
        status: AgentStatus::parse(row.try_get("status")?)?,
        cert_serial: row.try_get("cert_serial")?,
        cert_not_after_ms: row.try_get("cert_not_after_ms")?,
        agent_version: row.try_get("agent_version")?,
        enrolled_at_ms: row.try_get("enrolled_at_ms")?,
        first_seen_ms: row.try_get("first_seen_ms")?,
        last_seen_ms: row.try_get("last_seen_ms")?,
        online_since_ms: row.try_get("online_since_ms")?,
        online_total_ms: row.try_get("online_total_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
        inventory: inventory
            .as_deref()
            .map(|s| parse_json(s, "inventory"))
            .transpose()?,
        inventory_digest: row.try_get("inventory_digest")?,
        inventory_updated_ms: row.try_get("inventory_updated_ms")?,
        isolation: row
            .try_get::<Option<String>, _>("isolation")?
            .as_deref()
            .map(|s| parse_json(s, "isolation"))
            .transpose()?,
    })
}

fn run_from_row(row: &SqliteRow) -> Result<ValidationRun, StoreError> {
    let json = |col: &str| -> Result<Option<serde_json::Value>, StoreError> {
        let text: Option<String> = row.try_get(col)?;
        text.as_deref().map(|t| parse_json(t, col)).transpose()
    };
    Ok(ValidationRun {
        id: parse_uuid(row.try_get("id")?)?,
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        requested_by: row.try_get("requested_by")?,
        requested_at_ms: row.try_get("requested_at_ms")?,
        request: json("request")?.unwrap_or_default(),
        status: RunStatus::parse(row.try_get("status")?)?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        agent_version: row.try_get("agent_version")?,
        bench: json("bench")?,
        security: json("security")?,
        error: row.try_get("error")?,
    })
}

/// Generic over the backend's row type: PostgreSQL reads the same columns.
pub(super) fn session_from_row<R>(row: &R) -> Result<SessionRecord, StoreError>
where
    R: Row,
    for<'r> &'r str: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    Ok(SessionRecord {
        id: parse_uuid(row.try_get("id")?)?,
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        remote_addr: row.try_get("remote_addr")?,
        agent_version: row.try_get("agent_version")?,
        started_at_ms: row.try_get("started_at_ms")?,
        ended_at_ms: row.try_get("ended_at_ms")?,
        end_reason: row.try_get("end_reason")?,
    })
}

/// Status update with online-time accounting; one statement, so it is atomic.
pub(super) const SET_STATUS: &str = "UPDATE agents SET
    online_total_ms = online_total_ms + CASE WHEN online_since_ms IS NOT NULL AND $1 <> 'online' THEN $2 - online_since_ms ELSE 0 END,
    online_since_ms = CASE WHEN $1 = 'online' THEN COALESCE(online_since_ms, $2) ELSE NULL END,
    first_seen_ms = CASE WHEN $1 = 'online' THEN COALESCE(first_seen_ms, $2) ELSE first_seen_ms END,
    last_seen_ms = $2,
    status = $1
  WHERE id = $3 AND status <> 'revoked'";

/// Sets an agent's metering periods and/or spool state; a NULL keeps the stored one.
const UPSERT_METERING: &str = "INSERT INTO metering (agent_id, periods, spool, updated_at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id) DO UPDATE SET periods = COALESCE(excluded.periods, metering.periods), spool = COALESCE(excluded.spool, metering.spool), updated_at_ms = excluded.updated_at_ms";

impl SqliteStore {
    /// A transaction holding the write lock from its first statement.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
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

#[async_trait]
impl RegistryStore for SqliteStore {
    async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_join_token(&self, t: &NewJoinToken) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO join_tokens (id, secret_hash, labels, created_at_ms, expires_at_ms, created_by) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(t.id.to_string())
            .bind(&t.secret_hash)
            .bind(serde_json::to_string(&t.labels).expect("labels serialize"))
            .bind(t.created_at_ms)
            .bind(t.expires_at_ms)
            .bind(&t.created_by)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn enroll_agent(
        &self,
        secret_hash: &str,
        now_ms: UnixMillis,
        a: &NewAgent,
    ) -> Result<EnrollOutcome, StoreError> {
        let mut tx = self.write_tx().await?;
        // The conditional update is the atomic consumption: only one transaction can
        // move used_at_ms from NULL.
        let consumed = sqlx::query(
            "UPDATE join_tokens SET used_at_ms = $1, used_by_agent = $2
             WHERE secret_hash = $3 AND used_at_ms IS NULL AND expires_at_ms > $1
             RETURNING id, labels",
        )
        .bind(now_ms)
        .bind(a.id.to_string())
        .bind(secret_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = consumed else {
            let state = sqlx::query(
                "SELECT used_at_ms, expires_at_ms FROM join_tokens WHERE secret_hash = $1",
            )
            .bind(secret_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let refusal = match state {
                None => TokenRefusal::Unknown,
                Some(r) if r.try_get::<Option<i64>, _>("used_at_ms")?.is_some() => {
                    TokenRefusal::Used
                }
                Some(_) => TokenRefusal::Expired,
            };
            return Ok(EnrollOutcome::Refused(refusal));
        };
        let token_id: String = row.try_get("id")?;
        let labels_text: String = row.try_get("labels")?;
        let labels: Labels = parse_json(&labels_text, "labels")?;
        sqlx::query(
            "INSERT INTO agents (id, hostname, labels, status, cert_serial, cert_not_after_ms, agent_version, enrolled_at_ms, join_token_id)
             VALUES ($1, $2, $3, 'enrolled', $4, $5, $6, $7, $8)",
        )
        .bind(a.id.to_string())
        .bind(&a.hostname)
        .bind(&labels_text)
        .bind(&a.cert_serial)
        .bind(a.cert_not_after_ms)
        .bind(&a.agent_version)
        .bind(now_ms)
        .bind(token_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO certificates (serial, agent_id, issued_at_ms, not_after_ms) VALUES ($1, $2, $3, $4)")
            .bind(&a.cert_serial)
            .bind(a.id.to_string())
            .bind(a.cert_issued_at_ms)
            .bind(a.cert_not_after_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(EnrollOutcome::Registered(labels))
    }

    async fn record_certificate(
        &self,
        agent_id: Uuid,
        serial: &str,
        issued_at_ms: UnixMillis,
        not_after_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let updated =
            sqlx::query("UPDATE agents SET cert_serial = $1, cert_not_after_ms = $2 WHERE id = $3")
                .bind(serial)
                .bind(not_after_ms)
                .bind(agent_id.to_string())
                .execute(&mut *tx)
                .await?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("agent {agent_id}")));
        }
        sqlx::query("INSERT INTO certificates (serial, agent_id, issued_at_ms, not_after_ms) VALUES ($1, $2, $3, $4)")
            .bind(serial)
            .bind(agent_id.to_string())
            .bind(issued_at_ms)
            .bind(not_after_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn agent(&self, id: Uuid) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query("SELECT * FROM agents ORDER BY enrolled_at_ms, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(agent_from_row)
            .collect()
    }

    async fn revoke_agent(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM agents WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        match status.as_deref() {
            None => return Err(StoreError::NotFound(format!("agent {id}"))),
            Some("revoked") => return Ok(false),
            Some(_) => {}
        }
        sqlx::query(SET_STATUS)
            .bind("revoked")
            .bind(now_ms)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET revoked_at_ms = $1 WHERE id = $2")
            .bind(now_ms)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn agent_status_counts(&self) -> Result<Vec<(AgentStatus, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, COUNT(*) FROM agents GROUP BY status ORDER BY status")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(s, n)| Ok((AgentStatus::parse(&s)?, n)))
            .collect()
    }

    async fn revoked_agents(&self) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM agents WHERE status = 'revoked'")
            .fetch_all(&self.pool)
            .await?;
        ids.iter().map(|s| parse_uuid(s)).collect()
    }

    async fn set_status(
        &self,
        id: Uuid,
        status: AgentStatus,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query(SET_STATUS)
            .bind(status.as_str())
            .bind(now_ms)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn touch(&self, seen: &[(Uuid, UnixMillis)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        // One statement for the whole list (a thousand agents a second at 10,000
        // agents): per-statement overhead, not the update itself, was the cost.
        let list: Vec<(String, UnixMillis)> =
            seen.iter().map(|(id, at)| (id.to_string(), *at)).collect();
        sqlx::query(
            "UPDATE agents SET last_seen_ms = j.at \
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS at FROM json_each($1)) AS j \
             WHERE agents.id = j.id AND (agents.last_seen_ms IS NULL OR agents.last_seen_ms < j.at)",
        )
        .bind(json_text(&list))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn session_started(
        &self,
        s: &SessionRecord,
        isolation: Option<&surplus_protocol::control::Isolation>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO sessions (id, agent_id, remote_addr, agent_version, started_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(s.id.to_string())
            .bind(s.agent_id.to_string())
            .bind(&s.remote_addr)
            .bind(&s.agent_version)
            .bind(s.started_at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET agent_version = $1, isolation = $2 WHERE id = $3")
            .bind(&s.agent_version)
            .bind(isolation.map(json_text))
            .bind(s.agent_id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn session_ended(
        &self,
        id: Uuid,
        now_ms: UnixMillis,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET ended_at_ms = $1, end_reason = $2 WHERE id = $3 AND ended_at_ms IS NULL")
            .bind(now_ms)
            .bind(reason)
            .bind(id.to_string())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn sessions(&self, agent_id: Uuid, limit: u32) -> Result<Vec<SessionRecord>, StoreError> {
        sqlx::query("SELECT * FROM sessions WHERE agent_id = $1 ORDER BY started_at_ms DESC, id DESC LIMIT $2")
            .bind(agent_id.to_string())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(session_from_row)
            .collect()
    }

    async fn close_dangling(&self, now_ms: UnixMillis) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("UPDATE sessions SET ended_at_ms = $1, end_reason = 'controller stopped' WHERE ended_at_ms IS NULL")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE validation_runs SET status = 'failed', finished_at_ms = $1, error = 'the controller stopped during the run' WHERE status = 'running'")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        // Online periods end at the last moment the agent was seen, not now.
        sqlx::query(
            "UPDATE agents SET
                online_total_ms = online_total_ms + MAX(0, COALESCE(last_seen_ms, online_since_ms) - online_since_ms),
                online_since_ms = NULL,
                status = 'unreachable'
             WHERE status = 'online'",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn save_inventory(
        &self,
        agent_id: Uuid,
        inventory: &serde_json::Value,
        digest: &str,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let current: Option<Option<String>> =
            sqlx::query_scalar("SELECT inventory_digest FROM agents WHERE id = $1")
                .bind(agent_id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let Some(current) = current else {
            return Err(StoreError::NotFound(format!("agent {agent_id}")));
        };
        let text = inventory.to_string();
        let changed = current.as_deref() != Some(digest);
        sqlx::query("UPDATE agents SET inventory = $1, inventory_digest = $2, inventory_updated_ms = $3 WHERE id = $4")
            .bind(&text)
            .bind(digest)
            .bind(now_ms)
            .bind(agent_id.to_string())
            .execute(&mut *tx)
            .await?;
        if changed {
            sqlx::query("INSERT INTO inventory_history (id, agent_id, recorded_at_ms, digest, inventory) VALUES ($1, $2, $3, $4, $5)")
                .bind(Uuid::now_v7().to_string())
                .bind(agent_id.to_string())
                .bind(now_ms)
                .bind(digest)
                .bind(&text)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn inventory_history(
        &self,
        agent_id: Uuid,
        limit: u32,
    ) -> Result<Vec<InventoryChange>, StoreError> {
        sqlx::query("SELECT recorded_at_ms, digest, inventory FROM inventory_history WHERE agent_id = $1 ORDER BY recorded_at_ms DESC, id DESC LIMIT $2")
            .bind(agent_id.to_string())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok(InventoryChange {
                    recorded_at_ms: row.try_get("recorded_at_ms")?,
                    digest: row.try_get("digest")?,
                    inventory: parse_json(row.try_get("inventory")?, "inventory")?,
                })
            })
            .collect()
    }

    async fn create_api_token(
        &self,
        token_hash: &str,
        p: &Principal,
        label: &str,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO api_tokens (id, token_hash, account, role, label, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(Uuid::now_v7().to_string())
            .bind(token_hash)
            .bind(&p.account)
            .bind(p.role.as_str())
            .bind(label)
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn api_principal(&self, token_hash: &str) -> Result<Option<Principal>, StoreError> {
        let row = sqlx::query(
            "SELECT account, role FROM api_tokens WHERE token_hash = $1 AND revoked_at_ms IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Principal {
                account: r.try_get("account")?,
                role: Role::parse(r.try_get("role")?)?,
            })
        })
        .transpose()
    }
}

#[async_trait]
impl ValidationStore for SqliteStore {
    async fn create_validation_run(&self, run: &ValidationRun) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO validation_runs (id, agent_id, requested_by, requested_at_ms, request, status) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(run.id.to_string())
            .bind(run.agent_id.to_string())
            .bind(&run.requested_by)
            .bind(run.requested_at_ms)
            .bind(run.request.to_string())
            .bind(run.status.as_str())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn finish_validation_run(&self, run: &ValidationRun) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE validation_runs SET status = $1, finished_at_ms = $2, agent_version = $3, bench = $4, security = $5, error = $6
             WHERE id = $7 AND status = 'running'",
        )
        .bind(run.status.as_str())
        .bind(run.finished_at_ms)
        .bind(&run.agent_version)
        .bind(run.bench.as_ref().map(|v| v.to_string()))
        .bind(run.security.as_ref().map(|v| v.to_string()))
        .bind(&run.error)
        .bind(run.id.to_string())
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn validation_run(&self, id: Uuid) -> Result<Option<ValidationRun>, StoreError> {
        sqlx::query("SELECT * FROM validation_runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(run_from_row)
            .transpose()
    }

    async fn validation_runs(
        &self,
        agent_id: Uuid,
        limit: u32,
    ) -> Result<Vec<ValidationRun>, StoreError> {
        sqlx::query("SELECT * FROM validation_runs WHERE agent_id = $1 ORDER BY requested_at_ms DESC, id DESC LIMIT $2")
            .bind(agent_id.to_string())
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(run_from_row)
            .collect()
    }

    async fn save_compat_report(
        &self,
        agent_id: Uuid,
        report: &surplus_protocol::control::CompatReport,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO compat_reports (agent_id, driver, level, report, reported_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (agent_id) DO UPDATE SET driver = excluded.driver, level = excluded.level, report = excluded.report, reported_at_ms = excluded.reported_at_ms")
            .bind(agent_id.to_string())
            .bind(&report.driver)
            .bind(json_text(&report.level).trim_matches('"').to_owned())
            .bind(json_text(report))
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn compat_report(
        &self,
        agent_id: Uuid,
    ) -> Result<Option<(surplus_protocol::control::CompatReport, UnixMillis)>, StoreError> {
        let row =
            sqlx::query("SELECT report, reported_at_ms FROM compat_reports WHERE agent_id = $1")
                .bind(agent_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| {
            Ok((
                parse_json(r.try_get("report")?, "compat report")?,
                r.try_get("reported_at_ms")?,
            ))
        })
        .transpose()
    }
}

#[async_trait]
impl ControlStore for SqliteStore {
    async fn claim_instance(&self, row: &InstanceRow) -> Result<Claim, StoreError> {
        let mut tx = self.write_tx().await?;
        if let Some(token) = &row.client_token {
            let existing = sqlx::query(
                "SELECT * FROM instances WHERE owner_role = $1 AND account = $2 AND client_token = $3",
            )
            .bind(row.owner_role.as_str())
            .bind(&row.account)
            .bind(token)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(existing) = existing {
                return Ok(Claim::Existing(Box::new(instance_from_row(&existing)?)));
            }
        }
        sqlx::query("INSERT INTO instances (id, agent_id, account, owner_role, client_token, request_hash, state, record, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(&row.record.id)
            .bind(row.agent_id.to_string())
            .bind(&row.account)
            .bind(row.owner_role.as_str())
            .bind(&row.client_token)
            .bind(&row.request_hash)
            .bind(row.record.state.as_str())
            .bind(json_text(&row.record))
            .bind(row.created_at_ms)
            .bind(row.updated_at_ms)
            .execute(&mut *tx)
            .await?;
        // The host's rate card at the time of the run goes with the instance, and the
        // limits asked for are the first in force.
        sqlx::query("INSERT INTO instance_price_plans (instance_id, plan, attached_at_ms) SELECT $1, plan, $2 FROM agent_price_plans WHERE agent_id = $3")
            .bind(&row.record.id)
            .bind(row.created_at_ms)
            .bind(row.agent_id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO instance_limits (instance_id, from_ms, limits) VALUES ($1, $2, $3)",
        )
        .bind(&row.record.id)
        .bind(row.created_at_ms)
        .bind(json_text(&row.record.spec.limits))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Claim::Created)
    }

    async fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        sqlx::query("SELECT * FROM instances WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(instance_from_row)
            .transpose()
    }

    async fn instance_by_token(
        &self,
        owner: &Principal,
        token: &str,
    ) -> Result<Option<InstanceRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM instances WHERE owner_role = $1 AND account = $2 AND client_token = $3",
        )
        .bind(owner.role.as_str())
        .bind(&owner.account)
        .bind(token)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(instance_from_row)
        .transpose()
    }

    async fn instances(&self, owner: Option<&Principal>) -> Result<Vec<InstanceRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM instances WHERE $1 IS NULL OR (account = $1 AND owner_role = $2) ORDER BY created_at_ms, id",
        )
        .bind(owner.map(|o| o.account.as_str()))
        .bind(owner.map(|o| o.role.as_str()))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(instance_from_row)
        .collect()
    }

    async fn agent_instances(&self, agent_id: Uuid) -> Result<Vec<InstanceRow>, StoreError> {
        sqlx::query("SELECT * FROM instances WHERE agent_id = $1 ORDER BY created_at_ms, id")
            .bind(agent_id.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(instance_from_row)
            .collect()
    }

    async fn set_contradiction(
        &self,
        instance_id: &str,
        contradiction: Option<&str>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE instances SET contradiction = $1, updated_at_ms = $2 WHERE id = $3")
            .bind(contradiction)
            .bind(now_ms)
            .bind(instance_id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn record_limits(
        &self,
        instance_id: &str,
        from_ms: UnixMillis,
        limits: &surplus_protocol::control::Limits,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO instance_limits (instance_id, from_ms, limits) VALUES ($1, $2, $3) ON CONFLICT (instance_id, from_ms) DO UPDATE SET limits = excluded.limits")
            .bind(instance_id)
            .bind(from_ms)
            .bind(json_text(limits))
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn limits_history(
        &self,
        instance_id: &str,
    ) -> Result<Vec<(UnixMillis, surplus_protocol::control::Limits)>, StoreError> {
        sqlx::query(
            "SELECT from_ms, limits FROM instance_limits WHERE instance_id = $1 ORDER BY from_ms",
        )
        .bind(instance_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.try_get("from_ms")?,
                parse_json(r.try_get("limits")?, "limits")?,
            ))
        })
        .collect()
    }

    async fn update_instances(
        &self,
        records: &[surplus_protocol::control::Instance],
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        for r in records {
            sqlx::query(
                "UPDATE instances SET state = $1, record = $2, updated_at_ms = $3, \
                 started_at_ms = CASE WHEN started_at_ms IS NULL AND $1 = 'running' THEN $3 ELSE started_at_ms END \
                 WHERE id = $4",
            )
            .bind(r.state.as_str())
            .bind(json_text(r))
            .bind(now_ms)
            .bind(&r.id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn put_volume(&self, row: &VolumeRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO volumes (id, agent_id, account, owner_role, state, record, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record, updated_at_ms = excluded.updated_at_ms")
            .bind(&row.record.id)
            .bind(row.agent_id.to_string())
            .bind(&row.account)
            .bind(row.owner_role.as_str())
            .bind(row.record.state.as_str())
            .bind(json_text(&row.record))
            .bind(row.record.created_at_ms)
            .bind(row.updated_at_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<Option<VolumeRow>, StoreError> {
        sqlx::query("SELECT * FROM volumes WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(volume_from_row)
            .transpose()
    }

    async fn volumes(&self, owner: Option<&Principal>) -> Result<Vec<VolumeRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM volumes WHERE $1 IS NULL OR (account = $1 AND owner_role = $2) ORDER BY created_at_ms, id",
        )
        .bind(owner.map(|o| o.account.as_str()))
        .bind(owner.map(|o| o.role.as_str()))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(volume_from_row)
        .collect()
    }
}

#[async_trait]
impl UsageStore for SqliteStore {
    async fn ingest_usage_batches(
        &self,
        batches: &[IngestBatch<'_>],
        now_ms: UnixMillis,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let mut tx = self.write_tx().await?;
        let mut outcomes = Vec::with_capacity(batches.len());
        for b in batches {
            outcomes.push(ingest_batch(&mut tx, b.agent_id, b.records, b.spool, now_ms).await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT ((end_ms - 1) / $1) * $1 AS bucket, agent_id, subject, meter, kind, \
             SUM(delta) AS total, MAX(peak) AS peak, \
             CAST(SUM(mean * (end_ms - start_ms)) / NULLIF(SUM(end_ms - start_ms), 0) AS BIGINT) AS mean, \
             MAX(last) AS last, COUNT(*) AS records \
             FROM usage_records \
             WHERE end_ms > $2 AND end_ms <= $3 \
             AND ($4 IS NULL OR agent_id = $4) AND ($5 IS NULL OR subject = $5) \
             AND ($6 IS NULL OR account = $6) AND ($7 IS NULL OR meter = $7) \
             AND ($8 IS NULL OR subject IN (SELECT id FROM instances WHERE owner_role = $8)) \
             GROUP BY bucket, agent_id, subject, meter, kind ORDER BY bucket, subject, meter",
        )
        .bind(q.bucket_ms.max(1))
        .bind(q.from_ms)
        .bind(q.to_ms)
        .bind(q.agent_id.map(|a| a.to_string()))
        .bind(&q.subject)
        .bind(&q.account)
        .bind(&q.meter)
        .bind(q.owner_role.map(Role::as_str))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                let counter = kind == "counter";
                let mean: Option<i64> = r.try_get("mean")?;
                let last: Option<i64> = r.try_get("last")?;
                Ok(UsageRow {
                    bucket_start_ms: r.try_get("bucket")?,
                    agent_id: parse_uuid(r.try_get("agent_id")?)?,
                    subject: r.try_get("subject")?,
                    meter: r.try_get("meter")?,
                    total: if counter { r.try_get("total")? } else { None },
                    peak: if counter { None } else { r.try_get("peak")? },
                    mean: if counter { None } else { mean.or(last) },
                    records: r.try_get("records")?,
                    kind,
                })
            })
            .collect()
    }

    async fn counter_deltas(
        &self,
        subject: &str,
        meters: &[&str],
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<CounterDelta>, StoreError> {
        let rows = sqlx::query("SELECT meter, start_ms, end_ms, delta FROM usage_records WHERE subject = $1 AND kind = 'counter' AND end_ms > $2 AND end_ms <= $3 ORDER BY end_ms, meter")
            .bind(subject)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::new();
        for r in &rows {
            let meter: String = r.try_get("meter")?;
            if meters.contains(&meter.as_str()) {
                out.push(CounterDelta {
                    meter,
                    start_ms: r.try_get("start_ms")?,
                    end_ms: r.try_get("end_ms")?,
                    delta: r.try_get("delta")?,
                });
            }
        }
        Ok(out)
    }

    async fn usage_through(&self, agent_id: Uuid) -> Result<Option<UnixMillis>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MAX(end_ms) FROM usage_records WHERE agent_id = $1")
                .bind(agent_id.to_string())
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn received_since(
        &self,
        since_ms: UnixMillis,
        until_ms: UnixMillis,
    ) -> Result<Vec<(String, UnixMillis, UnixMillis)>, StoreError> {
        let rows = sqlx::query("SELECT subject, end_ms, MAX(received_at_ms) AS received FROM usage_records WHERE received_at_ms > $1 AND end_ms <= $2 GROUP BY subject, end_ms")
            .bind(since_ms)
            .bind(until_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("subject")?,
                    r.try_get("end_ms")?,
                    r.try_get("received")?,
                ))
            })
            .collect()
    }

    async fn set_metering(
        &self,
        agent_id: Uuid,
        periods: &surplus_protocol::usage::MeteringPeriods,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query(UPSERT_METERING)
            .bind(agent_id.to_string())
            .bind(json_text(periods))
            .bind(None::<String>)
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn metering(
        &self,
        agent_id: Uuid,
    ) -> Result<
        (
            Option<surplus_protocol::usage::MeteringPeriods>,
            Option<surplus_protocol::usage::SpoolState>,
        ),
        StoreError,
    > {
        let row = sqlx::query("SELECT periods, spool FROM metering WHERE agent_id = $1")
            .bind(agent_id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok((None, None));
        };
        let periods: Option<String> = row.try_get("periods")?;
        let spool: Option<String> = row.try_get("spool")?;
        Ok((
            periods
                .map(|p| parse_json(&p, "metering periods"))
                .transpose()?,
            spool.map(|s| parse_json(&s, "spool state")).transpose()?,
        ))
    }
}

#[async_trait]
impl BillingStore for SqliteStore {
    async fn set_agent_price_plan(
        &self,
        agent_id: Uuid,
        plan: &crate::billing::PricePlan,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO agent_price_plans (agent_id, plan, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (agent_id) DO UPDATE SET plan = excluded.plan, updated_at_ms = excluded.updated_at_ms")
            .bind(agent_id.to_string())
            .bind(json_text(plan))
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn billables(&self, to_ms: UnixMillis) -> Result<Vec<Billable>, StoreError> {
        let rows = sqlx::query("SELECT i.*, p.plan, p.attached_at_ms, a.labels AS agent_labels FROM instance_price_plans p JOIN instances i ON i.id = p.instance_id JOIN agents a ON a.id = i.agent_id WHERE p.attached_at_ms < $1 ORDER BY i.account, i.id")
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let labels: Labels = parse_json(r.try_get("agent_labels")?, "labels")?;
                Ok(Billable {
                    instance: instance_from_row(r)?,
                    plan: parse_json(r.try_get("plan")?, "price plan")?,
                    attached_at_ms: r.try_get("attached_at_ms")?,
                    provider: labels
                        .get(crate::billing::PROVIDER_LABEL)
                        .cloned()
                        .unwrap_or_else(|| crate::billing::HOUSE_PROVIDER.to_owned()),
                })
            })
            .collect()
    }

    async fn agent_price_plan(
        &self,
        agent_id: Uuid,
    ) -> Result<Option<crate::billing::PricePlan>, StoreError> {
        let plan: Option<String> =
            sqlx::query_scalar("SELECT plan FROM agent_price_plans WHERE agent_id = $1")
                .bind(agent_id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        plan.map(|p| parse_json(&p, "price plan")).transpose()
    }

    async fn record_billing_run(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write_tx().await?;
        let overlapping = sqlx::query("SELECT 1 FROM billing_runs WHERE from_ms < $2 AND to_ms > $1 AND NOT (from_ms = $1 AND to_ms = $2)")
            .bind(from_ms)
            .bind(to_ms)
            .fetch_optional(&mut *tx)
            .await?;
        if overlapping.is_some() {
            return Ok(false);
        }
        sqlx::query("INSERT INTO billing_runs (from_ms, to_ms, ran_at_ms, checked_at_ms) VALUES ($1, $2, $3, $3) ON CONFLICT (from_ms, to_ms) DO UPDATE SET checked_at_ms = excluded.checked_at_ms")
            .bind(from_ms)
            .bind(to_ms)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn billed_periods(
        &self,
        since_ms: UnixMillis,
        except: (UnixMillis, UnixMillis),
    ) -> Result<Vec<BilledPeriod>, StoreError> {
        sqlx::query("SELECT from_ms, to_ms, checked_at_ms FROM billing_runs WHERE to_ms > $1 AND NOT (from_ms = $2 AND to_ms = $3) ORDER BY from_ms")
            .bind(since_ms)
            .bind(except.0)
            .bind(except.1)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let from_ms = r.try_get("from_ms")?;
                Ok(BilledPeriod {
                    from_ms,
                    to_ms: r.try_get("to_ms")?,
                    checked_at_ms: r
                        .try_get::<Option<i64>, _>("checked_at_ms")?
                        .unwrap_or(from_ms),
                })
            })
            .collect()
    }

    async fn mark_checked(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE billing_runs SET checked_at_ms = $3 WHERE from_ms = $1 AND to_ms = $2")
            .bind(from_ms)
            .bind(to_ms)
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn billed(
        &self,
        instance_id: &str,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<BTreeMap<String, (i64, f64)>, StoreError> {
        let rows = sqlx::query("SELECT meter, SUM(amount) AS amount, SUM(quantity) AS quantity FROM invoice_lines WHERE instance_id = $1 AND from_ms = $2 AND to_ms = $3 GROUP BY meter")
            .bind(instance_id)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("meter")?,
                    (r.try_get("amount")?, r.try_get("quantity")?),
                ))
            })
            .collect()
    }

    async fn invoice_lines(
        &self,
        invoice_id: Option<&str>,
        client: Option<&str>,
        provider: Option<&str>,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<InvoiceLine>, StoreError> {
        let rows = sqlx::query("SELECT * FROM invoice_lines WHERE ($1 IS NULL OR invoice_id = $1) AND ($2 IS NULL OR client = $2) AND ($3 IS NULL OR provider = $3) AND from_ms < $5 AND to_ms > $4 ORDER BY from_ms, client, provider, instance_id, meter")
            .bind(invoice_id)
            .bind(client)
            .bind(provider)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(InvoiceLine {
                    invoice_id: r.try_get("invoice_id")?,
                    client: r.try_get("client")?,
                    provider: r.try_get("provider")?,
                    from_ms: r.try_get("from_ms")?,
                    to_ms: r.try_get("to_ms")?,
                    instance_id: r.try_get("instance_id")?,
                    charge: crate::billing::Charge {
                        meter: r.try_get("meter")?,
                        quantity: r.try_get("quantity")?,
                        unit: r.try_get("unit")?,
                        rate: r.try_get("rate")?,
                        amount: r.try_get("amount")?,
                    },
                    commission: r.try_get("commission")?,
                    currency: r.try_get("currency")?,
                    posting_key: r.try_get("posting_key")?,
                    kind: r.try_get("kind")?,
                })
            })
            .collect()
    }
}

#[async_trait]
impl LedgerStore for SqliteStore {
    async fn post(
        &self,
        posting: &crate::ledger::Posting,
        lines: &[InvoiceLine],
        now_ms: UnixMillis,
    ) -> Result<crate::ledger::Applied, PostError> {
        use crate::ledger::{Applied, LedgerError, check, default_allows_negative};
        use std::collections::HashMap;
        let digest = posting.digest();
        let mut tx = self.write_tx().await?;
        let existing = sqlx::query("SELECT digest FROM ledger_postings WHERE key = $1")
            .bind(&posting.key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = existing {
            let d: String = row.try_get("digest")?;
            return if d == digest {
                Ok(Applied::Duplicate)
            } else {
                Err(LedgerError::KeyReused(posting.key.clone()).into())
            };
        }
        let mut balances: HashMap<(String, String), i64> = HashMap::new();
        let mut policies: HashMap<String, bool> = HashMap::new();
        for e in &posting.entries {
            let b = sqlx::query(
                "SELECT balance FROM ledger_balances WHERE account = $1 AND currency = $2",
            )
            .bind(&e.account)
            .bind(&e.currency)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<i64, _>("balance"))
            .transpose()?
            .unwrap_or(0);
            balances.insert((e.account.clone(), e.currency.clone()), b);
            let p = sqlx::query("SELECT allow_negative FROM ledger_accounts WHERE account = $1")
                .bind(&e.account)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get::<i64, _>("allow_negative").map(|v| v != 0))
                .transpose()?
                .unwrap_or_else(|| default_allows_negative(&e.account));
            policies.insert(e.account.clone(), p);
        }
        let new = check(
            posting,
            |a, c| {
                balances
                    .get(&(a.to_owned(), c.to_owned()))
                    .copied()
                    .unwrap_or(0)
            },
            |a| policies.get(a).copied().unwrap_or(false),
        )?;
        sqlx::query("INSERT INTO ledger_postings (key, digest, kind, memo, posted_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(&posting.key)
            .bind(&digest)
            .bind(&posting.kind)
            .bind(&posting.memo)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        for e in &posting.entries {
            sqlx::query("INSERT INTO ledger_entries (posting_key, account, currency, amount) VALUES ($1, $2, $3, $4)")
                .bind(&posting.key)
                .bind(&e.account)
                .bind(&e.currency)
                .bind(e.amount)
                .execute(&mut *tx)
                .await?;
        }
        for (account, currency, balance) in new {
            sqlx::query("INSERT INTO ledger_balances (account, currency, balance) VALUES ($1, $2, $3) ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance")
                .bind(&account)
                .bind(&currency)
                .bind(balance)
                .execute(&mut *tx)
                .await?;
        }
        for l in lines {
            sqlx::query("INSERT INTO invoice_lines (invoice_id, client, provider, from_ms, to_ms, instance_id, meter, quantity, unit, rate, amount, commission, currency, posting_key, kind) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)")
                .bind(&l.invoice_id)
                .bind(&l.client)
                .bind(&l.provider)
                .bind(l.from_ms)
                .bind(l.to_ms)
                .bind(&l.instance_id)
                .bind(&l.charge.meter)
                .bind(l.charge.quantity)
                .bind(&l.charge.unit)
                .bind(l.charge.rate)
                .bind(l.charge.amount)
                .bind(l.commission)
                .bind(&l.currency)
                .bind(&posting.key)
                .bind(&l.kind)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Applied::Posted)
    }

    async fn account_policy(&self, account: &str) -> Result<Option<bool>, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT allow_negative FROM ledger_accounts WHERE account = $1")
                .bind(account)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.map(|v| v != 0))
    }

    async fn set_account_policy(
        &self,
        account: &str,
        allow_negative: bool,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO ledger_accounts (account, allow_negative, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (account) DO UPDATE SET allow_negative = excluded.allow_negative, updated_at_ms = excluded.updated_at_ms")
            .bind(account)
            .bind(i64::from(allow_negative))
            .bind(now_ms)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn balances(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT account, currency, balance FROM ledger_balances WHERE $1 IS NULL OR account = $1 ORDER BY account, currency")
            .bind(account)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("account")?,
                    r.try_get("currency")?,
                    r.try_get("balance")?,
                ))
            })
            .collect()
    }

    async fn account_entries(
        &self,
        account: &str,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<AccountEntry>, StoreError> {
        let rows = sqlx::query("SELECT p.key, p.kind, p.memo, e.currency, e.amount, p.posted_at_ms FROM ledger_entries e JOIN ledger_postings p ON p.key = e.posting_key WHERE e.account = $1 AND p.posted_at_ms >= $2 AND p.posted_at_ms < $3 ORDER BY p.posted_at_ms, p.key")
            .bind(account)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AccountEntry {
                    key: r.try_get("key")?,
                    kind: r.try_get("kind")?,
                    memo: r.try_get("memo")?,
                    currency: r.try_get("currency")?,
                    amount: r.try_get("amount")?,
                    posted_at_ms: r.try_get("posted_at_ms")?,
                })
            })
            .collect()
    }
}

/// Stores one batch of usage records inside the caller's transaction.
///
/// A fixed number of statements per batch, not per record: the batch's stored keys
/// and its subjects' counter cursors are read with one query each, deltas are worked
/// out here, and the new rows and cursors are written with one statement each
/// (`json_each`). Under load the per-statement cost of the driver, not SQLite's work,
/// dominated ingest.
async fn ingest_batch(
    conn: &mut sqlx::SqliteConnection,
    agent_id: Uuid,
    records: &[surplus_protocol::usage::UsageRecord],
    spool: &surplus_protocol::usage::SpoolState,
    now_ms: UnixMillis,
) -> Result<IngestOutcome, StoreError> {
    use std::collections::{BTreeSet, HashMap, HashSet};
    use surplus_protocol::usage::{Reading, Subject, counter_delta, validate_record};
    let agent = agent_id.to_string();
    let mut outcome = IngestOutcome::default();
    let key_of = |r: &surplus_protocol::usage::UsageRecord| {
        (
            i64::try_from(r.epoch).unwrap_or(i64::MAX),
            i64::try_from(r.seq).unwrap_or(i64::MAX),
        )
    };

    // Keys of this batch already stored, and the cursors of its subjects.
    let keys: Vec<(i64, i64)> = records.iter().map(key_of).collect();
    let mut stored: HashSet<(i64, i64)> = HashSet::new();
    for row in sqlx::query(
        "SELECT epoch, seq FROM usage_records WHERE agent_id = $1 AND (epoch, seq) IN \
         (SELECT value ->> 0, value ->> 1 FROM json_each($2))",
    )
    .bind(&agent)
    .bind(json_text(&keys))
    .fetch_all(&mut *conn)
    .await?
    {
        stored.insert((row.try_get("epoch")?, row.try_get("seq")?));
    }
    let subjects: BTreeSet<&str> = records.iter().map(|r| r.subject.as_str()).collect();
    let mut cursors: HashMap<(String, String), (u64, u64)> = HashMap::new();
    for row in sqlx::query(
        "SELECT subject, meter, generation, total FROM usage_cursors WHERE agent_id = $1 \
         AND subject IN (SELECT value FROM json_each($2))",
    )
    .bind(&agent)
    .bind(json_text(&subjects))
    .fetch_all(&mut *conn)
    .await?
    {
        cursors.insert(
            (row.try_get("subject")?, row.try_get("meter")?),
            (
                row.try_get::<i64, _>("generation")? as u64,
                row.try_get::<i64, _>("total")? as u64,
            ),
        );
    }

    let mut owners: HashMap<String, Option<(String, String)>> = HashMap::new();
    let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for r in records {
        let key = key_of(r);
        let mut problem = validate_record(r, now_ms).err();
        let mut account = None;
        if problem.is_none()
            && let Subject::Instance(id) = &r.subject
        {
            if !owners.contains_key(id) {
                let row = sqlx::query("SELECT agent_id, account FROM instances WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *conn)
                    .await?;
                let owner = match row {
                    Some(row) => Some((row.try_get("agent_id")?, row.try_get("account")?)),
                    None => None,
                };
                owners.insert(id.clone(), owner);
            }
            match &owners[id] {
                Some((a, acc)) if *a == agent => account = Some(acc.clone()),
                Some(_) => problem = Some(format!("instance {id} is not hosted by this agent")),
                None => problem = Some(format!("instance {id} is unknown to the controller")),
            }
        }
        let values = match r.reading {
            Reading::Counter { generation, total } => {
                [Some(generation), Some(total), None, None, None]
            }
            Reading::Gauge { last, peak, mean } => [None, None, Some(last), Some(peak), Some(mean)],
        };
        let as_i64: Vec<Option<i64>> = values
            .iter()
            .map(|v| v.and_then(|v| i64::try_from(v).ok()))
            .collect();
        if problem.is_none()
            && values
                .iter()
                .zip(&as_i64)
                .any(|(v, x)| v.is_some() && x.is_none())
        {
            problem = Some("a value exceeds 2^63".into());
        }
        if let Some(reason) = problem {
            let inserted = sqlx::query("INSERT INTO usage_rejected (agent_id, epoch, seq, reason, record, received_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING")
                .bind(&agent)
                .bind(key.0)
                .bind(key.1)
                .bind(&reason)
                .bind(format!("{r:?}"))
                .bind(now_ms)
                .execute(&mut *conn)
                .await?;
            if inserted.rows_affected() == 1 {
                outcome.rejected.push((r.epoch, r.seq, reason));
            } else {
                outcome.duplicates += 1;
            }
            continue;
        }
        // Stored before, or earlier in this batch: a duplicate, which moves nothing.
        if !stored.insert(key) {
            outcome.duplicates += 1;
            continue;
        }
        let subject = r.subject.as_str().to_owned();
        let delta = match r.reading {
            Reading::Counter { generation, total } => {
                let ck = (subject.clone(), r.meter.clone());
                let delta = counter_delta(cursors.get(&ck).copied(), generation, total);
                cursors.insert(ck.clone(), (generation, total));
                touched.insert(ck);
                Some(i64::try_from(delta).unwrap_or(i64::MAX))
            }
            Reading::Gauge { .. } => None,
        };
        rows.push(serde_json::json!([
            key.0,
            key.1,
            subject,
            account,
            r.meter,
            r.start_ms,
            r.end_ms,
            if delta.is_some() { "counter" } else { "gauge" },
            as_i64[0],
            as_i64[1],
            delta.unwrap_or(0),
            as_i64[2],
            as_i64[3],
            as_i64[4],
            r.samples,
        ]));
        outcome.stored += 1;
    }
    if !rows.is_empty() {
        let inserted = sqlx::query(
            "INSERT INTO usage_records (agent_id, epoch, seq, subject, account, meter, start_ms, \
             end_ms, kind, generation, total, delta, last, peak, mean, samples, received_at_ms) \
             SELECT $1, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
             value ->> 5, value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10, \
             value ->> 11, value ->> 12, value ->> 13, value ->> 14, $2 FROM json_each($3) \
             WHERE true ON CONFLICT DO NOTHING",
        )
        .bind(&agent)
        .bind(now_ms)
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&mut *conn)
        .await?;
        // The keys were checked in this transaction, which holds the write lock.
        if inserted.rows_affected() != u64::from(outcome.stored) {
            return Err(StoreError::Corrupt(format!(
                "usage insert stored {} of {} new records",
                inserted.rows_affected(),
                outcome.stored
            )));
        }
    }
    if !touched.is_empty() {
        let list: Vec<(&str, &str, i64, i64)> = touched
            .iter()
            .map(|ck| {
                let (generation, total) = cursors[ck];
                (
                    ck.0.as_str(),
                    ck.1.as_str(),
                    generation as i64,
                    total as i64,
                )
            })
            .collect();
        sqlx::query(
            "INSERT INTO usage_cursors (agent_id, subject, meter, generation, total) \
             SELECT $1, value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($2) \
             WHERE true ON CONFLICT (agent_id, subject, meter) DO UPDATE SET \
             generation = excluded.generation, total = excluded.total",
        )
        .bind(&agent)
        .bind(json_text(&list))
        .execute(&mut *conn)
        .await?;
    }
    // The spool's state rides in the same transaction: one commit per batch.
    sqlx::query(UPSERT_METERING)
        .bind(&agent)
        .bind(None::<String>)
        .bind(json_text(spool))
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}
