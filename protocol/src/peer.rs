//! Federation between controllers (issue 18, C12): the peering token one controller
//! prints and another joins with, and the messages a peer link carries.
//!
//! A peer link is the agents' transport between two controllers: QUIC, TLS 1.3, each
//! side presenting a certificate of its own CA that names it `surplus://controller/<id>`
//! and trusting exactly the CA the other pinned at peering. The join itself goes to the
//! inviter's enrollment endpoint (server authentication by the pinned fingerprint, as an
//! agent enrolls) and trades the two CAs. Every message travels as
//! [`crate::Message::Peer`], one request and one answer per stream.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::UnixMillis;
use crate::codec;

const PREFIX: &str = "surplus-peer-1.";

/// ALPN of peer links between controllers.
pub const PEER_ALPN: &[u8] = b"surplus-peer/1";

/// The URI SAN scheme that binds a controller id into its certificate.
pub const CONTROLLER_URI_PREFIX: &str = "surplus://controller/";

/// What a peer is to this controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PeerRole {
    /// It hosts some of this controller's subscribers: it sends their usage here.
    HostCloud,
    /// It buys brokered capacity: this controller tenders bundles to it.
    MarketplaceCloud,
    /// It brokers for this controller: this controller sends it usage (as a host
    /// cloud) or answers its tenders (as a marketplace cloud).
    Broker,
}

impl PeerRole {
    /// The name used in tokens, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerRole::HostCloud => "host-cloud",
            PeerRole::MarketplaceCloud => "marketplace-cloud",
            PeerRole::Broker => "broker",
        }
    }

    /// Reads a role's name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "host-cloud" => Some(PeerRole::HostCloud),
            "marketplace-cloud" => Some(PeerRole::MarketplaceCloud),
            "broker" => Some(PeerRole::Broker),
            _ => None,
        }
    }
}

impl std::fmt::Display for PeerRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A decoded peering token: what `surplus-controller peer join` needs to reach the
/// inviter and to trust nothing but its CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerToken {
    /// The secret; the inviter stores only its hash, and takes it once.
    pub secret: [u8; 32],
    /// The inviting controller.
    pub controller_id: Uuid,
    /// What the joining controller will be to the inviter (`host-cloud` or
    /// `marketplace-cloud`); the inviter is its broker.
    pub role: PeerRole,
    /// SHA-256 of the inviter's CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// The inviter's enrollment endpoints, `host:port`: where the join goes.
    pub enroll_addresses: Vec<String>,
    /// The inviter's TLS server name.
    pub server_name: String,
    /// Expiry.
    pub expires_at_ms: UnixMillis,
}

/// Why a peering token could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PeerTokenError {
    /// The string does not start with the peering token prefix.
    #[error("not a Surplus peering token (it should start with `{PREFIX}`)")]
    Prefix,
    /// The body is not valid base64url.
    #[error("peering token is damaged: not valid base64url")]
    Base64,
    /// The body does not decode.
    #[error("peering token is damaged: {0}")]
    Body(String),
    /// The token names no address.
    #[error("peering token names no controller address")]
    NoAddress,
}

impl PeerToken {
    /// The printable form.
    pub fn encode(&self) -> String {
        let body = codec::encode_value(self).expect("a peering token always encodes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(body))
    }

    /// Reads a printable token; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<Self, PeerTokenError> {
        let body = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(PeerTokenError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| PeerTokenError::Base64)?;
        let token: PeerToken =
            codec::decode_value(&bytes).map_err(|e| PeerTokenError::Body(e.to_string()))?;
        if token.enroll_addresses.is_empty() {
            return Err(PeerTokenError::NoAddress);
        }
        Ok(token)
    }
}

/// A message of a peer link (or of a join at the enrollment endpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Joiner → inviter (enrollment endpoint): the token's secret and the joiner's CA.
    Join(PeerJoin),
    /// Inviter → joiner: the join is recorded; the inviter's CA and peer addresses.
    Joined(PeerJoined),
    /// Host cloud → broker: per-user usage, in sequence order.
    Usage(UsageBatch),
    /// Broker → host cloud: every row up to `through_seq` is committed.
    UsageAck(UsageAck),
    /// Broker → host cloud: send the rows after `after_seq` (answered by
    /// [`PeerMessage::Usage`], possibly empty).
    UsagePull(UsagePull),
    /// The request was refused; the stream ends here.
    Refused(String),
    /// Are you there (the dialer's first request: the link is up once it is answered).
    Ping,
    /// Answer to [`PeerMessage::Ping`].
    Pong,
    /// Broker → marketplace cloud: capacity offered for an interval (answered by
    /// [`PeerMessage::TenderAnswer`]; a tender sent again gets the answer recorded
    /// the first time).
    Tender(TenderOffer),
    /// Marketplace cloud → broker: accepted (whole or part) or rejected.
    TenderAnswer(TenderReply),
    /// Broker → marketplace cloud: what a tender sold falls short (its contributors
    /// took it back and nobody could stand in); answered by
    /// [`PeerMessage::ShortfallNoted`]. Sent again until answered; kept once.
    Shortfall(TenderShortfall),
    /// Marketplace cloud → broker: the shortfall is recorded.
    ShortfallNoted,
}

impl PeerMessage {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::Join(_) => "peer-join",
            PeerMessage::Joined(_) => "peer-joined",
            PeerMessage::Usage(_) => "peer-usage",
            PeerMessage::UsageAck(_) => "peer-usage-ack",
            PeerMessage::UsagePull(_) => "peer-usage-pull",
            PeerMessage::Refused(_) => "peer-refused",
            PeerMessage::Ping => "peer-ping",
            PeerMessage::Pong => "peer-pong",
            PeerMessage::Tender(_) => "peer-tender",
            PeerMessage::TenderAnswer(_) => "peer-tender-answer",
            PeerMessage::Shortfall(_) => "peer-shortfall",
            PeerMessage::ShortfallNoted => "peer-shortfall-noted",
        }
    }
}

/// A joining controller introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerJoin {
    /// The token's secret.
    pub secret: [u8; 32],
    /// The joining controller.
    pub controller_id: Uuid,
    /// A name for people.
    pub name: String,
    /// The joiner's CA certificate, PEM: the inviter trusts it for this peer only.
    pub ca_pem: String,
    /// Where the joiner's peer endpoint can be reached, `host:port` (may be empty).
    pub peer_addresses: Vec<String>,
}

/// The inviter's side of a join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerJoined {
    /// The inviting controller (as in the token).
    pub controller_id: Uuid,
    /// A name for people.
    pub name: String,
    /// The inviter's CA certificate, PEM (its fingerprint is the token's).
    pub ca_pem: String,
    /// Where the joiner dials the link, `host:port`.
    pub peer_addresses: Vec<String>,
    /// The inviter's TLS server name.
    pub server_name: String,
    /// What the joiner is to the inviter.
    pub role: PeerRole,
}

/// One row of a host cloud's usage: what `user` used of `resource` in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerUsageRow {
    /// Position in the sender's sequence for this peer, from 1, without gaps.
    pub seq: u64,
    /// The subscriber's user as the broker knows it.
    pub user: String,
    /// `os_instances`, `cpu_cores`, `memory_gb` or `app.<name>`.
    pub resource: String,
    /// Start of the minute (a multiple of 60 000 ms).
    pub minute_ms: UnixMillis,
    /// Units in use integrated over the minute, unit-milliseconds.
    pub unit_ms: u64,
}

/// Usage rows, in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageBatch {
    /// The rows.
    pub rows: Vec<PeerUsageRow>,
}

/// What the receiver has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAck {
    /// Every row up to and including this one is stored.
    pub through_seq: u64,
}

/// A pull of rows after a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsagePull {
    /// The last row the asker holds.
    pub after_seq: u64,
    /// Most rows wanted.
    pub limit: u32,
}

/// A bundle offered to a marketplace cloud: `amount` units of `resource` held at
/// every instant of `[from_ms, until_ms)`, for `price` minor units of `currency` in
/// all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenderOffer {
    /// The tender (one per bundle and marketplace cloud).
    pub id: Uuid,
    /// `os_instances`, `cpu_cores`, `memory_gb` or `app.<name>`.
    pub resource: String,
    /// Units held at every instant.
    pub amount: u64,
    /// The interval's start, ms since the epoch.
    pub from_ms: UnixMillis,
    /// The interval's end (exclusive).
    pub until_ms: UnixMillis,
    /// The price of the whole amount over the whole interval, minor units.
    pub price: u64,
    /// ISO 4217 code.
    pub currency: String,
}

/// A marketplace cloud's answer to a [`TenderOffer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenderReply {
    /// The tender answered.
    pub id: Uuid,
    /// Units taken: the whole amount, part of it, or 0 (rejected).
    pub accepted_amount: u64,
    /// What the marketplace cloud pays for them, minor units.
    pub price: u64,
    /// Why it took less than the whole, if it did.
    pub reason: Option<String>,
}

/// Units of a tender missing over a span of its interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenderShortfall {
    /// The tender.
    pub id: Uuid,
    /// Start.
    pub from_ms: UnixMillis,
    /// End (exclusive).
    pub until_ms: UnixMillis,
    /// Units missing at every instant of it.
    pub missing: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> PeerToken {
        PeerToken {
            secret: [3; 32],
            controller_id: Uuid::from_u128(7),
            role: PeerRole::HostCloud,
            ca_fingerprint: [5; 32],
            enroll_addresses: vec!["127.0.0.1:7071".into()],
            server_name: "broker.example".into(),
            expires_at_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn peering_tokens_round_trip_and_damage_is_named() {
        let t = token();
        assert_eq!(PeerToken::parse(&format!(" {}\n", t.encode())), Ok(t));
        assert_eq!(
            PeerToken::parse("surplus-join-1.abc"),
            Err(PeerTokenError::Prefix)
        );
        assert_eq!(
            PeerToken::parse(&format!("{}!", token().encode())),
            Err(PeerTokenError::Base64)
        );
        let mut none = token();
        none.enroll_addresses.clear();
        assert_eq!(
            PeerToken::parse(&none.encode()),
            Err(PeerTokenError::NoAddress)
        );
    }

    #[test]
    fn roles_read_back_by_name() {
        for r in [
            PeerRole::HostCloud,
            PeerRole::MarketplaceCloud,
            PeerRole::Broker,
        ] {
            assert_eq!(PeerRole::parse(r.as_str()), Some(r));
        }
        assert_eq!(PeerRole::parse("cloud"), None);
    }
}
