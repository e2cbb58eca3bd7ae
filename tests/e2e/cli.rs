//! The command line as a newcomer meets it: errors said once and without a
//! backtrace, `check` finding what `serve` would refuse, relative paths
//! and `./wharf.toml`, the log formats, wrong kinds of Wasm, what start-up
//! says while it compiles, and the compiled-plugin cache (its cap and
//! `wharf cache`).

use std::net::TcpListener;
use std::path::Path;
use std::process::Output;

use crate::support::*;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `wharf ARGS` run in `dir`, with RUST_BACKTRACE=1 as many Rust
/// developers have it.
fn wharf_in(dir: &Path, args: &[&str]) -> Output {
    wharf_cmd()
        .args(args)
        .current_dir(dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run wharf")
}

/// The one `error:` line of a failed run, after checking that it failed
/// with `code`, said it once and printed no backtrace.
fn error_line(out: &Output, code: i32) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    for noise in ["Caused by", "backtrace", "Backtrace", "0x61"] {
        assert!(!stderr.contains(noise), "{noise:?} in:\n{stderr}");
    }
    errors[0].to_owned()
}

/// Every cause in `line` is said once: no `: X` repeated.
fn assert_said_once(line: &str, part: &str) {
    assert_eq!(
        line.matches(part).count(),
        1,
        "{part:?} not once in: {line}"
    );
}

#[test]
fn user_errors_are_printed_once_without_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let line = error_line(&wharf_in(d, &["check", "--config", "missing.toml"]), 1);
    assert!(line.contains("missing.toml"), "{line}");
    assert_said_once(&line, "No such file or directory");

    std::fs::write(d.join("small.toml"), "[plugin]\nmemory_limit = \"1KiB\"\n").unwrap();
    let line = error_line(&wharf_in(d, &["check", "--config", "small.toml"]), 1);
    assert!(line.contains("plugin.memory_limit"), "{line}");

    std::fs::write(d.join("README.md"), "# not a component\n").unwrap();
    let line = error_line(
        &wharf_in(
            d,
            &["check", "--listen", "127.0.0.1:0", "--plugin", "README.md"],
        ),
        1,
    );
    assert!(line.contains("(README.md)"), "{line}");
    assert!(
        line.contains("is not a valid component: it is not WebAssembly"),
        "{line}"
    );

    let line = error_line(&wharf_in(d, &["serve", "--listen", "localhost:8080"]), 2);
    assert!(line.contains("IP:PORT"), "{line}");

    let line = error_line(
        &wharf_in(
            d,
            &["check", "--listen", "127.0.0.1:0", "--plugin", "none.wasm"],
        ),
        1,
    );
    assert_said_once(&line, "No such file or directory");
}

#[test]
fn check_finds_a_busy_port_and_serve_says_nothing_before_failing() {
    let dir = tempfile::tempdir().unwrap();
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();

    let line = error_line(&wharf_in(dir.path(), &["check", "--listen", &port]), 1);
    assert!(line.contains(&format!("cannot listen on {port}")), "{line}");

    let args = ["--listen", "127.0.0.1:0", "--admin", &port];
    let line = error_line(&wharf_in(dir.path(), &[&["check"][..], &args].concat()), 1);
    assert!(line.contains(&format!("{port} (admin)")), "{line}");

    // serve: the busy admin port stops it before any listener is announced.
    let out = wharf_in(dir.path(), &[&["serve"][..], &args].concat());
    let line = error_line(&out, 1);
    assert!(line.contains(&format!("{port} (admin)")), "{line}");
    assert!(
        !text(&out.stdout).contains("listening on"),
        "{}",
        text(&out.stdout)
    );

    // Two listeners on one address: found too (both are held at once).
    std::fs::write(
        dir.path().join("twice.toml"),
        "[[listener]]\naddress = \"127.0.0.1:18473\"\n[[listener]]\naddress = \"127.0.0.1:18473\"\n",
    )
    .unwrap();
    let line = error_line(&wharf_in(dir.path(), &["check", "-c", "twice.toml"]), 1);
    assert!(line.contains("cannot listen on 127.0.0.1:18473"), "{line}");
}

#[test]
fn check_finds_a_missing_static_dir_by_its_resolved_path() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("wharf.toml"),
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[static_files]\ndir = \"public\"\n",
    )
    .unwrap();
    let out = wharf_in(dir.path(), &["check", "--config", "conf/wharf.toml"]);
    let line = error_line(&out, 1);
    let resolved = conf.join("public");
    assert!(line.contains(&resolved.display().to_string()), "{line}");
}

#[test]
fn relative_paths_in_the_file_resolve_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("etc");
    std::fs::create_dir_all(conf.join("plugins")).unwrap();
    std::fs::create_dir_all(conf.join("public")).unwrap();
    std::fs::copy(plugin_path("echo"), conf.join("plugins/app.wasm")).unwrap();
    let cert = self_signed();
    std::fs::write(conf.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(conf.join("key.pem"), &cert.key_pem).unwrap();
    std::fs::write(conf.join("token"), "secret\n").unwrap();
    std::fs::write(
        conf.join("wharf.toml"),
        r#"
[[listener]]
address = "127.0.0.1:0"
tls = { cert = "cert.pem", key = "key.pem" }
[[tenant]]
name = "app"
plugin = "plugins/app.wasm"
routes = ["/"]
wasi = { dir = "public" }
[admin]
listen = "127.0.0.1:0"
token_file = "token"
[static_files]
dir = "public"
"#,
    )
    .unwrap();
    // From the file's parent, and from elsewhere: the same files.
    for cwd in [dir.path(), Path::new("/")] {
        let config = conf.join("wharf.toml");
        let config = if cwd == dir.path() {
            "etc/wharf.toml".to_owned()
        } else {
            config.display().to_string()
        };
        let out = wharf_in(cwd, &["check", "--config", &config]);
        assert!(
            out.status.success(),
            "from {}: {}",
            cwd.display(),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("app"), "{}", text(&out.stdout));
    }
    // A path on the command line stays relative to the working directory.
    let out = wharf_in(
        dir.path(),
        &[
            "check",
            "--listen",
            "127.0.0.1:0",
            "--plugin",
            "etc/plugins/app.wasm",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `--config`, then `WHARF_CONFIG`, then `./wharf.toml`.
#[test]
fn config_search_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tenant = |name: &str| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[[tenant]]\nname = \"{name}\"\nplugin = {}\nroutes = [\"/\"]\n",
            toml_path(&plugin_path("echo"))
        )
    };
    std::fs::write(d.join("wharf.toml"), tenant("from-cwd")).unwrap();
    std::fs::write(d.join("env.toml"), tenant("from-env")).unwrap();
    std::fs::write(d.join("flag.toml"), tenant("from-flag")).unwrap();
    let check = |env: Option<&str>, flag: Option<&str>| {
        let mut cmd = wharf_cmd();
        cmd.arg("check").current_dir(d);
        if let Some(flag) = flag {
            cmd.args(["--config", flag]);
        }
        if let Some(env) = env {
            cmd.env("WHARF_CONFIG", env);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    assert!(check(None, None).contains("from-cwd"));
    assert!(check(Some("env.toml"), None).contains("from-env"));
    assert!(check(Some("env.toml"), Some("flag.toml")).contains("from-flag"));
}

#[test]
fn logs_have_no_colours_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = wharf_cmd()
        .args(["check", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("INFO"), "no log lines:\n{stderr}");
    assert!(!stderr.contains('\x1b'), "ANSI escapes in:\n{stderr:?}");
}

#[test]
fn json_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = wharf_cmd()
        .args(["--log-format", "json", "check", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let loaded = lines
        .iter()
        .find(|l| l["fields"]["plugin"] == "echo" && l["fields"]["origin"].is_string())
        .unwrap_or_else(|| panic!("no plugin loaded line:\n{stderr}"));
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(loaded["fields"]["tenant"], "default");
}

#[test]
fn version_names_the_wit_package_and_wasmtime() {
    let out = wharf_cmd().arg("--version").output().unwrap();
    let stdout = text(&out.stdout);
    let wit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit/websocket.wit"))
            .unwrap();
    let package = wit
        .lines()
        .find_map(|l| l.strip_prefix("package ")?.strip_suffix(';'))
        .unwrap();
    assert!(stdout.contains(package), "{stdout}");
    assert!(stdout.contains("wasmtime 48."), "{stdout}");
}

/// `wharf new`'s hints run as written, one after the other: the paths after
/// `cd` are the project's, and the binary is named so the shell finds it.
#[test]
fn new_prints_runnable_hints() {
    let dir = tempfile::tempdir().unwrap();
    let out = wharf_in(dir.path(), &["new", "python", "mypy"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let steps: Vec<&str> = stdout
        .lines()
        .skip_while(|l| *l != "next:")
        .skip(1)
        .map_while(|l| l.strip_prefix("  "))
        .collect();
    assert_eq!(steps[..2], ["cd mypy", "./build.sh"], "{stdout}");
    let (wharf, rest) = steps[2].split_once(" serve --plugin ").expect(&stdout);
    assert_eq!(
        rest, "target/mypy.wasm",
        "relative to the project: {stdout}"
    );
    assert!(dir.path().join("mypy/build.sh").is_file());
    // The test's binary is not on PATH: its own path is printed instead.
    let binary = Path::new(wharf);
    assert!(
        wharf == "wharf" || (binary.is_absolute() && binary.is_file()),
        "{stdout}"
    );
}

/// A directory with a `wharf.toml` that caches compiled plugins in its own
/// `cache/` (`extra` is added to `[plugin]`), so that what is cached, and
/// whether a start compiles, is this test's alone.
fn own_cache(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("wharf.toml"),
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugin]\ncache_dir = \"cache\"\n{extra}"
        ),
    )
    .unwrap();
    dir
}

/// The compiled plugins in `dir`'s `cache/`.
fn cached(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir.join("cache")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cwasm"))
            .collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn wrong_kinds_of_wasm_are_told_before_compiling_and_never_cached() {
    let dir = own_cache("");
    let d = dir.path();
    let wat = |name: &str, text: &str| {
        std::fs::write(d.join(name), wat::parse_str(text).unwrap()).unwrap();
    };
    wat("core.wasm", r#"(module (func (export "on-text")))"#);
    wat(
        "http.wasm",
        r#"(component
            (import "wasi:http/outgoing-handler@0.2.0" (instance))
            (import "wharf:websocket/connection@0.2.0" (instance))
            (import "wasi:io/streams@0.2.3" (instance))
        )"#,
    );
    let run = |plugin: &str| {
        let out = wharf_in(d, &["check", "--plugin", plugin]);
        let line = error_line(&out, 1);
        (line, text(&out.stderr))
    };

    let (line, stderr) = run("core.wasm");
    assert!(
        line.contains(
            "this is a core WebAssembly module, not a component; build for wasm32-wasip2 \
             or componentize it"
        ),
        "{line}"
    );
    assert!(!stderr.contains("compiling"), "{stderr}");

    let (line, stderr) = run("http.wasm");
    assert!(
        line.contains(
            "imports wasi:http/outgoing-handler@0.2.0, wharf:websocket/connection@0.2.0, \
             which this host does not provide"
        ),
        "{line}"
    );
    // Served, by semver: not listed.
    assert!(!line.contains("wasi:io/streams"), "{line}");
    assert!(
        line.contains("built against wharf:websocket@0.2.0"),
        "{line}"
    );
    let package = env!("WHARF_WIT_PACKAGE");
    assert!(
        line.contains(&format!("this host serves {package}")),
        "{line}"
    );
    for wasi in ["wasi:cli", "wasi:io", "wasi:sockets"] {
        assert!(line.contains(wasi), "{wasi}: {line}");
    }
    assert!(!stderr.contains("compiling"), "{stderr}");

    // What only the compile finds (a missing export function) is refused
    // after it, and not cached either.
    let (line, stderr) = run(plugin_path("incomplete").to_str().unwrap());
    assert!(line.contains("on-close"), "{line}");
    assert!(stderr.contains("compiling plugin incomplete"), "{stderr}");

    assert!(cached(d).is_empty(), "{:?}", cached(d));
}

/// Start-up says it compiles and how long it took, then that it loads
/// from the cache; a new memory limit keeps the cached code.
#[test]
fn compiling_is_announced_and_cached_code_survives_a_memory_limit_change() {
    let dir = own_cache("memory_limit = \"64MiB\"\n");
    let d = dir.path();
    let out = wharf_in(d, &["check"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let compiling = stderr
        .find("compiling plugin echo (first time; cached afterwards)")
        .unwrap_or_else(|| panic!("{stderr}"));
    let compiled = stderr
        .find("plugin echo compiled in ")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(compiling < compiled, "{stderr}");
    assert_eq!(cached(d).len(), 1);

    for limit in ["64MiB", "128MiB", "16MiB"] {
        std::fs::write(
            d.join("wharf.toml"),
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugin]\ncache_dir = \"cache\"\n\
                 memory_limit = \"{limit}\"\n"
            ),
        )
        .unwrap();
        let out = wharf_in(d, &["check"]);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            stderr.contains("plugin echo loaded from the cache in "),
            "{limit}: {stderr}"
        );
        assert!(!stderr.contains("compiling"), "{limit}: {stderr}");
    }
    assert_eq!(cached(d).len(), 1);
}

/// A port in use is told before anything is compiled, by serve as by check.
#[test]
fn a_busy_port_is_told_before_compiling() {
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().to_string();
    let dir = own_cache("");
    for command in ["serve", "check"] {
        let out = wharf_in(dir.path(), &[command, "--listen", &port]);
        let line = error_line(&out, 1);
        assert!(line.contains(&format!("cannot listen on {port}")), "{line}");
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("compiling"), "{command}: {stderr}");
    }
    assert!(cached(dir.path()).is_empty());
}

#[test]
fn the_cache_is_capped_shown_and_cleared() {
    // Room for one of these plugins, not two.
    let dir = own_cache("cache_max_size = \"100KiB\"\n");
    let d = dir.path();
    let cache = d.join("cache");
    let show = || {
        let out = wharf_in(d, &["cache"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let shown = show();
    assert!(
        shown.contains(&format!("compiled-plugin cache: {}", cache.display())),
        "{shown}"
    );
    assert!(shown.contains("empty"), "{shown}");

    let out = wharf_in(
        d,
        &["check", "--plugin", plugin_path("echo").to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(show().contains("1 compiled plugin, "), "{}", show());
    let out = wharf_in(
        d,
        &["check", "--plugin", plugin_path("chaos").to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("least recently used plugins removed"),
        "{stderr}"
    );
    assert_eq!(cached(d).len(), 1, "{:?}", cached(d));
    let shown = show();
    assert!(shown.contains("1 compiled plugin, "), "{shown}");
    assert!(shown.contains("cap 100.0 KiB"), "{shown}");

    let out = wharf_in(d, &["cache", "clear"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with("removed 1 compiled plugin ("),
        "{stdout}"
    );
    assert!(stdout.contains(&cache.display().to_string()), "{stdout}");
    assert!(cached(d).is_empty());
    assert!(show().contains("0 compiled plugins, 0 B"), "{}", show());

    // Without a configuration: the default place, under XDG_CACHE_HOME.
    let empty = tempfile::tempdir().unwrap();
    let out = wharf_cmd()
        .arg("cache")
        .current_dir(empty.path())
        .env("XDG_CACHE_HOME", empty.path())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let default = empty.path().join("wharf");
    assert!(stdout.contains(&default.display().to_string()), "{stdout}");
}
