//! Idle-connection density: the server's resident memory with N open
//! WebSocket connections, measured from /proc as the growth over the idle
//! server, for `wharf serve` (each connection with its own plugin instance)
//! without and with hibernation, with one `shared` instance for all, and
//! for the native tokio-tungstenite echo server (`common/baseline.rs`, this
//! binary re-executed), in one run. Then the first message on each idle
//! connection, one connection at a time: its latency and the server's CPU
//! per message, which for a hibernated connection is what waking it costs
//! (a new instance, given its attachment).
//!
//! `cargo bench --bench density -- [--connections N] [--hibernate-after MS] [--keep-resident SIZE] [--in-place] [--wide-slots] [--plugin PATH] [--first-message BYTES] [--tls] [--subscribed]`
//! (default 10,000 connections, hibernation after 200 ms, wharf's default
//! `plugin.keep_resident`, the bundled echo; `--in-place`: wharf with
//! `plugin.memory_reset = "in-place"`; `--wide-slots`: with
//! `plugin.memory_slots = "wide"`; `--plugin`: another echo component
//! in its place, in all three of wharf's runs; `--first-message`: each
//! connection also echoes a binary message of that many bytes first;
//! `--tls`: every server listens for wss with a self-signed certificate,
//! and the connections are TLS; `--subscribed`: wharf serves the chat
//! example (`plugins/chat`) instead, each connection alone in its own room,
//! so each holds a pub/sub subscription and its mailbox; only wharf's own
//! instances and hibernated runs, since the chat keeps per-connection state
//! in its instance and tokio-tungstenite has no pub/sub to compare with).
//!
//! Under `cargo test` (no `--bench` argument) it is a smoke run instead:
//! 200 connections on each server, each one's echo checked before and after
//! (each also echoing a 20,000-byte message), the same over TLS for
//! hibernating wharf and tokio-tungstenite, and 200 chat members, live and
//! hibernating, each heard in its room after the wait.

use anyhow::Context;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

/// A client connection, plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What each connection does before it idles, and over what.
struct Load {
    /// See `open`.
    first: usize,
    tls: Option<Tls>,
    /// Chat members instead of echo connections (`--subscribed`).
    subscribed: bool,
}

/// `--tls`: the servers' certificate and the client's trust in it.
struct Tls {
    /// Holds the certificate and key files.
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    connector: tokio_rustls::TlsConnector,
}

impl Tls {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let tls::SelfSigned { cert, key, client } = tls::SelfSigned::new(dir.path())?;
        Ok(Self {
            _dir: dir,
            cert,
            key,
            connector: tokio_rustls::TlsConnector::from(client),
        })
    }
}

/// The smoke run's connections each echo a message this large too, whose
/// payload the server reads straight into its message buffer.
const SMOKE_FIRST: usize = 20_000;

const REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A process's resident memory, KiB: `rss` counts every mapped page once
/// per mapping; `pss` divides a page shared by several mappings between
/// them, so that a page of a plugin's memory image that every instance maps
/// (copy-on-write, never written) counts once in all rather than once per
/// instance. `pte`: the kernel's page tables for the process, which
/// neither counts: each live instance touches its own memory slot, table
/// slot and fiber stack, far apart, each needing page-table pages of its
/// own (about 10 KiB an instance), where a native server's connections
/// share the heap's.
#[derive(Clone, Copy, Default)]
struct Resident {
    rss: u64,
    pss: u64,
    pte: u64,
}

fn resident(pid: u32) -> Resident {
    let read =
        |file: &str| std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    let (rollup, status) = (read("smaps_rollup"), read("status"));
    Resident {
        rss: procfs::kib(&rollup, "Rss:"),
        pss: procfs::kib(&rollup, "Pss:"),
        pte: procfs::kib(&status, "VmPTE:"),
    }
}

/// Opens connection `i` (over TLS with `load.tls`) and round-trips one
/// small message, so the plugin instance has really run, then a binary
/// message of `load.first` bytes if that is not 0; returns the open stream.
/// A chat member (`load.subscribed`) joins room `r<i>` as `n<i>` and hears
/// its own message back through the room instead.
async fn open(addr: &str, load: &Load, i: usize) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(addr).await?;
    let mut s: Box<dyn Stream> = match &load.tls {
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from("localhost")
                .map_err(std::io::Error::other)?;
            Box::new(tls.connector.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    if load.subscribed {
        let request = String::from_utf8_lossy(REQUEST).replacen(
            "GET / ",
            &format!("GET /chat/r{i}?nick=n{i} "),
            1,
        );
        s.write_all(request.as_bytes()).await?;
    } else {
        s.write_all(REQUEST).await?;
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&head).into_owned(),
        ));
    }
    // Masked text frame "ping" (mask 0).
    const PING: &[u8] = &[0x81, 0x84, 0, 0, 0, 0, b'p', b'i', b'n', b'g'];
    if load.subscribed {
        expect_text(&mut s, &format!("* n{i} joined r{i}")).await?;
        s.write_all(PING).await?;
        expect_text(&mut s, &format!("n{i}: ping")).await?;
        return Ok(s);
    }
    s.write_all(PING).await?;
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).await?;
    if echo[..] != expected_echo(PING)[..] {
        return Err(std::io::Error::other(format!("bad echo {echo:?}")));
    }
    if load.first > 0 {
        echo_binary(&mut s, load.first).await?;
    }
    Ok(s)
}

/// Round-trips a binary message of `len` bytes (masked, mask 0) and checks
/// its echo: what a connection that once carried a larger message holds
/// when idle (`--first-message`).
async fn echo_binary(s: &mut Box<dyn Stream>, len: usize) -> std::io::Result<()> {
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let header = |masked: bool| {
        let bit = if masked { 0x80 } else { 0 };
        let mut h = vec![0x82];
        match u16::try_from(len) {
            Ok(short) if short <= 125 => h.push(bit | short as u8),
            Ok(short) => {
                h.push(bit | 126);
                h.extend_from_slice(&short.to_be_bytes());
            }
            Err(_) => {
                h.push(bit | 127);
                h.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            h.extend_from_slice(&[0; 4]);
        }
        h
    };
    let mut frame = header(true);
    frame.extend_from_slice(&payload);
    s.write_all(&frame).await?;
    let expected = header(false);
    let mut echo = vec![0u8; expected.len() + len];
    s.read_exact(&mut echo).await?;
    if echo[..expected.len()] != expected[..] || echo[expected.len()..] != payload[..] {
        return Err(std::io::Error::other("bad echo of the first message"));
    }
    Ok(())
}

/// Reads one unfragmented text frame of under 126 bytes (what the chat
/// sends here) and checks that it is `text`.
async fn expect_text(s: &mut Box<dyn Stream>, text: &str) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut got = vec![0u8; usize::from(head[1] & 0x7F)];
    if head[0] != 0x81 || got.len() >= 126 {
        return Err(std::io::Error::other(format!("unexpected frame {head:?}")));
    }
    s.read_exact(&mut got).await?;
    if got != text.as_bytes() {
        return Err(std::io::Error::other(format!(
            "got {:?}, not {text:?}",
            String::from_utf8_lossy(&got)
        )));
    }
    Ok(())
}

/// The echo of `frame` (a masked text frame from a client, mask 0).
fn expected_echo(frame: &[u8]) -> Vec<u8> {
    let mut e = vec![frame[0], frame[1] & 0x7F];
    e.extend_from_slice(&frame[6..]);
    e
}

/// A server under measurement.
#[derive(Clone, Copy)]
enum Target {
    /// `wharf serve` with the bundled echo plugin; hibernating after this
    /// many ms (0: never).
    Wharf { hibernate_ms: u64 },
    /// `wharf serve` with the bundled echo plugin as a tenant in `shared`
    /// instance mode: one instance for all the connections.
    WharfShared,
    /// The native tokio-tungstenite echo server (`common/baseline.rs`).
    Baseline,
}

impl Target {
    fn name(self) -> String {
        match self {
            Target::Wharf { hibernate_ms: 0 } => "wharf (no hibernation)".to_owned(),
            Target::Wharf { hibernate_ms } => {
                format!("wharf (hibernating after {hibernate_ms} ms)")
            }
            Target::WharfShared => "wharf (shared instance)".to_owned(),
            Target::Baseline => "tokio-tungstenite".to_owned(),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-baseline") {
        return baseline::main(&args);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(bench(args))
}

async fn bench(args: Vec<String>) -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test` (`test = true`) does not,
    // and may pass test filters or libtest flags, which the smoke run ignores.
    if args.iter().any(|a| a == "--list") {
        println!("smoke: test");
        return Ok(());
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let plugin = plugin_path(&args, "echo")?;
    if !args.iter().any(|a| a == "--bench") {
        let started = Instant::now();
        let plain = Load {
            first: SMOKE_FIRST,
            tls: None,
            subscribed: false,
        };
        for target in [
            Target::Wharf { hibernate_ms: 0 },
            Target::Wharf { hibernate_ms: 100 },
            Target::WharfShared,
            Target::Baseline,
        ] {
            run(target, 200, "", &plugin, &plain).await?;
        }
        let tls = Load {
            first: SMOKE_FIRST,
            tls: Some(Tls::new()?),
            subscribed: false,
        };
        for target in [Target::Wharf { hibernate_ms: 100 }, Target::Baseline] {
            run(target, 200, "", &plugin, &tls).await?;
        }
        let members = Load {
            first: 0,
            tls: None,
            subscribed: true,
        };
        let chat = plugin_path(&args, "chat")?;
        for target in [
            Target::Wharf { hibernate_ms: 0 },
            Target::Wharf { hibernate_ms: 100 },
        ] {
            run(target, 200, "", &chat, &members).await?;
        }
        println!(
            "density smoke run passed in {:.1?} (cargo bench --bench density for figures)",
            started.elapsed()
        );
        return Ok(());
    }
    let n: usize = option(&args, "--connections").unwrap_or(10_000);
    // `--hibernate-after MS`: release idle instances (plugin.hibernate_after).
    let hibernate_ms: u64 = option(&args, "--hibernate-after").unwrap_or(200);
    // `--first-message BYTES`: each connection also echoes a binary message
    // this large before it idles.
    let load = Load {
        first: option(&args, "--first-message").unwrap_or(0),
        tls: if args.iter().any(|a| a == "--tls") {
            Some(Tls::new()?)
        } else {
            None
        },
        subscribed: args.iter().any(|a| a == "--subscribed"),
    };
    anyhow::ensure!(
        !(load.subscribed && load.first > 0),
        "--subscribed members send no binary message (--first-message)"
    );
    let plugin = if load.subscribed {
        plugin_path(&args, "chat")?
    } else {
        plugin
    };
    // `--keep-resident SIZE`: wharf's `plugin.keep_resident` (e.g. "0B");
    // `--in-place`: its `plugin.memory_reset = "in-place"`; `--wide-slots`:
    // its `plugin.memory_slots = "wide"`.
    let mut plugin_lines = option::<String>(&args, "--keep-resident")
        .map_or(String::new(), |k| tenant::keep_resident(&k));
    if args.iter().any(|a| a == "--in-place") {
        plugin_lines.push_str(tenant::IN_PLACE);
    }
    if args.iter().any(|a| a == "--wide-slots") {
        plugin_lines.push_str(tenant::WIDE_SLOTS);
    }
    let targets: &[Target] = if load.subscribed {
        &[
            Target::Wharf { hibernate_ms: 0 },
            Target::Wharf { hibernate_ms },
        ]
    } else {
        &[
            Target::Wharf { hibernate_ms: 0 },
            Target::Wharf { hibernate_ms },
            Target::WharfShared,
            Target::Baseline,
        ]
    };
    let mut results = Vec::new();
    for &target in targets {
        results.push((target, run(target, n, &plugin_lines, &plugin, &load).await?));
    }
    let baseline = results
        .iter()
        .find(|r| matches!(r.0, Target::Baseline))
        .map(|r| r.1.0.rss);
    println!(
        "\nMemory per idle {}, {n} connections (growth over the idle server / n, KiB; \
         the servers built with the Cargo profile `{}`):",
        if load.subscribed {
            "chat member (its own room)"
        } else {
            "connection"
        },
        tenant::build_profile()
    );
    println!(
        "{:<40} {:>8} {:>8} {:>12} {:>22}",
        "server", "RSS", "PSS", "page tables", "RSS vs tokio-tungstenite"
    );
    for (target, (kib, _)) in &results {
        println!(
            "{:<40} {:>8.1} {:>8.1} {:>12.1} {:>22}",
            target.name(),
            kib.rss,
            kib.pss,
            kib.pte,
            baseline.map_or("-".to_owned(), |b| format!("{:.2}", kib.rss / b))
        );
    }
    println!(
        "\nThe first message on each idle connection after that, one connection at a time \
         (a hibernated one's instance made again); latency at the client, server CPU per message:"
    );
    println!(
        "{:<40} {:>8} {:>8} {:>14} {:>12} {:>12}",
        "server", "p50 µs", "p99 µs", "server CPU µs", "of it kernel", "page faults"
    );
    for (target, (_, first)) in &results {
        println!(
            "{:<40} {:>8.0} {:>8.0} {:>14.1} {:>12.1} {:>12.2}",
            target.name(),
            first.p50_us,
            first.p99_us,
            first.cpu_us,
            first.kernel_us,
            first.faults
        );
    }
    Ok(())
}

/// The component wharf serves: `--plugin`'s, or the bundled plugin
/// `stem` (the echo; the chat for `--subscribed`). Made absolute here: the
/// servers' configuration files live in a temporary directory, against
/// which a relative path would be read.
fn plugin_path(args: &[String], stem: &str) -> anyhow::Result<String> {
    let path = option::<String>(args, "--plugin")
        .unwrap_or_else(|| format!("{}/{stem}.wasm", wharf::bundled::PLUGIN_DIR));
    Ok(std::fs::canonicalize(&path)
        .with_context(|| format!("plugin {path}"))?
        .display()
        .to_string())
}

/// The value after `name` in `args`, parsed.
fn option<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

/// Growth of a server's resident memory per connection, KiB.
#[derive(Clone, Copy)]
struct PerConn {
    rss: f64,
    pss: f64,
    pte: f64,
}

/// The first message on each connection after the idle wait: what waking
/// a hibernated connection costs against a live or shared one's message.
#[derive(Clone, Copy)]
struct FirstMessage {
    /// Send to answer, at the client.
    p50_us: f64,
    p99_us: f64,
    /// The server's CPU time (all its threads) over all the round trips,
    /// per message; its epoch clock's ticks meanwhile are in it too.
    cpu_us: f64,
    /// Of it, in the kernel.
    kernel_us: f64,
    /// The server's minor page faults per message: a woken instance's
    /// memory, and heap pages the awake connections' state grows into.
    faults: f64,
}

/// Opens `n` connections, lets them idle, and returns the server's memory
/// growth per connection and what the first message on each costs after
/// the wait; `plugin_lines`: more of wharf's `[plugin]`; `plugin`: the
/// echo component wharf serves.
async fn run(
    target: Target,
    n: usize,
    plugin_lines: &str,
    plugin: &str,
    load: &Load,
) -> anyhow::Result<(PerConn, FirstMessage)> {
    let cache = tempfile::tempdir()?;
    let hibernate_ms = match target {
        Target::Wharf { hibernate_ms } => hibernate_ms,
        Target::WharfShared | Target::Baseline => 0,
    };
    let mut cmd = match target {
        Target::Wharf { .. } | Target::WharfShared => {
            let config = cache.path().join("wharf.toml");
            let (path, shared) = if matches!(target, Target::WharfShared) {
                (
                    String::new(),
                    tenant::shared_echo(Some(std::path::Path::new(plugin))),
                )
            } else {
                (format!("path = {plugin:?}\n"), String::new())
            };
            std::fs::write(
                &config,
                format!(
                    "[[listener]]\naddress = \"127.0.0.1:0\"\n{tls}[plugin]\n{path}cache_dir = \"{}\"\nhibernate_after = \"{hibernate_ms}ms\"\n{plugin_lines}{shared}",
                    cache.path().display(),
                    tls = load.tls.as_ref().map_or(String::new(), |t| format!(
                        "tls = {{ cert = {:?}, key = {:?} }}\n",
                        t.cert.display().to_string(),
                        t.key.display().to_string()
                    )),
                ),
            )?;
            let mut c = Command::new(env!("CARGO_BIN_EXE_wharf"));
            c.args(["serve", "--config"]).arg(&config);
            c
        }
        Target::Baseline => {
            let mut c = Command::new(std::env::current_exe()?);
            c.arg("--serve-baseline");
            if let Some(tls) = &load.tls {
                c.arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
            }
            c
        }
    };
    let mut child = cmd
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("server exited"))?;
        let scheme = if load.tls.is_some() { "wss" } else { "ws" };
        if let Some(url) = line.strip_prefix(&format!("listening on {scheme}://")) {
            break url.to_owned();
        }
    };
    // Warm up: one connection, so the plugin's code and the runtime's
    // one-time state are resident before the baseline is taken.
    drop(open(&addr, load, n).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = resident(pid);

    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        match open(&addr, load, i).await {
            Ok(s) => conns.push(s),
            Err(e) => anyhow::bail!("connection {i} failed: {e}"),
        }
    }
    let elapsed = started.elapsed();
    // Idle connections: past a connection's settle time in the driver (1 s,
    // after which it frees its awake state and its idle buffers), the heap
    // trimmer's next pass (every second, see `server::trim`) and twice the
    // hibernation time.
    tokio::time::sleep(Duration::from_millis(3_000 + 2 * hibernate_ms)).await;
    let loaded = resident(pid);
    // All still alive (resumed, if hibernating): a round trip on each, one
    // connection at a time, so that every message reaches an idle
    // connection and the server's CPU over them is theirs alone.
    let (cpu_before, kernel_before) = loadgen::process_cpu(pid);
    let faults_before = loadgen::process_minor_faults(pid);
    let mut took = Vec::with_capacity(n);
    for (i, s) in conns.iter_mut().enumerate() {
        let sent = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), round_trip(s, i, load))
            .await
            .map_err(|_| anyhow::anyhow!("connection {i}: no answer within 5 s"))??;
        took.push(sent.elapsed());
    }
    let (cpu_after, kernel_after) = loadgen::process_cpu(pid);
    let faults =
        loadgen::process_minor_faults(pid).saturating_sub(faults_before) as f64 / n.max(1) as f64;
    took.sort_unstable();
    let micros = |q: usize| took.get(q).map_or(f64::NAN, |d| d.as_secs_f64() * 1e6);
    let first = FirstMessage {
        p50_us: micros(took.len() / 2),
        p99_us: micros(took.len() * 99 / 100),
        cpu_us: per_message(cpu_after.saturating_sub(cpu_before), n),
        kernel_us: per_message(kernel_after.saturating_sub(kernel_before), n),
        faults,
    };
    let per_conn = |f: fn(Resident) -> u64| f(loaded).saturating_sub(f(base)) as f64 / n as f64;
    let per_conn = PerConn {
        rss: per_conn(|r| r.rss),
        pss: per_conn(|r| r.pss),
        pte: per_conn(|r| r.pte),
    };
    println!(
        "{}: {n} connections open, opened in {elapsed:.2?} ({:.0}/s sequentially)",
        target.name(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "server RSS: idle {} KiB, with {n} connections {} KiB (PSS {} and {})",
        base.rss, loaded.rss, base.pss, loaded.pss
    );
    println!(
        "RSS per idle connection, {}: {:.1} KiB (PSS {:.1}; page tables {:.1} besides)",
        target.name(),
        per_conn.rss,
        per_conn.pss,
        per_conn.pte
    );
    println!("first message after the wait, {}: {first}", target.name());
    drop(conns);
    child.kill().await?;
    Ok((per_conn, first))
}

impl std::fmt::Display for FirstMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.0} µs, p99 {:.0} µs, server CPU {:.1} µs ({:.1} in the kernel), {:.2} page faults",
            self.p50_us, self.p99_us, self.cpu_us, self.kernel_us, self.faults
        )
    }
}

/// `total` over `n` messages, µs each.
fn per_message(total: Duration, n: usize) -> f64 {
    total.as_secs_f64() * 1e6 / n.max(1) as f64
}

/// Sends connection `i` a small text and checks the answer: its echo, or
/// for a chat member (`load.subscribed`) its own line heard in its room.
async fn round_trip(s: &mut Box<dyn Stream>, i: usize, load: &Load) -> anyhow::Result<()> {
    // Masked text frame "ok" (mask 0).
    const OK: &[u8] = &[0x81, 0x82, 0, 0, 0, 0, b'o', b'k'];
    s.write_all(OK).await?;
    if load.subscribed {
        return Ok(expect_text(s, &format!("n{i}: ok")).await?);
    }
    let mut echo = [0u8; 4];
    s.read_exact(&mut echo).await?;
    anyhow::ensure!(
        echo[..] == expected_echo(OK)[..],
        "connection {i}: bad echo {echo:?}"
    );
    Ok(())
}

#[path = "common/baseline.rs"]
mod baseline;
#[path = "common/loadgen.rs"]
mod loadgen;
#[path = "common/procfs.rs"]
mod procfs;
#[path = "common/tenant.rs"]
mod tenant;
#[path = "common/tls.rs"]
mod tls;
