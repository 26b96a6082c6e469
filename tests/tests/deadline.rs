//! Issue 10 item 15: the event's deadline bounds a statement that waits,
//! not only one that runs. A handler's UPDATE waits for a row another
//! transaction holds; with a 1 s deadline and lock and statement timeouts
//! of a minute, the event must be answered `500 deadline` near the
//! deadline, and the waiting statement must be gone from the server while
//! the other transaction still holds the row (it was cancelled, not left
//! to wait for its timeouts).
//!
//! PostgreSQL only: on SQLite an event holds the one writer from BEGIN, so
//! a handler's statement never waits for a row another transaction holds.

use std::time::{Duration, Instant};

use exactly_e2e::app::{hostile_handler, standard_handlers};
use exactly_e2e::{Backend, Event, HandlerLimits, TestEnv, json};
use sqlx::Connection;

#[tokio::test]
async fn the_deadline_stops_a_statement_waiting_for_a_lock() {
    let mut handlers = standard_handlers();
    handlers.push(hostile_handler(Some(HandlerLimits {
        deadline: Some(Duration::from_secs(1)),
        ..Default::default()
    })));
    let env = TestEnv::with_handlers(Backend::Postgres, handlers).await;
    let url = env.database_url().to_owned();
    let app = env
        .serve_with_flags(&["--lock-timeout", "60s", "--statement-timeout", "60s"])
        .await;
    app.db.execute("INSERT INTO hostile_notes (k) VALUES ('held')", &[]).await;

    // Another transaction holds the row for the whole test.
    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut holder).await.expect("begin");
    sqlx::query("SELECT k FROM hostile_notes WHERE k = 'held' FOR UPDATE")
        .execute(&mut holder)
        .await
        .expect("lock the row");

    let event = Event::new("hostile.sql").with_data(json!({
        "statements": [{"sql": "UPDATE hostile_notes SET k = 'moved' WHERE k = 'held'", "params": [], "query": false}],
        "result_from": null,
    }));
    let started = Instant::now();
    let answer = app.send_binary(&event).await;
    let took = started.elapsed();
    answer.assert_error(500, "deadline");
    assert!(
        took < Duration::from_secs(30),
        "answered after {took:?}: the deadline (1 s) did not bound the wait, the lock timeout (60 s) did"
    );

    // The row is still held, so a statement left waiting would show here
    // until the lock timeout (a minute). The cancel is a signal the server
    // acts on within milliseconds: allow it a few seconds.
    let waiting_sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND query LIKE 'UPDATE hostile_notes%' AND state = 'active'";
    let mut waiting = app.db.integer(waiting_sql, &[]).await;
    let cancelled_by = Instant::now() + Duration::from_secs(5);
    while waiting > 0 && Instant::now() < cancelled_by {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiting = app.db.integer(waiting_sql, &[]).await;
    }
    assert_eq!(waiting, 0, "the event was answered but its statement still waits on the server");
    assert_eq!(app.processed_event(&event).await, None);
    sqlx::query("ROLLBACK").execute(&mut holder).await.expect("release");
    assert_eq!(
        app.db.integer("SELECT count(*) FROM hostile_notes WHERE k = 'moved'", &[]).await,
        0,
        "nothing of the event committed"
    );
}
