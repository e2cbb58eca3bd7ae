//! TEST-ONLY HOSTILE PLUGIN. IT ATTACKS THE HOST. DO NOT COPY IT, DO NOT
//! DEPLOY IT, DO NOT READ IT AS AN EXAMPLE OF A HANDLER.
//!
//! The host's tests and the "neighbours" benchmark load it to check that one
//! tenant cannot hurt the host or the other tenants: every command below is an
//! attack the host must contain (interrupt, cap, refuse, or trap the instance
//! without harm to anyone else).
//!
//! It echoes text and binary messages, except for these text commands (one
//! per message, `CMD` or `CMD ARG`; ARG is a decimal `u64`; anything else,
//! including a command with a missing, extra or non-numeric ARG, is echoed;
//! "sub" and "pub" take the arguments shown, TOPIC being one word):
//! - "loop": spins forever (CPU: fuel or epochs must interrupt it).
//! - "spin MS": spins for MS milliseconds (the monotonic clock), then
//!   answers "spun": a call that runs long but within its limits, which
//!   a tenant can send back to back without ever being cut.
//! - "alloc": leaks and touches 1 MiB blocks until `memory.grow` fails, which
//!   traps (memory bomb: the memory cap must hold).
//! - "trap-third": arms a trap. Every message the instance gets (text or
//!   binary, this one included) adds one to a counter in instance memory;
//!   once armed, any message that brings the counter to 3 or more panics,
//!   which traps. Sent as the instance's 1st message it answers "armed n=1",
//!   the 2nd message is handled as usual and the 3rd traps; sent as the 3rd
//!   or a later message it traps at once. (Tests that the instance state is
//!   thrown away with the trapped instance and nothing else is.)
//! - "nap MS": `std::thread::sleep` for MS milliseconds, a blocking
//!   `wasi:io/poll` wait during which no wasm runs (time outside wasm must
//!   count against the call, and must not block other connections), then
//!   sends "napped".
//! - "nap-loop MS": naps as "nap" does, then spins forever: a call that
//!   waits in the host while the host's epoch clock stops for want of
//!   running calls, and must still be interrupted once it runs again.
//! - "flood N": sends "m0".."m<N-1>" as fast as it can, then reports
//!   "flooded ok=<sent> full=<refused with queue-full>" (the send queue bound).
//! - "big-reply MIB": sends one binary message of MIB MiB (bytes 0x42); if
//!   the host refuses it, answers "big-reply err=<error-code>"; a size the
//!   instance cannot allocate traps (outgoing message size cap, memory the
//!   host copies out of the instance).
//! - "log N": writes N lines to stderr, each forging log lines with control
//!   bytes: CR, NUL, ESC "[2J" (clear screen), VT, and after a CR a fake
//!   "2026-12-01T00:00:00Z ERROR wharf: forged" line; then sends "logged"
//!   (log injection, and the per-instance line budget).
//! - "random MIB": calls `wasi:random/random.get-random-bytes` for MIB MiB
//!   in a loop forever, freeing each result (CPU spent inside a host call,
//!   stopped only if the host charges or interrupts time spent there).
//! - "attach MIB": calls `attachment.set` with MIB MiB forever (the host
//!   refuses more than 4096 bytes, but only after lifting the whole list).
//! - "publish MIB": calls `pubsub.publish-binary("t", <MIB MiB>, none)`
//!   forever (copies out of the instance, fan-out with no subscribers).
//! - "streams N": opens N stdout `output-stream`s with
//!   `wasi:cli/stdout.get-stdout`, writes 4096 bytes without a newline to
//!   each and never drops them, then sends "streams ok" (host resources and
//!   buffers outside linear memory, which the memory cap does not see;
//!   failed writes are only logged).
//! - "wasi": tries capabilities a sandbox must not grant and answers one
//!   line "env=<count of variables> home=<ok|err> file=<ok|err> dir=<ok|err>
//!   tcp=<ok|err> clock=<seconds since 1970|err>": `HOME`, reading
//!   /etc/passwd, listing "/", a TCP connection to 127.0.0.1:80, the wall
//!   clock. A sandboxed host answers "env=0 home=err file=err dir=err
//!   tcp=err clock=<n>".
//! - "peek": reads a 1 MiB zero-initialised static (in .bss, never written
//!   before by this instance) and answers "peek zeros=<true|false>
//!   nonzero=<bytes not zero>", then fills it with "SECRET-" repeated. A
//!   fresh instance must always see zeros=true nonzero=0: anything else is
//!   memory leaking from an earlier instance (for example through a reused
//!   pool slot). A second "peek" in the same instance sees its own secret
//!   (zeros=false nonzero=1048576).
//! - "read-at ADDR": reads the byte at linear-memory address ADDR (as a
//!   `u32`) and answers "read <byte>". Past the instance's memory it must
//!   trap, whether the host checks each access or relies on the slot's
//!   unmapped pages (`plugin.memory_slots = "wide"`): it must never read
//!   another instance's memory, nor the host's.
//! - "conn-id": answers "id=<the connection's id>".
//! - "sub TOPIC": subscribes the connection to TOPIC, answers "subscribed"
//!   or "sub err=<error-code>".
//! - "pub TOPIC N SIZE": publishes N binary messages of SIZE bytes (0x42) to
//!   TOPIC as fast as it can (excluding no one), then answers "published
//!   ok=<publishes accepted> reached=<subscribers queued for, summed>
//!   full=<refused with queue-full> err=<refused otherwise>" (a subscriber
//!   whose task never drains its mailbox, the publish rate cap).
//!
//! Upgrades: the path "/nap-upgrade" with a query "ms=N" sleeps N ms in
//! `on_upgrade` (a blocking sleep, as "nap") then accepts; "/loop-upgrade"
//! spins forever in `on_upgrade`; anything else is accepted.

use std::hint::black_box;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, ErrorCode, UpgradeRequest, UpgradeResponse};
use wharf::websocket::{attachment, pubsub};

const MIB: usize = 1 << 20;

struct Hostile;

fn log_err(conn: &Connection, result: Result<(), ErrorCode>) {
    if let Err(e) = result {
        eprintln!("hostile: connection {}: {}", conn.id(), code_name(e));
    }
}

/// The WIT name of an error code, for stable answers.
fn code_name(e: ErrorCode) -> &'static str {
    match e {
        ErrorCode::Closed => "closed",
        ErrorCode::ReasonTooLong => "reason-too-long",
        ErrorCode::MessageTooBig => "message-too-big",
        ErrorCode::QueueFull => "queue-full",
        ErrorCode::InvalidCode => "invalid-code",
    }
}

/// `mib` MiB of 0x42, touched (not `alloc_zeroed`, whose fresh pages would be
/// left untouched). A size that does not fit aborts, which traps.
fn block(mib: u64) -> Vec<u8> {
    let len = usize::try_from(mib)
        .ok()
        .and_then(|m| m.checked_mul(MIB))
        .expect("hostile: size overflows usize");
    vec![0x42; len]
}

/// Never returns. `black_box` keeps the optimizer from proving the loop has
/// no effect (an effect-free infinite loop may otherwise be removed).
fn spin_forever() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Leaks and touches 1 MiB at a time until `memory.grow` fails; the
/// allocation failure then aborts, which traps.
fn exhaust_memory() -> ! {
    loop {
        let block = vec![1u8; MIB];
        black_box(&block);
        Vec::leak(block);
    }
}

/// Messages this instance got, and whether "trap-third" armed the trap.
static MESSAGES: AtomicU64 = AtomicU64::new(0);
static TRAP_ARMED: AtomicBool = AtomicBool::new(false);

/// Called first for every message: counts it and traps if armed and it is the
/// third message or later.
fn count_message(arming: bool) -> u64 {
    let n = MESSAGES.fetch_add(1, Ordering::Relaxed) + 1;
    if arming {
        TRAP_ARMED.store(true, Ordering::Relaxed);
    }
    if TRAP_ARMED.load(Ordering::Relaxed) && n >= 3 {
        panic!("hostile: trap-third: trapping on message {n}");
    }
    n
}

fn flood(conn: &Connection, n: u64) {
    let (mut ok, mut full) = (0u64, 0u64);
    for i in 0..n {
        match conn.send_text(&format!("m{i}")) {
            Ok(()) => ok += 1,
            Err(ErrorCode::QueueFull) => full += 1,
            Err(e) => eprintln!("hostile: flood: {}", code_name(e)),
        }
    }
    let report = format!("flooded ok={ok} full={full}");
    eprintln!("hostile: connection {}: {report}", conn.id());
    let _ = conn.send_text(&report);
}

fn big_reply(conn: &Connection, mib: u64) {
    if let Err(e) = conn.send_binary(&block(mib)) {
        log_err(
            conn,
            conn.send_text(&format!("big-reply err={}", code_name(e))),
        );
    }
}

/// Each line: CR, NUL, ESC [2J (clear screen), VT, then after a CR a line
/// that looks like one of the host's own.
fn forge_logs(n: u64) {
    let stderr = std::io::stderr();
    let mut stderr = stderr.lock();
    for i in 0..n {
        let line = format!(
            "hostile: log {i} cr\r nul\0 esc\x1b[2J vt\x0b \r2026-12-01T00:00:00Z ERROR wharf: forged\n"
        );
        let _ = stderr.write_all(line.as_bytes());
    }
    let _ = stderr.flush();
}

// Hand-written WASI imports: the world gives Rust code no WASI handles, and
// these are the interface versions Rust's std (wasi-libc) imports already.
#[link(wasm_import_module = "wasi:random/random@0.2.0")]
unsafe extern "C" {
    /// `get-random-bytes: func(len: u64) -> list<u8>`: the list is written to
    /// `ret` as (ptr: i32, len: i32), allocated through our `cabi_realloc`.
    #[link_name = "get-random-bytes"]
    fn wasi_get_random_bytes(len: i64, ret: *mut u8);
}

#[link(wasm_import_module = "wasi:cli/stdout@0.2.0")]
unsafe extern "C" {
    /// `get-stdout: func() -> output-stream`: a new handle at every call.
    #[link_name = "get-stdout"]
    fn wasi_get_stdout() -> i32;
}

#[link(wasm_import_module = "wasi:io/streams@0.2.0")]
unsafe extern "C" {
    /// `[method]output-stream.write: func(contents: list<u8>) ->
    /// result<_, stream-error>`: the result is written to `ret` (12 bytes,
    /// aligned to 4: discriminant byte at 0, the error's at 4, its handle at 8).
    #[link_name = "[method]output-stream.write"]
    fn wasi_output_stream_write(handle: i32, ptr: *const u8, len: usize, ret: *mut u8);
}

/// The canonical ABI return area for the imports above.
#[repr(C, align(8))]
struct RetArea([u8; 16]);

fn random_forever(mib: u64) -> ! {
    let len = i64::try_from(mib.saturating_mul(MIB as u64)).unwrap_or(i64::MAX);
    loop {
        let mut ret = RetArea([0; 16]);
        // SAFETY: `ret` is aligned and large enough for (ptr, len); the host
        // allocated the list with `cabi_realloc` (the global allocator, align
        // 1), so handing it back to a `Vec<u8>` frees it the same way.
        unsafe {
            wasi_get_random_bytes(len, ret.0.as_mut_ptr());
            let ptr = u32::from_le_bytes(ret.0[0..4].try_into().unwrap()) as usize as *mut u8;
            let n = u32::from_le_bytes(ret.0[4..8].try_into().unwrap()) as usize;
            if n > 0 {
                black_box(Vec::from_raw_parts(ptr, n, n));
            }
        }
    }
}

/// Opens `n` stdout streams and half-writes a line on each, keeping them all.
fn open_streams(conn: &Connection, n: u64) {
    let line = [b'S'; 4096];
    let mut failed = 0u64;
    for _ in 0..n {
        let mut ret = RetArea([0; 16]);
        // SAFETY: hand-written imports with the canonical ABI signatures
        // above; the handle is deliberately never dropped (leaked), and so
        // is the `error` handle of a failed write.
        unsafe {
            let handle = wasi_get_stdout();
            wasi_output_stream_write(handle, line.as_ptr(), line.len(), ret.0.as_mut_ptr());
        }
        if ret.0[0] != 0 {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("hostile: streams: {failed} of {n} writes failed");
    }
    log_err(conn, conn.send_text("streams ok"));
}

/// "sub TOPIC" and "pub TOPIC N SIZE": the answer, or `None` for any other
/// text (malformed ones included, which are then echoed).
fn pubsub_command(conn: &Connection, text: &str) -> Option<String> {
    let mut words = text.split(' ');
    let (command, topic) = (words.next()?, words.next()?);
    let numbers = words
        .map(|w| w.parse::<u64>().ok())
        .collect::<Option<Vec<_>>>()?;
    match (command, numbers.as_slice()) {
        ("sub", []) => Some(match pubsub::subscribe(conn, topic) {
            Ok(()) => "subscribed".to_owned(),
            Err(e) => format!("sub err={}", code_name(e)),
        }),
        ("pub", &[n, size]) => {
            let data = vec![0x42; usize::try_from(size).ok()?];
            let (mut ok, mut reached, mut full, mut err) = (0u64, 0u64, 0u64, 0u64);
            for _ in 0..n {
                match pubsub::publish_binary(topic, &data, None) {
                    Ok(queued) => {
                        ok += 1;
                        reached += u64::from(queued);
                    }
                    Err(ErrorCode::QueueFull) => full += 1,
                    Err(_) => err += 1,
                }
            }
            Some(format!(
                "published ok={ok} reached={reached} full={full} err={err}"
            ))
        }
        _ => None,
    }
}

fn ok_err<T, E>(r: &Result<T, E>) -> &'static str {
    if r.is_ok() { "ok" } else { "err" }
}

fn probe_wasi() -> String {
    let env = std::env::vars_os().count();
    let home = ok_err(&std::env::var_os("HOME").ok_or(()));
    let file = ok_err(&std::fs::read("/etc/passwd"));
    let dir = ok_err(&std::fs::read_dir("/"));
    let tcp = ok_err(&std::net::TcpStream::connect("127.0.0.1:80"));
    let clock = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs().to_string(),
        Err(_) => "err".to_owned(),
    };
    format!("env={env} home={home} file={file} dir={dir} tcp={tcp} clock={clock}")
}

/// 1 MiB in .bss: zero-initialised, so the linker emits no data segment for
/// it and a fresh instance must find only zeros there.
#[repr(C, align(8))]
struct Peek([u8; MIB]);
static mut PEEK: Peek = Peek([0; MIB]);

const SECRET: &[u8] = b"SECRET-";

fn peek() -> String {
    let base = (&raw mut PEEK).cast::<u8>();
    let mut nonzero = 0usize;
    for i in 0..MIB {
        // SAFETY: in bounds of PEEK; an instance is single-threaded and no
        // reference to PEEK exists. Volatile so neither the read (which the
        // compiler could otherwise assume to be zero) nor the write go away.
        if unsafe { base.add(i).read_volatile() } != 0 {
            nonzero += 1;
        }
    }
    for i in 0..MIB {
        // SAFETY: as above.
        unsafe { base.add(i).write_volatile(SECRET[i % SECRET.len()]) };
    }
    format!("peek zeros={} nonzero={nonzero}", nonzero == 0)
}

/// `ms=N` from a query string, if there.
fn query_ms(query: Option<&str>) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
}

impl Guest for Hostile {
    fn on_upgrade(_conn: &Connection, request: UpgradeRequest) -> UpgradeResponse {
        match request.path.as_str() {
            "/nap-upgrade" => {
                let ms = query_ms(request.query.as_deref()).unwrap_or(0);
                std::thread::sleep(Duration::from_millis(ms));
            }
            "/loop-upgrade" => spin_forever(),
            _ => {}
        }
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        // A malformed ARG makes the command "", which is echoed.
        let (command, arg) = match text.split_once(' ') {
            Some((c, a)) => match a.trim().parse::<u64>() {
                Ok(v) => (c, Some(v)),
                Err(_) => ("", None),
            },
            None => (text.as_str(), None),
        };
        let n = count_message(text == "trap-third");
        if let Some(answer) = pubsub_command(conn, &text) {
            log_err(conn, conn.send_text(&answer));
            return;
        }
        match (command, arg) {
            ("trap-third", None) => {
                log_err(conn, conn.send_text(&format!("armed n={n}")));
            }
            ("loop", None) => spin_forever(),
            ("spin", Some(ms)) => {
                let until = Instant::now() + Duration::from_millis(ms);
                while Instant::now() < until {
                    black_box(());
                }
                log_err(conn, conn.send_text("spun"));
            }
            ("alloc", None) => exhaust_memory(),
            ("nap", Some(ms)) => {
                std::thread::sleep(Duration::from_millis(ms));
                log_err(conn, conn.send_text("napped"));
            }
            ("nap-loop", Some(ms)) => {
                std::thread::sleep(Duration::from_millis(ms));
                spin_forever()
            }
            ("flood", Some(n)) => flood(conn, n),
            ("big-reply", Some(mib)) => big_reply(conn, mib),
            ("log", Some(n)) => {
                forge_logs(n);
                log_err(conn, conn.send_text("logged"));
            }
            ("random", Some(mib)) => random_forever(mib),
            ("attach", Some(mib)) => {
                let data = block(mib);
                loop {
                    let _ = black_box(attachment::set(conn, &data));
                }
            }
            ("publish", Some(mib)) => {
                let data = block(mib);
                loop {
                    let _ = black_box(pubsub::publish_binary("t", &data, None));
                }
            }
            ("streams", Some(n)) => open_streams(conn, n),
            ("wasi", None) => log_err(conn, conn.send_text(&probe_wasi())),
            ("peek", None) => log_err(conn, conn.send_text(&peek())),
            ("conn-id", None) => log_err(conn, conn.send_text(&format!("id={}", conn.id()))),
            ("read-at", Some(addr)) => {
                // SAFETY: none: reading where this instance has no memory
                // is the attack; wasm either reads its own memory or traps.
                let byte = unsafe { (addr as u32 as usize as *const u8).read_volatile() };
                log_err(conn, conn.send_text(&format!("read {byte}")));
            }
            _ => log_err(conn, conn.send_text(&text)),
        }
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        count_message(false);
        log_err(conn, conn.send_binary(&data));
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

export!(Hostile);
