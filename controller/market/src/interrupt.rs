//! Interruptibility, provider reclaim and provider goals (issue 16, C6, C7, A8): what
//! may take capacity away from a client, the notice it gets, which reservations a
//! provider's reclaim takes, and the defaults a provider's goal chooses where it left
//! the choice to the marketplace.
//!
//! Owns: [`may_interrupt`] (whether a cause may interrupt a reservation), [`resolve`]
//! (what "don't care" becomes under a goal), [`notice`] and [`check_stop`] (the grace
//! an interruption gives and when the agent may stop), [`expiry_notice_at`] (when a
//! term's expiry is announced), [`choose_reclaim`] (which reservations a reclaim of
//! N units takes), [`defaults`] and [`price_for`] (what a goal chooses), and
//! [`prefer_third_party`] with [`order_for_load`] (idle third-party capacity first
//! while the primary provider is loaded). Must not: read a clock, keep a timer, send
//! a notice or touch a store. Time is an argument; the shell stores each notice's
//! deadline as a row (a timer is a row), sends the notice through the outbox and to
//! the agent, and the agent stops the instance at the deadline even when the
//! controller is unreachable then.
//!
//! # Rules
//!
//! 1. **What may interrupt** ([`may_interrupt`]). Three causes interrupt a
//!    reservation before its term: [`Cause::Outbid`] (a better bid took the capacity),
//!    [`Cause::PriceAboveMax`] (the spot price passed the client's maximum bid) and
//!    [`Cause::ProviderReclaim`] (the provider takes the capacity back for its own
//!    customers, by `surplus-agent reclaim --count N` or `--instance ID` or through
//!    the API). An explicit interruptibility means the same under every goal; "don't
//!    care" is resolved through the provider's goal *as it was when the reservation
//!    was made* (the shell stores it with the reservation, so a later change of goal
//!    never widens what may interrupt a reservation already sold):
//!
//!    | interruptibility   | goal                             | outbid | price above max | provider reclaim |
//!    |--------------------|----------------------------------|--------|-----------------|------------------|
//!    | `no_interruptions` | any                              | `do_not_interrupt` | `do_not_interrupt` | `do_not_interrupt` |
//!    | `price_based`      | any                              | yes    | yes             | `not_fulfilment_based` |
//!    | `fulfilment_based` | any                              | `not_price_based` | `not_price_based` | yes |
//!    | `dont_care`        | `none`                           | yes    | yes             | `not_fulfilment_based` |
//!    | `dont_care`        | `maximise_revenue`               | yes    | yes             | `not_fulfilment_based` |
//!    | `dont_care`        | `maximise_utilisation`           | `do_not_interrupt` | `do_not_interrupt` | `do_not_interrupt` |
//!    | `dont_care`        | `capacity_back_at_short_notice`  | yes    | yes             | yes              |
//!
//!    Why each "don't care" row: with no goal the market's own mechanisms apply
//!    (prices), and the provider, which never said it needs capacity back, may not
//!    reclaim; maximising revenue sells through spot and auctions, where a better bid
//!    must be able to win, and a reclaim would only lose revenue; maximising
//!    long-term utilisation sells terms, which are worth their lower price only if
//!    they run to their end; a provider that needs capacity back at short notice
//!    sells a cheap pool that every cause interrupts at once (after the notice).
//!    A refusal names the rule, the interruptibility, the goal and the cause.
//! 2. **"Don't care" as a label** ([`resolve`]). An explicit interruptibility is
//!    kept. "Don't care" becomes the explicit label that allows exactly the causes of
//!    its row above (`price_based` under `none` and `maximise_revenue`,
//!    `no_interruptions` under `maximise_utilisation`); under
//!    `capacity_back_at_short_notice` every cause may interrupt, which no explicit
//!    label says, so it stays `dont_care`. Hence `may_interrupt(resolve(i, g), g, c)`
//!    and `may_interrupt(i, g, c)` always agree: labelling a listing with its
//!    defaults never changes what may interrupt it.
//! 3. **Notice and grace** ([`notice`]). Every interruption has a notice, issued at
//!    `now`, whose grace is the longer of the listing's stated grace and the
//!    controller's configured default ([`DEFAULT_GRACE_MS`], 120 s, unless
//!    configured): a listing may lengthen the grace, never shorten it below the
//!    default, and the grace is never shorter than the listing states. A negative
//!    grace (stated or configured) counts as none; the deadline saturates at the end
//!    of time rather than wrapping. [`check_listing_grace`] refuses a negative grace
//!    when a provider states one (`grace`).
//! 4. **The stop** ([`check_stop`]). The instance is stopped at the deadline, not
//!    before: a stop for the interruption before `deadline_ms` is refused
//!    (`before_deadline`, with both times). A holder's own release is no
//!    interruption and is not judged here.
//! 5. **Expiry** ([`expiry_notice_at`]). A term's expiry is announced `lead_ms`
//!    before it ends ([`DEFAULT_EXPIRY_LEAD_MS`], the same 120 s as the grace, so an
//!    expiry never warns less than an interruption would). A term shorter than the
//!    lead is announced when it starts; a negative lead counts as none; a term that
//!    ends before it starts is announced at its end. The instant is always within
//!    `[start, end]` of a well-formed term.
//! 6. **Reclaim** ([`choose_reclaim`]). A provider's reclaim of N units takes, among
//!    the candidates the shell gives (every live reservation on the host for
//!    `--count N` from a host, or on the provider's listings through the API), only
//!    those [`may_interrupt`] allows for [`Cause::ProviderReclaim`] under the goal:
//!    a `no_interruptions` reservation is never taken. They are taken cheapest first
//!    (the provider loses the least revenue), then the most recently started (the
//!    least work is lost), then the lowest reservation id, so the order the
//!    candidates are given in never matters. A reservation named twice is taken at
//!    most once. When fewer than N may be taken, all of them are, and the caller
//!    reports how many it could take. `--instance ID` is one reservation, judged by
//!    [`may_interrupt`] directly.
//! 7. **Goal defaults** ([`defaults`]). Where the provider left the choice to the
//!    marketplace, its goal chooses: the order of its accepted pricing modes
//!    (preferred first; a mode is only ever one the provider accepted, and every
//!    accepted mode is kept, so a goal whose favourite mode was not accepted falls
//!    back to the next in its order), the interruptibility (rule 2) and the price as
//!    basis points of the provider's immediate price:
//!
//!    | goal                            | modes, preferred first                          | price |
//!    |---------------------------------|-------------------------------------------------|-------|
//!    | `none`                          | spot, auction, immediate, on_demand, reserved   | 100 % |
//!    | `maximise_revenue`              | spot, auction, immediate, on_demand, reserved   | 100 % |
//!    | `maximise_utilisation`          | reserved, on_demand, spot, immediate, auction   | 70 %  |
//!    | `capacity_back_at_short_notice` | on_demand, spot, immediate, auction, reserved   | 80 %  |
//!
//!    Revenue: bidding discovers what clients pay, a quote at the provider's own
//!    price comes next, a term (a lower rate) last. Utilisation: long-term terms at a
//!    lower price first, then steady on-demand, then spot to fill idle gaps. Short
//!    notice: a cheap pool released at will, never a term that ties capacity up
//!    unless nothing else was accepted. With no goal the modes keep their usual
//!    order ([`PricingMode`]'s) at the provider's price. The discount is the goal's,
//!    whichever mode comes first.
//! 8. **Price** ([`price_for`]). The price is `base × price_bps / 10 000`, rounded up
//!    to a minor unit, saturating rather than overflowing, and never below the
//!    provider's minimum.
//! 9. **Load** ([`prefer_third_party`], [`order_for_load`]). Search ranks idle
//!    third-party capacity first when the primary provider's own utilisation is
//!    strictly above a threshold ([`DEFAULT_UTILISATION_THRESHOLD`], 0.8, unless
//!    configured); at the threshold, below it, or when either number is not a
//!    number, nothing changes. The reordering is stable: idle listings of providers
//!    other than the primary move to the front in the search's own order, every other
//!    listing keeps its order behind them.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::records::name_of;
use crate::resell::{Goal, Interruptibility, PricingMode};

pub use crate::Refusal;
use crate::refuse;

/// Minor units of a currency per host-hour.
pub type Price = u64;

/// The grace of an interruption unless the controller is configured otherwise: 120 s.
pub const DEFAULT_GRACE_MS: i64 = 120_000;

/// How long before a term ends its expiry is announced unless configured: 120 s.
pub const DEFAULT_EXPIRY_LEAD_MS: i64 = DEFAULT_GRACE_MS;

/// The primary provider's utilisation above which idle third-party capacity ranks
/// first, unless configured: 0.8.
pub const DEFAULT_UTILISATION_THRESHOLD: f64 = 0.8;

/// A whole price in basis points: 100 %.
pub const FULL_PRICE_BPS: u32 = 10_000;

/// What takes capacity away from a client before its term ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A better bid took the capacity.
    Outbid,
    /// The spot price passed the client's maximum bid.
    PriceAboveMax,
    /// The provider takes the capacity back for its own customers.
    ProviderReclaim,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cause::Outbid => "outbid",
            Cause::PriceAboveMax => "price above max",
            Cause::ProviderReclaim => "provider reclaim",
        })
    }
}

impl Cause {
    /// Every cause.
    pub const ALL: [Cause; 3] = [Cause::Outbid, Cause::PriceAboveMax, Cause::ProviderReclaim];

    fn is_price(self) -> bool {
        matches!(self, Cause::Outbid | Cause::PriceAboveMax)
    }
}

/// Which causes may interrupt: the row of rule 1's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Regime {
    Never,
    Price,
    Reclaim,
    Any,
}

fn regime(interruptibility: Interruptibility, goal: Goal) -> Regime {
    match (interruptibility, goal) {
        (Interruptibility::NoInterruptions, _) => Regime::Never,
        (Interruptibility::PriceBased, _) => Regime::Price,
        (Interruptibility::FulfilmentBased, _) => Regime::Reclaim,
        (Interruptibility::DontCare, Goal::None | Goal::MaximiseRevenue) => Regime::Price,
        (Interruptibility::DontCare, Goal::MaximiseUtilisation) => Regime::Never,
        (Interruptibility::DontCare, Goal::CapacityBackAtShortNotice) => Regime::Any,
    }
}

/// Whether `cause` may interrupt a reservation sold as `interruptibility` by a
/// provider whose goal was `goal` when it was made (rule 1); refused with the rule
/// that protects it.
pub fn may_interrupt(
    interruptibility: Interruptibility,
    goal: Goal,
    cause: Cause,
) -> Result<(), Refusal> {
    let r = regime(interruptibility, goal);
    let allowed = match r {
        Regime::Never => false,
        Regime::Price => cause.is_price(),
        Regime::Reclaim => !cause.is_price(),
        Regime::Any => true,
    };
    if allowed {
        return Ok(());
    }
    let what = match interruptibility {
        Interruptibility::DontCare => format!(
            "a {} reservation under the goal {}",
            name_of(&interruptibility),
            name_of(&goal)
        ),
        _ => format!("a {} reservation", name_of(&interruptibility)),
    };
    let cause_name = name_of(&cause);
    Err(match r {
        Regime::Never => refuse(
            "do_not_interrupt",
            format!("{what} is never interrupted before its term ({cause_name})"),
        ),
        _ if cause.is_price() => refuse(
            "not_price_based",
            format!("{what} is not interrupted by prices ({cause_name})"),
        ),
        _ => refuse(
            "not_fulfilment_based",
            format!("{what} is not reclaimed by its provider ({cause_name})"),
        ),
    })
}

/// The label "don't care" stands for under `goal` (rule 2): the explicit
/// interruptibility that allows exactly the same causes, or `DontCare` itself when
/// every cause may interrupt; an explicit interruptibility is returned as it is.
pub fn resolve(interruptibility: Interruptibility, goal: Goal) -> Interruptibility {
    match (interruptibility, regime(interruptibility, goal)) {
        (Interruptibility::DontCare, Regime::Never) => Interruptibility::NoInterruptions,
        (Interruptibility::DontCare, Regime::Price) => Interruptibility::PriceBased,
        (Interruptibility::DontCare, Regime::Reclaim) => Interruptibility::FulfilmentBased,
        (other, _) => other,
    }
}

/// An interruption's notice: to the client (outbox, API, console, webhook) and to
/// the agent, which stops the instance at `deadline_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Notice {
    /// Why the capacity is taken.
    pub cause: Cause,
    /// When the notice was given.
    pub issued_at_ms: UnixMillis,
    /// When the instance is stopped: `issued_at_ms + grace_ms` (saturating).
    pub deadline_ms: UnixMillis,
    /// The grace: never shorter than the listing's stated grace nor the default.
    pub grace_ms: i64,
}

/// The notice of an interruption for `cause` given at `now_ms` (rule 3): its grace is
/// the longer of `listing_grace_ms` (what the listing states, if it states one) and
/// `configured_default_ms` (the controller's default, [`DEFAULT_GRACE_MS`] unless
/// configured); negative values count as none.
pub fn notice(
    now_ms: UnixMillis,
    cause: Cause,
    listing_grace_ms: Option<i64>,
    configured_default_ms: i64,
) -> Notice {
    let grace_ms = listing_grace_ms
        .unwrap_or(0)
        .max(configured_default_ms)
        .max(0);
    Notice {
        cause,
        issued_at_ms: now_ms,
        deadline_ms: now_ms.saturating_add(grace_ms),
        grace_ms,
    }
}

/// A grace a provider states for a listing, checked: not negative (`grace`).
pub fn check_listing_grace(grace_ms: i64) -> Result<i64, Refusal> {
    if grace_ms < 0 {
        return Err(refuse(
            "grace",
            format!("a listing's grace is a length of time, not {grace_ms} ms"),
        ));
    }
    Ok(grace_ms)
}

/// Whether the interrupted instance may be stopped at `now_ms` (rule 4): at or after
/// the notice's deadline, never before (`before_deadline`).
pub fn check_stop(notice: &Notice, now_ms: UnixMillis) -> Result<(), Refusal> {
    if now_ms < notice.deadline_ms {
        return Err(refuse(
            "before_deadline",
            format!(
                "the notice given at {} holds until {}; a stop at {now_ms} would cut its grace",
                notice.issued_at_ms, notice.deadline_ms
            ),
        ));
    }
    Ok(())
}

/// When the expiry of a term from `started_at_ms` to `ends_at_ms` is announced, with
/// a lead of `lead_ms` ([`DEFAULT_EXPIRY_LEAD_MS`] unless configured) (rule 5):
/// `ends_at_ms - lead_ms`, but not before the term starts nor after it ends.
pub fn expiry_notice_at(
    started_at_ms: UnixMillis,
    ends_at_ms: UnixMillis,
    lead_ms: i64,
) -> UnixMillis {
    ends_at_ms
        .saturating_sub(lead_ms.max(0))
        .max(started_at_ms)
        .min(ends_at_ms)
}

/// A reservation a provider's reclaim may take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Candidate {
    /// The reservation (the last tie-break: the lower id is taken first).
    pub reservation: Uuid,
    /// The host it runs on (the agent that stops its instances).
    pub host: Uuid,
    /// How it was sold.
    pub interruptibility: Interruptibility,
    /// What it pays per host-hour (the cheapest is taken first).
    pub price: Price,
    /// When it started (the first tie-break: the most recent is taken first).
    pub started_at_ms: UnixMillis,
    /// The provider's goal recorded with it, by which "don't care" is judged (as the
    /// book judges it); none: the reclaim's.
    #[serde(default)]
    pub goal: Option<Goal>,
}

/// The reservations a provider's reclaim of `count` units takes from `candidates`
/// under `goal` (rule 6), in the order taken: only those [`may_interrupt`] allows
/// for [`Cause::ProviderReclaim`], cheapest first, then the most recently started,
/// then the lowest id; fewer than `count` when fewer may be taken.
pub fn choose_reclaim(candidates: &[Candidate], count: usize, goal: Goal) -> Vec<Uuid> {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| {
            may_interrupt(
                c.interruptibility,
                c.goal.unwrap_or(goal),
                Cause::ProviderReclaim,
            )
            .is_ok()
        })
        .collect();
    eligible.sort_by(|a, b| {
        a.price
            .cmp(&b.price)
            .then_with(|| b.started_at_ms.cmp(&a.started_at_ms))
            .then_with(|| a.reservation.cmp(&b.reservation))
    });
    let mut seen = HashSet::new();
    eligible
        .into_iter()
        .map(|c| c.reservation)
        .filter(|r| seen.insert(*r))
        .take(count)
        .collect()
}

/// What a provider's goal chooses where the provider left the choice to the
/// marketplace (rule 7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Defaults {
    /// The accepted pricing modes, preferred first (every accepted one, no other).
    pub modes: Vec<PricingMode>,
    /// The interruptibility a listing shows: the provider's, "don't care" resolved
    /// through the goal by [`resolve`].
    pub interruptibility: Interruptibility,
    /// The listed price as basis points of the provider's immediate (on-demand)
    /// price: 10 000 is the same price, 7 000 a term's hourly at 70 %.
    pub price_bps: u32,
}

/// The modes in the order `goal` prefers them, best first (rule 7's table).
pub fn preference(goal: Goal) -> [PricingMode; 5] {
    use PricingMode::{Auction, Immediate, OnDemand, Reserved, Spot};
    match goal {
        Goal::None | Goal::MaximiseRevenue => [Spot, Auction, Immediate, OnDemand, Reserved],
        Goal::MaximiseUtilisation => [Reserved, OnDemand, Spot, Immediate, Auction],
        Goal::CapacityBackAtShortNotice => [OnDemand, Spot, Immediate, Auction, Reserved],
    }
}

/// The price `goal` lists at, as basis points of the provider's immediate price
/// (rule 7's table).
pub fn goal_price_bps(goal: Goal) -> u32 {
    match goal {
        Goal::None | Goal::MaximiseRevenue => FULL_PRICE_BPS,
        Goal::MaximiseUtilisation => 7_000,
        Goal::CapacityBackAtShortNotice => 8_000,
    }
}

/// The defaults `goal` chooses for a provider that accepts `accepted_modes` and
/// states `interruptibility` (rule 7): the accepted modes in the goal's order, the
/// interruptibility with "don't care" resolved, the goal's price.
pub fn defaults(
    goal: Goal,
    accepted_modes: &BTreeSet<PricingMode>,
    interruptibility: Interruptibility,
) -> Defaults {
    Defaults {
        modes: preference(goal)
            .into_iter()
            .filter(|m| accepted_modes.contains(m))
            .collect(),
        interruptibility: resolve(interruptibility, goal),
        price_bps: goal_price_bps(goal),
    }
}

/// The price `defaults` lists at for a provider whose immediate price is `base` and
/// whose minimum is `minimum` (rule 8): `base × price_bps / 10 000` rounded up,
/// never below `minimum`.
pub fn price_for(defaults: &Defaults, base: Price, minimum: Price) -> Price {
    let scaled =
        (u128::from(base) * u128::from(defaults.price_bps)).div_ceil(u128::from(FULL_PRICE_BPS));
    u64::try_from(scaled).unwrap_or(u64::MAX).max(minimum)
}

/// Whether search should rank idle third-party capacity first (rule 9): the primary
/// provider's utilisation is strictly above `threshold`
/// ([`DEFAULT_UTILISATION_THRESHOLD`] unless configured); never when either is not a
/// number.
pub fn prefer_third_party(primary_utilisation: f64, threshold: f64) -> bool {
    primary_utilisation > threshold
}

/// The sort key of one listing under rule 9: 0 for idle capacity of a provider other
/// than `primary` when `prefer`, 1 for everything else. Sorting stably by it puts
/// idle third-party listings first and keeps the search's order within each group.
pub fn load_key(provider: &str, idle: bool, primary: &str, prefer: bool) -> u8 {
    if prefer && idle && provider != primary {
        0
    } else {
        1
    }
}

/// Reorders search results `items` for the primary provider's load (rule 9): when
/// `prefer`, idle third-party listings move to the front, each group keeping its
/// order; otherwise nothing moves. `provider_and_idle` tells an item's provider and
/// whether it is idle, e.g. `|l| (l.provider.as_str(), l.available > 0)` over
/// [`crate::listings::search`]'s results.
pub fn order_for_load<T>(
    items: &mut [T],
    primary: &str,
    prefer: bool,
    provider_and_idle: impl Fn(&T) -> (&str, bool),
) {
    if !prefer {
        return;
    }
    items.sort_by_key(|item| {
        let (provider, idle) = provider_and_idle(item);
        load_key(provider, idle, primary, prefer)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use Cause::{Outbid, PriceAboveMax, ProviderReclaim};
    use Interruptibility::{DontCare, FulfilmentBased, NoInterruptions, PriceBased};
    use PricingMode::{Auction, Immediate, OnDemand, Reserved, Spot};
    use proptest::prelude::*;

    const GOALS: [Goal; 4] = [
        Goal::None,
        Goal::MaximiseRevenue,
        Goal::MaximiseUtilisation,
        Goal::CapacityBackAtShortNotice,
    ];
    const LABELS: [Interruptibility; 4] = [DontCare, PriceBased, FulfilmentBased, NoInterruptions];

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Each case: (rule it pins, interruptibility, the goals it holds under, outcome
    /// for outbid, price above max, provider reclaim). Together: all 48 cells.
    #[test]
    fn every_cell_of_the_interruption_table() {
        type Out = Result<(), &'static str>;
        type Case = (&'static str, Interruptibility, Vec<Goal>, [Out; 3]);
        let never = Err("do_not_interrupt");
        let cases: Vec<Case> = vec![
            (
                "do-not-interrupt: never, whatever the cause or goal",
                NoInterruptions,
                GOALS.to_vec(),
                [never, never, never],
            ),
            (
                "price-based: prices interrupt, the provider does not",
                PriceBased,
                GOALS.to_vec(),
                [Ok(()), Ok(()), Err("not_fulfilment_based")],
            ),
            (
                "fulfilment-based: the provider reclaims, prices do not",
                FulfilmentBased,
                GOALS.to_vec(),
                [Err("not_price_based"), Err("not_price_based"), Ok(())],
            ),
            (
                "don't care with no goal: the market's prices",
                DontCare,
                vec![Goal::None],
                [Ok(()), Ok(()), Err("not_fulfilment_based")],
            ),
            (
                "don't care to maximise revenue: prices",
                DontCare,
                vec![Goal::MaximiseRevenue],
                [Ok(()), Ok(()), Err("not_fulfilment_based")],
            ),
            (
                "don't care to maximise utilisation: terms run to their end",
                DontCare,
                vec![Goal::MaximiseUtilisation],
                [never, never, never],
            ),
            (
                "don't care with capacity back at short notice: every cause",
                DontCare,
                vec![Goal::CapacityBackAtShortNotice],
                [Ok(()), Ok(()), Ok(())],
            ),
        ];
        let mut cells = 0;
        for (rule, label, goals, outcomes) in cases {
            for goal in goals {
                for (cause, want) in Cause::ALL.into_iter().zip(outcomes) {
                    let got = may_interrupt(label, goal, cause).map_err(|r| r.rule);
                    assert_eq!(got, want, "{rule}: {goal:?}, {cause:?}");
                    cells += 1;
                }
            }
        }
        assert_eq!(cells, 48, "every cell is pinned");

        let r = may_interrupt(DontCare, Goal::MaximiseUtilisation, Outbid).unwrap_err();
        assert!(
            r.message.contains("dont_care")
                && r.message.contains("maximise_utilisation")
                && r.message.contains("outbid"),
            "names the label, the goal and the cause: {r}"
        );
        let r = may_interrupt(PriceBased, Goal::None, ProviderReclaim).unwrap_err();
        assert!(r.to_string().contains("price_based"), "{r}");
    }

    /// Each case: (rule it pins, interruptibility, goal, label).
    #[test]
    fn dont_care_resolves_to_the_label_with_the_same_causes() {
        let cases = [
            (
                "explicit labels are kept",
                PriceBased,
                Goal::MaximiseUtilisation,
                PriceBased,
            ),
            (
                "explicit labels are kept",
                NoInterruptions,
                Goal::CapacityBackAtShortNotice,
                NoInterruptions,
            ),
            (
                "explicit labels are kept",
                FulfilmentBased,
                Goal::None,
                FulfilmentBased,
            ),
            ("no goal: price-based", DontCare, Goal::None, PriceBased),
            (
                "revenue: price-based",
                DontCare,
                Goal::MaximiseRevenue,
                PriceBased,
            ),
            (
                "utilisation: do-not-interrupt",
                DontCare,
                Goal::MaximiseUtilisation,
                NoInterruptions,
            ),
            (
                "short notice: every cause, stays",
                DontCare,
                Goal::CapacityBackAtShortNotice,
                DontCare,
            ),
        ];
        for (rule, label, goal, want) in cases {
            assert_eq!(resolve(label, goal), want, "{rule}");
        }
        // The label never changes what may interrupt.
        for label in LABELS {
            for goal in GOALS {
                for cause in Cause::ALL {
                    assert_eq!(
                        may_interrupt(resolve(label, goal), goal, cause).is_ok(),
                        may_interrupt(label, goal, cause).is_ok(),
                        "{label:?} under {goal:?}, {cause:?}"
                    );
                }
            }
        }
    }

    /// Each case: (rule it pins, now, listing's grace, configured default, grace,
    /// deadline).
    #[test]
    fn the_grace_is_the_longer_of_the_listing_and_the_default() {
        type Case = (&'static str, i64, Option<i64>, i64, i64, i64);
        let cases: [Case; 7] = [
            (
                "no stated grace: the default",
                1_000,
                None,
                DEFAULT_GRACE_MS,
                120_000,
                121_000,
            ),
            (
                "a longer stated grace is kept",
                1_000,
                Some(300_000),
                120_000,
                300_000,
                301_000,
            ),
            (
                "a shorter stated grace: the default",
                1_000,
                Some(30_000),
                120_000,
                120_000,
                121_000,
            ),
            (
                "a shorter configured default: the listing's",
                0,
                Some(60_000),
                10_000,
                60_000,
                60_000,
            ),
            ("a zero default and no stated grace: none", 5, None, 0, 0, 5),
            ("negative values count as none", 5, Some(-10), -20, 0, 5),
            (
                "the deadline saturates",
                i64::MAX - 1,
                None,
                120_000,
                120_000,
                i64::MAX,
            ),
        ];
        for (rule, now, listing, default, grace, deadline) in cases {
            let n = notice(now, Outbid, listing, default);
            assert_eq!((n.grace_ms, n.deadline_ms), (grace, deadline), "{rule}");
            assert_eq!((n.issued_at_ms, n.cause), (now, Outbid), "{rule}");
        }
    }

    /// Each case: (rule it pins, stop at, outcome) for a notice at 1 000 with 120 s.
    #[test]
    fn the_instance_stops_at_the_deadline_not_before() {
        let n = notice(1_000, ProviderReclaim, None, DEFAULT_GRACE_MS);
        let cases = [
            ("at once: refused", 1_000, Err("before_deadline")),
            (
                "a millisecond early: refused",
                120_999,
                Err("before_deadline"),
            ),
            ("at the deadline", 121_000, Ok(())),
            (
                "after the deadline (the controller was away)",
                500_000,
                Ok(()),
            ),
        ];
        for (rule, at, want) in cases {
            assert_eq!(check_stop(&n, at).map_err(|r| r.rule), want, "{rule}");
        }
        let r = check_stop(&n, 1_000).unwrap_err();
        assert!(r.message.contains("121000"), "names the deadline: {r}");
        assert_eq!(check_listing_grace(300_000), Ok(300_000));
        assert_eq!(check_listing_grace(0), Ok(0));
        assert_eq!(check_listing_grace(-1).unwrap_err().rule, "grace");
    }

    /// Each case: (rule it pins, start, end, lead, announced at).
    #[test]
    fn an_expiry_is_announced_its_lead_before_the_end() {
        let h = 3_600_000;
        let cases = [
            (
                "the lead before the end",
                0,
                24 * h,
                DEFAULT_EXPIRY_LEAD_MS,
                24 * h - 120_000,
            ),
            (
                "a term exactly the lead long: at its start",
                0,
                120_000,
                120_000,
                0,
            ),
            (
                "a term shorter than the lead: at its start",
                1_000,
                61_000,
                120_000,
                1_000,
            ),
            ("no lead: at the end", 0, h, 0, h),
            ("a negative lead counts as none", 0, h, -5, h),
            (
                "a term ending before it starts: at its end",
                10_000,
                5_000,
                1_000,
                5_000,
            ),
            (
                "saturates at the start of time",
                i64::MIN,
                i64::MIN + 10,
                120_000,
                i64::MIN,
            ),
        ];
        for (rule, start, end, lead, want) in cases {
            assert_eq!(expiry_notice_at(start, end, lead), want, "{rule}");
        }
    }

    fn candidate(n: u128, label: Interruptibility, price: Price, started: i64) -> Candidate {
        Candidate {
            reservation: id(n),
            host: id(1_000),
            interruptibility: label,
            price,
            started_at_ms: started,
            goal: None,
        }
    }

    /// Each case: (rule it pins, candidates, count, goal, reservations taken in order).
    #[test]
    fn a_reclaim_takes_the_cheapest_interruptible_reservations() {
        type Case = (&'static str, Vec<Candidate>, usize, Goal, Vec<u128>);
        let cases: Vec<Case> = vec![
            (
                "never a do-not-interrupt reservation, even the cheapest",
                vec![
                    candidate(1, NoInterruptions, 5, 0),
                    candidate(2, FulfilmentBased, 50, 0),
                ],
                2,
                Goal::None,
                vec![2],
            ),
            (
                "never a price-based reservation",
                vec![
                    candidate(1, PriceBased, 5, 0),
                    candidate(2, FulfilmentBased, 50, 0),
                ],
                2,
                Goal::CapacityBackAtShortNotice,
                vec![2],
            ),
            (
                "\"don't care\" by the goal recorded with it, not the reclaim's",
                vec![
                    Candidate {
                        goal: Some(Goal::MaximiseUtilisation),
                        ..candidate(1, DontCare, 5, 0)
                    },
                    candidate(2, DontCare, 50, 0),
                ],
                2,
                Goal::CapacityBackAtShortNotice,
                vec![2],
            ),
            (
                "cheapest first",
                vec![
                    candidate(1, FulfilmentBased, 30, 0),
                    candidate(2, FulfilmentBased, 10, 0),
                    candidate(3, FulfilmentBased, 20, 0),
                ],
                2,
                Goal::None,
                vec![2, 3],
            ),
            (
                "at one price, the most recently started first",
                vec![
                    candidate(1, FulfilmentBased, 10, 100),
                    candidate(2, FulfilmentBased, 10, 300),
                    candidate(3, FulfilmentBased, 10, 200),
                ],
                3,
                Goal::None,
                vec![2, 3, 1],
            ),
            (
                "at one price and start, the lowest id first",
                vec![
                    candidate(9, FulfilmentBased, 10, 100),
                    candidate(4, FulfilmentBased, 10, 100),
                ],
                1,
                Goal::None,
                vec![4],
            ),
            (
                "don't care is taken only under the short-notice goal",
                vec![
                    candidate(1, DontCare, 10, 0),
                    candidate(2, FulfilmentBased, 20, 0),
                ],
                2,
                Goal::CapacityBackAtShortNotice,
                vec![1, 2],
            ),
            (
                "don't care is not taken under the revenue goal",
                vec![
                    candidate(1, DontCare, 10, 0),
                    candidate(2, FulfilmentBased, 20, 0),
                ],
                2,
                Goal::MaximiseRevenue,
                vec![2],
            ),
            (
                "fewer than asked when fewer may be taken",
                vec![
                    candidate(1, FulfilmentBased, 10, 0),
                    candidate(2, NoInterruptions, 10, 0),
                ],
                5,
                Goal::None,
                vec![1],
            ),
            (
                "a reservation named twice is taken once",
                vec![
                    candidate(1, FulfilmentBased, 10, 0),
                    candidate(1, FulfilmentBased, 10, 0),
                    candidate(2, FulfilmentBased, 20, 0),
                ],
                2,
                Goal::None,
                vec![1, 2],
            ),
            (
                "nothing asked: nothing taken",
                vec![candidate(1, FulfilmentBased, 10, 0)],
                0,
                Goal::None,
                vec![],
            ),
            (
                "no candidates: nothing taken",
                vec![],
                3,
                Goal::None,
                vec![],
            ),
        ];
        for (rule, candidates, count, goal, want) in cases {
            let want: Vec<Uuid> = want.into_iter().map(id).collect();
            assert_eq!(choose_reclaim(&candidates, count, goal), want, "{rule}");
            let mut reversed = candidates.clone();
            reversed.reverse();
            assert_eq!(
                choose_reclaim(&reversed, count, goal),
                want,
                "{rule}: any order"
            );
        }
    }

    /// Each case: (rule it pins, goal, accepted modes, interruptibility, modes,
    /// interruptibility chosen, price bps).
    #[test]
    fn a_goal_chooses_the_defaults_among_what_the_provider_accepted() {
        type Case = (
            &'static str,
            Goal,
            Vec<PricingMode>,
            Interruptibility,
            Vec<PricingMode>,
            Interruptibility,
            u32,
        );
        let all = vec![Spot, Auction, Immediate, OnDemand, Reserved];
        let cases: Vec<Case> = vec![
            (
                "revenue: spot and auctions first, full price",
                Goal::MaximiseRevenue,
                all.clone(),
                DontCare,
                vec![Spot, Auction, Immediate, OnDemand, Reserved],
                PriceBased,
                10_000,
            ),
            (
                "revenue without spot: auctions first",
                Goal::MaximiseRevenue,
                vec![OnDemand, Auction, Reserved],
                DontCare,
                vec![Auction, OnDemand, Reserved],
                PriceBased,
                10_000,
            ),
            (
                "revenue with neither spot nor auctions: the quote",
                Goal::MaximiseRevenue,
                vec![Reserved, Immediate],
                PriceBased,
                vec![Immediate, Reserved],
                PriceBased,
                10_000,
            ),
            (
                "utilisation: terms first at 70 %, not interrupted",
                Goal::MaximiseUtilisation,
                all.clone(),
                DontCare,
                vec![Reserved, OnDemand, Spot, Immediate, Auction],
                NoInterruptions,
                7_000,
            ),
            (
                "utilisation without terms: on-demand first",
                Goal::MaximiseUtilisation,
                vec![Spot, OnDemand],
                DontCare,
                vec![OnDemand, Spot],
                NoInterruptions,
                7_000,
            ),
            (
                "utilisation keeps an explicit interruptibility",
                Goal::MaximiseUtilisation,
                vec![Reserved],
                FulfilmentBased,
                vec![Reserved],
                FulfilmentBased,
                7_000,
            ),
            (
                "short notice: a cheap pool, interruptible by every cause",
                Goal::CapacityBackAtShortNotice,
                all.clone(),
                DontCare,
                vec![OnDemand, Spot, Immediate, Auction, Reserved],
                DontCare,
                8_000,
            ),
            (
                "short notice with only terms: a term, still",
                Goal::CapacityBackAtShortNotice,
                vec![Reserved],
                DontCare,
                vec![Reserved],
                DontCare,
                8_000,
            ),
            (
                "short notice keeps an explicit do-not-interrupt",
                Goal::CapacityBackAtShortNotice,
                vec![OnDemand],
                NoInterruptions,
                vec![OnDemand],
                NoInterruptions,
                8_000,
            ),
            (
                "no goal: the usual order, the provider's price, prices interrupt",
                Goal::None,
                vec![Reserved, OnDemand, Spot],
                DontCare,
                vec![Spot, OnDemand, Reserved],
                PriceBased,
                10_000,
            ),
            (
                "nothing accepted: no modes",
                Goal::MaximiseRevenue,
                vec![],
                PriceBased,
                vec![],
                PriceBased,
                10_000,
            ),
        ];
        for (rule, goal, accepted, label, modes, chosen, bps) in cases {
            let accepted: BTreeSet<PricingMode> = accepted.into_iter().collect();
            let d = defaults(goal, &accepted, label);
            assert_eq!(
                d,
                Defaults {
                    modes,
                    interruptibility: chosen,
                    price_bps: bps
                },
                "{rule}"
            );
        }
    }

    /// Each case: (rule it pins, price bps, base, minimum, price).
    #[test]
    fn a_price_is_the_goals_share_of_the_base_never_below_the_minimum() {
        let cases = [
            ("full price", 10_000, 35, 20, 35),
            ("a term at 70 %", 7_000, 100, 20, 70),
            ("a pool at 80 %, rounded up", 8_000, 33, 1, 27),
            ("never below the minimum", 7_000, 35, 30, 30),
            ("at the minimum exactly", 8_000, 50, 40, 40),
            ("no base: the minimum", 7_000, 0, 20, 20),
            (
                "saturates rather than overflows",
                20_000,
                u64::MAX,
                0,
                u64::MAX,
            ),
        ];
        for (rule, bps, base, minimum, want) in cases {
            let d = Defaults {
                modes: vec![],
                interruptibility: PriceBased,
                price_bps: bps,
            };
            assert_eq!(price_for(&d, base, minimum), want, "{rule}");
        }
    }

    /// Each case: (rule it pins, primary utilisation, threshold, prefer).
    #[test]
    fn third_party_capacity_is_preferred_only_above_the_threshold() {
        let t = DEFAULT_UTILISATION_THRESHOLD;
        let cases = [
            ("below the threshold", 0.5, t, false),
            ("at the threshold: not above", 0.8, t, false),
            ("just above", 0.800_001, t, true),
            ("fully used", 1.0, t, true),
            ("not a number: nothing changes", f64::NAN, t, false),
            (
                "a threshold that is not a number: nothing changes",
                0.99,
                f64::NAN,
                false,
            ),
            ("a zero threshold: any use at all", 0.01, 0.0, true),
        ];
        for (rule, u, threshold, want) in cases {
            assert_eq!(prefer_third_party(u, threshold), want, "{rule}");
        }
    }

    /// Each case: (rule it pins, prefer, listings as (name, provider, idle) in search
    /// order, names in the new order).
    #[test]
    fn idle_third_party_listings_go_first_when_the_primary_is_loaded() {
        type Case = (
            &'static str,
            bool,
            Vec<(&'static str, &'static str, bool)>,
            Vec<&'static str>,
        );
        let found = vec![
            ("p1", "primary", true),
            ("a-busy", "alice", false),
            ("a-idle", "alice", true),
            ("p2", "primary", false),
            ("b-idle", "bob", true),
        ];
        let cases: Vec<Case> = vec![
            (
                "loaded: idle third-party first, each group in the search's order",
                true,
                found.clone(),
                vec!["a-idle", "b-idle", "p1", "a-busy", "p2"],
            ),
            (
                "not loaded: the search's order",
                false,
                found.clone(),
                vec!["p1", "a-busy", "a-idle", "p2", "b-idle"],
            ),
            (
                "the primary's idle capacity is not third-party",
                true,
                vec![("p1", "primary", true), ("p2", "primary", true)],
                vec!["p1", "p2"],
            ),
        ];
        for (rule, prefer, mut items, want) in cases {
            order_for_load(&mut items, "primary", prefer, |l| (l.1, l.2));
            let got: Vec<&str> = items.iter().map(|l| l.0).collect();
            assert_eq!(got, want, "{rule}");
        }
        assert_eq!(load_key("alice", true, "primary", true), 0);
        assert_eq!(load_key("alice", true, "primary", false), 1);
        assert_eq!(load_key("alice", false, "primary", true), 1);
        assert_eq!(load_key("primary", true, "primary", true), 1);
    }

    fn label() -> impl Strategy<Value = Interruptibility> {
        proptest::sample::select(LABELS.to_vec())
    }

    fn goal() -> impl Strategy<Value = Goal> {
        proptest::sample::select(GOALS.to_vec())
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        proptest::collection::vec(
            (0u128..20, label(), 0u64..50, 0i64..1_000)
                .prop_map(|(n, l, p, s)| candidate(n, l, p, s)),
            0..30,
        )
    }

    proptest! {
        /// A do-not-interrupt reservation is never taken; nothing is taken twice; the
        /// reclaim takes as many as asked, or every one it may.
        #[test]
        fn a_reclaim_never_takes_a_do_not_interrupt_reservation(
            cs in candidates(),
            count in 0usize..40,
            g in goal(),
        ) {
            let taken = choose_reclaim(&cs, count, g);
            let mut seen = HashSet::new();
            for r in &taken {
                prop_assert!(seen.insert(*r), "{r} taken twice");
                prop_assert!(cs.iter().any(|c| c.reservation == *r
                    && c.interruptibility != NoInterruptions
                    && may_interrupt(c.interruptibility, g, ProviderReclaim).is_ok()));
            }
            let may: HashSet<Uuid> = cs
                .iter()
                .filter(|c| may_interrupt(c.interruptibility, g, ProviderReclaim).is_ok())
                .map(|c| c.reservation)
                .collect();
            prop_assert_eq!(taken.len(), count.min(may.len()));
        }

        /// The grace is never shorter than the listing states nor the default, and
        /// the deadline never comes before the notice.
        #[test]
        fn the_grace_is_never_shorter_than_promised(
            now in -1_000_000_000_000i64..1_000_000_000_000,
            listing in proptest::option::of(-1_000_000i64..10_000_000),
            default in -1_000_000i64..10_000_000,
        ) {
            let n = notice(now, PriceAboveMax, listing, default);
            prop_assert!(n.grace_ms >= listing.unwrap_or(0));
            prop_assert!(n.grace_ms >= default);
            prop_assert!(n.grace_ms >= 0);
            prop_assert_eq!(n.deadline_ms, now + n.grace_ms);
            prop_assert!(check_stop(&n, n.deadline_ms).is_ok());
        }

        /// A goal's price is never below the provider's minimum.
        #[test]
        fn a_price_is_never_below_the_minimum(
            base in any::<u64>(),
            minimum in any::<u64>(),
            bps in 0u32..30_000,
        ) {
            let d = Defaults { modes: vec![], interruptibility: PriceBased, price_bps: bps };
            prop_assert!(price_for(&d, base, minimum) >= minimum);
        }

        /// An expiry notice falls within its term.
        #[test]
        fn an_expiry_is_announced_within_its_term(
            start in -1_000_000_000i64..1_000_000_000,
            length in 0i64..1_000_000_000,
            lead in -1_000_000i64..1_000_000_000,
        ) {
            let at = expiry_notice_at(start, start + length, lead);
            prop_assert!(start <= at && at <= start + length);
            prop_assert!(at >= start + length - lead.max(0));
        }
    }
}
