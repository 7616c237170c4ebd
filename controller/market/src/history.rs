//! Pricing history and guidance (issue 16, C5, source 000 FIG. 12): what capacity sold
//! for, filtered as a client asks, bucketed for a chart, and the range of winning
//! prices shown beside a bid form.
//!
//! Rules:
//!
//! - **What is recorded.** Every spot clearing price, auction result (a sale; an
//!   auction without one records nothing) and accepted quote is a [`PricePoint`], with
//!   where it was sold (listing, provider, zone, size category) and in which currency.
//! - **Filters** ([`HistoryQuery::parse`]): `kind`, `category`, `provider`, `zone`,
//!   `currency`, `from`, `to` (Unix ms, `from` inclusive, `to` exclusive) and
//!   `bucket` (`hour` or `day`). A parameter not among these, one given twice or a
//!   value that is not one of the parameter's is refused by name, all at once; `from`
//!   after `to` is refused on `from`.
//! - **Series** ([`series`]): points of one currency grouped into buckets aligned to
//!   the bucket width from the epoch, each with its lowest, highest and last price
//!   (the last by time, then by the point's id) and its count, oldest bucket first;
//!   empty buckets are absent, not zero (nothing sold is not a price of zero).
//! - **Guidance** ([`guidance`]): over the points of one currency in the window
//!   ending at `now` (`now - window` inclusive to `now` exclusive), the lowest, the
//!   median (the lower middle of an even count) and the highest winning price, with
//!   the count; `None` when nothing sold in the window. Prices of different
//!   currencies are never mixed: a point of another currency is left out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;

use crate::listings::read_filters;
use crate::quote::Price;
use crate::records::from_name;
use crate::resell::FieldError;

/// How a price was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PriceKind {
    /// A spot clearing's uniform price.
    Spot,
    /// An auction's sale.
    Auction,
    /// An accepted immediate quote.
    Quote,
}

/// One price capacity sold at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PricePoint {
    /// The clearing, auction or quote it records (unique per point).
    pub id: String,
    /// How it was reached.
    pub kind: PriceKind,
    /// The listing sold.
    pub listing: String,
    /// Its provider.
    pub provider: String,
    /// Its zone.
    pub zone: String,
    /// Its size category.
    pub category: String,
    /// The currency of `price`.
    pub currency: String,
    /// Per host-hour, minor units.
    pub price: Price,
    /// When it was reached.
    pub at_ms: UnixMillis,
}

/// The width of a chart's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BucketWidth {
    /// An hour.
    #[default]
    Hour,
    /// A day (UTC).
    Day,
}

impl BucketWidth {
    /// The width in milliseconds.
    pub fn ms(self) -> i64 {
        match self {
            BucketWidth::Hour => 3_600_000,
            BucketWidth::Day => 86_400_000,
        }
    }
}

/// The parameters [`HistoryQuery::parse`] understands.
pub const FILTERS: [&str; 8] = [
    "kind", "category", "provider", "zone", "currency", "from", "to", "bucket",
];

/// A client's question to the pricing history.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HistoryQuery {
    /// Only this kind.
    pub kind: Option<PriceKind>,
    /// Only this size category.
    pub category: Option<String>,
    /// Only this provider's listings.
    pub provider: Option<String>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Only this currency (upper case).
    pub currency: Option<String>,
    /// From this instant (inclusive).
    pub from_ms: Option<UnixMillis>,
    /// Until this instant (exclusive).
    pub to_ms: Option<UnixMillis>,
    /// The chart's bucket width.
    pub bucket: BucketWidth,
}

impl HistoryQuery {
    /// Reads a question from its query pairs; every problem is named by its parameter.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, Vec<FieldError>> {
        let mut q = HistoryQuery::default();
        let mut errors = read_filters(pairs, &FILTERS, "the pricing history", |key, value| {
            let not = |what: &str| Err(format!("{value:?} is not {what}"));
            match key {
                "kind" => match from_name(value) {
                    Some(k) => q.kind = Some(k),
                    None => return not("spot, auction or quote"),
                },
                "category" => q.category = Some(value.to_owned()),
                "provider" => q.provider = Some(value.to_owned()),
                "zone" => q.zone = Some(value.to_owned()),
                "currency" => q.currency = Some(value.to_ascii_uppercase()),
                "from" | "to" => match value.parse::<i64>() {
                    Ok(ms) if ms >= 0 && key == "from" => q.from_ms = Some(ms),
                    Ok(ms) if ms >= 0 => q.to_ms = Some(ms),
                    _ => return not("an instant in Unix milliseconds"),
                },
                "bucket" => match from_name(value) {
                    Some(b) => q.bucket = b,
                    None => return not("hour or day"),
                },
                _ => unreachable!("every filter has a branch"),
            }
            Ok(())
        });
        if let (Some(from), Some(to)) = (q.from_ms, q.to_ms) {
            if from > to {
                errors.push(FieldError {
                    field: "from".into(),
                    message: format!("{from} is after to ({to})"),
                });
            }
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }

    /// Whether `p` answers the question.
    pub fn matches(&self, p: &PricePoint) -> bool {
        self.kind.is_none_or(|k| k == p.kind)
            && self.category.as_ref().is_none_or(|c| *c == p.category)
            && self.provider.as_ref().is_none_or(|v| *v == p.provider)
            && self.zone.as_ref().is_none_or(|z| *z == p.zone)
            && self.currency.as_ref().is_none_or(|c| *c == p.currency)
            && self.from_ms.is_none_or(|f| p.at_ms >= f)
            && self.to_ms.is_none_or(|t| p.at_ms < t)
    }
}

/// One bucket of a chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bucket {
    /// Its start (aligned to its width from the epoch).
    pub start_ms: UnixMillis,
    /// The lowest price in it.
    pub low: Price,
    /// The highest.
    pub high: Price,
    /// The last by time (then by the point's id).
    pub last: Price,
    /// How many prices.
    pub count: u64,
}

/// The points of `currency` in buckets of `width`, oldest first (empty buckets absent).
pub fn series(points: &[PricePoint], currency: &str, width: BucketWidth) -> Vec<Bucket> {
    let w = width.ms();
    let mut buckets: BTreeMap<i64, (Bucket, (UnixMillis, &str))> = BTreeMap::new();
    for p in points.iter().filter(|p| p.currency == currency) {
        let start = p.at_ms.div_euclid(w) * w;
        let key = (p.at_ms, p.id.as_str());
        buckets
            .entry(start)
            .and_modify(|(b, latest)| {
                b.low = b.low.min(p.price);
                b.high = b.high.max(p.price);
                b.count += 1;
                if key > *latest {
                    b.last = p.price;
                    *latest = key;
                }
            })
            .or_insert((
                Bucket {
                    start_ms: start,
                    low: p.price,
                    high: p.price,
                    last: p.price,
                    count: 1,
                },
                key,
            ));
    }
    buckets.into_values().map(|(b, _)| b).collect()
}

/// The range of winning prices beside a bid form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Guidance {
    /// The lowest price that won.
    pub low: Price,
    /// The median (the lower middle of an even count).
    pub median: Price,
    /// The highest.
    pub high: Price,
    /// How many prices.
    pub count: u64,
}

/// The winning prices of `currency` in `[now - window, now)`; `None` when none.
pub fn guidance(
    points: &[PricePoint],
    currency: &str,
    now_ms: UnixMillis,
    window_ms: i64,
) -> Option<Guidance> {
    let since = now_ms.saturating_sub(window_ms);
    let mut prices: Vec<Price> = points
        .iter()
        .filter(|p| p.currency == currency && p.at_ms >= since && p.at_ms < now_ms)
        .map(|p| p.price)
        .collect();
    prices.sort_unstable();
    let (low, high) = (*prices.first()?, *prices.last()?);
    Some(Guidance {
        low,
        median: prices[(prices.len() - 1) / 2],
        high,
        count: prices.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(id: &str, price: Price, at_ms: i64, currency: &str) -> PricePoint {
        PricePoint {
            id: id.into(),
            kind: PriceKind::Spot,
            listing: "lst-1".into(),
            provider: "bob".into(),
            zone: "bob-fra-1".into(),
            category: "medium".into(),
            currency: currency.into(),
            price,
            at_ms,
        }
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Each case: (rule it pins, query, the fields refused).
    #[test]
    fn a_question_is_read_and_every_bad_parameter_named() {
        type Case = (
            &'static str,
            Vec<(&'static str, &'static str)>,
            Vec<&'static str>,
        );
        let cases: [Case; 7] = [
            ("no filter: everything", vec![], vec![]),
            (
                "every filter",
                vec![
                    ("kind", "auction"),
                    ("category", "large"),
                    ("provider", "bob"),
                    ("zone", "z"),
                    ("currency", "eur"),
                    ("from", "10"),
                    ("to", "20"),
                    ("bucket", "day"),
                ],
                vec![],
            ),
            ("an unknown filter", vec![("colour", "red")], vec!["colour"]),
            (
                "a filter given twice",
                vec![("zone", "a"), ("zone", "b")],
                vec!["zone"],
            ),
            (
                "values that are not the parameter's",
                vec![("kind", "barter"), ("bucket", "week"), ("to", "soon")],
                vec!["kind", "bucket", "to"],
            ),
            (
                "from after to",
                vec![("from", "20"), ("to", "10")],
                vec!["from"],
            ),
            ("a negative instant", vec![("from", "-1")], vec!["from"]),
        ];
        for (rule, q, want) in cases {
            let got: Vec<String> = match HistoryQuery::parse(&pairs(&q)) {
                Ok(_) => vec![],
                Err(errors) => errors.into_iter().map(|e| e.field).collect(),
            };
            assert_eq!(got, want, "{rule}");
        }
        let q = HistoryQuery::parse(&pairs(&[("currency", "eur"), ("kind", "quote")])).unwrap();
        assert_eq!(
            (q.currency.as_deref(), q.kind),
            (Some("EUR"), Some(PriceKind::Quote))
        );
    }

    #[test]
    fn a_question_matches_its_points_from_inclusive_to_exclusive() {
        let q = HistoryQuery::parse(&pairs(&[
            ("from", "10"),
            ("to", "20"),
            ("zone", "bob-fra-1"),
        ]))
        .unwrap();
        assert!(q.matches(&point("a", 1, 10, "EUR")), "from is inclusive");
        assert!(!q.matches(&point("b", 1, 20, "EUR")), "to is exclusive");
        assert!(!q.matches(&PricePoint {
            zone: "elsewhere".into(),
            ..point("c", 1, 15, "EUR")
        }));
    }

    #[test]
    fn buckets_hold_low_high_last_and_count_and_skip_the_empty() {
        let h = 3_600_000;
        let points = [
            point("b", 30, 10, "EUR"),
            point("a", 20, 10, "EUR"),
            point("c", 25, 5, "EUR"),
            point("d", 40, 2 * h + 1, "EUR"),
            point("e", 99, 20, "USD"),
        ];
        assert_eq!(
            series(&points, "EUR", BucketWidth::Hour),
            [
                Bucket {
                    start_ms: 0,
                    low: 20,
                    high: 30,
                    last: 30,
                    count: 3
                },
                Bucket {
                    start_ms: 2 * h,
                    low: 40,
                    high: 40,
                    last: 40,
                    count: 1
                },
            ],
            "the last is the latest, then the higher id; the empty hour is absent; USD left out"
        );
        assert_eq!(series(&points, "EUR", BucketWidth::Day).len(), 1);
    }

    /// Each case: (rule it pins, prices at instants, now, window, guidance).
    #[test]
    fn guidance_is_the_range_that_won_in_the_window() {
        type Case = (
            &'static str,
            Vec<(Price, i64)>,
            i64,
            i64,
            Option<(Price, Price, Price, u64)>,
        );
        let cases: [Case; 4] = [
            ("nothing sold: none", vec![], 100, 50, None),
            (
                "odd count: the middle",
                vec![(30, 60), (10, 70), (20, 80)],
                100,
                50,
                Some((10, 20, 30, 3)),
            ),
            (
                "even count: the lower middle",
                vec![(40, 60), (10, 70), (30, 80), (20, 90)],
                100,
                50,
                Some((10, 20, 40, 4)),
            ),
            (
                "the window is [now - window, now)",
                vec![(1, 49), (5, 50), (9, 100)],
                100,
                50,
                Some((5, 5, 5, 1)),
            ),
        ];
        for (rule, prices, now, window, want) in cases {
            let points: Vec<PricePoint> = prices
                .iter()
                .enumerate()
                .map(|(i, (p, at))| point(&i.to_string(), *p, *at, "EUR"))
                .collect();
            let got =
                guidance(&points, "EUR", now, window).map(|g| (g.low, g.median, g.high, g.count));
            assert_eq!(got, want, "{rule}");
        }
    }

    proptest! {
        /// The buckets count every point of the currency once, and each bucket's last
        /// price lies within its range.
        #[test]
        fn buckets_account_for_every_point(
            raw in prop::collection::vec((0u64..100, 0i64..10 * 86_400_000, any::<bool>()), 0..60),
        ) {
            let points: Vec<PricePoint> = raw
                .iter()
                .enumerate()
                .map(|(i, (p, at, eur))| point(&i.to_string(), *p, *at, if *eur { "EUR" } else { "USD" }))
                .collect();
            for width in [BucketWidth::Hour, BucketWidth::Day] {
                let s = series(&points, "EUR", width);
                let eur = points.iter().filter(|p| p.currency == "EUR").count() as u64;
                prop_assert_eq!(s.iter().map(|b| b.count).sum::<u64>(), eur);
                prop_assert!(s.windows(2).all(|w| w[0].start_ms < w[1].start_ms));
                prop_assert!(s.iter().all(|b| b.low <= b.last && b.last <= b.high));
            }
            if let Some(g) = guidance(&points, "EUR", 10 * 86_400_000, 10 * 86_400_000) {
                prop_assert!(g.low <= g.median && g.median <= g.high);
            }
        }
    }
}
