//! Noisy neighbours: a well-behaved tenant's echo throughput and latency
//! alone, then with a hostile tenant attacking the same server, one attack
//! at a time (`plugins/hostile`), as ratios to the quiet run.
//!
//! `cargo bench --bench neighbours -- [--seconds S] [--connections N]
//! [--attackers N] [--attack NAME] [--cpu-share CORES] [--rounds N] [--per-core]`
//! (default 2 s per phase, 5 rounds of a quiet and an attacked phase per
//! attack; rates are the rounds' medians, p99s are taken over all the
//! rounds' echoes of a kind together; 50 echo connections with
//! one 32 B message in flight each, 4 attacking connections that reconnect
//! whenever they are cut, and the hostile tenant's `cpu_share` left at its
//! default: half the cores).
//!
//! The server runs with two tokio workers (`TOKIO_WORKER_THREADS=2`; with
//! `--per-core`, `server.scheduling = "per-core"`) and is not pinned: the
//! question is whether one tenant's plugin can take the machine from
//! another's, so it gets the whole machine, as in production.
//! The load generator shares it; its cost is the same in every phase.
//! Every echo is checked. Under `cargo test` (no `--bench`) it is a smoke
//! run: half a second per phase, figures not meaningful.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

#[path = "common/loadgen.rs"]
mod loadgen;

/// The attacks: a name and the text messages one attacking connection
/// sends after its upgrade (each connection is cut by the host, then
/// reconnects and attacks again).
const ATTACKS: &[(&str, &[&str])] = &[
    // The control: connections of the hostile tenant that say nothing. Its
    // ratios are the noise floor of the machine the bench runs on.
    ("none (idle connections)", &[]),
    ("infinite loop", &["loop"]),
    // Calls that each run 10 ms, within every limit, back to back: never
    // cut, so only where the host runs them protects the good tenant.
    ("10 ms calls", &["spin 10"; 400]),
    ("memory bomb", &["alloc"]),
    ("trap on the third message", &["trap-third", "x", "x"]),
    ("blocking sleep", &["nap 60000"]),
    ("send flood", &["flood 1000000"]),
    ("100 MiB reply", &["big-reply 100"]),
    ("log flood", &["log 100000"]),
    ("64 MiB random bytes", &["random 64"]),
    ("32 MiB attachment loop", &["attach 32"]),
    ("16 MiB publish loop", &["publish 16"]),
    ("handle exhaustion", &["streams 100000"]),
];

struct Options {
    phase: Duration,
    connections: usize,
    attackers: usize,
    only: Option<String>,
    /// The hostile tenant's `limits.cpu_share`; `None`: the default.
    cpu_share: Option<f64>,
    /// Quiet and attacked phases per attack (one 3 s phase's p99 moves by
    /// ±30% on a quiet machine, so p99s are pooled over the rounds).
    rounds: usize,
    /// `--per-core`: wharf's workers each a runtime of their own.
    per_core: bool,
    smoke: bool,
}

fn option<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    let smoke = !args.iter().any(|a| a == "--bench");
    let opts = Options {
        phase: if smoke {
            Duration::from_millis(500)
        } else {
            Duration::from_secs_f64(option(&args, "--seconds").unwrap_or(2.0))
        },
        connections: option(&args, "--connections").unwrap_or(if smoke { 10 } else { 50 }),
        attackers: option(&args, "--attackers").unwrap_or(if smoke { 1 } else { 4 }),
        only: option(&args, "--attack"),
        cpu_share: option(&args, "--cpu-share"),
        rounds: option(&args, "--rounds")
            .unwrap_or(if smoke { 1 } else { 5 })
            .max(1),
        per_core: args.iter().any(|a| a == "--per-core"),
        smoke,
    };
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(opts))
}

/// The server: tenant `good` (the echo plugin) on `/good`, tenant `bad`
/// (the hostile plugin) on `/bad`, default limits.
struct Server {
    child: Child,
    addr: String,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start(cpu_share: Option<f64>, per_core: bool) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let plugin = |name: &str| format!("{}/{name}.wasm", wharf::bundled::PLUGIN_DIR);
        let config = format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [server]\n{scheduling}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [plugin]\ncache_dir = {cache:?}\n\
             [[tenant]]\nname = \"good\"\nplugin = {good:?}\nroutes = [\"/good\"]\n\
             [[tenant]]\nname = \"bad\"\nplugin = {bad:?}\nroutes = [\"/bad\"]\n\
             [tenant.limits]\n{share}\n",
            cache = dir.path().join("cache").display().to_string(),
            good = plugin("echo"),
            bad = plugin("hostile"),
            share = cpu_share.map_or(String::new(), |c| format!("cpu_share = {c}")),
            scheduling = if per_core {
                "scheduling = \"per-core\""
            } else {
                ""
            },
        );
        let path = dir.path().join("wharf.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("TOKIO_WORKER_THREADS", "2")
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawn wharf")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
                .await
                .context("wharf did not start")??
                .context("wharf exited")?;
            if let Some(a) = line.strip_prefix("listening on ws://") {
                addr = Some(a.to_owned());
            } else if let Some(a) = line.strip_prefix("admin on http://") {
                admin = Some(a.to_owned());
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            addr: addr.unwrap_or_default(),
            admin: admin.unwrap_or_default(),
            _dir: dir,
        })
    }

    /// `wharf_plugin_failures_total` and `wharf_plugin_log_dropped_total`
    /// of tenant `bad`, summed by series.
    async fn metrics(&self) -> Result<String> {
        let mut s = TcpStream::connect(&self.admin).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut text)).await??;
        Ok(text)
    }

    /// Waits (at most 10 s) until the hostile tenant has no connection left.
    async fn drained(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let text = self.metrics().await?;
            let open = text
                .lines()
                .find(|l| l.starts_with("wharf_tenant_connections_open{tenant=\"bad\"}"))
                .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .unwrap_or(0.0);
            if open == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let the closes settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    async fn breaches(&self) -> Result<Vec<(String, f64)>> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter(|l| l.contains("tenant=\"bad\"") && !l.starts_with('#'))
            // The breaches, not the traffic.
            .filter(|l| {
                ["failures", "refusals", "log_dropped"]
                    .iter()
                    .any(|s| l.contains(s))
            })
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect())
    }
}

async fn upgrade(addr: &str, path: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

/// A client's text frame (mask 0).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    loadgen::encode_frame(0x1, payload, [0; 4])
}

/// Latencies (µs) of every echo the good tenant's connections completed.
async fn good_load(addr: &str, connections: usize, phase: Duration) -> Result<Vec<u32>> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut s = upgrade(&addr, "/good").await?;
            let payload = format!("{c:0>32}");
            let frame = text_frame(payload.as_bytes());
            let mut echo = vec![0u8; 2 + payload.len()];
            let mut latencies = Vec::new();
            let end = Instant::now() + phase;
            while Instant::now() < end {
                let sent = Instant::now();
                s.write_all(&frame).await?;
                tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echo))
                    .await
                    .context("echo timed out")??;
                if echo[2..] != *payload.as_bytes() {
                    bail!("wrong echo on connection {c}");
                }
                latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// Attacking connections: each upgrades, sends its messages, waits to be
/// cut (or for 2 s), and starts again, until `stop`. They run on a thread
/// of their own (named `attackers`, its CPU is reported), so that
/// absorbing a flood does not queue the good tenant's load generator
/// behind it: the harm measured is the server's, not the bench's own.
/// Returns how many attacks were made.
fn attack(
    addr: &str,
    attackers: usize,
    messages: &'static [&'static str],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let addr = addr.to_owned();
    std::thread::Builder::new()
        .name("attackers".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("attackers' runtime");
            runtime.block_on(async move {
                let one = |addr: String, stop: Arc<AtomicBool>| async move {
                    let mut attacks = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = upgrade(&addr, "/bad").await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        attacks += 1;
                        for m in messages {
                            if s.write_all(&text_frame(m.as_bytes())).await.is_err() {
                                break;
                            }
                        }
                        // Read (and discard) until the host cuts us off.
                        let mut sink = vec![0u8; 64 * 1024];
                        let until = Instant::now() + Duration::from_secs(2);
                        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                            match tokio::time::timeout(
                                Duration::from_millis(100),
                                s.read(&mut sink),
                            )
                            .await
                            {
                                Ok(Ok(0)) | Ok(Err(_)) => break,
                                _ => {}
                            }
                        }
                    }
                    attacks
                };
                let all = (0..attackers).map(|_| one(addr.clone(), stop.clone()));
                futures_util::future::join_all(all).await.into_iter().sum()
            })
        })
        .expect("spawn the attackers' thread")
}

/// CPU time used so far by the threads of process `pid` (or `self`) whose
/// name is one of `names` (`wharf-worker` for wharf's workers, with
/// `wharf` its main thread, a worker per core and otherwise idle in
/// `block_on`; `wharf-long` and `wharf-idle` for its lanes).
fn threads_cpu(pid: &str, names: &[&str]) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| names.contains(&name.trim_end()))
        })
        .map(|task| loadgen::stat_cpu(&task.path().join("stat")).0)
        .sum()
}

/// CPU used so far by each group of threads: wharf's workers, its lanes,
/// and this bench's attackers.
fn cpu_times(server: &str) -> [Duration; 3] {
    [
        threads_cpu(server, &["wharf-worker", "wharf"]),
        threads_cpu(server, &["wharf-long", "wharf-idle"]),
        threads_cpu("self", &["attackers"]),
    ]
}

/// Cores each group of threads used during a phase.
struct Cpu {
    workers: f64,
    lanes: f64,
    attackers: f64,
}

impl Cpu {
    fn between(before: [Duration; 3], after: [Duration; 3], phase: Duration) -> Cpu {
        let cores =
            |i: usize| after[i].saturating_sub(before[i]).as_secs_f64() / phase.as_secs_f64();
        Cpu {
            workers: cores(0),
            lanes: cores(1),
            attackers: cores(2),
        }
    }
}

/// One phase: its echoes' latencies (µs), sorted, and its rate.
struct Phase {
    latencies: Vec<u32>,
    rate: f64,
    cpu: Cpu,
}

impl Phase {
    /// Runs the good tenant's load for one phase, and reads the CPU each
    /// group of threads used meanwhile.
    async fn run(server: &Server, opts: &Options) -> Result<Phase> {
        let pid = server
            .child
            .id()
            .map_or_else(String::new, |p| p.to_string());
        let before = cpu_times(&pid);
        let start = Instant::now();
        let mut latencies = good_load(&server.addr, opts.connections, opts.phase).await?;
        let elapsed = start.elapsed();
        let after = cpu_times(&pid);
        latencies.sort_unstable();
        Ok(Phase {
            rate: latencies.len() as f64 / opts.phase.as_secs_f64(),
            latencies,
            cpu: Cpu::between(before, after, elapsed),
        })
    }

    fn p99(&self) -> u32 {
        p99(&self.latencies)
    }
}

/// The 99th percentile of sorted latencies.
fn p99(sorted: &[u32]) -> u32 {
    let i = (sorted.len() as f64 * 0.99) as usize;
    sorted
        .get(i.min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0)
}

/// The p99 of every echo of the given phases together: a tail from all the
/// rounds' samples, steadier than any one phase's (which moves by ±30%).
fn pooled_p99<'a>(phases: impl Iterator<Item = &'a Phase>) -> u32 {
    let mut all: Vec<u32> = phases.flat_map(|p| p.latencies.iter().copied()).collect();
    all.sort_unstable();
    p99(&all)
}

async fn bench(opts: Options) -> Result<()> {
    let server = Server::start(opts.cpu_share, opts.per_core).await?;
    println!(
        "neighbours: good tenant, {} connections x 1 in flight (32 B echo), {} attacking connections, {:.1} s per phase, hostile tenant's cpu_share {}, two workers {}",
        opts.connections,
        opts.attackers,
        opts.phase.as_secs_f64(),
        opts.cpu_share
            .map_or("default (half the cores)".to_owned(), |c| format!(
                "{c} cores"
            )),
        if opts.per_core {
            "per core"
        } else {
            "work stealing"
        },
    );
    println!(
        "each attack is compared with a quiet phase run just before it, so that drift in the machine's speed does not count as harm; {} round(s) per attack; rates and the throughput ratio are medians of the rounds, p99s are of all the rounds' echoes of a kind pooled, and the range is the rounds' own p99 ratios; cores are the CPU each group of threads used, medians of the rounds",
        opts.rounds
    );
    println!();
    println!(
        "| attack | quiet msgs/s | throughput ratio | p99 µs, quiet → attacked | p99 ratio | rounds' p99 ratios | server cores: workers, lanes (quiet → attacked) | attackers' client cores | attacks | bad tenant's breaches (metrics) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, messages) in ATTACKS {
        if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let before = server.breaches().await?;
        let mut rounds = Vec::new();
        let mut attacks = 0;
        for _ in 0..opts.rounds {
            let quiet = Phase::run(&server, &opts).await?;
            let stop = Arc::new(AtomicBool::new(false));
            let attackers = attack(&server.addr, opts.attackers, messages, stop.clone());
            // Let the attack get going before measuring.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let loud = Phase::run(&server, &opts).await?;
            stop.store(true, Ordering::Relaxed);
            attacks += tokio::task::spawn_blocking(move || attackers.join())
                .await?
                .map_err(|_| anyhow::anyhow!("the attackers' thread panicked"))?;
            if opts.smoke && loud.rate == 0.0 {
                bail!("the good tenant was not served during {name}");
            }
            // The attack's calls still running (until their limits cut
            // them) must not weigh on the next quiet phase.
            server.drained().await?;
            rounds.push((quiet, loud));
        }
        let after = server.breaches().await?;
        let breaches: Vec<String> = after
            .iter()
            .filter_map(|(series, v)| {
                let was = before
                    .iter()
                    .find(|(s, _)| s == series)
                    .map_or(0.0, |b| b.1);
                let label = series
                    .split('{')
                    .nth(1)?
                    .trim_end_matches('}')
                    .replace("tenant=\"bad\",", "");
                (*v > was && !series.contains("connections_open"))
                    .then(|| format!("{} {label}", v - was))
            })
            .collect();
        let sorted = |f: &dyn Fn(&(Phase, Phase)) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let median = |f: &dyn Fn(&(Phase, Phase)) -> f64| sorted(f)[rounds.len() / 2];
        let quiet_p99 = pooled_p99(rounds.iter().map(|(q, _)| q));
        let loud_p99 = pooled_p99(rounds.iter().map(|(_, l)| l));
        let spread = sorted(&|(q, l)| f64::from(l.p99()) / f64::from(q.p99().max(1)));
        println!(
            "| {name} | {:.0} | {:.2} | {quiet_p99} → {loud_p99} | {:.2} | {:.2}–{:.2} | {:.2}, {:.2} → {:.2}, {:.2} | {:.2} | {attacks} | {} |",
            median(&|(q, _)| q.rate),
            median(&|(q, l)| l.rate / q.rate.max(1.0)),
            f64::from(loud_p99) / f64::from(quiet_p99.max(1)),
            spread[0],
            spread[spread.len() - 1],
            median(&|(q, _)| q.cpu.workers),
            median(&|(q, _)| q.cpu.lanes),
            median(&|(_, l)| l.cpu.workers),
            median(&|(_, l)| l.cpu.lanes),
            median(&|(_, l)| l.cpu.attackers),
            breaches.join(", ")
        );
    }
    drop(server.child);
    if opts.smoke {
        println!("neighbours smoke run passed (cargo bench --bench neighbours for figures)");
    }
    Ok(())
}
