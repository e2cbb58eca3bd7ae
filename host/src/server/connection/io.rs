//! The socket side of the driver: reads and writes polled without
//! waiting, and the buffers they fill and drain.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use wharf_protocol::WebSocket;

/// Slices handed to one vectored write: the queue is a few chunks of at least
/// 16 KiB and a tail, so 16 carry plenty per call (and are cheap to set up).
pub(super) const WRITE_SLICES: usize = 16;

/// Gets the read buffer back after a pass over its contents, keeping its
/// allocation when nothing else holds it.
pub(super) fn reuse(rbuf: BytesMut, mut consumed: BytesMut) -> BytesMut {
    consumed.clear();
    if rbuf.is_empty() {
        consumed.unsplit(rbuf);
        consumed
    } else {
        rbuf
    }
}

/// One step of writing: the queued slices, or, with none left, a flush of
/// what a TLS stream buffered. `Some(n)`: n bytes written; `None`: flushed.
pub(super) fn poll_write_or_flush<W: AsyncWrite + Unpin>(
    writer: Pin<&mut W>,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<std::io::Result<Option<usize>>> {
    if slices.is_empty() {
        writer.poll_flush(cx).map_ok(|()| None)
    } else {
        writer.poll_write_vectored(cx, slices).map_ok(Some)
    }
}

/// Applies a write step's outcome to the output queue. `Err`: the
/// transport is gone.
pub(super) fn wrote(
    ws: &mut WebSocket,
    needs_flush: &mut bool,
    written: std::io::Result<Option<usize>>,
) -> Result<(), ()> {
    match written {
        Err(_) | Ok(Some(0)) => return Err(()),
        Ok(Some(n)) => {
            ws.advance_output(n);
            *needs_flush = true;
        }
        Ok(None) => *needs_flush = false,
    }
    Ok(())
}

/// Reads what the transport hands over without waiting, into the buffer's
/// spare room, up to `most` bytes; `true` if that filled it. For TLS,
/// which hands out one record per read: a burst of messages should reach
/// the plugin as one batch, not one per record.
pub(super) fn read_ready<R: AsyncRead + Unpin, B: BufMut>(
    reader: &mut R,
    buf: &mut B,
    most: usize,
) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = buf.limit(most);
    while buf.has_remaining_mut() {
        let read = std::pin::pin!(reader.read_buf(&mut buf));
        match read.poll(&mut cx) {
            Poll::Ready(Ok(n)) if n > 0 => {}
            // Not now; or EOF or an error, which the next read sees again.
            _ => return false,
        }
    }
    true
}

/// Writes queued output, and flushes, as far as the socket takes it without
/// waiting; what is left is written by the driver's wait. `Err`: the
/// transport is gone.
pub(super) fn write_now<W: AsyncWrite + Unpin>(
    writer: &mut W,
    ws: &mut WebSocket,
    needs_flush: &mut bool,
) -> Result<(), ()> {
    // Polled with a waker that does nothing: `Pending` only means "not
    // now", and the wait polls the same write with the task's waker.
    let mut cx = Context::from_waker(Waker::noop());
    while ws.has_output() || *needs_flush {
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let filled = ws.output_slices(&mut slices);
        match poll_write_or_flush(Pin::new(&mut *writer), &mut cx, &slices[..filled]) {
            Poll::Ready(written) => wrote(ws, needs_flush, written)?,
            Poll::Pending => break,
        }
    }
    Ok(())
}
