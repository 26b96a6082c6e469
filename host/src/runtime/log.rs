//! The `log` import: handler log lines, attributed to the handler and the
//! event they were written for.

use super::EventState;
use super::bindings::exactly::handler::log::{Host, Level};

/// Longest message kept from one call; the rest is cut.
const MAX_MESSAGE: usize = 16 * 1024;

impl Host for EventState {
    async fn write(&mut self, level: Level, message: String) {
        let message = if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… ({} bytes cut)", &message[..end], message.len() - end)
        } else {
            message
        };
        let (handler, source, id) = (&*self.handler, &self.event_source, &self.event_id);
        match level {
            Level::Trace => tracing::trace!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Debug => tracing::debug!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Info => tracing::info!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Warn => tracing::warn!(target: "exactly::handler", handler, %source, %id, "{message}"),
            Level::Error => tracing::error!(target: "exactly::handler", handler, %source, %id, "{message}"),
        }
    }
}
