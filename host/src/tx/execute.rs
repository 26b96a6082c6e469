//! Running one admitted handler statement on the event's transaction:
//! bound as the backend wants it ([`super::convert`]), rows streamed and
//! counted against the handler's caps, a PostgreSQL statement cached per
//! text and parameter kinds, an SQLite statement prepared alone under the
//! handler's authorizer.

use std::sync::Arc;

use sqlx::{AssertSqlSafe, Row};

use super::convert::{self, Rows, StatementError, StatementOutput, Value};
use crate::rejection::LimitKind;
use crate::storage::{EventTx, sqlite_guard};

impl EventTx {
    /// Runs one handler statement (already admitted by the policy). Rows
    /// are streamed and counted, so a query returning millions of rows is
    /// cut off at the cap instead of filling the host's memory.
    pub async fn run_handler_statement(
        &mut self,
        sql: Arc<str>,
        params: Vec<Value>,
        want_rows: bool,
        caps: RowCaps,
    ) -> Result<StatementOutput, StatementError> {
        match self {
            EventTx::Postgres(session) => {
                // Cached per text and parameter kinds (see there).
                let text = convert::postgres_statement_text(&sql, &params);
                let query = convert::bind_postgres(sqlx::query(AssertSqlSafe(text)), params)?;
                let ran = if want_rows {
                    let stream = query.fetch(session.connection());
                    collect_rows(stream, caps, convert::row_from_postgres).await
                } else {
                    query
                        .execute(session.connection())
                        .await
                        .map(|done| StatementOutput::Affected(done.rows_affected()))
                        .map_err(StatementError::from_sqlx)
                };
                if let Err(failed) = &ran
                    && failed.error.code.as_deref() == Some("0A000")
                {
                    session.stale = true;
                    session.tainted = true;
                }
                ran
            }
            EventTx::Sqlite(tx, _) => {
                // Exactly one statement, prepared under the handler's
                // authorizer: sqlx would run every statement of the text.
                {
                    let mut handle = tx.lock_handle().await.map_err(StatementError::from_sqlx)?;
                    sqlite_guard::check_single_statement(&mut handle, &sql).map_err(StatementError::refused)?;
                }
                // Never from the connection's statement cache: a handler
                // that sent the very text of one of the host's statements
                // would otherwise run the host's compiled statement, which
                // SQLite's authorizer never saw.
                let query = convert::bind_sqlite(sqlx::query(AssertSqlSafe(sql)).persistent(false), params)?;
                if want_rows {
                    let stream = query.fetch(&mut **tx);
                    collect_rows(stream, caps, convert::row_from_sqlite).await
                } else {
                    let done = query.execute(&mut **tx).await.map_err(StatementError::from_sqlx)?;
                    Ok(StatementOutput::Affected(done.rows_affected()))
                }
            }
        }
    }

}

/// The most one handler query may hand back.
#[derive(Debug, Clone, Copy)]
pub struct RowCaps {
    pub max_rows: u64,
    pub max_bytes: u64,
}

async fn collect_rows<R: Row, S>(
    mut stream: S,
    caps: RowCaps,
    convert_row: fn(&R) -> Result<Vec<Value>, StatementError>,
) -> Result<StatementOutput, StatementError>
where
    S: futures::Stream<Item = Result<R, sqlx::Error>> + Unpin,
{
    use futures::TryStreamExt;
    let mut columns = None;
    let mut rows = Vec::new();
    let mut bytes = 0u64;
    while let Some(row) = stream.try_next().await.map_err(StatementError::from_sqlx)? {
        if rows.len() as u64 >= caps.max_rows {
            return Err(StatementError::limit(
                LimitKind::Rows,
                format!("the query returned more than {} rows", caps.max_rows),
            ));
        }
        if columns.is_none() {
            columns = Some(convert::column_names(&row));
        }
        let values = convert_row(&row)?;
        bytes += values.iter().map(convert::value_size).sum::<u64>();
        if bytes > caps.max_bytes {
            return Err(StatementError::limit(
                LimitKind::ResultBytes,
                format!("the query returned more than {} bytes", caps.max_bytes),
            ));
        }
        rows.push(values);
    }
    Ok(StatementOutput::Rows(Rows { columns: columns.unwrap_or_default(), rows }))
}
