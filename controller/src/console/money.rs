//! Money pages: invoices with their lines (clients their own, admins all), provider
//! statements, ledger balances, and the admin's forms for payments and payouts.
//! Amounts are the ledger's integers in each currency's smallest unit, as the API
//! and the CLI show them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::response::Redirect;
use axum::routing::{get, post};
use maud::{Markup, html};
use surplus_api::billing::{InvoiceView, MoneyRequest};
use surplus_market::records::{InvoiceLine, Role};

use super::view::{page, time};
use super::{Filled, FormFields, Page, PageError, Signed};
use crate::app::Controller;
use crate::http::{Caller, billing};

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/console/invoices", get(invoices))
        .route("/console/invoices/{id}", get(invoice))
        .route("/console/statements", get(statement))
        .route("/console/balances", get(balances))
        .route("/console/payments", post(payment))
        .route("/console/payouts", post(payout))
}

fn totals(t: &BTreeMap<String, i64>) -> String {
    if t.is_empty() {
        return "-".into();
    }
    t.iter()
        .map(|(c, a)| format!("{a} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn period(from_ms: i64, to_ms: i64) -> String {
    format!("{} to {}", time(from_ms), time(to_ms))
}

async fn invoices(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let axum::Json(list) = billing::invoices(State(ctl), caller, RawQuery(None)).await?;
    Ok(page(
        "Invoices",
        &signed,
        html! {
            h1 { "Invoices" }
            table #invoices {
                thead { tr { th { "Invoice" } th { "Client" } th { "Period" } th { "Lines" } th { "Total" } } }
                tbody { @for i in &list { tr data-invoice=(i.invoice_id) {
                    td { a href={ "/console/invoices/" (i.invoice_id) } { code { (i.invoice_id) } } }
                    td { (i.client) } td { (period(i.from_ms, i.to_ms)) }
                    td.num { (i.lines.len()) } td.num { (totals(&i.totals)) }
                } } }
            }
            @if list.is_empty() { p.empty { "No invoice yet: invoices are made by billing runs." } }
        },
    ))
}

fn lines_table(lines: &[InvoiceLine]) -> Markup {
    html! {
        table.lines {
            thead { tr { th { "Provider" } th { "Instance" } th { "Meter" } th { "Kind" } th { "Quantity" } th { "Unit" } th { "Rate" } th { "Amount" } } }
            tbody { @for l in lines { tr {
                td { (l.provider) } td { code { (l.instance_id) } } td { (l.charge.meter) } td { (l.kind) }
                td.num { (format!("{:.4}", l.charge.quantity)) } td { (l.charge.unit) }
                td.num { (l.charge.rate) } td.num { (l.charge.amount) " " (l.currency) }
            } } }
        }
    }
}

async fn invoice(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    Path(id): Path<String>,
) -> Page {
    let axum::Json(i): axum::Json<InvoiceView> =
        billing::invoice(State(ctl), caller, Path(id)).await?;
    Ok(page(
        &i.invoice_id,
        &signed,
        html! {
            h1 { "Invoice " code { (i.invoice_id) } }
            dl.facts {
                dt { "Client" } dd { (i.client) }
                dt { "Period" } dd { (period(i.from_ms, i.to_ms)) }
                dt { "Total" } dd #invoice-total { (totals(&i.totals)) }
            }
            (lines_table(&i.lines))
        },
    ))
}

async fn statement(
    State(ctl): State<Arc<Controller>>,
    signed: Signed,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Page {
    let asked =
        Some(Filled::of(query.as_deref()).get("provider").to_owned()).filter(|p| !p.is_empty());
    // An admin picks the provider first; a provider sees its own.
    if signed.principal.role == Role::Admin && asked.is_none() {
        return Ok(page(
            "Statements",
            &signed,
            html! {
                h1 { "Provider statements" }
                form.filters method="get" action="/console/statements" {
                    label for="provider" { "Provider account" }
                    input #provider name="provider" required;
                    button type="submit" { "Show" }
                }
            },
        ));
    }
    let query = asked.map(|p| {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("provider", &p)
            .finish()
    });
    let axum::Json(s) = billing::statements(State(ctl), caller, RawQuery(query)).await?;
    Ok(page(
        "Statement",
        &signed,
        html! {
            h1 { "Statement of " (s.provider) }
            table #statement {
                thead { tr { th { "Currency" } th { "Gross" } th { "Commission" } th { "Net" } th { "Paid out" } th { "Balance" } } }
                tbody { @for (c, gross) in &s.gross {
                    @let of = |m: &BTreeMap<String, i64>| m.get(c).map_or("-".into(), i64::to_string);
                    tr { td { (c) } td.num { (gross) } td.num { (of(&s.commission)) } td.num { (of(&s.net)) } td.num { (of(&s.payouts)) } td.num { (of(&s.balance)) } }
                } }
            }
            @if s.gross.is_empty() { p.empty { "Nothing billed on this provider's hosts yet." } }
            h2 { "Lines" }
            (lines_table(&s.lines))
        },
    ))
}

async fn balances(State(ctl): State<Arc<Controller>>, signed: Signed, caller: Caller) -> Page {
    let axum::Json(rows) = billing::balances(State(ctl), caller, RawQuery(None)).await?;
    let admin = signed.principal.role == Role::Admin;
    Ok(page(
        "Balances",
        &signed,
        html! {
            h1 { "Ledger balances" }
            table #balances {
                thead { tr { th { "Account" } th { "Currency" } th { "Balance" } } }
                tbody { @for b in &rows { tr { td { code { (b.account) } } td { (b.currency) } td.num { (b.balance) } } } }
            }
            @if rows.is_empty() { p.empty { "No posting yet." } }
            @if admin {
                h2 { "Record a payment or a payout" }
                @for (to, what, hint) in [("/console/payments", "Payment from client", "client account"), ("/console/payouts", "Payout to provider", "provider account")] {
                    form.filters method="post" action=(to) {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        strong { (what) }
                        input name="account" placeholder=(hint) required;
                        input name="amount" inputmode="numeric" placeholder="amount" required;
                        input name="currency" value="USD" required;
                        input name="key" placeholder="reference (makes it idempotent)" required;
                        button type="submit" { "Record" }
                    }
                }
            }
        },
    ))
}

fn money(form: &FormFields) -> Result<MoneyRequest, PageError> {
    let field = |k: &str| {
        form.non_empty(k)
            .map(str::to_owned)
            .ok_or_else(|| PageError::bad_request(format!("{k}: required")))
    };
    let amount = field("amount")?;
    Ok(MoneyRequest {
        account: field("account")?,
        currency: field("currency")?,
        amount: amount.parse().map_err(|_| {
            PageError::bad_request(format!("amount: {amount:?} is not a whole number"))
        })?,
        kind: None,
        key: field("key")?,
    })
}

async fn payment(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let axum::Json(_posted) =
        billing::payment(State(ctl), caller, Ok(axum::Json(money(&form)?))).await?;
    Ok(Redirect::to("/console/balances"))
}

async fn payout(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    form: FormFields,
) -> Result<Redirect, PageError> {
    let axum::Json(_posted) =
        billing::payout(State(ctl), caller, Ok(axum::Json(money(&form)?))).await?;
    Ok(Redirect::to("/console/balances"))
}
