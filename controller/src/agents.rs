//! The agents' identities: enrollment with a join token, certificate renewal,
//! revocation and pings, independent of how they are reached (QUIC, HTTP, CLI).

use std::sync::Arc;
use std::time::Duration;

use surplus_api::agents::CreatedToken;
use surplus_certs::{CertAuthority, RevocationList};
use surplus_protocol::PROTOCOL_VERSION;
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::messages::{
    EnrollRequest, Enrolled, ErrorCode, ErrorReply, IssuedCertificate,
};
use surplus_protocol::quic::codes;
use surplus_protocol::token::JoinToken;
use uuid::Uuid;

use crate::app::App;
use crate::link::LinkError;
use crate::registry::RegistryEvent;
use crate::store::{EnrollOutcome, Labels, NewAgent, NewJoinToken, StoreError, TokenRefusal};

/// Enrollment, certificate renewal, revocation, join tokens and pings: the agents'
/// identities and the controller's view of whether they may connect.
#[derive(Debug)]
pub struct Agents {
    app: Arc<App>,
    ca: CertAuthority,
    /// Revoked agents, consulted by the TLS verifier.
    pub revoked: RevocationList,
}

fn reply(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}

impl Agents {
    pub(crate) fn new(app: Arc<App>, ca: CertAuthority, revoked: RevocationList) -> Self {
        Self { app, ca, revoked }
    }

    /// The CA certificate PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Creates a one-time join token valid for `ttl`.
    pub async fn create_join_token(
        &self,
        ttl: Duration,
        labels: Labels,
        created_by: &str,
    ) -> Result<CreatedToken, StoreError> {
        let now = self.app.clock.now_ms();
        let secret: [u8; 32] = rand::random();
        let expires_at_ms = now + ttl.as_millis() as i64;
        let id = Uuid::now_v7();
        self.app
            .store
            .create_join_token(&NewJoinToken {
                id,
                secret_hash: surplus_certs::hex(&surplus_certs::sha256(&secret)),
                labels: labels.clone(),
                created_at_ms: now,
                expires_at_ms,
                created_by: created_by.to_owned(),
            })
            .await?;
        let enroll_addresses = self.app.config.enroll_addresses();
        let token = JoinToken {
            secret,
            ca_fingerprint: self.ca.fingerprint(),
            enroll_addresses: enroll_addresses.clone(),
            server_name: self.app.config.server_name(),
            expires_at_ms,
        };
        Ok(CreatedToken {
            id,
            token: token.encode(),
            expires_at_ms,
            enroll_addresses,
            ca_fingerprint: surplus_certs::fingerprint_display(&self.ca.fingerprint()),
            labels,
        })
    }

    /// Serves an enrollment request: consumes the token and issues the certificate.
    pub async fn enroll(&self, request: &EnrollRequest) -> Result<Enrolled, ErrorReply> {
        if request.protocol_version != PROTOCOL_VERSION {
            self.app.metrics.enrollment("version_mismatch");
            return Err(reply(
                ErrorCode::VersionMismatch,
                format!(
                    "agent speaks protocol {}, controller speaks {PROTOCOL_VERSION}",
                    request.protocol_version
                ),
            ));
        }
        let now = self.app.clock.now_ms();
        let agent_id = Uuid::now_v7();
        let certificate = self
            .issue(&request.csr_pem, agent_id, now)
            .inspect_err(|_| self.app.metrics.enrollment("csr_rejected"))?;
        let agent = NewAgent {
            id: agent_id,
            hostname: request.hostname.chars().take(255).collect(),
            agent_version: request.agent_version.chars().take(64).collect(),
            cert_serial: certificate.serial.clone(),
            cert_issued_at_ms: certificate.issued_at_ms,
            cert_not_after_ms: certificate.not_after_ms,
        };
        let secret_hash = surplus_certs::hex(&surplus_certs::sha256(&request.token_secret));
        match self.app.store.enroll_agent(&secret_hash, now, &agent).await {
            Ok(EnrollOutcome::Registered(labels)) => {
                tracing::info!(%agent_id, hostname = %agent.hostname, ?labels, "agent enrolled");
                self.app.metrics.enrollment("registered");
                self.app.registry.publish(RegistryEvent::Enrolled(agent_id));
                Ok(Enrolled {
                    agent_id,
                    certificate,
                    ca_pem: self.ca.cert_pem().to_owned(),
                    controller_addresses: self.app.config.session_addresses(),
                    server_name: self.app.config.server_name(),
                })
            }
            Ok(EnrollOutcome::Refused(refusal)) => {
                tracing::warn!(hostname = %agent.hostname, %refusal, "enrollment refused");
                let (code, outcome) = match refusal {
                    TokenRefusal::Unknown => (ErrorCode::TokenUnknown, "token_unknown"),
                    TokenRefusal::Expired => (ErrorCode::TokenExpired, "token_expired"),
                    TokenRefusal::Used => (ErrorCode::TokenUsed, "token_used"),
                };
                self.app.metrics.enrollment(outcome);
                Err(reply(code, refusal.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "enrollment failed in storage");
                self.app.metrics.enrollment("error");
                Err(reply(
                    ErrorCode::Internal,
                    "the controller could not record the enrollment",
                ))
            }
        }
    }

    fn issue(
        &self,
        csr_pem: &str,
        agent_id: Uuid,
        now: UnixMillis,
    ) -> Result<IssuedCertificate, ErrorReply> {
        self.ca
            .sign_agent_csr(
                csr_pem,
                agent_id,
                now,
                self.app.config.agent_cert_lifetime.as_millis() as i64,
                self.app.config.cert_backdate.as_millis() as i64,
            )
            .map_err(|e| reply(ErrorCode::CsrRejected, e.to_string()))
    }

    /// Issues a fresh certificate to a connected, non-revoked agent.
    pub async fn renew(
        &self,
        agent_id: Uuid,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, ErrorReply> {
        if self.revoked.is_revoked(&agent_id) {
            return Err(reply(ErrorCode::Revoked, "agent is revoked"));
        }
        let certificate = self.issue(csr_pem, agent_id, self.app.clock.now_ms())?;
        if let Err(e) = self
            .app
            .store
            .record_certificate(
                agent_id,
                &certificate.serial,
                certificate.issued_at_ms,
                certificate.not_after_ms,
            )
            .await
        {
            tracing::error!(%agent_id, error = %e, "renewal not recorded");
            return Err(reply(
                ErrorCode::Internal,
                "the controller could not record the certificate",
            ));
        }
        tracing::info!(%agent_id, serial = %certificate.serial, "certificate renewed");
        self.app.metrics.renewals.inc();
        self.app.registry.publish(RegistryEvent::Renewed {
            agent_id,
            serial: certificate.serial.clone(),
        });
        Ok(certificate)
    }

    /// Revokes an agent: recorded, refused at the next handshake, and its live session
    /// (if any) closed now. `Ok(false)` when it already was revoked.
    pub async fn revoke(&self, agent_id: Uuid) -> Result<bool, StoreError> {
        let newly = self
            .app
            .store
            .revoke_agent(agent_id, self.app.clock.now_ms())
            .await?;
        self.cut_off(agent_id);
        if newly {
            tracing::info!(%agent_id, "agent revoked");
        }
        Ok(newly)
    }

    /// Measures the round trip of a ping to a connected agent, in the direction that
    /// commands use (the controller opens the stream).
    pub async fn ping(&self, agent_id: Uuid) -> Result<Duration, LinkError> {
        let nonce: u64 = rand::random();
        let started = tokio::time::Instant::now();
        let ping = surplus_protocol::Message::Ping(surplus_protocol::Ping { nonce });
        match self
            .app
            .link
            .call(agent_id, &ping, self.app.config.request_timeout)
            .await?
        {
            surplus_protocol::Message::Pong(pong) if pong.nonce == nonce => Ok(started.elapsed()),
            other => Err(LinkError::unexpected(agent_id, "a ping", &other)),
        }
    }

    /// Adds `agent_id` to the revocation list and closes its session.
    pub fn cut_off(&self, agent_id: Uuid) {
        let newly = self.revoked.revoke(agent_id);
        let kicked =
            self.app
                .registry
                .kick(agent_id, codes::CLOSE_REVOKED, "agent certificate revoked");
        if newly || kicked {
            self.app.metrics.revocations.inc();
            self.app.registry.publish(RegistryEvent::Revoked(agent_id));
        }
    }
}
