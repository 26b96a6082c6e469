//! The dead-letter sink: stores what `POST /dead-letter` receives, once
//! per dead letter (the dedup key), within the quota, in one transaction
//! per delivery on either backend.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{ERROR_CODE, ERROR_DATA, ERROR_DEST};
use crate::answer::{Body, Rejection};
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
}
