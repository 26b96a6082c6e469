//! The SQL statement policy: what a handler may run in the event's
//! transaction, decided by parsing (`sqlparser`) before the statement
//! reaches the database.
//!
//! Admitted: exactly one SELECT, INSERT, UPDATE or DELETE per call (with
//! CTEs, RETURNING, ON CONFLICT). Everything else is refused, above all
//! anything that would end the transaction the host owns (COMMIT, ROLLBACK,
//! SAVEPOINT, several statements in one string), any reference to the
//! host's own tables or the system catalogs, and any table that is not the
//! handler's own (created by its migrations) or declared in its `uses`.
//!
//! Handlers use `$1, $2, …` placeholders on both backends; for SQLite the
//! admitted SQL is rewritten to `?1, ?2, …` (SQLite would number `$n`
//! parameters by first appearance, not by `n`).
//!
//! Handlers run the same few statements over and over, so verdicts are
//! cached by SQL text: the parser runs once per distinct statement.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, RwLock};

use sqlparser::ast::{ObjectName, Query, SetExpr, Statement, Visit, Visitor, visit_relations};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::storage::Backend;

/// `Ok`: the SQL to send to the database. `Err`: why it is refused.
pub type Verdict = Result<Arc<str>, Arc<str>>;

const CACHE_CAPACITY: usize = 4096;

/// Schemas and name prefixes a handler may never reference.
const RESERVED_SCHEMAS: [&str; 4] = ["exactly", "pg_catalog", "information_schema", "pg_toast"];
const RESERVED_PREFIXES: [&str; 3] = ["exactly_", "sqlite_", "pg_"];

pub struct Policy {
    backend: Backend,
    /// Lower-case names of the tables the handler may use.
    tables: HashSet<String>,
    cache: RwLock<HashMap<Box<str>, Verdict>>,
}

impl Policy {
    pub fn new(backend: Backend, tables: impl IntoIterator<Item = String>) -> Self {
        let tables = tables.into_iter().map(|t| t.to_ascii_lowercase()).collect();
        Policy { backend, tables, cache: RwLock::new(HashMap::new()) }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn check(&self, sql: &str) -> Verdict {
        if let Some(verdict) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return verdict.clone();
        }
        let verdict = match judge(self.backend, &self.tables, sql) {
            Ok(sql) => Ok(Arc::from(sql)),
            Err(reason) => Err(Arc::from(reason)),
        };
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(sql.into(), verdict.clone());
        verdict
    }
}

fn dialect(backend: Backend) -> &'static dyn Dialect {
    match backend {
        Backend::Postgres => &PostgreSqlDialect {},
        Backend::Sqlite => &SQLiteDialect {},
    }
}

fn judge(backend: Backend, tables: &HashSet<String>, sql: &str) -> Result<String, String> {
    let dialect = dialect(backend);
    // SQLite stops reading at a NUL, and sqlx's SQLite driver then loops
    // forever on the text after it.
    if sql.contains('\0') {
        return Err("the statement contains a NUL character".into());
    }
    // sqlparser's PostgreSQL tokenizer drops the character after a bare `?`
    // (`a ?; COMMIT`, `x ?'' , hidden --'`): it would check another
    // statement than the one the database runs.
    if !tokens_cover(dialect, sql) {
        return Err("the statement holds text the parser skips, so exactly cannot check it".into());
    }
    let unparsable = |e| format!("the statement could not be parsed ({e}); exactly runs only statements it can check");
    let mut parser = Parser::new(dialect).try_with_sql(sql).map_err(unparsable)?;
    let statements = parser.parse_statements().map_err(unparsable)?;
    // The parser stops without an error at a bare END after a statement
    // (`SELECT 1 END; COMMIT`) and drops the rest, which the database would
    // still run.
    if parser.peek_token().token != Token::EOF {
        return Err("the string holds text after its statement that exactly cannot check".into());
    }
    let statement = match statements.as_slice() {
        [one] => one,
        [] => return Err("the string holds no statement".into()),
        many => {
            return Err(format!(
                "the string holds {} statements; one call runs exactly one statement",
                many.len()
            ));
        }
    };
    match statement {
        Statement::Query(query) => {
            if let SetExpr::Select(select) = query.body.as_ref()
                && select.into.is_some()
            {
                return Err("SELECT … INTO creates a table; only SELECT, INSERT, UPDATE and DELETE are allowed".into());
            }
        }
        Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_) => {}
        other => {
            return Err(format!(
                "{} statements are not allowed: a handler may run only SELECT, INSERT, UPDATE and DELETE (the host owns the transaction)",
                leading_keyword(&other.to_string())
            ));
        }
    }
    if statement.visit(&mut TableExpression).is_break() {
        return Err("TABLE name is not allowed; write SELECT * FROM name".into());
    }
    let mut ctes = CteNames::default();
    let _ = statement.visit(&mut ctes);
    if let ControlFlow::Break(function) = statement.visit(&mut FunctionCheck) {
        return Err(format!(
            "function {function} is not allowed: it could change the session (role, settings) or reach outside the handler's tables"
        ));
    }
    if let ControlFlow::Break(refusal) = visit_relations(statement, |relation: &ObjectName| {
        if is_reserved(relation) {
            return ControlFlow::Break(format!(
                "{relation} belongs to the host or the system catalog; handlers may use only their own tables"
            ));
        }
        match table_name(relation) {
            Some(name) if ctes.0.contains(&name) || tables.contains(&name) => ControlFlow::Continue(()),
            _ => ControlFlow::Break(format!(
                "{relation} is not one of this handler's tables (its migrations create them; other handlers' tables must be listed in `uses`)"
            )),
        }
    }) {
        return Err(refusal);
    }
    match backend {
        Backend::Postgres => Ok(sql.to_owned()),
        Backend::Sqlite => numbered_placeholders(dialect, sql),
    }
}

/// Whether the tokens account for every character of `sql` (whitespace
/// and letter case aside).
fn tokens_cover(dialect: &dyn Dialect, sql: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(dialect, sql).with_unescape(false).tokenize() else {
        return false;
    };
    let essential = |text: &str| -> String {
        text.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect()
    };
    let printed: String = tokens.iter().map(ToString::to_string).collect();
    essential(&printed) == essential(sql)
}

/// Finds `TABLE name` (PostgreSQL's `SELECT * FROM name`), whose name
/// `visit_relations` does not see.
struct TableExpression;

impl Visitor for TableExpression {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        fn names_table(body: &SetExpr) -> bool {
            match body {
                SetExpr::Table(_) => true,
                SetExpr::SetOperation { left, right, .. } => names_table(left) || names_table(right),
                _ => false,
            }
        }
        if names_table(&query.body) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }
}

/// Names bound by `WITH` anywhere in the statement: not tables.
#[derive(Default)]
struct CteNames(HashSet<String>);

impl Visitor for CteNames {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.0.insert(cte.alias.name.value.to_ascii_lowercase());
            }
        }
        ControlFlow::Continue(())
    }
}

/// Refuses functions that change the session or reach the server's files,
/// locks, large objects or other databases. `set_config('role', …)` would
/// otherwise undo the per-handler role, `pg_advisory_lock` could hold the
/// host's migration lock, `pg_read_file` reads server files.
struct FunctionCheck;

impl Visitor for FunctionCheck {
    type Break = String;

    fn pre_visit_expr(&mut self, expr: &sqlparser::ast::Expr) -> ControlFlow<String> {
        if let sqlparser::ast::Expr::Function(function) = expr
            && let Some(name) = function.name.0.last().and_then(|part| part.as_ident())
            && is_denied_function(&name.value.to_ascii_lowercase())
        {
            return ControlFlow::Break(function.name.to_string());
        }
        ControlFlow::Continue(())
    }
}

fn is_denied_function(name: &str) -> bool {
    const DENIED: [&str; 9] = [
        "set_config",
        "current_setting",
        "load_extension",
        "readfile",
        "writefile",
        "edit",
        "fts3_tokenizer",
        "query_to_xml",
        "query_to_xml_and_xmlschema",
    ];
    const DENIED_PREFIXES: [&str; 4] = ["pg_", "lo_", "dblink", "sqlite_"];
    // pg_sleep stays: a sleeping statement is cut off by statement_timeout.
    if name == "pg_sleep" {
        return false;
    }
    DENIED.contains(&name)
        || DENIED_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
        || name.ends_with("_to_xml")
}

/// The table a relation names, if it is in the default schema (`public` on
/// PostgreSQL, `main` on SQLite) or unqualified.
fn table_name(name: &ObjectName) -> Option<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|part| part.as_ident().map(|ident| ident.value.to_ascii_lowercase()))
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [table] => Some(table.clone()),
        [schema, table] if schema == "public" || schema == "main" => Some(table.clone()),
        _ => None,
    }
}

/// The tables a handler's migration creates (`CREATE TABLE`, `CREATE
/// VIEW`): they are the handler's own. A migration the parser cannot read
/// is an error, since the handler's tables would be unknown.
pub fn tables_created_by(backend: Backend, sql: &str) -> Result<Vec<String>, String> {
    let statements = Parser::parse_sql(dialect(backend), sql).map_err(|e| e.to_string())?;
    Ok(statements
        .iter()
        .filter_map(|statement| match statement {
            Statement::CreateTable(create) => table_name(&create.name),
            Statement::CreateView { name, .. } => table_name(name),
            _ => None,
        })
        .collect())
}

fn is_reserved(name: &ObjectName) -> bool {
    let parts: Vec<String> = name
        .0
        .iter()
        .filter_map(|part| part.as_ident().map(|ident| ident.value.to_ascii_lowercase()))
        .collect();
    let Some(table) = parts.last() else { return false };
    let in_reserved_schema = parts.len() > 1 && RESERVED_SCHEMAS.contains(&parts[parts.len() - 2].as_str());
    in_reserved_schema || RESERVED_PREFIXES.iter().any(|prefix| table.starts_with(prefix))
}

/// `$1` → `?1`, leaving string literals and everything else untouched.
fn numbered_placeholders(dialect: &dyn Dialect, sql: &str) -> Result<String, String> {
    let tokens = Tokenizer::new(dialect, sql)
        .with_unescape(false)
        .tokenize()
        .map_err(|e| format!("the statement could not be tokenized ({e})"))?;
    let mut out = String::with_capacity(sql.len());
    for token in tokens {
        match token {
            Token::Placeholder(p) if p.len() > 1 && p.starts_with('$') && p[1..].bytes().all(|b| b.is_ascii_digit()) => {
                out.push('?');
                out.push_str(&p[1..]);
            }
            other => out.push_str(&other.to_string()),
        }
    }
    Ok(out)
}

fn leading_keyword(statement: &str) -> String {
    statement.split_whitespace().next().unwrap_or("this").to_ascii_uppercase()
}

/// The text to send for `sql` without judging it: PostgreSQL takes it as
/// it is; SQLite gets the `$n` → `?n` rewrite of [`numbered_placeholders`]
/// (the text unchanged when it does not tokenize).
pub fn rewrite_placeholders(backend: Backend, sql: &str) -> String {
    match backend {
        Backend::Postgres => sql.to_owned(),
        Backend::Sqlite => numbered_placeholders(dialect(backend), sql).unwrap_or_else(|_| sql.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> HashSet<String> {
        ["orders", "t"].into_iter().map(String::from).collect()
    }

    fn both(sql: &str) -> [Result<String, String>; 2] {
        [judge(Backend::Postgres, &own(), sql), judge(Backend::Sqlite, &own(), sql)]
    }

    #[test]
    fn admits_data_statements() {
        for sql in [
            "SELECT * FROM orders WHERE order_id = $1",
            "INSERT INTO orders (order_id) VALUES ($1) ON CONFLICT (order_id) DO NOTHING RETURNING order_id",
            "UPDATE orders SET status = 'paid' WHERE order_id = $1 RETURNING order_id",
            "DELETE FROM orders WHERE order_id = $1",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "SELECT 1;",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_ok(), "{sql}: {verdict:?}");
            }
        }
    }

    #[test]
    fn refuses_transaction_control_and_multiple_statements() {
        for sql in [
            "COMMIT",
            "ROLLBACK",
            "BEGIN",
            "SAVEPOINT x",
            "RELEASE SAVEPOINT x",
            "SELECT 1; COMMIT",
            "END",
            "CREATE TABLE x (i int)",
            "DROP TABLE orders",
            "SELECT * INTO t2 FROM orders",
            "",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_err(), "{sql} was admitted");
            }
        }
        assert!(judge(Backend::Postgres, &own(), "SET ROLE postgres").is_err());
        assert!(judge(Backend::Postgres, &own(), "COPY (SELECT 1) TO PROGRAM 'true'").is_err());
    }

    #[test]
    fn refuses_the_hosts_tables() {
        for sql in [
            "SELECT * FROM exactly.processed_events",
            "SELECT * FROM exactly_processed_events",
            "DELETE FROM EXACTLY.processed_events",
            "SELECT * FROM orders JOIN pg_catalog.pg_roles ON true",
            "SELECT * FROM sqlite_master",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_err(), "{sql} was admitted");
            }
        }
    }

    #[test]
    fn refuses_the_dead_letter_table() {
        // Dead letters hold other events' data and steer `dlq replay`: a
        // handler must neither read nor forge them, whatever it names them.
        let mut tables = own();
        tables.insert("dead_letters".into());
        for sql in [
            "SELECT * FROM exactly.dead_letters",
            "SELECT data FROM \"exactly\".\"dead_letters\"",
            "UPDATE exactly.dead_letters SET replayed_at = NULL",
            "DELETE FROM exactly_dead_letters",
            "INSERT INTO exactly_dead_letters (source) VALUES ('x')",
            "SELECT * FROM EXACTLY_DEAD_LETTERS",
            "WITH d AS (SELECT * FROM exactly_dead_letters) SELECT * FROM d",
            "SELECT * FROM orders WHERE order_id IN (SELECT id FROM exactly.dead_letters)",
        ] {
            for backend in [Backend::Postgres, Backend::Sqlite] {
                assert!(judge(backend, &tables, sql).is_err(), "{sql} was admitted on {backend:?}");
            }
        }
    }

    #[test]
    fn refuses_tables_that_are_not_the_handlers() {
        for sql in [
            "UPDATE test_effects SET note = 'x'",
            "SELECT * FROM orders JOIN payments USING (order_id)",
            "SELECT * FROM other.orders",
            "INSERT INTO orders SELECT * FROM secrets",
            "SELECT * FROM generate_series(1, 10)",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_err(), "{sql} was admitted");
            }
        }
        for sql in ["WITH x AS (SELECT * FROM orders) SELECT * FROM x", "SELECT * FROM public.orders", "SELECT 1"] {
            assert!(judge(Backend::Postgres, &own(), sql).is_ok(), "{sql}");
        }
    }

    #[test]
    fn refuses_session_and_server_functions() {
        for sql in [
            "SELECT set_config('role', 'none', true)",
            "SELECT * FROM orders WHERE current_setting('role') = 'x'",
            "SELECT pg_advisory_lock(1)",
            "SELECT PG_READ_FILE('/etc/passwd')",
            "SELECT lo_import('/etc/passwd')",
            "SELECT pg_catalog.set_config('role', 'none', true)",
            "INSERT INTO orders (id) VALUES (pg_terminate_backend(1))",
            "SELECT load_extension('x')",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_err(), "{sql} was admitted");
            }
        }
        assert!(judge(Backend::Postgres, &own(), "SELECT pg_sleep(1), count(*), now() FROM orders").is_ok());
    }

    #[test]
    fn finds_the_tables_a_migration_creates() {
        let sql = "CREATE TABLE orders (id text primary key); CREATE INDEX i ON orders (id); CREATE TABLE IF NOT EXISTS Order_Events (x int)";
        assert_eq!(tables_created_by(Backend::Postgres, sql).unwrap(), ["orders", "order_events"]);
        assert!(tables_created_by(Backend::Sqlite, "CREATE TABL x").is_err());
    }

    #[test]
    fn sqlite_placeholders_are_numbered_and_literals_kept() {
        let sql = judge(Backend::Sqlite, &own(), "UPDATE t SET a = $2, b = '$1' WHERE k = $1").unwrap();
        assert_eq!(sql, "UPDATE t SET a = ?2, b = '$1' WHERE k = ?1");
        let sql = "UPDATE t SET a = $2 WHERE k = $1";
        assert_eq!(judge(Backend::Postgres, &own(), sql).unwrap(), sql);
    }

    #[test]
    fn verdicts_are_cached() {
        let policy = Policy::new(Backend::Postgres, ["orders".to_string()]);
        assert!(policy.check("COMMIT").is_err());
        assert!(policy.check("SELECT 1 FROM orders").is_ok());
        assert_eq!(policy.cache.read().unwrap().len(), 2);
    }
}
