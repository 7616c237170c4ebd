//! End-to-end scenarios of the foundation (issue 2): enrollment, mutual TLS, registry,
//! revocation, restarts, bad frames and renewal. Real QUIC on loopback, real
//! certificates, real SQLite; waits are on registry events, never on sleeps.

use std::time::Duration;

use surplus_agent::enroll::{EnrollError, enroll};
use surplus_agent::{Identity, Session, SessionError};
use surplus_controller::registry::RegistryEvent;
use surplus_controller::store::AgentStatus;
use surplus_protocol::clock::{self, ManualClock};
use surplus_protocol::messages::*;
use surplus_protocol::quic::{self, codes};
use surplus_protocol::token::JoinToken;
use surplus_protocol::{PROTOCOL_VERSION, codec};
use surplus_tests::{RunningAgent, TestController, agent_config, test_config};

fn online(e: &RegistryEvent) -> Option<uuid::Uuid> {
    match e {
        RegistryEvent::Online(id) => Some(*id),
        _ => None,
    }
}

fn inventory_changed(e: &RegistryEvent) -> Option<uuid::Uuid> {
    match e {
        RegistryEvent::InventoryChanged(id) => Some(*id),
        _ => None,
    }
}

fn heartbeat(e: &RegistryEvent) -> Option<uuid::Uuid> {
    match e {
        RegistryEvent::Heartbeat(id) => Some(*id),
        _ => None,
    }
}

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    surplus_agent::inventory::meminfo_kb(&text, "MemTotal").expect("MemTotal") * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_enroll_and_report_this_host() {
    let tc = TestController::start().await;
    let mut events = tc.events();
    let mut agents = Vec::new();
    for (i, zone) in ["eu", "us", "ap"].iter().enumerate() {
        let (config, _) = tc.enroll(&format!("a{i}"), &[("zone", zone)]).await;
        agents.push(RunningAgent::spawn(config, clock::system()));
    }
    let ids: Vec<_> = agents.iter().map(|a| a.id).collect();
    events
        .until_all("three inventories", &ids, inventory_changed)
        .await;

    let (status, list) = tc.api_get("/v1/agents").await;
    assert_eq!(status, 200);
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 3);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let mem = meminfo_total_bytes() as f64;
    for a in list {
        assert_eq!(a["status"], "online", "{a}");
        assert_eq!(a["connected"], true);
        assert_eq!(
            a["cpus"].as_u64(),
            Some(cpus),
            "logical CPUs match available_parallelism"
        );
        let reported = a["memory_bytes"].as_f64().unwrap();
        assert!(
            (reported - mem).abs() / mem < 0.01,
            "memory {reported} within 1% of {mem}"
        );
        let zone = a["labels"]["zone"].as_str().unwrap();
        assert!(["eu", "us", "ap"].contains(&zone));
    }
    let (status, detail) = tc.api_get(&format!("/v1/agents/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert_eq!(
        detail["inventory"]["cpu"]["logical_cpus"].as_u64(),
        Some(cpus)
    );
    assert_eq!(detail["inventory_history"].as_array().unwrap().len(), 1);
    assert_eq!(detail["sessions"].as_array().unwrap().len(), 1);

    // The controller opens streams too: a ping reaches each agent and comes back.
    for id in &ids {
        let (status, body) = tc
            .api_post(&format!("/v1/agents/{id}/ping"), serde_json::json!({}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["rtt_ms"].as_f64().unwrap() > 0.0);
    }
    let first = agents.remove(0);
    first.stop().await;
    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{}/ping", ids[0]),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("agent_offline")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains(&ids[0].to_string())
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_link_tells_an_answer_a_refusal_and_an_absent_agent_apart() {
    use surplus_controller::link::LinkError;
    use surplus_protocol::Message;
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (config, _) = tc.enroll("linked", &[]).await;
    let agent = RunningAgent::spawn(config, clock::system());
    let id = agent.id;
    events.until("online", |e| online(e) == Some(id)).await;
    let link = &tc.ctl().app.link;
    let second = Duration::from_secs(5);

    let ping = Message::Ping(Ping { nonce: 7 });
    match link.call(id, &ping, second).await {
        Ok(Message::Pong(Pong { nonce: 7 })) => {}
        other => panic!("a ping is answered with its nonce: {other:?}"),
    }
    // The agent serves no Pong: it answers with an error, which the link calls a refusal.
    match link
        .call(id, &Message::Pong(Pong { nonce: 1 }), second)
        .await
    {
        Err(LinkError::Refused { agent_id, reply }) => {
            assert_eq!(agent_id, id);
            assert!(reply.message.contains("does not serve"), "{reply:?}");
        }
        other => panic!("an answer that is an error is a refusal: {other:?}"),
    }
    let stranger = uuid::Uuid::now_v7();
    assert_eq!(
        link.call(stranger, &ping, second).await.unwrap_err(),
        LinkError::Offline {
            agent_id: stranger,
            last_seen_ms: None
        }
    );
    agent.stop().await;
    events
        .until("disconnected", |e| *e == RegistryEvent::Disconnected(id))
        .await;
    match link.call(id, &ping, second).await {
        Err(e @ LinkError::Offline { .. }) => {
            let LinkError::Offline { last_seen_ms, .. } = &e else {
                unreachable!()
            };
            assert!(last_seen_ms.is_some(), "a known agent was seen: {e}");
            assert!(e.to_string().contains("last seen at"), "{e}");
        }
        other => panic!("a stopped agent is offline: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_say_why_and_one_token_enrolls_once() {
    let manual = ManualClock::new(clock::system().now_ms());
    let tc = TestController::start_with(test_config(), manual.clone()).await;
    let now = || clock::system().now_ms();

    // Used token.
    let token = tc.token(&[]).await;
    enroll(&token, &agent_config(&tc.agent_dir("first")), now())
        .await
        .expect("first use");
    match enroll(&token, &agent_config(&tc.agent_dir("second")), now()).await {
        Err(EnrollError::Refused(r)) => assert_eq!(r.code, ErrorCode::TokenUsed, "{r}"),
        other => panic!("a used token must be refused, got {other:?}"),
    }

    // Expired token: the controller's clock moves past its expiry.
    let token = tc.token(&[]).await;
    manual.advance_ms(3_600_000);
    match enroll(&token, &agent_config(&tc.agent_dir("late")), now()).await {
        Err(EnrollError::Refused(r)) => assert_eq!(r.code, ErrorCode::TokenExpired, "{r}"),
        other => panic!("an expired token must be refused, got {other:?}"),
    }
    // And the agent itself refuses a token it can see has expired.
    let err = enroll(
        &token,
        &agent_config(&tc.agent_dir("later")),
        now() + 7_200_000,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EnrollError::Expired(_)), "{err}");
    manual.set_ms(now());

    // Unknown secret.
    let mut forged = JoinToken::parse(&tc.token(&[]).await).unwrap();
    forged.secret = [42; 32];
    match enroll(
        &forged.encode(),
        &agent_config(&tc.agent_dir("forged")),
        now(),
    )
    .await
    {
        Err(EnrollError::Refused(r)) => assert_eq!(r.code, ErrorCode::TokenUnknown),
        other => panic!("an unknown token must be refused, got {other:?}"),
    }

    // A controller whose CA is not the pinned one: refused before anything is sent.
    let mut wrong_ca = JoinToken::parse(&tc.token(&[]).await).unwrap();
    wrong_ca.ca_fingerprint = [7; 32];
    let err = enroll(
        &wrong_ca.encode(),
        &agent_config(&tc.agent_dir("mitm")),
        now(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EnrollError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains("pinned"),
        "the error names the pin: {err}"
    );

    // Two racing enrollments with one token: exactly one certificate.
    let token = tc.token(&[("race", "yes")]).await;
    let (config_a, config_b) = (
        agent_config(&tc.agent_dir("race-a")),
        agent_config(&tc.agent_dir("race-b")),
    );
    let (a, b) = tokio::join!(
        enroll(&token, &config_a, now()),
        enroll(&token, &config_b, now())
    );
    let winners = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "exactly one enrollment wins: {a:?} / {b:?}");
    let loser = if a.is_ok() { b } else { a };
    assert!(
        matches!(loser, Err(EnrollError::Refused(ref r)) if r.code == ErrorCode::TokenUsed),
        "{loser:?}"
    );
    let raced = tc
        .ctl()
        .app
        .store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.labels.contains_key("race"))
        .count();
    assert_eq!(raced, 1);
}

fn client_without_certificate(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            surplus_certs::certs_from_pem(ca_pem, "ca")
                .unwrap()
                .remove(0),
        )
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(surplus_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![surplus_protocol::ALPN.to_vec()];
    config
}

/// Tries a session with `tls`; returns the error that stopped it.
async fn attempt_session(tc: &TestController, tls: rustls::ClientConfig) -> String {
    let cfg = agent_config(&tc.agent_dir("probe"));
    let addrs = vec![tc.config.session_listen.to_string()];
    match surplus_agent::net::connect_any(tls, &addrs, "localhost", &cfg).await {
        Err(e) => e.to_string(),
        Ok((_ep, conn)) => {
            let hello = Message::Hello(Hello {
                protocol_version: 1,
                agent_version: "probe".into(),
                boot_epoch: 0,
                isolation: None,
            });
            match quic::request(&conn, &hello, 1 << 20, Duration::from_secs(5)).await {
                Ok(m) => panic!("a peer without our certificate got an answer: {m:?}"),
                Err(e) => e.to_string(),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_from_our_ca_get_past_the_handshake() {
    let tc = TestController::start().await;
    let err = attempt_session(&tc, client_without_certificate(tc.ctl().agents.ca_pem())).await;
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("crypto"),
        "handshake failure: {err}"
    );

    // A well-formed agent certificate from another CA.
    let now = clock::system().now_ms();
    let (other_ca, _) = surplus_certs::CertAuthority::generate("impostor", now).unwrap();
    let (key, key_pem) = surplus_certs::new_agent_key().unwrap();
    let issued = other_ca
        .sign_agent_csr(
            &surplus_certs::agent_csr(&key, "x").unwrap(),
            uuid::Uuid::now_v7(),
            now,
            3_600_000,
            0,
        )
        .unwrap();
    let tls =
        surplus_certs::session_client_config(tc.ctl().agents.ca_pem(), &issued.cert_pem, &key_pem)
            .unwrap();
    let err = attempt_session(&tc, tls).await;
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("crypto"),
        "handshake failure: {err}"
    );

    assert_eq!(tc.ctl().app.registry.connected(), 0);
    assert!(tc.ctl().app.store.agents().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agents_are_cut_off_and_stay_out() {
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (config_a, identity_a) = tc.enroll("a", &[]).await;
    let (config_b, identity_b) = tc.enroll("b", &[]).await;
    let a = RunningAgent::spawn(config_a.clone(), clock::system());
    let b = RunningAgent::spawn(config_b, clock::system());
    events.until_all("both online", &[a.id, b.id], online).await;

    // Through the API: immediate.
    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{}/revoke", a.id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "revoked");
    let ended = a.finished().await;
    assert!(
        matches!(ended, Err(SessionError::Revoked)),
        "the agent stops as revoked: {ended:?}"
    );
    let again = Session::open(&config_a, &identity_a).await;
    assert!(
        matches!(again, Err(SessionError::Revoked)),
        "reconnecting is refused: {:?}",
        again.err()
    );

    // Through storage, as `surplus-controller agent revoke` in another process does:
    // the running controller picks it up and cuts the agent off.
    assert!(
        tc.ctl()
            .app
            .store
            .revoke_agent(identity_b.agent_id, clock::system().now_ms())
            .await
            .unwrap()
    );
    let ended = b.finished().await;
    assert!(matches!(ended, Err(SessionError::Revoked)), "{ended:?}");
    let stored = tc
        .ctl()
        .app
        .store
        .agent(identity_b.agent_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, AgentStatus::Revoked);

    // Unknown and malformed ids.
    let (status, body) = tc
        .api_post(
            &format!("/v1/agents/{}/revoke", uuid::Uuid::now_v7()),
            serde_json::json!({}),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = tc
        .api_post("/v1/agents/not-an-id/revoke", serde_json::json!({}))
        .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_on_their_own_after_a_controller_restart() {
    let mut tc = TestController::start().await;
    let mut events = tc.events();
    let mut agents = Vec::new();
    for i in 0..3 {
        let (config, _) = tc.enroll(&format!("r{i}"), &[("n", &i.to_string())]).await;
        agents.push(RunningAgent::spawn(config, clock::system()));
    }
    let ids: Vec<_> = agents.iter().map(|a| a.id).collect();
    events
        .until_all("all inventories", &ids, inventory_changed)
        .await;
    let before = tc.ctl().app.store.agents().await.unwrap();

    tc.restart().await;
    // The agents may be back before anyone subscribes to the new controller's events.
    let mut events = tc.events();
    tc.until_connected("all back online", &ids).await;
    events
        .until_all("heartbeats after restart", &ids, heartbeat)
        .await;

    let after = tc.ctl().app.store.agents().await.unwrap();
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (b.id, &b.labels, &b.cert_serial, &b.inventory_digest),
            (a.id, &a.labels, &a.cert_serial, &a.inventory_digest)
        );
        assert_eq!(a.status, AgentStatus::Online);
    }
    let sessions = tc.ctl().app.store.sessions(ids[0], 10).await.unwrap();
    assert!(
        sessions.len() >= 2,
        "a session before and one after the restart: {sessions:#?}"
    );
    assert!(
        sessions[0].ended_at_ms.is_none(),
        "the newest session is open"
    );
    assert!(
        sessions[1..].iter().all(|s| s.ended_at_ms.is_some()),
        "older sessions are closed: {sessions:#?}"
    );
    for a in agents {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_reset_only_their_stream() {
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (c1, _) = tc.enroll("good1", &[]).await;
    let (c2, _) = tc.enroll("good2", &[]).await;
    let good = [
        RunningAgent::spawn(c1, clock::system()),
        RunningAgent::spawn(c2, clock::system()),
    ];
    let good_ids: Vec<_> = good.iter().map(|a| a.id).collect();
    events
        .until_all("good agents online", &good_ids, online)
        .await;

    let (config, identity) = tc.enroll("bad", &[]).await;
    let session = Session::open(&config, &identity).await.expect("session");
    let conn = session.connection();

    // Declares a frame of 2 MiB: refused from the header.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&(2u32 << 20).to_be_bytes()).await.unwrap();
    let err = quic::read_frame(&mut recv, 1 << 20).await.unwrap_err();
    assert_eq!(
        err.reset_code(),
        Some(codes::STREAM_FRAME_TOO_LARGE),
        "{err}"
    );

    // Garbage of a legal size.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[
        0,
        0,
        0,
        6,
        PROTOCOL_VERSION as u8,
        0xfe,
        0xff,
        0xff,
        0xff,
        0xff,
    ])
    .await
    .unwrap();
    send.finish().unwrap();
    let err = quic::read_frame(&mut recv, 1 << 20).await.unwrap_err();
    assert_eq!(err.reset_code(), Some(codes::STREAM_MALFORMED), "{err}");

    // Another protocol version: a readable error, not a hang.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = codec::encode_envelope(
        &Envelope {
            version: 99,
            message: Message::Ping(Ping { nonce: 1 }),
        },
        1 << 20,
    )
    .unwrap();
    send.write_all(&frame).await.unwrap();
    send.finish().unwrap();
    let answer = quic::read_frame(&mut recv, 1 << 20).await.unwrap().message;
    assert!(
        matches!(answer, Message::Error(ref e) if e.code == ErrorCode::VersionMismatch && e.message.contains("99")),
        "{answer:?}"
    );

    // The same connection still works...
    let beat = Message::Heartbeat(Heartbeat {
        seq: 1,
        sent_at_ms: 0,
        uptime_secs: 1,
        load_avg_1m: 0.0,
        memory_used_bytes: 0,
        inventory_digest: [0; 32],
    });
    assert!(matches!(
        session.request(&beat).await.unwrap(),
        Message::HeartbeatAck(_)
    ));
    // ...and the other agents keep heartbeating.
    events
        .until_all("good agents still heartbeating", &good_ids, heartbeat)
        .await;
    assert_eq!(tc.ctl().app.registry.connected(), 3);
    let metrics = reqwest::get(format!("{}/metrics", tc.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "surplus_frames_rejected_total{reason=\"too_large\"} 1",
        "surplus_frames_rejected_total{reason=\"malformed\"} 1",
        "surplus_frames_rejected_total{reason=\"version_mismatch\"} 1",
        "surplus_agents_connected 3",
        "surplus_agents{status=\"online\"} 3",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    session.close("done").await;
    for a in good {
        a.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_must_start_with_a_hello_of_our_version() {
    let tc = TestController::start().await;
    let (config, identity) = tc.enroll("v", &[]).await;
    let tls = surplus_certs::session_client_config(
        &identity.ca_pem,
        &identity.certificate.cert_pem,
        &identity.key_pem,
    )
    .unwrap();
    let (_ep, conn) = surplus_agent::net::connect_any(
        tls,
        &identity.controller_addresses,
        &identity.server_name,
        &config,
    )
    .await
    .unwrap();
    let hello = Message::Hello(Hello {
        protocol_version: 99,
        agent_version: "future".into(),
        boot_epoch: 0,
        isolation: None,
    });
    let answer = quic::request(&conn, &hello, 1 << 20, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(answer, Message::Error(ref e) if e.code == ErrorCode::VersionMismatch),
        "{answer:?}"
    );
    match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, codes::CLOSE_VERSION_MISMATCH);
            assert!(String::from_utf8_lossy(&c.reason).contains("version"));
        }
        other => panic!("expected a version-mismatch close, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_renewed_before_they_expire() {
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (config, before) = tc.enroll("renew", &[]).await;
    let life = before.certificate.not_after_ms - before.certificate.issued_at_ms;
    assert!(
        (life - 24 * 3_600_000).abs() < 1000,
        "default lifetime is a day (to the second): {life}"
    );

    // The agent's clock jumps to 80% of the certificate's life: past the renewal point
    // (2/3 with jitter of at most 5%), before expiry.
    let agent_clock = ManualClock::new(before.certificate.issued_at_ms);
    let agent = RunningAgent::spawn(config.clone(), agent_clock.clone());
    events
        .until("online", |e| *e == RegistryEvent::Online(agent.id))
        .await;
    agent_clock.advance_ms(life * 8 / 10);
    let mut new_serial = String::new();
    events
        .until("renewal", |e| match e {
            RegistryEvent::Renewed { agent_id, serial } if *agent_id == agent.id => {
                new_serial = serial.clone();
                true
            }
            _ => false,
        })
        .await;
    agent.stop().await;

    let after = Identity::load(&config.data_dir).unwrap();
    assert_eq!(
        after.certificate.serial, new_serial,
        "the new certificate is on disk"
    );
    assert_ne!(after.key_pem, before.key_pem, "renewal uses a fresh key");
    assert_ne!(after.certificate.serial, before.certificate.serial);
    assert!(after.certificate.not_after_ms >= before.certificate.not_after_ms);
    let stored = tc
        .ctl()
        .app
        .store
        .agent(after.agent_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.cert_serial, new_serial);
    // The renewed identity opens sessions.
    Session::open(&config, &after)
        .await
        .expect("session with the renewed certificate")
        .close("bye")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_json_with_the_right_status() {
    let tc = TestController::start().await;
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/v1/agents", tc.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "unauthorized"
    );
    let r = client
        .get(format!("{}/v1/agents", tc.url()))
        .bearer_auth("spl_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let (status, body) = tc
        .api_get(&format!("/v1/agents/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = tc
        .api_post("/v1/tokens", serde_json::json!({"ttl": "soon"}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("ttl"));
    let (status, body) = tc
        .api_post(
            "/v1/tokens",
            serde_json::json!({"labels": {"bad key": "v"}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = tc
        .api_post("/v1/tokens", serde_json::json!({"colour": "blue"}))
        .await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let r = client
        .post(format!("{}/v1/tokens", tc.url()))
        .bearer_auth(&tc.admin_token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "bad_request"
    );

    let (status, body) = tc
        .api_post(
            "/v1/tokens",
            serde_json::json!({"ttl": "5m", "labels": {"zone": "eu"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let token = JoinToken::parse(body["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        token.enroll_addresses,
        vec![tc.config.enroll_listen.to_string()]
    );
    assert_eq!(
        token.ca_fingerprint,
        surplus_certs::fingerprint(
            &surplus_certs::certs_from_pem(tc.ctl().agents.ca_pem(), "ca").unwrap()[0]
        )
    );
}
