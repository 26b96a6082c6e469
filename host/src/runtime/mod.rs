//! The wasm runtime: handler components compiled once at start-up, a fresh
//! sandboxed instance per event.
//!
//! What it promises to the pipeline: [`Runtime::run`] always hands the
//! event's transaction back, whether the handler returned, failed, trapped
//! or ran out of time, together with the verdict on the run. A handler never
//! sees the transaction itself, only the `tx` import (see [`tx`]), and it
//! gets no ambient capability: no files, environment, arguments or sockets;
//! its stdout and stderr become log lines. Every run is bounded: deadline,
//! memory, optional fuel, statements, rows and bytes per query, log volume.

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: async },
        exports: { default: async },
    });
}

mod log;
pub mod precompile;
mod tx;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::answer::{LimitKind, Rejection};
use crate::decode::CloudEvent;
use crate::manifest::{HandlerSpec, Manifest};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::storage::{EventTx, RowCaps};
use bindings::exactly::handler::types;
use bindings::{Handler, HandlerPre};

/// Host-wide defaults, from the command line; a handler's manifest entry
/// may override each of them.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Duration,
    pub memory_bytes: u64,
    pub max_body_bytes: u64,
    /// How many events can run a handler at once. A run needs a database
    /// connection, so the pool size bounds it; the instance pool is sized
    /// from it.
    pub concurrent_runs: u32,
}

/// The limits one handler's events run under.
#[derive(Debug, Clone, Copy)]
pub struct HandlerLimits {
    pub deadline: Duration,
    pub memory_bytes: u64,
    pub fuel: Option<u64>,
    /// `None`: the connection's default (`--statement-timeout`).
    pub statement_timeout: Option<Duration>,
    pub max_rows: u64,
    pub max_result_bytes: u64,
    pub max_statements: u64,
    pub max_log_bytes: u64,
    pub max_body_bytes: u64,
    /// Bytes of the outcome the host stores and answers: the handler's JSON
    /// result plus its reply event (data, attribute values, extension names
    /// and values); see `pipeline::outcome_size`.
    pub max_reply_bytes: u64,
}

pub const DEFAULT_MAX_ROWS: u64 = 10_000;
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 4 * 1024 * 1024;
pub const DEFAULT_MAX_STATEMENTS: u64 = 1_000;
pub const DEFAULT_MAX_LOG_BYTES: u64 = 1024 * 1024;
/// 1 MiB: the outcome is stored with the claim and sent again on every
/// redelivery, so it is kept to the size of an ordinary event.
pub const DEFAULT_MAX_REPLY_BYTES: u64 = 1024 * 1024;

impl HandlerLimits {
    fn resolve(spec: &HandlerSpec, defaults: &Limits) -> anyhow::Result<Self> {
        let o = &spec.limits;
        let memory_bytes = match o.memory_mib {
            Some(mib) => mib.checked_mul(1024 * 1024).context("memory_mib is too large")?,
            None => defaults.memory_bytes,
        };
        Ok(HandlerLimits {
            deadline: o.deadline.unwrap_or(defaults.deadline),
            memory_bytes,
            fuel: o.fuel.filter(|fuel| *fuel > 0),
            statement_timeout: o.statement_timeout,
            max_rows: o.max_rows.unwrap_or(DEFAULT_MAX_ROWS),
            max_result_bytes: o.max_result_bytes.unwrap_or(DEFAULT_MAX_RESULT_BYTES),
            max_statements: o.max_statements.unwrap_or(DEFAULT_MAX_STATEMENTS),
            max_log_bytes: o.max_log_bytes.unwrap_or(DEFAULT_MAX_LOG_BYTES),
            max_body_bytes: o.max_body_bytes.unwrap_or(defaults.max_body_bytes).min(defaults.max_body_bytes),
            max_reply_bytes: o.max_reply_bytes.unwrap_or(DEFAULT_MAX_REPLY_BYTES),
        })
    }
}

/// How often the epoch advances; a running guest yields at each tick so the
/// deadline can stop it without blocking a tokio worker.
const EPOCH_TICK: Duration = Duration::from_millis(10);

pub struct Runtime {
    engine: Engine,
    by_type: HashMap<String, Arc<LoadedHandler>>,
}

pub struct LoadedHandler {
    pub name: String,
    pub limits: HandlerLimits,
    pre: HandlerPre<EventState>,
}

/// Everything one event's store holds.
pub struct EventState {
    /// The event's transaction, lent to the handler's `tx` calls.
    tx: Option<EventTx>,
    policy: Arc<Policy>,
    handler: Arc<str>,
    event_source: String,
    event_id: String,
    limits: HandlerLimits,
    statements: u64,
    /// Time spent in the handler's statements, for the metrics.
    database_time: Duration,
    log_bytes: u64,
    /// Set by the first failed or refused statement or exceeded limit:
    /// nothing of the event may commit after that, whatever the handler
    /// returns.
    doom: Option<Doom>,
    memory: MemoryGuard,
    wasi: WasiCtx,
    table: ResourceTable,
}

/// Why an event can no longer commit.
#[derive(Debug, Clone)]
enum Doom {
    Refused(String),
    Failed(String),
    Limit(LimitKind, String),
    HostFault(Rejection),
}

/// Refuses memory growth past the handler's cap, and remembers that it did
/// so the answer can say "memory limit" instead of a bare trap.
struct MemoryGuard {
    cap: usize,
    hit: bool,
}

impl ResourceLimiter for MemoryGuard {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl WasiView for EventState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for EventState {}

impl Runtime {
    /// Loads every component of the manifest (precompiled by `exactly
    /// compile` when that is valid, see [`precompile`], else compiled now)
    /// and links it against the host's imports. Any component that cannot be
    /// loaded, or that imports something the host does not provide, stops
    /// the start-up here.
    pub fn new(
        manifest: &Manifest,
        defaults: Limits,
        precompiled_dir: Option<&std::path::Path>,
        metrics: &Metrics,
    ) -> anyhow::Result<Runtime> {
        let resolved = resolve_limits(manifest, &defaults)?;
        let engine = Engine::new(&engine_config(&defaults, &resolved))?;

        let mut linker: Linker<EventState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        let mut by_type = HashMap::new();
        for (spec, limits) in resolved {
            let started = Instant::now();
            let (component, from) = precompile::load(&engine, &spec.component, precompiled_dir)
                .with_context(|| format!("cannot load component {} of handler {}", spec.component.display(), spec.name))?;
            let pre = linker
                .instantiate_pre(&component)
                .and_then(HandlerPre::new)
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!(
                        "component {} of handler {} does not fit the exactly:handler world",
                        spec.component.display(),
                        spec.name
                    )
                })?;
            let took = started.elapsed();
            metrics.handler_loaded(&spec.name, from, took);
            tracing::info!(handler = %spec.name, types = ?spec.types, from = from.label(),
                micros = took.as_micros() as u64, "handler loaded");
            let loaded = Arc::new(LoadedHandler {
                name: spec.name.clone(),
                limits,
                pre,
            });
            for ty in &spec.types {
                by_type.insert(ty.clone(), loaded.clone());
            }
        }

        let ticker = engine.clone();
        std::thread::Builder::new().name("exactly-epoch".into()).spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                ticker.increment_epoch();
            }
        })?;
        Ok(Runtime { engine, by_type })
    }

    /// Every loaded handler, once each.
    pub fn handlers(&self) -> impl Iterator<Item = &Arc<LoadedHandler>> {
        let mut seen = std::collections::HashSet::new();
        self.by_type.values().filter(move |handler| seen.insert(handler.name.clone()))
    }

    pub fn route(&self, event_type: &str) -> Option<&Arc<LoadedHandler>> {
        self.by_type.get(event_type)
    }

    /// Runs `handler` on `event` inside `tx` and gives `tx` back, with the
    /// time the handler's statements spent in the database.
    pub async fn run(
        &self,
        handler: &LoadedHandler,
        guards: &crate::pipeline::Guards,
        event: &CloudEvent,
        mut tx: EventTx,
    ) -> (Option<EventTx>, Result<types::Outcome, Rejection>, Duration) {
        let limits = handler.limits;
        let deadline = Instant::now() + limits.deadline;
        if let Err(rejection) = tx.enter_handler(deadline, guards.sandbox.as_ref()).await {
            return (Some(tx), Err(rejection), Duration::ZERO);
        }

        let stdio_capacity = usize::try_from(limits.max_log_bytes).unwrap_or(usize::MAX);
        let stdio = MemoryOutputPipe::new(stdio_capacity);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = EventState {
            tx: Some(tx),
            policy: guards.policy.clone(),
            handler: Arc::from(handler.name.as_str()),
            event_source: event.source.clone(),
            event_id: event.id.clone(),
            limits,
            statements: 0,
            database_time: Duration::ZERO,
            log_bytes: 0,
            doom: None,
            memory: MemoryGuard { cap: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX), hit: false },
            wasi,
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        if let Some(fuel) = limits.fuel {
            // Fuel metering is on in the engine only when some handler asks.
            let _ = store.set_fuel(fuel);
        }

        let wit_event = to_wit_event(event);
        let call = async {
            let instance = handler.pre.instantiate_async(&mut store).await?;
            instance.call_handle(&mut store, &wit_event).await
        };
        let returned = tokio::time::timeout(limits.deadline, call).await;

        let state = store.data_mut();
        let mut tx = state.tx.take();
        let database_time = state.database_time;
        let printed = stdio.contents();
        log_stdio(&handler.name, event, &printed);
        let stdio_full = printed.len() >= stdio_capacity;
        let log_total = state.log_bytes + printed.len() as u64;
        let run = Run {
            handler: handler.name.clone(),
            doom: state.doom.take(),
            memory_hit: state.memory.hit,
            log_exceeded: stdio_full || log_total > limits.max_log_bytes,
            deadline: limits.deadline,
            // A statement SQLite's progress handler interrupted was cut off
            // by the deadline too: answer it as such, not by which of the
            // two mechanisms noticed first.
            past_deadline: Instant::now() >= deadline,
        };
        let mut verdict = run.judge(returned, &printed);
        if let Some(tx) = tx.as_mut()
            && let Err(rejection) = tx.leave_handler().await
            && verdict.is_ok()
        {
            verdict = Err(rejection);
        }
        (tx, verdict, database_time)
    }
}

/// What the run left behind, to decide the event by.
struct Run {
    handler: String,
    doom: Option<Doom>,
    memory_hit: bool,
    log_exceeded: bool,
    deadline: Duration,
    past_deadline: bool,
}

type Returned = Result<wasmtime::Result<Result<types::Outcome, types::HandlerError>>, tokio::time::error::Elapsed>;

impl Run {
    /// Decides the event. In order: a database outage (503, retry); the
    /// deadline; any other limit; a refused statement (a deterministic bug:
    /// 422); a trap; the handler's own error; and a handler that returns `Ok`
    /// after a failed statement gets 500, since nothing it did can commit.
    fn judge(self, returned: Returned, printed: &[u8]) -> Result<types::Outcome, Rejection> {
        let handler = self.handler;
        let limit = |limit: LimitKind, message: String| Rejection::Limit { handler: handler.clone(), limit, message };
        if let Some(Doom::HostFault(rejection)) = self.doom {
            return Err(rejection);
        }
        let result = match returned {
            Ok(result) if !self.past_deadline => result,
            _ => return Err(Rejection::Deadline { handler, seconds: self.deadline.as_secs_f64() }),
        };
        if let Some(Doom::Limit(kind, message)) = &self.doom {
            return Err(limit(*kind, message.clone()));
        }
        if self.memory_hit {
            return Err(limit(LimitKind::Memory, "linear memory would grow past the cap".into()));
        }
        if self.log_exceeded {
            return Err(limit(LimitKind::LogVolume, "log lines and stdout/stderr exceeded the cap".into()));
        }
        if let Err(error) = &result
            && matches!(error.downcast_ref::<Trap>(), Some(Trap::OutOfFuel))
        {
            return Err(limit(LimitKind::Fuel, "the handler ran out of fuel".into()));
        }
        match (self.doom, result) {
            (Some(Doom::Refused(message)), _) => Err(Rejection::StatementRefused { handler, message }),
            (_, Err(error)) => Err(Rejection::Trap { handler, message: describe_trap(&error, printed) }),
            (_, Ok(Err(types::HandlerError::Permanent(message)))) => Err(Rejection::Permanent { handler, message }),
            (_, Ok(Err(types::HandlerError::Retryable(message)))) => Err(Rejection::Retryable { handler, message }),
            (Some(Doom::Failed(message)), Ok(Ok(_))) => Err(Rejection::StatementFailed { handler, message }),
            (_, Ok(Ok(outcome))) => Ok(outcome),
        }
    }
}

/// Each handler of the manifest with the limits its events run under.
fn resolve_limits<'m>(manifest: &'m Manifest, defaults: &Limits) -> anyhow::Result<Vec<(&'m HandlerSpec, HandlerLimits)>> {
    manifest
        .handlers
        .iter()
        .map(|spec| {
            let limits =
                HandlerLimits::resolve(spec, defaults).with_context(|| format!("limits of handler {}", spec.name))?;
            Ok((spec, limits))
        })
        .collect()
}

/// The engine handlers run in, as `serve` builds it for `manifest` and
/// `defaults`. `exactly compile` uses this very function: code compiled
/// ahead of time only loads into an engine with identical settings.
pub fn engine(manifest: &Manifest, defaults: &Limits) -> anyhow::Result<Engine> {
    let resolved = resolve_limits(manifest, defaults)?;
    Ok(Engine::new(&engine_config(defaults, &resolved))?)
}

/// Bytes of each freed linear memory and table zeroed in place rather than
/// returned to the kernel, and how many decommits go to the kernel at once.
const KEEP_RESIDENT_MEMORY: usize = 128 << 10;
const KEEP_RESIDENT_TABLE: usize = 64 << 10;
const DECOMMIT_BATCH: usize = 16;

/// The engine: epoch interruption for deadlines, fuel when some handler asks
/// for it, and a pooling instance allocator so a fresh instance per event
/// costs a few microseconds (its memory slots are reserved once and reused).
fn engine_config(defaults: &Limits, handlers: &[(&HandlerSpec, HandlerLimits)]) -> Config {
    // Each handler has sessions of its own (`--db-max-connections` on
    // PostgreSQL), so each may run that many events at once: slots for all
    // of them, so that no handler's runs can take another's instances.
    let handler_count = u32::try_from(handlers.len().max(1)).unwrap_or(u32::MAX);
    let slots = defaults.concurrent_runs.saturating_mul(handler_count).saturating_add(4);
    let largest_memory = handlers
        .iter()
        .map(|(_, limits)| limits.memory_bytes)
        .chain([defaults.memory_bytes])
        .max()
        .unwrap_or(defaults.memory_bytes);
    let mut pooling = PoolingAllocationConfig::new();
    pooling
        .total_component_instances(slots)
        // A Rust component holds a few core instances (the program and the
        // adapter shims), one memory and a few tables.
        .total_core_instances(slots.saturating_mul(8))
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots.saturating_mul(8))
        .total_stacks(slots)
        .max_memory_size(usize::try_from(largest_memory).unwrap_or(usize::MAX))
        // Every event frees an instance. Resetting its memory with madvise
        // costs a TLB shootdown across the process's threads each time (the
        // profile's largest kernel item under load). Zero the first 128 KiB
        // with memset instead and decommit the rest in batches: measured
        // with bench/run, 22% less CPU per event than madvise alone (a
        // whole MiB of memset cost more than it saved).
        .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
        .table_keep_resident(KEEP_RESIDENT_TABLE)
        .decommit_batch_size(DECOMMIT_BATCH);
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .consume_fuel(handlers.iter().any(|(_, limits)| limits.fuel.is_some()))
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    config
}

fn to_wit_event(event: &CloudEvent) -> types::Event {
    types::Event {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        specversion: crate::decode::SPEC_VERSION.to_owned(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        dataschema: event.dataschema.clone(),
        extensions: event.extensions.clone(),
        data: event.data.clone(),
    }
}

/// A trap's own message plus the last lines the guest printed (a Rust panic
/// message arrives on stderr), so the dead-lettered event says why.
fn describe_trap(error: &wasmtime::Error, printed: &[u8]) -> String {
    let mut message = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}"),
    };
    let text = String::from_utf8_lossy(printed);
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    if !tail.is_empty() {
        message.push_str("; output: ");
        message.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
    }
    message
}

fn log_stdio(handler: &str, event: &CloudEvent, printed: &[u8]) {
    if printed.is_empty() {
        return;
    }
    let (source, id) = (log::printable(&event.source), log::printable(&event.id));
    for line in String::from_utf8_lossy(printed).lines() {
        let line = log::printable(line);
        tracing::info!(target: "exactly::handler", handler, %source, %id, stdio = true, "{line}");
    }
}

impl EventState {
    fn row_caps(&self) -> RowCaps {
        RowCaps { max_rows: self.limits.max_rows, max_bytes: self.limits.max_result_bytes }
    }
}
