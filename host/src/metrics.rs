//! Metrics: what `GET /metrics` answers, in the Prometheus text format
//! (version 0.0.4, `prometheus-client`).
//!
//! The seed's three names are kept so its dashboards keep working:
//! `events_processed_total`, `events_deduplicated_total` and
//! `event_processing_duration_seconds`, now labelled by event `type` and
//! `outcome`. The rest say where an event's time went (handler, database),
//! how many are in flight, why events were refused, which sandbox limits
//! were hit, how old the oldest dedup record is (retention) and how each
//! handler was loaded (precompiled or compiled) and how its instances are
//! allocated (the pool, or on demand when the pool did not fit).
//!
//! The event path stays lean: every family is registered once at start-up,
//! and the counters of the manifest's event types are resolved then too (so
//! every `type`/`outcome` pair is exported from the start and `rate()` sees
//! the first event). A duration histogram is resolved the first time its
//! pair occurs, to keep the scrape small. Counting an event is then a hash
//! lookup by `&str` and a few atomic adds, without allocating. Label values never come from the request unchecked:
//! a type no handler serves is counted as `type="(unrouted)"`, so a sender
//! cannot grow the number of series.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::manifest::Manifest;

/// `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `type` label of events whose type no handler serves.
pub const UNROUTED_TYPE: &str = "(unrouted)";

/// A label set: `N` pairs of a static name and a (mostly static) value.
type Labels<const N: usize> = [(&'static str, Cow<'static, str>); N];
type HistogramFamily<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// How an event that reached the dedup transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and its effects committed (2xx).
    Committed,
    /// A redelivery of a committed event: the stored answer was replayed.
    Replayed,
    /// Refused for good (4xx): the broker dead-letters it.
    Rejected,
    /// Not processed this time (5xx): the broker retries it.
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Committed, Outcome::Replayed, Outcome::Rejected, Outcome::Failed];

    /// The outcome of an answer with `status` (`replay`: a stored answer).
    pub fn of(status: u16, replay: bool) -> Outcome {
        match status {
            200..=299 if replay => Outcome::Replayed,
            200..=299 => Outcome::Committed,
            400..=499 => Outcome::Rejected,
            _ => Outcome::Failed,
        }
    }

    /// The value of the `outcome` label (and of the event span's field).
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Committed => "committed",
            Outcome::Replayed => "replayed",
            Outcome::Rejected => "rejected",
            Outcome::Failed => "failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a handler's component was loaded at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedFrom {
    /// Its `.cwasm`, precompiled by `exactly compile`.
    Precompiled,
    /// Compiled from its `.wasm` at start-up.
    Compiled,
}

impl LoadedFrom {
    pub fn label(self) -> &'static str {
        match self {
            LoadedFrom::Precompiled => "precompiled",
            LoadedFrom::Compiled => "compiled",
        }
    }
}

/// How the engine allocates each event's instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceAllocation {
    /// From a pool whose address space is reserved once at start-up: a
    /// fresh instance per event costs a few microseconds.
    Pooling,
    /// Each instance maps its memory when it starts and unmaps it when it
    /// ends; what the runtime falls back to at start-up when the pool's
    /// address space cannot be reserved.
    OnDemand,
}

impl InstanceAllocation {
    pub fn label(self) -> &'static str {
        match self {
            InstanceAllocation::Pooling => "pooling",
            InstanceAllocation::OnDemand => "on-demand",
        }
    }
}

/// The series of one event type: counters resolved at start-up, each
/// histogram on first use.
struct TypeSeries {
    label: Cow<'static, str>,
    processed: [Counter; 4],
    duration: [OnceLock<Histogram>; 4],
    deduplicated: Counter,
}

/// The series of one handler, resolved at start-up.
struct HandlerSeries {
    execution: Histogram,
    database: Histogram,
}

pub struct Metrics {
    registry: Registry,
    by_type: HashMap<String, TypeSeries>,
    unrouted: TypeSeries,
    by_handler: HashMap<String, HandlerSeries>,
    duration: HistogramFamily<2>,
    rejected: Family<Labels<1>, Counter>,
    limit_hits: Family<Labels<2>, Counter>,
    in_flight: Gauge,
    dead_letters: Counter,
    dead_letters_over_quota: Counter,
    dead_letters_expired: Counter,
    dead_letters_oldest_age: Gauge<f64, AtomicU64>,
    dead_letters_pending_bytes: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
    expired: Counter,
    handler_load: Family<Labels<2>, Gauge<f64, AtomicU64>>,
    instance_allocation: Family<Labels<1>, Gauge>,
}

/// Event latencies: 0.25 ms to about 16 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

impl Metrics {
    /// Registers every family, and resolves the series of each event type
    /// and handler of the manifest.
    pub fn new(manifest: &Manifest) -> Metrics {
        let mut registry = Registry::default();
        let processed = Family::<Labels<2>, Counter>::default();
        registry.register(
            "events_processed",
            "Events that reached the dedup transaction, by event type and outcome (committed, replayed, rejected: 4xx, failed: 5xx)",
            processed.clone(),
        );
        let deduplicated = Family::<Labels<1>, Counter>::default();
        registry.register(
            "events_deduplicated",
            "Redeliveries of committed events answered from the stored outcome without running the handler",
            deduplicated.clone(),
        );
        let duration: HistogramFamily<2> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "event_processing_duration_seconds",
            "Time from a decoded event to its answer, by event type and outcome",
            duration.clone(),
        );
        let execution: HistogramFamily<1> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "handler_execution_duration_seconds",
            "Wall-clock time of one handler run (instantiation and call, its statements included)",
            execution.clone(),
        );
        let database: HistogramFamily<1> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "event_database_duration_seconds",
            "Time one event spent waiting on the database: begin, claim, the handler's statements, storing the answer, commit or rollback",
            database.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("events_in_flight", "Events being processed right now", in_flight.clone());
        let rejected = Family::<Labels<1>, Counter>::default();
        registry.register(
            "events_rejected",
            "Non-2xx answers to events, by reason (the kne-exactlyerror code)",
            rejected.clone(),
        );
        let limit_hits = Family::<Labels<2>, Counter>::default();
        registry.register(
            "handler_limit_hits",
            "Handler runs cut off by a sandbox limit, by handler and limit",
            limit_hits.clone(),
        );
        let dead_letters = Counter::default();
        registry.register(
            "dead_letters_stored",
            "Dead-lettered events stored by the dead-letter path",
            dead_letters.clone(),
        );
        let dead_letters_over_quota = Counter::default();
        registry.register(
            "dead_letters_over_quota",
            "Dead letters answered 503 because storing them would exceed --dead-letter-quota",
            dead_letters_over_quota.clone(),
        );
        let dead_letters_expired = Counter::default();
        registry.register(
            "dead_letters_expired",
            "Dead letters (replayed or not) deleted by the retention sweeper after --dead-letter-retention",
            dead_letters_expired.clone(),
        );
        let dead_letters_oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "dead_letters_oldest_age_seconds",
            "Age of the oldest stored dead letter (0 when there is none), measured by the retention sweeper",
            dead_letters_oldest_age.clone(),
        );
        let dead_letters_pending_bytes = Gauge::default();
        registry.register(
            "dead_letters_pending_bytes",
            "Bytes of the dead letters not yet replayed, the total --dead-letter-quota bounds, measured by the retention sweeper",
            dead_letters_pending_bytes.clone(),
        );
        let oldest_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "processed_events_oldest_age_seconds",
            "Age of the oldest dedup record (0 when there is none); retention keeps it below the window plus one sweep",
            oldest_age.clone(),
        );
        let expired = Counter::default();
        registry.register(
            "processed_events_expired",
            "Dedup records deleted by the retention sweeper",
            expired.clone(),
        );
        let handler_load = Family::<Labels<2>, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "handler_load_duration_seconds",
            "Time it took to load each handler's component at start-up, and whether it came precompiled or was compiled",
            handler_load.clone(),
        );
        let instance_allocation = Family::<Labels<1>, Gauge>::default();
        registry.register(
            "handler_instance_allocation",
            "How handler instances are allocated: 1 for the strategy in use, pooling (address space reserved at start-up) or on-demand (the pool's address space could not be reserved; see the start-up log)",
            instance_allocation.clone(),
        );

        let series_of = |ty: Cow<'static, str>| TypeSeries {
            processed: Outcome::ALL.map(|outcome| processed.get_or_create_owned(&type_outcome(ty.clone(), outcome))),
            duration: Default::default(),
            deduplicated: deduplicated.get_or_create_owned(&[("type", ty.clone())]),
            label: ty,
        };
        let mut by_type = HashMap::new();
        let mut by_handler = HashMap::new();
        for handler in &manifest.handlers {
            for ty in &handler.types {
                by_type.insert(ty.clone(), series_of(Cow::Owned(ty.clone())));
            }
            let name: Labels<1> = [("handler", Cow::Owned(handler.name.clone()))];
            by_handler.insert(
                handler.name.clone(),
                HandlerSeries {
                    execution: execution.get_or_create_owned(&name),
                    database: database.get_or_create_owned(&name),
                },
            );
        }
        let unrouted = series_of(Cow::Borrowed(UNROUTED_TYPE));

        Metrics {
            registry,
            by_type,
            unrouted,
            by_handler,
            duration,
            rejected,
            limit_hits,
            in_flight,
            dead_letters,
            dead_letters_over_quota,
            dead_letters_expired,
            dead_letters_oldest_age,
            dead_letters_pending_bytes,
            oldest_age,
            expired,
            handler_load,
            instance_allocation,
        }
    }

    /// The whole registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// Counts an event as in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// An event that reached the dedup transaction has been answered.
    pub fn event_answered(&self, event_type: &str, outcome: Outcome, elapsed: Duration) {
        let series = self.by_type.get(event_type).unwrap_or(&self.unrouted);
        series.processed[outcome.index()].inc();
        series.duration[outcome.index()]
            .get_or_init(|| self.duration.get_or_create_owned(&type_outcome(series.label.clone(), outcome)))
            .observe(elapsed.as_secs_f64());
        if outcome == Outcome::Replayed {
            series.deduplicated.inc();
        }
    }

    /// A non-2xx answer, anywhere on the event path (also before an event
    /// could be decoded).
    pub fn rejected(&self, code: &'static str) {
        self.rejected.get_or_create(&[("reason", Cow::Borrowed(code))]).inc();
    }

    /// A handler run was cut off by `limit` (a limit code, or `deadline`).
    pub fn limit_hit(&self, handler: &str, limit: &'static str) {
        // Rare: allocating the handler label here is fine.
        let labels: Labels<2> = [("handler", Cow::Owned(handler.to_owned())), ("limit", Cow::Borrowed(limit))];
        self.limit_hits.get_or_create(&labels).inc();
    }

    /// Time of one handler run and the event's database time.
    pub fn handler_timings(&self, handler: &str, execution: Option<Duration>, database: Duration) {
        if let Some(series) = self.by_handler.get(handler) {
            if let Some(execution) = execution {
                series.execution.observe(execution.as_secs_f64());
            }
            series.database.observe(database.as_secs_f64());
        }
    }

    /// The dead-letter path stored one dead-lettered event (call it after
    /// the row committed).
    pub fn dead_letter_stored(&self) {
        self.dead_letters.inc();
    }

    /// The dead-letter path answered 503: the quota is full.
    pub fn dead_letter_over_quota(&self) {
        self.dead_letters_over_quota.inc();
    }

    /// The retention sweeper deleted `rows` expired dead letters.
    pub fn dead_letters_expired(&self, rows: u64) {
        self.dead_letters_expired.inc_by(rows);
    }

    /// The retention sweeper's latest reading of the dead letters: the
    /// oldest one's age and the bytes the quota counts.
    pub fn set_dead_letters(&self, oldest_age: Duration, pending_bytes: u64) {
        self.dead_letters_oldest_age.set(oldest_age.as_secs_f64());
        self.dead_letters_pending_bytes.set(i64::try_from(pending_bytes).unwrap_or(i64::MAX));
    }

    /// The retention sweeper's latest reading of the oldest record's age.
    pub fn set_oldest_processed_age(&self, age: Duration) {
        self.oldest_age.set(age.as_secs_f64());
    }

    /// The retention sweeper deleted `rows` expired records.
    pub fn processed_events_expired(&self, rows: u64) {
        self.expired.inc_by(rows);
    }

    /// A handler's component was loaded at start-up.
    pub fn handler_loaded(&self, handler: &str, from: LoadedFrom, took: Duration) {
        let labels: Labels<2> = [("handler", Cow::Owned(handler.to_owned())), ("from", Cow::Borrowed(from.label()))];
        self.handler_load.get_or_create(&labels).set(took.as_secs_f64());
    }

    /// How the runtime allocates handler instances, decided at start-up.
    pub fn instance_allocation(&self, allocation: InstanceAllocation) {
        let labels: Labels<1> = [("strategy", Cow::Borrowed(allocation.label()))];
        self.instance_allocation.get_or_create(&labels).set(1);
    }
}

fn type_outcome(ty: Cow<'static, str>, outcome: Outcome) -> Labels<2> {
    [("type", ty), ("outcome", Cow::Borrowed(outcome.label()))]
}

/// Keeps `events_in_flight` raised while it lives.
pub struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Accumulates where one event's time went, as the pipeline runs it.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventTimings {
    /// The handler run, when there was one.
    pub handler: Option<Duration>,
    /// Every database round trip of the event.
    pub database: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let dir = std::env::temp_dir().join(format!("exactly-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("handlers.toml");
        std::fs::write(&path, "[[handler]]\nname = \"h\"\ncomponent = \"h.wasm\"\ntypes = [\"a.b\"]\n").unwrap();
        Manifest::load(&path).unwrap()
    }

    #[test]
    fn seed_names_and_labels() {
        let metrics = Metrics::new(&manifest());
        metrics.event_answered("a.b", Outcome::Committed, Duration::from_millis(3));
        metrics.event_answered("a.b", Outcome::Replayed, Duration::from_millis(1));
        metrics.event_answered("no.such.type", Outcome::Rejected, Duration::from_millis(1));
        metrics.rejected("no-handler");
        metrics.limit_hit("h", "deadline");
        metrics.dead_letter_stored();
        {
            let _guard = metrics.in_flight();
        }
        let text = metrics.encode();
        assert!(text.contains("# TYPE events_processed_total counter"), "{text}");
        assert!(text.contains("events_processed_total{type=\"a.b\",outcome=\"committed\"} 1"), "{text}");
        assert!(text.contains("events_processed_total{type=\"a.b\",outcome=\"replayed\"} 1"), "{text}");
        assert!(text.contains("events_processed_total{type=\"(unrouted)\",outcome=\"rejected\"} 1"), "{text}");
        assert!(text.contains("events_deduplicated_total{type=\"a.b\"} 1"), "{text}");
        assert!(text.contains("event_processing_duration_seconds_count{type=\"a.b\",outcome=\"committed\"} 1"), "{text}");
        assert!(text.contains("events_rejected_total{reason=\"no-handler\"} 1"), "{text}");
        assert!(text.contains("handler_limit_hits_total{handler=\"h\",limit=\"deadline\"} 1"), "{text}");
        assert!(text.contains("dead_letters_stored_total 1"), "{text}");
        assert!(text.contains("events_in_flight 0"), "{text}");
        assert!(!text.contains("no.such.type"), "{text}");
    }

    #[test]
    fn outcomes_follow_the_status() {
        assert_eq!(Outcome::of(202, false), Outcome::Committed);
        assert_eq!(Outcome::of(200, true), Outcome::Replayed);
        assert_eq!(Outcome::of(422, false), Outcome::Rejected);
        assert_eq!(Outcome::of(503, false), Outcome::Failed);
    }
}
