//! Test-only switch that turns the SQL policy off, so that the end-to-end
//! tests (`tests/tests/wall.rs`) can prove that the database itself, not the
//! parser, stops a hostile handler.
//!
//! Compiled in only with the cargo feature `sql-policy-switch`, which the
//! test crate enables and release and container builds do not (as with
//! [`crate::fault`]). With the feature, `EXACTLY_TEST_SQL_POLICY=off` makes
//! the `tx` import skip [`crate::policy::Policy::check`] and send the
//! handler's SQL to the database as it is, except for the placeholder
//! rewrite SQLite needs ([`crate::policy::rewrite_placeholders`]). Without
//! the feature the variable has no effect.

/// The variable that switches the policy off (`off`).
pub const ENV: &str = "EXACTLY_TEST_SQL_POLICY";

/// Logged once at start-up when the switch is on; the container test makes
/// sure a release image never logs it.
pub const OFF_WARNING: &str =
    "the SQL policy is switched OFF (test-only switch): handler SQL goes to the database unchecked";

/// Whether the policy is switched off: only with the feature and
/// `EXACTLY_TEST_SQL_POLICY=off`.
#[cfg(feature = "sql-policy-switch")]
pub fn policy_off() -> bool {
    use std::sync::OnceLock;
    static OFF: OnceLock<bool> = OnceLock::new();
    *OFF.get_or_init(|| {
        std::env::var(ENV).is_ok_and(|value| value.trim().eq_ignore_ascii_case("off"))
    })
}

/// Without the `sql-policy-switch` feature: never.
#[cfg(not(feature = "sql-policy-switch"))]
#[inline(always)]
pub fn policy_off() -> bool {
    false
}

/// Logs at start-up what the switch does in this build.
pub fn check_env() {
    if policy_off() {
        tracing::warn!("{OFF_WARNING}");
    } else if std::env::var_os(ENV).is_some() && !cfg!(feature = "sql-policy-switch") {
        tracing::warn!(
            "{ENV} is set but this build has no SQL policy switch (cargo feature sql-policy-switch): ignored"
        );
    }
}
