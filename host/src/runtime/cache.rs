//! Compiled plugins cached on disk, so a restart (or a large interpreter
//! component) does not pay Cranelift again.
//!
//! An artifact is keyed by the SHA-256 of the component and the engine's
//! compatibility hash (wasmtime version and every setting that affects code
//! generation); a stale or corrupt artifact is recompiled, never trusted.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// The default cache directory: `$XDG_CACHE_HOME/wharf` or `~/.cache/wharf`.
pub fn default_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("wharf"))
}

/// A component's content hash, hex.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// How a plugin's compiled code was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    Cached,
}

/// Loads `bytes` as a component, from the cache in `dir` if present.
pub fn load(
    engine: &Engine,
    dir: Option<&Path>,
    hash: &str,
    bytes: &[u8],
) -> anyhow::Result<(Component, Origin)> {
    let Some(dir) = dir else {
        return Ok((Component::new(engine, bytes)?, Origin::Compiled));
    };
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let path = dir.join(format!("{hash}-{:016x}.cwasm", h.finish()));
    if path.is_file() {
        // SAFETY: the file was written by `Engine::precompile_component` of an
        // engine with the same compatibility hash, into a directory only the
        // server writes (documented for `plugin.cache_dir`); wasmtime checks
        // the header and refuses mismatched artifacts.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok((component, Origin::Cached)),
            Err(err) => {
                tracing::warn!(path = %path.display(), %err, "cached plugin unusable; recompiling")
            }
        }
    }
    let artifact = engine.precompile_component(bytes)?;
    // SAFETY: the artifact was produced just above by this engine.
    let component = unsafe { Component::deserialize(engine, &artifact)? };
    if let Err(err) = store(dir, &path, &artifact) {
        tracing::warn!(dir = %dir.display(), %err, "cannot cache compiled plugin");
    }
    Ok((component, Origin::Compiled))
}

/// Writes atomically: a reader never sees half an artifact.
fn store(dir: &Path, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, artifact)?;
    std::fs::rename(&tmp, path)
}
