//! What a sold bundle's contributors actually provide, minute by minute, and the
//! failover when a contributor needs its capacity back (issue 18, C10, [0064]).
//!
//! # Rules ([`provide`])
//!
//! A contributor's own use comes first. In each whole minute judged, each contributor
//! keeps of what the arrangement plans for it only what its limit leaves beside its
//! own use that minute (`room` = limit − own use, never below 0; none outside the
//! subscriber's availability). When what the
//! contributors keep falls below what the accepting clouds bought (`sold`), the
//! broker substitutes the spare room of the resource's other subscribers (and of
//! contributors with room beyond their plan): the most spare first, a tie to the name
//! first in order, each taking at most its spare. What is still missing is the
//! minute's shortfall, reported to the accepting clouds; consecutive minutes short by
//! the same amount are one [`Gap`].
//!
//! A settlement pays by what each provided ([`Provision::held`]): the units it kept
//! or substituted, a minute each.
//!
//! # Invariants (property tests)
//!
//! Brokerage never takes a subscriber past its limit: in every minute, what it
//! provides plus its own use is at most its limit, or is only its own use when that
//! alone is over. What is provided plus what is short covers what was sold. A
//! contributor that keeps room for its whole plan is never cut.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;

use crate::exchange::MINUTE_MS;
use crate::stagger::Arrangement;

/// One minute's provision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MinuteProvision {
    /// Start of the minute.
    pub minute_ms: UnixMillis,
    /// Units each contributor kept of its plan.
    pub kept: BTreeMap<String, u64>,
    /// Units each substitute provided in place of what was taken back.
    pub substituted: BTreeMap<String, u64>,
    /// Units missing of what was sold.
    pub short: u64,
}

/// Consecutive minutes short by the same amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Gap {
    /// Start.
    pub from: UnixMillis,
    /// End (exclusive).
    pub until: UnixMillis,
    /// Units missing at every instant of it.
    pub missing: u64,
}

/// What was provided over the minutes judged.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Provision {
    /// Each minute, in order.
    pub minutes: Vec<MinuteProvision>,
    /// The minutes short, merged.
    pub gaps: Vec<Gap>,
}

impl Provision {
    /// Unit-milliseconds each subscriber provided (kept and substituted), in order of
    /// name: what a settlement splits the payment by.
    pub fn held(&self) -> Vec<(String, u128)> {
        let mut by: BTreeMap<&str, u128> = BTreeMap::new();
        for m in &self.minutes {
            for (who, units) in m.kept.iter().chain(&m.substituted) {
                *by.entry(who).or_default() += u128::from(*units) * MINUTE_MS as u128;
            }
        }
        by.into_iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }
}

/// What [`provide`] judges.
#[derive(Debug, Clone, Copy)]
pub struct ProvisionInput<'a> {
    /// The bundle's arrangement.
    pub arrangement: &'a Arrangement,
    /// Units the accepting clouds bought.
    pub sold: u64,
    /// First minute judged (on the minute grid).
    pub from: UnixMillis,
    /// End of the minutes judged (exclusive).
    pub until: UnixMillis,
    /// Every subscriber of the bundle's resource, with its limit in units.
    pub limits: &'a BTreeMap<String, u64>,
}

/// Judges the whole minutes of `[from, until)`: `own_use(user, minute)` is the units
/// the user used itself in the minute; `lends(user, minute)` whether the minute is
/// inside the user's availability (outside it, it has no room to give).
pub fn provide(
    input: ProvisionInput<'_>,
    own_use: impl Fn(&str, UnixMillis) -> u64,
    lends: impl Fn(&str, UnixMillis) -> bool,
) -> Provision {
    let mut out = Provision::default();
    let first = input.from.div_euclid(MINUTE_MS) * MINUTE_MS;
    let mut minute = first;
    while minute + MINUTE_MS <= input.until {
        let mut planned: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &input.arrangement.contributions {
            if c.from <= minute && minute < c.until {
                *planned.entry(&c.contributor).or_default() += c.amount;
            }
        }
        let room = |who: &str| -> u64 {
            if !lends(who, minute) {
                return 0;
            }
            input
                .limits
                .get(who)
                .copied()
                .unwrap_or(0)
                .saturating_sub(own_use(who, minute))
        };
        let kept: BTreeMap<String, u64> = planned
            .iter()
            .map(|(who, plan)| ((*who).to_owned(), (*plan).min(room(who))))
            .collect();
        let have: u64 = kept.values().sum();
        let mut deficit = input.sold.saturating_sub(have);
        let mut substituted = BTreeMap::new();
        if deficit > 0 {
            let mut spare: Vec<(u64, &str)> = input
                .limits
                .keys()
                .map(|who| {
                    let k = kept.get(who.as_str()).copied().unwrap_or(0);
                    (room(who).saturating_sub(k), who.as_str())
                })
                .filter(|(s, _)| *s > 0)
                .collect();
            spare.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
            for (s, who) in spare {
                if deficit == 0 {
                    break;
                }
                let take = s.min(deficit);
                substituted.insert(who.to_owned(), take);
                deficit -= take;
            }
        }
        out.minutes.push(MinuteProvision {
            minute_ms: minute,
            kept,
            substituted,
            short: deficit,
        });
        match out.gaps.last_mut() {
            Some(g) if deficit > 0 && g.until == minute && g.missing == deficit => {
                g.until = minute + MINUTE_MS;
            }
            _ if deficit > 0 => out.gaps.push(Gap {
                from: minute,
                until: minute + MINUTE_MS,
                missing: deficit,
            }),
            _ => {}
        }
        minute += MINUTE_MS;
    }
    out
}

/// Splits a minute's shortfall between the accepting clouds that took `taken` units
/// each, in the order they were placed: the first absorbs it first, up to what it
/// took.
pub fn split_short(short: u64, taken: &[u64]) -> Vec<u64> {
    let mut left = short;
    taken
        .iter()
        .map(|t| {
            let part = left.min(*t);
            left -= part;
            part
        })
        .collect()
}

/// What the cloud placed `index`-th, which took `taken[index]` units for `price`,
/// pays for the minutes `p` judged: the price pro rata to the unit-minutes it was
/// given of those it bought, rounded down. Nothing judged, nothing paid.
pub fn payable(price: u64, index: usize, taken: &[u64], p: &Provision) -> u64 {
    let bought = u128::from(taken.get(index).copied().unwrap_or(0)) * p.minutes.len() as u128;
    if bought == 0 {
        return 0;
    }
    let missed: u128 = p
        .minutes
        .iter()
        .map(|m| u128::from(split_short(m.short, taken)[index]))
        .sum();
    let given = bought - missed.min(bought);
    u64::try_from(u128::from(price) * given / bought).expect("at most the price")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stagger::Contribution;
    use proptest::prelude::*;

    const M: i64 = MINUTE_MS;

    fn plan(parts: &[(&str, u64, i64, i64)]) -> Arrangement {
        Arrangement {
            needs: Vec::new(),
            contributions: parts
                .iter()
                .map(|(who, amount, from, until)| Contribution {
                    contributor: (*who).into(),
                    resource: "os_instances".into(),
                    amount: *amount,
                    from: from * M,
                    until: until * M,
                    paid_increments: 1,
                })
                .collect(),
            sub_intervals: Vec::new(),
        }
    }

    fn limits(l: &[(&str, u64)]) -> BTreeMap<String, u64> {
        l.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn what_the_plan_holds_is_provided_while_nobody_needs_it_back() {
        let a = plan(&[("alice", 1, 0, 2), ("bob", 1, 0, 2)]);
        let l = limits(&[("alice", 3), ("bob", 2)]);
        let p = provide(
            ProvisionInput {
                arrangement: &a,
                sold: 2,
                from: 0,
                until: 2 * M,
                limits: &l,
            },
            |_, _| 1,
            |_, _| true,
        );
        assert!(p.gaps.is_empty());
        assert!(p.minutes.iter().all(|m| m.substituted.is_empty()));
        assert_eq!(
            p.held(),
            vec![
                ("alice".into(), 2 * M as u128),
                ("bob".into(), 2 * M as u128)
            ]
        );
    }

    #[test]
    fn a_contributor_takes_back_what_it_needs_and_another_stands_in() {
        // Alice's own use rises to her limit in the second minute; Bob, who plans 1 of
        // his 2 spare, stands in with the other; Carol, idle, is not needed.
        let a = plan(&[("alice", 1, 0, 3), ("bob", 1, 0, 3)]);
        let l = limits(&[("alice", 3), ("bob", 2), ("carol", 1)]);
        let own = |who: &str, minute: i64| match (who, minute / M) {
            ("alice", 0) => 1,
            ("alice", _) => 3,
            _ => 0,
        };
        let p = provide(
            ProvisionInput {
                arrangement: &a,
                sold: 2,
                from: 0,
                until: 3 * M,
                limits: &l,
            },
            own,
            |_, _| true,
        );
        assert_eq!(p.minutes[1].kept["alice"], 0);
        assert_eq!(
            p.minutes[1].substituted,
            [("bob".to_owned(), 1)].into_iter().collect()
        );
        assert!(p.gaps.is_empty());
        assert_eq!(
            p.held(),
            vec![("alice".into(), M as u128), ("bob".into(), 5 * M as u128)]
        );
    }

    #[test]
    fn what_nobody_can_stand_in_for_is_a_gap() {
        let a = plan(&[("alice", 2, 0, 4)]);
        let l = limits(&[("alice", 2), ("bob", 1)]);
        // Alice needs everything in minutes 1 and 2; Bob can stand in for one unit.
        let own = |who: &str, minute: i64| match (who, minute / M) {
            ("alice", 1 | 2) => 2,
            _ => 0,
        };
        let p = provide(
            ProvisionInput {
                arrangement: &a,
                sold: 2,
                from: 0,
                until: 4 * M,
                limits: &l,
            },
            own,
            |_, _| true,
        );
        assert_eq!(
            p.gaps,
            vec![Gap {
                from: M,
                until: 3 * M,
                missing: 1
            }]
        );
        // Only whole minutes up to `until` are judged.
        let partial = provide(
            ProvisionInput {
                arrangement: &a,
                sold: 2,
                from: 0,
                until: 2 * M + 59_999,
                limits: &l,
            },
            own,
            |_, _| true,
        );
        assert_eq!(partial.minutes.len(), 2);
        // Bob lends only in minute 2: minute 1 is short by both.
        let p = provide(
            ProvisionInput {
                arrangement: &a,
                sold: 2,
                from: 0,
                until: 4 * M,
                limits: &l,
            },
            own,
            |who, minute| who != "bob" || minute == 2 * M,
        );
        assert_eq!(
            p.gaps,
            vec![
                Gap {
                    from: M,
                    until: 2 * M,
                    missing: 2
                },
                Gap {
                    from: 2 * M,
                    until: 3 * M,
                    missing: 1
                },
            ]
        );
    }

    #[test]
    fn a_shortfall_falls_on_the_first_placed_first_and_is_not_paid_for() {
        assert_eq!(split_short(3, &[2, 4]), vec![2, 1]);
        assert_eq!(split_short(0, &[2, 4]), vec![0, 0]);
        assert_eq!(split_short(9, &[2, 4]), vec![2, 4]);
        let minute = |short| MinuteProvision {
            minute_ms: 0,
            kept: BTreeMap::new(),
            substituted: BTreeMap::new(),
            short,
        };
        // Four minutes, one of them 1 unit short: the first cloud (2 units) got 7 of
        // its 8 unit-minutes, the second all of its.
        let p = Provision {
            minutes: vec![minute(0), minute(1), minute(0), minute(0)],
            gaps: Vec::new(),
        };
        assert_eq!(payable(800, 0, &[2, 4], &p), 700);
        assert_eq!(payable(1600, 1, &[2, 4], &p), 1600);
        assert_eq!(payable(800, 0, &[2, 4], &Provision::default()), 0);
    }

    proptest! {
        #[test]
        fn what_is_paid_is_never_more_than_the_price(
            price in 0u64..1_000_000, taken in proptest::collection::vec(0u64..5, 1..4),
            shorts in proptest::collection::vec(0u64..10, 0..10),
        ) {
            let p = Provision {
                minutes: shorts.iter().map(|s| MinuteProvision {
                    minute_ms: 0, kept: BTreeMap::new(), substituted: BTreeMap::new(), short: *s,
                }).collect(),
                gaps: Vec::new(),
            };
            for i in 0..taken.len() {
                prop_assert!(payable(price, i, &taken, &p) <= price);
            }
            for s in &shorts {
                let parts = split_short(*s, &taken);
                prop_assert_eq!(parts.iter().sum::<u64>(), (*s).min(taken.iter().sum()));
            }
        }

        #[test]
        fn nobody_is_taken_past_its_limit_and_what_was_sold_is_covered(
            parts in proptest::collection::vec((0usize..4, 1u64..4, 0i64..6, 1i64..6), 1..6),
            lims in proptest::collection::vec(0u64..6, 4),
            uses in proptest::collection::vec(0u64..8, 24),
            sold in 0u64..8,
        ) {
            let names = ["a", "b", "c", "d"];
            let parts: Vec<(&str, u64, i64, i64)> = parts
                .into_iter()
                .map(|(w, amount, from, len)| (names[w], amount, from, from + len))
                .collect();
            let a = plan(&parts);
            let l: BTreeMap<String, u64> =
                names.iter().zip(&lims).map(|(n, v)| ((*n).to_owned(), *v)).collect();
            let own = |who: &str, minute: i64| {
                let i = names.iter().position(|n| *n == who).unwrap();
                uses[i * 6 + (minute / M) as usize % 6]
            };
            let p = provide(
                ProvisionInput { arrangement: &a, sold, from: 0, until: 6 * M, limits: &l },
                own,
                |_, _| true,
            );
            prop_assert_eq!(p.minutes.len(), 6);
            for m in &p.minutes {
                let mut total = 0;
                for who in names {
                    let given = m.kept.get(who).copied().unwrap_or(0)
                        + m.substituted.get(who).copied().unwrap_or(0);
                    total += given;
                    let used = own(who, m.minute_ms);
                    if given > 0 {
                        prop_assert!(given + used <= l[who], "{} given {} beside {} of {}", who, given, used, l[who]);
                    }
                }
                prop_assert!(total + m.short >= sold, "sold {} but {} given and {} short", sold, total, m.short);
                if m.short > 0 {
                    prop_assert_eq!(total + m.short, sold, "short only by what is missing");
                }
                for c in &a.contributions {
                    let planned: u64 = a.contributions.iter()
                        .filter(|x| x.contributor == c.contributor && x.from <= m.minute_ms && m.minute_ms < x.until)
                        .map(|x| x.amount).sum();
                    if l[&c.contributor].saturating_sub(own(&c.contributor, m.minute_ms)) >= planned {
                        prop_assert_eq!(m.kept.get(c.contributor.as_str()).copied().unwrap_or(0), planned);
                    }
                }
            }
        }
    }
}
