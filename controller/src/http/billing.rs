//! The metering, usage, ledger and billing endpoints.

use std::collections::BTreeMap;

use surplus_api::billing::*;

use super::*;
use crate::billing::{Period, PricePlan};
use crate::ledger;
use crate::metering::SetMeteringError;
use crate::store::{AgentRecord, InvoiceLine, PostError, UsageQuery};

pub(super) fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        route("GET", "/v1/agents/{id}/metering", Token, get_metering),
        route("PUT", "/v1/agents/{id}/metering", Token, put_metering),
        route("PUT", "/v1/agents/{id}/price-plan", Token, put_price_plan),
        route("GET", "/v1/usage", Token, usage),
        route("POST", "/v1/billing/runs", Token, billing_run),
        route("POST", "/v1/payments", Token, payment),
        route("POST", "/v1/payouts", Token, payout),
        route("PUT", "/v1/ledger/accounts/{account}", Token, put_account),
        route("GET", "/v1/ledger/balances", Token, balances),
        route("GET", "/v1/invoices", Token, invoices),
        route("GET", "/v1/invoices/{id}", Token, invoice),
        route("GET", "/v1/statements", Token, statements),
    ]
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// Query parameters, each at most once, none unknown.
pub(super) fn query_map(
    query: Option<&str>,
    allowed: &[&str],
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for (k, v) in form_pairs(query.unwrap_or("")) {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?} ({})",
                allowed.join(", ")
            ))
            .with_field(k));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(ApiError::bad_request(format!("{k} given twice")).with_field(k));
        }
    }
    Ok(out)
}

fn ms_param(q: &BTreeMap<String, String>, key: &str, default: i64) -> Result<i64, ApiError> {
    match q.get(key) {
        None => Ok(default),
        Some(v) => v.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("{key}: {v:?} is not a time in ms since the epoch"))
                .with_field(key.into())
        }),
    }
}

/// Admins, and the provider whose host it is.
pub(super) fn require_host_owner(caller: &Caller, agent: &AgentRecord) -> Result<(), ApiError> {
    if is_host_owner(caller, agent) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("agent {} is not a host of this account", agent.id),
        ))
    }
}

/// May the caller see this host's own business: an admin, or the provider its
/// `provider` label names.
pub(super) fn is_host_owner(caller: &Caller, agent: &AgentRecord) -> bool {
    match caller.0.role {
        Role::Admin => true,
        Role::Provider => crate::billing::provider_of(&agent.labels) == caller.0.account,
        _ => false,
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(message).with_field(field.into())
}

#[utoipa::path(put, path = "/v1/agents/{id}/metering", tag = "billing", params(("id" = Uuid, Path, description = "The agent")), request_body = MeteringRequest, responses((status = 200, description = "The periods, acknowledged by the agent", body = MeteringView)))]
pub(super) async fn put_metering(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<MeteringRequest>, JsonRejection>,
) -> ApiResult<MeteringView> {
    let agent = load_agent(&ctl, &id).await?;
    require_host_owner(&caller, &agent)?;
    let Json(body) = body?;
    let (stored, spool) = ctl.app.store.metering(agent.id).await?;
    let mut periods = stored.unwrap_or_default();
    for (field, text, slot) in [
        ("instance", &body.instance, &mut periods.instance_ms),
        ("host", &body.host, &mut periods.host_ms),
        (
            "subscription",
            &body.subscription,
            &mut periods.subscription_ms,
        ),
    ] {
        if let Some(t) = text {
            let d = humantime::parse_duration(t)
                .map_err(|e| invalid(field, format!("{field}: {t:?}: {e}")))?;
            *slot = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        }
    }
    periods
        .validate()
        .map_err(|e| invalid(e.split(':').next().unwrap_or("periods"), e.clone()))?;
    let ack = match ctl.metering.set_metering(agent.id, periods).await {
        Ok(ack) => ack,
        Err(SetMeteringError::Invalid(e)) => return Err(ApiError::bad_request(e)),
        Err(SetMeteringError::Store(e)) => return Err(e.into()),
        Err(SetMeteringError::Link(e)) => return Err(e.into()),
    };
    Ok(Json(MeteringView {
        agent_id: agent.id,
        periods: Some(periods),
        delivered: ack.is_some(),
        effective_from_ms: ack.map(|a| a.effective_from_ms),
        spool,
    }))
}

#[utoipa::path(get, path = "/v1/agents/{id}/metering", tag = "billing", params(("id" = Uuid, Path, description = "The agent")), responses((status = 200, description = "Metering periods and spool state", body = MeteringView)))]
pub(crate) async fn get_metering(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<MeteringView> {
    let agent = load_agent(&ctl, &id).await?;
    require_host_owner(&caller, &agent)?;
    let (periods, spool) = ctl.app.store.metering(agent.id).await?;
    Ok(Json(MeteringView {
        agent_id: agent.id,
        periods,
        delivered: false,
        effective_from_ms: None,
        spool,
    }))
}

/// `GET /v1/usage?instance=&agent=&account=&meter=&from=&to=&granularity=hour|day`.
/// Clients see their own instances; providers one of their hosts (`agent=`); admins
/// anything. Records count in the bucket their period ends in.
#[utoipa::path(get, path = "/v1/usage", tag = "billing", params(("instance" = Option<String>, Query, description = "One instance"), ("agent" = Option<Uuid>, Query, description = "One host (required for providers)"), ("account" = Option<String>, Query, description = "One client account"), ("meter" = Option<String>, Query, description = "One meter (cpu_seconds, memory_byte_seconds, ...)"), ("from" = Option<i64>, Query, description = "Start, Unix ms (default: a day before `to`)"), ("to" = Option<i64>, Query, description = "End, Unix ms (default: now)"), ("granularity" = Option<String>, Query, description = "hour (default) or day")), responses((status = 200, description = "Usage in buckets", body = UsageView)))]
pub(crate) async fn usage(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<UsageView> {
    let q = query_map(
        query.as_deref(),
        &[
            "instance",
            "agent",
            "account",
            "meter",
            "from",
            "to",
            "granularity",
        ],
    )?;
    let now = ctl.app.clock.now_ms();
    let to_ms = ms_param(&q, "to", now)?;
    let from_ms = ms_param(&q, "from", to_ms - DAY_MS)?;
    if to_ms <= from_ms {
        return Err(invalid("to", "to must be after from"));
    }
    let (granularity, bucket_ms) = match q.get("granularity").map(String::as_str) {
        None | Some("hour") => ("hour", HOUR_MS),
        Some("day") => ("day", DAY_MS),
        Some(other) => {
            return Err(invalid(
                "granularity",
                format!("granularity: {other:?} is not hour or day"),
            ));
        }
    };
    let agent_id = match q.get("agent") {
        Some(a) => Some(load_agent(&ctl, a).await?),
        None => None,
    };
    let mut filter = UsageQuery {
        agent_id: agent_id.as_ref().map(|a| a.id),
        subject: q.get("instance").cloned(),
        account: q.get("account").cloned(),
        owner_role: None,
        meter: q.get("meter").cloned(),
        from_ms,
        to_ms,
        bucket_ms,
    };
    match caller.0.role {
        Role::Admin => {}
        Role::Provider => match &agent_id {
            Some(a) => require_host_owner(&caller, a)?,
            None => {
                return Err(invalid(
                    "agent",
                    "providers query one of their hosts: give agent=<id>",
                ));
            }
        },
        Role::Client => {
            if filter
                .account
                .as_ref()
                .is_some_and(|a| *a != caller.0.account)
            {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "clients see their own account's usage",
                ));
            }
            // The client's own instances: its account name in the client role, not
            // instances an admin of the same name ran.
            filter.account = Some(caller.0.account.clone());
            filter.owner_role = Some(Role::Client);
        }
        Role::PoolOwner => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "usage is read by clients (their instances), providers (their hosts) and admins",
            ));
        }
    }
    let rows = ctl.app.store.usage(&filter).await?;
    Ok(Json(UsageView {
        granularity: granularity.into(),
        from_ms,
        to_ms,
        rows,
    }))
}

#[utoipa::path(put, path = "/v1/agents/{id}/price-plan", tag = "billing", params(("id" = Uuid, Path, description = "The agent")), request_body = PricePlan, responses((status = 200, description = "The host's price plan from now on", body = PricePlan)))]
pub(super) async fn put_price_plan(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Json<PricePlan>, JsonRejection>,
) -> ApiResult<PricePlan> {
    let agent = load_agent(&ctl, &id).await?;
    require_host_owner(&caller, &agent)?;
    let Json(plan) = body?;
    plan.validate()
        .map_err(|(field, message)| invalid(&field, format!("{field}: {message}")))?;
    ctl.app
        .store
        .set_agent_price_plan(agent.id, &plan, ctl.app.clock.now_ms())
        .await?;
    Ok(Json(plan))
}

#[utoipa::path(post, path = "/v1/billing/runs", tag = "billing", request_body = BillingRunRequest, responses((status = 200, description = "What the run invoiced", body = BillingRun)))]
pub(super) async fn billing_run(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<BillingRunRequest>, JsonRejection>,
) -> ApiResult<BillingRun> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    let period = Period {
        from_ms: body.from_ms,
        to_ms: body.to_ms,
    };
    use crate::metering::BillingError;
    let e = match ctl.metering.billing_run(period).await {
        Ok(run) => return Ok(Json(run)),
        Err(e) => e,
    };
    let message = e.to_string();
    Err(match e {
        BillingError::Period(e) => invalid("from_ms", e),
        BillingError::Waiting {
            waiting,
            retry_after_ms,
            ..
        } => ApiError::new(StatusCode::CONFLICT, "usage_pending", message)
            .with_detail("waiting_for", waiting)
            .with_detail("retry_after_ms", retry_after_ms),
        BillingError::Overlap { .. } => ApiError::new(StatusCode::CONFLICT, "conflict", message),
        BillingError::Store(e) => e.into(),
    })
}

fn check_money(body: &MoneyRequest) -> Result<(), ApiError> {
    surplus_protocol::control::validate_name("account", &body.account)
        .map_err(|e| invalid("account", e.to_string()))?;
    ledger::validate_currency(&body.currency).map_err(|e| invalid("currency", e))?;
    if body.amount <= 0 {
        return Err(invalid(
            "amount",
            "amount must be more than zero (minor units)",
        ));
    }
    if body.key.is_empty() || body.key.len() > 128 {
        return Err(invalid("key", "key: 1 to 128 characters"));
    }
    Ok(())
}

async fn apply(ctl: &Controller, posting: ledger::Posting) -> ApiResult<PostingView> {
    let result = match ctl
        .app
        .store
        .post(&posting, &[], ctl.app.clock.now_ms())
        .await
    {
        Ok(r) => r,
        Err(PostError::Ledger(e @ ledger::LedgerError::KeyReused(_))) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                e.to_string(),
            ));
        }
        Err(PostError::Ledger(e @ ledger::LedgerError::Insufficient { .. })) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "insufficient_funds",
                e.to_string(),
            ));
        }
        Err(PostError::Ledger(e)) => return Err(ApiError::bad_request(e.to_string())),
        Err(PostError::Store(e)) => return Err(e.into()),
    };
    let mut balances = Vec::new();
    for e in &posting.entries {
        for (account, currency, balance) in ctl.app.store.balances(Some(&e.account)).await? {
            if currency == e.currency
                && !balances
                    .iter()
                    .any(|b: &BalanceView| b.account == account && b.currency == currency)
            {
                balances.push(BalanceView {
                    account,
                    currency,
                    balance,
                });
            }
        }
    }
    Ok(Json(PostingView {
        key: posting.key,
        result,
        balances,
    }))
}

#[utoipa::path(post, path = "/v1/payments", tag = "billing", request_body = MoneyRequest, responses((status = 200, description = "The posting", body = PostingView)))]
pub(crate) async fn payment(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<MoneyRequest>, JsonRejection>,
) -> ApiResult<PostingView> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    check_money(&body)?;
    let kind = body.kind.as_deref().unwrap_or("topup");
    if !["topup", "upfront", "settlement"].contains(&kind) {
        return Err(invalid(
            "kind",
            format!("kind: {kind:?} is not topup, upfront or settlement"),
        ));
    }
    let key = format!("payment:{}", body.key);
    apply(
        &ctl,
        ledger::payment(&key, kind, &body.account, &body.currency, body.amount),
    )
    .await
}

#[utoipa::path(post, path = "/v1/payouts", tag = "billing", request_body = MoneyRequest, responses((status = 200, description = "The posting", body = PostingView)))]
pub(crate) async fn payout(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    body: Result<Json<MoneyRequest>, JsonRejection>,
) -> ApiResult<PostingView> {
    caller.require(Role::Admin)?;
    let Json(body) = body?;
    check_money(&body)?;
    if body.kind.is_some() {
        return Err(invalid("kind", "payouts have no kind"));
    }
    let key = format!("payout:{}", body.key);
    apply(
        &ctl,
        ledger::payout(&key, &body.account, &body.currency, body.amount),
    )
    .await
}

#[utoipa::path(put, path = "/v1/ledger/accounts/{account}", tag = "billing", params(("account" = String, Path, description = "The ledger account")), request_body = AccountPolicy, responses((status = 200, description = "The account's policy", body = AccountPolicyView)))]
pub(super) async fn put_account(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(account): Path<String>,
    body: Result<Json<AccountPolicy>, JsonRejection>,
) -> ApiResult<AccountPolicyView> {
    caller.require(Role::Admin)?;
    ledger::validate_account(&account).map_err(|e| invalid("account", e))?;
    let Json(body) = body?;
    if body.allow_negative && (account == ledger::MARKETPLACE || account.starts_with("provider:")) {
        return Err(invalid(
            "allow_negative",
            "providers and the marketplace can only hold what they earned",
        ));
    }
    ctl.app
        .store
        .set_account_policy(&account, body.allow_negative, ctl.app.clock.now_ms())
        .await?;
    Ok(Json(AccountPolicyView {
        account,
        allow_negative: body.allow_negative,
    }))
}

/// The ledger account a caller may read, from an optional `account=` parameter.
fn readable_account(caller: &Caller, asked: Option<&String>) -> Result<Option<String>, ApiError> {
    let own = match caller.0.role {
        Role::Admin => return Ok(asked.cloned()),
        Role::Provider => ledger::provider(&caller.0.account),
        Role::Client => ledger::client(&caller.0.account),
        Role::PoolOwner => ledger::pool(&caller.0.account),
    };
    match asked {
        Some(a) if *a != own => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token reads {own} only"),
        )),
        _ => Ok(Some(own)),
    }
}

#[utoipa::path(get, path = "/v1/ledger/balances", tag = "billing", params(("account" = Option<String>, Query, description = "One account")), responses((status = 200, description = "Balances the caller may see", body = Vec<BalanceView>)))]
pub(crate) async fn balances(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<BalanceView>> {
    let q = query_map(query.as_deref(), &["account"])?;
    let account = readable_account(&caller, q.get("account"))?;
    let rows = ctl.app.store.balances(account.as_deref()).await?;
    Ok(Json(
        rows.into_iter()
            .map(|(account, currency, balance)| BalanceView {
                account,
                currency,
                balance,
            })
            .collect(),
    ))
}

fn invoices_of(lines: Vec<InvoiceLine>) -> Vec<InvoiceView> {
    let mut by_id: BTreeMap<String, InvoiceView> = BTreeMap::new();
    for l in lines {
        let inv = by_id
            .entry(l.invoice_id.clone())
            .or_insert_with(|| InvoiceView {
                invoice_id: l.invoice_id.clone(),
                client: l.client.clone(),
                from_ms: l.from_ms,
                to_ms: l.to_ms,
                totals: BTreeMap::new(),
                lines: Vec::new(),
            });
        *inv.totals.entry(l.currency.clone()).or_default() += l.charge.amount;
        inv.lines.push(l);
    }
    let mut out: Vec<InvoiceView> = by_id.into_values().collect();
    for inv in &mut out {
        inv.lines.sort_by(|a, b| {
            (&a.provider, &a.instance_id, &a.charge.meter).cmp(&(
                &b.provider,
                &b.instance_id,
                &b.charge.meter,
            ))
        });
    }
    out.sort_by(|a, b| (a.from_ms, &a.client).cmp(&(b.from_ms, &b.client)));
    out
}

/// The client whose invoices `caller` may read: any (admins), its own (clients). A
/// provider or pool owner token is not the client of the same name.
fn client_filter(caller: &Caller, asked: Option<&String>) -> Result<Option<String>, ApiError> {
    match caller.0.role {
        Role::Admin => Ok(asked.cloned()),
        Role::Client if asked.is_some_and(|a| *a != caller.0.account) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "clients see their own invoices",
        )),
        Role::Client => Ok(Some(caller.0.account.clone())),
        Role::Provider | Role::PoolOwner => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "invoices are for clients (providers read their statements)",
        )),
    }
}

#[utoipa::path(get, path = "/v1/invoices", tag = "billing", params(("client" = Option<String>, Query, description = "One client (admins)"), ("from" = Option<i64>, Query, description = "Start, Unix ms"), ("to" = Option<i64>, Query, description = "End, Unix ms")), responses((status = 200, description = "Invoices with their lines", body = Vec<InvoiceView>)))]
pub(crate) async fn invoices(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<Vec<InvoiceView>> {
    let q = query_map(query.as_deref(), &["client", "from", "to"])?;
    let client = client_filter(&caller, q.get("client"))?;
    let lines = ctl
        .app
        .store
        .invoice_lines(
            None,
            client.as_deref(),
            None,
            ms_param(&q, "from", i64::MIN)?,
            ms_param(&q, "to", i64::MAX)?,
        )
        .await?;
    Ok(Json(invoices_of(lines)))
}

#[utoipa::path(get, path = "/v1/invoices/{id}", tag = "billing", params(("id" = String, Path, description = "The invoice")), responses((status = 200, description = "The invoice with its lines", body = InvoiceView)))]
pub(crate) async fn invoice(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<InvoiceView> {
    let client = client_filter(&caller, None)?;
    let lines = ctl
        .app
        .store
        .invoice_lines(Some(&id), client.as_deref(), None, i64::MIN, i64::MAX)
        .await?;
    invoices_of(lines)
        .into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("invoice {id} not found")))
}

#[utoipa::path(get, path = "/v1/statements", tag = "billing", params(("provider" = Option<String>, Query, description = "One provider (admins)"), ("from" = Option<i64>, Query, description = "Start, Unix ms"), ("to" = Option<i64>, Query, description = "End, Unix ms")), responses((status = 200, description = "The provider's statement", body = StatementView)))]
pub(crate) async fn statements(
    State(ctl): State<Arc<Controller>>,
    caller: Caller,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult<StatementView> {
    let q = query_map(query.as_deref(), &["provider", "from", "to"])?;
    let provider = match caller.0.role {
        Role::Admin => q
            .get("provider")
            .cloned()
            .ok_or_else(|| invalid("provider", "give provider=<account>"))?,
        Role::Provider => match q.get("provider") {
            Some(p) if *p != caller.0.account => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    "providers see their own statements",
                ));
            }
            _ => caller.0.account.clone(),
        },
        _ => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "statements are for providers",
            ));
        }
    };
    let from_ms = ms_param(&q, "from", i64::MIN)?;
    let to_ms = ms_param(&q, "to", i64::MAX)?;
    let lines = ctl
        .app
        .store
        .invoice_lines(None, None, Some(&provider), from_ms, to_ms)
        .await?;
    let mut view = StatementView {
        provider: provider.clone(),
        from_ms,
        to_ms,
        gross: BTreeMap::new(),
        commission: BTreeMap::new(),
        net: BTreeMap::new(),
        payouts: BTreeMap::new(),
        balance: BTreeMap::new(),
        lines: Vec::new(),
    };
    // Commission per posting (what was actually posted), not per line rounding.
    let account = ledger::provider(&provider);
    let entries = ctl
        .app
        .store
        .account_entries(&account, i64::MIN, i64::MAX)
        .await?;
    let keys: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l.posting_key.as_str()).collect();
    for e in &entries {
        if keys.contains(e.key.as_str()) {
            *view.net.entry(e.currency.clone()).or_default() += e.amount;
        }
        if e.kind == "payout" && e.posted_at_ms >= from_ms && e.posted_at_ms < to_ms {
            *view.payouts.entry(e.currency.clone()).or_default() += -e.amount;
        }
    }
    for l in &lines {
        *view.gross.entry(l.currency.clone()).or_default() += l.charge.amount;
    }
    for (c, g) in &view.gross {
        view.commission
            .insert(c.clone(), g - view.net.get(c).copied().unwrap_or(0));
    }
    for (_, currency, balance) in ctl.app.store.balances(Some(&account)).await? {
        view.balance.insert(currency, balance);
    }
    view.lines = lines;
    Ok(Json(view))
}
