//! Providers of capacity and their agreements (issue 15's policy): admins see every
//! provider, a provider its own profile; both with the agreements, in force or not.
//! Read-only here: admins change them through the API or the CLI.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use maud::html;
use surplus_market::records::names_of;

use super::view::{page, time};
use super::{Page, Signed};
use crate::app::Controller;
use crate::http::{Caller, resell};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/console/providers", get(providers))
}

async fn providers(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
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
                    th { "Kinds" } th { "Pricing" } th { "Commission" } th { "Most hosts" }
                } }
                tbody { @for a in &agreements { tr data-agreement=(a.id) {
                    td { code { (a.id) } } td { (a.provider) }
                    td { (if a.in_force(now) { "yes" } else { "no" }) }
                    td { (time(a.valid_from_ms)) } td { (time(a.valid_until_ms)) }
                    td { (names_of(&a.resource_kinds)) } td { (names_of(&a.pricing_modes)) }
                    td.num { (format!("{:.2}%", f64::from(a.commission_bps) / 100.0)) }
                    td.num { (a.max_hosts) }
                } } }
            }
            @if agreements.is_empty() { p.empty { "No agreement." } }
        },
    ))
}
