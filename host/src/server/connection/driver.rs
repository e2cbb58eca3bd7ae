//! The open connection's loop, driven the way quinn drives a connection:
//! each pass is a few named steps (input to the plugin, counts to the
//! metrics, output to the socket, the deadlines), then one wait for
//! whatever comes next (a read, a write, a publish, a swap, a timer,
//! shutdown), which the pass hands to the step that deals with it. The
//! passes of an awake connection run in a boxed future; a hibernated one,
//! or one idle for [`SETTLE`], waits outside it, so an idle server's
//! connections are small.

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;
use tokio_util::io::poll_read_buf;
use wharf_protocol::{CloseCode, Framed, State};

use super::conn::Conn;
use super::io::{WRITE_SLICES, poll_write_or_flush, read_ready, reuse, write_now, wrote};
use super::transport::Socket;
use crate::beacon::Watcher;
use crate::server::budget;

/// The most read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// What a connection reads at a time until a read fills its buffer; each
/// read that does makes the next chunk [`GROWTH`] times larger, up to
/// [`READ_CHUNK`]. Most connections carry small messages and sit idle most
/// of the time: ten thousand 4 KiB buffers (the size once used) are 40 MB
/// of an idle server. A connection starts, and a hibernated one starts
/// again, at this size: a small message's frame fits.
const FIRST_READ_CHUNK: usize = 64;
/// See [`FIRST_READ_CHUNK`]: 64 B, 1 KiB, 16 KiB, 64 KiB.
const GROWTH: usize = 16;
/// A frame's payload at least this large, with nothing else read ahead of
/// it, is read straight into the protocol's message buffer (see
/// `WebSocket::split_io`), not through the read buffer and a copy out of
/// it: a 64 KiB echo copied its payload three times, tokio-tungstenite once.
/// Below it, one read that takes several frames at once is worth more than
/// the copy it saves.
const DIRECT_MIN: usize = 16 * 1024;

/// How long an awake connection goes without an event before it waits
/// outside the awake passes' box, which it then frees (3 KiB, most of it
/// a plugin call's state), with its counts' box and its empty read buffer.
/// Waking allocates them again: once per message for a connection that
/// hears from its peer less often than this.
pub(super) const SETTLE: Duration = Duration::from_secs(1);

/// What the loop carries from one pass to the next.
pub(super) struct Driver {
    read: ReadBuffer,
    /// The peer closed its side (or the read failed): nothing more to read.
    eof: bool,
    /// Written since the last flush (a TLS stream buffers what it encrypts).
    needs_flush: bool,
    /// Shutdown was seen (and the connection told, with 1001).
    shutting_down: bool,
    /// Once closed, until when what is left may still be written.
    flush_deadline: Option<Instant>,
    /// Since when the send queue has been at its high-water mark.
    backed_up_since: Option<Instant>,
    /// Since when queued output has waited with nothing of it written (a
    /// peer that reads nothing at all, below the queue's mark too).
    unwritten_since: Option<Instant>,
    /// Not reading for the server's budget, since when: boxed, as it is
    /// rare.
    paused: Option<Box<budget::Paused>>,
    /// The deadline the timer is set to, if it is.
    armed: Option<Instant>,
    /// Since when the awake passes' box has been there.
    awake_since: Instant,
    /// Idle for [`SETTLE`]: the next wait is made outside the box.
    settled: bool,
    tls: bool,
    /// To see the peer leave while not reading (see [`Socket`]).
    socket: Socket,
}

/// The read buffer, sized to what the connection is doing.
struct ReadBuffer {
    bytes: BytesMut,
    /// What the buffer is grown by when it runs low (see [`FIRST_READ_CHUNK`]).
    chunk: usize,
    /// A frame's payload was read into the protocol's buffer since the last
    /// pass over the input (see [`DIRECT_MIN`]).
    direct: bool,
    /// Freed while the connection is idle (see [`ReadBuffer::release`]).
    /// Not the same as no capacity: after a read that filled the buffer,
    /// what is left of it has none until `reserve` takes the whole
    /// allocation back.
    released: bool,
}

/// This pass's deadlines.
#[derive(Clone, Copy)]
struct Deadlines {
    /// The protocol's timers (ping, idle, close handshake).
    protocol: Option<Instant>,
    /// Once closed, the end of the time left to write what is queued.
    flush: Option<Instant>,
    /// A `restart` swap's 1012 for this connection.
    restart: Option<Instant>,
    /// The send queue has stayed full, or its output unwritten, for the
    /// grace period: 1008.
    slow_consumer: Option<Instant>,
    /// The instance has been idle long enough to release.
    hibernate: Option<Instant>,
    /// The connection has been idle for [`SETTLE`] (see there).
    settle: Option<Instant>,
    /// The connection has waited for the server's budget long enough: 1013.
    budget: Option<Instant>,
    /// While it waits for the budget: when to look again (see
    /// [`budget::RECHECK`]).
    budget_recheck: Option<Instant>,
}

/// What ended a wait.
enum Wake {
    Shutdown,
    Written(std::io::Result<Option<usize>>),
    /// `false`: the tenant is gone.
    Swapped(bool),
    /// A shared instance queued sends for this connection, or failed.
    PeerWoke,
    /// `None`: the mailbox is closed.
    Published(Option<Framed>),
    Read(std::io::Result<usize>, ReadInto),
    /// Connections gave bytes back to the server's budget.
    BudgetFreed,
    Timer,
}

/// Where a read went.
#[derive(Clone, Copy)]
enum ReadInto {
    /// The read buffer, which had this much room before it.
    Buffer(usize),
    /// The payload of a large frame, into the protocol's buffer.
    Payload,
}

/// What wakes a waiting connection besides its socket: kept across its
/// awake and asleep passes.
struct Wakers<'a> {
    shutdown: Watcher,
    timer: Pin<&'a mut Sleep>,
    /// A shared instance's member is woken by other connections' calls.
    peer: Option<Watcher>,
}

/// How the awake passes ended.
enum Pass {
    /// Hibernated, or idle for [`SETTLE`]: the next wait is made outside
    /// the box.
    Asleep,
    /// The WebSocket is done, its output written.
    Closed,
    /// The transport is gone, or given up on: no lingering close.
    Dropped,
}

/// Whether the loop goes on after a step.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    /// The transport is gone, or gave up on: no lingering close.
    Drop,
}

/// Since when `holds` has been true, kept in `at` from one pass to the
/// next; `None` (and `at` cleared) when it is not.
fn since(at: &mut Option<Instant>, holds: bool) -> Option<Instant> {
    if holds {
        Some(*at.get_or_insert_with(Instant::now))
    } else {
        *at = None;
        None
    }
}

impl Deadlines {
    fn earliest(&self) -> Option<Instant> {
        [
            self.protocol,
            self.flush,
            self.restart,
            self.slow_consumer,
            self.hibernate,
            self.settle,
            self.budget,
            self.budget_recheck,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl ReadBuffer {
    /// Takes over what the upgrade read: bytes after the request, if any
    /// (a client may send its first frame with it), else a small buffer in
    /// place of the request's.
    fn new(bytes: BytesMut) -> Self {
        let bytes = if bytes.is_empty() {
            BytesMut::with_capacity(FIRST_READ_CHUNK)
        } else {
            bytes
        };
        Self {
            bytes,
            chunk: FIRST_READ_CHUNK,
            direct: false,
            released: false,
        }
    }

    /// Room for the next read. A released buffer stays released until a
    /// read brings something (see [`poll_read`](Self::poll_read)).
    fn make_room(&mut self) -> usize {
        if self.released {
            return FIRST_READ_CHUNK;
        }
        if self.bytes.capacity() - self.bytes.len() < self.chunk / 4 {
            self.bytes.reserve(self.chunk);
        }
        self.bytes.capacity() - self.bytes.len()
    }

    /// A read of `n` bytes into `spare` bytes of room; `more`: others were
    /// already waiting. A read that filled the buffer means larger messages
    /// (or a burst): the next chunk is larger.
    fn filled(&mut self, n: usize, spare: usize, more: bool) {
        if n == spare || more {
            self.chunk = (self.chunk * GROWTH).min(READ_CHUNK);
        }
    }

    /// Reads into the room [`make_room`](Self::make_room) made. A released
    /// buffer's read goes to the stack, and only bytes read allocate it:
    /// an idle connection waits with no buffer at all.
    fn poll_read<R: AsyncRead + Unpin>(
        &mut self,
        reader: Pin<&mut R>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        if !self.released {
            return poll_read_buf(reader, cx, &mut self.bytes);
        }
        let mut stack = [0u8; FIRST_READ_CHUNK];
        let mut read = ReadBuf::new(&mut stack);
        std::task::ready!(reader.poll_read(cx, &mut read))?;
        if !read.filled().is_empty() {
            self.bytes = BytesMut::with_capacity(FIRST_READ_CHUNK);
            self.bytes.extend_from_slice(read.filled());
            self.released = false;
        }
        Poll::Ready(Ok(read.filled().len()))
    }

    /// The connection went idle: an empty buffer is freed (the next read
    /// makes a small one, see [`poll_read`](Self::poll_read)).
    /// Returns the bytes freed.
    fn release(&mut self) -> usize {
        if !self.bytes.is_empty() {
            return 0;
        }
        self.chunk = FIRST_READ_CHUNK;
        self.released = true;
        std::mem::take(&mut self.bytes).capacity()
    }

    /// An empty buffer that grew starts small again.
    fn shrink(&mut self) {
        if self.bytes.is_empty() {
            self.chunk = FIRST_READ_CHUNK;
            if self.bytes.capacity() > FIRST_READ_CHUNK {
                self.bytes = BytesMut::with_capacity(FIRST_READ_CHUNK);
            }
        }
    }
}

impl Driver {
    pub(super) fn new(rbuf: BytesMut, tls: bool, socket: Socket) -> Self {
        Self {
            read: ReadBuffer::new(rbuf),
            eof: false,
            needs_flush: false,
            shutting_down: false,
            flush_deadline: None,
            backed_up_since: None,
            unwritten_since: None,
            paused: None,
            armed: None,
            awake_since: Instant::now(),
            settled: false,
            tls,
            socket,
        }
    }

    /// Sets the timer to `deadline` if it is earlier than the armed one.
    /// Activity only ever moves the deadlines later, so a timer that fires
    /// early is harmless (each deadline is checked against the clock) and
    /// saves a timer-wheel insert and removal per message.
    fn arm(&mut self, timer: Pin<&mut Sleep>, deadline: Option<Instant>) {
        match (deadline, self.armed) {
            (Some(d), Some(a)) if d >= a => {}
            (Some(d), _) => {
                timer.reset(d.into());
                self.armed = Some(d);
            }
            (None, _) => self.armed = None,
        }
    }
}

impl Conn {
    /// The connection's main loop, until the close handshake is over and the
    /// output flushed (or the transport is gone).
    ///
    /// The driver is the caller's: an async fn keeps its arguments in its
    /// state for its whole life, so the read buffer and socket it is made
    /// of would stay there beside it.
    pub(super) async fn drive<R, W>(&mut self, reader: &mut R, writer: &mut W, d: &mut Driver)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Registered once, not on every pass (see `crate::beacon`).
        let shutdown = self.shared.stop.watch();
        // A shutdown that began before the watch was made fired already.
        if self.shared.shutdown.is_cancelled() {
            let _ = self.on_shutdown(d);
        }
        // A shared instance's member is woken by other connections' calls.
        let peer = self.handler.take_peer_watcher();
        // One timer for the connection's life (see `Driver::arm`).
        let timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(timer);
        let mut wakers = Wakers {
            shutdown,
            timer: timer.as_mut(),
            peer,
        };
        let mut woke = None;
        let end = loop {
            // Boxed, while awake: its steps' plugin calls are most of the
            // task's state (2.9 KiB), which a hibernated or settled
            // connection, most of an idle server's, then does not carry.
            let awake = self.awake(d, reader, writer, &mut wakers, woke.take());
            match Box::pin(awake).await {
                Pass::Asleep => {
                    woke = Some(self.wait(d, reader, writer, &mut wakers).await);
                    d.awake_since = Instant::now();
                }
                end => break end,
            }
        };
        if matches!(end, Pass::Dropped) {
            return;
        }
        // The WebSocket is done: its version no longer serves it (a drain
        // deploy sees it gone now, not after the peer's TCP close).
        self.serving.release();
        // After a clean closing handshake over plain TCP the peer has sent
        // its Close and, keeping to RFC 6455, nothing after it: no data in
        // flight for the kernel to answer with a reset, so the socket is
        // closed at once (its FIN first, the server keeping TIME_WAIT, as
        // §7.1.1 asks), saving a shutdown, a read and a wake-up. Over TLS
        // the peer's close_notify may still be on its way; after a failed
        // or timed-out close the peer may still be sending.
        if d.tls || !self.closed.as_ref().is_some_and(|c| c.clean) {
            self.linger(reader, writer, &mut d.read.bytes).await;
        }
    }

    /// The loop's passes while the connection is awake (neither hibernated
    /// nor settled), starting with the step for `woke` if the wait that
    /// ended it was made outside.
    async fn awake<R, W>(
        &mut self,
        d: &mut Driver,
        reader: &mut R,
        writer: &mut W,
        wakers: &mut Wakers<'_>,
        woke: Option<Wake>,
    ) -> Pass
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // The deadlines the asleep wait was armed with: nothing has run
        // since, so they are the same (not carried across the wait, where
        // every idle connection would hold them).
        if let Some(wake) = woke {
            let deadlines = self.deadlines(d);
            if self.on_wake(wake, d, reader, deadlines).await == Flow::Drop {
                return Pass::Dropped;
            }
        }
        loop {
            self.take_input(&mut d.read).await;
            // The counts go to the shared metrics before the replies go
            // out, so that whoever sees a reply also sees it counted.
            self.publish_counts();
            if self.write_ready(writer, d).await == Flow::Drop {
                return Pass::Dropped;
            }
            if self.ws.is_closed() && !self.ws.has_output() && !d.needs_flush {
                return Pass::Closed;
            }
            self.account(d);
            let deadlines = self.deadlines(d);
            d.arm(wakers.timer.as_mut(), deadlines.earliest());
            if self.handler.is_parked() || std::mem::take(&mut d.settled) {
                return Pass::Asleep;
            }
            let wake = self.wait(d, reader, writer, wakers).await;
            if self.on_wake(wake, d, reader, deadlines).await == Flow::Drop {
                return Pass::Dropped;
            }
        }
    }

    /// Hands what ended the wait to the step for it.
    async fn on_wake<R: AsyncRead + Unpin>(
        &mut self,
        wake: Wake,
        d: &mut Driver,
        reader: &mut R,
        deadlines: Deadlines,
    ) -> Flow {
        match wake {
            Wake::Shutdown => self.on_shutdown(d),
            Wake::Written(written) => self.on_written(d, written).await,
            Wake::Swapped(true) => {
                self.on_swap().await;
                Flow::Continue
            }
            Wake::Swapped(false) => {
                self.swaps = None;
                Flow::Continue
            }
            Wake::PeerWoke => {
                self.peer_woke().await;
                Flow::Continue
            }
            Wake::Published(message) => self.on_published(message),
            Wake::Read(read, into) => self.on_read(d, reader, read, into).await,
            Wake::BudgetFreed => Flow::Continue,
            Wake::Timer => self.on_timer(d, deadlines).await,
        }
    }

    /// Step: what was read goes through the protocol to the plugin.
    async fn take_input(&mut self, read: &mut ReadBuffer) {
        // After a read into the protocol's own buffer the input is empty:
        // the protocol takes in what it holds.
        if !read.bytes.is_empty() || std::mem::take(&mut read.direct) {
            let input = read.bytes.split();
            // Inline: its plugin calls' state (2.6 KiB) lives in the awake
            // passes' box, which an idle connection does not hold;
            // boxed per read it cost 600 instructions an echo (callgrind).
            self.process_input(&input).await;
            read.bytes = reuse(std::mem::take(&mut read.bytes), input);
        }
        // The input ends inside a large frame's payload, which the next
        // reads take into the protocol's buffer: this read filled the
        // buffer with one frame, not with many small ones that a larger
        // read would batch. The next is small again, so that the next
        // large frame's payload, after its header, goes the same way.
        if self.ws.payload_due() >= DIRECT_MIN {
            read.shrink();
        }
    }

    /// Step: what the input produced goes out now if the socket takes it,
    /// without a round through the wait.
    async fn write_ready<W: AsyncWrite + Unpin>(&mut self, writer: &mut W, d: &mut Driver) -> Flow {
        let before = self.ws.output_len();
        if (self.ws.has_output() || d.needs_flush)
            && write_now(writer, &mut self.ws, &mut d.needs_flush).is_err()
        {
            self.transport_gone().await;
            return Flow::Drop;
        }
        if self.ws.output_len() < before {
            d.unwritten_since = None;
        }
        Flow::Continue
    }

    /// Step: what the connection holds for its peer goes to the server's
    /// budget; past it, a large holder stops reading (see `server::budget`).
    fn account(&mut self, d: &mut Driver) {
        let holding = self.ws.output_len() + self.ws.input_held() + d.read.bytes.capacity();
        self.held.set(holding);
        let waits = self.ws.state() == State::Open && self.held.must_wait(holding);
        if waits != d.paused.is_some() {
            d.paused = waits.then(|| Box::new(self.shared.budget.pause()));
        }
    }

    /// Whether the loop reads: not after EOF or the close, not while the
    /// peer is not taking what it is sent, not while the server's budget
    /// is spent.
    fn wants_read(&self, d: &Driver) -> bool {
        !d.eof && !self.ws.is_closed() && !self.ws.is_backed_up() && d.paused.is_none()
    }

    /// Step: this pass's deadlines. A peer that keeps the send queue full
    /// (it reads slower than the plugin writes), or that takes none of what
    /// is queued for it, has the grace period to catch up; once closed,
    /// what is left to write gets the close timeout, no more: a peer that
    /// stopped reading must not pin the connection.
    fn deadlines(&self, d: &mut Driver) -> Deadlines {
        let open = !self.ws.is_closed();
        let backed_up = since(&mut d.backed_up_since, open && self.ws.is_backed_up());
        let unwritten = since(&mut d.unwritten_since, open && self.ws.has_output());
        let slow_consumer = [backed_up, unwritten]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at + self.shared.send_queue_grace);
        if self.ws.is_closed() && d.flush_deadline.is_none() {
            d.flush_deadline = Some(Instant::now() + self.tenant.ws.close_timeout);
        }
        Deadlines {
            protocol: self.ws.poll_timeout(),
            flush: d.flush_deadline,
            restart: self.restart_at,
            slow_consumer,
            hibernate: self.hibernate_at(),
            // None once settled: the wait outside is armed without it.
            settle: (!d.settled && !self.handler.is_parked())
                .then(|| self.last_event.max(d.awake_since) + SETTLE),
            budget: d
                .paused
                .as_ref()
                .map(|p| p.since + self.shared.buffered_wait),
            budget_recheck: d.paused.as_ref().map(|_| Instant::now() + budget::RECHECK),
        }
    }

    /// Waits for the next thing to do. Shutdown comes first, then writes
    /// (output drains before more input is taken), the timer last. One
    /// closure polls each source, rather than a `select!` of their futures:
    /// every idle connection's task holds this wait, and those futures were
    /// 300 of its 430 bytes.
    fn wait<'a, R, W>(
        &'a mut self,
        d: &'a mut Driver,
        reader: &'a mut R,
        writer: &'a mut W,
        wakers: &'a mut Wakers<'_>,
    ) -> impl Future<Output = Wake> + 'a
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let want_read = self.wants_read(d);
        let open = !self.ws.is_closed();
        let write = self.ws.has_output() || d.needs_flush;
        // A large frame's payload, with nothing read ahead of it, is read
        // into the protocol's buffer, else into the read buffer.
        let direct_min = if want_read && d.read.bytes.is_empty() {
            DIRECT_MIN
        } else {
            usize::MAX
        };
        let (outgoing, mut payload) = self.ws.split_io(direct_min, READ_CHUNK);
        let spare = if want_read && payload.is_none() {
            d.read.make_room()
        } else {
            0
        };
        let Wakers {
            shutdown,
            timer,
            peer,
        } = wakers;
        let (swaps, mailbox) = (&mut self.swaps, &mut self.mailbox);
        let Driver {
            read,
            paused,
            shutting_down,
            armed,
            ..
        } = d;
        let (shutting_down, armed) = (*shutting_down, armed.is_some());
        std::future::poll_fn(move |cx| {
            if !shutting_down && shutdown.poll_fired(cx).is_ready() {
                return Poll::Ready(Wake::Shutdown);
            }
            if write {
                // Made here, not held across the wait: 256 bytes.
                let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
                let filled = outgoing.slices(&mut slices);
                let written = poll_write_or_flush(Pin::new(&mut *writer), cx, &slices[..filled]);
                if let Poll::Ready(written) = written {
                    return Poll::Ready(Wake::Written(written));
                }
            }
            if open {
                if let Some(Poll::Ready(swapped)) = swaps.as_mut().map(|s| s.poll_changed(cx)) {
                    return Poll::Ready(Wake::Swapped(swapped));
                }
                if let Some(Poll::Ready(())) = peer.as_mut().map(|p| p.poll_fired(cx)) {
                    return Poll::Ready(Wake::PeerWoke);
                }
                if let Some(Poll::Ready(message)) = mailbox.as_mut().map(|m| m.poll_recv(cx)) {
                    return Poll::Ready(Wake::Published(message));
                }
            }
            if want_read {
                let reader = Pin::new(&mut *reader);
                let polled = match payload.as_mut() {
                    Some(room) => poll_read_buf(reader, cx, room).map(|r| (r, ReadInto::Payload)),
                    None => read
                        .poll_read(reader, cx)
                        .map(|r| (r, ReadInto::Buffer(spare))),
                };
                if let Poll::Ready((read, into)) = polled {
                    return Poll::Ready(Wake::Read(read, into));
                }
            }
            if let Some(Poll::Ready(())) = paused.as_mut().map(|p| p.poll_freed(cx)) {
                return Poll::Ready(Wake::BudgetFreed);
            }
            if armed && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            Poll::Pending
        })
    }

    /// Shutdown: the peer is told with 1001; the close handshake and what
    /// is queued still finish (within the server's shutdown timeout).
    fn on_shutdown(&mut self, d: &mut Driver) -> Flow {
        d.shutting_down = true;
        if self.ws.state() == State::Open {
            let _ = self.ws.close(CloseCode::GOING_AWAY, "server shutting down");
        }
        Flow::Continue
    }

    async fn on_written(
        &mut self,
        d: &mut Driver,
        written: std::io::Result<Option<usize>>,
    ) -> Flow {
        if matches!(written, Ok(Some(n)) if n > 0) {
            d.unwritten_since = None;
        }
        if wrote(&mut self.ws, &mut d.needs_flush, written).is_err() {
            self.transport_gone().await;
            return Flow::Drop;
        }
        Flow::Continue
    }

    /// A message published to one of the connection's topics, and whatever
    /// else is waiting: queued together, for one write.
    fn on_published(&mut self, message: Option<Framed>) -> Flow {
        match message {
            Some(message) => {
                self.deliver_published(&message);
                while let Some(Ok(message)) = self.mailbox.as_mut().map(|m| m.try_recv()) {
                    self.deliver_published(&message);
                }
            }
            None => self.mailbox = None,
        }
        Flow::Continue
    }

    async fn on_read<R: AsyncRead + Unpin>(
        &mut self,
        d: &mut Driver,
        reader: &mut R,
        read: std::io::Result<usize>,
        into: ReadInto,
    ) -> Flow {
        match read {
            Ok(0) | Err(_) => return self.on_eof(d).await,
            // TLS hands out a record per read: take the others already
            // there too (plain TCP after a short read has nothing more).
            Ok(n) => match into {
                ReadInto::Buffer(spare) => {
                    let more =
                        d.tls && read_ready(reader, &mut d.read.bytes, spare.saturating_sub(n));
                    d.read.filled(n, spare, more);
                }
                ReadInto::Payload => {
                    d.read.direct = true;
                    while d.tls
                        && let (_, Some(mut room)) = self.ws.split_io(1, READ_CHUNK)
                        && read_ready(reader, &mut room, usize::MAX)
                    {}
                }
            },
        }
        Flow::Continue
    }

    /// The peer closed its side (or the transport failed): the protocol
    /// learns it; whatever we still owe a peer that half-closed is written,
    /// then the socket is dropped.
    async fn on_eof(&mut self, d: &mut Driver) -> Flow {
        d.eof = true;
        self.transport_gone().await;
        if self.ws.is_closed() && !self.ws.has_output() {
            return Flow::Drop;
        }
        Flow::Continue
    }

    /// The timer fired: every deadline that has passed is acted on.
    async fn on_timer(&mut self, d: &mut Driver, deadlines: Deadlines) -> Flow {
        d.armed = None;
        let now = Instant::now();
        // Paused, it reads nothing, so a peer that went would hold its part
        // of the budget until the wait ran out. Asked at every firing, not
        // only at the recheck's: other wakes (its output draining, a
        // topic's messages) keep moving that deadline later, but the timer
        // still fires at least every recheck while paused.
        if d.paused.is_some() && d.socket.peer_left() {
            tracing::debug!(
                conn = self.id,
                held = self.ws.input_held(),
                "peer left while its reads waited for the server's budget"
            );
            return self.on_eof(d).await;
        }
        if deadlines.slow_consumer.is_some_and(|t| t <= now) && self.ws.state() == State::Open {
            tracing::info!(conn = self.id, tenant = %self.tenant.name, unsent = self.ws.output_len(), "peer not reading its messages; closing with 1008");
            self.shared
                .metrics
                .tenant_refused(&self.tenant.name, "slow-consumer");
            let _ = self.ws.close(CloseCode::POLICY_VIOLATION, "too slow");
        }
        if deadlines.budget.is_some_and(|t| t <= now) && self.ws.state() == State::Open {
            tracing::info!(conn = self.id, tenant = %self.tenant.name, held = self.ws.input_held() + self.ws.output_len(), "server's buffer budget spent for too long; closing with 1013");
            self.shared
                .metrics
                .tenant_refused(&self.tenant.name, "buffered");
            let _ = self.ws.close(CloseCode::TRY_AGAIN_LATER, "server busy");
        }
        if self.restart_at.is_some_and(|t| t <= now) {
            self.restart_at = None;
            if self.ws.state() == State::Open {
                let _ = self.ws.close(CloseCode::SERVICE_RESTART, "new version");
                self.shared.metrics.restart_closed(&self.tenant.name);
            }
        }
        if deadlines.settle.is_some_and(|t| t <= now) {
            d.settled = true;
            let freed = self.settle() + self.release_send_buffer().await + d.read.release();
            self.shared.released.add(freed);
        }
        if deadlines.hibernate.is_some_and(|t| t <= now) {
            self.hibernate();
            self.shared.released.add(d.read.release());
        }
        if d.flush_deadline.is_some_and(|t| t <= now) {
            tracing::debug!(
                conn = self.id,
                unsent = self.ws.output_len(),
                "peer not reading; dropping connection"
            );
            return Flow::Drop;
        }
        if let Some(info) = self.ws.handle_timeout(now) {
            self.finish(info).await;
        }
        Flow::Continue
    }

    /// The transport is gone (EOF or error) before the close handshake ended.
    pub(super) async fn transport_gone(&mut self) {
        if let Some(info) = self.ws.transport_closed() {
            self.finish(info).await;
        }
    }

    /// After our last byte, when the peer may still send (TLS, or no clean
    /// closing handshake): half-close (TLS close_notify, TCP FIN) and read
    /// until the peer closes too, so the kernel does not answer its in-flight
    /// data with a reset that could destroy our Close frame.
    async fn linger<R, W>(&mut self, reader: &mut R, writer: &mut W, rbuf: &mut BytesMut)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let timeout = self.tenant.ws.close_timeout;
        let _ = tokio::time::timeout(timeout, async {
            let _ = writer.shutdown().await;
            // What the peer still sends is discarded, into the read buffer
            // (not a stack array, which every task would carry).
            loop {
                rbuf.clear();
                rbuf.reserve(4096);
                match reader.read_buf(rbuf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod read_buffer_tests {
    use super::*;

    #[test]
    fn starts_small_grows_with_full_reads_and_shrinks_after_a_large_frame() {
        let mut r = ReadBuffer::new(BytesMut::with_capacity(4096));
        // The upgrade's empty 4 KiB buffer is not kept.
        assert!(r.bytes.capacity() < 4096);
        let spare = r.make_room();
        assert!((FIRST_READ_CHUNK..4096).contains(&spare), "{spare}");
        // A short read: no growth.
        r.bytes.extend_from_slice(&[0; 32]);
        r.filled(32, spare, false);
        r.bytes.clear();
        assert_eq!(r.make_room(), spare);
        // Reads that fill the room: GROWTH times larger each, up to
        // READ_CHUNK and no more.
        let mut want = FIRST_READ_CHUNK;
        for _ in 0..5 {
            want = (want * GROWTH).min(READ_CHUNK);
            let spare = r.make_room();
            r.bytes.extend_from_slice(&vec![0; spare]);
            r.filled(spare, spare, false);
            assert_eq!(r.chunk, want);
            r.bytes.clear();
        }
        assert_eq!(r.chunk, READ_CHUNK);
        assert!(r.make_room() >= READ_CHUNK / 4);
        // Bytes after the request are kept as they are.
        let kept = ReadBuffer::new(BytesMut::from(&b"\x81\x80"[..]));
        assert_eq!(&kept.bytes[..], b"\x81\x80");
        // After a large frame: an empty buffer starts small again.
        r.shrink();
        assert!(r.bytes.capacity() < 4096);
        assert_eq!(r.chunk, FIRST_READ_CHUNK);
    }

    #[tokio::test]
    async fn an_idle_buffer_is_freed_and_made_again_by_a_read() {
        let mut r = ReadBuffer::new(BytesMut::new());
        r.bytes.extend_from_slice(b"pending");
        r.release();
        assert_eq!(&r.bytes[..], b"pending", "bytes not yet taken are kept");
        r.bytes.clear();
        r.release();
        assert!(r.released);
        assert_eq!(r.bytes.capacity(), 0);
        assert_eq!(r.make_room(), FIRST_READ_CHUNK);
        assert_eq!(r.bytes.capacity(), 0, "no room made before a read");
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[7; 100]).await.unwrap();
        let n = std::future::poll_fn(|cx| r.poll_read(Pin::new(&mut server), cx))
            .await
            .unwrap();
        assert_eq!(n, FIRST_READ_CHUNK, "a first read fills what it had");
        assert_eq!(&r.bytes[..], &[7; FIRST_READ_CHUNK][..]);
        assert!(!r.released);
        r.filled(n, FIRST_READ_CHUNK, false);
        assert_eq!(r.chunk, FIRST_READ_CHUNK * GROWTH);
        // The rest comes through the buffer as usual.
        r.make_room();
        let n = std::future::poll_fn(|cx| r.poll_read(Pin::new(&mut server), cx))
            .await
            .unwrap();
        assert_eq!(n, 100 - FIRST_READ_CHUNK);
        // A released buffer that reads EOF stays released.
        r.bytes.clear();
        r.release();
        drop(client);
        let n = std::future::poll_fn(|cx| r.poll_read(Pin::new(&mut server), cx))
            .await
            .unwrap();
        assert_eq!((n, r.bytes.capacity()), (0, 0));
        assert!(r.released);
    }

    #[test]
    fn a_buffer_a_read_filled_is_not_released() {
        let mut r = ReadBuffer::new(BytesMut::new());
        let spare = r.make_room();
        r.bytes.extend_from_slice(&vec![1; spare]);
        let input = r.bytes.split();
        r.bytes = reuse(std::mem::take(&mut r.bytes), input);
        // What is left of a full buffer has no capacity of its own, yet it
        // is the connection's buffer: the next read takes the whole room.
        assert!(!r.released);
        assert!(r.make_room() >= spare);
    }
}
