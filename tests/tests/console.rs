//! The web console against a real controller and a real agent on loopback: its
//! security rules over plain HTTP, then a person's session in a real headless
//! Chromium (screenshots under `target/console-screenshots/`).

use std::time::Duration;

use surplus_agent::control::DriverKind;
use surplus_controller::config::ControllerConfig;
use surplus_controller::registry::RegistryEvent;
use surplus_protocol::clock;
use surplus_tests::browser::Browser;
use surplus_tests::{CgroupGuard, RunningAgent, TestController, control_config, test_config};

/// A client that keeps cookies and does not follow redirects, as a browser's first
/// request would see them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Signs in with `token`; the session cookie (`name=value`) and its attributes.
async fn sign_in(tc: &TestController, token: &str) -> (String, String) {
    let r = http()
        .post(format!("{}/console/sign-in", tc.url()))
        .form(&[("token", token), ("next", "/console/instances")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "signed in and sent on");
    assert_eq!(r.headers()["location"], "/console/instances");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let pair = set.split(';').next().unwrap().to_owned();
    (pair, set)
}

async fn page(cookie: &str, url: &str) -> (u16, String) {
    let r = http()
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The CSRF token of the first form on a page.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF token")
        + 19;
    html[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn sessions_cookies_csrf_and_headers_hold() {
    sessions_hold(TestController::start().await).await;
}

/// The same rules, and money through a form, with the controller's state on
/// PostgreSQL: the console is the API's handlers, on either backend.
#[tokio::test]
async fn sessions_cookies_csrf_and_headers_hold_on_postgres() {
    let config = ControllerConfig {
        database_url: surplus_tests::postgres::fresh_database().await,
        ..test_config()
    };
    sessions_hold(TestController::start_with(config, clock::system()).await).await;
}

async fn sessions_hold(tc: TestController) {
    let base = tc.url();

    // Not signed in: every page sends the browser to sign in, and back afterwards.
    let r = http()
        .get(format!("{base}/console/fleet?status=online"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/console/sign-in?next=%2Fconsole%2Ffleet%3Fstatus%3Donline"
    );
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // A method a page does not answer is a page too, naming the methods it does.
    for (method, path) in [
        (reqwest::Method::DELETE, "/console/fleet"),
        (reqwest::Method::GET, "/console/sign-out"),
    ] {
        let r = http()
            .request(method.clone(), format!("{base}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method} {path}");
        assert!(r.headers().contains_key("allow"), "{method} {path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html"),
            "{method} {path}"
        );
        let text = r.text().await.unwrap();
        assert!(
            text.contains(&format!("This page does not answer {method}.")),
            "{text}"
        );
    }

    // A wrong token is refused, and says so.
    let r = http()
        .post(format!("{base}/console/sign-in"))
        .form(&[("token", "spl_not-a-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Unknown or revoked API token")
    );

    // The session cookie cannot be read by scripts nor sent by other sites.
    let (cookie, attributes) = sign_in(&tc, &tc.admin_token).await;
    for a in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(attributes.contains(a), "{a} in {attributes}");
    }
    assert!(!attributes.contains("Secure"), "plain HTTP on loopback");
    let (status, fleet) = page(&cookie, &format!("{base}/console/fleet")).await;
    assert_eq!(status, 200, "{fleet}");
    let csrf = csrf_of(&fleet);
    let (status, body) = page(&cookie, &format!("{base}/console/fleet?page=x")).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("is not a page number") && body.contains("<!DOCTYPE html>"),
        "{body}"
    );
    for (query, why) in [
        ("gpu=maybe", "gpu \"maybe\" is not yes or no"),
        ("compat=great", "compat \"great\" is not fully"),
        ("sort=price", "sort \"price\" is not enrolled, hostname"),
    ] {
        let (status, body) = page(&cookie, &format!("{base}/console/fleet?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert!(
            body.contains(&why.replace('"', "&quot;")),
            "{query}: {body}"
        );
    }

    // A state-changing form without the session's CSRF token, or from another site,
    // changes nothing.
    let client = tc.token_for("alice", "client").await;
    let post = |form: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut r = http()
            .post(format!("{base}/console/instances"))
            .header("cookie", &cookie)
            .form(&form);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let run = vec![("command", "/bin/true".to_owned())];
    let r = post(run.clone(), None).await.unwrap();
    assert_eq!(r.status(), 403, "no CSRF token");
    let mut forged = run.clone();
    forged.push(("csrf", "guess".into()));
    assert_eq!(
        post(forged, None).await.unwrap().status(),
        403,
        "wrong CSRF token"
    );
    let mut cross = run.clone();
    cross.push(("csrf", csrf.clone()));
    let r = post(cross, Some("http://evil.example")).await.unwrap();
    assert_eq!(r.status(), 403, "another site's form");
    assert!(r.text().await.unwrap().contains("another site"));

    // Providers and their agreements: the admin sees them (a hostile name as text),
    // a client gets the API's refusal.
    let (status, made) = tc
        .api_as(
            &tc.admin_token,
            reqwest::Method::PUT,
            "/v1/providers/bob",
            Some(serde_json::json!({"name": "<script>alert(1)</script>", "contact": "ops@bob.example", "zones": ["bob-fra-1"], "accepted": true})),
        )
        .await;
    assert_eq!(status, 200, "{made}");
    let (status, made) = tc
        .api_post(
            "/v1/agreements",
            serde_json::json!({"provider": "bob", "valid_until_ms": i64::MAX / 2, "resource_kinds": ["compute"], "pricing_modes": ["spot"], "commission_bps": 1250, "max_hosts": 3}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let (status, body) = page(&cookie, &format!("{base}/console/providers")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !body.contains("<script>"),
        "{body}"
    );
    assert!(
        body.contains(made["id"].as_str().unwrap()) && body.contains("12.50%"),
        "{body}"
    );

    // A client's session sees what the API lets a client see: no fleet.
    let (client_cookie, _) = sign_in(&tc, &client).await;
    let (status, body) = page(&client_cookie, &format!("{base}/console/fleet")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("this needs the provider or the admin role"),
        "{body}"
    );
    let (status, _) = page(&client_cookie, &format!("{base}/console/providers")).await;
    assert_eq!(status, 403);
    let (status, _) = page(&client_cookie, &format!("{base}/console/instances")).await;
    assert_eq!(status, 200);

    // A payment recorded through the admin's form is in the ledger; a repeat of the
    // same reference is recognised, not posted twice.
    for _ in 0..2 {
        let r = http()
            .post(format!("{base}/console/payments"))
            .header("cookie", &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("account", "alice"),
                ("amount", "1200"),
                ("currency", "EUR"),
                ("key", "wire-1"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], "/console/balances");
    }
    let (status, body) = page(&client_cookie, &format!("{base}/console/balances")).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("client:alice") && body.contains(">1200<"),
        "{body}"
    );
    let (_, refused) = page(&client_cookie, &format!("{base}/console/statements")).await;
    assert!(
        refused.contains("statements are for providers"),
        "{refused}"
    );

    // Signing out ends the session on the server, not only in the browser.
    let r = http()
        .post(format!("{base}/console/sign-out"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (status, _) = page(&cookie, &format!("{base}/console/fleet")).await;
    assert_eq!(status, 303, "the old cookie no longer signs in");

    // Unknown console pages are pages, not the API's JSON.
    let (status, body) = page(&client_cookie, &format!("{base}/console/nowhere")).await;
    assert_eq!(status, 404);
    assert!(body.contains("<!DOCTYPE html>"), "{body}");
}

/// The processes on this host whose command line is exactly `argv`.
fn processes_running(argv: &[&str]) -> usize {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_a_real_browser() {
    let tag = "console";
    let _cgroups = CgroupGuard(
        control_config(DriverKind::Process, tag)
            .process
            .cgroup_parent,
    );
    // Quick validation runs for the resell pipeline: its pages are under test here.
    let mut config = test_config();
    config.resell.validation.quick = true;
    config.resell.validation.repetitions = 1;
    config.resell.validation.budget = "120s".into();
    config.resell.validation.network_bytes = 1_000_000;
    let tc = TestController::start_with(config, clock::system()).await;
    let mut events = tc.events();
    let (mut config, identity) = tc
        .enroll("console-host", &[("zone", "lab-1"), ("provider", "carol")])
        .await;
    // Another provider's host, enrolled and never connected.
    let (_, other) = tc.enroll("other-host", &[("provider", "dave")]).await;
    // A second host of carol's, enrolled and never connected (never revoked).
    let (_, spare) = tc.enroll("spare-host", &[("provider", "carol")]).await;
    config.control = control_config(DriverKind::Process, tag);
    // Usage arrives within a second, so that its chart can be seen.
    config.metering.instance_period = Duration::from_millis(200);
    config.metering.host_period = Duration::from_secs(1);
    config.metering.resolution = Duration::from_millis(100);
    let agent = RunningAgent::spawn(config, clock::system());
    let agent_id = identity.agent_id;
    events
        .until("agent online", |e| *e == RegistryEvent::Online(agent_id))
        .await;
    let base = tc.url();
    let mut b = Browser::start("a_session_in_a_real_browser").await;

    // Sign in as the admin: the console sends the browser where it was going.
    b.visit(&format!("{base}/console/fleet"), "sign-in").await;
    assert_eq!(b.url().await, "/console/sign-in");
    b.fill("#token", &tc.admin_token).await;
    b.click("button[type=submit]").await;
    assert_eq!(b.url().await, "/console/fleet");
    b.shot("fleet").await;
    let row = b.text(&format!("tr[data-agent='{agent_id}']")).await;
    assert!(row.contains("online") && row.contains("lab-1"), "{row}");
    assert!(b.text(".summary").await.contains("1 connected"));
    let other_row = b
        .text(&format!("tr[data-agent='{}']", other.agent_id))
        .await;
    assert!(other_row.contains("enrolled"), "{other_row}");

    // The agent's page; order a quick validation and follow it to its end.
    b.click(&format!("tr[data-agent='{agent_id}'] a")).await;
    assert_eq!(b.url().await, format!("/console/agents/{agent_id}"));
    b.shot("agent").await;
    assert!(b.text("h1").await.contains("online"));
    assert_eq!(
        b.count(".actions form, .actions a").await,
        2,
        "the admin's buttons: validation, revoke"
    );
    b.click(&format!(
        "form[action='/console/agents/{agent_id}/validation'] button"
    ))
    .await;
    assert!(b.url().await.starts_with("/console/validations/"));
    b.shot("validation-running").await;
    // The page refreshes itself while the run is under way.
    let status = b
        .until_text("#run-status", Duration::from_secs(120), |s| s != "running")
        .await;
    b.shot("validation-done").await;
    assert_eq!(status, "succeeded");
    let bench = b.text("#bench").await;
    assert!(bench.contains("CV") && bench.contains("Score"), "{bench}");
    assert!(b.text("h2").await.contains("composite score"));
    let security = b.text("#security").await;
    assert!(
        security.contains("Severity") && security.contains("Evidence"),
        "{security}"
    );

    // Run an instance from the form; it runs on the host.
    let argv = ["/bin/sleep", "6061"];
    b.visit(&format!("{base}/console/instances/new"), "run-form")
        .await;
    b.fill("#name", "from-the-console").await;
    b.fill("#command", &argv.join("\n")).await;
    b.fill("#cpus", "0.5").await;
    b.fill("#memory", "64MiB").await;
    b.fill("#labels", "team=<script>alert(1)</script>").await;
    b.click("form.stacked button[type=submit]").await;
    let path = b.url().await;
    let instance = path
        .strip_prefix("/console/instances/")
        .unwrap_or_else(|| panic!("sent to the new instance's page, not {path}"))
        .to_owned();
    b.shot("instance").await;
    assert_eq!(b.text("#state").await, "running");
    assert_eq!(
        processes_running(&argv),
        1,
        "the instance's process runs on the host"
    );
    // A hostile label is text.
    let facts = b.text("dl.facts").await;
    assert!(facts.contains("team=<script>alert(1)</script>"), "{facts}");

    // Stop it from its page: the host's process is gone.
    b.click(&format!(
        "form[action='/console/instances/{instance}/stop'] button"
    ))
    .await;
    b.until_text("#state", Duration::from_secs(20), |s| s == "stopped")
        .await;
    b.shot("stopped").await;
    assert_eq!(processes_running(&argv), 0, "stopped on the host");
    // Its usage, charted: how long it ran, per hour.
    b.visit(
        &format!("{base}/console/usage?instance={instance}"),
        "usage",
    )
    .await;
    let charts = b
        .until_text("main", Duration::from_secs(20), |t| {
            t.contains(&format!("{instance} · state_ms.running (seconds per hour)"))
        })
        .await;
    assert!(
        charts.contains(&format!("{instance} · cpu_ns (CPU-seconds per hour)")),
        "{charts}"
    );
    b.shot("usage").await;
    b.visit(&format!("{base}/console/instances"), "instances")
        .await;
    assert!(
        b.text(&format!("tr[data-instance='{instance}']"))
            .await
            .contains("stopped")
    );

    // The admin records a payment from the balances page; the ledger shows it.
    b.visit(&format!("{base}/console/balances"), "balances")
        .await;
    b.fill(
        "form[action='/console/payments'] input[name=account]",
        "bob",
    )
    .await;
    b.fill(
        "form[action='/console/payments'] input[name=amount]",
        "2500",
    )
    .await;
    b.fill(
        "form[action='/console/payments'] input[name=key]",
        "wire-77",
    )
    .await;
    b.click("form[action='/console/payments'] button").await;
    assert_eq!(
        b.url().await,
        "/console/balances",
        "{}",
        b.text("main").await
    );
    b.shot("paid").await;
    let balances = b.text("#balances").await;
    assert!(balances.contains("client:bob USD 2500"), "{balances}");

    // A volume's snapshot, taken from the volumes page, is listed with it.
    let (status, created) = tc
        .api_post(
            "/v1/control",
            serde_json::json!({"action": "CreateVolume", "size_bytes": 16 << 20, "agent_id": agent_id}),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let volume = created["volumes"][0]["id"].as_str().unwrap().to_owned();
    b.visit(&format!("{base}/console/volumes"), "volumes").await;
    let row = format!("tr[data-volume='{volume}']");
    assert_eq!(b.text(&format!("{row} td.snapshots")).await, "-");
    b.click(&format!("{row} button")).await;
    assert_eq!(b.url().await, "/console/volumes");
    b.shot("snapshot").await;
    let snapshots = b.text(&format!("{row} td.snapshots")).await;
    assert!(snapshots.starts_with("snap-"), "{snapshots}");

    // Carol offers her host in the resell center and watches the request reach
    // "accepted" as its validation runs on the host.
    // The admin records carol and her agreement from the providers page.
    b.visit(&format!("{base}/console/providers"), "providers")
        .await;
    b.fill("#account", "carol").await;
    b.fill("#name", "Carol").await;
    b.fill("#contact", "ops@carol.example").await;
    b.fill("#zones", "lab-1").await;
    b.client
        .find(fantoccini::Locator::Css(
            "#provider-form input[name=accepted]",
        ))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.click("#provider-form button[type=submit]").await;
    assert_eq!(
        b.url().await,
        "/console/providers",
        "{}",
        b.text("main").await
    );
    assert!(b.text("tr[data-provider='carol']").await.contains("lab-1"));
    b.fill("#commission_bps", "1200").await;
    b.fill("#max_hosts", "5").await;
    b.click("#agreement-form button[type=submit]").await;
    b.shot("agreement-made").await;
    let agreements = b.text("#agreements").await;
    assert!(
        agreements.contains("carol") && agreements.contains("12.00%"),
        "{agreements}"
    );
    let carol = tc.token_for("carol", "provider").await;
    b.click("header form button").await;
    b.fill("#token", &carol).await;
    b.click("button[type=submit]").await;
    b.visit(&format!("{base}/console/resell/new"), "resell-form")
        .await;
    b.client
        .find(fantoccini::Locator::Css(&format!(
            "input[name=host][value='{agent_id}']"
        )))
        .await
        .expect("carol's host is offered")
        .click()
        .await
        .unwrap();
    assert_eq!(
        b.count("input[name=host]").await,
        2,
        "carol's two hosts, not dave's"
    );
    b.fill("#threads", "1").await;
    b.fill("#minimum_price", "25").await;
    b.click("#resell-form button[type=submit]").await;
    let path = b.url().await;
    assert!(
        path.starts_with("/console/resell/"),
        "sent to the request's page, not {path}: {}",
        b.text("main").await
    );
    b.shot("resell-submitted").await;
    let stage = b
        .until_text("#stage", Duration::from_secs(300), |s| {
            s == "accepted" || s == "rejected"
        })
        .await;
    b.shot("resell-done").await;
    assert_eq!(stage, "accepted", "{}", b.text("main").await);
    let steps = b.text("#steps").await;
    assert!(
        steps.contains("preliminary criteria met") && steps.contains("provider notified"),
        "{steps}"
    );
    let listing = b.text("#listings a").await;
    assert!(listing.starts_with("lst-"), "{listing}");
    b.visit(&format!("{base}/console/notifications"), "provider-notices")
        .await;
    assert!(b.text("#notifications").await.contains("resell.accepted"));
    // A request the form gets wrong keeps the form, with the reason.
    b.visit(&format!("{base}/console/resell/new"), "resell-form-again")
        .await;
    b.fill("#threads", "many").await;
    b.click("#resell-form button[type=submit]").await;
    assert!(
        b.text(".error").await.contains("threads"),
        "{}",
        b.text("main").await
    );
    b.click("header form button").await;
    b.fill("#token", &tc.admin_token).await;
    b.click("button[type=submit]").await;

    // Revoking asks first, then cuts the agent off for good.
    b.visit(
        &format!("{base}/console/agents/{agent_id}/revoke"),
        "revoke-confirm",
    )
    .await;
    assert!(b.text("main").await.contains("This cannot be undone"));
    b.click("button.danger").await;
    assert_eq!(b.url().await, format!("/console/agents/{agent_id}"));
    b.shot("revoked").await;
    assert!(b.text("h1").await.contains("revoked"));

    // A client may not see the admin's instance: a 403 page, not an empty one.
    let client = tc.token_for("bob", "client").await;
    b.click("header form button").await;
    assert_eq!(b.url().await, "/console/sign-in");
    b.fill("#token", &client).await;
    b.click("button[type=submit]").await;
    b.visit(&format!("{base}/console/instances/{instance}"), "forbidden")
        .await;
    assert_eq!(b.title().await, "Not allowed · Surplus");
    assert!(b.text(".error").await.contains("belongs to another owner"));

    // The client sees its own money, not the others'.
    b.visit(&format!("{base}/console/balances"), "client-balances")
        .await;
    let balances = b.text("#balances").await;
    assert!(balances.contains("client:bob USD 2500"), "{balances}");
    assert!(!balances.contains("provider:"), "{balances}");

    // The client finds carol's listing and reads the evidence behind it.
    b.visit(
        &format!("{base}/console/listings?provider=carol"),
        "client-listings",
    )
    .await;
    let row = b.text(&format!("tr[data-listing='{listing}']")).await;
    assert!(row.contains("lab-1") && row.contains("25 EUR"), "{row}");
    b.click(&format!("tr[data-listing='{listing}'] a")).await;
    b.shot("client-listing").await;
    assert_eq!(b.url().await, format!("/console/listings/{listing}"));
    let evidence = b.text("table.criteria").await;
    assert!(
        evidence.contains("system.threads") && evidence.contains("hardening"),
        "{evidence}"
    );
    b.visit(
        &format!("{base}/console/listings?colour=red"),
        "client-listings-bad-filter",
    )
    .await;
    assert!(b.text(".error").await.contains("colour"));

    // The client buys: erin's host is on offer; bob reserves it from the offer's
    // page, sees it among his reservations and releases it; a quote he accepted is
    // on the pricing history's chart.
    let erin_host = surplus_tests::online_hosts(&tc, "erin", 1).await[0];
    surplus_tests::list_hosts(
        tc.ctl(),
        "lst-erin",
        "erin",
        &[erin_host],
        &[
            surplus_market::resell::PricingMode::Immediate,
            surplus_market::resell::PricingMode::OnDemand,
        ],
        (40, 30),
        surplus_market::resell::Interruptibility::NoInterruptions,
    )
    .await;
    b.visit(
        &format!("{base}/console/offers?rank_by=price"),
        "client-offers",
    )
    .await;
    let row = b.text("tr[data-listing='lst-erin']").await;
    assert!(
        row.contains("on_demand 40 EUR / h") && row.contains("holds"),
        "{row}"
    );
    b.click("tr[data-listing='lst-erin'] a").await;
    b.shot("client-offer").await;
    assert!(b.text("#available").await.contains("1 free now"));
    b.click("#reserve button[type=submit]").await;
    assert_eq!(b.url().await, "/console/reservations");
    b.shot("client-reservations").await;
    let reserved = b.text("#reservations tbody tr").await;
    assert!(
        reserved.contains("lst-erin") && reserved.contains("active"),
        "{reserved}"
    );
    b.click("#reservations tbody tr form button").await;
    assert_eq!(b.url().await, "/console/reservations");
    assert!(b.text("td.state").await.contains("released"));
    let (status, quote) = tc
        .api_as(
            &client,
            reqwest::Method::POST,
            "/v1/quotes",
            Some(serde_json::json!({"listing": "lst-erin"})),
        )
        .await;
    assert_eq!(status, 201, "{quote}");
    let (status, made) = tc
        .api_as(
            &client,
            reqwest::Method::POST,
            "/v1/reservations",
            Some(serde_json::json!({"listing": "lst-erin", "mode": "immediate", "quote": quote["id"]})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    b.visit(
        &format!("{base}/console/pricing?kind=quote"),
        "client-pricing",
    )
    .await;
    assert_eq!(b.count("#chart svg rect.range").await, 1, "one bucket");
    assert!(b.text("#guidance").await.contains("40 to 40"));
    // Another client's offer page shows it taken.
    b.visit(
        &format!("{base}/console/offers/lst-erin"),
        "client-offer-taken",
    )
    .await;
    assert!(b.text("#unavailable").await.contains("Not offered now"));

    // Spot and auctions: fay sells her host by both; bob bids on the spot market
    // from the offer's page (the minimum beside the form) and sees his bid; fay
    // auctions the host and bob buys it now from the auction's page, whose bids and
    // outcome show once it closed.
    let fay_host = surplus_tests::online_hosts(&tc, "fay", 1).await[0];
    surplus_tests::list_hosts(
        tc.ctl(),
        "lst-fay",
        "fay",
        &[fay_host],
        &[
            surplus_market::resell::PricingMode::Spot,
            surplus_market::resell::PricingMode::Auction,
        ],
        (40, 30),
        surplus_market::resell::Interruptibility::PriceBased,
    )
    .await;
    b.visit(
        &format!("{base}/console/offers/lst-fay"),
        "client-offer-spot",
    )
    .await;
    assert!(
        b.text("#spot").await.contains("Minimum 30 EUR"),
        "{}",
        b.text("#spot").await
    );
    assert!(
        b.text("#spot-guidance")
            .await
            .contains("minimum is the guide")
    );
    b.fill("#bid input[name=max_price]", "35").await;
    b.click("#bid button[type=submit]").await;
    assert_eq!(b.url().await, "/console/reservations");
    b.shot("client-bids").await;
    let bid_row = b.text("#bids tbody tr").await;
    assert!(
        bid_row.contains("lst-fay") && bid_row.contains("live") && bid_row.contains("35"),
        "{bid_row}"
    );
    let fay = tc.token_for("fay", "provider").await;
    let (status, auction) = tc
        .api_as(
            &fay,
            reqwest::Method::POST,
            "/v1/auctions",
            Some(serde_json::json!({
                "listing": "lst-fay",
                "kind": {"type": "english", "reserve": 40, "increment": 5, "buy_now": 60},
                "ends_at_ms": clock::system().now_ms() + 3_600_000,
            })),
        )
        .await;
    assert_eq!(status, 201, "{auction}");
    b.visit(&format!("{base}/console/auctions"), "client-auctions")
        .await;
    let row = b
        .text(&format!(
            "tr[data-auction='{}']",
            auction["id"].as_str().unwrap()
        ))
        .await;
    assert!(row.contains("English") && row.contains("open"), "{row}");
    b.click(&format!(
        "tr[data-auction='{}'] a",
        auction["id"].as_str().unwrap()
    ))
    .await;
    assert!(b.text("#lowest").await.contains("40 EUR"));
    b.fill("#bid input[name=amount]", "60").await;
    b.click("#bid button[type=submit]").await;
    b.shot("client-auction-closed").await;
    assert!(b.text("#auction-state").await.contains("closed"));
    assert!(
        b.text("#outcome").await.contains("bob won at 60 EUR"),
        "{}",
        b.text("#outcome").await
    );
    assert_eq!(b.count("#auction-bids tbody tr").await, 1);

    // Every role can read the API's reference, rendered from its OpenAPI document.
    b.visit(&format!("{base}/console/api"), "api-reference")
        .await;
    let reference = b.text("#op-control").await;
    assert!(reference.contains("POST /v1/control"), "{reference}");
    let schema = b.text("#schema-ErrorBody").await;
    assert!(schema.contains("message"), "{schema}");

    // Signed out, the console is closed.
    b.visit(&format!("{base}/console/instances"), "client-instances")
        .await;
    b.click("header form button").await;
    b.visit(&format!("{base}/console/instances"), "signed-out")
        .await;
    assert_eq!(b.url().await, "/console/sign-in");

    // A provider lands on its own hosts: carol sees hers (revoked above, with its
    // compatibility level), not dave's, and no admin's buttons on it.
    let now = clock::system().now_ms();
    tc.ctl()
        .app
        .store
        .save_compat_report(
            agent_id,
            &surplus_protocol::control::CompatReport {
                driver: "process".into(),
                level: surplus_protocol::control::CompatLevel::Highly,
                checks: Vec::new(),
                isolation: Default::default(),
                ran_at_ms: now,
            },
            now,
        )
        .await
        .unwrap();
    let carol = tc.token_for("carol", "provider").await;
    b.visit(&format!("{base}/console/"), "provider-sign-in")
        .await;
    b.fill("#token", &carol).await;
    b.click("button[type=submit]").await;
    assert_eq!(b.url().await, "/console/fleet");
    b.shot("provider-hosts").await;
    assert_eq!(b.title().await, "My hosts · Surplus");
    let hosts = b.text(&format!("tr[data-agent='{agent_id}']")).await;
    assert!(hosts.contains("highly"), "{hosts}");
    assert_eq!(b.count("#agents tbody tr").await, 2, "only carol's hosts");
    b.click(&format!("tr[data-agent='{agent_id}'] a")).await;
    b.shot("provider-host").await;
    let host = b.text("main").await;
    assert!(host.contains("Validation"), "{host}");
    assert!(host.contains("Level\nhighly"), "{host}");
    b.visit(
        &format!("{base}/console/agents/{}", spare.agent_id),
        "provider-spare-host",
    )
    .await;
    assert!(b.text("h1").await.contains("enrolled"));
    assert_eq!(
        b.count(".actions form, .actions a").await,
        0,
        "no admin's buttons"
    );
    b.visit(
        &format!("{base}/console/agents/{}", other.agent_id),
        "provider-other-host",
    )
    .await;
    assert_eq!(b.title().await, "Not allowed · Surplus");

    // Private pools: an owner builds one from its slots, a member bids in it.
    a_pool_is_built_and_bid_in(&mut b, &tc).await;

    // Brokerage: subscriptions, their margins laid out like FIG. 4, a bundle's plan.
    margins_and_a_bundle_are_drawn(&mut b, &tc).await;

    b.close().await;
    agent.stop().await;
}

/// Brokerage in the browser (issue 18, source 003 FIG. 4 and 5): the admin
/// subscribes two users of one subscriber from the form (a period the source does not
/// know is refused with the reason, the form kept); the margin table has a column per
/// minute, each user's row with its use and margin, and the net margin, offset cost
/// and excess capacity rows; a bundle of one instance over the coming hour is drawn
/// as a timeline with the contributor's bar, and one of nine is named short.
async fn margins_and_a_bundle_are_drawn(b: &mut Browser, tc: &TestController) {
    let base = tc.url();
    sign_in_as(b, &base, &tc.admin_token, "brokerage-sign-in").await;
    b.visit(
        &format!("{base}/console/brokerage?period=1m"),
        "brokerage-empty",
    )
    .await;
    assert!(b.text("header nav").await.contains("Brokerage"));
    assert_eq!(b.count("#subscriptions tbody tr").await, 0);
    let subscribe = async |b: &mut Browser, user: &str, limit: &str, period: &str| {
        b.fill("#subscribe input[name=user]", user).await;
        b.fill("#subscribe input[name=period]", period).await;
        b.fill("#subscribe input[name=limit]", limit).await;
        b.fill("#subscribe input[name=overage_rate]", "50").await;
        b.fill("#subscribe input[name=administrator]", "acme").await;
        b.click("#subscribe button[type=submit]").await;
    };
    subscribe(b, "erin", "2", "7m").await;
    b.shot("subscription-refused").await;
    assert!(
        b.text(".error").await.contains("period"),
        "{}",
        b.text("main").await
    );
    subscribe(b, "erin", "2", "1m").await;
    subscribe(b, "frank", "1", "1m").await;
    b.visit(
        &format!("{base}/console/brokerage?period=1m"),
        "brokerage-margins",
    )
    .await;
    assert_eq!(b.count("#subscriptions tbody tr").await, 2);
    // A day of minutes: one column each, plus the users' and the totals.
    let table = "table.margins[data-administrator=acme][data-resource=os_instances]";
    assert_eq!(b.count(&format!("{table} thead th")).await, 1 + 1440 + 1);
    assert_eq!(b.count(&format!("{table} tbody tr[data-user]")).await, 2);
    let erin = b.text(&format!("{table} tr[data-user=erin]")).await;
    assert!(erin.contains("0 (-2)"), "{erin}");
    let net = b.text(&format!("{table} tr.net")).await;
    assert!(net.contains("-3") && net.contains("-4320"), "netted: {net}");
    let excess = b.text(&format!("{table} tr.excess")).await;
    assert!(excess.contains("4320"), "{excess}");

    b.fill("#plan input[name=amount]", "1").await;
    b.fill("#plan input[name=starts_in]", "10").await;
    b.fill("#plan input[name=lasts]", "60").await;
    b.click("#plan button[type=submit]").await;
    b.shot("bundle-timeline").await;
    assert!(
        b.text("#plan-summary").await.contains("by 1 contributors"),
        "{}",
        b.text("main").await
    );
    assert_eq!(b.count("#timeline rect.contribution").await, 1);
    b.fill("#plan input[name=amount]", "9").await;
    b.click("#plan button[type=submit]").await;
    let short = b.text(".shortfall").await;
    assert!(
        short.contains("9 os_instances needed, 1 available"),
        "{short}"
    );

    // Gina leaves five instances unused but only lends them from three to four hours
    // from now (UTC, every day): the coming hour's bundle does not count on her; lent
    // at any time, it does.
    let minute_of_day = |offset_min: i64| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            / 60;
        let m = (now + offset_min).rem_euclid(1440);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    let later = format!("{}-{}", minute_of_day(180), minute_of_day(240));
    for (window, available) in [
        (later.as_str(), "1 available"),
        ("00:00-24:00", "3 available"),
    ] {
        b.fill("#subscribe input[name=availability]", window).await;
        subscribe(b, "gina", "5", "1m").await;
        let row = b.text("#subscriptions tbody").await;
        assert!(row.contains(&window.replace("-00:00", "-24:00")), "{row}");
        b.fill("#plan input[name=amount]", "9").await;
        b.click("#plan button[type=submit]").await;
        let short = b.text(".shortfall").await;
        assert!(short.contains(available), "{window}: {short}");
    }

    // A bundle tendered and a tender answered with a shortfall reported to it, as the
    // federation stores them, are listed with their state.
    use surplus_controller::store::{StoredBundle, StoredTender};
    let store = &tc.ctl().app.store;
    let offer = surplus_protocol::peer::TenderOffer {
        id: uuid::Uuid::now_v7(),
        resource: "os_instances".into(),
        amount: 2,
        from_ms: 1_800_000_000_000,
        until_ms: 1_800_000_600_000,
        price: 300,
        currency: "EUR".into(),
    };
    let bundle = StoredBundle {
        id: uuid::Uuid::now_v7(),
        resource: "os_instances".into(),
        amount: 2,
        from_ms: offer.from_ms,
        until_ms: offer.until_ms,
        price: 300,
        currency: "EUR".into(),
        arrangement: surplus_market::stagger::Arrangement {
            needs: Vec::new(),
            contributions: Vec::new(),
            sub_intervals: Vec::new(),
        },
        contributors: Default::default(),
        created_at_ms: 1,
        settled_at_ms: None,
        reported_through_ms: None,
    };
    store.create_bundle(&bundle).await.unwrap();
    let peer = uuid::Uuid::from_u128(77);
    store
        .put_tender(&StoredTender {
            offer: offer.clone(),
            direction: "in".into(),
            bundle: None,
            peer,
            state: "part".into(),
            accepted_amount: 1,
            price: 150,
            reason: Some("this cloud takes at most 1 units".into()),
            created_at_ms: 2,
            answered_at_ms: Some(2),
        })
        .await
        .unwrap();
    let gap = surplus_market::provision::Gap {
        from: offer.from_ms,
        until: offer.from_ms + 120_000,
        missing: 1,
    };
    assert!(
        store
            .tender_shortfall(offer.id, peer, gap, 3)
            .await
            .unwrap()
    );
    b.visit(
        &format!("{base}/console/brokerage?period=1m"),
        "brokerage-tenders",
    )
    .await;
    assert_eq!(b.count("#bundles tbody tr").await, 1);
    let row = b.text("#tenders tbody tr").await;
    assert!(row.contains("part") && row.contains("at most 1"), "{row}");
    assert!(row.contains("1 short"), "{row}");
}

/// Signs the browser in with `token` from the sign-in page.
async fn sign_in_as(b: &mut Browser, base: &str, token: &str, step: &str) {
    b.visit(&format!("{base}/console/sign-in"), step).await;
    b.fill("#token", token).await;
    b.click("button[type=submit]").await;
}

/// Chooses `value` in the select `css`, or ticks the checkbox `css`.
async fn pick(b: &Browser, css: &str) {
    b.client
        .find(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css:?}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Private pools in the browser (issue 17, source 001 FIG. 10-12): the client
/// account "uni" reserves two hosts; as pool owner it makes an English pool in its
/// own credits from the form (a Dutch one without a step is refused, the form kept),
/// finds the two reservations among its slots outside any pool and adds them one by
/// one, lets alice and brian in and issues alice credits. Alice opens the pool and
/// bids (one bid below the minimum is refused with the reason); the owner runs the
/// cycle; alice's request holds a slot on one of the hosts, and her usage shows.
async fn a_pool_is_built_and_bid_in(b: &mut Browser, tc: &TestController) {
    use surplus_market::resell::{Interruptibility, PricingMode};
    let base = tc.url();
    let gus = surplus_tests::online_hosts(tc, "gus", 2).await;
    surplus_tests::list_hosts(
        tc.ctl(),
        "lst-gus",
        "gus",
        &gus,
        &[PricingMode::OnDemand],
        (100, 100),
        Interruptibility::NoInterruptions,
    )
    .await;
    let uni_client = tc.token_for("uni", "client").await;
    let (status, reserved) = tc
        .api_as(
            &uni_client,
            reqwest::Method::POST,
            "/v1/reservations",
            Some(serde_json::json!({"listing": "lst-gus", "mode": "on_demand", "count": 2})),
        )
        .await;
    assert_eq!(status, 201, "{reserved}");
    let slots: Vec<String> = reserved
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reservation"]["id"].as_str().unwrap().to_owned())
        .collect();
    // The client account lets the pool owner pool what it holds.
    let (status, granted) = tc
        .api_as(
            &uni_client,
            reqwest::Method::POST,
            "/v1/pool-accounts",
            Some(serde_json::json!({"owner": "uni"})),
        )
        .await;
    assert_eq!(status, 204, "{granted}");

    // The owner makes the pool from the form; what the API refuses keeps the form.
    let uni = tc.token_for("uni", "pool_owner").await;
    sign_in_as(b, &base, &uni, "pool-owner-sign-in").await;
    b.visit(&format!("{base}/console/pools"), "pools-none")
        .await;
    assert!(b.text("header nav").await.contains("Pools"));
    assert_eq!(b.count("#pools tbody tr").await, 0);
    b.fill("#create-pool input[name=name]", "lab").await;
    pick(b, "#create-pool select[name=method] option[value=dutch]").await;
    b.click("#create-pool button[type=submit]").await;
    b.shot("pool-refused").await;
    assert!(
        b.text(".error").await.contains("step"),
        "{}",
        b.text("main").await
    );
    pick(b, "#create-pool select[name=method] option[value=english]").await;
    pick(
        b,
        "#create-pool select[name=currency_kind] option[value=credits]",
    )
    .await;
    b.fill("#create-pool input[name=minimum]", "5").await;
    b.fill("#create-pool input[name=maximum]", "1000").await;
    b.fill("#create-pool input[name=cycle_seconds]", "3600")
        .await;
    b.fill("#create-pool input[name=notice_seconds]", "60")
        .await;
    pick(b, "#create-pool input[name=preemptible]").await;
    assert_eq!(
        b.client
            .find(fantoccini::Locator::Css("#create-pool input[name=name]"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap()
            .as_deref(),
        Some("lab"),
        "the refused form kept what was typed"
    );
    b.click("#create-pool button[type=submit]").await;
    let path = b.url().await;
    let Some(pool) = path.strip_prefix("/console/pools/").map(str::to_owned) else {
        panic!(
            "sent to the pool's page, not {path}: {}",
            b.text("main").await
        );
    };
    b.shot("pool-created").await;
    // Its credits are a currency of its own, named by the pool.
    let (_, made) = tc
        .api_as(
            &uni,
            reqwest::Method::GET,
            &format!("/v1/pools/{pool}"),
            None,
        )
        .await;
    let lab = made["settings"]["currency"].as_str().unwrap().to_owned();
    assert!(lab.starts_with('P'), "{made}");
    let settings = b.text("#pool-settings").await;
    for want in [
        "English",
        &format!("{lab} (credits)"),
        &format!("5 {lab} / slot-hour"),
        &format!("1000 {lab}"),
        "preemptible: a better bid",
        "every 1 h; notice 1 min",
    ] {
        assert!(settings.contains(want), "{want} in {settings}");
    }

    // FIG. 10: its two reservations, outside any pool, added one by one.
    assert_eq!(b.count("#own-slots tbody tr").await, 2);
    assert_eq!(b.count("#pool-slots tbody tr").await, 0);
    let row = b
        .text(&format!("#own-slots tr[data-slot='{}']", slots[0]))
        .await;
    assert!(
        row.contains("lst-gus")
            && row.contains("small")
            && row.contains("gus-1")
            && row.contains("until released"),
        "{row}"
    );
    for (n, slot) in slots.iter().enumerate() {
        b.click(&format!("#own-slots tr[data-slot='{slot}'] button"))
            .await;
        assert_eq!(b.url().await, path, "{}", b.text("main").await);
        assert_eq!(b.count("#own-slots tbody tr").await, 1 - n);
        assert_eq!(b.count("#pool-slots tbody tr").await, n + 1);
        let pooled = b.text(&format!("#pool-slots tr[data-slot='{slot}']")).await;
        assert!(
            pooled.contains("reservation / on_demand") && pooled.contains("uni"),
            "{pooled}"
        );
    }
    b.shot("pool-slots").await;

    // FIG. 11: its users, and credits for alice.
    for (member, name) in [("alice", "Alice"), ("brian", "Brian")] {
        b.fill("#add-member input[name=member]", member).await;
        b.fill("#add-member input[name=name]", name).await;
        b.fill("#add-member input[name=organisation]", "Physics")
            .await;
        b.click("#add-member button").await;
        let row = b
            .text(&format!("#pool-members tr[data-member='{member}']"))
            .await;
        assert!(row.contains(name) && row.contains("Physics"), "{row}");
    }
    b.fill("#credit input[name=member]", "alice").await;
    b.fill("#credit input[name=amount]", "1000").await;
    b.click("#credit button").await;
    b.shot("pool-members").await;
    assert_eq!(
        b.text("#pool-members tr[data-member='alice'] td.balance")
            .await,
        format!("1000 {lab}")
    );

    // Alice finds the pool among hers and bids; below the minimum is refused.
    let alice = tc.token_for("alice", "client").await;
    sign_in_as(b, &base, &alice, "member-sign-in").await;
    b.visit(&format!("{base}/console/pools"), "member-pools")
        .await;
    let row = b.text(&format!("tr[data-pool='{pool}']")).await;
    assert!(row.contains("lab") && row.contains("uni"), "{row}");
    b.click(&format!("tr[data-pool='{pool}'] a")).await;
    assert_eq!(b.url().await, path);
    assert_eq!(b.count("#pool-slots tbody tr").await, 2);
    assert_eq!(
        b.count("#own-slots, #add-member, #cycle").await,
        0,
        "no owner's forms"
    );
    assert!(b.text("#my-balance").await.contains(&format!("1000 {lab}")));
    b.fill("#pool-bid input[name=bid]", "2").await;
    b.click("#pool-bid button").await;
    b.shot("member-bid-refused").await;
    let refused = b.text(".error").await;
    assert!(
        refused.contains("the bid 2 is below the pool's minimum 5"),
        "{refused}"
    );
    b.fill("#pool-bid input[name=count]", "1").await;
    b.fill("#pool-bid input[name=bid]", "10").await;
    b.click("#pool-bid button").await;
    assert_eq!(b.url().await, path, "{}", b.text("main").await);
    b.shot("member-bid").await;
    let request = b.text("#pool-requests tbody tr").await;
    assert!(
        request.contains("not yet cycled") && request.contains(&format!("10 {lab}")),
        "{request}"
    );

    // The owner runs the cycle; alice's request holds a slot on one of the hosts.
    sign_in_as(b, &base, &uni, "owner-again").await;
    b.visit(&format!("{base}{path}"), "owner-pool").await;
    b.click("#cycle button").await;
    assert_eq!(b.url().await, path, "{}", b.text("main").await);
    b.shot("owner-cycled").await;
    let request = b.text("#pool-requests tbody tr").await;
    assert!(
        request.contains("alice") && request.contains("holds"),
        "{request}"
    );
    assert!(b.text("#pool-usage").await.contains("alice"));
    assert!(b.text("#pool-slots").await.contains("alice"));

    sign_in_as(b, &base, &alice, "member-again").await;
    b.visit(&format!("{base}{path}"), "member-holds").await;
    let rule = b.text("#pool-requests tbody tr td.rule").await;
    assert_eq!(rule, "holds");
    let why = b.text("#pool-requests tbody tr td.why").await;
    assert!(why.contains("holds all 1 slots"), "{why}");
    let hosts = b.text("#pool-requests tbody tr td.hosts").await;
    assert!(
        gus.iter().any(|h| hosts.contains(&h.to_string())),
        "one of the lab hosts: {hosts}"
    );
    assert_eq!(
        b.count("#pool-usage tbody tr").await,
        1,
        "her own usage only"
    );
    let usage = b.text("#pool-usage tr[data-member='alice']").await;
    assert!(
        usage.contains("small") && usage.contains("bid 10"),
        "{usage}"
    );
}
