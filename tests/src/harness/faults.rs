//! Faults at random moments of the run.
//!
//! The schedule is drawn from the seed up front: each fault is placed at a
//! random point of the run's progress (the number of events whose first
//! delivery has settled), so faults hit the traffic wherever the run is
//! fast or slow. The injector fires them one after the other as the
//! progress passes their points.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::prelude::*;
use sqlx::PgPool;

use super::dispatcher::Progress;
use super::host::Host;
use super::postgres::{PgCluster, StopMode};

/// The fault points of the host (`host/src/fault.rs`).
pub const FAULT_POINTS: [&str; 4] = [
    "after-claim",
    "after-handler",
    "before-commit",
    "after-commit",
];

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// SIGKILL `exactly`; the supervisor restarts it at once.
    KillHost,
    /// SIGKILL `exactly` and restart it with these fault points armed, one
    /// per incarnation: each crashes the host once, at that step of an
    /// event's transaction.
    ArmFaultPoints(Vec<String>),
    /// `pg_ctl stop -m fast`, down for a while, start.
    PostgresFast { down: Duration },
    /// `pg_ctl stop -m immediate` (crash recovery on start), down for a
    /// while, start.
    PostgresImmediate { down: Duration },
    /// `pg_terminate_backend` on every connection of the host's.
    TerminateConnections,
    /// Set the `fail` flag: `test.flaky` events fail (retryably) until it
    /// is cleared again.
    FlakyWindow { length: Duration },
}

impl Fault {
    pub fn label(&self) -> String {
        match self {
            Fault::KillHost => "SIGKILL exactly".to_owned(),
            Fault::ArmFaultPoints(points) => {
                format!("SIGKILL exactly, arm {}", points.join(" then "))
            }
            Fault::PostgresFast { down } => format!("PostgreSQL fast restart (down {down:?})"),
            Fault::PostgresImmediate { down } => {
                format!("PostgreSQL immediate restart (down {down:?})")
            }
            Fault::TerminateConnections => {
                "pg_terminate_backend on exactly's connections".to_owned()
            }
            Fault::FlakyWindow { length } => format!("test.flaky fails for {length:?}"),
        }
    }
}

/// How many faults of each kind a run gets.
#[derive(Clone, Debug)]
pub struct FaultCounts {
    pub host_kills: usize,
    /// `ArmFaultPoints` actions; each arms all four points in a random
    /// order.
    pub fault_point_rounds: usize,
    pub postgres_fast: usize,
    pub postgres_immediate: usize,
    pub terminations: usize,
    pub flaky_windows: usize,
}

/// A fault and the progress at which it fires.
#[derive(Clone, Debug)]
pub struct Scheduled {
    pub at: u64,
    pub fault: Fault,
}

/// Places the faults between 3 % and 70 % of the events (fault-point
/// rounds before 40 %, so that all four points have traffic to fire on).
pub fn schedule(counts: &FaultCounts, events: usize, rng: &mut StdRng) -> Vec<Scheduled> {
    let events = events as f64;
    let at = |rng: &mut StdRng, from: f64, to: f64| (events * rng.random_range(from..to)) as u64;
    let mut scheduled = Vec::new();
    for _ in 0..counts.host_kills {
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.7),
            fault: Fault::KillHost,
        });
    }
    for _ in 0..counts.fault_point_rounds {
        let mut points: Vec<String> = FAULT_POINTS.iter().map(|p| (*p).to_owned()).collect();
        points.shuffle(rng);
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.4),
            fault: Fault::ArmFaultPoints(points),
        });
    }
    for _ in 0..counts.postgres_fast {
        let down = Duration::from_millis(rng.random_range(0..1500));
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.7),
            fault: Fault::PostgresFast { down },
        });
    }
    for _ in 0..counts.postgres_immediate {
        let down = Duration::from_millis(rng.random_range(0..1500));
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.7),
            fault: Fault::PostgresImmediate { down },
        });
    }
    for _ in 0..counts.terminations {
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.7),
            fault: Fault::TerminateConnections,
        });
    }
    for _ in 0..counts.flaky_windows {
        let length = Duration::from_millis(rng.random_range(500..2500));
        scheduled.push(Scheduled {
            at: at(rng, 0.03, 0.7),
            fault: Fault::FlakyWindow { length },
        });
    }
    scheduled.sort_by_key(|s| s.at);
    scheduled
}

/// What the injector did.
#[derive(Debug, Default)]
pub struct FaultStats {
    pub fired: AtomicU64,
    pub host_kills: AtomicU64,
    pub fault_point_rounds: AtomicU64,
    pub postgres_fast: AtomicU64,
    pub postgres_immediate: AtomicU64,
    pub terminations: AtomicU64,
    pub connections_killed: AtomicU64,
    pub flaky_windows: AtomicU64,
    /// Faults that fired after every event had settled (no traffic left).
    pub after_traffic: AtomicU64,
    /// Faults that could not be carried out (with why), e.g. PostgreSQL did
    /// not come back.
    pub errors: std::sync::Mutex<Vec<String>>,
}

pub struct Injector {
    pub host: Host,
    pub cluster: Arc<PgCluster>,
    /// The harness's own connections to the host's database.
    pub pool: PgPool,
    pub progress: Arc<Progress>,
    pub total_events: u64,
    pub stats: Arc<FaultStats>,
    pub verbose: bool,
    pub started: Instant,
}

impl Injector {
    /// Fires every scheduled fault in order, each once the progress passed
    /// its point (or once the traffic is over).
    pub async fn run(self, schedule: Vec<Scheduled>) {
        for scheduled in schedule {
            loop {
                let settled = self.progress.settled.load(Ordering::SeqCst);
                if settled >= scheduled.at {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if self.progress.settled.load(Ordering::SeqCst) >= self.total_events {
                self.stats.after_traffic.fetch_add(1, Ordering::Relaxed);
            }
            if self.verbose {
                eprintln!(
                    "harness: {:>6.1}s  at {:>6} settled events: {}",
                    self.started.elapsed().as_secs_f64(),
                    self.progress.settled.load(Ordering::SeqCst),
                    scheduled.fault.label()
                );
            }
            if let Err(error) = self.fire(&scheduled.fault).await {
                let message = format!("{}: {error:#}", scheduled.fault.label());
                eprintln!("harness: fault failed: {message}");
                self.stats.errors.lock().unwrap().push(message);
            }
            self.stats.fired.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn fire(&self, fault: &Fault) -> anyhow::Result<()> {
        let stats = &self.stats;
        let pool = &self.pool;
        match fault {
            Fault::KillHost => {
                self.host.kill(Vec::new()).await;
                stats.host_kills.fetch_add(1, Ordering::Relaxed);
            }
            Fault::ArmFaultPoints(points) => {
                self.host.kill(points.clone()).await;
                stats.host_kills.fetch_add(1, Ordering::Relaxed);
                stats.fault_point_rounds.fetch_add(1, Ordering::Relaxed);
            }
            Fault::PostgresFast { down } => {
                self.cluster.restart(StopMode::Fast, *down).await?;
                stats.postgres_fast.fetch_add(1, Ordering::Relaxed);
            }
            Fault::PostgresImmediate { down } => {
                self.cluster.restart(StopMode::Immediate, *down).await?;
                stats.postgres_immediate.fetch_add(1, Ordering::Relaxed);
            }
            Fault::TerminateConnections => {
                // The host may have no connection open at this very moment
                // (just restarted): try for a while until one is killed.
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut killed = 0;
                while killed == 0 && Instant::now() < deadline {
                    killed = retry_sql(|| async move {
                        sqlx::query_scalar::<_, i64>(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) \
                             FROM pg_stat_activity WHERE application_name = 'exactly' \
                             AND pid <> pg_backend_pid()",
                        )
                        .fetch_one(pool)
                        .await
                    })
                    .await?;
                    if killed == 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                stats.terminations.fetch_add(1, Ordering::Relaxed);
                stats
                    .connections_killed
                    .fetch_add(killed as u64, Ordering::Relaxed);
            }
            Fault::FlakyWindow { length } => {
                retry_sql(|| async move {
                    sqlx::query(
                        "INSERT INTO test_flags (name) VALUES ('fail') ON CONFLICT DO NOTHING",
                    )
                    .execute(pool)
                    .await
                })
                .await?;
                tokio::time::sleep(*length).await;
                retry_sql(|| async move {
                    sqlx::query("DELETE FROM test_flags WHERE name = 'fail'")
                        .execute(pool)
                        .await
                })
                .await?;
                stats.flaky_windows.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// Runs a statement of the harness's own until it succeeds, for up to two
/// minutes: the database may be restarting.
pub async fn retry_sql<T, F, Fut>(mut statement: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match statement().await {
            Ok(value) => return Ok(value),
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}
