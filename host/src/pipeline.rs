//! The dedup transaction: one event, one transaction.
//!
//! ```text
//! BEGIN
//! claim (source, id)  ── already committed? ─▶ ROLLBACK; replay its answer
//!   │                                          (or 422 if the payload differs)
//! run the handler in the same transaction
//!   │ any failure ─▶ ROLLBACK: nothing of the event remains
//! store the answer on the claim row (proves the transaction is alive)
//! COMMIT ─▶ answer
//! ```
//!
//! What it guarantees to the server: an `Ok` answer means the claim, the
//! handler's effects and the stored answer are committed together; an
//! `Err` means none of them are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use uuid::Uuid;

use crate::answer::{Committed, ReplyEvent};
use crate::rejection::Rejection;
use crate::decode::CloudEvent;
use crate::fault::{self, Point};
use crate::metrics::{EventTimings, Metrics};
use crate::bindings::exactly::handler::types::{EmittedEvent, Outcome};
use crate::runtime::{Guards, LoadedHandler, Runtime};
use crate::policy::Policy;
use crate::storage::sqlite_guard::SqliteSandbox;
use crate::storage::{Backend, Claim, Database, Sessions};

/// Namespace of reply ids: `uuid5(REPLY_NAMESPACE, source + "\n" + id)`.
const REPLY_NAMESPACE: Uuid = Uuid::from_u128(0x5d1f_0a6e_2b7c_4c1e_9a43_e8a7_c7d3_b001);

pub struct Pipeline {
    /// The host's own connection(s): dead letters, readiness.
    pub database: Database,
    /// Each handler's sessions, where its events' transactions run.
    sessions: Sessions,
    runtime: Runtime,
    /// Each handler's guards, by handler name: the SQL policy (the first
    /// filter) and, on SQLite, the authorizer's sandbox (the wall).
    guards: HashMap<String, Guards>,
    metrics: Arc<Metrics>,
}

/// A processed event's answer, and whether it is a replay.
pub struct Processed {
    pub answer: Committed,
    pub replay: bool,
    pub handler: String,
}

impl Pipeline {
    /// `tables`: each handler's tables, as the database records them
    /// ([`Database::handler_tables`]).
    pub fn new(
        database: Database,
        sessions: Sessions,
        runtime: Runtime,
        tables: &HashMap<String, Vec<String>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let backend = database.backend();
        let guards = runtime
            .handlers()
            .map(|handler| {
                let own = tables.get(&handler.name).cloned().unwrap_or_default();
                let sandbox = (backend == Backend::Sqlite)
                    .then(|| {
                        Arc::new(SqliteSandbox::new(own.clone(), handler.limits.max_result_bytes))
                    });
                (handler.name.clone(), Guards { policy: Arc::new(Policy::new(backend, own)), sandbox })
            })
            .collect();
        Pipeline { database, sessions, runtime, guards, metrics }
    }

    pub async fn process(&self, event: &CloudEvent) -> Result<Processed, Rejection> {
        check_identity(event)?;
        let handler = self
            .runtime
            .route(event.ty())
            .ok_or_else(|| Rejection::NoHandler(event.ty().to_owned()))?;
        tracing::Span::current().record("handler", handler.name.as_str());
        let mut timings = EventTimings::default();
        // A second run only when the first found its session's cached
        // statement stale (a migration changed a table under it): nothing
        // of the first run was committed, and the second runs on a fresh
        // session.
        let result = match self.claim_and_run(handler, event, &mut timings, true).await {
            Ok(None) => {
                tracing::info!("a cached statement no longer fits the schema; running the event again on a fresh session");
                self.claim_and_run(handler, event, &mut timings, false).await
            }
            done => done,
        }
        .and_then(|processed| processed.ok_or_else(|| Rejection::Internal("a second run asked for a third".into())));
        self.metrics.handler_timings(&handler.name, timings.handler, timings.database);
        result
    }

    async fn claim_and_run(
        &self,
        handler: &LoadedHandler,
        event: &CloudEvent,
        timings: &mut EventTimings,
        may_run_again: bool,
    ) -> Result<Option<Processed>, Rejection> {
        let payload_sha256 = event.payload_sha256();
        let started = Instant::now();
        let guards = self
            .guards
            .get(&handler.name)
            .ok_or_else(|| Rejection::Internal(format!("no SQL guards for handler {}", handler.name)))?;
        let mut tx = self.sessions.begin(&handler.name).await?;
        let claimed = tx.claim(event, &handler.name, &payload_sha256).await;
        // The handler's own data limit, checked once the event is known to
        // be new: a committed event replays whatever shape (and size) its
        // redelivery has, a pretty-printed JSON body as well as the compact
        // one that was processed.
        let size = event.data().map_or(0, <[u8]>::len) as u64;
        match claimed {
            Ok(Claim::Owned) if size > handler.limits.max_body_bytes => {
                tx.rollback().await;
                timings.database += started.elapsed();
                return Err(Rejection::DataTooLarge {
                    handler: handler.name.clone(),
                    size,
                    limit: handler.limits.max_body_bytes,
                });
            }
            Ok(Claim::Owned) => fault::hit(Point::AfterClaim),
            Ok(Claim::Duplicate { payload_sha256: stored, answer }) => {
                tx.rollback().await;
                timings.database += started.elapsed();
                if stored != payload_sha256 && stored != event.legacy_payload_sha256() {
                    return Err(Rejection::KeyReused { event_source: event.source().to_owned(), id: event.id().to_owned() });
                }
                return Ok(Some(Processed { answer: *answer, replay: true, handler: handler.name.clone() }));
            }
            Err(rejection) => {
                tx.rollback().await;
                timings.database += started.elapsed();
                return Err(rejection);
            }
        }
        timings.database += started.elapsed();

        let started = Instant::now();
        let (tx, verdict, statements_time) = self.runtime.run(handler, guards, event, tx).await;
        timings.handler = Some(started.elapsed());
        timings.database += statements_time;
        let Some(mut tx) = tx else {
            return Err(Rejection::Internal("the handler run lost the event's transaction".into()));
        };
        if may_run_again && tx.stale_statement() {
            tx.rollback().await;
            return Ok(None);
        }
        // A statement cut off by the deadline may still run on the server
        // (the handler can lift its own statement_timeout): cancel it, so
        // that the rollback below does not wait for it.
        if matches!(verdict, Err(Rejection::Deadline { .. }))
            && let Some(pid) = tx.backend_pid()
        {
            self.database.cancel_backend(pid).await;
        }
        fault::hit(Point::AfterHandler);
        let prepared = verdict.and_then(|outcome| prepare_answer(handler, event, outcome));
        let started = Instant::now();
        let (answer, result) = match prepared {
            Ok(prepared) => prepared,
            Err(rejection) => {
                tx.rollback().await;
                timings.database += started.elapsed();
                return Err(rejection);
            }
        };
        if let Err(rejection) = tx.store_answer(event, &answer, &result).await {
            tx.rollback().await;
            timings.database += started.elapsed();
            return Err(rejection);
        }
        fault::hit(Point::BeforeCommit);
        let committed = tx.commit().await;
        timings.database += started.elapsed();
        committed?;
        fault::hit(Point::AfterCommit);
        Ok(Some(Processed { answer, replay: false, handler: handler.name.clone() }))
    }
}

/// The most bytes an event's `source` or `id` may have: together they are
/// the claim's primary key, and a PostgreSQL btree entry holds about 2,700
/// bytes (a longer key failed the claim on every delivery). Checked on the
/// event path only: the dead-letter sink takes such an event (its key there
/// is a digest), so a sender's event refused here is not lost.
pub const MAX_IDENTITY_BYTES: usize = 1024;

fn check_identity(event: &CloudEvent) -> Result<(), Rejection> {
    for (name, value) in [("source", event.source()), ("id", event.id())] {
        if value.len() > MAX_IDENTITY_BYTES {
            return Err(Rejection::InvalidEvent(format!(
                "attribute `{name}` is {} bytes; exactly takes at most {MAX_IDENTITY_BYTES} bytes (it is the key exactly-once is kept by)",
                value.len()
            )));
        }
    }
    Ok(())
}

/// Turns the handler's outcome into the answer to store: 202 and no body,
/// or 200 and the reply event with its deterministic id.
fn prepare_answer(handler: &LoadedHandler, event: &CloudEvent, outcome: Outcome) -> Result<(Committed, String), Rejection> {
    let bad = |message: String| Rejection::BadOutcome { handler: handler.name.clone(), message };
    // Before the result is parsed or the reply built: a handler could
    // otherwise have the host store and replay an outcome of any size.
    check_outcome_size(&outcome, handler.limits.max_reply_bytes).map_err(bad)?;
    check_result(&outcome.result).map_err(bad)?;
    let answer = match outcome.reply {
        None => Committed { status: 202, reply: None },
        Some(reply) => Committed { status: 200, reply: Some(reply_event(handler, event, reply).map_err(bad)?) },
    };
    Ok((answer, outcome.result))
}

/// The result is JSON that both backends store as it is: PostgreSQL's
/// `jsonb` cannot hold U+0000 in a string, nor a number past its `numeric`
/// range, so such a result is the handler's bad outcome (422) on either
/// backend, not a failed store (500). Numbers are kept to a double's range
/// (their digits are kept as written), to at most [`MAX_FRACTION_DIGITS`]
/// digits after the decimal point once the exponent is applied (`1e-16384`
/// is 0 as a double, and PostgreSQL refuses it) and to an exponent below
/// [`MAX_EXPONENT`] (`0e1073741823` is 0, and PostgreSQL refuses it).
fn check_result(result: &str) -> Result<(), String> {
    let json: serde_json::Value = serde_json::from_str(result).map_err(|e| format!("the result is not JSON: {e}"))?;
    let mut pending = vec![&json];
    while let Some(value) = pending.pop() {
        match value {
            serde_json::Value::String(text) if text.contains('\0') => {
                return Err("the result holds U+0000 in a string, which no stored result may (PostgreSQL's jsonb cannot)".into());
            }
            serde_json::Value::Number(number) if !number.as_f64().is_some_and(f64::is_finite) => {
                return Err(format!("the result holds the number {number}, beyond a double, which no stored result may"));
            }
            serde_json::Value::Number(number) => {
                let text = number.to_string();
                let (fraction_digits, exponent) = numeric_scale(&text);
                let shown = || if text.len() > 40 { format!("{}…", &text[..40]) } else { text.clone() };
                if fraction_digits > MAX_FRACTION_DIGITS {
                    return Err(format!(
                        "the result holds the number {}, with more than {MAX_FRACTION_DIGITS} digits after the decimal \
                         point, which no stored result may (PostgreSQL's numeric cannot)",
                        shown()
                    ));
                }
                if exponent >= MAX_EXPONENT {
                    return Err(format!(
                        "the result holds the number {}, whose exponent is {MAX_EXPONENT} or more, which no stored result \
                         may (PostgreSQL's numeric cannot)",
                        shown()
                    ));
                }
            }
            serde_json::Value::Array(items) => pending.extend(items),
            serde_json::Value::Object(members) => {
                if members.keys().any(|key| key.contains('\0')) {
                    return Err("the result holds U+0000 in a member name, which no stored result may (PostgreSQL's jsonb cannot)".into());
                }
                pending.extend(members.values());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Digits after the decimal point PostgreSQL's `numeric` (and so `jsonb`)
/// keeps at most: `NUMERIC_DSCALE_MAX` (src/include/utils/numeric.h).
const MAX_FRACTION_DIGITS: i128 = 16383;
/// The exponent PostgreSQL's `numeric` input refuses from on, whatever the
/// digits (zero included): `INT_MAX / 2` (src/backend/utils/adt/numeric.c,
/// measured on PostgreSQL 15: `0e1073741822` is taken, `0e1073741823` not).
const MAX_EXPONENT: i128 = 1_073_741_823;

/// How many digits after the decimal point a JSON number (RFC 8259 §6:
/// `-? int frac? exp?`) has once its exponent is applied, the way
/// PostgreSQL's `numeric` input counts them, and its exponent as written
/// (0 without one). The digits: the fraction's as written (trailing zeros
/// count) minus the exponent, at least 0. `1.50` has 2, `1.5e-3` has 4,
/// `15e2` has 0.
fn numeric_scale(number: &str) -> (i128, i128) {
    let (mantissa, exponent) = match number.find(['e', 'E']) {
        Some(at) => (&number[..at], &number[at + 1..]),
        None => (number, "0"),
    };
    let fraction = mantissa.split_once('.').map_or(0, |(_, fraction)| fraction.len() as i128);
    // An exponent of more digits than an i128 holds is far past any limit
    // either way: saturate.
    let exponent = exponent.parse::<i128>().unwrap_or(if exponent.starts_with('-') { i128::MIN / 2 } else { i128::MAX / 2 });
    ((fraction - exponent).max(0), exponent)
}

/// The bytes of an outcome as the host stores and answers it: the JSON
/// result, and the reply event's data, attribute values and extension
/// names and values (the fixed attributes the host adds are not counted).
pub fn outcome_size(outcome: &Outcome) -> u64 {
    let mut size = outcome.result.len();
    if let Some(reply) = &outcome.reply {
        size += reply.type_.len()
            + reply.source.as_ref().map_or(0, String::len)
            + reply.subject.as_ref().map_or(0, String::len)
            + reply.datacontenttype.as_ref().map_or(0, String::len)
            + reply.data.as_ref().map_or(0, Vec::len)
            + reply.extensions.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
    }
    size as u64
}

/// The outcome is at most `max_bytes` (the handler's `max_reply_bytes`), or
/// it is a bad outcome: 422, deterministic, since the same event makes the
/// same handler return the same outcome again.
fn check_outcome_size(outcome: &Outcome, max_bytes: u64) -> Result<(), String> {
    let size = outcome_size(outcome);
    if size > max_bytes {
        return Err(format!(
            "the result and reply event take {size} bytes; the handler's max_reply_bytes is {max_bytes}"
        ));
    }
    Ok(())
}

/// A reply the host can send as a CloudEvent in binary mode, or why not
/// (422 `bad-outcome`: the same event makes the handler answer the same).
fn check_reply(reply: &EmittedEvent) -> Result<(), String> {
    if reply.type_.is_empty() {
        return Err("reply type is empty".into());
    }
    if reply.source.as_deref() == Some("") {
        return Err("reply source is empty".into());
    }
    // The reply travels as headers: every attribute a CloudEvents String
    // (no control characters, no noncharacters), its media type a header
    // value as sent, and never an event format (the broker would read the
    // data as the event, with an id the handler chose).
    let strings = [("type", Some(&reply.type_)), ("source", reply.source.as_ref()), ("subject", reply.subject.as_ref())]
        .into_iter()
        .chain([("datacontenttype", reply.datacontenttype.as_ref())])
        .chain(reply.extensions.iter().map(|(name, value)| (name.as_str(), Some(value))));
    for (name, value) in strings {
        if let Some(c) = value.and_then(|value| value.chars().find(|&c| crate::decode::forbidden_in_string(c))) {
            return Err(format!("reply attribute {name:?} holds U+{:04X}, which a CloudEvents String may not hold", c as u32));
        }
    }
    if let Some(content_type) = &reply.datacontenttype {
        if !content_type.bytes().all(|b| b.is_ascii_graphic() || b == b' ') || http::HeaderValue::from_str(content_type).is_err() {
            return Err(format!("reply datacontenttype {content_type:?} is not a Content-Type header value (visible ASCII)"));
        }
        if crate::media_type::is_event_format(content_type) {
            return Err(format!(
                "reply datacontenttype {content_type:?} names a CloudEvents event format: the reply's data would be read as the event"
            ));
        }
    }
    for (name, _) in &reply.extensions {
        let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let reserved = ["id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema", "data"]
            .contains(&name.as_str());
        if !valid || reserved {
            return Err(format!("reply extension name {name:?} is not a valid CloudEvents extension name"));
        }
    }
    Ok(())
}

fn reply_event(handler: &LoadedHandler, event: &CloudEvent, reply: EmittedEvent) -> Result<ReplyEvent, String> {
    check_reply(&reply)?;
    // The reply continues the event's trace, unless the handler set a
    // `traceparent` of its own (then its `tracestate` stays its own too).
    let mut extensions = reply.extensions;
    if !extensions.iter().any(|(name, _)| name == "traceparent") {
        let handler_state = extensions.iter().any(|(name, _)| name == "tracestate");
        extensions.extend(
            crate::otel::reply_trace(event)
                .into_iter()
                .filter(|(name, _)| !(handler_state && name == "tracestate")),
        );
    }
    Ok(ReplyEvent {
        id: reply_id(event.source(), event.id()).to_string(),
        source: reply.source.unwrap_or_else(|| format!("/exactly/{}", handler.name)),
        ty: reply.type_,
        subject: reply.subject,
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        datacontenttype: reply.datacontenttype.unwrap_or_else(|| "application/json".into()),
        extensions,
        data: reply.data,
    })
}

/// The reply's id depends only on the incoming `(source, id)`: a consumer
/// downstream can deduplicate replies the same way `exactly` deduplicates
/// events.
pub fn reply_id(source: &str, id: &str) -> Uuid {
    Uuid::new_v5(&REPLY_NAMESPACE, format!("{source}\n{id}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply travels as headers of a binary-mode CloudEvent: its strings
    /// follow the CloudEvents String rule, its media type is a header value
    /// and never an event format (found by a fresh attacker: a reply whose
    /// datacontenttype was application/cloudevents+json would be read by
    /// the broker as the event its data holds, with an id of the
    /// handler's choosing; one not a header value was dropped silently).
    #[test]
    fn replies_the_host_cannot_send_as_they_are_are_bad_outcomes() {
        assert!(check_reply(&reply(1)).is_ok());
        let bad = [
            EmittedEvent { datacontenttype: Some("application/cloudevents+json".into()), ..reply(1) },
            EmittedEvent { datacontenttype: Some("Application/CloudEvents-Batch+JSON; charset=utf-8".into()), ..reply(1) },
            EmittedEvent { datacontenttype: Some("text/plain; charset=é".into()), ..reply(1) },
            EmittedEvent { subject: Some("a\nb".into()), ..reply(1) },
            EmittedEvent { source: Some("urn:\u{85}".into()), ..reply(1) },
            EmittedEvent { source: Some(String::new()), ..reply(1) },
            EmittedEvent { extensions: vec![("ext".into(), "\u{fffe}".into())], ..reply(1) },
            EmittedEvent { type_: "t\r".into(), ..reply(1) },
        ];
        for reply in bad {
            assert!(check_reply(&reply).is_err(), "{reply:?}");
        }
    }

    fn reply(data: usize) -> EmittedEvent {
        EmittedEvent {
            type_: "t".into(),
            source: None,
            subject: None,
            datacontenttype: None,
            extensions: vec![("ext".into(), "v".repeat(10))],
            data: Some(vec![b'x'; data]),
        }
    }

    #[test]
    fn results_are_json_every_backend_can_store() {
        assert!(check_result(r#"{"a": [1, "x", {"b": null}]}"#).is_ok());
        assert!(check_result(r#"{"a": ["x\u0000"]}"#).unwrap_err().contains("U+0000"));
        assert!(check_result(r#"{"a\u0000": 1}"#).unwrap_err().contains("member name"));
        assert!(check_result("{").unwrap_err().contains("not JSON"));
        assert!(check_result("[1e400]").unwrap_err().contains("beyond a double"), "beyond a double: refused");
        assert!(check_result("[0.10000000000000000001, 18446744073709551617]").is_ok(), "precise, and within range");
        // PostgreSQL's numeric keeps 16383 digits after the point: 1e-16384
        // is 0 as a double but refused by jsonb (it was a 500).
        for stored in ["1e-16383", "1E-16383", "0.1e-16382", "-1.5e-16382", "15e2", "0e999999", "1.50", "0e1073741822", "-0.0e+1073741822"] {
            assert!(check_result(&format!("[{stored}]")).is_ok(), "{stored}");
        }
        for refused in ["1e-16384", "0.1e-16383", "0e-16384", "-1.5e-16383", "1e-99999999999999999999999999999999999999999"] {
            let error = check_result(&format!("{{\"a\": [{refused}]}}")).unwrap_err();
            assert!(error.contains("digits after the decimal point"), "{refused}: {error}");
        }
        // Zero with an exponent PostgreSQL's input refuses (it was a 500).
        for refused in ["0e1073741823", "0.0E+1073741823", "0e99999999999999999999999999999999999999999999"] {
            let error = check_result(&format!("[{refused}]")).unwrap_err();
            assert!(error.contains("exponent"), "{refused}: {error}");
        }
        assert_eq!(numeric_scale("1.5e-3"), (4, -3));
        assert_eq!(numeric_scale("1.5e+3"), (0, 3));
    }

    #[test]
    fn outcomes_count_the_result_and_the_whole_reply() {
        let outcome = Outcome { result: "{}".into(), reply: Some(reply(100)) };
        assert_eq!(outcome_size(&outcome), 2 + 1 + 3 + 10 + 100);
        assert!(check_outcome_size(&outcome, 116).is_ok());
        let error = check_outcome_size(&outcome, 115).unwrap_err();
        assert!(error.contains("max_reply_bytes is 115"), "{error}");
        let big_result = Outcome { result: format!("\"{}\"", "x".repeat(2000)), reply: None };
        assert!(check_outcome_size(&big_result, 1000).is_err());
    }

    #[test]
    fn reply_ids_are_deterministic_and_distinct() {
        assert_eq!(reply_id("s", "1"), reply_id("s", "1"));
        assert_ne!(reply_id("s", "1"), reply_id("s", "2"));
    }
}
