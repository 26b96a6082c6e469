//! Storage backends: PostgreSQL and SQLite behind one small surface.
//!
//! [`Database`] owns the pool and applies migrations. [`EventTx`] is one
//! event's transaction: the claim, the handler's statements, the stored
//! answer and the commit all run on it. What it promises to the pipeline:
//! a claim either makes this delivery the owner of `(source, id)` or hands
//! back the committed answer of the delivery that owned it; nothing is
//! visible to anyone until [`EventTx::commit`] returns `Ok`.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Sqlite, SqlitePool, Transaction};

use crate::answer::{Committed, LimitKind, Rejection, ReplyEvent};
use crate::convert::{self, Rows, StatementError, StatementOutput, Value};
use crate::decode::CloudEvent;
use crate::manifest::{HandlerSpec, Manifest};

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
}

pub struct DbOptions {
    pub url: String,
    pub max_connections: u32,
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
}

#[derive(Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// One event's open transaction.
pub enum EventTx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// The outcome of claiming `(source, id)`.
pub enum Claim {
    /// This delivery owns the event: run the handler.
    Owned,
    /// The event was committed before; here is what was stored.
    Duplicate { payload_sha256: Vec<u8>, answer: Committed },
}

/// Owner name under which the host's own migrations are recorded; handler
/// names start with a letter, so they cannot collide with it.
const HOST_OWNER: &str = "(host)";
/// Serializes concurrent `migrate` runs (several replicas starting at once).
const MIGRATION_LOCK: i64 = 0x6578_6163_746c_7901;
/// How long an event waits for a pooled connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

static HOST_MIGRATIONS_PG: &[(&str, &str)] = &[
    ("0001_processed_events.sql", include_str!("../migrations/postgres/0001_processed_events.sql")),
    ("0002_dead_letters.sql", include_str!("../migrations/postgres/0002_dead_letters.sql")),
];
static HOST_MIGRATIONS_SQLITE: &[(&str, &str)] = &[
    ("0001_processed_events.sql", include_str!("../migrations/sqlite/0001_processed_events.sql")),
    ("0002_dead_letters.sql", include_str!("../migrations/sqlite/0002_dead_letters.sql")),
];

impl Database {
    pub async fn connect(options: &DbOptions) -> anyhow::Result<Database> {
        let url = options.url.as_str();
        if Backend::from_url(url)? == Backend::Postgres {
            // Timeouts travel in the startup packet: no extra round trip per
            // event to set them.
            let connect = PgConnectOptions::from_str(url)
                .context("invalid PostgreSQL URL")?
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

    /// Opens an event's transaction. SQLite takes the write lock at once
    /// (`BEGIN IMMEDIATE`) so the claim never fails half-way on a lock
    /// upgrade.
    pub async fn begin(&self) -> Result<EventTx, Rejection> {
        match self {
            Database::Postgres(pool) => pool.begin().await.map(EventTx::Postgres),
            Database::Sqlite(pool) => pool.begin_with("BEGIN IMMEDIATE").await.map(EventTx::Sqlite),
        }
        .map_err(classify)
    }

    /// The PostgreSQL role each handler's statements run as. Roles belong
    /// to the whole cluster, so their names carry a digest of the database
    /// name: two deployments on one cluster never share a role.
    pub async fn handler_roles(&self, manifest: &Manifest) -> anyhow::Result<HashMap<String, String>> {
        let Database::Postgres(pool) = self else {
            return Ok(HashMap::new());
        };
        let database: String = sqlx::query_scalar("SELECT current_database()::text").fetch_one(pool).await?;
        let digest = Sha256::digest(database.as_bytes());
        let prefix = format!("exactly_{}_", hex::encode(&digest[..4]));
        Ok(manifest
            .handlers
            .iter()
            .map(|h| (h.name.clone(), format!("{prefix}{}", h.name.replace('-', "_"))))
            .collect())
    }

    /// True when a trivial query answers.
    pub async fn ping(&self) -> bool {
        match self {
            Database::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
            Database::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.is_ok(),
        }
    }

    /// Applies the host's schema and then every handler's migrations, in
    /// manifest order, each file once, all in one transaction. A file that
    /// changed after it was applied stops everything: silently diverging
    /// schemas are worse than a failed start.
    pub async fn migrate(&self, manifest: &Manifest) -> anyhow::Result<()> {
        let backend = self.backend();
        let mut plan: Vec<(String, String, String)> = match backend {
            Backend::Postgres => HOST_MIGRATIONS_PG,
            Backend::Sqlite => HOST_MIGRATIONS_SQLITE,
        }
        .iter()
        .map(|(name, sql)| (HOST_OWNER.to_owned(), (*name).to_owned(), (*sql).to_owned()))
        .collect();
        for handler in &manifest.handlers {
            if let Some(dir) = &handler.migrations {
                for (name, sql) in read_migrations(&dir.join(backend.name()))
                    .with_context(|| format!("migrations of handler {}", handler.name))?
                {
                    plan.push((handler.name.clone(), name, sql));
                }
            }
        }
        let roles = self.handler_roles(manifest).await?;
        match self {
            Database::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
                sqlx::raw_sql(
                    "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0;
                     CREATE SCHEMA IF NOT EXISTS exactly;
                     CREATE TABLE IF NOT EXISTS exactly.migrations (
                         owner text NOT NULL, name text NOT NULL, sha256 bytea NOT NULL,
                         applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (owner, name))",
                )
                .execute(&mut *tx)
                .await?;
                for (owner, name, sql) in plan {
                    let digest = Sha256::digest(sql.as_bytes()).to_vec();
                    let applied: Option<Vec<u8>> =
                        sqlx::query_scalar("SELECT sha256 FROM exactly.migrations WHERE owner = $1 AND name = $2")
                            .bind(&owner)
                            .bind(&name)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if check_applied(&owner, &name, applied.as_deref(), &digest)? {
                        continue;
                    }
                    sqlx::raw_sql(AssertSqlSafe(sql))
                        .execute(&mut *tx)
                        .await
                        .with_context(|| format!("migration {name} of {owner} failed"))?;
                    sqlx::query("INSERT INTO exactly.migrations (owner, name, sha256) VALUES ($1, $2, $3)")
                        .bind(&owner)
                        .bind(&name)
                        .bind(&digest)
                        .execute(&mut *tx)
                        .await?;
                    tracing::info!(%owner, migration = %name, "migration applied");
                }
                for (handler, role) in &roles {
                    let spec = manifest.handlers.iter().find(|h| &h.name == handler).context("unknown handler")?;
                    let tables = handler_tables(spec, backend)?;
                    sqlx::raw_sql(AssertSqlSafe(role_grants(role, &tables))).execute(&mut *tx).await.with_context(
                        || format!("cannot set up the role {role} of handler {handler}"),
                    )?;
                }
                tx.commit().await?;
            }
            Database::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS exactly_migrations (
                         owner TEXT NOT NULL, name TEXT NOT NULL, sha256 BLOB NOT NULL,
                         applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                         PRIMARY KEY (owner, name))",
                )
                .execute(&mut *tx)
                .await?;
                for (owner, name, sql) in plan {
                    let digest = Sha256::digest(sql.as_bytes()).to_vec();
                    let applied: Option<Vec<u8>> =
                        sqlx::query_scalar("SELECT sha256 FROM exactly_migrations WHERE owner = ?1 AND name = ?2")
                            .bind(&owner)
                            .bind(&name)
                            .fetch_optional(&mut *tx)
                            .await?;
                    if check_applied(&owner, &name, applied.as_deref(), &digest)? {
                        continue;
                    }
                    sqlx::raw_sql(AssertSqlSafe(sql))
                        .execute(&mut *tx)
                        .await
                        .with_context(|| format!("migration {name} of {owner} failed"))?;
                    sqlx::query("INSERT INTO exactly_migrations (owner, name, sha256) VALUES (?1, ?2, ?3)")
                        .bind(&owner)
                        .bind(&name)
                        .bind(&digest)
                        .execute(&mut *tx)
                        .await?;
                    tracing::info!(%owner, migration = %name, "migration applied");
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }
}

/// The tables a handler may use: those its migrations create, and those it
/// declares in `uses`.
pub fn handler_tables(spec: &HandlerSpec, backend: Backend) -> anyhow::Result<Vec<String>> {
    let mut tables = spec.uses.clone();
    if let Some(dir) = &spec.migrations {
        for (name, sql) in read_migrations(&dir.join(backend.name()))
            .with_context(|| format!("migrations of handler {}", spec.name))?
        {
            let created = crate::policy::tables_created_by(backend, &sql).map_err(|e| {
                anyhow::anyhow!("cannot read which tables migration {name} of handler {} creates: {e}", spec.name)
            })?;
            tables.extend(created);
        }
    }
    tables.sort();
    tables.dedup();
    Ok(tables)
}

/// The SQL that makes `role` a NOLOGIN role allowed to read and write
/// exactly `tables` (and nothing of the host's schema), and lets the host
/// `SET ROLE` to it. Idempotent: privileges are reset, then granted.
fn role_grants(role: &str, tables: &[String]) -> String {
    let role_ident = quote_ident(role);
    let literal = role.replace('\'', "''");
    let mut sql = format!(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{literal}') THEN
                 CREATE ROLE {role_ident} NOLOGIN;
             END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
         END $$;
         GRANT {role_ident} TO CURRENT_USER;
         REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role_ident};
         GRANT USAGE ON SCHEMA public TO {role_ident};
         GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role_ident};"
    );
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|t| quote_ident(t)).collect();
        sql.push_str(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {} TO {role_ident};",
            list.join(", ")
        ));
    }
    sql
}

/// `Ok(true)`: already applied, skip. `Ok(false)`: apply it now.
fn check_applied(owner: &str, name: &str, applied: Option<&[u8]>, digest: &[u8]) -> anyhow::Result<bool> {
    match applied {
        None => Ok(false),
        Some(stored) if stored == digest => Ok(true),
        Some(_) => bail!(
            "migration {name} of {owner} was changed after it was applied; add a new migration file instead of editing an applied one"
        ),
    }
}

fn read_migrations(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read migration folder {}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "sql") {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let sql = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            files.push((name, sql));
        }
    }
    files.sort();
    Ok(files)
}

impl EventTx {
    /// Claims `(source, id)`. On PostgreSQL a concurrent first delivery holds
    /// the row lock, so this waits for it (bounded by `lock_timeout`) and
    /// then sees its committed row, or owns the event if it rolled back.
    /// On PostgreSQL the same statement that claims the event also switches
    /// to the handler's role and statement timeout (`set_config(…, true)` is
    /// `SET LOCAL`): one round trip, and nothing is switched for a duplicate.
    pub async fn claim(
        &mut self,
        event: &CloudEvent,
        handler: &str,
        payload_sha256: &[u8],
        role: Option<&str>,
        statement_timeout: Option<Duration>,
    ) -> Result<Claim, Rejection> {
        let inserted = match self {
            EventTx::Postgres(tx) => sqlx::query(
                "WITH claim AS (
                     INSERT INTO exactly.processed_events (source, id, type, handler, payload_sha256)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (source, id) DO NOTHING RETURNING 1)
                 SELECT set_config('role', COALESCE($6, current_user::text), true),
                        set_config('statement_timeout', COALESCE($7, current_setting('statement_timeout')), true)
                 FROM claim",
            )
            .bind(&event.source)
            .bind(&event.id)
            .bind(&event.ty)
            .bind(handler)
            .bind(payload_sha256)
            .bind(role)
            .bind(statement_timeout.map(|t| format!("{}ms", t.as_millis().max(1))))
            .fetch_optional(&mut **tx)
            .await
            .map(|row| u64::from(row.is_some())),
            EventTx::Sqlite(tx) => sqlx::query(
                "INSERT INTO exactly_processed_events (source, id, type, handler, payload_sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (source, id) DO NOTHING",
            )
            .bind(&event.source)
            .bind(&event.id)
            .bind(&event.ty)
            .bind(handler)
            .bind(payload_sha256)
            .execute(&mut **tx)
            .await
            .map(|r| r.rows_affected()),
        }
        .map_err(classify)?;
        if inserted == 1 {
            return Ok(Claim::Owned);
        }
        let row = match self {
            EventTx::Postgres(tx) => sqlx::query(
                "SELECT payload_sha256, status, reply::text AS reply FROM exactly.processed_events
                 WHERE source = $1 AND id = $2",
            )
            .bind(&event.source)
            .bind(&event.id)
            .fetch_one(&mut **tx)
            .await
            .and_then(|row| Ok((row.try_get("payload_sha256")?, row.try_get::<Option<i16>, _>("status")?, row.try_get("reply")?))),
            EventTx::Sqlite(tx) => sqlx::query(
                "SELECT payload_sha256, status, reply FROM exactly_processed_events WHERE source = ?1 AND id = ?2",
            )
            .bind(&event.source)
            .bind(&event.id)
            .fetch_one(&mut **tx)
            .await
            .and_then(|row| Ok((row.try_get("payload_sha256")?, row.try_get::<Option<i16>, _>("status")?, row.try_get("reply")?))),
        }
        .map_err(classify)?;
        let (payload_sha256, status, reply): (Vec<u8>, Option<i16>, Option<String>) = row;
        let status = status.ok_or_else(|| Rejection::Internal("a committed event has no stored answer".into()))?;
        let reply = reply
            .map(|text| serde_json::from_str::<ReplyEvent>(&text))
            .transpose()
            .map_err(|e| Rejection::Internal(format!("stored reply cannot be read: {e}")))?;
        Ok(Claim::Duplicate { payload_sha256, answer: Committed { status: status as u16, reply } })
    }

    /// Stores the answer on the claim row. It must update exactly one row:
    /// that proves the transaction is alive right before COMMIT (an aborted
    /// PostgreSQL transaction would fail here instead of letting COMMIT
    /// quietly roll back).
    pub async fn store_answer(&mut self, event: &CloudEvent, answer: &Committed, result: &str) -> Result<(), Rejection> {
        let reply = answer
            .reply
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Rejection::Internal(e.to_string()))?;
        let status = answer.status as i16;
        let updated = match self {
            // Back to the host's role and the UPDATE in one round trip: a
            // simple-protocol batch, so the values travel as literals
            // (`standard_conforming_strings` is forced on per connection).
            EventTx::Postgres(tx) => {
                let batch = format!(
                    "RESET ROLE; UPDATE exactly.processed_events SET status = {status}, reply = {}::jsonb, result = {}::jsonb \
                     WHERE source = {} AND id = {}",
                    reply.as_deref().map_or(Ok("NULL".to_owned()), sql_literal)?,
                    sql_literal(result)?,
                    sql_literal(&event.source)?,
                    sql_literal(&event.id)?,
                );
                sqlx::raw_sql(AssertSqlSafe(batch)).execute(&mut **tx).await.map(|r| r.rows_affected())
            }
            EventTx::Sqlite(tx) => sqlx::query(
                "UPDATE exactly_processed_events SET status = ?3, reply = ?4, result = ?5 WHERE source = ?1 AND id = ?2",
            )
            .bind(&event.source)
            .bind(&event.id)
            .bind(status)
            .bind(reply)
            .bind(result)
            .execute(&mut **tx)
            .await
            .map(|r| r.rows_affected()),
        }
        .map_err(classify)?;
        if updated == 1 {
            Ok(())
        } else {
            Err(Rejection::Internal(format!("storing the answer updated {updated} rows instead of 1")))
        }
    }

    pub async fn commit(self) -> Result<(), Rejection> {
        match self {
            EventTx::Postgres(tx) => tx.commit().await,
            EventTx::Sqlite(tx) => tx.commit().await,
        }
        .map_err(classify)
    }

    pub async fn rollback(self) {
        let result = match self {
            EventTx::Postgres(tx) => tx.rollback().await,
            EventTx::Sqlite(tx) => tx.rollback().await,
        };
        if let Err(error) = result {
            // The connection is closed or broken: the server rolls back.
            tracing::warn!(%error, "rollback failed; the database discards the transaction with the connection");
        }
    }

    /// Runs one handler statement (already admitted by the policy). Rows
    /// are streamed and counted, so a query returning millions of rows is
    /// cut off at the cap instead of filling the host's memory.
    pub async fn run_handler_statement(
        &mut self,
        sql: Arc<str>,
        params: Vec<Value>,
        want_rows: bool,
        caps: RowCaps,
    ) -> Result<StatementOutput, StatementError> {
        match self {
            EventTx::Postgres(tx) => {
                let query = convert::bind_postgres(sqlx::query(AssertSqlSafe(sql)), params)?;
                if want_rows {
                    let stream = query.fetch(&mut **tx);
                    collect_rows(stream, caps, convert::row_from_postgres).await
                } else {
                    let done = query.execute(&mut **tx).await.map_err(StatementError::from_sqlx)?;
                    Ok(StatementOutput::Affected(done.rows_affected()))
                }
            }
            EventTx::Sqlite(tx) => {
                let query = convert::bind_sqlite(sqlx::query(AssertSqlSafe(sql)), params)?;
                if want_rows {
                    let stream = query.fetch(&mut **tx);
                    collect_rows(stream, caps, convert::row_from_sqlite).await
                } else {
                    let done = query.execute(&mut **tx).await.map_err(StatementError::from_sqlx)?;
                    Ok(StatementOutput::Affected(done.rows_affected()))
                }
            }
        }
    }

    /// Hands the transaction to a handler. On SQLite, install a progress
    /// handler that interrupts any statement once the event's deadline has
    /// passed (SQLite has no statement timeout of its own). On PostgreSQL the
    /// claim already switched to the handler's role and statement timeout.
    pub async fn enter_handler(&mut self, deadline: Instant) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx) = self {
            let mut handle = tx.lock_handle().await.map_err(classify)?;
            handle.set_progress_handler(10_000, move || Instant::now() < deadline);
        }
        Ok(())
    }

    /// Takes the transaction back from the handler. On PostgreSQL storing the
    /// answer resets the role.
    pub async fn leave_handler(&mut self) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx) = self {
            tx.lock_handle().await.map_err(classify)?.remove_progress_handler();
        }
        Ok(())
    }
}

/// The most one handler query may hand back.
#[derive(Debug, Clone, Copy)]
pub struct RowCaps {
    pub max_rows: u64,
    pub max_bytes: u64,
}

async fn collect_rows<R: Row, S>(
    mut stream: S,
    caps: RowCaps,
    convert_row: fn(&R) -> Result<Vec<Value>, StatementError>,
) -> Result<StatementOutput, StatementError>
where
    S: futures::Stream<Item = Result<R, sqlx::Error>> + Unpin,
{
    use futures::TryStreamExt;
    let mut columns = None;
    let mut rows = Vec::new();
    let mut bytes = 0u64;
    while let Some(row) = stream.try_next().await.map_err(StatementError::from_sqlx)? {
        if rows.len() as u64 >= caps.max_rows {
            return Err(StatementError::limit(
                LimitKind::Rows,
                format!("the query returned more than {} rows", caps.max_rows),
            ));
        }
        if columns.is_none() {
            columns = Some(convert::column_names(&row));
        }
        let values = convert_row(&row)?;
        bytes += values.iter().map(convert::value_size).sum::<u64>();
        if bytes > caps.max_bytes {
            return Err(StatementError::limit(
                LimitKind::ResultBytes,
                format!("the query returned more than {} bytes", caps.max_bytes),
            ));
        }
        rows.push(values);
    }
    Ok(StatementOutput::Rows(Rows { columns: columns.unwrap_or_default(), rows }))
}

/// A PostgreSQL string literal. Safe because every connection runs with
/// `standard_conforming_strings = on` (backslashes are plain characters) and
/// NUL, which PostgreSQL text cannot hold, is refused.
fn sql_literal(text: &str) -> Result<String, Rejection> {
    if text.contains('\0') {
        return Err(Rejection::Internal("a value to store contains a NUL character".into()));
    }
    Ok(format!("'{}'", text.replace('\'', "''")))
}

/// A PostgreSQL identifier in double quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Maps a database error on the host's own statements to its answer:
/// contention and outages are retryable (503), anything else is ours (500).
pub fn classify(error: sqlx::Error) -> Rejection {
    match &error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_contention(&code) {
                Rejection::Busy(db.message().to_owned())
            } else if is_unavailable(&code) {
                Rejection::DatabaseUnavailable(db.message().to_owned())
            } else {
                Rejection::Internal(format!("database error {code}: {}", db.message()))
            }
        }
        sqlx::Error::PoolTimedOut => {
            Rejection::DatabaseUnavailable(format!("no database connection became free within {ACQUIRE_TIMEOUT:?}"))
        }
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => {
            Rejection::DatabaseUnavailable(error.to_string())
        }
        _ => Rejection::Internal(error.to_string()),
    }
}

/// Whether a start-up failure is the database being out of reach (down,
/// restarting, refusing connections, the database or its role not created
/// yet) rather than a mistake waiting cannot cure: a malformed URL, a
/// migration that fails, a changed migration file.
pub fn is_transient(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| match cause.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default();
            is_unavailable(&code) || is_contention(&code)
        }
        Some(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed) => true,
        _ => false,
    })
}

/// Lock and serialization conflicts, statement timeouts (PostgreSQL), and
/// SQLITE_BUSY / SQLITE_LOCKED with their extended codes.
pub fn is_contention(code: &str) -> bool {
    matches!(code, "55P03" | "40001" | "40P01" | "57014")
        || code.parse::<u32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
}

/// The server is going away or refuses connections.
pub fn is_unavailable(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "3D000" | "28P01" | "28000")
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

    #[test]
    fn contention_codes() {
        assert!(is_contention("55P03"));
        assert!(is_contention("5"));
        assert!(is_contention("517"));
        assert!(!is_contention("23505"));
        assert!(!is_contention("19"));
    }
}
