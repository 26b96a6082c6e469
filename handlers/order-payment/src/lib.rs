//! `order-payment`: marks an order paid and records the payment.
//!
//! The port of the seed's `process_payment`, without its defects. The seed
//! answered "already_processed" (and marked the event processed) both when
//! the order was already paid and when it did not exist yet; since Knative
//! delivers events unordered, a payment that overtook its order was lost for
//! good. Here the three cases are told apart:
//!
//! | situation | outcome |
//! |---|---|
//! | the order is pending | `{"status":"payment_processed",…}`, a `payments` row, an `order_events` row of kind `paid` |
//! | the order does not exist (yet) | retryable error: the broker redelivers, and dead-letters it after its retries; never lost, never marked processed |
//! | the order was created while this payment ran (PostgreSQL: the UPDATE saw no order, a later read sees it pending) | retryable error: the redelivery pays it |
//! | the order is paid by this very payment (a new event for an old payment) | `{"status":"already_paid",…}`, no new rows |
//! | the order is paid by another payment | permanent error: a double payment needs a human (refund?) |
//! | the order has any other status | permanent error naming the status |
//!
//! Data: `{"order_id": "o-1", "payment_id": "p-1", "amount": 99.95}`, where
//! `amount` (a JSON number or a decimal string) is optional.

use exactly_guest::{Error, Event, Outcome, Tx, log, params};
use order_money::{Cents, amount as optional_amount};
use serde_json::{Map, json};

exactly_guest::export_handler!(handle);

/// A validated `order.payment` payload.
struct Payment {
    order_id: String,
    payment_id: String,
    amount: Option<Cents>,
}

fn handle(event: Event, tx: &Tx) -> Result<Outcome, Error> {
    let payment = Payment::parse(&event)?;

    // Check and change in one statement: two concurrent payments for the
    // same order cannot both see it pending (on PostgreSQL the second waits
    // for the first and then finds it paid).
    let updated = tx.query(
        "UPDATE orders SET status = 'paid', updated_at = CURRENT_TIMESTAMP
         WHERE order_id = $1 AND status = 'pending'
         RETURNING order_id",
        params![&payment.order_id],
    )?;
    if updated.is_empty() {
        return order_not_pending(tx, &payment);
    }

    // ON CONFLICT DO NOTHING: a payment id already used for another order is
    // a case to report, not a statement that fails and dooms the event.
    let recorded = tx.query(
        "INSERT INTO payments (payment_id, order_id, amount, paid_at)
         VALUES ($1, $2, $3, CURRENT_TIMESTAMP)
         ON CONFLICT (payment_id) DO NOTHING
         RETURNING payment_id",
        params![
            &payment.payment_id,
            &payment.order_id,
            payment.amount.map(Cents::to_value),
        ],
    )?;
    if recorded.is_empty() {
        // Returning an error rolls back the UPDATE above as well.
        return Err(payment_id_reused(tx, &payment)?);
    }

    tx.execute(
        "INSERT INTO order_events (order_id, kind, event_source, event_id)
         VALUES ($1, 'paid', $2, $3)",
        params![&payment.order_id, event.source(), event.id()],
    )?;
    log::info!(
        "order {} paid by payment {}",
        payment.order_id,
        payment.payment_id
    );

    Ok(Outcome::json(json!({
        "status": "payment_processed",
        "order_id": payment.order_id,
        "payment_id": payment.payment_id,
        "order_status": "paid",
    })))
}

/// The UPDATE found no pending order: find out why.
fn order_not_pending(tx: &Tx, payment: &Payment) -> Result<Outcome, Error> {
    let rows = tx.query(
        "SELECT o.status AS status, p.payment_id AS payment_id
         FROM orders o LEFT JOIN payments p ON p.order_id = o.order_id
         WHERE o.order_id = $1",
        params![&payment.order_id],
    )?;
    let Some(first) = rows.first() else {
        log::warn!(
            "payment {} arrived before order {}; asking the broker to deliver it again",
            payment.payment_id,
            payment.order_id
        );
        return Err(Error::retryable(format!(
            "order {} does not exist yet; payment {} will be retried \
             (events are delivered unordered) and dead-lettered if the order never arrives",
            payment.order_id, payment.payment_id
        )));
    };
    let status: String = first.get("status")?;
    if status == "pending" {
        // The UPDATE found no pending order, yet this read (a newer snapshot
        // under PostgreSQL's READ COMMITTED) finds one: its order.created
        // committed in between. The payment is fine; run it again.
        return Err(Error::retryable(format!(
            "order {} appeared while payment {} was applied; try again",
            payment.order_id, payment.payment_id
        )));
    }
    if status != "paid" {
        return Err(Error::permanent(format!(
            "order {} has status {status:?}; payment {} cannot be applied to it",
            payment.order_id, payment.payment_id
        )));
    }

    let mut paid_by = Vec::new();
    for row in &rows {
        if let Some(payment_id) = row.get::<Option<String>>("payment_id")? {
            paid_by.push(payment_id);
        }
    }
    if paid_by.contains(&payment.payment_id) {
        log::info!(
            "order {} is already paid by payment {}; nothing to do",
            payment.order_id,
            payment.payment_id
        );
        return Ok(Outcome::json(json!({
            "status": "already_paid",
            "order_id": payment.order_id,
            "payment_id": payment.payment_id,
            "order_status": "paid",
        })));
    }

    let other = if paid_by.is_empty() {
        "<none recorded>".to_owned()
    } else {
        paid_by.join(", ")
    };
    log::warn!(
        "order {} is already paid by payment {other}; payment {} needs review",
        payment.order_id,
        payment.payment_id
    );
    Err(Error::permanent(format!(
        "order {} is already paid by payment {other}; payment {} needs review (refund?)",
        payment.order_id, payment.payment_id
    )))
}

/// The payment id is already recorded, necessarily for another order (this
/// one was still pending).
fn payment_id_reused(tx: &Tx, payment: &Payment) -> Result<Error, Error> {
    let rows = tx.query(
        "SELECT order_id FROM payments WHERE payment_id = $1",
        params![&payment.payment_id],
    )?;
    let other_order = match rows.first() {
        Some(row) => row.get::<String>("order_id")?,
        None => "<unknown>".to_owned(),
    };
    Ok(Error::permanent(format!(
        "payment {} is already recorded for order {other_order}; it cannot also pay order {}",
        payment.payment_id, payment.order_id
    )))
}

impl Payment {
    fn parse(event: &Event) -> Result<Self, Error> {
        let data: serde_json::Value = event.data_json()?;
        let Some(fields) = data.as_object() else {
            return Err(Error::permanent("the event data must be a JSON object"));
        };
        Ok(Payment {
            order_id: required_text(fields, "order_id")?,
            payment_id: required_text(fields, "payment_id")?,
            amount: optional_amount(fields, "amount")?,
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
