//! Fleet pages: agents by status (admins every one, a provider its own hosts), one
//! agent with its inventory, sessions and validation runs; admins order a validation
//! and follow it live, and revoke.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::response::Redirect;
use axum::routing::get;
use maud::{Markup, html};
use surplus_api::agents::AgentView;
use surplus_api::validation::{RunView, ValidationOptions};
use surplus_market::records::{AgentStatus, Role, RunStatus};
use surplus_protocol::bench::BenchReport;
use surplus_protocol::control::CompatLevel;
use surplus_protocol::security::{CheckStatus, SecurityReport};

use super::view::{action, ago, bytes, labels, page, time, time_or_dash};
use super::{Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, agents, validation};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/fleet", get(fleet))
        .route("/console/agents/{id}", get(agent))
        .route(
            "/console/agents/{id}/revoke",
            get(revoke_confirm).post(revoke),
        )
        .route(
            "/console/agents/{id}/validation",
            axum::routing::post(order_validation),
        )
        .route("/console/validations/{run}", get(validation_run))
}

/// Rows of the fleet table per page.
const PAGE_ROWS: usize = 100;

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct FleetQuery {
    /// `online`, `unreachable`, `revoked`, `enrolled`; empty: all.
    status: String,
    /// A part of the hostname, the id, or a label `k=v`.
    q: String,
    /// `yes` (hosts with a GPU), `no`; empty: all.
    gpu: String,
    /// A compatibility level (`fully`, `highly`, `somewhat`, `incompatible`), or
    /// `none` (never reported); empty: all.
    compat: String,
    /// `hostname`, `status`, `last_seen`, `cpus`, `memory`, `gpus`, `uptime`.
    sort: String,
    /// Page number from 1.
    page: String,
}

impl FleetQuery {
    fn link(&self, status: &str, sort: &str, page: usize) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("status", status),
            ("q", self.q.as_str()),
            ("gpu", self.gpu.as_str()),
            ("compat", self.compat.as_str()),
            ("sort", sort),
        ] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        if page > 1 {
            s.append_pair("page", &page.to_string());
        }
        format!("/console/fleet?{}", s.finish())
    }
}

fn status_text(a: &AgentView) -> &'static str {
    a.status.as_str()
}

/// The agent's compatibility level, `none` before its first report.
fn compat_text(a: &AgentView) -> String {
    a.compat_level
        .map_or_else(|| "none".into(), compat_level_text)
}

fn compat_level_text(level: CompatLevel) -> String {
    surplus_market::records::name_of(&level)
}

/// `2 × NVIDIA A100-SXM4-80GB`, `none`, or `-` before the first inventory.
fn gpus_text(a: &AgentView) -> String {
    match (a.gpus, &a.gpu) {
        (None, _) => "-".into(),
        (Some(0), _) => "none".into(),
        (Some(n), Some(model)) => format!("{n} × {model}"),
        (Some(n), None) => n.to_string(),
    }
}

async fn fleet(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Query(query): Query<FleetQuery>,
) -> Page {
    let asked: usize =
        match query.page.trim() {
            "" => 1,
            p => p.parse().ok().filter(|p| *p >= 1).ok_or_else(|| {
                PageError::bad_request(format!("page {p:?} is not a page number"))
            })?,
        };
    // The API's own listing does the filtering, sorting and paging (in the database).
    let api_query = |page_no: usize| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("status", query.status.trim()),
            ("q", query.q.trim()),
            ("gpu", query.gpu.trim()),
            ("compat", query.compat.trim()),
            (
                "sort",
                if query.sort.is_empty() {
                    "hostname"
                } else {
                    query.sort.as_str()
                },
            ),
        ] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        s.append_pair("limit", &PAGE_ROWS.to_string());
        s.append_pair(
            "offset",
            &(page_no - 1).saturating_mul(PAGE_ROWS).to_string(),
        );
        s.finish()
    };
    let mut listed = agents::agents_page(&ctl, &caller, Some(&api_query(asked))).await?;
    let pages = (listed.total as usize).div_ceil(PAGE_ROWS).max(1);
    let page_no = asked.min(pages);
    if page_no != asked {
        listed = agents::agents_page(&ctl, &caller, Some(&api_query(page_no))).await?;
    }
    let now = ctl.app.clock.now_ms();
    let count = |s: AgentStatus| {
        listed
            .by_status
            .iter()
            .find(|(status, _)| *status == s)
            .map_or(0, |(_, n)| *n)
    };
    let all: u64 = listed.by_status.iter().map(|(_, n)| n).sum();
    let status = query.status.trim().to_owned();
    let gpu = match query.gpu.as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    };
    let compat = query.compat.as_str();
    let shown = &listed.agents;
    let rows = shown.iter();
    let sort = query.sort.as_str();
    let heading = |key: &str, name: &str| {
        html! { th { a href=(query.link(&status, key, 1)) { (name) } } }
    };
    let title = if signed.principal.role == Role::Admin {
        "Fleet"
    } else {
        "My hosts"
    };
    Ok(page(
        title,
        &signed,
        html! {
            h1 { (title) }
            p.summary {
                @if let Some(n) = listed.connected { span { strong { (n) } " connected · " } }
                @for (i, s) in [AgentStatus::Online, AgentStatus::Unreachable, AgentStatus::Revoked, AgentStatus::Enrolled].into_iter().enumerate() {
                    @if i > 0 { " · " }
                    a href=(query.link(s.as_str(), sort, 1)) { strong { (count(s)) } " " (s.as_str()) }
                }
                " · " a href=(query.link("", sort, 1)) { strong { (all) } " in all" }
            }
            form.filters method="get" action="/console/fleet" {
                label for="q" { "Find" }
                input #q type="search" name="q" value=(query.q) placeholder="hostname, id or label k=v";
                label for="status" { "Status" }
                select #status name="status" {
                    option value="" selected[status.is_empty()] { "any" }
                    @for s in ["online", "unreachable", "revoked", "enrolled"] {
                        option value=(s) selected[status == s] { (s) }
                    }
                }
                label for="gpu" { "GPU" }
                select #gpu name="gpu" {
                    option value="" selected[gpu.is_none()] { "any" }
                    option value="yes" selected[gpu == Some(true)] { "with GPUs" }
                    option value="no" selected[gpu == Some(false)] { "without" }
                }
                label for="compat" { "Compatibility" }
                select #compat name="compat" {
                    option value="" selected[compat.is_empty()] { "any" }
                    @for c in ["fully", "highly", "somewhat", "incompatible", "none"] {
                        option value=(c) selected[compat == c] { (c) }
                    }
                }
                input type="hidden" name="sort" value=(sort);
                button type="submit" { "Filter" }
            }
            table #agents {
                thead { tr {
                    (heading("hostname", "Host")) (heading("status", "Status"))
                    (heading("cpus", "CPUs")) (heading("memory", "Memory")) (heading("gpus", "GPUs"))
                    th { "OS" } th { "Zone" }
                    (heading("uptime", "Uptime")) (heading("last_seen", "Last seen")) th { "Driver" }
                    th { "Compatibility" }
                } }
                tbody {
                    @for a in rows {
                        tr data-agent=(a.id) {
                            td { a href={ "/console/agents/" (a.id) } { (a.hostname) } }
                            td { span class={ "status " (status_text(a)) } { (status_text(a)) } }
                            td.num { (a.cpus.map_or("-".into(), |c| c.to_string())) }
                            td.num { (a.memory_bytes.map_or("-".into(), bytes)) }
                            td { (gpus_text(a)) }
                            td { (a.os.as_deref().unwrap_or("-")) }
                            td { (a.labels.get("zone").map_or("-", String::as_str)) }
                            td.num { (a.uptime_ratio.map_or("-".into(), |r| format!("{:.1}%", r * 100.0))) }
                            td { (a.last_seen_ms.map_or("never".into(), |t| ago(t, now))) }
                            td { (a.isolation.as_ref().map_or("-", |i| i.driver.as_str())) }
                            td { span class={ "compat " (compat_text(a)) } { (compat_text(a)) } }
                        }
                    }
                }
            }
            @if shown.is_empty() { p.empty { "No agent matches." } }
            @if pages > 1 {
                p.pages {
                    @if page_no > 1 { a href=(query.link(&status, sort, page_no - 1)) { "← previous" } " " }
                    "page " (page_no) " of " (pages) " (" (listed.total) " agents)"
                    @if page_no < pages { " " a href=(query.link(&status, sort, page_no + 1)) { "next →" } }
                }
            }
        },
    ))
}

async fn agent(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    let axum::Json(detail) =
        agents::show_agent(State(ctl.clone()), caller.clone(), Path(id.clone())).await?;
    let axum::Json(runs) =
        validation::agent_validations(State(ctl.clone()), caller.clone(), Path(id.clone())).await?;
    let compat =
        crate::http::control::agent_compat(State(ctl.clone()), caller.clone(), Path(id.clone()))
            .await;
    let axum::Json(metering) =
        crate::http::billing::get_metering(State(ctl.clone()), caller, Path(id)).await?;
    let (periods, spool) = (metering.periods, metering.spool);
    let a = &detail.agent;
    let now = ctl.app.clock.now_ms();
    Ok(page(
        &a.hostname,
        &signed,
        html! {
            h1 { (a.hostname) " " span class={ "status " (a.status.as_str()) } { (a.status.as_str()) } }
            div.actions {
                @if a.status != AgentStatus::Revoked && signed.principal.role == Role::Admin {
                    (action(&signed, &format!("/console/agents/{}/validation", a.id), "Order a quick validation", false))
                    " "
                    a.button.danger href={ "/console/agents/" (a.id) "/revoke" } { "Revoke…" }
                }
            }
            dl.facts {
                dt { "Agent" } dd { code { (a.id) } }
                dt { "Connected" } dd { (if a.connected { "yes" } else { "no" }) }
                dt { "Version" } dd { (a.agent_version) }
                dt { "CPUs / memory" } dd { (a.cpus.map_or("-".into(), |c| c.to_string())) " / " (a.memory_bytes.map_or("-".into(), bytes)) }
                dt { "OS" } dd { (a.os.as_deref().unwrap_or("-")) }
                dt { "GPUs" } dd { (gpus_text(a)) }
                dt { "Compatibility" } dd { (compat_text(a)) }
                dt { "Labels" } dd { (labels(&a.labels)) }
                dt { "Enrolled" } dd { (time(a.enrolled_at_ms)) }
                dt { "Last seen" } dd { (a.last_seen_ms.map_or("never".into(), |t| format!("{} ({})", time(t), ago(t, now)))) }
                dt { "Measured uptime" } dd { (a.uptime_ratio.map_or("-".into(), |r| format!("{:.2}%", r * 100.0))) " (" (a.online_ms / 1000) " s online)" }
                dt { "Usage" } dd { a href={ "/console/usage?agent=" (a.id) } { "the host and its instances, by hour" } }
                dt { "Certificate" } dd { "serial " code { (a.cert_serial) } ", valid until " (time(a.cert_not_after_ms)) }
                @if let Some(r) = a.revoked_at_ms { dt { "Revoked" } dd { (time(r)) } }
            }
            h2 { "Validation" }
            @if runs.history.is_empty() { p.empty { "No validation run yet." } }
            @else {
                table #runs {
                    thead { tr { th { "Run" } th { "Status" } th { "Ordered" } th { "By" } th { "Score" } th { "Hardening" } } }
                    tbody { @for r in &runs.history { tr {
                        td { a href={ "/console/validations/" (r.run.id) } { (r.run.id.to_string()[..8]) } }
                        td { span class={ "status " (r.run.status.as_str()) } { (r.run.status.as_str()) } }
                        td { (time(r.run.requested_at_ms)) }
                        td { (r.run.requested_by) }
                        td.num { (bench_of(r).map_or("-".into(), |b| format!("{:.2}", b.composite_score))) }
                        td.num { (security_of(r).map_or("-".into(), |s| format!("{} ({})", s.hardening_index, s.band))) }
                    } } }
                }
            }
            h2 { "Compatibility" }
            @match compat {
                Ok(axum::Json(view)) => {
                    @let r = &view.report;
                    dl.facts {
                        dt { "Level" } dd { span class={ "compat " (compat_level_text(r.level)) } { (compat_level_text(r.level)) } }
                        dt { "Driver" } dd { (r.driver) }
                        dt { "Ran" } dd { (time(r.ran_at_ms)) ", reported " (time(view.reported_at_ms)) }
                        dt { "Isolation" } dd {
                            (if r.isolation.own_user { "own user per instance" } else if r.isolation.host_user { "the agent's own user" } else { "-" })
                            (if r.isolation.capabilities_dropped { ", capabilities dropped" } else { "" })
                        }
                    }
                    table #compat-checks {
                        thead { tr { th { "Operation" } th { "Result" } th { "Why not" } } }
                        tbody { @for c in &r.checks { tr.fail[!c.passed] {
                            td { code { (c.operation) } } td { (if c.passed { "passed" } else { "failed" }) }
                            td { (c.message.as_deref().unwrap_or("")) }
                        } } }
                    }
                }
                Err(e) => { p.empty { (e.message()) } }
            }
            h2 { "Metering" }
            dl.facts {
                dt { "Periods" } dd {
                    @match periods {
                        None => { "the agent's defaults" }
                        Some(p) => {
                            "instances every " (humantime::format_duration(std::time::Duration::from_millis(p.instance_ms)))
                            ", the host every " (humantime::format_duration(std::time::Duration::from_millis(p.host_ms)))
                            ", subscriptions every " (humantime::format_duration(std::time::Duration::from_millis(p.subscription_ms)))
                        }
                    }
                }
                dt { "Spool" } dd {
                    @match spool {
                        None => { "not reported yet" }
                        Some(s) => {
                            (s.pending_records) " records waiting (" (bytes(s.bytes)) " on disk); "
                            (s.merged_records) " merged and " (s.discarded_records) " damaged records skipped since the agent started"
                        }
                    }
                }
            }
            h2 { "Sessions" }
            table #sessions {
                thead { tr { th { "Opened" } th { "Closed" } th { "Remote" } th { "Reason" } } }
                tbody { @for s in &detail.sessions { tr {
                    td { (time(s.started_at_ms)) } td { (time_or_dash(s.ended_at_ms)) }
                    td { (s.remote_addr) } td { (s.end_reason.as_deref().unwrap_or("")) }
                } } }
            }
            h2 { "Inventory" }
            @if detail.inventory_history.is_empty() { p.empty { "No inventory reported yet." } }
            @else {
                table #inventory-history {
                    thead { tr { th { "Changed" } th { "Digest" } } }
                    tbody { @for h in &detail.inventory_history { tr { td { (time(h.recorded_at_ms)) } td { code { (h.digest) } } } } }
                }
            }
            @if let Some(inv) = &detail.inventory { pre.json { (serde_json::to_string_pretty(inv).unwrap_or_default()) } }
        },
    ))
}

fn bench_of(r: &RunView) -> Option<BenchReport> {
    serde_json::from_value(r.run.bench.clone()?).ok()
}

fn security_of(r: &RunView) -> Option<SecurityReport> {
    serde_json::from_value(r.run.security.clone()?).ok()
}

async fn order_validation(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let options = ValidationOptions {
        quick: true,
        budget: "20s".into(),
        repetitions: 3,
        network_bytes: 1 << 20,
        ..ValidationOptions::default()
    };
    let (_, axum::Json(run)) =
        validation::order_validation(State(ctl), caller, Path(id), Ok(axum::Json(options))).await?;
    Ok(Redirect::to(&format!(
        "/console/validations/{}",
        run.run.id
    )))
}

async fn validation_run(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(run): Path<String>,
) -> Page {
    let axum::Json(r) = validation::show_validation(State(ctl), caller, Path(run)).await?;
    let running = r.run.status == RunStatus::Running;
    let body = html! {
        @if running { meta http-equiv="refresh" content="1"; }
        h1 { "Validation " code { (r.run.id.to_string()[..8]) } " " span #run-status class={ "status " (r.run.status.as_str()) } { (r.run.status.as_str()) } }
        p { "Agent " a href={ "/console/agents/" (r.run.agent_id) } { code { (r.run.agent_id) } } ", ordered by " (r.run.requested_by) " at " (time(r.run.requested_at_ms)) }
        @if let Some(p) = &r.progress {
            p #progress { progress max=(p.total) value=(p.done) {} " " (p.done) " of " (p.total) " steps · " (p.step) }
        }
        @if let Some(e) = &r.run.error { p.error role="alert" { (e) } }
        @if let Some(b) = bench_of(&r) { (bench_table(&b)) }
        @if let Some(s) = security_of(&r) { (security_table(&s)) }
    };
    Ok(page("Validation", &signed, body))
}

fn bench_table(b: &BenchReport) -> Markup {
    html! {
        h2 { "Benchmarks · composite score " (format!("{:.2}", b.composite_score)) }
        table #bench {
            thead { tr { th { "Measure" } th { "Value" } th { "Unit" } th { "CV" } th { "Score" } th { "Note" } } }
            tbody { @for m in &b.results { tr {
                td { (m.id) } td.num { (format!("{:.3}", m.value)) } td { (m.unit) }
                td.num { (format!("{:.1}%", m.cv * 100.0)) } td.num { (format!("{:.2}", m.score)) }
                td { (m.note.as_deref().unwrap_or("")) }
            } } }
        }
        @if !b.skipped.is_empty() { p.hint { "Skipped: " (b.skipped.join(", ")) } }
    }
}

fn security_table(s: &SecurityReport) -> Markup {
    html! {
        h2 { "Security · hardening index " (s.hardening_index) " (" (s.band) ")" }
        table #security {
            thead { tr { th { "Check" } th { "Severity" } th { "Status" } th { "Evidence" } th { "Fix" } } }
            tbody { @for f in &s.findings { tr class=(if f.status == CheckStatus::Fail { "fail" } else { "" }) {
                td { (f.title) } td { (format!("{:?}", f.severity).to_lowercase()) }
                td { (format!("{:?}", f.status).to_lowercase()) } td { (f.evidence) }
                td { (if f.status == CheckStatus::Fail { f.remediation.as_str() } else { "" }) }
            } } }
        }
    }
}

async fn revoke_confirm(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    let axum::Json(detail) = agents::show_agent(State(ctl), caller, Path(id)).await?;
    let a = &detail.agent;
    Ok(page(
        "Revoke",
        &signed,
        html! {
            h1 { "Revoke " (a.hostname) "?" }
            p { "The agent " code { (a.id) } " is cut off within seconds and can never connect again with its certificate; its instances stay on the host. This cannot be undone." }
            div.actions {
                (action(&signed, &format!("/console/agents/{}/revoke", a.id), "Revoke for good", true))
                " " a.button href={ "/console/agents/" (a.id) } { "Cancel" }
            }
        },
    ))
}

async fn revoke(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let axum::Json(a) = agents::revoke_agent(State(ctl), caller, Path(id)).await?;
    Ok(Redirect::to(&format!("/console/agents/{}", a.id)))
}
