//! What a database error means, read from the database's own codes:
//! PostgreSQL's SQLSTATE (by class, the first two characters, and a few
//! exact codes) and SQLite's result codes (the primary code, the low byte
//! of the extended code sqlx reports). One table for every path: the
//! host's own statements ([`super::classify`]), start-up
//! ([`super::is_transient`]) and a handler's statements
//! (`convert::StatementError::from_sqlx`). The README's "Database errors"
//! table is this one.
//!
//! The one question each class answers is whether a retry can help, and
//! whose the error is.

use std::borrow::Cow;

/// See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database is out of reach or out of resources: connection
    /// failures (PostgreSQL class `08`), insufficient resources (`53`),
    /// shutdown and restart (`57P01`–`57P03`, `57P05`), system errors
    /// (`58`), a database or login not there yet (`3D000`, class `28`);
    /// SQLite `IOERR`, `FULL`, `CANTOPEN`, `NOMEM`, `READONLY`, `PROTOCOL`.
    /// A retry later can help: 503 `database-unavailable`.
    Unavailable,
    /// Two transactions collided: serialization failure and deadlock
    /// (class `40`), lock not available (`55P03`), object in use (`55006`);
    /// SQLite `BUSY`, `LOCKED`. A retry can help: 503 `busy`.
    Contention,
    /// The statement ran out of time: `57014` (statement_timeout or a
    /// cancel request); SQLite `INTERRUPT` (the event's deadline).
    Timeout,
    /// The database refused on principle: `42501` insufficient privilege;
    /// SQLite `AUTH` (the authorizer). For a handler, a refusal (422).
    Privilege,
    /// A value past a size limit the host set for the database (SQLite
    /// `TOOBIG`: `SQLITE_LIMIT_LENGTH`): for a handler, its result-size
    /// limit (500 `result-too-large`, as PostgreSQL's result cap answers).
    TooBig,
    /// The data can never be stored as it is: data exceptions (class `22`:
    /// a NUL in text, a value out of range, invalid input syntax) and the
    /// integrity violations a retry cannot cure (not-null `23502`, check
    /// `23514`, restrict `23001`, `23000`), program limits (class `54`: an
    /// index row past its size); SQLite `CONSTRAINT_NOTNULL`,
    /// `CONSTRAINT_CHECK`, `CONSTRAINT_DATATYPE` and other constraints not
    /// listed under [`ErrorClass::Conflict`], `MISMATCH`, `RANGE`.
    Data,
    /// A conflict with another row that another transaction may resolve:
    /// unique `23505`, exclusion `23P01`, foreign key `23503` (the parent
    /// may arrive later); SQLite `CONSTRAINT_UNIQUE`, `_PRIMARYKEY`,
    /// `_FOREIGNKEY`. A later delivery may succeed.
    Conflict,
    /// Anything else: a mistake in the statement (syntax, unknown column:
    /// class `42`), in `exactly`, or a damaged database (`XX`, SQLite
    /// `CORRUPT`, `NOTADB`). A retry does not help.
    Other,
}

impl ErrorClass {
    /// The class of a sqlx error. Errors that never reached the database
    /// (connection I/O, TLS, a closed or exhausted pool, a protocol error)
    /// are [`ErrorClass::Unavailable`]; decoding and encoding errors are
    /// [`ErrorClass::Other`].
    pub fn of(error: &sqlx::Error) -> ErrorClass {
        match error {
            sqlx::Error::Database(db) => ErrorClass::of_database(db.as_ref()),
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => ErrorClass::Unavailable,
            _ => ErrorClass::Other,
        }
    }

    /// The class of an error the database reported, by the backend that
    /// reported it (never by the shape of the code).
    pub fn of_database(db: &dyn sqlx::error::DatabaseError) -> ErrorClass {
        let code = db.code().unwrap_or(Cow::Borrowed(""));
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            code.parse::<u32>().map_or(ErrorClass::Other, ErrorClass::of_sqlite)
        } else {
            ErrorClass::of_sqlstate(&code)
        }
    }

    /// PostgreSQL: a five-character SQLSTATE.
    pub fn of_sqlstate(code: &str) -> ErrorClass {
        use ErrorClass::*;
        match code {
            "57014" => Timeout,
            "42501" => Privilege,
            "23505" | "23P01" | "23503" => Conflict,
            "55P03" | "55006" => Contention,
            "57P01" | "57P02" | "57P03" | "57P05" | "3D000" => Unavailable,
            _ => match code.get(..2).unwrap_or("") {
                "08" | "53" | "58" | "28" => Unavailable,
                "40" => Contention,
                "22" | "23" | "54" => Data,
                _ => Other,
            },
        }
    }

    /// SQLite: an extended result code (its low byte is the primary code).
    pub fn of_sqlite(extended: u32) -> ErrorClass {
        use ErrorClass::*;
        const CONSTRAINT_FOREIGNKEY: u32 = 787;
        const CONSTRAINT_PRIMARYKEY: u32 = 1555;
        const CONSTRAINT_UNIQUE: u32 = 2067;
        match (extended & 0xff, extended) {
            (19, CONSTRAINT_UNIQUE | CONSTRAINT_PRIMARYKEY | CONSTRAINT_FOREIGNKEY) => Conflict,
            (18, _) => TooBig,
            (19 | 20 | 25, _) => Data,
            (5 | 6, _) => Contention,
            (9, _) => Timeout,
            (23, _) => Privilege,
            (7 | 8 | 10 | 13 | 14 | 15, _) => Unavailable,
            _ => Other,
        }
    }

    /// Whether waiting and trying again can help without anyone changing
    /// anything: the database's trouble (or a statement that waited too
    /// long for it), not the statement's.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorClass::Unavailable | ErrorClass::Contention | ErrorClass::Timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorClass::{self, *};

    #[test]
    fn postgresql_errors_are_classified_by_sqlstate_class() {
        let table: &[(&str, ErrorClass)] = &[
            ("08006", Unavailable),
            ("08P01", Unavailable),
            ("53300", Unavailable),
            ("53100", Unavailable),
            ("57P01", Unavailable),
            ("57P03", Unavailable),
            ("58030", Unavailable),
            ("3D000", Unavailable),
            ("28P01", Unavailable),
            ("40001", Contention),
            ("40P01", Contention),
            ("55P03", Contention),
            ("57014", Timeout),
            ("42501", Privilege),
            ("22021", Data),
            ("22003", Data),
            ("22P02", Data),
            ("23502", Data),
            ("54000", Data),
            ("23514", Data),
            ("23505", Conflict),
            ("23503", Conflict),
            ("23P01", Conflict),
            ("42601", Other),
            ("42P01", Other),
            ("0A000", Other),
            ("XX000", Other),
            ("", Other),
        ];
        for (code, class) in table {
            assert_eq!(ErrorClass::of_sqlstate(code), *class, "{code}");
        }
        // All-digit SQLSTATEs are never read as SQLite codes: 42501 is
        // 0xA605, whose low byte would read as SQLITE_BUSY.
        assert!(!ErrorClass::of_sqlstate("42501").is_transient());
        assert!(!ErrorClass::of_sqlstate("22021").is_transient());
    }

    #[test]
    fn sqlite_errors_are_classified_by_primary_code() {
        let table: &[(u32, ErrorClass)] = &[
            (5, Contention),
            (517, Contention), // BUSY_SNAPSHOT
            (6, Contention),
            (9, Timeout),
            (23, Privilege),
            (10, Unavailable),
            (3338, Unavailable), // IOERR_FSYNC
            (13, Unavailable),
            (14, Unavailable),
            (2067, Conflict),
            (1555, Conflict),
            (787, Conflict),
            (1299, Data), // CONSTRAINT_NOTNULL
            (275, Data),  // CONSTRAINT_CHECK
            (3091, Data), // CONSTRAINT_DATATYPE
            (20, Data),
            (18, TooBig),
            (1, Other),
            (11, Other),
            (17, Other),
        ];
        for (code, class) in table {
            assert_eq!(ErrorClass::of_sqlite(*code), *class, "{code}");
        }
    }
}
