//! A plugin's stdout and stderr, forwarded line by line to the host's log,
//! tagged with the plugin and the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line logged; the rest of a longer line is cut (and said so), so a
/// plugin cannot make the host buffer without bound.
const MAX_LINE: usize = 4096;

/// Lines one instance may log (stdout and stderr together); past it output is
/// dropped, said once, so a chatty plugin cannot flood the host's log.
pub const MAX_LINES_PER_INSTANCE: u32 = 10_000;

/// Which of the plugin's streams.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The `StdoutStream` handed to WASI: every stream it makes logs the same way.
#[derive(Clone)]
pub struct LogStream {
    plugin: Arc<str>,
    conn: u64,
    stream: Stream,
    /// Lines left for this instance, shared by its stdout and stderr.
    budget: Arc<AtomicU32>,
}

impl LogStream {
    /// The instance's stdout and stderr, sharing one line budget.
    pub fn pair(plugin: Arc<str>, conn: u64) -> (Self, Self) {
        let budget = Arc::new(AtomicU32::new(MAX_LINES_PER_INSTANCE));
        let make = |stream| Self {
            plugin: plugin.clone(),
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
        let left = self
            .tag
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if left.is_err() {
            self.line.clear();
            self.cut = false;
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.trim_end_matches('\r');
        let (plugin, conn, cut) = (&*self.tag.plugin, self.tag.conn, self.cut);
        match self.tag.stream {
            Stream::Stdout => {
                tracing::info!(target: "wharf::plugin", plugin, conn, cut, "stdout: {text}")
            }
            Stream::Stderr => {
                tracing::warn!(target: "wharf::plugin", plugin, conn, cut, "stderr: {text}")
            }
        }
        self.line.clear();
        self.cut = false;
        if left == Ok(1) {
            tracing::warn!(target: "wharf::plugin", plugin, conn,
                "plugin wrote {MAX_LINES_PER_INSTANCE} log lines; dropping the rest of its output");
        }
    }
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
    fn lines_are_cut_and_budgeted() {
        let (out, err) = LogStream::pair("p".into(), 7);
        let mut a = out.sink();
        let mut b = err.sink();
        a.push(&vec![b'x'; MAX_LINE + 10]);
        assert!(a.cut && a.line.len() == MAX_LINE);
        a.push(b"\n");
        assert!(a.line.is_empty() && !a.cut);
        for _ in 0..MAX_LINES_PER_INSTANCE {
            b.push(b"line\n");
        }
        // stdout's line plus stderr's share one budget: it ran out.
        assert_eq!(out.budget.load(Ordering::Relaxed), 0);
        b.push(b"dropped\n");
        assert_eq!(out.budget.load(Ordering::Relaxed), 0);
    }
}
