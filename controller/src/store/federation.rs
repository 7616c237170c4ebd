//! What the store keeps of federation (issue 18): this controller's id among its
//! peers, invitations, peers with their pinned CAs, shares, and the usage exchanged;
//! the trait both backends implement (`federation_sql.rs`).

use async_trait::async_trait;
use surplus_market::Refusal;
use surplus_market::exchange::MeterDelta;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::peer::{PeerRole, PeerUsageRow};
use uuid::Uuid;

use super::StoreError;

/// A peer as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPeer {
    /// The peer controller's id (`surplus://controller/<id>`).
    pub id: Uuid,
    /// Its name, for people.
    pub name: String,
    /// What it is to this controller.
    pub role: PeerRole,
    /// What this controller is to it.
    pub our_role: PeerRole,
    /// Its CA, pinned at peering: the only CA its certificate may chain to.
    pub ca_pem: String,
    /// The CA's SHA-256, hex.
    pub fingerprint: String,
    /// Where to dial it (`host:port`).
    pub addresses: Vec<String>,
    /// Its TLS server name.
    pub server_name: String,
    /// Whether this controller keeps the link up (the joiner dials).
    pub dials: bool,
    /// When it joined.
    pub joined_at_ms: UnixMillis,
    /// When it was removed.
    pub removed_at_ms: Option<UnixMillis>,
    /// When a message of it last arrived.
    pub last_seen_ms: Option<UnixMillis>,
    /// The last usage row made for it.
    pub out_seq: u64,
    /// The last usage row it acknowledged.
    pub acked_seq: u64,
    /// The last usage row received from it.
    pub in_seq: u64,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRefusal {
    /// No invitation with this secret.
    Unknown,
    /// The invitation has expired.
    Expired,
    /// The invitation was used.
    Used,
    /// The controller is a peer already.
    AlreadyPeer,
    /// The controller was a peer and was removed: it cannot join again under its id.
    Removed,
}

/// An account shared with a broker peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerShare {
    /// The broker.
    pub peer: Uuid,
    /// The account here.
    pub account: String,
    /// The user it is known as there.
    pub user: String,
    /// Minutes before this are exported.
    pub through_ms: UnixMillis,
}

/// A usage row received from a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerUsageIn {
    /// The host cloud it came from.
    pub peer: Uuid,
    /// The row.
    pub row: PeerUsageRow,
}

/// A subscription as stored: the pure rule's record, who pays its overage, in what.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSubscription {
    /// The limit, period and rate.
    pub subscription: surplus_market::brokerage::Subscription,
    /// The subscriber's administrator: the client account billed the overage.
    pub administrator: String,
    /// The overage rate's currency.
    pub currency: String,
    /// When its unused capacity may be contributed, every day; empty: at any time.
    pub availability: Vec<surplus_market::brokerage::DailyWindow>,
    /// When it was made.
    pub created_at_ms: UnixMillis,
    /// When it last changed.
    pub updated_at_ms: UnixMillis,
}

/// A bundle this controller placed with marketplace clouds, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBundle {
    /// The bundle.
    pub id: Uuid,
    /// Its resource.
    pub resource: String,
    /// Units held at every instant.
    pub amount: u64,
    /// The interval's start.
    pub from_ms: UnixMillis,
    /// The interval's end (exclusive).
    pub until_ms: UnixMillis,
    /// Its whole price, minor units.
    pub price: u64,
    /// ISO 4217 code.
    pub currency: String,
    /// Who contributes what, when.
    pub arrangement: surplus_market::stagger::Arrangement,
    /// Each contributor to the account its share is paid to.
    pub contributors: std::collections::BTreeMap<String, String>,
    /// When it was planned and tendered.
    pub created_at_ms: UnixMillis,
    /// When its accepted tenders were paid out.
    pub settled_at_ms: Option<UnixMillis>,
    /// The end of the minutes whose provision was judged and whose shortfalls were
    /// reported.
    pub reported_through_ms: Option<UnixMillis>,
}

/// A tender sent (`out`) or answered (`in`), as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTender {
    /// What was offered (its id is the tender's).
    pub offer: surplus_protocol::peer::TenderOffer,
    /// `out` or `in`.
    pub direction: String,
    /// The bundle (`out` only).
    pub bundle: Option<Uuid>,
    /// The other controller.
    pub peer: Uuid,
    /// `sent`, `accepted`, `part`, `rejected`, `unanswered` or `invalid`.
    pub state: String,
    /// Units taken.
    pub accepted_amount: u64,
    /// What is paid for them.
    pub price: u64,
    /// Why less than the whole was taken, or why the answer did not count.
    pub reason: Option<String>,
    /// When it was sent or received.
    pub created_at_ms: UnixMillis,
    /// When it was answered.
    pub answered_at_ms: Option<UnixMillis>,
}

/// Federation's and brokerage's storage.
#[async_trait]
pub trait FederationStore: Send + Sync + std::fmt::Debug + 'static {
    /// This controller's id among its peers: `candidate` if none was stored yet.
    async fn controller_id(&self, candidate: Uuid, now_ms: UnixMillis) -> Result<Uuid, StoreError>;

    /// Records an invitation by the hash of its secret.
    async fn create_peer_invite(
        &self,
        secret_hash: &str,
        role: PeerRole,
        now_ms: UnixMillis,
        expires_at_ms: UnixMillis,
    ) -> Result<(), StoreError>;

    /// Takes an invitation once and records the joining controller as a peer of the
    /// invitation's role, in one transaction.
    async fn take_peer_invite(
        &self,
        secret_hash: &str,
        joiner: &StoredPeer,
        now_ms: UnixMillis,
    ) -> Result<Result<PeerRole, JoinRefusal>, StoreError>;

    /// Records a peer this controller joined; refused when it is a peer already or
    /// was removed.
    async fn put_peer(&self, peer: &StoredPeer) -> Result<Result<(), JoinRefusal>, StoreError>;

    /// Every peer, removed ones too.
    async fn peers(&self) -> Result<Vec<StoredPeer>, StoreError>;

    /// Removes a peer; false if it was not an active one.
    async fn remove_peer(&self, id: Uuid, now_ms: UnixMillis) -> Result<bool, StoreError>;

    /// Notes that a peer was heard from.
    async fn touch_peer(&self, id: Uuid, now_ms: UnixMillis) -> Result<(), StoreError>;

    /// Shares an account's usage with a broker peer from `through_ms` on; if it is
    /// shared already, the share as it stands (unchanged).
    async fn share_with_peer(&self, share: &PeerShare) -> Result<PeerShare, StoreError>;

    /// A peer's shares.
    async fn peer_shares(&self, peer: Uuid) -> Result<Vec<PeerShare>, StoreError>;

    /// Exports the whole minutes of the peer's shares before `until_ms` as numbered
    /// rows, in one transaction; returns how many rows were made.
    async fn export_peer_usage(&self, peer: Uuid, until_ms: UnixMillis) -> Result<u64, StoreError>;

    /// Rows made for a peer after `after_seq`, at most `limit`.
    async fn peer_usage_out(
        &self,
        peer: Uuid,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<PeerUsageRow>, StoreError>;

    /// The peer acknowledged rows through `through_seq`.
    async fn peer_usage_acked(&self, peer: Uuid, through_seq: u64) -> Result<(), StoreError>;

    /// Stores a batch received from a peer, each row once (see
    /// `surplus_market::exchange::accept`); the acknowledgement, or why it was refused.
    async fn receive_peer_usage(
        &self,
        peer: Uuid,
        rows: &[PeerUsageRow],
        now_ms: UnixMillis,
    ) -> Result<Result<u64, Refusal>, StoreError>;

    /// Rows received from peers for minutes in `[from_ms, until_ms)`.
    async fn peer_usage_in(
        &self,
        from_ms: UnixMillis,
        until_ms: UnixMillis,
    ) -> Result<Vec<PeerUsageIn>, StoreError>;

    /// Makes or replaces a user's subscription of a resource.
    async fn put_subscription(&self, s: &StoredSubscription) -> Result<(), StoreError>;

    /// Every subscription, by user and resource.
    async fn subscriptions(&self) -> Result<Vec<StoredSubscription>, StoreError>;

    /// Records a bundle about to be tendered.
    async fn create_bundle(&self, bundle: &StoredBundle) -> Result<(), StoreError>;

    /// Bundles, newest first, at most `limit`.
    async fn bundles(&self, limit: u32) -> Result<Vec<StoredBundle>, StoreError>;

    /// Bundles whose interval ended by `now_ms` and that are not settled yet.
    async fn due_bundles(&self, now_ms: UnixMillis) -> Result<Vec<StoredBundle>, StoreError>;

    /// Marks a bundle settled and applies `changes` (its payments and reports) in one
    /// transaction; false (and nothing applied) when it was settled already.
    async fn settle_bundle(
        &self,
        id: Uuid,
        changes: &super::ChangeSet,
        now_ms: UnixMillis,
    ) -> Result<bool, super::PostError>;

    /// Bundles not settled whose interval began by `now_ms`.
    async fn open_bundles(&self, now_ms: UnixMillis) -> Result<Vec<StoredBundle>, StoreError>;

    /// Notes that a bundle's provision was judged and reported up to `through_ms`
    /// (never moves back).
    async fn bundle_reported(&self, id: Uuid, through_ms: UnixMillis) -> Result<(), StoreError>;

    /// Adds a shortfall the broker reported to a tender this controller answered; false
    /// when the tender is not known here as one from `peer` that it took, or the gap
    /// is not inside its interval or misses more than it took (a gap reported again
    /// is kept once).
    async fn tender_shortfall(
        &self,
        id: Uuid,
        peer: Uuid,
        gap: surplus_market::provision::Gap,
        now_ms: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// The shortfalls reported to a tender, in time order.
    async fn tender_shortfalls(
        &self,
        id: Uuid,
    ) -> Result<Vec<surplus_market::provision::Gap>, StoreError>;

    /// Records a tender; if one with its id is stored already, that one as it stands
    /// (unchanged): a tender received again keeps its first answer.
    async fn put_tender(&self, tender: &StoredTender) -> Result<StoredTender, StoreError>;

    /// Records the answer to a tender this controller sent.
    async fn answer_tender(&self, tender: &StoredTender) -> Result<(), StoreError>;

    /// Tenders, newest first, at most `limit`.
    async fn tenders(&self, limit: u32) -> Result<Vec<StoredTender>, StoreError>;

    /// The tenders of a bundle, in the order they were sent.
    async fn bundle_tenders(&self, bundle: Uuid) -> Result<Vec<StoredTender>, StoreError>;

    /// This controller's own metering of client accounts' instances, as deltas whose
    /// `user` is the account, for records starting in `[from_ms, until_ms)`.
    async fn local_usage_deltas(
        &self,
        accounts: Option<&[String]>,
        from_ms: UnixMillis,
        until_ms: UnixMillis,
    ) -> Result<Vec<MeterDelta>, StoreError>;
}
