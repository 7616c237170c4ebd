//! Metering: what the agent measures, turned into usage records at period boundaries.
//!
//! [`Meter`] is the pure part: it is fed observations (an instance's state and host
//! counters, the host's figures, subscription counts) with their times, and at each
//! boundary of a meter group's period it hands back the records for the period just
//! ended. Time comes only from the caller, so tests drive it with plain numbers.
//! [`start`] is the I/O around it: it reads the host every `resolution`, writes the
//! records to the [`Spool`] (synced before anything is sent) and wakes the sender.
//!
//! Counters that the host keeps (CPU time, disk and network bytes) are passed through
//! with the host's generation; counters the agent keeps itself (memory byte-ms, time in
//! each state) are integrated here. Those carry a generation of their own per instance
//! (the process epoch of the agent that first saw it) and are checkpointed with every
//! instance period ([`Meter::checkpoint`], written before the records are spooled), so
//! a restarted agent continues them ([`Meter::resume`]): an instance it re-adopts in the
//! same run (same process start time, same container start) is metered for the time it
//! kept running while the agent was away, and nothing of the period the agent was
//! killed in is lost. An instance whose run changed meanwhile is not charged for the
//! gap: when it stopped is unknown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::{Clock, UnixMillis};
use surplus_protocol::control::InstanceState;
use surplus_protocol::usage::{
    MeteringPeriods, Reading, Subject, UsageRecord, meters, next_boundary,
};
use tokio_util::sync::CancellationToken;

use crate::control::{ControlPlane, InstanceUsage};
use crate::identity::write_atomic;
use crate::spool::{Spool, SpoolLimits};

/// An application whose running instances are counted (a licensed database, say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Application {
    /// The meter is `app.<name>`: 1 to 32 of a-z, 0-9, '_', '-'.
    pub name: String,
    /// Matches processes by their name (`/proc/<pid>/comm`).
    #[serde(default)]
    pub process_name: Option<String>,
    /// Matches processes by their executable's path.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// `[metering]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeteringConfig {
    /// Period of the instance meters (the controller may change it at run time).
    #[serde(with = "humantime_serde")]
    pub instance_period: Duration,
    /// Period of the host meters.
    #[serde(with = "humantime_serde")]
    pub host_period: Duration,
    /// Period of the subscription meters.
    #[serde(with = "humantime_serde")]
    pub subscription_period: Duration,
    /// How often levels (memory, counts) are sampled within a period.
    #[serde(with = "humantime_serde")]
    pub resolution: Duration,
    /// Spool size above which the oldest records are merged into coarser ones.
    pub spool_max_bytes: u64,
    /// Size of one spool segment.
    pub spool_segment_bytes: u64,
    /// Records per batch sent to the controller.
    pub batch_records: usize,
    /// Applications counted by the subscription meters.
    pub applications: Vec<Application>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        let p = MeteringPeriods::default();
        let limits = SpoolLimits::default();
        Self {
            instance_period: Duration::from_millis(p.instance_ms),
            host_period: Duration::from_millis(p.host_ms),
            subscription_period: Duration::from_millis(p.subscription_ms),
            resolution: Duration::from_secs(5),
            spool_max_bytes: limits.max_bytes,
            spool_segment_bytes: limits.segment_bytes,
            batch_records: 500,
            applications: Vec::new(),
        }
    }
}

impl MeteringConfig {
    /// The configured periods.
    pub fn periods(&self) -> MeteringPeriods {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        MeteringPeriods {
            instance_ms: ms(self.instance_period),
            host_ms: ms(self.host_period),
            subscription_ms: ms(self.subscription_period),
        }
    }

    /// Checks the periods and application names.
    pub fn validate(&self) -> Result<(), String> {
        self.periods().validate()?;
        if self.batch_records == 0 {
            return Err("metering.batch_records: must be at least 1".into());
        }
        for app in &self.applications {
            let ok = !app.name.is_empty()
                && app.name.len() <= 32
                && app.name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !ok {
                return Err(format!(
                    "metering.applications: name {:?} must be 1 to 32 of a-z, 0-9, '_', '-'",
                    app.name
                ));
            }
            if app.process_name.is_none() && app.path.is_none() {
                return Err(format!(
                    "metering.applications: {} needs process_name or path",
                    app.name
                ));
            }
        }
        Ok(())
    }
}

/// A level sampled over a period: last, peak and time-weighted mean.
#[derive(Debug, Clone, Default)]
struct Gauge {
    last: Option<(u64, UnixMillis)>,
    peak: u64,
    weighted: u128,
    span_ms: u128,
}

impl Gauge {
    fn advance(&mut self, to: UnixMillis) {
        if let Some((v, at)) = self.last
            && to > at
        {
            let dt = (to - at) as u128;
            self.weighted += u128::from(v) * dt;
            self.span_ms += dt;
            self.last = Some((v, to));
        }
    }

    fn observe(&mut self, at: UnixMillis, value: u64) {
        self.advance(at);
        if self.last.is_none() {
            self.peak = value;
        }
        self.last = Some((value, at));
        self.peak = self.peak.max(value);
    }

    /// The reading up to `end`, and a fresh period starting from the last value.
    fn take(&mut self, end: UnixMillis) -> Option<Reading> {
        self.advance(end);
        let (last, _) = self.last?;
        let mean = self
            .weighted
            .checked_div(self.span_ms)
            .map_or(last, |m| u64::try_from(m).unwrap_or(u64::MAX));
        let reading = Reading::Gauge {
            last,
            peak: self.peak.max(last),
            mean: mean.min(self.peak.max(last)),
        };
        self.peak = last;
        self.weighted = 0;
        self.span_ms = 0;
        Some(reading)
    }
}

#[derive(Debug, Clone)]
struct InstanceAcc {
    /// Generation of the agent-kept counters.
    generation: u64,
    state: InstanceState,
    at: UnixMillis,
    state_ms: BTreeMap<InstanceState, u64>,
    memory: Gauge,
    memory_bytes: Option<u64>,
    memory_byte_ms: u64,
    counters: Option<InstanceUsage>,
    /// The host's run of the instance when last seen (see [`InstanceUsage::run`]).
    run: Option<u64>,
    /// Restored from a checkpoint and not yet seen by this agent process: the gap since
    /// the checkpoint counts only if the same run is still going.
    resumed: bool,
}

/// The agent-kept counters of one instance, as the last instance period left them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceCheckpoint {
    /// The instance.
    pub id: String,
    /// Generation of the agent-kept counters.
    pub generation: u64,
    /// State when last integrated.
    pub state: InstanceState,
    /// Time they were integrated up to.
    pub at: UnixMillis,
    /// ms in each state.
    pub state_ms: BTreeMap<InstanceState, u64>,
    /// Memory integrated over time, byte-ms.
    pub memory_byte_ms: u64,
    /// Memory in use when last seen.
    pub memory_bytes: Option<u64>,
    /// The host's run of the instance when last seen.
    pub run: Option<u64>,
}

/// The host's figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostReading {
    /// Boot time (s since the epoch): the generation of the host's counters.
    pub boot_time: u64,
    /// CPU time busy, ms summed over CPUs.
    pub cpu_busy_ms: u64,
    /// CPU time in total, ms summed over CPUs.
    pub cpu_total_ms: u64,
    /// Memory in use.
    pub memory_used_bytes: u64,
    /// Memory installed.
    pub memory_total_bytes: u64,
    /// Network bytes received, loopback excluded.
    pub net_rx_bytes: u64,
    /// Network bytes sent, loopback excluded.
    pub net_tx_bytes: u64,
    /// Seconds since boot.
    pub uptime_s: u64,
}

#[derive(Debug, Clone, Copy)]
struct PeriodClock {
    start: UnixMillis,
    end: UnixMillis,
    period: u64,
    next: Option<u64>,
}

impl PeriodClock {
    fn new(now: UnixMillis, period: u64) -> Self {
        Self {
            start: now,
            end: next_boundary(now, period),
            period,
            next: None,
        }
    }

    /// If a boundary passed: the period that ended, and the clock moves on.
    fn roll(&mut self, now: UnixMillis) -> Option<(UnixMillis, UnixMillis)> {
        if now < self.end {
            return None;
        }
        if let Some(p) = self.next.take() {
            self.period = p;
        }
        // After a long pause (a suspended host) one record covers every missed period.
        let p = i64::try_from(self.period).unwrap_or(i64::MAX);
        let end = now.div_euclid(p) * p;
        let end = end.max(self.end);
        let ended = (self.start, end);
        self.start = end;
        self.end = next_boundary(end, self.period);
        Some(ended)
    }
}

/// The pure metering state of one agent process.
#[derive(Debug)]
pub struct Meter {
    epoch: u64,
    /// When this meter (this agent process) started.
    started_ms: UnixMillis,
    instance_clock: PeriodClock,
    host_clock: PeriodClock,
    subscription_clock: PeriodClock,
    instances: BTreeMap<String, InstanceAcc>,
    host: Option<HostReading>,
    host_memory: Gauge,
    os_instances: Gauge,
    apps: BTreeMap<String, Gauge>,
}

fn record(
    epoch: u64,
    subject: &Subject,
    meter: &str,
    (start_ms, end_ms): (UnixMillis, UnixMillis),
    reading: Reading,
) -> UsageRecord {
    UsageRecord {
        epoch,
        seq: 0,
        subject: subject.clone(),
        meter: meter.to_owned(),
        start_ms,
        end_ms,
        reading,
        samples: 1,
    }
}

impl Meter {
    /// A meter for the process with `epoch`, starting at `now`.
    pub fn new(epoch: u64, periods: MeteringPeriods, now: UnixMillis) -> Self {
        Self {
            epoch,
            started_ms: now,
            instance_clock: PeriodClock::new(now, periods.instance_ms),
            host_clock: PeriodClock::new(now, periods.host_ms),
            subscription_clock: PeriodClock::new(now, periods.subscription_ms),
            instances: BTreeMap::new(),
            host: None,
            host_memory: Gauge::default(),
            os_instances: Gauge::default(),
            apps: BTreeMap::new(),
        }
    }

    /// The periods in force (new ones count once their first boundary passed).
    pub fn periods(&self) -> MeteringPeriods {
        let p = |c: &PeriodClock| c.next.unwrap_or(c.period);
        MeteringPeriods {
            instance_ms: p(&self.instance_clock),
            host_ms: p(&self.host_clock),
            subscription_ms: p(&self.subscription_clock),
        }
    }

    /// Sets new periods; each group switches at its next boundary, which is returned
    /// (the latest of the three).
    pub fn set_periods(&mut self, periods: MeteringPeriods) -> UnixMillis {
        self.instance_clock.next = Some(periods.instance_ms);
        self.host_clock.next = Some(periods.host_ms);
        self.subscription_clock.next = Some(periods.subscription_ms);
        self.instance_clock
            .end
            .max(self.host_clock.end)
            .max(self.subscription_clock.end)
    }

    /// When the next boundary of any group passes.
    pub fn next_due(&self) -> UnixMillis {
        self.instance_clock
            .end
            .min(self.host_clock.end)
            .min(self.subscription_clock.end)
    }

    /// What an instance's record says: in `state` since `since` (its last state
    /// change). An instance this meter has not seen yet counts from then, or from when
    /// this meter started if that is later (earlier time belongs to an earlier agent
    /// process, which checkpointed it); one seen in another state changed at `since`,
    /// not at the sample that notices it. Call before [`Meter::observe_instance`], with
    /// `since` no later than its `now`.
    pub fn track(&mut self, id: &str, state: InstanceState, since: UnixMillis) {
        let epoch = self.epoch;
        let started = self.started_ms;
        let acc = self
            .instances
            .entry(id.to_owned())
            .or_insert_with(|| InstanceAcc {
                generation: epoch,
                state,
                at: since.max(started),
                state_ms: BTreeMap::new(),
                memory: Gauge::default(),
                memory_bytes: None,
                memory_byte_ms: 0,
                counters: None,
                run: None,
                resumed: false,
            });
        if acc.resumed || acc.state == state {
            return;
        }
        if since > acc.at {
            let dt = (since - acc.at) as u64;
            *acc.state_ms.entry(acc.state).or_default() += dt;
            if let Some(m) = acc.memory_bytes {
                acc.memory_byte_ms = acc.memory_byte_ms.saturating_add(m.saturating_mul(dt));
            }
            acc.at = since;
        }
        acc.state = state;
    }

    /// An instance seen in `state` at `now`, with the host's counters when readable.
    /// Returns records to write at once: the last readings of a counter generation that
    /// just ended (the instance restarted), so no usage of it is lost.
    pub fn observe_instance(
        &mut self,
        now: UnixMillis,
        id: &str,
        state: InstanceState,
        usage: Option<InstanceUsage>,
    ) -> Vec<UsageRecord> {
        let epoch = self.epoch;
        let acc = self
            .instances
            .entry(id.to_owned())
            .or_insert_with(|| InstanceAcc {
                generation: epoch,
                state,
                at: now,
                state_ms: BTreeMap::new(),
                memory: Gauge::default(),
                memory_bytes: None,
                memory_byte_ms: 0,
                counters: None,
                run: None,
                resumed: false,
            });
        if acc.resumed {
            acc.resumed = false;
            let run = usage.and_then(|u| u.run);
            let same_run = run.is_some() && run == acc.run && state == acc.state;
            if !same_run {
                // The run changed (or cannot be told) while the agent was away: when it
                // stopped is unknown, so the gap is not counted.
                acc.at = acc.at.max(now);
            }
        }
        if now > acc.at {
            let dt = (now - acc.at) as u64;
            *acc.state_ms.entry(acc.state).or_default() += dt;
            if let Some(m) = acc.memory_bytes {
                acc.memory_byte_ms = acc.memory_byte_ms.saturating_add(m.saturating_mul(dt));
            }
            acc.at = now;
        }
        acc.state = state;
        let mut flushed = Vec::new();
        match usage {
            Some(u) => {
                if let Some(old) = acc.counters
                    && old.generation != u.generation
                {
                    let subject = Subject::Instance(id.to_owned());
                    let span = (self.instance_clock.start, now);
                    flushed = host_counters(self.epoch, &subject, span, &old);
                }
                if let Some(m) = u.memory_bytes {
                    acc.memory.observe(now, m);
                }
                acc.memory_bytes = u.memory_bytes;
                acc.run = u.run;
                acc.counters = Some(merge_counters(acc.counters, u));
            }
            None => {
                acc.memory_bytes = None;
                acc.run = None;
            }
        }
        flushed
    }

    /// The agent-kept counters of every instance, to write before the records of an
    /// instance period are spooled.
    pub fn checkpoint(&self) -> Vec<InstanceCheckpoint> {
        self.instances
            .iter()
            .map(|(id, a)| InstanceCheckpoint {
                id: id.clone(),
                generation: a.generation,
                state: a.state,
                at: a.at,
                state_ms: a.state_ms.clone(),
                memory_byte_ms: a.memory_byte_ms,
                memory_bytes: a.memory_bytes,
                run: a.run,
            })
            .collect()
    }

    /// Continues the counters an earlier agent process checkpointed (see the module
    /// documentation for how the time it was away counts).
    pub fn resume(&mut self, checkpoints: Vec<InstanceCheckpoint>) {
        for c in checkpoints {
            self.instances.insert(
                c.id,
                InstanceAcc {
                    generation: c.generation,
                    state: c.state,
                    at: c.at,
                    state_ms: c.state_ms,
                    memory: Gauge::default(),
                    memory_bytes: c.memory_bytes,
                    memory_byte_ms: c.memory_byte_ms,
                    counters: None,
                    run: c.run,
                    resumed: true,
                },
            );
        }
    }

    /// Where the current instance period began: it moves when [`Meter::due`] ends one
    /// (and a checkpoint is then due before its records are spooled).
    pub fn instance_period_start(&self) -> UnixMillis {
        self.instance_clock.start
    }

    /// The host's figures at `now`.
    pub fn observe_host(&mut self, now: UnixMillis, reading: HostReading) {
        self.host_memory.observe(now, reading.memory_used_bytes);
        self.host = Some(reading);
    }

    /// Subscription counts at `now`.
    pub fn observe_subscriptions(
        &mut self,
        now: UnixMillis,
        os_instances: u64,
        apps: &BTreeMap<String, u64>,
    ) {
        self.os_instances.observe(now, os_instances);
        for (name, n) in apps {
            self.apps.entry(name.clone()).or_default().observe(now, *n);
        }
    }

    /// Records of every period that ended by `now`.
    pub fn due(&mut self, now: UnixMillis) -> Vec<UsageRecord> {
        let mut out = Vec::new();
        if let Some(span) = self.instance_clock.roll(now) {
            self.instance_records(span, &mut out);
        }
        if let Some(span) = self.host_clock.roll(now) {
            self.host_records(span, &mut out);
        }
        if let Some(span) = self.subscription_clock.roll(now) {
            let host = Subject::Host;
            if let Some(r) = self.os_instances.take(span.1) {
                out.push(record(self.epoch, &host, meters::OS_INSTANCES, span, r));
            }
            for (name, g) in &mut self.apps {
                if let Some(r) = g.take(span.1) {
                    let meter = format!("{}{name}", meters::APP_PREFIX);
                    out.push(record(self.epoch, &host, &meter, span, r));
                }
            }
        }
        out
    }

    fn instance_records(&mut self, span: (UnixMillis, UnixMillis), out: &mut Vec<UsageRecord>) {
        let epoch = self.epoch;
        let mut finished = Vec::new();
        for (id, acc) in &mut self.instances {
            if acc.resumed {
                // Checkpointed by an earlier agent process and not seen since: no
                // record until it is seen again (or found gone).
                continue;
            }
            // Integrate up to the boundary.
            if span.1 > acc.at {
                let dt = (span.1 - acc.at) as u64;
                *acc.state_ms.entry(acc.state).or_default() += dt;
                if let Some(m) = acc.memory_bytes {
                    acc.memory_byte_ms = acc.memory_byte_ms.saturating_add(m.saturating_mul(dt));
                }
                acc.at = span.1;
            }
            let subject = Subject::Instance(id.clone());
            if let Some(u) = &acc.counters {
                out.extend(host_counters(epoch, &subject, span, u));
            }
            if let Some(r) = acc.memory.take(span.1) {
                out.push(record(epoch, &subject, meters::MEMORY_BYTES, span, r));
                out.push(record(
                    epoch,
                    &subject,
                    meters::MEMORY_BYTE_MS,
                    span,
                    Reading::Counter {
                        generation: acc.generation,
                        total: acc.memory_byte_ms,
                    },
                ));
            }
            for (state, ms) in &acc.state_ms {
                if *state == InstanceState::Terminated {
                    continue;
                }
                out.push(record(
                    epoch,
                    &subject,
                    &format!("{}{}", meters::STATE_MS_PREFIX, state.as_str()),
                    span,
                    Reading::Counter {
                        generation: acc.generation,
                        total: *ms,
                    },
                ));
            }
            if acc.state == InstanceState::Terminated {
                finished.push(id.clone());
            }
        }
        for id in finished {
            self.instances.remove(&id);
        }
    }

    fn host_records(&mut self, span: (UnixMillis, UnixMillis), out: &mut Vec<UsageRecord>) {
        let host = Subject::Host;
        let epoch = self.epoch;
        let Some(h) = self.host else { return };
        let counter = |total| Reading::Counter {
            generation: h.boot_time,
            total,
        };
        let level = |v| Reading::Gauge {
            last: v,
            peak: v,
            mean: v,
        };
        for (meter, reading) in [
            (meters::HOST_CPU_BUSY_MS, counter(h.cpu_busy_ms)),
            (meters::HOST_CPU_TOTAL_MS, counter(h.cpu_total_ms)),
            (meters::NET_RX_BYTES, counter(h.net_rx_bytes)),
            (meters::NET_TX_BYTES, counter(h.net_tx_bytes)),
            (meters::HOST_MEMORY_TOTAL_BYTES, level(h.memory_total_bytes)),
            (meters::HOST_UPTIME_S, level(h.uptime_s)),
        ] {
            out.push(record(epoch, &host, meter, span, reading));
        }
        if let Some(r) = self.host_memory.take(span.1) {
            out.push(record(
                epoch,
                &host,
                meters::HOST_MEMORY_USED_BYTES,
                span,
                r,
            ));
        }
    }
}

/// A newer reading of the same generation never lowers a counter (readings taken
/// around a stop can arrive after the periodic one).
fn merge_counters(old: Option<InstanceUsage>, new: InstanceUsage) -> InstanceUsage {
    match old {
        Some(o) if o.generation == new.generation => {
            let max = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => b.or(a),
            };
            InstanceUsage {
                generation: new.generation,
                cpu_ns: max(o.cpu_ns, new.cpu_ns),
                memory_bytes: new.memory_bytes,
                disk_read_bytes: max(o.disk_read_bytes, new.disk_read_bytes),
                disk_write_bytes: max(o.disk_write_bytes, new.disk_write_bytes),
                net_rx_bytes: max(o.net_rx_bytes, new.net_rx_bytes),
                net_tx_bytes: max(o.net_tx_bytes, new.net_tx_bytes),
                run: new.run,
            }
        }
        _ => new,
    }
}

fn host_counters(
    epoch: u64,
    subject: &Subject,
    span: (UnixMillis, UnixMillis),
    u: &InstanceUsage,
) -> Vec<UsageRecord> {
    [
        (meters::CPU_NS, u.cpu_ns),
        (meters::DISK_READ_BYTES, u.disk_read_bytes),
        (meters::DISK_WRITE_BYTES, u.disk_write_bytes),
        (meters::NET_RX_BYTES, u.net_rx_bytes),
        (meters::NET_TX_BYTES, u.net_tx_bytes),
    ]
    .into_iter()
    .filter_map(|(meter, v)| {
        v.map(|total| {
            record(
                epoch,
                subject,
                meter,
                span,
                Reading::Counter {
                    generation: u.generation,
                    total,
                },
            )
        })
    })
    .collect()
}

/// Parses `/proc/stat`'s first line into (busy, total) milliseconds.
pub fn parse_proc_stat(text: &str, ticks_per_s: u64) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let ms = |t: u64| t * 1000 / ticks_per_s.max(1);
    Some((ms(total - idle), ms(total)))
}

/// Parses `/proc/net/dev` into received and sent bytes, loopback excluded.
pub fn parse_net_dev(text: &str) -> (u64, u64) {
    let mut rx = 0;
    let mut tx = 0;
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        rx += f.first().copied().unwrap_or(0);
        tx += f.get(8).copied().unwrap_or(0);
    }
    (rx, tx)
}

/// Reads the host's figures from `/proc`.
pub fn read_host() -> HostReading {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    // SAFETY: sysconf has no memory effects.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let (cpu_busy_ms, cpu_total_ms) =
        parse_proc_stat(&read("/proc/stat"), u64::try_from(ticks).unwrap_or(100))
            .unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let kb = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = kb("MemTotal:");
    let (net_rx_bytes, net_tx_bytes) = parse_net_dev(&read("/proc/net/dev"));
    HostReading {
        boot_time: sysinfo::System::boot_time().unwrap_or(0),
        cpu_busy_ms,
        cpu_total_ms,
        memory_used_bytes: total.saturating_sub(kb("MemAvailable:")),
        memory_total_bytes: total,
        net_rx_bytes,
        net_tx_bytes,
        uptime_s: sysinfo::System::uptime().unwrap_or(0),
    }
}

/// Counts running processes per configured application.
pub fn count_applications(apps: &[Application]) -> BTreeMap<String, u64> {
    let mut counts: BTreeMap<String, u64> = apps.iter().map(|a| (a.name.clone(), 0)).collect();
    if apps.is_empty() {
        return counts;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return counts;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = entry.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let exe = std::fs::read_link(dir.join("exe")).ok();
        for app in apps {
            let by_name = app
                .process_name
                .as_deref()
                .is_some_and(|n| comm.trim_end() == n);
            let by_path = app
                .path
                .as_deref()
                .is_some_and(|p| exe.as_deref() == Some(p));
            if by_name || by_path {
                *counts.entry(app.name.clone()).or_default() += 1;
            }
        }
    }
    counts
}

/// The running meter: its state, its spool, and the signal that records are waiting.
pub struct MeterHandle {
    /// The pure state.
    pub meter: Mutex<Meter>,
    /// The spool.
    pub spool: Arc<Mutex<Spool>>,
    /// Woken when records were spooled.
    pub spooled: tokio::sync::Notify,
    /// Records per batch.
    pub batch_records: usize,
    periods_file: PathBuf,
    checkpoint_file: PathBuf,
    clock: Arc<dyn Clock>,
}

impl MeterHandle {
    /// Applies periods the controller sent: from each group's next boundary. They are
    /// kept on disk, so a restarted agent keeps them.
    pub fn set_periods(&self, periods: MeteringPeriods) -> Result<UnixMillis, String> {
        periods.validate()?;
        let body = serde_json::to_vec(&periods).map_err(|e| e.to_string())?;
        write_atomic(&self.periods_file, &body, 0o600).map_err(|e| e.to_string())?;
        let from = self
            .meter
            .lock()
            .expect("meter poisoned")
            .set_periods(periods);
        tracing::info!(
            ?periods,
            effective_from_ms = from,
            "metering periods changed"
        );
        Ok(from)
    }

    /// The periods in force.
    pub fn periods(&self) -> MeteringPeriods {
        self.meter.lock().expect("meter poisoned").periods()
    }

    /// The clock.
    pub fn now_ms(&self) -> UnixMillis {
        self.clock.now_ms()
    }
}

/// Opens the spool in `<data_dir>/spool` and starts sampling until `cancel` fires.
pub fn start(
    data_dir: &Path,
    config: &MeteringConfig,
    clock: Arc<dyn Clock>,
    control: Arc<ControlPlane>,
    cancel: CancellationToken,
) -> std::io::Result<Arc<MeterHandle>> {
    config.validate().map_err(std::io::Error::other)?;
    let limits = SpoolLimits {
        max_bytes: config.spool_max_bytes,
        segment_bytes: config.spool_segment_bytes,
    };
    let (spool, recovery) = Spool::open(&data_dir.join("spool"), limits)?;
    if !recovery.damage.is_empty() {
        tracing::warn!(
            damaged = recovery.damage.len(),
            pending = recovery.pending,
            "usage spool recovered; damaged bytes were skipped (see the warnings above)"
        );
    }
    let epoch = spool.new_epoch(clock.now_ms())?;
    let periods_file = data_dir.join("metering.json");
    let periods = std::fs::read(&periods_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<MeteringPeriods>(&b).ok())
        .filter(|p| p.validate().is_ok())
        .unwrap_or_else(|| config.periods());
    let mut meter = Meter::new(epoch, periods, clock.now_ms());
    // The agent-kept counters of instances this agent still holds continue.
    let checkpoint_file = data_dir.join("meter-state.json");
    match std::fs::read(&checkpoint_file) {
        Ok(bytes) => match serde_json::from_slice::<Vec<InstanceCheckpoint>>(&bytes) {
            Ok(mut checkpoints) => {
                let held: Vec<String> = control.instances().into_iter().map(|i| i.id).collect();
                checkpoints.retain(|c| held.contains(&c.id));
                tracing::info!(
                    instances = checkpoints.len(),
                    "metering continues the counters of re-adopted instances"
                );
                meter.resume(checkpoints);
            }
            Err(e) => {
                tracing::warn!(error = %e, "metering checkpoint unreadable; counters start again")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(error = %e, "metering checkpoint unreadable; counters start again")
        }
    }
    let handle = Arc::new(MeterHandle {
        meter: Mutex::new(meter),
        spool: Arc::new(Mutex::new(spool)),
        spooled: tokio::sync::Notify::new(),
        batch_records: config.batch_records,
        periods_file,
        checkpoint_file,
        clock: clock.clone(),
    });
    tracing::info!(
        epoch,
        pending = recovery.pending,
        ?periods,
        "metering started"
    );
    tokio::spawn(sample_loop(handle.clone(), control, config.clone(), cancel));
    Ok(handle)
}

/// Whether the host may hold counters for an instance in `state`.
fn measurable(state: InstanceState) -> bool {
    !matches!(state, InstanceState::Terminated | InstanceState::Pending)
}

async fn sample_loop(
    handle: Arc<MeterHandle>,
    control: Arc<ControlPlane>,
    config: MeteringConfig,
    cancel: CancellationToken,
) {
    // Records the spool could not take yet (a full or failing disk): kept, in order,
    // and written with the next ones.
    let mut unspooled: Vec<UsageRecord> = Vec::new();
    loop {
        let notes = control.take_usage_notes();
        let mut readings = Vec::new();
        for instance in control.instances() {
            let usage = if measurable(instance.state) {
                control.usage(&instance).await
            } else {
                None
            };
            readings.push((instance, usage));
        }
        let apps = config.applications.clone();
        let (host, app_counts) =
            tokio::task::spawn_blocking(move || (read_host(), count_applications(&apps)))
                .await
                .unwrap_or_default();
        let now = handle.clock.now_ms();
        let mut records = std::mem::take(&mut unspooled);
        let mut checkpoint = None;
        let wait_ms = {
            let mut meter = handle.meter.lock().expect("meter poisoned");
            for (id, usage, at) in notes {
                if let Some(state) = readings
                    .iter()
                    .find(|(i, _)| i.id == id)
                    .map(|(i, _)| i.state)
                {
                    records.extend(meter.observe_instance(at.min(now), &id, state, Some(usage)));
                }
            }
            let running = readings
                .iter()
                .filter(|(i, _)| i.state == InstanceState::Running)
                .count() as u64;
            for (instance, usage) in &readings {
                if instance.state == InstanceState::Terminated
                    && !meter.instances.contains_key(&instance.id)
                {
                    continue;
                }
                meter.track(
                    &instance.id,
                    instance.state,
                    instance.state_changed_at_ms.min(now),
                );
                records.extend(meter.observe_instance(now, &instance.id, instance.state, *usage));
            }
            meter.observe_host(now, host);
            meter.observe_subscriptions(now, running, &app_counts);
            let period = meter.instance_period_start();
            records.extend(meter.due(now));
            if meter.instance_period_start() != period {
                checkpoint = Some(meter.checkpoint());
            }
            let resolution = i64::try_from(config.resolution.as_millis()).unwrap_or(5_000);
            (meter.next_due() - now).clamp(1, resolution.max(1))
        };
        if let Some(checkpoint) = checkpoint {
            // Before the records: a restarted agent then continues from totals at least
            // as high as any it spooled, never below them.
            let file = handle.checkpoint_file.clone();
            let saved = tokio::task::spawn_blocking(move || {
                let body = serde_json::to_vec(&checkpoint).map_err(std::io::Error::other)?;
                write_atomic(&file, &body, 0o600).inspect_err(|_| {
                    // A stale checkpoint could take counters backwards: none at all
                    // only starts them again.
                    let _ = std::fs::remove_file(&file);
                })
            })
            .await;
            if let Ok(Err(e)) | Err(e) = saved.map_err(std::io::Error::other) {
                tracing::warn!(error = %e, "metering checkpoint not written; a restart would start the agent-kept counters again");
            }
        }
        if !records.is_empty() {
            let spool = handle.spool.clone();
            let written = tokio::task::spawn_blocking(move || {
                let result = spool
                    .lock()
                    .expect("spool poisoned")
                    .append(records.clone());
                result.map_err(|e| (e, records))
            })
            .await;
            match written {
                Ok(Ok(_)) => handle.spooled.notify_one(),
                Ok(Err((e, records))) => {
                    tracing::error!(error = %e, records = records.len(), "usage records could not be spooled; they are kept in memory and written with the next ones");
                    unspooled = records;
                }
                Err(e) => tracing::error!(error = %e, "spool task failed"),
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 77;

    fn periods(ms: u64) -> MeteringPeriods {
        MeteringPeriods {
            instance_ms: ms,
            host_ms: ms,
            subscription_ms: ms,
        }
    }

    fn usage(generation: u64, cpu: u64, mem: u64) -> Option<InstanceUsage> {
        Some(InstanceUsage {
            generation,
            cpu_ns: Some(cpu),
            memory_bytes: Some(mem),
            ..Default::default()
        })
    }

    fn find<'a>(records: &'a [UsageRecord], meter: &str) -> Vec<&'a UsageRecord> {
        records.iter().filter(|r| r.meter == meter).collect()
    }

    const ID: &str = "i-00000000000000ab";

    #[test]
    fn a_period_yields_counters_gauges_and_time_in_state() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.observe_instance(0, ID, InstanceState::Running, usage(5, 100, 10));
        m.observe_instance(500, ID, InstanceState::Running, usage(5, 300, 30));
        assert!(m.due(999).is_empty(), "nothing before the boundary");
        let records = m.due(1000);
        let cpu = find(&records, meters::CPU_NS);
        assert_eq!(
            cpu[0].reading,
            Reading::Counter {
                generation: 5,
                total: 300
            }
        );
        assert_eq!((cpu[0].start_ms, cpu[0].end_ms), (0, 1000));
        // 10 bytes for 500 ms then 30 bytes for 500 ms.
        assert_eq!(
            find(&records, meters::MEMORY_BYTES)[0].reading,
            Reading::Gauge {
                last: 30,
                peak: 30,
                mean: 20
            }
        );
        assert_eq!(
            find(&records, meters::MEMORY_BYTE_MS)[0].reading,
            Reading::Counter {
                generation: EPOCH,
                total: 20_000
            }
        );
        assert_eq!(
            find(&records, meters::STATE_MS_RUNNING)[0].reading,
            Reading::Counter {
                generation: EPOCH,
                total: 1000
            }
        );
    }

    #[test]
    fn a_new_counter_generation_flushes_the_old_one_at_once() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.observe_instance(0, ID, InstanceState::Running, usage(1, 100, 0));
        m.observe_instance(400, ID, InstanceState::Running, usage(1, 700, 0));
        let flushed = m.observe_instance(600, ID, InstanceState::Running, usage(2, 50, 0));
        assert_eq!(
            find(&flushed, meters::CPU_NS)[0].reading,
            Reading::Counter {
                generation: 1,
                total: 700
            }
        );
        let records = m.due(1000);
        assert_eq!(
            find(&records, meters::CPU_NS)[0].reading,
            Reading::Counter {
                generation: 2,
                total: 50
            }
        );
    }

    #[test]
    fn new_periods_apply_from_the_next_boundary() {
        let mut m = Meter::new(EPOCH, periods(1000), 200);
        m.observe_host(200, HostReading::default());
        let from = m.set_periods(periods(300));
        assert_eq!(from, 1000);
        let first = m.due(1000);
        let r = find(&first, meters::HOST_CPU_TOTAL_MS)[0];
        assert_eq!(
            (r.start_ms, r.end_ms),
            (200, 1000),
            "the old period finishes"
        );
        assert!(m.due(1100).is_empty());
        let second = m.due(1200);
        let r = find(&second, meters::HOST_CPU_TOTAL_MS)[0];
        assert_eq!((r.start_ms, r.end_ms), (1000, 1200), "aligned to 300 ms");
        let third = m.due(1500);
        let r = find(&third, meters::HOST_CPU_TOTAL_MS)[0];
        assert_eq!((r.start_ms, r.end_ms), (1200, 1500));
        assert_eq!(m.periods(), periods(300));
    }

    #[test]
    fn a_long_pause_is_one_record_over_the_missed_periods() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.observe_host(0, HostReading::default());
        let r = m.due(5500);
        let r = find(&r, meters::HOST_UPTIME_S)[0];
        assert_eq!((r.start_ms, r.end_ms), (0, 5000));
    }

    #[test]
    fn subscription_meters_keep_the_peak() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        let apps = BTreeMap::from([("postgres".to_owned(), 1)]);
        m.observe_subscriptions(0, 1, &apps);
        m.observe_subscriptions(250, 3, &BTreeMap::from([("postgres".to_owned(), 2)]));
        m.observe_subscriptions(500, 2, &apps);
        let r = m.due(1000);
        assert_eq!(
            find(&r, meters::OS_INSTANCES)[0].reading,
            Reading::Gauge {
                last: 2,
                peak: 3,
                mean: 2
            }
        );
        let app = find(&r, "app.postgres")[0];
        assert!(matches!(
            app.reading,
            Reading::Gauge {
                peak: 2,
                last: 1,
                ..
            }
        ));
    }

    #[test]
    fn terminated_instances_report_once_more_and_are_forgotten() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.observe_instance(0, ID, InstanceState::Running, usage(1, 10, 0));
        m.observe_instance(300, ID, InstanceState::Terminated, None);
        let r = m.due(1000);
        assert_eq!(
            find(&r, meters::STATE_MS_RUNNING)[0].reading,
            Reading::Counter {
                generation: EPOCH,
                total: 300
            }
        );
        assert!(find(&r, "state_ms.terminated").is_empty());
        assert!(m.due(2000).iter().all(|r| r.subject == Subject::Host));
    }

    /// An instance that started between two samples is metered from its start.
    #[test]
    fn time_between_a_start_and_the_first_sample_counts() {
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.track(ID, InstanceState::Running, 200);
        m.observe_instance(700, ID, InstanceState::Running, usage(5, 100, 10));
        assert_eq!(
            running_ms(&m.due(1000)),
            Reading::Counter {
                generation: EPOCH,
                total: 800
            }
        );
        // One that was running before this agent process started counts from its start.
        let mut m = Meter::new(EPOCH, periods(1000), 500);
        m.track(ID, InstanceState::Running, 100);
        m.observe_instance(700, ID, InstanceState::Running, usage(5, 100, 10));
        assert_eq!(
            running_ms(&m.due(1000)),
            Reading::Counter {
                generation: EPOCH,
                total: 500
            }
        );
        // Seen pending at 100, running since 300 by the next sample at 900: running
        // from 300, not from 900.
        let mut m = Meter::new(EPOCH, periods(1000), 0);
        m.track(ID, InstanceState::Pending, 100);
        m.observe_instance(100, ID, InstanceState::Pending, None);
        m.track(ID, InstanceState::Running, 300);
        m.observe_instance(900, ID, InstanceState::Running, usage(5, 100, 10));
        let r = m.due(1000);
        assert_eq!(
            running_ms(&r),
            Reading::Counter {
                generation: EPOCH,
                total: 700
            }
        );
        assert_eq!(
            find(&r, "state_ms.pending")[0].reading,
            Reading::Counter {
                generation: EPOCH,
                total: 200
            }
        );
    }

    fn running_ms(records: &[UsageRecord]) -> Reading {
        find(records, meters::STATE_MS_RUNNING)[0].reading
    }

    fn with_run(run: u64) -> Option<InstanceUsage> {
        Some(InstanceUsage {
            run: Some(run),
            ..usage(5, 100, 10).unwrap()
        })
    }

    /// An agent killed at 1400 ms, restarted at 2500 ms: the same run kept going, so
    /// its time counts from the checkpoint on, in the same counter generation.
    #[test]
    fn a_readopted_instance_is_metered_for_the_time_the_agent_was_away() {
        let mut first = Meter::new(EPOCH, periods(1000), 0);
        first.observe_instance(0, ID, InstanceState::Running, with_run(7));
        first.observe_instance(1000, ID, InstanceState::Running, with_run(7));
        assert_eq!(
            running_ms(&first.due(1000)),
            Reading::Counter {
                generation: EPOCH,
                total: 1000
            }
        );
        let checkpoint = first.checkpoint();
        first.observe_instance(1400, ID, InstanceState::Running, with_run(7));
        drop(first);

        let mut second = Meter::new(EPOCH + 1, periods(1000), 2500);
        second.resume(checkpoint.clone());
        assert!(
            second.due(2000).iter().all(|r| r.subject == Subject::Host),
            "nothing for an instance not seen again yet"
        );
        second.observe_instance(2500, ID, InstanceState::Running, with_run(7));
        assert_eq!(
            running_ms(&second.due(3000)),
            Reading::Counter {
                generation: EPOCH,
                total: 3000
            },
            "from 0 to 3000 without a hole"
        );

        // Another run (it was restarted, or ended and was started again): the gap is
        // not charged, the counter still goes on.
        let mut third = Meter::new(EPOCH + 2, periods(1000), 2500);
        third.resume(checkpoint);
        third.observe_instance(2500, ID, InstanceState::Running, with_run(8));
        assert_eq!(
            running_ms(&third.due(3000)),
            Reading::Counter {
                generation: EPOCH,
                total: 1500
            }
        );
    }

    #[test]
    fn host_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(parse_proc_stat(stat, 100), Some((1500, 10000)));
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 100 1 0 0 0 0 0 0 200 1 0 0 0 0 0 0\n";
        assert_eq!(parse_net_dev(dev), (100, 200));
    }
}
