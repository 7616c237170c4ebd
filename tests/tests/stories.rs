//! Story tests of the registry's storage contract, each told once and run against both
//! backends: SQLite and PostgreSQL (a throwaway server this test binary starts).

use std::sync::Arc;

use surplus_controller::store::postgres::PgStore;
use surplus_controller::store::sqlite::SqliteStore;
use surplus_controller::store::*;
use uuid::Uuid;

/// A fresh store of one backend; the directory (SQLite's file) lives as long as it.
enum Backend {
    Sqlite,
    Postgres,
}

async fn open(backend: Backend) -> (Option<tempfile::TempDir>, Arc<dyn RegistryStore>) {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(&dir.path().join("c.db")).await.unwrap();
            (Some(dir), Arc::new(store))
        }
        Backend::Postgres => {
            let url = surplus_tests::postgres::fresh_database().await;
            (None, Arc::new(PgStore::open(&url).await.unwrap()))
        }
    }
}

async fn token(store: &dyn RegistryStore, secret_hash: &str, expires_at_ms: i64) {
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

/// Runs one story on each backend: `story!(name, |s| body)`.
macro_rules! story {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let (_d, s) = open(Backend::Sqlite).await;
                super::stories::$name(s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let (_d, s) = open(Backend::Postgres).await;
                super::stories::$name(s).await;
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
story!(sessions_are_recorded_newest_first_and_a_crash_closes_them);

mod stories {
    use super::*;

    pub async fn a_token_registers_one_agent_and_says_why_it_refuses_others(
        s: Arc<dyn RegistryStore>,
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
        s: Arc<dyn RegistryStore>,
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

    pub async fn online_time_is_accounted_across_sessions_and_a_crash(s: Arc<dyn RegistryStore>) {
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

    pub async fn revocation_is_final_and_unknown_agents_are_named(s: Arc<dyn RegistryStore>) {
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

    pub async fn api_tokens_resolve_to_their_principal(s: Arc<dyn RegistryStore>) {
        let p = Principal {
            account: "acme".into(),
            role: Role::Provider,
        };
        s.create_api_token("h1", &p, "ci", 0).await.unwrap();
        assert_eq!(s.api_principal("h1").await.unwrap(), Some(p));
        assert_eq!(s.api_principal("h2").await.unwrap(), None);
    }

    pub async fn last_seen_times_are_recorded_for_many_agents_at_once_and_never_go_back(
        s: Arc<dyn RegistryStore>,
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

    pub async fn inventory_history_records_changes_only(s: Arc<dyn RegistryStore>) {
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
        s: Arc<dyn RegistryStore>,
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
}
