//! PostgreSQL: the schema, kept table for table and column for column the same as
//! SQLite's (`migrations/postgres` pairs with `migrations/sqlite`; a test compares the
//! two applied schemas).
//!
//! The store implementations over it are not written yet (see the issue 13 note in
//! `docs/ARCHITECTURE.md`); what is here is what both the schema test and an operator
//! preparing a server need: applying the migrations, with clear errors.

use sqlx::Connection;

use super::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Applies the PostgreSQL migrations to the database at `url`.
///
/// A URL that is not `postgres://`, a server that cannot be reached and a schema
/// written by a newer controller (a migration this binary does not know) are errors
/// that name the problem.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::Config(format!(
            "database URL {url:?} is not a postgres:// URL"
        )));
    }
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(|e| {
        StoreError::Config(format!("cannot reach PostgreSQL at {}: {e}", redact(url)))
    })?;
    MIGRATOR.run(&mut conn).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(v) => StoreError::Config(format!(
            "the database at {} has migration {v}, which this controller does not know: it was written by a newer version",
            redact(url)
        )),
        other => other.into(),
    })?;
    conn.close().await?;
    Ok(())
}

/// `url` without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}@{}", &url[..s + 3], user, &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u@h:5/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[tokio::test]
    async fn a_url_of_another_database_is_refused_by_name() {
        let err = migrate("mysql://h/db").await.unwrap_err().to_string();
        assert!(err.contains("not a postgres:// URL"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = migrate(&format!("postgres://u:pw@127.0.0.1:{port}/db"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot reach PostgreSQL at postgres://u@127.0.0.1"),
            "{err}"
        );
        assert!(!err.contains("pw"), "{err}");
    }
}
