//! The events a run produces, decided up front from the seed.
//!
//! A mix of orders, payments for most of them, testkit events whose handler
//! replies with a CloudEvent (`test.emit`: the reply ids are checked), and
//! testkit events that fail while the harness holds the `fail` flag
//! (`test.flaky`). The stream is reordered within windows, so payments
//! often arrive before their order (the host answers 500 and the
//! dispatcher retries until the order is in). Each event also carries the
//! dispatcher's plan for it: a deliberate duplicate after its success, or
//! two concurrent first deliveries.

use rand::prelude::*;
use serde_json::{Value, json};

/// Sources of the harness's events (a CloudEvent is identified by
/// `(source, id)`).
pub const ORDER_SOURCE: &str = "urn:exactly:harness:checkout";
pub const PAYMENT_SOURCE: &str = "urn:exactly:harness:payments";
pub const TESTKIT_SOURCE: &str = "urn:exactly:harness:testkit";

/// Namespace of the host's reply ids (computed here independently of the
/// host's code): `uuid5(namespace, source + "\n" + id)`.
pub const REPLY_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5d1f_0a6e_2b7c_4c1e_9a43_e8a7_c7d3_b001);

/// The reply id the host must give the reply to `(source, id)`.
pub fn expected_reply_id(source: &str, id: &str) -> String {
    uuid::Uuid::new_v5(&REPLY_NAMESPACE, format!("{source}\n{id}").as_bytes()).to_string()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `order.created`: an `orders` row and an `order_events` row `created`.
    Order { order_id: String },
    /// `order.payment`: the order paid, a `payments` row, an `order_events`
    /// row `paid`.
    Payment {
        order_id: String,
        payment_id: String,
    },
    /// `test.emit`: a `test_effects` row and a reply CloudEvent.
    Emit,
    /// `test.flaky`: a `test_effects` row; retryable while the flag is set.
    Flaky,
}

#[derive(Clone, Debug)]
pub struct PlannedEvent {
    pub source: String,
    pub id: String,
    pub type_: String,
    pub data: Value,
    pub kind: Kind,
    /// Send it once more after it succeeded (a Kafka redelivery after a
    /// lost offset commit).
    pub duplicate: bool,
    /// Deliver it twice at the same time (two dispatchers after a
    /// rebalance).
    pub concurrent: bool,
}

impl PlannedEvent {
    pub fn data_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.data).expect("JSON serializes")
    }

    /// Binary-mode headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ce-specversion", "1.0".to_owned()),
            ("ce-id", self.id.clone()),
            ("ce-source", self.source.clone()),
            ("ce-type", self.type_.clone()),
            ("content-type", "application/json".to_owned()),
        ]
    }

    /// Whether the host must reply with a CloudEvent.
    pub fn expects_reply(&self) -> bool {
        self.kind == Kind::Emit
    }
}

/// How the stream is shaped.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    pub events: usize,
    pub duplicate_rate: f64,
    pub concurrent_rate: f64,
    /// Events are shuffled within windows of this many.
    pub reorder_window: usize,
}

/// The events in the order the dispatcher takes them.
pub fn plan(config: &PlanConfig, rng: &mut StdRng) -> Vec<PlannedEvent> {
    let mut events = Vec::with_capacity(config.events);
    let mut n = 0usize;
    while events.len() < config.events {
        n += 1;
        let roll: f64 = rng.random();
        if roll < 0.60 {
            // An order, and a payment for 80 % of them.
            let order_id = format!("o-{n}");
            let cents: u64 = rng.random_range(100..1_000_000);
            let total = format!("{}.{:02}", cents / 100, cents % 100);
            events.push(event(
                ORDER_SOURCE,
                format!("order-{n}"),
                "order.created",
                json!({"order_id": order_id, "customer_id": format!("c-{}", n % 97), "total": total}),
                Kind::Order {
                    order_id: order_id.clone(),
                },
            ));
            if rng.random_bool(0.8) && events.len() < config.events {
                let payment_id = format!("p-{n}");
                events.push(event(
                    PAYMENT_SOURCE,
                    format!("pay-{n}"),
                    "order.payment",
                    json!({"order_id": order_id, "payment_id": payment_id, "amount": total}),
                    Kind::Payment {
                        order_id,
                        payment_id,
                    },
                ));
            }
        } else if roll < 0.80 {
            events.push(event(
                TESTKIT_SOURCE,
                format!("emit-{n}"),
                "test.emit",
                json!({"n": n}),
                Kind::Emit,
            ));
        } else {
            events.push(event(
                TESTKIT_SOURCE,
                format!("flaky-{n}"),
                "test.flaky",
                json!({"n": n}),
                Kind::Flaky,
            ));
        }
    }
    for chunk in events.chunks_mut(config.reorder_window.max(1)) {
        chunk.shuffle(rng);
    }
    for event in &mut events {
        event.concurrent = rng.random_bool(config.concurrent_rate);
        event.duplicate = rng.random_bool(config.duplicate_rate);
    }
    events
}

fn event(source: &str, id: String, type_: &str, data: Value, kind: Kind) -> PlannedEvent {
    PlannedEvent {
        source: source.to_owned(),
        id,
        type_: type_.to_owned(),
        data,
        kind,
        duplicate: false,
        concurrent: false,
    }
}

/// Payments placed before their order.
pub fn payments_before_order(events: &[PlannedEvent]) -> usize {
    use std::collections::HashSet;
    let mut seen_orders = HashSet::new();
    let mut early = 0;
    for event in events {
        match &event.kind {
            Kind::Order { order_id } => {
                seen_orders.insert(order_id.clone());
            }
            Kind::Payment { order_id, .. } if !seen_orders.contains(order_id) => early += 1,
            _ => {}
        }
    }
    early
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_is_reproducible_and_reordered() {
        let config = PlanConfig {
            events: 500,
            duplicate_rate: 0.1,
            concurrent_rate: 0.05,
            reorder_window: 32,
        };
        let a = plan(&config, &mut StdRng::seed_from_u64(7));
        let b = plan(&config, &mut StdRng::seed_from_u64(7));
        assert_eq!(a.len(), 500);
        let ids = |events: &[PlannedEvent]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        assert!(payments_before_order(&a) > 0);
        let distinct: std::collections::HashSet<_> =
            a.iter().map(|e| (e.source.clone(), e.id.clone())).collect();
        assert_eq!(distinct.len(), a.len());
    }

    #[test]
    fn reply_ids_match_the_hosts_formula() {
        // uuid5 of "s\n1" in the reply namespace, as host/src/pipeline.rs
        // computes it; deterministic and distinct per (source, id).
        assert_eq!(expected_reply_id("s", "1"), expected_reply_id("s", "1"));
        assert_ne!(expected_reply_id("s", "1"), expected_reply_id("s", "2"));
        assert_ne!(expected_reply_id("s", "1"), expected_reply_id("s\n1", ""));
        assert_eq!(
            uuid::Uuid::parse_str(&expected_reply_id("s", "1"))
                .unwrap()
                .get_version_num(),
            5
        );
    }
}
