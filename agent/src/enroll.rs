//! Enrollment: trade a join token for an identity.
//!
//! The key pair is generated here and only its CSR leaves the host. The controller is
//! verified against the CA fingerprint the token pins before anything is sent, and the
//! answer is checked again (CA fingerprint, agent name in the certificate, our public
//! key in the certificate) before the identity is written.

use quinn::Endpoint;
use surplus_certs::{
    CertError, agent_csr, cert_info_pem, certs_from_pem, fingerprint, new_agent_key,
};
use surplus_protocol::PROTOCOL_VERSION;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::messages::{EnrollRequest, ErrorReply, Message};
use surplus_protocol::quic::{self, ExchangeError};
use surplus_protocol::token::{JoinToken, TokenFormatError};
use uuid::Uuid;

use crate::config::AgentConfig;
use crate::identity::{Identity, IdentityError};
use crate::net;

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token text is not a valid join token.
    #[error(transparent)]
    Token(#[from] TokenFormatError),
    /// The token's own expiry has passed (the controller would refuse it too).
    #[error(
        "join token expired {0} s ago; ask the operator for a new one (`surplus tokens create`)"
    )]
    Expired(i64),
    /// This data directory already holds an identity.
    #[error(
        "{path} already holds the identity of agent {agent_id}; use another --data-dir or remove it to enroll again"
    )]
    AlreadyEnrolled {
        /// Existing agent id.
        agent_id: Uuid,
        /// The identity file.
        path: String,
    },
    /// No enrollment address could be reached (or its TLS identity was not the pinned one).
    #[error("cannot enroll at {addresses}: {reason}")]
    Unreachable {
        /// The addresses tried.
        addresses: String,
        /// The last failure.
        reason: String,
    },
    /// The controller refused the request.
    #[error("enrollment refused by the controller: {0}")]
    Refused(ErrorReply),
    /// The controller's answer does not hold together.
    #[error("controller answered with an unusable enrollment: {0}")]
    BadAnswer(String),
    /// The exchange failed mid-way.
    #[error("enrollment exchange failed: {0}")]
    Exchange(#[from] ExchangeError),
    /// Key or CSR generation failed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The identity could not be written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// Enrolls with `token_text` and writes the identity into `config.data_dir`.
pub async fn enroll(
    token_text: &str,
    config: &AgentConfig,
    now_ms: UnixMillis,
) -> Result<Identity, EnrollError> {
    let token = JoinToken::parse(token_text)?;
    if token.expires_at_ms <= now_ms {
        return Err(EnrollError::Expired((now_ms - token.expires_at_ms) / 1000));
    }
    match Identity::load(&config.data_dir) {
        Ok(existing) => {
            return Err(EnrollError::AlreadyEnrolled {
                agent_id: existing.agent_id,
                path: Identity::path(&config.data_dir).display().to_string(),
            });
        }
        Err(IdentityError::Missing(_)) => {}
        Err(e) => return Err(e.into()),
    }

    let hostname = sysinfo::System::host_name().unwrap_or_else(|_| "unknown".into());
    let identity = request_identity(None, &token, &hostname, config, now_ms).await?;
    identity.save(&config.data_dir)?;
    Ok(identity)
}

/// The network half of enrollment: a fresh key, its CSR sent with the token's secret to
/// the token's pinned controller (on `endpoint` when given), and the answer checked.
/// Nothing is written; the caller stores the identity.
pub async fn request_identity(
    endpoint: Option<&Endpoint>,
    token: &JoinToken,
    hostname: &str,
    config: &AgentConfig,
    now_ms: UnixMillis,
) -> Result<Identity, EnrollError> {
    let (key, key_pem) = new_agent_key()?;
    let csr_pem = agent_csr(&key, hostname)?;
    let tls = surplus_certs::pinned_client_config(token.ca_fingerprint)?;
    let (_endpoint, conn) = net::connect_on(
        endpoint,
        tls,
        &token.enroll_addresses,
        &token.server_name,
        config,
    )
    .await
    .map_err(|e| EnrollError::Unreachable {
        addresses: token.enroll_addresses.join(", "),
        reason: e.to_string(),
    })?;

    let request = Message::EnrollRequest(EnrollRequest {
        protocol_version: PROTOCOL_VERSION,
        token_secret: token.secret,
        csr_pem,
        hostname: hostname.to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    });
    let answer = quic::request(
        &conn,
        &request,
        config.max_frame_size,
        config.request_timeout,
    )
    .await;
    conn.close(quic::codes::CLOSE_NORMAL, b"enrolled");
    let enrolled = match answer? {
        Message::Enrolled(e) => e,
        Message::Error(e) => return Err(EnrollError::Refused(e)),
        other => {
            return Err(EnrollError::BadAnswer(format!(
                "unexpected {}",
                other.kind()
            )));
        }
    };

    let ca = certs_from_pem(&enrolled.ca_pem, "CA certificate")?;
    if fingerprint(&ca[0]) != token.ca_fingerprint {
        return Err(EnrollError::BadAnswer(
            "the CA sent does not match the pinned fingerprint".into(),
        ));
    }
    let info = cert_info_pem(&enrolled.certificate.cert_pem)?;
    if info.agent_id != Some(enrolled.agent_id) {
        return Err(EnrollError::BadAnswer(
            "the certificate does not name the agent id sent with it".into(),
        ));
    }
    if info.public_key != key.public_key_raw() {
        return Err(EnrollError::BadAnswer(
            "the certificate is not for this agent's key".into(),
        ));
    }
    let identity = Identity {
        agent_id: enrolled.agent_id,
        key_pem,
        certificate: enrolled.certificate,
        received_at_ms: now_ms,
        ca_pem: enrolled.ca_pem,
        controller_addresses: enrolled.controller_addresses,
        server_name: enrolled.server_name,
    };
    Ok(identity)
}
