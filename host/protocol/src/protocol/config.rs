//! Per-connection limits and timers.

use std::time::Duration;

/// Limits and timers for one [`WebSocket`](super::WebSocket).
///
/// Every buffer the connection owns is bounded by one of these, so a peer
/// can't make the server hold more than roughly
/// `max_message_size + send_queue_bytes` per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest frame payload accepted; checked against the header before
    /// any payload is buffered (1009 on excess).
    pub max_frame_size: usize,
    /// Largest message accepted (sum of its frames, counting the announced
    /// length of the current one) and largest message we send.
    pub max_message_size: usize,
    /// When set, outgoing messages longer than this go out as several
    /// frames of at most this payload, so one big message doesn't delay
    /// interleaved control frames on intermediaries that buffer frames.
    pub fragment_size: Option<usize>,
    /// High-water mark for queued output: `send_*` refuse with
    /// [`SendError::QueueFull`](super::SendError::QueueFull) while this much
    /// is queued, which pushes back on a fast producer facing a slow reader.
    pub send_queue_bytes: usize,
    /// After this long with nothing received, send a Ping to find out
    /// whether the peer (and every NAT in between) is still there.
    pub ping_interval: Option<Duration>,
    /// After this long with nothing received, start closing with 1001.
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the peer's Close after we sent ours before
    /// giving up (1006).
    pub close_timeout: Duration,
    /// Deliver a binary message that came as one frame of at least this
    /// many bytes still masked
    /// ([`Event::MaskedBinary`](super::Event::MaskedBinary)), for a caller
    /// that copies such messages elsewhere anyway: it unmasks while
    /// copying, one pass over the payload instead of two. `None`: never.
    pub deliver_masked_from: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            fragment_size: None,
            send_queue_bytes: 4 << 20,
            ping_interval: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(120)),
            close_timeout: Duration::from_secs(5),
            deliver_masked_from: None,
        }
    }
}

/// Bytes a data message of `payload_len` takes in the output queue once
/// framed (headers included, fragmented per `fragment_size`): what a
/// [`FrameBatch`](super::FrameBatch) reserves before encoding one.
pub(crate) fn framed_len(payload_len: usize, fragment_size: Option<usize>) -> usize {
    fn header(len: usize) -> usize {
        match len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        }
    }
    match fragment_size {
        Some(size) if payload_len > size.max(1) => {
            let size = size.max(1);
            let (full, rest) = (payload_len / size, payload_len % size);
            let last = if rest > 0 { header(rest) } else { 0 };
            payload_len + full * header(size) + last
        }
        _ => payload_len + header(payload_len),
    }
}

#[cfg(test)]
mod framed_len_tests {
    use super::*;
    use crate::{FrameBatch, SendError, WebSocket};
    use std::time::Instant;

    /// The formula matches what the encoder really queues.
    #[test]
    fn framed_len_matches_the_output() {
        for fragment_size in [None, Some(1), Some(100), Some(70_000)] {
            for len in [0, 1, 125, 126, 300, 65_535, 65_536, 200_000] {
                let expected = framed_len(len, fragment_size);
                let mut ws = WebSocket::new(unbounded(fragment_size), Instant::now());
                ws.send_binary(&vec![7; len]).unwrap();
                assert_eq!(
                    ws.output_len(),
                    expected,
                    "len {len} fragment {fragment_size:?}"
                );
            }
        }
    }

    fn output_bytes(ws: &WebSocket) -> Vec<u8> {
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = ws.output_slices(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    /// A config whose send queue never refuses.
    fn unbounded(fragment_size: Option<usize>) -> Config {
        Config {
            fragment_size,
            send_queue_bytes: usize::MAX,
            ..Config::default()
        }
    }

    /// A binary and a text payload of `len` bytes.
    fn payloads(len: usize) -> (Vec<u8>, String) {
        let data = (0..len).map(|i| i as u8).collect();
        let text = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        (data, text)
    }

    /// A batch queues the bytes the same sends would, whatever is queued
    /// already, and counts what it carried.
    #[test]
    fn batch_matches_sends() {
        for fragment_size in [None, Some(7), Some(20_000)] {
            for len in [0, 5, 125, 126, 16 * 1024, 70_000] {
                for queued_before in [0, 3, 20_000] {
                    let config = unbounded(fragment_size);
                    let (data, text) = payloads(len);
                    let before = vec![9u8; queued_before];
                    let mut a = WebSocket::new(config.clone(), Instant::now());
                    let mut b = WebSocket::new(config, Instant::now());
                    if queued_before > 0 {
                        a.send_binary(&before).unwrap();
                        b.send_binary(&before).unwrap();
                    }
                    a.send_binary(&data).unwrap();
                    a.send_text(&text).unwrap();
                    let mut batch = FrameBatch::new(fragment_size);
                    batch.push_binary(&data);
                    batch.push_text(&text);
                    let (t, bin) = batch.take_tally();
                    assert_eq!((t.messages, t.bytes), (1, len as u64));
                    assert_eq!((bin.messages, bin.bytes), (1, len as u64));
                    b.send_batch(&mut batch).unwrap();
                    assert!(batch.is_empty());
                    let what =
                        format!("len {len} fragment {fragment_size:?} before {queued_before}");
                    assert_eq!(output_bytes(&a), output_bytes(&b), "{what}");
                    assert_eq!(a.output_len(), b.output_len(), "{what}");
                    // The batch is reusable after the exchange of buffers.
                    batch.push_text("again");
                    b.send_batch(&mut batch).unwrap();
                    a.send_text("again").unwrap();
                    assert_eq!(output_bytes(&a), output_bytes(&b), "{what}, reused");
                }
            }
        }
    }

    /// A batch is refused, and emptied, once the connection is closing.
    #[test]
    fn batch_refused_when_not_open() {
        let mut ws = WebSocket::new(Config::default(), Instant::now());
        ws.close(1000, "bye").unwrap();
        let queued = ws.output_len();
        let mut batch = FrameBatch::new(None);
        batch.push_text("late");
        assert_eq!(ws.send_batch(&mut batch), Err(SendError::Closed));
        assert!(batch.is_empty());
        assert_eq!(ws.output_len(), queued);
    }

    /// The rest of a frame written in part while the queue was empty goes
    /// ahead of what was queued since (a Pong, then a Close), even once the
    /// connection is closing; what follows it in the batch goes with it.
    #[test]
    fn begun_frame_finishes_ahead_of_the_queue() {
        for close in [false, true] {
            let mut ws = WebSocket::new(Config::default(), Instant::now());
            let data = vec![7u8; 20_000];
            let mut batch = FrameBatch::new(None);
            let (header, used) = batch.header_for(false, data.len()).unwrap();
            let written = used + 100;
            batch.push_rest(&header[..used], &data, written);
            batch.push_text("after");
            ws.send_ping(b"p").unwrap();
            if close {
                ws.close(1000, "bye").unwrap();
            }
            let queued = output_bytes(&ws);
            ws.send_batch_before_close(&mut batch).unwrap();
            assert!(batch.is_empty());
            let mut whole = FrameBatch::new(None);
            whole.push_binary(&data);
            whole.push_text("after");
            let mut want = whole.bytes_mut()[written..].to_vec();
            want.extend_from_slice(&queued);
            assert_eq!(output_bytes(&ws), want, "close {close}");
            assert_eq!(ws.output_len(), want.len());
            // A batch that did not begin so is queued behind, as before.
            let mut later = FrameBatch::new(None);
            later.push_text("x");
            assert_eq!(ws.send_batch(&mut later).is_ok(), !close);
        }
    }

    /// A framed message queues the same bytes as a borrowed send.
    #[test]
    fn framed_matches_send() {
        for len in [0, 125, 126, 20_000, 70_000] {
            let config = Config {
                send_queue_bytes: usize::MAX,
                ..Config::default()
            };
            let data = vec![3u8; len];
            let mut a = WebSocket::new(config.clone(), Instant::now());
            a.send_binary(&data).unwrap();
            a.send_text("héllo").unwrap();
            let mut b = WebSocket::new(config, Instant::now());
            b.send_framed(&crate::Framed::binary(&data)).unwrap();
            b.send_framed(&crate::Framed::text("héllo")).unwrap();
            assert_eq!(output_bytes(&a), output_bytes(&b), "len {len}");
            assert_eq!(a.output_len(), b.output_len());
        }
    }
}
