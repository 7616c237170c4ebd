//! Private pools' shell (issue 17): a pool owner's own market over slots its
//! accounts hold, its members' requests, the cycles that re-decide who holds which
//! slot, and the bursts beyond the pool.
//!
//! Thin around `surplus_market::pool`: admission, prices, notice and charges are
//! `pool::plan`, bursts `pool::burst`. A cycle is one store transaction under the
//! pool's lock ([`PoolStore::run_pool_cycle`]): it reads the pool, plans, and writes
//! the allocations, the billing records with their ledger postings (member pays the
//! owner in the pool's currency) and the members' notices. Cycles are timers kept
//! as rows, run by every controller's market tick, claimed once.
//!
//! A member runs instances on a slot it holds through the control path: the market's
//! gate lets the member holding a pooled host's allocation use it and nobody else;
//! the tick's level-triggered stop terminates what a member ran on a slot once its
//! allocation ended.

use std::collections::{BTreeMap, BTreeSet};

use surplus_api::market::ReserveRequest;
use surplus_api::pools::{
    AllocationView, BurstView, ChargeView, CreditRequest, CreditView, EntityView, ExplainView,
    InviteRequest, JoinRequest, LimitsRequest, MemberRequest, MemberUsage, MemberView,
    PoolBidRequest, PoolCreate, PoolRecordView, PoolRequestView, PoolSettingsBody, PoolUsageView,
    PoolView, SlotView,
};
use surplus_market::cohort::{self, Right};
use surplus_market::ledger;
use surplus_market::pool::{
    self, CurrencyKind, Method, Plan, Policy, Settings, SlotFacts, SlotState, Why,
};
use surplus_market::resell::PricingMode;
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use super::{Held, Market, MarketError, Reservation, invalid};
use crate::store::{
    ChangeSet, MarketRefusal, Notice, PoolBurst, PoolDecision, PoolMember, PoolSlotRow, PoolState,
    Principal, Role, StoredPool, StoredPoolRequest,
};

const HOUR_MS: i64 = 3_600_000;

/// Longest name of a pool or a member's organisation.
const MAX_NAME: usize = 200;

fn check_name(field: &str, text: &str) -> Result<(), MarketError> {
    if text.trim().is_empty() || text.len() > MAX_NAME || text.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("1 to {MAX_NAME} characters, none of them control characters"),
        ));
    }
    Ok(())
}

/// Settings from what an owner gave, over `base` (the defaults, or the pool's).
/// The ledger currency of pool `id`'s own credits or units: its own, so that no pool
/// owner issues a currency anyone else uses (money least of all).
fn own_currency(id: Uuid) -> String {
    format!("P{}", id.simple().to_string()[20..].to_uppercase())
}

/// Settings from what an owner gave, over `base` (the pool's, when changing them);
/// `own` is the pool's own currency (for credits and units).
fn settings_of(
    body: PoolSettingsBody,
    base: Option<&Settings>,
    own: &str,
) -> Result<Settings, MarketError> {
    if body.name.is_some() && base.is_some() {
        return Err(invalid("name", "a pool's name is set when it is made"));
    }
    let secs = |field: &str, v: Option<u64>, default: i64| -> Result<i64, MarketError> {
        match v {
            None => Ok(default),
            Some(s) => i64::try_from(s)
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| invalid(field, format!("{s}: too large"))),
        }
    };
    let method = match body.method.as_deref() {
        None => match (base.map(|b| b.method), body.step) {
            (Some(Method::Dutch { .. }), Some(step)) => Method::Dutch { step },
            (_, Some(_)) => return Err(invalid("step", "only a Dutch pool has a step")),
            (Some(m), None) => m,
            (None, None) => Method::Spot,
        },
        Some("dutch") => match (body.step, base.map(|b| b.method)) {
            (Some(step), _) => Method::Dutch { step },
            (None, Some(Method::Dutch { step })) => Method::Dutch { step },
            (None, _) => {
                return Err(invalid(
                    "step",
                    "a Dutch pool names the step of its falling price",
                ));
            }
        },
        Some(m @ ("english" | "spot")) => {
            if body.step.is_some() {
                return Err(invalid(
                    "step",
                    format!("only a Dutch pool has a step, not {m}"),
                ));
            }
            if m == "english" {
                Method::English
            } else {
                Method::Spot
            }
        }
        Some(other) => {
            return Err(invalid(
                "method",
                format!("{other:?}: one of english, dutch, spot"),
            ));
        }
    };
    // What a pool is paid in is set when it is made: charges already made are in it.
    let kind = body
        .currency_kind
        .or(base.map(|b| b.currency_kind))
        .unwrap_or(CurrencyKind::Credits);
    let currency = match (base, kind, body.currency) {
        (Some(b), _, given) => {
            if given.is_some_and(|c| c != b.currency) || kind != b.currency_kind {
                return Err(invalid(
                    "currency",
                    "a pool's currency is set when it is made",
                ));
            }
            b.currency.clone()
        }
        (None, CurrencyKind::Money, Some(c)) => c,
        (None, CurrencyKind::Money, None) => {
            return Err(invalid(
                "currency",
                "a pool paid in money names its currency",
            ));
        }
        (None, _, Some(c)) => {
            return Err(invalid(
                "currency",
                format!(
                    "{c:?}: a pool's own credits or units are a currency of its own, named by the pool; leave currency out"
                ),
            ));
        }
        (None, _, None) => own.to_owned(),
    };
    let base = base.cloned();
    let policy = Policy {
        minimum: body
            .minimum
            .or(base.as_ref().map(|b| b.policy.minimum))
            .unwrap_or(0),
        maximum: body
            .maximum
            .or(base.as_ref().and_then(|b| b.policy.maximum)),
        cap_per_user: body
            .cap_per_user
            .or(base.as_ref().and_then(|b| b.policy.cap_per_user)),
        preemptible: body
            .preemptible
            .or(base.as_ref().map(|b| b.policy.preemptible))
            .unwrap_or(false),
    };
    for (field, price) in [
        ("minimum", Some(policy.minimum)),
        ("maximum", policy.maximum),
    ] {
        if let Some(p) = price {
            super::check_price(field, p)?;
        }
    }
    let settings = Settings {
        request_type: body
            .request_type
            .or(base.as_ref().map(|b| b.request_type))
            .unwrap_or_default(),
        policy,
        method,
        currency,
        currency_kind: kind,
        cycle_ms: secs(
            "cycle_seconds",
            body.cycle_seconds,
            base.as_ref().map_or(60_000, |b| b.cycle_ms),
        )?,
        notice_ms: secs(
            "notice_seconds",
            body.notice_seconds,
            base.as_ref().map_or(300_000, |b| b.notice_ms),
        )?,
        half_life_ms: match body.half_life_hours {
            Some(h) => i64::try_from(h)
                .ok()
                .and_then(|h| h.checked_mul(HOUR_MS))
                .ok_or_else(|| invalid("half_life_hours", format!("{h}: too large")))?,
            None => base.as_ref().map_or(24 * HOUR_MS, |b| b.half_life_ms),
        },
        max_users: body
            .max_users
            .or(base.as_ref().map(|b| b.max_users))
            .unwrap_or(100),
        burst: match (body.burst, body.remove_burst.unwrap_or(false)) {
            (Some(_), true) => {
                return Err(invalid(
                    "remove_burst",
                    "a burst policy is given or removed, not both",
                ));
            }
            (Some(b), false) => Some(b),
            (None, true) => None,
            (None, false) => base.and_then(|b| b.burst),
        },
    };
    if let Some(b) = &settings.burst {
        super::check_price("burst.max_price", b.max_price)?;
        super::check_price("burst.budget", b.budget)?;
    }
    pool::check_settings(&settings).map_err(|bad| {
        MarketError::Fields(
            bad.into_iter()
                .map(|(field, message)| surplus_market::resell::FieldError {
                    field: field.into(),
                    message,
                })
                .collect(),
        )
    })?;
    Ok(settings)
}

fn refused(rule: &'static str, message: impl Into<String>) -> MarketError {
    MarketError::Refused(MarketRefusal {
        rule,
        message: message.into(),
    })
}

/// Refuses `acting` (an entity) changing what `owner`, another entity, owns; an
/// admin acts for every entity.
fn require_own(
    caller: &Principal,
    acting: &str,
    owner: Option<&str>,
    what: impl FnOnce(&str) -> String,
) -> Result<(), MarketError> {
    match owner {
        Some(o) if o != acting && caller.role != Role::Admin => {
            Err(MarketError::Forbidden(what(o)))
        }
        _ => Ok(()),
    }
}

/// An entity as the merged pool's rules see it.
fn cohort_member(e: &crate::store::PoolEntity) -> cohort::Member {
    cohort::Member {
        entity: e.entity.clone(),
        rights: e.rights.clone(),
        lending_limit: e.lending_limit,
        borrowing_limit: e.borrowing_limit,
    }
}

/// The notice to a member.
fn member_notice(
    pool: &StoredPool,
    member: &str,
    kind: &str,
    key: String,
    body: serde_json::Value,
) -> Notice {
    let mut body = body;
    body["pool"] = serde_json::json!(pool.id);
    body["pool_name"] = serde_json::json!(pool.name);
    Notice {
        key,
        recipient: ledger::client(member),
        kind: kind.into(),
        body,
    }
}

/// What a cycle decides of what it read: the plan, each request's reason, and the
/// change set (charges posted from the member to the owner, capped at what a member
/// can pay in credits; notices of slots given and taken back).
fn decide(
    state: &PoolState,
    balances: &BTreeMap<String, Option<i64>>,
    now_ms: UnixMillis,
) -> PoolDecision {
    let s = &state.pool.settings;
    // In a merged pool, the entities not leaving and their users take part.
    let entities: Vec<cohort::Member> = state
        .entities
        .iter()
        .filter(|e| e.leaving_at_ms.is_none())
        .map(cohort_member)
        .collect();
    let in_pool: BTreeSet<&str> = entities.iter().map(|e| e.entity.as_str()).collect();
    let members: BTreeSet<String> = state
        .members
        .iter()
        .filter(|m| state.entities.is_empty() || in_pool.contains(m.entity.as_str()))
        .map(|m| m.member.clone())
        .collect();
    let merged = (!state.entities.is_empty()).then(|| cohort::MergedPool {
        policy: s.policy.clone(),
        members: entities.clone(),
        slots: state
            .slots
            .iter()
            .map(|(row, _)| cohort::Slot {
                id: row.slot,
                owner: row.entity.clone(),
            })
            .collect(),
        users: state
            .members
            .iter()
            .map(|m| (m.member.clone(), m.entity.clone()))
            .collect(),
    });
    let slots: Vec<SlotState> = state
        .slots
        .iter()
        .map(|(row, until)| SlotState {
            id: row.slot,
            // A slot leaving ends for its holders when it leaves.
            until_ms: match (*until, row.leaving_at_ms) {
                (Some(u), Some(l)) => Some(u.min(l)),
                (u, l) => u.or(l),
            },
            leaving: row.leaving_at_ms.is_some(),
        })
        .collect();
    // A request its member cannot pay a cycle of takes no part (in credits and
    // units always; in money when the member is prepaid).
    let mut why: BTreeMap<Uuid, serde_json::Value> = BTreeMap::new();
    let mut requests = Vec::new();
    for r in &state.requests {
        let q = &r.request;
        if !members.contains(&q.user) {
            why.insert(
                q.id,
                serde_json::json!({
                    "rule": "not_member",
                    "message": format!("{} is not a member of this pool (or its entity is leaving it)", q.user),
                }),
            );
            continue;
        }
        let cycle_cost = pool::charge(q.bid, 0, s.cycle_ms).saturating_mul(i64::from(q.count));
        match balances.get(&q.user).copied().flatten() {
            Some(balance) if balance < cycle_cost => {
                why.insert(
                    q.id,
                    serde_json::json!({
                        "rule": "insufficient_funds",
                        "balance": balance,
                        "needed": cycle_cost,
                        "currency": s.currency,
                    }),
                );
            }
            _ => requests.push(q.clone()),
        }
    }
    let usage: BTreeMap<String, f64> = state
        .stretches
        .iter()
        .map(|(user, st)| (user.clone(), pool::usage_of(st, now_ms, s.half_life_ms)))
        .collect();
    let plan: Plan = pool::plan(pool::CycleInput {
        method: s.method_in_force(),
        policy: &s.policy,
        asking: state.pool.asking,
        members: merged
            .as_ref()
            .map_or(pool::Members::Single(&members), pool::Members::Merged),
        slots: &slots,
        requests: &requests,
        allocations: &state.allocations,
        usage: &usage,
        now_ms,
        notice_ms: s.notice_ms,
    });
    for q in &requests {
        let value = match plan.cycle.admission.why.get(&q.id) {
            Some(w) => {
                let mut v = serde_json::to_value(w).unwrap_or_default();
                // A rule of merged pools that decided it, besides.
                if let Some(m) = plan.cycle.merged_why.get(&q.id) {
                    v["merged"] = serde_json::to_value(m).unwrap_or_default();
                }
                v
            }
            None => match pool::check_request(&s.policy, &members, q) {
                Err(refusal) => {
                    serde_json::json!({"rule": refusal.rule, "message": refusal.message})
                }
                Ok(()) => serde_json::json!({
                    "rule": "below_asking",
                    "bid": q.bid,
                    "asking": state.pool.asking,
                }),
            },
        };
        why.insert(q.id, value);
    }
    let mut plan = plan;
    let mut changes = ChangeSet::default();
    let mut left: BTreeMap<String, Option<i64>> = balances.clone();
    for c in plan.charges.iter_mut().filter(|c| c.amount > 0) {
        let mut amount = c.amount;
        if let Some(Some(balance)) = left.get_mut(&c.user) {
            amount = amount.min((*balance).max(0));
            *balance -= amount;
        }
        // What a member could not pay is written off: its billing record says what
        // it paid.
        c.amount = amount;
        if amount == 0 {
            continue;
        }
        let key = format!("pool-charge:{}:{}", c.allocation, c.to_ms);
        changes.postings.push((
            ledger::Posting {
                key: key.clone(),
                kind: "pool".into(),
                memo: format!(
                    "pool {} slot {} from {} to {} at {} per slot-hour",
                    state.pool.name, c.slot, c.from_ms, c.to_ms, c.price
                ),
                entries: vec![
                    ledger::Entry {
                        account: ledger::client(&c.user),
                        currency: s.currency.clone(),
                        amount: -amount,
                    },
                    ledger::Entry {
                        account: ledger::pool(
                            state
                                .slots
                                .iter()
                                .find(|(r, _)| r.slot == c.slot)
                                .map_or(&state.pool.owner, |(r, _)| &r.entity),
                        ),
                        currency: s.currency.clone(),
                        amount,
                    },
                ],
            },
            Vec::new(),
        ));
    }
    let host_of = |slot: Uuid| {
        state
            .slots
            .iter()
            .find(|(r, _)| r.slot == slot)
            .map(|(r, _)| r.host)
    };
    for (id, deadline) in &plan.ended {
        let Some(a) = state.allocations.iter().find(|a| a.id == *id) else {
            continue;
        };
        let cause = match plan.cycle.admission.why.get(&a.request) {
            Some(Why::Preempted { by, .. }) => serde_json::json!({"rule": "preempted", "by": by}),
            Some(other) => serde_json::to_value(other).unwrap_or_default(),
            None => why
                .get(&a.request)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({"rule": "cancelled"})),
        };
        changes.notices.push(member_notice(
            &state.pool,
            &a.user,
            "pool.slot_ending",
            format!("pool.slot_ending:{id}"),
            serde_json::json!({
                "allocation": id,
                "request": a.request,
                "slot": a.slot,
                "host": host_of(a.slot),
                "deadline_ms": deadline,
                "why": cause,
            }),
        ));
    }
    for m in &plan.made {
        changes.notices.push(member_notice(
            &state.pool,
            &m.user,
            "pool.slot_given",
            format!("pool.slot_given:{}:{}:{}", m.request, m.slot, m.from_ms),
            serde_json::json!({
                "request": m.request,
                "slot": m.slot,
                "host": host_of(m.slot),
                "from_ms": m.from_ms,
                "price": m.price,
            }),
        ));
    }
    PoolDecision { plan, why, changes }
}

impl Market {
    fn require_pool_owner(&self, caller: &Principal) -> Result<(), MarketError> {
        if matches!(caller.role, Role::PoolOwner | Role::Admin) {
            Ok(())
        } else {
            Err(MarketError::Forbidden(
                "pools are made and run by pool owners".into(),
            ))
        }
    }

    /// Pool `id` as `caller` may see it: its owner and admins; its members (who see
    /// its slots); nobody else (404).
    async fn visible_pool(&self, caller: &Principal, id: Uuid) -> Result<StoredPool, MarketError> {
        let missing = || MarketError::NotFound(format!("pool {id} not found"));
        let p = self.app.store.pool(id).await?.ok_or_else(missing)?;
        let ok = match caller.role {
            Role::Admin => true,
            Role::PoolOwner => {
                p.owner == caller.account
                    || self
                        .app
                        .store
                        .pool_entities(id)
                        .await?
                        .iter()
                        .any(|e| e.entity == caller.account)
            }
            Role::Client => self
                .app
                .store
                .pool_members(id)
                .await?
                .iter()
                .any(|m| m.member == caller.account),
            Role::Provider => false,
        };
        if ok { Ok(p) } else { Err(missing()) }
    }

    /// Pool `id`, which `caller` must own (or be an admin).
    async fn owned_pool(&self, caller: &Principal, id: Uuid) -> Result<StoredPool, MarketError> {
        self.require_pool_owner(caller)?;
        self.visible_pool(caller, id).await
    }

    /// Pool `id` and the entity `caller` changes it as, if it holds `right`: its
    /// owner (every right) while the pool is its own; in a merged pool an entity
    /// that joined and is not leaving, with the right given at the merge (403
    /// `no_right` otherwise); an admin acts as the owner.
    async fn acting(
        &self,
        caller: &Principal,
        id: Uuid,
        right: Right,
    ) -> Result<(StoredPool, String), MarketError> {
        let p = self.owned_pool(caller, id).await?;
        if p.dissolved_at_ms.is_some() {
            return Err(refused("dissolved", format!("pool {id} is dissolved")));
        }
        if caller.role == Role::Admin {
            let owner = p.owner.clone();
            return Ok((p, owner));
        }
        let entities: Vec<cohort::Member> = self
            .app
            .store
            .pool_entities(id)
            .await?
            .iter()
            .filter(|e| e.joined_at_ms.is_some() && e.leaving_at_ms.is_none())
            .map(cohort_member)
            .collect();
        if entities.is_empty() && p.owner == caller.account {
            return Ok((p, caller.account.clone()));
        }
        cohort::check_change(&entities, &caller.account, right).map_err(|r| match r.rule {
            "no_right" | "not_in_pool" => MarketError::Forbidden(r.message),
            _ => MarketError::Refused(r),
        })?;
        Ok((p, caller.account.clone()))
    }

    /// `POST /v1/pools`.
    pub async fn create_pool(
        &self,
        caller: &Principal,
        body: PoolCreate,
    ) -> Result<PoolView, MarketError> {
        self.require_pool_owner(caller)?;
        let Some(name) = body.name.clone() else {
            return Err(invalid("name", "a pool has a name"));
        };
        check_name("name", &name)?;
        let id = Uuid::now_v7();
        let body = PoolSettingsBody { name: None, ..body };
        let settings = settings_of(body, None, &own_currency(id))?;
        self.check_burst_account(&caller.account, &settings).await?;
        let now = self.now();
        let p = StoredPool {
            id,
            owner: caller.account.clone(),
            name: name.trim().to_owned(),
            asking: pool::opening_price(settings.method, &settings.policy),
            next_cycle_at_ms: now.saturating_add(settings.cycle_ms),
            requested_at_ms: None,
            cycled_at_ms: None,
            created_at_ms: now,
            dissolved_at_ms: None,
            settings,
        };
        self.app.store.create_pool(&p).await?;
        tracing::info!(pool = %p.id, owner = %p.owner, "pool created");
        self.pool_view(p).await
    }

    /// `PUT /v1/pools/{id}/policy`: new settings from the next cycle on.
    pub async fn set_pool_policy(
        &self,
        caller: &Principal,
        id: Uuid,
        body: PoolSettingsBody,
    ) -> Result<PoolView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Policy).await?;
        let settings = settings_of(body, Some(&p.settings), &p.settings.currency)?;
        // A burst policy is paid by an account of the entity that sets it.
        if settings.burst != p.settings.burst {
            self.check_burst_account(&entity, &settings).await?;
        }
        self.app.store.set_pool_settings(id, &settings).await?;
        self.pool_view(StoredPool { settings, ..p }).await
    }

    /// A burst is paid by a client account that granted `owner` its capacity (400
    /// otherwise).
    async fn check_burst_account(&self, owner: &str, s: &Settings) -> Result<(), MarketError> {
        if let Some(b) = &s.burst {
            if !self
                .owner_accounts(owner)
                .await?
                .contains(&ledger::client(&b.account))
            {
                return Err(invalid(
                    "burst.account",
                    format!(
                        "{} is not one of {owner}'s accounts (the client account grants it with POST /v1/pool-accounts)",
                        b.account
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `GET /v1/pools`: the pools `caller` owns, or is a member of (admins: all).
    pub async fn pools(&self, caller: &Principal) -> Result<Vec<PoolView>, MarketError> {
        let mine: Vec<StoredPool> = match caller.role {
            Role::Admin => self.app.store.pools().await?,
            Role::PoolOwner => self
                .app
                .store
                .pools()
                .await?
                .into_iter()
                .filter(|p| p.owner == caller.account)
                .collect(),
            Role::Client => {
                let ids: BTreeSet<Uuid> = self
                    .app
                    .store
                    .pools_of_member(&caller.account)
                    .await?
                    .into_iter()
                    .collect();
                self.app
                    .store
                    .pools()
                    .await?
                    .into_iter()
                    .filter(|p| ids.contains(&p.id))
                    .collect()
            }
            Role::Provider => Vec::new(),
        };
        let mut out = Vec::with_capacity(mine.len());
        for p in mine {
            out.push(self.pool_view(p).await?);
        }
        Ok(out)
    }

    /// `GET /v1/pools/{id}`.
    pub async fn pool(&self, caller: &Principal, id: Uuid) -> Result<PoolView, MarketError> {
        let p = self.visible_pool(caller, id).await?;
        self.pool_view(p).await
    }

    async fn pool_view(&self, p: StoredPool) -> Result<PoolView, MarketError> {
        let now = self.now();
        let allocations = self.app.store.pool_allocations(p.id, false).await?;
        let slots = self
            .app
            .store
            .pool_slots(p.id)
            .await?
            .into_iter()
            .map(|s| SlotView {
                held_by: allocations
                    .iter()
                    .find(|(a, _)| a.slot == s.slot && a.holds_at(now))
                    .map(|(a, _)| a.user.clone()),
                slot: s.slot,
                entity: s.entity,
                host: s.host,
                account: s.account,
                facts: s.facts,
                burst: s.burst,
                added_at_ms: s.added_at_ms,
                leaving_at_ms: s.leaving_at_ms,
            })
            .collect();
        let members = self
            .app
            .store
            .pool_members(p.id)
            .await?
            .into_iter()
            .map(|m| MemberView {
                member: m.member,
                entity: m.entity,
                name: m.name,
                organisation: m.organisation,
                added_at_ms: m.added_at_ms,
            })
            .collect();
        Ok(PoolView {
            id: p.id,
            owner: p.owner,
            name: p.name,
            settings: p.settings,
            asking: p.asking,
            next_cycle_at_ms: p.next_cycle_at_ms,
            cycled_at_ms: p.cycled_at_ms,
            created_at_ms: p.created_at_ms,
            slots,
            members,
            entities: self
                .app
                .store
                .pool_entities(p.id)
                .await?
                .into_iter()
                .map(|e| EntityView {
                    entity: e.entity,
                    rights: e.rights.into_iter().collect(),
                    lending_limit: e.lending_limit,
                    borrowing_limit: e.borrowing_limit,
                    invited_at_ms: e.invited_at_ms,
                    joined_at_ms: e.joined_at_ms,
                    leaving_at_ms: e.leaving_at_ms,
                })
                .collect(),
            dissolved_at_ms: p.dissolved_at_ms,
        })
    }

    /// `POST /v1/pools/{id}/entities`: invites a pool owner into the pool, which
    /// becomes (or is) a merged pool, with the rights it will have; an entity with
    /// the `policy` right invites. The pool's owner, at the first invitation, becomes
    /// its first entity with every right.
    pub async fn invite_pool_entity(
        &self,
        caller: &Principal,
        id: Uuid,
        body: InviteRequest,
    ) -> Result<PoolView, MarketError> {
        let (p, inviter) = self.acting(caller, id, Right::Policy).await?;
        if ledger::validate_account(&ledger::pool(&body.entity)).is_err() {
            return Err(invalid(
                "entity",
                format!("{:?} is not an account name", body.entity),
            ));
        }
        let now = self.now();
        let entities = self.app.store.pool_entities(id).await?;
        // An entity gives no right it has not: the owner of a pool not yet merged,
        // and an admin, have them all.
        let own: BTreeSet<Right> = match entities.iter().find(|e| e.entity == inviter) {
            Some(e) if caller.role != Role::Admin => e.rights.clone(),
            _ => [Right::Policy, Right::Users, Right::Slots, Right::Dissolve].into(),
        };
        if let Some(r) = body.rights.iter().find(|r| !own.contains(r)) {
            return Err(MarketError::Forbidden(format!(
                "{inviter} may not give the `{}` right: it was not given to it",
                r.as_str()
            )));
        }
        if entities.iter().any(|e| e.entity == body.entity) || body.entity == p.owner {
            return Err(refused(
                "invited",
                format!("{} is in pool {id} already", body.entity),
            ));
        }
        if entities.is_empty() {
            self.app
                .store
                .put_pool_entity(
                    id,
                    &crate::store::PoolEntity {
                        entity: p.owner.clone(),
                        rights: [Right::Policy, Right::Users, Right::Slots, Right::Dissolve].into(),
                        lending_limit: None,
                        borrowing_limit: None,
                        invited_at_ms: now,
                        joined_at_ms: Some(now),
                        leaving_at_ms: None,
                    },
                )
                .await?;
        }
        self.app
            .store
            .put_pool_entity(
                id,
                &crate::store::PoolEntity {
                    entity: body.entity.clone(),
                    rights: body.rights.into_iter().collect(),
                    lending_limit: None,
                    borrowing_limit: None,
                    invited_at_ms: now,
                    joined_at_ms: None,
                    leaving_at_ms: None,
                },
            )
            .await?;
        tracing::info!(pool = %id, entity = %body.entity, "entity invited");
        self.pool_view(p).await
    }

    /// `POST /v1/pools/{id}/join`: an invited pool owner merges its own pool in,
    /// with its lending and borrowing limits; its slots stay its own.
    pub async fn join_pool(
        &self,
        caller: &Principal,
        id: Uuid,
        body: JoinRequest,
    ) -> Result<PoolView, MarketError> {
        let p = self.owned_pool(caller, id).await?;
        let now = self.now();
        self.app
            .store
            .join_pool(
                id,
                body.pool,
                &caller.account,
                (body.lending_limit, body.borrowing_limit),
                now,
            )
            .await??;
        tracing::info!(pool = %id, entity = %caller.account, from = %body.pool, "pool merged");
        self.pool_view(p).await
    }

    async fn set_limits(
        &self,
        p: &StoredPool,
        entity: &str,
        lending_limit: Option<u32>,
        borrowing_limit: Option<u32>,
    ) -> Result<(), MarketError> {
        let Some(mut e) = self
            .app
            .store
            .pool_entities(p.id)
            .await?
            .into_iter()
            .find(|e| e.entity == entity && e.joined_at_ms.is_some())
        else {
            return Err(MarketError::Forbidden(format!(
                "{entity} has not joined pool {}",
                p.id
            )));
        };
        e.lending_limit = lending_limit;
        e.borrowing_limit = borrowing_limit;
        self.app.store.put_pool_entity(p.id, &e).await?;
        Ok(())
    }

    /// `PUT /v1/pools/{id}/limits`: an entity sets how much of its capacity its
    /// users lend and may borrow, from the next cycle.
    pub async fn set_pool_limits(
        &self,
        caller: &Principal,
        id: Uuid,
        body: LimitsRequest,
    ) -> Result<PoolView, MarketError> {
        let p = self.owned_pool(caller, id).await?;
        self.set_limits(
            &p,
            &caller.account,
            body.lending_limit,
            body.borrowing_limit,
        )
        .await?;
        self.pool_view(p).await
    }

    /// `POST /v1/pools/{id}/leave`: an entity leaves a merged pool: its slots go
    /// back to it after the notice period, and the allocations on them, and its
    /// users' elsewhere in the pool, end then with notice (at a cycle run now).
    pub async fn leave_pool(&self, caller: &Principal, id: Uuid) -> Result<PoolView, MarketError> {
        let p = self.owned_pool(caller, id).await?;
        let now = self.now();
        // Under the pool's lock: its owner stays, and so does the last entity.
        if !self
            .app
            .store
            .leave_pool_entity(
                id,
                &caller.account,
                now.saturating_add(p.settings.notice_ms),
            )
            .await??
        {
            return Err(refused(
                "not_in_pool",
                format!(
                    "{} is not an entity of pool {id}, or is leaving already",
                    caller.account
                ),
            ));
        }
        self.app.store.request_pool_cycle(id, now).await?;
        self.pool_view(p).await
    }

    /// `DELETE /v1/pools/{id}`: dissolves a pool (the `dissolve` right): its requests
    /// are cancelled now, its slots go back after the notice period, and a last
    /// cycle then charges what was held.
    pub async fn dissolve_pool(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<PoolView, MarketError> {
        let (p, _) = self.acting(caller, id, Right::Dissolve).await?;
        let now = self.now();
        self.app
            .store
            .dissolve_pool(id, now.saturating_add(p.settings.notice_ms), now)
            .await?;
        let p = self.app.store.pool(id).await?.unwrap_or(p);
        self.pool_view(p).await
    }

    /// The entity whose user `member` of `pool` is, if it is one.
    async fn member_entity(&self, pool: Uuid, member: &str) -> Result<Option<String>, MarketError> {
        Ok(self
            .app
            .store
            .pool_members(pool)
            .await?
            .into_iter()
            .find(|m| m.member == member)
            .map(|m| m.entity))
    }

    /// `POST /v1/pool-accounts`: a client lets pool owner `owner` put the
    /// reservations it holds in pools (and pay bursts from it); a provider, the hosts
    /// it provides that no listing sells.
    pub async fn grant_pool_account(
        &self,
        caller: &Principal,
        owner: &str,
    ) -> Result<(), MarketError> {
        let account = match caller.role {
            Role::Client => ledger::client(&caller.account),
            Role::Provider => ledger::provider(&caller.account),
            _ => {
                return Err(MarketError::Forbidden(
                    "a client grants its reservations, a provider its hosts".into(),
                ));
            }
        };
        if ledger::validate_account(&ledger::pool(owner)).is_err() {
            return Err(invalid(
                "owner",
                format!("{owner:?} is not an account name"),
            ));
        }
        self.app
            .store
            .grant_pool_account(owner, &account, self.now())
            .await?;
        Ok(())
    }

    /// The accounts whose capacity `owner` may pool, as ledger names (`client:alice`,
    /// `provider:bob`): those that granted it, and no others.
    async fn owner_accounts(&self, owner: &str) -> Result<BTreeSet<String>, MarketError> {
        Ok(self
            .app
            .store
            .pool_accounts(owner)
            .await?
            .into_iter()
            .collect())
    }

    /// What slot `id` is, if `accounts` hold it now: a reservation of one of them, or
    /// a host one of them provides that no listing sells.
    async fn slot_of(
        &self,
        id: Uuid,
        accounts: &BTreeSet<String>,
        pool: Uuid,
        entity: &str,
    ) -> Result<PoolSlotRow, MarketError> {
        let now = self.now();
        if let Some(r) = self.app.store.reservation(id).await? {
            if !accounts.contains(&ledger::client(&r.holder)) {
                return Err(MarketError::Forbidden(format!(
                    "reservation {id} is held by {}, not by one of this owner's accounts (the account grants it with POST /v1/pool-accounts)",
                    r.holder
                )));
            }
            if !r.holds_at(now) {
                return Err(refused(
                    "slot_over",
                    format!("reservation {id} holds its host no more"),
                ));
            }
            let listing = self.app.store.listing(&r.listing).await?;
            let size = self.size_of(&r.listing).await?;
            let platform = self.host_platform(r.host).await?;
            return Ok(PoolSlotRow {
                slot: id,
                pool,
                entity: entity.to_owned(),
                host: r.host,
                account: r.holder.clone(),
                facts: SlotFacts {
                    kind: "reservation".into(),
                    mode: Some(surplus_market::records::name_of(&r.mode).to_owned()),
                    listing: Some(r.listing.clone()),
                    instance_type: listing.as_ref().map(|l| l.category.clone()),
                    cpus: size.map(|(m, _)| m / 1000),
                    memory_bytes: size.map(|(_, b)| b),
                    platform,
                    zone: listing.as_ref().map(|l| l.zone.clone()),
                    tenancy: "dedicated".into(),
                    until_ms: r.end_ms(),
                },
                burst: false,
                added_at_ms: now,
                leaving_at_ms: None,
            });
        }
        if let Some(agent) = self.app.store.agent(id).await? {
            let provider = surplus_market::billing::provider_of(&agent.labels);
            if !accounts.contains(&ledger::provider(&provider)) {
                return Err(MarketError::Forbidden(format!(
                    "host {id} is provided by {provider}, not by one of this owner's accounts"
                )));
            }
            if let Some(r) = self.app.store.holding(id, now).await? {
                return Err(refused(
                    "host_sold",
                    format!(
                        "host {id} is held by reservation {}: it is not its provider's to pool",
                        r.id
                    ),
                ));
            }
            if let Some(listing) = self.app.store.selling_listing(id).await? {
                return Err(refused(
                    "host_sold",
                    format!(
                        "host {id} is sold through listing {listing}: pool a reservation of it instead"
                    ),
                ));
            }
            let inventory: Option<surplus_protocol::inventory::Inventory> =
                agent.inventory.and_then(|v| serde_json::from_value(v).ok());
            return Ok(PoolSlotRow {
                slot: id,
                pool,
                entity: entity.to_owned(),
                host: id,
                account: provider,
                facts: SlotFacts {
                    kind: "host".into(),
                    mode: None,
                    listing: None,
                    instance_type: None,
                    cpus: inventory.as_ref().map(|i| i.cpu.logical_cpus),
                    memory_bytes: inventory.as_ref().map(|i| i.memory.total_bytes),
                    platform: inventory.as_ref().and_then(|i| i.os.name.clone()),
                    zone: agent.labels.get("zone").cloned(),
                    tenancy: "dedicated".into(),
                    until_ms: None,
                },
                burst: false,
                added_at_ms: now,
                leaving_at_ms: None,
            });
        }
        Err(MarketError::NotFound(format!(
            "no reservation or host {id}"
        )))
    }

    async fn host_platform(&self, host: Uuid) -> Result<Option<String>, MarketError> {
        Ok(self
            .app
            .store
            .agent(host)
            .await?
            .and_then(|a| a.inventory)
            .and_then(|v| serde_json::from_value::<surplus_protocol::inventory::Inventory>(v).ok())
            .and_then(|i| i.os.name))
    }

    /// The reservations `caller` may add to pool `pool` (FIG. 10): those its accounts
    /// hold now and that are in no pool, each with what it is (its instance type,
    /// size, platform, zone and term end). For the pool's owner, an entity of a
    /// merged pool with the `slots` right, or an admin (for the owner); none for one
    /// without the right or for a dissolved pool.
    pub async fn poolable_slots(
        &self,
        caller: &Principal,
        pool: Uuid,
    ) -> Result<Vec<(Reservation, SlotFacts)>, MarketError> {
        let entity = match self.acting(caller, pool, Right::Slots).await {
            Ok((_, entity)) => entity,
            Err(e @ (MarketError::Store(_) | MarketError::NotFound(_))) => return Err(e),
            Err(_) => return Ok(Vec::new()),
        };
        let accounts = self.owner_accounts(&entity).await?;
        let mut out = Vec::new();
        for (id, r) in self.own_free_slots(&accounts, self.now()).await? {
            // One that stopped holding since it was read is not offered.
            match self.slot_of(id, &accounts, pool, &entity).await {
                Ok(row) => out.push((r, row.facts)),
                Err(e @ MarketError::Store(_)) => return Err(e),
                Err(_) => {}
            }
        }
        out.sort_by_key(|(r, _)| (r.starts_at_ms, r.id));
        Ok(out)
    }

    /// `POST /v1/pools/{id}/slots`: a slot the owner's accounts hold joins the pool
    /// (409 `slot_taken` when it is in a pool already).
    pub async fn add_pool_slot(
        &self,
        caller: &Principal,
        id: Uuid,
        slot: Uuid,
    ) -> Result<PoolView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Slots).await?;
        let accounts = self.owner_accounts(&entity).await?;
        let row = self.slot_of(slot, &accounts, id, &entity).await?;
        self.app.store.add_pool_slot(&row, self.now()).await??;
        tracing::info!(pool = %id, %slot, "slot pooled");
        self.pool_view(p).await
    }

    /// `DELETE /v1/pools/{id}/slots/{slot}`: the owner takes a slot back; whoever
    /// holds it keeps it for the pool's notice period.
    pub async fn remove_pool_slot(
        &self,
        caller: &Principal,
        id: Uuid,
        slot: Uuid,
    ) -> Result<PoolView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Slots).await?;
        let now = self.now();
        let theirs = self
            .app
            .store
            .pool_slots(id)
            .await?
            .into_iter()
            .find(|s| s.slot == slot)
            .map(|s| s.entity);
        require_own(caller, &entity, theirs.as_deref(), |o| {
            format!("slot {slot} is {o}'s: an entity takes back its own slots")
        })?;
        if !self
            .app
            .store
            .leave_pool_slot(id, slot, now.saturating_add(p.settings.notice_ms))
            .await?
        {
            return Err(MarketError::NotFound(format!(
                "slot {slot} is not in pool {id}"
            )));
        }
        self.app.store.request_pool_cycle(id, now).await?;
        self.pool_view(p).await
    }

    /// `POST /v1/pools/{id}/members`.
    pub async fn put_pool_member(
        &self,
        caller: &Principal,
        id: Uuid,
        body: MemberRequest,
    ) -> Result<PoolView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Users).await?;
        if ledger::validate_account(&ledger::client(&body.member)).is_err() {
            return Err(invalid(
                "member",
                format!("{:?} is not an account name", body.member),
            ));
        }
        let name = body.name.unwrap_or_else(|| body.member.clone());
        check_name("name", &name)?;
        let organisation = body.organisation.unwrap_or_default();
        if organisation.len() > MAX_NAME || organisation.chars().any(char::is_control) {
            return Err(invalid(
                "organisation",
                format!("at most {MAX_NAME} characters, none of them control characters"),
            ));
        }
        let theirs = self.member_entity(id, &body.member).await?;
        require_own(caller, &entity, theirs.as_deref(), |o| {
            format!(
                "{} is {o}'s user: an entity changes its own users",
                body.member
            )
        })?;
        let m = PoolMember {
            member: body.member,
            entity: theirs.unwrap_or(entity),
            name,
            organisation,
            added_at_ms: self.now(),
        };
        self.app
            .store
            .put_pool_member(id, &m, p.settings.max_users)
            .await??;
        self.pool_view(p).await
    }

    /// `DELETE /v1/pools/{id}/members/{member}`: its requests take no part from the
    /// next cycle, which is run at once; its slots end after the notice period.
    pub async fn remove_pool_member(
        &self,
        caller: &Principal,
        id: Uuid,
        member: &str,
    ) -> Result<PoolView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Users).await?;
        let theirs = self.member_entity(id, member).await?;
        require_own(caller, &entity, theirs.as_deref(), |o| {
            format!("{member} is {o}'s user: an entity removes its own users")
        })?;
        if !self.app.store.remove_pool_member(id, member).await? {
            return Err(MarketError::NotFound(format!(
                "{member} is not a member of pool {id}"
            )));
        }
        self.app.store.request_pool_cycle(id, self.now()).await?;
        self.pool_view(p).await
    }

    /// `POST /v1/pools/{id}/credits`: the owner issues credits (or units) of the
    /// pool's currency to a member: a ledger posting from `external` (where every
    /// currency is issued) to the member. A pool in money issues nothing.
    pub async fn credit_pool_member(
        &self,
        caller: &Principal,
        id: Uuid,
        body: CreditRequest,
    ) -> Result<CreditView, MarketError> {
        let (p, entity) = self.acting(caller, id, Right::Users).await?;
        super::check_client_token(body.client_token.as_deref())?;
        if p.settings.currency_kind == CurrencyKind::Money {
            return Err(refused(
                "money_pool",
                format!(
                    "pool {id} is paid in money ({}): its owner issues no credits",
                    p.settings.currency
                ),
            ));
        }
        if body.amount <= 0 || body.amount > i64::try_from(super::MAX_PRICE).unwrap_or(i64::MAX) {
            return Err(invalid(
                "amount",
                format!("{}: from 1 to {}", body.amount, super::MAX_PRICE),
            ));
        }
        let Some(theirs) = self.member_entity(id, &body.member).await? else {
            return Err(invalid(
                "member",
                format!("{} is not a member of pool {id}", body.member),
            ));
        };
        require_own(caller, &entity, Some(&theirs), |o| {
            format!(
                "{} is {o}'s user: an entity issues credits to its own users",
                body.member
            )
        })?;
        let key = format!(
            "pool-credit:{id}:{}",
            body.client_token
                .clone()
                .unwrap_or_else(|| Uuid::now_v7().to_string())
        );
        let posting = ledger::Posting {
            key: key.clone(),
            kind: "pool_credit".into(),
            memo: format!(
                "{} issued to {} in pool {}",
                p.settings.currency, body.member, p.name
            ),
            entries: vec![
                ledger::Entry {
                    account: ledger::EXTERNAL.into(),
                    currency: p.settings.currency.clone(),
                    amount: -body.amount,
                },
                ledger::Entry {
                    account: ledger::client(&body.member),
                    currency: p.settings.currency.clone(),
                    amount: body.amount,
                },
            ],
        };
        let applied = self.app.store.post(&posting, &[], self.now()).await?;
        Ok(CreditView {
            key,
            member: body.member,
            amount: body.amount,
            currency: p.settings.currency,
            applied: match applied {
                ledger::Applied::Posted => "posted".into(),
                ledger::Applied::Duplicate => "duplicate".into(),
            },
        })
    }

    /// `POST /v1/pools/{id}/requests`: a member asks for `count` slots at `bid` per
    /// slot-hour; the next cycle decides.
    pub async fn pool_request(
        &self,
        caller: &Principal,
        id: Uuid,
        body: PoolBidRequest,
    ) -> Result<PoolRequestView, MarketError> {
        super::require_client(caller)?;
        super::check_client_token(body.client_token.as_deref())?;
        let p = self.visible_pool(caller, id).await?;
        super::check_price("bid", body.bid)?;
        if p.dissolved_at_ms.is_some() {
            return Err(refused("dissolved", format!("pool {id} is dissolved")));
        }
        if body.count > super::MAX_COUNT {
            return Err(invalid(
                "count",
                format!("{}: at most {}", body.count, super::MAX_COUNT),
            ));
        }
        let members: BTreeSet<String> = self
            .app
            .store
            .pool_members(id)
            .await?
            .into_iter()
            .map(|m| m.member)
            .collect();
        let request = pool::Request {
            id: body.client_token.as_deref().map_or_else(Uuid::now_v7, |t| {
                super::token_id(&caller.account, &format!("pool-request\0{id}\0{t}"), 0)
            }),
            user: caller.account.clone(),
            count: body.count,
            bid: body.bid,
            placed_at_ms: self.now(),
        };
        if let Some(before) = self.app.store.pool_request(request.id).await? {
            return self.request_view(before).await;
        }
        pool::check_request(&p.settings.policy, &members, &request).map_err(|r| match r.rule {
            "count" => invalid("count", r.message),
            "below_minimum" | "above_maximum" => invalid("bid", r.message),
            _ => MarketError::Refused(r),
        })?;
        let stored = StoredPoolRequest {
            pool: id,
            request,
            cancelled_at_ms: None,
            why: None,
        };
        self.app.store.place_pool_request(&stored).await?;
        self.request_view(stored).await
    }

    /// A request `caller` may see: its member's, or the pool owner's.
    async fn visible_request(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<(StoredPoolRequest, StoredPool), MarketError> {
        let missing = || MarketError::NotFound(format!("pool request {id} not found"));
        let r = self.app.store.pool_request(id).await?.ok_or_else(missing)?;
        let p = self.app.store.pool(r.pool).await?.ok_or_else(missing)?;
        let ok = match caller.role {
            Role::Admin => true,
            Role::Client => r.request.user == caller.account,
            Role::PoolOwner => self.runs_pool(caller, &p).await?,
            Role::Provider => false,
        };
        if ok { Ok((r, p)) } else { Err(missing()) }
    }

    /// Whether pool owner `caller` runs pool `p`: its owner, or an entity that joined
    /// it (one only invited sees the pool, not its members' requests and usage).
    async fn runs_pool(&self, caller: &Principal, p: &StoredPool) -> Result<bool, MarketError> {
        Ok(p.owner == caller.account
            || self
                .app
                .store
                .pool_entities(p.id)
                .await?
                .iter()
                .any(|e| e.entity == caller.account && e.joined_at_ms.is_some()))
    }

    /// Refuses an entity only invited into `p` what only those who run it see.
    async fn require_runs(&self, caller: &Principal, p: &StoredPool) -> Result<(), MarketError> {
        if caller.role == Role::PoolOwner && !self.runs_pool(caller, p).await? {
            return Err(MarketError::Forbidden(format!(
                "{} is invited into pool {}, not in it: it sees its requests and usage once it has joined",
                caller.account, p.id
            )));
        }
        Ok(())
    }

    /// `GET /v1/pool-requests/{id}`.
    pub async fn pool_request_of(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<PoolRequestView, MarketError> {
        let (r, _) = self.visible_request(caller, id).await?;
        self.request_view(r).await
    }

    /// `GET /v1/pools/{id}/requests`: all of them for its owner, a member's own.
    pub async fn pool_requests(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<Vec<PoolRequestView>, MarketError> {
        let p = self.visible_pool(caller, id).await?;
        self.require_runs(caller, &p).await?;
        let mut out = Vec::new();
        for r in self.app.store.pool_requests(p.id).await? {
            if caller.role == Role::Client && r.request.user != caller.account {
                continue;
            }
            out.push(self.request_view(r).await?);
        }
        Ok(out)
    }

    async fn request_view(&self, r: StoredPoolRequest) -> Result<PoolRequestView, MarketError> {
        let allocations = self
            .app
            .store
            .pool_allocations(r.pool, false)
            .await?
            .into_iter()
            .filter(|(a, _)| a.request == r.request.id)
            .map(|(allocation, host)| AllocationView { allocation, host })
            .collect();
        Ok(PoolRequestView {
            pool: r.pool,
            state: if r.cancelled_at_ms.is_some() {
                "cancelled"
            } else {
                "live"
            }
            .into(),
            request: r.request,
            why: r.why,
            allocations,
        })
    }

    /// `POST /v1/pool-requests/{id}/bid`: a member changes its bid (an English pool's
    /// only rise); one below the minimum is kept and takes no part, so the slots it
    /// holds end with notice at the next cycle.
    pub async fn pool_rebid(
        &self,
        caller: &Principal,
        id: Uuid,
        bid: u64,
    ) -> Result<PoolRequestView, MarketError> {
        let (r, p) = self.visible_request(caller, id).await?;
        if caller.role != Role::Client {
            return Err(MarketError::Forbidden(
                "a request's bid is its member's to change".into(),
            ));
        }
        super::check_price("bid", bid)?;
        if r.cancelled_at_ms.is_some() {
            return Err(refused(
                "cancelled",
                format!("pool request {id} was cancelled"),
            ));
        }
        // Checked again against the bid it has under the pool's lock.
        pool::check_rebid(p.settings.method_in_force(), r.request.bid, bid)
            .map_err(MarketError::Refused)?;
        if let Some(max) = p.settings.policy.maximum.filter(|m| bid > *m) {
            return Err(invalid(
                "bid",
                format!("the bid {bid} is above the pool's maximum {max}"),
            ));
        }
        let only_rise = p.settings.method_in_force() == Method::English;
        self.app.store.set_pool_bid(id, bid, only_rise).await??;
        self.pool_request_of(caller, id).await
    }

    /// `POST /v1/pool-requests/{id}/cancel`: the slots it holds end after the
    /// notice period (from the next cycle, run at once).
    pub async fn cancel_pool_request(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<PoolRequestView, MarketError> {
        let (r, _) = self.visible_request(caller, id).await?;
        if caller.role != Role::Client {
            return Err(MarketError::Forbidden(
                "a request is cancelled by its member".into(),
            ));
        }
        let now = self.now();
        if !self.app.store.cancel_pool_request(id, now).await? {
            return Err(refused(
                "cancelled",
                format!("pool request {id} was cancelled already"),
            ));
        }
        self.app.store.request_pool_cycle(r.pool, now).await?;
        self.pool_request_of(caller, id).await
    }

    /// `GET /v1/pool-requests/{id}/explain`.
    pub async fn explain_pool_request(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<ExplainView, MarketError> {
        let (r, p) = self.visible_request(caller, id).await?;
        let why = r.why.clone();
        let (rule, explanation) = if r.cancelled_at_ms.is_some() {
            (
                "cancelled".to_owned(),
                "cancelled by its member: the slots it held ended after the notice period"
                    .to_owned(),
            )
        } else {
            match &why {
                None => (
                    "not_yet_cycled".to_owned(),
                    format!(
                        "waiting for the pool's next cycle at {}",
                        p.next_cycle_at_ms
                    ),
                ),
                Some(w) => explain(w, &r.request, &p),
            }
        };
        Ok(ExplainView {
            request: id,
            rule,
            explanation,
            why,
        })
    }

    /// `GET /v1/pools/{id}/usage`: per member, slot-hours, charges and the slots held
    /// (FIG. 12); a member sees its own.
    pub async fn pool_usage(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<PoolUsageView, MarketError> {
        let p = self.visible_pool(caller, id).await?;
        self.require_runs(caller, &p).await?;
        let now = self.now();
        let charges = self.app.store.pool_charges(id).await?;
        let allocations = self.app.store.pool_allocations(id, true).await?;
        let requests: BTreeMap<Uuid, pool::Request> = self
            .app
            .store
            .pool_requests(id)
            .await?
            .into_iter()
            .map(|r| (r.request.id, r.request))
            .collect();
        let slots: BTreeMap<Uuid, PoolSlotRow> = self
            .app
            .store
            .pool_slots(id)
            .await?
            .into_iter()
            .map(|s| (s.slot, s))
            .collect();
        let mut users: BTreeSet<String> = self
            .app
            .store
            .pool_members(id)
            .await?
            .into_iter()
            .map(|m| m.member)
            .collect();
        users.extend(allocations.iter().map(|(a, _)| a.user.clone()));
        if caller.role == Role::Client {
            users.retain(|u| *u == caller.account);
        }
        let mut members = Vec::new();
        for user in users {
            let mine: Vec<ChargeView> = charges
                .iter()
                .filter(|c| c.member == user)
                .map(|c| ChargeView {
                    request: c.request,
                    slot: c.slot,
                    from_ms: c.from_ms,
                    to_ms: c.to_ms,
                    price: c.price,
                    amount: c.amount,
                })
                .collect();
            let slot_hours = allocations
                .iter()
                .filter(|(a, _)| a.user == user)
                .map(|(a, _)| {
                    let to = a.until_ms.unwrap_or(now).min(now);
                    (to - a.from_ms).max(0) as f64 / HOUR_MS as f64
                })
                .sum();
            let mut holding = Vec::new();
            for (a, host) in allocations
                .iter()
                .filter(|(a, _)| a.user == user && a.holds_at(now))
            {
                let facts = slots.get(&a.slot).map(|s| s.facts.clone());
                let instances = self
                    .app
                    .store
                    .agent_instances(*host)
                    .await?
                    .into_iter()
                    .filter(|i| {
                        i.account == user
                            && i.owner_role == Role::Client
                            && i.record.state
                                != surplus_protocol::control::InstanceState::Terminated
                    })
                    .map(|i| i.record.id)
                    .collect();
                holding.push(PoolRecordView {
                    customer: p.owner.clone(),
                    member: user.clone(),
                    request: a.request,
                    slot: a.slot,
                    host: *host,
                    instances,
                    instance_type: facts.as_ref().and_then(|f| f.instance_type.clone()),
                    cpus: facts.as_ref().and_then(|f| f.cpus),
                    memory_bytes: facts.as_ref().and_then(|f| f.memory_bytes),
                    platform: facts.as_ref().and_then(|f| f.platform.clone()),
                    tenancy: facts
                        .as_ref()
                        .map_or_else(|| "dedicated".into(), |f| f.tenancy.clone()),
                    zone: facts.as_ref().and_then(|f| f.zone.clone()),
                    price: a.price,
                    bid: requests.get(&a.request).map_or(0, |r| r.bid),
                });
            }
            members.push(MemberUsage {
                charged: mine.iter().map(|c| c.amount).sum(),
                member: user,
                slot_hours,
                holding,
                charges: mine,
            });
        }
        let bursts = self.app.store.pool_bursts(id).await?;
        let burst_spent = p
            .settings
            .burst
            .as_ref()
            .map_or(0, |b| burst_spent(&bursts, b, now, now));
        Ok(PoolUsageView {
            pool: id,
            currency: p.settings.currency.clone(),
            total: members.iter().map(|m| m.charged).sum(),
            members,
            burst_spent,
            bursts: if caller.role == Role::Client {
                Vec::new()
            } else {
                bursts
                    .into_iter()
                    .map(|b| BurstView {
                        slot: b.slot,
                        request: b.request,
                        source: b.source,
                        price: b.price,
                        started_at_ms: b.started_at_ms,
                        ended_at_ms: b.ended_at_ms,
                    })
                    .collect()
            },
        })
    }

    /// `POST /v1/pools/{id}/cycle`: the owner runs a cycle now.
    pub async fn cycle_pool_now(
        &self,
        caller: &Principal,
        id: Uuid,
    ) -> Result<PoolView, MarketError> {
        let (p, _) = self.acting(caller, id, Right::Policy).await?;
        let now = self.now();
        self.app.store.request_pool_cycle(id, now).await?;
        self.cycle_pool(id, now).await?;
        let p = self.app.store.pool(id).await?.unwrap_or(p);
        self.pool_view(p).await
    }

    /// Asks for a cycle of each pool that holds one of `ended` (host, reservation)
    /// as a slot: its allocations end, and are charged, when their slot does.
    pub(super) async fn wake_pools(
        &self,
        ended: impl Iterator<Item = (Uuid, Uuid)>,
        now: UnixMillis,
    ) {
        for (host, reservation) in ended {
            match self.app.store.pool_slot_on(host, now).await {
                Ok(Some(slot)) if slot.slot == reservation => {
                    if let Err(e) = self.app.store.request_pool_cycle(slot.pool, now).await {
                        tracing::warn!(pool = %slot.pool, error = %e, "waking a pool");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%host, error = %e, "finding a pooled slot"),
            }
        }
    }

    /// Runs the pools whose cycle is due (from the market's tick); one that fails
    /// does not hold up the others.
    pub(super) async fn cycle_due_pools(&self, due: Vec<Uuid>, now: UnixMillis) {
        for id in due {
            if let Err(e) = self.cycle_pool(id, now).await {
                tracing::warn!(pool = %id, error = %e, "pool cycle");
            }
        }
    }

    /// One cycle of pool `id`, then its bursts.
    async fn cycle_pool(&self, id: Uuid, now: UnixMillis) -> Result<(), MarketError> {
        let Some(p) = self.app.store.pool(id).await? else {
            return Ok(());
        };
        // What each member can pay: in credits and units, its balance; in money, its
        // balance if it is prepaid (else unbounded).
        let mut balances = BTreeMap::new();
        for m in self.app.store.pool_members(id).await? {
            let balance = match p.settings.currency_kind {
                CurrencyKind::Money => {
                    super::prepaid_balance(
                        self.app.store.as_ref(),
                        &ledger::client(&m.member),
                        &p.settings.currency,
                    )
                    .await?
                }
                CurrencyKind::Credits | CurrencyKind::Units => Some(
                    self.app
                        .store
                        .balances(Some(&ledger::client(&m.member)))
                        .await?
                        .into_iter()
                        .find(|(_, c, _)| *c == p.settings.currency)
                        .map_or(0, |(_, _, b)| b),
                ),
            };
            balances.insert(m.member, balance);
        }
        let decide = |state: &PoolState| decide(state, &balances, now);
        let Some(decision) = self.app.store.run_pool_cycle(id, &decide, now).await? else {
            return Ok(());
        };
        tracing::info!(
            pool = %id,
            made = decision.plan.made.len(),
            ended = decision.plan.ended.len(),
            charged = decision.plan.charges.len(),
            "pool cycle"
        );
        if let Err(e) = self.bursts(&p, &decision, now).await {
            tracing::warn!(pool = %id, error = %e, "pool burst");
        }
        Ok(())
    }
}

/// Whole hours from `from_ms` to `to_ms`, a part counting whole.
fn hours_between(from_ms: UnixMillis, to_ms: UnixMillis) -> u64 {
    ((to_ms - from_ms).max(0) + HOUR_MS - 1).div_euclid(HOUR_MS) as u64
}

/// What bursts cost the budget of the period `now_ms` falls in, if those not given
/// back are held until `until_ms`: each market burst its price for every hour (a
/// part counting whole) it is held in the period, and at least its minimum
/// duration. Bursts into the owner's own slots cost nothing.
fn burst_spent(
    bursts: &[PoolBurst],
    b: &pool::BurstSettings,
    now_ms: UnixMillis,
    until_ms: UnixMillis,
) -> u64 {
    let start = pool::period_start(now_ms, b.period_ms);
    bursts
        .iter()
        .filter(|x| x.source != "own" && x.ended_at_ms.is_none_or(|e| e > start))
        .map(|x| {
            let from = x.started_at_ms.max(start);
            let hours = hours_between(from, x.ended_at_ms.unwrap_or(until_ms));
            let hours = if x.started_at_ms >= start {
                hours.max(u64::from(b.min_hours))
            } else {
                hours
            };
            x.price.saturating_mul(hours)
        })
        .sum()
}

/// A decision in words.
fn explain(why: &serde_json::Value, r: &pool::Request, p: &StoredPool) -> (String, String) {
    let rule = why["rule"].as_str().unwrap_or("unknown").to_owned();
    let n = |k: &str| why[k].as_i64().unwrap_or(0);
    let mut text = match rule.as_str() {
        "holds" => format!(
            "holds all {} slots it asked for: ranked {} of the requests at its bid {} (bids first, then the lighter user, then the earlier request)",
            r.count,
            n("rank") + 1,
            r.bid
        ),
        "pool_full" => format!(
            "holds {} of {} slots: ranked {} at its bid {}, the pool had no slot left for it",
            n("got"),
            n("wanted"),
            n("rank") + 1,
            r.bid
        ),
        "user_cap" => format!(
            "holds {} of {} slots: its user holds the pool's cap of {} slots",
            n("got"),
            n("wanted"),
            n("cap")
        ),
        "preempted" => format!(
            "lost {} slots to request {}, which ranked above it; they end after the notice period of {} s",
            n("lost"),
            why["by"].as_str().unwrap_or("?"),
            p.settings.notice_ms / 1000
        ),
        "insufficient_funds" => format!(
            "takes no part: a cycle at its bid costs {} {} and its balance is {}",
            n("needed"),
            p.settings.currency,
            n("balance")
        ),
        "below_asking" => format!(
            "takes no part: its bid {} is below the Dutch pool's asking price {}",
            n("bid"),
            n("asking")
        ),
        _ => why["message"]
            .as_str()
            .map_or_else(|| rule.clone(), str::to_owned),
    };
    if let Some(b) = why.get("burst") {
        let words = b["message"].as_str().unwrap_or("");
        let rule = b["rule"].as_str().unwrap_or("");
        match rule {
            "burst" => text.push_str(&format!("; burst: {words}")),
            _ => text.push_str(&format!("; no burst ({rule}): {words}")),
        }
    }
    (rule, text)
}

impl Market {
    /// After a cycle: gives back the bursts the pool no longer needs (none of its
    /// allocations holds the slot, past the burst's minimum duration) or can no
    /// longer pay (the period's budget spent), then bursts for requests left short,
    /// by the owner's policy (`pool::burst`): its own slots outside any pool first,
    /// then market capacity reserved on its behalf, never above the maximum price nor
    /// past the budget. Each request is told what its burst did.
    async fn bursts(
        &self,
        p: &StoredPool,
        decision: &PoolDecision,
        now: UnixMillis,
    ) -> Result<(), MarketError> {
        let bursts = self.app.store.pool_bursts(p.id).await?;
        // In use: given by this cycle, or still held by someone under notice.
        let holds = &decision.plan.cycle.admission.holds;
        let mut in_use: BTreeSet<Uuid> = holds.values().flatten().copied().collect();
        in_use.extend(
            self.app
                .store
                .pool_allocations(p.id, false)
                .await?
                .into_iter()
                .filter(|(a, _)| a.until_ms.is_none_or(|u| u > now))
                .map(|(a, _)| a.slot),
        );
        let policy = p.settings.burst.clone();
        let pooled: BTreeMap<Uuid, PoolSlotRow> = self
            .app
            .store
            .pool_slots(p.id)
            .await?
            .into_iter()
            .map(|s| (s.slot, s))
            .collect();
        let min_ms = policy
            .as_ref()
            .map_or(0, |x| i64::from(x.min_hours) * HOUR_MS);
        // The budget is never passed: a burst kept is paid at least until the next
        // cycle and a notice after it, when it could be given back at the earliest.
        let horizon = now
            .saturating_add(p.settings.cycle_ms)
            .saturating_add(p.settings.notice_ms);
        let mut kept: Vec<PoolBurst> = bursts.clone();
        let mut leaving = false;
        // Newest first: the last burst made is the first given back.
        for b in bursts.iter().rev().filter(|b| b.ended_at_ms.is_none()) {
            let past_minimum = now.saturating_sub(b.started_at_ms) >= min_ms;
            let give_back = |kept: &mut Vec<PoolBurst>, until: UnixMillis| {
                if let Some(k) = kept.iter_mut().find(|k| k.slot == b.slot) {
                    k.ended_at_ms = Some(until);
                }
            };
            match pooled.get(&b.slot) {
                // Gone from the pool (its holder's notice is over): given back.
                None => {
                    self.end_burst(p, b, "left the pool", now).await?;
                    give_back(&mut kept, now);
                }
                Some(s) if s.leaving_at_ms.is_some_and(|t| t <= now) => {
                    self.end_burst(p, b, "left the pool", now).await?;
                    give_back(&mut kept, now);
                }
                Some(s) if s.leaving_at_ms.is_some() => {
                    give_back(&mut kept, s.leaving_at_ms.unwrap_or(now));
                }
                // Nobody holds it: given back at once.
                Some(_) if !in_use.contains(&b.slot) && past_minimum => {
                    self.app.store.leave_pool_slot(p.id, b.slot, now).await?;
                    self.end_burst(p, b, "no longer needed", now).await?;
                    give_back(&mut kept, now);
                }
                // Kept until the horizon it would pass the budget: its holder keeps
                // it for the notice period, then it is given back.
                Some(_)
                    if b.source != "own"
                        && policy
                            .as_ref()
                            .is_none_or(|x| burst_spent(&kept, x, now, horizon) > x.budget) =>
                {
                    let deadline = now.saturating_add(p.settings.notice_ms);
                    self.app
                        .store
                        .leave_pool_slot(p.id, b.slot, deadline)
                        .await?;
                    give_back(&mut kept, deadline);
                    leaving = true;
                }
                Some(_) => {}
            }
        }
        let spent = policy
            .as_ref()
            .map_or(0, |x| burst_spent(&kept, x, now, horizon));
        if leaving {
            self.app.store.request_pool_cycle(p.id, now).await?;
        }
        // What the pool could not give: requests short after the cycle, less the
        // slots it offered and nobody holds (bursts not yet allocated among them).
        let free = decision
            .plan
            .offered
            .iter()
            .filter(|s| !in_use.contains(s))
            .count() as u32;
        // In rank order: the best-ranked request left short bursts first; not one
        // that a merged pool's lending or borrowing limit left short (a burst slot
        // is the owner's, which it could not borrow either).
        let mut short: Vec<(usize, Uuid, u32)> = Vec::new();
        for (request, why) in &decision.plan.cycle.admission.why {
            if let Why::PoolFull { rank, got, wanted } = why {
                if !decision.plan.cycle.merged_why.contains_key(request) {
                    short.push((*rank, *request, wanted.saturating_sub(*got)));
                }
            }
        }
        short.sort();
        let mut free = free;
        let mut spent = spent;
        let mut told: BTreeMap<Uuid, serde_json::Value> = BTreeMap::new();
        for (_, request, wanted) in short {
            let cover = free.min(wanted);
            free -= cover;
            let wanted = wanted - cover;
            if wanted == 0 {
                continue;
            }
            let accounts = self.owner_accounts(&p.owner).await?;
            let own = self.own_free_slots(&accounts, now).await?;
            let offers = match &policy {
                Some(b) => self.burst_offers(&b.currency).await?,
                None => Vec::new(),
            };
            // A new burst is paid at least its minimum, and until the next cycle
            // and a notice after it.
            let hours = policy.as_ref().map_or(1, |b| {
                let until = hours_between(now, horizon);
                b.min_hours.max(u32::try_from(until).unwrap_or(u32::MAX))
            });
            let decided = pool::burst(
                policy
                    .as_ref()
                    .map(|b| pool::BurstPolicy {
                        max_price: b.max_price,
                        budget: b.budget,
                    })
                    .as_ref(),
                wanted,
                hours,
                spent,
                &own.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                &offers,
            );
            let mut got = 0;
            for unit in &decided.units {
                match unit {
                    pool::Unit::Own { slot } => {
                        let accounts = self.owner_accounts(&p.owner).await?;
                        let mut row = self.slot_of(*slot, &accounts, p.id, &p.owner).await?;
                        row.burst = true;
                        if self.app.store.add_pool_slot(&row, now).await?.is_ok() {
                            self.app
                                .store
                                .put_pool_burst(
                                    p.id,
                                    &PoolBurst {
                                        slot: *slot,
                                        request,
                                        source: "own".into(),
                                        price: 0,
                                        started_at_ms: now,
                                        ended_at_ms: None,
                                    },
                                )
                                .await?;
                            got += 1;
                        }
                    }
                    pool::Unit::Market { listing, price } => {
                        let Some(b) = &policy else { continue };
                        match self
                            .burst_reserve(p, b, request, listing, *price, now)
                            .await
                        {
                            Ok(()) => {
                                spent =
                                    spent.saturating_add(price.saturating_mul(u64::from(hours)));
                                got += 1;
                            }
                            Err(e) => {
                                tracing::warn!(pool = %p.id, %listing, error = %e, "burst reservation")
                            }
                        }
                    }
                }
            }
            let value = match &decided.short {
                Some(refusal) if got == 0 => {
                    serde_json::json!({"rule": refusal.rule, "message": refusal.message})
                }
                Some(refusal) => serde_json::json!({
                    "rule": "burst",
                    "message": format!("{got} of {wanted} slots burst; the rest: {}", refusal.message),
                    "short": refusal.rule,
                }),
                None => serde_json::json!({
                    "rule": "burst",
                    "message": format!("{got} slots burst (cost {} of the budget)", decided.cost),
                }),
            };
            told.insert(request, value);
        }
        if !told.is_empty() {
            for (request, burst) in &told {
                let mut why = decision
                    .why
                    .get(request)
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({}));
                why["burst"] = burst.clone();
                self.app.store.set_pool_request_why(*request, &why).await?;
            }
            // The slots burst into are given at a cycle run now.
            if told.values().any(|v| v["rule"] == "burst") {
                self.app.store.request_pool_cycle(p.id, now).await?;
            }
        }
        Ok(())
    }

    /// Gives a burst back once it is out of the pool: a market reservation is
    /// released (its billing to the owner stops there).
    async fn end_burst(
        &self,
        p: &StoredPool,
        b: &PoolBurst,
        why: &str,
        now: UnixMillis,
    ) -> Result<(), MarketError> {
        if b.source != "own" {
            if let Some(r) = self.app.store.reservation(b.slot).await? {
                if r.holds_at(now) {
                    let holder = Principal {
                        account: r.holder.clone(),
                        role: Role::Client,
                    };
                    self.release(&holder, r.id).await?;
                }
            }
        }
        self.app.store.end_pool_burst(b.slot, now).await?;
        tracing::info!(pool = %p.id, slot = %b.slot, why, "burst given back");
        self.app
            .store
            .apply_changes(
                &ChangeSet {
                    notices: vec![Notice {
                        key: format!("pool.burst_ended:{}", b.slot),
                        recipient: ledger::pool(&p.owner),
                        kind: "pool.burst_ended".into(),
                        body: serde_json::json!({"pool": p.id, "slot": b.slot, "why": why}),
                    }],
                    ..ChangeSet::default()
                },
                now,
            )
            .await?;
        Ok(())
    }

    /// The reservations the owner's accounts hold now outside any pool.
    async fn own_free_slots(
        &self,
        accounts: &BTreeSet<String>,
        now: UnixMillis,
    ) -> Result<Vec<(Uuid, Reservation)>, MarketError> {
        let pooled: BTreeSet<Uuid> = self
            .app
            .store
            .pooled_slots(now)
            .await?
            .into_iter()
            .collect();
        let mut out = Vec::new();
        for a in accounts.iter().filter_map(|a| a.strip_prefix("client:")) {
            for r in self.app.store.reservations_of(a).await? {
                if r.holds_at(now) && !pooled.contains(&r.id) {
                    out.push((r.id, r));
                }
            }
        }
        Ok(out)
    }

    /// The market's on-demand offers in `currency` with a host free, at their price.
    async fn burst_offers(&self, currency: &str) -> Result<Vec<pool::MarketOffer>, MarketError> {
        let now = self.now();
        let selling = self.selling_providers().await?;
        let reservations = self.app.store.listing_reservations(now).await?;
        let mut out = Vec::new();
        for l in self.app.store.listings().await? {
            if !l.listed
                || l.currency != currency
                || !l.pricing_modes.contains(&PricingMode::OnDemand)
                || !selling.contains(&l.provider)
            {
                continue;
            }
            let held = reservations.get(&l.id);
            let free = self
                .hosts_on_offer(&l)
                .await?
                .iter()
                .filter(|h| held.is_none_or(|r| !r.held.contains(h)))
                .count() as u32;
            let (minimum, _) = self.terms_of(&l).await?;
            let Ok(price) = surplus_market::quote::on_demand(l.price, minimum) else {
                continue;
            };
            out.push(pool::MarketOffer {
                listing: l.id.clone(),
                price,
                available: free,
            });
        }
        Ok(out)
    }

    /// Reserves one host of `listing` on the owner's behalf (its burst account, on
    /// demand) and puts it in the pool as a burst slot.
    async fn burst_reserve(
        &self,
        p: &StoredPool,
        b: &pool::BurstSettings,
        request: Uuid,
        listing: &str,
        price: u64,
        now: UnixMillis,
    ) -> Result<(), MarketError> {
        let holder = Principal {
            account: b.account.clone(),
            role: Role::Client,
        };
        let made = self
            .reserve(
                &holder,
                ReserveRequest {
                    listing: listing.to_owned(),
                    mode: PricingMode::OnDemand,
                    count: Some(1),
                    quote: None,
                    term_hours: None,
                    client_token: None,
                },
            )
            .await?;
        for v in made {
            let r = &v.reservation;
            // The listing's price may have moved since the offers were read: never
            // above the policy's maximum.
            if r.price > b.max_price {
                self.release(&holder, r.id).await?;
                return Err(refused(
                    "above_maximum_price",
                    format!(
                        "listing {listing} now costs {} a host-hour, above the burst maximum {}",
                        r.price, b.max_price
                    ),
                ));
            }
            // Counted against the budget first: should the slot not join the pool, the
            // next cycle finds the burst outside it and gives it back.
            self.app
                .store
                .put_pool_burst(
                    p.id,
                    &PoolBurst {
                        slot: r.id,
                        request,
                        source: format!("market:{listing}"),
                        price: r.price,
                        started_at_ms: now,
                        ended_at_ms: None,
                    },
                )
                .await?;
            let accounts: BTreeSet<String> = [ledger::client(&b.account)].into();
            let mut row = self.slot_of(r.id, &accounts, p.id, &p.owner).await?;
            row.burst = true;
            self.app.store.add_pool_slot(&row, now).await??;
            tracing::info!(pool = %p.id, reservation = %r.id, %listing, price = r.price, quoted = price, "burst into the market");
        }
        Ok(())
    }

    /// Who may use pooled `host` for `caller` now: the member holding its allocation
    /// (not under notice); for a reservation slot, the reservation as that member
    /// holds it through the pool (its size bounds the member's instances). `None`
    /// when `host` is in no pool.
    pub(super) async fn pool_gate(
        &self,
        caller: &Principal,
        host: Uuid,
        now: UnixMillis,
    ) -> Result<Option<Held>, MarketError> {
        let Some(slot) = self.app.store.pool_slot_on(host, now).await? else {
            return Ok(None);
        };
        let reservation = if slot.facts.kind == "reservation" {
            match self.app.store.holding(host, now).await? {
                Some(r) if r.id == slot.slot => {
                    // Under notice, the host takes no new work.
                    if let Some(n) = self.app.store.interruption(r.id).await? {
                        return Err(MarketError::Forbidden(format!(
                            "host {host} is being taken back from pool {} ({}): its reservation {} ends at {}",
                            slot.pool,
                            surplus_market::records::name_of(&n.cause),
                            r.id,
                            n.deadline_ms
                        )));
                    }
                    Some(r)
                }
                // Its reservation holds the host no more: the pool has it no more.
                _ => return Ok(None),
            }
        } else {
            None
        };
        let allocation = if caller.role == Role::Client {
            self.app
                .store
                .allocation_on(slot.pool, slot.slot, &caller.account, now)
                .await?
        } else {
            None
        };
        match allocation {
            Some(a) if a.noticed => Err(MarketError::Forbidden(format!(
                "host {host} is being taken back from you in pool {}: your allocation ends at {}",
                slot.pool,
                a.until_ms.unwrap_or(now)
            ))),
            Some(_) => Ok(Some(match reservation {
                Some(mut r) => {
                    r.holder = caller.account.clone();
                    Held::Reservation(r)
                }
                None => Held::PoolHost,
            })),
            None => Err(MarketError::Forbidden(format!(
                "host {host} is a slot of pool {}: only the member it is allocated to may use it",
                slot.pool
            ))),
        }
    }
}
