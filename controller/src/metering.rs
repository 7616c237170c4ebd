//! Usage ingest, metering periods and billing runs: the controller's side of
//! metering, between the wire and the store. The decisions (deltas, rating, the
//! ledger's rules) are the pure functions of `surplus_protocol::usage`, [`billing`]
//! and [`ledger`]; this module only fetches their inputs and stores their outputs.
//!
//! [`billing`]: crate::billing
//! [`ledger`]: crate::ledger

use serde::{Deserialize, Serialize};
use surplus_protocol::Message;
use surplus_protocol::usage::{MeteringAck, MeteringPeriods, UsageAck, UsageBatch, meters};
use uuid::Uuid;

use crate::billing::{self, Period, PeriodUsage};
use crate::ledger::Applied;
use crate::service::Controller;
use crate::store::{IngestBatch, IngestOutcome, InvoiceLine, PostError, StoreError};

/// Most batches one group commit takes.
const GROUP_MAX_BATCHES: usize = 256;
/// Records after which a group commit takes no further batch: a commit holds the one
/// SQLite writer for tens of µs per record, and other writes (control, sessions) wait.
const GROUP_MAX_RECORDS: usize = 1000;
/// Records queued for commit beyond which new batches are refused as busy (about a
/// second of ingest on the reference host): past it, ingest would only grow a queue
/// whose wait every other write, and the agents' acknowledgements, share. The agents
/// keep the records in their spools and send them again after a pause.
const QUEUE_MAX_RECORDS: usize = 30_000;

/// Why a batch was not committed.
enum NotCommitted {
    /// The queue is full; try again later.
    Busy,
    /// The commit failed.
    Failed(String),
}

struct Queued {
    agent_id: Uuid,
    batch: UsageBatch,
    done: tokio::sync::oneshot::Sender<Result<IngestOutcome, NotCommitted>>,
}

/// Usage batches waiting to be committed, and the turn to commit them.
///
/// A group commit without a task of its own: every batch joins the queue, then waits
/// for the turn; whoever gets it commits what is queued (up to [`GROUP_MAX_BATCHES`]
/// and [`GROUP_MAX_RECORDS`]) in one transaction and answers every batch in it. Under
/// load, batches that arrive while one commit runs share the next one, so a single
/// fsync covers many agents; alone, a batch commits at once. Past
/// [`QUEUE_MAX_RECORDS`] waiting, batches are refused as busy at once.
#[derive(Default)]
pub(crate) struct UsageQueue {
    queued: std::sync::Mutex<Vec<Queued>>,
    /// Records in `queued` and in the commit running now.
    records: std::sync::atomic::AtomicUsize,
    turn: tokio::sync::Mutex<()>,
}

struct Release<'a>(&'a std::sync::atomic::AtomicUsize, usize);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0
            .fetch_sub(self.1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::fmt::Debug for UsageQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.queued.lock().map(|q| q.len()).unwrap_or(0);
        f.debug_struct("UsageQueue")
            .field("queued", &queued)
            .finish()
    }
}

/// A billing run's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BillingRun {
    /// The period.
    pub from_ms: i64,
    /// End of the period (exclusive).
    pub to_ms: i64,
    /// Instances whose charges were posted now.
    pub posted: u32,
    /// Instances already billed for this period (a repeated run).
    pub already_billed: u32,
    /// Instances with nothing to charge.
    pub nothing_due: u32,
    /// Instances whose charges could not be posted, with the reason.
    pub failed: Vec<BillingFailure>,
    /// Total charged now, per currency.
    pub charged: std::collections::BTreeMap<String, i64>,
}

/// An instance a billing run could not post.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BillingFailure {
    /// The instance.
    pub instance_id: String,
    /// Its client.
    pub client: String,
    /// Why.
    pub reason: String,
}

/// Why a billing run was refused.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The period is malformed.
    #[error("{0}")]
    Period(String),
    /// The period overlaps one billed before.
    #[error("period {from_ms}..{to_ms} overlaps a period billed before; bill on one grid")]
    Overlap {
        /// Start.
        from_ms: i64,
        /// End.
        to_ms: i64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Controller {
    /// Commits a batch and answers only once it is committed.
    pub async fn ingest_usage(&self, agent_id: Uuid, batch: UsageBatch) -> Message {
        let spool = batch.spool.clone();
        let count = batch.records.len() as u64;
        match self.commit_grouped(agent_id, batch).await {
            Ok(outcome) => {
                let count = |result: &'static str, n: u64| {
                    self.metrics
                        .usage_records
                        .get_or_create(&vec![("result", result)])
                        .inc_by(n);
                };
                count("stored", u64::from(outcome.stored));
                count("duplicate", u64::from(outcome.duplicates));
                count("rejected", outcome.rejected.len() as u64);
                for (epoch, seq, reason) in &outcome.rejected {
                    tracing::warn!(%agent_id, epoch, seq, reason = %reason, "usage record refused and kept aside");
                }
                if spool.merged_records > 0 || spool.discarded_records > 0 {
                    tracing::warn!(%agent_id, merged = spool.merged_records, discarded = spool.discarded_records,
                        pending = spool.pending_records, "agent's usage spool merged or discarded records");
                }
                Message::UsageAck(UsageAck {
                    stored: outcome.stored,
                    duplicates: outcome.duplicates,
                    rejected: outcome.rejected.len() as u32,
                })
            }
            Err(NotCommitted::Busy) => {
                self.metrics
                    .usage_records
                    .get_or_create(&vec![("result", "busy")])
                    .inc_by(count);
                Message::error(
                    surplus_protocol::ErrorCode::Busy,
                    "usage ingest is busy; send the batch again after a pause",
                )
            }
            Err(NotCommitted::Failed(e)) => {
                tracing::error!(%agent_id, error = %e, "usage batch not committed");
                Message::error(
                    surplus_protocol::ErrorCode::Internal,
                    "usage batch not committed; send it again",
                )
            }
        }
    }

    /// Queues `batch` for the next group commit and returns its outcome once that
    /// commit is done (see [`UsageQueue`]).
    async fn commit_grouped(
        &self,
        agent_id: Uuid,
        batch: UsageBatch,
    ) -> Result<IngestOutcome, NotCommitted> {
        use std::sync::atomic::Ordering;
        let q = &self.usage_queue;
        let size = batch.records.len();
        let before = q.records.fetch_add(size, Ordering::SeqCst);
        if before > 0 && before + size > QUEUE_MAX_RECORDS {
            q.records.fetch_sub(size, Ordering::SeqCst);
            return Err(NotCommitted::Busy);
        }
        let (done, mut outcome) = tokio::sync::oneshot::channel();
        q.queued.lock().expect("usage queue poisoned").push(Queued {
            agent_id,
            batch,
            done,
        });
        loop {
            let _turn = q.turn.lock().await;
            // A commit that ran while we waited for the turn may have taken our batch.
            match outcome.try_recv() {
                Ok(result) => return result,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(NotCommitted::Failed(
                        "the commit of this batch was abandoned".into(),
                    ));
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            let group: Vec<Queued> = {
                let mut queued = q.queued.lock().expect("usage queue poisoned");
                let (mut n, mut records) = (0, 0);
                while n < queued.len().min(GROUP_MAX_BATCHES)
                    && (n == 0 || records + queued[n].batch.records.len() <= GROUP_MAX_RECORDS)
                {
                    records += queued[n].batch.records.len();
                    n += 1;
                }
                queued.drain(..n).collect()
            };
            // Leaves the count when the commit is over, however it ends (this future
            // may be dropped mid-commit at shutdown).
            let release = Release(
                &q.records,
                group.iter().map(|g| g.batch.records.len()).sum(),
            );
            let batches: Vec<IngestBatch<'_>> = group
                .iter()
                .map(|g| IngestBatch {
                    agent_id: g.agent_id,
                    records: &g.batch.records,
                    spool: &g.batch.spool,
                })
                .collect();
            let committed = self
                .store
                .ingest_usage_batches(&batches, self.clock.now_ms())
                .await;
            self.metrics.usage_commits.inc();
            drop(release);
            match committed {
                Ok(outcomes) => {
                    for (g, o) in group.into_iter().zip(outcomes) {
                        let _ = g.done.send(Ok(o));
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for g in group {
                        let _ = g.done.send(Err(NotCommitted::Failed(text.clone())));
                    }
                }
            }
        }
    }

    /// Stores new periods for an agent and sends them if it is connected. Returns the
    /// agent's answer, or `None` when it is offline (it gets them when it connects).
    pub async fn set_metering(
        &self,
        agent_id: Uuid,
        periods: MeteringPeriods,
    ) -> Result<Option<MeteringAck>, String> {
        periods.validate()?;
        self.store
            .set_metering(agent_id, &periods, self.clock.now_ms())
            .await
            .map_err(|e| e.to_string())?;
        self.send_metering(agent_id, periods).await
    }

    /// Sends periods to a connected agent.
    pub async fn send_metering(
        &self,
        agent_id: Uuid,
        periods: MeteringPeriods,
    ) -> Result<Option<MeteringAck>, String> {
        let Some(conn) = self.registry.connection(agent_id) else {
            return Ok(None);
        };
        match surplus_protocol::quic::request(
            &conn,
            &Message::SetMetering(periods),
            self.config.max_frame_size,
            self.config.control_timeout,
        )
        .await
        {
            Ok(Message::MeteringAck(ack)) => Ok(Some(ack)),
            Ok(Message::Error(reply)) => Err(format!("agent refused: {}", reply.message)),
            Ok(other) => Err(format!("agent answered {}", other.kind())),
            Err(e) => Err(format!("agent not reached: {e}")),
        }
    }

    /// Rates every instance with a price plan over `period` and posts the charges:
    /// one posting per instance and period, keyed so that a repeated run posts nothing
    /// twice.
    pub async fn billing_run(&self, period: Period) -> Result<BillingRun, BillingError> {
        period.validate().map_err(BillingError::Period)?;
        let now = self.clock.now_ms();
        if !self
            .store
            .record_billing_run(period.from_ms, period.to_ms, now)
            .await?
        {
            return Err(BillingError::Overlap {
                from_ms: period.from_ms,
                to_ms: period.to_ms,
            });
        }
        let bps = self.config.commission_bps.min(10_000);
        let mut run = BillingRun {
            from_ms: period.from_ms,
            to_ms: period.to_ms,
            ..Default::default()
        };
        for b in self.store.billables(period.to_ms).await? {
            let id = b.instance.record.id.clone();
            let totals = self
                .store
                .usage_totals(&id, period.from_ms, period.to_ms)
                .await?;
            let get = |m: &str| totals.get(m).copied().unwrap_or(0).max(0) as u64;
            let usage = PeriodUsage {
                running_ms: get(meters::STATE_MS_RUNNING),
                cpu_ns: get(meters::CPU_NS),
                memory_byte_ms: get(meters::MEMORY_BYTE_MS),
                net_bytes: get(meters::NET_RX_BYTES) + get(meters::NET_TX_BYTES),
                disk_bytes: get(meters::DISK_READ_BYTES) + get(meters::DISK_WRITE_BYTES),
                millicpus: b.instance.record.spec.limits.millicpus,
            };
            let upfront_due = (period.from_ms..period.to_ms).contains(&b.attached_at_ms);
            let charges = billing::rate(&b.plan, &usage, upfront_due);
            let total: i64 = charges.iter().map(|c| c.amount).sum();
            if total == 0 {
                run.nothing_due += 1;
                continue;
            }
            let client = b.instance.account.clone();
            let key = period.key(&id);
            let posting =
                billing::bill_posting(&key, &client, &b.provider, &b.plan.currency, total, bps);
            let invoice_id = period.invoice_id(&client);
            let lines: Vec<InvoiceLine> = charges
                .into_iter()
                .map(|charge| InvoiceLine {
                    invoice_id: invoice_id.clone(),
                    client: client.clone(),
                    provider: b.provider.clone(),
                    from_ms: period.from_ms,
                    to_ms: period.to_ms,
                    instance_id: id.clone(),
                    commission: billing::commission(charge.amount, bps),
                    charge,
                    currency: b.plan.currency.clone(),
                    posting_key: key.clone(),
                })
                .collect();
            match self.store.post(&posting, &lines, now).await {
                Ok(Applied::Posted) => {
                    run.posted += 1;
                    *run.charged.entry(b.plan.currency.clone()).or_default() += total;
                }
                Ok(Applied::Duplicate) => run.already_billed += 1,
                // The usage changed since the earlier run (late records): the posting
                // under this key is final; the difference is left for review.
                Err(PostError::Ledger(crate::ledger::LedgerError::KeyReused(_))) => {
                    run.already_billed += 1;
                    tracing::warn!(instance = %id, "usage of a billed period changed after its billing run; not billed again");
                }
                Err(PostError::Ledger(e)) => run.failed.push(BillingFailure {
                    instance_id: id,
                    client,
                    reason: e.to_string(),
                }),
                Err(PostError::Store(e)) => return Err(e.into()),
            }
        }
        tracing::info!(
            from_ms = period.from_ms,
            to_ms = period.to_ms,
            posted = run.posted,
            failed = run.failed.len(),
            "billing run"
        );
        Ok(run)
    }
}
