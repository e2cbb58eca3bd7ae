//! A rare event every connection waits for (shutdown, a swap), cheap to
//! wait for on every pass of a connection's loop.
//!
//! tokio's `Notify` (behind `CancellationToken` and `watch`) takes its
//! waiter list's lock on every poll of a registered waiter, and a fresh
//! `watch::Receiver::changed()` registers and unregisters on every pass:
//! about 600 instructions of a 32 B echo's 15.7k, for events that happen a
//! few times in a connection's life. A [`Watcher`] registers its task's
//! waker once; later polls are an atomic load and a `will_wake` check.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::IdMap;

/// The event's source: [`fire`](Self::fire) wakes every watcher.
#[derive(Default)]
pub struct Beacon {
    /// How many times it fired.
    fired: AtomicU64,
    /// Its source is gone: it will not fire again.
    closed: AtomicBool,
    wakers: Mutex<Wakers>,
}

impl std::fmt::Debug for Beacon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beacon")
            .field("fired", &self.fired.load(Ordering::Relaxed))
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Wakers {
    next: u64,
    by_id: IdMap<Waker>,
}

/// One task's wait for a [`Beacon`]: ready once for each time it fired
/// since the watcher was made (or last ready).
pub struct Watcher {
    beacon: Arc<Beacon>,
    seen: u64,
    /// Its place among the beacon's wakers, and the waker put there.
    registered: Option<(u64, Waker)>,
}

impl Beacon {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn fire(&self) {
        self.fired.fetch_add(1, Ordering::AcqRel);
        for waker in self.lock().by_id.values() {
            waker.wake_by_ref();
        }
    }

    /// Fires a last time: watchers then see [`Watcher::is_closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.fire();
    }

    /// A watcher that is ready at the next [`fire`](Self::fire).
    pub fn watch(self: &Arc<Self>) -> Watcher {
        Watcher {
            beacon: self.clone(),
            seen: self.fired.load(Ordering::Acquire),
            registered: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Wakers> {
        self.wakers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Watcher {
    /// Ready if the beacon fired since this last was.
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.take_fired() {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|(_, w)| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let mut wakers = self.beacon.lock();
        let id = match &self.registered {
            Some((id, _)) => *id,
            None => {
                wakers.next += 1;
                wakers.next
            }
        };
        wakers.by_id.insert(id, cx.waker().clone());
        drop(wakers);
        self.registered = Some((id, cx.waker().clone()));
        // A fire between the check above and the registration woke no one.
        if self.take_fired() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Whether the beacon's source is gone.
    pub fn is_closed(&self) -> bool {
        self.beacon.closed.load(Ordering::Acquire)
    }

    /// Whether the beacon fired since this last was ready (and marks it seen).
    pub fn take_fired(&mut self) -> bool {
        let now = self.beacon.fired.load(Ordering::Acquire);
        let fired = now != self.seen;
        self.seen = now;
        fired
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registered.take() {
            self.beacon.lock().by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_watcher_wakes_once_per_fire_and_drops_its_place() {
        let beacon = Beacon::new();
        let mut a = beacon.watch();
        let mut b = beacon.watch();
        let waiter = tokio::spawn(async move {
            std::future::poll_fn(|cx| a.poll_fired(cx)).await;
            a
        });
        tokio::task::yield_now().await;
        beacon.fire();
        let a = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .unwrap();
        // b was not waiting; it still sees the fire once.
        assert!(b.take_fired());
        assert!(!b.take_fired());
        assert_eq!(beacon.lock().by_id.len(), 1, "a's place");
        drop(a);
        assert!(beacon.lock().by_id.is_empty());
    }
}
