//! Test-only fault points: crash the process at a chosen step of the dedup
//! transaction, so the crash harness (tests/src/harness) can prove that no
//! crash point loses or doubles an event.
//!
//! Compiled in only with the cargo feature `fault-points`, which the test
//! crate enables and release builds (`scripts/run`, `deploy/`) do not. With
//! the feature, `EXACTLY_FAULTS` lists points and the probability that an
//! event aborts the process there:
//!
//! ```text
//! EXACTLY_FAULTS="after-claim=0.01,after-handler=0.02,before-commit=0.02,after-commit=0.02"
//! ```
//!
//! The process aborts (SIGABRT: no destructor runs, no connection is closed
//! politely), as a crash or a SIGKILL would end it.

/// The steps of the dedup transaction a fault can hit.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Point {
    /// The claim row is inserted; the handler has not run.
    AfterClaim,
    /// The handler returned; its answer is not stored.
    AfterHandler,
    /// The answer is stored; COMMIT was not sent.
    BeforeCommit,
    /// COMMIT succeeded; the HTTP answer was not sent.
    AfterCommit,
}

impl Point {
    pub const ALL: [Point; 4] = [Point::AfterClaim, Point::AfterHandler, Point::BeforeCommit, Point::AfterCommit];

    pub fn name(self) -> &'static str {
        match self {
            Point::AfterClaim => "after-claim",
            Point::AfterHandler => "after-handler",
            Point::BeforeCommit => "before-commit",
            Point::AfterCommit => "after-commit",
        }
    }
}

/// The variable naming the fault points.
pub const ENV: &str = "EXACTLY_FAULTS";

/// Aborts the process if `point` is armed and its coin comes up.
#[cfg(feature = "fault-points")]
pub fn hit(point: Point) {
    let odds = armed::odds()[point as usize];
    if odds > 0.0 && armed::coin() < odds {
        eprintln!("exactly: fault point {} fired: aborting", point.name());
        std::process::abort();
    }
}

/// Without the `fault-points` feature: nothing, compiled away.
#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn hit(_point: Point) {}

/// Checks `EXACTLY_FAULTS` at start-up: an error when it does not parse,
/// and a warning when this build ignores it.
pub fn check_env() -> anyhow::Result<()> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    let odds = parse(&spec)?;
    if cfg!(feature = "fault-points") {
        let armed: Vec<String> = Point::ALL
            .iter()
            .filter(|p| odds[**p as usize] > 0.0)
            .map(|p| format!("{}={}", p.name(), odds[*p as usize]))
            .collect();
        tracing::warn!(faults = armed.join(","), "fault points armed: this process will crash on purpose");
    } else {
        tracing::warn!("{ENV} is set but this build has no fault points (cargo feature fault-points): ignored");
    }
    Ok(())
}

/// Parses `point=probability,…`.
pub fn parse(spec: &str) -> anyhow::Result<[f64; 4]> {
    let mut odds = [0.0; 4];
    for item in spec.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let (name, value) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{ENV}: {item:?} is not point=probability"))?;
        let point = Point::ALL
            .into_iter()
            .find(|p| p.name() == name.trim())
            .ok_or_else(|| anyhow::anyhow!("{ENV}: unknown fault point {name:?} (known: after-claim, after-handler, before-commit, after-commit)"))?;
        let value: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| (0.0..=1.0).contains(v))
            .ok_or_else(|| anyhow::anyhow!("{ENV}: the probability of {name} must be a number from 0 to 1, not {value:?}"))?;
        odds[point as usize] = value;
    }
    Ok(odds)
}

#[cfg(feature = "fault-points")]
mod armed {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    pub fn odds() -> &'static [f64; 4] {
        static ODDS: OnceLock<[f64; 4]> = OnceLock::new();
        // check_env refused a bad value at start-up.
        ODDS.get_or_init(|| std::env::var(super::ENV).ok().and_then(|s| super::parse(&s).ok()).unwrap_or([0.0; 4]))
    }

    /// A uniform number in [0, 1): a randomly keyed hash of a counter.
    pub fn coin() -> f64 {
        static KEY: OnceLock<RandomState> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let bits = KEY.get_or_init(RandomState::new).hash_one(n);
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_points_and_refuses_nonsense() {
        let odds = parse("after-claim=0.5, after-commit=1").unwrap();
        assert_eq!(odds, [0.5, 0.0, 0.0, 1.0]);
        assert_eq!(parse("").unwrap(), [0.0; 4]);
        assert!(parse("after-lunch=0.1").is_err());
        assert!(parse("after-claim=2").is_err());
        assert!(parse("after-claim").is_err());
    }
}
