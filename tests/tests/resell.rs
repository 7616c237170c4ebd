//! The resell pipeline end to end (issue 15): a provider submits requests over the API
//! naming its enrolled agents; the controller checks the preliminary criteria, orders
//! real validation runs on the agents of this host, judges the evidence, lists what
//! was accepted in the category the measurements imply and notifies the provider.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use surplus_controller::config::ControllerConfig;
use surplus_market::catalog::{Categories, Measured};
use surplus_protocol::clock;
use surplus_tests::{PATIENCE, RunningAgent, TestController, test_config};
use uuid::Uuid;

/// Quick validation runs: the pipeline is under test here, not the benchmarks.
fn config() -> ControllerConfig {
    let mut c = test_config();
    c.resell.validation.quick = true;
    c.resell.validation.repetitions = 1;
    c.resell.validation.budget = "120s".into();
    c.resell.validation.network_bytes = 1_000_000;
    c
}

struct Market {
    tc: TestController,
    bob: String,
}

impl Market {
    /// A controller with provider bob (zone bob-fra-1, accepted, an agreement for
    /// compute sold on demand or spot), carol (whose agreement ended) and dave (a
    /// provider token, never recorded).
    async fn start(config: ControllerConfig) -> Self {
        let tc = TestController::start_with(config, clock::system()).await;
        let now = clock::system().now_ms();
        for (account, valid_from, valid_until) in [
            ("bob", now - 1_000, now + 86_400_000),
            ("carol", now - 2 * 86_400_000, now - 86_400_000),
        ] {
            let (status, body) = tc
                .api_as(
                    &tc.admin_token,
                    Method::PUT,
                    &format!("/v1/providers/{account}"),
                    Some(json!({"name": account, "contact": format!("ops@{account}.example"), "zones": [format!("{account}-fra-1")], "accepted": true})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let (status, body) = tc
                .api_post(
                    "/v1/agreements",
                    json!({"provider": account, "valid_from_ms": valid_from, "valid_until_ms": valid_until,
                           "resource_kinds": ["compute"], "pricing_modes": ["on_demand", "spot"],
                           "commission_bps": 1500, "max_hosts": 10}),
                )
                .await;
            assert_eq!(status, 201, "{body}");
        }
        let bob = tc.token_for("bob", "provider").await;
        Self { tc, bob }
    }

    /// An agent of `provider` on this host, running, with its own scratch directory
    /// and `security_root`.
    async fn agent(
        &self,
        name: &str,
        provider: &str,
        security_root: Option<&std::path::Path>,
    ) -> (RunningAgent, tempfile::TempDir) {
        let scratch = tempfile::tempdir().unwrap();
        let (mut config, _) = self.tc.enroll(name, &[("provider", provider)]).await;
        config.bench_scratch_dir = scratch.path().to_path_buf();
        // Host usage every second: listings show their hosts' utilisation from it.
        config.metering.host_period = Duration::from_secs(1);
        if let Some(root) = security_root {
            config.security_root = root.to_path_buf();
        }
        let agent = RunningAgent::spawn(config, clock::system());
        self.tc.until_connected(name, &[agent.id]).await;
        (agent, scratch)
    }

    async fn submit(&self, token: &str, request: &Value) -> (u16, Value) {
        self.tc
            .api_as(
                token,
                Method::POST,
                "/v1/resell-requests",
                Some(request.clone()),
            )
            .await
    }

    /// Waits until request `id` is accepted or rejected and its provider notified.
    async fn settled(&self, token: &str, id: &str, patience: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let (status, body) = self
                .tc
                .api_as(
                    token,
                    Method::GET,
                    &format!("/v1/resell-requests/{id}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{body}");
            if body["pipeline"]["notified"] == true {
                return body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "request {id} did not settle: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A request for `hosts` claiming what `inventory` (this host's, as its agent reported
/// it) says, changed by `claim`.
fn request(hosts: &[Uuid], inventory: &Value, claim: impl FnOnce(&mut Value)) -> Value {
    let mut system = json!({
        "architecture": inventory["os"]["arch"].as_str().unwrap_or("x86_64"),
        "threads": inventory["cpu"]["logical_cpus"],
        "memory_bytes": inventory["memory"]["total_bytes"],
    });
    claim(&mut system);
    json!({
        "contact": "ops@bob.example",
        "resource_sets": [{
            "kind": "compute",
            "zone": "bob-fra-1",
            "hosts": hosts,
            "system": system,
            "compatibility": {"level": "bare_metal"}
        }],
        "pricing": {"modes": ["on_demand"], "currency": "EUR", "minimum_price": 20, "immediate_price": 35},
        "interruptibility": "no_interruptions",
        "goal": "maximise_utilisation"
    })
}

fn reasons(body: &Value) -> Vec<String> {
    body["pipeline"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_resells_this_host_and_learns_why_other_requests_were_refused() {
    let m = Market::start(config()).await;
    let tc = &m.tc;
    // Two agents of bob on this host: one as it is, one whose security checks read a
    // root with a second uid-0 account (a critical finding).
    let fixture = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(fixture.path().join("etc")).unwrap();
    std::fs::write(
        fixture.path().join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntoor:x:0:0:backdoor:/root:/bin/sh\n",
    )
    .unwrap();
    let (good, _s1) = m.agent("good", "bob", None).await;
    let (bad, _s2) = m.agent("bad", "bob", Some(fixture.path())).await;
    // This host's inventory, as its agent reported it.
    let inventory = {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let agent = tc.ctl().app.store.agent(good.id).await.unwrap().unwrap();
            if let Some(inv) = agent.inventory {
                break inv;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no inventory from the agent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // Bad documents are refused whole, every problem named by its field, and nothing
    // is stored; naming another provider's host is refused.
    let carol_id = tc
        .enroll("carol-host", &[("provider", "carol")])
        .await
        .1
        .agent_id;
    let mut bad_doc = request(&[good.id, carol_id, Uuid::now_v7()], &inventory, |_| {});
    bad_doc["pricing"]["currency"] = json!("euros");
    let (status, body) = m.submit(&m.bob, &bad_doc).await;
    assert_eq!(status, 400, "{body}");
    let fields: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"pricing.currency"), "{body}");
    assert!(
        fields.contains(&"resource_sets[0].hosts[1]"),
        "carol's host: {body}"
    );
    assert!(
        fields.contains(&"resource_sets[0].hosts[2]"),
        "an unknown host: {body}"
    );
    let (status, body) = m
        .submit(
            &m.bob,
            &json!({"contact": "x", "resource_sets": [{"kind": "quantum"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, listed) = tc
        .api_as(&m.bob, Method::GET, "/v1/resell-requests", None)
        .await;
    assert_eq!(listed, json!([]), "nothing stored from a refused document");

    // Preliminary rejections, each with its reason and without a validation run
    // (before the good host is validated: a host being validated is taken).
    let mut unsupported = request(&[good.id], &inventory, |s| {
        s["architecture"] = json!("sparc64")
    });
    unsupported["resource_sets"][0]["zone"] = json!("bob-fra-1");
    let mut auction = request(&[good.id], &inventory, |_| {});
    auction["pricing"]["modes"] = json!(["auction"]);
    let carol = tc.token_for("carol", "provider").await;
    let dave = tc.token_for("dave", "provider").await;
    let dave_id = tc
        .enroll("dave-host", &[("provider", "dave")])
        .await
        .1
        .agent_id;
    let mut carols = request(&[carol_id], &inventory, |_| {});
    carols["resource_sets"][0]["zone"] = json!("carol-fra-1");
    let daves = request(&[dave_id], &inventory, |_| {});
    // Erin's agreement allows one CPU thread; her host is claimed with this host's.
    let (status, body) = tc
        .api_as(
            &tc.admin_token,
            Method::PUT,
            "/v1/providers/erin",
            Some(json!({"name": "Erin", "contact": "ops@erin.example", "zones": ["erin-fra-1"], "accepted": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = tc
        .api_post(
            "/v1/agreements",
            json!({"provider": "erin", "valid_until_ms": i64::MAX / 2, "resource_kinds": ["compute"],
                   "pricing_modes": ["on_demand", "spot"], "commission_bps": 1500, "max_hosts": 10, "max_cpus": 1}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["max_cpus"], 1, "{body}");
    let erin = tc.token_for("erin", "provider").await;
    let erin_id = tc
        .enroll("erin-host", &[("provider", "erin")])
        .await
        .1
        .agent_id;
    let mut erins = request(&[erin_id], &inventory, |s| s["threads"] = json!(2));
    erins["resource_sets"][0]["zone"] = json!("erin-fra-1");
    for (token, doc, rule) in [
        (
            &m.bob,
            &unsupported,
            "platform (resource_sets[0].system.architecture)",
        ),
        (&m.bob, &auction, "pricing_mode (pricing.modes[0])"),
        (&carol, &carols, "agreement: the agreement ended at"),
        (&dave, &daves, "provider: the provider is not recorded"),
        (&erin, &erins, "max_cpus (resource_sets)"),
    ] {
        let (status, body) = m.submit(token, doc).await;
        assert_eq!(status, 202, "{body}");
        let id = body["id"].as_str().unwrap();
        let done = m.settled(token, id, PATIENCE).await;
        assert_eq!(done["stage"], "rejected", "{done:#}");
        let why = reasons(&done);
        assert!(why.iter().any(|r| r.starts_with(rule)), "{rule}: {why:?}");
        assert!(
            done["pipeline"]["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["run"].is_null()),
            "no host is validated after a preliminary rejection: {done:#}"
        );
    }

    // Requests on the good host one after another (a host is offered once: not while
    // another request is validating it, nor once a listing holds it), the bad host's
    // beside the first.
    let matching = request(&[good.id], &inventory, |_| {});
    let cores = inventory["cpu"]["logical_cpus"].as_u64().unwrap();
    let memory = inventory["memory"]["total_bytes"].as_u64().unwrap();
    let four_times_cores = request(&[good.id], &inventory, |s| s["threads"] = json!(cores * 4));
    let twice_memory = request(&[good.id], &inventory, |s| {
        s["memory_bytes"] = json!(memory * 2)
    });
    let critical = request(&[bad.id], &inventory, |_| {});
    let patience = Duration::from_secs(600);
    let submitted = |doc: &Value| {
        let (m, doc) = (&m, doc.clone());
        async move {
            let (status, body) = m.submit(&m.bob, &doc).await;
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["stage"], "preliminary", "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };
    let four_id = submitted(&four_times_cores).await;
    let critical_id = submitted(&critical).await;
    // Validating, the good host is taken: a second request for it is refused.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, r) = tc
            .api_as(
                &m.bob,
                Method::GET,
                &format!("/v1/resell-requests/{four_id}"),
                None,
            )
            .await;
        if r["stage"] != "preliminary" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{r:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = m.submit(&m.bob, &matching).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("resource_sets[0].hosts[0]")),
        "{body}"
    );
    m.settled(&m.bob, &four_id, patience).await;
    let twice_id = submitted(&twice_memory).await;
    m.settled(&m.bob, &twice_id, patience).await;
    let matching_id = submitted(&matching).await;
    let ids = [matching_id, four_id, twice_id, critical_id];

    // The validation runs end; the matching request is accepted, the others rejected
    // with claimed against measured values.
    let accepted = m.settled(&m.bob, &ids[0], patience).await;
    assert_eq!(accepted["stage"], "accepted", "{accepted:#}");
    let steps: Vec<&str> = accepted["pipeline"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["what"].as_str().unwrap())
        .collect();
    assert_eq!(steps[0], "submitted");
    assert!(steps.contains(&"preliminary criteria met"), "{steps:?}");
    assert!(
        steps.contains(&"listed") && steps.contains(&"provider notified"),
        "{steps:?}"
    );
    for (id, field) in [
        (&ids[1], "system.threads"),
        (&ids[2], "system.memory_bytes"),
    ] {
        let done = m.settled(&m.bob, id, patience).await;
        assert_eq!(done["stage"], "rejected", "{done:#}");
        let why = reasons(&done);
        assert!(
            why.iter()
                .any(|r| r.contains(&format!("spec {field}: claimed")) && r.contains("measured")),
            "{field}: {why:?}"
        );
    }
    let done = m.settled(&m.bob, &ids[3], patience).await;
    assert_eq!(done["stage"], "rejected", "{done:#}");
    assert!(
        reasons(&done)
            .iter()
            .any(|r| r.contains("critical_findings") && r.contains("accounts.extra_uid0")),
        "{:?}",
        reasons(&done)
    );

    // The listing is in the category the measurements imply, and a client finds it.
    let run: Uuid = accepted["pipeline"]["hosts"][0]["run"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, run) = tc.api_get(&format!("/v1/validations/{run}")).await;
    let measured = Measured {
        cores: inventory["cpu"]["logical_cpus"].as_u64().unwrap() as u32,
        memory_bytes: memory,
        score: run["bench"]["composite_score"].as_f64().unwrap(),
    };
    let want = Categories::standard()
        .classify(&measured)
        .map(|c| c.name.clone());
    let listing_ids = accepted["listings"].as_array().unwrap();
    assert_eq!(listing_ids.len(), 1, "{accepted:#}");
    let alice = tc.token_for("alice", "client").await;
    let (status, found) = tc
        .api_as(
            &alice,
            Method::GET,
            "/v1/listings?provider=bob&kind=compute&sort=price",
            None,
        )
        .await;
    assert_eq!(status, 200, "{found}");
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let l = &found[0];
    assert_eq!(&l["id"], &listing_ids[0]);
    assert_eq!(l["category"].as_str(), want.as_deref(), "{l:#}");
    assert_eq!(
        (
            l["zone"].as_str(),
            l["price"].as_u64(),
            l["available"].as_u64()
        ),
        (Some("bob-fra-1"), Some(35), Some(1))
    );
    assert_eq!(l["hosts"], json!([good.id]));
    assert_eq!(l["score"].as_f64(), Some(measured.score));
    // The listing's page: its host's evidence, and how busy its CPUs were from the
    // host's metering (which arrives within a few seconds).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (detail, utilisation) = loop {
        let (status, detail) = tc
            .api_as(
                &alice,
                Method::GET,
                &format!("/v1/listings/{}", l["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(status, 200, "{detail}");
        if let Some(u) = detail["listing"]["utilisation"].as_f64() {
            break (detail, u);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no utilisation from the host's metering: {detail:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let criteria = detail["evidence"][0]["assessment"]["criteria"]
        .as_array()
        .unwrap();
    assert!(
        criteria
            .iter()
            .any(|c| c["field"] == "system.threads" && c["passed"] == true),
        "{detail:#}"
    );
    assert!((0.0..=1.0).contains(&utilisation), "{utilisation}");
    // A filter the server does not understand is named, never ignored.
    let (status, body) = tc
        .api_as(&alice, Method::GET, "/v1/listings?colour=red", None)
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("colour")),
        "{body}"
    );
    let (_, none) = tc
        .api_as(&alice, Method::GET, "/v1/listings?pricing_mode=spot", None)
        .await;
    assert_eq!(none, json!([]));

    // One notice of each outcome per request, to bob only.
    let (status, notices) = tc
        .api_as(&m.bob, Method::GET, "/v1/notifications", None)
        .await;
    assert_eq!(status, 200, "{notices}");
    let notices = notices.as_array().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let kinds: Vec<&str> = notices
            .iter()
            .filter(|n| n["body"]["request"] == id.as_str())
            .map(|n| n["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [if i == 0 {
                "resell.accepted"
            } else {
                "resell.rejected"
            }],
            "{id}"
        );
    }
    let (_, theirs) = tc
        .api_as(&alice, Method::GET, "/v1/notifications", None)
        .await;
    assert_eq!(theirs, json!([]));
    // A provider reads only its own requests.
    let (status, _) = tc
        .api_as(
            &carol,
            Method::GET,
            &format!("/v1/resell-requests/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 403);

    // The same through the CLI: status in words, a TOML request, the search, the
    // notifications.
    let cli = |token: &str, args: &[&str], json: bool| {
        let mut cmd = tokio::process::Command::new(surplus_tests::bin("surplus"));
        cmd.args(["--controller", &tc.url(), "--token", token]);
        if json {
            cmd.arg("--json");
        }
        cmd.args(args)
            .env_remove("SURPLUS_CONFIG")
            .env("HOME", tc.root.path());
        async move {
            let out = cmd.output().await.expect("surplus runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (
                out.status.success(),
                text,
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (ok, text, err) = cli(&m.bob, &["resell", "status", &ids[1]], false).await;
    assert!(ok, "{err}");
    assert!(
        text.contains("rejected") && text.contains("system.threads") && text.contains("NO"),
        "{text}"
    );
    let toml_file = tc.root.path().join("request.toml");
    std::fs::write(
        &toml_file,
        format!(
            "contact = \"ops@bob.example\"\ninterruptibility = \"dont_care\"\ngoal = \"none\"\n\
             [pricing]\nmodes = [\"auction\"]\ncurrency = \"EUR\"\nminimum_price = 10\n\
             [[resource_sets]]\nkind = \"compute\"\nzone = \"bob-fra-1\"\nhosts = [\"{}\"]\n\
             compatibility = {{ level = \"bare_metal\" }}\n[resource_sets.system]\nthreads = 1\n",
            tc.enroll("bob-spare", &[("provider", "bob")])
                .await
                .1
                .agent_id
        ),
    )
    .unwrap();
    let (ok, text, err) = cli(
        &m.bob,
        &["resell", "submit", toml_file.to_str().unwrap()],
        true,
    )
    .await;
    assert!(ok, "{err}");
    let submitted: Value = serde_json::from_str(&text).unwrap();
    let done = m
        .settled(&m.bob, submitted["id"].as_str().unwrap(), PATIENCE)
        .await;
    assert!(
        reasons(&done).iter().any(|r| r.starts_with("pricing_mode")),
        "{done:#}"
    );
    let (ok, text, err) = cli(
        &alice,
        &["listings", "search", "--provider", "bob", "--sort", "score"],
        true,
    )
    .await;
    assert!(ok, "{err}");
    let found: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(found[0]["id"], l["id"], "{text}");
    let (ok, _, err) = cli(&alice, &["listings", "search", "--kind", "quantum"], false).await;
    assert!(!ok && err.contains("kind"), "{err}");
    let (ok, text, err) = cli(&m.bob, &["notifications"], false).await;
    assert!(
        ok && text.contains("resell.accepted") && text.contains("resell.rejected"),
        "{err}{text}"
    );

    // Quality maintenance: the host of the critical finding, cleaned up, is accepted;
    // a re-test after the finding came back delists it with an advisory, and one
    // after it was fixed again relists it.
    let passwd = fixture.path().join("etc/passwd");
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let (status, body) = m.submit(&m.bob, &critical).await;
    assert_eq!(status, 202, "{body}");
    let done = m
        .settled(&m.bob, body["id"].as_str().unwrap(), patience)
        .await;
    assert_eq!(done["stage"], "accepted", "{done:#}");
    let relisted_id = done["listings"][0].as_str().unwrap().to_owned();
    let retested = |since: i64| {
        let (tc, alice, id) = (&m.tc, &alice, &relisted_id);
        async move {
            let deadline = tokio::time::Instant::now() + patience;
            loop {
                let (_, v) = tc
                    .api_as(alice, Method::GET, &format!("/v1/listings/{id}"), None)
                    .await;
                if v["listing"]["last_retest_at_ms"]
                    .as_i64()
                    .is_some_and(|t| t > since)
                {
                    return v["listing"].clone();
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no re-test of {id}: {v:#}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\n",
    )
    .unwrap();
    let (ok, _, err) = cli(&m.bob, &["listings", "retest", &relisted_id], false).await;
    assert!(ok, "{err}");
    let after = retested(0).await;
    assert_eq!(
        (&after["listed"], &after["failed_retest"]),
        (&json!(false), &json!(true)),
        "{after:#}"
    );
    let (_, offered) = tc
        .api_as(&alice, Method::GET, "/v1/listings?provider=bob", None)
        .await;
    assert!(
        offered
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["id"] != relisted_id.as_str()),
        "a delisted listing is not offered: {offered}"
    );
    std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let (status, body) = tc
        .api_as(
            &m.bob,
            Method::POST,
            &format!("/v1/listings/{relisted_id}/retest"),
            None,
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let again = retested(after["last_retest_at_ms"].as_i64().unwrap()).await;
    assert_eq!(
        (&again["listed"], &again["failed_retest"]),
        (&json!(true), &json!(false)),
        "{again:#}"
    );
    let (_, notices) = tc
        .api_as(&m.bob, Method::GET, "/v1/notifications", None)
        .await;
    let about: Vec<&Value> = notices
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["body"]["listing"] == relisted_id.as_str())
        .collect();
    assert_eq!(
        about
            .iter()
            .map(|n| n["kind"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["listing.delisted", "listing.relisted"],
        "{notices:#}"
    );
    // The hosts' agents got the notices about them over their sessions.
    let on_host = |name: &str, kind: &'static str| {
        let file = tc
            .agent_dir(name)
            .join(surplus_agent::session::NOTICES_FILE);
        async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let kinds: Vec<String> = text
                    .lines()
                    .map(|l| {
                        serde_json::from_str::<Value>(l).unwrap()["kind"]
                            .as_str()
                            .unwrap()
                            .to_owned()
                    })
                    .collect();
                if kinds.iter().any(|k| k == kind) {
                    return kinds;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{kind} not on the host: {kinds:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let good_notices = on_host("good", "resell.accepted").await;
    assert!(
        good_notices.contains(&"resell.rejected".to_owned()),
        "{good_notices:?}"
    );
    let bad_notices = on_host("bad", "listing.relisted").await;
    assert!(
        bad_notices.contains(&"listing.delisted".to_owned()),
        "{bad_notices:?}"
    );
    let failed = &about[0]["body"]["failed"][0];
    assert_eq!(
        (
            failed["rule"].as_str(),
            failed["measured"].as_str(),
            failed["required"].as_str()
        ),
        (
            Some("critical_findings"),
            Some("accounts.extra_uid0"),
            Some("none")
        ),
        "the advisory names the test with measured against required"
    );
    good.stop().await;
    bad.stop().await;
}

/// A child process, killed (SIGKILL) when dropped.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API of a controller running as a process.
struct Remote {
    url: String,
    http: reqwest::Client,
}

impl Remote {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        match r.send().await {
            Ok(answer) => (
                answer.status().as_u16(),
                answer.json().await.unwrap_or(Value::Null),
            ),
            Err(_) => (0, Value::Null),
        }
    }

    /// Calls until `probe` takes the answer, at most `patience`.
    async fn until<T>(
        &self,
        what: &str,
        patience: Duration,
        token: &str,
        path: &str,
        mut probe: impl FnMut(u16, &Value) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let (status, body) = self.call(token, Method::GET, path, None).await;
            if let Some(v) = probe(status, &body) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {status} {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_pipeline_resumes_the_request_and_finishes_it_once() {
    use std::process::{Command, Stdio};
    use surplus_tests::{bin, free_tcp_port, free_udp_port};

    // The controller on PostgreSQL, as processes: what a SIGKILL leaves is what the
    // database holds.
    let database = surplus_tests::postgres::fresh_database().await;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("controller");
    let admin = surplus_tests::init_controller(&data, Some(&database));
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("controller.toml"))
        .unwrap();
    std::io::Write::write_all(
        &mut file,
        b"\n[resell.validation]\nquick = true\nrepetitions = 1\nbudget = \"120s\"\nnetwork_bytes = 1000000\n",
    )
    .unwrap();
    let http = free_tcp_port();
    let env = [
        (
            "SURPLUS_CONTROLLER_SESSION_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_ENROLL_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_PEER_LISTEN",
            format!("127.0.0.1:{}", free_udp_port()),
        ),
        (
            "SURPLUS_CONTROLLER_HTTP_LISTEN",
            format!("127.0.0.1:{http}"),
        ),
        ("SURPLUS_CONTROLLER_HEARTBEAT_INTERVAL", "500ms".into()),
    ];
    let serve = || {
        Process(
            Command::new(bin("surplus-controller"))
                .arg("--data-dir")
                .arg(&data)
                .arg("serve")
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .env_remove("RUST_LOG")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut controller = serve();
    let api = Remote {
        url: format!("http://127.0.0.1:{http}"),
        http: reqwest::Client::new(),
    };
    api.until("the API", PATIENCE, &admin, "/v1/health", |s, _| {
        (s == 200).then_some(())
    })
    .await;

    // Provider bob with an agreement and one agent of this host.
    let now = clock::system().now_ms();
    let (status, body) = api
        .call(&admin, Method::PUT, "/v1/providers/bob", Some(json!({"name": "Bob", "contact": "ops@bob.example", "zones": ["bob-fra-1"], "accepted": true})))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api
        .call(&admin, Method::POST, "/v1/agreements", Some(json!({"provider": "bob", "valid_until_ms": now + 86_400_000,
            "resource_kinds": ["compute"], "pricing_modes": ["on_demand"], "commission_bps": 1500, "max_hosts": 4})))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = api
        .call(
            &admin,
            Method::POST,
            "/v1/api-tokens",
            Some(json!({"account": "bob", "role": "provider"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let bob = body["token"].as_str().unwrap().to_owned();
    let (status, body) = api
        .call(
            &admin,
            Method::POST,
            "/v1/tokens",
            Some(json!({"labels": {"provider": "bob"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let agent_dir = root.path().join("agent");
    let out = Command::new(bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", body["token"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scratch = tempfile::tempdir().unwrap();
    let _agent = Process(
        Command::new(bin("surplus-agent"))
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("run")
            .env("SURPLUS_AGENT_RECONNECT_MIN", "100ms")
            .env("SURPLUS_AGENT_BENCH_SCRATCH_DIR", scratch.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (host, cpus, memory) = api
        .until(
            "the agent online with its inventory",
            Duration::from_secs(30),
            &admin,
            "/v1/agents",
            |_, list| {
                let a = list.as_array()?.first()?;
                (a["status"] == "online" && a["cpus"].is_u64()).then(|| {
                    (
                        a["id"].as_str().unwrap().parse::<Uuid>().unwrap(),
                        a["cpus"].clone(),
                        a["memory_bytes"].clone(),
                    )
                })
            },
        )
        .await;
    let inventory = json!({"cpu": {"logical_cpus": cpus}, "memory": {"total_bytes": memory}, "os": {"arch": std::env::consts::ARCH}});
    let (status, body) = api
        .call(
            &bob,
            Method::POST,
            "/v1/resell-requests",
            Some(request(&[host], &inventory, |_| {})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/resell-requests/{id}");

    // Killed while the host's validation run is going.
    let run = api
        .until("the validation run", PATIENCE, &bob, &path, |_, b| {
            b["pipeline"]["hosts"][0]["run"].as_str().map(str::to_owned)
        })
        .await;
    let (_, first) = api
        .call(&admin, Method::GET, &format!("/v1/validations/{run}"), None)
        .await;
    assert_eq!(
        first["status"], "running",
        "the run is going when the controller is killed: {first}"
    );
    controller.0.kill().unwrap();
    controller.0.wait().unwrap();
    controller = serve();

    // It resumes: the lost run is ordered again, judged, listed and notified once.
    let done = api
        .until(
            "the request to settle",
            Duration::from_secs(600),
            &bob,
            &path,
            |_, b| (b["pipeline"]["notified"] == true).then(|| b.clone()),
        )
        .await;
    assert_eq!(done["stage"], "accepted", "{done:#}");
    let h = &done["pipeline"]["hosts"][0];
    assert_eq!(h["attempts"], 2, "{done:#}");
    assert_ne!(h["run"].as_str(), Some(run.as_str()), "{done:#}");
    let steps: Vec<&str> = done["pipeline"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["what"].as_str().unwrap())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s.contains("lost (the controller stopped during the run)")),
        "{steps:?}"
    );
    assert_eq!(
        steps.iter().filter(|s| **s == "listed").count(),
        1,
        "{steps:?}"
    );
    let (_, listings) = api
        .call(&bob, Method::GET, "/v1/listings?provider=bob", None)
        .await;
    assert_eq!(listings.as_array().unwrap().len(), 1, "{listings}");
    assert_eq!(done["listings"], json!([listings[0]["id"]]));
    let (_, notices) = api.call(&bob, Method::GET, "/v1/notifications", None).await;
    let kinds: Vec<&str> = notices
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["resell.accepted"], "{notices}");
    drop(controller);
}

/// A webhook receiver on loopback that answers 500 to the first `failures` calls and
/// 200 after; every body it got, in order.
async fn flaky_receiver(failures: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/surplus", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let n = conn.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                }
            };
            let Some(body) = body else { continue };
            let n = {
                let mut g = seen.lock().unwrap();
                g.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                g.len()
            };
            let status = if n <= failures {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = conn
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_accounts_webhook_retried_with_backoff() {
    // The receiver is on loopback, which only an operator's setting allows.
    let mut c = config();
    c.webhook_allow_private = true;
    let m = Market::start(c).await;
    let tc = &m.tc;
    let (url, got) = flaky_receiver(2).await;
    let (status, body) = tc
        .api_as(
            &m.bob,
            Method::PUT,
            "/v1/webhook",
            Some(json!({"url": url})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A request outside bob's agreement: rejected before any validation, noticed.
    let host = tc
        .enroll("bob-host", &[("provider", "bob")])
        .await
        .1
        .agent_id;
    let inventory =
        json!({"cpu": {"logical_cpus": 1}, "memory": {"total_bytes": 1}, "os": {"arch": "x86_64"}});
    let mut doc = request(&[host], &inventory, |_| {});
    doc["pricing"]["modes"] = json!(["auction"]);
    let (status, body) = m.submit(&m.bob, &doc).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let notice = loop {
        let (_, list) = tc
            .api_as(&m.bob, Method::GET, "/v1/notifications", None)
            .await;
        if let Some(n) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["delivered_at_ms"].is_i64())
        {
            break n.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not delivered: {list:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let outcomes: Vec<&str> = notice["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["HTTP 500", "HTTP 500", "delivered"],
        "{notice:#}"
    );
    let at: Vec<i64> = notice["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["at_ms"].as_i64().unwrap())
        .collect();
    assert!(
        at[1] - at[0] >= 1_000 && at[2] - at[1] >= 2_000,
        "backoff doubles: {at:?}"
    );
    let bodies = got.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "{bodies:?}");
    assert!(
        bodies.iter().all(|b| b["key"] == notice["key"]
            && b["kind"] == "resell.rejected"
            && b["body"]["request"] == id.as_str()),
        "{bodies:?}"
    );
    // A webhook that is not http(s) is refused by name; removing it stops delivery.
    let (status, body) = tc
        .api_as(
            &m.bob,
            Method::PUT,
            "/v1/webhook",
            Some(json!({"url": "file:///etc/passwd"})),
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("url")),
        "{body}"
    );
    let (status, _) = tc
        .api_as(
            &m.bob,
            Method::PUT,
            "/v1/webhook",
            Some(json!({"url": null})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, w) = tc.api_as(&m.bob, Method::GET, "/v1/webhook", None).await;
    assert_eq!(w, json!({"url": null}));
    let out = tokio::process::Command::new(surplus_tests::bin("surplus"))
        .args([
            "--controller",
            &tc.url(),
            "--token",
            &m.bob,
            "webhook",
            "set",
            &url,
        ])
        .env_remove("SURPLUS_CONFIG")
        .env("HOME", tc.root.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, w) = tc.api_as(&m.bob, Method::GET, "/v1/webhook", None).await;
    assert_eq!(w["url"].as_str(), Some(url.as_str()));
}
