//! `/metrics`: after real events on the real binary, the counters moved by
//! exactly what happened, under the seed's names and labels, in a text
//! format a Prometheus server can read (the scrape is parsed strictly).

use std::time::Duration;

use exactly_e2e::{
    Backend, Event, HandlerEntry, HandlerLimits, Scrape, TestApp, TestEnv, both_backends, json,
};

both_backends!(
    counters_follow_the_events,
    limit_hits_are_counted,
    event_log_lines_carry_the_event
);

/// Series of `events_processed_total` and friends for one type/outcome.
fn processed(scrape: &Scrape, ty: &str, outcome: &str) -> f64 {
    scrape.value(
        "events_processed_total",
        &[("type", ty), ("outcome", outcome)],
    )
}

async fn counters_follow_the_events(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let before = app.metrics().await;

    // The seed's counters are there from the start, for every type.
    assert_eq!(
        before.type_of("events_processed_total"),
        Some("counter"),
        "{}",
        before.text()
    );
    assert_eq!(
        before.get(
            "events_processed_total",
            &[("type", "test.count"), ("outcome", "committed")]
        ),
        Some(0.0)
    );
    assert_eq!(
        before.get("events_deduplicated_total", &[("type", "order.created")]),
        Some(0.0)
    );
    assert_eq!(before.get("dead_letters_stored_total", &[]), Some(0.0));
    assert_eq!(before.get("events_in_flight", &[]), Some(0.0));
    assert_eq!(processed(&before, "test.count", "committed"), 0.0);

    // Two processed events, one of them redelivered twice.
    let first = Event::new("test.count").with_data(json!({"n": 1}));
    let second = Event::new("test.count").with_data(json!({"n": 2}));
    app.send_binary(&first).await.assert_processed();
    app.send_structured(&second).await.assert_processed();
    app.send_binary(&first).await.assert_replayed();
    app.send_binary(&first).await.assert_replayed();
    // A permanent handler error, a type nobody handles, a reused key, and a
    // request that is not an event at all.
    app.send_binary(&Event::new("test.permanent"))
        .await
        .assert_error(422, "permanent");
    let stranger = format!("no.such.type.{}", uuid::Uuid::new_v4().simple());
    app.send_binary(&Event::new(&stranger))
        .await
        .assert_error(422, "no-handler");
    app.send_binary(&first.redelivered_with_data(json!({"n": 99})))
        .await
        .assert_error(422, "key-reused");
    let not_an_event: Vec<(String, String)> = first
        .binary_headers()
        .into_iter()
        .filter(|(name, _)| name != "ce-id")
        .collect();
    app.post(&not_an_event, first.data_bytes())
        .await
        .assert_error(400, "invalid-event");

    let after = app.metrics().await;
    for (family, kind) in [
        ("events_processed_total", "counter"),
        ("events_deduplicated_total", "counter"),
        ("event_processing_duration_seconds", "histogram"),
        ("handler_execution_duration_seconds", "histogram"),
        ("event_database_duration_seconds", "histogram"),
        ("events_in_flight", "gauge"),
        ("events_rejected_total", "counter"),
        ("dead_letters_stored_total", "counter"),
        ("processed_events_oldest_age_seconds", "gauge"),
        ("processed_events_expired_total", "counter"),
        ("handler_load_duration_seconds", "gauge"),
    ] {
        assert_eq!(
            after.type_of(family),
            Some(kind),
            "# TYPE of {family}:\n{}",
            after.text()
        );
    }
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };

    assert_eq!(
        delta(
            "events_processed_total",
            &[("type", "test.count"), ("outcome", "committed")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "events_processed_total",
            &[("type", "test.count"), ("outcome", "replayed")]
        ),
        2.0
    );
    // The reused key is refused for good: a rejection of its type.
    assert_eq!(
        delta(
            "events_processed_total",
            &[("type", "test.count"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "events_processed_total",
            &[("type", "test.permanent"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "events_processed_total",
            &[("type", "(unrouted)"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        delta("events_deduplicated_total", &[("type", "test.count")]),
        2.0
    );
    assert_eq!(
        delta(
            "event_processing_duration_seconds_count",
            &[("type", "test.count"), ("outcome", "committed")]
        ),
        2.0
    );
    assert_eq!(
        delta(
            "event_processing_duration_seconds_bucket",
            &[
                ("type", "test.count"),
                ("outcome", "committed"),
                ("le", "+Inf")
            ]
        ),
        2.0
    );
    assert!(
        after.value(
            "event_processing_duration_seconds_sum",
            &[("type", "test.count"), ("outcome", "committed")]
        ) > 0.0
    );
    for (reason, count) in [
        ("permanent", 1.0),
        ("no-handler", 1.0),
        ("key-reused", 1.0),
        ("invalid-event", 1.0),
    ] {
        assert_eq!(
            delta("events_rejected_total", &[("reason", reason)]),
            count,
            "reason {reason}:\n{}",
            after.text()
        );
    }
    // Replays are answers, not rejections.
    assert!(
        after
            .series("events_rejected_total")
            .iter()
            .all(|(labels, _)| labels["reason"] != "replayed")
    );
    // The handler ran for the two first deliveries and the permanent error;
    // the database was asked for those and for the replays and the reused key.
    assert_eq!(
        delta(
            "handler_execution_duration_seconds_count",
            &[("handler", "testkit")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            "event_database_duration_seconds_count",
            &[("handler", "testkit")]
        ),
        6.0
    );
    assert!(
        after.value(
            "event_database_duration_seconds_sum",
            &[("handler", "testkit")]
        ) > 0.0
    );
    assert_eq!(after.get("events_in_flight", &[]), Some(0.0));
    assert_eq!(after.get("dead_letters_stored_total", &[]), Some(0.0));
    // A type from the request never becomes a label value.
    assert!(!after.text().contains(&stranger), "{}", after.text());
    // Every handler was loaded, compiled (nothing was precompiled here).
    for handler in ["order-created", "order-payment", "testkit"] {
        assert!(
            after
                .get(
                    "handler_load_duration_seconds",
                    &[("handler", handler), ("from", "compiled")]
                )
                .is_some()
        );
    }
}

async fn limit_hits_are_counted(backend: Backend) {
    let mut handlers = exactly_e2e::app::standard_handlers();
    let testkit: &mut HandlerEntry = handlers
        .iter_mut()
        .find(|h| h.name == "testkit")
        .expect("testkit");
    testkit.limits = Some(HandlerLimits {
        deadline: Some(Duration::from_millis(300)),
        ..HandlerLimits::default()
    });
    let app = TestEnv::with_handlers(backend, handlers)
        .await
        .serve()
        .await;

    let slow = Event::new("test.sleep").with_data(json!({"ms": 3000}));
    app.send_binary(&slow).await.assert_error(500, "deadline");
    app.send_binary(&Event::new("test.panic"))
        .await
        .assert_error(500, "trap");

    let scrape = app.metrics().await;
    assert_eq!(
        scrape.type_of("handler_limit_hits_total"),
        Some("counter"),
        "{}",
        scrape.text()
    );
    assert_eq!(
        scrape.value(
            "handler_limit_hits_total",
            &[("handler", "testkit"), ("limit", "deadline")]
        ),
        1.0
    );
    assert_eq!(
        scrape.value("events_rejected_total", &[("reason", "deadline")]),
        1.0
    );
    assert_eq!(
        scrape.value("events_rejected_total", &[("reason", "trap")]),
        1.0
    );
    assert_eq!(processed(&scrape, "test.sleep", "failed"), 1.0);
    assert_eq!(processed(&scrape, "test.panic", "failed"), 1.0);
    // A trap is not a limit.
    assert_eq!(
        scrape.series("handler_limit_hits_total").len(),
        1,
        "{}",
        scrape.text()
    );
    assert_eq!(app.effects(&slow).await, 0);
}

/// The handler's own log lines and the final line of an event are written
/// inside the event's span: each carries source, id, type, handler and the
/// trace id of the event's `traceparent`, and the final one the outcome.
async fn event_log_lines_carry_the_event(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // test.commit logs a warning from inside the handler.
    let event = Event::new("test.commit");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = event.binary_headers();
    headers.push((
        "ce-traceparent".to_owned(),
        format!("00-{trace}-00f067aa0ba902b7-01"),
    ));
    app.post(&headers, event.data_bytes())
        .await
        .assert_error(422, "statement-refused");

    let logs = app.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|line| line.contains(&event.id))
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect();
    assert!(lines.len() >= 2, "the event's lines:\n{logs}");
    let handler_line = lines
        .iter()
        .find(|line| {
            line["target"] == "exactly::handler"
                && line["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("COMMIT failed"))
        })
        .unwrap_or_else(|| panic!("the handler's own line:\n{logs}"));
    let final_line = lines
        .iter()
        .find(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("event refused"))
        })
        .unwrap_or_else(|| panic!("the final line:\n{logs}"));
    for line in [handler_line, final_line] {
        let span = &line["span"];
        assert_eq!(span["name"], "event", "{line}");
        assert_eq!(span["source"], event.source.as_str(), "{line}");
        assert_eq!(span["id"], event.id.as_str(), "{line}");
        assert_eq!(span["type"], "test.commit", "{line}");
        assert_eq!(span["handler"], "testkit", "{line}");
        assert_eq!(span["trace_id"], trace, "{line}");
    }
    assert_eq!(final_line["span"]["outcome"], "rejected", "{final_line}");
}
