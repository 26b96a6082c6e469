//! `testkit`: a handler whose behaviour the end-to-end tests choose through
//! the event type.
//!
//! Every run first appends a `test_effects` row (`kind` = the event type),
//! so the tests can count how often the handler's work committed: a row per
//! processed event, none for an event that failed or was a duplicate.
//!
//! | type | behaviour |
//! |---|---|
//! | `test.count` | Ok, result `{"ran":true}` |
//! | `test.flaky` | retryable while `test_flags` holds `fail`, else Ok |
//! | `test.permanent` | permanent error |
//! | `test.panic` | panics (a trap for the host) |
//! | `test.commit` | issues `COMMIT` (refused), ignores the error, returns Ok |
//! | `test.commit-multi` | issues `SELECT 1; COMMIT` (refused), ignores the error, returns Ok |
//! | `test.swallow` | violates a unique constraint, swallows the error, returns Ok |
//! | `test.emit` | Ok with a `test.emitted` reply echoing the data |
//! | `test.sleep` | sleeps `{"ms": N}` milliseconds, then Ok |
//! | `test.echo` | Ok with the data as the result |
//! | `test.attributes` | Ok with `{"time", "dataschema", "data"}` as received (`data` as text, `null` when absent) |
//! | `test.raw-result` | Ok with the data's JSON text, byte for byte, as the result (as a handler with its own `serde_json` features may return it) |
//! | `test.insert` | inserts `{"k", "n", "note"}` (data) into `test_checked` with `?` |
//! | `test.read-as-integer` | reads `test_checked.note` of `{"k"}` as an integer with `?` |
//! | anything else | permanent error naming the type |

use exactly_guest::{Error, Event, Outcome, Reply, Tx, log, params};
use serde::Deserialize;
use serde_json::json;

exactly_guest::export_handler!(handle);

fn handle(event: Event, tx: &Tx) -> Result<Outcome, Error> {
    tx.execute(
        "INSERT INTO test_effects (event_source, event_id, kind) VALUES ($1, $2, $3)",
        params![event.source(), event.id(), event.ty()],
    )?;

    match event.ty() {
        "test.count" => Ok(ran()),
        "test.flaky" => {
            let flag = tx.query("SELECT name FROM test_flags WHERE name = 'fail'", params![])?;
            if flag.is_empty() {
                Ok(ran())
            } else {
                Err(Error::retryable("flag fail is set"))
            }
        }
        "test.permanent" => Err(Error::permanent("testkit refuses this event")),
        "test.panic" => panic!("testkit panics on purpose"),
        "test.commit" => {
            // The host must refuse this and fail the event even though the
            // handler pretends nothing happened.
            match tx.execute("COMMIT", params![]) {
                Ok(count) => log::error!("COMMIT was accepted ({count} rows)"),
                Err(error) => log::warn!("COMMIT failed as expected, ignoring it: {error}"),
            }
            Ok(ran())
        }
        "test.commit-multi" => {
            match tx.query("SELECT 1; COMMIT", params![]) {
                Ok(rows) => log::error!("SELECT 1; COMMIT was accepted ({} rows)", rows.len()),
                Err(error) => {
                    log::warn!("SELECT 1; COMMIT failed as expected, ignoring it: {error}")
                }
            }
            Ok(ran())
        }
        "test.swallow" => {
            let insert = "INSERT INTO test_unique (k) VALUES ($1)";
            tx.execute(insert, params![event.id()])?;
            // The second insert violates the primary key; the host must not
            // commit the event although the handler returns Ok.
            match tx.execute(insert, params![event.id()]) {
                Ok(count) => log::error!("the duplicate insert succeeded ({count} rows)"),
                Err(error) => log::warn!("swallowing {:?}: {error}", error.kind()),
            }
            Ok(ran())
        }
        "test.emit" => Ok(ran().with_reply(
            Reply::new("test.emitted")
                .subject("reply")
                .data_json(&json!({ "echo": data_or_null(&event)? })),
        )),
        "test.sleep" => {
            #[derive(Deserialize)]
            struct Sleep {
                ms: u64,
            }
            let sleep: Sleep = event.data_json()?;
            std::thread::sleep(std::time::Duration::from_millis(sleep.ms));
            Ok(ran())
        }
        "test.insert" => {
            #[derive(Deserialize)]
            struct Insert {
                k: String,
                n: Option<i64>,
                note: Option<String>,
            }
            let row: Insert = event.data_json()?;
            tx.execute(
                "INSERT INTO test_checked (k, n, note) VALUES ($1, $2, $3)",
                params![row.k, row.n, row.note],
            )?;
            Ok(ran())
        }
        "test.read-as-integer" => {
            #[derive(Deserialize)]
            struct Read {
                k: String,
            }
            let read: Read = event.data_json()?;
            let rows = tx.query("SELECT note FROM test_checked WHERE k = $1", params![read.k])?;
            let row = rows.get(0).ok_or_else(|| Error::permanent("no such row"))?;
            let note: i64 = row.get("note")?;
            Ok(Outcome::json(json!({ "note": note })))
        }
        // A reply without a type: the host must refuse the outcome.
        "test.bad-reply" => Ok(ran().with_reply(Reply::new(""))),
        "test.echo" => Ok(Outcome::json(data_or_null(&event)?)),
        "test.attributes" => Ok(Outcome::json(json!({
            "time": event.time(),
            "dataschema": event.dataschema(),
            "data": event.data().map(String::from_utf8_lossy),
        }))),
        // The SDK's `serde_json` re-serializes numbers as doubles; a handler
        // that enables `raw_value` (or `arbitrary_precision`) returns any
        // JSON text, and so does this.
        "test.raw-result" => {
            let text = String::from_utf8(event.data().unwrap_or_default().to_vec())
                .map_err(|_| Error::permanent("the data is not UTF-8"))?;
            let raw = serde_json::value::RawValue::from_string(text)
                .map_err(|error| Error::permanent(format!("the data is not JSON: {error}")))?;
            Ok(Outcome::new(raw))
        }
        other => Err(Error::permanent(format!(
            "testkit has no behaviour for event type {other:?}"
        ))),
    }
}

fn ran() -> Outcome {
    Outcome::json(json!({ "ran": true }))
}

/// The event's data as JSON; `null` when there is none.
fn data_or_null(event: &Event) -> Result<serde_json::Value, Error> {
    match event.data() {
        None => Ok(serde_json::Value::Null),
        Some(_) => event.data_json(),
    }
}
