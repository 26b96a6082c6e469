//! Dead letters: `exactly` as the Knative Trigger's dead-letter sink.
//!
//! When the Knative Kafka dispatcher gives up on an event (a non-retryable
//! answer, or the retries ran out) it posts the event to the Trigger's
//! dead-letter sink with three extensions added: `knativeerrorcode` (the
//! last HTTP status), `knativeerrordata` (the last answer's body, base64)
//! and `knativeerrordest` (where it was going). `POST /dead-letter` stores
//! that event whole in the host table `exactly.dead_letters`
//! (`exactly_dead_letters` on SQLite) and answers 202 only once the row is
//! committed; any database trouble answers 503 so the dispatcher retries.
//! No handler runs on this path.
//!
//! Deduplication: Knative delivers to the dead-letter sink at least once,
//! so one dead letter can arrive several times. Its identity is
//! `(source, id, payload, knativeerrordest)` — the payload as in the dedup
//! transaction (type, subject, datacontenttype, dataschema, data), so two
//! different events that reuse one `(source, id)` stay two dead letters —
//! and it is unique among rows *not yet replayed*: a redelivery only bumps
//! the row's `deliveries`, while an event that is dead-lettered again after
//! an accepted replay gets a new row (it failed again, and that is news).
//!
//! `exactly dlq list` shows the stored dead letters with the error decoded;
//! `exactly dlq replay <id…> --to <url>` sends each original event again
//! (binary mode, same attributes, extensions and data; the three
//! `knativeerror*` extensions are left out) and records the attempt on its
//! row: `replayed_at` is set only when the target answered 2xx.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::sqlite::SqliteConnectOptions;

use crate::answer::{Body, Rejection};
use crate::cli::DatabaseArgs;
use crate::decode::{CloudEvent, SPEC_VERSION};
use crate::storage::{Backend, Database, classify};

/// The path the Knative Trigger's `delivery.deadLetterSink` points at.
pub const PATH: &str = "/dead-letter";

/// The extensions the Knative dispatcher adds to a dead-lettered event.
pub const ERROR_CODE: &str = "knativeerrorcode";
pub const ERROR_DATA: &str = "knativeerrordata";
pub const ERROR_DEST: &str = "knativeerrordest";

/// How much of a failed replay's answer is kept on the row and printed.
const REPLAY_ERROR_BYTES: usize = 1024;

/// What [`store`] did with a delivered dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A new row, `dead_letter_id`.
    New(i64),
    /// A redelivery of the pending dead letter `dead_letter_id`; its
    /// `deliveries` was bumped.
    Redelivery(i64),
}

/// `--dead-letter-quota`'s default: 1 GiB of dead letters not yet replayed.
pub const DEFAULT_QUOTA: u64 = 1024 * 1024 * 1024;

/// The bytes a dead letter stores, as the quota counts them: its data, its
/// extensions as stored (the JSON text, Knative's three included) and the
/// text of its attributes. The same sum as migration 0004's for older rows.
pub fn stored_bytes(event: &CloudEvent, extensions_json: &str) -> u64 {
    let optional = |value: &Option<String>| value.as_ref().map_or(0, String::len);
    (event.data.as_ref().map_or(0, Vec::len)
        + extensions_json.len()
        + event.source.len()
        + event.id.len()
        + event.ty.len()
        + optional(&event.subject)
        + optional(&event.time)
        + optional(&event.datacontenttype)
        + optional(&event.dataschema)) as u64
}

/// Stores a dead-lettered event; `Ok` means the row is committed.
///
/// The quota: the bytes of the dead letters not yet replayed, this one
/// included, at most `quota`, or [`Rejection::DeadLetterQuota`] (503) and
/// nothing stored. A redelivery of a stored dead letter stores nothing new
/// and is accepted whatever the total. The check is a `SUM` over the
/// partial index of pending rows' sizes, in the insert's transaction, after
/// the insert, and only for a new row. Chosen over a running total (a
/// counter row kept by triggers) because it cannot drift, whatever deletes
/// or replays rows, and because dead letters are rare: the sum reads an
/// index of one small entry per pending dead letter. Race-tolerant by
/// construction: on SQLite the writer is single (`BEGIN IMMEDIATE`), so
/// the check is exact; on PostgreSQL two dead letters stored at the same
/// instant each miss the other's uncommitted row, so the total may pass the
/// quota by at most the dead letters in flight at once (each at most
/// `--max-dead-letter-bytes`), and the next one is refused.
pub async fn store(database: &Database, event: &CloudEvent, quota: u64) -> Result<Stored, Rejection> {
    let extension = |name: &str| event.extensions.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let (code, data, dest) = (extension(ERROR_CODE), extension(ERROR_DATA), extension(ERROR_DEST));
    let extensions: serde_json::Map<String, serde_json::Value> = event
        .extensions
        .iter()
        .map(|(name, value)| (name.clone(), serde_json::Value::String(value.clone())))
        .collect();
    let extensions = serde_json::Value::Object(extensions).to_string();
    let size = stored_bytes(event, &extensions);
    let dedup_key = dedup_key(event, dest.as_deref());
    // One statement for both backends but for the SQL text: insert, or
    // count a redelivery of a dead letter not yet replayed.
    macro_rules! insert {
        ($tx:expr, $sql:expr, $sum:expr) => {{
            let row = sqlx::query($sql)
                .bind(&event.source)
                .bind(&event.id)
                .bind(&event.ty)
                .bind(&event.subject)
                .bind(&event.time)
                .bind(&event.datacontenttype)
                .bind(&event.dataschema)
                .bind(&extensions)
                .bind(&event.data)
                .bind(&code)
                .bind(&data)
                .bind(&dest)
                .bind(&dedup_key[..])
                .bind(i64::try_from(size).unwrap_or(i64::MAX))
                .fetch_one(&mut *$tx)
                .await
                .map_err(unavailable)?;
            let stored = (row.try_get::<i64, _>(0).map_err(unavailable)?, row.try_get::<i64, _>(1).map_err(unavailable)?);
            if stored.1 == 1 {
                let pending: i64 = sqlx::query_scalar($sum).fetch_one(&mut *$tx).await.map_err(unavailable)?;
                let pending = u64::try_from(pending).unwrap_or(0);
                if pending > quota {
                    $tx.rollback().await.map_err(unavailable)?;
                    return Err(Rejection::DeadLetterQuota { size, pending: pending.saturating_sub(size), quota });
                }
            }
            $tx.commit().await.map_err(unavailable)?;
            stored
        }};
    }
    let stored = match database {
        Database::Postgres(pool) => {
            let mut tx = pool.begin().await.map_err(unavailable)?;
            insert!(
                tx,
                "INSERT INTO exactly.dead_letters
                     (source, id, type, subject, time, datacontenttype, dataschema, extensions, data,
                      error_code, error_data, error_dest, dedup_key, stored_bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (dedup_key) WHERE replayed_at IS NULL DO UPDATE
                     SET deliveries = exactly.dead_letters.deliveries + 1, last_received_at = now()
                 RETURNING dead_letter_id, deliveries::bigint AS deliveries",
                "SELECT coalesce(sum(stored_bytes), 0)::bigint FROM exactly.dead_letters WHERE replayed_at IS NULL"
            )
        }
        Database::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?;
            insert!(
                tx,
                "INSERT INTO exactly_dead_letters
                     (source, id, type, subject, time, datacontenttype, dataschema, extensions, data,
                      error_code, error_data, error_dest, dedup_key, stored_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (dedup_key) WHERE replayed_at IS NULL DO UPDATE
                     SET deliveries = deliveries + 1,
                         last_received_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 RETURNING dead_letter_id, deliveries",
                "SELECT coalesce(sum(stored_bytes), 0) FROM exactly_dead_letters WHERE replayed_at IS NULL"
            )
        }
    };
    let (dead_letter_id, deliveries) = stored;
    if deliveries == 1 {
        tracing::info!(
            source = %event.source, id = %event.id, r#type = %event.ty, code = code.as_deref().unwrap_or(""),
            dest = dest.as_deref().unwrap_or(""), dead_letter_id, "dead letter stored"
        );
        Ok(Stored::New(dead_letter_id))
    } else {
        tracing::info!(
            source = %event.source, id = %event.id, r#type = %event.ty, code = code.as_deref().unwrap_or(""),
            dead_letter_id, deliveries, "dead letter redelivered; already stored"
        );
        Ok(Stored::Redelivery(dead_letter_id))
    }
}

/// The answer to a stored dead letter: 202, empty body.
pub fn accepted() -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::ACCEPTED;
    response
}

/// sha256 of the event's payload (as the dedup transaction hashes it), its
/// `(source, id)` and the dead letter's destination, each length-prefixed.
fn dedup_key(event: &CloudEvent, dest: Option<&str>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [event.source.as_bytes(), event.id.as_bytes(), &event.payload_sha256()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    match dest {
        None => hasher.update([0u8]),
        Some(dest) => {
            hasher.update([1u8]);
            hasher.update(dest.as_bytes());
        }
    }
    hasher.finalize().into()
}

/// Every failure to store a dead letter is the database's, and retryable:
/// losing a dead letter is not an option, so the dispatcher must try again.
fn unavailable(error: sqlx::Error) -> Rejection {
    match classify(error) {
        rejection @ (Rejection::Busy(_) | Rejection::DatabaseUnavailable(_)) => rejection,
        other => Rejection::DatabaseUnavailable(format!("the dead letter could not be stored: {other}")),
    }
}

/// `knativeerrordata` decoded for people: the base64 Knative sends, as text
/// when it is UTF-8. Anything else is shown as it came.
pub fn decode_error_data(raw: &str) -> String {
    match base64::engine::general_purpose::STANDARD.decode(raw.trim()) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => format!("({} bytes, not UTF-8) {raw}", error.as_bytes().len()),
        },
        Err(_) => raw.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// The command line: `exactly dlq list` and `exactly dlq replay`.

#[derive(Args, Debug)]
pub struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List stored dead letters, newest first, with the error decoded.
    List(ListArgs),
    /// Send dead letters' original events again and record that it was done.
    Replay(ReplayArgs),
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// Only dead letters of this event type.
    #[arg(long = "type")]
    ty: Option<String>,

    /// Only dead letters received at or after this time: RFC 3339
    /// (`2026-11-27T14:00:00Z`) or a duration back from now (`1h`, `2d`).
    #[arg(long, value_parser = parse_time_bound)]
    since: Option<DateTime<Utc>>,

    /// Only dead letters received before this time (same forms as `--since`).
    #[arg(long, value_parser = parse_time_bound)]
    until: Option<DateTime<Utc>>,

    /// Only dead letters not yet replayed successfully.
    #[arg(long)]
    pending: bool,

    /// At most this many (the newest).
    #[arg(long, default_value_t = 100)]
    limit: u32,

    /// A JSON array instead of a table: every stored field, the error data
    /// both raw (base64) and decoded.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    database: DatabaseArgs,

    /// The dead letters' ids (the first column of `exactly dlq list`).
    #[arg(required = true)]
    ids: Vec<i64>,

    /// Where to send the events (`http://` only): the broker's ingress, or
    /// `exactly` itself (`http://exactly.<namespace>.svc/`).
    #[arg(long)]
    to: String,

    /// Send even dead letters that were already replayed successfully.
    #[arg(long)]
    force: bool,

    /// How long one replay may take before it counts as failed.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

pub async fn run(args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}

/// Opens the database of a `dlq` command. Unlike `serve` and `migrate` it
/// never creates a SQLite file: a mistyped path is an error, not a new,
/// empty database.
async fn connect(args: &DatabaseArgs) -> anyhow::Result<Database> {
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

/// `--since` / `--until`: RFC 3339, or a duration back from now.
fn parse_time_bound(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time (2026-11-27T14:00:00Z) nor a duration (1h, 30m, 2d)"))?;
    let ago = chrono::Duration::from_std(ago).map_err(|_| format!("{text:?} is too long ago"))?;
    Utc::now().checked_sub_signed(ago).ok_or_else(|| format!("{text:?} is too long ago"))
}

/// The text form both backends compare and print timestamps in.
fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One stored dead letter.
#[derive(Debug, Clone)]
struct DeadLetter {
    dead_letter_id: i64,
    received_at: String,
    last_received_at: String,
    deliveries: i64,
    source: String,
    id: String,
    ty: String,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    extensions: serde_json::Map<String, serde_json::Value>,
    data: Option<Vec<u8>>,
    error_code: Option<String>,
    error_data: Option<String>,
    error_dest: Option<String>,
    replay_attempts: i64,
    last_replay_at: Option<String>,
    last_replay_to: Option<String>,
    last_replay_status: Option<i64>,
    last_replay_error: Option<String>,
    replayed_at: Option<String>,
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
    to_char(replayed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS replayed_at";
const COLUMNS_SQLITE: &str = "dead_letter_id, received_at, last_received_at, deliveries, source, id, type, subject,
    time, datacontenttype, dataschema, extensions, data, error_code, error_data, error_dest, replay_attempts,
    last_replay_at, last_replay_to, last_replay_status, last_replay_error, replayed_at";

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

async fn select(database: &Database, args: &ListArgs) -> anyhow::Result<Vec<DeadLetter>> {
    let since = args.since.map(timestamp);
    let until = args.until.map(timestamp);
    let limit = i64::from(args.limit);
    let rows = match database {
        Database::Postgres(pool) => {
            let sql = format!(
                "SELECT {COLUMNS_PG} FROM exactly.dead_letters
                 WHERE ($1::text IS NULL OR type = $1::text)
                   AND ($2::text IS NULL OR received_at >= $2::timestamptz)
                   AND ($3::text IS NULL OR received_at < $3::timestamptz)
                   AND (NOT $4 OR replayed_at IS NULL)
                 ORDER BY dead_letter_id DESC LIMIT $5"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&args.ty)
                .bind(&since)
                .bind(&until)
                .bind(args.pending)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(read_error)?
                .iter()
                .map(dead_letter_from_row)
                .collect::<Result<Vec<_>, _>>()?
        }
        Database::Sqlite(pool) => {
            let sql = format!(
                "SELECT {COLUMNS_SQLITE} FROM exactly_dead_letters
                 WHERE (?1 IS NULL OR type = ?1)
                   AND (?2 IS NULL OR received_at >= ?2)
                   AND (?3 IS NULL OR received_at < ?3)
                   AND (NOT ?4 OR replayed_at IS NULL)
                 ORDER BY dead_letter_id DESC LIMIT ?5"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&args.ty)
                .bind(&since)
                .bind(&until)
                .bind(args.pending)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(read_error)?
                .iter()
                .map(dead_letter_from_row)
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    Ok(rows)
}

async fn select_one(database: &Database, dead_letter_id: i64) -> anyhow::Result<Option<DeadLetter>> {
    let row = match database {
        Database::Postgres(pool) => {
            let sql = format!("SELECT {COLUMNS_PG} FROM exactly.dead_letters WHERE dead_letter_id = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(dead_letter_id)
                .fetch_optional(pool)
                .await
                .map_err(read_error)?
                .as_ref()
                .map(dead_letter_from_row)
                .transpose()?
        }
        Database::Sqlite(pool) => {
            let sql = format!("SELECT {COLUMNS_SQLITE} FROM exactly_dead_letters WHERE dead_letter_id = ?1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(dead_letter_id)
                .fetch_optional(pool)
                .await
                .map_err(read_error)?
                .as_ref()
                .map(dead_letter_from_row)
                .transpose()?
        }
    };
    Ok(row)
}

impl DeadLetter {
    fn decoded_error(&self) -> Option<String> {
        self.error_data.as_deref().map(decode_error_data)
    }

    /// `pending`, `replayed`, or what the last failed replay got.
    fn state(&self) -> String {
        if self.replayed_at.is_some() {
            "replayed".to_owned()
        } else if self.replay_attempts > 0 {
            match self.last_replay_status {
                Some(status) => format!("replay-failed({status})"),
                None => "replay-failed".to_owned(),
            }
        } else {
            "pending".to_owned()
        }
    }

    fn to_json(&self) -> serde_json::Value {
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
        })
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let database = connect(&args.database).await?;
    let dead_letters = select(&database, &args).await?;
    if args.json {
        let all: Vec<serde_json::Value> = dead_letters.iter().map(DeadLetter::to_json).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let header = ["ID", "RECEIVED", "TYPE", "SOURCE", "EVENT ID", "CODE", "DEST", "STATE", "ERROR"];
    let rows: Vec<[String; 9]> = dead_letters
        .iter()
        .map(|d| {
            [
                d.dead_letter_id.to_string(),
                d.received_at.clone(),
                d.ty.clone(),
                d.source.clone(),
                d.id.clone(),
                d.error_code.clone().unwrap_or_else(|| "-".into()),
                d.error_dest.clone().unwrap_or_else(|| "-".into()),
                d.state(),
                d.decoded_error().unwrap_or_else(|| "-".into()),
            ]
            .map(|cell| one_line(&cell))
        })
        .collect();
    print!("{}", table(&header, &rows));
    if rows.is_empty() {
        println!("(no dead letters)");
    }
    Ok(())
}

/// A cell on one line: control characters (newlines in error bodies)
/// become spaces.
fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// What one replay attempt got.
struct ReplayOutcome {
    status: Option<u16>,
    error: Option<String>,
}

impl ReplayOutcome {
    fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

type Client = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let target: http::Uri = args.to.parse().with_context(|| format!("--to {:?} is not a URL", args.to))?;
    match target.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("--to {:?}: only http:// is supported (got {other}://); use the in-cluster address", args.to),
        None => bail!("--to {:?} is not an absolute http:// URL", args.to),
    }
    let database = connect(&args.database).await?;
    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let mut failed = 0usize;
    for &dead_letter_id in &args.ids {
        let Some(dead_letter) = select_one(&database, dead_letter_id).await? else {
            println!("dead letter {dead_letter_id}: not found");
            failed += 1;
            continue;
        };
        if let Some(replayed_at) = &dead_letter.replayed_at
            && !args.force
        {
            println!(
                "dead letter {dead_letter_id}: already replayed at {replayed_at} (to {}); not sent again (--force sends it anyway)",
                dead_letter.last_replay_to.as_deref().unwrap_or("?")
            );
            failed += 1;
            continue;
        }
        let outcome = match replay_request(&dead_letter, &target) {
            Ok(request) => send(&client, request, args.timeout).await,
            Err(error) => ReplayOutcome { status: None, error: Some(format!("{error:#}")) },
        };
        let recorded = record(&database, dead_letter_id, &args.to, &outcome).await;
        let what = format!(
            "dead letter {dead_letter_id} ({} {} from {})",
            dead_letter.ty, dead_letter.id, dead_letter.source
        );
        match (&outcome, outcome.accepted()) {
            (ReplayOutcome { status: Some(status), .. }, true) => println!("{what}: replayed to {}: HTTP {status}", args.to),
            (ReplayOutcome { status, error }, _) => {
                failed += 1;
                let status = status.map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
                println!(
                    "{what}: NOT replayed to {}: {status}: {}",
                    args.to,
                    one_line(error.as_deref().unwrap_or(""))
                );
            }
        }
        if let Err(error) = recorded {
            failed += 1;
            println!("{what}: the attempt could not be recorded: {error:#}");
        }
    }
    if failed > 0 {
        bail!("{failed} of {} dead letters were not replayed (or not recorded)", args.ids.len());
    }
    Ok(())
}

/// The original event in binary mode: `ce-*` headers, percent-encoded as
/// the HTTP binding requires, and the data as the body. The `knativeerror*`
/// extensions are Knative's report about the failure, not part of the event.
fn replay_request(dead_letter: &DeadLetter, target: &http::Uri) -> anyhow::Result<Request<Full<Bytes>>> {
    /// Space, `"`, `%`, controls and (always) non-ASCII.
    const ENCODE: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'%');
    let mut request = Request::post(target.clone());
    let headers = request.headers_mut().context("building the request")?;
    let mut put = |name: String, value: &str| -> anyhow::Result<()> {
        let name = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("attribute name {name:?}"))?;
        let encoded = utf8_percent_encode(value, ENCODE).to_string();
        let value = HeaderValue::from_str(&encoded).with_context(|| format!("value of {name}"))?;
        headers.insert(name, value);
        Ok(())
    };
    put("ce-specversion".into(), SPEC_VERSION)?;
    put("ce-id".into(), &dead_letter.id)?;
    put("ce-source".into(), &dead_letter.source)?;
    put("ce-type".into(), &dead_letter.ty)?;
    for (name, value) in [("subject", &dead_letter.subject), ("time", &dead_letter.time), ("dataschema", &dead_letter.dataschema)] {
        if let Some(value) = value {
            put(format!("ce-{name}"), value)?;
        }
    }
    for (name, value) in &dead_letter.extensions {
        if [ERROR_CODE, ERROR_DATA, ERROR_DEST].contains(&name.as_str()) {
            continue;
        }
        let value = match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        put(format!("ce-{name}"), &value)?;
    }
    if let Some(content_type) = &dead_letter.datacontenttype {
        let value = HeaderValue::from_str(content_type).context("datacontenttype is not a valid Content-Type")?;
        headers.insert(http::header::CONTENT_TYPE, value);
    }
    let body = Bytes::from(dead_letter.data.clone().unwrap_or_default());
    Ok(request.body(Full::new(body))?)
}

async fn send(client: &Client, request: Request<Full<Bytes>>, timeout: Duration) -> ReplayOutcome {
    let exchange = async {
        let response = client.request(request).await.map_err(|e| format!("{e:#}: {}", source_chain(&e)))?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        let mut incoming = response.into_body();
        while let Some(frame) = incoming.frame().await {
            let Ok(frame) = frame else { break };
            if let Ok(data) = frame.into_data() {
                body.extend_from_slice(&data);
                if body.len() >= REPLAY_ERROR_BYTES {
                    break;
                }
            }
        }
        body.truncate(REPLAY_ERROR_BYTES);
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok((status, body))) => {
            let error = (!(200..300).contains(&status)).then(|| if body.is_empty() { format!("HTTP {status}") } else { body });
            ReplayOutcome { status: Some(status), error }
        }
        Ok(Err(error)) => ReplayOutcome { status: None, error: Some(error) },
        Err(_) => ReplayOutcome { status: None, error: Some(format!("no answer within {timeout:?}")) },
    }
}

/// The causes below an error, joined (hyper's own message is terse).
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.join(": ")
}

/// Records one attempt on the dead letter's row; `replayed_at` only moves
/// when the target accepted the event.
async fn record(database: &Database, dead_letter_id: i64, to: &str, outcome: &ReplayOutcome) -> anyhow::Result<()> {
    let accepted = outcome.accepted();
    let status = outcome.status.map(i64::from);
    let error = outcome.error.clone();
    let updated = match database {
        Database::Postgres(pool) => sqlx::query(
            "UPDATE exactly.dead_letters SET replay_attempts = replay_attempts + 1, last_replay_at = now(),
                 last_replay_to = $2, last_replay_status = $3::bigint, last_replay_error = $4,
                 replayed_at = CASE WHEN $5 THEN now() ELSE replayed_at END
             WHERE dead_letter_id = $1",
        )
        .bind(dead_letter_id)
        .bind(to)
        .bind(status)
        .bind(&error)
        .bind(accepted)
        .execute(pool)
        .await?
        .rows_affected(),
        Database::Sqlite(pool) => sqlx::query(
            "UPDATE exactly_dead_letters SET replay_attempts = replay_attempts + 1,
                 last_replay_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 last_replay_to = ?2, last_replay_status = ?3, last_replay_error = ?4,
                 replayed_at = CASE WHEN ?5 THEN strftime('%Y-%m-%dT%H:%M:%fZ', 'now') ELSE replayed_at END
             WHERE dead_letter_id = ?1",
        )
        .bind(dead_letter_id)
        .bind(to)
        .bind(status)
        .bind(&error)
        .bind(accepted)
        .execute(pool)
        .await?
        .rows_affected(),
    };
    if updated != 1 {
        bail!("the row of dead letter {dead_letter_id} is gone");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(extensions: &[(&str, &str)]) -> CloudEvent {
        CloudEvent {
            id: "1".into(),
            source: "urn:s".into(),
            ty: "t".into(),
            subject: None,
            time: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            extensions: extensions.iter().map(|(n, v)| ((*n).into(), (*v).into())).collect(),
            data: Some(b"{}".to_vec()),
        }
    }

    #[test]
    fn the_quota_counts_data_extensions_and_attributes_and_answers_503() {
        let dead = event(&[(ERROR_CODE, "500")]);
        let extensions = r#"{"knativeerrorcode":"500"}"#;
        // data "{}", the extensions' JSON, source, id, type, datacontenttype.
        assert_eq!(stored_bytes(&dead, extensions), (2 + extensions.len() + 5 + 1 + 1 + 16) as u64);
        let over = Rejection::DeadLetterQuota { size: 10, pending: 95, quota: 100 };
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE, "never a 4xx: the dispatcher would drop it");
        assert_eq!(over.code(), "dead-letter-quota");
    }

    #[test]
    fn error_data_is_decoded_when_it_is_base64_text() {
        assert_eq!(decode_error_data("eyJlcnJvciI6ICJ4In0="), r#"{"error": "x"}"#);
        assert_eq!(decode_error_data("not base64!"), "not base64!");
        assert!(decode_error_data("/w==").contains("not UTF-8"));
    }

    #[test]
    fn the_dedup_key_ignores_knatives_error_report_but_not_the_destination() {
        let first = event(&[(ERROR_CODE, "500")]);
        let again = event(&[(ERROR_CODE, "503"), ("knativearrivaltime", "x")]);
        assert_eq!(dedup_key(&first, Some("http://a")), dedup_key(&again, Some("http://a")));
        assert_ne!(dedup_key(&first, Some("http://a")), dedup_key(&first, Some("http://b")));
        assert_ne!(dedup_key(&first, Some("http://a")), dedup_key(&first, None));
        let mut other_payload = first.clone();
        other_payload.data = Some(b"{\"a\":1}".to_vec());
        assert_ne!(dedup_key(&first, None), dedup_key(&other_payload, None));
    }

    #[test]
    fn time_bounds_accept_rfc3339_and_durations_back_from_now() {
        let exact = parse_time_bound("2026-11-27T14:00:00+01:00").unwrap();
        assert_eq!(timestamp(exact), "2026-11-27T13:00:00.000Z");
        let hour_ago = parse_time_bound("1h").unwrap();
        let expected = Utc::now() - chrono::Duration::hours(1);
        assert!((hour_ago - expected).num_seconds().abs() < 5);
        assert!(parse_time_bound("yesterday-ish").is_err());
    }

    #[test]
    fn replay_leaves_out_knatives_error_extensions_and_percent_encodes() {
        let dead_letter = DeadLetter {
            dead_letter_id: 1,
            received_at: String::new(),
            last_received_at: String::new(),
            deliveries: 1,
            source: "urn:a b".into(),
            id: "é".into(),
            ty: "t".into(),
            subject: Some("s".into()),
            time: None,
            datacontenttype: Some("application/json".into()),
            dataschema: None,
            extensions: serde_json::from_str(r#"{"knativeerrorcode":"500","traceparent":"00-x"}"#).unwrap(),
            data: Some(b"{}".to_vec()),
            error_code: Some("500".into()),
            error_data: None,
            error_dest: None,
            replay_attempts: 0,
            last_replay_at: None,
            last_replay_to: None,
            last_replay_status: None,
            last_replay_error: None,
            replayed_at: None,
        };
        let request = replay_request(&dead_letter, &"http://h/".parse().unwrap()).unwrap();
        let headers = request.headers();
        assert_eq!(headers["ce-source"], "urn:a%20b");
        assert_eq!(headers["ce-id"], "%C3%A9");
        assert_eq!(headers["ce-subject"], "s");
        assert_eq!(headers["ce-traceparent"], "00-x");
        assert_eq!(headers["content-type"], "application/json");
        assert!(!headers.contains_key("ce-knativeerrorcode"));
    }

    #[test]
    fn tables_align_and_keep_the_last_column_whole() {
        let text = table(&["A", "B"], &[["long".into(), "x y".into()]]);
        assert_eq!(text, "A     B\nlong  x y\n");
    }
}
