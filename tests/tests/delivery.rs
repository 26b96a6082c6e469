//! Delivery and replay: a committed event is processed once and every
//! redelivery, in either HTTP mode and however many at once, gets the stored
//! answer back without running the handler again.

use std::time::{Duration, Instant};

use exactly_e2e::app::standard_handlers;
use exactly_e2e::{Backend, Event, TestApp, TestEnv, both_backends, json};
use futures::future::join_all;

both_backends!(
    health_endpoints_answer,
    first_delivery_then_replay,
    structured_mode_is_the_same_event,
    concurrent_deliveries_run_the_handler_once,
    reply_event_is_replayed_with_the_same_id,
    reused_key_with_other_payload_is_rejected,
    percent_encoded_source_is_decoded,
    readiness_does_not_wait_for_events,
);

async fn health_endpoints_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.get("/healthz").await.assert_status(200);
    app.get("/readyz").await.assert_status(200);
}

/// Issue 10 item 14: `/readyz` must not queue behind events. With every
/// event session taken (one connection; SQLite's one writer) by an event
/// that sleeps 3 s, a probe sent meanwhile is answered 200 before that
/// event is: a busy pod is not taken out of rotation.
async fn readiness_does_not_wait_for_events(backend: Backend) {
    let app = TestEnv::with_handlers(backend, standard_handlers())
        .await
        .serve_with_flags(&["--db-max-connections", "1"])
        .await;
    let slow = Event::new("test.sleep").with_data(json!({ "ms": 3000 }));
    let event = async {
        let answer = app.send_binary(&slow).await;
        (answer, Instant::now())
    };
    let probe = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answer = app.get("/readyz").await;
        (answer, Instant::now())
    };
    let ((answered, answered_at), (ready, probed_at)) = tokio::join!(event, probe);
    answered.assert_processed();
    ready.assert_status(200);
    assert!(
        probed_at < answered_at,
        "/readyz was answered only after the event that held the database session"
    );
}

fn order_created(order_id: &str) -> Event {
    Event::new("order.created").with_data(json!({
        "order_id": order_id,
        "customer_id": "customer-1",
        "total": 99.95,
    }))
}

async fn order_events(app: &TestApp, order_id: &str) -> i64 {
    app.db
        .integer(
            "SELECT count(*) FROM order_events WHERE CAST(order_id AS TEXT) = $1",
            &[order_id],
        )
        .await
}

async fn first_delivery_then_replay(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let order_id = format!("order-{}", uuid::Uuid::new_v4());
    let event = order_created(&order_id);

    app.send_binary(&event).await.assert_processed();
    let status = app
        .db
        .text(
            "SELECT CAST(status AS TEXT) FROM orders WHERE CAST(order_id AS TEXT) = $1",
            &[&order_id],
        )
        .await;
    assert_eq!(status.as_deref(), Some("pending"));
    assert_eq!(order_events(&app, &order_id).await, 1);
    let processed = app
        .processed_event(&event)
        .await
        .expect("the event is stored");
    assert_eq!(processed.type_, "order.created");
    assert_eq!(processed.status, 202);

    // Redelivered by the broker: the stored answer, the handler not run.
    app.send_binary(&event).await.assert_replayed();
    assert_eq!(order_events(&app, &order_id).await, 1);

    // The same (source, id) and payload in structured mode is the same
    // event, not a reused key.
    app.send_structured(&event).await.assert_replayed();
    assert_eq!(order_events(&app, &order_id).await, 1);
    assert_eq!(app.processed_count().await, 1);
}

async fn structured_mode_is_the_same_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count").with_data(json!({"n": 1, "note": "structured first"}));

    app.send_structured(&event).await.assert_processed();
    assert_eq!(app.effects(&event).await, 1);

    app.send_binary(&event).await.assert_replayed();
    app.send_structured(&event).await.assert_replayed();
    assert_eq!(app.effects(&event).await, 1);
    assert_eq!(
        app.processed_event(&event).await.map(|row| row.status),
        Some(202)
    );
}

async fn concurrent_deliveries_run_the_handler_once(backend: Backend) {
    const DELIVERIES: usize = 64;
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count").with_data(json!({"n": 64}));

    let answers = join_all((0..DELIVERIES).map(|_| app.send_binary(&event))).await;

    for answer in &answers {
        answer.assert_accepted();
    }
    let first_deliveries = answers.iter().filter(|answer| !answer.is_replay()).count();
    assert_eq!(
        first_deliveries, 1,
        "exactly one of {DELIVERIES} concurrent deliveries runs the handler, the others replay"
    );
    assert_eq!(app.effects(&event).await, 1, "the handler committed once");
    assert_eq!(app.processed_count().await, 1);
}

async fn reply_event_is_replayed_with_the_same_id(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.emit").with_data(json!({"n": 7}));

    let first = app.send_binary(&event).await;
    first.assert_status(200);
    assert!(!first.is_replay(), "a first delivery:\n{first}");
    let reply_id = first
        .header("ce-id")
        .expect("the reply has a ce-id")
        .to_owned();
    assert!(!reply_id.is_empty());
    assert!(
        first
            .header("ce-source")
            .is_some_and(|source| !source.is_empty()),
        "the reply has a ce-source:\n{first}"
    );
    assert_eq!(first.header("ce-type"), Some("test.emitted"));
    assert_eq!(first.header("ce-specversion"), Some("1.0"));
    assert_eq!(first.json(), json!({"echo": {"n": 7}}));
    assert_eq!(app.effects(&event).await, 1);
    assert_eq!(
        app.processed_event(&event).await.map(|row| row.status),
        Some(200)
    );

    let replay = app.send_binary(&event).await;
    replay.assert_status(200);
    assert!(
        replay.is_replay(),
        "expected `exactly-replay: true`:\n{replay}"
    );
    assert_eq!(replay.header("ce-id"), Some(reply_id.as_str()));
    assert_eq!(replay.header("ce-source"), first.header("ce-source"));
    assert_eq!(replay.header("ce-type"), Some("test.emitted"));
    assert_eq!(replay.body, first.body);
    assert_eq!(app.effects(&event).await, 1);

    // The reply id is derived from the incoming (source, id), not the data.
    let other = Event::new("test.emit").with_data(json!({"n": 7}));
    let other_answer = app.send_binary(&other).await;
    other_answer.assert_status(200);
    assert_ne!(other_answer.header("ce-id"), Some(reply_id.as_str()));
}

async fn reused_key_with_other_payload_is_rejected(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let original = Event::new("test.count").with_data(json!({"n": 1}));
    app.send_binary(&original).await.assert_processed();

    let other_data = original.redelivered_with_data(json!({"n": 2}));
    app.send_binary(&other_data)
        .await
        .assert_error(422, "key-reused");
    let other_type = original.clone().with_type("test.echo");
    app.send_binary(&other_type)
        .await
        .assert_error(422, "key-reused");
    app.send_structured(&other_data)
        .await
        .assert_error(422, "key-reused");

    // The original is untouched and still replays.
    assert_eq!(app.effects(&original).await, 1);
    let processed = app.processed_event(&original).await.expect("still stored");
    assert_eq!(processed.type_, "test.count");
    assert_eq!(processed.status, 202);
    app.send_binary(&original).await.assert_replayed();
    assert_eq!(app.processed_count().await, 1);
}

async fn percent_encoded_source_is_decoded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count").with_source("urn:orders/e2e");
    let mut headers = event.binary_headers();
    for (name, value) in &mut headers {
        if name == "ce-source" {
            *value = "urn%3Aorders%2Fe2e".to_owned();
        }
    }

    app.post(&headers, event.data_bytes())
        .await
        .assert_processed();
    let processed = app.processed("urn:orders/e2e", &event.id).await;
    assert!(
        processed.is_some(),
        "the stored source is the decoded `urn:orders/e2e`"
    );
    assert_eq!(
        app.effects(&event).await,
        1,
        "the handler saw the decoded source"
    );

    // Sent unencoded (`:` and `/` need no encoding), it is the same source.
    app.send_binary(&event).await.assert_replayed();
    assert_eq!(app.effects(&event).await, 1);
}
