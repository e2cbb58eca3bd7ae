//! A tenant's share of the machine's CPU across all its connections: a
//! token bucket of CPU time, refilled at `cores` seconds per second and
//! holding 1/`BURST_PER_SECOND` of a second's worth (short, so that a
//! spinning tenant is held to its share within a fraction of a second).
//! The time its plugin calls run is taken from it at every epoch tick;
//! while it is empty, running calls sleep at their next tick instead of
//! yielding, the tenant's next events wait for it to
//! refill and its new upgrades get 503, so a tenant whose plugins spin (or
//! that reconnects each time it is cut) cannot take the cores from the
//! others. A tenant that went over its share within the last
//! [`PENALTY`] is *penalized*: its message calls run on the
//! [idle pool](super::idle_pool), off the workers everyone else needs.
//! A tenant one of whose calls ran long within the last [`PENALTY`] (past
//! [`LONG_TENANT`](super::idle_pool::LONG_TENANT)) *runs long*: its message
//! calls start on the long lane instead of first running that long on a
//! worker, which a tenant whose every call spins (and reconnects when it is
//! cut) would otherwise do every time.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How much unused share a tenant may save up: 1/50 of a second of it
/// (short, so that a call that spins is penalized within milliseconds).
const BURST_PER_SECOND: i64 = 50;

/// Longest a single event waits for its tenant's bucket: past it the
/// event runs anyway (the wait is a brake, never a hang).
const MAX_WAIT: Duration = Duration::from_secs(1);

/// How long a tenant stays penalized after it last went over its share:
/// long enough that a tenant spinning in slices (over, throttled, under,
/// over again) stays off the workers throughout.
pub const PENALTY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct CpuShare {
    /// Microseconds of CPU per second of wall time; 0: unlimited.
    rate: i64,
    /// The bucket's size: [`BURST_PER_SECOND`] of `rate`.
    capacity: i64,
    /// Microseconds left (negative: owed).
    level: AtomicI64,
    /// When `level` was last refilled, in microseconds since `start`.
    refilled: AtomicU64,
    /// Until when the tenant is penalized, in microseconds since `start`.
    penalized_until: AtomicU64,
    /// Until when the tenant runs long, in microseconds since `start`.
    long_until: AtomicU64,
    start: Instant,
}

impl CpuShare {
    /// `cores`: CPU seconds per second the tenant may use; 0: unlimited.
    pub fn new(cores: f64) -> Self {
        let rate = (cores * 1e6) as i64;
        let capacity = rate / BURST_PER_SECOND;
        Self {
            rate,
            capacity,
            level: AtomicI64::new(capacity),
            refilled: AtomicU64::new(0),
            penalized_until: AtomicU64::new(0),
            long_until: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    pub fn is_limited(&self) -> bool {
        self.rate > 0
    }

    /// Takes what a call used.
    pub fn charge(&self, used: Duration) {
        if self.is_limited() {
            let used = i64::try_from(used.as_micros()).unwrap_or(i64::MAX);
            let before = self.level.fetch_sub(used, Ordering::Relaxed);
            if before.saturating_sub(used) < 0 {
                self.mark(&self.penalized_until);
            }
        }
    }

    /// Whether the tenant went over its share within the last [`PENALTY`].
    pub fn penalized(&self) -> bool {
        self.marked(&self.penalized_until)
    }

    /// One of the tenant's calls has run long.
    pub fn ran_long(&self) {
        self.mark(&self.long_until);
    }

    /// Whether one of the tenant's calls ran long within the last
    /// [`PENALTY`]: its calls should start on the long lane.
    pub fn runs_long(&self) -> bool {
        self.marked(&self.long_until)
    }

    /// Sets `until` to [`PENALTY`] from now (never earlier than it was).
    fn mark(&self, until: &AtomicU64) {
        let end = self.now().saturating_add(PENALTY.as_micros() as u64);
        until.fetch_max(end, Ordering::Relaxed);
    }

    /// Whether a limited tenant's `until` is still ahead.
    fn marked(&self, until: &AtomicU64) -> bool {
        self.is_limited() && self.now() < until.load(Ordering::Relaxed)
    }

    /// Microseconds since `start`.
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The bucket's level now (µs), after adding what the time since the
    /// last refill earned.
    fn refill(&self) -> i64 {
        let now = self.now();
        let last = self.refilled.load(Ordering::Relaxed);
        let earned =
            i64::try_from((now.saturating_sub(last) as u128 * self.rate as u128) / 1_000_000)
                .unwrap_or(i64::MAX);
        if earned > 0
            && self
                .refilled
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let capacity = self.capacity;
            let _ = self
                .level
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                    Some(l.saturating_add(earned).min(capacity))
                });
        }
        self.level.load(Ordering::Relaxed)
    }

    /// Whether the tenant has used up its share for now.
    pub fn exhausted(&self) -> bool {
        self.is_limited() && self.refill() < 0
    }

    /// How long an event should wait before it runs: until the bucket is
    /// no longer in debt (at most `MAX_WAIT`); zero when it is not.
    pub fn wait(&self) -> Duration {
        if !self.is_limited() {
            return Duration::ZERO;
        }
        let level = self.refill();
        if level >= 0 {
            return Duration::ZERO;
        }
        let micros = (-level as u128 * 1_000_000) / self.rate as u128;
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX)).min(MAX_WAIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debt_makes_events_wait_and_time_repays_it() {
        let share = CpuShare::new(0.5);
        assert!(!share.exhausted());
        assert!(!share.penalized());
        assert_eq!(share.wait(), Duration::ZERO);
        // 10 ms is the burst; 135 ms leaves 125 ms owed, 250 ms to repay.
        share.charge(Duration::from_millis(135));
        assert!(share.exhausted());
        assert!(share.penalized());
        let wait = share.wait();
        assert!(
            wait > Duration::from_millis(200) && wait <= Duration::from_millis(250),
            "{wait:?}"
        );
        std::thread::sleep(Duration::from_millis(600));
        assert!(!share.exhausted());
        // Repaid, but still within the penalty.
        assert!(share.penalized());
        assert!(!share.runs_long());
        share.ran_long();
        assert!(share.runs_long());
        let unlimited = CpuShare::new(0.0);
        unlimited.charge(Duration::from_secs(100));
        assert!(!unlimited.exhausted());
        assert!(!unlimited.penalized());
        unlimited.ran_long();
        assert!(!unlimited.runs_long());
        assert_eq!(unlimited.wait(), Duration::ZERO);
    }
}
