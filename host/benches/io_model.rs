//! What the I/O model costs on this kernel, before anyone builds a driver
//! on it: one echo server (wharf's protocol crate, no plugin) driven three
//! ways, under the echo bench's loads (`common/proto_echo.rs`):
//!
//! | server | runtime | I/O |
//! |---|---|---|
//! | `proto-uring` | monoio | io_uring: reads and writes submitted to a ring |
//! | `proto-tokio` | tokio, current-thread | epoll, `recv`/`send` on readiness (wharf's model) |
//! | `proto-epoll` | monoio | epoll, the same code as `proto-uring` |
//!
//! and, for scale, the echo bench's tokio-tungstenite baseline and wharf
//! itself (its bundled echo plugin) under the same loads in the same run:
//! `proto-tokio / tokio-tungstenite` is what wharf's protocol and driver
//! pattern reach with no plugin in the loop, `wharf / proto-tokio` what
//! the sandbox costs.
//!
//! ```text
//! cargo bench --bench io_model -- [--scenario NAME]... [--duration SECS] [--warmup SECS] [--rounds N] [--busy-loadgen]
//! ```
//!
//! The ratio `uring / tokio` is what moving wharf's driver to io_uring
//! could gain at most (the protocol's and the copies' cost is the same on
//! both sides); `uring / epoll` is the I/O model alone, with the runtime
//! held fixed. Pinning, loads, the checks on every echo and the CPU
//! accounting are the echo bench's (`common/loadgen.rs`); each server runs
//! in a fresh process per measurement, in rotating order, and keeps its
//! best of `--rounds`. Without `--bench` (`cargo test`), a smoke run; where
//! io_uring is not allowed the uring server is reported as missing.

#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/baseline.rs"]
mod baseline;
#[path = "common/loadgen.rs"]
mod loadgen;
#[path = "common/proto_echo.rs"]
mod proto_echo;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use loadgen::*;
use tokio::process::Command;

/// The echo bench's baseline, for scale: the same loads against the
/// idiomatic tokio-tungstenite server (`common/baseline.rs`).
const TUNGSTENITE: &str = "tokio-tungstenite";
/// Wharf itself with its bundled echo plugin: against `proto-tokio`, what
/// the sandbox costs (the same protocol and I/O, plus the plugin calls).
const WHARF: &str = "wharf";

/// The ratios the report gives, each `a / b`, and what each one tells.
const PAIRS: [(&str, &str, &str); 4] = [
    (WHARF, "proto-tokio", "the sandbox's cost"),
    (
        "proto-tokio",
        TUNGSTENITE,
        "the protocol core with no plugin",
    ),
    (
        "proto-uring",
        "proto-tokio",
        "io_uring against wharf's epoll model",
    ),
    (
        "proto-uring",
        "proto-epoll",
        "io_uring alone, the runtime held fixed",
    ),
];

const SCENARIOS: [(&str, Load); 4] = [
    (
        "small",
        Load::Echo {
            text: true,
            size: 32,
            connections: 100,
            in_flight: 1,
        },
    ),
    (
        "pipelined",
        Load::Echo {
            text: false,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    ),
    (
        "large",
        Load::Echo {
            text: false,
            size: 64 * 1024,
            connections: 10,
            in_flight: 1,
        },
    ),
    (
        "connect",
        Load::Connect {
            connectors: 50,
            size: 32,
        },
    ),
];

struct Options {
    window: Window,
    scenarios: Vec<(&'static str, Load)>,
    rounds: usize,
    busy_loadgen: bool,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let bench = args.iter().any(|a| a == "--bench");
    let mut o = Options {
        window: Window {
            warmup: Duration::from_millis(if bench { 1000 } else { 100 }),
            duration: Duration::from_millis(if bench { 3000 } else { 200 }),
            smoke: !bench,
        },
        scenarios: Vec::new(),
        rounds: 1,
        busy_loadgen: false,
    };
    if !bench {
        // `cargo test` may pass test filters or libtest flags: ignored.
        o.scenarios = SCENARIOS.to_vec();
        return Ok(o);
    }
    let secs = |v: Option<&String>, what: &str| -> Result<Duration> {
        let v = v.with_context(|| format!("{what} needs seconds"))?;
        Ok(Duration::from_secs_f64(
            v.parse().with_context(|| format!("{what} {v}"))?,
        ))
    };
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bench" => {}
            "--busy-loadgen" => o.busy_loadgen = true,
            "--duration" => o.window.duration = secs(it.next(), "--duration")?,
            "--warmup" => o.window.warmup = secs(it.next(), "--warmup")?,
            "--rounds" => {
                o.rounds = it.next().context("--rounds needs a count")?.parse()?;
                ensure!(o.rounds >= 1, "--rounds must be at least 1");
            }
            "--scenario" => {
                let name = it.next().context("--scenario needs a name")?;
                let Some(sc) = SCENARIOS.iter().find(|(n, _)| n == name) else {
                    bail!("unknown scenario {name:?}; known: small, pipelined, large, connect");
                };
                o.scenarios.push(*sc);
            }
            other => bail!("unknown option {other:?}"),
        }
    }
    if o.scenarios.is_empty() {
        o.scenarios = SCENARIOS.to_vec();
    }
    Ok(o)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-baseline") {
        return baseline::main(&args);
    }
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let name = args.get(i + 1).context("--serve needs a name")?;
        return proto_echo::main(name);
    }
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    let opts = parse_options(&args)?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let pinning = if opts.window.smoke {
        Pinning::NONE
    } else {
        Pinning::choose()?
    };
    // As in the echo bench (`--busy-loadgen`: the load generator polls).
    let (rt, local) = loadgen_runtime(pinning, opts.busy_loadgen)?;
    let started = Instant::now();
    rt.block_on(local.run_until(run(&opts, pinning)))?;
    println!("io-model bench done in {:.1?}", started.elapsed());
    Ok(())
}

async fn start(name: &str, core: Option<usize>, dir: &std::path::Path) -> Result<ServerProc> {
    let log = dir.join(format!("{name}.log"));
    if name == WHARF {
        return ServerProc::wharf(&dir.join("wharf.toml"), core, &log, &[]).await;
    }
    let mut cmd = Command::new(std::env::current_exe().context("current_exe")?);
    if name == TUNGSTENITE {
        cmd.arg("--serve-baseline").arg(name);
    } else {
        cmd.arg("--serve").arg(name);
    }
    ServerProc::spawn(cmd, name, core, &log, false).await
}

async fn run(opts: &Options, pinning: Pinning) -> Result<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "io-model bench: warm-up {:?} + measure {:?}, servers pinned to {:?}, load generator to {:?}{}",
        opts.window.warmup,
        opts.window.duration,
        pinning.server,
        pinning.loadgen,
        if opts.window.smoke {
            " (smoke run: unpinned, figures not meaningful)"
        } else {
            ""
        }
    );
    std::fs::write(
        dir.path().join("wharf.toml"),
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugin]\ncache_dir = {:?}\n",
            dir.path().join("plugin-cache").display().to_string()
        ),
    )?;
    let mut names: Vec<&str> = proto_echo::NAMES.to_vec();
    names.extend([TUNGSTENITE, WHARF]);
    // The first wharf start compiles the echo plugin into the cache: done
    // here, outside every measurement.
    start(WHARF, None, dir.path()).await?.kill().await?;
    // A kernel or sandbox that refuses io_uring: the others still run.
    match start("proto-uring", None, dir.path()).await {
        Ok(probe) => probe.kill().await?,
        Err(e) => {
            println!("proto-uring cannot start, left out: {e:#}");
            names.retain(|n| *n != "proto-uring");
        }
    }
    let mut report = String::new();
    let _ = writeln!(
        report,
        "\n{:<10} {:<17} {:>15} {:>14} {:>13} {:>11}",
        "scenario", "server", "rate", "srv CPU µs/op", "kernel µs/op", "loadgen CPU"
    );
    for (i, (scenario, load)) in opts.scenarios.iter().enumerate() {
        let mut best: Vec<Option<Measurement>> = vec![None; names.len()];
        for round in 0..opts.rounds {
            for j in 0..names.len() {
                let k = (i + round + j) % names.len();
                let server = start(names[k], pinning.server, dir.path()).await?;
                let m = measure(*load, &server, None, pinning, opts.window)
                    .await
                    .with_context(|| format!("{scenario} against {}", names[k]))?;
                server.kill().await?;
                if best[k].as_ref().is_none_or(|b| m.per_s > b.per_s) {
                    best[k] = Some(m);
                }
            }
        }
        let best: Vec<Measurement> = best.into_iter().map(Option::unwrap_or_default).collect();
        let unit = match load {
            Load::Connect { .. } => "conns/s",
            _ => "msgs/s",
        };
        for (name, m) in names.iter().zip(&best) {
            let _ = writeln!(
                report,
                "{:<10} {:<17} {:>15} {:>14.2} {:>13.2} {:>10.0}%",
                scenario,
                name,
                format!("{:.0} {unit}", m.per_s),
                m.server_us_per_op(),
                m.server_sys_us_per_op(),
                m.loadgen_cpu * 100.0
            );
            println!(
                "RESULT io-model scenario={scenario} server={name} per_s={:.1} server_us_per_op={:.3} kernel_us_per_op={:.3} loadgen_cpu={:.3}",
                m.per_s,
                m.server_us_per_op(),
                m.server_sys_us_per_op(),
                m.loadgen_cpu
            );
        }
        let by = |n: &str| names.iter().position(|x| *x == n).map(|k| &best[k]);
        for (a, b, what) in PAIRS {
            if let (Some(x), Some(y)) = (by(a), by(b)) {
                let _ = writeln!(
                    report,
                    "{:<10} {a} / {b}: rate {:.3}, CPU per op {:.3}, kernel per op {:.3} ({what})",
                    "",
                    x.per_s / y.per_s,
                    x.server_us_per_op() / y.server_us_per_op(),
                    x.server_sys_us_per_op() / y.server_sys_us_per_op(),
                );
            }
        }
    }
    print!("{report}");
    Ok(())
}
