//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the real binary
//! exports its `event` spans over OTLP/HTTP (protobuf) to a collector, here
//! a fake one that records what it is sent; the span continues the trace of
//! the event's `traceparent`, and a reply event carries the trace on, with
//! the exported span as its parent. Without the variable, nothing is
//! exported and the reply passes the event's trace context on unchanged.

use std::sync::{Arc, Mutex};

use exactly_e2e::{Backend, Event, TestEnv, both_backends, json};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

both_backends!(
    event_spans_are_exported_and_continue_the_trace,
    without_an_endpoint_the_reply_passes_the_trace_on
);

/// A collector that is down costs the spans, never an event: the events
/// are answered as usual, the failed export is logged, and the host still
/// exits cleanly.
#[tokio::test]
async fn a_collector_that_is_down_costs_spans_not_events() {
    // A port that was free a moment ago: nothing listens there.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut app = TestEnv::new(Backend::Sqlite)
        .await
        .serve_with_env(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &closed)])
        .await;
    let (event, headers) = traced_emit();
    app.post(&headers, event.data_bytes()).await.assert_status(200);
    app.send_binary(&Event::new("test.count")).await.assert_processed();
    let status = app.terminate().await;
    assert!(status.success(), "exit {status:?}; stderr:\n{}", app.stderr_tail());
    let logs = app.logs();
    assert!(logs.contains("ExportError"), "the failed export is not logged:\n{logs}");
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// One request the collector received.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

/// A fake OTLP/HTTP collector: answers every request 200 with an empty
/// `ExportTraceServiceResponse` and records it.
struct Collector {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the collector");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    // HTTP/1.1 with keep-alive: one request after the other.
                    while let Some(request) = read_request(&mut stream).await {
                        log.lock().unwrap().push(request);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                        if stream.get_mut().write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Collector { url, received }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Every span of every export request.
    fn spans(&self) -> Vec<(ExportTraceServiceRequest, Span)> {
        let mut spans = Vec::new();
        for request in self.received() {
            let export = ExportTraceServiceRequest::decode(request.body.as_slice())
                .unwrap_or_else(|error| panic!("{request:?} is not an ExportTraceServiceRequest: {error}"));
            for resource in &export.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((export.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

/// Reads one request (headers, then a `content-length` body), or `None`
/// when the connection closes.
async fn read_request(stream: &mut BufReader<tokio::net::TcpStream>) -> Option<Received> {
    let mut line = String::new();
    if stream.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut content_length = 0;
    let mut content_type = None;
    loop {
        let mut header = String::new();
        if stream.read_line(&mut header).await.ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.trim().parse().ok()?,
            "content-type" => content_type = Some(value.trim().to_owned()),
            "transfer-encoding" => panic!("the exporter sent a chunked body; this collector reads content-length only"),
            _ => {}
        }
    }
    let mut body = vec![0; content_length];
    stream.read_exact(&mut body).await.ok()?;
    Some(Received { method, path, content_type, body })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn string_attribute(attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<String> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
        Value::StringValue(value) => Some(value.clone()),
        _ => None,
    })
}

/// `test.emit` with a `traceparent`, sent twice (the second time replayed).
fn traced_emit() -> (Event, Vec<(String, String)>) {
    let event = Event::new("test.emit").with_data(json!({"n": 1}));
    let mut headers = event.binary_headers();
    headers.push(("ce-traceparent".to_owned(), format!("00-{TRACE}-{PARENT}-01")));
    headers.push(("ce-tracestate".to_owned(), "vendor=opaque".to_owned()));
    (event, headers)
}

async fn event_spans_are_exported_and_continue_the_trace(backend: Backend) {
    let collector = Collector::start().await;
    let mut app = TestEnv::new(backend)
        .await
        .serve_with_env(&[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url)])
        .await;

    let (event, headers) = traced_emit();
    let answer = app.post(&headers, event.data_bytes()).await;
    answer.assert_status(200);
    assert_eq!(answer.header("ce-type"), Some("test.emitted"), "{answer}");
    // The reply continues the trace: same trace id, a parent of its own
    // (the event span), the flags and the tracestate passed on.
    let reply_parent = answer.header("ce-traceparent").unwrap_or_else(|| panic!("no ce-traceparent:\n{answer}")).to_owned();
    let fields: Vec<&str> = reply_parent.split('-').collect();
    assert_eq!(fields.len(), 4, "{reply_parent}");
    assert_eq!((fields[0], fields[1], fields[3]), ("00", TRACE, "01"), "{reply_parent}");
    let span_id = fields[2].to_owned();
    assert!(span_id.len() == 16 && span_id != PARENT && span_id != "0".repeat(16), "{reply_parent}");
    assert_eq!(answer.header("ce-tracestate"), Some("vendor=opaque"), "{answer}");
    // A redelivery replays the stored reply byte for byte, trace included.
    let replay = app.post(&headers, event.data_bytes()).await;
    replay.assert_status(200);
    assert!(replay.is_replay(), "{replay}");
    assert_eq!(replay.header("ce-traceparent"), Some(reply_parent.as_str()), "{replay}");

    // The batch is sent by the time the host has exited.
    let status = app.terminate().await;
    assert!(status.success(), "exit {status:?}; stderr:\n{}", app.stderr_tail());
    let received = collector.received();
    assert!(!received.is_empty(), "the collector received nothing; stderr:\n{}", app.stderr_tail());
    for request in &received {
        assert_eq!((request.method.as_str(), request.path.as_str()), ("POST", "/v1/traces"), "{request:?}");
        assert_eq!(request.content_type.as_deref(), Some("application/x-protobuf"), "{request:?}");
    }
    let spans = collector.spans();
    let traced: Vec<&(ExportTraceServiceRequest, Span)> =
        spans.iter().filter(|(_, span)| span.name == "event" && hex(&span.trace_id) == TRACE).collect();
    assert_eq!(traced.len(), 2, "one span per delivery: {spans:#?}");
    for (_, span) in &traced {
        assert_eq!(hex(&span.parent_span_id), PARENT, "{span:#?}");
        assert_eq!(string_attribute(&span.attributes, "type").as_deref(), Some("test.emit"), "{span:#?}");
        assert_eq!(string_attribute(&span.attributes, "id"), Some(event.id.clone()), "{span:#?}");
        assert_eq!(string_attribute(&span.attributes, "handler").as_deref(), Some("testkit"), "{span:#?}");
    }
    let outcomes: Vec<Option<String>> =
        traced.iter().map(|(_, span)| string_attribute(&span.attributes, "outcome")).collect();
    assert!(outcomes.contains(&Some("committed".to_owned())), "{outcomes:?}");
    assert!(outcomes.contains(&Some("replayed".to_owned())), "{outcomes:?}");
    // The reply's parent is the span of the delivery that ran the handler.
    let (export, first) = traced
        .iter()
        .find(|(_, span)| hex(&span.span_id) == span_id)
        .unwrap_or_else(|| panic!("no exported span has the reply's parent id {span_id}: {traced:#?}"));
    assert_eq!(string_attribute(&first.attributes, "outcome").as_deref(), Some("committed"));
    let resource = export.resource_spans[0].resource.as_ref().expect("a resource");
    assert_eq!(string_attribute(&resource.attributes, "service.name").as_deref(), Some("exactly"));
}

async fn without_an_endpoint_the_reply_passes_the_trace_on(backend: Backend) {
    // Other OTEL variables alone do not turn export on.
    let mut app = TestEnv::new(backend)
        .await
        .serve_with_env(&[], &[("OTEL_SERVICE_NAME", "exactly-test"), ("OTEL_BSP_SCHEDULE_DELAY", "10")])
        .await;
    let (event, headers) = traced_emit();
    let answer = app.post(&headers, event.data_bytes()).await;
    answer.assert_status(200);
    // No span of exactly's is in the trace: the context goes on as it came.
    assert_eq!(answer.header("ce-traceparent"), Some(format!("00-{TRACE}-{PARENT}-01").as_str()), "{answer}");
    assert_eq!(answer.header("ce-tracestate"), Some("vendor=opaque"), "{answer}");
    // Without a traceparent, the reply has none either.
    let plain = Event::new("test.emit");
    let answer = app.send_binary(&plain).await;
    answer.assert_status(200);
    assert_eq!(answer.header("ce-traceparent"), None, "{answer}");
    let status = app.terminate().await;
    assert!(status.success(), "exit {status:?}; stderr:\n{}", app.stderr_tail());
    assert!(!app.logs().contains("OTLP"), "{}", app.logs());
}
