//! `cargo bench -p surplus-tests --bench link`: the agent-controller link on loopback.
//!
//! - Bulk throughput agent → controller over one QUIC stream with the production
//!   transport settings (`protocol::quic::transport_config`) and with quinn's
//!   defaults, against TCP + rustls with the same certificates and TLS configuration.
//! - Mutual-TLS handshakes per second, QUIC and TCP + rustls, with the production TLS
//!   configurations (TLS 1.3, P-256 agent certificates checked against the CA and the
//!   revocation list); every connection has its own client configuration, so none is
//!   resumed. The configurations (rustls, quinn, the TCP side's connector) are built
//!   before the clock starts: the timed loop holds handshakes only. Five rounds of 500
//!   per transport, alternating, reported as the median and the range.
//!
//! Numbers go to docs/PERFORMANCE.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, TransportConfig};
use rustls::pki_types::ServerName;
use surplus_certs::{CertAuthority, RevocationList};
use surplus_protocol::clock::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const BULK: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

#[derive(Clone)]
struct Pki {
    server: rustls::ServerConfig,
    /// A fresh client configuration (with its own, empty, resumption store).
    client: Arc<dyn Fn() -> rustls::ClientConfig + Send + Sync>,
}

fn pki() -> Pki {
    let now = surplus_protocol::clock::SystemClock.now_ms();
    let (ca, _) = CertAuthority::generate("bench CA", now).unwrap();
    let (server_cert, server_key) = ca
        .issue_server(&["localhost".into()], now, 86_400_000)
        .unwrap();
    let (key, key_pem) = surplus_certs::new_agent_key().unwrap();
    let csr = surplus_certs::agent_csr(&key, "bench").unwrap();
    let issued = ca
        .sign_agent_csr(&csr, Uuid::now_v7(), now, 86_400_000, 0)
        .unwrap();
    let server = surplus_certs::session_server_config(
        ca.cert_pem(),
        &server_cert,
        &server_key,
        RevocationList::default(),
    )
    .unwrap();
    let ca_pem = ca.cert_pem().to_owned();
    Pki {
        server,
        client: Arc::new(move || {
            surplus_certs::session_client_config(&ca_pem, &issued.cert_pem, &key_pem).unwrap()
        }),
    }
}

fn production_transport() -> TransportConfig {
    surplus_protocol::quic::transport_config(
        Duration::from_secs(30),
        Duration::from_secs(5),
        surplus_protocol::DEFAULT_MAX_FRAME,
    )
}

fn quic_server(pki: &Pki, transport: TransportConfig) -> Endpoint {
    let crypto = QuicServerConfig::try_from(pki.server.clone()).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    let ep = Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let accept = ep.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        let mut total = 0u64;
                        while let Ok(Some(n)) = recv.read(&mut buf).await {
                            total += n as u64;
                        }
                        let _ = send.write_all(&total.to_le_bytes()).await;
                        let _ = send.finish();
                    });
                }
            });
        }
    });
    ep
}

fn quic_client(pki: &Pki, transport: Arc<TransportConfig>) -> quinn::ClientConfig {
    let crypto = QuicClientConfig::try_from((pki.client)()).unwrap();
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport);
    c
}

async fn quic_bulk(pki: &Pki, transport: impl Fn() -> TransportConfig) -> f64 {
    let server = quic_server(pki, transport());
    let addr = server.local_addr().unwrap();
    let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = client
        .connect_with(quic_client(pki, Arc::new(transport())), addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let chunk = vec![7u8; CHUNK];
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut sent = 0u64;
    while sent < BULK {
        send.write_all(&chunk).await.unwrap();
        sent += CHUNK as u64;
    }
    send.finish().unwrap();
    let mut got = [0u8; 8];
    recv.read_exact(&mut got).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(u64::from_le_bytes(got), BULK);
    conn.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    BULK as f64 / secs / 1e6
}

async fn tls_server(pki: &Pki) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(pki.server.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tcp.set_nodelay(true).unwrap();
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0u64;
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = tls.write_all(&total.to_le_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP + rustls client with a fresh client configuration (its own, empty,
/// resumption store).
fn tls_connector(pki: &Pki) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new((pki.client)()))
}

async fn tls_connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn tls_bulk(pki: &Pki) -> f64 {
    let addr = tls_server(pki).await;
    let mut tls = tls_connect(&tls_connector(pki), addr).await;
    let chunk = vec![7u8; CHUNK];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < BULK {
        tls.write_all(&chunk).await.unwrap();
        sent += CHUNK as u64;
    }
    // Half-close: rustls sends close_notify, the server sees the end and answers.
    tls.get_mut().1.send_close_notify();
    tls.flush().await.unwrap();
    tls.get_mut().0.shutdown().await.unwrap();
    let mut got = [0u8; 8];
    tls.read_exact(&mut got).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(u64::from_le_bytes(got), BULK);
    BULK as f64 / secs / 1e6
}

/// `count` handshakes, `parallel` at a time; handshakes per second.
async fn quic_handshakes(pki: &Pki, count: usize, parallel: usize) -> f64 {
    let server = quic_server(pki, production_transport());
    let addr = server.local_addr().unwrap();
    let client = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    // One quinn configuration (over its own rustls configuration) per connection, built
    // before the clock starts.
    let transport = Arc::new(production_transport());
    let configs: Vec<_> = (0..count)
        .map(|_| quic_client(pki, transport.clone()))
        .collect();
    let configs = Arc::new(std::sync::Mutex::new(configs));
    let started = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let (client, configs) = (client.clone(), configs.clone());
            tokio::spawn(async move {
                loop {
                    let Some(config) = configs.lock().unwrap().pop() else {
                        break;
                    };
                    let conn = client
                        .connect_with(config, addr, "localhost")
                        .unwrap()
                        .await
                        .unwrap();
                    // The handshake is complete once the server accepted a stream.
                    let (mut send, mut recv) = conn.open_bi().await.unwrap();
                    send.finish().unwrap();
                    recv.read_to_end(16).await.unwrap();
                    conn.close(0u32.into(), b"");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    server.close(0u32.into(), b"done");
    rate
}

async fn tls_handshakes(pki: &Pki, count: usize, parallel: usize) -> f64 {
    let addr = tls_server(pki).await;
    // One rustls configuration per connection, built before the clock starts.
    let connectors: Vec<_> = (0..count).map(|_| tls_connector(pki)).collect();
    let connectors = Arc::new(std::sync::Mutex::new(connectors));
    let started = Instant::now();
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let connectors = connectors.clone();
            tokio::spawn(async move {
                loop {
                    let Some(connector) = connectors.lock().unwrap().pop() else {
                        break;
                    };
                    let mut tls = tls_connect(&connector, addr).await;
                    assert_ne!(
                        tls.get_ref().1.handshake_kind(),
                        Some(rustls::HandshakeKind::Resumed),
                        "every handshake must be a full one"
                    );
                    tls.get_mut().1.send_close_notify();
                    tls.flush().await.unwrap();
                    let mut rest = Vec::new();
                    let _ = tls.read_to_end(&mut rest).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let pki = pki();
    println!("bulk agent → controller, {} MiB, one stream:", BULK >> 20);
    let tls = tls_bulk(&pki).await;
    let quic = quic_bulk(&pki, production_transport).await;
    let quic_default = quic_bulk(&pki, TransportConfig::default).await;
    println!("  TCP + rustls                          {tls:>8.0} MB/s");
    println!(
        "  QUIC, production transport settings   {quic:>8.0} MB/s  ({:.2} of TCP)",
        quic / tls
    );
    println!(
        "  QUIC, quinn's default transport       {quic_default:>8.0} MB/s  ({:.2} of TCP)",
        quic_default / tls
    );
    println!(
        "mutual-TLS handshakes (full, not resumed), {ROUNDS} rounds of {HANDSHAKES}, \
         alternating, median (lowest-highest):"
    );
    for parallel in [1usize, 8] {
        let (mut q, mut t) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            q.push(quic_handshakes(&pki, HANDSHAKES, parallel).await);
            t.push(tls_handshakes(&pki, HANDSHAKES, parallel).await);
        }
        println!(
            "  {parallel} at a time: QUIC {}, TCP + rustls {}",
            spread(&mut q),
            spread(&mut t)
        );
    }
}

/// Handshakes per round; the transports alternate round by round, so that a machine
/// whose speed drifts (a shared virtual machine) shifts both alike.
const HANDSHAKES: usize = 500;
const ROUNDS: usize = 5;

/// "median/s (lowest-highest)".
fn spread(rates: &mut [f64]) -> String {
    rates.sort_by(f64::total_cmp);
    format!(
        "{:>5.0}/s ({:.0}-{:.0})",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    )
}
