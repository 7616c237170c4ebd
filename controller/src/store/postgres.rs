//! PostgreSQL: the schema, kept table for table and column for column the same as
//! SQLite's (`migrations/postgres` pairs with `migrations/sqlite`; a test compares the
//! two applied schemas).
//!
//! [`PgStore`] implements the capability stores one by one; so far the registry
//! (enrollment, sessions, inventory, API tokens). Where SQLite takes its one write lock
//! (`BEGIN IMMEDIATE`), PostgreSQL relies on conditional updates under row locks: of
//! two enrollments with one token, the second `UPDATE ... WHERE used_at_ms IS NULL`
//! waits for the first to commit, re-reads the row and matches nothing.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::sqlite::{
    SET_STATUS, agent_from_row, json_text, parse_json, parse_uuid, session_from_row,
};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Applies the PostgreSQL migrations to the database at `url`.
///
/// A URL that is not `postgres://`, a server that cannot be reached and a schema
/// written by a newer controller (a migration this binary does not know) are errors
/// that name the problem.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Config(format!(
            "database URL {url:?} is not a postgres:// URL"
        )));
    }
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(|e| {
        StoreError::Config(format!("cannot reach PostgreSQL at {}: {e}", redact(url)))
    })?;
    MIGRATOR.run(&mut conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Config(format!(
            "the database at {} has migration {v}, which this controller does not know: it was written by a newer version",
            redact(url)
        )),
        other => other.into(),
    })?;
    conn.close().await?;
    Ok(())
}

/// PostgreSQL storage.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects to the database at `url` and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        migrate(url).await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect(url)
            .await
            .map_err(|e| {
                StoreError::Config(format!("cannot reach PostgreSQL at {}: {e}", redact(url)))
            })?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl RegistryStore for PgStore {
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
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
        // One statement for the whole list (a thousand agents a second at 10,000
        // agents): per-statement overhead, not the update itself, was the cost.
        let ids: Vec<String> = seen.iter().map(|(id, _)| id.to_string()).collect();
        let at: Vec<i64> = seen.iter().map(|(_, at)| *at).collect();
        sqlx::query(
            "UPDATE agents SET last_seen_ms = j.at \
             FROM UNNEST($1::text[], $2::bigint[]) AS j(id, at) \
             WHERE agents.id = j.id AND (agents.last_seen_ms IS NULL OR agents.last_seen_ms < j.at)",
        )
        .bind(ids)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn session_started(
        &self,
        s: &SessionRecord,
        isolation: Option<&surplus_protocol::control::Isolation>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
                online_total_ms = online_total_ms + GREATEST(0, COALESCE(last_seen_ms, online_since_ms) - online_since_ms),
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
        let mut tx = self.pool.begin().await?;
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
}

/// `url` without its password.
fn redact(url: &str) -> String {
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
