//! The wasm runtime: handler components compiled once at start-up, a fresh
//! sandboxed instance per event.
//!
//! What it promises to the pipeline: [`Runtime::run`] always hands the
//! event's transaction back, whether the handler returned, failed, trapped
//! or ran out of time, together with the verdict on the run. A handler never
//! sees the transaction itself, only the `tx` import (see [`tx`]), and it
//! gets no ambient capability: no files, environment, arguments or sockets;
//! its stdout and stderr become log lines.

pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        imports: { default: async },
        exports: { default: async },
    });
}

mod log;
mod tx;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::answer::Rejection;
use crate::decode::CloudEvent;
use crate::manifest::Manifest;
use crate::policy::Policy;
use crate::storage::EventTx;
use bindings::exactly::handler::types;
use bindings::{Handler, HandlerPre};

/// Sandbox limits applied to every event.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Duration,
    pub memory_bytes: u64,
    /// How many events can run a handler at once. A run needs a database
    /// connection, so the pool size bounds it; the instance pool is sized
    /// from it.
    pub concurrent_runs: u32,
}

/// How often the epoch advances; a running guest yields at each tick so the
/// deadline can stop it without blocking a tokio worker.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Cap on what a handler may print to stdout/stderr during one event.
const STDIO_CAPACITY: usize = 256 * 1024;

pub struct Runtime {
    engine: Engine,
    by_type: HashMap<String, Arc<LoadedHandler>>,
    limits: Limits,
}

pub struct LoadedHandler {
    pub name: String,
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
    /// Set by the first failed or refused statement: nothing of the event
    /// may commit after that, whatever the handler returns.
    doom: Option<Doom>,
    limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
}

/// Why an event can no longer commit.
#[derive(Debug, Clone)]
enum Doom {
    Refused(String),
    Failed(String),
    HostFault(Rejection),
}

impl WasiView for EventState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for EventState {}

impl Runtime {
    /// Compiles every component of the manifest and links it against the
    /// host's imports. Any component that cannot be loaded, or that imports
    /// something the host does not provide, stops the start-up here.
    pub fn new(manifest: &Manifest, limits: Limits) -> anyhow::Result<Runtime> {
        let engine = Engine::new(&engine_config(&limits))?;

        let mut linker: Linker<EventState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        let mut by_type = HashMap::new();
        for spec in &manifest.handlers {
            let started = std::time::Instant::now();
            let component = Component::from_file(&engine, &spec.component)
                .map_err(anyhow::Error::from)
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
            tracing::info!(handler = %spec.name, types = ?spec.types, ms = started.elapsed().as_millis() as u64, "handler compiled");
            let loaded = Arc::new(LoadedHandler { name: spec.name.clone(), pre });
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
        Ok(Runtime { engine, by_type, limits })
    }

    pub fn route(&self, event_type: &str) -> Option<&Arc<LoadedHandler>> {
        self.by_type.get(event_type)
    }

    /// Runs `handler` on `event` inside `tx` and gives `tx` back.
    pub async fn run(
        &self,
        handler: &LoadedHandler,
        event: &CloudEvent,
        tx: EventTx,
        policy: Arc<Policy>,
    ) -> (Option<EventTx>, Result<types::Outcome, Rejection>) {
        let stdio = MemoryOutputPipe::new(STDIO_CAPACITY);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdio.clone())
            .stderr(stdio.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limits = StoreLimitsBuilder::new()
            .memory_size(usize::try_from(self.limits.memory_bytes).unwrap_or(usize::MAX))
            .build();
        let state = EventState {
            tx: Some(tx),
            policy,
            handler: Arc::from(handler.name.as_str()),
            event_source: event.source.clone(),
            event_id: event.id.clone(),
            doom: None,
            limits,
            wasi,
            table: ResourceTable::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);

        let wit_event = to_wit_event(event);
        let call = async {
            let instance = handler.pre.instantiate_async(&mut store).await?;
            instance.call_handle(&mut store, &wit_event).await
        };
        let returned = tokio::time::timeout(self.limits.deadline, call).await;

        let state = store.data_mut();
        let tx = state.tx.take();
        let doom = state.doom.take();
        let printed = stdio.contents();
        log_stdio(&handler.name, event, &printed);
        let name = handler.name.clone();
        let verdict = match returned {
            Err(_elapsed) => Err(Rejection::Deadline { handler: name, seconds: self.limits.deadline.as_secs_f64() }),
            Ok(Err(error)) => Err(match doom {
                Some(Doom::HostFault(rejection)) => rejection,
                Some(Doom::Refused(message)) => Rejection::StatementRefused { handler: name, message },
                _ => Rejection::Trap { handler: name, message: describe_trap(&error, &printed) },
            }),
            Ok(Ok(result)) => judge(name, doom, result),
        };
        (tx, verdict)
    }
}

/// The engine: epoch interruption for deadlines, and a pooling instance
/// allocator so a fresh instance per event costs a few microseconds (its
/// memory slots are reserved once and reused).
fn engine_config(limits: &Limits) -> Config {
    let slots = limits.concurrent_runs.saturating_add(4);
    let mut pooling = PoolingAllocationConfig::new();
    pooling
        .total_component_instances(slots)
        // A Rust component holds a few core instances (the program and the
        // adapter shims), one memory and a few tables.
        .total_core_instances(slots.saturating_mul(8))
        .total_memories(slots.saturating_mul(2))
        .total_tables(slots.saturating_mul(8))
        .total_stacks(slots)
        .max_memory_size(usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX));
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    config
}

/// Decides the event from the handler's own result and the statements it
/// ran. A database outage outranks everything (503, retry); a refused
/// statement is a deterministic bug (422); then the handler's own error;
/// and a handler that returns `Ok` after a failed statement gets 500, since
/// nothing it did can commit.
fn judge(handler: String, doom: Option<Doom>, result: Result<types::Outcome, types::HandlerError>) -> Result<types::Outcome, Rejection> {
    match (doom, result) {
        (Some(Doom::HostFault(rejection)), _) => Err(rejection),
        (Some(Doom::Refused(message)), _) => Err(Rejection::StatementRefused { handler, message }),
        (_, Err(types::HandlerError::Permanent(message))) => Err(Rejection::Permanent { handler, message }),
        (_, Err(types::HandlerError::Retryable(message))) => Err(Rejection::Retryable { handler, message }),
        (Some(Doom::Failed(message)), Ok(_)) => Err(Rejection::StatementFailed { handler, message }),
        (None, Ok(outcome)) => Ok(outcome),
    }
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
    for line in String::from_utf8_lossy(printed).lines() {
        tracing::info!(target: "exactly::handler", handler, source = %event.source, id = %event.id, stdio = true, "{line}");
    }
}
