//! The WebSocket connection state machine (server role).
//!
//! [`WebSocket`] is fed bytes with [`WebSocket::read`] and `Instant`s with
//! [`WebSocket::handle_timeout`]; it answers with [`Event`]s and queues
//! bytes to write, which the host drains with [`WebSocket::output_slices`]
//! and [`WebSocket::advance_output`]. It never blocks, allocates per
//! message, or buffers beyond its [`Config`] limits.

mod batch;
pub mod close;
mod config;
mod error;
pub(crate) mod frame;
mod masked;
mod output;

use std::io::IoSlice;

use bytes::buf::Limit;
use bytes::{BufMut, Bytes};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use batch::{FrameBatch, Tally};
pub use config::Config;
pub use error::{ProtocolError, SendError};
pub use masked::Masked;

use close::CloseCode;
use frame::coding::{self, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use frame::mask::apply_mask;
use frame::utf8::Utf8Validator;
use frame::{FrameHeader, OpCode};
use output::Output;

/// Capacity the message buffer is shrunk back to after a bigger message,
/// so idle connections don't keep the memory of their largest message.
const MSG_BUF_KEEP: usize = 64 * 1024;

/// Longest reason that fits in a Close frame next to its 2-byte code.
/// The longest close reason, in bytes: a Close frame's payload is a
/// control frame's (125) less the two-byte code.
pub const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

/// The send queue's high-water rule, the one definition of it: with
/// `queued` bytes waiting and a bound of `send_queue_bytes`, a new data
/// message is refused. Only a send made below the mark is taken (whole), so
/// the queue holds at most `send_queue_bytes` plus one message. Whoever
/// admits sends ahead of the protocol (the plugin's outbox) applies this
/// same rule, so what it admitted is never refused when handed over.
pub fn queue_full(queued: usize, send_queue_bytes: usize) -> bool {
    queued >= send_queue_bytes
}

/// Where the connection is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a Close and are waiting for the peer's; incoming data is
    /// still delivered, but we send nothing more.
    Closing,
    /// The closing handshake finished or the connection failed: only
    /// queued output remains to be flushed, then the transport can go.
    Closed,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The peer's close code, 1005 if its Close had none, 1006 if the
    /// connection ended without a closing handshake, or the code we failed
    /// the connection with.
    pub code: u16,
    /// The close reason (the peer's, or our description of its error).
    pub reason: String,
    /// True when both Close frames were exchanged; false when the
    /// connection failed or timed out.
    pub clean: bool,
}

/// What [`WebSocket::read`] produced.
///
/// Messages borrow the connection's reusable buffer, so handle (or copy)
/// them before the next `read`.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete, UTF-8-validated text message.
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A complete binary message of one frame, still masked: only with
    /// [`Config::deliver_masked_from`].
    MaskedBinary(Masked<'a>),
    /// The connection is closed; this is reported exactly once.
    Closed(CloseInfo),
}

/// A message kind, remembered across its fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsgKind {
    Text,
    Binary,
}

/// What `read_inner` found, without borrowing the message buffer.
enum Ready {
    /// A message, binary ones left masked if `Core::masked` says so.
    Message(MsgKind),
    Closed(CloseInfo),
}

/// A frame whose header is decoded and whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct InFrame {
    header: FrameHeader,
    remaining: u64,
    /// Where the next payload byte falls in the mask's 4-byte cycle, or
    /// [`LEFT_MASKED`].
    mask_offset: usize,
}

/// `InFrame::mask_offset` of a frame whose payload is left masked
/// ([`Config::deliver_masked_from`]): one compare on the paths every
/// frame takes, where a flag of its own made the frame larger.
const LEFT_MASKED: usize = usize::MAX;

/// Room in the message buffer for the payload of the data frame being
/// read, lent by [`WebSocket::split_io`]: read into like any [`BufMut`],
/// and no further than that frame's payload goes.
pub type PayloadRoom<'a> = Limit<&'a mut Vec<u8>>;

/// The queued output, borrowed apart from the rest of the connection (see
/// [`WebSocket::split_io`]).
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a>(&'a Output);

impl<'a> Outgoing<'a> {
    /// As [`WebSocket::output_slices`].
    pub fn slices(&self, dst: &mut [IoSlice<'a>]) -> usize {
        self.0.slices(dst)
    }
}

/// One WebSocket connection, server side, after a successful handshake.
#[derive(Debug)]
pub struct WebSocket {
    /// Kept apart from `core` so an [`Event`] can borrow it while the core
    /// is still mutable (e.g. to fail the connection). The first `held`
    /// bytes are delivered messages the caller holds (see
    /// [`hold_message`](Self::hold_message)); the message being assembled
    /// or just delivered follows them.
    msg: Vec<u8>,
    held: usize,
    /// The caller holds the message just delivered.
    hold_delivered: bool,
    core: Core,
}

#[derive(Debug)]
struct Core {
    /// Shared: every connection of a tenant has the same (a copy is 88
    /// bytes of each connection, idle ones too).
    config: Arc<Config>,
    state: State,
    /// Whether a Closed event/CloseInfo was handed out already.
    closed_reported: bool,
    close_sent: bool,
    out: Output,

    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: usize,
    /// Full header length once the first two bytes are known, else 0.
    hdr_need: usize,
    frame: Option<InFrame>,
    /// Where the payload room [`WebSocket::split_io`] lent out began in the
    /// message buffer: what the driver read there since is taken in by the
    /// next `read`.
    lent: Option<usize>,
    msg_kind: Option<MsgKind>,
    msg_delivered: bool,
    /// The mask of the message just delivered while its payload is still
    /// masked (see [`Masked`]).
    masked: Option<[u8; 4]>,
    utf8: Utf8Validator,
    /// The payload of the control frame being read (at most
    /// [`MAX_CONTROL_PAYLOAD`]): allocated for a frame that has one and
    /// freed once it is handled, since control frames are rare and every
    /// connection would carry the room for one.
    ctrl: Vec<u8>,

    /// Latest instant we were told about; `close` has no `now` parameter.
    now: Instant,
    last_recv: Instant,
    ping_outstanding: bool,
    close_deadline: Option<Instant>,
}

impl WebSocket {
    /// A connection in the [`State::Open`] state; `now` starts the idle and
    /// ping timers.
    pub fn new(config: impl Into<Arc<Config>>, now: Instant) -> Self {
        WebSocket {
            msg: Vec::new(),
            held: 0,
            hold_delivered: false,
            core: Core {
                config: config.into(),
                state: State::Open,
                closed_reported: false,
                close_sent: false,
                out: Output::default(),
                hdr: [0; MAX_HEADER_LEN],
                hdr_len: 0,
                hdr_need: 0,
                frame: None,
                lent: None,
                msg_kind: None,
                msg_delivered: false,
                masked: None,
                utf8: Utf8Validator::default(),
                ctrl: Vec::new(),
                now,
                last_recv: now,
                ping_outstanding: false,
                close_deadline: None,
            },
        }
    }

    /// Consumes bytes from `input` (advancing the slice) until one event is
    /// ready or input is exhausted. Call repeatedly until it returns `None`
    /// and `input` is empty.
    ///
    /// Pongs and Close replies are queued as a side effect, so check
    /// [`has_output`](Self::has_output) afterwards. Once closed, input is
    /// consumed and ignored.
    pub fn read<'a>(&'a mut self, input: &mut &[u8], now: Instant) -> Option<Event<'a>> {
        self.core.observe(now);
        if self.core.msg_delivered {
            self.core.msg_delivered = false;
            // Held, it was unmasked then; if not, it goes now.
            self.core.masked = None;
            if std::mem::take(&mut self.hold_delivered) {
                self.held = self.msg.len();
            } else {
                self.msg.truncate(self.held);
                if self.held == 0 && self.msg.capacity() > MSG_BUF_KEEP {
                    self.msg.shrink_to(MSG_BUF_KEEP);
                }
            }
        }
        let ready = self.core.read_inner(&mut self.msg, self.held, input, now);
        if self.core.state == State::Closed {
            // Nothing more will be delivered; don't hold message memory
            // while the host flushes the last output (what the caller
            // holds stays until it releases it).
            self.drop_message();
        }
        let held = self.held;
        match ready? {
            Ready::Message(MsgKind::Binary) if self.core.masked.is_some() => {
                Some(Event::MaskedBinary(self.delivered_masked()))
            }
            Ready::Message(MsgKind::Binary) => {
                Some(Event::Binary(self.msg.get(held..).unwrap_or_default()))
            }
            // The incremental validator already accepted these bytes; this
            // second, fast pass is the price of staying free of `unsafe`.
            Ready::Message(MsgKind::Text) => {
                match simdutf8::basic::from_utf8(self.msg.get(held..).unwrap_or_default()) {
                    Ok(text) => Some(Event::Text(text)),
                    Err(_) => Some(Event::Closed(self.core.fail(ProtocolError::InvalidUtf8))),
                }
            }
            Ready::Closed(info) => Some(Event::Closed(info)),
        }
    }

    /// Keeps the message [`read`](Self::read) just delivered where it is:
    /// the next message is assembled after it, and [`held`](Self::held)
    /// has them back to back, until [`release_held`](Self::release_held).
    /// This is how a caller collects a batch of messages without copying
    /// them; it bounds what it holds (every held byte stays in memory).
    /// Has no effect unless the last event was a message.
    #[inline]
    pub fn hold_message(&mut self) {
        self.hold_delivered = self.core.msg_delivered;
        if self.hold_delivered && self.core.masked.is_some() {
            self.unmask_delivered();
        }
    }

    /// Unmasks the message just delivered in place, if it is still masked.
    #[cold]
    fn unmask_delivered(&mut self) {
        self.delivered_masked().unmask();
    }

    /// The message just delivered, as [`Masked`] (plain if `core.masked`
    /// is `None`).
    fn delivered_masked(&mut self) -> Masked<'_> {
        Masked::new(
            self.msg.get_mut(self.held..).unwrap_or_default(),
            &mut self.core.masked,
        )
    }

    /// The messages held, back to back, the one [`read`](Self::read) just
    /// delivered included if it is held.
    pub fn held(&self) -> &[u8] {
        let end = if self.hold_delivered {
            self.msg.len()
        } else {
            self.held
        };
        self.msg.get(..end).unwrap_or_default()
    }

    /// Forgets the messages held; part of a message still arriving moves
    /// to the front of the buffer.
    pub fn release_held(&mut self) {
        let held = if std::mem::take(&mut self.hold_delivered) {
            self.core.msg_delivered = false;
            self.msg.len()
        } else {
            self.held
        };
        self.held = 0;
        self.msg.drain(..held);
        if self.core.state == State::Closed {
            self.drop_message();
        } else if self.msg.capacity() > MSG_BUF_KEEP && self.msg.len() <= MSG_BUF_KEEP {
            self.msg.shrink_to(MSG_BUF_KEEP);
        }
    }

    /// For a driver that waits on its socket's read and write at once: the
    /// queued output and, when what comes next on the wire is at least
    /// `min` bytes of the payload of the data frame being read, room for up
    /// to `max` of them at the end of the message buffer. Read there, a
    /// large message's payload skips the driver's read buffer and the copy
    /// out of it (unmasked in place, as tungstenite does). The next
    /// [`read`](Self::read) takes in what was read into the room before the
    /// input it is given, which must be what the transport delivered after
    /// it; the room ends where the frame's payload does. The driver must
    /// hold no input of its own (it would come first on the wire).
    #[inline]
    pub fn split_io(&mut self, min: usize, max: usize) -> (Outgoing<'_>, Option<PayloadRoom<'_>>) {
        let due = self.payload_due();
        let core = &mut self.core;
        let payload = (due >= min.max(1) && max > 0).then(|| {
            let room = due.min(max);
            // A loan not yet taken in goes on where it ended.
            core.lent.get_or_insert(self.msg.len());
            let fin = core.frame.is_some_and(|f| f.header.fin);
            reserve_payload(&mut self.msg, room, due as u64, fin);
            (&mut self.msg).limit(room)
        });
        (Outgoing(&core.out), payload)
    }

    /// How many bytes of the data frame being read the peer has yet to
    /// send, when they are what comes next on the wire (0 between frames,
    /// in a control frame, or once closed): what [`split_io`](Self::split_io)
    /// would lend room for.
    #[inline]
    pub fn payload_due(&self) -> usize {
        let core = &self.core;
        match core.frame {
            // Not while a delivered message is still in the buffer (the
            // next `read` drops it first).
            Some(frame)
                if !frame.header.opcode.is_control()
                    && core.state != State::Closed
                    && !core.msg_delivered =>
            {
                let lent = core
                    .lent
                    .map_or(0, |from| self.msg.len().saturating_sub(from));
                usize::try_from(frame.remaining)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(lent)
            }
            _ => 0,
        }
    }

    /// Drops the message being assembled or delivered, and the buffer
    /// with it unless messages are held.
    fn drop_message(&mut self) {
        self.hold_delivered = false;
        self.msg.truncate(self.held);
        if self.held == 0 {
            self.msg = Vec::new();
        }
    }

    /// The transport reached EOF or failed. Returns `Closed{1006, clean:
    /// false}` unless a close was already reported (then `None`).
    pub fn transport_closed(&mut self) -> Option<CloseInfo> {
        if self.core.closed_reported {
            return None;
        }
        self.core.state = State::Closed;
        self.core.closed_reported = true;
        self.core.close_deadline = None;
        self.drop_message();
        Some(CloseInfo {
            code: CloseCode::ABNORMAL,
            reason: String::new(),
            clean: false,
        })
    }

    /// Queues a text message (fragmented per `fragment_size`).
    pub fn send_text(&mut self, text: &str) -> Result<(), SendError> {
        self.core.send_data(OpCode::Text, text.as_bytes())
    }

    /// Queues a binary message (fragmented per `fragment_size`).
    pub fn send_binary(&mut self, data: &[u8]) -> Result<(), SendError> {
        self.core.send_data(OpCode::Binary, data)
    }

    /// Queues a [`FrameBatch`], leaving it empty (its buffer is kept or
    /// exchanged, so a batch refilled every call allocates rarely). The
    /// batch's messages are not checked against the send queue bound here:
    /// the host that filled it admits each message by the same high-water
    /// rule, counting what is queued and what the batch already holds.
    /// Refused (and emptied) unless the connection is open.
    pub fn send_batch(&mut self, batch: &mut FrameBatch) -> Result<(), SendError> {
        if self.finish_begun(batch) {
            return Ok(());
        }
        if let Err(err) = self.core.check_can_send() {
            batch.clear();
            return Err(err);
        }
        self.core.out.append(batch.bytes_mut());
        Ok(())
    }

    /// Like [`send_batch`](Self::send_batch), for replies to messages read
    /// before the connection closed (the peer's Close, or a violation that
    /// failed it, came later in the same input): once closed, they go ahead
    /// of our Close frame as long as no byte of it was written. Refused (and
    /// emptied) otherwise.
    pub fn send_batch_before_close(&mut self, batch: &mut FrameBatch) -> Result<(), SendError> {
        if self.finish_begun(batch) {
            return Ok(());
        }
        if self.core.state == State::Open {
            return self.send_batch(batch);
        }
        if self.core.out.append_before_close(batch.bytes_mut()) {
            Ok(())
        } else {
            batch.clear();
            Err(SendError::Closed)
        }
    }

    /// A batch that begins with the rest of a frame its caller wrote in
    /// part while the queue was empty ([`FrameBatch::header_for`]) goes
    /// ahead of everything queued since (a Pong, a Close), whatever the
    /// state: a frame begun on the wire is finished, or the stream is
    /// corrupt. `false`: not such a batch.
    fn finish_begun(&mut self, batch: &mut FrameBatch) -> bool {
        if !batch.take_begun() {
            return false;
        }
        self.core.out.prepend(batch.bytes_mut());
        true
    }

    /// Queues a message framed once by [`Framed::text`] / [`Framed::binary`],
    /// typically shared by many connections (pub/sub fan-out): the bytes are
    /// queued by reference, never copied. Always one unfragmented frame.
    pub fn send_framed(&mut self, message: &Framed) -> Result<(), SendError> {
        let core = &mut self.core;
        core.admit(message.payload_len)?;
        core.out.push_encoded(message.bytes.clone());
        Ok(())
    }

    /// Queues a Ping; `data` is at most 125 bytes (else `MessageTooBig`).
    pub fn send_ping(&mut self, data: &[u8]) -> Result<(), SendError> {
        let core = &mut self.core;
        core.check_can_send()?;
        if data.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::MessageTooBig);
        }
        core.check_queue()?;
        core.out.push_frame(true, OpCode::Ping, data);
        Ok(())
    }

    /// Starts the closing handshake (we initiate). `code` must be sendable
    /// (1000-1003, 1007-1014, 3000-4999) else `InvalidCode`; `reason` is at
    /// most 123 bytes else `ReasonTooLong`.
    ///
    /// The close timeout runs from the latest `Instant` passed to `new`,
    /// `read` or `handle_timeout`, since this call takes none.
    pub fn close(&mut self, code: u16, reason: &str) -> Result<(), SendError> {
        let core = &mut self.core;
        core.check_can_send()?;
        if !close::is_valid(code) {
            return Err(SendError::InvalidCode);
        }
        if reason.len() > MAX_CLOSE_REASON {
            return Err(SendError::ReasonTooLong);
        }
        let now = core.now;
        core.start_close(code, reason, now);
        Ok(())
    }

    /// Bytes queued for the transport.
    pub fn output_len(&self) -> usize {
        self.core.out.len()
    }

    /// The connection is idle: buffers that hold nothing are freed rather
    /// than kept for the next message. They are kept between messages (up
    /// to 64 KiB, `MSG_BUF_KEEP`, for the message buffer), which saves an
    /// allocation per message on a busy connection but is most of what an
    /// idle one holds once it has carried one larger message (20 KiB per
    /// connection after a 20 KB message, by the density bench). A message
    /// part-way, a message held, queued output: kept. Returns the bytes
    /// freed, at least.
    pub fn release_idle(&mut self) -> usize {
        let mut freed = 0;
        if self.msg.is_empty() && self.held == 0 && !self.core.msg_delivered {
            freed += std::mem::take(&mut self.msg).capacity();
        }
        freed + self.core.out.release_idle()
    }

    /// Bytes of memory held for the message being assembled (its buffer's
    /// capacity, kept between messages up to a small size): with
    /// [`output_len`](Self::output_len), what the connection holds for the
    /// peer, for a driver that budgets memory across connections.
    pub fn input_held(&self) -> usize {
        self.msg.capacity()
    }

    /// Whether the output queue is at its high-water mark: data sends are
    /// refused with [`SendError::QueueFull`] until the transport takes some
    /// (a driver stops reading then, so the peer cannot grow it).
    pub fn is_backed_up(&self) -> bool {
        queue_full(self.core.out.len(), self.core.config.send_queue_bytes)
    }

    /// Whether anything is queued for the transport.
    pub fn has_output(&self) -> bool {
        self.core.out.len() > 0
    }

    /// Fills `dst` with the queued output in order; returns how many slices
    /// were filled (for `writev`). Fewer slots than chunks gives a prefix.
    pub fn output_slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        Outgoing(&self.core.out).slices(dst)
    }

    /// Drops `n` bytes the transport wrote from the front of the queue;
    /// `n` past the end is clamped.
    pub fn advance_output(&mut self, n: usize) {
        self.core.out.advance(n);
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has work: the
    /// earliest of ping due, idle deadline and close deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// Runs the timers: may queue a Ping or start a 1001 close, and returns
    /// `Closed{1006, clean: false}` once the close deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<CloseInfo> {
        let info = self.core.handle_timeout(now);
        if info.is_some() {
            self.drop_message();
        }
        info
    }

    /// The current lifecycle state.
    pub fn state(&self) -> State {
        self.core.state
    }

    /// Whether the connection reached [`State::Closed`].
    pub fn is_closed(&self) -> bool {
        self.core.state == State::Closed
    }

    /// What the connection holds of the peer's input right now, for the
    /// fuzz targets' limit checks; not part of the API.
    #[doc(hidden)]
    pub fn buffered(&self) -> Buffered {
        Buffered {
            message: self.msg.len(),
            header: self.core.hdr_len,
            control: self.core.ctrl.len(),
        }
    }
}

/// Makes room at the end of `msg` for `more` bytes of a data frame's
/// payload, of which `due` (at least `more`) are still to come, `fin` if
/// the frame ends its message. It grows by doubling, as `Vec` does, but in
/// a message's last frame never past its end: the buffer's capacity is
/// what [`WebSocket::input_held`] reports against the server's budget, and
/// a message of one frame then holds its own size, not up to twice it.
/// Not all of `due` at once: a peer may announce a large frame and send
/// nothing of it. Not capped before the last frame: growing a buffer to
/// the end of each of many small fragments would copy it once a fragment.
#[inline]
fn reserve_payload(msg: &mut Vec<u8>, more: usize, due: u64, fin: bool) {
    if msg.capacity() - msg.len() < more {
        let due = if fin {
            usize::try_from(due).unwrap_or(usize::MAX)
        } else {
            usize::MAX
        };
        grow_payload(msg, more, due);
    }
}

#[cold]
fn grow_payload(msg: &mut Vec<u8>, more: usize, due: usize) {
    let want = msg.len().saturating_add(more);
    let cap = msg
        .capacity()
        .saturating_mul(2)
        .max(want)
        .min(msg.len().saturating_add(due.max(more)));
    msg.reserve_exact(cap - msg.len());
}

/// Received bytes a [`WebSocket`] holds (see [`WebSocket::buffered`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffered {
    /// The message being assembled (or just delivered).
    pub message: usize,
    /// Bytes of a frame header still incomplete.
    pub header: usize,
    /// The control frame payload being collected.
    pub control: usize,
}

impl Core {
    fn observe(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    /// Reads into `msg` after its first `base` bytes (messages the caller
    /// holds).
    fn read_inner(
        &mut self,
        msg: &mut Vec<u8>,
        base: usize,
        input: &mut &[u8],
        now: Instant,
    ) -> Option<Ready> {
        let lent = self.lent.take();
        if self.state == State::Closed {
            *input = &[];
            return None;
        }
        if let Some(from) = lent
            && let Err(e) = self.take_lent(msg, base, from, now)
        {
            return Some(Ready::Closed(self.fail(e)));
        }
        if !input.is_empty() {
            self.last_recv = self.last_recv.max(now);
            self.ping_outstanding = false;
        }
        loop {
            let Some(mut frame) = self.frame else {
                match self.read_header(input, msg.len().saturating_sub(base)) {
                    Ok(true) => continue,
                    Ok(false) => return None,
                    Err(e) => return Some(Ready::Closed(self.fail(e))),
                }
            };
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(input.len());
            let (chunk, rest) = input.split_at(take);
            *input = rest;
            frame.remaining -= take as u64;
            let (header, mask) = (frame.header, frame.header.mask);
            if header.opcode.is_control() {
                let start = self.ctrl.len();
                if start + take > MAX_CONTROL_PAYLOAD {
                    return Some(Ready::Closed(self.fail(ProtocolError::ControlFrameTooLong)));
                }
                self.ctrl.extend_from_slice(chunk);
                let dst = self.ctrl.get_mut(start..).unwrap_or_default();
                frame.mask_offset = apply_mask(dst, mask, frame.mask_offset);
            } else {
                let start = msg.len();
                let due = frame.remaining.saturating_add(take as u64);
                reserve_payload(msg, take, due, header.fin);
                msg.extend_from_slice(chunk);
                if let Err(e) = self.payload_in(msg, base, start, &mut frame) {
                    return Some(Ready::Closed(self.fail(e)));
                }
            }
            if frame.remaining > 0 {
                self.frame = Some(frame);
                return None;
            }
            self.frame = None;
            if header.opcode.is_control() {
                if let Some(ready) = self.finish_control(header.opcode) {
                    return Some(ready);
                }
            } else if header.fin {
                let kind = self.msg_kind.take()?;
                if kind == MsgKind::Text && self.utf8.finish().is_err() {
                    return Some(Ready::Closed(self.fail(ProtocolError::InvalidUtf8)));
                }
                self.msg_delivered = true;
                if frame.mask_offset == LEFT_MASKED {
                    self.masked = Some(header.mask);
                }
                return Some(Ready::Message(kind));
            }
        }
    }

    /// Takes in the payload a driver read into the room lent from `from`
    /// on (see [`WebSocket::split_io`]), as if it had been input.
    fn take_lent(
        &mut self,
        msg: &mut Vec<u8>,
        base: usize,
        from: usize,
        now: Instant,
    ) -> Result<(), ProtocolError> {
        let read = msg.len().saturating_sub(from);
        let Some(mut frame) = self.frame.filter(|_| read > 0) else {
            return Ok(());
        };
        // The room ended where the payload does; a driver that wrote past
        // it (or into a loan it should not have had) is ignored there.
        let read = read.min(usize::try_from(frame.remaining).unwrap_or(usize::MAX));
        msg.truncate(from + read);
        frame.remaining -= read as u64;
        self.last_recv = self.last_recv.max(now);
        self.ping_outstanding = false;
        self.payload_in(msg, base, from, &mut frame)?;
        self.frame = Some(frame);
        Ok(())
    }

    /// Whether the payload of the data frame `header` starts is left masked
    /// ([`Config::deliver_masked_from`]): binary, not a continuation, and
    /// final, so one frame is the whole message, under one mask; and long
    /// enough.
    #[inline]
    fn leaves_masked(&self, header: &FrameHeader) -> bool {
        header.opcode == OpCode::Binary
            && header.fin
            && self
                .config
                .deliver_masked_from
                .is_some_and(|from| header.len >= from as u64)
    }

    /// A data frame's payload bytes, just stored at `start..` in the
    /// message buffer, are unmasked in place and checked (unless the frame
    /// is left masked: binary, so nothing to check).
    fn payload_in(
        &mut self,
        msg: &mut [u8],
        base: usize,
        start: usize,
        frame: &mut InFrame,
    ) -> Result<(), ProtocolError> {
        let new = msg.get_mut(start..).unwrap_or_default();
        if frame.mask_offset == LEFT_MASKED {
            return Ok(());
        }
        frame.mask_offset = apply_mask(new, frame.header.mask, frame.mask_offset);
        // A message that arrived whole in this input is validated once,
        // when it is delivered; only one that arrives in parts is
        // validated as it comes (to fail fast).
        let whole = start == base && frame.header.fin && frame.remaining == 0;
        if self.msg_kind == Some(MsgKind::Text) && !whole && self.utf8.feed(new).is_err() {
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(())
    }

    /// Collects header bytes; `Ok(true)` when a frame was started,
    /// `Ok(false)` when input ran out first.
    fn read_header(&mut self, input: &mut &[u8], msg_len: usize) -> Result<bool, ProtocolError> {
        // A header whole in the input (most are) is decoded where it lies:
        // collected into `hdr` first, it cost two copies a frame.
        if self.hdr_len == 0
            && let [b0, b1, ..] = **input
        {
            let need = coding::check_start(b0, b1)?;
            if let Some((head, rest)) = input.split_at_checked(need) {
                let header = coding::decode(head)?;
                *input = rest;
                self.begin_frame(header, msg_len)?;
                return Ok(true);
            }
        }
        if self.hdr_need == 0 {
            self.fill_header(input, 2);
            if self.hdr_len < 2 {
                return Ok(false);
            }
            self.hdr_need = coding::check_start(self.hdr[0], self.hdr[1])?;
        }
        self.fill_header(input, self.hdr_need);
        if self.hdr_len < self.hdr_need {
            return Ok(false);
        }
        let header = coding::decode(self.hdr.get(..self.hdr_need).unwrap_or_default())?;
        self.hdr_len = 0;
        self.hdr_need = 0;
        self.begin_frame(header, msg_len)?;
        Ok(true)
    }

    fn fill_header(&mut self, input: &mut &[u8], upto: usize) {
        let want = upto.saturating_sub(self.hdr_len).min(input.len());
        let (head, rest) = input.split_at(want);
        if let Some(dst) = self.hdr.get_mut(self.hdr_len..self.hdr_len + want) {
            dst.copy_from_slice(head);
            self.hdr_len += want;
        }
        *input = rest;
    }

    /// Applies the rules that need the whole header, before any payload
    /// byte is stored.
    fn begin_frame(&mut self, header: FrameHeader, msg_len: usize) -> Result<(), ProtocolError> {
        match header.opcode {
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                // The header is checked: at most MAX_CONTROL_PAYLOAD.
                self.ctrl = Vec::with_capacity(usize::try_from(header.len).unwrap_or(0));
            }
            op => {
                let kind = match (op, self.msg_kind) {
                    (OpCode::Continuation, None) => {
                        return Err(ProtocolError::UnexpectedContinuation);
                    }
                    (OpCode::Continuation, Some(kind)) => kind,
                    (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
                    (OpCode::Text, None) => MsgKind::Text,
                    (_, None) => MsgKind::Binary,
                };
                if header.len > self.config.max_frame_size as u64 {
                    return Err(ProtocolError::FrameTooBig);
                }
                if (msg_len as u64).saturating_add(header.len) > self.config.max_message_size as u64
                {
                    return Err(ProtocolError::MessageTooBig);
                }
                if self.msg_kind.is_none() && kind == MsgKind::Text {
                    self.utf8.reset();
                }
                self.msg_kind = Some(kind);
            }
        }
        self.frame = Some(InFrame {
            header,
            remaining: header.len,
            mask_offset: if self.leaves_masked(&header) {
                LEFT_MASKED
            } else {
                0
            },
        });
        Ok(())
    }

    fn finish_control(&mut self, opcode: OpCode) -> Option<Ready> {
        let payload = std::mem::take(&mut self.ctrl);
        match opcode {
            OpCode::Ping => {
                // A peer that pings without reading our output must not grow
                // the queue: RFC 6455 lets us answer only the latest ping.
                if !self.close_sent && !queue_full(self.out.len(), self.config.send_queue_bytes) {
                    self.out.push_frame(true, OpCode::Pong, &payload);
                }
                None
            }
            OpCode::Close => Some(Ready::Closed(self.peer_close(&payload))),
            _ => None,
        }
    }

    fn peer_close(&mut self, payload: &[u8]) -> CloseInfo {
        let (code, reason) = match payload {
            [] => (None, String::new()),
            [_] => return self.fail(ProtocolError::CloseFrameOneByte),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !close::is_valid(code) {
                    return self.fail(ProtocolError::InvalidCloseCode(code));
                }
                match std::str::from_utf8(reason) {
                    Ok(r) => (Some(code), r.to_owned()),
                    Err(_) => return self.fail(ProtocolError::InvalidCloseReason),
                }
            }
        };
        if !self.close_sent {
            let echo = code.map(u16::to_be_bytes);
            let echo: &[u8] = echo.as_ref().map_or(&[], |e| e);
            self.out.push_close(echo);
            self.close_sent = true;
        }
        self.mark_closed();
        CloseInfo {
            code: code.unwrap_or(CloseCode::NO_STATUS),
            reason,
            clean: true,
        }
    }

    /// Fails the connection: queue our Close (unless one went out already),
    /// and report the error's code.
    fn fail(&mut self, e: ProtocolError) -> CloseInfo {
        if !self.close_sent {
            self.push_close(e.close_code(), e.reason());
            self.close_sent = true;
        }
        self.mark_closed();
        CloseInfo {
            code: e.close_code(),
            reason: e.reason().to_owned(),
            clean: false,
        }
    }

    fn mark_closed(&mut self) {
        self.state = State::Closed;
        self.closed_reported = true;
        self.close_deadline = None;
        self.frame = None;
        self.msg_kind = None;
    }

    fn push_close(&mut self, code: u16, reason: &str) {
        let mut buf = [0u8; MAX_CONTROL_PAYLOAD];
        let reason = reason.as_bytes();
        let reason = reason.get(..MAX_CLOSE_REASON).unwrap_or(reason);
        let len = 2 + reason.len();
        if let Some((code_bytes, rest)) = buf.split_first_chunk_mut::<2>() {
            *code_bytes = code.to_be_bytes();
            if let Some(dst) = rest.get_mut(..reason.len()) {
                dst.copy_from_slice(reason);
            }
        }
        self.out.push_close(buf.get(..len).unwrap_or_default());
    }

    fn start_close(&mut self, code: u16, reason: &str, now: Instant) {
        self.push_close(code, reason);
        self.close_sent = true;
        self.state = State::Closing;
        self.close_deadline = Some(add(now, self.config.close_timeout));
    }

    fn check_can_send(&self) -> Result<(), SendError> {
        if self.state == State::Open {
            Ok(())
        } else {
            Err(SendError::Closed)
        }
    }

    fn check_queue(&self) -> Result<(), SendError> {
        if queue_full(self.out.len(), self.config.send_queue_bytes) {
            Err(SendError::QueueFull)
        } else {
            Ok(())
        }
    }

    /// Whether a data message of `len` bytes may be queued now.
    fn admit(&self, len: usize) -> Result<(), SendError> {
        self.check_can_send()?;
        if len > self.config.max_message_size {
            return Err(SendError::MessageTooBig);
        }
        self.check_queue()
    }

    fn send_data(&mut self, opcode: OpCode, data: &[u8]) -> Result<(), SendError> {
        self.admit(data.len())?;
        for (fin, op, range) in fragments(opcode, data.len(), self.config.fragment_size) {
            self.out.push_frame(fin, op, &data[range]);
        }
        Ok(())
    }

    fn ping_due(&self) -> Option<Instant> {
        match (self.config.ping_interval, self.ping_outstanding) {
            (Some(every), false) => Some(add(self.last_recv, every)),
            _ => None,
        }
    }

    fn idle_deadline(&self) -> Option<Instant> {
        self.config
            .idle_timeout
            .map(|idle| add(self.last_recv, idle))
    }

    fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Open => match (self.ping_due(), self.idle_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            State::Closing => self.close_deadline,
            State::Closed => None,
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Option<CloseInfo> {
        self.observe(now);
        match self.state {
            State::Open => {
                if self.idle_deadline().is_some_and(|d| now >= d) {
                    self.start_close(CloseCode::GOING_AWAY, "idle timeout", now);
                } else if self.ping_due().is_some_and(|d| now >= d) {
                    self.out.push_frame(true, OpCode::Ping, &[]);
                    self.ping_outstanding = true;
                }
                None
            }
            State::Closing => {
                if self.close_deadline.is_some_and(|d| now >= d) {
                    self.mark_closed();
                    Some(CloseInfo {
                        code: CloseCode::ABNORMAL,
                        reason: "close timeout".to_owned(),
                        clean: false,
                    })
                } else {
                    None
                }
            }
            State::Closed => None,
        }
    }
}

/// `Instant + Duration` that saturates to "about a century later" instead
/// of panicking on absurd configured durations.
fn add(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(t)
}

/// A complete server data frame, encoded once: cheap to clone and to queue
/// on any number of connections with [`WebSocket::send_framed`].
#[derive(Debug, Clone)]
pub struct Framed {
    bytes: Bytes,
    payload_len: usize,
}

impl Framed {
    /// A text message (the caller's `&str` is valid UTF-8 by construction).
    pub fn text(text: &str) -> Self {
        Self::encode(OpCode::Text, text.as_bytes())
    }

    /// A binary message.
    pub fn binary(data: &[u8]) -> Self {
        Self::encode(OpCode::Binary, data)
    }

    fn encode(opcode: OpCode, payload: &[u8]) -> Self {
        let (header, used) = coding::encode(true, opcode, payload.len());
        let mut bytes = Vec::with_capacity(used + payload.len());
        bytes.extend_from_slice(&header[..used]);
        bytes.extend_from_slice(payload);
        Self {
            bytes: Bytes::from(bytes),
            payload_len: payload.len(),
        }
    }

    /// The message's payload size.
    pub fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Whether it is a binary (not a text) message.
    pub fn is_binary(&self) -> bool {
        self.bytes
            .first()
            .is_some_and(|b| b & 0x0F == OpCode::Binary.bits())
    }
}

/// The frames a message of `len` bytes is sent as: (FIN, opcode, payload
/// range), one frame unless `fragment_size` splits it.
fn fragments(
    opcode: OpCode,
    len: usize,
    fragment_size: Option<usize>,
) -> impl Iterator<Item = (bool, OpCode, std::ops::Range<usize>)> {
    let size = match fragment_size {
        Some(size) if len > size.max(1) => size.max(1),
        _ => len.max(1),
    };
    let count = len.div_ceil(size).max(1);
    (0..count).map(move |i| {
        let start = i * size;
        let end = (start + size).min(len);
        let op = if i == 0 { opcode } else { OpCode::Continuation };
        (i + 1 == count, op, start..end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends a client's mask and `payload` masked with it to `head`.
    fn with_masked(mut head: Vec<u8>, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        head.extend_from_slice(&mask);
        head.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        head
    }

    /// A final binary frame with a 64-bit length.
    fn masked_binary(payload: &[u8]) -> Vec<u8> {
        let mut head = vec![0x82, 0x80 | 127];
        head.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        with_masked(head, payload)
    }

    /// A final frame of at most 125 bytes.
    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        with_masked(vec![0x80 | opcode, 0x80 | payload.len() as u8], payload)
    }

    #[test]
    fn held_messages_stay_back_to_back_until_released() {
        let now = Instant::now();
        let mut ws = WebSocket::new(
            Config {
                max_message_size: 8,
                ..Config::default()
            },
            now,
        );
        let mut input = masked(2, b"one");
        input.extend(masked(1, "tw\u{f6}".as_bytes()));
        // Fragmented, with a ping between: "thr" + "ee".
        let mut first = masked(1, b"thr");
        first[0] = 0x01;
        input.extend(first);
        input.extend(masked(9, b"p"));
        input.extend(masked(0, b"ee"));
        let fourth = masked(2, b"four");
        input.extend(&fourth[..fourth.len() - 2]);
        let mut bytes = &input[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(b"one")));
        ws.hold_message();
        assert_eq!(ws.held(), b"one");
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Text("tw\u{f6}")));
        ws.hold_message();
        // Each message's limit is its own: 3 + 4 + 5 held bytes pass 8.
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Text("three")));
        ws.hold_message();
        assert_eq!(ws.held(), "onetw\u{f6}three".as_bytes());
        assert_eq!(ws.read(&mut bytes, now), None);
        assert!(bytes.is_empty());
        assert_eq!(ws.held(), "onetw\u{f6}three".as_bytes());
        // Released mid-message: the rest of "four" still completes it.
        ws.release_held();
        assert_eq!(ws.held(), b"");
        let mut rest = &fourth[fourth.len() - 2..];
        assert_eq!(ws.read(&mut rest, now), Some(Event::Binary(b"four")));
        // Not held: the next read drops it.
        let five = masked(2, b"five");
        let mut bytes = &five[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(b"five")));
        assert_eq!(ws.held(), b"");
        assert_eq!(ws.msg, b"five");
    }

    #[test]
    fn held_messages_survive_the_close_that_follows_them() {
        let now = Instant::now();
        let mut ws = WebSocket::new(Config::default(), now);
        let mut input = masked(2, b"kept");
        input.extend(masked(8, &[0x03, 0xE8]));
        let mut bytes = &input[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(b"kept")));
        ws.hold_message();
        assert!(matches!(ws.read(&mut bytes, now), Some(Event::Closed(_))));
        assert_eq!(ws.held(), b"kept");
        ws.release_held();
        assert_eq!(ws.msg.capacity(), 0);
    }

    #[test]
    fn an_idle_connection_frees_what_a_message_grew_but_not_one_under_way() {
        let now = Instant::now();
        let mut ws = WebSocket::new(Config::default(), now);
        let payload = vec![5u8; 20_000];
        let input = masked_binary(&payload);
        let mut bytes = &input[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(&payload[..])));
        assert_eq!(ws.read(&mut bytes, now), None);
        // Small sends, written at once: the output's buffer grew to hold them.
        for _ in 0..100 {
            ws.send_binary(&payload[..200]).unwrap();
        }
        ws.advance_output(ws.output_len());
        // Kept between messages (the message buffer up to MSG_BUF_KEEP)...
        assert!(ws.input_held() >= payload.len());
        assert!(ws.core.out.capacity() > 0);
        // ...and freed once idle.
        assert!(ws.release_idle() >= payload.len());
        assert_eq!(ws.input_held(), 0);
        assert_eq!(ws.core.out.capacity(), 0);
        // Half a message: kept, and it completes.
        let mut half = &input[..input.len() / 2];
        assert_eq!(ws.read(&mut half, now), None);
        ws.release_idle();
        assert!(ws.input_held() >= input.len() / 2 - 14);
        let mut rest = &input[input.len() / 2..];
        assert_eq!(ws.read(&mut rest, now), Some(Event::Binary(&payload[..])));
        // Queued output: kept.
        ws.send_binary(b"queued").unwrap();
        let queued = ws.output_len();
        ws.release_idle();
        assert_eq!(ws.output_len(), queued);
    }

    #[test]
    fn message_buffer_shrinks_after_a_big_message() {
        let now = Instant::now();
        let mut ws = WebSocket::new(Config::default(), now);
        let big = vec![9u8; 1 << 20];
        let input = masked_binary(&big);
        let mut bytes = &input[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(&big[..])));
        assert!(ws.msg.capacity() >= 1 << 20);
        // The next read recycles the buffer before decoding anything.
        let mut empty: &[u8] = &[];
        assert_eq!(ws.read(&mut empty, now), None);
        assert!(ws.msg.capacity() <= MSG_BUF_KEEP);
        assert!(ws.msg.is_empty());
    }

    #[test]
    fn message_memory_is_released_on_close() {
        let now = Instant::now();
        let mut ws = WebSocket::new(Config::default(), now);
        let partial = masked_binary(&[7u8; 1000]);
        let mut bytes = &partial[..500];
        assert_eq!(ws.read(&mut bytes, now), None);
        assert!(ws.msg.capacity() > 0);
        assert!(ws.transport_closed().is_some());
        assert_eq!(ws.msg.capacity(), 0);
    }

    /// Reads `wire` the way a driver using [`WebSocket::split_io`] does:
    /// into the lent room when there is one (at most `step` bytes at a
    /// time), else into its own buffer; returns the messages, owned, the
    /// bytes read into lent room and the most input held at a delivery.
    fn read_lending(
        ws: &mut WebSocket,
        mut wire: &[u8],
        step: usize,
        min: usize,
    ) -> (Vec<Vec<u8>>, usize, usize) {
        let now = Instant::now();
        let (mut got, mut lent, mut peak) = (Vec::new(), 0, 0);
        while !wire.is_empty() {
            let (_, room) = ws.split_io(min, step);
            let mut input: &[u8] = match room {
                Some(mut room) => {
                    let n = room.remaining_mut().min(wire.len());
                    room.put_slice(&wire[..n]);
                    lent += n;
                    wire = &wire[n..];
                    &[]
                }
                None => {
                    let n = step.min(wire.len());
                    let (now_in, rest) = wire.split_at(n);
                    wire = rest;
                    now_in
                }
            };
            loop {
                let message = match ws.read(&mut input, now) {
                    Some(Event::Binary(b)) => Some(b.to_vec()),
                    Some(Event::MaskedBinary(m)) => Some(m.unmask().to_vec()),
                    Some(Event::Text(t)) => Some(t.as_bytes().to_vec()),
                    Some(Event::Closed(info)) => Some(format!("closed {}", info.code).into_bytes()),
                    None => None,
                };
                peak = peak.max(ws.input_held());
                match message {
                    Some(m) => got.push(m),
                    None if input.is_empty() => break,
                    None => {}
                }
            }
        }
        (got, lent, peak)
    }

    /// The budget counts the message buffer's capacity: a message of one
    /// frame, however it arrives, holds its own size, not the doubling
    /// that reached it; one of several frames grows by doubling, capped in
    /// its last frame at its end; a frame announced but not sent reserves
    /// nothing.
    #[test]
    fn a_message_holds_its_size_not_the_doubling_that_reached_it() {
        let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let wire = masked_binary(&big);
        for (step, min) in [
            (65536, 1),
            (4096, 1),
            (65536, usize::MAX),
            (1000, usize::MAX),
        ] {
            let mut ws = WebSocket::new(Config::default(), Instant::now());
            let (got, _, peak) = read_lending(&mut ws, &wire, step, min);
            assert_eq!(got, std::slice::from_ref(&big), "step {step}, min {min}");
            assert_eq!(peak, big.len(), "step {step}, min {min}");
        }
        // Two frames of 300,000: the buffer doubles through the first, and
        // in the last stops at the message's end.
        let mut first = masked_binary(&big[..300_000]);
        first[0] = 0x02;
        let mut two = first;
        let mut last = masked_binary(&big[300_000..]);
        last[0] = 0x80;
        two.extend(last);
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        let (got, _, peak) = read_lending(&mut ws, &two, 65536, 1);
        assert_eq!(got, std::slice::from_ref(&big));
        assert_eq!(peak, big.len());
        // A message in 1-byte fragments: the buffer doubles (a few dozen
        // allocations), it is not grown to each fragment's end (one each).
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        let mut wire = Vec::new();
        for i in 0..20_000 {
            let mut f = masked(0, &[7]);
            f[0] = if i == 0 { 0x02 } else { 0x00 };
            wire.extend(f);
        }
        wire.extend(masked(0, &[7]));
        let (mut bytes, mut grown, mut cap) = (&wire[..], 0, 0);
        while !bytes.is_empty() {
            let (mut step, rest) = bytes.split_at(7);
            bytes = rest;
            let event = ws
                .read(&mut step, Instant::now())
                .map(|e| e == Event::Binary(&[7; 20_001]));
            grown += usize::from(ws.input_held() != cap);
            cap = ws.input_held();
            assert!(event.is_none() || event == Some(true));
        }
        assert!(grown < 40, "the buffer grew {grown} times");
        // 16 MiB announced, 10 bytes sent: room for what came, not more.
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        let mut head = vec![0x82, 0x80 | 127];
        head.extend_from_slice(&(16u64 << 20).to_be_bytes());
        let partial = with_masked(head, &[0; 10]);
        let mut bytes = &partial[..];
        assert_eq!(ws.read(&mut bytes, Instant::now()), None);
        assert!(ws.input_held() < 4096, "{}", ws.input_held());
    }

    #[test]
    fn payload_read_into_the_lent_room_is_unmasked_and_delivered() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = masked(2, b"small");
        wire.extend(masked_binary(&big));
        wire.extend(masked(2, b"after"));
        for step in [1, 7, 4096, 65536, 1 << 20] {
            let mut ws = WebSocket::new(Config::default(), Instant::now());
            let (got, lent, _) = read_lending(&mut ws, &wire, step, 1);
            assert_eq!(
                got,
                [b"small".to_vec(), big.clone(), b"after".to_vec()],
                "step {step}"
            );
            // The header is read by the driver; the payload into the room.
            assert!(
                lent >= big.len() - step.min(big.len()),
                "step {step}: {lent}"
            );
        }
        // Below `min` due, no room is lent.
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        let (got, lent, _) = read_lending(&mut ws, &wire, 4096, 1 << 20);
        assert_eq!((got.len(), lent), (3, 0));
    }

    /// With `deliver_masked_from`, a binary message of one frame comes
    /// still masked (however it was read); unmasked into a copy or in
    /// place, or in place when held, it reads as it was sent. Fragmented
    /// binary, text and shorter messages come as before.
    #[test]
    fn binary_messages_of_one_frame_are_delivered_masked_on_request() {
        let config = Config {
            deliver_masked_from: Some(0),
            ..Config::default()
        };
        let now = Instant::now();
        let mut ws = WebSocket::new(config.clone(), now);
        let mut input = masked(2, b"one");
        input.extend(masked(2, b"two"));
        let mut first = masked(2, b"thr");
        first[0] = 0x02;
        input.extend(first);
        input.extend(masked(0, b"ee"));
        input.extend(masked(1, b"four"));
        input.extend(masked(2, b""));
        let mut bytes = &input[..];
        let Some(Event::MaskedBinary(one)) = ws.read(&mut bytes, now) else {
            panic!("not masked");
        };
        assert_eq!(one.len(), 3);
        let mut copy = [0; 3];
        one.unmask_into(&mut copy);
        assert_eq!(&copy, b"one");
        // Copied out, it is still masked where it lies: held, it is
        // unmasked there.
        ws.hold_message();
        assert_eq!(ws.held(), b"one");
        let Some(Event::MaskedBinary(two)) = ws.read(&mut bytes, now) else {
            panic!("not masked");
        };
        assert_eq!(two.unmask(), b"two");
        ws.hold_message();
        assert_eq!(ws.held(), b"onetwo");
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(b"three")));
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Text("four")));
        let Some(Event::MaskedBinary(empty)) = ws.read(&mut bytes, now) else {
            panic!("not masked");
        };
        assert!(empty.is_empty());
        assert_eq!(ws.held(), b"onetwo");

        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = masked(2, b"small");
        wire.extend(masked_binary(&big));
        wire.extend(masked(1, b"after"));
        for step in [1, 7, 4096, 65536, 1 << 20] {
            let mut ws = WebSocket::new(config.clone(), Instant::now());
            let (got, _, _) = read_lending(&mut ws, &wire, step, 1);
            let want = [b"small".to_vec(), big.clone(), b"after".to_vec()];
            assert_eq!(got, want, "step {step}");
        }
        let mut plain = WebSocket::new(Config::default(), now);
        let mut bytes = &input[..];
        assert_eq!(plain.read(&mut bytes, now), Some(Event::Binary(b"one")));
        let from_four = Config {
            deliver_masked_from: Some(4),
            ..Config::default()
        };
        let mut ws = WebSocket::new(from_four, now);
        let mut wire = masked(2, b"one");
        wire.extend(masked(2, b"four"));
        let mut bytes = &wire[..];
        assert_eq!(ws.read(&mut bytes, now), Some(Event::Binary(b"one")));
        assert!(matches!(
            ws.read(&mut bytes, now),
            Some(Event::MaskedBinary(m)) if m.len() == 4
        ));
    }

    #[test]
    fn lent_payload_of_fragmented_text_is_checked_as_it_comes() {
        let text = "h\u{e9}llo w\u{f6}rld ".repeat(500);
        let bytes = text.as_bytes();
        // Three fragments, cut inside a two-byte character.
        let cuts = [0, 1001, 3003, bytes.len()];
        let mut wire = Vec::new();
        for (i, pair) in cuts.windows(2).enumerate() {
            let opcode = if i == 0 { 1 } else { 0 };
            let fin = if i == 2 { 0x80 } else { 0 };
            let part = &bytes[pair[0]..pair[1]];
            let mut head = vec![fin | opcode, 0x80 | 126];
            head.extend_from_slice(&(part.len() as u16).to_be_bytes());
            wire.extend(with_masked(head, part));
        }
        for step in [3, 100, 4096] {
            let mut ws = WebSocket::new(Config::default(), Instant::now());
            let (got, lent, _) = read_lending(&mut ws, &wire, step, 1);
            assert_eq!(got, [bytes.to_vec()], "step {step}");
            assert!(lent > 0);
        }
        // Invalid UTF-8 read into the room fails the connection with 1007
        // before the message ends.
        let mut bad = bytes[..1000].to_vec();
        bad.extend_from_slice(&[0xff; 8]);
        let mut head = vec![0x81, 0x80 | 126];
        head.extend_from_slice(&(bad.len() as u16 + 2000).to_be_bytes());
        let wire = with_masked(head, &bad);
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        let (got, _, _) = read_lending(&mut ws, &wire, 512, 1);
        assert_eq!(got, [b"closed 1007".to_vec()]);
    }

    #[test]
    fn a_loan_follows_held_messages_and_an_unused_loan_costs_nothing() {
        let now = Instant::now();
        let mut ws = WebSocket::new(Config::default(), now);
        let big = vec![5u8; 3000];
        let mut wire = masked(2, b"held");
        let frame = masked_binary(&big);
        wire.extend(&frame[..20]);
        let mut input = &wire[..];
        assert_eq!(ws.read(&mut input, now), Some(Event::Binary(b"held")));
        ws.hold_message();
        assert_eq!(ws.read(&mut input, now), None);
        // Lent, nothing read (the wait ended for something else): the
        // same room is lent again, and input still goes through `read`.
        assert!(ws.split_io(1, 100).1.is_some());
        let mut more = &frame[20..40];
        assert_eq!(ws.read(&mut more, now), None);
        let (_, room) = ws.split_io(1, 1 << 20);
        let mut room = room.expect("room");
        assert_eq!(room.remaining_mut(), frame.len() - 40);
        room.put_slice(&frame[40..]);
        let mut none: &[u8] = &[];
        assert_eq!(ws.read(&mut none, now), Some(Event::Binary(&big[..])));
        ws.hold_message();
        let mut held = b"held".to_vec();
        held.extend(&big);
        assert_eq!(ws.held(), &held[..]);
        // No room while a message waits to be dropped by the next read.
        let (_, room) = ws.split_io(1, 100);
        assert!(room.is_none());
    }
}
