//! A deliberately misbehaving handler, for the host's tests. Do not copy it.
//!
//! It echoes text and binary messages, except for these text commands:
//! - "trap": panics, which traps the instance,
//! - "loop": spins forever (the host must interrupt it: fuel or epochs),
//! - "alloc": leaks 1 MiB blocks until the host's memory cap refuses to grow
//!   memory, which traps,
//! - "sleep N": busy-waits about N milliseconds, then sends "slept",
//! - "flood N": sends "m0".."m<N-1>" as fast as it can, then reports
//!   "flooded ok=<sent> full=<refused with queue-full>".
//! - "batch N": queues N messages in one `batch-send` call, text "b0" and
//!   binary [1] alternating; "batch-big N": the same with message 1 a
//!   binary of N bytes. Reports "batched all" or "batched queued=<count>
//!   error=<error>", to the log as well. "packed N" and "packed-big N": the
//!   same messages through one `packed-send` call, with the same reports;
//!   "words N" and "words-big N" through one `packed-words-send` call.
//!   "texts N" and "texts-big N": texts only ("b0".."b<N-1>", message 1 of
//!   N bytes), through one `text-batch-send` call, with the same reports.
//! - "packed-bad past", "packed-bad unused", "packed-bad utf8": a
//!   `packed-send` call whose spans run past the payloads, leave bytes of
//!   them unused, or mark invalid UTF-8 as text (each traps in the host);
//!   "words-bad past", "words-bad unused", "words-bad utf8": the same
//!   through `packed-words-send`.
//!   "texts-bad past", "texts-bad unused", "texts-bad split": a
//!   `text-batch-send` call whose lengths run past the string, leave some
//!   of it unused, or cut a character in two (each traps in the host).
//! - "count": counts in the attachment (survives hibernation) and in memory
//!   (does not), answering "count=<attachment> instance=<memory>".
//! - "setting KEY": answers the tenant's setting KEY (`wharf:websocket/config`),
//!   or "none"; "settings": every "key=value", joined by ";".
//! - "env NAME": answers the environment variable NAME, or "none"; "read
//!   PATH": the file's text, or "err"; "write PATH": "ok" or "err" (what
//!   the tenant's WASI grants allow); "now": the wall clock's seconds
//!   since the Unix epoch.
//! - "id": answers the connection's id; "peer ID TEXT": sends TEXT to
//!   connection ID (`wharf:websocket/peers`), answering "peer ok" or
//!   "peer err=<error>"; "peer-trap ID": sends "to you" to connection ID
//!   and "to me" to its own, then traps.
//! - "big-trap N": sends a binary of N bytes (each 7), then traps.
//! - "peer-sleep ID MS": busy-waits about MS milliseconds, then sends
//!   "late" to connection ID, answering as "peer" does.
//!
//! An upgrade request for the path "/reject-trap" traps in `on_upgrade`.

use std::hint::black_box;
use std::time::{Duration, Instant};

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::batch_send::{self, Outgoing};
use wharf::websocket::connection::Connection;
use wharf::websocket::packed::{Kind, Span};
use wharf::websocket::types::{Accept, ErrorCode, UpgradeRequest, UpgradeResponse};
use wharf::websocket::{attachment, config, peers};
use wharf::websocket::{packed_send, packed_words_send, text_batch_send};

struct Chaos;

fn log_err(conn: &Connection, result: Result<(), ErrorCode>) {
    if let Err(e) = result {
        eprintln!("chaos: connection {}: {e}", conn.id());
    }
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
        let block = vec![1u8; 1 << 20];
        // Touch every page so the memory is really used, then leak it.
        black_box(&block);
        Vec::leak(block);
    }
}

fn busy_wait(ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

fn flood(conn: &Connection, n: u64) {
    let (mut ok, mut full) = (0u64, 0u64);
    for i in 0..n {
        match conn.send_text(&format!("m{i}")) {
            Ok(()) => ok += 1,
            Err(ErrorCode::QueueFull) => full += 1,
            Err(e) => eprintln!("chaos: flood: {e}"),
        }
    }
    // Sends are only written after this call returns, so once the queue is
    // full this report is refused too; the log line always gets through.
    let report = format!("flooded ok={ok} full={full}");
    eprintln!("chaos: connection {}: {report}", conn.id());
    let _ = conn.send_text(&report);
}

/// Message `i` of a batch: text "b<i>" or binary [1], except message 1,
/// binary of `big` bytes if set.
fn batched(i: u64, big: Option<u64>) -> Outgoing {
    match (i, big) {
        (1, Some(size)) => Outgoing::Binary(vec![0; size as usize]),
        _ if i.is_multiple_of(2) => Outgoing::Text(format!("b{i}")),
        _ => Outgoing::Binary(vec![1]),
    }
}

/// Which call a batch of sends goes through.
#[derive(Clone, Copy)]
enum Via {
    /// `batch-send`.
    List,
    /// `packed-send`.
    Packed,
    /// `packed-words-send`.
    Words,
}

/// Bit 31 of a span word: a binary message.
const BINARY: u32 = 1 << 31;

/// Sends `n` messages in one call of `via`.
fn batch(conn: &Connection, n: u64, big: Option<u64>, via: Via) {
    let messages = (0..n).map(|i| batched(i, big));
    let mut payloads = Vec::new();
    let mut pack = |message| {
        let (kind, bytes) = match message {
            Outgoing::Text(text) => (Kind::Text, text.into_bytes()),
            Outgoing::Binary(data) => (Kind::Binary, data),
        };
        let len = bytes.len() as u32;
        payloads.extend(bytes);
        Span { kind, len }
    };
    let sent = match via {
        Via::List => batch_send::send(conn, &messages.collect::<Vec<_>>()),
        Via::Packed => {
            let spans: Vec<Span> = messages.map(&mut pack).collect();
            packed_send::send(conn, &payloads, &spans)
        }
        Via::Words => {
            let words: Vec<u32> = messages
                .map(&mut pack)
                .map(|span| match span.kind {
                    Kind::Text => span.len,
                    Kind::Binary => span.len | BINARY,
                })
                .collect();
            packed_words_send::send(conn, &payloads, &words)
        }
    };
    let report = match sent {
        Ok(()) => "batched all".to_owned(),
        Err(p) => format!("batched queued={} error={}", p.queued, p.error.name()),
    };
    eprintln!("chaos: connection {}: {report}", conn.id());
    let _ = conn.send_text(&report);
}

/// Sends `n` texts in one `text-batch-send` call: "b<i>", except message
/// 1, `big` bytes if set.
fn texts(conn: &Connection, n: u64, big: Option<u64>) {
    let (mut texts, mut lens) = (String::new(), Vec::new());
    for i in 0..n {
        let text = match (i, big) {
            (1, Some(size)) => "x".repeat(size as usize),
            _ => format!("b{i}"),
        };
        texts.push_str(&text);
        lens.push(text.len() as u32);
    }
    let report = match text_batch_send::send(conn, &texts, &lens) {
        Ok(()) => "batched all".to_owned(),
        Err(p) => format!("batched queued={} error={}", p.queued, p.error.name()),
    };
    eprintln!("chaos: connection {}: {report}", conn.id());
    let _ = conn.send_text(&report);
}

/// A `text-batch-send` call with malformed lengths, which traps in the
/// host: a text "ok" first, then the bad length.
fn texts_bad(conn: &Connection, how: &str) {
    let (texts, lens) = match how {
        "past" => ("ok12", [2, 3]),
        "unused" => ("ok12", [2, 1]),
        // "é" is two bytes: one of them is half a character.
        _ => ("oké", [2, 1]),
    };
    let sent = text_batch_send::send(conn, texts, &lens);
    eprintln!("chaos: texts-bad {how} was not refused: {sent:?}");
}

/// A `packed-send` call with malformed spans, which traps in the host: a
/// binary "ok" span first, then the bad one.
fn packed_bad(conn: &Connection, how: &str) {
    let binary = |len| Span {
        kind: Kind::Binary,
        len,
    };
    let (payloads, spans): (&[u8], _) = match how {
        "past" => (b"ok12", vec![binary(2), binary(3)]),
        "unused" => (b"ok12", vec![binary(2), binary(1)]),
        _ => (
            b"ok\xff",
            vec![
                binary(2),
                Span {
                    kind: Kind::Text,
                    len: 1,
                },
            ],
        ),
    };
    let sent = packed_send::send(conn, payloads, &spans);
    eprintln!("chaos: packed-bad {how} was not refused: {sent:?}");
}

/// `packed_bad` through `packed-words-send`.
fn words_bad(conn: &Connection, how: &str) {
    let (payloads, words): (&[u8], [u32; 2]) = match how {
        "past" => (b"ok12", [2 | BINARY, 3 | BINARY]),
        "unused" => (b"ok12", [2 | BINARY, 1 | BINARY]),
        _ => (b"ok\xff", [2 | BINARY, 1]),
    };
    let sent = packed_words_send::send(conn, payloads, &words);
    eprintln!("chaos: words-bad {how} was not refused: {sent:?}");
}

impl Guest for Chaos {
    fn on_upgrade(_conn: &Connection, request: UpgradeRequest) -> UpgradeResponse {
        if request.path == "/reject-trap" {
            panic!("chaos: trapping in on-upgrade as asked");
        }
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        if let Some(key) = text.strip_prefix("setting ") {
            let value = config::get(key).unwrap_or_else(|| "none".into());
            return log_err(conn, conn.send_text(&value));
        }
        if let Some(name) = text.strip_prefix("env ") {
            let value = std::env::var(name).unwrap_or_else(|_| "none".into());
            return log_err(conn, conn.send_text(&value));
        }
        if let Some(path) = text.strip_prefix("read ") {
            let content = std::fs::read_to_string(path).unwrap_or_else(|_| "err".into());
            return log_err(conn, conn.send_text(&content));
        }
        if let Some(path) = text.strip_prefix("write ") {
            let done = std::fs::write(path, b"x").map_or("err", |()| "ok");
            return log_err(conn, conn.send_text(done));
        }
        if text == "now" {
            let now = std::time::SystemTime::UNIX_EPOCH
                .elapsed()
                .map_or(0, |d| d.as_secs());
            return log_err(conn, conn.send_text(&now.to_string()));
        }
        if text == "id" {
            return log_err(conn, conn.send_text(&conn.id().to_string()));
        }
        if let Some(id) = text.strip_prefix("peer-trap ") {
            if let Ok(id) = id.parse::<u64>() {
                let _ = peers::send_text(id, "to you");
            }
            log_err(conn, conn.send_text("to me"));
            panic!("chaos: trapping after sends, as asked");
        }
        if let Some(rest) = text.strip_prefix("peer-sleep ") {
            let (id, ms) = rest.split_once(' ').unwrap_or((rest, "0"));
            busy_wait(ms.parse().unwrap_or(0));
            let answer = match id.parse::<u64>() {
                Ok(id) => match peers::send_text(id, "late") {
                    Ok(()) => "peer ok".to_owned(),
                    Err(e) => format!("peer err={e:?}"),
                },
                Err(_) => "peer err=Closed".to_owned(),
            };
            return log_err(conn, conn.send_text(&answer));
        }
        if let Some(rest) = text.strip_prefix("peer ") {
            let (id, message) = rest.split_once(' ').unwrap_or((rest, ""));
            let result = match id.parse::<u64>() {
                Ok(id) => peers::send_text(id, message),
                Err(_) => Err(ErrorCode::Closed),
            };
            let answer = match result {
                Ok(()) => "peer ok".to_owned(),
                Err(e) => format!("peer err={e:?}"),
            };
            return log_err(conn, conn.send_text(&answer));
        }
        if let Some(how) = text.strip_prefix("packed-bad ") {
            return packed_bad(conn, how);
        }
        if let Some(how) = text.strip_prefix("words-bad ") {
            return words_bad(conn, how);
        }
        if let Some(how) = text.strip_prefix("texts-bad ") {
            return texts_bad(conn, how);
        }
        if text == "settings" {
            let all: Vec<String> = config::get_all()
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return log_err(conn, conn.send_text(&all.join(";")));
        }
        let (command, arg) = match text.split_once(' ') {
            Some((c, a)) => (c, a.trim().parse::<u64>().ok()),
            None => (text.as_str(), None),
        };
        match (command, arg) {
            ("trap", None) => panic!("chaos: trapping as asked"),
            ("big-trap", Some(n)) => {
                log_err(conn, conn.send_binary(&vec![7; n as usize]));
                panic!("chaos: trapping after a large send, as asked");
            }
            ("loop", None) => spin_forever(),
            ("alloc", None) => exhaust_memory(),
            ("sleep", Some(ms)) => {
                busy_wait(ms);
                log_err(conn, conn.send_text("slept"));
            }
            ("flood", Some(n)) => flood(conn, n),
            ("batch", Some(n)) => batch(conn, n, None, Via::List),
            ("batch-big", Some(n)) => batch(conn, 3, Some(n), Via::List),
            ("packed", Some(n)) => batch(conn, n, None, Via::Packed),
            ("packed-big", Some(n)) => batch(conn, 3, Some(n), Via::Packed),
            ("words", Some(n)) => batch(conn, n, None, Via::Words),
            ("words-big", Some(n)) => batch(conn, 3, Some(n), Via::Words),
            ("texts", Some(n)) => texts(conn, n, None),
            ("texts-big", Some(n)) => texts(conn, 3, Some(n)),
            ("count", None) => count(conn),
            _ => log_err(conn, conn.send_text(&text)),
        }
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        log_err(conn, conn.send_binary(&data));
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

/// "count": a counter kept in the connection's attachment (so it survives
/// hibernation) and, for comparison, in this instance's memory (which does
/// not): answers "count=<attachment> instance=<memory>".
fn count(conn: &Connection) {
    static IN_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let stored = attachment::get(conn);
    let n = u64::from_le_bytes(stored.try_into().unwrap_or([0; 8])) + 1;
    log_err(conn, attachment::set(conn, &n.to_le_bytes()));
    let here = IN_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    log_err(conn, conn.send_text(&format!("count={n} instance={here}")));
}

export!(Chaos);
