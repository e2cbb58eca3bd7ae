//! A connection's transport split into the halves the driver reads and
//! writes through, and, for plain TCP, the socket a plugin's large sends
//! are written to during its call ([`DirectWrite`]).
//!
//! The kernel's socket under either stays known to the driver
//! ([`Socket`]), to ask about the peer while it is not reading.
//!
//! A TLS stream (and the tests' in-memory pipes) are split by
//! `tokio::io::split`, whose halves share the stream behind a lock. A TCP
//! socket needs no lock: its reads and writes take `&self`, so both halves,
//! and the plugin's writes, share it by reference count.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::runtime::connection_host::DirectWrite;
use crate::tenancy::Tenant;

/// A transport the connection's task can split.
pub(crate) trait Transport: Send + Sized {
    type Reader: AsyncRead + Unpin + Send;
    type Writer: AsyncWrite + Unpin + Send;

    /// The halves, and the socket a call may write to, if it is plain TCP.
    fn split(self) -> (Self::Reader, Self::Writer, Option<Weak<TcpStream>>);

    /// The kernel's socket underneath.
    fn socket(&self) -> Socket;
}

impl Transport for TcpStream {
    type Reader = TcpReader;
    type Writer = TcpWriter;

    fn socket(&self) -> Socket {
        Socket(Some(self.as_raw_fd()))
    }

    fn split(self) -> (TcpReader, TcpWriter, Option<Weak<TcpStream>>) {
        let stream = Arc::new(self);
        let direct = Arc::downgrade(&stream);
        (TcpReader(stream.clone()), TcpWriter(stream), Some(direct))
    }
}

/// Split with a lock: the stream's reads and writes take `&mut`.
macro_rules! split_locked {
    ($($t:ty => $socket:expr),*) => {$(
        impl Transport for $t {
            type Reader = ReadHalf<$t>;
            type Writer = WriteHalf<$t>;

            fn split(self) -> (Self::Reader, Self::Writer, Option<Weak<TcpStream>>) {
                let (reader, writer) = tokio::io::split(self);
                (reader, writer, None)
            }

            fn socket(&self) -> Socket {
                Socket($socket(self))
            }
        }
    )*};
}

split_locked!(tokio_rustls::server::TlsStream<TcpStream> => |s: &Self| Some(s.get_ref().0.as_raw_fd()));
#[cfg(test)]
split_locked!(tokio::io::DuplexStream => |_| None);

/// A connection's socket as the kernel knows it, for what the driver cannot
/// learn by reading: a connection paused for the server's budget reads
/// nothing, so it would not see its peer's FIN or reset until its wait ran
/// out (`server.buffered_wait`), holding its part of the budget all along.
/// `None` for the tests' in-memory pipes.
///
/// A bare descriptor: the stream it comes from (owned by the halves, which
/// the driver holds for as long as it holds this) keeps it open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Socket(Option<RawFd>);

impl Socket {
    /// Whether the peer has sent its FIN or reset the connection: the
    /// socket's TCP state, which unread data does not hide (a read would
    /// see the EOF only after all of it). A FIN the peer's kernel still
    /// holds behind data our closed receive window kept it from sending
    /// arrives only once we read again; a reset always arrives.
    pub(crate) fn peer_left(self) -> bool {
        // linux/tcp_states.h: CLOSE once reset, CLOSE_WAIT after the
        // peer's FIN (while our side is open).
        const TCP_CLOSE: u8 = 7;
        const TCP_CLOSE_WAIT: u8 = 8;
        let Some(fd) = self.0 else {
            return false;
        };
        // SAFETY: `info` is a valid `tcp_info` and `len` its size; the
        // kernel writes at most `len` bytes into it. `fd` is open (see the
        // type's doc); were it not, the call would fail with EBADF, which
        // reads as "still there".
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        rc == 0 && matches!(info.tcpi_state, TCP_CLOSE | TCP_CLOSE_WAIT)
    }
}

/// Runs one read or write (`io`, on the socket: what it moved and what it
/// asked to move) when tokio says the socket is ready. A short one drained
/// the socket: tokio is told so from inside `try_io`, which then forgets
/// the readiness it saw before the call (never a newer one), as tokio's
/// own `TcpStream` does; the next poll waits instead of making a system
/// call that would find nothing.
fn poll_io(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut io: impl FnMut(&socket2::Socket) -> io::Result<(usize, usize)>,
) -> Poll<io::Result<usize>> {
    loop {
        let ready = if interest == Interest::READABLE {
            stream.poll_read_ready(cx)
        } else {
            stream.poll_write_ready(cx)
        };
        ready!(ready)?;
        let mut moved = None;
        let r = stream.try_io(interest, || {
            let (n, asked) = io(&SockRef::from(stream))?;
            moved = Some(n);
            if n > 0 && n < asked {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        if let Some(n) = moved {
            return Poll::Ready(Ok(n));
        }
        match r {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
            // `try_io` is `Ok` only after `io` was.
            Ok(()) => return Poll::Ready(Ok(0)),
        }
    }
}

/// Writes without raising SIGPIPE on a closed connection.
fn send(socket: &socket2::Socket, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
}

/// A TCP connection's read half.
#[derive(Debug)]
pub(crate) struct TcpReader(Arc<TcpStream>);

impl AsyncRead for TcpReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_io(&self.0, cx, Interest::READABLE, |socket| {
            let asked = buf.remaining();
            // SAFETY: `recv` only writes into the unfilled part (it never
            // de-initializes a byte), and it wrote its first `n` bytes.
            // (Zeroing the part first, the safe way, would cost a memset
            // of up to 64 KiB a read.)
            let n = socket.recv(unsafe { buf.unfilled_mut() })?;
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            Ok((n, asked))
        })
        .map_ok(|_| ())
    }
}

/// A TCP connection's write half.
#[derive(Debug)]
pub(crate) struct TcpWriter(Arc<TcpStream>);

impl AsyncWrite for TcpWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let asked = bufs.iter().map(|b| b.len()).sum();
        poll_io(&self.0, cx, Interest::WRITABLE, |socket| {
            Ok((send(socket, bufs)?, asked))
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// A plain TCP connection's socket, for its plugin's large sends (see
/// [`DirectWrite`]). Weak: a store that outlived its connection cannot
/// keep the socket open.
pub(super) struct DirectTcp {
    pub(super) stream: Weak<TcpStream>,
    pub(super) tenant: Arc<Tenant>,
}

impl std::fmt::Debug for DirectTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTcp")
            .field("tenant", &self.tenant.name)
            .finish_non_exhaustive()
    }
}

impl DirectWrite for DirectTcp {
    fn try_write(&self, bufs: &[IoSlice<'_>]) -> usize {
        let Some(stream) = self.stream.upgrade() else {
            return 0;
        };
        // Through tokio, so that a socket it knows to be full is not tried.
        stream
            .try_io(Interest::WRITABLE, || send(&SockRef::from(&*stream), bufs))
            .unwrap_or(0)
    }

    fn count_sent(&self, text: bool, bytes: usize) {
        self.tenant.counters.message_sent(!text, bytes as u64);
    }
}
