//! A plugin's stdout and stderr, forwarded line by line to the host's log,
//! tagged with the tenant and the connection, within the tenant's budget of
//! lines per second.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line logged; the rest of a longer line is cut (and said so), so a
/// plugin cannot make the host buffer without bound.
const MAX_LINE: usize = 4096;

/// Lines a tenant's instances may log per second, together: past it lines
/// are dropped and counted, and the count is logged once a second, so no
/// plugin (nor a tenant with many connections) can flood the host's log.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    /// The second (since `start`) the budget is for.
    second: AtomicU64,
    left: AtomicU32,
    dropped_this_second: AtomicU64,
    /// `wharf_plugin_log_dropped_total` for the tenant.
    dropped: prometheus_client::metrics::counter::Counter,
    start: Instant,
}

impl LogBudget {
    pub fn new(
        per_second: u32,
        dropped: prometheus_client::metrics::counter::Counter,
    ) -> Arc<Self> {
        Arc::new(Self {
            per_second,
            second: AtomicU64::new(0),
            left: AtomicU32::new(per_second),
            dropped_this_second: AtomicU64::new(0),
            dropped,
            start: Instant::now(),
        })
    }

    /// Takes one line; `false` if the tenant is over its budget.
    fn take(&self, tenant: &str) -> bool {
        let now = self.start.elapsed().as_secs();
        let second = self.second.load(Ordering::Relaxed);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.left.store(self.per_second, Ordering::Relaxed);
            let dropped = self.dropped_this_second.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                tracing::warn!(target: "wharf::plugin", tenant, dropped,
                    "plugin log lines dropped: over the tenant's log_lines_per_second");
            }
        }
        let ok = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if !ok {
            self.dropped.inc();
            self.dropped_this_second.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

/// Which of the plugin's streams.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The `StdoutStream` handed to WASI: every stream it makes logs the same way.
#[derive(Clone)]
pub struct LogStream {
    tenant: Arc<str>,
    conn: u64,
    stream: Stream,
    /// The tenant's, shared by all its instances' stdout and stderr.
    budget: Arc<LogBudget>,
}

impl LogStream {
    /// An instance's stdout and stderr.
    pub fn pair(tenant: Arc<str>, conn: u64, budget: Arc<LogBudget>) -> (Self, Self) {
        let make = |stream| Self {
            tenant: tenant.clone(),
            conn,
            stream,
            budget: budget.clone(),
        };
        (make(Stream::Stdout), make(Stream::Stderr))
    }

    fn sink(&self) -> LineSink {
        LineSink {
            tag: self.clone(),
            line: Vec::new(),
            cut: false,
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.sink())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.sink())
    }
}

/// Collects bytes into lines and logs each complete one.
struct LineSink {
    tag: LogStream,
    line: Vec<u8>,
    cut: bool,
}

impl LineSink {
    fn push(&mut self, mut data: &[u8]) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.append(&data[..pos]);
            self.emit();
            data = &data[pos + 1..];
        }
        self.append(data);
    }

    fn append(&mut self, data: &[u8]) {
        let room = MAX_LINE - self.line.len();
        if data.len() > room {
            self.cut = true;
        }
        self.line.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn emit(&mut self) {
        let (tenant, conn, cut) = (&*self.tag.tenant, self.tag.conn, self.cut);
        if self.tag.budget.take(tenant) {
            let text = escape(&self.line);
            match self.tag.stream {
                Stream::Stdout => {
                    tracing::info!(target: "wharf::plugin", tenant, conn, cut, "stdout: {text}")
                }
                Stream::Stderr => {
                    tracing::warn!(target: "wharf::plugin", tenant, conn, cut, "stderr: {text}")
                }
            }
        }
        self.line.clear();
        self.cut = false;
    }
}

/// A line as text with its control characters escaped (`\r`, `\u{1b}`,
/// ...), so that a plugin cannot forge log lines or drive a terminal. A
/// trailing `\r` (a CRLF line end) is dropped.
fn escape(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for LineSink {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

impl AsyncWrite for LineSink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait::async_trait]
impl Pollable for LineSink {
    async fn ready(&mut self) {}
}

impl OutputStream for LineSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_budgeted_per_tenant() {
        let dropped = prometheus_client::metrics::counter::Counter::default();
        let budget = LogBudget::new(100, dropped.clone());
        let (out, _) = LogStream::pair("p".into(), 7, budget.clone());
        // Another instance of the same tenant shares the budget.
        let (_, err) = LogStream::pair("p".into(), 8, budget);
        let mut a = out.sink();
        let mut b = err.sink();
        a.push(&vec![b'x'; MAX_LINE + 10]);
        assert!(a.cut && a.line.len() == MAX_LINE);
        a.push(b"\n");
        assert!(a.line.is_empty() && !a.cut);
        for _ in 0..150 {
            b.push(b"line\n");
        }
        // Within one second (the test is far quicker): 99 of b's 150 got through.
        assert_eq!(dropped.get(), 51);
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            escape(b"ok\r2026-12-01 ERROR forged\x1b[2J\0\x0b\tend\r"),
            "ok\\r2026-12-01 ERROR forged\\u{1b}[2J\\u{0}\\u{b}\tend"
        );
    }
}
