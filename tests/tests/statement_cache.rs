//! Issue 10 item 10: a handler statement's text, run again with values of
//! other kinds, must mean what it means on a fresh connection. PostgreSQL
//! handler statements are cached as prepared statements on the session; a
//! statement prepared with the parameter types of its first use was reused
//! with other values, which the server then read as the old types (the
//! float 3.0 bound where an integer was first became 4613937818241073152).
//! On a pool of one connection every event runs on the same session, so
//! the cache is hit.

use exactly_e2e::app::{hostile_handler, standard_handlers};
use exactly_e2e::{Backend, Event, TestApp, TestEnv, json};
use serde_json::Value;

exactly_e2e::both_backends!(
    a_statement_means_the_same_whatever_ran_before,
    a_statement_survives_a_schema_change,
);

async fn serve_one_session(backend: Backend) -> TestApp {
    let mut handlers = standard_handlers();
    handlers.push(hostile_handler(None));
    TestEnv::with_handlers(backend, handlers)
        .await
        .serve_with_flags(&["--db-max-connections", "1"])
        .await
}

/// The rows of each statement of one `hostile.sql` event.
async fn run(app: &TestApp, statements: Vec<Value>) -> Vec<Value> {
    let event = Event::new("hostile.sql").with_data(json!({ "statements": statements, "result_from": null }));
    let answer = app.send_binary(&event).await;
    answer.assert_processed();
    let result = app.processed_result(&event).await.expect("the event's result");
    result["results"]
        .as_array()
        .expect("one result per statement")
        .iter()
        .map(|r| r["rows"].clone())
        .collect()
}

fn cast(sql: &str, value: Value) -> Value {
    json!({ "sql": sql, "params": [value], "query": true })
}

/// Each value kind the handler can bind, after an integer was bound to the
/// same text (in the same event, and in a later one): the rows must be the
/// ones a text never run before gives for that value.
async fn a_statement_means_the_same_whatever_ran_before(backend: Backend) {
    let app = serve_one_session(backend).await;
    let values = [json!(7), json!(3.0), json!("12345678"), json!(true), json!(null), json!({ "k": 1 })];
    let shared = "SELECT CAST($1 AS TEXT) AS v";
    // What each value gives on a text seen for the first time (each alias
    // makes another text, so no cached statement can answer it).
    let mut fresh = Vec::new();
    for (index, value) in values.iter().enumerate() {
        let unique = format!("SELECT CAST($1 AS TEXT) AS v{index}_{}", uuid::Uuid::new_v4().simple());
        fresh.push(run(&app, vec![cast(&unique, value.clone())]).await.remove(0));
    }
    // The same text for all, an integer first: in one event, then one
    // value per event (the session and its cache outlive each event).
    let together = run(&app, values.iter().map(|value| cast(shared, value.clone())).collect()).await;
    for (index, value) in values.iter().enumerate() {
        assert_eq!(
            together[index], fresh[index],
            "{value} bound to a text an integer was bound to first, in one event"
        );
    }
    for (index, value) in values.iter().enumerate() {
        let alone = run(&app, vec![cast(shared, value.clone())]).await.remove(0);
        assert_eq!(alone, fresh[index], "{value} bound to a text run before with other values");
    }
}

/// Issue 10 item 13: after a migration changes a table under a statement
/// the session has cached (here a column added under `SELECT *`, as
/// another replica's start-up would), PostgreSQL refuses the cached
/// statement ("cached plan must not change result type", SQLSTATE 0A000).
/// The event must still be processed, with the new columns: the host
/// closes the session and runs the event once more on a fresh one.
async fn a_statement_survives_a_schema_change(backend: Backend) {
    let app = serve_one_session(backend).await;
    app.db.execute("INSERT INTO hostile_notes (k) VALUES ('present')", &[]).await;
    let read = || json!({ "sql": "SELECT * FROM hostile_notes WHERE k = $1", "params": ["present"], "query": true });
    run(&app, vec![read()]).await;
    app.db.execute("ALTER TABLE hostile_notes ADD COLUMN extra INTEGER", &[]).await;
    let event = Event::new("hostile.sql").with_data(json!({ "statements": [read()], "result_from": null }));
    let answer = app.send_binary(&event).await;
    answer.assert_processed();
    let result = app.processed_result(&event).await.expect("the event's result");
    assert_eq!(
        (&result["results"][0]["columns"], &result["results"][0]["rows"]),
        (&json!(["k", "extra"]), &json!([["present", null]])),
        "the statement does not read the table as it is now: {result}"
    );
    let again = app.send_binary(&event).await;
    assert!(again.is_replay(), "the redelivery ran again");
}
