//! Private pools (issue 17, source 001 FIG. 10-12): a pool owner makes a pool, puts
//! the slots its accounts hold in it one by one from the list of those outside any
//! pool (FIG. 10), names its members and issues them credits, and runs its cycle;
//! the pool's page sums up its settings (FIG. 11) and shows usage and charges per
//! member (FIG. 12) and its bursts. A member sees the pools it is in, bids in one,
//! raises or cancels its requests, and reads why each holds or waits. Every page
//! reads and acts through the API's handlers, so it shows and allows what the API
//! would for the same caller; a refusal is the pool's page again, with the API's
//! reason and status.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use surplus_api::pools::{
    BurstSettings, CreditRequest, CurrencyKind, MemberRequest, Method, PoolBidRequest, PoolCreate,
    PoolRequestView, PoolSettingsBody, PoolUsageView, PoolView, RebidRequest, RequestType,
    Settings, SlotFacts, SlotRequest,
};
use surplus_market::ledger;
use surplus_market::records::{Role, from_name, name_of};
use surplus_protocol::clock::UnixMillis;

use super::buy::number;
use super::view::{bytes, page, time, time_or_dash};
use super::{FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{ApiError, Caller, pools};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/pools", get(list).post(create))
        .route("/console/pools/{id}", get(show))
        .route("/console/pools/{id}/slots", post(add_slot))
        .route("/console/pools/{id}/slots/{slot}/remove", post(remove_slot))
        .route("/console/pools/{id}/members", post(add_member))
        .route(
            "/console/pools/{id}/members/{member}/remove",
            post(remove_member),
        )
        .route("/console/pools/{id}/credits", post(credit))
        .route("/console/pools/{id}/cycle", post(cycle))
        .route("/console/pools/{id}/requests", post(bid))
        .route("/console/pools/{id}/requests/{request}/bid", post(rebid))
        .route(
            "/console/pools/{id}/requests/{request}/cancel",
            post(cancel),
        )
}

const HOUR_MS: i64 = 3_600_000;

/// A length of time as a person says it: `90 s`, `5 min`, `24 h`.
fn span(ms: i64) -> String {
    match ms {
        ms if ms % HOUR_MS == 0 && ms > 0 => format!("{} h", ms / HOUR_MS),
        ms if ms % 60_000 == 0 && ms > 0 => format!("{} min", ms / 60_000),
        ms => format!("{} s", ms / 1000),
    }
}

/// What is left of a term ending at `until`: `2 d 3 h`, `5 h 10 min`, `12 min`.
fn remaining(until: Option<UnixMillis>, now: UnixMillis) -> String {
    let Some(until) = until else {
        return "until released".into();
    };
    let s = ((until - now) / 1000).max(0);
    match s {
        86_400.. => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
        3600.. => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} min", s / 60),
    }
}

fn method_words(m: Method) -> String {
    match m {
        Method::English => "English: bids only rise, each holder pays its own bid".into(),
        Method::Dutch { step } => format!(
            "Dutch: the asking price falls by {step} a cycle while a slot is free and rises by {step} while a request waits; every holder pays it"
        ),
        Method::Spot => {
            "spot: every holder pays the best bid left waiting (or the minimum), never above its own"
                .into()
        }
        Method::Fixed => "fixed price: everyone pays the minimum; no bidding".into(),
    }
}

fn method_name(m: Method) -> &'static str {
    match m {
        Method::English => "English",
        Method::Dutch { .. } => "Dutch",
        Method::Spot => "spot",
        Method::Fixed => "fixed price",
    }
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn size(f: &SlotFacts) -> String {
    match (f.cpus, f.memory_bytes) {
        (Some(c), Some(m)) => format!("{c} CPU, {}", bytes(m)),
        (Some(c), None) => format!("{c} CPU"),
        (None, Some(m)) => bytes(m),
        (None, None) => "-".into(),
    }
}

/// The pool's settings (FIG. 11): request type, bidding method, currency, prices,
/// interruption cycles, fairness and preemption; the burst policy for its owner.
fn settings(v: &PoolView, owner_view: bool, now: UnixMillis) -> Markup {
    let s: &Settings = &v.settings;
    let p = &s.policy;
    let c = &s.currency;
    html! {
        dl.facts #pool-settings {
            dt { "Owner" } dd { (v.owner) }
            dt { "Request type" } dd { @match s.request_type { RequestType::Auction => "auction: bids for slots, per slot-hour", RequestType::FixedPrice => "fixed price: the minimum, per slot-hour" } }
            dt { "Bidding method" } dd { (method_words(s.method_in_force())) }
            dt { "Currency" } dd { (c) " (" (name_of(&s.currency_kind)) ")" }
            dt { "Minimum price" } dd { (p.minimum) " " (c) " / slot-hour" }
            dt { "Maximum price" } dd { @match p.maximum { Some(m) => { (m) " " (c) " / slot-hour" }, None => "uncapped" } }
            @if matches!(s.method, Method::Dutch { .. }) {
                dt { "Asking now" } dd #asking { (v.asking) " " (c) " / slot-hour" }
            }
            dt { "Cap per user" } dd { @match p.cap_per_user { Some(n) => { (n) " slots at once" }, None => "uncapped" } }
            dt { "Preemption" } dd #preemption {
                @if p.preemptible { "preemptible: a better bid takes a slot from its holder, who keeps it for the notice period" }
                @else { "not preemptible: a holder keeps its slot while its request stands" }
            }
            dt { "Interruption cycles" } dd { "every " (span(s.cycle_ms)) "; notice " (span(s.notice_ms))
                " · next " (time(v.next_cycle_at_ms)) " · last " (time_or_dash(v.cycled_at_ms)) }
            dt { "Fairness" } dd { "equal bids go to the user who used less; use counts half after " (span(s.half_life_ms)) }
            dt { "Users" } dd { (v.members.len()) " of at most " (s.max_users) }
            dt { "Created" } dd { (time(v.created_at_ms)) " (" (super::view::ago(v.created_at_ms, now)) ")" }
            @if owner_view {
                dt { "Burst policy" } dd #burst-policy { @match &s.burst {
                    Some(b) => { "into the market from account " (b.account) ": at most " (b.max_price) " " (b.currency)
                        " a host-hour, " (b.budget) " " (b.currency) " every " (span(b.period_ms))
                        ", each kept at least " (b.min_hours) " h" },
                    None => "none: a request the pool cannot serve waits",
                } }
            }
        }
    }
}

/// The pool's slots, with who holds each; the owner may take one back.
fn slots_table(v: &PoolView, signed: &Signed, owner_view: bool) -> Markup {
    html! {
        table #pool-slots {
            thead { tr {
                th { "Slot" } th { "Kind" } th { "Host" } th { "Account" } th { "Instance type" }
                th { "CPUs" } th { "Memory" } th { "Platform" } th { "Zone" } th { "Term ends" } th { "Held by" }
                @if owner_view { th {} }
            } }
            tbody { @for s in &v.slots { @let f = &s.facts; tr data-slot=(s.slot) {
                td { code { (s.slot) } @if s.burst { " " span.chip { "burst" } } }
                td { (f.kind) @if let Some(m) = &f.mode { " / " (m) } }
                td { code { (s.host) } } td { (s.account) }
                td { (or_dash(f.instance_type.as_ref())) } td.num { (or_dash(f.cpus)) }
                td.num { (f.memory_bytes.map_or_else(|| "-".into(), bytes)) }
                td { (or_dash(f.platform.as_ref())) } td { (or_dash(f.zone.as_ref())) }
                td { @match f.until_ms { Some(t) => (time(t)), None => "when released" } }
                td.held { (s.held_by.as_deref().unwrap_or("-"))
                    @if let Some(t) = s.leaving_at_ms { " · leaves the pool at " (time(t)) } }
                @if owner_view { td { @if s.leaving_at_ms.is_none() {
                    (super::view::action(signed, &format!("/console/pools/{}/slots/{}/remove", v.id, s.slot), "Remove", true))
                } } }
            } } }
        }
        @if v.slots.is_empty() { p.empty { "No slot in the pool yet." } }
    }
}

/// The requests, each with what the last cycle decided, its words and its hosts; a
/// member may raise or cancel its own.
fn requests_table(
    v: &PoolView,
    list: &[(PoolRequestView, String)],
    signed: &Signed,
    member_view: bool,
    now: UnixMillis,
) -> Markup {
    let c = &v.settings.currency;
    html! {
        table #pool-requests {
            thead { tr {
                th { "Request" } th { "Member" } th { "Count" } th { "Bid" } th { "Placed" } th { "State" }
                th { "Decided" } th { "Why" } th { "Hosts" }
                @if member_view { th {} }
            } }
            tbody { @for (r, words) in list { @let q = &r.request; tr data-request=(q.id) {
                td { code { (q.id) } } td { (q.user) } td.num { (q.count) }
                td.num { (q.bid) " " (c) } td { (time(q.placed_at_ms)) } td.state { (r.state) }
                td.rule { (r.why.as_ref().and_then(|w| w["rule"].as_str()).unwrap_or("not yet cycled")) }
                td.why { (words) }
                td.hosts { @for a in &r.allocations { div {
                    code { (a.host) }
                    @if a.allocation.from_ms > now { " from " (time(a.allocation.from_ms)) }
                    @if a.allocation.noticed { " · until " (time_or_dash(a.allocation.until_ms)) }
                    " at " (a.allocation.price)
                } } }
                @if member_view { td { @if r.state == "live" {
                    form.inline method="post" action={ "/console/pools/" (v.id) "/requests/" (q.id) "/bid" } {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input name="bid" value=(q.bid) size="5" aria-label="new bid";
                        button type="submit" { "Rebid" }
                    }
                    " "
                    (super::view::action(signed, &format!("/console/pools/{}/requests/{}/cancel", v.id, q.id), "Cancel", true))
                } } }
            } } }
        }
        @if list.is_empty() { p.empty { "No request yet." } }
    }
}

/// Usage and charges per member (FIG. 12), and the bursts for the owner.
fn usage_tables(u: &PoolUsageView, owner_view: bool, burst: Option<&BurstSettings>) -> Markup {
    let c = &u.currency;
    let charges: Vec<_> = u
        .members
        .iter()
        .flat_map(|m| m.charges.iter().map(move |ch| (&m.member, ch)))
        .collect();
    html! {
        table #pool-usage {
            thead { tr {
                th { "Member" } th { "Slot-hours" } th { "Charged" } th { "Holding now" } th { "Billing records" }
            } }
            tbody { @for m in &u.members { tr data-member=(m.member) {
                td { (m.member) } td.num { (format!("{:.2}", m.slot_hours)) } td.num { (m.charged) " " (c) }
                td { @for h in &m.holding { div {
                    code { (h.host) } " · " (h.instance_type.as_deref().unwrap_or("-")) " · "
                    (h.zone.as_deref().unwrap_or("-")) " · at " (h.price) " (bid " (h.bid) ")"
                    @if !h.instances.is_empty() { " · " (h.instances.len()) " instance(s)" }
                } } }
                td.num { (m.charges.len()) }
            } } }
        }
        p #pool-total { "Charged in all: " (u.total) " " (c) }
        @if !charges.is_empty() {
            table #pool-charges {
                thead { tr { th { "Member" } th { "Request" } th { "Slot" } th { "From" } th { "To" } th { "Price" } th { "Amount" } } }
                tbody { @for (member, ch) in &charges { tr {
                    td { (member) } td { code { (ch.request) } } td { code { (ch.slot) } }
                    td { (time(ch.from_ms)) } td { (time(ch.to_ms)) } td.num { (ch.price) } td.num { (ch.amount) " " (c) }
                } } }
            }
        }
        @if owner_view {
            h2 { "Bursts" }
            @if let Some(b) = burst { p #burst-spent { "Spent " (u.burst_spent) " of " (b.budget) " " (b.currency) " this period." } }
            table #pool-bursts {
                thead { tr { th { "Slot" } th { "Request" } th { "Source" } th { "Price / h" } th { "Started" } th { "Ended" } } }
                tbody { @for b in &u.bursts { tr {
                    td { code { (b.slot) } } td { code { (b.request) } } td { (b.source) } td.num { (b.price) }
                    td { (time(b.started_at_ms)) } td { (time_or_dash(b.ended_at_ms)) }
                } } }
            }
            @if u.bursts.is_empty() { p.empty { "No burst." } }
        }
    }
}

/// The balance `account` holds in `currency` (client accounts hold a pool's credits).
async fn balance(ctl: &Controller, account: &str, currency: &str) -> Result<i64, PageError> {
    Ok(ctl
        .app
        .store
        .balances(Some(&ledger::client(account)))
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .find(|(_, c, _)| c == currency)
        .map_or(0, |(_, _, b)| b))
}

async fn list(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    pools_page(&ctl, &signed, caller, &FormFields::default(), None).await
}

/// The caller's pools; for a pool owner, the form to make one (kept filled in when
/// the API refused it, with its reason).
async fn pools_page(
    ctl: &Arc<Controller>,
    signed: &Signed,
    caller: Caller,
    f: &FormFields,
    error: Option<&str>,
) -> Page {
    let axum::Json(list) = pools::list_pools(State(ctl.clone()), caller).await?;
    let owner = signed.principal.role == Role::PoolOwner;
    let v = |k: &str, default: &str| f.get(k).unwrap_or(default).to_owned();
    let select = |name: &str, options: &[(&str, &str)], default: &str| {
        let chosen = f.get(name).unwrap_or(default).to_owned();
        html! {
            select name=(name) {
                @for (value, label) in options { option value=(value) selected[*value == chosen] { (label) } }
            }
        }
    };
    let field = |name: &str, label: &str, default: &str| {
        html! { label { (label) " " input name=(name) value=(v(name, default)) size="8"; } }
    };
    Ok(page(
        "Pools",
        signed,
        html! {
            h1 { @if owner { "Your pools" } @else { "Pools you are a member of" } }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            table #pools {
                thead { tr {
                    th { "Pool" } th { "Owner" } th { "Method" } th { "Currency" } th { "Minimum" } th { "Maximum" }
                    th { "Slots" } th { "Held" } th { "Members" } th { "Next cycle" }
                } }
                tbody { @for p in &list { tr data-pool=(p.id) {
                    td { a href={ "/console/pools/" (p.id) } { (p.name) } }
                    td { (p.owner) } td { (method_name(p.settings.method_in_force())) }
                    td { (p.settings.currency) " (" (name_of(&p.settings.currency_kind)) ")" }
                    td.num { (p.settings.policy.minimum) } td.num { (or_dash(p.settings.policy.maximum)) }
                    td.num { (p.slots.len()) } td.num { (p.slots.iter().filter(|s| s.held_by.is_some()).count()) }
                    td.num { (p.members.len()) } td { (time(p.next_cycle_at_ms)) }
                } } }
            }
            @if list.is_empty() {
                p.empty { @if owner { "No pool yet: make one below, then put your slots in it." }
                    @else { "You are in no pool: a pool's owner lets you in." } }
            }
            @if owner {
                h2 { "Create a pool" }
                p.hint { "A private market over slots your accounts hold: your members bid for them in the pool's currency; each cycle decides who holds which slot." }
                form.stacked #create-pool method="post" action="/console/pools" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    (field("name", "Name", ""))
                    (field("currency", "Currency (a ledger currency: your credits, units, or money)", ""))
                    label { "Currency kind " (select("currency_kind", &[("credits", "credits"), ("units", "units"), ("money", "money")], "credits")) }
                    label { "Request type " (select("request_type", &[("auction", "auction (bids)"), ("fixed_price", "fixed price (the minimum)")], "auction")) }
                    label { "Bidding method " (select("method", &[("english", "English (ascending)"), ("dutch", "Dutch (descending)"), ("spot", "spot")], "english")) }
                    (field("step", "Step (Dutch: the asking price's change per cycle)", ""))
                    (field("minimum", "Minimum price per slot-hour", "0"))
                    (field("maximum", "Maximum price per slot-hour (empty: uncapped)", ""))
                    (field("cap_per_user", "Most slots per user (empty: uncapped)", ""))
                    label.check { input type="checkbox" name="preemptible" value="true" checked[f.non_empty("preemptible").is_some()]; " preemptible: a better bid takes a slot after the notice" }
                    (field("cycle_seconds", "Seconds between cycles", "60"))
                    (field("notice_seconds", "Seconds of notice before a slot is taken back", "300"))
                    (field("half_life_hours", "Fairness: hours for a user's use to count half", "24"))
                    (field("max_users", "Most users", "100"))
                    fieldset #burst {
                        legend { "Burst policy (optional): capacity from the market when the pool is full" }
                        (field("burst_account", "Account that holds and pays bursts (one of yours)", ""))
                        (field("burst_max_price", "Most per host-hour", ""))
                        (field("burst_budget", "Budget per period", ""))
                        (field("burst_currency", "Money of the budget", ""))
                        (field("burst_period_hours", "Budget period, hours", "24"))
                        (field("burst_min_hours", "Hours a burst is kept at least", "1"))
                    }
                    button type="submit" { "Create" }
                }
            }
        },
    ))
}

fn count(form: &FormFields, key: &str) -> Result<Option<u32>, PageError> {
    number(form, key)?
        .map(|n| {
            u32::try_from(n).map_err(|_| PageError::bad_request(format!("{key}: {n} is too large")))
        })
        .transpose()
}

/// The pool a filled-in create form describes.
fn create_body(f: &FormFields) -> Result<PoolCreate, PageError> {
    let currency_kind = f
        .non_empty("currency_kind")
        .map(|k| {
            from_name::<CurrencyKind>(k).ok_or_else(|| {
                PageError::bad_request(format!(
                    "currency_kind: {k:?} is not one of credits, units, money"
                ))
            })
        })
        .transpose()?;
    let burst = match f.non_empty("burst_account") {
        None => None,
        Some(account) => {
            let need = |k: &str| -> Result<u64, PageError> {
                number(f, k)?.ok_or_else(|| {
                    PageError::bad_request(format!("{k}: needed for a burst policy"))
                })
            };
            let hours = number(f, "burst_period_hours")?.unwrap_or(24);
            Some(BurstSettings {
                account: account.to_owned(),
                max_price: need("burst_max_price")?,
                budget: need("burst_budget")?,
                currency: f
                    .non_empty("burst_currency")
                    .ok_or_else(|| {
                        PageError::bad_request("burst_currency: needed for a burst policy")
                    })?
                    .to_owned(),
                period_ms: i64::try_from(hours)
                    .ok()
                    .and_then(|h| h.checked_mul(HOUR_MS))
                    .ok_or_else(|| {
                        PageError::bad_request(format!("burst_period_hours: {hours} is too large"))
                    })?,
                min_hours: count(f, "burst_min_hours")?.unwrap_or(1),
            })
        }
    };
    Ok(PoolSettingsBody {
        remove_burst: None,
        name: Some(f.get("name").unwrap_or_default().to_owned()),
        request_type: f
            .non_empty("request_type")
            .map(|t| {
                from_name::<RequestType>(t).ok_or_else(|| {
                    PageError::bad_request(format!(
                        "request_type: {t:?} is not one of auction, fixed_price"
                    ))
                })
            })
            .transpose()?,
        minimum: number(f, "minimum")?,
        maximum: number(f, "maximum")?,
        cap_per_user: count(f, "cap_per_user")?,
        preemptible: Some(f.non_empty("preemptible").is_some()),
        method: f.non_empty("method").map(str::to_owned),
        step: number(f, "step")?,
        currency: f.non_empty("currency").map(str::to_owned),
        currency_kind,
        cycle_seconds: number(f, "cycle_seconds")?,
        notice_seconds: number(f, "notice_seconds")?,
        half_life_hours: number(f, "half_life_hours")?,
        max_users: count(f, "max_users")?,
        burst,
    })
}

async fn create(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    form: FormFields,
) -> Result<Response, PageError> {
    let made = match create_body(&form) {
        Ok(body) => pools::create_pool(State(ctl.clone()), caller.clone(), Ok(axum::Json(body)))
            .await
            .map(|(_, axum::Json(v))| v)
            .map_err(PageError::from),
        Err(e) => Err(e),
    };
    match made {
        Ok(v) => Ok(Redirect::to(&format!("/console/pools/{}", v.id)).into_response()),
        // The form stays filled in, with the API's reason.
        Err(e) => Ok((
            e.status,
            pools_page(&ctl, &signed, caller, &form, Some(&e.message)).await?,
        )
            .into_response()),
    }
}

async fn show(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    pool_page(&ctl, &signed, caller, &id, None).await
}

/// A pool's page: for its owner, the settings, its slots and those it may add,
/// members, credits, the cycle, requests, usage and bursts; for a member, the
/// settings, the slots, its own requests with the bid form, and its own usage.
async fn pool_page(
    ctl: &Arc<Controller>,
    signed: &Signed,
    caller: Caller,
    id: &str,
    error: Option<&str>,
) -> Page {
    let axum::Json(v) =
        pools::show_pool(State(ctl.clone()), caller.clone(), Path(id.to_owned())).await?;
    let member_view = signed.principal.role == Role::Client;
    let owner_view = !member_view;
    let axum::Json(requests) =
        pools::list_pool_requests(State(ctl.clone()), caller.clone(), Path(id.to_owned())).await?;
    let mut explained = Vec::with_capacity(requests.len());
    for r in requests {
        let axum::Json(e) = pools::explain_pool_request(
            State(ctl.clone()),
            caller.clone(),
            Path(r.request.id.to_string()),
        )
        .await?;
        explained.push((r, e.explanation));
    }
    let axum::Json(usage) =
        pools::pool_usage(State(ctl.clone()), caller.clone(), Path(id.to_owned())).await?;
    let own = match owner_view {
        true => ctl
            .market
            .poolable_slots(&caller.0, v.id)
            .await
            .map_err(ApiError::from)?,
        false => Vec::new(),
    };
    let currency = &v.settings.currency;
    let issues_credits = v.settings.currency_kind != CurrencyKind::Money;
    let mut balances = Vec::new();
    if owner_view {
        for m in &v.members {
            balances.push(balance(ctl, &m.member, currency).await?);
        }
    }
    let mine = match member_view {
        true => Some(balance(ctl, &signed.principal.account, currency).await?),
        false => None,
    };
    let now = ctl.app.clock.now_ms();
    let base = format!("/console/pools/{}", v.id);
    Ok(page(
        &format!("Pool {}", v.name),
        signed,
        html! {
            h1 { "Pool " (v.name) " " code { (v.id.to_string()[..8]) } }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            (settings(&v, owner_view, now))
            @if owner_view {
                div.actions { form.inline #cycle method="post" action={ (base) "/cycle" } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    button type="submit" { "Run cycle now" }
                } }
            }
            h2 { "Slots in the pool" }
            (slots_table(&v, signed, owner_view))
            @if owner_view {
                h2 { "Your slots outside any pool" }
                p.hint { "What your accounts hold now (your client account and those that granted you theirs): add them to the pool one by one." }
                table #own-slots {
                    thead { tr {
                        th { "Reservation" } th { "Account" } th { "Listing" } th { "Mode" } th { "Instance type" }
                        th { "Size" } th { "Platform" } th { "Zone" } th { "Remaining term" } th {}
                    } }
                    tbody { @for (r, f) in &own { tr data-slot=(r.id) {
                        td { code { (r.id) } } td { (r.holder) } td { (r.listing) } td { (name_of(&r.mode)) }
                        td { (or_dash(f.instance_type.as_ref())) } td { (size(f)) }
                        td { (or_dash(f.platform.as_ref())) } td { (or_dash(f.zone.as_ref())) }
                        td { (remaining(f.until_ms, now)) }
                        td { form.inline method="post" action={ (base) "/slots" } {
                            input type="hidden" name="csrf" value=(signed.csrf);
                            input type="hidden" name="slot" value=(r.id);
                            button type="submit" { "Add" }
                        } }
                    } } }
                }
                @if own.is_empty() { p.empty { "None: every slot your accounts hold is in a pool, or they hold none (reserve capacity as a client first)." } }
                h2 { "Members" }
                table #pool-members {
                    thead { tr { th { "User" } th { "Name" } th { "Organisation" } th { "Added" } th { "Balance" } th {} } }
                    tbody { @for (m, b) in v.members.iter().zip(&balances) { tr data-member=(m.member) {
                        td { (m.member) } td { (m.name) } td { (m.organisation) } td { (time(m.added_at_ms)) }
                        td.num.balance { (b) " " (currency) }
                        td { (super::view::action(signed, &format!("{base}/members/{}/remove", form_urlencoded::byte_serialize(m.member.as_bytes()).collect::<String>()), "Remove", true)) }
                    } } }
                }
                @if v.members.is_empty() { p.empty { "No member yet." } }
                form.filters #add-member method="post" action={ (base) "/members" } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    strong { "Add a member" }
                    input name="member" placeholder="client account" required;
                    input name="name" placeholder="name";
                    input name="organisation" placeholder="organisation";
                    button type="submit" { "Add" }
                }
                @if issues_credits {
                    form.filters #credit method="post" action={ (base) "/credits" } {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input type="hidden" name="client_token" value=(uuid::Uuid::now_v7());
                        strong { "Issue " (currency) }
                        input name="member" placeholder="member" required;
                        input name="amount" inputmode="numeric" placeholder="amount" required;
                        button type="submit" { "Issue" }
                    }
                } @else {
                    p.hint { "Members pay from their own " (currency) " balance: a pool in money issues no credits." }
                }
            }
            @if let Some(b) = mine { p #my-balance { "Your balance: " (b) " " (currency) } }
            h2 { @if member_view { "Your requests" } @else { "Requests" } }
            (requests_table(&v, &explained, signed, member_view, now))
            @if member_view {
                h2 { "Bid for slots" }
                form.filters #pool-bid method="post" action={ (base) "/requests" } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="client_token" value=(uuid::Uuid::now_v7());
                    label { "Slots " input name="count" value="1" size="3"; }
                    label { "Bid per slot-hour (" (currency) ") " input name="bid" value=(v.settings.policy.minimum.max(v.asking)) size="6"; }
                    button type="submit" { "Bid" }
                }
            }
            h2 { @if member_view { "Your usage and charges" } @else { "Usage and charges per member" } }
            (usage_tables(&usage, owner_view, v.settings.burst.as_ref()))
        },
    ))
}

/// After a form on pool `id`'s page: back to it, or the page again with the API's
/// refusal and its status.
async fn back(
    ctl: &Arc<Controller>,
    signed: &Signed,
    caller: Caller,
    id: &str,
    done: Result<(), PageError>,
) -> Result<Response, PageError> {
    match done {
        Ok(()) => Ok(Redirect::to(&format!("/console/pools/{id}")).into_response()),
        Err(e) => {
            let status = e.status;
            let shown = pool_page(ctl, signed, caller, id, Some(&e.message)).await?;
            Ok((status, shown).into_response())
        }
    }
}

fn required<'f>(form: &'f FormFields, key: &str, what: &str) -> Result<&'f str, PageError> {
    form.non_empty(key)
        .ok_or_else(|| PageError::new(StatusCode::BAD_REQUEST, format!("{key}: {what}")))
}

async fn add_slot(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
    form: FormFields,
) -> Result<Response, PageError> {
    let done = async {
        let text = required(&form, "slot", "which slot to add")?;
        let slot = uuid::Uuid::parse_str(text).map_err(|_| {
            PageError::bad_request(format!("slot: {text:?} is not a reservation or host id"))
        })?;
        let _ = pools::add_pool_slot(
            State(ctl.clone()),
            caller.clone(),
            Path(id.clone()),
            Ok(axum::Json(SlotRequest { slot })),
        )
        .await?;
        Ok::<(), PageError>(())
    }
    .await;
    back(&ctl, &signed, caller, &id, done).await
}

async fn remove_slot(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path((id, slot)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done =
        pools::remove_pool_slot(State(ctl.clone()), caller.clone(), Path((id.clone(), slot)))
            .await
            .map(drop)
            .map_err(PageError::from);
    back(&ctl, &signed, caller, &id, done).await
}

async fn add_member(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
    form: FormFields,
) -> Result<Response, PageError> {
    let done = async {
        let body = MemberRequest {
            member: required(&form, "member", "the member's client account")?.to_owned(),
            name: form.non_empty("name").map(str::to_owned),
            organisation: form.non_empty("organisation").map(str::to_owned),
        };
        let _ = pools::put_pool_member(
            State(ctl.clone()),
            caller.clone(),
            Path(id.clone()),
            Ok(axum::Json(body)),
        )
        .await?;
        Ok::<(), PageError>(())
    }
    .await;
    back(&ctl, &signed, caller, &id, done).await
}

async fn remove_member(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path((id, member)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done = pools::remove_pool_member(
        State(ctl.clone()),
        caller.clone(),
        Path((id.clone(), member)),
    )
    .await
    .map(drop)
    .map_err(PageError::from);
    back(&ctl, &signed, caller, &id, done).await
}

async fn credit(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
    form: FormFields,
) -> Result<Response, PageError> {
    let done = async {
        let amount = required(&form, "amount", "how much to issue")?;
        let body = CreditRequest {
            member: required(&form, "member", "the member to issue to")?.to_owned(),
            amount: amount.parse().map_err(|_| {
                PageError::bad_request(format!("amount: {amount:?} is not a whole number"))
            })?,
            client_token: form.non_empty("client_token").map(str::to_owned),
        };
        let _ = pools::credit_pool_member(
            State(ctl.clone()),
            caller.clone(),
            Path(id.clone()),
            Ok(axum::Json(body)),
        )
        .await?;
        Ok::<(), PageError>(())
    }
    .await;
    back(&ctl, &signed, caller, &id, done).await
}

async fn cycle(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, PageError> {
    let done = pools::cycle_pool(State(ctl.clone()), caller.clone(), Path(id.clone()))
        .await
        .map(drop)
        .map_err(PageError::from);
    back(&ctl, &signed, caller, &id, done).await
}

async fn bid(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
    form: FormFields,
) -> Result<Response, PageError> {
    let done = async {
        let body = PoolBidRequest {
            count: count(&form, "count")?
                .ok_or_else(|| PageError::bad_request("count: how many slots"))?,
            bid: number(&form, "bid")?
                .ok_or_else(|| PageError::bad_request("bid: a bid names its price"))?,
            client_token: form.non_empty("client_token").map(str::to_owned),
        };
        let _ = pools::place_pool_request(
            State(ctl.clone()),
            caller.clone(),
            Path(id.clone()),
            Ok(axum::Json(body)),
        )
        .await?;
        Ok::<(), PageError>(())
    }
    .await;
    back(&ctl, &signed, caller, &id, done).await
}

async fn rebid(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path((id, request)): Path<(String, String)>,
    form: FormFields,
) -> Result<Response, PageError> {
    let done = async {
        let bid =
            number(&form, "bid")?.ok_or_else(|| PageError::bad_request("bid: the new bid"))?;
        let _ = pools::rebid_pool_request(
            State(ctl.clone()),
            caller.clone(),
            Path(request),
            Ok(axum::Json(RebidRequest { bid })),
        )
        .await?;
        Ok::<(), PageError>(())
    }
    .await;
    back(&ctl, &signed, caller, &id, done).await
}

async fn cancel(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path((id, request)): Path<(String, String)>,
) -> Result<Response, PageError> {
    let done = pools::cancel_pool_request(State(ctl.clone()), caller.clone(), Path(request))
        .await
        .map(drop)
        .map_err(PageError::from);
    back(&ctl, &signed, caller, &id, done).await
}
