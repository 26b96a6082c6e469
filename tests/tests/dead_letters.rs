//! `exactly` as the Knative Trigger's dead-letter sink: `POST /dead-letter`
//! stores what the dispatcher gave up on (never runs a handler for it, never
//! loses one, never stores a redelivery twice), `exactly dlq list` shows it
//! with Knative's error decoded, and `exactly dlq replay` sends the original
//! event again and records on the row whether it was accepted.
//!
//! The dead letters are shaped as the Knative Kafka dispatcher posts them:
//! the original event (binary or structured mode) plus the extensions
//! `knativeerrorcode`, `knativeerrordata` (the failed answer's body, base64)
//! and `knativeerrordest`.

use std::process::Output;

use base64::Engine;
use exactly_e2e::{Answer, Backend, Event, TestApp, TestEnv, both_backends, json};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Connection};

both_backends!(
    dead_letter_is_stored_once_and_listed_with_the_error_decoded,
    structured_dead_letters_and_list_filters,
    replay_resends_the_event_and_records_it,
    failed_replays_are_recorded_and_exit_non_zero,
    dead_lettered_again_during_its_replay_stays_pending,
    replay_over_https,
    malformed_dead_letters_are_kept_as_received_and_replayed_as_they_came,
    busy_database_answers_503_and_stores_nothing,
    dead_letters_may_be_larger_than_events,
    quota_answers_503_and_retention_frees_it,
    events_with_many_extensions_are_taken,
    a_problem_quoting_the_request_is_stored,
    events_binary_mode_cannot_carry_replay_as_received,
);

/// What the Knative dispatcher adds to the event it dead-letters, after
/// `failed` was the subscriber's last answer.
fn knative_extensions(failed: &Answer, dest: &str) -> Vec<(String, String)> {
    exactly_e2e::event::knative_extensions(failed.status, &failed.body, dest)
}

/// The dead letter in binary mode: the event's own headers plus Knative's.
fn dead_letter_headers(event: &Event, failed: &Answer, dest: &str) -> Vec<(String, String)> {
    let mut headers = event.binary_headers();
    headers.extend(knative_extensions(failed, dest));
    headers.push((
        "ce-traceparent".into(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
    ));
    headers
}

async fn post_dead_letter(app: &TestApp, event: &Event, failed: &Answer) -> Answer {
    let dest = format!("{}/", app.address);
    app.post_to(
        "/dead-letter",
        &dead_letter_headers(event, failed, &dest),
        event.data_bytes(),
    )
    .await
}

/// Makes the host answer 500 `retryable` for `event` (a test.flaky event
/// while the flag is set), as it would before the broker gives up.
async fn fail_first(app: &TestApp, event: &Event) -> Answer {
    app.db
        .execute(
            "INSERT INTO test_flags (name) VALUES ('fail') ON CONFLICT DO NOTHING",
            &[],
        )
        .await;
    let failed = app.send_binary(event).await;
    failed.assert_error(500, "retryable");
    failed
}

#[track_caller]
fn stdout_of(output: &Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn list_json(env: &TestEnv, filters: &[&str]) -> Vec<Value> {
    env.dlq_list_json(filters).await
}

/// The rows stored for `(source, id)`, oldest first: error code, raw error
/// data, dest, deliveries, extensions (JSON text).
async fn stored_rows(app: &TestApp, event: &Event) -> Vec<Vec<Option<String>>> {
    let sql = format!(
        "SELECT CAST(error_code AS TEXT), CAST(error_data AS TEXT), CAST(error_dest AS TEXT),
                CAST(deliveries AS TEXT), CAST(extensions AS TEXT)
         FROM {} WHERE source = $1 AND id = $2 ORDER BY dead_letter_id",
        app.backend().dead_letters_table()
    );
    app.db.rows(&sql, &[&event.source, &event.id]).await
}

/// The replay columns of one dead letter: attempts, last status, last
/// target, replayed_at, last error.
async fn replay_columns(app: &TestApp, dead_letter_id: i64) -> [Option<String>; 5] {
    let sql = format!(
        "SELECT CAST(replay_attempts AS TEXT), CAST(last_replay_status AS TEXT), CAST(last_replay_to AS TEXT),
                CAST(replayed_at AS TEXT), CAST(last_replay_error AS TEXT)
         FROM {} WHERE dead_letter_id = $1",
        app.backend().dead_letters_table()
    );
    let mut rows = app
        .db
        .rows(&sql.replace("$1", &dead_letter_id.to_string()), &[])
        .await;
    assert_eq!(rows.len(), 1, "dead letter {dead_letter_id} must exist");
    <[Option<String>; 5]>::try_from(rows.remove(0)).expect("five columns")
}

fn id_of(item: &Value) -> i64 {
    item["dead_letter_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no dead_letter_id in {item}"))
}

async fn dead_letter_is_stored_once_and_listed_with_the_error_decoded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.flaky").with_data(json!({"order_id": "o-1", "note": "snow ☃"}));
    let failed = fail_first(&app, &event).await;
    let raw_error = base64::engine::general_purpose::STANDARD.encode(&failed.body);
    let dest = format!("{}/", app.address);

    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();

    let rows = stored_rows(&app, &event).await;
    assert_eq!(rows.len(), 1, "one dead letter stored: {rows:?}");
    let [code, data, stored_dest, deliveries, extensions] =
        <[Option<String>; 5]>::try_from(rows[0].clone()).expect("five columns");
    assert_eq!(code.as_deref(), Some("500"));
    assert_eq!(
        data.as_deref(),
        Some(raw_error.as_str()),
        "knativeerrordata is stored as received"
    );
    assert_eq!(stored_dest.as_deref(), Some(dest.as_str()));
    assert_eq!(deliveries.as_deref(), Some("1"));
    let extensions: Value = serde_json::from_str(&extensions.expect("extensions")).expect("JSON");
    assert_eq!(extensions["knativeerrorcode"], "500");
    assert_eq!(
        extensions["traceparent"],
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    // Storing a dead letter runs no handler and claims nothing.
    assert_eq!(app.effects(&event).await, 0);
    assert_eq!(app.processed_event(&event).await, None);

    // Knative delivers to the dead-letter sink at least once: the same
    // dead letter again is counted, not stored twice.
    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();
    let rows = stored_rows(&app, &event).await;
    assert_eq!(
        rows.len(),
        1,
        "a redelivered dead letter is not stored twice: {rows:?}"
    );
    assert_eq!(
        rows[0][3].as_deref(),
        Some("2"),
        "deliveries counts the redelivery"
    );

    // The same (source, id) for another destination is another dead letter.
    let mut elsewhere =
        dead_letter_headers(&event, &failed, "http://other-subscriber.default.svc/");
    elsewhere.retain(|(name, _)| name != "ce-traceparent");
    app.post_to("/dead-letter", &elsewhere, event.data_bytes())
        .await
        .assert_accepted();
    assert_eq!(stored_rows(&app, &event).await.len(), 2);
    assert_eq!(
        app.metrics().await.value("dead_letters_stored_total", &[]),
        2.0,
        "two dead letters stored; the redelivery is not counted"
    );

    // The table, with the error decoded from base64.
    let table = stdout_of(&app.env().dlq(&["list"]).await, "exactly dlq list");
    let line = table
        .lines()
        .find(|line| line.contains(&dest))
        .unwrap_or_else(|| panic!("no dead letter for {dest} in:\n{table}"));
    for expected in [
        event.id.as_str(),
        "test.flaky",
        event.source.as_str(),
        "500",
        "pending",
        "retryable",
        "flag fail is set",
    ] {
        assert!(
            line.contains(expected),
            "{expected:?} missing from the line {line:?} of:\n{table}"
        );
    }
    assert!(
        !table.contains(&raw_error),
        "the table shows the error decoded, not base64:\n{table}"
    );
    assert!(table.starts_with("ID"), "a header line first:\n{table}");

    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 2);
    let item = items
        .iter()
        .find(|item| item["error_dest"] == dest.as_str())
        .unwrap_or_else(|| panic!("no dead letter for {dest}: {items:?}"));
    assert_eq!(item["source"], event.source.as_str());
    assert_eq!(item["id"], event.id.as_str());
    assert_eq!(item["type"], "test.flaky");
    assert_eq!(item["error_code"], "500");
    assert_eq!(item["error_data"], raw_error.as_str());
    let decoded: Value =
        serde_json::from_str(item["error_data_decoded"].as_str().expect("decoded text"))
            .expect("the decoded error is the host's JSON answer");
    assert_eq!(decoded["error"], "retryable");
    assert_eq!(item["deliveries"], 2);
    assert_eq!(item["datacontenttype"], "application/json");
    let data: Value =
        serde_json::from_str(item["data"].as_str().expect("data as text")).expect("JSON data");
    assert_eq!(data, event.data);
}

async fn structured_dead_letters_and_list_filters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let count = Event::new("test.count").with_data(json!({"n": 1}));
    let permanent = Event::new("test.permanent");
    let failed = app.send_binary(&permanent).await;
    failed.assert_error(422, "permanent");

    post_dead_letter(&app, &count, &failed)
        .await
        .assert_accepted();

    // Structured mode: the extensions are members of the JSON document.
    let mut document: Value = serde_json::from_slice(&permanent.structured_body()).expect("JSON");
    for (name, value) in knative_extensions(&failed, "http://exactly.default.svc/") {
        document[name.trim_start_matches("ce-")] = Value::String(value);
    }
    let headers = [(
        "content-type".to_owned(),
        "application/cloudevents+json".to_owned(),
    )];
    let body = serde_json::to_vec(&document).expect("JSON");
    app.post_to("/dead-letter", &headers, body.clone())
        .await
        .assert_accepted();
    app.post_to("/dead-letter", &headers, body)
        .await
        .assert_accepted();
    let rows = stored_rows(&app, &permanent).await;
    assert_eq!(
        rows.len(),
        1,
        "a structured redelivery is not stored twice either: {rows:?}"
    );
    assert_eq!(rows[0][0].as_deref(), Some("422"));
    assert_eq!(rows[0][2].as_deref(), Some("http://exactly.default.svc/"));

    let types = |items: &[Value]| -> Vec<String> {
        items
            .iter()
            .map(|item| item["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Newest first.
    assert_eq!(
        types(&list_json(app.env(), &[]).await),
        ["test.permanent", "test.count"]
    );
    assert_eq!(
        types(&list_json(app.env(), &["--type", "test.count"]).await),
        ["test.count"]
    );
    assert_eq!(
        types(&list_json(app.env(), &["--type", "test.permanent"]).await),
        ["test.permanent"]
    );
    assert!(
        list_json(app.env(), &["--type", "order.created"])
            .await
            .is_empty()
    );
    assert_eq!(
        types(&list_json(app.env(), &["--limit", "1"]).await),
        ["test.permanent"]
    );
    assert_eq!(list_json(app.env(), &["--since", "1h"]).await.len(), 2);
    assert!(list_json(app.env(), &["--until", "1h"]).await.is_empty());
    assert!(
        list_json(app.env(), &["--until", "2000-01-01T00:00:00Z"])
            .await
            .is_empty()
    );
    assert!(
        list_json(app.env(), &["--since", "2999-01-01T00:00:00+02:00"])
            .await
            .is_empty()
    );
    assert_eq!(
        types(
            &list_json(
                app.env(),
                &["--since", "2000-01-01T00:00:00Z", "--type", "test.count"]
            )
            .await
        ),
        ["test.count"]
    );
    let decoded =
        list_json(app.env(), &["--type", "test.permanent"]).await[0]["error_data_decoded"].clone();
    assert!(
        decoded
            .as_str()
            .is_some_and(|text| text.contains("testkit refuses this event")),
        "{decoded}"
    );

    let table = stdout_of(
        &app.env().dlq(&["list", "--type", "test.count"]).await,
        "exactly dlq list --type",
    );
    assert!(
        table.contains(&count.id) && !table.contains(&permanent.id),
        "{table}"
    );
    let refused = app.env().dlq(&["list", "--since", "last tuesday"]).await;
    assert!(!refused.status.success(), "a bad --since is refused");
}

async fn replay_resends_the_event_and_records_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.flaky").with_data(json!({"order_id": "o-2"}));
    let failed = fail_first(&app, &event).await;
    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();
    assert_eq!(app.effects(&event).await, 0);

    // The cause is fixed; the operator replays the dead letter to exactly.
    app.db
        .execute("DELETE FROM test_flags WHERE name = 'fail'", &[])
        .await;
    let items = list_json(app.env(), &["--pending"]).await;
    assert_eq!(items.len(), 1);
    let dead_letter_id = id_of(&items[0]);
    let to = format!("{}/", app.address);
    let id_text = dead_letter_id.to_string();
    let stdout = stdout_of(
        &app.env().dlq(&["replay", &id_text, "--to", &to]).await,
        "exactly dlq replay",
    );
    assert!(
        stdout.contains("replayed") && stdout.contains("202"),
        "{stdout}"
    );

    // The handler ran once, on the original (source, id).
    assert_eq!(app.effects(&event).await, 1);
    assert_eq!(
        app.processed_event(&event).await.map(|row| row.status),
        Some(202)
    );
    let [attempts, status, target, replayed_at, error] = replay_columns(&app, dead_letter_id).await;
    assert_eq!(attempts.as_deref(), Some("1"));
    assert_eq!(status.as_deref(), Some("202"));
    assert_eq!(target.as_deref(), Some(to.as_str()));
    assert!(replayed_at.is_some(), "an accepted replay sets replayed_at");
    assert_eq!(error, None);
    assert!(list_json(app.env(), &["--pending"]).await.is_empty());
    assert_eq!(list_json(app.env(), &[]).await[0]["state"], "replayed");

    // Replaying it again is refused unless forced…
    let again = app.env().dlq(&["replay", &id_text, "--to", &to]).await;
    assert!(
        !again.status.success(),
        "a second replay without --force must fail"
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("already replayed"));
    assert_eq!(
        replay_columns(&app, dead_letter_id).await[0].as_deref(),
        Some("1")
    );
    // …and when forced, exactly itself answers with the stored outcome.
    stdout_of(
        &app.env()
            .dlq(&["replay", &id_text, "--to", &to, "--force"])
            .await,
        "exactly dlq replay --force",
    );
    assert_eq!(
        app.effects(&event).await,
        1,
        "the replayed event is deduplicated by exactly"
    );
    assert_eq!(
        replay_columns(&app, dead_letter_id).await[0].as_deref(),
        Some("2")
    );

    // Dead-lettered again after the replay: that is news, a new row.
    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();
    assert_eq!(stored_rows(&app, &event).await.len(), 2);
    assert_eq!(list_json(app.env(), &["--pending"]).await.len(), 1);
}

async fn failed_replays_are_recorded_and_exit_non_zero(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.permanent");
    let failed = app.send_binary(&event).await;
    failed.assert_error(422, "permanent");
    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();
    let dead_letter_id = id_of(&list_json(app.env(), &[]).await[0]);
    let id_text = dead_letter_id.to_string();

    // The target refuses it again: reported, recorded, non-zero exit.
    let to = format!("{}/", app.address);
    let refused = app.env().dlq(&["replay", &id_text, "--to", &to]).await;
    assert!(!refused.status.success(), "a 422 replay must exit non-zero");
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(
        stdout.contains("NOT replayed") && stdout.contains("422"),
        "{stdout}"
    );
    let [attempts, status, _, replayed_at, error] = replay_columns(&app, dead_letter_id).await;
    assert_eq!(attempts.as_deref(), Some("1"));
    assert_eq!(status.as_deref(), Some("422"));
    assert_eq!(replayed_at, None, "a refused replay is not a replay");
    assert!(error.is_some_and(|e| e.contains("permanent")));

    // Nobody listens there: nothing recorded as success.
    let unreachable = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        format!("http://{}/", listener.local_addr().expect("its address"))
    };
    let output = app
        .env()
        .dlq(&["replay", &id_text, "--to", &unreachable])
        .await;
    assert!(
        !output.status.success(),
        "a replay to a closed port must exit non-zero"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("no answer"));
    let [attempts, status, target, replayed_at, error] = replay_columns(&app, dead_letter_id).await;
    assert_eq!(attempts.as_deref(), Some("2"));
    assert_eq!(status, None, "no answer, no status");
    assert_eq!(target.as_deref(), Some(unreachable.as_str()));
    assert_eq!(replayed_at, None);
    assert!(error.is_some());
    assert_eq!(
        list_json(app.env(), &["--pending"]).await.len(),
        1,
        "still pending"
    );
    assert_eq!(app.processed_event(&event).await, None);

    // A target whose error body holds U+0000 and a terminal escape: the
    // attempt is recorded, the quote escaped (on PostgreSQL it went
    // unrecorded: text cannot hold U+0000); one failure counted once.
    let (release, released) = tokio::sync::oneshot::channel();
    release.send(()).expect("released");
    let (odd, _received) = capture_one_request_answering(
        released,
        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 6\r\nconnection: close\r\n\r\na\0b\x1b[m",
    )
    .await;
    let output = app.env().dlq(&["replay", &id_text, "--to", &odd]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("1 of 1 dead letters"), "{stderr}");
    let [attempts, status, _, replayed_at, error] = replay_columns(&app, dead_letter_id).await;
    assert_eq!((attempts.as_deref(), status.as_deref(), replayed_at), (Some("3"), Some("500"), None));
    assert_eq!(error.as_deref(), Some("a\\u{0}b\\u{1b}[m"));

    // Unknown ids and other schemes are errors too.
    assert!(
        !app.env()
            .dlq(&["replay", "987654", "--to", &to])
            .await
            .status
            .success()
    );
    assert!(
        !app.env()
            .dlq(&["replay", &id_text, "--to", "ftp://example.invalid/"])
            .await
            .status
            .success()
    );
    assert_eq!(
        replay_columns(&app, dead_letter_id).await[0].as_deref(),
        Some("3")
    );
}

/// A replay the target accepts while the event fails again: the dispatcher
/// dead-letters it back before the target's 202 reaches `dlq replay` (the
/// capture server holds its answer until the new delivery is stored). The
/// new failure must not be hidden under `replayed_at`: the row stays
/// pending with `deliveries` 2, and the command says so and exits non-zero.
async fn dead_lettered_again_during_its_replay_stays_pending(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.flaky").with_data(json!({"order_id": "o-race"}));
    let failed = fail_first(&app, &event).await;
    post_dead_letter(&app, &event, &failed).await.assert_accepted();
    let dead_letter_id = id_of(&list_json(app.env(), &[]).await[0]);
    let id_text = dead_letter_id.to_string();

    let (release, released) = tokio::sync::oneshot::channel();
    let (to, received) = capture_one_request_answering_when(released).await;
    let args = ["replay", id_text.as_str(), "--to", to.as_str()];
    let replay = app.env().dlq(&args);
    let meanwhile = async {
        received.await.expect("the replay reaches the target");
        post_dead_letter(&app, &event, &failed).await.assert_accepted();
        release.send(()).expect("the target is waiting");
    };
    let (output, ()) = tokio::join!(replay, meanwhile);

    assert!(!output.status.success(), "a replay whose event failed again must exit non-zero");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("dead-lettered again") && stdout.contains("left pending"), "{stdout}");
    let [attempts, status, target, replayed_at, _] = replay_columns(&app, dead_letter_id).await;
    assert_eq!(attempts.as_deref(), Some("1"), "the attempt is recorded");
    assert_eq!(status.as_deref(), Some("202"));
    assert_eq!(target.as_deref(), Some(to.as_str()));
    assert_eq!(replayed_at, None, "the new failure is not hidden");
    let rows = stored_rows(&app, &event).await;
    assert_eq!(rows.len(), 1, "one row, delivered twice: {rows:?}");
    assert_eq!(rows[0][3].as_deref(), Some("2"));
    let pending = list_json(app.env(), &["--pending"]).await;
    assert_eq!(pending.len(), 1);
    assert_eq!(id_of(&pending[0]), dead_letter_id);
    assert_eq!(pending[0]["state"], "dead-lettered-again");

    // A replay with nothing new meanwhile is recorded as before.
    app.db.execute("DELETE FROM test_flags WHERE name = 'fail'", &[]).await;
    let to_exactly = format!("{}/", app.address);
    stdout_of(&app.env().dlq(&["replay", &id_text, "--to", &to_exactly]).await, "exactly dlq replay");
    assert!(replay_columns(&app, dead_letter_id).await[3].is_some());
    assert_eq!(app.effects(&event).await, 1);
}

/// Accepts one HTTP request on a free port, answers 202 and hands back the
/// request as it arrived: the head's lines and the body.
async fn capture_one_request() -> (String, tokio::sync::oneshot::Receiver<(Vec<String>, Vec<u8>)>) {
    let (release, released) = tokio::sync::oneshot::channel();
    let _ = release.send(());
    capture_one_request_answering_when(released).await
}

/// As [`capture_one_request`], but hands the request back first and
/// answers 202 only once `released` fires.
async fn capture_one_request_answering_when(
    released: tokio::sync::oneshot::Receiver<()>,
) -> (String, tokio::sync::oneshot::Receiver<(Vec<String>, Vec<u8>)>) {
    capture_one_request_answering(released, b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await
}

/// As [`capture_one_request_answering_when`], answering `response`.
async fn capture_one_request_answering(
    released: tokio::sync::oneshot::Receiver<()>,
    response: &'static [u8],
) -> (String, tokio::sync::oneshot::Receiver<(Vec<String>, Vec<u8>)>) {
    capture_one(released, response, None).await
}

/// A stream the capture server reads a request from: TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// The capture server, over TLS when given an acceptor (an `https://`
/// address then).
async fn capture_one(
    released: tokio::sync::oneshot::Receiver<()>,
    response: &'static [u8],
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (String, tokio::sync::oneshot::Receiver<(Vec<String>, Vec<u8>)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let scheme = if tls.is_some() { "https" } else { "http" };
    let address = format!("{scheme}://{}/", listener.local_addr().expect("address"));
    let (sender, receiver) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut stream: Box<dyn Stream> = loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            match &tls {
                None => break Box::new(tcp),
                // A client that refuses the certificate ends the handshake:
                // wait for the next one.
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => break Box::new(stream),
                    Err(_) => continue,
                },
            }
        };
        let mut request = Vec::new();
        let mut buffer = [0u8; 8192];
        let head_end = loop {
            let read = stream.read(&mut buffer).await.expect("read");
            assert!(read > 0, "the request ended before its head");
            request.extend_from_slice(&buffer[..read]);
            if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
        };
        let head: Vec<String> = String::from_utf8_lossy(&request[..head_end]).lines().map(str::to_owned).collect();
        let length: usize = head
            .iter()
            .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        let mut body = request[head_end + 4..].to_vec();
        while body.len() < length {
            let read = stream.read(&mut buffer).await.expect("read");
            assert!(read > 0, "the request ended before its body");
            body.extend_from_slice(&buffer[..read]);
        }
        let _ = sender.send((head, body));
        released.await.expect("the test releases the answer");
        stream.write_all(response).await.expect("answer");
        let _ = stream.shutdown().await;
    });
    (address, receiver)
}

/// `dlq replay` to an `https://` target (issue 11): the server's
/// certificate, from a CA of the test's own, is refused without
/// `--ca-file` (recorded as no answer) and taken with it; the event
/// arrives as it would over http.
async fn replay_over_https(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.permanent");
    let failed = app.send_binary(&event).await;
    post_dead_letter(&app, &event, &failed).await.assert_accepted();
    let id_text = id_of(&list_json(app.env(), &[]).await[0]).to_string();

    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let ca = ca.self_signed(&ca_key).expect("the CA");
    let server_key = rcgen::KeyPair::generate().expect("a key");
    let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("server parameters")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("the server certificate");
    let ca_file = app.env().dir().join("replay-ca.pem");
    std::fs::write(&ca_file, ca.pem()).expect("write the CA");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).expect("the key"),
        )
        .expect("the server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));

    let (release, released) = tokio::sync::oneshot::channel();
    release.send(()).expect("released");
    let (to, received) = capture_one(
        released,
        b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        Some(acceptor),
    )
    .await;
    let refused = app.env().dlq(&["replay", &id_text, "--to", &to]).await;
    assert!(!refused.status.success(), "an untrusted certificate must fail the replay");
    let stdout = String::from_utf8_lossy(&refused.stdout);
    assert!(stdout.contains("no answer") && stdout.to_lowercase().contains("certificate"), "{stdout}");
    assert_eq!(replay_columns(&app, id_text.parse().unwrap()).await[3], None);

    let ca_text = ca_file.display().to_string();
    let stdout = stdout_of(&app.env().dlq(&["replay", &id_text, "--to", &to, "--ca-file", &ca_text]).await, "dlq replay https");
    assert!(stdout.contains("replayed to") && stdout.contains("202"), "{stdout}");
    let (head, _) = received.await.expect("the replay arrived");
    assert!(head.iter().any(|line| line.eq_ignore_ascii_case(&format!("ce-id: {}", event.id))), "{head:?}");
    let [attempts, status, _, replayed_at, _] = replay_columns(&app, id_text.parse().unwrap()).await;
    assert_eq!((attempts.as_deref(), status.as_deref()), (Some("2"), Some("202")));
    assert!(replayed_at.is_some());
}

/// Fault 1 of issue 10: on a 4xx the Knative dispatcher commits the offset
/// and a dead letter is gone, so the sink stores whatever it is sent, as a
/// valid event when it is one and as received otherwise: a relative
/// `dataschema` (the Java SDK accepts them; `POST /` refuses them, which is
/// why they are dead-lettered), an attribute holding NUL after
/// percent-decoding (PostgreSQL text cannot hold it), a body that is not
/// JSON, a dead letter without an id. `dlq list` says which were kept raw
/// and why; `dlq replay` sends those back byte for byte.
async fn malformed_dead_letters_are_kept_as_received_and_replayed_as_they_came(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let table = backend.dead_letters_table();
    let failed = app.send_binary(&Event::new("test.permanent")).await;

    // The answer `POST /` gives the relative dataschema is what sends it here.
    let relative = Event::new("test.count");
    let mut relative_headers = dead_letter_headers(&relative, &failed, "http://x/");
    relative_headers.push(("ce-dataschema".into(), "/schemas/order/v1.json".into()));
    app.post_to("/", &relative_headers, relative.data_bytes())
        .await
        .assert_error(400, "invalid-event");
    let answer = app.post_to("/dead-letter", &relative_headers, relative.data_bytes()).await;
    assert_eq!(answer.status, 202, "{}", String::from_utf8_lossy(&answer.body));

    let nul = Event::new("test.count");
    let mut nul_headers = dead_letter_headers(&nul, &failed, "http://x/");
    nul_headers.push(("ce-subject".into(), "a%00b".into()));
    for _ in 0..2 {
        app.post_to("/dead-letter", &nul_headers, nul.data_bytes())
            .await
            .assert_accepted();
    }

    let structured = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    app.post_to("/dead-letter", &structured, b"{not json".to_vec())
        .await
        .assert_accepted();

    let no_id_event = Event::new("test.count");
    let mut no_id = dead_letter_headers(&no_id_event, &failed, "http://x/");
    no_id.retain(|(name, _)| name != "ce-id");
    app.post_to("/dead-letter", &no_id, no_id_event.data_bytes())
        .await
        .assert_accepted();

    let rows = app
        .db
        .rows(
            &format!(
                "SELECT id, CAST(deliveries AS TEXT), problem FROM {table} WHERE raw_headers IS NOT NULL ORDER BY dead_letter_id"
            ),
            &[],
        )
        .await;
    let ids: Vec<Option<String>> = rows.iter().map(|row| row[0].clone()).collect();
    assert_eq!(
        ids,
        [Some(relative.id.clone()), Some(nul.id.clone()), Some(String::new()), Some(String::new())],
        "every dead letter is stored, raw; {rows:?}"
    );
    assert_eq!(rows[1][1].as_deref(), Some("2"), "the NUL one's redelivery is the same row");
    assert!(rows[0][2].as_deref().is_some_and(|p| p.contains("dataschema")), "{rows:?}");
    assert!(rows[1][2].as_deref().is_some_and(|p| p.contains("subject")), "{rows:?}");
    assert!(rows[3][2].as_deref().is_some_and(|p| p.contains("`id`")), "{rows:?}");

    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|item| item["stored_as"] == "raw"), "{items:?}");
    assert_eq!(items[2]["raw_headers"].as_str().map(|h| h.contains("ce-subject: a%00b\r\n")), Some(true));
    let table_text = stdout_of(&app.env().dlq(&["list"]).await, "exactly dlq list");
    assert!(
        table_text.contains("STORED AS") && table_text.contains("Stored as received") && table_text.contains("dataschema"),
        "{table_text}"
    );

    // Replayed as it came: the same header bytes (Knative's report left
    // out) and the same body.
    let nul_id = id_of(&items[2]);
    let (to, received) = capture_one_request().await;
    stdout_of(
        &app.env().dlq(&["replay", &nul_id.to_string(), "--to", &to]).await,
        "exactly dlq replay",
    );
    let (head, body) = received.await.expect("the replay arrived");
    assert_eq!(body, nul.data_bytes());
    let sent: Vec<String> = head[1..]
        .iter()
        .filter(|line| line.starts_with("ce-") || line.starts_with("content-type"))
        .cloned()
        .collect();
    let expected: Vec<String> = nul_headers
        .iter()
        .filter(|(name, _)| !name.starts_with("ce-knativeerror"))
        .map(|(name, value)| format!("{name}: {value}"))
        .collect();
    let sorted = |mut lines: Vec<String>| {
        lines.sort();
        lines
    };
    assert_eq!(sorted(sent), sorted(expected));
    assert_eq!(replay_columns(&app, nul_id).await[1].as_deref(), Some("202"));

    app.get("/dead-letter")
        .await
        .assert_error(405, "method-not-allowed");
}

async fn busy_database_answers_503_and_stores_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let url = env.database_url().to_owned();
    let app = env.serve_with_flags(&["--lock-timeout", "300ms"]).await;
    let event = Event::new("test.count");
    let failed = app.send_binary(&Event::new("test.permanent")).await;
    let count = format!("SELECT count(*) FROM {}", backend.dead_letters_table());

    match backend {
        Backend::Postgres => {
            let mut blocker = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::raw_sql(AssertSqlSafe(
                "BEGIN; LOCK TABLE exactly.dead_letters IN ACCESS EXCLUSIVE MODE",
            ))
            .execute(&mut blocker)
            .await
            .expect("lock the table");
            post_dead_letter(&app, &event, &failed)
                .await
                .assert_error(503, "busy");
            sqlx::raw_sql(AssertSqlSafe("ROLLBACK"))
                .execute(&mut blocker)
                .await
                .expect("release");
        }
        Backend::Sqlite => {
            let mut blocker = sqlx::SqliteConnection::connect(&url).await.expect("open");
            sqlx::raw_sql(AssertSqlSafe("BEGIN IMMEDIATE"))
                .execute(&mut blocker)
                .await
                .expect("take the write lock");
            post_dead_letter(&app, &event, &failed)
                .await
                .assert_error(503, "busy");
            sqlx::raw_sql(AssertSqlSafe("ROLLBACK"))
                .execute(&mut blocker)
                .await
                .expect("release");
        }
    }
    assert_eq!(app.db.integer(&count, &[]).await, 0, "a 503 stored nothing");
    // The dispatcher retries; now it is stored.
    post_dead_letter(&app, &event, &failed)
        .await
        .assert_accepted();
    assert_eq!(app.db.integer(&count, &[]).await, 1);
}

/// An event refused 413 is dead-lettered whole, plus Knative's report: the
/// dead-letter path has a limit of its own (`--max-dead-letter-bytes`), or
/// that dead letter would be refused and lost.
async fn dead_letters_may_be_larger_than_events(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let flags = [
        "--max-body-bytes",
        "1024",
        "--max-dead-letter-bytes",
        "16384",
    ];
    let app = env.serve_with_flags(&flags).await;
    let big = Event::new("test.count").with_data(json!({"pad": "x".repeat(4000)}));
    let failed = app.send_binary(&big).await;
    failed.assert_error(413, "payload-too-large");

    post_dead_letter(&app, &big, &failed)
        .await
        .assert_accepted();
    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["error_code"], "413");
    let data: Value =
        serde_json::from_str(items[0]["data"].as_str().expect("data as text")).expect("JSON data");
    assert_eq!(data, big.data, "the data is stored whole");

    let huge = Event::new("test.count").with_data(json!({"pad": "x".repeat(40_000)}));
    post_dead_letter(&app, &huge, &failed)
        .await
        .assert_error(413, "payload-too-large");
    assert_eq!(list_json(app.env(), &[]).await.len(), 1);
}

/// How many dead letters are stored.
async fn dead_letter_count(app: &TestApp) -> usize {
    let sql = format!("SELECT CAST(count(*) AS TEXT) FROM {}", app.backend().dead_letters_table());
    app.db.rows(&sql, &[]).await[0][0]
        .as_deref()
        .and_then(|n| n.parse().ok())
        .expect("a count")
}

/// `--dead-letter-quota`: a new dead letter that would take the pending
/// total past the quota gets a retryable 503 `dead-letter-quota` and is not
/// stored; a redelivery of a stored one is still accepted; once the
/// retention sweeper expired the old one (`--dead-letter-retention`), the
/// refused one is stored on its retry. Ages are made: `received_at` is moved
/// back with the test's own connection.
async fn quota_answers_503_and_retention_frees_it(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let flags = [
        "--dead-letter-quota",
        "10000",
        "--dead-letter-retention",
        "1h",
        "--retention-interval",
        "100ms",
    ];
    let app = env.serve_with_flags(&flags).await;
    let first = Event::new("test.flaky").with_data(json!({"pad": "x".repeat(6000)}));
    let failed = fail_first(&app, &first).await;
    post_dead_letter(&app, &first, &failed).await.assert_accepted();
    assert_eq!(dead_letter_count(&app).await, 1);

    // A second one of the same size would pass 10,000 bytes.
    let second = Event::new("test.flaky").with_data(json!({"pad": "y".repeat(6000)}));
    let refused = post_dead_letter(&app, &second, &failed).await;
    refused.assert_error(503, "dead-letter-quota");
    assert_eq!(dead_letter_count(&app).await, 1, "nothing of the refused dead letter is stored");

    // Over the quota (as after a race, or a lowered quota): a redelivery of
    // the stored one only counts a delivery, and is accepted.
    let table = app.backend().dead_letters_table();
    app.db.execute(&format!("UPDATE {table} SET stored_bytes = 20000"), &[]).await;
    post_dead_letter(&app, &first, &failed).await.assert_accepted();
    let rows = stored_rows(&app, &first).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][3].as_deref(), Some("2"), "the redelivery is counted");
    post_dead_letter(&app, &second, &failed)
        .await
        .assert_error(503, "dead-letter-quota");

    let metrics = app.metrics().await;
    assert_eq!(metrics.value("dead_letters_over_quota_total", &[]), 2.0);

    // Two hours old: the sweeper deletes it (never replayed), and the quota
    // is free again.
    let age = match backend {
        Backend::Postgres => format!("UPDATE {table} SET received_at = now() - interval '2 hours'"),
        Backend::Sqlite => {
            format!("UPDATE {table} SET received_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-7200 seconds')")
        }
    };
    assert_eq!(app.db.execute(&age, &[]).await, 1);
    let started = std::time::Instant::now();
    while dead_letter_count(&app).await > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the expired dead letter was not swept\n{}",
            app.stderr_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(app.metrics().await.value("dead_letters_expired_total", &[]) >= 1.0);
    post_dead_letter(&app, &second, &failed).await.assert_accepted();
    assert_eq!(dead_letter_count(&app).await, 1);
    // A young one stays.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(dead_letter_count(&app).await, 1, "a young dead letter is kept");

    // A replayed dead letter no longer counts against the quota...
    let replayed = format!("UPDATE {table} SET replayed_at = last_received_at");
    assert_eq!(app.db.execute(&replayed, &[]).await, 1);
    let third = Event::new("test.flaky").with_data(json!({"pad": "z".repeat(6000)}));
    post_dead_letter(&app, &third, &failed).await.assert_accepted();
    assert_eq!(dead_letter_count(&app).await, 2);
    // ...and expires like the others.
    assert_eq!(app.db.execute(&age, &[]).await, 2);
    let started = std::time::Instant::now();
    while dead_letter_count(&app).await > 0 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the expired dead letters (one replayed) were not swept\n{}",
            app.stderr_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An event with 300 extensions (each a header in binary mode) is taken on
/// both paths: hyper's default of 100 header lines answered 431 and a
/// dead letter refused so is lost (found by a fresh attacker).
async fn events_with_many_extensions_are_taken(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count");
    let mut headers = event.binary_headers();
    headers.extend((0..300).map(|n| (format!("ce-ext{n}"), format!("v{n}"))));
    app.post(&headers, event.data_bytes()).await.assert_processed();
    let failed = app.send_binary(&Event::new("test.permanent")).await;
    headers.extend(knative_extensions(&failed, "http://x/"));
    app.post_to("/dead-letter", &headers, event.data_bytes())
        .await
        .assert_accepted();
    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["stored_as"], "event");
    assert_eq!(items[0]["extensions"]["ext299"], "v299");

    // Header lines past what `POST /` takes (256 KiB) but within what the
    // dead-letter path takes: stored, and replayed in structured mode, in
    // which `POST /` takes it (binary, it would be 431).
    let wide = Event::new("test.count");
    let mut headers = wide.binary_headers();
    headers.extend((0..34).map(|n| (format!("ce-wide{n}"), "w".repeat(8000))));
    app.post(&headers, wide.data_bytes()).await.assert_error(431, "headers-too-large");
    headers.extend(knative_extensions(&failed, "http://x/"));
    app.post_to("/dead-letter", &headers, wide.data_bytes()).await.assert_accepted();
    let items = list_json(app.env(), &[]).await;
    let item = items.iter().find(|item| item["id"] == json!(wide.id)).expect("listed");
    assert_eq!(item["stored_as"], "event");
    let to = format!("{}/", app.address);
    let stdout = stdout_of(&app.env().dlq(&["replay", &id_of(item).to_string(), "--to", &to]).await, "dlq replay");
    assert!(stdout.contains("replayed to"), "{stdout}");
    assert_eq!(app.effects(&wide).await, 1);
}

/// The problem a raw dead letter is stored with may quote the request: a
/// structured member name holding U+0000, repeated. PostgreSQL's `text`
/// cannot hold U+0000: the insert failed and the sink answered 500 on every
/// delivery, until the dispatcher gave up and the dead letter was lost
/// (found by a fresh attacker). It is stored, the quote escaped.
async fn a_problem_quoting_the_request_is_stored(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut headers = vec![("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    headers.extend(exactly_e2e::event::knative_extensions(400, b"", &format!("{}/", app.address)));
    let body = br#"{"specversion":"1.0","id":"dl-nul","source":"urn:att","type":"t","x\u0000":1,"x\u0000":2}"#;
    app.post_to("/dead-letter", &headers, body.to_vec()).await.assert_status(202);
    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["stored_as"], "raw");
    let problem = items[0]["problem"].as_str().expect("a problem");
    assert!(problem.contains("more than once") && problem.contains("\\u{0}"), "{problem}");
    assert_eq!(items[0]["data"].as_str().map(str::as_bytes), Some(&body[..]), "the body as received");
}

/// An event received structured that binary mode cannot carry goes back
/// structured: one whose datacontenttype names an event format (replayed
/// binary, its data was taken for the event: another event, of the
/// sender's choosing, committed), one whose text data is present but
/// empty (replayed binary: no data, 422 key-reused). Found by a fresh
/// attacker. And the event path refuses the ambiguous binary request.
async fn events_binary_mode_cannot_carry_replay_as_received(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let to = format!("{}/", app.address);
    let structured = |event: &Event, members: &str| {
        format!(
            r#"{{"specversion":"1.0","id":"{}","source":"{}","type":"{}"{members}}}"#,
            event.id, event.source, event.type_
        )
        .into_bytes()
    };
    let mut headers = vec![("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    headers.extend(exactly_e2e::event::knative_extensions(500, b"", &to));

    let outer = Event::new("test.count");
    let victim = Event::new("test.count");
    let inner = format!(
        r#","datacontenttype":"application/cloudevents+json","data":{{"specversion":"1.0","id":"{}","source":"{}","type":"test.count"}}"#,
        victim.id, victim.source
    );
    let empty = Event::new("test.attributes");
    for (event, members) in [(&outer, inner.as_str()), (&empty, r#","datacontenttype":"text/plain","data":"""#)] {
        app.post_to("/dead-letter", &headers, structured(event, members)).await.assert_status(202);
    }
    // The empty one was processed once already: its replay must replay.
    let answer = app.post(&headers[..1], structured(&empty, r#","datacontenttype":"text/plain","data":"""#)).await;
    answer.assert_processed();
    assert_eq!(app.processed_result(&empty).await, Some(json!({"time": null, "dataschema": null, "data": ""})));

    let items = list_json(app.env(), &[]).await;
    assert_eq!(items.len(), 2, "{items:?}");
    for item in &items {
        assert_eq!(item["stored_as"], "event", "{item}");
        let id = id_of(item).to_string();
        let stdout = stdout_of(&app.env().dlq(&["replay", &id, "--to", &to]).await, "exactly dlq replay");
        assert!(stdout.contains("replayed to"), "{stdout}");
    }
    assert_eq!(app.effects(&outer).await, 1, "the dead letter's own event ran");
    assert_eq!(app.effects(&victim).await, 0, "its data was not taken for an event");
    assert_eq!(app.effects(&empty).await, 1, "the empty-data event replayed, not reprocessed");

    // The same shape in binary mode on the event path is ambiguous: 400.
    let mut binary = victim.binary_headers();
    binary.retain(|(name, _)| name != "content-type");
    binary.push(("content-type".to_owned(), "application/cloudevents+json".to_owned()));
    let answer = app.post(&binary, structured(&outer, "")).await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("ambiguous"), "{answer}");
    assert_eq!(app.effects(&victim).await, 0);

    // A structured dead letter with Knative's report as headers: the
    // headers win over a report inside the body (found by fresh attackers:
    // the headers were dropped); one given twice keeps it as received.
    let reported = Event::new("test.count");
    let stale = r#","knativeerrorcode":"503","knativeerrordest":"http://old/""#;
    let mut with_report = headers[..1].to_vec();
    with_report.extend(exactly_e2e::event::knative_extensions(422, b"{}", "http://new/"));
    app.post_to("/dead-letter", &with_report, structured(&reported, stale)).await.assert_status(202);
    let twice = Event::new("test.count");
    let mut doubled = with_report.clone();
    doubled.push(("ce-knativeerrorcode".to_owned(), "500".to_owned()));
    app.post_to("/dead-letter", &doubled, structured(&twice, "")).await.assert_status(202);
    let items = list_json(app.env(), &[]).await;
    let find = |event: &Event| items.iter().find(|item| item["id"] == json!(event.id)).cloned().expect("listed");
    let (reported, twice) = (find(&reported), find(&twice));
    assert_eq!((&reported["error_code"], &reported["error_dest"]), (&json!("422"), &json!("http://new/")), "{reported}");
    assert_eq!(reported["stored_as"], "event");
    assert_eq!(twice["stored_as"], "raw", "{twice}");
    assert!(twice["problem"].as_str().unwrap_or_default().contains("more than once"), "{twice}");

    // Dead-lettered, it is kept raw and listed as the event a receiver
    // reads (the body's), with the headers' other event named; its replay
    // as received is refused by exactly's event path in the same words.
    let mut dead_letter = binary.clone();
    dead_letter.extend(exactly_e2e::event::knative_extensions(400, b"", &to));
    app.post_to("/dead-letter", &dead_letter, structured(&outer, "")).await.assert_status(202);
    let items = list_json(app.env(), &[]).await;
    let raw = items.iter().find(|item| item["stored_as"] == "raw" && item["id"] == json!(outer.id)).expect("kept raw");
    assert_eq!((&raw["id"], &raw["type"]), (&json!(outer.id), &json!("test.count")), "{raw}");
    let problem = raw["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("ambiguous") && problem.contains(&format!("header ce-id: \"{}\"", victim.id)), "{problem}");
    let output = app.env().dlq(&["replay", &id_of(raw).to_string(), "--to", &to]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("NOT replayed"));
    assert_eq!((app.effects(&outer).await, app.effects(&victim).await), (1, 0));
}

/// `dlq` commands never create a SQLite file (`serve` and `migrate` do): a
/// mistyped path is an error that names it, not a new, empty database
/// whose `list` prints nothing.
#[tokio::test]
async fn dlq_commands_refuse_a_missing_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mistyped.db");
    let url = format!("sqlite://{}", path.display());
    let output = tokio::process::Command::new(exactly_e2e::app::exactly_binary())
        .args(["dlq", "list", "--database-url", &url])
        .env_remove("DATABASE_URL")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not exist") && stderr.contains("mistyped.db"), "{stderr}");
    assert!(!path.exists(), "no file was created");
}
