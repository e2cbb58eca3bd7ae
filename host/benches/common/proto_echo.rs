//! The same echo server three ways, to measure what the I/O model costs
//! (the io-model bench): wharf's sans-IO protocol crate with no plugin,
//! driven by tokio (epoll, `recv` and `send` per readiness), by monoio's
//! io_uring driver (the reads and writes submitted to a ring, completions
//! reaped in batches), and by monoio's epoll driver (the same code as the
//! io_uring server, so the runtime's own cost is told apart from the I/O
//! model's). Each is this bench's binary re-executed with `--serve NAME`;
//! it prints `listening on ws://ADDR` like `wharf serve`.
//!
//! The connection is identical in all three: read up to [`READ`] bytes,
//! feed them to [`Echo`] (the handshake, then `WebSocket::read`, each
//! message copied out and sent back as it came), gather what the protocol
//! queued into one buffer and write it with one call. Gathering copies the
//! output once more than a `writev` would; monoio's owned-buffer writes
//! make the copy the simple way there, so tokio's server makes it too.

use std::io::IoSlice;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use wharf_protocol::{Config, Event, HandshakeLimits, WebSocket, accept_response, parse_request};

/// Largest read: a 1 KiB ×16 pipelined batch in one, a 64 KiB message in
/// two.
const READ: usize = 64 << 10;

/// The servers, by their `--serve` names.
pub const NAMES: [&str; 3] = ["proto-uring", "proto-tokio", "proto-epoll"];

/// One connection's protocol state: fed what was read, gives what to write.
struct Echo {
    /// The upgrade request while it arrives.
    head: Vec<u8>,
    ws: Option<WebSocket>,
    text: String,
    binary: Vec<u8>,
}

/// What a message asks the echo to send back once the protocol's borrow ends.
enum Reply {
    Text,
    Binary,
    Nothing,
}

impl Echo {
    fn new() -> Self {
        Echo {
            head: Vec::new(),
            ws: None,
            text: String::new(),
            binary: Vec::new(),
        }
    }

    /// Takes `input`; appends what to write to `out`. `false`: close the
    /// connection once `out` is written.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        let now = Instant::now();
        if self.ws.is_some() {
            return self.frames(input, out, now);
        }
        self.head.extend_from_slice(input);
        match parse_request(&self.head, &HandshakeLimits::default()) {
            Ok(None) => true,
            Ok(Some((request, n))) => {
                let Ok(reply) = accept_response(request.key(), None, &[]) else {
                    return false;
                };
                out.extend_from_slice(&reply);
                let config = Config {
                    max_message_size: 16 << 20,
                    ..Config::default()
                };
                self.ws = Some(WebSocket::new(config, now));
                // What came after the request: frames the client pipelined.
                let head = std::mem::take(&mut self.head);
                self.frames(head.get(n..).unwrap_or_default(), out, now)
            }
            Err(e) => {
                out.extend_from_slice(&e.response());
                false
            }
        }
    }

    fn frames(&mut self, mut input: &[u8], out: &mut Vec<u8>, now: Instant) -> bool {
        let Some(ws) = self.ws.as_mut() else {
            return false;
        };
        let mut open = true;
        loop {
            let reply = match ws.read(&mut input, now) {
                None => break,
                Some(Event::Text(t)) => {
                    self.text.clear();
                    self.text.push_str(t);
                    Reply::Text
                }
                Some(Event::Binary(b)) => {
                    self.binary.clear();
                    self.binary.extend_from_slice(b);
                    Reply::Binary
                }
                Some(Event::MaskedBinary(m)) => {
                    self.binary.clear();
                    self.binary.extend_from_slice(m.unmask());
                    Reply::Binary
                }
                Some(Event::Closed(_)) => {
                    open = false;
                    Reply::Nothing
                }
            };
            let _ = match reply {
                Reply::Text => ws.send_text(&self.text),
                Reply::Binary => ws.send_binary(&self.binary),
                Reply::Nothing => Ok(()),
            };
        }
        while ws.has_output() {
            let written = {
                let mut slices = [IoSlice::new(&[]); 64];
                let filled = ws.output_slices(&mut slices);
                slices[..filled].iter().fold(0, |n, s| {
                    out.extend_from_slice(s);
                    n + s.len()
                })
            };
            ws.advance_output(written);
        }
        open && !ws.is_closed()
    }
}

/// `--serve NAME`: serves until killed.
pub fn main(name: &str) -> Result<()> {
    match name {
        "proto-tokio" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(on_tokio::serve()),
        "proto-uring" => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .context(
                "io_uring runtime (is io_uring allowed here? /proc/sys/kernel/io_uring_disabled)",
            )?
            .block_on(on_monoio::serve()),
        "proto-epoll" => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .context("monoio epoll runtime")?
            .block_on(on_monoio::serve()),
        other => bail!("unknown server {other:?}; known: {}", NAMES.join(", ")),
    }
}

mod on_tokio {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub(super) async fn serve() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on ws://{}", listener.local_addr()?);
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(connection(s));
        }
    }

    async fn connection(mut s: TcpStream) {
        let mut echo = Echo::new();
        let mut buf = vec![0; READ];
        let mut out = Vec::new();
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let open = echo.feed(&buf[..n], &mut out);
            if !out.is_empty() && s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
            if !open {
                return;
            }
        }
    }
}

mod on_monoio {
    use super::*;
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    use monoio::net::{TcpListener, TcpStream};

    pub(super) async fn serve() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        println!("listening on ws://{}", listener.local_addr()?);
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            monoio::spawn(connection(s));
        }
    }

    async fn connection(mut s: TcpStream) {
        let mut echo = Echo::new();
        let mut buf = Vec::with_capacity(READ);
        let mut out = Vec::new();
        loop {
            buf.clear();
            let (read, b) = s.read(buf).await;
            buf = b;
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let open = echo.feed(&buf, &mut out);
            if !out.is_empty() {
                let (written, o) = s.write_all(out).await;
                out = o;
                if written.is_err() {
                    return;
                }
            }
            out.clear();
            if !open {
                return;
            }
        }
    }
}
