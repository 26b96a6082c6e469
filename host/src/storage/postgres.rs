//! PostgreSQL: the database is the wall.
//!
//! Each handler's events run on a pool of its own whose sessions log in as
//! that handler's LOGIN role (`exactly_<digest>_<handler>`). The role is a
//! member of no other role and holds `SELECT, INSERT, UPDATE, DELETE` on
//! the handler's tables (those its migrations created, read from the
//! database, plus its `uses`), `USAGE` on their sequences, and `EXECUTE` on
//! the bookkeeping functions. No `SET ROLE`, `RESET ROLE`, `set_config` or
//! function call can give such a session more, because `RESET ROLE`
//! returns to the session user, which *is* the handler's role.
//!
//! The host's bookkeeping on that session (claiming the event, storing its
//! answer) goes through `exactly.claim_event` and `exactly.store_answer`
//! (`0006_claim_row.sql`), `SECURITY DEFINER` functions with a fixed
//! `search_path` that take only bound parameters: the claim only with the
//! event's proof (see [`ProofKey`]), the answer only into a claim the
//! calling transaction itself wrote, returning a receipt the host checks
//! ([`ProofKey::receipt`]). A handler that runs arbitrary SQL never sees a
//! proof, so it cannot claim, read or answer another event.
//!
//! Each handler's tables belong to a NOLOGIN owner role
//! (`exactly_<digest>_<handler>_owner`) and its migrations run under it:
//! a migration that alters or writes another handler's table fails with
//! PostgreSQL's own "must be owner" or "permission denied", and one that
//! names another handler's table in `CREATE TABLE IF NOT EXISTS` is
//! refused before it runs.
//!
//! Sessions come back to the pool clean: the event's COMMIT or ROLLBACK
//! travels in one round trip with the statements that undo what a
//! handler's statements could leave in the session ([`EventSession`]); a
//! session on which that fails is closed, never pooled again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgPool, Postgres, Row, Transaction};

use super::migrate::{check_applied, handler_tables, read_migrations, tables_created_by};
use super::{ACQUIRE_TIMEOUT, DbOptions, HOST_OWNER};
use crate::manifest::{HandlerSpec, Manifest};

pub(super) static HOST_MIGRATIONS: &[(&str, &str)] = &[
    ("0001_processed_events.sql", include_str!("../../migrations/postgres/0001_processed_events.sql")),
    ("0002_dead_letters.sql", include_str!("../../migrations/postgres/0002_dead_letters.sql")),
    ("0003_wall.sql", include_str!("../../migrations/postgres/0003_wall.sql")),
    ("0004_dead_letter_quota.sql", include_str!("../../migrations/postgres/0004_dead_letter_quota.sql")),
    ("0005_claim_in_flight.sql", include_str!("../../migrations/postgres/0005_claim_in_flight.sql")),
    ("0006_claim_row.sql", include_str!("../../migrations/postgres/0006_claim_row.sql")),
    ("0007_dead_letter_raw.sql", include_str!("../../migrations/postgres/0007_dead_letter_raw.sql")),
];

/// The 32-byte key of `exactly.secret`. A proof for `(source, id)` is
/// `sha256(key || sha256(sha256(source) || sha256(id)))`, computed the
/// same way by the bookkeeping functions. The inner digests give the key a
/// fixed-length message, so no length-extension of one proof yields
/// another.
pub struct ProofKey([u8; 32]);

impl ProofKey {
    pub fn proof(&self, source: &str, id: &str) -> Vec<u8> {
        let mut inner = Sha256::new();
        inner.update(Sha256::digest(source.as_bytes()));
        inner.update(Sha256::digest(id.as_bytes()));
        let mut outer = Sha256::new();
        outer.update(self.0);
        outer.update(inner.finalize());
        outer.finalize().to_vec()
    }

    /// What `exactly.store_answer` (`0006_claim_row.sql`) returns when it
    /// stored this answer in the event's claim row: `sha256(proof ‖
    /// "stored" ‖ status (i16, big-endian) ‖ reply present (i16) ‖
    /// sha256(reply or "") ‖ sha256(result))`. A statement of a handler's
    /// that took the place of the host's cached call cannot compute it,
    /// and one the handler obtained by answering its own claim matches only
    /// when it stored exactly this answer.
    pub fn receipt(proof: &[u8], status: i16, reply: Option<&str>, result: &str) -> Vec<u8> {
        let mut digest = Sha256::new();
        digest.update(proof);
        digest.update(b"stored");
        digest.update(status.to_be_bytes());
        digest.update(i16::from(reply.is_some()).to_be_bytes());
        digest.update(Sha256::digest(reply.unwrap_or("").as_bytes()));
        digest.update(Sha256::digest(result.as_bytes()));
        digest.finalize().to_vec()
    }

    /// The password of a handler's LOGIN role: derived from the key, so
    /// every replica computes the same one and none is stored anywhere.
    fn password(&self, login: &str) -> String {
        let mut digest = Sha256::new();
        digest.update(self.0);
        digest.update(b"\nexactly login password\n");
        digest.update(login.as_bytes());
        hex::encode(digest.finalize())
    }

    async fn read(executor: impl sqlx::PgExecutor<'_>) -> anyhow::Result<ProofKey> {
        let key: Vec<u8> = sqlx::query_scalar("SELECT key FROM exactly.secret")
            .fetch_one(executor)
            .await
            .context("cannot read exactly.secret (run `exactly migrate` with the host's account)")?;
        let key: [u8; 32] = key.try_into().map_err(|_| anyhow::anyhow!("exactly.secret does not hold 32 bytes"))?;
        Ok(ProofKey(key))
    }
}

/// The two roles of a handler. Roles belong to the whole cluster, so their
/// names carry a digest of the database name: two deployments on one
/// cluster never share a role. Handler names are at most 40 characters,
/// so the longest name is 63 bytes, PostgreSQL's limit.
#[derive(Debug, Clone)]
pub struct HandlerRoles {
    pub login: String,
    pub owner: String,
}

async fn role_prefix(executor: impl sqlx::PgExecutor<'_>) -> anyhow::Result<String> {
    let database: String = sqlx::query_scalar("SELECT current_database()::text").fetch_one(executor).await?;
    let digest = Sha256::digest(database.as_bytes());
    Ok(format!("exactly_{}_", hex::encode(&digest[..4])))
}

fn roles_of(prefix: &str, handler: &str) -> HandlerRoles {
    let login = format!("{prefix}{}", handler.replace('-', "_"));
    HandlerRoles { owner: format!("{login}_owner"), login }
}

/// Applies the host's schema and every handler's migrations, then sets up
/// each handler's roles and privileges; all in one transaction, which
/// holds a lock on `exactly.migrations` that no handler role can take (it
/// has no privilege on that table), so concurrent `migrate` runs queue.
pub(super) async fn migrate(pool: &PgPool, manifest: &Manifest) -> anyhow::Result<()> {
    bootstrap(pool).await?;
    let mut tx = pool.begin().await?;
    sqlx::raw_sql("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; LOCK TABLE exactly.migrations IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    for (name, sql) in HOST_MIGRATIONS {
        apply(&mut tx, HOST_OWNER, name, sql, None).await?;
    }
    let key = ProofKey::read(&mut *tx).await?;
    let prefix = role_prefix(&mut *tx).await?;
    for handler in &manifest.handlers {
        let roles = roles_of(&prefix, &handler.name);
        sqlx::query("SELECT exactly.prepare_handler_roles($1, $2, $3)")
            .bind(&roles.login)
            .bind(&roles.owner)
            .bind(key.password(&roles.login))
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot set up the roles of handler {} (the account needs CREATEROLE and to own the database)", handler.name))?;
        let Some(dir) = &handler.migrations else { continue };
        let files = read_migrations(&dir.join("postgres")).with_context(|| format!("migrations of handler {}", handler.name))?;
        claim_named_tables(&mut tx, manifest, handler, &roles, &prefix, &files).await?;
        for (name, sql) in &files {
            apply(&mut tx, &handler.name, name, sql, Some(&roles.owner)).await?;
        }
    }
    let owned = tables_by_owner(&mut *tx, manifest, &prefix).await?;
    for handler in &manifest.handlers {
        let roles = roles_of(&prefix, &handler.name);
        let tables = handler_tables(handler, &owned)?;
        sqlx::query("SELECT exactly.grant_handler_tables($1, $2)")
            .bind(&roles.login)
            .bind(&tables)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("cannot grant handler {} its tables", handler.name))?;
        ensure_cannot_create(&mut tx, &roles.login).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Creates the `exactly` schema and its migrations table. Two replicas
/// starting at once may race here; the loser retries and finds them.
async fn bootstrap(pool: &PgPool) -> anyhow::Result<()> {
    for attempt in 0.. {
        let created = async {
            let mut tx = pool.begin().await?;
            sqlx::raw_sql(
                "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0;
                 CREATE SCHEMA IF NOT EXISTS exactly;
                 CREATE TABLE IF NOT EXISTS exactly.migrations (
                     owner text NOT NULL, name text NOT NULL, sha256 bytea NOT NULL,
                     applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (owner, name))",
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
        .await;
        match created {
            Ok(()) => return Ok(()),
            Err(sqlx::Error::Database(db))
                if attempt < 5 && matches!(db.code().as_deref(), Some("23505" | "42P06" | "42P07")) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => return Err(error.into()),
        }
    }
    unreachable!()
}

/// Applies one migration file unless it was applied before (refusing a
/// file changed since); a handler's runs under its owner role.
async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    owner: &str,
    name: &str,
    sql: &str,
    run_as: Option<&str>,
) -> anyhow::Result<()> {
    let digest = Sha256::digest(sql.as_bytes()).to_vec();
    let applied: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT sha256 FROM exactly.migrations WHERE owner = $1 AND name = $2")
            .bind(owner)
            .bind(name)
            .fetch_optional(&mut **tx)
            .await?;
    if check_applied(owner, name, applied.as_deref(), &digest)? {
        return Ok(());
    }
    if let Some(role) = run_as {
        sqlx::query("SELECT set_config('role', $1, true)").bind(role).execute(&mut **tx).await?;
    }
    let ran = sqlx::raw_sql(AssertSqlSafe(sql.to_owned())).execute(&mut **tx).await;
    if run_as.is_some() {
        sqlx::raw_sql("RESET ROLE").execute(&mut **tx).await?;
    }
    ran.with_context(|| {
        format!("migration {name} of {owner} failed (a handler's migrations run as its owner role and may create and change only its own tables)")
    })?;
    sqlx::query("INSERT INTO exactly.migrations (owner, name, sha256) VALUES ($1, $2, $3)")
        .bind(owner)
        .bind(name)
        .bind(&digest)
        .execute(&mut **tx)
        .await?;
    tracing::info!(%owner, migration = %name, "migration applied");
    Ok(())
}

/// Before a handler's migrations run: every table they name in `CREATE
/// TABLE` / `CREATE VIEW` must be new or the handler's own. A table that
/// exists and belongs to another handler is refused (`CREATE TABLE IF NOT
/// EXISTS orders` would otherwise quietly "create" another handler's
/// table). A table still owned by the host's account, left by a version of
/// `exactly` that kept no owner roles, is handed to this handler's owner
/// role: that is the upgrade path.
async fn claim_named_tables(
    tx: &mut Transaction<'static, Postgres>,
    manifest: &Manifest,
    handler: &HandlerSpec,
    roles: &HandlerRoles,
    prefix: &str,
    files: &[(String, String)],
) -> anyhow::Result<()> {
    let owners: HashMap<String, String> =
        manifest.handlers.iter().map(|h| (roles_of(prefix, &h.name).owner, h.name.clone())).collect();
    for (name, sql) in files {
        let named = tables_created_by(super::Backend::Postgres, sql)
            .map_err(|e| anyhow::anyhow!("cannot read migration {name} of handler {}: {e}", handler.name))?;
        for table in named {
            let row = sqlx::query(
                "SELECT r.rolname::text AS owner, r.rolname = current_user AS ours
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner
                 WHERE n.nspname = 'public' AND c.relname = $1",
            )
            .bind(&table)
            .fetch_optional(&mut **tx)
            .await?;
            let Some(row) = row else { continue };
            let owner: String = row.try_get("owner")?;
            let ours: bool = row.try_get("ours")?;
            if owner == roles.owner {
                continue;
            }
            if let Some(other) = owners.get(&owner) {
                bail!(
                    "migration {name} of handler {} names table {table}, which belongs to handler {other}; \
                     a handler's migrations may create and change only its own tables (list it in `uses` to read and write it)",
                    handler.name
                );
            }
            if !ours {
                bail!(
                    "migration {name} of handler {} names table {table}, which belongs to role {owner}, not to exactly",
                    handler.name
                );
            }
            // The name reaches SQL text only through format('%I') on the server.
            reassign(tx, &table, &roles.owner).await?;
            tracing::info!(handler = %handler.name, %table, "table handed to the handler's owner role (upgrade)");
        }
    }
    Ok(())
}

async fn reassign(tx: &mut Transaction<'static, Postgres>, table: &str, owner: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT exactly.reassign_table($1, $2)")
        .bind(table)
        .bind(owner)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("cannot hand table {table} to role {owner}"))?;
    Ok(())
}

/// Each table of schema `public` owned by a handler's owner role, by
/// handler: ownership as the database records it.
async fn tables_by_owner(
    executor: impl sqlx::PgExecutor<'_>,
    manifest: &Manifest,
    prefix: &str,
) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let owners: HashMap<String, String> =
        manifest.handlers.iter().map(|h| (roles_of(prefix, &h.name).owner, h.name.clone())).collect();
    let rows = sqlx::query(
        "SELECT c.relname::text AS table_name, r.rolname::text AS owner
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_roles r ON r.oid = c.relowner
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
         ORDER BY 1",
    )
    .fetch_all(executor)
    .await?;
    let mut owned: HashMap<String, Vec<String>> = HashMap::new();
    for row in rows {
        let owner: String = row.try_get("owner")?;
        if let Some(handler) = owners.get(&owner) {
            owned.entry(handler.clone()).or_default().push(row.try_get("table_name")?);
        }
    }
    Ok(owned)
}

/// A handler's login role must not be able to create objects anywhere in
/// `public` (PostgreSQL before 15 grants CREATE on it to PUBLIC).
async fn ensure_cannot_create(tx: &mut Transaction<'static, Postgres>, login: &str) -> anyhow::Result<()> {
    if can_create(tx, login).await? {
        sqlx::raw_sql("SAVEPOINT revoke_public_create").execute(&mut **tx).await?;
        if sqlx::raw_sql("REVOKE CREATE ON SCHEMA public FROM PUBLIC").execute(&mut **tx).await.is_err() {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT revoke_public_create").execute(&mut **tx).await?;
        }
        sqlx::raw_sql("RELEASE SAVEPOINT revoke_public_create").execute(&mut **tx).await?;
        if can_create(tx, login).await? {
            bail!(
                "role {login} may create objects in schema public (PostgreSQL before 15 grants that to PUBLIC): \
                 run `REVOKE CREATE ON SCHEMA public FROM PUBLIC` as the schema's owner, then start again"
            );
        }
    }
    Ok(())
}

async fn can_create(tx: &mut Transaction<'static, Postgres>, login: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT has_schema_privilege($1, 'public', 'CREATE')")
        .bind(login)
        .fetch_one(&mut **tx)
        .await
}

/// Each handler's own tables, by handler, as the database records them
/// (after migrating).
pub(super) async fn read_owned_tables(pool: &PgPool, manifest: &Manifest) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let prefix = role_prefix(pool).await?;
    tables_by_owner(pool, manifest, &prefix).await
}

/// One pool per handler, logged in as its role, and the proof key.
pub struct HandlerPools {
    pub pools: HashMap<String, PgPool>,
    pub key: Arc<ProofKey>,
}

/// Settings a handler's sessions take from the host account's own session,
/// as start-up options: a role may `ALTER ROLE` itself `SET` a default, and
/// start-up options rank above role defaults (`RESET ALL` returns to them).
/// `synchronous_commit`: an event is answered only once durable;
/// the isolation and read-only defaults: the claim's semantics;
/// `idle_in_transaction_session_timeout`: the session must outlive the
/// handler's run between two statements.
const PINNED_SETTINGS: [&str; 5] = [
    "synchronous_commit",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "idle_in_transaction_session_timeout",
];

/// Opens (lazily) each handler's pool: the account's URL with the
/// handler's login role and derived password, and start-up settings no
/// role-level setting can override: the handler's statement timeout, the
/// lock timeout and [`PINNED_SETTINGS`].
pub(super) async fn handler_pools(
    host: &PgPool,
    manifest: &Manifest,
    options: &DbOptions,
    statement_timeouts: &HashMap<String, Duration>,
) -> anyhow::Result<HandlerPools> {
    let key = ProofKey::read(host).await?;
    let prefix = role_prefix(host).await?;
    // One round trip for all of them, in their order.
    let values: Vec<String> = sqlx::query_scalar(
        "SELECT current_setting(s.name) FROM unnest($1::text[]) WITH ORDINALITY AS s(name, position) ORDER BY s.position",
    )
    .bind(PINNED_SETTINGS)
    .fetch_all(host)
    .await
    .context("cannot read the host session's settings")?;
    let pinned: Vec<(&str, String)> = PINNED_SETTINGS.into_iter().zip(values).collect();
    let mut pools = HashMap::new();
    for handler in &manifest.handlers {
        let roles = roles_of(&prefix, &handler.name);
        let statement_timeout = statement_timeouts.get(&handler.name).copied().unwrap_or(options.statement_timeout);
        let connect = options
            .postgres()?
            .username(&roles.login)
            .password(&key.password(&roles.login))
            .application_name(&format!("exactly:{}", handler.name))
            .options(
                [
                    ("statement_timeout", format!("{}ms", statement_timeout.as_millis().max(1))),
                    ("lock_timeout", format!("{}ms", options.lock_timeout.as_millis())),
                ]
                .into_iter()
                .chain(pinned.iter().map(|(name, value)| (*name, value.clone()))),
            );
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(connect);
        // Log in once now: a server that refuses the role (pg_hba.conf)
        // should stop the start-up with its own words, not fail events.
        drop(pool.acquire().await.with_context(|| {
            format!(
                "handler {} cannot log in as its role {} (pg_hba.conf must let it log in with a password; run `exactly migrate` first)",
                handler.name, roles.login
            )
        })?);
        pools.insert(handler.name.clone(), pool);
    }
    Ok(HandlerPools { pools, key: Arc::new(key) })
}

/// `exactly.reset_session` (`0005_claim_in_flight.sql`, read once in
/// `0006_claim_row.sql`) undoes, inside the event's transaction and
/// before its COMMIT, what a handler's statements may leave in the session:
/// the role and every setting (back to the start-up values, so the COMMIT
/// itself runs with the host's `synchronous_commit` whatever the handler
/// set), temporary tables, sequence caches, `LISTEN`s, cursors, advisory
/// locks (released at once), large objects and SQL-level prepared
/// statements.
///
/// With it, the transaction's id: it must still be the one that claimed the
/// event (a handler that ended the event's transaction itself leaves this
/// batch in another one, and its own COMMIT was not the host's).
const RESET_AND_COMMIT: &str =
    "SELECT exactly.reset_session(), pg_catalog.pg_current_xact_id_if_assigned()::pg_catalog.text; COMMIT";
/// The same after a ROLLBACK (only a warning when the handler's statements
/// already ended the transaction).
const ROLLBACK_AND_RESET: &str = "ROLLBACK; SELECT exactly.reset_session()";

/// One event's transaction on a session of its handler's pool, with the
/// key that proves its claim to the bookkeeping functions. BEGIN, the
/// claim, the handler's statements, the answer, then COMMIT or ROLLBACK
/// together with the session's reset, in one round trip
/// ([`EventSession::finish`]). A session whose reset fails, whose answer
/// came back without the host's receipt, or whose event was dropped before
/// it finished, closes its connection instead of pooling it (the server
/// rolls back what was open).
pub struct EventSession {
    connection: Option<PoolConnection<Postgres>>,
    pub(super) key: Arc<ProofKey>,
    /// The session's server process, read with the claim (the host cancels
    /// its statement when the event's deadline passes).
    pub(super) backend_pid: Option<i32>,
    /// Set when this transaction claimed its event (`exactly.claim_event`
    /// inserted the claim row `exactly.store_answer` answers).
    pub(super) claim: Option<OwnClaim>,
    /// A handler statement failed with SQLSTATE `0A000` (on a cached
    /// statement: "cached plan must not change result type", a migration
    /// changed a table under it): the session is closed and the event may
    /// run once more on a fresh one ([`super::EventTx::stale_statement`]).
    pub(crate) stale: bool,
    /// A host statement on this session did not do what the host sent
    /// (a handler replaced it): never pool the session again.
    pub(crate) tainted: bool,
}

/// The claim this transaction holds.
pub(super) struct OwnClaim {
    /// The event's proof (computed once: the receipt is derived from it).
    pub proof: Vec<u8>,
    /// The id of the transaction that claimed the event, as text; the
    /// COMMIT must run in it.
    pub xact: Option<String>,
}

impl EventSession {
    pub(super) async fn begin(pool: &PgPool, key: Arc<ProofKey>) -> Result<EventSession, sqlx::Error> {
        let mut connection = pool.acquire().await?;
        if let Err(error) = sqlx::raw_sql("BEGIN").execute(&mut *connection).await {
            drop(connection.detach());
            return Err(error);
        }
        Ok(EventSession { connection: Some(connection), key, backend_pid: None, claim: None, stale: false, tainted: false })
    }

    pub(crate) fn connection(&mut self) -> &mut PgConnection {
        self.connection.as_mut().expect("an event session is used only until it finishes")
    }

    /// COMMIT (`commit`) or ROLLBACK, with the session's reset. The session
    /// goes back to the pool only when it is not tainted and the driver's
    /// prepared statements on the server are still the ones it has cached:
    /// a handler that dropped one (`DEALLOCATE`) would make the host's next
    /// statement on it fail.
    /// Returns false when the COMMIT was not the event's: a handler ended
    /// the event's transaction itself before it.
    pub(super) async fn finish(mut self, commit: bool) -> Result<bool, sqlx::Error> {
        let batch = if commit { RESET_AND_COMMIT } else { ROLLBACK_AND_RESET };
        // fetch_all: every statement of the batch, COMMIT included, has
        // completed when this returns.
        let rows = sqlx::raw_sql(batch).fetch_all(self.connection()).await?;
        let driver: Option<i64> = rows.first().map(|row| row.try_get(0)).transpose()?;
        let committed_in: Option<String> = if commit { rows.first().map(|row| row.try_get(1)).transpose()?.flatten() } else { None };
        let cached = self.connection().cached_statements_size();
        let claimed_in = self.claim.as_ref().and_then(|claim| claim.xact.as_ref());
        let ended_early = commit && (claimed_in.is_none() || committed_in.as_ref() != claimed_in);
        if ended_early {
            self.tainted = true;
        }
        if !self.tainted && driver.is_some_and(|driver| driver == cached as i64) {
            // Clean: back to the pool.
            drop(self.connection.take());
        } else {
            tracing::warn!(
                server = ?driver,
                cached,
                tainted = self.tainted,
                stale = self.stale,
                ended_early,
                "closing the event's session: a handler's statements replaced or dropped the driver's prepared statements, \
                 a cached statement went stale, or the handler ended the transaction"
            );
            // Drop detaches it.
        }
        Ok(!ended_early)
    }
}

impl Drop for EventSession {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            // Never pooled again: closing the socket makes the server roll
            // back whatever the session had open.
            drop(connection.detach());
        }
    }
}
