//! Echo throughput and latency: `wharf serve` with the bundled echo plugin
//! against two native echo servers built into this binary, tokio-tungstenite
//! (every decodable message fed, one flush per batch) and fastwebsockets
//! (behind hyper's upgrade, as its examples do), under identical load, in
//! one run.
//!
//! ```text
//! cargo bench --bench echo -- [--quick] [--scenario NAME]... [--duration SECS] [--warmup SECS] [--rounds N] [--shared]
//!     [--busy-loadgen] [--in-place]
//! ```
//!
//! `--shared` serves the echo plugin as a tenant in shared instance mode
//! (one instance for every connection, so no instantiation per connection).
//!
//! `--in-place` runs wharf with `plugin.memory_reset = "in-place"`: a
//! finished instance's written pages restored where they are, not returned
//! to the OS and faulted in again (needs Linux 6.7 and no swap).
//!
//! `--busy-loadgen` keeps the load generator from ever sleeping: a reply
//! that finds its core halted wakes it with an inter-processor interrupt,
//! which the replying server pays for, and pays more often the slower it
//! answers (see README, "Benchmarks").
//!
//! Each server process is pinned to one core; wharf runs one tokio worker
//! (`TOKIO_WORKER_THREADS=1`), each baseline one current-thread runtime
//! (the faster of the two for them; see `common/baseline.rs`). The load
//! generator (this process, one current-thread tokio runtime) is pinned to
//! another core. The load
//! generator speaks raw RFC 6455 over TCP or TLS: it does the upgrade
//! handshake, sends pre-encoded masked frames (each message encoded once),
//! parses the echoes with a small frame parser and checks every echoed byte
//! against what it sent; any mismatch aborts the run.
//!
//! Scenarios (a fresh server process for each measurement, the three servers
//! measured in rotating order):
//!
//! | name | load |
//! |---|---|
//! | `small` | 32 B text, 100 connections, 1 in flight each |
//! | `pipelined` | 1 KiB binary, 100 connections, 16 in flight each |
//! | `large` | 64 KiB binary, 10 connections, 1 in flight each |
//! | `*-tls` | the same three over wss |
//! | `connect` | 50 connectors: connect, upgrade, one 32 B echo, closing handshake |
//!
//! The baseline servers are this binary re-executed with `--serve-baseline
//! tokio-tungstenite` or `--serve-baseline fastwebsockets`. The report gives
//! wharf's ratio to each of them.
//!
//! Besides rates and p50/p99 latencies, each measurement reports the load
//! generator's CPU use (to show it is not the bottleneck), the server's CPU
//! use and CPU time per echo (the figure least disturbed by other load), and
//! how much of the two cores other processes took meanwhile. On a busy
//! machine, `--rounds N` measures each server N times (rotating) and keeps
//! each one's best run; it also gives wharf's ratios as each round measured
//! them, whose spread is how far the machine's speed moved between servers'
//! turns. Every figure is also printed as a `RESULT` line.

#[path = "common/loadgen.rs"]
mod loadgen;
#[path = "common/tenant.rs"]
mod tenant;
#[path = "common/tls.rs"]
mod tls;

use std::cell::Cell;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use loadgen::*;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Command;

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    tls: bool,
    kind: Load,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "small",
        tls: false,
        kind: Load::Echo {
            text: true,
            size: 32,
            connections: 100,
            in_flight: 1,
        },
    },
    Scenario {
        name: "pipelined",
        tls: false,
        kind: Load::Echo {
            text: false,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    },
    Scenario {
        name: "pipelined-text",
        tls: false,
        kind: Load::Echo {
            text: true,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    },
    Scenario {
        name: "large",
        tls: false,
        kind: Load::Echo {
            text: false,
            size: 64 * 1024,
            connections: 10,
            in_flight: 1,
        },
    },
    Scenario {
        name: "small-tls",
        tls: true,
        kind: Load::Echo {
            text: true,
            size: 32,
            connections: 100,
            in_flight: 1,
        },
    },
    Scenario {
        name: "pipelined-tls",
        tls: true,
        kind: Load::Echo {
            text: false,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    },
    Scenario {
        name: "large-tls",
        tls: true,
        kind: Load::Echo {
            text: false,
            size: 64 * 1024,
            connections: 10,
            in_flight: 1,
        },
    },
    Scenario {
        name: "connect",
        tls: false,
        kind: Load::Connect {
            connectors: 50,
            size: 32,
        },
    },
];

impl Scenario {
    fn describe(&self) -> String {
        let proto = if self.tls { "wss" } else { "ws" };
        match self.kind {
            Load::Echo {
                text,
                size,
                connections,
                in_flight,
            } => format!(
                "{proto}, {} B {}, {connections} connections x {in_flight} in flight",
                size,
                if text { "text" } else { "binary" }
            ),
            Load::Connect { connectors, size } => format!(
                "{proto}, {connectors} concurrent connectors: connect + upgrade + {size} B echo + close"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

struct Options {
    warmup: Duration,
    duration: Duration,
    scenarios: Vec<Scenario>,
    quick: bool,
    /// Measurements per server and scenario; the best (highest rate) is kept.
    rounds: usize,
    /// `cargo test`'s smoke run: no pinning, figures not meaningful.
    smoke: bool,
    /// `--instructions`: callgrind instruction counts instead of timings.
    instructions: Option<InstrOptions>,
    /// `--shared`: wharf serves the echo plugin in shared instance mode.
    shared: bool,
    /// `--in-place`: wharf resets its pool slots in place.
    in_place: bool,
    /// `--busy-loadgen`: the load generator never sleeps (see `main`).
    busy_loadgen: bool,
}

impl Options {
    /// The smoke run `cargo test` does: every scenario, briefly, unpinned,
    /// every echo still checked byte for byte.
    fn smoke() -> Self {
        Options {
            warmup: Duration::from_millis(100),
            duration: Duration::from_millis(200),
            scenarios: SCENARIOS.to_vec(),
            quick: false,
            rounds: 1,
            smoke: true,
            instructions: None,
            shared: false,
            in_place: false,
            busy_loadgen: false,
        }
    }
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut quick = false;
    let mut names: Vec<String> = Vec::new();
    let mut duration = None;
    let mut warmup = None;
    let mut rounds = 1;
    let mut instructions: Option<InstrOptions> = None;
    let mut shared = false;
    let mut in_place = false;
    let mut busy_loadgen = false;
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--shared" => shared = true,
            "--in-place" => in_place = true,
            "--busy-loadgen" => busy_loadgen = true,
            "--scenario" => {
                let v = it.next().context("--scenario needs a name")?;
                names.extend(v.split(',').map(str::to_owned));
            }
            "--duration" => {
                let v = it.next().context("--duration needs seconds")?;
                duration = Some(Duration::from_secs_f64(
                    v.parse().with_context(|| format!("bad --duration {v}"))?,
                ));
            }
            "--rounds" => {
                let v = it.next().context("--rounds needs a count")?;
                rounds = v.parse().with_context(|| format!("bad --rounds {v}"))?;
                ensure!(rounds >= 1, "--rounds must be at least 1");
            }
            "--warmup" => {
                let v = it.next().context("--warmup needs seconds")?;
                warmup = Some(Duration::from_secs_f64(
                    v.parse().with_context(|| format!("bad --warmup {v}"))?,
                ));
            }
            "--instructions" => {
                instructions.get_or_insert_with(InstrOptions::default);
            }
            "--valgrind" => {
                let v = it.next().context("--valgrind needs a path")?;
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .valgrind = v.clone();
            }
            "--messages" => {
                let v = it.next().context("--messages needs N1,N2")?;
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .messages = parse_pair(v).with_context(|| format!("bad --messages {v}"))?;
            }
            "--connections" => {
                let v = it.next().context("--connections needs M1,M2")?;
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .connections =
                    parse_pair(v).with_context(|| format!("bad --connections {v}"))?;
            }
            "--rep-strings" => {
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .rep_strings = true;
            }
            "--cache-sim" => {
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .cache_sim = true;
            }
            "--workers" => {
                let v = it.next().context("--workers needs a count")?;
                let workers: usize = v.parse().with_context(|| format!("bad --workers {v}"))?;
                ensure!(workers >= 1, "--workers must be at least 1");
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .workers = workers;
            }
            "--per-core" => {
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .per_core = true;
            }
            "--tls" => {
                instructions.get_or_insert_with(InstrOptions::default).tls = true;
            }
            "--keep" => {
                let v = it.next().context("--keep needs a directory")?;
                instructions.get_or_insert_with(InstrOptions::default).keep = Some(v.into());
            }
            "--plugin" => {
                let v = it.next().context("--plugin needs a component's path")?;
                let path = std::fs::canonicalize(v).with_context(|| format!("--plugin {v}"))?;
                instructions
                    .get_or_insert_with(InstrOptions::default)
                    .plugin = Some(path);
            }
            // Passed by `cargo bench` to harness-less benches.
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?}; options: --quick, --scenario NAME, --duration SECS, --warmup SECS, --rounds N, --shared, --in-place, --busy-loadgen, \
                 --instructions [--messages N1,N2] [--connections M1,M2] [--valgrind PATH] [--keep DIR] [--rep-strings] [--plugin PATH] [--shared] [--tls] [--cache-sim] [--workers N [--per-core]]"
            ),
        }
    }
    let scenarios = if names.is_empty() {
        SCENARIOS.to_vec()
    } else {
        names
            .iter()
            .map(|n| {
                SCENARIOS
                    .iter()
                    .find(|s| s.name == n)
                    .copied()
                    .ok_or_else(|| {
                        let all: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                        anyhow!("unknown scenario {n:?}; known: {}", all.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    Ok(Options {
        warmup: warmup.unwrap_or(if quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(1)
        }),
        duration: duration.unwrap_or(if quick {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        }),
        scenarios,
        quick,
        rounds,
        smoke: false,
        instructions: instructions.map(|i| InstrOptions {
            shared,
            in_place,
            ..i
        }),
        shared,
        in_place,
        busy_loadgen,
    })
}

/// `A,B` with `0 < A < B`.
fn parse_pair(v: &str) -> Result<(u64, u64)> {
    let (a, b) = v.split_once(',').context("expected two counts, N1,N2")?;
    let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
    ensure!(0 < a && a < b, "need 0 < N1 < N2");
    Ok((a, b))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-baseline") {
        return baseline::main(&args);
    }
    // `cargo bench` passes `--bench`; `cargo test` (this target has
    // `test = true`) does not, and may pass test filters or libtest flags,
    // which the smoke run ignores.
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    let options = if args.iter().any(|a| a == "--bench" || a == "--instructions") {
        parse_options(&args)?
    } else {
        Options::smoke()
    };
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let pinning = if options.smoke || options.instructions.is_some() {
        Pinning::NONE
    } else {
        Pinning::choose()?
    };
    // One thread, pinned to one core; `--busy-loadgen` keeps it polling
    // (not while counting instructions, which the servers run alone).
    let (rt, local) = loadgen_runtime(
        pinning,
        options.busy_loadgen && options.instructions.is_none(),
    )?;
    if let Some(instr) = &options.instructions {
        return rt.block_on(local.run_until(instructions::run(instr)));
    }
    let smoke = options.smoke;
    let started = Instant::now();
    rt.block_on(local.run_until(bench(options, pinning)))?;
    if smoke {
        println!(
            "echo smoke run passed in {:.1?} (cargo bench --bench echo for figures)",
            started.elapsed()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    Wharf,
    /// `common/baseline.rs`: tokio-tungstenite, one flush per batch.
    Tungstenite,
    /// `common/baseline.rs`: fastwebsockets behind hyper's upgrade.
    Fastwebsockets,
}

/// Every server, in the order of [`Row::m`] and of the report's columns.
const TARGETS: [Target; 3] = [Target::Wharf, Target::Tungstenite, Target::Fastwebsockets];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Wharf => "wharf",
            Target::Tungstenite => "tokio-tungstenite",
            Target::Fastwebsockets => "fastwebsockets",
        }
    }

    /// Short name for table columns.
    fn short(self) -> &'static str {
        match self {
            Target::Wharf => "wharf",
            Target::Tungstenite => "tungstenite",
            Target::Fastwebsockets => "fastws",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Files shared by every server start.
struct Setup {
    dir: tempfile::TempDir,
    wharf_config: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    client_tls: Arc<rustls::ClientConfig>,
    pinning: Pinning,
    starts: Cell<u32>,
}

impl Setup {
    /// `extra_config` is appended to the generated wharf.toml.
    fn new(pinning: Pinning, extra_config: &str) -> Result<Self> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let tls::SelfSigned { cert, key, client } = tls::SelfSigned::new(dir.path())?;
        let cache = dir.path().join("plugin-cache");
        std::fs::create_dir_all(&cache)?;
        let wharf_config = dir.path().join("wharf.toml");
        std::fs::write(
            &wharf_config,
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\n\
                 [[listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n\
                 [plugin]\ncache_dir = {:?}\n{extra_config}",
                cert.display().to_string(),
                key.display().to_string(),
                cache.display().to_string(),
            ),
        )
        .context("write wharf.toml")?;
        Ok(Setup {
            dir,
            wharf_config,
            cert,
            key,
            client_tls: client,
            pinning,
            starts: Cell::new(0),
        })
    }

    async fn start(&self, target: Target) -> Result<ServerProc> {
        self.start_with(target, &[]).await
    }

    /// Starts a server, under `wrapper` (e.g. valgrind and its options) if
    /// not empty.
    async fn start_with(&self, target: Target, wrapper: &[String]) -> Result<ServerProc> {
        let n = self.starts.get() + 1;
        self.starts.set(n);
        let log = self.dir.path().join(format!("{}-{n}.log", target.name()));
        let (program, args): (PathBuf, Vec<std::ffi::OsString>) = match target {
            Target::Wharf => (
                env!("CARGO_BIN_EXE_wharf").into(),
                vec![
                    "serve".into(),
                    "--config".into(),
                    (&self.wharf_config).into(),
                ],
            ),
            Target::Tungstenite | Target::Fastwebsockets => (
                std::env::current_exe().context("current_exe")?,
                vec![
                    "--serve-baseline".into(),
                    target.name().into(),
                    "--cert".into(),
                    (&self.cert).into(),
                    "--key".into(),
                    (&self.key).into(),
                ],
            ),
        };
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args);
        ServerProc::spawn(cmd, target.name(), self.pinning.server, &log, true).await
    }
}

/// The best wharf/baseline rate a CPU-bound wharf could reach if its own
/// user-space work cost nothing: the baseline's CPU per op over the kernel
/// time wharf spends per op.
fn kernel_ceiling(w: &Measurement, b: &Measurement) -> f64 {
    b.server_us_per_op() / w.server_sys_us_per_op()
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Row {
    scenario: Scenario,
    /// Each server's best measurement, in [`TARGETS`] order.
    m: [Measurement; 3],
    /// Each complete round's rates, in [`TARGETS`] order.
    rounds: Vec<[f64; 3]>,
}

impl Row {
    /// Wharf's lowest and highest ratio to `baseline` as the rounds
    /// measured them, each round against its own measurement of it.
    fn round_ratios(&self, baseline: Target) -> Option<(f64, f64)> {
        let (w, b) = (Target::Wharf.index(), baseline.index());
        self.rounds
            .iter()
            .map(|r| r[w] / r[b])
            .fold(None, |span, x| match span {
                None => Some((x, x)),
                Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
            })
    }
}

async fn bench(opts: Options, pinning: Pinning) -> Result<()> {
    // Lines of `[plugin]` first: the tenant table ends that section.
    let mut extra = String::new();
    if opts.in_place {
        extra.push_str(tenant::IN_PLACE);
        println!("wharf resets its pool slots in place (plugin.memory_reset = \"in-place\")");
    }
    if opts.shared {
        extra.push_str(&tenant::shared_echo(None));
        println!("wharf serves the echo plugin in shared instance mode");
    }
    let setup = Setup::new(pinning, &extra)?;
    let fmt_core = |c: Option<usize>| c.map_or("unpinned".to_owned(), |c| format!("core {c}"));
    println!(
        "echo bench: {} scenarios, warm-up {:?} + measure {:?} each{}",
        opts.scenarios.len(),
        opts.warmup,
        opts.duration,
        if opts.quick {
            " (--quick)"
        } else if opts.smoke {
            " (smoke run for cargo test: unpinned, figures not meaningful)"
        } else {
            ""
        }
    );
    println!(
        "pinning: servers -> {} (TOKIO_WORKER_THREADS=1), load generator -> {} (pid {}, allowed CPUs {})",
        fmt_core(pinning.server),
        fmt_core(pinning.loadgen),
        std::process::id(),
        cpus_allowed_list(std::process::id())
    );
    // The first wharf start compiles the plugin into the cache; do it now,
    // outside every measurement.
    let run_started = Instant::now();
    let first = setup.start(Target::Wharf).await?;
    println!(
        "wharf ready in {:.1?} (compiling the echo plugin into the cache); pid {} allowed CPUs {}, threads {}",
        run_started.elapsed(),
        first.pid,
        cpus_allowed_list(first.pid),
        thread_count(first.pid)
    );
    first.stop().await?;

    let mut rows = Vec::new();
    for (i, sc) in opts.scenarios.iter().enumerate() {
        println!("\n== {} ({})", sc.name, sc.describe());
        let mut best: [Option<Measurement>; 3] = Default::default();
        let mut rounds = vec![[None::<f64>; 3]; opts.rounds];
        // Rotate which server goes first, across scenarios and rounds: over
        // three rounds each one runs once in each position.
        let order = (0..opts.rounds).flat_map(|round| {
            let k = i + round;
            [0, 1, 2].map(|j| TARGETS[(k + j) % TARGETS.len()])
        });
        for (n, target) in order.enumerate() {
            let server = setup.start(target).await?;
            let pinned = cpus_allowed_list(server.pid);
            let tls = sc.tls.then_some(&setup.client_tls);
            let window = Window {
                warmup: opts.warmup,
                duration: opts.duration,
                smoke: opts.smoke,
            };
            let result = measure(sc.kind, &server, tls, pinning, window).await;
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    let tail = server.log_tail();
                    let _ = server.kill().await;
                    let log = if tail.is_empty() {
                        "the server logged nothing".to_owned()
                    } else {
                        format!("server log tail:\n{tail}")
                    };
                    return Err(e.context(format!(
                        "scenario {} against {} failed; {log}",
                        sc.name,
                        target.name()
                    )));
                }
            };
            let threads = thread_count(server.pid);
            let tail = server.log_tail();
            server.stop().await?;
            if !tail.is_empty() {
                println!("  note: {} logged (RUST_LOG=warn):\n{tail}", target.name());
            }
            println!(
                "  {:<11} {:>10.0}/s  p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.1} MB/s  loadgen CPU {:>3.0}%  server CPU {:>3.0}% = {:.1} µs/op (CPUs {pinned}, {threads} threads)  others on cores: {:.0}% / {:.0}%  [{} done]",
                target.short(),
                m.per_s,
                m.p50_us,
                m.p99_us,
                m.mb_per_s,
                m.loadgen_cpu * 100.0,
                m.server_cpu * 100.0,
                m.server_us_per_op(),
                m.others_server_core * 100.0,
                m.others_loadgen_core * 100.0,
                m.count
            );
            rounds[n / TARGETS.len()][target.index()] = Some(m.per_s);
            // Other load only ever slows a run down: keep each server's best.
            let best = &mut best[target.index()];
            if best.as_ref().is_none_or(|b| m.per_s > b.per_s) {
                *best = Some(m);
            }
        }
        rows.push(Row {
            scenario: *sc,
            m: best.map(Option::unwrap_or_default),
            rounds: rounds
                .iter()
                .filter_map(|r| Some([r[0]?, r[1]?, r[2]?]))
                .collect(),
        });
    }
    print_report(&rows, pinning, &opts);
    println!("total run time {:.1?}", run_started.elapsed());
    Ok(())
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

fn print_report(rows: &[Row], pinning: Pinning, opts: &Options) {
    let mut t = String::new();
    let core = |c: Option<usize>| c.map_or("-".into(), |c| c.to_string());
    let _ = writeln!(
        t,
        "\nEcho benchmark: wharf (bundled echo plugin) vs two native echo servers, tokio-tungstenite \
         (one flush per batch) and fastwebsockets (hyper upgrade), {:?} measured after {:?} warm-up, \
         fresh server per measurement{}",
        opts.duration,
        opts.warmup,
        if opts.rounds > 1 {
            format!(", best of {} rounds", opts.rounds)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        t,
        "pinning: each server process on core {} (wharf: TOKIO_WORKER_THREADS=1; the baselines: \
         one current-thread runtime); load generator on core {} (one current-thread runtime); \
         every server built with the Cargo profile `{}`",
        core(pinning.server),
        core(pinning.loadgen),
        tenant::build_profile()
    );
    let _ = writeln!(
        t,
        "{:<14} {:<8} {:>10} {:>11} {:>10} | {:>8} {:>8} | {:>14}",
        "scenario", "metric", "wharf", "tungstenite", "fastws", "w/tung", "w/fast", "ceiling t / f"
    );
    let _ = writeln!(t, "{}", "-".repeat(94));
    for r in rows {
        let [w, tu, fa] = &r.m;
        let large = is_large(&r.scenario);
        let metric = match r.scenario.kind {
            Load::Connect { .. } => "conns/s",
            _ if large => "MB/s",
            _ => "msgs/s",
        };
        let v = |m: &Measurement| if large { m.mb_per_s } else { m.per_s };
        let _ = writeln!(
            t,
            "{:<14} {:<8} {:>10.1} {:>11.1} {:>10.1} | {:>8.3} {:>8.3} | {:>6.2} / {:>5.2}",
            r.scenario.name,
            metric,
            v(w),
            v(tu),
            v(fa),
            v(w) / v(tu),
            v(w) / v(fa),
            kernel_ceiling(w, tu),
            kernel_ceiling(w, fa),
        );
        if large {
            let _ = writeln!(
                t,
                "{:<14} {:<8} {:>10.1} {:>11.1} {:>10.1} | {:>8.3} {:>8.3} |",
                "",
                "msgs/s",
                w.per_s,
                tu.per_s,
                fa.per_s,
                w.per_s / tu.per_s,
                w.per_s / fa.per_s
            );
        }
    }
    if opts.rounds > 1 {
        let _ = writeln!(
            t,
            "wharf's ratios as each round measured them (lowest - highest), w/tung and w/fast:"
        );
        for r in rows {
            let span = |k| {
                r.round_ratios(k)
                    .map_or("-".into(), |(lo, hi)| format!("{lo:.3} - {hi:.3}"))
            };
            let _ = writeln!(
                t,
                "{:<14} {:>15}   {:>15}",
                r.scenario.name,
                span(Target::Tungstenite),
                span(Target::Fastwebsockets)
            );
        }
    }
    let _ = writeln!(
        t,
        "\n{:<14} {:<11} {:>15} | {:>13} | {:>12} | {:>10} | {:>11} | {:>14} | {:>10}",
        "scenario",
        "server",
        "p50 / p99 µs",
        "srv CPU µs/op",
        "of it kernel",
        "server CPU",
        "loadgen CPU",
        "loadgen sleeps",
        "other load"
    );
    let _ = writeln!(t, "{}", "-".repeat(129));
    for r in rows {
        for (k, target) in TARGETS.into_iter().enumerate() {
            let m = &r.m[k];
            let _ = writeln!(
                t,
                "{:<14} {:<11} {:>15} | {:>13.2} | {:>12.2} | {:>9.0}% | {:>11} | {:>14.3} | {:>9.0}%",
                if k == 0 { r.scenario.name } else { "" },
                target.short(),
                format!("{:.0} / {:.0}", m.p50_us, m.p99_us),
                m.server_us_per_op(),
                m.server_sys_us_per_op(),
                m.server_cpu * 100.0,
                loadgen(m.loadgen_cpu),
                m.loadgen_sleeps_per_op(),
                m.others_server_core * 100.0,
            );
        }
    }
    let _ = writeln!(
        t,
        "other load: CPU share other processes took on the servers' core during the measurement. \
         !: load generator at >= {:.0}% CPU, the figure may be its limit.",
        LOADGEN_SATURATED * 100.0
    );
    let _ = writeln!(
        t,
        "latency: send to complete echo, per message (connect: the whole cycle). MB/s: echoed payload \
         one way, 10^6 B.\nCPU %: process CPU time / wall time while measuring; srv CPU µs/op: server \
         CPU time per echo (connect: per connection); of it kernel: the system time in it.\n\
         loadgen sleeps: times per echo (connect: per connection) the load generator's thread \
         blocked, each ended by a wake-up its waker paid for, mostly the server's replies: on these \
         VMs waking the other core costs the sender kernel time, the more the slower it answers \
         (--busy-loadgen: none).\n\
         ceiling: a baseline's CPU µs/op / wharf's kernel µs/op, the ratio to that baseline a \
         CPU-bound wharf would reach if its own user-space work cost nothing."
    );
    print!("{t}");
    if opts.smoke {
        // Figures from a smoke run are not results.
        return;
    }
    for r in rows {
        let name = r.scenario.name;
        let per = match r.scenario.kind {
            Load::Connect { .. } => "conns_per_s",
            _ => "msgs_per_s",
        };
        let line = |metric: &str, f: &dyn Fn(&Measurement) -> f64| {
            let [w, tu, fa] = r.m.each_ref().map(f);
            println!(
                "RESULT scenario={name} metric={metric} wharf={w:.3} tokio_tungstenite={tu:.3} \
                 fastwebsockets={fa:.3} ratio_tokio_tungstenite={:.4} ratio_fastwebsockets={:.4}",
                w / tu,
                w / fa
            );
        };
        line(per, &|m| m.per_s);
        let spans = (
            r.round_ratios(Target::Tungstenite),
            r.round_ratios(Target::Fastwebsockets),
        );
        if let (Some((tl, th)), Some((fl, fh))) = spans {
            println!(
                "RESULT scenario={name} metric=round_ratios rounds={} \
                 ratio_tokio_tungstenite_min={tl:.4} ratio_tokio_tungstenite_max={th:.4} \
                 ratio_fastwebsockets_min={fl:.4} ratio_fastwebsockets_max={fh:.4}",
                r.rounds.len()
            );
        }
        if is_large(&r.scenario) {
            line("mb_per_s", &|m| m.mb_per_s);
        }
        line("p50_us", &|m| m.p50_us);
        line("p99_us", &|m| m.p99_us);
        line("server_cpu_us_per_op", &|m| m.server_us_per_op());
        line("server_kernel_us_per_op", &|m| m.server_sys_us_per_op());
        let [w, tu, fa] = &r.m;
        println!(
            "RESULT scenario={name} metric=kernel_ceiling tokio_tungstenite={:.4} fastwebsockets={:.4}",
            kernel_ceiling(w, tu),
            kernel_ceiling(w, fa)
        );
        line("server_cpu", &|m| m.server_cpu);
        line("loadgen_cpu", &|m| m.loadgen_cpu);
        line("loadgen_sleeps_per_op", &|m| m.loadgen_sleeps_per_op());
        line("other_load_server_core", &|m| m.others_server_core);
        line("other_load_loadgen_core", &|m| m.others_loadgen_core);
    }
}

/// Load generator CPU share from which a figure is flagged.
const LOADGEN_SATURATED: f64 = 0.85;

fn loadgen(cpu: f64) -> String {
    let flag = if cpu >= LOADGEN_SATURATED { "!" } else { "" };
    format!("{:.0}%{flag}", cpu * 100.0)
}

fn is_large(sc: &Scenario) -> bool {
    matches!(sc.kind, Load::Echo { size, .. } if size >= 64 * 1024)
}

// ---------------------------------------------------------------------------
// Instructions per operation under callgrind: `--instructions`
// ---------------------------------------------------------------------------

/// `--instructions` options.
struct InstrOptions {
    valgrind: String,
    /// Echoes over one connection, for the two runs whose difference counts.
    messages: (u64, u64),
    /// Connections (connect, upgrade, one 32 B echo, close), likewise.
    connections: (u64, u64),
    /// Keep the callgrind output files here (default: a temporary directory).
    keep: Option<PathBuf>,
    /// Leave glibc's `rep stos`/`rep movs` string functions on (see
    /// [`NO_REP_STRINGS`]).
    rep_strings: bool,
    /// `--plugin PATH`: wharf serves this echo component instead of the
    /// bundled one, and only wharf is counted (a language runtime's cost
    /// per message, which timed runs on a busy machine cannot separate).
    plugin: Option<PathBuf>,
    /// `--shared`: wharf serves the echo as a tenant in shared instance
    /// mode (a connection's cost without its instantiation).
    shared: bool,
    /// `--in-place`: wharf resets its pool slots in place.
    in_place: bool,
    /// `--tls`: every load over wss (the files' names end in `-tls`).
    tls: bool,
    /// `--cache-sim`: callgrind also simulates the caches and branch
    /// predictors (as the CPU reports them), and the first-level
    /// instruction-cache misses per operation are reported beside the
    /// instructions: what the code's footprint costs, on machines whose
    /// hardware counters are out of reach.
    cache_sim: bool,
    /// `--workers N`: wharf with N worker threads (`TOKIO_WORKER_THREADS`),
    /// all counted; `--per-core`: each a runtime of its own
    /// (`server.scheduling = "per-core"`), else tokio's multi-thread one.
    workers: usize,
    per_core: bool,
}

impl Default for InstrOptions {
    fn default() -> Self {
        InstrOptions {
            valgrind: "valgrind".into(),
            messages: (1_000, 5_000),
            connections: (50, 250),
            keep: None,
            rep_strings: false,
            plugin: None,
            shared: false,
            in_place: false,
            tls: false,
            cache_sim: false,
            workers: 1,
            per_core: false,
        }
    }
}

/// Instruction counts (valgrind's callgrind, `Ir`) of each server process
/// per echoed message and per connection: every server runs under callgrind
/// twice, for N1 and N2 operations, and the figure is
/// `(I(N2) - I(N1)) / (N2 - N1)`, so start-up, plugin loading and shutdown
/// cancel out. Instruction counts do not depend on other load on the
/// machine; they leave out the kernel (syscalls) and memory stalls.
///
/// The load is closed-loop with one message in flight over one plain `ws`
/// connection, every echo checked. All threads are counted, wharf's epoch
/// ticker too: it costs per second, not per message, and under valgrind it
/// adds a few Ir per message at most.
mod instructions {
    use super::*;

    #[derive(Clone, Copy)]
    enum Load {
        /// Echoes over one connection, one in flight.
        Messages { text: bool, size: usize },
        /// Echoes over one connection, `depth` sent in one write, then
        /// all their echoes read (the pipelined scenario's per-message
        /// path: a read of several frames, one batched plugin call).
        Pipelined {
            text: bool,
            size: usize,
            depth: usize,
        },
        /// Sequential connections: connect, upgrade, one echo, close.
        Connections { size: usize },
    }

    struct Case {
        slug: &'static str,
        name: &'static str,
        load: Load,
    }

    const CASES: &[Case] = &[
        Case {
            slug: "text32",
            name: "echo, 32 B text",
            load: Load::Messages {
                text: true,
                size: 32,
            },
        },
        Case {
            slug: "binary1k",
            name: "echo, 1 KiB binary",
            load: Load::Messages {
                text: false,
                size: 1024,
            },
        },
        Case {
            slug: "text1k",
            name: "echo, 1 KiB text",
            load: Load::Messages {
                text: true,
                size: 1024,
            },
        },
        Case {
            slug: "pipelined1k",
            name: "echo, 1 KiB binary, 16 pipelined",
            load: Load::Pipelined {
                text: false,
                size: 1024,
                depth: 16,
            },
        },
        Case {
            slug: "pipelined1k-text",
            name: "echo, 1 KiB text, 16 pipelined",
            load: Load::Pipelined {
                text: true,
                size: 1024,
                depth: 16,
            },
        },
        Case {
            slug: "binary64k",
            name: "echo, 64 KiB binary",
            load: Load::Messages {
                text: false,
                size: 64 * 1024,
            },
        },
        Case {
            slug: "connection",
            name: "connection (+ one 32 B echo)",
            load: Load::Connections { size: 32 },
        },
    ];

    /// A case's figures per operation, each as wharf's, tokio-tungstenite's
    /// and fastwebsockets'.
    struct Row {
        case: &'static Case,
        /// The two run lengths the per-operation figure is the slope between.
        n: (u64, u64),
        instructions: [f64; 3],
        /// L1 instruction-cache misses (NaN without `--cache-sim`).
        i1_misses: [f64; 3],
    }

    /// Callgrind's count for one server run.
    #[derive(Clone, Copy, Default)]
    struct Counts {
        /// Instructions executed, all threads.
        ir: u64,
        /// First-level instruction-cache misses (`--cache-sim`), all threads.
        i1_misses: u64,
        wall: Duration,
    }

    pub(super) async fn run(opts: &InstrOptions) -> Result<()> {
        let version = std::process::Command::new(&opts.valgrind)
            .arg("--version")
            .output()
            .with_context(|| format!("cannot run {:?} (--valgrind PATH)", opts.valgrind))?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        // A small pool: wharf's pooling allocator reserves address space
        // for max_connections instances, and valgrind needs little of it.
        // (What comes first is in the `[plugin]` table.)
        // With `--shared` the tenant names the plugin: a `[[tenant]]` table
        // beside `plugin.path` is refused. Under valgrind a plugin runs
        // tens of times slower: an interpreter's instantiation would pass
        // the default CPU time per event.
        let limits = "memory_limit = \"256MiB\"\ncpu_time_per_event = \"20s\"\n";
        let mut plugin = match &opts.plugin {
            Some(path) if !opts.shared => {
                format!("path = {:?}\n{limits}", path.display().to_string())
            }
            Some(_) => limits.to_owned(),
            None => String::new(),
        };
        if opts.in_place {
            plugin.push_str(tenant::IN_PLACE);
        }
        let tenant = if opts.shared {
            tenant::shared_echo(opts.plugin.as_deref())
        } else {
            String::new()
        };
        let setup = Setup::new(
            Pinning {
                server: None,
                loadgen: None,
            },
            &format!(
                "{plugin}[server]\nmax_connections = 8\n{scheduling}{tenant}",
                scheduling = if opts.per_core {
                    "scheduling = \"per-core\"\n"
                } else {
                    ""
                }
            ),
        )?;
        // Another plugin: wharf alone (the baselines' counts do not change).
        let targets: &[Target] = if opts.plugin.is_some() {
            &TARGETS[..1]
        } else {
            &TARGETS
        };
        let out_dir = match &opts.keep {
            Some(d) => d.clone(),
            None => setup.dir.path().join("callgrind"),
        };
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("create {}", out_dir.display()))?;
        println!(
            "instructions: {version}, wharf with TOKIO_WORKER_THREADS={}{}, callgrind output in {}",
            opts.workers,
            if opts.per_core { " per core" } else { "" },
            out_dir.display()
        );
        // Valgrind's CPUID differs from the host's, so wharf compiles the
        // plugin again under it: do that once, outside every count.
        let started = Instant::now();
        let warm = setup
            .start_with(Target::Wharf, &valgrind(opts, "none", None))
            .await?;
        warm.terminate(VALGRIND_EXIT).await?;
        println!(
            "wharf compiled the plugin under valgrind in {:.1?}",
            started.elapsed()
        );

        let mut rows: Vec<Row> = Vec::new();
        for case in CASES {
            let (n1, n2) = match case.load {
                Load::Messages { .. } | Load::Pipelined { .. } => opts.messages,
                Load::Connections { .. } => opts.connections,
            };
            let mut per_op = [f64::NAN; 3];
            let mut i1_per_op = [f64::NAN; 3];
            for &target in targets {
                let mut counts = [Counts::default(); 2];
                for (j, n) in [n1, n2].into_iter().enumerate() {
                    let slug = if opts.tls {
                        format!("{}-tls", case.slug)
                    } else {
                        case.slug.to_owned()
                    };
                    let file = out_dir.join(format!("{}-{slug}-{n}.out", target.name()));
                    for old in outputs(&file)? {
                        std::fs::remove_file(old)?;
                    }
                    let c = measure(&setup, opts, target, case, n, &file)
                        .await
                        .with_context(|| format!("{} against {}", case.name, target.name()))?;
                    println!(
                        "  {:<30} {:<17} n={n:<6} {:>14} Ir in {:.1?}",
                        case.name,
                        target.name(),
                        c.ir,
                        c.wall
                    );
                    counts[j] = c;
                }
                let per = |e: fn(&Counts) -> u64| {
                    (e(&counts[1]) as f64 - e(&counts[0]) as f64) / (n2 - n1) as f64
                };
                per_op[target.index()] = per(|c| c.ir);
                i1_per_op[target.index()] = per(|c| c.i1_misses);
            }
            rows.push(Row {
                case,
                n: (n1, n2),
                instructions: per_op,
                i1_misses: i1_per_op,
            });
        }

        let table = |title: &str, digits: usize, column: fn(&Row) -> [f64; 3]| {
            println!("\n{title}: (I(N2) - I(N1)) / (N2 - N1)");
            println!(
                "{:<30} {:>12} {:>10} {:>11} {:>10} {:>8} {:>8}",
                "operation", "N1/N2", "wharf", "tungstenite", "fastws", "w/tung", "w/fast"
            );
            println!("{}", "-".repeat(95));
            for row in &rows {
                let (n1, n2) = row.n;
                let [w, tu, fa] = column(row);
                println!(
                    "{:<30} {:>12} {:>10.digits$} {:>11.digits$} {:>10.digits$} {:>8.2} {:>8.2}",
                    row.case.name,
                    format!("{n1}/{n2}"),
                    w,
                    tu,
                    fa,
                    w / tu,
                    w / fa
                );
            }
        };
        table(
            "Instructions per operation (callgrind Ir, whole server process, user space only)",
            0,
            |row| row.instructions,
        );
        if opts.cache_sim {
            table(
                "L1 instruction-cache misses per operation (callgrind --cache-sim, simulated)",
                1,
                |row| row.i1_misses,
            );
        }
        println!(
            "load: one connection, one message in flight, every echo checked; \
             connection: connect + upgrade + instantiate + one echo + closing handshake, sequentially"
        );
        if opts.rep_strings {
            println!(
                "--rep-strings: glibc's memset/memcpy may use rep stosb/movsb, which callgrind counts per byte"
            );
        } else {
            println!(
                "glibc's memset/memcpy kept off rep stosb/movsb (GLIBC_TUNABLES), which callgrind would count per byte"
            );
        }
        for row in &rows {
            let [w, tu, fa] = row.instructions;
            println!(
                "RESULT instructions op={} wharf={w:.1} tokio_tungstenite={tu:.1} fastwebsockets={fa:.1} \
                 ratio_tokio_tungstenite={:.4} ratio_fastwebsockets={:.4}",
                row.case.slug,
                w / tu,
                w / fa
            );
        }
        Ok(())
    }

    /// glibc tunables that keep memset/memcpy off `rep stosb`/`rep movsb`:
    /// valgrind counts every byte such an instruction stores as one
    /// instruction, so tungstenite's zeroing of its read buffer before
    /// every read (16 KiB in the baseline, twice per echo) would count
    /// ~32,000 Ir per message, though it costs far fewer cycles. With
    /// these, memset and memcpy use their vector loops at any size, which
    /// callgrind counts like the CPU executes them.
    const NO_REP_STRINGS: &str = "GLIBC_TUNABLES=glibc.cpu.x86_rep_stosb_threshold=0x7fffffffffffffff:\
                                  glibc.cpu.x86_rep_movsb_threshold=0x7fffffffffffffff";

    fn valgrind(opts: &InstrOptions, tool: &str, out: Option<&std::path::Path>) -> Vec<String> {
        // The servers start with one worker (see `loadgen`); `env` sets
        // wharf's count here (the baselines' runtimes ignore it).
        let mut v = vec![
            "env".to_owned(),
            format!("TOKIO_WORKER_THREADS={}", opts.workers),
        ];
        if !opts.rep_strings {
            v.push(NO_REP_STRINGS.to_owned());
        }
        v.extend([
            opts.valgrind.clone(),
            format!("--tool={tool}"),
            // wasmtime's compiled code is written to anonymous memory.
            "--smc-check=all-non-file".into(),
        ]);
        if opts.cache_sim && tool == "callgrind" {
            v.extend(["--cache-sim=yes".into(), "--branch-sim=yes".into()]);
        }
        if let Some(out) = out {
            v.push(format!("--callgrind-out-file={}", out.display()));
        }
        v
    }

    /// One server run under callgrind with `n` operations.
    async fn measure(
        setup: &Setup,
        opts: &InstrOptions,
        target: Target,
        case: &Case,
        n: u64,
        file: &std::path::Path,
    ) -> Result<Counts> {
        let started = Instant::now();
        let server = setup
            .start_with(target, &valgrind(opts, "callgrind", Some(file)))
            .await?;
        let driven = match (opts.tls, server.wss) {
            (false, _) => drive(case.load, n, || tcp(server.ws)).await,
            (true, Some(wss)) => drive(case.load, n, || tls(wss, &setup.client_tls)).await,
            (true, None) => Err(anyhow!("{} has no wss listener", target.name())),
        };
        if let Err(e) = driven {
            let tail = server.log_tail();
            let _ = server.terminate(VALGRIND_EXIT).await;
            return Err(e.context(format!("server log tail:\n{tail}")));
        }
        // Let the server finish with the last connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.terminate(VALGRIND_EXIT).await?;
        let wall = started.elapsed();
        let mut counts = Counts {
            wall,
            ..Counts::default()
        };
        let files = outputs(file)?;
        ensure!(!files.is_empty(), "callgrind wrote no {}*", file.display());
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("read {}", f.display()))?;
            if text.is_empty() {
                continue;
            }
            // The totals line has one column per event the header names
            // (`events: Ir` alone, or `Ir Dr Dw I1mr ...` with the cache
            // simulation).
            let events: Vec<&str> = text
                .lines()
                .find_map(|l| l.strip_prefix("events:"))
                .map(|v| v.split_whitespace().collect())
                .unwrap_or_else(|| vec!["Ir"]);
            let total = |key: &str, event: &str| {
                let column = events.iter().position(|e| *e == event)?;
                text.lines()
                    .rev()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().nth(column))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let event = |event| total("totals:", event).or_else(|| total("summary:", event));
            counts.ir += event("Ir").with_context(|| format!("no totals in {}", f.display()))?;
            counts.i1_misses += event("I1mr").unwrap_or(0);
        }
        Ok(counts)
    }

    /// How long a server under valgrind may take to write its output and
    /// exit on SIGTERM.
    const VALGRIND_EXIT: Duration = Duration::from_secs(300);

    /// Callgrind's files for `file`: `file` itself and, with
    /// `--separate-threads=yes` or dumps, `file-01`, `file-02`, ...
    fn outputs(file: &std::path::Path) -> Result<Vec<PathBuf>> {
        let dir = file.parent().context("output directory")?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("output name")?;
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if n == name || n.strip_prefix(name).is_some_and(|r| r.starts_with('-')) {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Runs `n` operations of `load` over connections `connect` opens,
    /// every echo checked.
    async fn drive<S, F>(load: Load, n: u64, connect: impl Fn() -> F) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
        F: std::future::Future<Output = Result<S>>,
    {
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes());
        match load {
            Load::Messages { text, size } => {
                let msgs = messages(0, text, size, 8);
                let mut c = Conn::new(connect().await?, 2 * size + 16384);
                c.handshake(&accept).await?;
                for i in 0..n {
                    let m = &msgs[i as usize % msgs.len()];
                    c.send(&m.frame).await?;
                    echo(&mut c, m)
                        .await
                        .with_context(|| format!("message {i}"))?;
                }
                c.close([9, 8, 7, 6]).await?;
                c.expect_eof().await?;
            }
            Load::Pipelined { text, size, depth } => {
                let msgs = messages(0, text, size, depth);
                let batch: Vec<u8> = msgs.iter().flat_map(|m| m.frame.clone()).collect();
                let mut c = Conn::new(connect().await?, 2 * batch.len() + 16384);
                c.handshake(&accept).await?;
                // n messages in batches of depth: the runs' difference
                // stays a multiple of depth (1000 and 5000 messages: 62
                // and 312 batches, 4000 messages apart).
                for b in 0..n / depth as u64 {
                    c.send(&batch).await?;
                    for m in &msgs {
                        echo(&mut c, m)
                            .await
                            .with_context(|| format!("batch {b}"))?;
                    }
                }
                c.close([9, 8, 7, 6]).await?;
                c.expect_eof().await?;
            }
            Load::Connections { size } => {
                let msg = messages(0, true, size, 1).remove(0);
                for i in 0..n {
                    let what = || format!("connection {i}");
                    let mut c = Conn::new(connect().await?, 1024);
                    c.handshake(&accept).await.with_context(what)?;
                    c.send(&msg.frame).await.with_context(what)?;
                    echo(&mut c, &msg).await.with_context(what)?;
                    c.close([4, 3, 2, 1]).await.with_context(what)?;
                    c.expect_eof().await.with_context(what)?;
                }
            }
        }
        Ok(())
    }

    /// Reads one echo (a single frame: neither server fragments here) and
    /// checks it byte for byte.
    async fn echo<S: AsyncRead + AsyncWrite + Unpin>(c: &mut Conn<S>, m: &Msg) -> Result<()> {
        let (fin, op, p) = c.next_frame().await?;
        let got = &c.buf[p];
        ensure!(
            fin && op == m.opcode && got == &m.payload[..],
            "ECHO MISMATCH: sent {} B opcode {}, got {} B opcode {op} fin {fin}",
            m.payload.len(),
            m.opcode,
            got.len()
        );
        Ok(())
    }
}

// The baseline servers: `--serve-baseline NAME [--cert PEM --key PEM]`.
#[path = "common/allocator.rs"]
mod allocator;
#[path = "common/baseline.rs"]
mod baseline;
