//! One event's transaction ([`EventTx`]): the claim, the handler's
//! statements (each bounded by the row and byte caps), the stored answer
//! and the commit all run on it, on the handler's own session.

use std::sync::Arc;
use std::time::Instant;

use sqlx::{Row, Sqlite, Transaction};

use crate::answer::{Committed, ReplyEvent};
use crate::rejection::Rejection;
use crate::decode::CloudEvent;

use super::{classify, postgres, sqlite_guard};

/// One event's open transaction: on PostgreSQL on the handler's own
/// session, with the key that proves its claim to the bookkeeping
/// functions; on SQLite with the handler's turn at the writer.
pub enum EventTx {
    Postgres(postgres::EventSession),
    Sqlite(Transaction<'static, Sqlite>, Option<tokio::sync::OwnedSemaphorePermit>),
}

/// The outcome of claiming `(source, id)`.
pub enum Claim {
    /// This delivery owns the event: run the handler.
    Owned,
    /// The event was committed before; here is what was stored.
    Duplicate { payload_sha256: Vec<u8>, answer: Box<Committed> },
}

impl EventTx {
    /// Claims `(source, id)`. On PostgreSQL a concurrent first delivery holds
    /// the row lock, so this waits for it (bounded by `lock_timeout`) and
    /// then sees its committed row, or owns the event if it rolled back.
    /// On PostgreSQL the claim is one call of `exactly.claim_event` on the
    /// handler's own session, with the event's proof bound as a parameter.
    pub async fn claim(&mut self, event: &CloudEvent, handler: &str, payload_sha256: &[u8]) -> Result<Claim, Rejection> {
        let stored: (Vec<u8>, Option<i16>, Option<String>) = match self {
            EventTx::Postgres(session) => {
                let proof = session.key.proof(event.source(), event.id());
                // SQL PREPARE and DEALLOCATE share the namespace of the
                // driver's named statements, so a handler could replace a
                // cached statement of the host's and have it bind the event's
                // proof into the handler's SQL. The claim (and the read of a
                // committed answer) may be cached: they run before the
                // handler, on a session where `exactly.reset_session` left
                // no statement of a handler's (`EventSession::finish`).
                let (claimed, backend_pid, xact): (Option<bool>, i32, Option<String>) = sqlx::query_as(
                    "SELECT exactly.claim_event($1, $2, $3, $4, $5, $6), pg_backend_pid(), pg_current_xact_id_if_assigned()::text",
                )
                        .bind(event.source())
                        .bind(event.id())
                        .bind(&proof)
                        .bind(event.ty())
                        .bind(handler)
                        .bind(payload_sha256)
                        .fetch_one(session.connection())
                        .await
                        .map_err(classify)?;
                session.backend_pid = Some(backend_pid);
                if claimed == Some(true) {
                    session.claim = Some(postgres::OwnClaim { proof, xact });
                    return Ok(Claim::Owned);
                }
                let row = sqlx::query("SELECT payload_sha256, status, reply FROM exactly.committed_answer($1, $2, $3)")
                    .bind(event.source())
                    .bind(event.id())
                    .bind(&proof)
                    .fetch_optional(session.connection())
                    .await
                    .map_err(classify)?
                    .ok_or_else(|| Rejection::Internal("a committed event's row is gone".into()))?;
                (
                    row.try_get::<Option<Vec<u8>>, _>("payload_sha256").map_err(classify)?.unwrap_or_default(),
                    row.try_get("status").map_err(classify)?,
                    row.try_get("reply").map_err(classify)?,
                )
            }
            EventTx::Sqlite(tx, _) => {
                let inserted = sqlx::query(
                    "INSERT INTO exactly_processed_events (source, id, type, handler, payload_sha256)
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (source, id) DO NOTHING",
                )
                .bind(event.source())
                .bind(event.id())
                .bind(event.ty())
                .bind(handler)
                .bind(payload_sha256)
                .execute(&mut **tx)
                .await
                .map_err(classify)?
                .rows_affected();
                if inserted == 1 {
                    return Ok(Claim::Owned);
                }
                let row = sqlx::query(
                    "SELECT payload_sha256, status, reply FROM exactly_processed_events WHERE source = ?1 AND id = ?2",
                )
                .bind(event.source())
                .bind(event.id())
                .fetch_one(&mut **tx)
                .await
                .map_err(classify)?;
                (
                    row.try_get("payload_sha256").map_err(classify)?,
                    row.try_get("status").map_err(classify)?,
                    row.try_get("reply").map_err(classify)?,
                )
            }
        };
        let (payload_sha256, status, reply) = stored;
        let status = status.ok_or_else(|| Rejection::Internal("a committed event has no stored answer".into()))?;
        let reply = reply
            .map(|text| serde_json::from_str::<ReplyEvent>(&text))
            .transpose()
            .map_err(|e| Rejection::Internal(format!("stored reply cannot be read: {e}")))?;
        Ok(Claim::Duplicate { payload_sha256, answer: Box::new(Committed { status: status as u16, reply }) })
    }

    /// Stores the answer in the claim row. Either way it is a statement that
    /// fails in an aborted transaction, which proves the transaction alive
    /// right before COMMIT (an aborted PostgreSQL transaction would
    /// otherwise let COMMIT quietly roll back). On PostgreSQL
    /// `exactly.store_answer` updates only a claim this transaction wrote
    /// (it raises otherwise) and returns a receipt of the answer, checked
    /// here; on SQLite the UPDATE of the claim row must find exactly that
    /// row. Every value is a bound parameter: nothing here depends on a
    /// setting the handler could have changed.
    pub async fn store_answer(&mut self, event: &CloudEvent, answer: &Committed, result: &str) -> Result<(), Rejection> {
        let reply = answer
            .reply
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| Rejection::Internal(e.to_string()))?;
        let status = answer.status as i16;
        match self {
            EventTx::Postgres(session) => {
                let Some(claim) = &session.claim else {
                    return Err(Rejection::Internal("an answer to store for an event this transaction did not claim".into()));
                };
                let expected = postgres::ProofKey::receipt(&claim.proof, status, reply.as_deref(), result);
                // Runs after the handler's statements, so it may run a
                // statement of the handler's that took the name of the
                // host's cached one: it takes no secret (the function finds
                // the claim this transaction wrote by itself), and only the
                // real function, having stored exactly this answer, returns
                // its receipt. (Whether the transaction is still the
                // event's is checked with the COMMIT: `EventSession::finish`.)
                let receipt: Option<Vec<u8>> = sqlx::query_scalar("SELECT exactly.store_answer($1, $2, $3, $4, $5)")
                    .bind(event.source())
                    .bind(event.id())
                    .bind(status)
                    .bind(reply.as_deref())
                    .bind(result)
                    .fetch_optional(session.connection())
                    .await
                    .map_err(|error| {
                        // A server's refusal leaves the session as it was;
                        // an answer of another shape came from another
                        // statement.
                        if !matches!(error, sqlx::Error::Database(_)) {
                            session.tainted = true;
                        }
                        classify(error)
                    })?
                    .flatten();
                if receipt.as_deref() != Some(expected.as_slice()) {
                    session.tainted = true;
                    return Err(Rejection::Internal(
                        "the event's answer was not stored by the host's statement (a handler replaced it)".into(),
                    ));
                }
                Ok(())
            }
            EventTx::Sqlite(tx, _) => {
                let updated = sqlx::query(
                    "UPDATE exactly_processed_events SET status = ?3, reply = ?4, result = ?5 WHERE source = ?1 AND id = ?2",
                )
                .bind(event.source())
                .bind(event.id())
                .bind(status)
                .bind(reply)
                .bind(result)
                .execute(&mut **tx)
                .await
                .map_err(classify)?
                .rows_affected();
                if updated == 1 {
                    Ok(())
                } else {
                    Err(Rejection::Internal(format!("storing the answer updated {updated} rows instead of 1")))
                }
            }
        }
    }

    /// A handler statement failed because the session's cached statement
    /// no longer fits the schema (PostgreSQL, SQLSTATE `0A000`): the
    /// session will be closed, and the event is worth one more run on a
    /// fresh session, whose statements are prepared anew.
    pub fn stale_statement(&self) -> bool {
        match self {
            EventTx::Postgres(session) => session.stale,
            EventTx::Sqlite(..) => false,
        }
    }

    /// The PostgreSQL server process of this event's session, once claimed.
    pub fn backend_pid(&self) -> Option<i32> {
        match self {
            EventTx::Postgres(session) => session.backend_pid,
            EventTx::Sqlite(..) => None,
        }
    }

    pub async fn commit(self) -> Result<(), Rejection> {
        match self {
            EventTx::Postgres(session) => match session.finish(true).await.map_err(classify)? {
                true => Ok(()),
                false => Err(Rejection::Internal(
                    "the event's transaction was ended by its handler before the host's COMMIT".into(),
                )),
            },
            EventTx::Sqlite(tx, _) => tx.commit().await.map_err(classify),
        }
    }

    pub async fn rollback(self) {
        let result = match self {
            EventTx::Postgres(session) => session.finish(false).await.map(drop),
            EventTx::Sqlite(tx, _) => tx.rollback().await,
        };
        if let Err(error) = result {
            // The connection is closed or broken: the server rolls back.
            tracing::warn!(%error, "rollback failed; the database discards the transaction with the connection");
        }
    }

    /// Hands the transaction to a handler. On SQLite, install the handler's
    /// authorizer and limits ([`sqlite_guard`]) and a progress handler that
    /// interrupts any statement once the event's deadline has passed
    /// (SQLite has no statement timeout of its own); without a sandbox for
    /// the handler, every handler statement is refused. On PostgreSQL the
    /// session already is the handler's, with its statement timeout.
    pub async fn enter_handler(
        &mut self,
        deadline: Instant,
        sandbox: Option<&Arc<sqlite_guard::SqliteSandbox>>,
    ) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx, _) = self {
            if let Some(sandbox) = sandbox {
                // Tables another deployment's migrate added since the last
                // event (the write lock is held: no schema change until COMMIT).
                let version: i64 = sqlx::query_scalar("PRAGMA schema_version").fetch_one(&mut **tx).await.map_err(classify)?;
                if sandbox.schema_version() != Some(version) {
                    let tables: Vec<String> =
                        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
                            .fetch_all(&mut **tx)
                            .await
                            .map_err(classify)?;
                    sandbox.set_schema(version, tables);
                }
            }
            let mut handle = tx.lock_handle().await.map_err(classify)?;
            if let Some(sandbox) = sandbox {
                sqlite_guard::enter(&mut handle, sandbox);
            }
            handle.set_progress_handler(10_000, move || Instant::now() < deadline);
        }
        Ok(())
    }

    /// Takes the transaction back from the handler.
    pub async fn leave_handler(&mut self) -> Result<(), Rejection> {
        if let EventTx::Sqlite(tx, _) = self {
            let mut handle = tx.lock_handle().await.map_err(classify)?;
            handle.remove_progress_handler();
            sqlite_guard::leave(&mut handle);
        }
        Ok(())
    }
}


