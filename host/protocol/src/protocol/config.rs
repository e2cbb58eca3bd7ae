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
        }
    }
}
