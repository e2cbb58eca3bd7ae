//! Echo throughput and latency: `wharf serve` with the bundled echo plugin
//! against two native echo servers built into this binary, tokio-tungstenite
//! (every decodable message fed, one flush per batch) and fastwebsockets
//! (behind hyper's upgrade, as its examples do), under identical load, in
//! one run.
//!
//! ```text
//! cargo bench --bench echo -- [--quick] [--scenario NAME]... [--duration SECS] [--warmup SECS] [--rounds N] [--shared]
//! ```
//!
//! `--shared` serves the echo plugin as a tenant in shared instance mode
//! (one instance for every connection, so no instantiation per connection).
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
//! each one's best run. Every figure is also printed as a `RESULT` line.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Long-lived connections echoing messages in a closed loop.
    Echo {
        text: bool,
        size: usize,
        connections: usize,
        in_flight: usize,
    },
    /// Short-lived connections: connect, upgrade, one echo, close.
    Connect { connectors: usize, size: usize },
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    tls: bool,
    kind: Kind,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "small",
        tls: false,
        kind: Kind::Echo {
            text: true,
            size: 32,
            connections: 100,
            in_flight: 1,
        },
    },
    Scenario {
        name: "pipelined",
        tls: false,
        kind: Kind::Echo {
            text: false,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    },
    Scenario {
        name: "large",
        tls: false,
        kind: Kind::Echo {
            text: false,
            size: 64 * 1024,
            connections: 10,
            in_flight: 1,
        },
    },
    Scenario {
        name: "small-tls",
        tls: true,
        kind: Kind::Echo {
            text: true,
            size: 32,
            connections: 100,
            in_flight: 1,
        },
    },
    Scenario {
        name: "pipelined-tls",
        tls: true,
        kind: Kind::Echo {
            text: false,
            size: 1024,
            connections: 100,
            in_flight: 16,
        },
    },
    Scenario {
        name: "large-tls",
        tls: true,
        kind: Kind::Echo {
            text: false,
            size: 64 * 1024,
            connections: 10,
            in_flight: 1,
        },
    },
    Scenario {
        name: "connect",
        tls: false,
        kind: Kind::Connect {
            connectors: 50,
            size: 32,
        },
    },
];

impl Scenario {
    fn describe(&self) -> String {
        let proto = if self.tls { "wss" } else { "ws" };
        match self.kind {
            Kind::Echo {
                text,
                size,
                connections,
                in_flight,
            } => format!(
                "{proto}, {} B {}, {connections} connections x {in_flight} in flight",
                size,
                if text { "text" } else { "binary" }
            ),
            Kind::Connect { connectors, size } => format!(
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
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--shared" => shared = true,
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
            "--keep" => {
                let v = it.next().context("--keep needs a directory")?;
                instructions.get_or_insert_with(InstrOptions::default).keep = Some(v.into());
            }
            // Passed by `cargo bench` to harness-less benches.
            "--bench" => {}
            other => bail!(
                "unknown argument {other:?}; options: --quick, --scenario NAME, --duration SECS, --warmup SECS, --rounds N, \
                 --instructions [--messages N1,N2] [--connections M1,M2] [--valgrind PATH] [--keep DIR] [--rep-strings]"
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
        instructions,
        shared,
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
    let unpinned = Pinning {
        server: None,
        loadgen: None,
    };
    let pinning = if options.smoke || options.instructions.is_some() {
        unpinned
    } else {
        Pinning::choose()?
    };
    if let Some(core) = pinning.loadgen {
        pin_current_thread(core).context("cannot pin the load generator")?;
    }
    // One thread: the load generator is pinned to one core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
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
// Core pinning
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Pinning {
    server: Option<usize>,
    loadgen: Option<usize>,
}

impl Pinning {
    fn choose() -> Result<Self> {
        let cpus = allowed_cpus()?;
        if cpus.len() < 2 {
            eprintln!("warning: only {cpus:?} allowed; running without core pinning");
            return Ok(Pinning {
                server: None,
                loadgen: None,
            });
        }
        Ok(Pinning {
            server: Some(cpus[0]),
            loadgen: Some(cpus[1]),
        })
    }
}

fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

fn cpu_set(core: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        set
    }
}

/// Pins the calling thread (and the threads it creates later).
fn pin_current_thread(core: usize) -> std::io::Result<()> {
    let set = cpu_set(core);
    // SAFETY: a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `Cpus_allowed_list` of a process, as the kernel sees it.
fn cpus_allowed_list(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------
// CPU accounting
// ---------------------------------------------------------------------------

/// This process's user + system CPU time.
fn self_cpu() -> Duration {
    // SAFETY: rusage is plain data; getrusage fills it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Busy (non-idle, non-iowait) and total jiffies per CPU, from /proc/stat.
fn core_busy() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let mut cores = Vec::new();
    for line in stat.lines() {
        let Some(rest) = line.strip_prefix("cpu") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let Some(Ok(n)) = fields.next().map(str::parse::<usize>) else {
            continue; // the "cpu" total line
        };
        let v: Vec<u64> = fields.map(|f| f.parse().unwrap_or(0)).collect();
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        if cores.len() <= n {
            cores.resize(n + 1, (0, 0));
        }
        cores[n] = (total - idle, total);
    }
    cores
}

/// Share of a core's time used by processes other than `ours` between two
/// /proc/stat samples.
fn others(core: &Option<usize>, a: &[(u64, u64)], b: &[(u64, u64)], ours: Duration) -> f64 {
    let Some(c) = *core else { return f64::NAN };
    let (Some(&(busy0, total0)), Some(&(busy1, total1))) = (a.get(c), b.get(c)) else {
        return f64::NAN;
    };
    let total = total1.saturating_sub(total0) as f64;
    if total == 0.0 {
        return f64::NAN;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let busy = busy1.saturating_sub(busy0) as f64;
    ((busy - ours.as_secs_f64() * hz) / total).clamp(0.0, 1.0)
}

/// A child's user + system CPU time (all its threads), from /proc/PID/stat:
/// (user + system, system).
fn process_cpu(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let (user, sys) = (ticks(11), ticks(12)); // utime, stime (fields 14 and 15)
    let time = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
    (time(user + sys), time(sys))
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
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("generate self-signed certificate")?;
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).context("write cert")?;
        std::fs::write(&key, ck.signing_key.serialize_pem()).context("write key")?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).context("trust cert")?;
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
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
            client_tls: Arc::new(client),
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
        cmd.env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).context("server log file")?)
            .kill_on_drop(true);
        let core = self.pinning.server;
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Die with the bench, even if it is killed without unwinding.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(core) = core {
                    let set = cpu_set(core);
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {} server", target.name()))?;
        let pid = child.id().context("server pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("server stdout")?).lines();
        let (mut ws, mut wss) = (None, None);
        // Generous: the first wharf start compiles the plugin on one core.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while ws.is_none() || wss.is_none() {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .map_err(|_| anyhow!("{} did not print its listeners", target.name()))?
                .context("read server stdout")?;
            let Some(line) = line else {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "{} server exited before listening; its log:\n{text}",
                    target.name()
                );
            };
            if let Some(a) = line.strip_prefix("listening on wss://") {
                wss = Some(a.trim().parse::<SocketAddr>().context("wss address")?);
            } else if let Some(a) = line.strip_prefix("listening on ws://") {
                ws = Some(a.trim().parse::<SocketAddr>().context("ws address")?);
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::task::spawn_local(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(ServerProc {
            target,
            child,
            pid,
            ws: ws.unwrap_or_else(|| unreachable!()),
            wss: wss.unwrap_or_else(|| unreachable!()),
            log,
        })
    }
}

struct ServerProc {
    target: Target,
    child: Child,
    pid: u32,
    ws: SocketAddr,
    wss: SocketAddr,
    log: PathBuf,
}

impl ServerProc {
    /// Fails, with the server's log, if it exited before we stopped it.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!(
                "{} server died during the run ({status}); its log:\n{text}",
                self.target.name()
            );
        }
        Ok(())
    }

    async fn stop(mut self) -> Result<()> {
        self.check_alive()?;
        self.child.kill().await.context("kill server")?;
        Ok(())
    }

    /// Stops the server with SIGTERM (so valgrind writes its output) and
    /// waits for it to exit.
    async fn terminate(mut self) -> Result<()> {
        self.check_alive()?;
        // SAFETY: kill has no memory-safety preconditions; pid is our child's.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(300), self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit on SIGTERM", self.target.name()))?
            .context("wait for server")?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

// ---------------------------------------------------------------------------
// RFC 6455 client side: encoding, parsing, handshake
// ---------------------------------------------------------------------------

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A client frame (FIN set, masked with `mask`).
fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    f
}

fn close_frame(mask: [u8; 4]) -> Vec<u8> {
    encode_frame(OP_CLOSE, &1000u16.to_be_bytes(), mask)
}

/// One message a connection sends, encoded once.
struct Msg {
    opcode: u8,
    payload: Vec<u8>,
    frame: Vec<u8>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Distinct messages for connection `conn`: text is printable ASCII naming
/// the connection and variant; binary is pseudo-random bytes.
fn messages(conn: usize, text: bool, size: usize, variants: usize) -> Vec<Msg> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((conn as u64 + 1) << 20));
    (0..variants)
        .map(|v| {
            let payload: Vec<u8> = if text {
                let mut s = format!("c{conn}v{v}:");
                while s.len() < size {
                    s.push((b'a' + (rng.next() % 26) as u8) as char);
                }
                s.truncate(size);
                s.into_bytes()
            } else {
                (0..size).map(|_| rng.next() as u8).collect()
            };
            let m = rng.next().to_le_bytes();
            let mask = [m[0], m[1], m[2], m[3] | 1];
            let opcode = if text { OP_TEXT } else { OP_BINARY };
            Msg {
                opcode,
                frame: encode_frame(opcode, &payload, mask),
                payload,
            }
        })
        .collect()
}

/// A frame header parsed from the receive buffer; the payload is
/// `buf[payload_start..payload_start + payload_len]`.
struct FrameHead {
    fin: bool,
    opcode: u8,
    payload_start: usize,
    payload_len: usize,
}

/// Parses a server frame at the start of `buf`: `Ok(None)` if more bytes
/// are needed (`need` says how many in total, when known).
fn parse_head(buf: &[u8], need: &mut usize) -> Result<Option<FrameHead>> {
    if buf.len() < 2 {
        *need = 2;
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    ensure!(b0 & 0x70 == 0, "server frame with RSV bits set: {b0:#04x}");
    ensure!(b1 & 0x80 == 0, "server frame is masked");
    let (len, head) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                *need = 4;
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                *need = 10;
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            ensure!(len < 1 << 32, "server frame length {len} is absurd");
            (len as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < head + len {
        *need = head + len;
        return Ok(None);
    }
    Ok(Some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0F,
        payload_start: head,
        payload_len: len,
    }))
}

/// A stream with a receive buffer.
struct Conn<S> {
    s: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(s: S, capacity: usize) -> Self {
        Conn {
            s,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes, making room for at least `want` buffered bytes.
    async fn fill(&mut self, want: usize) -> Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let free = self.buf.len() - self.end;
        if free < 4096 || self.start + want > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if want > self.buf.len() {
            self.buf.resize(want.next_power_of_two(), 0);
        }
        let n = self
            .s
            .read(&mut self.buf[self.end..])
            .await
            .context("read from server")?;
        ensure!(n > 0, "server closed the connection (EOF)");
        self.end += n;
        Ok(())
    }

    /// Next complete frame (reading as needed); its payload is in
    /// `self.buf[payload]` until the next call.
    async fn next_frame(&mut self) -> Result<(bool, u8, std::ops::Range<usize>)> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            let mut need = 0;
            parse_head(self.data(), &mut need)?;
            self.fill(need).await?;
        }
    }

    /// A complete buffered frame, if any.
    fn try_frame(&mut self) -> Result<Option<(bool, u8, std::ops::Range<usize>)>> {
        let mut need = 0;
        match parse_head(self.data(), &mut need)? {
            Some(h) => {
                let p = self.start + h.payload_start;
                self.start = p + h.payload_len;
                Ok(Some((h.fin, h.opcode, p..p + h.payload_len)))
            }
            None => Ok(None),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes).await.context("write to server")?;
        self.s.flush().await.context("flush to server")?;
        Ok(())
    }

    /// HTTP/1.1 upgrade; checks the 101 and the accept key.
    async fn handshake(&mut self, accept: &str) -> Result<()> {
        let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        self.send(request.as_bytes()).await?;
        let head_len = loop {
            if let Some(i) = self.data().windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ensure!(self.end - self.start < 16384, "upgrade response too long");
            self.fill(self.end - self.start + 1)
                .await
                .context("read upgrade response")?;
        };
        let head = String::from_utf8_lossy(&self.data()[..head_len]).into_owned();
        self.start += head_len;
        ensure!(
            head.starts_with("HTTP/1.1 101"),
            "upgrade refused: {}",
            head.lines().next().unwrap_or("")
        );
        let ok = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
            })
        });
        ensure!(
            ok,
            "upgrade response without the right Sec-WebSocket-Accept:\n{head}"
        );
        Ok(())
    }

    /// Sends Close 1000 and reads until the server's Close, which must
    /// carry 1000 (or no code).
    async fn close(&mut self, mask: [u8; 4]) -> Result<()> {
        self.send(&close_frame(mask)).await?;
        loop {
            let (_, op, p) = self.next_frame().await.context("waiting for Close")?;
            match op {
                OP_CLOSE => {
                    let body = &self.buf[p];
                    if body.len() >= 2 {
                        let code = u16::from_be_bytes([body[0], body[1]]);
                        ensure!(
                            code == 1000,
                            "server answered Close 1000 with {code} {:?}",
                            String::from_utf8_lossy(&body[2..])
                        );
                    }
                    return Ok(());
                }
                OP_PING | OP_PONG => {}
                op => bail!("data frame (opcode {op}) after our Close"),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Waits for the server to close the connection (after the closing
    /// handshake), so its side of the connection is finished.
    async fn expect_eof(&mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(60), self.s.read(&mut byte))
            .await
            .map_err(|_| anyhow!("server did not close the connection after Close"))?
            .context("read after Close")?;
        ensure!(n == 0, "data after the closing handshake");
        Ok(())
    }
}

async fn tcp(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

async fn tls(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let s = tcp(addr).await?;
    let name = ServerName::try_from("localhost").context("server name")?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, s)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))
}

// ---------------------------------------------------------------------------
// Load generation
// ---------------------------------------------------------------------------

/// Shared by the load tasks (one thread: plain cells).
#[derive(Default)]
struct Phase {
    measuring: Cell<bool>,
    stop: Cell<bool>,
}

/// What one task measured.
#[derive(Default)]
struct Tally {
    /// Echoes completed (and checked) at any time, warm-up and stop included.
    completed: u64,
    messages: u64,
    bytes: u64,
    /// Round-trip times in nanoseconds, of messages completed while measuring.
    latencies: Vec<u64>,
}

/// One echo connection: keeps `in_flight` messages outstanding, checks every
/// echo byte for byte, in order.
async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(
    mut c: Conn<S>,
    msgs: Vec<Msg>,
    in_flight: usize,
    phase: Rc<Phase>,
    id: usize,
) -> Result<Tally> {
    let mut tally = Tally::default();
    // (variant, sent at) of each outstanding message, oldest first.
    let mut pending: VecDeque<(usize, Instant)> = VecDeque::with_capacity(in_flight);
    let mut next_variant = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(in_flight * msgs[0].frame.len() + 256);
    // Offset into the expected payload of the message being received.
    let mut offset: Option<usize> = None;

    let now = Instant::now();
    for _ in 0..in_flight {
        out.extend_from_slice(&msgs[next_variant].frame);
        pending.push_back((next_variant, now));
        next_variant = (next_variant + 1) % msgs.len();
    }
    c.send(&out).await?;
    out.clear();

    while !pending.is_empty() {
        let mut completed = 0usize;
        // Everything buffered, then read more only if nothing completed.
        loop {
            let frame = if completed == 0 {
                Some(c.next_frame().await?)
            } else {
                c.try_frame()?
            };
            let Some((fin, op, p)) = frame else { break };
            match op {
                OP_TEXT | OP_BINARY | OP_CONT => {
                    let &(variant, sent) = pending.front().with_context(|| {
                        format!("connection {id}: echo of a message never sent")
                    })?;
                    let want = &msgs[variant];
                    let off = match (op, offset) {
                        (OP_CONT, Some(off)) => off,
                        (OP_CONT, None) => {
                            bail!("connection {id}: continuation frame outside a message")
                        }
                        (_, Some(_)) => {
                            bail!("connection {id}: new message inside a fragmented one")
                        }
                        (op, None) => {
                            ensure!(
                                op == want.opcode,
                                "connection {id}: echo has opcode {op}, sent {}",
                                want.opcode
                            );
                            0
                        }
                    };
                    let got = &c.buf[p];
                    let end = off + got.len();
                    if end > want.payload.len() || got != &want.payload[off..end] {
                        let at = got
                            .iter()
                            .zip(&want.payload[off.min(want.payload.len())..])
                            .position(|(a, b)| a != b)
                            .map_or(String::from("length"), |i| format!("byte {}", off + i));
                        bail!(
                            "connection {id}: ECHO MISMATCH at {at} of a {}-byte message (frame covers bytes {off}..{end})",
                            want.payload.len()
                        );
                    }
                    if !fin {
                        offset = Some(end);
                        continue;
                    }
                    ensure!(
                        end == want.payload.len(),
                        "connection {id}: echo is {end} bytes, sent {}",
                        want.payload.len()
                    );
                    offset = None;
                    pending.pop_front();
                    completed += 1;
                    tally.completed += 1;
                    if phase.measuring.get() {
                        tally.messages += 1;
                        tally.bytes += end as u64;
                        tally.latencies.push(sent.elapsed().as_nanos() as u64);
                    }
                }
                OP_PING => {
                    let body = c.buf[p].to_vec();
                    out.extend_from_slice(&encode_frame(OP_PONG, &body, [1, 2, 3, 4]));
                }
                OP_PONG => {}
                OP_CLOSE => {
                    let body = &c.buf[p];
                    let code = (body.len() >= 2).then(|| u16::from_be_bytes([body[0], body[1]]));
                    bail!(
                        "connection {id}: server closed unexpectedly: code {code:?} reason {:?}",
                        String::from_utf8_lossy(body.get(2..).unwrap_or_default())
                    );
                }
                op => bail!("connection {id}: unknown opcode {op}"),
            }
        }
        if !phase.stop.get() {
            let now = Instant::now();
            for _ in 0..completed {
                out.extend_from_slice(&msgs[next_variant].frame);
                pending.push_back((next_variant, now));
                next_variant = (next_variant + 1) % msgs.len();
            }
        }
        if !out.is_empty() {
            c.send(&out).await?;
            out.clear();
        }
    }
    c.close([9, 8, 7, 6])
        .await
        .with_context(|| format!("connection {id}: closing handshake"))?;
    Ok(tally)
}

/// One connector: connect, upgrade, one echo, closing handshake, repeat.
async fn connector(
    addr: SocketAddr,
    msg: Rc<Msg>,
    accept: Rc<str>,
    phase: Rc<Phase>,
    id: usize,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let mut cycle = 0u64;
    while !phase.stop.get() {
        let started = Instant::now();
        let mut c = Conn::new(tcp(addr).await?, 1024);
        let what = || format!("connector {id}, connection {cycle}");
        c.handshake(&accept).await.with_context(what)?;
        c.send(&msg.frame).await.with_context(what)?;
        let (fin, op, p) = c.next_frame().await.with_context(what)?;
        let got = &c.buf[p];
        ensure!(
            fin && op == msg.opcode && got == &msg.payload[..],
            "{}: ECHO MISMATCH: sent {:?}, got opcode {op} fin {fin} payload {:?}",
            what(),
            String::from_utf8_lossy(&msg.payload),
            String::from_utf8_lossy(got)
        );
        c.close([4, 3, 2, 1]).await.with_context(what)?;
        drop(c);
        cycle += 1;
        tally.completed += 1;
        if phase.measuring.get() {
            tally.messages += 1;
            tally.bytes += msg.payload.len() as u64;
            tally.latencies.push(started.elapsed().as_nanos() as u64);
        }
    }
    Ok(tally)
}

/// What one scenario measured against one server.
#[derive(Clone, Debug, Default)]
struct Measurement {
    per_s: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    loadgen_cpu: f64,
    server_cpu: f64,
    /// The part of `server_cpu` spent in the kernel (system time).
    server_sys: f64,
    /// CPU time of everything else on the server's / load generator's core,
    /// as a fraction of the wall time (other builds on a busy machine).
    others_server_core: f64,
    others_loadgen_core: f64,
    count: u64,
}

impl Measurement {
    /// Server CPU time per echo (or per connection), in µs.
    fn server_us_per_op(&self) -> f64 {
        self.server_cpu / self.per_s * 1e6
    }

    /// The kernel's part of [`server_us_per_op`](Self::server_us_per_op).
    fn server_sys_us_per_op(&self) -> f64 {
        self.server_sys / self.per_s * 1e6
    }
}

/// The best wharf/baseline rate a CPU-bound wharf could reach if its own
/// user-space work cost nothing: the baseline's CPU per op over the kernel
/// time wharf spends per op.
fn kernel_ceiling(w: &Measurement, b: &Measurement) -> f64 {
    b.server_us_per_op() / w.server_sys_us_per_op()
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

async fn run_scenario(
    sc: &Scenario,
    server: &ServerProc,
    setup: &Setup,
    opts: &Options,
) -> Result<Measurement> {
    let phase = Rc::new(Phase::default());
    let addr = if sc.tls { server.wss } else { server.ws };
    let accept: Rc<str> =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes()).into();
    let mut tasks = Vec::new();
    match sc.kind {
        Kind::Echo {
            text,
            size,
            connections,
            in_flight,
        } => {
            // Open every connection before the clock starts.
            enum Opened {
                Plain(Conn<TcpStream>),
                Tls(Box<Conn<tokio_rustls::client::TlsStream<TcpStream>>>),
            }
            let mut opening = Vec::new();
            for _ in 0..connections {
                let accept = accept.clone();
                let tls_config = setup.client_tls.clone();
                let capacity = (size + 14) * in_flight.max(2) + 16384;
                let want_tls = sc.tls;
                opening.push(tokio::task::spawn_local(async move {
                    if want_tls {
                        let mut c = Conn::new(tls(addr, &tls_config).await?, capacity);
                        c.handshake(&accept).await?;
                        Ok::<_, anyhow::Error>(Opened::Tls(Box::new(c)))
                    } else {
                        let mut c = Conn::new(tcp(addr).await?, capacity);
                        c.handshake(&accept).await?;
                        Ok(Opened::Plain(c))
                    }
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            for (id, handle) in opening.into_iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                let conn = tokio::time::timeout(left, handle)
                    .await
                    .map_err(|_| anyhow!("opening {connections} connections took over 30 s"))?
                    .context("opening task panicked")?
                    .with_context(|| format!("open connection {id} to {addr}"))?;
                let msgs = messages(id, text, size, in_flight + 1);
                let phase = phase.clone();
                tasks.push(match conn {
                    Opened::Plain(c) => {
                        tokio::task::spawn_local(echo_conn(c, msgs, in_flight, phase, id))
                    }
                    Opened::Tls(c) => {
                        tokio::task::spawn_local(echo_conn(*c, msgs, in_flight, phase, id))
                    }
                });
            }
        }
        Kind::Connect { connectors, size } => {
            let msg = Rc::new(messages(0, true, size, 1).remove(0));
            for id in 0..connectors {
                tasks.push(tokio::task::spawn_local(connector(
                    addr,
                    msg.clone(),
                    accept.clone(),
                    phase.clone(),
                    id,
                )));
            }
        }
    }

    // Load tasks only end early on error; then stop sleeping and report it.
    sleep_checking(opts.warmup, &tasks).await;
    let cores0 = core_busy();
    let (cpu0, (srv0, sys0), t0) = (self_cpu(), process_cpu(server.pid), Instant::now());
    phase.measuring.set(true);
    sleep_checking(opts.duration, &tasks).await;
    phase.measuring.set(false);
    let (cpu1, (srv1, sys1), t1) = (self_cpu(), process_cpu(server.pid), Instant::now());
    let cores1 = core_busy();
    phase.stop.set(true);

    let mut total = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    for (id, t) in tasks.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let tally = tokio::time::timeout(left, t)
            .await
            .map_err(|_| {
                anyhow!("task {id} did not finish within 30 s of the stop (server stalled?)")
            })?
            .context("load task panicked")?
            .with_context(|| format!("{} against {}", sc.name, server.target.name()))?;
        total.completed += tally.completed;
        total.messages += tally.messages;
        total.bytes += tally.bytes;
        total.latencies.extend(tally.latencies);
    }
    // The smoke run's measuring window is short enough for a loaded
    // machine to complete nothing in it; every echo was still checked.
    let done = if opts.smoke {
        total.completed
    } else {
        total.messages
    };
    ensure!(
        done > 0,
        "{}: nothing completed while measuring against {}",
        sc.name,
        server.target.name()
    );
    let wall = (t1 - t0).as_secs_f64();
    total.latencies.sort_unstable();
    Ok(Measurement {
        per_s: total.messages as f64 / wall,
        mb_per_s: total.bytes as f64 / wall / 1e6,
        p50_us: percentile(&total.latencies, 0.50),
        p99_us: percentile(&total.latencies, 0.99),
        loadgen_cpu: (cpu1 - cpu0).as_secs_f64() / wall,
        server_cpu: srv1.saturating_sub(srv0).as_secs_f64() / wall,
        server_sys: sys1.saturating_sub(sys0).as_secs_f64() / wall,
        others_server_core: others(&setup.pinning.server, &cores0, &cores1, srv1 - srv0),
        others_loadgen_core: others(&setup.pinning.loadgen, &cores0, &cores1, cpu1 - cpu0),
        count: total.messages,
    })
}

/// Sleeps `d`, but returns early with the error of any load task that ends
/// (they only end on error before the stop).
async fn sleep_checking(d: Duration, tasks: &[tokio::task::JoinHandle<Result<Tally>>]) {
    let deadline = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < deadline {
        if tasks.iter().any(|t| t.is_finished()) {
            return;
        }
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
        )
        .await;
    }
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct Row {
    scenario: Scenario,
    /// Each server's best measurement, in [`TARGETS`] order.
    m: [Measurement; 3],
}

async fn bench(opts: Options, pinning: Pinning) -> Result<()> {
    let extra = if opts.shared {
        format!(
            "[[tenant]]\nname = \"echo\"\nplugin = {:?}\nroutes = [\"/\"]\ninstance = \"shared\"\n",
            format!("{}/echo.wasm", wharf::bundled::PLUGIN_DIR)
        )
    } else {
        String::new()
    };
    let setup = Setup::new(pinning, &extra)?;
    if opts.shared {
        println!("wharf serves the echo plugin in shared instance mode");
    }
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
        // Rotate which server goes first, across scenarios and rounds: over
        // three rounds each one runs once in each position.
        let order = (0..opts.rounds).flat_map(|round| {
            let k = i + round;
            [0, 1, 2].map(|j| TARGETS[(k + j) % TARGETS.len()])
        });
        for target in order {
            let server = setup.start(target).await?;
            let pinned = cpus_allowed_list(server.pid);
            let result = run_scenario(sc, &server, &setup, &opts).await;
            let m = match result {
                Ok(m) => m,
                Err(e) => {
                    let tail = server.log_tail();
                    let _ = server.stop().await;
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
            // Other load only ever slows a run down: keep each server's best.
            let best = &mut best[target.index()];
            if best.as_ref().is_none_or(|b| m.per_s > b.per_s) {
                *best = Some(m);
            }
        }
        rows.push(Row {
            scenario: *sc,
            m: best.map(Option::unwrap_or_default),
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
         one current-thread runtime); load generator on core {} (one current-thread runtime)",
        core(pinning.server),
        core(pinning.loadgen)
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
            Kind::Connect { .. } => "conns/s",
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
    let _ = writeln!(
        t,
        "\n{:<14} {:<11} {:>15} | {:>13} | {:>12} | {:>10} | {:>11} | {:>10}",
        "scenario",
        "server",
        "p50 / p99 µs",
        "srv CPU µs/op",
        "of it kernel",
        "server CPU",
        "loadgen CPU",
        "other load"
    );
    let _ = writeln!(t, "{}", "-".repeat(112));
    for r in rows {
        for (k, target) in TARGETS.into_iter().enumerate() {
            let m = &r.m[k];
            let _ = writeln!(
                t,
                "{:<14} {:<11} {:>15} | {:>13.2} | {:>12.2} | {:>9.0}% | {:>11} | {:>9.0}%",
                if k == 0 { r.scenario.name } else { "" },
                target.short(),
                format!("{:.0} / {:.0}", m.p50_us, m.p99_us),
                m.server_us_per_op(),
                m.server_sys_us_per_op(),
                m.server_cpu * 100.0,
                loadgen(m.loadgen_cpu),
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
            Kind::Connect { .. } => "conns_per_s",
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
    matches!(sc.kind, Kind::Echo { size, .. } if size >= 64 * 1024)
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
}

impl Default for InstrOptions {
    fn default() -> Self {
        InstrOptions {
            valgrind: "valgrind".into(),
            messages: (1_000, 5_000),
            connections: (50, 250),
            keep: None,
            rep_strings: false,
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
            slug: "connection",
            name: "connection (+ one 32 B echo)",
            load: Load::Connections { size: 32 },
        },
    ];

    /// Callgrind's count for one server run.
    #[derive(Clone, Copy, Default)]
    struct Counts {
        /// Instructions executed, all threads.
        ir: u64,
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
        let setup = Setup::new(
            Pinning {
                server: None,
                loadgen: None,
            },
            "[server]\nmax_connections = 8\n",
        )?;
        let out_dir = match &opts.keep {
            Some(d) => d.clone(),
            None => setup.dir.path().join("callgrind"),
        };
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("create {}", out_dir.display()))?;
        println!(
            "instructions: {version}, wharf with TOKIO_WORKER_THREADS=1, callgrind output in {}",
            out_dir.display()
        );
        // Valgrind's CPUID differs from the host's, so wharf compiles the
        // plugin again under it: do that once, outside every count.
        let started = Instant::now();
        let warm = setup
            .start_with(Target::Wharf, &valgrind(opts, "none", None))
            .await?;
        warm.terminate().await?;
        println!(
            "wharf compiled the plugin under valgrind in {:.1?}",
            started.elapsed()
        );

        let mut rows = Vec::new();
        for case in CASES {
            let (n1, n2) = match case.load {
                Load::Messages { .. } => opts.messages,
                Load::Connections { .. } => opts.connections,
            };
            let mut per_op = [0.0f64; 3];
            for target in TARGETS {
                let mut counts = [Counts::default(); 2];
                for (j, n) in [n1, n2].into_iter().enumerate() {
                    let file = out_dir.join(format!("{}-{}-{n}.out", target.name(), case.slug));
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
                per_op[target.index()] =
                    (counts[1].ir as f64 - counts[0].ir as f64) / (n2 - n1) as f64;
            }
            rows.push((case, n1, n2, per_op));
        }

        println!(
            "\nInstructions per operation (callgrind Ir, whole server process, user space only): \
             (I(N2) - I(N1)) / (N2 - N1)"
        );
        println!(
            "{:<30} {:>12} {:>10} {:>11} {:>10} {:>8} {:>8}",
            "operation", "N1/N2", "wharf", "tungstenite", "fastws", "w/tung", "w/fast"
        );
        println!("{}", "-".repeat(95));
        for (case, n1, n2, [w, tu, fa]) in &rows {
            println!(
                "{:<30} {:>12} {:>10.0} {:>11.0} {:>10.0} {:>8.2} {:>8.2}",
                case.name,
                format!("{n1}/{n2}"),
                w,
                tu,
                fa,
                w / tu,
                w / fa
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
        for (case, _, _, [w, tu, fa]) in &rows {
            println!(
                "RESULT instructions op={} wharf={w:.1} tokio_tungstenite={tu:.1} fastwebsockets={fa:.1} \
                 ratio_tokio_tungstenite={:.4} ratio_fastwebsockets={:.4}",
                case.slug,
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
        let mut v = Vec::new();
        if !opts.rep_strings {
            v.extend(["env".to_owned(), NO_REP_STRINGS.to_owned()]);
        }
        v.extend([
            opts.valgrind.clone(),
            format!("--tool={tool}"),
            // wasmtime's compiled code is written to anonymous memory.
            "--smc-check=all-non-file".into(),
        ]);
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
        if let Err(e) = drive(case.load, server.ws, n).await {
            let tail = server.log_tail();
            let _ = server.terminate().await;
            return Err(e.context(format!("server log tail:\n{tail}")));
        }
        // Let the server finish with the last connection.
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.terminate().await?;
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
            let total = |key: &str| {
                text.lines()
                    .rev()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            counts.ir += total("totals:")
                .or_else(|| total("summary:"))
                .with_context(|| format!("no totals in {}", f.display()))?;
        }
        Ok(counts)
    }

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

    /// The load, every echo checked.
    async fn drive(load: Load, addr: SocketAddr, n: u64) -> Result<()> {
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes());
        match load {
            Load::Messages { text, size } => {
                let msgs = messages(0, text, size, 8);
                let mut c = Conn::new(tcp(addr).await?, 2 * size + 16384);
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
            Load::Connections { size } => {
                let msg = messages(0, true, size, 1).remove(0);
                for i in 0..n {
                    let what = || format!("connection {i}");
                    let mut c = Conn::new(tcp(addr).await?, 1024);
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
#[path = "common/baseline.rs"]
mod baseline;
