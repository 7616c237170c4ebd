//! Billing faults found by a hostile or careless client and provider, end to end: a
//! controller and a real agent (process driver) on one moved clock, so that hours
//! close when the test says.
//!
//! - a run covers closed whole hours in the past, waits for the hosts' usage (naming
//!   the agents) until a grace has passed, and bills usage that arrives later as an
//!   adjustment;
//! - no upfront fee for instances that never started;
//! - ModifyInstanceAttribute changes only the fields it names, and each part of a
//!   period is rated with the limits in force then;
//! - a provider's agent that answers with inflated limits changes neither the recorded
//!   spec nor the bill, and is counted and shown;
//! - a prepaid client without the upfront fee is refused with 402.

use std::time::Duration;

use serde_json::{Value, json};
use surplus_agent::control::DriverKind;
use surplus_controller::registry::RegistryEvent;
use surplus_protocol::clock::{Clock, ManualClock};
use surplus_protocol::usage::{Reading, SpoolState, Subject, UsageBatch, UsageRecord, meters};
use surplus_tests::{CgroupGuard, RunningAgent, TestController, control_config, test_config};
use uuid::Uuid;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

struct Billing {
    tc: TestController,
    clock: std::sync::Arc<ManualClock>,
    alice: String,
    agent_id: Uuid,
    agent_config: surplus_agent::AgentConfig,
}

impl Billing {
    async fn control(&self, token: &str, body: Value) -> (u16, Value) {
        self.tc
            .api_as(token, reqwest::Method::POST, "/v1/control", Some(body))
            .await
    }

    async fn bill(&self, from_ms: i64, to_ms: i64) -> (u16, Value) {
        self.tc
            .api_post(
                "/v1/billing/runs",
                json!({"from_ms": from_ms, "to_ms": to_ms}),
            )
            .await
    }

    /// Moves the clock to `at` and waits until the agent's usage up to `at` is stored:
    /// the agent samples every 50 ms and writes a record at each minute boundary.
    async fn step(&self, at: i64) {
        self.clock.set_ms(at);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let through = self
                .tc
                .ctl()
                .app
                .store
                .usage_through(self.agent_id)
                .await
                .unwrap();
            if through.is_some_and(|t| t >= at) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent's usage up to {at} did not arrive (through {through:?})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn agent(&self) -> RunningAgent {
        RunningAgent::spawn(self.agent_config.clone(), self.clock.clone())
    }
}

/// The limits an instance's host applies, as the kernel reads them back.
fn cgroup_value(parent: &str, id: &str, controller: &str, file: &str) -> String {
    std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}/{parent}/{id}/{file}"))
        .unwrap()
        .trim()
        .to_owned()
}

fn invoice_of(invoices: &Value, from_ms: i64) -> &Value {
    invoices
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["from_ms"] == from_ms)
        .unwrap_or_else(|| panic!("no invoice from {from_ms}: {invoices}"))
}

fn amount_of(invoice: &Value, meter: &str, kind: &str) -> i64 {
    invoice["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["meter"] == meter && l["kind"] == kind)
        .map(|l| l["amount"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_covers_closed_hours_waits_for_usage_and_bills_what_comes_late() {
    let tag = "billing";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    // Hours in the past (the certificates are made on this clock and checked on the
    // system's), moved by the test.
    let real = surplus_protocol::clock::SystemClock.now_ms();
    let h0 = (real - 6 * HOUR) / HOUR * HOUR;
    let clock = ManualClock::new(h0 + 10 * MIN);
    let mut config = test_config();
    config.billing_grace = Duration::from_secs(10 * 60);
    let tc = TestController::start_with(config, clock.clone()).await;
    let mut events = tc.events();
    let (mut agent_config, identity) = tc.enroll(tag, &[("provider", "bob")]).await;
    agent_config.control = control_config(DriverKind::Process, tag);
    agent_config.metering.instance_period = Duration::from_secs(60);
    agent_config.metering.host_period = Duration::from_secs(60);
    agent_config.metering.subscription_period = Duration::from_secs(60);
    agent_config.metering.resolution = Duration::from_millis(50);
    let agent_id = identity.agent_id;
    let alice = tc.token_for("alice", "client").await;
    // Bob's agreement sets the marketplace's commission on his sales: 25%, not the
    // configured default's 10%.
    let (st, body) = tc
        .api_as(&tc.admin_token, reqwest::Method::PUT, "/v1/providers/bob",
            Some(json!({"name": "Bob", "contact": "ops@bob.example", "zones": ["bob-1"], "accepted": true})))
        .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = tc
        .api_post("/v1/agreements", json!({"provider": "bob", "valid_from_ms": h0 - HOUR, "valid_until_ms": h0 + 100 * HOUR,
            "resource_kinds": ["compute"], "pricing_modes": ["on_demand"], "commission_bps": 2500, "max_hosts": 1}))
        .await;
    assert_eq!(st, 201, "{body}");
    let b = Billing {
        clock: clock.clone(),
        alice,
        agent_id,
        agent_config,
        tc,
    };
    let agent = b.agent();
    events
        .until("agent online", |e| *e == RegistryEvent::Online(agent_id))
        .await;
    let (st, plan) = b
        .tc
        .api_as(
            &b.tc.admin_token,
            reqwest::Method::PUT,
            &format!("/v1/agents/{agent_id}/price-plan"),
            Some(json!({"currency": "EUR", "per_instance_hour": 3_600, "per_vcpu_hour": 360_000, "upfront": 500})),
        )
        .await;
    assert_eq!(st, 200, "{plan}");

    // Two starts that fail (no command; a program that does not exist): no charge.
    let (st, e) = b.control(&b.alice, json!({"action": "RunInstances"})).await;
    assert_eq!((st, e["field"].as_str()), (400, Some("command")), "{e}");
    let (st, e) = b
        .control(
            &b.alice,
            json!({"action": "RunInstances", "command": ["/no/such/program"]}),
        )
        .await;
    assert_eq!(st, 502, "{e}");

    // The instance: 0.5 vCPU and 64 MiB from 0:10.
    let (st, run) = b
        .control(
            &b.alice,
            json!({"action": "RunInstances", "command": ["sleep", "86400"], "limits": {"millicpus": 500, "memory_bytes": 64 << 20}}),
        )
        .await;
    assert_eq!(st, 200, "{run}");
    let id = run["instances"][0]["id"].as_str().unwrap().to_owned();
    let parent = control_config(DriverKind::Process, tag)
        .process
        .cgroup_parent;

    // No run before the hour closes, nor over an absurd period.
    b.step(h0 + 30 * MIN).await;
    let (st, e) = b.bill(h0, h0 + HOUR).await;
    assert_eq!((st, e["field"].as_str()), (400, Some("from_ms")), "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("closed hours"),
        "{e}"
    );
    let (st, e) = b
        .bill(-9_223_372_036_800_000_000, 9_223_372_036_800_000_000)
        .await;
    assert_eq!(st, 400, "{e}");

    // At 0:30 the CPU limit goes to 1 vCPU; the memory limit stays.
    let (st, m) = b
        .control(
            &b.alice,
            json!({"action": "ModifyInstanceAttribute", "instance_id": id, "limits": {"millicpus": 1000}}),
        )
        .await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(
        m["attribute"]["value"]["limits"],
        json!({"millicpus": 1000, "memory_bytes": 64 << 20, "pids": null})
    );
    assert_eq!(
        cgroup_value(&parent, &id, "memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string(),
        "a modification of the CPU limit keeps the memory limit on the host"
    );
    assert_eq!(
        cgroup_value(&parent, &id, "cpu", "cpu.cfs_quota_us"),
        "100000"
    );

    // The agent goes away at 0:50 with its usage up to then delivered; the instance runs on.
    b.step(h0 + 50 * MIN).await;
    agent.stop().await;
    clock.set_ms(h0 + HOUR + 2 * MIN);
    let (st, e) = b.bill(h0, h0 + HOUR).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (409, Some("usage_pending")),
        "{e}"
    );
    assert_eq!(e["waiting_for"][0]["agent_id"], agent_id.to_string());
    assert_eq!(e["waiting_for"][0]["usage_through_ms"], h0 + 50 * MIN);
    assert_eq!(e["retry_after_ms"], h0 + HOUR + 10 * MIN);

    // Past the grace the hour is billed with what arrived: 40 minutes running, 20 at
    // 0.5 vCPU and 20 at 1 vCPU, and the upfront fee once, for the one that started.
    clock.set_ms(h0 + HOUR + 11 * MIN);
    let (st, run1) = b.bill(h0, h0 + HOUR).await;
    assert_eq!(st, 200, "{run1}");
    assert_eq!(
        (run1["posted"].as_u64(), run1["nothing_due"].as_u64()),
        (Some(1), Some(2)),
        "{run1}"
    );
    let (_, invoices) =
        b.tc.api_as(&b.alice, reqwest::Method::GET, "/v1/invoices", None)
            .await;
    let invoice = invoice_of(&invoices, h0);
    assert_eq!(amount_of(invoice, "upfront", "charge"), 500, "{invoice}");
    assert_eq!(
        amount_of(invoice, "instance_hours", "charge"),
        3_600 * 40 / 60
    );
    assert_eq!(
        amount_of(invoice, "vcpu_hours", "charge"),
        360_000 * (20 * 500 + 20 * 1000) / 60 / 1000,
        "each part of the hour rated with its own limit: {invoice}"
    );
    assert_eq!(invoice["totals"]["EUR"], 500 + 2_400 + 180_000);

    // The provider's agent comes back having rewritten its book: it claims 64 vCPU.
    let book = b
        .agent_config
        .data_dir
        .join(format!("control/instances/{id}.json"));
    let mut record: Value = serde_json::from_slice(&std::fs::read(&book).unwrap()).unwrap();
    record["spec"]["limits"]["millicpus"] = json!(64_000);
    std::fs::write(&book, serde_json::to_vec(&record).unwrap()).unwrap();
    clock.set_ms(h0 + HOUR + 12 * MIN);
    let agent = b.agent();
    events
        .until("agent back", |e| *e == RegistryEvent::Online(agent_id))
        .await;
    let (st, d) = b
        .control(
            &b.alice,
            json!({"action": "DescribeInstances", "ids": [id]}),
        )
        .await;
    assert_eq!(st, 200, "{d}");
    let seen = &d["instances"][0];
    assert_eq!(
        seen["spec"]["limits"]["millicpus"], 1000,
        "the recorded spec stays: {seen}"
    );
    assert!(
        seen["host_contradiction"]
            .as_str()
            .unwrap()
            .contains("64000"),
        "the contradiction is shown: {seen}"
    );
    let stored = b.tc.ctl().app.store.instance(&id).await.unwrap().unwrap();
    assert_eq!(stored.record.spec.limits.millicpus, Some(1000));
    let (_, attr) = b
        .control(
            &b.alice,
            json!({"action": "DescribeInstanceAttribute", "instance_id": id, "attribute": "limits"}),
        )
        .await;
    assert_eq!(
        attr["attribute"]["value"]["limits"]["millicpus"], 1000,
        "{attr}"
    );
    let metrics = reqwest::get(format!("{}/metrics", b.tc.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("surplus_instance_spec_contradictions_total{field=\"limits\"}")),
        "{metrics}"
    );

    // It meters on (the instance ran all along: the time it was away counts), then
    // leaves for good.
    b.step(h0 + HOUR + 20 * MIN).await;
    agent.stop().await;

    // Usage of the first hour that arrives after its run (an older spool of the host,
    // say): 10 more minutes running, billed by the next run as an adjustment.
    clock.set_ms(h0 + HOUR + 21 * MIN);
    let late = UsageRecord {
        epoch: 4_242,
        seq: 0,
        subject: Subject::Instance(id.clone()),
        meter: meters::STATE_MS_RUNNING.into(),
        start_ms: h0 + 50 * MIN,
        end_ms: h0 + HOUR,
        reading: Reading::Counter {
            generation: 4_242,
            total: 10 * MIN as u64,
        },
        samples: 1,
    };
    let ack =
        b.tc.ctl()
            .metering
            .ingest(
                agent_id,
                UsageBatch {
                    records: vec![late],
                    spool: SpoolState::default(),
                },
            )
            .await;
    assert!(format!("{ack:?}").contains("stored: 1"), "{ack:?}");

    // The second hour: past its grace, billed with the recorded 1 vCPU however much
    // the agent claims; the first hour's late usage comes with it.
    clock.set_ms(h0 + 2 * HOUR + 11 * MIN);
    let (st, run2) = b.bill(h0 + HOUR, h0 + 2 * HOUR).await;
    assert_eq!(st, 200, "{run2}");
    assert_eq!(run2["posted"], 1, "{run2}");
    let adjustments = run2["adjustments"].as_array().unwrap();
    assert_eq!(adjustments.len(), 1, "{run2}");
    assert_eq!(adjustments[0]["from_ms"], h0);
    assert_eq!(
        adjustments[0]["amount"],
        600 + 60_000,
        "10 minutes at 1 vCPU"
    );
    let (_, invoices) =
        b.tc.api_as(&b.alice, reqwest::Method::GET, "/v1/invoices", None)
            .await;
    let first = invoice_of(&invoices, h0);
    assert_eq!(
        amount_of(first, "instance_hours", "adjustment"),
        600,
        "{first}"
    );
    assert_eq!(first["totals"]["EUR"], 182_900 + 60_600);
    let second = invoice_of(&invoices, h0 + HOUR);
    let vcpu = amount_of(second, "vcpu_hours", "charge");
    let hours = amount_of(second, "instance_hours", "charge");
    assert_eq!(
        amount_of(second, "upfront", "charge"),
        0,
        "the upfront fee once"
    );
    assert_eq!(
        vcpu,
        hours * 100,
        "1 vCPU per hour running, not 64: {second}"
    );
    assert!(hours > 0, "{second}");

    // Again: nothing is posted twice, no adjustment repeats.
    let (st, again) = b.bill(h0 + HOUR, h0 + 2 * HOUR).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(
        (again["posted"].as_u64(), again["already_billed"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(
        again["adjustments"].as_array().unwrap().is_empty(),
        "{again}"
    );

    // Balances and the provider's statement agree with the invoices.
    let total = 182_900 + 60_600 + second["totals"]["EUR"].as_i64().unwrap();
    let (_, balances) = b.tc.api_get("/v1/ledger/balances").await;
    let balance = |account: &str| {
        balances
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["account"] == account)
            .and_then(|x| x["balance"].as_i64())
            .unwrap_or(0)
    };
    assert_eq!(balance("client:alice"), -total);
    assert_eq!(balance("provider:bob") + balance("marketplace"), total);
    assert!(
        (balance("marketplace") - total / 4).abs() <= 3,
        "bob's agreement's 25%, to the minor unit per posting: {} of {total}",
        balance("marketplace")
    );
    let (st, statement) = b.tc.api_get("/v1/statements?provider=bob").await;
    assert_eq!(
        (st, statement["net"]["EUR"].as_i64()),
        (200, Some(balance("provider:bob"))),
        "{statement}"
    );

    // The `surplus` CLI reads the same books through its typed bodies: a body the
    // server and the CLI disagreed on would fail here as an unexpected answer.
    let cli = |token: String, args: Vec<String>| {
        let url = b.tc.url();
        let home = b.tc.root.path().to_owned();
        async move {
            let out = tokio::process::Command::new(surplus_tests::bin("surplus"))
                .args(["--controller", &url, "--token", &token, "--json"])
                .args(&args)
                .env_remove("SURPLUS_CONFIG")
                .env("HOME", home)
                .output()
                .await
                .expect("surplus runs");
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            match out.status.success() {
                true => {
                    Ok(serde_json::from_slice::<Value>(&out.stdout).expect("--json prints JSON"))
                }
                false => Err(stderr),
            }
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let admin = b.tc.admin_token.clone();
    let listed = cli(b.alice.clone(), args(&["invoices", "list"]))
        .await
        .unwrap();
    assert_eq!(listed, invoices, "the CLI lists what the API does");
    let id = first["invoice_id"].as_str().unwrap();
    let shown = cli(b.alice.clone(), args(&["invoices", "show", id]))
        .await
        .unwrap();
    assert_eq!(&shown, first);
    // The client sees the same invoice in the console of a real browser.
    let mut browser = surplus_tests::browser::Browser::start("billing_invoice").await;
    let base = b.tc.url();
    browser
        .visit(&format!("{base}/console/invoices"), "sign-in")
        .await;
    browser.fill("#token", &b.alice).await;
    browser.click("button[type=submit]").await;
    assert_eq!(browser.url().await, "/console/invoices");
    browser.shot("invoices").await;
    let total_text = format!("{} EUR", first["totals"]["EUR"]);
    let row = browser.text(&format!("tr[data-invoice='{id}']")).await;
    assert!(row.contains(&total_text) && row.contains("alice"), "{row}");
    browser.click(&format!("tr[data-invoice='{id}'] a")).await;
    browser.shot("invoice").await;
    assert_eq!(browser.text("#invoice-total").await, total_text);
    let lines = browser.text("table.lines").await;
    for line in first["lines"].as_array().unwrap() {
        let instance = line["instance_id"].as_str().unwrap();
        let meter = line["meter"].as_str().unwrap();
        assert!(
            lines.contains(instance) && lines.contains(meter),
            "{meter} of {instance} in {lines}"
        );
    }
    browser.close().await;
    let by_cli = cli(admin.clone(), args(&["statements", "--provider", "bob"]))
        .await
        .unwrap();
    assert_eq!(by_cli, statement);
    let usage = cli(
        b.alice.clone(),
        args(&[
            "usage",
            "--from",
            &h0.to_string(),
            "--to",
            &(h0 + 2 * HOUR).to_string(),
        ]),
    )
    .await
    .unwrap();
    assert!(!usage["rows"].as_array().unwrap().is_empty(), "{usage}");
    // Money through the CLI: a payment settles alice's debt; a payout beyond what bob
    // earned is refused with the server's reason; a policy change is confirmed.
    let paid = cli(
        admin.clone(),
        args(&[
            "pay",
            "--account",
            "alice",
            "--currency",
            "EUR",
            "--amount",
            &total.to_string(),
            "--kind",
            "settlement",
            "--key",
            "cli-pay-1",
        ]),
    )
    .await
    .unwrap();
    assert_eq!(paid["result"], "posted", "{paid}");
    let balances = cli(
        admin.clone(),
        args(&["ledger", "balance", "--account", "client:alice"]),
    )
    .await
    .unwrap();
    assert_eq!(balances[0]["balance"], 0, "{balances}");
    let too_much = balance("provider:bob") + 1;
    let refused = cli(
        admin.clone(),
        args(&[
            "payout",
            "--account",
            "bob",
            "--currency",
            "EUR",
            "--amount",
            &too_much.to_string(),
            "--key",
            "cli-payout-1",
        ]),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("insufficient_funds"), "{refused}");
    let policy = cli(
        admin.clone(),
        args(&["ledger", "policy", "client:alice", "--prepaid"]),
    )
    .await
    .unwrap();
    assert_eq!(
        policy,
        json!({"account": "client:alice", "allow_negative": false})
    );
    // (Its host is gone; the cgroup guard ends what it left running.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepaid_client_without_the_upfront_fee_is_refused_402() {
    let tag = "prepaid";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    let tc = TestController::start().await;
    let mut events = tc.events();
    let (mut config, identity) = tc.enroll(tag, &[("provider", "bob")]).await;
    config.control = control_config(DriverKind::Process, tag);
    let _agent = RunningAgent::spawn(config, surplus_protocol::clock::system());
    events
        .until("agent online", |e| {
            *e == RegistryEvent::Online(identity.agent_id)
        })
        .await;
    let carol = tc.token_for("carol", "client").await;
    let put = |path: String, body: Value| {
        let tc = &tc;
        async move {
            tc.api_as(&tc.admin_token, reqwest::Method::PUT, &path, Some(body))
                .await
        }
    };
    let (st, _) = put(
        format!("/v1/agents/{}/price-plan", identity.agent_id),
        json!({"currency": "EUR", "per_instance_hour": 100, "upfront": 500}),
    )
    .await;
    assert_eq!(st, 200);
    let (st, _) = put(
        "/v1/ledger/accounts/client:carol".into(),
        json!({"allow_negative": false}),
    )
    .await;
    assert_eq!(st, 200);
    let run = json!({"action": "RunInstances", "command": ["sleep", "600"]});
    let control = |body: Value| {
        let (tc, carol) = (&tc, &carol);
        async move {
            tc.api_as(carol, reqwest::Method::POST, "/v1/control", Some(body))
                .await
        }
    };
    let (st, e) = control(run.clone()).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (402, Some("insufficient_funds")),
        "{e}"
    );
    assert_eq!(
        (e["balance"].as_i64(), e["needed"].as_i64()),
        (Some(0), Some(500)),
        "{e}"
    );
    let (_, list) = control(json!({"action": "DescribeInstances"})).await;
    assert_eq!(list["instances"], json!([]), "nothing was run: {list}");
    // With the fee paid in, it runs.
    let (st, _) = tc
        .api_post(
            "/v1/payments",
            json!({"account": "carol", "currency": "EUR", "amount": 500, "kind": "topup", "key": "carol-1"}),
        )
        .await;
    assert_eq!(st, 200);
    let (st, ok) = control(run).await;
    assert_eq!(st, 200, "{ok}");
    let id = ok["instances"][0]["id"].as_str().unwrap();
    control(json!({"action": "TerminateInstances", "ids": [id]})).await;
}
