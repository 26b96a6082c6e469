//! Retention: dedup records expire.
//!
//! Every committed event leaves one row in the processed-events table; left
//! alone the table grows forever. A record only has to outlive the window in
//! which the broker may still redeliver its event (Kafka's topic retention,
//! the Trigger's retries and backoff, a dead-letter replay), so rows older
//! than `--retention` (default 7 days) are deleted by a background sweeper.
//!
//! The trade-off, on purpose: a redelivery that arrives after its record
//! expired is a new event to `exactly`, and its handler runs again. Choose
//! the window longer than anything that can redeliver.
//!
//! The sweeper never holds up event traffic: it deletes at most
//! `--retention-batch` rows per statement, oldest first through the
//! `processed_at` index, each statement its own short transaction, and
//! pauses between statements so that events queue behind at most one batch
//! (SQLite has a single writer). On PostgreSQL it skips rows another
//! transaction holds, so several replicas can sweep at once. After each
//! sweep it measures the oldest record's age for
//! `processed_events_oldest_age_seconds`; with retention off it still does
//! that, so the growth is visible.
//!
//! Dead letters expire too, after `--dead-letter-retention` (default 30
//! days) counted from their first delivery (`received_at`): replayed ones
//! and ones never replayed alike, since `POST /dead-letter` is open to
//! anyone who reaches the port and what it stores must not outlive a
//! bounded window. The same sweep deletes them, in the same batches, and
//! measures the oldest one's age and the bytes the quota counts
//! (`dead_letters_oldest_age_seconds`, `dead_letters_pending_bytes`).

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;
use crate::storage::Database;

/// How the sweeper runs.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Records older than this are deleted; `None`: kept forever.
    pub window: Option<Duration>,
    /// Dead letters first received longer ago than this are deleted,
    /// replayed or not; `None`: kept forever.
    pub dead_letter_window: Option<Duration>,
    /// Time between two sweeps.
    pub interval: Duration,
    /// Most rows deleted by one statement.
    pub batch: u32,
}

/// Pause between two batches of one sweep: events waiting for the database
/// (on SQLite, for its one writer connection) go first.
const BATCH_PAUSE: Duration = Duration::from_millis(50);

/// Parses `--retention`: a duration (`7d`, `12h`, `1s`), or `0` / `off`
/// for no expiry.
pub fn parse_window(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") || text == "0" {
        return Ok(None);
    }
    let window = humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration like 7d or 12h, nor off: {e}"))?;
    Ok(Some(window).filter(|window| !window.is_zero()))
}

/// Starts the sweeper on the current tokio runtime. It runs until the
/// process exits; a failed sweep is logged and tried again next time.
pub fn spawn(database: Database, retention: Retention, metrics: Arc<Metrics>) {
    match retention.window {
        Some(window) => tracing::info!(window = ?window, interval = ?retention.interval, batch = retention.batch, "retention: records expire"),
        None => tracing::info!("retention is off: dedup records are kept forever"),
    }
    match retention.dead_letter_window {
        Some(window) => tracing::info!(window = ?window, "retention: dead letters expire, replayed or not"),
        None => tracing::info!("dead-letter retention is off: dead letters are kept forever"),
    }
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(retention.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if let Some(window) = retention.window {
                sweep(&database, window, retention.batch.max(1), &metrics).await;
            }
            match oldest_age(&database).await {
                Ok(age) => metrics.set_oldest_processed_age(age.unwrap_or_default()),
                Err(error) => tracing::debug!(%error, "retention: cannot read the oldest record's age"),
            }
            if let Some(window) = retention.dead_letter_window {
                sweep_dead_letters(&database, window, retention.batch.max(1), &metrics).await;
            }
            match dead_letter_usage(&database).await {
                Ok((age, bytes)) => metrics.set_dead_letters(age.unwrap_or_default(), bytes),
                Err(error) => tracing::debug!(%error, "retention: cannot measure the dead letters"),
            }
        }
    });
}

/// Deletes every expired record, one batch at a time.
async fn sweep(database: &Database, window: Duration, batch: u32, metrics: &Metrics) {
    sweep_in_batches("dedup records", batch, || delete_expired(database, window, batch), |deleted| {
        metrics.processed_events_expired(deleted)
    })
    .await
}

/// Deletes every expired dead letter, one batch at a time.
async fn sweep_dead_letters(database: &Database, window: Duration, batch: u32, metrics: &Metrics) {
    sweep_in_batches("dead letters", batch, || delete_expired_dead_letters(database, window, batch), |deleted| {
        metrics.dead_letters_expired(deleted)
    })
    .await
}

/// Runs `delete` (one batch of at most `batch` rows) until a batch comes
/// back short, pausing between batches; counts each batch with `count`. A
/// failure ends this sweep; the next one tries again.
async fn sweep_in_batches<F, Fut>(what: &str, batch: u32, mut delete: F, count: impl Fn(u64))
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut total = 0u64;
    loop {
        match delete().await {
            Ok(deleted) => {
                total += deleted;
                count(deleted);
                if deleted < u64::from(batch) {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, deleted = total, "retention: deleting expired {what} failed; trying again next sweep");
                return;
            }
        }
        tokio::time::sleep(BATCH_PAUSE).await;
    }
    if total > 0 {
        tracing::info!(deleted = total, "retention: expired {what} deleted");
    }
}

/// Deletes up to `batch` records older than `window`, oldest first, and
/// returns how many it deleted. Ages are measured by the database's clock,
/// the one that stamped `processed_at`.
pub async fn delete_expired(database: &Database, window: Duration, batch: u32) -> Result<u64, sqlx::Error> {
    delete_batch(
        database,
        "DELETE FROM exactly.processed_events WHERE (source, id) IN (
             SELECT source, id FROM exactly.processed_events
             WHERE processed_at < now() - make_interval(secs => $1)
             ORDER BY processed_at LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        "DELETE FROM exactly_processed_events WHERE (source, id) IN (
             SELECT source, id FROM exactly_processed_events
             WHERE processed_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))
             ORDER BY processed_at LIMIT ?2)",
        window,
        batch,
    )
    .await
}

/// Runs one batch delete: the backend's statement, with `$1`/`?1` the
/// window in seconds and `$2`/`?2` the batch size; returns the rows deleted.
async fn delete_batch(
    database: &Database,
    postgres: &'static str,
    sqlite: &'static str,
    window: Duration,
    batch: u32,
) -> Result<u64, sqlx::Error> {
    let seconds = window.as_secs_f64();
    Ok(match database {
        Database::Postgres(pool) => {
            sqlx::query(postgres).bind(seconds).bind(i64::from(batch)).execute(pool).await?.rows_affected()
        }
        Database::Sqlite(pool) => {
            sqlx::query(sqlite).bind(seconds).bind(i64::from(batch)).execute(pool).await?.rows_affected()
        }
    })
}

/// Deletes up to `batch` dead letters first received longer than `window`
/// ago, replayed or not, oldest first through the `received_at` index; returns
/// how many it deleted.
pub async fn delete_expired_dead_letters(
    database: &Database,
    window: Duration,
    batch: u32,
) -> Result<u64, sqlx::Error> {
    delete_batch(
        database,
        "DELETE FROM exactly.dead_letters WHERE dead_letter_id IN (
             SELECT dead_letter_id FROM exactly.dead_letters
             WHERE received_at < now() - make_interval(secs => $1)
             ORDER BY received_at LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        "DELETE FROM exactly_dead_letters WHERE dead_letter_id IN (
             SELECT dead_letter_id FROM exactly_dead_letters
             WHERE received_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', printf('-%.3f seconds', ?1))
             ORDER BY received_at LIMIT ?2)",
        window,
        batch,
    )
    .await
}

/// Age of the oldest dead letter (`None` when there is none) and the bytes
/// of the dead letters not yet replayed (what the quota counts).
pub async fn dead_letter_usage(database: &Database) -> Result<(Option<Duration>, u64), sqlx::Error> {
    let (seconds, bytes): (Option<f64>, i64) = match database {
        Database::Postgres(pool) => {
            sqlx::query_as(
                "SELECT EXTRACT(EPOCH FROM now() - min(received_at))::float8,
                        coalesce(sum(stored_bytes) FILTER (WHERE replayed_at IS NULL), 0)::bigint
                 FROM exactly.dead_letters",
            )
            .fetch_one(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            sqlx::query_as(
                "SELECT (julianday('now') - julianday(min(received_at))) * 86400.0,
                        coalesce(sum(CASE WHEN replayed_at IS NULL THEN stored_bytes END), 0)
                 FROM exactly_dead_letters",
            )
            .fetch_one(pool)
            .await?
        }
    };
    Ok((seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0))), u64::try_from(bytes).unwrap_or(0)))
}

/// Age of the oldest record, `None` when there is none.
pub async fn oldest_age(database: &Database) -> Result<Option<Duration>, sqlx::Error> {
    let seconds: Option<f64> = match database {
        Database::Postgres(pool) => {
            sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM now() - min(processed_at))::float8 FROM exactly.processed_events",
            )
            .fetch_one(pool)
            .await?
        }
        Database::Sqlite(pool) => {
            sqlx::query_scalar(
                "SELECT (julianday('now') - julianday(min(processed_at))) * 86400.0 FROM exactly_processed_events",
            )
            .fetch_one(pool)
            .await?
        }
    };
    Ok(seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("7d"), Ok(Some(Duration::from_secs(7 * 86400))));
        assert_eq!(parse_window("1s"), Ok(Some(Duration::from_secs(1))));
        assert_eq!(parse_window("250ms"), Ok(Some(Duration::from_millis(250))));
        assert_eq!(parse_window("off"), Ok(None));
        assert_eq!(parse_window("0"), Ok(None));
        assert_eq!(parse_window("0s"), Ok(None));
        assert!(parse_window("soon").is_err());
    }
}
