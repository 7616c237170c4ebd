//! What a listing is and where it stands (C2, C3): the size category a host's
//! measurements put it in, and the rank of listings a client is shown.
//!
//! Pure: measurements, prices and weights go in; nothing here reads storage or the
//! clock. A category is decided from what was *measured* only (cores, memory, the
//! composite benchmark score), never from what a provider claims, so that primary and
//! third-party capacity in one category compare like with like.

use serde::{Deserialize, Serialize};

/// One size category: a host is in it when it meets every threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Category {
    /// `small`, `medium`, ... (lowercase letters, digits and `-`).
    pub name: String,
    /// Least logical CPUs.
    pub min_cores: u32,
    /// Least memory, bytes.
    pub min_memory_bytes: u64,
    /// Least composite benchmark score (the geometric mean of the suite's scores, 1.0
    /// being the reference machine).
    pub min_score: f64,
}

/// What the category of a host is decided from: its measurements.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Measured {
    /// Logical CPUs in the inventory.
    pub cores: u32,
    /// Memory in the inventory, bytes.
    pub memory_bytes: u64,
    /// The benchmark run's composite score.
    pub score: f64,
}

/// Why a set of categories was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CategoriesError {
    /// No category at all.
    #[error("categories: at least one is needed")]
    Empty,
    /// A name that is not lowercase letters, digits and `-` (1 to 32 of them).
    #[error("categories[{index}].name: {name:?} is not 1 to 32 lowercase letters, digits or '-'")]
    Name {
        /// Position in the list.
        index: usize,
        /// The name.
        name: String,
    },
    /// The same name twice.
    #[error("categories[{index}].name: {name:?} is given twice")]
    Duplicate {
        /// Position of the second one.
        index: usize,
        /// The name.
        name: String,
    },
    /// A threshold that is not a finite number of at least 0.
    #[error("categories[{index}].min_score: {value} is not a finite number of at least 0")]
    Score {
        /// Position in the list.
        index: usize,
        /// The value.
        value: f64,
    },
    /// A category that does not ask at least as much as the one before it in every
    /// threshold and more in one: categories go from smallest to largest.
    #[error(
        "categories[{index}] ({name}): every threshold must be at least the previous category's, and one above it (smallest first)"
    )]
    NotIncreasing {
        /// Position in the list.
        index: usize,
        /// The name.
        name: String,
    },
}

/// The size categories, smallest first; shared by primary and third-party capacity.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Categories {
    list: Vec<Category>,
}

const GIB: u64 = 1 << 30;

impl Categories {
    /// Categories from smallest to largest; refused with the first problem found.
    pub fn new(list: Vec<Category>) -> Result<Self, CategoriesError> {
        if list.is_empty() {
            return Err(CategoriesError::Empty);
        }
        for (index, c) in list.iter().enumerate() {
            let valid_name = (1..=32).contains(&c.name.len())
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid_name {
                return Err(CategoriesError::Name {
                    index,
                    name: c.name.clone(),
                });
            }
            if list[..index].iter().any(|p| p.name == c.name) {
                return Err(CategoriesError::Duplicate {
                    index,
                    name: c.name.clone(),
                });
            }
            if !(c.min_score.is_finite() && c.min_score >= 0.0) {
                return Err(CategoriesError::Score {
                    index,
                    value: c.min_score,
                });
            }
            if let Some(p) = index.checked_sub(1).map(|i| &list[i]) {
                let at_least = c.min_cores >= p.min_cores
                    && c.min_memory_bytes >= p.min_memory_bytes
                    && c.min_score >= p.min_score;
                let above = c.min_cores > p.min_cores
                    || c.min_memory_bytes > p.min_memory_bytes
                    || c.min_score > p.min_score;
                if !(at_least && above) {
                    return Err(CategoriesError::NotIncreasing {
                        index,
                        name: c.name.clone(),
                    });
                }
            }
        }
        Ok(Self { list })
    }

    /// The categories a new marketplace starts with.
    pub fn standard() -> Self {
        let c = |name: &str, min_cores, memory_gib, min_score| Category {
            name: name.into(),
            min_cores,
            min_memory_bytes: memory_gib * GIB,
            min_score,
        };
        Self::new(vec![
            c("small", 1, 1, 0.0),
            c("medium", 4, 8, 0.5),
            c("large", 16, 32, 1.0),
            c("xlarge", 64, 128, 2.0),
        ])
        .expect("the standard categories are valid")
    }

    /// Every category, smallest first.
    pub fn list(&self) -> &[Category] {
        &self.list
    }

    /// The largest category whose every threshold `measured` meets; `None` below the
    /// smallest. Because thresholds only grow from one category to the next, meeting a
    /// category's thresholds means meeting every smaller one's.
    pub fn classify(&self, measured: &Measured) -> Option<&Category> {
        self.list.iter().rev().find(|c| {
            measured.cores >= c.min_cores
                && measured.memory_bytes >= c.min_memory_bytes
                && measured.score >= c.min_score
        })
    }
}

impl<'de> Deserialize<'de> for Categories {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            list: Vec<Category>,
        }
        let raw = Raw::deserialize(d)?;
        Categories::new(raw.list).map_err(serde::de::Error::custom)
    }
}

/// What a listing's rank is computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RankInput {
    /// The listing.
    pub id: String,
    /// Its price per hour in minor units of the currency (all candidates compared are
    /// in one currency).
    pub price: u64,
    /// Its host's composite benchmark score.
    pub score: f64,
    /// Measured uptime over the rating window, 0 to 1; `None` before any.
    pub uptime: Option<f64>,
    /// The average client rating over the window, 1 to 5; `None` before any.
    pub rating: Option<f64>,
    /// Its last re-test failed (but not so seriously that it was delisted).
    pub failed_retest: bool,
}

/// How much each part counts in a listing's rank. Defaults: price 0.35, performance
/// 0.30, uptime 0.20, rating 0.15; a failed re-test halves the rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RankWeights {
    /// The cheapest candidate's price divided by this one's.
    pub price: f64,
    /// This score divided by the best candidate's.
    pub performance: f64,
    /// Measured uptime (0.5 before any was measured).
    pub uptime: f64,
    /// (rating - 1) / 4 (0.5 before any rating).
    pub rating: f64,
    /// The factor the rank of a listing whose last re-test failed is multiplied by.
    pub failed_retest_factor: f64,
}

impl Default for RankWeights {
    fn default() -> Self {
        Self {
            price: 0.35,
            performance: 0.30,
            uptime: 0.20,
            rating: 0.15,
            failed_retest_factor: 0.5,
        }
    }
}

/// One ranked listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ranked {
    /// The listing.
    pub id: String,
    /// Its rank score, 0 to 1 with weights that sum to 1.
    pub rank: f64,
}

/// What an unknown uptime or rating counts as: the middle, neither rewarded nor
/// punished, so a new listing is not buried under old ones nor put above them.
const UNKNOWN: f64 = 0.5;

/// The candidates in the order a client sees them: highest rank first; then the lower
/// price, then the lower id. Each part is normalised among the candidates (the
/// cheapest price and the best score count 1), weighted, and summed; a failed re-test
/// multiplies the sum by `failed_retest_factor`.
pub fn rank(candidates: &[RankInput], weights: &RankWeights) -> Vec<Ranked> {
    let cheapest = candidates.iter().map(|c| c.price).min().unwrap_or(0);
    let best = candidates
        .iter()
        .map(|c| c.score)
        .filter(|s| s.is_finite())
        .fold(0.0_f64, f64::max);
    let mut out: Vec<(Ranked, u64)> = candidates
        .iter()
        .map(|c| {
            let price = match c.price {
                0 => 1.0,
                p => cheapest as f64 / p as f64,
            };
            let performance = if best > 0.0 && c.score.is_finite() {
                (c.score / best).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let uptime = c.uptime.map_or(UNKNOWN, |u| u.clamp(0.0, 1.0));
            let rating = c
                .rating
                .map_or(UNKNOWN, |r| ((r - 1.0) / 4.0).clamp(0.0, 1.0));
            let mut rank = weights.price * price
                + weights.performance * performance
                + weights.uptime * uptime
                + weights.rating * rating;
            if c.failed_retest {
                rank *= weights.failed_retest_factor;
            }
            (
                Ranked {
                    id: c.id.clone(),
                    rank,
                },
                c.price,
            )
        })
        .collect();
    out.sort_by(|(a, pa), (b, pb)| {
        b.rank
            .total_cmp(&a.rank)
            .then(pa.cmp(pb))
            .then_with(|| a.id.cmp(&b.id))
    });
    out.into_iter().map(|(r, _)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn measured(cores: u32, memory_gib: u64, score: f64) -> Measured {
        Measured {
            cores,
            memory_bytes: memory_gib * GIB,
            score,
        }
    }

    /// Each case: (rule it pins, measurement, category).
    #[test]
    fn a_host_is_in_the_largest_category_it_meets_in_every_threshold() {
        let cats = Categories::standard();
        let cases: [(&str, Measured, Option<&str>); 7] = [
            ("meets nothing: no category", measured(0, 1, 1.0), None),
            (
                "the smallest's thresholds",
                measured(1, 1, 0.0),
                Some("small"),
            ),
            (
                "exactly medium's thresholds",
                measured(4, 8, 0.5),
                Some("medium"),
            ),
            (
                "cores and memory of large, score of medium: medium",
                measured(16, 32, 0.9),
                Some("medium"),
            ),
            (
                "score and cores of xlarge, memory of large: large",
                measured(64, 100, 3.0),
                Some("large"),
            ),
            (
                "beyond the largest: the largest",
                measured(256, 1024, 9.0),
                Some("xlarge"),
            ),
            (
                "one core short of medium: small",
                measured(3, 64, 5.0),
                Some("small"),
            ),
        ];
        for (rule, m, want) in cases {
            assert_eq!(cats.classify(&m).map(|c| c.name.as_str()), want, "{rule}");
        }
    }

    #[test]
    fn categories_go_from_smallest_to_largest_with_valid_names() {
        let c = |name: &str, cores, memory_gib, score| Category {
            name: name.into(),
            min_cores: cores,
            min_memory_bytes: memory_gib * GIB,
            min_score: score,
        };
        let cases: [(&str, Vec<Category>, Option<CategoriesError>); 6] = [
            ("none", vec![], Some(CategoriesError::Empty)),
            (
                "a name with a capital",
                vec![c("Small", 1, 1, 0.0)],
                Some(CategoriesError::Name {
                    index: 0,
                    name: "Small".into(),
                }),
            ),
            (
                "a name twice",
                vec![c("a", 1, 1, 0.0), c("a", 2, 2, 1.0)],
                Some(CategoriesError::Duplicate {
                    index: 1,
                    name: "a".into(),
                }),
            ),
            (
                "a threshold that shrinks",
                vec![c("a", 4, 8, 0.0), c("b", 8, 4, 1.0)],
                Some(CategoriesError::NotIncreasing {
                    index: 1,
                    name: "b".into(),
                }),
            ),
            (
                "the same thresholds twice",
                vec![c("a", 4, 8, 1.0), c("b", 4, 8, 1.0)],
                Some(CategoriesError::NotIncreasing {
                    index: 1,
                    name: "b".into(),
                }),
            ),
            (
                "one threshold up, the others equal",
                vec![c("a", 4, 8, 1.0), c("b", 4, 8, 2.0)],
                None,
            ),
        ];
        for (rule, list, want) in cases {
            assert_eq!(Categories::new(list).err(), want, "{rule}");
        }
        assert!(matches!(
            Categories::new(vec![c("a", 1, 1, f64::NAN)]),
            Err(CategoriesError::Score { index: 0, .. })
        ));
        // Read from configuration, the same rules hold.
        let text = r#"{"list": [{"name": "b", "min_cores": 2, "min_memory_bytes": 1, "min_score": 0.0},
                                 {"name": "a", "min_cores": 1, "min_memory_bytes": 1, "min_score": 0.0}]}"#;
        let err = serde_json::from_str::<Categories>(text).unwrap_err();
        assert!(err.to_string().contains("categories[1] (a)"), "{err}");
    }

    fn input(id: &str, price: u64, score: f64) -> RankInput {
        RankInput {
            id: id.into(),
            price,
            score,
            uptime: Some(0.99),
            rating: Some(4.0),
            failed_retest: false,
        }
    }

    fn order(ranked: &[Ranked]) -> Vec<&str> {
        ranked.iter().map(|r| r.id.as_str()).collect()
    }

    /// Each case: (rule it pins, candidates, the order a client sees).
    #[test]
    fn listings_are_ordered_by_their_weighted_rank_then_price_then_id() {
        let w = RankWeights::default();
        let retested = RankInput {
            failed_retest: true,
            ..input("a", 100, 1.0)
        };
        let new = RankInput {
            uptime: None,
            rating: None,
            ..input("new", 100, 1.0)
        };
        let cases: [(&str, Vec<RankInput>, Vec<&str>); 5] = [
            (
                "all else equal, the cheaper first",
                vec![input("a", 200, 1.0), input("b", 100, 1.0)],
                vec!["b", "a"],
            ),
            (
                "all else equal, the faster first",
                vec![input("a", 100, 1.0), input("b", 100, 2.0)],
                vec!["b", "a"],
            ),
            (
                "a failed re-test ranks lower",
                vec![retested, input("b", 100, 1.0)],
                vec!["b", "a"],
            ),
            (
                "equal ranks: the lower id",
                vec![input("b", 100, 1.0), input("a", 100, 1.0)],
                vec!["a", "b"],
            ),
            (
                "no uptime or rating yet counts as the middle, below a good record",
                vec![new, input("old", 100, 1.0)],
                vec!["old", "new"],
            ),
        ];
        for (rule, candidates, want) in cases {
            assert_eq!(order(&rank(&candidates, &w)), want, "{rule}");
        }
        // The weights are the documented ones: the best in every part scores 1.
        let best = rank(
            &[RankInput {
                uptime: Some(1.0),
                rating: Some(5.0),
                ..input("a", 100, 1.0)
            }],
            &w,
        );
        assert!((best[0].rank - 1.0).abs() < 1e-12, "{best:?}");
        assert!(rank(&[], &w).is_empty());
    }

    fn candidate() -> impl Strategy<Value = RankInput> {
        (
            1u64..10_000,
            0.01f64..10.0,
            proptest::option::of(0.0f64..=1.0),
            proptest::option::of(1.0f64..=5.0),
            any::<bool>(),
        )
            .prop_map(|(price, score, uptime, rating, failed_retest)| RankInput {
                id: String::new(),
                price,
                score,
                uptime,
                rating,
                failed_retest,
            })
    }

    fn with_ids(mut list: Vec<RankInput>) -> Vec<RankInput> {
        for (i, c) in list.iter_mut().enumerate() {
            c.id = format!("l{i:03}");
        }
        list
    }

    fn position(ranked: &[Ranked], id: &str) -> usize {
        ranked.iter().position(|r| r.id == id).unwrap()
    }

    proptest! {
        /// The category is the largest whose thresholds the measurement meets: it
        /// meets them, it misses the next larger one's, and measuring more never
        /// lands lower. (It is decided from measurements alone: `classify` is given
        /// nothing a provider claims.)
        #[test]
        fn the_category_is_the_largest_the_measurement_meets(
            cores in 0u32..512,
            memory_gib in 0u64..2048,
            score in 0.0f64..20.0,
            more in (0u32..64, 0u64..256, 0.0f64..4.0),
        ) {
            let cats = Categories::standard();
            let m = measured(cores, memory_gib, score);
            let meets = |c: &Category| {
                m.cores >= c.min_cores && m.memory_bytes >= c.min_memory_bytes && m.score >= c.min_score
            };
            let place = |c: Option<&Category>| c.map_or(0, |c| 1 + cats.list().iter().position(|x| x == c).unwrap());
            let got = place(cats.classify(&m));
            if got > 0 {
                prop_assert!(meets(&cats.list()[got - 1]));
            }
            if let Some(next) = cats.list().get(got) {
                prop_assert!(!meets(next));
            }
            let bigger = measured(cores + more.0, memory_gib + more.1, score + more.2);
            prop_assert!(place(cats.classify(&bigger)) >= got);
        }

        /// Getting cheaper, faster, more available or better rated never moves a
        /// listing down among the same others.
        #[test]
        fn improving_a_listing_never_moves_it_down(
            list in proptest::collection::vec(candidate(), 1..12),
            which in any::<prop::sample::Index>(),
            part in 0usize..4,
        ) {
            let w = RankWeights::default();
            let list = with_ids(list);
            let i = which.index(list.len());
            let id = list[i].id.clone();
            let before = position(&rank(&list, &w), &id);
            let mut better = list.clone();
            let c = &mut better[i];
            match part {
                0 => c.price = (c.price / 2).max(1),
                1 => c.score *= 2.0,
                2 => c.uptime = Some(1.0),
                _ => c.rating = Some(5.0),
            }
            // Only improvements: an unknown uptime or rating (0.5) replaced by the
            // best, a price halved, a score doubled.
            let after = position(&rank(&better, &w), &id);
            prop_assert!(after <= before, "{} moved from {} to {}", id, before, after);
        }

        /// Every candidate comes out once, ranks within [0, 1], in order.
        #[test]
        fn ranking_is_a_permutation_in_order(list in proptest::collection::vec(candidate(), 0..20)) {
            let list = with_ids(list);
            let ranked = rank(&list, &RankWeights::default());
            let mut ids: Vec<_> = ranked.iter().map(|r| r.id.clone()).collect();
            ids.sort();
            prop_assert_eq!(ids, list.iter().map(|c| c.id.clone()).collect::<Vec<_>>());
            prop_assert!(ranked.iter().all(|r| (0.0..=1.0 + 1e-9).contains(&r.rank)));
            prop_assert!(ranked.windows(2).all(|w| w[0].rank >= w[1].rank));
        }
    }
}
