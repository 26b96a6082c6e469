//! What `exactly` answers, and why.
//!
//! [`Rejection`] is the one error type of the event path. Each variant says
//! who is to blame and maps to exactly one HTTP answer, chosen for what the
//! Knative Kafka dispatcher does with it: 5xx is retried, other 4xx go to
//! the dead-letter sink, and a 2xx body must be a CloudEvent or empty.
//! [`Committed`] is a processed event's answer, stored with its claim so a
//! redelivery gets the very same answer back.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

pub type Body = Full<Bytes>;

/// Set on every answer that replays a stored outcome.
pub const REPLAY_HEADER: &str = "exactly-replay";
/// Knative copies `kne-*` response headers onto a dead-lettered event.
pub const ERROR_HEADER: &str = "kne-exactlyerror";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    // --- the sender's fault: dead-letter, never retry ---
    #[error("{0}")]
    InvalidEvent(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the request body, decoded (Content-Encoding: {encoding}), is larger than the limit of {limit} bytes")]
    DecodedTooLarge { limit: usize, encoding: &'static str },
    #[error(
        "Content-Encoding {0:?} is not supported: send the body as it is, or encoded with {supported}",
        supported = crate::content_encoding::SUPPORTED
    )]
    UnsupportedEncoding(String),
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("event ({event_source}, {id}) was already processed with a different payload: a (source, id) must not be reused")]
    KeyReused { event_source: String, id: String },
    #[error("no handler is registered for event type {0:?}")]
    NoHandler(String),

    // --- the handler's fault ---
    #[error("handler {handler} refused the event: {message}")]
    Permanent { handler: String, message: String },
    #[error("handler {handler} issued a statement the host refuses: {message}")]
    StatementRefused { handler: String, message: String },
    #[error("handler {handler} returned an outcome the host cannot use: {message}")]
    BadOutcome { handler: String, message: String },
    #[error("handler {handler} failed, retry later: {message}")]
    Retryable { handler: String, message: String },
    #[error("handler {handler} trapped: {message}")]
    Trap { handler: String, message: String },
    #[error("handler {handler} exceeded its deadline of {seconds:.3}s")]
    Deadline { handler: String, seconds: f64 },
    #[error("handler {handler} hit its {} limit: {message}", limit.describe())]
    Limit { handler: String, limit: LimitKind, message: String },
    #[error("handler {handler} ignored a failed statement and returned Ok; nothing was committed: {message}")]
    StatementFailed { handler: String, message: String },

    // --- the host's or the database's fault ---
    #[error("the database is unavailable: {0}")]
    DatabaseUnavailable(String),
    #[error("the event is busy (a concurrent delivery holds it, or the database is contended): {0}")]
    Busy(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("exactly is shutting down")]
    ShuttingDown,
    /// `POST /dead-letter` only: storing the dead letter would take the
    /// bytes of dead letters not yet replayed past `--dead-letter-quota`.
    /// 503, never 4xx: on a 4xx the Knative dispatcher commits the offset
    /// and the dead letter is lost; on a 503 it retries, and a retry
    /// succeeds once dead letters are replayed, deleted or expired.
    #[error(
        "the dead letter ({size} bytes) is not stored: dead letters not yet replayed already take {pending} bytes of the \
         quota of {quota} (--dead-letter-quota); replay or delete some (exactly dlq) and the retry is stored"
    )]
    DeadLetterQuota { size: u64, pending: u64, quota: u64 },
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        use Rejection::*;
        match self {
            InvalidEvent(_) => StatusCode::BAD_REQUEST,
            PayloadTooLarge(_) | DecodedTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            KeyReused { .. } | NoHandler(_) | Permanent { .. } | StatementRefused { .. } | BadOutcome { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Retryable { .. } | Trap { .. } | Deadline { .. } | Limit { .. } | StatementFailed { .. } | Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            DatabaseUnavailable(_) | Busy(_) | ShuttingDown | DeadLetterQuota { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable machine-readable code: the `error` member of the body and
    /// the value of the `kne-exactlyerror` header.
    pub fn code(&self) -> &'static str {
        use Rejection::*;
        match self {
            InvalidEvent(_) => "invalid-event",
            PayloadTooLarge(_) | DecodedTooLarge { .. } => "payload-too-large",
            UnsupportedEncoding(_) => "unsupported-encoding",
            RequestTimeout(_) => "request-timeout",
            KeyReused { .. } => "key-reused",
            NoHandler(_) => "no-handler",
            Permanent { .. } => "permanent",
            StatementRefused { .. } => "statement-refused",
            BadOutcome { .. } => "bad-outcome",
            Retryable { .. } => "retryable",
            Trap { .. } => "trap",
            Deadline { .. } => "deadline",
            Limit { limit, .. } => limit.code(),
            StatementFailed { .. } => "statement-failed",
            DatabaseUnavailable(_) => "database-unavailable",
            Busy(_) => "busy",
            Internal(_) => "internal",
            ShuttingDown => "shutting-down",
            DeadLetterQuota { .. } => "dead-letter-quota",
        }
    }

    /// Whether the answer closes the connection: a body over a limit or
    /// too slow to arrive may not have been read to its end, so the
    /// connection cannot carry another request. Every limit the same way,
    /// the global `--max-body-bytes` and a handler's `max_body_bytes`.
    pub fn closes_connection(&self) -> bool {
        matches!(self, Rejection::PayloadTooLarge(_) | Rejection::RequestTimeout(_))
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if self.closes_connection() {
            headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, Rejection::UnsupportedEncoding(_)) {
            // RFC 9110 §15.5.16: say which codings would have been taken.
            headers.insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_static(crate::content_encoding::SUPPORTED),
            );
        }
        response
    }
}

/// A sandbox limit other than the deadline. Hitting one rolls the event
/// back and answers 500: the broker retries, then dead-letters it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Memory,
    Fuel,
    StatementTimeout,
    Rows,
    ResultBytes,
    /// A statement's parameters: more than `convert::MAX_PARAMS`, or more
    /// bytes together than the handler's `max_result_bytes`.
    Parameters,
    Statements,
    LogVolume,
}

impl LimitKind {
    pub fn code(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory-limit",
            LimitKind::Fuel => "fuel-exhausted",
            LimitKind::StatementTimeout => "statement-timeout",
            LimitKind::Rows => "too-many-rows",
            LimitKind::ResultBytes => "result-too-large",
            LimitKind::Parameters => "too-many-parameters",
            LimitKind::Statements => "too-many-statements",
            LimitKind::LogVolume => "log-limit",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            LimitKind::Memory => "memory",
            LimitKind::Fuel => "fuel",
            LimitKind::StatementTimeout => "statement timeout",
            LimitKind::Rows => "rows-per-query",
            LimitKind::ResultBytes => "bytes-per-query",
            LimitKind::Parameters => "parameters-per-statement",
            LimitKind::Statements => "statements-per-event",
            LimitKind::LogVolume => "log volume",
        }
    }
}

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
