//! The `exactly serve` process under test, and its supervisor.
//!
//! The supervisor starts the host on a fixed port (so the dispatcher's
//! address never changes), watches it, and restarts it at once whenever it
//! exits: after a SIGKILL the harness sent ([`Host::kill`]) or after the
//! host aborted itself at an armed fault point (`EXACTLY_FAULTS`, cargo
//! feature `fault-points`). Every exit is classified from what the harness
//! observed itself: the exit status (a signal) and the `fault point <name>`
//! line the host prints on stderr right before it aborts. Any other exit is
//! recorded as unexpected, with the end of the host's log.
//!
//! Fault points are armed per incarnation: [`Host::kill`] may name points
//! to arm, and each following incarnation is started with the next of them
//! (`EXACTLY_FAULTS=<point>=<probability>`) until it fires, so each armed
//! point crashes the host exactly once and the next one is armed on the
//! restart that crash causes.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

/// What `exactly serve` prints on stdout once it accepts connections.
const LISTENING_PREFIX: &str = "exactly listening on ";
/// What the host prints on stderr right before a fault point aborts it.
const FAULT_MARKER: &str = "fault point ";
/// What a host built without the fault points logs when `EXACTLY_FAULTS`
/// is set.
const NO_FAULT_POINTS: &str = "this build has no fault points";

/// How the host is started.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub binary: PathBuf,
    pub port: u16,
    pub database_url: String,
    pub manifest: PathBuf,
    /// Working folder; the host's log goes to `exactly.log` in it.
    pub dir: PathBuf,
    /// Probability per event of an armed fault point.
    pub fault_probability: f64,
    /// `EXACTLY_FAULTS` for every incarnation (background faults), besides
    /// the point armed on purpose; empty for none.
    pub background_faults: String,
    /// `EXACTLY_LOG` (the host's log filter).
    pub log_filter: String,
    /// Extra `exactly serve` flags.
    pub flags: Vec<String>,
}

/// What the supervisor saw.
#[derive(Clone, Debug, Default)]
pub struct HostStats {
    /// Successful start-ups (the first one included).
    pub starts: u64,
    /// Start-up attempts that ended before the host listened.
    pub failed_starts: u64,
    /// SIGKILLs the harness sent.
    pub sigkills: u64,
    /// Aborts at a fault point, by point name.
    pub fault_aborts: BTreeMap<String, u64>,
    /// Exits that were neither a SIGKILL of ours nor a fault point.
    pub unexpected_exits: Vec<String>,
    /// Total time from an exit to the next "listening" line.
    pub downtime: Duration,
    /// The host said it ignores `EXACTLY_FAULTS`: built without the cargo
    /// feature `fault-points`.
    pub no_fault_points: bool,
}

impl HostStats {
    /// Every crash of the host: our SIGKILLs and the fault-point aborts.
    pub fn crashes(&self) -> u64 {
        self.sigkills + self.fault_aborts.values().sum::<u64>()
    }
}

enum HostCommand {
    Kill {
        arm: Vec<String>,
        done: oneshot::Sender<()>,
    },
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// A handle on the supervised host.
#[derive(Clone)]
pub struct Host {
    address: String,
    commands: mpsc::UnboundedSender<HostCommand>,
    stats: Arc<Mutex<HostStats>>,
    log_path: PathBuf,
}

impl Host {
    /// Starts the host and its supervisor; returns once it listens.
    pub async fn start(config: HostConfig) -> Result<Host> {
        let log_path = config.dir.join("exactly.log");
        let log = Arc::new(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("open {}", log_path.display()))?,
        ));
        let stats = Arc::new(Mutex::new(HostStats::default()));
        let mut supervisor = Supervisor {
            config,
            log,
            stats: stats.clone(),
            armed: VecDeque::new(),
        };
        let first = supervisor.start_until_listening(None).await?;
        let address = format!("http://127.0.0.1:{}", supervisor.config.port);
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(supervisor.run(first, receiver));
        Ok(Host {
            address,
            commands,
            stats,
            log_path,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// SIGKILLs the host and restarts it; `arm` names fault points to arm,
    /// one per incarnation, starting with the restart. Returns once the
    /// host was killed (the restart goes on in the background).
    pub async fn kill(&self, arm: Vec<String>) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(HostCommand::Kill { arm, done }).is_ok() {
            let _ = wait.await;
        }
    }

    /// Kills the host for good.
    pub async fn stop(&self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(HostCommand::Stop { done }).is_ok() {
            let _ = wait.await;
        }
    }

    pub fn stats(&self) -> HostStats {
        self.stats.lock().unwrap().clone()
    }

    pub fn log_path(&self) -> &PathBuf {
        &self.log_path
    }

    /// The last lines of the host's log (all incarnations).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }
}

/// One incarnation of the host.
struct Running {
    child: Child,
    /// Finishes when stderr closes; yields the fault point it announced.
    stderr: tokio::task::JoinHandle<Option<String>>,
    armed: Option<String>,
}

struct Supervisor {
    config: HostConfig,
    log: Arc<Mutex<std::fs::File>>,
    stats: Arc<Mutex<HostStats>>,
    armed: VecDeque<String>,
}

impl Supervisor {
    async fn run(mut self, first: Running, mut commands: mpsc::UnboundedReceiver<HostCommand>) {
        let mut running = first;
        loop {
            tokio::select! {
                status = running.child.wait() => {
                    let exited = Instant::now();
                    let fault = (&mut running.stderr).await.ok().flatten();
                    let description = match &status {
                        Ok(status) => format!("{status}"),
                        Err(error) => format!("wait failed: {error}"),
                    };
                    let aborted = matches!(&status, Ok(status) if status.signal() == Some(6));
                    {
                        let mut stats = self.stats.lock().unwrap();
                        // The armed point did not fire (another one did, or
                        // this was no fault): arm it again on the restart.
                        if let Some(armed) = &running.armed
                            && fault.as_ref() != Some(armed) {
                                self.armed.push_front(armed.clone());
                            }
                        match (aborted, fault) {
                            (true, Some(point)) => {
                                *stats.fault_aborts.entry(point).or_default() += 1;
                            }
                            (_, fault) => {
                                let message = format!(
                                    "exactly exited on its own ({description}, fault point {fault:?}, armed {:?}); \
                                     the end of its log:\n{}",
                                    running.armed,
                                    tail(&self.config.dir.join("exactly.log"), 40)
                                );
                                eprintln!("harness: {message}");
                                stats.unexpected_exits.push(message);
                            }
                        }
                    }
                    self.note(&format!("exited: {description}"));
                    match self.restart(exited).await {
                        Some(next) => running = next,
                        None => return,
                    }
                }
                command = commands.recv() => {
                    match command {
                        Some(HostCommand::Kill { arm, done }) => {
                            let killed = Instant::now();
                            let _ = running.child.start_kill();
                            let _ = running.child.wait().await;
                            let _ = (&mut running.stderr).await;
                            self.stats.lock().unwrap().sigkills += 1;
                            self.note("killed with SIGKILL by the harness");
                            if arm.is_empty() {
                                // The killed incarnation's point did not
                                // fire: arm it again on the restart.
                                if let Some(armed) = running.armed.take() {
                                    self.armed.push_front(armed);
                                }
                            } else {
                                // A new batch replaces what was left of the
                                // old one.
                                self.armed = arm.into_iter().collect();
                            }
                            let _ = done.send(());
                            match self.restart(killed).await {
                                Some(next) => running = next,
                                None => return,
                            }
                        }
                        Some(HostCommand::Stop { done }) => {
                            let _ = running.child.start_kill();
                            let _ = running.child.wait().await;
                            let _ = (&mut running.stderr).await;
                            self.note("stopped by the harness");
                            let _ = done.send(());
                            return;
                        }
                        None => {
                            let _ = running.child.start_kill();
                            let _ = running.child.wait().await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Starts the next incarnation (armed with the next queued fault point,
    /// if any) and adds the time the host was down to the stats.
    async fn restart(&mut self, down_since: Instant) -> Option<Running> {
        let arm = self.armed.pop_front();
        match self.start_until_listening(arm).await {
            Ok(running) => {
                self.stats.lock().unwrap().downtime += down_since.elapsed();
                Some(running)
            }
            Err(error) => {
                let message = format!("exactly could not be restarted: {error:#}");
                eprintln!("harness: {message}");
                self.stats.lock().unwrap().unexpected_exits.push(message);
                None
            }
        }
    }

    /// Starts the host, retrying while it exits before it listens (the
    /// port still taken, say), for up to two minutes.
    async fn start_until_listening(&mut self, arm: Option<String>) -> Result<Running> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_error = None;
        while Instant::now() < deadline {
            match self.start_once(arm.clone()).await {
                Ok(running) => {
                    self.stats.lock().unwrap().starts += 1;
                    return Ok(running);
                }
                Err(error) => {
                    self.stats.lock().unwrap().failed_starts += 1;
                    self.note(&format!("start-up failed: {error:#}"));
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no start-up attempt")))
    }

    async fn start_once(&mut self, arm: Option<String>) -> Result<Running> {
        let config = &self.config;
        let mut faults: Vec<String> = Vec::new();
        if !config.background_faults.trim().is_empty() {
            faults.push(config.background_faults.trim().to_owned());
        }
        if let Some(point) = &arm {
            faults.push(format!("{point}={}", config.fault_probability));
        }
        let faults = faults.join(",");
        self.note(&format!(
            "starting exactly (EXACTLY_FAULTS={:?})",
            faults.as_str()
        ));

        let mut command = Command::new(&config.binary);
        command
            .env_remove("DATABASE_URL")
            .env_remove("PORT")
            .env("NO_COLOR", "1")
            .env("EXACTLY_LOG_FORMAT", "text")
            .env("EXACTLY_LOG", &config.log_filter)
            .current_dir(&config.dir)
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", config.port)])
            .args(["--database-url", &config.database_url])
            .arg("--handlers")
            .arg(&config.manifest)
            .args(&config.flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if faults.is_empty() {
            command.env_remove("EXACTLY_FAULTS");
        } else {
            command.env("EXACTLY_FAULTS", &faults);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("start {}", config.binary.display()))?;

        // stderr: into the log file; remember a fault point announcement.
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = self.log.clone();
        let stats = self.stats.clone();
        let stderr = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut fault = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(NO_FAULT_POINTS) {
                    stats.lock().unwrap().no_fault_points = true;
                }
                if let Some(rest) = line.split(FAULT_MARKER).nth(1) {
                    let point: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect();
                    fault = Some(point);
                }
                let mut file = log.lock().unwrap();
                let _ = writeln!(file, "{line}");
            }
            fault
        });

        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let listening = tokio::time::timeout(Duration::from_secs(90), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim().starts_with(LISTENING_PREFIX) {
                    return true;
                }
            }
            false
        })
        .await;
        match listening {
            Ok(true) => {}
            Ok(false) => {
                let status = child.wait().await;
                let _ = stderr.await;
                bail!("exactly exited before it listened ({status:?})");
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let _ = stderr.await;
                bail!("exactly did not listen within 90 s");
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Running {
            child,
            stderr,
            armed: arm,
        })
    }

    /// A line of the harness's own in the host's log, to follow restarts.
    fn note(&self, text: &str) {
        let mut file = self.log.lock().unwrap();
        let _ = writeln!(file, "=== harness: {text}");
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
