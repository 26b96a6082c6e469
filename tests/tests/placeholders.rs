//! Issue 10 item 11: a statement bound with fewer or more values than its
//! `$n` placeholders is the handler's mistake, refused as such on both
//! backends (422 `statement-refused`, naming the counts). Before, PostgreSQL
//! answered 503 `database-unavailable` (its protocol error read as an
//! outage, so the broker retried) and SQLite bound a missing value as NULL
//! and ignored an extra one (202).

use exactly_e2e::app::{hostile_handler, standard_handlers};
use exactly_e2e::{Backend, Event, TestApp, TestEnv, both_backends, json};
use serde_json::Value;

both_backends!(values_must_match_the_placeholders);

async fn serve(backend: Backend) -> TestApp {
    let mut handlers = standard_handlers();
    handlers.push(hostile_handler(None));
    TestEnv::with_handlers(backend, handlers).await.serve().await
}

fn event(params: Value) -> Event {
    Event::new("hostile.sql").with_data(json!({
        "statements": [{ "sql": "SELECT CAST($1 AS TEXT) AS a, CAST($2 AS TEXT) AS b", "params": params, "query": true }],
        "result_from": null,
    }))
}

async fn values_must_match_the_placeholders(backend: Backend) {
    let app = serve(backend).await;
    for (params, bound) in [(json!(["x"]), 1), (json!(["x", "y", "z"]), 3), (json!([]), 0)] {
        let event = event(params);
        let answer = app.send_binary(&event).await;
        let error = answer.assert_error(422, "statement-refused");
        assert!(
            error.message.contains(&format!("{bound} value")) && error.message.contains("$2"),
            "the refusal names what was bound and what the statement needs:\n{answer}"
        );
        assert_eq!(app.processed_event(&event).await, None);
    }
    let right = event(json!(["x", "y"]));
    app.send_binary(&right).await.assert_processed();
    let result = app.processed_result(&right).await.expect("the event's result");
    assert_eq!(result["results"][0]["rows"], json!([["x", "y"]]));
}
