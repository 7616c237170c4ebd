//! Providers of capacity and their agreements (issue 15's policy): admins see every
//! provider, a provider its own profile; both with the agreements, in force or not.
//! Admins record providers, make agreements and end them from forms here; a provider
//! reads its own.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use maud::html;
use surplus_market::records::names_of;

use axum::extract::Path;
use axum::response::Redirect;
use surplus_api::resell::{AgreementRequest, ProviderRequest};
use surplus_market::records::from_name;

use super::view::{action, page, time};
use super::{FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, resell};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/providers", get(providers).post(record_provider))
        .route("/console/agreements", axum::routing::post(make_agreement))
        .route(
            "/console/agreements/{id}/end",
            axum::routing::post(end_agreement),
        )
}

async fn record_provider(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let account = form.non_empty("account").unwrap_or_default().to_owned();
    let body = ProviderRequest {
        name: form.get("name").unwrap_or_default().trim().to_owned(),
        contact: form.get("contact").unwrap_or_default().trim().to_owned(),
        zones: form
            .get("zones")
            .unwrap_or_default()
            .split([',', ' ', '\n'])
            .map(str::trim)
            .filter(|z| !z.is_empty())
            .map(str::to_owned)
            .collect(),
        accepted: form.get("accepted").is_some(),
    };
    let _ = resell::put_provider(State(ctl), caller, Path(account), Ok(axum::Json(body))).await?;
    Ok(Redirect::to("/console/providers"))
}

async fn make_agreement(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let number = |k: &str| -> Result<u32, PageError> {
        let v = form.non_empty(k).unwrap_or_default();
        v.parse()
            .map_err(|_| PageError::bad_request(format!("{k}: {v:?} is not a whole number")))
    };
    let days = number("days")?;
    let now = ctl.app.clock.now_ms();
    fn names<T: serde::de::DeserializeOwned + Ord>(
        form: &FormFields,
        key: &str,
    ) -> Result<std::collections::BTreeSet<T>, PageError> {
        form.all(key)
            .into_iter()
            .map(|v| {
                from_name(v)
                    .ok_or_else(|| PageError::bad_request(format!("{key}: {v:?} is not one")))
            })
            .collect()
    }
    let body = AgreementRequest {
        provider: form.non_empty("provider").unwrap_or_default().to_owned(),
        valid_from_ms: None,
        valid_until_ms: now.saturating_add(i64::from(days) * 86_400_000),
        resource_kinds: names(&form, "kind")?,
        pricing_modes: names(&form, "mode")?,
        commission_bps: number("commission_bps")?,
        max_hosts: number("max_hosts")?,
        max_cpus: match form.non_empty("max_cpus") {
            None => None,
            Some(_) => Some(number("max_cpus")?),
        },
    };
    let _ = resell::create_agreement(State(ctl), caller, Ok(axum::Json(body))).await?;
    Ok(Redirect::to("/console/providers"))
}

async fn end_agreement(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Redirect, PageError> {
    let _ = resell::end_agreement(State(ctl), caller, Path(id)).await?;
    Ok(Redirect::to("/console/providers"))
}

async fn providers(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let admin = signed.principal.role == surplus_market::records::Role::Admin;
    let axum::Json(list) = resell::list_providers(State(ctl.clone()), caller.clone()).await?;
    let axum::Json(agreements) =
        resell::list_agreements(State(ctl.clone()), caller, RawQuery(None)).await?;
    let now = ctl.app.clock.now_ms();
    Ok(page(
        "Providers",
        &signed,
        html! {
            h1 { "Providers" }
            table #providers {
                thead { tr { th { "Account" } th { "Name" } th { "Contact" } th { "Zones" } th { "Accepted" } th { "Since" } } }
                tbody { @for p in &list { tr data-provider=(p.account) {
                    td { code { (p.account) } } td { (p.name) } td { (p.contact) }
                    td { @for z in &p.zones { span.chip { (z) } " " } }
                    td { (if p.accepted { "yes" } else { "no" }) }
                    td { (time(p.created_at_ms)) }
                } } }
            }
            @if list.is_empty() { p.empty { "No provider recorded. Record one with " code { "surplus providers create" } "." } }
            h2 { "Agreements" }
            table #agreements {
                thead { tr {
                    th { "Agreement" } th { "Provider" } th { "In force" } th { "From" } th { "Until" }
                    th { "Kinds" } th { "Pricing" } th { "Commission" } th { "Most hosts" } th { "Most CPUs" }
                    @if admin { th {} }
                } }
                tbody { @for a in &agreements { tr data-agreement=(a.id) {
                    td { code { (a.id) } } td { (a.provider) }
                    td { (if a.in_force(now) { "yes" } else { "no" }) }
                    td { (time(a.valid_from_ms)) } td { (time(a.valid_until_ms)) }
                    td { (names_of(&a.resource_kinds)) } td { (names_of(&a.pricing_modes)) }
                    td.num { (format!("{:.2}%", f64::from(a.commission_bps) / 100.0)) }
                    td.num { (a.max_hosts) }
                    td.num { (a.max_cpus.map_or("no limit".to_owned(), |c| c.to_string())) }
                    @if admin { td { @if a.in_force(now) { (action(&signed, &format!("/console/agreements/{}/end", a.id), "End now", true)) } } }
                } } }
            }
            @if agreements.is_empty() { p.empty { "No agreement." } }
            @if admin {
                h2 { "Record a provider, or change one" }
                form.stacked #provider-form method="post" action="/console/providers" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    label for="account" { "Account (what its tokens and its hosts' provider label name)" } input #account name="account" required;
                    label for="name" { "Name" } input #name name="name" required;
                    label for="contact" { "Contact" } input #contact name="contact" required;
                    label for="zones" { "Zones (its data centers), separated by commas" } input #zones name="zones";
                    label.check { input type="checkbox" name="accepted" value="yes"; " on the accepted-providers list" }
                    button type="submit" { "Record" }
                }
                h2 { "Make an agreement" }
                form.stacked #agreement-form method="post" action="/console/agreements" {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    label for="a-provider" { "Provider" }
                    select #a-provider name="provider" { @for p in &list { option value=(p.account) { (p.account) } } }
                    label for="days" { "In force from now for this many days" } input #days name="days" value="365" inputmode="numeric";
                    fieldset { legend { "Kinds of capacity" }
                        @for k in ["compute", "storage", "bandwidth"] { label.check { input type="checkbox" name="kind" value=(k) checked[k == "compute"]; " " (k) } } }
                    fieldset { legend { "Pricing modes" }
                        @for m in ["on_demand", "spot", "auction", "immediate", "reserved"] { label.check { input type="checkbox" name="mode" value=(m) checked[m == "on_demand"]; " " (m) } } }
                    label for="commission_bps" { "Commission, basis points (1500 is 15%)" } input #commission_bps name="commission_bps" value="1000" inputmode="numeric";
                    label for="max_hosts" { "Most hosts listed at once" } input #max_hosts name="max_hosts" value="10" inputmode="numeric";
                    label for="max_cpus" { "Most CPU threads offered at once, as claimed (empty: no limit)" } input #max_cpus name="max_cpus" inputmode="numeric";
                    button type="submit" { "Make" }
                }
            }
        },
    ))
}
