//! The messages of one call, packed: their payloads back to back in one
//! buffer, in arrival order, and one span word (kind and length) per
//! message.
//!
//! This is what `packed-words-handler` takes as it is, and `packed-handler`
//! with each word made a `span` record; for `batch-handler` the same batch
//! is cut into a `list<message>` that borrows from it. The connection
//! driver's batches borrow the protocol's buffer, where the messages were
//! read ([`BatchRef`]); [`Batch`] owns a copy.

use super::batch_handler::Message;
use super::bindings::wharf::websocket::packed::{Kind, Span};

/// One message of a batch: WIT's `packed.span-word`, its payload's length
/// in bits 0 to 30 and bit 31 set for a binary message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct SpanWord(u32);

impl SpanWord {
    const BINARY: u32 = 1 << 31;

    /// The word of `message`, if its length fits one.
    pub fn of(message: Message<'_>) -> Result<Self, TooLarge> {
        let len = u32::try_from(message.len())
            .ok()
            .filter(|&len| len < Self::BINARY)
            .ok_or(TooLarge)?;
        Ok(match message {
            Message::Text(_) => Self(len),
            Message::Binary(_) => Self(len | Self::BINARY),
        })
    }

    /// A word as a plugin passed it: every `u32` is one.
    pub fn from_wire(word: u32) -> Self {
        Self(word)
    }

    /// Its payload's length in bytes.
    pub fn payload_len(self) -> usize {
        (self.0 & !Self::BINARY) as usize
    }

    pub fn is_text(self) -> bool {
        self.0 & Self::BINARY == 0
    }

    /// The same message as `packed-handler`'s record.
    pub fn span(self) -> Span {
        Span {
            kind: if self.is_text() {
                Kind::Text
            } else {
                Kind::Binary
            },
            // Below 2^31.
            len: self.payload_len() as u32,
        }
    }

    /// The words as the `list<span-word>` they are lowered as.
    pub fn as_wire(words: &[Self]) -> &[u32] {
        // SAFETY: `SpanWord` is `repr(transparent)` over `u32`, so a slice
        // of one has the layout of a slice of the other.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u32>(), words.len()) }
    }
}

/// Messages of one call, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct BatchRef<'a> {
    payloads: &'a [u8],
    spans: &'a [SpanWord],
}

/// A batch is lowered into the plugin's 32-bit memory: a message of one is
/// under 2 GiB (a span word's length) and its payloads add up to less than
/// 4 GiB.
#[derive(Debug, thiserror::Error)]
#[error("a message of a batch is under 2 GiB, and all of them under 4 GiB")]
pub struct TooLarge;

/// A text span whose bytes are not UTF-8: the batch was put together
/// wrongly (the protocol validates every text message).
#[derive(Debug, thiserror::Error)]
#[error("text message {0} of a batch is not UTF-8")]
pub struct NotUtf8(pub usize);

impl<'a> BatchRef<'a> {
    /// The messages `spans` cuts `payloads` into. Their lengths must add
    /// up to `payloads`' and a text span's bytes must be UTF-8: what does
    /// not is cut off ([`messages`](Self::messages) says so).
    pub fn new(payloads: &'a [u8], spans: &'a [SpanWord]) -> Self {
        debug_assert_eq!(
            spans.iter().map(|s| s.payload_len()).sum::<usize>(),
            payloads.len()
        );
        Self { payloads, spans }
    }

    /// Messages in the batch.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Payload bytes in the batch.
    pub fn bytes(&self) -> usize {
        self.payloads.len()
    }

    /// The payloads, back to back, and the spans that cut them into
    /// messages: what `packed-words-handler` takes.
    pub fn packed(&self) -> (&'a [u8], &'a [SpanWord]) {
        (self.payloads, self.spans)
    }

    /// The batch cut where runs of two or more consecutive texts start and
    /// end, in order: each such run (`true`) and each stretch of messages
    /// between them (`false`). How a `text-batch-handler` gets it: a lone
    /// text between binaries stays with them, so that the cut adds no call
    /// where there is no run to gain from.
    pub fn runs(&self) -> impl Iterator<Item = (bool, BatchRef<'a>)> + use<'a> {
        let text = |s: &SpanWord| s.is_text();
        // Whether a run of texts starts at `spans[0]`.
        let run_at =
            move |spans: &[SpanWord]| spans.len() >= 2 && text(&spans[0]) && text(&spans[1]);
        let mut rest = *self;
        std::iter::from_fn(move || {
            if rest.spans.is_empty() {
                return None;
            }
            let texts = run_at(rest.spans);
            let count = if texts {
                rest.spans.iter().take_while(|s| text(s)).count()
            } else {
                (1..rest.spans.len())
                    .find(|&i| run_at(&rest.spans[i..]))
                    .unwrap_or(rest.spans.len())
            };
            let (spans, later) = rest.spans.split_at(count);
            let bytes = spans.iter().map(|s| s.payload_len()).sum::<usize>();
            let (payloads, after) = rest.payloads.split_at_checked(bytes)?;
            rest = BatchRef::new(after, later);
            Some((texts, BatchRef::new(payloads, spans)))
        })
    }

    /// A batch of texts as one string and each one's length in bytes: what
    /// `text-batch-handler` takes. The string is checked as UTF-8 once, a
    /// fast pass, rather than trusted unchecked. A text's span word is its
    /// length, so the lengths are the words as they are.
    pub fn texts(&self) -> Result<(&'a str, &'a [u32]), NotUtf8> {
        if let Some(index) = self.spans.iter().position(|s| !s.is_text()) {
            return Err(NotUtf8(index));
        }
        let texts = simdutf8::basic::from_utf8(self.payloads).map_err(|_| NotUtf8(0))?;
        Ok((texts, SpanWord::as_wire(self.spans)))
    }

    /// The messages, in order: what `batch-handler` takes (each text's
    /// UTF-8 checked again, a fast pass, rather than trusted unchecked).
    pub fn messages(&self) -> Result<Vec<Message<'a>>, NotUtf8> {
        let mut rest = self.payloads;
        let mut out = Vec::with_capacity(self.spans.len());
        for (index, span) in self.spans.iter().enumerate() {
            let (payload, after) = rest
                .split_at_checked(span.payload_len())
                .ok_or(NotUtf8(index))?;
            rest = after;
            out.push(if span.is_text() {
                Message::Text(simdutf8::basic::from_utf8(payload).map_err(|_| NotUtf8(index))?)
            } else {
                Message::Binary(payload)
            });
        }
        Ok(out)
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Batch {
        Batch {
            payloads: self.payloads.to_vec(),
            spans: self.spans.to_vec(),
        }
    }
}

/// Messages of one call, owned.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    payloads: Vec<u8>,
    spans: Vec<SpanWord>,
}

impl Batch {
    /// A batch of a copy of `message` alone.
    pub fn of_one(message: Message<'_>) -> Result<Self, TooLarge> {
        let mut one = Self::default();
        one.push(message)?;
        Ok(one)
    }

    /// Holds a copy of `message`, after the others; the batch is unchanged
    /// if that would make it too large.
    pub fn push(&mut self, message: Message<'_>) -> Result<(), TooLarge> {
        let span = SpanWord::of(message)?;
        let payload = message.bytes();
        u32::try_from(self.payloads.len() + payload.len()).map_err(|_| TooLarge)?;
        self.payloads.extend_from_slice(payload);
        self.spans.push(span);
        Ok(())
    }

    pub fn as_ref(&self) -> BatchRef<'_> {
        BatchRef::new(&self.payloads, &self.spans)
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
        let view = batch.as_ref();
        assert_eq!(view.messages().unwrap(), messages);
        assert_eq!(view.len(), messages.len());
        let (payloads, spans) = view.packed();
        assert_eq!(view.bytes(), payloads.len());
        assert_eq!(&payloads[..9], "héllo\u{1}\u{2}\u{3}".as_bytes());
        let lens: Vec<usize> = spans.iter().map(|s| s.payload_len()).collect();
        assert_eq!(lens, [6, 3, 0, 0, 3, 70_000]);
        assert_eq!(
            SpanWord::as_wire(spans),
            [6, 3 | 1 << 31, 0, 1 << 31, 3, 70_000 | 1 << 31]
        );
        assert!(matches!(spans[4].span().kind, Kind::Text));
        assert!(matches!(spans[5].span().kind, Kind::Binary));
        assert_eq!(spans[5].span().len, 70_000);
        assert_eq!(view.to_owned().as_ref().messages().unwrap(), messages);
    }

    #[test]
    fn runs_of_texts_are_cut_out_in_order() {
        let mut batch = Batch::default();
        let messages = [
            Message::Text("héllo"),
            Message::Text(""),
            Message::Text("✓"),
            Message::Binary(&[1, 2]),
            Message::Text("lone"),
            Message::Binary(&[]),
            Message::Text("z"),
            Message::Text("y"),
        ];
        for message in messages {
            batch.push(message).unwrap();
        }
        let runs: Vec<(bool, BatchRef<'_>)> = batch.as_ref().runs().collect();
        let shape: Vec<(bool, usize)> = runs.iter().map(|(t, r)| (*t, r.len())).collect();
        assert_eq!(shape, [(true, 3), (false, 3), (true, 2)]);
        assert_eq!(runs[0].1.texts().unwrap(), ("héllo✓", &[6, 0, 3][..]));
        assert_eq!(runs[1].1.messages().unwrap(), messages[3..6]);
        assert_eq!(runs[2].1.texts().unwrap(), ("zy", &[1, 1][..]));
        assert!(matches!(runs[1].1.texts(), Err(NotUtf8(0))));
        // No run of two texts: one stretch, as it came.
        let mut mixed = Batch::default();
        for message in [messages[4], messages[3], messages[4]] {
            mixed.push(message).unwrap();
        }
        let shape: Vec<(bool, usize)> = mixed.as_ref().runs().map(|(t, r)| (t, r.len())).collect();
        assert_eq!(shape, [(false, 3)]);
        assert_eq!(Batch::default().as_ref().runs().count(), 0);
    }

    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let spans = [
            SpanWord::of(Message::Binary(&[0xff])).unwrap(),
            SpanWord::from_wire(1),
        ];
        let batch = BatchRef::new(&[0xff, 0xff], &spans);
        assert!(matches!(batch.messages(), Err(NotUtf8(1))));
    }
}
