//! Property tests ("fuzzing") of CloudEvent decoding, the first code that
//! sees what a client sends.
//!
//! Arbitrary `ce-*` headers (names, raw byte values, percent sequences
//! valid and broken, duplicates), content types and bodies (arbitrary bytes,
//! and JSON objects close to a structured CloudEvent) go through
//! `exactly::decode::decode`. It must never panic; a refusal is always 400
//! `invalid-event` with a message; an accepted event has a non-empty id,
//! source and type without control characters, valid extension names, and
//! a payload hash. Valid events with arbitrary attribute text round-trip
//! through binary mode's percent-encoding.
//!
//! `cargo test` runs 256 cases per property (a few seconds). A long run:
//!
//! ```sh
//! PROPTEST_CASES=1000000 cargo test -p exactly --test fuzz_decode -- --nocapture
//! ```

use exactly::rejection::Rejection;
use exactly::decode::{CloudEvent, decode};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value};

const STRUCTURED: &str = "application/cloudevents+json";

const MINIMAL: [(&str, &str); 4] = [
    ("ce-specversion", "1.0"),
    ("ce-id", "1"),
    ("ce-source", "urn:x"),
    ("ce-type", "t"),
];

const HEADER_NAMES: &[&str] = &[
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-subject",
    "ce-time",
    "ce-dataschema",
    "ce-datacontenttype",
    "ce-data",
    "ce-data_base64",
    "content-type",
    "Content-Type",
    "CE-ID",
    "Ce-Source",
    "ce-myext",
    "ce-MyExt",
    "ce-my_ext",
    "ce-my-ext",
    "ce-",
    "ce-traceparent",
    "ce-ext1",
    "ce-0",
    "x-other",
];

/// Pieces of header values: what producers send, and what they should not.
const VALUE_PIECES: &[&str] = &[
    "1.0",
    "0.3",
    "1",
    "urn:x",
    "urn%3Ax",
    "caf%C3%A9%20au%20lait",
    "%20",
    "%25",
    "%C3%A9",
    "%FF",
    "%",
    "%G0",
    "%4",
    "%e2%80%8b",
    "%00",
    "%0A",
    "%0d",
    "%7F",
    "%C2%85",
    "%E2%80%A8",
    "%C3",
    "%ED%A0%80",
    "%F4%90%80%80",
    "%C0%80",
    "2024-01-01T00:00:00Z",
    "2024-13-45T99:99:99Z",
    "https://example.com/schema",
    "not a uri",
    "application/json",
    "text/plain; charset=utf-8",
    "application/cloudevents+json",
    "application/cloudevents-batch+json",
    "\t",
    " ",
    "\"",
];

const CONTENT_TYPES: &[&str] = &[
    "application/cloudevents+json",
    "application/cloudevents+json; charset=utf-8",
    "APPLICATION/CLOUDEVENTS+JSON",
    " application/cloudevents+json ;x=y",
    "application/cloudevents-batch+json",
    "application/json",
    "text/plain",
    "application/octet-stream",
    "",
    ";",
    "application/cloudevents+jsonx",
];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(HEADER_NAMES).prop_map(String::from),
        1 => "ce-[a-zA-Z0-9_.-]{0,10}",
        1 => "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}",
    ]
}

fn value_piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => select(VALUE_PIECES).prop_map(|piece| piece.as_bytes().to_vec()),
        2 => "[ -~]{0,8}".prop_map(String::into_bytes),
        1 => prop::collection::vec(0x80u8..=0xff, 1..4),
        1 => prop::collection::vec(any::<u8>(), 0..8),
        1 => "\\PC{0,4}".prop_map(String::into_bytes),
    ]
}

fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(value_piece(), 0..5).prop_map(|pieces| pieces.concat())
}

/// Headers as a client could send them (anything `http` can represent),
/// often on top of a valid minimal event so decoding goes deep.
fn headers() -> impl Strategy<Value = HeaderMap> {
    (
        any::<bool>(),
        prop::collection::vec((header_name(), header_value()), 0..8),
        prop::option::of(prop_oneof![
            select(CONTENT_TYPES).prop_map(String::from),
            "[ -~]{0,30}"
        ]),
    )
        .prop_map(|(minimal, extra, content_type)| {
            let mut headers = HeaderMap::new();
            if minimal {
                for (name, value) in MINIMAL {
                    headers.append(name, HeaderValue::from_static(value));
                }
            }
            if let Some(Ok(value)) = content_type.map(HeaderValue::try_from) {
                headers.append(http::header::CONTENT_TYPE, value);
            }
            for (name, value) in extra {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(&value),
                ) {
                    headers.append(name, value);
                }
            }
            headers
        })
}

fn json_text() -> impl Strategy<Value = String> {
    prop_oneof![
        select(VALUE_PIECES).prop_map(String::from),
        "\\PC{0,12}",
        "[\\x00-\\x1f]{1,3}",
        "[A-Za-z0-9+/=!-]{0,16}",
        Just(String::new()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        json_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z]{1,4}", inner), 0..4)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

const STRUCTURED_KEYS: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "myext",
    "my_ext",
    "MyExt",
    "",
    "ext1",
];

/// A JSON object close to a structured CloudEvent: a valid base (or not),
/// then keys overwritten with arbitrary values.
fn structured_object() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        prop::collection::vec(
            (
                prop_oneof![
                    select(STRUCTURED_KEYS).prop_map(String::from),
                    "[a-z_A-Z0-9]{0,6}"
                ],
                json_value(),
            ),
            0..6,
        ),
    )
        .prop_map(|(valid, entries)| {
            let mut map = Map::new();
            if valid {
                map.insert("specversion".into(), "1.0".into());
                map.insert("id".into(), "1".into());
                map.insert("source".into(), "urn:x".into());
                map.insert("type".into(), "t".into());
            }
            for (key, value) in entries {
                map.insert(key, value);
            }
            Value::Object(map)
        })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => structured_object().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => (structured_object(), any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..4)).prop_map(
            |(v, at, junk)| {
                // A structured document cut or corrupted somewhere.
                let mut bytes = serde_json::to_vec(&v).unwrap();
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, junk);
                bytes
            }
        ),
        2 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

/// What every decoded event and every refusal must satisfy.
fn check(result: Result<CloudEvent, Rejection>) -> Result<(), TestCaseError> {
    match result {
        Ok(event) => {
            for (name, value) in [
                ("id", event.id()),
                ("source", event.source()),
                ("type", event.ty()),
            ] {
                prop_assert!(
                    !value.is_empty(),
                    "accepted an empty `{}`: {:?}",
                    name,
                    event
                );
                prop_assert!(
                    !value.chars().any(char::is_control),
                    "accepted control characters in `{}`: {:?}",
                    name,
                    event
                );
            }
            for (name, _) in event.extensions() {
                prop_assert!(
                    !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                    "accepted the extension name {:?}: {:?}",
                    name,
                    event
                );
            }
            prop_assert!(
                event.extensions().windows(2).all(|w| w[0] <= w[1]),
                "extensions not sorted: {:?}",
                event
            );
            let _ = event.payload_sha256();
        }
        Err(rejection) => {
            prop_assert!(
                matches!(&rejection, Rejection::InvalidEvent(message) if !message.is_empty()),
                "a refusal must be invalid-event with a message: {:?}",
                rejection
            );
            prop_assert_eq!(rejection.status().as_u16(), 400);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// Binary mode, or whatever the content type makes of it.
    #[test]
    fn arbitrary_requests_are_decoded_or_refused_cleanly(headers in headers(), body in body()) {
        check(decode(&headers, body))?;
    }

    /// Structured mode with arbitrary headers alongside.
    #[test]
    fn arbitrary_structured_documents_are_decoded_or_refused_cleanly(
        content_type in select(&CONTENT_TYPES[..4]),
        mut headers in headers(),
        body in body(),
    ) {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        check(decode(&headers, body))?;
    }

    /// Any attribute text without control characters survives binary
    /// mode's percent-encoding (the encoder of the HTTP binding: space,
    /// `"`, `%` and everything outside printable ASCII), and the same event
    /// in structured mode has the same payload hash.
    #[test]
    fn percent_encoded_attributes_round_trip(
        id in "[^\\p{Cc}]{1,12}",
        source in "[^\\p{Cc}]{1,12}",
        ty in "[^\\p{Cc}]{1,12}",
        subject in prop::option::of("[^\\p{Cc}]{0,12}"),
        extension in prop::option::of(("[a-z0-9]{1,8}", "[^\\p{Cc}]{0,12}")),
        data in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        prop_assume!(!["specversion", "id", "source", "type", "subject", "time", "dataschema", "datacontenttype", "data"]
            .contains(&extension.as_ref().map_or("", |(name, _)| name.as_str())));
        let mut headers = HeaderMap::new();
        let mut put = |name: &str, value: &str| {
            headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(&encode(value)).unwrap());
        };
        put("ce-specversion", "1.0");
        put("ce-id", &id);
        put("ce-source", &source);
        put("ce-type", &ty);
        if let Some(subject) = &subject {
            put("ce-subject", subject);
        }
        if let Some((name, value)) = &extension {
            put(&format!("ce-{name}"), value);
        }
        headers.append(http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let event = decode(&headers, data.clone()).map_err(|e| TestCaseError::fail(format!("refused a valid event: {e}")))?;
        prop_assert_eq!(event.id(), id.as_str());
        prop_assert_eq!(event.source(), source.as_str());
        prop_assert_eq!(event.ty(), ty.as_str());
        prop_assert_eq!(event.subject(), subject.as_deref());
        prop_assert_eq!(event.extensions().to_vec(), extension.clone().into_iter().collect::<Vec<_>>());
        prop_assert_eq!(event.data().unwrap_or_default(), data.as_slice());

        let mut document = serde_json::json!({
            "specversion": "1.0", "id": id, "source": source, "type": ty,
            "datacontenttype": "application/octet-stream",
        });
        if !data.is_empty() {
            use base64::Engine;
            document["data_base64"] = base64::engine::general_purpose::STANDARD.encode(&data).into();
        }
        if let Some(subject) = &subject {
            document["subject"] = subject.clone().into();
        }
        let mut structured_headers = HeaderMap::new();
        structured_headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(STRUCTURED));
        let structured = decode(&structured_headers, serde_json::to_vec(&document).unwrap())
            .map_err(|e| TestCaseError::fail(format!("refused a valid structured event: {e}")))?;
        prop_assert_eq!(structured.payload_sha256(), event.payload_sha256());
    }
}

/// The CloudEvents HTTP binding's header-value encoding.
fn encode(value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        match byte {
            b' ' | b'"' | b'%' => encoded.push_str(&format!("%{byte:02X}")),
            0x21..=0x7e => encoded.push(byte as char),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

fn binary(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    headers
}

fn refusal(headers: &HeaderMap, body: &[u8]) -> String {
    match decode(headers, body.to_vec()) {
        Err(Rejection::InvalidEvent(message)) => message,
        other => panic!("expected invalid-event, got {other:?}"),
    }
}

/// The bad inputs of the README's "HTTP answers", one by one.
#[test]
fn named_bad_inputs_are_refused_with_a_message() {
    let with = |extra: (&str, &[u8])| {
        let mut pairs: Vec<(&str, &[u8])> =
            MINIMAL.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        pairs.retain(|(name, _)| *name != extra.0);
        pairs.push(extra);
        binary(&pairs)
    };
    assert!(refusal(&with(("ce-id", b"\xff")), b"").contains("ce-id"));
    assert!(refusal(&with(("ce-id", b"%FF")), b"").contains("UTF-8"));
    assert!(refusal(&with(("ce-specversion", b"0.3")), b"").contains("specversion"));
    assert!(refusal(&with(("ce-my_ext", b"x")), b"").contains("my_ext"));
    assert!(refusal(&with(("ce-id", b"%0A")), b"").contains("control"));
    let mut duplicate = with(("ce-id", b"1"));
    duplicate.append("ce-id", HeaderValue::from_static("2"));
    assert!(refusal(&duplicate, b"").contains("more than once"));

    let event = decode(&with(("ce-subject", b"caf%C3%A9%20au%20lait")), vec![]).unwrap();
    assert_eq!(event.subject(), Some("café au lait"));
    let event = decode(&with(("ce-MyExt", b"v")), vec![]).unwrap();
    assert_eq!(event.extensions(), [("myext".to_owned(), "v".to_owned())]);
    assert_eq!(event.datacontenttype(), None);

    let structured = |body: &[u8]| {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(STRUCTURED),
        );
        refusal(&headers, body)
    };
    let base = r#""specversion":"1.0","id":"1","source":"urn:x","type":"t""#;
    let message = structured(format!("{{{base},\"data_base64\":\"not base64!\"}}").as_bytes());
    assert!(message.contains("`data_base64`"), "{message}");
    assert!(structured(b"[1, 2]").contains("not a JSON object"));
    assert!(
        structured(format!("{{{base},\"specversion\":\"0.3\"}}").as_bytes())
            .contains("specversion")
    );
    let mut batched = HeaderMap::new();
    batched.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/cloudevents-batch+json"),
    );
    assert!(refusal(&batched, format!("[{{{base}}}]").as_bytes()).contains("batch"));
    // A structured document without its Content-Type is binary mode, and
    // binary mode needs the ce- headers.
    assert!(refusal(&HeaderMap::new(), format!("{{{base}}}").as_bytes()).contains("specversion"));
}
