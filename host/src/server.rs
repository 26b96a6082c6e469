//! HTTP: hyper 1 on tokio.
//!
//! `POST /` takes one CloudEvent; `POST /dead-letter` takes one that the
//! Knative dispatcher dead-lettered (stored, never run: [`crate::dlq`]);
//! `GET /healthz` says the process is alive, `GET /readyz` that it can take
//! events (database reachable, handlers loaded, not shutting down);
//! `GET /metrics` answers the Prometheus text format (see
//! [`crate::metrics`]). The body is read under a size limit and a time limit
//! before anything else looks at it, then decoded as its `Content-Encoding`
//! says ([`crate::content_encoding`], under the same size limit). Each event is processed in its own
//! task, so a client that hangs up does not cut a transaction short.
//! That task runs inside an `event` tracing span holding the event's
//! source, id, type, handler and outcome (and the trace id of its W3C
//! `traceparent` extension, when it has a valid one), so every log line
//! about the event (the handler's own lines and stdout included) carries
//! them. When spans are exported ([`crate::otel`]), that `traceparent` is
//! the span's parent.
//!
//! On SIGTERM or SIGINT: stop accepting, answer 503 to new events, let
//! in-flight events finish within the grace period, exit.

use std::future::Future;
use std::pin::Pin;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::answer::Body;
use crate::rejection::Rejection;
use crate::content_encoding;
use crate::decode::{CloudEvent, decode};
use crate::dlq;
use crate::metrics::{self, Metrics, Outcome};
use crate::otel;
use crate::pipeline::Pipeline;

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Body limit of `POST /dead-letter` (at least `max_body_bytes`).
    pub max_dead_letter_bytes: usize,
    /// Bytes the dead letters not yet replayed may take together
    /// (`--dead-letter-quota`, see [`dlq::store`]).
    pub dead_letter_quota: u64,
    pub shutdown_grace: Duration,
    pub startup: Startup,
    pub metrics: Arc<Metrics>,
    /// How long a client may take to send the request body once its
    /// headers arrived ([`DEFAULT_BODY_READ_TIMEOUT`] unless configured);
    /// a slower client gets 408.
    pub body_read_timeout: Duration,
}

/// The event pipeline, or the work that will produce it.
pub enum Startup {
    /// Database reachable, migrations applied, handlers loaded.
    Ready(Pipeline),
    /// The database was out of reach at start-up: serve 503 (and `/readyz`
    /// not ready) while this retries; an error ends the process.
    Waiting(Pin<Box<dyn Future<Output = anyhow::Result<Pipeline>> + Send>>),
}

/// Time allowed for a client to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default of [`ServerConfig::body_read_timeout`] (`--body-read-timeout`).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a refused body (413, 503) is read and thrown away, and for
/// how long, before the connection closes. Closing a socket with unread data
/// makes the kernel send a reset, and a client still uploading may then lose
/// the answer instead of reading it.
const DRAIN_MAX_BYTES: u64 = 16 * 1024 * 1024;
const DRAIN_MAX_TIME: Duration = Duration::from_secs(5);

struct App {
    /// Set once the database is reachable and migrated.
    pipeline: OnceLock<Pipeline>,
    metrics: Arc<Metrics>,
    max_body_bytes: usize,
    max_dead_letter_bytes: usize,
    dead_letter_quota: u64,
    body_read_timeout: Duration,
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let local = listener.local_addr()?;
    let (pipeline, mut waiting) = match config.startup {
        Startup::Ready(pipeline) => (OnceLock::from(pipeline), None),
        Startup::Waiting(bring_up) => (OnceLock::new(), Some(bring_up)),
    };
    let app = Arc::new(App {
        pipeline,
        metrics: config.metrics,
        max_body_bytes: config.max_body_bytes,
        max_dead_letter_bytes: config.max_dead_letter_bytes,
        dead_letter_quota: config.dead_letter_quota,
        body_read_timeout: config.body_read_timeout,
        shutting_down: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    tracing::info!(%local, "listening");
    // The one line on stdout: tests and scripts wait for it.
    println!("exactly listening on http://{local}");

    let graceful = GracefulShutdown::new();
    let mut failure = None;
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.route(request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    // The header lines are bounded by `exactly` itself, per
                    // path (rejection::HeaderLimits), under these.
                    .max_headers(crate::rejection::MAX_HEADER_LINES)
                    .max_buf_size(crate::rejection::MAX_HEADER_BUFFER_BYTES)
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            brought_up = async { waiting.as_mut().expect("guarded").await }, if waiting.is_some() => {
                waiting = None;
                match brought_up {
                    Ok(pipeline) => {
                        let _ = app.pipeline.set(pipeline);
                    }
                    Err(error) => {
                        failure = Some(error.context("the database came back, but exactly cannot start on it"));
                        break;
                    }
                }
            }
            () = &mut stop => break,
        }
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: new events get 503, in-flight events finish");
    app.shutting_down.store(true, Ordering::SeqCst);
    drop(listener);
    let drained = async {
        graceful.shutdown().await;
        while app.in_flight.load(Ordering::SeqCst) > 0 {
            let idle = app.idle.notified();
            if app.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            idle.await;
        }
    };
    if tokio::time::timeout(config.shutdown_grace, drained).await.is_err() {
        tracing::warn!(in_flight = app.in_flight.load(Ordering::SeqCst), "grace period over; unfinished events roll back");
    }
    failure.map_or(Ok(()), Err)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

impl App {
    async fn route(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/") => self.receive(request).await,
            (&Method::POST, dlq::PATH) => self.receive_dead_letter(request).await,
            (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok"),
            (&Method::GET, "/metrics") => {
                let mut response = Response::new(Full::new(Bytes::from(self.metrics.encode())));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, http::HeaderValue::from_static(metrics::CONTENT_TYPE));
                response
            }
            (&Method::GET, "/readyz") => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                } else if let Some(pipeline) = self.pipeline.get()
                    && pipeline.database.ping().await
                {
                    plain(StatusCode::OK, "ready")
                } else {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
                }
            }
            (_, "/") => {
                let message = format!("{} / is not served: POST a CloudEvent to /", request.method());
                let mut response = json_error(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", &message);
                response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("POST"));
                response
            }
            (_, dlq::PATH) => {
                let message = format!("{} {} is not served: POST dead-lettered CloudEvents there", request.method(), dlq::PATH);
                let mut response = json_error(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", &message);
                response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("POST"));
                response
            }
            (method, path) => {
                let message = format!("{method} {path} is not served: POST CloudEvents to /");
                json_error(StatusCode::NOT_FOUND, "not-found", &message)
            }
        }
    }

    async fn receive(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let event = match self.read_event(request, self.max_body_bytes).await {
            Ok(event) => event,
            Err(response) => return response,
        };

        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let app = self.clone();
        let span = tracing::info_span!(
            "event",
            source = %event.source(),
            id = %event.id(),
            r#type = %event.ty(),
            handler = tracing::field::Empty,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(trace_id) = event
            .extensions()
            .iter()
            .find(|(name, _)| name == "traceparent")
            .and_then(|(_, value)| otel::trace_id(value))
        {
            span.record("trace_id", trace_id);
        }
        otel::set_parent(&span, &event);
        let task = tokio::spawn(
            async move {
                let in_flight = app.metrics.in_flight();
                let started = Instant::now();
                let pipeline = app.pipeline.get().expect("checked before the body was read");
                let result = pipeline.process(&event).await;
                let elapsed = started.elapsed();
                let micros = elapsed.as_micros() as u64;
                let outcome = match &result {
                    Ok(processed) => Outcome::of(processed.answer.status, processed.replay),
                    Err(rejection) => Outcome::of(rejection.status().as_u16(), false),
                };
                tracing::Span::current().record("outcome", outcome.label());
                app.metrics.event_answered(event.ty(), outcome, elapsed);
                drop(in_flight);
                match &result {
                    Ok(processed) => tracing::info!(
                        status = processed.answer.status, replay = processed.replay, micros, "event processed"
                    ),
                    Err(rejection) => {
                        app.metrics.rejected(rejection.code());
                        match rejection {
                            Rejection::Limit { handler, limit, .. } => app.metrics.limit_hit(handler, limit.code()),
                            Rejection::Deadline { handler, .. } => app.metrics.limit_hit(handler, "deadline"),
                            _ => {}
                        }
                        if rejection.status().is_server_error() {
                            tracing::warn!(
                                status = rejection.status().as_u16(), error = rejection.code(), micros,
                                "event not processed, retry expected: {rejection}"
                            );
                        } else {
                            tracing::info!(
                                status = rejection.status().as_u16(), error = rejection.code(), micros,
                                "event refused: {rejection}"
                            );
                        }
                    }
                }
                if app.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                    app.idle.notify_waiters();
                }
                result
            }
            .instrument(span),
        );
        match task.await {
            Ok(Ok(processed)) => processed.answer.into_response(processed.replay),
            Ok(Err(rejection)) => rejection.into_response(),
            Err(error) => Rejection::Internal(format!("the event task failed: {error}")).into_response(),
        }
    }

    /// Reads the request body (within the size and time limits) and
    /// decodes it into a CloudEvent, or answers why it cannot.
    async fn read_event(&self, request: Request<Incoming>, limit: usize) -> Result<CloudEvent, Response<Body>> {
        let (parts, body) = request.into_parts();
        let read = match self.read_request_body(&parts, body, limit, crate::rejection::EVENT_HEADER_LIMITS).await {
            Ok(body) => content_encoding::decode_body(&parts.headers, body, limit)
                .and_then(|body| decode(&parts.headers, body))
                .map_err(|rejection| {
                    tracing::info!(error = rejection.code(), "{rejection}");
                    (rejection.clone(), rejection.into_response())
                }),
            Err(refused) => Err(refused),
        };
        read.map_err(|(rejection, response)| {
            self.metrics.rejected(rejection.code());
            response
        })
    }

    /// The whole body of a request, or the answer refusing it (header
    /// lines over `header_limits`, shutting down, no database yet, body
    /// over `limit`, unreadable, too slow).
    async fn read_request_body(
        &self,
        parts: &http::request::Parts,
        mut body: Incoming,
        limit: usize,
        header_limits: crate::rejection::HeaderLimits,
    ) -> Result<Vec<u8>, (Rejection, Response<Body>)> {
        // A refusal before or while the body is read: the connection closes
        // after the answer.
        let refuse = |body, rejection: Rejection| {
            let response = refuse_body(&parts.headers, body, rejection.clone());
            (rejection, response)
        };
        if let Err(rejection) = header_limits.check(&parts.headers) {
            return Err(refuse(body, rejection));
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(refuse(body, Rejection::ShuttingDown));
        }
        if self.pipeline.get().is_none() {
            let waiting = Rejection::DatabaseUnavailable("exactly is starting and waits for the database".into());
            return Err(refuse(body, waiting));
        }
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(refuse(body, Rejection::PayloadTooLarge(limit)));
        }
        let read = tokio::time::timeout(self.body_read_timeout, read_body(&mut body, limit)).await;
        match read {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(BodyError::TooLarge)) => Err(refuse(body, Rejection::PayloadTooLarge(limit))),
            Ok(Err(BodyError::Read(error))) => {
                let rejection = Rejection::InvalidEvent(format!("the request body could not be read: {error}"));
                Err((rejection.clone(), closing(rejection.into_response())))
            }
            Err(_elapsed) => {
                tracing::info!(timeout = ?self.body_read_timeout, "the request body did not arrive in time");
                let rejection = Rejection::RequestTimeout(self.body_read_timeout);
                Err((rejection.clone(), closing(rejection.into_response())))
            }
        }
    }

    /// `POST /dead-letter`: stores the dead letter (see [`dlq`]), as an
    /// event when it is a valid one and as received otherwise, and answers
    /// 202 once it is committed; runs no handler.
    async fn receive_dead_letter(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let header_limits = crate::rejection::DEAD_LETTER_HEADER_LIMITS;
        let body = match self.read_request_body(&parts, body, self.max_dead_letter_bytes, header_limits).await {
            Ok(body) => body,
            Err((rejection, response)) => {
                self.metrics.rejected(rejection.code());
                return response;
            }
        };
        // Decoded as an event when it is a valid one (its Content-Encoding
        // undone, bounded by the same limit); kept as received otherwise,
        // a body that would decode past the limit included: as sent it is
        // within the limit, and refusing it would lose it.
        let decoded = content_encoding::decode_body(&parts.headers, body.clone(), self.max_dead_letter_bytes)
            .and_then(|decoded| decode(&parts.headers, decoded));
        let letter = match decoded {
            Ok(event) => dlq::Letter::event(&event, &parts.headers)
                .unwrap_or_else(|problem| dlq::Letter::raw(&parts.headers, &body, problem)),
            Err(rejection) => dlq::Letter::raw(&parts.headers, &body, rejection.to_string()),
        };
        if let Some(problem) = letter.problem() {
            tracing::warn!(problem, "the dead letter is not a valid CloudEvent; it is stored as received");
        }
        // Like an event: its own task, counted in flight, so neither a
        // client hanging up nor a shutdown cuts the transaction short.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let app = self.clone();
        let task = tokio::spawn(async move {
            let pipeline = app.pipeline.get().expect("checked before the body was read");
            let result = dlq::store(&pipeline.database, &letter, app.dead_letter_quota).await;
            if let Err(rejection @ Rejection::DeadLetterQuota { .. }) = &result {
                app.metrics.dead_letter_over_quota();
                tracing::warn!(
                    status = rejection.status().as_u16(), error = rejection.code(),
                    "dead letter over quota, not stored, retry expected: {rejection}"
                );
            } else if let Err(rejection) = &result {
                tracing::warn!(
                    status = rejection.status().as_u16(), error = rejection.code(),
                    "dead letter not stored, retry expected: {rejection}"
                );
            }
            if app.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                app.idle.notify_waiters();
            }
            result
        });
        match task.await {
            Ok(Ok(stored)) => {
                if matches!(stored, dlq::Stored::New(_)) {
                    self.metrics.dead_letter_stored();
                }
                dlq::accepted()
            }
            Ok(Err(rejection)) => rejection.into_response(),
            Err(error) => Rejection::Internal(format!("the dead-letter task failed: {error}")).into_response(),
        }
    }
}

enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// Reads the whole body, refusing it as soon as it grows past `limit`.
async fn read_body(body: &mut Incoming, limit: usize) -> Result<Vec<u8>, BodyError> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(BodyError::Read)?.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(BodyError::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

/// Answers `rejection` without reading the rest of the body, and closes the
/// connection once the answer is out. Unless the client waits for `100
/// Continue` (then it sends no body at all), what it still sends is read and
/// dropped in the background, within bounds, so that it receives the
/// answer rather than a connection reset.
fn refuse_body(headers: &http::HeaderMap, body: Incoming, rejection: Rejection) -> Response<Body> {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        tokio::spawn(drain(body));
    }
    closing(rejection.into_response())
}

async fn drain(mut body: Incoming) {
    let discard = async {
        let mut drained = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                drained += data.len() as u64;
                if drained > DRAIN_MAX_BYTES {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_MAX_TIME, discard).await;
}

/// Marks `response` as the last one on its connection.
fn closing(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// A non-2xx answer outside the event path, shaped like a rejection's:
/// a JSON body `{"error", "message"}` and the `kne-exactlyerror` header.
fn json_error(status: StatusCode, code: &'static str, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    headers.insert(crate::rejection::ERROR_HEADER, http::HeaderValue::from_static(code));
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
