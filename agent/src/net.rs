//! Opening QUIC connections to the controller.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use quinn::{ClientConfig, Connection, Endpoint};

use crate::config::AgentConfig;

/// Why no connection could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No address resolved.
    #[error("no address resolves ({0})")]
    NoAddress(String),
    /// The TLS configuration is unusable for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    /// The local UDP socket could not be opened.
    #[error("local UDP socket: {0}")]
    Socket(std::io::Error),
    /// Every address failed; the last failure.
    #[error("{0}")]
    Failed(quinn::ConnectionError),
}

impl ConnectError {
    /// The QUIC error of the last attempt, when it got that far.
    pub fn connection_error(&self) -> Option<&quinn::ConnectionError> {
        match self {
            ConnectError::Failed(e) => Some(e),
            _ => None,
        }
    }
}

async fn resolve(addresses: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for a in addresses {
        if let Ok(iter) = tokio::net::lookup_host(a.as_str()).await {
            out.extend(iter);
        }
    }
    out
}

/// The QUIC client configuration for `tls` with the agent's transport settings.
pub fn client_config(
    tls: rustls::ClientConfig,
    config: &AgentConfig,
) -> Result<ClientConfig, ConnectError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let mut client = ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(surplus_protocol::quic::transport_config(
        config.idle_timeout,
        config.keep_alive,
        config.max_frame_size,
    )));
    Ok(client)
}

/// Connects to the first reachable of `addresses`, verifying `server_name`.
/// Returns the endpoint too: it must outlive the connection.
pub async fn connect_any(
    tls: rustls::ClientConfig,
    addresses: &[String],
    server_name: &str,
    config: &AgentConfig,
) -> Result<(Endpoint, Connection), ConnectError> {
    connect_on(None, tls, addresses, server_name, config).await
}

/// Like [`connect_any`], on `endpoint` when one is given (many simulated agents share
/// a few sockets in the load generator), else on a fresh one per address.
pub async fn connect_on(
    endpoint: Option<&Endpoint>,
    tls: rustls::ClientConfig,
    addresses: &[String],
    server_name: &str,
    config: &AgentConfig,
) -> Result<(Endpoint, Connection), ConnectError> {
    let targets = resolve(addresses).await;
    if targets.is_empty() {
        return Err(ConnectError::NoAddress(addresses.join(", ")));
    }
    let client = client_config(tls, config)?;
    let mut last = None;
    for target in targets {
        let endpoint = match endpoint {
            Some(shared) => shared.clone(),
            None => {
                let bind: SocketAddr = if target.is_ipv6() {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                }
                .parse()
                .expect("literal address");
                Endpoint::client(bind).map_err(ConnectError::Socket)?
            }
        };
        let attempt = match endpoint.connect_with(client.clone(), target, server_name) {
            Ok(connecting) => connecting.await,
            Err(e) => return Err(ConnectError::Tls(e.to_string())),
        };
        match attempt {
            Ok(conn) => return Ok((endpoint, conn)),
            Err(e) => {
                tracing::debug!(%target, error = %e, "connection attempt failed");
                last = Some(e);
            }
        }
    }
    Err(ConnectError::Failed(
        last.expect("at least one target was tried"),
    ))
}
