//! Validation runs ordered by the controller: security checks, the benchmark suite,
//! and the network figures measured over the session itself.
//!
//! A run answers on the stream that ordered it: progress frames, then the report.
//! Runs are cancellable by id; when the session ends, every run still going is
//! cancelled, so a lost controller never leaves a benchmark grinding on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, SendStream};
use surplus_protocol::bench::{BenchPlan, BenchResult, mean_cv, median};
use surplus_protocol::messages::*;
use surplus_protocol::quic;
use uuid::Uuid;

use crate::security::HostRoot;

/// Largest number of bytes the throughput probe sends, whatever the controller asks.
pub const MAX_NETWORK_BYTES: u64 = 64 << 20;
const PROBE_CHUNK: usize = 256 << 10;
const PROBE_STREAMS: u64 = 4;

/// Reference figures of the network measurements (see `docs/PERFORMANCE.md`).
pub mod reference {
    /// Round trip to the controller, ms (lower is better).
    pub const RTT_MS: f64 = 1.0;
    /// Throughput to the controller, MB/s.
    pub const THROUGHPUT: f64 = 100.0;
}

/// What validation runs need from the agent, shared by the streams of a session.
#[derive(Debug)]
pub struct Validations {
    data_dir: PathBuf,
    scratch_dir: PathBuf,
    security_root: PathBuf,
    max_frame: usize,
    request_timeout: Duration,
    running: Mutex<HashMap<Uuid, Arc<AtomicBool>>>,
}

impl Validations {
    /// Validation state for one session.
    pub fn new(config: &crate::AgentConfig) -> Arc<Self> {
        Arc::new(Self {
            data_dir: config.data_dir.clone(),
            scratch_dir: config.bench_scratch_dir.clone(),
            security_root: config.security_root.clone(),
            max_frame: config.max_frame_size,
            request_timeout: config.request_timeout,
            running: Mutex::new(HashMap::new()),
        })
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<AtomicBool>>> {
        self.running.lock().expect("validation lock poisoned")
    }

    /// Cancels one run; returns whether it was running.
    pub fn cancel(&self, run_id: Uuid) -> bool {
        self.runs()
            .get(&run_id)
            .map(|flag| flag.store(true, Ordering::Relaxed))
            .is_some()
    }

    /// Cancels every run (the session ended).
    pub fn cancel_all(&self) {
        for flag in self.runs().values() {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Runs `request`, writing progress and then the report to `send`; returns whether
    /// the report says the run was cancelled.
    pub async fn run(
        self: Arc<Self>,
        request: ValidationRequest,
        send: &mut SendStream,
        conn: Connection,
    ) -> Result<bool, quic::ExchangeError> {
        let run_id = request.run_id;
        let cancel = Arc::new(AtomicBool::new(false));
        self.runs().insert(run_id, cancel.clone());
        let outcome = self
            .clone()
            .execute(request, send, conn, cancel.clone())
            .await;
        self.runs().remove(&run_id);
        outcome
    }

    async fn execute(
        self: Arc<Self>,
        request: ValidationRequest,
        send: &mut SendStream,
        conn: Connection,
        cancel: Arc<AtomicBool>,
    ) -> Result<bool, quic::ExchangeError> {
        let run_id = request.run_id;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ValidationProgress>();
        let me = self.clone();
        let flag = cancel.clone();
        let wants_bench = request.bench.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let security = request.security.then(|| {
                let _ = tx.send(ValidationProgress {
                    run_id,
                    done: 0,
                    total: 1,
                    step: "security".into(),
                });
                crate::security::run(&HostRoot::new(&me.security_root, Some(&me.data_dir)))
            });
            let bench = request.bench.map(|b| {
                let plan = BenchPlan {
                    budget_ms: b.budget_ms,
                    scratch_dir: me.scratch_dir.display().to_string(),
                    storage_bytes: BenchPlan::default().storage_bytes,
                    repetitions: b.repetitions.clamp(1, 20),
                    quick: b.quick,
                };
                crate::bench::run(
                    &plan,
                    crate::inventory::last_level_cache_bytes(),
                    &flag,
                    |p| {
                        let _ = tx.send(ValidationProgress {
                            run_id,
                            done: p.done,
                            total: p.total,
                            step: p.step,
                        });
                    },
                )
            });
            (security, bench)
        });
        let (security, mut bench) = loop {
            tokio::select! {
                Some(p) = rx.recv() => quic::send_frame(send, &Message::ValidationProgress(p), self.max_frame).await?,
                done = &mut job => break done.expect("validation work does not panic"),
            }
        };
        if let (Some(report), Some(req)) = (bench.as_mut(), wants_bench) {
            if !cancel.load(Ordering::Relaxed) {
                let step = ValidationProgress {
                    run_id,
                    done: report.results.len() as u32,
                    total: report.results.len() as u32 + 1,
                    step: "network".into(),
                };
                quic::send_frame(send, &Message::ValidationProgress(step), self.max_frame).await?;
                match self
                    .network(&conn, req.network_bytes.min(MAX_NETWORK_BYTES), &cancel)
                    .await
                {
                    Ok(results) => report.results.extend(results),
                    Err(e) => report.skipped.push(format!("network: {e}")),
                }
            }
            report.cancelled |= cancel.load(Ordering::Relaxed);
        }
        let cancelled = cancel.load(Ordering::Relaxed);
        let report = ValidationReport {
            run_id,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            bench,
            security,
            cancelled,
        };
        quic::write_frame(
            send,
            &Message::ValidationResult(Box::new(report)),
            self.max_frame,
        )
        .await?;
        Ok(cancelled)
    }

    /// Round trip and throughput to the controller over this session.
    async fn network(
        &self,
        conn: &Connection,
        bytes: u64,
        cancel: &AtomicBool,
    ) -> Result<Vec<BenchResult>, quic::ExchangeError> {
        let started = Instant::now();
        let mut rtts = Vec::new();
        for nonce in 0..11u64 {
            let t = Instant::now();
            quic::request(
                conn,
                &Message::Ping(Ping { nonce }),
                self.max_frame,
                self.request_timeout,
            )
            .await?;
            if nonce > 0 {
                rtts.push(t.elapsed().as_secs_f64() * 1000.0); // the first one warms up
            }
        }
        let rtt = median(&rtts);
        let (_, rtt_cv) = mean_cv(&rtts);
        let mut out = vec![BenchResult {
            id: "network.rtt".into(),
            unit: "ms".into(),
            value: rtt,
            repetitions: rtts,
            cv: rtt_cv,
            reference: reference::RTT_MS,
            score: if rtt > 0.0 {
                reference::RTT_MS / rtt
            } else {
                0.0
            },
            duration_ms: started.elapsed().as_millis() as u64,
            note: Some("median of 10 ping exchanges over the agent's QUIC session".into()),
        }];
        if bytes == 0 || cancel.load(Ordering::Relaxed) {
            return Ok(out);
        }
        let per_stream = bytes.div_ceil(PROBE_STREAMS);
        let t = Instant::now();
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..PROBE_STREAMS {
            let conn = conn.clone();
            let (max, timeout) = (self.max_frame, self.request_timeout);
            senders.spawn(async move {
                let mut sent = 0u64;
                while sent < per_stream {
                    let len = (per_stream - sent).min(PROBE_CHUNK as u64) as usize;
                    match quic::request(
                        &conn,
                        &Message::NetworkProbe(NetworkProbe {
                            data: vec![0xa5; len],
                        }),
                        max,
                        timeout,
                    )
                    .await?
                    {
                        Message::NetworkProbeAck(ack) => sent += ack.received,
                        _ => break,
                    }
                }
                Ok::<u64, quic::ExchangeError>(sent)
            });
        }
        let mut total = 0;
        while let Some(joined) = senders.join_next().await {
            total += joined.expect("probe task does not panic")?;
        }
        let mbps = total as f64 / t.elapsed().as_secs_f64() / 1e6;
        out.push(BenchResult {
            id: "network.throughput".into(),
            unit: "MB/s".into(),
            value: mbps,
            repetitions: vec![mbps],
            cv: 0.0,
            reference: reference::THROUGHPUT,
            score: mbps / reference::THROUGHPUT,
            duration_ms: t.elapsed().as_millis() as u64,
            note: Some(format!(
                "{} MiB to the controller over {PROBE_STREAMS} streams",
                total >> 20
            )),
        });
        Ok(out)
    }
}
