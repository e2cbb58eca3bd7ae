//! Messages of one read, held for a single `on-messages` call.
//!
//! The protocol hands out one message at a time in its own reusable buffer;
//! for a plugin that takes batches, the small ones are copied here until the
//! read is used up (or the batch is full) and then delivered together. A
//! copy of a small message costs far less than a call into the instance.

use std::ops::Range;

use crate::runtime::batch_handler::Message;

/// Messages larger than this are not copied: one ends the batch and is
/// delivered, with what is held, straight from the protocol's buffer.
pub(super) const MESSAGE_MAX: usize = 16 * 1024;
/// A batch is delivered once it holds this many payload bytes...
const BYTES_MAX: usize = 64 * 1024;
/// ...or this many messages (each costs the plugin a few bytes of list).
const MESSAGES_MAX: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Inbox {
    /// Text payloads, back to back (so slices of it stay `str`).
    text: String,
    binary: Vec<u8>,
    order: Vec<(bool, Range<usize>)>,
}

impl Inbox {
    pub(super) fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Messages held.
    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    /// Holds a copy of `message` (at most [`MESSAGE_MAX`] bytes); `true`
    /// once the batch should be delivered.
    pub(super) fn push(&mut self, message: Message<'_>) -> bool {
        let entry = match message {
            Message::Text(text) => {
                let start = self.text.len();
                self.text.push_str(text);
                (false, start..self.text.len())
            }
            Message::Binary(data) => {
                let start = self.binary.len();
                self.binary.extend_from_slice(data);
                (true, start..self.binary.len())
            }
        };
        self.order.push(entry);
        self.text.len() + self.binary.len() >= BYTES_MAX || self.order.len() >= MESSAGES_MAX
    }

    /// The held messages in arrival order, then `last` (if any), ready to
    /// be lowered into the plugin.
    pub(super) fn messages<'a>(&'a self, last: Option<Message<'a>>) -> Vec<Message<'a>> {
        let mut out = Vec::with_capacity(self.order.len() + 1);
        out.extend(self.order.iter().map(|(binary, range)| {
            if *binary {
                Message::Binary(&self.binary[range.clone()])
            } else {
                Message::Text(&self.text[range.clone()])
            }
        }));
        out.extend(last);
        out
    }

    /// Empties the inbox, keeping its buffers unless a burst grew them.
    pub(super) fn clear(&mut self) {
        // Called after every message; most of the time nothing was held.
        if self.order.is_empty() {
            return;
        }
        self.order.clear();
        self.text.clear();
        self.binary.clear();
        if self.text.capacity() > BYTES_MAX + MESSAGE_MAX {
            self.text = String::new();
        }
        if self.binary.capacity() > BYTES_MAX + MESSAGE_MAX {
            self.binary = Vec::new();
        }
        if self.order.capacity() > MESSAGES_MAX {
            self.order = Vec::new();
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
    fn keeps_arrival_order_across_kinds() {
        let mut inbox = Inbox::default();
        assert!(inbox.is_empty());
        assert!(!inbox.push(Message::Text("héllo")));
        assert!(!inbox.push(Message::Binary(&[1, 2, 3])));
        assert!(!inbox.push(Message::Text("")));
        assert!(!inbox.push(Message::Binary(&[])));
        assert!(!inbox.push(Message::Text("✓")));
        let big = vec![9u8; MESSAGE_MAX + 1];
        assert_eq!(
            inbox.messages(Some(Message::Binary(&big))),
            [
                Message::Text("héllo"),
                Message::Binary(&[1, 2, 3]),
                Message::Text(""),
                Message::Binary(&[]),
                Message::Text("✓"),
                Message::Binary(&big),
            ]
        );
        inbox.clear();
        assert!(inbox.is_empty());
        assert_eq!(inbox.messages(None), []);
    }

    #[test]
    fn full_by_bytes_or_by_count() {
        let mut inbox = Inbox::default();
        let chunk = vec![0u8; MESSAGE_MAX];
        let pushes = (0..)
            .take_while(|_| !inbox.push(Message::Binary(&chunk)))
            .count();
        assert_eq!(pushes + 1, BYTES_MAX / MESSAGE_MAX);
        inbox.clear();
        let pushes = (0..)
            .take_while(|_| !inbox.push(Message::Text("x")))
            .count();
        assert_eq!(pushes + 1, MESSAGES_MAX);
    }
}
