//! Write `exactly` event handlers in Rust.
//!
//! An `exactly` handler is a WebAssembly component that receives one
//! CloudEvent at a time together with the event's open database transaction.
//! The host commits what the handler wrote *together with* its record that
//! the event was processed, so a handler runs exactly once per event even
//! though Knative and Kafka deliver events at least once. This crate hides
//! the generated WIT bindings behind a small typed API:
//!
//! - [`Event`]: the CloudEvent, with [`Event::data_json`] for typed payloads;
//! - [`Tx`]: [`execute`](Tx::execute) and [`query`](Tx::query) on the event's
//!   transaction, with parameters from [`params!`] and results as [`Rows`];
//! - [`Outcome`] and [`Reply`]: what the handler did, and an optional reply
//!   event;
//! - [`Error`]: [`permanent`](Error::permanent) (dead-letter the event) or
//!   [`retryable`](Error::retryable) (let the broker deliver it again);
//! - [`log`]: log lines attributed to the handler and the event;
//! - [`export_handler!`]: turns a plain function into the component's export.
//!
//! # Example
//!
//! A handler that records shipments. Build it with
//! `cargo build --release --target wasm32-wasip2`; its table comes from a
//! migration shipped with it (see `docs/handlers.md`).
//!
//! ```no_run
//! use exactly_guest::{Error, Event, Outcome, Reply, Tx, Value, log, params};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct Shipped {
//!     order_id: String,
//!     carrier: String,
//!     weight_kg: String,
//! }
//!
//! fn handle(event: Event, tx: &Tx) -> Result<Outcome, Error> {
//!     // Missing or malformed data is a permanent error: dead-lettered.
//!     let shipped: Shipped = event.data_json()?;
//!
//!     // `$n` placeholders on both PostgreSQL and SQLite. ON CONFLICT makes
//!     // a second shipment event for the same order harmless without a
//!     // failed statement (a failed statement would doom the event).
//!     let inserted = tx.query(
//!         "INSERT INTO shipments (order_id, carrier, weight_kg, event_source, event_id, shipped_at)
//!          VALUES ($1, $2, $3, $4, $5, CURRENT_TIMESTAMP)
//!          ON CONFLICT (order_id) DO NOTHING
//!          RETURNING order_id",
//!         params![
//!             &shipped.order_id,
//!             &shipped.carrier,
//!             Value::numeric(&shipped.weight_kg),
//!             event.source(),
//!             event.id(),
//!         ],
//!     )?; // retryable unless a retry cannot help (DbError::retry_can_help)
//!
//!     if inserted.is_empty() {
//!         let rows = tx.query(
//!             "SELECT carrier FROM shipments WHERE order_id = $1",
//!             params![&shipped.order_id],
//!         )?;
//!         let carrier: String = match rows.first() {
//!             Some(row) => row.get("carrier")?,
//!             None => return Err(Error::retryable("the shipment vanished; try again")),
//!         };
//!         log::info!("order {} was already shipped with {carrier}", shipped.order_id);
//!         return Ok(Outcome::json(json!({"status": "already_shipped", "carrier": carrier})));
//!     }
//!
//!     log::info!("order {} shipped with {}", shipped.order_id, shipped.carrier);
//!     Ok(Outcome::json(json!({"status": "shipped", "order_id": shipped.order_id}))
//!         .with_reply(
//!             Reply::new("order.shipped")
//!                 .subject(&shipped.order_id)
//!                 .data_json(&json!({"order_id": shipped.order_id, "carrier": shipped.carrier})),
//!         ))
//! }
//!
//! exactly_guest::export_handler!(handle);
//! # fn main() {}
//! ```
//!
//! # What the host answers
//!
//! | the handler | answer | the Knative broker |
//! |---|---|---|
//! | returns `Ok` without a reply | 202 | done |
//! | returns `Ok` with a [`Reply`] | 200 + the reply event | publishes the reply |
//! | returns [`Error::permanent`] | 422 | dead-letters the event |
//! | returns [`Error::retryable`], panics, runs out of time or memory | 500 | retries, then dead-letters |
//! | returns `Ok` after a statement *failed* | 500 (nothing committed) | retries |
//! | returns anything after a statement was *refused* | 422 (nothing committed) | dead-letters |
//!
//! In every failing case the transaction rolls back: nothing the handler
//! wrote remains and the event is not marked as processed.
//!
//! # Native builds
//!
//! The crate also compiles for the build machine so that `cargo test` and
//! doctests work, but the host imports only exist inside `exactly`: calling
//! [`Tx`] or [`log`] functions outside a component panics.

// The bindings refer to this crate by name, from inside it and from the
// handler crates that expand `export_handler!`.
extern crate self as exactly_guest;

mod error;
mod event;
pub mod log;
mod outcome;
mod rows;
mod tx;
mod value;

pub use error::{Error, ErrorKind};
pub use event::Event;
pub use outcome::{Outcome, Reply};
pub use rows::{ColumnIndex, FromValue, Row, Rows, RowsIter};
pub use tx::{Backend, DbError, DbErrorKind, Tx};
pub use value::Value;

/// The generated WIT bindings. Not part of the API: use the types above.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        // `export_handler!` expands in the handler's crate, which depends on
        // this crate only: the export macro and the runtime must be
        // reachable through it.
        pub_export_macro: true,
        default_bindings_module: "exactly_guest::bindings",
        runtime_path: "exactly_guest::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

/// Exports `handler` as the component's `handle` function.
///
/// `handler` is a function `fn(Event, &Tx) -> Result<Outcome, Error>`.
/// Invoke the macro once, at the top level of a `cdylib` crate:
///
/// ```no_run
/// use exactly_guest::{Error, Event, Outcome, Tx};
///
/// fn handle(event: Event, _tx: &Tx) -> Result<Outcome, Error> {
///     Ok(Outcome::json(serde_json::json!({"seen": event.id()})))
/// }
///
/// exactly_guest::export_handler!(handle);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_handler {
    ($handler:path) => {
        const _: () = {
            struct ExactlyHandler;

            impl $crate::bindings::Guest for ExactlyHandler {
                fn handle(
                    event: $crate::bindings::Event,
                ) -> ::core::result::Result<$crate::bindings::Outcome, $crate::bindings::HandlerError>
                {
                    $crate::__private::run(event, $handler)
                }
            }

            $crate::bindings::export!(ExactlyHandler with_types_in $crate::bindings);
        };
    };
}

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    use crate::bindings;
    use crate::{Error, Event, Outcome, Tx};

    /// The body of every exported `handle`: wrap the event, lend the
    /// transaction, convert the answer.
    pub fn run(
        event: bindings::Event,
        handler: fn(Event, &Tx) -> Result<Outcome, Error>,
    ) -> Result<bindings::Outcome, bindings::HandlerError> {
        let tx = Tx::new();
        handler(Event::from_wit(event), &tx)
            .and_then(Outcome::into_wit)
            .map_err(Error::into_wit)
    }
}
