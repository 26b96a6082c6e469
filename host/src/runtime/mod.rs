//! The wasm runtime: handler components compiled once at start-up, a fresh
//! sandboxed instance per event.
//!
//! What it promises to the pipeline: [`Runtime::run`] always hands the
//! event's transaction back, whether the handler returned, failed, trapped
//! or ran out of time, together with the verdict on the run. A handler never
//! sees the transaction itself, only the `tx` import (see [`crate::tx`]), and it
//! gets no ambient capability: no files, environment, arguments or sockets;
//! its stdout and stderr become log lines. Every run is bounded: deadline,
//! memory, optional fuel, statements, rows and bytes per query, log volume.

use crate::bindings;

mod log;
pub mod precompile;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::tx::convert::StatementFault;
use crate::tx::{TxLimits, TxState};
use crate::rejection::{LimitKind, Rejection};
use crate::decode::CloudEvent;
use crate::manifest::{HandlerSpec, Manifest};
use crate::metrics::{InstanceAllocation, Metrics};
use crate::policy::Policy;
use crate::storage::EventTx;
use crate::storage::sqlite_guard::SqliteSandbox;
use bindings::exactly::handler::types;
use bindings::HandlerPre;

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

/// What stands between a handler's SQL and the database.
pub struct Guards {
    /// The first filter: clear refusals, early.
    pub policy: Arc<Policy>,
    /// SQLite only: the authorizer and limits SQLite itself enforces.
    pub sandbox: Option<Arc<SqliteSandbox>>,
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
    /// What the handler's `tx` calls run on and count (see [`crate::tx`]);
    /// its identity fields and its doom are the log's too.
    tx: TxState,
    limits: HandlerLimits,
    log_bytes: u64,
    memory: MemoryGuard,
    wasi: WasiCtx,
    table: ResourceTable,
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
        let (engine, allocation) = build_engine(&defaults, &resolved)?;
        metrics.instance_allocation(allocation);

        let mut linker: Linker<EventState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Each interface on its own: `tx` on the event's TxState (the tx
        // module knows nothing of the runtime), `types` and `log` here.
        types::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        bindings::exactly::handler::log::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        bindings::exactly::handler::tx::add_to_linker::<_, HasSelf<TxState>>(&mut linker, |state: &mut EventState| {
            &mut state.tx
        })?;

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
        guards: &Guards,
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
            tx: TxState {
                session: Some(tx),
                policy: guards.policy.clone(),
                handler: Arc::from(handler.name.as_str()),
                event_source: event.source().to_owned(),
                event_id: event.id().to_owned(),
                limits: TxLimits {
                    max_statements: limits.max_statements,
                    max_rows: limits.max_rows,
                    max_result_bytes: limits.max_result_bytes,
                },
                statements: 0,
                database_time: Duration::ZERO,
                doom: None,
            },
            limits,
            log_bytes: 0,
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
        let mut tx = state.tx.session.take();
        let database_time = state.tx.database_time;
        let printed = stdio.contents();
        log_stdio(&handler.name, event, &printed);
        let stdio_full = printed.len() >= stdio_capacity;
        let log_total = state.log_bytes + printed.len() as u64;
        let run = Run {
            handler: handler.name.clone(),
            doom: state.tx.doom.take(),
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
    doom: Option<StatementFault>,
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
        if let Some(StatementFault::Database(rejection)) = self.doom {
            return Err(rejection);
        }
        let result = match returned {
            Ok(result) if !self.past_deadline => result,
            _ => return Err(Rejection::Deadline { handler, seconds: self.deadline.as_secs_f64() }),
        };
        if let Some(StatementFault::Limit(kind, message)) = &self.doom {
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
            (Some(StatementFault::Refused(message)), _) => Err(Rejection::StatementRefused { handler, message }),
            (_, Err(error)) => Err(Rejection::Trap { handler, message: describe_trap(&error, printed) }),
            (_, Ok(Err(types::HandlerError::Permanent(message)))) => Err(Rejection::Permanent { handler, message }),
            (_, Ok(Err(types::HandlerError::Retryable(message)))) => Err(Rejection::Retryable { handler, message }),
            (Some(StatementFault::Failed(message)), Ok(Ok(_))) => Err(Rejection::StatementFailed { handler, message }),
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

/// The engine `exactly compile` compiles with, for `manifest` and
/// `defaults`. Code compiled ahead of time only loads into an engine with
/// identical settings: this one has every setting [`Runtime::new`]'s engine
/// has except the allocation strategy, which code does not depend on (a
/// unit test checks that the fingerprints agree), so compiling reserves no
/// instance pool.
pub fn engine(manifest: &Manifest, defaults: &Limits) -> anyhow::Result<Engine> {
    let resolved = resolve_limits(manifest, defaults)?;
    let plan = EnginePlan::new(defaults, &resolved);
    Ok(Engine::new(&plan.config(InstanceAllocation::OnDemand))?)
}

/// Bytes of each freed linear memory and table zeroed in place rather than
/// returned to the kernel, and how many decommits go to the kernel at once.
const KEEP_RESIDENT_MEMORY: usize = 128 << 10;
const KEEP_RESIDENT_TABLE: usize = 64 << 10;
const DECOMMIT_BATCH: usize = 16;

/// A wasm page; a linear memory's size is a multiple of it.
const WASM_PAGE: u64 = 64 << 10;
/// The most a 32-bit linear memory can hold.
const WASM32_MEMORY_MAX: u64 = 4 << 30;
/// The inaccessible region after each linear memory. The bounds checks do
/// not rely on it (see [`EnginePlan`]); it is a safety margin that turns
/// a stray access just past a memory into a trap instead of a read of the
/// neighbouring slot.
const MEMORY_GUARD: u64 = 2 << 20;
/// Linear memories per instance slot: a Rust component has one; room for
/// a second.
const MEMORIES_PER_SLOT: u32 = 2;

/// The engine's settings, derived from the limits: how many instances can
/// run at once, how much address space each linear memory gets, and
/// whether fuel is metered.
///
/// Each linear memory reserves the largest memory limit of any handler
/// (rounded up to a wasm page, at most 4 GiB) plus [`MEMORY_GUARD`], not
/// the 4 GiB plus 32 MiB wasmtime reserves by default, so the pool's
/// virtual memory is proportional to the slots times the configured limit.
/// With less than 4 GiB reserved, compiled code checks the bounds of each
/// access explicitly; memories never move (the limiter refuses growth past
/// the limit, so never past the reservation), which lets that check compare
/// with a constant, the reservation, rather than load the memory's current
/// length: an access between the length and the reservation lands on pages
/// that are not mapped and traps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EnginePlan {
    /// Instances that can exist at once.
    slots: u32,
    /// What each linear memory may grow to: the largest handler limit.
    largest_memory: u64,
    /// Address space reserved for each linear memory, guard excluded.
    memory_reservation: u64,
    /// Fuel is metered only when some handler asks for it.
    fuel: bool,
}

impl EnginePlan {
    fn new(defaults: &Limits, handlers: &[(&HandlerSpec, HandlerLimits)]) -> EnginePlan {
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
            .unwrap_or(defaults.memory_bytes)
            .min(WASM32_MEMORY_MAX);
        let memory_reservation = largest_memory.div_ceil(WASM_PAGE).saturating_mul(WASM_PAGE);
        let fuel = handlers.iter().any(|(_, limits)| limits.fuel.is_some());
        EnginePlan { slots, largest_memory, memory_reservation, fuel }
    }

    fn memories(&self) -> u32 {
        self.slots.saturating_mul(MEMORIES_PER_SLOT)
    }

    /// Address space the pool reserves for linear memories: each with its
    /// guard, and one guard before the first. (Instance state, tables and
    /// async stacks add a few MiB per slot: README, "Virtual memory".)
    fn memory_pool_bytes(&self) -> u64 {
        u64::from(self.memories())
            .saturating_mul(self.memory_reservation.saturating_add(MEMORY_GUARD))
            .saturating_add(MEMORY_GUARD)
    }

    /// The engine: epoch interruption for deadlines, fuel when some handler
    /// asks for it, the memory layout above, and either the pooling instance
    /// allocator, so a fresh instance per event costs a few microseconds (its
    /// memory slots are reserved once and reused), or on-demand allocation.
    /// Everything but the allocation strategy is the same for both, so code
    /// compiled for one loads into the other.
    fn config(&self, allocation: InstanceAllocation) -> Config {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(self.fuel)
            .memory_reservation(self.memory_reservation)
            .memory_guard_size(MEMORY_GUARD)
            .memory_may_move(false)
            // Only for a memory that outgrows its reservation, which the
            // limits never allow.
            .memory_reservation_for_growth(0);
        if allocation == InstanceAllocation::Pooling {
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(self.pooling()));
        }
        config
    }

    fn pooling(&self) -> PoolingAllocationConfig {
        let slots = self.slots;
        let mut pooling = PoolingAllocationConfig::new();
        pooling
            .total_component_instances(slots)
            // A Rust component holds a few core instances (the program and the
            // adapter shims), one memory and a few tables.
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(self.memories())
            .total_tables(slots.saturating_mul(8))
            .total_stacks(slots)
            .max_memory_size(usize::try_from(self.largest_memory).unwrap_or(usize::MAX))
            // Every event frees an instance. Resetting its memory with madvise
            // costs a TLB shootdown across the process's threads each time (the
            // profile's largest kernel item under load). Zero the first 128 KiB
            // with memset instead and decommit the rest in batches: measured
            // with bench/run, 22% less CPU per event than madvise alone (a
            // whole MiB of memset cost more than it saved).
            .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
            .table_keep_resident(KEEP_RESIDENT_TABLE)
            .decommit_batch_size(DECOMMIT_BATCH);
        pooling
    }
}

/// Builds the engine [`Runtime::new`] runs handlers in: with the instance
/// pool when its address space can be reserved, else (a virtual-memory
/// limit, typically) with on-demand allocation, said in words in the log.
fn build_engine(
    defaults: &Limits,
    handlers: &[(&HandlerSpec, HandlerLimits)],
) -> anyhow::Result<(Engine, InstanceAllocation)> {
    let plan = EnginePlan::new(defaults, handlers);
    let pool_error = match Engine::new(&plan.config(InstanceAllocation::Pooling)) {
        Ok(engine) => {
            tracing::info!(
                slots = plan.slots,
                memories = plan.memories(),
                memory_reservation_bytes = plan.memory_reservation,
                memory_guard_bytes = MEMORY_GUARD,
                linear_memory_bytes = plan.memory_pool_bytes(),
                "wasm instance pool reserved: {} instances, {} linear memories of {} + {} guard, {} of address space",
                plan.slots,
                plan.memories(),
                mib(plan.memory_reservation),
                mib(MEMORY_GUARD),
                mib(plan.memory_pool_bytes()),
            );
            return Ok((engine, InstanceAllocation::Pooling));
        }
        Err(error) => anyhow::Error::from(error),
    };
    let engine = Engine::new(&plan.config(InstanceAllocation::OnDemand))
        .map_err(anyhow::Error::from)
        .with_context(|| format!("the wasm instance pool could not be created ({pool_error:#}), nor an engine without it"))?;
    let limit_bytes = virtual_memory_limit();
    let limit = match limit_bytes {
        Some(bytes) => format!("the process's virtual memory is limited to {}", mib(bytes)),
        None => "no virtual-memory limit is visible in /proc/self/limits, so something else refused the mapping".to_owned(),
    };
    tracing::warn!(
        error = format!("{pool_error:#}"),
        slots = plan.slots,
        memories = plan.memories(),
        memory_reservation_bytes = plan.memory_reservation,
        memory_guard_bytes = MEMORY_GUARD,
        linear_memory_bytes = plan.memory_pool_bytes(),
        virtual_memory_limit_bytes = limit_bytes,
        "the wasm instance pool could not reserve its address space: {} instances (--db-max-connections × {} handlers + 4) \
         with {} linear memories of {} + {} guard each, {} of virtual memory; {limit} (ulimit -v, or the container runtime's limit). \
         Each event's instance is now allocated on demand instead: it maps its memory when the event starts, a little slower per event, \
         and only running instances hold address space. To get the pool back, raise the limit or lower --handler-memory-mib \
         (or a handler's memory_mib) or --db-max-connections",
        plan.slots,
        handlers.len().max(1),
        plan.memories(),
        mib(plan.memory_reservation),
        mib(MEMORY_GUARD),
        mib(plan.memory_pool_bytes()),
    );
    Ok((engine, InstanceAllocation::OnDemand))
}

/// `bytes` in MiB (GiB from 1 GiB on), for log lines people read.
fn mib(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// The process's virtual-memory limit (`RLIMIT_AS`, `ulimit -v`), from
/// `/proc/self/limits`; `None` when there is none or it cannot be read.
fn virtual_memory_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|line| line.starts_with("Max address space"))?;
    // "Max address space   <soft>   <hard>   bytes": the soft limit applies.
    line.trim_start_matches("Max address space").split_whitespace().next()?.parse().ok()
}

fn to_wit_event(event: &CloudEvent) -> types::Event {
    types::Event {
        id: event.id().to_owned(),
        source: event.source().to_owned(),
        type_: event.ty().to_owned(),
        specversion: crate::decode::SPEC_VERSION.to_owned(),
        subject: event.subject().map(str::to_owned),
        time: event.time().map(str::to_owned),
        datacontenttype: event.datacontenttype().map(str::to_owned),
        dataschema: event.dataschema().map(str::to_owned),
        extensions: event.extensions().to_vec(),
        data: event.data().map(<[u8]>::to_vec),
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
    let (source, id) = (crate::printable::printable(event.source()), crate::printable::printable(event.id()));
    for line in String::from_utf8_lossy(printed).lines() {
        let line = crate::printable::printable(line);
        tracing::info!(target: "exactly::handler", handler, %source, %id, stdio = true, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn defaults(memory_mib: u64, connections: u32) -> Limits {
        Limits {
            deadline: Duration::from_secs(10),
            memory_bytes: memory_mib * MIB,
            max_body_bytes: MIB,
            concurrent_runs: connections,
        }
    }

    fn handler(name: &str, memory_mib: Option<u64>) -> HandlerSpec {
        HandlerSpec {
            name: name.to_owned(),
            component: format!("{name}.wasm").into(),
            types: vec![format!("{name}.happened")],
            migrations: None,
            uses: Vec::new(),
            limits: crate::manifest::LimitOverrides { memory_mib, ..Default::default() },
        }
    }

    fn plan(defaults: &Limits, handlers: &[HandlerSpec]) -> EnginePlan {
        let manifest = Manifest { handlers: handlers.to_vec() };
        EnginePlan::new(defaults, &resolve_limits(&manifest, defaults).unwrap())
    }

    #[test]
    fn the_pool_reserves_what_the_limits_allow_not_4_gib_per_memory() {
        // The defaults: 128 MiB, 16 connections, two handlers.
        let two = [handler("a", None), handler("b", None)];
        let default = plan(&defaults(128, 16), &two);
        assert_eq!(default.slots, 36);
        assert_eq!(default.memory_reservation, 128 * MIB);
        assert_eq!(default.memory_pool_bytes(), 72 * (128 * MIB + MEMORY_GUARD) + MEMORY_GUARD);
        assert!(default.memory_pool_bytes() < 10 << 30, "{}", mib(default.memory_pool_bytes()));

        // Proportional to the limit: a sixteenth of the memory, a sixteenth
        // of the reservation (guards aside).
        let small = plan(&defaults(8, 16), &two);
        assert_eq!(small.memory_reservation * 16, default.memory_reservation);

        // The largest handler limit sizes every slot; an odd size is
        // rounded up to a wasm page; past 4 GiB nothing more is reserved.
        let bigger = plan(&defaults(16, 4), &[handler("a", None), handler("b", Some(100))]);
        assert_eq!((bigger.largest_memory, bigger.memory_reservation), (100 * MIB, 100 * MIB));
        let odd = plan(&Limits { memory_bytes: 100_000, ..defaults(1, 4) }, &[handler("a", None)]);
        assert_eq!((odd.largest_memory, odd.memory_reservation), (100_000, 2 * WASM_PAGE));
        let huge = plan(&defaults(16, 4), &[handler("a", Some(64 * 1024))]);
        assert_eq!((huge.largest_memory, huge.memory_reservation), (WASM32_MEMORY_MAX, WASM32_MEMORY_MAX));
    }

    #[test]
    fn the_default_pool_builds() {
        let two = [handler("a", None), handler("b", None)];
        let plan = plan(&defaults(128, 16), &two);
        Engine::new(&plan.config(InstanceAllocation::Pooling)).expect("the default pool");
    }

    /// `exactly compile` compiles without a pool; `serve` loads that code
    /// into a pooled engine, or an on-demand one after a fallback.
    #[test]
    fn code_compiled_without_the_pool_loads_into_either_engine() {
        let plan = plan(&defaults(16, 2), &[handler("a", None)]);
        let pooled = Engine::new(&plan.config(InstanceAllocation::Pooling)).unwrap();
        let on_demand = Engine::new(&plan.config(InstanceAllocation::OnDemand)).unwrap();
        assert_eq!(precompile::engine_fingerprint(&pooled), precompile::engine_fingerprint(&on_demand));
        let compiled = on_demand.precompile_module(BOUNDS_MODULE).unwrap();
        // SAFETY: these bytes were just produced by `precompile_module`.
        unsafe { wasmtime::Module::deserialize(&pooled, &compiled) }.expect("loads into the pooled engine");
    }

    /// `(module (memory 1) (func (export "load") (param i32) (result i32)
    /// local.get 0 i32.load) (func (export "grow") (param i32) (result i32)
    /// local.get 0 memory.grow))`
    const BOUNDS_MODULE: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
        0x01, 0x06, 0x01, 0x60, 0x01, 0x7f, 0x01, 0x7f, // type 0: (i32) -> i32
        0x03, 0x03, 0x02, 0x00, 0x00, // two functions of type 0
        0x05, 0x03, 0x01, 0x00, 0x01, // one memory, one page, no maximum
        0x07, 0x0f, 0x02, 0x04, b'l', b'o', b'a', b'd', 0x00, 0x00, 0x04, b'g', b'r', b'o', b'w', 0x00, 0x01,
        0x0a, 0x10, 0x02, // code: two bodies
        0x07, 0x00, 0x20, 0x00, 0x28, 0x02, 0x00, 0x0b, // local.get 0, i32.load
        0x06, 0x00, 0x20, 0x00, 0x40, 0x00, 0x0b, // local.get 0, memory.grow
    ];

    /// With less than 4 GiB reserved the compiled code checks bounds
    /// explicitly against the reservation: an access past the memory's
    /// current length, though inside the reservation, must still trap, in
    /// the pool and on demand, before and after the memory grows.
    #[test]
    fn accesses_past_the_memory_trap_with_a_small_reservation() {
        let plan = plan(&defaults(1, 1), &[handler("a", None)]);
        assert_eq!(plan.memory_reservation, MIB);
        for allocation in [InstanceAllocation::Pooling, InstanceAllocation::OnDemand] {
            let engine = Engine::new(&plan.config(allocation)).unwrap();
            let module = wasmtime::Module::new(&engine, BOUNDS_MODULE).unwrap();
            let mut store = Store::new(&engine, ());
            store.set_epoch_deadline(1);
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let load = instance.get_typed_func::<i32, i32>(&mut store, "load").unwrap();
            let grow = instance.get_typed_func::<i32, i32>(&mut store, "grow").unwrap();
            let page = WASM_PAGE as i32;
            let traps = |store: &mut Store<()>, at: i32| match load.call(&mut *store, at) {
                Ok(_) => false,
                Err(error) => {
                    assert_eq!(error.downcast_ref::<Trap>(), Some(&Trap::MemoryOutOfBounds), "{allocation:?} at {at}");
                    true
                }
            };
            assert!(!traps(&mut store, page - 4), "{allocation:?}");
            assert!(traps(&mut store, page - 3), "{allocation:?}");
            assert!(traps(&mut store, page), "{allocation:?}");
            assert!(traps(&mut store, MIB as i32 - 4), "{allocation:?}: inside the reservation, past the memory");
            assert!(traps(&mut store, -4), "{allocation:?}");
            assert_eq!(grow.call(&mut store, 1).unwrap(), 1, "{allocation:?}");
            assert!(!traps(&mut store, 2 * page - 4), "{allocation:?}");
            assert!(traps(&mut store, 2 * page - 3), "{allocation:?}");
            // The whole reservation, and not a page more.
            assert_eq!(grow.call(&mut store, 14).unwrap(), 2, "{allocation:?}");
            assert!(!traps(&mut store, MIB as i32 - 4), "{allocation:?}");
            assert!(traps(&mut store, MIB as i32 - 3), "{allocation:?}");
            assert_eq!(grow.call(&mut store, 1).unwrap(), -1, "{allocation:?}: past the reservation");
        }
    }

    #[test]
    fn sizes_are_written_for_people() {
        assert_eq!(mib(128 * MIB), "128 MiB");
        assert_eq!(mib(MIB + MIB / 2), "1.5 MiB");
        assert_eq!(mib(9362 * MIB), "9.1 GiB");
        assert_eq!(mib(290 << 30), "290.0 GiB");
    }
}
