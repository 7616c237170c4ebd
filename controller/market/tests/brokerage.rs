//! The brokerage's figures on a FIG. 4-style day, computed by hand (source 003,
//! \[0053\]-\[0063\], issue 18): three users of OS instances on two host clouds, an hourly
//! limit of 10 each at 50 cents per instance over, four hours. Every cell, net margin,
//! offset cost and total is written out below, then the billing record, its posting,
//! an estimate read from the table and a bundle's settlement, each posting through the
//! ledger's own check.
//!
//! | hour | alice (east+west) | bob (east+west) | carol (east+west) | net | cost | excess |
//! |------|-------------------|-----------------|-------------------|-----|------|--------|
//! | 0    | 8+6=14  → +4      | 12     → +2     | 5 (west) → −5     | +1  | 50   | 5      |
//! | 1    | 10      →  0      | 3+2=5  → −5     | none   → −10      | −15 | 0    | 15     |
//! | 2    | 20+5=25 → +15     | 11 (west) → +1  | 14     → +4       | +20 | 1000 | 0      |
//! | 3    | 9       → −1      | 10     →  0     | 10+3=13 → +3      | +2  | 100  | 1      |
//!
//! Marginal total 1 − 15 + 20 + 2 = 8; aggregate offset cost 1150. Alone, alice would
//! owe 19 × 50 = 950, bob 3 × 50 = 150 and carol 7 × 50 = 350: 1450, of which netting
//! saves 300.

use std::collections::BTreeMap;

use surplus_market::brokerage::{
    self, Availability, BillingRecord, EstimateInput, OS_INSTANCES, Subscription, UsageRow,
    UserOverage, Window,
};
use surplus_market::ledger;

const H: i64 = 3_600_000;
/// 2024-01-01 00:00 UTC, on every period's grid.
const DAY: i64 = 1_704_067_200_000;

fn subscription(user: &str) -> Subscription {
    Subscription {
        user: user.into(),
        resource: OS_INSTANCES.into(),
        period_ms: H,
        limit: 10,
        overage_rate: 50,
    }
}

fn usage() -> Vec<UsageRow> {
    let rows = [
        (0, "alice", "east", 8),
        (0, "alice", "west", 6),
        (0, "bob", "east", 12),
        (0, "carol", "west", 5),
        (1, "alice", "east", 10),
        (1, "bob", "east", 3),
        (1, "bob", "west", 2),
        (2, "alice", "east", 20),
        (2, "alice", "west", 5),
        (2, "bob", "west", 11),
        (2, "carol", "east", 14),
        (3, "alice", "east", 9),
        (3, "bob", "east", 10),
        (3, "carol", "east", 10),
        (3, "carol", "west", 3),
    ];
    rows.iter()
        .map(|&(hour, user, cloud, used)| UsageRow {
            cloud: cloud.into(),
            user: user.into(),
            resource: OS_INSTANCES.into(),
            period_start: DAY + hour * H,
            used,
        })
        .collect()
}

/// A cell as written by hand: used, margin, and what each cloud reported.
type ExpectedCell = (u64, i64, BTreeMap<String, u64>);

#[test]
fn a_fig4_day_nets_users_and_clouds_and_bills_the_net() {
    let subs = [
        subscription("carol"),
        subscription("alice"),
        subscription("bob"),
    ];
    let table = brokerage::margins(&subs, &usage(), DAY, DAY + 4 * H).unwrap();
    assert!(table.unsubscribed.is_empty());
    let [t] = &table.resources[..] else {
        panic!("one table: {table:?}")
    };
    assert_eq!(
        (t.resource.as_str(), t.period_ms, t.overage_rate),
        (OS_INSTANCES, H, 50)
    );
    assert_eq!(t.periods, vec![DAY, DAY + H, DAY + 2 * H, DAY + 3 * H]);

    // Every cell: (used, margin, per cloud).
    let cells = |east: Option<u64>, west: Option<u64>| {
        let mut m = BTreeMap::new();
        if let Some(e) = east {
            m.insert("east".to_owned(), e);
        }
        if let Some(w) = west {
            m.insert("west".to_owned(), w);
        }
        m
    };
    let expected: [(&str, [ExpectedCell; 4]); 3] = [
        (
            "alice",
            [
                (14, 4, cells(Some(8), Some(6))),
                (10, 0, cells(Some(10), None)),
                (25, 15, cells(Some(20), Some(5))),
                (9, -1, cells(Some(9), None)),
            ],
        ),
        (
            "bob",
            [
                (12, 2, cells(Some(12), None)),
                (5, -5, cells(Some(3), Some(2))),
                (11, 1, cells(None, Some(11))),
                (10, 0, cells(Some(10), None)),
            ],
        ),
        (
            "carol",
            [
                (5, -5, cells(None, Some(5))),
                (0, -10, cells(None, None)),
                (14, 4, cells(Some(14), None)),
                (13, 3, cells(Some(10), Some(3))),
            ],
        ),
    ];
    assert_eq!(t.users.len(), 3);
    for (row, (user, want)) in t.users.iter().zip(expected) {
        assert_eq!(row.user, user);
        assert_eq!(row.limit, 10);
        for (hour, (cell, (used, margin, by_cloud))) in row.cells.iter().zip(want).enumerate() {
            assert_eq!(
                (cell.used, cell.margin, &cell.by_cloud),
                (used, margin, &by_cloud),
                "{user} in hour {hour}"
            );
        }
    }
    let per_user: Vec<_> = t
        .users
        .iter()
        .map(|u| {
            (
                u.user.as_str(),
                u.marginal_total,
                u.over,
                u.own_overage_cost,
            )
        })
        .collect();
    assert_eq!(
        per_user,
        vec![
            ("alice", 18, 19, 950),
            ("bob", -2, 3, 150),
            ("carol", -8, 7, 350)
        ]
    );

    assert_eq!(t.net_margins, vec![1, -15, 20, 2]);
    assert_eq!(t.offset_costs, vec![50, 0, 1000, 100]);
    assert_eq!(t.excess_capacity, vec![5, 15, 0, 1]);
    assert_eq!(t.marginal_total, 8);
    assert_eq!(t.net_over, 23);
    assert_eq!(t.aggregate_offset_cost, 1150);

    let records = brokerage::billing_records(&table, "acme");
    assert_eq!(
        records,
        vec![BillingRecord {
            administrator: "acme".into(),
            resource: OS_INSTANCES.into(),
            period_ms: H,
            from: DAY,
            until: DAY + 4 * H,
            overage_rate: 50,
            net_over: 23,
            amount: 1150,
            users: vec![
                UserOverage {
                    user: "alice".into(),
                    over: 19,
                    amount: 950
                },
                UserOverage {
                    user: "bob".into(),
                    over: 3,
                    amount: 150
                },
                UserOverage {
                    user: "carol".into(),
                    over: 7,
                    amount: 350
                },
            ],
        }]
    );

    // The record charged: acme pays 1150, the subscriptions' provider gets it less 10%.
    let posting =
        brokerage::overage_posting("overage:acme:day1", &records[0], "cloudco", "EUR", 1000)
            .unwrap();
    let lines: Vec<_> = posting
        .entries
        .iter()
        .map(|e| (e.account.as_str(), e.amount))
        .collect();
    assert_eq!(
        lines,
        vec![
            ("client:acme", -1150),
            ("provider:cloudco", 1035),
            ("marketplace", 115)
        ]
    );
    assert_eq!(posting.kind, "overage");
    assert!(ledger::check(&posting, |_, _| 0, ledger::default_allows_negative).is_ok());
}

#[test]
fn a_contributor_estimated_from_its_table_is_paid_for_what_it_provided() {
    // Two days in which carol stays 20 under her limit of 30 every hour, dave 4 under.
    let subs = [
        Subscription {
            limit: 30,
            ..subscription("carol")
        },
        subscription("dave"),
    ];
    let usage: Vec<UsageRow> = (0..48)
        .flat_map(|h| {
            [("carol", 10), ("dave", 6)].map(|(user, used)| UsageRow {
                cloud: "east".into(),
                user: user.into(),
                resource: OS_INSTANCES.into(),
                period_start: DAY + h * H,
                used,
            })
        })
        .collect();
    let table = brokerage::margins(&subs, &usage, DAY, DAY + 48 * H).unwrap();
    assert_eq!(table.resources[0].excess_capacity, vec![24; 48]);

    let coming = |user: &str| EstimateInput {
        user: user.into(),
        resource: OS_INSTANCES.into(),
        margins: table.margins_of(user, OS_INSTANCES).unwrap(),
        share_bps: 5000,
        from: DAY + 48 * H,
        until: DAY + 60 * H,
        availability: vec![Window {
            from: DAY + 48 * H,
            until: DAY + 60 * H,
        }],
        increment_ms: H,
    };
    // [0063]: 20 under over two days, 50% of it, for the next 12 hours.
    let carol = brokerage::estimate(&coming("carol")).unwrap();
    assert_eq!(carol.amount, 10);
    assert_eq!(
        carol.availability,
        vec![Availability {
            contributor: "carol".into(),
            resource: OS_INSTANCES.into(),
            amount: 10,
            from: DAY + 48 * H,
            until: DAY + 60 * H,
            increment_ms: H,
        }]
    );
    assert_eq!(brokerage::estimate(&coming("dave")).unwrap().amount, 2);

    // Carol provided 10 instances for 12 h, dave 2 for 6 h: 120 and 12 instance-hours.
    let provided = vec![
        ("dave".to_owned(), 2 * 6 * H as u128),
        ("carol".to_owned(), 10 * 12 * H as u128),
    ];
    let s = brokerage::settle(10_000, 1500, &provided).unwrap();
    assert_eq!(s.commission, 1500);
    let shares: Vec<_> = s
        .shares
        .iter()
        .map(|x| (x.contributor.as_str(), x.amount))
        .collect();
    // 8500 × 120/132 = 7727.27 and 8500 × 12/132 = 772.73: the unit left goes to dave.
    assert_eq!(shares, vec![("carol", 7727), ("dave", 773)]);
    let posting =
        brokerage::settlement_posting("bundle:1", "othercloud", "EUR", &s, ledger::provider);
    assert!(ledger::check(&posting, |_, _| 0, ledger::default_allows_negative).is_ok());
}
