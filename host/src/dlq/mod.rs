//! Dead letters: `exactly` as the Knative Trigger's dead-letter sink.
//!
//! When the Knative Kafka dispatcher gives up on an event (a non-retryable
//! answer, or the retries ran out) it posts the event to the Trigger's
//! dead-letter sink with three extensions added: `knativeerrorcode` (the
//! last HTTP status), `knativeerrordata` (the last answer's body, base64)
//! and `knativeerrordest` (where it was going). `POST /dead-letter` stores
//! that event whole in the host table `exactly.dead_letters`
//! (`exactly_dead_letters` on SQLite) and answers 202 only once the row is
//! committed. A dead letter that is not a valid CloudEvent is stored too,
//! kept as received with the reason (see [`raw`]): the dispatcher commits
//! the offset on any 4xx, so the only refusals are its size (413) and the
//! database (503 when unreachable or contended, 500 for anything else).
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
//! row: `replayed_at` is set only when the target answered 2xx and no
//! new delivery of the dead letter arrived meanwhile ([`rows::record`]).
//!
//! The module's parts, one concept each: [`sink`] stores what `POST
//! /dead-letter` receives (the dedup key, the quota, the SQL of both
//! backends), [`raw`] what it keeps of a request that is not a valid
//! event; [`rows`] reads and updates stored rows; [`cli`] is the
//! `exactly dlq` command line and its table printer; [`replay`] is the
//! client that sends an event again.

pub mod cli;
mod raw;
mod replay;
mod rows;
pub mod sink;

use base64::Engine;

pub use cli::{DlqArgs, run};
pub use sink::{DEFAULT_QUOTA, Letter, Stored, accepted, store};

/// The path the Knative Trigger's `delivery.deadLetterSink` points at.
pub const PATH: &str = "/dead-letter";

/// The extensions the Knative dispatcher adds to a dead-lettered event.
pub const ERROR_CODE: &str = "knativeerrorcode";
pub const ERROR_DATA: &str = "knativeerrordata";
pub const ERROR_DEST: &str = "knativeerrordest";

/// A cell on one line: control characters (newlines in error bodies) and
/// the bidirectional formatting characters (which could make text display
/// reversed, `urn:\u{202e}gnp.exe` as `urn:exe.png`) become spaces.
pub(super) fn one_line(text: &str) -> String {
    use crate::printable::is_bidi_formatting;
    text.chars().map(|c| if c.is_control() || is_bidi_formatting(c) { ' ' } else { c }).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_no_control_or_bidi_characters() {
        assert_eq!(one_line("a\nb\u{9b}c"), "a b c");
        assert_eq!(one_line("urn:\u{202e}gnp.exe"), "urn: gnp.exe");
    }

    #[test]
    fn error_data_is_decoded_when_it_is_base64_text() {
        assert_eq!(decode_error_data("eyJlcnJvciI6ICJ4In0="), r#"{"error": "x"}"#);
        assert_eq!(decode_error_data("not base64!"), "not base64!");
        assert!(decode_error_data("/w==").contains("not UTF-8"));
    }
}
