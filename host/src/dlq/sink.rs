//! The dead-letter sink: stores what `POST /dead-letter` receives, once
//! per dead letter (the dedup key), within the quota, in one transaction
//! per delivery on either backend.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{ERROR_CODE, ERROR_DATA, ERROR_DEST};
use crate::answer::Body;
use crate::rejection::Rejection;
use crate::decode::CloudEvent;
use crate::storage::{Database, classify};

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

/// One dead letter as the sink stores it: the columns of its row.
///
/// Built from a valid [`CloudEvent`] ([`Letter::event`]), or, when the
/// request is not one the sink can validate and store as an event, from
/// the request as received ([`Letter::raw`]). Either way it is stored: a
/// 4xx from the dead-letter sink makes the Knative dispatcher commit the
/// offset, and the event would be gone.
#[derive(Debug, Clone, PartialEq)]
pub struct Letter {
    source: String,
    id: String,
    ty: String,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    /// The extensions as stored: a JSON object of text values.
    extensions: String,
    data: Option<Vec<u8>>,
    code: Option<String>,
    error_data: Option<String>,
    dest: Option<String>,
    /// Why the dead letter is kept raw; `None` for a valid event.
    problem: Option<String>,
    /// The raw form's headers, `name: value\r\n` each; `None` for an event.
    raw_headers: Option<Vec<u8>>,
    dedup_key: [u8; 32],
}

impl Letter {
    /// A valid event, stored attribute by attribute (a valid event's
    /// attributes hold no control character, so every column can take
    /// them: [`crate::decode`]).
    ///
    /// Knative's report (`knativeerrorcode`, `…data`, `…dest`) is read from
    /// its `ce-*` headers in `headers`, else from the event's extensions: a
    /// structured-mode dead letter may carry the event in its body and the
    /// report as headers, which reading the body alone would drop (and the
    /// destination is part of the dedup key); the headers are what the
    /// dispatcher just added, a report inside the body may be an older
    /// one. (In binary mode the headers are the extensions.)
    ///
    /// Errors: a report header the event path would refuse (given twice,
    /// not UTF-8 once percent-decoded, holding a control character): the
    /// dead letter is then kept as received ([`Letter::raw`]), as in
    /// binary mode.
    pub fn event(event: &CloudEvent, headers: &http::HeaderMap) -> Result<Letter, String> {
        let mut extensions: serde_json::Map<String, serde_json::Value> = event
            .extensions()
            .iter()
            .map(|(name, value)| (name.clone(), serde_json::Value::String(value.clone())))
            .collect();
        for name in [ERROR_CODE, ERROR_DATA, ERROR_DEST] {
            let header = format!("ce-{name}");
            let mut values = headers.get_all(&header).iter();
            let Some(value) = values.next() else { continue };
            if values.next().is_some() {
                return Err(format!("header {header} appears more than once"));
            }
            let value = percent_encoding::percent_decode(value.as_bytes())
                .decode_utf8()
                .map_err(|_| format!("header {header} is not UTF-8 after percent-decoding"))?;
            if let Some(c) = value.chars().find(|&c| crate::decode::forbidden_in_string(c)) {
                return Err(format!("header {header} contains U+{:04X}, which a CloudEvents String may not hold", c as u32));
            }
            extensions.insert(name.to_owned(), value.into_owned().into());
        }
        let extension = |name: &str| extensions.get(name).and_then(serde_json::Value::as_str).map(str::to_owned);
        let dest = extension(ERROR_DEST);
        Ok(Letter {
            source: event.source().to_owned(),
            id: event.id().to_owned(),
            ty: event.ty().to_owned(),
            subject: event.subject().map(str::to_owned),
            time: event.time().map(str::to_owned),
            datacontenttype: event.datacontenttype().map(str::to_owned),
            dataschema: event.dataschema().map(str::to_owned),
            data: event.data().map(<[u8]>::to_vec),
            code: extension(ERROR_CODE),
            error_data: extension(ERROR_DATA),
            dedup_key: dedup_key(event, dest.as_deref()),
            dest,
            extensions: serde_json::Value::Object(extensions).to_string(),
            problem: None,
            raw_headers: None,
        })
    }

    /// A request the sink cannot store as an event, kept as received (see
    /// [`super::raw`]): its event-shaping headers and its body, with the
    /// reason. Source, id and type are read as far as they can be, for
    /// `dlq list` only.
    pub fn raw(headers: &http::HeaderMap, body: &[u8], problem: String) -> Letter {
        let raw = super::raw::Raw::of(headers, body);
        Letter {
            source: raw.source,
            id: raw.id,
            ty: raw.ty,
            subject: None,
            time: None,
            datacontenttype: None,
            dataschema: None,
            extensions: "{}".to_owned(),
            data: Some(body.to_vec()),
            code: raw.code,
            error_data: raw.error_data,
            dedup_key: raw.dedup_key,
            dest: raw.dest,
            // The problem may quote the request (a member name holding
            // U+0000, which PostgreSQL's text cannot store: 500 for ever).
            problem: Some(match raw.note {
                Some(note) => format!("{}; {note}", crate::printable::printable(&problem)),
                None => crate::printable::printable(&problem).into_owned(),
            }),
            raw_headers: Some(raw.headers),
        }
    }

    /// Whether it is kept raw, and why.
    pub fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }

    /// The bytes the row stores, as the quota counts them: data, raw
    /// headers, the extensions' JSON, Knative's three extensions again in
    /// their own columns, the problem and the attributes' text. (Rows
    /// stored before the three columns counted were summed without them by
    /// migration 0004.)
    pub fn stored_bytes(&self) -> u64 {
        let optional = |value: &Option<String>| value.as_ref().map_or(0, String::len);
        (self.data.as_ref().map_or(0, Vec::len)
            + self.raw_headers.as_ref().map_or(0, Vec::len)
            + optional(&self.code)
            + optional(&self.error_data)
            + optional(&self.dest)
            + self.extensions.len()
            + optional(&self.problem)
            + self.source.len()
            + self.id.len()
            + self.ty.len()
            + optional(&self.subject)
            + optional(&self.time)
            + optional(&self.datacontenttype)
            + optional(&self.dataschema)) as u64
    }
}


/// Stores a dead letter; `Ok` means the row is committed.
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
///
/// Errors: the quota (503), the database unreachable or contended (503,
/// see [`crate::storage::classify`]), anything else the database refuses
/// (500: a fault of `exactly`, never the sender's). Never a 4xx.
pub async fn store(database: &Database, letter: &Letter, quota: u64) -> Result<Stored, Rejection> {
    let size = letter.stored_bytes();
    // One statement for both backends but for the SQL text: insert, or
    // count a redelivery of a dead letter not yet replayed.
    macro_rules! insert {
        ($tx:expr, $sql:expr, $sum:expr) => {{
            let row = sqlx::query($sql)
                .bind(&letter.source)
                .bind(&letter.id)
                .bind(&letter.ty)
                .bind(&letter.subject)
                .bind(&letter.time)
                .bind(&letter.datacontenttype)
                .bind(&letter.dataschema)
                .bind(&letter.extensions)
                .bind(&letter.data)
                .bind(&letter.code)
                .bind(&letter.error_data)
                .bind(&letter.dest)
                .bind(&letter.dedup_key[..])
                .bind(i64::try_from(size).unwrap_or(i64::MAX))
                .bind(&letter.problem)
                .bind(&letter.raw_headers)
                .fetch_one(&mut *$tx)
                .await
                .map_err(not_stored)?;
            let stored = (row.try_get::<i64, _>(0).map_err(not_stored)?, row.try_get::<i64, _>(1).map_err(not_stored)?);
            if stored.1 == 1 {
                let pending: i64 = sqlx::query_scalar($sum).fetch_one(&mut *$tx).await.map_err(not_stored)?;
                let pending = u64::try_from(pending).unwrap_or(0);
                if pending > quota {
                    $tx.rollback().await.map_err(not_stored)?;
                    return Err(Rejection::DeadLetterQuota { size, pending: pending.saturating_sub(size), quota });
                }
            }
            $tx.commit().await.map_err(not_stored)?;
            stored
        }};
    }
    let stored = match database {
        Database::Postgres(pool) => {
            let mut tx = pool.begin().await.map_err(not_stored)?;
            insert!(
                tx,
                "INSERT INTO exactly.dead_letters
                     (source, id, type, subject, time, datacontenttype, dataschema, extensions, data,
                      error_code, error_data, error_dest, dedup_key, stored_bytes, problem, raw_headers)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (dedup_key) WHERE replayed_at IS NULL DO UPDATE
                     SET deliveries = exactly.dead_letters.deliveries + 1, last_received_at = now()
                 RETURNING dead_letter_id, deliveries::bigint AS deliveries",
                "SELECT coalesce(sum(stored_bytes), 0)::bigint FROM exactly.dead_letters WHERE replayed_at IS NULL"
            )
        }
        Database::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(not_stored)?;
            insert!(
                tx,
                "INSERT INTO exactly_dead_letters
                     (source, id, type, subject, time, datacontenttype, dataschema, extensions, data,
                      error_code, error_data, error_dest, dedup_key, stored_bytes, problem, raw_headers)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (dedup_key) WHERE replayed_at IS NULL DO UPDATE
                     SET deliveries = deliveries + 1,
                         last_received_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 RETURNING dead_letter_id, deliveries",
                "SELECT coalesce(sum(stored_bytes), 0) FROM exactly_dead_letters WHERE replayed_at IS NULL"
            )
        }
    };
    let (dead_letter_id, deliveries) = stored;
    let (source, id, ty) = (&letter.source, &letter.id, &letter.ty);
    let (code, dest) = (letter.code.as_deref().unwrap_or(""), letter.dest.as_deref().unwrap_or(""));
    let kept = if letter.problem.is_some() { "raw" } else { "event" };
    if deliveries == 1 {
        tracing::info!(
            source = %source, id = %id, r#type = %ty, code, dest, dead_letter_id, kept,
            problem = letter.problem.as_deref().unwrap_or(""), "dead letter stored"
        );
        Ok(Stored::New(dead_letter_id))
    } else {
        tracing::info!(
            source = %source, id = %id, r#type = %ty, code, dead_letter_id, deliveries, kept,
            "dead letter redelivered; already stored"
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
    for part in [event.source().as_bytes(), event.id().as_bytes(), &event.payload_sha256()] {
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

/// A failure to store a dead letter is never the sender's: it is
/// answered 5xx so the dispatcher tries again, 503 when the database is
/// unreachable or contended, 500 (a fault of `exactly`) otherwise.
fn not_stored(error: sqlx::Error) -> Rejection {
    match classify(error) {
        rejection @ (Rejection::Busy(_) | Rejection::DatabaseUnavailable(_)) => rejection,
        other => Rejection::Internal(format!("the dead letter could not be stored: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(extensions: &[(&str, &str)]) -> CloudEvent {
        CloudEvent::for_tests("1", "urn:s", "t", None, Some("application/json"), extensions, Some(b"{}"))
    }

    /// Found by a fresh attacker: a structured dead letter whose report came
    /// as headers was stored without it, and two destinations' dead letters
    /// of one event were one row.
    #[test]
    fn knatives_report_in_headers_is_kept_for_a_structured_event() {
        let structured = event(&[]);
        let report = |dest: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("ce-knativeerrorcode", "422".parse().unwrap());
            headers.insert("ce-knativeerrordest", dest.parse().unwrap());
            headers
        };
        let from_a = Letter::event(&structured, &report("http://a/%20x")).unwrap();
        assert_eq!((from_a.code.as_deref(), from_a.dest.as_deref()), (Some("422"), Some("http://a/ x")));
        assert!(from_a.extensions.contains("knativeerrorcode"), "{}", from_a.extensions);
        let from_b = Letter::event(&structured, &report("http://b/")).unwrap();
        assert_ne!(from_a.dedup_key, from_b.dedup_key, "two destinations, two dead letters");
        // The headers win over a report inside the body (the dispatcher
        // just added them; the body's may be an older one).
        let stale = event(&[(ERROR_CODE, "500")]);
        assert_eq!(Letter::event(&stale, &report("http://a/")).unwrap().code.as_deref(), Some("422"));
        // A report header the event path would refuse: kept as received.
        let mut twice = report("http://a/");
        twice.append("ce-knativeerrorcode", "500".parse().unwrap());
        assert!(Letter::event(&structured, &twice).unwrap_err().contains("more than once"));
        let nul = report("http://p%00/");
        assert!(Letter::event(&structured, &nul).unwrap_err().contains("U+0000"));
    }

    #[test]
    fn the_quota_counts_data_extensions_and_attributes_and_answers_503() {
        let dead = event(&[(ERROR_CODE, "500")]);
        let extensions = r#"{"knativeerrorcode":"500"}"#;
        let letter = Letter::event(&dead, &http::HeaderMap::new()).unwrap();
        assert_eq!(letter.problem(), None);
        // data "{}", the extensions' JSON, the error code again in its own
        // column, source, id, type, datacontenttype.
        assert_eq!(letter.stored_bytes(), (2 + extensions.len() + 3 + 5 + 1 + 1 + 16) as u64);
        let over = Rejection::DeadLetterQuota { size: 10, pending: 95, quota: 100 };
        assert_eq!(over.status(), StatusCode::SERVICE_UNAVAILABLE, "never a 4xx: the dispatcher would drop it");
        assert_eq!(over.code(), "dead-letter-quota");
    }

    #[test]
    fn the_dedup_key_ignores_knatives_error_report_but_not_the_destination() {
        let first = event(&[(ERROR_CODE, "500")]);
        let again = event(&[(ERROR_CODE, "503"), ("knativearrivaltime", "x")]);
        assert_eq!(dedup_key(&first, Some("http://a")), dedup_key(&again, Some("http://a")));
        assert_ne!(dedup_key(&first, Some("http://a")), dedup_key(&first, Some("http://b")));
        assert_ne!(dedup_key(&first, Some("http://a")), dedup_key(&first, None));
        let other_payload =
            CloudEvent::for_tests("1", "urn:s", "t", None, Some("application/json"), &[(ERROR_CODE, "500")], Some(b"{\"a\":1}"));
        assert_ne!(dedup_key(&first, None), dedup_key(&other_payload, None));
    }
}
