//! Search and reserve (issue 16, C4, `GET /v1/offers`): the offers a client searching
//! for capacity is shown. Each is a listing that matches the search, with the price of
//! every pricing mode it is sold in and how long that price holds, its rating, its
//! past reservations and how many units it has free now, in the order of the client's
//! chosen criterion.
//!
//! Owns: reading a search ([`OfferQuery::parse`]), the prices of one listing
//! ([`terms`]) and the search ([`offers`]). Must not: read a clock, a store or the
//! reservation book. The shell passes the listings, each listing's free units and past
//! reservations ([`OfferStats`]), each provider's minimum, the size categories and
//! `now`. Reused, not restated: a listing search's filters and values
//! ([`ListingQuery`]), the weighted rank ([`crate::catalog::rank`]), the rules of set
//! prices ([`crate::quote`]) and the utilisation goal's discount
//! ([`crate::interrupt::defaults`], [`crate::interrupt::price_for`]). To put idle
//! third-party capacity first, the shell passes the result through
//! [`crate::interrupt::order_for_load`].
//!
//! # Rules
//!
//! 1. **Query** ([`OfferQuery::parse`]). The parameters are [`OFFER_FILTERS`]. One not
//!    among them, one given twice, or a value that is not one of its parameter's is
//!    refused by its name, every problem in the order given. `kind`, `category`,
//!    `zone`, `pricing_mode`, `interruptibility`, `compat`, `min_rating` (1 to 5),
//!    `max_price` (minor units) and `currency` (uppercased) are read exactly as a
//!    listing search reads them. `min_cores` is a whole number of at least 1;
//!    `min_memory_gb` whole GiB (2^30 bytes) of at least 1; `vendors` 1 to
//!    [`MAX_VENDORS`] provider accounts separated by commas, each trimmed, none empty;
//!    `period_hours` 1 to [`MAX_PERIOD_HOURS`] (ten years); `rank_by` one of `price`,
//!    `score`, `uptime`, `rating`, `mix` (default `mix`); `w_price`, `w_score`,
//!    `w_uptime`, `w_rating` finite numbers of at least 0. Once every value is
//!    well-formed: a weight given with a `rank_by` other than `mix` is refused by its
//!    name; weights that are all 0 are refused as `w_price`. Weights given make the mix
//!    those, 0 for the others (a failed re-test still halves a rank); none given, the
//!    mix is [`RankWeights::default`].
//! 2. **Prices** ([`terms`]). One [`ModePrice`] per mode the listing is sold in, in
//!    [`PricingMode`] order (spot, auction, immediate, on_demand, reserved). The
//!    minimum is the provider's (the listing's own price when the shell knows none).
//!    - spot, auction: `hourly` is the minimum, the least a bid must be; nothing is
//!      held, no total (a bid discovers the price).
//!    - immediate: `hourly` is the listing's price, held until `now +
//!      quote_validity_ms` (exclusive), as a quote issued now would
//!      ([`quote::issue`]); left out where that quote would be refused (a price below
//!      the minimum, a validity that is not positive).
//!    - on_demand: `hourly` is the listing's price, held until the provider changes it
//!      (`valid_until_ms` none); left out below the minimum ([`quote::on_demand`]).
//!    - reserved: the term is `period_hours` long, else [`DEFAULT_TERM_HOURS`]; its
//!      hourly is the utilisation goal's 70 % of the listing's price, rounded up, never
//!      below the minimum; `upfront` is a quarter of what the term saves over
//!      on-demand, `(price − hourly) × hours / 4` rounded up, so the term breaks even
//!      after a quarter of it ([`quote::break_even_hours`]). Left out where
//!      [`quote::check_term`] refuses the term: when it is not cheaper than on-demand,
//!      i.e. a price at or below the minimum, or of at most 3 (70 % rounds up to it).
//!    - total, with a period, for immediate and on_demand: `hourly × hours`; for
//!      reserved: [`quote::term_cost`], the upfront fee and every hour of the term.
//!    - A period of 0 hours counts as none. Arithmetic saturates rather than wraps (a
//!      term too long for `i64` milliseconds is the longest one).
//! 3. **Filters** ([`offers`]). An offer is a listing that is listed, has at least one
//!    unit free now (from [`OfferStats`]; a listing missing from the stats has none and
//!    `Listing::available` is not used) and passes every filter given: the shared ones
//!    as [`ListingQuery::matches`] says; `vendors`: its provider is one of them;
//!    `min_cores` / `min_memory_gb`: its size category, looked up by name among the
//!    categories, has at least that many `min_cores` / `min_memory_bytes` (a listing
//!    whose category is not among them fails either filter and passes when neither is
//!    given); `pricing_mode`: it is sold in that mode *and* rule 2 gives it a price
//!    there (a reserved term left out does not count); `max_price`: its compared price
//!    is at most that. The *compared price* is the hourly of the asked `pricing_mode`,
//!    else the lowest hourly of its prices; a listing with no price at all is not
//!    offered.
//! 4. **Order** ([`offers`]). `price`: the compared price, lowest first; `score`,
//!    `uptime`, `rating`: highest first, an unknown uptime or rating last; `mix`:
//!    [`crate::catalog::rank`]'s order, its price part the compared price. Ties go to
//!    the lower compared price, then the lower listing id, so the order of the input
//!    never matters. [`Offer::rank`] is the rank's value under `mix`, else 0. Prices
//!    compare within one currency: a client comparing prices filters by `currency`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::control::CompatLevel;
use uuid::Uuid;

use crate::catalog::{Categories, RankInput, RankWeights, rank};
use crate::interrupt::{defaults, price_for};
use crate::listings::{Listing, ListingQuery, read_filters};
use crate::quote::{self, Price, Term};
use crate::records::{from_name, name_of};
use crate::resell::{FieldError, Goal, Interruptibility, PricingMode, ResourceKind};

/// A reserved term's length when the client gave no period: 30 days.
pub const DEFAULT_TERM_HOURS: u64 = 720;
/// The longest period a client may ask for: ten years.
pub const MAX_PERIOD_HOURS: u64 = 87_600;
/// The most providers `vendors` may name.
pub const MAX_VENDORS: usize = 50;

const GIB: u64 = 1 << 30;
const HOUR_MS: i64 = 3_600_000;

/// The first this many of [`OFFER_FILTERS`] are a listing search's, read by
/// [`ListingQuery::parse`].
const SHARED: usize = 9;

/// The weights of a mix, by their query names, in [`RankWeights`]' order.
const WEIGHTS: [&str; 4] = ["w_price", "w_score", "w_uptime", "w_rating"];

/// The parameters an offer search understands, by their query names.
pub const OFFER_FILTERS: [&str; 18] = [
    "kind",
    "category",
    "zone",
    "pricing_mode",
    "interruptibility",
    "compat",
    "min_rating",
    "max_price",
    "currency",
    "min_cores",
    "min_memory_gb",
    "vendors",
    "period_hours",
    "rank_by",
    "w_price",
    "w_score",
    "w_uptime",
    "w_rating",
];

/// The criterion offers are ordered by (rule 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RankBy {
    /// Cheapest compared price first.
    Price,
    /// Fastest first.
    Score,
    /// Best measured uptime first (unknown last).
    Uptime,
    /// Best rated first (unrated last).
    Rating,
    /// The weighted mix of [`crate::catalog::rank`].
    #[default]
    Mix,
}

/// A client's offer search (rule 1); every filter given must match (rule 3).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OfferQuery {
    /// Of this kind.
    pub kind: Option<ResourceKind>,
    /// In this size category.
    pub category: Option<String>,
    /// In this zone.
    pub zone: Option<String>,
    /// Sold, with a price, in this pricing mode; its price is the one compared.
    pub pricing_mode: Option<PricingMode>,
    /// With this interruptibility.
    pub interruptibility: Option<Interruptibility>,
    /// At least this compatibility level.
    pub compat: Option<CompatLevel>,
    /// At least this average rating.
    pub min_rating: Option<f64>,
    /// At most this compared hourly price, minor units.
    pub max_price: Option<Price>,
    /// Priced in this currency (upper case).
    pub currency: Option<String>,
    /// A size category of at least this many cores.
    pub min_cores: Option<u32>,
    /// A size category of at least this much memory, GiB.
    pub min_memory_gb: Option<u64>,
    /// Only these providers' listings.
    pub vendors: Option<BTreeSet<String>>,
    /// How long the client wants the capacity, hours: the reserved term offered and
    /// the totals shown.
    pub period_hours: Option<u64>,
    /// The order.
    pub rank_by: RankBy,
    /// The mix's weights when the client gave any; else the defaults.
    pub weights: Option<RankWeights>,
}

impl OfferQuery {
    /// Reads a search from its query pairs (rule 1); every problem is named by its
    /// parameter.
    pub fn parse(pairs: &[(String, String)]) -> Result<Self, Vec<FieldError>> {
        let mut q = OfferQuery::default();
        let mut shared = Vec::new();
        let mut weights = [None::<f64>; 4];
        let mut errors = read_filters(pairs, &OFFER_FILTERS, "offers", |key, value| {
            let not = |what: &str| Err(format!("{value:?} is not {what}"));
            if OFFER_FILTERS[..SHARED].contains(&key) {
                let pair = (key.to_owned(), value.to_owned());
                ListingQuery::parse(std::slice::from_ref(&pair))
                    .map_err(|e| e[0].message.clone())?;
                shared.push(pair);
                return Ok(());
            }
            match key {
                "min_cores" => match value.parse::<u32>() {
                    Ok(n) if n >= 1 => q.min_cores = Some(n),
                    _ => return not("a number of cores of at least 1"),
                },
                "min_memory_gb" => match value.parse::<u64>() {
                    Ok(n) if n >= 1 => q.min_memory_gb = Some(n),
                    _ => return not("a number of GiB of at least 1"),
                },
                "vendors" => {
                    let items: Vec<&str> = value.split(',').map(str::trim).collect();
                    if items.iter().any(|v| v.is_empty()) {
                        return not("provider accounts separated by commas, none empty");
                    }
                    if items.len() > MAX_VENDORS {
                        return Err(format!(
                            "{} providers are more than {MAX_VENDORS}",
                            items.len()
                        ));
                    }
                    q.vendors = Some(items.into_iter().map(str::to_owned).collect());
                }
                "period_hours" => match value.parse::<u64>() {
                    Ok(h) if (1..=MAX_PERIOD_HOURS).contains(&h) => q.period_hours = Some(h),
                    _ => return not("a period of 1 to 87600 hours"),
                },
                "rank_by" => match from_name(value) {
                    Some(r) => q.rank_by = r,
                    None => return not("price, score, uptime, rating or mix"),
                },
                _ => match (WEIGHTS.iter().position(|w| *w == key), value.parse::<f64>()) {
                    (Some(i), Ok(w)) if w.is_finite() && w >= 0.0 => weights[i] = Some(w),
                    (Some(_), _) => return not("a finite weight of at least 0"),
                    (None, _) => unreachable!("every filter has a branch"),
                },
            }
            Ok(())
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        let error = |field: &str, message: String| FieldError {
            field: field.to_owned(),
            message,
        };
        let given = WEIGHTS.iter().zip(weights).filter(|(_, w)| w.is_some());
        if q.rank_by != RankBy::Mix {
            let by = name_of(&q.rank_by);
            errors.extend(
                given.map(|(name, _)| {
                    error(name, format!("{name} weighs a mix, and rank_by is {by}"))
                }),
            );
        } else if given.count() > 0 {
            let [price, performance, uptime, rating] = weights.map(|w| w.unwrap_or(0.0));
            if price + performance + uptime + rating <= 0.0 {
                errors.push(error("w_price", "the weights of a mix are all 0".into()));
            }
            q.weights = Some(RankWeights {
                price,
                performance,
                uptime,
                rating,
                ..RankWeights::default()
            });
        }
        match ListingQuery::parse(&shared) {
            Ok(l) => {
                q = OfferQuery {
                    kind: l.kind,
                    category: l.category,
                    zone: l.zone,
                    pricing_mode: l.pricing_mode,
                    interruptibility: l.interruptibility,
                    compat: l.compat,
                    min_rating: l.min_rating,
                    max_price: l.max_price,
                    currency: l.currency,
                    ..q
                }
            }
            Err(e) => errors.extend(e),
        }
        if errors.is_empty() {
            Ok(q)
        } else {
            Err(errors)
        }
    }

    /// The filters shared with a listing search, but the price (rule 3 compares it
    /// per mode).
    fn listing_filters(&self) -> ListingQuery {
        ListingQuery {
            kind: self.kind,
            category: self.category.clone(),
            zone: self.zone.clone(),
            pricing_mode: self.pricing_mode,
            interruptibility: self.interruptibility,
            compat: self.compat,
            min_rating: self.min_rating,
            currency: self.currency.clone(),
            ..ListingQuery::default()
        }
    }
}

/// The price of a listing in one pricing mode (rule 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModePrice {
    /// The mode.
    pub mode: PricingMode,
    /// Per host-hour, minor units: for spot and auction, the least a bid must be.
    pub hourly: Price,
    /// Paid when a reserved term starts; 0 in every other mode.
    pub upfront: Price,
    /// A reserved term's length.
    pub term_ms: Option<i64>,
    /// The price holds until this instant (exclusive); none: until the provider
    /// changes it.
    pub valid_until_ms: Option<UnixMillis>,
    /// What the asked period costs in this mode (immediate, on_demand, reserved).
    pub total: Option<Price>,
    /// The hours after which a reserved term is the cheaper choice.
    pub break_even_hours: Option<u64>,
}

/// The prices of `listing` in every mode it is sold in, in [`PricingMode`] order,
/// for a provider `minimum` and the client's `period_hours` (rule 2).
pub fn terms(
    listing: &Listing,
    minimum: Price,
    period_hours: Option<u64>,
    now_ms: UnixMillis,
    quote_validity_ms: i64,
) -> Vec<ModePrice> {
    let period = period_hours.filter(|h| *h >= 1);
    let at = |mode, hourly| ModePrice {
        mode,
        hourly,
        upfront: 0,
        term_ms: None,
        valid_until_ms: None,
        total: None,
        break_even_hours: None,
    };
    let for_period = |hourly: Price| period.map(|h| hourly.saturating_mul(h));
    let price = listing.price;
    let modes = listing.pricing_modes.iter();
    modes
        .filter_map(|&mode| match mode {
            PricingMode::Spot | PricingMode::Auction => Some(at(mode, minimum)),
            PricingMode::Immediate => {
                let q = quote::issue(
                    Uuid::nil(),
                    &listing.id,
                    price,
                    minimum,
                    now_ms,
                    quote_validity_ms,
                )
                .ok()?;
                Some(ModePrice {
                    valid_until_ms: Some(q.valid_until_ms),
                    total: for_period(q.price),
                    ..at(mode, q.price)
                })
            }
            PricingMode::OnDemand => {
                let hourly = quote::on_demand(price, minimum).ok()?;
                Some(ModePrice {
                    total: for_period(hourly),
                    ..at(mode, hourly)
                })
            }
            PricingMode::Reserved => {
                let hours = period.unwrap_or(DEFAULT_TERM_HOURS);
                let goal = defaults(
                    Goal::MaximiseUtilisation,
                    &listing.pricing_modes,
                    listing.interruptibility,
                );
                let hourly = price_for(&goal, price, minimum);
                let saving = u128::from(price.saturating_sub(hourly)) * u128::from(hours);
                let term = Term {
                    upfront: u64::try_from(saving.div_ceil(4)).unwrap_or(u64::MAX),
                    hourly,
                    term_ms: i64::try_from(hours)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(HOUR_MS),
                };
                quote::check_term(&term, price, minimum).ok()?;
                Some(ModePrice {
                    upfront: term.upfront,
                    term_ms: Some(term.term_ms),
                    total: period.map(|_| quote::term_cost(&term)),
                    break_even_hours: quote::break_even_hours(&term, price),
                    ..at(mode, hourly)
                })
            }
        })
        .collect()
}

/// What the book and the history know of a listing, for its offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OfferStats {
    /// Units one can reserve now.
    pub available: u32,
    /// Reservations it had.
    pub past_reservations: u64,
}

/// One result of an offer search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Offer {
    /// The listing (its rating, uptime and score with it).
    pub listing: Listing,
    /// Its size category's least cores; none when the category is unknown.
    pub cores: Option<u32>,
    /// Its size category's least memory, bytes; none when the category is unknown.
    pub memory_bytes: Option<u64>,
    /// Its price in every mode it is sold in (rule 2).
    pub prices: Vec<ModePrice>,
    /// The hourly price compared by `max_price` and the order (rule 3).
    pub price: Price,
    /// Units one can reserve now.
    pub available: u32,
    /// Reservations it had.
    pub past_reservations: u64,
    /// Its [`crate::catalog::rank`] value when ranked by the mix; else 0.
    pub rank: f64,
}

/// The offers `query` finds among `listings`, in its order (rules 3 and 4). `stats`
/// and `minimums` are keyed by listing id; a listing missing from `minimums` has its
/// own price as its minimum.
pub fn offers(
    listings: &[Listing],
    stats: &BTreeMap<String, OfferStats>,
    minimums: &BTreeMap<String, Price>,
    categories: &Categories,
    query: &OfferQuery,
    now_ms: UnixMillis,
    quote_validity_ms: i64,
) -> Vec<Offer> {
    let filters = query.listing_filters();
    let mut found: Vec<Offer> = listings
        .iter()
        .filter_map(|l| {
            let s = stats.get(&l.id).copied().unwrap_or_default();
            let vendor = query
                .vendors
                .as_ref()
                .is_none_or(|v| v.contains(&l.provider));
            if s.available == 0 || !vendor || !filters.matches(l) {
                return None;
            }
            let category = categories.list().iter().find(|c| c.name == l.category);
            let cores = category.map(|c| c.min_cores);
            let memory_bytes = category.map(|c| c.min_memory_bytes);
            let sized = query
                .min_cores
                .is_none_or(|n| cores.is_some_and(|c| c >= n))
                && query
                    .min_memory_gb
                    .is_none_or(|gb| memory_bytes.is_some_and(|m| m >= gb.saturating_mul(GIB)));
            if !sized {
                return None;
            }
            let minimum = minimums.get(&l.id).copied().unwrap_or(l.price);
            let prices = terms(l, minimum, query.period_hours, now_ms, quote_validity_ms);
            let price = match query.pricing_mode {
                Some(m) => prices.iter().find(|p| p.mode == m).map(|p| p.hourly),
                None => prices.iter().map(|p| p.hourly).min(),
            }?;
            if query.max_price.is_some_and(|max| price > max) {
                return None;
            }
            Some(Offer {
                listing: l.clone(),
                cores,
                memory_bytes,
                prices,
                price,
                available: s.available,
                past_reservations: s.past_reservations,
                rank: 0.0,
            })
        })
        .collect();
    let tie = |a: &Offer, b: &Offer| {
        (a.price.cmp(&b.price)).then_with(|| a.listing.id.cmp(&b.listing.id))
    };
    let known = |x: Option<f64>| x.unwrap_or(f64::NEG_INFINITY);
    let highest = |by: fn(&Listing) -> Option<f64>| {
        move |a: &Offer, b: &Offer| {
            (known(by(&b.listing)).total_cmp(&known(by(&a.listing)))).then_with(|| tie(a, b))
        }
    };
    match query.rank_by {
        RankBy::Price => found.sort_by(tie),
        RankBy::Score => found.sort_by(highest(|l| Some(l.score))),
        RankBy::Uptime => found.sort_by(highest(|l| l.uptime)),
        RankBy::Rating => found.sort_by(highest(|l| l.rating)),
        RankBy::Mix => {
            let inputs: Vec<RankInput> = found
                .iter()
                .map(|o| RankInput {
                    id: o.listing.id.clone(),
                    price: o.price,
                    score: o.listing.score,
                    uptime: o.listing.uptime,
                    rating: o.listing.rating,
                    failed_retest: o.listing.failed_retest,
                })
                .collect();
            let weights = query.weights.unwrap_or_default();
            let ranked: BTreeMap<String, (usize, f64)> = rank(&inputs, &weights)
                .into_iter()
                .enumerate()
                .map(|(i, r)| (r.id, (i, r.rank)))
                .collect();
            for o in &mut found {
                o.rank = ranked.get(&o.listing.id).map_or(0.0, |r| r.1);
            }
            found.sort_by_key(|o| ranked.get(&o.listing.id).map_or(usize::MAX, |r| r.0));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use PricingMode::{Auction, Immediate, OnDemand, Reserved, Spot};
    use proptest::prelude::*;

    const NOW: UnixMillis = 1_000;
    const VALIDITY: i64 = 60_000;

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
            pricing_modes: [OnDemand].into(),
            interruptibility: Interruptibility::PriceBased,
            currency: "EUR".into(),
            price: 100,
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

    /// Two units free and three past reservations for each listing named.
    fn free(ids: &[&str]) -> BTreeMap<String, OfferStats> {
        let s = OfferStats {
            available: 2,
            past_reservations: 3,
        };
        ids.iter().map(|id| ((*id).to_owned(), s)).collect()
    }

    /// The offers `query` finds with the standard categories, at [`NOW`].
    fn search(ls: &[Listing], stats: &BTreeMap<String, OfferStats>, query: &str) -> Vec<Offer> {
        let q = OfferQuery::parse(&pairs(query)).unwrap_or_else(|e| panic!("{query}: {e:?}"));
        let (cats, mins) = (Categories::standard(), BTreeMap::from([("a".into(), 40)]));
        offers(ls, stats, &mins, &cats, &q, NOW, VALIDITY)
    }

    /// The ids `query` finds among `ls`, each with two units free; `a`'s minimum is 40,
    /// every other listing's its price.
    fn found(ls: &[Listing], query: &str) -> Vec<String> {
        let ids: Vec<&str> = ls.iter().map(|l| l.id.as_str()).collect();
        let got = search(ls, &free(&ids), query);
        got.into_iter().map(|o| o.listing.id).collect()
    }

    /// Each case (rule 1): (rule it pins, query, the parameters refused, in order).
    #[rustfmt::skip]
    #[test]
    fn every_problem_of_a_query_is_named_by_its_parameter() {
        let many: Vec<String> = (0..=MAX_VENDORS).map(|i| format!("p{i}")).collect();
        let too_many = format!("vendors={}", many.join(","));
        let cases: [(&str, &str, &[&str]); 22] = [
            ("no parameter", "", &[]),
            ("a filter it does not know", "colour=red", &["colour"]),
            ("a filter twice", "zone=a&zone=b", &["zone"]),
            ("a shared value, as listings read it", "kind=gpu", &["kind"]),
            ("a rating above 5", "min_rating=9", &["min_rating"]),
            ("a negative price", "max_price=-1", &["max_price"]),
            ("no core", "min_cores=0", &["min_cores"]),
            ("cores not a number", "min_cores=four", &["min_cores"]),
            ("no memory", "min_memory_gb=0", &["min_memory_gb"]),
            ("no vendor", "vendors=", &["vendors"]),
            ("an empty vendor", "vendors=bob,,carol", &["vendors"]),
            ("more vendors than allowed", &too_many, &["vendors"]),
            ("a period of no hour", "period_hours=0", &["period_hours"]),
            ("a period over ten years", "period_hours=87601", &["period_hours"]),
            ("a period of ten years", "period_hours=87600", &[]),
            ("an unknown criterion", "rank_by=cost", &["rank_by"]),
            ("a negative weight", "w_score=-1", &["w_score"]),
            ("a weight not a number", "w_uptime=NaN", &["w_uptime"]),
            ("an infinite weight", "w_rating=inf", &["w_rating"]),
            ("weights all 0: named w_price", "w_uptime=0&w_score=0", &["w_price"]),
            ("weights with another criterion, each", "w_score=1&rank_by=rating&w_price=2", &["w_price", "w_score"]),
            ("every problem, in order", "min_cores=0&colour=red&kind=gpu", &["min_cores", "colour", "kind"]),
        ];
        for (rule, query, want) in cases {
            let got = match OfferQuery::parse(&pairs(query)) {
                Ok(_) => vec![],
                Err(e) => e.into_iter().map(|e| e.field).collect(),
            };
            assert_eq!(got, want, "{rule}");
        }
        let errors = OfferQuery::parse(&pairs("colour=red&zone=a&zone=b")).unwrap_err();
        assert!(errors[0].message.contains("is not a filter of offers"));
        assert!(errors[1].message.contains("given twice"));
    }

    #[test]
    fn a_query_reads_every_filter() {
        let q = OfferQuery::parse(&pairs(
            "kind=compute&category=medium&zone=z&pricing_mode=reserved&interruptibility=dont_care\
             &compat=highly&min_rating=4&max_price=90&currency=eur&min_cores=4&min_memory_gb=8\
             &vendors=bob, carol&period_hours=100&w_price=1&w_uptime=0.5",
        ))
        .unwrap();
        let want = OfferQuery {
            kind: Some(ResourceKind::Compute),
            category: Some("medium".into()),
            zone: Some("z".into()),
            pricing_mode: Some(Reserved),
            interruptibility: Some(Interruptibility::DontCare),
            compat: Some(CompatLevel::Highly),
            min_rating: Some(4.0),
            max_price: Some(90),
            currency: Some("EUR".into()),
            min_cores: Some(4),
            min_memory_gb: Some(8),
            vendors: Some(["bob".to_owned(), "carol".to_owned()].into()),
            period_hours: Some(100),
            rank_by: RankBy::Mix,
            weights: Some(RankWeights {
                price: 1.0,
                performance: 0.0,
                uptime: 0.5,
                rating: 0.0,
                failed_retest_factor: 0.5,
            }),
        };
        assert_eq!(q, want, "weights not given are 0; a failed re-test halves");
        assert_eq!(OfferQuery::parse(&[]).unwrap(), OfferQuery::default());
        assert_eq!(OfferQuery::default().rank_by, RankBy::Mix);
    }

    /// Each case (rule 3): (rule it pins, query, category, whether it is found).
    #[rustfmt::skip]
    #[test]
    fn cores_and_memory_are_the_size_categorys() {
        let cases = [
            ("medium has 4 cores", "min_cores=4", "medium", true),
            ("medium has fewer than 5", "min_cores=5", "medium", false),
            ("medium has 8 GiB", "min_memory_gb=8", "medium", true),
            ("medium has less than 9 GiB", "min_memory_gb=9", "medium", false),
            ("large has both", "min_cores=16&min_memory_gb=32", "large", true),
            ("an unknown category: no cores", "min_cores=1", "gpu", false),
            ("an unknown category: no memory", "min_memory_gb=1", "gpu", false),
            ("an unknown category, no size asked", "", "gpu", true),
        ];
        for (rule, query, category, want) in cases {
            let l = Listing { category: category.into(), ..listing("a") };
            assert_eq!(found(&[l], query).len() == 1, want, "{rule}");
        }
        let ls = [listing("a"), Listing { category: "gpu".into(), ..listing("b") }];
        let got = search(&ls, &free(&["a", "b"]), "");
        let sizes: Vec<_> = got.iter().map(|o| (o.cores, o.memory_bytes)).collect();
        assert_eq!(sizes, [(Some(4), Some(8 * GIB)), (None, None)], "the category's minimums");
    }

    #[test]
    fn vendors_keep_only_their_listings_and_shared_filters_apply() {
        let of = |id: &str, provider: &str| Listing {
            provider: provider.into(),
            ..listing(id)
        };
        let ls = [of("a", "bob"), of("b", "carol"), of("c", "dave")];
        let none: [&str; 0] = [];
        assert_eq!(found(&ls, "vendors=bob,carol&rank_by=price"), ["a", "b"]);
        assert_eq!(found(&ls, "vendors=erin"), none);
        assert_eq!(found(&ls, "zone=elsewhere"), none);
        assert_eq!(found(&ls, "compat=fully"), none);
        assert_eq!(
            found(&ls, "kind=compute&compat=highly&currency=eur").len(),
            3
        );
    }

    fn at(mode: PricingMode, hourly: Price, until: Option<i64>, total: Option<Price>) -> ModePrice {
        ModePrice {
            mode,
            hourly,
            upfront: 0,
            term_ms: None,
            valid_until_ms: until,
            total,
            break_even_hours: None,
        }
    }

    /// A term of `hours`, breaking even after a quarter of them.
    fn term(hourly: Price, upfront: Price, hours: u64, total: Option<Price>) -> ModePrice {
        ModePrice {
            upfront,
            term_ms: Some(hours as i64 * HOUR_MS),
            break_even_hours: Some(hours.div_ceil(4)),
            ..at(Reserved, hourly, None, total)
        }
    }

    /// Each case (rule 2): (rule it pins, listing price, minimum, period, mode, its price).
    #[rustfmt::skip]
    #[test]
    fn each_mode_has_its_price_and_how_long_it_holds() {
        let held = Some(NOW + VALIDITY);
        type Case = (&'static str, Price, Price, Option<u64>, PricingMode, Option<ModePrice>);
        let cases: [Case; 16] = [
            ("spot: the minimum, no total", 100, 40, Some(10), Spot, Some(at(Spot, 40, None, None))),
            ("auction: the minimum, no total", 100, 40, Some(10), Auction, Some(at(Auction, 40, None, None))),
            ("immediate: held as a quote now", 100, 40, Some(10), Immediate, Some(at(Immediate, 100, held, Some(1_000)))),
            ("immediate, no period: no total", 100, 40, None, Immediate, Some(at(Immediate, 100, held, None))),
            ("immediate below the minimum: left out", 30, 40, None, Immediate, None),
            ("on-demand: held until changed", 100, 40, Some(10), OnDemand, Some(at(OnDemand, 100, None, Some(1_000)))),
            ("on-demand below the minimum: left out", 30, 40, None, OnDemand, None),
            ("reserved: 720 h at 70 %, a quarter of the saving", 100, 40, None, Reserved, Some(term(70, 30 * 720 / 4, 720, None))),
            ("reserved for the period: term_cost", 100, 40, Some(100), Reserved, Some(term(70, 750, 100, Some(750 + 7_000)))),
            ("reserved, a period of 0: as none", 100, 40, Some(0), Reserved, Some(term(70, 5_400, 720, None))),
            ("reserved never below the minimum", 100, 80, None, Reserved, Some(term(80, 20 * 720 / 4, 720, None))),
            ("reserved rounded up: 23.1 is 24, 6.75 is 7", 33, 1, Some(3), Reserved, Some(term(24, 7, 3, Some(7 + 72)))),
            ("reserved at the minimum: not cheaper, left out", 100, 100, None, Reserved, None),
            ("reserved above the minimum: left out", 100, 101, None, Reserved, None),
            ("reserved at 3: 70 % rounds up to 3, left out", 3, 0, None, Reserved, None),
            ("reserved at 4: 3", 4, 0, None, Reserved, Some(term(3, 180, 720, None))),
        ];
        for (rule, price, minimum, period, mode, want) in cases {
            let l = Listing { price, pricing_modes: [mode].into(), ..listing("a") };
            let got = terms(&l, minimum, period, NOW, VALIDITY);
            assert_eq!(got.first(), want.as_ref(), "{rule}");
        }
        let all = Listing { pricing_modes: [Reserved, Spot, OnDemand, Auction, Immediate].into(), ..listing("a") };
        let modes: Vec<_> = terms(&all, 40, None, NOW, VALIDITY).iter().map(|p| p.mode).collect();
        assert_eq!(modes, [Spot, Auction, Immediate, OnDemand, Reserved], "in mode order");
        let never = terms(&all, 40, None, NOW, 0);
        assert!(never.iter().all(|p| p.mode != Immediate), "a quote that holds no time: left out");
    }

    /// Each case (rule 3): (rule it pins, query, found). `a` sells four modes at 100
    /// with a minimum of 40; `b` sells on-demand and reserved at its minimum.
    #[rustfmt::skip]
    #[test]
    fn a_price_filter_compares_the_asked_modes_price_else_the_lowest() {
        let cases: [(&str, &str, &[&str]); 6] = [
            ("no mode: the lowest, spot's 40", "max_price=40", &["a"]),
            ("below every price", "max_price=39", &[]),
            ("on-demand's price", "pricing_mode=on_demand&max_price=99", &[]),
            ("a term's 70", "pricing_mode=reserved&max_price=70", &["a"]),
            ("a term left out is not sold", "pricing_mode=reserved", &["a"]),
            ("a mode not sold", "pricing_mode=auction", &[]),
        ];
        let ls = [
            Listing { pricing_modes: [Spot, Immediate, OnDemand, Reserved].into(), ..listing("a") },
            Listing { pricing_modes: [OnDemand, Reserved].into(), ..listing("b") },
        ];
        for (rule, query, want) in cases {
            assert_eq!(found(&ls, query), want, "{rule}");
        }
    }

    #[test]
    fn only_listed_listings_with_a_unit_free_now_are_offered() {
        let gone = |id: &str| Listing {
            available: 0,
            ..listing(id)
        };
        let delisted = Listing {
            listed: false,
            ..listing("d")
        };
        let ls = [gone("a"), gone("b"), listing("c"), delisted];
        let mut stats = free(&["a", "d"]);
        let none_free = OfferStats {
            available: 0,
            past_reservations: 9,
        };
        stats.insert("c".into(), none_free);
        let got = search(&ls, &stats, "");
        let shape: Vec<_> = (got.iter())
            .map(|o| (o.listing.id.as_str(), o.available, o.past_reservations))
            .collect();
        assert_eq!(
            shape,
            [("a", 2, 3)],
            "free units from the stats, not the listing; missing from them: none"
        );
    }

    /// Each case (rule 4): (rule it pins, query, the order).
    #[rustfmt::skip]
    #[test]
    fn offers_come_in_the_chosen_order_with_ties_to_price_then_id() {
        let ls = [
            Listing { price: 40, score: 2.0, uptime: Some(0.90), rating: Some(3.0), ..listing("a") },
            Listing { price: 20, uptime: None, rating: None, ..listing("c") },
            Listing { price: 20, uptime: Some(0.99), rating: Some(5.0), ..listing("b") },
            Listing { price: 20, uptime: None, rating: Some(4.0), score: 0.5, ..listing("d") },
        ];
        let cases = [
            ("price: lowest first, then id", "rank_by=price", ["b", "c", "d", "a"]),
            ("score: highest first, then price, id", "rank_by=score", ["a", "b", "c", "d"]),
            ("uptime: unknown last", "rank_by=uptime", ["b", "a", "c", "d"]),
            ("rating: unrated last", "rank_by=rating", ["b", "d", "a", "c"]),
            ("mix: catalog's default rank", "", ["b", "a", "c", "d"]),
            ("mix of price alone: ties to id", "w_price=1", ["b", "c", "d", "a"]),
            ("mix of score alone", "w_score=1", ["a", "b", "c", "d"]),
            ("mix of rating: a tie to the lower price", "w_rating=2", ["b", "d", "c", "a"]),
        ];
        for (rule, query, want) in cases {
            assert_eq!(found(&ls, query), want, "{rule}");
            let reversed: Vec<Listing> = ls.iter().rev().cloned().collect();
            assert_eq!(found(&reversed, query), want, "{rule}: whatever the input's order");
        }
        let ranks = |query: &str| -> Vec<f64> {
            search(&ls, &free(&["a", "b", "c", "d"]), query).iter().map(|o| o.rank).collect()
        };
        assert_eq!(ranks("w_price=1"), [1.0, 1.0, 1.0, 0.5], "the mix's value");
        assert_eq!(ranks("rank_by=price"), [0.0; 4], "no rank but the mix's");
    }

    const MODES: [PricingMode; 5] = [Spot, Auction, Immediate, OnDemand, Reserved];

    /// A listing, its free units and its provider's minimum.
    fn arb_listing() -> impl Strategy<Value = (Listing, u32, Price)> {
        let provider = prop::sample::select(vec!["a", "b", "c"]);
        let category = prop::sample::select(vec!["small", "medium", "large", "gpu"]);
        let modes = prop::collection::btree_set(prop::sample::select(MODES.to_vec()), 0..=5);
        let figures = (
            prop::option::of(1.0f64..=5.0),
            prop::option::of(0.0f64..=1.0),
        );
        (
            (1u64..200, 0u64..200, modes, 0u32..3, any::<bool>()),
            (figures, 0.1f64..3.0, provider, category),
        )
            .prop_map(
                |((price, minimum, modes, free, listed), (figures, score, p, c))| {
                    let l = Listing {
                        price,
                        pricing_modes: modes,
                        listed,
                        rating: figures.0,
                        uptime: figures.1,
                        score,
                        provider: p.into(),
                        category: c.into(),
                        ..listing("")
                    };
                    (l, free, minimum)
                },
            )
    }

    fn arb_query() -> impl Strategy<Value = OfferQuery> {
        use RankBy::{Mix, Price, Rating, Score, Uptime};
        let vendors = prop::collection::btree_set(prop::sample::select(vec!["a", "b"]), 1..=2);
        (
            prop::option::of(prop::sample::select(MODES.to_vec())),
            prop::option::of(0u64..200),
            prop::option::of(prop::sample::select(vec![1u32, 4, 16, 64])),
            prop::option::of(vendors),
            prop::option::of(1u64..2_000),
            prop::sample::select(vec![Price, Score, Uptime, Rating, Mix]),
        )
            .prop_map(
                |(pricing_mode, max_price, min_cores, vendors, period, rank_by)| OfferQuery {
                    pricing_mode,
                    max_price,
                    min_cores,
                    vendors: vendors.map(|v| v.into_iter().map(str::to_owned).collect()),
                    period_hours: period,
                    rank_by,
                    ..OfferQuery::default()
                },
            )
    }

    proptest! {
        /// Every offer is listed, has a unit free, passes every filter given and is
        /// priced as `terms` prices it; by price, compared prices never decrease; a
        /// term is always cheaper than on-demand, at or above the minimum, and breaks
        /// even within a quarter of itself.
        #[test]
        fn every_offer_passes_its_filters_and_every_term_saves(
            raw in prop::collection::vec(arb_listing(), 0..12),
            q in arb_query(),
        ) {
            let mut listings = Vec::new();
            let (mut stats, mut minimums) = (BTreeMap::new(), BTreeMap::new());
            for (i, (l, available, minimum)) in raw.into_iter().enumerate() {
                let id = format!("lst-{i:02}");
                stats.insert(id.clone(), OfferStats { available, past_reservations: 0 });
                minimums.insert(id.clone(), minimum);
                listings.push(Listing { id, ..l });
            }
            let cats = Categories::standard();
            let got = offers(&listings, &stats, &minimums, &cats, &q, NOW, VALIDITY);
            for o in &got {
                let l = &o.listing;
                prop_assert!(l.listed && o.available > 0 && o.available == stats[&l.id].available);
                prop_assert!(q.vendors.as_ref().is_none_or(|v| v.contains(&l.provider)));
                prop_assert!(q.min_cores.is_none_or(|n| o.cores.is_some_and(|c| c >= n)));
                prop_assert!(q.max_price.is_none_or(|m| o.price <= m));
                match q.pricing_mode {
                    Some(m) => prop_assert!(o.prices.iter().any(|p| p.mode == m && p.hourly == o.price)),
                    None => prop_assert_eq!(o.prices.iter().map(|p| p.hourly).min(), Some(o.price)),
                }
                let want = terms(l, minimums[&l.id], q.period_hours, NOW, VALIDITY);
                prop_assert_eq!(&o.prices, &want);
            }
            if q.rank_by == RankBy::Price {
                prop_assert!(got.windows(2).all(|w| w[0].price <= w[1].price));
            }
            for l in &listings {
                let minimum = minimums[&l.id];
                for p in terms(l, minimum, q.period_hours, NOW, VALIDITY) {
                    if p.mode == Reserved {
                        let hours = p.term_ms.unwrap_or(0) / HOUR_MS;
                        prop_assert!(p.hourly < l.price && p.hourly >= minimum);
                        prop_assert_eq!(p.break_even_hours, Some((hours as u64).div_ceil(4)));
                    }
                }
            }
        }
    }
}
