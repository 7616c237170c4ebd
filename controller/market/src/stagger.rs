//! Staggered contributions (issue 18): many contributors' short, differently metered
//! availabilities arranged so that an amount of a resource is held over a whole
//! interval ([`arrange`]), an independent check of any arrangement ([`check`]), how long
//! a contribution interval is ([`common_interval`], [`interval_for`],
//! [`dynamic_intervals`]) and what a bundle costs ([`price_bundle`]).
//!
//! Owns the rules; must not read a clock, make an id or touch a store. Times are
//! arguments, and the same input always gives the same answer (ties go to the lower
//! contributor name).
//!
//! # Input ([`check_input`])
//!
//! Refused: a need or availability that does not end after it starts or spans more
//! than `i64::MAX` ms (`interval`), of no amount (`amount`), an increment of zero or
//! less (`increment`), two availabilities of one contributor and resource that overlap
//! (`overlap`), and amounts of one resource whose sum does not fit in a `u64`
//! (`too_large`). [`arrange`] and [`dynamic_intervals`] refuse what this refuses.
//!
//! # Contributions
//!
//! 1. **Window and grid.** An [`Availability`] offers up to `amount` units of
//!    `resource` within `[from, until)`, metered in increments of `increment_ms`
//!    counted from `from`. A [`Contribution`] from it starts on that grid
//!    (`from + k × increment_ms`), lasts a whole number of increments (its
//!    `paid_increments`, at least one) and ends at or before `until`: a last part of
//!    the window shorter than an increment cannot be given. The span dedicated may
//!    reach past the need it serves, but never past the window: an increment used in
//!    part is dedicated and paid whole (\[0055\]: "partial intervals can be accepted
//!    ... the contributing user is paid for the entire interval").
//! 2. **Part of the amount.** A contribution gives any amount from 1 to the
//!    availability's, the same over its whole span. An availability may give several
//!    contributions; at no instant do those of one contributor and resource add up to
//!    more than the amount of the availability open then.
//! 3. **One window at a time.** Availabilities of one contributor and resource never
//!    overlap (input rule `overlap`), so each is its own capacity and a contribution
//!    lies within one of them.
//! 4. **Coverage.** At every instant and for every resource, the contributions open
//!    then add up to at least the amounts of that resource's needs open then (needs of
//!    one resource add up; needs of several resources are meshed in one bundle).
//!
//! # Arranging ([`arrange`])
//!
//! 5. **Feasible or short.** An arrangement exists exactly when, at every instant of a
//!    need, the usable parts of the windows (rule 1) add up to the need: each window
//!    given whole is then one. Otherwise nothing is arranged and every [`Shortfall`]
//!    is returned: each maximal run of time over which one resource's need and all of
//!    its usable availability are both constant and the availability falls short.
//! 6. **Fewest contributors (greedy).** Contributors are chosen one at a time, each
//!    time the one covering the most of what is still missing (in unit-milliseconds,
//!    each resource weighed against its whole need so that units do not matter), ties
//!    to the lower name. Then, in the order they were chosen, every contributor
//!    without whom the others still suffice is dropped. The result is irredundant:
//!    without any one of its contributors, even everything the others have falls
//!    short somewhere. Being greedy, it is not always the fewest possible.
//! 7. **Least paid.** Each resource is then filled from the chosen contributors'
//!    windows in two passes. First exactly, coarsest increment first (then the
//!    larger amount, then by name and start): each increment of a window gives the
//!    least still missing at any instant in it, up to the window's amount, so nothing
//!    is given beyond the need. Then rounding out, finest increment first: each
//!    increment gives the most still missing at any instant in it, up to what the
//!    window has left; what is given beyond the need is this rounding only. Touching
//!    increments of one window giving one amount are one contribution.
//! 8. **Sub-intervals.** The instants at which some need is open are cut into maximal
//!    [`SubInterval`]s over which, for every resource, what is needed and who
//!    provides how much do not change (\[0055\]: "decomposing the set of staggered
//!    contribution periods"). A resource is listed where it is needed or provided.
//!
//! # Intervals
//!
//! 9. **Common** ([`common_interval`]): the shortest interval that is a whole number
//!    of every contributor's increment (their least common multiple, \[0062\]'s
//!    "minimum common denominator"); none past a day ([`DAY_MS`]).
//! 10. **Rule** ([`interval_for`]): common (refused with `no_common_interval` when
//!     there is none), requested by a marketplace cloud (above zero and at most a day,
//!     else `requested_interval`) or fixed at 1, 2, 12 or 24 hours (else
//!     `fixed_interval`); the default is fixed at one hour.
//! 11. **Dynamic** ([`dynamic_intervals`], \[0056\]): a span is cut into consecutive
//!     intervals over each of which one set of contributors, each dedicated for the
//!     whole interval (no staggering inside it), holds the minimum. Each interval is
//!     as long as it can be, up to the longest allowed; the set may change from one
//!     interval to the next. Where not even all the contributors open at an instant
//!     reach the minimum, no interval covers it; everywhere else one does.
//!
//! # Price ([`price_bundle`])
//!
//! 12. A contributor's share is the larger of the floor and what its contributions
//!     dedicate, `amount × rate per unit-hour × dedicated hours` summed exactly in
//!     unit-milliseconds and rounded up once to a minor unit. The total is the sum of
//!     the shares. Refused: a resource without a rate (`no_rate`), a price that does
//!     not fit in a `u64` (`too_large`).
//!
//! # Invariants (checked by tests)
//!
//! Every arrangement [`arrange`] makes passes [`check`], which is written apart from
//! it and checks rules 1 to 4 and 8 by summing at every instant where anything
//! changes. Every arrangement is irredundant (rule 6). Shortfalls are exactly where
//! all usable availability is below the need. Shares add up to the total.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::Excluded;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;

pub use crate::Refusal;
use crate::refuse;

/// One hour in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;
/// One day in milliseconds: the longest contribution interval (rules 9 and 10).
pub const DAY_MS: i64 = 24 * HOUR_MS;
/// The intervals a fixed rule may name (rule 10, \[0062\]).
pub const FIXED_INTERVALS_MS: [i64; 4] = [HOUR_MS, 2 * HOUR_MS, 12 * HOUR_MS, DAY_MS];

/// What a contributor can dedicate (rules 1 to 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Availability {
    /// Who contributes.
    pub contributor: String,
    /// What, such as `os_instances` or `memory_gb`.
    pub resource: String,
    /// The most units it gives at any instant.
    pub amount: u64,
    /// The window's start, which anchors the increment grid.
    pub from: UnixMillis,
    /// The window's end (exclusive).
    pub until: UnixMillis,
    /// How it is metered: contributions last whole increments of this length.
    pub increment_ms: i64,
}

/// An amount of a resource to hold over `[from, until)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Need {
    /// The resource.
    pub resource: String,
    /// Units held at every instant.
    pub amount: u64,
    /// Start.
    pub from: UnixMillis,
    /// End (exclusive).
    pub until: UnixMillis,
}

/// What one contributor dedicates: `amount` units over `[from, until)`, whole
/// increments of its grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Contribution {
    /// Who.
    pub contributor: String,
    /// What.
    pub resource: String,
    /// Units, at most its availability's.
    pub amount: u64,
    /// Start of the span dedicated, on the grid.
    pub from: UnixMillis,
    /// End of the span dedicated (exclusive), on the grid.
    pub until: UnixMillis,
    /// Increments the span lasts, each paid whole.
    pub paid_increments: u64,
}

/// One resource over a sub-interval: what is needed and who provides it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Provided {
    /// The sum of the needs open.
    pub needed: u64,
    /// The sum of `by`.
    pub provided: u64,
    /// Each contributor's units.
    pub by: BTreeMap<String, u64>,
}

/// A maximal run of time over which nothing needed or provided changes (rule 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubInterval {
    /// Start.
    pub from: UnixMillis,
    /// End (exclusive).
    pub until: UnixMillis,
    /// Each resource needed or provided in it.
    pub resources: BTreeMap<String, Provided>,
}

/// Contributions that hold every need, and the staggered periods they make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Arrangement {
    /// The needs it holds.
    pub needs: Vec<Need>,
    /// By resource, start, then contributor.
    pub contributions: Vec<Contribution>,
    /// In time order.
    pub sub_intervals: Vec<SubInterval>,
}

impl Arrangement {
    /// The contributors it uses.
    pub fn contributors(&self) -> BTreeSet<&str> {
        self.contributions
            .iter()
            .map(|c| c.contributor.as_str())
            .collect()
    }
}

/// Where even all usable availability falls short of a need (rule 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Shortfall {
    /// The resource.
    pub resource: String,
    /// Start.
    pub from: UnixMillis,
    /// End (exclusive).
    pub until: UnixMillis,
    /// What the needs open add up to.
    pub needed: u64,
    /// What all usable availability adds up to (less than `needed`).
    pub available: u64,
}

/// Why [`arrange`] made no arrangement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unarranged {
    /// The input breaks a rule of [`check_input`].
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// Not enough is available (rule 5): every shortfall, by resource then time.
    #[error("not enough is available in {} sub-interval(s)", .0.len())]
    Short(Vec<Shortfall>),
}

/// How long a contribution interval is (rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "rule", content = "ms", rename_all = "snake_case")]
pub enum IntervalRule {
    /// The contributors' common interval.
    Common,
    /// What a marketplace cloud asked for.
    Requested(i64),
    /// One of [`FIXED_INTERVALS_MS`].
    Fixed(i64),
}

impl Default for IntervalRule {
    /// One hour (\[0056\]).
    fn default() -> Self {
        IntervalRule::Fixed(HOUR_MS)
    }
}

/// What a bundle is priced by (rule 12).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PriceTerms {
    /// Minor units per unit-hour, by resource.
    pub rate_per_unit_hour: BTreeMap<String, u64>,
    /// The least a contributor is paid, in minor units.
    pub floor_per_contributor: u64,
}

/// A bundle's price in minor units.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundlePrice {
    /// The sum of the shares.
    pub total: u64,
    /// Each contributor's share.
    pub per_contributor: BTreeMap<String, u64>,
}

/// Whether `needs` and `available` may be arranged at all (see "Input").
pub fn check_input(needs: &[Need], available: &[Availability]) -> Result<(), Refusal> {
    for n in needs {
        let what = || format!("the need for {}", n.resource);
        check_span(n.from, n.until, n.amount, what)?;
    }
    for a in available {
        let what = || format!("{}'s availability of {}", a.contributor, a.resource);
        check_span(a.from, a.until, a.amount, what)?;
        if a.increment_ms <= 0 {
            return Err(refuse(
                "increment",
                format!("{} has an increment of {} ms", what(), a.increment_ms),
            ));
        }
    }
    let mut sums: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    let needed = needs
        .iter()
        .map(|n| (n.resource.as_str(), "needed", n.amount));
    let offered = available
        .iter()
        .map(|a| (a.resource.as_str(), "available", a.amount));
    for (resource, what, amount) in needed.chain(offered) {
        let sum = sums.entry((resource, what)).or_default();
        *sum = sum.checked_add(amount).ok_or_else(|| {
            refuse(
                "too_large",
                format!("the amounts of {resource} {what} add up past {}", u64::MAX),
            )
        })?;
    }
    let mut sorted: Vec<&Availability> = available.iter().collect();
    sorted.sort_by_key(|a| (&a.contributor, &a.resource, a.from));
    for pair in sorted.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.contributor == b.contributor && a.resource == b.resource && b.from < a.until {
            return Err(refuse(
                "overlap",
                format!(
                    "{}'s availabilities of {} overlap: [{}, {}) and [{}, {})",
                    a.contributor, a.resource, a.from, a.until, b.from, b.until
                ),
            ));
        }
    }
    Ok(())
}

fn check_span(
    from: UnixMillis,
    until: UnixMillis,
    amount: u64,
    what: impl Fn() -> String,
) -> Result<(), Refusal> {
    if until.checked_sub(from).is_none_or(|len| len <= 0) {
        return Err(refuse(
            "interval",
            format!(
                "{} must end after it starts, by at most {} ms: [{from}, {until})",
                what(),
                i64::MAX
            ),
        ));
    }
    if amount == 0 {
        return Err(refuse("amount", format!("{} is of no amount", what())));
    }
    Ok(())
}

/// Contributions that hold every need (rules 1 to 8), or every shortfall.
pub fn arrange(needs: &[Need], available: &[Availability]) -> Result<Arrangement, Unarranged> {
    check_input(needs, available)?;
    let mut demand: BTreeMap<&str, Steps> = BTreeMap::new();
    for n in needs {
        let steps = demand.entry(n.resource.as_str()).or_default();
        steps.update(n.from, n.until, |v| v + n.amount);
    }
    let windows = usable_windows(available, |r| demand.contains_key(r));

    // Elementary segments: a resource's need and usable availability are constant
    // over each.
    let mut segments: Vec<Segment> = Vec::new();
    for (&resource, steps) in &demand {
        let mut bounds: BTreeSet<UnixMillis> = steps.0.keys().copied().collect();
        for w in windows.iter().filter(|w| w.resource == resource) {
            bounds.extend([w.from, w.until]);
        }
        let bounds: Vec<UnixMillis> = bounds.into_iter().collect();
        for pair in bounds.windows(2) {
            let needed = steps.at(pair[0]);
            if needed > 0 {
                segments.push(Segment {
                    resource,
                    from: pair[0],
                    until: pair[1],
                    needed,
                });
            }
        }
    }
    // What each contributor can give in each segment (one window at a time, rule 3).
    let mut capacity: BTreeMap<&str, Vec<(usize, u64)>> = BTreeMap::new();
    for w in &windows {
        let caps = capacity.entry(w.contributor).or_default();
        for (i, s) in segments.iter().enumerate() {
            if s.resource == w.resource && w.from <= s.from && s.until <= w.until {
                caps.push((i, w.amount));
            }
        }
    }
    let everyone: Vec<&str> = capacity.keys().copied().collect();
    let shortfalls = shortfalls(&segments, &provision(&segments, &capacity, &everyone));
    if !shortfalls.is_empty() {
        return Err(Unarranged::Short(shortfalls));
    }
    let chosen = choose(&segments, &capacity);
    let contributions = fill(&demand, &windows, &chosen);
    let sub_intervals = sub_intervals(needs, &contributions);
    Ok(Arrangement {
        needs: needs.to_vec(),
        contributions,
        sub_intervals,
    })
}

/// The usable part of an availability (rule 1): `[from, until)` is whole increments.
#[derive(Debug, Clone, Copy)]
struct Window<'a> {
    contributor: &'a str,
    resource: &'a str,
    amount: u64,
    from: UnixMillis,
    until: UnixMillis,
    increment: i64,
}

impl Window<'_> {
    fn floor(&self, t: UnixMillis) -> UnixMillis {
        self.from + (t - self.from) / self.increment * self.increment
    }

    fn ceil(&self, t: UnixMillis) -> UnixMillis {
        let floor = self.floor(t);
        if floor == t {
            t
        } else {
            floor + self.increment
        }
    }
}

/// The usable windows of the resources `wanted`, by contributor, resource and start.
fn usable_windows(available: &[Availability], wanted: impl Fn(&str) -> bool) -> Vec<Window<'_>> {
    let mut windows: Vec<Window> = available
        .iter()
        .filter(|a| wanted(&a.resource))
        .map(|a| Window {
            contributor: &a.contributor,
            resource: &a.resource,
            amount: a.amount,
            from: a.from,
            until: a.from + (a.until - a.from) / a.increment_ms * a.increment_ms,
            increment: a.increment_ms,
        })
        .filter(|w| w.from < w.until)
        .collect();
    windows.sort_by_key(|w| (w.contributor, w.resource, w.from));
    windows
}

#[derive(Debug, Clone, Copy)]
struct Segment<'a> {
    resource: &'a str,
    from: UnixMillis,
    until: UnixMillis,
    needed: u64,
}

/// What `who` can give together in each segment.
fn provision(
    segments: &[Segment],
    capacity: &BTreeMap<&str, Vec<(usize, u64)>>,
    who: &[&str],
) -> Vec<u64> {
    let mut total = vec![0u64; segments.len()];
    for c in who {
        for &(i, amount) in &capacity[c] {
            total[i] += amount;
        }
    }
    total
}

/// Rule 5: touching short segments with the same need and availability are one.
fn shortfalls(segments: &[Segment], total: &[u64]) -> Vec<Shortfall> {
    let mut out: Vec<Shortfall> = Vec::new();
    for (s, &available) in segments.iter().zip(total) {
        if available >= s.needed {
            continue;
        }
        match out.last_mut() {
            Some(last)
                if last.resource == s.resource
                    && last.until == s.from
                    && last.needed == s.needed
                    && last.available == available =>
            {
                last.until = s.until;
            }
            _ => out.push(Shortfall {
                resource: s.resource.to_owned(),
                from: s.from,
                until: s.until,
                needed: s.needed,
                available,
            }),
        }
    }
    out
}

/// Rule 6: greedy cover, then drop the redundant, in the order chosen.
fn choose<'a>(
    segments: &[Segment],
    capacity: &BTreeMap<&'a str, Vec<(usize, u64)>>,
) -> Vec<&'a str> {
    let mut whole: BTreeMap<&str, f64> = BTreeMap::new();
    for s in segments {
        *whole.entry(s.resource).or_default() += s.needed as f64 * (s.until - s.from) as f64;
    }
    let weight: Vec<f64> = segments
        .iter()
        .map(|s| (s.until - s.from) as f64 / whole[s.resource])
        .collect();
    let mut missing: Vec<u64> = segments.iter().map(|s| s.needed).collect();
    let mut chosen: Vec<&str> = Vec::new();
    while missing.iter().any(|m| *m > 0) {
        let mut best: Option<(&str, f64)> = None;
        for (&c, caps) in capacity.iter().filter(|(c, _)| !chosen.contains(c)) {
            let gain: f64 = caps
                .iter()
                .map(|&(i, amount)| amount.min(missing[i]) as f64 * weight[i])
                .sum();
            if gain > 0.0 && best.is_none_or(|(_, g)| gain > g) {
                best = Some((c, gain));
            }
        }
        let (c, _) = best.expect("everyone together suffices, so someone covers what is missing");
        for &(i, amount) in &capacity[c] {
            missing[i] -= amount.min(missing[i]);
        }
        chosen.push(c);
    }
    let mut kept = chosen.clone();
    for c in chosen {
        let without: Vec<&str> = kept.iter().copied().filter(|k| *k != c).collect();
        let total = provision(segments, capacity, &without);
        if segments.iter().zip(&total).all(|(s, t)| *t >= s.needed) {
            kept = without;
        }
    }
    kept
}

/// Rule 7: fill each resource from the chosen contributors' windows, exactly first,
/// then rounding out what is still missing.
fn fill(demand: &BTreeMap<&str, Steps>, windows: &[Window], chosen: &[&str]) -> Vec<Contribution> {
    // What each window gives, and what each resource is given.
    let mut mine: Vec<Steps> = vec![Steps::default(); windows.len()];
    let mut covered: BTreeMap<&str, Steps> = BTreeMap::new();
    let mut order: Vec<usize> = (0..windows.len())
        .filter(|&i| chosen.contains(&windows[i].contributor))
        .collect();
    fn tie<'a>(w: &Window<'a>) -> (Reverse<u64>, &'a str, &'a str, UnixMillis) {
        (Reverse(w.amount), w.contributor, w.resource, w.from)
    }
    // Exactly, coarsest first: an increment gives the least missing in it.
    order.sort_by_key(|&i| (Reverse(windows[i].increment), tie(&windows[i])));
    for &i in &order {
        let w = &windows[i];
        let cov = covered.entry(w.resource).or_default();
        let mut least = Steps::default();
        least.update(w.from, w.until, |_| w.amount);
        for (from, until, missing) in missing(&demand[w.resource], cov, w) {
            least.update(w.floor(from), w.ceil(until), |v| v.min(missing));
        }
        for (from, until, give) in least.runs() {
            mine[i].update(from, until, |v| v + give);
            cov.update(from, until, |v| v + give);
        }
    }
    // Rounding out, finest first: an increment gives the most still missing in it, up
    // to what the window has left.
    order.sort_by_key(|&i| (windows[i].increment, tie(&windows[i])));
    for &i in &order {
        let w = &windows[i];
        let cov = covered.entry(w.resource).or_default();
        let mut most = Steps::default();
        for (from, until, missing) in missing(&demand[w.resource], cov, w) {
            most.update(w.floor(from), w.ceil(until), |v| v.max(missing));
        }
        for (from, until, wanted) in most.runs() {
            let mut points: BTreeSet<UnixMillis> = [from, until].into();
            points.extend(mine[i].breaks(from, until));
            let points: Vec<UnixMillis> = points.into_iter().collect();
            for pair in points.windows(2) {
                let give = wanted.min(w.amount - mine[i].at(pair[0]));
                if give > 0 {
                    mine[i].update(pair[0], pair[1], |v| v + give);
                    cov.update(pair[0], pair[1], |v| v + give);
                }
            }
        }
    }
    let mut out: Vec<Contribution> = Vec::new();
    for (w, given) in windows.iter().zip(&mine) {
        for (from, until, amount) in given.runs() {
            out.push(Contribution {
                contributor: w.contributor.to_owned(),
                resource: w.resource.to_owned(),
                amount,
                from,
                until,
                paid_increments: ((until - from) / w.increment) as u64,
            });
        }
    }
    out.sort_by(|a, b| {
        (&a.resource, a.from, &a.contributor, a.until).cmp(&(
            &b.resource,
            b.from,
            &b.contributor,
            b.until,
        ))
    });
    out
}

/// What `w`'s resource still misses over `w`'s window, in pieces of one value.
fn missing(need: &Steps, covered: &Steps, w: &Window) -> Vec<(UnixMillis, UnixMillis, u64)> {
    let mut points: BTreeSet<UnixMillis> = [w.from, w.until].into();
    points.extend(need.breaks(w.from, w.until));
    points.extend(covered.breaks(w.from, w.until));
    let points: Vec<UnixMillis> = points.into_iter().collect();
    points
        .windows(2)
        .map(|p| (p[0], p[1], need.at(p[0]).saturating_sub(covered.at(p[0]))))
        .collect()
}

/// Rule 8.
fn sub_intervals(needs: &[Need], contributions: &[Contribution]) -> Vec<SubInterval> {
    let mut bounds: BTreeSet<UnixMillis> = BTreeSet::new();
    bounds.extend(needs.iter().flat_map(|n| [n.from, n.until]));
    bounds.extend(contributions.iter().flat_map(|c| [c.from, c.until]));
    let bounds: Vec<UnixMillis> = bounds.into_iter().collect();
    let mut out: Vec<SubInterval> = Vec::new();
    for pair in bounds.windows(2) {
        let (from, until) = (pair[0], pair[1]);
        let open = |a: UnixMillis, b: UnixMillis| a <= from && from < b;
        if !needs.iter().any(|n| open(n.from, n.until)) {
            continue;
        }
        let mut resources: BTreeMap<String, Provided> = BTreeMap::new();
        for n in needs.iter().filter(|n| open(n.from, n.until)) {
            resources.entry(n.resource.clone()).or_default().needed += n.amount;
        }
        for c in contributions.iter().filter(|c| open(c.from, c.until)) {
            let p = resources.entry(c.resource.clone()).or_default();
            p.provided += c.amount;
            *p.by.entry(c.contributor.clone()).or_default() += c.amount;
        }
        match out.last_mut() {
            Some(last) if last.until == from && last.resources == resources => last.until = until,
            _ => out.push(SubInterval {
                from,
                until,
                resources,
            }),
        }
    }
    out
}

/// A step function of time: the value at `t` is that of the last key at or before `t`
/// (0 before the first).
#[derive(Debug, Clone, Default)]
struct Steps(BTreeMap<UnixMillis, u64>);

impl Steps {
    fn at(&self, t: UnixMillis) -> u64 {
        self.0.range(..=t).next_back().map_or(0, |(_, v)| *v)
    }

    fn split(&mut self, t: UnixMillis) {
        let v = self.at(t);
        self.0.entry(t).or_insert(v);
    }

    /// Applies `f` to the values over `[from, until)`.
    fn update(&mut self, from: UnixMillis, until: UnixMillis, f: impl Fn(u64) -> u64) {
        self.split(from);
        self.split(until);
        for v in self.0.range_mut(from..until).map(|(_, v)| v) {
            *v = f(*v);
        }
    }

    /// Where the value may change strictly inside `(from, until)`.
    fn breaks(&self, from: UnixMillis, until: UnixMillis) -> impl Iterator<Item = UnixMillis> + '_ {
        self.0
            .range((Excluded(from), Excluded(until)))
            .map(|(t, _)| *t)
    }

    /// Maximal runs of one value above zero.
    fn runs(&self) -> Vec<(UnixMillis, UnixMillis, u64)> {
        let mut out: Vec<(UnixMillis, UnixMillis, u64)> = Vec::new();
        let keys: Vec<(&UnixMillis, &u64)> = self.0.iter().collect();
        for pair in keys.windows(2) {
            let ((&from, &v), (&until, _)) = (pair[0], pair[1]);
            if v == 0 {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == from && last.2 == v => last.1 = until,
                _ => out.push((from, until, v)),
            }
        }
        out
    }
}

/// Whether `arrangement` holds `needs` from `available` by rules 1 to 4 and 8; the
/// first thing wrong if not (input [`check_input`] refuses included). Written apart from [`arrange`]: it sums directly at every
/// instant where a need, an availability, a contribution or a sub-interval starts or
/// ends, which is where anything can change.
pub fn check(
    needs: &[Need],
    available: &[Availability],
    arrangement: &Arrangement,
) -> Result<(), String> {
    check_input(needs, available).map_err(|e| e.to_string())?;
    if arrangement.needs != needs {
        return Err("the arrangement holds other needs".into());
    }
    for c in &arrangement.contributions {
        let Some(a) = available.iter().find(|a| {
            a.contributor == c.contributor
                && a.resource == c.resource
                && a.from <= c.from
                && c.from < a.until
        }) else {
            return Err(format!(
                "{c:?} starts outside every window of its contributor"
            ));
        };
        let inc = a.increment_ms;
        if c.amount == 0 || c.until <= c.from || c.until > a.until || inc <= 0 {
            return Err(format!("{c:?} is empty or ends past its window {a:?}"));
        }
        if (c.from - a.from) % inc != 0 || (c.until - c.from) % inc != 0 {
            return Err(format!("{c:?} is off the grid of {a:?}"));
        }
        if c.paid_increments != ((c.until - c.from) / inc) as u64 {
            return Err(format!("{c:?} is paid for other than its increments"));
        }
    }
    let subs = &arrangement.sub_intervals;
    for pair in subs.windows(2) {
        if pair[1].from < pair[0].until {
            return Err(format!("sub-intervals out of order at {}", pair[1].from));
        }
        if pair[0].until == pair[1].from && pair[0].resources == pair[1].resources {
            return Err(format!("sub-intervals not maximal at {}", pair[1].from));
        }
    }
    if let Some(s) = subs.iter().find(|s| s.until <= s.from) {
        return Err(format!("an empty sub-interval at {}", s.from));
    }
    let mut instants: BTreeSet<UnixMillis> = BTreeSet::new();
    instants.extend(needs.iter().flat_map(|n| [n.from, n.until]));
    instants.extend(available.iter().flat_map(|a| [a.from, a.until]));
    let contributions = &arrangement.contributions;
    instants.extend(contributions.iter().flat_map(|c| [c.from, c.until]));
    instants.extend(subs.iter().flat_map(|s| [s.from, s.until]));
    for t in instants {
        let open = |from: UnixMillis, until: UnixMillis| from <= t && t < until;
        let mut expected: BTreeMap<String, Provided> = BTreeMap::new();
        for n in needs.iter().filter(|n| open(n.from, n.until)) {
            let p = expected.entry(n.resource.clone()).or_default();
            p.needed = p.needed.saturating_add(n.amount);
        }
        let need_open = !expected.is_empty();
        let mut given: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for c in contributions.iter().filter(|c| open(c.from, c.until)) {
            let p = expected.entry(c.resource.clone()).or_default();
            p.provided = p.provided.saturating_add(c.amount);
            let by = p.by.entry(c.contributor.clone()).or_default();
            *by = by.saturating_add(c.amount);
            let g = given.entry((&c.contributor, &c.resource)).or_default();
            *g = g.saturating_add(c.amount);
        }
        if let Some((r, p)) = expected.iter().find(|(_, p)| p.provided < p.needed) {
            return Err(format!(
                "at {t}, {r} is provided {} of {} needed",
                p.provided, p.needed
            ));
        }
        for ((who, resource), sum) in given {
            let cap: u64 = available
                .iter()
                .filter(|a| a.contributor == who && a.resource == resource && open(a.from, a.until))
                .map(|a| a.amount)
                .sum();
            if sum > cap {
                return Err(format!(
                    "at {t}, {who} gives {sum} of {resource}, above its {cap}"
                ));
            }
        }
        let holding: Vec<&SubInterval> = subs.iter().filter(|s| open(s.from, s.until)).collect();
        match (need_open, holding.as_slice()) {
            (false, []) => {}
            (true, [s]) if s.resources == expected => {}
            _ => {
                return Err(format!(
                    "at {t}, the sub-intervals {holding:?} disagree with {expected:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Rule 9: the least common multiple of `periods_ms`; `None` if there is none, a
/// period is not above zero, or it is longer than a day.
pub fn common_interval(periods_ms: &[i64]) -> Option<i64> {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    if periods_ms.is_empty() || periods_ms.iter().any(|p| *p <= 0) {
        return None;
    }
    periods_ms.iter().try_fold(1i64, |lcm, &p| {
        let lcm = (lcm / gcd(lcm, p)).checked_mul(p)?;
        (lcm <= DAY_MS).then_some(lcm)
    })
}

/// Rule 10: the interval `rule` gives for contributors metered over `periods_ms`.
pub fn interval_for(rule: IntervalRule, periods_ms: &[i64]) -> Result<i64, Refusal> {
    match rule {
        IntervalRule::Common => common_interval(periods_ms).ok_or_else(|| {
            refuse(
                "no_common_interval",
                format!("the increments {periods_ms:?} have no common interval within a day"),
            )
        }),
        IntervalRule::Requested(ms) if ms > 0 && ms <= DAY_MS => Ok(ms),
        IntervalRule::Requested(ms) => Err(refuse(
            "requested_interval",
            format!("a requested interval is above 0 and at most {DAY_MS} ms, not {ms}"),
        )),
        IntervalRule::Fixed(ms) if FIXED_INTERVALS_MS.contains(&ms) => Ok(ms),
        IntervalRule::Fixed(ms) => Err(refuse(
            "fixed_interval",
            format!("a fixed interval is one of {FIXED_INTERVALS_MS:?} ms, not {ms}"),
        )),
    }
}

/// Rule 11: `[from, until)` cut into consecutive intervals of at most `max_len_ms`
/// over each of which contributors of `resource`, each dedicated for the whole
/// interval, give at least `minimum`; each as long as it can be. Refused as
/// [`check_input`] refuses a need of `minimum` over the span, and a longest length not
/// above zero (`interval`).
pub fn dynamic_intervals(
    resource: &str,
    minimum: u64,
    from: UnixMillis,
    until: UnixMillis,
    available: &[Availability],
    max_len_ms: i64,
) -> Result<Vec<(UnixMillis, UnixMillis)>, Refusal> {
    let need = Need {
        resource: resource.to_owned(),
        amount: minimum,
        from,
        until,
    };
    check_input(std::slice::from_ref(&need), available)?;
    if max_len_ms <= 0 {
        return Err(refuse(
            "interval",
            format!("the longest interval must be above 0 ms, not {max_len_ms}"),
        ));
    }
    let windows = usable_windows(available, |r| r == resource);
    let mut out = Vec::new();
    let mut start = from;
    while start < until {
        // Who is open at `start`, longest first: the first few that reach the
        // minimum hold it the longest.
        let mut open: Vec<&Window> = windows
            .iter()
            .filter(|w| w.from <= start && start < w.until)
            .collect();
        open.sort_by_key(|w| Reverse(w.until));
        let mut sum = 0u64;
        let reach = open.iter().find(|w| {
            sum += w.amount;
            sum >= minimum
        });
        match reach {
            Some(w) => {
                let end = w.until.min(until).min(start.saturating_add(max_len_ms));
                out.push((start, end));
                start = end;
            }
            // Nobody more opens before the next window starts.
            None => match windows.iter().map(|w| w.from).filter(|f| *f > start).min() {
                Some(next) => start = next,
                None => break,
            },
        }
    }
    Ok(out)
}

/// Rule 12: what `arrangement` costs under `terms`, and each contributor's share.
pub fn price_bundle(arrangement: &Arrangement, terms: &PriceTerms) -> Result<BundlePrice, Refusal> {
    let too_large = || refuse("too_large", "the bundle's price does not fit in a u64");
    // Minor-unit milliseconds: amount × rate per unit-hour × ms, exact.
    let mut exact: BTreeMap<&str, u128> = BTreeMap::new();
    for c in &arrangement.contributions {
        let rate = terms.rate_per_unit_hour.get(&c.resource).ok_or_else(|| {
            refuse(
                "no_rate",
                format!("no rate per unit-hour for {}", c.resource),
            )
        })?;
        let ms = u128::try_from(c.until.saturating_sub(c.from)).unwrap_or(0);
        let cost = (u128::from(c.amount) * u128::from(*rate))
            .checked_mul(ms)
            .ok_or_else(too_large)?;
        let sum = exact.entry(&c.contributor).or_default();
        *sum = sum.checked_add(cost).ok_or_else(too_large)?;
    }
    let mut price = BundlePrice::default();
    for (who, cost) in exact {
        let share = u64::try_from(cost.div_ceil(HOUR_MS as u128))
            .map_err(|_| too_large())?
            .max(terms.floor_per_contributor);
        price.total = price.total.checked_add(share).ok_or_else(too_large)?;
        price.per_contributor.insert(who.to_owned(), share);
    }
    Ok(price)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIN: i64 = 60_000;

    fn at(h: i64, m: i64) -> UnixMillis {
        h * HOUR_MS + m * MIN
    }

    fn avail(who: &str, amount: u64, from: i64, until: i64, inc_min: i64) -> Availability {
        Availability {
            contributor: who.into(),
            resource: "mem".into(),
            amount,
            from,
            until,
            increment_ms: inc_min * MIN,
        }
    }

    fn need(amount: u64, from: i64, until: i64) -> Need {
        Need {
            resource: "mem".into(),
            amount,
            from,
            until,
        }
    }

    /// The arrangement, checked.
    fn arranged(needs: &[Need], available: &[Availability]) -> Arrangement {
        let a = arrange(needs, available).expect("arranged");
        check(needs, available, &a).expect("the arrangement passes the check");
        a
    }

    /// (contributor, amount, from, until, paid) of each contribution.
    fn given(a: &Arrangement) -> Vec<(&str, u64, i64, i64, u64)> {
        a.contributions
            .iter()
            .map(|c| {
                (
                    c.contributor.as_str(),
                    c.amount,
                    c.from,
                    c.until,
                    c.paid_increments,
                )
            })
            .collect()
    }

    /// A case's name, its input and the rule it is refused by.
    type Case = (
        &'static str,
        Vec<Need>,
        Vec<Availability>,
        Option<&'static str>,
    );

    #[test]
    fn input_is_refused_by_rule() {
        let ok_need = need(1, 0, 10);
        let ok = avail("a", 1, 0, 10, 1);
        let cases: Vec<Case> = vec![
            ("well formed", vec![ok_need.clone()], vec![ok.clone()], None),
            (
                "an empty need",
                vec![need(1, 5, 5)],
                vec![],
                Some("interval"),
            ),
            (
                "a span past i64",
                vec![need(1, i64::MIN, i64::MAX)],
                vec![],
                Some("interval"),
            ),
            (
                "a need of nothing",
                vec![need(0, 0, 10)],
                vec![],
                Some("amount"),
            ),
            (
                "an empty window",
                vec![],
                vec![avail("a", 1, 9, 3, 1)],
                Some("interval"),
            ),
            (
                "a window of nothing",
                vec![],
                vec![avail("a", 0, 0, 9, 1)],
                Some("amount"),
            ),
            (
                "no increment",
                vec![],
                vec![avail("a", 1, 0, 9, 0)],
                Some("increment"),
            ),
            (
                "overlapping windows",
                vec![],
                vec![
                    avail("a", 1, 0, at(1, 0), 1),
                    avail("a", 1, at(0, 59), at(2, 0), 1),
                ],
                Some("overlap"),
            ),
            (
                "touching windows",
                vec![],
                vec![
                    avail("a", 1, 0, at(1, 0), 1),
                    avail("a", 1, at(1, 0), at(2, 0), 1),
                ],
                None,
            ),
            (
                "other contributors overlap",
                vec![],
                vec![avail("a", 1, 0, at(1, 0), 1), avail("b", 1, 0, at(1, 0), 1)],
                None,
            ),
            (
                "amounts past u64",
                vec![],
                vec![avail("a", u64::MAX, 0, 9, 1), avail("b", 1, 0, 9, 1)],
                Some("too_large"),
            ),
        ];
        for (name, needs, available, rule) in cases {
            assert_eq!(
                check_input(&needs, &available).err().map(|e| e.rule),
                rule,
                "{name}"
            );
            if let Some(rule) = rule {
                match arrange(&needs, &available) {
                    Err(Unarranged::Refused(r)) => assert_eq!(r.rule, rule, "{name}"),
                    other => panic!("{name}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_contribution_is_whole_increments_of_its_own_grid() {
        // Grid 2:00, 2:45, 3:30, ...: a need of 3:00-3:20 dedicates 2:45-3:30, paid as
        // one increment, though the window opened at 2:00.
        let a = arranged(
            &[need(2, at(3, 0), at(3, 20))],
            &[avail("a", 5, at(2, 0), at(5, 0), 45)],
        );
        assert_eq!(given(&a), [("a", 2, at(2, 45), at(3, 30), 1)]);
        // Across a grid point: two increments.
        let a = arranged(
            &[need(2, at(3, 0), at(3, 40))],
            &[avail("a", 5, at(2, 0), at(5, 0), 45)],
        );
        assert_eq!(given(&a), [("a", 2, at(2, 45), at(4, 15), 2)]);
    }

    #[test]
    fn the_last_part_of_a_window_shorter_than_an_increment_is_not_given() {
        let available = [avail("a", 5, at(2, 0), at(2, 50), 30)];
        let short = arrange(&[need(1, at(2, 40), at(2, 50))], &available);
        assert_eq!(
            short,
            Err(Unarranged::Short(vec![Shortfall {
                resource: "mem".into(),
                from: at(2, 40),
                until: at(2, 50),
                needed: 1,
                available: 0,
            }]))
        );
        let a = arranged(&[need(1, at(2, 10), at(2, 20))], &available);
        assert_eq!(given(&a), [("a", 1, at(2, 0), at(2, 30), 1)]);
    }

    #[test]
    fn part_of_an_amount_is_given_and_only_what_is_missing() {
        // Neither suffices alone; b gives the 8 that a's 4 leave of the 12, not its
        // whole 10.
        let a = arranged(
            &[need(12, 0, at(1, 0))],
            &[
                avail("a", 4, 0, at(1, 0), 60),
                avail("b", 10, 0, at(1, 0), 1),
            ],
        );
        assert_eq!(
            given(&a),
            [("a", 4, 0, at(1, 0), 1), ("b", 8, 0, at(1, 0), 60)]
        );
    }

    #[test]
    fn the_need_steps_and_a_window_follows_it() {
        // 3 then 5: the fine-grained b gives 3, then 5, as two contributions.
        let needs = [need(3, 0, at(0, 30)), need(2, at(0, 20), at(0, 30))];
        let a = arranged(&needs, &[avail("b", 9, 0, at(1, 0), 10)]);
        assert_eq!(
            given(&a),
            [("b", 3, 0, at(0, 20), 2), ("b", 5, at(0, 20), at(0, 30), 1)]
        );
        assert_eq!(a.sub_intervals.len(), 2);
        assert_eq!(a.sub_intervals[1].resources["mem"].needed, 5);
    }

    #[test]
    fn ties_go_to_the_lower_name_and_rounding_out_is_left_to_the_coarse() {
        let a = arranged(
            &[need(2, 0, at(1, 0))],
            &[avail("z", 2, 0, at(1, 0), 1), avail("y", 2, 0, at(1, 0), 1)],
        );
        assert_eq!(a.contributors(), ["y"].into());
        // Both are needed. The hourly c cannot give exactly (its hour reaches past the
        // need), so the fine d gives its all first and c rounds out the last unit.
        let a = arranged(
            &[need(4, 0, at(0, 30))],
            &[
                avail("d", 3, 0, at(1, 0), 1),
                avail("c", 3, 0, at(1, 0), 60),
            ],
        );
        assert_eq!(
            given(&a),
            [("c", 1, 0, at(1, 0), 1), ("d", 3, 0, at(0, 30), 30)]
        );
    }

    #[test]
    fn a_contributor_chosen_first_is_dropped_when_the_rest_suffice() {
        // b covers most of the need and is chosen first; a and c are needed anyway at
        // the ends and together cover the middle, so b goes.
        let available = [
            avail("a", 1, 0, at(0, 40), 10),
            avail("b", 2, at(0, 10), at(0, 50), 10),
            avail("c", 1, at(0, 10), at(1, 0), 10),
        ];
        let a = arranged(
            &[need(1, 0, at(1, 0)), need(1, at(0, 10), at(0, 40))],
            &available,
        );
        assert_eq!(a.contributors(), ["a", "c"].into());
    }

    /// What breaks a good arrangement.
    type Breaks = fn(&mut Arrangement);

    #[test]
    fn the_checker_finds_what_is_wrong() {
        let needs = [need(2, 0, at(1, 0))];
        let available = [avail("a", 3, 0, at(2, 0), 30)];
        let good = arranged(&needs, &available);
        let broken: Vec<(&str, Breaks)> = vec![
            ("short", |a| a.contributions[0].amount = 1),
            ("above capacity", |a| a.contributions[0].amount = 4),
            ("off the grid", |a| a.contributions[0].from = 1),
            ("not paid right", |a| a.contributions[0].paid_increments = 1),
            ("past the window", |a| a.contributions[0].until = at(2, 30)),
            ("someone else", |a| {
                a.contributions[0].contributor = "b".into()
            }),
            ("doubled", |a| {
                a.contributions.push(a.contributions[0].clone())
            }),
            ("no sub-interval", |a| a.sub_intervals.clear()),
            ("other needs", |a| a.needs.clear()),
            ("a sub-interval cut", |a| {
                let mut s = a.sub_intervals[0].clone();
                a.sub_intervals[0].until = at(0, 30);
                s.from = at(0, 30);
                a.sub_intervals.push(s);
            }),
        ];
        for (name, breaks) in broken {
            let mut a = good.clone();
            breaks(&mut a);
            assert!(check(&needs, &available, &a).is_err(), "{name}: {a:?}");
        }
    }

    #[test]
    fn common_interval_table() {
        let m = MIN;
        let cases: [(&[i64], Option<i64>); 7] = [
            (&[20 * m, 45 * m, m], Some(180 * m)),
            (&[30 * m, 60 * m], Some(60 * m)),
            (&[7 * HOUR_MS, 5 * HOUR_MS], None),
            (&[DAY_MS], Some(DAY_MS)),
            (&[], None),
            (&[30 * m, 0], None),
            (&[i64::MAX, i64::MAX - 1], None),
        ];
        for (periods, want) in cases {
            assert_eq!(common_interval(periods), want, "{periods:?}");
        }
    }

    #[test]
    fn interval_rule_table() {
        let periods = [20 * MIN, 30 * MIN];
        let cases = [
            (IntervalRule::Common, &periods[..], Ok(60 * MIN)),
            (
                IntervalRule::Common,
                &[7 * HOUR_MS, 5 * HOUR_MS][..],
                Err("no_common_interval"),
            ),
            (
                IntervalRule::Requested(90 * MIN),
                &periods[..],
                Ok(90 * MIN),
            ),
            (
                IntervalRule::Requested(0),
                &periods[..],
                Err("requested_interval"),
            ),
            (
                IntervalRule::Requested(DAY_MS + 1),
                &periods[..],
                Err("requested_interval"),
            ),
            (
                IntervalRule::Fixed(12 * HOUR_MS),
                &periods[..],
                Ok(12 * HOUR_MS),
            ),
            (
                IntervalRule::Fixed(3 * HOUR_MS),
                &periods[..],
                Err("fixed_interval"),
            ),
            (IntervalRule::default(), &[][..], Ok(HOUR_MS)),
        ];
        for (rule, periods, want) in cases {
            assert_eq!(
                interval_for(rule, periods).map_err(|e| e.rule),
                want,
                "{rule:?}"
            );
        }
    }

    fn contribution(who: &str, resource: &str, amount: u64, minutes: i64) -> Contribution {
        Contribution {
            contributor: who.into(),
            resource: resource.into(),
            amount,
            from: 0,
            until: minutes * MIN,
            paid_increments: 1,
        }
    }

    fn priced(contributions: Vec<Contribution>, floor: u64) -> Result<BundlePrice, &'static str> {
        let terms = PriceTerms {
            rate_per_unit_hour: [("mem".to_owned(), 10), ("cpu".to_owned(), 7)].into(),
            floor_per_contributor: floor,
        };
        let a = Arrangement {
            needs: vec![],
            contributions,
            sub_intervals: vec![],
        };
        price_bundle(&a, &terms).map_err(|e| e.rule)
    }

    #[test]
    fn price_table() {
        let shares = |p: BundlePrice| (p.total, p.per_contributor.into_iter().collect::<Vec<_>>());
        // 6 GB for 20 min at 10 per GB-hour: 20.
        assert_eq!(
            priced(vec![contribution("a", "mem", 6, 20)], 0).map(shares),
            Ok((20, vec![("a".into(), 20)]))
        );
        // 1 core for 10 min at 7: 7/6, rounded up once over both contributions
        // (7/6 + 7/6 = 14/6 → 3, not 2 + 2).
        assert_eq!(
            priced(
                vec![
                    contribution("b", "cpu", 1, 10),
                    contribution("b", "cpu", 1, 10)
                ],
                0
            )
            .map(shares),
            Ok((3, vec![("b".into(), 3)]))
        );
        // The floor lifts a small share.
        assert_eq!(
            priced(
                vec![
                    contribution("a", "mem", 6, 20),
                    contribution("b", "cpu", 1, 60)
                ],
                15
            )
            .map(shares),
            Ok((35, vec![("a".into(), 20), ("b".into(), 15)]))
        );
        assert_eq!(
            priced(vec![contribution("a", "gpu", 1, 60)], 0),
            Err("no_rate")
        );
        assert_eq!(
            priced(vec![contribution("a", "mem", u64::MAX, 60)], 0),
            Err("too_large")
        );
    }

    proptest! {
        /// The shares add up to the total, none is below the floor, and rounding up
        /// adds less than one minor unit per contributor above the floor.
        #[test]
        fn shares_add_up_to_the_total(
            items in proptest::collection::vec((0usize..4, 1u64..1_000, 1i64..600, 0usize..2), 0..12),
            floor in 0u64..500,
        ) {
            let names = ["a", "b", "c", "d"];
            let contributions: Vec<Contribution> = items
                .iter()
                .map(|&(w, amount, min, r)| contribution(names[w], ["mem", "cpu"][r], amount, min))
                .collect();
            let p = priced(contributions.clone(), floor).unwrap();
            prop_assert_eq!(p.per_contributor.values().sum::<u64>(), p.total);
            for (who, share) in &p.per_contributor {
                let exact: u128 = contributions
                    .iter()
                    .filter(|c| &c.contributor == who)
                    .map(|c| u128::from(c.amount) * [10u128, 7][usize::from(c.resource == "cpu")] * c.until as u128)
                    .sum();
                let share = u128::from(*share);
                prop_assert!(share >= u128::from(floor));
                prop_assert!(share * HOUR_MS as u128 >= exact);
                prop_assert!(share == u128::from(floor) || share * (HOUR_MS as u128) < exact + HOUR_MS as u128);
            }
        }

        /// The common interval is a whole number of every period, and no shorter
        /// multiple of the first period is.
        #[test]
        fn the_common_interval_is_the_least_common_multiple(
            periods in proptest::collection::vec(1i64..=120, 1..5),
        ) {
            let periods: Vec<i64> = periods.iter().map(|p| p * MIN).collect();
            match common_interval(&periods) {
                Some(c) => {
                    prop_assert!(periods.iter().all(|p| c % p == 0));
                    let mut m = periods[0];
                    while m < c {
                        prop_assert!(periods.iter().any(|p| m % p != 0), "{m} is common");
                        m += periods[0];
                    }
                }
                None => {
                    let exact = periods.iter().fold(1i128, |l, &p| {
                        let (mut a, mut b) = (l, i128::from(p));
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        l / a * i128::from(p)
                    });
                    prop_assert!(exact > i128::from(DAY_MS));
                }
            }
        }
    }
}
