//! The host side of `wharf:websocket/connection`: the `connection` resource a
//! plugin sends through.
//!
//! A plugin's sends are not written from inside the call: they are queued in
//! the connection's [`Outbox`] and handed to the protocol state machine by the
//! driver once the call returns, so the host never re-enters an instance and a
//! plugin never touches a socket.

use std::collections::VecDeque;

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::wharf::websocket::connection::{Host, HostConnection};
use super::bindings::{CloseCode, ErrorCode};
use super::pubsub_host::Subscriptions;

/// RFC 6455 5.5: 125 bytes of control payload, 2 of them the code.
pub const MAX_CLOSE_REASON: usize = 123;

/// What a plugin asked to send, in order.
#[derive(Debug)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
    Close { code: u16, reason: String },
}

/// The limits the host checks a send against, fixed per connection.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    pub max_message_size: usize,
    pub send_queue: usize,
    /// The protocol's outgoing fragmentation, which the queue accounting
    /// must know to count frame headers as the protocol does.
    pub fragment_size: Option<usize>,
}

/// A plugin's queued sends for one connection.
#[derive(Debug)]
pub struct Outbox {
    limits: SendLimits,
    items: VecDeque<Outgoing>,
    /// Framed bytes queued (headers included, as the protocol counts them).
    queued_bytes: usize,
    /// Bytes the driver had not yet written when the current call began.
    backlog: usize,
    /// No more sends accepted: the plugin closed, or the connection is closing.
    closed: bool,
}

impl Outbox {
    fn check_send(&self, len: usize) -> Result<(), ErrorCode> {
        if self.closed {
            Err(ErrorCode::Closed)
        } else if len > self.limits.max_message_size {
            Err(ErrorCode::MessageTooBig)
        } else if self.backlog + self.queued_bytes >= self.limits.send_queue {
            // The same high-water rule the protocol applies to its output, so a
            // message accepted here is never refused when it is handed over.
            Err(ErrorCode::QueueFull)
        } else {
            Ok(())
        }
    }

    fn push(&mut self, item: Outgoing, len: usize) {
        self.queued_bytes += wharf_protocol::framed_len(len, self.limits.fragment_size);
        self.items.push_back(item);
    }

    /// Sets what the driver still has to write and whether the connection can
    /// still send; called before each call into the plugin.
    pub fn sync(&mut self, backlog: usize, closed: bool) {
        self.backlog = backlog;
        self.closed |= closed;
    }

    /// Takes the queued sends, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = Outgoing> + '_ {
        self.queued_bytes = 0;
        self.items.drain(..)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
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
}

impl ConnectionEntry {
    pub fn new(id: u64, limits: SendLimits, subscriptions: Subscriptions) -> Self {
        Self {
            id,
            subscriptions,
            attachment: Vec::new(),
            outbox: Outbox {
                limits,
                items: VecDeque::new(),
                queued_bytes: 0,
                backlog: 0,
                closed: false,
            },
        }
    }
}

impl ConnectionEntry {
    /// The host's id of the connection.
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// Maps a plugin's close code to its number, refusing what a plugin may not send.
pub fn close_code_number(code: CloseCode) -> Result<u16, ErrorCode> {
    Ok(match code {
        CloseCode::Normal => 1000,
        CloseCode::GoingAway => 1001,
        CloseCode::ProtocolError => 1002,
        CloseCode::UnsupportedData => 1003,
        CloseCode::InvalidPayload => 1007,
        CloseCode::PolicyViolation => 1008,
        CloseCode::MessageTooBig => 1009,
        CloseCode::InternalError => 1011,
        CloseCode::Application(n @ 3000..=4999) => n,
        CloseCode::Application(_) => return Err(ErrorCode::InvalidCode),
    })
}

impl HostConnection for HostState {
    fn id(&mut self, this: Resource<ConnectionEntry>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.id)
    }

    fn send_text(
        &mut self,
        this: Resource<ConnectionEntry>,
        text: String,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let outbox = &mut self.table.get_mut(&this)?.outbox;
        let len = text.len();
        Ok(outbox
            .check_send(len)
            .map(|()| outbox.push(Outgoing::Text(text), len)))
    }

    fn send_binary(
        &mut self,
        this: Resource<ConnectionEntry>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let outbox = &mut self.table.get_mut(&this)?.outbox;
        let len = data.len();
        Ok(outbox
            .check_send(len)
            .map(|()| outbox.push(Outgoing::Binary(data), len)))
    }

    fn close(
        &mut self,
        this: Resource<ConnectionEntry>,
        code: CloseCode,
        reason: String,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let outbox = &mut self.table.get_mut(&this)?.outbox;
        let result = (|| {
            if outbox.closed {
                return Err(ErrorCode::Closed);
            }
            let code = close_code_number(code)?;
            if reason.len() > MAX_CLOSE_REASON {
                return Err(ErrorCode::ReasonTooLong);
            }
            outbox.closed = true;
            outbox.push(Outgoing::Close { code, reason }, 0);
            Ok(())
        })();
        Ok(result)
    }

    fn drop(&mut self, _this: Resource<ConnectionEntry>) -> wasmtime::Result<()> {
        // Plugins only ever receive borrowed handles, so this is never a
        // plugin's to call; the host drops the entry with the store.
        Ok(())
    }
}

impl Host for HostState {}

impl super::bindings::wharf::websocket::types::Host for HostState {}
