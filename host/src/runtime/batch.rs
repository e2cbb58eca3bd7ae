//! The messages of one call, packed: their payloads back to back in one
//! buffer, in arrival order, and one span (kind, length) per message.
//!
//! This is what `packed-handler` takes as it is; for `batch-handler` the
//! same batch is cut into a `list<message>` that borrows from it.

use super::batch_handler::Message;
use super::bindings::wharf::websocket::packed::{Kind, Span};

/// Messages held for one call.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    payloads: Vec<u8>,
    /// Invariant: the lengths add up to `payloads.len()`, and a text span's
    /// bytes are a `&str` that [`Batch::push`] copied in.
    spans: Vec<Span>,
}

/// A batch is lowered into the plugin's 32-bit memory: its payloads add up
/// to less than 4 GiB.
#[derive(Debug, thiserror::Error)]
#[error("a batch holds less than 4 GiB")]
pub struct TooLarge;

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.payloads.len()
    }

    /// Holds a copy of `message`, after the others; the batch is unchanged
    /// if that would make it too large.
    pub fn push(&mut self, message: Message<'_>) -> Result<(), TooLarge> {
        let (kind, payload) = match message {
            Message::Text(text) => (Kind::Text, text.as_bytes()),
            Message::Binary(data) => (Kind::Binary, data),
        };
        let total = self.payloads.len() + payload.len();
        let len = u32::try_from(payload.len()).map_err(|_| TooLarge)?;
        u32::try_from(total).map_err(|_| TooLarge)?;
        self.payloads.extend_from_slice(payload);
        self.spans.push(Span { kind, len });
        Ok(())
    }

    /// The payloads, back to back, and the spans that cut them into
    /// messages: what `packed-handler` takes.
    pub fn packed(&self) -> (&[u8], &[Span]) {
        (&self.payloads, &self.spans)
    }

    /// The messages, in order, borrowed from the batch.
    pub fn iter(&self) -> impl Iterator<Item = Message<'_>> {
        let mut rest = self.payloads.as_slice();
        self.spans.iter().map(move |span| {
            let (payload, after) = rest.split_at(span.len as usize);
            rest = after;
            match span.kind {
                // SAFETY: a text span's bytes were copied in by `push` from
                // a `&str`, whole, and nothing else writes them.
                Kind::Text => Message::Text(unsafe { std::str::from_utf8_unchecked(payload) }),
                Kind::Binary => Message::Binary(payload),
            }
        })
    }

    /// The messages as a list: what `batch-handler` takes.
    pub fn messages(&self) -> Vec<Message<'_>> {
        self.iter().collect()
    }

    /// Empties the batch, keeping its buffers unless they hold more than
    /// `keep` bytes of payload or spans for more than `keep_spans`.
    pub fn clear(&mut self, keep: usize, keep_spans: usize) {
        self.payloads.clear();
        self.spans.clear();
        if self.payloads.capacity() > keep {
            self.payloads = Vec::new();
        }
        if self.spans.capacity() > keep_spans {
            self.spans = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_in_arrival_order_across_kinds() {
        let mut batch = Batch::default();
        let big = vec![9u8; 70_000];
        let messages = [
            Message::Text("héllo"),
            Message::Binary(&[1, 2, 3]),
            Message::Text(""),
            Message::Binary(&[]),
            Message::Text("✓"),
            Message::Binary(&big),
        ];
        for message in messages {
            batch.push(message).unwrap();
        }
        assert_eq!(batch.messages(), messages);
        assert_eq!(batch.len(), messages.len());
        let (payloads, spans) = batch.packed();
        assert_eq!(batch.bytes(), payloads.len());
        assert_eq!(
            &payloads[..9],
            "héllo"
                .as_bytes()
                .iter()
                .chain(&[1, 2, 3])
                .copied()
                .collect::<Vec<_>>()
        );
        let lens: Vec<u32> = spans.iter().map(|s| s.len).collect();
        assert_eq!(lens, [6, 3, 0, 0, 3, 70_000]);
        assert!(matches!(spans[4].kind, Kind::Text));
        assert!(matches!(spans[5].kind, Kind::Binary));
        batch.clear(1 << 20, 1024);
        assert!(batch.is_empty());
        assert_eq!(batch.bytes(), 0);
        assert_eq!(batch.messages(), []);
    }

    #[test]
    fn clear_gives_back_what_a_burst_grew() {
        let mut batch = Batch::default();
        batch.push(Message::Binary(&[0; 4096])).unwrap();
        batch.clear(1024, 1024);
        assert_eq!(batch.payloads.capacity(), 0);
        batch.push(Message::Binary(&[0; 512])).unwrap();
        batch.clear(1024, 1024);
        assert!(batch.payloads.capacity() >= 512);
    }
}
