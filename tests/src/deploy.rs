//! Reading what `deploy/` says, so that tests can hold it against the code.
//!
//! Three kinds of files live there: the container build (`Containerfile`,
//! with the image's handler manifest `handlers.toml`), and the Kubernetes
//! manifests as a kustomize base with overlays. [`Containerfile::load`]
//! parses the instructions the image depends on, [`ImageManifest::load`]
//! the handler manifest, and [`kustomize`] renders a kustomization the way
//! `kubectl kustomize` does for the features `deploy/` uses (resources,
//! namespace, labels, strategic-merge patches on custom resources, images).
//! It refuses any other kustomize feature, so a new one cannot be silently
//! ignored by the tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::app::repo_root;

/// `<repo>/deploy`.
pub fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// Every YAML document of a file, as JSON values (YAML keys here are all
/// strings). Empty documents are left out.
#[track_caller]
pub fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let mut documents = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)
            .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()));
        if !value.is_null() {
            documents.push(value);
        }
    }
    documents
}

/// A Kubernetes object's `kind/name`, for messages and lookups.
pub fn object_key(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Renders the kustomization in `dir` (a folder holding
/// `kustomization.yaml`), like `kubectl kustomize dir`, in resource order.
#[track_caller]
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let file = dir.join("kustomization.yaml");
    let documents = yaml_documents(&file);
    assert_eq!(
        documents.len(),
        1,
        "{} must hold one document",
        file.display()
    );
    let kustomization = documents[0]
        .as_object()
        .unwrap_or_else(|| panic!("{} is not a mapping", file.display()))
        .clone();
    const KNOWN: &[&str] = &[
        "apiVersion",
        "kind",
        "namespace",
        "labels",
        "resources",
        "patches",
        "images",
    ];
    for key in kustomization.keys() {
        assert!(
            KNOWN.contains(&key.as_str()),
            "{}: the tests' kustomize renderer does not know `{key}`; teach tests/src/deploy.rs",
            file.display()
        );
    }

    let mut objects = Vec::new();
    for resource in strings(&kustomization, "resources", &file) {
        let path = dir.join(&resource);
        assert!(
            path.exists(),
            "{}: resource {resource} does not exist",
            file.display()
        );
        if path.is_dir() {
            objects.extend(kustomize(&path));
        } else {
            objects.extend(yaml_documents(&path));
        }
    }

    for patch in list(&kustomization, "patches") {
        let relative = patch["path"].as_str().unwrap_or_else(|| {
            panic!(
                "{}: only `patches: - path: …` is supported, got {patch}",
                file.display()
            )
        });
        let path = dir.join(relative);
        assert!(
            path.is_file(),
            "{}: patch {relative} does not exist",
            file.display()
        );
        for patch in yaml_documents(&path) {
            let key = object_key(&patch);
            let target = objects
                .iter_mut()
                .find(|object| object_key(object) == key)
                .unwrap_or_else(|| {
                    panic!(
                        "{}: the patch for {key} matches no resource of the base",
                        path.display()
                    )
                });
            strategic_merge(target, &patch);
        }
    }

    for image in list(&kustomization, "images") {
        let name = image["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: an image without a name", file.display()));
        let mut replaced = false;
        for object in &mut objects {
            for container in containers_mut(object) {
                let current = container["image"].as_str().unwrap_or_default().to_owned();
                let (current_name, current_tag) = match current.rsplit_once(':') {
                    Some((name, tag)) if !tag.contains('/') => (name.to_owned(), Some(tag)),
                    _ => (current.clone(), None),
                };
                if current_name != name {
                    continue;
                }
                let new_name = image["newName"].as_str().unwrap_or(name);
                let reference = if let Some(digest) = image["digest"].as_str() {
                    format!("{new_name}@{digest}")
                } else if let Some(tag) = image["newTag"].as_str() {
                    format!("{new_name}:{tag}")
                } else if let Some(tag) = current_tag {
                    format!("{new_name}:{tag}")
                } else {
                    new_name.to_owned()
                };
                container["image"] = Value::String(reference);
                replaced = true;
            }
        }
        assert!(
            replaced,
            "{}: the image entry {name} matches no container",
            file.display()
        );
    }

    for entry in list(&kustomization, "labels") {
        if let Some(pairs) = entry["pairs"].as_object() {
            for object in &mut objects {
                let labels = object["metadata"]
                    .as_object_mut()
                    .expect("every object has metadata")
                    .entry("labels")
                    .or_insert_with(|| Value::Object(Map::new()));
                for (name, value) in pairs {
                    labels[name] = value.clone();
                }
            }
        }
    }

    if let Some(namespace) = kustomization.get("namespace").and_then(Value::as_str) {
        for object in &mut objects {
            if object["kind"] == "Namespace" {
                object["metadata"]["name"] = Value::String(namespace.to_owned());
            } else {
                object["metadata"]["namespace"] = Value::String(namespace.to_owned());
            }
        }
    }
    objects
}

/// The files a kustomization names (resources that are files, and
/// patches), as paths relative to `dir`, recursing into folder resources.
pub fn kustomization_files(dir: &Path) -> Vec<PathBuf> {
    let file = dir.join("kustomization.yaml");
    let documents = yaml_documents(&file);
    let kustomization = documents[0].as_object().cloned().unwrap_or_default();
    let mut files = vec![file.clone()];
    for resource in strings(&kustomization, "resources", &file) {
        let path = dir.join(resource);
        if path.is_dir() {
            files.extend(kustomization_files(&path));
        } else {
            files.push(path);
        }
    }
    for patch in list(&kustomization, "patches") {
        if let Some(relative) = patch["path"].as_str() {
            files.push(dir.join(relative));
        }
    }
    files
}

/// The containers of a workload: `spec.template.spec.containers` (Knative
/// Service, Deployment) or `spec.containers` (Pod).
pub fn containers(object: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    for pointer in ["/spec/template/spec/containers", "/spec/containers"] {
        if let Some(list) = object.pointer(pointer).and_then(Value::as_array) {
            found.extend(list.iter());
        }
    }
    found
}

fn containers_mut(object: &mut Value) -> Vec<&mut Value> {
    let pointer = if object.pointer("/spec/template/spec/containers").is_some() {
        "/spec/template/spec/containers"
    } else {
        "/spec/containers"
    };
    match object.pointer_mut(pointer).and_then(Value::as_array_mut) {
        Some(list) => list.iter_mut().collect(),
        None => Vec::new(),
    }
}

/// Strategic merge as kustomize applies it to custom resources (which have
/// no merge keys): mappings merge key by key, `null` deletes a key, and
/// every other value, lists included, replaces the old one.
fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else if let Some(existing) = target.get_mut(key) {
                    strategic_merge(existing, value);
                } else {
                    target.insert(key.clone(), value.clone());
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn list(map: &Map<String, Value>, key: &str) -> Vec<Value> {
    map.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

#[track_caller]
fn strings(map: &Map<String, Value>, key: &str, file: &Path) -> Vec<String> {
    list(map, key)
        .into_iter()
        .map(|value| match value {
            Value::String(text) => text,
            other => panic!("{}: `{key}` holds {other}, not a path", file.display()),
        })
        .collect()
}

/// The image's handler manifest, `deploy/handlers.toml`.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageManifest {
    #[serde(rename = "handler")]
    pub handlers: Vec<ManifestHandler>,
}

/// One `[[handler]]` of a manifest: only what the tests compare.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ManifestHandler {
    pub name: String,
    pub component: String,
    pub types: Vec<String>,
    pub migrations: Option<String>,
    #[serde(default)]
    pub uses: Vec<String>,
}

impl ImageManifest {
    /// Parses a handler manifest (the image's, or the repository's).
    #[track_caller]
    pub fn load(path: &Path) -> ImageManifest {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        toml::from_str(&text)
            .unwrap_or_else(|error| panic!("{} is not a handler manifest: {error}", path.display()))
    }

    /// `deploy/handlers.toml`.
    pub fn image() -> ImageManifest {
        ImageManifest::load(&deploy_dir().join("handlers.toml"))
    }

    /// Every event type, each once.
    pub fn types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .handlers
            .iter()
            .flat_map(|handler| handler.types.iter().cloned())
            .collect();
        types.sort();
        types.dedup();
        types
    }
}

/// The instructions of `deploy/Containerfile` the tests look at.
#[derive(Clone, Debug, Default)]
pub struct Containerfile {
    /// The base image(s).
    pub from: Vec<String>,
    /// `COPY` sources and destinations, in order.
    pub copies: Vec<CopyInstruction>,
    /// `ENV` variables.
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub expose: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// One `COPY [--chown=…] source destination`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyInstruction {
    pub source: String,
    pub destination: String,
    /// `--chown` if given.
    pub owner: Option<String>,
}

impl Containerfile {
    /// `deploy/Containerfile`.
    pub fn load() -> Containerfile {
        let path = deploy_dir().join("Containerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        Containerfile::parse(&text)
    }

    /// Parses the instructions; comments and line continuations are
    /// handled, instructions the tests do not use are refused so that a
    /// new one gets a look.
    #[track_caller]
    pub fn parse(text: &str) -> Containerfile {
        let mut file = Containerfile::default();
        let mut logical = String::new();
        let mut instructions = Vec::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && logical.is_empty()) {
                continue;
            }
            if let Some(continued) = trimmed.strip_suffix('\\') {
                logical.push_str(continued);
                logical.push(' ');
                continue;
            }
            logical.push_str(trimmed);
            instructions.push(std::mem::take(&mut logical));
        }
        for instruction in instructions {
            let (keyword, rest) = instruction
                .split_once(char::is_whitespace)
                .unwrap_or((instruction.as_str(), ""));
            let rest = rest.trim();
            match keyword.to_ascii_uppercase().as_str() {
                "FROM" => file.from.push(rest.to_owned()),
                "COPY" => {
                    let mut owner = None;
                    let mut paths = Vec::new();
                    for word in rest.split_whitespace() {
                        if let Some(chown) = word.strip_prefix("--chown=") {
                            owner = Some(chown.to_owned());
                        } else {
                            assert!(
                                !word.starts_with("--"),
                                "Containerfile: COPY flag {word} is not understood by the tests"
                            );
                            paths.push(word.to_owned());
                        }
                    }
                    assert_eq!(
                        paths.len(),
                        2,
                        "Containerfile: COPY {rest} must name one source and one destination"
                    );
                    file.copies.push(CopyInstruction {
                        source: paths[0].clone(),
                        destination: paths[1].clone(),
                        owner,
                    });
                }
                "ENV" => {
                    for pair in rest.split_whitespace() {
                        let (name, value) = pair.split_once('=').unwrap_or_else(|| {
                            panic!("Containerfile: ENV {pair} is not NAME=value")
                        });
                        file.env.insert(name.to_owned(), value.to_owned());
                    }
                }
                "USER" => file.user = Some(rest.to_owned()),
                "WORKDIR" => file.workdir = Some(rest.to_owned()),
                "EXPOSE" => file
                    .expose
                    .extend(rest.split_whitespace().map(str::to_owned)),
                "ENTRYPOINT" => file.entrypoint = exec_form(rest),
                "CMD" => file.cmd = exec_form(rest),
                other => panic!("Containerfile: the tests do not know the instruction {other}"),
            }
        }
        file
    }

    /// The `COPY` whose destination is `path` or a folder holding it.
    pub fn copy_providing(&self, path: &str) -> Option<&CopyInstruction> {
        self.copies.iter().find(|copy| {
            path == copy.destination
                || path.starts_with(&format!("{}/", copy.destination.trim_end_matches('/')))
        })
    }
}

/// `["a", "b"]` (exec form, the only form the image can use: it has no
/// shell).
#[track_caller]
fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|error| {
        panic!("Containerfile: {text} is not exec form [\"…\"] ({error}); scratch has no shell")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerfile_instructions_are_parsed() {
        let file = Containerfile::parse(
            "# comment\nFROM scratch\nCOPY --chown=1:2 a /opt/a\nENV A=1 \\\n    B=two\nUSER 7\n\
             EXPOSE 8080\nENTRYPOINT [\"/bin/x\"]\nCMD [\"serve\"]\n",
        );
        assert_eq!(file.from, ["scratch"]);
        assert_eq!(
            file.copies,
            [CopyInstruction {
                source: "a".into(),
                destination: "/opt/a".into(),
                owner: Some("1:2".into())
            }]
        );
        assert_eq!(file.env["A"], "1");
        assert_eq!(file.env["B"], "two");
        assert_eq!(file.user.as_deref(), Some("7"));
        assert_eq!(file.entrypoint, ["/bin/x"]);
        assert_eq!(file.cmd, ["serve"]);
        assert!(file.copy_providing("/opt/a/b.wasm").is_some());
        assert!(file.copy_providing("/opt/ab").is_none());
    }

    #[test]
    fn patches_merge_mappings_and_replace_lists() {
        let mut target = serde_json::json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        strategic_merge(
            &mut target,
            &serde_json::json!({"a": {"c": [3], "e": 2}, "d": null}),
        );
        assert_eq!(target, serde_json::json!({"a": {"b": 1, "c": [3], "e": 2}}));
    }
}
