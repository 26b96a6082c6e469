//! Conversions between the WIT `value` and the database drivers, in one
//! place: parameters into `sqlx` binds, result rows into WIT rows, and
//! driver errors into the WIT `db-error` a handler sees.
//!
//! PostgreSQL is strict about parameter types, so each WIT value is bound as
//! the type it names (`numeric` as NUMERIC, `timestamp` as TIMESTAMPTZ,
//! `json` as JSONB) and `null` is bound untyped so it fits any column.
//! SQLite stores what it gets; numeric and timestamp travel as text.

use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgArguments, PgRow, PgTypeInfo};
use sqlx::postgres::types::Oid;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Column, Postgres, Row, Sqlite, TypeInfo, ValueRef};

pub use crate::bindings::exactly::handler::types::{DbError, DbErrorKind, Rows, Value};
use crate::rejection::{LimitKind, Rejection};
use crate::storage::ErrorClass;

pub enum StatementOutput {
    Rows(Rows),
    Affected(u64),
}

/// A handler statement that did not succeed: what the handler is told
/// (`error`), and what it means for the event (`fault`).
#[derive(Debug)]
pub struct StatementError {
    pub error: DbError,
    pub fault: StatementFault,
}

/// Why a handler's statement did not succeed, and so why its event can no
/// longer commit: whose fault it is and which answer follows
/// (`runtime::Run::judge` turns it into the event's
/// [`Rejection`](crate::rejection::Rejection)). The first one of an event
/// dooms it: nothing of the event commits, whatever the handler returns.
#[derive(Debug, Clone)]
pub enum StatementFault {
    /// The handler's statement failed in the database (data, a conflict, a
    /// mistake in the SQL): the handler's own error decides the answer, and
    /// returning `Ok` anyway is 500 `statement-failed`.
    Failed(String),
    /// Refused by the filter or by the database's own wall (no privilege,
    /// SQLite's authorizer): 422 `statement-refused`, since running it again
    /// is refused again.
    Refused(String),
    /// A sandbox limit: 500 with the limit's code.
    Limit(LimitKind, String),
    /// The database's trouble (unreachable, contended): its 503, whatever
    /// the handler returns.
    Database(Rejection),
}

impl StatementFault {
    /// Words for the handler's later statements and the logs.
    pub fn describe(&self) -> String {
        match self {
            StatementFault::Refused(message) | StatementFault::Failed(message) | StatementFault::Limit(_, message) => {
                message.clone()
            }
            StatementFault::Database(rejection) => rejection.to_string(),
        }
    }
}

impl StatementError {
    pub fn from_sqlx(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.into_owned());
                let kind = match db.kind() {
                    sqlx::error::ErrorKind::UniqueViolation
                    | sqlx::error::ErrorKind::ForeignKeyViolation
                    | sqlx::error::ErrorKind::NotNullViolation
                    | sqlx::error::ErrorKind::CheckViolation
                    | sqlx::error::ErrorKind::ExclusionViolation => DbErrorKind::ConstraintViolation,
                    _ => DbErrorKind::Failed,
                };
                let message = db.message().to_owned();
                let (kind, fault) = match ErrorClass::of_database(db.as_ref()) {
                    // statement_timeout, or SQLITE_INTERRUPT at the event's
                    // deadline: the handler's statement ran too long.
                    ErrorClass::Timeout => (kind, StatementFault::Limit(LimitKind::StatementTimeout, message.clone())),
                    // insufficient_privilege: the per-handler role's wall;
                    // SQLITE_AUTH: SQLite's authorizer (storage::sqlite_guard).
                    ErrorClass::Privilege => (DbErrorKind::Refused, StatementFault::Refused(message.clone())),
                    ErrorClass::Contention => (kind, StatementFault::Database(Rejection::Busy(message.clone()))),
                    ErrorClass::Unavailable => {
                        (kind, StatementFault::Database(Rejection::DatabaseUnavailable(message.clone())))
                    }
                    // SQLITE_TOOBIG: past the length limit the host set,
                    // as a result over the cap is on PostgreSQL.
                    ErrorClass::TooBig => (kind, StatementFault::Limit(LimitKind::ResultBytes, message.clone())),
                    ErrorClass::Data | ErrorClass::Conflict | ErrorClass::Other => {
                        (kind, StatementFault::Failed(message.clone()))
                    }
                };
                StatementError { error: DbError { kind, code, message }, fault }
            }
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::Encode(_) => {
                StatementError::conversion(error.to_string())
            }
            _ => StatementError {
                error: DbError { kind: DbErrorKind::Failed, code: None, message: error.to_string() },
                fault: StatementFault::Database(Rejection::DatabaseUnavailable(error.to_string())),
            },
        }
    }

    pub fn conversion(message: impl Into<String>) -> Self {
        let message = message.into();
        StatementError {
            fault: StatementFault::Failed(message.clone()),
            error: DbError { kind: DbErrorKind::Conversion, code: None, message },
        }
    }

    pub fn limit(limit: LimitKind, message: String) -> Self {
        StatementError {
            fault: StatementFault::Limit(limit, message.clone()),
            error: DbError { kind: DbErrorKind::Failed, code: None, message },
        }
    }

    /// A statement the database's own guard refused before running it
    /// (SQLite's authorizer, more than one statement in the text).
    pub fn refused(message: String) -> Self {
        StatementError {
            fault: StatementFault::Refused(message.clone()),
            error: DbError { kind: DbErrorKind::Refused, code: None, message },
        }
    }
}

/// NULL with no declared type: PostgreSQL infers it from the context, so a
/// null fits an integer or timestamp column as well as a text one.
struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(&self, _buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        Ok(IsNull::Yes)
    }
}

/// Most parameters one handler statement may bind. PostgreSQL's protocol
/// allows 65,535 and SQLite 32,766; a handler that needs more than a
/// thousand is building a batch the host would rather see as several
/// statements (each counted against `max_statements`).
pub const MAX_PARAMS: usize = 1_000;

/// Longest `numeric` parameter, in characters (bytes: the text must be
/// ASCII to be a decimal anyway). Parsing decimal text into a big decimal
/// costs more than linear time: a 4,000,000-digit parameter took 36 s on a
/// tokio worker before this bound. PostgreSQL's own `numeric` keeps up to
/// 131,072 digits before the point, so this is exactly's limit, not the
/// database's; a handler that needs more can bind the value as text and
/// cast it in SQL (`$1::numeric`), where the database's statement timeout
/// bounds the work.
pub const MAX_NUMERIC_CHARS: usize = 1_000;

/// The most bytes a `numeric` of [`MAX_NUMERIC_CHARS`] digits takes in
/// PostgreSQL's binary format: an 8-byte header, then 2 bytes per 4 decimal
/// digits (plus one group on each side for the alignment to the point).
const MAX_NUMERIC_WIRE_BYTES: usize = 8 + 2 * (MAX_NUMERIC_CHARS / 4 + 2);

/// Longest `timestamp` parameter, in bytes. An RFC 3339 timestamp is at
/// most about 35 bytes (nanoseconds and an offset); anything longer is not
/// one, and is refused before it is parsed or quoted into a message.
pub const MAX_TIMESTAMP_CHARS: usize = 64;

/// Checks a handler statement's parameters before anything is parsed,
/// converted or bound: at most [`MAX_PARAMS`] of them, together at most
/// `max_bytes` (the handler's `max_result_bytes`: a statement's bytes are
/// bounded the same way in and out, counted by [`value_size`]), each
/// `numeric` at most [`MAX_NUMERIC_CHARS`] and each `timestamp` at most
/// [`MAX_TIMESTAMP_CHARS`] long.
///
/// The count and the total are sandbox limits (500, like `max_rows` and
/// `max_result_bytes`): they are the same kind of budget, the operator may
/// raise the total per handler in the manifest, and a retry after that
/// succeeds. An over-long `numeric` or `timestamp` is a conversion error
/// like any other malformed value (the handler is told, and the event
/// fails unless the handler answers an error of its own): no setting makes
/// it valid.
pub fn check_params(params: &[Value], max_bytes: u64) -> Result<(), StatementError> {
    if params.len() > MAX_PARAMS {
        return Err(StatementError::limit(
            LimitKind::Parameters,
            format!("the statement has {} parameters; exactly binds at most {MAX_PARAMS}", params.len()),
        ));
    }
    let total: u64 = params.iter().map(value_size).sum();
    if total > max_bytes {
        return Err(StatementError::limit(
            LimitKind::Parameters,
            format!("the statement's parameters take {total} bytes; the handler's max_result_bytes is {max_bytes}"),
        ));
    }
    for (index, param) in params.iter().enumerate() {
        let n = index + 1;
        match param {
            Value::Numeric(text) if text.len() > MAX_NUMERIC_CHARS => {
                return Err(StatementError::conversion(format!(
                    "parameter ${n}: a numeric of {} characters; exactly takes at most {MAX_NUMERIC_CHARS} \
                     (bind it as text and cast it in SQL if it must be longer)",
                    text.len()
                )));
            }
            Value::Timestamp(text) if text.len() > MAX_TIMESTAMP_CHARS => {
                return Err(StatementError::conversion(format!(
                    "parameter ${n}: a timestamp of {} characters is not an RFC 3339 timestamp (at most {MAX_TIMESTAMP_CHARS})",
                    text.len()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;
type SqliteQuery<'q> = Query<'q, Sqlite, SqliteArguments>;

/// The text a PostgreSQL handler statement is prepared (and cached) under:
/// the handler's text behind a comment naming the kind of each parameter,
/// so a text run again with values of other kinds is prepared again. The
/// driver caches prepared statements by text alone, with the parameter
/// types of their first use, and binds later values in their own binary
/// form: the float 3.0 bound where an integer was first would be read as
/// the integer 4613937818241073152 (issue 10). The comment holds only
/// kind letters, never a value, and ends before the handler's text begins.
pub fn postgres_statement_text(sql: &str, params: &[Value]) -> String {
    if params.is_empty() {
        return sql.to_owned();
    }
    let kinds: String = params
        .iter()
        .map(|param| match param {
            Value::Null => 'n',
            Value::Boolean(_) => 'b',
            Value::Int(_) => 'i',
            Value::Float(_) => 'f',
            Value::Text(_) => 't',
            Value::Bytes(_) => 'y',
            Value::Json(_) => 'j',
            Value::Numeric(_) => 'd',
            Value::Timestamp(_) => 's',
        })
        .collect();
    format!("/* exactly parameters: {kinds} */ {sql}")
}

pub fn bind_postgres(mut query: PgQuery<'_>, params: Vec<Value>) -> Result<PgQuery<'_>, StatementError> {
    for (index, param) in params.into_iter().enumerate() {
        let n = index + 1;
        query = match param {
            Value::Null => query.bind(UntypedNull),
            Value::Boolean(b) => query.bind(b),
            Value::Int(i) => query.bind(i),
            Value::Float(f) => query.bind(f),
            Value::Text(s) => query.bind(s),
            Value::Bytes(b) => query.bind(b),
            Value::Json(text) => query.bind(sqlx::types::Json(parse_json(n, &text)?)),
            Value::Numeric(text) => query.bind(
                BigDecimal::from_str(text.trim())
                    .map_err(|_| StatementError::conversion(format!("parameter ${n}: {text:?} is not a decimal number")))?,
            ),
            Value::Timestamp(text) => query.bind(parse_timestamp(n, &text)?),
        };
    }
    Ok(query)
}

pub fn bind_sqlite(mut query: SqliteQuery<'_>, params: Vec<Value>) -> Result<SqliteQuery<'_>, StatementError> {
    for (index, param) in params.into_iter().enumerate() {
        let n = index + 1;
        query = match param {
            Value::Null => query.bind(None::<i64>),
            Value::Boolean(b) => query.bind(b),
            Value::Int(i) => query.bind(i),
            Value::Float(f) => query.bind(f),
            Value::Text(s) => query.bind(s),
            Value::Bytes(b) => query.bind(b),
            Value::Json(text) => {
                parse_json(n, &text)?;
                query.bind(text)
            }
            Value::Numeric(text) => {
                BigDecimal::from_str(text.trim())
                    .map_err(|_| StatementError::conversion(format!("parameter ${n}: {text:?} is not a decimal number")))?;
                query.bind(text)
            }
            Value::Timestamp(text) => query.bind(parse_timestamp(n, &text)?.to_rfc3339()),
        };
    }
    Ok(query)
}

fn parse_json(n: usize, text: &str) -> Result<serde_json::Value, StatementError> {
    serde_json::from_str(text).map_err(|e| StatementError::conversion(format!("parameter ${n} is not valid JSON: {e}")))
}

fn parse_timestamp(n: usize, text: &str) -> Result<DateTime<Utc>, StatementError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StatementError::conversion(format!("parameter ${n}: {text:?} is not an RFC 3339 timestamp ({e})")))
}

pub fn row_from_postgres(row: &PgRow) -> Result<Vec<Value>, StatementError> {
    let mut values = Vec::with_capacity(row.len());
    for (index, column) in row.columns().iter().enumerate() {
        let raw = row.try_get_raw(index).map_err(StatementError::from_sqlx)?;
        if raw.is_null() {
            values.push(Value::Null);
            continue;
        }
        let type_name = column.type_info().name().to_owned();
        let get = |e: sqlx::Error| StatementError::from_sqlx(e);
        let value = match type_name.as_str() {
            "BOOL" => Value::Boolean(row.try_get(index).map_err(get)?),
            "INT2" => Value::Int(row.try_get::<i16, _>(index).map_err(get)?.into()),
            "INT4" => Value::Int(row.try_get::<i32, _>(index).map_err(get)?.into()),
            "INT8" => Value::Int(row.try_get(index).map_err(get)?),
            "OID" => Value::Int(row.try_get::<Oid, _>(index).map_err(get)?.0.into()),
            "FLOAT4" => Value::Float(row.try_get::<f32, _>(index).map_err(get)?.into()),
            "FLOAT8" => Value::Float(row.try_get(index).map_err(get)?),
            "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" | "CHAR" | "UNKNOWN" | "CITEXT" => {
                Value::Text(row.try_get(index).map_err(get)?)
            }
            "BYTEA" => Value::Bytes(row.try_get(index).map_err(get)?),
            "JSON" | "JSONB" => Value::Json(row.try_get::<serde_json::Value, _>(index).map_err(get)?.to_string()),
            // Decoding a big numeric costs more than linear time (see
            // MAX_NUMERIC_CHARS): refuse one longer than a parameter
            // may be, by its wire size, before decoding it.
            "NUMERIC" if raw.as_bytes().map_or(0, <[u8]>::len) > MAX_NUMERIC_WIRE_BYTES => {
                return Err(StatementError::conversion(format!(
                    "column {:?} holds a numeric of more than {MAX_NUMERIC_CHARS} digits; cast it in SQL (e.g. `{}::text`)",
                    column.name(),
                    column.name()
                )));
            }
            "NUMERIC" => Value::Numeric(row.try_get::<BigDecimal, _>(index).map_err(get)?.to_string()),
            "TIMESTAMPTZ" => Value::Timestamp(
                row.try_get::<DateTime<Utc>, _>(index)
                    .map_err(get)?
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ),
            "TIMESTAMP" => Value::Timestamp(
                row.try_get::<NaiveDateTime, _>(index).map_err(get)?.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
            ),
            "DATE" => Value::Text(row.try_get::<NaiveDate, _>(index).map_err(get)?.to_string()),
            "UUID" => Value::Text(row.try_get::<uuid::Uuid, _>(index).map_err(get)?.to_string()),
            other => {
                return Err(StatementError::conversion(format!(
                    "column {:?} has type {other}, which exactly does not return yet; cast it in SQL (e.g. `{}::text`)",
                    column.name(),
                    column.name()
                )));
            }
        };
        values.push(value);
    }
    Ok(values)
}

pub fn row_from_sqlite(row: &SqliteRow) -> Result<Vec<Value>, StatementError> {
    let mut values = Vec::with_capacity(row.len());
    for index in 0..row.len() {
        let raw = row.try_get_raw(index).map_err(StatementError::from_sqlx)?;
        if raw.is_null() {
            values.push(Value::Null);
            continue;
        }
        // SQLite is dynamically typed: go by the value's storage class.
        let storage_class = raw.type_info().name().to_owned();
        let get = |e: sqlx::Error| StatementError::from_sqlx(e);
        let value = match storage_class.as_str() {
            "INTEGER" => Value::Int(row.try_get(index).map_err(get)?),
            "REAL" => Value::Float(row.try_get(index).map_err(get)?),
            "BLOB" => Value::Bytes(row.try_get(index).map_err(get)?),
            _ => Value::Text(row.try_get(index).map_err(get)?),
        };
        values.push(value);
    }
    Ok(values)
}

pub fn column_names<R: Row>(row: &R) -> Vec<String> {
    row.columns().iter().map(|c| c.name().to_owned()).collect()
}

/// Roughly what a value costs the guest: its payload plus a small header.
pub fn value_size(value: &Value) -> u64 {
    let payload = match value {
        Value::Null | Value::Boolean(_) | Value::Int(_) | Value::Float(_) => 8,
        Value::Text(s) | Value::Json(s) | Value::Numeric(s) | Value::Timestamp(s) => s.len(),
        Value::Bytes(b) => b.len(),
    };
    payload as u64 + 8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blame_is_limit(result: Result<(), StatementError>) -> bool {
        matches!(result, Err(StatementError { fault: StatementFault::Limit(LimitKind::Parameters, _), .. }))
    }

    #[test]
    fn parameter_count_and_bytes_are_bounded_before_binding() {
        let many = vec![Value::Int(1); MAX_PARAMS];
        assert!(check_params(&many, u64::MAX).is_ok());
        let too_many = vec![Value::Int(1); MAX_PARAMS + 1];
        assert!(blame_is_limit(check_params(&too_many, u64::MAX)));

        let text = vec![Value::Text("x".repeat(1000))];
        assert!(check_params(&text, 1008).is_ok());
        assert!(blame_is_limit(check_params(&text, 1007)));
    }

    #[test]
    fn long_numerics_and_timestamps_are_refused_before_parsing() {
        let ok = vec![Value::Numeric("9".repeat(MAX_NUMERIC_CHARS))];
        assert!(check_params(&ok, u64::MAX).is_ok());
        // Four million digits: refused at once (parsing them took 36 s).
        let started = std::time::Instant::now();
        let huge = vec![Value::Numeric("9".repeat(4_000_000))];
        let error = check_params(&huge, u64::MAX).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(matches!(error.fault, StatementFault::Failed(_)));
        assert_eq!(error.error.kind, DbErrorKind::Conversion);
        assert!(error.error.message.contains("at most 1000"), "{}", error.error.message);
        assert!(error.error.message.len() < 300, "the message quotes the value");

        let long_time = vec![Value::Timestamp(format!("2026-01-01T00:00:00{}Z", "0".repeat(100)))];
        let error = check_params(&long_time, u64::MAX).unwrap_err();
        assert_eq!(error.error.kind, DbErrorKind::Conversion);
        assert!(check_params(&[Value::Timestamp("2026-01-01T00:00:00.123456789+01:00".into())], u64::MAX).is_ok());
    }
}
