//! OpenTelemetry: OTLP export of the tracing spans, and the W3C trace
//! context carried by the CloudEvents `traceparent` / `tracestate`
//! extensions.
//!
//! Export is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: [`exporter`] builds a
//! tracer provider whose batch processor sends OTLP over HTTP/protobuf, and
//! the command line's logging set-up puts a `tracing-opentelemetry` layer on
//! it. Unset, there is no layer, no provider and no thread: the spans stay
//! log fields.
//!
//! The batch processor exports from a thread of its own, outside the async
//! runtime, while hyper's client needs the runtime's reactor: the requests
//! are therefore spawned on the server's runtime ([`RuntimeClient`]).
//!
//! Trace context: [`set_parent`] makes the incoming `traceparent` the parent
//! of the `event` span, so that the exported span continues the producer's
//! trace; [`reply_trace`] is the trace context a reply event carries on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::decode::CloudEvent;

/// The service name when `OTEL_SERVICE_NAME` does not say.
pub const DEFAULT_SERVICE_NAME: &str = "exactly";

/// Whether spans are exported (the layer is installed).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The endpoint variables that turn export on; the traces one wins, as in
/// the exporter.
const ENDPOINT_VARS: [&str; 2] = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"];

/// The collector's endpoint when export is asked for: the first of
/// [`ENDPOINT_VARS`] that is set and not empty.
pub fn configured_endpoint() -> Option<String> {
    ENDPOINT_VARS
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.trim().is_empty()))
}

/// A tracer provider that exports spans in batches to the endpoint of the
/// `OTEL_EXPORTER_OTLP_*` variables (the exporter reads them: endpoint,
/// headers, timeout, compression), named by `OTEL_SERVICE_NAME` (default
/// [`DEFAULT_SERVICE_NAME`]) with `OTEL_RESOURCE_ATTRIBUTES`; the `OTEL_BSP_*`
/// variables tune the batches. HTTP requests run on `runtime`.
pub fn exporter(runtime: tokio::runtime::Handle) -> anyhow::Result<SdkTracerProvider> {
    // The OTLP exporter's standard variable for the CA certificate(s) of an
    // https collector (PEM), besides the public web roots built in.
    let ca_file = ["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|value| !value.trim().is_empty()))
        .map(std::path::PathBuf::from);
    let timeout = ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let client = RuntimeClient {
        client: crate::https::client(ca_file.as_deref())?,
        timeout,
        runtime,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_timeout(timeout)
        .with_http_client(client)
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |name| name.trim().is_empty()) {
        resource = resource.with_service_name(DEFAULT_SERVICE_NAME);
    }
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(provider)
}

/// hyper's HTTP/1 client, its requests spawned on the async runtime: the
/// batch processor calls it from its own thread, where no reactor runs.
struct RuntimeClient {
    client: Client<crate::https::Connector, Full<Bytes>>,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeClient").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

/// The most of a collector's answer that is read.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (client, timeout) = (self.client.clone(), self.timeout);
        let send = async move {
            let (parts, body) = request.into_parts();
            let response = client.request(Request::from_parts(parts, Full::new(body))).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES).collect().await?.to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        };
        self.runtime
            .spawn(async move {
                tokio::time::timeout(timeout, send)
                    .await
                    .map_err(|_| HttpError::from(format!("no answer from the collector within {timeout:?}")))?
            })
            .await?
    }
}

/// The extensions of an event as a text-map carrier.
struct Extensions<'a>(&'a [(String, String)]);

impl Extractor for Extensions<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_str()).collect()
    }
}

fn extension<'a>(event: &'a CloudEvent, name: &str) -> Option<&'a str> {
    event.extensions().iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

/// Makes the event's W3C trace context (its `traceparent` and `tracestate`
/// extensions) the OpenTelemetry parent of `span`, which must not have been
/// entered yet. Nothing to do when spans are not exported, or when the
/// event has no valid `traceparent` (the span then starts a trace).
pub fn set_parent(span: &tracing::Span, event: &CloudEvent) {
    if !EXPORTING.load(Ordering::Relaxed) || extension(event, "traceparent").and_then(trace_id).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Extensions(event.extensions()));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The trace context a reply to `event` carries on, as extensions
/// (`traceparent`, and `tracestate` when there is one), when the event had a
/// valid `traceparent`. Called inside the event's span: when spans are
/// exported, the reply's parent is that span (same trace id, the span's own
/// id and flags); otherwise `exactly` has no span of its own in the trace
/// and passes the event's context on unchanged.
pub fn reply_trace(event: &CloudEvent) -> Vec<(String, String)> {
    let Some(incoming) = extension(event, "traceparent").filter(|value| trace_id(value).is_some()) else {
        return Vec::new();
    };
    if EXPORTING.load(Ordering::Relaxed) {
        let context = tracing::Span::current().context();
        if context.span().span_context().is_valid() {
            let mut carrier = HashMap::new();
            TraceContextPropagator::new().inject_context(&context, &mut carrier);
            let mut extensions: Vec<(String, String)> =
                carrier.into_iter().filter(|(_, value)| !value.is_empty()).collect();
            extensions.sort();
            return extensions;
        }
    }
    let mut extensions = vec![("traceparent".to_owned(), incoming.to_owned())];
    if let Some(state) = extension(event, "tracestate").filter(|state| !state.is_empty()) {
        extensions.push(("tracestate".to_owned(), state.to_owned()));
    }
    extensions
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`),
/// if it is well-formed and not all zeros.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |part: &str, len: usize| part.len() == len && part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let valid = hex(version, 2)
        && version != "ff"
        && (parts.next().is_none() || version != "00")
        && hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && hex(parent_id, 16)
        && parent_id.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn event(extensions: &[(&str, &str)]) -> CloudEvent {
        CloudEvent::for_tests("1", "s", "t", None, None, extensions, None)
    }

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let id = TRACE;
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01")), Some(id));
        assert_eq!(trace_id(&format!("00-{id}-00f067aa0ba902b7-01-extra")), None);
        assert_eq!(trace_id(&format!("01-{id}-00f067aa0ba902b7-01-extra")), Some(id));
        assert_eq!(trace_id(&format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32))), None);
        assert_eq!(trace_id(&format!("00-{id}-0000000000000000-01")), None);
        assert_eq!(trace_id(&format!("00-{}-00f067aa0ba902b7-01", id.to_uppercase())), None);
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn without_export_the_reply_passes_the_context_on() {
        let parent = format!("00-{TRACE}-00f067aa0ba902b7-01");
        assert_eq!(
            reply_trace(&event(&[("traceparent", &parent), ("tracestate", "k=v")])),
            vec![("traceparent".to_owned(), parent.clone()), ("tracestate".to_owned(), "k=v".to_owned())]
        );
        assert_eq!(reply_trace(&event(&[("traceparent", &parent)])), vec![("traceparent".to_owned(), parent)]);
        assert!(reply_trace(&event(&[("traceparent", "garbage")])).is_empty());
        assert!(reply_trace(&event(&[])).is_empty());
    }
}
