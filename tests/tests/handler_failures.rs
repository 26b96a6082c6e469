//! A handler that fails leaves nothing behind: not its own rows, not the
//! claim. The answer says whether the broker should retry (5xx) or
//! dead-letter (422), and a failed event is never replayed: the next
//! delivery runs the handler again.

use exactly_e2e::{Backend, Event, TestApp, both_backends, json};

both_backends!(
    retryable_error_rolls_back_then_redelivery_succeeds,
    trap_rolls_back_and_the_host_keeps_serving,
    transaction_control_is_refused,
    swallowed_statement_error_fails_the_event,
    permanent_error_rolls_back,
    unusable_outcome_rolls_back,
);

/// Nothing of `event` remains: no claim, no testkit effect.
async fn assert_nothing_stored(app: &TestApp, event: &Event) {
    assert_eq!(
        app.processed_event(event).await,
        None,
        "a failed event must not be marked processed"
    );
    assert_eq!(
        app.effects(event).await,
        0,
        "a failed event's handler writes must be rolled back"
    );
}

async fn retryable_error_rolls_back_then_redelivery_succeeds(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.db
        .execute("INSERT INTO test_flags (name) VALUES ('fail')", &[])
        .await;
    let event = Event::new("test.flaky").with_data(json!({"attempt": "any"}));

    app.send_binary(&event).await.assert_error(500, "retryable");
    assert_nothing_stored(&app, &event).await;

    // The broker retries after the transient cause went away.
    app.db
        .execute("DELETE FROM test_flags WHERE name = 'fail'", &[])
        .await;
    app.send_binary(&event).await.assert_processed();
    assert_eq!(app.effects(&event).await, 1);
    assert_eq!(
        app.processed_event(&event).await.map(|row| row.status),
        Some(202)
    );
    app.send_binary(&event).await.assert_replayed();
    assert_eq!(app.effects(&event).await, 1);
}

async fn trap_rolls_back_and_the_host_keeps_serving(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let panicking = Event::new("test.panic");

    app.send_binary(&panicking).await.assert_error(500, "trap");
    assert_nothing_stored(&app, &panicking).await;
    // Not stored, so a redelivery runs (and traps) again.
    app.send_binary(&panicking).await.assert_error(500, "trap");
    assert_nothing_stored(&app, &panicking).await;

    let next = Event::new("test.count");
    app.send_binary(&next).await.assert_processed();
    assert_eq!(app.effects(&next).await, 1);
    assert_eq!(app.processed_count().await, 1);
}

async fn transaction_control_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for type_ in ["test.commit", "test.commit-multi"] {
        let event = Event::new(type_);
        app.send_binary(&event)
            .await
            .assert_error(422, "statement-refused");
        assert_nothing_stored(&app, &event).await;
    }
    assert_eq!(app.processed_count().await, 0);
}

async fn swallowed_statement_error_fails_the_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.swallow");

    // The handler hits a unique violation, ignores it and returns Ok: the
    // host must not commit (on PostgreSQL the COMMIT would silently roll
    // back) nor answer 2xx.
    app.send_binary(&event)
        .await
        .assert_error(500, "statement-failed");
    assert_nothing_stored(&app, &event).await;
    assert_eq!(
        app.db
            .integer("SELECT count(*) FROM test_unique", &[])
            .await,
        0,
        "the statement before the failed one is rolled back too"
    );
    assert_eq!(app.processed_count().await, 0);
}

async fn permanent_error_rolls_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.permanent").with_data(json!({"bad": true}));

    let error = app.send_binary(&event).await.assert_error(422, "permanent");
    assert!(!error.message.is_empty(), "the message says why: {error:?}");
    assert_nothing_stored(&app, &event).await;

    // Not stored: a redelivery is not a replay.
    app.send_binary(&event).await.assert_error(422, "permanent");
    assert_nothing_stored(&app, &event).await;
    assert_eq!(app.processed_count().await, 0);
}

/// A reply event the host cannot send (no type): 422 `bad-outcome`, and the
/// handler's effects roll back with the claim.
async fn unusable_outcome_rolls_back(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.bad-reply");

    let error = app.send_binary(&event).await.assert_error(422, "bad-outcome");
    assert!(error.message.contains("reply type"), "the message says why: {error:?}");
    assert_nothing_stored(&app, &event).await;
    assert_eq!(app.processed_count().await, 0);
}
