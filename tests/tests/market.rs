//! Buying capacity end to end (issue 16): a client finds an offer, reserves a host,
//! runs on it alone within the reservation's size and at its price, and loses control
//! when it releases the reservation or its term ends, its instances stopped through
//! the control path. And 100 concurrent reservations for 10 hosts through the HTTP
//! API, on SQLite and on PostgreSQL: exactly 10 succeed.
//!
//! Real controller, real agent with the `process` driver (root, cgroups), real HTTP;
//! the concurrency test's hosts are enrolled agents the store shows online (what it
//! tests is the API and the store, not the hosts).

use reqwest::Method;
use serde_json::{Value, json};
use surplus_agent::control::DriverKind;
use surplus_controller::registry::RegistryEvent;
use surplus_market::resell::{Interruptibility, PricingMode};
use surplus_protocol::clock::{self, Clock};
use surplus_tests::{
    CgroupGuard, PATIENCE, RunningAgent, TestController, accept_provider, control_config,
    list_hosts, test_config,
};

const GET: Method = Method::GET;
const POST: Method = Method::POST;

/// The first notification of `kind` among `notices`.
fn notice_of<'a>(notices: &'a Value, kind: &str) -> &'a Value {
    notices
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {notices}"))
}

/// Waits until instance `id`, described by `token`, is in `state`.
async fn until_state(tc: &TestController, token: &str, id: &str, state: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, answer) = tc
            .api_as(
                token,
                POST,
                "/v1/control",
                Some(json!({"action": "DescribeInstances", "ids": [id]})),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let instance = answer["instances"][0].clone();
        if instance["state"] == state {
            return instance;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "instance {id} never {state}: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserved_host_is_its_holders_alone_until_the_reservation_ends() {
    let tag = "market";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    // The controller's clock is turned by hand to reach a term's end.
    let controller_clock = clock::ManualClock::new(clock::system().now_ms());
    let mut config = test_config();
    config.market.tick = std::time::Duration::from_millis(100);
    config.billing_grace = std::time::Duration::ZERO;
    let tc = TestController::start_with(config, controller_clock.clone()).await;
    let mut events = tc.events();
    let (mut agent_config, identity) = tc.enroll("host-bob", &[("provider", "bob")]).await;
    agent_config.control = control_config(DriverKind::Process, tag);
    let agent = RunningAgent::spawn(agent_config, clock::system());
    let host = identity.agent_id;
    events
        .until("bob's host online", |e| *e == RegistryEvent::Online(host))
        .await;
    accept_provider(&tc, "bob").await;
    list_hosts(
        tc.ctl(),
        "lst-bob",
        "bob",
        &[host],
        &[
            PricingMode::Immediate,
            PricingMode::OnDemand,
            PricingMode::Reserved,
        ],
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    let alice = tc.token_for("alice", "client").await;
    let carol = tc.token_for("carol", "client").await;
    let bob = tc.token_for("bob", "provider").await;

    // The offer: its price in each mode, how long each holds, the hosts free now.
    let (status, offers) = tc
        .api_as(
            &alice,
            GET,
            "/v1/offers?rank_by=price&period_hours=1000",
            None,
        )
        .await;
    assert_eq!(status, 200, "{offers}");
    let offer = &offers[0];
    assert_eq!(
        (&offer["listing"]["id"], &offer["available"]),
        (&json!("lst-bob"), &json!(1)),
        "{offers}"
    );
    let price_of = |mode: &str| {
        offer["prices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["mode"] == mode)
            .cloned()
            .unwrap_or_else(|| panic!("{mode} in {offer}"))
    };
    assert_eq!(price_of("on_demand")["hourly"], 30);
    assert!(price_of("immediate")["valid_until_ms"].is_i64(), "{offer}");
    let term = price_of("reserved");
    assert_eq!(
        (&term["hourly"], &term["upfront"]),
        (&json!(21), &json!(2_250)),
        "{term}"
    );

    // Nobody runs on a host the market sells without holding it.
    let run = |limits: Value| json!({"action": "RunInstances", "command": ["sleep", "600"], "limits": limits});
    let mut on_host = run(json!({"millicpus": 600, "memory_bytes": 268_435_456}));
    on_host["agent_id"] = json!(host);
    let (status, refused) = tc
        .api_as(&carol, POST, "/v1/control", Some(on_host.clone()))
        .await;
    assert_eq!(status, 403, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("reserve it first"),
        "{refused}"
    );

    // Alice reserves it on demand; a retry with the same token answers the same.
    let ask = json!({"listing": "lst-bob", "mode": "on_demand", "client_token": "first"});
    let (status, made) = tc
        .api_as(&alice, POST, "/v1/reservations", Some(ask.clone()))
        .await;
    assert_eq!(status, 201, "{made}");
    let reservation = made[0]["reservation"]["id"].as_str().unwrap().to_owned();
    let access = &made[0]["access"];
    assert_eq!(
        (&access["host"], &access["zone"]),
        (&json!(host), &json!("bob-1")),
        "{made}"
    );
    assert!(
        access["address"].is_string() && access["control_endpoint"].is_string(),
        "{made}"
    );
    let (status, again) = tc.api_as(&alice, POST, "/v1/reservations", Some(ask)).await;
    assert_eq!(
        (status, &again[0]["reservation"]["id"]),
        (201, &json!(reservation)),
        "{again}"
    );
    let (status, sold_out) = tc
        .api_as(
            &carol,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-bob", "mode": "on_demand"})),
        )
        .await;
    assert_eq!(
        (status, &sold_out["error"]),
        (409, &json!("sold_out")),
        "{sold_out}"
    );

    // Her instances go to the host she holds, within its size (small: 1 CPU, 1 GiB),
    // at the reservation's price; carol can neither run there nor touch them.
    let (status, ran) = tc
        .api_as(
            &alice,
            POST,
            "/v1/control",
            Some(run(json!({"millicpus": 600, "memory_bytes": 268_435_456}))),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    let first = ran["instances"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(ran["instances"][0]["agent_id"], json!(host), "{ran}");
    let (status, too_big) = tc
        .api_as(
            &alice,
            POST,
            "/v1/control",
            Some(run(json!({"millicpus": 600}))),
        )
        .await;
    assert_eq!(
        (status, &too_big["field"]),
        (400, &json!("limits")),
        "{too_big}"
    );
    let (status, ran) = tc
        .api_as(
            &alice,
            POST,
            "/v1/control",
            Some(run(json!({"millicpus": 400, "memory_bytes": 268_435_456}))),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    let second = ran["instances"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = tc
        .api_as(&carol, POST, "/v1/control", Some(on_host.clone()))
        .await;
    assert_eq!(status, 403, "reserved by alice");
    let (status, _) = tc
        .api_as(
            &carol,
            POST,
            "/v1/control",
            Some(json!({"action": "StopInstances", "ids": [first]})),
        )
        .await;
    assert_eq!(status, 403, "not carol's");
    let billables = tc
        .ctl()
        .app
        .store
        .billables(controller_clock.now_ms() + 3_600_000)
        .await
        .unwrap();
    assert!(
        billables.iter().all(|b| b.instance.record.id != first),
        "the reservation pays for the host, its instances carry no price of their own"
    );

    // Bob is told the price.
    let (_, notices) = tc.api_as(&bob, GET, "/v1/notifications", None).await;
    let made_notice = notice_of(&notices, "reservation.made");
    assert_eq!(
        (
            &made_notice["body"]["price"],
            &made_notice["body"]["currency"]
        ),
        (&json!(30), &json!("EUR"))
    );

    // Releasing ends control and stops her instances there.
    let path = format!("/v1/reservations/{reservation}/release");
    let (status, _) = tc.api_as(&carol, POST, &path, None).await;
    assert_eq!(status, 403, "only the holder releases");
    let (status, released) = tc.api_as(&alice, POST, &path, None).await;
    assert_eq!(status, 200, "{released}");
    assert_eq!(
        released["reservation"]["state"]["why"]["kind"], "released",
        "{released}"
    );
    for id in [&first, &second] {
        until_state(&tc, &alice, id, "terminated").await;
    }
    let (status, _) = tc.api_as(&alice, POST, &path, None).await;
    assert_eq!(status, 409, "released once");
    let (status, _) = tc
        .api_as(&alice, POST, "/v1/control", Some(on_host.clone()))
        .await;
    assert_eq!(status, 403, "no longer hers");

    // A quote is honoured once, at its price, and goes into the pricing history.
    let (status, quote) = tc
        .api_as(
            &alice,
            POST,
            "/v1/quotes",
            Some(json!({"listing": "lst-bob"})),
        )
        .await;
    assert_eq!((status, &quote["price"]), (201, &json!(30)), "{quote}");
    let by_quote = json!({"listing": "lst-bob", "mode": "immediate", "quote": quote["id"]});
    let (status, made) = tc
        .api_as(&alice, POST, "/v1/reservations", Some(by_quote.clone()))
        .await;
    assert_eq!(status, 201, "{made}");
    let path = format!(
        "/v1/reservations/{}/release",
        made[0]["reservation"]["id"].as_str().unwrap()
    );
    assert_eq!(tc.api_as(&alice, POST, &path, None).await.0, 200);
    let (status, used) = tc
        .api_as(&alice, POST, "/v1/reservations", Some(by_quote))
        .await;
    assert_eq!(
        (status, &used["error"]),
        (409, &json!("quote_used")),
        "{used}"
    );
    let (status, history) = tc
        .api_as(&carol, GET, "/v1/pricing/history?kind=quote", None)
        .await;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["points"].as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history["guidance"]["median"], 30, "{history}");

    // A one-hour term: its upfront fee is posted at once, bob's share net of the
    // commission; at its end the instance on it is stopped.
    let (status, made) = tc
        .api_as(
            &alice,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-bob", "mode": "reserved", "term_hours": 1})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let upfront = made[0]["reservation"]["upfront"].as_i64().unwrap();
    assert_eq!(upfront, 3, "a quarter of the term's saving (9), rounded up");
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    let balance = |account: &str| {
        balances
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["account"] == account && b["currency"] == "EUR")
            .map(|b| b["balance"].as_i64().unwrap())
    };
    assert_eq!(balance("client:alice"), Some(-upfront), "{balances}");
    let fee = surplus_market::billing::commission(upfront, 1000);
    assert_eq!(balance("provider:bob"), Some(upfront - fee), "{balances}");
    let (status, ran) = tc
        .api_as(
            &alice,
            POST,
            "/v1/control",
            Some(run(json!({"millicpus": 500, "memory_bytes": 268_435_456}))),
        )
        .await;
    assert_eq!(status, 200, "{ran}");
    let on_term = ran["instances"][0]["id"].as_str().unwrap().to_owned();
    // A minute before its end (the lead is two), alice is told it is ending.
    controller_clock.advance_ms(3_540_000);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, notices) = tc.api_as(&alice, GET, "/v1/notifications", None).await;
        let expiring: Vec<&Value> = notices
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == "reservation.expiring")
            .collect();
        if let [one] = expiring.as_slice() {
            assert_eq!(
                one["body"]["reservation"], made[0]["reservation"]["id"],
                "{one}"
            );
            break;
        }
        assert!(expiring.is_empty(), "told once: {notices}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "no expiry notice: {notices}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        until_state(&tc, &alice, &on_term, "running").await["state"] == "running",
        "still hers until the end"
    );
    controller_clock.advance_ms(60_000);
    let stopped = until_state(&tc, &alice, &on_term, "terminated").await;
    assert!(
        stopped["state_reason"]
            .as_str()
            .unwrap_or("")
            .contains("reservation"),
        "{stopped}"
    );
    let (_, mine) = tc.api_as(&alice, GET, "/v1/reservations", None).await;
    let term = mine
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reservation"]["mode"] == "reserved")
        .unwrap_or_else(|| panic!("{mine}"));
    assert_eq!(
        term["reservation"]["state"]["why"]["kind"], "expired",
        "{mine}"
    );
    let (_, notices) = tc.api_as(&alice, GET, "/v1/notifications", None).await;
    assert!(
        notices
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == "reservation.ended")
            .count()
            >= 3,
        "released twice, expired once: {notices}"
    );

    // The term is billed by the hour it held the host, whatever ran there: 21 for its
    // hour, on alice's invoice, bob paid net of the commission.
    controller_clock.advance_ms(3_600_000);
    let start = made[0]["reservation"]["starts_at_ms"].as_i64().unwrap();
    let from = start - start.rem_euclid(3_600_000);
    let (status, billed) = tc
        .api_post(
            "/v1/billing/runs",
            json!({"from_ms": from, "to_ms": from + 2 * 3_600_000}),
        )
        .await;
    assert_eq!(status, 200, "{billed}");
    assert_eq!(billed["charged"]["EUR"], 21, "{billed}");
    let (_, invoices) = tc.api_as(&alice, GET, "/v1/invoices", None).await;
    let lines = invoices.to_string();
    assert!(lines.contains("host_hours"), "{invoices}");
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    let alice_owes = balances
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["account"] == "client:alice")
        .map(|b| b["balance"].as_i64().unwrap());
    assert_eq!(alice_owes, Some(-3 - 21), "{balances}");
    let (status, again) = tc
        .api_post(
            "/v1/billing/runs",
            json!({"from_ms": from, "to_ms": from + 2 * 3_600_000}),
        )
        .await;
    assert_eq!(
        (status, &again["posted"]),
        (200, &json!(0)),
        "billed once: {again}"
    );

    // A prepaid client that cannot pay a term's upfront fee and first hour reserves
    // nothing.
    let dave = tc.token_for("dave", "client").await;
    let (status, _) = tc
        .api_as(
            &tc.admin_token,
            Method::PUT,
            "/v1/ledger/accounts/client:dave",
            Some(json!({"allow_negative": false})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, refused) = tc
        .api_as(
            &dave,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-bob", "mode": "reserved", "term_hours": 10})),
        )
        .await;
    assert_eq!(
        (status, &refused["error"]),
        (402, &json!("insufficient_funds")),
        "{refused}"
    );
    let (_, daves) = tc.api_as(&dave, GET, "/v1/reservations", None).await;
    assert_eq!(daves, json!([]), "nothing reserved");
    let (status, _) = tc
        .api_as(
            &dave,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-bob", "mode": "reserved", "term_hours": 0})),
        )
        .await;
    assert_eq!(status, 400, "a term of no hours");
    agent.stop().await;
}

/// Ten hosts, a hundred clients asking for one each at once, through the API.
async fn a_hundred_ask_for_ten(database_url: Option<String>) {
    let mut config = test_config();
    if let Some(url) = database_url {
        config.database_url = url;
    }
    let tc = TestController::start_with(config, clock::system()).await;
    let hosts = surplus_tests::online_hosts(&tc, "bob", 10).await;
    list_hosts(
        tc.ctl(),
        "lst-ten",
        "bob",
        &hosts,
        &[PricingMode::OnDemand],
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    let mut tokens = Vec::new();
    for n in 0..100 {
        tokens.push(tc.token_for(&format!("client-{n}"), "client").await);
    }
    let url = tc.url();
    let http = reqwest::Client::new();
    let asks: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let r = http
                    .post(format!("{url}/v1/reservations"))
                    .bearer_auth(token)
                    .json(&json!({"listing": "lst-ten", "mode": "on_demand"}))
                    .send()
                    .await
                    .expect("API reachable");
                (r.status().as_u16(), r.json::<Value>().await.expect("JSON"))
            })
        })
        .collect();
    let (mut made, mut sold_out) = (Vec::new(), 0);
    for a in asks {
        match a.await.unwrap() {
            (201, body) => made.push(body[0]["reservation"]["host"].as_str().unwrap().to_owned()),
            (409, body) if body["error"] == "sold_out" => sold_out += 1,
            other => panic!("neither reserved nor sold out: {other:?}"),
        }
    }
    assert_eq!((made.len(), sold_out), (10, 90));
    made.sort();
    made.dedup();
    assert_eq!(made.len(), 10, "each host once");
    let (status, offers) = tc.api_get("/v1/offers").await;
    assert_eq!(status, 200);
    assert_eq!(offers, json!([]), "nothing left to offer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_reservations_of_ten_hosts_make_ten_on_sqlite() {
    a_hundred_ask_for_ten(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_reservations_of_ten_hosts_make_ten_on_postgres() {
    a_hundred_ask_for_ten(Some(surplus_tests::postgres::fresh_database().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_operators_own_capacity_is_busy_idle_third_party_capacity_ranks_first() {
    let mut config = test_config();
    config.market.primary_provider = Some("op".into());
    let tc = TestController::start_with(config, clock::system()).await;
    let own = surplus_tests::online_hosts(&tc, "op", 10).await;
    let third = surplus_tests::online_hosts(&tc, "third", 1).await;
    let modes = [PricingMode::OnDemand];
    let none = Interruptibility::NoInterruptions;
    list_hosts(tc.ctl(), "lst-op", "op", &own, &modes, (20, 10), none).await;
    list_hosts(
        tc.ctl(),
        "lst-third",
        "third",
        &third,
        &modes,
        (50, 10),
        none,
    )
    .await;
    let alice = tc.token_for("alice", "client").await;
    let order = |offers: &Value| -> Vec<String> {
        offers
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["listing"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (_, offers) = tc
        .api_as(&alice, GET, "/v1/offers?rank_by=price", None)
        .await;
    assert_eq!(
        order(&offers),
        ["lst-op", "lst-third"],
        "cheapest first while idle"
    );
    // Nine of its ten hosts held: above the 0.8 threshold.
    let ask = json!({"listing": "lst-op", "mode": "on_demand", "count": 9});
    let (status, made) = tc.api_as(&alice, POST, "/v1/reservations", Some(ask)).await;
    assert_eq!(status, 201, "{made}");
    let (_, offers) = tc
        .api_as(&alice, GET, "/v1/offers?rank_by=price", None)
        .await;
    assert_eq!(order(&offers), ["lst-third", "lst-op"], "{offers}");
    assert_eq!(offers[1]["available"], 1, "{offers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_takes_back_what_it_may_and_the_agent_stops_it_when_the_grace_ends() {
    let tag = "reclaim";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    let mut config = test_config();
    config.market.grace = std::time::Duration::from_secs(2);
    // The controller applies interruptions well after the agent's own deadline, so
    // that the agent is seen stopping the instance by itself.
    config.market.tick = std::time::Duration::from_secs(6);
    let tc = TestController::start_with(config, clock::system()).await;
    let mut events = tc.events();
    let (mut agent_config, identity) = tc.enroll("host-bob", &[("provider", "bob")]).await;
    agent_config.control = control_config(DriverKind::Process, tag);
    let mut agent = RunningAgent::spawn(agent_config.clone(), clock::system());
    let host = identity.agent_id;
    events
        .until("bob's host online", |e| *e == RegistryEvent::Online(host))
        .await;
    // A second host of bob's, sold without interruptions.
    let other = surplus_tests::online_hosts(&tc, "bob", 1).await[0];
    let modes = [PricingMode::OnDemand];
    // The host's own listing is made second: a reclaim on a host looks at every
    // listing of the provider.
    list_hosts(
        tc.ctl(),
        "lst-dni",
        "bob",
        &[other],
        &modes,
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    list_hosts(
        tc.ctl(),
        "lst-fulfil",
        "bob",
        &[host],
        &modes,
        (30, 20),
        Interruptibility::FulfilmentBased,
    )
    .await;
    let alice = tc.token_for("alice", "client").await;
    let bob = tc.token_for("bob", "provider").await;
    let mut held = Vec::new();
    for listing in ["lst-fulfil", "lst-dni"] {
        let (status, made) = tc
            .api_as(
                &alice,
                POST,
                "/v1/reservations",
                Some(json!({"listing": listing, "mode": "on_demand"})),
            )
            .await;
        assert_eq!(status, 201, "{made}");
        held.push(made[0]["reservation"]["id"].as_str().unwrap().to_owned());
    }
    let run = json!({"action": "RunInstances", "command": ["sleep", "600"], "agent_id": host, "limits": {"millicpus": 500, "memory_bytes": 268_435_456}});
    let (status, ran) = tc
        .api_as(&alice, POST, "/v1/control", Some(run.clone()))
        .await;
    assert_eq!(status, 200, "{ran}");
    let instance = ran["instances"][0]["id"].as_str().unwrap().to_owned();

    // Bob wants two hosts back: only the one that allows it is taken.
    let (status, taken) = tc
        .api_as(&bob, POST, "/v1/reclaims", Some(json!({"count": 2})))
        .await;
    assert_eq!(status, 202, "{taken}");
    assert_eq!(taken.as_array().unwrap().len(), 1, "{taken}");
    assert_eq!(
        (&taken[0]["reservation"], &taken[0]["host"]),
        (&json!(held[0]), &json!(host))
    );
    assert_eq!(
        taken[0]["notice"]["grace_ms"], 3_000,
        "the listing's promise, longer than the default: {taken}"
    );
    let (_, again) = tc
        .api_as(&bob, POST, "/v1/reclaims", Some(json!({"count": 2})))
        .await;
    assert_eq!(
        again,
        json!([]),
        "under notice already; the other may not be taken"
    );

    // Alice is told, with the deadline; her reservation shows it.
    let (_, notices) = tc.api_as(&alice, GET, "/v1/notifications", None).await;
    let told = notice_of(&notices, "reservation.interrupting");
    assert_eq!(told["body"]["cause"], "provider_reclaim", "{told}");
    let (_, mine) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{}", held[0]), None)
        .await;
    assert_eq!(
        mine["interruption"]["deadline_ms"], taken[0]["notice"]["deadline_ms"],
        "{mine}"
    );

    // The agent keeps the deadline, even across a restart during the grace: once
    // the notice is recorded on the host, the agent is restarted, takes its
    // instance back, and stops it when the grace ends, by itself; then the
    // controller ends the reservation and terminates it.
    let recorded = tc
        .agent_dir("host-bob")
        .join(surplus_agent::session::NOTICES_FILE);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !std::fs::read_to_string(&recorded)
        .unwrap_or_default()
        .contains("reservation.interrupting")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the notice never reached the host"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    agent.stop().await;
    let mut events = tc.events();
    agent = RunningAgent::spawn(agent_config, clock::system());
    events
        .until("bob's host back", |e| *e == RegistryEvent::Online(host))
        .await;
    until_state(&tc, &alice, &instance, "running").await;
    until_state(&tc, &alice, &instance, "stopped").await;
    until_state(&tc, &alice, &instance, "terminated").await;
    let (_, ended) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{}", held[0]), None)
        .await;
    assert_eq!(
        ended["reservation"]["state"]["why"]["kind"], "interrupted",
        "{ended}"
    );
    assert_eq!(
        ended["reservation"]["state"]["at_ms"], taken[0]["notice"]["deadline_ms"],
        "ended at the deadline: {ended}"
    );
    let (_, kept) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{}", held[1]), None)
        .await;
    assert_eq!(
        kept["reservation"]["state"]["state"], "active",
        "do-not-interrupt: {kept}"
    );

    // From the host itself: `surplus-agent reclaim --instance` asks the running agent,
    // which asks the controller over its session.
    let (status, made) = tc
        .api_as(
            &alice,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-fulfil", "mode": "on_demand"})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let again = made[0]["reservation"]["id"].as_str().unwrap().to_owned();
    let (status, ran) = tc.api_as(&alice, POST, "/v1/control", Some(run)).await;
    assert_eq!(status, 200, "{ran}");
    let instance = ran["instances"][0]["id"].as_str().unwrap().to_owned();
    let agent_dir = tc.agent_dir("host-bob");
    let out = tokio::process::Command::new(surplus_tests::bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["reclaim", "--instance", &instance])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&again),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, noticed) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{again}"), None)
        .await;
    assert_eq!(
        noticed["interruption"]["cause"], "provider_reclaim",
        "{noticed}"
    );
    // Nothing else on this host may be taken; a host's reclaim says so.
    let out = tokio::process::Command::new(surplus_tests::bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["reclaim", "--count", "1"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing taken"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop().await;
    // With the agent gone, the command says what it could not reach.
    let out = tokio::process::Command::new(surplus_tests::bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["reclaim"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("surplus-agent run"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The invoice lines of reservation `id` among `invoices` (`GET /v1/invoices`), as
/// (rate, amount), by rate.
fn lines_of(invoices: &Value, id: &str) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for invoice in invoices.as_array().unwrap() {
        for line in invoice["lines"].as_array().into_iter().flatten() {
            if line["instance_id"] == id {
                out.push((
                    line["rate"].as_i64().unwrap(),
                    line["amount"].as_i64().unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbid_on_the_spot_market_the_agent_stops_the_instance_when_the_grace_ends() {
    let tag = "spot";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    // The controller's clock is turned by hand (clearings, deadlines, the billing
    // run); the agent keeps the system's, and its deadline is the controller's
    // corrected by the offset it measured when it connected.
    let controller_clock = clock::ManualClock::new(clock::system().now_ms());
    let mut config = test_config();
    config.market.tick = std::time::Duration::from_millis(100);
    config.market.grace = std::time::Duration::from_secs(2);
    // Only clearings on demand: the test says when the market clears.
    config.market.spot_period = std::time::Duration::from_secs(24 * 3600);
    config.billing_grace = std::time::Duration::ZERO;
    let tc = TestController::start_with(config, controller_clock.clone()).await;
    let mut events = tc.events();
    let (mut agent_config, identity) = tc.enroll("host-bob", &[("provider", "bob")]).await;
    agent_config.control = control_config(DriverKind::Process, tag);
    let agent = RunningAgent::spawn(agent_config, clock::system());
    let host = identity.agent_id;
    events
        .until("bob's host online", |e| *e == RegistryEvent::Online(host))
        .await;
    accept_provider(&tc, "bob").await;
    // One unit per millisecond at the minimum: the charges of seconds are exact.
    const MINIMUM: i64 = 3_600_000;
    list_hosts(
        tc.ctl(),
        "lst-spot",
        "bob",
        &[host],
        &[PricingMode::Spot],
        (MINIMUM as u64, MINIMUM as u64),
        Interruptibility::PriceBased,
    )
    .await;
    let alice = tc.token_for("alice", "client").await;
    let carol = tc.token_for("carol", "client").await;
    let bob = tc.token_for("bob", "provider").await;

    // Refused when made: below the minimum, or a listing without spot.
    let (status, low) = tc
        .api_as(
            &alice,
            POST,
            "/v1/bids",
            Some(json!({"listing": "lst-spot", "max_price": MINIMUM - 1})),
        )
        .await;
    assert_eq!((status, &low["error"]), (400, &json!("minimum")), "{low}");
    // Nobody has bid: nothing to clear yet.
    let (status, none) = tc.api_as(&bob, POST, "/v1/spot/lst-spot/clear", None).await;
    assert_eq!(status, 404, "{none}");

    // Alice bids alone: she wins the host at the minimum.
    let (status, a) = tc
        .api_as(
            &alice,
            POST,
            "/v1/bids",
            Some(json!({"listing": "lst-spot", "max_price": 2 * MINIMUM, "client_token": "a-1"})),
        )
        .await;
    assert_eq!(status, 201, "{a}");
    let a_id = a["bid"]["id"].as_str().unwrap().to_owned();
    let (_, again) = tc
        .api_as(
            &alice,
            POST,
            "/v1/bids",
            Some(json!({"listing": "lst-spot", "max_price": 2 * MINIMUM, "client_token": "a-1"})),
        )
        .await;
    assert_eq!(again["bid"]["id"], a_id, "a retry is the same bid: {again}");
    let (status, cleared) = tc.api_as(&bob, POST, "/v1/spot/lst-spot/clear", None).await;
    assert_eq!(status, 200, "{cleared}");
    assert_eq!(
        (&cleared["price"], &cleared["capacity"]),
        (&json!(MINIMUM), &json!(1)),
        "{cleared}"
    );
    let (_, a) = tc
        .api_as(&alice, GET, &format!("/v1/bids/{a_id}"), None)
        .await;
    assert_eq!(a["allocated"], 1, "{a}");
    let held = a["reservations"][0].as_str().unwrap().to_owned();
    let (_, r) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{held}"), None)
        .await;
    assert_eq!(
        (&r["reservation"]["mode"], &r["reservation"]["host"]),
        (&json!("spot"), &json!(host)),
        "{r}"
    );
    let started = r["reservation"]["starts_at_ms"].as_i64().unwrap();
    // A spot host goes back by cancelling its bid, not alone.
    let (status, refused) = tc
        .api_as(
            &alice,
            POST,
            &format!("/v1/reservations/{held}/release"),
            None,
        )
        .await;
    assert_eq!(
        (status, &refused["error"]),
        (409, &json!("spot_bid")),
        "{refused}"
    );

    // She runs on the host she won.
    let run = json!({"action": "RunInstances", "command": ["sleep", "600"], "agent_id": host, "limits": {"millicpus": 500, "memory_bytes": 268_435_456}});
    let (status, ran) = tc.api_as(&alice, POST, "/v1/control", Some(run)).await;
    assert_eq!(status, 200, "{ran}");
    let instance = ran["instances"][0]["id"].as_str().unwrap().to_owned();

    // A second later Carol outbids her: the price is Alice's maximum, the highest
    // losing bid, and Alice is given notice with the listing's grace (3 s).
    controller_clock.advance_ms(1_000);
    // Carol is prepaid: her bid holds its maximum for an hour until it wins.
    let (status, _) = tc
        .api_as(
            &tc.admin_token,
            Method::PUT,
            "/v1/ledger/accounts/client:carol",
            Some(json!({"allow_negative": false})),
        )
        .await;
    assert_eq!(status, 200);
    let funds = 20 * MINIMUM;
    let (status, paid) = tc
        .api_post(
            "/v1/payments",
            json!({"account": "carol", "currency": "EUR", "amount": funds, "kind": "topup", "key": "carol-1"}),
        )
        .await;
    assert_eq!(status, 200, "{paid}");
    let (status, c) = tc
        .api_as(
            &carol,
            POST,
            "/v1/bids",
            Some(json!({"listing": "lst-spot", "max_price": 3 * MINIMUM})),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    let c_id = c["bid"]["id"].as_str().unwrap().to_owned();
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    assert_eq!(
        (
            balance_of(&balances, "client:carol"),
            balance_of(&balances, "hold:carol")
        ),
        (funds - 3 * MINIMUM, 3 * MINIMUM),
        "{balances}"
    );
    let (_, cleared) = tc.api_as(&bob, POST, "/v1/spot/lst-spot/clear", None).await;
    assert_eq!(cleared["price"], 2 * MINIMUM, "{cleared}");
    let (_, r) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{held}"), None)
        .await;
    let notice = r["interruption"].clone();
    assert_eq!(
        (&notice["cause"], &notice["grace_ms"]),
        (&json!("outbid"), &json!(3_000)),
        "{r}"
    );
    let deadline = notice["deadline_ms"].as_i64().unwrap();
    let (_, notices) = tc.api_as(&alice, GET, "/v1/notifications", None).await;
    assert_eq!(
        notice_of(&notices, "reservation.interrupting")["body"]["cause"],
        "outbid"
    );
    let (status, busy) = tc
        .api_as(
            &carol,
            POST,
            "/v1/control",
            Some(json!({"action": "RunInstances", "command": ["true"], "agent_id": host})),
        )
        .await;
    assert_eq!(
        status, 403,
        "Alice holds the host through her grace: {busy}"
    );

    // The agent stops Alice's instance when the grace ends, by itself (the
    // controller's clock has not reached the deadline); then the controller ends
    // the reservation at the deadline and terminates what ran.
    until_state(&tc, &alice, &instance, "stopped").await;
    let (_, still) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{held}"), None)
        .await;
    assert_eq!(still["reservation"]["state"]["state"], "active", "{still}");
    controller_clock.advance_ms(3_000);
    until_state(&tc, &alice, &instance, "terminated").await;
    let (_, ended) = tc
        .api_as(&alice, GET, &format!("/v1/reservations/{held}"), None)
        .await;
    assert_eq!(
        (
            &ended["reservation"]["state"]["why"]["kind"],
            &ended["reservation"]["state"]["at_ms"]
        ),
        (&json!("interrupted"), &json!(deadline)),
        "{ended}"
    );

    // The next clearing gives Carol the host, at the same price.
    let (_, cleared) = tc.api_as(&bob, POST, "/v1/spot/lst-spot/clear", None).await;
    assert_eq!(cleared["price"], 2 * MINIMUM, "{cleared}");
    let (_, c) = tc
        .api_as(&carol, GET, &format!("/v1/bids/{c_id}"), None)
        .await;
    assert_eq!(
        (&c["allocated"], c["reservations"].as_array().unwrap().len()),
        (&json!(1), 1),
        "{c}"
    );
    let (status, ran) = tc
        .api_as(
            &carol,
            POST,
            "/v1/control",
            Some(json!({"action": "RunInstances", "command": ["sleep", "600"], "agent_id": host})),
        )
        .await;
    assert_eq!(status, 200, "the host is Carol's now: {ran}");
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    assert_eq!(
        (
            balance_of(&balances, "client:carol"),
            balance_of(&balances, "hold:carol")
        ),
        (funds, 0),
        "her bid won: what it held is hers again, and her host is billed as used: {balances}"
    );
    let (_, history) = tc
        .api_as(&carol, GET, "/v1/pricing/history?kind=spot", None)
        .await;
    let prices: Vec<i64> = history["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["price"].as_i64().unwrap())
        .collect();
    assert_eq!(prices, [MINIMUM, 2 * MINIMUM, 2 * MINIMUM], "{history}");

    // Alice's invoice: her second at the first clearing's price, her grace at the
    // second's, each line at its clearing price.
    controller_clock.advance_ms(3 * 3_600_000);
    let from = started - started.rem_euclid(3_600_000);
    let (status, billed) = tc
        .api_post(
            "/v1/billing/runs",
            json!({"from_ms": from, "to_ms": from + 2 * 3_600_000}),
        )
        .await;
    assert_eq!(status, 200, "{billed}");
    let (_, invoices) = tc.api_as(&alice, GET, "/v1/invoices", None).await;
    let first = (deadline - 3_000) - started;
    assert_eq!(first, 1_000);
    assert_eq!(
        lines_of(&invoices, &held),
        [(MINIMUM, first), (2 * MINIMUM, 2 * 3_000)],
        "{invoices}"
    );

    // Carol cancels: her host is released, and she controls it no more.
    let (status, cancelled) = tc
        .api_as(&carol, POST, &format!("/v1/bids/{c_id}/cancel"), None)
        .await;
    assert_eq!(
        (status, &cancelled["state"]),
        (200, &json!("cancelled")),
        "{cancelled}"
    );
    assert_eq!(cancelled["reservations"], json!([]), "{cancelled}");
    let (status, again) = tc
        .api_as(&carol, POST, &format!("/v1/bids/{c_id}/cancel"), None)
        .await;
    assert_eq!(
        (status, &again["error"]),
        (409, &json!("cancelled")),
        "{again}"
    );
    let (status, gone) = tc
        .api_as(&alice, GET, &format!("/v1/bids/{c_id}"), None)
        .await;
    assert_eq!(status, 404, "another's bid: {gone}");
    drop(agent);
}

/// The balance of `account` in EUR among `/v1/ledger/balances`.
fn balance_of(balances: &Value, account: &str) -> i64 {
    balances
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["account"] == account && b["currency"] == "EUR")
        .map_or(0, |b| b["balance"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auction_holds_a_prepaid_bidders_funds_and_closes_once_with_a_host_for_the_winner() {
    let controller_clock = clock::ManualClock::new(clock::system().now_ms());
    let mut config = test_config();
    config.market.tick = std::time::Duration::from_millis(50);
    let tc = TestController::start_with(config, controller_clock.clone()).await;
    let host = surplus_tests::online_hosts(&tc, "bob", 1).await[0];
    list_hosts(
        tc.ctl(),
        "lst-auction",
        "bob",
        &[host],
        &[PricingMode::Auction],
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    let bob = tc.token_for("bob", "provider").await;
    let carol = tc.token_for("carol", "client").await;
    let dave = tc.token_for("dave", "client").await;
    // Dave is prepaid with 100 EUR.
    let (status, _) = tc
        .api_as(
            &tc.admin_token,
            Method::PUT,
            "/v1/ledger/accounts/client:dave",
            Some(json!({"allow_negative": false})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, paid) = tc
        .api_post("/v1/payments", json!({"account": "dave", "currency": "EUR", "amount": 100, "kind": "topup", "key": "dave-1"}))
        .await;
    assert_eq!(status, 200, "{paid}");

    let now = controller_clock.now_ms();
    let ends = now + 60_000;
    let english = json!({"type": "english", "reserve": 30, "increment": 5, "buy_now": null});
    let (status, refused) = tc
        .api_as(&bob, POST, "/v1/auctions", Some(json!({"listing": "lst-auction", "kind": {"type": "english", "reserve": 10, "increment": 5, "buy_now": null}, "ends_at_ms": ends})))
        .await;
    assert_eq!(
        (status, &refused["field"]),
        (400, &json!("kind")),
        "a reserve below the minimum: {refused}"
    );
    let (status, auction) = tc
        .api_as(&bob, POST, "/v1/auctions", Some(json!({"listing": "lst-auction", "kind": english, "ends_at_ms": ends, "term_hours": 2})))
        .await;
    assert_eq!(status, 201, "{auction}");
    let id = auction["id"].as_str().unwrap().to_owned();
    let bids = format!("/v1/auctions/{id}/bids");

    // Dave bids 60: 60 of his 100 are held.
    let (status, after) = tc
        .api_as(
            &dave,
            POST,
            &bids,
            Some(json!({"amount": 60, "client_token": "d-1"})),
        )
        .await;
    assert_eq!(status, 201, "{after}");
    assert_eq!(after["auction"]["current_price"], 60);
    let (_, retried) = tc
        .api_as(
            &dave,
            POST,
            &bids,
            Some(json!({"amount": 60, "client_token": "d-1"})),
        )
        .await;
    assert_eq!(
        retried["auction"]["bid_count"], 1,
        "a retry is the same bid: {retried}"
    );
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    assert_eq!(
        (
            balance_of(&balances, "client:dave"),
            balance_of(&balances, "hold:dave")
        ),
        (40, 60),
        "{balances}"
    );
    // Below the price plus the increment: refused, with the rule.
    let (status, low) = tc
        .api_as(&carol, POST, &bids, Some(json!({"amount": 62})))
        .await;
    assert_eq!((status, &low["error"]), (409, &json!("increment")), "{low}");
    // Carol outbids him: his hold is given back, and he is told.
    let (status, _) = tc
        .api_as(&carol, POST, &bids, Some(json!({"amount": 70})))
        .await;
    assert_eq!(status, 201);
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    assert_eq!(
        (
            balance_of(&balances, "client:dave"),
            balance_of(&balances, "hold:dave")
        ),
        (100, 0),
        "{balances}"
    );
    let (_, notices) = tc.api_as(&dave, GET, "/v1/notifications", None).await;
    notice_of(&notices, "auction.outbid");
    // He cannot hold more than he has: 402, nothing stored.
    let (status, poor) = tc
        .api_as(&dave, POST, &bids, Some(json!({"amount": 200})))
        .await;
    assert_eq!(
        (status, &poor["error"]),
        (402, &json!("insufficient_funds")),
        "{poor}"
    );
    let (_, shown) = tc
        .api_as(&dave, GET, &format!("/v1/auctions/{id}"), None)
        .await;
    assert_eq!(
        (&shown["auction"]["bid_count"], &shown["auction"]["phase"]),
        (&json!(2), &json!("open")),
        "{shown}"
    );

    // At the end the market's tick closes it, once: Carol wins at her bid and holds
    // the host for the term; the sale is in the pricing history.
    controller_clock.advance_ms(60_000);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let closed = loop {
        let (_, a) = tc
            .api_as(&carol, GET, &format!("/v1/auctions/{id}"), None)
            .await;
        if a["auction"]["phase"] == "closed" {
            break a;
        }
        assert!(tokio::time::Instant::now() < deadline, "never closed: {a}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let winner = &closed["auction"]["outcome"]["winner"];
    assert_eq!(
        (&winner["bidder"], &winner["price"]),
        (&json!("carol"), &json!(70)),
        "{closed}"
    );
    assert_eq!(closed["reservation"], json!(id), "{closed}");
    let (_, r) = tc
        .api_as(&carol, GET, &format!("/v1/reservations/{id}"), None)
        .await;
    assert_eq!(
        (
            &r["reservation"]["mode"],
            &r["reservation"]["price"],
            &r["reservation"]["host"]
        ),
        (&json!("auction"), &json!(70), &json!(host)),
        "{r}"
    );
    assert_eq!(
        r["reservation"]["ends_at_ms"].as_i64().unwrap()
            - r["reservation"]["starts_at_ms"].as_i64().unwrap(),
        2 * 3_600_000
    );
    let (_, history) = tc
        .api_as(&carol, GET, "/v1/pricing/history?kind=auction", None)
        .await;
    assert_eq!(history["points"][0]["price"], 70, "{history}");
    let (status, late) = tc
        .api_as(&dave, POST, &bids, Some(json!({"amount": 90})))
        .await;
    assert_eq!((status, &late["error"]), (409, &json!("ended")), "{late}");
    let (_, open) = tc.api_as(&dave, GET, "/v1/auctions?open=true", None).await;
    assert_eq!(open, json!([]));
}

/// The balance of `account` in `currency` among `/v1/ledger/balances`.
fn balance_in(balances: &Value, account: &str, currency: &str) -> i64 {
    balances
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["account"] == account && b["currency"] == currency)
        .map_or(0, |b| b["balance"].as_i64().unwrap())
}

/// Private pools end to end (issue 17): a pool owner builds a pool from two hosts
/// its account reserved and names two members; alice's instances run on the pool's
/// slots; brian bids higher in the next cycle and takes them, alice is told and her
/// instance is stopped when the notice ends; her request, left short, bursts into a
/// market reservation under the policy's maximum price, and once the budget is
/// spent a third request's burst is refused with that reason; what members were charged is the owner's
/// income in the pool's credits, and the owner's invoice bills the hosts it reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_shares_its_owners_hosts_by_bid_and_bursts_within_its_budget() {
    let guards = [
        CgroupGuard(
            control_config(DriverKind::Process, "pool-1")
                .process
                .cgroup_parent,
        ),
        CgroupGuard(
            control_config(DriverKind::Process, "pool-2")
                .process
                .cgroup_parent,
        ),
    ];
    let controller_clock = clock::ManualClock::new(clock::system().now_ms());
    let mut config = test_config();
    config.market.tick = std::time::Duration::from_millis(100);
    config.billing_grace = std::time::Duration::ZERO;
    let tc = TestController::start_with(config, controller_clock.clone()).await;
    let mut events = tc.events();
    let mut agents = Vec::new();
    let mut hosts = Vec::new();
    for (n, tag) in ["pool-1", "pool-2"].into_iter().enumerate() {
        let (mut agent_config, identity) =
            tc.enroll(&format!("lab-{n}"), &[("provider", "bob")]).await;
        agent_config.control = control_config(DriverKind::Process, tag);
        agents.push(RunningAgent::spawn(agent_config, clock::system()));
        hosts.push(identity.agent_id);
    }
    events
        .until_all("the lab's hosts online", &hosts, |e| match e {
            RegistryEvent::Online(id) => Some(*id),
            _ => None,
        })
        .await;
    accept_provider(&tc, "bob").await;
    list_hosts(
        tc.ctl(),
        "lst-lab",
        "bob",
        &hosts,
        &[PricingMode::OnDemand],
        (100, 100),
        Interruptibility::NoInterruptions,
    )
    .await;
    // Market capacity beyond the pool: dave's, one listing within the burst's
    // maximum price and one above it.
    let market = surplus_tests::online_hosts(&tc, "dave", 3).await;
    for (id, hosts, price) in [
        ("lst-cheap", &market[..2], 40),
        ("lst-dear", &market[2..], 80),
    ] {
        list_hosts(
            tc.ctl(),
            id,
            "dave",
            hosts,
            &[PricingMode::OnDemand],
            (price, price),
            Interruptibility::NoInterruptions,
        )
        .await;
    }

    // The university's client account reserves the two lab hosts.
    let uni_client = tc.token_for("uni", "client").await;
    let (status, reserved) = tc
        .api_as(
            &uni_client,
            POST,
            "/v1/reservations",
            Some(json!({"listing": "lst-lab", "mode": "on_demand", "count": 2})),
        )
        .await;
    assert_eq!(status, 201, "{reserved}");
    let started = controller_clock.now_ms();
    let slots: Vec<String> = reserved
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reservation"]["id"].as_str().unwrap().to_owned())
        .collect();
    // It lets its pool owner account pool what it holds, and pay bursts.
    let (status, granted) = tc
        .api_as(
            &uni_client,
            POST,
            "/v1/pool-accounts",
            Some(json!({"owner": "uni"})),
        )
        .await;
    assert_eq!(status, 204, "{granted}");

    // As pool owner it builds a pool of them: English bids in its own credits,
    // preemptible, a two-second notice, and a burst policy (40 EUR a host-hour at
    // most, 50 EUR a day), cycles every fifty minutes (and when the owner says).
    let uni = tc.token_for("uni", "pool_owner").await;
    let (status, refused) = tc
        .api_as(
            &uni,
            POST,
            "/v1/pools",
            Some(json!({"name": "lab", "method": "dutch"})),
        )
        .await;
    assert_eq!(
        (status, &refused["field"]),
        (400, &json!("step")),
        "{refused}"
    );
    let (status, pool) = tc
        .api_as(
            &uni,
            POST,
            "/v1/pools",
            Some(json!({
                "name": "lab", "currency_kind": "credits", "method": "english",
                "minimum": 5, "maximum": 1000, "preemptible": true, "notice_seconds": 2,
                "cycle_seconds": 3000,
                "burst": {"account": "uni", "max_price": 50, "budget": 50, "currency": "EUR",
                          "period_ms": 86_400_000, "min_hours": 1}
            })),
        )
        .await;
    assert_eq!(status, 201, "{pool}");
    let pool_id = pool["id"].as_str().unwrap().to_owned();
    // Its credits are a currency of its own, named by the pool.
    let lab = pool["settings"]["currency"].as_str().unwrap().to_owned();
    let (status, minted) = tc
        .api_as(
            &uni,
            POST,
            "/v1/pools",
            Some(json!({"name": "mint", "currency": "EUR", "currency_kind": "credits"})),
        )
        .await;
    assert_eq!(
        (status, &minted["field"]),
        (400, &json!("currency")),
        "no pool issues money: {minted}"
    );
    let path = |p: &str| format!("/v1/pools/{pool_id}{p}");
    for slot in &slots {
        let (status, added) = tc
            .api_as(&uni, POST, &path("/slots"), Some(json!({"slot": slot})))
            .await;
        assert_eq!(status, 201, "{added}");
    }
    let (status, again) = tc
        .api_as(&uni, POST, &path("/slots"), Some(json!({"slot": slots[0]})))
        .await;
    assert_eq!(
        (status, &again["error"]),
        (409, &json!("slot_taken")),
        "{again}"
    );
    let (status, shown) = tc.api_as(&uni, GET, &path(""), None).await;
    assert_eq!(status, 200);
    let facts = &shown["slots"][0]["facts"];
    assert_eq!(
        (
            &facts["kind"],
            &facts["mode"],
            &facts["zone"],
            &facts["instance_type"]
        ),
        (
            &json!("reservation"),
            &json!("on_demand"),
            &json!("bob-1"),
            &json!("small")
        ),
        "{shown}"
    );
    for (member, name) in [("alice", "Alice"), ("brian", "Brian")] {
        let (status, _) = tc
            .api_as(
                &uni,
                POST,
                &path("/members"),
                Some(json!({"member": member, "name": name, "organisation": "Physics"})),
            )
            .await;
        assert_eq!(status, 201);
        let (status, issued) = tc
            .api_as(
                &uni,
                POST,
                &path("/credits"),
                Some(json!({"member": member, "amount": 1000, "client_token": member})),
            )
            .await;
        assert_eq!(
            (status, &issued["applied"]),
            (201, &json!("posted")),
            "{issued}"
        );
    }
    let alice = tc.token_for("alice", "client").await;
    let brian = tc.token_for("brian", "client").await;
    let mallory = tc.token_for("mallory", "client").await;
    let (status, hidden) = tc.api_as(&mallory, GET, &path(""), None).await;
    assert_eq!(status, 404, "a stranger does not see the pool: {hidden}");
    let (status, refused) = tc
        .api_as(
            &mallory,
            POST,
            &path("/requests"),
            Some(json!({"count": 1, "bid": 50})),
        )
        .await;
    assert_eq!(status, 404, "{refused}");

    // Alice asks for both slots at 10 credits a slot-hour, and gets them at the
    // cycle; her instances run there, nobody else's.
    let (status, ra) = tc
        .api_as(
            &alice,
            POST,
            &path("/requests"),
            Some(json!({"count": 2, "bid": 10})),
        )
        .await;
    assert_eq!(status, 201, "{ra}");
    let ra = ra["request"]["id"].as_str().unwrap().to_owned();
    let (status, cycled) = tc.api_as(&uni, POST, &path("/cycle"), None).await;
    assert_eq!(status, 200, "{cycled}");
    let (_, mine) = tc
        .api_as(&alice, GET, &format!("/v1/pool-requests/{ra}"), None)
        .await;
    assert_eq!(mine["why"]["rule"], "holds", "{mine}");
    assert_eq!(mine["allocations"].as_array().unwrap().len(), 2, "{mine}");
    let mut instances = std::collections::BTreeMap::new();
    for host in &hosts {
        let run = json!({"action": "RunInstances", "command": ["sleep", "600"], "agent_id": host,
                         "limits": {"millicpus": 500, "memory_bytes": 268_435_456}});
        let (status, ran) = tc.api_as(&alice, POST, "/v1/control", Some(run)).await;
        assert_eq!(status, 200, "{ran}");
        instances.insert(
            *host,
            ran["instances"][0]["id"].as_str().unwrap().to_owned(),
        );
    }
    for (who, token) in [
        ("the owner's own client account", &uni_client),
        ("a stranger", &mallory),
    ] {
        let run = json!({"action": "RunInstances", "command": ["true"], "agent_id": hosts[0]});
        let (status, refused) = tc.api_as(token, POST, "/v1/control", Some(run)).await;
        assert_eq!(status, 403, "{who} may not use a pooled host: {refused}");
    }

    // Half an hour later Brian bids 20 for both: the cycle gives him both, and
    // Alice is told; she keeps them for the two-second notice.
    controller_clock.advance_ms(1_800_000);
    let (status, rb) = tc
        .api_as(
            &brian,
            POST,
            &path("/requests"),
            Some(json!({"count": 2, "bid": 20})),
        )
        .await;
    assert_eq!(status, 201, "{rb}");
    let rb = rb["request"]["id"].as_str().unwrap().to_owned();
    tc.api_as(&uni, POST, &path("/cycle"), None).await;
    let deadline = controller_clock.now_ms() + 2_000;
    let (_, why) = tc
        .api_as(
            &alice,
            GET,
            &format!("/v1/pool-requests/{ra}/explain"),
            None,
        )
        .await;
    assert_eq!(why["rule"], "preempted", "{why}");
    assert!(
        why["explanation"].as_str().unwrap().contains(&rb),
        "names the request that took them: {why}"
    );
    let (_, notices) = tc.api_as(&alice, GET, "/v1/notifications", None).await;
    let ending = notice_of(&notices, "pool.slot_ending");
    assert_eq!(
        (
            &ending["body"]["deadline_ms"],
            &ending["body"]["why"]["rule"]
        ),
        (&json!(deadline), &json!("preempted")),
        "{ending}"
    );
    let run = json!({"action": "RunInstances", "command": ["true"], "agent_id": hosts[0]});
    let (status, busy) = tc
        .api_as(&brian, POST, "/v1/control", Some(run.clone()))
        .await;
    assert_eq!(status, 403, "Alice holds it through her notice: {busy}");
    // The notice ends: her instances are stopped and terminated, and the hosts are
    // Brian's.
    controller_clock.advance_ms(2_000);
    for id in instances.values() {
        until_state(&tc, &alice, id, "terminated").await;
    }
    let (status, ran) = tc.api_as(&brian, POST, "/v1/control", Some(run)).await;
    assert_eq!(status, 200, "the host is Brian's now: {ran}");
    let (status, refused) = tc
        .api_as(
            &alice,
            POST,
            "/v1/control",
            Some(json!({"action": "RunInstances", "command": ["true"], "agent_id": hosts[1]})),
        )
        .await;
    assert_eq!(status, 403, "{refused}");

    // An English pool's bids only rise.
    let (status, lower) = tc
        .api_as(
            &alice,
            POST,
            &format!("/v1/pool-requests/{ra}/bid"),
            Some(json!({"bid": 9})),
        )
        .await;
    assert_eq!(
        (status, &lower["error"]),
        (409, &json!("ascending")),
        "{lower}"
    );

    // Alice's first request is left short: the pool is full, so a cycle bursts it
    // into the market's cheaper listing (40 EUR, within the maximum 50; the dearer
    // one is above it), which costs 40 of the day's budget of 50, and the next
    // cycle (asked for by the burst, run by the tick) gives her the slot.
    tc.api_as(&uni, POST, &path("/cycle"), None).await;
    let deadline_wait = tokio::time::Instant::now() + PATIENCE;
    let burst = loop {
        let (_, usage) = tc.api_as(&uni, GET, &path("/usage"), None).await;
        let (_, r) = tc
            .api_as(&alice, GET, &format!("/v1/pool-requests/{ra}"), None)
            .await;
        let bursts = usage["bursts"].as_array().unwrap();
        let held: Vec<&Value> = r["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["allocation"]["noticed"] == false)
            .collect();
        if let ([b], [a]) = (bursts.as_slice(), held.as_slice()) {
            assert_eq!(
                (&b["source"], &b["price"], &usage["burst_spent"]),
                (&json!("market:lst-cheap"), &json!(40), &json!(40)),
                "{usage}"
            );
            assert_eq!(a["allocation"]["slot"], b["slot"], "{r}");
            break b["slot"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline_wait,
            "never burst: {usage} {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (_, r) = tc
        .api_as(&uni_client, GET, &format!("/v1/reservations/{burst}"), None)
        .await;
    assert_eq!(
        (&r["reservation"]["listing"], &r["reservation"]["holder"]),
        (&json!("lst-cheap"), &json!("uni")),
        "the burst is a market reservation the owner holds and pays: {r}"
    );
    // A third request, at 8, is short too, and refused a burst: another 40 would
    // pass the budget.
    let (status, rc) = tc
        .api_as(
            &alice,
            POST,
            &path("/requests"),
            Some(json!({"count": 1, "bid": 8})),
        )
        .await;
    assert_eq!(status, 201, "{rc}");
    let rc = rc["request"]["id"].as_str().unwrap().to_owned();
    tc.api_as(&uni, POST, &path("/cycle"), None).await;
    let (_, why) = tc
        .api_as(
            &alice,
            GET,
            &format!("/v1/pool-requests/{rc}/explain"),
            None,
        )
        .await;
    assert_eq!(
        (&why["rule"], &why["why"]["burst"]["rule"]),
        (&json!("pool_full"), &json!("budget_spent")),
        "{why}"
    );
    assert!(
        why["explanation"].as_str().unwrap().contains("budget"),
        "{why}"
    );

    // An hour on, a last cycle charges what was held; members' billing records
    // add up to the owner's income in credits, and each member's balance is what
    // it was issued less its charges.
    controller_clock.advance_ms(3_600_000);
    tc.api_as(&uni, POST, &path("/cycle"), None).await;
    let (_, usage) = tc.api_as(&uni, GET, &path("/usage"), None).await;
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    let charged = |m: &str| {
        usage["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["member"] == m)
            .map(|u| {
                let records: i64 = u["charges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["amount"].as_i64().unwrap())
                    .sum();
                assert_eq!(u["charged"].as_i64().unwrap(), records, "{u}");
                records
            })
            .unwrap()
    };
    let (a, b) = (charged("alice"), charged("brian"));
    // Alice: two slots for half an hour at 10 (her two seconds of notice round to
    // nothing) and the burst slot for the hour at 10; Brian: two slots for the
    // hour at 20, from Alice's deadline.
    assert_eq!((a, b), (5 + 5 + 10, 20 + 20), "{usage}");
    assert_eq!(usage["total"].as_i64().unwrap(), a + b, "{usage}");
    assert_eq!(balance_in(&balances, "pool:uni", &lab), a + b, "{balances}");
    assert_eq!(
        balance_in(&balances, "client:alice", &lab),
        1000 - a,
        "{balances}"
    );
    assert_eq!(
        balance_in(&balances, "client:brian", &lab),
        1000 - b,
        "{balances}"
    );
    assert_eq!(balance_in(&balances, "external", &lab), -2000, "{balances}");
    let record = &usage["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["member"] == "brian")
        .unwrap()["holding"][0];
    assert_eq!(
        (
            &record["customer"],
            &record["bid"],
            &record["zone"],
            &record["tenancy"]
        ),
        (
            &json!("uni"),
            &json!(20),
            &json!("bob-1"),
            &json!("dedicated")
        ),
        "{record}"
    );
    assert_eq!(record["instances"].as_array().unwrap().len(), 1, "{record}");

    // The owner's invoice: the two lab hosts at 100 EUR and the burst at 40, by
    // the hour, from its money.
    controller_clock.advance_ms(3_600_000);
    let from = started - started.rem_euclid(3_600_000);
    let now = controller_clock.now_ms();
    let to = now - now.rem_euclid(3_600_000);
    let (status, billed) = tc
        .api_post("/v1/billing/runs", json!({"from_ms": from, "to_ms": to}))
        .await;
    assert_eq!(status, 200, "{billed}");
    let (_, invoices) = tc.api_as(&uni_client, GET, "/v1/invoices", None).await;
    let mut rates: Vec<i64> = invoices
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["lines"].as_array().unwrap().iter())
        .map(|l| l["rate"].as_i64().unwrap())
        .collect();
    rates.sort();
    rates.dedup();
    assert_eq!(rates, [40, 100], "{invoices}");
    drop(agents);
    drop(guards);
}

/// Merged pools (issue 17, FIG. 14) through the `surplus pools` CLI: two pool
/// owners merge their pools, each with the rights it was given and its own lending
/// and borrowing limits; a user of one borrows the other's idle slot within the
/// limits, gives it back with notice when its owner's user wants it, each slot's
/// charges go to the entity whose slot it is, and an entity leaving takes its slot
/// back after the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_pools_lend_within_their_limits_and_a_leaving_entity_takes_its_slots_back() {
    let controller_clock = clock::ManualClock::new(clock::system().now_ms());
    let tc = TestController::start_with(test_config(), controller_clock.clone()).await;
    let hosts = surplus_tests::online_hosts(&tc, "bob", 3).await;
    list_hosts(
        tc.ctl(),
        "lst-lab",
        "bob",
        &hosts,
        &[PricingMode::OnDemand],
        (100, 100),
        Interruptibility::NoInterruptions,
    )
    .await;
    let mut reserved = std::collections::BTreeMap::new();
    let mut clients = std::collections::BTreeMap::new();
    for (account, count) in [("uni", 2), ("poly", 1)] {
        let token = tc.token_for(account, "client").await;
        clients.insert(account, token.clone());
        let (status, made) = tc
            .api_as(
                &token,
                POST,
                "/v1/reservations",
                Some(json!({"listing": "lst-lab", "mode": "on_demand", "count": count})),
            )
            .await;
        assert_eq!(status, 201, "{made}");
        let ids: Vec<String> = made
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["reservation"]["id"].as_str().unwrap().to_owned())
            .collect();
        reserved.insert(account, ids);
    }
    let uni = tc.token_for("uni", "pool_owner").await;
    let poly = tc.token_for("poly", "pool_owner").await;
    let alice = tc.token_for("alice", "client").await;
    let pat = tc.token_for("pat", "client").await;
    let cli = |token: &str, args: &[&str]| {
        let (tc, token) = (&tc, token.to_owned());
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tc.cli(&token, &args).await
        }
    };

    // Each client account lets its pool owner pool what it holds; then each builds
    // its own pool of its own slots and users.
    for account in ["uni", "poly"] {
        cli(&clients[account], &["pools", "grant", account])
            .await
            .unwrap();
    }
    let mut pools = Vec::new();
    for (token, name, account, user) in [
        (&uni, "uni", "uni", "alice"),
        (&poly, "poly", "poly", "pat"),
    ] {
        let made = cli(
            token,
            &[
                "pools",
                "create",
                name,
                "--method",
                "english",
                "--minimum",
                "1",
                "--notice-seconds",
                "60",
            ],
        )
        .await
        .unwrap();
        let id = made["id"].as_str().unwrap().to_owned();
        for slot in &reserved[account] {
            cli(token, &["pools", "add-slot", &id, slot]).await.unwrap();
        }
        cli(
            token,
            &["pools", "add-member", &id, user, "--organisation", name],
        )
        .await
        .unwrap();
        pools.push(id);
    }
    let (merged, theirs) = (pools[0].clone(), pools[1].clone());
    // Uni may not pool what poly's account holds: poly granted its capacity to
    // poly only.
    let err = cli(&uni, &["pools", "add-slot", &merged, &reserved["poly"][0]])
        .await
        .unwrap_err();
    assert!(err.contains("403"), "{err}");
    let shown = cli(&uni, &["pools", "show", &merged]).await.unwrap();
    let lab = shown["settings"]["currency"].as_str().unwrap().to_owned();
    // Uni invites poly with the right to manage users only; poly merges its pool in,
    // lending none of its slot and borrowing at most one; uni lends at most one.
    let invited = cli(
        &uni,
        &["pools", "invite", &merged, "poly", "--rights", "users"],
    )
    .await
    .unwrap();
    assert_eq!(
        invited["entities"].as_array().unwrap().len(),
        2,
        "{invited}"
    );
    let err = cli(&poly, &["pools", "join", &merged, "--pool", &merged])
        .await
        .unwrap_err();
    assert!(err.contains("unknown_pool"), "{err}");
    let joined = cli(
        &poly,
        &[
            "pools",
            "join",
            &merged,
            "--pool",
            &theirs,
            "--lending-limit",
            "0",
            "--borrowing-limit",
            "1",
        ],
    )
    .await
    .unwrap();
    assert_eq!(joined["slots"].as_array().unwrap().len(), 3, "{joined}");
    let owners: Vec<&str> = joined["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["entity"].as_str().unwrap())
        .collect();
    assert_eq!(
        (
            owners.iter().filter(|o| **o == "uni").count(),
            owners.iter().filter(|o| **o == "poly").count()
        ),
        (2, 1),
        "each slot keeps its owner: {joined}"
    );
    let gone = cli(&poly, &["pools", "show", &theirs]).await.unwrap();
    assert!(gone["dissolved_at_ms"].is_i64(), "{gone}");
    cli(&uni, &["pools", "limits", &merged, "--lending-limit", "1"])
        .await
        .unwrap();
    for (token, user) in [(&uni, "alice"), (&poly, "pat")] {
        cli(
            token,
            &[
                "pools", "credit", &merged, "--user", user, "--amount", "1000",
            ],
        )
        .await
        .unwrap();
    }
    // Poly was not given the policy right.
    let err = cli(&poly, &["pools", "policy", &merged, "--minimum", "2"])
        .await
        .unwrap_err();
    assert!(err.contains("403") && err.contains("policy"), "{err}");
    let err = cli(&poly, &["pools", "remove-member", &merged, "alice"])
        .await
        .unwrap_err();
    assert!(
        err.contains("403"),
        "one entity does not remove another's users: {err}"
    );

    // Pat asks for two: his entity's slot, and one of uni's borrowed.
    let rp = cli(
        &pat,
        &["pools", "request", &merged, "--count", "2", "--bid", "5"],
    )
    .await
    .unwrap();
    let rp = rp["request"]["id"].as_str().unwrap().to_owned();
    cli(&uni, &["pools", "cycle", &merged]).await.unwrap();
    let mine = cli(&pat, &["pools", "requests", &merged]).await.unwrap();
    assert_eq!(
        mine[0]["allocations"].as_array().unwrap().len(),
        2,
        "{mine}"
    );

    // Half an hour on, Alice wants both of uni's: the lent one comes back to her,
    // with notice for Pat, although the pool does not preempt.
    controller_clock.advance_ms(1_800_000);
    let ra = cli(
        &alice,
        &["pools", "request", &merged, "--count", "2", "--bid", "3"],
    )
    .await
    .unwrap();
    let ra = ra["request"]["id"].as_str().unwrap().to_owned();
    cli(&uni, &["pools", "cycle", &merged]).await.unwrap();
    let why = cli(&pat, &["pools", "explain", &rp]).await.unwrap();
    assert_eq!(
        (&why["rule"], &why["why"]["merged"]["rule"]),
        (&json!("preempted"), &json!("reclaimed")),
        "{why}"
    );
    let why = cli(&alice, &["pools", "explain", &ra]).await.unwrap();
    assert_eq!(why["rule"], "holds", "{why}");
    // Pat's half hour on each slot went to the entity whose slot it was.
    let (_, balances) = tc.api_get("/v1/ledger/balances").await;
    assert_eq!(
        (
            balance_in(&balances, "pool:uni", &lab),
            balance_in(&balances, "pool:poly", &lab)
        ),
        (3, 3),
        "{balances}"
    );

    // Poly leaves: its slot comes back after the notice, and Pat's allocation on
    // it ends then.
    let left = cli(&poly, &["pools", "leave", &merged]).await.unwrap();
    let leaving = left["entities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["entity"] == "poly")
        .unwrap()["leaving_at_ms"]
        .as_i64()
        .unwrap();
    cli(&uni, &["pools", "cycle", &merged]).await.unwrap();
    let mine = cli(&pat, &["pools", "requests", &merged]).await.unwrap();
    assert_eq!(
        mine[0]["why"]["rule"], "not_member",
        "pat leaves with poly: {mine}"
    );
    for a in mine[0]["allocations"].as_array().unwrap() {
        assert_eq!(
            (&a["allocation"]["noticed"], &a["allocation"]["until_ms"]),
            (&json!(true), &json!(leaving)),
            "{mine}"
        );
    }
    let (_, notices) = tc.api_as(&pat, GET, "/v1/notifications", None).await;
    let ends: Vec<i64> = notices
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "pool.slot_ending")
        .map(|n| n["body"]["deadline_ms"].as_i64().unwrap())
        .collect();
    assert!(ends.contains(&leaving), "{notices}");
    let err = cli(&poly, &["pools", "add-slot", &theirs, &reserved["poly"][0]])
        .await
        .unwrap_err();
    assert!(err.contains("dissolved"), "{err}");
    controller_clock.advance_ms(60_000);
    cli(&uni, &["pools", "cycle", &merged]).await.unwrap();
    let shown = cli(&uni, &["pools", "show", &merged]).await.unwrap();
    assert_eq!(shown["slots"].as_array().unwrap().len(), 2, "{shown}");
    assert_eq!(shown["entities"].as_array().unwrap().len(), 1, "{shown}");
    let err = cli(&pat, &["pools", "show", &merged]).await.unwrap_err();
    assert!(err.contains("404"), "pat left with poly: {err}");
    let again = cli(&poly, &["pools", "create", "poly-2"]).await.unwrap();
    let again = again["id"].as_str().unwrap().to_owned();
    cli(&poly, &["pools", "add-slot", &again, &reserved["poly"][0]])
        .await
        .expect("its slot is its own again");
}
