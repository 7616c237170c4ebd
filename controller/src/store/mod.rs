//! Storage: one small trait per capability, implemented by each backend.
//!
//! Callers see the traits (or [`Store`], their sum) only: [`sqlite::SqliteStore`], the
//! embedded default, and [`postgres::PgStore`] run the same statements (`sql`), and
//! one story suite (`tests/tests/stories.rs`) runs against both. Everything that must
//! be atomic (consuming a join token and registering the agent; a posting with its
//! balances and invoice lines; a usage batch with its cursors) is one method, one
//! transaction. [`open`] picks the backend from the configured database URL.

mod federation;
mod federation_sql;
mod pools;
mod pools_sql;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use federation::{
    FederationStore, JoinRefusal, PeerShare, PeerUsageIn, StoredBundle, StoredPeer,
    StoredSubscription, StoredTender,
};
pub use pools::{
    PoolBurst, PoolCharge, PoolDecide, PoolDecision, PoolEntity, PoolMember, PoolSlotRow,
    PoolState, PoolStore, SlotFacts, StoredPool, StoredPoolRequest,
};

/// Opens (creating or migrating as needed) the database that `database_url` names:
/// `postgres://...` (or `postgresql://`), `sqlite://PATH`, or empty for
/// `<data_dir>/controller.db`. A relative SQLite path is inside `data_dir`.
pub async fn open(
    database_url: &str,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match Backend::of(database_url, data_dir)? {
        Backend::Sqlite(path) => std::sync::Arc::new(sqlite::SqliteStore::open(&path).await?),
        Backend::Postgres(url) => std::sync::Arc::new(postgres::PgStore::open(&url).await?),
    })
}

pub use surplus_market::records::{
    AccountEntry, AgentStatus, InvoiceLine, Labels, Role, RunStatus, SessionRecord, UsageRow,
    ValidationRun,
};

impl From<surplus_market::records::UnknownValue> for StoreError {
    fn from(e: surplus_market::records::UnknownValue) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// The database a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database (the URL as given).
    Postgres(String),
}

impl Backend {
    /// Parses `database_url` (see [`open`]).
    pub fn of(database_url: &str, data_dir: &std::path::Path) -> Result<Self, StoreError> {
        let url = database_url.trim();
        if url.is_empty() {
            return Ok(Backend::Sqlite(data_dir.join("controller.db")));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Backend::Postgres(url.to_owned()));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreError::Config(
                    "database_url \"sqlite://\" names no file: give sqlite://PATH".into(),
                ));
            }
            return Ok(Backend::Sqlite(data_dir.join(path)));
        }
        let scheme = url.split("://").next().unwrap_or(url);
        Err(StoreError::Config(format!(
            "database_url with scheme {scheme:?} is not supported: use postgres://user:password@host/database or sqlite://PATH (empty: sqlite in the data directory)"
        )))
    }

    /// The URL for people: a PostgreSQL password is never shown.
    pub fn display(&self) -> String {
        match self {
            Backend::Sqlite(path) => format!("sqlite://{}", path.display()),
            Backend::Postgres(url) => postgres::redact(url),
        }
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Schema migration failed.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A record references something that does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A stored value does not parse (the database was edited by hand?).
    #[error("stored value is corrupt: {0}")]
    Corrupt(String),
    /// The database cannot be used as configured (wrong URL, unreachable, newer schema).
    #[error("{0}")]
    Config(String),
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No token with this secret.
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("join token has expired")]
    Expired,
    /// Already consumed.
    #[error("join token was already used")]
    Used,
}

/// Outcome of [`Store::enroll_agent`].
#[derive(Debug)]
pub enum EnrollOutcome {
    /// The token was consumed and the agent registered, with the token's labels.
    Registered(Labels),
    /// The token was refused; nothing changed.
    Refused(TokenRefusal),
}

/// A new join token (only the hash of its secret is stored).
#[derive(Debug, Clone)]
pub struct NewJoinToken {
    /// Token id.
    pub id: Uuid,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// Labels given to the agent that uses it.
    pub labels: Labels,
    /// Creation time.
    pub created_at_ms: UnixMillis,
    /// Expiry.
    pub expires_at_ms: UnixMillis,
    /// Who created it (account or `cli`).
    pub created_by: String,
}

/// A new agent, registered in the same transaction that consumes its token.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// Controller-chosen id.
    pub id: Uuid,
    /// Host name the agent reported.
    pub hostname: String,
    /// Agent software version.
    pub agent_version: String,
    /// First certificate serial.
    pub cert_serial: String,
    /// Its issue time.
    pub cert_issued_at_ms: UnixMillis,
    /// Its expiry.
    pub cert_not_after_ms: UnixMillis,
}

/// The facts of an inventory that a listing of agents shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryBrief {
    /// Logical CPUs.
    pub cpus: Option<u64>,
    /// Memory.
    pub memory_bytes: Option<u64>,
    /// Operating system name and version.
    pub os: Option<String>,
    /// GPUs (0 for a host without any; `None` before the first inventory).
    pub gpus: Option<u64>,
    /// The first GPU's model, else its vendor, else its PCI ids.
    pub gpu: Option<String>,
}

/// Which agents a listing shows, in which order, and which part of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Only the hosts of this provider (its `provider` label, `house` without one).
    pub provider: Option<String>,
    /// Only agents in this status.
    pub status: Option<AgentStatus>,
    /// Hostnames containing this (ASCII case ignored), or ids starting with it.
    pub text: Option<String>,
    /// Only agents with this label (key, value).
    pub label: Option<(String, String)>,
    /// Only hosts with (`true`) or without (`false`) a GPU.
    pub gpu: Option<bool>,
    /// Only agents whose last compatibility report has this level; `Some(None)`: only
    /// those that never reported.
    pub compat: Option<Option<surplus_protocol::control::CompatLevel>>,
    /// The order.
    pub sort: AgentSort,
    /// At most this many (all when `None`).
    pub limit: Option<u64>,
    /// Skipping this many.
    pub offset: u64,
}

/// The orders of a listing of agents. Every order ends with the id, so pages do not
/// overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentSort {
    /// Oldest enrollment first.
    #[default]
    Enrolled,
    /// By hostname.
    Hostname,
    /// By status, then hostname.
    Status,
    /// Most recently seen first.
    LastSeen,
    /// Most CPUs first.
    Cpus,
    /// Most memory first.
    Memory,
    /// Most GPUs first.
    Gpus,
    /// Highest measured uptime first.
    Uptime,
}

impl AgentSort {
    /// Every order with its name in the API.
    pub const ALL: [(&str, AgentSort); 8] = [
        ("enrolled", AgentSort::Enrolled),
        ("hostname", AgentSort::Hostname),
        ("status", AgentSort::Status),
        ("last_seen", AgentSort::LastSeen),
        ("cpus", AgentSort::Cpus),
        ("memory", AgentSort::Memory),
        ("gpus", AgentSort::Gpus),
        ("uptime", AgentSort::Uptime),
    ];
}

/// A page of agents.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentPage {
    /// The page.
    pub agents: Vec<ListedAgent>,
    /// How many agents the filter selects in all.
    pub total: u64,
    /// How many of the provider's agents (all agents without a provider) are in each
    /// status; the other filters do not apply.
    pub by_status: Vec<(AgentStatus, u64)>,
}

/// An agent as a listing shows it: the stored record without its inventory, the
/// inventory's facts, and the compatibility level its driver last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedAgent {
    /// The agent (`inventory` left out).
    pub agent: AgentRecord,
    /// Its inventory's facts.
    pub inventory: InventoryBrief,
    /// The level of its last compatibility-kit report.
    pub compat: Option<surplus_protocol::control::CompatLevel>,
}

impl InventoryBrief {
    /// The facts of a whole inventory.
    pub fn of(inventory: Option<&serde_json::Value>) -> Self {
        let Some(i) = inventory else {
            return Self::default();
        };
        let text = |p: &str| i.pointer(p).and_then(|v| v.as_str());
        let gpus = i.pointer("/gpus").and_then(|v| v.as_array());
        Self {
            cpus: i.pointer("/cpu/logical_cpus").and_then(|v| v.as_u64()),
            memory_bytes: i.pointer("/memory/total_bytes").and_then(|v| v.as_u64()),
            os: Self::os_text(text("/os/name"), text("/os/version")),
            gpus: Some(gpus.map_or(0, |g| g.len() as u64)),
            gpu: Self::gpu_text(
                text("/gpus/0/model"),
                text("/gpus/0/vendor"),
                text("/gpus/0/vendor_id"),
                text("/gpus/0/device_id"),
            ),
        }
    }

    /// `NVIDIA A100-SXM4-80GB`, else `NVIDIA`, else `0x10de:0x20b2`: what names a GPU
    /// best.
    pub fn gpu_text(
        model: Option<&str>,
        vendor: Option<&str>,
        vendor_id: Option<&str>,
        device_id: Option<&str>,
    ) -> Option<String> {
        // Spaces only, as SQL's `trim` in migration 0010.
        fn known(s: Option<&str>) -> Option<&str> {
            s.map(|s| s.trim_matches(' ')).filter(|s| !s.is_empty())
        }
        known(model)
            .or(known(vendor))
            .map(str::to_owned)
            .or_else(|| Some(format!("{}:{}", known(vendor_id)?, known(device_id)?)))
    }

    /// `Debian GNU/Linux 12`: the name and version, when there is a name.
    pub fn os_text(name: Option<&str>, version: Option<&str>) -> Option<String> {
        let name = name?;
        Some(
            format!("{name} {}", version.unwrap_or(""))
                .trim()
                .to_owned(),
        )
    }
}

/// An agent as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent id.
    pub id: Uuid,
    /// Host name.
    pub hostname: String,
    /// Labels from the join token.
    pub labels: Labels,
    /// Registry status.
    pub status: AgentStatus,
    /// Current certificate serial.
    pub cert_serial: String,
    /// Current certificate expiry.
    pub cert_not_after_ms: UnixMillis,
    /// Agent software version (last hello).
    pub agent_version: String,
    /// Enrollment time.
    pub enrolled_at_ms: UnixMillis,
    /// First session.
    pub first_seen_ms: Option<UnixMillis>,
    /// Last heartbeat or session event.
    pub last_seen_ms: Option<UnixMillis>,
    /// Start of the current online period.
    pub online_since_ms: Option<UnixMillis>,
    /// Online time accumulated over closed periods.
    pub online_total_ms: i64,
    /// Revocation time.
    pub revoked_at_ms: Option<UnixMillis>,
    /// Current inventory (JSON), if reported.
    pub inventory: Option<serde_json::Value>,
    /// Hex SHA-256 of the current inventory.
    pub inventory_digest: Option<String>,
    /// When the current inventory was recorded.
    pub inventory_updated_ms: Option<UnixMillis>,
    /// How the host isolates client instances (its agent's last hello).
    pub isolation: Option<surplus_protocol::control::Isolation>,
}

/// One recorded inventory change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InventoryChange {
    /// When it was recorded.
    pub recorded_at_ms: UnixMillis,
    /// Hex SHA-256 of the inventory.
    pub digest: String,
    /// The inventory.
    pub inventory: serde_json::Value,
}

/// Who an API token belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// Account name.
    pub account: String,
    /// Role.
    pub role: Role,
}

/// An instance run through the primary control interface, as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceRow {
    /// The agent that hosts it.
    pub agent_id: Uuid,
    /// The account that ran it.
    pub account: String,
    /// The role of the token that ran it: the owner is (`owner_role`, `account`).
    pub owner_role: Role,
    /// The client's idempotency token.
    pub client_token: Option<String>,
    /// Digest of the RunInstances request, to recognise a token reused for another one.
    pub request_hash: String,
    /// The instance: its spec as the client asked for it (and as modified since),
    /// which is the authority for billing, and what its host last reported of its
    /// state.
    pub record: surplus_protocol::control::Instance,
    /// When the controller accepted it.
    pub created_at_ms: UnixMillis,
    /// When the record last changed.
    pub updated_at_ms: UnixMillis,
    /// When a host first reported it running; `None`: it never started (no upfront fee
    /// is due).
    pub started_at_ms: Option<UnixMillis>,
    /// What the host last claimed against the recorded spec, for people (`None`: its
    /// answers agree). Never billed.
    pub contradiction: Option<String>,
}

impl InstanceRow {
    /// The principal that owns it.
    pub fn owner(&self) -> Principal {
        Principal {
            account: self.account.clone(),
            role: self.owner_role,
        }
    }
}

/// The outcome of claiming an instance id for a RunInstances request.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The row was inserted: go and run it.
    Created,
    /// The same owner already used this client token: here is that instance.
    Existing(Box<InstanceRow>),
}

/// A volume created through the primary control interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRow {
    /// The agent that holds it.
    pub agent_id: Uuid,
    /// The account that created it.
    pub account: String,
    /// The role of the token that created it: the owner is (`owner_role`, `account`).
    pub owner_role: Role,
    /// The agent's latest record.
    pub record: surplus_protocol::control::Volume,
    /// When the record last changed.
    pub updated_at_ms: UnixMillis,
}

impl VolumeRow {
    /// The principal that owns it.
    pub fn owner(&self) -> Principal {
        Principal {
            account: self.account.clone(),
            role: self.owner_role,
        }
    }
}

/// One agent's usage batch for [`Store::ingest_usage_batches`].
#[derive(Debug, Clone, Copy)]
pub struct IngestBatch<'a> {
    /// The agent that sent it.
    pub agent_id: Uuid,
    /// Its records.
    pub records: &'a [surplus_protocol::usage::UsageRecord],
    /// Its spool's state.
    pub spool: &'a surplus_protocol::usage::SpoolState,
}

/// What [`Store::ingest_usage_batches`] did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    /// Records stored for the first time.
    pub stored: u32,
    /// Records already stored (same key).
    pub duplicates: u32,
    /// Records refused, with (epoch, seq, reason); stored aside, never counted.
    pub rejected: Vec<(u64, u64, String)>,
}

/// A usage history query. `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// One agent's records.
    pub agent_id: Option<Uuid>,
    /// One subject (`host` or an instance id).
    pub subject: Option<String>,
    /// One account's instances.
    pub account: Option<String>,
    /// Only instances owned by this role (with `account`: one owner's instances).
    pub owner_role: Option<Role>,
    /// One meter.
    pub meter: Option<String>,
    /// Records ending after this.
    pub from_ms: UnixMillis,
    /// Records ending at or before this.
    pub to_ms: UnixMillis,
    /// Bucket width (an hour or a day).
    pub bucket_ms: i64,
}

/// An instance with a price plan, as a billing run sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Billable {
    /// The instance.
    pub instance: InstanceRow,
    /// Its rate card.
    pub plan: crate::billing::PricePlan,
    /// When the plan was attached (the instance was run).
    pub attached_at_ms: UnixMillis,
    /// The provider of its host (the agent's `provider` label).
    pub provider: String,
}

pub use surplus_market::billing::BilledPeriod;
pub use surplus_market::listings::Listing;
pub use surplus_market::pipeline::Pipeline;
pub use surplus_market::quality::Rating;
pub use surplus_market::resell::{Agreement, Provider, ResellRequest};

/// A resell request as stored: the provider's document and its pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct ResellRow {
    /// The request (its pipeline's `request`).
    pub id: Uuid,
    /// The provider's account.
    pub provider: String,
    /// The document as submitted.
    pub document: ResellRequest,
    /// Where it is.
    pub pipeline: Pipeline,
    /// Bumped by every step: a step applies only over the version it read.
    pub version: i64,
    /// When it was submitted.
    pub created_at_ms: UnixMillis,
    /// When it last moved.
    pub updated_at_ms: UnixMillis,
}

impl ResellRow {
    /// The pipeline still has something to do or wait for.
    pub fn open(&self) -> bool {
        self.pipeline.poll().is_some()
            || matches!(
                self.pipeline.stage,
                surplus_market::pipeline::Stage::Preliminary
                    | surplus_market::pipeline::Stage::Validating
            )
    }
}

/// What one step of a resell request writes, in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResellStep {
    /// Listings the step made (a listing already made for its request, set and
    /// category is left as it is).
    pub listings: Vec<Listing>,
    /// Notices to queue in the outbox (a key already queued is left as it is).
    pub notices: Vec<Notice>,
}

/// One usage record's contribution to a counter, for rating by parts of a period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterDelta {
    /// The meter.
    pub meter: String,
    /// Start of the record's period.
    pub start_ms: UnixMillis,
    /// End of the record's period.
    pub end_ms: UnixMillis,
    /// What it adds to the counter.
    pub delta: i64,
}

/// Something the controller must tell someone (a reservation made, an interruption
/// notice, an advisory), queued in the outbox in the transaction of the step that
/// decided it, and delivered from there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Idempotency key: a notice is queued once under its key.
    pub key: String,
    /// Whom it is for: a principal (`client:alice`) or an agent (`agent:<id>`).
    pub recipient: String,
    /// What it says, as a name (`reservation.made`, `interruption`, ...).
    pub kind: String,
    /// Its details.
    pub body: serde_json::Value,
}

/// A notice as queued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredNotice {
    /// The notice.
    #[serde(flatten)]
    pub notice: Notice,
    /// When it was queued.
    pub created_at_ms: UnixMillis,
    /// When it was delivered, once it was.
    pub delivered_at_ms: Option<UnixMillis>,
    /// Attempts to deliver it to the recipient's webhook so far.
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// When it is tried again, if it is.
    pub next_attempt_at_ms: Option<UnixMillis>,
}

/// A notice due for delivery to its recipient's webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The notice.
    pub notice: StoredNotice,
    /// The webhook's URL.
    pub url: String,
}

pub use surplus_market::Refusal as MarketRefusal;
pub use surplus_market::history::{HistoryQuery, PricePoint};
pub use surplus_market::interrupt::Notice as InterruptNotice;
pub use surplus_market::outbox::DeliveryAttempt;
pub use surplus_market::reservations::{Book, Ended, Request as ReservationRequest, Reservation};

/// What one step of the controller changes, applied in one transaction by
/// [`LedgerStore::apply_changes`]: postings (each with the invoice lines it carries),
/// each applied through `ledger::decide` in order, notices for the outbox and prices
/// for the pricing history. All or nothing: one refused posting applies nothing of the
/// set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChangeSet {
    /// Postings with their invoice lines, in the order they apply.
    pub postings: Vec<(crate::ledger::Posting, Vec<InvoiceLine>)>,
    /// Notices to queue (a key already queued is left as it is).
    pub notices: Vec<Notice>,
    /// Prices to record (an id already recorded is left as it is).
    pub prices: Vec<PricePoint>,
    /// Funds to hold or give back (after the postings).
    pub holds: Vec<HoldChange>,
}

/// A ledger hold placed or given back in a step (`ledger::hold_posting`).
#[derive(Debug, Clone, PartialEq)]
pub enum HoldChange {
    /// Hold `amount` of `client`'s funds under `key`, once: refused by the ledger's
    /// rule (and the whole step with it) when a prepaid client lacks the funds.
    Place {
        /// The hold's key, such as `auction-bid:{id}`.
        key: String,
        /// The client account (without `client:`).
        client: String,
        /// Its currency.
        currency: String,
        /// Minor units.
        amount: i64,
    },
    /// Give back what is held under `key`, once (nothing when nothing is held).
    Release {
        /// The hold's key.
        key: String,
    },
}

/// The change set a market step makes of what it decided (the reservations made or
/// ended), applied in the transaction that stores the decision.
pub type StepChanges<'a, T> = &'a (dyn Fn(&[T]) -> ChangeSet + Send + Sync);

/// The change set of one decision `T` (such as a spot clearing), applied in the
/// transaction that stores it.
pub type DecisionChanges<'a, T> = &'a (dyn Fn(&T) -> ChangeSet + Send + Sync);

/// An immediate quote as stored: the client it was given to and whether it was used.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredQuote {
    /// The quote.
    pub quote: surplus_market::quote::Quote,
    /// The client account it was given to: the only one that may accept it.
    pub holder: String,
    /// When it was accepted (a quote is honoured once).
    pub accepted_at_ms: Option<UnixMillis>,
}

/// What the offers of a search show of a listing's reservations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListingReservations {
    /// Reservations ever made on it.
    pub past: u64,
    /// The hosts held now or later (not free).
    pub held: Vec<Uuid>,
}

/// Why a posting was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The ledger refused it.
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for PostError {
    fn from(e: sqlx::Error) -> Self {
        PostError::Store(e.into())
    }
}

/// Agents, enrollment, sessions, inventory and API tokens: who is who.
#[async_trait]
pub trait RegistryStore: Send + Sync + std::fmt::Debug + 'static {
    /// Moves committed writes from the write-ahead log into the database, without
    /// blocking writers; called periodically so that commits never do it themselves.
    async fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Stores a new join token.
    async fn create_join_token(&self, token: &NewJoinToken) -> Result<(), StoreError>;

    /// Consumes the token with `secret_hash` and registers `agent`, atomically: of two
    /// racing calls with one token exactly one registers.
    async fn enroll_agent(
        &self,
        secret_hash: &str,
        now_ms: UnixMillis,
        agent: &NewAgent,
    ) -> Result<EnrollOutcome, StoreError>;

    /// Records a renewed certificate as the agent's current one.
    async fn record_certificate(
        &self,
        agent_id: Uuid,
        serial: &str,
        issued_at_ms: UnixMillis,
        not_after_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// One agent.
    async fn agent(&self, id: Uuid) -> Result<Option<AgentRecord>, StoreError>;

    /// All agents, oldest enrollment first.
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// One page of the agents `filter` selects (without their inventories: `inventory`
    /// is `None`, the few facts a listing shows come instead), in its order, with how
    /// many it selects
    /// in all and how many of the provider's (or all) agents are in each status;
    /// `now_ms` is the time uptime is measured at. Filtered, sorted and cut in the
    /// database: a page of a fleet of thousands decodes only its own rows.
    async fn agent_page(
        &self,
        filter: &AgentFilter,
        now_ms: UnixMillis,
    ) -> Result<AgentPage, StoreError>;

    /// Revokes an agent; `Ok(false)` when it already was. Unknown id: `NotFound`.
    async fn revoke_agent(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError>;

    /// Number of agents in each status.
    async fn agent_status_counts(&self) -> Result<Vec<(AgentStatus, i64)>, StoreError>;

    /// Ids of every revoked agent.
    async fn revoked_agents(&self) -> Result<Vec<Uuid>, StoreError>;

    /// Sets an agent's status (never out of `revoked`), accounting online time.
    async fn set_status(
        &self,
        id: Uuid,
        status: AgentStatus,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Records last-seen times in one transaction.
    async fn touch(&self, seen: &[(Uuid, UnixMillis)]) -> Result<(), StoreError>;

    /// Records a session start (and the agent version and isolation it announced).
    async fn session_started(
        &self,
        session: &SessionRecord,
        isolation: Option<&surplus_protocol::control::Isolation>,
    ) -> Result<(), StoreError>;

    /// Records a session end.
    async fn session_ended(
        &self,
        id: Uuid,
        now_ms: UnixMillis,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// Recent sessions of an agent, newest first.
    async fn sessions(&self, agent_id: Uuid, limit: u32) -> Result<Vec<SessionRecord>, StoreError>;

    /// Closes sessions and online periods left open by a controller that stopped
    /// without doing so (crash); run at start-up.
    async fn close_dangling(&self, now_ms: UnixMillis) -> Result<(), StoreError>;

    /// Stores an inventory; returns whether it differs from the previous one (and was
    /// added to the history).
    async fn save_inventory(
        &self,
        agent_id: Uuid,
        inventory: &serde_json::Value,
        digest: &str,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Inventory changes of an agent, newest first.
    async fn inventory_history(
        &self,
        agent_id: Uuid,
        limit: u32,
    ) -> Result<Vec<InventoryChange>, StoreError>;

    /// Stores an API token (hash only).
    async fn create_api_token(
        &self,
        token_hash: &str,
        principal: &Principal,
        label: &str,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// The principal of a token hash, unless revoked.
    async fn api_principal(&self, token_hash: &str) -> Result<Option<Principal>, StoreError>;
}

/// Validation runs and compatibility reports.
#[async_trait]
pub trait ValidationStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records a newly ordered validation run (status running).
    async fn create_validation_run(&self, run: &ValidationRun) -> Result<(), StoreError>;

    /// Records the end of a run; only a running run can end (`Ok(false)` otherwise).
    async fn finish_validation_run(&self, run: &ValidationRun) -> Result<bool, StoreError>;

    /// One run.
    async fn validation_run(&self, id: Uuid) -> Result<Option<ValidationRun>, StoreError>;

    /// Runs of an agent, newest first.
    async fn validation_runs(
        &self,
        agent_id: Uuid,
        limit: u32,
    ) -> Result<Vec<ValidationRun>, StoreError>;

    /// Stores an agent's latest compatibility results.
    async fn save_compat_report(
        &self,
        agent_id: Uuid,
        report: &surplus_protocol::control::CompatReport,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// An agent's latest compatibility results and when they arrived.
    async fn compat_report(
        &self,
        agent_id: Uuid,
    ) -> Result<Option<(surplus_protocol::control::CompatReport, UnixMillis)>, StoreError>;
}

/// Instances, their limits and volumes.
#[async_trait]
pub trait ControlStore: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts `row` unless its owner already used its client token, atomically: of
    /// two racing requests with one token exactly one is `Created`. A created
    /// instance is billed by `plan` (its host's rate card when it was run; `None`: not
    /// billed), and its requested limits are the first in force.
    async fn claim_instance(
        &self,
        row: &InstanceRow,
        plan: Option<&crate::billing::PricePlan>,
    ) -> Result<Claim, StoreError>;

    /// One instance.
    async fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError>;

    /// The instance `owner` ran with client token `token`, if any.
    async fn instance_by_token(
        &self,
        owner: &Principal,
        token: &str,
    ) -> Result<Option<InstanceRow>, StoreError>;

    /// Instances of one owner (all with `None`), oldest first.
    async fn instances(&self, owner: Option<&Principal>) -> Result<Vec<InstanceRow>, StoreError>;

    /// Instances hosted by one agent.
    async fn agent_instances(&self, agent_id: Uuid) -> Result<Vec<InstanceRow>, StoreError>;

    /// What the host last claimed against an instance's recorded spec (`None`: its
    /// answers agree again).
    async fn set_contradiction(
        &self,
        instance_id: &str,
        contradiction: Option<&str>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// The limits in force from `from_ms` on (RunInstances and each modification).
    async fn record_limits(
        &self,
        instance_id: &str,
        from_ms: UnixMillis,
        limits: &surplus_protocol::control::Limits,
    ) -> Result<(), StoreError>;

    /// Every change of an instance's limits, oldest first.
    async fn limits_history(
        &self,
        instance_id: &str,
    ) -> Result<Vec<(UnixMillis, surplus_protocol::control::Limits)>, StoreError>;

    /// Replaces the record of known instances (unknown ids are ignored); the first
    /// record in state running marks the instance started.
    async fn update_instances(
        &self,
        records: &[surplus_protocol::control::Instance],
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Inserts or replaces a volume.
    async fn put_volume(&self, row: &VolumeRow) -> Result<(), StoreError>;

    /// Records a snapshot `agent_id` took (again: the same record).
    async fn put_snapshot(
        &self,
        agent_id: Uuid,
        snapshot: &surplus_protocol::control::Snapshot,
    ) -> Result<(), StoreError>;

    /// The snapshots of these volumes, oldest first.
    async fn snapshots(
        &self,
        volume_ids: &[String],
    ) -> Result<Vec<surplus_protocol::control::Snapshot>, StoreError>;

    /// One volume.
    async fn volume(&self, id: &str) -> Result<Option<VolumeRow>, StoreError>;

    /// Volumes of one owner (all with `None`).
    async fn volumes(&self, owner: Option<&Principal>) -> Result<Vec<VolumeRow>, StoreError>;
}

/// Usage records and metering settings.
#[async_trait]
pub trait UsageStore: Send + Sync + std::fmt::Debug + 'static {
    /// Commits batches of usage records in one transaction (a group commit: one
    /// fsync for all of them): new records are stored with their counter deltas,
    /// records already stored (same key) are recognised, invalid ones are kept aside
    /// with the reason; each agent's spool state is stored too. One outcome per batch,
    /// in order; on error nothing is stored.
    async fn ingest_usage_batches(
        &self,
        batches: &[IngestBatch<'_>],
        now_ms: UnixMillis,
    ) -> Result<Vec<IngestOutcome>, StoreError>;

    /// How many group commits ([`Store::ingest_usage_batches`]) are worth running at
    /// once. Each takes its agents' usage locks, so any number is correct; more than
    /// one only helps where writers do not queue for one lock.
    fn ingest_lanes(&self) -> usize;

    /// [`Store::ingest_usage_batches`] of one batch.
    async fn ingest_usage(
        &self,
        agent_id: Uuid,
        records: &[surplus_protocol::usage::UsageRecord],
        spool: &surplus_protocol::usage::SpoolState,
        now_ms: UnixMillis,
    ) -> Result<IngestOutcome, StoreError> {
        let batch = IngestBatch {
            agent_id,
            records,
            spool,
        };
        let mut outcomes = self.ingest_usage_batches(&[batch], now_ms).await?;
        Ok(outcomes.pop().unwrap_or_default())
    }

    /// Usage history aggregated into buckets.
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;

    /// The counter deltas of one subject's records ending in `(from_ms, to_ms]`, for
    /// `meters`, oldest first.
    async fn counter_deltas(
        &self,
        subject: &str,
        meters: &[&str],
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<CounterDelta>, StoreError>;

    /// The end of the latest usage record stored from an agent: its usage has arrived
    /// up to there.
    async fn usage_through(&self, agent_id: Uuid) -> Result<Option<UnixMillis>, StoreError>;

    /// Records received after `since_ms` that end at or before `until_ms`: per subject
    /// and end, the latest time one was received.
    async fn received_since(
        &self,
        since_ms: UnixMillis,
        until_ms: UnixMillis,
    ) -> Result<Vec<(String, UnixMillis, UnixMillis)>, StoreError>;

    /// Stores the sampling periods set for an agent (its spool state is stored with
    /// each usage batch, by [`Store::ingest_usage_batches`]).
    async fn set_metering(
        &self,
        agent_id: Uuid,
        periods: &surplus_protocol::usage::MeteringPeriods,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// An agent's periods set through the API and its spool as last reported.
    async fn metering(
        &self,
        agent_id: Uuid,
    ) -> Result<
        (
            Option<surplus_protocol::usage::MeteringPeriods>,
            Option<surplus_protocol::usage::SpoolState>,
        ),
        StoreError,
    >;
}

/// Rate cards, billing runs and invoice lines.
#[async_trait]
pub trait BillingStore: Send + Sync + std::fmt::Debug + 'static {
    /// Sets the rate card instances run on an agent get from now on.
    async fn set_agent_price_plan(
        &self,
        agent_id: Uuid,
        plan: &crate::billing::PricePlan,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Instances with a price plan attached before `to_ms`.
    async fn billables(&self, to_ms: UnixMillis) -> Result<Vec<Billable>, StoreError>;

    /// A host's rate card, if its provider set one.
    async fn agent_price_plan(
        &self,
        agent_id: Uuid,
    ) -> Result<Option<crate::billing::PricePlan>, StoreError>;

    /// Records a billing run's period, rated now; `false` if it overlaps another period.
    async fn record_billing_run(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Periods billed before, ending after `since_ms`, other than `[from_ms, to_ms)`.
    async fn billed_periods(
        &self,
        since_ms: UnixMillis,
        except: (UnixMillis, UnixMillis),
    ) -> Result<Vec<BilledPeriod>, StoreError>;

    /// Marks a billed period's usage rated at `now_ms`.
    async fn mark_checked(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// What was billed for one instance and period so far, per meter: amount and
    /// quantity (charges and adjustments together).
    async fn billed(
        &self,
        instance_id: &str,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<BTreeMap<String, (i64, f64)>, StoreError>;

    /// Invoice lines, filtered by invoice, client, provider and period overlap.
    async fn invoice_lines(
        &self,
        invoice_id: Option<&str>,
        client: Option<&str>,
        provider: Option<&str>,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<InvoiceLine>, StoreError>;
}

/// The ledger: postings, balances and account policies, and the change sets of a
/// step (postings with the outbox's notices).
#[async_trait]
pub trait LedgerStore: Send + Sync + std::fmt::Debug + 'static {
    /// Applies a posting once (with the invoice lines it carries) in one transaction.
    async fn post(
        &self,
        posting: &crate::ledger::Posting,
        lines: &[InvoiceLine],
        now_ms: UnixMillis,
    ) -> Result<crate::ledger::Applied, PostError>;

    /// Applies a step's changes in one transaction, all or nothing, with the ledger's
    /// rule inside it: how each posting was taken, in order; the first refused posting
    /// refuses the whole set (its error), and then nothing of it is stored.
    async fn apply_changes(
        &self,
        changes: &ChangeSet,
        now_ms: UnixMillis,
    ) -> Result<Vec<crate::ledger::Applied>, PostError>;

    /// The newest `limit` notices queued for `recipient`, oldest first.
    async fn notices(&self, recipient: &str, limit: u32) -> Result<Vec<StoredNotice>, StoreError>;

    /// Whether an account may go below zero, when a policy was set for it.
    async fn account_policy(&self, account: &str) -> Result<Option<bool>, StoreError>;

    /// Whether an account may go below zero (overriding the default).
    async fn set_account_policy(
        &self,
        account: &str,
        allow_negative: bool,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Balances, of one account or all.
    async fn balances(
        &self,
        account: Option<&str>,
    ) -> Result<Vec<(String, String, i64)>, StoreError>;

    /// One account's postings in `[from_ms, to_ms)`.
    async fn account_entries(
        &self,
        account: &str,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<AccountEntry>, StoreError>;
}

/// Providers of capacity and their agreements (the resell pipeline's policy).
#[async_trait]
pub trait ResellStore: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts a provider or replaces its profile (keeping when it was first recorded);
    /// returns it as stored.
    async fn put_provider(&self, provider: &Provider) -> Result<Provider, StoreError>;

    /// One provider.
    async fn provider(&self, account: &str) -> Result<Option<Provider>, StoreError>;

    /// Every provider, by account.
    async fn providers(&self) -> Result<Vec<Provider>, StoreError>;

    /// Records a new agreement (its provider must exist: `NotFound` otherwise).
    async fn create_agreement(&self, agreement: &Agreement) -> Result<(), StoreError>;

    /// One agreement.
    async fn agreement(&self, id: &str) -> Result<Option<Agreement>, StoreError>;

    /// The agreements of a provider (every one without), newest first.
    async fn agreements(&self, provider: Option<&str>) -> Result<Vec<Agreement>, StoreError>;

    /// Ends an agreement at `now_ms` (`Ok(None)` when it was no longer in force then);
    /// returns it as ended.
    async fn end_agreement(
        &self,
        id: &str,
        now_ms: UnixMillis,
    ) -> Result<Option<Agreement>, StoreError>;

    /// A setting's JSON document (`platforms`, `categories`), if one was stored.
    async fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Stores a setting's JSON document, replacing the one before.
    async fn put_setting(
        &self,
        key: &str,
        value: &str,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Records a submitted resell request (version 0).
    async fn create_resell_request(&self, row: &ResellRow) -> Result<(), StoreError>;

    /// One resell request.
    async fn resell_request(&self, id: Uuid) -> Result<Option<ResellRow>, StoreError>;

    /// The resell requests of a provider (every one without), newest first.
    async fn resell_requests(&self, provider: Option<&str>) -> Result<Vec<ResellRow>, StoreError>;

    /// The requests whose pipeline is still open, oldest first.
    async fn open_resell_requests(&self) -> Result<Vec<ResellRow>, StoreError>;

    /// Applies one step of a request in one transaction: its pipeline as `row` holds
    /// it (stored as version `row.version + 1`) with the listings and notices the step
    /// makes. `Ok(false)`, and nothing written, when the stored version is no longer
    /// `row.version` (another step applied first).
    async fn advance_resell_request(
        &self,
        row: &ResellRow,
        step: &ResellStep,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Every listing, offered or delisted, oldest first.
    async fn listings(&self) -> Result<Vec<Listing>, StoreError>;

    /// One listing.
    async fn listing(&self, id: &str) -> Result<Option<Listing>, StoreError>;

    /// The listings whose re-test is due at `now_ms` (by the schedule or asked for) or
    /// under way, with when one was asked for.
    async fn due_listings(
        &self,
        now_ms: UnixMillis,
    ) -> Result<Vec<(Listing, Option<UnixMillis>)>, StoreError>;

    /// Asks for a re-test of a listing now (`false`: no such listing).
    async fn request_retest(&self, id: &str, now_ms: UnixMillis) -> Result<bool, StoreError>;

    /// Stores a listing as a re-test step left it, with the notices the step queues, in
    /// one transaction; `answered` clears the on-demand request made at that time.
    async fn put_listing(
        &self,
        listing: &Listing,
        answered: Option<UnixMillis>,
        notices: &[Notice],
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Records a rating (`false`: this client rated this instance already).
    async fn put_rating(&self, rating: &Rating) -> Result<bool, StoreError>;

    /// Ratings of one provider or all, newest first.
    async fn ratings(&self, provider: Option<&str>) -> Result<Vec<Rating>, StoreError>;
}

/// Delivery of the outbox to the accounts' webhooks.
#[async_trait]
pub trait NoticeStore: Send + Sync + std::fmt::Debug + 'static {
    /// Sets (`Some`) or removes (`None`) a recipient's webhook.
    async fn set_webhook(
        &self,
        recipient: &str,
        url: Option<&str>,
        now_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// A recipient's webhook.
    async fn webhook(&self, recipient: &str) -> Result<Option<String>, StoreError>;

    /// Undelivered notices whose recipient has a webhook and whose next attempt is due
    /// at `now_ms` (fewer than `max_attempts` made), oldest first: the oldest
    /// `per_recipient` of each recipient, at most `limit` in all.
    async fn deliverable(
        &self,
        now_ms: UnixMillis,
        max_attempts: u32,
        per_recipient: u32,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Undelivered notices to agents (recipients `agent:<id>`) whose next attempt is
    /// due at `now_ms` (fewer than `max_attempts` made), oldest first, at most `limit`.
    async fn agent_deliverable(
        &self,
        now_ms: UnixMillis,
        max_attempts: u32,
        limit: u32,
    ) -> Result<Vec<StoredNotice>, StoreError>;

    /// Looks at an undelivered notice again no sooner than `until_ms` (not an attempt).
    async fn postpone_notice(&self, key: &str, until_ms: UnixMillis) -> Result<(), StoreError>;

    /// Records an attempt: delivered, or failed with `next_at_ms` (`None`: given up).
    async fn record_attempt(
        &self,
        key: &str,
        attempt: &DeliveryAttempt,
        delivered: bool,
        next_at_ms: Option<UnixMillis>,
    ) -> Result<(), StoreError>;

    /// Every attempt to deliver a notice, in order.
    async fn attempts(&self, key: &str) -> Result<Vec<DeliveryAttempt>, StoreError>;
}

/// Reservations of listings' hosts (issue 16). Each change reads the listing's
/// reservations, asks `surplus_market::reservations::Book`, and writes what it decided,
/// in one transaction that no other change of the same listing interleaves with (SQLite:
/// the one write lock; PostgreSQL: an advisory lock per listing), so of many concurrent
/// requests for the last hosts exactly as many succeed as there were hosts.
#[async_trait]
pub trait ReservationStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reserves hosts of `listing` among `available` (its hosts on offer) for
    /// `request` at `now_ms` (`Book::handle_reserve`), and applies `changes` of what
    /// was made (the upfront fee's posting, the notices, the accepted quote's price) in
    /// the same transaction: a refused posting (a prepaid client without the funds)
    /// stores nothing. `quote`, when given, is marked accepted in it, once: a quote
    /// already accepted is refused (`quote_used`). The book's refusal (such as
    /// `sold_out`) comes back as the inner error, with nothing stored.
    async fn reserve(
        &self,
        listing: &str,
        available: &[Uuid],
        request: ReservationRequest,
        quote: Option<Uuid>,
        changes: StepChanges<'_, Reservation>,
        now_ms: UnixMillis,
    ) -> Result<Result<Vec<Reservation>, MarketRefusal>, PostError>;

    /// Releases reservation `id` of `listing` by `by` at `now_ms`
    /// (`Book::handle_release`) with the `changes` of the ended reservation in the
    /// same transaction; the book's refusal comes back as the inner error.
    async fn release_reservation(
        &self,
        listing: &str,
        id: Uuid,
        by: &str,
        changes: StepChanges<'_, Reservation>,
        now_ms: UnixMillis,
    ) -> Result<Result<Ended, MarketRefusal>, PostError>;

    /// Records the end of every reservation whose term ended at or before `now_ms`
    /// (`Book::poll_expired`), one listing per locked transaction with the `changes`
    /// of its ended reservations: each end is recorded and returned once, however
    /// many controllers share the database.
    async fn expire_reservations(
        &self,
        now_ms: UnixMillis,
        changes: StepChanges<'_, Reservation>,
    ) -> Result<Vec<Ended>, PostError>;

    /// Gives notice of interrupting the reservations `picks` of `listing` (each with
    /// its notice) at `now_ms`, with the `changes` of the reservations noticed, in one
    /// transaction under the listing's lock: the reservations noticed, and the book's
    /// refusal of each pick it may not interrupt (`Book::check_interrupt`: ended or
    /// released since it was chosen, or not for this cause), which is left out. One
    /// already under notice keeps its first notice and is left out too.
    async fn notice_interruptions(
        &self,
        listing: &str,
        picks: &[(Uuid, InterruptNotice)],
        changes: StepChanges<'_, Reservation>,
        now_ms: UnixMillis,
    ) -> Result<(Vec<Reservation>, Vec<MarketRefusal>), PostError>;

    /// Interruptions whose grace ended at or before `now_ms` and not yet applied:
    /// (listing, reservation, notice), earliest deadline first.
    async fn due_interruptions(
        &self,
        now_ms: UnixMillis,
    ) -> Result<Vec<(String, Uuid, InterruptNotice)>, StoreError>;

    /// Applies a due interruption once: ends the reservation at its notice's deadline
    /// (`Book::handle_interrupt`) with the `changes` of it, under the listing's lock,
    /// and marks the interruption done whatever the book says (a reservation released
    /// during its grace has nothing left to end: `None`). `None` too when another
    /// controller applied it first.
    async fn apply_interruption(
        &self,
        listing: &str,
        reservation: Uuid,
        changes: StepChanges<'_, Reservation>,
        now_ms: UnixMillis,
    ) -> Result<Option<Ended>, PostError>;

    /// The notice of interruption of a reservation, if one was given.
    async fn interruption(&self, reservation: Uuid) -> Result<Option<InterruptNotice>, StoreError>;

    /// The reservations that held a host at some instant of `[from_ms, to_ms)`: the
    /// ones a billing run of that period charges.
    async fn reservations_in(
        &self,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<Reservation>, StoreError>;

    /// Reservations not recorded as ended whose term ends at or before `until_ms`:
    /// the ones whose expiry is announced now.
    async fn ending_within(&self, until_ms: UnixMillis) -> Result<Vec<Reservation>, StoreError>;

    /// The reservation holding `host` at `now_ms`, if one does (one whose notice of
    /// interruption is past its deadline holds nothing, even before the tick records
    /// its end).
    async fn holding(
        &self,
        host: Uuid,
        now_ms: UnixMillis,
    ) -> Result<Option<Reservation>, StoreError>;

    /// The hosts `listing` sells whose agents are online now, in id order.
    async fn online_hosts_of(&self, listing: &str) -> Result<Vec<Uuid>, StoreError>;

    /// A listing that sells `host`, if one does (listed or not): such a host is
    /// controlled only by the holder of its reservation.
    async fn selling_listing(&self, host: Uuid) -> Result<Option<String>, StoreError>;

    /// Instances not terminated on a host whose reservation by their owner ended, while
    /// that owner holds the host no more: the ones to stop and terminate.
    async fn unreserved_instances(
        &self,
        now_ms: UnixMillis,
    ) -> Result<Vec<InstanceRow>, StoreError>;

    /// Per listing, reservations made ever and the hosts held at `now_ms` or later.
    async fn listing_reservations(
        &self,
        now_ms: UnixMillis,
    ) -> Result<BTreeMap<String, ListingReservations>, StoreError>;

    /// Stores a quote given to `holder`.
    async fn create_quote(
        &self,
        quote: &surplus_market::quote::Quote,
        holder: &str,
    ) -> Result<(), StoreError>;

    /// One quote.
    async fn quote(&self, id: Uuid) -> Result<Option<StoredQuote>, StoreError>;

    /// One reservation.
    async fn reservation(&self, id: Uuid) -> Result<Option<Reservation>, StoreError>;

    /// A listing's reservations as the book they make.
    async fn reservation_book(&self, listing: &str) -> Result<Book, StoreError>;

    /// A client's reservations, newest first.
    async fn reservations_of(&self, holder: &str) -> Result<Vec<Reservation>, StoreError>;
}

/// The pricing history (issue 16): what capacity sold for.
#[async_trait]
pub trait PriceHistoryStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records a price once (`false`: a point with its id was recorded already).
    async fn record_price(&self, point: &PricePoint) -> Result<bool, StoreError>;

    /// The points `query` asks for, oldest first (then by id), at most `limit`.
    async fn price_history(
        &self,
        query: &HistoryQuery,
        limit: u32,
    ) -> Result<Vec<PricePoint>, StoreError>;
}

/// A spot bid as stored (issue 16).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBid {
    /// The bid; its class is its listing.
    pub bid: surplus_market::spot::Bid,
    /// When its holder cancelled it (it takes no part from then on).
    pub cancelled_at_ms: Option<UnixMillis>,
    /// Units the last clearing gave it.
    pub allocated: u32,
}

/// A listing's spot market as stored: its timers and its last clearing.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotRow {
    /// The listing (the market's one class).
    pub listing: String,
    /// Time between periodic clearings.
    pub period_ms: i64,
    /// When the next periodic clearing is due.
    pub next_clearing_at_ms: UnixMillis,
    /// When a clearing on demand was asked for, if one is pending.
    pub requested_at_ms: Option<UnixMillis>,
    /// The last clearing's price.
    pub price: Option<u64>,
    /// When it cleared last.
    pub cleared_at_ms: Option<UnixMillis>,
}

/// What a clearing needs that is not in the market's rows: the shell reads it.
pub struct SpotInputs<'a> {
    /// The class's supply now (`None`: the listing sells no spot capacity now, and the
    /// clearing changes no host). Its capacity is counted again under the listing's
    /// lock: the hosts of `available` that no other kind of reservation holds.
    pub supply: Option<surplus_market::spot::Supply>,
    /// The listing's hosts on offer (listed and online).
    pub available: &'a [Uuid],
    /// The provider's goal, recorded with each reservation made.
    pub goal: surplus_market::resell::Goal,
    /// The notice a cause gets now (with the listing's grace).
    pub notice: &'a (dyn Fn(surplus_market::interrupt::Cause) -> InterruptNotice + Send + Sync),
    /// The id of the `n`th reservation a bid gets at this clearing.
    pub new_id: &'a (dyn Fn(Uuid, u32) -> Uuid + Send + Sync),
}

/// What one clearing of a listing's spot market did.
#[derive(Debug, Clone, PartialEq)]
pub struct SpotCleared {
    /// The engine's clearing.
    pub cleared: surplus_market::spot::Cleared,
    /// The reservations it made (hosts given to bids).
    pub made: Vec<Reservation>,
    /// The reservations it gave notice, each with its notice.
    pub noticed: Vec<(Reservation, InterruptNotice)>,
    /// The clearing before it, if there was one: (when, its price).
    pub previous: Option<(UnixMillis, u64)>,
    /// The holder's instances (not terminated) on each noticed reservation's host, by
    /// reservation: what its agent stops at the deadline.
    pub stopping: BTreeMap<Uuid, Vec<String>>,
    /// The bids that were given hosts.
    pub won: Vec<Uuid>,
    /// Spot reservations holding a host when it cleared (under notice or not).
    pub holding: usize,
}

/// The spot market's rows (issue 16).
#[async_trait]
pub trait SpotStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores `bid` (its class is its listing) under the listing's lock, opening the
    /// listing's market (clearing every `period_ms`) if it has none, with `changes`
    /// (the hold of a prepaid client's funds) in the same transaction: a refused
    /// posting stores nothing. A bid with the same id comes back as it was stored (a
    /// retried request), with `false`.
    async fn place_bid(
        &self,
        bid: &surplus_market::spot::Bid,
        period_ms: i64,
        changes: &ChangeSet,
        now_ms: UnixMillis,
    ) -> Result<(StoredBid, bool), PostError>;

    /// One bid.
    async fn spot_bid(&self, id: Uuid) -> Result<Option<StoredBid>, StoreError>;

    /// A client's bids, newest first.
    async fn spot_bids_of(&self, bidder: &str) -> Result<Vec<StoredBid>, StoreError>;

    /// Cancels bid `id` of `by` at `now_ms` and releases the hosts it holds
    /// (`Book::handle_release`, the holder's own act), with the `changes` of the
    /// reservations ended, in one transaction under the listing's lock. Refused as
    /// `unknown_bid` (not `by`'s) or `cancelled`.
    async fn cancel_bid(
        &self,
        id: Uuid,
        by: &str,
        changes: StepChanges<'_, Reservation>,
        now_ms: UnixMillis,
    ) -> Result<Result<(StoredBid, Vec<Reservation>), MarketRefusal>, PostError>;

    /// A listing's spot market.
    async fn spot_market(&self, listing: &str) -> Result<Option<SpotRow>, StoreError>;

    /// Asks for a clearing of `listing`'s market at `now_ms` (`false`: it has none).
    async fn request_clearing(&self, listing: &str, now_ms: UnixMillis)
    -> Result<bool, StoreError>;

    /// The listings whose market is due to clear at `now_ms`.
    async fn due_spot_markets(&self, now_ms: UnixMillis) -> Result<Vec<String>, StoreError>;

    /// Clears `listing`'s market if it is due at `now_ms`, in one transaction under the
    /// listing's lock: `SpotMarket::poll_clearing` on its rows and the supply given,
    /// `spot::assign` of the hosts, the reservations made and noticed, the bids'
    /// allocations, the market's timers, and the `changes` of it all. `None` when it
    /// was not due (another controller cleared it first).
    async fn clear_spot(
        &self,
        listing: &str,
        inputs: SpotInputs<'_>,
        changes: DecisionChanges<'_, SpotCleared>,
        now_ms: UnixMillis,
    ) -> Result<Option<SpotCleared>, PostError>;

    /// The reservations a bid was given, oldest first.
    async fn bid_reservations(&self, bid: Uuid) -> Result<Vec<Reservation>, StoreError>;

    /// The bid a spot reservation's host was given to.
    async fn bid_of(&self, reservation: Uuid) -> Result<Option<StoredBid>, StoreError>;

    /// A listing's spot clearing prices in force during `[from_ms, to_ms)`, as
    /// (instant, price): those within it and the last one before it.
    async fn spot_prices(
        &self,
        listing: &str,
        from_ms: UnixMillis,
        to_ms: UnixMillis,
    ) -> Result<Vec<(UnixMillis, u64)>, StoreError>;
}

/// An auction as stored (issue 16): the engine's state and what its lot is.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAuction {
    /// The engine's state, bids included.
    pub auction: surplus_market::auction::Auction,
    /// The listing whose host is the lot.
    pub listing: String,
    /// Its provider.
    pub provider: String,
    /// How long the winner holds the host (`None`: until released).
    pub term_ms: Option<i64>,
    /// The winner's reservation (its id is the auction's), once closed with a sale
    /// and a host to give.
    pub reservation: Option<Uuid>,
    /// When it closed.
    pub closed_at_ms: Option<UnixMillis>,
    /// When it was made.
    pub created_at_ms: UnixMillis,
}

/// What a close needs that is not in the auction's row.
pub struct AuctionInputs<'a> {
    /// The listing's hosts on offer (listed and online): the winner gets the lowest free.
    pub available: &'a [Uuid],
    /// The provider's goal, recorded with the reservation.
    pub goal: surplus_market::resell::Goal,
    /// The listing's interruptibility, given to the reservation.
    pub interruptibility: surplus_market::resell::Interruptibility,
}

/// What one step of an auction did: a bid accepted, and the close if it came.
#[derive(Debug, Clone, PartialEq)]
pub struct AuctionStep {
    /// The auction after the step.
    pub auction: StoredAuction,
    /// The bid accepted (`None` for a close alone).
    pub accepted: Option<Uuid>,
    /// The bid that can no longer win because of it.
    pub superseded: Option<Uuid>,
    /// The outcome, when the step closed the auction.
    pub closed: Option<surplus_market::auction::Outcome>,
    /// The winner's reservation, when the close gave it a host.
    pub made: Option<Reservation>,
    /// Why the winner got no host (every host of the listing held), when it did not.
    pub unfilled: Option<MarketRefusal>,
}

/// The auctions' rows (issue 16).
#[async_trait]
pub trait AuctionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores a new auction.
    async fn create_auction(&self, a: &StoredAuction) -> Result<(), StoreError>;

    /// One auction.
    async fn auction(&self, id: Uuid) -> Result<Option<StoredAuction>, StoreError>;

    /// Auctions, newest first: of one listing, or all; only those not closed when
    /// `open`; at most `limit`.
    async fn auctions(
        &self,
        listing: Option<&str>,
        open: bool,
        limit: u32,
    ) -> Result<Vec<StoredAuction>, StoreError>;

    /// Bids on auction `id` at `now_ms` (`Auction::handle_bid`) under its listing's
    /// lock; a bid that ends it (a buy-now, a Dutch take) closes it in the same
    /// transaction, with `inputs` for the winner's host. The engine's refusal comes
    /// back as the inner error, with nothing stored. `changes` of the step apply in
    /// its transaction.
    async fn bid_auction(
        &self,
        id: Uuid,
        bid: surplus_market::auction::Bid,
        inputs: AuctionInputs<'_>,
        changes: DecisionChanges<'_, AuctionStep>,
        now_ms: UnixMillis,
    ) -> Result<Result<AuctionStep, MarketRefusal>, PostError>;

    /// Auctions due to close at `now_ms`: (listing, id), earliest first.
    async fn due_auctions(&self, now_ms: UnixMillis) -> Result<Vec<(String, Uuid)>, StoreError>;

    /// Closes auction `id` if it is due at `now_ms` (`Auction::poll_close`), under its
    /// listing's lock and only while it is not closed: the outcome, the winner's
    /// reservation of a free host, and `changes`, in one transaction. `None` when it
    /// was not due or another controller closed it first.
    async fn close_auction(
        &self,
        id: Uuid,
        inputs: AuctionInputs<'_>,
        changes: DecisionChanges<'_, AuctionStep>,
        now_ms: UnixMillis,
    ) -> Result<Option<AuctionStep>, PostError>;
}

/// The storage contract: every capability's store, on one backend.
pub trait Store:
    RegistryStore
    + ValidationStore
    + ControlStore
    + UsageStore
    + BillingStore
    + LedgerStore
    + ResellStore
    + NoticeStore
    + ReservationStore
    + PriceHistoryStore
    + SpotStore
    + AuctionStore
    + PoolStore
    + FederationStore
{
}

impl<T> Store for T where
    T: RegistryStore
        + ValidationStore
        + ControlStore
        + UsageStore
        + BillingStore
        + LedgerStore
        + ResellStore
        + NoticeStore
        + ReservationStore
        + PriceHistoryStore
        + SpotStore
        + AuctionStore
        + PoolStore
        + FederationStore
{
}
