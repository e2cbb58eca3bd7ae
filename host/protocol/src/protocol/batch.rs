//! Data frames encoded outside a connection's state machine and queued in
//! one go: the plugin host frames a handler's sends straight from the
//! handler's memory into a [`FrameBatch`], and hands the whole batch to
//! [`WebSocket::send_batch`](super::WebSocket::send_batch) after the call.
//! No per-message allocation, and one copy of each payload.
//!
//! A large send may skip even that copy: the host offers its frames to
//! the socket while the handler's memory is still readable
//! ([`FrameBatch::header_for`]) and queues here only what the socket did
//! not take ([`FrameBatch::push_rest`], from the first frame it cut short).

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
    /// The bytes begin with the rest of a frame that is partly written.
    begun: bool,
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

    /// The header of a `text` or binary message of `len` bytes, when it
    /// can be written ahead of the batch: the batch is empty (nothing
    /// framed before it goes after it) and the message is one frame. The
    /// caller writes the header and the payload and hands what was not
    /// written to [`push_rest`](Self::push_rest); it counts the message
    /// itself (the batch's tally does not).
    pub fn header_for(&self, text: bool, len: usize) -> Option<([u8; 10], usize)> {
        let one_frame = self.fragment_size.is_none_or(|size| len <= size.max(1));
        let opcode = if text { OpCode::Text } else { OpCode::Binary };
        (self.is_empty() && one_frame).then(|| coding::encode(true, opcode, len))
    }

    /// Queues the part of a frame from [`header_for`](Self::header_for)
    /// (`header`, then `payload`) that a write did not take: everything
    /// after its first `written` bytes.
    pub fn push_rest(&mut self, header: &[u8], payload: &[u8], written: usize) {
        self.begun |= self.is_empty() && written > 0;
        let in_header = written.min(header.len());
        let in_payload = (written - in_header).min(payload.len());
        self.bytes.extend_from_slice(&header[in_header..]);
        self.bytes.extend_from_slice(&payload[in_payload..]);
    }

    /// Encoded bytes in the batch (what it adds to the output queue).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing is queued in the batch.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The messages counted since the last [`take_tally`](Self::take_tally).
    pub fn messages(&self) -> u64 {
        self.text.messages + self.binary.messages
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

    /// Whether the bytes begin with the rest of a frame already partly
    /// written ([`push_rest`](Self::push_rest)); cleared, since the
    /// caller takes them.
    pub(crate) fn take_begun(&mut self) -> bool {
        std::mem::take(&mut self.begun)
    }

    /// Frees the buffer if nothing is queued: a connection gone idle keeps
    /// none (see `WebSocket::release_idle`). Returns the bytes freed.
    pub fn release_idle(&mut self) -> usize {
        if self.bytes.is_empty() && !self.begun {
            std::mem::take(&mut self.bytes).capacity()
        } else {
            0
        }
    }

    /// Drops the queued frames (and their counts).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.begun = false;
        self.take_tally();
    }
}

fn add(tally: &mut Tally, len: usize) {
    tally.messages += 1;
    tally.bytes += len as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_batch_frees_its_buffer_but_not_what_it_holds() {
        let mut batch = FrameBatch::new(None);
        batch.push_binary(&[1; 1000]);
        assert_eq!(batch.release_idle(), 0);
        assert_eq!(batch.len(), 1004);
        // Taken by the output queue, which leaves the room behind.
        let _ = batch.bytes_mut().split();
        batch.bytes_mut().reserve(2000);
        assert!(batch.release_idle() >= 2000);
        assert_eq!(batch.bytes_mut().capacity(), 0);
        batch.push_text("again");
        assert_eq!(batch.len(), 7);
    }

    /// A frame written in part and queued for the rest is, byte for byte,
    /// the frame the batch would have queued whole, wherever the write
    /// stopped.
    #[test]
    fn a_frame_written_in_part_is_the_frame_queued_whole() {
        for (text, len) in [
            (false, 0),
            (true, 5),
            (false, 125),
            (true, 126),
            (false, 70_000),
        ] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut whole = FrameBatch::new(None);
            if text {
                whole.push_text(std::str::from_utf8(&payload).unwrap());
            } else {
                whole.push_binary(&payload);
            }
            let whole = whole.bytes_mut().to_vec();
            let (header, used) = FrameBatch::new(None).header_for(text, len).unwrap();
            for written in [0, 1, used - 1, used, used + 1, whole.len() - 1, whole.len()] {
                let written = written.min(whole.len());
                let mut rest = FrameBatch::new(None);
                rest.push_rest(&header[..used], &payload, written);
                assert_eq!(
                    rest.bytes_mut()[..],
                    whole[written..],
                    "len {len}, written {written}"
                );
                assert_eq!(rest.take_tally(), (Tally::default(), Tally::default()));
            }
        }
    }

    /// Not ahead of frames already queued, nor for a message that is
    /// fragmented.
    #[test]
    fn no_header_behind_a_queued_frame_or_for_fragments() {
        let mut batch = FrameBatch::new(Some(1000));
        assert!(batch.header_for(false, 1000).is_some());
        assert!(batch.header_for(false, 1001).is_none());
        batch.push_binary(b"x");
        assert!(batch.header_for(false, 10).is_none());
    }
}
