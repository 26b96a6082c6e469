//! The example handlers end to end: an order is created, then paid.
//! Knative delivers unordered, so a payment may arrive before its order:
//! that is a reason to retry (500), never to drop the payment as the seed
//! did.

use exactly_e2e::{Backend, Event, TestApp, both_backends, json};

both_backends!(
    payment_after_order_marks_it_paid,
    payment_before_order_is_retried_until_the_order_exists,
);

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

fn order_created(order_id: &str) -> Event {
    Event::new("order.created").with_data(json!({
        "order_id": order_id,
        "customer_id": "customer-7",
        "total": 42.5,
    }))
}

fn order_payment(order_id: &str, payment_id: &str) -> Event {
    Event::new("order.payment").with_data(json!({
        "order_id": order_id,
        "payment_id": payment_id,
        "amount": 42.5,
    }))
}

async fn order_status(app: &TestApp, order_id: &str) -> Option<String> {
    app.db
        .text(
            "SELECT CAST(status AS TEXT) FROM orders WHERE CAST(order_id AS TEXT) = $1",
            &[order_id],
        )
        .await
}

async fn payments_of(app: &TestApp, order_id: &str) -> Vec<String> {
    app.db
        .texts(
            "SELECT CAST(payment_id AS TEXT) FROM payments WHERE CAST(order_id AS TEXT) = $1",
            &[order_id],
        )
        .await
}

async fn event_kinds(app: &TestApp, order_id: &str) -> Vec<String> {
    app.db
        .texts(
            "SELECT CAST(kind AS TEXT) FROM order_events WHERE CAST(order_id AS TEXT) = $1 ORDER BY 1",
            &[order_id],
        )
        .await
}

async fn payment_after_order_marks_it_paid(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let order_id = new_id("order");
    let payment_id = new_id("payment");

    app.send_binary(&order_created(&order_id))
        .await
        .assert_processed();
    let payment = order_payment(&order_id, &payment_id);
    app.send_binary(&payment).await.assert_processed();

    assert_eq!(order_status(&app, &order_id).await.as_deref(), Some("paid"));
    assert_eq!(payments_of(&app, &order_id).await, vec![payment_id.clone()]);
    assert_eq!(event_kinds(&app, &order_id).await, vec!["created", "paid"]);

    // The same payment redelivered is a replay, not a second payment.
    app.send_binary(&payment).await.assert_replayed();
    assert_eq!(payments_of(&app, &order_id).await, vec![payment_id.clone()]);

    // A different payment for an order already paid is bad data.
    let second = order_payment(&order_id, &new_id("payment"));
    app.send_binary(&second)
        .await
        .assert_error(422, "permanent");
    assert_eq!(payments_of(&app, &order_id).await, vec![payment_id]);
    assert_eq!(event_kinds(&app, &order_id).await, vec!["created", "paid"]);
    assert_eq!(app.processed_event(&second).await, None);
}

async fn payment_before_order_is_retried_until_the_order_exists(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let order_id = new_id("order");
    let payment_id = new_id("payment");
    let payment = order_payment(&order_id, &payment_id);

    // The order does not exist yet: retry later (and dead-letter after the
    // retries), but never mark the payment processed.
    app.send_binary(&payment)
        .await
        .assert_error(500, "retryable");
    assert_eq!(app.processed_event(&payment).await, None);
    assert!(payments_of(&app, &order_id).await.is_empty());
    assert_eq!(order_status(&app, &order_id).await, None);

    app.send_binary(&order_created(&order_id))
        .await
        .assert_processed();
    assert_eq!(
        order_status(&app, &order_id).await.as_deref(),
        Some("pending")
    );

    // The broker's retry of the very same payment event now goes through.
    app.send_binary(&payment).await.assert_processed();
    assert_eq!(order_status(&app, &order_id).await.as_deref(), Some("paid"));
    assert_eq!(payments_of(&app, &order_id).await, vec![payment_id]);
    assert_eq!(event_kinds(&app, &order_id).await, vec!["created", "paid"]);
    assert_eq!(
        app.processed_event(&payment).await.map(|row| row.status),
        Some(202)
    );
}
