//! A dead letter kept as received.
//!
//! The sink stores every dead letter the dispatcher sends, valid CloudEvent
//! or not: a 4xx makes the Knative dispatcher commit the offset, and the
//! event is gone. What cannot be validated (a relative `dataschema` the
//! Java SDK accepts, an attribute holding U+0000 after percent-decoding, a
//! body that is not the JSON its Content-Type says, an encoding the sink
//! does not decode) is kept whole: the headers that shape an event (`ce-*`,
//! Content-Type, Content-Encoding), byte for byte, and the body as it came.
//! `exactly dlq replay` sends exactly that back. Source, id and type are
//! read as far as they can be, for `dlq list` to show; the dedup key is
//! computed from the raw form, so a redelivery of the same request is one
//! row.

use crate::printable::printable;
use percent_encoding::percent_decode;
use sha2::{Digest, Sha256};

use super::{ERROR_CODE, ERROR_DATA, ERROR_DEST};

/// What [`super::sink::Letter::raw`] stores of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    /// The event a receiver would read: from the structured body's
    /// `source` when the Content-Type is `application/cloudevents+json`,
    /// else from `ce-source`, each falling back to the other; `""` when the
    /// request has none. Control characters are escaped (`\u{0}`).
    pub source: String,
    pub id: String,
    pub ty: String,
    /// Set when a structured request's `ce-*` headers name another event
    /// than its body: which attributes disagree, for `dlq list`.
    pub note: Option<String>,
    pub code: Option<String>,
    pub error_data: Option<String>,
    pub dest: Option<String>,
    /// `name: value\r\n` per header: names in lower case (HTTP/1 names
    /// are case-insensitive; the server reads them so), the lines of one
    /// name together in the order received, values byte for byte.
    pub headers: Vec<u8>,
    pub dedup_key: [u8; 32],
}

/// Whether a header shapes the event, so the raw form keeps it.
pub fn keeps(name: &str) -> bool {
    name.starts_with("ce-") || name == "content-type" || name == "content-encoding"
}

/// Knative's report about the failure: kept, but not part of the event.
pub fn is_knative_report(name: &str) -> bool {
    [ERROR_CODE, ERROR_DATA, ERROR_DEST].iter().any(|ext| name.strip_prefix("ce-") == Some(ext))
}

impl Raw {
    pub fn of(headers: &http::HeaderMap, body: &[u8]) -> Raw {
        let mut lines = Vec::new();
        let mut hasher = Sha256::new();
        hasher.update(b"raw dead letter\0");
        for (name, value) in headers.iter().filter(|(name, _)| keeps(name.as_str())) {
            let line = [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"].concat();
            if !is_knative_report(name.as_str()) {
                hasher.update((line.len() as u64).to_be_bytes());
                hasher.update(&line);
            }
            lines.extend_from_slice(&line);
        }
        hasher.update((body.len() as u64).to_be_bytes());
        hasher.update(body);
        let header = |name: &str| {
            headers.get(name).map(|value| printable(&percent_decode(value.as_bytes()).decode_utf8_lossy()).into_owned())
        };
        // Structured mode as the event path decides it; there a receiver
        // reads the event from the body and ignores `ce-*` headers.
        let structured = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|ct| crate::media_type::essence(ct) == crate::media_type::STRUCTURED);
        // The body's members, each left unparsed: a member nested past
        // serde_json's depth limit (the data, say) must not hide the
        // identity beside it.
        type Members = std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>;
        let json = if structured { serde_json::from_slice::<Members>(body).ok() } else { None };
        let value = |name: &str| {
            let raw = json.as_ref()?.get(name)?;
            serde_json::from_str::<serde_json::Value>(raw.get()).ok()
        };
        let member = |name: &str| {
            value(name).map(|value| match value {
                serde_json::Value::String(text) => printable(&text).into_owned(),
                other => printable(&other.to_string()).into_owned(),
            })
        };
        let attribute = |name: &str| header(&format!("ce-{name}")).or_else(|| member(name));
        // The identity a receiver would read: the body's in structured mode
        // (a replay to the broker's ingress injects that event), the
        // headers' otherwise; each falls back to the other when it has none.
        let mut disagreements = Vec::new();
        let mut identity = |name: &str| {
            let (from_header, from_body) = (header(&format!("ce-{name}")), member(name));
            if structured
                && let (Some(from_header), Some(from_body)) = (&from_header, &from_body)
                && from_header != from_body
            {
                disagreements.push(format!("{name} {from_body:?} (header ce-{name}: {from_header:?})"));
            }
            if structured { from_body.or(from_header) } else { from_header.or(from_body) }
        };
        let (source, id, ty) = (identity("source"), identity("id"), identity("type"));
        let note = (!disagreements.is_empty()).then(|| {
            format!(
                "the body names another event than its ce-* headers: {}; a receiver reads the body \
                 (structured mode), and that is the event listed",
                disagreements.join(", ")
            )
        });
        let dest = attribute(ERROR_DEST);
        // The destination as received, byte for byte: its printable form
        // (decoded, escaped) would merge two destinations that differ only
        // in bytes it cannot show.
        let dest_raw = headers
            .get(format!("ce-{ERROR_DEST}"))
            .map(|value| value.as_bytes().to_vec())
            .or_else(|| value(ERROR_DEST).map(|value| value.to_string().into_bytes()));
        match &dest_raw {
            None => hasher.update([0u8]),
            Some(dest) => {
                hasher.update([1u8]);
                hasher.update(dest);
            }
        }
        Raw {
            source: source.unwrap_or_default(),
            id: id.unwrap_or_default(),
            ty: ty.unwrap_or_default(),
            note,
            code: attribute(ERROR_CODE),
            error_data: attribute(ERROR_DATA),
            dest,
            headers: lines,
            dedup_key: hasher.finalize().into(),
        }
    }
}

/// The raw form's headers back as `(name, value)` pairs, for a replay.
/// `None` when the stored bytes are not lines of that form.
pub fn header_lines(raw: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut headers = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        let line = &rest[..end];
        let colon = line.windows(2).position(|w| w == b": ")?;
        headers.push((&line[..colon], &line[colon + 2..]));
        rest = &rest[end + 2..];
    }
    Some(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        map
    }

    #[test]
    fn keeps_the_event_headers_byte_for_byte_and_reads_the_identity() {
        let request = headers(&[
            ("ce-id", "a%00b"),
            ("ce-source", "urn:s"),
            ("host", "x"),
            ("content-type", "application/json"),
            ("ce-knativeerrorcode", "500"),
        ]);
        let raw = Raw::of(&request, b"{}");
        assert_eq!(raw.id, "a\\u{0}b");
        assert_eq!(raw.source, "urn:s");
        assert_eq!(raw.ty, "");
        assert_eq!(raw.code.as_deref(), Some("500"));
        let lines = header_lines(&raw.headers).unwrap();
        let names: Vec<&[u8]> = lines.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, [&b"ce-id"[..], b"ce-source", b"content-type", b"ce-knativeerrorcode"]);
        assert_eq!(lines[0].1, b"a%00b");
    }

    #[test]
    fn structured_bodies_give_their_identity_and_the_key_ignores_knatives_report() {
        let ct = [("content-type", "application/cloudevents+json; charset=utf-8")];
        let raw = Raw::of(&headers(&ct), br#"{"id":"1","source":"urn:s","type":"t","dataschema":"/rel"}"#);
        assert_eq!((raw.id.as_str(), raw.source.as_str(), raw.ty.as_str()), ("1", "urn:s", "t"));
        let first = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrorcode", "500")]), b"x");
        let again = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrorcode", "503")]), b"x");
        assert_eq!(first.dedup_key, again.dedup_key);
        let other = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrorcode", "500")]), b"y");
        assert_ne!(first.dedup_key, other.dedup_key);
        let elsewhere = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrordest", "http://b")]), b"x");
        assert_ne!(first.dedup_key, elsewhere.dedup_key);
        // Destinations that print alike are still two.
        let ff = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrordest", "http://a/%FF")]), b"x");
        let fe = Raw::of(&headers(&[("ce-id", "1"), ("ce-knativeerrordest", "http://a/%FE")]), b"x");
        assert_eq!(ff.dest, fe.dest, "both print as U+FFFD");
        assert_ne!(ff.dedup_key, fe.dedup_key);
        assert_eq!(Raw::of(&headers(&[]), b"{not json").id, "");
        // Data nested past serde_json's limit does not hide the identity.
        let deep = format!(r#"{{"id":"deep","source":"urn:s","type":"t","data":{}1{}}}"#, "[".repeat(500), "]".repeat(500));
        let raw = Raw::of(&headers(&ct), deep.as_bytes());
        assert_eq!((raw.id.as_str(), raw.source.as_str(), raw.ty.as_str()), ("deep", "urn:s", "t"));
    }

    #[test]
    fn a_structured_request_is_listed_as_its_body_names_it() {
        let request = headers(&[
            ("content-type", "Application/CloudEvents+JSON; charset=utf-8"),
            ("ce-specversion", "1.0"),
            ("ce-id", "from-header"),
            ("ce-source", "urn:s"),
            ("ce-type", "t.header"),
        ]);
        let raw = Raw::of(&request, br#"{"specversion":"1.0","id":"from-body","source":"urn:s","type":"t.body"}"#);
        assert_eq!((raw.id.as_str(), raw.source.as_str(), raw.ty.as_str()), ("from-body", "urn:s", "t.body"));
        let note = raw.note.expect("the disagreement is noted");
        assert!(note.contains(r#"id "from-body" (header ce-id: "from-header")"#), "{note}");
        assert!(note.contains("type") && !note.contains("source"), "{note}");
        // A body without the attribute: the header's, and nothing to note.
        let raw = Raw::of(&request, b"{not json");
        assert_eq!((raw.id.as_str(), raw.note), ("from-header", None));
        // Binary mode: the headers', whatever the body holds.
        let binary = headers(&[("content-type", "application/json"), ("ce-id", "from-header")]);
        let raw = Raw::of(&binary, br#"{"id":"from-body"}"#);
        assert_eq!((raw.id.as_str(), raw.note), ("from-header", None));
    }

    #[test]
    fn header_lines_refuse_what_is_not_lines() {
        assert_eq!(header_lines(b""), Some(vec![]));
        assert_eq!(header_lines(b"a: b\r\n"), Some(vec![(&b"a"[..], &b"b"[..])]));
        assert_eq!(header_lines(b"a: b"), None);
        assert_eq!(header_lines(b"ab\r\n"), None);
    }
}
