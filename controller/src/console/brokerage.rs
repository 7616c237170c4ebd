//! Brokerage (issue 18, source 003 FIG. 4 and 5), for admins: the subscriptions with
//! a form to make one; the margin tables laid out like FIG. 4 (a column per period,
//! each user's use across clouds and its margin, then the net margin, the offset cost
//! and the excess capacity, with the totals); and a bundle's plan drawn as a
//! timeline: who contributes what, when; the bundles tendered (placed, held by whom,
//! paid out) and every tender sent or answered with its shortfalls. Every page reads
//! and acts through the API's handlers; a refusal is the page again with the API's
//! reason.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::{Markup, html};
use surplus_api::brokerage::{BundlePlanRequest, BundlePlanView, MarginsView, SubscriptionCreate};

use super::view::{page, time};
use super::{FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{ApiError, Caller, brokerage};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/brokerage", get(show))
        .route("/console/brokerage/subscriptions", post(subscribe))
        .route("/console/brokerage/plan", post(plan))
}

async fn show(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Page {
    brokerage_page(
        &ctl,
        &signed,
        caller,
        query,
        &FormFields::default(),
        None,
        None,
    )
    .await
}

/// `HH:MM` (UTC).
fn clock(ms: i64) -> String {
    let m = ms.div_euclid(60_000).rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

async fn brokerage_page(
    ctl: &Arc<Controller>,
    signed: &Signed,
    caller: Caller,
    query: Option<String>,
    f: &FormFields,
    error: Option<&str>,
    plan: Option<(&BundlePlanRequest, &BundlePlanView)>,
) -> Page {
    let Json(subs) = brokerage::list_subscriptions(State(ctl.clone()), caller.clone()).await?;
    let margins: Result<MarginsView, PageError> =
        brokerage::brokerage_margins(State(ctl.clone()), caller.clone(), RawQuery(query))
            .await
            .map(|Json(v)| v)
            .map_err(PageError::from);
    let Json(bundles) = brokerage::list_bundles(State(ctl.clone()), caller.clone()).await?;
    let Json(tenders) = brokerage::list_tenders(State(ctl.clone()), caller.clone()).await?;
    let v = |k: &str, default: &str| f.get(k).unwrap_or(default).to_owned();
    let field = |name: &str, label: &str, default: &str| {
        html! { label { (label) " " input name=(name) value=(v(name, default)) size="10"; } }
    };
    Ok(page(
        "Brokerage",
        signed,
        html! {
            h1 { "Brokerage" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            h2 { "Subscriptions" }
            table #subscriptions {
                thead { tr { th { "User" } th { "Resource" } th { "Period" } th { "Limit" } th { "Overage rate" } th { "Administrator" } th { "Available (UTC)" } } }
                tbody { @for s in &subs { tr {
                    td { (s.user) } td { (s.resource) } td { (s.period) } td.num { (s.limit) }
                    td.num { (s.overage_rate) " " (s.currency) } td { (s.administrator) }
                    td { @if s.availability.is_empty() { "any time" } @else { (s.availability.join(", ")) } }
                } } }
            }
            @if subs.is_empty() { p.empty { "No subscription yet." } }
            form #subscribe method="post" action="/console/brokerage/subscriptions" {
                input type="hidden" name="csrf" value=(signed.csrf);
                (field("user", "User", "")) (field("resource", "Resource", "os_instances"))
                (field("period", "Period", "1h")) (field("limit", "Limit", "10"))
                (field("overage_rate", "Overage rate", "50")) (field("administrator", "Administrator", ""))
                (field("availability", "Available (UTC, such as 09:00-17:00)", ""))
                button type="submit" { "Subscribe" }
            }
            h2 { "Margins" }
            @match &margins {
                Ok(m) => { (margin_tables(m)) }
                Err(e) => { p.error role="alert" { (e.message) } }
            }
            h2 { "Plan a bundle" }
            form #plan method="post" action="/console/brokerage/plan" {
                input type="hidden" name="csrf" value=(signed.csrf);
                (field("resource", "Resource", "os_instances")) (field("amount", "Amount", "1"))
                (field("starts_in", "Starts in (min)", "10")) (field("lasts", "Lasts (min)", "60"))
                (field("rate", "Rate per unit-hour", "100"))
                button type="submit" { "Plan" }
            }
            @if let Some((request, view)) = plan { (timeline(request, view)) }
            h2 { "Bundles tendered" }
            table #bundles {
                thead { tr { th { "Bundle" } th { "Resource" } th { "Amount" } th { "Interval (UTC)" } th { "Price" } th { "Placed" } th { "Held (unit-min)" } th { "Paid out" } } }
                tbody { @for b in &bundles { tr {
                    td { (b.id) } td { (b.resource) } td.num { (b.amount) }
                    td { (clock(b.from_ms)) "–" (clock(b.until_ms)) }
                    td.num { (b.price) " " (b.currency) } td.num { (b.placed) }
                    td { @for (who, ms) in &b.held { (who) " " (ms / 60_000) " " } }
                    td { @if let Some(t) = b.settled_at_ms { (time(t)) } @else { "not yet" } }
                } } }
            }
            @if bundles.is_empty() { p.empty { "No bundle tendered yet (surplus brokerage bundle tender)." } }
            h2 { "Tenders" }
            table #tenders {
                thead { tr { th { "Direction" } th { "Peer" } th { "Resource" } th { "Offered" } th { "State" } th { "Taken" } th { "Price" } th { "Reason" } th { "Shortfalls" } } }
                tbody { @for t in &tenders { tr {
                    td { (t.direction) } td { (t.peer) } td { (t.resource) }
                    td { (t.amount) " for " (t.offered_price) " " (t.currency) ", " (clock(t.from_ms)) "–" (clock(t.until_ms)) }
                    td { (t.state) } td.num { (t.accepted_amount) } td.num { (t.price) }
                    td { (t.reason.clone().unwrap_or_default()) }
                    td { @for g in &t.shortfalls { (g.missing) " short " (clock(g.from)) "–" (clock(g.until)) " " } }
                } } }
            }
            @if tenders.is_empty() { p.empty { "No tender sent or answered yet." } }
        },
    ))
}

/// FIG. 4: per subscriber and resource, a column per period.
fn margin_tables(m: &MarginsView) -> Markup {
    html! {
        p { "Clouds: " (m.clouds.join(", ")) "; from " (time(m.from)) " to " (time(m.until)) "." }
        @if m.subscribers.is_empty() { p.empty { "No subscription in this window." } }
        @for sub in &m.subscribers {
            @for r in &sub.table.resources {
                h3 { (sub.administrator) ": " (r.resource) " per " (crate::brokerage::period_name(r.period_ms)) }
                div.scroll { table.margins data-administrator=(sub.administrator) data-resource=(r.resource) {
                    thead { tr {
                        th { "User (limit)" }
                        @for p in &r.periods { th { (clock(*p)) } }
                        th { "Total" }
                    } }
                    tbody {
                        @for u in &r.users { tr data-user=(u.user) {
                            th { (u.user) " (" (u.limit) ")" }
                            @for c in &u.cells { td.num title={ "used " (c.used) } { (c.used) " (" (format!("{:+}", c.margin)) ")" } }
                            td.num { (format!("{:+}", u.marginal_total)) }
                        } }
                        tr.net { th { "Net margin" } @for n in &r.net_margins { td.num { (format!("{n:+}")) } } td.num { (format!("{:+}", r.marginal_total)) } }
                        tr.cost { th { "Offset cost" } @for c in &r.offset_costs { td.num { (c) } } td.num { (r.aggregate_offset_cost) } }
                        tr.excess { th { "Excess capacity" } @for e in &r.excess_capacity { td.num { (e) } } td.num { (r.excess_capacity.iter().sum::<u64>()) } }
                    }
                } }
            }
            @for b in &sub.billing {
                p.bill { "Bill to " (b.administrator) ": " (b.amount) " for " (b.net_over) " " (b.resource) " over, netted." }
            }
        }
        @if !m.unsubscribed.is_empty() {
            p { (m.unsubscribed.len()) " minutes of use by users without a subscription are counted nowhere." }
        }
    }
}

/// A bundle's arrangement as a timeline (FIG. 5): a row per contributor, a bar per
/// contribution across the interval; or where it falls short.
fn timeline(request: &BundlePlanRequest, view: &BundlePlanView) -> Markup {
    const WIDTH: f64 = 600.0;
    const ROW: f64 = 24.0;
    let span = (view.until - view.from).max(1) as f64;
    let x = |t: i64| ((t.clamp(view.from, view.until) - view.from) as f64 / span * WIDTH).round();
    html! {
        @match &view.arrangement {
            Some(a) => {
                @let contributors: Vec<&str> = a.contributors().into_iter().collect();
                p #plan-summary {
                    (request.amount) " " (request.resource) " from " (clock(view.from)) " to " (clock(view.until))
                    " by " (contributors.len()) " contributors"
                    @if let Some(p) = &view.price { ", for " (p.total) }
                    "."
                }
                svg #timeline xmlns="http://www.w3.org/2000/svg" width=(WIDTH + 160.0) height=(ROW * contributors.len() as f64 + 30.0) role="img" aria-label="Who contributes what, when" {
                    @for (i, name) in contributors.iter().enumerate() {
                        text x="0" y=(ROW * i as f64 + 16.0) font-size="12" { (name) }
                        @for c in a.contributions.iter().filter(|c| c.contributor == *name) {
                            rect.contribution data-contributor=(name) x=(160.0 + x(c.from)) y=(ROW * i as f64 + 4.0)
                                width=((x(c.until) - x(c.from)).max(1.0)) height=(ROW - 8.0) fill="#4a7bd0" {
                                title { (name) ": " (c.amount) " from " (clock(c.from)) " to " (clock(c.until)) }
                            }
                        }
                    }
                    text x="160" y=(ROW * contributors.len() as f64 + 22.0) font-size="11" { (clock(view.from)) }
                    text x=(WIDTH + 130.0) y=(ROW * contributors.len() as f64 + 22.0) font-size="11" { (clock(view.until)) }
                }
            }
            None => {
                @for s in &view.shortfalls {
                    p.shortfall role="alert" {
                        "Short from " (clock(s.from)) " to " (clock(s.until)) ": " (s.needed) " " (s.resource)
                        " needed, " (s.available) " available."
                    }
                }
            }
        }
    }
}

async fn subscribe(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    form: FormFields,
) -> Result<Response, PageError> {
    let number = |k: &str| -> Result<i64, PageError> {
        form.non_empty(k).unwrap_or("").parse::<i64>().map_err(|_| {
            PageError::new(
                axum::http::StatusCode::BAD_REQUEST,
                format!("{k}: a whole number"),
            )
        })
    };
    let body = (|| {
        Ok::<_, PageError>(SubscriptionCreate {
            user: form.non_empty("user").unwrap_or("").to_owned(),
            resource: form.non_empty("resource").unwrap_or("").to_owned(),
            period: form.non_empty("period").unwrap_or("").to_owned(),
            limit: u64::try_from(number("limit")?).map_err(|_| {
                PageError::new(axum::http::StatusCode::BAD_REQUEST, "limit: not negative")
            })?,
            overage_rate: number("overage_rate")?,
            administrator: form.non_empty("administrator").map(str::to_owned),
            currency: None,
            availability: form
                .non_empty("availability")
                .map(|a| a.split(',').map(|w| w.trim().to_owned()).collect()),
        })
    })();
    let made = match body {
        Ok(body) => {
            brokerage::create_subscription(State(ctl.clone()), caller.clone(), Ok(Json(body)))
                .await
                .map(|_| ())
                .map_err(PageError::from)
        }
        Err(e) => Err(e),
    };
    match made {
        Ok(()) => Ok(Redirect::to("/console/brokerage").into_response()),
        Err(e) => Ok((
            e.status,
            brokerage_page(&ctl, &signed, caller, None, &form, Some(&e.message), None).await?,
        )
            .into_response()),
    }
}

async fn plan(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    form: FormFields,
) -> Result<Response, PageError> {
    let number = |k: &str| -> Result<u64, ApiError> {
        form.non_empty(k)
            .unwrap_or("")
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request(format!("{k}: a whole number, not negative")))
    };
    let now = ctl.app.clock.now_ms();
    let minute = 60_000_i64;
    let request = (|| {
        let starts = now.div_euclid(minute) * minute
            + i64::try_from(number("starts_in")?).unwrap_or(i64::MAX / 4) * minute;
        let lasts = i64::try_from(number("lasts")?).unwrap_or(i64::MAX / 4) * minute;
        Ok::<_, ApiError>(BundlePlanRequest {
            resource: form.non_empty("resource").unwrap_or("").to_owned(),
            amount: number("amount")?,
            from: starts,
            until: Some(starts.saturating_add(lasts)),
            interval: None,
            hold_minimum: None,
            share_bps: None,
            history: None,
            rate_per_unit_hour: Some(number("rate")?),
            floor_per_contributor: None,
        })
    })();
    let answer = match request {
        Ok(r) => brokerage::plan_bundle(State(ctl.clone()), caller.clone(), Ok(Json(r.clone())))
            .await
            .map(|Json(v)| (r, v)),
        Err(e) => Err(e),
    };
    match answer {
        Ok((r, v)) => Ok(
            brokerage_page(&ctl, &signed, caller, None, &form, None, Some((&r, &v)))
                .await?
                .into_response(),
        ),
        Err(e) => {
            let e = PageError::from(e);
            Ok((
                e.status,
                brokerage_page(&ctl, &signed, caller, None, &form, Some(&e.message), None).await?,
            )
                .into_response())
        }
    }
}
