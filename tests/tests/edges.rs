//! The API's edges, attacked over real TCP: half-sent requests, too many connections,
//! oversized bodies, targets and headers, unknown methods (each answered with the JSON
//! error body); and the demo, which must leave no instance running when it ends.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use surplus_controller::ControllerConfig;
use surplus_protocol::clock;
use surplus_tests::{PATIENCE, TestController, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// A controller whose HTTP limits are small enough to reach in a test.
async fn controller(adjust: impl FnOnce(&mut ControllerConfig)) -> TestController {
    let mut config = ControllerConfig {
        http_header_read_timeout: Duration::from_millis(500),
        http_body_read_timeout: Duration::from_millis(500),
        http_max_connections: 64,
        http_max_body_bytes: 64 << 10,
        http_max_uri_bytes: 1024,
        http_max_header_bytes: 4096,
        ..test_config()
    };
    adjust(&mut config);
    TestController::start_with(config, clock::system()).await
}

/// Reads until the server closes the connection (EOF or reset), at most [`PATIENCE`].
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = timeout(PATIENCE, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    answer
}

/// The status and JSON body of a raw HTTP/1.1 answer.
fn parse(answer: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "not JSON: {head}"
    );
    let body: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body {body:?} is not JSON: {e}"));
    (status, body)
}

/// Sends `request` as is, and reads the whole answer (the server closes after it).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    parse(&until_closed(&mut stream).await)
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(answer.1["error"], code, "{}", answer.1);
    assert!(
        answer.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message: {}",
        answer.1
    );
}

#[tokio::test]
async fn a_half_sent_request_line_and_headers_are_cut_off_after_the_header_timeout() {
    let tc = controller(|_| {}).await;
    let mut stream = TcpStream::connect(tc.config.http_listen).await.unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut stream).await;
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(400),
        "closed after {held:?}, before the timeout"
    );
    // An idle connection that sends nothing at all is cut off too.
    let mut idle = TcpStream::connect(tc.config.http_listen).await.unwrap();
    until_closed(&mut idle).await;
}

#[tokio::test]
async fn a_half_sent_body_is_answered_408_and_closed_after_the_body_timeout() {
    let tc = controller(|_| {}).await;
    let mut stream = TcpStream::connect(tc.config.http_listen).await.unwrap();
    let request = format!(
        "POST /v1/control HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"action\":",
        tc.admin_token
    );
    let started = Instant::now();
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = parse(&until_closed(&mut stream).await);
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_error(&answer, 408, "request_timeout");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_and_are_served_once_others_end() {
    let tc = controller(|c| {
        c.http_max_connections = 4;
        // Held connections end when the test closes them, not by the header timeout.
        c.http_header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(tc.config.http_listen).await.unwrap();
        s.write_all(b"GET /v1/health HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let url = format!("{}/v1/health", tc.url());
    let waiting = tokio::spawn(async move {
        let r = reqwest::get(url).await.expect("answered");
        (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
    });
    // While every slot is taken the fifth request is not served. (A bounded wait for
    // something that must not happen.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served beyond http_max_connections");
    drop(held);
    let (status, health) = timeout(PATIENCE, waiting)
        .await
        .expect("served once the others went")
        .unwrap();
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn oversized_requests_and_unknown_methods_answer_json_errors() {
    let tc = controller(|_| {}).await;
    let addr = tc.config.http_listen;
    let token = tc.admin_token.clone();

    // A 50 MB body announced: refused before it is read.
    let announced = format!(
        "POST /v1/control HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 52428800\r\n\r\n{}",
        " ".repeat(1000)
    );
    assert_error(
        &raw(addr, announced.as_bytes()).await,
        413,
        "payload_too_large",
    );
    // The same without a length: chunks until past the limit.
    let mut chunked = format!(
        "POST /v1/control HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("4000\r\n{}\r\n", " ".repeat(0x4000)).as_bytes());
    }
    assert_error(&raw(addr, &chunked).await, 413, "payload_too_large");

    // A long target, large or many headers: answered by the API, not by hyper's
    // empty defaults.
    let long_uri = format!(
        "GET /v1/health?pad={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(2000)
    );
    assert_error(&raw(addr, long_uri.as_bytes()).await, 414, "uri_too_long");
    let big_header = format!(
        "GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(8000)
    );
    assert_error(
        &raw(addr, big_header.as_bytes()).await,
        431,
        "headers_too_large",
    );
    let mut many = String::from("GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for n in 0..150 {
        many.push_str(&format!("X-{n}: 1\r\n"));
    }
    many.push_str("\r\n");
    assert_error(&raw(addr, many.as_bytes()).await, 431, "headers_too_large");

    // Methods a path does not serve, with and without a token.
    let client = reqwest::Client::new();
    for (method, path, bearer) in [
        (reqwest::Method::DELETE, "/v1/agents", true),
        (reqwest::Method::PUT, "/v1/health", false),
        (reqwest::Method::GET, "/v1/control", true),
    ] {
        let mut request = client.request(method.clone(), format!("{}{path}", tc.url()));
        if bearer {
            request = request.bearer_auth(&token);
        }
        let r = request.send().await.unwrap();
        assert!(
            r.headers().contains_key(reqwest::header::ALLOW),
            "{method} {path}: a 405 names the methods served"
        );
        let status = r.status().as_u16();
        let body: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        assert_error(&(status, body), 405, "method_not_allowed");
    }
    let r = client
        .get(format!("{}/v1/nowhere", tc.url()))
        .send()
        .await
        .unwrap();
    assert_error(
        &(r.status().as_u16(), r.json().await.unwrap()),
        404,
        "not_found",
    );
    // The API still serves ordinary requests after all that.
    let (status, _) = tc.api_get("/v1/agents").await;
    assert_eq!(status, 200);
}

/// The instances of a command line, as `/proc` shows them (the demo's agent runs real
/// processes; the test looks at the host, not at what the demo says).
fn processes_running(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| String::from_utf8_lossy(c).contains(marker))
        .count()
}

#[tokio::test]
async fn the_demo_terminates_its_instances_before_it_exits() {
    let _cgroups = surplus_tests::CgroupGuard("surplus-demo".into());
    let root = tempfile::tempdir().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let demo = tokio::spawn(surplus_controller::demo::run_with(
        Some(root.path().to_path_buf()),
        Some(ready_tx),
        async {
            let _ = stop_rx.await;
        },
    ));
    let ready = timeout(Duration::from_secs(60), ready_rx)
        .await
        .expect("the demo starts")
        .expect("the demo reports where it is");

    // A client runs two instances through the demo's API; one is stopped, one runs.
    let marker = format!("600.{}", std::process::id());
    let client = reqwest::Client::new();
    let control = |body: Value| {
        client
            .post(format!("{}/v1/control", ready.http_url))
            .bearer_auth(&ready.admin_token)
            .json(&body)
            .send()
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let ran: Value = control(json!({"action": "RunInstances", "command": ["sleep", marker]}))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(
            ran["instances"][0]["id"]
                .as_str()
                .unwrap_or_else(|| panic!("an instance: {ran}"))
                .to_owned(),
        );
    }
    let stopped = control(json!({"action": "StopInstances", "ids": [ids[1]]}))
        .await
        .unwrap();
    assert_eq!(stopped.status(), 200);
    assert_eq!(processes_running(&marker), 1, "one instance runs");

    stop_tx.send(()).unwrap();
    timeout(PATIENCE, demo)
        .await
        .expect("the demo ends")
        .unwrap()
        .expect("the demo ends cleanly");
    assert_eq!(
        processes_running(&marker),
        0,
        "the demo left its instance running"
    );
    // Both were terminated through the control path, the stopped one too.
    let store = surplus_controller::store::sqlite::SqliteStore::open(
        &root.path().join("controller/controller.db"),
    )
    .await
    .unwrap();
    let rows = surplus_controller::store::ControlStore::instances(&store, None)
        .await
        .unwrap();
    let states: Vec<_> = rows.iter().map(|r| r.record.state).collect();
    assert_eq!(
        states,
        vec![surplus_protocol::control::InstanceState::Terminated; 2],
        "{ids:?}"
    );
}
