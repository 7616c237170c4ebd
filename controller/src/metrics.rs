//! Prometheus metrics of the controller, served at `GET /metrics` (text exposition).
//!
//! Counters are incremented where things happen; gauges that describe the registry
//! are computed when scraped, so they cannot drift from the truth.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The controller's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Enrollment attempts by outcome.
    pub enrollments: Family<Labels, Counter>,
    /// Sessions opened (hello accepted).
    pub sessions: Counter,
    /// Session handshakes refused (no, foreign, or revoked certificate; bad TLS).
    pub handshake_failures: Counter,
    /// Heartbeats received.
    pub heartbeats: Counter,
    /// Inventory reports received, and how many were changes.
    pub inventory_reports: Family<Labels, Counter>,
    /// Certificates renewed.
    pub renewals: Counter,
    /// Agents revoked or cut off as revoked.
    pub revocations: Counter,
    /// Frames refused by reason; each reset one stream.
    pub frames_rejected: Family<Labels, Counter>,
    /// Control commands sent to agents, by action.
    pub control_commands: Family<Labels, Counter>,
    /// Seconds spent waiting for agents' answers to control commands, by action.
    pub control_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Usage records received, by result (`stored`, `duplicate`, `rejected`, and `busy`
    /// for records of batches refused while the ingest queue was full).
    pub usage_records: Family<Labels, Counter>,
    /// Usage group commits (each one transaction, one fsync, for one or more batches).
    pub usage_commits: Counter,
    /// Agents' answers that contradicted an instance's recorded spec, by the field that
    /// differed (`limits`, `labels`, ...). The recorded spec stays; nothing is billed
    /// from the answer.
    pub spec_contradictions: Family<Labels, Counter>,
}

/// Values read at scrape time.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Agents with an open session.
    pub connected: i64,
    /// Stored agents by status.
    pub by_status: Vec<(&'static str, i64)>,
}

impl Metrics {
    /// Counts an enrollment outcome (`registered`, `token_used`, ...).
    pub fn enrollment(&self, outcome: &'static str) {
        self.enrollments
            .get_or_create(&vec![("outcome", outcome)])
            .inc();
    }

    /// Counts a control command and the time its round trip took.
    pub fn observe_control(&self, action: &'static str, took: std::time::Duration) {
        let labels = vec![("action", action)];
        self.control_commands.get_or_create(&labels).inc();
        self.control_seconds
            .get_or_create(&labels)
            .inc_by(took.as_secs_f64());
    }

    /// Counts a refused frame.
    pub fn frame_rejected(&self, reason: &'static str) {
        self.frames_rejected
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// Counts an inventory report.
    pub fn inventory(&self, changed: bool) {
        let label = if changed { "changed" } else { "unchanged" };
        self.inventory_reports
            .get_or_create(&vec![("result", label)])
            .inc();
    }

    /// The text exposition of every metric plus `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let mut registry = Registry::with_prefix("surplus");
        registry.register(
            "enrollments",
            "Enrollment attempts by outcome",
            self.enrollments.clone(),
        );
        registry.register("sessions", "Agent sessions opened", self.sessions.clone());
        registry.register(
            "handshake_failures",
            "Session handshakes refused",
            self.handshake_failures.clone(),
        );
        registry.register("heartbeats", "Heartbeats received", self.heartbeats.clone());
        registry.register(
            "inventory_reports",
            "Inventory reports received",
            self.inventory_reports.clone(),
        );
        registry.register(
            "certificate_renewals",
            "Agent certificates renewed",
            self.renewals.clone(),
        );
        registry.register("revocations", "Agents revoked", self.revocations.clone());
        registry.register(
            "control_commands",
            "Control commands sent to agents",
            self.control_commands.clone(),
        );
        registry.register(
            "control_seconds",
            "Seconds waiting for agents to answer control commands",
            self.control_seconds.clone(),
        );
        registry.register(
            "usage_records",
            "Usage records received, by result",
            self.usage_records.clone(),
        );
        registry.register(
            "usage_commits",
            "Usage group commits, each one transaction for one or more batches",
            self.usage_commits.clone(),
        );
        registry.register(
            "instance_spec_contradictions",
            "Agents' answers that contradicted an instance's recorded spec, by field",
            self.spec_contradictions.clone(),
        );
        registry.register(
            "frames_rejected",
            "Frames refused (each reset one stream)",
            self.frames_rejected.clone(),
        );
        let connected = Gauge::<i64, AtomicI64>::default();
        connected.set(snapshot.connected);
        registry.register("agents_connected", "Agents with an open session", connected);
        let by_status = Family::<Labels, Gauge<i64, AtomicI64>>::default();
        for (status, n) in &snapshot.by_status {
            by_status.get_or_create(&vec![("status", *status)]).set(*n);
        }
        registry.register("agents", "Registered agents by status", by_status);
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric_with_its_labels() {
        let m = Metrics::default();
        m.enrollment("registered");
        m.enrollment("token_used");
        m.enrollment("token_used");
        m.frame_rejected("too_large");
        m.heartbeats.inc();
        let text = m.render(&Snapshot {
            connected: 3,
            by_status: vec![("online", 3), ("revoked", 1)],
        });
        for line in [
            "surplus_enrollments_total{outcome=\"token_used\"} 2",
            "surplus_enrollments_total{outcome=\"registered\"} 1",
            "surplus_frames_rejected_total{reason=\"too_large\"} 1",
            "surplus_heartbeats_total 1",
            "surplus_agents_connected 3",
            "surplus_agents{status=\"revoked\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
