//! Tenders (issue 18, C10, [0064]): a bundle's capacity offered to marketplace clouds,
//! their answers, and the settlement of what was accepted.
//!
//! # Answering ([`answer`])
//!
//! A marketplace cloud answers by the standing [`Terms`] its operator set: per
//! resource, the most it pays per unit-hour and the most units it takes of one
//! tender. The rules, in order: an interval that is empty, longer than 7 days, ended,
//! or begun more than two minutes ago (a tender sells time to come) is rejected; so
//! is an amount of 0, another currency than the terms', a resource the terms do not
//! name, and a price above the resource's rate (`price × 1 h > rate × amount ×
//! length`, exact). A tender of more units than the terms take is accepted in part:
//! the most it takes, at the tender's price pro rata, rounded down ([`pro_rata`]);
//! otherwise it is accepted whole.
//!
//! # Placing a bundle ([`Placement`])
//!
//! A bundle goes to its clouds one after another, never to two at once, so that its
//! capacity is never sold twice: each cloud is offered what the clouds before it left
//! (at the bundle's price pro rata) and nothing once all is placed. An answer is the
//! other cloud's word and is checked before it counts ([`Placement::record`]): it must
//! name the tender, take at most what was offered, and at the offered price pro rata.
//!
//! What an accepted tender is paid, and how the payment is split between the
//! subscribers that actually provided the capacity, is [`crate::provision`]'s.
//!
//! # Invariants (property tests)
//!
//! An answer takes no more than offered nor than the terms' most, pays no more than
//! offered and at most the terms' rate; a rejection takes and pays nothing; the clouds
//! of a placement together take at most the bundle's amount and pay at most its price.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use surplus_protocol::peer::{TenderOffer, TenderReply};
use uuid::Uuid;

use crate::{Refusal, exchange};

const HOUR_MS: u128 = 3_600_000;

/// The longest interval a tender may cover.
pub const MAX_INTERVAL_MS: i64 = 7 * 86_400_000;

/// How long ago a tender's interval may have begun (the minute under way, and clocks
/// that differ a little).
pub const BEGUN_SLACK_MS: i64 = 120_000;

/// What a marketplace cloud takes of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResourceTerms {
    /// The most it pays per unit-hour, minor units.
    pub max_rate_per_unit_hour: u64,
    /// The most units it takes of one tender.
    pub max_amount: u64,
}

/// A marketplace cloud's standing terms for tenders.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Terms {
    /// The currency it pays in (ISO 4217).
    pub currency: String,
    /// By resource; a resource not named is not bought.
    pub resources: BTreeMap<String, ResourceTerms>,
}

fn refuse(rule: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        rule,
        message: message.into(),
    }
}

/// Whether `terms` may stand: a currency of three capital letters, resource names of
/// the subscriptions' kind, and each resource taking at least one unit.
pub fn check_terms(terms: &Terms) -> Result<(), Refusal> {
    if terms.currency.len() != 3 || !terms.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(
            "currency",
            format!(
                "currency {:?}: three capital letters (ISO 4217)",
                terms.currency
            ),
        ));
    }
    for (resource, t) in &terms.resources {
        if !exchange::is_resource(resource) {
            return Err(refuse(
                "resource",
                format!("resource {resource:?}: os_instances, cpu_cores, memory_gb or app.<name>"),
            ));
        }
        if t.max_amount == 0 {
            return Err(refuse(
                "max_amount",
                format!(
                    "{resource}: the most taken must be at least 1 unit (leave the resource out to buy none)"
                ),
            ));
        }
    }
    Ok(())
}

/// `price` for `part` of `whole` units, rounded down.
pub fn pro_rata(price: u64, part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    let exact = u128::from(price) * u128::from(part.min(whole)) / u128::from(whole);
    u64::try_from(exact).expect("at most the price")
}

fn reject(offer: &TenderOffer, why: String) -> TenderReply {
    TenderReply {
        id: offer.id,
        accepted_amount: 0,
        price: 0,
        reason: Some(why),
    }
}

/// The answer of a cloud with `terms` to `offer` at `now` (see the module's rules).
pub fn answer(terms: &Terms, offer: &TenderOffer, now: UnixMillis) -> TenderReply {
    let Some(length) = offer.until_ms.checked_sub(offer.from_ms).filter(|l| *l > 0) else {
        return reject(offer, "the interval is empty or out of range".into());
    };
    if length > MAX_INTERVAL_MS {
        return reject(offer, "the interval is longer than 7 days".into());
    }
    if offer.until_ms <= now {
        return reject(offer, "the interval has ended".into());
    }
    if offer.from_ms < now.saturating_sub(BEGUN_SLACK_MS) {
        return reject(
            offer,
            "the interval began more than two minutes ago: a tender sells time to come".into(),
        );
    }
    if offer.amount == 0 {
        return reject(offer, "the tender offers no units".into());
    }
    if offer.currency != terms.currency {
        return reject(
            offer,
            format!(
                "this cloud pays in {}, not {}",
                terms.currency, offer.currency
            ),
        );
    }
    let Some(t) = terms.resources.get(&offer.resource) else {
        return reject(offer, format!("this cloud does not buy {}", offer.resource));
    };
    // At most u64 × 3.6e6 on the left and u64 × u64 × 6.1e8 on the right: both fit
    // in u128 (the interval is at most 7 days).
    let length = u128::try_from(length).expect("positive");
    if u128::from(offer.price) * HOUR_MS
        > u128::from(t.max_rate_per_unit_hour) * u128::from(offer.amount) * length
    {
        return reject(
            offer,
            format!(
                "the price is above this cloud's {} per unit-hour of {}",
                t.max_rate_per_unit_hour, offer.resource
            ),
        );
    }
    if offer.amount > t.max_amount {
        return TenderReply {
            id: offer.id,
            accepted_amount: t.max_amount,
            price: pro_rata(offer.price, t.max_amount, offer.amount),
            reason: Some(format!(
                "this cloud takes at most {} units of {} from one tender",
                t.max_amount, offer.resource
            )),
        };
    }
    TenderReply {
        id: offer.id,
        accepted_amount: offer.amount,
        price: offer.price,
        reason: None,
    }
}

/// A bundle being placed with its clouds, one after another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    amount: u64,
    price: u64,
    taken: u64,
    paid: u64,
    pending: Option<TenderOffer>,
}

impl Placement {
    /// A bundle of `amount` units for `price` in all.
    pub fn new(amount: u64, price: u64) -> Self {
        Self {
            amount,
            price,
            taken: 0,
            paid: 0,
            pending: None,
        }
    }

    /// Units the clouds answered so far took.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// What they pay for them.
    pub fn paid(&self) -> u64 {
        self.paid
    }

    /// The tender for the next cloud, `id`: what is left, at the price pro rata;
    /// `None` once everything is placed. The tender is pending until its answer is
    /// recorded; asking again replaces it (the previous cloud did not answer).
    pub fn next(&mut self, template: &TenderOffer, id: Uuid) -> Option<TenderOffer> {
        let left = self.amount - self.taken;
        if left == 0 {
            self.pending = None;
            return None;
        }
        let offer = TenderOffer {
            id,
            amount: left,
            price: pro_rata(self.price, left, self.amount),
            ..template.clone()
        };
        self.pending = Some(offer.clone());
        Some(offer)
    }

    /// Counts the answer to the pending tender, once it is checked: it names the
    /// tender, takes at most what was offered, and pays the offered price pro rata.
    pub fn record(&mut self, reply: &TenderReply) -> Result<(), Refusal> {
        let Some(offer) = &self.pending else {
            return Err(refuse("not_tendered", "no tender is waiting for an answer"));
        };
        if reply.id != offer.id {
            return Err(refuse(
                "other_tender",
                format!("the answer is to tender {}, not {}", reply.id, offer.id),
            ));
        }
        if reply.accepted_amount > offer.amount {
            return Err(refuse(
                "too_much",
                format!(
                    "the answer takes {} units of the {} offered",
                    reply.accepted_amount, offer.amount
                ),
            ));
        }
        let due = pro_rata(offer.price, reply.accepted_amount, offer.amount);
        if reply.price != due {
            return Err(refuse(
                "price",
                format!(
                    "the answer pays {} for {} units; the tender's price for them is {due}",
                    reply.price, reply.accepted_amount
                ),
            ));
        }
        self.taken += reply.accepted_amount;
        self.paid += reply.price;
        self.pending = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: i64 = 3_600_000;

    fn terms(rate: u64, most: u64) -> Terms {
        Terms {
            currency: "EUR".into(),
            resources: [(
                "cpu_cores".to_owned(),
                ResourceTerms {
                    max_rate_per_unit_hour: rate,
                    max_amount: most,
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    fn offer(amount: u64, price: u64) -> TenderOffer {
        TenderOffer {
            id: Uuid::from_u128(1),
            resource: "cpu_cores".into(),
            amount,
            from_ms: 10 * H,
            until_ms: 12 * H,
            price,
            currency: "EUR".into(),
        }
    }

    #[test]
    fn a_tender_within_the_terms_is_taken_whole() {
        // 4 cores for 2 h at 100 per core-hour: 800, the most the terms pay.
        let r = answer(&terms(100, 8), &offer(4, 800), 9 * H);
        assert_eq!((r.accepted_amount, r.price, r.reason), (4, 800, None));
    }

    #[test]
    fn one_unit_above_the_rate_is_rejected() {
        let r = answer(&terms(100, 8), &offer(4, 801), 9 * H);
        assert_eq!((r.accepted_amount, r.price), (0, 0));
        assert!(r.reason.unwrap().contains("above this cloud's 100"));
    }

    #[test]
    fn more_than_the_terms_take_is_taken_in_part_at_the_price_pro_rata() {
        // 3 of 4 cores: 3/4 of 799, rounded down.
        let r = answer(&terms(100, 3), &offer(4, 799), 9 * H);
        assert_eq!((r.accepted_amount, r.price), (3, 599));
        assert!(r.reason.unwrap().contains("at most 3"));
    }

    #[test]
    fn each_rule_names_why() {
        let t = terms(100, 8);
        let cases = [
            (
                TenderOffer {
                    until_ms: 10 * H,
                    ..offer(4, 1)
                },
                9 * H,
                "empty",
            ),
            (offer(4, 1), 12 * H, "ended"),
            (offer(0, 0), 9 * H, "no units"),
            (
                TenderOffer {
                    currency: "USD".into(),
                    ..offer(4, 1)
                },
                9 * H,
                "pays in EUR, not USD",
            ),
            (
                TenderOffer {
                    resource: "memory_gb".into(),
                    ..offer(4, 1)
                },
                9 * H,
                "does not buy memory_gb",
            ),
        ];
        for (o, now, why) in cases {
            let r = answer(&t, &o, now);
            assert_eq!(r.accepted_amount, 0, "{why}");
            assert!(r.reason.as_deref().unwrap().contains(why), "{r:?}");
        }
        // A tender whose interval began in the last two minutes is still answered;
        // one that began before is not, nor one longer than a week.
        assert_eq!(
            answer(&t, &offer(4, 1), 10 * H + 119_000).accepted_amount,
            4
        );
        let late = answer(&t, &offer(4, 1), 11 * H);
        assert!(late.reason.unwrap().contains("began"));
        let long = TenderOffer {
            from_ms: i64::MIN,
            ..offer(4, 1)
        };
        assert!(
            answer(&t, &long, 9 * H).reason.unwrap().contains("empty"),
            "overflow"
        );
        let week = TenderOffer {
            until_ms: 10 * H + MAX_INTERVAL_MS + 1,
            ..offer(4, 1)
        };
        assert!(answer(&t, &week, 9 * H).reason.unwrap().contains("7 days"));
    }

    #[test]
    fn terms_are_checked() {
        assert!(check_terms(&terms(1, 1)).is_ok());
        assert_eq!(
            check_terms(&Terms {
                currency: "eur".into(),
                ..terms(1, 1)
            })
            .unwrap_err()
            .rule,
            "currency"
        );
        assert_eq!(check_terms(&terms(1, 0)).unwrap_err().rule, "max_amount");
        let mut bad = terms(1, 1);
        bad.resources.insert(
            "gpus!".into(),
            ResourceTerms {
                max_rate_per_unit_hour: 1,
                max_amount: 1,
            },
        );
        assert_eq!(check_terms(&bad).unwrap_err().rule, "resource");
    }

    #[test]
    fn a_bundle_goes_to_the_next_cloud_only_for_what_is_left() {
        let mut p = Placement::new(4, 800);
        let first = p.next(&offer(4, 800), Uuid::from_u128(1)).unwrap();
        assert_eq!((first.amount, first.price), (4, 800));
        p.record(&answer(&terms(100, 3), &first, 9 * H)).unwrap();
        let second = p.next(&offer(4, 800), Uuid::from_u128(2)).unwrap();
        assert_eq!((second.amount, second.price), (1, 200));
        p.record(&answer(&terms(100, 3), &second, 9 * H)).unwrap();
        assert_eq!((p.taken(), p.paid()), (4, 800));
        assert_eq!(p.next(&offer(4, 800), Uuid::from_u128(3)), None);
    }

    #[test]
    fn an_answer_that_takes_more_or_pays_otherwise_is_refused() {
        let mut p = Placement::new(4, 800);
        let o = p.next(&offer(4, 800), Uuid::from_u128(1)).unwrap();
        let reply = |accepted_amount, price| TenderReply {
            id: o.id,
            accepted_amount,
            price,
            reason: None,
        };
        assert_eq!(p.record(&reply(5, 1000)).unwrap_err().rule, "too_much");
        assert_eq!(p.record(&reply(4, 700)).unwrap_err().rule, "price");
        assert_eq!(
            p.record(&TenderReply {
                id: Uuid::from_u128(9),
                ..reply(4, 800)
            })
            .unwrap_err()
            .rule,
            "other_tender"
        );
        assert_eq!((p.taken(), p.paid()), (0, 0));
        p.record(&reply(2, 400)).unwrap();
        assert_eq!(p.record(&reply(2, 400)).unwrap_err().rule, "not_tendered");
    }

    proptest! {
        #[test]
        fn answers_keep_within_the_offer_and_the_terms(
            rate in 0u64..1_000, most in 1u64..20, amount in 0u64..40,
            price in 0u64..100_000, hours in 1i64..30, now in 0i64..40,
        ) {
            let o = TenderOffer { until_ms: (10 + hours) * H, ..offer(amount, price) };
            let r = answer(&terms(rate, most), &o, now * H);
            prop_assert!(r.accepted_amount <= amount.min(most));
            prop_assert!(r.price <= price);
            if r.accepted_amount == 0 {
                prop_assert_eq!(r.price, 0);
                prop_assert!(r.reason.is_some());
            } else {
                prop_assert!(u128::from(r.price) * HOUR_MS
                    <= u128::from(rate) * u128::from(r.accepted_amount) * (hours as u128 * HOUR_MS));
            }
        }

        #[test]
        fn a_placement_takes_at_most_the_bundle(
            amount in 1u64..50, price in 0u64..100_000,
            clouds in proptest::collection::vec((0u64..1_000, 1u64..20), 0..6),
        ) {
            let mut p = Placement::new(amount, price);
            for (i, (rate, most)) in clouds.into_iter().enumerate() {
                let Some(o) = p.next(&offer(amount, price), Uuid::from_u128(i as u128)) else { break };
                p.record(&answer(&terms(rate, most), &o, 9 * H)).unwrap();
            }
            prop_assert!(p.taken() <= amount);
            prop_assert!(p.paid() <= price);
            if p.taken() == amount {
                prop_assert_eq!(p.next(&offer(amount, price), Uuid::nil()), None);
            }
        }
    }
}
