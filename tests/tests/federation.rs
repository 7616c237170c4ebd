//! Federation between controllers (issue 18), end to end with real processes: a
//! broker and a host cloud peer over QUIC with mutual TLS (each pinning the other's
//! CA), the host cloud's agent meters a client's instance, its usage reaches the
//! broker exactly once through a SIGKILL of the broker, and a removed peer is cut off.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use surplus_agent::control::DriverKind;
use surplus_tests::{CgroupGuard, bin, control_config, free_tcp_port, free_udp_port};

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Child {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        self.0.wait().unwrap();
    }
}

/// One controller process with its data directory and ports.
struct Cloud {
    data: PathBuf,
    env: Vec<(&'static str, String)>,
    url: String,
    admin: String,
    http: reqwest::Client,
}

impl Cloud {
    fn init(root: &Path, name: &str) -> Self {
        let data = root.join(name);
        let http = free_tcp_port();
        let env = vec![
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
            ("SURPLUS_CONTROLLER_IDLE_TIMEOUT", "3s".into()),
            ("SURPLUS_CONTROLLER_PEER_USAGE_LAG", "1s".into()),
        ];
        let admin = surplus_tests::init_controller(&data, None);
        Self {
            data,
            env,
            url: format!("http://127.0.0.1:{http}"),
            admin,
            http: reqwest::Client::new(),
        }
    }

    fn serve(&self) -> Child {
        Child(
            Command::new(bin("surplus-controller"))
                .arg("--data-dir")
                .arg(&self.data)
                .arg("serve")
                .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
                .env("SURPLUS_CONTROLLER_LOG_FILTER", "info")
                .stdout(Stdio::null())
                // Its log, beside its data directory, for a failure to be read.
                .stderr(
                    std::fs::File::options()
                        .create(true)
                        .append(true)
                        .open(self.data.with_extension("log"))
                        .unwrap(),
                )
                .spawn()
                .unwrap(),
        )
    }

    /// `surplus-controller peer ARGS` on this controller's data directory.
    fn peer(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(bin("surplus-controller"))
            .arg("--data-dir")
            .arg(&self.data)
            .arg("peer")
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            r = r.json(&b);
        }
        match r.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    /// `surplus --json ARGS` against this controller as its admin.
    fn cli(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new(bin("surplus"))
            .args(["--controller", &self.url, "--token", &self.admin, "--json"])
            .args(args)
            .env_remove("SURPLUS_CONFIG")
            .env("HOME", self.data.parent().unwrap())
            .output()
            .unwrap();
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).expect("--json prints JSON"))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let (st, v) = self
            .call(&self.admin, reqwest::Method::GET, path, None)
            .await;
        (st == 200).then_some(v)
    }

    async fn peer_view(&self, id: &str) -> Option<Value> {
        self.get("/v1/peers")
            .await?
            .as_array()?
            .iter()
            .find(|p| p["id"] == id)
            .cloned()
    }
}

/// Polls until `probe` gives `Some` (the processes are separate: no event to await).
async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The broker's peer that is not `other`.
async fn market_id_of(broker: &Cloud, other: &str) -> String {
    eventually("the second peer", Duration::from_secs(10), async || {
        broker
            .get("/v1/peers")
            .await?
            .as_array()?
            .iter()
            .find_map(|p| (p["id"] != other).then(|| p["id"].as_str().unwrap().to_owned()))
    })
    .await
}

/// An account's balance in EUR at `cloud` (0 when it has none).
async fn balance(cloud: &Cloud, account: &str) -> i64 {
    let all = cloud
        .get(&format!("/v1/ledger/balances?account={account}"))
        .await
        .unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .find(|b| b["currency"] == "EUR")
        .map_or(0, |b| b["balance"].as_i64().unwrap())
}

/// The controller id a controller's peer list shows for its one peer.
fn only_peer(list: &Value) -> Option<String> {
    list.as_array()?.first()?["id"].as_str().map(str::to_owned)
}

/// `user`'s minutes of `resource` as the broker holds them: minute → unit-ms.
fn minutes(rows: &Value, cloud: &str) -> std::collections::BTreeMap<i64, u64> {
    rows.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["cloud"] == cloud)
        .map(|r| {
            (
                r["minute_ms"].as_i64().unwrap(),
                r["unit_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_clouds_usage_reaches_its_broker_once_and_a_removed_peer_is_cut_off() {
    let root = tempfile::tempdir().unwrap();
    let broker = Cloud::init(root.path(), "broker");
    let host = Cloud::init(root.path(), "host");
    let market = Cloud::init(root.path(), "market");
    let mut broker_proc = broker.serve();
    let _host_proc = host.serve();
    let _market_proc = market.serve();
    for c in [&broker, &host, &market] {
        eventually("the API", Duration::from_secs(20), async || {
            c.get("/v1/peers").await
        })
        .await;
    }

    // Peering: a token the broker prints, joined by the host cloud.
    assert!(
        broker
            .peer(&["invite", "--role", "broker"])
            .unwrap_err()
            .contains("host-cloud or marketplace-cloud"),
        "a role the inviter cannot give is named"
    );
    let token = broker
        .peer(&["invite", "--role", "host-cloud", "--ttl", "5m"])
        .unwrap();
    assert!(token.starts_with("surplus-peer-1."), "{token}");
    let joined = host.peer(&["join", &token, "--name", "host-a"]).unwrap();
    assert!(joined.contains("host-cloud"), "{joined}");
    assert!(
        host.peer(&["join", &token])
            .unwrap_err()
            .contains("already used"),
        "a peering token is taken once"
    );
    let broker_id = only_peer(&host.get("/v1/peers").await.unwrap()).unwrap();
    let host_id = only_peer(&broker.get("/v1/peers").await.unwrap()).unwrap();
    let linked = eventually(
        "the link up on both sides",
        Duration::from_secs(20),
        async || {
            let (b, h) = (
                broker.peer_view(&host_id).await?,
                host.peer_view(&broker_id).await?,
            );
            (b["linked"] == true && h["linked"] == true).then_some((b, h))
        },
    )
    .await;
    assert_eq!(linked.0["role"], "host-cloud");
    assert_eq!(linked.1["role"], "broker");
    assert_eq!(linked.0["name"], "host-a");

    // A client of the host cloud runs an instance on the host cloud's agent.
    let (st, made) = host
        .call(
            &host.admin,
            reqwest::Method::POST,
            "/v1/tokens",
            Some(json!({})),
        )
        .await;
    assert_eq!(st, 201, "{made}");
    let agent_dir = root.path().join("agent");
    let out = Command::new(bin("surplus-agent"))
        .arg("--data-dir")
        .arg(&agent_dir)
        .args(["enroll", "--token", made["token"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parent = control_config(DriverKind::Process, "federation")
        .process
        .cgroup_parent;
    let _cgroups = CgroupGuard(parent.clone());
    let config = root.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "reconnect_min = \"50ms\"\nreconnect_max = \"300ms\"\nidle_timeout = \"3s\"\nkeep_alive = \"500ms\"\n\n\
             [control]\ndriver = \"process\"\nstop_grace = \"1s\"\n\n[control.process]\ncgroup_parent = \"{parent}\"\n\n\
             [metering]\ninstance_period = \"1s\"\nhost_period = \"5s\"\nsubscription_period = \"5s\"\n"
        ),
    )
    .unwrap();
    let _agent = Child(
        Command::new(bin("surplus-agent"))
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    eventually("the agent online", Duration::from_secs(30), async || {
        let list = host.get("/v1/agents").await?;
        (list.as_array()?.first()?["status"] == "online").then_some(())
    })
    .await;
    let (st, alice) = host
        .call(
            &host.admin,
            reqwest::Method::POST,
            "/v1/api-tokens",
            Some(json!({"account": "alice", "role": "client"})),
        )
        .await;
    assert_eq!(st, 201, "{alice}");
    let alice = alice["token"].as_str().unwrap().to_owned();
    let (st, run) = host
        .call(
            &alice,
            reqwest::Method::POST,
            "/v1/control",
            Some(json!({"action": "RunInstances", "command": ["/bin/sh", "-c", "sleep 600"]})),
        )
        .await;
    assert_eq!(st, 200, "{run}");

    // The host cloud shares alice's usage with the broker, where she is alice.host-a.
    assert!(
        host.peer(&["share", &host_id, "alice"])
            .unwrap_err()
            .contains("no peer")
    );
    host.peer(&["share", &broker_id, "alice", "--as", "alice.host-a"])
        .unwrap();
    let an_hour_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        - 3_600_000;
    let query =
        format!("/v1/brokerage/usage?user=alice.host-a&resource=os_instances&from={an_hour_ago}");
    let query = query.as_str();
    eventually(
        "alice's first minute at the broker",
        Duration::from_secs(150),
        async || {
            let rows = broker.get(query).await?;
            (!minutes(&rows, &host_id).is_empty()).then_some(())
        },
    )
    .await;

    // The broker dies without warning while the host cloud goes on making rows; the
    // host cloud redials and resends what was not acknowledged, the broker pulls
    // what it lacks, and each row counts once.
    broker_proc.kill9();
    let sent_while_down = eventually(
        "a row made while the broker is down",
        Duration::from_secs(90),
        async || {
            let h = host.peer_view(&broker_id).await?;
            (h["usage_sent"].as_u64()? > h["usage_acknowledged"].as_u64()?)
                .then_some(h["usage_sent"].as_u64()?)
        },
    )
    .await;
    broker_proc = broker.serve();
    let held = eventually(
        "every row at the broker",
        Duration::from_secs(60),
        async || {
            let b = broker.peer_view(&host_id).await?;
            let h = host.peer_view(&broker_id).await?;
            (b["usage_received"].as_u64()? >= sent_while_down
                && b["usage_received"] == h["usage_sent"]
                && h["usage_acknowledged"] == h["usage_sent"])
                .then_some(b)
        },
    )
    .await;
    assert_eq!(held["linked"], true);
    // Minute by minute, the broker holds exactly what the host cloud metered.
    let at_broker = minutes(&broker.get(query).await.unwrap(), &host_id);
    let local = minutes(
        &host
            .get(&format!(
                "/v1/brokerage/usage?user=alice&resource=os_instances&from={an_hour_ago}"
            ))
            .await
            .unwrap(),
        "local",
    );
    assert!(at_broker.len() >= 2, "{at_broker:?}");
    for (minute, units) in &at_broker {
        assert_eq!(
            local.get(minute),
            Some(units),
            "minute {minute}: broker {at_broker:?}, host {local:?}"
        );
        // Spread over the minutes by time, one instance runs about a minute per
        // minute (the agent's clock and the records' periods may differ by a little).
        assert!(
            *units <= 60_500,
            "one instance runs at most a minute per minute: {units}"
        );
    }

    // The broker's subscribers: alice at the host cloud, with no instance allowed
    // per minute (50 cents each over), and bob here, with two he does not use. Their
    // margins net across users and clouds, minute by minute (FIG. 4).
    let sub = |user: &str, limit: &str| {
        broker.cli(&[
            "subscriptions",
            "create",
            "--user",
            user,
            "--resource",
            "os_instances",
            "--period",
            "1m",
            "--limit",
            limit,
            "--overage-rate",
            "50",
            "--administrator",
            "acme",
        ])
    };
    sub("alice.host-a", "0").unwrap();
    let first = *at_broker.keys().next().unwrap();
    let last = *at_broker.keys().last().unwrap() + 60_000;
    let (from, until) = (first.to_string(), last.to_string());
    let window = [
        "--period",
        "1m",
        "--from",
        from.as_str(),
        "--until",
        until.as_str(),
    ];
    // Alone, alice's overage is acme's bill: posted through the ledger once.
    let over: u64 = at_broker.values().map(|u| u.div_ceil(60_000)).sum();
    let billed = broker
        .cli(&[&["brokerage", "bill"][..], &window[..]].concat())
        .unwrap();
    assert_eq!(billed[0]["amount"], json!(over * 50), "{billed}");
    assert_eq!(billed[0]["outcome"], "posted");
    let again = broker
        .cli(&[&["brokerage", "bill"][..], &window[..]].concat())
        .unwrap();
    assert_eq!(again[0]["outcome"], "duplicate", "a window is billed once");
    let balances = broker
        .get("/v1/ledger/balances?account=client:acme")
        .await
        .unwrap();
    assert!(
        balances.to_string().contains(&format!("-{}", over * 50)),
        "acme owes its overage: {balances}"
    );
    sub("bob", "2").unwrap();
    assert!(
        broker
            .cli(&[
                "subscriptions",
                "create",
                "--user",
                "carol",
                "--resource",
                "os_instances",
                "--period",
                "1m",
                "--limit",
                "1",
                "--overage-rate",
                "60",
                "--administrator",
                "acme"
            ])
            .unwrap_err()
            .contains("one rate"),
        "one resource and period nets at one rate"
    );
    let listed = broker.cli(&["subscriptions", "list"]).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let all = broker
        .cli(&[&["brokerage", "margins"][..], &window[..]].concat())
        .unwrap();
    assert!(
        all["clouds"].as_array().unwrap().contains(&json!(host_id)),
        "{all}"
    );
    let acme = &all["subscribers"][0];
    assert_eq!(acme["administrator"], "acme");
    let t = &acme["table"]["resources"][0];
    let users = t["users"].as_array().unwrap();
    let alice_row = users.iter().find(|u| u["user"] == "alice.host-a").unwrap();
    let bob_row = users.iter().find(|u| u["user"] == "bob").unwrap();
    for (i, (minute, units)) in at_broker.iter().enumerate() {
        assert_eq!(t["periods"][i], json!(minute));
        let used = units.div_ceil(60_000);
        assert_eq!(
            alice_row["cells"][i]["used"],
            json!(used),
            "minute {minute}"
        );
        assert_eq!(alice_row["cells"][i]["margin"], json!(used), "{alice_row}");
        assert_eq!(bob_row["cells"][i]["margin"], json!(-2));
        assert_eq!(
            t["net_margins"][i],
            json!(used as i64 - 2),
            "netted across users and clouds"
        );
        assert_eq!(
            t["offset_costs"][i],
            json!(0),
            "a net under-consumption costs nothing"
        );
        assert_eq!(t["excess_capacity"][i], json!(2));
    }
    let hers = broker
        .cli(
            &[
                &["brokerage", "margins", "--user", "alice.host-a"][..],
                &window[..],
            ]
            .concat(),
        )
        .unwrap();
    assert_eq!(
        hers["subscribers"][0]["billing"][0]["amount"],
        json!(over * 50),
        "{hers}"
    );
    assert_eq!(
        hers["subscribers"][0]["billing"][0]["administrator"],
        "acme"
    );

    // A bundle from what the subscribers leave unused: bob used none of his two, so
    // half of that (one instance) is estimated free over the coming ten minutes;
    // alice, over her limit, has nothing to give. One instance can be arranged; five
    // fall short by four over the whole interval.
    let start = (last + 600_000).to_string();
    let end = (last + 1_200_000).to_string();
    let plan = |amount: &str| {
        broker.cli(&[
            "brokerage",
            "bundle",
            "plan",
            "--resource",
            "os_instances",
            "--amount",
            amount,
            "--from",
            &start,
            "--until",
            &end,
            "--history",
            "1h",
            "--rate",
            "100",
        ])
    };
    let one = plan("1").unwrap();
    let contributions = one["arrangement"]["contributions"].as_array().unwrap();
    assert_eq!(contributions.len(), 1, "{one}");
    assert_eq!(contributions[0]["contributor"], "bob");
    assert_eq!(
        one["price"]["total"],
        json!(100 / 6 + 1),
        "an instance for 10 minutes at 100 an hour, rounded up"
    );
    // By the common interval of the subscribers' periods (one minute each) instead of
    // an end, with the longest intervals that hold one instance.
    let common = broker
        .cli(&[
            "brokerage",
            "bundle",
            "plan",
            "--resource",
            "os_instances",
            "--amount",
            "1",
            "--from",
            &start,
            "--interval",
            "common",
            "--hold-minimum",
            "1",
            "--history",
            "1h",
        ])
        .unwrap();
    assert_eq!(common["until"], json!(last + 600_000 + 60_000), "{common}");
    assert_eq!(
        common["intervals"],
        json!([{"from": last + 600_000, "until": last + 660_000}]),
        "{common}"
    );
    let five = plan("5").unwrap();
    assert!(five["arrangement"].is_null(), "{five}");
    let short = &five["shortfalls"][0];
    assert_eq!(
        (short["needed"].as_u64(), short["available"].as_u64()),
        (Some(5), Some(1)),
        "{five}"
    );
    assert_eq!(short["from"], json!(last + 600_000));
    assert_eq!(short["until"], json!(last + 1_200_000));

    // Alice's subscription grows to three instances: with her one running she leaves
    // two unused, as bob does. A marketplace cloud joins the broker and buys
    // instances from tenders at up to 5000 an hour. The broker tenders one instance
    // from each of them for the rest of this minute and the next two at 6000 an
    // hour: rejected, and recorded so on both sides.
    sub("alice.host-a", "3").unwrap();
    let token = broker
        .peer(&["invite", "--role", "marketplace-cloud"])
        .unwrap();
    market.peer(&["join", &token, "--name", "market"]).unwrap();
    let market_id = market_id_of(&broker, &host_id).await;
    eventually("the market's link", Duration::from_secs(20), async || {
        (broker.peer_view(&market_id).await?["linked"] == true).then_some(())
    })
    .await;
    let terms = |rate: &str| {
        market.cli(&[
            "brokerage",
            "terms",
            "set",
            "--resource",
            "os_instances",
            "--max-rate",
            rate,
            "--max-amount",
            "2",
            "--currency",
            "EUR",
        ])
    };
    terms("5000").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let from = now.div_euclid(60_000) * 60_000;
    let (start, end) = (from.to_string(), (from + 180_000).to_string());
    let tender = |to: &str| {
        broker.cli(&[
            "brokerage",
            "bundle",
            "tender",
            "--resource",
            "os_instances",
            "--amount",
            "2",
            "--from",
            &start,
            "--until",
            &end,
            "--history",
            "1h",
            "--rate",
            "6000",
            "--cloud",
            to,
        ])
    };
    assert!(
        tender(&host_id)
            .unwrap_err()
            .contains("not a marketplace cloud"),
        "a host cloud is not tendered to"
    );
    let acme_before = balance(&broker, "client:acme").await;
    let commission_before = balance(&broker, "marketplace").await;
    let rejected = tender(&market_id).unwrap();
    assert_eq!(
        rejected["price"],
        json!(600),
        "two instances, 3 minutes at 6000 an hour"
    );
    let t = &rejected["tenders"][0];
    assert_eq!(
        (t["state"].as_str(), t["accepted_amount"].as_u64()),
        (Some("rejected"), Some(0)),
        "{rejected}"
    );
    assert!(
        t["reason"]
            .as_str()
            .unwrap()
            .contains("above this cloud's 5000"),
        "{t}"
    );
    // At 6000 the marketplace cloud takes it; its answer is recorded on both sides.
    terms("6000").unwrap();
    let accepted = tender(&market_id).unwrap();
    let t = &accepted["tenders"][0];
    assert_eq!(
        (
            t["state"].as_str(),
            t["accepted_amount"].as_u64(),
            t["price"].as_u64()
        ),
        (Some("accepted"), Some(2), Some(600)),
        "{accepted}"
    );
    assert_eq!(accepted["placed"], json!(2));
    assert_eq!(accepted["contributors"]["bob"], "client:acme");
    assert_eq!(accepted["contributors"]["alice.host-a"], "client:acme");
    assert!(
        tender(&market_id)
            .unwrap_err()
            .contains("one bundle at a time"),
        "the same capacity is not tendered twice"
    );
    let received = market.cli(&["brokerage", "tenders"]).unwrap();
    let theirs: Vec<_> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap(),
                t["direction"].as_str().unwrap(),
                t["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        theirs.contains(&(t["id"].as_str().unwrap(), "in", "accepted")),
        "{received}"
    );
    assert!(
        theirs.contains(&(
            rejected["tenders"][0]["id"].as_str().unwrap(),
            "in",
            "rejected"
        )),
        "{received}"
    );

    // Alice's own demand rises to her whole limit: she takes back the instance she
    // contributed, and bob, with room beside his, stands in for it.
    for _ in 0..2 {
        let (st, run) = host
            .call(
                &alice,
                reqwest::Method::POST,
                "/v1/control",
                Some(json!({"action": "RunInstances", "command": ["/bin/sh", "-c", "sleep 600"]})),
            )
            .await;
        assert_eq!(st, 200, "{run}");
    }

    // When the interval ends (and its usage has arrived) the broker pays out: the
    // marketplace cloud's account pays the whole price (nothing fell short), the
    // marketplace keeps its 10% commission, and acme, both contributors'
    // administrator, gets the rest, once, with a report per contributor by what each
    // actually provided.
    let paid = eventually(
        "the bundle paid out",
        Duration::from_secs(300),
        async || {
            let bundles = broker.cli(&["brokerage", "bundle", "list"]).ok()?;
            let b = bundles
                .as_array()?
                .iter()
                .find(|b| b["id"] == accepted["id"])?
                .clone();
            b["settled_at_ms"].as_i64().map(|_| b)
        },
    )
    .await;
    assert!(paid["settled_at_ms"].as_i64().unwrap() >= from + 180_000);
    let minutes = paid["provision"]["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 3, "{paid}");
    assert!(
        minutes.iter().all(|m| m["short"] == 0),
        "bob covers what alice takes back: {paid}"
    );
    let last = &minutes[2];
    assert_eq!(
        last["kept"]["alice.host-a"], 0,
        "her own use comes first: {last}"
    );
    assert_eq!(last["substituted"]["bob"], 1, "bob stands in: {last}");
    assert_eq!(
        balance(&broker, &format!("client:peer-{market_id}")).await,
        -600
    );
    assert_eq!(balance(&broker, "client:acme").await, acme_before + 540);
    assert_eq!(
        balance(&broker, "marketplace").await,
        commission_before + 60
    );
    let (st, acme) = broker
        .call(
            &broker.admin,
            reqwest::Method::POST,
            "/v1/api-tokens",
            Some(json!({"account": "acme", "role": "client"})),
        )
        .await;
    assert_eq!(st, 201, "{acme}");
    let (st, notes) = broker
        .call(
            acme["token"].as_str().unwrap(),
            reqwest::Method::GET,
            "/v1/notifications",
            None,
        )
        .await;
    assert_eq!(st, 200);
    let report = |who: &str| {
        notes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["kind"] == "brokerage.contribution" && n["body"]["contributor"] == who)
            .unwrap_or_else(|| panic!("no report for {who}: {notes}"))["body"]
            .clone()
    };
    let (bob_report, alice_report) = (report("bob"), report("alice.host-a"));
    let held = |r: &Value| r["held_unit_ms"].as_str().unwrap().parse::<u64>().unwrap();
    // Bob held his own plan and stood in for alice for at least the last minute;
    // alice kept her instance for at most the first two (her own instances may have
    // needed all of her limit from the first).
    assert!(
        held(&bob_report) >= 240_000,
        "bob held more than his plan: {bob_report}"
    );
    assert!(
        held(&alice_report) <= 120_000,
        "alice less than hers: {alice_report}"
    );
    assert_eq!(
        held(&bob_report) + held(&alice_report),
        360_000,
        "two instances for three minutes in all"
    );
    assert_eq!(alice_report["planned"], true);
    assert_eq!(bob_report["paid_by_the_cloud"], json!(600));
    assert_eq!(
        bob_report["amount"].as_i64().unwrap() + alice_report["amount"].as_i64().unwrap(),
        540,
        "the shares are the payment less the commission"
    );
    assert!(bob_report["amount"].as_i64() > alice_report["amount"].as_i64());

    // The broker removes the host cloud: the link is cut within seconds and stays cut
    // though the host cloud keeps redialing.
    let removed = broker.peer(&["remove", &host_id]).unwrap();
    assert!(removed.contains("removed"), "{removed}");
    eventually(
        "the link cut on the host cloud's side",
        Duration::from_secs(10),
        async || (host.peer_view(&broker_id).await?["linked"] == false).then_some(()),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b = broker.peer_view(&host_id).await.unwrap();
    assert_eq!(
        (b["status"].as_str(), b["linked"].as_bool()),
        (Some("removed"), Some(false))
    );
    assert_eq!(
        host.peer_view(&broker_id).await.unwrap()["linked"],
        false,
        "redials are refused"
    );
    assert!(
        broker
            .peer(&["remove", &host_id])
            .unwrap_err()
            .contains("no active peer")
    );
    drop(broker_proc);
}
