//! The SQL statement policy: what a handler may run in the event's
//! transaction, decided by parsing (`sqlparser`) before the statement
//! reaches the database.
//!
//! Admitted: exactly one SELECT, INSERT, UPDATE or DELETE per call (with
//! CTEs, RETURNING, ON CONFLICT). Everything else is refused, above all
//! anything that would end the transaction the host owns (COMMIT, ROLLBACK,
//! SAVEPOINT, several statements in one string), and any reference to the
//! host's own tables or the system catalogs.
//!
//! Handlers use `$1, $2, …` placeholders on both backends; for SQLite the
//! admitted SQL is rewritten to `?1, ?2, …` (SQLite would number `$n`
//! parameters by first appearance, not by `n`).
//!
//! Handlers run the same few statements over and over, so verdicts are
//! cached by SQL text: the parser runs once per distinct statement.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, RwLock};

use sqlparser::ast::{ObjectName, SetExpr, Statement, visit_relations};
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
    cache: RwLock<HashMap<Box<str>, Verdict>>,
}

impl Policy {
    pub fn new(backend: Backend) -> Self {
        Policy { backend, cache: RwLock::new(HashMap::new()) }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn check(&self, sql: &str) -> Verdict {
        if let Some(verdict) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(sql) {
            return verdict.clone();
        }
        let verdict = match judge(self.backend, sql) {
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

fn judge(backend: Backend, sql: &str) -> Result<String, String> {
    let dialect = dialect(backend);
    let statements = Parser::parse_sql(dialect, sql)
        .map_err(|e| format!("the statement could not be parsed ({e}); exactly runs only statements it can check"))?;
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
    if let ControlFlow::Break(name) = visit_relations(statement, |relation: &ObjectName| {
        if is_reserved(relation) {
            ControlFlow::Break(relation.to_string())
        } else {
            ControlFlow::Continue(())
        }
    }) {
        return Err(format!("{name} belongs to the host or the system catalog; handlers may use only their own tables"));
    }
    match backend {
        Backend::Postgres => Ok(sql.to_owned()),
        Backend::Sqlite => numbered_placeholders(dialect, sql),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn both(sql: &str) -> [Result<String, String>; 2] {
        [judge(Backend::Postgres, sql), judge(Backend::Sqlite, sql)]
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
        assert!(judge(Backend::Postgres, "SET ROLE postgres").is_err());
        assert!(judge(Backend::Postgres, "COPY (SELECT 1) TO PROGRAM 'true'").is_err());
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
    fn sqlite_placeholders_are_numbered_and_literals_kept() {
        let sql = judge(Backend::Sqlite, "UPDATE t SET a = $2, b = '$1' WHERE k = $1").unwrap();
        assert_eq!(sql, "UPDATE t SET a = ?2, b = '$1' WHERE k = ?1");
        let sql = "UPDATE t SET a = $2 WHERE k = $1";
        assert_eq!(judge(Backend::Postgres, sql).unwrap(), sql);
    }

    #[test]
    fn verdicts_are_cached() {
        let policy = Policy::new(Backend::Postgres);
        assert!(policy.check("COMMIT").is_err());
        assert!(policy.check("SELECT 1").is_ok());
        assert_eq!(policy.cache.read().unwrap().len(), 2);
    }
}
