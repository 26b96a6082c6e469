//! `exactly migrate` applies the host schema and every handler's migrations,
//! and running it again changes nothing (deployments run it on every start).

use exactly_e2e::{Backend, TestEnv, both_backends};

both_backends!(migrate_is_idempotent_and_creates_the_tables, an_edited_migration_stops_migrate);

/// Issue 10 item 17: PostgreSQL tests left the handlers' cluster-wide roles
/// behind; a test's database now takes them along when it is dropped.
#[tokio::test]
async fn a_test_database_takes_its_roles_along() {
    let env = TestEnv::new(Backend::Postgres).await;
    let output = env.migrate().await;
    assert!(output.status.success(), "migrate failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let name = env.database_url().rsplit('/').next().unwrap().to_owned();
    let admin_url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await.unwrap();
    let roles = exactly_e2e::backend::database_roles(&mut admin, &name).await;
    assert!(roles.len() >= 2, "migrate made no roles to clean up: {roles:?}");
    drop(env);
    let left = exactly_e2e::backend::database_roles(&mut admin, &name).await;
    assert!(left.is_empty(), "roles left behind by the test's database: {left:?}");
}

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

/// Issue 9: a deployment upgrading from the version that switched roles
/// with `SET LOCAL ROLE` on the host's own session must not keep that weak
/// wall. The old state is rebuilt by hand on a migrated database: handler
/// tables owned by the host's account, the handler roles `NOLOGIN` with
/// `USAGE, SELECT` on every sequence of the schema, no `0003_wall.sql`.
/// `exactly migrate` must then hand each table to its handler's owner
/// role, make the roles log in, take the stray sequence grants back, and
/// `serve` must process events.
#[tokio::test]
async fn an_upgrade_from_the_role_switch_version_gets_the_new_wall() {
    let env = TestEnv::new(Backend::Postgres).await;
    assert!(env.migrate().await.status.success(), "the first migrate");
    let db = env.connect().await;
    let prefix = db
        .text(
            "SELECT 'exactly_' || left(encode(sha256(convert_to(current_database(), 'UTF8')), 'hex'), 8) || '_'",
            &[],
        )
        .await
        .expect("the order-created role");
    let login = format!("{prefix}order_created");
    let payment = format!("{prefix}order_payment");
    for table in ["orders", "order_events", "payments", "test_effects", "test_flags", "test_unique"] {
        db.execute(&format!("ALTER TABLE {table} OWNER TO CURRENT_USER"), &[]).await;
    }
    // A sequence no handler owns: the old setup granted it to every role.
    db.execute("CREATE SEQUENCE stray_seq", &[]).await;
    for role in [&login, &payment] {
        db.execute(&format!("ALTER ROLE {role} NOLOGIN"), &[]).await;
        db.execute(&format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"), &[])
            .await;
    }
    // The functions of 0003_wall.sql as 0005_claim_in_flight.sql and
    // 0006_claim_row.sql left them: the upgrade runs 0003 (trigger and
    // all), then 0005 and 0006 again.
    db.execute(
        "DROP FUNCTION exactly.claim_event, exactly.store_answer, exactly.committed_answer, exactly.reset_session, \
         exactly.prepare_handler_roles, exactly.grant_handler_tables, exactly.reassign_table",
        &[],
    )
    .await;
    db.execute("DROP TABLE exactly.secret", &[]).await;
    db.execute(
        "DELETE FROM exactly.migrations WHERE name IN ('0003_wall.sql', '0005_claim_in_flight.sql', '0006_claim_row.sql')",
        &[],
    )
    .await;

    let output = env.migrate().await;
    assert!(
        output.status.success(),
        "the upgrading migrate failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let owner = |table: &'static str| {
        let db = &db;
        async move {
            db.text(
                "SELECT r.rolname::text FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.relname = $1",
                &[table],
            )
            .await
            .expect("the table")
        }
    };
    assert_eq!(owner("orders").await, format!("{login}_owner"));
    assert_eq!(owner("payments").await, format!("{payment}_owner"));
    assert_eq!(
        db.text("SELECT rolcanlogin::text FROM pg_roles WHERE rolname = $1", &[&login]).await.as_deref(),
        Some("true")
    );
    assert_eq!(
        db.integer(
            "SELECT count(*) FROM pg_class s WHERE s.relname = 'stray_seq' AND has_sequence_privilege($1, s.oid, 'USAGE')",
            &[&payment]
        )
        .await,
        0,
        "order-payment keeps USAGE on sequences that are not its tables'"
    );
    let app = env.serve().await;
    let answer = app
        .send_binary(&exactly_e2e::Event::new("order.created").with_data(exactly_e2e::json!({
            "order_id": "u-1", "customer_id": "c", "total": 1
        })))
        .await;
    assert_eq!(answer.status, 202, "an event after the upgrade: {answer:?}");
}

/// Issue 10 item 17: a migration file edited after it was applied stops
/// `exactly migrate` with a message naming it (silently diverging schemas
/// are worse than a failed start), and it keeps doing so: waiting cannot
/// cure it. The hostile handler's migrations are copied to a folder of
/// the test's own, which the test then edits.
async fn an_edited_migration_stops_migrate(backend: Backend) {
    let folder = tempfile::tempdir().expect("a temporary folder");
    let mut handler = exactly_e2e::app::hostile_handler(None);
    let source = handler.migrations.clone();
    for dialect in ["postgres", "sqlite"] {
        std::fs::create_dir_all(folder.path().join(dialect)).unwrap();
        for entry in std::fs::read_dir(source.join(dialect)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, folder.path().join(dialect).join(path.file_name().unwrap())).unwrap();
        }
    }
    handler.migrations = folder.path().to_path_buf();
    let mut handlers = exactly_e2e::app::standard_handlers();
    handlers.push(handler);
    let env = TestEnv::with_handlers(backend, handlers).await;
    let first = env.migrate().await;
    assert!(first.status.success(), "the first migrate failed:\n{}", String::from_utf8_lossy(&first.stderr));

    let dialect = match backend {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    };
    let edited = std::fs::read_dir(folder.path().join(dialect)).unwrap().next().unwrap().unwrap().path();
    let mut text = std::fs::read_to_string(&edited).unwrap();
    text.push_str("\n-- edited after it was applied\n");
    std::fs::write(&edited, text).unwrap();
    let name = edited.file_name().unwrap().to_string_lossy().into_owned();
    for run in ["second", "third"] {
        let output = env.migrate().await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "the {run} migrate accepted an edited migration:\n{stderr}");
        assert!(
            stderr.contains(&name) && stderr.contains("was changed after it was applied"),
            "the {run} migrate does not name the edited file {name}:\n{stderr}"
        );
    }
}
