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

pub use crate::runtime::bindings::exactly::handler::types::{DbError, DbErrorKind, Rows, Value};
use crate::answer::{LimitKind, Rejection};
use crate::storage::{is_contention, is_unavailable};

pub enum StatementOutput {
    Rows(Rows),
    Affected(u64),
}

/// A handler statement that did not succeed: what the handler is told, and
/// what it means for the event.
#[derive(Debug)]
pub struct StatementError {
    pub error: DbError,
    pub blame: Blame,
}

/// What a failed statement means for the event, beyond what the handler is
/// told.
#[derive(Debug)]
pub enum Blame {
    /// The handler's statement failed; the handler may decide what to answer.
    Handler,
    /// The database refused it on principle (no privilege): a refusal.
    Refused,
    /// The statement hit a limit of the sandbox.
    Limit(LimitKind),
    /// The database's fault (outage, lock contention): 503 whatever the
    /// handler does.
    Host(Rejection),
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
                    | sqlx::error::ErrorKind::CheckViolation => DbErrorKind::ConstraintViolation,
                    _ => DbErrorKind::Failed,
                };
                let message = db.message().to_owned();
                let (kind, blame) = match code.as_deref().unwrap_or_default() {
                    // statement_timeout: the handler's statement ran too long.
                    "57014" => (kind, Blame::Limit(LimitKind::StatementTimeout)),
                    // SQLITE_INTERRUPT: the event's deadline interrupted it.
                    "9" => (kind, Blame::Limit(LimitKind::StatementTimeout)),
                    // insufficient_privilege: the per-handler role's wall;
                    // SQLITE_AUTH: SQLite's authorizer (storage::sqlite_guard).
                    "42501" | "23" => (DbErrorKind::Refused, Blame::Refused),
                    code if is_contention(code) => (kind, Blame::Host(Rejection::Busy(message.clone()))),
                    code if is_unavailable(code) => (kind, Blame::Host(Rejection::DatabaseUnavailable(message.clone()))),
                    _ => (kind, Blame::Handler),
                };
                StatementError { error: DbError { kind, code, message }, blame }
            }
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::Encode(_) => {
                StatementError::conversion(error.to_string())
            }
            _ => StatementError {
                error: DbError { kind: DbErrorKind::Failed, code: None, message: error.to_string() },
                blame: Blame::Host(Rejection::DatabaseUnavailable(error.to_string())),
            },
        }
    }

    pub fn conversion(message: impl Into<String>) -> Self {
        StatementError {
            error: DbError { kind: DbErrorKind::Conversion, code: None, message: message.into() },
            blame: Blame::Handler,
        }
    }

    pub fn limit(limit: LimitKind, message: String) -> Self {
        StatementError {
            error: DbError { kind: DbErrorKind::Failed, code: None, message },
            blame: Blame::Limit(limit),
        }
    }

    /// A statement the database's own guard refused before running it
    /// (SQLite's authorizer, more than one statement in the text).
    pub fn refused(message: String) -> Self {
        StatementError { error: DbError { kind: DbErrorKind::Refused, code: None, message }, blame: Blame::Refused }
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

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;
type SqliteQuery<'q> = Query<'q, Sqlite, SqliteArguments>;

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
    {
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
}

pub fn row_from_sqlite(row: &SqliteRow) -> Result<Vec<Value>, StatementError> {
    {
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
