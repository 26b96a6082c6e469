//! SQLite enforces the handler sandbox itself (issue 9): while a handler
//! holds the event's transaction, the connection carries SQLite's
//! authorizer (`sqlite3_set_authorizer`) and tighter limits
//! (`sqlite3_limit`), so a statement the SQL parser misread still cannot
//! reach past the handler's tables.
//!
//! # How it is wired (storage/event_tx.rs and tx/execute.rs, SQLite arms)
//!
//! - `EventTx::enter_handler`: in the same `lock_handle()` that sets the
//!   progress handler, call [`enter`] with the handler's
//!   `Arc<SqliteSandbox>` (built once at start-up from the same table list as
//!   its `Policy`, and `max_value_bytes` from the handler's limits), after
//!   [`SqliteSandbox::set_schema`] when `PRAGMA schema_version` changed.
//! - `EventTx::run_handler_statement`: before binding, lock the handle and
//!   call [`check_single_statement`] on the SQL the policy admitted; on
//!   `Err(message)` refuse the statement with that message (a policy
//!   refusal, not a database failure). Drop the handle guard, then run the
//!   statement with `sqlx::query(AssertSqlSafe(sql)).persistent(false)`.
//! - `EventTx::leave_handler`: call [`leave`] in the same `lock_handle()`
//!   that removes the progress handler. It must run whatever happened
//!   (error, trap, deadline), before the host's own statements (storing
//!   the answer, dead letters of several MiB).
//!
//! # Handler statements run non-persistent
//!
//! sqlx caches prepared statements per connection by SQL text for
//! persistent queries. SQLite expires every prepared statement when an
//! authorizer is installed (so a cached statement is re-prepared, and
//! authorized, on its next step), but handler statements must still run
//! with `.persistent(false)`: nothing the handler sends may be kept on the
//! connection for the host's later statements, and a cached statement
//! prepared without the authorizer must never be the handler's.
//!
//! # What the authorizer allows
//!
//! `SELECT`, `WITH RECURSIVE`; reads and writes (`SQLITE_READ`, `INSERT`,
//! `UPDATE`, `DELETE`) of the handler's own tables in database `main`
//! (names compared ASCII-case-insensitively; `sqlite_*` and `exactly_*`
//! never, even if listed); calls of the functions in [`FUNCTIONS`]. SQLite
//! reports reads of subquery or CTE columns, if at all, with no database
//! (they belong to no schema: `count(*)` over a CTE reads it with an empty
//! column), and such reads are allowed; a CTE
//! that shadows a real table by name is checked as the real table where it
//! is written to. Everything else is denied (`SQLITE_DENY`, the statement
//! fails to prepare with "not authorized"): transactions and savepoints,
//! `ATTACH`/`DETACH`, `PRAGMA`, every `CREATE`/`DROP`/`ALTER` (tables,
//! temp tables, triggers, views, indexes, virtual tables), `ANALYZE`,
//! `REINDEX`, `VACUUM` (it has no authorizer action; [`check_single_statement`]
//! refuses a statement during whose preparation no SELECT, READ, INSERT,
//! UPDATE or DELETE was authorized), any database but `main` (so `temp`
//! too), and table-valued functions: `json_each`, `json_tree`,
//! `pragma_*`, `dbstat` are eponymous virtual tables, no handler's table,
//! and are refused (tested: `SELECT * FROM json_each('[1]')` fails to
//! prepare). They would be harmless (`json_each` reads only its argument),
//! but allowing them means allowing table names that are not tables.
//!
//! # Limits
//!
//! While installed: `SQLITE_LIMIT_LENGTH` = the handler's
//! `max_value_bytes` (the largest string or blob, and row, a statement
//! may build or read: `hex(randomblob(5e8))`, `s || s` loops and
//! `group_concat` stop there with "string or blob too big"),
//! `SQLITE_LIMIT_SQL_LENGTH` = 64 KiB, `SQLITE_LIMIT_ATTACHED` = 0. [`leave`]
//! restores the previous values: the host stores dead letters of several
//! MiB on the same connection.
//!
//! `sqlite3_hard_heap_limit64` is deliberately not set here: it is
//! process-wide, shared by every connection and by the host's own
//! bookkeeping, so one handler reaching it would make other events'
//! claims and commits fail with `SQLITE_NOMEM`. What one statement can
//! allocate is bounded instead by the length limit (per value and row),
//! SQLite's page cache and sorter (bounded by `cache_size`, spilling to
//! temporary files), the row and byte caps on results, and the event
//! deadline (progress handler).

use std::collections::HashSet;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::{Arc, RwLock};
use std::sync::atomic::{AtomicBool, Ordering};

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

/// The largest SQL text a handler statement may have, in bytes.
pub const MAX_SQL_BYTES: c_int = 64 * 1024;

/// Functions a handler may call: SQLite's core scalar, aggregate, window,
/// date, math and JSON functions (lower case, as SQLite reports them).
/// Not here, so denied: `load_extension`, `readfile`, `writefile`, `edit`,
/// `fts3_tokenizer`, `sqlite_*`, `randomblob`, `zeroblob`, `printf` /
/// `format`, table-valued functions (`json_each`, `json_tree`), anything an
/// extension registers, and `changes`, `total_changes`, `last_insert_rowid`:
/// the one writer connection is shared by every handler and the host, so
/// they count or number other handlers' writes (use `RETURNING`).
pub const FUNCTIONS: &[&str] = &[
    // Core scalar functions.
    "abs",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "glob",
    "hex",
    "if",
    "ifnull",
    "iif",
    "instr",
    "length",
    "like",
    "likelihood",
    "likely",
    "lower",
    "ltrim",
    "max",
    "min",
    "nullif",
    "octet_length",
    "quote",
    "random",
    "replace",
    "round",
    "rtrim",
    "sign",
    "soundex",
    "substr",
    "substring",
    "trim",
    "typeof",
    "unhex",
    "unicode",
    "unistr",
    "unistr_quote",
    "unlikely",
    "upper",
    // Aggregates.
    "avg",
    "count",
    "group_concat",
    "string_agg",
    "sum",
    "total",
    // Window functions.
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // Date and time (CURRENT_TIMESTAMP and friends reach the authorizer
    // as functions of those names).
    "current_date",
    "current_time",
    "current_timestamp",
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
    // Math (when compiled in).
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "ceil",
    "ceiling",
    "cos",
    "cosh",
    "degrees",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "log2",
    "mod",
    "pi",
    "pow",
    "power",
    "radians",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
    // JSON (scalar and aggregate; `->` and `->>` are functions too).
    "json",
    "jsonb",
    "json_array",
    "jsonb_array",
    "json_array_length",
    "json_error_position",
    "json_extract",
    "jsonb_extract",
    "json_insert",
    "jsonb_insert",
    "json_object",
    "jsonb_object",
    "json_patch",
    "jsonb_patch",
    "json_pretty",
    "json_remove",
    "jsonb_remove",
    "json_replace",
    "jsonb_replace",
    "json_set",
    "jsonb_set",
    "json_type",
    "json_valid",
    "json_quote",
    "json_group_array",
    "jsonb_group_array",
    "json_group_object",
    "jsonb_group_object",
    "->",
    "->>",
];

/// Table name prefixes no handler may touch, whatever its table list says.
const RESERVED_PREFIXES: [&str; 2] = ["sqlite_", "exactly_"];

/// Name of the connection's client-data slot holding the installed guard.
const SLOT: &CStr = c"exactly.sqlite_guard";

/// What one handler may do: its tables and functions fixed at start-up, the
/// database's table list reread when the schema changes.
#[derive(Debug)]
pub struct SqliteSandbox {
    /// Lower-case names of the handler's tables.
    tables: HashSet<String>,
    /// Lower-case names of every table and view of the database, with the
    /// `schema_version` they were read at (see [`SqliteSandbox::set_schema`]).
    schema: RwLock<Schema>,
    functions: HashSet<&'static str>,
    max_value_bytes: c_int,
}

impl SqliteSandbox {
    /// `tables`: the handler's tables (its migrations' and its `uses`);
    /// `max_value_bytes`: the largest string, blob or row a statement may
    /// build (clamped to SQLite's `int` range, at least 1).
    pub fn new(tables: impl IntoIterator<Item = String>, max_value_bytes: u64) -> Self {
        SqliteSandbox {
            tables: tables.into_iter().map(|t| t.to_ascii_lowercase()).collect(),
            schema: RwLock::new(Schema { version: None, tables: HashSet::new() }),
            functions: FUNCTIONS.iter().copied().collect(),
            max_value_bytes: c_int::try_from(max_value_bytes).unwrap_or(c_int::MAX).max(1),
        }
    }

    /// The `PRAGMA schema_version` the sandbox's table list was read at
    /// (None before the first event).
    pub fn schema_version(&self) -> Option<i64> {
        self.schema.read().unwrap_or_else(|e| e.into_inner()).version
    }

    /// Every table and view the database has (`sqlite_master`) at
    /// `schema_version`, so that a read SQLite reports with no database
    /// (`count(*)` reads a real table that way, as it does a CTE) is told
    /// apart: a name that is a real table must be one of the handler's.
    /// DDL is denied to handlers, but another deployment's `exactly
    /// migrate` may add tables while this host runs: the host reads the
    /// schema version at every event and calls this when it changed
    /// ([`super::EventTx::enter_handler`]).
    pub fn set_schema(&self, schema_version: i64, tables: impl IntoIterator<Item = String>) {
        let tables = tables.into_iter().map(|t| t.to_ascii_lowercase()).collect();
        *self.schema.write().unwrap_or_else(|e| e.into_inner()) = Schema { version: Some(schema_version), tables };
    }

    fn allows_table(&self, table: Option<&str>, database: Option<&str>) -> bool {
        let (Some(table), Some("main")) = (table, database) else {
            return false;
        };
        let table = table.to_ascii_lowercase();
        !RESERVED_PREFIXES.iter().any(|prefix| table.starts_with(prefix)) && self.tables.contains(&table)
    }

    /// The authorizer's verdict on one action.
    fn allows(&self, action: c_int, arg1: Option<&str>, arg2: Option<&str>, database: Option<&str>) -> bool {
        match action {
            ffi::SQLITE_SELECT | ffi::SQLITE_RECURSIVE => true,
            // A read with no database: `count(*)` reports one for a CTE and
            // for a real table alike. A CTE name is any name that is not a
            // table of the database; a real table must be the handler's.
            ffi::SQLITE_READ if database.is_none() => arg1.is_some_and(|name| {
                let name = name.to_ascii_lowercase();
                let real = self.schema.read().unwrap_or_else(|e| e.into_inner()).tables.contains(&name)
                    || RESERVED_PREFIXES.iter().any(|prefix| name.starts_with(prefix));
                !real || self.allows_table(Some(&name), Some("main"))
            }),
            ffi::SQLITE_READ | ffi::SQLITE_INSERT | ffi::SQLITE_UPDATE | ffi::SQLITE_DELETE => {
                self.allows_table(arg1, database)
            }
            ffi::SQLITE_FUNCTION => {
                arg2.is_some_and(|name| self.functions.contains(name.to_ascii_lowercase().as_str()))
            }
            _ => false,
        }
    }
}

/// The database's tables and views as of one schema version.
#[derive(Debug)]
struct Schema {
    version: Option<i64>,
    tables: HashSet<String>,
}

/// What the connection's client-data slot owns while the guard is installed:
/// the sandbox (the authorizer's user pointer points here) and the limits
/// to restore.
struct Installed {
    sandbox: Arc<SqliteSandbox>,
    /// `(limit id, value before enter)`.
    previous_limits: Vec<(c_int, c_int)>,
    /// Set when the authorizer allows a SELECT, READ, INSERT, UPDATE or
    /// DELETE: a statement that prepares without any (`VACUUM`, which has
    /// no authorizer action) is no data statement.
    saw_data_action: AtomicBool,
}

/// Frees an `Installed` when the slot is cleared or the connection closes.
unsafe extern "C" fn drop_installed(pointer: *mut c_void) {
    if !pointer.is_null() {
        // SAFETY: the slot only ever holds pointers from `Box::into_raw` in
        // `enter`, and SQLite calls this once per stored pointer.
        drop(unsafe { Box::from_raw(pointer.cast::<Installed>()) });
    }
}

unsafe extern "C" fn authorize(
    user: *mut c_void,
    action: c_int,
    arg1: *const c_char,
    arg2: *const c_char,
    database: *const c_char,
    _trigger_or_view: *const c_char,
) -> c_int {
    let text = |p: *const c_char| {
        // SAFETY: SQLite passes NUL-terminated strings or NULL, valid for the call.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().ok()).flatten()
    };
    if user.is_null() {
        return ffi::SQLITE_DENY;
    }
    // SAFETY: `user` is the `Installed` owned by the connection's client-data
    // slot; `leave` removes the authorizer before it frees it, and `enter`
    // installs the new pointer before anything runs on the connection again.
    let installed = unsafe { &*user.cast::<Installed>() };
    if installed.sandbox.allows(action, text(arg1), text(arg2), text(database)) {
        if matches!(
            action,
            ffi::SQLITE_SELECT | ffi::SQLITE_READ | ffi::SQLITE_INSERT | ffi::SQLITE_UPDATE | ffi::SQLITE_DELETE
        ) {
            installed.saw_data_action.store(true, Ordering::Relaxed);
        }
        ffi::SQLITE_OK
    } else {
        ffi::SQLITE_DENY
    }
}

fn raw(handle: &mut LockedSqliteHandle<'_>) -> *mut ffi::sqlite3 {
    handle.as_raw_handle().as_ptr()
}

/// Installs the handler's authorizer and limits on the connection (call
/// before the handler's first statement).
pub fn enter(handle: &mut LockedSqliteHandle<'_>, sandbox: &Arc<SqliteSandbox>) {
    let db = raw(handle);
    // SAFETY: `db` is the live connection, locked for this thread by `handle`.
    let current = unsafe { ffi::sqlite3_get_clientdata(db, SLOT.as_ptr()) }.cast::<Installed>();
    let previous_limits = if current.is_null() {
        [ffi::SQLITE_LIMIT_LENGTH, ffi::SQLITE_LIMIT_SQL_LENGTH, ffi::SQLITE_LIMIT_ATTACHED]
            .into_iter()
            // SAFETY: a negative value only queries the limit.
            .map(|id| (id, unsafe { ffi::sqlite3_limit(db, id, -1) }))
            .collect()
    } else {
        // Entered twice without leaving: the values to restore are the
        // ones from before the first `enter`.
        // SAFETY: a non-null slot holds a live `Installed` (see `drop_installed`).
        unsafe { &*current }.previous_limits.clone()
    };
    let installed = Box::into_raw(Box::new(Installed {
        sandbox: Arc::clone(sandbox),
        previous_limits,
        saw_data_action: AtomicBool::new(false),
    }));
    // SAFETY: the slot takes ownership of `installed` (freed by
    // `drop_installed`, which also frees the one it replaces: nothing runs
    // on the connection before the authorizer below points at the new one).
    let rc = unsafe { ffi::sqlite3_set_clientdata(db, SLOT.as_ptr(), installed.cast(), Some(drop_installed)) };
    if rc != ffi::SQLITE_OK {
        // Out of memory: SQLite already called the destructor on `installed`.
        // Deny everything rather than run the handler unguarded.
        // SAFETY: a null user pointer makes `authorize` deny every action.
        unsafe { ffi::sqlite3_set_authorizer(db, Some(authorize), ptr::null_mut()) };
        return;
    }
    // SAFETY: `installed` lives in the slot until `leave` (or the
    // connection's close), both of which remove the authorizer first.
    unsafe {
        ffi::sqlite3_set_authorizer(db, Some(authorize), installed.cast());
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_LENGTH, sandbox.max_value_bytes);
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES);
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
    }
}

/// Removes the authorizer and restores the limits (the host's own statements
/// run without them). Must be called whatever happened; harmless without
/// a matching `enter`.
pub fn leave(handle: &mut LockedSqliteHandle<'_>) {
    let db = raw(handle);
    // SAFETY: `db` is the live connection, locked for this thread by
    // `handle`. The authorizer goes first, so it never sees a freed pointer.
    unsafe { ffi::sqlite3_set_authorizer(db, None, ptr::null_mut()) };
    // SAFETY: as above; a non-null slot holds a live `Installed`.
    let current = unsafe { ffi::sqlite3_get_clientdata(db, SLOT.as_ptr()) }.cast::<Installed>();
    if current.is_null() {
        return;
    }
    // SAFETY: `current` stays valid until the slot is cleared just below.
    for &(id, value) in unsafe { &*current }.previous_limits.iter() {
        // SAFETY: restoring a value SQLite reported for this connection.
        unsafe { ffi::sqlite3_limit(db, id, value) };
    }
    // SAFETY: clearing the slot calls `drop_installed` on `current`; the
    // reference above is no longer used.
    unsafe { ffi::sqlite3_set_clientdata(db, SLOT.as_ptr(), ptr::null_mut(), None) };
}

/// Finalizes a prepared statement when dropped.
struct Prepared(*mut ffi::sqlite3_stmt);

impl Drop for Prepared {
    fn drop(&mut self) {
        // SAFETY: a statement from `sqlite3_prepare_v3` (or NULL, a no-op),
        // finalized once.
        unsafe { ffi::sqlite3_finalize(self.0) };
    }
}

fn last_error(db: *mut ffi::sqlite3) -> String {
    // SAFETY: `sqlite3_errmsg` returns a NUL-terminated string owned by
    // the connection, valid until the next call on it; it is copied at once.
    let message = unsafe { ffi::sqlite3_errmsg(db) };
    if message.is_null() {
        return "SQLite refused the statement".into();
    }
    // SAFETY: non-null, NUL-terminated (see above).
    unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
}

/// `Ok` when `sql` is exactly one statement (nothing but whitespace and
/// comments after it) that SQLite prepares under the installed authorizer;
/// `Err(message)` otherwise, including an authorizer denial (SQLite's own
/// message, "not authorized"). Call it between [`enter`] and [`leave`].
pub fn check_single_statement(handle: &mut LockedSqliteHandle<'_>, sql: &str) -> Result<(), String> {
    if sql.contains('\0') {
        return Err("the statement contains a NUL character".into());
    }
    let db = raw(handle);
    // SAFETY: `db` is the live connection, locked for this thread by `handle`.
    let installed = unsafe { ffi::sqlite3_get_clientdata(db, SLOT.as_ptr()) }.cast::<Installed>();
    if installed.is_null() {
        return Err("the SQLite guard is not installed on this connection".into());
    }
    // SAFETY: a non-null slot holds a live `Installed`, freed only by
    // `leave` or `enter`, which need this same locked handle.
    let installed = unsafe { &*installed };
    let bytes = sql.as_bytes();
    let mut offset = 0;
    let mut statements = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let Ok(length) = c_int::try_from(rest.len()) else {
            return Err("the statement is too long".into());
        };
        let mut statement = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        installed.saw_data_action.store(false, Ordering::Relaxed);
        // SAFETY: `rest` outlives the call and SQLite reads at most `length`
        // bytes of it; `statement` and `tail` are out-pointers.
        let rc = unsafe { ffi::sqlite3_prepare_v3(db, rest.as_ptr().cast(), length, 0, &mut statement, &mut tail) };
        let prepared = Prepared(statement);
        if rc != ffi::SQLITE_OK {
            return Err(if statements == 0 {
                last_error(db)
            } else {
                format!("the string holds more than one statement ({})", last_error(db))
            });
        }
        // `tail` points into `rest`, at the first byte SQLite did not read.
        let consumed = (tail as usize).saturating_sub(rest.as_ptr() as usize).min(rest.len());
        if !prepared.0.is_null() {
            statements += 1;
            if statements > 1 {
                return Err("the string holds more than one statement; one call runs exactly one statement".into());
            }
            if !installed.saw_data_action.load(Ordering::Relaxed) {
                return Err("not a data statement: a handler may run only SELECT, INSERT, UPDATE and DELETE".into());
            }
        } else if consumed == 0 {
            return Err("SQLite cannot read the text after the statement".into());
        }
        offset += consumed;
    }
    if statements == 0 {
        return Err("the string holds no statement".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{AssertSqlSafe, Connection, Executor, SqliteConnection};
    use std::time::{Duration, Instant};

    const MAX_VALUE_BYTES: u64 = 1024 * 1024;

    async fn database() -> SqliteConnection {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        conn.execute(
            "CREATE TABLE own (k TEXT PRIMARY KEY, v INTEGER);
             CREATE TABLE other (x INTEGER);
             CREATE TABLE exactly_processed_events (source TEXT, id TEXT, data BLOB, PRIMARY KEY (source, id));
             INSERT INTO own VALUES ('a', 1), ('b', 2);
             INSERT INTO other VALUES (7);
             INSERT INTO exactly_processed_events VALUES ('s', '1', x'00');",
        )
        .await
        .unwrap();
        conn
    }

    fn sandbox() -> Arc<SqliteSandbox> {
        Arc::new(SqliteSandbox::new(["Own".to_string()], MAX_VALUE_BYTES))
    }

    /// One handler statement the way the host runs it: check, then (if the
    /// check passes) run it through sqlx, non-persistent. Returns the check's
    /// verdict and, separately, what sqlx alone makes of it under the guard.
    async fn run_as_handler(
        conn: &mut SqliteConnection,
        sandbox: &Arc<SqliteSandbox>,
        sql: &str,
    ) -> (Result<(), String>, Result<(), String>) {
        let mut handle = conn.lock_handle().await.unwrap();
        enter(&mut handle, sandbox);
        let check = check_single_statement(&mut handle, sql);
        drop(handle);
        // sqlx's SQLite driver loops forever on text after a NUL (and binds
        // nothing to a string without a statement): only the check sees those.
        let run = if sql.contains('\0') || sql.trim().is_empty() || sql.trim_start().starts_with("--") {
            Err("not run".to_owned())
        } else {
            sqlx::query(AssertSqlSafe(sql.to_owned()))
                .bind("a")
                .persistent(false)
                .fetch_all(&mut *conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        leave(&mut conn.lock_handle().await.unwrap());
        (check, run)
    }

    #[tokio::test]
    async fn sqlite_guard_refuses_what_is_not_the_handlers() {
        let mut conn = database().await;
        let sandbox = sandbox();
        let attach_path = std::env::temp_dir().join(format!("exactly-guard-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&attach_path);
        let attach = format!("ATTACH '{}' AS x", attach_path.display());
        let refused = [
            "SELECT * FROM other",
            "INSERT INTO exactly_processed_events (source, id) VALUES ('s', '2')",
            "UPDATE other SET x = 1",
            "DELETE FROM main.other",
            "SELECT * FROM sqlite_master",
            "SELECT * FROM sqlite_schema",
            attach.as_str(),
            "DETACH x",
            "PRAGMA writable_schema=1",
            "PRAGMA main.table_info(other)",
            "SELECT * FROM pragma_table_info('other')",
            "COMMIT",
            "ROLLBACK",
            "BEGIN",
            "END",
            "SAVEPOINT s",
            "RELEASE s",
            "CREATE TEMP TRIGGER t AFTER INSERT ON other BEGIN SELECT 1; END",
            "CREATE TEMP TABLE t(x)",
            "CREATE TABLE t(x)",
            "CREATE INDEX i ON own (v)",
            "CREATE VIEW w AS SELECT * FROM own",
            "CREATE VIRTUAL TABLE f USING fts5(x)",
            "DROP TABLE own",
            "ALTER TABLE own ADD COLUMN z",
            "ANALYZE",
            "REINDEX",
            "VACUUM",
            "VACUUM INTO '/tmp/exactly-guard-vacuum.db'",
            "SELECT load_extension('x')",
            "SELECT sqlite_version()",
            "SELECT printf('%.*c', 100000000, 'x')",
            "SELECT hex(zeroblob(500000000))",
            "SELECT hex(randomblob(500000000))",
            "SELECT 1; COMMIT",
            "SELECT 'a'; COMMIT; --'",
            "SELECT * FROM own WHERE k = 'a'; COMMIT; --'",
            "WITH other AS (SELECT 1) UPDATE other SET x=1",
            "WITH own AS (SELECT * FROM other) SELECT * FROM own",
            "SELECT * FROM own WHERE k IN (SELECT x FROM other)",
            "SELECT * FROM json_each('[1]')",
            "SELECT * FROM json_tree('[1]')",
            "SELECT * FROM temp.sqlite_master",
            "SELECT * FROM temp.own",
            "SELECT * FROM dbstat",
            "INSERT INTO own (k) VALUES ('z') RETURNING (SELECT x FROM other)",
            "SELECT 1\0; COMMIT",
            // Two statements the authorizer allows one by one: only the
            // check stops the second (sqlx would run both).
            "SELECT ?1; DELETE FROM own WHERE k = 'none'",
            "",
            "  -- only a comment",
        ];
        let mut tx = conn.begin().await.unwrap();
        for sql in refused {
            let started = Instant::now();
            let (check, run) = run_as_handler(&mut tx, &sandbox, sql).await;
            assert!(check.is_err(), "{sql:?} passed the check");
            // The wall holds without the check too, except for strings that
            // hold no statement at all.
            if sql != "SELECT ?1; DELETE FROM own WHERE k = 'none'" {
                assert!(run.is_err(), "{sql:?} ran under the guard");
            }
            assert!(started.elapsed() < Duration::from_secs(2), "{sql:?} took {:?}", started.elapsed());
        }
        // The transaction is still the host's: nothing committed, nothing changed.
        let other: i64 = sqlx::query_scalar("SELECT x FROM other").fetch_one(&mut *tx).await.unwrap();
        assert_eq!(other, 7);
        let events: i64 =
            sqlx::query_scalar("SELECT count(*) FROM exactly_processed_events").fetch_one(&mut *tx).await.unwrap();
        assert_eq!(events, 1);
        let own: i64 = sqlx::query_scalar("SELECT count(*) FROM own").fetch_one(&mut *tx).await.unwrap();
        assert_eq!(own, 2);
        let temp: i64 =
            sqlx::query_scalar("SELECT count(*) FROM temp.sqlite_master").fetch_one(&mut *tx).await.unwrap();
        assert_eq!(temp, 0);
        tx.rollback().await.unwrap();
        assert!(!attach_path.exists(), "ATTACH created {}", attach_path.display());
    }

    #[tokio::test]
    async fn sqlite_guard_admits_the_handlers_own_statements() {
        let mut conn = database().await;
        let sandbox = sandbox();
        let admitted = [
            "SELECT * FROM own WHERE k = ?1",
            "SELECT * FROM OWN WHERE k = ?1",
            "SELECT * FROM main.own WHERE k = ?1",
            "INSERT INTO own (k) VALUES (?1) ON CONFLICT (k) DO NOTHING RETURNING k",
            "UPDATE own SET v = v + 1 WHERE k <> ?1",
            "DELETE FROM own WHERE k = ?1",
            "SELECT ?1 AS p; -- a trailing comment",
            "SELECT ?1 AS p; /* a trailing comment */ ;",
            "WITH x AS (SELECT ?1 AS a) SELECT a FROM x",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r WHERE n < 10) SELECT n, ?1 FROM r",
            "SELECT count(*), max(k), lower(k), json_extract(v, '$.a'), datetime('now'), ?1 FROM own",
            "SELECT v -> '$', v ->> '$', hex(k), char(65), coalesce(v, 0), ?1 FROM own",
            "SELECT o.k, s.n FROM own o JOIN (SELECT k, count(*) AS n FROM own GROUP BY k) s ON s.k = o.k WHERE o.k = ?1",
            "SELECT k, row_number() OVER (ORDER BY v) FROM own WHERE k >= ?1",
            "DELETE FROM own WHERE ?1 IS NOT NULL",
        ];
        let mut tx = conn.begin().await.unwrap();
        for sql in admitted {
            let (check, run) = run_as_handler(&mut tx, &sandbox, sql).await;
            assert_eq!(check, Ok(()), "{sql:?}");
            assert_eq!(run, Ok(()), "{sql:?}");
        }
        tx.rollback().await.unwrap();
    }

    #[tokio::test]
    async fn sqlite_guard_limits_value_sizes_while_installed() {
        let mut conn = database().await;
        let sandbox = sandbox();
        let started = Instant::now();
        let doubling = "WITH RECURSIVE r(s) AS (SELECT 'aaaaaaaa' UNION ALL SELECT s || s FROM r WHERE length(s) < 1000000000) \
                        SELECT max(length(s)) FROM r WHERE ?1 IS NOT NULL";
        let (check, run) = run_as_handler(&mut conn, &sandbox, doubling).await;
        assert_eq!(check, Ok(()));
        let error = run.expect_err("a string past max_value_bytes");
        assert!(error.contains("too big"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let long = format!("SELECT ?1 /* {} */", "x".repeat(MAX_SQL_BYTES as usize));
        assert!(run_as_handler(&mut conn, &sandbox, &long).await.0.is_err());
    }

    #[tokio::test]
    async fn sqlite_guard_leave_gives_the_host_its_connection_back() {
        let mut conn = database().await;
        let sandbox = sandbox();
        let mut tx = conn.begin().await.unwrap();
        // Entered twice (a retry), left once: the limits before the first
        // enter come back.
        {
            let mut handle = tx.lock_handle().await.unwrap();
            enter(&mut handle, &sandbox);
            enter(&mut handle, &sandbox);
        }
        let (check, run) = run_as_handler(&mut tx, &sandbox, "SELECT * FROM exactly_processed_events").await;
        assert!(check.is_err() && run.is_err());
        // `run_as_handler` left; the host writes its own table and a 5 MiB blob.
        let blob = vec![7u8; 5 * 1024 * 1024];
        sqlx::query("INSERT INTO exactly_processed_events (source, id, data) VALUES ('s', '2', ?1)")
            .bind(&blob)
            .execute(&mut *tx)
            .await
            .unwrap();
        let stored: i64 = sqlx::query_scalar("SELECT length(data) FROM exactly_processed_events WHERE id = '2'")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(stored, blob.len() as i64);
        sqlx::query("SELECT hex(randomblob(16)), sqlite_version()").fetch_one(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        // A second leave is harmless.
        leave(&mut conn.lock_handle().await.unwrap());
    }

    /// The host's cached (persistent) statements: SQLite expires them when
    /// the authorizer is installed, so even the very text the host prepared
    /// earlier is re-authorized. Handler statements still run non-persistent.
    #[tokio::test]
    async fn sqlite_guard_reauthorizes_statements_the_host_cached() {
        let mut conn = database().await;
        let sandbox = sandbox();
        let sql = "SELECT x FROM other WHERE ?1 IS NOT NULL";
        sqlx::query(sql).bind("a").fetch_all(&mut conn).await.unwrap();
        {
            let mut handle = conn.lock_handle().await.unwrap();
            enter(&mut handle, &sandbox);
        }
        let cached = sqlx::query(sql).bind("a").fetch_all(&mut conn).await;
        assert!(cached.is_err(), "a cached statement ran under the guard");
        let fresh = sqlx::query(sql).bind("a").persistent(false).fetch_all(&mut conn).await;
        assert!(fresh.is_err());
        leave(&mut conn.lock_handle().await.unwrap());
        sqlx::query(sql).bind("a").fetch_all(&mut conn).await.unwrap();
    }

    #[test]
    fn sqlite_guard_sandbox_rules() {
        let sandbox = SqliteSandbox::new(["Own".to_string(), "exactly_x".to_string()], 10);
        sandbox.set_schema(1, ["own", "Other", "exactly_x"].map(String::from));
        assert!(sandbox.allows(ffi::SQLITE_READ, Some("OWN"), Some("k"), Some("main")));
        assert!(!sandbox.allows(ffi::SQLITE_READ, Some("own"), Some("k"), Some("temp")));
        // No database: `count(*)` over a CTE, or over a real table.
        assert!(sandbox.allows(ffi::SQLITE_READ, Some("own"), Some(""), None));
        assert!(sandbox.allows(ffi::SQLITE_READ, Some("some_cte"), Some(""), None));
        assert!(!sandbox.allows(ffi::SQLITE_READ, Some("other"), Some(""), None));
        assert!(!sandbox.allows(ffi::SQLITE_READ, Some("sqlite_master"), Some(""), None));
        assert!(!sandbox.allows(ffi::SQLITE_READ, Some("exactly_x"), Some(""), None));
        assert!(!sandbox.allows(ffi::SQLITE_READ, None, None, Some("main")));
        assert!(!sandbox.allows(ffi::SQLITE_INSERT, Some("exactly_x"), None, Some("main")));
        assert!(sandbox.allows(ffi::SQLITE_FUNCTION, None, Some("JSON_EXTRACT"), None));
        assert!(!sandbox.allows(ffi::SQLITE_FUNCTION, None, Some("randomblob"), None));
        // The shared writer's counters number other handlers' writes.
        for counter in ["changes", "total_changes", "last_insert_rowid"] {
            assert!(!sandbox.allows(ffi::SQLITE_FUNCTION, None, Some(counter), None), "{counter}");
        }
        assert!(!sandbox.allows(ffi::SQLITE_FUNCTION, None, None, None));
        assert!(!sandbox.allows(ffi::SQLITE_PRAGMA, Some("writable_schema"), None, None));
        assert_eq!(SqliteSandbox::new([], u64::MAX).max_value_bytes, c_int::MAX);
        assert_eq!(SqliteSandbox::new([], 0).max_value_bytes, 1);
    }
}
