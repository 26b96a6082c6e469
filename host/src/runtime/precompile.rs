//! Ahead-of-time compiled handlers, for a fast cold start.
//!
//! Compiling a component with Cranelift takes tens of milliseconds per
//! handler (seconds for a debug build of the host); loading the machine code
//! `exactly compile` wrote takes well under a millisecond. Knative scales to
//! zero, so that difference is paid by the first event after every scale-up.
//!
//! `exactly compile` writes, for each component `<dir>/<name>.wasm`,
//! `<name>.cwasm` (the output of [`Engine::precompile_component`]) and a
//! stamp `<name>.cwasm.json` next to it (or into `--out-dir`). The stamp
//! holds the SHA-256 of the `.wasm` it was compiled from, the SHA-256 of the
//! `.cwasm` itself, and a fingerprint of the engine's compatibility hash
//! ([`Engine::precompile_compatibility_hash`]).
//!
//! `exactly serve` loads a handler's `.cwasm` only when all three still hold:
//! the `.wasm` is the one that was compiled, the `.cwasm` is the file
//! `exactly compile` wrote (not truncated, not replaced), and the engine has
//! the very same settings. Otherwise — and when there is no `.cwasm` — it
//! compiles the `.wasm` as before and says why in the log. Both commands
//! build their engine from the one set of settings ([`super::engine`] is
//! `compile`'s, the same without the instance pool, which compiled code does
//! not depend on), so the same flags and manifest give the same engine.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, Precompiled};

use crate::metrics::LoadedFrom;

/// Extension of a precompiled component.
pub const CWASM_EXTENSION: &str = "cwasm";

/// What `exactly compile` records next to each `.cwasm`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stamp {
    /// SHA-256 (hex) of the `.wasm` the `.cwasm` was compiled from.
    wasm_sha256: String,
    /// SHA-256 (hex) of the `.cwasm`.
    cwasm_sha256: String,
    /// [`engine_fingerprint`] of the engine that compiled it.
    engine: String,
    /// The `exactly` version that wrote it, for people reading the file;
    /// not checked (the fingerprint covers what matters).
    exactly: String,
}

/// Where the precompiled form of `component` lives: `<name>.cwasm` in
/// `dir`, or next to the component.
pub fn cwasm_path(component: &Path, dir: Option<&Path>) -> PathBuf {
    let name = component.with_extension(CWASM_EXTENSION);
    match (dir, name.file_name()) {
        (Some(dir), Some(file)) => dir.join(file),
        _ => name,
    }
}

fn stamp_path(cwasm: &Path) -> PathBuf {
    let mut name = cwasm.as_os_str().to_owned();
    name.push(".json");
    PathBuf::from(name)
}

/// A short, stable fingerprint of everything in the engine's configuration
/// that decides whether compiled code can be loaded into it (target, ISA
/// flags, tunables such as fuel and epoch interruption, wasm features and
/// the wasmtime version).
pub fn engine_fingerprint(engine: &Engine) -> String {
    // `DefaultHasher::new()` has fixed keys: the same for the same binary, which is what
    // `compile` and `serve` are. A different build may fingerprint
    // differently and then merely recompiles.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// What `exactly compile` did for one component.
pub struct Compiled {
    pub cwasm: PathBuf,
    pub bytes: usize,
    pub took: Duration,
}

/// Precompiles `component` with `engine` into `dir` (or next to it).
/// Each file is written to a temporary name and renamed into place, the
/// stamp last, so a reader never sees a half-written `.cwasm` it trusts.
pub fn compile(engine: &Engine, component: &Path, dir: Option<&Path>) -> anyhow::Result<Compiled> {
    let started = Instant::now();
    let wasm = std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let cwasm = engine
        .precompile_component(&wasm)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot compile {}", component.display()))?;
    let path = cwasm_path(component, dir);
    let stamp = Stamp {
        wasm_sha256: hex::encode(Sha256::digest(&wasm)),
        cwasm_sha256: hex::encode(Sha256::digest(&cwasm)),
        engine: engine_fingerprint(engine),
        exactly: env!("CARGO_PKG_VERSION").to_owned(),
    };
    write_atomically(&path, &cwasm)?;
    write_atomically(&stamp_path(&path), serde_json::to_string_pretty(&stamp)?.as_bytes())?;
    Ok(Compiled { cwasm: path, bytes: cwasm.len(), took: started.elapsed() })
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    std::fs::write(&temporary, bytes).with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot rename {} to {}", temporary.display(), path.display()))
}

/// Loads `component`: its precompiled form when that is valid for this
/// engine and this `.wasm`, otherwise by compiling the `.wasm`.
pub fn load(engine: &Engine, component: &Path, dir: Option<&Path>) -> anyhow::Result<(Component, LoadedFrom)> {
    let wasm = std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    let cwasm = cwasm_path(component, dir);
    match load_precompiled(engine, &wasm, &cwasm) {
        Ok(loaded) => return Ok((loaded, LoadedFrom::Precompiled)),
        Err(Fallback::Missing) => {
            tracing::info!(component = %component.display(), cwasm = %cwasm.display(),
                "no precompiled form (run `exactly compile` for a faster start); compiling");
        }
        Err(Fallback::Unusable(reason)) => {
            tracing::warn!(component = %component.display(), cwasm = %cwasm.display(),
                "the precompiled form cannot be used ({reason}); compiling instead");
        }
    }
    let compiled = Component::new(engine, &wasm).map_err(anyhow::Error::from)?;
    Ok((compiled, LoadedFrom::Compiled))
}

enum Fallback {
    /// No `.cwasm` (or no stamp): nothing was precompiled.
    Missing,
    /// There is one, but it is stale, damaged or for another engine.
    Unusable(String),
}

fn load_precompiled(engine: &Engine, wasm: &[u8], cwasm: &Path) -> Result<Component, Fallback> {
    let stamp_file = stamp_path(cwasm);
    if !cwasm.exists() && !stamp_file.exists() {
        return Err(Fallback::Missing);
    }
    let unusable = |reason: String| Fallback::Unusable(reason);
    let stamp = std::fs::read(&stamp_file).map_err(|e| unusable(format!("cannot read {}: {e}", stamp_file.display())))?;
    let stamp: Stamp =
        serde_json::from_slice(&stamp).map_err(|e| unusable(format!("{} is not a stamp: {e}", stamp_file.display())))?;
    if stamp.wasm_sha256 != hex::encode(Sha256::digest(wasm)) {
        return Err(unusable("it was compiled from another version of the .wasm".into()));
    }
    let fingerprint = engine_fingerprint(engine);
    if stamp.engine != fingerprint {
        return Err(unusable(format!(
            "it was compiled for other engine settings ({} here, {} there): same exactly build, flags and manifest limits are needed",
            fingerprint, stamp.engine
        )));
    }
    let bytes = std::fs::read(cwasm).map_err(|e| unusable(format!("cannot read it: {e}")))?;
    if stamp.cwasm_sha256 != hex::encode(Sha256::digest(&bytes)) {
        return Err(unusable("its contents are not what `exactly compile` wrote".into()));
    }
    if Engine::detect_precompiled(&bytes) != Some(Precompiled::Component) {
        return Err(unusable("it is not a precompiled component".into()));
    }
    // SAFETY: `Component::deserialize` trusts its input to be machine code
    // that wasmtime produced for an engine like this one; it checks the
    // header, the wasmtime version and the engine's settings, but cannot
    // check the code itself. These bytes are exactly what `exactly compile`
    // wrote with `Engine::precompile_component` (their SHA-256 matches the
    // stamp written with them), from the very `.wasm` this handler names
    // (its SHA-256 matches too), with an engine of identical settings (the
    // fingerprint matches, and wasmtime re-checks). The `.cwasm`, its stamp
    // and the `.wasm` are part of the deployment, as trusted as the
    // `exactly` binary itself: whoever can replace them can replace the
    // binary. They are never taken from events or the network.
    unsafe { Component::deserialize(engine, &bytes) }.map_err(|e| unusable(format!("wasmtime refused it: {e:#}")))
}
