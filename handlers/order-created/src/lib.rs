//! `order-created`: stores a new order and starts its history.
//!
//! The port of the seed's `process_order_created`, without its defects: the
//! order, its history row and the host's "event processed" record commit in
//! one transaction, so a redelivery can never create a second history row;
//! and an `order.created` event that contradicts an existing order is
//! dead-lettered instead of silently "updating" it.
//!
//! Data: `{"order_id": "o-1", "customer_id": "c-1", "total": 99.95}`, with
//! `total` a JSON number or a decimal string of at most two decimals.
//!
//! | situation | outcome |
//! |---|---|
//! | new order | `{"status":"created",…}`, one `order_events` row of kind `created` |
//! | the order exists with the same customer and total (another event announced it) | `{"status":"already_exists",…}`, no history row |
//! | the order exists with a different customer or total | permanent error: needs a human |
//! | a field is missing or invalid | permanent error naming the field |

use exactly_guest::{Error, Event, Outcome, Tx, log, params};
use order_money::{Cents, required_amount};
use serde_json::{Map, json};

exactly_guest::export_handler!(handle);

/// A validated `order.created` payload.
struct NewOrder {
    order_id: String,
    customer_id: String,
    total: Cents,
}

fn handle(event: Event, tx: &Tx) -> Result<Outcome, Error> {
    let order = NewOrder::parse(&event)?;

    // ON CONFLICT DO NOTHING rather than a failing INSERT: a failed statement
    // would doom the whole event, and an existing order is a case to look at,
    // not an error. On PostgreSQL a concurrent insert of the same order makes
    // this statement wait for it, so the SELECT below sees its outcome.
    let inserted = tx.query(
        "INSERT INTO orders (order_id, customer_id, total, status)
         VALUES ($1, $2, $3, 'pending')
         ON CONFLICT (order_id) DO NOTHING
         RETURNING order_id, status",
        params![&order.order_id, &order.customer_id, order.total.to_value()],
    )?;

    let Some(row) = inserted.first() else {
        return existing_order(tx, &order);
    };
    let order_status: String = row.get("status")?;

    tx.execute(
        "INSERT INTO order_events (order_id, kind, event_source, event_id)
         VALUES ($1, 'created', $2, $3)",
        params![&order.order_id, event.source(), event.id()],
    )?;
    log::info!(
        "order {} created for customer {} (total {})",
        order.order_id,
        order.customer_id,
        order.total
    );

    Ok(Outcome::json(json!({
        "status": "created",
        "order_id": order.order_id,
        "order_status": order_status,
    })))
}

/// The order was already there: announced by an earlier event with a
/// different id. Harmless if it says the same thing, a conflict otherwise.
fn existing_order(tx: &Tx, order: &NewOrder) -> Result<Outcome, Error> {
    // CAST to text: PostgreSQL keeps numeric(12,2) exactly, SQLite as an
    // integer or a real; their text forms parse the same way.
    let rows = tx.query(
        "SELECT customer_id, CAST(total AS TEXT) AS total, status FROM orders WHERE order_id = $1",
        params![&order.order_id],
    )?;
    let Some(row) = rows.first() else {
        // Only possible if it was deleted between the two statements.
        return Err(Error::retryable(format!(
            "order {} conflicted on insert but cannot be read; try again",
            order.order_id
        )));
    };
    let customer_id: String = row.get("customer_id")?;
    let stored_total: String = row.get("total")?;
    let status: String = row.get("status")?;
    let total = Cents::parse(&stored_total).map_err(|problem| {
        Error::permanent(format!(
            "order {} has a stored total {stored_total:?} that {problem}",
            order.order_id
        ))
    })?;

    if customer_id != order.customer_id || total != order.total {
        return Err(Error::permanent(format!(
            "order {} already exists with different customer/total \
             (stored: customer {customer_id}, total {total}; \
             this event: customer {}, total {})",
            order.order_id, order.customer_id, order.total
        )));
    }

    log::info!(
        "order {} already exists with the same customer and total (status {status}); nothing to do",
        order.order_id
    );
    Ok(Outcome::json(json!({
        "status": "already_exists",
        "order_id": order.order_id,
        "order_status": status,
    })))
}

impl NewOrder {
    fn parse(event: &Event) -> Result<Self, Error> {
        let data: serde_json::Value = event.data_json()?;
        let Some(fields) = data.as_object() else {
            return Err(Error::permanent("the event data must be a JSON object"));
        };
        Ok(NewOrder {
            order_id: required_text(fields, "order_id")?,
            customer_id: required_text(fields, "customer_id")?,
            total: required_amount(fields, "total")?,
        })
    }
}

fn required_text(fields: &Map<String, serde_json::Value>, name: &str) -> Result<String, Error> {
    match fields.get(name) {
        None | Some(serde_json::Value::Null) => {
            Err(Error::permanent(format!("field `{name}` is missing")))
        }
        Some(serde_json::Value::String(text)) if !text.trim().is_empty() => Ok(text.clone()),
        Some(other) => Err(Error::permanent(format!(
            "field `{name}` must be a non-empty string, got {other}"
        ))),
    }
}
