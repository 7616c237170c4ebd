//! Federation (issue 18, C12): peering with other controllers and the links that
//! carry their traffic.
//!
//! - **Peering.** `surplus-controller peer invite --role host-cloud|marketplace-cloud`
//!   prints a one-time token (the CA's fingerprint, the enrollment addresses, the
//!   role). `peer join TOKEN` on the other controller sends its CA and id to the
//!   inviter's enrollment endpoint, trusting nothing but the pinned CA; the inviter
//!   takes the invitation once and answers with its own CA. Each side stores the
//!   other with its CA: from then on each trusts that CA for that peer only.
//! - **Links.** The joiner dials the inviter's peer endpoint (QUIC, ALPN
//!   `surplus-peer/1`) with a certificate of its own CA naming
//!   `surplus://controller/<id>`; the inviter's verifier accepts it only if that id is
//!   a peer now and the chain ends at that peer's CA. The link reconnects with
//!   backoff; a removed peer's CA is dropped from the trust within a second and its
//!   link closed, and a message on a link of a peer that is not one any more is
//!   refused.
//! - **Usage exchange.** A host cloud turns the usage of the accounts it shares with a
//!   broker into numbered rows (`FederationStore::export_peer_usage`) and pushes them
//!   until acknowledged; a broker pulls what it lacks whenever a link comes up. The
//!   rows are kept once each (`surplus_market::exchange`).
//! - **Tenders.** A broker offers a bundle to a marketplace cloud (`send_tender`),
//!   which answers by its standing terms and keeps its first answer; the broker
//!   reports what an accepted tender falls short (`send_shortfall`), kept once. The
//!   rules are `crate::brokerage`'s and `surplus_market::{tender, provision}`'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint};
use surplus_certs::PeerTrust;
use surplus_protocol::messages::Message;
use surplus_protocol::peer::{
    PeerJoin, PeerJoined, PeerMessage, PeerRole, PeerToken, UsageAck, UsageBatch, UsagePull,
};
use surplus_protocol::quic::{self, codes};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::{App, Controller};
use crate::store::{JoinRefusal, PeerShare, StoreError, StoredPeer};

/// Rows per usage message.
const USAGE_BATCH: u32 = 500;

/// How long peer-link certificates last (as the server certificate); a restart issues
/// a new one.
const IDENTITY_LIFETIME_MS: i64 = 365 * 86_400_000;

/// This controller's certificate on peer links.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Key, PEM.
    pub key_pem: String,
}

/// Peering and peer links.
#[derive(Debug)]
pub struct Federation {
    app: Arc<App>,
    ca_pem: String,
    ca_fingerprint: [u8; 32],
    id: OnceLock<Uuid>,
    identity: OnceLock<Identity>,
    /// The CAs of the peers now, shared with the peer endpoint's TLS verifier.
    pub trust: PeerTrust,
    /// What each peer is to this controller, and what this one is to it.
    roles: Mutex<HashMap<Uuid, (PeerRole, PeerRole)>>,
    /// One reload at a time, so that an older read never undoes a newer one.
    reloading: tokio::sync::Mutex<()>,
    links: Mutex<HashMap<Uuid, Connection>>,
}

/// A printed invitation.
#[derive(Debug, Clone)]
pub struct Invitation {
    /// The token to hand to the other controller's operator.
    pub token: String,
    /// When it expires.
    pub expires_at_ms: i64,
}

impl Federation {
    /// Federation over `app`, with this controller's CA.
    pub fn new(app: Arc<App>, ca_pem: &str, ca_fingerprint: [u8; 32]) -> Self {
        Self {
            app,
            ca_pem: ca_pem.to_owned(),
            ca_fingerprint,
            id: OnceLock::new(),
            identity: OnceLock::new(),
            trust: PeerTrust::default(),
            roles: Mutex::new(HashMap::new()),
            reloading: tokio::sync::Mutex::new(()),
            links: Mutex::new(HashMap::new()),
        }
    }

    /// This controller's id among its peers (made and stored the first time).
    pub async fn controller_id(&self) -> Result<Uuid, StoreError> {
        if let Some(id) = self.id.get() {
            return Ok(*id);
        }
        let id = self
            .app
            .store
            .controller_id(Uuid::now_v7(), self.app.clock.now_ms())
            .await?;
        Ok(*self.id.get_or_init(|| id))
    }

    /// Sets the certificate this controller presents on peer links (at start).
    pub fn set_identity(&self, identity: Identity) {
        let _ = self.identity.set(identity);
    }

    /// Prints a one-time peering token for a controller that will be `role` to this one.
    pub async fn invite(&self, role: PeerRole, ttl: Duration) -> anyhow::Result<Invitation> {
        if role == PeerRole::Broker {
            bail!(
                "a peer is invited as host-cloud or marketplace-cloud; this controller is its broker"
            );
        }
        let now = self.app.clock.now_ms();
        let secret: [u8; 32] = rand::random();
        let expires_at_ms = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
        self.app
            .store
            .create_peer_invite(&secret_hash(&secret), role, now, expires_at_ms)
            .await?;
        let token = PeerToken {
            secret,
            controller_id: self.controller_id().await?,
            role,
            ca_fingerprint: self.ca_fingerprint,
            enroll_addresses: self.app.config.enroll_addresses(),
            server_name: self.server_name(),
            expires_at_ms,
        };
        Ok(Invitation {
            token: token.encode(),
            expires_at_ms,
        })
    }

    fn server_name(&self) -> String {
        self.app
            .config
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into())
    }

    /// The inviter's side of a join, at the enrollment endpoint.
    pub async fn accept_join(&self, join: &PeerJoin) -> Result<PeerJoined, String> {
        let now = self.app.clock.now_ms();
        let ca = surplus_certs::certs_from_pem(&join.ca_pem, "peer CA")
            .map_err(|e| format!("the joining controller's CA is unusable: {e}"))?;
        let fingerprint = surplus_certs::fingerprint(&ca[0]);
        let our_id = self.controller_id().await.map_err(|e| e.to_string())?;
        if join.controller_id == our_id || fingerprint == self.ca_fingerprint {
            return Err("a controller cannot peer with itself".into());
        }
        let joiner = StoredPeer {
            id: join.controller_id,
            name: clean_name(&join.name, join.controller_id),
            role: PeerRole::HostCloud, // replaced by the invitation's role
            our_role: PeerRole::Broker,
            ca_pem: join.ca_pem.clone(),
            fingerprint: surplus_certs::hex(&fingerprint),
            addresses: join.peer_addresses.clone(),
            server_name: String::new(),
            dials: false,
            joined_at_ms: now,
            removed_at_ms: None,
            last_seen_ms: None,
            out_seq: 0,
            acked_seq: 0,
            in_seq: 0,
        };
        let role = match self
            .app
            .store
            .take_peer_invite(&secret_hash(&join.secret), &joiner, now)
            .await
        {
            Ok(Ok(role)) => role,
            Ok(Err(refusal)) => {
                return Err(match refusal {
                    JoinRefusal::Unknown => "the peering token is not known to this controller",
                    JoinRefusal::Expired => "the peering token has expired",
                    JoinRefusal::Used => "the peering token was already used",
                    JoinRefusal::AlreadyPeer => "this controller is a peer already",
                    JoinRefusal::Removed => {
                        "this controller was removed as a peer and cannot join again under its id"
                    }
                }
                .into());
            }
            Err(e) => {
                tracing::error!(error = %e, "peer join not recorded");
                return Err("the join could not be recorded".into());
            }
        };
        tracing::info!(peer = %join.controller_id, %role, "peer joined");
        self.reload().await;
        Ok(PeerJoined {
            controller_id: our_id,
            name: self.server_name(),
            ca_pem: self.ca_pem.clone(),
            peer_addresses: self.app.config.peer_addresses(),
            server_name: self.server_name(),
            role,
        })
    }

    /// Joins the controller that printed `token` (the joiner's side; the inviter must
    /// be running). Returns the inviter as stored here.
    pub async fn join(&self, token: &str, name: &str) -> anyhow::Result<StoredPeer> {
        let token = PeerToken::parse(token)?;
        let now = self.app.clock.now_ms();
        if token.expires_at_ms <= now {
            bail!("the peering token has expired");
        }
        let tls = surplus_certs::pinned_client_config(token.ca_fingerprint)?;
        let join = Message::Peer(Box::new(PeerMessage::Join(PeerJoin {
            secret: token.secret,
            controller_id: self.controller_id().await?,
            name: name.to_owned(),
            ca_pem: self.ca_pem.clone(),
            peer_addresses: self.app.config.peer_addresses(),
        })));
        let endpoint = Endpoint::client(unspecified())?;
        let mut last = anyhow!("no address to try");
        for address in &token.enroll_addresses {
            let attempt = async {
                let conn = connect(
                    &endpoint,
                    tls.clone(),
                    address,
                    &token.server_name,
                    &self.app.config,
                )
                .await?;
                let answer = quic::request(
                    &conn,
                    &join,
                    self.app.config.max_frame_size,
                    self.app.config.request_timeout,
                )
                .await?;
                conn.close(codes::CLOSE_NORMAL, b"joined");
                Ok::<_, anyhow::Error>(answer)
            };
            match attempt.await {
                Ok(Message::Peer(p)) => match *p {
                    PeerMessage::Joined(joined) => return self.record_joined(&token, joined).await,
                    PeerMessage::Refused(why) => bail!("the other controller refused: {why}"),
                    other => bail!("unexpected answer {}", other.kind()),
                },
                Ok(Message::Error(e)) => bail!("the other controller refused: {}", e.message),
                Ok(other) => bail!("unexpected answer {}", other.kind()),
                Err(e) => last = e.context(format!("joining at {address}")),
            }
        }
        Err(last)
    }

    async fn record_joined(
        &self,
        token: &PeerToken,
        joined: PeerJoined,
    ) -> anyhow::Result<StoredPeer> {
        let ca = surplus_certs::certs_from_pem(&joined.ca_pem, "peer CA")?;
        let fingerprint = surplus_certs::fingerprint(&ca[0]);
        if fingerprint != token.ca_fingerprint || joined.controller_id != token.controller_id {
            bail!("the other controller answered with another CA or id than its token names");
        }
        if joined.peer_addresses.is_empty() {
            bail!("the other controller gave no peer address to dial");
        }
        if joined.controller_id == self.controller_id().await? || fingerprint == self.ca_fingerprint
        {
            bail!("a controller cannot peer with itself");
        }
        let peer = StoredPeer {
            id: joined.controller_id,
            name: clean_name(&joined.name, joined.controller_id),
            role: PeerRole::Broker,
            our_role: token.role,
            ca_pem: joined.ca_pem,
            fingerprint: surplus_certs::hex(&fingerprint),
            addresses: joined.peer_addresses,
            server_name: joined.server_name,
            dials: true,
            joined_at_ms: self.app.clock.now_ms(),
            removed_at_ms: None,
            last_seen_ms: None,
            out_seq: 0,
            acked_seq: 0,
            in_seq: 0,
        };
        match self.app.store.put_peer(&peer).await? {
            Ok(()) => Ok(peer),
            Err(JoinRefusal::AlreadyPeer) => bail!(
                "controller {} is a peer of this one already: the token's inviter cannot replace it",
                peer.id
            ),
            Err(_) => bail!(
                "controller {} was removed as a peer of this one and cannot be joined again",
                peer.id
            ),
        }
    }

    /// Removes a peer: a running controller drops its CA and closes its link within
    /// a second (`reload`).
    pub async fn remove(&self, id: Uuid) -> Result<bool, StoreError> {
        let removed = self
            .app
            .store
            .remove_peer(id, self.app.clock.now_ms())
            .await?;
        self.reload().await;
        Ok(removed)
    }

    /// Shares an account's usage with a broker peer from the current minute on.
    pub async fn share(&self, peer: Uuid, account: &str, user: &str) -> anyhow::Result<()> {
        let peers = self.app.store.peers().await?;
        let Some(p) = peers
            .iter()
            .find(|p| p.id == peer && p.removed_at_ms.is_none())
        else {
            bail!("no peer {peer}");
        };
        if p.our_role != PeerRole::HostCloud {
            bail!(
                "this controller is not a host cloud of peer {peer} (it joined as its {}): usage goes to the broker a controller joined as host cloud",
                p.our_role
            );
        }
        if account.is_empty() {
            bail!("an account is needed");
        }
        if !surplus_market::exchange::is_user(user) {
            bail!(
                "user {user:?}: 1 to 64 of letters, digits, `.`, `_`, `-` (a name a subscription can carry)"
            );
        }
        let now = self.app.clock.now_ms();
        let minute = surplus_market::exchange::MINUTE_MS;
        let stands = self
            .app
            .store
            .share_with_peer(&PeerShare {
                peer,
                account: account.to_owned(),
                user: user.to_owned(),
                through_ms: now.div_euclid(minute) * minute,
            })
            .await?;
        if stands.user != user {
            bail!(
                "{account} is shared with {peer} already, as the user {}",
                stands.user
            );
        }
        Ok(())
    }

    /// Sends a tender over the link to `peer` and waits for its answer; a request
    /// that breaks is sent again (the same tender gets the answer recorded the first
    /// time), up to three times. The answer, or why the peer refused to answer.
    pub async fn send_tender(
        &self,
        peer: Uuid,
        offer: &surplus_protocol::peer::TenderOffer,
    ) -> anyhow::Result<Result<surplus_protocol::peer::TenderReply, String>> {
        let mut last = anyhow!("no link to peer {peer}");
        for attempt in 0..3u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(300 << attempt)).await;
            }
            let Some(conn) = self.link(peer) else {
                last = anyhow!("no link to peer {peer} is up");
                continue;
            };
            match quic::request(
                &conn,
                &Message::Peer(Box::new(PeerMessage::Tender(offer.clone()))),
                self.app.config.max_frame_size,
                self.app.config.request_timeout,
            )
            .await
            {
                Ok(Message::Peer(p)) => match *p {
                    PeerMessage::TenderAnswer(reply) => return Ok(Ok(reply)),
                    PeerMessage::Refused(why) => return Ok(Err(why)),
                    other => bail!("peer {peer} answered a tender with {}", other.kind()),
                },
                Ok(other) => bail!("peer {peer} answered a tender with {}", other.kind()),
                Err(e) => last = anyhow::Error::from(e).context(format!("tender to {peer}")),
            }
        }
        Err(last)
    }

    /// Tells `peer` that a tender it accepted falls short; `Ok` once it noted it.
    pub async fn send_shortfall(
        &self,
        peer: Uuid,
        shortfall: surplus_protocol::peer::TenderShortfall,
    ) -> anyhow::Result<()> {
        let conn = self
            .link(peer)
            .with_context(|| format!("no link to peer {peer} is up"))?;
        match quic::request(
            &conn,
            &Message::Peer(Box::new(PeerMessage::Shortfall(shortfall))),
            self.app.config.max_frame_size,
            self.app.config.request_timeout,
        )
        .await?
        {
            Message::Peer(p) => match *p {
                PeerMessage::ShortfallNoted => Ok(()),
                PeerMessage::Refused(why) => bail!("peer {peer} refused the shortfall: {why}"),
                other => bail!("peer {peer} answered a shortfall with {}", other.kind()),
            },
            other => bail!("peer {peer} answered a shortfall with {}", other.kind()),
        }
    }

    /// What a token makes its joiner at the inviter (for the joiner's report).
    pub fn peer_role_at_broker(&self, token: &str) -> Option<String> {
        PeerToken::parse(token).ok().map(|t| t.role.to_string())
    }

    /// Reloads the peers' CAs from storage and closes the links of peers that are
    /// not peers any more.
    pub async fn reload(&self) {
        let _one = self.reloading.lock().await;
        let peers = match self.app.store.peers().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "peers not read");
                return;
            }
        };
        let active: Vec<_> = peers
            .iter()
            .filter(|p| p.removed_at_ms.is_none())
            .map(|p| (p.id, p.ca_pem.clone()))
            .collect();
        for (id, why) in self.trust.replace(active) {
            tracing::error!(peer = %id, error = %why, "a peer's CA is unusable");
        }
        *self.roles.lock().expect("roles lock") = peers
            .iter()
            .filter(|p| p.removed_at_ms.is_none())
            .map(|p| (p.id, (p.role, p.our_role)))
            .collect();
        let mut links = self.links.lock().expect("links lock");
        links.retain(|id, conn| {
            let keep = self.trust.contains(id);
            if !keep {
                tracing::info!(peer = %id, "peer removed; link closed");
                conn.close(codes::CLOSE_REVOKED, b"peer removed");
            }
            keep
        });
    }

    /// What a peer is to this controller, and what this one is to it, while it is one.
    pub fn roles_of(&self, id: Uuid) -> Option<(PeerRole, PeerRole)> {
        self.roles.lock().expect("roles lock").get(&id).copied()
    }

    /// The live link to a peer.
    pub fn link(&self, id: Uuid) -> Option<Connection> {
        self.links.lock().expect("links lock").get(&id).cloned()
    }

    fn client_tls(&self, peer: &StoredPeer) -> anyhow::Result<rustls::ClientConfig> {
        let identity = self
            .identity
            .get()
            .context("this controller has no peer-link certificate (not serving)")?;
        Ok(surplus_certs::peer_client_config(
            &peer.ca_pem,
            &identity.cert_pem,
            &identity.key_pem,
        )?)
    }
}

fn clean_name(name: &str, id: Uuid) -> String {
    let name: String = name.chars().filter(|c| !c.is_control()).take(128).collect();
    if name.trim().is_empty() {
        format!("controller {id}")
    } else {
        name
    }
}

fn secret_hash(secret: &[u8; 32]) -> String {
    surplus_certs::hex(&surplus_certs::sha256(secret))
}

fn unspecified() -> SocketAddr {
    "0.0.0.0:0".parse().expect("literal")
}

/// The keep-alive period of peer links: a third of the idle timeout.
pub fn keep_alive(config: &crate::config::ControllerConfig) -> Duration {
    (config.idle_timeout / 3).max(Duration::from_millis(100))
}

async fn connect(
    endpoint: &Endpoint,
    tls: rustls::ClientConfig,
    address: &str,
    server_name: &str,
    config: &crate::config::ControllerConfig,
) -> anyhow::Result<Connection> {
    let addr = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("{address} has no IPv4 address"))?;
    let quic = QuicClientConfig::try_from(tls).context("TLS configuration unusable for QUIC")?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(quic::transport_config(
        config.idle_timeout,
        keep_alive(config),
        config.max_frame_size,
    )));
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        endpoint.connect_with(client, addr, server_name)?,
    )
    .await
    .with_context(|| format!("no answer from {address}"))??;
    Ok(conn)
}

/// The peer endpoint's work: accepting links, dialing the peers this controller
/// dials (with backoff), reloading the peers, the usage exchange, and (in its own
/// task) the brokerage's loop over bundles.
pub async fn drive(ctl: Arc<Controller>, endpoint: Endpoint, cancel: CancellationToken) {
    let tasks = ctl.app.tasks.clone();
    {
        let (ctl, endpoint, cancel) = (ctl.clone(), endpoint.clone(), cancel.clone());
        let tasks2 = tasks.clone();
        tasks.spawn(async move {
            loop {
                let incoming = tokio::select! {
                    _ = cancel.cancelled() => break,
                    i = endpoint.accept() => i,
                };
                let Some(incoming) = incoming else { break };
                let ctl = ctl.clone();
                tasks2.spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => serve_link(ctl, conn).await,
                        Err(e) => tracing::info!(%remote, error = %e, "peer link refused"),
                    }
                });
            }
        });
    }
    tasks.spawn(crate::brokerage::drive(ctl.clone(), cancel.clone()));
    // Per peer: its dialing backoff, and whether its work (export, dial, push) is
    // under way, so that one slow peer holds up neither the others nor the reload.
    let backoff: Arc<Mutex<HashMap<Uuid, (tokio::time::Instant, Duration)>>> = Arc::default();
    let busy: Arc<Mutex<std::collections::HashSet<Uuid>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        ctl.federation.reload().await;
        let Ok(peers) = ctl.app.store.peers().await else {
            continue;
        };
        for peer in peers.into_iter().filter(|p| p.removed_at_ms.is_none()) {
            if !busy.lock().expect("busy lock").insert(peer.id) {
                continue;
            }
            let (ctl, endpoint, backoff, busy) =
                (ctl.clone(), endpoint.clone(), backoff.clone(), busy.clone());
            let cancel = cancel.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = peer_work(&ctl, &endpoint, &peer, &backoff) => {}
                }
                busy.lock().expect("busy lock").remove(&peer.id);
            });
        }
    }
    endpoint.close(codes::CLOSE_SHUTDOWN, b"controller shutting down");
}

/// One round of a peer's work: a host cloud makes the rows of finished minutes
/// whether or not its broker is reachable; the joiner dials a link that is down
/// (with backoff); a host cloud sends what its broker has not acknowledged.
async fn peer_work(
    ctl: &Arc<Controller>,
    endpoint: &Endpoint,
    peer: &StoredPeer,
    backoff: &Mutex<HashMap<Uuid, (tokio::time::Instant, Duration)>>,
) {
    if peer.our_role == PeerRole::HostCloud {
        let until = ctl.app.clock.now_ms() - ctl.app.config.peer_usage_lag.as_millis() as i64;
        if let Err(e) = ctl.app.store.export_peer_usage(peer.id, until).await {
            tracing::error!(peer = %peer.id, error = %e, "usage for the broker not made");
        }
    }
    if ctl.federation.link(peer.id).is_none() {
        if !peer.dials {
            return;
        }
        let now = tokio::time::Instant::now();
        let (due, wait) = backoff
            .lock()
            .expect("backoff lock")
            .get(&peer.id)
            .copied()
            .unwrap_or((now, Duration::from_millis(500)));
        if now < due {
            return;
        }
        match dial(ctl, endpoint, peer).await {
            Ok(conn) => {
                backoff.lock().expect("backoff lock").remove(&peer.id);
                ctl.app.tasks.clone().spawn(serve_link(ctl.clone(), conn));
            }
            Err(e) => {
                let next = (wait * 2).min(Duration::from_secs(30));
                tracing::warn!(peer = %peer.id, error = %format!("{e:#}"), retry_in = ?wait, "peer link down");
                backoff
                    .lock()
                    .expect("backoff lock")
                    .insert(peer.id, (now + wait, next));
            }
        }
        return;
    }
    if peer.our_role == PeerRole::HostCloud {
        if let Err(e) = push_usage(ctl, peer).await {
            tracing::warn!(peer = %peer.id, error = %format!("{e:#}"), "usage not sent to the broker");
        }
    }
}

async fn dial(
    ctl: &Controller,
    endpoint: &Endpoint,
    peer: &StoredPeer,
) -> anyhow::Result<Connection> {
    let tls = ctl.federation.client_tls(peer)?;
    let mut last = anyhow!("peer {} has no address", peer.id);
    for address in &peer.addresses {
        match connect(
            endpoint,
            tls.clone(),
            address,
            &peer.server_name,
            &ctl.app.config,
        )
        .await
        {
            Ok(conn) => {
                if let Err(e) = check_peer(&conn, peer.id) {
                    conn.close(codes::CLOSE_PROTOCOL, b"not the peer dialed");
                    return Err(e);
                }
                // The client's handshake ends before the peer has judged its
                // certificate: the link is up once the peer has answered.
                match request(ctl, &conn, PeerMessage::Ping).await {
                    Ok(PeerMessage::Pong) => return Ok(conn),
                    Ok(other) => {
                        conn.close(codes::CLOSE_PROTOCOL, b"no pong");
                        return Err(anyhow!("the peer answered a ping with {}", other.kind()));
                    }
                    Err(e) => {
                        conn.close(codes::CLOSE_PROTOCOL, b"no pong");
                        return Err(e.context("the peer refused the link"));
                    }
                }
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The controller id a link's certificate names.
fn peer_of(conn: &Connection) -> Option<Uuid> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    surplus_certs::controller_id_of(certs.first()?)
}

fn check_peer(conn: &Connection, expected: Uuid) -> anyhow::Result<()> {
    match peer_of(conn) {
        Some(id) if id == expected => Ok(()),
        Some(id) => bail!("the peer's certificate names controller {id}, not {expected}"),
        None => bail!("the peer's certificate names no controller"),
    }
}

/// Serves one link until it closes: the peer's requests, and on a broker's side a
/// pull of what it lacks.
async fn serve_link(ctl: Arc<Controller>, conn: Connection) {
    let Some(peer) = peer_of(&conn) else {
        conn.close(codes::CLOSE_PROTOCOL, b"no controller name");
        return;
    };
    let replaced = ctl
        .federation
        .links
        .lock()
        .expect("links lock")
        .insert(peer, conn.clone());
    if let Some(old) = replaced {
        old.close(codes::CLOSE_REPLACED, b"a newer link replaced this one");
    }
    tracing::info!(%peer, remote = %conn.remote_address(), "peer link up");
    let _ = ctl.app.store.touch_peer(peer, ctl.app.clock.now_ms()).await;
    {
        let (ctl, conn) = (ctl.clone(), conn.clone());
        ctl.app.tasks.clone().spawn(async move {
            if let Err(e) = pull_usage(&ctl, peer, &conn).await {
                tracing::warn!(%peer, error = %format!("{e:#}"), "usage pull failed");
            }
        });
    }
    let max = ctl.app.config.max_frame_size;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(%peer, reason = %e, "peer link closed");
                break;
            }
        };
        let ctl = ctl.clone();
        ctl.app.tasks.clone().spawn(async move {
            let timeout = ctl.app.config.request_timeout;
            let read = tokio::time::timeout(timeout, quic::read_frame(&mut recv, max))
                .await
                .unwrap_or(Err(quic::ExchangeError::Timeout(timeout)));
            let request = match read {
                Ok(env) => env.message,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad frame from a peer");
                    quic::refuse_stream(&mut send, &mut recv, &e);
                    return;
                }
            };
            let answer = handle(&ctl, peer, request).await;
            let _ = quic::write_frame(&mut send, &Message::Peer(Box::new(answer)), max).await;
        });
    }
    let mut links = ctl.federation.links.lock().expect("links lock");
    if links
        .get(&peer)
        .is_some_and(|c| c.stable_id() == conn.stable_id())
    {
        links.remove(&peer);
    }
}

async fn handle(ctl: &Controller, peer: Uuid, request: Message) -> PeerMessage {
    if !ctl.federation.trust.contains(&peer) {
        return PeerMessage::Refused(format!("controller {peer} is not a peer of this one"));
    }
    let now = ctl.app.clock.now_ms();
    let Message::Peer(request) = request else {
        return PeerMessage::Refused(format!(
            "a peer link carries peer messages only, not {}",
            request.kind()
        ));
    };
    let Some((role, our_role)) = ctl.federation.roles_of(peer) else {
        return PeerMessage::Refused(format!("controller {peer} is not a peer of this one"));
    };
    match *request {
        PeerMessage::Ping => PeerMessage::Pong,
        PeerMessage::Tender(_) if role != PeerRole::Broker => PeerMessage::Refused(format!(
            "controller {peer} is this controller's {role}, not its broker: it sends no tenders here"
        )),
        PeerMessage::Tender(_) if our_role != PeerRole::MarketplaceCloud => {
            PeerMessage::Refused(format!(
                "this controller is {peer}'s {our_role}, not a marketplace cloud: it takes no tenders"
            ))
        }
        PeerMessage::Shortfall(_) if role != PeerRole::Broker => PeerMessage::Refused(format!(
            "controller {peer} is this controller's {role}, not its broker: it reports no shortfalls here"
        )),
        PeerMessage::Shortfall(s) => {
            let gap = surplus_market::provision::Gap {
                from: s.from_ms,
                until: s.until_ms,
                missing: s.missing,
            };
            if gap.from >= gap.until || gap.missing == 0 {
                return PeerMessage::Refused(
                    "a shortfall needs a span and a missing amount".into(),
                );
            }
            match ctl.app.store.tender_shortfall(s.id, peer, gap, now).await {
                Ok(true) => {
                    tracing::warn!(%peer, tender = %s.id, from = s.from_ms, until = s.until_ms, missing = s.missing, "a brokered tender falls short");
                    PeerMessage::ShortfallNoted
                }
                Ok(false) => PeerMessage::Refused(format!(
                    "tender {} is not one this controller took from {peer}, or the shortfall is not inside what it took",
                    s.id
                )),
                Err(e) => {
                    tracing::error!(%peer, error = %e, "shortfall not recorded");
                    PeerMessage::Refused(
                        "the shortfall could not be recorded; send it again".into(),
                    )
                }
            }
        }
        PeerMessage::Tender(offer) => {
            match crate::brokerage::answer_tender(ctl, peer, &offer).await {
                Ok(reply) => PeerMessage::TenderAnswer(reply),
                Err(crate::brokerage::BrokerageError::Refused(r)) => {
                    PeerMessage::Refused(r.message)
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "tender not recorded");
                    PeerMessage::Refused("the tender could not be recorded; send it again".into())
                }
            }
        }
        PeerMessage::Usage(_) if role != PeerRole::HostCloud => PeerMessage::Refused(format!(
            "controller {peer} is this controller's {role}, not a host cloud: it sends no usage here"
        )),
        PeerMessage::UsagePull(_) if our_role != PeerRole::HostCloud => PeerMessage::Refused(
            format!("this controller is not a host cloud of {peer}: it has no usage for it"),
        ),
        PeerMessage::Usage(batch) => match ctl
            .app
            .store
            .receive_peer_usage(peer, &batch.rows, now)
            .await
        {
            Ok(Ok(through_seq)) => PeerMessage::UsageAck(UsageAck { through_seq }),
            Ok(Err(refusal)) => PeerMessage::Refused(refusal.to_string()),
            Err(e) => {
                tracing::error!(%peer, error = %e, "peer usage not stored");
                PeerMessage::Refused("the usage could not be stored; send it again".into())
            }
        },
        PeerMessage::UsagePull(pull) => {
            let _ = ctl.app.store.touch_peer(peer, now).await;
            match ctl
                .app
                .store
                .peer_usage_out(peer, pull.after_seq, pull.limit.min(USAGE_BATCH))
                .await
            {
                Ok(rows) => PeerMessage::Usage(UsageBatch { rows }),
                Err(e) => PeerMessage::Refused(format!("usage not read: {e}")),
            }
        }
        other => PeerMessage::Refused(format!("{} is not a request a peer serves", other.kind())),
    }
}

async fn request(
    ctl: &Controller,
    conn: &Connection,
    m: PeerMessage,
) -> anyhow::Result<PeerMessage> {
    match quic::request(
        conn,
        &Message::Peer(Box::new(m)),
        ctl.app.config.max_frame_size,
        ctl.app.config.request_timeout,
    )
    .await?
    {
        Message::Peer(p) => match *p {
            PeerMessage::Refused(why) => bail!("refused: {why}"),
            other => Ok(other),
        },
        other => bail!("unexpected answer {}", other.kind()),
    }
}

/// A host cloud's side: send the broker what it has not acknowledged.
async fn push_usage(ctl: &Controller, peer: &StoredPeer) -> anyhow::Result<()> {
    let Some(conn) = ctl.federation.link(peer.id) else {
        return Ok(());
    };
    let mut acked = peer.acked_seq;
    loop {
        let rows = ctl
            .app
            .store
            .peer_usage_out(peer.id, acked, USAGE_BATCH)
            .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let last_sent = rows.last().map_or(acked, |r| r.seq);
        match request(ctl, &conn, PeerMessage::Usage(UsageBatch { rows })).await? {
            PeerMessage::UsageAck(ack) if ack.through_seq > last_sent => bail!(
                "the broker acknowledged row {} but only {last_sent} were sent: the two sequences diverged",
                ack.through_seq
            ),
            PeerMessage::UsageAck(ack) if ack.through_seq > acked => {
                ctl.app
                    .store
                    .peer_usage_acked(peer.id, ack.through_seq)
                    .await?;
                acked = ack.through_seq;
            }
            PeerMessage::UsageAck(ack) => {
                bail!(
                    "the broker acknowledged row {} only, after {acked}",
                    ack.through_seq
                )
            }
            other => bail!("unexpected answer {}", other.kind()),
        }
    }
}

/// A broker's side: whenever a host cloud's link comes up, pull the rows it lacks.
async fn pull_usage(ctl: &Controller, peer: Uuid, conn: &Connection) -> anyhow::Result<()> {
    let Some(p) = ctl
        .app
        .store
        .peers()
        .await?
        .into_iter()
        .find(|p| p.id == peer)
    else {
        return Ok(());
    };
    if p.role != PeerRole::HostCloud {
        return Ok(());
    }
    let mut have = p.in_seq;
    loop {
        let answer = request(
            ctl,
            conn,
            PeerMessage::UsagePull(UsagePull {
                after_seq: have,
                limit: USAGE_BATCH,
            }),
        )
        .await?;
        let PeerMessage::Usage(batch) = answer else {
            bail!("unexpected answer {}", answer.kind());
        };
        if batch.rows.is_empty() {
            return Ok(());
        }
        match ctl
            .app
            .store
            .receive_peer_usage(peer, &batch.rows, ctl.app.clock.now_ms())
            .await?
        {
            Ok(through) if through > have => have = through,
            Ok(_) => return Ok(()),
            Err(refusal) => bail!("pulled usage refused: {refusal}"),
        }
    }
}

/// The certificate for peer links, issued by this controller's CA at start.
pub fn issue_identity(
    ca: &surplus_certs::CertAuthority,
    id: Uuid,
    names: &[String],
    now_ms: i64,
) -> anyhow::Result<Identity> {
    let (cert_pem, key_pem) = ca.issue_controller(id, names, now_ms, IDENTITY_LIFETIME_MS)?;
    Ok(Identity { cert_pem, key_pem })
}
