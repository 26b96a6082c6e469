//! The verdict: for every event the harness produced, were its effects
//! applied exactly once, or is it in the dead-letter store with a reason?
//!
//! What is compared, per `(source, id)`:
//!
//! - its effect rows, written by the handler inside the event's
//!   transaction: `order_events` (`created` / `paid`) for orders and
//!   payments, `test_effects` for testkit events; plus the `orders` and
//!   `payments` rows an order or a payment must have left;
//! - the host's claim row in `exactly.processed_events` (present iff the
//!   transaction committed);
//! - what the dispatcher saw: the 2xx answers, their reply CloudEvents and
//!   `exactly-replay`, or the dead-letter reason.
//!
//! An event is **lost** when nothing of it was applied and it is not in the
//! dead-letter store (worst: it was acknowledged with a 2xx); **applied
//! twice** when an effect row appears more than once; **half-applied** when
//! effect rows and claim row disagree (effects without a claim, a committed
//! claim without effects, an order event without its order row…).

use std::collections::{HashMap, HashSet};

use sqlx::PgPool;

use super::dispatcher::{EventRecord, Ledger};
use super::faults::retry_sql;
use super::plan::{Kind, PlannedEvent, expected_reply_id};

/// The checker's findings. Every list holds human-readable evidence.
#[derive(Debug, Default)]
pub struct Verdict {
    pub events: usize,
    pub applied_once: usize,
    pub dead_lettered: usize,
    /// Every dead-lettered event with its reason.
    pub dead_letters: Vec<String>,
    pub lost: Vec<String>,
    pub applied_twice: Vec<String>,
    pub half_applied: Vec<String>,
    pub reply_mismatches: Vec<String>,
    /// Applied once and also dead-lettered: the dispatcher gave up on an
    /// event whose transaction committed.
    pub applied_and_dead_lettered: Vec<String>,
    /// Dead-lettered duplicates of events that succeeded, and duplicates
    /// that were answered without `exactly-replay: true`.
    pub duplicate_anomalies: Vec<String>,
    /// Effect or claim rows of `(source, id)`s the harness never produced.
    pub foreign_rows: Vec<String>,
}

impl Verdict {
    /// No event lost or doubled, nothing half-applied, every reply right.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.applied_twice.is_empty()
            && self.half_applied.is_empty()
            && self.reply_mismatches.is_empty()
            && self.duplicate_anomalies.is_empty()
            && self.foreign_rows.is_empty()
    }

    /// Every finding, a line each (at most `limit` per kind).
    pub fn report(&self, limit: usize) -> String {
        let mut text = String::new();
        for (name, list) in [
            ("lost", &self.lost),
            ("applied twice", &self.applied_twice),
            ("half-applied", &self.half_applied),
            ("reply mismatch", &self.reply_mismatches),
            ("applied and dead-lettered", &self.applied_and_dead_lettered),
            ("dead-lettered", &self.dead_letters),
            ("duplicate anomaly", &self.duplicate_anomalies),
            ("foreign row", &self.foreign_rows),
        ] {
            for line in list.iter().take(limit) {
                text.push_str(&format!("{name}: {line}\n"));
            }
            if list.len() > limit {
                text.push_str(&format!("{name}: … and {} more\n", list.len() - limit));
            }
        }
        text
    }
}

/// `(source, id)`.
pub type Key = (String, String);

/// What the database holds, read once at the end of the run.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `order_events` rows per `(event_source, event_id, kind)`.
    pub order_events: HashMap<(String, String, String), usize>,
    /// `test_effects` rows per `(event_source, event_id)`.
    pub test_effects: HashMap<Key, usize>,
    /// `exactly.processed_events`: `(status, reply id)` per `(source, id)`.
    pub processed: HashMap<Key, (String, String)>,
    /// `orders`: status per order id.
    pub orders: HashMap<String, String>,
    /// `payments`: the order ids recorded per payment id.
    pub payments: HashMap<String, Vec<String>>,
}

/// Reads the database and judges every event.
pub async fn check(
    pool: &PgPool,
    events: &[PlannedEvent],
    ledger: &Ledger,
) -> anyhow::Result<Verdict> {
    let snapshot = load(pool).await?;
    let records: Vec<EventRecord> = ledger
        .records
        .iter()
        .map(|record| record.lock().unwrap().clone())
        .collect();
    Ok(judge(&snapshot, events, &records))
}

/// Reads every table the verdict needs.
pub async fn load(pool: &PgPool) -> anyhow::Result<Snapshot> {
    let rows = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            let pool = &pool;
            retry_sql(|| async move {
                sqlx::query_as::<_, (String, String, String)>(sql)
                    .fetch_all(pool)
                    .await
            })
            .await
        }
    };
    let mut snapshot = Snapshot::default();
    for (source, id, kind) in rows("SELECT event_source, event_id, kind FROM order_events").await? {
        *snapshot.order_events.entry((source, id, kind)).or_default() += 1;
    }
    for (source, id, _kind) in rows("SELECT event_source, event_id, kind FROM test_effects").await?
    {
        *snapshot.test_effects.entry((source, id)).or_default() += 1;
    }
    for (source, id, answer) in rows(
        "SELECT source, id, coalesce(CAST(status AS text), '') || ' ' || coalesce(reply->>'id', '') \
         FROM exactly.processed_events",
    )
    .await?
    {
        let (status, reply_id) = answer.split_once(' ').unwrap_or((&answer, ""));
        snapshot
            .processed
            .insert((source, id), (status.to_owned(), reply_id.to_owned()));
    }
    for (order_id, status, _) in rows("SELECT order_id, status, '' FROM orders").await? {
        snapshot.orders.insert(order_id, status);
    }
    for (payment_id, order_id, _) in rows("SELECT payment_id, order_id, '' FROM payments").await? {
        snapshot
            .payments
            .entry(payment_id)
            .or_default()
            .push(order_id);
    }
    Ok(snapshot)
}

/// The verdict on every event, from the database's rows and the ledger's
/// records (one per event, in the order of `events`).
pub fn judge(snapshot: &Snapshot, events: &[PlannedEvent], records: &[EventRecord]) -> Verdict {
    let Snapshot {
        order_events,
        test_effects,
        processed,
        orders,
        payments,
    } = snapshot;
    let mut verdict = Verdict {
        events: events.len(),
        ..Verdict::default()
    };
    let mut produced: HashSet<Key> = HashSet::new();
    for (index, event) in events.iter().enumerate() {
        let key = (event.source.clone(), event.id.clone());
        produced.insert(key.clone());
        let record = &records[index];
        let name = format!("({}, {}) {}", event.source, event.id, event.type_);

        let effects = match &event.kind {
            Kind::Order { .. } => order_events
                .get(&(event.source.clone(), event.id.clone(), "created".to_owned()))
                .copied()
                .unwrap_or(0),
            Kind::Payment { .. } => order_events
                .get(&(event.source.clone(), event.id.clone(), "paid".to_owned()))
                .copied()
                .unwrap_or(0),
            Kind::Emit | Kind::Flaky => test_effects.get(&key).copied().unwrap_or(0),
        };
        let claim = processed.get(&key);
        let committed_2xx = claim.is_some_and(|(status, _)| status.starts_with('2'));

        if effects > 1 {
            verdict.applied_twice.push(format!(
                "{name}: {effects} effect rows; {}",
                describe(record)
            ));
        }
        match (effects > 0, claim) {
            (true, None) => verdict.half_applied.push(format!(
                "{name}: effect rows but no processed_events row; {}",
                describe(record)
            )),
            (false, Some((status, _))) if committed_2xx => verdict.half_applied.push(format!(
                "{name}: processed_events says {status} but no effect row; {}",
                describe(record)
            )),
            _ => {}
        }
        // The rows an applied order or payment must have left.
        if effects > 0 {
            match &event.kind {
                Kind::Order { order_id } if !orders.contains_key(order_id) => {
                    verdict.half_applied.push(format!(
                        "{name}: order_events row but no orders row {order_id}"
                    ))
                }
                Kind::Payment {
                    order_id,
                    payment_id,
                } => {
                    if payments.get(payment_id).map(Vec::as_slice) != Some(&[order_id.clone()][..])
                    {
                        verdict.half_applied.push(format!(
                            "{name}: paid event but payments has {:?} for {payment_id}",
                            payments.get(payment_id)
                        ));
                    }
                    if orders.get(order_id).map(String::as_str) != Some("paid") {
                        verdict.half_applied.push(format!(
                            "{name}: paid event but order {order_id} has status {:?}",
                            orders.get(order_id)
                        ));
                    }
                }
                _ => {}
            }
        }

        // Any trace of the event in the database.
        let applied = effects > 0 || committed_2xx;
        if let Some(reason) = &record.dead_letter {
            verdict.dead_lettered += 1;
            verdict.dead_letters.push(format!("{name}: {reason}"));
            if applied {
                verdict
                    .applied_and_dead_lettered
                    .push(format!("{name}: {reason}"));
            }
        } else if !applied {
            let acknowledged = if record.successes.is_empty() {
                ""
            } else {
                "ACKNOWLEDGED WITH A 2xx, "
            };
            verdict.lost.push(format!(
                "{name}: {acknowledged}no effect and no committed processed_events row \
                 ({claim:?}), not dead-lettered; {}",
                describe(record)
            ));
        } else if effects == 1 && committed_2xx {
            verdict.applied_once += 1;
        }

        check_replies(event, record, claim, &name, &mut verdict);
        for anomaly in &record.duplicate_dead_letters {
            verdict
                .duplicate_anomalies
                .push(format!("{name}: {anomaly}"));
        }
        if record.duplicate_not_replayed > 0 {
            verdict.duplicate_anomalies.push(format!(
                "{name}: {} deliberate duplicate(s) answered without exactly-replay: true",
                record.duplicate_not_replayed
            ));
        }
    }

    let foreign_keys = order_events
        .keys()
        .map(|(source, id, _)| (source.clone(), id.clone()))
        .chain(test_effects.keys().cloned())
        .chain(processed.keys().cloned());
    for key in foreign_keys {
        if !produced.contains(&key) {
            verdict.foreign_rows.push(format!("({}, {})", key.0, key.1));
        }
    }
    verdict.foreign_rows.sort();
    verdict.foreign_rows.dedup();
    verdict
}

/// Every 2xx answer of an event agrees with the others and with the stored
/// answer; a reply's id is uuid5 of `(source, id)`.
fn check_replies(
    event: &PlannedEvent,
    record: &EventRecord,
    claim: Option<&(String, String)>,
    name: &str,
    verdict: &mut Verdict,
) {
    let expected = expected_reply_id(&event.source, &event.id);
    for success in &record.successes {
        match (&success.reply, event.expects_reply()) {
            (Some(reply), true) => {
                if reply.id != expected || success.status != 200 {
                    verdict.reply_mismatches.push(format!(
                        "{name}: HTTP {} reply id {} (expected 200 and {expected})",
                        success.status, reply.id
                    ));
                }
                if reply.type_ != "test.emitted" {
                    verdict
                        .reply_mismatches
                        .push(format!("{name}: reply type {}", reply.type_));
                }
            }
            (None, true) => verdict.reply_mismatches.push(format!(
                "{name}: HTTP {} without the reply CloudEvent",
                success.status
            )),
            (Some(reply), false) => verdict
                .reply_mismatches
                .push(format!("{name}: unexpected reply {}", reply.id)),
            (None, false) => {
                if success.status != 202 {
                    verdict
                        .reply_mismatches
                        .push(format!("{name}: HTTP {} (expected 202)", success.status));
                }
            }
        }
    }
    if let Some(first) = record.successes.first() {
        for other in &record.successes[1..] {
            if other.status != first.status || other.reply != first.reply {
                verdict.reply_mismatches.push(format!(
                    "{name}: deliveries answered differently: {first:?} and {other:?}"
                ));
            }
        }
    }
    if let Some((status, stored_reply_id)) = claim
        && event.expects_reply() && status.starts_with('2') && stored_reply_id != &expected {
            verdict.reply_mismatches.push(format!(
                "{name}: the stored reply id is {stored_reply_id:?}, expected {expected}"
            ));
        }
}

fn describe(record: &EventRecord) -> String {
    format!(
        "{} attempts, {} 2xx answers (replays: {}), dead letter: {:?}",
        record.attempts,
        record.successes.len(),
        record.successes.iter().filter(|s| s.replay).count(),
        record.dead_letter
    )
}

#[cfg(test)]
mod tests {
    //! The checker must see what it is there to see: each kind of violation
    //! planted in an otherwise clean snapshot is reported, and only it.

    use super::*;
    use crate::harness::dispatcher::{ReplyEvent, Success};
    use crate::harness::plan::{ORDER_SOURCE, PAYMENT_SOURCE, TESTKIT_SOURCE};
    use serde_json::json;

    fn event(source: &str, id: &str, type_: &str, kind: Kind) -> PlannedEvent {
        PlannedEvent {
            source: source.to_owned(),
            id: id.to_owned(),
            type_: type_.to_owned(),
            data: json!({}),
            kind,
            duplicate: false,
            concurrent: false,
        }
    }

    fn key(source: &str, id: &str) -> Key {
        (source.to_owned(), id.to_owned())
    }

    /// An order, its payment and a replying testkit event, all applied once
    /// and answered right.
    fn clean() -> (Snapshot, Vec<PlannedEvent>, Vec<EventRecord>) {
        let events = vec![
            event(
                ORDER_SOURCE,
                "order-1",
                "order.created",
                Kind::Order {
                    order_id: "o-1".into(),
                },
            ),
            event(
                PAYMENT_SOURCE,
                "pay-1",
                "order.payment",
                Kind::Payment {
                    order_id: "o-1".into(),
                    payment_id: "p-1".into(),
                },
            ),
            event(TESTKIT_SOURCE, "emit-2", "test.emit", Kind::Emit),
        ];
        let reply_id = expected_reply_id(TESTKIT_SOURCE, "emit-2");
        let mut snapshot = Snapshot::default();
        snapshot
            .order_events
            .insert((ORDER_SOURCE.into(), "order-1".into(), "created".into()), 1);
        snapshot
            .order_events
            .insert((PAYMENT_SOURCE.into(), "pay-1".into(), "paid".into()), 1);
        snapshot
            .test_effects
            .insert(key(TESTKIT_SOURCE, "emit-2"), 1);
        snapshot
            .processed
            .insert(key(ORDER_SOURCE, "order-1"), ("202".into(), String::new()));
        snapshot
            .processed
            .insert(key(PAYMENT_SOURCE, "pay-1"), ("202".into(), String::new()));
        snapshot.processed.insert(
            key(TESTKIT_SOURCE, "emit-2"),
            ("200".into(), reply_id.clone()),
        );
        snapshot.orders.insert("o-1".into(), "paid".into());
        snapshot.payments.insert("p-1".into(), vec!["o-1".into()]);
        let accepted = |replay| EventRecord {
            successes: vec![Success {
                status: 202,
                reply: None,
                replay,
            }],
            delivered: true,
            attempts: 1,
            ..EventRecord::default()
        };
        let replied = EventRecord {
            successes: vec![Success {
                status: 200,
                reply: Some(ReplyEvent {
                    id: reply_id,
                    type_: "test.emitted".into(),
                    source: "/exactly/testkit".into(),
                }),
                replay: false,
            }],
            delivered: true,
            attempts: 1,
            ..EventRecord::default()
        };
        (
            snapshot,
            events,
            vec![accepted(false), accepted(false), replied],
        )
    }

    #[test]
    fn a_clean_run_is_clean() {
        let (snapshot, events, records) = clean();
        let verdict = judge(&snapshot, &events, &records);
        assert!(verdict.is_clean(), "{}", verdict.report(10));
        assert_eq!(verdict.applied_once, 3);
        assert_eq!(verdict.dead_lettered, 0);
    }

    #[test]
    fn a_second_effect_row_is_applied_twice() {
        let (mut snapshot, events, records) = clean();
        snapshot
            .order_events
            .insert((PAYMENT_SOURCE.into(), "pay-1".into(), "paid".into()), 2);
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.applied_twice.len(), 1, "{}", verdict.report(10));
        assert!(verdict.applied_twice[0].contains("pay-1"));
    }

    #[test]
    fn an_acknowledged_event_without_rows_is_lost() {
        let (mut snapshot, events, records) = clean();
        snapshot.test_effects.clear();
        snapshot.processed.remove(&key(TESTKIT_SOURCE, "emit-2"));
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.lost.len(), 1, "{}", verdict.report(10));
        assert!(verdict.lost[0].contains("ACKNOWLEDGED"));
    }

    #[test]
    fn a_dead_lettered_event_without_rows_is_not_lost() {
        let (mut snapshot, events, mut records) = clean();
        snapshot.test_effects.clear();
        snapshot.processed.remove(&key(TESTKIT_SOURCE, "emit-2"));
        records[2] = EventRecord {
            dead_letter: Some("HTTP 422".into()),
            attempts: 1,
            ..EventRecord::default()
        };
        let verdict = judge(&snapshot, &events, &records);
        assert!(verdict.is_clean(), "{}", verdict.report(10));
        assert_eq!(verdict.dead_lettered, 1);
        assert_eq!(verdict.applied_once, 2);
    }

    #[test]
    fn effects_and_claim_must_agree() {
        // Effects without the claim row.
        let (mut snapshot, events, records) = clean();
        snapshot.processed.remove(&key(ORDER_SOURCE, "order-1"));
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.half_applied.len(), 1, "{}", verdict.report(10));
        assert!(verdict.lost.is_empty());

        // A committed claim without effects.
        let (mut snapshot, events, records) = clean();
        snapshot
            .order_events
            .remove(&(PAYMENT_SOURCE.into(), "pay-1".into(), "paid".into()));
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.half_applied.len(), 1, "{}", verdict.report(10));

        // A paid event whose payment row is missing.
        let (mut snapshot, events, records) = clean();
        snapshot.payments.clear();
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.half_applied.len(), 1, "{}", verdict.report(10));
    }

    #[test]
    fn reply_ids_must_be_deterministic_and_replayed_alike() {
        let (snapshot, events, mut records) = clean();
        let mut other = records[2].successes[0].clone();
        other.reply.as_mut().unwrap().id = uuid::Uuid::new_v4().to_string();
        other.replay = true;
        records[2].successes.push(other);
        let verdict = judge(&snapshot, &events, &records);
        // The wrong id, and the replay that differs from the first answer.
        assert_eq!(verdict.reply_mismatches.len(), 2, "{}", verdict.report(10));

        let (mut snapshot, events, records) = clean();
        snapshot.processed.insert(
            key(TESTKIT_SOURCE, "emit-2"),
            ("200".into(), "not-the-id".into()),
        );
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.reply_mismatches.len(), 1, "{}", verdict.report(10));
    }

    #[test]
    fn rows_of_unknown_events_are_reported() {
        let (mut snapshot, events, records) = clean();
        snapshot
            .test_effects
            .insert(key(TESTKIT_SOURCE, "ghost"), 1);
        let verdict = judge(&snapshot, &events, &records);
        assert_eq!(verdict.foreign_rows.len(), 1, "{}", verdict.report(10));
    }
}
