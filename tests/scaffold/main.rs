//! `wharf new`, end to end: for each language, the real binary scaffolds a
//! project into a temporary directory outside the repository, the project's
//! own build command builds it (toolchains from the package registries, as a
//! plugin author would get them), and `wharf serve --plugin` serves the
//! result: a text and a binary message come back, "goodbye" closes with 1000.
//! Every scaffold, like its example, exports a batch interface
//! (`packed-words-handler` in Rust, C, Go and the QuickJS runtime,
//! `batch-handler` in Python).
//!
//! Toolchains go to `$WHARF_TOOLCHAINS` (default `<repo>/target/toolchains`,
//! the directory the `languages` tests install into, so both share one
//! install); the Rust build uses `target/tmp/scaffold-rust` as its
//! `CARGO_TARGET_DIR`, so it stays warm between runs.
//!
//! Plus the command line's refusals: bad names, non-empty directories.
//!
//! ```sh
//! cargo test --release --test scaffold -- --nocapture
//! ```

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Instant;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use support::*;
use wharf::runtime::inspect::{self, Kind};
use wharf::scaffold::Language;

/// Servers one at a time: the first start of a Python or JavaScript
/// component compiles megabytes of wasm, which should not starve another
/// language's echo checks.
static SERIAL: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn toolchains() -> PathBuf {
    std::env::var_os("WHARF_TOOLCHAINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target").join("toolchains"))
}

fn wharf_new(args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = wharf_cmd();
    cmd.arg("new").args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.output().expect("run wharf new")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `wharf new <lang> <name> --dir <tmp>/<name>`; returns the project dir.
fn scaffold(lang: &str, name: &str, tmp: &Path) -> PathBuf {
    let dir = tmp.join(name);
    let out = wharf_new(&[lang, name, "--dir", dir.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "wharf new {lang} {name} failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("created"), "{stdout}");
    assert!(stdout.contains("wharf serve --plugin"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(dir.join("wit/websocket.wit")).unwrap(),
        std::fs::read_to_string(root().join("wit/websocket.wit")).unwrap(),
        "the scaffold's WIT is the repository's"
    );
    dir
}

/// Runs the project's build command; returns the component.
fn build(lang: Language, name: &str, dir: &Path) -> PathBuf {
    let started = Instant::now();
    let (mut cmd, wasm) = match lang {
        Language::Rust => {
            let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scaffold-rust");
            let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
            cmd.args(["build", "--release", "--target", "wasm32-wasip2"])
                .env("CARGO_TARGET_DIR", &target_dir);
            // The outer build's settings are for the host, not for wasm.
            for var in [
                "RUSTFLAGS",
                "CARGO_ENCODED_RUSTFLAGS",
                "CARGO_BUILD_TARGET",
                "CARGO_BUILD_RUSTFLAGS",
                "RUSTC_WORKSPACE_WRAPPER",
                "CARGO_PROFILE_RELEASE_DEBUG",
                "CARGO_PROFILE_RELEASE_LTO",
            ] {
                cmd.env_remove(var);
            }
            let wasm = target_dir.join(lang.wasm_path(name).strip_prefix("target").unwrap());
            (cmd, wasm)
        }
        _ => {
            assert_eq!(lang.build_command(), "./build.sh");
            let mut cmd = Command::new(dir.join("build.sh"));
            cmd.env("WHARF_TOOLCHAINS", toolchains());
            (cmd, dir.join(lang.wasm_path(name)))
        }
    };
    let _ = std::fs::remove_file(&wasm);
    let status = cmd
        .current_dir(dir)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the {lang} build: {e}"));
    assert!(status.success(), "the {lang} build failed ({status})");
    assert!(
        wasm.is_file(),
        "the {lang} build wrote no {}",
        wasm.display()
    );
    eprintln!(
        "[scaffold {lang}] {}: {:.1} s",
        lang.build_command(),
        started.elapsed().as_secs_f64()
    );
    wasm
}

/// Serves `wasm` with `wharf serve` and checks the echo.
fn serve_and_echo(lang: Language, wasm: &Path) {
    // `ServerOpts::plugin` is a file stem joined onto the bundled plugin
    // directory; an absolute stem replaces it.
    let stem: &'static str = Box::leak(wasm.with_extension("").display().to_string().into());
    assert_eq!(plugin_path(stem), wasm);
    // The limits the languages tests use for these toolchains.
    let plugin_limits = match lang {
        Language::Python => "memory_limit = \"128MiB\"",
        _ => "",
    };
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let server = Server::start(ServerOpts {
        plugin_limits,
        ..ServerOpts::new(stem)
    });
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut ws = server.connect(false).await;
            send_text(&mut ws, "hello from a scaffold ✓").await;
            assert_eq!(recv_text(&mut ws).await, "hello from a scaffold ✓");
            send(&mut ws, Message::binary(vec![0u8, 1, 2, 255, 254])).await;
            match recv(&mut ws).await {
                Message::Binary(b) => assert_eq!(&b[..], &[0, 1, 2, 255, 254]),
                other => panic!("expected binary, got {}", describe(&other)),
            }
            // Three messages in one write reach the handler in one read:
            // its batch export (or, without one, a call each).
            let batch = [
                Message::text("one"),
                Message::binary(vec![2u8; 3]),
                Message::text("three ✓"),
            ];
            for msg in &batch {
                ws.feed(msg.clone()).await.expect("queue a message");
            }
            ws.flush().await.expect("write the batch");
            for msg in batch {
                assert_eq!(recv(&mut ws).await, msg, "{lang}: a batch's echo");
            }
            send_text(&mut ws, "goodbye").await;
            assert_eq!(recv_close(&mut ws).await, (1000, "goodbye".to_owned()));
        });
    let log = server.log_text();
    assert!(
        !log.contains("trapped") && !log.contains("exceeded"),
        "the {lang} handler failed; log:\n{log}"
    );
    eprintln!(
        "[scaffold {lang}] served and echoed: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Every scaffold exports a batch interface, as its example does (one
/// call per read instead of one per message): packed with span words in
/// Rust, C, Go and the QuickJS runtime.
fn check_exports(lang: Language, wasm: &Path) {
    let bytes = std::fs::read(wasm).unwrap();
    let Kind::Component(Some(outline)) = inspect::read(&bytes) else {
        panic!("the {lang} build is not a readable component");
    };
    let interface = match lang {
        Language::Rust | Language::Javascript | Language::C | Language::Go => {
            "packed-words-handler"
        }
        _ => "batch-handler",
    };
    assert!(
        outline
            .exports
            .iter()
            .any(|e| e.starts_with(&format!("wharf:websocket/{interface}@"))),
        "{lang}: no {interface} export; exports: {:?}",
        outline.exports
    );
}

fn end_to_end(lang: Language, arg: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("hello-{}", lang.title().to_lowercase());
    let dir = scaffold(arg, &name, tmp.path());
    let wasm = build(lang, &name, &dir);
    check_exports(lang, &wasm);
    serve_and_echo(lang, &wasm);
}

#[test]
fn rust_scaffold_builds_and_echoes() {
    end_to_end(Language::Rust, "rust");
}

#[test]
fn python_scaffold_builds_and_echoes() {
    end_to_end(Language::Python, "python");
}

#[test]
fn javascript_scaffold_builds_and_echoes() {
    end_to_end(Language::Javascript, "js");
}

#[test]
fn c_scaffold_builds_and_echoes() {
    end_to_end(Language::C, "c");
}

#[test]
fn go_scaffold_builds_and_echoes() {
    end_to_end(Language::Go, "go");
}

/// A Go handler without `OnPackedWords` still gets every message of a
/// batch: the bindings' export walks the span words and calls `OnText`
/// and `OnBinary` (the echo's `OnText` closes on "goodbye").
#[test]
fn go_handler_without_on_packed_words_gets_each_message() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "hello-go-fallback";
    let dir = scaffold("go", name, tmp.path());
    let handler = dir.join("handler.go");
    let source = std::fs::read_to_string(&handler).unwrap();
    let start = source
        .find("// OnPackedWords gets")
        .expect("the template's OnPackedWords");
    let end = source.find("// Nothing to clean up").expect("OnClose");
    std::fs::write(&handler, format!("{}{}", &source[..start], &source[end..])).unwrap();
    let wasm = build(Language::Go, name, &dir);
    serve_and_echo(Language::Go, &wasm);
}

#[test]
fn new_refuses_bad_names_and_non_empty_directories() {
    let tmp = tempfile::tempdir().unwrap();

    for bad in ["Upper", "9lives", "has space", "dot.ted", "fn", "../up"] {
        let dir = tmp.path().join("bad");
        let out = wharf_new(&["rust", bad, "--dir", dir.to_str().unwrap()], None);
        assert!(!out.status.success(), "accepted the name {bad:?}");
        assert!(
            text(&out.stderr).contains("invalid plugin name"),
            "{bad:?}: {}",
            text(&out.stderr)
        );
        assert!(!dir.exists(), "{bad:?}: wrote {}", dir.display());
    }

    let out = wharf_new(&["cobol", "x"], Some(tmp.path()));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("invalid value"),
        "{}",
        text(&out.stderr)
    );

    // A non-empty directory is left as it is.
    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("main.c"), "mine").unwrap();
    let out = wharf_new(&["c", "full", "--dir", full.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("refusing to overwrite"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(full.join("main.c")).unwrap(),
        "mine"
    );

    // Without --dir: ./<name>; an empty directory is fine; `js` is javascript.
    let out = wharf_new(&["go", "my-go"], Some(tmp.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(tmp.path().join("my-go/handler.go").is_file());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = wharf_new(&["js", "my-js", "--dir", "empty"], Some(tmp.path()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(empty.join("handler.js").is_file());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(empty.join("build.sh"))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "build.sh is not executable");
    }
    // Scaffolding twice into the same place is refused.
    let out = wharf_new(&["go", "my-go"], Some(tmp.path()));
    assert!(!out.status.success());

    let help = wharf_new(&["--help"], None);
    let help = text(&help.stdout);
    for word in ["rust", "python", "javascript", "--dir"] {
        assert!(
            help.contains(word),
            "`wharf new --help` lacks {word}:\n{help}"
        );
    }
}
