//! The handler manifest: which component handles which event types, and
//! where each handler's migrations live.
//!
//! ```toml
//! [[handler]]
//! name = "order-created"
//! component = "dist/order-created.wasm"   # relative to this file
//! types = ["order.created"]
//! migrations = "handlers/order-created/migrations"
//! uses = []                 # other handlers' tables this one may touch
//!
//! [handler.limits]          # each optional; defaults come from the CLI
//! deadline = "10s"
//! memory_mib = 128
//! ```
//!
//! A loaded [`Manifest`] is valid: names are unique and well-formed, every
//! type has exactly one handler, and every path is absolute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

#[derive(Debug)]
pub struct Manifest {
    pub handlers: Vec<HandlerSpec>,
}

#[derive(Debug, Clone)]
pub struct HandlerSpec {
    pub name: String,
    pub component: PathBuf,
    pub types: Vec<String>,
    /// Folder holding `postgres/*.sql` and `sqlite/*.sql`.
    pub migrations: Option<PathBuf>,
    /// Tables created by other handlers' migrations that this handler may
    /// read and write.
    pub uses: Vec<String>,
    pub limits: LimitOverrides,
}

/// Per-handler limits from the manifest; `None` takes the host default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, with = "duration_text")]
    pub deadline: Option<Duration>,
    pub memory_mib: Option<u64>,
    /// Wasm fuel per event; 0 or absent: fuel is not metered.
    pub fuel: Option<u64>,
    #[serde(default, with = "duration_text")]
    pub statement_timeout: Option<Duration>,
    pub max_rows: Option<u64>,
    pub max_result_bytes: Option<u64>,
    pub max_statements: Option<u64>,
    pub max_log_bytes: Option<u64>,
    pub max_body_bytes: Option<u64>,
    /// Bytes of an event's outcome: the JSON result plus the reply event.
    pub max_reply_bytes: Option<u64>,
}

/// Durations as humane text: "10s", "250ms", "1m".
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration like \"10s\" ({e})")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    handler: Vec<RawHandler>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandler {
    name: String,
    component: PathBuf,
    types: Vec<String>,
    migrations: Option<PathBuf>,
    #[serde(default)]
    uses: Vec<String>,
    #[serde(default)]
    limits: LimitOverrides,
}

impl Manifest {
    pub fn load(path: &Path) -> anyhow::Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the handler manifest {}", path.display()))?;
        let base = path
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", path.display()))?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Self::parse(&text, &base)
            .with_context(|| format!("invalid handler manifest {}", path.display()))
    }

    fn parse(text: &str, base: &Path) -> anyhow::Result<Manifest> {
        let raw: RawManifest = toml::from_str(text)?;
        if raw.handler.is_empty() {
            bail!("no [[handler]] entries: exactly would answer every event 422");
        }
        let mut owner_of_type: HashMap<&str, &str> = HashMap::new();
        let mut names = HashMap::new();
        for handler in &raw.handler {
            if !is_valid_name(&handler.name) {
                bail!(
                    "handler name {:?} must be 1-40 characters of a-z, 0-9 and '-', starting with a letter",
                    handler.name
                );
            }
            if names.insert(handler.name.as_str(), ()).is_some() {
                bail!("handler {:?} is declared twice", handler.name);
            }
            if handler.types.is_empty() {
                bail!("handler {:?} lists no event types", handler.name);
            }
            for ty in &handler.types {
                if ty.is_empty() {
                    bail!("handler {:?} lists an empty event type", handler.name);
                }
                if let Some(other) = owner_of_type.insert(ty, &handler.name) {
                    bail!(
                        "event type {ty:?} is claimed by both {other:?} and {:?}",
                        handler.name
                    );
                }
            }
        }
        let handlers = raw
            .handler
            .into_iter()
            .map(|raw| HandlerSpec {
                component: base.join(&raw.component),
                migrations: raw.migrations.map(|dir| base.join(dir)),
                name: raw.name,
                types: raw.types,
                uses: raw.uses.into_iter().map(|t| t.to_ascii_lowercase()).collect(),
                limits: raw.limits,
            })
            .collect();
        Ok(Manifest { handlers })
    }
}

/// Handler names become PostgreSQL role names and log fields, so keep them
/// plain (and short: a role name holds at most 63 bytes).
fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 40
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_paths_against_the_manifest_folder() {
        let manifest = Manifest::parse(
            r#"
            [[handler]]
            name = "order-created"
            component = "dist/a.wasm"
            types = ["order.created"]
            migrations = "m"
            "#,
            Path::new("/srv"),
        )
        .unwrap();
        assert_eq!(manifest.handlers[0].component, Path::new("/srv/dist/a.wasm"));
        assert_eq!(manifest.handlers[0].migrations.as_deref(), Some(Path::new("/srv/m")));
    }

    #[test]
    fn reads_limits_and_uses() {
        let manifest = Manifest::parse(
            r#"
            [[handler]]
            name = "p"
            component = "p.wasm"
            types = ["t"]
            uses = ["Orders"]
            [handler.limits]
            deadline = "250ms"
            memory_mib = 32
            "#,
            Path::new("/"),
        )
        .unwrap();
        let handler = &manifest.handlers[0];
        assert_eq!(handler.uses, ["orders"]);
        assert_eq!(handler.limits.deadline, Some(Duration::from_millis(250)));
        assert_eq!(handler.limits.memory_mib, Some(32));
        assert!(Manifest::parse("[[handler]]\nname = \"p\"\ncomponent = \"p\"\ntypes = [\"t\"]\n[handler.limits]\ndeadline = \"soon\"", Path::new("/")).is_err());
    }

    #[test]
    fn refuses_a_type_claimed_twice() {
        let error = Manifest::parse(
            r#"
            [[handler]]
            name = "a"
            component = "a.wasm"
            types = ["t"]
            [[handler]]
            name = "b"
            component = "b.wasm"
            types = ["t"]
            "#,
            Path::new("/"),
        )
        .unwrap_err();
        assert!(error.to_string().contains("claimed by both"), "{error}");
    }

    #[test]
    fn refuses_bad_names_and_unknown_keys() {
        for text in [
            "[[handler]]\nname = \"Bad_Name\"\ncomponent = \"a\"\ntypes = [\"t\"]",
            "[[handler]]\nname = \"a\"\ncomponent = \"a\"\ntypes = [\"t\"]\ntimeout = 1",
            "",
        ] {
            assert!(Manifest::parse(text, Path::new("/")).is_err(), "{text}");
        }
    }
}
