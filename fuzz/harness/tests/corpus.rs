//! Replays the committed fuzz corpus (and the kept crash inputs) through
//! the same checks the libFuzzer targets run, on stable, as part of
//! `cargo test --workspace`.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("readable corpus directory").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let (_, check) = wharf_fuzz_harness::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("a known target");
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for path in &files {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{target}: {} fails its check", path.display());
        }
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn handshake_corpus() {
    replay("handshake");
}

#[test]
fn frames_corpus() {
    replay("frames");
}

#[test]
fn utf8_corpus() {
    replay("utf8");
}

#[test]
fn close_corpus() {
    replay("close");
}

/// Every target has a test above.
#[test]
fn every_target_is_replayed() {
    let names: Vec<_> = wharf_fuzz_harness::TARGETS
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(names, ["handshake", "frames", "utf8", "close"]);
}
