//! Why an event was not processed, whose fault that is, and the one HTTP
//! answer that follows.
//!
//! [`Rejection`] is the one error type of the event path. Each variant says
//! who is to blame ([`Rejection::blame`]: the sender, the handler, the host
//! or the database) and maps to exactly one answer, decided by one
//! question: can a retry help? The answers are chosen for what the Knative
//! Kafka dispatcher does with them: 5xx is retried, other 4xx go to the
//! dead-letter sink (a 2xx body must be a CloudEvent or empty). Why a
//! handler's statement failed becomes one of these when the handler's run
//! is judged.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// Knative copies `kne-*` response headers onto a dead-lettered event.
pub const ERROR_HEADER: &str = "kne-exactlyerror";

/// The content codings a request body may be sent in, as `Accept-Encoding`
/// says them on the 415 of [`Rejection::UnsupportedEncoding`] (RFC 9110
/// §15.5.16).
pub const SUPPORTED_ENCODINGS: &str = "gzip, deflate";

/// What the header lines of one request may take: lines, and bytes counted
/// as `name: value\r\n` per line. Checked by `exactly` itself, on the
/// parsed lines before the body is read, so the answer (431
/// [`Rejection::HeadersTooLarge`]) does not depend on how the bytes arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    pub lines: usize,
    pub bytes: usize,
}

/// `POST /`: 1,000 lines (an event with 300 extensions is 300 lines in
/// binary mode; hyper's default of 100 refused ones with 85), 256 KiB
/// (Envoy-based ingresses, Kourier and Istio, stop at 60 KiB by default).
pub const EVENT_HEADER_LIMITS: HeaderLimits = HeaderLimits { lines: 1_000, bytes: 256 * 1024 };

/// `POST /dead-letter`: as much as the HTTP server reads, less room for the
/// request line: a 4xx there loses the dead letter. Far more than an
/// event's limits plus what the dispatcher adds (Knative's `knativeerror*`
/// extensions: the failed answer's body, truncated, base64, and the
/// destination URL; an arrival time, a trace context), so an event taken
/// at `POST /` is never refused here, and neither is most of one `POST /`
/// refused for its header lines (431) and the dispatcher dead-lettered.
pub const DEAD_LETTER_HEADER_LIMITS: HeaderLimits = HeaderLimits { lines: MAX_HEADER_LINES, bytes: 960 * 1024 };

/// The HTTP server's own bounds (hyper's `max_headers` and `max_buf_size`):
/// past them it answers 431 itself, with an empty body. Neither is below
/// the limits above, so a request within them always parses.
pub const MAX_HEADER_LINES: usize = 2_000;
pub const MAX_HEADER_BUFFER_BYTES: usize = 1024 * 1024;

impl HeaderLimits {
    /// The request's header lines within these limits, or the 431 refusing
    /// them.
    pub fn check(self, headers: &http::HeaderMap) -> Result<(), Rejection> {
        let lines = headers.len();
        let bytes = header_bytes(headers);
        if lines > self.lines || bytes > self.bytes {
            return Err(Rejection::HeadersTooLarge { lines, bytes, limits: self });
        }
        Ok(())
    }
}

/// The bytes of a request's header lines as [`HeaderLimits`] counts them:
/// `name: value\r\n` per line.
pub fn header_bytes(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum()
}

/// Who is to blame for a [`Rejection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The request is not an event `exactly` can take: 4xx, and the same
    /// request fails the same way again (413, 408 and 415 included).
    Sender,
    /// The handler refused the event, misbehaved or hit a limit: 422 when
    /// a retry would fail the same way, 500 when it may not.
    Handler,
    /// `exactly` itself: 500 (`internal`), or 503 while it shuts down.
    Host,
    /// The database is unreachable, contended or out of room: 503.
    Database,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    // --- the sender's fault: dead-letter, never retry ---
    #[error("{0}")]
    InvalidEvent(String),
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The header lines are over the path's own [`HeaderLimits`]: 431,
    /// whatever chunks the bytes came in.
    #[error(
        "the request has {lines} header lines taking {bytes} bytes; the limit is {} lines and {} bytes \
         (name, value and 4 bytes per line)",
        limits.lines,
        limits.bytes
    )]
    HeadersTooLarge { lines: usize, bytes: usize, limits: HeaderLimits },
    #[error("the request body, decoded (Content-Encoding: {encoding}), is larger than the limit of {limit} bytes")]
    DecodedTooLarge { limit: usize, encoding: &'static str },
    #[error(
        "Content-Encoding {0:?} is not supported: send the body as it is, or encoded with {supported}",
        supported = SUPPORTED_ENCODINGS
    )]
    UnsupportedEncoding(String),
    #[error("the request body did not arrive within {0:?}")]
    RequestTimeout(std::time::Duration),
    #[error("event ({event_source}, {id}) was already processed with a different payload: a (source, id) must not be reused")]
    KeyReused { event_source: String, id: String },
    #[error("no handler is registered for event type {0:?}")]
    NoHandler(String),

    // --- the handler's fault ---
    /// The event's data is over the handler's own `max_body_bytes`: the
    /// sender's event is one this handler takes no such size of (413,
    /// dead-lettered; checked once the
    /// event is known to be new, so a redelivery of a processed one still
    /// replays).
    #[error("the event's data ({size} bytes) is larger than handler {handler}'s max_body_bytes ({limit})")]
    DataTooLarge { handler: String, size: u64, limit: u64 },
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
    /// Who is to blame (see [`Blame`]).
    pub fn blame(&self) -> Blame {
        use Rejection::*;
        match self {
            InvalidEvent(_) | PayloadTooLarge(_) | RequestTimeout(_) | KeyReused { .. } | NoHandler(_) => Blame::Sender,
            HeadersTooLarge { .. } => Blame::Sender,
            UnsupportedEncoding(_) | DecodedTooLarge { .. } => Blame::Sender,
            Permanent { .. } | StatementRefused { .. } | BadOutcome { .. } | Retryable { .. } | Trap { .. } => Blame::Handler,
            DataTooLarge { .. } => Blame::Sender,
            Deadline { .. } | Limit { .. } | StatementFailed { .. } => Blame::Handler,
            Internal(_) | ShuttingDown => Blame::Host,
            DatabaseUnavailable(_) | Busy(_) | DeadLetterQuota { .. } => Blame::Database,
        }
    }

    /// Whether delivering the same event again may succeed: every 5xx.
    pub fn retry_can_help(&self) -> bool {
        self.status().is_server_error()
    }

    pub fn status(&self) -> StatusCode {
        use Rejection::*;
        match self {
            InvalidEvent(_) => StatusCode::BAD_REQUEST,
            PayloadTooLarge(_) | DecodedTooLarge { .. } | DataTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
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
            PayloadTooLarge(_) | DecodedTooLarge { .. } | DataTooLarge { .. } => "payload-too-large",
            UnsupportedEncoding(_) => "unsupported-encoding",
            HeadersTooLarge { .. } => "headers-too-large",
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
        matches!(
            self,
            Rejection::PayloadTooLarge(_)
                | Rejection::HeadersTooLarge { .. }
                | Rejection::DataTooLarge { .. }
                | Rejection::RequestTimeout(_)
        )
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.code(), "message": bounded(self.to_string()) });
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
                HeaderValue::from_static(SUPPORTED_ENCODINGS),
            );
        }
        response
    }
}

/// The most bytes of a message an answer carries: messages quote the
/// request (an event type of any length, say), and the answer's body comes
/// back base64-encoded in Knative's `knativeerrordata` header when the
/// event is dead-lettered, where it counts against the dead-letter path's
/// [`HeaderLimits`]. The log line keeps the whole message.
pub const MAX_MESSAGE_BYTES: usize = 1024;

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("… (cut at 1024 bytes)");
    }
    message
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


#[cfg(test)]
mod tests {
    use super::*;

    /// One variant, one answer, and the answer follows from the blame: the
    /// sender gets a 4xx, the database a 503, the handler a 422 when a retry
    /// would fail the same way and a 500 when it may not.
    #[test]
    fn messages_are_cut_at_1024_bytes_on_a_character_boundary() {
        let long = Rejection::NoHandler(format!("a{}", "é".repeat(2000)));
        let response = long.into_response();
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body())).unwrap().to_bytes();
        let message = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["message"].as_str().unwrap().to_owned();
        assert!(message.ends_with("… (cut at 1024 bytes)") && message.len() <= MAX_MESSAGE_BYTES + 30, "{}", message.len());
        let short = Rejection::NoHandler("t".into());
        assert_eq!(bounded(short.to_string()), short.to_string());
    }

    #[test]
    fn every_variant_has_one_blame_and_one_answer() {
        let handler = || "h".to_owned();
        let message = || "m".to_owned();
        let all = [
            Rejection::InvalidEvent(message()),
            Rejection::PayloadTooLarge(1),
            Rejection::HeadersTooLarge { lines: 2, bytes: 2, limits: HeaderLimits { lines: 1, bytes: 1 } },
            Rejection::RequestTimeout(std::time::Duration::from_secs(1)),
            Rejection::KeyReused { event_source: "s".into(), id: "i".into() },
            Rejection::NoHandler("t".into()),
            Rejection::DataTooLarge { handler: handler(), size: 2, limit: 1 },
            Rejection::Permanent { handler: handler(), message: message() },
            Rejection::StatementRefused { handler: handler(), message: message() },
            Rejection::BadOutcome { handler: handler(), message: message() },
            Rejection::Retryable { handler: handler(), message: message() },
            Rejection::Trap { handler: handler(), message: message() },
            Rejection::Deadline { handler: handler(), seconds: 1.0 },
            Rejection::Limit { handler: handler(), limit: LimitKind::Memory, message: message() },
            Rejection::StatementFailed { handler: handler(), message: message() },
            Rejection::DatabaseUnavailable(message()),
            Rejection::Busy(message()),
            Rejection::Internal(message()),
            Rejection::ShuttingDown,
            Rejection::DeadLetterQuota { size: 1, pending: 1, quota: 1 },
        ];
        for rejection in all {
            let status = rejection.status();
            match rejection.blame() {
                Blame::Sender => assert!(status.is_client_error(), "{rejection:?}"),
                Blame::Handler => assert!(
                    status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::INTERNAL_SERVER_ERROR,
                    "{rejection:?}"
                ),
                Blame::Host => assert!(status.is_server_error(), "{rejection:?}"),
                Blame::Database => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{rejection:?}"),
            }
            assert_eq!(rejection.retry_can_help(), status.is_server_error());
            let response = rejection.clone().into_response();
            assert_eq!(response.status(), status);
            assert_eq!(response.headers()[ERROR_HEADER], rejection.code());
            assert_eq!(
                response.headers().get(http::header::CONNECTION).is_some(),
                rejection.closes_connection(),
                "{rejection:?}"
            );
        }
    }
}
