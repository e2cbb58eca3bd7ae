//! Builds the Rust handler components in `plugins/` for `wasm32-wasip2`, so
//! that `wharf serve` can bundle the echo handler and the tests can load the
//! others, with nothing to build by hand first.
//!
//! The plugins are a separate Cargo workspace (a different target), built by
//! a nested `cargo` into `target/plugins`. If the `wasm32-wasip2` target is
//! missing and rustup is there, it is installed.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("host/ is inside the workspace");
    let plugins = root.join("plugins");
    let wit = root.join("wit");
    let target_dir = root.join("target").join("plugins");

    for dir in [&wit, &plugins] {
        rerun_if_changed_tree(dir);
    }

    ensure_wasm_target();
    emit_versions(root, &wit);

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(plugins.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir);
    // The outer build's flags are for the host, not for wasm.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build plugins/");
    if !status.success() {
        panic!(
            "building the plugins in {} for {WASM_TARGET} failed (see the output above)",
            plugins.display()
        );
    }
    let out = target_dir.join(WASM_TARGET).join("release");
    println!("cargo:rustc-env=WHARF_PLUGIN_DIR={}", out.display());
}

/// Cargo only watches a directory's own mtime; watch every file below it,
/// except build output.
fn rerun_if_changed_tree(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == "target") {
            continue;
        }
        if path.is_dir() {
            rerun_if_changed_tree(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

fn ensure_wasm_target() {
    let Ok(out) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        // No rustup: the toolchain must already have the target.
        return;
    };
    let installed = String::from_utf8_lossy(&out.stdout);
    if installed.lines().any(|l| l.trim() == WASM_TARGET) {
        return;
    }
    println!("cargo:warning=installing the {WASM_TARGET} target with rustup");
    let ok = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        panic!("the {WASM_TARGET} target is missing and `rustup target add {WASM_TARGET}` failed");
    }
}

/// `wharf --version` names the contract and the engine a plugin meets:
/// the WIT package (`package wharf:websocket@X.Y.Z;` in `wit/`) and the
/// wasmtime release that Cargo.lock resolved, read here so that neither is
/// written down a second time.
fn emit_versions(root: &Path, wit: &Path) {
    let wit_file = wit.join("websocket.wit");
    let text = std::fs::read_to_string(&wit_file).expect("read wit/websocket.wit");
    let package = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("package ")?.strip_suffix(';'))
        .expect("wit/websocket.wit declares its package");
    println!("cargo:rustc-env=WHARF_WIT_PACKAGE={package}");

    let lock_file = root.join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock_file.display());
    let lock = std::fs::read_to_string(&lock_file).expect("read Cargo.lock");
    let wasmtime = lock
        .split("[[package]]")
        .find_map(|entry| {
            let mut lines = entry.lines().map(str::trim);
            lines.find(|l| *l == "name = \"wasmtime\"")?;
            lines.find_map(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
        })
        .expect("Cargo.lock has wasmtime");
    println!("cargo:rustc-env=WHARF_WASMTIME_VERSION={wasmtime}");
}
