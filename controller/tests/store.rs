//! Story tests of the storage contract on SQLite, for the capabilities PostgreSQL does
//! not implement yet; the registry's stories run on both backends in
//! `tests/tests/stories.rs`. Each test tells one story a user relies on.

use std::sync::Arc;

use surplus_controller::store::sqlite::SqliteStore;
use surplus_controller::store::*;
use uuid::Uuid;

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("c.db")).await.unwrap();
    (dir, Arc::new(store))
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

#[tokio::test]
async fn a_validation_run_ends_once_and_a_crash_fails_runs_left_running() {
    let (_d, s) = store().await;
    token(&*s, "t", i64::MAX).await;
    let a = new_agent("01");
    s.enroll_agent("t", 0, &a).await.unwrap();
    let run = |id| ValidationRun {
        id,
        agent_id: a.id,
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
    let runs = s.validation_runs(a.id, 10).await.unwrap();
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_see_a_busy_database() {
    // Read-then-write transactions (inventory, revocation) racing plain writers
    // (last-seen batches) must wait their turn, not fail with SQLITE_BUSY.
    let (_d, s) = store().await;
    token(&*s, "t", i64::MAX).await;
    let mut agents = Vec::new();
    for i in 0..8 {
        token(&*s, &format!("t{i}"), i64::MAX).await;
        let a = new_agent(&format!("{i:02}"));
        s.enroll_agent(&format!("t{i}"), 0, &a).await.unwrap();
        agents.push(a.id);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in agents.iter().copied().enumerate() {
        let s = s.clone();
        tasks.spawn(async move {
            for round in 0..25i64 {
                let inventory = serde_json::json!({ "round": round });
                s.save_inventory(id, &inventory, &format!("d{round}"), round)
                    .await?;
                s.touch(&[(id, round)]).await?;
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

#[tokio::test]
async fn a_reopened_database_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let a = new_agent("01");
    {
        let s = SqliteStore::open(&path).await.unwrap();
        token(&s, "t", i64::MAX).await;
        s.enroll_agent("t", 0, &a).await.unwrap();
        s.record_certificate(a.id, "02", 5, 10).await.unwrap();
    }
    let s = SqliteStore::open(&path).await.unwrap();
    let r = s.agent(a.id).await.unwrap().unwrap();
    assert_eq!((r.cert_serial.as_str(), r.cert_not_after_ms), ("02", 10));
    assert!(matches!(
        s.record_certificate(Uuid::now_v7(), "03", 0, 0).await,
        Err(StoreError::NotFound(_))
    ));
}

/// A provider or pool owner token named like a client is another owner: it does not
/// share the client's instances, volumes or client tokens.
#[tokio::test]
async fn instances_and_volumes_belong_to_a_role_and_an_account() {
    use surplus_protocol::control::{Instance, InstanceState, RunSpec, Volume, VolumeState};
    let (_d, s) = store().await;
    token(&*s, "t", i64::MAX).await;
    let a = new_agent("01");
    s.enroll_agent("t", 0, &a).await.unwrap();
    let owner = |role: Role| Principal {
        account: "alice".into(),
        role,
    };
    let row = |id: &str, role: Role| InstanceRow {
        agent_id: a.id,
        account: "alice".into(),
        owner_role: role,
        client_token: Some("deploy-1".into()),
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
    };
    let client = row("i-0000000000000001", Role::Client);
    assert_eq!(s.claim_instance(&client).await.unwrap(), Claim::Created);
    // The same account name and client token in the admin role: another owner.
    let admin = row("i-0000000000000002", Role::Admin);
    assert_eq!(s.claim_instance(&admin).await.unwrap(), Claim::Created);
    match s
        .claim_instance(&row("i-0000000000000003", Role::Client))
        .await
        .unwrap()
    {
        Claim::Existing(existing) => assert_eq!(*existing, client),
        other => panic!("{other:?}"),
    }
    let ids =
        |rows: Vec<InstanceRow>| -> Vec<String> { rows.into_iter().map(|r| r.record.id).collect() };
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

    s.put_volume(&VolumeRow {
        agent_id: a.id,
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
    })
    .await
    .unwrap();
    assert_eq!(
        s.volumes(Some(&owner(Role::Client))).await.unwrap().len(),
        1
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
