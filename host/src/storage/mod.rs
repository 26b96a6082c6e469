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
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Connection, PgPool, Row, Sqlite, SqlitePool, Transaction};

use crate::answer::{Committed, ReplyEvent};
use crate::rejection::{LimitKind, Rejection};
use crate::convert::{self, Rows, StatementError, StatementOutput, Value};
use crate::decode::CloudEvent;
use crate::manifest::Manifest;

pub mod class;
pub mod postgres;
pub mod sqlite_guard;

pub use class::ErrorClass;

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

/// One event's open transaction: on PostgreSQL on the handler's own
/// session, with the key that proves its claim to the bookkeeping
/// functions; on SQLite with the handler's turn at the writer.
pub enum EventTx {
    Postgres(postgres::EventSession),
    Sqlite(Transaction<'static, Sqlite>, Option<tokio::sync::OwnedSemaphorePermit>),
}

/// The outcome of claiming `(source, id)`.
pub enum Claim {
    /// This delivery owns the event: run the handler.
    Owned,
    /// The event was committed before; here is what was stored.
    Duplicate { payload_sha256: Vec<u8>, answer: Box<Committed> },
}

/// Owner name under which the host's own migrations are recorded; handler
/// names start with a letter, so they cannot collide with it.
const HOST_OWNER: &str = "(host)";
/// How long an event waits for a pooled connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

static HOST_MIGRATIONS_SQLITE: &[(&str, &str)] = &[
    ("0001_processed_events.sql", include_str!("../../migrations/sqlite/0001_processed_events.sql")),
    ("0002_dead_letters.sql", include_str!("../../migrations/sqlite/0002_dead_letters.sql")),
    ("0003_table_owners.sql", include_str!("../../migrations/sqlite/0003_table_owners.sql")),
    ("0004_dead_letter_quota.sql", include_str!("../../migrations/sqlite/0004_dead_letter_quota.sql")),
    ("0005_dead_letter_raw.sql", include_str!("../../migrations/sqlite/0005_dead_letter_raw.sql")),
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

/// A handler's tables: its own, and those it lists in `uses`, each of
/// which must be some handler's table.
fn handler_tables(handler: &crate::manifest::HandlerSpec, owned: &HashMap<String, Vec<String>>) -> anyhow::Result<Vec<String>> {
    let mut tables = owned.get(&handler.name).cloned().unwrap_or_default();
    for used in &handler.uses {
        let used = used.to_ascii_lowercase();
        if !owned.values().flatten().any(|table| *table == used) {
            bail!(
                "handler {} lists table {used:?} in `uses`, but no handler's migrations created it",
                handler.name
            );
        }
        tables.push(used);
    }
    tables.sort();
    tables.dedup();
    Ok(tables)
}

/// SQLite's migrations. A handler's tables are those that appear in
/// `sqlite_master` while its migration runs; a migration that names a
/// table another handler owns, or changes the schema of one, is refused.
async fn migrate_sqlite(pool: &SqlitePool, manifest: &Manifest) -> anyhow::Result<()> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS exactly_migrations (
             owner TEXT NOT NULL, name TEXT NOT NULL, sha256 BLOB NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
             PRIMARY KEY (owner, name))",
    )
    .execute(&mut *tx)
    .await?;
    let mut plan: Vec<(String, String, String)> = HOST_MIGRATIONS_SQLITE
        .iter()
        .map(|(name, sql)| (HOST_OWNER.to_owned(), (*name).to_owned(), (*sql).to_owned()))
        .collect();
    for handler in &manifest.handlers {
        if let Some(dir) = &handler.migrations {
            for (name, sql) in
                read_migrations(&dir.join("sqlite")).with_context(|| format!("migrations of handler {}", handler.name))?
            {
                plan.push((handler.name.clone(), name, sql));
            }
        }
    }
    for (owner, name, sql) in plan {
        let is_handler = owner != HOST_OWNER;
        if is_handler {
            claim_named_sqlite_tables(&mut tx, &owner, &name, &sql).await?;
        }
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
        let before = sqlite_schema(&mut tx).await?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {name} of {owner} failed"))?;
        if is_handler {
            let after = sqlite_schema(&mut tx).await?;
            let owners: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
                "SELECT lower(table_name), handler FROM exactly_table_owners",
            )
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
            for (key, entry) in &after {
                let other = owners.get(&entry.table).filter(|h| **h != owner);
                if let Some(other) = other
                    && before.get(key) != Some(entry)
                {
                    bail!("migration {name} of handler {owner} changes {key} on table {}, which belongs to handler {other}", entry.table);
                }
            }
            for (key, entry) in &before {
                if let Some(other) = owners.get(&entry.table).filter(|h| **h != owner)
                    && !after.contains_key(key)
                {
                    bail!("migration {name} of handler {owner} drops {key} of table {}, which belongs to handler {other}", entry.table);
                }
            }
            for (key, entry) in &after {
                if entry.is_table && !before.contains_key(key) {
                    sqlx::query("INSERT INTO exactly_table_owners (table_name, handler) VALUES (?1, ?2)")
                        .bind(&entry.table)
                        .bind(&owner)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query("INSERT INTO exactly_migrations (owner, name, sha256) VALUES (?1, ?2, ?3)")
            .bind(&owner)
            .bind(&name)
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        tracing::info!(%owner, migration = %name, "migration applied");
    }
    tx.commit().await?;
    Ok(())
}

/// One object of `sqlite_master`: the table it belongs to and its SQL.
#[derive(PartialEq, Eq)]
struct SchemaEntry {
    table: String,
    is_table: bool,
    sql: Option<String>,
}

/// `sqlite_master` by `type:name`, names lower-cased.
async fn sqlite_schema(tx: &mut Transaction<'static, Sqlite>) -> anyhow::Result<HashMap<String, SchemaEntry>> {
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT type, lower(name), lower(tbl_name), sql FROM sqlite_master")
            .fetch_all(&mut **tx)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(kind, name, table, sql)| {
            let is_table = kind == "table" || kind == "view";
            (format!("{kind} {name}"), SchemaEntry { table, is_table, sql })
        })
        .collect())
}

/// Before a handler's SQLite migration: every table it names in `CREATE
/// TABLE` / `CREATE VIEW` must be new or its own. A table that exists with
/// no recorded owner was left by a version of exactly that kept no owners:
/// it becomes this handler's (the upgrade path).
async fn claim_named_sqlite_tables(
    tx: &mut Transaction<'static, Sqlite>,
    handler: &str,
    name: &str,
    sql: &str,
) -> anyhow::Result<()> {
    let named = crate::policy::tables_created_by(Backend::Sqlite, sql)
        .map_err(|e| anyhow::anyhow!("cannot read migration {name} of handler {handler}: {e}"))?;
    for table in named {
        let owner: Option<String> = sqlx::query_scalar("SELECT handler FROM exactly_table_owners WHERE table_name = ?1")
            .bind(&table)
            .fetch_optional(&mut **tx)
            .await?;
        match owner {
            Some(owner) if owner == handler => {}
            Some(other) => bail!(
                "migration {name} of handler {handler} names table {table}, which belongs to handler {other}; \
                 a handler's migrations may create and change only its own tables (list it in `uses` to read and write it)"
            ),
            None => {
                let exists: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE)",
                )
                .bind(&table)
                .fetch_one(&mut **tx)
                .await?;
                if exists {
                    sqlx::query("INSERT INTO exactly_table_owners (table_name, handler) VALUES (?1, ?2)")
                        .bind(&table)
                        .bind(handler)
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
    }
    Ok(())
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
    /// On PostgreSQL the claim is one call of `exactly.claim_event` on the
    /// handler's own session, with the event's proof bound as a parameter.
    pub async fn claim(&mut self, event: &CloudEvent, handler: &str, payload_sha256: &[u8]) -> Result<Claim, Rejection> {
        let stored: (Vec<u8>, Option<i16>, Option<String>) = match self {
            EventTx::Postgres(session) => {
                let proof = session.key.proof(&event.source, &event.id);
                // SQL PREPARE and DEALLOCATE share the namespace of the
                // driver's named statements, so a handler could replace a
                // cached statement of the host's and have it bind the event's
                // proof into the handler's SQL. The claim (and the read of a
                // committed answer) may be cached: they run before the
                // handler, on a session where `exactly.reset_session` left
                // no statement of a handler's (`EventSession::finish`).
                let (claimed, backend_pid, xact): (Option<bool>, i32, Option<String>) = sqlx::query_as(
                    "SELECT exactly.claim_event($1, $2, $3, $4, $5, $6), pg_backend_pid(), pg_current_xact_id_if_assigned()::text",
                )
                        .bind(&event.source)
                        .bind(&event.id)
                        .bind(&proof)
                        .bind(&event.ty)
                        .bind(handler)
                        .bind(payload_sha256)
                        .fetch_one(session.connection())
                        .await
                        .map_err(classify)?;
                session.backend_pid = Some(backend_pid);
                if claimed == Some(true) {
                    session.claim = Some(postgres::OwnClaim { proof, xact });
                    return Ok(Claim::Owned);
                }
                let row = sqlx::query("SELECT payload_sha256, status, reply FROM exactly.committed_answer($1, $2, $3)")
                    .bind(&event.source)
                    .bind(&event.id)
                    .bind(&proof)
                    .fetch_optional(session.connection())
                    .await
                    .map_err(classify)?
                    .ok_or_else(|| Rejection::Internal("a committed event's row is gone".into()))?;
                (
                    row.try_get::<Option<Vec<u8>>, _>("payload_sha256").map_err(classify)?.unwrap_or_default(),
                    row.try_get("status").map_err(classify)?,
                    row.try_get("reply").map_err(classify)?,
                )
            }
            EventTx::Sqlite(tx, _) => {
                let inserted = sqlx::query(
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
                .map_err(classify)?
                .rows_affected();
                if inserted == 1 {
                    return Ok(Claim::Owned);
                }
                let row = sqlx::query(
                    "SELECT payload_sha256, status, reply FROM exactly_processed_events WHERE source = ?1 AND id = ?2",
                )
                .bind(&event.source)
                .bind(&event.id)
                .fetch_one(&mut **tx)
                .await
                .map_err(classify)?;
                (
                    row.try_get("payload_sha256").map_err(classify)?,
                    row.try_get("status").map_err(classify)?,
                    row.try_get("reply").map_err(classify)?,
                )
            }
        };
        let (payload_sha256, status, reply) = stored;
        let status = status.ok_or_else(|| Rejection::Internal("a committed event has no stored answer".into()))?;
        let reply = reply
            .map(|text| serde_json::from_str::<ReplyEvent>(&text))
            .transpose()
            .map_err(|e| Rejection::Internal(format!("stored reply cannot be read: {e}")))?;
        Ok(Claim::Duplicate { payload_sha256, answer: Box::new(Committed { status: status as u16, reply }) })
    }

    /// Stores the answer in the claim row. Either way it is a statement that
    /// fails in an aborted transaction, which proves the transaction alive
    /// right before COMMIT (an aborted PostgreSQL transaction would
    /// otherwise let COMMIT quietly roll back). On PostgreSQL
    /// `exactly.store_answer` updates only a claim this transaction wrote
    /// (it raises otherwise) and returns a receipt of the answer, checked
    /// here; on SQLite the UPDATE of the claim row must find exactly that
    /// row. Every value is a bound parameter: nothing here depends on a
    /// setting the handler could have changed.
    pub async fn store_answer(&mut self, event: &CloudEvent, answer: &Committed, result: &str) -> Result<(), Rejection> {
        let reply = answer
            .reply
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Rejection::Internal(e.to_string()))?;
        let status = answer.status as i16;
        match self {
            EventTx::Postgres(session) => {
                let Some(claim) = &session.claim else {
                    return Err(Rejection::Internal("an answer to store for an event this transaction did not claim".into()));
                };
                let expected = postgres::ProofKey::receipt(&claim.proof, status, reply.as_deref(), result);
                // Runs after the handler's statements, so it may run a
                // statement of the handler's that took the name of the
                // host's cached one: it takes no secret (the function finds
                // the claim this transaction wrote by itself), and only the
                // real function, having stored exactly this answer, returns
                // its receipt. (Whether the transaction is still the
                // event's is checked with the COMMIT: `EventSession::finish`.)
                let receipt: Option<Vec<u8>> = sqlx::query_scalar("SELECT exactly.store_answer($1, $2, $3, $4, $5)")
                    .bind(&event.source)
                    .bind(&event.id)
                    .bind(status)
                    .bind(reply.as_deref())
                    .bind(result)
                    .fetch_optional(session.connection())
                    .await
                    .map_err(|error| {
                        // A server's refusal leaves the session as it was;
                        // an answer of another shape came from another
                        // statement.
                        if !matches!(error, sqlx::Error::Database(_)) {
                            session.tainted = true;
                        }
                        classify(error)
                    })?
                    .flatten();
                if receipt.as_deref() != Some(expected.as_slice()) {
                    session.tainted = true;
                    return Err(Rejection::Internal(
                        "the event's answer was not stored by the host's statement (a handler replaced it)".into(),
                    ));
                }
                Ok(())
            }
            EventTx::Sqlite(tx, _) => {
                let updated = sqlx::query(
                    "UPDATE exactly_processed_events SET status = ?3, reply = ?4, result = ?5 WHERE source = ?1 AND id = ?2",
                )
                .bind(&event.source)
                .bind(&event.id)
                .bind(status)
                .bind(reply)
                .bind(result)
                .execute(&mut **tx)
                .await
                .map_err(classify)?
                .rows_affected();
                if updated == 1 {
                    Ok(())
                } else {
                    Err(Rejection::Internal(format!("storing the answer updated {updated} rows instead of 1")))
                }
            }
        }
    }

    /// A handler statement failed because the session's cached statement
    /// no longer fits the schema (PostgreSQL, SQLSTATE `0A000`): the
    /// session will be closed, and the event is worth one more run on a
    /// fresh session, whose statements are prepared anew.
    pub fn stale_statement(&self) -> bool {
        match self {
            EventTx::Postgres(session) => session.stale,
            EventTx::Sqlite(..) => false,
        }
    }

    /// The PostgreSQL server process of this event's session, once claimed.
    pub fn backend_pid(&self) -> Option<i32> {
        match self {
            EventTx::Postgres(session) => session.backend_pid,
            EventTx::Sqlite(..) => None,
        }
    }

    pub async fn commit(self) -> Result<(), Rejection> {
        match self {
            EventTx::Postgres(session) => match session.finish(true).await.map_err(classify)? {
                true => Ok(()),
                false => Err(Rejection::Internal(
                    "the event's transaction was ended by its handler before the host's COMMIT".into(),
                )),
            },
            EventTx::Sqlite(tx, _) => tx.commit().await.map_err(classify),
        }
    }

    pub async fn rollback(self) {
        let result = match self {
            EventTx::Postgres(session) => session.finish(false).await.map(drop),
            EventTx::Sqlite(tx, _) => tx.rollback().await,
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
            EventTx::Postgres(session) => {
                // Cached per text and parameter kinds (see there).
                let text = convert::postgres_statement_text(&sql, &params);
                let query = convert::bind_postgres(sqlx::query(AssertSqlSafe(text)), params)?;
                let ran = if want_rows {
                    let stream = query.fetch(session.connection());
                    collect_rows(stream, caps, convert::row_from_postgres).await
                } else {
                    query
                        .execute(session.connection())
                        .await
                        .map(|done| StatementOutput::Affected(done.rows_affected()))
                        .map_err(StatementError::from_sqlx)
                };
                if let Err(failed) = &ran
                    && failed.error.code.as_deref() == Some("0A000")
                {
                    session.stale = true;
                    session.tainted = true;
                }
                ran
            }
            EventTx::Sqlite(tx, _) => {
                // Exactly one statement, prepared under the handler's
                // authorizer: sqlx would run every statement of the text.
                {
                    let mut handle = tx.lock_handle().await.map_err(StatementError::from_sqlx)?;
                    sqlite_guard::check_single_statement(&mut handle, &sql).map_err(StatementError::refused)?;
                }
                // Never from the connection's statement cache: a handler
                // that sent the very text of one of the host's statements
                // would otherwise run the host's compiled statement, which
                // SQLite's authorizer never saw.
                let query = convert::bind_sqlite(sqlx::query(AssertSqlSafe(sql)).persistent(false), params)?;
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

    /// Hands the transaction to a handler. On SQLite, install the handler's
    /// authorizer and limits ([`sqlite_guard`]) and a progress handler that
    /// interrupts any statement once the event's deadline has passed
    /// (SQLite has no statement timeout of its own); without a sandbox for
    /// the handler, every handler statement is refused. On PostgreSQL the
    /// session already is the handler's, with its statement timeout.
    pub async fn enter_handler(
        &mut self,
        deadline: Instant,
        sandbox: Option<&Arc<sqlite_guard::SqliteSandbox>>,
    ) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx, _) = self {
            if let Some(sandbox) = sandbox {
                // Tables another deployment's migrate added since the last
                // event (the write lock is held: no schema change until COMMIT).
                let version: i64 = sqlx::query_scalar("PRAGMA schema_version").fetch_one(&mut **tx).await.map_err(classify)?;
                if sandbox.schema_version() != Some(version) {
                    let tables: Vec<String> =
                        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
                            .fetch_all(&mut **tx)
                            .await
                            .map_err(classify)?;
                    sandbox.set_schema(version, tables);
                }
            }
            let mut handle = tx.lock_handle().await.map_err(classify)?;
            if let Some(sandbox) = sandbox {
                sqlite_guard::enter(&mut handle, sandbox);
            }
            handle.set_progress_handler(10_000, move || Instant::now() < deadline);
        }
        Ok(())
    }

    /// Takes the transaction back from the handler.
    pub async fn leave_handler(&mut self) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx, _) = self {
            let mut handle = tx.lock_handle().await.map_err(classify)?;
            handle.remove_progress_handler();
            sqlite_guard::leave(&mut handle);
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
/// `42501` among them), a changed migration file.
pub fn is_transient(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<sqlx::Error>().is_some_and(|error| ErrorClass::of(error).is_transient()))
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
