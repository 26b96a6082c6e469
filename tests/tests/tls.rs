//! TLS to PostgreSQL (issue 11): `sslmode`, `sslrootcert`, `sslcert` and
//! `sslkey` as libpq names them, in the URL or as `--database-ssl*` flags,
//! on every connection `exactly` opens (the host's pool and each handler's
//! own pool), with libpq's default `prefer`. What cannot be had as
//! configured stops the start-up with the driver's words, never a wait.
//!
//! Each test starts a PostgreSQL server of its own (the shared test server
//! has no TLS) and turns TLS on with certificates made here (rcgen): a test
//! certificate authority, and server certificates it signs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use exactly_e2e::app::exactly_binary;
use exactly_e2e::harness::postgres::{PgCluster, connect_with_retry};
use exactly_e2e::serve::Host;
use exactly_e2e::{Backend, Event, TestEnv};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

mod postgres_only {
    #[tokio::test]
    async fn verify_full_puts_every_pool_on_tls() {
        super::verify_full_puts_every_pool_on_tls().await
    }

    #[tokio::test]
    async fn tls_that_cannot_be_had_stops_the_start_up() {
        super::tls_that_cannot_be_had_stops_the_start_up().await
    }

    #[tokio::test]
    async fn prefer_is_the_default() {
        super::prefer_is_the_default().await
    }
}

/// A certificate authority of the test's own.
struct Authority {
    certificate: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        let certificate = params.self_signed(&key).expect("the CA certificate");
        Authority { certificate, key }
    }

    /// A server certificate for these names (DNS names or IP addresses)
    /// and its key, PEM.
    fn server(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let params = CertificateParams::new(names).expect("server parameters");
        let key = KeyPair::generate().expect("a server key");
        let certificate = params.signed_by(&key, &self.certificate, &self.key).expect("the server certificate");
        (certificate.pem(), key.serialize_pem())
    }

    /// The CA certificate written as a PEM file in `dir`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.certificate.pem()).expect("write the CA certificate");
        path
    }
}

/// A server of the test's own with TLS on, its certificate signed by
/// `authority` for `names`.
async fn tls_server(authority: &Authority, names: &[&str]) -> PgCluster {
    let cluster = PgCluster::start().await.expect("a PostgreSQL server");
    let (certificate, key) = authority.server(names);
    cluster.enable_tls(&certificate, &key).await.expect("TLS on");
    cluster
}

/// `application_name` and whether the session uses TLS, for every session
/// `exactly` has open on the server.
async fn exactly_sessions(cluster: &PgCluster) -> Vec<(String, bool)> {
    let mut admin = connect_with_retry(&cluster.url("postgres")).await.expect("admin");
    sqlx::query_as(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
          WHERE a.application_name LIKE 'exactly%' ORDER BY 1",
    )
    .fetch_all(&mut admin)
    .await
    .expect("pg_stat_ssl")
}

/// `exactly migrate` against `url` with `flags`: its exit and stderr.
async fn migrate(env: &TestEnv, url: &str, flags: &[&str]) -> (bool, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(exactly_binary())
            .env_remove("DATABASE_URL")
            .args(["migrate", "--database-url", url, "--handlers"])
            .arg(env.manifest())
            .args(flags)
            .output(),
    )
    .await
    .expect("exactly migrate ends within a minute, waiting for nothing")
    .expect("run exactly migrate");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// The server's certificate chains to the given CA and names the host:
/// `verify-full` works, from the URL and from the flags, and every session
/// `exactly` opens (its own pool and the handlers' pools, which log in as
/// other roles) uses TLS.
async fn verify_full_puts_every_pool_on_tls() {
    let env = TestEnv::new(Backend::Postgres).await;
    let authority = Authority::new("exactly test CA");
    let cluster = tls_server(&authority, &["localhost", "127.0.0.1"]).await;
    let ca = authority.write(env.dir(), "ca.pem");

    let url = format!("{}?sslmode=verify-full&sslrootcert={}", cluster.database_url(), ca.display());
    let host = Host::start(&env, &url, &[]).await;
    host.send(&Event::new("test.count")).await.assert_processed();
    let sessions = exactly_sessions(&cluster).await;
    let names: std::collections::BTreeSet<&str> = sessions.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains("exactly") && names.iter().any(|name| name.starts_with("exactly:")), "{sessions:?}");
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "every session on TLS: {sessions:?}");
    drop(host);

    // The same with flags, and the host name instead of the address.
    let plain = cluster.database_url().replace("127.0.0.1", "localhost");
    let ca_text = ca.display().to_string();
    let flags = ["--database-sslmode", "verify-full", "--database-sslrootcert", ca_text.as_str()];
    let host = Host::start(&env, &plain, &flags).await;
    host.send(&Event::new("test.count")).await.assert_processed();
    assert!(exactly_sessions(&cluster).await.iter().all(|(_, ssl)| *ssl));
}

/// TLS that cannot be had as configured is a mistake waiting cannot cure:
/// `exactly` stops with the driver's words (it waited for ever, as for a
/// database that is down, before).
async fn tls_that_cannot_be_had_stops_the_start_up() {
    let env = TestEnv::new(Backend::Postgres).await;
    let authority = Authority::new("exactly test CA");
    // A certificate for another name than the one `exactly` connects to.
    let cluster = tls_server(&authority, &["db.invalid"]).await;
    let ca = authority.write(env.dir(), "ca.pem");
    let other = Authority::new("another CA").write(env.dir(), "other.pem");
    let url = |mode: &str, root: &Path| format!("{}?sslmode={mode}&sslrootcert={}", cluster.database_url(), root.display());

    // verify-ca checks the chain only: the name does not matter.
    let (ok, stderr) = migrate(&env, &url("verify-ca", &ca), &[]).await;
    assert!(ok, "verify-ca with the right CA: {stderr}");
    for (mode, root, why) in [("verify-full", &ca, "the name"), ("verify-ca", &other, "another CA"), ("verify-full", &other, "both")] {
        let (ok, stderr) = migrate(&env, &url(mode, root), &[]).await;
        assert!(!ok, "{mode} ({why}) must fail");
        assert!(stderr.to_lowercase().contains("certificate"), "{mode} ({why}): {stderr}");
    }
    // serve stops too, instead of waiting for the database.
    let serve = tokio::process::Command::new(exactly_binary())
        .env_remove("DATABASE_URL")
        .args(["serve", "--listen", "127.0.0.1:0", "--database-url", &url("verify-full", &ca), "--handlers"])
        .arg(env.manifest())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), serve)
        .await
        .expect("exactly serve stops within a minute")
        .expect("run exactly serve");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).to_lowercase().contains("certificate"));

    // A server without TLS under sslmode=require.
    let plain = PgCluster::start().await.expect("a PostgreSQL server");
    let (ok, stderr) = migrate(&env, &format!("{}?sslmode=require", plain.database_url()), &[]).await;
    assert!(!ok && stderr.to_lowercase().contains("tls"), "{stderr}");
    let (ok, stderr) = migrate(&env, &plain.database_url(), &["--database-sslmode", "require"]).await;
    assert!(!ok && stderr.to_lowercase().contains("tls"), "the flag: {stderr}");
    let (ok, stderr) = migrate(&env, &plain.database_url(), &["--database-sslmode", "verify-everything"]).await;
    assert!(!ok && stderr.contains("is not an sslmode"), "{stderr}");
    // Said twice, differently: no guess (libpq lets the URL win silently).
    let url = format!("{}?sslmode=disable", plain.database_url());
    let (ok, stderr) = migrate(&env, &url, &["--database-sslmode", "verify-full"]).await;
    assert!(!ok && stderr.contains("sslmode=disable") && stderr.contains("disagree"), "{stderr}");
    let (ok, stderr) = migrate(&env, &url, &["--database-sslmode", "disable"]).await;
    assert!(ok, "the same both ways: {stderr}");
}

/// Without any TLS setting, libpq's `prefer`: TLS when the server offers it
/// (unverified), plain when it does not.
async fn prefer_is_the_default() {
    let env = TestEnv::new(Backend::Postgres).await;
    let authority = Authority::new("exactly test CA");
    let cluster = tls_server(&authority, &["db.invalid"]).await;
    let host = Host::start(&env, &cluster.database_url(), &[]).await;
    host.send(&Event::new("test.count")).await.assert_processed();
    let sessions = exactly_sessions(&cluster).await;
    assert!(!sessions.is_empty() && sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    drop(host);

    let plain = PgCluster::start().await.expect("a PostgreSQL server");
    let host = Host::start(&env, &plain.database_url(), &[]).await;
    host.send(&Event::new("test.count")).await.assert_processed();
    assert!(exactly_sessions(&plain).await.iter().all(|(_, ssl)| !*ssl));
}
