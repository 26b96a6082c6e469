//! Issue 10 item 17: the retention sweep deletes in batches. The end-to-end
//! test (tests/tests/retention.rs) sees only the end state, which an
//! unbounded DELETE reaches too; here each call of
//! [`exactly::retention::delete_expired`] is observed: five expired
//! records with a batch of two go in calls of 2, 2 and 1, oldest first, on
//! both backends (PostgreSQL: a fresh database on `DATABASE_URL`'s server,
//! which the test suite always provides).

use std::time::Duration;

use exactly::manifest::Manifest;
use exactly::retention::delete_expired;
use exactly::storage::{Database, DbOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

fn options(url: &str) -> DbOptions {
    DbOptions {
        url: url.to_owned(),
        max_connections: 1,
        statement_timeout: Duration::from_secs(10),
        lock_timeout: Duration::from_secs(5),
        tls: Default::default(),
    }
}

/// Five records two hours old and one fresh; then the batches.
async fn observe_batches(database: &Database) {
    database.migrate(&Manifest { handlers: Vec::new() }).await.expect("migrate");
    for n in 0..6 {
        let id = format!("event-{n}");
        let (age, sql) = (if n < 5 { 7200 + n } else { 0 }, match database {
            Database::Postgres(_) => {
                "INSERT INTO exactly.processed_events (source, id, type, handler, payload_sha256, status, processed_at)
                 VALUES ('urn:t', $1, 't', 'h', '\\x00'::bytea, 202, now() - make_interval(secs => $2))"
            }
            Database::Sqlite(_) => {
                "INSERT INTO exactly_processed_events (source, id, type, handler, payload_sha256, status, processed_at)
                 VALUES ('urn:t', ?1, 't', 'h', x'00', 202, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%d seconds', ?2)))"
            }
        });
        match database {
            Database::Postgres(pool) => {
                sqlx::query(sql).bind(&id).bind(f64::from(age)).execute(pool).await.expect("insert");
            }
            Database::Sqlite(pool) => {
                sqlx::query(sql).bind(&id).bind(age).execute(pool).await.expect("insert");
            }
        }
    }
    let window = Duration::from_secs(3600);
    let mut batches = Vec::new();
    for _ in 0..4 {
        batches.push(delete_expired(database, window, 2).await.expect("delete a batch"));
    }
    assert_eq!(batches, [2, 2, 1, 0], "each call deletes at most one batch");
}

#[tokio::test]
async fn sqlite_deletes_in_batches() {
    let dir = std::env::temp_dir().join(format!("exactly-retention-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("batches.db").display());
    let database = Database::connect(&options(&url)).await.expect("open SQLite");
    observe_batches(&database).await;
    drop(database);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn postgres_deletes_in_batches() {
    let admin_url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must name a PostgreSQL server (scripts/test starts one)");
    let name = format!("exactly_retention_{}", std::process::id());
    let mut admin = PgConnection::connect(&admin_url).await.expect("connect to DATABASE_URL");
    sqlx::query(AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}""#))).execute(&mut admin).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#))).execute(&mut admin).await.unwrap();
    let url = match admin_url.rfind('/') {
        Some(slash) => format!("{}/{name}", &admin_url[..slash]),
        None => panic!("DATABASE_URL has no database path: {admin_url}"),
    };
    let database = Database::connect(&options(&url)).await.expect("connect");
    observe_batches(&database).await;
    if let Database::Postgres(pool) = &database {
        pool.close().await;
    }
    sqlx::query(AssertSqlSafe(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#)))
        .execute(&mut admin)
        .await
        .unwrap();
}
