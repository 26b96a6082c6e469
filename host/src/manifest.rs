//! The handler manifest: which component handles which event types, and
//! where each handler's migrations live.
//!
//! ```toml
//! [[handler]]
//! name = "order-created"
//! component = "dist/order-created.wasm"   # relative to this file
//! types = ["order.created"]
//! migrations = "handlers/order-created/migrations"
//! ```
//!
//! A loaded [`Manifest`] is valid: names are unique and well-formed, every
//! type has exactly one handler, and every path is absolute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
                    "handler name {:?} must be 1-48 characters of a-z, 0-9 and '-', starting with a letter",
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
            })
            .collect();
        Ok(Manifest { handlers })
    }
}

/// Handler names become PostgreSQL role names and log fields, so keep them
/// plain.
fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 48
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
