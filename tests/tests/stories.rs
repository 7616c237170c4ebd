//! Story tests of the storage contract, each told once and run against both backends:
//! SQLite and PostgreSQL (a throwaway server this test binary starts). Every capability
//! store is here: the registry, validation, control, usage, billing and the ledger,
//! with the ledger's property test run through each backend's posting path.

use std::sync::Arc;

use surplus_controller::store::postgres::PgStore;
use surplus_controller::store::sqlite::SqliteStore;
use surplus_controller::store::*;
use surplus_protocol::usage::{Reading, SpoolState, Subject, UsageRecord};
use uuid::Uuid;

/// A fresh database of one backend, which can be opened again (a restart).
enum Fixture {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Fixture {
    async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => Fixture::Sqlite(tempfile::tempdir().unwrap()),
            Backend::Postgres => Fixture::Postgres(surplus_tests::postgres::fresh_database().await),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Fixture::Sqlite(dir) => {
                Arc::new(SqliteStore::open(&dir.path().join("c.db")).await.unwrap())
            }
            Fixture::Postgres(url) => Arc::new(PgStore::open(url).await.unwrap()),
        }
    }

    /// Runs `sqlite` or `postgres`, whichever this backend speaks, on the database
    /// directly (what a migration does).
    async fn execute(&self, sqlite: &str, postgres: &str) {
        match self {
            Fixture::Sqlite(dir) => {
                let url = format!("sqlite://{}", dir.path().join("c.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                sqlx::raw_sql(sqlite).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Fixture::Postgres(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::raw_sql(postgres).execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }
}

/// The statements of a migration from its first `UPDATE` on: how it fills the columns
/// it added for the rows stored before.
fn backfill(migration: &str) -> &str {
    &migration[migration
        .find("UPDATE")
        .expect("the migration fills its columns")..]
}

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

async fn token(store: &dyn Store, secret_hash: &str, expires_at_ms: i64) {
    store
        .create_join_token(&NewJoinToken {
            id: Uuid::now_v7(),
            secret_hash: secret_hash.into(),
            labels: [("zone".to_owned(), "eu".to_owned())].into(),
            created_at_ms: 0,
            expires_at_ms,
            created_by: "test".into(),
        })
        .await
        .unwrap();
}

fn new_agent(serial: &str) -> NewAgent {
    NewAgent {
        id: Uuid::now_v7(),
        hostname: "h".into(),
        agent_version: "0.1.0".into(),
        cert_serial: serial.into(),
        cert_issued_at_ms: 0,
        cert_not_after_ms: 86_400_000,
    }
}

/// Every agent as a listing shows it, oldest enrollment first.
async fn listed(s: &dyn Store) -> Vec<ListedAgent> {
    s.agent_page(&AgentFilter::default(), 0)
        .await
        .unwrap()
        .agents
}

/// Runs one story on each backend: `story!(name)` runs `stories::name(&fixture, store)`.
macro_rules! story {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let f = Fixture::new(Backend::Sqlite).await;
                super::stories::$name(&f, f.open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let f = Fixture::new(Backend::Postgres).await;
                super::stories::$name(&f, f.open().await).await;
            }
        }
    };
}

story!(a_token_registers_one_agent_and_says_why_it_refuses_others);
story!(many_racing_enrollments_with_one_token_register_exactly_one_agent);
story!(online_time_is_accounted_across_sessions_and_a_crash);
story!(revocation_is_final_and_unknown_agents_are_named);
story!(api_tokens_resolve_to_their_principal);
story!(last_seen_times_are_recorded_for_many_agents_at_once_and_never_go_back);
story!(inventory_history_records_changes_only);
story!(the_agent_list_reads_the_same_facts_as_the_whole_inventory);
story!(sessions_are_recorded_newest_first_and_a_crash_closes_them);

story!(a_validation_run_ends_once_and_a_crash_fails_runs_left_running);
story!(concurrent_writers_never_see_a_busy_database);
story!(a_reopened_database_keeps_everything);
story!(instances_and_volumes_belong_to_a_role_and_an_account);
story!(racing_claims_with_one_client_token_create_one_instance_with_its_rate_card);
story!(instance_records_keep_when_they_started_and_every_change_of_limits);
story!(usage_is_counted_once_and_an_agent_speaks_only_for_what_it_hosts);
story!(usage_history_sums_counters_and_weighs_gauges_by_time);
story!(a_ledger_key_is_applied_once_and_protected_accounts_never_go_below_zero);
story!(billing_runs_repeat_their_own_period_and_refuse_an_overlap);
story!(invoice_lines_sum_per_meter_and_filter_by_party);
story!(metering_settings_and_compatibility_reports_are_kept_per_agent);
story!(a_change_set_applies_whole_or_not_at_all);
story!(an_agent_page_is_filtered_sorted_and_counted_by_the_database);
story!(snapshots_are_kept_per_volume_oldest_first);
story!(providers_and_their_agreements_are_kept_and_ended_once);
story!(a_resell_step_applies_once_over_the_version_it_read);
story!(a_webhook_batch_takes_a_few_of_each_account_and_reads_keep_the_newest);
story!(a_host_is_reserved_once_even_by_a_hundred_concurrent_requests);
story!(terms_end_once_and_a_quote_is_honoured_once);
story!(an_interruption_keeps_its_notice_and_ends_once_at_its_deadline);
story!(prices_are_kept_once_and_answered_by_the_question);
story!(a_spot_market_clears_once_and_moves_hosts_by_rank);
story!(an_auction_closes_once_and_gives_the_winner_a_host);
story!(a_hold_is_placed_and_given_back_once_and_a_prepaid_client_holds_only_what_it_has);
story!(a_pool_cycles_once_charges_once_and_a_slot_is_in_one_pool_at_a_time);
story!(a_peering_invitation_is_taken_once_and_peer_usage_counts_once);
story!(a_tender_keeps_its_first_answer_and_a_bundle_is_paid_out_once);

mod stories {
    use super::*;

    /// Tenders (issue 18): a tender received again keeps its first answer; a bundle is
    /// due once its interval ended, and paid out once however many settle it at once.
    pub async fn a_tender_keeps_its_first_answer_and_a_bundle_is_paid_out_once(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::stagger::{Arrangement, Contribution};
        use surplus_protocol::peer::TenderOffer;
        let offer = TenderOffer {
            id: Uuid::from_u128(7),
            resource: "cpu_cores".into(),
            amount: 4,
            from_ms: 1_000,
            until_ms: 61_000,
            price: 800,
            currency: "EUR".into(),
        };
        let answered = |accepted_amount, state: &str| StoredTender {
            offer: offer.clone(),
            direction: "in".into(),
            bundle: None,
            peer: Uuid::from_u128(9),
            state: state.into(),
            accepted_amount,
            price: 200 * accepted_amount,
            reason: None,
            created_at_ms: 500,
            answered_at_ms: Some(500),
        };
        assert_eq!(
            s.put_tender(&answered(3, "part")).await.unwrap(),
            answered(3, "part")
        );
        let again = s.put_tender(&answered(4, "accepted")).await.unwrap();
        assert_eq!(
            (again.state.as_str(), again.accepted_amount),
            ("part", 3),
            "the first answer stands"
        );

        let bundle = StoredBundle {
            id: Uuid::from_u128(20),
            resource: "cpu_cores".into(),
            amount: 4,
            from_ms: 1_000,
            until_ms: 61_000,
            price: 800,
            currency: "EUR".into(),
            arrangement: Arrangement {
                needs: Vec::new(),
                contributions: vec![Contribution {
                    contributor: "bob".into(),
                    resource: "cpu_cores".into(),
                    amount: 4,
                    from: 1_000,
                    until: 61_000,
                    paid_increments: 1,
                }],
                sub_intervals: Vec::new(),
            },
            contributors: [("bob".to_owned(), "client:acme".to_owned())]
                .into_iter()
                .collect(),
            created_at_ms: 900,
            settled_at_ms: None,
            reported_through_ms: None,
        };
        s.create_bundle(&bundle).await.unwrap();
        let mut sent = StoredTender {
            offer: TenderOffer {
                id: Uuid::from_u128(21),
                ..offer.clone()
            },
            direction: "out".into(),
            bundle: Some(bundle.id),
            state: "sent".into(),
            accepted_amount: 0,
            price: 0,
            ..answered(0, "sent")
        };
        s.put_tender(&sent).await.unwrap();
        sent.state = "accepted".into();
        sent.accepted_amount = 4;
        sent.price = 800;
        sent.answered_at_ms = Some(950);
        s.answer_tender(&sent).await.unwrap();
        assert_eq!(
            s.bundle_tenders(bundle.id).await.unwrap(),
            vec![sent.clone()]
        );
        assert_eq!(s.tenders(10).await.unwrap().len(), 2);
        // Failover's timers and reports: judged up to a minute, never back; a gap
        // reported twice is kept once, and only for a tender answered for that peer.
        assert!(
            s.open_bundles(999).await.unwrap().is_empty(),
            "not before it begins"
        );
        assert_eq!(s.open_bundles(1_000).await.unwrap().len(), 1);
        s.bundle_reported(bundle.id, 31_000).await.unwrap();
        s.bundle_reported(bundle.id, 21_000).await.unwrap();
        assert_eq!(
            s.open_bundles(40_000).await.unwrap()[0].reported_through_ms,
            Some(31_000)
        );
        let gap = surplus_market::provision::Gap {
            from: 1_000,
            until: 61_000,
            missing: 1,
        };
        assert!(
            s.tender_shortfall(offer.id, Uuid::from_u128(9), gap, 70_000)
                .await
                .unwrap()
        );
        assert!(
            s.tender_shortfall(offer.id, Uuid::from_u128(9), gap, 71_000)
                .await
                .unwrap()
        );
        assert!(
            !s.tender_shortfall(offer.id, Uuid::from_u128(8), gap, 71_000)
                .await
                .unwrap(),
            "another peer's"
        );
        assert!(
            !s.tender_shortfall(Uuid::from_u128(21), Uuid::from_u128(9), gap, 71_000)
                .await
                .unwrap(),
            "a tender sent, not answered"
        );
        let outside = surplus_market::provision::Gap {
            from: 0,
            until: 61_000,
            missing: 1,
        };
        assert!(
            !s.tender_shortfall(offer.id, Uuid::from_u128(9), outside, 71_000)
                .await
                .unwrap(),
            "outside its interval"
        );
        let more = surplus_market::provision::Gap { missing: 4, ..gap };
        assert!(
            !s.tender_shortfall(offer.id, Uuid::from_u128(9), more, 71_000)
                .await
                .unwrap(),
            "more than it took"
        );
        assert_eq!(s.tender_shortfalls(offer.id).await.unwrap(), vec![gap]);
        let mut bundle = bundle;
        bundle.reported_through_ms = Some(31_000);
        assert!(
            s.due_bundles(60_999).await.unwrap().is_empty(),
            "not before its end"
        );
        assert_eq!(s.due_bundles(61_000).await.unwrap(), vec![bundle.clone()]);

        let posting = surplus_market::ledger::Posting {
            key: "brokerage:settle:21".into(),
            kind: "brokerage".into(),
            memo: "test".into(),
            entries: vec![
                surplus_market::ledger::Entry {
                    account: "client:peer-9".into(),
                    currency: "EUR".into(),
                    amount: -800,
                },
                surplus_market::ledger::Entry {
                    account: "client:acme".into(),
                    currency: "EUR".into(),
                    amount: 800,
                },
            ],
        };
        let changes = ChangeSet {
            postings: vec![(posting, Vec::new())],
            ..ChangeSet::default()
        };
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let (s, c) = (s.clone(), changes.clone());
                tokio::spawn(async move {
                    s.settle_bundle(Uuid::from_u128(20), &c, 61_000)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut settled = 0;
        for r in racers {
            settled += usize::from(r.await.unwrap());
        }
        assert_eq!(settled, 1, "one settlement wins");
        assert!(s.due_bundles(70_000).await.unwrap().is_empty());
        assert_eq!(s.bundles(10).await.unwrap()[0].settled_at_ms, Some(61_000));
        let acme = s.balances(Some("client:acme")).await.unwrap();
        assert_eq!(
            acme,
            vec![("client:acme".to_owned(), "EUR".to_owned(), 800)],
            "paid once"
        );
    }

    /// Federation (issue 18): racing joiners take an invitation once; a usage batch
    /// delivered again and again, concurrently, is kept once; a removed peer's usage is
    /// refused; the controller's id is made once.
    pub async fn a_peering_invitation_is_taken_once_and_peer_usage_counts_once(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_protocol::peer::{PeerRole, PeerUsageRow};
        let me = s.controller_id(Uuid::from_u128(1), 0).await.unwrap();
        assert_eq!(s.controller_id(Uuid::from_u128(2), 5).await.unwrap(), me);
        s.create_peer_invite("hash", PeerRole::HostCloud, 0, 1_000)
            .await
            .unwrap();
        let joiner = |n: u128| StoredPeer {
            id: Uuid::from_u128(100 + n),
            name: format!("host {n}"),
            role: PeerRole::MarketplaceCloud,
            our_role: PeerRole::Broker,
            ca_pem: "pem".into(),
            fingerprint: "ab".into(),
            addresses: vec![format!("127.0.0.1:{n}")],
            server_name: String::new(),
            dials: false,
            joined_at_ms: 10,
            removed_at_ms: None,
            last_seen_ms: None,
            out_seq: 0,
            acked_seq: 0,
            in_seq: 0,
        };
        let racers: Vec<_> = (0..8)
            .map(|n| {
                let (s, j) = (s.clone(), joiner(n));
                tokio::spawn(async move { s.take_peer_invite("hash", &j, 10).await.unwrap() })
            })
            .collect();
        let mut taken = Vec::new();
        for r in racers {
            match r.await.unwrap() {
                Ok(role) => taken.push(role),
                Err(why) => assert_eq!(why, JoinRefusal::Used),
            }
        }
        assert_eq!(
            taken,
            vec![PeerRole::HostCloud],
            "one joiner takes the invitation"
        );
        let peers = s.peers().await.unwrap();
        assert_eq!(peers.len(), 1);
        let peer = peers[0].id;
        assert_eq!(peers[0].role, PeerRole::HostCloud, "the invitation's role");
        assert_eq!(
            s.take_peer_invite("nope", &joiner(9), 10).await.unwrap(),
            Err(JoinRefusal::Unknown)
        );
        s.create_peer_invite("late", PeerRole::HostCloud, 0, 5)
            .await
            .unwrap();
        assert_eq!(
            s.take_peer_invite("late", &joiner(9), 10).await.unwrap(),
            Err(JoinRefusal::Expired)
        );

        let rows: Vec<_> = (1..=20u64)
            .map(|seq| PeerUsageRow {
                seq,
                user: "alice".into(),
                resource: "os_instances".into(),
                minute_ms: 60_000 * seq as i64,
                unit_ms: 1_000 * seq,
            })
            .collect();
        let senders: Vec<_> = (0..6)
            .map(|n| {
                let s = s.clone();
                // Overlapping batches: 1..=10, 1..=20, 1..=10, ...
                let batch = rows[..if n % 2 == 0 { 10 } else { 20 }].to_vec();
                tokio::spawn(async move { s.receive_peer_usage(peer, &batch, 20).await.unwrap() })
            })
            .collect();
        for r in senders {
            let ack = r
                .await
                .unwrap()
                .expect("never a gap: every batch starts at row 1");
            assert!(ack == 10 || ack == 20, "{ack}");
        }
        let kept = s.peer_usage_in(0, i64::MAX).await.unwrap();
        assert_eq!(kept.len(), 20, "every row once");
        assert_eq!(
            kept.iter().map(|r| r.row.unit_ms).sum::<u64>(),
            rows.iter().map(|r| r.unit_ms).sum::<u64>()
        );
        assert_eq!(s.peers().await.unwrap()[0].in_seq, 20);
        let gap = s.receive_peer_usage(peer, &rows[..0], 20).await.unwrap();
        assert_eq!(
            gap,
            Ok(20),
            "an empty batch is acknowledged where it stands"
        );
        let far = PeerUsageRow {
            seq: 25,
            ..rows[0].clone()
        };
        assert_eq!(
            s.receive_peer_usage(peer, &[far], 20)
                .await
                .unwrap()
                .unwrap_err()
                .rule,
            "gap"
        );

        // Nothing shared: an export makes no row but moves on.
        s.put_peer(&StoredPeer {
            id: Uuid::from_u128(500),
            role: PeerRole::Broker,
            our_role: PeerRole::HostCloud,
            dials: true,
            ..joiner(0)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            s.put_peer(&StoredPeer {
                id: Uuid::from_u128(500),
                ..joiner(0)
            })
            .await
            .unwrap(),
            Err(JoinRefusal::AlreadyPeer),
            "an active peer is not replaced"
        );
        let broker = Uuid::from_u128(500);
        let share = PeerShare {
            peer: broker,
            account: "bob".into(),
            user: "bob.here".into(),
            through_ms: 0,
        };
        assert_eq!(s.share_with_peer(&share).await.unwrap(), share);
        let other = PeerShare {
            user: "robert".into(),
            through_ms: 60_000,
            ..share.clone()
        };
        assert_eq!(
            s.share_with_peer(&other).await.unwrap(),
            share,
            "a share stands as it was made"
        );
        assert_eq!(s.export_peer_usage(broker, 600_000).await.unwrap(), 0);
        assert_eq!(s.peer_shares(broker).await.unwrap()[0].through_ms, 600_000);
        assert!(s.peer_usage_out(broker, 0, 10).await.unwrap().is_empty());

        assert!(s.remove_peer(peer, 30).await.unwrap());
        assert!(!s.remove_peer(peer, 31).await.unwrap(), "removed once");
        assert_eq!(
            s.put_peer(&StoredPeer {
                id: peer,
                ..joiner(0)
            })
            .await
            .unwrap(),
            Err(JoinRefusal::Removed),
            "a removed peer stays removed"
        );
        let refused = s.receive_peer_usage(peer, &rows[..1], 40).await.unwrap();
        assert_eq!(refused.unwrap_err().rule, "not_peer");
    }

    pub async fn a_spot_market_clears_once_and_moves_hosts_by_rank(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::interrupt::{Cause, notice};
        use surplus_market::resell::{Goal, PricingMode};
        use surplus_market::spot::{Bid, Supply};
        let hosts: Vec<Uuid> = (1..=2).map(Uuid::from_u128).collect();
        let bid = |n: u128, client: &str, max_price, quantity, at| Bid {
            id: Uuid::from_u128(n),
            class: "lst-s".into(),
            client: client.into(),
            max_price,
            quantity,
            all_or_nothing: false,
            placed_at_ms: at,
        };
        let (placed, new) = s
            .place_bid(
                &bid(1, "alice", 50, 2, 10),
                1_000,
                &ChangeSet::default(),
                10,
            )
            .await
            .unwrap();
        assert!(new);
        assert_eq!(placed.allocated, 0);
        let (_, again) = s
            .place_bid(
                &bid(1, "alice", 50, 2, 10),
                1_000,
                &ChangeSet::default(),
                11,
            )
            .await
            .unwrap();
        assert!(!again, "a bid is stored once");
        assert_eq!(
            s.due_spot_markets(1_009).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(s.due_spot_markets(1_010).await.unwrap(), ["lst-s"]);
        let supply = Supply {
            class: "lst-s".into(),
            capacity: 2,
            minimum: 20,
        };
        let notice_at = |now| move |cause: Cause| notice(now, cause, None, 500);
        let new_id = |at: i64| {
            move |bid: Uuid, n: u32| {
                Uuid::from_u128(bid.as_u128() * 1_000_000 + at as u128 * 10 + u128::from(n))
            }
        };
        let priced = |c: &SpotCleared| ChangeSet {
            prices: c
                .cleared
                .clearing
                .classes
                .iter()
                .map(|k| PricePoint {
                    id: format!("spot:{}", c.cleared.at_ms),
                    kind: surplus_market::history::PriceKind::Spot,
                    listing: "lst-s".into(),
                    provider: "bob".into(),
                    zone: "z".into(),
                    category: "medium".into(),
                    currency: "EUR".into(),
                    price: k.price,
                    at_ms: c.cleared.at_ms,
                })
                .collect(),
            ..ChangeSet::default()
        };
        // Four controllers poll the due market at once: it clears once.
        let clearers: Vec<_> = (0..4)
            .map(|_| {
                let (s, hosts, supply) = (s.clone(), hosts.clone(), supply.clone());
                tokio::spawn(async move {
                    let (notice, new_id) = (notice_at(1_010), new_id(1_010));
                    let inputs = SpotInputs {
                        supply: Some(supply),
                        available: &hosts,
                        goal: Goal::None,
                        notice: &notice,
                        new_id: &new_id,
                    };
                    s.clear_spot("lst-s", inputs, &priced, 1_010).await.unwrap()
                })
            })
            .collect();
        let mut cleared = Vec::new();
        for c in clearers {
            cleared.extend(c.await.unwrap());
        }
        assert_eq!(cleared.len(), 1, "cleared once");
        let first = &cleared[0];
        assert_eq!(
            first.cleared.clearing.classes[0].price, 20,
            "supply meets demand: the minimum"
        );
        assert_eq!(first.made.len(), 2);
        assert!(
            first
                .made
                .iter()
                .all(|r| r.mode == PricingMode::Spot && r.holder == "alice" && r.price == 20)
        );
        assert_eq!(
            s.spot_bid(Uuid::from_u128(1))
                .await
                .unwrap()
                .unwrap()
                .allocated,
            2
        );
        assert_eq!(
            s.bid_reservations(Uuid::from_u128(1)).await.unwrap().len(),
            2
        );
        let row = s.spot_market("lst-s").await.unwrap().unwrap();
        assert_eq!(
            (row.price, row.cleared_at_ms, row.next_clearing_at_ms),
            (Some(20), Some(1_010), 2_010)
        );

        // Carol outbids one unit on demand: Alice's newest host is given notice, and
        // the price is Alice's maximum.
        s.place_bid(
            &bid(2, "carol", 80, 1, 1_500),
            1_000,
            &ChangeSet::default(),
            1_500,
        )
        .await
        .unwrap();
        assert!(s.request_clearing("lst-s", 1_500).await.unwrap());
        assert!(!s.request_clearing("lst-none", 1_500).await.unwrap());
        assert_eq!(s.due_spot_markets(1_500).await.unwrap(), ["lst-s"]);
        let (notice, ids) = (notice_at(1_500), new_id(1_500));
        let inputs = SpotInputs {
            supply: Some(supply.clone()),
            available: &hosts,
            goal: Goal::None,
            notice: &notice,
            new_id: &ids,
        };
        let second = s
            .clear_spot("lst-s", inputs, &priced, 1_500)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.cleared.clearing.classes[0].price, 50);
        assert!(
            second.made.is_empty(),
            "no host is free until the grace ends"
        );
        assert_eq!(second.noticed.len(), 1);
        assert_eq!(second.noticed[0].1.cause, Cause::Outbid);
        assert_eq!(second.previous, Some((1_010, 20)));
        assert_eq!(
            s.spot_market("lst-s")
                .await
                .unwrap()
                .unwrap()
                .next_clearing_at_ms,
            2_010,
            "on demand leaves the period"
        );
        assert_eq!(
            s.spot_prices("lst-s", 1_200, 3_000).await.unwrap(),
            [(1_010, 20), (1_500, 50)]
        );

        // Alice cancels: her other host is released (the noticed one ends by the
        // interruption at its deadline, not by her act).
        let nothing = |_: &[Reservation]| ChangeSet::default();
        let (cancelled, released) = s
            .cancel_bid(Uuid::from_u128(1), "alice", &nothing, 1_600)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cancelled.cancelled_at_ms, Some(1_600));
        assert_eq!(
            released.len(),
            2,
            "a host under notice before its deadline is released too"
        );
        let refused = s
            .cancel_bid(Uuid::from_u128(1), "alice", &nothing, 1_700)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.rule, "cancelled");
        let refused = s
            .cancel_bid(Uuid::from_u128(2), "alice", &nothing, 1_700)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.rule, "unknown_bid", "another's bid");
        assert_eq!(s.spot_bids_of("alice").await.unwrap().len(), 1);
        // The next clearing gives Carol a free host.
        assert!(s.request_clearing("lst-s", 1_800).await.unwrap());
        let (notice, ids) = (notice_at(1_800), new_id(1_800));
        let inputs = SpotInputs {
            supply: Some(supply),
            available: &hosts,
            goal: Goal::None,
            notice: &notice,
            new_id: &ids,
        };
        let third = s
            .clear_spot("lst-s", inputs, &priced, 1_800)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(third.made.len(), 1);
        assert_eq!(
            (third.made[0].holder.as_str(), third.made[0].price),
            ("carol", 20)
        );
        // Not due: nothing happens.
        let (notice, ids) = (notice_at(1_900), new_id(1_900));
        let inputs = SpotInputs {
            supply: None,
            available: &hosts,
            goal: Goal::None,
            notice: &notice,
            new_id: &ids,
        };
        assert!(
            s.clear_spot("lst-s", inputs, &priced, 1_900)
                .await
                .unwrap()
                .is_none()
        );
    }

    pub async fn an_auction_closes_once_and_gives_the_winner_a_host(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::auction::{Auction, Bid, Kind, Reason};
        use surplus_market::resell::{Goal, Interruptibility, PricingMode};
        let hosts = [Uuid::from_u128(7)];
        let inputs = || AuctionInputs {
            available: &hosts,
            goal: Goal::None,
            interruptibility: Interruptibility::NoInterruptions,
        };
        let sealed = Auction::new(
            Uuid::from_u128(100),
            Kind::SealedSecond { reserve: 30 },
            20,
            0,
            1_000,
        )
        .unwrap();
        let stored = StoredAuction {
            auction: sealed,
            listing: "lst-a".into(),
            provider: "bob".into(),
            term_ms: Some(3_600_000),
            reservation: None,
            closed_at_ms: None,
            created_at_ms: 0,
        };
        s.create_auction(&stored).await.unwrap();
        let id = stored.auction.id;
        let nothing = |_: &AuctionStep| ChangeSet::default();
        let bid = |n: u128, bidder: &str, amount| Bid {
            id: Uuid::from_u128(n),
            bidder: bidder.into(),
            amount,
        };
        for (n, who, amount, at) in [(1, "alice", 50, 10), (2, "carol", 40, 20)] {
            let step = s
                .bid_auction(id, bid(n, who, amount), inputs(), &nothing, at)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(step.accepted, Some(Uuid::from_u128(n)));
            assert!(step.closed.is_none());
        }
        let low = s
            .bid_auction(id, bid(3, "dave", 10), inputs(), &nothing, 30)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(low.rule, "provider_minimum", "{low}");
        let unknown = s
            .bid_auction(Uuid::nil(), bid(4, "dave", 90), inputs(), &nothing, 30)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(unknown.rule, "unknown_auction");
        assert!(s.due_auctions(999).await.unwrap().is_empty());
        assert_eq!(
            s.due_auctions(1_000).await.unwrap(),
            [("lst-a".to_owned(), id)]
        );
        // Four controllers close it at once: once, Alice winning at Carol's bid.
        let closers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    let hosts = [Uuid::from_u128(7)];
                    let inputs = AuctionInputs {
                        available: &hosts,
                        goal: Goal::None,
                        interruptibility: Interruptibility::NoInterruptions,
                    };
                    let nothing = |_: &AuctionStep| ChangeSet::default();
                    s.close_auction(id, inputs, &nothing, 1_005).await.unwrap()
                })
            })
            .collect();
        let mut closed = Vec::new();
        for c in closers {
            closed.extend(c.await.unwrap());
        }
        assert_eq!(closed.len(), 1, "closed once");
        let outcome = closed[0].closed.clone().unwrap();
        assert_eq!(outcome.reason, Reason::SecondPrice);
        let winner = outcome.winner.unwrap();
        assert_eq!((winner.bidder.as_str(), winner.price), ("alice", 40));
        let r = closed[0].made.clone().unwrap();
        assert_eq!(
            (r.id, r.holder.as_str(), r.price, r.mode, r.host),
            (id, "alice", 40, PricingMode::Auction, hosts[0])
        );
        assert_eq!(r.ends_at_ms, Some(1_005 + 3_600_000));
        let kept = s.auction(id).await.unwrap().unwrap();
        assert_eq!(
            (kept.reservation, kept.closed_at_ms),
            (Some(id), Some(1_005))
        );
        assert!(s.due_auctions(5_000).await.unwrap().is_empty());
        let late = s
            .bid_auction(id, bid(5, "dave", 90), inputs(), &nothing, 1_010)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(late.rule, "ended");

        // A buy-now bid closes an English auction in its own transaction; with its
        // only host held, the winner gets none and is told why.
        let english = Auction::new(
            Uuid::from_u128(200),
            Kind::English {
                reserve: 30,
                increment: 5,
                buy_now: Some(100),
            },
            20,
            0,
            10_000,
        )
        .unwrap();
        s.create_auction(&StoredAuction {
            auction: english,
            term_ms: None,
            ..stored.clone()
        })
        .await
        .unwrap();
        let step = s
            .bid_auction(
                Uuid::from_u128(200),
                bid(6, "carol", 100),
                inputs(),
                &nothing,
                2_000,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(step.closed.as_ref().unwrap().reason, Reason::BuyNow);
        assert!(step.made.is_none());
        assert_eq!(step.unfilled.as_ref().unwrap().rule, "sold_out");
        assert_eq!(s.auctions(Some("lst-a"), false, 10).await.unwrap().len(), 2);
        assert!(
            s.auctions(None, true, 10).await.unwrap().is_empty(),
            "both closed"
        );
    }

    pub async fn a_pool_cycles_once_charges_once_and_a_slot_is_in_one_pool_at_a_time(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::ledger::{Entry, Posting};
        use surplus_market::pool::{self, CurrencyKind, Method, Policy, Settings};
        let settings = Settings {
            request_type: pool::RequestType::Auction,
            policy: Policy {
                minimum: 5,
                maximum: None,
                cap_per_user: None,
                preemptible: true,
            },
            method: Method::English,
            currency: "LAB".into(),
            currency_kind: CurrencyKind::Credits,
            cycle_ms: 1_000,
            notice_ms: 100,
            half_life_ms: 3_600_000,
            max_users: 1,
            burst: None,
        };
        let new_pool = |n: u128| StoredPool {
            id: Uuid::from_u128(n),
            owner: "uni".into(),
            name: format!("pool {n}"),
            settings: settings.clone(),
            asking: 5,
            next_cycle_at_ms: 1_000,
            requested_at_ms: None,
            cycled_at_ms: None,
            created_at_ms: 0,
            dissolved_at_ms: None,
        };
        let (p1, p2) = (new_pool(1), new_pool(2));
        s.create_pool(&p1).await.unwrap();
        s.create_pool(&p2).await.unwrap();
        let host = Uuid::from_u128(77);
        let slot = |pool: Uuid| PoolSlotRow {
            slot: host,
            pool,
            entity: "uni".into(),
            host,
            account: "uni".into(),
            facts: SlotFacts {
                kind: "host".into(),
                mode: None,
                listing: None,
                instance_type: None,
                cpus: Some(2),
                memory_bytes: None,
                platform: None,
                zone: None,
                tenancy: "dedicated".into(),
                until_ms: None,
            },
            burst: false,
            added_at_ms: 0,
            leaving_at_ms: None,
        };
        s.add_pool_slot(&slot(p1.id), 0).await.unwrap().unwrap();
        let taken = s.add_pool_slot(&slot(p2.id), 0).await.unwrap().unwrap_err();
        assert_eq!(taken.rule, "slot_taken", "a slot is in one pool at a time");
        let member = |m: &str| PoolMember {
            member: m.into(),
            entity: "uni".into(),
            name: m.into(),
            organisation: "Physics".into(),
            added_at_ms: 0,
        };
        s.put_pool_member(p1.id, &member("alice"), 1)
            .await
            .unwrap()
            .unwrap();
        let full = s
            .put_pool_member(p1.id, &member("brian"), 1)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(full.rule, "pool_full_of_users");
        let request = pool::Request {
            id: Uuid::from_u128(10),
            user: "alice".into(),
            count: 1,
            bid: 10,
            placed_at_ms: 0,
        };
        let stored = StoredPoolRequest {
            pool: p1.id,
            request: request.clone(),
            cancelled_at_ms: None,
            why: None,
        };
        assert!(s.place_pool_request(&stored).await.unwrap());
        assert!(!s.place_pool_request(&stored).await.unwrap(), "stored once");
        assert_eq!(s.due_pools(999).await.unwrap(), Vec::<Uuid>::new());
        assert_eq!(s.due_pools(1_000).await.unwrap(), [p1.id, p2.id]);

        // What the shell decides: the plan, and each charge posted from the member
        // to the owner.
        let decide = |now: i64| {
            move |state: &PoolState| {
                let members = state.members.iter().map(|m| m.member.clone()).collect();
                let slots: Vec<pool::SlotState> = state
                    .slots
                    .iter()
                    .map(|(r, until)| pool::SlotState {
                        id: r.slot,
                        // As the shell does: a slot leaving ends when it leaves.
                        until_ms: match (*until, r.leaving_at_ms) {
                            (Some(u), Some(l)) => Some(u.min(l)),
                            (u, l) => u.or(l),
                        },
                        leaving: r.leaving_at_ms.is_some(),
                    })
                    .collect();
                let requests: Vec<pool::Request> =
                    state.requests.iter().map(|r| r.request.clone()).collect();
                let plan = pool::plan(pool::CycleInput {
                    method: state.pool.settings.method,
                    policy: &state.pool.settings.policy,
                    asking: state.pool.asking,
                    members: pool::Members::Single(&members),
                    slots: &slots,
                    requests: &requests,
                    allocations: &state.allocations,
                    usage: &Default::default(),
                    now_ms: now,
                    notice_ms: state.pool.settings.notice_ms,
                });
                let mut changes = ChangeSet::default();
                for c in plan.charges.iter().filter(|c| c.amount > 0) {
                    let entry = |account: String, amount| Entry {
                        account,
                        currency: "LAB".into(),
                        amount,
                    };
                    changes.postings.push((
                        Posting {
                            key: format!("pool-charge:{}:{}", c.allocation, c.to_ms),
                            kind: "pool".into(),
                            memo: String::new(),
                            entries: vec![
                                entry(format!("client:{}", c.user), -c.amount),
                                entry("pool:uni".into(), c.amount),
                            ],
                        },
                        Vec::new(),
                    ));
                }
                PoolDecision {
                    plan,
                    why: Default::default(),
                    changes,
                }
            }
        };
        // Four controllers race for the cycle: one runs it.
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.run_pool_cycle(Uuid::from_u128(1), &decide(1_000), 1_000)
                        .await
                })
            })
            .collect();
        let mut ran = 0;
        for r in racers {
            if r.await.unwrap().unwrap().is_some() {
                ran += 1;
            }
        }
        assert_eq!(ran, 1, "a cycle runs once");
        let held = s.pool_allocations(p1.id, false).await.unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!((held[0].0.user.as_str(), held[0].1), ("alice", host));
        assert!(
            s.allocation_on(p1.id, host, "alice", 1_000)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.allocation_on(p1.id, host, "brian", 1_000)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            s.pool_slot_on(host, 1_000).await.unwrap().map(|r| r.pool),
            Some(p1.id)
        );
        assert!(s.due_pools(1_999).await.unwrap().contains(&p2.id));
        assert!(
            !s.due_pools(1_999).await.unwrap().contains(&p1.id),
            "its timer moved"
        );

        // An hour on, twice: one charge of 10 for the hour, posted once.
        s.request_pool_cycle(p1.id, 3_601_000).await.unwrap();
        for _ in 0..2 {
            let _ = s
                .run_pool_cycle(p1.id, &decide(3_601_000), 3_601_000)
                .await
                .unwrap();
        }
        let charges = s.pool_charges(p1.id).await.unwrap();
        assert_eq!(charges.len(), 1, "{charges:?}");
        assert_eq!(
            (charges[0].amount, charges[0].member.as_str()),
            (10, "alice")
        );
        let balances = s.balances(Some("pool:uni")).await.unwrap();
        assert_eq!(balances, [("pool:uni".to_owned(), "LAB".to_owned(), 10)]);

        // The slot leaves: another pool may take it once it has gone.
        assert!(s.leave_pool_slot(p1.id, host, 3_700_000).await.unwrap());
        let early = s.add_pool_slot(&slot(p2.id), 3_650_000).await.unwrap();
        assert!(early.is_err(), "not before it has left");
        let charged = s.add_pool_slot(&slot(p2.id), 3_700_000).await.unwrap();
        assert!(
            charged.is_err(),
            "nor before what held it is charged to its end"
        );
        // The cycle at its deadline ends and charges alice's allocation; the slot
        // is gone from p1.
        s.request_pool_cycle(p1.id, 3_700_000).await.unwrap();
        s.run_pool_cycle(p1.id, &decide(3_700_000), 3_700_000)
            .await
            .unwrap()
            .expect("the cycle runs");
        assert!(s.pool_slots(p1.id).await.unwrap().is_empty());
        s.add_pool_slot(&slot(p2.id), 3_700_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.pool_slot_on(host, 3_700_000)
                .await
                .unwrap()
                .map(|r| r.pool),
            Some(p2.id)
        );

        // Poly merges its pool into p1, once, and only when invited: its slot and
        // its user move, still its own.
        let mut p3 = new_pool(3);
        p3.owner = "poly".into();
        s.create_pool(&p3).await.unwrap();
        let mut theirs = slot(p3.id);
        (theirs.slot, theirs.host, theirs.entity) =
            (Uuid::from_u128(78), Uuid::from_u128(78), "poly".into());
        s.add_pool_slot(&theirs, 3_700_000).await.unwrap().unwrap();
        let mut pat = member("pat");
        pat.entity = "poly".into();
        s.put_pool_member(p3.id, &pat, 1).await.unwrap().unwrap();
        let refused = s
            .join_pool(p1.id, p3.id, "poly", (Some(0), None), 3_800_000)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.rule, "not_invited");
        let invited = PoolEntity {
            entity: "poly".into(),
            rights: [surplus_market::cohort::Right::Users].into(),
            lending_limit: Some(0),
            borrowing_limit: None,
            invited_at_ms: 3_800_000,
            joined_at_ms: None,
            leaving_at_ms: None,
        };
        s.put_pool_entity(p1.id, &invited).await.unwrap();
        let creator = PoolEntity {
            entity: "uni".into(),
            rights: [surplus_market::cohort::Right::Policy].into(),
            joined_at_ms: Some(3_800_000),
            ..invited.clone()
        };
        s.put_pool_entity(p1.id, &creator).await.unwrap();
        s.join_pool(p1.id, p3.id, "poly", (Some(0), None), 3_800_000)
            .await
            .unwrap()
            .unwrap();
        let again = s
            .join_pool(p1.id, p3.id, "poly", (Some(0), None), 3_800_001)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(again.rule, "joined");
        let moved = s.pool_slots(p1.id).await.unwrap();
        assert_eq!(
            moved
                .iter()
                .map(|r| (r.slot, r.entity.as_str()))
                .collect::<Vec<_>>(),
            [(Uuid::from_u128(78), "poly")]
        );
        let members = s.pool_members(p1.id).await.unwrap();
        assert!(
            members
                .iter()
                .any(|m| m.member == "pat" && m.entity == "poly"),
            "{members:?}"
        );
        assert!(
            s.pool(p3.id)
                .await
                .unwrap()
                .unwrap()
                .dissolved_at_ms
                .is_some()
        );
        assert!(s.pool_slots(p3.id).await.unwrap().is_empty());
        // Leaving: its slots leave at its deadline, once.
        assert_eq!(
            s.leave_pool_entity(p1.id, "uni", 3_900_000)
                .await
                .unwrap()
                .unwrap_err()
                .rule,
            "owner_stays"
        );
        assert!(
            s.leave_pool_entity(p1.id, "poly", 3_900_000)
                .await
                .unwrap()
                .unwrap()
        );
        assert!(
            !s.leave_pool_entity(p1.id, "poly", 3_900_000)
                .await
                .unwrap()
                .unwrap()
        );
        assert_eq!(
            s.pool_slots(p1.id).await.unwrap()[0].leaving_at_ms,
            Some(3_900_000)
        );
    }

    pub async fn a_hold_is_placed_and_given_back_once_and_a_prepaid_client_holds_only_what_it_has(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::ledger::{Entry, Posting};
        s.set_account_policy("client:dave", false, 1).await.unwrap();
        let pay = Posting {
            key: "pay-dave".into(),
            kind: "payment".into(),
            memo: String::new(),
            entries: vec![
                Entry {
                    account: "external".into(),
                    currency: "EUR".into(),
                    amount: -100,
                },
                Entry {
                    account: "client:dave".into(),
                    currency: "EUR".into(),
                    amount: 100,
                },
            ],
        };
        s.post(&pay, &[], 2).await.unwrap();
        let place = |key: &str, amount| ChangeSet {
            holds: vec![HoldChange::Place {
                key: key.into(),
                client: "dave".into(),
                currency: "EUR".into(),
                amount,
            }],
            ..ChangeSet::default()
        };
        let release = |key: &str| ChangeSet {
            holds: vec![HoldChange::Release { key: key.into() }],
            ..ChangeSet::default()
        };
        let balance = |account: &'static str| {
            let s = s.clone();
            async move {
                s.balances(Some(account))
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|(_, c, _)| c == "EUR")
                    .map_or(0, |(_, _, b)| b)
            }
        };
        s.apply_changes(&place("a", 70), 3).await.unwrap();
        s.apply_changes(&place("a", 70), 4).await.unwrap();
        assert_eq!(
            (balance("client:dave").await, balance("hold:dave").await),
            (30, 70),
            "held once"
        );
        // A second hold beyond what is left is refused whole, with what came before it.
        let both = ChangeSet {
            notices: vec![Notice {
                key: "n".into(),
                recipient: "client:dave".into(),
                kind: "k".into(),
                body: serde_json::json!({}),
            }],
            ..place("b", 31)
        };
        let refused = s.apply_changes(&both, 5).await.unwrap_err();
        assert!(matches!(refused, PostError::Ledger(_)), "{refused:?}");
        assert_eq!(balance("client:dave").await, 30);
        assert!(
            s.notices("client:dave", 10).await.unwrap().is_empty(),
            "nothing of a refused step"
        );
        // Given back once; a release of nothing held changes nothing.
        s.apply_changes(&release("a"), 6).await.unwrap();
        s.apply_changes(&release("a"), 7).await.unwrap();
        s.apply_changes(&release("never"), 8).await.unwrap();
        assert_eq!(
            (balance("client:dave").await, balance("hold:dave").await),
            (100, 0)
        );
        s.apply_changes(&place("b", 31), 9).await.unwrap();
        assert_eq!(balance("hold:dave").await, 31);
    }

    pub async fn prices_are_kept_once_and_answered_by_the_question(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::history::PriceKind;
        let point = |id: &str, kind, zone: &str, currency: &str, price, at_ms| PricePoint {
            id: id.into(),
            kind,
            listing: "lst-1".into(),
            provider: "bob".into(),
            zone: zone.into(),
            category: "medium".into(),
            currency: currency.into(),
            price,
            at_ms,
        };
        let points = [
            point("c-2", PriceKind::Spot, "z1", "EUR", 25, 20),
            point("c-1", PriceKind::Spot, "z1", "EUR", 20, 10),
            point("a-1", PriceKind::Auction, "z2", "EUR", 40, 15),
            point("q-1", PriceKind::Quote, "z1", "USD", 35, 30),
        ];
        for p in &points {
            assert!(s.record_price(p).await.unwrap());
        }
        assert!(!s.record_price(&points[0]).await.unwrap(), "kept once");
        let ask = |q: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = q
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            HistoryQuery::parse(&pairs).unwrap()
        };
        let ids = |ps: Vec<PricePoint>| ps.into_iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.price_history(&ask(&[]), 100).await.unwrap()),
            ["c-1", "a-1", "c-2", "q-1"],
            "oldest first"
        );
        assert_eq!(
            ids(s
                .price_history(&ask(&[("kind", "spot")]), 100)
                .await
                .unwrap()),
            ["c-1", "c-2"]
        );
        assert_eq!(
            ids(s
                .price_history(&ask(&[("currency", "eur"), ("zone", "z1")]), 100)
                .await
                .unwrap()),
            ["c-1", "c-2"]
        );
        assert_eq!(
            ids(s
                .price_history(&ask(&[("from", "15"), ("to", "30")]), 100)
                .await
                .unwrap()),
            ["a-1", "c-2"],
            "from inclusive, to exclusive"
        );
        assert_eq!(s.price_history(&ask(&[]), 2).await.unwrap().len(), 2);
        let stored = s
            .price_history(&ask(&[("kind", "quote")]), 100)
            .await
            .unwrap();
        assert_eq!(stored, [points[3].clone()], "stored as given");
    }

    pub async fn a_host_is_reserved_once_even_by_a_hundred_concurrent_requests(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::resell::{Goal, Interruptibility, PricingMode};
        let hosts: Vec<Uuid> = (1..=10).map(Uuid::from_u128).collect();
        let request = |n: u128, holder: &str| ReservationRequest {
            ids: vec![Uuid::from_u128(1_000 + n)],
            listing: "lst-1".into(),
            holder: holder.into(),
            mode: PricingMode::OnDemand,
            interruptibility: Interruptibility::NoInterruptions,
            goal: Goal::None,
            price: 30,
            upfront: 0,
            term_ms: None,
        };
        // Each step's change set: one notice per reservation made or ended.
        fn noted(kind: &'static str) -> impl Fn(&[Reservation]) -> ChangeSet + Send + Sync {
            move |rs: &[Reservation]| ChangeSet {
                notices: rs
                    .iter()
                    .map(|r| Notice {
                        key: format!("{kind}:{}", r.id),
                        recipient: format!("client:{}", r.holder),
                        kind: kind.into(),
                        body: serde_json::json!({ "host": r.host }),
                    })
                    .collect(),
                ..ChangeSet::default()
            }
        }
        // A hundred requests for one host each, at once, for ten hosts.
        let attempts: Vec<_> = (0..100u128)
            .map(|n| {
                let (s, hosts, r) = (s.clone(), hosts.clone(), request(n, &format!("client-{n}")));
                tokio::spawn(async move {
                    s.reserve("lst-1", &hosts, r, None, &noted("made"), 10)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let (mut made, mut sold_out) = (Vec::new(), 0);
        for a in attempts {
            match a.await.unwrap() {
                Ok(mut r) => made.append(&mut r),
                Err(refusal) => {
                    assert_eq!(refusal.rule, "sold_out", "{refusal}");
                    sold_out += 1;
                }
            }
        }
        assert_eq!((made.len(), sold_out), (10, 90));
        let held: std::collections::BTreeSet<Uuid> = made.iter().map(|r| r.host).collect();
        assert_eq!(held.len(), 10, "no host twice: {made:?}");
        let book = s.reservation_book("lst-1").await.unwrap();
        assert_eq!(
            book.reservations().count(),
            10,
            "nothing stored of the refused"
        );
        for r in &made {
            let notices = s
                .notices(&format!("client:{}", r.holder), 10)
                .await
                .unwrap();
            assert_eq!(notices.len(), 1, "the step's notice, with it: {notices:?}");
            assert_eq!(s.holding(r.host, 10).await.unwrap().as_ref(), Some(r));
        }
        let holders: std::collections::BTreeSet<&str> =
            made.iter().map(|r| r.holder.as_str()).collect();
        for n in 0..100 {
            let client = format!("client-{n}");
            if !holders.contains(client.as_str()) {
                assert!(
                    s.notices(&format!("client:{client}"), 10)
                        .await
                        .unwrap()
                        .is_empty(),
                    "nothing of a refused step is stored"
                );
            }
        }
        let stats = s.listing_reservations(10).await.unwrap();
        assert_eq!(stats["lst-1"].past, 10);
        assert_eq!(stats["lst-1"].held.len(), 10);

        // Only its holder releases a reservation; the host is then free again.
        let first = made[0].clone();
        let refused = s
            .release_reservation("lst-1", first.id, "someone-else", &noted("ended"), 20)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.rule, "not_holder");
        let ended = s
            .release_reservation("lst-1", first.id, &first.holder, &noted("ended"), 20)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ended.at_ms, 20);
        assert!(
            s.release_reservation("lst-1", first.id, &first.holder, &noted("ended"), 21)
                .await
                .unwrap()
                .is_err(),
            "released once"
        );
        let stored = s.reservation(first.id).await.unwrap().unwrap();
        assert!(!stored.holds_at(20) && stored.holds_at(19), "{stored:?}");
        assert_eq!(s.holding(first.host, 20).await.unwrap(), None);
        assert_eq!(
            s.notices(&format!("client:{}", first.holder), 10)
                .await
                .unwrap()
                .len(),
            2,
            "made, then ended"
        );
        let again = s
            .reserve(
                "lst-1",
                &hosts,
                request(500, "late"),
                None,
                &noted("made"),
                30,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again[0].host, first.host, "the released host, and only it");
        assert_eq!(s.reservations_of("late").await.unwrap(), again);
        assert!(s.reservations_of("nobody").await.unwrap().is_empty());
    }

    pub async fn an_interruption_keeps_its_notice_and_ends_once_at_its_deadline(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_market::interrupt::{Cause, notice};
        use surplus_market::resell::{Goal, Interruptibility, PricingMode};
        let hosts: Vec<Uuid> = (1..=2).map(Uuid::from_u128).collect();
        let nothing = |_: &[Reservation]| ChangeSet::default();
        let request = |n: u128, i: Interruptibility| ReservationRequest {
            ids: vec![Uuid::from_u128(3_000 + n)],
            listing: "lst-3".into(),
            holder: "alice".into(),
            mode: PricingMode::OnDemand,
            interruptibility: i,
            goal: Goal::None,
            price: 30,
            upfront: 0,
            term_ms: None,
        };
        let fulfil = s
            .reserve(
                "lst-3",
                &hosts,
                request(1, Interruptibility::FulfilmentBased),
                None,
                &nothing,
                10,
            )
            .await
            .unwrap()
            .unwrap()
            .remove(0);
        let kept = s
            .reserve(
                "lst-3",
                &hosts,
                request(2, Interruptibility::NoInterruptions),
                None,
                &nothing,
                10,
            )
            .await
            .unwrap()
            .unwrap()
            .remove(0);
        let given = notice(100, Cause::ProviderReclaim, None, 1_000);
        let told = |rs: &[Reservation]| ChangeSet {
            notices: rs
                .iter()
                .map(|r| Notice {
                    key: format!("interrupting:{}", r.id),
                    recipient: "client:alice".into(),
                    kind: "reservation.interrupting".into(),
                    body: serde_json::json!({}),
                })
                .collect(),
            ..ChangeSet::default()
        };
        // A do-not-interrupt reservation is left out, with the book's reason; the
        // other is noticed, with its notices.
        let (noticed, skipped) = s
            .notice_interruptions("lst-3", &[(fulfil.id, given), (kept.id, given)], &told, 100)
            .await
            .unwrap();
        assert_eq!(noticed.len(), 1);
        assert_eq!(noticed[0].id, fulfil.id);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].rule, "do_not_interrupt");
        assert_eq!(s.interruption(kept.id).await.unwrap(), None);
        assert_eq!(s.interruption(fulfil.id).await.unwrap(), Some(given));
        assert_eq!(s.notices("client:alice", 10).await.unwrap().len(), 1);
        let later = notice(500, Cause::ProviderReclaim, None, 1_000);
        let (twice, _) = s
            .notice_interruptions("lst-3", &[(fulfil.id, later)], &told, 500)
            .await
            .unwrap();
        assert!(twice.is_empty(), "the first notice stands");
        assert_eq!(s.interruption(fulfil.id).await.unwrap(), Some(given));

        // Due at its deadline, 1 100; applied once by four at once, ending it then.
        assert!(s.due_interruptions(1_099).await.unwrap().is_empty());
        assert_eq!(s.due_interruptions(5_000).await.unwrap().len(), 1);
        // Past its deadline the reservation holds nothing, and a release is too late,
        // even before the interruption is applied.
        assert_eq!(s.holding(fulfil.host, 5_000).await.unwrap(), None);
        let late = s
            .release_reservation("lst-3", fulfil.id, "alice", &nothing, 5_000)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(late.rule, "ended", "{late}");
        let appliers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                let id = fulfil.id;
                tokio::spawn(async move {
                    s.apply_interruption(
                        "lst-3",
                        id,
                        &|_: &[Reservation]| ChangeSet::default(),
                        5_000,
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut ended = Vec::new();
        for a in appliers {
            ended.extend(a.await.unwrap());
        }
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0].at_ms, 1_100, "at the deadline, not when applied");
        assert!(s.due_interruptions(6_000).await.unwrap().is_empty());
        assert_eq!(s.holding(fulfil.host, 1_100).await.unwrap(), None);
        assert_eq!(
            s.holding(kept.host, 6_000).await.unwrap().map(|r| r.id),
            Some(kept.id)
        );
    }

    pub async fn terms_end_once_and_a_quote_is_honoured_once(_f: &Fixture, s: Arc<dyn Store>) {
        use surplus_market::quote::Quote;
        use surplus_market::resell::{Goal, Interruptibility, PricingMode};
        let hosts: Vec<Uuid> = (1..=2).map(Uuid::from_u128).collect();
        let nothing = |_: &[Reservation]| ChangeSet::default();
        let quote = Quote {
            id: Uuid::from_u128(77),
            listing: "lst-2".into(),
            price: 40,
            issued_at_ms: 0,
            valid_until_ms: 60_000,
        };
        s.create_quote(&quote, "alice").await.unwrap();
        assert_eq!(
            s.quote(quote.id)
                .await
                .unwrap()
                .map(|q| (q.holder, q.accepted_at_ms)),
            Some(("alice".into(), None))
        );
        let request = |n: u128, term_ms: Option<i64>| ReservationRequest {
            ids: vec![Uuid::from_u128(2_000 + n)],
            listing: "lst-2".into(),
            holder: "alice".into(),
            mode: PricingMode::Immediate,
            interruptibility: Interruptibility::NoInterruptions,
            goal: Goal::None,
            price: 40,
            upfront: 0,
            term_ms,
        };
        // The quote is taken with the reservation, in its transaction, once.
        let with_price = |rs: &[Reservation]| ChangeSet {
            prices: vec![surplus_market::history::PricePoint {
                id: "quote:77".into(),
                kind: surplus_market::history::PriceKind::Quote,
                listing: "lst-2".into(),
                provider: "bob".into(),
                zone: "z".into(),
                category: "medium".into(),
                currency: "EUR".into(),
                price: 40,
                at_ms: rs[0].starts_at_ms,
            }],
            ..ChangeSet::default()
        };
        let made = s
            .reserve(
                "lst-2",
                &hosts,
                request(1, Some(1_000)),
                Some(quote.id),
                &with_price,
                100,
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.quote(quote.id).await.unwrap().unwrap().accepted_at_ms,
            Some(100)
        );
        let history = s.price_history(&HistoryQuery::default(), 10).await.unwrap();
        assert_eq!(history.len(), 1, "the accepted quote's price is recorded");
        let twice = s
            .reserve(
                "lst-2",
                &hosts,
                request(2, None),
                Some(quote.id),
                &nothing,
                200,
            )
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(twice.rule, "quote_used");
        assert_eq!(
            s.reservation_book("lst-2")
                .await
                .unwrap()
                .reservations()
                .count(),
            1
        );

        // The term ends at 1 100: recorded once, however often and by however many
        // controllers it is asked, at the term's end however late.
        assert!(
            s.expire_reservations(1_099, &nothing)
                .await
                .unwrap()
                .is_empty()
        );
        let askers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.expire_reservations(5_000, &|_: &[Reservation]| ChangeSet::default())
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut ended = Vec::new();
        for a in askers {
            ended.extend(a.await.unwrap());
        }
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!((ended[0].reservation, ended[0].at_ms), (made[0].id, 1_100));
        assert!(
            s.expire_reservations(6_000, &nothing)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.holding(made[0].host, 1_050).await.unwrap().map(|r| r.id),
            Some(made[0].id)
        );
        assert_eq!(s.holding(made[0].host, 1_100).await.unwrap(), None);
    }

    pub async fn a_webhook_batch_takes_a_few_of_each_account_and_reads_keep_the_newest(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let notice = |n: u32, to: &str| Notice {
            key: format!("k{n}"),
            recipient: to.into(),
            kind: "resell.rejected".into(),
            body: serde_json::json!({ "n": n }),
        };
        // Five notices for a busy account, then one for a quiet one, then one for an
        // account without a webhook.
        for n in 0..5 {
            let set = ChangeSet {
                notices: vec![notice(n, "provider:busy")],
                ..ChangeSet::default()
            };
            s.apply_changes(&set, 10 + i64::from(n)).await.unwrap();
        }
        for (n, to) in [(5, "provider:quiet"), (6, "provider:silent")] {
            let set = ChangeSet {
                notices: vec![notice(n, to)],
                ..ChangeSet::default()
            };
            s.apply_changes(&set, 20).await.unwrap();
        }
        s.set_webhook("provider:busy", Some("https://busy.example/"), 1)
            .await
            .unwrap();
        s.set_webhook("provider:quiet", Some("https://quiet.example/"), 1)
            .await
            .unwrap();
        let keys = |ds: Vec<Delivery>| {
            ds.into_iter()
                .map(|d| (d.notice.notice.key, d.url))
                .collect::<Vec<_>>()
        };
        let batch = s.deliverable(30, 12, 2, 10).await.unwrap();
        assert_eq!(
            keys(batch),
            [
                ("k0".to_owned(), "https://busy.example/".to_owned()),
                ("k1".to_owned(), "https://busy.example/".to_owned()),
                ("k5".to_owned(), "https://quiet.example/".to_owned()),
            ],
            "two of the busy account's, oldest first, and the quiet one's"
        );
        assert_eq!(keys(s.deliverable(30, 12, 2, 1).await.unwrap()).len(), 1);
        // A delivered notice leaves the batch; the next of its account comes in.
        let delivered = DeliveryAttempt {
            attempt: 1,
            at_ms: 31,
            outcome: "delivered".into(),
        };
        s.record_attempt("k0", &delivered, true, None)
            .await
            .unwrap();
        let batch = keys(s.deliverable(32, 12, 2, 10).await.unwrap());
        assert_eq!(
            batch.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["k1", "k2", "k5"]
        );
        // Reading an account's notices keeps the newest, oldest first.
        let newest: Vec<String> = s
            .notices("provider:busy", 2)
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.notice.key)
            .collect();
        assert_eq!(newest, ["k3", "k4"]);
    }

    pub async fn a_resell_step_applies_once_over_the_version_it_read(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let host = Uuid::now_v7();
        let document: ResellRequest = serde_json::from_value(serde_json::json!({
            "contact": "ops@bob.example",
            "resource_sets": [{"kind": "compute", "zone": "bob-1", "hosts": [host], "system": {"threads": 4}, "compatibility": {"level": "full"}}],
            "pricing": {"modes": ["spot"], "currency": "EUR", "minimum_price": 20},
            "interruptibility": "price_based",
            "goal": "none"
        }))
        .unwrap();
        let id = Uuid::now_v7();
        let mut row = ResellRow {
            id,
            provider: "bob".into(),
            document,
            pipeline: Pipeline::new(id, &[(host, 0)], 10),
            version: 0,
            created_at_ms: 10,
            updated_at_ms: 10,
        };
        s.create_resell_request(&row).await.unwrap();
        assert_eq!(s.resell_request(id).await.unwrap().as_ref(), Some(&row));
        assert_eq!(s.open_resell_requests().await.unwrap().len(), 1);

        // A step is stored with what it makes, over the version it read.
        let mut next = row.clone();
        next.pipeline.handle_preliminary(20, &[], 1_000).unwrap();
        let notice = Notice {
            key: format!("k:{id}"),
            recipient: "provider:bob".into(),
            kind: "resell.accepted".into(),
            body: serde_json::json!({"request": id}),
        };
        let step = ResellStep {
            listings: vec![],
            notices: vec![notice.clone()],
        };
        assert!(s.advance_resell_request(&next, &step, 20).await.unwrap());
        // A second step over the same version (a stale reader) writes nothing.
        let mut stale = row.clone();
        stale.pipeline.handle_preliminary(21, &[], 1_000).unwrap();
        let other = ResellStep {
            listings: vec![],
            notices: vec![Notice {
                key: "other".into(),
                ..notice.clone()
            }],
        };
        assert!(!s.advance_resell_request(&stale, &other, 21).await.unwrap());
        let stored = s.resell_request(id).await.unwrap().unwrap();
        assert_eq!((stored.version, stored.updated_at_ms), (1, 20));
        assert_eq!(stored.pipeline, next.pipeline);
        let notices = s.notices("provider:bob", 10).await.unwrap();
        assert_eq!(
            notices
                .iter()
                .map(|n| n.notice.key.as_str())
                .collect::<Vec<_>>(),
            [notice.key.as_str()],
            "the stale step's notice was not queued"
        );

        // Listings are kept once per request, set and category; a closed pipeline
        // leaves the open list.
        row = stored;
        row.pipeline.stage = surplus_market::pipeline::Stage::Rejected;
        row.pipeline.notified = true;
        let listing = |lid: &str| Listing {
            id: lid.into(),
            request: id,
            provider: "bob".into(),
            zone: "bob-1".into(),
            kind: surplus_market::resell::ResourceKind::Compute,
            category: "small".into(),
            set: 0,
            hosts: vec![host],
            score: 1.0,
            hardening_index: 60,
            compat_level: surplus_protocol::control::CompatLevel::Fully,
            operations: vec![],
            pricing_modes: Default::default(),
            interruptibility: surplus_market::resell::Interruptibility::PriceBased,
            currency: "EUR".into(),
            price: 20,
            available: 1,
            rating: None,
            uptime: None,
            utilisation: None,
            listed: true,
            failed_retest: false,
            created_at_ms: 30,
            next_retest_at_ms: None,
            last_retest_at_ms: None,
            retest: None,
            grace_ms: None,
        };
        let twice = ResellStep {
            listings: vec![listing("lst-1"), listing("lst-2")],
            notices: vec![notice.clone()],
        };
        assert!(s.advance_resell_request(&row, &twice, 30).await.unwrap());
        assert_eq!(s.listings().await.unwrap(), [listing("lst-1")]);
        assert_eq!(s.listing("lst-1").await.unwrap(), Some(listing("lst-1")));
        assert_eq!(s.listing("lst-2").await.unwrap(), None);
        assert_eq!(s.notices("provider:bob", 10).await.unwrap().len(), 1);
        assert!(s.open_resell_requests().await.unwrap().is_empty());
        assert_eq!(s.resell_requests(Some("bob")).await.unwrap().len(), 1);
        assert!(s.resell_requests(Some("carol")).await.unwrap().is_empty());
        // Re-tests are timers as rows: asked for, under way, scheduled.
        assert!(
            s.due_listings(1_000).await.unwrap().is_empty(),
            "none scheduled"
        );
        assert!(!s.request_retest("lst-9", 40).await.unwrap());
        assert!(s.request_retest("lst-1", 40).await.unwrap());
        let due = s.due_listings(40).await.unwrap();
        assert_eq!((due.len(), due[0].1), (1, Some(40)));
        let mut under_way = listing("lst-1");
        under_way.retest = Some(surplus_market::quality::Retest {
            started_at_ms: 41,
            runs: vec![(host, Uuid::now_v7())],
            on_demand: true,
        });
        s.put_listing(&under_way, Some(40), &[], 41).await.unwrap();
        let due = s.due_listings(41).await.unwrap();
        assert_eq!(
            due,
            [(under_way.clone(), None)],
            "the request is answered, the re-test under way"
        );
        let mut done = listing("lst-1");
        done.listed = false;
        done.next_retest_at_ms = Some(100);
        let advisory = Notice {
            key: "listing.delisted:lst-1:50".into(),
            kind: "listing.delisted".into(),
            ..notice.clone()
        };
        s.put_listing(&done, None, std::slice::from_ref(&advisory), 50)
            .await
            .unwrap();
        assert!(s.due_listings(99).await.unwrap().is_empty());
        assert_eq!(s.due_listings(100).await.unwrap().len(), 1);
        assert_eq!(s.listing("lst-1").await.unwrap(), Some(done));
        assert_eq!(s.notices("provider:bob", 10).await.unwrap().len(), 2);

        // One rating per client and instance.
        let rating = Rating {
            client: "alice".into(),
            instance: "i-1".into(),
            provider: "bob".into(),
            score: 4,
            comment: "fine".into(),
            created_at_ms: 60,
        };
        assert!(s.put_rating(&rating).await.unwrap());
        assert!(
            !s.put_rating(&Rating {
                score: 1,
                ..rating.clone()
            })
            .await
            .unwrap()
        );
        assert_eq!(s.ratings(Some("bob")).await.unwrap(), [rating]);
        assert!(s.ratings(Some("carol")).await.unwrap().is_empty());
    }

    pub async fn providers_and_their_agreements_are_kept_and_ended_once(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_api::resell::{PricingMode, ResourceKind};
        let provider = |account: &str, at| Provider {
            account: account.into(),
            name: account.to_uppercase(),
            contact: format!("ops@{account}.example"),
            zones: vec![format!("{account}-1")],
            accepted: false,
            created_at_ms: at,
            updated_at_ms: at,
        };
        assert_eq!(
            s.put_provider(&provider("bob", 10)).await.unwrap(),
            provider("bob", 10)
        );
        s.put_provider(&provider("alice", 20)).await.unwrap();
        // A new profile replaces the old one but keeps when it was first recorded.
        let changed = Provider {
            accepted: true,
            zones: vec!["bob-1".into(), "bob-2".into()],
            ..provider("bob", 30)
        };
        let stored = s.put_provider(&changed).await.unwrap();
        assert_eq!((stored.created_at_ms, stored.updated_at_ms), (10, 30));
        assert_eq!(s.provider("bob").await.unwrap(), Some(stored));
        assert_eq!(s.provider("carol").await.unwrap(), None);
        let accounts: Vec<String> = s
            .providers()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.account)
            .collect();
        assert_eq!(accounts, ["alice", "bob"]);

        let agreement = |id: &str, provider: &str, at| Agreement {
            id: id.into(),
            provider: provider.into(),
            valid_from_ms: 100,
            valid_until_ms: 1_000,
            resource_kinds: [ResourceKind::Compute].into(),
            pricing_modes: [PricingMode::Spot].into(),
            commission_bps: 1_500,
            max_hosts: 3,
            max_cpus: Some(48),
            created_at_ms: at,
        };
        s.create_agreement(&agreement("agr-1", "bob", 1))
            .await
            .unwrap();
        s.create_agreement(&agreement("agr-2", "bob", 2))
            .await
            .unwrap();
        s.create_agreement(&agreement("agr-3", "alice", 3))
            .await
            .unwrap();
        assert!(matches!(
            s.create_agreement(&agreement("agr-4", "carol", 4)).await,
            Err(StoreError::NotFound(_))
        ));
        let ids = |list: Vec<Agreement>| list.into_iter().map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.agreements(Some("bob")).await.unwrap()),
            ["agr-2", "agr-1"]
        );
        assert_eq!(
            ids(s.agreements(None).await.unwrap()),
            ["agr-3", "agr-2", "agr-1"]
        );
        // Ended at 500, once; the end is kept.
        let ended = s.end_agreement("agr-1", 500).await.unwrap().unwrap();
        assert_eq!(ended.valid_until_ms, 500);
        assert_eq!(s.end_agreement("agr-1", 600).await.unwrap(), None);
        assert_eq!(s.agreement("agr-1").await.unwrap(), Some(ended));
        // One not yet in force ends before it starts.
        let early = s.end_agreement("agr-2", 50).await.unwrap().unwrap();
        assert!(!early.in_force(100) && !early.in_force(50));
        assert!(matches!(
            s.end_agreement("agr-9", 1).await,
            Err(StoreError::NotFound(_))
        ));

        // Settings: none until set, then the last one set.
        assert_eq!(s.setting("platforms").await.unwrap(), None);
        s.put_setting("platforms", r#"{"a":1}"#, 5).await.unwrap();
        s.put_setting("platforms", r#"{"a":2}"#, 6).await.unwrap();
        assert_eq!(
            s.setting("platforms").await.unwrap().as_deref(),
            Some(r#"{"a":2}"#)
        );
        assert_eq!(s.setting("categories").await.unwrap(), None);
    }

    pub async fn snapshots_are_kept_per_volume_oldest_first(_f: &Fixture, s: Arc<dyn Store>) {
        use surplus_protocol::control::Snapshot;
        token(&*s, "snaps", i64::MAX).await;
        let a = new_agent("snaps");
        s.enroll_agent("snaps", 0, &a).await.unwrap();
        let snap = |id: &str, volume: &str, at| Snapshot {
            id: id.into(),
            volume_id: volume.into(),
            size_bytes: 4096,
            location: format!("/var/lib/surplus/snapshots/{id}"),
            created_at_ms: at,
        };
        s.put_snapshot(a.id, &snap("snap-2", "vol-a", 20))
            .await
            .unwrap();
        s.put_snapshot(a.id, &snap("snap-1", "vol-a", 10))
            .await
            .unwrap();
        s.put_snapshot(a.id, &snap("snap-3", "vol-b", 30))
            .await
            .unwrap();
        // Recorded again (a retried command): still one.
        s.put_snapshot(a.id, &snap("snap-1", "vol-a", 10))
            .await
            .unwrap();
        let ids = |list: Vec<Snapshot>| list.into_iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.snapshots(&["vol-a".into()]).await.unwrap()),
            ["snap-1", "snap-2"]
        );
        assert_eq!(
            ids(s
                .snapshots(&["vol-b".into(), "vol-a".into()])
                .await
                .unwrap()),
            ["snap-1", "snap-2", "snap-3"]
        );
        assert!(s.snapshots(&["vol-c".into()]).await.unwrap().is_empty());
        assert!(s.snapshots(&[]).await.unwrap().is_empty());
        assert_eq!(
            s.snapshots(&["vol-b".into()]).await.unwrap(),
            [snap("snap-3", "vol-b", 30)]
        );
    }

    pub async fn an_agent_page_is_filtered_sorted_and_counted_by_the_database(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_protocol::control::{CompatLevel, CompatReport};
        // (hostname, labels, CPUs and GPUs (no inventory: None), status, compat level)
        type Host = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Option<(u64, usize)>,
            AgentStatus,
            Option<CompatLevel>,
        );
        let hosts: [Host; 5] = [
            (
                "alpha-1",
                &[("zone", "eu"), ("provider", "alice")],
                Some((8, 0)),
                AgentStatus::Online,
                Some(CompatLevel::Fully),
            ),
            (
                "Beta_2",
                &[("zone", "us"), ("provider", "alice")],
                Some((32, 2)),
                AgentStatus::Enrolled,
                None,
            ),
            (
                "gamma%3",
                &[("zone", "eu")],
                Some((16, 1)),
                AgentStatus::Unreachable,
                Some(CompatLevel::Somewhat),
            ),
            (
                "delta-4",
                &[("provider", "bob"), ("zone", "eu west")],
                None,
                AgentStatus::Revoked,
                None,
            ),
            (
                "beta-5",
                &[("provider", "alice")],
                Some((32, 0)),
                AgentStatus::Online,
                Some(CompatLevel::Fully),
            ),
        ];
        let mut ids = Vec::new();
        for (n, (hostname, labels, facts, status, level)) in hosts.iter().enumerate() {
            let secret = format!("page{n}");
            s.create_join_token(&NewJoinToken {
                id: Uuid::now_v7(),
                secret_hash: secret.clone(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                created_at_ms: 0,
                expires_at_ms: i64::MAX,
                created_by: "test".into(),
            })
            .await
            .unwrap();
            let a = NewAgent {
                hostname: hostname.to_string(),
                ..new_agent(&format!("p{n}"))
            };
            s.enroll_agent(&secret, n as i64, &a).await.unwrap();
            if let Some((cpus, gpus)) = facts {
                let gpu = serde_json::json!({"pci_address": "x", "vendor_id": "0x10de", "device_id": "0x1", "model": "L4"});
                let inventory =
                    serde_json::json!({"cpu": {"logical_cpus": cpus}, "gpus": vec![gpu; *gpus]});
                s.save_inventory(a.id, &inventory, "d", 1).await.unwrap();
            }
            match status {
                AgentStatus::Enrolled => {}
                AgentStatus::Revoked => {
                    s.revoke_agent(a.id, 10).await.unwrap();
                }
                other => {
                    // Online since 100 for the first and longer for later ones, so that
                    // uptime orders them.
                    s.set_status(a.id, AgentStatus::Online, 100 - n as i64 * 10)
                        .await
                        .unwrap();
                    if *other == AgentStatus::Unreachable {
                        s.set_status(a.id, AgentStatus::Unreachable, 150)
                            .await
                            .unwrap();
                    }
                }
            }
            if let Some(level) = level {
                let report = CompatReport {
                    driver: "process".into(),
                    level: *level,
                    checks: Vec::new(),
                    isolation: Default::default(),
                    ran_at_ms: 1,
                };
                s.save_compat_report(a.id, &report, 1).await.unwrap();
            }
            ids.push(a.id);
        }
        let page = |filter: AgentFilter| {
            let s = s.clone();
            async move { s.agent_page(&filter, 200).await.unwrap() }
        };
        let names = |p: &AgentPage| -> Vec<String> {
            p.agents.iter().map(|l| l.agent.hostname.clone()).collect()
        };

        // No filter: everyone, oldest enrollment first, and the counts by status.
        let all = page(AgentFilter::default()).await;
        assert_eq!(
            names(&all),
            ["alpha-1", "Beta_2", "gamma%3", "delta-4", "beta-5"]
        );
        assert_eq!(all.total, 5);
        assert_eq!(
            all.by_status,
            [
                (AgentStatus::Enrolled, 1),
                (AgentStatus::Online, 2),
                (AgentStatus::Revoked, 1),
                (AgentStatus::Unreachable, 1)
            ]
        );
        assert_eq!(all.agents[0].compat, Some(CompatLevel::Fully));
        assert_eq!(all.agents[1].inventory.gpus, Some(2));

        let with = |f: fn(&mut AgentFilter)| {
            let mut filter = AgentFilter::default();
            f(&mut filter);
            filter
        };
        // A provider's hosts, its label or the house's; counts are the provider's.
        let alice = page(with(|f| f.provider = Some("alice".into()))).await;
        assert_eq!(names(&alice), ["alpha-1", "Beta_2", "beta-5"]);
        assert_eq!(
            alice.by_status,
            [(AgentStatus::Enrolled, 1), (AgentStatus::Online, 2)]
        );
        let house = page(with(|f| f.provider = Some("house".into()))).await;
        assert_eq!(names(&house), ["gamma%3"]);
        // Text: part of a hostname, ASCII case ignored, `%` and `_` literal; or the
        // start of an id.
        assert_eq!(
            names(&page(with(|f| f.text = Some("BETA".into()))).await),
            ["Beta_2", "beta-5"]
        );
        assert_eq!(
            names(&page(with(|f| f.text = Some("a_".into()))).await),
            ["Beta_2"]
        );
        assert_eq!(
            names(&page(with(|f| f.text = Some("%".into()))).await),
            ["gamma%3"]
        );
        let id_start = ids[3].to_string()[..18].to_owned();
        let by_id = s
            .agent_page(
                &AgentFilter {
                    text: Some(id_start),
                    ..AgentFilter::default()
                },
                200,
            )
            .await
            .unwrap();
        assert_eq!(names(&by_id), ["delta-4"]);
        // A label, with any key and value.
        assert_eq!(
            names(&page(with(|f| f.label = Some(("zone".into(), "eu".into())))).await),
            ["alpha-1", "gamma%3"]
        );
        assert_eq!(
            names(&page(with(|f| f.label = Some(("zone".into(), "eu west".into())))).await),
            ["delta-4"]
        );
        assert!(
            page(with(|f| f.label = Some(("zone'".into(), "eu".into()))))
                .await
                .agents
                .is_empty()
        );
        // Status, GPUs, compatibility (or none reported).
        assert_eq!(
            names(&page(with(|f| f.status = Some(AgentStatus::Online))).await),
            ["alpha-1", "beta-5"]
        );
        assert_eq!(
            names(&page(with(|f| f.gpu = Some(true))).await),
            ["Beta_2", "gamma%3"]
        );
        assert_eq!(
            names(&page(with(|f| f.gpu = Some(false))).await),
            ["alpha-1", "delta-4", "beta-5"]
        );
        assert_eq!(
            names(&page(with(|f| f.compat = Some(Some(CompatLevel::Fully)))).await),
            ["alpha-1", "beta-5"]
        );
        assert_eq!(
            names(&page(with(|f| f.compat = Some(None))).await),
            ["Beta_2", "delta-4"]
        );
        // Orders, each ending with the id.
        let sorted = |sort| {
            page(AgentFilter {
                sort,
                ..AgentFilter::default()
            })
        };
        assert_eq!(
            names(&sorted(AgentSort::Hostname).await),
            ["Beta_2", "alpha-1", "beta-5", "delta-4", "gamma%3"]
        );
        assert_eq!(
            names(&sorted(AgentSort::Cpus).await),
            ["Beta_2", "beta-5", "gamma%3", "alpha-1", "delta-4"]
        );
        assert_eq!(
            names(&sorted(AgentSort::Gpus).await),
            ["Beta_2", "gamma%3", "alpha-1", "beta-5", "delta-4"]
        );
        assert_eq!(
            names(&sorted(AgentSort::Status).await),
            ["Beta_2", "alpha-1", "beta-5", "delta-4", "gamma%3"]
        );
        // Uptime at 200: alpha-1 online since 100 (100 of 100 ms), beta-5 since 60
        // (140 of 140), gamma%3 online from 80 to 150 (70 of 120); never seen last.
        let uptime = names(&sorted(AgentSort::Uptime).await);
        assert_eq!(&uptime[2..], ["gamma%3", "Beta_2", "delta-4"], "{uptime:?}");
        // A page: the rest of the order, and the total of all pages.
        let second = page(AgentFilter {
            sort: AgentSort::Hostname,
            limit: Some(2),
            offset: 2,
            ..AgentFilter::default()
        })
        .await;
        assert_eq!(
            (names(&second), second.total),
            (vec!["beta-5".to_owned(), "delta-4".into()], 5)
        );
        let beyond = page(AgentFilter {
            limit: Some(2),
            offset: 9,
            ..AgentFilter::default()
        })
        .await;
        assert!(beyond.agents.is_empty());
        assert_eq!(beyond.total, 5);
    }

    pub async fn the_agent_list_reads_the_same_facts_as_the_whole_inventory(
        f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let inventories = [
            Some(serde_json::json!({
                "os": {"name": "Debian GNU/Linux", "version": "12"},
                "cpu": {"logical_cpus": 16, "flags": ["avx2"]},
                "memory": {"total_bytes": 68_719_476_736_u64},
                "gpus": [],
            })),
            // A name without a version, no memory section.
            Some(serde_json::json!({"os": {"name": "Alpine"}, "cpu": {"logical_cpus": 2}})),
            // Never reported.
            None,
            // Two GPUs: the first one's model names them.
            Some(serde_json::json!({"gpus": [
                {"pci_address": "0000:01:00.0", "vendor_id": "0x10de", "device_id": "0x20b2",
                 "vendor": "NVIDIA", "model": "NVIDIA A100-SXM4-80GB", "memory_bytes": 85_899_345_920_u64},
                {"pci_address": "0000:02:00.0", "vendor_id": "0x10de", "device_id": "0x20b2",
                 "vendor": "NVIDIA", "model": "NVIDIA A100-SXM4-80GB", "memory_bytes": 85_899_345_920_u64},
            ]})),
            // A GPU known by its PCI ids only.
            Some(serde_json::json!({"gpus": [
                {"pci_address": "0000:03:00.0", "vendor_id": "0x1234", "device_id": "0x5678"},
            ]})),
        ];
        let mut ids = Vec::new();
        for (n, inventory) in inventories.iter().enumerate() {
            let secret = format!("t{n}");
            token(&*s, &secret, i64::MAX).await;
            let a = new_agent(&format!("0{n}"));
            s.enroll_agent(&secret, n as i64, &a).await.unwrap();
            if let Some(i) = inventory {
                s.save_inventory(a.id, i, &format!("d{n}"), 1)
                    .await
                    .unwrap();
            }
            ids.push(a.id);
        }
        let whole = s.agents().await.unwrap();
        let list = listed(&*s).await;
        assert_eq!(list.len(), whole.len());
        for (listed, full) in list.iter().zip(&whole) {
            let (record, brief) = (&listed.agent, &listed.inventory);
            assert_eq!(brief, &InventoryBrief::of(full.inventory.as_ref()));
            assert_eq!(record.inventory, None, "the list leaves inventories out");
            assert_eq!(
                AgentRecord {
                    inventory: None,
                    ..full.clone()
                },
                *record
            );
        }
        let briefs: Vec<&InventoryBrief> = list.iter().map(|l| &l.inventory).collect();
        assert_eq!(briefs[0].os.as_deref(), Some("Debian GNU/Linux 12"));
        assert_eq!(briefs[0].memory_bytes, Some(68_719_476_736));
        assert_eq!(
            (briefs[1].os.as_deref(), briefs[1].memory_bytes),
            (Some("Alpine"), None)
        );
        assert_eq!(*briefs[2], InventoryBrief::default());
        assert_eq!((briefs[0].gpus, briefs[0].gpu.as_deref()), (Some(0), None));
        assert_eq!(
            (briefs[3].gpus, briefs[3].gpu.as_deref()),
            (Some(2), Some("NVIDIA A100-SXM4-80GB"))
        );
        assert_eq!(
            (briefs[4].gpus, briefs[4].gpu.as_deref()),
            (Some(1), Some("0x1234:0x5678"))
        );
        // The level of the last compatibility report comes with the listing.
        let report = |level| surplus_protocol::control::CompatReport {
            driver: "process".into(),
            level,
            checks: Vec::new(),
            isolation: Default::default(),
            ran_at_ms: 1,
        };
        use surplus_protocol::control::CompatLevel;
        s.save_compat_report(ids[0], &report(CompatLevel::Fully), 2)
            .await
            .unwrap();
        s.save_compat_report(ids[0], &report(CompatLevel::Highly), 3)
            .await
            .unwrap();
        let levels: Vec<_> = listed(&*s).await.into_iter().map(|l| l.compat).collect();
        assert_eq!(
            levels,
            [Some(CompatLevel::Highly), None, None, None, None],
            "one row per agent, with its last level"
        );

        // Inventories stored before migrations 0009 and 0010 get the same facts from
        // their SQL as new ones get from `InventoryBrief::of`.
        let before = listed(&*s).await;
        let forget = "UPDATE agents SET inventory_cpus = NULL, inventory_memory_bytes = NULL, \
             inventory_os = NULL, inventory_gpus = NULL, inventory_gpu = NULL;";
        f.execute(
            &[
                forget,
                backfill(include_str!(
                    "../../controller/migrations/sqlite/0009_agent_facts.sql"
                )),
                backfill(include_str!(
                    "../../controller/migrations/sqlite/0010_agent_gpus.sql"
                )),
            ]
            .join("\n"),
            &[
                forget,
                backfill(include_str!(
                    "../../controller/migrations/postgres/0009_agent_facts.sql"
                )),
                backfill(include_str!(
                    "../../controller/migrations/postgres/0010_agent_gpus.sql"
                )),
            ]
            .join("\n"),
        )
        .await;
        assert_eq!(listed(&*s).await, before);
        assert_eq!(list.iter().map(|l| l.agent.id).collect::<Vec<_>>(), ids);
    }

    pub async fn a_token_registers_one_agent_and_says_why_it_refuses_others(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        token(&*s, "t1", 1000).await;
        let a = new_agent("01");
        match s.enroll_agent("t1", 10, &a).await.unwrap() {
            EnrollOutcome::Registered(labels) => {
                assert_eq!(labels.get("zone").map(String::as_str), Some("eu"))
            }
            other => panic!("{other:?}"),
        }
        let stored = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!(
            (stored.status, stored.cert_serial.as_str()),
            (AgentStatus::Enrolled, "01")
        );
        assert!(matches!(
            s.enroll_agent("t1", 20, &new_agent("02")).await.unwrap(),
            EnrollOutcome::Refused(TokenRefusal::Used)
        ));
        assert!(matches!(
            s.enroll_agent("nope", 20, &new_agent("03")).await.unwrap(),
            EnrollOutcome::Refused(TokenRefusal::Unknown)
        ));
        token(&*s, "t2", 1000).await;
        assert!(matches!(
            s.enroll_agent("t2", 1000, &new_agent("04")).await.unwrap(),
            EnrollOutcome::Refused(TokenRefusal::Expired)
        ));
        assert_eq!(
            s.agents().await.unwrap().len(),
            1,
            "refusals register nothing"
        );
    }

    pub async fn many_racing_enrollments_with_one_token_register_exactly_one_agent(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        token(&*s, "race", i64::MAX).await;
        let attempts = (0..16).map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.enroll_agent("race", 1, &new_agent(&format!("{i:02}")))
                    .await
                    .unwrap()
            })
        });
        let mut registered = 0;
        for a in attempts {
            match a.await.unwrap() {
                EnrollOutcome::Registered(_) => registered += 1,
                EnrollOutcome::Refused(r) => assert_eq!(r, TokenRefusal::Used),
            }
        }
        assert_eq!(registered, 1);
        assert_eq!(s.agents().await.unwrap().len(), 1);
    }

    pub async fn online_time_is_accounted_across_sessions_and_a_crash(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        token(&*s, "t", i64::MAX).await;
        let a = new_agent("01");
        s.enroll_agent("t", 0, &a).await.unwrap();
        s.set_status(a.id, AgentStatus::Online, 1_000)
            .await
            .unwrap();
        s.set_status(a.id, AgentStatus::Unreachable, 4_000)
            .await
            .unwrap();
        s.set_status(a.id, AgentStatus::Online, 10_000)
            .await
            .unwrap();
        s.set_status(a.id, AgentStatus::Online, 11_000)
            .await
            .unwrap(); // repeated: no double count
        let r = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!(
            (r.first_seen_ms, r.online_total_ms, r.online_since_ms),
            (Some(1_000), 3_000, Some(10_000))
        );

        // The controller dies; the next one closes the period at the last time it was seen.
        s.touch(&[(a.id, 12_500)]).await.unwrap();
        s.close_dangling(60_000).await.unwrap();
        let r = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.online_total_ms, r.online_since_ms),
            (AgentStatus::Unreachable, 5_500, None)
        );
    }

    pub async fn revocation_is_final_and_unknown_agents_are_named(_f: &Fixture, s: Arc<dyn Store>) {
        token(&*s, "t", i64::MAX).await;
        let a = new_agent("01");
        s.enroll_agent("t", 0, &a).await.unwrap();
        s.set_status(a.id, AgentStatus::Online, 100).await.unwrap();
        assert!(s.revoke_agent(a.id, 200).await.unwrap());
        assert!(
            !s.revoke_agent(a.id, 300).await.unwrap(),
            "revoking twice is not an error"
        );
        s.set_status(a.id, AgentStatus::Online, 400).await.unwrap();
        let r = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!(
            (r.status, r.revoked_at_ms, r.online_total_ms),
            (AgentStatus::Revoked, Some(200), 100)
        );
        assert_eq!(s.revoked_agents().await.unwrap(), vec![a.id]);
        assert!(matches!(
            s.revoke_agent(Uuid::now_v7(), 1).await,
            Err(StoreError::NotFound(_))
        ));
    }

    pub async fn api_tokens_resolve_to_their_principal(_f: &Fixture, s: Arc<dyn Store>) {
        let p = Principal {
            account: "acme".into(),
            role: Role::Provider,
        };
        s.create_api_token("h1", &p, "ci", 0).await.unwrap();
        assert_eq!(s.api_principal("h1").await.unwrap(), Some(p));
        assert_eq!(s.api_principal("h2").await.unwrap(), None);
    }

    pub async fn last_seen_times_are_recorded_for_many_agents_at_once_and_never_go_back(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let mut ids = Vec::new();
        for i in 0..3 {
            token(&*s, &format!("t{i}"), i64::MAX).await;
            let a = new_agent(&format!("0{i}"));
            s.enroll_agent(&format!("t{i}"), 0, &a).await.unwrap();
            ids.push(a.id);
        }
        s.touch(&[(ids[0], 100), (ids[1], 200)]).await.unwrap();
        s.touch(&[(ids[0], 50), (ids[1], 300)]).await.unwrap();
        let seen = async |id| s.agent(id).await.unwrap().unwrap().last_seen_ms;
        assert_eq!(
            seen(ids[0]).await,
            Some(100),
            "an older time does not replace a newer one"
        );
        assert_eq!(seen(ids[1]).await, Some(300));
        assert_eq!(
            seen(ids[2]).await,
            None,
            "an agent not in the list is untouched"
        );
    }

    pub async fn inventory_history_records_changes_only(_f: &Fixture, s: Arc<dyn Store>) {
        token(&*s, "t", i64::MAX).await;
        let a = new_agent("01");
        s.enroll_agent("t", 0, &a).await.unwrap();
        let v1 = serde_json::json!({"cpu": {"logical_cpus": 2}});
        let v2 = serde_json::json!({"cpu": {"logical_cpus": 4}});
        assert!(s.save_inventory(a.id, &v1, "d1", 1).await.unwrap());
        assert!(!s.save_inventory(a.id, &v1, "d1", 2).await.unwrap());
        assert!(s.save_inventory(a.id, &v2, "d2", 3).await.unwrap());
        let history = s.inventory_history(a.id, 10).await.unwrap();
        assert_eq!(
            history
                .iter()
                .map(|h| h.digest.as_str())
                .collect::<Vec<_>>(),
            ["d2", "d1"]
        );
        let r = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!((r.inventory, r.inventory_updated_ms), (Some(v2), Some(3)));
        assert!(matches!(
            s.save_inventory(Uuid::now_v7(), &v1, "x", 1).await,
            Err(StoreError::NotFound(_))
        ));
    }

    pub async fn sessions_are_recorded_newest_first_and_a_crash_closes_them(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        token(&*s, "t", i64::MAX).await;
        let a = new_agent("01");
        s.enroll_agent("t", 0, &a).await.unwrap();
        let session = |id, started_at_ms| SessionRecord {
            id,
            agent_id: a.id,
            remote_addr: "127.0.0.1:1".into(),
            agent_version: "0.1.0".into(),
            started_at_ms,
            ended_at_ms: None,
            end_reason: None,
        };
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        s.session_started(&session(first, 10), None).await.unwrap();
        s.session_ended(first, 20, "closed by agent").await.unwrap();
        s.session_started(&session(second, 30), None).await.unwrap();
        s.close_dangling(40).await.unwrap();
        let got = s.sessions(a.id, 10).await.unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|r| (r.id, r.ended_at_ms, r.end_reason.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (second, Some(40), Some("controller stopped")),
                (first, Some(20), Some("closed by agent")),
            ]
        );
        assert_eq!(
            s.sessions(a.id, 1).await.unwrap().len(),
            1,
            "the limit holds"
        );
    }

    async fn enrolled(s: &dyn Store, serial: &str, labels: &[(&str, &str)]) -> Uuid {
        let hash = format!("tok-{serial}");
        s.create_join_token(&NewJoinToken {
            id: Uuid::now_v7(),
            secret_hash: hash.clone(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            created_at_ms: 0,
            expires_at_ms: i64::MAX,
            created_by: "test".into(),
        })
        .await
        .unwrap();
        let a = new_agent(serial);
        s.enroll_agent(&hash, 0, &a).await.unwrap();
        a.id
    }

    fn instance_row(
        agent_id: Uuid,
        id: &str,
        role: Role,
        client_token: Option<&str>,
    ) -> InstanceRow {
        use surplus_protocol::control::{Instance, InstanceState, RunSpec};
        InstanceRow {
            agent_id,
            account: "alice".into(),
            owner_role: role,
            client_token: client_token.map(str::to_owned),
            request_hash: "h".into(),
            record: Instance {
                id: id.into(),
                spec: RunSpec::default(),
                state: InstanceState::Pending,
                state_reason: None,
                driver: String::new(),
                native_id: None,
                launched_at_ms: 0,
                state_changed_at_ms: 0,
            },
            created_at_ms: 0,
            updated_at_ms: 0,
            started_at_ms: None,
            contradiction: None,
        }
    }

    pub async fn a_validation_run_ends_once_and_a_crash_fails_runs_left_running(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let agent = enrolled(&*s, "01", &[]).await;
        let run = |id| ValidationRun {
            id,
            agent_id: agent,
            requested_by: "admin".into(),
            requested_at_ms: 1,
            request: serde_json::json!({"bench": true}),
            status: RunStatus::Running,
            finished_at_ms: None,
            agent_version: None,
            bench: None,
            security: None,
            error: None,
        };
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        s.create_validation_run(&run(first)).await.unwrap();
        s.create_validation_run(&run(second)).await.unwrap();
        let done = ValidationRun {
            status: RunStatus::Succeeded,
            finished_at_ms: Some(5),
            bench: Some(serde_json::json!({"composite_score": 1.0})),
            ..run(first)
        };
        assert!(s.finish_validation_run(&done).await.unwrap());
        assert!(
            !s.finish_validation_run(&ValidationRun {
                status: RunStatus::Failed,
                ..done.clone()
            })
            .await
            .unwrap(),
            "a run ends once"
        );
        s.close_dangling(9).await.unwrap();
        let runs = s.validation_runs(agent, 10).await.unwrap();
        assert_eq!(runs.len(), 2);
        let by_id = |id| runs.iter().find(|r| r.id == id).unwrap();
        assert_eq!(by_id(first).status, RunStatus::Succeeded);
        assert_eq!(
            by_id(first).bench,
            Some(serde_json::json!({"composite_score": 1.0}))
        );
        assert_eq!(
            (by_id(second).status, by_id(second).finished_at_ms),
            (RunStatus::Failed, Some(9))
        );
        assert!(
            by_id(second)
                .error
                .as_deref()
                .unwrap()
                .contains("controller stopped")
        );
        assert_eq!(
            s.validation_run(first).await.unwrap().as_ref(),
            Some(by_id(first))
        );
    }

    pub async fn concurrent_writers_never_see_a_busy_database(_f: &Fixture, s: Arc<dyn Store>) {
        // Read-then-write transactions (inventory, revocation) racing plain writers
        // (last-seen batches) wait their turn; none fails (SQLITE_BUSY, a deadlock).
        let mut agents = Vec::new();
        for i in 0..8 {
            agents.push(enrolled(&*s, &format!("{i:02}"), &[]).await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in agents.iter().copied().enumerate() {
            let s = s.clone();
            let all = agents.clone();
            tasks.spawn(async move {
                for round in 0..25i64 {
                    let inventory = serde_json::json!({ "round": round });
                    s.save_inventory(id, &inventory, &format!("d{round}"), round)
                        .await?;
                    // Every task touches every agent: batches overlap.
                    let seen: Vec<_> = all.iter().map(|a| (*a, round)).collect();
                    s.touch(&seen).await?;
                }
                if i % 2 == 0 {
                    s.revoke_agent(id, 99).await?;
                }
                Ok::<_, StoreError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap().expect("no write is refused");
        }
        assert_eq!(s.revoked_agents().await.unwrap().len(), 4);
        assert_eq!(s.inventory_history(agents[1], 100).await.unwrap().len(), 25);
    }

    pub async fn a_reopened_database_keeps_everything(f: &Fixture, s: Arc<dyn Store>) {
        let a = new_agent("01");
        token(&*s, "t", i64::MAX).await;
        s.enroll_agent("t", 0, &a).await.unwrap();
        s.record_certificate(a.id, "02", 5, 10).await.unwrap();
        s.post(
            &surplus_controller::ledger::payment("p1", "topup", "alice", "EUR", 70),
            &[],
            1,
        )
        .await
        .unwrap();
        drop(s);
        let s = f.open().await;
        let r = s.agent(a.id).await.unwrap().unwrap();
        assert_eq!((r.cert_serial.as_str(), r.cert_not_after_ms), ("02", 10));
        assert_eq!(
            s.balances(Some("client:alice")).await.unwrap(),
            [("client:alice".to_owned(), "EUR".to_owned(), 70)]
        );
        assert!(matches!(
            s.record_certificate(Uuid::now_v7(), "03", 0, 0).await,
            Err(StoreError::NotFound(_))
        ));
    }

    /// A provider or pool owner token named like a client is another owner: it does not
    /// share the client's instances, volumes or client tokens.
    pub async fn instances_and_volumes_belong_to_a_role_and_an_account(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_protocol::control::{Volume, VolumeState};
        let agent = enrolled(&*s, "01", &[]).await;
        let owner = |role: Role| Principal {
            account: "alice".into(),
            role,
        };
        let row = |id: &str, role| instance_row(agent, id, role, Some("deploy-1"));
        let client = row("i-0000000000000001", Role::Client);
        assert_eq!(
            s.claim_instance(&client, None).await.unwrap(),
            Claim::Created
        );
        // The same account name and client token in the admin role: another owner.
        let admin = row("i-0000000000000002", Role::Admin);
        assert_eq!(
            s.claim_instance(&admin, None).await.unwrap(),
            Claim::Created
        );
        match s
            .claim_instance(&row("i-0000000000000003", Role::Client), None)
            .await
            .unwrap()
        {
            Claim::Existing(existing) => assert_eq!(*existing, client),
            other => panic!("{other:?}"),
        }
        let ids = |rows: Vec<InstanceRow>| -> Vec<String> {
            rows.into_iter().map(|r| r.record.id).collect()
        };
        assert_eq!(
            ids(s.instances(Some(&owner(Role::Client))).await.unwrap()),
            ["i-0000000000000001"]
        );
        assert!(
            s.instances(Some(&owner(Role::Provider)))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.instances(None).await.unwrap().len(), 2);
        assert_eq!(
            s.instance("i-0000000000000002")
                .await
                .unwrap()
                .unwrap()
                .owner(),
            owner(Role::Admin)
        );
        assert_eq!(
            s.instance_by_token(&owner(Role::Client), "deploy-1")
                .await
                .unwrap()
                .map(|r| r.record.id),
            Some("i-0000000000000001".to_owned())
        );
        assert_eq!(ids(s.agent_instances(agent).await.unwrap()).len(), 2);

        let volume = VolumeRow {
            agent_id: agent,
            account: "alice".into(),
            owner_role: Role::Client,
            record: Volume {
                id: "vol-0000000000000001".into(),
                name: None,
                size_bytes: 1,
                used_bytes: None,
                state: VolumeState::Available,
                attached_to: None,
                native_id: None,
                created_at_ms: 0,
            },
            updated_at_ms: 0,
        };
        s.put_volume(&volume).await.unwrap();
        // Put again: the record is replaced, not duplicated.
        let mut used = volume.clone();
        used.record.used_bytes = Some(1);
        used.updated_at_ms = 5;
        s.put_volume(&used).await.unwrap();
        assert_eq!(
            s.volumes(Some(&owner(Role::Client))).await.unwrap(),
            [used.clone()]
        );
        assert!(
            s.volumes(Some(&owner(Role::PoolOwner)))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.volume("vol-0000000000000001")
                .await
                .unwrap()
                .unwrap()
                .owner(),
            owner(Role::Client)
        );
    }

    pub async fn racing_claims_with_one_client_token_create_one_instance_with_its_rate_card(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_controller::billing::PricePlan;
        let agent = enrolled(&*s, "01", &[("provider", "acme")]).await;
        let plan = PricePlan {
            currency: "EUR".into(),
            per_instance_hour: 100,
            per_vcpu_hour: 0,
            per_gb_hour: 0,
            per_gb_network: 0,
            per_gb_disk_io: 0,
            upfront: 5,
        };
        let attempts = (0..16).map(|i| {
            let s = s.clone();
            let plan = plan.clone();
            let row = instance_row(
                agent,
                &format!("i-{i:016x}"),
                Role::Client,
                Some("retry-me"),
            );
            tokio::spawn(async move { s.claim_instance(&row, Some(&plan)).await.unwrap() })
        });
        let mut created = 0;
        for a in attempts {
            match a.await.unwrap() {
                Claim::Created => created += 1,
                Claim::Existing(row) => assert_eq!(row.client_token.as_deref(), Some("retry-me")),
            }
        }
        assert_eq!(created, 1, "exactly one claim creates the instance");
        assert_eq!(s.instances(None).await.unwrap().len(), 1);
        // Without a client token every claim is its own instance; without a plan it is
        // not billed.
        let free = instance_row(agent, "i-00000000000000aa", Role::Client, None);
        assert_eq!(s.claim_instance(&free, None).await.unwrap(), Claim::Created);
        let billables = s.billables(1).await.unwrap();
        assert_eq!(billables.len(), 1, "only the instance with a rate card");
        let b = &billables[0];
        assert_eq!(
            (&b.plan, b.provider.as_str(), b.attached_at_ms),
            (&plan, "acme", 0)
        );
        assert!(
            s.billables(0).await.unwrap().is_empty(),
            "attached before the period's end"
        );
        // A host without a provider label sells for the house.
        let house = enrolled(&*s, "02", &[]).await;
        let row = instance_row(house, "i-00000000000000bb", Role::Client, None);
        s.claim_instance(&row, Some(&plan)).await.unwrap();
        let providers: Vec<String> = s
            .billables(1)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.provider)
            .collect();
        assert_eq!(providers, ["acme", "house"]);
    }

    pub async fn instance_records_keep_when_they_started_and_every_change_of_limits(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_protocol::control::{InstanceState, Limits};
        let agent = enrolled(&*s, "01", &[]).await;
        let mut row = instance_row(agent, "i-0000000000000001", Role::Client, None);
        row.record.spec.limits.millicpus = Some(500);
        s.claim_instance(&row, None).await.unwrap();
        let mut record = row.record.clone();
        record.state = InstanceState::Running;
        s.update_instances(std::slice::from_ref(&record), 10)
            .await
            .unwrap();
        record.state = InstanceState::Stopped;
        s.update_instances(std::slice::from_ref(&record), 20)
            .await
            .unwrap();
        record.state = InstanceState::Running;
        // Unknown ids are ignored.
        let mut stranger = record.clone();
        stranger.id = "i-00000000000000ff".into();
        s.update_instances(&[record.clone(), stranger], 30)
            .await
            .unwrap();
        let stored = s.instance(&record.id).await.unwrap().unwrap();
        assert_eq!(
            (
                stored.record.state,
                stored.started_at_ms,
                stored.updated_at_ms
            ),
            (InstanceState::Running, Some(10), 30),
            "started when first seen running"
        );
        assert!(s.instance("i-00000000000000ff").await.unwrap().is_none());
        let bigger = Limits {
            millicpus: Some(2000),
            ..Limits::default()
        };
        s.record_limits(&record.id, 40, &bigger).await.unwrap();
        s.record_limits(&record.id, 40, &bigger).await.unwrap();
        let history = s.limits_history(&record.id).await.unwrap();
        let cpus: Vec<_> = history.iter().map(|(at, l)| (*at, l.millicpus)).collect();
        assert_eq!(cpus, [(0, Some(500)), (40, Some(2000))]);
        s.set_contradiction(&record.id, Some("host says 4 vCPU"), 50)
            .await
            .unwrap();
        assert_eq!(
            s.instance(&record.id)
                .await
                .unwrap()
                .unwrap()
                .contradiction
                .as_deref(),
            Some("host says 4 vCPU")
        );
        s.set_contradiction(&record.id, None, 60).await.unwrap();
        assert_eq!(
            s.instance(&record.id).await.unwrap().unwrap().contradiction,
            None
        );
    }

    fn counter(
        epoch: u64,
        seq: u64,
        subject: &str,
        meter: &str,
        generation: u64,
        total: u64,
        end_ms: i64,
    ) -> UsageRecord {
        UsageRecord {
            epoch,
            seq,
            subject: if subject == "host" {
                Subject::Host
            } else {
                Subject::Instance(subject.into())
            },
            meter: meter.into(),
            start_ms: end_ms - 1_000,
            end_ms,
            reading: Reading::Counter { generation, total },
            samples: 1,
        }
    }

    pub async fn usage_is_counted_once_and_an_agent_speaks_only_for_what_it_hosts(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let a = enrolled(&*s, "01", &[]).await;
        let b = enrolled(&*s, "02", &[]).await;
        let mine = "i-0000000000000001";
        let theirs = "i-0000000000000002";
        s.claim_instance(&instance_row(a, mine, Role::Client, None), None)
            .await
            .unwrap();
        s.claim_instance(&instance_row(b, theirs, Role::Client, None), None)
            .await
            .unwrap();
        let spool = SpoolState {
            pending_records: 3,
            bytes: 300,
            merged_records: 0,
            discarded_records: 0,
        };
        let now = 1_000_000;
        let first = [
            counter(1, 1, mine, "cpu_us", 0, 100, 10_000),
            counter(1, 2, "host", "cpu_us", 0, 1_000, 10_000),
            counter(1, 3, theirs, "cpu_us", 0, 50, 10_000),
            counter(1, 4, "i-00000000000000ff", "cpu_us", 0, 50, 10_000),
            counter(1, 5, mine, "cpu_us", 0, 250, 20_000),
        ];
        let out = s.ingest_usage(a, &first, &spool, now).await.unwrap();
        assert_eq!((out.stored, out.duplicates), (3, 0));
        let reasons: Vec<_> = out
            .rejected
            .iter()
            .map(|(_, seq, why)| (*seq, why.clone()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(
            reasons[0].1.contains("not hosted by this agent"),
            "{reasons:?}"
        );
        assert!(
            reasons[1].1.contains("unknown to the controller"),
            "{reasons:?}"
        );

        // The whole batch again (the ack was lost), in one group commit with another
        // agent's batch: nothing counts twice, a refusal is not reported twice.
        let theirs_batch = [counter(7, 1, theirs, "cpu_us", 0, 80, 10_000)];
        let outs = s
            .ingest_usage_batches(
                &[
                    IngestBatch {
                        agent_id: a,
                        records: &first,
                        spool: &spool,
                    },
                    IngestBatch {
                        agent_id: b,
                        records: &theirs_batch,
                        spool: &spool,
                    },
                ],
                now,
            )
            .await
            .unwrap();
        assert_eq!(
            (outs[0].stored, outs[0].duplicates, outs[0].rejected.len()),
            (0, 5, 0)
        );
        assert_eq!((outs[1].stored, outs[1].duplicates), (1, 0));

        // A restarted counter (new generation) counts from zero; a new boot epoch has
        // its own sequence numbers.
        let after_reset = [counter(2, 1, mine, "cpu_us", 1, 30, 30_000)];
        assert_eq!(
            s.ingest_usage(a, &after_reset, &spool, now)
                .await
                .unwrap()
                .stored,
            1
        );
        let deltas: Vec<(i64, i64)> = s
            .counter_deltas(mine, &["cpu_us"], 0, 30_000)
            .await
            .unwrap()
            .iter()
            .map(|d| (d.end_ms, d.delta))
            .collect();
        assert_eq!(deltas, [(10_000, 100), (20_000, 150), (30_000, 30)]);
        assert!(
            s.counter_deltas(mine, &["mem"], 0, 30_000)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.counter_deltas(theirs, &["cpu_us"], 0, 30_000)
                .await
                .unwrap()
                .len(),
            1,
            "only its host's record counts for it"
        );
        assert_eq!(s.usage_through(a).await.unwrap(), Some(30_000));
        assert_eq!(s.usage_through(Uuid::now_v7()).await.unwrap(), None);
        let (_, stored_spool) = s.metering(a).await.unwrap();
        assert_eq!(stored_spool, Some(spool));
        // What arrived after a time, by subject and end.
        let late = s.received_since(now - 1, 20_000).await.unwrap();
        let mut late: Vec<(String, i64)> = late.into_iter().map(|(s, end, _)| (s, end)).collect();
        late.sort();
        assert_eq!(
            late,
            [
                ("host".to_owned(), 10_000),
                (mine.to_owned(), 10_000),
                (mine.to_owned(), 20_000),
                (theirs.to_owned(), 10_000)
            ]
        );
        assert!(s.received_since(now, 20_000).await.unwrap().is_empty());
    }

    pub async fn usage_history_sums_counters_and_weighs_gauges_by_time(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        let a = enrolled(&*s, "01", &[]).await;
        let i = "i-0000000000000001";
        s.claim_instance(&instance_row(a, i, Role::Client, None), None)
            .await
            .unwrap();
        let gauge = |seq, start_ms, end_ms, mean, peak| UsageRecord {
            epoch: 1,
            seq,
            subject: Subject::Instance(i.into()),
            meter: "mem_bytes".into(),
            start_ms,
            end_ms,
            reading: Reading::Gauge {
                last: mean,
                peak,
                mean,
            },
            samples: 1,
        };
        let records = [
            counter(1, 1, i, "cpu_us", 0, 100, 1_000),
            counter(1, 2, i, "cpu_us", 0, 400, 2_000),
            counter(1, 3, i, "cpu_us", 0, 1_000, 4_000),
            gauge(4, 0, 1_000, 10, 20),
            gauge(5, 1_000, 4_000, 30, 90),
        ];
        let spool = SpoolState::default();
        s.ingest_usage(a, &records, &spool, 10_000).await.unwrap();
        let q = UsageQuery {
            subject: Some(i.into()),
            from_ms: 0,
            to_ms: 4_000,
            bucket_ms: 2_000,
            ..UsageQuery::default()
        };
        let rows: Vec<_> = s
            .usage(&q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                (
                    r.bucket_start_ms,
                    r.meter,
                    r.total,
                    r.peak,
                    r.mean,
                    r.records,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (0, "cpu_us".to_owned(), Some(400), None, None, 2),
                (0, "mem_bytes".to_owned(), None, Some(20), Some(10), 1),
                (2_000, "cpu_us".to_owned(), Some(600), None, None, 1),
                (2_000, "mem_bytes".to_owned(), None, Some(90), Some(30), 1),
            ]
        );
        // One bucket: the mean weighs each record by its length ((10*1000 + 30*3000) / 4000).
        let whole = UsageQuery {
            bucket_ms: 4_000,
            meter: Some("mem_bytes".into()),
            ..q.clone()
        };
        let means: Vec<_> = s
            .usage(&whole)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.mean)
            .collect();
        assert_eq!(means, [Some(25)]);
        let by_account = UsageQuery {
            subject: None,
            account: Some("alice".into()),
            owner_role: Some(Role::Client),
            ..q.clone()
        };
        assert_eq!(s.usage(&by_account).await.unwrap().len(), 4);
        let other = UsageQuery {
            subject: None,
            account: Some("bob".into()),
            ..q
        };
        assert!(s.usage(&other).await.unwrap().is_empty());
    }

    pub async fn a_ledger_key_is_applied_once_and_protected_accounts_never_go_below_zero(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_controller::ledger::{Applied, LedgerError, payment, payout};
        let topup = payment("pay-1", "topup", "alice", "EUR", 1_000);
        assert_eq!(s.post(&topup, &[], 10).await.unwrap(), Applied::Posted);
        assert_eq!(s.post(&topup, &[], 11).await.unwrap(), Applied::Duplicate);
        let conflicting = payment("pay-1", "topup", "alice", "EUR", 999);
        assert!(matches!(
            s.post(&conflicting, &[], 12).await,
            Err(PostError::Ledger(LedgerError::KeyReused(k))) if k == "pay-1"
        ));
        // A provider may not pay out more than it earned.
        match s.post(&payout("out-1", "acme", "EUR", 1), &[], 13).await {
            Err(PostError::Ledger(LedgerError::Insufficient {
                account,
                balance,
                needed,
                ..
            })) => {
                assert_eq!((account.as_str(), balance, needed), ("provider:acme", 0, 1))
            }
            other => panic!("{other:?}"),
        }
        // A client is postpaid (may go below zero) until it is made prepaid.
        let bill = surplus_controller::billing::bill_posting(
            "bill-1", "alice", "acme", "EUR", 1_500, 1_000,
        );
        assert_eq!(s.post(&bill, &[], 14).await.unwrap(), Applied::Posted);
        assert_eq!(s.account_policy("client:alice").await.unwrap(), None);
        s.set_account_policy("client:alice", false, 15)
            .await
            .unwrap();
        assert_eq!(s.account_policy("client:alice").await.unwrap(), Some(false));
        let again =
            surplus_controller::billing::bill_posting("bill-2", "alice", "acme", "EUR", 1, 1_000);
        assert!(matches!(
            s.post(&again, &[], 16).await,
            Err(PostError::Ledger(LedgerError::Insufficient { .. }))
        ));
        let balances = s.balances(None).await.unwrap();
        let total: i64 = balances.iter().map(|(_, _, b)| b).sum();
        assert_eq!(total, 0, "the books balance: {balances:?}");
        let get = |acc: &str| {
            balances
                .iter()
                .find(|(a, _, _)| a == acc)
                .map(|(_, _, b)| *b)
        };
        assert_eq!(get("client:alice"), Some(-500));
        assert_eq!(get("provider:acme"), Some(1_350));
        let entries: Vec<_> = s
            .account_entries("client:alice", 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.amount, e.posted_at_ms))
            .collect();
        assert_eq!(
            entries,
            [
                ("pay-1".to_owned(), 1_000, 10),
                ("bill-1".to_owned(), -1_500, 14)
            ]
        );
        assert!(
            s.account_entries("client:alice", 15, 100)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn billing_runs_repeat_their_own_period_and_refuse_an_overlap(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        const H: i64 = 3_600_000;
        assert!(s.record_billing_run(0, H, 5 * H).await.unwrap());
        assert!(
            s.record_billing_run(0, H, 6 * H).await.unwrap(),
            "the same period again"
        );
        assert!(
            !s.record_billing_run(0, 2 * H, 6 * H).await.unwrap(),
            "overlaps [0, 1h)"
        );
        assert!(!s.record_billing_run(H / 2, H + H / 2, 6 * H).await.unwrap());
        assert!(
            s.record_billing_run(H, 2 * H, 7 * H).await.unwrap(),
            "adjacent"
        );
        let periods = s.billed_periods(0, (H, 2 * H)).await.unwrap();
        assert_eq!(
            periods
                .iter()
                .map(|p| (p.from_ms, p.to_ms, p.checked_at_ms))
                .collect::<Vec<_>>(),
            [(0, H, 6 * H)],
            "rated again by the repeat; the excepted period left out"
        );
        s.mark_checked(0, H, 9 * H).await.unwrap();
        assert_eq!(
            s.billed_periods(0, (H, 2 * H)).await.unwrap()[0].checked_at_ms,
            9 * H
        );
        assert!(
            s.billed_periods(H, (H, 2 * H)).await.unwrap().is_empty(),
            "ended before since"
        );
        // Racing runs of one new period: each is recorded or refused, none fails.
        let racers = (0..8).map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.record_billing_run(3 * H + i * H / 8, 4 * H + i * H / 8, 9 * H)
                    .await
            })
        });
        let mut recorded = 0;
        for r in racers {
            recorded += usize::from(r.await.unwrap().unwrap());
        }
        assert!(recorded >= 1);
        let stored = s.billed_periods(2 * H, (0, 0)).await.unwrap();
        assert_eq!(
            stored.len(),
            recorded,
            "each recorded period is stored: {stored:?}"
        );
        for pair in stored.windows(2) {
            assert!(
                pair[0].to_ms <= pair[1].from_ms,
                "no two stored periods overlap: {stored:?}"
            );
        }
    }

    pub async fn invoice_lines_sum_per_meter_and_filter_by_party(_f: &Fixture, s: Arc<dyn Store>) {
        use surplus_controller::billing::{Charge, bill_posting};
        let line =
            |key: &str, client: &str, meter: &str, quantity: f64, amount: i64, kind: &str| {
                InvoiceLine {
                    invoice_id: format!("inv-{client}"),
                    client: client.into(),
                    provider: "acme".into(),
                    from_ms: 0,
                    to_ms: 3_600_000,
                    instance_id: "i-0000000000000001".into(),
                    charge: Charge {
                        meter: meter.into(),
                        quantity,
                        unit: "h".into(),
                        rate: 10,
                        amount,
                    },
                    commission: amount / 10,
                    currency: "EUR".into(),
                    posting_key: key.into(),
                    kind: kind.into(),
                }
            };
        let charge = [
            line("k1", "alice", "instance_hours", 1.5, 15, "charge"),
            line("k1", "alice", "vcpu_hours", 0.25, 3, "charge"),
        ];
        s.post(
            &bill_posting("k1", "alice", "acme", "EUR", 18, 1_000),
            &charge,
            1,
        )
        .await
        .unwrap();
        let adjustment = [line("k2", "alice", "instance_hours", 0.5, 5, "adjustment")];
        s.post(
            &bill_posting("k2", "alice", "acme", "EUR", 5, 1_000),
            &adjustment,
            2,
        )
        .await
        .unwrap();
        // A duplicate posting stores no second set of lines.
        s.post(
            &bill_posting("k1", "alice", "acme", "EUR", 18, 1_000),
            &charge,
            3,
        )
        .await
        .unwrap();
        let billed = s.billed("i-0000000000000001", 0, 3_600_000).await.unwrap();
        assert_eq!(billed.get("instance_hours"), Some(&(20, 2.0)));
        assert_eq!(billed.get("vcpu_hours"), Some(&(3, 0.25)));
        let lines = s
            .invoice_lines(Some("inv-alice"), None, None, 0, 3_600_000)
            .await
            .unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], charge[0]);
        assert_eq!(
            s.invoice_lines(None, Some("bob"), None, 0, 3_600_000)
                .await
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            s.invoice_lines(None, None, Some("acme"), 0, 1)
                .await
                .unwrap()
                .len(),
            3
        );
        assert!(
            s.invoice_lines(None, None, None, 3_600_000, 7_200_000)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn metering_settings_and_compatibility_reports_are_kept_per_agent(
        _f: &Fixture,
        s: Arc<dyn Store>,
    ) {
        use surplus_protocol::usage::MeteringPeriods;
        let a = enrolled(&*s, "01", &[]).await;
        assert_eq!(s.metering(a).await.unwrap(), (None, None));
        let periods = MeteringPeriods {
            instance_ms: 60_000,
            host_ms: 300_000,
            subscription_ms: 3_600_000,
        };
        s.set_metering(a, &periods, 1).await.unwrap();
        let spool = SpoolState {
            pending_records: 1,
            ..SpoolState::default()
        };
        s.ingest_usage(a, &[], &spool, 2).await.unwrap();
        assert_eq!(
            s.metering(a).await.unwrap(),
            (Some(periods), Some(spool.clone())),
            "a batch keeps the periods"
        );
        let shorter = MeteringPeriods {
            instance_ms: 10_000,
            ..periods
        };
        s.set_metering(a, &shorter, 3).await.unwrap();
        assert_eq!(
            s.metering(a).await.unwrap(),
            (Some(shorter), Some(spool)),
            "new periods keep the spool"
        );

        assert_eq!(s.compat_report(a).await.unwrap(), None);
        let report = surplus_protocol::control::CompatReport {
            driver: "process".into(),
            level: surplus_protocol::control::CompatLevel::Highly,
            checks: Vec::new(),
            isolation: surplus_protocol::control::Isolation {
                driver: "process".into(),
                ..Default::default()
            },
            ran_at_ms: 5,
        };
        s.save_compat_report(a, &report, 6).await.unwrap();
        s.save_compat_report(a, &report, 7).await.unwrap();
        assert_eq!(s.compat_report(a).await.unwrap(), Some((report, 7)));

        let plan = surplus_controller::billing::PricePlan {
            currency: "EUR".into(),
            per_instance_hour: 1,
            per_vcpu_hour: 0,
            per_gb_hour: 0,
            per_gb_network: 0,
            per_gb_disk_io: 0,
            upfront: 0,
        };
        assert_eq!(s.agent_price_plan(a).await.unwrap(), None);
        s.set_agent_price_plan(a, &plan, 1).await.unwrap();
        let dearer = surplus_controller::billing::PricePlan {
            per_instance_hour: 2,
            ..plan
        };
        s.set_agent_price_plan(a, &dearer, 2).await.unwrap();
        assert_eq!(s.agent_price_plan(a).await.unwrap(), Some(dearer));
    }

    pub async fn a_change_set_applies_whole_or_not_at_all(_f: &Fixture, s: Arc<dyn Store>) {
        use surplus_controller::billing::bill_posting;
        use surplus_controller::ledger::{Applied, LedgerError, payment, payout};
        let notice = |key: &str| Notice {
            key: key.into(),
            recipient: "provider:acme".into(),
            kind: "sale".into(),
            body: serde_json::json!({"amount": 900}),
        };
        // A later posting of a set sees what the earlier ones did: the provider is paid
        // out what the bill just credited it.
        let sale = ChangeSet {
            postings: vec![
                (
                    payment("s1-pay", "topup", "alice", "EUR", 1_000),
                    Vec::new(),
                ),
                (
                    bill_posting("s1-bill", "alice", "acme", "EUR", 1_000, 1_000),
                    Vec::new(),
                ),
                (payout("s1-out", "acme", "EUR", 900), Vec::new()),
            ],
            notices: vec![notice("s1")],
            ..ChangeSet::default()
        };
        assert_eq!(
            s.apply_changes(&sale, 10).await.unwrap(),
            [Applied::Posted, Applied::Posted, Applied::Posted]
        );
        // Again: every posting a duplicate, the notice queued once.
        assert_eq!(
            s.apply_changes(&sale, 11).await.unwrap(),
            [Applied::Duplicate, Applied::Duplicate, Applied::Duplicate]
        );
        let queued = s.notices("provider:acme", 10).await.unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(
            (
                &queued[0].notice,
                queued[0].created_at_ms,
                queued[0].delivered_at_ms
            ),
            (&notice("s1"), 10, None)
        );

        // The second posting overdraws the provider: nothing of the set is stored.
        let before = s.balances(None).await.unwrap();
        let overdrawn = ChangeSet {
            postings: vec![
                (payment("s2-pay", "topup", "alice", "EUR", 50), Vec::new()),
                (payout("s2-out", "acme", "EUR", 101), Vec::new()),
            ],
            notices: vec![notice("s2")],
            ..ChangeSet::default()
        };
        match s.apply_changes(&overdrawn, 12).await {
            Err(PostError::Ledger(LedgerError::Insufficient {
                account, balance, ..
            })) => {
                assert_eq!((account.as_str(), balance), ("provider:acme", 0))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.balances(None).await.unwrap(), before, "no balance moved");
        assert_eq!(
            s.notices("provider:acme", 10).await.unwrap().len(),
            1,
            "no notice queued"
        );
        assert_eq!(
            s.post(&payment("s2-pay", "topup", "alice", "EUR", 50), &[], 13)
                .await
                .unwrap(),
            Applied::Posted,
            "the refused set's first posting was never stored"
        );
        assert!(s.notices("client:alice", 10).await.unwrap().is_empty());
    }
}

/// The ledger's property ("the books always balance") through each backend's posting
/// path: random payments, bills with commission, payouts, transfers, prepaid switches,
/// replays and conflicting reuses of a key are posted to the store and to the
/// in-memory reference [`Ledger`]; after every step both answer alike and hold the
/// same balances, and every currency sums to zero.
mod ledger_property {
    use super::*;
    use proptest::prelude::*;
    use surplus_controller::billing::bill_posting;
    use surplus_controller::ledger::{
        Entry, Ledger, LedgerError, Posting, client, payment, payout, provider,
    };

    #[derive(Debug, Clone)]
    enum Op {
        Pay(u8, i64),
        Bill(u8, u8, i64, u32),
        Payout(u8, i64),
        Transfer(u8, u8, i64),
        Prepaid(u8),
        Replay(usize),
        Conflict(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, 1i64..10_000).prop_map(|(c, a)| Op::Pay(c, a)),
            (0u8..3, 0u8..2, 1i64..10_000, 0u32..3000)
                .prop_map(|(c, p, a, bps)| Op::Bill(c, p, a, bps)),
            (0u8..2, 1i64..10_000).prop_map(|(p, a)| Op::Payout(p, a)),
            (0u8..2, 0u8..2, -10_000i64..10_000).prop_map(|(a, b, x)| Op::Transfer(a, b, x)),
            (0u8..3).prop_map(Op::Prepaid),
            any::<usize>().prop_map(Op::Replay),
            any::<usize>().prop_map(Op::Conflict),
        ]
    }

    fn posting_of(op: &Op, i: usize, history: &[Posting]) -> Option<Posting> {
        let cur = if i % 3 == 0 { "USD" } else { "EUR" };
        Some(match *op {
            Op::Pay(c, a) => payment(&format!("pay-{i}"), "topup", &format!("c{c}"), cur, a),
            Op::Bill(c, p, a, bps) => bill_posting(
                &format!("bill-{i}"),
                &format!("c{c}"),
                &format!("p{p}"),
                cur,
                a,
                bps,
            ),
            Op::Payout(p, a) => payout(&format!("out-{i}"), &format!("p{p}"), cur, a),
            Op::Transfer(a, b, x) => Posting {
                key: format!("tr-{i}"),
                kind: "transfer".into(),
                memo: String::new(),
                entries: vec![
                    Entry {
                        account: provider(&format!("p{a}")),
                        currency: cur.into(),
                        amount: -x,
                    },
                    Entry {
                        account: provider(&format!("p{b}")),
                        currency: cur.into(),
                        amount: x,
                    },
                ],
            },
            Op::Replay(k) if !history.is_empty() => history[k % history.len()].clone(),
            Op::Conflict(k) if !history.is_empty() => {
                let mut p = history[k % history.len()].clone();
                p.memo.push_str(" (again, changed)");
                p
            }
            Op::Prepaid(_) | Op::Replay(_) | Op::Conflict(_) => return None,
        })
    }

    fn run(backend: Backend, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let f = Fixture::new(backend).await;
            let s = f.open().await;
            let mut model = Ledger::default();
            let mut history = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                let now = i as i64;
                if let Op::Prepaid(c) = op {
                    let account = client(&format!("c{c}"));
                    model.overrides.insert(account.clone(), false);
                    s.set_account_policy(&account, false, now).await.unwrap();
                    continue;
                }
                let Some(p) = posting_of(op, i, &history) else {
                    continue;
                };
                let expected = model.apply(&p);
                let got: Result<_, LedgerError> = match s.post(&p, &[], now).await {
                    Ok(applied) => Ok(applied),
                    Err(PostError::Ledger(e)) => Err(e),
                    Err(PostError::Store(e)) => panic!("step {i}: the store failed: {e}"),
                };
                prop_assert_eq!(&got, &expected, "step {}: {:?}", i, p);
                if expected.is_ok() && !history.contains(&p) {
                    history.push(p);
                }
                let stored: std::collections::BTreeMap<(String, String), i64> = s
                    .balances(None)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(a, c, b)| ((a, c), b))
                    .collect();
                prop_assert_eq!(&stored, &model.balances, "step {}: balances", i);
                let mut totals: std::collections::BTreeMap<&str, i128> = Default::default();
                for ((_, currency), b) in &stored {
                    *totals.entry(currency).or_default() += i128::from(*b);
                }
                prop_assert!(totals.values().all(|t| *t == 0), "step {}: {:?}", i, totals);
            }
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn the_books_always_balance_on_sqlite(ops in proptest::collection::vec(op(), 1..60)) {
            run(Backend::Sqlite, ops)?;
        }
    }

    proptest! {
        // Each case is a database of its own on the shared server.
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn the_books_always_balance_on_postgres(ops in proptest::collection::vec(op(), 1..60)) {
            run(Backend::Postgres, ops)?;
        }
    }
}
