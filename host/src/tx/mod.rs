//! The `tx` capability, as one unit: a handler's only way to the database.
//!
//! [`host`] is the host side of the WIT `tx` interface: it counts, bounds
//! and admits each statement (the SQL policy, the parameter checks) and
//! dooms the event at the first failure. [`convert`] turns WIT values into
//! database parameters and database rows back into WIT values, and says
//! what a failed statement means ([`convert::StatementFault`]).
//! [`execute`] runs one admitted statement on the event's transaction.

pub mod convert;
mod execute;
mod host;

use std::sync::Arc;
use std::time::Duration;

pub use execute::RowCaps;

use crate::policy::Policy;
use crate::storage::EventTx;
use convert::StatementFault;

/// What a handler's `tx` calls run on and count during one event.
pub struct TxState {
    /// The event's transaction, lent to the handler; taken back after the
    /// run.
    pub session: Option<EventTx>,
    pub policy: Arc<Policy>,
    /// Who the statements are for, in logs.
    pub handler: Arc<str>,
    pub event_source: String,
    pub event_id: String,
    pub limits: TxLimits,
    /// Statements issued so far.
    pub statements: u64,
    /// Time spent in the handler's statements, for the metrics.
    pub database_time: Duration,
    /// Set by the first failed or refused statement or exceeded limit
    /// (the log's limit included): nothing of the event may commit after
    /// that, whatever the handler returns.
    pub doom: Option<StatementFault>,
}

/// The handler's limits the `tx` calls enforce.
#[derive(Debug, Clone, Copy)]
pub struct TxLimits {
    /// Statements per event.
    pub max_statements: u64,
    /// Rows one query may return.
    pub max_rows: u64,
    /// Bytes one query may return; also the most bytes of one statement's
    /// parameters together.
    pub max_result_bytes: u64,
}
