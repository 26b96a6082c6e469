//! Finding, starting and stopping the real `exactly` binary.
//!
//! [`TestEnv`] is what a test owns before the host runs: a temporary
//! folder, a fresh database and a handler manifest with absolute paths.
//! [`TestEnv::serve`] turns it into a [`TestApp`]: `exactly serve` on
//! `127.0.0.1:0`, ready once it printed its address, killed when the test
//! ends. Its stderr (the logs) goes to a file in the temporary folder; when a
//! test fails, the tail is printed and the folder kept.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::answer::Answer;
use crate::backend::{Backend, Db, TestDatabase};
use crate::event::{Event, STRUCTURED_CONTENT_TYPE};

/// How long `exactly serve` may take to migrate, compile the components
/// and bind (a debug build compiles wasm slowly).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound for one HTTP exchange or one `exactly migrate`, so that a
/// hung host fails the test instead of hanging the suite.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// What `exactly serve` prints on stdout once it accepts connections.
const LISTENING_PREFIX: &str = "exactly listening on ";

/// The repository's root folder (this crate lives in `<repo>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives in <repo>/tests")
        .to_path_buf()
}

/// The `exactly` binary: `$EXACTLY_BIN`, or `<target>/debug/exactly` next to
/// the folder that holds this test executable (`<target>/debug/deps`).
pub fn exactly_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EXACTLY_BIN").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "EXACTLY_BIN={} does not exist",
            path.display()
        );
        return path;
    }
    let test_executable = std::env::current_exe().expect("the test executable's path");
    let path = test_executable
        .parent() // <target>/debug/deps
        .and_then(Path::parent) // <target>/debug
        .map(|debug| debug.join(format!("exactly{}", std::env::consts::EXE_SUFFIX)))
        .expect("the test executable lives in <target>/debug/deps");
    assert!(
        path.is_file(),
        "the exactly binary {} does not exist: run scripts/test, which builds it \
         (or build it with `cargo build -p exactly`, or point EXACTLY_BIN at one)",
        path.display()
    );
    path
}

/// One handler in the manifest handed to `--handlers`.
#[derive(Clone, Debug)]
pub struct HandlerEntry {
    pub name: String,
    pub component: PathBuf,
    pub types: Vec<String>,
    pub migrations: PathBuf,
    /// Other handlers' tables this one may use (`uses = [...]`); written
    /// only when not empty.
    pub uses: Vec<String>,
    /// The handler's `[handler.limits]` table; `None` writes no table (the
    /// host's defaults apply).
    pub limits: Option<HandlerLimits>,
}

impl HandlerEntry {
    fn from_repo(name: &str, migrations: &str, types: &[&str]) -> HandlerEntry {
        let root = repo_root();
        HandlerEntry {
            name: name.to_owned(),
            component: root.join("dist").join(format!("{name}.wasm")),
            types: types.iter().map(|type_| (*type_).to_owned()).collect(),
            migrations: root.join(migrations),
            uses: Vec::new(),
            limits: None,
        }
    }

    pub fn with_limits(mut self, limits: HandlerLimits) -> HandlerEntry {
        self.limits = Some(limits);
        self
    }
}

/// A handler's sandbox limits, the manifest's `[handler.limits]` table.
/// Each `None` is left out, so the host's default (its CLI flag) applies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandlerLimits {
    /// Wall clock per event.
    pub deadline: Option<Duration>,
    /// Linear-memory cap of one instance.
    pub memory_mib: Option<u64>,
    /// PostgreSQL `statement_timeout` of the handler's statements.
    pub statement_timeout: Option<Duration>,
    /// Rows one query may return.
    pub max_rows: Option<u64>,
    /// Bytes one query may return.
    pub max_result_bytes: Option<u64>,
    /// Statements per event.
    pub max_statements: Option<u64>,
    /// Log lines plus stdout and stderr, in bytes per event.
    pub max_log_bytes: Option<u64>,
    /// Wasm fuel per event; 0 turns metering off.
    pub fuel: Option<u64>,
    /// Bytes of the outcome: the JSON result plus the reply event.
    pub max_reply_bytes: Option<u64>,
    /// Bytes of an event's data this handler takes.
    pub max_body_bytes: Option<u64>,
}

/// The manifest's `[handler.limits]` table as `toml` writes it; each `None`
/// is left out.
#[derive(serde::Serialize)]
struct LimitsTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    statement_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_result_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_statements: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_log_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fuel: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_reply_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<u64>,
}

impl From<&HandlerLimits> for LimitsTable {
    fn from(limits: &HandlerLimits) -> LimitsTable {
        LimitsTable {
            deadline: limits.deadline.map(duration_text),
            memory_mib: limits.memory_mib,
            statement_timeout: limits.statement_timeout.map(duration_text),
            max_rows: limits.max_rows,
            max_result_bytes: limits.max_result_bytes,
            max_statements: limits.max_statements,
            max_log_bytes: limits.max_log_bytes,
            fuel: limits.fuel,
            max_reply_bytes: limits.max_reply_bytes,
            max_body_bytes: limits.max_body_bytes,
        }
    }
}

/// A duration as the manifest writes it: `"2s"`, or `"250ms"` when it is not
/// a whole number of seconds.
fn duration_text(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// The handlers every test runs with: the two example handlers and the
/// testkit, whose event types each trigger one behaviour of the host.
pub fn standard_handlers() -> Vec<HandlerEntry> {
    vec![
        HandlerEntry::from_repo(
            "order-created",
            "handlers/order-created/migrations",
            &["order.created"],
        ),
        HandlerEntry {
            // order-payment updates the orders order-created owns.
            uses: vec!["orders".into(), "order_events".into()],
            ..HandlerEntry::from_repo(
                "order-payment",
                "handlers/order-payment/migrations",
                &["order.payment"],
            )
        },
        HandlerEntry::from_repo(
            "testkit",
            "tests/handlers/testkit/migrations",
            &[
                "test.count",
                "test.flaky",
                "test.permanent",
                "test.panic",
                "test.commit",
                "test.commit-multi",
                "test.swallow",
                "test.emit",
                "test.sleep",
                "test.echo",
                "test.attributes",
                "test.raw-result",
                "test.bad-reply",
                "test.insert",
                "test.read-as-integer",
            ],
        ),
    ]
}

/// Every event type of the `hostile` test handler
/// (`tests/handlers/hostile`), which attacks its sandbox.
pub const HOSTILE_TYPES: &[&str] = &[
    "hostile.ok",
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
    "hostile.pg-sleep",
    "hostile.loop",
    "hostile.alloc",
    "hostile.recurse",
    "hostile.log-flood",
    "hostile.stdout-flood",
    "hostile.rows",
    "hostile.big-result",
    "hostile.statements",
    "hostile.many-params",
    "hostile.big-param",
    "hostile.long-numeric",
    "hostile.long-sql",
    "hostile.big-reply",
    "hostile.big-outcome",
    "hostile.read-file",
    "hostile.env",
    "hostile.socket",
    "hostile.sql",
];

/// The `hostile` test handler, with `limits` as its `[handler.limits]`
/// table (`None`: the host's defaults).
pub fn hostile_handler(limits: Option<HandlerLimits>) -> HandlerEntry {
    let mut handler = HandlerEntry::from_repo(
        "hostile",
        "tests/handlers/hostile/migrations",
        HOSTILE_TYPES,
    );
    handler.limits = limits;
    handler
}

/// One `[[handler]]` entry as `toml` writes it.
#[derive(serde::Serialize)]
struct HandlerTable<'a> {
    name: &'a str,
    component: String,
    types: &'a [String],
    migrations: String,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    uses: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    limits: Option<LimitsTable>,
}

#[derive(serde::Serialize)]
struct ManifestFile<'a> {
    handler: Vec<HandlerTable<'a>>,
}

/// The manifest's TOML, every path absolute, written by the `toml` crate
/// (the one the host reads it with).
pub fn manifest_toml(handlers: &[HandlerEntry]) -> String {
    let file = ManifestFile {
        handler: handlers
            .iter()
            .map(|handler| HandlerTable {
                name: &handler.name,
                component: handler.component.display().to_string(),
                types: &handler.types,
                migrations: handler.migrations.display().to_string(),
                uses: &handler.uses,
                limits: handler.limits.as_ref().map(LimitsTable::from),
            })
            .collect(),
    };
    toml::to_string(&file).expect("a manifest always serializes")
}

/// Everything a test owns before the host starts: a temporary folder, a
/// fresh database and the handler manifest.
pub struct TestEnv {
    // Field order is drop order: the database goes before its folder.
    database: TestDatabase,
    manifest: PathBuf,
    dir: tempfile::TempDir,
}

impl TestEnv {
    /// A fresh database on `backend` and the standard manifest.
    pub async fn new(backend: Backend) -> TestEnv {
        TestEnv::with_handlers(backend, standard_handlers()).await
    }

    pub async fn with_handlers(backend: Backend, handlers: Vec<HandlerEntry>) -> TestEnv {
        for handler in &handlers {
            assert!(
                handler.component.is_file(),
                "the component {} is missing: run scripts/test (or scripts/build-handlers), \
                 which builds dist/*.wasm",
                handler.component.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("exactly-e2e-")
            .tempdir()
            .expect("a temporary folder");
        let manifest = dir.path().join("handlers.toml");
        std::fs::write(&manifest, manifest_toml(&handlers)).expect("write the manifest");
        let database = TestDatabase::create(backend, dir.path()).await;
        TestEnv {
            database,
            manifest,
            dir,
        }
    }

    pub fn backend(&self) -> Backend {
        self.database.backend()
    }

    pub fn database_url(&self) -> &str {
        self.database.url()
    }

    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects to the test's database (after the host migrated it).
    pub async fn connect(&self) -> Db {
        self.database.connect().await
    }

    /// The `exactly` command with the environment a test wants: no
    /// `DATABASE_URL` or `PORT` inherited (the flags say everything), and no
    /// OpenTelemetry export unless the test asks for it.
    fn exactly(&self) -> Command {
        let mut command = Command::new(exactly_binary());
        command
            .env_remove("DATABASE_URL")
            .env_remove("PORT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env("NO_COLOR", "1")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs `exactly dlq <args…> --database-url <the test's>` to the end.
    /// No manifest is handed over: `dlq` needs the database only.
    pub async fn dlq(&self, args: &[&str]) -> Output {
        let mut command = self.exactly();
        command
            .arg("dlq")
            .args(args)
            .arg("--database-url")
            .arg(self.database_url());
        tokio::time::timeout(REQUEST_TIMEOUT, command.output())
            .await
            .expect("exactly dlq did not finish within a minute")
            .expect("run exactly dlq")
    }

    /// `exactly dlq list --json <filters…>`: the stored dead letters,
    /// newest first; panics when the command fails or prints no array.
    pub async fn dlq_list_json(&self, filters: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(filters);
        let output = self.dlq(&args).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "exactly dlq {} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        match serde_json::from_str(&stdout) {
            Ok(serde_json::Value::Array(items)) => items,
            other => panic!("`exactly dlq list --json` did not print a JSON array ({other:?}):\n{stdout}"),
        }
    }

    /// Runs `exactly migrate` to the end.
    pub async fn migrate(&self) -> Output {
        let mut command = self.exactly();
        command
            .arg("migrate")
            .arg("--database-url")
            .arg(self.database_url())
            .arg("--handlers")
            .arg(self.manifest());
        tokio::time::timeout(REQUEST_TIMEOUT, command.output())
            .await
            .expect("exactly migrate did not finish within a minute")
            .expect("run exactly migrate")
    }

    /// Runs `exactly compile --handlers <manifest> <args>` to the end
    /// (`args` may name another manifest with `--handlers`).
    pub async fn compile(&self, args: &[&str]) -> Output {
        let mut command = self.exactly();
        command.arg("compile");
        if !args.contains(&"--handlers") {
            command.arg("--handlers").arg(self.manifest());
        }
        command.args(args);
        tokio::time::timeout(REQUEST_TIMEOUT, command.output())
            .await
            .expect("exactly compile did not finish within a minute")
            .expect("run exactly compile")
    }

    /// Starts `exactly serve` on a free port and waits until it listens.
    pub async fn serve(self) -> TestApp {
        self.serve_with_flags(&[]).await
    }

    /// [`TestEnv::serve`] with extra flags for `exactly serve`.
    pub async fn serve_with_flags(self, flags: &[&str]) -> TestApp {
        self.serve_with_env(flags, &[]).await
    }

    /// [`TestEnv::serve_with_flags`] with extra environment variables.
    pub async fn serve_with_env(self, flags: &[&str], env: &[(&str, &str)]) -> TestApp {
        self.start_serve(flags, env, None).await
    }

    /// [`TestEnv::serve_with_env`] in a process whose virtual memory is
    /// capped at `bytes`: its `RLIMIT_AS`, what `ulimit -v` and some
    /// container runtimes set.
    pub async fn serve_with_virtual_memory_limit(
        self,
        flags: &[&str],
        env: &[(&str, &str)],
        bytes: u64,
    ) -> TestApp {
        self.start_serve(flags, env, Some(bytes)).await
    }

    async fn start_serve(
        self,
        flags: &[&str],
        env: &[(&str, &str)],
        virtual_memory_limit: Option<u64>,
    ) -> TestApp {
        let stderr_path = self.dir.path().join("exactly.stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("create the stderr log");
        let mut command = self.exactly();
        command.envs(env.iter().copied());
        if let Some(bytes) = virtual_memory_limit {
            limit_virtual_memory(&mut command, bytes);
        }
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--database-url")
            .arg(self.database_url())
            .arg("--handlers")
            .arg(self.manifest())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", exactly_binary().display()));

        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let waited = tokio::time::timeout(STARTUP_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.ok().flatten() {
                if let Some(address) = line.trim().strip_prefix(LISTENING_PREFIX) {
                    return Some(address.trim_end_matches('/').to_owned());
                }
            }
            None
        })
        .await;
        let address = match waited {
            Ok(Some(address)) => address,
            Ok(None) => {
                let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                panic!(
                    "exactly serve closed its stdout without printing `{LISTENING_PREFIX}http://…` \
                     (exit: {status:?}); its stderr:\n{}",
                    tail(&stderr_path, 200)
                );
            }
            Err(_) => {
                let _ = child.start_kill();
                panic!(
                    "exactly serve did not print `{LISTENING_PREFIX}http://…` within {}s; its stderr:\n{}",
                    STARTUP_TIMEOUT.as_secs(),
                    tail(&stderr_path, 200)
                );
            }
        };
        // Keep draining stdout so that the host never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("an HTTP client");
        let db = self.connect().await;
        TestApp {
            address,
            client,
            db,
            stderr_path,
            child,
            env: self,
        }
    }
}

/// Caps the virtual memory of the process `command` starts at `bytes`
/// (`setrlimit(RLIMIT_AS)` in the child, between fork and exec).
fn limit_virtual_memory(command: &mut Command, bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setrlimit, which is async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_AS, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A running `exactly serve` with its own database, and a client for both.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`, as the host printed it.
    pub address: String,
    pub client: reqwest::Client,
    /// The test's own connection to the host's database.
    pub db: Db,
    stderr_path: PathBuf,
    child: Child,
    env: TestEnv,
}

/// A row of the host's table of committed events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessedEvent {
    pub type_: String,
    /// The HTTP status that was answered (and is replayed).
    pub status: u16,
}

impl TestApp {
    /// `exactly serve` with the standard handlers on a fresh database.
    pub async fn spawn(backend: Backend) -> TestApp {
        TestEnv::new(backend).await.serve().await
    }

    /// `exactly serve` with these handlers on a fresh database.
    pub async fn spawn_with_handlers(backend: Backend, handlers: Vec<HandlerEntry>) -> TestApp {
        TestEnv::with_handlers(backend, handlers)
            .await
            .serve()
            .await
    }

    /// `exactly serve` with the standard handlers plus the `hostile` test
    /// handler, whose `[handler.limits]` table is `limits`.
    pub async fn spawn_with_hostile(backend: Backend, limits: Option<HandlerLimits>) -> TestApp {
        let mut handlers = standard_handlers();
        handlers.push(hostile_handler(limits));
        TestApp::spawn_with_handlers(backend, handlers).await
    }

    pub fn backend(&self) -> Backend {
        self.env.backend()
    }

    /// What the test owns besides the running host: folder, database URL,
    /// and the `exactly` commands other than `serve`.
    pub fn env(&self) -> &TestEnv {
        &self.env
    }

    /// POSTs a request to `/` as the Knative dispatcher would.
    pub async fn post(&self, headers: &[(String, String)], body: Vec<u8>) -> Answer {
        self.post_to("/", headers, body).await
    }

    /// POSTs a request to `path` (`/dead-letter`, say).
    pub async fn post_to(&self, path: &str, headers: &[(String, String)], body: Vec<u8>) -> Answer {
        let mut request = self.client.post(format!("{}{path}", self.address));
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request.body(body).send().await.unwrap_or_else(|error| {
            panic!("POST {}: {error}\n{}", self.address, self.stderr_tail())
        });
        Answer::read(response).await
    }

    /// Delivers `event` in binary mode (`ce-*` headers, data as the body).
    pub async fn send_binary(&self, event: &Event) -> Answer {
        self.post(&event.binary_headers(), event.data_bytes()).await
    }

    /// Delivers `event` in structured mode (one CloudEvents JSON document).
    pub async fn send_structured(&self, event: &Event) -> Answer {
        let headers = [(
            "content-type".to_owned(),
            STRUCTURED_CONTENT_TYPE.to_owned(),
        )];
        self.post(&headers, event.structured_body()).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        let url = format!("{}{path}", self.address);
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|error| panic!("GET {url}: {error}\n{}", self.stderr_tail()));
        Answer::read(response).await
    }

    /// The host's record of `(source, id)`: present iff the event committed
    /// with its answer. (On PostgreSQL a claim row without an answer
    /// commits only when a handler ended the event's transaction itself;
    /// it is not an answered event, and the next delivery takes it over.)
    pub async fn processed(&self, source: &str, id: &str) -> Option<ProcessedEvent> {
        let sql = format!(
            r#"SELECT CAST("type" AS TEXT), CAST(status AS TEXT) FROM {} WHERE source = $1 AND id = $2 AND status IS NOT NULL"#,
            self.backend().processed_events_table()
        );
        let mut rows = self.db.rows(&sql, &[source, id]).await;
        assert!(
            rows.len() <= 1,
            "(source, id) must be unique in {sql}: {rows:?}"
        );
        let row = rows.pop()?;
        let [type_, status] = <[Option<String>; 2]>::try_from(row).expect("two columns");
        let status = status.expect("status is not NULL");
        Some(ProcessedEvent {
            type_: type_.expect("type is not NULL"),
            status: status
                .parse()
                .unwrap_or_else(|_| panic!("status {status:?} is not an HTTP status")),
        })
    }

    /// [`TestApp::processed`] for an event the test sent.
    pub async fn processed_event(&self, event: &Event) -> Option<ProcessedEvent> {
        self.processed(&event.source, &event.id).await
    }

    /// The `result` the handler returned for `event` (stored with the
    /// claim, JSON), if the event committed.
    pub async fn processed_result(&self, event: &Event) -> Option<serde_json::Value> {
        let sql = format!(
            "SELECT CAST(result AS TEXT) FROM {} WHERE source = $1 AND id = $2",
            self.backend().processed_events_table()
        );
        let text = self.db.text(&sql, &[&event.source, &event.id]).await?;
        Some(serde_json::from_str(&text).unwrap_or_else(|error| {
            panic!(
                "the stored result of {} is not JSON ({error}): {text}",
                event.id
            )
        }))
    }

    /// How many events the host committed in all.
    pub async fn processed_count(&self) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM {}",
            self.backend().processed_events_table()
        );
        self.db.integer(&sql, &[]).await
    }

    /// How often a testkit handler run for `event` committed: every run
    /// inserts one `test_effects` row before doing anything else.
    pub async fn effects(&self, event: &Event) -> i64 {
        self.db
            .integer(
                "SELECT count(*) FROM test_effects WHERE event_source = $1 AND event_id = $2",
                &[&event.source, &event.id],
            )
            .await
    }

    /// The last lines the host logged.
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr_path, 80)
    }

    /// Stops the host as Kubernetes does, with SIGTERM, and waits (up to a
    /// minute) until it exits; returns its exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("the host is still running");
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::time::timeout(REQUEST_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the host did not exit within a minute of SIGTERM; its stderr:\n{}", self.stderr_tail()))
            .expect("wait for the host")
    }

    /// Everything the host logged so far.
    pub fn logs(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// Scrapes `GET /metrics` and parses the text format.
    pub async fn metrics(&self) -> crate::metrics::Scrape {
        let answer = self.get("/metrics").await;
        answer.assert_status(200);
        let content_type = answer.header("content-type").unwrap_or_default().to_owned();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "/metrics answered content-type {content_type:?}, not the Prometheus text format"
        );
        crate::metrics::Scrape::parse(&answer.body_text())
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- the last lines of exactly's stderr ({}) ---\n{}\n--- end of exactly's stderr ---",
                self.stderr_path.display(),
                self.stderr_tail()
            );
            // Keep the folder (log, manifest, SQLite file) for inspection.
            self.env.dir.disable_cleanup(true);
            eprintln!("kept the test folder {}", self.env.dir.path().display());
        }
    }
}

/// The last `lines` lines of a file, or why it could not be read.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                "(empty)".to_owned()
            } else {
                all[start..].join("\n")
            }
        }
        Err(error) => format!("(cannot read {}: {error})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manifest as the host reads it: an array of handler tables.
    fn parsed(handlers: &[HandlerEntry]) -> Vec<toml::Table> {
        let text = manifest_toml(handlers);
        let mut file: toml::Table = toml::from_str(&text).expect("valid TOML");
        match file.remove("handler") {
            Some(toml::Value::Array(entries)) => entries
                .into_iter()
                .map(|entry| match entry {
                    toml::Value::Table(table) => table,
                    other => panic!("a handler entry is not a table: {other:?}"),
                })
                .collect(),
            other => panic!("no [[handler]] array: {other:?}\n{text}"),
        }
    }

    #[test]
    fn the_manifest_lists_every_handler_with_absolute_paths() {
        let handlers = parsed(&standard_handlers());
        assert_eq!(handlers.len(), 3);
        assert_eq!(handlers[0]["name"].as_str(), Some("order-created"));
        assert_eq!(handlers[1]["types"], toml::Value::Array(vec!["order.payment".into()]));
        assert!(handlers[1]["uses"].as_array().is_some_and(|uses| uses.len() == 2));
        assert!(handlers[0].get("uses").is_none(), "empty `uses` is left out");
        let root = repo_root().display().to_string();
        assert_eq!(handlers[2]["component"].as_str(), Some(format!("{root}/dist/testkit.wasm").as_str()));
        assert_eq!(
            handlers[2]["migrations"].as_str(),
            Some(format!("{root}/tests/handlers/testkit/migrations").as_str())
        );
    }

    #[test]
    fn limits_become_a_table_of_their_handler() {
        let limits = HandlerLimits {
            deadline: Some(Duration::from_secs(2)),
            memory_mib: Some(64),
            statement_timeout: Some(Duration::from_millis(1500)),
            max_rows: Some(10_000),
            ..HandlerLimits::default()
        };
        let mut handlers = standard_handlers();
        handlers.push(hostile_handler(Some(limits)));
        let handlers = parsed(&handlers);
        assert_eq!(handlers.len(), 4);
        assert!(handlers[..3].iter().all(|handler| handler.get("limits").is_none()));
        let table = handlers[3]["limits"].as_table().expect("the hostile handler's limits");
        let expected: toml::Table =
            toml::from_str("deadline = \"2s\"\nmemory_mib = 64\nstatement_timeout = \"1500ms\"\nmax_rows = 10000").unwrap();
        assert_eq!(table, &expected);
    }

    #[test]
    fn names_that_need_escaping_survive() {
        let mut handler = standard_handlers().remove(0);
        handler.types = vec![r#"a"b\c"#.to_owned()];
        assert_eq!(parsed(&[handler])[0]["types"][0].as_str(), Some(r#"a"b\c"#));
    }
}
