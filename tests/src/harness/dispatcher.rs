//! The Knative Kafka dispatcher, played by the harness.
//!
//! At-least-once delivery with the dispatcher's rules: 5xx, 404, 408, 409,
//! 429 and transport errors (refused connection, reset, timeout) are
//! retried with exponential backoff up to a retry limit; any other non-2xx,
//! and a 2xx whose body is not a CloudEvent, goes to the dead-letter store
//! with the reason; so does an event whose retries ran out. A 2xx is a
//! success, and a reply CloudEvent in it (binary mode) is collected.
//!
//! On top of that, what a real broker does now and then, on purpose and
//! often: a duplicate delivery after the success (the offset commit was
//! lost), two deliveries of the same event at the same time (a consumer
//! group rebalance), and delivery out of order (see [`super::plan`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::plan::{Kind, PlannedEvent};

/// The Trigger's `delivery` settings.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// `backoffDelay`: the first retry waits this long, each next one twice
    /// as long as the one before…
    pub base: Duration,
    /// …but never longer than this.
    pub cap: Duration,
    /// `retry`: retries after the first attempt.
    pub limit: u32,
    /// `timeout` of one HTTP request.
    pub request_timeout: Duration,
}

impl RetryPolicy {
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// A 2xx answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Success {
    pub status: u16,
    /// The reply CloudEvent's id, type and source, if there was one.
    pub reply: Option<ReplyEvent>,
    /// `exactly-replay: true`.
    pub replay: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyEvent {
    pub id: String,
    pub type_: String,
    pub source: String,
}

/// Why a delivery should be retried or dead-lettered.
#[derive(Clone, Debug)]
enum Verdict {
    Done(Success),
    Retry(String),
    DeadLetter(String),
}

/// What happened to one event, over all of its deliveries.
#[derive(Clone, Debug, Default)]
pub struct EventRecord {
    /// Every 2xx answer, in the order they came.
    pub successes: Vec<Success>,
    /// Whether the first delivery (or one of two concurrent ones) ended in
    /// a success.
    pub delivered: bool,
    /// The dead-letter reason, if the event went there.
    pub dead_letter: Option<String>,
    /// A duplicate (deliberate or concurrent) that was dead-lettered
    /// although the event itself succeeded: Knative would have put a
    /// processed event in the dead-letter sink.
    pub duplicate_dead_letters: Vec<String>,
    /// Successes of deliberate duplicates that did not say
    /// `exactly-replay: true` (the handler ran again?).
    pub duplicate_not_replayed: u64,
    /// HTTP attempts for this event.
    pub attempts: u64,
}

/// Counters the fault injector and the summary read while the run goes.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events whose first delivery settled (success or dead letter).
    pub settled: AtomicU64,
    /// HTTP attempts.
    pub deliveries: AtomicU64,
    /// Attempts that were retries.
    pub retries: AtomicU64,
    /// Deliveries that were deliberate duplicates or the second of two
    /// concurrent ones (their retries not counted).
    pub duplicates: AtomicU64,
    /// `test.flaky` events answered 500 `retryable` (the flag was set).
    pub flaky_failures: AtomicU64,
    /// `order.payment` events answered 500 `retryable` (the order was not
    /// in yet).
    pub early_payments_retried: AtomicU64,
}

/// The dead-letter store and every event's record.
pub struct Ledger {
    pub records: Vec<Mutex<EventRecord>>,
    /// How the attempts were answered: `202`, `503 database-unavailable`,
    /// `transport`…
    pub answers: Mutex<BTreeMap<String, u64>>,
}

enum Task {
    First(usize),
    Duplicate(usize),
}

/// Delivers every event with `workers` concurrent workers and returns the
/// ledger once every event and every duplicate settled.
pub async fn dispatch(
    events: Arc<Vec<PlannedEvent>>,
    address: String,
    workers: usize,
    policy: RetryPolicy,
    progress: Arc<Progress>,
) -> Arc<Ledger> {
    let ledger = Arc::new(Ledger {
        records: events
            .iter()
            .map(|_| Mutex::new(EventRecord::default()))
            .collect(),
        answers: Mutex::new(BTreeMap::new()),
    });
    let queue = Arc::new(Mutex::new(
        (0..events.len()).map(Task::First).collect::<VecDeque<_>>(),
    ));
    // Tasks not finished yet: duplicates are queued by the workers, so an
    // empty queue does not mean the end.
    let pending = Arc::new(AtomicU64::new(events.len() as u64));
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(policy.request_timeout)
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let url = format!("{address}/");

    let mut handles = Vec::new();
    for _ in 0..workers.max(1) {
        let worker = Worker {
            events: events.clone(),
            ledger: ledger.clone(),
            progress: progress.clone(),
            client: client.clone(),
            url: url.clone(),
            policy: policy.clone(),
        };
        let queue = queue.clone();
        let pending = pending.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let task = queue.lock().unwrap().pop_front();
                let Some(task) = task else {
                    if pending.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                match task {
                    Task::First(index) => {
                        let succeeded = worker.first_delivery(index).await;
                        worker.progress.settled.fetch_add(1, Ordering::SeqCst);
                        if succeeded && worker.events[index].duplicate {
                            // Redelivered later, behind whatever is queued
                            // now (another worker, another moment).
                            pending.fetch_add(1, Ordering::SeqCst);
                            queue.lock().unwrap().push_back(Task::Duplicate(index));
                        }
                    }
                    Task::Duplicate(index) => worker.duplicate_delivery(index).await,
                }
                pending.fetch_sub(1, Ordering::SeqCst);
            }
        }));
    }
    for handle in handles {
        handle.await.expect("a dispatcher worker panicked");
    }
    ledger
}

struct Worker {
    events: Arc<Vec<PlannedEvent>>,
    ledger: Arc<Ledger>,
    progress: Arc<Progress>,
    client: reqwest::Client,
    url: String,
    policy: RetryPolicy,
}

impl Worker {
    /// The first delivery: one, or two at the same time. True when the
    /// event succeeded.
    async fn first_delivery(&self, index: usize) -> bool {
        let event = &self.events[index];
        let outcome = if event.concurrent {
            self.progress.duplicates.fetch_add(1, Ordering::Relaxed);
            let (a, b) = tokio::join!(self.deliver(index), self.deliver(index));
            match (a, b) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(reason), Err(_)) => Err(reason),
                (Ok(()), Err(reason)) | (Err(reason), Ok(())) => {
                    self.ledger.records[index]
                        .lock()
                        .unwrap()
                        .duplicate_dead_letters
                        .push(format!("one of two concurrent deliveries: {reason}"));
                    Ok(())
                }
            }
        } else {
            self.deliver(index).await
        };
        let mut record = self.ledger.records[index].lock().unwrap();
        match outcome {
            Ok(()) => {
                record.delivered = true;
                true
            }
            Err(reason) => {
                record.dead_letter = Some(reason);
                false
            }
        }
    }

    /// A deliberate redelivery of an event that already succeeded.
    async fn duplicate_delivery(&self, index: usize) {
        self.progress.duplicates.fetch_add(1, Ordering::Relaxed);
        let before = self.ledger.records[index].lock().unwrap().successes.len();
        let outcome = self.deliver(index).await;
        let mut record = self.ledger.records[index].lock().unwrap();
        match outcome {
            Ok(()) => {
                let not_replayed = record.successes[before..]
                    .iter()
                    .filter(|success| !success.replay)
                    .count();
                record.duplicate_not_replayed += not_replayed as u64;
            }
            Err(reason) => record
                .duplicate_dead_letters
                .push(format!("deliberate duplicate: {reason}")),
        }
    }

    /// One delivery with retries: Ok once a 2xx came, Err(the dead-letter
    /// reason) otherwise.
    async fn deliver(&self, index: usize) -> Result<(), String> {
        let event = &self.events[index];
        let mut last = String::new();
        for attempt in 0..=self.policy.limit {
            if attempt > 0 {
                tokio::time::sleep(self.policy.delay(attempt - 1)).await;
                self.progress.retries.fetch_add(1, Ordering::Relaxed);
            }
            self.progress.deliveries.fetch_add(1, Ordering::Relaxed);
            self.ledger.records[index].lock().unwrap().attempts += 1;
            let (label, verdict) = self.attempt(event).await;
            *self
                .ledger
                .answers
                .lock()
                .unwrap()
                .entry(label.clone())
                .or_default() += 1;
            match verdict {
                Verdict::Done(success) => {
                    self.ledger.records[index]
                        .lock()
                        .unwrap()
                        .successes
                        .push(success);
                    return Ok(());
                }
                Verdict::DeadLetter(reason) => return Err(reason),
                Verdict::Retry(reason) => {
                    if label == "500 retryable" {
                        match event.kind {
                            Kind::Flaky => {
                                self.progress.flaky_failures.fetch_add(1, Ordering::Relaxed);
                            }
                            Kind::Payment { .. } => {
                                self.progress
                                    .early_payments_retried
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            _ => {}
                        }
                    }
                    last = reason;
                }
            }
        }
        Err(format!(
            "retries exhausted ({} attempts); the last answer: {last}",
            self.policy.limit + 1
        ))
    }

    /// One HTTP attempt: a label for the statistics and the verdict.
    async fn attempt(&self, event: &PlannedEvent) -> (String, Verdict) {
        let mut request = self.client.post(&self.url);
        for (name, value) in event.headers() {
            request = request.header(name, value);
        }
        let response = match request.body(event.data_bytes()).send().await {
            Ok(response) => response,
            Err(error) => {
                return (
                    "transport".to_owned(),
                    Verdict::Retry(format!("transport error: {error}")),
                );
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(error) => {
                return (
                    "transport".to_owned(),
                    Verdict::Retry(format!("transport error reading the body: {error}")),
                );
            }
        };
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        if (200..300).contains(&status) {
            let replay = header("exactly-replay").as_deref() == Some("true");
            let label = format!("{status}{}", if replay { " replay" } else { "" });
            let reply = match (header("ce-id"), header("ce-type"), header("ce-source")) {
                (Some(id), Some(type_), Some(source)) if header("ce-specversion").is_some() => {
                    Some(ReplyEvent { id, type_, source })
                }
                _ if body.is_empty() => None,
                _ => {
                    return (
                        label,
                        Verdict::DeadLetter(format!(
                            "HTTP {status} whose body is not a CloudEvent: {}",
                            String::from_utf8_lossy(&body)
                                .chars()
                                .take(200)
                                .collect::<String>()
                        )),
                    );
                }
            };
            return (
                label,
                Verdict::Done(Success {
                    status,
                    reply,
                    replay,
                }),
            );
        }
        let code = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|json| {
                json.get("error")
                    .and_then(|e| e.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "-".to_owned());
        let label = format!("{status} {code}");
        let reason = format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(300)
                .collect::<String>()
        );
        let verdict = if status >= 500 || matches!(status, 404 | 408 | 409 | 429) {
            Verdict::Retry(reason)
        } else {
            Verdict::DeadLetter(reason)
        };
        (label, verdict)
    }
}
