//! Storage backends: PostgreSQL and SQLite behind one small surface.
//!
//! [`Database`] owns the pool and applies migrations. [`EventTx`] is one
//! event's transaction: the claim, the handler's statements, the stored
//! answer and the commit all run on it. What it promises to the pipeline:
//! a claim either makes this delivery the owner of `(source, id)` or hands
//! back the committed answer of the delivery that owned it; nothing is
//! visible to anyone until [`EventTx::commit`] returns `Ok`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlx::{Connection, PgPool, SqlitePool};

use crate::rejection::Rejection;
use crate::manifest::Manifest;

pub mod class;
mod event_tx;
mod migrate;
pub mod postgres;
pub mod sqlite_guard;

pub use class::ErrorClass;
pub use event_tx::{Claim, EventTx};
use migrate::{handler_tables, migrate_sqlite};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a database URL names.
    pub fn from_url(url: &str) -> anyhow::Result<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            bail!("unsupported database URL {:?}: use postgres://… or sqlite://…", redact(url))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }

    /// The `sqlparser` dialect that reads this backend's SQL: the one the
    /// statement policy and the migration reader both parse with.
    pub fn dialect(self) -> &'static dyn Dialect {
        match self {
            Backend::Postgres => &PostgreSqlDialect {},
            Backend::Sqlite => &SQLiteDialect {},
        }
    }
}

pub struct DbOptions {
    pub url: String,
    pub max_connections: u32,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// TLS to PostgreSQL given as flags (or libpq's `PGSSL*` variables);
    /// the URL's parameters may say the same, never something else.
    pub tls: PgTls,
}

/// TLS to PostgreSQL as libpq names it (`sslmode`, `sslrootcert`,
/// `sslcert`, `sslkey`): what the `--database-ssl*` flags (or `PGSSLMODE`,
/// `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`) set. `None` leaves the URL's
/// parameter, else libpq's default (`sslmode=prefer`, no client
/// certificate).
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    pub sslmode: Option<sqlx::postgres::PgSslMode>,
    pub sslrootcert: Option<std::path::PathBuf>,
    pub sslcert: Option<std::path::PathBuf>,
    pub sslkey: Option<std::path::PathBuf>,
}

impl PgTls {
    /// Refuses a URL parameter (in any spelling the driver reads) that
    /// names another value than the flag for the same setting.
    fn agrees_with_url(&self, url: &str) -> anyhow::Result<()> {
        let Ok(parsed) = url::Url::parse(url) else { return Ok(()) };
        let flags: [(&str, &[&str], Option<String>); 4] = [
            ("--database-sslmode (PGSSLMODE)", &["sslmode", "ssl-mode"], self.sslmode.map(|mode| format!("{mode:?}"))),
            (
                "--database-sslrootcert (PGSSLROOTCERT)",
                &["sslrootcert", "ssl-root-cert", "ssl-ca"],
                self.sslrootcert.as_ref().map(|path| path.display().to_string()),
            ),
            ("--database-sslcert (PGSSLCERT)", &["sslcert", "ssl-cert"], self.sslcert.as_ref().map(|path| path.display().to_string())),
            ("--database-sslkey (PGSSLKEY)", &["sslkey", "ssl-key"], self.sslkey.as_ref().map(|path| path.display().to_string())),
        ];
        for (flag, names, value) in flags {
            let Some(value) = value else { continue };
            for (name, in_url) in parsed.query_pairs().filter(|(name, _)| names.contains(&name.as_ref())) {
                let same = if names[0] == "sslmode" {
                    in_url.parse::<sqlx::postgres::PgSslMode>().is_ok_and(|mode| format!("{mode:?}") == value)
                } else {
                    in_url == value
                };
                if !same {
                    bail!("the database URL's {name}={in_url} and {flag} = {value} disagree; give it one way");
                }
            }
        }
        Ok(())
    }
}

impl DbOptions {
    /// The PostgreSQL connection options of the URL with the TLS flags
    /// applied. Errors: a URL the driver cannot read, or one whose TLS
    /// parameter says something else than its flag (libpq would let the
    /// URL win over the variable silently).
    pub fn postgres(&self) -> anyhow::Result<PgConnectOptions> {
        let mut connect = PgConnectOptions::from_str(&self.url).context("invalid PostgreSQL URL")?;
        self.tls.agrees_with_url(&self.url)?;
        if let Some(mode) = self.tls.sslmode {
            connect = connect.ssl_mode(mode);
        }
        if let Some(path) = &self.tls.sslrootcert {
            connect = connect.ssl_root_cert(path);
        }
        if let Some(path) = &self.tls.sslcert {
            connect = connect.ssl_client_cert(path);
        }
        if let Some(path) = &self.tls.sslkey {
            connect = connect.ssl_client_key(path);
        }
        Ok(connect)
    }
}

#[derive(Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Where events' transactions come from: each handler's own sessions.
pub enum Sessions {
    /// One pool per handler, logged in as its role.
    Postgres(postgres::HandlerPools),
    /// SQLite's one writer connection. Each handler takes its turn: at
    /// most one of its events waits for or holds the writer at a time, so
    /// a handler whose events hold the writer until their deadline delays
    /// another handler's event by at most one of its own, never by its
    /// whole backlog.
    Sqlite { pool: SqlitePool, turns: HashMap<String, Arc<tokio::sync::Semaphore>> },
}

impl Sessions {
    /// Opens an event's transaction on `handler`'s sessions. SQLite takes
    /// the write lock at once (`BEGIN IMMEDIATE`) so the claim never fails
    /// half-way on a lock upgrade.
    pub async fn begin(&self, handler: &str) -> Result<EventTx, Rejection> {
        match self {
            Sessions::Postgres(pools) => {
                let pool = pools
                    .pools
                    .get(handler)
                    .ok_or_else(|| Rejection::Internal(format!("no database sessions for handler {handler}")))?;
                let session = postgres::EventSession::begin(pool, pools.key.clone()).await.map_err(classify)?;
                Ok(EventTx::Postgres(session))
            }
            Sessions::Sqlite { pool, turns } => {
                let turn = match turns.get(handler) {
                    Some(turn) => Some(
                        tokio::time::timeout(ACQUIRE_TIMEOUT, turn.clone().acquire_owned())
                            .await
                            .map_err(|_| {
                                Rejection::Busy(format!(
                                    "handler {handler}'s earlier events held the SQLite writer for {ACQUIRE_TIMEOUT:?}"
                                ))
                            })?
                            .map_err(|_| Rejection::ShuttingDown)?,
                    ),
                    None => None,
                };
                let tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?;
                Ok(EventTx::Sqlite(tx, turn))
            }
        }
    }
}

/// Owner name under which the host's own migrations are recorded; handler
/// names start with a letter, so they cannot collide with it.
const HOST_OWNER: &str = "(host)";
/// How long an event waits for a pooled connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

impl Database {
    pub async fn connect(options: &DbOptions) -> anyhow::Result<Database> {
        let url = options.url.as_str();
        if Backend::from_url(url)? == Backend::Postgres {
            // Timeouts travel in the startup packet: no extra round trip per
            // event to set them.
            let connect = options
                .postgres()?
                .application_name("exactly")
                .options([
                    ("standard_conforming_strings", "on".to_owned()),
                    ("statement_timeout", format!("{}ms", options.statement_timeout.as_millis())),
                    ("lock_timeout", format!("{}ms", options.lock_timeout.as_millis())),
                ]);
            let pool = PgPoolOptions::new()
                .max_connections(options.max_connections.max(1))
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(connect)
                .await
                .with_context(|| format!("cannot connect to PostgreSQL at {}", redact(url)))?;
            Ok(Database::Postgres(pool))
        } else {
            let connect = SqliteConnectOptions::from_str(url)
                .context("invalid SQLite URL")?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // FULL: a 2xx answer means the commit survived a power cut.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(options.lock_timeout)
                .foreign_keys(true);
            // SQLite has one writer at a time; one connection makes events
            // queue fairly in the pool instead of spinning on SQLITE_BUSY.
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(connect)
                .await
                .with_context(|| format!("cannot open SQLite database {url}"))?;
            Ok(Database::Sqlite(pool))
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Postgres(_) => Backend::Postgres,
            Database::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// The handlers' sessions: on PostgreSQL one pool per handler, logged
    /// in as the handler's own role ([`postgres`]); on SQLite the one
    /// writer, shared in turns ([`Sessions::begin`]).
    pub async fn sessions(
        &self,
        manifest: &Manifest,
        options: &DbOptions,
        statement_timeouts: &HashMap<String, Duration>,
    ) -> anyhow::Result<Sessions> {
        match self {
            Database::Postgres(pool) => {
                let pools = postgres::handler_pools(pool, manifest, options, statement_timeouts).await?;
                Ok(Sessions::Postgres(pools))
            }
            Database::Sqlite(pool) => Ok(Sessions::Sqlite {
                pool: pool.clone(),
                turns: manifest
                    .handlers
                    .iter()
                    .map(|h| (h.name.clone(), Arc::new(tokio::sync::Semaphore::new(1))))
                    .collect(),
            }),
        }
    }

    /// Cancels what the server process `pid` (a handler's session) is
    /// running: an event past its deadline must not keep its statement, its
    /// connection and its transaction, whatever `statement_timeout` the
    /// handler set for itself. The account is a member of each handler's
    /// login role, which `pg_cancel_backend` requires.
    pub async fn cancel_backend(&self, pid: i32) {
        if let Database::Postgres(pool) = self
            && let Err(error) = sqlx::query("SELECT pg_cancel_backend($1)").bind(pid).execute(pool).await
        {
            tracing::warn!(%error, pid, "cannot cancel the statement of an event past its deadline");
        }
    }

    /// True when a trivial query answers (`/readyz`), without queueing
    /// behind events: on PostgreSQL through the host's own pool, which no
    /// event holds (events run on their handlers' pools); on SQLite on a
    /// connection of its own, read-only, opened for the probe, since
    /// events hold the one writer for as long as they run (issue 10).
    pub async fn ping(&self) -> bool {
        match self {
            Database::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Database::Sqlite(pool) => {
                let options = pool.connect_options().as_ref().clone().read_only(true).create_if_missing(false);
                match SqliteConnection::connect_with(&options).await {
                    Ok(mut connection) => {
                        let answered = sqlx::query("SELECT 1").execute(&mut connection).await.is_ok();
                        let _ = connection.close().await;
                        answered
                    }
                    Err(_) => false,
                }
            }
        }
    }

    /// Applies the host's schema and then every handler's migrations, in
    /// manifest order, each file once, all in one transaction, and records
    /// which handler owns which table as the database sees it. A file that
    /// changed after it was applied stops everything: silently diverging
    /// schemas are worse than a failed start. So does a migration that
    /// names another handler's table.
    pub async fn migrate(&self, manifest: &Manifest) -> anyhow::Result<()> {
        match self {
            Database::Postgres(pool) => postgres::migrate(pool, manifest).await,
            Database::Sqlite(pool) => migrate_sqlite(pool, manifest).await,
        }
    }

    /// Each handler's tables, as the database records their ownership
    /// after migrating, plus those the handler lists in `uses`.
    pub async fn handler_tables(&self, manifest: &Manifest) -> anyhow::Result<HashMap<String, Vec<String>>> {
        let owned = match self {
            Database::Postgres(pool) => postgres::read_owned_tables(pool, manifest).await?,
            Database::Sqlite(pool) => {
                let rows: Vec<(String, String)> =
                    sqlx::query_as("SELECT table_name, handler FROM exactly_table_owners ORDER BY table_name")
                        .fetch_all(pool)
                        .await
                        .context("cannot read exactly_table_owners (run `exactly migrate`)")?;
                let mut owned: HashMap<String, Vec<String>> = HashMap::new();
                for (table, handler) in rows {
                    owned.entry(handler).or_default().push(table.to_ascii_lowercase());
                }
                owned
            }
        };
        manifest.handlers.iter().map(|handler| Ok((handler.name.clone(), handler_tables(handler, &owned)?))).collect()
    }
}

/// Maps a database error on the host's own statements to its answer, by
/// [`ErrorClass`]: the database unreachable (503 `database-unavailable`) or
/// contended (503 `busy`) can be retried; anything else is ours (500).
pub fn classify(error: sqlx::Error) -> Rejection {
    let class = ErrorClass::of(&error);
    let message = match &error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::PoolTimedOut => format!("no database connection became free within {ACQUIRE_TIMEOUT:?}"),
        other => other.to_string(),
    };
    match class {
        ErrorClass::Unavailable => Rejection::DatabaseUnavailable(message),
        ErrorClass::Contention | ErrorClass::Timeout => Rejection::Busy(message),
        _ => match &error {
            sqlx::Error::Database(db) => {
                Rejection::Internal(format!("database error {}: {message}", db.code().unwrap_or_default()))
            }
            _ => Rejection::Internal(message),
        },
    }
}

/// Whether a start-up failure is the database being out of reach (down,
/// restarting, refusing connections, the database or its role not created
/// yet: [`ErrorClass::is_transient`]) rather than a mistake waiting cannot
/// cure: a malformed URL, a migration that fails (a missing privilege
/// `42501` among them), a changed migration file, and TLS that cannot be
/// had as configured (a server certificate that does not chain to
/// `sslrootcert` or name the host, a server without TLS under `require`, a
/// CA file that cannot be read): those stop the start-up with the
/// driver's words instead of waiting for ever.
pub fn is_transient(error: &anyhow::Error) -> bool {
    !error.chain().any(is_tls_failure)
        && error
        .chain()
        .any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(|error| ErrorClass::of(error).is_transient()))
}

/// A TLS failure: the driver's own (no TLS on the server, a file it cannot
/// read), or the handshake's (a certificate it does not trust), which the
/// driver reports as an I/O error carrying rustls' error.
fn is_tls_failure(cause: &(dyn std::error::Error + 'static)) -> bool {
    match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Tls(_)) => true,
        Some(sqlx::Error::Io(io)) => io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()),
        _ => cause.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref).is_some_and(|inner| inner.is::<rustls::Error>()),
    }
}

/// Hides the password of a database URL in messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

}

