//! HTTP: hyper 1 on tokio.
//!
//! `POST /` takes one CloudEvent; `GET /healthz` says the process is alive,
//! `GET /readyz` that it can take events (database reachable, handlers
//! loaded, not shutting down). The body is read under a size limit before
//! anything else looks at it. Each event is processed in its own task, so a
//! client that hangs up does not cut a transaction short.
//!
//! On SIGTERM or SIGINT: stop accepting, answer 503 to new events, let
//! in-flight events finish within the grace period, exit.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::answer::{Body, Rejection};
use crate::decode::decode;
use crate::pipeline::Pipeline;
use crate::runtime::Runtime;
use crate::storage::Database;

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub database: Database,
    pub runtime: Runtime,
    /// PostgreSQL role of each handler (empty on SQLite).
    pub roles: HashMap<String, String>,
}

/// Time allowed for a client to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

struct App {
    pipeline: Pipeline,
    max_body_bytes: usize,
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen).await?;
    let local = listener.local_addr()?;
    let app = Arc::new(App {
        pipeline: Pipeline::new(config.database, config.runtime, config.roles),
        max_body_bytes: config.max_body_bytes,
        shutting_down: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: Notify::new(),
    });
    tracing::info!(%local, "listening");
    // The one line on stdout: tests and scripts wait for it.
    println!("exactly listening on http://{local}");

    let graceful = GracefulShutdown::new();
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
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
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
    Ok(())
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
            (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok"),
            (&Method::GET, "/readyz") => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
                } else if self.pipeline.database.ping().await {
                    plain(StatusCode::OK, "ready")
                } else {
                    plain(StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
                }
            }
            (_, "/") => {
                let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "POST a CloudEvent to /");
                response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("POST"));
                response
            }
            _ => plain(StatusCode::NOT_FOUND, "not found"),
        }
    }

    async fn receive(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Rejection::ShuttingDown.into_response();
        }
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_body_bytes as u64) {
            return Rejection::PayloadTooLarge(self.max_body_bytes).into_response();
        }
        let body = match Limited::new(body, self.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                return Rejection::PayloadTooLarge(self.max_body_bytes).into_response();
            }
            Err(error) => {
                return Rejection::InvalidEvent(format!("the request body could not be read: {error}")).into_response();
            }
        };
        let event = match decode(&parts.headers, Vec::from(body)) {
            Ok(event) => event,
            Err(rejection) => {
                tracing::info!(error = rejection.code(), "{rejection}");
                return rejection.into_response();
            }
        };

        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let app = self.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = app.pipeline.process(&event).await;
            let micros = started.elapsed().as_micros() as u64;
            match &result {
                Ok(processed) => tracing::info!(
                    source = %event.source, id = %event.id, r#type = %event.ty, handler = %processed.handler,
                    status = processed.answer.status, replay = processed.replay, micros, "event processed"
                ),
                Err(rejection) if rejection.status().is_server_error() => tracing::warn!(
                    source = %event.source, id = %event.id, r#type = %event.ty, status = rejection.status().as_u16(),
                    error = rejection.code(), micros, "event not processed, retry expected: {rejection}"
                ),
                Err(rejection) => tracing::info!(
                    source = %event.source, id = %event.id, r#type = %event.ty, status = rejection.status().as_u16(),
                    error = rejection.code(), micros, "event refused: {rejection}"
                ),
            }
            if app.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
                app.idle.notify_waiters();
            }
            result
        });
        match task.await {
            Ok(Ok(processed)) => processed.answer.into_response(processed.replay),
            Ok(Err(rejection)) => rejection.into_response(),
            Err(error) => Rejection::Internal(format!("the event task failed: {error}")).into_response(),
        }
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}
