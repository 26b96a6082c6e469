//! The command line: `exactly serve`, `exactly migrate`, `exactly compile`
//! and `exactly dlq`.
//!
//! Every flag has an environment fallback so the same binary runs unchanged
//! as a Knative Service (configuration by environment) and on a laptop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::database_args::DatabaseArgs;
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::retention::{self, Retention};
use crate::runtime::{Limits, Runtime, precompile};
use crate::server::{self, ServerConfig, Startup};
use crate::storage::{self, Backend, Database, DbOptions, Sessions};

#[derive(Parser, Debug)]
#[command(name = "exactly", version, about = "Exactly-once CloudEvent sink running sandboxed WebAssembly handlers")]
struct Cli {
    /// Log format: `auto` is JSON when stderr is not a terminal (containers)
    /// and human-readable on a terminal.
    #[arg(long, env = "EXACTLY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Auto,
    Json,
    Text,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply migrations, load the handlers and serve CloudEvents over HTTP.
    Serve(ServeArgs),
    /// Apply the host schema and every handler's migrations, then exit.
    Migrate(CommonArgs),
    /// Dead letters stored by `POST /dead-letter`: list them, replay them.
    Dlq(crate::dlq::DlqArgs),
    /// Precompile every handler component of the manifest ahead of time
    /// (`<name>.cwasm` next to each `.wasm`, or in `--out-dir`), so `serve`
    /// starts without compiling. Give it the same `--handler-memory-mib` and
    /// `--db-max-connections` as `serve`: the engine settings must match.
    Compile(CompileArgs),
}

#[derive(Args, Debug)]
struct CompileArgs {
    /// The handler manifest whose components to compile.
    #[arg(long, env = "EXACTLY_HANDLERS", default_value = "handlers.toml")]
    handlers: PathBuf,

    /// Folder for the `.cwasm` files (created if missing); `serve` then
    /// needs `--precompiled-dir` with the same folder. Default: next to each
    /// `.wasm`.
    #[arg(long, env = "EXACTLY_PRECOMPILED_DIR")]
    out_dir: Option<PathBuf>,

    /// As for `serve`.
    #[arg(long, env = "EXACTLY_HANDLER_MEMORY_MIB", default_value_t = 128)]
    handler_memory_mib: u64,

    /// As for `serve` (it sizes the instance pool).
    #[arg(long, env = "EXACTLY_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
}

#[derive(Args, Debug)]
struct CommonArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// The handler manifest (TOML): which component handles which event
    /// types, and where its migrations are.
    #[arg(long, env = "EXACTLY_HANDLERS", default_value = "handlers.toml")]
    handlers: PathBuf,
}

#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,

    /// Address to listen on. Defaults to `0.0.0.0:$PORT`, and `PORT` to 8080.
    #[arg(long, env = "EXACTLY_LISTEN")]
    listen: Option<SocketAddr>,

    /// Port used when `--listen` is not given (Knative sets `PORT`).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,

    /// Do not apply migrations at start-up (run `exactly migrate` instead).
    #[arg(long, env = "EXACTLY_NO_MIGRATE")]
    no_migrate: bool,

    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "EXACTLY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,

    /// Largest dead letter accepted on `POST /dead-letter`, in bytes. Larger
    /// than `--max-body-bytes` on purpose: a dead letter carries the original
    /// event (perhaps refused 413 itself) plus Knative's error report, and a
    /// dead letter refused here is lost.
    #[arg(long, env = "EXACTLY_MAX_DEAD_LETTER_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_dead_letter_bytes: usize,

    /// Wall-clock deadline for one event's handler run.
    #[arg(long, env = "EXACTLY_HANDLER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    handler_timeout: Duration,

    /// Linear-memory cap of one handler instance, in MiB.
    #[arg(long, env = "EXACTLY_HANDLER_MEMORY_MIB", default_value_t = 128)]
    handler_memory_mib: u64,

    /// How long a client may take to send a request body once its headers
    /// arrived; a slower client gets 408.
    #[arg(long, env = "EXACTLY_BODY_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    body_read_timeout: Duration,

    /// How long in-flight events may take to finish after SIGTERM.
    #[arg(long, env = "EXACTLY_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,

    /// How long a processed event's dedup record is kept; a redelivery
    /// after that runs the handler again. `0` or `off`: kept forever.
    #[arg(long, env = "EXACTLY_RETENTION", default_value = "7d", value_parser = parse_retention)]
    retention: RetentionWindow,

    /// Time between two retention sweeps (each also measures the oldest
    /// record's age for the metrics).
    #[arg(long, env = "EXACTLY_RETENTION_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    retention_interval: Duration,

    /// Most expired records deleted by one statement of a sweep.
    #[arg(long, env = "EXACTLY_RETENTION_BATCH", default_value_t = 1000)]
    retention_batch: u32,

    /// Bytes the dead letters not yet replayed may take together (data,
    /// extensions and attribute text); a dead letter that would pass it is
    /// answered 503 (the dispatcher retries) and not stored. A redelivery of
    /// a stored one is still accepted.
    #[arg(long, env = "EXACTLY_DEAD_LETTER_QUOTA", default_value_t = crate::dlq::DEFAULT_QUOTA)]
    dead_letter_quota: u64,

    /// How long a dead letter is kept, replayed or not, counted from its
    /// first delivery; the retention sweeper deletes older ones. `0` or
    /// `off`: kept forever.
    #[arg(long, env = "EXACTLY_DEAD_LETTER_RETENTION", default_value = "30d", value_parser = parse_retention)]
    dead_letter_retention: RetentionWindow,

    /// Folder holding the `.cwasm` files `exactly compile --out-dir` wrote.
    /// Default: next to each `.wasm`.
    #[arg(long, env = "EXACTLY_PRECOMPILED_DIR")]
    precompiled_dir: Option<PathBuf>,
}

/// `--retention`: a window, or none.
#[derive(Debug, Clone, Copy)]
struct RetentionWindow(Option<Duration>);

fn parse_retention(text: &str) -> Result<RetentionWindow, String> {
    retention::parse_window(text).map(RetentionWindow)
}

impl CommonArgs {
    fn db_options(&self) -> DbOptions {
        self.database.db_options()
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            init_logging(cli.log_format, None);
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let traces = init_logging(cli.log_format, Some(runtime.handle()));
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Dlq(args) => crate::dlq::run(args).await,
            Command::Compile(args) => compile(args),
        }
    });
    // Export the spans still batched, while the runtime that sends them
    // is alive.
    if let Some(provider) = traces
        && let Err(error) = provider.shutdown()
    {
        eprintln!("warning: OpenTelemetry: the last spans may not have been exported: {error}");
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exactly stopped");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: CommonArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.handlers)?;
    let database = Database::connect(&args.db_options()).await?;
    database.migrate(&manifest).await?;
    tracing::info!(handlers = manifest.handlers.len(), "migrations applied");
    Ok(())
}

/// The host-wide sandbox limits. `serve` and `compile` both build them
/// here: the engine, and so the compiled code, depends on them.
fn sandbox_limits(
    handler_timeout: Duration,
    handler_memory_mib: u64,
    db_max_connections: u32,
    max_body_bytes: usize,
) -> anyhow::Result<Limits> {
    Ok(Limits {
        deadline: handler_timeout,
        memory_bytes: handler_memory_mib
            .checked_mul(1024 * 1024)
            .context("--handler-memory-mib is too large")?,
        concurrent_runs: db_max_connections,
        max_body_bytes: max_body_bytes as u64,
    })
}

fn compile(args: CompileArgs) -> anyhow::Result<()> {
    let manifest = Manifest::load(&args.handlers)?;
    // Deadline and body size do not reach the engine; the defaults do.
    let limits = sandbox_limits(Duration::from_secs(10), args.handler_memory_mib, args.db_max_connections, 1024 * 1024)?;
    let engine = crate::runtime::engine(&manifest, &limits)?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for handler in &manifest.handlers {
        let compiled = precompile::compile(&engine, &handler.component, args.out_dir.as_deref())
            .with_context(|| format!("handler {}", handler.name))?;
        tracing::info!(handler = %handler.name, cwasm = %compiled.cwasm.display(), bytes = compiled.bytes,
            ms = compiled.took.as_millis() as u64, "handler precompiled");
        println!("{}", compiled.cwasm.display());
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::fault::check_env()?;
    crate::sql_switch::check_env();
    let manifest = Manifest::load(&args.common.handlers)?;
    let limits = sandbox_limits(
        args.handler_timeout,
        args.handler_memory_mib,
        args.common.database.db_max_connections,
        args.max_body_bytes,
    )?;
    let metrics = Arc::new(Metrics::new(&manifest));
    Backend::from_url(&args.common.database.database_url)?;
    // Compile before touching the database: a broken component should fail
    // the start-up at once, not after a migration.
    let runtime = Runtime::new(&manifest, limits, args.precompiled_dir.as_deref(), &metrics)?;
    let retention = Retention {
        window: args.retention.0,
        dead_letter_window: args.dead_letter_retention.0,
        interval: args.retention_interval,
        batch: args.retention_batch,
    };
    // Once the database is there: the sweeper, and the pipeline.
    let pipeline_metrics = metrics.clone();
    let start = move |opened: Opened, runtime| {
        retention::spawn(opened.database.clone(), retention, pipeline_metrics.clone());
        Pipeline::new(opened.database, opened.sessions, runtime, &opened.tables, pipeline_metrics)
    };
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], args.port)));
    let options = args.common.db_options();
    let migrate = !args.no_migrate;
    let startup = match open_database(&options, &manifest, migrate).await {
        Ok(opened) => Startup::Ready(start(opened, runtime)),
        Err(error) if storage::is_transient(&error) => {
            tracing::warn!(
                error = format!("{error:#}"),
                "the database is not reachable: serving 503 and /readyz not ready until it is"
            );
            Startup::Waiting(Box::pin(async move {
                let mut delay = DB_RETRY_FIRST;
                loop {
                    tokio::time::sleep(delay).await;
                    match open_database(&options, &manifest, migrate).await {
                        Ok(opened) => {
                            tracing::info!("the database is reachable: ready");
                            return Ok(start(opened, runtime));
                        }
                        Err(error) if storage::is_transient(&error) => {
                            delay = (delay * 2).min(DB_RETRY_MAX);
                            tracing::warn!(error = format!("{error:#}"), retry_in = ?delay, "the database is still not reachable");
                        }
                        Err(error) => return Err(error),
                    }
                }
            }))
        }
        Err(error) => return Err(error),
    };
    server::run(ServerConfig {
        listen,
        max_body_bytes: args.max_body_bytes,
        max_dead_letter_bytes: args.max_dead_letter_bytes.max(args.max_body_bytes),
        dead_letter_quota: args.dead_letter_quota,
        shutdown_grace: args.shutdown_grace,
        body_read_timeout: args.body_read_timeout,
        startup,
        metrics,
    })
    .await
}

/// Backoff between start-up attempts to reach the database.
const DB_RETRY_FIRST: Duration = Duration::from_millis(250);
const DB_RETRY_MAX: Duration = Duration::from_secs(5);

/// What `serve` needs from the database before it can take events.
struct Opened {
    database: Database,
    sessions: Sessions,
    tables: HashMap<String, Vec<String>>,
}

/// Connects, applies the migrations (unless told not to), reads each
/// handler's tables from the database and opens each handler's sessions.
async fn open_database(options: &DbOptions, manifest: &Manifest, migrate: bool) -> anyhow::Result<Opened> {
    let database = Database::connect(options).await?;
    if migrate {
        database.migrate(manifest).await?;
    }
    let tables = database.handler_tables(manifest).await?;
    let statement_timeouts = manifest
        .handlers
        .iter()
        .filter_map(|handler| Some((handler.name.clone(), handler.limits.statement_timeout?)))
        .collect();
    let sessions = database.sessions(manifest, options, &statement_timeouts).await?;
    Ok(Opened { database, sessions, tables })
}

/// Logs to stderr, and when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (and a
/// runtime is there to send them), exports the spans as well: the provider
/// returned is to be shut down at the end, which flushes the last batch.
fn init_logging(
    format: LogFormat,
    runtime: Option<&tokio::runtime::Handle>,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use std::io::IsTerminal;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("EXACTLY_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let mut export_error = None;
    let provider = match (crate::otel::configured_endpoint(), runtime) {
        (Some(_), Some(runtime)) => match crate::otel::exporter(runtime.clone()) {
            Ok(provider) => Some(provider),
            Err(error) => {
                export_error = Some(error);
                None
            }
        },
        _ => None,
    };
    let traces = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("exactly")));
    let registry = tracing_subscriber::registry().with(filter).with(traces);
    if json {
        registry
            .with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr))
            .init();
    } else {
        registry.with(fmt::layer().with_writer(std::io::stderr)).init();
    }
    if let Some(error) = export_error {
        tracing::warn!(error = format!("{error:#}"), "OpenTelemetry export is off: its exporter cannot be built");
    } else if let Some(endpoint) = provider.as_ref().and(crate::otel::configured_endpoint()) {
        tracing::info!(%endpoint, "exporting spans over OTLP/HTTP");
    }
    provider
}
