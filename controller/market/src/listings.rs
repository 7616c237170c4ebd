//! Listings and how clients search them (C2, C4): what an accepted host is offered
//! as, the filters of a search, read from a query so that a filter the server does not
//! understand is refused by name rather than ignored, and the order of the results.
//!
//! Pure: the listings and the query go in, the ordered matches come out.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::CompatLevel;
use uuid::Uuid;

use crate::catalog::{RankInput, RankWeights, rank};
use crate::pipeline::Pipeline;
use crate::records::from_name;
use crate::resell::{
    FieldError, Interruptibility, MeasuredFacts, PricingMode, ResellRequest, ResourceKind,
};

/// What accepted hosts are offered as: one listing per resource set and size
/// category of a request (a set is in one zone), with every host of the set that was
/// accepted in that category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Listing {
    /// `lst-...`.
    pub id: String,
    /// The resell request it came from.
    pub request: Uuid,
    /// The provider's account.
    pub provider: String,
    /// The provider's data center (availability zone).
    pub zone: String,
    /// What it offers.
    pub kind: ResourceKind,
    /// The size category its measurements imply.
    pub category: String,
    /// The index of its resource set in the request.
    pub set: usize,
    /// The hosts' agents.
    pub hosts: Vec<Uuid>,
    /// The composite benchmark score (1.0: the reference machine): the lowest of its
    /// hosts'.
    pub score: f64,
    /// The hardening index: the lowest of its hosts'.
    pub hardening_index: u8,
    /// The compatibility level the kit verified: the lowest of its hosts'.
    pub compat_level: CompatLevel,
    /// The operations of the control interface the kit saw pass on every host.
    pub operations: Vec<String>,
    /// How it may be bought.
    pub pricing_modes: BTreeSet<PricingMode>,
    /// Whether and how a client may be interrupted.
    pub interruptibility: Interruptibility,
    /// The currency of `price`.
    pub currency: String,
    /// The hourly price a client sees, minor units.
    pub price: u64,
    /// Hosts available now.
    pub available: u32,
    /// Average client rating over the window, 1 to 5.
    pub rating: Option<f64>,
    /// Measured uptime over the window, 0 to 1.
    pub uptime: Option<f64>,
    /// How busy its hosts' CPUs were over the window, from metering, 0 to 1
    /// ([`crate::quality::utilisation`]); none before any host usage arrived.
    #[serde(default)]
    pub utilisation: Option<f64>,
    /// Offered to clients (false once delisted).
    pub listed: bool,
    /// Its last re-test failed.
    pub failed_retest: bool,
    /// When it was made.
    pub created_at_ms: UnixMillis,
    /// When its hosts are next re-tested.
    #[serde(default)]
    pub next_retest_at_ms: Option<UnixMillis>,
    /// When its last re-test ended.
    #[serde(default)]
    pub last_retest_at_ms: Option<UnixMillis>,
    /// The re-test under way, if one is.
    #[serde(default)]
    pub retest: Option<crate::quality::Retest>,
    /// The grace its provider promises before an interruption, ms (the request's).
    #[serde(default)]
    pub grace_ms: Option<i64>,
}

/// The listings of a request whose pipeline was accepted: one per resource set and
/// measured size category, holding the accepted hosts of that set in that category.
/// Figures are the weakest host's (the least score, hardening index and
/// compatibility; the operations every host passed), so that no host sells below
/// what its listing shows. `ids` makes each new listing's id; the price a client
/// sees is the immediate price, else the minimum.
pub fn offer(
    provider: &str,
    request: &ResellRequest,
    pipeline: &Pipeline,
    now_ms: UnixMillis,
    mut ids: impl FnMut() -> String,
) -> Vec<Listing> {
    let mut groups: BTreeMap<(usize, String), Vec<(Uuid, &MeasuredFacts)>> = BTreeMap::new();
    for h in &pipeline.hosts {
        let Some(a) = h.assessment.as_ref().filter(|a| a.accepted()) else {
            continue;
        };
        let Some(category) = a.category.clone() else {
            continue;
        };
        groups
            .entry((h.set, category))
            .or_default()
            .push((h.host, &a.measured));
    }
    groups
        .into_iter()
        .filter_map(|((set, category), hosts)| {
            let rs = request.resource_sets.get(set)?;
            let facts = hosts.iter().map(|(_, f)| *f);
            let score = facts.clone().map(|f| f.score).fold(f64::INFINITY, f64::min);
            let hardening_index = facts.clone().map(|f| f.hardening_index).min()?;
            let compat_level = facts
                .clone()
                .map(|f| f.compat_level.unwrap_or(CompatLevel::Incompatible))
                .min_by_key(|l| compat_rank(*l))?;
            let mut operations: Option<BTreeSet<&String>> = None;
            for f in facts {
                let mine: BTreeSet<&String> = f.operations.iter().collect();
                operations = Some(match operations {
                    None => mine,
                    Some(all) => all.intersection(&mine).copied().collect(),
                });
            }
            Some(Listing {
                id: ids(),
                request: pipeline.request,
                provider: provider.to_owned(),
                zone: rs.zone.clone(),
                kind: rs.kind,
                category,
                set,
                hosts: hosts.iter().map(|(h, _)| *h).collect(),
                score,
                hardening_index,
                compat_level,
                operations: operations
                    .unwrap_or_default()
                    .into_iter()
                    .cloned()
                    .collect(),
                pricing_modes: request.pricing.modes.iter().copied().collect(),
                interruptibility: request.interruptibility,
                currency: request.pricing.currency.clone(),
                price: request
                    .pricing
                    .immediate_price
                    .unwrap_or(request.pricing.minimum_price),
                available: hosts.len() as u32,
                rating: None,
                uptime: None,
                utilisation: None,
                listed: true,
                failed_retest: false,
                created_at_ms: now_ms,
                next_retest_at_ms: None,
                last_retest_at_ms: None,
                retest: None,
                grace_ms: request.grace_ms,
            })
        })
        .collect()
}

/// How search results are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ListingSort {
    /// By [`catalog::rank`](crate::catalog::rank): price, performance, uptime, rating.
    #[default]
    Rank,
    /// Cheapest first.
    Price,
    /// Fastest first.
    Score,
    /// Best rated first (unrated last).
    Rating,
}

/// The filters of a search; every one given must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListingQuery {
    /// Of this kind.
    pub kind: Option<ResourceKind>,
    /// In this size category.
    pub category: Option<String>,
    /// In this zone.
    pub zone: Option<String>,
    /// Of this provider.
    pub provider: Option<String>,
    /// Sold in this pricing mode.
    pub pricing_mode: Option<PricingMode>,
    /// With this interruptibility.
    pub interruptibility: Option<Interruptibility>,
    /// At least this compatibility level.
    pub compat: Option<CompatLevel>,
    /// At least this average rating.
    pub min_rating: Option<f64>,
    /// At least this composite score.
    pub min_score: Option<f64>,
    /// At most this hourly price.
    pub max_price: Option<u64>,
    /// Priced in this currency (prices and ranks compare within one).
    pub currency: Option<String>,
    /// The order.
    pub sort: ListingSort,
}

/// The filters a search understands, by their query names.
pub const FILTERS: [&str; 12] = [
    "kind",
    "category",
    "zone",
    "provider",
    "pricing_mode",
    "interruptibility",
    "compat",
    "min_rating",
    "min_score",
    "max_price",
    "currency",
    "sort",
];

/// How good a compatibility level is: incompatible 0 to fully 3.
pub(crate) fn compat_rank(level: CompatLevel) -> u8 {
    match level {
        CompatLevel::Incompatible => 0,
        CompatLevel::Somewhat => 1,
        CompatLevel::Highly => 2,
        CompatLevel::Fully => 3,
    }
}

/// Reads query pairs against `filters`, the parameters of a search of `what`: a
/// parameter not among them, or one given twice, is a problem named by it; every other
/// pair goes to `read` with its value trimmed, which answers what is wrong with the
/// value. Every problem, in order.
pub(crate) fn read_filters(
    pairs: &[(String, String)],
    filters: &[&str],
    what: &str,
    mut read: impl FnMut(&str, &str) -> Result<(), String>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (key, value) in pairs {
        let problem = if !filters.contains(&key.as_str()) {
            Err(format!(
                "{key} is not a filter of {what} ({})",
                filters.join(", ")
            ))
        } else if !seen.insert(key.as_str()) {
            Err(format!("{key} is given twice"))
        } else {
            read(key, value.trim())
        };
        if let Err(message) = problem {
            errors.push(FieldError {
                field: key.clone(),
                message,
            });
        }
    }
    errors
}

impl ListingQuery {
    /// Reads a search from its query pairs; every problem is named by its parameter: a
    /// parameter not in [`FILTERS`], one given twice, a value that is not one of the
    /// parameter's.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, Vec<FieldError>> {
        let mut q = ListingQuery::default();
        let errors = read_filters(pairs, &FILTERS, "listings", |key, value| {
            let not = |what: &str| Err(format!("{value:?} is not {what}"));
            match key {
                "kind" => match from_name(value) {
                    Some(k) => q.kind = Some(k),
                    None => return not("compute, storage or bandwidth"),
                },
                "category" => q.category = Some(value.to_owned()),
                "zone" => q.zone = Some(value.to_owned()),
                "provider" => q.provider = Some(value.to_owned()),
                "pricing_mode" => match from_name(value) {
                    Some(m) => q.pricing_mode = Some(m),
                    None => return not("spot, auction, immediate, on_demand or reserved"),
                },
                "interruptibility" => match from_name(value) {
                    Some(i) => q.interruptibility = Some(i),
                    None => {
                        return not("dont_care, price_based, fulfilment_based or no_interruptions");
                    }
                },
                "compat" => match from_name(value) {
                    Some(c) => q.compat = Some(c),
                    None => return not("fully, highly, somewhat or incompatible"),
                },
                "min_rating" => match value.parse::<f64>() {
                    Ok(r) if (1.0..=5.0).contains(&r) => q.min_rating = Some(r),
                    _ => return not("a rating from 1 to 5"),
                },
                "min_score" => match value.parse::<f64>() {
                    Ok(s) if s.is_finite() && s >= 0.0 => q.min_score = Some(s),
                    _ => return not("a score of at least 0"),
                },
                "currency" => q.currency = Some(value.to_ascii_uppercase()),
                "max_price" => match value.parse::<u64>() {
                    Ok(p) => q.max_price = Some(p),
                    _ => return not("a price in minor units"),
                },
                "sort" => match from_name(value) {
                    Some(s) => q.sort = s,
                    None => return not("rank, price, score or rating"),
                },
                _ => unreachable!("every filter has a branch"),
            }
            Ok(())
        });
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }

    /// `listing` is offered and passes every filter given.
    pub fn matches(&self, l: &Listing) -> bool {
        l.listed
            && self.kind.is_none_or(|k| l.kind == k)
            && self.category.as_ref().is_none_or(|c| &l.category == c)
            && self.zone.as_ref().is_none_or(|z| &l.zone == z)
            && self.provider.as_ref().is_none_or(|p| &l.provider == p)
            && self
                .pricing_mode
                .is_none_or(|m| l.pricing_modes.contains(&m))
            && self
                .interruptibility
                .is_none_or(|i| l.interruptibility == i)
            && self
                .compat
                .is_none_or(|c| compat_rank(l.compat_level) >= compat_rank(c))
            && self
                .min_rating
                .is_none_or(|r| l.rating.is_some_and(|x| x >= r))
            && self.min_score.is_none_or(|s| l.score >= s)
            && self.max_price.is_none_or(|p| l.price <= p)
            && self.currency.as_ref().is_none_or(|c| &l.currency == c)
    }
}

/// The offered listings that match `query`, in its order; ties go to the lower price,
/// then the lower id. Prices (a price filter, the price order, the rank's price part)
/// compare within one currency: a client that compares prices filters by `currency`.
pub fn search<'a>(
    listings: &'a [Listing],
    query: &ListingQuery,
    weights: &RankWeights,
) -> Vec<&'a Listing> {
    let mut found: Vec<&Listing> = listings.iter().filter(|l| query.matches(l)).collect();
    let tie = |a: &&Listing, b: &&Listing| a.price.cmp(&b.price).then_with(|| a.id.cmp(&b.id));
    match query.sort {
        ListingSort::Rank => {
            let inputs: Vec<RankInput> = found
                .iter()
                .map(|l| RankInput {
                    id: l.id.clone(),
                    price: l.price,
                    score: l.score,
                    uptime: l.uptime,
                    rating: l.rating,
                    failed_retest: l.failed_retest,
                })
                .collect();
            let order = rank(&inputs, weights);
            let by_id = |id: &str| *found.iter().find(|l| l.id == id).expect("ranked");
            return order.iter().map(|r| by_id(&r.id)).collect();
        }
        ListingSort::Price => found.sort_by(tie),
        ListingSort::Score => {
            found.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| tie(a, b)))
        }
        ListingSort::Rating => found.sort_by(|a, b| {
            let r = |l: &Listing| l.rating.unwrap_or(f64::NEG_INFINITY);
            r(b).total_cmp(&r(a)).then_with(|| tie(a, b))
        }),
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(id: &str) -> Listing {
        Listing {
            id: id.into(),
            request: Uuid::from_u128(1),
            provider: "bob".into(),
            zone: "bob-fra-1".into(),
            kind: ResourceKind::Compute,
            category: "medium".into(),
            set: 0,
            hosts: vec![Uuid::from_u128(2)],
            score: 1.0,
            hardening_index: 80,
            compat_level: CompatLevel::Highly,
            operations: vec!["run".into()],
            pricing_modes: [PricingMode::OnDemand, PricingMode::Spot].into(),
            interruptibility: Interruptibility::PriceBased,
            currency: "EUR".into(),
            price: 30,
            available: 1,
            rating: Some(4.0),
            uptime: Some(0.99),
            utilisation: None,
            listed: true,
            failed_retest: false,
            created_at_ms: 0,
            next_retest_at_ms: None,
            last_retest_at_ms: None,
            retest: None,

            grace_ms: None,
        }
    }

    fn pairs(text: &str) -> Vec<(String, String)> {
        text.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// Each case: (rule it pins, query, whether the standard listing matches).
    #[test]
    fn every_filter_given_must_match() {
        let l = listing("a");
        let cases = [
            ("no filter: every offered listing", "", true),
            ("the kind it is", "kind=compute", true),
            ("another kind", "kind=storage", false),
            ("its category", "category=medium", true),
            ("another category", "category=large", false),
            ("another zone", "zone=ams-1", false),
            ("another provider", "provider=carol", false),
            ("a pricing mode it is sold in", "pricing_mode=spot", true),
            ("one it is not sold in", "pricing_mode=auction", false),
            (
                "another interruptibility",
                "interruptibility=no_interruptions",
                false,
            ),
            ("at least a lower compatibility", "compat=somewhat", true),
            ("at least its compatibility", "compat=highly", true),
            ("at least a higher compatibility", "compat=fully", false),
            ("a rating at its", "min_rating=4", true),
            ("a rating above its", "min_rating=4.5", false),
            ("a score above its", "min_score=1.5", false),
            ("a price above its", "max_price=30", true),
            ("a price below its", "max_price=29", false),
            (
                "every filter together",
                "kind=compute&zone=bob-fra-1&provider=bob&compat=highly&min_score=1",
                true,
            ),
        ];
        for (rule, query, want) in cases {
            let q = ListingQuery::parse(&pairs(query)).unwrap_or_else(|e| panic!("{rule}: {e:?}"));
            assert_eq!(q.matches(&l), want, "{rule}");
        }
        let unrated = Listing {
            rating: None,
            ..listing("b")
        };
        let min_rating = ListingQuery::parse(&pairs("min_rating=1")).unwrap();
        assert!(
            !min_rating.matches(&unrated),
            "unrated does not pass a minimum rating"
        );
        let delisted = Listing {
            listed: false,
            ..listing("c")
        };
        assert!(
            !ListingQuery::default().matches(&delisted),
            "a delisted listing is never found"
        );
    }

    #[test]
    fn a_filter_the_server_does_not_understand_is_refused_by_name() {
        let errors = ListingQuery::parse(&pairs("zone=a&colour=red&kind=gpu&zone=b&min_rating=9"))
            .unwrap_err();
        let named: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.message.split(' ').next().unwrap_or("")))
            .collect();
        assert_eq!(
            named,
            [
                ("colour", "colour"),
                ("kind", "\"gpu\""),
                ("zone", "zone"),
                ("min_rating", "\"9\"")
            ]
        );
        assert!(errors[0].message.contains("is not a filter of listings"));
        assert!(errors[2].message.contains("given twice"));
    }

    fn ids<'a>(found: &[&'a Listing]) -> Vec<&'a str> {
        found.iter().map(|l| l.id.as_str()).collect()
    }

    #[test]
    fn results_come_in_the_asked_order_with_ties_to_price_then_id() {
        let listings = vec![
            Listing {
                price: 40,
                score: 2.0,
                rating: Some(3.0),
                ..listing("a")
            },
            Listing {
                price: 20,
                score: 1.0,
                rating: None,
                ..listing("b")
            },
            Listing {
                price: 20,
                score: 1.0,
                rating: Some(5.0),
                ..listing("c")
            },
            Listing {
                listed: false,
                price: 1,
                ..listing("d")
            },
        ];
        let w = RankWeights::default();
        let sorted = |sort| {
            search(
                &listings,
                &ListingQuery {
                    sort,
                    ..ListingQuery::default()
                },
                &w,
            )
        };
        assert_eq!(ids(&sorted(ListingSort::Price)), ["b", "c", "a"]);
        assert_eq!(ids(&sorted(ListingSort::Score)), ["a", "b", "c"]);
        assert_eq!(ids(&sorted(ListingSort::Rating)), ["c", "a", "b"]);
        // Rank: c (cheapest, best rated) before b (cheapest, unrated) before a.
        assert_eq!(ids(&sorted(ListingSort::Rank)), ["c", "b", "a"]);
    }

    fn accepted(
        category: &str,
        score: f64,
        hardening: u8,
        level: CompatLevel,
        ops: &[&str],
    ) -> crate::resell::Assessment {
        crate::resell::Assessment {
            criteria: vec![],
            category: Some(category.into()),
            measured: MeasuredFacts {
                score,
                hardening_index: hardening,
                compat_level: Some(level),
                operations: ops.iter().map(|o| (*o).to_owned()).collect(),
            },
        }
    }

    /// Each listing pins a rule: one per set and measured category, the weakest
    /// host's figures, only accepted hosts, the immediate price.
    #[test]
    fn an_accepted_request_is_offered_per_set_and_measured_category() {
        let request: ResellRequest = serde_json::from_value(serde_json::json!({
            "contact": "ops@bob.example",
            "resource_sets": [
                {"kind": "compute", "zone": "fra-1", "hosts": [], "system": {}, "compatibility": {"level": "full"}},
                {"kind": "compute", "zone": "ams-1", "hosts": [], "system": {}, "compatibility": {"level": "full"}}
            ],
            "pricing": {"modes": ["spot"], "currency": "EUR", "minimum_price": 20, "immediate_price": 35},
            "interruptibility": "price_based",
            "goal": "none"
        }))
        .unwrap();
        let h = Uuid::from_u128;
        let hosts = [(h(1), 0), (h(2), 0), (h(3), 0), (h(4), 1), (h(5), 1)];
        let mut p = Pipeline::new(h(99), &hosts, 0);
        p.handle_preliminary(1, &[], 1000).unwrap();
        for (i, (host, _)) in hosts.iter().enumerate() {
            p.handle_run_ordered(2, *host, h(100 + i as u128)).unwrap();
        }
        let ops = ["run", "stop"];
        p.handle_assessed(
            3,
            h(1),
            h(100),
            accepted("medium", 1.5, 80, CompatLevel::Fully, &ops),
        )
        .unwrap();
        p.handle_assessed(
            3,
            h(2),
            h(101),
            accepted("medium", 1.2, 70, CompatLevel::Highly, &["run"]),
        )
        .unwrap();
        p.handle_assessed(
            3,
            h(3),
            h(102),
            accepted("large", 3.0, 90, CompatLevel::Fully, &ops),
        )
        .unwrap();
        let mut rejected = accepted("medium", 9.0, 99, CompatLevel::Fully, &ops);
        rejected.criteria.push(crate::resell::Criterion {
            rule: "hardening".into(),
            field: None,
            passed: false,
            claimed: None,
            measured: None,
            required: None,
        });
        p.handle_assessed(3, h(4), h(103), rejected).unwrap();
        p.handle_assessed(
            3,
            h(5),
            h(104),
            accepted("small", 0.5, 60, CompatLevel::Somewhat, &[]),
        )
        .unwrap();
        let mut n = 0;
        let listings = offer("bob", &request, &p, 7, || {
            n += 1;
            format!("lst-{n}")
        });
        let shape: Vec<(usize, &str, &str, Vec<Uuid>)> = listings
            .iter()
            .map(|l| (l.set, l.zone.as_str(), l.category.as_str(), l.hosts.clone()))
            .collect();
        assert_eq!(
            shape,
            [
                (0, "fra-1", "large", vec![h(3)]),
                (0, "fra-1", "medium", vec![h(1), h(2)]),
                (1, "ams-1", "small", vec![h(5)]),
            ],
            "one listing per set and category; a rejected host is in none"
        );
        let medium = &listings[1];
        assert_eq!(
            (
                medium.score,
                medium.hardening_index,
                medium.compat_level,
                medium.operations.clone()
            ),
            (1.2, 70, CompatLevel::Highly, vec!["run".to_owned()]),
            "the weakest host's figures"
        );
        assert_eq!(
            (medium.price, medium.available, medium.listed),
            (35, 2, true)
        );
        assert_eq!(
            listings.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["lst-1", "lst-2", "lst-3"]
        );
    }
}
