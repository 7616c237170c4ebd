//! The running controller: QUIC session and enrollment endpoints, the HTTP API, and
//! the maintenance loop (liveness, last-seen writes, revocations from other processes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream};
use surplus_protocol::clock::Clock;
use surplus_protocol::messages::*;
use surplus_protocol::quic::{self, ExchangeError, codes};
use surplus_protocol::{FrameError, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::app::Controller;
use crate::config::ControllerConfig;
use crate::datadir::DataDir;
use crate::registry::RegistryEvent;
use crate::store::{AgentStatus, SessionRecord};

/// A running controller; dropping it without [`RunningController::shutdown`] aborts it.
pub struct RunningController {
    /// Shared state and operations.
    pub controller: Arc<Controller>,
    /// Bound UDP address of agent sessions.
    pub session_addr: SocketAddr,
    /// Bound UDP address of enrollment.
    pub enroll_addr: SocketAddr,
    /// Bound TCP address of the HTTP API.
    pub http_addr: SocketAddr,
    /// Bound UDP address of peer links.
    pub peer_addr: SocketAddr,
    cancel: CancellationToken,
    endpoints: Vec<Endpoint>,
    /// Every task of this controller, so that shutdown can wait for all of them: after
    /// it returns, nothing of this controller touches the database or the sockets.
    tasks: TaskTracker,
    /// The data directory's lock, released after shutdown.
    lock: crate::datadir::DataDirLock,
}

fn server_endpoint(
    tls: rustls::ServerConfig,
    addr: SocketAddr,
    config: &ControllerConfig,
) -> anyhow::Result<Endpoint> {
    let quic = QuicServerConfig::try_from(tls).context("TLS configuration unusable for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(quic::transport_config(
        config.idle_timeout,
        config.keep_alive,
        config.max_frame_size,
    )));
    Endpoint::server(server, addr).with_context(|| format!("binding UDP {addr}"))
}

/// Starts a controller on the data directory with `config`.
pub async fn start(
    dir: &DataDir,
    mut config: ControllerConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<RunningController> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.config_file().display()))?;
    let ca = dir.load_ca()?;
    let lock = dir.lock()?;
    let store = dir.open_store(&config.database_url).await?;
    store.close_dangling(clock.now_ms()).await?;
    let (server_cert, server_key) =
        dir.server_identity(&ca, &config.server_names, clock.now_ms())?;

    let revoked_list = surplus_certs::RevocationList::default();
    revoked_list.replace(store.revoked_agents().await?);
    let session_tls = surplus_certs::session_server_config(
        ca.cert_pem(),
        &server_cert,
        &server_key,
        revoked_list.clone(),
    )?;
    let enroll_tls = surplus_certs::enroll_server_config(ca.cert_pem(), &server_cert, &server_key)?;
    let controller_id = store.controller_id(Uuid::now_v7(), clock.now_ms()).await?;
    let identity = crate::federation::issue_identity(
        &ca,
        controller_id,
        &config.server_names,
        clock.now_ms(),
    )?;
    let peer_trust = surplus_certs::PeerTrust::default();
    let peer_tls = surplus_certs::peer_server_config(
        ca.cert_pem(),
        &identity.cert_pem,
        &identity.key_pem,
        peer_trust.clone(),
    )?;
    let session_ep = server_endpoint(session_tls, config.session_listen, &config)?;
    let enroll_ep = server_endpoint(enroll_tls, config.enroll_listen, &config)?;
    // Peer links carry no heartbeats of their own: QUIC keep-alives hold them open.
    let peer_ep = server_endpoint(
        peer_tls,
        config.peer_listen,
        &ControllerConfig {
            keep_alive: crate::federation::keep_alive(&config),
            ..config.clone()
        },
    )?;
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding TCP {}", config.http_listen))?;
    config.session_listen = session_ep.local_addr()?;
    config.enroll_listen = enroll_ep.local_addr()?;
    config.peer_listen = peer_ep.local_addr()?;
    config.http_listen = http_listener.local_addr()?;

    let mut controller = Controller::new(config.clone(), store, clock, ca, revoked_list);
    controller.federation.trust = peer_trust;
    controller.federation.set_identity(identity);
    let controller = Arc::new(controller);
    controller.federation.reload().await;
    let cancel = CancellationToken::new();
    let tasks = controller.app.tasks.clone();
    tasks.spawn(accept_loop(
        controller.clone(),
        session_ep.clone(),
        cancel.clone(),
        Kind::Session,
        tasks.clone(),
    ));
    tasks.spawn(accept_loop(
        controller.clone(),
        enroll_ep.clone(),
        cancel.clone(),
        Kind::Enroll,
        tasks.clone(),
    ));
    tasks.spawn(maintenance(controller.clone(), cancel.clone()));
    tasks.spawn(crate::federation::drive(
        controller.clone(),
        peer_ep.clone(),
        cancel.clone(),
    ));
    tasks.spawn(controller.resell.clone().drive(cancel.clone()));
    tasks.spawn(crate::market::drive(controller.clone(), cancel.clone()));
    tasks.spawn(crate::notices::Notifier::new(controller.app.clone()).drive(cancel.clone()));
    let router = crate::http::router(controller.clone());
    tasks.spawn(serve_http(
        http_listener,
        router,
        config.clone(),
        cancel.clone(),
        tasks.clone(),
    ));
    tracing::info!(
        session = %config.session_listen,
        enroll = %config.enroll_listen,
        peer = %config.peer_listen,
        http = %config.http_listen,
        ca_fingerprint = %surplus_certs::fingerprint_display(&surplus_certs::fingerprint(controller_ca_der(&controller).as_ref())),
        "controller listening"
    );
    Ok(RunningController {
        controller,
        session_addr: config.session_listen,
        enroll_addr: config.enroll_listen,
        http_addr: config.http_listen,
        peer_addr: config.peer_listen,
        cancel,
        endpoints: vec![session_ep, enroll_ep, peer_ep],
        tasks,
        lock,
    })
}

/// hyper's limit on the request head: above ours (`http::request_limits`) so that ours,
/// which answer in JSON, are the ones clients meet.
fn hyper_max_buf_size(config: &ControllerConfig) -> usize {
    config
        .http_max_uri_bytes
        .saturating_add(config.http_max_header_bytes)
        .saturating_mul(2)
        .saturating_add(8192)
        .max(64 << 10)
}

/// Serves the API: HTTP/1.1 connections with a header read timeout, at most
/// `http_max_connections` at once (the next is accepted when one ends, so the rest
/// wait in the listen backlog). On cancellation, stops accepting and lets each
/// connection finish its request in flight.
async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    config: ControllerConfig,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.http_header_read_timeout)
        .max_buf_size(hyper_max_buf_size(&config))
        .max_headers(4 * crate::http::MAX_HEADERS);
    let slots = Arc::new(tokio::sync::Semaphore::new(config.http_max_connections));
    loop {
        let slot = tokio::select! {
            _ = cancel.cancelled() => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: keep serving the others.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let mut router = router.clone();
                async move {
                    tower_service::Service::call(&mut router, request.map(axum::body::Body::new))
                        .await
                }
            });
        let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                _ = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
}

fn controller_ca_der(c: &Controller) -> rustls::pki_types::CertificateDer<'static> {
    surplus_certs::certs_from_pem(c.agents.ca_pem(), "CA")
        .expect("loaded CA parses")
        .remove(0)
}

impl RunningController {
    /// Stops accepting, closes every session with "shutting down", and waits until
    /// every task of this controller has finished (recording the sessions' ends).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for ep in &self.endpoints {
            ep.close(codes::CLOSE_SHUTDOWN, b"controller shutting down");
        }
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(30), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!("controller tasks did not finish within 30 s of shutdown");
        }
        for ep in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(5), ep.wait_idle()).await;
        }
        drop(self.lock);
    }

    /// The HTTP base URL.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Session,
    Enroll,
}

async fn accept_loop(
    ctl: Arc<Controller>,
    endpoint: Endpoint,
    cancel: CancellationToken,
    kind: Kind,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let ctl = ctl.clone();
        match kind {
            Kind::Session => tasks.spawn(serve_session(ctl, incoming, tasks.clone())),
            Kind::Enroll => tasks.spawn(serve_enrollment(ctl, incoming)),
        };
    }
}

/// Largest frame on the enrollment endpoint.
const ENROLL_MAX_FRAME: usize = 16 * 1024;

async fn serve_enrollment(ctl: Arc<Controller>, incoming: Incoming) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "enrollment handshake failed");
            return;
        }
    };
    // Peers here are unauthenticated: an enrollment request is a CSR and a few names,
    // so frames are capped far below the session limit.
    let max = ctl.app.config.max_frame_size.min(ENROLL_MAX_FRAME);
    let exchange = async {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let request = match quic::read_frame(&mut recv, max).await {
            Ok(env) => env.message,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "bad enrollment frame");
                answer_bad_frame(&mut send, &mut recv, &e, max).await;
                return Ok(());
            }
        };
        let answer = match request {
            Message::EnrollRequest(req) => match ctl.agents.enroll(&req).await {
                Ok(enrolled) => Message::Enrolled(enrolled),
                Err(reply) => Message::Error(reply),
            },
            Message::Peer(p) => match *p {
                surplus_protocol::peer::PeerMessage::Join(join) => {
                    let answer = match ctl.federation.accept_join(&join).await {
                        Ok(joined) => surplus_protocol::peer::PeerMessage::Joined(joined),
                        Err(why) => surplus_protocol::peer::PeerMessage::Refused(why),
                    };
                    Message::Peer(Box::new(answer))
                }
                other => Message::error(
                    ErrorCode::Unexpected,
                    format!(
                        "the enrollment endpoint serves enroll-request and peer-join only, not {}",
                        other.kind()
                    ),
                ),
            },
            other => Message::error(
                ErrorCode::Unexpected,
                format!(
                    "the enrollment endpoint serves enroll-request only, not {}",
                    other.kind()
                ),
            ),
        };
        quic::write_frame(&mut send, &answer, max).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        Ok::<_, ExchangeError>(())
    };
    match tokio::time::timeout(ctl.app.config.request_timeout * 2, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "enrollment exchange failed"),
        Err(_) => tracing::debug!(%peer, "enrollment connection timed out"),
    }
    conn.close(codes::CLOSE_NORMAL, b"done");
}

/// Answers a frame we could not read: version mismatches get a readable error frame,
/// anything else resets the stream with the code that says why.
async fn answer_bad_frame(
    send: &mut SendStream,
    recv: &mut RecvStream,
    error: &ExchangeError,
    max: usize,
) {
    if let ExchangeError::Frame(FrameError::VersionMismatch { theirs, ours }) = error {
        let msg = Message::error(
            ErrorCode::VersionMismatch,
            format!("controller speaks protocol version {ours}, agent sent version {theirs}"),
        );
        let _ = quic::write_frame(send, &msg, max).await;
        let _ = recv.stop(codes::STREAM_VERSION_MISMATCH);
    } else {
        quic::refuse_stream(send, recv, error);
    }
}

fn peer_agent_id(conn: &Connection) -> Option<Uuid> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    surplus_certs::agent_id_of(certs.first()?)
}

/// Reads the hello; `Err` carries the close code and reason.
async fn read_hello(
    ctl: &Controller,
    conn: &Connection,
) -> Result<(Hello, SendStream), (quinn::VarInt, String)> {
    let max = ctl.app.config.max_frame_size;
    let accepted = tokio::time::timeout(ctl.app.config.request_timeout, conn.accept_bi()).await;
    let (mut send, mut recv) = match accepted {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return Err((codes::CLOSE_PROTOCOL, format!("no hello: {e}"))),
        Err(_) => return Err((codes::CLOSE_PROTOCOL, "no hello in time".into())),
    };
    match quic::read_frame(&mut recv, max).await {
        Ok(Envelope {
            message: Message::Hello(hello),
            ..
        }) if hello.protocol_version == PROTOCOL_VERSION => Ok((hello, send)),
        Ok(Envelope {
            message: Message::Hello(hello),
            ..
        }) => {
            let text = format!(
                "controller speaks protocol version {PROTOCOL_VERSION}, agent speaks {}",
                hello.protocol_version
            );
            let _ = quic::write_frame(
                &mut send,
                &Message::error(ErrorCode::VersionMismatch, &text),
                max,
            )
            .await;
            Err((codes::CLOSE_VERSION_MISMATCH, text))
        }
        Ok(env) => {
            let text = format!(
                "the first message of a session must be hello, not {}",
                env.message.kind()
            );
            let _ = quic::write_frame(
                &mut send,
                &Message::error(ErrorCode::Unexpected, &text),
                max,
            )
            .await;
            Err((codes::CLOSE_PROTOCOL, text))
        }
        Err(e @ ExchangeError::Frame(FrameError::VersionMismatch { .. })) => {
            answer_bad_frame(&mut send, &mut recv, &e, max).await;
            Err((codes::CLOSE_VERSION_MISMATCH, e.to_string()))
        }
        Err(e) => {
            quic::refuse_stream(&mut send, &mut recv, &e);
            Err((codes::CLOSE_PROTOCOL, format!("unreadable hello: {e}")))
        }
    }
}

async fn serve_session(ctl: Arc<Controller>, incoming: Incoming, tasks: TaskTracker) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, error = %e, "session handshake refused");
            ctl.app.metrics.handshake_failures.inc();
            return;
        }
    };
    let Some(agent_id) = peer_agent_id(&conn) else {
        // The verifier guarantees an agent name; this is defence in depth.
        conn.close(codes::CLOSE_PROTOCOL, b"no agent identity");
        return;
    };
    let (hello, mut send) = match read_hello(&ctl, &conn).await {
        Ok(h) => h,
        Err((code, reason)) => {
            tracing::warn!(%agent_id, %peer, %reason, "session refused");
            // Let the error frame reach the agent before the close does.
            let _ = tokio::time::timeout(Duration::from_millis(500), conn.closed()).await;
            conn.close(code, reason.as_bytes());
            return;
        }
    };

    let now = ctl.app.clock.now_ms();
    let session_id = Uuid::now_v7();
    let record = SessionRecord {
        id: session_id,
        agent_id,
        remote_addr: peer.to_string(),
        agent_version: hello.agent_version.chars().take(64).collect(),
        started_at_ms: now,
        ended_at_ms: None,
        end_reason: None,
    };
    if let Err(e) = ctl
        .app
        .store
        .session_started(&record, hello.isolation.as_ref())
        .await
    {
        tracing::error!(%agent_id, error = %e, "session not recorded; closing it");
        conn.close(codes::CLOSE_SHUTDOWN, b"controller storage unavailable");
        return;
    }
    if let Some(previous) = ctl
        .app
        .registry
        .attach(agent_id, session_id, conn.clone(), now)
    {
        previous.close(codes::CLOSE_REPLACED, b"replaced by a newer session");
    }
    set_status(&ctl, agent_id, AgentStatus::Online).await;
    ctl.app.registry.publish(RegistryEvent::Online(agent_id));
    ctl.app.metrics.sessions.inc();
    tracing::info!(%agent_id, %peer, version = %hello.agent_version, "agent online");

    let ack = Message::HelloAck(HelloAck {
        protocol_version: PROTOCOL_VERSION,
        controller_version: env!("CARGO_PKG_VERSION").into(),
        agent_id,
        server_time_ms: now,
        heartbeat_interval_ms: ctl.app.config.heartbeat_interval.as_millis() as u64,
    });
    if let Err(e) = quic::write_frame(&mut send, &ack, ctl.app.config.max_frame_size).await {
        tracing::debug!(%agent_id, error = %e, "hello answer not delivered");
    }
    // Settle instances whose commands a crash or a lost session cut off.
    let reconciling = ctl.clone();
    tasks.spawn(async move {
        match reconciling.control.reconcile(agent_id).await {
            Ok(()) => reconciling
                .app
                .registry
                .publish(RegistryEvent::Reconciled(agent_id)),
            Err(e) => tracing::warn!(%agent_id, error = %e, "instances not reconciled"),
        }
    });
    // Periods set through the API while the agent was away.
    let metering = ctl.clone();
    tasks.spawn(async move {
        if let Ok((Some(periods), _)) = metering.app.store.metering(agent_id).await
            && let Err(e) = metering.metering.send_metering(agent_id, periods).await
        {
            tracing::warn!(%agent_id, error = %e, "metering periods not delivered");
        }
    });

    let reason = loop {
        match conn.accept_bi().await {
            Ok((send, recv)) => {
                tasks.spawn(serve_agent_stream(
                    ctl.clone(),
                    agent_id,
                    session_id,
                    send,
                    recv,
                ));
            }
            Err(e) => break e,
        }
    };
    if ctl.app.registry.detach(agent_id, session_id) {
        set_status(&ctl, agent_id, AgentStatus::Unreachable).await;
        ctl.app
            .registry
            .publish(RegistryEvent::Disconnected(agent_id));
    }
    tracing::info!(%agent_id, reason = %reason, "session ended");
    if let Err(e) = ctl
        .app
        .store
        .session_ended(session_id, ctl.app.clock.now_ms(), &reason.to_string())
        .await
    {
        tracing::error!(%agent_id, error = %e, "session end not recorded");
    }
}

async fn set_status(ctl: &Controller, agent_id: Uuid, status: AgentStatus) {
    if let Err(e) = ctl
        .app
        .store
        .set_status(agent_id, status, ctl.app.clock.now_ms())
        .await
    {
        tracing::error!(%agent_id, ?status, error = %e, "status not recorded");
    }
}

async fn serve_agent_stream(
    ctl: Arc<Controller>,
    agent_id: Uuid,
    session_id: Uuid,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let max = ctl.app.config.max_frame_size;
    let read = tokio::time::timeout(
        ctl.app.config.request_timeout,
        quic::read_frame(&mut recv, max),
    )
    .await;
    let request = match read {
        Ok(Ok(env)) => env.message,
        Ok(Err(e)) => {
            tracing::warn!(%agent_id, peer = %send_peer(&ctl, agent_id), error = %e, "bad frame from agent; stream reset");
            ctl.app.metrics.frame_rejected(rejection_reason(&e));
            answer_bad_frame(&mut send, &mut recv, &e, max).await;
            return;
        }
        Err(_) => {
            let e = ExchangeError::Timeout(ctl.app.config.request_timeout);
            tracing::warn!(%agent_id, "agent did not finish its frame in time; stream reset");
            ctl.app.metrics.frame_rejected("timeout");
            quic::refuse_stream(&mut send, &mut recv, &e);
            return;
        }
    };
    let answer = handle(&ctl, agent_id, session_id, request).await;
    if let Err(e) = quic::write_frame(&mut send, &answer, max).await {
        tracing::debug!(%agent_id, error = %e, "answer not delivered");
    }
}

fn rejection_reason(e: &ExchangeError) -> &'static str {
    match e {
        ExchangeError::Frame(FrameError::TooLarge { .. }) => "too_large",
        ExchangeError::Frame(FrameError::Malformed(_)) => "malformed",
        ExchangeError::Frame(FrameError::VersionMismatch { .. }) => "version_mismatch",
        ExchangeError::Timeout(_) => "timeout",
        _ => "stream_error",
    }
}

fn send_peer(ctl: &Controller, agent_id: Uuid) -> String {
    ctl.app
        .registry
        .connection(agent_id)
        .map(|c| c.remote_address().to_string())
        .unwrap_or_else(|| "?".into())
}

/// The one place agent requests are matched.
async fn handle(ctl: &Controller, agent_id: Uuid, session_id: Uuid, request: Message) -> Message {
    match request {
        Message::Heartbeat(beat) => {
            let now = ctl.app.clock.now_ms();
            ctl.app.metrics.heartbeats.inc();
            if ctl.app.registry.heartbeat(agent_id, session_id, now) == Some(true) {
                set_status(ctl, agent_id, AgentStatus::Online).await;
                ctl.app.registry.publish(RegistryEvent::Online(agent_id));
            }
            ctl.app.registry.publish(RegistryEvent::Heartbeat(agent_id));
            Message::HeartbeatAck(HeartbeatAck {
                server_time_ms: now,
                inventory_wanted: ctl.app.registry.inventory_digest(agent_id)
                    != Some(beat.inventory_digest),
            })
        }
        Message::InventoryReport(inventory) => {
            let digest = surplus_protocol::inventory::digest(&inventory);
            let json = serde_json::to_value(&*inventory).expect("inventory serializes");
            match ctl
                .app
                .store
                .save_inventory(
                    agent_id,
                    &json,
                    &surplus_certs::hex(&digest),
                    ctl.app.clock.now_ms(),
                )
                .await
            {
                Ok(changed) => {
                    ctl.app.metrics.inventory(changed);
                    ctl.app.registry.set_inventory_digest(agent_id, digest);
                    if changed {
                        ctl.app
                            .registry
                            .publish(RegistryEvent::InventoryChanged(agent_id));
                    }
                    Message::InventoryAck(InventoryAck { changed })
                }
                Err(e) => {
                    tracing::error!(%agent_id, error = %e, "inventory not stored");
                    Message::error(ErrorCode::Internal, "inventory not stored")
                }
            }
        }
        Message::Ping(ping) => Message::Pong(Pong { nonce: ping.nonce }),
        Message::NetworkProbe(probe) => Message::NetworkProbeAck(NetworkProbeAck {
            received: probe.data.len() as u64,
        }),
        Message::RenewRequest(renew) => match ctl.agents.renew(agent_id, &renew.csr_pem).await {
            Ok(issued) => Message::Renewed(issued),
            Err(reply) => Message::Error(reply),
        },
        Message::CompatReport(report) => {
            // The level is recomputed here: an agent reports results, not verdicts.
            let report = surplus_protocol::control::CompatReport {
                level: surplus_protocol::control::compat_level(&report.checks),
                ..report
            };
            match ctl
                .app
                .store
                .save_compat_report(agent_id, &report, ctl.app.clock.now_ms())
                .await
            {
                Ok(()) => {
                    tracing::info!(%agent_id, driver = %report.driver, level = ?report.level, "compatibility reported");
                    ctl.app
                        .registry
                        .publish(RegistryEvent::CompatReported(agent_id));
                    Message::CompatAck(surplus_protocol::CompatAck { agent_id })
                }
                Err(e) => {
                    tracing::error!(%agent_id, error = %e, "compatibility report not stored");
                    Message::error(ErrorCode::Internal, "compatibility report not stored")
                }
            }
        }
        Message::UsageBatch(batch) => ctl.metering.ingest(agent_id, batch).await,
        Message::Reclaim(request) => {
            Message::ReclaimResult(ctl.market.reclaim_from_host(agent_id, request).await)
        }
        other => Message::error(
            ErrorCode::Unexpected,
            format!(
                "the controller does not serve {} on a session stream",
                other.kind()
            ),
        ),
    }
}

/// Periodic work: database checkpoints, last-seen writes, overdue agents, revocations made elsewhere.
async fn maintenance(ctl: Arc<Controller>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = ctl.app.clock.now_ms();
        if let Err(e) = ctl.app.store.checkpoint().await {
            tracing::warn!(error = %e, "database checkpoint failed");
        }
        if let Err(e) = ctl.app.store.touch(&ctl.app.registry.take_seen()).await {
            tracing::error!(error = %e, "last-seen times not recorded");
        }
        let interval_ms = ctl.app.config.heartbeat_interval.as_millis() as i64;
        for agent_id in
            ctl.app
                .registry
                .mark_overdue(now, interval_ms, ctl.app.config.missed_heartbeats)
        {
            tracing::warn!(%agent_id, "heartbeats missed; agent unreachable");
            set_status(&ctl, agent_id, AgentStatus::Unreachable).await;
            ctl.app
                .registry
                .publish(RegistryEvent::Unreachable(agent_id));
        }
        if last_poll.elapsed() >= ctl.app.config.revocation_poll {
            last_poll = tokio::time::Instant::now();
            match ctl.app.store.revoked_agents().await {
                Ok(ids) => {
                    for id in ids {
                        if !ctl.agents.revoked.is_revoked(&id)
                            || ctl.app.registry.connection(id).is_some()
                        {
                            tracing::info!(agent_id = %id, "revocation picked up from storage");
                            ctl.agents.cut_off(id);
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "revocations not read"),
            }
        }
    }
}
