//! Connections still in their handshake (TCP accepted, TLS, the HTTP
//! upgrade request, up to `on-open`): counted, capped, and given one
//! deadline for all of it.
//!
//! Each holds a file descriptor and a task before it has proved anything,
//! so a flood of sockets that never speak would otherwise take every
//! descriptor and `accept` would then fail for everyone. Past
//! `server.max_pending_handshakes` the *oldest* pending handshake is
//! dropped to make room (what nginx does with idle keep-alives): the
//! sockets that have been silent longest go first, and a client that
//! speaks promptly still gets its answer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::per_address::AddressPlace;
use crate::metrics::Metrics;

/// The handshakes in progress.
pub(crate) struct Pending {
    max: usize,
    /// By admission order: the first is the oldest.
    entries: Mutex<Entries>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Entries {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

/// One handshake's place: released when dropped (the connection opened,
/// or failed). Its token is cancelled if it is evicted.
pub(crate) struct Handshake {
    seq: u64,
    /// Cancelled when a newer handshake needs the place.
    pub evicted: CancellationToken,
    /// When the whole handshake must be done by: TLS, the request, the
    /// plugin's upgrade and the 101.
    pub deadline: Instant,
    /// Its place among its client address's connections (taken by the
    /// connection when it opens).
    pub address: Option<AddressPlace>,
    pending: Arc<Pending>,
}

impl Pending {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            entries: Mutex::default(),
            metrics,
        })
    }

    /// A newly accepted connection's place, evicting the oldest one if all
    /// are taken. `timeout` is the handshake's whole budget.
    pub fn admit(
        self: &Arc<Self>,
        timeout: std::time::Duration,
        address: Option<AddressPlace>,
    ) -> Handshake {
        let evicted = CancellationToken::new();
        let mut entries = self.lock();
        if entries.by_age.len() >= self.max
            && let Some((_, oldest)) = entries.by_age.pop_first()
        {
            oldest.cancel();
            self.metrics.handshake_failed(0, "evicted");
        }
        let seq = entries.next;
        entries.next += 1;
        entries.by_age.insert(seq, evicted.clone());
        self.metrics.handshakes_pending(entries.by_age.len());
        drop(entries);
        Handshake {
            seq,
            evicted,
            deadline: Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(far_future),
            address,
            pending: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A deadline no handshake reaches (for a configured timeout too large to
/// add to now).
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut entries = self.pending.lock();
        entries.by_age.remove(&self.seq);
        self.pending
            .metrics
            .handshakes_pending(entries.by_age.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_is_evicted_past_the_cap_and_places_come_back() {
        let metrics = Metrics::new();
        let pending = Pending::new(2, metrics.clone());
        let minute = std::time::Duration::from_secs(60);
        let first = pending.admit(minute, None);
        let second = pending.admit(minute, None);
        assert!(!first.evicted.is_cancelled());
        let third = pending.admit(minute, None);
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        assert!(metrics.render().contains("wharf_handshakes_pending 2"));
        drop(second);
        drop(third);
        assert!(metrics.render().contains("wharf_handshakes_pending 0"));
        // Dropping an evicted one frees nothing twice.
        drop(first);
        let fourth = pending.admit(minute, None);
        assert!(!fourth.evicted.is_cancelled());
        // A timeout that cannot be added to now does not panic.
        let far = pending.admit(std::time::Duration::MAX, None);
        assert!(far.deadline > Instant::now() + minute);
    }
}
