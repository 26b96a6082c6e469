//! Noisy neighbours (issue 9 item 11): one handler whose events each hold
//! their database session until their deadline must not make another
//! handler's events wait behind its whole backlog.
//!
//! The hostile handler gets a flood of `hostile.pg-sleep` events (a
//! statement that never ends: `pg_sleep(600)`, SQLite a count to 10^12),
//! each stopped after about 2 s by its deadline / statement timeout, more
//! of them than its share of sessions (`--db-max-connections 2`). While
//! they run, a healthy `test.count` event of the testkit handler is sent.
//! The test counts how many hostile events had finished when the healthy
//! one was answered: an ordering, not a timing. With one shared pool the
//! healthy event queues behind every hostile event that asked first (all
//! of them finish before it); with a share per handler (PostgreSQL: a pool
//! per handler; SQLite: the writer in turns, one event per handler at a
//! time) it is answered while most of the flood is still waiting.
//!
//! The flood uses `pg_sleep`, which the SQL policy refuses, so the host
//! runs with the test-only switch that turns the policy off: the share must
//! hold without it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use exactly_e2e::{Backend, Event, HandlerLimits, TestEnv, hostile_handler, standard_handlers};

exactly_e2e::both_backends!(a_slow_handler_cannot_starve_another);

/// Hostile events in the flood, and each handler's share of sessions.
const FLOOD: usize = 6;
const SHARE: usize = 2;

async fn a_slow_handler_cannot_starve_another(backend: Backend) {
    let mut handlers = standard_handlers();
    handlers.push(hostile_handler(Some(HandlerLimits {
        deadline: Some(Duration::from_secs(2)),
        statement_timeout: Some(Duration::from_secs(2)),
        ..HandlerLimits::default()
    })));
    let share = SHARE.to_string();
    let app = Arc::new(
        TestEnv::with_handlers(backend, handlers)
            .await
            .serve_with_env(&["--db-max-connections", &share], &[("EXACTLY_TEST_SQL_POLICY", "off")])
            .await,
    );
    let warm = app.send_binary(&Event::new("test.count")).await;
    assert_eq!(warm.status, 202, "a healthy event before the flood: {warm:?}");

    let finished = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let (app, finished) = (app.clone(), finished.clone());
        flood.push(tokio::spawn(async move {
            let answer = app.send_binary(&Event::new("hostile.pg-sleep")).await;
            finished.fetch_add(1, Ordering::SeqCst);
            answer
        }));
    }
    // Let the flood reach the host and queue for its sessions.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(finished.load(Ordering::SeqCst), 0, "the flood's events must still be running");

    let healthy = app.send_binary(&Event::new("test.count")).await;
    let finished_before_healthy = finished.load(Ordering::SeqCst);
    assert_eq!(healthy.status, 202, "the healthy event during the flood: {healthy:?}");
    for answer in flood {
        let answer = answer.await.expect("a flood task");
        assert!(answer.status >= 500, "a hostile sleeper must be stopped: {answer:?}");
    }
    // PostgreSQL: the healthy event has sessions of its own, so no hostile
    // event needs to finish first. SQLite: it waits for the hostile event
    // holding the writer (one per handler at a time), not for the queue.
    let allowed = match backend {
        Backend::Postgres => 0,
        Backend::Sqlite => 1,
    };
    assert!(
        finished_before_healthy <= allowed,
        "{finished_before_healthy} of {FLOOD} hostile events finished before the healthy event was answered \
         (at most {allowed} may): the healthy handler waited behind the slow handler's backlog"
    );
}
