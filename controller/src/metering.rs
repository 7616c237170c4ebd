//! Usage ingest, metering periods and billing runs: the controller's side of
//! metering, between the wire and the store. The decisions (deltas, rating, the
//! ledger's rules) are the pure functions of `surplus_protocol::usage`, [`billing`]
//! and [`ledger`]; this module only fetches their inputs and stores their outputs.
//!
//! [`billing`]: crate::billing
//! [`ledger`]: crate::ledger

use std::sync::Arc;

use surplus_api::billing::{Adjustment, BillingFailure, BillingRun, WaitingFor};
use surplus_protocol::Message;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::usage::{MeteringAck, MeteringPeriods, UsageAck, UsageBatch, meters};
use uuid::Uuid;

use crate::app::App;
use crate::billing::{self, Period, PeriodUsage};
use crate::ledger::Applied;
use crate::link::LinkError;
use crate::store::{Billable, IngestBatch, IngestOutcome, InvoiceLine, PostError, StoreError};

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

/// Usage batches waiting to be committed, and the turns to commit them.
///
/// A group commit without a task of its own: every batch joins the queue of its
/// agent's lane, then waits for that lane's turn; whoever gets it commits what the lane
/// has queued (up to [`GROUP_MAX_BATCHES`] and [`GROUP_MAX_RECORDS`]) in one
/// transaction and answers every batch in it. Under load, batches that arrive while
/// one commit runs share the next one, so a single fsync covers many agents; alone, a
/// batch commits at once. Past [`QUEUE_MAX_RECORDS`] waiting in all lanes, batches
/// are refused as busy at once.
///
/// The store says how many lanes commit at once ([`crate::store::UsageStore::ingest_lanes`]): one
/// on SQLite, whose one writer would serialise them anyway; several on PostgreSQL,
/// where a group commit spends most of its time in round trips to the server and
/// others can run meanwhile. An agent always uses the same lane, so its batches
/// commit in the order they arrived.
struct UsageQueue {
    lanes: Vec<Lane>,
    /// Records queued in every lane and in the commits running now.
    records: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Lane {
    queued: std::sync::Mutex<Vec<Queued>>,
    turn: tokio::sync::Mutex<()>,
}

impl UsageQueue {
    fn new(lanes: usize) -> Self {
        Self {
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            records: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn lane(&self, agent_id: Uuid) -> &Lane {
        &self.lanes[(agent_id.as_u128() % self.lanes.len() as u128) as usize]
    }
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
        f.debug_struct("UsageQueue")
            .field("lanes", &self.lanes.len())
            .field("records", &self.records)
            .finish()
    }
}

/// Why new metering periods were not set.
#[derive(Debug, thiserror::Error)]
pub enum SetMeteringError {
    /// The periods are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed; nothing was sent.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored, but the connected agent was not told (it is told when it reconnects).
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// Why a billing run was refused.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The period is malformed or not closed yet.
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
    /// Hosts' usage of the period has not arrived and the grace has not passed.
    #[error(
        "waiting for the usage of {} agent(s) up to {to_ms}; run again once it arrived or after {retry_after_ms}",
        waiting.len()
    )]
    Waiting {
        /// The end of the period.
        to_ms: i64,
        /// Who.
        waiting: Vec<WaitingFor>,
        /// When the grace ends and the period is billed with what arrived.
        retry_after_ms: i64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What settling one instance's period did.
enum Settled {
    Posted(i64),
    Adjusted(i64),
    Unchanged,
    NothingDue,
    Failed(String),
}

/// Usage ingest, metering periods and billing runs.
#[derive(Debug)]
pub struct Metering {
    app: Arc<App>,
    /// Usage batches waiting for the next group commit.
    usage_queue: UsageQueue,
    /// One billing run at a time: two runs rating the same late usage would each post
    /// its difference.
    billing: tokio::sync::Mutex<()>,
}

impl Metering {
    pub(crate) fn new(app: Arc<App>) -> Self {
        Self {
            usage_queue: UsageQueue::new(app.store.ingest_lanes()),
            app,
            billing: tokio::sync::Mutex::default(),
        }
    }

    /// Commits a batch and answers only once it is committed.
    pub async fn ingest(&self, agent_id: Uuid, batch: UsageBatch) -> Message {
        let spool = batch.spool.clone();
        let count = batch.records.len() as u64;
        match self.commit_grouped(agent_id, batch).await {
            Ok(outcome) => {
                let count = |result: &'static str, n: u64| {
                    self.app
                        .metrics
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
                self.app
                    .metrics
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
        let lane = q.lane(agent_id);
        lane.queued
            .lock()
            .expect("usage queue poisoned")
            .push(Queued {
                agent_id,
                batch,
                done,
            });
        loop {
            let _turn = lane.turn.lock().await;
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
                let mut queued = lane.queued.lock().expect("usage queue poisoned");
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
                .app
                .store
                .ingest_usage_batches(&batches, self.app.clock.now_ms())
                .await;
            self.app.metrics.usage_commits.inc();
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
    ) -> Result<Option<MeteringAck>, SetMeteringError> {
        periods.validate().map_err(SetMeteringError::Invalid)?;
        self.app
            .store
            .set_metering(agent_id, &periods, self.app.clock.now_ms())
            .await?;
        Ok(self.send_metering(agent_id, periods).await?)
    }

    /// Sends periods to an agent: its answer, or `None` when it is not connected.
    pub async fn send_metering(
        &self,
        agent_id: Uuid,
        periods: MeteringPeriods,
    ) -> Result<Option<MeteringAck>, LinkError> {
        let set = Message::SetMetering(periods);
        match self
            .app
            .link
            .call(agent_id, &set, self.app.config.control_timeout)
            .await
        {
            Ok(Message::MeteringAck(ack)) => Ok(Some(ack)),
            Ok(other) => Err(LinkError::unexpected(agent_id, "metering periods", &other)),
            Err(LinkError::Offline { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Rates every instance with a price plan over `period` and posts the charges:
    /// one posting per instance and period, keyed so that a repeated run posts nothing
    /// twice. The period must be closed whole hours in the past, and the run waits
    /// (refused with the agents it waits for) until the hosts' usage of it has arrived
    /// or `billing_grace` has passed. Usage that arrived after an earlier run rated its
    /// period is billed now as an adjustment: the difference to what was billed.
    pub async fn billing_run(&self, period: Period) -> Result<BillingRun, BillingError> {
        let _one_at_a_time = self.billing.lock().await;
        let now = self.app.clock.now_ms();
        period.validate(now).map_err(BillingError::Period)?;
        let billables: Vec<Billable> = self
            .app
            .store
            .billables(period.to_ms)
            .await?
            .into_iter()
            .filter(|b| alive_in(b, &period))
            .collect();
        let grace = i64::try_from(self.app.config.billing_grace.as_millis()).unwrap_or(i64::MAX);
        let retry_after_ms = period.to_ms.saturating_add(grace);
        if now < retry_after_ms {
            let mut waiting = Vec::new();
            let mut agents: Vec<Uuid> = billables.iter().map(|b| b.instance.agent_id).collect();
            agents.sort();
            agents.dedup();
            for agent_id in agents {
                let revoked = self
                    .app
                    .store
                    .agent(agent_id)
                    .await?
                    .is_none_or(|a| a.status == crate::store::AgentStatus::Revoked);
                let through = self.app.store.usage_through(agent_id).await?;
                if !revoked && through.is_none_or(|t| t < period.to_ms) {
                    waiting.push(WaitingFor {
                        agent_id,
                        usage_through_ms: through,
                    });
                }
            }
            if !waiting.is_empty() {
                return Err(BillingError::Waiting {
                    to_ms: period.to_ms,
                    waiting,
                    retry_after_ms,
                });
            }
        }
        if !self
            .app
            .store
            .record_billing_run(period.from_ms, period.to_ms, now)
            .await?
        {
            return Err(BillingError::Overlap {
                from_ms: period.from_ms,
                to_ms: period.to_ms,
            });
        }
        let mut run = BillingRun {
            from_ms: period.from_ms,
            to_ms: period.to_ms,
            ..Default::default()
        };
        for b in &billables {
            if b.instance.owner_role != crate::store::Role::Client {
                run.not_billed += 1;
                continue;
            }
            match self.settle(b, &period).await? {
                Settled::Posted(total) => {
                    run.posted += 1;
                    *run.charged.entry(b.plan.currency.clone()).or_default() += total;
                }
                Settled::Adjusted(amount) => run.adjustments.push(adjustment(b, &period, amount)),
                Settled::Unchanged => run.already_billed += 1,
                Settled::NothingDue => run.nothing_due += 1,
                Settled::Failed(reason) => run.failed.push(failure(b, reason)),
            }
        }
        self.charge_reservations(&period, now, &mut run).await?;
        // Late usage of periods rated before: records received after their last rating,
        // found with one scan of what arrived since the oldest of those ratings.
        let window =
            i64::try_from(self.app.config.adjustment_window.as_millis()).unwrap_or(i64::MAX);
        let earlier = self
            .app
            .store
            .billed_periods(now.saturating_sub(window), (period.from_ms, period.to_ms))
            .await?;
        if let (Some(oldest), Some(until)) = (
            earlier.iter().map(|p| p.checked_at_ms).min(),
            earlier.iter().map(|p| p.to_ms).max(),
        ) {
            let received = self.app.store.received_since(oldest, until).await?;
            let late = billing::late_periods(&earlier, &received);
            // A period whose late usage could not be posted stays unchecked: the next
            // run tries again.
            let mut retry = std::collections::BTreeSet::new();
            if !late.is_empty() {
                let all = self.app.store.billables(until).await?;
                for (instance_id, (from_ms, to_ms)) in late {
                    let Some(b) = all.iter().find(|b| b.instance.record.id == instance_id) else {
                        continue;
                    };
                    if b.instance.owner_role != crate::store::Role::Client {
                        continue;
                    }
                    let p = Period { from_ms, to_ms };
                    match self.settle(b, &p).await? {
                        Settled::Posted(amount) | Settled::Adjusted(amount) => {
                            run.adjustments.push(adjustment(b, &p, amount))
                        }
                        Settled::Failed(reason) => {
                            retry.insert((from_ms, to_ms));
                            run.failed.push(failure(b, reason))
                        }
                        Settled::Unchanged | Settled::NothingDue => {}
                    }
                }
            }
            for p in &earlier {
                if !retry.contains(&(p.from_ms, p.to_ms)) {
                    self.app.store.mark_checked(p.from_ms, p.to_ms, now).await?;
                }
            }
        }
        tracing::info!(
            from_ms = period.from_ms,
            to_ms = period.to_ms,
            posted = run.posted,
            adjustments = run.adjustments.len(),
            failed = run.failed.len(),
            "billing run"
        );
        Ok(run)
    }

    /// The usage of one instance in `period`, its CPU rated by the limits in force
    /// during each part of it.
    async fn period_usage(&self, b: &Billable, period: &Period) -> Result<PeriodUsage, StoreError> {
        let id = &b.instance.record.id;
        let deltas = self
            .app
            .store
            .counter_deltas(
                id,
                &[
                    meters::STATE_MS_RUNNING,
                    meters::CPU_NS,
                    meters::MEMORY_BYTE_MS,
                    meters::NET_RX_BYTES,
                    meters::NET_TX_BYTES,
                    meters::DISK_READ_BYTES,
                    meters::DISK_WRITE_BYTES,
                ],
                period.from_ms,
                period.to_ms,
            )
            .await?;
        let sum = |m: &str| -> u64 {
            deltas
                .iter()
                .filter(|d| d.meter == m)
                .map(|d| d.delta.max(0) as u64)
                .fold(0u64, u64::saturating_add)
        };
        let spans = |m: &str| -> Vec<billing::Span> {
            deltas
                .iter()
                .filter(|d| d.meter == m)
                .map(|d| billing::Span {
                    start_ms: d.start_ms,
                    end_ms: d.end_ms,
                    delta: d.delta.max(0) as u64,
                })
                .collect()
        };
        let history: Vec<(i64, Option<u32>)> = self
            .app
            .store
            .limits_history(id)
            .await?
            .into_iter()
            .map(|(from, l)| (from, l.millicpus))
            .collect();
        // An instance recorded before limits had a history: its recorded limits.
        let history = if history.is_empty() {
            vec![(
                b.instance.created_at_ms,
                b.instance.record.spec.limits.millicpus,
            )]
        } else {
            history
        };
        let (limited_vcpu_mms, cpu_ns) = billing::cpu_usage(
            &spans(meters::STATE_MS_RUNNING),
            &spans(meters::CPU_NS),
            &history,
        );
        // An instance runs at most the whole period, whatever its agent reports.
        let (running_ms, limited_vcpu_mms) = billing::cap_running(
            sum(meters::STATE_MS_RUNNING),
            limited_vcpu_mms,
            period.to_ms - period.from_ms,
        );
        Ok(PeriodUsage {
            running_ms,
            limited_vcpu_mms,
            cpu_ns,
            memory_byte_ms: sum(meters::MEMORY_BYTE_MS),
            net_bytes: sum(meters::NET_RX_BYTES).saturating_add(sum(meters::NET_TX_BYTES)),
            disk_bytes: sum(meters::DISK_READ_BYTES).saturating_add(sum(meters::DISK_WRITE_BYTES)),
        })
    }

    /// Rates one instance's period and posts what is due: the charges the first time,
    /// then, when late usage changed them, the difference (an adjustment, keyed by the
    /// new charges so that the same usage is never posted twice).
    async fn settle(&self, b: &Billable, period: &Period) -> Result<Settled, StoreError> {
        let id = b.instance.record.id.clone();
        let usage = self.period_usage(b, period).await?;
        // The upfront fee is due in the period the instance first ran, never before.
        let upfront_due = b
            .instance
            .started_at_ms
            .is_some_and(|t| (period.from_ms..period.to_ms).contains(&t));
        let charges = billing::rate(&b.plan, &usage, upfront_due);
        let billed = self
            .app
            .store
            .billed(&id, period.from_ms, period.to_ms)
            .await?;
        let (key, kind, lines): (String, &str, Vec<billing::Charge>) = if billed.is_empty() {
            if charges.is_empty() {
                return Ok(Settled::NothingDue);
            }
            (period.key(&id), "charge", charges)
        } else {
            let diffs = billing::differences(&charges, &billed);
            if diffs.is_empty() {
                return Ok(Settled::Unchanged);
            }
            // Keyed by what was billed before it: the one adjustment that follows that
            // state. A run that raced another from the same state is refused by the
            // ledger (the key is taken), so nothing is posted twice.
            let before: Vec<(&String, i64)> = billed.iter().map(|(m, (a, _))| (m, *a)).collect();
            let digest = surplus_certs::sha256(format!("{before:?}").as_bytes());
            let key = format!(
                "{}:adjust:{}",
                period.key(&id),
                &surplus_certs::hex(&digest)[..16]
            );
            (key, "adjustment", diffs)
        };
        let amount: i64 = lines.iter().map(|c| c.amount).sum();
        // The provider's agreement sets the commission; without one, the default.
        let agreements = self.app.store.agreements(Some(&b.provider)).await?;
        let bps =
            billing::commission_bps_at(&agreements, period.from_ms, self.app.config.commission_bps);
        let client = b.instance.account.clone();
        let posting =
            billing::bill_posting(&key, &client, &b.provider, &b.plan.currency, amount, bps);
        let invoice_id = period.invoice_id(&client);
        let lines: Vec<InvoiceLine> = lines
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
                kind: kind.to_owned(),
            })
            .collect();
        match self
            .app
            .store
            .post(&posting, &lines, self.app.clock.now_ms())
            .await
        {
            Ok(Applied::Posted) if kind == "charge" => Ok(Settled::Posted(amount)),
            Ok(Applied::Posted) => {
                tracing::info!(instance = %id, from_ms = period.from_ms, amount, "late usage billed as an adjustment");
                Ok(Settled::Adjusted(amount))
            }
            Ok(Applied::Duplicate) => Ok(Settled::Unchanged),
            Err(PostError::Ledger(e)) => Ok(Settled::Failed(e.to_string())),
            Err(PostError::Store(e)) => Err(e),
        }
    }
}

impl Metering {
    /// Charges every reservation the host-hours it held in `period`
    /// (`Reservation::charge`): the holder pays the provider, net of the commission of
    /// the provider's agreement, under one key per reservation and period, so a run
    /// repeated over its own period posts nothing twice.
    async fn charge_reservations(
        &self,
        period: &Period,
        now: UnixMillis,
        run: &mut BillingRun,
    ) -> Result<(), StoreError> {
        let mut listings: std::collections::BTreeMap<String, Option<crate::store::Listing>> =
            Default::default();
        for r in self
            .app
            .store
            .reservations_in(period.from_ms, period.to_ms)
            .await?
        {
            // A spot host pays the clearing price in force over each stretch, never
            // more than its bid's maximum.
            let charges = if r.mode == surplus_market::resell::PricingMode::Spot {
                let prices = self
                    .app
                    .store
                    .spot_prices(&r.listing, period.from_ms, period.to_ms)
                    .await?;
                let cap = self.app.store.bid_of(r.id).await?.map(|b| b.bid.max_price);
                r.charges_at(&prices, cap, period.from_ms, period.to_ms, now)
            } else {
                r.charge(period.from_ms, period.to_ms, now)
                    .into_iter()
                    .collect()
            };
            if charges.is_empty() {
                run.nothing_due += 1;
                continue;
            }
            let amount: i64 = charges.iter().map(|c| c.amount).sum();
            if !listings.contains_key(&r.listing) {
                let l = self.app.store.listing(&r.listing).await?;
                listings.insert(r.listing.clone(), l);
            }
            let Some(listing) = listings.get(&r.listing).and_then(Option::as_ref) else {
                run.failed.push(BillingFailure {
                    instance_id: r.id.to_string(),
                    client: r.holder.clone(),
                    reason: format!("listing {} is gone", r.listing),
                });
                continue;
            };
            let agreements = self.app.store.agreements(Some(&listing.provider)).await?;
            let bps = billing::commission_bps_at(
                &agreements,
                period.from_ms,
                self.app.config.commission_bps,
            );
            let key = format!("reservation:{}:{}:{}", r.id, period.from_ms, period.to_ms);
            let mut posting = billing::bill_posting(
                &key,
                &r.holder,
                &listing.provider,
                &listing.currency,
                amount,
                bps,
            );
            posting.kind = "reservation".into();
            posting.memo = format!("reservation {} of {}", r.id, r.holder);
            let lines: Vec<InvoiceLine> = charges
                .into_iter()
                .map(|charge| InvoiceLine {
                    invoice_id: period.invoice_id(&r.holder),
                    client: r.holder.clone(),
                    provider: listing.provider.clone(),
                    from_ms: period.from_ms,
                    to_ms: period.to_ms,
                    instance_id: r.id.to_string(),
                    commission: billing::commission(charge.amount, bps),
                    currency: listing.currency.clone(),
                    posting_key: key.clone(),
                    kind: "charge".into(),
                    charge,
                })
                .collect();
            match self.app.store.post(&posting, &lines, now).await {
                Ok(Applied::Posted) => {
                    run.posted += 1;
                    *run.charged.entry(listing.currency.clone()).or_default() += amount;
                }
                Ok(Applied::Duplicate) => run.already_billed += 1,
                Err(PostError::Ledger(e)) => run.failed.push(BillingFailure {
                    instance_id: r.id.to_string(),
                    client: r.holder.clone(),
                    reason: e.to_string(),
                }),
                Err(PostError::Store(e)) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Whether an instance can have usage in `period`: run before it ends, and not
/// terminated before it began.
fn alive_in(b: &Billable, period: &Period) -> bool {
    let r = &b.instance.record;
    r.state != surplus_protocol::control::InstanceState::Terminated
        || r.state_changed_at_ms >= period.from_ms
}

fn adjustment(b: &Billable, period: &Period, amount: i64) -> Adjustment {
    Adjustment {
        instance_id: b.instance.record.id.clone(),
        client: b.instance.account.clone(),
        from_ms: period.from_ms,
        to_ms: period.to_ms,
        amount,
        currency: b.plan.currency.clone(),
    }
}

fn failure(b: &Billable, reason: String) -> BillingFailure {
    BillingFailure {
        instance_id: b.instance.record.id.clone(),
        client: b.instance.account.clone(),
        reason,
    }
}
