//! Brokerage of unused subscriptions (issue 18; source 003, FIG. 4 and \[0053\]-\[0063\]),
//! first part: how far a set of users consumed over and under their subscriptions'
//! short-term limits, netted across users and host clouds ([`margins`]); what the netted
//! over-consumption costs, as billing records for the users' administrator
//! ([`billing_records`], [`overage_posting`]); what a user under its limits can be
//! expected to contribute ([`estimate`]); and how an accepting cloud's payment for a
//! bundle is split between the contributors ([`settle`], [`settlement_posting`]).
//!
//! Owns these rules; must not read a clock, make an id, or touch a store or the ledger:
//! time, subscriptions and usage are arguments, postings are returned for the shell to
//! apply. Arranging contributions into staggered intervals is [`crate::stagger`]'s work;
//! this module hands it [`Availability`] entries. Amounts of money are integer minor
//! units (cents), as the ledger keeps them; arithmetic is exact in 128 bits, and a total
//! that does not fit the ledger's `i64` is refused (`overflow`), never wrapped.
//!
//! # Subscriptions ([`check_subscription`])
//!
//! A [`Subscription`] gives one user a short-term consumption limit of one resource per
//! period, and an overage rate per unit over the limit per period (source 003's "$0.50
//! per OS instance"). Refused, the rule naming the field:
//!
//! - `user`: 1 to 64 of `[A-Za-z0-9_.-]` (a user may be credited as a contributor, so
//!   its name must make a ledger account);
//! - `resource`: `os_instances`, `cpu_cores`, `memory_gb`, or `app.` followed by 1 to
//!   64 of `[A-Za-z0-9_-]` (a named application, as the agent's subscription meters
//!   name it: `app.postgres`); the exchange's rule, [`crate::exchange::is_resource`];
//! - `period`: 1, 5, 10, 15 or 30 minutes, 1, 8, 12 or 24 hours ([`PERIODS_MS`]);
//! - `limit`: at most [`MAX_UNITS`];
//! - `overage_rate`: 0 to [`MAX_RATE`] minor units per unit over the limit per period.
//!
//! # Usage ([`check_usage`])
//!
//! A [`UsageRow`] is what one host cloud reports of one user's use of one resource in
//! one period: `used` is the units that cloud counts for the user in the period. The
//! exchange between controllers makes it the **time-weighted average** of concurrent
//! units over the period, rounded up ([`crate::exchange::used_in_period`]); this module
//! takes the figure as given. Refused: `cloud` and `user` named as above, `resource` as
//! above, `used` above [`MAX_UNITS`].
//!
//! # Margins ([`margins`], FIG. 4)
//!
//! 1. **The set.** Refused when a user has two subscriptions for one resource
//!    (`duplicate_subscription`: its usage could not be told apart), or when the
//!    subscriptions of one resource and period length have different overage rates
//!    (`mixed_rates`: their netted over-consumption has one price, rule 6).
//! 2. **The window** `[from, until)` is not empty, at most [`MAX_WINDOW_MS`] (31 days),
//!    and both its ends lie on the grid of every subscription's period (multiples of
//!    the period's length from the Unix epoch), so that every period in it is whole;
//!    refused `window` otherwise. A subscription's columns are the periods of its length
//!    in the window, in time order.
//! 3. **Rows.** Every row is checked, those outside the window too: two rows of one
//!    cloud, user, resource and period start are refused (`duplicate_usage`; the shell
//!    deduplicates what it both pulled and was pushed), and so is a row of a subscribed
//!    user and resource that does not start on that subscription's grid (`misaligned`).
//!    Rows outside the window are then ignored. Rows in the window of a user and
//!    resource without a subscription count nowhere; they are listed in
//!    [`MarginTable::unsubscribed`] for the shell to flag, never dropped silently.
//! 4. **A user's usage** in a period is the sum over clouds of what they reported: a
//!    subscription's limit spans every cloud its user uses (averages add, so the sum is
//!    the user's average use across clouds, up to each cloud's rounding up). The
//!    per-cloud figures are kept as the cell's breakdown. A period without a row is a
//!    use of zero: the whole limit is under-consumed.
//! 5. **Margin** = usage − limit: positive over the limit, negative under it, zero at
//!    it.
//! 6. **Netting.** Each resource and period length has its own [`ResourceTable`]; in
//!    each of its periods the **net margin** is the sum of all its users' margins, so
//!    that under-limit consumption offsets over-limit consumption across users and
//!    clouds (\[0059\]). It equals the period's total usage minus the sum of the limits.
//!    Different resources, and one resource's different period lengths, are never
//!    netted together (their periods do not line up one to one; combining them is the
//!    staggering's work). The **offset cost** of a period is max(0, net margin) × the
//!    table's overage rate (\[0061\]: 20 instances over at 50 cents is 1000 cents): a net
//!    under-consumption costs nothing and earns no credit.
//! 7. **Totals over the window.** The **marginal total** is the sum of the net margins
//!    (\[0060\]); the **aggregate offset cost** the sum of the offset costs (\[0061\]);
//!    `net_over` the sum of max(0, net margin), the unit-periods charged.
//! 8. **Excess capacity** of a period (\[0054\]) is the sum of the under-consumption of
//!    the users under their limit (−margin of each user whose margin is negative), in
//!    units, as a positive number; users over their limit do not reduce it.
//! 9. **Per user**, its marginal total, and its own overage: the unit-periods it was
//!    over its limit (the sum of max(0, margin)) and what they would cost at the rate
//!    without netting.
//!
//! Tables are in order of resource then period length, users in order of name,
//! unsubscribed rows in order of user, resource, period start and cloud.
//!
//! # Billing records ([`billing_records`], \[0061\])
//!
//! One record per table, addressed to the users' administrator. Its `amount` is the
//! aggregate offset cost, and it is what the set of users is charged: netting is the
//! point of source 003, a user under its limit pays for one over it. Each user's own
//! overage is carried as an informational breakdown; their sum is never below the
//! amount charged (the difference is what netting saved). A record is made even when
//! its amount is zero. [`overage_posting`] turns a record into a posting the way
//! [`crate::billing::bill_posting`] does for usage: the administrator's client account
//! pays, the provider of the subscriptions gets it less the marketplace's commission;
//! nothing for a zero amount.
//!
//! # Estimated contributions ([`estimate`], \[0063\])
//!
//! From one user's margins of one resource over a look-back window (one per period,
//! e.g. 48 hourly margins for the last two days, [`MarginTable::margins_of`]):
//!
//! 1. The under-consumption of a period is max(0, −margin): a period over the limit
//!    counts as none (an over-consumption does not take back what other periods left
//!    unused, and a user is never estimated below zero).
//! 2. The amount is the share of the average under-consumption, rounded down once:
//!    ⌊Σ under × share_bps / (periods × 10 000)⌋ units, so an estimate never promises a
//!    part of a unit. (20 under in every hour of two days at 50% is 10.)
//! 3. It is offered in the coming window `[from, until)` during the user's
//!    availability windows: each is clipped to the coming window and shrunk inward to
//!    the increment's grid (multiples of `increment_ms` from the epoch: a contribution
//!    starts and stops on an increment), windows that overlap or touch are merged, and
//!    empty ones dropped. Each gives one [`Availability`] entry (contributor, resource,
//!    amount, from, until, increment) for the staggering. No entry when the amount is
//!    zero.
//!
//! Refused: `user` and `resource` as for subscriptions; `history` without a margin;
//! `share` above 10 000 basis points; `window` when the coming window is empty;
//! `increment` unless 1 ms to 24 h; `availability` for an empty or backwards window.
//!
//! # Settlement ([`settle`])
//!
//! An accepting cloud's payment for a bundle: the marketplace keeps its commission
//! ([`crate::billing::commission`], half up), and the rest is split between the
//! contributors in proportion to what each actually provided (unit-milliseconds). Each
//! gets the whole minor units of its exact share; the units left over (fewer than the
//! contributors) go one each to the largest remainders, a tie to the name first in
//! order. The shares sum exactly to payment − commission; a contributor that provided
//! nothing gets nothing (it stays in the list, with 0). Shares are in order of name.
//! Refused: `payment` below zero; `commission` above 10 000 basis points;
//! `contributor` named as a user is; `duplicate_contributor`; `too_large` when what was
//! provided sums above `u64::MAX`; `nothing_provided` when there is money to split and
//! nobody provided anything. [`settlement_posting`] is its posting: the accepting
//! cloud's client account pays, the marketplace gets the commission, each contributor's
//! account its share.
//!
//! # Invariants (checked by property tests)
//!
//! A period's net margin is its total usage minus the sum of the limits; an offset cost
//! is never negative and is zero when the net margin is not positive; netting never
//! charges more than the users' own overages summed; an estimate never exceeds the
//! average under-consumption; a settlement conserves money (commission + shares =
//! payment), no share is negative, and each is within one minor unit of its exact
//! proportion.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::usage::meters;

pub use crate::Refusal;
use crate::billing;
use crate::ledger::{self, Entry, Posting};
use crate::refuse;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// The short-term periods a subscription may have: 1, 5, 10, 15 and 30 minutes, 1, 8,
/// 12 and 24 hours.
pub const PERIODS_MS: [i64; 9] = [
    MINUTE_MS,
    5 * MINUTE_MS,
    10 * MINUTE_MS,
    15 * MINUTE_MS,
    30 * MINUTE_MS,
    HOUR_MS,
    8 * HOUR_MS,
    12 * HOUR_MS,
    DAY_MS,
];

/// The longest window a margin table covers: 31 days.
pub const MAX_WINDOW_MS: i64 = 31 * DAY_MS;

/// The most units a limit or a cloud's usage row may count (10^12).
pub const MAX_UNITS: u64 = 1_000_000_000_000;

/// The highest overage rate, in minor units per unit per period (10^12).
pub const MAX_RATE: i64 = 1_000_000_000_000;

/// Running operating-system instances (the agent's meter of the same name).
pub const OS_INSTANCES: &str = meters::OS_INSTANCES;
/// CPU cores.
pub const CPU_CORES: &str = "cpu_cores";
/// Memory, in GB.
pub const MEMORY_GB: &str = "memory_gb";
/// Prefix of a named application's instances (`app.postgres`).
pub const APP_PREFIX: &str = meters::APP_PREFIX;

/// One user's short-term subscription to one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Subscription {
    /// The user.
    pub user: String,
    /// The resource: `os_instances`, `cpu_cores`, `memory_gb` or `app.<name>`.
    pub resource: String,
    /// The short-term period, one of [`PERIODS_MS`].
    pub period_ms: i64,
    /// Units the user may use in each period without overage.
    pub limit: u64,
    /// Minor units per unit over the limit per period.
    pub overage_rate: i64,
}

/// What one host cloud reports of one user's use of one resource in one period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    /// The host cloud.
    pub cloud: String,
    /// The user.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// The start of the period (on the subscription's grid).
    pub period_start: UnixMillis,
    /// Units used on that cloud in the period (the time-weighted average of concurrent
    /// units, rounded up, as [`crate::exchange::used_in_period`] figures it).
    pub used: u64,
}

/// One user's figures in one period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cell {
    /// Units used, summed over clouds.
    pub used: u64,
    /// Usage minus the limit: over positive, under negative.
    pub margin: i64,
    /// What each cloud that reported a row reported.
    pub by_cloud: BTreeMap<String, u64>,
}

/// One user's row of a [`ResourceTable`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserRow {
    /// The user.
    pub user: String,
    /// Its subscription's limit per period.
    pub limit: u64,
    /// One per period of the table.
    pub cells: Vec<Cell>,
    /// The sum of its margins over the window.
    pub marginal_total: i64,
    /// Unit-periods it was over its limit: the sum of its positive margins.
    pub over: u64,
    /// What `over` costs at the rate: its overage without netting.
    pub own_overage_cost: i64,
}

/// The margins of the users of one resource and period length (FIG. 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResourceTable {
    /// The resource.
    pub resource: String,
    /// The period length.
    pub period_ms: i64,
    /// The overage rate of its subscriptions.
    pub overage_rate: i64,
    /// The start of each period, the columns.
    pub periods: Vec<UnixMillis>,
    /// One per subscribed user, in order of name.
    pub users: Vec<UserRow>,
    /// Per period, the sum of the users' margins.
    pub net_margins: Vec<i64>,
    /// Per period, max(0, net margin) × the rate.
    pub offset_costs: Vec<i64>,
    /// Per period, the under-consumption of the users under their limit, in units.
    pub excess_capacity: Vec<u64>,
    /// The sum of the net margins.
    pub marginal_total: i64,
    /// Unit-periods of net over-consumption: the sum of max(0, net margin).
    pub net_over: u64,
    /// The sum of the offset costs.
    pub aggregate_offset_cost: i64,
}

/// Every table of a window, and the usage no subscription covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MarginTable {
    /// Start of the window.
    pub from: UnixMillis,
    /// End of the window (exclusive).
    pub until: UnixMillis,
    /// One per resource and period length.
    pub resources: Vec<ResourceTable>,
    /// Rows in the window of a user and resource without a subscription.
    pub unsubscribed: Vec<UsageRow>,
}

impl MarginTable {
    /// The margins of `user`'s subscription to `resource`, one per period, in time
    /// order: the history [`estimate`] reads.
    pub fn margins_of(&self, user: &str, resource: &str) -> Option<Vec<i64>> {
        self.resources
            .iter()
            .filter(|t| t.resource == resource)
            .flat_map(|t| &t.users)
            .find(|u| u.user == user)
            .map(|u| u.cells.iter().map(|c| c.margin).collect())
    }
}

/// One user's own overage in a [`BillingRecord`] (informational).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserOverage {
    /// The user.
    pub user: String,
    /// Unit-periods over its limit.
    pub over: u64,
    /// What they would cost without netting.
    pub amount: i64,
}

/// What the set of users of one resource owes for a window, for their administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingRecord {
    /// Who it is sent to and who pays it.
    pub administrator: String,
    /// The resource.
    pub resource: String,
    /// The period length.
    pub period_ms: i64,
    /// Start of the window.
    pub from: UnixMillis,
    /// End of the window (exclusive).
    pub until: UnixMillis,
    /// Minor units per unit over per period.
    pub overage_rate: i64,
    /// Unit-periods of net over-consumption.
    pub net_over: u64,
    /// What is charged: the aggregate offset cost.
    pub amount: i64,
    /// Each user's own overage, in order of name; they sum to at least `amount`.
    pub users: Vec<UserOverage>,
}

/// A span of time, `[from, until)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Window {
    /// Start.
    pub from: UnixMillis,
    /// End (exclusive).
    pub until: UnixMillis,
}

/// A window of every day (UTC) in which a subscriber's unused capacity may be
/// contributed: minutes of the day, `[from_minute, until_minute)`; a window whose end
/// is not after its start runs past midnight (`22:00-06:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DailyWindow {
    /// Start, minutes after midnight (0 to 1439).
    pub from_minute: u32,
    /// End, minutes after midnight (1 to 1440).
    pub until_minute: u32,
}

impl DailyWindow {
    /// Reads `HH:MM-HH:MM` (`24:00` or `00:00` as an end: midnight).
    pub fn parse(text: &str) -> Result<Self, Refusal> {
        let bad = || {
            refuse(
                "availability",
                format!("availability {text:?}: HH:MM-HH:MM, such as 09:00-17:00 (UTC)"),
            )
        };
        let minute = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
        };
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let from_minute = minute(a).ok_or_else(bad)?;
        // `00:00` as an end is midnight, the end of the day.
        let until_minute = match minute(b).ok_or_else(bad)? {
            0 => 1440,
            m => m,
        };
        if from_minute >= 1440 || from_minute == until_minute {
            return Err(bad());
        }
        Ok(Self {
            from_minute,
            until_minute,
        })
    }
}

impl std::fmt::Display for DailyWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.from_minute), hm(self.until_minute))
    }
}

/// The spans of `[from, until)` inside any of `daily` (all of it when `daily` is
/// empty), in time order, touching spans merged.
pub fn daily_availability(
    daily: &[DailyWindow],
    from: UnixMillis,
    until: UnixMillis,
) -> Vec<Window> {
    if from >= until {
        return Vec::new();
    }
    if daily.is_empty() {
        return vec![Window { from, until }];
    }
    const MIN: i64 = 60_000;
    let mut spans = Vec::new();
    let mut day = from.div_euclid(DAY_MS) * DAY_MS - DAY_MS;
    while day < until {
        for w in daily {
            let start = day + i64::from(w.from_minute) * MIN;
            let mut end = day + i64::from(w.until_minute) * MIN;
            if w.until_minute <= w.from_minute {
                end += DAY_MS;
            }
            let (a, b) = (start.max(from), end.min(until));
            if a < b {
                spans.push(Window { from: a, until: b });
            }
        }
        day += DAY_MS;
    }
    spans.sort();
    let mut merged: Vec<Window> = Vec::new();
    for s in spans {
        match merged.last_mut() {
            Some(m) if s.from <= m.until => m.until = m.until.max(s.until),
            _ => merged.push(s),
        }
    }
    merged
}

/// What [`estimate`] reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EstimateInput {
    /// The user.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// Its margins over the look-back window, one per period.
    pub margins: Vec<i64>,
    /// The share of the average under-consumption estimated, in basis points (5000 is
    /// 50%).
    pub share_bps: u32,
    /// Start of the coming window.
    pub from: UnixMillis,
    /// End of the coming window (exclusive).
    pub until: UnixMillis,
    /// When the user lets its capacity be contributed.
    pub availability: Vec<Window>,
    /// The step a contribution starts and stops on.
    pub increment_ms: i64,
}

/// What a contributor offers the staggering (the staggering's own type).
pub use crate::stagger::Availability;

/// A user's estimated contribution over a coming window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Estimate {
    /// The user.
    pub user: String,
    /// The resource.
    pub resource: String,
    /// Units it can be expected to contribute.
    pub amount: u64,
    /// Start of the coming window.
    pub from: UnixMillis,
    /// End of the coming window (exclusive).
    pub until: UnixMillis,
    /// When, within the coming window, in time order; none when `amount` is zero.
    pub availability: Vec<Availability>,
}

/// One contributor's part of a [`Settlement`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Share {
    /// The contributor.
    pub contributor: String,
    /// Minor units.
    pub amount: i64,
}

/// How a bundle's payment is split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Settlement {
    /// What the accepting cloud pays.
    pub payment: i64,
    /// What the marketplace keeps.
    pub commission: i64,
    /// Each contributor's part, in order of name; they sum to payment − commission.
    pub shares: Vec<Share>,
}

fn check_name(field: &'static str, value: &str) -> Result<(), Refusal> {
    if !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Ok(())
    } else {
        Err(refuse(
            field,
            format!("{field} {value:?}: must be 1 to 64 of A-Z a-z 0-9 _ . -"),
        ))
    }
}

fn check_resource(resource: &str) -> Result<(), Refusal> {
    if crate::exchange::is_resource(resource) {
        Ok(())
    } else {
        Err(refuse(
            "resource",
            format!(
                "resource {resource:?}: must be {OS_INSTANCES}, {CPU_CORES}, {MEMORY_GB} or {APP_PREFIX} followed by 1 to 64 of A-Z a-z 0-9 _ -"
            ),
        ))
    }
}

/// Whether a subscription is well formed, field by field (see the module doc).
pub fn check_subscription(s: &Subscription) -> Result<(), Refusal> {
    check_name("user", &s.user)?;
    check_resource(&s.resource)?;
    if !PERIODS_MS.contains(&s.period_ms) {
        return Err(refuse(
            "period",
            format!(
                "period {} ms: must be 1, 5, 10, 15 or 30 minutes, 1, 8, 12 or 24 hours",
                s.period_ms
            ),
        ));
    }
    if s.limit > MAX_UNITS {
        return Err(refuse(
            "limit",
            format!("limit {}: at most {MAX_UNITS}", s.limit),
        ));
    }
    if !(0..=MAX_RATE).contains(&s.overage_rate) {
        return Err(refuse(
            "overage_rate",
            format!("overage rate {}: must be 0 to {MAX_RATE}", s.overage_rate),
        ));
    }
    Ok(())
}

/// Whether a usage row is well formed, field by field (see the module doc).
pub fn check_usage(row: &UsageRow) -> Result<(), Refusal> {
    check_name("cloud", &row.cloud)?;
    check_name("user", &row.user)?;
    check_resource(&row.resource)?;
    if row.used > MAX_UNITS {
        return Err(refuse(
            "used",
            format!("used {}: at most {MAX_UNITS}", row.used),
        ));
    }
    Ok(())
}

fn fit(value: i128, what: &str) -> Result<i64, Refusal> {
    i64::try_from(value).map_err(|_| refuse("overflow", format!("{what} {value} does not fit")))
}

fn fit_units(value: i128, what: &str) -> Result<u64, Refusal> {
    u64::try_from(value).map_err(|_| refuse("overflow", format!("{what} {value} does not fit")))
}

/// The margins of `subs`' users over `[from, until)` from the clouds' `usage`, netted
/// per resource and period length, with offset costs, totals and excess capacity
/// (rules 1 to 9 of the module doc).
pub fn margins(
    subs: &[Subscription],
    usage: &[UsageRow],
    from: UnixMillis,
    until: UnixMillis,
) -> Result<MarginTable, Refusal> {
    for s in subs {
        check_subscription(s)?;
    }
    let length = i128::from(until) - i128::from(from);
    if length <= 0 || length > i128::from(MAX_WINDOW_MS) {
        return Err(refuse(
            "window",
            format!("window {from}..{until}: must not be empty nor longer than 31 days"),
        ));
    }
    let mut by_key: BTreeMap<(&str, &str), &Subscription> = BTreeMap::new();
    let mut groups: BTreeMap<(&str, i64), Vec<&Subscription>> = BTreeMap::new();
    for s in subs {
        if from.rem_euclid(s.period_ms) != 0 || until.rem_euclid(s.period_ms) != 0 {
            return Err(refuse(
                "window",
                format!(
                    "window {from}..{until}: both ends must be on the grid of {}'s {} period of {} ms",
                    s.user, s.resource, s.period_ms
                ),
            ));
        }
        if by_key.insert((&s.user, &s.resource), s).is_some() {
            return Err(refuse(
                "duplicate_subscription",
                format!("{} has two subscriptions for {}", s.user, s.resource),
            ));
        }
        let group = groups.entry((&s.resource, s.period_ms)).or_default();
        if let Some(first) = group.first().filter(|f| f.overage_rate != s.overage_rate) {
            return Err(refuse(
                "mixed_rates",
                format!(
                    "{} per {} ms: {} has the overage rate {} and {} has {}",
                    s.resource, s.period_ms, first.user, first.overage_rate, s.user, s.overage_rate
                ),
            ));
        }
        group.push(s);
    }

    let mut seen: BTreeSet<(&str, &str, &str, UnixMillis)> = BTreeSet::new();
    let mut reported: BTreeMap<(&str, &str, usize), BTreeMap<String, u64>> = BTreeMap::new();
    let mut unsubscribed = Vec::new();
    for row in usage {
        check_usage(row)?;
        if !seen.insert((&row.cloud, &row.user, &row.resource, row.period_start)) {
            return Err(refuse(
                "duplicate_usage",
                format!(
                    "{} reported {}'s {} for the period from {} twice",
                    row.cloud, row.user, row.resource, row.period_start
                ),
            ));
        }
        let in_window = from <= row.period_start && row.period_start < until;
        match by_key.get(&(row.user.as_str(), row.resource.as_str())) {
            None if in_window => unsubscribed.push(row.clone()),
            None => {}
            Some(s) => {
                if row.period_start.rem_euclid(s.period_ms) != 0 {
                    return Err(refuse(
                        "misaligned",
                        format!(
                            "{}'s row of {}'s {} starts at {}, not on its period of {} ms",
                            row.cloud, row.user, row.resource, row.period_start, s.period_ms
                        ),
                    ));
                }
                if in_window {
                    // from <= start < until and the window fits in 31 days: no overflow.
                    let column = ((row.period_start - from) / s.period_ms) as usize;
                    reported
                        .entry((&row.user, &row.resource, column))
                        .or_default()
                        .insert(row.cloud.clone(), row.used);
                }
            }
        }
    }
    unsubscribed.sort_by(|a, b| {
        (&a.user, &a.resource, a.period_start, &a.cloud).cmp(&(
            &b.user,
            &b.resource,
            b.period_start,
            &b.cloud,
        ))
    });

    let mut resources = Vec::with_capacity(groups.len());
    for ((resource, period_ms), mut members) in groups {
        members.sort_by(|a, b| a.user.cmp(&b.user));
        let overage_rate = members[0].overage_rate;
        let rate = i128::from(overage_rate);
        let columns = usize::try_from((until - from) / period_ms).expect("a 31-day window");
        let periods: Vec<UnixMillis> = (0..columns).map(|i| from + period_ms * i as i64).collect();
        let mut net = vec![0i128; columns];
        let mut excess = vec![0i128; columns];
        let mut users = Vec::with_capacity(members.len());
        for s in members {
            let mut cells = Vec::with_capacity(columns);
            let (mut total, mut over) = (0i128, 0i128);
            for column in 0..columns {
                let by_cloud = reported
                    .remove(&(s.user.as_str(), resource, column))
                    .unwrap_or_default();
                let used: i128 = by_cloud.values().map(|&u| i128::from(u)).sum();
                let margin = used - i128::from(s.limit);
                net[column] += margin;
                total += margin;
                if margin < 0 {
                    excess[column] -= margin;
                } else {
                    over += margin;
                }
                cells.push(Cell {
                    used: fit_units(used, "usage")?,
                    margin: fit(margin, "margin")?,
                    by_cloud,
                });
            }
            users.push(UserRow {
                user: s.user.clone(),
                limit: s.limit,
                cells,
                marginal_total: fit(total, "marginal total")?,
                over: fit_units(over, "overage")?,
                own_overage_cost: fit(over * rate, "overage cost")?,
            });
        }
        let net_over: i128 = net.iter().map(|n| (*n).max(0)).sum();
        resources.push(ResourceTable {
            resource: resource.to_owned(),
            period_ms,
            overage_rate,
            periods,
            users,
            net_margins: net
                .iter()
                .map(|n| fit(*n, "net margin"))
                .collect::<Result<_, _>>()?,
            offset_costs: net
                .iter()
                .map(|n| fit((*n).max(0) * rate, "offset cost"))
                .collect::<Result<_, _>>()?,
            excess_capacity: excess
                .iter()
                .map(|e| fit_units(*e, "excess capacity"))
                .collect::<Result<_, _>>()?,
            marginal_total: fit(net.iter().sum(), "marginal total")?,
            net_over: fit_units(net_over, "net over-consumption")?,
            aggregate_offset_cost: fit(net_over * rate, "aggregate offset cost")?,
        });
    }
    Ok(MarginTable {
        from,
        until,
        resources,
        unsubscribed,
    })
}

/// One billing record per table of `table`, addressed to `administrator`: the
/// aggregate offset cost charged, each user's own overage as a breakdown.
pub fn billing_records(table: &MarginTable, administrator: &str) -> Vec<BillingRecord> {
    table
        .resources
        .iter()
        .map(|t| BillingRecord {
            administrator: administrator.to_owned(),
            resource: t.resource.clone(),
            period_ms: t.period_ms,
            from: table.from,
            until: table.until,
            overage_rate: t.overage_rate,
            net_over: t.net_over,
            amount: t.aggregate_offset_cost,
            users: t
                .users
                .iter()
                .map(|u| UserOverage {
                    user: u.user.clone(),
                    over: u.over,
                    amount: u.own_overage_cost,
                })
                .collect(),
        })
        .collect()
}

/// The posting of a billing record under `key`: the administrator's client account
/// pays its amount, `provider` (who sold the subscriptions) gets it less the
/// marketplace's commission at `commission_bps`. `None` when there is nothing to pay.
pub fn overage_posting(
    key: &str,
    record: &BillingRecord,
    provider: &str,
    currency: &str,
    commission_bps: u32,
) -> Option<Posting> {
    if record.amount == 0 {
        return None;
    }
    let mut posting = billing::bill_posting(
        key,
        &record.administrator,
        provider,
        currency,
        record.amount,
        commission_bps,
    );
    posting.kind = "overage".into();
    posting.memo = format!(
        "overage of {} by the users of {} from {} to {}",
        record.resource, record.administrator, record.from, record.until
    );
    Some(posting)
}

/// The first multiple of `step` at or after `t`, if it exists.
fn ceil_to(t: UnixMillis, step: i64) -> Option<UnixMillis> {
    match t.rem_euclid(step) {
        0 => Some(t),
        r => t.checked_add(step - r),
    }
}

/// A user's estimated contribution over the coming window, with its availability
/// entries (rules 1 to 3 of "Estimated contributions").
pub fn estimate(input: &EstimateInput) -> Result<Estimate, Refusal> {
    check_name("user", &input.user)?;
    check_resource(&input.resource)?;
    if input.margins.is_empty() {
        return Err(refuse(
            "history",
            format!(
                "{}'s {}: no margin to estimate from",
                input.user, input.resource
            ),
        ));
    }
    if input.share_bps > 10_000 {
        return Err(refuse(
            "share",
            format!("share {} bps: at most 10000", input.share_bps),
        ));
    }
    if input.from >= input.until {
        return Err(refuse(
            "window",
            format!(
                "coming window {}..{}: must not be empty",
                input.from, input.until
            ),
        ));
    }
    if !(1..=DAY_MS).contains(&input.increment_ms) {
        return Err(refuse(
            "increment",
            format!("increment {} ms: must be 1 ms to 24 h", input.increment_ms),
        ));
    }
    if let Some(w) = input.availability.iter().find(|w| w.from >= w.until) {
        return Err(refuse(
            "availability",
            format!(
                "availability {}..{}: must not be empty or backwards",
                w.from, w.until
            ),
        ));
    }

    let under: u128 = input
        .margins
        .iter()
        .map(|m| (-i128::from(*m)).max(0) as u128)
        .sum();
    let amount = under * u128::from(input.share_bps) / (input.margins.len() as u128 * 10_000);
    let amount = u64::try_from(amount).expect("at most the largest under-consumption");

    let step = input.increment_ms;
    let mut windows: Vec<Window> = input
        .availability
        .iter()
        .filter_map(|w| {
            let from = ceil_to(w.from.max(input.from), step)?;
            let until = {
                let t = w.until.min(input.until);
                t - t.rem_euclid(step)
            };
            (from < until).then_some(Window { from, until })
        })
        .collect();
    windows.sort();
    let mut merged: Vec<Window> = Vec::with_capacity(windows.len());
    for w in windows {
        match merged.last_mut() {
            Some(last) if w.from <= last.until => last.until = last.until.max(w.until),
            _ => merged.push(w),
        }
    }
    let availability = if amount == 0 {
        Vec::new()
    } else {
        merged
            .into_iter()
            .map(|w| Availability {
                contributor: input.user.clone(),
                resource: input.resource.clone(),
                amount,
                from: w.from,
                until: w.until,
                increment_ms: step,
            })
            .collect()
    };
    Ok(Estimate {
        user: input.user.clone(),
        resource: input.resource.clone(),
        amount,
        from: input.from,
        until: input.until,
        availability,
    })
}

/// The split of an accepting cloud's `payment` for a bundle: the marketplace's
/// commission at `commission_bps`, and the rest in proportion to what each contributor
/// `provided` (unit-milliseconds), by largest remainder (see "Settlement").
pub fn settle(
    payment: i64,
    commission_bps: u32,
    provided: &[(String, u128)],
) -> Result<Settlement, Refusal> {
    if payment < 0 {
        return Err(refuse(
            "payment",
            format!("payment {payment}: must not be negative"),
        ));
    }
    if commission_bps > 10_000 {
        return Err(refuse(
            "commission",
            format!("commission {commission_bps} bps: at most 10000"),
        ));
    }
    let mut names = BTreeSet::new();
    for (name, _) in provided {
        check_name("contributor", name)?;
        if !names.insert(name.as_str()) {
            return Err(refuse(
                "duplicate_contributor",
                format!("{name} is listed twice"),
            ));
        }
    }
    let total = provided
        .iter()
        .try_fold(0u128, |sum, (_, p)| sum.checked_add(*p))
        .filter(|t| *t <= u128::from(u64::MAX))
        .ok_or_else(|| {
            refuse(
                "too_large",
                "what the contributors provided sums above 2^64 unit-milliseconds",
            )
        })?;
    let commission = billing::commission(payment, commission_bps);
    let net = u128::try_from(payment - commission).expect("a commission of at most 100%");
    if net > 0 && total == 0 {
        return Err(refuse(
            "nothing_provided",
            format!("{net} to split and nobody provided anything"),
        ));
    }
    let mut parts: Vec<(&str, u128, u128)> = provided
        .iter()
        .map(|(name, p)| {
            // net < 2^63 and p <= 2^64: the product fits.
            let exact = net * p;
            (name.as_str(), exact / total.max(1), exact % total.max(1))
        })
        .collect();
    let floors: u128 = parts.iter().map(|(_, whole, _)| whole).sum();
    let left = usize::try_from(net - floors).expect("fewer than the contributors");
    parts.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(b.0)));
    for part in parts.iter_mut().take(left) {
        part.1 += 1;
    }
    parts.sort_by(|a, b| a.0.cmp(b.0));
    Ok(Settlement {
        payment,
        commission,
        shares: parts
            .into_iter()
            .map(|(name, amount, _)| Share {
                contributor: name.to_owned(),
                amount: i64::try_from(amount).expect("at most the payment"),
            })
            .collect(),
    })
}

/// The posting of a settlement under `key`: `accepting`'s client account pays the
/// payment, the marketplace gets the commission, each contributor's account (as
/// `account_of` names it) its share. Zero lines are left out.
pub fn settlement_posting(
    key: &str,
    accepting: &str,
    currency: &str,
    settlement: &Settlement,
    account_of: impl Fn(&str) -> String,
) -> Posting {
    let line = |account: String, amount: i64| Entry {
        account,
        currency: currency.into(),
        amount,
    };
    let mut entries = vec![line(ledger::client(accepting), -settlement.payment)];
    if settlement.commission != 0 {
        entries.push(line(ledger::MARKETPLACE.into(), settlement.commission));
    }
    entries.extend(
        settlement
            .shares
            .iter()
            .filter(|s| s.amount != 0)
            .map(|s| line(account_of(&s.contributor), s.amount)),
    );
    Posting {
        key: key.to_owned(),
        kind: "brokerage".into(),
        memo: format!("brokerage bundle paid by {accepting}"),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn daily_windows_read_and_cut_an_interval() {
        let w = DailyWindow::parse("09:00-17:00").unwrap();
        assert_eq!((w.from_minute, w.until_minute), (540, 1020));
        assert_eq!(w.to_string(), "09:00-17:00");
        assert_eq!(
            DailyWindow::parse("22:00-24:00").unwrap().until_minute,
            1440
        );
        for bad in [
            "9-17",
            "09:00",
            "25:00-26:00",
            "09:60-10:00",
            "10:00-10:00",
            "24:00-01:00",
        ] {
            assert_eq!(
                DailyWindow::parse(bad).unwrap_err().rule,
                "availability",
                "{bad}"
            );
        }
        let d = DAY_MS;
        let h = HOUR_MS;
        // Two days from 12:00: 12:00-17:00 on the first, 09:00-12:00 on the second.
        assert_eq!(
            daily_availability(&[w], 10 * d + 12 * h, 11 * d + 12 * h),
            vec![
                Window {
                    from: 10 * d + 12 * h,
                    until: 10 * d + 17 * h
                },
                Window {
                    from: 11 * d + 9 * h,
                    until: 11 * d + 12 * h
                },
            ]
        );
        // A night window runs past midnight, and one touching another merges with it.
        let night = DailyWindow::parse("22:00-06:00").unwrap();
        let morning = DailyWindow::parse("06:00-07:00").unwrap();
        assert_eq!(
            daily_availability(&[night, morning], 10 * d, 11 * d),
            vec![
                Window {
                    from: 10 * d,
                    until: 10 * d + 7 * h
                },
                Window {
                    from: 10 * d + 22 * h,
                    until: 11 * d
                },
            ]
        );
        assert_eq!(
            daily_availability(&[], 5, 9),
            vec![Window { from: 5, until: 9 }]
        );
    }

    const H: i64 = HOUR_MS;

    fn sub(user: &str, resource: &str, period_ms: i64, limit: u64, rate: i64) -> Subscription {
        Subscription {
            user: user.into(),
            resource: resource.into(),
            period_ms,
            limit,
            overage_rate: rate,
        }
    }

    fn row(cloud: &str, user: &str, resource: &str, at: UnixMillis, used: u64) -> UsageRow {
        UsageRow {
            cloud: cloud.into(),
            user: user.into(),
            resource: resource.into(),
            period_start: at,
            used,
        }
    }

    fn rule(r: Result<impl std::fmt::Debug, Refusal>) -> Option<&'static str> {
        r.err().map(|e| e.rule)
    }

    #[test]
    fn a_subscription_is_refused_by_field() {
        let ok = sub("alice", OS_INSTANCES, H, 10, 50);
        let cases = [
            ("well formed", ok.clone(), None),
            (
                "cpu cores",
                Subscription {
                    resource: CPU_CORES.into(),
                    ..ok.clone()
                },
                None,
            ),
            (
                "a named application",
                Subscription {
                    resource: "app.postgres".into(),
                    ..ok.clone()
                },
                None,
            ),
            (
                "every allowed period",
                Subscription {
                    period_ms: 8 * H,
                    ..ok.clone()
                },
                None,
            ),
            (
                "no user",
                Subscription {
                    user: String::new(),
                    ..ok.clone()
                },
                Some("user"),
            ),
            (
                "a user that cannot be an account",
                Subscription {
                    user: "al ice".into(),
                    ..ok.clone()
                },
                Some("user"),
            ),
            (
                "an unknown resource",
                Subscription {
                    resource: "gpus".into(),
                    ..ok.clone()
                },
                Some("resource"),
            ),
            (
                "an application without a name",
                Subscription {
                    resource: "app.".into(),
                    ..ok.clone()
                },
                Some("resource"),
            ),
            (
                "an application name with a dot",
                Subscription {
                    resource: "app.my.db".into(),
                    ..ok.clone()
                },
                Some("resource"),
            ),
            (
                "two hours is not a short-term period",
                Subscription {
                    period_ms: 2 * H,
                    ..ok.clone()
                },
                Some("period"),
            ),
            (
                "no period",
                Subscription {
                    period_ms: 0,
                    ..ok.clone()
                },
                Some("period"),
            ),
            (
                "a limit past the maximum",
                Subscription {
                    limit: MAX_UNITS + 1,
                    ..ok.clone()
                },
                Some("limit"),
            ),
            (
                "a negative rate",
                Subscription {
                    overage_rate: -1,
                    ..ok.clone()
                },
                Some("overage_rate"),
            ),
            (
                "a rate past the maximum",
                Subscription {
                    overage_rate: MAX_RATE + 1,
                    ..ok.clone()
                },
                Some("overage_rate"),
            ),
        ];
        for (name, s, want) in cases {
            assert_eq!(rule(check_subscription(&s)), want, "{name}");
        }
        for p in PERIODS_MS {
            assert!(check_subscription(&sub("a", MEMORY_GB, p, 1, 0)).is_ok());
        }
    }

    #[test]
    fn a_usage_row_is_refused_by_field() {
        let ok = row("east", "alice", OS_INSTANCES, 0, 3);
        let cases = [
            ("well formed", ok.clone(), None),
            (
                "no cloud",
                UsageRow {
                    cloud: String::new(),
                    ..ok.clone()
                },
                Some("cloud"),
            ),
            (
                "a user with a slash",
                UsageRow {
                    user: "a/b".into(),
                    ..ok.clone()
                },
                Some("user"),
            ),
            (
                "an unknown resource",
                UsageRow {
                    resource: "disk".into(),
                    ..ok.clone()
                },
                Some("resource"),
            ),
            (
                "too many units",
                UsageRow {
                    used: MAX_UNITS + 1,
                    ..ok.clone()
                },
                Some("used"),
            ),
        ];
        for (name, r, want) in cases {
            assert_eq!(rule(check_usage(&r)), want, "{name}");
        }
    }

    /// One refused table: subscriptions, usage, window, and the rule refused by.
    type TableCase = (Vec<Subscription>, Vec<UsageRow>, (i64, i64), &'static str);

    #[test]
    fn a_table_is_refused_by_rule() {
        let os = |user| sub(user, OS_INSTANCES, H, 10, 50);
        let cases: Vec<(&str, TableCase)> = vec![
            ("an empty window", (vec![os("a")], vec![], (H, H), "window")),
            (
                "a backwards window",
                (vec![os("a")], vec![], (2 * H, H), "window"),
            ),
            (
                "a window longer than 31 days",
                (vec![os("a")], vec![], (0, 32 * DAY_MS), "window"),
            ),
            (
                "a window cutting an hour",
                (vec![os("a")], vec![], (0, H + MINUTE_MS), "window"),
            ),
            (
                "a window cutting a daily period",
                (
                    vec![os("a"), sub("b", CPU_CORES, DAY_MS, 4, 1)],
                    vec![],
                    (0, H),
                    "window",
                ),
            ),
            (
                "a malformed subscription",
                (
                    vec![sub("a", OS_INSTANCES, 2 * H, 10, 50)],
                    vec![],
                    (0, H),
                    "period",
                ),
            ),
            (
                "two subscriptions of one user to one resource",
                (
                    vec![os("a"), sub("a", OS_INSTANCES, H, 20, 50)],
                    vec![],
                    (0, H),
                    "duplicate_subscription",
                ),
            ),
            (
                "two rates for one resource and period",
                (
                    vec![os("a"), sub("b", OS_INSTANCES, H, 10, 40)],
                    vec![],
                    (0, H),
                    "mixed_rates",
                ),
            ),
            (
                "a malformed row",
                (
                    vec![os("a")],
                    vec![row("", "a", OS_INSTANCES, 0, 1)],
                    (0, H),
                    "cloud",
                ),
            ),
            (
                "one cloud reporting one period twice",
                (
                    vec![os("a")],
                    vec![
                        row("east", "a", OS_INSTANCES, 0, 1),
                        row("east", "a", OS_INSTANCES, 0, 2),
                    ],
                    (0, H),
                    "duplicate_usage",
                ),
            ),
            (
                "a row off the subscription's grid",
                (
                    vec![os("a")],
                    vec![row("east", "a", OS_INSTANCES, 15 * MINUTE_MS, 1)],
                    (0, H),
                    "misaligned",
                ),
            ),
            (
                "a row off the grid outside the window",
                (
                    vec![os("a")],
                    vec![row("east", "a", OS_INSTANCES, 5 * H + 1, 1)],
                    (0, H),
                    "misaligned",
                ),
            ),
        ];
        for (name, (subs, usage, (from, until), want)) in cases {
            assert_eq!(
                rule(margins(&subs, &usage, from, until)),
                Some(want),
                "{name}"
            );
        }
    }

    #[test]
    fn twenty_over_at_fifty_cents_costs_ten_dollars_for_that_hour() {
        // [0061]: a net over-consumption of 20 OS instances at $0.50 is $10.00.
        let subs = [
            sub("a", OS_INSTANCES, H, 10, 50),
            sub("b", OS_INSTANCES, H, 10, 50),
        ];
        let usage = [
            row("east", "a", OS_INSTANCES, 0, 25),
            row("west", "b", OS_INSTANCES, 0, 15),
        ];
        let t = margins(&subs, &usage, 0, H).unwrap();
        let r = &t.resources[0];
        assert_eq!(r.net_margins, vec![20]);
        assert_eq!(r.offset_costs, vec![1000]);
        assert_eq!(r.aggregate_offset_cost, 1000);
    }

    #[test]
    fn a_period_without_usage_is_the_whole_limit_under_consumed() {
        let t = margins(&[sub("a", OS_INSTANCES, H, 10, 50)], &[], 0, 2 * H).unwrap();
        let r = &t.resources[0];
        assert_eq!(
            r.users[0]
                .cells
                .iter()
                .map(|c| c.margin)
                .collect::<Vec<_>>(),
            [-10, -10]
        );
        assert_eq!(r.net_margins, vec![-10, -10]);
        assert_eq!(r.offset_costs, vec![0, 0]);
        assert_eq!(r.excess_capacity, vec![10, 10]);
        assert_eq!(r.marginal_total, -20);
    }

    #[test]
    fn usage_without_a_subscription_is_listed_not_counted() {
        let subs = [sub("a", OS_INSTANCES, H, 10, 50)];
        let usage = [
            row("east", "a", OS_INSTANCES, 0, 12),
            row("east", "b", OS_INSTANCES, 0, 30),
            row("west", "a", CPU_CORES, 0, 8),
            row("west", "b", OS_INSTANCES, 5 * H, 30), // outside the window: ignored
            row("east", "a", OS_INSTANCES, 5 * H, 99), // outside the window: ignored
        ];
        let t = margins(&subs, &usage, 0, H).unwrap();
        assert_eq!(t.resources.len(), 1);
        assert_eq!(t.resources[0].net_margins, vec![2]);
        assert_eq!(
            t.unsubscribed,
            vec![
                row("west", "a", CPU_CORES, 0, 8),
                row("east", "b", OS_INSTANCES, 0, 30)
            ]
        );
    }

    #[test]
    fn periods_of_different_lengths_coexist_without_netting_together() {
        let subs = [
            sub("a", "app.postgres", 15 * MINUTE_MS, 2, 5),
            sub("b", OS_INSTANCES, H, 10, 50),
        ];
        let q = 15 * MINUTE_MS;
        let usage = [
            row("east", "a", "app.postgres", 0, 1),
            row("east", "a", "app.postgres", q, 3),
            row("west", "a", "app.postgres", q, 1),
            row("east", "a", "app.postgres", 3 * q, 2),
            row("east", "b", OS_INSTANCES, 0, 13),
        ];
        let t = margins(&subs, &usage, 0, H).unwrap();
        let [pg, os] = &t.resources[..] else {
            panic!("two tables: {t:?}")
        };
        assert_eq!((pg.resource.as_str(), pg.period_ms), ("app.postgres", q));
        assert_eq!(pg.periods, vec![0, q, 2 * q, 3 * q]);
        assert_eq!(pg.net_margins, vec![-1, 2, -2, 0]);
        assert_eq!(pg.offset_costs, vec![0, 10, 0, 0]);
        assert_eq!(pg.excess_capacity, vec![1, 0, 2, 0]);
        assert_eq!(pg.marginal_total, -1);
        assert_eq!(pg.aggregate_offset_cost, 10);
        assert_eq!(
            pg.users[0].cells[1].by_cloud,
            BTreeMap::from([("east".to_owned(), 3), ("west".to_owned(), 1)])
        );
        assert_eq!((os.resource.as_str(), os.period_ms), (OS_INSTANCES, H));
        assert_eq!(os.periods, vec![0]);
        assert_eq!(os.net_margins, vec![3]);
        assert_eq!(os.aggregate_offset_cost, 150);
    }

    #[test]
    fn the_same_resource_with_two_period_lengths_makes_two_tables() {
        let subs = [
            sub("a", OS_INSTANCES, H, 10, 50),
            sub("b", OS_INSTANCES, 30 * MINUTE_MS, 5, 20),
        ];
        let t = margins(&subs, &[], 0, H).unwrap();
        let shape: Vec<_> = t
            .resources
            .iter()
            .map(|r| (r.period_ms, r.periods.len(), r.users.len()))
            .collect();
        assert_eq!(shape, vec![(30 * MINUTE_MS, 2, 1), (H, 1, 1)]);
        assert_eq!(t.margins_of("b", OS_INSTANCES), Some(vec![-5, -5]));
        assert_eq!(t.margins_of("c", OS_INSTANCES), None);
    }

    fn input(margins: Vec<i64>, share_bps: u32) -> EstimateInput {
        EstimateInput {
            user: "alice".into(),
            resource: OS_INSTANCES.into(),
            margins,
            share_bps,
            from: 48 * H,
            until: 60 * H,
            availability: vec![Window {
                from: 48 * H,
                until: 60 * H,
            }],
            increment_ms: H,
        }
    }

    #[test]
    fn twenty_under_for_two_days_at_half_estimates_ten_for_the_next_twelve_hours() {
        // [0063].
        let e = estimate(&input(vec![-20; 48], 5000)).unwrap();
        assert_eq!(e.amount, 10);
        assert_eq!(
            e.availability,
            vec![Availability {
                contributor: "alice".into(),
                resource: OS_INSTANCES.into(),
                amount: 10,
                from: 48 * H,
                until: 60 * H,
                increment_ms: H,
            }]
        );
    }

    #[test]
    fn an_estimate_is_a_share_of_the_average_under_consumption_rounded_down() {
        let check = |margins: Vec<i64>, share, want: u64, why: &str| {
            assert_eq!(
                estimate(&input(margins, share)).unwrap().amount,
                want,
                "{why}"
            );
        };
        check(
            vec![-20, 30],
            5000,
            5,
            "an hour over counts as no under-consumption",
        );
        check(vec![-3], 5000, 1, "1.5 rounds down");
        check(vec![-1, -1, -1], 10_000, 1, "all of it");
        check(vec![0, 5, 7], 10_000, 0, "never under");
        check(vec![-20; 4], 0, 0, "a share of nothing");
        check(vec![i64::MIN, i64::MIN], 10_000, 1 << 63, "the extreme");
        let none = estimate(&input(vec![5], 5000)).unwrap();
        assert!(none.availability.is_empty(), "nothing to offer, no entry");
    }

    #[test]
    fn availability_is_clipped_to_the_coming_window_and_the_increments() {
        let mut i = input(vec![-20; 48], 5000);
        i.availability = vec![
            Window {
                from: 40 * H,
                until: 49 * H + 1,
            }, // clipped: 48..49
            Window {
                from: 49 * H,
                until: 50 * H,
            }, // touches: merged 48..50
            Window {
                from: 52 * H + 1,
                until: 54 * H + 30,
            }, // inward: 53..54
            Window {
                from: 55 * H + 10,
                until: 55 * H + 20,
            }, // empty once shrunk
            Window {
                from: 59 * H,
                until: 70 * H,
            }, // clipped: 59..60
            Window {
                from: 53 * H + 5,
                until: 53 * H + 900_000,
            }, // inside 53..54: gone
        ];
        let got: Vec<(i64, i64)> = estimate(&i)
            .unwrap()
            .availability
            .iter()
            .map(|a| (a.from / H, a.until / H))
            .collect();
        assert_eq!(got, vec![(48, 50), (53, 54), (59, 60)]);
    }

    #[test]
    fn an_estimate_is_refused_by_rule() {
        let ok = input(vec![-20; 48], 5000);
        let cases = [
            (
                "no history",
                EstimateInput {
                    margins: vec![],
                    ..ok.clone()
                },
                "history",
            ),
            (
                "a share past 100%",
                EstimateInput {
                    share_bps: 10_001,
                    ..ok.clone()
                },
                "share",
            ),
            (
                "an empty coming window",
                EstimateInput {
                    until: ok.from,
                    ..ok.clone()
                },
                "window",
            ),
            (
                "no increment",
                EstimateInput {
                    increment_ms: 0,
                    ..ok.clone()
                },
                "increment",
            ),
            (
                "an increment past a day",
                EstimateInput {
                    increment_ms: DAY_MS + 1,
                    ..ok.clone()
                },
                "increment",
            ),
            (
                "a backwards availability",
                EstimateInput {
                    availability: vec![Window {
                        from: 50 * H,
                        until: 49 * H,
                    }],
                    ..ok.clone()
                },
                "availability",
            ),
            (
                "a bad user",
                EstimateInput {
                    user: String::new(),
                    ..ok.clone()
                },
                "user",
            ),
            (
                "a bad resource",
                EstimateInput {
                    resource: "x".into(),
                    ..ok.clone()
                },
                "resource",
            ),
        ];
        for (name, i, want) in cases {
            assert_eq!(rule(estimate(&i)), Some(want), "{name}");
        }
    }

    fn provided(list: &[(&str, u128)]) -> Vec<(String, u128)> {
        list.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
    }

    fn amounts(s: &Settlement) -> Vec<(&str, i64)> {
        s.shares
            .iter()
            .map(|s| (s.contributor.as_str(), s.amount))
            .collect()
    }

    #[test]
    fn a_settlement_splits_by_what_was_provided() {
        let s = settle(1000, 1000, &provided(&[("b", 3), ("a", 1), ("z", 0)])).unwrap();
        assert_eq!(s.commission, 100);
        assert_eq!(amounts(&s), vec![("a", 225), ("b", 675), ("z", 0)]);

        // 100 between three equals: 33 each and one left, to the name first in order.
        let s = settle(100, 0, &provided(&[("c", 7), ("b", 7), ("a", 7)])).unwrap();
        assert_eq!(amounts(&s), vec![("a", 34), ("b", 33), ("c", 33)]);

        // 10 split 1:2 is 3.33 and 6.67: the larger remainder takes the unit left.
        let s = settle(10, 0, &provided(&[("a", 1), ("b", 2)])).unwrap();
        assert_eq!(amounts(&s), vec![("a", 3), ("b", 7)]);

        // Everything to the marketplace: nothing to split, even if nobody provided.
        let s = settle(500, 10_000, &provided(&[("a", 0)])).unwrap();
        assert_eq!((s.commission, amounts(&s)), (500, vec![("a", 0)]));
        let s = settle(0, 1000, &[]).unwrap();
        assert_eq!((s.commission, s.shares.len()), (0, 0));
    }

    #[test]
    fn a_settlement_is_refused_by_rule() {
        let cases = [
            (
                "a negative payment",
                settle(-1, 0, &provided(&[("a", 1)])),
                "payment",
            ),
            (
                "a commission past 100%",
                settle(1, 10_001, &provided(&[("a", 1)])),
                "commission",
            ),
            (
                "a bad name",
                settle(1, 0, &provided(&[("a b", 1)])),
                "contributor",
            ),
            (
                "a contributor twice",
                settle(1, 0, &provided(&[("a", 1), ("a", 2)])),
                "duplicate_contributor",
            ),
            (
                "more than 2^64 provided",
                settle(1, 0, &provided(&[("a", u128::from(u64::MAX)), ("b", 1)])),
                "too_large",
            ),
            (
                "nobody provided",
                settle(10, 0, &provided(&[("a", 0)])),
                "nothing_provided",
            ),
            ("no contributor", settle(10, 0, &[]), "nothing_provided"),
        ];
        for (name, got, want) in cases {
            assert_eq!(rule(got), Some(want), "{name}");
        }
    }

    #[test]
    fn postings_balance_and_leave_zero_lines_out() {
        let s = settle(1000, 1000, &provided(&[("a", 1), ("z", 0)])).unwrap();
        let p = settlement_posting("bundle-1", "acme", "EUR", &s, ledger::provider);
        assert_eq!(p.entries.iter().map(|e| e.amount).sum::<i64>(), 0);
        let accounts: Vec<_> = p
            .entries
            .iter()
            .map(|e| (e.account.as_str(), e.amount))
            .collect();
        assert_eq!(
            accounts,
            vec![
                ("client:acme", -1000),
                ("marketplace", 100),
                ("provider:a", 900)
            ]
        );
        assert!(ledger::check(&p, |_, _| 100_000, ledger::default_allows_negative).is_ok());

        let t = margins(&[sub("a", OS_INSTANCES, H, 10, 50)], &[], 0, H).unwrap();
        let records = billing_records(&t, "acme");
        assert_eq!(records[0].amount, 0);
        assert_eq!(overage_posting("k", &records[0], "cloudco", "EUR", 0), None);
    }

    fn arb_usage() -> impl Strategy<Value = (Vec<Subscription>, Vec<UsageRow>)> {
        let users = ["a", "b", "c", "d", "e"];
        let clouds = ["east", "west", "north"];
        (
            proptest::collection::vec(proptest::option::of(0u64..30), users.len()),
            0i64..200,
            proptest::collection::btree_map((0usize..5, 0usize..3, 0i64..6), 0u64..40, 0..60),
        )
            .prop_map(move |(limits, rate, cells)| {
                let subs = users
                    .iter()
                    .zip(&limits)
                    .filter_map(|(u, l)| l.map(|l| sub(u, OS_INSTANCES, H, l, rate)))
                    .collect();
                let usage = cells
                    .into_iter()
                    .map(|((u, c, h), used)| row(clouds[c], users[u], OS_INSTANCES, h * H, used))
                    .collect();
                (subs, usage)
            })
    }

    proptest! {
        /// Netting: each period's net margin is the total reported usage of the
        /// subscribed users minus the sum of their limits; offset costs are never
        /// negative, zero without net over-consumption, and sum to what netting charges,
        /// which is never more than the users' own overages; excess capacity is the
        /// under-consumption of those under their limit.
        #[test]
        fn netting_is_total_usage_minus_total_limits((subs, usage) in arb_usage()) {
            let t = margins(&subs, &usage, 0, 6 * H).unwrap();
            if subs.is_empty() {
                prop_assert!(t.resources.is_empty());
                prop_assert_eq!(t.unsubscribed.len(), usage.len());
                return Ok(());
            }
            let r = &t.resources[0];
            let limits: i64 = subs.iter().map(|s| s.limit as i64).sum();
            let rate = subs[0].overage_rate;
            for h in 0..6 {
                let used: i64 = usage
                    .iter()
                    .filter(|u| u.period_start == h * H && subs.iter().any(|s| s.user == u.user))
                    .map(|u| u.used as i64)
                    .sum();
                let i = h as usize;
                prop_assert_eq!(r.net_margins[i], used - limits);
                prop_assert!(r.offset_costs[i] >= 0);
                prop_assert_eq!(r.offset_costs[i], (used - limits).max(0) * rate);
                let excess: i64 = r.users.iter().map(|u| (-u.cells[i].margin).max(0)).sum();
                prop_assert_eq!(r.excess_capacity[i] as i64, excess);
            }
            prop_assert_eq!(r.marginal_total, r.net_margins.iter().sum::<i64>());
            prop_assert_eq!(r.aggregate_offset_cost, r.offset_costs.iter().sum::<i64>());
            let users_total: i64 = r.users.iter().map(|u| u.marginal_total).sum();
            prop_assert_eq!(r.marginal_total, users_total);
            let own: i64 = r.users.iter().map(|u| u.own_overage_cost).sum();
            prop_assert!(own >= r.aggregate_offset_cost);
            let listed = usage.iter().filter(|u| !subs.iter().any(|s| s.user == u.user)).count();
            prop_assert_eq!(t.unsubscribed.len(), listed);
        }

        /// Money is conserved, no share is negative, each share is within one minor
        /// unit of its exact proportion, and who provided nothing gets nothing.
        #[test]
        fn a_settlement_conserves_money_and_is_proportional(
            payment in 0i64..=i64::MAX,
            bps in 0u32..=10_000,
            amounts in proptest::collection::vec(proptest::option::of(0u64..=u64::MAX / 8), 1..8),
        ) {
            let provided: Vec<(String, u128)> = amounts
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("c{i}"), u128::from(p.unwrap_or(0))))
                .collect();
            let total: u128 = provided.iter().map(|(_, p)| p).sum();
            let s = match settle(payment, bps, &provided) {
                Ok(s) => s,
                Err(e) => {
                    prop_assert_eq!(e.rule, "nothing_provided");
                    prop_assert_eq!(total, 0);
                    return Ok(());
                }
            };
            let shares: i64 = s.shares.iter().map(|s| s.amount).sum();
            prop_assert_eq!(s.commission + shares, payment);
            let net = (payment - s.commission) as u128;
            for (share, (_, p)) in s.shares.iter().zip(&provided) {
                prop_assert!(share.amount >= 0);
                // |share × total − net × p| < total.
                let scaled = share.amount as u128 * total;
                let exact = net * p;
                prop_assert!(scaled.abs_diff(exact) < total.max(1));
                if *p == 0 {
                    prop_assert_eq!(share.amount, 0);
                }
            }
        }

        /// An estimate never exceeds the average under-consumption, nor the share of
        /// it; a larger share never estimates less.
        #[test]
        fn an_estimate_never_exceeds_the_average_under_consumption(
            margins in proptest::collection::vec(-1_000i64..1_000, 1..100),
            share in 0u32..=10_000,
            more in 0u32..=10_000,
        ) {
            let under: i64 = margins.iter().map(|m| (-m).max(0)).sum();
            let n = margins.len() as i64;
            let e = estimate(&input(margins.clone(), share)).unwrap();
            prop_assert!(e.amount as i64 * n <= under);
            prop_assert!(e.amount as i128 * n as i128 * 10_000 <= under as i128 * share as i128);
            let bigger = estimate(&input(margins, share.max(more))).unwrap();
            prop_assert!(bigger.amount >= e.amount);
        }
    }
}
