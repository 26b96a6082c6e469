//! The crash harness's long run: prints one summary line, exits 1 when an
//! event was lost, applied twice or half-applied (or a reply id was wrong).
//!
//! The `exactly` binary must carry the test-only fault points (cargo
//! feature `fault-points`). One release build gives both binaries, the
//! host with the feature (Cargo unifies it in through this crate's
//! dependency on the host):
//!
//! ```sh
//! scripts/build-handlers
//! cargo build --release -p exactly -p exactly-e2e --bins
//! target/release/harness --exactly target/release/exactly --events 100000 --seed 7
//! ```
//!
//! That `target/release/exactly` is a test build: `cargo build --release -p
//! exactly` (scripts/run) rebuilds it without the fault points. Without
//! `--exactly` the harness uses `$EXACTLY_BIN`, else the `exactly` next to
//! itself, else `target/debug/exactly`, which the workspace's test build
//! (`cargo build --workspace --all-targets`, scripts/test) makes with the
//! feature: `target/debug/harness --events 5000` works after scripts/test.
//!
//! Options: `--events N` (default 100000), `--seed S` (7), `--workers W`
//! (16), `--exactly PATH`, `--faults-every N` (one fault of each kind per N
//! events, default 2500), `--background-faults SPEC` (an `EXACTLY_FAULTS`
//! for every incarnation, e.g. `after-commit=0.0002`), `--log FILTER` (the
//! host's log filter, default `warn`), `--component NAME=PATH` (use this
//! component for handler NAME instead of `dist/NAME.wasm`), `--keep` (keep
//! the folders: the host's log and PostgreSQL's data), `--quiet`.

use std::path::PathBuf;
use std::process::ExitCode;

use exactly_e2e::app::repo_root;
use exactly_e2e::harness::{self, Config, faults::FaultCounts};

fn usage() -> ExitCode {
    eprintln!(
        "usage: harness [--events N] [--seed S] [--workers W] [--exactly PATH] \
         [--faults-every N] [--background-faults SPEC] [--log FILTER] \
         [--component NAME=PATH] [--keep] [--quiet]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut events = 100_000usize;
    let mut seed = 7u64;
    let mut workers = None;
    let mut exactly: Option<PathBuf> = std::env::var_os("EXACTLY_BIN")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from);
    let mut faults_every = None;
    let mut background = String::new();
    let mut log = None;
    let mut keep = false;
    let mut components = Vec::new();
    let mut quiet = false;

    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                std::process::exit(2)
            })
        };
        let number = |text: String| -> u64 {
            text.replace('_', "").parse().unwrap_or_else(|_| {
                eprintln!("not a number: {text}");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--events" => events = number(value("--events")) as usize,
            "--seed" => seed = number(value("--seed")),
            "--workers" => workers = Some(number(value("--workers")) as usize),
            "--exactly" => exactly = Some(PathBuf::from(value("--exactly"))),
            "--faults-every" => faults_every = Some(number(value("--faults-every")) as usize),
            "--background-faults" => background = value("--background-faults"),
            "--log" => log = Some(value("--log")),
            "--component" => {
                let spec = value("--component");
                let Some((name, path)) = spec.split_once('=') else {
                    eprintln!("--component takes NAME=PATH, not {spec}");
                    return usage();
                };
                components.push((name.to_owned(), PathBuf::from(path)));
            }
            "--keep" => keep = true,
            "--quiet" => quiet = true,
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other}");
                return usage();
            }
        }
    }
    // The `exactly` built with this harness (same profile), else the
    // workspace's debug build.
    let exactly = exactly.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|harness| Some(harness.parent()?.join("exactly")))
            .filter(|sibling| sibling.is_file())
            .unwrap_or_else(|| repo_root().join("target/debug/exactly"))
    });

    let mut config = Config::long(exactly, events, seed);
    if let Some(every) = faults_every {
        let per = |n: usize| (events / n.max(1)).max(1);
        config.faults = FaultCounts {
            host_kills: per(every),
            fault_point_rounds: per(every * 4),
            postgres_fast: per(every),
            postgres_immediate: per(every),
            terminations: per(every),
            flaky_windows: per(every),
        };
    }
    if let Some(workers) = workers {
        config.workers = workers;
    }
    if let Some(log) = log {
        config.log_filter = log;
    }
    config.background_faults = background;
    config.keep = keep;
    config.components = components;
    config.verbose = !quiet;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = match runtime.block_on(harness::run(config)) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("harness: {error:#}");
            return ExitCode::from(2);
        }
    };
    eprint!("{}", report.details());
    println!("{}", report.summary_line());
    let problems = report.problems();
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        for problem in problems {
            eprintln!("harness: FAILED: {problem}");
        }
        ExitCode::FAILURE
    }
}
