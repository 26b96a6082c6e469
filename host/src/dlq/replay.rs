//! `exactly dlq replay`: sends each dead letter's original event again
//! and records the attempt on its row.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use clap::Args;

use super::one_line;
use super::raw::{header_lines, is_knative_report};
use super::rows::{DeadLetter, Recorded, connect, record, select_one};
use crate::database_args::DatabaseArgs;
use super::{ERROR_CODE, ERROR_DATA, ERROR_DEST};
use crate::decode::SPEC_VERSION;

/// How much of a failed replay's answer is kept on the row and printed.
const REPLAY_ERROR_BYTES: usize = 1024;

#[derive(Args, Debug)]
pub(super) struct ReplayArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// The dead letters' ids (the first column of `exactly dlq list`).
    #[arg(required = true)]
    ids: Vec<i64>,

    /// Where to send the events (`http://` or `https://`): the broker's
    /// ingress, or `exactly` itself (`http://exactly.<namespace>.svc/`).
    #[arg(long)]
    to: String,

    /// For an `https://` target: a PEM file of CA certificates the server's
    /// certificate may chain to, besides the public web roots built in.
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,

    /// Send even dead letters that were already replayed successfully.
    #[arg(long)]
    force: bool,

    /// How long one replay may take before it counts as failed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// What one replay attempt got.
struct ReplayOutcome {
    status: Option<u16>,
    error: Option<String>,
}

impl ReplayOutcome {
    fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

type Client = hyper_util::client::legacy::Client<crate::https::Connector, Full<Bytes>>;

pub(super) async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let target: http::Uri = args.to.parse().with_context(|| format!("--to {:?} is not a URL", args.to))?;
    match target.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => bail!("--to {:?}: only http:// and https:// are supported (got {other}://)", args.to),
        None => bail!("--to {:?} is not an absolute http:// or https:// URL", args.to),
    }
    let client: Client = crate::https::client(args.ca_file.as_deref())?;
    let database = connect(&args.database).await?;
    let mut failed = 0usize;
    for &dead_letter_id in &args.ids {
        let Some(dead_letter) = select_one(&database, dead_letter_id).await? else {
            println!("dead letter {dead_letter_id}: not found");
            failed += 1;
            continue;
        };
        if let Some(replayed_at) = &dead_letter.replayed_at
            && !args.force
        {
            println!(
                "dead letter {dead_letter_id}: already replayed at {replayed_at} (to {}); not sent again (--force sends it anyway)",
                dead_letter.last_replay_to.as_deref().unwrap_or("?")
            );
            failed += 1;
            continue;
        }
        let outcome = match replay_request(&dead_letter, &target) {
            Ok(request) => send(&client, request, args.timeout).await,
            Err(error) => ReplayOutcome { status: None, error: Some(format!("{error:#}")) },
        };
        let recorded = record(
            &database,
            dead_letter_id,
            dead_letter.deliveries,
            &args.to,
            outcome.accepted(),
            outcome.status,
            outcome.error.as_deref(),
        )
        .await;
        let what = format!(
            "dead letter {dead_letter_id} ({} {} from {})",
            dead_letter.ty, dead_letter.id, dead_letter.source
        );
        // One count per dead letter, however many things went wrong with it.
        let mut ok = true;
        match (&outcome, &recorded) {
            (_, Ok(Recorded::DeadLetteredAgain { deliveries })) => {
                ok = false;
                println!(
                    "{what}: accepted by {} (HTTP {}), but dead-lettered again while the replay was under way \
                     (deliveries {} -> {deliveries}): it failed again; left pending",
                    args.to,
                    outcome.status.unwrap_or_default(),
                    dead_letter.deliveries,
                );
            }
            (ReplayOutcome { status: Some(status), .. }, _) if outcome.accepted() => {
                println!("{what}: replayed to {}: HTTP {status}", args.to);
            }
            (ReplayOutcome { status, error }, _) => {
                ok = false;
                let status = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
                println!(
                    "{what}: NOT replayed to {}: {status}: {}",
                    args.to,
                    one_line(error.as_deref().unwrap_or(""))
                );
            }
        }
        if let Err(error) = recorded {
            ok = false;
            println!("{what}: the attempt could not be recorded: {error:#}");
        }
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} dead letters were not replayed (or not recorded)", args.ids.len());
    }
    Ok(())
}

/// The original event in binary mode: `ce-*` headers, percent-encoded as
/// the HTTP binding requires, and the data as the body; in structured mode
/// when binary mode cannot carry it as received ([`binary_cannot_carry`])
/// or its header lines would take more bytes than `exactly` takes on
/// `POST /` ([`crate::rejection::EVENT_HEADER_LIMITS`], less
/// [`CLIENT_HEADER_BYTES`]; the dead-letter path takes more). The
/// `knativeerror*` extensions are Knative's report about the failure, not
/// part of the event.
///
/// A dead letter kept raw goes back as it came: its headers byte for byte
/// (Knative's report left out) and its body.
fn replay_request(dead_letter: &DeadLetter, target: &http::Uri) -> anyhow::Result<Request<Full<Bytes>>> {
    if let Some(raw) = &dead_letter.raw_headers {
        return raw_request(raw, dead_letter, target);
    }
    if !binary_cannot_carry(dead_letter) {
        let binary = binary_request(dead_letter, target)?;
        let header_bytes = crate::rejection::header_bytes(binary.headers());
        if header_bytes + CLIENT_HEADER_BYTES <= crate::rejection::EVENT_HEADER_LIMITS.bytes {
            return Ok(binary);
        }
    }
    structured_request(dead_letter, target)
}

/// Room left for the header lines the HTTP client adds to a replay (`host`,
/// `content-length`).
const CLIENT_HEADER_BYTES: usize = 1024;

fn binary_request(dead_letter: &DeadLetter, target: &http::Uri) -> anyhow::Result<Request<Full<Bytes>>> {
    /// Space, `"`, `%`, controls and (always) non-ASCII.
    const ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');
    let mut request = Request::post(target.clone());
    let headers = request.headers_mut().context("building the request")?;
    let mut put = |name: String, value: &str| -> anyhow::Result<()> {
        let name = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("attribute name {name:?}"))?;
        let encoded = utf8_percent_encode(value, ENCODE).to_string();
        let value = HeaderValue::from_str(&encoded).with_context(|| format!("value of {name}"))?;
        headers.insert(name, value);
        Ok(())
    };
    put("ce-specversion".into(), SPEC_VERSION)?;
    put("ce-id".into(), &dead_letter.id)?;
    put("ce-source".into(), &dead_letter.source)?;
    put("ce-type".into(), &dead_letter.ty)?;
    for (name, value) in [("subject", &dead_letter.subject), ("time", &dead_letter.time), ("dataschema", &dead_letter.dataschema)] {
        if let Some(value) = value {
            put(format!("ce-{name}"), value)?;
        }
    }
    for (name, value) in &dead_letter.extensions {
        if [ERROR_CODE, ERROR_DATA, ERROR_DEST].contains(&name.as_str()) {
            continue;
        }
        let value = match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        put(format!("ce-{name}"), &value)?;
    }
    if let Some(content_type) = &dead_letter.datacontenttype {
        let value = HeaderValue::from_str(content_type).context("datacontenttype is not a valid Content-Type")?;
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    let body = Bytes::from(dead_letter.data.clone().unwrap_or_default());
    Ok(request.body(Full::new(body))?)
}

/// The most extensions a binary replay sends as headers: `exactly`
/// refuses requests of more than 1,000 header lines (431).
const MAX_BINARY_EXTENSIONS: usize = 900;

/// Whether binary mode would fail to carry this event as received (it was
/// received structured): a datacontenttype that names an event format (the
/// receiver would read the data as the event), or that is no visible-ASCII
/// header value; data that is present but empty (an empty body is no
/// data); more extensions than header lines a receiver takes.
fn binary_cannot_carry(dead_letter: &DeadLetter) -> bool {
    let content_type = dead_letter.datacontenttype.as_deref();
    content_type.is_some_and(crate::media_type::is_event_format)
        || content_type.is_some_and(|text| !text.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        || dead_letter.data.as_deref().is_some_and(<[u8]>::is_empty)
        || dead_letter.extensions.len() > MAX_BINARY_EXTENSIONS
}

/// The original event in structured mode (`application/cloudevents+json`),
/// for the events binary mode cannot carry ([`binary_cannot_carry`]): every
/// attribute as a member, JSON data (a JSON media type, or none) as the
/// very text received, other UTF-8 data as a string, other bytes as
/// `data_base64`.
fn structured_request(dead_letter: &DeadLetter, target: &http::Uri) -> anyhow::Result<Request<Full<Bytes>>> {
    use serde_json::Value;
    let mut document = serde_json::Map::new();
    let mut put = |name: &str, value: Value| {
        document.insert(name.to_owned(), value);
    };
    put("specversion", SPEC_VERSION.into());
    put("id", dead_letter.id.clone().into());
    put("source", dead_letter.source.clone().into());
    put("type", dead_letter.ty.clone().into());
    for (name, value) in [
        ("subject", &dead_letter.subject),
        ("time", &dead_letter.time),
        ("datacontenttype", &dead_letter.datacontenttype),
        ("dataschema", &dead_letter.dataschema),
    ] {
        if let Some(value) = value {
            put(name, value.clone().into());
        }
    }
    for (name, value) in &dead_letter.extensions {
        if ![ERROR_CODE, ERROR_DATA, ERROR_DEST].contains(&name.as_str()) {
            put(name, value.clone());
        }
    }
    let json_data = dead_letter.datacontenttype.as_deref().is_none_or(crate::media_type::is_json);
    let data = dead_letter.data.as_deref().map(|bytes| match std::str::from_utf8(bytes) {
        Ok(text) if json_data && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => text.to_owned(),
        Ok(text) if !json_data => Value::String(text.to_owned()).to_string(),
        _ => {
            use base64::Engine;
            document.insert("data_base64".to_owned(), base64::engine::general_purpose::STANDARD.encode(bytes).into());
            String::new()
        }
    });
    let mut body = Value::Object(document).to_string();
    if let Some(data) = data.filter(|data| !data.is_empty()) {
        body.pop();
        body.push_str(",\"data\":");
        body.push_str(&data);
        body.push('}');
    }
    let mut request = Request::post(target.clone());
    request
        .headers_mut()
        .context("building the request")?
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/cloudevents+json"));
    Ok(request.body(Full::new(Bytes::from(body)))?)
}

fn raw_request(raw: &[u8], dead_letter: &DeadLetter, target: &http::Uri) -> anyhow::Result<Request<Full<Bytes>>> {
    let lines = header_lines(raw).context("the stored raw headers are not `name: value` lines")?;
    let mut request = Request::post(target.clone());
    let headers = request.headers_mut().context("building the request")?;
    for (name, value) in lines {
        let name = HeaderName::from_bytes(name).context("a stored header name")?;
        if is_knative_report(name.as_str()) {
            continue;
        }
        headers.append(name, HeaderValue::from_bytes(value).context("a stored header value")?);
    }
    let body = Bytes::from(dead_letter.data.clone().unwrap_or_default());
    Ok(request.body(Full::new(body))?)
}

async fn send(client: &Client, request: Request<Full<Bytes>>, timeout: Duration) -> ReplayOutcome {
    let exchange = async {
        let response = client.request(request).await.map_err(|e| format!("{e:#}: {}", source_chain(&e)))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        let mut incoming = response.into_body();
        while let Some(frame) = incoming.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                body.extend_from_slice(&data);
                if body.len() >= REPLAY_ERROR_BYTES {
                    break;
                }
            }
        }
        body.truncate(REPLAY_ERROR_BYTES);
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, body))) => {
            let error = (!(200..300).contains(&status)).then(|| if body.is_empty() { format!("HTTP {status}") } else { body });
            ReplayOutcome { status: Some(status), error }
        }
        Ok(Err(error)) => ReplayOutcome { status: None, error: Some(error) },
        Err(_) => ReplayOutcome { status: None, error: Some(format!("no answer within {timeout:?}")) },
    }
}

/// The causes below an error, joined (hyper's own message is terse).
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored event-form dead letter of type `t`, no data, not replayed.
    fn dead_letter() -> DeadLetter {
        DeadLetter {
            dead_letter_id: 1,
            received_at: String::new(),
            last_received_at: String::new(),
            deliveries: 1,
            source: "urn:s".into(),
            id: "1".into(),
            ty: "t".into(),
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            extensions: serde_json::Map::new(),
            data: None,
            error_code: Some("500".into()),
            error_data: None,
            error_dest: None,
            replay_attempts: 0,
            last_replay_at: None,
            last_replay_to: None,
            last_replay_status: None,
            last_replay_error: None,
            replayed_at: None,
            problem: None,
            raw_headers: None,
        }
    }

    #[test]
    fn replay_leaves_out_knatives_error_extensions_and_percent_encodes() {
        let dead_letter = DeadLetter {
            source: "urn:a b".into(),
            id: "é".into(),
            subject: Some("s".into()),
            datacontenttype: Some("application/json".into()),
            extensions: serde_json::from_str(r#"{"knativeerrorcode":"500","traceparent":"00-x"}"#).unwrap(),
            data: Some(b"{}".to_vec()),
            ..dead_letter()
        };
        let request = replay_request(&dead_letter, &"http://h/".parse().unwrap()).unwrap();
        let headers = request.headers();
        assert_eq!(headers["ce-source"], "urn:a%20b");
        assert_eq!(headers["ce-id"], "%C3%A9");
        assert_eq!(headers["ce-subject"], "s");
        assert_eq!(headers["ce-traceparent"], "00-x");
        assert_eq!(headers["content-type"], "application/json");
        assert!(!headers.contains_key("ce-knativeerrorcode"));

        // Kept raw: sent back byte for byte, twice-given headers twice,
        // Knative's report left out.
        let raw = DeadLetter {
            raw_headers: Some(b"ce-id: a%00b\r\nce-knativeerrorcode: 500\r\ncontent-type: a/b\r\ncontent-type: c/d\r\n".to_vec()),
            data: Some(b"\x1f\x8b".to_vec()),
            problem: Some("why".into()),
            ..dead_letter
        };
        let request = replay_request(&raw, &"http://h/".parse().unwrap()).unwrap();
        let headers = request.headers();
        assert_eq!(headers["ce-id"], "a%00b");
        assert_eq!(headers.get_all("content-type").iter().collect::<Vec<_>>(), ["a/b", "c/d"]);
        assert!(!headers.contains_key("ce-source") && !headers.contains_key("ce-knativeerrorcode"));
    }

    /// What binary mode cannot carry goes structured, and decodes to the
    /// event that was received (found by a fresh attacker: an event whose
    /// datacontenttype was application/cloudevents+json replayed binary
    /// and its data was taken for the event; empty text data became no
    /// data, 422 key-reused).
    #[test]
    fn events_binary_mode_cannot_carry_replay_structured_as_received() {
        let base = || DeadLetter {
            source: "urn:outer".into(),
            id: "outer-1".into(),
            time: Some("2026-12-01T07:00:00Z".into()),
            extensions: serde_json::from_str(r#"{"knativeerrorcode":"500","myext":"v"}"#).unwrap(),
            ..dead_letter()
        };
        let inner = br#"{"specversion":"1.0","id":"smuggled","source":"urn:victim","type":"order.created"}"#;
        let many: serde_json::Map<_, _> = (0..1000).map(|i| (format!("x{i}"), serde_json::Value::from("v"))).collect();
        let cases = [
            DeadLetter { datacontenttype: Some("application/cloudevents+json".into()), data: Some(inner.to_vec()), ..base() },
            DeadLetter { datacontenttype: Some("text/plain".into()), data: Some(Vec::new()), ..base() },
            DeadLetter { datacontenttype: Some("application/json".into()), data: Some(Vec::new()), ..base() },
            DeadLetter { datacontenttype: Some("text/plain; charset=é".into()), data: Some(b"caf\xc3\xa9".to_vec()), ..base() },
            DeadLetter { datacontenttype: Some("application/octet-stream".into()), data: Some(vec![]), ..base() },
            DeadLetter { extensions: many, data: Some(b"{ \"a\" : 1 }".to_vec()), ..base() },
        ];
        for dead_letter in cases {
            assert!(binary_cannot_carry(&dead_letter), "{:?}", dead_letter.datacontenttype);
            let request = replay_request(&dead_letter, &"http://h/".parse().unwrap()).unwrap();
            let (parts, body) = request.into_parts();
            assert_eq!(parts.headers["content-type"], "application/cloudevents+json");
            let body = futures::executor::block_on(body.collect()).unwrap().to_bytes().to_vec();
            let event = crate::decode::decode(&parts.headers, body).unwrap();
            assert_eq!((event.source(), event.id()), ("urn:outer", "outer-1"), "the data is not the event");
            assert_eq!(event.datacontenttype(), dead_letter.datacontenttype.as_deref());
            assert_eq!(event.data(), dead_letter.data.as_deref(), "{:?}", dead_letter.datacontenttype);
            assert_eq!(event.time(), Some("2026-12-01T07:00:00Z"));
            assert!(event.extensions().iter().all(|(name, _)| name != "knativeerrorcode"));
            assert!(event.extensions().iter().any(|(name, _)| name == "myext" || name == "x0"));
        }
        // Binary mode still carries everything else.
        assert!(!binary_cannot_carry(&DeadLetter { datacontenttype: Some("text/plain".into()), data: Some(b"x".to_vec()), ..base() }));
        // Header lines past what `POST /` takes: structured, whatever the
        // dead-letter path took (it takes more).
        let wide: serde_json::Map<_, _> = (0..10).map(|i| (format!("big{i}"), "v".repeat(27_000).into())).collect();
        let wide = DeadLetter { extensions: wide, data: Some(b"{}".to_vec()), ..base() };
        let request = replay_request(&wide, &"http://h/".parse().unwrap()).unwrap();
        assert_eq!(request.headers()["content-type"], "application/cloudevents+json");
        let narrow = DeadLetter { extensions: serde_json::Map::from_iter([("big0".to_owned(), "v".repeat(27_000).into())]), ..wide };
        let request = replay_request(&narrow, &"http://h/".parse().unwrap()).unwrap();
        assert_eq!(request.headers()["ce-big0"].len(), 27_000, "binary while it fits");
    }
}
