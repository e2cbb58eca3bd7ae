//! Messages of one read, held for a single batch call.
//!
//! The protocol hands out one message at a time in its own reusable buffer;
//! for a plugin that takes batches, the small ones are copied here until the
//! read is used up (or the batch is full) and then delivered together. A
//! copy of a small message costs far less than a call into the instance.

use crate::runtime::batch::{Batch, TooLarge};
use crate::runtime::batch_handler::Message;

/// Messages larger than this are not held: one ends the batch and is
/// delivered after it, straight from the protocol's buffer.
pub(super) const MESSAGE_MAX: usize = 16 * 1024;
/// A batch is delivered once it holds this many payload bytes...
const BYTES_MAX: usize = 64 * 1024;
/// ...or this many messages (each costs the plugin a few bytes of list).
const MESSAGES_MAX: usize = 1024;

#[derive(Clone, Debug, Default)]
pub(super) struct Inbox {
    batch: Batch,
}

impl Inbox {
    pub(super) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// Messages held.
    pub(super) fn len(&self) -> usize {
        self.batch.len()
    }

    /// Holds a copy of `message` (at most [`MESSAGE_MAX`] bytes, or the
    /// last of a batch).
    pub(super) fn push(&mut self, message: Message<'_>) -> Result<(), TooLarge> {
        self.batch.push(message)
    }

    /// Whether the batch should be delivered now.
    pub(super) fn is_full(&self) -> bool {
        self.batch.bytes() >= BYTES_MAX || self.batch.len() >= MESSAGES_MAX
    }

    /// The messages held, for one call.
    pub(super) fn batch(&self) -> &Batch {
        &self.batch
    }

    /// The only message held, if there is exactly one.
    pub(super) fn only(&self) -> Option<Message<'_>> {
        let mut messages = self.batch.iter();
        match (messages.next(), messages.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    /// Empties the inbox, keeping its buffers unless a burst grew them.
    pub(super) fn clear(&mut self) {
        // Called after every message; most of the time nothing was held.
        if self.batch.is_empty() {
            return;
        }
        self.batch.clear(BYTES_MAX + MESSAGE_MAX, MESSAGES_MAX);
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
    }

    #[test]
    fn only_one() {
        let mut inbox = Inbox::default();
        assert_eq!(inbox.only(), None);
        inbox.push(Message::Text("one")).unwrap();
        assert_eq!(inbox.only(), Some(Message::Text("one")));
        inbox.push(Message::Binary(b"two")).unwrap();
        assert_eq!(inbox.only(), None);
    }
}
