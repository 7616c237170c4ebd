//! The Surplus host agent.
//!
//! It enrolls once with a join token ([`enroll`]), then keeps a mutually authenticated
//! QUIC session with the controller ([`session`]): hello, inventory ([`inventory`]),
//! heartbeats, certificate renewal, and answers to the controller's requests, among
//! them the primary control interface ([`control`]) and its compatibility kit
//! ([`compat`]). It never runs an arbitrary command: what the controller may ask for is
//! a closed set of messages matched in one place.

pub use surplus_runtime::backoff;
pub mod bench;
pub mod compat;
pub mod config;
pub mod control;
pub mod enroll;
pub mod identity;
pub mod inventory;
pub mod local;
pub mod meter;
pub mod metrics;
pub mod net;
pub mod runtime;
pub mod security;
pub mod session;
pub mod spool;
pub mod validation;

pub use config::{AgentConfig, LogFormat};
pub use identity::Identity;
pub use session::{Runner, Session, SessionError};
