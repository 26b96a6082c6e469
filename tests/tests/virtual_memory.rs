//! Issue 10 item 16: the sink under a virtual-memory limit (`ulimit -v`,
//! `RLIMIT_AS`; some container runtimes set one).
//!
//! The instance pool reserves the address space of all its slots at
//! start-up. Sized from `--handler-memory-mib` (and the handlers'
//! `memory_mib`), a small limit makes a small pool that fits under a
//! modest cap. When the pool does not fit, the host says so in words,
//! allocates each instance on demand instead, and still processes events.
//!
//! Each test starts the real binary with `setrlimit(RLIMIT_AS)` applied
//! between fork and exec, sends one `test.count` event (testkit) and checks
//! the answer, the claim row and the handler's effect row.

use exactly_e2e::{Backend, Event, TestApp, TestEnv, both_backends, json};

both_backends!(
    starts_and_serves_under_a_virtual_memory_limit,
    falls_back_to_on_demand_instances_when_the_pool_does_not_fit,
);

const GIB: u64 = 1 << 30;

/// The cap both tests run under. The host without its pool (binary,
/// threads' stacks, malloc arenas, the database driver) stays below a
/// gigabyte with [`BOUNDED_MALLOC`]; the first test's pool adds well under
/// another one. Before the fix the pool alone asked for about 4 GiB per
/// slot: hundreds of GiB.
const VIRTUAL_MEMORY_LIMIT: u64 = 3 * GIB;

/// glibc gives threads malloc arenas of their own, each reserving 64 MiB of
/// address space, up to eight per core: on a large machine that alone could
/// exceed the limit. Two arenas keep the host's own footprint independent
/// of the machine (deploy/README.md recommends the same under a limit).
const BOUNDED_MALLOC: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "2")];

/// With 16 MiB per instance and 4 connections per handler, the pool of the
/// three standard handlers (16 slots, 32 linear memories of 16 MiB plus
/// their guards) fits under [`VIRTUAL_MEMORY_LIMIT`].
async fn starts_and_serves_under_a_virtual_memory_limit(backend: Backend) {
    let app = TestEnv::new(backend)
        .await
        .serve_with_virtual_memory_limit(
            &["--handler-memory-mib", "16", "--db-max-connections", "4"],
            BOUNDED_MALLOC,
            VIRTUAL_MEMORY_LIMIT,
        )
        .await;
    one_event_is_processed(&app).await;
    let logs = app.logs();
    assert!(
        logs.contains("wasm instance pool reserved"),
        "the host did not log the instance pool it reserved; its log:\n{logs}"
    );
    assert!(
        !logs.contains("on demand"),
        "the pool fits under the limit, yet the host fell back; its log:\n{logs}"
    );
    let scrape = app.metrics().await;
    assert_eq!(
        scrape.value("handler_instance_allocation", &[("strategy", "pooling")]),
        1.0
    );
}

/// 256 MiB per instance and 16 connections per handler: a pool of 52 slots
/// (104 linear memories) would reserve about 26 GiB, far over the limit,
/// while one instance allocated on demand needs a few hundred MiB.
async fn falls_back_to_on_demand_instances_when_the_pool_does_not_fit(backend: Backend) {
    let app = TestEnv::new(backend)
        .await
        .serve_with_virtual_memory_limit(
            &["--handler-memory-mib", "256", "--db-max-connections", "16"],
            BOUNDED_MALLOC,
            VIRTUAL_MEMORY_LIMIT,
        )
        .await;
    let logs = app.logs();
    for words in [
        "could not reserve",
        "virtual memory",
        "ulimit -v",
        "allocated on demand",
        "--handler-memory-mib",
    ] {
        assert!(
            logs.contains(words),
            "the fallback to on-demand instances is not explained in words ({words:?} missing); its log:\n{logs}"
        );
    }
    one_event_is_processed(&app).await;
    // More than one event, so that a freed instance's memory is given back
    // and the next one maps its own.
    for n in 0..3 {
        let event = Event::new("test.count").with_data(json!({ "n": n }));
        app.send_binary(&event).await.assert_processed();
        assert_eq!(app.effects(&event).await, 1);
    }
    let scrape = app.metrics().await;
    assert_eq!(
        scrape.value("handler_instance_allocation", &[("strategy", "on-demand")]),
        1.0
    );
}

/// One `test.count` event: 202, its claim row stored with that answer, and
/// exactly one run of the handler committed.
async fn one_event_is_processed(app: &TestApp) {
    let event = Event::new("test.count").with_data(json!({ "n": 1 }));
    app.send_binary(&event).await.assert_processed();
    let processed = app
        .processed_event(&event)
        .await
        .expect("the event's claim row");
    assert_eq!(processed.status, 202);
    assert_eq!(app.effects(&event).await, 1);
}
