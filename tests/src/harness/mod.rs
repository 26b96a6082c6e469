//! The crash harness: plays the Knative Kafka dispatcher against a running
//! `exactly`, breaks things while it runs, and checks afterwards that every
//! event was applied exactly once or dead-lettered with a reason.
//!
//! One run ([`run`]):
//!
//! 1. [`postgres`]: a private PostgreSQL cluster (initdb in a temporary
//!    folder), because the harness restarts and crashes it;
//! 2. [`host`]: `exactly serve` on a fixed port, restarted at once
//!    whenever it dies (SIGKILL from the harness, or an abort at an armed
//!    fault point);
//! 3. [`plan`]: the events, from the seed: orders, payments (often before
//!    their order), `test.emit` (replies) and `test.flaky`, reordered, some
//!    marked for a duplicate delivery or for two concurrent deliveries;
//! 4. [`dispatcher`]: concurrent workers delivering them with Knative's
//!    retry rules and a dead-letter store;
//! 5. [`faults`]: SIGKILLs, fault points, PostgreSQL fast and immediate
//!    restarts, `pg_terminate_backend`, flaky-handler windows, at random
//!    moments from the seed;
//! 6. [`checker`]: the verdict, from the database and the ledger.
//!
//! [`Report::summary_line`] is the one line a run prints.
//!
//! The short run is `tests/tests/exactly_once.rs`; the long run is the
//! `harness` binary (`tests/src/bin/harness.rs`).

pub mod checker;
pub mod dispatcher;
pub mod faults;
pub mod host;
pub mod plan;
pub mod postgres;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::prelude::*;
use sqlx::postgres::PgPoolOptions;

use crate::app::{manifest_toml, standard_handlers};
use checker::Verdict;
use dispatcher::{Progress, RetryPolicy};
use faults::{FaultCounts, FaultStats, Injector};
use host::{Host, HostConfig, HostStats};
use plan::PlanConfig;
use postgres::PgCluster;

/// Everything a run is made of.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `exactly` binary; it must be built with the cargo feature
    /// `fault-points` (the workspace's debug build is).
    pub exactly: PathBuf,
    pub events: usize,
    pub seed: u64,
    /// Concurrent dispatcher workers.
    pub workers: usize,
    /// Share of events delivered once more after their success.
    pub duplicate_rate: f64,
    /// Share of events delivered twice at the same time.
    pub concurrent_rate: f64,
    /// Events are shuffled within windows of this many.
    pub reorder_window: usize,
    pub faults: FaultCounts,
    /// Per-event probability of an armed fault point.
    pub fault_probability: f64,
    /// `EXACTLY_FAULTS` for every incarnation of the host, on top of the
    /// armed point (e.g. `after-commit=0.0005`); empty for none.
    pub background_faults: String,
    pub retry: RetryPolicy,
    /// The host's log filter (`EXACTLY_LOG`).
    pub log_filter: String,
    /// Components to use instead of the standard ones from `dist/`, by
    /// handler name (to run the harness against a handler being fixed).
    pub components: Vec<(String, PathBuf)>,
    /// Print each fault as it fires, and progress.
    pub verbose: bool,
    /// Keep the temporary folders (the host's log, PostgreSQL's data)
    /// afterwards; they are always kept when the verdict is not clean.
    pub keep: bool,
}

impl Config {
    /// About a minute: every kind of fault at least once.
    pub fn short(exactly: PathBuf) -> Config {
        Config {
            exactly,
            events: 1500,
            seed: 1,
            workers: 12,
            duplicate_rate: 0.1,
            concurrent_rate: 0.05,
            reorder_window: 48,
            faults: FaultCounts {
                host_kills: 2,
                fault_point_rounds: 1,
                postgres_fast: 2,
                postgres_immediate: 2,
                terminations: 2,
                flaky_windows: 2,
            },
            fault_probability: 0.03,
            background_faults: String::new(),
            retry: RetryPolicy::knative_like(),
            log_filter: "info".to_owned(),
            components: Vec::new(),
            verbose: true,
            keep: false,
        }
    }

    /// A long run: one fault of each kind per 2,500 events (and a round of
    /// the four fault points per 10,000).
    pub fn long(exactly: PathBuf, events: usize, seed: u64) -> Config {
        let per = |every: usize| (events / every).max(1);
        Config {
            events,
            seed,
            workers: 16,
            faults: FaultCounts {
                host_kills: per(2500),
                fault_point_rounds: per(10_000),
                postgres_fast: per(2500),
                postgres_immediate: per(2500),
                terminations: per(2500),
                flaky_windows: per(2500),
            },
            log_filter: "warn".to_owned(),
            ..Config::short(exactly)
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff from 20 ms, capped at 1 s, 30 retries: about
    /// 25 s of retrying, enough to ride out a host restart or a database
    /// restart without dead-lettering.
    pub fn knative_like() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_secs(1),
            limit: 30,
            request_timeout: Duration::from_secs(15),
        }
    }
}

/// Everything a run measured, and the verdict.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub events: usize,
    pub deliveries: u64,
    pub retries: u64,
    pub duplicates: u64,
    pub payments_before_order: usize,
    pub early_payments_retried: u64,
    pub flaky_failures: u64,
    pub host: HostStats,
    pub sigkills_sent: u64,
    pub fault_point_rounds: u64,
    pub postgres_fast: u64,
    pub postgres_immediate: u64,
    pub terminations: u64,
    pub connections_killed: u64,
    pub flaky_windows: u64,
    pub faults_after_traffic: u64,
    pub fault_errors: Vec<String>,
    pub answers: BTreeMap<String, u64>,
    pub verdict: Verdict,
    pub elapsed: Duration,
    /// Where the host's log is (if kept).
    pub host_log: PathBuf,
}

impl Report {
    /// The one line a run prints.
    pub fn summary_line(&self) -> String {
        let fault_points: Vec<String> = self
            .host
            .fault_aborts
            .iter()
            .map(|(point, count)| format!("{point}:{count}"))
            .collect();
        format!(
            "events={} deliveries={} duplicates={} host_kills={} db_restarts={} connections_killed={} \
             dead_lettered={} lost={} applied_twice={} half_applied={} reply_mismatches={} \
             sigkills={} fault_points={} pg_fast={} pg_immediate={} flaky_windows={} flaky_failures={} \
             retries={} early_payments={} unexpected_exits={} seed={} elapsed={:.1}s",
            self.events,
            self.deliveries,
            self.duplicates,
            self.host.crashes(),
            self.postgres_fast + self.postgres_immediate,
            self.connections_killed,
            self.verdict.dead_lettered,
            self.verdict.lost.len(),
            self.verdict.applied_twice.len(),
            self.verdict.half_applied.len(),
            self.verdict.reply_mismatches.len(),
            self.host.sigkills,
            if fault_points.is_empty() {
                "none".to_owned()
            } else {
                fault_points.join(",")
            },
            self.postgres_fast,
            self.postgres_immediate,
            self.flaky_windows,
            self.flaky_failures,
            self.retries,
            self.early_payments_retried,
            self.host.unexpected_exits.len(),
            self.seed,
            self.elapsed.as_secs_f64(),
        )
    }

    /// The answers seen, the host's downtime and every finding.
    pub fn details(&self) -> String {
        let answers: Vec<String> = self
            .answers
            .iter()
            .map(|(label, count)| format!("{label}: {count}"))
            .collect();
        let mut text = format!(
            "answers: {}\nhost: {} starts, {} failed start attempts, down {:.1}s in all; \
             payments placed before their order: {}; faults fired after the traffic ended: {}\n",
            answers.join(", "),
            self.host.starts,
            self.host.failed_starts,
            self.host.downtime.as_secs_f64(),
            self.payments_before_order,
            self.faults_after_traffic,
        );
        for error in &self.fault_errors {
            text.push_str(&format!("fault error: {error}\n"));
        }
        for exit in &self.host.unexpected_exits {
            text.push_str(&format!("unexpected exit: {exit}\n"));
        }
        text.push_str(&self.verdict.report(20));
        text
    }

    /// What makes the run a failure: lost, doubled or half-applied events,
    /// wrong replies, unexpected host exits, faults that could not be
    /// carried out.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.verdict.is_clean() {
            problems.push(format!(
                "the verdict is not clean:\n{}",
                self.verdict.report(20)
            ));
        }
        if !self.host.unexpected_exits.is_empty() {
            problems.push(format!(
                "exactly exited unexpectedly {} time(s)",
                self.host.unexpected_exits.len()
            ));
        }
        if self.host.no_fault_points {
            problems.push(
                "the exactly binary ignores EXACTLY_FAULTS: build it with the cargo feature \
                 fault-points (cargo build --release -p exactly -p exactly-e2e --bins, or the \
                 workspace's debug build)"
                    .to_owned(),
            );
        }
        if !self.fault_errors.is_empty() {
            problems.push(format!("faults failed: {:?}", self.fault_errors));
        }
        problems
    }
}

/// One run of the harness.
pub async fn run(config: Config) -> Result<Report> {
    let started = Instant::now();
    let mut handlers = standard_handlers();
    for (name, component) in &config.components {
        let Some(handler) = handlers.iter_mut().find(|handler| &handler.name == name) else {
            bail!(
                "there is no handler {name} to give the component {}",
                component.display()
            );
        };
        handler.component = std::fs::canonicalize(component)
            .with_context(|| format!("the component {}", component.display()))?;
    }
    for handler in &handlers {
        if !handler.component.is_file() {
            bail!(
                "the component {} is missing: run scripts/build-handlers",
                handler.component.display()
            );
        }
    }
    if !config.exactly.is_file() {
        bail!(
            "the exactly binary {} does not exist",
            config.exactly.display()
        );
    }
    let mut rng = StdRng::seed_from_u64(config.seed);

    let cluster = Arc::new(PgCluster::start().await?);
    let mut dir = tempfile::Builder::new()
        .prefix("exactly-harness-")
        .tempdir()
        .context("create the harness's folder")?;
    let manifest = dir.path().join("handlers.toml");
    std::fs::write(&manifest, manifest_toml(&handlers)).context("write the manifest")?;
    if config.verbose {
        eprintln!(
            "harness: seed {}, {} events, PostgreSQL at {} ({}), host log {}",
            config.seed,
            config.events,
            cluster.database_url(),
            cluster.path().display(),
            dir.path().join("exactly.log").display()
        );
    }

    let host = Host::start(HostConfig {
        binary: config.exactly.clone(),
        port: free_port()?,
        database_url: cluster.database_url(),
        manifest,
        dir: dir.path().to_path_buf(),
        fault_probability: config.fault_probability,
        background_faults: config.background_faults.clone(),
        log_filter: config.log_filter.clone(),
        flags: Vec::new(),
    })
    .await?;
    wait_ready(host.address()).await?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&cluster.database_url())
        .await
        .context("connect to the harness's database")?;

    let events = Arc::new(plan::plan(
        &PlanConfig {
            events: config.events,
            duplicate_rate: config.duplicate_rate,
            concurrent_rate: config.concurrent_rate,
            reorder_window: config.reorder_window,
        },
        &mut rng,
    ));
    let schedule = faults::schedule(&config.faults, events.len(), &mut rng);
    let progress = Arc::new(Progress::default());
    let fault_stats = Arc::new(FaultStats::default());
    let injector = Injector {
        host: host.clone(),
        cluster: cluster.clone(),
        pool: pool.clone(),
        progress: progress.clone(),
        total_events: events.len() as u64,
        stats: fault_stats.clone(),
        verbose: config.verbose,
        started,
    };
    let injector = tokio::spawn(injector.run(schedule));
    let reporter = config.verbose.then(|| {
        let progress = progress.clone();
        let total = events.len();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                eprintln!(
                    "harness: {:>6.1}s  {}/{} events settled, {} deliveries",
                    started.elapsed().as_secs_f64(),
                    progress.settled.load(Ordering::Relaxed),
                    total,
                    progress.deliveries.load(Ordering::Relaxed)
                );
            }
        })
    });

    let ledger = dispatcher::dispatch(
        events.clone(),
        host.address().to_owned(),
        config.workers,
        config.retry.clone(),
        progress.clone(),
    )
    .await;
    injector.await.context("the fault injector panicked")?;
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    host.stop().await;

    let verdict = checker::check(&pool, &events, &ledger).await?;
    pool.close().await;
    let stats = &fault_stats;
    let report = Report {
        seed: config.seed,
        events: events.len(),
        deliveries: progress.deliveries.load(Ordering::Relaxed),
        retries: progress.retries.load(Ordering::Relaxed),
        duplicates: progress.duplicates.load(Ordering::Relaxed),
        payments_before_order: plan::payments_before_order(&events),
        early_payments_retried: progress.early_payments_retried.load(Ordering::Relaxed),
        flaky_failures: progress.flaky_failures.load(Ordering::Relaxed),
        host: host.stats(),
        sigkills_sent: stats.host_kills.load(Ordering::Relaxed),
        fault_point_rounds: stats.fault_point_rounds.load(Ordering::Relaxed),
        postgres_fast: stats.postgres_fast.load(Ordering::Relaxed),
        postgres_immediate: stats.postgres_immediate.load(Ordering::Relaxed),
        terminations: stats.terminations.load(Ordering::Relaxed),
        connections_killed: stats.connections_killed.load(Ordering::Relaxed),
        flaky_windows: stats.flaky_windows.load(Ordering::Relaxed),
        faults_after_traffic: stats.after_traffic.load(Ordering::Relaxed),
        fault_errors: stats.errors.lock().unwrap().clone(),
        answers: ledger.answers.lock().unwrap().clone(),
        verdict,
        elapsed: started.elapsed(),
        host_log: host.log_path().clone(),
    };
    if config.keep || !report.problems().is_empty() {
        cluster.keep();
        dir.disable_cleanup(true);
        eprintln!(
            "harness: kept the host's folder {} (log: {})",
            dir.path().display(),
            report.host_log.display(),
        );
    }
    Ok(report)
}

/// Polls `/readyz` until the host says ready (the database answers).
async fn wait_ready(address: &str) -> Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(format!("{address}/readyz")).send().await
            && response.status().is_success() {
                return Ok(());
            }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("exactly at {address} was not ready within 120 s")
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}
