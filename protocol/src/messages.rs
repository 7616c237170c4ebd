//! Every message an agent and the controller exchange.
//!
//! One exchange is one bidirectional QUIC stream: the side that opens it writes one
//! request frame and finishes its half, the other side answers with one frame. The
//! agent opens streams for reports (hello, heartbeats, inventory, renewal); the
//! controller opens streams for commands (ping, validation, control).
//!
//! Variants are only ever appended: bincode encodes a variant by its position, and
//! `Error` stays first so that a peer of another version can still read why it was
//! refused.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bench::BenchReport;
use crate::clock::UnixMillis;
use crate::control::{Command, CompatReport, ControlFailure, ControlReply};
use crate::inventory::Inventory;
use crate::security::SecurityReport;
use crate::usage::{MeteringAck, MeteringPeriods, UsageAck, UsageBatch};

/// What travels in one frame: the protocol version and one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// [`crate::PROTOCOL_VERSION`] of the sender.
    pub version: u16,
    /// The message itself.
    pub message: Message,
}

/// The closed set of messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// The request could not be served; the stream ends here.
    Error(ErrorReply),
    /// Agent → controller: first exchange of every session.
    Hello(Hello),
    /// Controller → agent: the session is accepted.
    HelloAck(HelloAck),
    /// Agent → controller (enrollment endpoint): a join token and a CSR.
    EnrollRequest(EnrollRequest),
    /// Controller → agent: the agent's identity and certificate.
    Enrolled(Enrolled),
    /// Agent → controller: still alive, with a few live figures.
    Heartbeat(Heartbeat),
    /// Controller → agent: heartbeat recorded.
    HeartbeatAck(HeartbeatAck),
    /// Agent → controller: the full host inventory.
    InventoryReport(Box<Inventory>),
    /// Controller → agent: inventory stored.
    InventoryAck(InventoryAck),
    /// Agent → controller: a CSR for a fresh certificate before the current one expires.
    RenewRequest(RenewRequest),
    /// Controller → agent: the renewed certificate.
    Renewed(IssuedCertificate),
    /// Controller → agent: are you there (round-trip measurement).
    Ping(Ping),
    /// Agent → controller: answer to [`Message::Ping`] (and the reverse).
    Pong(Pong),
    /// Controller → agent: run validation tests. The agent answers with any number of
    /// [`Message::ValidationProgress`] frames, then one [`Message::ValidationResult`].
    RunValidation(ValidationRequest),
    /// Agent → controller: a validation run moved on.
    ValidationProgress(ValidationProgress),
    /// Agent → controller: the final frame of a validation run.
    ValidationResult(Box<ValidationReport>),
    /// Controller → agent: stop a running validation.
    CancelValidation(CancelValidation),
    /// Agent → controller: answer to [`Message::CancelValidation`].
    CancelAck(CancelAck),
    /// Agent → controller: bytes for the network throughput measurement.
    NetworkProbe(NetworkProbe),
    /// Controller → agent: how many probe bytes arrived.
    NetworkProbeAck(NetworkProbeAck),
    /// Controller → agent: one operation of the primary control interface.
    Control(Command),
    /// Agent → controller: the answer to [`Message::Control`].
    ControlResult(Result<ControlReply, ControlFailure>),
    /// Agent → controller: conformance results of the agent's driver.
    CompatReport(CompatReport),
    /// Controller → agent: the report is stored.
    CompatAck(CompatAck),
    /// Agent → controller: usage records from the spool, oldest first.
    UsageBatch(UsageBatch),
    /// Controller → agent: the batch is committed (acknowledged only after commit).
    UsageAck(UsageAck),
    /// Controller → agent: new sampling periods, applied from the next boundary.
    SetMetering(MeteringPeriods),
    /// Agent → controller: the periods are applied.
    MeteringAck(MeteringAck),
    /// Controller → agent: a notice to the host's provider that concerns this host (a
    /// resell request's outcome, a listing delisted after a re-test, ...).
    HostNotice(HostNotice),
    /// Agent → controller: the notice is recorded on the host.
    HostNoticeAck(HostNoticeAck),
    /// Agent → controller: the host's provider takes capacity on this host back
    /// (`surplus-agent reclaim`).
    Reclaim(ReclaimRequest),
    /// Controller → agent: the reservations given notice, or why none could be.
    ReclaimResult(Result<Vec<Reclaimed>, String>),
    /// Controller ↔ controller: federation (`crate::peer`); refused on agent sessions.
    Peer(Box<crate::peer::PeerMessage>),
}

impl Message {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Error(_) => "error",
            Message::Hello(_) => "hello",
            Message::HelloAck(_) => "hello-ack",
            Message::EnrollRequest(_) => "enroll-request",
            Message::Enrolled(_) => "enrolled",
            Message::Heartbeat(_) => "heartbeat",
            Message::HeartbeatAck(_) => "heartbeat-ack",
            Message::InventoryReport(_) => "inventory-report",
            Message::InventoryAck(_) => "inventory-ack",
            Message::RenewRequest(_) => "renew-request",
            Message::Renewed(_) => "renewed",
            Message::Ping(_) => "ping",
            Message::Pong(_) => "pong",
            Message::RunValidation(_) => "run-validation",
            Message::ValidationProgress(_) => "validation-progress",
            Message::ValidationResult(_) => "validation-result",
            Message::CancelValidation(_) => "cancel-validation",
            Message::CancelAck(_) => "cancel-ack",
            Message::NetworkProbe(_) => "network-probe",
            Message::NetworkProbeAck(_) => "network-probe-ack",
            Message::Control(_) => "control",
            Message::ControlResult(_) => "control-result",
            Message::CompatReport(_) => "compat-report",
            Message::CompatAck(_) => "compat-ack",
            Message::UsageBatch(_) => "usage-batch",
            Message::UsageAck(_) => "usage-ack",
            Message::SetMetering(_) => "set-metering",
            Message::MeteringAck(_) => "metering-ack",
            Message::HostNotice(_) => "host-notice",
            Message::HostNoticeAck(_) => "host-notice-ack",
            Message::Reclaim(_) => "reclaim",
            Message::ReclaimResult(_) => "reclaim-result",
            Message::Peer(p) => p.kind(),
        }
    }

    /// An error reply with `code` and a human message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Message::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorReply {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Error codes carried in [`ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorCode {
    /// The peers speak different protocol versions.
    VersionMismatch,
    /// The join token is not known to this controller.
    TokenUnknown,
    /// The join token has expired.
    TokenExpired,
    /// The join token was already used.
    TokenUsed,
    /// The certificate signing request is unusable.
    CsrRejected,
    /// The message is not valid here (wrong order, wrong endpoint).
    Unexpected,
    /// The agent has been revoked.
    Revoked,
    /// The controller failed to serve a valid request.
    Internal,
    /// The controller is too busy to take this now (its usage ingest queue is full);
    /// send it again after a pause.
    Busy,
}

/// First message of every agent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The agent's software version.
    pub agent_version: String,
    /// Host boot time (seconds since the epoch); part of usage idempotency keys later.
    pub boot_epoch: u64,
    /// How the host isolates client instances (`None`: no control plane).
    pub isolation: Option<crate::control::Isolation>,
}

/// Acceptance of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HelloAck {
    /// The controller's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The controller's software version.
    pub controller_version: String,
    /// The agent id the controller read from the verified certificate.
    pub agent_id: Uuid,
    /// The controller's wall clock, for skew warnings.
    pub server_time_ms: UnixMillis,
    /// How often the controller expects heartbeats; liveness is judged against it.
    pub heartbeat_interval_ms: u64,
}

/// Join request sent to the enrollment endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// The secret part of the join token.
    pub token_secret: [u8; 32],
    /// PEM certificate signing request made from the agent's locally generated key.
    /// Only its public key is used: names are chosen by the controller.
    pub csr_pem: String,
    /// The host name, for people reading the registry.
    pub hostname: String,
    /// The agent's software version.
    pub agent_version: String,
}

/// A certificate issued by the controller's CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IssuedCertificate {
    /// PEM of the certificate.
    pub cert_pem: String,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// When the controller issued it (its `not_before` is set a little earlier for skew).
    pub issued_at_ms: UnixMillis,
    /// End of validity.
    pub not_after_ms: UnixMillis,
}

/// Successful enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Enrolled {
    /// The identity the controller chose; also the certificate's URI SAN.
    pub agent_id: Uuid,
    /// The agent certificate.
    pub certificate: IssuedCertificate,
    /// PEM of the controller CA (its SHA-256 must equal the token's pinned fingerprint).
    pub ca_pem: String,
    /// Where to open mutually authenticated sessions (`host:port`).
    pub controller_addresses: Vec<String>,
    /// TLS server name to verify on those sessions.
    pub server_name: String,
}

/// Periodic liveness report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// Increases by one per heartbeat within a session.
    pub seq: u64,
    /// Agent wall clock when sent.
    pub sent_at_ms: UnixMillis,
    /// Host uptime in seconds.
    pub uptime_secs: u64,
    /// One-minute load average.
    pub load_avg_1m: f64,
    /// Memory in use, bytes.
    pub memory_used_bytes: u64,
    /// SHA-256 of the inventory the agent last reported (all zero when none).
    pub inventory_digest: [u8; 32],
}

/// Heartbeat recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatAck {
    /// The controller's wall clock.
    pub server_time_ms: UnixMillis,
    /// The controller does not hold the inventory with the heartbeat's digest; send it.
    pub inventory_wanted: bool,
}

/// Inventory stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InventoryAck {
    /// The controller recorded a change against the previous inventory.
    pub changed: bool,
}

/// Certificate renewal request, sent over an authenticated session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenewRequest {
    /// PEM CSR of a freshly generated key.
    pub csr_pem: String,
}

/// Round-trip probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ping {
    /// Echoed in the [`Pong`].
    pub nonce: u64,
}

/// Answer to a [`Ping`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Pong {
    /// The ping's nonce.
    pub nonce: u64,
}

/// What a validation run should measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationRequest {
    /// The controller's id of the run.
    pub run_id: Uuid,
    /// Run the benchmark suite with these settings.
    pub bench: Option<BenchRequest>,
    /// Run the security checks.
    pub security: bool,
}

/// Benchmark settings the controller may choose. Where the scratch file goes is the
/// agent's own configuration: the controller never picks paths on a provider's host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BenchRequest {
    /// Time budget, ms.
    pub budget_ms: u64,
    /// Timed repetitions per measurement.
    pub repetitions: u32,
    /// Small sizes (smoke test).
    pub quick: bool,
    /// Bytes sent to the controller for the throughput measurement (bounded by the agent).
    pub network_bytes: u64,
}

/// Progress of a validation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationProgress {
    /// The run.
    pub run_id: Uuid,
    /// Steps finished.
    pub done: u32,
    /// Steps in all.
    pub total: u32,
    /// Step under way.
    pub step: String,
}

/// The outcome of a validation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ValidationReport {
    /// The run.
    pub run_id: Uuid,
    /// Agent software version that measured.
    pub agent_version: String,
    /// Benchmark figures, when asked for.
    pub bench: Option<BenchReport>,
    /// Security findings, when asked for.
    pub security: Option<SecurityReport>,
    /// The run was cancelled; the figures are partial.
    pub cancelled: bool,
}

/// Stop a validation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelValidation {
    /// The run.
    pub run_id: Uuid,
}

/// Answer to a cancellation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelAck {
    /// The run.
    pub run_id: Uuid,
    /// The agent was running it (and now stops).
    pub was_running: bool,
}

/// Throughput probe payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkProbe {
    /// Bytes to carry.
    pub data: Vec<u8>,
}

/// Throughput probe receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkProbeAck {
    /// Bytes received in the probe.
    pub received: u64,
}

/// Receipt of a [`CompatReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompatAck {
    /// The report is stored under this agent.
    pub agent_id: Uuid,
}

/// A notice of the marketplace to a host's provider about this host, delivered to its
/// agent (which records it beside its state and logs it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNotice {
    /// The notice's key: a repeated delivery carries the same.
    pub key: String,
    /// What it says (`resell.accepted`, `listing.delisted`, ...).
    pub kind: String,
    /// Its details, as JSON text.
    pub body_json: String,
    /// When the controller queued it.
    pub created_at_ms: UnixMillis,
}

/// What the host's provider takes back: a number of this host's reservations that
/// allow it (all of them without a count), or the reservation whose holder runs an
/// instance here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimRequest {
    /// How many (none: every one on this host that allows it).
    pub count: Option<u32>,
    /// The instance whose reservation is taken.
    pub instance: Option<String>,
}

/// A reservation on this host given notice of interruption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reclaimed {
    /// The reservation.
    pub reservation: uuid::Uuid,
    /// When its instances stop.
    pub deadline_ms: UnixMillis,
}

/// Receipt of a [`HostNotice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNoticeAck {
    /// The notice's key.
    pub key: String,
}
