//! The market's pages (issue 15): the resell center, where a provider offers its hosts
//! and follows each request through validation to its outcome; the listings a client
//! searches, each with the validation evidence behind it (source 000 FIG. 7, 8); and
//! the caller's notifications. Every page reads through the API's handlers, so a page
//! shows what the API would answer the same caller.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use maud::{Markup, html};
use surplus_api::resell::{Assessment, ListingView, ResellRequest, ResellView};
use surplus_market::pipeline::Stage;
use surplus_market::records::{Role, name_of, names_of};

use super::view::{page, time};
use super::{Filled, FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, resell};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/resell", get(requests).post(submit))
        .route("/console/resell/new", get(new_request))
        .route("/console/resell/{id}", get(request))
        .route("/console/listings", get(listings))
        .route("/console/listings/{id}", get(listing))
        .route("/console/listings/{id}/retest", axum::routing::post(retest))
        .route("/console/ratings", axum::routing::post(rate))
        .route("/console/notifications", get(notifications))
}

fn stage_chip(stage: Stage) -> Markup {
    let name = name_of(&stage);
    let class = match stage {
        Stage::Accepted => "status succeeded",
        Stage::Rejected => "status failed",
        _ => "status running",
    };
    html! { span #stage class=(class) { (name) } }
}

async fn requests(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let axum::Json(list) = resell::list_requests(State(ctl), caller, RawQuery(None)).await?;
    Ok(page(
        "Resell center",
        &signed,
        html! {
            h1 { "Resell center" }
            p { a href="/console/resell/new" { "Offer hosts for resale" } }
            table #requests {
                thead { tr { th { "Request" } th { "Provider" } th { "Stage" } th { "Hosts" } th { "Listings" } th { "Submitted" } } }
                tbody { @for r in &list { tr data-request=(r.id) {
                    td { a href={ "/console/resell/" (r.id) } { code { (r.id.to_string()[..8]) } } }
                    td { (r.provider) }
                    td { span class={ "status " (match r.stage { Stage::Accepted => "succeeded", Stage::Rejected => "failed", _ => "running" }) } { (name_of(&r.stage)) } }
                    td.num { (r.pipeline.hosts.len()) }
                    td { @for l in &r.listings { a href={ "/console/listings/" (l) } { code { (l) } } " " } }
                    td { (time(r.created_at_ms)) }
                } } }
            }
            @if list.is_empty() { p.empty { "No resell request yet." } }
        },
    ))
}

async fn new_request(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    caller.require(Role::Provider)?;
    request_form(&ctl, &signed, &FormFields::default(), None).await
}

/// The most hosts the request form offers as boxes to tick (more are named in a
/// pasted document).
const HOSTS_SHOWN: u64 = 500;

/// The form of a resell request: one resource set as fields, or a whole document
/// (JSON or TOML) pasted in, for several sets and every FIG. 2 field.
async fn request_form(
    ctl: &Controller,
    signed: &Signed,
    f: &FormFields,
    error: Option<&str>,
) -> Result<Markup, PageError> {
    let me = &signed.principal;
    let provider = match me.role {
        Role::Admin => f.non_empty("provider").map(str::to_owned),
        _ => Some(me.account.clone()),
    };
    let profile = match &provider {
        Some(p) => ctl
            .app
            .store
            .provider(p)
            .await
            .map_err(crate::http::ApiError::from)?,
        None => None,
    };
    // The provider's own hosts (an admin: those of the provider it names), read a
    // page at a time from the database rather than every agent with its inventory.
    let filter = crate::store::AgentFilter {
        provider: match me.role {
            Role::Admin => provider.clone(),
            _ => Some(me.account.clone()),
        },
        sort: crate::store::AgentSort::Hostname,
        limit: Some(HOSTS_SHOWN),
        ..Default::default()
    };
    let hosts: Vec<_> = ctl
        .app
        .store
        .agent_page(&filter, ctl.app.clock.now_ms())
        .await
        .map_err(crate::http::ApiError::from)?
        .agents
        .into_iter()
        .map(|l| l.agent)
        .filter(|a| a.revoked_at_ms.is_none())
        .collect();
    let checked = f.all("host");
    let modes = f.all("mode");
    let v = |k: &str, default: &str| f.get(k).unwrap_or(default).to_owned();
    let zone_default = profile
        .as_ref()
        .and_then(|p| p.zones.first().cloned())
        .unwrap_or_default();
    let contact_default = profile
        .as_ref()
        .map(|p| p.contact.clone())
        .unwrap_or_default();
    let select = |name: &str, options: &[&str], default: &str| {
        let chosen = f.get(name).unwrap_or(default).to_owned();
        html! {
            select #(name) name=(name) {
                @for o in options { option value=(o) selected[*o == chosen] { (o) } }
            }
        }
    };
    Ok(page(
        "Offer hosts for resale",
        signed,
        html! {
            h1 { "Offer hosts for resale" }
            p.hint { "Your hosts are validated through their agents (benchmarks, security checks) and judged against what you claim here; what is accepted is listed in the size category its measurements imply." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form.stacked #resell-form method="post" action="/console/resell" {
                input type="hidden" name="csrf" value=(signed.csrf);
                @if me.role == Role::Admin {
                    label for="provider" { "Provider (the account the request is for)" }
                    input #provider name="provider" value=(v("provider", ""));
                }
                label for="contact" { "Contact" } input #contact name="contact" value=(v("contact", &contact_default));
                label for="kind" { "Kind" } (select("kind", &["compute", "storage", "bandwidth"], "compute"))
                label for="zone" {
                    "Zone (data center)"
                    @if let Some(p) = &profile { " · yours: " (p.zones.join(", ")) }
                }
                input #zone name="zone" value=(v("zone", &zone_default));
                fieldset #hosts {
                    legend { "Hosts (your enrolled agents)" }
                    @for a in &hosts {
                        label.check {
                            input type="checkbox" name="host" value=(a.id) checked[checked.contains(&a.id.to_string().as_str())];
                            " " (a.hostname) " " code { (a.id) } " · " (a.status.as_str())
                        }
                    }
                    @if hosts.is_empty() { p.empty { "No host is enrolled for you: enroll agents with a provider=ACCOUNT label." } }
                }
                label for="threads" { "Threads (logical CPUs) per host" } input #threads name="threads" value=(v("threads", "")) inputmode="numeric";
                label for="cores" { "Physical cores (optional)" } input #cores name="cores" value=(v("cores", "")) inputmode="numeric";
                label for="memory" { "Memory per host (optional), such as 16GiB" } input #memory name="memory" value=(v("memory", ""));
                label for="architecture" { "Architecture (optional)" } input #architecture name="architecture" value=(v("architecture", "")) placeholder="x86_64";
                label for="compatibility" { "Compatibility with the control interface" } (select("compatibility", &["full", "bare_metal"], "bare_metal"))
                fieldset #modes {
                    legend { "Pricing modes" }
                    @for m in ["on_demand", "spot", "auction", "immediate", "reserved"] {
                        label.check { input type="checkbox" name="mode" value=(m) checked[modes.contains(&m) || (modes.is_empty() && m == "on_demand")]; " " (m) }
                    }
                }
                label for="currency" { "Currency" } input #currency name="currency" value=(v("currency", "EUR"));
                label for="minimum_price" { "Minimum price per host-hour, minor units" } input #minimum_price name="minimum_price" value=(v("minimum_price", "")) inputmode="numeric";
                label for="immediate_price" { "Immediate price per host-hour (optional)" } input #immediate_price name="immediate_price" value=(v("immediate_price", "")) inputmode="numeric";
                label for="interruptibility" { "Interruptibility" } (select("interruptibility", &["dont_care", "price_based", "fulfilment_based", "no_interruptions"], "dont_care"))
                label for="goal" { "Optimise for" } (select("goal", &["none", "maximise_revenue", "maximise_utilisation", "capacity_back_at_short_notice"], "none"))
                details {
                    summary { "Or paste a whole request (JSON or TOML): several resource sets, every field" }
                    textarea #document name="document" rows="12" { (v("document", "")) }
                }
                button type="submit" { "Submit for validation" }
            }
        },
    ))
}

/// The request a filled-in form describes: the pasted document when there is one,
/// else the fields' one resource set.
fn request_of(f: &FormFields) -> Result<ResellRequest, String> {
    if let Some(doc) = f.non_empty("document") {
        return serde_json::from_str(doc).or_else(|json| {
            toml::from_str(doc)
                .map_err(|toml| format!("the document is neither JSON ({json}) nor TOML ({toml})"))
        });
    }
    let number = |k: &str| -> Result<Option<u64>, String> {
        f.non_empty(k)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{k}: {v:?} is not a whole number"))
            })
            .transpose()
    };
    let memory = f
        .non_empty("memory")
        .map(|m| surplus_api::control::parse_size(m).map_err(|e| format!("memory: {e}")))
        .transpose()?;
    let hosts = f.all("host");
    let modes = f.all("mode");
    let doc = serde_json::json!({
        "contact": f.get("contact").unwrap_or(""),
        "resource_sets": [{
            "kind": f.get("kind").unwrap_or("compute"),
            "zone": f.get("zone").unwrap_or(""),
            "hosts": hosts,
            "system": {
                "threads": number("threads")?,
                "cores": number("cores")?,
                "memory_bytes": memory,
                "architecture": f.non_empty("architecture"),
            },
            "compatibility": {"level": f.get("compatibility").unwrap_or("bare_metal")},
        }],
        "pricing": {
            "modes": modes,
            "currency": f.get("currency").unwrap_or(""),
            "minimum_price": number("minimum_price")?.unwrap_or(0),
            "immediate_price": number("immediate_price")?,
        },
        "interruptibility": f.get("interruptibility").unwrap_or("dont_care"),
        "goal": f.get("goal").unwrap_or("none"),
    });
    serde_json::from_value(doc).map_err(|e| e.to_string())
}

async fn submit(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    form: FormFields,
) -> Result<Response, PageError> {
    caller.require(Role::Provider)?;
    let refused = |status: axum::http::StatusCode, e: String| {
        let ctl = ctl.clone();
        let (signed, form) = (&signed, &form);
        async move {
            Ok::<_, PageError>(
                (status, request_form(&ctl, signed, form, Some(&e)).await?).into_response(),
            )
        }
    };
    let document = match request_of(&form) {
        Ok(d) => d,
        Err(e) => return refused(axum::http::StatusCode::BAD_REQUEST, e).await,
    };
    let query = form
        .non_empty("provider")
        .filter(|_| caller.0.role == Role::Admin)
        .map(|p| {
            format!(
                "provider={}",
                form_urlencoded::byte_serialize(p.as_bytes()).collect::<String>()
            )
        });
    match resell::submit_request(
        State(ctl.clone()),
        caller,
        RawQuery(query),
        Ok(axum::Json(document)),
    )
    .await
    {
        Ok((_, axum::Json(r))) => {
            Ok(Redirect::to(&format!("/console/resell/{}", r.id)).into_response())
        }
        // The form stays filled in, with every problem the API named.
        Err(e) => {
            let e = PageError::from(e);
            refused(e.status, e.message.clone()).await
        }
    }
}

fn criteria(a: &Assessment) -> Markup {
    html! {
        table.criteria {
            thead { tr { th { "Criterion" } th { "Field" } th { "Met" } th { "Claimed" } th { "Measured" } th { "Required" } } }
            tbody { @for c in &a.criteria { tr class=[(!c.passed).then_some("fail")] {
                td { (c.rule) } td { (c.field.as_deref().unwrap_or("-")) }
                td { (if c.passed { "yes" } else { "no" }) }
                td { (c.claimed.as_deref().unwrap_or("-")) } td { (c.measured.as_deref().unwrap_or("-")) }
                td { (c.required.as_deref().unwrap_or("-")) }
            } } }
        }
    }
}

async fn request(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    let axum::Json(r): axum::Json<ResellView> =
        resell::show_request(State(ctl), caller, Path(id)).await?;
    let open = !r.pipeline.notified;
    Ok(page(
        "Resell request",
        &signed,
        html! {
            // The page follows the pipeline by itself until it ends.
            @if open { meta http-equiv="refresh" content="2"; }
            h1 { "Resell request " code { (r.id.to_string()[..8]) } " " (stage_chip(r.stage)) }
            p { "Provider " (r.provider) " · submitted " (time(r.created_at_ms)) " · contact " (r.document.contact) }
            h2 { "Steps" }
            ol #steps { @for s in &r.pipeline.steps { li { (time(s.at_ms)) " · " (s.what) } } }
            @if !r.pipeline.reasons.is_empty() {
                h2 { "Why it was rejected" }
                ul #reasons { @for reason in &r.pipeline.reasons { li { (reason) } } }
            }
            @if !r.listings.is_empty() {
                h2 { "Listings" }
                p #listings { @for l in &r.listings { a href={ "/console/listings/" (l) } { code { (l) } } " " } }
            }
            h2 { "Hosts" }
            @for h in &r.pipeline.hosts {
                section.host data-host=(h.host) {
                    h3 {
                        code { (h.host) } " · set " (h.set) " · "
                        @match (&h.assessment, &h.failure) {
                            (Some(a), _) if a.accepted() => { "accepted as " (a.category.as_deref().unwrap_or("-")) }
                            (Some(_), _) => { "rejected" }
                            (None, Some(f)) => { "not validated: " (f) }
                            (None, None) => @if let Some(run) = h.run { "validating (" a href={ "/console/validations/" (run) } { "run" } ")" } @else { "waiting for its agent" },
                        }
                    }
                    @if let Some(a) = &h.assessment { (criteria(a)) }
                }
            }
        },
    ))
}

async fn listings(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    RawQuery(query): RawQuery,
) -> Page {
    let filled = Filled::of(query.as_deref());
    let found = resell::find_listings(&ctl, Some(&filled.query())).await?;
    let field = |name: &str, label: &str| {
        html! { label { (label) " " input name=(name) value=(filled.get(name)) size="10"; } }
    };
    Ok(page(
        "Listings",
        &signed,
        html! {
            h1 { "Listings" }
            form.filters method="get" action="/console/listings" {
                (field("kind", "Kind")) (field("category", "Category")) (field("zone", "Zone"))
                (field("provider", "Provider")) (field("pricing_mode", "Pricing"))
                (field("compat", "Compatibility ≥")) (field("min_score", "Score ≥"))
                (field("max_price", "Price ≤")) (field("currency", "Currency")) (field("sort", "Sort"))
                button type="submit" { "Search" }
            }
            table #listings {
                thead { tr {
                    th { "Listing" } th { "Provider" } th { "Zone" } th { "Kind" } th { "Category" } th { "Score" }
                    th { "Hardening" } th { "Compatibility" } th { "Pricing" } th { "Interruptibility" }
                    th { "Price / h" } th { "Available" } th { "Rating" }
                } }
                tbody { @for l in &found { tr data-listing=(l.id) {
                    td { a href={ "/console/listings/" (l.id) } { code { (l.id) } } }
                    td { (l.provider) } td { (l.zone) } td { (name_of(&l.kind)) } td { (l.category) }
                    td.num { (format!("{:.2}", l.score)) } td.num { (l.hardening_index) }
                    td { (name_of(&l.compat_level)) } td { (names_of(&l.pricing_modes)) }
                    td { (name_of(&l.interruptibility)) }
                    td.num { (l.price) " " (l.currency) } td.num { (l.available) }
                    td.num { (l.rating.map(|r| format!("{r:.1}")).unwrap_or_else(|| "-".into())) }
                } } }
            }
            @if found.is_empty() { p.empty { "No listing matches." } }
        },
    ))
}

async fn retest(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let _ = resell::retest_listing(State(ctl), caller, Path(id.clone())).await?;
    Ok(Redirect::to(&format!("/console/listings/{id}")))
}

async fn rate(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let score = form
        .non_empty("score")
        .and_then(|s| s.parse::<u8>().ok())
        .ok_or_else(|| PageError::bad_request("score: a rating from 1 to 5"))?;
    let body = surplus_api::resell::RatingRequest {
        instance: form.non_empty("instance").unwrap_or_default().to_owned(),
        score,
        comment: form.get("comment").unwrap_or_default().trim().to_owned(),
    };
    let _ = resell::rate(State(ctl), caller, Ok(axum::Json(body))).await?;
    match form.non_empty("listing") {
        Some(l) => Ok(Redirect::to(&format!("/console/listings/{l}"))),
        None => Ok(Redirect::to("/console/listings")),
    }
}

async fn listing(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    Path(id): Path<String>,
) -> Page {
    let ListingView {
        listing: l,
        evidence,
    } = resell::listing_view(&ctl, &id).await?;
    let window_days = ctl.app.config.resell.rating_window.as_secs() / 86_400;
    let me = &signed.principal;
    let may_retest =
        me.role == Role::Admin || (me.role == Role::Provider && me.account == l.provider);
    // A client rates the provider through an instance it ran on one of the hosts.
    let mine: Vec<String> = if me.role == Role::Client {
        ctl.app
            .store
            .instances(Some(me))
            .await
            .map_err(crate::http::ApiError::from)?
            .into_iter()
            .filter(|i| l.hosts.contains(&i.agent_id) && i.started_at_ms.is_some())
            .map(|i| i.record.id)
            .collect()
    } else {
        Vec::new()
    };
    Ok(page(
        "Listing",
        &signed,
        html! {
            h1 { "Listing " code { (l.id) } @if !l.listed { " " span.status.failed { "delisted" } } }
            dl.facts #listing {
                dt { "Provider" } dd { (l.provider) }
                dt { "Zone" } dd { (l.zone) }
                dt { "Kind" } dd { (name_of(&l.kind)) }
                dt { "Size category" } dd #category { (l.category) }
                dt { "Composite score" } dd { (format!("{:.2}", l.score)) " (1.0: the reference machine)" }
                dt { "Hardening index" } dd { (l.hardening_index) " of 100" }
                dt { "Compatibility" } dd { (name_of(&l.compat_level)) @if !l.operations.is_empty() { " · " (l.operations.join(", ")) } }
                dt { "Pricing modes" } dd { (names_of(&l.pricing_modes)) }
                dt { "Interruptibility" } dd { (name_of(&l.interruptibility)) }
                dt { "Price per host-hour" } dd { (l.price) " " (l.currency) " (minor units)" }
                dt { "Available" } dd { (l.available) " of " (l.hosts.len()) " hosts" }
                dt { "Rating" } dd { (l.rating.map(|r| format!("{r:.1} of 5")).unwrap_or_else(|| "not rated yet".into())) }
                dt { "Uptime" } dd { (l.uptime.map(|u| format!("{:.2}%", u * 100.0)).unwrap_or_else(|| "-".into())) }
                dt { "CPU utilisation" } dd #utilisation { (l.utilisation.map(|u| format!("{:.1}% over the last {} days", u * 100.0, window_days)).unwrap_or_else(|| "no usage metered yet".into())) }
                dt { "Listed" } dd { (time(l.created_at_ms)) }
            }
            @if let Some(r) = &l.retest { p #retest { "A re-test is under way since " (time(r.started_at_ms)) "." } }
            @if let Some(at) = l.last_retest_at_ms {
                p { "Last re-tested " (time(at)) @if l.failed_retest { " · " strong { "failed" } " (ranked lower)" } }
            }
            @if may_retest { div.actions { (super::view::action(&signed, &format!("/console/listings/{}/retest", l.id), "Re-test now", false)) } }
            @if !mine.is_empty() {
                h2 { "Rate " (l.provider) }
                form.filters #rate method="post" action="/console/ratings" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="listing" value=(l.id);
                    select name="instance" { @for i in &mine { option value=(i) { (i) } } }
                    select name="score" { @for n in (1..=5).rev() { option value=(n) { (n) } } }
                    input name="comment" placeholder="comment (optional)" maxlength="1000";
                    button type="submit" { "Rate" }
                }
            }
            h2 { "Validation evidence" }
            @for e in &evidence {
                section.host data-host=(e.host) {
                    h3 { "Host " code { (e.host) } @if let Some(run) = e.run { " · run " code { (run) } } }
                    @if let Some(a) = &e.assessment { (criteria(a)) }
                }
            }
        },
    ))
}

async fn notifications(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let list = resell::notifications_of(&ctl, &caller.0, 200).await?;
    Ok(page(
        "Notifications",
        &signed,
        html! {
            h1 { "Notifications" }
            table #notifications {
                thead { tr { th { "When" } th { "What" } th { "Details" } th { "Webhook" } } }
                tbody { @for n in list.iter().rev() { tr data-kind=(n.kind) {
                    td { (time(n.created_at_ms)) } td { (n.kind) }
                    td {
                        @if let Some(r) = n.body.get("request").and_then(|r| r.as_str()) {
                            a href={ "/console/resell/" (r) } { "request " code { (r.get(..8).unwrap_or(r)) } } " "
                        }
                        @if let Some(reasons) = n.body.get("reasons").and_then(|r| r.as_array()) {
                            @for reason in reasons { div { (reason.as_str().unwrap_or_default()) } }
                        }
                        @if let Some(l) = n.body.get("listing").and_then(|l| l.as_str()) {
                            a href={ "/console/listings/" (l) } { "listing " code { (l) } }
                            @if let Some(failed) = n.body.get("failed").and_then(|f| f.as_array()) {
                                @for f in failed {
                                    div { (f["rule"].as_str().unwrap_or("-")) ": measured " (f["measured"].as_str().unwrap_or("-")) ", required " (f["required"].as_str().unwrap_or("-")) }
                                }
                            }
                        }
                    }
                    td {
                        @match (n.delivered_at_ms, n.attempts.last()) {
                            (Some(at), _) => { "delivered " (time(at)) }
                            (None, Some(a)) => { (a.attempt) " attempts, last: " (a.outcome) }
                            (None, None) => { "-" }
                        }
                    }
                } } }
            }
            @if list.is_empty() { p.empty { "Nothing yet." } }
        },
    ))
}
