//! The Grafana dashboards in `deploy/grafana/` ask only for metrics that exist: every
//! PromQL query of every panel (and of the dashboards' variables) is read, the metric
//! names it selects are taken out, and each is looked up in what a real controller and
//! a real agent expose at `/metrics`. A renamed or removed metric fails here, not on an
//! operator's empty graph.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use surplus_agent::Runner;
use surplus_protocol::clock;
use surplus_protocol::control::{Command, Filters};
use surplus_tests::TestController;
use tokio_util::sync::CancellationToken;

fn dashboard(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/grafana")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every query of a dashboard, with where it is: panel targets (rows' panels too) and
/// query variables.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!("panel {title:?}: a target without a PromQL expr: {target}")
                });
                out.push((format!("panel {title:?}"), expr.to_owned()));
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let q = var["query"]["query"]
                .as_str()
                .or(var["query"].as_str())
                .expect("a query variable has a query");
            out.push((format!("variable {}", var["name"]), q.to_owned()));
        }
    }
    out
}

/// PromQL words that are not metric names when not followed by `(`.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects: identifiers outside label matchers,
/// ranges, strings and grouping lists that are neither functions, operators nor
/// Grafana variables. `label_values(metric, label)` names its first argument.
fn metric_names(expr: &str) -> BTreeSet<String> {
    if let Some(inner) = expr
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    {
        let (metric, _label) = inner.rsplit_once(',').expect("label_values(metric, label)");
        return metric_names(metric);
    }
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| {
        let mut j = from;
        let mut quote = None;
        while j < chars.len() {
            match (quote, chars[j]) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), '\\') => j += 1,
                (Some(_), _) => {}
                (None, '"' | '\'' | '`') => quote = Some(chars[j]),
                (None, c) if c == close => return j + 1,
                _ => {}
            }
            j += 1;
        }
        panic!("unclosed {close:?} in {expr}")
    };
    let mut grouping = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            '(' if grouping => {
                grouping = false;
                i = skip_to(i + 1, ')');
            }
            '$' => {
                // A Grafana variable: $name or ${name}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i = skip_to(i + 1, '}');
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace());
                if matches!(
                    word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    grouping = true;
                } else if next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let check = |expr: &str, want: &[&str]| {
        let got: Vec<String> = metric_names(expr).into_iter().collect();
        assert_eq!(got, want, "{expr}");
    };
    check("up", &["up"]);
    check(
        "sum by (status) (surplus_agents{instance=~\"$instance\",status=\"a b\"})",
        &["surplus_agents"],
    );
    check(
        "sum by (action) (rate(a_total{x=\"}\"}[$__rate_interval])) / sum without (y) (rate(b_total[5m]))",
        &["a_total", "b_total"],
    );
    check("(expiry_seconds - time()) / 86400", &["expiry_seconds"]);
    check("count(c == 0) or vector(0)", &["c"]);
    check(
        "x * on (instance) group_left (version) info_metric",
        &["info_metric", "x"],
    );
    check("rate(x[1h] offset 1d) > bool 1e3", &["x"]);
    check(
        "label_values(surplus_agent_build_info, instance)",
        &["surplus_agent_build_info"],
    );
    check(
        "histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))",
        &["h_bucket"],
    );
}

/// Every sample name an exposition can hold: its samples, and each family's names by
/// type (`_total` of counters, `_info` of info metrics, `_bucket`, `_sum`, `_count` of
/// histograms), so a family that has no sample yet still counts.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "info" => &["_info"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

async fn get(url: &str) -> String {
    let r = reqwest::get(url).await.expect("metrics reachable");
    assert_eq!(r.status(), 200, "GET {url}");
    r.text().await.unwrap()
}

/// Fails with every query of `file` that names a metric `exposition` lacks; returns the
/// names the dashboard uses.
fn check_dashboard(file: &str, exposition: &str) -> BTreeSet<String> {
    let d = dashboard(file);
    let have = exposed(exposition);
    let queries = queries(&d);
    assert!(!queries.is_empty(), "{file} has no queries");
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for (place, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{file}, {place}: no metric in {expr}");
        for name in names {
            if !have.contains(&name) {
                missing.push(format!("{file}, {place}: {name} (in {expr})"));
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "dashboard queries name metrics that are not exposed:\n{}\n\nexposed:\n{}",
        missing.join("\n"),
        have.iter().cloned().collect::<Vec<_>>().join("\n")
    );
    used
}

#[tokio::test]
async fn every_dashboard_query_names_a_metric_the_controller_or_the_agent_exposes() {
    let tc = TestController::start().await;
    let (mut config, identity) = tc.enroll("grafana", &[]).await;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let runner = Runner::new(config, clock::system()).unwrap();
    let metrics = runner.metrics();
    let cancel = CancellationToken::new();
    let agent = tokio::spawn(runner.run(cancel.clone()));
    tc.until_connected("the agent", &[identity.agent_id]).await;
    let agent_url = format!(
        "http://{}/metrics",
        metrics.local_addr().expect("metrics_listen is on")
    );
    // A labelled family is exposed once it has a series. One control command makes
    // the agent's (and the controller's control families) real; the agent starts its
    // other labelled families at zero.
    tc.ctl()
        .control
        .agent_command(
            identity.agent_id,
            Command::DescribeInstances(Filters::default()),
        )
        .await
        .expect("the agent answers a description");
    let agent_text = get(&agent_url).await;
    // The controller's other labelled families count events this test does not cause
    // (refused frames, contradicting answers, ...): a zero series of each, through the
    // controller's own handles, makes its name appear as the controller writes it.
    let m = &tc.ctl().app.metrics;
    drop(m.enrollments.get_or_create(&vec![("outcome", "x")]));
    drop(m.inventory_reports.get_or_create(&vec![("result", "x")]));
    drop(m.frames_rejected.get_or_create(&vec![("reason", "x")]));
    drop(m.control_commands.get_or_create(&vec![("action", "x")]));
    drop(m.control_seconds.get_or_create(&vec![("action", "x")]));
    drop(m.usage_records.get_or_create(&vec![("result", "x")]));
    drop(m.spec_contradictions.get_or_create(&vec![("field", "x")]));
    let controller_text = get(&format!("{}/metrics", tc.url())).await;

    let used = check_dashboard("surplus-controller.json", &controller_text);
    assert!(used.iter().all(|n| n.starts_with("surplus_")), "{used:?}");
    let used = check_dashboard("surplus-agents.json", &agent_text);
    assert!(
        used.iter().all(|n| n.starts_with("surplus_agent_")),
        "{used:?}"
    );
    // And the agents' dashboard shows every family the agent exposes.
    let unshown: Vec<&str> = agent_text
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter(|l| exposed(l).is_disjoint(&used))
        .collect();
    assert!(
        unshown.is_empty(),
        "agent metrics without a panel in surplus-agents.json: {unshown:?}"
    );

    cancel.cancel();
    agent.await.unwrap().unwrap();
}
