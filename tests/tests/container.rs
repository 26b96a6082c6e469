//! The container image, built and run for real.
//!
//! `deploy/build-image` builds the static musl binary and the handler
//! components on this machine and `podman build`s the FROM scratch image
//! (deploy/Containerfile). The image must then hold every file its handler
//! manifest names, run as its non-root user, and serve events exactly once:
//! against PostgreSQL (the test's own database on the throwaway server,
//! reached over the host's network) and against its embedded SQLite default
//! (port 8080 published, data in the non-root user's folder).
//!
//! Needs podman and runc (Debian's packages; `.ci/run` installs them) and
//! musl-tools. Without them the test fails and says so: it never skips.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use exactly_e2e::app::repo_root;
use exactly_e2e::backend::TestDatabase;
use exactly_e2e::deploy::{Containerfile, ImageManifest};
use exactly_e2e::{Answer, Backend, Event, json};

/// Global podman flags that work on machines without a container daemon,
/// overlay storage or systemd (these machines, CI). The build uses the
/// same ones (deploy/build-image reads PODMAN_GLOBAL_FLAGS), so that the
/// image lands in the storage the runs read from.
const PODMAN_GLOBAL_FLAGS: &[&str] = &[
    "--storage-driver",
    "vfs",
    "--runtime",
    "runc",
    "--cgroup-manager",
    "cgroupfs",
];

/// Without these, runc inherits limits the sandbox does not allow raising.
const RUN_FLAGS: &[&str] = &[
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

/// The static release build takes 8 to 10 minutes on 2 cores from scratch.
const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// From `podman run` to `/readyz` answering 200 (migrations, wasm compile).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(PODMAN_GLOBAL_FLAGS).stdin(Stdio::null());
    command
}

/// Runs a podman command to the end; panics with its output on failure.
#[track_caller]
fn podman_ok(args: &[&str]) -> String {
    let output = podman()
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run podman {args:?}: {error}"));
    assert!(
        output.status.success(),
        "podman {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn require_podman() {
    let found = Command::new("podman")
        .arg("--version")
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "podman is not installed: this test builds and runs the container image. \
         Install Debian's podman and runc (apt-get install -y podman runc musl-tools); \
         .ci/run does."
    );
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The image, removed from podman's storage when the test ends.
struct Image {
    name: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rmi", "--force", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Builds the image with deploy/build-image; its output goes to a log
/// file whose tail is shown if the build fails.
async fn build_image(name: &str, log_dir: &Path) -> Image {
    let log_path = log_dir.join("build-image.log");
    let log = std::fs::File::create(&log_path).expect("create the build log");
    let mut child = Command::new("bash")
        .arg(repo_root().join("deploy/build-image"))
        .env("IMAGE", name)
        .env("PODMAN_GLOBAL_FLAGS", PODMAN_GLOBAL_FLAGS.join(" "))
        .env("CARGO_TERM_COLOR", "never")
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .expect("start deploy/build-image");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for deploy/build-image") {
            break status;
        }
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "deploy/build-image did not finish within {} minutes:\n{}",
                BUILD_TIMEOUT.as_secs() / 60,
                tail(&log_path, 60)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        status.success(),
        "deploy/build-image failed ({status}):\n{}",
        tail(&log_path, 80)
    );
    eprintln!(
        "deploy/build-image built {name} in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Image {
        name: name.to_owned(),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running container, removed (its logs shown first if the test failed)
/// when dropped.
struct Container {
    name: String,
}

impl Container {
    #[track_caller]
    fn run(image: &Image, options: &[&str]) -> Container {
        let name = format!("exactly-e2e-{}", uuid::Uuid::new_v4().simple());
        let mut args = vec!["run", "--detach", "--name", &name];
        args.extend_from_slice(RUN_FLAGS);
        args.extend_from_slice(options);
        args.push(&image.name);
        podman_ok(&args);
        Container { name }
    }

    fn logs(&self) -> String {
        match podman().args(["logs", &self.name]).output() {
            Ok(Output { stdout, stderr, .. }) => format!(
                "{}{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ),
            Err(error) => format!("(podman logs failed: {error})"),
        }
    }

    fn running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]).trim() == "true"
    }

    /// The user id the container's main process runs as, read from the
    /// host's /proc.
    fn process_uid(&self) -> String {
        let pid = podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name]);
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
            .expect("read the container process's status");
        let uid_line = status
            .lines()
            .find(|line| line.starts_with("Uid:"))
            .expect("a Uid line");
        uid_line
            .split_whitespace()
            .nth(1)
            .expect("the real uid")
            .to_owned()
    }

    /// Waits until `GET {base}/readyz` answers 200.
    async fn wait_ready(&self, client: &reqwest::Client, base: &str) {
        let started = Instant::now();
        loop {
            let answer = client.get(format!("{base}/readyz")).send().await;
            if answer.is_ok_and(|response| response.status() == 200) {
                return;
            }
            assert!(
                self.running(),
                "the container stopped before it was ready; its logs:\n{}",
                self.logs()
            );
            assert!(
                started.elapsed() < READY_TIMEOUT,
                "the container was not ready within {}s; its logs:\n{}",
                READY_TIMEOUT.as_secs(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- logs of container {} ---\n{}\n--- end of logs ---",
                self.name,
                self.logs()
            );
        }
        let _ = podman()
            .args(["rm", "--force", "--time", "2", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn send_binary(client: &reqwest::Client, base: &str, event: &Event) -> Answer {
    let mut request = client.post(format!("{base}/"));
    for (name, value) in event.binary_headers() {
        request = request.header(name, value);
    }
    let response = request
        .body(event.data_bytes())
        .send()
        .await
        .unwrap_or_else(|error| panic!("POST {base}/: {error}"));
    Answer::read(response).await
}

fn order_created(order_id: &str) -> Event {
    Event::new("order.created").with_data(json!({
        "order_id": order_id,
        "customer_id": "customer-7",
        "total": 42.5,
    }))
}

fn order_payment(order_id: &str) -> Event {
    Event::new("order.payment").with_data(json!({
        "order_id": order_id,
        "payment_id": format!("payment-{}", uuid::Uuid::new_v4()),
        "amount": 42.5,
    }))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// The image's files and configuration: what the handler manifest names is
/// there, the data folder belongs to the non-root user, and the default
/// PORT is the one the Containerfile declares.
fn check_image_contents(image: &Image, work: &Path) {
    let containerfile = Containerfile::load();
    let user = containerfile
        .user
        .clone()
        .expect("the Containerfile sets USER");

    let config = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.User}}|{{json .Config.Env}}|{{json .Config.ExposedPorts}}",
        &image.name,
    ]);
    let mut parts = config.trim().splitn(3, '|');
    assert_eq!(
        parts.next(),
        Some(user.as_str()),
        "the image's user: {config}"
    );
    let env: Vec<String> = serde_json::from_str(parts.next().unwrap_or("null")).expect("Env");
    let port = &containerfile.env["PORT"];
    assert!(
        env.contains(&format!("PORT={port}")),
        "the image's env: {env:?}"
    );
    assert!(
        parts
            .next()
            .unwrap_or_default()
            .contains(&format!("{port}/tcp")),
        "the image exposes {port}: {config}"
    );

    // List the files of a (never started) container of the image.
    let name = format!("exactly-e2e-files-{}", uuid::Uuid::new_v4().simple());
    podman_ok(&["create", "--name", &name, &image.name]);
    let archive = work.join("image.tar");
    let exported = podman()
        .args(["export", "--output"])
        .arg(&archive)
        .arg(&name)
        .output();
    let _ = podman()
        .args(["rm", "--force", &name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let exported = exported.expect("run podman export");
    assert!(
        exported.status.success(),
        "podman export failed: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let listing = Command::new("tar")
        .args(["--list", "--verbose", "--numeric-owner", "--file"])
        .arg(&archive)
        .output()
        .expect("run tar");
    assert!(listing.status.success(), "tar --list failed");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    // `-rwxr-xr-x 0/0 123 2026-01-01 00:00 opt/exactly/bin/exactly`
    let entries: Vec<(String, String)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 6).then(|| {
                let path = format!("/{}", fields[5..].join(" ").trim_end_matches('/'));
                (path, fields[1].to_owned())
            })
        })
        .collect();
    let owner_of = |path: &str| {
        entries
            .iter()
            .find(|(entry, _)| entry == path)
            .map(|(_, owner)| owner.clone())
    };

    let manifest = ImageManifest::image();
    let mut expected = vec![
        containerfile.entrypoint[0].clone(),
        containerfile.env["EXACTLY_HANDLERS"].clone(),
    ];
    for handler in &manifest.handlers {
        expected.push(handler.component.clone());
        let migrations = handler.migrations.clone().expect("migrations");
        for backend in ["postgres", "sqlite"] {
            let folder = format!("{migrations}/{backend}");
            assert!(
                entries
                    .iter()
                    .any(|(entry, _)| entry.starts_with(&format!("{folder}/"))
                        && entry.ends_with(".sql")),
                "the image has no migration in {folder}:\n{listing}"
            );
        }
    }
    for path in &expected {
        assert!(
            owner_of(path).is_some(),
            "the image lacks {path}:\n{listing}"
        );
    }
    let data = containerfile.workdir.clone().expect("a WORKDIR");
    assert_eq!(
        owner_of(&data).as_deref(),
        Some(user.replace(':', "/").as_str()),
        "{data} must belong to {user}:\n{listing}"
    );
}

/// Against PostgreSQL: the container shares the host's network and reaches
/// the test's database on the throwaway server.
async fn serves_exactly_once_on_postgres(image: &Image, work: &Path, uid: &str) {
    let database = TestDatabase::create(Backend::Postgres, work).await;
    let port = free_port();
    let container = Container::run(
        image,
        &[
            "--network",
            "host",
            "--env",
            &format!("PORT={port}"),
            "--env",
            &format!("DATABASE_URL={}", database.url()),
        ],
    );
    let client = client();
    let base = format!("http://127.0.0.1:{port}");
    container.wait_ready(&client, &base).await;
    assert_eq!(
        container.process_uid(),
        uid,
        "exactly runs as the image's user"
    );

    let order_id = format!("order-{}", uuid::Uuid::new_v4());
    let order = order_created(&order_id);
    send_binary(&client, &base, &order).await.assert_processed();
    send_binary(&client, &base, &order).await.assert_replayed();
    let payment = order_payment(&order_id);
    send_binary(&client, &base, &payment)
        .await
        .assert_processed();
    send_binary(&client, &base, &payment)
        .await
        .assert_replayed();

    let db = database.connect().await;
    assert_eq!(
        db.text(
            "SELECT CAST(status AS TEXT) FROM orders WHERE CAST(order_id AS TEXT) = $1",
            &[&order_id]
        )
        .await
        .as_deref(),
        Some("paid"),
        "the handlers in the image committed the order and its payment"
    );
    assert_eq!(
        db.integer("SELECT count(*) FROM exactly.processed_events", &[])
            .await,
        2,
        "one record per event, however often it was delivered"
    );
    drop(container);
}

/// With nothing configured: the image's SQLite default, in the folder the
/// non-root user owns, on the default port published to the host.
///
/// `EXACTLY_FAULTS` would make a binary built with the test-only crash
/// points (host feature `fault-points`) abort on the first event; the
/// image's binary must not have them, so it must process the event.
/// Likewise `EXACTLY_TEST_SQL_POLICY=off` would switch the SQL policy off in
/// a binary built with the test-only feature `sql-policy-switch`; the
/// image's binary must ignore it (it never logs the switch's warning).
async fn serves_exactly_once_on_its_sqlite_default(image: &Image, uid: &str) {
    let port = free_port();
    let container = Container::run(
        image,
        &[
            "--publish",
            &format!("127.0.0.1:{port}:8080"),
            "--env",
            "EXACTLY_FAULTS=after-claim=1.0",
            "--env",
            "EXACTLY_TEST_SQL_POLICY=off",
        ],
    );
    let client = client();
    let base = format!("http://127.0.0.1:{port}");
    container.wait_ready(&client, &base).await;
    assert_eq!(
        container.process_uid(),
        uid,
        "exactly runs as the image's user"
    );

    let order = order_created(&format!("order-{}", uuid::Uuid::new_v4()));
    send_binary(&client, &base, &order).await.assert_processed();
    send_binary(&client, &base, &order).await.assert_replayed();
    assert!(
        !container.logs().contains("the SQL policy is switched OFF"),
        "the image's binary honoured the test-only EXACTLY_TEST_SQL_POLICY=off; its log:\n{}",
        container.logs()
    );

    // deploy/build-image precompiled the handlers for the image's engine
    // settings: a cold start loads them instead of compiling.
    let scrape = exactly_e2e::metrics::Scrape::parse(
        &client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("its body"),
    );
    for handler in ["order-created", "order-payment"] {
        let precompiled = scrape.get(
            "handler_load_duration_seconds",
            &[("handler", handler), ("from", "precompiled")],
        );
        assert!(
            precompiled.is_some(),
            "{handler} was not loaded precompiled; the container's log:\n{}",
            container.logs()
        );
    }
}

#[tokio::test]
async fn the_image_serves_events_exactly_once() {
    require_podman();
    let work = tempfile::Builder::new()
        .prefix("exactly-container-")
        .tempdir()
        .expect("a temporary folder");
    let started = Instant::now();
    let image = build_image(
        &format!(
            "localhost/exactly-e2e:{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ),
        work.path(),
    )
    .await;
    let built = started.elapsed();

    check_image_contents(&image, work.path());
    let user = Containerfile::load().user.expect("a USER");
    let uid = user.split(':').next().expect("a uid").to_owned();
    serves_exactly_once_on_postgres(&image, work.path(), &uid).await;
    serves_exactly_once_on_its_sqlite_default(&image, &uid).await;
    eprintln!(
        "container test: build {:.0}s, runs {:.0}s",
        built.as_secs_f64(),
        (started.elapsed() - built).as_secs_f64()
    );
}
