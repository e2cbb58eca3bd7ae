//! Data frames encoded outside a connection's state machine and queued in
//! one go: the plugin host frames a handler's sends straight from the
//! handler's memory into a [`FrameBatch`], and hands the whole batch to
//! [`WebSocket::send_batch`](super::WebSocket::send_batch) after the call.
//! No per-message allocation, and one copy of each payload.

use bytes::BytesMut;

use super::config::framed_len;
use super::fragments;
use super::frame::{OpCode, coding};

/// Messages and payload bytes of one kind in a batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Complete messages.
    pub messages: u64,
    /// Their payload bytes (frame headers not included).
    pub bytes: u64,
}

/// Complete server data frames, in order, fragmented as the connection's
/// `fragment_size` says.
#[derive(Debug, Default)]
pub struct FrameBatch {
    bytes: BytesMut,
    fragment_size: Option<usize>,
    text: Tally,
    binary: Tally,
}

impl FrameBatch {
    /// An empty batch for a connection with this `fragment_size`.
    pub fn new(fragment_size: Option<usize>) -> Self {
        Self {
            fragment_size,
            ..Self::default()
        }
    }

    /// Frames a text message.
    pub fn push_text(&mut self, text: &str) {
        self.push(OpCode::Text, text.as_bytes());
        add(&mut self.text, text.len());
    }

    /// Frames a binary message.
    pub fn push_binary(&mut self, data: &[u8]) {
        self.push(OpCode::Binary, data);
        add(&mut self.binary, data.len());
    }

    fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        self.bytes
            .reserve(framed_len(payload.len(), self.fragment_size));
        for (fin, op, range) in fragments(opcode, payload.len(), self.fragment_size) {
            let (header, used) = coding::encode(fin, op, range.len());
            self.bytes.extend_from_slice(&header[..used]);
            self.bytes.extend_from_slice(&payload[range]);
        }
    }

    /// Encoded bytes in the batch (what it adds to the output queue).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is queued in the batch.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The text and binary messages in the batch, counted since the last
    /// call (the counts are reset).
    pub fn take_tally(&mut self) -> (Tally, Tally) {
        (
            std::mem::take(&mut self.text),
            std::mem::take(&mut self.binary),
        )
    }

    /// The encoded bytes, for the output queue to take.
    pub(crate) fn bytes_mut(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }

    /// Drops the queued frames (and their counts).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.take_tally();
    }
}

fn add(tally: &mut Tally, len: usize) {
    tally.messages += 1;
    tally.bytes += len as u64;
}
