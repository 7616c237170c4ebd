//! `cargo bench -p surplus-tests --bench auction_close`: how long after its end time
//! an auction is closed, on SQLite and on PostgreSQL, with the market's default tick
//! (1 s). N English auctions of one listing all end at the same instant, each with
//! two bids; the controller's own tick closes them (a winner reservation per auction
//! while the listing's 100 hosts last, "no host free" after). The bench watches the
//! auctions still open every 10 ms from the end time on and shows when the first,
//! half, 99 % and all of them had closed (wall-clock time after the end). Numbers go
//! to docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use surplus_controller::store::{AuctionInputs, AuctionStep, ChangeSet, StoredAuction};
use surplus_market::auction::{Auction, Bid, Kind};
use surplus_market::resell::{Goal, Interruptibility, PricingMode};
use surplus_protocol::clock;
use surplus_tests::{TestController, list_hosts, online_hosts, test_config};
use uuid::Uuid;

const HOSTS: usize = 100;

async fn setup(database_url: Option<String>) -> (TestController, Vec<Uuid>) {
    let mut config = test_config();
    config.market.tick = surplus_controller::config::MarketConfig::default().tick;
    if let Some(url) = database_url {
        config.database_url = url;
    }
    let tc = TestController::start_with(config, clock::system()).await;
    let hosts = online_hosts(&tc, "bob", HOSTS).await;
    list_hosts(
        tc.ctl(),
        "lst-bench",
        "bob",
        &hosts,
        &[PricingMode::Auction],
        (30, 20),
        Interruptibility::NoInterruptions,
    )
    .await;
    (tc, hosts)
}

/// `n` auctions ending together: how long after the end the first, half, 99 % and
/// all of them had closed.
async fn run(tc: &TestController, hosts: &[Uuid], n: usize) -> [Duration; 4] {
    let s = tc.ctl().app.store.clone();
    let now = clock::system().now_ms();
    let ends = now + 3_000 + n as i64 * 5;
    let mut ids = Vec::with_capacity(n);
    let nothing = |_: &AuctionStep| ChangeSet::default();
    for _ in 0..n {
        let kind = Kind::English {
            reserve: 30,
            increment: 5,
            buy_now: None,
        };
        let auction = Auction::new(Uuid::now_v7(), kind, 20, now, ends).unwrap();
        let id = auction.id;
        s.create_auction(&StoredAuction {
            auction,
            listing: "lst-bench".into(),
            provider: "bob".into(),
            term_ms: Some(3_600_000),
            reservation: None,
            closed_at_ms: None,
            created_at_ms: now,
        })
        .await
        .unwrap();
        for (bidder, amount) in [("alice", 40), ("carol", 50)] {
            let inputs = AuctionInputs {
                available: hosts,
                goal: Goal::None,
                interruptibility: Interruptibility::NoInterruptions,
            };
            let bid = Bid {
                id: Uuid::now_v7(),
                bidder: bidder.into(),
                amount,
            };
            s.bid_auction(id, bid, inputs, &nothing, clock::system().now_ms())
                .await
                .unwrap()
                .unwrap();
        }
        ids.push(id);
    }
    let wait = ends - clock::system().now_ms();
    assert!(wait > 0, "the auctions ended before they were all made");
    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    let end = Instant::now();
    // When the open count first fell to each mark: n-1, half, 1 %, none.
    let marks = [n - 1, n / 2, n / 100, 0];
    let mut reached = [Duration::ZERO; 4];
    let mut next = 0;
    while next < marks.len() {
        let open = s.due_auctions(i64::MAX).await.unwrap().len();
        while next < marks.len() && open <= marks[next] {
            reached[next] = end.elapsed();
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in &ids {
        assert!(
            s.auction(*id)
                .await
                .unwrap()
                .unwrap()
                .closed_at_ms
                .is_some()
        );
    }
    reached
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    println!(
        "{:<10} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "backend", "auctions", "first", "half", "99 %", "all"
    );
    for backend in ["sqlite", "postgres"] {
        let url = match backend {
            "postgres" => Some(surplus_tests::postgres::fresh_database().await),
            _ => None,
        };
        let (tc, hosts) = setup(url).await;
        for n in [1, 100, 1_000] {
            let ms = run(&tc, &hosts, n).await.map(|d| d.as_secs_f64() * 1e3);
            println!(
                "{backend:<10} {n:>9} {:>8.0}ms {:>8.0}ms {:>8.0}ms {:>8.0}ms",
                ms[0], ms[1], ms[2], ms[3]
            );
        }
    }
}
