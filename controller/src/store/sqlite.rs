//! The embedded default backend: SQLite in WAL mode with `synchronous=FULL`.
//!
//! Every transaction that writes starts with `BEGIN IMMEDIATE` ([`SqliteStore::write_tx`]):
//! a deferred transaction that reads first cannot upgrade to a write once another
//! connection has committed, and SQLite refuses it at once with `SQLITE_BUSY` instead
//! of waiting. Taking the write lock up front makes it wait (`busy_timeout`) instead.

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
    pool: SqlitePool,
}

fn parse_uuid(s: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("id {s:?}: {e}")))
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn instance_from_row(row: &SqliteRow) -> Result<InstanceRow, StoreError> {
    Ok(InstanceRow {
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        account: row.try_get("account")?,
        client_token: row.try_get("client_token")?,
        request_hash: row.try_get("request_hash")?,
        record: parse_json(row.try_get("record")?, "instance record")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn volume_from_row(row: &SqliteRow) -> Result<VolumeRow, StoreError> {
    Ok(VolumeRow {
        agent_id: parse_uuid(row.try_get("agent_id")?)?,
        account: row.try_get("account")?,
        record: parse_json(row.try_get("record")?, "volume record")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

fn agent_from_row(row: &SqliteRow) -> Result<AgentRecord, StoreError> {
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

fn session_from_row(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
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
const SET_STATUS: &str = "UPDATE agents SET
    online_total_ms = online_total_ms + CASE WHEN online_since_ms IS NOT NULL AND $1 <> 'online' THEN $2 - online_since_ms ELSE 0 END,
    online_since_ms = CASE WHEN $1 = 'online' THEN COALESCE(online_since_ms, $2) ELSE NULL END,
    first_seen_ms = CASE WHEN $1 = 'online' THEN COALESCE(first_seen_ms, $2) ELSE first_seen_ms END,
    last_seen_ms = $2,
    status = $1
  WHERE id = $3 AND status <> 'revoked'";

impl SqliteStore {
    /// A transaction holding the write lock from its first statement.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_join_token(&self, t: &NewJoinToken) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO join_tokens (id, secret_hash, labels, created_at_ms, expires_at_ms, created_by) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(t.id.to_string())
            .bind(&t.secret_hash)
            .bind(serde_json::to_string(&t.labels).expect("labels serialize"))
            .bind(t.created_at_ms)
            .bind(t.expires_at_ms)
            .bind(&t.created_by)
            .execute(&self.pool)
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
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn touch(&self, seen: &[(Uuid, UnixMillis)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.write_tx().await?;
        for (id, at) in seen {
            sqlx::query("UPDATE agents SET last_seen_ms = $1 WHERE id = $2 AND (last_seen_ms IS NULL OR last_seen_ms < $1)")
                .bind(at)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn session_started(&self, s: &SessionRecord) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query("INSERT INTO sessions (id, agent_id, remote_addr, agent_version, started_at_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(s.id.to_string())
            .bind(s.agent_id.to_string())
            .bind(&s.remote_addr)
            .bind(&s.agent_version)
            .bind(s.started_at_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE agents SET agent_version = $1 WHERE id = $2")
            .bind(&s.agent_version)
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
            .execute(&self.pool)
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

    async fn create_validation_run(&self, run: &ValidationRun) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO validation_runs (id, agent_id, requested_by, requested_at_ms, request, status) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(run.id.to_string())
            .bind(run.agent_id.to_string())
            .bind(&run.requested_by)
            .bind(run.requested_at_ms)
            .bind(run.request.to_string())
            .bind(run.status.as_str())
            .execute(&self.pool)
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
        .execute(&self.pool)
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
            .execute(&self.pool)
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

    async fn claim_instance(&self, row: &InstanceRow) -> Result<Claim, StoreError> {
        let mut tx = self.write_tx().await?;
        if let Some(token) = &row.client_token {
            let existing =
                sqlx::query("SELECT * FROM instances WHERE account = $1 AND client_token = $2")
                    .bind(&row.account)
                    .bind(token)
                    .fetch_optional(&mut *tx)
                    .await?;
            if let Some(existing) = existing {
                return Ok(Claim::Existing(Box::new(instance_from_row(&existing)?)));
            }
        }
        sqlx::query("INSERT INTO instances (id, agent_id, account, client_token, request_hash, state, record, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(&row.record.id)
            .bind(row.agent_id.to_string())
            .bind(&row.account)
            .bind(&row.client_token)
            .bind(&row.request_hash)
            .bind(row.record.state.as_str())
            .bind(json_text(&row.record))
            .bind(row.created_at_ms)
            .bind(row.updated_at_ms)
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

    async fn instances(&self, account: Option<&str>) -> Result<Vec<InstanceRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM instances WHERE $1 IS NULL OR account = $1 ORDER BY created_at_ms, id",
        )
        .bind(account)
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

    async fn update_instances(
        &self,
        records: &[surplus_protocol::control::Instance],
        now_ms: UnixMillis,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        for r in records {
            sqlx::query(
                "UPDATE instances SET state = $1, record = $2, updated_at_ms = $3 WHERE id = $4",
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
        sqlx::query("INSERT INTO volumes (id, agent_id, account, state, record, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record, updated_at_ms = excluded.updated_at_ms")
            .bind(&row.record.id)
            .bind(row.agent_id.to_string())
            .bind(&row.account)
            .bind(row.record.state.as_str())
            .bind(json_text(&row.record))
            .bind(row.record.created_at_ms)
            .bind(row.updated_at_ms)
            .execute(&self.pool)
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

    async fn volumes(&self, account: Option<&str>) -> Result<Vec<VolumeRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM volumes WHERE $1 IS NULL OR account = $1 ORDER BY created_at_ms, id",
        )
        .bind(account)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(volume_from_row)
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
            .execute(&self.pool)
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
