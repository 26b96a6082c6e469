//! CloudEvents as the tests send them, in both HTTP encodings.
//!
//! Binary mode puts the attributes in `ce-*` headers (percent-encoded as
//! the HTTP binding requires) and the data in the body; structured mode
//! sends one `application/cloudevents+json` document. The data is always
//! JSON, serialized the same way in both modes, so the same event sent in
//! either mode has the same payload.

use serde_json::Value;

/// The source of every event a test makes unless it says otherwise.
pub const TEST_SOURCE: &str = "urn:exactly:e2e";

/// A CloudEvent with JSON data and `datacontenttype: application/json`.
#[derive(Clone, Debug)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub type_: String,
    pub subject: Option<String>,
    pub data: Value,
}

impl Event {
    /// A new event of `type_` with a fresh random id, source
    /// [`TEST_SOURCE`] and data `{}`.
    pub fn new(type_: &str) -> Event {
        Event {
            id: uuid::Uuid::new_v4().to_string(),
            source: TEST_SOURCE.to_owned(),
            type_: type_.to_owned(),
            subject: None,
            data: Value::Object(Default::default()),
        }
    }

    pub fn with_data(mut self, data: Value) -> Event {
        self.data = data;
        self
    }

    pub fn with_id(mut self, id: &str) -> Event {
        self.id = id.to_owned();
        self
    }

    pub fn with_source(mut self, source: &str) -> Event {
        self.source = source.to_owned();
        self
    }

    pub fn with_type(mut self, type_: &str) -> Event {
        self.type_ = type_.to_owned();
        self
    }

    /// The same `(source, id)` and attributes with other data: what a
    /// producer that reuses ids would send.
    pub fn redelivered_with_data(&self, data: Value) -> Event {
        self.clone().with_data(data)
    }

    /// The data as it travels: compact JSON.
    pub fn data_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).expect("JSON values always serialize")
    }

    /// Binary mode: the `ce-*` headers (values percent-encoded) and
    /// `content-type`. Tests that need a broken event remove or replace
    /// entries before sending.
    pub fn binary_headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![
            ("ce-specversion".to_owned(), "1.0".to_owned()),
            ("ce-id".to_owned(), percent_encode_header_value(&self.id)),
            (
                "ce-source".to_owned(),
                percent_encode_header_value(&self.source),
            ),
            (
                "ce-type".to_owned(),
                percent_encode_header_value(&self.type_),
            ),
        ];
        if let Some(subject) = &self.subject {
            headers.push((
                "ce-subject".to_owned(),
                percent_encode_header_value(subject),
            ));
        }
        headers.push(("content-type".to_owned(), "application/json".to_owned()));
        headers
    }

    /// Structured mode: the whole event as one JSON document.
    pub fn structured_body(&self) -> Vec<u8> {
        let mut document = serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": self.source,
            "type": self.type_,
            "datacontenttype": "application/json",
            "data": self.data,
        });
        if let Some(subject) = &self.subject {
            document["subject"] = Value::String(subject.clone());
        }
        serde_json::to_vec(&document).expect("JSON values always serialize")
    }
}

/// The content type of a structured-mode request.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=utf-8";

/// Percent-encodes a binary-mode header value as the CloudEvents HTTP
/// binding says: space, `"`, `%` and everything outside printable ASCII
/// become `%XX` (of the UTF-8 bytes).
pub fn percent_encode_header_value(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b' ' | b'"' | b'%' => encoded.push_str(&format!("%{byte:02X}")),
            0x21..=0x7E => encoded.push(byte as char),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_percent_encoded_where_the_binding_requires() {
        assert_eq!(percent_encode_header_value("urn:orders/1"), "urn:orders/1");
        assert_eq!(percent_encode_header_value("a b\"c%"), "a%20b%22c%25");
        assert_eq!(percent_encode_header_value("é"), "%C3%A9");
    }

    #[test]
    fn both_modes_carry_the_same_data_bytes() {
        let event = Event::new("test.count").with_data(serde_json::json!({"b": 1, "a": [true]}));
        let structured: Value = serde_json::from_slice(&event.structured_body()).unwrap();
        assert_eq!(
            serde_json::to_vec(&structured["data"]).unwrap(),
            event.data_bytes()
        );
    }
}

/// The extensions the Knative dispatcher adds to an event it dead-letters
/// (as `ce-*` headers): the last answer's status and body (base64) and
/// where the event was going.
pub fn knative_extensions(status: u16, body: &[u8], dest: &str) -> Vec<(String, String)> {
    use base64::Engine;
    vec![
        ("ce-knativeerrorcode".into(), status.to_string()),
        ("ce-knativeerrordata".into(), base64::engine::general_purpose::STANDARD.encode(body)),
        ("ce-knativeerrordest".into(), dest.to_owned()),
    ]
}
