//! The event's database transaction.

use std::fmt;

use crate::Value;
use crate::bindings::exactly::handler::tx as wit;
use crate::bindings::exactly::handler::types as wit_types;
use crate::rows::Rows;

/// The open database transaction of the event being handled.
///
/// Everything a handler writes through it commits together with the host's
/// record that the event was processed, or not at all: that is what makes
/// the handler run exactly once. There is no way to begin, commit or roll
/// back, and no other connection; the handler receives `&Tx` and cannot
/// create one.
///
/// Write placeholders as `$1, $2, …` on both backends (the host rewrites
/// them for SQLite) and keep to SQL both backends understand
/// (`CURRENT_TIMESTAMP`, not `now()`; `INSERT … ON CONFLICT … DO NOTHING`;
/// `RETURNING`). One statement per call; the host refuses anything but
/// SELECT / INSERT / UPDATE / DELETE.
///
/// **After any statement fails, the event is doomed**: nothing of it will
/// commit, whatever the handler returns. Inspect the error to choose the
/// answer, but do not try to "recover" from a failed statement; to tolerate
/// a duplicate row, write `INSERT … ON CONFLICT DO NOTHING` instead of
/// catching a constraint violation.
#[derive(Debug)]
pub struct Tx {
    _private: (),
}

/// The database the host runs on, for the rare statement that cannot be
/// written portably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Tx {
    /// Only the SDK hands out a `Tx`, and only for the duration of one
    /// `handle` call.
    pub(crate) const fn new() -> Self {
        Tx { _private: () }
    }

    /// Runs one INSERT, UPDATE or DELETE and returns how many rows it
    /// affected.
    ///
    /// ```no_run
    /// # use exactly_guest::{params, Tx, DbError};
    /// # fn f(tx: &Tx) -> Result<(), DbError> {
    /// let changed = tx.execute(
    ///     "UPDATE orders SET status = 'shipped', updated_at = CURRENT_TIMESTAMP WHERE order_id = $1",
    ///     params!["o-1"],
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        wit::execute(sql, params).map_err(DbError::from_wit)
    }

    /// Runs one SELECT, or a data-modifying statement with `RETURNING`, and
    /// returns its rows.
    ///
    /// ```no_run
    /// # use exactly_guest::{params, Tx, DbError};
    /// # fn f(tx: &Tx) -> Result<(), DbError> {
    /// let rows = tx.query("SELECT status FROM orders WHERE order_id = $1", params!["o-1"])?;
    /// if let Some(row) = rows.first() {
    ///     let status: String = row.get("status")?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, DbError> {
        wit::query(sql, params)
            .map(Rows::from_wit)
            .map_err(DbError::from_wit)
    }

    /// Which database this transaction runs on.
    ///
    /// # Panics
    ///
    /// If the host names a backend this SDK does not know (a host newer than
    /// the SDK): that is a deployment error, not something a handler can
    /// handle.
    pub fn backend(&self) -> Backend {
        match wit::backend().as_str() {
            "postgres" => Backend::Postgres,
            "sqlite" => Backend::Sqlite,
            other => panic!("the host reports an unknown database backend {other:?}"),
        }
    }
}

/// Why a statement did not run, failed, or why a value could not be
/// converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    kind: DbErrorKind,
    code: Option<String>,
    message: String,
}

/// See [`DbError::kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DbErrorKind {
    /// The host refused the statement before it reached the database (it
    /// would end the transaction, holds several statements, is DDL, touches
    /// the host's own tables, or binds more or fewer values than its `$n`
    /// placeholders), or the database's own wall refused it (no privilege
    /// on PostgreSQL, SQLite's authorizer). The event fails permanently
    /// (422), whatever the handler returns.
    Refused,
    /// A unique, exclusion, foreign-key, not-null or check constraint was
    /// violated.
    ConstraintViolation,
    /// Any other error the database reported (syntax, types, timeouts, ...).
    Failed,
    /// A parameter or a column value could not be converted, by the host or
    /// by [`Row::get`](crate::Row::get). Only a conversion reported by the
    /// host dooms the transaction; one reported by `Row::get` happens in
    /// the handler and touches nothing.
    Conversion,
}

impl DbError {
    fn from_wit(error: wit_types::DbError) -> Self {
        let kind = match error.kind {
            wit_types::DbErrorKind::Refused => DbErrorKind::Refused,
            wit_types::DbErrorKind::ConstraintViolation => DbErrorKind::ConstraintViolation,
            wit_types::DbErrorKind::Failed => DbErrorKind::Failed,
            wit_types::DbErrorKind::Conversion => DbErrorKind::Conversion,
        };
        DbError {
            kind,
            code: error.code,
            message: error.message,
        }
    }

    /// A conversion error raised inside the guest (no statement failed).
    pub(crate) fn conversion(message: impl Into<String>) -> Self {
        DbError {
            kind: DbErrorKind::Conversion,
            code: None,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> DbErrorKind {
        self.kind
    }

    /// The SQLSTATE on PostgreSQL (e.g. `23505` for a unique violation), the
    /// extended result code on SQLite (e.g. `2067`); `None` when the error
    /// did not come from the database.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether a later delivery of the same event can succeed where this
    /// statement failed; what `?` on a `DbError` turns into a retryable
    /// rather than a permanent [`Error`](crate::Error).
    ///
    /// | error | a retry can help? |
    /// |---|---|
    /// | [`DbErrorKind::Refused`] | no: the host refuses it every time |
    /// | [`DbErrorKind::Conversion`] | no: the value or the handler's reading of it is wrong |
    /// | a data exception: PostgreSQL SQLSTATE class `22` (a NUL in text, a value out of range, invalid input) | no |
    /// | an integrity violation: not-null (`23502`, SQLite `1299`), check (`23514`, SQLite `275`), other class `23` and SQLite `CONSTRAINT` codes, SQLite `MISMATCH` (`20`), `RANGE` (`25`) | no |
    /// | a program limit: PostgreSQL SQLSTATE class `54` (an index row past its size, too many columns or arguments, a statement too complex): the event's data, or the statement, is past a limit of the server | no |
    /// | unique (`23505`, SQLite `2067`/`1555`), exclusion (`23P01`), foreign key (`23503`, SQLite `787`) | **yes**: a concurrent insert, or a parent row that arrives later, changes the outcome |
    /// | anything else the database reported (syntax, an unknown column or table, …) | yes (retried, then dead-lettered: a migration another replica is still applying, or a fixed handler rolled out, can cure it) |
    ///
    /// The codes are the ones [`DbError::code`] carries: a SQLSTATE is
    /// always five characters, an SQLite extended result code at most four
    /// digits, so the two never mix. Errors that are the database's trouble
    /// (unreachable, contended) and sandbox limits never reach this choice:
    /// the host answers those itself (503, 500) whatever the handler does.
    pub fn retry_can_help(&self) -> bool {
        match self.kind {
            DbErrorKind::Refused | DbErrorKind::Conversion => false,
            DbErrorKind::ConstraintViolation | DbErrorKind::Failed => match self.code.as_deref() {
                Some(sqlstate) if sqlstate.len() == 5 => match sqlstate {
                    "23505" | "23P01" | "23503" => true,
                    _ => !["22", "23", "54"].iter().any(|class| sqlstate.starts_with(class)),
                },
                Some(sqlite) => match sqlite.parse::<u32>() {
                    Ok(2067 | 1555 | 787) => true,
                    Ok(code) => !matches!(code & 0xff, 19 | 20 | 25),
                    Err(_) => true,
                },
                None => true,
            },
        }
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DbErrorKind::Refused => "statement refused",
            DbErrorKind::ConstraintViolation => "constraint violation",
            DbErrorKind::Failed => "statement failed",
            DbErrorKind::Conversion => "conversion error",
        };
        match &self.code {
            Some(code) => write!(f, "{kind} ({code}): {}", self.message),
            None => write!(f, "{kind}: {}", self.message),
        }
    }
}

impl std::error::Error for DbError {}

#[cfg(test)]
mod tests {
    use super::{DbError, DbErrorKind};

    fn error(kind: DbErrorKind, code: &str) -> DbError {
        DbError {
            kind,
            code: Some(code.to_owned()),
            message: String::new(),
        }
    }

    #[test]
    fn data_errors_cannot_be_cured_by_a_retry_conflicts_can() {
        use DbErrorKind::{ConstraintViolation as Constraint, Failed};
        let cases = [
            (error(Failed, "22021"), false),       // NUL in text (PostgreSQL)
            (error(Failed, "22003"), false),       // numeric out of range
            (error(Constraint, "23502"), false),   // not null
            (error(Constraint, "23514"), false),   // check
            (error(Constraint, "1299"), false),    // SQLite NOTNULL
            (error(Constraint, "275"), false),     // SQLite CHECK
            (error(Failed, "20"), false),          // SQLite MISMATCH
            (error(Constraint, "23505"), true),    // unique
            (error(Constraint, "23503"), true),    // foreign key
            (error(Constraint, "2067"), true),     // SQLite UNIQUE
            (error(Constraint, "1555"), true),     // SQLite PRIMARYKEY
            (error(Failed, "54000"), false),       // index row past its size (the event's data)
            (error(Failed, "54011"), false),       // too many columns
            (error(Failed, "42601"), true),        // syntax: retried
            (error(Failed, "1"), true),            // SQLite ERROR
            (error(DbErrorKind::Refused, "42501"), false),
            (DbError::conversion("wrong type"), false),
        ];
        for (error, retry) in cases {
            assert_eq!(error.retry_can_help(), retry, "{error}");
            assert_eq!(crate::Error::from(error.clone()).is_permanent(), !retry, "{error}");
        }
    }
}
