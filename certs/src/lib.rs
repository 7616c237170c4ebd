//! Certificates and TLS configuration for Surplus.
//!
//! The controller runs its own CA ([`CertAuthority`]). It issues itself a server
//! certificate and issues every agent a short-lived client certificate whose only name
//! is the URI SAN `surplus://agent/<uuid>`, chosen by the controller: the agent's CSR
//! contributes its public key and nothing else.
//!
//! TLS configurations built here:
//! - [`session_server_config`]: the controller's mutually authenticated endpoint; a peer
//!   without a certificate from our CA, with a certificate that names no agent, or whose
//!   agent is revoked fails the handshake.
//! - [`enroll_server_config`]: the enrollment endpoint (server authentication only).
//! - [`pinned_client_config`]: the agent before it has a certificate, trusting only a CA
//!   whose SHA-256 fingerprint it was given in the join token.
//! - [`session_client_config`]: the enrolled agent.
//!
//! This crate does no I/O: callers read and write the PEM files.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as TlsName, RootCertStore, SignatureScheme};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::messages::IssuedCertificate;
use surplus_protocol::peer::{CONTROLLER_URI_PREFIX, PEER_ALPN};
use surplus_protocol::{AGENT_URI_PREFIX, ALPN, ENROLL_ALPN};
use uuid::Uuid;

/// What can go wrong with keys, certificates and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen failed to generate or sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM input holds no usable certificate or key.
    #[error("invalid PEM ({what}): {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The CSR could not be parsed or its signature does not verify.
    #[error("certificate signing request rejected: {0}")]
    Csr(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A certificate does not parse.
    #[error("unreadable certificate: {0}")]
    Parse(String),
}

/// The crypto provider every Surplus TLS configuration uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a DER certificate: the fingerprint join tokens pin.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// SHA-256 of arbitrary bytes (token secrets, API tokens, inventory digests).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    fingerprint(bytes)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fingerprint in the `AB:CD:...` form people compare by eye.
pub fn fingerprint_display(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The URI SAN of an agent id.
pub fn agent_uri(id: Uuid) -> String {
    format!("{AGENT_URI_PREFIX}{id}")
}

fn to_time(ms: UnixMillis) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).expect("timestamp in range")
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn first_cert(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or(CertError::Pem {
            what,
            reason: "no certificate".into(),
        })?
        .map_err(|e| CertError::Pem {
            what,
            reason: e.to_string(),
        })
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            what,
            reason: "no certificate".into(),
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem {
        what,
        reason: e.to_string(),
    })
}

/// The controller's certificate authority.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority")
            .field("fingerprint", &hex(&self.fingerprint()))
            .finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// A new CA valid for ten years from `now_ms`.
    pub fn generate(common_name: &str, now_ms: UnixMillis) -> Result<(Self, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Surplus");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = to_time(now_ms - 3_600_000);
        params.not_after = to_time(now_ms + 10 * 365 * 86_400_000);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert_pem = cert.pem();
        Ok((Self::from_pem(&cert_pem, &key_pem)?, key_pem))
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = first_cert(cert_pem, "CA certificate")?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// PEM of the CA certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// DER of the CA certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.cert_der)
    }

    /// A server certificate for `names` (DNS names or IP addresses), with a fresh key.
    /// Returns `(certificate PEM, key PEM)`.
    pub fn issue_server(
        &self,
        names: &[String],
        now_ms: UnixMillis,
        lifetime_ms: i64,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            names
                .first()
                .map(String::as_str)
                .unwrap_or("surplus-controller"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = to_time(now_ms - 3_600_000);
        params.not_after = to_time(now_ms + lifetime_ms);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs an agent's CSR. Only the CSR's public key is used: the certificate's one
    /// name is `surplus://agent/<agent_id>`, its validity starts `backdate_ms` before
    /// `now_ms` (clock skew) and ends `lifetime_ms` after it.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        agent_id: Uuid,
        now_ms: UnixMillis,
        lifetime_ms: i64,
        backdate_ms: i64,
    ) -> Result<IssuedCertificate, CertError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Csr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("agent {agent_id}"));
        params.subject_alt_names = vec![SanType::URI(agent_uri(agent_id).try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = to_time(now_ms - backdate_ms);
        let not_after_ms = now_ms + lifetime_ms;
        params.not_after = to_time(not_after_ms);
        let serial = random_serial();
        let serial_hex = hex(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            serial: serial_hex,
            issued_at_ms: now_ms,
            not_after_ms: not_after_ms.div_euclid(1000) * 1000,
        })
    }
}

impl CertAuthority {
    /// The certificate this controller presents on peer links, with a fresh key: its
    /// one URI name is `surplus://controller/<id>` beside the server `names`, and it
    /// serves both as client and as server. Returns `(certificate PEM, key PEM)`.
    pub fn issue_controller(
        &self,
        controller_id: Uuid,
        names: &[String],
        now_ms: UnixMillis,
        lifetime_ms: i64,
    ) -> Result<(String, String), CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("controller {controller_id}"));
        params
            .subject_alt_names
            .push(SanType::URI(controller_uri(controller_id).try_into()?));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = to_time(now_ms - 3_600_000);
        params.not_after = to_time(now_ms + lifetime_ms);
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The URI SAN of a controller id.
pub fn controller_uri(id: Uuid) -> String {
    format!("{CONTROLLER_URI_PREFIX}{id}")
}

/// The controller id a DER certificate names, if it names one.
pub fn controller_id_of(der: &[u8]) -> Option<Uuid> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix(CONTROLLER_URI_PREFIX)
            .and_then(|id| Uuid::parse_str(id).ok()),
        _ => None,
    })
}

/// The CAs of this controller's peers, by peer id: each peer is trusted with its own
/// CA only, and a removed peer's CA is dropped at once (shared with the TLS verifier).
#[derive(Debug, Clone, Default)]
pub struct PeerTrust(Arc<RwLock<std::collections::HashMap<Uuid, CertificateDer<'static>>>>);

impl PeerTrust {
    /// Replaces the whole set (reloaded from storage): `(peer id, CA PEM)`. A CA that
    /// does not parse is left out and named in the error list.
    pub fn replace(&self, peers: impl IntoIterator<Item = (Uuid, String)>) -> Vec<(Uuid, String)> {
        let mut map = std::collections::HashMap::new();
        let mut bad = Vec::new();
        for (id, pem) in peers {
            match first_cert(&pem, "peer CA") {
                Ok(der) => {
                    map.insert(id, der);
                }
                Err(e) => bad.push((id, e.to_string())),
            }
        }
        *self.0.write().expect("peer trust lock poisoned") = map;
        bad
    }

    /// Whether `id` is a peer now.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.0
            .read()
            .expect("peer trust lock poisoned")
            .contains_key(id)
    }

    fn ca_of(&self, id: &Uuid) -> Option<CertificateDer<'static>> {
        self.0
            .read()
            .expect("peer trust lock poisoned")
            .get(id)
            .cloned()
    }
}

/// Why a peer's certificate was refused.
#[derive(Debug)]
struct NotAPeer(String);

impl std::fmt::Display for NotAPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAPeer {}

fn not_a_peer(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(NotAPeer(why)),
    )))
}

/// The signature checks of a verifier that holds its crypto `provider`: the
/// provider's algorithms, for TLS 1.2 and 1.3 alike.
macro_rules! provider_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}

/// Client verifier of the peer endpoint: the certificate must name a controller that
/// is a peer now and chain to that peer's own CA (another peer's CA does not do).
#[derive(Debug)]
struct PeerCertVerifier {
    trust: PeerTrust,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PeerCertVerifier {
    fn root_hint_subjects(&self) -> &[TlsName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = controller_id_of(end_entity).ok_or_else(|| {
            not_a_peer(format!(
                "client certificate carries no {CONTROLLER_URI_PREFIX}<uuid> name"
            ))
        })?;
        let ca = self
            .trust
            .ca_of(&id)
            .ok_or_else(|| not_a_peer(format!("controller {id} is not a peer of this one")))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_client_cert(end_entity, intermediates, now)
    }

    provider_signatures!();
}

/// TLS of the controller's peer endpoint: TLS 1.3, ALPN `surplus-peer/1`, the
/// controller certificate (chained to our CA), and a client certificate required from
/// a controller that is a peer now, chained to that peer's CA.
pub fn peer_server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    trust: PeerTrust,
) -> Result<rustls::ServerConfig, CertError> {
    let verifier = Arc::new(PeerCertVerifier {
        trust,
        provider: provider(),
    });
    tls13_server(
        Some(verifier),
        server_chain(cert_pem, ca_pem)?,
        key_from_pem(key_pem, "controller key")?,
        PEER_ALPN,
    )
}

/// TLS of a controller dialing its peer: trusts only the peer's CA (pinned at
/// peering) and presents this controller's certificate.
pub fn peer_client_config(
    peer_ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, CertError> {
    let mut roots = RootCertStore::empty();
    roots.add(first_cert(peer_ca_pem, "peer CA certificate")?)?;
    let mut config = tls13_client()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            certs_from_pem(cert_pem, "controller certificate")?,
            key_from_pem(key_pem, "controller key")?,
        )?;
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// A new agent key pair (ECDSA P-256). Returns `(key, key PEM)`.
pub fn new_agent_key() -> Result<(KeyPair, String), CertError> {
    let key = KeyPair::generate()?;
    let pem = key.serialize_pem();
    Ok((key, pem))
}

/// A CSR for `key`. The names in it are informational; the controller ignores them.
pub fn agent_csr(key: &KeyPair, hostname: &str) -> Result<String, CertError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, hostname);
    Ok(params.serialize_request(key)?.pem()?)
}

/// What Surplus reads from a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    /// Agent id from a `surplus://agent/<uuid>` URI SAN.
    pub agent_id: Option<Uuid>,
    /// Serial, lower-case hex.
    pub serial: String,
    /// Validity start.
    pub not_before_ms: UnixMillis,
    /// Validity end.
    pub not_after_ms: UnixMillis,
    /// Raw public key bits (as `KeyPair::public_key_raw` returns them).
    pub public_key: Vec<u8>,
}

/// Parses the fields Surplus uses from a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let mut agent_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(AGENT_URI_PREFIX) {
                    agent_id = Uuid::parse_str(id).ok();
                }
            }
        }
    }
    Ok(CertInfo {
        agent_id,
        serial: hex(cert.raw_serial()),
        not_before_ms: cert.validity().not_before.timestamp() * 1000,
        not_after_ms: cert.validity().not_after.timestamp() * 1000,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// Parses a PEM certificate's fields.
pub fn cert_info_pem(pem: &str) -> Result<CertInfo, CertError> {
    cert_info(&first_cert(pem, "certificate")?)
}

/// The agent id of a DER certificate, if it names one.
pub fn agent_id_of(der: &[u8]) -> Option<Uuid> {
    cert_info(der).ok().and_then(|i| i.agent_id)
}

/// Revoked agents, shared between the store and the TLS verifier.
#[derive(Debug, Clone, Default)]
pub struct RevocationList(Arc<RwLock<HashSet<Uuid>>>);

impl RevocationList {
    /// Marks `id` revoked; returns true if it was not already.
    pub fn revoke(&self, id: Uuid) -> bool {
        self.0.write().expect("revocation lock poisoned").insert(id)
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &Uuid) -> bool {
        self.0
            .read()
            .expect("revocation lock poisoned")
            .contains(id)
    }

    /// Replaces the whole set (reloaded from storage).
    pub fn replace(&self, ids: impl IntoIterator<Item = Uuid>) {
        *self.0.write().expect("revocation lock poisoned") = ids.into_iter().collect();
    }
}

/// Error for certificates that chain to our CA but name no agent.
#[derive(Debug)]
struct NoAgentName;

impl std::fmt::Display for NoAgentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client certificate carries no {AGENT_URI_PREFIX}<uuid> name"
        )
    }
}

impl std::error::Error for NoAgentName {}

/// Client verifier of the session endpoint: the web PKI checks against our CA (chain,
/// validity, client-auth usage), then an agent name, then the revocation list.
#[derive(Debug)]
struct AgentCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevocationList,
}

impl ClientCertVerifier for AgentCertVerifier {
    fn root_hint_subjects(&self) -> &[TlsName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = agent_id_of(end_entity).ok_or_else(|| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(NoAgentName),
            )))
        })?;
        if self.revoked.is_revoked(&id) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls13_server(
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, CertError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match verifier {
        Some(v) => builder
            .with_client_cert_verifier(v)
            .with_single_cert(chain, key)?,
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config.max_early_data_size = 0; // no 0-RTT: commands are not idempotent
    Ok(config)
}

/// Server chain: the server certificate followed by the CA, so a pinning agent can find
/// the CA by fingerprint.
fn server_chain(
    server_cert_pem: &str,
    ca_pem: &str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let mut chain = certs_from_pem(server_cert_pem, "server certificate")?;
    chain.push(first_cert(ca_pem, "CA certificate")?);
    Ok(chain)
}

/// TLS of the controller's session endpoint: TLS 1.3, ALPN `surplus/1`, client
/// certificate from our CA naming a non-revoked agent required.
pub fn session_server_config(
    ca_pem: &str,
    server_cert_pem: &str,
    server_key_pem: &str,
    revoked: RevocationList,
) -> Result<rustls::ServerConfig, CertError> {
    let mut roots = RootCertStore::empty();
    roots.add(first_cert(ca_pem, "CA certificate")?)?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build()?;
    let verifier = Arc::new(AgentCertVerifier { inner, revoked });
    tls13_server(
        Some(verifier),
        server_chain(server_cert_pem, ca_pem)?,
        key_from_pem(server_key_pem, "server key")?,
        ALPN,
    )
}

/// TLS of the controller's enrollment endpoint: server authentication only, ALPN
/// `surplus-enroll/1`.
pub fn enroll_server_config(
    ca_pem: &str,
    server_cert_pem: &str,
    server_key_pem: &str,
) -> Result<rustls::ServerConfig, CertError> {
    tls13_server(
        None,
        server_chain(server_cert_pem, ca_pem)?,
        key_from_pem(server_key_pem, "server key")?,
        ENROLL_ALPN,
    )
}

/// The error an agent sees when the controller's CA is not the pinned one.
#[derive(Debug)]
pub struct PinMismatch {
    /// The fingerprint the token pinned.
    pub pinned: [u8; 32],
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the controller's CA does not match the fingerprint pinned in the join token ({})",
            fingerprint_display(&self.pinned)
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Server verifier for enrollment: trusts exactly the CA in the presented chain whose
/// SHA-256 equals the pinned fingerprint, then verifies the server certificate against
/// it as usual (chain, validity, server name).
#[derive(Debug)]
struct PinnedCaVerifier {
    pinned: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.pinned)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(PinMismatch {
                        pinned: self.pinned,
                    })),
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    provider_signatures!();
}

fn tls13_client()
-> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, CertError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?)
}

/// TLS of an agent enrolling: trusts only the CA with the pinned fingerprint.
pub fn pinned_client_config(pinned: [u8; 32]) -> Result<rustls::ClientConfig, CertError> {
    let mut config = tls13_client()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            pinned,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// TLS of an enrolled agent: trusts our CA and presents the agent certificate.
pub fn session_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ClientConfig, CertError> {
    let mut roots = RootCertStore::empty();
    roots.add(first_cert(ca_pem, "CA certificate")?)?;
    let mut config = tls13_client()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            certs_from_pem(cert_pem, "agent certificate")?,
            key_from_pem(key_pem, "agent key")?,
        )?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: UnixMillis = 1_800_000_000_000;

    #[test]
    fn agent_certificates_carry_only_the_controller_chosen_name() {
        let (ca, _) = CertAuthority::generate("test CA", NOW).unwrap();
        let (key, _) = new_agent_key().unwrap();
        let csr = agent_csr(&key, "evil.example").unwrap();
        let id = Uuid::now_v7();
        let issued = ca
            .sign_agent_csr(&csr, id, NOW, 86_400_000, 300_000)
            .unwrap();
        let info = cert_info_pem(&issued.cert_pem).unwrap();
        assert_eq!(info.agent_id, Some(id));
        assert_eq!(info.serial, issued.serial);
        assert_eq!(info.not_after_ms, NOW + 86_400_000);
        assert_eq!(info.not_before_ms, NOW - 300_000);
        assert_eq!(info.public_key, key.public_key_raw());
        // The name the CSR asked for appears nowhere in the certificate: not as its
        // subject, not as a SAN, not in any other field.
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap();
        assert!(
            !pem.contents
                .windows(b"evil.example".len())
                .any(|w| w == b"evil.example"),
            "the requested name leaked into the certificate"
        );
        assert!(
            csr.contains("-----BEGIN CERTIFICATE REQUEST-----")
                && x509_parser::pem::parse_x509_pem(csr.as_bytes())
                    .unwrap()
                    .1
                    .contents
                    .windows(b"evil.example".len())
                    .any(|w| w == b"evil.example"),
            "the check above looks for the name where the CSR carries it"
        );
    }

    #[test]
    fn a_tampered_csr_is_rejected() {
        let (ca, _) = CertAuthority::generate("test CA", NOW).unwrap();
        let (key, _) = new_agent_key().unwrap();
        let csr = agent_csr(&key, "host").unwrap();
        assert!(matches!(
            ca.sign_agent_csr("not a csr", Uuid::nil(), NOW, 1000, 0),
            Err(CertError::Csr(_))
        ));
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let n = der.len();
        der[n - 5] ^= 0xff; // corrupt the signature
        let pem = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64_encode(&der)
        );
        assert!(matches!(
            ca.sign_agent_csr(&pem, Uuid::nil(), NOW, 1000, 0),
            Err(CertError::Csr(_))
        ));
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn a_ca_reloads_from_pem_with_the_same_fingerprint() {
        let (ca, key_pem) = CertAuthority::generate("test CA", NOW).unwrap();
        let again = CertAuthority::from_pem(ca.cert_pem(), &key_pem).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        assert_eq!(fingerprint_display(&[0xab; 32]).len(), 32 * 3 - 1);
    }
}
