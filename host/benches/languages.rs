//! The echo handler in every language of `plugins/` under the same load, in
//! one run: messages per second and connections per second, and each
//! one's ratio to the Rust handler's.
//!
//! ```text
//! cargo bench -p wharf --bench languages -- [--quick] [--lang rust,c,go,python,js,quickjs|none]
//!     [--mode per-connection|shared|both] [--load echo|connect|both]
//!     [--size BYTES] [--binary] [--connections N] [--in-flight N]
//!     [--duration SECS] [--warmup SECS] [--rounds N]
//!     [--plugin NAME=PATH]... [--perf-map] [--pause-before-measure]
//!     [--in-place] [--keep-resident SIZE] [--wide-slots] [--busy-loadgen]
//! ```
//!
//! Each handler is served by a real `wharf serve` (one tokio worker, pinned
//! to one core; the load generator, this process, on another) with
//! `memory_limit = "256MiB"` and `cpu_time_per_event = "2s"`, so that no
//! call is cut, and measured twice:
//!
//! - **msgs/s**: 100 connections × 16 pipelined 1 KiB text messages (by
//!   default; `--size`, `--binary`, `--connections`, `--in-flight`), every
//!   echo checked byte for byte;
//! - **conns/s**: 50 connectors, each in a loop: connect, upgrade, one
//!   32 B echo, closing handshake.
//!
//! Modes: `per-connection` (an instance per connection, the default of a
//! tenant) for every language, and `shared` (one instance for all of a
//! tenant's connections) for those marked `shared` in `LANGS` (Go, Python
//! and JavaScript: no per-connection state in globals) and for Rust, the
//! reference. Ratios are to Rust per-connection in the same run.
//!
//! The components are the ones `tests/languages` builds: Rust's is the
//! bundled echo (`target/plugins`); the others are built by
//! `plugins/<lang>-echo/build.sh` into `target/tmp/languages-bench` when
//! their sources are newer than the component. A language whose toolchain
//! is not installed (by `cargo test --test languages`, or its `build.sh`)
//! is skipped, not failed. Compiled plugins are cached across runs in
//! `target/tmp/languages-bench/cache` (a JavaScript or Python one takes
//! 15-20 s to compile).
//!
//! `--plugin NAME=PATH` adds any echo component (an experiment's variant)
//! as a row, measured in the modes asked for. `--perf-map` starts the
//! servers with `WHARF_PERF_MAP=1` (wasmtime writes `/tmp/perf-PID.map`,
//! so `perf record -p PID` names the plugin's functions);
//! `--pause-before-measure` prints each server's pid and waits 5 s before
//! measuring, time to attach a profiler. `--in-place` and `--keep-resident
//! SIZE` set the servers' `plugin.memory_reset = "in-place"` and
//! `plugin.keep_resident`; `--wide-slots` their `plugin.memory_slots =
//! "wide"`. `--busy-loadgen`: the load generator polls instead of sleeping
//! between replies, as in the echo bench (each measurement line gives its
//! sleeps per message either way).
//!
//! `cargo test` runs a smoke run (no `--bench` argument): every language
//! whose toolchain is installed, briefly, unpinned, every echo checked.

#[path = "common/loadgen.rs"]
mod loadgen;
#[path = "common/tenant.rs"]
mod tenant;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use loadgen::{Load, Measurement, Pinning, ServerProc, Window};

/// An echo example of `plugins/`.
struct Lang {
    /// Its name on the command line and in the table.
    name: &'static str,
    /// `plugins/<dir>/build.sh` builds it (`None`: the bundled Rust echo).
    dir: Option<&'static str>,
    /// The component `build.sh` writes: `<file>.wasm`.
    file: &'static str,
    /// Keeps no per-connection state in globals: runs in `shared` mode.
    shared: bool,
}

const LANGS: &[Lang] = &[
    Lang {
        name: "rust",
        dir: None,
        file: "echo",
        shared: true,
    },
    Lang {
        name: "c",
        dir: Some("c-echo"),
        file: "c_echo",
        shared: false,
    },
    Lang {
        name: "go",
        dir: Some("go-echo"),
        file: "go_echo",
        shared: true,
    },
    Lang {
        name: "python",
        dir: Some("python-echo"),
        file: "python_echo",
        shared: true,
    },
    Lang {
        name: "js",
        dir: Some("js-echo"),
        file: "js_echo",
        shared: true,
    },
    Lang {
        name: "quickjs",
        dir: Some("quickjs-echo"),
        file: "quickjs_echo",
        shared: true,
    },
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("languages-bench")
}

fn toolchains() -> PathBuf {
    std::env::var_os("WHARF_TOOLCHAINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/toolchains"))
}

/// Whether `dir`'s toolchain is installed (as its `build.sh` would find
/// it), so that building it installs nothing.
fn toolchain_installed(dir: &str) -> bool {
    let t = toolchains();
    match dir {
        "python-echo" => t.join("python/venv/bin/componentize-py").is_file(),
        "js-echo" => t.join("js/node_modules/.bin/componentize-js").exists(),
        "go-echo" => t.join("go/venv/bin/go").is_file(),
        // tools/quickjs/build.sh marks its QuickJS build `.built` (in a
        // directory named after the pinned crate, which it alone knows)
        // after building tools/wizer.
        "quickjs-echo" => {
            std::fs::read_dir(t.join("quickjs"))
                .is_ok_and(|d| d.flatten().any(|e| e.path().join(".built").is_file()))
                && toolchain_installed("c-echo")
        }
        "c-echo" => [
            "clang-19",
            "lld-19",
            "wasi-libc",
            "libclang-rt-19-dev-wasm32",
        ]
        .iter()
        .all(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        }),
        _ => false,
    }
}

fn mtime(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// The newest modification time of the files `dir`'s build reads: its own
/// files, the WIT and, for the QuickJS echo, the runtime and the echo.js it
/// embeds.
fn sources_mtime(dir: &str) -> Result<std::time::SystemTime> {
    let mut newest = mtime(&repo().join("wit/websocket.wit")).context("wit/websocket.wit")?;
    let mut dirs = vec![repo().join("plugins").join(dir)];
    if dir == "quickjs-echo" {
        dirs.extend([repo().join("tools/quickjs"), repo().join("plugins/js-echo")]);
    }
    for d in dirs {
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let p = e?.path();
            if p.is_file()
                && let Some(t) = mtime(&p)
            {
                newest = newest.max(t);
            }
        }
    }
    Ok(newest)
}

/// The component of `lang`: built (when its sources are newer) if its
/// toolchain is installed; `None` if it is not.
fn component(lang: &Lang) -> Result<Option<PathBuf>> {
    let Some(dir) = lang.dir else {
        return Ok(Some(
            Path::new(wharf::bundled::PLUGIN_DIR).join(format!("{}.wasm", lang.file)),
        ));
    };
    if !toolchain_installed(dir) {
        return Ok(None);
    }
    let out = work_dir().join("plugins");
    let wasm = out.join(format!("{}.wasm", lang.file));
    let src = repo().join("plugins").join(dir);
    if mtime(&wasm).is_some_and(|t| t >= sources_mtime(dir).unwrap_or(t)) {
        return Ok(Some(wasm));
    }
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(src.join("build.sh"))
        .arg(&out)
        .output()
        .with_context(|| format!("run plugins/{dir}/build.sh"))?;
    if !output.status.success() {
        bail!(
            "plugins/{dir}/build.sh failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    ensure!(
        wasm.is_file(),
        "plugins/{dir}/build.sh wrote no {}",
        wasm.display()
    );
    println!("built {} in {:.1?}", wasm.display(), started.elapsed());
    Ok(Some(wasm))
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    PerConnection,
    Shared,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::PerConnection => "per-connection",
            Mode::Shared => "shared",
        }
    }
}

struct Options {
    langs: Vec<String>,
    modes: Vec<Mode>,
    echo: bool,
    connect: bool,
    text: bool,
    size: usize,
    connections: usize,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    rounds: usize,
    extra: Vec<(String, PathBuf)>,
    perf_map: bool,
    pause: bool,
    quick: bool,
    smoke: bool,
    /// More lines for the servers' `[plugin]`.
    plugin_lines: String,
    /// The load generator polls (see `loadgen::loadgen_runtime`).
    busy_loadgen: bool,
}

impl Options {
    fn smoke() -> Self {
        Options {
            langs: LANGS.iter().map(|l| l.name.to_owned()).collect(),
            modes: vec![Mode::PerConnection, Mode::Shared],
            echo: true,
            connect: true,
            text: true,
            size: 1024,
            connections: 100,
            in_flight: 16,
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(200),
            rounds: 1,
            extra: Vec::new(),
            perf_map: false,
            pause: false,
            quick: false,
            smoke: true,
            plugin_lines: String::new(),
            busy_loadgen: false,
        }
    }
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        smoke: false,
        ..Options::smoke()
    };
    let (mut warmup, mut duration) = (None, None);
    let secs = |v: Option<&String>, what: &str| -> Result<Duration> {
        let v = v.with_context(|| format!("{what} needs seconds"))?;
        Ok(Duration::from_secs_f64(
            v.parse().with_context(|| format!("bad {what} {v}"))?,
        ))
    };
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => o.quick = true,
            "--binary" => o.text = false,
            "--perf-map" => o.perf_map = true,
            "--pause-before-measure" => o.pause = true,
            "--in-place" => o.plugin_lines += tenant::IN_PLACE,
            "--wide-slots" => o.plugin_lines += tenant::WIDE_SLOTS,
            "--busy-loadgen" => o.busy_loadgen = true,
            "--keep-resident" => {
                let v = it.next().context("--keep-resident needs a size")?;
                o.plugin_lines += &tenant::keep_resident(v);
            }
            "--lang" => {
                let v = it.next().context("--lang needs names")?;
                // `none`: only the `--plugin` components.
                o.langs = v
                    .split(',')
                    .filter(|l| *l != "none")
                    .map(str::to_owned)
                    .collect();
                for l in &o.langs {
                    ensure!(
                        LANGS.iter().any(|k| k.name == l),
                        "unknown language {l:?}; known: rust, c, go, python, js"
                    );
                }
            }
            "--mode" => {
                o.modes = match it.next().map(String::as_str) {
                    Some("per-connection") => vec![Mode::PerConnection],
                    Some("shared") => vec![Mode::Shared],
                    Some("both") => vec![Mode::PerConnection, Mode::Shared],
                    other => bail!("--mode needs per-connection, shared or both, not {other:?}"),
                }
            }
            "--load" => {
                (o.echo, o.connect) = match it.next().map(String::as_str) {
                    Some("echo") => (true, false),
                    Some("connect") => (false, true),
                    Some("both") => (true, true),
                    other => bail!("--load needs echo, connect or both, not {other:?}"),
                }
            }
            "--size" | "--connections" | "--in-flight" | "--rounds" => {
                let v = it.next().with_context(|| format!("{arg} needs a number"))?;
                let n: usize = v.parse().with_context(|| format!("bad {arg} {v}"))?;
                match arg.as_str() {
                    "--size" => o.size = n,
                    "--connections" => o.connections = n.max(1),
                    "--in-flight" => o.in_flight = n.max(1),
                    _ => o.rounds = n.max(1),
                }
            }
            "--warmup" => warmup = Some(secs(it.next(), "--warmup")?),
            "--duration" => duration = Some(secs(it.next(), "--duration")?),
            "--plugin" => {
                let v = it.next().context("--plugin needs NAME=PATH")?;
                let (name, path) = v.split_once('=').context("--plugin needs NAME=PATH")?;
                let path =
                    std::fs::canonicalize(path).with_context(|| format!("--plugin {path}"))?;
                o.extra.push((name.to_owned(), path));
            }
            // Passed by `cargo bench` to harness-less benches.
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?}; options: --quick, --lang NAMES, --mode per-connection|shared|both, \
                 --load echo|connect|both, --size BYTES, --binary, --connections N, --in-flight N, \
                 --warmup SECS, --duration SECS, --rounds N, --plugin NAME=PATH, --perf-map, --pause-before-measure, \
                 --in-place, --keep-resident SIZE, --wide-slots, --busy-loadgen"
            ),
        }
    }
    o.warmup = warmup.unwrap_or(Duration::from_millis(if o.quick { 300 } else { 1000 }));
    o.duration = duration.unwrap_or(Duration::from_secs(if o.quick { 1 } else { 5 }));
    Ok(o)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    // `cargo bench` passes `--bench`; `cargo test` (this target has
    // `test = true`) does not, and may pass test filters or libtest flags,
    // which the smoke run ignores.
    let opts = if args.iter().any(|a| a == "--bench") {
        parse_options(&args)?
    } else {
        Options::smoke()
    };
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let pinning = if opts.smoke {
        Pinning::NONE
    } else {
        Pinning::choose()?
    };
    let (rt, local) = loadgen::loadgen_runtime(pinning, opts.busy_loadgen)?;
    let smoke = opts.smoke;
    let started = Instant::now();
    rt.block_on(local.run_until(bench(opts, pinning)))?;
    if smoke {
        println!(
            "languages smoke run passed in {:.1?} (cargo bench --bench languages for figures)",
            started.elapsed()
        );
    }
    Ok(())
}

/// One handler in one mode, and what it measured.
struct Row {
    name: String,
    mode: Mode,
    msgs: Option<Measurement>,
    conns: Option<Measurement>,
}

async fn bench(opts: Options, pinning: Pinning) -> Result<()> {
    let work = work_dir();
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).context("create the plugin cache")?;
    let tmp = tempfile::tempdir().context("tempdir")?;

    let mut plugins: Vec<(String, PathBuf, bool)> = Vec::new();
    let mut skipped = Vec::new();
    for lang in LANGS
        .iter()
        .filter(|l| opts.langs.iter().any(|n| n == l.name))
    {
        match component(lang)? {
            Some(path) => plugins.push((lang.name.to_owned(), path, lang.shared)),
            None => skipped.push(lang.name),
        }
    }
    for (name, path) in &opts.extra {
        plugins.push((name.clone(), path.clone(), true));
    }
    if !skipped.is_empty() {
        println!(
            "skipped (toolchain not installed; `cargo test --release --test languages` installs it): {}",
            skipped.join(", ")
        );
    }
    let echo_load = Load::Echo {
        text: opts.text,
        size: opts.size,
        connections: opts.connections,
        in_flight: opts.in_flight,
    };
    let connect_load = Load::Connect {
        connectors: 50,
        size: 32,
    };
    let fmt_core = |c: Option<usize>| c.map_or("unpinned".to_owned(), |c| format!("core {c}"));
    if !opts.plugin_lines.is_empty() {
        println!(
            "servers' [plugin] adds: {}",
            opts.plugin_lines.trim().replace('\n', ", ")
        );
    }
    println!(
        "languages bench: {} {} B {} messages, {} connections × {} in flight; connect loop: 50 connectors, 32 B echo; \
         warm-up {:?} + measure {:?}{}; server -> {}, load generator -> {}; wharf built with the Cargo profile `{}`",
        if opts.echo { "echo" } else { "(no echo)" },
        opts.size,
        if opts.text { "text" } else { "binary" },
        opts.connections,
        opts.in_flight,
        opts.warmup,
        opts.duration,
        if opts.smoke {
            " (smoke run for cargo test: unpinned, figures not meaningful)"
        } else if opts.quick {
            " (--quick)"
        } else {
            ""
        },
        fmt_core(pinning.server),
        fmt_core(pinning.loadgen),
        tenant::build_profile(),
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut n = 0;
    for &mode in &opts.modes {
        for (name, path, shared_ok) in &plugins {
            if mode == Mode::Shared && !shared_ok {
                continue;
            }
            n += 1;
            let config = tmp.path().join(format!("wharf-{n}.toml"));
            let mut toml = format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n\
                 [server]\nmax_connections = 10000\n\
                 [plugin]\ncache_dir = {:?}\nmemory_limit = \"256MiB\"\ncpu_time_per_event = \"2s\"\n{}",
                cache.display().to_string(),
                opts.plugin_lines
            );
            let _ = write!(
                toml,
                "[[tenant]]\nname = \"bench\"\nplugin = {:?}\nroutes = [\"/\"]\ninstance = {:?}\n",
                path.display().to_string(),
                mode.name()
            );
            std::fs::write(&config, toml).context("write wharf.toml")?;
            let log = tmp.path().join(format!("wharf-{n}.log"));
            let env: &[(&str, &str)] = if opts.perf_map {
                &[("WHARF_PERF_MAP", "1")]
            } else {
                &[]
            };
            let mut row = Row {
                name: name.clone(),
                mode,
                msgs: None,
                conns: None,
            };
            let loads = [(opts.echo, echo_load), (opts.connect, connect_load)];
            for (wanted, load) in loads {
                if !wanted {
                    continue;
                }
                for _ in 0..opts.rounds {
                    let t = Instant::now();
                    let mut server = ServerProc::wharf(&config, pinning.server, &log, env)
                        .await
                        .with_context(|| format!("{name} ({})", mode.name()))?;
                    let ready = t.elapsed();
                    if opts.pause {
                        println!("  server pid {} ready; measuring in 5 s", server.pid);
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    let window = Window {
                        warmup: opts.warmup,
                        duration: opts.duration,
                        smoke: opts.smoke,
                    };
                    let result = loadgen::measure(load, &server, None, pinning, window).await;
                    let m = match result.and_then(|m| server.check_alive().map(|()| m)) {
                        Ok(m) => m,
                        Err(e) => {
                            let tail = server.log_tail();
                            let _ = server.terminate(Duration::from_secs(30)).await;
                            return Err(e.context(format!(
                                "{name} ({}), {load:?}; server log tail:\n{tail}",
                                mode.name()
                            )));
                        }
                    };
                    let tail = server.log_tail();
                    server.terminate(Duration::from_secs(30)).await?;
                    if !tail.is_empty() && !opts.smoke {
                        println!("  note: the server logged:\n{tail}");
                    }
                    let (what, per) = match load {
                        Load::Echo { .. } => ("msgs", "msg"),
                        Load::Connect { .. } => ("conns", "conn"),
                    };
                    println!(
                        "  {name:<10} {:<14} {:>10.0} {what}/s  p50 {:>9.1} µs  p99 {:>9.1} µs  server CPU {:>3.0}% = {:>7.1} µs/{per}  loadgen CPU {:>3.0}%, {:.3} sleeps/{per}  (ready in {:.1?})",
                        mode.name(),
                        m.per_s,
                        m.p50_us,
                        m.p99_us,
                        m.server_cpu * 100.0,
                        m.server_us_per_op(),
                        m.loadgen_cpu * 100.0,
                        m.loadgen_sleeps_per_op(),
                        ready,
                    );
                    let slot = match load {
                        Load::Echo { .. } => &mut row.msgs,
                        Load::Connect { .. } => &mut row.conns,
                    };
                    // Other load only ever slows a run down: keep the best.
                    if slot.as_ref().is_none_or(|b| m.per_s > b.per_s) {
                        *slot = Some(m);
                    }
                }
            }
            rows.push(row);
        }
    }
    print_report(&rows, &opts);
    Ok(())
}

fn print_report(rows: &[Row], opts: &Options) {
    let reference = rows
        .iter()
        .find(|r| r.name == "rust" && r.mode == Mode::PerConnection);
    let ratio = |m: &Option<Measurement>, f: fn(&Row) -> &Option<Measurement>| -> String {
        match (m, reference.and_then(|r| f(r).as_ref())) {
            (Some(m), Some(r)) if r.per_s > 0.0 => format!("{:.3}", m.per_s / r.per_s),
            _ => "-".into(),
        }
    };
    let fig =
        |m: &Option<Measurement>| m.as_ref().map_or("-".into(), |m| format!("{:.0}", m.per_s));
    let us = |m: &Option<Measurement>| {
        m.as_ref()
            .map_or("-".into(), |m| format!("{:.1}", m.server_us_per_op()))
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nLanguages: {} × {} pipelined {} B {} messages; connections/s: connect, upgrade, one echo, close \
         (50 connectors); memory_limit 256MiB, cpu_time_per_event 2s; ratios to Rust per-connection, same run{}\n",
        opts.connections,
        opts.in_flight,
        opts.size,
        if opts.text { "text" } else { "binary" },
        if opts.rounds > 1 {
            format!(", best of {}", opts.rounds)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        t,
        "| handler | mode | msgs/s | vs Rust | server µs/msg | conns/s | vs Rust | server µs/conn |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.mode.name(),
            fig(&r.msgs),
            ratio(&r.msgs, |r| &r.msgs),
            us(&r.msgs),
            fig(&r.conns),
            ratio(&r.conns, |r| &r.conns),
            us(&r.conns),
        );
    }
    for r in rows {
        for (what, m) in [("msgs_per_s", &r.msgs), ("conns_per_s", &r.conns)] {
            if let Some(m) = m {
                let _ = writeln!(
                    t,
                    "RESULT languages {} {} {what} {:.0} server_us_per_op {:.2} loadgen_sleeps_per_op {:.3}",
                    r.name,
                    r.mode.name(),
                    m.per_s,
                    m.server_us_per_op(),
                    m.loadgen_sleeps_per_op()
                );
            }
        }
    }
    print!("{t}");
}
