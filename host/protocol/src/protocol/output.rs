//! The outgoing byte queue.
//!
//! Small frames and all headers are coalesced into one growing `BytesMut`
//! tail so a burst of small messages becomes one write; payloads of at
//! least [`OWN_CHUNK_MIN`] bytes get a chunk of their own, so they are
//! copied once (from the caller) and then handed to `writev` as they are,
//! rather than being copied again into a growing buffer.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

use super::frame::OpCode;
use super::frame::coding;

/// Payloads this big are queued as their own chunk instead of being
/// appended to the coalescing tail.
pub(crate) const OWN_CHUNK_MIN: usize = 16 * 1024;

/// Queued output in write order: `chunks` first, then `tail`.
#[derive(Debug, Default)]
pub(crate) struct Output {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    len: usize,
    /// Length of the Close frame queued last (nothing is queued after one),
    /// 0 if none.
    close_len: usize,
}

impl Output {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Room held for output, whether used or not.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.chunks.capacity() + self.tail.capacity()
    }

    /// Frees the buffers if nothing is queued (see
    /// [`WebSocket::release_idle`](super::WebSocket::release_idle));
    /// returns the bytes freed, at least (a buffer the writes consumed
    /// reports only the room after them).
    pub(crate) fn release_idle(&mut self) -> usize {
        if self.len != 0 {
            return 0;
        }
        let chunks = std::mem::take(&mut self.chunks).capacity() * std::mem::size_of::<Bytes>();
        chunks + std::mem::take(&mut self.tail).capacity()
    }

    /// Queues one complete server (unmasked) frame.
    pub(crate) fn push_frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) {
        self.push_header(fin, opcode, payload.len());
        if payload.len() >= OWN_CHUNK_MIN {
            self.seal_tail();
            self.chunks.push_back(Bytes::copy_from_slice(payload));
        } else {
            self.tail.extend_from_slice(payload);
        }
        self.len += payload.len();
    }

    /// Queues our Close frame, the last frame the connection sends.
    pub(crate) fn push_close(&mut self, payload: &[u8]) {
        let before = self.len;
        self.push_frame(true, OpCode::Close, payload);
        self.close_len = self.len - before;
    }

    /// Appends `frames` ahead of the queued Close frame, if none of it was
    /// written yet; `false` (and `frames` untouched) otherwise.
    pub(crate) fn append_before_close(&mut self, frames: &mut BytesMut) -> bool {
        let n = self.close_len;
        if n == 0 || self.len < n || self.tail.len() < n {
            return false;
        }
        let close = self.tail.split_off(self.tail.len() - n);
        self.len -= n;
        self.append(frames);
        self.tail.extend_from_slice(&close);
        self.len += n;
        true
    }

    /// Queues `frames` ahead of everything queued: they begin with the rest
    /// of a frame whose first bytes were written past the queue while it
    /// was empty, so nothing queued since has been written.
    pub(crate) fn prepend(&mut self, frames: &mut BytesMut) {
        if self.len == 0 {
            self.append(frames);
        } else if !frames.is_empty() {
            self.len += frames.len();
            self.chunks.push_front(frames.split().freeze());
        }
    }

    /// Queues bytes that already are one or more complete frames.
    pub(crate) fn push_encoded(&mut self, frames: Bytes) {
        self.len += frames.len();
        if frames.len() < OWN_CHUNK_MIN {
            self.tail.extend_from_slice(&frames);
        } else {
            self.seal_tail();
            self.chunks.push_back(frames);
        }
    }

    /// Queues bytes that are complete frames, taking them from `frames`
    /// (left empty). Into an empty queue the buffers are exchanged, so
    /// neither side copies or allocates; a large batch behind queued bytes
    /// becomes a chunk of its own; a small one is copied into the tail.
    pub(crate) fn append(&mut self, frames: &mut BytesMut) {
        let n = frames.len();
        if n == 0 {
            return;
        }
        self.len += n;
        if self.tail.is_empty() {
            std::mem::swap(&mut self.tail, frames);
            frames.clear();
        } else if n >= OWN_CHUNK_MIN {
            self.seal_tail();
            self.chunks.push_back(frames.split().freeze());
        } else {
            self.tail.extend_from_slice(frames);
            frames.clear();
        }
    }

    fn push_header(&mut self, fin: bool, opcode: OpCode, len: usize) {
        let (header, used) = coding::encode(fin, opcode, len);
        self.tail.extend_from_slice(&header[..used]);
        self.len += used;
    }

    /// Moves the tail into the chunk list so a chunk can follow it.
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
    }

    /// Fills `dst` with the queued bytes in order; returns slices filled.
    pub(crate) fn slices<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let tail = (!self.tail.is_empty()).then_some(&self.tail[..]);
        let mut n = 0;
        for (slot, src) in dst
            .iter_mut()
            .zip(self.chunks.iter().map(|c| &c[..]).chain(tail))
        {
            *slot = IoSlice::new(src);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front (clamped to what is queued),
    /// across chunk boundaries.
    pub(crate) fn advance(&mut self, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                return;
            }
        }
        let n = n.min(self.tail.len());
        self.tail.advance(n);
        if self.tail.is_empty() && self.tail.capacity() > 4 * OWN_CHUNK_MIN {
            // Don't let one burst pin a large buffer for the connection's life.
            self.tail = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flatten(o: &Output) -> Vec<u8> {
        let mut slots = vec![IoSlice::new(&[]); 64];
        let n = o.slices(&mut slots);
        slots[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn small_frames_coalesce_big_payloads_get_own_chunk() {
        let mut o = Output::default();
        o.push_frame(true, OpCode::Text, b"a");
        o.push_frame(true, OpCode::Text, b"b");
        assert_eq!(o.slices(&mut [IoSlice::new(&[]); 8]), 1);
        let big = vec![7u8; OWN_CHUNK_MIN];
        o.push_frame(true, OpCode::Binary, &big);
        o.push_frame(true, OpCode::Text, b"c");
        // [a-frame b-frame big-header] [big] [c-frame]
        let mut slots = [IoSlice::new(&[]); 8];
        assert_eq!(o.slices(&mut slots), 3);
        assert_eq!(o.len(), 3 + 3 + 4 + OWN_CHUNK_MIN + 3);
        // A short dst gets a prefix.
        assert_eq!(o.slices(&mut slots[..2]), 2);
    }

    #[test]
    fn partial_writes_across_chunks() {
        let mut o = Output::default();
        o.push_frame(true, OpCode::Text, b"hi");
        let big: Vec<u8> = (0..OWN_CHUNK_MIN + 10).map(|i| i as u8).collect();
        o.push_frame(true, OpCode::Binary, &big);
        o.push_frame(true, OpCode::Text, b"end");
        let all = flatten(&o);
        assert_eq!(all.len(), o.len());
        let mut got = Vec::new();
        let steps = [1usize, 3, 5, 7000, 9000, 1, 100, 1000, 50];
        let mut i = 0;
        while o.len() > 0 {
            let step = steps[i % steps.len()].min(o.len());
            got.extend_from_slice(&flatten(&o)[..step]);
            o.advance(step);
            i += 1;
            assert_eq!(flatten(&o).len(), o.len());
        }
        assert_eq!(got, all);
        o.advance(10); // over-advance is clamped, not a panic
        assert_eq!(o.len(), 0);
    }
}
