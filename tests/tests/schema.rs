//! The two backends hold the same schema: after every migration, SQLite's and
//! PostgreSQL's tables, their columns (with NOT NULL) and their unique constraints
//! (primary keys and unique indexes, partial or not) are the same. A migration added to
//! one side only, or a column spelt differently, fails here.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

/// Table → (columns with their NOT NULL, unique column sets with whether partial).
type Schema = BTreeMap<String, (BTreeSet<(String, bool)>, BTreeSet<(Vec<String>, bool)>)>;

async fn sqlite_schema(path: &std::path::Path) -> Schema {
    let store = surplus_controller::store::sqlite::SqliteStore::open(path)
        .await
        .expect("migrating SQLite");
    drop(store);
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_sqlx%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut schema = Schema::new();
    for table in tables {
        let mut columns = BTreeSet::new();
        for row in sqlx::query("SELECT name, \"notnull\", pk FROM pragma_table_info($1)")
            .bind(&table)
            .fetch_all(&pool)
            .await
            .unwrap()
        {
            let not_null: i64 = row.get("notnull");
            let pk: i64 = row.get("pk");
            // PostgreSQL makes primary key columns NOT NULL; SQLite only says so when
            // asked, so a key column counts as NOT NULL on both sides.
            columns.insert((row.get::<String, _>("name"), not_null != 0 || pk != 0));
        }
        let mut uniques = BTreeSet::new();
        for index in sqlx::query("SELECT name, \"unique\", partial FROM pragma_index_list($1)")
            .bind(&table)
            .fetch_all(&pool)
            .await
            .unwrap()
        {
            if index.get::<i64, _>("unique") == 0 {
                continue;
            }
            let name: String = index.get("name");
            let cols: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                    .bind(&name)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            uniques.insert((cols, index.get::<i64, _>("partial") != 0));
        }
        schema.insert(table, (columns, uniques));
    }
    schema
}

async fn postgres_schema(url: &str) -> Schema {
    surplus_controller::store::postgres::migrate(url)
        .await
        .expect("migrating PostgreSQL");
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let mut schema = Schema::new();
    for row in sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c, is_nullable = 'NO' AS not_null FROM information_schema.columns WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    {
        schema
            .entry(row.get("t"))
            .or_default()
            .0
            .insert((row.get("c"), row.get("not_null")));
    }
    for row in sqlx::query(
        "SELECT t.relname::text AS t, i.indpred IS NOT NULL AS partial,
                array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      ORDER BY k.n) AS cols
         FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
         JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = 'public' AND i.indisunique AND t.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    {
        schema
            .entry(row.get("t"))
            .or_default()
            .1
            .insert((row.get("cols"), row.get("partial")));
    }
    schema
}

#[tokio::test]
async fn both_backends_hold_the_same_tables_columns_and_unique_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = sqlite_schema(&dir.path().join("c.db")).await;
    let postgres = postgres_schema(&surplus_tests::postgres::fresh_database().await).await;
    assert!(
        sqlite.contains_key("ledger_postings") && sqlite.len() > 15,
        "{sqlite:#?}"
    );
    let tables = |s: &Schema| s.keys().cloned().collect::<Vec<_>>();
    assert_eq!(tables(&sqlite), tables(&postgres), "tables differ");
    for (table, sq) in &sqlite {
        assert_eq!(sq.0, postgres[table].0, "columns of {table} differ");
        assert_eq!(
            sq.1, postgres[table].1,
            "unique constraints of {table} differ"
        );
    }
}

#[tokio::test]
async fn a_schema_from_a_newer_controller_is_named() {
    let url = surplus_tests::postgres::fresh_database().await;
    surplus_controller::store::postgres::migrate(&url)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99990101, 'from the future', true, '\\x00', 0)")
        .execute(&pool)
        .await
        .unwrap();
    let err = surplus_controller::store::postgres::migrate(&url)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("written by a newer version"), "{err}");
    // Applying the same migrations again is a no-op, not an error.
    let fresh = surplus_tests::postgres::fresh_database().await;
    surplus_controller::store::postgres::migrate(&fresh)
        .await
        .unwrap();
    surplus_controller::store::postgres::migrate(&fresh)
        .await
        .unwrap();
}
