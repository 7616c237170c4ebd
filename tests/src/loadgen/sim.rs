//! One simulated agent: a real enrolled identity, a real mutually authenticated QUIC
//! session (on a socket shared with other simulated agents), heartbeats at the period
//! the controller asks for, the inventory, usage batches with gap-free sequence numbers,
//! and answers to control commands from an in-memory book of instances.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Endpoint, RecvStream, SendStream};
use surplus_agent::config::AgentConfig;
use surplus_agent::identity::Identity;
use surplus_agent::session::Session;
use surplus_protocol::Inventory;
use surplus_protocol::clock::{Clock, SystemClock};
use surplus_protocol::control::{
    Command, ControlFailure, ControlReply, FailureKind, Instance, InstanceState,
};
use surplus_protocol::messages::{ErrorCode, Heartbeat, Message, Pong};
use surplus_protocol::quic;
use surplus_protocol::usage::{
    MeteringAck, Reading, SpoolState, Subject, UsageAck, UsageBatch, UsageRecord, meters,
};
use tokio_util::sync::CancellationToken;

/// Most records in one batch, as a real agent's default `[metering] batch_records`.
const BATCH_RECORDS: usize = 500;

/// Counters and latencies every simulated agent adds to.
#[derive(Default)]
pub struct Stats {
    /// Sessions open now.
    pub connected: AtomicU64,
    /// Sessions opened, reconnections included.
    pub sessions_opened: AtomicU64,
    /// Heartbeats sent and acknowledged.
    pub heartbeats_acked: AtomicU64,
    /// Heartbeat round trips, µs.
    pub heartbeat_us: Mutex<Vec<u32>>,
    /// Inventories sent and acknowledged.
    pub inventories: AtomicU64,
    /// Usage records created.
    pub usage_created: AtomicU64,
    /// Batches acknowledged.
    pub usage_batches: AtomicU64,
    /// Records the controller said it stored for the first time.
    pub usage_stored: AtomicU64,
    /// Records the controller recognised as already stored.
    pub usage_duplicates: AtomicU64,
    /// Records refused.
    pub usage_rejected: AtomicU64,
    /// Batches deliberately sent twice (a lost acknowledgement).
    pub usage_resent_batches: AtomicU64,
    /// Batches sent for the first time, over all agents (picks the ones to resend).
    pub usage_first_sends: AtomicU64,
    /// Batches the controller refused as busy (sent again after a pause).
    pub usage_busy: AtomicU64,
    /// Usage batch round trips (send to commit acknowledgement), µs.
    pub usage_us: Mutex<Vec<u32>>,
    /// Control commands received from the controller.
    pub control_received: AtomicU64,
    /// Control answers written back.
    pub control_answered: AtomicU64,
    /// Failures by kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Counts one failure of `kind`.
    pub fn error(&self, kind: impl Into<String>) {
        *self
            .errors
            .lock()
            .expect("stats poisoned")
            .entry(kind.into())
            .or_default() += 1;
    }

    fn latency(list: &Mutex<Vec<u32>>, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        list.lock().expect("stats poisoned").push(us);
    }
}

/// How the simulated agents behave.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Usage period.
    pub usage_period: Duration,
    /// Records per usage period.
    pub usage_records: usize,
    /// Every n-th batch (counted over all agents) is sent a second time after its
    /// acknowledgement (0: never).
    pub resend_every: u64,
    /// How long a control command takes on the simulated host.
    pub control_delay: Duration,
}

/// What one simulated agent sent, for the exactly-once check.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// The spool epoch of its records.
    pub epoch: u64,
    /// Records created (sequence numbers `0..created`).
    pub created: u64,
    /// Records acknowledged (a prefix of the created ones).
    pub acked: u64,
    /// Final total of its `cpu_busy_ms` counter.
    pub cpu_busy_total: u64,
}

/// One simulated agent.
pub struct SimAgent {
    /// Its enrolled identity.
    pub identity: Identity,
    epoch: u64,
    sent: Mutex<Sent>,
    instances: Mutex<HashMap<String, Instance>>,
}

impl SimAgent {
    /// A simulated agent for an enrolled identity.
    pub fn new(identity: Identity) -> Self {
        let epoch = rand::random::<u64>() >> 1;
        Self {
            identity,
            epoch,
            sent: Mutex::new(Sent {
                epoch,
                created: 0,
                acked: 0,
                cpu_busy_total: 0,
            }),
            instances: Mutex::new(HashMap::new()),
        }
    }

    /// What it sent so far.
    pub fn sent(&self) -> Sent {
        *self.sent.lock().expect("sim poisoned")
    }

    /// The next usage period's records.
    fn records(&self, start_ms: i64, end_ms: i64, count: usize) -> Vec<UsageRecord> {
        if count == 0 {
            return Vec::new();
        }
        let mut sent = self.sent.lock().expect("sim poisoned");
        let busy = rand::random_range(0..(end_ms - start_ms).max(1) as u64 * 2);
        sent.cpu_busy_total += busy;
        let total = sent.cpu_busy_total;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let (meter, reading) = match i % 4 {
                0 => (
                    meters::HOST_CPU_BUSY_MS,
                    Reading::Counter {
                        generation: self.epoch,
                        total,
                    },
                ),
                1 => (
                    meters::HOST_CPU_TOTAL_MS,
                    Reading::Counter {
                        generation: self.epoch,
                        total: (end_ms.max(0) as u64) * 2,
                    },
                ),
                2 => (
                    meters::HOST_MEMORY_USED_BYTES,
                    Reading::Gauge {
                        last: 1 << 30,
                        peak: 3 << 29,
                        mean: 1 << 30,
                    },
                ),
                _ => (
                    meters::HOST_UPTIME_S,
                    Reading::Gauge {
                        last: end_ms.max(0) as u64 / 1000,
                        peak: end_ms.max(0) as u64 / 1000,
                        mean: end_ms.max(0) as u64 / 1000,
                    },
                ),
            };
            // Several records of one meter in a period would be one record on a real
            // agent; the meter name is made unique past the first four.
            let meter = if i < 4 {
                meter.to_owned()
            } else {
                format!("{meter}.sim{}", i / 4)
            };
            out.push(UsageRecord {
                epoch: self.epoch,
                seq: sent.created,
                subject: Subject::Host,
                meter,
                start_ms,
                end_ms,
                reading,
                samples: 1,
            });
            sent.created += 1;
        }
        out
    }

    fn answer(&self, command: Command) -> Result<ControlReply, ControlFailure> {
        let now = SystemClock.now_ms();
        let mut book = self.instances.lock().expect("sim poisoned");
        match command {
            Command::RunInstances { instance_id, spec } => {
                let instance = book
                    .entry(instance_id.clone())
                    .or_insert_with(|| Instance {
                        native_id: Some(format!("sim-{instance_id}")),
                        id: instance_id,
                        spec,
                        state: InstanceState::Running,
                        state_reason: None,
                        driver: "loadgen".into(),
                        launched_at_ms: now,
                        state_changed_at_ms: now,
                    })
                    .clone();
                Ok(ControlReply::Instances(vec![instance]))
            }
            Command::DescribeInstances(filters) => Ok(ControlReply::Instances(
                book.values()
                    .filter(|i| filters.matches(i))
                    .cloned()
                    .collect(),
            )),
            other => Err(ControlFailure::new(
                FailureKind::Unsupported,
                format!(
                    "the load generator's agents do not simulate {}",
                    other.action()
                ),
            )),
        }
    }
}

async fn serve_stream(
    sim: Arc<SimAgent>,
    stats: Arc<Stats>,
    behaviour: Arc<Behaviour>,
    mut send: SendStream,
    mut recv: RecvStream,
    max_frame: usize,
) {
    let request = match quic::read_frame(&mut recv, max_frame).await {
        Ok(env) => env.message,
        Err(e) => {
            stats.error(format!("bad frame from the controller: {e}"));
            quic::refuse_stream(&mut send, &mut recv, &e);
            return;
        }
    };
    let answer = match request {
        Message::Ping(p) => Message::Pong(Pong { nonce: p.nonce }),
        Message::Control(command) => {
            stats.control_received.fetch_add(1, Ordering::Relaxed);
            if !behaviour.control_delay.is_zero() {
                tokio::time::sleep(behaviour.control_delay).await;
            }
            Message::ControlResult(sim.answer(command))
        }
        Message::SetMetering(periods) => Message::MeteringAck(MeteringAck {
            periods,
            effective_from_ms: SystemClock.now_ms(),
        }),
        other => Message::error(
            ErrorCode::Unexpected,
            format!("the simulated agent does not serve {}", other.kind()),
        ),
    };
    let control = matches!(answer, Message::ControlResult(_));
    match quic::write_frame(&mut send, &answer, max_frame).await {
        Ok(()) if control => {
            stats.control_answered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(()) => {}
        Err(e) => stats.error(format!("answer to the controller not delivered: {e}")),
    }
}

/// Sends one batch: `Some(ack)` once committed, `None` when the controller is busy
/// (the batch is to be sent again after a pause), `Err` when the session failed.
async fn send_batch(
    session: &Session,
    records: &[UsageRecord],
    stats: &Stats,
) -> Result<Option<UsageAck>, String> {
    let batch = Message::UsageBatch(UsageBatch {
        records: records.to_vec(),
        spool: SpoolState {
            pending_records: records.len() as u64,
            ..Default::default()
        },
    });
    let started = Instant::now();
    match session.request(&batch).await {
        Ok(Message::UsageAck(ack)) => {
            Stats::latency(&stats.usage_us, started.elapsed());
            stats.usage_batches.fetch_add(1, Ordering::Relaxed);
            stats
                .usage_stored
                .fetch_add(u64::from(ack.stored), Ordering::Relaxed);
            stats
                .usage_duplicates
                .fetch_add(u64::from(ack.duplicates), Ordering::Relaxed);
            stats
                .usage_rejected
                .fetch_add(u64::from(ack.rejected), Ordering::Relaxed);
            if ack.rejected > 0 {
                stats.error("usage records rejected");
            }
            Ok(Some(ack))
        }
        Ok(Message::Error(reply)) if reply.code == ErrorCode::Busy => {
            stats.usage_busy.fetch_add(1, Ordering::Relaxed);
            Ok(None)
        }
        Ok(other) => Err(format!("usage batch answered with {}", other.kind())),
        Err(e) => Err(format!("usage batch: {e}")),
    }
}

fn error_kind(e: &surplus_agent::session::SessionError) -> String {
    use surplus_agent::session::SessionError as E;
    match e {
        E::Connect { .. } => "connect".into(),
        E::Lost(_) => "session lost".into(),
        E::Exchange(quic::ExchangeError::Timeout(_)) => "request timeout".into(),
        E::Exchange(_) => "exchange failed".into(),
        E::Refused { what, .. } => format!("{what} refused"),
        other => other.to_string(),
    }
}

/// Everything one simulated agent does until `stop` fires; usage stops being created
/// when `drain` fires, and what was created is still delivered.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    sim: Arc<SimAgent>,
    endpoint: Endpoint,
    config: Arc<AgentConfig>,
    inventory: Arc<Inventory>,
    behaviour: Arc<Behaviour>,
    stats: Arc<Stats>,
    drain: CancellationToken,
    stop: CancellationToken,
    mut first: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut pending: Vec<UsageRecord> = Vec::new();
    let mut next_usage =
        tokio::time::Instant::now() + behaviour.usage_period.mul_f64(rand::random_range(0.0..1.0));
    let mut usage_from = SystemClock.now_ms();
    while !stop.is_cancelled() {
        let session = tokio::select! {
            _ = stop.cancelled() => return,
            s = Session::open_on(Some(&endpoint), &config, &sim.identity) => s,
        };
        // The first connection is made; the next simulated agent may start its own.
        first.take();
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                stats.error(format!("session: {}", error_kind(&e)));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(rand::random_range(500..2000))) => continue,
                }
            }
        };
        stats.sessions_opened.fetch_add(1, Ordering::Relaxed);
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let ended = session_loop(
            &sim,
            &session,
            &inventory,
            &behaviour,
            &stats,
            &drain,
            &stop,
            &mut pending,
            &mut next_usage,
            &mut usage_from,
            config.max_frame_size,
        )
        .await;
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Ok(()) => {
                session
                    .connection()
                    .close(quic::codes::CLOSE_NORMAL, b"load generator done");
                return;
            }
            Err(kind) => {
                stats.error(kind);
                session
                    .connection()
                    .close(quic::codes::CLOSE_NORMAL, b"simulated agent reconnects");
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    sim: &Arc<SimAgent>,
    session: &Session,
    inventory: &Inventory,
    behaviour: &Arc<Behaviour>,
    stats: &Arc<Stats>,
    drain: &CancellationToken,
    stop: &CancellationToken,
    pending: &mut Vec<UsageRecord>,
    next_usage: &mut tokio::time::Instant,
    usage_from: &mut i64,
    max_frame: usize,
) -> Result<(), String> {
    let ack = session.hello_ack().clone();
    let mut inventory = inventory.clone();
    inventory.hostname = Some(format!("sim-{}", sim.identity.agent_id));
    let digest = surplus_agent::inventory::digest(&inventory);
    session
        .send_inventory(inventory)
        .await
        .map_err(|e| format!("inventory: {}", error_kind(&e)))?;
    stats.inventories.fetch_add(1, Ordering::Relaxed);

    let every = Duration::from_millis(ack.heartbeat_interval_ms.max(100));
    let mut heartbeat = tokio::time::interval_at(
        tokio::time::Instant::now() + every.mul_f64(rand::random_range(0.0..1.0)),
        every,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let conn = session.connection().clone();
    let streams = tokio_util::task::TaskTracker::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let result = loop {
        // Deliver what is pending first (after a reconnect, or a failed send).
        let due = retry_at.is_none_or(|t| t <= tokio::time::Instant::now());
        if !pending.is_empty() && due {
            retry_at = None;
            // At most as many records per batch as a real agent sends (its default
            // `batch_records`); the rest wait for the next turn.
            let take = pending.len().min(BATCH_RECORDS);
            match send_batch(session, &pending[..take], stats).await {
                Ok(None) => {
                    // Busy: the records stay pending; heartbeats and commands go on.
                    let pause = Duration::from_millis(rand::random_range(500..2000));
                    retry_at = Some(tokio::time::Instant::now() + pause);
                }
                Ok(Some(_)) => {
                    let n = stats.usage_first_sends.fetch_add(1, Ordering::Relaxed) + 1;
                    if behaviour.resend_every > 0 && n % behaviour.resend_every == 0 {
                        // As if the acknowledgement had been lost: the same batch again
                        // must be recognised in full, not stored twice.
                        stats.usage_resent_batches.fetch_add(1, Ordering::Relaxed);
                        if let Some(ack) = send_batch(session, &pending[..take], stats).await?
                            && (ack.stored > 0 || ack.duplicates as usize != take)
                        {
                            stats.error("a resent batch was not recognised as duplicate");
                        }
                    }
                    let last = pending[take - 1].seq;
                    sim.sent.lock().expect("sim poisoned").acked = last + 1;
                    pending.drain(..take);
                }
                Err(e) => break Err(e),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {}
            incoming = conn.accept_bi() => match incoming {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(sim.clone(), stats.clone(), behaviour.clone(), send, recv, max_frame));
                }
                Err(e) => break Err(format!("session lost: {e}")),
            },
            _ = heartbeat.tick() => {
                seq += 1;
                let beat = Message::Heartbeat(Heartbeat {
                    seq,
                    sent_at_ms: SystemClock.now_ms(),
                    uptime_secs: 1000,
                    load_avg_1m: 0.5,
                    memory_used_bytes: 1 << 30,
                    inventory_digest: digest,
                });
                let started = Instant::now();
                match session.request(&beat).await {
                    Ok(Message::HeartbeatAck(_)) => {
                        Stats::latency(&stats.heartbeat_us, started.elapsed());
                        stats.heartbeats_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(other) => break Err(format!("heartbeat answered with {}", other.kind())),
                    Err(e) => break Err(format!("heartbeat: {}", error_kind(&e))),
                }
            }
            _ = tokio::time::sleep_until(*next_usage), if !drain.is_cancelled() => {
                *next_usage += behaviour.usage_period;
                let now = SystemClock.now_ms();
                pending.extend(sim.records(*usage_from, now, behaviour.usage_records));
                stats.usage_created.fetch_add(behaviour.usage_records as u64, Ordering::Relaxed);
                *usage_from = now;
            }
        }
    };
    streams.close();
    result
}
