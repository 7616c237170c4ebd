//! The SQL both backends run, written once.
//!
//! [`sql_stores!`] expands to the six capability stores' implementations for one
//! backend's store type. The statements are portable between SQLite and PostgreSQL
//! as written (`$n` parameters, `ON CONFLICT`, `CAST(SUM(..) AS BIGINT)` where
//! PostgreSQL's sum would be `NUMERIC`, `CASE` instead of `MAX(a, b)`/`GREATEST`);
//! what is not portable each backend supplies as an associated constant of its store
//! (the JSON table functions behind bulk statements, `FOR UPDATE`), and it supplies
//! the connection handling:
//!
//! - `fn reader(&self) -> &Pool` and `fn writer(&self) -> &Pool`;
//! - `async fn write_tx(&self) -> Result<Transaction, sqlx::Error>`: a transaction that
//!   may write (SQLite: `BEGIN IMMEDIATE` on its one writer connection);
//! - `async fn lock(conn, Lock) -> Result<(), sqlx::Error>`: serialises the
//!   read-decide-write steps named by [`Lock`] inside a transaction (PostgreSQL:
//!   transaction-scoped advisory locks; SQLite: nothing, its write transaction
//!   already excludes every other writer);
//! - `async fn checkpoint_now(&self)`;
//! - the constants `TOUCH`, `AGENT_STATUS_FOR_UPDATE`, `AGENT_DIGEST_FOR_UPDATE`,
//!   `USAGE_STORED_KEYS`, `USAGE_CURSORS`, `INSTANCE_OWNERS`, `SNAPSHOTS_OF`, `INSERT_USAGE`,
//!   `UPSERT_CURSORS`, `INGEST_LANES`.
//!
//! Decisions are not made here: the ledger's rule is `ledger::decide`, usage
//! ingest's is `usage::plan_batch`, a host's provider is `billing::provider_of`;
//! this layer reads what they need and writes what they return, in one transaction.

use uuid::Uuid;

use super::StoreError;

/// The columns of an outbox row, for `stored_notice`.
pub(super) const NOTICE_COLUMNS: &str = "SELECT key, recipient, kind, body, created_at_ms, delivered_at_ms, attempts, last_error, next_attempt_at_ms FROM outbox";

/// The columns of a resell request row, for `resell_row`.
pub(super) const RESELL_COLUMNS: &str = "SELECT id, provider, document, pipeline, version, created_at_ms, updated_at_ms FROM resell_requests";

/// A read-decide-write step that must not interleave with another of its kind.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lock<'a> {
    /// A ledger posting: its key and the balances it reads.
    Ledger,
    /// Recording a billing run: the overlap check and the insert.
    Billing,
    /// Usage ingest of one agent: its stored keys and counter cursors.
    Usage(&'a str),
    /// A change of one listing's reservations: the book read and written.
    Listing(&'a str),
    /// A change of one pool's slots or allocations.
    Pool(&'a str),
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

pub(super) fn json_text<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("records serialize")
}

/// Status update with online-time accounting; one statement, so it is atomic.
pub(super) const SET_STATUS: &str = "UPDATE agents SET
    online_total_ms = online_total_ms + CASE WHEN online_since_ms IS NOT NULL AND $1 <> 'online' THEN $2 - online_since_ms ELSE 0 END,
    online_since_ms = CASE WHEN $1 = 'online' THEN COALESCE(online_since_ms, $2) ELSE NULL END,
    first_seen_ms = CASE WHEN $1 = 'online' THEN COALESCE(first_seen_ms, $2) ELSE first_seen_ms END,
    last_seen_ms = $2,
    status = $1
  WHERE id = $3 AND status <> 'revoked'";

/// The instance an owner (role, account) ran with a client token.
/// Agents with the inventory facts a listing shows, without the inventories, and the
/// level of their last compatibility report (a `FROM` for [`AGENT_LISTED_FROM`]).
pub(super) const AGENT_LISTED: &str = "SELECT agents.id, hostname, labels, status, cert_serial, \
     cert_not_after_ms, agent_version, enrolled_at_ms, first_seen_ms, last_seen_ms, \
     online_since_ms, online_total_ms, revoked_at_ms, CAST(NULL AS TEXT) AS inventory, \
     inventory_digest, inventory_updated_ms, isolation, inventory_cpus, \
     inventory_memory_bytes, inventory_os, inventory_gpus, inventory_gpu, \
     compat_reports.level AS compat_level";

/// The tables [`AGENT_LISTED`] and [`AGENT_FILTER`] read.
pub(super) const AGENT_LISTED_FROM: &str =
    "FROM agents LEFT JOIN compat_reports ON compat_reports.agent_id = agents.id";

/// The conditions of an [`AgentFilter`](super::AgentFilter) over `agents` joined with
/// `compat_reports`: `$1` provider, `$2` status, `$3` hostname pattern, `$4` id
/// pattern, `$5`/`$6` label (in the backend's `AGENT_LABEL_IS`), `$7` GPU (1 with, 0
/// without), `$8` compatibility level or `none`; a NULL parameter selects all.
/// `{provider}` and `{label}` are the backend's expressions.
pub(super) const AGENT_FILTER: &str = "($1 IS NULL OR {provider} = $1) \
     AND ($2 IS NULL OR agents.status = $2) \
     AND ($3 IS NULL OR lower(agents.hostname) LIKE $3 ESCAPE '\\' OR agents.id LIKE $4 ESCAPE '\\') \
     AND ($5 IS NULL OR {label}) \
     AND ($7 IS NULL OR (COALESCE(agents.inventory_gpus, 0) > 0) = ($7 = 1)) \
     AND ($8 IS NULL OR COALESCE(compat_reports.level, 'none') = $8)";

/// `text` as a `LIKE` pattern matching itself literally (with `\` as the escape).
pub(super) fn like_literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '\\' | '%' | '_') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The `ORDER BY` of a sort (uptime measured at `now_ms`); each ends with the id.
/// `hostname` is the backend's expression that orders host names by their bytes, as
/// SQLite does (PostgreSQL would use the database's collation).
pub(super) fn agent_order(sort: super::AgentSort, now_ms: i64, hostname: &str) -> String {
    use super::AgentSort::*;
    match sort {
        Enrolled => "agents.enrolled_at_ms, agents.id".into(),
        Hostname => format!("{hostname}, agents.id"),
        Status => format!("agents.status, {hostname}, agents.id"),
        LastSeen => "agents.last_seen_ms DESC NULLS LAST, agents.id".into(),
        Cpus => format!("agents.inventory_cpus DESC NULLS LAST, {hostname}, agents.id"),
        Memory => format!("agents.inventory_memory_bytes DESC NULLS LAST, {hostname}, agents.id"),
        Gpus => format!("agents.inventory_gpus DESC NULLS LAST, {hostname}, agents.id"),
        // `registry::measured_uptime`, clamped to [0, 1] like it, so that hosts shown
        // with the same uptime are in host name order.
        Uptime => {
            let ratio = format!(
                "((agents.online_total_ms + CASE WHEN agents.online_since_ms < {now_ms} \
                 THEN {now_ms} - agents.online_since_ms ELSE 0 END) * 1.0 \
                 / (CASE WHEN agents.first_seen_ms < {now_ms} THEN {now_ms} - agents.first_seen_ms END))"
            );
            format!(
                "CASE WHEN {ratio} > 1 THEN 1.0 WHEN {ratio} < 0 THEN 0.0 ELSE {ratio} END \
                 DESC NULLS LAST, {hostname}, agents.id"
            )
        }
    }
}

pub(super) const INSTANCE_BY_TOKEN: &str =
    "SELECT * FROM instances WHERE owner_role = $1 AND account = $2 AND client_token = $3";

/// Sets an agent's metering periods and/or spool state; a NULL keeps the stored one.
pub(super) const UPSERT_METERING: &str = "INSERT INTO metering (agent_id, periods, spool, updated_at_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (agent_id) DO UPDATE SET periods = COALESCE(excluded.periods, metering.periods), spool = COALESCE(excluded.spool, metering.spool), updated_at_ms = excluded.updated_at_ms";

/// The row of one new usage record as the bulk insert reads it (a JSON array).
pub(super) fn usage_row_json(r: &surplus_market::usage::NewRow) -> serde_json::Value {
    serde_json::json!([
        r.epoch,
        r.seq,
        r.subject,
        r.account,
        r.meter,
        r.start_ms,
        r.end_ms,
        r.kind,
        r.generation,
        r.total,
        r.delta,
        r.last,
        r.peak,
        r.mean,
        r.samples,
    ])
}

/// Expands to the capability stores of `$store` over the sqlx database `$db`, whose
/// rows are `$row` and connections `$conn` (see the module's documentation).
macro_rules! sql_stores {
    ($store:ident, $db:ty, $row:ty, $conn:ty) => {
        use $crate::store::sql::{
            AGENT_FILTER, NOTICE_COLUMNS, RESELL_COLUMNS, AGENT_LISTED, AGENT_LISTED_FROM, INSTANCE_BY_TOKEN, agent_order, like_literal, Lock, SET_STATUS, UPSERT_METERING, json_text, parse_json, parse_uuid,
            usage_row_json,
        };

        fn agent_from_row(row: &$row) -> Result<AgentRecord, StoreError> {
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

        fn listed_agent_from_row(row: &$row) -> Result<ListedAgent, StoreError> {
            let count = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok());
            let compat = row
                .try_get::<Option<String>, _>("compat_level")?
                .map(|level| {
                    surplus_market::records::from_name(&level)
                        .ok_or_else(|| StoreError::Corrupt(format!("compat level {level:?}")))
                })
                .transpose()?;
            Ok(ListedAgent {
                agent: agent_from_row(row)?,
                inventory: InventoryBrief {
                    cpus: count(row.try_get("inventory_cpus")?),
                    memory_bytes: count(row.try_get("inventory_memory_bytes")?),
                    os: row.try_get("inventory_os")?,
                    gpus: count(row.try_get("inventory_gpus")?),
                    gpu: row.try_get("inventory_gpu")?,
                },
                compat,
            })
        }

        fn session_from_row(row: &$row) -> Result<SessionRecord, StoreError> {
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

        fn instance_from_row(row: &$row) -> Result<InstanceRow, StoreError> {
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

        fn volume_from_row(row: &$row) -> Result<VolumeRow, StoreError> {
            Ok(VolumeRow {
                agent_id: parse_uuid(row.try_get("agent_id")?)?,
                account: row.try_get("account")?,
                owner_role: Role::parse(row.try_get("owner_role")?)?,
                record: parse_json(row.try_get("record")?, "volume record")?,
                updated_at_ms: row.try_get("updated_at_ms")?,
            })
        }

        fn run_from_row(row: &$row) -> Result<ValidationRun, StoreError> {
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

        /// Stores one batch of usage records inside the caller's transaction, which
        /// holds the agent's usage lock.
        ///
        /// A fixed number of statements per batch, not per record: the batch's stored
        /// keys, its subjects' counter cursors and its instances' owners are read with
        /// one query each, `usage::plan_batch` decides, and the new rows and cursors
        /// are written with one statement each. Under load the per-statement cost of
        /// the driver, not the database's work, dominated ingest.
        async fn ingest_batch(
            conn: &mut $conn,
            agent_id: Uuid,
            records: &[surplus_protocol::usage::UsageRecord],
            spool: &surplus_protocol::usage::SpoolState,
            now_ms: UnixMillis,
        ) -> Result<IngestOutcome, StoreError> {
            use surplus_market::usage::{Owner, Stored, key_of, plan_batch, subjects};
            let agent = agent_id.to_string();
            let keys: Vec<(i64, i64)> = records.iter().map(key_of).collect();
            let (subjects, instances) = subjects(records);
            let mut stored = Stored::default();
            // The batch's first and last keys bound the lookup (an empty range when
            // there are none).
            let low = keys.iter().min().copied().unwrap_or((0, 0));
            let high = keys.iter().max().copied().unwrap_or((-1, -1));
            for row in sqlx::query($store::USAGE_STORED_KEYS)
                .bind(&agent)
                .bind(json_text(&keys))
                .bind(low.0)
                .bind(low.1)
                .bind(high.0)
                .bind(high.1)
                .fetch_all(&mut *conn)
                .await?
            {
                stored.keys.insert((row.try_get("epoch")?, row.try_get("seq")?));
            }
            for row in sqlx::query($store::USAGE_CURSORS)
                .bind(&agent)
                .bind(json_text(&subjects))
                .fetch_all(&mut *conn)
                .await?
            {
                stored.cursors.insert(
                    (row.try_get("subject")?, row.try_get("meter")?),
                    (
                        row.try_get::<i64, _>("generation")? as u64,
                        row.try_get::<i64, _>("total")? as u64,
                    ),
                );
            }
            if !instances.is_empty() {
                for row in sqlx::query($store::INSTANCE_OWNERS)
                    .bind(json_text(&instances))
                    .fetch_all(&mut *conn)
                    .await?
                {
                    stored.owners.insert(
                        row.try_get("id")?,
                        Owner {
                            agent_id: row.try_get("agent_id")?,
                            account: row.try_get("account")?,
                        },
                    );
                }
            }
            let plan = plan_batch(&agent, records, &stored, now_ms);
            let mut outcome = IngestOutcome {
                stored: u32::try_from(plan.rows.len()).unwrap_or(u32::MAX),
                duplicates: plan.duplicates,
                rejected: Vec::new(),
            };
            for r in &plan.rejected {
                let inserted = sqlx::query("INSERT INTO usage_rejected (agent_id, epoch, seq, reason, record, received_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING")
                    .bind(&agent)
                    .bind(i64::try_from(r.epoch).unwrap_or(i64::MAX))
                    .bind(i64::try_from(r.seq).unwrap_or(i64::MAX))
                    .bind(&r.reason)
                    .bind(&r.record)
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
                if inserted.rows_affected() == 1 {
                    outcome.rejected.push((r.epoch, r.seq, r.reason.clone()));
                } else {
                    // Refused before: the agent is sending it again.
                    outcome.duplicates += 1;
                }
            }
            if !plan.rows.is_empty() {
                let rows: Vec<serde_json::Value> = plan.rows.iter().map(usage_row_json).collect();
                let inserted = sqlx::query($store::INSERT_USAGE)
                    .bind(&agent)
                    .bind(now_ms)
                    .bind(serde_json::Value::Array(rows).to_string())
                    .execute(&mut *conn)
                    .await?;
                // The keys were read under the agent's usage lock.
                if inserted.rows_affected() != plan.rows.len() as u64 {
                    return Err(StoreError::Corrupt(format!(
                        "usage insert stored {} of {} new records",
                        inserted.rows_affected(),
                        plan.rows.len()
                    )));
                }
            }
            if !plan.cursors.is_empty() {
                let list: Vec<(&str, &str, i64, i64)> = plan
                    .cursors
                    .iter()
                    .map(|((subject, meter), (generation, total))| {
                        (subject.as_str(), meter.as_str(), *generation as i64, *total as i64)
                    })
                    .collect();
                sqlx::query($store::UPSERT_CURSORS)
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

        #[async_trait]
        impl RegistryStore for $store {
            async fn checkpoint(&self) -> Result<(), StoreError> {
                self.checkpoint_now().await
            }

            async fn create_join_token(&self, t: &NewJoinToken) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO join_tokens (id, secret_hash, labels, created_at_ms, expires_at_ms, created_by) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(t.id.to_string())
                    .bind(&t.secret_hash)
                    .bind(serde_json::to_string(&t.labels).expect("labels serialize"))
                    .bind(t.created_at_ms)
                    .bind(t.expires_at_ms)
                    .bind(&t.created_by)
                    .execute(self.writer())
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
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(agent_from_row)
                    .transpose()
            }

            async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                sqlx::query("SELECT * FROM agents ORDER BY enrolled_at_ms, id")
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(agent_from_row)
                    .collect()
            }

            async fn agent_page(
                &self,
                filter: &AgentFilter,
                now_ms: UnixMillis,
            ) -> Result<AgentPage, StoreError> {
                let conditions = AGENT_FILTER
                    .replace("{provider}", $store::AGENT_PROVIDER)
                    .replace("{label}", $store::AGENT_LABEL_IS);
                let rows = format!(
                    "{AGENT_LISTED} {AGENT_LISTED_FROM} WHERE {conditions} ORDER BY {} LIMIT $9 OFFSET $10",
                    agent_order(filter.sort, now_ms, $store::AGENT_HOSTNAME_ORDER),
                );
                let count = format!("SELECT COUNT(*) {AGENT_LISTED_FROM} WHERE {conditions}");
                // ASCII only: SQLite's `lower` folds no other letters.
                let text = filter.text.as_deref().map(str::to_ascii_lowercase);
                let (key, value) = filter.label.clone().unzip();
                let compat = filter.compat.map(|level| match level {
                    None => "none".to_owned(),
                    Some(l) => json_text(&l).trim_matches('"').to_owned(),
                });
                let limit = filter.limit.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX));
                let offset = i64::try_from(filter.offset).unwrap_or(i64::MAX);
                type Binds = (
                    Option<String>,
                    Option<&'static str>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<String>,
                    Option<i64>,
                    Option<String>,
                );
                fn bind<'q>(
                    q: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                    b: &Binds,
                ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
                    let b = b.clone();
                    q.bind(b.0).bind(b.1).bind(b.2).bind(b.3).bind(b.4).bind(b.5).bind(b.6).bind(b.7)
                }
                let binds: Binds = (
                    filter.provider.clone(),
                    filter.status.map(|s| s.as_str()),
                    text.as_ref().map(|t| format!("%{}%", like_literal(t))),
                    text.as_ref().map(|t| format!("{}%", like_literal(t))),
                    key,
                    value,
                    filter.gpu.map(i64::from),
                    compat,
                );
                let agents = bind(sqlx::query(&rows), &binds)
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(listed_agent_from_row)
                    .collect::<Result<Vec<_>, _>>()?;
                let total: i64 = bind(sqlx::query(&count), &binds)
                    .fetch_one(self.reader())
                    .await?
                    .try_get(0)?;
                let by_status: Vec<(String, i64)> = sqlx::query_as(&format!(
                    "SELECT status, COUNT(*) FROM agents WHERE $1 IS NULL OR {} = $1 \
                     GROUP BY status ORDER BY status",
                    $store::AGENT_PROVIDER
                ))
                .bind(filter.provider.as_deref())
                .fetch_all(self.reader())
                .await?;
                Ok(AgentPage {
                    agents,
                    total: u64::try_from(total).unwrap_or(0),
                    by_status: by_status
                        .into_iter()
                        .map(|(s, n)| {
                            let status = AgentStatus::parse(&s)
                                .map_err(|_| StoreError::Corrupt(format!("agent status {s:?}")))?;
                            Ok((status, u64::try_from(n).unwrap_or(0)))
                        })
                        .collect::<Result<_, StoreError>>()?,
                })
            }

            async fn revoke_agent(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError> {
                let mut tx = self.write_tx().await?;
                let status: Option<String> = sqlx::query_scalar($store::AGENT_STATUS_FOR_UPDATE)
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
                        .fetch_all(self.reader())
                        .await?;
                rows.into_iter()
                    .map(|(s, n)| Ok((AgentStatus::parse(&s)?, n)))
                    .collect()
            }

            async fn revoked_agents(&self) -> Result<Vec<Uuid>, StoreError> {
                let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM agents WHERE status = 'revoked'")
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
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
                sqlx::query($store::TOUCH)
                .bind(json_text(&list))
                .execute(self.writer())
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn sessions(&self, agent_id: Uuid, limit: u32) -> Result<Vec<SessionRecord>, StoreError> {
                sqlx::query("SELECT * FROM sessions WHERE agent_id = $1 ORDER BY started_at_ms DESC, id DESC LIMIT $2")
                    .bind(agent_id.to_string())
                    .bind(limit as i64)
                    .fetch_all(self.reader())
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
                sqlx::query("UPDATE validation_runs SET status = 'failed', finished_at_ms = $1, error = $2 WHERE status = 'running'")
                    .bind(now_ms)
                    .bind(crate::validation::CONTROLLER_STOPPED)
                    .execute(&mut *tx)
                    .await?;
                // Online periods end at the last moment the agent was seen, not now.
                sqlx::query(
                    "UPDATE agents SET
                        online_total_ms = online_total_ms + CASE WHEN COALESCE(last_seen_ms, online_since_ms) > online_since_ms THEN COALESCE(last_seen_ms, online_since_ms) - online_since_ms ELSE 0 END,
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
                    sqlx::query_scalar($store::AGENT_DIGEST_FOR_UPDATE)
                        .bind(agent_id.to_string())
                        .fetch_optional(&mut *tx)
                        .await?;
                let Some(current) = current else {
                    return Err(StoreError::NotFound(format!("agent {agent_id}")));
                };
                let text = inventory.to_string();
                let changed = current.as_deref() != Some(digest);
                // The facts a listing shows are kept beside the inventory they come from.
                let brief = InventoryBrief::of(Some(inventory));
                let count = |v: Option<u64>| v.and_then(|n| i64::try_from(n).ok());
                sqlx::query("UPDATE agents SET inventory = $1, inventory_digest = $2, inventory_updated_ms = $3, \
                     inventory_cpus = $5, inventory_memory_bytes = $6, inventory_os = $7, \
                     inventory_gpus = $8, inventory_gpu = $9 WHERE id = $4")
                    .bind(&text)
                    .bind(digest)
                    .bind(now_ms)
                    .bind(agent_id.to_string())
                    .bind(count(brief.cpus))
                    .bind(count(brief.memory_bytes))
                    .bind(&brief.os)
                    .bind(count(brief.gpus))
                    .bind(&brief.gpu)
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
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn api_principal(&self, token_hash: &str) -> Result<Option<Principal>, StoreError> {
                let row = sqlx::query(
                    "SELECT account, role FROM api_tokens WHERE token_hash = $1 AND revoked_at_ms IS NULL",
                )
                .bind(token_hash)
                .fetch_optional(self.reader())
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
        impl ValidationStore for $store {
            async fn create_validation_run(&self, run: &ValidationRun) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO validation_runs (id, agent_id, requested_by, requested_at_ms, request, status) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(run.id.to_string())
                    .bind(run.agent_id.to_string())
                    .bind(&run.requested_by)
                    .bind(run.requested_at_ms)
                    .bind(run.request.to_string())
                    .bind(run.status.as_str())
                    .execute(self.writer())
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
                .execute(self.writer())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn validation_run(&self, id: Uuid) -> Result<Option<ValidationRun>, StoreError> {
                sqlx::query("SELECT * FROM validation_runs WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
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
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
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
                        .fetch_optional(self.reader())
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
        impl ControlStore for $store {
            async fn claim_instance(
                &self,
                row: &InstanceRow,
                plan: Option<&crate::billing::PricePlan>,
            ) -> Result<Claim, StoreError> {
                let mut tx = self.write_tx().await?;
                // The unique (owner, client token) index decides: of two racing claims the
                // second inserts nothing (on PostgreSQL it waits for the first to commit),
                // then reads the winner's row.
                let inserted = sqlx::query("INSERT INTO instances (id, agent_id, account, owner_role, client_token, request_hash, state, record, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING")
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
                if inserted.rows_affected() == 0 {
                    let existing = match &row.client_token {
                        Some(token) => sqlx::query(INSTANCE_BY_TOKEN)
                        .bind(row.owner_role.as_str())
                        .bind(&row.account)
                        .bind(token)
                        .fetch_optional(&mut *tx)
                        .await?,
                        None => None,
                    };
                    return match existing {
                        Some(existing) => Ok(Claim::Existing(Box::new(instance_from_row(&existing)?))),
                        None => Err(StoreError::Corrupt(format!(
                            "instance id {} is taken",
                            row.record.id
                        ))),
                    };
                }
                if let Some(plan) = plan {
                    sqlx::query("INSERT INTO instance_price_plans (instance_id, plan, attached_at_ms) VALUES ($1, $2, $3)")
                        .bind(&row.record.id)
                        .bind(json_text(plan))
                        .bind(row.created_at_ms)
                        .execute(&mut *tx)
                        .await?;
                }
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
                    .fetch_optional(self.reader())
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
                sqlx::query(INSTANCE_BY_TOKEN)
                .bind(owner.role.as_str())
                .bind(&owner.account)
                .bind(token)
                .fetch_optional(self.reader())
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
                .fetch_all(self.reader())
                .await?
                .iter()
                .map(instance_from_row)
                .collect()
            }

            async fn agent_instances(&self, agent_id: Uuid) -> Result<Vec<InstanceRow>, StoreError> {
                sqlx::query("SELECT * FROM instances WHERE agent_id = $1 ORDER BY created_at_ms, id")
                    .bind(agent_id.to_string())
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
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
                    .execute(self.writer())
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
                .fetch_all(self.reader())
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn put_snapshot(
                &self,
                agent_id: Uuid,
                snapshot: &surplus_protocol::control::Snapshot,
            ) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO snapshots (id, volume_id, agent_id, record, created_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET record = excluded.record")
                    .bind(&snapshot.id)
                    .bind(&snapshot.volume_id)
                    .bind(agent_id.to_string())
                    .bind(json_text(snapshot))
                    .bind(snapshot.created_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn snapshots(
                &self,
                volume_ids: &[String],
            ) -> Result<Vec<surplus_protocol::control::Snapshot>, StoreError> {
                if volume_ids.is_empty() {
                    return Ok(Vec::new());
                }
                let records: Vec<String> = sqlx::query_scalar($store::SNAPSHOTS_OF)
                    .bind(json_text(&volume_ids))
                    .fetch_all(self.reader())
                    .await?;
                records.iter().map(|r| parse_json(r, "snapshot")).collect()
            }

            async fn volume(&self, id: &str) -> Result<Option<VolumeRow>, StoreError> {
                sqlx::query("SELECT * FROM volumes WHERE id = $1")
                    .bind(id)
                    .fetch_optional(self.reader())
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
                .fetch_all(self.reader())
                .await?
                .iter()
                .map(volume_from_row)
                .collect()
            }
        }

        #[async_trait]
        impl UsageStore for $store {
            fn ingest_lanes(&self) -> usize {
                $store::INGEST_LANES
            }

            async fn ingest_usage_batches(
                &self,
                batches: &[IngestBatch<'_>],
                now_ms: UnixMillis,
            ) -> Result<Vec<IngestOutcome>, StoreError> {
                let mut tx = self.write_tx().await?;
                // One agent's cursors are read and moved by one transaction at a time; the
                // locks are taken in one order, so two group commits never deadlock.
                let mut agents: Vec<String> = batches.iter().map(|b| b.agent_id.to_string()).collect();
                agents.sort();
                agents.dedup();
                for agent in &agents {
                    $store::lock(&mut tx, Lock::Usage(agent)).await?;
                }
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
                     CAST(SUM(delta) AS BIGINT) AS total, MAX(peak) AS peak, \
                     CAST(SUM(mean * (end_ms - start_ms)) AS BIGINT) / NULLIF(CAST(SUM(end_ms - start_ms) AS BIGINT), 0) AS mean, \
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
                .fetch_all(self.reader())
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
                    .fetch_all(self.reader())
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
                        .fetch_one(self.reader())
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
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
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
                    .fetch_optional(self.reader())
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
        impl BillingStore for $store {
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn billables(&self, to_ms: UnixMillis) -> Result<Vec<Billable>, StoreError> {
                let rows = sqlx::query("SELECT i.*, p.plan, p.attached_at_ms, a.labels AS agent_labels FROM instance_price_plans p JOIN instances i ON i.id = p.instance_id JOIN agents a ON a.id = i.agent_id WHERE p.attached_at_ms < $1 ORDER BY i.account, i.id")
                    .bind(to_ms)
                    .fetch_all(self.reader())
                    .await?;
                rows.iter()
                    .map(|r| {
                        let labels: Labels = parse_json(r.try_get("agent_labels")?, "labels")?;
                        Ok(Billable {
                            instance: instance_from_row(r)?,
                            plan: parse_json(r.try_get("plan")?, "price plan")?,
                            attached_at_ms: r.try_get("attached_at_ms")?,
                            provider: crate::billing::provider_of(&labels),
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
                        .fetch_optional(self.reader())
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
                $store::lock(&mut tx, Lock::Billing).await?;
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
                    .fetch_all(self.reader())
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn billed(
                &self,
                instance_id: &str,
                from_ms: UnixMillis,
                to_ms: UnixMillis,
            ) -> Result<BTreeMap<String, (i64, f64)>, StoreError> {
                let rows = sqlx::query("SELECT meter, CAST(SUM(amount) AS BIGINT) AS amount, SUM(quantity) AS quantity FROM invoice_lines WHERE instance_id = $1 AND from_ms = $2 AND to_ms = $3 GROUP BY meter")
                    .bind(instance_id)
                    .bind(from_ms)
                    .bind(to_ms)
                    .fetch_all(self.reader())
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
                    .fetch_all(self.reader())
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

        /// Applies one posting (and the invoice lines it carries) inside the caller's
        /// transaction, which holds the ledger lock: `ledger::decide` says whether it
        /// is new, a duplicate or refused.
        /// Queues notices in the outbox inside a step's transaction; a key already
        /// queued is left as it is.
        async fn queue_notices(
            conn: &mut $conn,
            notices: &[Notice],
            now_ms: UnixMillis,
        ) -> Result<(), sqlx::Error> {
            for n in notices {
                sqlx::query("INSERT INTO outbox (key, recipient, kind, body, created_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING")
                    .bind(&n.key)
                    .bind(&n.recipient)
                    .bind(&n.kind)
                    .bind(n.body.to_string())
                    .bind(now_ms)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        async fn post_in(
            conn: &mut $conn,
            posting: &crate::ledger::Posting,
            lines: &[InvoiceLine],
            now_ms: UnixMillis,
        ) -> Result<crate::ledger::Applied, PostError> {
            use crate::ledger::{Applied, Decision, decide, default_allows_negative};
            use std::collections::HashMap;
            let stored: Option<String> =
                sqlx::query_scalar("SELECT digest FROM ledger_postings WHERE key = $1")
                    .bind(&posting.key)
                    .fetch_optional(&mut *conn)
                    .await?;
            let mut balances: HashMap<(String, String), i64> = HashMap::new();
            let mut policies: HashMap<String, bool> = HashMap::new();
            if stored.is_none() {
                for e in &posting.entries {
                    let b: Option<i64> = sqlx::query_scalar(
                        "SELECT balance FROM ledger_balances WHERE account = $1 AND currency = $2",
                    )
                    .bind(&e.account)
                    .bind(&e.currency)
                    .fetch_optional(&mut *conn)
                    .await?;
                    balances.insert((e.account.clone(), e.currency.clone()), b.unwrap_or(0));
                    let p: Option<i64> =
                        sqlx::query_scalar("SELECT allow_negative FROM ledger_accounts WHERE account = $1")
                            .bind(&e.account)
                            .fetch_optional(&mut *conn)
                            .await?;
                    policies.insert(
                        e.account.clone(),
                        p.map_or_else(|| default_allows_negative(&e.account), |v| v != 0),
                    );
                }
            }
            let decision = decide(
                posting,
                stored.as_deref(),
                |a, c| {
                    balances
                        .get(&(a.to_owned(), c.to_owned()))
                        .copied()
                        .unwrap_or(0)
                },
                |a| policies.get(a).copied().unwrap_or(false),
            )?;
            let Decision::Post(new) = decision else {
                return Ok(Applied::Duplicate);
            };
            let digest = posting.digest();
            sqlx::query("INSERT INTO ledger_postings (key, digest, kind, memo, posted_at_ms) VALUES ($1, $2, $3, $4, $5)")
                .bind(&posting.key)
                .bind(&digest)
                .bind(&posting.kind)
                .bind(&posting.memo)
                .bind(now_ms)
                .execute(&mut *conn)
                .await?;
            for e in &posting.entries {
                sqlx::query("INSERT INTO ledger_entries (posting_key, account, currency, amount) VALUES ($1, $2, $3, $4)")
                    .bind(&posting.key)
                    .bind(&e.account)
                    .bind(&e.currency)
                    .bind(e.amount)
                    .execute(&mut *conn)
                    .await?;
            }
            for (account, currency, balance) in new {
                sqlx::query("INSERT INTO ledger_balances (account, currency, balance) VALUES ($1, $2, $3) ON CONFLICT (account, currency) DO UPDATE SET balance = excluded.balance")
                    .bind(&account)
                    .bind(&currency)
                    .bind(balance)
                    .execute(&mut *conn)
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
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(Applied::Posted)
        }

        #[async_trait]
        impl LedgerStore for $store {
            async fn post(
                &self,
                posting: &crate::ledger::Posting,
                lines: &[InvoiceLine],
                now_ms: UnixMillis,
            ) -> Result<crate::ledger::Applied, PostError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Ledger).await?;
                let applied = post_in(&mut tx, posting, lines, now_ms).await?;
                tx.commit().await?;
                Ok(applied)
            }

            async fn apply_changes(
                &self,
                changes: &ChangeSet,
                now_ms: UnixMillis,
            ) -> Result<Vec<crate::ledger::Applied>, PostError> {
                let mut tx = self.write_tx().await?;
                $store::lock(&mut tx, Lock::Ledger).await?;
                // A refusal returns here: the transaction is dropped, rolled back, and
                // nothing of the set is applied.
                let applied = apply_in(&mut tx, changes, now_ms).await?;
                tx.commit().await?;
                Ok(applied)
            }

            async fn notices(&self, recipient: &str, limit: u32) -> Result<Vec<StoredNotice>, StoreError> {
                let mut newest = sqlx::query(&format!("{NOTICE_COLUMNS} WHERE recipient = $1 ORDER BY created_at_ms DESC, key DESC LIMIT $2"))
                    .bind(recipient)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_notice)
                    .collect::<Result<Vec<_>, _>>()?;
                newest.reverse();
                Ok(newest)
            }

            async fn account_policy(&self, account: &str) -> Result<Option<bool>, StoreError> {
                let v: Option<i64> =
                    sqlx::query_scalar("SELECT allow_negative FROM ledger_accounts WHERE account = $1")
                        .bind(account)
                        .fetch_optional(self.reader())
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
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn balances(
                &self,
                account: Option<&str>,
            ) -> Result<Vec<(String, String, i64)>, StoreError> {
                let rows = sqlx::query("SELECT account, currency, balance FROM ledger_balances WHERE $1 IS NULL OR account = $1 ORDER BY account, currency")
                    .bind(account)
                    .fetch_all(self.reader())
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
                    .fetch_all(self.reader())
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

        #[async_trait]
        impl ResellStore for $store {
            async fn put_provider(&self, provider: &Provider) -> Result<Provider, StoreError> {
                let mut tx = self.write_tx().await?;
                let created: Option<i64> =
                    sqlx::query_scalar("SELECT created_at_ms FROM providers WHERE account = $1")
                        .bind(&provider.account)
                        .fetch_optional(&mut *tx)
                        .await?;
                let stored = Provider {
                    created_at_ms: created.unwrap_or(provider.created_at_ms),
                    ..provider.clone()
                };
                sqlx::query("INSERT INTO providers (account, record, accepted, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account) DO UPDATE SET record = excluded.record, accepted = excluded.accepted, updated_at_ms = excluded.updated_at_ms")
                    .bind(&stored.account)
                    .bind(json_text(&stored))
                    .bind(i64::from(stored.accepted))
                    .bind(stored.created_at_ms)
                    .bind(stored.updated_at_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(stored)
            }

            async fn provider(&self, account: &str) -> Result<Option<Provider>, StoreError> {
                let record: Option<String> =
                    sqlx::query_scalar("SELECT record FROM providers WHERE account = $1")
                        .bind(account)
                        .fetch_optional(self.reader())
                        .await?;
                record.as_deref().map(|r| parse_json(r, "provider")).transpose()
            }

            async fn providers(&self) -> Result<Vec<Provider>, StoreError> {
                let records: Vec<String> =
                    sqlx::query_scalar("SELECT record FROM providers ORDER BY account")
                        .fetch_all(self.reader())
                        .await?;
                records.iter().map(|r| parse_json(r, "provider")).collect()
            }

            async fn create_agreement(&self, agreement: &Agreement) -> Result<(), StoreError> {
                let mut tx = self.write_tx().await?;
                let known: Option<String> =
                    sqlx::query_scalar("SELECT account FROM providers WHERE account = $1")
                        .bind(&agreement.provider)
                        .fetch_optional(&mut *tx)
                        .await?;
                if known.is_none() {
                    return Err(StoreError::NotFound(format!("provider {}", agreement.provider)));
                }
                sqlx::query("INSERT INTO agreements (id, provider, record, valid_from_ms, valid_until_ms, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(&agreement.id)
                    .bind(&agreement.provider)
                    .bind(json_text(agreement))
                    .bind(agreement.valid_from_ms)
                    .bind(agreement.valid_until_ms)
                    .bind(agreement.created_at_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn agreement(&self, id: &str) -> Result<Option<Agreement>, StoreError> {
                let record: Option<String> =
                    sqlx::query_scalar("SELECT record FROM agreements WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.reader())
                        .await?;
                record.as_deref().map(|r| parse_json(r, "agreement")).transpose()
            }

            async fn agreements(&self, provider: Option<&str>) -> Result<Vec<Agreement>, StoreError> {
                let records: Vec<String> = sqlx::query_scalar(
                    "SELECT record FROM agreements WHERE $1 IS NULL OR provider = $1 ORDER BY created_at_ms DESC, id",
                )
                .bind(provider)
                .fetch_all(self.reader())
                .await?;
                records.iter().map(|r| parse_json(r, "agreement")).collect()
            }

            async fn end_agreement(
                &self,
                id: &str,
                now_ms: UnixMillis,
            ) -> Result<Option<Agreement>, StoreError> {
                let mut tx = self.write_tx().await?;
                let record: Option<String> = sqlx::query_scalar($store::AGREEMENT_FOR_UPDATE)
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(record) = record else {
                    return Err(StoreError::NotFound(format!("agreement {id}")));
                };
                let mut agreement: Agreement = parse_json(&record, "agreement")?;
                if agreement.valid_until_ms <= now_ms {
                    return Ok(None);
                }
                // An agreement not yet in force ends before it starts.
                agreement.valid_until_ms = now_ms.max(agreement.valid_from_ms);
                sqlx::query("UPDATE agreements SET record = $1, valid_until_ms = $2 WHERE id = $3")
                    .bind(json_text(&agreement))
                    .bind(agreement.valid_until_ms)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Some(agreement))
            }

            async fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                    .bind(key)
                    .fetch_optional(self.reader())
                    .await?)
            }

            async fn put_setting(
                &self,
                key: &str,
                value: &str,
                now_ms: UnixMillis,
            ) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO settings (key, value, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms")
                    .bind(key)
                    .bind(value)
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn create_resell_request(&self, row: &ResellRow) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO resell_requests (id, provider, document, pipeline, stage, open, wake_at_ms, version, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
                    .bind(row.id.to_string())
                    .bind(&row.provider)
                    .bind(json_text(&row.document))
                    .bind(json_text(&row.pipeline))
                    .bind(surplus_market::records::name_of(&row.pipeline.stage))
                    .bind(i64::from(row.open()))
                    .bind(row.pipeline.next_deadline())
                    .bind(row.version)
                    .bind(row.created_at_ms)
                    .bind(row.updated_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn resell_request(&self, id: Uuid) -> Result<Option<ResellRow>, StoreError> {
                sqlx::query(&format!("{RESELL_COLUMNS} WHERE id = $1"))
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(resell_row)
                    .transpose()
            }

            async fn resell_requests(&self, provider: Option<&str>) -> Result<Vec<ResellRow>, StoreError> {
                sqlx::query(&format!("{RESELL_COLUMNS} WHERE $1 IS NULL OR provider = $1 ORDER BY created_at_ms DESC, id DESC"))
                    .bind(provider)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(resell_row)
                    .collect()
            }

            async fn open_resell_requests(&self) -> Result<Vec<ResellRow>, StoreError> {
                sqlx::query(&format!("{RESELL_COLUMNS} WHERE open = 1 ORDER BY created_at_ms, id"))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(resell_row)
                    .collect()
            }

            async fn advance_resell_request(
                &self,
                row: &ResellRow,
                step: &ResellStep,
                now_ms: UnixMillis,
            ) -> Result<bool, StoreError> {
                let mut tx = self.write_tx().await?;
                let updated = sqlx::query("UPDATE resell_requests SET pipeline = $1, stage = $2, open = $3, wake_at_ms = $4, version = version + 1, updated_at_ms = $5 WHERE id = $6 AND version = $7")
                    .bind(json_text(&row.pipeline))
                    .bind(surplus_market::records::name_of(&row.pipeline.stage))
                    .bind(i64::from(row.open()))
                    .bind(row.pipeline.next_deadline())
                    .bind(now_ms)
                    .bind(row.id.to_string())
                    .bind(row.version)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if updated == 0 {
                    return Ok(false);
                }
                for l in &step.listings {
                    let inserted = sqlx::query("INSERT INTO listings (id, request, set_index, category, provider, record, listed, created_at_ms, updated_at_ms, next_retest_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9) ON CONFLICT (request, set_index, category) DO NOTHING")
                        .bind(&l.id)
                        .bind(l.request.to_string())
                        .bind(l.set as i64)
                        .bind(&l.category)
                        .bind(&l.provider)
                        .bind(json_text(l))
                        .bind(i64::from(l.listed))
                        .bind(l.created_at_ms)
                        .bind(l.next_retest_at_ms)
                        .execute(&mut *tx)
                        .await?;
                    if inserted.rows_affected() > 0 {
                        put_listing_hosts(&mut tx, l).await?;
                    }
                }
                queue_notices(&mut tx, &step.notices, now_ms).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn listings(&self) -> Result<Vec<Listing>, StoreError> {
                let records: Vec<String> =
                    sqlx::query_scalar("SELECT record FROM listings ORDER BY created_at_ms, id")
                        .fetch_all(self.reader())
                        .await?;
                records.iter().map(|r| parse_json(r, "listing")).collect()
            }

            async fn listing(&self, id: &str) -> Result<Option<Listing>, StoreError> {
                let record: Option<String> =
                    sqlx::query_scalar("SELECT record FROM listings WHERE id = $1")
                        .bind(id)
                        .fetch_optional(self.reader())
                        .await?;
                record.as_deref().map(|r| parse_json(r, "listing")).transpose()
            }
            async fn due_listings(
                &self,
                now_ms: UnixMillis,
            ) -> Result<Vec<(Listing, Option<UnixMillis>)>, StoreError> {
                sqlx::query("SELECT record, retest_requested_at_ms FROM listings WHERE retesting = 1 OR next_retest_at_ms <= $1 OR retest_requested_at_ms IS NOT NULL ORDER BY id")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| Ok((parse_json(r.try_get("record")?, "listing")?, r.try_get("retest_requested_at_ms")?)))
                    .collect()
            }

            async fn request_retest(&self, id: &str, now_ms: UnixMillis) -> Result<bool, StoreError> {
                Ok(sqlx::query("UPDATE listings SET retest_requested_at_ms = $1 WHERE id = $2")
                    .bind(now_ms)
                    .bind(id)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn put_listing(
                &self,
                listing: &Listing,
                answered: Option<UnixMillis>,
                notices: &[Notice],
                now_ms: UnixMillis,
            ) -> Result<(), StoreError> {
                let mut tx = self.write_tx().await?;
                sqlx::query("UPDATE listings SET record = $1, listed = $2, next_retest_at_ms = $3, retesting = $4, updated_at_ms = $5, retest_requested_at_ms = CASE WHEN retest_requested_at_ms = $6 THEN NULL ELSE retest_requested_at_ms END WHERE id = $7")
                    .bind(json_text(listing))
                    .bind(i64::from(listing.listed))
                    .bind(listing.next_retest_at_ms)
                    .bind(i64::from(listing.retest.is_some()))
                    .bind(now_ms)
                    .bind(answered)
                    .bind(&listing.id)
                    .execute(&mut *tx)
                    .await?;
                put_listing_hosts(&mut tx, listing).await?;
                queue_notices(&mut tx, notices, now_ms).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn put_rating(&self, rating: &Rating) -> Result<bool, StoreError> {
                Ok(sqlx::query("INSERT INTO ratings (client, instance, provider, score, comment, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (client, instance) DO NOTHING")
                    .bind(&rating.client)
                    .bind(&rating.instance)
                    .bind(&rating.provider)
                    .bind(i64::from(rating.score))
                    .bind(&rating.comment)
                    .bind(rating.created_at_ms)
                    .execute(self.writer())
                    .await?
                    .rows_affected()
                    > 0)
            }

            async fn ratings(&self, provider: Option<&str>) -> Result<Vec<Rating>, StoreError> {
                sqlx::query("SELECT client, instance, provider, score, comment, created_at_ms FROM ratings WHERE $1 IS NULL OR provider = $1 ORDER BY created_at_ms DESC, client, instance")
                    .bind(provider)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        let score: i64 = r.try_get("score")?;
                        Ok(Rating {
                            client: r.try_get("client")?,
                            instance: r.try_get("instance")?,
                            provider: r.try_get("provider")?,
                            score: u8::try_from(score).map_err(|_| StoreError::Corrupt(format!("rating score {score}")))?,
                            comment: r.try_get("comment")?,
                            created_at_ms: r.try_get("created_at_ms")?,
                        })
                    })
                    .collect()
            }
        }

        #[async_trait]
        impl ReservationStore for $store {
            async fn reserve(
                &self,
                listing: &str,
                available: &[Uuid],
                request: ReservationRequest,
                quote: Option<Uuid>,
                changes: StepChanges<'_, Reservation>,
                now_ms: UnixMillis,
            ) -> Result<Result<Vec<Reservation>, MarketRefusal>, PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(listing)).await.map_err(StoreError::from)?;
                let mut book = read_live_book(&mut tx, listing, &request.ids).await?;
                let made = match book.handle_reserve(now_ms, request, available) {
                    Ok(made) => made,
                    Err(refusal) => return Ok(Err(refusal)),
                };
                if let Some(quote) = quote {
                    // Honoured once: of two acceptances the second finds it taken.
                    let taken = sqlx::query("UPDATE quotes SET accepted_at_ms = $1 WHERE id = $2 AND accepted_at_ms IS NULL")
                        .bind(now_ms)
                        .bind(quote.to_string())
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?
                        .rows_affected();
                    if taken == 0 {
                        return Ok(Err(MarketRefusal {
                            rule: "quote_used",
                            message: format!("quote {quote} was accepted already; ask for a new one"),
                        }));
                    }
                }
                for r in &made {
                    put_reservation(&mut tx, r, true, now_ms).await?;
                }
                apply_in(&mut tx, &changes(&made), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Ok(made))
            }

            async fn release_reservation(
                &self,
                listing: &str,
                id: Uuid,
                by: &str,
                changes: StepChanges<'_, Reservation>,
                now_ms: UnixMillis,
            ) -> Result<Result<Ended, MarketRefusal>, PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(listing)).await.map_err(StoreError::from)?;
                // A notice whose deadline passed ends the reservation then: a release
                // after it is too late (the tick records the interruption).
                let due: Option<i64> = sqlx::query_scalar("SELECT deadline_ms FROM interruptions WHERE reservation = $1 AND done = 0 AND deadline_ms <= $2")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                if let Some(deadline) = due {
                    return Ok(Err(MarketRefusal {
                        rule: "ended",
                        message: format!("reservation {id} was interrupted at {deadline}"),
                    }));
                }
                let mut book = read_live_book(&mut tx, listing, &[id]).await?;
                let ended = match book.handle_release(now_ms, id, by) {
                    Ok(ended) => ended,
                    Err(refusal) => return Ok(Err(refusal)),
                };
                let r = book.get(id).expect("the book released it").clone();
                put_reservation(&mut tx, &r, false, now_ms).await?;
                apply_in(&mut tx, &changes(std::slice::from_ref(&r)), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Ok(ended))
            }

            async fn expire_reservations(
                &self,
                now_ms: UnixMillis,
                changes: StepChanges<'_, Reservation>,
            ) -> Result<Vec<Ended>, PostError> {
                // Rows whose term passed and whose record still says active: the
                // record's state is set by the step below, so a due listing is found
                // again only until its expiry is recorded.
                let due: Vec<String> = sqlx::query_scalar("SELECT DISTINCT listing FROM reservations WHERE until_ms IS NOT NULL AND until_ms <= $1 AND ended = 0 ORDER BY listing")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await
                    .map_err(StoreError::from)?;
                let mut all = Vec::new();
                for listing in due {
                    let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                    $store::lock(&mut tx, Lock::Listing(&listing)).await.map_err(StoreError::from)?;
                    // Read under the lock: another controller that got here first has
                    // recorded these ends, and the book reports nothing twice.
                    let mut book = read_live_book(&mut tx, &listing, &[]).await?;
                    let ended = book.poll_expired(now_ms);
                    let rows: Vec<Reservation> = ended
                        .iter()
                        .filter_map(|e| book.get(e.reservation).cloned())
                        .collect();
                    for r in &rows {
                        put_reservation(&mut tx, r, false, now_ms).await?;
                    }
                    if !rows.is_empty() {
                        apply_in(&mut tx, &changes(&rows), now_ms).await?;
                    }
                    tx.commit().await.map_err(StoreError::from)?;
                    all.extend(ended);
                }
                Ok(all)
            }

            async fn notice_interruptions(
                &self,
                listing: &str,
                picks: &[(Uuid, InterruptNotice)],
                changes: StepChanges<'_, Reservation>,
                now_ms: UnixMillis,
            ) -> Result<(Vec<Reservation>, Vec<MarketRefusal>), PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(listing)).await.map_err(StoreError::from)?;
                let ids: Vec<Uuid> = picks.iter().map(|(id, _)| *id).collect();
                let book = read_live_book(&mut tx, listing, &ids).await?;
                let mut noticed = Vec::new();
                let mut skipped = Vec::new();
                for (id, notice) in picks {
                    let r = match book.check_interrupt(now_ms, *id, notice.cause) {
                        Ok(r) => r.clone(),
                        // Released or ended since it was chosen, or one the book may
                        // not interrupt: left out, the others still noticed.
                        Err(refusal) => {
                            skipped.push(refusal);
                            continue;
                        }
                    };
                    let inserted = sqlx::query("INSERT INTO interruptions (reservation, listing, host, record, deadline_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (reservation) DO NOTHING")
                        .bind(id.to_string())
                        .bind(listing)
                        .bind(r.host.to_string())
                        .bind(json_text(notice))
                        .bind(notice.deadline_ms)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::from)?
                        .rows_affected();
                    if inserted > 0 {
                        noticed.push(r);
                    }
                }
                if !noticed.is_empty() {
                    apply_in(&mut tx, &changes(&noticed), now_ms).await?;
                }
                tx.commit().await.map_err(StoreError::from)?;
                Ok((noticed, skipped))
            }

            async fn due_interruptions(&self, now_ms: UnixMillis) -> Result<Vec<(String, Uuid, InterruptNotice)>, StoreError> {
                let rows = sqlx::query("SELECT listing, reservation, record FROM interruptions WHERE done = 0 AND deadline_ms <= $1 ORDER BY deadline_ms, reservation")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?;
                rows.iter()
                    .map(|r| {
                        let id: String = r.try_get("reservation")?;
                        let record: String = r.try_get("record")?;
                        Ok((r.try_get("listing")?, parse_uuid(&id)?, parse_json(&record, "interruption")?))
                    })
                    .collect()
            }

            async fn apply_interruption(
                &self,
                listing: &str,
                reservation: Uuid,
                changes: StepChanges<'_, Reservation>,
                now_ms: UnixMillis,
            ) -> Result<Option<Ended>, PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(listing)).await.map_err(StoreError::from)?;
                let record: Option<String> = sqlx::query_scalar("SELECT record FROM interruptions WHERE reservation = $1 AND done = 0")
                    .bind(reservation.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let Some(record) = record else {
                    return Ok(None);
                };
                let notice: InterruptNotice = parse_json(&record, "interruption")?;
                sqlx::query("UPDATE interruptions SET done = 1 WHERE reservation = $1")
                    .bind(reservation.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let mut book = read_live_book(&mut tx, listing, &[reservation]).await?;
                // Ended at the deadline, however late the tick: the holder kept the host
                // (and paid for it) through the grace, and no longer.
                let ended = match book.handle_interrupt(notice.deadline_ms, reservation, notice.cause) {
                    Ok(ended) => {
                        let r = book.get(reservation).expect("the book interrupted it").clone();
                        put_reservation(&mut tx, &r, false, now_ms).await?;
                        apply_in(&mut tx, &changes(std::slice::from_ref(&r)), now_ms).await?;
                        Some(ended)
                    }
                    Err(_) => None,
                };
                tx.commit().await.map_err(StoreError::from)?;
                Ok(ended)
            }

            async fn interruption(&self, reservation: Uuid) -> Result<Option<InterruptNotice>, StoreError> {
                let record: Option<String> = sqlx::query_scalar("SELECT record FROM interruptions WHERE reservation = $1")
                    .bind(reservation.to_string())
                    .fetch_optional(self.reader())
                    .await?;
                record.map(|r| parse_json(&r, "interruption")).transpose()
            }

            async fn reservations_in(&self, from_ms: UnixMillis, to_ms: UnixMillis) -> Result<Vec<Reservation>, StoreError> {
                let records: Vec<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE starts_at_ms < $2 AND (until_ms IS NULL OR until_ms > $1) ORDER BY starts_at_ms, id")
                    .bind(from_ms)
                    .bind(to_ms)
                    .fetch_all(self.reader())
                    .await?;
                records.iter().map(|r| parse_json(r, "reservation")).collect()
            }

            async fn ending_within(&self, until_ms: UnixMillis) -> Result<Vec<Reservation>, StoreError> {
                let records: Vec<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE ended = 0 AND until_ms <= $1 ORDER BY until_ms, id")
                    .bind(until_ms)
                    .fetch_all(self.reader())
                    .await?;
                records.iter().map(|r| parse_json(r, "reservation")).collect()
            }

            async fn holding(&self, host: Uuid, now_ms: UnixMillis) -> Result<Option<Reservation>, StoreError> {
                let record: Option<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE host = $1 AND starts_at_ms <= $2 AND (until_ms IS NULL OR until_ms > $2) AND NOT EXISTS (SELECT 1 FROM interruptions n WHERE n.reservation = reservations.id AND n.deadline_ms <= $2) ORDER BY starts_at_ms DESC, id LIMIT 1")
                    .bind(host.to_string())
                    .bind(now_ms)
                    .fetch_optional(self.reader())
                    .await?;
                record.map(|r| parse_json(&r, "reservation")).transpose()
            }

            async fn online_hosts_of(&self, listing: &str) -> Result<Vec<Uuid>, StoreError> {
                let hosts: Vec<String> = sqlx::query_scalar("SELECT h.host FROM listing_hosts h JOIN agents a ON a.id = h.host WHERE h.listing = $1 AND a.status = $2 ORDER BY h.host")
                    .bind(listing)
                    .bind(AgentStatus::Online.as_str())
                    .fetch_all(self.reader())
                    .await?;
                hosts.iter().map(|h| parse_uuid(h)).collect()
            }

            async fn selling_listing(&self, host: Uuid) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT listing FROM listing_hosts WHERE host = $1 ORDER BY listing LIMIT 1")
                    .bind(host.to_string())
                    .fetch_optional(self.reader())
                    .await?)
            }

            async fn unreserved_instances(&self, now_ms: UnixMillis) -> Result<Vec<InstanceRow>, StoreError> {
                // Not terminated and not on a host its owner holds now (by a reservation,
                // or by a pool allocation of a slot still pooled whose reservation still
                // holds the host); and the host is held by another client now, or its
                // owner's own reservation of it, pool allocation on it or that
                // allocation's reservation ended. Only
                // hosts that were ever reserved or pooled are looked at (every tick asks).
                sqlx::query("SELECT i.* FROM instances i WHERE (i.agent_id IN (SELECT r.host FROM reservations r) OR i.agent_id IN (SELECT a.host FROM pool_allocations a)) AND i.state <> 'terminated' \
                    AND NOT EXISTS (SELECT 1 FROM reservations r WHERE r.host = i.agent_id AND i.owner_role = 'client' AND r.holder = i.account AND r.starts_at_ms <= $1 AND (r.until_ms IS NULL OR r.until_ms > $1)) \
                    AND NOT EXISTS (SELECT 1 FROM pool_allocations a JOIN pool_slots s ON s.slot = a.slot AND s.pool = a.pool WHERE a.host = i.agent_id AND i.owner_role = 'client' AND a.member = i.account AND a.from_ms <= $1 AND (a.until_ms IS NULL OR a.until_ms > $1) \
                        AND (s.leaving_at_ms IS NULL OR s.leaving_at_ms > $1) \
                        AND (NOT EXISTS (SELECT 1 FROM reservations r WHERE r.id = a.slot) OR EXISTS (SELECT 1 FROM reservations r WHERE r.id = a.slot AND r.starts_at_ms <= $1 AND (r.until_ms IS NULL OR r.until_ms > $1)))) \
                    AND (EXISTS (SELECT 1 FROM reservations r WHERE r.host = i.agent_id AND ( \
                        (r.starts_at_ms <= $1 AND (r.until_ms IS NULL OR r.until_ms > $1)) \
                        OR (i.owner_role = 'client' AND r.holder = i.account AND r.until_ms IS NOT NULL AND r.until_ms <= $1))) \
                      OR EXISTS (SELECT 1 FROM pool_allocations a WHERE a.host = i.agent_id AND i.owner_role = 'client' AND a.member = i.account AND ( \
                        (a.until_ms IS NOT NULL AND a.until_ms <= $1) \
                        OR EXISTS (SELECT 1 FROM reservations r WHERE r.id = a.slot AND r.until_ms IS NOT NULL AND r.until_ms <= $1)))) \
                    ORDER BY i.agent_id, i.created_at_ms, i.id")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(instance_from_row)
                    .collect()
            }

            async fn listing_reservations(&self, now_ms: UnixMillis) -> Result<BTreeMap<String, ListingReservations>, StoreError> {
                let mut out: BTreeMap<String, ListingReservations> = BTreeMap::new();
                for r in sqlx::query("SELECT listing, COUNT(*) AS n FROM reservations GROUP BY listing")
                    .fetch_all(self.reader())
                    .await?
                {
                    let n: i64 = r.try_get("n")?;
                    out.entry(r.try_get("listing")?).or_default().past = n.max(0) as u64;
                }
                for r in sqlx::query("SELECT listing, host FROM reservations WHERE until_ms IS NULL OR until_ms > $1")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?
                {
                    let host: String = r.try_get("host")?;
                    out.entry(r.try_get("listing")?).or_default().held.push(parse_uuid(&host)?);
                }
                Ok(out)
            }

            async fn create_quote(&self, quote: &surplus_market::quote::Quote, holder: &str) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO quotes (id, listing, holder, record, valid_until_ms) VALUES ($1, $2, $3, $4, $5)")
                    .bind(quote.id.to_string())
                    .bind(&quote.listing)
                    .bind(holder)
                    .bind(json_text(quote))
                    .bind(quote.valid_until_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn quote(&self, id: Uuid) -> Result<Option<StoredQuote>, StoreError> {
                let Some(r) = sqlx::query("SELECT holder, record, accepted_at_ms FROM quotes WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await?
                else {
                    return Ok(None);
                };
                let record: String = r.try_get("record")?;
                Ok(Some(StoredQuote {
                    quote: parse_json(&record, "quote")?,
                    holder: r.try_get("holder")?,
                    accepted_at_ms: r.try_get("accepted_at_ms")?,
                }))
            }

            async fn reservation(&self, id: Uuid) -> Result<Option<Reservation>, StoreError> {
                let record: Option<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await?;
                record.map(|r| parse_json(&r, "reservation")).transpose()
            }

            async fn reservation_book(&self, listing: &str) -> Result<Book, StoreError> {
                let mut conn = self.reader().acquire().await?;
                read_book(&mut conn, listing).await
            }

            async fn reservations_of(&self, holder: &str) -> Result<Vec<Reservation>, StoreError> {
                let records: Vec<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE holder = $1 ORDER BY starts_at_ms DESC, id DESC")
                    .bind(holder)
                    .fetch_all(self.reader())
                    .await?;
                records.iter().map(|r| parse_json(r, "reservation")).collect()
            }
        }

        /// Keeps the hosts a listing sells in step with its record.
        async fn put_listing_hosts(conn: &mut $conn, l: &Listing) -> Result<(), sqlx::Error> {
            sqlx::query("DELETE FROM listing_hosts WHERE listing = $1")
                .bind(&l.id)
                .execute(&mut *conn)
                .await?;
            for h in &l.hosts {
                sqlx::query("INSERT INTO listing_hosts (listing, host) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                    .bind(&l.id)
                    .bind(h.to_string())
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        }

        /// Writes a reservation's row: inserted when `new`, else its record and end.
        async fn put_reservation(conn: &mut $conn, r: &Reservation, new: bool, now_ms: UnixMillis) -> Result<(), StoreError> {
            let ended = i64::from(matches!(
                r.state,
                surplus_market::reservations::State::Ended { .. }
            ));
            let statement = match new {
                true => "INSERT INTO reservations (id, listing, host, holder, record, starts_at_ms, until_ms, updated_at_ms, ended) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                false => "UPDATE reservations SET listing = $2, host = $3, holder = $4, record = $5, starts_at_ms = $6, until_ms = $7, updated_at_ms = $8, ended = $9 WHERE id = $1",
            };
            sqlx::query(statement)
                .bind(r.id.to_string())
                .bind(&r.listing)
                .bind(r.host.to_string())
                .bind(&r.holder)
                .bind(json_text(r))
                .bind(r.starts_at_ms)
                .bind(r.end_ms())
                .bind(now_ms)
                .bind(ended)
                .execute(&mut *conn)
                .await?;
            Ok(())
        }

        /// Applies a step's change set inside the caller's transaction: postings
        /// through the ledger's rule (under its lock), notices, prices.
        async fn apply_in(conn: &mut $conn, changes: &ChangeSet, now_ms: UnixMillis) -> Result<Vec<crate::ledger::Applied>, PostError> {
            let mut applied = Vec::with_capacity(changes.postings.len());
            if !changes.postings.is_empty() || !changes.holds.is_empty() {
                $store::lock(&mut *conn, Lock::Ledger).await.map_err(StoreError::from)?;
            }
            for (posting, lines) in &changes.postings {
                applied.push(post_in(&mut *conn, posting, lines, now_ms).await?);
            }
            for hold in &changes.holds {
                apply_hold(&mut *conn, hold, now_ms).await?;
            }
            queue_notices(&mut *conn, &changes.notices, now_ms).await.map_err(StoreError::from)?;
            for p in &changes.prices {
                record_price_in(&mut *conn, p).await?;
            }
            Ok(applied)
        }

        /// Places or gives back a ledger hold, once per key.
        async fn apply_hold(conn: &mut $conn, hold: &HoldChange, now_ms: UnixMillis) -> Result<(), PostError> {
            match hold {
                HoldChange::Place { key, client, currency, amount } => {
                    let placed = sqlx::query("INSERT INTO holds (key, client, currency, amount, held_at_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING")
                        .bind(key)
                        .bind(client)
                        .bind(currency)
                        .bind(*amount)
                        .bind(now_ms)
                        .execute(&mut *conn)
                        .await
                        .map_err(StoreError::from)?
                        .rows_affected();
                    if placed > 0 {
                        let posting = crate::ledger::hold_posting(key, client, currency, *amount);
                        post_in(&mut *conn, &posting, &[], now_ms).await?;
                    }
                }
                HoldChange::Release { key } => {
                    let row: Option<(String, String, i64)> = sqlx::query_as("UPDATE holds SET released_at_ms = $2 WHERE key = $1 AND released_at_ms IS NULL RETURNING client, currency, amount")
                        .bind(key)
                        .bind(now_ms)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(StoreError::from)?;
                    if let Some((client, currency, amount)) = row {
                        let posting = crate::ledger::release_posting(key, &client, &currency, amount);
                        post_in(&mut *conn, &posting, &[], now_ms).await?;
                    }
                }
            }
            Ok(())
        }

        async fn record_price_in(conn: &mut $conn, p: &PricePoint) -> Result<bool, StoreError> {
            Ok(sqlx::query("INSERT INTO price_history (id, kind, listing, provider, zone, category, currency, price, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING")
                .bind(&p.id)
                .bind(surplus_market::records::name_of(&p.kind))
                .bind(&p.listing)
                .bind(&p.provider)
                .bind(&p.zone)
                .bind(&p.category)
                .bind(&p.currency)
                .bind(i64::try_from(p.price).map_err(|_| StoreError::Corrupt(format!("price {} out of range", p.price)))?)
                .bind(p.at_ms)
                .execute(&mut *conn)
                .await?
                .rows_affected()
                > 0)
        }

        fn stored_bid(row: &$row) -> Result<StoredBid, StoreError> {
            let record: String = row.try_get("record")?;
            let allocated: i64 = row.try_get("allocated")?;
            Ok(StoredBid {
                bid: parse_json(&record, "spot bid")?,
                cancelled_at_ms: row.try_get("cancelled_at_ms")?,
                allocated: u32::try_from(allocated).unwrap_or(u32::MAX),
            })
        }

        async fn spot_bid_in(conn: &mut $conn, id: Uuid) -> Result<Option<StoredBid>, StoreError> {
            sqlx::query("SELECT record, cancelled_at_ms, allocated FROM spot_bids WHERE id = $1")
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(stored_bid)
                .transpose()
        }

        fn price_i64(p: u64) -> Result<i64, StoreError> {
            i64::try_from(p).map_err(|_| StoreError::Corrupt(format!("price {p} out of range")))
        }

        #[async_trait]
        impl SpotStore for $store {
            async fn place_bid(&self, bid: &surplus_market::spot::Bid, period_ms: i64, changes: &ChangeSet, now_ms: UnixMillis) -> Result<(StoredBid, bool), PostError> {
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(&bid.class)).await.map_err(StoreError::from)?;
                if let Some(b) = spot_bid_in(&mut tx, bid.id).await? {
                    return Ok((b, false));
                }
                sqlx::query("INSERT INTO spot_markets (listing, period_ms, next_clearing_at_ms) VALUES ($1, $2, $3) ON CONFLICT (listing) DO NOTHING")
                    .bind(&bid.class)
                    .bind(period_ms)
                    .bind(now_ms.saturating_add(period_ms))
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                sqlx::query("INSERT INTO spot_bids (id, listing, bidder, record, placed_at_ms) VALUES ($1, $2, $3, $4, $5)")
                    .bind(bid.id.to_string())
                    .bind(&bid.class)
                    .bind(&bid.client)
                    .bind(json_text(bid))
                    .bind(bid.placed_at_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                apply_in(&mut tx, changes, now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok((StoredBid { bid: bid.clone(), cancelled_at_ms: None, allocated: 0 }, true))
            }

            async fn spot_bid(&self, id: Uuid) -> Result<Option<StoredBid>, StoreError> {
                let mut conn = self.reader().acquire().await?;
                spot_bid_in(&mut conn, id).await
            }

            async fn spot_bids_of(&self, bidder: &str) -> Result<Vec<StoredBid>, StoreError> {
                let rows = sqlx::query("SELECT record, cancelled_at_ms, allocated FROM spot_bids WHERE bidder = $1 ORDER BY placed_at_ms DESC, id DESC")
                    .bind(bidder)
                    .fetch_all(self.reader())
                    .await?;
                rows.iter().map(stored_bid).collect()
            }

            async fn cancel_bid(&self, id: Uuid, by: &str, changes: StepChanges<'_, Reservation>, now_ms: UnixMillis) -> Result<Result<(StoredBid, Vec<Reservation>), MarketRefusal>, PostError> {
                let unknown = || MarketRefusal { rule: "unknown_bid", message: format!("bid {id} not found") };
                let listing: Option<String> = sqlx::query_scalar("SELECT listing FROM spot_bids WHERE id = $1 AND bidder = $2")
                    .bind(id.to_string())
                    .bind(by)
                    .fetch_optional(self.reader())
                    .await
                    .map_err(StoreError::from)?;
                let Some(listing) = listing else { return Ok(Err(unknown())) };
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(&listing)).await.map_err(StoreError::from)?;
                let Some(mut stored) = spot_bid_in(&mut tx, id).await? else { return Ok(Err(unknown())) };
                if let Some(at) = stored.cancelled_at_ms {
                    return Ok(Err(MarketRefusal { rule: "cancelled", message: format!("bid {id} was cancelled at {at}") }));
                }
                sqlx::query("UPDATE spot_bids SET cancelled_at_ms = $2, allocated = 0 WHERE id = $1")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                stored.cancelled_at_ms = Some(now_ms);
                stored.allocated = 0;
                // Its hosts end by its holder's act; one whose notice's deadline passed
                // ended by the interruption (the tick records it).
                let held: Vec<String> = sqlx::query_scalar("SELECT a.reservation FROM spot_allocations a JOIN reservations r ON r.id = a.reservation LEFT JOIN interruptions i ON i.reservation = a.reservation AND i.deadline_ms <= $2 WHERE a.bid = $1 AND r.ended = 0 AND i.reservation IS NULL")
                    .bind(id.to_string())
                    .bind(now_ms)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let mut book = read_live_book(&mut tx, &listing, &[]).await?;
                let mut ended = Vec::new();
                for r in held {
                    let r = parse_uuid(&r)?;
                    if book.handle_release(now_ms, r, by).is_ok() {
                        let r = book.get(r).expect("the book released it").clone();
                        put_reservation(&mut tx, &r, false, now_ms).await?;
                        ended.push(r);
                    }
                }
                apply_in(&mut tx, &changes(&ended), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Ok((stored, ended)))
            }

            async fn spot_market(&self, listing: &str) -> Result<Option<SpotRow>, StoreError> {
                let row = sqlx::query("SELECT period_ms, next_clearing_at_ms, requested_at_ms, price, cleared_at_ms FROM spot_markets WHERE listing = $1")
                    .bind(listing)
                    .fetch_optional(self.reader())
                    .await?;
                row.map(|row| -> Result<SpotRow, StoreError> {
                    let price: Option<i64> = row.try_get("price")?;
                    Ok(SpotRow {
                        listing: listing.to_string(),
                        period_ms: row.try_get("period_ms")?,
                        next_clearing_at_ms: row.try_get("next_clearing_at_ms")?,
                        requested_at_ms: row.try_get("requested_at_ms")?,
                        price: price.map(|p| p.max(0) as u64),
                        cleared_at_ms: row.try_get("cleared_at_ms")?,
                    })
                })
                .transpose()
            }

            async fn request_clearing(&self, listing: &str, now_ms: UnixMillis) -> Result<bool, StoreError> {
                let done = sqlx::query("UPDATE spot_markets SET requested_at_ms = CASE WHEN requested_at_ms IS NULL OR requested_at_ms > $2 THEN $2 ELSE requested_at_ms END WHERE listing = $1")
                    .bind(listing)
                    .bind(now_ms)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn due_spot_markets(&self, now_ms: UnixMillis) -> Result<Vec<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT listing FROM spot_markets WHERE next_clearing_at_ms <= $1 OR requested_at_ms <= $1 ORDER BY listing")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?)
            }

            async fn clear_spot(&self, listing: &str, inputs: SpotInputs<'_>, changes: DecisionChanges<'_, SpotCleared>, now_ms: UnixMillis) -> Result<Option<SpotCleared>, PostError> {
                use surplus_market::spot;
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(listing)).await.map_err(StoreError::from)?;
                let row = sqlx::query("SELECT period_ms, next_clearing_at_ms, requested_at_ms, last, price, cleared_at_ms FROM spot_markets WHERE listing = $1")
                    .bind(listing)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let Some(row) = row else { return Ok(None) };
                let last: Option<String> = row.try_get("last").map_err(StoreError::from)?;
                let previous_price: Option<i64> = row.try_get("price").map_err(StoreError::from)?;
                let previous_at: Option<i64> = row.try_get("cleared_at_ms").map_err(StoreError::from)?;
                let previous = previous_at.zip(previous_price.map(|p| p.max(0) as u64));
                let bid_rows = sqlx::query("SELECT record, cancelled_at_ms, allocated FROM spot_bids WHERE listing = $1 AND cancelled_at_ms IS NULL ORDER BY placed_at_ms, id")
                    .bind(listing)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                let stored: Vec<StoredBid> = bid_rows.iter().map(stored_bid).collect::<Result<_, _>>()?;
                let previous_next: i64 = row.try_get("next_clearing_at_ms").map_err(StoreError::from)?;
                // The capacity as it is now, under the lock: the hosts on offer that
                // no other kind of reservation holds.
                let mut book = read_live_book(&mut tx, listing, &[]).await?;
                let taken: std::collections::BTreeSet<Uuid> = book
                    .reservations()
                    .filter(|r| r.mode != surplus_market::resell::PricingMode::Spot && r.holds_from(now_ms))
                    .map(|r| r.host)
                    .collect();
                let on_offer: std::collections::BTreeSet<&Uuid> = inputs.available.iter().filter(|h| !taken.contains(h)).collect();
                let supply = inputs.supply.clone().map(|mut s| {
                    s.capacity = u32::try_from(on_offer.len()).unwrap_or(u32::MAX);
                    s
                });
                let mut market = spot::SpotMarket {
                    period_ms: row.try_get("period_ms").map_err(StoreError::from)?,
                    next_clearing_at_ms: previous_next,
                    requested_at_ms: row.try_get("requested_at_ms").map_err(StoreError::from)?,
                    supplies: supply.clone().into_iter().collect(),
                    bids: stored.iter().map(|b| b.bid.clone()).collect(),
                    last: last.as_deref().map(|l| parse_json(l, "spot clearing")).transpose()?,
                };
                let Some(cleared) = market.poll_clearing(now_ms) else { return Ok(None) };
                let class = cleared.clearing.class(listing).cloned();
                // Claimed by a conditional update on the timer read above: a second
                // clearing of the same period finds it moved and changes nothing.
                let claimed = sqlx::query("UPDATE spot_markets SET next_clearing_at_ms = $2, requested_at_ms = NULL, last = $3, price = COALESCE($4, price), cleared_at_ms = $5 WHERE listing = $1 AND next_clearing_at_ms = $6")
                    .bind(listing)
                    .bind(market.next_clearing_at_ms)
                    .bind(json_text(&cleared.clearing))
                    .bind(class.as_ref().map(|c| price_i64(c.price)).transpose()?)
                    .bind(now_ms)
                    .bind(previous_next)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .rows_affected();
                if claimed == 0 {
                    return Ok(None);
                }
                let mut made = Vec::new();
                let mut noticed = Vec::new();
                let mut won = Vec::new();
                let mut stopping = std::collections::BTreeMap::new();
                let mut holding = 0;
                if let (Some(_), Some(class)) = (&supply, &class) {
                    let rows = sqlx::query("SELECT a.bid, r.record, i.reservation AS noticed FROM spot_allocations a JOIN reservations r ON r.id = a.reservation LEFT JOIN interruptions i ON i.reservation = a.reservation WHERE a.listing = $1 AND r.ended = 0")
                        .bind(listing)
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                    let mut held = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let record: String = row.try_get("record").map_err(StoreError::from)?;
                        let r: Reservation = parse_json(&record, "reservation")?;
                        let noticed: Option<String> = row.try_get("noticed").map_err(StoreError::from)?;
                        if !r.holds_from(now_ms) {
                            continue;
                        }
                        held.push(spot::Held {
                            reservation: r.id,
                            bid: parse_uuid(row.try_get("bid").map_err(StoreError::from)?)?,
                            started_at_ms: r.starts_at_ms,
                            noticed: noticed.is_some(),
                        });
                    }
                    holding = held.len();
                    let free = book.free(now_ms, inputs.available);
                    let assignment = spot::assign(class, &market.bids, &held, &free);
                    for (id, why) in &assignment.notices {
                        let cause = surplus_market::interrupt::Cause::from(*why);
                        let r = match book.check_interrupt(now_ms, *id, cause) {
                            Ok(r) => r.clone(),
                            Err(refusal) => {
                                tracing::info!(reservation = %id, %refusal, "spot host not taken back");
                                continue;
                            }
                        };
                        let notice = (inputs.notice)(cause);
                        let inserted = sqlx::query("INSERT INTO interruptions (reservation, listing, host, record, deadline_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (reservation) DO NOTHING")
                            .bind(id.to_string())
                            .bind(listing)
                            .bind(r.host.to_string())
                            .bind(json_text(&notice))
                            .bind(notice.deadline_ms)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from)?
                            .rows_affected();
                        if inserted > 0 {
                            // What the host's agent stops at the deadline, told in this
                            // same transaction.
                            // The holder's, and on a pooled reservation its members'.
                            let ids: Vec<String> = sqlx::query("SELECT * FROM instances WHERE agent_id = $1 AND owner_role = 'client' AND (account = $2 OR account IN (SELECT a.member FROM pool_allocations a WHERE a.slot = $3 AND a.done = 0)) ORDER BY created_at_ms, id")
                                .bind(r.host.to_string())
                                .bind(&r.holder)
                                .bind(r.id.to_string())
                                .fetch_all(&mut *tx)
                                .await
                                .map_err(StoreError::from)?
                                .iter()
                                .map(instance_from_row)
                                .collect::<Result<Vec<_>, _>>()?
                                .into_iter()
                                .filter(|i| i.record.state != surplus_protocol::control::InstanceState::Terminated)
                                .map(|i| i.record.id)
                                .collect();
                            stopping.insert(r.id, ids);
                            noticed.push((r, notice));
                        }
                    }
                    for (bid_id, hosts) in &assignment.fills {
                        let Some(bid) = market.bids.iter().find(|b| b.id == *bid_id) else { continue };
                        let request = ReservationRequest {
                            ids: (0..hosts.len() as u32).map(|n| (inputs.new_id)(*bid_id, n)).collect(),
                            listing: listing.to_string(),
                            holder: bid.client.clone(),
                            mode: surplus_market::resell::PricingMode::Spot,
                            interruptibility: surplus_market::resell::Interruptibility::PriceBased,
                            goal: inputs.goal,
                            price: class.price,
                            upfront: 0,
                            term_ms: None,
                        };
                        match book.handle_reserve(now_ms, request, hosts) {
                            Ok(rs) => {
                                for r in rs {
                                    put_reservation(&mut tx, &r, true, now_ms).await?;
                                    sqlx::query("INSERT INTO spot_allocations (reservation, bid, listing) VALUES ($1, $2, $3)")
                                        .bind(r.id.to_string())
                                        .bind(bid_id.to_string())
                                        .bind(listing)
                                        .execute(&mut *tx)
                                        .await
                                        .map_err(StoreError::from)?;
                                    made.push(r);
                                }
                                won.push(*bid_id);
                            }
                            Err(refusal) => tracing::warn!(bid = %bid_id, %refusal, "spot hosts not given"),
                        }
                    }
                }
                // What each live bid was allocated, where it changed.
                for b in &stored {
                    let now = class
                        .as_ref()
                        .and_then(|c| c.allocations.iter().find(|a| a.bid == b.bid.id))
                        .map_or(0, |a| a.quantity);
                    if now != b.allocated {
                        sqlx::query("UPDATE spot_bids SET allocated = $2 WHERE id = $1")
                            .bind(b.bid.id.to_string())
                            .bind(i64::from(now))
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from)?;
                    }
                }
                let result = SpotCleared { cleared, made, noticed, previous, stopping, won, holding };
                apply_in(&mut tx, &changes(&result), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Some(result))
            }

            async fn bid_reservations(&self, bid: Uuid) -> Result<Vec<Reservation>, StoreError> {
                let records: Vec<String> = sqlx::query_scalar("SELECT r.record FROM spot_allocations a JOIN reservations r ON r.id = a.reservation WHERE a.bid = $1 ORDER BY r.starts_at_ms, r.id")
                    .bind(bid.to_string())
                    .fetch_all(self.reader())
                    .await?;
                records.iter().map(|r| parse_json(r, "reservation")).collect()
            }

            async fn bid_of(&self, reservation: Uuid) -> Result<Option<StoredBid>, StoreError> {
                sqlx::query("SELECT b.record, b.cancelled_at_ms, b.allocated FROM spot_allocations a JOIN spot_bids b ON b.id = a.bid WHERE a.reservation = $1")
                    .bind(reservation.to_string())
                    .fetch_optional(self.reader())
                    .await?
                    .as_ref()
                    .map(stored_bid)
                    .transpose()
            }

            async fn spot_prices(&self, listing: &str, from_ms: UnixMillis, to_ms: UnixMillis) -> Result<Vec<(UnixMillis, u64)>, StoreError> {
                let mut out: Vec<(UnixMillis, i64)> = sqlx::query_as("SELECT at_ms, price FROM price_history WHERE listing = $1 AND kind = 'spot' AND at_ms < $2 ORDER BY at_ms DESC LIMIT 1")
                    .bind(listing)
                    .bind(from_ms)
                    .fetch_all(self.reader())
                    .await?;
                out.extend(
                    sqlx::query_as::<_, (i64, i64)>("SELECT at_ms, price FROM price_history WHERE listing = $1 AND kind = 'spot' AND at_ms >= $2 AND at_ms < $3 ORDER BY at_ms")
                        .bind(listing)
                        .bind(from_ms)
                        .bind(to_ms)
                        .fetch_all(self.reader())
                        .await?,
                );
                Ok(out.into_iter().map(|(at, p)| (at, p.max(0) as u64)).collect())
            }
        }

        fn stored_auction(row: &$row) -> Result<StoredAuction, StoreError> {
            let record: String = row.try_get("record")?;
            let reservation: Option<String> = row.try_get("reservation")?;
            Ok(StoredAuction {
                auction: parse_json(&record, "auction")?,
                listing: row.try_get("listing")?,
                provider: row.try_get("provider")?,
                term_ms: row.try_get("term_ms")?,
                reservation: reservation.as_deref().map(parse_uuid).transpose()?,
                closed_at_ms: row.try_get("closed_at_ms")?,
                created_at_ms: row.try_get("created_at_ms")?,
            })
        }

        const AUCTION_COLUMNS: &str = "id, listing, provider, record, term_ms, closed_at_ms, reservation, created_at_ms";

        async fn auction_in(conn: &mut $conn, id: Uuid) -> Result<Option<StoredAuction>, StoreError> {
            sqlx::query(&format!("SELECT {AUCTION_COLUMNS} FROM auctions WHERE id = $1"))
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await?
                .as_ref()
                .map(stored_auction)
                .transpose()
        }

        /// Writes an auction that was open when read: `false` when it was closed
        /// meanwhile (nothing written).
        async fn put_open_auction(conn: &mut $conn, a: &StoredAuction) -> Result<bool, StoreError> {
            Ok(sqlx::query("UPDATE auctions SET record = $2, due_at_ms = $3, closed_at_ms = $4, reservation = $5 WHERE id = $1 AND closed_at_ms IS NULL")
                .bind(a.auction.id.to_string())
                .bind(json_text(&a.auction))
                .bind(a.auction.next_deadline())
                .bind(a.closed_at_ms)
                .bind(a.reservation.map(|r| r.to_string()))
                .execute(&mut *conn)
                .await?
                .rows_affected() > 0)
        }

        /// Closes `a` if it is due at `now_ms`: its outcome, and the winner's
        /// reservation of the lowest free host (its id is the auction's).
        async fn close_in(conn: &mut $conn, a: &mut StoredAuction, inputs: &AuctionInputs<'_>, now_ms: UnixMillis) -> Result<Option<(surplus_market::auction::Outcome, Option<Reservation>, Option<MarketRefusal>)>, StoreError> {
            let Some(outcome) = a.auction.poll_close(now_ms) else { return Ok(None) };
            a.closed_at_ms = Some(now_ms);
            let (mut made, mut unfilled) = (None, None);
            if let Some(w) = &outcome.winner {
                let mut book = read_live_book(&mut *conn, &a.listing, &[a.auction.id]).await?;
                let request = ReservationRequest {
                    ids: vec![a.auction.id],
                    listing: a.listing.clone(),
                    holder: w.bidder.clone(),
                    mode: surplus_market::resell::PricingMode::Auction,
                    interruptibility: inputs.interruptibility,
                    goal: inputs.goal,
                    price: w.price,
                    upfront: 0,
                    term_ms: a.term_ms,
                };
                match book.handle_reserve(now_ms, request, inputs.available) {
                    Ok(mut rs) => {
                        let r = rs.remove(0);
                        put_reservation(&mut *conn, &r, true, now_ms).await?;
                        a.reservation = Some(r.id);
                        made = Some(r);
                    }
                    Err(refusal) => unfilled = Some(refusal),
                }
            }
            Ok(Some((outcome, made, unfilled)))
        }

        #[async_trait]
        impl AuctionStore for $store {
            async fn create_auction(&self, a: &StoredAuction) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO auctions (id, listing, provider, record, term_ms, due_at_ms, closed_at_ms, reservation, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL, $7)")
                    .bind(a.auction.id.to_string())
                    .bind(&a.listing)
                    .bind(&a.provider)
                    .bind(json_text(&a.auction))
                    .bind(a.term_ms)
                    .bind(a.auction.next_deadline())
                    .bind(a.created_at_ms)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn auction(&self, id: Uuid) -> Result<Option<StoredAuction>, StoreError> {
                let mut conn = self.reader().acquire().await?;
                auction_in(&mut conn, id).await
            }

            async fn auctions(&self, listing: Option<&str>, open: bool, limit: u32) -> Result<Vec<StoredAuction>, StoreError> {
                let rows = sqlx::query(&format!("SELECT {AUCTION_COLUMNS} FROM auctions WHERE ($1 IS NULL OR listing = $1) AND ($2 = 0 OR closed_at_ms IS NULL) ORDER BY created_at_ms DESC, id DESC LIMIT $3"))
                    .bind(listing)
                    .bind(i64::from(open))
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?;
                rows.iter().map(stored_auction).collect()
            }

            async fn bid_auction(&self, id: Uuid, bid: surplus_market::auction::Bid, inputs: AuctionInputs<'_>, changes: DecisionChanges<'_, AuctionStep>, now_ms: UnixMillis) -> Result<Result<AuctionStep, MarketRefusal>, PostError> {
                let unknown = || MarketRefusal { rule: "unknown_auction", message: format!("auction {id} not found") };
                let listing: Option<String> = sqlx::query_scalar("SELECT listing FROM auctions WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await
                    .map_err(StoreError::from)?;
                let Some(listing) = listing else { return Ok(Err(unknown())) };
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(&listing)).await.map_err(StoreError::from)?;
                let Some(mut a) = auction_in(&mut tx, id).await? else { return Ok(Err(unknown())) };
                let accepted = match a.auction.handle_bid(now_ms, bid) {
                    Ok(accepted) => accepted,
                    Err(refusal) => return Ok(Err(refusal)),
                };
                let closed = match accepted.ends {
                    true => close_in(&mut tx, &mut a, &inputs, now_ms).await?,
                    false => None,
                };
                if !put_open_auction(&mut tx, &a).await? {
                    return Ok(Err(MarketRefusal { rule: "ended", message: format!("auction {id} closed") }));
                }
                let (closed, made, unfilled) = match closed {
                    Some((o, m, u)) => (Some(o), m, u),
                    None => (None, None, None),
                };
                let step = AuctionStep { auction: a, accepted: Some(accepted.bid), superseded: accepted.superseded, closed, made, unfilled };
                apply_in(&mut tx, &changes(&step), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Ok(step))
            }

            async fn due_auctions(&self, now_ms: UnixMillis) -> Result<Vec<(String, Uuid)>, StoreError> {
                let rows: Vec<(String, String)> = sqlx::query_as("SELECT listing, id FROM auctions WHERE due_at_ms <= $1 AND closed_at_ms IS NULL ORDER BY due_at_ms, id")
                    .bind(now_ms)
                    .fetch_all(self.reader())
                    .await?;
                rows.into_iter().map(|(l, id)| Ok((l, parse_uuid(&id)?))).collect()
            }

            async fn close_auction(&self, id: Uuid, inputs: AuctionInputs<'_>, changes: DecisionChanges<'_, AuctionStep>, now_ms: UnixMillis) -> Result<Option<AuctionStep>, PostError> {
                let listing: Option<String> = sqlx::query_scalar("SELECT listing FROM auctions WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(self.reader())
                    .await
                    .map_err(StoreError::from)?;
                let Some(listing) = listing else { return Ok(None) };
                let mut tx = self.write_tx().await.map_err(StoreError::from)?;
                $store::lock(&mut tx, Lock::Listing(&listing)).await.map_err(StoreError::from)?;
                let Some(mut a) = auction_in(&mut tx, id).await? else { return Ok(None) };
                if a.closed_at_ms.is_some() {
                    return Ok(None);
                }
                let Some((outcome, made, unfilled)) = close_in(&mut tx, &mut a, &inputs, now_ms).await? else { return Ok(None) };
                // Closed only if it was not: of two replicas the second writes nothing.
                if !put_open_auction(&mut tx, &a).await? {
                    return Ok(None);
                }
                let step = AuctionStep { auction: a, accepted: None, superseded: None, closed: Some(outcome), made, unfilled };
                apply_in(&mut tx, &changes(&step), now_ms).await?;
                tx.commit().await.map_err(StoreError::from)?;
                Ok(Some(step))
            }
        }

        #[async_trait]
        impl PriceHistoryStore for $store {
            async fn record_price(&self, p: &PricePoint) -> Result<bool, StoreError> {
                let mut conn = self.writer().acquire().await?;
                record_price_in(&mut conn, p).await
            }

            async fn price_history(&self, q: &HistoryQuery, limit: u32) -> Result<Vec<PricePoint>, StoreError> {
                // Every filter is a bound parameter; an absent one matches everything.
                let rows = sqlx::query("SELECT id, kind, listing, provider, zone, category, currency, price, at_ms FROM price_history WHERE ($1 IS NULL OR kind = $1) AND ($2 IS NULL OR category = $2) AND ($3 IS NULL OR provider = $3) AND ($4 IS NULL OR zone = $4) AND ($5 IS NULL OR currency = $5) AND ($6 IS NULL OR at_ms >= $6) AND ($7 IS NULL OR at_ms < $7) ORDER BY at_ms, id LIMIT $8")
                    .bind(q.kind.map(|k| surplus_market::records::name_of(&k)))
                    .bind(q.category.as_deref())
                    .bind(q.provider.as_deref())
                    .bind(q.zone.as_deref())
                    .bind(q.currency.as_deref())
                    .bind(q.from_ms)
                    .bind(q.to_ms)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?;
                rows.iter()
                    .map(|r| {
                        let kind: String = r.try_get("kind")?;
                        let price: i64 = r.try_get("price")?;
                        Ok(PricePoint {
                            id: r.try_get("id")?,
                            kind: surplus_market::records::from_name(&kind)
                                .ok_or_else(|| StoreError::Corrupt(format!("price kind {kind:?}")))?,
                            listing: r.try_get("listing")?,
                            provider: r.try_get("provider")?,
                            zone: r.try_get("zone")?,
                            category: r.try_get("category")?,
                            currency: r.try_get("currency")?,
                            price: u64::try_from(price).map_err(|_| StoreError::Corrupt(format!("price {price}")))?,
                            at_ms: r.try_get("at_ms")?,
                        })
                    })
                    .collect()
            }
        }

        /// A listing's reservations as a book, read on `conn` (inside the writing
        /// transaction, after its lock, for a change).
        /// The part of a listing's book a step decides on: every reservation not
        /// recorded as ended (what can hold a host, expire or be released: an ended
        /// one holds nothing after its end, which is at or before now), and the ones
        /// named by `ids` (a duplicate id, an ended reservation released again),
        /// however old. Ended history stays out, so a step's cost does not grow with it.
        async fn read_live_book(conn: &mut $conn, listing: &str, ids: &[Uuid]) -> Result<Book, StoreError> {
            let mut records: Vec<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE listing = $1 AND ended = 0")
                .bind(listing)
                .fetch_all(&mut *conn)
                .await?;
            for id in ids {
                let named: Option<(String, String, i64)> = sqlx::query_as("SELECT record, listing, ended FROM reservations WHERE id = $1")
                    .bind(id.to_string())
                    .fetch_optional(&mut *conn)
                    .await?;
                // Read above unless it ended or is another listing's (an id is unique
                // across listings: the book then refuses it as a duplicate).
                if let Some((record, of, ended)) = named {
                    if of != listing || ended != 0 {
                        records.push(record);
                    }
                }
            }
            let rows = records
                .iter()
                .map(|r| parse_json::<Reservation>(r, "reservation"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Book::from_rows(rows))
        }

        /// A listing's whole book, history included.
        async fn read_book(conn: &mut $conn, listing: &str) -> Result<Book, StoreError> {
            let records: Vec<String> = sqlx::query_scalar("SELECT record FROM reservations WHERE listing = $1")
                .bind(listing)
                .fetch_all(&mut *conn)
                .await?;
            let rows = records
                .iter()
                .map(|r| parse_json::<Reservation>(r, "reservation"))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Book::from_rows(rows))
        }

        #[async_trait]
        impl NoticeStore for $store {
            async fn set_webhook(&self, recipient: &str, url: Option<&str>, now_ms: UnixMillis) -> Result<(), StoreError> {
                match url {
                    Some(url) => sqlx::query("INSERT INTO webhooks (recipient, url, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (recipient) DO UPDATE SET url = excluded.url, updated_at_ms = excluded.updated_at_ms")
                        .bind(recipient)
                        .bind(url)
                        .bind(now_ms)
                        .execute(self.writer())
                        .await?,
                    None => sqlx::query("DELETE FROM webhooks WHERE recipient = $1")
                        .bind(recipient)
                        .execute(self.writer())
                        .await?,
                };
                Ok(())
            }

            async fn webhook(&self, recipient: &str) -> Result<Option<String>, StoreError> {
                Ok(sqlx::query_scalar("SELECT url FROM webhooks WHERE recipient = $1")
                    .bind(recipient)
                    .fetch_optional(self.reader())
                    .await?)
            }

            async fn deliverable(&self, now_ms: UnixMillis, max_attempts: u32, per_recipient: u32, limit: u32) -> Result<Vec<Delivery>, StoreError> {
                // The window keeps one recipient's backlog from filling the batch.
                sqlx::query("SELECT key, recipient, kind, body, created_at_ms, delivered_at_ms, attempts, last_error, next_attempt_at_ms, url FROM (SELECT o.key, o.recipient, o.kind, o.body, o.created_at_ms, o.delivered_at_ms, o.attempts, o.last_error, o.next_attempt_at_ms, w.url, ROW_NUMBER() OVER (PARTITION BY o.recipient ORDER BY o.created_at_ms, o.key) AS nth FROM outbox o JOIN webhooks w ON w.recipient = o.recipient WHERE o.delivered_at_ms IS NULL AND o.attempts < $1 AND (o.next_attempt_at_ms IS NULL OR o.next_attempt_at_ms <= $2)) due WHERE nth <= $3 ORDER BY created_at_ms, key LIMIT $4")
                    .bind(i64::from(max_attempts))
                    .bind(now_ms)
                    .bind(i64::from(per_recipient))
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| Ok(Delivery { notice: stored_notice(r)?, url: r.try_get("url")? }))
                    .collect()
            }

            async fn agent_deliverable(&self, now_ms: UnixMillis, max_attempts: u32, limit: u32) -> Result<Vec<StoredNotice>, StoreError> {
                sqlx::query(&format!("{NOTICE_COLUMNS} WHERE recipient LIKE 'agent:%' AND delivered_at_ms IS NULL AND attempts < $1 AND (next_attempt_at_ms IS NULL OR next_attempt_at_ms <= $2) ORDER BY created_at_ms, key LIMIT $3"))
                    .bind(i64::from(max_attempts))
                    .bind(now_ms)
                    .bind(i64::from(limit))
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(stored_notice)
                    .collect()
            }

            async fn postpone_notice(&self, key: &str, until_ms: UnixMillis) -> Result<(), StoreError> {
                sqlx::query("UPDATE outbox SET next_attempt_at_ms = $1 WHERE key = $2 AND delivered_at_ms IS NULL")
                    .bind(until_ms)
                    .bind(key)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn record_attempt(
                &self,
                key: &str,
                attempt: &DeliveryAttempt,
                delivered: bool,
                next_at_ms: Option<UnixMillis>,
            ) -> Result<(), StoreError> {
                let mut tx = self.write_tx().await?;
                sqlx::query("INSERT INTO outbox_attempts (key, attempt, at_ms, outcome) VALUES ($1, $2, $3, $4) ON CONFLICT (key, attempt) DO NOTHING")
                    .bind(key)
                    .bind(i64::from(attempt.attempt))
                    .bind(attempt.at_ms)
                    .bind(&attempt.outcome)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE outbox SET attempts = $1, delivered_at_ms = $2, last_error = $3, next_attempt_at_ms = $4 WHERE key = $5")
                    .bind(i64::from(attempt.attempt))
                    .bind(delivered.then_some(attempt.at_ms))
                    .bind((!delivered).then_some(attempt.outcome.as_str()))
                    .bind(next_at_ms)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn attempts(&self, key: &str) -> Result<Vec<DeliveryAttempt>, StoreError> {
                sqlx::query("SELECT attempt, at_ms, outcome FROM outbox_attempts WHERE key = $1 ORDER BY attempt")
                    .bind(key)
                    .fetch_all(self.reader())
                    .await?
                    .iter()
                    .map(|r| {
                        let n: i64 = r.try_get("attempt")?;
                        Ok(DeliveryAttempt {
                            attempt: u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("attempt {n}")))?,
                            at_ms: r.try_get("at_ms")?,
                            outcome: r.try_get("outcome")?,
                        })
                    })
                    .collect()
            }
        }

        fn stored_notice(r: &$row) -> Result<StoredNotice, StoreError> {
            let attempts: i64 = r.try_get("attempts")?;
            Ok(StoredNotice {
                notice: Notice {
                    key: r.try_get("key")?,
                    recipient: r.try_get("recipient")?,
                    kind: r.try_get("kind")?,
                    body: parse_json(r.try_get("body")?, "notice body")?,
                },
                created_at_ms: r.try_get("created_at_ms")?,
                delivered_at_ms: r.try_get("delivered_at_ms")?,
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                last_error: r.try_get("last_error")?,
                next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
            })
        }

        fn resell_row(r: &$row) -> Result<ResellRow, StoreError> {
            Ok(ResellRow {
                id: parse_uuid(r.try_get("id")?)?,
                provider: r.try_get("provider")?,
                document: parse_json(r.try_get("document")?, "resell request")?,
                pipeline: parse_json(r.try_get("pipeline")?, "pipeline")?,
                version: r.try_get("version")?,
                created_at_ms: r.try_get("created_at_ms")?,
                updated_at_ms: r.try_get("updated_at_ms")?,
            })
        }
    };
}

pub(crate) use sql_stores;
