//! The `tx` import: a handler's only way to the database.
//!
//! Every call runs on the event's open transaction, after the statement
//! policy admitted it. The first failed or refused statement dooms the
//! event: the handler is told, later statements are answered with an error
//! without reaching the database, and nothing of the event commits. This is
//! the same on both backends, so a handler tried on SQLite behaves the same
//! on PostgreSQL, where a failed statement aborts the transaction anyway.

use super::RowCaps;
use super::convert::{StatementError, StatementFault, StatementOutput};
use crate::rejection::LimitKind;
use super::TxState;
use crate::bindings::exactly::handler::tx::Host;
use crate::bindings::exactly::handler::types::{DbError, DbErrorKind, Rows, Value};
use crate::printable::printable;

impl TxState {
    /// What one of the handler's queries may hand back.
    fn row_caps(&self) -> RowCaps {
        RowCaps { max_rows: self.limits.max_rows, max_bytes: self.limits.max_result_bytes }
    }

    async fn statement(&mut self, sql: String, params: Vec<Value>, want_rows: bool) -> Result<StatementOutput, DbError> {
        if let Some(doom) = &self.doom {
            return Err(DbError {
                kind: DbErrorKind::Failed,
                code: Some("25P02".into()),
                message: format!(
                    "an earlier statement of this event failed ({}); nothing more runs in its transaction",
                    doom.describe()
                ),
            });
        }
        self.statements += 1;
        if self.statements > self.limits.max_statements {
            let message = format!("more than {} statements in one event", self.limits.max_statements);
            self.doom = Some(StatementFault::Limit(LimitKind::Statements, message.clone()));
            return Err(DbError { kind: DbErrorKind::Failed, code: None, message });
        }
        // The SQL text's length is bounded here, before the policy reads it
        // and whether or not the policy is on: the policy's parser (and, with
        // it off, the database's) would otherwise pay for any length. A
        // refusal (422), as the policy answers it: no setting raises it.
        if sql.len() > crate::policy::MAX_SQL_BYTES {
            let message = format!(
                "refused {:?}: the statement is {} bytes long; exactly takes statements of at most {} bytes",
                shorten(&sql),
                sql.len(),
                crate::policy::MAX_SQL_BYTES
            );
            tracing::warn!(handler = %self.handler, source = %self.event_source, id = %self.event_id, "{message}");
            self.doom = Some(StatementFault::Refused(message.clone()));
            return Err(DbError { kind: DbErrorKind::Refused, code: None, message });
        }
        // The parameters are bounded before anything of them is parsed or
        // bound (see `convert::check_params`).
        let checked = crate::tx::convert::check_params(&params, self.limits.max_result_bytes);
        if let Err(StatementError { error, fault }) = checked {
            tracing::info!(handler = %self.handler, source = %self.event_source, id = %self.event_id,
                "handler statement refused before binding: {}", error.message);
            self.doom = Some(fault);
            return Err(error);
        }
        // Test-only (feature sql-policy-switch, EXACTLY_TEST_SQL_POLICY=off):
        // no policy, the database alone is the wall.
        #[cfg(feature = "sql-policy-switch")]
        let verdict = if crate::sql_switch::policy_off() {
            let backend = self.policy.backend();
            Ok(crate::policy::Admitted {
                sql: std::sync::Arc::from(crate::policy::rewrite_placeholders(backend, &sql)),
                // Text the tokenizer cannot read goes to the database as it is.
                placeholders: crate::policy::placeholder_count(backend, &sql).unwrap_or(params.len()),
            })
        } else {
            self.policy.check(&sql)
        };
        #[cfg(not(feature = "sql-policy-switch"))]
        let verdict = self.policy.check(&sql);
        let admitted = match verdict {
            Ok(admitted) => admitted,
            Err(reason) => {
                let message = format!("refused {:?}: {reason}", shorten(&sql));
                tracing::warn!(handler = %self.handler, source = %self.event_source, id = %self.event_id, "{}", printable(&message));
                self.doom = Some(StatementFault::Refused(message.clone()));
                return Err(DbError { kind: DbErrorKind::Refused, code: None, message });
            }
        };
        // The handler's mistake, on both backends alike: PostgreSQL would
        // fail the bind with a protocol error (read as an outage), SQLite
        // would bind NULL for a missing value and drop an extra one.
        if params.len() != admitted.placeholders {
            let message = format!(
                "refused {:?}: {} value{} bound, but the statement takes {} ({})",
                shorten(&sql),
                params.len(),
                if params.len() == 1 { " was" } else { "s were" },
                admitted.placeholders,
                match admitted.placeholders {
                    0 => "no placeholders".to_owned(),
                    1 => "$1".to_owned(),
                    n => format!("$1 to ${n}"),
                }
            );
            tracing::warn!(handler = %self.handler, source = %self.event_source, id = %self.event_id, "{}", printable(&message));
            self.doom = Some(StatementFault::Refused(message.clone()));
            return Err(DbError { kind: DbErrorKind::Refused, code: None, message });
        }
        let caps = self.row_caps();
        let Some(tx) = self.session.as_mut() else {
            return Err(DbError { kind: DbErrorKind::Failed, code: None, message: "no open transaction".into() });
        };
        let started = std::time::Instant::now();
        let ran = tx.run_handler_statement(admitted.sql, params, want_rows, caps).await;
        self.database_time += started.elapsed();
        match ran {
            Ok(output) => Ok(output),
            Err(StatementError { error, fault }) => {
                tracing::info!(handler = %self.handler, source = %self.event_source, id = %self.event_id,
                    code = error.code.as_deref().unwrap_or(""), "handler statement failed: {}", printable(&error.message));
                self.doom = Some(match fault {
                    StatementFault::Refused(message) => {
                        StatementFault::Refused(format!("the database refused {:?}: {message}", shorten(&sql)))
                    }
                    other => other,
                });
                Err(error)
            }
        }
    }
}

impl Host for TxState {
    async fn query(&mut self, sql: String, params: Vec<Value>) -> Result<Rows, DbError> {
        match self.statement(sql, params, true).await? {
            StatementOutput::Rows(rows) => Ok(rows),
            StatementOutput::Affected(_) => Ok(Rows { columns: Vec::new(), rows: Vec::new() }),
        }
    }

    async fn execute(&mut self, sql: String, params: Vec<Value>) -> Result<u64, DbError> {
        match self.statement(sql, params, false).await? {
            StatementOutput::Affected(n) => Ok(n),
            StatementOutput::Rows(rows) => Ok(rows.rows.len() as u64),
        }
    }

    async fn backend(&mut self) -> String {
        self.policy.backend().name().to_owned()
    }
}

fn shorten(sql: &str) -> String {
    const MAX: usize = 200;
    if sql.len() <= MAX {
        return sql.to_owned();
    }
    let mut end = MAX;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &sql[..end])
}
