//! Exactly-once under faults, the short run (about a minute).
//!
//! The crash harness (`exactly_e2e::harness`) plays the Knative Kafka
//! dispatcher against the real `exactly` binary on a private PostgreSQL
//! cluster: 1,500 events (orders, payments often before their order,
//! replying and flaky testkit events), duplicates, concurrent redeliveries,
//! while it SIGKILLs the host, crashes it at each of its four fault points,
//! restarts PostgreSQL (fast and immediate), terminates the host's
//! connections and makes a handler fail for a while. Then every event must
//! be applied exactly once or be in the dead-letter store with a reason.
//!
//! The long run is the `harness` binary (see `tests/src/bin/harness.rs`).
//! Needs PostgreSQL's server programs (Debian's `postgresql` package); it
//! does not use `DATABASE_URL`'s server, which other tests share.

use exactly_e2e::app::exactly_binary;
use exactly_e2e::harness::{self, Config, faults::FAULT_POINTS};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_is_applied_exactly_once_under_faults() {
    let config = Config::short(exactly_binary());
    let report = harness::run(config)
        .await
        .unwrap_or_else(|error| panic!("the harness could not run: {error:#}"));
    println!("{}", report.summary_line());
    eprintln!("{}", report.details());

    // The verdict.
    assert_eq!(
        report.verdict.lost.len(),
        0,
        "lost events:\n{}",
        report.details()
    );
    assert_eq!(
        report.verdict.applied_twice.len(),
        0,
        "doubled events:\n{}",
        report.details()
    );
    assert_eq!(
        report.verdict.half_applied.len(),
        0,
        "half-applied events:\n{}",
        report.details()
    );
    assert_eq!(
        report.verdict.reply_mismatches.len(),
        0,
        "wrong replies:\n{}",
        report.details()
    );
    // Every event of the run is valid and eventually applicable (a payment
    // only has to wait for its order), and the retry budget (about 25 s)
    // outlasts every outage the harness causes: a dead letter is a bug.
    assert_eq!(
        report.verdict.dead_lettered,
        0,
        "dead-lettered events:\n{}",
        report.details()
    );
    assert!(
        report.problems().is_empty(),
        "{:#?}\n{}",
        report.problems(),
        report.details()
    );
    assert_eq!(
        report.verdict.applied_once + report.verdict.dead_lettered,
        report.events,
        "every event is applied once or dead-lettered:\n{}",
        report.details()
    );

    // The run really was hostile: every kind of fault happened.
    assert!(report.host.sigkills > 0, "no SIGKILL");
    for point in FAULT_POINTS {
        assert!(
            report.host.fault_aborts.get(point).copied().unwrap_or(0) > 0,
            "the fault point {point} never fired: {}",
            report.summary_line()
        );
    }
    assert!(report.postgres_fast > 0, "no fast PostgreSQL restart");
    assert!(
        report.postgres_immediate > 0,
        "no immediate PostgreSQL restart"
    );
    assert!(report.connections_killed > 0, "no connection terminated");
    assert!(report.flaky_windows > 0, "no flaky window");
    assert!(
        report.flaky_failures > 0,
        "no flaky event failed during the windows"
    );
    assert!(report.duplicates > 0, "no duplicate delivery");
    assert!(
        report.early_payments_retried > 0,
        "no payment arrived before its order"
    );
}
