//! The 503 answers: the event could not be processed now, through no fault
//! of its own, and the broker must retry it. Nothing of it is stored, and
//! once the cause is gone the same event is processed exactly once.
//!
//! These tests start `exactly serve` themselves (flags of their own, a
//! signal, a database behind a proxy they can cut).

use std::time::Duration;

use exactly_e2e::serve::Host;
use exactly_e2e::{Backend, Db, Event, TestEnv, both_backends, json};
use sqlx::{AssertSqlSafe, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

both_backends!(
    busy_event_is_answered_503,
    shutting_down_refuses_new_events,
    grace_period_bounds_the_shutdown
);

mod postgres_only {
    #[tokio::test]
    async fn database_unavailable_is_answered_503() {
        super::database_unavailable_is_answered_503().await
    }

    #[tokio::test]
    async fn start_up_waits_for_the_database() {
        super::start_up_waits_for_the_database().await
    }
}


async fn stored(db: &Db, backend: Backend, event: &Event) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM {} WHERE source = $1 AND id = $2",
        backend.processed_events_table()
    );
    db.integer(&sql, &[&event.source, &event.id]).await
}

async fn effects(db: &Db, event: &Event) -> i64 {
    db.integer(
        "SELECT count(*) FROM test_effects WHERE event_source = $1 AND event_id = $2",
        &[&event.source, &event.id],
    )
    .await
}

/// PostgreSQL: a redelivery that waits longer than the lock timeout behind
/// a concurrent first delivery. SQLite: another writer holds the database
/// longer than the busy timeout. Either way 503 `busy`, and the event is
/// processed once when retried.
async fn busy_event_is_answered_503(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let url = env.database_url().to_owned();
    let host = Host::start(&env, &url, &["--lock-timeout", "1s"]).await;
    let db = env.connect().await;
    let event = Event::new("test.sleep").with_data(json!({"ms": 4000}));

    match backend {
        Backend::Postgres => {
            let first = async { host.send(&event).await };
            let second = async {
                tokio::time::sleep(Duration::from_millis(1000)).await;
                host.send(&event).await
            };
            let (first, second) = tokio::join!(first, second);
            second.assert_error(503, "busy");
            first.assert_processed();
        }
        Backend::Sqlite => {
            let path = url.trim_start_matches("sqlite://");
            let mut writer = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
                .await
                .expect("open the host's SQLite file");
            sqlx::raw_sql(AssertSqlSafe("BEGIN IMMEDIATE"))
                .execute(&mut writer)
                .await
                .expect("take the write lock");
            host.send(&event).await.assert_error(503, "busy");
            assert_eq!(
                stored(&db, backend, &event).await,
                0,
                "a busy event stores nothing"
            );
            sqlx::raw_sql(AssertSqlSafe("ROLLBACK"))
                .execute(&mut writer)
                .await
                .expect("release it");
            host.send(&event).await.assert_processed();
        }
    }
    assert_eq!(stored(&db, backend, &event).await, 1);
    assert_eq!(
        effects(&db, &event).await,
        1,
        "the handler's work committed once"
    );
    host.send(&event).await.assert_replayed();
    assert_eq!(effects(&db, &event).await, 1);
}

/// After SIGTERM the host stops accepting connections, answers 503
/// `shutting-down` to an event that arrives on a connection it already
/// had, lets the event in flight finish, and exits.
async fn shutting_down_refuses_new_events(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let url = env.database_url().to_owned();
    let mut host = Host::start(&env, &url, &["--shutdown-grace", "30s"]).await;
    let db = env.connect().await;

    // A connection opened before the signal, with the start of a request
    // (hyper closes a connection that sent nothing yet at once), and the
    // rest of the request sent after the signal.
    let mut early = TcpStream::connect(host.host_port()).await.expect("connect");
    let start = b"POST / HTTP/1.1\r\nHost: exactly\r\n";
    early
        .write_all(start)
        .await
        .expect("send the start of a request");
    let in_flight = Event::new("test.sleep").with_data(json!({"ms": 2000}));
    let late = Event::new("test.count");

    let flight = async { host.send(&in_flight).await };
    let signal_then_late = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let pid = host.child.id().expect("the host runs");
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(killed.success());
        // The listener closes once the signal is handled.
        tokio::time::timeout(Duration::from_secs(20), async {
            while TcpStream::connect(host.host_port()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the host stops accepting connections after SIGTERM");
        let mut request = format!(
            "Connection: close\r\nContent-Length: {}\r\n",
            late.data_bytes().len()
        )
        .into_bytes();
        for (name, value) in late.binary_headers() {
            request.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(&late.data_bytes());
        early
            .write_all(&request)
            .await
            .expect("send on the early connection");
        let mut bytes = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), early.read_to_end(&mut bytes))
            .await
            .expect("an answer")
            .expect("read the answer");
        bytes
    };
    let (flight, late_bytes) = tokio::join!(flight, signal_then_late);

    let text = String::from_utf8_lossy(&late_bytes);
    assert!(
        text.starts_with("HTTP/1.1 503"),
        "expected 503 shutting-down:\n{text}\n{}",
        host.log()
    );
    assert!(text.contains("\"error\":\"shutting-down\""), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("kne-exactlyerror: shutting-down"),
        "{text}"
    );
    flight.assert_processed();

    let status = tokio::time::timeout(Duration::from_secs(30), host.child.wait())
        .await
        .expect("the host exits once the event in flight is done")
        .expect("wait for the host");
    assert!(status.success(), "exit status {status}:\n{}", host.log());
    assert_eq!(
        stored(&db, backend, &in_flight).await,
        1,
        "the event in flight committed"
    );
    assert_eq!(effects(&db, &in_flight).await, 1);
    assert_eq!(
        stored(&db, backend, &late).await,
        0,
        "the refused event stored nothing"
    );
}

/// SIGTERM while events run longer than the grace period: the process exits
/// 0 when the grace period is over, and the unfinished events roll back
/// (their client gets no answer, so the broker redelivers them), while
/// those that finished in time are committed.
async fn grace_period_bounds_the_shutdown(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let url = env.database_url().to_owned();
    let mut host = Host::start(&env, &url, &["--shutdown-grace", "2s"]).await;
    let db = env.connect().await;

    // The short event starts first. On SQLite (one writer) the long one
    // waits for it and then runs; on PostgreSQL both run at once. SIGTERM
    // comes while the short one runs; it ends well inside the grace period,
    // the long one does not.
    let short = Event::new("test.sleep").with_data(json!({"ms": 800}));
    let long = Event::new("test.sleep").with_data(json!({"ms": 20000}));
    let pid = host.child.id().expect("the host runs");
    let (short_answer, long_answer, signalled) = tokio::join!(
        host.send(&short),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            host.try_send(&long).await.map(|answer| answer.status)
        },
        async {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let killed = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(killed.success());
            std::time::Instant::now()
        }
    );
    let status = tokio::time::timeout(Duration::from_secs(15), host.child.wait())
        .await
        .expect("the host exits soon after the grace period")
        .expect("wait for the host");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", host.log());
    assert!(
        took < Duration::from_secs(10),
        "exited after {took:?}, not after the 2 s grace period"
    );
    short_answer.assert_processed();
    assert!(
        long_answer.is_err(),
        "the unfinished event got no answer, the broker will redeliver it: {long_answer:?}"
    );
    assert_eq!(stored(&db, backend, &short).await, 1);
    assert_eq!(effects(&db, &short).await, 1);
    assert_eq!(stored(&db, backend, &long).await, 0, "the unfinished event rolled back");
    assert_eq!(effects(&db, &long).await, 0);
    assert!(host.log().contains("grace period over"), "{}", host.log());
}

/// A TCP proxy in front of PostgreSQL that the test can cut (as if the
/// server went away: connections drop, new ones are refused) and restore.
struct Proxy {
    port: u16,
    upstream: String,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(port: u16, upstream: &str) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("its address").port();
        let to = upstream.to_owned();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = to.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy {
            port,
            upstream: upstream.to_owned(),
            task,
        }
    }

    /// Closes the listener and every connection through it.
    fn cut(&self) {
        self.task.abort();
    }

    async fn restore(&self) -> Proxy {
        Proxy::start(self.port, &self.upstream).await
    }
}

/// The test database's URL, and the `host:port` of its server (for a
/// [`Proxy`] to stand in front of).
fn url_and_server(env: &TestEnv) -> (reqwest::Url, String) {
    let url = reqwest::Url::parse(env.database_url()).expect("a URL");
    let server = format!(
        "{}:{}",
        url.host_str().expect("a host"),
        url.port().unwrap_or(5432)
    );
    (url, server)
}

/// PostgreSQL goes away: events get 503 `database-unavailable` (and
/// `/readyz` 503) instead of hanging or failing for good; once it is back,
/// the same event is processed.
async fn database_unavailable_is_answered_503() {
    let backend = Backend::Postgres;
    let env = TestEnv::new(backend).await;
    let (mut url, upstream) = url_and_server(&env);
    let proxy = Proxy::start(0, &upstream).await;
    url.set_port(Some(proxy.port)).expect("set the port");
    let host = Host::start(&env, url.as_str(), &[]).await;
    let db = env.connect().await;

    host.send(&Event::new("test.count"))
        .await
        .assert_processed();
    host.get("/readyz").await.assert_status(200);

    proxy.cut();
    let event = Event::new("test.count").with_data(json!({"during": "outage"}));
    let answer = host.send(&event).await;
    answer.assert_error(503, "database-unavailable");
    host.get("/readyz").await.assert_status(503);
    assert_eq!(stored(&db, backend, &event).await, 0);

    let _restored = proxy.restore().await;
    host.send(&event).await.assert_processed();
    host.get("/readyz").await.assert_status(200);
    assert_eq!(stored(&db, backend, &event).await, 1);
    assert_eq!(effects(&db, &event).await, 1);
}

/// PostgreSQL is not there when `exactly serve` starts (as when a pod comes
/// up before its database): the process keeps running, says it is alive but
/// not ready, answers events 503, and starts serving them once the database
/// appears, without a restart.
async fn start_up_waits_for_the_database() {
    let backend = Backend::Postgres;
    let env = TestEnv::new(backend).await;
    let (mut url, upstream) = url_and_server(&env);
    // A port nothing listens on yet: the proxy opens it later.
    let port = {
        let probe = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        probe.local_addr().expect("its address").port()
    };
    url.set_port(Some(port)).expect("set the port");
    let host = Host::start(&env, url.as_str(), &[]).await;
    let db = env.connect().await;

    host.get("/healthz").await.assert_status(200);
    host.get("/readyz").await.assert_status(503);
    let event = Event::new("test.count").with_data(json!({"before": "the database"}));
    host.send(&event).await.assert_error(503, "database-unavailable");
    assert!(
        host.log().contains("the database is not reachable"),
        "the wait is logged:\n{}",
        host.log()
    );

    let _proxy = Proxy::start(port, &upstream).await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while host.get("/readyz").await.status != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("ready once the database is there:\n{}", host.log()));
    host.send(&event).await.assert_processed();
    assert_eq!(stored(&db, backend, &event).await, 1);
    assert_eq!(effects(&db, &event).await, 1);
}
