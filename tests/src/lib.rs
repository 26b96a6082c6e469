//! Shared harness for the end-to-end tests.
//!
//! Every test starts the real `exactly` binary (`exactly serve`, port 0)
//! against a database of its own, with the real handler components from
//! `dist/`, and talks to it over HTTP exactly as the Knative Kafka
//! dispatcher would. Assertions look at three things only: the HTTP answer,
//! the rows in the database and how often a handler ran (the testkit
//! records every run in `test_effects`). Never at timings.
//!
//! Each behaviour runs on both storage backends: write the test body as
//! `async fn name(backend: Backend)` and let [`both_backends!`] generate
//! `name::postgres` and `name::sqlite`. PostgreSQL tests need `DATABASE_URL`
//! (an admin URL to a running server; `scripts/test` starts a throwaway
//! one) and each creates its own database `exactly_t_<uuid>`; SQLite tests
//! each use a file in their own temporary folder. Tests therefore run in
//! parallel and never see each other's rows.
//!
//! Layout: [`backend`] creates and inspects the test databases, [`event`]
//! builds CloudEvents and their two HTTP encodings, [`app`] finds, starts and
//! stops the binary, [`answer`] reads what it answered, [`metrics`] parses
//! what `/metrics` reports, [`deploy`] reads the container build and the
//! Kubernetes manifests under `deploy/`.
//!
//! The sandbox tests add the `hostile` handler, which attacks its sandbox,
//! with a `[handler.limits]` table of their choice:
//! [`TestApp::spawn_with_hostile`] and [`HandlerLimits`].

pub mod answer;
pub mod app;
pub mod backend;
pub mod deploy;
pub mod event;
pub mod harness;
pub mod metrics;
pub mod serve;

pub use answer::{Answer, ErrorBody};
pub use app::{HandlerEntry, HandlerLimits, ProcessedEvent, TestApp, TestEnv, hostile_handler, standard_handlers};
pub use backend::{Backend, Db};
pub use event::Event;
pub use metrics::Scrape;
pub use serde_json::json;

/// Generates one `#[tokio::test]` per storage backend for each test body.
///
/// `both_backends!(first_delivery_then_replay)` expects an
/// `async fn first_delivery_then_replay(backend: Backend)` in scope and
/// generates the tests `first_delivery_then_replay::postgres` and
/// `first_delivery_then_replay::sqlite` (so `cargo test -- ::sqlite` runs
/// one backend only).
#[macro_export]
macro_rules! both_backends {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[::tokio::test]
            async fn postgres() {
                super::$test($crate::Backend::Postgres).await
            }

            #[::tokio::test]
            async fn sqlite() {
                super::$test($crate::Backend::Sqlite).await
            }
        }
    )+};
}
