//! Wall-clock time, injected.
//!
//! Services take an `Arc<dyn Clock>` so tests can move time (certificate expiry, token
//! expiry, liveness) without sleeping. Pure functions take `now` as an argument instead.
//! Monotonic time for timeouts comes from tokio, which tests can pause.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, the one time unit on the wire and in storage.
pub type UnixMillis = i64;

/// Source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> UnixMillis;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> UnixMillis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: UnixMillis) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(start)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock to `at`.
    pub fn set_ms(&self, at: UnixMillis) {
        self.0.store(at, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> UnixMillis {
        self.0.load(Ordering::SeqCst)
    }
}

/// The system clock behind the trait object services take.
pub fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}
