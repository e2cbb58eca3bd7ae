//! Hot swap under load: the time from a deploy request to the first reply
//! from the new version, the echo throughput and p99 during a swap as
//! ratios to steady state, and the server's memory while two versions are
//! resident.
//!
//! `cargo bench --bench swap -- [--connections N] [--seconds S]` (default
//! 100 connections, 1 message of 32 B in flight each, 2 s per phase).
//!
//! The server runs in this process on its own two-worker runtime (as
//! `wharf serve` on two cores would), with a fresh compiled-code cache, so
//! each deploy compiles; the load generator runs on another thread. It
//! calls the control plane directly (`Tenants::deploy`, what the admin
//! API's `PUT /tenants/{name}/plugin` calls after reading the body).
//! Under `cargo test` (no `--bench`) it is a smoke run: short phases, 10
//! connections, figures not meaningful.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wharf::config::Config;
use wharf::metrics::Metrics;
use wharf::runtime::{Runtime, RuntimeConfig};
use wharf::server::Server;
use wharf::tenancy::swap::Policy;
use wharf::tenancy::{self, Tenants};

#[path = "common/procfs.rs"]
mod procfs;

fn option<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn plugin(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", wharf::bundled::PLUGIN_DIR)).expect("built plugin")
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    procfs::kib(&status, "VmRSS:")
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    let smoke = !args.iter().any(|a| a == "--bench");
    let connections: usize = option(&args, "--connections").unwrap_or(if smoke { 10 } else { 100 });
    let phase = Duration::from_secs_f64(option(&args, "--seconds").unwrap_or(if smoke {
        0.3
    } else {
        2.0
    }));
    let _ = rlimit::increase_nofile_limit(u64::MAX);

    println!(
        "swap: {connections} connections x 1 in flight (32 B echo), {:.1} s per phase{}",
        phase.as_secs_f64(),
        if smoke {
            " (smoke run: figures not meaningful)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "| policy | deploy call (compile + swap) | first v2 reply after the request | msgs/s during / steady | p99 during / steady (µs) | RSS with two versions |"
    );
    println!("|---|---|---|---|---|---|");
    for policy in [Policy::Drain, Policy::Migrate] {
        let row = std::thread::scope(|s| s.spawn(|| run(policy, connections, phase)).join())
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        println!("{row}");
    }
    Ok(())
}

/// One policy: a fresh server, steady load, then a swap under load.
fn run(policy: Policy, connections: usize, phase: Duration) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[plugin]\ncache_dir = {cache:?}\n\
         [[tenant]]\nname = \"t\"\nplugin = {v1:?}\nroutes = [\"/\"]\n",
        cache = dir.path().display().to_string(),
        v1 = format!("{}/swap_v1.wasm", wharf::bundled::PLUGIN_DIR),
    );
    let config: Config = toml::from_str(&text)?;
    config.validate()?;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: config.server.max_connections,
        limits: tenancy::runtime_limits(&config),
        cache_dir: Some(dir.path().to_owned()),
        concurrency_support: false,
        memory_reset: wharf::runtime::engine::MemoryReset::Decommit {
            keep_resident: 64 << 10,
        },
        wide_slots: false,
    })?;
    let metrics = Metrics::new();
    let tenants = Arc::new(Tenants::load(&config, Arc::new(runtime), metrics.clone())?);
    let server = server_rt.block_on(Server::start(&config, tenants.clone(), metrics))?;
    let addr = server.bound()[0].address;

    let load_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let row = load_rt.block_on(async {
        let steady = Load::start(addr, connections).await?;
        tokio::time::sleep(phase).await;
        let steady = steady.finish().await?;
        let rss_before = rss_kib();

        let load = Load::start(addr, connections).await?;
        tokio::time::sleep(phase / 4).await;
        let requested = Instant::now();
        let since = load.mark();
        let tenants2 = tenants.clone();
        let bytes = plugin("swap_v2");
        let outcome = tokio::task::spawn_blocking(move || tenants2.deploy("t", "swap_v2", &bytes, policy))
            .await??;
        let deployed = requested.elapsed();
        // The first reply from v2: on a new connection (drain), or on any
        // open one (migrate).
        let first_v2 = match policy {
            Policy::Migrate => load.first_v2(requested).await?,
            _ => {
                let mut s = upgrade(addr).await?;
                echo(&mut s, b"first").await?;
                requested.elapsed()
            }
        };
        tokio::time::sleep(phase).await;
        let rss_two = rss_kib();
        let during = load.finish_since(since).await?;
        anyhow::Ok(format!(
            "| {} | {:.1} ms | {:.1} ms | {:.2} ({:.0} / {:.0}) | {:.2} ({} / {}) | +{} KiB ({} KiB) |",
            outcome.policy.as_str(),
            deployed.as_secs_f64() * 1e3,
            first_v2.as_secs_f64() * 1e3,
            during.rate / steady.rate.max(1.0),
            during.rate,
            steady.rate,
            f64::from(during.p99) / f64::from(steady.p99.max(1)),
            during.p99,
            steady.p99,
            rss_two.saturating_sub(rss_before),
            rss_two,
        ))
    })?;
    server_rt.block_on(server.shutdown());
    Ok(row)
}

async fn upgrade(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await?;
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

/// Sends one masked text frame and reads the reply: `v1:TEXT` or
/// `v2:TEXT`; returns the version's digit.
async fn echo(s: &mut TcpStream, text: &[u8]) -> Result<u8> {
    let mut frame = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(text);
    s.write_all(&frame).await?;
    let mut head = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .context("echo timed out")??;
    let mut reply = vec![0u8; usize::from(head[1] & 0x7f)];
    s.read_exact(&mut reply).await?;
    if reply.len() != text.len() + 3 || reply[3..] != *text || !reply.starts_with(b"v") {
        bail!("wrong reply {:?}", String::from_utf8_lossy(&reply));
    }
    Ok(reply[1])
}

struct Figures {
    rate: f64,
    p99: u32,
}

/// When an echo completed, and its latency in µs.
type Sample = (Instant, u32);

/// Connections echoing until told to stop; each echo timed.
struct Load {
    stop: Arc<AtomicBool>,
    /// Set when a v2 reply arrives: micros since `origin`.
    first_v2: Arc<AtomicU64>,
    origin: Instant,
    tasks: Vec<tokio::task::JoinHandle<Result<Vec<Sample>>>>,
}

impl Load {
    async fn start(addr: SocketAddr, connections: usize) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let first_v2 = Arc::new(AtomicU64::new(u64::MAX));
        let origin = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..connections {
            let mut s = upgrade(addr).await?;
            let (stop, first) = (stop.clone(), first_v2.clone());
            tasks.push(tokio::spawn(async move {
                let text = format!("{c:0>32}");
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let version = echo(&mut s, text.as_bytes()).await?;
                    let now = Instant::now();
                    if version == b'2' {
                        let at = (now - origin).as_micros() as u64;
                        first.fetch_min(at, Ordering::Relaxed);
                    }
                    samples.push((
                        now,
                        (now - sent).as_micros().min(u128::from(u32::MAX)) as u32,
                    ));
                }
                anyhow::Ok(samples)
            }));
        }
        Ok(Load {
            stop,
            first_v2,
            origin,
            tasks,
        })
    }

    fn mark(&self) -> Instant {
        Instant::now()
    }

    /// Waits (up to 10 s) for the first v2 reply; its delay after `from`.
    async fn first_v2(&self, from: Instant) -> Result<Duration> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let at = self.first_v2.load(Ordering::Relaxed);
            if at != u64::MAX {
                return Ok(
                    (self.origin + Duration::from_micros(at)).saturating_duration_since(from)
                );
            }
            if Instant::now() > deadline {
                bail!("no v2 reply within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn finish(self) -> Result<Figures> {
        let start = self.origin;
        self.finish_since(start).await
    }

    /// Stops, and reports the echoes completed after `since`.
    async fn finish_since(self, since: Instant) -> Result<Figures> {
        self.stop.store(true, Ordering::Relaxed);
        let end = Instant::now();
        let mut latencies = Vec::new();
        for t in self.tasks {
            latencies.extend(
                t.await??
                    .into_iter()
                    .filter(|(at, _)| *at >= since)
                    .map(|(_, l)| l),
            );
        }
        latencies.sort_unstable();
        let p99 = latencies
            .get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0);
        Ok(Figures {
            rate: latencies.len() as f64 / (end - since).as_secs_f64(),
            p99,
        })
    }
}
