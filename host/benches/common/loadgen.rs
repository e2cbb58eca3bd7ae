//! Shared by the benches that drive a server process (`wharf serve` or a
//! baseline): core pinning, CPU accounting, the server start, and the load
//! generator (raw RFC 6455 over TCP or TLS, pre-encoded masked frames, every
//! echoed byte checked) with its measurement.
//!
//! The echo and languages benches include it:
//!
//! ```ignore
//! #[path = "common/loadgen.rs"]
//! mod loadgen;
//! ```

// Each bench uses part of it.
#![allow(dead_code)]

use std::cell::Cell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
// Core pinning
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
pub struct Pinning {
    pub server: Option<usize>,
    pub loadgen: Option<usize>,
}

impl Pinning {
    pub const NONE: Pinning = Pinning {
        server: None,
        loadgen: None,
    };

    /// The server on the first allowed core, the load generator on the
    /// second; none if fewer than two are allowed.
    pub fn choose() -> Result<Self> {
        let cpus = allowed_cpus()?;
        if cpus.len() < 2 {
            eprintln!("warning: only {cpus:?} allowed; running without core pinning");
            return Ok(Pinning::NONE);
        }
        Ok(Pinning {
            server: Some(cpus[0]),
            loadgen: Some(cpus[1]),
        })
    }
}

pub fn allowed_cpus() -> Result<Vec<usize>> {
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

pub fn cpu_set(core: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write into it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        set
    }
}

/// Pins the calling thread (and the threads it creates later).
pub fn pin_current_thread(core: usize) -> std::io::Result<()> {
    let set = cpu_set(core);
    // SAFETY: a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The load generator's runtime: the calling thread pinned to
/// `pinning.loadgen`, one current-thread runtime and a `LocalSet` to run
/// the connections' tasks on. With `busy`, a task always ready keeps the
/// runtime from sleeping in epoll_wait: it polls. A server's reply then
/// never has to wake the load generator's core from halt, an interrupt
/// through the hypervisor on these VMs that the sender pays for (over a
/// network, the client machine would), and that costs a server the more
/// the slower it answers; the load generator's CPU then reads 100%.
pub fn loadgen_runtime(
    pinning: Pinning,
    busy: bool,
) -> Result<(tokio::runtime::Runtime, tokio::task::LocalSet)> {
    if let Some(core) = pinning.loadgen {
        pin_current_thread(core).context("cannot pin the load generator")?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    if busy {
        local.spawn_local(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
    }
    Ok((rt, local))
}

/// `Cpus_allowed_list` of a process, as the kernel sees it.
pub fn cpus_allowed_list(pid: u32) -> String {
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

/// `getrusage(who)`.
fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: rusage is plain data; getrusage fills it.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    }
}

/// This process's user + system CPU time.
pub fn self_cpu() -> Duration {
    let ru = rusage(libc::RUSAGE_SELF);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Times the calling thread has blocked (voluntary context switches): for
/// the load generator's thread, each is a sleep in `epoll_wait` that a
/// server's reply (or a timer) then had to wake it from.
pub fn thread_sleeps() -> u64 {
    u64::try_from(rusage(libc::RUSAGE_THREAD).ru_nvcsw).unwrap_or(0)
}

/// Busy (non-idle, non-iowait) and total jiffies per CPU, from /proc/stat.
pub fn core_busy() -> Vec<(u64, u64)> {
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
pub fn others(core: &Option<usize>, a: &[(u64, u64)], b: &[(u64, u64)], ours: Duration) -> f64 {
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
pub fn process_cpu(pid: u32) -> (Duration, Duration) {
    stat_cpu(Path::new(&format!("/proc/{pid}/stat")))
}

/// The CPU time in a `/proc` stat file, a process's or (under `task/`) one
/// thread's: (user + system, system).
pub fn stat_cpu(path: &Path) -> (Duration, Duration) {
    let fields = stat_fields(path);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let (user, sys) = (field(&fields, 14), field(&fields, 15)); // utime, stime
    let time = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
    (time(user + sys), time(sys))
}

/// A child's minor page faults so far (all its threads), from
/// /proc/PID/stat.
pub fn process_minor_faults(pid: u32) -> u64 {
    field(&stat_fields(Path::new(&format!("/proc/{pid}/stat"))), 10) // minflt
}

/// The fields of a `/proc` stat file after the parenthesised command name
/// (which may hold spaces), from the state on; none if it cannot be read.
fn stat_fields(path: &Path) -> Vec<String> {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    stat.rfind(')').map_or_else(Vec::new, |i| {
        stat[i + 1..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    })
}

/// Numeric field `n` of a stat file as proc(5) numbers them (the state is
/// field 3); 0 if missing.
fn field(fields: &[String], n: usize) -> u64 {
    n.checked_sub(3)
        .and_then(|i| fields.get(i))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------

/// A server process under test: `wharf serve`, or a baseline server, pinned
/// to one core if given, logging to a file.
pub struct ServerProc {
    /// For messages: "wharf", "tokio-tungstenite", ...
    name: String,
    child: Child,
    pub pid: u32,
    pub ws: SocketAddr,
    /// Its `wss://` listener, if it was asked to wait for one.
    pub wss: Option<SocketAddr>,
    log: PathBuf,
}

impl ServerProc {
    /// `wharf serve --config FILE` with one tokio worker; its configuration
    /// must have a listener on `127.0.0.1:0`. `env` is added to its
    /// environment.
    pub async fn wharf(
        config: &Path,
        core: Option<usize>,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
        cmd.arg("serve").arg("--config").arg(config);
        cmd.envs(env.iter().copied());
        Self::spawn(cmd, "wharf", core, log, false).await
    }

    /// Starts `cmd` (with `TOKIO_WORKER_THREADS=1`, `RUST_LOG=warn`, stderr
    /// to `log`, killed if the bench dies) and waits (up to 5 minutes: the
    /// first start of a JavaScript or Python plugin compiles it on one
    /// core) for its `listening on ws://` line and, if `want_wss`, its
    /// `listening on wss://` line.
    pub async fn spawn(
        mut cmd: Command,
        name: &str,
        core: Option<usize>,
        log: &Path,
        want_wss: bool,
    ) -> Result<Self> {
        cmd.env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env("TOKIO_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).context("server log file")?)
            .kill_on_drop(true);
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
            .with_context(|| format!("spawn {name} server"))?;
        let pid = child.id().context("server pid")?;
        let mut lines = BufReader::new(child.stdout.take().context("server stdout")?).lines();
        let (mut ws, mut wss) = (None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while ws.is_none() || (want_wss && wss.is_none()) {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .map_err(|_| anyhow!("{name} did not print its listeners within 5 minutes"))?
                .context("read server stdout")?;
            let Some(line) = line else {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{name} server exited before listening; its log:\n{text}");
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
            name: name.to_owned(),
            child,
            pid,
            ws: ws.unwrap_or_else(|| unreachable!()),
            wss,
            log: log.to_owned(),
        })
    }

    /// Fails, with the server's log, if it exited before we stopped it.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!(
                "{} server died during the run ({status}); its log:\n{text}",
                self.name
            );
        }
        Ok(())
    }

    /// Stops it at the end of a measurement: with SIGKILL, or with SIGTERM
    /// when `WHARF_BENCH_TERMINATE` is set (a server built with
    /// `-Cprofile-generate` writes its profile only when it exits).
    pub async fn stop(self) -> Result<()> {
        if std::env::var_os("WHARF_BENCH_TERMINATE").is_some() {
            self.terminate(Duration::from_secs(30)).await
        } else {
            self.kill().await
        }
    }

    /// Stops it with SIGKILL.
    pub async fn kill(mut self) -> Result<()> {
        self.check_alive()?;
        self.child.kill().await.context("kill server")?;
        Ok(())
    }

    /// Stops it with SIGTERM (so a profiler, the perf map it writes or
    /// valgrind's output is complete) and waits up to `within` for it to
    /// exit; then kills it and fails.
    pub async fn terminate(mut self, within: Duration) -> Result<()> {
        self.check_alive()?;
        // SAFETY: kill has no memory-safety preconditions; pid is our child's.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await.context("kill server")?;
            bail!("{} did not exit within {within:?} of SIGTERM", self.name);
        }
        Ok(())
    }

    /// The last 20 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

// ---------------------------------------------------------------------------
// RFC 6455 client side: encoding, parsing, handshake
// ---------------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A client frame (FIN set, masked with `mask`).
pub fn encode_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
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

pub fn close_frame(mask: [u8; 4]) -> Vec<u8> {
    encode_frame(OP_CLOSE, &1000u16.to_be_bytes(), mask)
}

/// One message a connection sends, encoded once.
pub struct Msg {
    pub opcode: u8,
    pub payload: Vec<u8>,
    pub frame: Vec<u8>,
}

pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Distinct messages for connection `conn`: text is printable ASCII naming
/// the connection and variant; binary is pseudo-random bytes.
pub fn messages(conn: usize, text: bool, size: usize, variants: usize) -> Vec<Msg> {
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
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub payload_start: usize,
    pub payload_len: usize,
}

/// Parses a server frame at the start of `buf`: `Ok(None)` if more bytes
/// are needed (`need` says how many in total, when known).
pub fn parse_head(buf: &[u8], need: &mut usize) -> Result<Option<FrameHead>> {
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
pub struct Conn<S> {
    s: S,
    pub buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(s: S, capacity: usize) -> Self {
        Conn {
            s,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes, making room for at least `want` buffered bytes.
    pub async fn fill(&mut self, want: usize) -> Result<()> {
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
    pub async fn next_frame(&mut self) -> Result<(bool, u8, std::ops::Range<usize>)> {
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
    pub fn try_frame(&mut self) -> Result<Option<(bool, u8, std::ops::Range<usize>)>> {
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

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.s.write_all(bytes).await.context("write to server")?;
        self.s.flush().await.context("flush to server")?;
        Ok(())
    }

    /// HTTP/1.1 upgrade; checks the 101 and the accept key.
    pub async fn handshake(&mut self, accept: &str) -> Result<()> {
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
    pub async fn close(&mut self, mask: [u8; 4]) -> Result<()> {
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
    /// handshake), so its side of the connection is finished. Over TLS, a
    /// close without `close_notify` counts (tokio-tungstenite's server
    /// sends none): the closing handshake already ended the data.
    pub async fn expect_eof(&mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), self.s.read(&mut byte))
            .await
            .map_err(|_| anyhow!("server did not close the connection after Close"))?;
        let n = match read {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            other => other.context("read after Close")?,
        };
        ensure!(n == 0, "data after the closing handshake");
        Ok(())
    }
}

pub async fn tcp(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A TLS connection, trusting what `config` trusts, to a server whose
/// certificate names `localhost`.
pub async fn tls(
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
pub struct Phase {
    pub measuring: Cell<bool>,
    pub stop: Cell<bool>,
}

/// What one task measured.
#[derive(Default)]
pub struct Tally {
    /// Echoes completed (and checked) at any time, warm-up and stop included.
    pub completed: u64,
    pub messages: u64,
    pub bytes: u64,
    /// Round-trip times in nanoseconds, of messages completed while measuring.
    pub latencies: Vec<u64>,
}

/// One echo connection: keeps `in_flight` messages outstanding, checks every
/// echo byte for byte, in order.
pub async fn echo_conn<S: AsyncRead + AsyncWrite + Unpin>(
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
pub async fn connector(
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

pub fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

/// Sleeps `d`, but returns early with the error of any load task that ends
/// (they only end on error before the stop).
pub async fn sleep_checking(d: Duration, tasks: &[tokio::task::JoinHandle<Result<Tally>>]) {
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
// Measurements
// ---------------------------------------------------------------------------

/// What one load measured against one server.
#[derive(Clone, Debug, Default)]
pub struct Measurement {
    /// Echoes (or connections) per second.
    pub per_s: f64,
    /// Echoed payload, one way, in 10^6 B per second.
    pub mb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU use, in cores, of the load generator and of the server.
    pub loadgen_cpu: f64,
    pub server_cpu: f64,
    /// The part of `server_cpu` spent in the kernel (system time).
    pub server_sys: f64,
    /// Times per second the load generator's thread went to sleep, each
    /// ended by a wake-up that its waker paid for: over loopback on these
    /// VMs, mostly the server's replies (see [`loadgen_runtime`]).
    pub loadgen_sleeps: f64,
    /// CPU time of everything else on the server's / load generator's core,
    /// as a fraction of the wall time (other builds on a busy machine); NaN
    /// unpinned.
    pub others_server_core: f64,
    pub others_loadgen_core: f64,
    /// Echoes (or connections) completed while measuring.
    pub count: u64,
}

impl Measurement {
    /// Server CPU time per echo (or per connection), in µs.
    pub fn server_us_per_op(&self) -> f64 {
        self.server_cpu / self.per_s * 1e6
    }

    /// The kernel's part of [`server_us_per_op`](Self::server_us_per_op).
    pub fn server_sys_us_per_op(&self) -> f64 {
        self.server_sys / self.per_s * 1e6
    }

    /// The load generator's sleeps per echo (or per connection).
    pub fn loadgen_sleeps_per_op(&self) -> f64 {
        self.loadgen_sleeps / self.per_s
    }
}

/// The load: `Echo` keeps `in_flight` messages of `size` bytes outstanding
/// on each of `connections` (opened before the clock starts); `Connect` runs
/// `connectors` loops of connect, upgrade, one echo, closing handshake.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
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

/// How long to load a server, and whether it is `cargo test`'s smoke run.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub warmup: Duration,
    pub duration: Duration,
    /// Only check that echoes completed at all: a loaded machine may
    /// complete none in a smoke run's very short window (every echo is
    /// still checked).
    pub smoke: bool,
}

/// Runs `load` against `server`: `window.warmup`, then `window.duration`
/// measured. With `tls`, over its `wss://` listener (`Echo` only: the
/// connectors use `ws://`). `pinning` is where the server and this process
/// run, for the CPU share other processes took on those cores.
pub async fn measure(
    load: Load,
    server: &ServerProc,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
    pinning: Pinning,
    window: Window,
) -> Result<Measurement> {
    let phase = Rc::new(Phase::default());
    let addr = match tls_config {
        Some(_) => server.wss.context("the server has no wss:// listener")?,
        None => server.ws,
    };
    let accept: Rc<str> =
        tokio_tungstenite::tungstenite::handshake::derive_accept_key(WS_KEY.as_bytes()).into();
    let mut tasks = Vec::new();
    match load {
        Load::Echo {
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
                let tls_config = tls_config.cloned();
                let capacity = (size + 14) * in_flight.max(2) + 16384;
                opening.push(tokio::task::spawn_local(async move {
                    if let Some(config) = tls_config {
                        let mut c = Conn::new(tls(addr, &config).await?, capacity);
                        c.handshake(&accept).await?;
                        Ok::<_, anyhow::Error>(Opened::Tls(Box::new(c)))
                    } else {
                        let mut c = Conn::new(tcp(addr).await?, capacity);
                        c.handshake(&accept).await?;
                        Ok(Opened::Plain(c))
                    }
                }));
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            for (id, handle) in opening.into_iter().enumerate() {
                let left = deadline.saturating_duration_since(Instant::now());
                let conn = tokio::time::timeout(left, handle)
                    .await
                    .map_err(|_| anyhow!("opening {connections} connections took over 60 s"))?
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
        Load::Connect { connectors, size } => {
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
    sleep_checking(window.warmup, &tasks).await;
    let cores0 = core_busy();
    let (cpu0, (srv0, sys0), t0) = (self_cpu(), process_cpu(server.pid), Instant::now());
    // `measure` runs on the load generator's thread (its current-thread
    // runtime), so these are its sleeps.
    let sleeps0 = thread_sleeps();
    phase.measuring.set(true);
    sleep_checking(window.duration, &tasks).await;
    phase.measuring.set(false);
    let (cpu1, (srv1, sys1), t1) = (self_cpu(), process_cpu(server.pid), Instant::now());
    let sleeps1 = thread_sleeps();
    let cores1 = core_busy();
    phase.stop.set(true);

    let mut total = Tally::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, t) in tasks.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let tally = tokio::time::timeout(left, t)
            .await
            .map_err(|_| {
                anyhow!("task {id} did not finish within 60 s of the stop (server stalled?)")
            })?
            .context("load task panicked")??;
        total.completed += tally.completed;
        total.messages += tally.messages;
        total.bytes += tally.bytes;
        total.latencies.extend(tally.latencies);
    }
    let done = if window.smoke {
        total.completed
    } else {
        total.messages
    };
    ensure!(done > 0, "nothing completed while measuring");
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
        loadgen_sleeps: sleeps1.saturating_sub(sleeps0) as f64 / wall,
        others_server_core: others(&pinning.server, &cores0, &cores1, srv1 - srv0),
        others_loadgen_core: others(&pinning.loadgen, &cores0, &cores1, cpu1 - cpu0),
        count: total.messages,
    })
}
