//! One budget for the bytes all connections hold for their peers (read
//! buffers, messages being assembled, send queues), `server.max_buffered`.
//!
//! Each connection is bounded on its own (a message, a frame, its send
//! queue), but ten thousand of them at their bounds are a terabyte. Past
//! the budget, a connection that holds more than [`FLOOR`] (128 KiB) stops reading
//! (the peer's TCP window closes: backpressure, not growth) until the sum
//! falls below the budget again; small exchanges, under the floor, go on.
//! A connection that waits longer than `server.buffered_wait` (it may be
//! halfway through a message it cannot finish while paused) is closed with
//! 1013 Try Again Later, which frees what it held; one whose peer leaves
//! meanwhile is seen to go within a [`RECHECK`] (it reads nothing, so it
//! asks the kernel at each of its timer's firings:
//! `connection::transport::Socket::peer_left`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::beacon::{Beacon, Watcher};
use crate::metrics::Metrics;

/// What a connection may hold and still read when the budget is spent:
/// its read buffer and a little more, so small messages are never held up.
pub(crate) const FLOOR: usize = 128 * 1024;

/// Changes smaller than this are not reported (one atomic update per
/// message would be a shared cache line written by every core); the sum is
/// off by at most this much per connection.
const GRAIN: usize = 16 * 1024;

pub(crate) struct Budget {
    /// 0: no budget.
    max: usize,
    used: AtomicUsize,
    /// Connections paused for the budget.
    waiting: AtomicUsize,
    /// Fired when a give-back leaves the budget unspent while some wait.
    freed: Arc<Beacon>,
    metrics: Arc<Metrics>,
}

/// A connection's part of the budget: what it last reported; given back
/// when dropped.
pub(crate) struct Held {
    budget: Arc<Budget>,
    reported: usize,
}

impl Budget {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Beacon::new(),
            metrics,
        })
    }

    /// Bytes held across all connections (to within [`GRAIN`] each).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn held(self: &Arc<Self>) -> Held {
        Held {
            budget: self.clone(),
            reported: 0,
        }
    }

    fn spent(&self) -> bool {
        self.max != 0 && self.used() > self.max
    }

    /// A connection stops reading until the budget is freed (see
    /// [`Paused::poll_freed`]); it counts among the waiting until dropped.
    pub fn pause(self: &Arc<Self>) -> Paused {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.metrics.buffered_waiting(true);
        Paused {
            since: Instant::now(),
            freed: self.freed.watch(),
            budget: self.clone(),
        }
    }
}

/// A connection paused for the budget.
pub(crate) struct Paused {
    pub since: Instant,
    freed: Watcher,
    budget: Arc<Budget>,
}

impl Paused {
    /// Ready when some connection gave bytes back with the budget no longer
    /// spent. One before the pause is not seen: the caller also re-checks
    /// every [`RECHECK`] (with its own timer, not one here, which every
    /// paused connection would carry).
    pub fn poll_freed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.freed.poll_fired(cx)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.budget.waiting.fetch_sub(1, Ordering::Relaxed);
        self.budget.metrics.buffered_waiting(false);
    }
}

/// How often a connection paused for the budget re-checks it, whether or
/// not it was told of a give-back.
pub(crate) const RECHECK: Duration = Duration::from_millis(100);

impl Held {
    /// The connection now holds `bytes`.
    pub fn set(&mut self, bytes: usize) {
        if bytes.abs_diff(self.reported) < GRAIN && (bytes != 0 || self.reported == 0) {
            return;
        }
        let budget = &self.budget;
        let used = if bytes > self.reported {
            let add = bytes - self.reported;
            budget.used.fetch_add(add, Ordering::Relaxed) + add
        } else {
            let sub = self.reported - bytes;
            let used = budget.used.fetch_sub(sub, Ordering::Relaxed) - sub;
            if budget.waiting.load(Ordering::Relaxed) > 0 && !budget.spent() {
                budget.freed.fire();
            }
            used
        };
        budget.metrics.buffered_bytes(used);
        self.reported = bytes;
    }

    /// Whether a connection holding `bytes` must stop reading.
    pub fn must_wait(&self, bytes: usize) -> bool {
        bytes > FLOOR && self.budget.spent()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.set(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_the_budget_only_large_holders_wait_and_drops_give_back() {
        let budget = Budget::new(1 << 20, Metrics::new());
        let mut a = budget.held();
        let mut b = budget.held();
        a.set(900 << 10);
        assert!(!a.must_wait(900 << 10), "under the budget");
        b.set(200 << 10);
        assert!(a.must_wait(900 << 10) && b.must_wait(200 << 10));
        assert!(!b.must_wait(FLOOR), "a small holder still reads");
        // Small changes are not reported; the sum stays within the grain.
        a.set((900 << 10) + 100);
        assert_eq!(budget.used(), 1100 << 10);
        drop(a);
        assert_eq!(budget.used(), 200 << 10);
        assert!(!b.must_wait(200 << 10));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_give_back_under_the_budget_wakes_the_paused() {
        let budget = Budget::new(1 << 20, Metrics::new());
        let mut a = budget.held();
        let mut b = budget.held();
        a.set(700 << 10);
        b.set(500 << 10);
        let mut paused = budget.pause();
        let (waker, woken) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(paused.poll_freed(&mut cx).is_pending());
        // Still spent: no wake-up.
        a.set(600 << 10);
        assert_eq!(woken.load(Ordering::Relaxed), 0);
        a.set(0);
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        assert!(paused.poll_freed(&mut cx).is_ready());
        assert_eq!(budget.waiting.load(Ordering::Relaxed), 1);
        drop(paused);
        assert_eq!(budget.waiting.load(Ordering::Relaxed), 0);
    }

    /// A waker that counts its wake-ups.
    fn counting_waker() -> (std::task::Waker, Arc<AtomicUsize>) {
        struct Count(Arc<AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let woken = Arc::new(AtomicUsize::new(0));
        (Arc::new(Count(woken.clone())).into(), woken)
    }

    #[test]
    fn no_budget_never_waits() {
        let budget = Budget::new(0, Metrics::new());
        let mut a = budget.held();
        a.set(usize::MAX / 2);
        assert!(!a.must_wait(usize::MAX / 2));
    }
}
