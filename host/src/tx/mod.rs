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

pub use execute::RowCaps;
