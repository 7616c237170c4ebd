//! Brokerage (issue 18, C10), the shell: subscriptions kept in the store, and the
//! margin table of a window built from this controller's own metering and the usage
//! its host clouds sent (`federation`). The rules are `surplus_market::brokerage`.

use std::collections::BTreeMap;
use std::time::Duration;

use surplus_api::brokerage::{MarginsView, SubscriptionCreate, SubscriptionView};
use surplus_market::Refusal;
use surplus_market::brokerage::{self, Subscription, UsageRow};
use surplus_market::exchange::{self, MINUTE_MS};
use surplus_market::provision::{self, Provision, ProvisionInput};
use surplus_market::tender::{self, Terms};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::peer::{PeerRole, TenderOffer, TenderReply, TenderShortfall};
use uuid::Uuid;

use crate::app::Controller;
use crate::store::{StoreError, StoredBundle, StoredSubscription, StoredTender};

/// The name of this controller's own usage in a margin table.
pub const LOCAL: &str = "local";

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BrokerageError {
    /// The input broke a rule (the field or rule is named).
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A period's name (`1h`) as milliseconds; `None` when it is not a duration.
pub fn period_ms(text: &str) -> Option<i64> {
    humantime::parse_duration(text.trim())
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// A period in milliseconds as its short name (`15m`, `1h`, `24h`).
pub fn period_name(ms: i64) -> String {
    match ms {
        ms if ms > 0 && ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms > 0 && ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms => humantime::format_duration(Duration::from_millis(ms.max(0) as u64))
            .to_string()
            .replace(' ', ""),
    }
}

fn view(s: &StoredSubscription) -> SubscriptionView {
    SubscriptionView {
        user: s.subscription.user.clone(),
        resource: s.subscription.resource.clone(),
        period: period_name(s.subscription.period_ms),
        period_ms: s.subscription.period_ms,
        limit: s.subscription.limit,
        overage_rate: s.subscription.overage_rate,
        administrator: s.administrator.clone(),
        currency: s.currency.clone(),
        availability: s.availability.iter().map(ToString::to_string).collect(),
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
    }
}

fn refused(rule: &'static str, message: String) -> BrokerageError {
    BrokerageError::Refused(Refusal { rule, message })
}

/// Makes or replaces a user's subscription of a resource.
pub async fn put_subscription(
    ctl: &Controller,
    body: SubscriptionCreate,
) -> Result<SubscriptionView, BrokerageError> {
    let period = period_ms(&body.period).ok_or_else(|| {
        refused(
            "period",
            format!(
                "period {:?} is not a duration such as 15m or 1h",
                body.period
            ),
        )
    })?;
    let subscription = Subscription {
        user: body.user,
        resource: body.resource,
        period_ms: period,
        limit: body.limit,
        overage_rate: body.overage_rate,
    };
    brokerage::check_subscription(&subscription)?;
    let administrator = body
        .administrator
        .unwrap_or_else(|| subscription.user.clone());
    if surplus_market::ledger::validate_account(&format!("client:{administrator}")).is_err() {
        return Err(refused(
            "administrator",
            format!("administrator {administrator:?} is not a client account name"),
        ));
    }
    let currency = body.currency.unwrap_or_else(|| "EUR".into());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refused(
            "currency",
            format!("currency {currency:?} is not a three-letter code such as EUR"),
        ));
    }
    let mut availability = body
        .availability
        .unwrap_or_default()
        .iter()
        .map(|w| brokerage::DailyWindow::parse(w))
        .collect::<Result<Vec<_>, _>>()?;
    availability.sort();
    availability.dedup();
    let now = ctl.app.clock.now_ms();
    let existing = ctl.app.store.subscriptions().await?;
    let created_at_ms = existing
        .iter()
        .find(|s| {
            s.subscription.user == subscription.user
                && s.subscription.resource == subscription.resource
        })
        .map_or(now, |s| s.created_at_ms);
    // A subscriber's subscriptions of one resource and period length net at one rate
    // (`mixed_rates`): refused here, when it is made, rather than in every margin
    // table after.
    if let Some(other) = existing.iter().find(|s| {
        s.administrator == administrator
            && s.subscription.resource == subscription.resource
            && s.subscription.period_ms == subscription.period_ms
            && s.subscription.user != subscription.user
            && (s.subscription.overage_rate != subscription.overage_rate || s.currency != currency)
    }) {
        return Err(refused(
            "mixed_rates",
            format!(
                "{}'s {} per {} costs {} {} per unit over: a subscriber's subscriptions of a resource and period net at one rate",
                other.subscription.user,
                other.subscription.resource,
                period_name(other.subscription.period_ms),
                other.subscription.overage_rate,
                other.currency
            ),
        ));
    }
    let stored = StoredSubscription {
        subscription,
        administrator,
        currency,
        availability,
        created_at_ms,
        updated_at_ms: now,
    };
    ctl.app.store.put_subscription(&stored).await?;
    Ok(view(&stored))
}

/// Every subscription, or one user's.
pub async fn subscriptions(
    ctl: &Controller,
    user: Option<&str>,
) -> Result<Vec<SubscriptionView>, StoreError> {
    Ok(ctl
        .app
        .store
        .subscriptions()
        .await?
        .iter()
        .filter(|s| user.is_none_or(|u| s.subscription.user == u))
        .map(view)
        .collect())
}

/// Which part of the margins to compute.
#[derive(Debug, Clone, Default)]
pub struct MarginQuery {
    /// Only this user's subscriptions (netted across its clouds only).
    pub user: Option<String>,
    /// Only this resource.
    pub resource: Option<String>,
    /// Only subscriptions of this period length.
    pub period_ms: Option<i64>,
    /// Window start (default: a day before `until`).
    pub from: Option<UnixMillis>,
    /// Window end (default: the end of the last whole period).
    pub until: Option<UnixMillis>,
}

/// Usage in `[from, until)` per cloud (`local` or a host cloud's id), user, resource
/// and minute, unit-milliseconds.
async fn usage_minutes(
    ctl: &Controller,
    from: UnixMillis,
    until: UnixMillis,
) -> Result<BTreeMap<(String, String, String, i64), u128>, BrokerageError> {
    let mut minutes: BTreeMap<(String, String, String, i64), u128> = BTreeMap::new();
    let deltas = ctl.app.store.local_usage_deltas(None, from, until).await?;
    for (user, resource, minute, unit_ms) in exchange::minute_usage(&deltas, from, until) {
        *minutes
            .entry((LOCAL.into(), user, resource.into(), minute))
            .or_default() += u128::from(unit_ms);
    }
    for r in ctl.app.store.peer_usage_in(from, until).await? {
        *minutes
            .entry((
                r.peer.to_string(),
                r.row.user,
                r.row.resource,
                r.row.minute_ms,
            ))
            .or_default() += u128::from(r.row.unit_ms);
    }
    Ok(minutes)
}

/// The end of the last whole minute whose usage has arrived from every cloud: a host
/// cloud sends a minute `peer_usage_lag` after it ends, and pushes within seconds.
fn judged_until(ctl: &Controller) -> UnixMillis {
    let settled =
        ctl.app.clock.now_ms() - ctl.app.config.peer_usage_lag.as_millis() as i64 - MINUTE_MS;
    settled.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// The margin table of a window: subscriptions against the usage of every cloud.
pub async fn margins(ctl: &Controller, q: &MarginQuery) -> Result<MarginsView, BrokerageError> {
    let stored: Vec<StoredSubscription> = ctl
        .app
        .store
        .subscriptions()
        .await?
        .into_iter()
        .filter(|s| {
            q.user.as_ref().is_none_or(|u| &s.subscription.user == u)
                && q.resource
                    .as_ref()
                    .is_none_or(|r| &s.subscription.resource == r)
                && q.period_ms.is_none_or(|p| s.subscription.period_ms == p)
        })
        .collect();
    // Every allowed period divides a day, so a window of whole days (or ending on the
    // grid of the common multiple) holds whole periods of each.
    let grid = stored
        .iter()
        .map(|s| s.subscription.period_ms)
        .fold(q.period_ms.unwrap_or(MINUTE_MS), lcm);
    // The last whole period whose usage has arrived from every cloud.
    let settled = judged_until(ctl);
    let until = q.until.unwrap_or(settled.div_euclid(grid) * grid);
    let from = q
        .from
        .unwrap_or(until.saturating_sub(86_400_000_i64.max(grid)));
    if from >= until || until.saturating_sub(from) > brokerage::MAX_WINDOW_MS {
        return Err(refused(
            "from",
            format!("from {from} must be before until {until}, at most 31 days"),
        ));
    }
    // Usage per cloud, user, resource and minute, then per subscription period.
    let minutes = usage_minutes(ctl, from, until).await?;
    let subscribed_by_anyone: std::collections::BTreeSet<(String, String)> = ctl
        .app
        .store
        .subscriptions()
        .await?
        .into_iter()
        .map(|s| (s.subscription.user, s.subscription.resource))
        .collect();
    let period_of: BTreeMap<(&str, &str), i64> = stored
        .iter()
        .map(|s| {
            (
                (
                    s.subscription.user.as_str(),
                    s.subscription.resource.as_str(),
                ),
                s.subscription.period_ms,
            )
        })
        .collect();
    let mut per_period: BTreeMap<(String, String, String, i64), u128> = BTreeMap::new();
    let mut clouds: Vec<String> = vec![LOCAL.into()];
    let mut unsubscribed = Vec::new();
    for ((cloud, user, resource, minute), unit_ms) in minutes {
        let Some(period) = period_of.get(&(user.as_str(), resource.as_str())) else {
            // Subscribed but not in this query's selection: not this table's. Not
            // subscribed at all: listed, never counted.
            let wanted = q.user.as_ref().is_none_or(|u| u == &user)
                && q.resource.as_ref().is_none_or(|r| r == &resource);
            if wanted && !subscribed_by_anyone.contains(&(user.clone(), resource.clone())) {
                unsubscribed.push(surplus_api::brokerage::UsageMinute {
                    cloud,
                    user,
                    resource,
                    minute_ms: minute,
                    unit_ms: u64::try_from(unit_ms).unwrap_or(u64::MAX),
                });
            }
            continue;
        };
        if !clouds.contains(&cloud) {
            clouds.push(cloud.clone());
        }
        let start = minute.div_euclid(*period) * period;
        *per_period
            .entry((cloud, user, resource, start))
            .or_default() += unit_ms;
    }
    let usage: Vec<UsageRow> = per_period
        .into_iter()
        .map(|((cloud, user, resource, start), unit_ms)| UsageRow {
            used: exchange::used_in_period(unit_ms, period_of[&(user.as_str(), resource.as_str())]),
            cloud,
            user,
            resource,
            period_start: start,
        })
        .collect();
    // Each subscriber's users net among themselves only: one organisation's unused
    // limits do not pay for another's overage.
    let mut by_administrator: BTreeMap<&str, Vec<Subscription>> = BTreeMap::new();
    for s in &stored {
        by_administrator
            .entry(s.administrator.as_str())
            .or_default()
            .push(s.subscription.clone());
    }
    let mut subscribers = Vec::new();
    for (administrator, subs) in by_administrator {
        let users: std::collections::BTreeSet<&str> =
            subs.iter().map(|s| s.user.as_str()).collect();
        let theirs: Vec<UsageRow> = usage
            .iter()
            .filter(|u| users.contains(u.user.as_str()))
            .cloned()
            .collect();
        let table = brokerage::margins(&subs, &theirs, from, until)?;
        let billing = brokerage::billing_records(&table, administrator);
        subscribers.push(surplus_api::brokerage::SubscriberMargins {
            administrator: administrator.to_owned(),
            table,
            billing,
        });
    }
    Ok(MarginsView {
        clouds,
        from,
        until,
        subscribers,
        unsubscribed,
    })
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a.abs() } else { gcd(b, a % b) }
}

fn lcm(a: i64, b: i64) -> i64 {
    if a <= 0 || b <= 0 {
        return a.max(b).max(1);
    }
    a / gcd(a, b) * b
}

/// Plans a bundle: each subscriber of the resource is estimated from its margins
/// over the look-back window (a share of its average under-consumption, available
/// over the whole interval in increments of its subscription's period), and the
/// estimates are staggered to hold the amount at every instant of the interval.
pub async fn plan_bundle(
    ctl: &Controller,
    body: &surplus_api::brokerage::BundlePlanRequest,
) -> Result<surplus_api::brokerage::BundlePlanView, BrokerageError> {
    use surplus_market::brokerage::EstimateInput;
    use surplus_market::stagger::{self, Need, PriceTerms, Unarranged};
    let history = match &body.history {
        Some(h) => period_ms(h)
            .filter(|ms| *ms > 0 && *ms <= brokerage::MAX_WINDOW_MS)
            .ok_or_else(|| {
                refused(
                    "history",
                    format!("history {h:?} is not a duration of at most 31 days, such as 48h"),
                )
            })?,
        None => 2 * 86_400_000,
    };
    let subs = ctl.app.store.subscriptions().await?;
    let subs: Vec<_> = subs
        .iter()
        .filter(|s| s.subscription.resource == body.resource)
        .collect();
    let until = match (body.until, body.interval) {
        (Some(until), None) => until,
        (None, Some(rule)) => {
            let periods: Vec<i64> = subs.iter().map(|s| s.subscription.period_ms).collect();
            body.from + stagger::interval_for(rule, &periods)?
        }
        _ => {
            return Err(refused(
                "until",
                "give the interval's end (until) or its rule (interval), one of the two".into(),
            ));
        }
    };
    if body.from >= until || until - body.from > stagger::DAY_MS * 7 {
        return Err(refused(
            "until",
            format!(
                "the interval {}..{until} must not be empty, and at most 7 days",
                body.from
            ),
        ));
    }
    let mut estimates = Vec::new();
    for period in subs
        .iter()
        .map(|s| s.subscription.period_ms)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let now = ctl.app.clock.now_ms();
        let seen_until = now.div_euclid(period) * period;
        let seen_from = seen_until - history.div_euclid(period).max(1) * period;
        let view = margins(
            ctl,
            &MarginQuery {
                resource: Some(body.resource.clone()),
                period_ms: Some(period),
                from: Some(seen_from),
                until: Some(seen_until),
                ..MarginQuery::default()
            },
        )
        .await?;
        for s in subs.iter().filter(|s| s.subscription.period_ms == period) {
            let Some(margins) = view
                .subscribers
                .iter()
                .find_map(|t| t.table.margins_of(&s.subscription.user, &body.resource))
            else {
                continue;
            };
            estimates.push(brokerage::estimate(&EstimateInput {
                user: s.subscription.user.clone(),
                resource: body.resource.clone(),
                margins,
                share_bps: body.share_bps.unwrap_or(5_000),
                from: body.from,
                until,
                availability: brokerage::daily_availability(&s.availability, body.from, until),
                increment_ms: period,
            })?);
        }
    }
    let available: Vec<_> = estimates
        .iter()
        .flat_map(|e| e.availability.iter().cloned())
        .collect();
    let need = Need {
        resource: body.resource.clone(),
        amount: body.amount,
        from: body.from,
        until,
    };
    let intervals = match body.hold_minimum {
        Some(minimum) => stagger::dynamic_intervals(
            &body.resource,
            minimum,
            body.from,
            until,
            &available,
            until - body.from,
        )?
        .into_iter()
        .map(|(from, until)| surplus_market::brokerage::Window { from, until })
        .collect(),
        None => Vec::new(),
    };
    let (arrangement, shortfalls) = match stagger::arrange(std::slice::from_ref(&need), &available)
    {
        Ok(a) => (Some(a), Vec::new()),
        Err(Unarranged::Short(short)) => (None, short),
        Err(Unarranged::Refused(r)) => return Err(r.into()),
    };
    let price = arrangement
        .as_ref()
        .map(|a| {
            stagger::price_bundle(
                a,
                &PriceTerms {
                    rate_per_unit_hour: [(
                        body.resource.clone(),
                        body.rate_per_unit_hour.unwrap_or(0),
                    )]
                    .into_iter()
                    .collect(),
                    floor_per_contributor: body.floor_per_contributor.unwrap_or(0),
                },
            )
        })
        .transpose()?;
    Ok(surplus_api::brokerage::BundlePlanView {
        from: body.from,
        until,
        intervals,
        estimates,
        arrangement,
        price,
        shortfalls,
    })
}

/// Posts the netted overage of a window through the ledger (the administrator's
/// client account pays the house, less the marketplace's commission) and queues a
/// notice to the administrator, one transaction per record, once per key.
pub async fn bill(
    ctl: &Controller,
    req: &surplus_api::brokerage::BillRequest,
) -> Result<Vec<surplus_api::brokerage::BillView>, BrokerageError> {
    let period_ms = match &req.period {
        Some(p) => Some(
            period_ms(p)
                .filter(|ms| brokerage::PERIODS_MS.contains(ms))
                .ok_or_else(|| {
                    refused(
                        "period",
                        format!(
                            "period {p:?} is not one of 1m, 5m, 10m, 15m, 30m, 1h, 8h, 12h, 24h"
                        ),
                    )
                })?,
        ),
        None => None,
    };
    let view = margins(
        ctl,
        &MarginQuery {
            user: None,
            resource: req.resource.clone(),
            period_ms,
            from: Some(req.from),
            until: Some(req.until),
        },
    )
    .await?;
    let stored = ctl.app.store.subscriptions().await?;
    let now = ctl.app.clock.now_ms();
    let mut out = Vec::new();
    for sub in &view.subscribers {
        for record in &sub.billing {
            let currency = stored
                .iter()
                .find(|s| {
                    s.administrator == sub.administrator
                        && s.subscription.resource == record.resource
                        && s.subscription.period_ms == record.period_ms
                })
                .map_or_else(|| "EUR".to_owned(), |s| s.currency.clone());
            let key = format!(
                "overage:{}:{}:{}:{}:{}",
                record.administrator, record.resource, record.period_ms, record.from, record.until
            );
            let outcome = match brokerage::overage_posting(
                &key,
                record,
                surplus_market::billing::HOUSE_PROVIDER,
                &currency,
                ctl.app.config.commission_bps,
            ) {
                None => "nothing",
                Some(posting) => {
                    let changes = crate::store::ChangeSet {
                        postings: vec![(posting, Vec::new())],
                        notices: vec![crate::store::Notice {
                            key: key.clone(),
                            recipient: format!("client:{}", record.administrator),
                            kind: "brokerage.overage".into(),
                            body: serde_json::json!({ "record": record, "currency": currency }),
                        }],
                        ..crate::store::ChangeSet::default()
                    };
                    match ctl.app.store.apply_changes(&changes, now).await {
                        Ok(applied) => match applied.first() {
                            Some(surplus_market::ledger::Applied::Duplicate) => "duplicate",
                            _ => "posted",
                        },
                        Err(crate::store::PostError::Ledger(e)) => {
                            return Err(refused("ledger", e.to_string()));
                        }
                        Err(crate::store::PostError::Store(e)) => return Err(e.into()),
                    }
                }
            };
            out.push(surplus_api::brokerage::BillView {
                administrator: record.administrator.clone(),
                resource: record.resource.clone(),
                period_ms: record.period_ms,
                net_over: record.net_over,
                amount: record.amount,
                currency,
                key,
                outcome: outcome.into(),
            });
        }
    }
    Ok(out)
}

/// The settings key of this controller's standing terms for tenders.
const TENDER_TERMS: &str = "tender_terms";

/// This controller's standing terms for tenders (as a marketplace cloud); none set:
/// it buys nothing.
pub async fn tender_terms(ctl: &Controller) -> Result<Terms, BrokerageError> {
    Ok(match ctl.app.store.setting(TENDER_TERMS).await? {
        Some(text) => serde_json::from_str(&text).map_err(|e| {
            StoreError::Corrupt(format!("the stored tender terms do not read: {e}"))
        })?,
        None => Terms {
            currency: "EUR".into(),
            resources: BTreeMap::new(),
        },
    })
}

/// Sets this controller's standing terms for tenders.
pub async fn put_tender_terms(ctl: &Controller, terms: &Terms) -> Result<(), BrokerageError> {
    tender::check_terms(terms)?;
    let text = serde_json::to_string(terms).expect("terms serialize");
    ctl.app
        .store
        .put_setting(TENDER_TERMS, &text, ctl.app.clock.now_ms())
        .await?;
    Ok(())
}

/// A marketplace cloud's side: answers a broker's tender by the standing terms, once
/// (a tender received again gets the answer recorded the first time).
pub async fn answer_tender(
    ctl: &Controller,
    peer: Uuid,
    offer: &TenderOffer,
) -> Result<TenderReply, BrokerageError> {
    let now = ctl.app.clock.now_ms();
    let reply = tender::answer(&tender_terms(ctl).await?, offer, now);
    let stored = ctl
        .app
        .store
        .put_tender(&StoredTender {
            offer: offer.clone(),
            direction: "in".into(),
            bundle: None,
            peer,
            state: state_of(offer.amount, reply.accepted_amount).into(),
            accepted_amount: reply.accepted_amount,
            price: reply.price,
            reason: reply.reason.clone(),
            created_at_ms: now,
            answered_at_ms: Some(now),
        })
        .await?;
    if stored.peer != peer || stored.direction != "in" || stored.offer != *offer {
        return Err(refused(
            "tender_id",
            format!(
                "tender {} is known here as another tender; a tender's id is not reused",
                offer.id
            ),
        ));
    }
    Ok(TenderReply {
        id: offer.id,
        accepted_amount: stored.accepted_amount,
        price: stored.price,
        reason: stored.reason,
    })
}

fn state_of(offered: u64, accepted: u64) -> &'static str {
    match accepted {
        0 => "rejected",
        a if a >= offered => "accepted",
        _ => "part",
    }
}

/// A tender as the API shows it, with the shortfalls reported to it.
pub fn tender_view(
    t: &StoredTender,
    shortfalls: Vec<provision::Gap>,
) -> surplus_api::brokerage::TenderView {
    surplus_api::brokerage::TenderView {
        id: t.offer.id.to_string(),
        direction: t.direction.clone(),
        bundle: t.bundle.map(|b| b.to_string()),
        peer: t.peer.to_string(),
        resource: t.offer.resource.clone(),
        amount: t.offer.amount,
        from_ms: t.offer.from_ms,
        until_ms: t.offer.until_ms,
        offered_price: t.offer.price,
        currency: t.offer.currency.clone(),
        state: t.state.clone(),
        accepted_amount: t.accepted_amount,
        price: t.price,
        reason: t.reason.clone(),
        created_at_ms: t.created_at_ms,
        answered_at_ms: t.answered_at_ms,
        shortfalls,
    }
}

/// Tenders as the API shows them.
pub async fn tender_views(
    ctl: &Controller,
    tenders: &[StoredTender],
) -> Result<Vec<surplus_api::brokerage::TenderView>, BrokerageError> {
    let mut out = Vec::with_capacity(tenders.len());
    for t in tenders {
        let shortfalls = if t.direction == "in" {
            ctl.app.store.tender_shortfalls(t.offer.id).await?
        } else {
            Vec::new()
        };
        out.push(tender_view(t, shortfalls));
    }
    Ok(out)
}

/// A bundle as the API shows it, with its tenders.
pub async fn bundle_view(
    ctl: &Controller,
    b: &StoredBundle,
) -> Result<surplus_api::brokerage::BundleView, BrokerageError> {
    let tenders = ctl.app.store.bundle_tenders(b.id).await?;
    let taken = taken_by(&tenders);
    let sold: u64 = taken.iter().sum();
    let through = judged_until(ctl).min(b.until_ms);
    let provision = if sold > 0 && through > b.from_ms {
        Some(provision_of(ctl, b, sold, b.from_ms, through).await?)
    } else {
        None
    };
    Ok(surplus_api::brokerage::BundleView {
        id: b.id.to_string(),
        resource: b.resource.clone(),
        amount: b.amount,
        from_ms: b.from_ms,
        until_ms: b.until_ms,
        price: b.price,
        currency: b.currency.clone(),
        arrangement: b.arrangement.clone(),
        contributors: b.contributors.clone(),
        placed: sold,
        created_at_ms: b.created_at_ms,
        settled_at_ms: b.settled_at_ms,
        held: provision
            .as_ref()
            .map(Provision::held)
            .unwrap_or_default()
            .into_iter()
            .map(|(who, ms)| (who, u64::try_from(ms).unwrap_or(u64::MAX)))
            .collect(),
        provision,
        tenders: tender_views(ctl, &tenders).await?,
    })
}

/// A broker's side: plans the bundle and tenders it to `clouds` one after another,
/// each offered what the ones before it left, recording every tender and answer.
/// A cloud whose answer does not come stops the placement (it may have taken the
/// tender): the clouds after it are not offered anything.
pub async fn tender(
    ctl: &Controller,
    req: &surplus_api::brokerage::TenderRequest,
) -> Result<surplus_api::brokerage::BundleView, BrokerageError> {
    let currency = req.currency.clone().unwrap_or_else(|| "EUR".into());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refused(
            "currency",
            format!("currency {currency:?}: three capital letters (ISO 4217)"),
        ));
    }
    if req.clouds.is_empty() {
        return Err(refused(
            "clouds",
            "name at least one marketplace cloud to tender to".into(),
        ));
    }
    let peers = ctl.app.store.peers().await?;
    let mut clouds = Vec::new();
    for c in &req.clouds {
        let peer = Uuid::parse_str(c)
            .ok()
            .and_then(|id| {
                peers
                    .iter()
                    .find(|p| p.id == id && p.removed_at_ms.is_none())
            })
            .ok_or_else(|| refused("clouds", format!("{c} is not a peer of this controller")))?;
        if peer.role != PeerRole::MarketplaceCloud {
            return Err(refused(
                "clouds",
                format!(
                    "peer {c} is this controller's {}, not a marketplace cloud: it is not tendered to",
                    peer.role
                ),
            ));
        }
        if clouds.contains(&peer.id) {
            return Err(refused("clouds", format!("{c} is named twice")));
        }
        clouds.push(peer.id);
    }
    let plan = plan_bundle(ctl, &req.bundle).await?;
    let now = ctl.app.clock.now_ms();
    if plan.from % MINUTE_MS != 0 || plan.until % MINUTE_MS != 0 {
        return Err(refused(
            "from",
            format!(
                "a tendered interval starts and ends on a whole minute, not {}..{}",
                plan.from, plan.until
            ),
        ));
    }
    if plan.from < now.div_euclid(MINUTE_MS) * MINUTE_MS {
        return Err(refused(
            "from",
            format!(
                "the interval {}..{} has begun: only time to come is tendered (this minute at the earliest)",
                plan.from, plan.until
            ),
        ));
    }
    // A subscriber's unused capacity goes into one bundle at a time: two bundles over
    // the same time would plan, and sell, the same units. A bundle nobody took (or may
    // have taken) holds nothing.
    let mut holding = None;
    for b in ctl.app.store.open_bundles(i64::MAX).await? {
        if b.resource != req.bundle.resource || b.from_ms >= plan.until || plan.from >= b.until_ms {
            continue;
        }
        let tenders = ctl.app.store.bundle_tenders(b.id).await?;
        if tenders.iter().any(|t| {
            matches!(
                t.state.as_str(),
                "accepted" | "part" | "sent" | "unanswered"
            )
        }) {
            holding = Some(b);
            break;
        }
    }
    if let Some(other) = holding {
        return Err(refused(
            "overlapping_bundle",
            format!(
                "bundle {} holds {} from {} to {}: a subscriber's unused capacity is tendered in one bundle at a time",
                other.id, other.resource, other.from_ms, other.until_ms
            ),
        ));
    }
    let (Some(arrangement), Some(price)) = (plan.arrangement, plan.price) else {
        let short: Vec<String> = plan
            .shortfalls
            .iter()
            .map(|s| {
                format!(
                    "{} of {} from {} to {}",
                    s.available, s.needed, s.from, s.until
                )
            })
            .collect();
        return Err(refused(
            "short",
            format!(
                "the subscribers' estimated contributions do not hold {} {} over the interval: {}",
                req.bundle.amount,
                req.bundle.resource,
                short.join("; ")
            ),
        ));
    };
    let subs = ctl.app.store.subscriptions().await?;
    let contributors = arrangement
        .contributors()
        .into_iter()
        .map(|c| {
            let admin = subs
                .iter()
                .find(|s| {
                    s.subscription.user == c && s.subscription.resource == req.bundle.resource
                })
                .map_or(c, |s| s.administrator.as_str());
            (c.to_owned(), surplus_market::ledger::client(admin))
        })
        .collect();
    let bundle = StoredBundle {
        id: Uuid::now_v7(),
        resource: req.bundle.resource.clone(),
        amount: req.bundle.amount,
        from_ms: plan.from,
        until_ms: plan.until,
        price: price.total,
        currency: currency.clone(),
        arrangement,
        contributors,
        created_at_ms: now,
        settled_at_ms: None,
        reported_through_ms: None,
    };
    ctl.app.store.create_bundle(&bundle).await?;
    let template = TenderOffer {
        id: Uuid::nil(),
        resource: bundle.resource.clone(),
        amount: bundle.amount,
        from_ms: bundle.from_ms,
        until_ms: bundle.until_ms,
        price: bundle.price,
        currency,
    };
    let mut placement = tender::Placement::new(bundle.amount, bundle.price);
    for peer in clouds {
        let Some(offer) = placement.next(&template, Uuid::now_v7()) else {
            break;
        };
        let mut row = StoredTender {
            offer: offer.clone(),
            direction: "out".into(),
            bundle: Some(bundle.id),
            peer,
            state: "sent".into(),
            accepted_amount: 0,
            price: 0,
            reason: None,
            created_at_ms: ctl.app.clock.now_ms(),
            answered_at_ms: None,
        };
        ctl.app.store.put_tender(&row).await?;
        let answer = ctl.federation.send_tender(peer, &offer).await;
        row.answered_at_ms = Some(ctl.app.clock.now_ms());
        let stop = match answer {
            Ok(Err(why)) => {
                row.state = "rejected".into();
                row.reason = Some(format!("refused: {why}"));
                false
            }
            Ok(Ok(reply)) => match placement.record(&reply) {
                Ok(()) => {
                    row.state = state_of(offer.amount, reply.accepted_amount).into();
                    row.accepted_amount = reply.accepted_amount;
                    row.price = reply.price;
                    row.reason = reply.reason;
                    false
                }
                Err(refusal) => {
                    row.state = "invalid".into();
                    row.reason = Some(refusal.message);
                    false
                }
            },
            Err(e) => {
                row.state = "unanswered".into();
                row.reason = Some(format!("{e:#}"));
                true
            }
        };
        ctl.app.store.answer_tender(&row).await?;
        if stop {
            break;
        }
    }
    bundle_view(ctl, &bundle).await
}

/// What a bundle's contributors provided in the whole minutes of `[from, until)`,
/// each keeping what its own use needs (`provision::provide`), judged by the usage
/// of every cloud.
async fn provision_of(
    ctl: &Controller,
    b: &StoredBundle,
    sold: u64,
    from: UnixMillis,
    until: UnixMillis,
) -> Result<Provision, BrokerageError> {
    let subs: Vec<StoredSubscription> = ctl
        .app
        .store
        .subscriptions()
        .await?
        .into_iter()
        .filter(|s| s.subscription.resource == b.resource)
        .collect();
    let limits: BTreeMap<String, u64> = subs
        .iter()
        .map(|s| (s.subscription.user.clone(), s.subscription.limit))
        .collect();
    let mut used: BTreeMap<(String, i64), u128> = BTreeMap::new();
    if from < until {
        for ((_, user, resource, minute), unit_ms) in usage_minutes(ctl, from, until).await? {
            if resource == b.resource {
                *used.entry((user, minute)).or_default() += unit_ms;
            }
        }
    }
    Ok(provision::provide(
        ProvisionInput {
            arrangement: &b.arrangement,
            sold,
            from,
            until,
            limits: &limits,
        },
        |user, minute| {
            used.get(&(user.to_owned(), minute))
                .map_or(0, |u| exchange::used_in_period(*u, MINUTE_MS))
        },
        |user, minute| {
            subs.iter()
                .find(|s| s.subscription.user == user)
                .is_some_and(|s| {
                    !brokerage::daily_availability(&s.availability, minute, minute + MINUTE_MS)
                        .is_empty()
                })
        },
    ))
}

/// The units each accepted tender of a bundle took, in the order they were placed.
fn taken_by(tenders: &[StoredTender]) -> Vec<u64> {
    tenders
        .iter()
        .map(|t| {
            if matches!(t.state.as_str(), "accepted" | "part") {
                t.accepted_amount
            } else {
                0
            }
        })
        .collect()
}

/// How long after a bundle's interval ends the answers of tenders still unanswered
/// may come; after it the bundle is paid out without them.
const ANSWER_GRACE_MS: i64 = 10 * MINUTE_MS;

/// The brokerage's own loop: every few seconds, tenders whose answer did not come are
/// sent again, bundles under way are judged and their shortfalls reported, and
/// bundles whose interval ended are paid out. Apart from the peer links' loop, so
/// that a slow peer holds up neither.
pub async fn drive(ctl: std::sync::Arc<Controller>, cancel: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = watch_bundles(&ctl).await {
            tracing::warn!(error = %e, "bundles under way not judged");
        }
        match settle_due(&ctl).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(bundles = n, "brokered bundles paid out"),
            Err(e) => tracing::warn!(error = %e, "bundles not paid out"),
        }
    }
}

/// Sends again a tender whose answer did not come (the marketplace cloud answers a
/// tender it knows with its first answer) and records the answer once it is checked.
async fn ask_again(ctl: &Controller, t: &StoredTender) -> Result<(), BrokerageError> {
    let Ok(answer) = ctl.federation.send_tender(t.peer, &t.offer).await else {
        return Ok(());
    };
    let mut row = t.clone();
    row.answered_at_ms = Some(ctl.app.clock.now_ms());
    match answer {
        Err(why) => {
            row.state = "rejected".into();
            row.reason = Some(format!("refused: {why}"));
        }
        Ok(reply) => {
            let mut check = tender::Placement::new(t.offer.amount, t.offer.price);
            check.next(&t.offer, t.offer.id);
            match check.record(&reply) {
                Ok(()) => {
                    row.state = state_of(t.offer.amount, reply.accepted_amount).into();
                    row.accepted_amount = reply.accepted_amount;
                    row.price = reply.price;
                    row.reason = reply.reason;
                }
                Err(refusal) => {
                    row.state = "invalid".into();
                    row.reason = Some(refusal.message);
                }
            }
        }
    }
    ctl.app.store.answer_tender(&row).await?;
    Ok(())
}

/// Judges the provision of every bundle under way up to the last minute whose usage
/// has arrived, and tells each accepting cloud what falls short of what it took; the
/// bundle's report timer moves once every cloud concerned has noted it. A tender
/// whose answer did not come is asked again first.
pub async fn watch_bundles(ctl: &Controller) -> Result<(), BrokerageError> {
    let judged = judged_until(ctl);
    for b in ctl.app.store.open_bundles(ctl.app.clock.now_ms()).await? {
        if let Err(e) = watch_bundle(ctl, &b, judged).await {
            tracing::warn!(bundle = %b.id, error = %e, "bundle not judged");
        }
    }
    Ok(())
}

async fn watch_bundle(
    ctl: &Controller,
    b: &StoredBundle,
    judged: UnixMillis,
) -> Result<(), BrokerageError> {
    let mut tenders = ctl.app.store.bundle_tenders(b.id).await?;
    let waiting: Vec<&StoredTender> = tenders
        .iter()
        .filter(|t| matches!(t.state.as_str(), "sent" | "unanswered"))
        .collect();
    if !waiting.is_empty() {
        for t in waiting {
            ask_again(ctl, t).await?;
        }
        tenders = ctl.app.store.bundle_tenders(b.id).await?;
    }
    let start = b.reported_through_ms.unwrap_or(b.from_ms).max(b.from_ms);
    let through = judged.min(b.until_ms);
    if through <= start {
        return Ok(());
    }
    let taken = taken_by(&tenders);
    let sold: u64 = taken.iter().sum();
    if sold == 0 {
        ctl.app.store.bundle_reported(b.id, through).await?;
        return Ok(());
    }
    let p = provision_of(ctl, b, sold, start, through).await?;
    let mut all_noted = true;
    for gap in &p.gaps {
        for (t, missing) in tenders
            .iter()
            .zip(provision::split_short(gap.missing, &taken))
        {
            if missing == 0 {
                continue;
            }
            let report = TenderShortfall {
                id: t.offer.id,
                from_ms: gap.from,
                until_ms: gap.until,
                missing,
            };
            if let Err(e) = ctl.federation.send_shortfall(t.peer, report).await {
                tracing::warn!(bundle = %b.id, peer = %t.peer, error = %format!("{e:#}"), "shortfall not reported yet");
                all_noted = false;
            }
        }
    }
    if all_noted {
        ctl.app.store.bundle_reported(b.id, through).await?;
    }
    Ok(())
}

/// Pays out every bundle whose interval has ended and whose usage has arrived: each
/// accepting cloud pays its price pro rata to the unit-minutes it was given of those
/// it bought (`provision::payable`), from its account `client:peer-<id>`; the
/// marketplace keeps its commission, and the rest goes to the subscribers in
/// proportion to what each actually provided (kept of its plan or stood in with),
/// with a report to each subscriber's administrator; one transaction per bundle, once.
pub async fn settle_due(ctl: &Controller) -> Result<usize, BrokerageError> {
    let now = ctl.app.clock.now_ms();
    let mut settled = 0;
    for b in ctl.app.store.due_bundles(judged_until(ctl)).await? {
        let tenders = ctl.app.store.bundle_tenders(b.id).await?;
        let waiting = tenders
            .iter()
            .any(|t| matches!(t.state.as_str(), "sent" | "unanswered"));
        if waiting && now < b.until_ms + ANSWER_GRACE_MS {
            continue;
        }
        let taken = taken_by(&tenders);
        let sold: u64 = taken.iter().sum();
        let mut changes = crate::store::ChangeSet::default();
        if sold > 0 {
            let p = provision_of(ctl, &b, sold, b.from_ms, b.until_ms).await?;
            let held = p.held();
            let subs = ctl.app.store.subscriptions().await?;
            let account_of = |c: &str| {
                b.contributors.get(c).cloned().unwrap_or_else(|| {
                    let admin = subs
                        .iter()
                        .find(|s| s.subscription.user == c && s.subscription.resource == b.resource)
                        .map_or(c, |s| s.administrator.as_str());
                    surplus_market::ledger::client(admin)
                })
            };
            for (i, t) in tenders.iter().enumerate() {
                let payment = provision::payable(t.price, i, &taken, &p);
                if taken[i] == 0 || payment == 0 || held.is_empty() {
                    continue;
                }
                let settlement = brokerage::settle(
                    i64::try_from(payment).unwrap_or(i64::MAX),
                    ctl.app.config.commission_bps,
                    &held,
                )?;
                let key = format!("brokerage:settle:{}", t.offer.id);
                changes.postings.push((
                    brokerage::settlement_posting(
                        &key,
                        &format!("peer-{}", t.peer),
                        &b.currency,
                        &settlement,
                        account_of,
                    ),
                    Vec::new(),
                ));
                // A report to every subscriber that was planned or stood in, even one
                // that provided nothing in the end.
                let mut reported: std::collections::BTreeSet<&str> =
                    b.contributors.keys().map(String::as_str).collect();
                reported.extend(held.iter().map(|(c, _)| c.as_str()));
                for contributor in reported {
                    let amount = settlement
                        .shares
                        .iter()
                        .find(|s| s.contributor == contributor)
                        .map_or(0, |s| s.amount);
                    let held_ms = held
                        .iter()
                        .find(|(c, _)| c == contributor)
                        .map_or(0, |(_, v)| *v);
                    changes.notices.push(crate::store::Notice {
                        key: format!("{key}:{contributor}"),
                        recipient: account_of(contributor),
                        kind: "brokerage.contribution".into(),
                        body: serde_json::json!({
                            "bundle": b.id,
                            "tender": t.offer.id,
                            "marketplace_cloud": t.peer,
                            "contributor": contributor,
                            "planned": b.contributors.contains_key(contributor),
                            "resource": b.resource,
                            "from_ms": b.from_ms,
                            "until_ms": b.until_ms,
                            "held_unit_ms": held_ms.to_string(),
                            "paid_by_the_cloud": payment,
                            "amount": amount,
                            "currency": b.currency,
                        }),
                    });
                }
            }
        }
        match ctl.app.store.settle_bundle(b.id, &changes, now).await {
            Ok(true) => settled += 1,
            Ok(false) => {}
            Err(crate::store::PostError::Ledger(e)) => {
                tracing::error!(bundle = %b.id, error = %e, "bundle not settled");
            }
            Err(crate::store::PostError::Store(e)) => return Err(e.into()),
        }
    }
    Ok(settled)
}
