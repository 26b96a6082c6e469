//! A PostgreSQL cluster that belongs to the harness alone.
//!
//! The harness restarts and crashes its database on purpose, so it cannot
//! use the shared test server (`DATABASE_URL`): other tests run against that
//! one in parallel. [`PgCluster::start`] runs `initdb` in a temporary folder
//! and starts a server on a free port of 127.0.0.1, as `scripts/with-postgres`
//! does (as root, every server command runs as the `postgres` user through
//! `runuser -u postgres --`, because PostgreSQL refuses to run as root).
//!
//! Durability: `fsync=off` and `full_page_writes=off`, but
//! `synchronous_commit=on`. The harness crashes processes, never the
//! machine: a COMMIT that returned has its WAL written to the kernel, so it
//! survives an immediate shutdown (a crash of the server, followed by crash
//! recovery). Turning `synchronous_commit` off would make the server itself
//! lose acknowledged commits on a crash, which is not what is under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How a restart stops the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// `pg_ctl stop -m fast`: sessions are terminated, open transactions
    /// rolled back, a shutdown checkpoint written.
    Fast,
    /// `pg_ctl stop -m immediate`: every server process quits at once, and
    /// the next start runs crash recovery from the WAL.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A private, throwaway PostgreSQL server. Stopped (immediately) when
/// dropped, and its folder deleted unless [`PgCluster::keep`] was called.
pub struct PgCluster {
    bin: PathBuf,
    dir: std::sync::Mutex<Option<tempfile::TempDir>>,
    path: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// The database the host uses inside the cluster.
pub const DATABASE: &str = "harness";

impl PgCluster {
    /// `initdb`, start, `CREATE DATABASE harness`.
    pub async fn start() -> Result<PgCluster> {
        let bin = find_postgres_bin()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("exactly-harness-pg-")
            .tempdir()
            .context("create a folder for the harness's PostgreSQL")?;
        let path = dir.path().to_path_buf();
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:", &path.display().to_string()])
                .status()
                .context("run chown")?;
            if !status.success() {
                bail!(
                    "running as root, but cannot hand {} to the postgres user (is there one?)",
                    path.display()
                );
            }
        }
        let mut cluster = PgCluster {
            bin,
            dir: std::sync::Mutex::new(Some(dir)),
            path,
            port: 0,
            as_postgres,
        };
        let data = cluster.data_dir();
        let initdb = cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        if !initdb.status.success() {
            bail!("initdb failed:\n{}", output_text(&initdb));
        }

        let mut last_error = String::new();
        for _ in 0..8 {
            cluster.port = free_port()?;
            let options = cluster.server_options();
            let started = cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    &data,
                    "-l",
                    &cluster.log_path(),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    &options,
                    "start",
                ],
            )?;
            if started.status.success() {
                last_error.clear();
                break;
            }
            last_error = format!("{}\n{}", output_text(&started), cluster.log_tail(30));
        }
        if !last_error.is_empty() {
            bail!("PostgreSQL did not start:\n{last_error}");
        }

        let mut admin = connect_with_retry(&cluster.url("postgres")).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            r#"CREATE DATABASE "{DATABASE}""#
        )))
        .execute(&mut admin)
        .await
        .context("CREATE DATABASE harness")?;
        Ok(cluster)
    }

    /// Turns TLS on (`ssl = on`, reloaded, no restart) with this server
    /// certificate and key (PEM), written into the data directory as
    /// `server.crt` and `server.key` (the key readable by its owner only,
    /// as PostgreSQL demands). Connections may then use TLS; they need not.
    pub async fn enable_tls(&self, certificate_pem: &str, key_pem: &str) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let data = self.path.join("data");
        for (name, text, mode) in [("server.crt", certificate_pem, 0o644), ("server.key", key_pem, 0o600)] {
            let file = data.join(name);
            std::fs::write(&file, text).with_context(|| format!("write {}", file.display()))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
            if self.as_postgres {
                let status = Command::new("chown").args(["postgres:", &file.display().to_string()]).status()?;
                if !status.success() {
                    bail!("cannot hand {} to the postgres user", file.display());
                }
            }
        }
        let mut admin = connect_with_retry(&self.url("postgres")).await?;
        sqlx::raw_sql("ALTER SYSTEM SET ssl = on").execute(&mut admin).await.context("ALTER SYSTEM SET ssl")?;
        sqlx::raw_sql("SELECT pg_reload_conf()").execute(&mut admin).await?;
        for _ in 0..100 {
            let mut fresh = connect_with_retry(&self.url("postgres")).await?;
            let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&mut fresh).await?;
            if ssl == "on" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("PostgreSQL did not turn TLS on:\n{}", self.log_tail(20))
    }

    /// `postgres://postgres@127.0.0.1:PORT/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of the database the host uses.
    pub fn database_url(&self) -> String {
        self.url(DATABASE)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder (data directory, server log, socket).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the folder after the harness ends (to inspect a failed run);
    /// the server is stopped all the same.
    pub fn keep(&self) {
        if let Some(dir) = self.dir.lock().unwrap().take() {
            let _ = dir.keep();
        }
    }

    /// `pg_ctl restart -m fast`.
    pub async fn restart_fast(&self) -> Result<()> {
        self.restart(StopMode::Fast, Duration::ZERO).await
    }

    /// `pg_ctl restart -m immediate`: a server crash and crash recovery.
    pub async fn restart_immediate(&self) -> Result<()> {
        self.restart(StopMode::Immediate, Duration::ZERO).await
    }

    /// Stops the server with `mode`, leaves it down for `down`, starts it
    /// again and waits until it accepts connections.
    pub async fn restart(&self, mode: StopMode, down: Duration) -> Result<()> {
        self.stop(mode).await?;
        tokio::time::sleep(down).await;
        self.start_again().await
    }

    pub async fn stop(&self, mode: StopMode) -> Result<()> {
        let data = self.data_dir();
        let args = [
            "-D",
            data.as_str(),
            "-m",
            mode.as_arg(),
            "-w",
            "-t",
            "60",
            "stop",
        ];
        let output = self.run_async("pg_ctl", &args).await?;
        if !output.status.success() {
            bail!(
                "pg_ctl stop -m {} failed:\n{}\n{}",
                mode.as_arg(),
                output_text(&output),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    pub async fn start_again(&self) -> Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let options = self.server_options();
        let args = [
            "-D",
            data.as_str(),
            "-l",
            log.as_str(),
            "-w",
            "-t",
            "120",
            "-o",
            options.as_str(),
            "start",
        ];
        let output = self.run_async("pg_ctl", &args).await?;
        if !output.status.success() {
            bail!(
                "pg_ctl start failed:\n{}\n{}",
                output_text(&output),
                self.log_tail(30)
            );
        }
        Ok(())
    }

    /// The last lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn data_dir(&self) -> String {
        self.path.join("data").display().to_string()
    }

    fn log_path(&self) -> String {
        self.path.join("server.log").display().to_string()
    }

    fn server_options(&self) -> String {
        format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c full_page_writes=off \
             -c synchronous_commit=on -c max_connections=100",
            self.port,
            self.path.display()
        )
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let executable = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(executable);
            command
        } else {
            Command::new(executable)
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program, args)
            .output()
            .with_context(|| format!("run {program}"))
    }

    async fn run_async(&self, program: &str, args: &[&str]) -> Result<Output> {
        let command = self.command(program, args);
        let program = program.to_owned();
        let mut command = tokio::process::Command::from(command);
        command
            .output()
            .await
            .with_context(|| format!("run {program}"))
    }
}

impl Drop for PgCluster {
    /// Stops the server (a leftover server would hold memory and a port
    /// after the run); deletes its folder unless it was kept.
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
        if self.dir.lock().unwrap().is_none() {
            let prefix = if self.as_postgres {
                "runuser -u postgres -- "
            } else {
                ""
            };
            eprintln!(
                "harness: kept PostgreSQL's folder {}; to look at it: {prefix}{} -D {data} -l {} \
                 -o \"{}\" start, then psql {}",
                self.path.display(),
                self.bin.join("pg_ctl").display(),
                self.log_path(),
                self.server_options(),
                self.url(DATABASE)
            );
        }
    }
}

/// A connection that tolerates a server that is still starting.
pub async fn connect_with_retry(url: &str) -> Result<sqlx::PgConnection> {
    use sqlx::Connection;
    let mut last = None;
    for _ in 0..100 {
        match sqlx::PgConnection::connect(url).await {
            Ok(connection) => return Ok(connection),
            Err(error) => last = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!(
        "cannot connect to {url}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// The newest installed server's `bin` folder: Debian keeps it in
/// `/usr/lib/postgresql/N/bin`, which is not on `PATH`; else `initdb` on
/// `PATH`.
pub fn find_postgres_bin() -> Result<PathBuf> {
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    candidates.sort();
    if let Some((_, bin)) = candidates.pop() {
        return Ok(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for folder in std::env::split_paths(&path) {
            let initdb = folder.join("initdb");
            if initdb.is_file() {
                let resolved = std::fs::canonicalize(&initdb).unwrap_or(initdb);
                return Ok(resolved
                    .parent()
                    .expect("a file has a folder")
                    .to_path_buf());
            }
        }
    }
    bail!(
        "the crash harness needs PostgreSQL's server programs (initdb, pg_ctl, postgres) to run \
         a private cluster it can restart and crash, and none was found in /usr/lib/postgresql/*/bin \
         or on PATH: install them (Debian: apt-get install postgresql)"
    )
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port of 127.0.0.1 that nobody listens on right now.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
