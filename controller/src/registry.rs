//! Live agent sessions (C1), held in memory beside the stored registry.
//!
//! The stored registry is the truth that survives restarts; this module holds what only
//! matters while a session is open: the connection (to send commands and to cut a
//! revoked agent off), the last heartbeat, and which agents' last-seen times still need
//! writing. Liveness and uptime are pure functions of times passed in.

use std::collections::HashMap;
use std::sync::Mutex;

use quinn::Connection;
use surplus_protocol::clock::UnixMillis;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Something that happened in the registry; tests and (later) the UI subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// An agent enrolled.
    Enrolled(Uuid),
    /// An agent became online (session opened, or heartbeats resumed).
    Online(Uuid),
    /// An agent missed too many heartbeats.
    Unreachable(Uuid),
    /// An agent's session ended.
    Disconnected(Uuid),
    /// A heartbeat arrived.
    Heartbeat(Uuid),
    /// An inventory that differs from the previous one was recorded.
    InventoryChanged(Uuid),
    /// An agent renewed its certificate.
    Renewed {
        /// The agent.
        agent_id: Uuid,
        /// The new certificate's serial.
        serial: String,
    },
    /// An agent was revoked (and cut off if connected).
    Revoked(Uuid),
    /// A validation run reported progress.
    ValidationProgress(Uuid),
    /// The instances of a (re)connected agent were reconciled with its report.
    Reconciled(Uuid),
    /// An agent reported its driver's compatibility results.
    CompatReported(Uuid),
    /// A validation run ended.
    ValidationFinished {
        /// The run.
        run_id: Uuid,
        /// How it ended.
        status: crate::store::RunStatus,
    },
}

/// Whether an agent last heard from at `last_ms` is overdue at `now_ms`.
pub fn overdue(last_ms: UnixMillis, now_ms: UnixMillis, interval_ms: i64, missed: u32) -> bool {
    now_ms - last_ms > interval_ms * i64::from(missed.max(1))
}

/// Measured uptime: milliseconds online since first seen, and that as a fraction of
/// the time since first seen (`None` before the first session).
pub fn measured_uptime(
    first_seen_ms: Option<UnixMillis>,
    online_total_ms: i64,
    online_since_ms: Option<UnixMillis>,
    now_ms: UnixMillis,
) -> (i64, Option<f64>) {
    let online = online_total_ms + online_since_ms.map_or(0, |s| (now_ms - s).max(0));
    let ratio = first_seen_ms
        .map(|first| now_ms - first)
        .filter(|span| *span > 0)
        .map(|span| (online as f64 / span as f64).clamp(0.0, 1.0));
    (online, ratio)
}

#[derive(Debug)]
struct Live {
    session_id: Uuid,
    connection: Connection,
    last_heartbeat_ms: UnixMillis,
    online: bool,
    seen_dirty: bool,
    inventory_digest: Option<[u8; 32]>,
}

/// The live sessions.
#[derive(Debug)]
pub struct Registry {
    live: Mutex<HashMap<Uuid, Live>>,
    events: broadcast::Sender<RegistryEvent>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            events: broadcast::channel(4096).0,
        }
    }
}

impl Registry {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Live>> {
        self.live.lock().expect("registry lock poisoned")
    }

    /// Subscribes to registry events.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// Publishes an event (nobody listening is fine).
    pub fn publish(&self, event: RegistryEvent) {
        let _ = self.events.send(event);
    }

    /// Makes `session_id` the agent's current session; returns the connection of the
    /// session it replaces, which the caller closes.
    pub fn attach(
        &self,
        agent_id: Uuid,
        session_id: Uuid,
        connection: Connection,
        now_ms: UnixMillis,
    ) -> Option<Connection> {
        let previous = self.live().insert(
            agent_id,
            Live {
                session_id,
                connection,
                last_heartbeat_ms: now_ms,
                online: true,
                seen_dirty: true,
                inventory_digest: None,
            },
        );
        previous.map(|p| p.connection)
    }

    /// Removes the session if it is still the agent's current one.
    pub fn detach(&self, agent_id: Uuid, session_id: Uuid) -> bool {
        let mut live = self.live();
        if live
            .get(&agent_id)
            .is_some_and(|l| l.session_id == session_id)
        {
            live.remove(&agent_id);
            true
        } else {
            false
        }
    }

    /// Records a heartbeat; returns `Some(true)` when the agent was overdue and is back.
    pub fn heartbeat(&self, agent_id: Uuid, session_id: Uuid, now_ms: UnixMillis) -> Option<bool> {
        let mut live = self.live();
        let l = live
            .get_mut(&agent_id)
            .filter(|l| l.session_id == session_id)?;
        l.last_heartbeat_ms = now_ms;
        l.seen_dirty = true;
        let back = !l.online;
        l.online = true;
        Some(back)
    }

    /// The digest of the inventory last stored for a connected agent.
    pub fn inventory_digest(&self, agent_id: Uuid) -> Option<[u8; 32]> {
        self.live().get(&agent_id).and_then(|l| l.inventory_digest)
    }

    /// Remembers the digest of the inventory just stored.
    pub fn set_inventory_digest(&self, agent_id: Uuid, digest: [u8; 32]) {
        if let Some(l) = self.live().get_mut(&agent_id) {
            l.inventory_digest = Some(digest);
        }
    }

    /// Last-seen times not yet written, clearing them.
    pub fn take_seen(&self) -> Vec<(Uuid, UnixMillis)> {
        self.live()
            .iter_mut()
            .filter(|(_, l)| l.seen_dirty)
            .map(|(id, l)| {
                l.seen_dirty = false;
                (*id, l.last_heartbeat_ms)
            })
            .collect()
    }

    /// Marks agents whose heartbeats are overdue as not online; returns them.
    pub fn mark_overdue(&self, now_ms: UnixMillis, interval_ms: i64, missed: u32) -> Vec<Uuid> {
        self.live()
            .iter_mut()
            .filter(|(_, l)| l.online && overdue(l.last_heartbeat_ms, now_ms, interval_ms, missed))
            .map(|(id, l)| {
                l.online = false;
                *id
            })
            .collect()
    }

    /// The connection of a connected agent.
    pub fn connection(&self, agent_id: Uuid) -> Option<Connection> {
        self.live().get(&agent_id).map(|l| l.connection.clone())
    }

    /// Closes a connected agent's session; returns whether it was connected.
    pub fn kick(&self, agent_id: Uuid, code: quinn::VarInt, reason: &str) -> bool {
        match self.live().remove(&agent_id) {
            Some(l) => {
                l.connection.close(code, reason.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Ids of the agents with an open session.
    pub fn connected_agents(&self) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self.live().keys().copied().collect();
        ids.sort();
        ids
    }

    /// Number of agents with an open session.
    pub fn connected(&self) -> usize {
        self.live().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_agent_is_overdue_only_after_the_allowed_misses() {
        assert!(!overdue(0, 30_000, 10_000, 3));
        assert!(overdue(0, 30_001, 10_000, 3));
        assert!(
            overdue(0, 10_001, 10_000, 0),
            "zero misses allowed is treated as one"
        );
    }

    #[test]
    fn uptime_counts_closed_and_open_periods() {
        assert_eq!(measured_uptime(None, 0, None, 100), (0, None));
        assert_eq!(measured_uptime(Some(0), 30, Some(80), 100), (50, Some(0.5)));
        assert_eq!(measured_uptime(Some(0), 100, None, 100), (100, Some(1.0)));
    }

    proptest! {
        /// The model is a real history: first seen, then alternating offline and online
        /// stretches, the last one possibly still open at `now`. The store keeps only
        /// the closed total and the open start; the measure must equal the history's.
        #[test]
        fn uptime_is_the_online_time_of_the_history(
            first in 0i64..1_000_000,
            stretches in proptest::collection::vec((0i64..10_000, 1i64..10_000), 1..20),
            open in proptest::option::of(1i64..10_000),
            after in 0i64..10_000,
        ) {
            let mut at = first;
            let mut closed = 0;
            for (offline, online) in &stretches {
                at += offline;
                closed += online;
                at += online;
            }
            let since = open.map(|_| at);
            let now = at + open.unwrap_or(0) + if open.is_some() { 0 } else { after };
            let online_now = closed + open.unwrap_or(0);
            let (online, ratio) = measured_uptime(Some(first), closed, since, now);
            prop_assert_eq!(online, online_now);
            let expected = online_now as f64 / (now - first) as f64;
            prop_assert!((ratio.unwrap() - expected).abs() < 1e-12, "{:?} vs {}", ratio, expected);
        }
    }
}
