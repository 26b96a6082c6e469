//! `Content-Encoding`: a compressed body is decoded before anything else
//! reads it, so the handler (and the dead-letter store) gets the event's
//! data, not its compressed bytes. gzip (also spelled `x-gzip`) and
//! deflate, in any case, listed in the order they were applied, and
//! `identity`; another coding is 415. The decoded body is bounded by the
//! same limit as the body: a small body that inflates past it is 413.

use std::io::Write;

use exactly_e2e::{Backend, Event, TestApp, both_backends, json};
use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};

both_backends!(
    compressed_bodies_are_decoded,
    unsupported_and_broken_encodings_are_refused,
    a_body_that_inflates_past_the_limit_gets_413,
    compressed_dead_letters_are_stored_decoded,
);

/// How a test body is encoded for a Content-Encoding.
type Encode = fn(&[u8]) -> Vec<u8>;

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// `deflate` in HTTP is the zlib format (RFC 9110 §8.4.1.2).
fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// Raw deflate without the zlib wrapper: what some senders send as
/// `deflate` all the same.
fn raw_deflate(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn encoded(headers: Vec<(String, String)>, coding: &str) -> Vec<(String, String)> {
    let mut headers = headers;
    headers.push(("content-encoding".to_owned(), coding.to_owned()));
    headers
}

async fn compressed_bodies_are_decoded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let data = json!({"order_id": "1001", "note": "x".repeat(2000)});

    let cases: Vec<(&str, Encode)> = vec![
        ("gzip", gzip),
        ("x-gzip", gzip),
        ("GZIP", gzip),
        ("identity, gzip", gzip),
        ("gzip, identity", gzip),
        ("deflate", zlib),
        ("Deflate", raw_deflate),
        ("deflate, gzip", |bytes| gzip(&zlib(bytes))),
        ("gzip,gzip", |bytes| gzip(&gzip(bytes))),
        ("identity", |bytes| bytes.to_vec()),
    ];
    for (coding, encode) in cases {
        let event = Event::new("test.echo").with_data(data.clone());
        let body = encode(&event.data_bytes());
        let answer = app.post(&encoded(event.binary_headers(), coding), body.clone()).await;
        assert_eq!(answer.status, 202, "Content-Encoding: {coding}:\n{answer}");
        answer.assert_processed();
        assert_eq!(app.processed_result(&event).await, Some(data.clone()), "{coding}");
        // The same event uncompressed, or compressed again, is a replay.
        app.send_binary(&event).await.assert_replayed();
        app.post(&encoded(event.binary_headers(), coding), body)
            .await
            .assert_replayed();
    }

    // Structured mode: the whole document is compressed.
    let event = Event::new("test.echo").with_data(data.clone());
    let headers = vec![(
        "content-type".to_owned(),
        "application/cloudevents+json".to_owned(),
    )];
    app.post(&encoded(headers, "gzip"), gzip(&event.structured_body()))
        .await
        .assert_processed();
    assert_eq!(app.processed_result(&event).await, Some(data.clone()));
    app.send_binary(&event).await.assert_replayed();
}

async fn unsupported_and_broken_encodings_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.echo").with_data(json!({"n": 1}));

    for coding in ["br", "compress", "zstd", "gzip, br", "gzip;q=1"] {
        let answer = app
            .post(&encoded(event.binary_headers(), coding), gzip(&event.data_bytes()))
            .await;
        let error = answer.assert_error(415, "unsupported-encoding");
        let named = coding.split(", ").last().unwrap();
        assert!(error.message.contains(named), "the message names {named:?}:\n{answer}");
        assert_eq!(answer.header("accept-encoding"), Some("gzip, deflate"), "{answer}");
    }

    // Not gzip at all, or cut short.
    let answer = app
        .post(&encoded(event.binary_headers(), "gzip"), event.data_bytes())
        .await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("gzip"), "{answer}");
    let mut cut = gzip(&event.data_bytes());
    cut.truncate(cut.len() - 6);
    let answer = app.post(&encoded(event.binary_headers(), "gzip"), cut).await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("gzip"), "{answer}");
    let answer = app
        .post(&encoded(event.binary_headers(), "deflate"), b"not deflate".to_vec())
        .await;
    let error = answer.assert_error(400, "invalid-event");
    assert!(error.message.contains("deflate"), "{answer}");
    // A deflate body is one stream: a second one, or anything after the
    // first, is refused (the rest was dropped silently: the handler saw
    // `{"n": 1}` of `{"n": 1}` + more; found by a fresh attacker).
    for trailing in [zlib(b" and more"), b"TRAILING".to_vec()] {
        let mut two = zlib(&event.data_bytes());
        two.extend(trailing);
        let answer = app.post(&encoded(event.binary_headers(), "deflate"), two).await;
        let error = answer.assert_error(400, "invalid-event");
        assert!(error.message.contains("after the end of the deflate stream"), "{answer}");
    }

    assert_eq!(app.processed_count().await, 0);
    app.send_binary(&event).await.assert_processed();
}

/// 64 MiB of zeros gzip to about 64 KiB, well under the 1 MiB body limit;
/// decoded, they are far over it. The host stops inflating at the limit.
async fn a_body_that_inflates_past_the_limit_gets_413(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.echo");
    let bomb = {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..64 {
            encoder.write_all(&zeros).unwrap();
        }
        encoder.finish().unwrap()
    };
    assert!(bomb.len() < 1024 * 1024);
    for coding in ["gzip", "gzip, gzip"] {
        let body = if coding == "gzip" { bomb.clone() } else { gzip(&bomb) };
        let answer = app.post(&encoded(event.binary_headers(), coding), body).await;
        let error = answer.assert_error(413, "payload-too-large");
        assert!(error.message.contains("decoded"), "{answer}");
    }

    // Just within the limit, decoded: taken.
    let fits = Event::new("test.count").with_data(json!("y".repeat(1024 * 1024 - 2)));
    assert_eq!(fits.data_bytes().len(), 1024 * 1024);
    app.post(&encoded(fits.binary_headers(), "gzip"), gzip(&fits.data_bytes()))
        .await
        .assert_processed();
    assert_eq!(app.processed_count().await, 1);
}

/// The dead-letter path shares the decoding: what it stores (and what
/// `dlq replay` sends, without an encoding) is the event's data.
async fn compressed_dead_letters_are_stored_decoded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let event = Event::new("test.count").with_data(json!({"n": 1}));
    let mut headers = event.binary_headers();
    headers.extend(exactly_e2e::event::knative_extensions(422, b"", &format!("{}/", app.address)));
    app.post_to("/dead-letter", &encoded(headers, "gzip"), gzip(&event.data_bytes()))
        .await
        .assert_status(202);
    let listed = app.env().dlq_list_json(&[]).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["data"], json!("{\"n\":1}"), "{listed:?}");
    assert_eq!(listed[0]["stored_as"], "event");

    // An encoding the sink does not decode, or a body that is not valid
    // data of its encoding: never refused (the dispatcher would drop the
    // dead letter), kept as received, encoding and all.
    let other = Event::new("test.count").with_data(json!({"n": 2}));
    app.post_to("/dead-letter", &encoded(other.binary_headers(), "br"), b"\x0b\x02\x80".to_vec())
        .await
        .assert_status(202);
    let corrupt = Event::new("test.count").with_data(json!({"n": 3}));
    app.post_to("/dead-letter", &encoded(corrupt.binary_headers(), "gzip"), b"not gzip".to_vec())
        .await
        .assert_status(202);
    let listed = app.env().dlq_list_json(&[]).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (item, coding) in listed[..2].iter().zip(["gzip", "br"]) {
        assert_eq!(item["stored_as"], "raw", "{item:?}");
        let headers = item["raw_headers"].as_str().unwrap_or_default();
        assert!(headers.contains(&format!("content-encoding: {coding}\r\n")), "{headers}");
    }
}
