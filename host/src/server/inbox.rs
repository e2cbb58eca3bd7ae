//! Messages of one read, held for a single batch call.
//!
//! The protocol hands out one message at a time; for a plugin that takes
//! batches, the small ones are held where the protocol read them
//! ([`WebSocket::hold_message`](wharf_protocol::WebSocket::hold_message):
//! the next message is assembled after them) until the read is used up or
//! the batch is full, and then delivered together, straight from that
//! buffer. The inbox keeps what cuts the buffer into messages.

use crate::runtime::batch::{BatchRef, SpanWord, TooLarge};
use crate::runtime::batch_handler::Message;

/// Messages larger than this are not held back: one ends the batch.
pub(crate) const MESSAGE_MAX: usize = 16 * 1024;
/// A batch is delivered once it holds this many payload bytes...
const BYTES_MAX: usize = 64 * 1024;
/// ...or this many messages (each costs the plugin a few bytes of list).
const MESSAGES_MAX: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Inbox {
    spans: Vec<SpanWord>,
    bytes: usize,
}

impl Inbox {
    pub(super) fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Messages held.
    pub(super) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Counts `message` in, which the protocol holds after the others.
    pub(super) fn push(&mut self, message: Message<'_>) -> Result<(), TooLarge> {
        let span = SpanWord::of(message)?;
        self.bytes += message.len();
        self.spans.push(span);
        Ok(())
    }

    /// Whether the batch should be delivered now.
    pub(super) fn is_full(&self) -> bool {
        self.bytes >= BYTES_MAX || self.spans.len() >= MESSAGES_MAX
    }

    /// The messages held, in `held`: the protocol's held bytes.
    pub(super) fn batch<'a>(&'a self, held: &'a [u8]) -> BatchRef<'a> {
        BatchRef::new(held, &self.spans)
    }

    /// Empties the inbox, keeping its list unless a burst grew it.
    pub(super) fn clear(&mut self) {
        self.spans.clear();
        self.bytes = 0;
        if self.spans.capacity() > MESSAGES_MAX {
            self.spans = Vec::new();
        }
    }

    /// Gives its memory back (the connection is going idle).
    pub(super) fn release(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_by_bytes_or_by_count() {
        let mut inbox = Inbox::default();
        let chunk = vec![0u8; MESSAGE_MAX];
        let mut pushes = 0;
        while !inbox.is_full() {
            inbox.push(Message::Binary(&chunk)).unwrap();
            pushes += 1;
        }
        assert_eq!(pushes, BYTES_MAX / MESSAGE_MAX);
        inbox.clear();
        assert!(inbox.is_empty());
        let mut pushes = 0;
        while !inbox.is_full() {
            inbox.push(Message::Text("x")).unwrap();
            pushes += 1;
        }
        assert_eq!(pushes, MESSAGES_MAX);
        assert_eq!(inbox.batch(&[b'x'; MESSAGES_MAX]).len(), MESSAGES_MAX);
    }
}
