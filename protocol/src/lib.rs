//! Wire protocol shared by the Surplus agent and controller.
//!
//! This crate owns every type that crosses the wire between an agent and the controller,
//! the one codec that turns them into bytes ([`codec`]), the join token format
//! ([`token`]), the injected clock both sides use ([`clock`]), and thin helpers that run
//! one request/response exchange over a QUIC bidirectional stream ([`quic`]).
//!
//! It must not know about storage, HTTP or the host: it is the contract, not a service.

pub mod bench;
pub mod clock;
pub mod codec;
pub mod control;
pub mod inventory;
pub mod messages;
pub mod peer;
#[cfg(feature = "net")]
pub mod quic;
pub mod security;
pub mod token;
pub mod usage;

pub use codec::FrameError;
pub use inventory::Inventory;
pub use messages::*;

/// Version of the message set. Bumped on any incompatible change to [`messages`]; the
/// byte fixtures in `codec` tests fail when the encoding changes without a bump.
pub const PROTOCOL_VERSION: u16 = 2;

/// ALPN of mutually authenticated agent sessions.
pub const ALPN: &[u8] = b"surplus/1";

/// ALPN of the enrollment endpoint, the only place a peer without a client certificate
/// may talk to the controller, and only to exchange a join token for a certificate.
pub const ENROLL_ALPN: &[u8] = b"surplus-enroll/1";

/// Default upper bound of one frame's payload (1 MiB). Configurable on both sides.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;

/// The URI SAN scheme that binds an agent id into its certificate.
pub const AGENT_URI_PREFIX: &str = "surplus://agent/";
