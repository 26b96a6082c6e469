//! How to reach the database: the flags every command that touches it
//! takes (`serve`, `migrate`, `dlq list`, `dlq replay`), with the same
//! names, environment fallbacks and defaults in each, so that a `dlq`
//! command given the environment of `serve` opens the database `serve`
//! writes.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sqlx::postgres::PgSslMode;

use crate::storage::{DbOptions, PgTls};

/// How to reach the database: every command that touches it takes these.
#[derive(Args, Debug)]
pub(crate) struct DatabaseArgs {
    /// Database URL: `postgres://user@host/db` or `sqlite://path/to/file.db`
    /// (`serve` and `migrate` create a missing SQLite file; `dlq` commands
    /// refuse one, a mistyped path is no new database). Credentials belong in the
    /// environment, not on the command line.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://exactly.db")]
    pub(crate) database_url: String,

    /// PostgreSQL: the most connections EACH handler's own pool opens (its
    /// events run as its own role), and the most the host's own pool opens
    /// (dead letters, retention). A handler that holds all of its
    /// connections cannot take another's. SQLite uses one writer connection.
    #[arg(long, env = "EXACTLY_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub(crate) db_max_connections: u32,

    /// PostgreSQL `statement_timeout` for every statement of an event.
    #[arg(long, env = "EXACTLY_STATEMENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    statement_timeout: Duration,

    /// PostgreSQL `lock_timeout`: how long a redelivery waits behind a
    /// concurrent first delivery of the same event before answering 503.
    /// SQLite's `busy_timeout`.
    #[arg(long, env = "EXACTLY_LOCK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    lock_timeout: Duration,

    /// PostgreSQL TLS, as libpq's `sslmode`: disable, allow, prefer,
    /// require, verify-ca or verify-full; libpq's default is `prefer` (TLS
    /// when the server offers it, unverified). `verify-full` checks the
    /// server's certificate against `--database-sslrootcert` and its name
    /// against the URL's host. The URL's `sslmode` parameter does the same;
    /// given both ways with different values, `exactly` refuses to guess.
    #[arg(long, env = "PGSSLMODE", value_parser = parse_sslmode)]
    database_sslmode: Option<PgSslMode>,

    /// PostgreSQL TLS: the CA certificate(s) (PEM file) the server's
    /// certificate must chain to, as libpq's `sslrootcert`; without one,
    /// `verify-ca`/`verify-full` use the public web roots built in.
    #[arg(long, env = "PGSSLROOTCERT")]
    database_sslrootcert: Option<PathBuf>,

    /// PostgreSQL TLS: a client certificate (PEM), as libpq's `sslcert`.
    #[arg(long, env = "PGSSLCERT")]
    database_sslcert: Option<PathBuf>,

    /// PostgreSQL TLS: the client certificate's key (PEM), as libpq's `sslkey`.
    #[arg(long, env = "PGSSLKEY")]
    database_sslkey: Option<PathBuf>,
}

fn parse_sslmode(text: &str) -> Result<PgSslMode, String> {
    text.parse().map_err(|_| {
        format!("{text:?} is not an sslmode: disable, allow, prefer, require, verify-ca or verify-full")
    })
}

impl DatabaseArgs {
    pub(crate) fn db_options(&self) -> DbOptions {
        DbOptions {
            url: self.database_url.clone(),
            max_connections: self.db_max_connections,
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            tls: PgTls {
                sslmode: self.database_sslmode,
                sslrootcert: self.database_sslrootcert.clone(),
                sslcert: self.database_sslcert.clone(),
                sslkey: self.database_sslkey.clone(),
            },
        }
    }
}
