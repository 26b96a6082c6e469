//! The SQL statement policy: a fast first filter, with clear messages, on
//! what a handler may run in the event's transaction. It parses every
//! statement (`sqlparser`) before the statement reaches the database. The
//! database itself is the wall (see DESIGN.md, "The sandbox: the database is
//! the wall"): a parser reads SQL differently from the server in corners, so
//! this filter is an allowlist that refuses whatever it cannot read with
//! certainty.
//!
//! Admitted: exactly one SELECT, INSERT, UPDATE or DELETE per call (with
//! CTEs, RETURNING, ON CONFLICT), whose every relation is one of the
//! handler's tables (created by its migrations or declared in its `uses`)
//! or a CTE in scope, and whose every function is on the backend's function
//! allowlist ([`PG_FUNCTIONS`], [`SQLITE_FUNCTIONS`], [`COMMON_FUNCTIONS`]).
//! Refused, among the rest: anything that would end the transaction the
//! host owns, several statements in one string, functions in `FROM`,
//! schema-qualified functions, `OPERATOR(…)`, Unicode-escape identifiers
//! and strings, the host's tables and the system catalogs, SQL longer than
//! [`MAX_SQL_BYTES`].
//!
//! Handlers use `$1, $2, …` placeholders on both backends; for SQLite the
//! admitted SQL is rewritten to `?1, ?2, …` (SQLite would number `$n`
//! parameters by first appearance, not by `n`).
//!
//! Handlers run the same few statements over and over, so verdicts are
//! cached by SQL text (bounded in bytes): the parser runs once per distinct
//! statement.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Once, RwLock};

use sqlparser::ast::{
    BinaryOperator, DataType, Delete, Expr, FromTable, FunctionArguments, Ident, Insert, ObjectName, OnInsert, Query,
    SetExpr, Statement, TableFactor, TableObject, TableWithJoins, TypedString, Visit, Visitor,
};
use sqlparser::dialect::Dialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};

use crate::storage::Backend;

/// `Ok`: the SQL to send to the database. `Err`: why it is refused.
pub type Verdict = Result<Admitted, Arc<str>>;

/// An admitted statement: the text to run (placeholders rewritten for
/// SQLite) and how many values it takes, the highest `$n` it holds.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub sql: Arc<str>,
    pub placeholders: usize,
}

/// The longest SQL text the policy reads. Parsing is bounded before it
/// starts: a multi-megabyte string would cost far more memory and time in
/// the tokenizer and parser than any handler statement needs.
pub const MAX_SQL_BYTES: usize = 64 * 1024;

/// The verdict cache's budget: SQL text plus verdict text, in bytes.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// What one cache entry costs beside its text (map slot, `Arc` headers).
const CACHE_ENTRY_OVERHEAD: usize = 64;

/// Schemas and name prefixes a handler may never reference.
const RESERVED_SCHEMAS: [&str; 4] = ["exactly", "pg_catalog", "information_schema", "pg_toast"];
const RESERVED_PREFIXES: [&str; 3] = ["exactly_", "sqlite_", "pg_"];

/// Functions a handler may call on both backends. The function allowlists
/// are the one place that says what is callable; everything else is
/// refused, by name as the database reads it (unquoted names folded to
/// lower case, quoted names exact on PostgreSQL; case-insensitive on
/// SQLite), and never schema-qualified.
///
/// Deliberately out, with the reason:
/// - functions that run a SQL string they are given, or read a table named
///   by a string: `query_to_xml` and its family (`query_to_xml_and_xmlschema`,
///   `cursor_to_xml`, `table_to_xml*`, `schema_to_xml*`, `database_to_xml*`),
///   `dblink*`; the `xpath` family and other XML functions with them;
/// - the session and the server: `set_config`, `current_setting`,
///   `current_user`/`session_user`/`current_role`/`user`, `current_schema`,
///   `current_database`, `version`, `inet_*`, `txid_*`, `pg_*` (advisory
///   locks, files, backends, `pg_sleep`), `lo_*`, `has_*_privilege`,
///   `to_reg*`, `nextval`/`setval`/`currval`/`lastval` (sequences are
///   session state outside the transaction), SQLite's `changes`,
///   `total_changes`, `last_insert_rowid`, `sqlite_*`, `load_extension`,
///   `readfile`, `writefile`, `edit`, `fts3_tokenizer`;
/// - memory blow-ups from a small statement: `repeat`, `lpad`, `rpad`,
///   `format`, `printf`, `randomblob`, `zeroblob`, `generate_series`;
/// - every function in `FROM` (table functions, `LATERAL f(…)`, `unnest`,
///   `json_each`, `ROWS FROM`): refused as a kind, whatever its name.
#[rustfmt::skip]
pub const COMMON_FUNCTIONS: &[&str] = &[
    // aggregates and window functions
    "count", "sum", "avg", "min", "max", "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile",
    "lag", "lead", "first_value", "last_value", "nth_value",
    // conditionals
    "coalesce", "nullif",
    // strings
    "lower", "upper", "length", "trim", "ltrim", "rtrim", "replace", "substr", "substring", "concat", "concat_ws",
    "octet_length",
    // math
    "abs", "round", "sign", "ceil", "ceiling", "floor", "sqrt", "power", "pow", "exp", "ln", "log", "log10", "mod",
    "pi", "trunc", "radians", "degrees", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "random",
    // date and time (sqlparser reads the bare keywords as functions)
    "current_timestamp", "current_date", "current_time",
];

/// Functions a handler may call on PostgreSQL, beside [`COMMON_FUNCTIONS`].
#[rustfmt::skip]
pub const PG_FUNCTIONS: &[&str] = &[
    // constructors sqlparser reads as functions
    "array", "row",
    // conditionals
    "greatest", "least", "num_nulls", "num_nonnulls",
    // aggregates
    "string_agg", "array_agg", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or",
    "every", "bit_and", "bit_or", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop", "var_samp",
    "percentile_cont", "percentile_disc", "mode",
    // date and time
    "now", "localtime", "localtimestamp", "clock_timestamp", "statement_timestamp", "transaction_timestamp",
    "date_trunc", "date_part", "date_bin", "extract", "age", "make_date", "make_time", "make_timestamp",
    "make_timestamptz", "make_interval", "to_char", "to_date", "to_timestamp", "to_number", "isfinite",
    "justify_days", "justify_hours", "justify_interval", "timezone",
    // strings and bytes
    "char_length", "character_length", "bit_length", "btrim", "initcap", "left", "right", "reverse", "strpos",
    "split_part", "starts_with", "translate", "ascii", "chr", "md5", "sha224", "sha256", "sha384", "sha512", "encode",
    "decode", "to_hex", "quote_literal", "quote_nullable", "quote_ident", "regexp_replace", "regexp_match",
    "regexp_matches", "regexp_like", "regexp_count", "regexp_instr", "regexp_substr", "regexp_split_to_array",
    "string_to_array", "array_to_string",
    // math
    "div", "cbrt", "gcd", "lcm", "width_bucket",
    // arrays
    "array_length", "array_lower", "array_upper", "array_position", "array_positions", "array_append",
    "array_prepend", "array_cat", "array_remove", "array_replace", "cardinality",
    // JSON builders and accessors
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object", "jsonb_build_object",
    "json_build_array", "jsonb_build_array", "json_object", "jsonb_object", "json_array_length", "jsonb_array_length",
    "json_typeof", "jsonb_typeof", "json_extract_path", "jsonb_extract_path", "json_extract_path_text",
    "jsonb_extract_path_text", "jsonb_set", "jsonb_set_lax", "jsonb_insert", "json_strip_nulls", "jsonb_strip_nulls",
    "jsonb_pretty", "jsonb_path_exists", "jsonb_path_match", "jsonb_path_query_first", "jsonb_path_query_array",
    "json_array_elements", "jsonb_array_elements", "json_array_elements_text", "jsonb_array_elements_text",
    "json_object_keys", "jsonb_object_keys",
    // identifiers
    "gen_random_uuid",
];

/// Functions a handler may call on SQLite, beside [`COMMON_FUNCTIONS`].
#[rustfmt::skip]
pub const SQLITE_FUNCTIONS: &[&str] = &[
    // conditionals and types
    "ifnull", "iif", "typeof", "likely", "unlikely", "likelihood",
    // aggregates
    "total", "group_concat", "string_agg", "json_group_array", "json_group_object", "jsonb_group_array",
    "jsonb_group_object",
    // strings and bytes
    "instr", "hex", "unhex", "unicode", "char", "quote", "glob", "like",
    // date and time
    "date", "time", "datetime", "julianday", "unixepoch", "strftime", "timediff",
    // JSON
    "json", "jsonb", "json_extract", "jsonb_extract", "json_object", "jsonb_object", "json_array", "jsonb_array",
    "json_array_length", "json_type", "json_valid", "json_quote", "json_set", "jsonb_set", "json_insert",
    "jsonb_insert", "json_replace", "jsonb_replace", "json_remove", "jsonb_remove", "json_patch", "jsonb_patch",
];

/// Keywords PostgreSQL evaluates as functions of the session.
const PG_SESSION_WORDS: &[&str] =
    &["current_role", "current_user", "session_user", "user", "current_schema", "current_catalog", "system_user"];

fn function_allowed(backend: Backend, name: &str) -> bool {
    let specific = match backend {
        Backend::Postgres => PG_FUNCTIONS,
        Backend::Sqlite => SQLITE_FUNCTIONS,
    };
    COMMON_FUNCTIONS.contains(&name) || specific.contains(&name)
}

pub struct Policy {
    backend: Backend,
    /// Lower-case names of the tables the handler may use.
    tables: HashSet<String>,
    cache: RwLock<Cache>,
}

/// Verdicts by SQL text, bounded by the bytes they hold.
#[derive(Default)]
struct Cache {
    verdicts: HashMap<Box<str>, Verdict>,
    bytes: usize,
}

impl Policy {
    pub fn new(backend: Backend, tables: impl IntoIterator<Item = String>) -> Self {
        let tables = tables.into_iter().map(|t| t.to_ascii_lowercase()).collect();
        Policy { backend, tables, cache: RwLock::new(Cache::default()) }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn check(&self, sql: &str) -> Verdict {
        // Before the cache too: a verdict on a too-long text is not kept.
        if sql.len() > MAX_SQL_BYTES {
            return Err(Arc::from(format!(
                "the statement is {} bytes long; exactly reads statements of at most {MAX_SQL_BYTES} bytes",
                sql.len()
            )));
        }
        if let Some(verdict) = self.cache.read().unwrap_or_else(|e| e.into_inner()).verdicts.get(sql) {
            return verdict.clone();
        }
        let verdict = match judge_guarded(self.backend, &self.tables, sql) {
            Ok((admitted, placeholders)) => Ok(Admitted { sql: Arc::from(admitted), placeholders }),
            Err(reason) => Err(Arc::from(reason)),
        };
        let size = sql.len() + verdict_len(&verdict) + CACHE_ENTRY_OVERHEAD;
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.bytes + size > CACHE_BYTES {
            cache.verdicts.clear();
            cache.bytes = 0;
        }
        if cache.verdicts.insert(sql.into(), verdict.clone()).is_none() {
            cache.bytes += size;
        }
        verdict
    }
}

fn verdict_len(verdict: &Verdict) -> usize {
    match verdict {
        Ok(admitted) => admitted.sql.len(),
        Err(text) => text.len(),
    }
}

/// How many values `sql` takes: the highest `$n` placeholder it holds (0
/// for none), read by the tokenizer, so `'$1'` in a string literal is not
/// one. The host compares it with the values bound, on both backends: a
/// mismatch is the handler's mistake (PostgreSQL would answer with a
/// protocol error, SQLite would bind NULL for a missing value).
pub fn placeholder_count(backend: Backend, sql: &str) -> Result<usize, String> {
    let tokens = Tokenizer::new(backend.dialect(), sql)
        .with_unescape(false)
        .tokenize()
        .map_err(|e| format!("the statement could not be tokenized ({e})"))?;
    Ok(highest_placeholder(&tokens))
}

fn highest_placeholder(tokens: &[Token]) -> usize {
    tokens
        .iter()
        .filter_map(|token| match token {
            Token::Placeholder(p) => p.strip_prefix('$')?.parse::<usize>().ok(),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// Only the placeholder rewrite the policy does on admitted SQL: unchanged
/// on PostgreSQL; `$n` → `?n` on SQLite (the text unchanged if it cannot be
/// tokenized).
pub fn rewrite_placeholders(backend: Backend, sql: &str) -> String {
    match backend {
        Backend::Postgres => sql.to_owned(),
        Backend::Sqlite => catch_unwind(|| numbered_placeholders(backend.dialect(), sql))
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| sql.to_owned()),
    }
}

thread_local! {
    /// Whether this thread is inside the policy's parser right now.
    static JUDGING: Cell<bool> = const { Cell::new(false) };
}

/// sqlparser panics on some inputs (`SELECT 1 MATCH` on SQLite). A panic in
/// the parser is a refusal, never a crash. The first one is reported on
/// stderr by whatever panic hook is installed; after it, a hook that
/// forwards every other panic unchanged keeps later parser panics quiet.
fn judge_guarded(backend: Backend, tables: &HashSet<String>, sql: &str) -> Result<(String, usize), String> {
    guarded(|| judge_counted(backend, tables, sql))
}

/// Runs `judge` with a panic turned into a refusal.
fn guarded<T>(judge: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    struct Judging;
    impl Drop for Judging {
        fn drop(&mut self) {
            JUDGING.with(|judging| judging.set(false));
        }
    }
    let verdict = {
        JUDGING.with(|judging| judging.set(true));
        let _judging = Judging;
        catch_unwind(AssertUnwindSafe(judge))
    };
    verdict.unwrap_or_else(|_| {
        quiet_later_parser_panics();
        Err("the SQL parser failed on this statement, so exactly cannot check it".into())
    })
}

fn quiet_later_parser_panics() {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !JUDGING.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// The admitted text alone (the unit tests' view of [`judge_counted`]).
#[cfg(test)]
fn judge(backend: Backend, tables: &HashSet<String>, sql: &str) -> Result<String, String> {
    judge_counted(backend, tables, sql).map(|(admitted, _)| admitted)
}

/// The verdict on one statement: the text to run and how many values it
/// takes (the highest `$n`, read from the tokens checked anyway), or the
/// reason it is refused.
fn judge_counted(backend: Backend, tables: &HashSet<String>, sql: &str) -> Result<(String, usize), String> {
    let dialect = backend.dialect();
    if sql.len() > MAX_SQL_BYTES {
        return Err(format!("the statement is longer than {MAX_SQL_BYTES} bytes"));
    }
    // SQLite stops reading at a NUL, and sqlx's SQLite driver then loops
    // forever on the text after it.
    if sql.contains('\0') {
        return Err("the statement contains a NUL character".into());
    }
    let Ok(tokens) = Tokenizer::new(dialect, sql).with_unescape(false).tokenize() else {
        return Err("the statement could not be tokenized, so exactly cannot check it".into());
    };
    // sqlparser's PostgreSQL tokenizer drops the character after a bare `?`
    // (`a ?; COMMIT`, `x ?'' , hidden --'`): it would check another
    // statement than the one the database runs.
    if !tokens_cover(&tokens, sql) {
        // The usual cause: SQLite-style `?1` placeholders (issue 10).
        if backend == Backend::Postgres && sql.as_bytes().windows(2).any(|w| w[0] == b'?' && w[1].is_ascii_digit()) {
            return Err("the statement holds text the parser skips: `?1` is not a placeholder on PostgreSQL; write $1, $2, … (exactly takes them on both backends)".into());
        }
        return Err("the statement holds text the parser skips, so exactly cannot check it".into());
    }
    check_tokens(backend, &tokens)?;
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
            return Err(format!("the string holds {} statements; one call runs exactly one statement", many.len()));
        }
    };
    if !matches!(
        statement,
        Statement::Query(_) | Statement::Insert(_) | Statement::Update { .. } | Statement::Delete(_)
    ) {
        return Err(format!(
            "{} statements are not allowed: a handler may run only SELECT, INSERT, UPDATE and DELETE (the host owns the transaction)",
            leading_keyword(&statement.to_string())
        ));
    }
    let mut check = Check { backend, tables, scopes: Vec::new(), targets: Vec::new() };
    if let ControlFlow::Break(refusal) = statement.visit(&mut check) {
        return Err(refusal);
    }
    let placeholders = highest_placeholder(&tokens);
    match backend {
        Backend::Postgres => Ok((sql.to_owned(), placeholders)),
        Backend::Sqlite => Ok((numbered_placeholders(dialect, sql)?, placeholders)),
    }
}

/// Whether the tokens account for every character of `sql` (whitespace
/// and letter case aside).
fn tokens_cover(tokens: &[Token], sql: &str) -> bool {
    let essential =
        |text: &str| -> String { text.chars().filter(|c| !c.is_whitespace()).flat_map(char::to_lowercase).collect() };
    let printed: String = tokens.iter().map(ToString::to_string).collect();
    essential(&printed) == essential(sql)
}

/// Spellings the database reads differently from sqlparser, refused as
/// tokens before parsing.
fn check_tokens(backend: Backend, tokens: &[Token]) -> Result<(), String> {
    let words = |i: usize| -> Option<&sqlparser::tokenizer::Word> {
        match tokens.get(i) {
            Some(Token::Word(word)) if word.quote_style.is_none() => Some(word),
            _ => None,
        }
    };
    let next_significant = |i: usize| tokens[i + 1..].iter().find(|t| !matches!(t, Token::Whitespace(_)));
    for (i, token) in tokens.iter().enumerate() {
        if matches!(token, Token::UnicodeStringLiteral(_)) {
            return Err("Unicode-escape strings (U&'…') are not allowed".into());
        }
        let Some(word) = words(i) else { continue };
        // `U&"\0073et_config"` is `set_config` to PostgreSQL; sqlparser reads
        // `U & "…"`.
        if word.value.eq_ignore_ascii_case("u") && tokens.get(i + 1) == Some(&Token::Ampersand) {
            return Err("Unicode-escape identifiers and strings (U&\"…\", U&'…') are not allowed".into());
        }
        if word.keyword == Keyword::UESCAPE || word.value.eq_ignore_ascii_case("uescape") {
            return Err("UESCAPE is not allowed".into());
        }
        if word.value.eq_ignore_ascii_case("operator") && next_significant(i) == Some(&Token::LParen) {
            return Err("OPERATOR(…) is not allowed; write the operator itself".into());
        }
        // sqlparser panics on a SQLite `MATCH` without a right side; both
        // operators need functions a handler has no use for (full-text
        // search tables, an application-defined `regexp`).
        if backend == Backend::Sqlite
            && (word.value.eq_ignore_ascii_case("match") || word.value.eq_ignore_ascii_case("regexp"))
        {
            return Err(format!("the {} operator is not allowed", word.value.to_ascii_uppercase()));
        }
    }
    Ok(())
}

/// A name as the database reads it: unquoted names fold to lower case
/// (PostgreSQL folds them; SQLite compares case-insensitively), quoted
/// names are exact on PostgreSQL and case-insensitive on SQLite.
fn normal(backend: Backend, ident: &Ident) -> String {
    match (backend, ident.quote_style) {
        (Backend::Postgres, Some(_)) => ident.value.clone(),
        _ => ident.value.to_ascii_lowercase(),
    }
}

/// The CTE names one query binds, and how many of them are visible at the
/// point the visitor has reached.
struct Scope {
    query: *const Query,
    names: Vec<String>,
    bodies: Vec<*const Query>,
    recursive: bool,
    /// Names `[..visible]` are in scope (all of them for `WITH RECURSIVE`).
    visible: usize,
}

impl Scope {
    fn binds(&self, name: &str) -> bool {
        let visible = if self.recursive { self.names.len() } else { self.visible };
        self.names[..visible].iter().any(|n| n == name)
    }
}

/// One pass over the statement: statement shapes, table factors, function
/// calls and relations, with CTE names resolved by scope.
struct Check<'a> {
    backend: Backend,
    tables: &'a HashSet<String>,
    scopes: Vec<Scope>,
    /// Relations that are the target of INSERT, UPDATE or DELETE: always a
    /// table, never a CTE.
    targets: Vec<*const ObjectName>,
}

fn refuse<T>(message: impl Into<String>) -> ControlFlow<String, T> {
    ControlFlow::Break(message.into())
}

impl Check<'_> {
    fn target_tables(&mut self, table: &TableWithJoins, what: &str) -> ControlFlow<String> {
        if !table.joins.is_empty() {
            return refuse(format!("{what} on a join is not allowed; name one table"));
        }
        match &table.relation {
            TableFactor::Table { name, .. } => {
                self.targets.push(name);
                ControlFlow::Continue(())
            }
            _ => refuse(format!("{what} must name one table")),
        }
    }

    fn check_insert(&mut self, insert: &Insert) -> ControlFlow<String> {
        let plain = !insert.ignore
            && !insert.overwrite
            && insert.partitioned.is_none()
            && insert.after_columns.is_empty()
            && !insert.has_table_keyword
            && insert.assignments.is_empty()
            && !insert.replace_into
            && insert.priority.is_none()
            && insert.insert_alias.is_none()
            && insert.settings.is_none()
            && insert.format_clause.is_none()
            && !matches!(insert.on, Some(OnInsert::DuplicateKeyUpdate(_)))
            && (insert.or.is_none() || self.backend == Backend::Sqlite);
        if !plain {
            return refuse(
                "this form of INSERT is not allowed; write INSERT INTO table (columns) VALUES/SELECT … [ON CONFLICT …] [RETURNING …]",
            );
        }
        match &insert.table {
            TableObject::TableName(name) => {
                self.targets.push(name);
                ControlFlow::Continue(())
            }
            _ => refuse("INSERT must name a table"),
        }
    }

    fn check_delete(&mut self, delete: &Delete) -> ControlFlow<String> {
        if !delete.tables.is_empty() || !delete.order_by.is_empty() || delete.limit.is_some() {
            return refuse(
                "this form of DELETE is not allowed; write DELETE FROM table [USING …] [WHERE …] [RETURNING …]",
            );
        }
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &delete.from;
        if from.len() != 1 {
            return refuse("DELETE must name one table");
        }
        self.target_tables(&from[0], "DELETE")
    }

    fn check_body(&self, body: &SetExpr, top: bool) -> ControlFlow<String> {
        match body {
            SetExpr::Select(select) => {
                if select.into.is_some() {
                    return refuse("SELECT … INTO creates a table; only SELECT, INSERT, UPDATE and DELETE are allowed");
                }
                let plain = select.top.is_none()
                    && select.exclude.is_none()
                    && select.lateral_views.is_empty()
                    && select.prewhere.is_none()
                    && select.cluster_by.is_empty()
                    && select.distribute_by.is_empty()
                    && select.sort_by.is_empty()
                    && select.qualify.is_none()
                    && select.value_table_mode.is_none()
                    && select.connect_by.is_none();
                if plain { ControlFlow::Continue(()) } else { refuse("this form of SELECT is not allowed") }
            }
            SetExpr::Query(_) | SetExpr::Values(_) => ControlFlow::Continue(()),
            SetExpr::SetOperation { left, right, .. } => {
                self.check_body(left, false)?;
                self.check_body(right, false)
            }
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) if top => ControlFlow::Continue(()),
            SetExpr::Table(_) => refuse("TABLE name is not allowed; write SELECT * FROM name"),
            _ => refuse("only SELECT, VALUES, INSERT, UPDATE and DELETE are allowed here"),
        }
    }

    fn check_function(&self, function: &sqlparser::ast::Function) -> ControlFlow<String> {
        let [part] = function.name.0.as_slice() else {
            return refuse(format!(
                "function {} is not allowed: call functions by their plain name, never schema-qualified",
                function.name
            ));
        };
        let Some(ident) = part.as_ident() else {
            return refuse(format!("function {} is not allowed", function.name));
        };
        let name = normal(self.backend, ident);
        if !function_allowed(self.backend, &name) {
            return refuse(format!(
                "function {} is not allowed: handlers may call only ordinary scalar, string, math, date, JSON and aggregate functions (none that changes the session, runs SQL it is given, reads files or builds huge values)",
                function.name
            ));
        }
        if function.uses_odbc_syntax || !matches!(function.parameters, FunctionArguments::None) {
            return refuse(format!("this form of calling {} is not allowed", function.name));
        }
        ControlFlow::Continue(())
    }

    fn check_type(&self, data_type: &DataType) -> ControlFlow<String> {
        match data_type {
            DataType::Regclass => refuse("casts to reg* types (catalog lookups) are not allowed"),
            DataType::Custom(name, _) => {
                let reg = name
                    .0
                    .last()
                    .and_then(|part| part.as_ident())
                    .is_some_and(|ident| ident.value.to_ascii_lowercase().starts_with("reg"));
                if name.0.len() > 1 {
                    refuse(format!("type {name} is not allowed: name types without a schema"))
                } else if reg {
                    refuse("casts to reg* types (catalog lookups) are not allowed")
                } else {
                    ControlFlow::Continue(())
                }
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn check_relation(&self, relation: &ObjectName) -> ControlFlow<String> {
        if is_reserved(relation) {
            return refuse(format!(
                "{relation} belongs to the host or the system catalog; handlers may use only their own tables"
            ));
        }
        let not_theirs = || {
            refuse(format!(
                "{relation} is not one of this handler's tables (its migrations create them; other handlers' tables must be listed in `uses`)"
            ))
        };
        let Some(parts) = relation
            .0
            .iter()
            .map(|part| part.as_ident().map(|ident| normal(self.backend, ident)))
            .collect::<Option<Vec<String>>>()
        else {
            return not_theirs();
        };
        let default_schema = match self.backend {
            Backend::Postgres => "public",
            Backend::Sqlite => "main",
        };
        let is_target = self.targets.iter().any(|target| std::ptr::eq(*target, relation));
        let table = match parts.as_slice() {
            // Only an unqualified name that is not a DML target can be a CTE.
            [name] if !is_target && self.scopes.iter().any(|scope| scope.binds(name)) => {
                return ControlFlow::Continue(());
            }
            [name] => name,
            [schema, name] if schema == default_schema => name,
            _ => return not_theirs(),
        };
        if self.tables.contains(table) { ControlFlow::Continue(()) } else { not_theirs() }
    }
}

impl Visitor for Check<'_> {
    type Break = String;

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<String> {
        match statement {
            Statement::Query(_) => ControlFlow::Continue(()),
            Statement::Insert(insert) => self.check_insert(insert),
            Statement::Update { table, or, limit, .. } => {
                if limit.is_some() || (or.is_some() && self.backend != Backend::Sqlite) {
                    return refuse(
                        "this form of UPDATE is not allowed; write UPDATE table SET … [FROM …] [WHERE …] [RETURNING …]",
                    );
                }
                self.target_tables(table, "UPDATE")
            }
            Statement::Delete(delete) => self.check_delete(delete),
            other => refuse(format!(
                "{} statements are not allowed: a handler may run only SELECT, INSERT, UPDATE and DELETE",
                leading_keyword(&other.to_string())
            )),
        }
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        let plain = query.for_clause.is_none()
            && query.settings.is_none()
            && query.format_clause.is_none()
            && query.pipe_operators.is_empty();
        if !plain {
            return refuse("this form of query is not allowed");
        }
        self.check_body(&query.body, true)?;
        // A CTE body starts: the names before it are visible in it (all of
        // them under WITH RECURSIVE).
        if let Some(scope) = self.scopes.last_mut()
            && let Some(i) = scope.bodies.iter().position(|body| std::ptr::eq(*body, query))
        {
            scope.visible = i;
        }
        let mut scope = Scope { query, names: Vec::new(), bodies: Vec::new(), recursive: false, visible: 0 };
        if let Some(with) = &query.with {
            scope.recursive = with.recursive;
            for cte in &with.cte_tables {
                let name = normal(self.backend, &cte.alias.name);
                if cte.from.is_some() {
                    return refuse("this form of WITH is not allowed");
                }
                if self.tables.contains(&name.to_ascii_lowercase()) {
                    return refuse(format!(
                        "the CTE {} has the name of one of the handler's tables; give it another name",
                        cte.alias.name
                    ));
                }
                if scope.names.contains(&name) {
                    return refuse(format!("the CTE name {} is used twice", cte.alias.name));
                }
                scope.names.push(name);
                scope.bodies.push(&*cte.query);
            }
        }
        self.scopes.push(scope);
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<String> {
        let scope = self.scopes.pop();
        debug_assert!(scope.is_some_and(|scope| std::ptr::eq(scope.query, query)));
        // A CTE body ended: the CTEs after it see its name.
        if let Some(scope) = self.scopes.last_mut()
            && let Some(i) = scope.bodies.iter().position(|body| std::ptr::eq(*body, query))
        {
            scope.visible = i + 1;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<String> {
        match factor {
            TableFactor::Table {
                name,
                args,
                with_hints,
                version,
                with_ordinality,
                partitions,
                json_path,
                sample,
                index_hints,
                ..
            } => {
                if args.is_some() || *with_ordinality {
                    return refuse(format!(
                        "function {name} in FROM is not allowed: handlers may read only their tables (and CTEs, subqueries)"
                    ));
                }
                let plain = with_hints.is_empty()
                    && version.is_none()
                    && partitions.is_empty()
                    && json_path.is_none()
                    && sample.is_none()
                    && index_hints.is_empty();
                if plain {
                    ControlFlow::Continue(())
                } else {
                    refuse(format!("this form of naming {name} is not allowed"))
                }
            }
            TableFactor::Derived { .. } | TableFactor::NestedJoin { .. } => ControlFlow::Continue(()),
            TableFactor::Function { name, .. } => refuse(format!(
                "function {name} in FROM is not allowed: handlers may read only their tables (and CTEs, subqueries)"
            )),
            TableFactor::TableFunction { .. }
            | TableFactor::UNNEST { .. }
            | TableFactor::JsonTable { .. }
            | TableFactor::OpenJsonTable { .. }
            | TableFactor::XmlTable { .. } => {
                refuse("functions in FROM are not allowed: handlers may read only their tables (and CTEs, subqueries)")
            }
            _ => refuse("this kind of FROM item is not allowed: name a table, a CTE or a subquery"),
        }
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<String> {
        self.check_relation(relation)
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
        match expr {
            Expr::Function(function) => self.check_function(function),
            Expr::BinaryOp { op: BinaryOperator::PGCustomBinaryOperator(_), .. } => {
                refuse("OPERATOR(…) is not allowed; write the operator itself")
            }
            // PostgreSQL reads these keywords as session functions, whatever
            // sqlparser takes them for.
            Expr::Identifier(ident)
                if self.backend == Backend::Postgres
                    && ident.quote_style.is_none()
                    && PG_SESSION_WORDS.contains(&ident.value.to_ascii_lowercase().as_str()) =>
            {
                refuse(format!("{} reads the session; it is not allowed", ident.value))
            }
            Expr::Cast { data_type, .. } | Expr::TypedString(TypedString { data_type, .. }) => {
                self.check_type(data_type)
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

fn is_reserved(name: &ObjectName) -> bool {
    let parts: Vec<String> =
        name.0.iter().filter_map(|part| part.as_ident().map(|ident| ident.value.to_ascii_lowercase())).collect();
    let Some(table) = parts.last() else {
        return false;
    };
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
            Token::Placeholder(p)
                if p.len() > 1 && p.starts_with('$') && p[1..].bytes().all(|b| b.is_ascii_digit()) =>
            {
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
            "SELECT pg_sleep(1)",
        ] {
            for verdict in both(sql) {
                assert!(verdict.is_err(), "{sql} was admitted");
            }
        }
        assert!(judge(Backend::Postgres, &own(), "SELECT count(*), now() FROM orders").is_ok());
    }

    #[test]
    fn sqlite_placeholders_are_numbered_and_literals_kept() {
        let sql = judge(Backend::Sqlite, &own(), "UPDATE t SET a = $2, b = '$1' WHERE k = $1").unwrap();
        assert_eq!(sql, "UPDATE t SET a = ?2, b = '$1' WHERE k = ?1");
        let sql = "UPDATE t SET a = $2 WHERE k = $1";
        assert_eq!(judge(Backend::Postgres, &own(), sql).unwrap(), sql);
    }

    #[test]
    fn question_mark_placeholders_on_postgres_say_how_to_write_them() {
        let refusal = judge(Backend::Postgres, &own(), "SELECT * FROM orders WHERE order_id = ?1").unwrap_err();
        assert!(refusal.contains("write $1"), "{refusal}");
        assert_eq!(placeholder_count(Backend::Postgres, "SELECT $2, '$7', $1 FROM orders"), Ok(2));
        assert_eq!(placeholder_count(Backend::Sqlite, "SELECT 1"), Ok(0));
    }

    #[test]
    fn verdicts_are_cached() {
        let policy = Policy::new(Backend::Postgres, ["orders".to_string()]);
        assert!(policy.check("COMMIT").is_err());
        assert!(policy.check("SELECT 1 FROM orders").is_ok());
        assert_eq!(policy.cache.read().unwrap().verdicts.len(), 2);
    }

    fn refused_on(backend: Backend, sqls: &[&str]) {
        for sql in sqls {
            let verdict = judge_guarded(backend, &own(), sql);
            assert!(verdict.is_err(), "{sql} was admitted on {backend:?}");
        }
    }

    fn refused(sqls: &[&str]) {
        refused_on(Backend::Postgres, sqls);
        refused_on(Backend::Sqlite, sqls);
    }

    fn admitted_on(backend: Backend, sqls: &[&str]) {
        for sql in sqls {
            let verdict = judge_guarded(backend, &own(), sql);
            assert!(verdict.is_ok(), "{sql} was refused on {backend:?}: {verdict:?}");
        }
    }

    /// Kind 1: a function is a function wherever it is called, above all
    /// in FROM.
    #[test]
    fn refuses_every_function_in_from() {
        refused(&[
            "SELECT * FROM LATERAL set_config('role','none',true)",
            "SELECT * FROM orders, LATERAL set_config('role', 'none', true) s",
            "SELECT * FROM generate_series(1, 10)",
            "SELECT * FROM json_each('[1]')",
            "SELECT * FROM orders o, json_each(o.data)",
            "SELECT * FROM lower('x')",
            "SELECT * FROM count(1)",
            "SELECT * FROM orders JOIN LATERAL lower(orders.status) x ON true",
            "SELECT * FROM (SELECT * FROM generate_series(1, 2)) s",
            "UPDATE orders SET status = 'x' FROM generate_series(1, 2) g",
            "DELETE FROM orders USING json_each('[1]') j",
        ]);
        refused_on(
            Backend::Postgres,
            &[
                "SELECT * FROM unnest(ARRAY[1, 2])",
                "SELECT * FROM ROWS FROM (generate_series(1, 2))",
                "SELECT * FROM generate_series(1, 2) WITH ORDINALITY",
            ],
        );
    }

    /// Kind 1 too: function calls are found wherever sqlparser puts them.
    #[test]
    fn finds_functions_everywhere() {
        refused(&[
            "SELECT a FROM orders ORDER BY set_config('role', 'none', true)",
            "INSERT INTO orders (a) VALUES (1) RETURNING set_config('role', 'none', true)",
            "INSERT INTO orders (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = set_config('role', 'none', true)",
            "SELECT count(*) FILTER (WHERE set_config('role', 'none', true) = '') FROM orders",
            "SELECT rank() OVER (ORDER BY set_config('role', 'none', true)) FROM orders",
            "SELECT rank() OVER (PARTITION BY set_config('role', 'none', true)) FROM orders",
            "SELECT CASE WHEN true THEN set_config('role', 'none', true) END",
            "SELECT CAST(set_config('role', 'none', true) AS text)",
            "SELECT (SELECT (SELECT set_config('role', 'none', true)))",
            "SELECT * FROM orders WHERE EXISTS (SELECT set_config('role', 'none', true))",
            "SELECT a FROM orders GROUP BY a HAVING max(set_config('role', 'none', true)) = ''",
            "UPDATE orders SET a = 1 WHERE a IN (SELECT set_config('role', 'none', true))",
            "WITH x AS (SELECT set_config('role', 'none', true)) SELECT * FROM x",
            "SELECT coalesce(NULL, set_config('role', 'none', true))",
        ]);
        refused_on(
            Backend::Postgres,
            &[
                "SELECT (ARRAY[set_config('role', 'none', true)])[1]",
                "SELECT ARRAY[1][set_config('role', 'none', true)::int]",
                "SELECT string_agg(a, ',' ORDER BY set_config('role', 'none', true)) FROM orders",
                "SELECT a FROM orders WINDOW w AS (ORDER BY set_config('role', 'none', true))",
            ],
        );
    }

    /// Kind 2: names as the database reads them.
    #[test]
    fn refuses_spellings_the_database_reads_differently() {
        refused(&[
            r#"SELECT U&"\0073et_config"('role', 'none', true)"#,
            r#"SELECT u&"\0073et_config"('role', 'none', true)"#,
            r"SELECT U&'\0073' FROM orders",
            r"SELECT u&'\0073' FROM orders",
            r"SELECT U&'!0073' UESCAPE '!'",
            r#"SELECT * FROM U&"\006frders""#,
            "SELECT pg_catalog.lower('X')",
            "SELECT public.lower('X')",
            "SELECT main.lower('X')",
            "SELECT \"SET_CONFIG\"('role', 'none', true)",
            "SELECT SET_CONFIG('role', 'none', true)",
        ]);
        refused_on(
            Backend::Postgres,
            &[
                "SELECT 1 OPERATOR(pg_catalog.+) 1",
                "SELECT a FROM orders WHERE a OPERATOR(public.=) 1",
                "SELECT \"LOWER\"('X')",
                "SELECT CAST('orders' AS regclass)",
                "SELECT 'orders'::regclass",
                "SELECT 'set_config'::regproc",
                "SELECT CAST('x' AS pg_catalog.text)",
                "SELECT current_user",
                "SELECT session_user",
                "SELECT current_role",
            ],
        );
        admitted_on(Backend::Postgres, &["SELECT \"lower\"('X'), LOWER('X'), Count(*) FROM orders"]);
        admitted_on(Backend::Sqlite, &["SELECT \"LOWER\"('X'), Count(*) FROM orders"]);
    }

    /// Kind 3: CTE names have a scope; DML targets and qualified names are
    /// always tables.
    #[test]
    fn resolves_cte_names_by_scope() {
        refused(&[
            // A DML target is never a CTE.
            "WITH secrets AS (SELECT 1) UPDATE secrets SET a = 1",
            "WITH secrets AS (SELECT 1) DELETE FROM secrets",
            "WITH secrets AS (SELECT 1) INSERT INTO secrets VALUES (1)",
            // A CTE with a handler table's name: refused outright.
            "WITH orders AS (SELECT 1) UPDATE orders SET a = 1",
            "WITH orders AS (SELECT 1) SELECT * FROM orders",
            // A qualified name is never a CTE.
            "WITH secrets AS (SELECT 1) SELECT * FROM public.secrets",
            "WITH secrets AS (SELECT 1) SELECT * FROM main.secrets",
            // A CTE inside a subquery names nothing outside it.
            "SELECT * FROM (WITH secrets AS (SELECT 1) SELECT * FROM secrets) s, secrets",
            "SELECT (WITH secrets AS (SELECT 1) SELECT 1), (SELECT count(*) FROM secrets)",
            // Not recursive: the inner name is the real table.
            "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets",
            // Not recursive: a later CTE is not visible in an earlier one.
            "WITH a AS (SELECT * FROM secrets), secrets AS (SELECT 1) SELECT * FROM a",
            "WITH a AS (SELECT 1), a AS (SELECT 2) SELECT * FROM a",
        ]);
        admitted_on(
            Backend::Postgres,
            &[
                "WITH a AS (SELECT 1 AS x), b AS (SELECT x FROM a) SELECT * FROM b",
                "WITH a AS (SELECT * FROM orders) SELECT * FROM a JOIN (SELECT * FROM a) a2 ON true",
                "WITH a AS (SELECT 1 AS x) SELECT * FROM (SELECT * FROM a) s",
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) SELECT x FROM c",
                "WITH a AS (SELECT 1 AS x) UPDATE orders SET a = 1 FROM a",
                "WITH a AS (SELECT 1 AS x) INSERT INTO orders (a) SELECT x FROM a",
                "WITH a AS (SELECT 1 AS x) SELECT * FROM orders WHERE a IN (SELECT x FROM a)",
            ],
        );
    }

    /// Kind 4: only functions on the backend's allowlist.
    #[test]
    fn refuses_functions_off_the_allowlist() {
        refused(&[
            "SELECT query_to_xml('SELECT * FROM secrets', true, true, '')",
            "SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')",
            "SELECT cursor_to_xml('c', 1, true, true, '')",
            "SELECT table_to_xml('secrets', true, true, '')",
            "SELECT schema_to_xml('public', true, true, '')",
            "SELECT database_to_xml(true, true, '')",
            "SELECT xpath('/a', '<a/>')",
            "SELECT dblink('host=x', 'SELECT 1')",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT lo_import('/etc/passwd')",
            "SELECT set_config('role', 'none', true)",
            "SELECT current_setting('role')",
            "SELECT txid_current()",
            "SELECT nextval('s')",
            "SELECT setval('s', 1)",
            "SELECT currval('s')",
            "SELECT lastval()",
            "SELECT repeat('x', 1000000000)",
            "SELECT lpad('x', 1000000000)",
            "SELECT rpad('x', 1000000000)",
            "SELECT format('%s', 1)",
            "SELECT printf('%s', 1)",
            "SELECT randomblob(1000000000)",
            "SELECT zeroblob(1000000000)",
            "SELECT hex(zeroblob(1000))",
            "SELECT generate_series(1, 10000000)",
            "SELECT version()",
            "SELECT changes()",
            "SELECT last_insert_rowid()",
            "SELECT sqlite_version()",
            "SELECT load_extension('x')",
            "SELECT readfile('/etc/passwd')",
            "SELECT no_such_function(1)",
        ]);
        for name in REFUSED_EXAMPLES {
            for backend in [Backend::Postgres, Backend::Sqlite] {
                assert!(!function_allowed(backend, name), "{name} is on the {backend:?} allowlist");
            }
        }
    }

    /// Names the allowlists must never hold (the comment on
    /// `COMMON_FUNCTIONS` says why).
    #[rustfmt::skip]
    const REFUSED_EXAMPLES: &[&str] = &[
        "query_to_xml", "query_to_xml_and_xmlschema", "cursor_to_xml", "table_to_xml", "schema_to_xml",
        "database_to_xml", "xpath", "xpath_exists", "dblink", "dblink_exec", "set_config", "current_setting",
        "current_user", "session_user", "current_role", "user", "current_schema", "current_database", "version",
        "txid_current", "pg_sleep", "pg_advisory_lock", "pg_read_file", "lo_import", "nextval", "setval", "currval",
        "lastval", "repeat", "lpad", "rpad", "format", "printf", "randomblob", "zeroblob", "generate_series",
        "changes", "total_changes", "last_insert_rowid", "sqlite_version", "load_extension", "readfile", "writefile",
        "edit", "fts3_tokenizer", "to_regclass", "unnest", "json_each", "json_tree",
    ];

    /// Kind 4's other side: what the bundled handlers, the SDK's examples
    /// and the benchmark run is still admitted.
    #[test]
    fn admits_the_bundled_handlers_statements() {
        let tables: HashSet<String> = [
            "orders",
            "order_events",
            "payments",
            "shipments",
            "hostile_notes",
            "test_effects",
            "test_flags",
            "test_unique",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        for sql in [
            // handlers/order-created
            "INSERT INTO orders (order_id, customer_id, total, status)
         VALUES ($1, $2, $3, 'pending')
         ON CONFLICT (order_id) DO NOTHING
         RETURNING order_id, status",
            "INSERT INTO order_events (order_id, kind, event_source, event_id)
         VALUES ($1, 'created', $2, $3)",
            "SELECT customer_id, CAST(total AS TEXT) AS total, status FROM orders WHERE order_id = $1",
            // handlers/order-payment
            "UPDATE orders SET status = 'paid', updated_at = CURRENT_TIMESTAMP
         WHERE order_id = $1 AND status = 'pending'
         RETURNING order_id",
            "INSERT INTO payments (payment_id, order_id, amount, paid_at)
         VALUES ($1, $2, $3, CURRENT_TIMESTAMP)
         ON CONFLICT (payment_id) DO NOTHING
         RETURNING payment_id",
            "INSERT INTO order_events (order_id, kind, event_source, event_id)
         VALUES ($1, 'paid', $2, $3)",
            "SELECT o.status AS status, p.payment_id AS payment_id
         FROM orders o LEFT JOIN payments p ON p.order_id = o.order_id
         WHERE o.order_id = $1",
            "SELECT order_id FROM payments WHERE payment_id = $1",
            // tests/handlers
            "INSERT INTO hostile_notes (k) VALUES ($1)",
            "SELECT 1",
            "INSERT INTO test_effects (event_source, event_id, kind) VALUES ($1, $2, $3)",
            "SELECT name FROM test_flags WHERE name = 'fail'",
            "INSERT INTO test_unique (k) VALUES ($1)",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000000) \
                 SELECT count(*) AS n FROM c",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000) \
                 SELECT x FROM c",
            // guest-sdk examples
            "INSERT INTO shipments (order_id, carrier, weight_kg, event_source, event_id, shipped_at)
          VALUES ($1, $2, $3, $4, $5, CURRENT_TIMESTAMP)
          ON CONFLICT (order_id) DO NOTHING
          RETURNING order_id",
            "SELECT carrier FROM shipments WHERE order_id = $1",
            "UPDATE orders SET status = 'shipped', updated_at = CURRENT_TIMESTAMP WHERE order_id = $1",
            "SELECT status FROM orders WHERE order_id = $1",
            // bench/pgbench-order-created.sql (the handler's part)
            "INSERT INTO orders (order_id, customer_id, total, status)
  VALUES ('pgb-' || (CAST($1 AS text) || '-' || CAST($2 AS text)), 'c-1', 12.50, 'pending')
  ON CONFLICT (order_id) DO NOTHING RETURNING order_id, status",
        ] {
            for backend in [Backend::Postgres, Backend::Sqlite] {
                let verdict = judge_guarded(backend, &tables, sql);
                assert!(verdict.is_ok(), "{sql} was refused on {backend:?}: {verdict:?}");
            }
        }
        // The hostile handler's attacks stay refused.
        for sql in [
            "SELECT pg_sleep(600)",
            "SELECT generate_series(1, 10000000) AS x",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10) \
                 SELECT repeat('x', 1048576) AS blob FROM c",
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10) \
                 SELECT hex(zeroblob(524288)) AS blob FROM c",
            "UPDATE test_effects SET note = 'pwned'",
        ] {
            for backend in [Backend::Postgres, Backend::Sqlite] {
                let mut tables = tables.clone();
                tables.remove("test_effects");
                assert!(judge_guarded(backend, &tables, sql).is_err(), "{sql} was admitted on {backend:?}");
            }
        }
    }

    /// Kind 5: statement shapes are an allowlist too.
    #[test]
    fn admits_only_plain_statement_shapes() {
        refused(&[
            "SELECT * INTO t2 FROM orders",
            "TABLE orders",
            "SELECT 1 UNION TABLE orders",
            "SELECT 1 UNION (TABLE orders)",
        ]);
        refused_on(
            Backend::Postgres,
            &[
                "LOCK TABLE orders",
                "SELECT * FROM orders TABLESAMPLE SYSTEM (10)",
                "INSERT OR REPLACE INTO orders VALUES (1)",
            ],
        );
        refused_on(Backend::Sqlite, &["DELETE FROM orders LIMIT 1", "UPDATE orders SET a = 1 LIMIT 1"]);
        admitted_on(
            Backend::Postgres,
            &["SELECT * FROM orders FOR UPDATE", "SELECT * FROM orders FOR SHARE SKIP LOCKED"],
        );
        // SQLite's own conflict clause (`REPLACE INTO` is `INSERT OR REPLACE`).
        admitted_on(
            Backend::Sqlite,
            &["INSERT OR IGNORE INTO orders (a) VALUES (1)", "REPLACE INTO orders (a) VALUES (1)"],
        );
        for backend in [Backend::Postgres, Backend::Sqlite] {
            admitted_on(backend, &["VALUES (1), (2)", "SELECT 1 UNION ALL SELECT a FROM orders", "(SELECT 1)"]);
        }
    }

    /// Kind 6: a panic in the parser is a refusal.
    #[test]
    fn a_parser_panic_is_a_refusal() {
        for sql in ["SELECT 1 MATCH", "SELECT 1 REGEXP", "SELECT a FROM orders WHERE a MATCH"] {
            assert!(judge_guarded(Backend::Sqlite, &own(), sql).is_err(), "{sql}");
        }
        // The guard itself: whatever panics inside is answered with a
        // refusal (the second panic is not printed).
        for _ in 0..2 {
            let caught = catch_unwind(|| guarded::<String>(|| panic!("a parser bug")));
            assert!(matches!(caught, Ok(Err(_))), "{caught:?}");
        }
        assert!(!JUDGING.with(Cell::get));
        let policy = Policy::new(Backend::Sqlite, ["orders".to_string()]);
        assert!(policy.check("SELECT 1 MATCH").is_err());
    }

    /// Kind 7: work is bounded before it starts.
    #[test]
    fn refuses_long_sql_before_parsing_and_bounds_the_cache_in_bytes() {
        let policy = Policy::new(Backend::Postgres, ["orders".to_string()]);
        let long = format!("SELECT 1{}", " ".repeat(MAX_SQL_BYTES));
        assert!(policy.check(&long).is_err());
        assert!(policy.cache.read().unwrap().verdicts.is_empty(), "a verdict on too long a text is not cached");
        let huge = format!("SELECT '{}'", "x".repeat(5 * 1024 * 1024));
        let started = std::time::Instant::now();
        assert!(policy.check(&huge).is_err());
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        for i in 0..1200 {
            let sql = format!("SELECT {i} AS a{} FROM orders", "x".repeat(MAX_SQL_BYTES / 16));
            let _ = policy.check(&sql);
            let cache = policy.cache.read().unwrap();
            assert!(cache.bytes <= CACHE_BYTES);
            let counted: usize =
                cache.verdicts.iter().map(|(k, v)| k.len() + verdict_len(v) + CACHE_ENTRY_OVERHEAD).sum();
            assert_eq!(counted, cache.bytes);
        }
    }

    #[test]
    fn rewrites_only_placeholders() {
        assert_eq!(
            rewrite_placeholders(Backend::Sqlite, "SELECT $2, '$1' FROM x WHERE a = $1"),
            "SELECT ?2, '$1' FROM x WHERE a = ?1"
        );
        assert_eq!(rewrite_placeholders(Backend::Postgres, "SELECT $2, set_config()"), "SELECT $2, set_config()");
        assert_eq!(
            rewrite_placeholders(Backend::Sqlite, "SELECT $1 COMMIT; DROP TABLE x"),
            "SELECT ?1 COMMIT; DROP TABLE x"
        );
        assert_eq!(rewrite_placeholders(Backend::Sqlite, "SELECT 'unterminated $1"), "SELECT 'unterminated $1");
    }
}
