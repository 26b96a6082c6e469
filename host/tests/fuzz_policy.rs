//! Property tests ("fuzzing") of the SQL statement policy.
//!
//! Strings mixing data statements with transaction control, DDL, comments,
//! semicolons, quotes of every dialect, case variants and odd whitespace go
//! through `Policy::check` on both backends. The policy must never panic,
//! and whatever it admits must be exactly one SELECT / INSERT / UPDATE /
//! DELETE, judged by oracles that do not share the policy's parser:
//!
//! - the statement re-parsed with `sqlparser` (input and the SQL the policy
//!   hands to the database) is exactly one data statement;
//! - SQLite itself (the bundled engine, through its C API): preparing the
//!   admitted SQL the way sqlx runs it yields one statement, nothing after
//!   it, and SQLite's authorizer reports only reads and writes of the
//!   handler's own tables (no transaction, savepoint, pragma, attach or
//!   schema action);
//! - a small PostgreSQL lexer written here (strings, `E''` escapes, quoted
//!   identifiers, dollar quotes, nested comments): no second statement after
//!   the first top-level `;`, and the statement starts with a data keyword;
//! - no admitted statement names the host's tables, a table that is not the
//!   handler's, or `set_config`.
//!
//! `cargo test` runs 256 cases per property (a few seconds). A long run:
//!
//! ```sh
//! PROPTEST_CASES=1000000 cargo test -p exactly --test fuzz_policy -- --nocapture
//! ```

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::sync::LazyLock;

use exactly::policy::{Admitted, Policy};
use exactly::storage::Backend;
use proptest::prelude::*;
use proptest::sample::select;
use sqlparser::ast::{Query, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::{Dialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

/// The handler's own tables in every policy and in the SQLite oracle.
const OWN_TABLES: [&str; 2] = ["t", "orders"];

static POSTGRES: LazyLock<Policy> =
    LazyLock::new(|| Policy::new(Backend::Postgres, OWN_TABLES.map(String::from)));
static SQLITE: LazyLock<Policy> =
    LazyLock::new(|| Policy::new(Backend::Sqlite, OWN_TABLES.map(String::from)));

/// Statements a handler may run (with words that look like transaction
/// control inside literals, aliases and CASE).
const DATA: &[&str] = &[
    "SELECT 1",
    "SELECT a FROM t WHERE a = $1",
    "SELECT * FROM orders",
    "SELECT order_id, status FROM orders WHERE order_id = $1 FOR UPDATE",
    "INSERT INTO t (a) VALUES ($1)",
    "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO NOTHING RETURNING a",
    "INSERT INTO orders (order_id) SELECT a FROM t",
    "UPDATE t SET a = 1 WHERE b = $2",
    "UPDATE orders SET status = 'paid' WHERE order_id = $1 RETURNING order_id",
    "DELETE FROM t WHERE a = $1",
    "DELETE FROM orders",
    "WITH x AS (SELECT a FROM t) SELECT * FROM x",
    "WITH x AS (DELETE FROM t RETURNING a) SELECT * FROM x",
    "SELECT CASE WHEN a = 1 THEN 'begin' ELSE 'end' END FROM t",
    "SELECT 'COMMIT'",
    "SELECT 'a;b', '--', '/*'",
    "SELECT a AS \"commit\" FROM t",
    "SELECT \"a\" FROM \"t\"",
    "SELECT (SELECT 1)",
    "SELECT 1 UNION SELECT 2",
    "(SELECT 1)",
    "VALUES (1)",
    "SELECT $$x$$",
    "SELECT E'x'",
];

/// Everything that must never run: transaction control first, then the
/// rest of what the policy refuses.
const CONTROL: &[&str] = &[
    "COMMIT",
    "COMMIT WORK",
    "COMMIT TRANSACTION",
    "COMMIT AND CHAIN",
    "ROLLBACK",
    "ROLLBACK WORK",
    "ROLLBACK AND NO CHAIN",
    "ROLLBACK TO x",
    "ROLLBACK TO SAVEPOINT x",
    "ROLLBACK TRANSACTION TO SAVEPOINT x",
    "BEGIN",
    "BEGIN WORK",
    "BEGIN TRANSACTION",
    "BEGIN IMMEDIATE",
    "BEGIN EXCLUSIVE TRANSACTION",
    "BEGIN DEFERRED",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "START TRANSACTION",
    "START TRANSACTION READ ONLY",
    "SAVEPOINT x",
    "RELEASE x",
    "RELEASE SAVEPOINT x",
    "END",
    "END WORK",
    "END TRANSACTION",
    "ABORT",
    "ABORT TRANSACTION",
    "PREPARE TRANSACTION 'x'",
    "COMMIT PREPARED 'x'",
    "ROLLBACK PREPARED 'x'",
    "SET TRANSACTION ISOLATION LEVEL READ COMMITTED",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET LOCAL ROLE postgres",
    "SET ROLE NONE",
    "RESET ROLE",
    "RESET ALL",
    "DISCARD ALL",
    "LOCK TABLE t",
    "DO $$BEGIN COMMIT; END$$",
    "CALL p()",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "DEALLOCATE p",
    "COPY t FROM STDIN",
    "VACUUM",
    "PRAGMA foreign_keys = OFF",
    "ATTACH 'x.db' AS x",
    "DETACH x",
    "CREATE TABLE z (a int)",
    "DROP TABLE t",
    "ALTER TABLE t ADD COLUMN c int",
    "TRUNCATE t",
    "LISTEN x",
    "NOTIFY x",
];

/// Statements that read or write what is not the handler's: the host's
/// table, the catalogs, another handler's table, or the role (PostgreSQL's
/// second wall) through `set_config`.
const FOREIGN: &[&str] = &[
    "SELECT * FROM exactly.processed_events",
    "SELECT * FROM exactly_processed_events",
    "SELECT * FROM \"exactly\".\"processed_events\"",
    "DELETE FROM EXACTLY.PROCESSED_EVENTS",
    "SELECT * FROM t JOIN pg_catalog.pg_roles ON true",
    "SELECT * FROM sqlite_master",
    "SELECT * FROM secrets",
    "INSERT INTO t SELECT * FROM secrets",
    "UPDATE secrets SET a = 1",
    "TABLE secrets",
    "TABLE exactly.processed_events",
    "SELECT * FROM t WHERE a IN (TABLE secrets)",
    "SELECT * FROM t WHERE a IN (TABLE exactly.processed_events)",
    "SELECT 1 UNION TABLE secrets",
    "WITH x AS (TABLE secrets) SELECT * FROM x",
    "SELECT set_config('role', 'none', true)",
    "SELECT a FROM t WHERE a = pg_catalog.set_config('statement_timeout', '0', true)",
    // Issue 9: functions where a denylist did not look, spellings the
    // database reads differently, CTE names out of scope, SQL-running
    // built-ins.
    "SELECT * FROM LATERAL set_config('role','none',true)",
    "SELECT * FROM generate_series(1, 10)",
    "SELECT * FROM json_each('[1]')",
    "SELECT * FROM t, LATERAL lower(t.a) x",
    "SELECT a FROM t ORDER BY set_config('role', 'none', true)",
    "SELECT U&\"\\0073et_config\"('role', 'none', true)",
    "SELECT u&'\\0073'",
    "SELECT 1 OPERATOR(pg_catalog.+) 1",
    "SELECT pg_catalog.lower('x')",
    "WITH secrets AS (SELECT 1) UPDATE secrets SET a = 1",
    "WITH secrets AS (SELECT 1) SELECT * FROM main.secrets",
    "SELECT * FROM (WITH secrets AS (SELECT 1) SELECT * FROM secrets) s, secrets",
    "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets",
    "SELECT query_to_xml('SELECT * FROM secrets', true, true, '')",
    "SELECT repeat('x', 100000000)",
    "SELECT zeroblob(100000000)",
    "SELECT 1 MATCH",
];

/// `(open, close)` around a hidden statement: literals, quoted identifiers
/// and comments of both dialects, and near misses.
const WRAPPERS: &[(&str, &str)] = &[
    ("'", "'"),
    ("'", "''"),
    ("'\\'", "'"),
    ("E'\\'", "'"),
    ("e'", "\\''"),
    ("X'", "'"),
    ("U&'", "'"),
    ("N'", "'"),
    ("$$", "$$"),
    ("$a$", "$a$"),
    ("$a$", "$b$"),
    ("$1$", "$1$"),
    ("\"", "\""),
    ("\"\"\"", "\""),
    ("`", "`"),
    ("[", "]"),
    ("/*", "*/"),
    ("/* /*", "*/"),
    ("/* /* */", "*/ */"),
    ("/*", "*/ */"),
    ("--", "\n"),
    ("--", "\r"),
    ("-- \0", "\n"),
    ("/* \0", "*/"),
    ("'\0", "'"),
    ("#", "\n"),
];

/// Single pieces that change how the rest is tokenized.
const JUNK: &[&str] = &[
    ";",
    ";;",
    "'",
    "''",
    "\"",
    "`",
    "[",
    "]",
    "$",
    "$$",
    "$a$",
    "E'",
    "\\",
    "/*",
    "*/",
    "--",
    "-- x\n",
    "(",
    ")",
    ",",
    "X'",
    "\n",
    "\r",
    "\t",
    "\x0b",
    "\x0c",
    "\0",
    " ",
    "\u{a0}",
    "\u{85}",
    "\u{feff}",
    "\u{2028}",
    "\u{3000}",
    "\u{1f600}",
    "é",
    "?",
    "?1",
    "$1",
    ":a",
    "@a",
    "::",
    "||",
    "#",
    "/",
    "*",
    "-",
];

/// Between pieces: whitespace, comments and statement separators.
const SEPARATORS: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    ";",
    "; ",
    ";\n",
    " ; ",
    "/* c */",
    "/**/",
    "/* ; COMMIT */",
    "-- c\n",
    "--\n",
    "-- ; COMMIT\n",
    "/* /* */ */",
    "\u{a0}",
    "\u{feff}",
];

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(DATA).prop_map(String::from),
        4 => select(CONTROL).prop_map(String::from),
        2 => select(FOREIGN).prop_map(String::from),
        3 => (select(WRAPPERS), select(CONTROL), select(SEPARATORS))
            .prop_map(|((open, close), control, separator)| format!("SELECT {open}{separator}{control}{separator}{close}")),
        3 => select(JUNK).prop_map(String::from),
        1 => "[a-z_0-9 ,()=*.$'\";-]{0,12}",
        1 => any::<String>().prop_map(|s| s.chars().take(6).collect()),
    ]
}

/// A SQL-ish string: pieces joined by separators, then a case change.
fn sql_string() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((piece(), select(SEPARATORS)), 1..6),
        0u8..4,
        any::<u64>(),
    )
        .prop_map(|(pieces, case, mask)| {
            let joined: String = pieces
                .into_iter()
                .map(|(piece, separator)| piece + separator)
                .collect();
            change_case(&joined, case, mask)
        })
}

fn change_case(sql: &str, case: u8, mask: u64) -> String {
    match case {
        1 => sql.to_uppercase(),
        2 => sql.to_lowercase(),
        3 => sql
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect(),
        _ => sql.to_owned(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// The property the whole sandbox rests on, on both backends.
    #[test]
    fn admitted_sql_is_one_data_statement(sql in sql_string()) {
        check_postgres(&sql)?;
        check_sqlite(&sql)?;
    }

    /// The same, on inputs that always start with a data statement (the
    /// shape a smuggling attempt has).
    #[test]
    fn nothing_rides_along_a_data_statement(
        data in select(DATA),
        rest in prop::collection::vec((select(SEPARATORS), piece()), 1..4),
    ) {
        let sql: String = std::iter::once(data.to_owned()).chain(rest.into_iter().map(|(s, p)| s.to_owned() + &p)).collect();
        check_postgres(&sql)?;
        check_sqlite(&sql)?;
    }
}

fn check_postgres(sql: &str) -> Result<(), TestCaseError> {
    let Ok(Admitted { sql: admitted, .. }) = POSTGRES.check(sql) else {
        return Ok(());
    };
    check_reparsed(&PostgreSqlDialect {}, sql, &admitted)?;
    check_words(&PostgreSqlDialect {}, &admitted)?;
    match postgres_lexer::statements(&admitted) {
        Ok(first_keyword) => prop_assert!(
            ["select", "insert", "update", "delete", "with", "values"]
                .contains(&first_keyword.as_str()),
            "PostgreSQL would run a {first_keyword:?} statement: {admitted:?}"
        ),
        Err(postgres_lexer::Split::Several) => {
            prop_assert!(
                false,
                "PostgreSQL sees a second statement in the admitted {admitted:?}"
            )
        }
        // PostgreSQL refuses to parse it: nothing runs.
        Err(postgres_lexer::Split::Unterminated) => {}
    }
    Ok(())
}

fn check_sqlite(sql: &str) -> Result<(), TestCaseError> {
    let Ok(Admitted { sql: admitted, .. }) = SQLITE.check(sql) else {
        return Ok(());
    };
    check_reparsed(&SQLiteDialect {}, sql, &admitted)?;
    check_words(&SQLiteDialect {}, &admitted)?;
    match ORACLE.with(|oracle| oracle.borrow().run(&admitted)) {
        sqlite_oracle::Verdict::One(actions) => {
            for action in actions {
                prop_assert!(
                    sqlite_oracle::DATA_ACTIONS.contains(&action.code),
                    "SQLite would perform action {} ({:?}, {:?}) for the admitted {admitted:?}",
                    action.code,
                    action.arg1,
                    action.arg2
                );
                if let Some(table) = action.table() {
                    prop_assert!(
                        OWN_TABLES.contains(&table.to_ascii_lowercase().as_str()),
                        "SQLite would touch table {table:?} for the admitted {admitted:?}"
                    );
                }
            }
        }
        sqlite_oracle::Verdict::Refused => {}
        sqlite_oracle::Verdict::Several(rest) => {
            prop_assert!(
                false,
                "SQLite sees more after the first statement ({rest:?}) in the admitted {admitted:?}"
            )
        }
        sqlite_oracle::Verdict::Stuck(rest) => prop_assert!(
            false,
            "SQLite stops at {rest:?} without consuming it: sqlx would loop forever on the admitted {admitted:?}"
        ),
    }
    Ok(())
}

/// The input and the SQL the policy hands on both parse as one data
/// statement of the same kind.
fn check_reparsed(dialect: &dyn Dialect, input: &str, admitted: &str) -> Result<(), TestCaseError> {
    let kind = |sql: &str| -> Result<&'static str, TestCaseError> {
        let statements = Parser::parse_sql(dialect, sql)
            .map_err(|e| TestCaseError::fail(format!("admitted {sql:?} does not re-parse: {e}")))?;
        prop_assert_eq!(
            statements.len(),
            1,
            "admitted {:?} holds {} statements",
            sql,
            statements.len()
        );
        prop_assert!(
            statements[0].visit(&mut TableExpression).is_continue(),
            "admitted {:?} holds `TABLE name`, whose table the relation checks do not see",
            sql
        );
        Ok(match &statements[0] {
            Statement::Query(_) => "query",
            Statement::Insert(_) => "insert",
            Statement::Update { .. } => "update",
            Statement::Delete(_) => "delete",
            other => {
                return Err(TestCaseError::fail(format!(
                    "admitted {sql:?} is a {other:?}"
                )));
            }
        })
    };
    prop_assert_eq!(
        kind(input)?,
        kind(admitted)?,
        "the policy changed the statement: {:?} → {:?}",
        input,
        admitted
    );
    Ok(())
}

/// Finds `TABLE name` query bodies.
struct TableExpression;

impl Visitor for TableExpression {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        fn names_table(body: &SetExpr) -> bool {
            match body {
                SetExpr::Table(_) => true,
                SetExpr::SetOperation { left, right, .. } => {
                    names_table(left) || names_table(right)
                }
                _ => false,
            }
        }
        if names_table(&query.body) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// Names that only ever mean what a handler must not reach, when they
/// are schema-qualified (`exactly.`, `pg_catalog.`) or called
/// (`set_config(`). Bare words are not checked here: sqlparser reads
/// some keywords as identifiers (`RETURNING a * FROM secrets` is an alias
/// `secrets`, which the databases refuse as a syntax error); what SQLite
/// really touches is checked by its authorizer instead.
fn check_words(dialect: &dyn Dialect, admitted: &str) -> Result<(), TestCaseError> {
    let tokens: Vec<Token> = Tokenizer::new(dialect, admitted)
        .tokenize()
        .map_err(|e| TestCaseError::fail(format!("admitted {admitted:?} does not tokenize: {e}")))?
        .into_iter()
        .filter(|token| !matches!(token, Token::Whitespace(_)))
        .collect();
    for (i, token) in tokens.iter().enumerate() {
        let Token::Word(word) = token else { continue };
        let name = word.value.to_ascii_lowercase();
        let next = tokens.get(i + 1);
        let qualified =
            ["exactly", "pg_catalog"].contains(&name.as_str()) && next == Some(&Token::Period);
        let called = name == "set_config" && next == Some(&Token::LParen);
        prop_assert!(
            !(qualified || called),
            "admitted {admitted:?} reaches {:?}",
            word.value
        );
    }
    Ok(())
}

thread_local! {
    static ORACLE: RefCell<sqlite_oracle::Engine> = RefCell::new(sqlite_oracle::Engine::new());
}

/// SQLite's own view of a SQL string, through the bundled engine that
/// sqlx links.
mod sqlite_oracle {
    use std::cell::RefCell;
    use std::ffi::{CStr, c_char, c_int, c_void};
    use std::ptr;

    use libsqlite3_sys as ffi;

    /// Authorizer action codes of a data statement: DELETE, INSERT, READ,
    /// SELECT, UPDATE, FUNCTION, RECURSIVE.
    pub const DATA_ACTIONS: [c_int; 7] = [
        ffi::SQLITE_DELETE,
        ffi::SQLITE_INSERT,
        ffi::SQLITE_READ,
        ffi::SQLITE_SELECT,
        ffi::SQLITE_UPDATE,
        ffi::SQLITE_FUNCTION,
        ffi::SQLITE_RECURSIVE,
    ];

    /// The schema the oracle prepares against: the handler's tables, the
    /// host's, and another handler's.
    const SCHEMA: &str = "CREATE TABLE t (a, b);
        CREATE TABLE orders (order_id, status, a, b);
        CREATE UNIQUE INDEX t_a ON t (a);
        CREATE TABLE exactly_processed_events (source, id);
        CREATE TABLE secrets (a, b);";

    #[derive(Debug)]
    pub struct Action {
        pub code: c_int,
        pub arg1: Option<String>,
        pub arg2: Option<String>,
    }

    impl Action {
        /// The table a READ, INSERT, UPDATE or DELETE touches.
        pub fn table(&self) -> Option<&str> {
            match self.code {
                ffi::SQLITE_READ | ffi::SQLITE_INSERT | ffi::SQLITE_UPDATE | ffi::SQLITE_DELETE => {
                    self.arg1.as_deref()
                }
                _ => None,
            }
        }
    }

    pub enum Verdict {
        /// One statement and nothing after it; what it would do.
        One(Vec<Action>),
        /// SQLite refuses to prepare the (first) statement: nothing runs.
        Refused,
        /// Something remains after the first statement: sqlx would prepare
        /// and run it too.
        Several(String),
        /// SQLite consumed nothing of what remains: sqlx's prepare loop
        /// would spin forever.
        Stuck(String),
    }

    pub struct Engine {
        db: *mut ffi::sqlite3,
        /// What the authorizer reported since the last `take_actions`.
        actions: Box<RefCell<Vec<Action>>>,
    }

    unsafe extern "C" fn record(
        user: *mut c_void,
        code: c_int,
        arg1: *const c_char,
        arg2: *const c_char,
        _database: *const c_char,
        _trigger: *const c_char,
    ) -> c_int {
        let text = |p: *const c_char| {
            // SAFETY: SQLite passes NUL-terminated strings or NULL.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        // SAFETY: `user` is the engine's boxed `actions`, alive while it is registered.
        let actions = unsafe { &*(user as *const RefCell<Vec<Action>>) };
        actions.borrow_mut().push(Action {
            code,
            arg1: text(arg1),
            arg2: text(arg2),
        });
        ffi::SQLITE_OK
    }

    impl Engine {
        pub fn new() -> Engine {
            let mut db = ptr::null_mut();
            // SAFETY: plain C API use on a private in-memory database.
            unsafe {
                let rc = ffi::sqlite3_open_v2(
                    c":memory:".as_ptr(),
                    &mut db,
                    ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_CREATE,
                    ptr::null(),
                );
                assert_eq!(rc, ffi::SQLITE_OK, "open an in-memory SQLite database");
                let schema = std::ffi::CString::new(SCHEMA).unwrap();
                let rc =
                    ffi::sqlite3_exec(db, schema.as_ptr(), None, ptr::null_mut(), ptr::null_mut());
                assert_eq!(rc, ffi::SQLITE_OK, "create the oracle's schema");
            }
            let engine = Engine {
                db,
                actions: Box::default(),
            };
            let user = &*engine.actions as *const RefCell<Vec<Action>> as *mut c_void;
            // SAFETY: `actions` is boxed, so its address is stable for the engine's life.
            unsafe { ffi::sqlite3_set_authorizer(engine.db, Some(record), user) };
            engine
        }

        fn take_actions(&self) -> Vec<Action> {
            std::mem::take(&mut *self.actions.borrow_mut())
        }

        /// Prepares `sql` statement by statement the way sqlx's SQLite
        /// driver does (`sqlite3_prepare_v3` on what remains, until nothing
        /// remains).
        pub fn run(&self, sql: &str) -> Verdict {
            let bytes = sql.as_bytes();
            let mut offset = 0;
            let mut first: Option<Vec<Action>> = None;
            while offset < bytes.len() {
                let rest = &bytes[offset..];
                let mut statement = ptr::null_mut();
                let mut tail = ptr::null();
                self.take_actions();
                // SAFETY: `rest` outlives the call; SQLite reads at most `rest.len()` bytes.
                let rc = unsafe {
                    ffi::sqlite3_prepare_v3(
                        self.db,
                        rest.as_ptr() as *const c_char,
                        rest.len() as c_int,
                        0,
                        &mut statement,
                        &mut tail,
                    )
                };
                let remaining = String::from_utf8_lossy(rest).into_owned();
                if rc != ffi::SQLITE_OK {
                    return match first {
                        None => Verdict::Refused,
                        Some(_) => Verdict::Several(remaining),
                    };
                }
                let consumed = tail as usize - rest.as_ptr() as usize;
                if statement.is_null() {
                    if consumed == 0 {
                        return Verdict::Stuck(remaining);
                    }
                } else {
                    // SAFETY: a statement SQLite just prepared.
                    unsafe { ffi::sqlite3_finalize(statement) };
                    if first.is_some() {
                        return Verdict::Several(remaining);
                    }
                    first = Some(self.take_actions());
                }
                offset += consumed;
            }
            match first {
                Some(actions) => Verdict::One(actions),
                None => Verdict::Refused,
            }
        }
    }

    impl Drop for Engine {
        fn drop(&mut self) {
            // SAFETY: closing the handle opened in `new`.
            unsafe { ffi::sqlite3_close(self.db) };
        }
    }
}

/// Just enough of PostgreSQL's lexer (`scan.l`, with
/// `standard_conforming_strings = on`) to find where statements end.
mod postgres_lexer {
    #[derive(Debug, PartialEq)]
    pub enum Split {
        /// Something other than whitespace, comments and `;` follows the
        /// first statement.
        Several,
        /// An unterminated literal or comment: PostgreSQL refuses the whole
        /// string.
        Unterminated,
    }

    fn is_ident_start(c: char) -> bool {
        c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
    }

    fn is_ident_part(c: char) -> bool {
        is_ident_start(c) || c.is_ascii_digit() || c == '$'
    }

    /// One statement at most: its first keyword, lower-case (`""` when the
    /// string holds no keyword).
    pub fn statements(sql: &str) -> Result<String, Split> {
        let chars: Vec<char> = sql.chars().collect();
        let mut i = 0;
        let mut first_word: Option<String> = None;
        let mut in_statement = false;
        let mut ended = false;
        while i < chars.len() {
            let c = chars[i];
            let next = chars.get(i + 1).copied();
            if matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c') {
                i += 1;
                continue;
            }
            if c == '-' && next == Some('-') {
                while i < chars.len() && chars[i] != '\n' && chars[i] != '\r' {
                    i += 1;
                }
                continue;
            }
            if c == '/' && next == Some('*') {
                let mut depth = 0;
                loop {
                    if i + 1 >= chars.len() {
                        return Err(Split::Unterminated);
                    }
                    if chars[i] == '/' && chars[i + 1] == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars[i + 1] == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            if c == ';' {
                ended |= in_statement;
                i += 1;
                continue;
            }
            // Anything else is a token of a statement.
            if ended {
                return Err(Split::Several);
            }
            in_statement = true;
            if c == '\'' {
                i = string_end(&chars, i + 1, false)?;
            } else if c == '"' {
                i = quoted_end(&chars, i + 1, '"')?;
            } else if c == '$' {
                i = dollar(&chars, i)?;
            } else if is_ident_start(c) {
                let start = i;
                while i < chars.len() && is_ident_part(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let lower = word.to_ascii_lowercase();
                match (lower.as_str(), chars.get(i).copied()) {
                    ("e", Some('\'')) => i = string_end(&chars, i + 1, true)?,
                    ("u", Some('&')) if chars.get(i + 1) == Some(&'\'') => {
                        i = string_end(&chars, i + 2, false)?
                    }
                    ("u", Some('&')) if chars.get(i + 1) == Some(&'"') => {
                        i = quoted_end(&chars, i + 2, '"')?
                    }
                    _ => {
                        first_word.get_or_insert(lower);
                    }
                }
            } else {
                i += 1;
            }
        }
        Ok(first_word.unwrap_or_default())
    }

    /// After the opening quote of a string: the index after its end.
    fn string_end(chars: &[char], mut i: usize, backslash_escapes: bool) -> Result<usize, Split> {
        while i < chars.len() {
            match chars[i] {
                '\\' if backslash_escapes => i += 2,
                '\'' if chars.get(i + 1) == Some(&'\'') => i += 2,
                '\'' => return Ok(i + 1),
                _ => i += 1,
            }
        }
        Err(Split::Unterminated)
    }

    fn quoted_end(chars: &[char], mut i: usize, quote: char) -> Result<usize, Split> {
        while i < chars.len() {
            if chars[i] == quote {
                if chars.get(i + 1) == Some(&quote) {
                    i += 2;
                    continue;
                }
                return Ok(i + 1);
            }
            i += 1;
        }
        Err(Split::Unterminated)
    }

    /// At a `$` that does not continue an identifier: a parameter `$n`, or
    /// a dollar-quoted string `$tag$…$tag$`.
    fn dollar(chars: &[char], i: usize) -> Result<usize, Split> {
        let mut j = i + 1;
        if chars.get(j).is_some_and(|c| c.is_ascii_digit()) {
            while chars.get(j).is_some_and(|c| c.is_ascii_digit()) {
                j += 1;
            }
            return Ok(j);
        }
        if chars.get(j).is_some_and(|&c| is_ident_start(c)) {
            while chars
                .get(j)
                .is_some_and(|&c| is_ident_start(c) || c.is_ascii_digit())
            {
                j += 1;
            }
        }
        if chars.get(j) != Some(&'$') {
            // A lone `$`: a syntax error, which refuses the whole string.
            return Err(Split::Unterminated);
        }
        let delimiter = &chars[i..=j];
        let mut k = j + 1;
        while k + delimiter.len() <= chars.len() {
            if &chars[k..k + delimiter.len()] == delimiter {
                return Ok(k + delimiter.len());
            }
            k += 1;
        }
        Err(Split::Unterminated)
    }

    #[test]
    fn the_lexer_splits_like_postgres() {
        assert_eq!(statements("SELECT 1"), Ok("select".into()));
        assert_eq!(statements(" (SELECT 1);;"), Ok("select".into()));
        assert_eq!(statements("SELECT 1; COMMIT"), Err(Split::Several));
        assert_eq!(statements("SELECT '; COMMIT'"), Ok("select".into()));
        assert_eq!(statements("SELECT 'a\\'; COMMIT; --'"), Err(Split::Several));
        assert_eq!(
            statements("SELECT E'a\\'; COMMIT; --'"),
            Ok("select".into())
        );
        assert_eq!(statements("SELECT $$; COMMIT $$"), Ok("select".into()));
        assert_eq!(
            statements("SELECT $a$; $b$ COMMIT $a$"),
            Ok("select".into())
        );
        assert_eq!(statements("SELECT $1; COMMIT"), Err(Split::Several));
        assert_eq!(
            statements("SELECT 1 /* /* */ ; COMMIT */"),
            Ok("select".into())
        );
        assert_eq!(statements("SELECT 1 -- ; COMMIT\n"), Ok("select".into()));
        assert_eq!(statements("SELECT \"a;\"\"\" FROM t"), Ok("select".into()));
        assert_eq!(statements("COMMIT"), Ok("commit".into()));
        assert_eq!(statements("SELECT 'x"), Err(Split::Unterminated));
    }
}

#[test]
fn the_sqlite_oracle_sees_what_sqlite_runs() {
    ORACLE.with(|oracle| {
        let oracle = oracle.borrow();
        assert!(matches!(
            oracle.run("SELECT a FROM t"),
            sqlite_oracle::Verdict::One(_)
        ));
        assert!(matches!(
            oracle.run("SELECT 1; COMMIT"),
            sqlite_oracle::Verdict::Several(_)
        ));
        assert!(matches!(
            oracle.run("SELECT 1; -- c\n"),
            sqlite_oracle::Verdict::One(_)
        ));
        assert!(matches!(
            oracle.run("SELECT 1 -- \0"),
            sqlite_oracle::Verdict::Stuck(_)
        ));
        assert!(matches!(
            oracle.run("SELEC 1"),
            sqlite_oracle::Verdict::Refused
        ));
        let sqlite_oracle::Verdict::One(actions) = oracle.run("COMMIT") else {
            panic!()
        };
        assert!(
            actions
                .iter()
                .any(|a| a.code == libsqlite3_sys::SQLITE_TRANSACTION)
        );
    });
}

/// Issue 9's attack kinds, refused for good on both backends.
#[test]
fn regressions_found_by_review() {
    for sql in FOREIGN {
        assert!(
            POSTGRES.check(sql).is_err(),
            "PostgreSQL policy admitted {sql:?}"
        );
        assert!(SQLITE.check(sql).is_err(), "SQLite policy admitted {sql:?}");
    }
}

/// What the fuzzers found, refused for good on both backends.
#[test]
fn regressions_found_by_fuzzing() {
    for sql in [
        // sqlparser stops at a bare END after a statement and drops the
        // rest; SQLite ran the COMMIT (and sqlx reported success).
        "SELECT 1 END; COMMIT",
        "SELECT 1END;SELECT 1",
        "SELECT a FROM t END; COMMIT",
        "SELECT 1 END COMMIT",
        "UPDATE t SET a = 1 END; DELETE FROM exactly_processed_events",
        // SQLite stops at a NUL; sqlx's prepare loop then spins forever on
        // the connection's worker thread.
        "SELECT 1 -- \0",
        "SELECT 1 /* \0 */",
        "SELECT '\0'",
        // TABLE name escaped the table checks.
        "SELECT * FROM t WHERE a IN (TABLE exactly.processed_events)",
        "SELECT * FROM t WHERE a IN (TABLE secrets)",
        "SELECT 1 UNION TABLE secrets",
        "WITH x AS (TABLE secrets) SELECT * FROM x",
        "INSERT INTO t (a) TABLE secrets",
        // sqlparser's PostgreSQL tokenizer drops the character after a bare
        // `?`: the `;` (a second statement) or a quote (so that SQL it takes
        // for a string literal runs: a denied function that resets the
        // role, a host table).
        "SELECT a ?; COMMIT",
        "INSERT INTO t (a, b) VALUES ($1, $2) ON CONFLICT (a) DO NOTHING RETURNING a?;COMMIT",
        "SELECT '{}'::jsonb ?'' , set_config($a$role$a$, $b$none$b$, true) --'",
        "SELECT '{}'::jsonb ?'' , (SELECT count(*) FROM exactly.processed_events) --'",
    ] {
        assert!(
            POSTGRES.check(sql).is_err(),
            "PostgreSQL policy admitted {sql:?}"
        );
        assert!(SQLITE.check(sql).is_err(), "SQLite policy admitted {sql:?}");
    }
}
