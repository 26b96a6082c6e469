//! Stored dead letters as `exactly dlq` reads them, and the record of a
//! replay attempt on a row. Timestamps are `YYYY-MM-DDTHH:MM:SS.mmmZ` text
//! on both backends.

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;

use super::decode_error_data;
use crate::database_args::DatabaseArgs;
use crate::storage::{Backend, Database};

/// Which dead letters `exactly dlq list` shows.
pub(super) struct Filter<'a> {
    pub ty: Option<&'a str>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only those not yet replayed successfully.
    pub pending: bool,
    /// At most this many, newest first.
    pub limit: u32,
}

/// Opens the database of a `dlq` command. Unlike `serve` and `migrate` it
/// never creates a SQLite file: a mistyped path is an error, not a new,
/// empty database.
pub(super) async fn connect(args: &DatabaseArgs) -> anyhow::Result<Database> {
    let options = args.db_options();
    if Backend::from_url(&options.url)? == Backend::Sqlite {
        let sqlite = SqliteConnectOptions::from_str(&options.url).context("invalid SQLite URL")?;
        let file = sqlite.get_filename();
        if file != Path::new(":memory:") && !file.exists() {
            bail!("the SQLite database {} does not exist", file.display());
        }
    }
    Database::connect(&options).await
}


/// The text form both backends compare and print timestamps in.
pub(super) fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One stored dead letter.
#[derive(Debug, Clone)]
pub(super) struct DeadLetter {
    pub dead_letter_id: i64,
    pub received_at: String,
    pub last_received_at: String,
    pub deliveries: i64,
    pub source: String,
    pub id: String,
    pub ty: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    pub extensions: serde_json::Map<String, serde_json::Value>,
    pub data: Option<Vec<u8>>,
    pub error_code: Option<String>,
    pub error_data: Option<String>,
    pub error_dest: Option<String>,
    pub replay_attempts: i64,
    pub last_replay_at: Option<String>,
    pub last_replay_to: Option<String>,
    pub last_replay_status: Option<i64>,
    pub last_replay_error: Option<String>,
    pub replayed_at: Option<String>,
    /// Why it is kept as received (see [`super::raw`]); `None` when it was
    /// stored as a valid event.
    pub problem: Option<String>,
    /// The raw form's headers, `name: value\r\n` each.
    pub raw_headers: Option<Vec<u8>>,
}

/// The columns of [`DeadLetter`], timestamps as `YYYY-MM-DDTHH:MM:SS.mmmZ`
/// text on both backends.
const COLUMNS_PG: &str = "dead_letter_id,
    to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS received_at,
    to_char(last_received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS last_received_at,
    deliveries::bigint AS deliveries, source, id, type, subject, time, datacontenttype, dataschema,
    extensions::text AS extensions, data, error_code, error_data, error_dest,
    replay_attempts::bigint AS replay_attempts,
    to_char(last_replay_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS last_replay_at,
    last_replay_to, last_replay_status::bigint AS last_replay_status, last_replay_error,
    to_char(replayed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS replayed_at, problem, raw_headers";
const COLUMNS_SQLITE: &str = "dead_letter_id, received_at, last_received_at, deliveries, source, id, type, subject,
    time, datacontenttype, dataschema, extensions, data, error_code, error_data, error_dest, replay_attempts,
    last_replay_at, last_replay_to, last_replay_status, last_replay_error, replayed_at, problem, raw_headers";

fn dead_letter_from_row<R: Row>(row: &R) -> Result<DeadLetter, sqlx::Error>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let extensions: String = row.try_get(11)?;
    let extensions = match serde_json::from_str(&extensions) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    Ok(DeadLetter {
        dead_letter_id: row.try_get(0)?,
        received_at: row.try_get(1)?,
        last_received_at: row.try_get(2)?,
        deliveries: row.try_get(3)?,
        source: row.try_get(4)?,
        id: row.try_get(5)?,
        ty: row.try_get(6)?,
        subject: row.try_get(7)?,
        time: row.try_get(8)?,
        datacontenttype: row.try_get(9)?,
        dataschema: row.try_get(10)?,
        extensions,
        data: row.try_get(12)?,
        error_code: row.try_get(13)?,
        error_data: row.try_get(14)?,
        error_dest: row.try_get(15)?,
        replay_attempts: row.try_get(16)?,
        last_replay_at: row.try_get(17)?,
        last_replay_to: row.try_get(18)?,
        last_replay_status: row.try_get(19)?,
        last_replay_error: row.try_get(20)?,
        replayed_at: row.try_get(21)?,
        problem: row.try_get(22)?,
        raw_headers: row.try_get(23)?,
    })
}

/// Explains the most likely cause when the table is missing.
fn read_error(error: sqlx::Error) -> anyhow::Error {
    let missing_table = matches!(&error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("42P01") || db.message().contains("no such table"));
    if missing_table {
        anyhow::anyhow!("{error}: the database has no dead-letter table yet; run `exactly migrate` (or `exactly serve`) first")
    } else {
        anyhow::Error::new(error).context("cannot read the dead letters")
    }
}

/// Runs `$sql` with `$bind` applied on either backend's pool and reads
/// every row as a [`DeadLetter`]: the two backends differ only in their SQL.
macro_rules! fetch_dead_letters {
    ($database:expr, $pg:expr, $sqlite:expr, |$query:ident| $bind:expr) => {{
        match $database {
            Database::Postgres(pool) => {
                let $query = sqlx::query(sqlx::AssertSqlSafe($pg));
                let rows = $bind.fetch_all(pool).await.map_err(read_error)?;
                rows.iter().map(dead_letter_from_row).collect::<Result<Vec<_>, _>>()?
            }
            Database::Sqlite(pool) => {
                let $query = sqlx::query(sqlx::AssertSqlSafe($sqlite));
                let rows = $bind.fetch_all(pool).await.map_err(read_error)?;
                rows.iter().map(dead_letter_from_row).collect::<Result<Vec<_>, _>>()?
            }
        }
    }};
}

pub(super) async fn select(database: &Database, args: &Filter<'_>) -> anyhow::Result<Vec<DeadLetter>> {
    let since = args.since.map(timestamp);
    let until = args.until.map(timestamp);
    let limit = i64::from(args.limit);
    Ok(fetch_dead_letters!(
        database,
        format!(
            "SELECT {COLUMNS_PG} FROM exactly.dead_letters
             WHERE ($1::text IS NULL OR type = $1::text)
               AND ($2::text IS NULL OR received_at >= $2::timestamptz)
               AND ($3::text IS NULL OR received_at < $3::timestamptz)
               AND (NOT $4 OR replayed_at IS NULL)
             ORDER BY dead_letter_id DESC LIMIT $5"
        ),
        format!(
            "SELECT {COLUMNS_SQLITE} FROM exactly_dead_letters
             WHERE (?1 IS NULL OR type = ?1)
               AND (?2 IS NULL OR received_at >= ?2)
               AND (?3 IS NULL OR received_at < ?3)
               AND (NOT ?4 OR replayed_at IS NULL)
             ORDER BY dead_letter_id DESC LIMIT ?5"
        ),
        |query| query.bind(args.ty).bind(&since).bind(&until).bind(args.pending).bind(limit)
    ))
}

pub(super) async fn select_one(database: &Database, dead_letter_id: i64) -> anyhow::Result<Option<DeadLetter>> {
    let rows = fetch_dead_letters!(
        database,
        format!("SELECT {COLUMNS_PG} FROM exactly.dead_letters WHERE dead_letter_id = $1"),
        format!("SELECT {COLUMNS_SQLITE} FROM exactly_dead_letters WHERE dead_letter_id = ?1"),
        |query| query.bind(dead_letter_id)
    );
    Ok(rows.into_iter().next())
}

impl DeadLetter {
    pub(super) fn decoded_error(&self) -> Option<String> {
        self.error_data.as_deref().map(decode_error_data)
    }

    /// `event` (a valid CloudEvent, stored attribute by attribute) or `raw`
    /// (kept as received, see [`super::raw`]).
    pub(super) fn stored_as(&self) -> &'static str {
        if self.raw_headers.is_some() { "raw" } else { "event" }
    }

    /// `pending`, `replayed`, or what the last failed replay got.
    pub(super) fn state(&self) -> String {
        if self.replayed_at.is_some() {
            "replayed".to_owned()
        } else if self.replay_attempts > 0 {
            match self.last_replay_status {
                // Accepted, yet pending: delivered again while the replay
                // was under way (see `record`).
                Some(status) if (200..300).contains(&status) => "dead-lettered-again".to_owned(),
                Some(status) => format!("replay-failed({status})"),
                None => "replay-failed".to_owned(),
            }
        } else {
            "pending".to_owned()
        }
    }

    pub(super) fn to_json(&self) -> serde_json::Value {
        let data_text = self.data.as_deref().and_then(|d| std::str::from_utf8(d).ok());
        let data_base64 = self.data.as_deref().map(|d| base64::engine::general_purpose::STANDARD.encode(d));
        serde_json::json!({
            "dead_letter_id": self.dead_letter_id,
            "received_at": self.received_at,
            "last_received_at": self.last_received_at,
            "deliveries": self.deliveries,
            "source": self.source,
            "id": self.id,
            "type": self.ty,
            "subject": self.subject,
            "time": self.time,
            "datacontenttype": self.datacontenttype,
            "dataschema": self.dataschema,
            "extensions": self.extensions,
            "data": data_text,
            "data_base64": data_base64,
            "error_code": self.error_code,
            "error_data": self.error_data,
            "error_data_decoded": self.decoded_error(),
            "error_dest": self.error_dest,
            "state": self.state(),
            "replay_attempts": self.replay_attempts,
            "last_replay_at": self.last_replay_at,
            "last_replay_to": self.last_replay_to,
            "last_replay_status": self.last_replay_status,
            "last_replay_error": self.last_replay_error,
            "replayed_at": self.replayed_at,
            "stored_as": self.stored_as(),
            "problem": self.problem,
            "raw_headers": self.raw_headers.as_deref().map(String::from_utf8_lossy),
            "raw_headers_base64": self.raw_headers.as_deref().map(|h| base64::engine::general_purpose::STANDARD.encode(h)),
        })
    }
}

/// What [`record`] wrote about an attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Recorded {
    /// The attempt is on the row; `replayed_at` moved if it was accepted.
    Attempt,
    /// The target accepted the event, but the dead letter was delivered
    /// again while the replay was under way (`deliveries` moved from what
    /// the replay read): the event failed again, so the row stays pending
    /// and the new failure is not hidden under `replayed_at`.
    DeadLetteredAgain { deliveries: i64 },
}

/// Records one attempt on the dead letter's row. `replayed_at` only moves
/// when the target accepted the event *and* the row's `deliveries` is still
/// `deliveries_seen`, the count read before sending: a delivery of the same
/// dead letter that arrived meanwhile (the replayed event failed again and
/// the dispatcher dead-lettered it back before the target answered) is news
/// an operator must see, so the row stays pending.
///
/// Errors: the row is gone, or the database failed.
pub(super) async fn record(
    database: &Database,
    dead_letter_id: i64,
    deliveries_seen: i64,
    to: &str,
    accepted: bool,
    status: Option<u16>,
    error: Option<&str>,
) -> anyhow::Result<Recorded> {
    let status = status.map(i64::from);
    // The target's answer, quoted: PostgreSQL's text cannot hold U+0000
    // (the attempt went unrecorded), and `dlq list` shows it.
    let error = error.map(|error| crate::printable::printable(error).into_owned());
    let deliveries: Option<i64> = match database {
        Database::Postgres(pool) => sqlx::query_scalar(
            "UPDATE exactly.dead_letters SET replay_attempts = replay_attempts + 1, last_replay_at = now(),
                 last_replay_to = $2, last_replay_status = $3::bigint, last_replay_error = $4,
                 replayed_at = CASE WHEN $5 AND deliveries = $6 THEN now() ELSE replayed_at END
             WHERE dead_letter_id = $1
             RETURNING deliveries::bigint",
        )
        .bind(dead_letter_id)
        .bind(to)
        .bind(status)
        .bind(error)
        .bind(accepted)
        .bind(deliveries_seen)
        .fetch_optional(pool)
        .await?,
        Database::Sqlite(pool) => sqlx::query_scalar(
            "UPDATE exactly_dead_letters SET replay_attempts = replay_attempts + 1,
                 last_replay_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 last_replay_to = ?2, last_replay_status = ?3, last_replay_error = ?4,
                 replayed_at = CASE WHEN ?5 AND deliveries = ?6 THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now') ELSE replayed_at END
             WHERE dead_letter_id = ?1
             RETURNING deliveries",
        )
        .bind(dead_letter_id)
        .bind(to)
        .bind(status)
        .bind(error)
        .bind(accepted)
        .bind(deliveries_seen)
        .fetch_optional(pool)
        .await?,
    };
    match deliveries {
        None => bail!("the row of dead letter {dead_letter_id} is gone"),
        Some(deliveries) if accepted && deliveries != deliveries_seen => Ok(Recorded::DeadLetteredAgain { deliveries }),
        Some(_) => Ok(Recorded::Attempt),
    }
}
