//! Media types are compared as media types, not as text: the type and
//! subtype case-insensitively, whitespace and quoting ignored, and
//! parameters that mean nothing for the type (`charset` of JSON) left out.
//! Senders differ in the text they write for one media type (the
//! JavaScript SDK sends `application/json; charset=utf-8`, the Go SDK
//! `application/json`), and a redelivery may pass through either; it is
//! still the same event. A media type that does differ, or other data, is
//! still another payload.

use exactly_e2e::{Answer, Backend, Event, TestApp, both_backends, json};
use serde_json::Value;

both_backends!(
    the_same_media_type_written_otherwise_is_the_same_payload,
    a_dead_letter_written_otherwise_is_stored_once,
    a_record_stored_by_an_older_version_still_replays,
    json_media_types_are_json_data_in_structured_mode,
    json_numbers_are_compared_digit_for_digit,
    an_absent_media_type_is_application_json,
    json_data_nested_past_the_limit_is_refused_in_both_modes,
    structured_events_reach_the_handler_as_written,
    structured_null_data_is_a_payload_of_its_own,
);

/// `headers` with the one named `name` replaced (or added).
fn with_header(
    mut headers: Vec<(String, String)>,
    name: &str,
    value: &str,
) -> Vec<(String, String)> {
    headers.retain(|(n, _)| n != name);
    headers.push((name.to_owned(), value.to_owned()));
    headers
}

async fn post_with_content_type(app: &TestApp, event: &Event, content_type: &str, body: &[u8]) -> Answer {
    let headers = with_header(event.binary_headers(), "content-type", content_type);
    app.post(&headers, body.to_vec()).await
}

async fn the_same_media_type_written_otherwise_is_the_same_payload(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    // JSON has no charset parameter (RFC 8259): with or without one, in
    // any case, quoted or not, it is application/json.
    let event = Event::new("test.echo").with_data(json!({"n": 1}));
    app.send_binary(&event).await.assert_processed();
    for content_type in [
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/JSON",
        "application/json ; charset=\"utf-8\"",
    ] {
        let answer = post_with_content_type(&app, &event, content_type, &event.data_bytes()).await;
        assert!(answer.is_replay(), "{content_type:?} is application/json:\n{answer}");
        answer.assert_replayed();
    }
    // Another media type, or a parameter that means something, is another
    // payload under the same (source, id).
    for content_type in ["text/plain", "application/xml", "application/json; profile=\"urn:other\""] {
        let answer = post_with_content_type(&app, &event, content_type, &event.data_bytes()).await;
        answer.assert_error(422, "key-reused");
    }
    app.post(&event.binary_headers(), br#"{"n": 2}"#.to_vec())
        .await
        .assert_error(422, "key-reused");
    assert_eq!(app.effects(&event).await, 1);
    assert_eq!(app.processed_result(&event).await, Some(json!({"n": 1})));

    // A text type's charset means something; its value is
    // case-insensitive, and its data is text, compared byte for byte even
    // when it happens to parse as JSON.
    let text = Event::new("test.count");
    let body = br#"{"a":1}"#;
    post_with_content_type(&app, &text, "text/plain; charset=utf-8", body)
        .await
        .assert_processed();
    post_with_content_type(&app, &text, "TEXT/Plain;charset=\"UTF-8\"", body)
        .await
        .assert_replayed();
    post_with_content_type(&app, &text, "text/plain; charset=iso-8859-1", body)
        .await
        .assert_error(422, "key-reused");
    post_with_content_type(&app, &text, "text/plain; charset=utf-8", br#"{"a": 1}"#)
        .await
        .assert_error(422, "key-reused");
    assert_eq!(app.effects(&text).await, 1);
    assert_eq!(app.processed_count().await, 2);
}

/// A dedup record written before media types were compared as media
/// types holds the payload hash of that time (the Content-Type as sent,
/// any JSON data canonical): a redelivery across the upgrade is still a
/// replay, and another payload still 422.
async fn a_record_stored_by_an_older_version_still_replays(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.echo").with_data(json!({"n": 1}));
    let content_type = "application/json; charset=UTF-8";
    post_with_content_type(&app, &event, content_type, &event.data_bytes())
        .await
        .assert_processed();

    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in with_header(event.binary_headers(), "content-type", content_type) {
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let decoded = exactly::decode::decode(&headers, event.data_bytes()).unwrap();
    let legacy: String = decoded.legacy_payload_sha256().iter().map(|b| format!("{b:02x}")).collect();
    let unhex = match backend {
        Backend::Postgres => "decode($1, 'hex')",
        Backend::Sqlite => "unhex($1)",
    };
    let sql = format!(
        "UPDATE {} SET payload_sha256 = {unhex} WHERE source = $2 AND id = $3",
        backend.processed_events_table()
    );
    assert_eq!(app.db.execute(&sql, &[&legacy, &event.source, &event.id]).await, 1);

    post_with_content_type(&app, &event, content_type, &event.data_bytes())
        .await
        .assert_replayed();
    post_with_content_type(&app, &event, content_type, br#"{"n": 2}"#)
        .await
        .assert_error(422, "key-reused");
    assert_eq!(app.effects(&event).await, 1);
}

/// The dead-letter sink identifies a dead letter by its payload as the
/// event path does: the same dead letter, its media type written
/// otherwise, is a redelivery (one row, two deliveries).
async fn a_dead_letter_written_otherwise_is_stored_once(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count").with_data(json!({"n": 1}));
    let mut headers = event.binary_headers();
    headers.extend(exactly_e2e::event::knative_extensions(422, b"", &format!("{}/", app.address)));
    for content_type in ["application/json", "application/json; charset=utf-8"] {
        let headers = with_header(headers.clone(), "content-type", content_type);
        app.post_to("/dead-letter", &headers, event.data_bytes())
            .await
            .assert_status(202);
    }
    let sql = format!(
        "SELECT CAST(deliveries AS TEXT) FROM {} WHERE source = $1 AND id = $2",
        app.backend().dead_letters_table()
    );
    let deliveries = app.db.texts(&sql, &[&event.source, &event.id]).await;
    assert_eq!(deliveries, ["2"], "one dead letter, delivered twice");
}

/// A structured event whose `datacontenttype` is application/json, or a
/// JSON media type of its own in any spelling.
fn structured(event: &Event, datacontenttype: &str, data: Value) -> Vec<u8> {
    let document = json!({
        "specversion": "1.0",
        "id": event.id,
        "source": event.source,
        "type": event.type_,
        "datacontenttype": datacontenttype,
        "data": data,
    });
    serde_json::to_vec(&document).unwrap()
}

/// Every JSON media type (`*/json`, `*/*+json`, any case, any parameters)
/// carries its data as a JSON value in structured mode, and that is the
/// same payload as the JSON body of a binary delivery. A structured event
/// of another media type carries its data as a string.
async fn json_media_types_are_json_data_in_structured_mode(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let order = json!({"order_id": "1001", "lines": [{"sku": "a", "n": 2}]});
    let content_types = [
        ("application/cloudevents+json; charset=utf-8", "application/vnd.shop.order+json; charset=utf-8"),
        ("application/cloudevents+json", "APPLICATION/JSON"),
        ("Application/CloudEvents+JSON", "text/json"),
        ("application/cloudevents+json;charset=UTF-8", "application/ld+json; profile=\"urn:shop\""),
        ("application/cloudevents+json", "application/json; charset=utf-8"),
    ];
    for (structured_type, datacontenttype) in content_types {
        let event = Event::new("test.echo").with_data(order.clone());
        let headers = [("content-type".to_owned(), structured_type.to_owned())];
        let answer = app.post(&headers, structured(&event, datacontenttype, order.clone())).await;
        assert_eq!(answer.status, 202, "{datacontenttype:?} is JSON:\n{answer}");
        answer.assert_processed();
        assert_eq!(app.processed_result(&event).await, Some(order.clone()), "{datacontenttype:?}");
        // The same event in binary mode is a replay.
        post_with_content_type(&app, &event, datacontenttype, &event.data_bytes())
            .await
            .assert_replayed();
    }

    // Not JSON: the data is a string, sent as it is.
    let text = Event::new("test.count");
    let headers = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    app.post(&headers, structured(&text, "text/plain; charset=utf-8", json!("{\"a\":1}")))
        .await
        .assert_processed();
    post_with_content_type(&app, &text, "text/plain; charset=utf-8", br#"{"a":1}"#)
        .await
        .assert_replayed();
    let other = Event::new("test.count");
    let answer = app.post(&headers, structured(&other, "text/plain", json!({"a": 1}))).await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("`data`") && error.message.contains("text/plain"), "{answer}");
    assert_eq!(app.processed_event(&other).await, None);
    assert_eq!(app.processed_count().await, content_types.len() as i64 + 1);
}

/// JSON data is compared as JSON (whitespace and member order do not
/// count), but its numbers digit for digit: two payloads that differ only
/// past a double's precision were taken for one event (202 replay, the
/// second never processed). Found by a fresh attacker.
async fn json_numbers_are_compared_digit_for_digit(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count");
    let first = br#"{"n": 18446744073709551616, "total": 99.95}"#;
    post_with_content_type(&app, &event, "application/json", first).await.assert_processed();
    // The same JSON written otherwise is the same payload.
    let reordered = br#"{"total":99.95,"n":18446744073709551616}"#;
    let again = post_with_content_type(&app, &event, "application/json", reordered).await;
    assert!(again.is_replay(), "{again}");
    for other in [
        &br#"{"n": 18446744073709551617, "total": 99.95}"#[..],
        &br#"{"n": 18446744073709551616, "total": 99.950000000000000001}"#[..],
    ] {
        post_with_content_type(&app, &event, "application/json", other)
            .await
            .assert_error(422, "key-reused");
    }
    assert_eq!(app.effects(&event).await, 1);
}

/// In structured mode an absent `datacontenttype` means `application/json`
/// (CloudEvents JSON format): the same event delivered binary with
/// `Content-Type: application/json` is a redelivery, not a reused key, in
/// either order (found by a fresh attacker).
async fn an_absent_media_type_is_application_json(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for structured_first in [true, false] {
        let event = Event::new("test.count");
        let document = json!({
            "specversion": "1.0",
            "id": event.id,
            "source": event.source,
            "type": event.type_,
            "data": {"a": 1},
        });
        let structured_headers = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
        let structured = || app.post(&structured_headers, serde_json::to_vec(&document).unwrap());
        let binary = || post_with_content_type(&app, &event, "application/json", br#"{"a": 1}"#);
        let (first, second) = if structured_first {
            (structured().await, binary().await)
        } else {
            let first = binary().await;
            (first, structured().await)
        };
        first.assert_processed();
        assert!(second.is_replay(), "structured first: {structured_first}: {second}");
        assert_eq!(app.effects(&event).await, 1);
    }
}

fn nested(depth: usize, space: &str) -> Vec<u8> {
    format!("{}1{}", format!("[{space}").repeat(depth), format!("{space}]").repeat(depth)).into_bytes()
}

/// JSON data nests at most 127 levels (serde_json's limit, the one a
/// handler's `serde_json` applies too). Deeper data could not be compared
/// as JSON, so a redelivery written with other whitespace would look like
/// another payload: it is refused in both modes, up front (400), and the
/// dead-letter sink keeps it as received. At the limit, it is JSON like any
/// other (found by a fresh attacker: structured 400, binary compared byte
/// for byte).
async fn json_data_nested_past_the_limit_is_refused_in_both_modes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let structured_headers = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    let structured_body = |event: &Event, data: &[u8]| {
        format!(
            r#"{{"specversion":"1.0","id":"{}","source":"{}","type":"{}","datacontenttype":"application/json","data":{}}}"#,
            event.id,
            event.source,
            event.type_,
            std::str::from_utf8(data).unwrap()
        )
        .into_bytes()
    };

    let deep = Event::new("test.count");
    let answer = post_with_content_type(&app, &deep, "application/json", &nested(128, "")).await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("nested deeper than 127"), "{answer}");
    let answer = app.post(&structured_headers, structured_body(&deep, &nested(128, ""))).await;
    answer.assert_error(400, "invalid-event");
    // Also as data_base64 under a JSON media type (found by a fresh
    // attacker: 202, and its binary redelivery 400).
    use base64::Engine;
    let base64 = base64::engine::general_purpose::STANDARD.encode(nested(128, ""));
    let document = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"{}","type":"test.count","datacontenttype":"application/json","data_base64":"{base64}"}}"#,
        deep.id, deep.source
    );
    app.post(&structured_headers, document.into_bytes()).await.assert_error(400, "invalid-event");
    assert_eq!(app.effects(&deep).await, 0);
    let mut headers = with_header(deep.binary_headers(), "content-type", "application/json");
    headers.extend(exactly_e2e::event::knative_extensions(400, b"", &format!("{}/", app.address)));
    app.post_to("/dead-letter", &headers, nested(128, "")).await.assert_status(202);
    let items = app.env().dlq_list_json(&[]).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["stored_as"], "raw", "{items:?}");
    assert_eq!(items[0]["data"].as_str().map(str::as_bytes), Some(&nested(128, "")[..]), "kept as received");

    // At the limit: processed once, and the same data written otherwise,
    // in either mode, is a replay.
    let event = Event::new("test.count");
    post_with_content_type(&app, &event, "application/json", &nested(127, "")).await.assert_processed();
    post_with_content_type(&app, &event, "application/json", &nested(127, " ")).await.assert_replayed();
    app.post(&structured_headers, structured_body(&event, &nested(127, "\n")))
        .await
        .assert_replayed();
    assert_eq!(app.effects(&event).await, 1);
}

/// A structured event reaches the handler, and the dead-letter sink, as the
/// sender wrote it: `time` and `dataschema` in the sender's spelling
/// (cloudevents-sdk turned `Z` into `+00:00` and normalised URLs), JSON
/// `data` byte for byte (it was re-serialised). The payload is still
/// compared as JSON.
async fn structured_events_reach_the_handler_as_written(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.attributes");
    let data = "{ \"order_id\": \"1001\",\n  \"lines\": [ 1, 2 ] }";
    let document = format!(
        r#"{{"specversion":"1.0","id":"{}","source":"{}","type":"test.attributes",
            "time":"2026-12-01T07:00:00Z","dataschema":"HTTPS://Example.com/a/../order.json",
            "datacontenttype":"application/json","data":{data}}}"#,
        event.id, event.source
    );
    let headers = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    app.post(&headers, document.clone().into_bytes()).await.assert_processed();
    assert_eq!(
        app.processed_result(&event).await,
        Some(json!({"time": "2026-12-01T07:00:00Z", "dataschema": "HTTPS://Example.com/a/../order.json", "data": data}))
    );
    // The same event, binary, compact, with the URL normalised: a replay.
    let mut binary = with_header(event.binary_headers(), "content-type", "application/json");
    binary.push(("ce-dataschema".to_owned(), "https://example.com/order.json".to_owned()));
    app.post(&binary, br#"{"lines":[1,2],"order_id":"1001"}"#.to_vec()).await.assert_replayed();
    assert_eq!(app.effects(&event).await, 1);

    // The dead-letter sink keeps the same.
    let mut headers = headers.to_vec();
    headers.extend(exactly_e2e::event::knative_extensions(500, b"", &format!("{}/", app.address)));
    app.post_to("/dead-letter", &headers, document.into_bytes()).await.assert_status(202);
    let items = app.env().dlq_list_json(&[]).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["stored_as"], "event", "{items:?}");
    assert_eq!(items[0]["time"], "2026-12-01T07:00:00Z", "{items:?}");
    assert_eq!(items[0]["dataschema"], "HTTPS://Example.com/a/../order.json", "{items:?}");
    assert_eq!(items[0]["data"], data, "{items:?}");
}

/// `"data": null` is an explicit null payload, distinct from no `data`
/// (CloudEvents JSON format §3.1.1): the handler gets the JSON text `null`,
/// a binary delivery with the body `null` is the same event, and one with
/// no body is another payload. A `null` attribute is an absent one (§2.2).
async fn structured_null_data_is_a_payload_of_its_own(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.attributes");
    let document = json!({
        "specversion": "1.0", "id": event.id, "source": event.source, "type": event.type_,
        "time": null, "subject": null, "data": null,
    });
    let headers = [("content-type".to_owned(), "application/cloudevents+json".to_owned())];
    app.post(&headers, serde_json::to_vec(&document).unwrap()).await.assert_processed();
    assert_eq!(app.processed_result(&event).await, Some(json!({"time": null, "dataschema": null, "data": "null"})));
    post_with_content_type(&app, &event, "application/json", b"null").await.assert_replayed();
    post_with_content_type(&app, &event, "application/json", b"").await.assert_error(422, "key-reused");
    assert_eq!(app.effects(&event).await, 1);

    // Empty data is no data: binary mode cannot tell them apart, so a
    // structured `"data": ""` redelivered binary (an empty body) replays
    // (it was 422 key-reused; found by a fresh attacker).
    let empty = Event::new("test.attributes");
    let document = json!({
        "specversion": "1.0", "id": empty.id, "source": empty.source, "type": empty.type_,
        "datacontenttype": "text/plain", "data": "",
    });
    app.post(&headers, serde_json::to_vec(&document).unwrap()).await.assert_processed();
    post_with_content_type(&app, &empty, "text/plain", b"").await.assert_replayed();
    assert_eq!(app.effects(&empty).await, 1);
}
