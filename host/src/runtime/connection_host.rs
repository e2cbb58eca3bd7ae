//! The host side of `wharf:websocket/connection`: the `connection` resource a
//! plugin sends through.
//!
//! A plugin's sends are framed into the connection's [`Outbox`] and handed
//! to the protocol state machine by the driver once the call returns, so
//! the host never re-enters an instance and a plugin never touches a
//! socket. One exception saves the copy of a large message, or of a packed
//! send's messages together: during a call the connection's own task
//! makes with nothing queued ahead, their frames are offered to the socket
//! by the host in one write, without waiting, while the plugin's memory is
//! still readable ([`DirectWrite`]); only what the socket does not take is
//! framed into the outbox.
//!
//! These host functions are wired by hand rather than by `bindgen!`: the
//! generated ones would lift each payload into a fresh `String`/`Vec`
//! (an allocation and a copy per message); here the payload is read in
//! place from the plugin's memory and framed straight into the outbox.

use std::io::IoSlice;
use std::sync::Arc;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceType, WasmList, WasmStr};
use wharf_protocol::{CloseCode as Code, FrameBatch, MAX_CLOSE_REASON};

use super::HostState;
use super::batch_handler::Message;
use super::bindings::{CloseCode, ErrorCode};
use super::pubsub_host::Subscriptions;
use crate::beacon::Beacon;

/// The interface these functions implement (older 0.1.x plugins are matched
/// to it by semver).
const INTERFACE: &str = "wharf:websocket/connection@0.1.12";

/// The limits the host checks a send against, fixed per connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct SendLimits {
    pub max_message_size: usize,
    pub send_queue: usize,
    /// The protocol's outgoing fragmentation: sends are framed here.
    pub fragment_size: Option<usize>,
}

/// The smallest send written to the socket during the call
/// ([`DirectWrite`]), one message or the messages of one packed send
/// together: below it, copying the payloads costs less than the write of
/// its own the send would take when the plugin sends several (one write
/// takes a whole outbox).
const WRITE_THROUGH_MIN: usize = 16 * 1024;
/// The most messages of one packed send written together (two slices
/// each, on the stack of the plugin's call); a larger send is framed.
const WRITE_THROUGH_MESSAGES: usize = 64;

/// The socket of the connection whose task is calling, for its large
/// sends; see the module's doc.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes what the socket takes now, without waiting: the bytes
    /// written, 0 when it takes nothing or fails (the driver's own write
    /// then meets the error).
    fn try_write(&self, bufs: &[IoSlice<'_>]) -> usize;
    /// Counts a message written this way, before it is, so that whoever
    /// sees it has seen it counted (the outbox's messages are counted by
    /// the driver, before it writes them).
    fn count_sent(&self, text: bool, bytes: usize);
}

/// A plugin's sends for one connection during a call: complete frames, and
/// the close it asked for (always last: nothing is accepted after it).
#[derive(Debug, Default)]
pub struct Outbox {
    limits: SendLimits,
    pub frames: FrameBatch,
    pub close: Option<(u16, String)>,
    /// Bytes the driver had not yet written when the current call began.
    backlog: usize,
    /// No more sends accepted: the plugin closed, or the connection is closing.
    closed: bool,
    /// Where large sends go during a call, kept between calls...
    direct: Option<Arc<dyn DirectWrite>>,
    /// ...and whether they may go there during this one.
    armed: bool,
}

impl Outbox {
    fn new(limits: SendLimits) -> Self {
        Self {
            limits,
            frames: FrameBatch::new(limits.fragment_size),
            ..Self::default()
        }
    }

    fn check_send(&self, len: usize) -> Result<(), ErrorCode> {
        if self.closed {
            Err(ErrorCode::Closed)
        } else if len > self.limits.max_message_size {
            Err(ErrorCode::MessageTooBig)
        } else if wharf_protocol::queue_full(
            self.backlog + self.frames.len(),
            self.limits.send_queue,
        ) {
            Err(ErrorCode::QueueFull)
        } else {
            Ok(())
        }
    }

    pub(crate) fn send_text(&mut self, text: &str) -> Result<(), ErrorCode> {
        self.check_send(text.len())?;
        if !self.write_through(&[Message::Text(text)]) {
            self.frames.push_text(text);
        }
        Ok(())
    }

    pub(crate) fn send_binary(&mut self, data: &[u8]) -> Result<(), ErrorCode> {
        self.check_send(data.len())?;
        if !self.write_through(&[Message::Binary(data)]) {
            self.frames.push_binary(data);
        }
        Ok(())
    }

    /// Offers a send's frames to the socket in one write, if this call may
    /// ([`DirectWrite`]), nothing is framed ahead of them, their payloads
    /// add up to [`WRITE_THROUGH_MIN`] and each is one frame the send's
    /// checks accept: one message, or a packed send's (at most
    /// [`WRITE_THROUGH_MESSAGES`]). What the socket does not take is
    /// framed. `false`: nothing offered or queued, for the caller to frame.
    pub(crate) fn write_through(&mut self, messages: &[Message<'_>]) -> bool {
        let total: usize = messages.iter().map(|m| m.len()).sum();
        if total < WRITE_THROUGH_MIN || messages.len() > WRITE_THROUGH_MESSAGES {
            return false;
        }
        let Some(direct) = self.direct.as_ref().filter(|_| self.armed) else {
            return false;
        };
        let mut headers = [([0u8; 10], 0usize); WRITE_THROUGH_MESSAGES];
        for (header, message) in headers.iter_mut().zip(messages) {
            let text = matches!(message, Message::Text(_));
            if self.check_send(message.len()).is_err() {
                return false;
            }
            let Some(encoded) = self.frames.header_for(text, message.len()) else {
                return false;
            };
            *header = encoded;
        }
        // Every message is counted before its frame is offered.
        let mut slices = [IoSlice::new(&[]); 2 * WRITE_THROUGH_MESSAGES];
        for (pair, ((header, used), message)) in
            slices.chunks_exact_mut(2).zip(headers.iter().zip(messages))
        {
            direct.count_sent(matches!(message, Message::Text(_)), message.len());
            pair[0] = IoSlice::new(&header[..*used]);
            pair[1] = IoSlice::new(message.bytes());
        }
        let mut written = direct.try_write(&slices[..2 * messages.len()]);
        for ((header, used), message) in headers.iter().zip(messages) {
            let frame = used + message.len();
            if written >= frame {
                written -= frame;
            } else {
                self.frames
                    .push_rest(&header[..*used], message.bytes(), written);
                written = 0;
            }
        }
        true
    }

    pub(crate) fn close(&mut self, code: CloseCode, reason: String) -> Result<(), ErrorCode> {
        if self.closed {
            return Err(ErrorCode::Closed);
        }
        let code = close_code_number(code)?;
        if reason.len() > MAX_CLOSE_REASON {
            return Err(ErrorCode::ReasonTooLong);
        }
        self.closed = true;
        self.close = Some((code, reason));
        Ok(())
    }

    /// Sets what the driver still has to write, whether the connection can
    /// still send, and where this call's large sends may be written
    /// (`None`: framed like the rest); called before each call into the
    /// plugin.
    pub fn sync(&mut self, backlog: usize, closed: bool, direct: Option<&Arc<dyn DirectWrite>>) {
        self.backlog = backlog;
        self.closed |= closed;
        self.armed = direct.is_some();
        if let Some(direct) = direct
            && self.direct.is_none()
        {
            self.direct = Some(direct.clone());
        }
    }

    /// The call is over: nothing more is written from it.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.close.is_none()
    }

    /// Takes the queued frames, leaving an empty batch (a failed call's,
    /// for the driver: see [`PluginInstance::salvage`](super::PluginInstance::salvage)).
    pub fn take_frames(&mut self) -> FrameBatch {
        std::mem::replace(&mut self.frames, FrameBatch::new(self.limits.fragment_size))
    }

    /// Messages queued, left where they are.
    pub fn queued(&self) -> u64 {
        self.frames.messages()
    }

    /// Discards the queued sends (an instance's other connections when it
    /// fails; callers that drive an instance without a connection: benches,
    /// tests); returns how many messages there were.
    pub fn discard(&mut self) -> u64 {
        let (text, binary) = self.frames.take_tally();
        self.frames.clear();
        self.close = None;
        text.messages + binary.messages
    }

    /// Whether sends are refused (the plugin closed, or the connection is closing).
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

/// The resource behind a plugin's `connection` handle.
#[derive(Debug)]
pub struct ConnectionEntry {
    id: u64,
    pub outbox: Outbox,
    /// Its topics (`wharf:websocket/pubsub`), left when the entry is dropped.
    pub subscriptions: Subscriptions,
    /// Its attachment (`wharf:websocket/attachment`).
    pub attachment: Vec<u8>,
    /// Wakes the connection's task when another connection's call queued
    /// sends for it (`wharf:websocket/peers`, in a shared instance).
    pub wake: Option<Arc<Beacon>>,
}

impl ConnectionEntry {
    pub fn new(id: u64, limits: SendLimits, subscriptions: Subscriptions) -> Self {
        Self {
            id,
            subscriptions,
            attachment: Vec::new(),
            outbox: Outbox::new(limits),
            wake: None,
        }
    }

    /// The host's id of the connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What a hibernating connection keeps (see [`Parked`]).
    pub fn park(self) -> Parked {
        Parked {
            id: self.id,
            subscriptions: self.subscriptions,
            attachment: self.attachment,
            wake: self.wake,
        }
    }

    /// The entry a parked connection resumes with, its outbox made anew
    /// with `limits` (those of the plugin it wakes on).
    pub fn unpark(parked: Parked, limits: SendLimits) -> Self {
        Self {
            attachment: parked.attachment,
            wake: parked.wake,
            ..Self::new(parked.id, limits, parked.subscriptions)
        }
    }
}

/// What a hibernated connection keeps of its entry: its topics, its
/// attachment, its waker. Not the outbox, empty between calls and made
/// anew when it resumes: kept, it would be 160 bytes of every idle
/// connection.
pub struct Parked {
    id: u64,
    subscriptions: Subscriptions,
    attachment: Vec<u8>,
    wake: Option<Arc<Beacon>>,
}

/// Maps a plugin's close code to its number, refusing what a plugin may not send.
pub fn close_code_number(code: CloseCode) -> Result<u16, ErrorCode> {
    Ok(match code {
        CloseCode::Normal => Code::NORMAL,
        CloseCode::GoingAway => Code::GOING_AWAY,
        CloseCode::ProtocolError => Code::PROTOCOL_ERROR,
        CloseCode::UnsupportedData => Code::UNSUPPORTED_DATA,
        CloseCode::InvalidPayload => Code::INVALID_PAYLOAD,
        CloseCode::PolicyViolation => Code::POLICY_VIOLATION,
        CloseCode::MessageTooBig => Code::MESSAGE_TOO_BIG,
        CloseCode::InternalError => Code::INTERNAL_ERROR,
        CloseCode::Application(n) if Code::is_application(n) => n,
        CloseCode::Application(_) => return Err(ErrorCode::InvalidCode),
    })
}

/// Runs `send` on the connection's outbox with the plugin's memory readable:
/// the outbox is taken out of the table for the call, so the payload can be
/// read in place while it is framed, and put back whatever `send` returns.
pub(super) fn with_outbox<R>(
    mut store: StoreContextMut<'_, HostState>,
    this: &Resource<ConnectionEntry>,
    send: impl FnOnce(&mut StoreContextMut<'_, HostState>, &mut Outbox) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let mut outbox = std::mem::take(&mut store.data_mut().table.get_mut(this)?.outbox);
    let result = send(&mut store, &mut outbox);
    store.data_mut().table.get_mut(this)?.outbox = outbox;
    result
}

/// Adds `wharf:websocket/connection` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(INTERFACE)?;
    // Plugins only ever receive borrowed handles, so a drop is never a
    // plugin's to make; the host drops the entry with the store.
    inst.resource(
        "connection",
        ResourceType::host::<ConnectionEntry>(),
        |_, _| Ok(()),
    )?;
    inst.func_wrap(
        "[method]connection.id",
        |store: StoreContextMut<'_, HostState>, (this,): (Resource<ConnectionEntry>,)| {
            Ok((store.data().table.get(&this)?.id,))
        },
    )?;
    inst.func_wrap(
        "[method]connection.send-text",
        |store: StoreContextMut<'_, HostState>,
         (this, text): (Resource<ConnectionEntry>, WasmStr)| {
            with_outbox(store, &this, |store, outbox| {
                // Validated (and transcoded, for UTF-16 plugins) here; a
                // UTF-8 plugin's text is read in place.
                let text = text.to_str(&*store)?;
                Ok((outbox.send_text(&text),))
            })
        },
    )?;
    inst.func_wrap(
        "[method]connection.send-binary",
        |store: StoreContextMut<'_, HostState>,
         (this, data): (Resource<ConnectionEntry>, WasmList<u8>)| {
            with_outbox(store, &this, |store, outbox| {
                Ok((outbox.send_binary(data.as_le_slice(&*store)),))
            })
        },
    )?;
    inst.func_wrap(
        "[method]connection.close",
        |mut store: StoreContextMut<'_, HostState>,
         (this, code, reason): (Resource<ConnectionEntry>, CloseCode, String)| {
            let outbox = &mut store.data_mut().table.get_mut(&this)?.outbox;
            Ok((outbox.close(code, reason),))
        },
    )?;
    Ok(())
}

impl super::bindings::wharf::websocket::types::Host for HostState {}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(max_message_size: usize, send_queue: usize) -> Outbox {
        Outbox::new(SendLimits {
            max_message_size,
            send_queue,
            fragment_size: None,
        })
    }

    #[test]
    fn sends_are_framed_and_bounded() {
        let mut out = outbox(100, 50);
        assert_eq!(out.send_text("hi"), Ok(()));
        assert_eq!(out.send_binary(&[1, 2, 3]), Ok(()));
        // Frames as the protocol writes them: 2-byte headers, no mask.
        assert_eq!(out.frames.len(), 2 + 2 + 2 + 3);
        assert_eq!(out.send_binary(&[0; 101]), Err(ErrorCode::MessageTooBig));
        // The queue bound counts what the driver still has to write too.
        out.sync(41, false, None);
        assert_eq!(out.send_text("x"), Err(ErrorCode::QueueFull));
        out.sync(0, false, None);
        assert_eq!(out.discard(), 2);
        assert!(out.is_empty());
    }

    #[test]
    fn nothing_after_close() {
        let mut out = outbox(100, 1000);
        assert_eq!(
            out.close(CloseCode::Application(2999), String::new()),
            Err(ErrorCode::InvalidCode)
        );
        assert_eq!(
            out.close(CloseCode::Normal, "x".repeat(MAX_CLOSE_REASON + 1)),
            Err(ErrorCode::ReasonTooLong)
        );
        assert_eq!(out.close(CloseCode::Normal, "bye".into()), Ok(()));
        assert_eq!(out.close, Some((1000, "bye".to_owned())));
        assert_eq!(out.send_text("late"), Err(ErrorCode::Closed));
        assert_eq!(
            out.close(CloseCode::Normal, String::new()),
            Err(ErrorCode::Closed)
        );
        // A connection that is closing refuses sends before any close call.
        let mut out = outbox(100, 1000);
        out.sync(0, true, None);
        assert_eq!(out.send_binary(b"x"), Err(ErrorCode::Closed));
    }
}
