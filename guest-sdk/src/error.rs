//! The error a handler returns, and what the host does with it.

use std::fmt;

use crate::bindings::exactly::handler::types::HandlerError;
use crate::tx::{DbError, DbErrorKind};

/// Why a handler did not process an event.
///
/// The distinction is the whole point: it decides whether the broker tries
/// again or sends the event to the dead-letter sink. In both cases the
/// event's transaction rolls back, so nothing the handler wrote remains and
/// the event is not marked as processed.
///
/// | error | HTTP answer | what the Knative broker does |
/// |---|---|---|
/// | [`Error::permanent`] | 422 | dead-letters it at once, no retry |
/// | [`Error::retryable`] (and a panic) | 500 | retries with backoff, then dead-letters it |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// See [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The event itself is wrong (bad data, a conflict only a human can
    /// resolve): delivering it again cannot help.
    Permanent,
    /// Something that may be different on a later delivery (an order that
    /// does not exist *yet*, a temporary conflict).
    Retryable,
}

impl Error {
    /// The event can never be processed as it is: answer 422 so the broker
    /// dead-letters it right away. Say what is wrong; the message is logged
    /// and sent back with the answer.
    pub fn permanent(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }

    /// Trying again later may succeed: answer 500 so the broker redelivers
    /// the event (and dead-letters it when its retries run out).
    pub fn retryable(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Retryable,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_wit(self) -> HandlerError {
        match self.kind {
            ErrorKind::Permanent => HandlerError::Permanent(self.message),
            ErrorKind::Retryable => HandlerError::Retryable(self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Permanent => "permanent",
            ErrorKind::Retryable => "retryable",
        };
        write!(f, "{kind}: {}", self.message)
    }
}

impl std::error::Error for Error {}

/// A failed statement becomes a *permanent* error when a later delivery
/// cannot succeed either ([`DbError::retry_can_help`]: data exceptions,
/// not-null and check violations, conversions, refusals), and a
/// *retryable* one otherwise (a unique or foreign-key conflict another
/// transaction may resolve, anything else the database reported), so `?`
/// on a [`Tx`] call does the right thing by default.
///
/// Whatever the handler returns, the host already knows a statement failed:
/// after any failed statement the event's transaction is doomed and nothing
/// commits, and after a statement the host *refused* (transaction control,
/// DDL, several statements in one call, ...) the event always fails
/// permanently (422), because running it again would be refused again.
/// Return [`Error::permanent`] or [`Error::retryable`] yourself when you
/// know better.
///
/// [`Tx`]: crate::Tx
impl From<DbError> for Error {
    fn from(error: DbError) -> Self {
        match (error.retry_can_help(), error.kind()) {
            (_, DbErrorKind::Conversion) => Error::permanent(format!(
                "a value could not be converted (the handler's reading of it, or the data, is wrong): {error}"
            )),
            (true, _) => Error::retryable(format!("database statement failed: {error}")),
            (false, _) => Error::permanent(format!("database statement failed, and would again: {error}")),
        }
    }
}
