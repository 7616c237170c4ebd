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
use crate::store::{InvoiceLine, PostError, StoreError};

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
        let now = self.clock.now_ms();
        match self.store.ingest_usage(agent_id, &batch.records, now).await {
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
                if batch.spool.merged_records > 0 || batch.spool.discarded_records > 0 {
                    tracing::warn!(%agent_id, merged = batch.spool.merged_records, discarded = batch.spool.discarded_records,
                        pending = batch.spool.pending_records, "agent's usage spool merged or discarded records");
                }
                if let Err(e) = self
                    .store
                    .set_metering(agent_id, None, Some(&batch.spool), now)
                    .await
                {
                    tracing::warn!(%agent_id, error = %e, "spool state not stored");
                }
                Message::UsageAck(UsageAck {
                    stored: outcome.stored,
                    duplicates: outcome.duplicates,
                    rejected: outcome.rejected.len() as u32,
                })
            }
            Err(e) => {
                tracing::error!(%agent_id, error = %e, "usage batch not committed");
                Message::error(
                    surplus_protocol::ErrorCode::Internal,
                    "usage batch not committed; send it again",
                )
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
            .set_metering(agent_id, Some(&periods), None, self.clock.now_ms())
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
