//! `exactly migrate` applies the host schema and every handler's migrations,
//! and running it again changes nothing (deployments run it on every start).

use exactly_e2e::{Backend, TestEnv, both_backends};

both_backends!(migrate_is_idempotent_and_creates_the_tables);

async fn migrate_is_idempotent_and_creates_the_tables(backend: Backend) {
    let env = TestEnv::new(backend).await;

    for run in ["first", "second"] {
        let output = env.migrate().await;
        assert!(
            output.status.success(),
            "the {run} `exactly migrate` failed ({}):\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let db = env.connect().await;
    for table in [
        backend.processed_events_table(),
        backend.dead_letters_table(),
        "orders",
        "order_events",
        "payments",
        "test_effects",
        "test_flags",
        "test_unique",
    ] {
        assert!(
            db.table_exists(table).await,
            "`exactly migrate` did not create {table}"
        );
    }
    assert_eq!(
        db.integer(
            &format!("SELECT count(*) FROM {}", backend.processed_events_table()),
            &[]
        )
        .await,
        0
    );
}
