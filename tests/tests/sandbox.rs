//! The sandbox: a handler can touch its own rows in the open transaction,
//! and nothing else.
//!
//! The `hostile` test handler (`tests/handlers/hostile`) attacks the host,
//! one attack per event type: statements that would end or escape the
//! transaction, resource abuse, and ambient capabilities (files,
//! environment, network). Every hostile run first inserts its event id into
//! `hostile_notes`, then attacks, ignores whatever error it gets and returns
//! `Ok`. For every attack the tests check
//!
//! - the documented answer: status, `error` code and `kne-exactlyerror`;
//! - that nothing of a failed event committed: no claim, no `hostile_notes`
//!   row (and, for `hostile.update-other`, no change to the testkit's rows);
//! - that the next healthy event still gets 202, and that a stream of
//!   healthy `test.count` events (testkit) sent all along, while the hostile
//!   events run, got 202 every time with exactly one effect each.
//!
//! Several attacks share one host to keep the suite fast. Every attack of a
//! test is checked and the test fails at the end listing all the attacks
//! that were not answered as documented (each case also prints an `ok` or
//! `FAILED` line: `cargo test --test sandbox -- --nocapture`).
//!
//! The statement refusals and the missing capabilities need no limits of
//! their own and run with the host's defaults; the resource attacks run
//! under the small `[handler.limits]` of [`small_limits`], which apply to
//! the hostile handler only.

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use exactly_e2e::{Answer, Backend, ErrorBody, Event, HandlerLimits, TestApp, both_backends, json};
use serde_json::Value;

both_backends!(
    refused_statements_commit_nothing,
    no_ambient_capabilities,
    runaway_handlers_are_stopped,
    floods_and_huge_results_are_cut_off,
    oversized_statements_and_outcomes_are_refused_before_the_work,
    endless_statement_is_cancelled,
);

/// The hostile handler's limits in the resource tests: small, so that every
/// attack is stopped quickly.
fn small_limits() -> HandlerLimits {
    HandlerLimits {
        deadline: Some(Duration::from_secs(2)),
        memory_mib: Some(64),
        statement_timeout: Some(Duration::from_secs(1)),
        max_rows: Some(10_000),
        max_result_bytes: Some(4 * 1024 * 1024),
        max_statements: Some(1_000),
        max_log_bytes: Some(1024 * 1024),
        fuel: None,
        max_reply_bytes: None,
        max_body_bytes: None,
    }
}

/// The hostile handler with [`small_limits`] and the SQL policy switched off
/// (test-only switch, see `tests/tests/wall.rs`): the resource attacks use
/// functions the policy refuses (`generate_series`, `repeat`, `pg_sleep`),
/// and the limits must hold without the filter in front of them.
async fn spawn_unfiltered(backend: Backend) -> TestApp {
    let mut handlers = exactly_e2e::standard_handlers();
    handlers.push(exactly_e2e::hostile_handler(Some(small_limits())));
    exactly_e2e::TestEnv::with_handlers(backend, handlers)
        .await
        .serve_with_env(&[], &[("EXACTLY_TEST_SQL_POLICY", "off")])
        .await
}

/// Statements the host must refuse before they reach the database: the
/// event fails with 422 `statement-refused` although the handler ignores
/// the error and returns `Ok`.
const REFUSED: &[&str] = &[
    "hostile.commit",
    "hostile.rollback",
    "hostile.begin",
    "hostile.savepoint",
    "hostile.select-commit",
    "hostile.set-role",
    "hostile.reset-role",
    "hostile.set-search-path",
    "hostile.drop-table",
    "hostile.create-table",
    "hostile.copy-program",
    "hostile.read-host-table",
    "hostile.update-other",
];

/// Pause between two healthy events of the background stream, so that it
/// does not starve the host on a small machine.
const HEALTHY_PAUSE: Duration = Duration::from_millis(20);

async fn refused_statements_commit_nothing(backend: Backend) {
    let app = TestApp::spawn_with_hostile(backend, None).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;
    // A testkit row that hostile.update-other tries to overwrite.
    report.case(
        "healthy event before the attacks",
        healthy_event(&app).await,
    );

    let ((), traffic) = with_healthy_traffic(&app, async {
        for &type_ in REFUSED {
            let event = Event::new(type_);
            let mut problems =
                failed_and_left_nothing(&app, &event, 422, "statement-refused").await;
            if type_ == "hostile.update-other" {
                problems.extend(testkit_rows_untouched(&app).await);
            }
            report.case(type_, problems);
        }
    })
    .await;
    report.case("healthy traffic during the attacks", traffic);
    report.case(
        "testkit rows after everything",
        testkit_rows_untouched(&app).await,
    );
    report.finish();
}

async fn no_ambient_capabilities(backend: Backend) {
    let app = TestApp::spawn_with_hostile(backend, None).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;

    // A TCP listener and a UDP socket the handler is told to reach. Both are
    // non-blocking: a connection or a datagram would already be queued when
    // the handler's answer arrives, so "nothing queued" is not a timing.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP listener");
    tcp.set_nonblocking(true).expect("a non-blocking listener");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    udp.set_nonblocking(true)
        .expect("a non-blocking UDP socket");
    let ports = json!({
        "tcp_port": tcp.local_addr().expect("the listener's address").port(),
        "udp_port": udp.local_addr().expect("the UDP socket's address").port(),
    });
    let written_file = std::path::Path::new("/tmp/exactly-hostile");

    let ((), traffic) = with_healthy_traffic(&app, async {
        let event = Event::new("hostile.read-file");
        let (mut problems, result) = processed_with_result(&app, &event).await;
        if let Some(result) = result {
            for operation in ["read_file", "read_dir", "write_file"] {
                problems.extend(operation_failed(&result, operation));
            }
        }
        if written_file.exists() {
            problems.push(format!("{} exists on the host", written_file.display()));
        }
        report.case("hostile.read-file", problems);

        let event = Event::new("hostile.env");
        let (mut problems, result) = processed_with_result(&app, &event).await;
        if let Some(result) = result {
            if !result["home"].is_null() {
                problems.push(format!("HOME is visible: {}", result["home"]));
            }
            for list in ["vars", "args"] {
                if result[list] != json!([]) {
                    problems.push(format!("{list} is not empty: {}", result[list]));
                }
            }
        }
        report.case("hostile.env", problems);

        let event = Event::new("hostile.socket").with_data(ports.clone());
        let (mut problems, result) = processed_with_result(&app, &event).await;
        if let Some(result) = result {
            for operation in ["tcp_connect", "udp_send", "name_lookup"] {
                problems.extend(operation_failed(&result, operation));
            }
        }
        match tcp.accept() {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((_, peer)) => problems.push(format!(
                "the test's listener accepted a connection from {peer}"
            )),
            Err(error) => problems.push(format!("accept on the test's listener failed: {error}")),
        }
        let mut buffer = [0u8; 64];
        match udp.recv_from(&mut buffer) {
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Ok((length, peer)) => problems.push(format!(
                "the test's UDP socket received {length} bytes from {peer}"
            )),
            Err(error) => problems.push(format!("recv on the test's UDP socket failed: {error}")),
        }
        report.case("hostile.socket", problems);
    })
    .await;
    report.case("healthy traffic during the attacks", traffic);
    report.finish();
}

async fn runaway_handlers_are_stopped(backend: Backend) {
    let app = TestApp::spawn_with_hostile(backend, Some(small_limits())).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;

    let ((), traffic) = with_healthy_traffic(&app, async {
        for (type_, status, code) in [
            ("hostile.loop", 500, "deadline"),
            ("hostile.alloc", 500, "memory-limit"),
            ("hostile.recurse", 500, "trap"),
        ] {
            let event = Event::new(type_);
            report.case(
                type_,
                failed_and_left_nothing(&app, &event, status, code).await,
            );
        }

        // The hostile handler's 2 s deadline is its own: the testkit keeps
        // the host's default (10 s) and may sleep longer than that.
        let sleeper = Event::new("test.sleep").with_data(json!({"ms": 2500}));
        let answer = app.send_binary(&sleeper).await;
        let mut problems = Vec::new();
        if !is_processed(&answer) {
            problems.push(format!("expected 202, got {}", summary(&answer)));
        }
        report.case("limits are per handler (test.sleep 2.5 s)", problems);
    })
    .await;
    report.case("healthy traffic during the attacks", traffic);
    report.finish();
}

async fn floods_and_huge_results_are_cut_off(backend: Backend) {
    let app = spawn_unfiltered(backend).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;

    let ((), traffic) = with_healthy_traffic(&app, async {
        for (type_, status, code) in [
            ("hostile.log-flood", 500, "log-limit"),
            ("hostile.stdout-flood", 500, "log-limit"),
            ("hostile.rows", 500, "too-many-rows"),
            // Not named by the limits contract; the code the host uses for
            // max_result_bytes.
            ("hostile.big-result", 500, "result-too-large"),
            ("hostile.statements", 500, "too-many-statements"),
        ] {
            let event = Event::new(type_);
            report.case(
                type_,
                failed_and_left_nothing(&app, &event, status, code).await,
            );
        }
    })
    .await;
    report.case("healthy traffic during the attacks", traffic);
    report.finish();
}

/// What a handler hands the host is bounded before the host works on it:
/// parameters (count, bytes, `numeric` length), SQL length (with the SQL
/// policy off, so the bound is the host's, not the filter's) and the
/// outcome (result plus reply). Each attack has a control just under the
/// bound that commits, so the bound, not something else, is what stops it.
async fn oversized_statements_and_outcomes_are_refused_before_the_work(backend: Backend) {
    let app = spawn_unfiltered(backend).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;

    let ((), traffic) = with_healthy_traffic(&app, async {
        // Just under each bound: processed (the reply one answers 200).
        for (type_, data) in [
            ("hostile.many-params", json!({"n": 1_000})),
            ("hostile.big-param", json!({"bytes": 1024 * 1024})),
            ("hostile.long-numeric", json!({"digits": 1_000})),
            ("hostile.long-sql", json!({"bytes": 60 * 1024})),
            ("hostile.big-outcome", json!({"bytes": 1_000_000})),
        ] {
            let event = Event::new(type_).with_data(data);
            let (problems, _) = processed_with_result(&app, &event).await;
            report.case(&format!("{type_} under the bound"), problems);
        }
        let event = Event::new("hostile.big-reply").with_data(json!({"bytes": 1_000_000}));
        let answer = app.send_binary(&event).await;
        let problems = if answer.status == 200 && answer.body.len() == 1_000_000 {
            Vec::new()
        } else {
            vec![format!("expected 200 with the reply, got {}", summary(&answer))]
        };
        report.case("hostile.big-reply under the bound", problems);

        // Over each bound: the event fails and nothing of it commits.
        for (type_, data, status, code) in [
            ("hostile.many-params", json!({"n": 1_001}), 500, "too-many-parameters"),
            // small_limits: max_result_bytes is 4 MiB.
            ("hostile.big-param", json!({"bytes": 5 * 1024 * 1024}), 500, "too-many-parameters"),
            // Four million digits took 36 s to parse on a tokio worker.
            ("hostile.long-numeric", json!({"digits": 4_000_000}), 500, "statement-failed"),
            ("hostile.long-sql", json!({"bytes": 5 * 1024 * 1024}), 422, "statement-refused"),
            // max_reply_bytes defaults to 1 MiB.
            ("hostile.big-reply", json!({"bytes": 8 * 1024 * 1024}), 422, "bad-outcome"),
            ("hostile.big-outcome", json!({"bytes": 2 * 1024 * 1024}), 422, "bad-outcome"),
        ] {
            let event = Event::new(type_).with_data(data);
            let started = std::time::Instant::now();
            let mut problems = failed_and_left_nothing(&app, &event, status, code).await;
            // The deadline is 2 s: the work must not even start.
            if started.elapsed() > Duration::from_secs(5) {
                problems.push(format!("took {:?}", started.elapsed()));
            }
            report.case(&format!("{type_} over the bound"), problems);
        }
        // PostgreSQL: a numeric result is refused by its size before it is
        // decoded (a 100,000-digit one cost the host more than linear time).
        if backend == Backend::Postgres {
            let statement = |digits: u32| {
                json!({"statements": [{"sql": format!("SELECT repeat('9', {digits})::numeric AS n"), "query": true}]})
            };
            let event = Event::new("hostile.sql").with_data(statement(1_000));
            let (problems, _) = processed_with_result(&app, &event).await;
            report.case("numeric result of 1,000 digits", problems);
            let event = Event::new("hostile.sql").with_data(statement(100_000));
            let problems = failed_and_left_nothing(&app, &event, 500, "statement-failed").await;
            report.case("numeric result of 100,000 digits", problems);
        }
    })
    .await;
    report.case("healthy traffic during the attacks", traffic);
    report.finish();
}

/// On its own host: on SQLite a statement that is not interrupted would
/// hold the only writer connection for hours and fail everything after it.
async fn endless_statement_is_cancelled(backend: Backend) {
    let app = spawn_unfiltered(backend).await;
    let mut report = Report::new(backend);
    control(&app, &mut report).await;

    // PostgreSQL cancels the statement at the handler's statement_timeout
    // (1 s); SQLite has none, so the host interrupts the statement at the
    // handler's deadline (2 s).
    let code = match backend {
        Backend::Postgres => "statement-timeout",
        Backend::Sqlite => "deadline",
    };
    let ((), traffic) = with_healthy_traffic(&app, async {
        let event = Event::new("hostile.pg-sleep");
        report.case(
            "hostile.pg-sleep",
            failed_and_left_nothing(&app, &event, 500, code).await,
        );
    })
    .await;
    report.case("healthy traffic during the attack", traffic);
    report.finish();
}

/// Collects the verdict of every case of a test, prints one line per case
/// and fails the test at the end if any case failed.
struct Report {
    backend: Backend,
    failures: Vec<String>,
}

impl Report {
    fn new(backend: Backend) -> Report {
        Report {
            backend,
            failures: Vec::new(),
        }
    }

    fn case(&mut self, name: &str, problems: Vec<String>) {
        let backend = self.backend;
        if problems.is_empty() {
            eprintln!("ok      {backend:?} {name}");
        } else {
            let text = format!("{name}:\n    - {}", problems.join("\n    - "));
            eprintln!("FAILED  {backend:?} {text}");
            self.failures.push(text);
        }
    }

    #[track_caller]
    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} case(s) failed on {:?}:\n{}",
            self.failures.len(),
            self.backend,
            self.failures.join("\n")
        );
    }
}

/// The control case: the hostile handler behaving, so its `hostile_notes`
/// row commits. Without it, "no hostile_notes row" would prove nothing.
async fn control(app: &TestApp, report: &mut Report) {
    let event = Event::new("hostile.ok");
    let (mut problems, result) = processed_with_result(app, &event).await;
    if result.is_some_and(|result| result != json!({"ok": true})) {
        problems.push("the stored result is not {\"ok\": true}".to_owned());
    }
    report.case("hostile.ok (control)", problems);
}

/// Sends a hostile `event` that must fail with `status` and `code`, and
/// checks that nothing of it committed and that the host still serves.
async fn failed_and_left_nothing(
    app: &TestApp,
    event: &Event,
    status: u16,
    code: &str,
) -> Vec<String> {
    let answer = app.send_binary(event).await;
    let mut problems = Vec::new();
    if let Err(problem) = is_error(&answer, status, code) {
        problems.push(problem);
    }
    if let Some(row) = app.processed_event(event).await {
        problems.push(format!(
            "the event was marked processed (stored status {})",
            row.status
        ));
    }
    if notes(app, event).await != 0 {
        problems.push("its hostile_notes row committed".to_owned());
    }
    problems.extend(healthy_event(app).await);
    problems
}

/// Sends a hostile `event` that must be processed (202) with its
/// `hostile_notes` row, and returns the stored result for the caller to
/// check. Also checks that the host still serves.
async fn processed_with_result(app: &TestApp, event: &Event) -> (Vec<String>, Option<Value>) {
    let answer = app.send_binary(event).await;
    let mut problems = Vec::new();
    if !is_processed(&answer) {
        problems.push(format!("expected 202, got {}", summary(&answer)));
    }
    let result = app.processed_result(event).await;
    match &result {
        Some(result) => eprintln!("        {} stored the result {result}", event.type_),
        None => problems.push("no stored result: the event did not commit".to_owned()),
    }
    if notes(app, event).await != 1 {
        problems.push("its hostile_notes row did not commit".to_owned());
    }
    problems.extend(healthy_event(app).await);
    (problems, result)
}

/// One healthy testkit event: 202 and exactly one effect.
async fn healthy_event(app: &TestApp) -> Vec<String> {
    let event = Event::new("test.count");
    let answer = app.send_binary(&event).await;
    let mut problems = Vec::new();
    if !is_processed(&answer) {
        problems.push(format!("the next healthy event got {}", summary(&answer)));
    }
    let effects = app.effects(&event).await;
    if effects != 1 {
        problems.push(format!(
            "the next healthy event left {effects} test_effects rows, not 1"
        ));
    }
    problems
}

/// Runs `checks` while a stream of healthy `test.count` events flows, one
/// after the other, until `checks` is done. Returns what `checks` returned
/// and the problems of the healthy stream: every event must have got 202
/// and left exactly one `test_effects` row.
async fn with_healthy_traffic<T>(
    app: &TestApp,
    checks: impl Future<Output = T>,
) -> (T, Vec<String>) {
    let done = Cell::new(false);
    let traffic = async {
        let mut sent = Vec::new();
        while !done.get() {
            let event = Event::new("test.count");
            let answer = app.send_binary(&event).await;
            sent.push((event, answer));
            tokio::time::sleep(HEALTHY_PAUSE).await;
        }
        sent
    };
    let checks = async {
        let output = checks.await;
        done.set(true);
        output
    };
    let (sent, output) = futures::join!(traffic, checks);

    let mut problems = Vec::new();
    for (event, answer) in &sent {
        if !is_processed(answer) {
            problems.push(format!(
                "healthy event {} got {}",
                event.id,
                summary(answer)
            ));
        }
    }
    let mut effects: HashMap<String, usize> = HashMap::new();
    for id in app
        .db
        .texts(
            "SELECT event_id FROM test_effects WHERE kind = 'test.count'",
            &[],
        )
        .await
    {
        *effects.entry(id).or_default() += 1;
    }
    for (event, _) in &sent {
        let count = effects.get(&event.id).copied().unwrap_or(0);
        if count != 1 {
            problems.push(format!(
                "healthy event {} left {count} test_effects rows, not 1",
                event.id
            ));
        }
    }
    eprintln!(
        "        {} healthy events were sent during the attacks, {} with a problem",
        sent.len(),
        problems.len()
    );
    if problems.len() > 12 {
        let more = problems.len() - 10;
        problems.truncate(10);
        problems.push(format!("… and {more} more"));
    }
    (output, problems)
}

/// hostile.update-other tried `UPDATE test_effects SET note = 'pwned'`.
async fn testkit_rows_untouched(app: &TestApp) -> Vec<String> {
    let touched = app
        .db
        .integer(
            "SELECT count(*) FROM test_effects WHERE note IS NOT NULL",
            &[],
        )
        .await;
    if touched == 0 {
        Vec::new()
    } else {
        vec![format!("{touched} testkit rows were overwritten")]
    }
}

/// `result[operation]` must say `"error: …"`.
fn operation_failed(result: &Value, operation: &str) -> Option<String> {
    match result[operation].as_str() {
        Some(text) if text.starts_with("error: ") => None,
        _ => Some(format!("{operation} did not fail: {}", result[operation])),
    }
}

/// How many `hostile_notes` rows the event left (0 or 1).
async fn notes(app: &TestApp, event: &Event) -> i64 {
    app.db
        .integer(
            "SELECT count(*) FROM hostile_notes WHERE k = $1",
            &[&event.id],
        )
        .await
}

/// A first delivery that committed: 202, empty body, not a replay.
fn is_processed(answer: &Answer) -> bool {
    answer.status == 202 && answer.body.is_empty() && !answer.is_replay()
}

/// [`Answer::assert_error`] without panicking: the status, the JSON body's
/// `error` code and the `kne-exactlyerror` header all say `code`.
fn is_error(answer: &Answer, status: u16, code: &str) -> Result<(), String> {
    let body: Option<ErrorBody> = serde_json::from_slice(&answer.body).ok();
    let right = answer.status == status
        && body.as_ref().is_some_and(|body| body.error == code)
        && answer.header("kne-exactlyerror") == Some(code)
        && !answer.is_replay();
    if right {
        Ok(())
    } else {
        Err(format!("expected {status} {code}, got {}", summary(answer)))
    }
}

/// `HTTP 500 trap (kne-exactlyerror: trap): <message>`, shortened.
fn summary(answer: &Answer) -> String {
    let mut text = format!("HTTP {}", answer.status);
    match serde_json::from_slice::<ErrorBody>(&answer.body) {
        Ok(body) => {
            text.push_str(&format!(" {}", body.error));
            if answer.header("kne-exactlyerror") != Some(body.error.as_str()) {
                text.push_str(&format!(
                    " (kne-exactlyerror: {:?})",
                    answer.header("kne-exactlyerror")
                ));
            }
            let message: String = body.message.chars().take(300).collect();
            text.push_str(&format!(": {message}"));
            if message.len() < body.message.len() {
                text.push('…');
            }
        }
        Err(_) if answer.body.is_empty() => text.push_str(" (empty body)"),
        Err(_) => {
            let body: String = answer.body_text().chars().take(300).collect();
            text.push_str(&format!(", body: {body}"));
        }
    }
    if answer.is_replay() {
        text.push_str(" (a replay)");
    }
    text
}
