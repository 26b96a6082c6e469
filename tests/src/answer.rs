//! What the host answered, and assertions that show the whole answer when
//! they fail.

use std::fmt;

use reqwest::header::HeaderMap;
use serde::Deserialize;

/// One HTTP response, read to the end.
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// The JSON body of every non-2xx answer.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

impl Answer {
    pub async fn read(response: reqwest::Response) -> Answer {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .unwrap_or_else(|error| panic!("reading the body of an HTTP {status} answer: {error}"))
            .to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A header's value, if present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Whether the host replayed a stored answer (`exactly-replay: true`)
    /// instead of running the handler.
    pub fn is_replay(&self) -> bool {
        self.header("exactly-replay") == Some("true")
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("the body is not JSON ({error}):\n{self}"))
    }

    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(self.status, status, "unexpected answer:\n{self}");
    }

    /// 202 with an empty body: processed (or replayed), nothing emitted.
    #[track_caller]
    pub fn assert_accepted(&self) {
        self.assert_status(202);
        assert!(
            self.body.is_empty(),
            "a 202 must have an empty body:\n{self}"
        );
    }

    /// A first delivery that ran the handler and was stored: 202, empty
    /// body, no replay header.
    #[track_caller]
    pub fn assert_processed(&self) {
        self.assert_accepted();
        assert!(
            !self.is_replay(),
            "expected a first delivery, got a replay:\n{self}"
        );
    }

    /// A duplicate answered from the stored outcome: 202, empty body,
    /// `exactly-replay: true`.
    #[track_caller]
    pub fn assert_replayed(&self) {
        self.assert_accepted();
        assert!(self.is_replay(), "expected `exactly-replay: true`:\n{self}");
    }

    /// A non-2xx answer: the status, the JSON body's `error` code and the
    /// `kne-exactlyerror` header (which Knative copies onto the
    /// dead-lettered event) all agree.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> ErrorBody {
        self.assert_status(status);
        let body: ErrorBody = serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!("a non-2xx answer must have a JSON body {{\"error\", \"message\"}} ({error}):\n{self}")
        });
        assert_eq!(body.error, code, "unexpected error code:\n{self}");
        assert_eq!(
            self.header("kne-exactlyerror"),
            Some(code),
            "the kne-exactlyerror header must repeat the error code:\n{self}"
        );
        assert!(
            !self.is_replay(),
            "an error answer is never a replay:\n{self}"
        );
        body
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  HTTP {}", self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
        }
        let body = self.body_text();
        let shown: String = body.chars().take(2000).collect();
        write!(f, "  body ({} bytes): {shown}", self.body.len())?;
        if shown.len() < body.len() {
            write!(f, "…")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
