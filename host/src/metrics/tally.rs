//! Per-connection counts, added to the shared [`Metrics`](super::Metrics)
//! once per batch of work instead of once per message.
//!
//! Every shared counter update is a locked instruction, and one right after
//! a payload copy waits for that copy's stores to drain: per message, the
//! half-dozen of them cost more than the framing. A connection counts here
//! with plain integers and [`Metrics::absorb`](super::Metrics::absorb)s the
//! tally after each read's events.

use std::time::Duration;

use super::histogram::LocalCalls;

/// Counts a connection gathered since its last flush.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub(super) received: [u64; 2],
    pub(super) received_bytes: u64,
    pub(super) sent: [u64; 2],
    pub(super) sent_bytes: u64,
    pub(super) calls: LocalCalls,
    pub(super) dirty: bool,
}

impl Tally {
    /// A complete message (`bytes` of payload) was received from the client.
    pub fn message_received(&mut self, binary: bool, bytes: usize) {
        self.received[usize::from(binary)] += 1;
        self.received_bytes += bytes as u64;
        self.dirty = true;
    }

    /// `messages` complete messages (`bytes` of payload in all) were queued.
    pub fn messages_sent(&mut self, binary: bool, messages: u64, bytes: u64) {
        self.sent[usize::from(binary)] += messages;
        self.sent_bytes += bytes;
        self.dirty |= messages > 0;
    }

    /// One call into the connection's plugin instance took `d`.
    pub fn plugin_call(&mut self, d: Duration) {
        self.calls.observe(d);
        self.dirty = true;
    }

    /// Whether anything was counted since the last flush.
    pub fn is_empty(&self) -> bool {
        !self.dirty
    }
}
