//! Prices that are set rather than discovered by bidding (issue 16): the immediate
//! quote, fixed on-demand and the long-term term.
//!
//! Rules, each with its edge cases:
//!
//! - **Immediate quote.** A price for one listing, held from `issued_at_ms` until
//!   `valid_until_ms` (exclusive; [`DEFAULT_VALIDITY_MS`] unless the shell says
//!   otherwise). Accepted before `valid_until_ms` it is honoured at exactly its
//!   price, whatever the listing's price became since; accepted at or after it, it
//!   is refused with both times. A quote below the provider's minimum is never
//!   issued.
//! - **Fixed on-demand.** An hourly price at or above the provider's minimum;
//!   nothing is held, the reservation lasts until released.
//! - **Long-term.** An upfront fee plus an hourly rate for a term. The hourly rate is
//!   at or above the provider's minimum and strictly below the on-demand rate of the
//!   same listing (a term that is never cheaper is refused: nobody should sign it);
//!   the term is at least an hour. [`break_even_hours`] is when the term becomes the
//!   cheaper choice, shown to the client beside the offer.
//!
//! Prices are minor units of the listing's currency per host-hour.

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

pub use crate::Refusal;
use crate::refuse;

/// Minor units of a currency (per host-hour where a rate).
pub type Price = u64;

/// How long a quote holds unless the shell says otherwise.
pub const DEFAULT_VALIDITY_MS: i64 = 60_000;

/// A price held for one listing for a short time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quote {
    /// The quote.
    pub id: Uuid,
    /// The listing it prices.
    pub listing: String,
    /// The hourly price it holds.
    pub price: Price,
    /// When it was given.
    pub issued_at_ms: UnixMillis,
    /// It holds until this instant (exclusive).
    pub valid_until_ms: UnixMillis,
}

/// A quote of `price` for `listing` at `now_ms`, holding for `validity_ms`; refused
/// below the provider's `minimum` or for a validity that is not positive.
pub fn issue(
    id: Uuid,
    listing: &str,
    price: Price,
    minimum: Price,
    now_ms: UnixMillis,
    validity_ms: i64,
) -> Result<Quote, Refusal> {
    if price < minimum {
        return Err(refuse(
            "minimum",
            format!("a quote of {price} is below the provider's minimum of {minimum}"),
        ));
    }
    if validity_ms <= 0 {
        return Err(refuse(
            "validity",
            format!("a quote must hold for some time, not {validity_ms} ms"),
        ));
    }
    Ok(Quote {
        id,
        listing: listing.to_owned(),
        price,
        issued_at_ms: now_ms,
        valid_until_ms: now_ms.saturating_add(validity_ms),
    })
}

/// The price `quote` binds when accepted at `now_ms`: its own, if still valid.
pub fn accept(quote: &Quote, now_ms: UnixMillis) -> Result<Price, Refusal> {
    if now_ms >= quote.valid_until_ms {
        return Err(refuse(
            "expired",
            format!(
                "quote {} held until {} and was accepted at {now_ms}",
                quote.id, quote.valid_until_ms
            ),
        ));
    }
    Ok(quote.price)
}

/// A fixed on-demand rate, checked against the provider's minimum.
pub fn on_demand(hourly: Price, minimum: Price) -> Result<Price, Refusal> {
    if hourly < minimum {
        return Err(refuse(
            "minimum",
            format!("an hourly rate of {hourly} is below the provider's minimum of {minimum}"),
        ));
    }
    Ok(hourly)
}

/// A long-term term: an upfront fee, then a lower hourly rate for its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Term {
    /// Paid when the term starts.
    pub upfront: Price,
    /// Per host-hour during the term.
    pub hourly: Price,
    /// The term's length.
    pub term_ms: i64,
}

const HOUR_MS: i64 = 3_600_000;

/// Checks a term offered beside an on-demand rate of `on_demand_hourly`: at least an
/// hour long, its hourly rate at or above `minimum` and below the on-demand rate.
pub fn check_term(term: &Term, on_demand_hourly: Price, minimum: Price) -> Result<(), Refusal> {
    if term.term_ms < HOUR_MS {
        return Err(refuse(
            "term",
            format!("a term lasts at least an hour, not {} ms", term.term_ms),
        ));
    }
    if term.hourly < minimum {
        return Err(refuse(
            "minimum",
            format!(
                "a term's hourly rate of {} is below the provider's minimum of {minimum}",
                term.hourly
            ),
        ));
    }
    if term.hourly >= on_demand_hourly {
        return Err(refuse(
            "not_cheaper",
            format!(
                "a term's hourly rate of {} is not below the on-demand rate of {on_demand_hourly}",
                term.hourly
            ),
        ));
    }
    Ok(())
}

/// What the whole term costs: the upfront fee and every hour of it (a last part of
/// an hour is charged in proportion, rounded up to a minor unit).
pub fn term_cost(term: &Term) -> Price {
    let ms = u128::try_from(term.term_ms.max(0)).unwrap_or(0);
    let hours = (u128::from(term.hourly) * ms).div_ceil(HOUR_MS as u128);
    term.upfront
        .saturating_add(u64::try_from(hours).unwrap_or(u64::MAX))
}

/// The hours of use after which `term` costs less than on-demand at
/// `on_demand_hourly`: the upfront fee over the hourly saving, rounded up; `None`
/// when the term never saves (its rate is not lower) or saves only after it ended.
pub fn break_even_hours(term: &Term, on_demand_hourly: Price) -> Option<u64> {
    let saving = on_demand_hourly
        .checked_sub(term.hourly)
        .filter(|s| *s > 0)?;
    let hours = term.upfront.div_ceil(saving);
    let term_hours = u64::try_from(term.term_ms.max(0) / HOUR_MS).unwrap_or(0);
    (hours <= term_hours).then_some(hours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Each case: (rule it pins, price, minimum, validity, accepted at, outcome).
    #[test]
    fn a_quote_is_honoured_at_its_price_until_it_expires() {
        type Case = (
            &'static str,
            Price,
            Price,
            i64,
            i64,
            Result<Price, &'static str>,
        );
        let cases: [Case; 6] = [
            ("accepted at once: its price", 35, 20, 60_000, 1_000, Ok(35)),
            (
                "accepted on the last millisecond: its price",
                35,
                20,
                60_000,
                60_999,
                Ok(35),
            ),
            (
                "accepted at the end: expired",
                35,
                20,
                60_000,
                61_000,
                Err("expired"),
            ),
            (
                "at the provider's minimum: issued",
                20,
                20,
                60_000,
                1_000,
                Ok(20),
            ),
            (
                "below the provider's minimum: never issued",
                19,
                20,
                60_000,
                1_000,
                Err("minimum"),
            ),
            (
                "a validity that is not positive: never issued",
                35,
                20,
                0,
                1_000,
                Err("validity"),
            ),
        ];
        for (rule, price, minimum, validity, at, want) in cases {
            let got = issue(id(1), "lst-1", price, minimum, 1_000, validity)
                .and_then(|q| accept(&q, at))
                .map_err(|r| r.rule);
            assert_eq!(got, want, "{rule}");
        }
        let refused = issue(id(1), "lst-1", 19, 20, 0, 1).unwrap_err();
        assert!(
            refused.message.contains("19") && refused.message.contains("20"),
            "names both numbers: {refused}"
        );
    }

    /// Each case: (rule it pins, term, on-demand rate, minimum, outcome).
    #[test]
    fn a_term_is_longer_than_an_hour_and_cheaper_than_on_demand() {
        let term = |upfront, hourly, hours: i64| Term {
            upfront,
            hourly,
            term_ms: hours * HOUR_MS,
        };
        type Case = (&'static str, Term, Price, Price, Result<(), &'static str>);
        let cases: [Case; 5] = [
            (
                "cheaper per hour, above the minimum",
                term(1_000, 20, 720),
                30,
                10,
                Ok(()),
            ),
            ("shorter than an hour", term(0, 20, 0), 30, 10, Err("term")),
            (
                "below the provider's minimum",
                term(0, 9, 24),
                30,
                10,
                Err("minimum"),
            ),
            (
                "as dear as on-demand",
                term(0, 30, 24),
                30,
                10,
                Err("not_cheaper"),
            ),
            (
                "dearer than on-demand",
                term(0, 31, 24),
                30,
                10,
                Err("not_cheaper"),
            ),
        ];
        for (rule, t, od, min, want) in cases {
            assert_eq!(check_term(&t, od, min).map_err(|r| r.rule), want, "{rule}");
        }
        assert_eq!(on_demand(30, 10), Ok(30));
        assert_eq!(on_demand(9, 10).unwrap_err().rule, "minimum");
    }

    #[test]
    fn a_term_costs_its_fee_and_its_hours_and_breaks_even_when_the_fee_is_saved() {
        let t = Term {
            upfront: 1_000,
            hourly: 20,
            term_ms: 720 * HOUR_MS,
        };
        assert_eq!(term_cost(&t), 1_000 + 20 * 720);
        // A part of an hour in proportion, rounded up.
        let part = Term {
            term_ms: HOUR_MS + HOUR_MS / 3,
            ..t
        };
        assert_eq!(term_cost(&part), 1_000 + 27);
        assert_eq!(break_even_hours(&t, 30), Some(100), "1000 / (30 - 20)");
        assert_eq!(break_even_hours(&t, 23), Some(334), "rounded up");
        assert_eq!(break_even_hours(&t, 20), None, "no saving");
        assert_eq!(
            break_even_hours(&t, 21),
            None,
            "saves only after 1000 hours, the term is 720"
        );
    }

    proptest! {
        /// Past its break-even hour the term is never dearer than on-demand for the
        /// same hours; before it, never cheaper.
        #[test]
        fn break_even_is_where_the_term_becomes_cheaper(
            upfront in 0u64..100_000,
            hourly in 0u64..1_000,
            extra in 1u64..1_000,
            term_hours in 1i64..10_000,
        ) {
            let t = Term { upfront, hourly, term_ms: term_hours * HOUR_MS };
            let od = hourly + extra;
            if let Some(h) = break_even_hours(&t, od) {
                prop_assert!(upfront + hourly * h <= od * h);
                if h > 0 {
                    prop_assert!(upfront + hourly * (h - 1) > od * (h - 1));
                }
            }
        }
    }
}
