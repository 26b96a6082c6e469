//! The two storage backends: a fresh database per test, and a small
//! connection to look at what the host stored.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Where the host stores events and the handlers their tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The host's own table of committed events (one row per committed
    /// `(source, id)`): a schema on PostgreSQL, a name prefix on SQLite.
    pub fn processed_events_table(self) -> &'static str {
        match self {
            Backend::Postgres => "exactly.processed_events",
            Backend::Sqlite => "exactly_processed_events",
        }
    }

    /// The host's table of dead letters (`POST /dead-letter`).
    pub fn dead_letters_table(self) -> &'static str {
        match self {
            Backend::Postgres => "exactly.dead_letters",
            Backend::Sqlite => "exactly_dead_letters",
        }
    }
}

const NO_DATABASE_URL: &str =
    "DATABASE_URL is not set: run scripts/test, which starts a throwaway PostgreSQL";

/// A database that belongs to one test.
///
/// PostgreSQL: `CREATE DATABASE exactly_t_<uuid>` on the server named by
/// `DATABASE_URL`, dropped again when the test passes (kept, and its name
/// printed, when it fails). SQLite: a file in the test's temporary folder,
/// created by the host on first use.
pub struct TestDatabase {
    backend: Backend,
    url: String,
    postgres: Option<PostgresDatabase>,
}

struct PostgresDatabase {
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates the database; for SQLite only decides the file name in `dir`.
    pub async fn create(backend: Backend, dir: &Path) -> TestDatabase {
        match backend {
            Backend::Postgres => {
                let admin_url = std::env::var("DATABASE_URL")
                    .ok()
                    .filter(|url| !url.trim().is_empty())
                    .unwrap_or_else(|| panic!("{NO_DATABASE_URL}"));
                let mut url = reqwest::Url::parse(&admin_url).unwrap_or_else(|error| {
                    panic!(
                        "DATABASE_URL is not a URL ({error}); expected postgres://user@host:port/db"
                    )
                });
                assert!(
                    matches!(url.scheme(), "postgres" | "postgresql"),
                    "DATABASE_URL must name a PostgreSQL server (postgres://…), got scheme {:?}",
                    url.scheme()
                );
                let name = format!("exactly_t_{}", uuid::Uuid::new_v4().simple());
                let mut admin = PgConnection::connect(&admin_url).await.unwrap_or_else(|error| {
                    panic!("cannot connect to DATABASE_URL's server ({error}); is PostgreSQL running?")
                });
                sqlx::query(AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
                    .execute(&mut admin)
                    .await
                    .unwrap_or_else(|error| panic!("CREATE DATABASE {name} failed: {error}"));
                let _ = admin.close().await;
                url.set_path(&format!("/{name}"));
                TestDatabase {
                    backend,
                    url: url.to_string(),
                    postgres: Some(PostgresDatabase { admin_url, name }),
                }
            }
            Backend::Sqlite => TestDatabase {
                backend,
                url: format!("sqlite://{}", dir.join("exactly.db").display()),
                postgres: None,
            },
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL handed to `exactly --database-url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A small pool of the test's own, to read and prepare rows. Connect
    /// only after the host has applied its migrations.
    pub async fn connect(&self) -> Db {
        match self.backend {
            Backend::Postgres => {
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&self.url)
                    .await
                    .unwrap_or_else(|error| panic!("connect to {}: {error}", self.url));
                Db::Postgres(pool)
            }
            Backend::Sqlite => {
                // No journal_mode or other pragma of ours: the file is the
                // host's, the test only reads it (and waits while it writes).
                let options = SqliteConnectOptions::from_str(&self.url)
                    .unwrap_or_else(|error| panic!("bad SQLite URL {}: {error}", self.url))
                    .create_if_missing(false)
                    .busy_timeout(Duration::from_secs(10));
                let pool = SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(options)
                    .await
                    .unwrap_or_else(|error| panic!("open {}: {error}", self.url));
                Db::Sqlite(pool)
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(database) = self.postgres.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!(
                "kept the failed test's PostgreSQL database {} for inspection",
                database.name
            );
            return;
        }
        // Drop is synchronous and may run inside the test's runtime: do the
        // async work on a thread of its own. Leftovers are harmless (every
        // test uses a fresh name), so errors are ignored.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok(mut admin) = PgConnection::connect(&database.admin_url).await else {
                    return;
                };
                let drop_database = format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    database.name
                );
                let _ = sqlx::query(AssertSqlSafe(drop_database))
                    .execute(&mut admin)
                    .await;
                for role in database_roles(&mut admin, &database.name).await {
                    let drop_role = format!(r#"DROP ROLE IF EXISTS "{role}""#);
                    let _ = sqlx::query(AssertSqlSafe(drop_role)).execute(&mut admin).await;
                }
                let _ = admin.close().await;
            });
        })
        .join();
    }
}

/// The cluster-wide roles `exactly migrate` made for the handlers of
/// `database` (named `exactly_<first 4 bytes of sha256(name), hex>_…`, see
/// `host/src/storage/postgres.rs`): a test drops them with its database.
pub async fn database_roles(admin: &mut PgConnection, database: &str) -> Vec<String> {
    sqlx::query_scalar(
        r"SELECT rolname::text FROM pg_roles
          WHERE rolname LIKE 'exactly\_' || substr(encode(sha256(convert_to($1, 'UTF8')), 'hex'), 1, 8) || '\_%'",
    )
    .bind(database)
    .fetch_all(admin)
    .await
    .unwrap_or_default()
}

/// The test's own connection to the database the host uses.
///
/// Queries are written once for both backends: parameters are `$1, $2, …`
/// (SQLite accepts them too) and always text; columns read back are cast to
/// `TEXT` or `BIGINT` in the SQL so that neither driver has to guess.
/// Every helper panics with the statement on error: in a test a failed
/// inspection query is a failed test.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to whichever pool this is, so the same
/// sqlx code is compiled once per driver.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Postgres($pool) => $body,
            Db::Sqlite($pool) => $body,
        }
    };
}

impl Db {
    /// A single integer, e.g. `SELECT count(*) FROM …`.
    pub async fn integer(&self, sql: &str, params: &[&str]) -> i64 {
        let result: Result<i64, sqlx::Error> = on_pool!(self, pool => {
            let mut query = sqlx::query_scalar(AssertSqlSafe(sql.to_owned()));
            for param in params {
                query = query.bind(*param);
            }
            query.fetch_one(pool).await
        });
        result.unwrap_or_else(|error| panic!("{sql} {params:?}: {error}"))
    }

    /// The first column of the first row, if there is a row and it is not
    /// NULL. The column must be text (cast it).
    pub async fn text(&self, sql: &str, params: &[&str]) -> Option<String> {
        let result: Result<Option<Option<String>>, sqlx::Error> = on_pool!(self, pool => {
            let mut query = sqlx::query_scalar(AssertSqlSafe(sql.to_owned()));
            for param in params {
                query = query.bind(*param);
            }
            query.fetch_optional(pool).await
        });
        result
            .unwrap_or_else(|error| panic!("{sql} {params:?}: {error}"))
            .flatten()
    }

    /// Every row, every column as text (cast them); NULL is `None`.
    pub async fn rows(&self, sql: &str, params: &[&str]) -> Vec<Vec<Option<String>>> {
        use sqlx::Row;
        let result: Result<Vec<Vec<Option<String>>>, sqlx::Error> = on_pool!(self, pool => {
            let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
            for param in params {
                query = query.bind(*param);
            }
            match query.fetch_all(pool).await {
                Ok(rows) => rows
                    .iter()
                    .map(|row| (0..row.len()).map(|i| row.try_get::<Option<String>, _>(i)).collect())
                    .collect(),
                Err(error) => Err(error),
            }
        });
        result.unwrap_or_else(|error| panic!("{sql} {params:?}: {error}"))
    }

    /// The first column of every row, as text (cast it); NULLs skipped.
    pub async fn texts(&self, sql: &str, params: &[&str]) -> Vec<String> {
        self.rows(sql, params)
            .await
            .into_iter()
            .filter_map(|row| row.into_iter().next().flatten())
            .collect()
    }

    /// Runs one data-modifying statement and returns the rows it touched.
    pub async fn execute(&self, sql: &str, params: &[&str]) -> u64 {
        let result: Result<u64, sqlx::Error> = on_pool!(self, pool => {
            let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
            for param in params {
                query = query.bind(*param);
            }
            query.execute(pool).await.map(|done| done.rows_affected())
        });
        result.unwrap_or_else(|error| panic!("{sql} {params:?}: {error}"))
    }

    /// Whether a table (or view) of this name can be read.
    pub async fn table_exists(&self, table: &str) -> bool {
        let sql = format!("SELECT count(*) FROM {table}");
        let result: Result<i64, sqlx::Error> = on_pool!(self, pool => {
            sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(pool).await
        });
        result.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::both_backends!(helpers_read_what_they_wrote);

    /// The harness itself, without the host: a fresh database, and every
    /// `Db` helper on it.
    async fn helpers_read_what_they_wrote(backend: Backend) {
        let dir = tempfile::tempdir().expect("a temporary folder");
        if backend == Backend::Sqlite {
            // Normally the host creates the file.
            std::fs::File::create(dir.path().join("exactly.db")).expect("create the file");
        }
        let database = TestDatabase::create(backend, dir.path()).await;
        let db = database.connect().await;

        db.execute("CREATE TABLE t (a TEXT, n INTEGER)", &[]).await;
        let inserted = db
            .execute("INSERT INTO t VALUES ($1, 5), ($2, NULL)", &["x", "y"])
            .await;
        assert_eq!(inserted, 2);
        assert_eq!(
            db.integer("SELECT count(*) FROM t WHERE a = $1", &["x"])
                .await,
            1
        );
        assert_eq!(
            db.integer("SELECT CAST(n AS BIGINT) FROM t WHERE a = $1", &["x"])
                .await,
            5
        );
        assert_eq!(
            db.text("SELECT a FROM t WHERE a = $1", &["y"])
                .await
                .as_deref(),
            Some("y")
        );
        assert_eq!(db.text("SELECT a FROM t WHERE a = $1", &["z"]).await, None);
        assert_eq!(
            db.rows("SELECT a, CAST(n AS TEXT) FROM t ORDER BY a", &[])
                .await,
            vec![
                vec![Some("x".to_owned()), Some("5".to_owned())],
                vec![Some("y".to_owned()), None]
            ]
        );
        assert_eq!(
            db.texts("SELECT a FROM t ORDER BY 1", &[]).await,
            ["x", "y"]
        );
        assert!(db.table_exists("t").await);
        assert!(!db.table_exists("missing").await);
    }
}
