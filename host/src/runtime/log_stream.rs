//! A plugin's stdout and stderr, forwarded line by line to the host's log,
//! tagged with the plugin and the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line logged; the rest of a longer line is cut (and said so), so a
/// plugin cannot make the host buffer without bound.
const MAX_LINE: usize = 4096;

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
}

impl LogStream {
    pub fn new(plugin: Arc<str>, conn: u64, stream: Stream) -> Self {
        Self {
            plugin,
            conn,
            stream,
        }
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
