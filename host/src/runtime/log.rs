//! The `log` import: handler log lines, attributed to the handler and the
//! event they were written for.

use super::EventState;
use crate::bindings::exactly::handler::log::{Host, Level};
use crate::printable::printable;
use crate::rejection::LimitKind;
use crate::tx::convert::StatementFault;

/// Longest message kept from one call; the rest is cut.
const MAX_MESSAGE: usize = 16 * 1024;

impl Host for EventState {
    async fn write(&mut self, level: Level, message: String) {
        self.log_bytes = self.log_bytes.saturating_add(message.len() as u64);
        if self.log_bytes > self.limits.max_log_bytes {
            if self.tx.doom.is_none() {
                tracing::warn!(handler = %self.tx.handler, source = %self.tx.event_source, id = %self.tx.event_id,
                    max_log_bytes = self.limits.max_log_bytes, "handler exceeded its log volume; dropping its lines and failing the event");
                self.tx.doom = Some(StatementFault::Limit(LimitKind::LogVolume, format!("more than {} bytes of log", self.limits.max_log_bytes)));
            }
            return;
        }
        let message = if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… ({} bytes cut)", &message[..end], message.len() - end)
        } else {
            message
        };
        let message = printable(&message);
        let (handler, source, id) = (&*self.tx.handler, printable(&self.tx.event_source), printable(&self.tx.event_id));
        match level {
            Level::Trace => tracing::trace!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Debug => tracing::debug!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Info => tracing::info!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Warn => tracing::warn!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Error => tracing::error!(target: "exactly::handler", handler, %source, %id, "{message}"),
        }
    }
}
