//! A processed event's answer: [`Committed`], stored with its claim so a
//! redelivery gets the very same answer back, and how it is rendered (202
//! and no body, or 200 and the reply CloudEvent in binary mode). Every
//! answer that is not a processed event's is a
//! [`Rejection`](crate::rejection::Rejection).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

pub type Body = Full<Bytes>;

/// Set on every answer that replays a stored outcome.
pub const REPLAY_HEADER: &str = "exactly-replay";

/// A processed event's answer, as stored with its claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    /// 202 without a reply, 200 with one.
    pub status: u16,
    pub reply: Option<ReplyEvent>,
}

/// The reply CloudEvent, answered in binary mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyEvent {
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub subject: Option<String>,
    pub time: String,
    pub datacontenttype: String,
    pub extensions: Vec<(String, String)>,
    #[serde(with = "base64_bytes")]
    pub data: Option<Vec<u8>>,
}

impl Committed {
    pub fn into_response(self, replay: bool) -> Response<Body> {
        let mut response = match self.reply {
            None => Response::new(Full::new(Bytes::new())),
            Some(reply) => reply.into_response(),
        };
        *response.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::ACCEPTED);
        if replay {
            response.headers_mut().insert(REPLAY_HEADER, HeaderValue::from_static("true"));
        }
        response
    }
}

impl ReplyEvent {
    fn into_response(self) -> Response<Body> {
        let mut response = Response::new(Full::new(Bytes::from(self.data.unwrap_or_default())));
        let headers = response.headers_mut();
        let mut put = |name: String, value: &str| {
            // Percent-encode as the CloudEvents HTTP binding requires; the
            // result is always a valid header value.
            let encoded = encode_header_value(value);
            if let (Ok(name), Ok(value)) = (http::HeaderName::try_from(name), HeaderValue::try_from(encoded)) {
                headers.insert(name, value);
            }
        };
        put("ce-specversion".into(), crate::decode::SPEC_VERSION);
        put("ce-id".into(), &self.id);
        put("ce-source".into(), &self.source);
        put("ce-type".into(), &self.ty);
        put("ce-time".into(), &self.time);
        if let Some(subject) = &self.subject {
            put("ce-subject".into(), subject);
        }
        for (name, value) in &self.extensions {
            put(format!("ce-{name}"), value);
        }
        if let Ok(value) = HeaderValue::try_from(self.datacontenttype) {
            headers.insert(http::header::CONTENT_TYPE, value);
        }
        response
    }
}

/// CloudEvents HTTP binding §3.1.3.2: percent-encode space, `"`, `%` and
/// everything outside printable ASCII.
fn encode_header_value(value: &str) -> String {
    use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
    const SET: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');
    utf8_percent_encode(value, SET).to_string()
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => serializer.serialize_some(&STANDARD.encode(bytes)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| STANDARD.decode(text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_percent_encoded() {
        assert_eq!(encode_header_value("a b%\"é"), "a%20b%25%22%C3%A9");
    }

    #[test]
    fn stored_outcomes_round_trip() {
        let committed = Committed {
            status: 200,
            reply: Some(ReplyEvent {
                id: "x".into(),
                source: "/exactly/h".into(),
                ty: "t".into(),
                subject: None,
                time: "2026-01-01T00:00:00Z".into(),
                datacontenttype: "application/json".into(),
                extensions: vec![("k".into(), "v".into())],
                data: Some(b"{\"a\":1}".to_vec()),
            }),
        };
        let text = serde_json::to_string(&committed).unwrap();
        assert_eq!(serde_json::from_str::<Committed>(&text).unwrap(), committed);
    }
}
