//! Retention: dedup records older than `--retention` are deleted by the
//! background sweeper; younger ones stay; a redelivery after its record
//! expired runs the handler again (the documented trade-off).
//!
//! Ages are made, not waited for: the test moves `processed_at` of chosen
//! records into the past with its own connection, and the sweeper (every
//! 100 ms here) does the rest. The tests wait for what the sweeper did, not
//! for a time.

use std::time::{Duration, Instant};

use exactly_e2e::{Backend, Event, TestApp, TestEnv, both_backends, json};

both_backends!(
    expired_records_are_swept_in_batches,
    retention_off_keeps_every_record
);

/// How long the sweeper may take to get to the records.
const PATIENCE: Duration = Duration::from_secs(20);

/// Moves the record of `event` `seconds` into the past.
async fn age_record(app: &TestApp, event: &Event, seconds: u32) {
    let sql = match app.backend() {
        Backend::Postgres => format!(
            "UPDATE exactly.processed_events SET processed_at = now() - make_interval(secs => {seconds}) \
             WHERE source = $1 AND id = $2"
        ),
        Backend::Sqlite => format!(
            "UPDATE exactly_processed_events \
             SET processed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{seconds} seconds') \
             WHERE source = $1 AND id = $2"
        ),
    };
    assert_eq!(app.db.execute(&sql, &[&event.source, &event.id]).await, 1);
}

async fn wait_for<F, Fut>(what: &str, app: &TestApp, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < PATIENCE,
            "{what} did not happen within {PATIENCE:?}\n{}",
            app.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn expired_records_are_swept_in_batches(backend: Backend) {
    let app = TestEnv::new(backend)
        .await
        .serve_with_flags(&[
            "--retention",
            "1h",
            "--retention-interval",
            "100ms",
            "--retention-batch",
            "2",
        ])
        .await;

    let expired: Vec<Event> = (0..5)
        .map(|n| Event::new("test.count").with_data(json!({"n": n})))
        .collect();
    let fresh = Event::new("test.count").with_data(json!({"fresh": true}));
    let half_hour_old = Event::new("test.count").with_data(json!({"age": "30m"}));
    for event in expired.iter().chain([&fresh, &half_hour_old]) {
        app.send_binary(event).await.assert_processed();
    }
    for event in &expired {
        age_record(&app, event, 2 * 3600).await;
    }
    age_record(&app, &half_hour_old, 1800).await;

    // Five expired records with two per statement: three statements.
    wait_for("the sweep of the expired records", &app, || async {
        app.processed_count().await == 2
    })
    .await;
    for event in &expired {
        assert_eq!(
            app.processed_event(event).await,
            None,
            "{} expired",
            event.id
        );
    }
    assert!(app.processed_event(&fresh).await.is_some());
    assert!(app.processed_event(&half_hour_old).await.is_some());

    let metrics = app.metrics().await;
    assert_eq!(
        metrics.get("processed_events_expired_total", &[]),
        Some(5.0),
        "{}",
        metrics.text()
    );
    // The oldest record left is the half-hour-old one; the gauge follows
    // within a sweep.
    wait_for("the oldest-age gauge to reach 30 minutes", &app, || async {
        let age = app
            .metrics()
            .await
            .value("processed_events_oldest_age_seconds", &[]);
        (1790.0..3600.0).contains(&age)
    })
    .await;

    // The trade-off: a redelivery after expiry runs the handler again…
    app.send_binary(&expired[0]).await.assert_processed();
    assert_eq!(app.effects(&expired[0]).await, 2);
    // …while an unexpired record still deduplicates.
    app.send_binary(&fresh).await.assert_replayed();
    app.send_binary(&half_hour_old).await.assert_replayed();
    assert_eq!(app.effects(&fresh).await, 1);
    assert_eq!(app.effects(&half_hour_old).await, 1);
    // The handlers' own rows are theirs: retention touches only the dedup
    // records.
    assert_eq!(app.effects(&expired[1]).await, 1);
}

async fn retention_off_keeps_every_record(backend: Backend) {
    let app = TestEnv::new(backend)
        .await
        .serve_with_flags(&["--retention", "off", "--retention-interval", "100ms"])
        .await;
    let old = Event::new("test.count").with_data(json!({"old": true}));
    app.send_binary(&old).await.assert_processed();
    age_record(&app, &old, 30 * 86400).await;

    // Once the gauge shows the record's age, a sweep ran after the update
    // (a sweep measures after deleting): the record is still there.
    wait_for("the oldest-age gauge to reach 30 days", &app, || async {
        app.metrics()
            .await
            .value("processed_events_oldest_age_seconds", &[])
            >= 30.0 * 86400.0 - 10.0
    })
    .await;
    assert!(app.processed_event(&old).await.is_some());
    app.send_binary(&old).await.assert_replayed();
    assert_eq!(app.effects(&old).await, 1);
    assert_eq!(
        app.metrics()
            .await
            .value("processed_events_expired_total", &[]),
        0.0
    );
}
