//! Per-connection message and byte rates: token buckets holding one
//! second's worth, refilled continuously.

use std::time::Instant;

/// A tenant's per-connection rates; `0` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub messages_per_second: u32,
    pub bytes_per_second: u64,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        self.messages_per_second == 0 && self.bytes_per_second == 0
    }
}

/// One connection's buckets.
#[derive(Debug, Clone)]
pub struct Bucket {
    limit: RateLimit,
    messages: f64,
    bytes: f64,
    last: Instant,
}

impl Bucket {
    /// Full buckets: a connection may start with a one-second burst.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            messages: f64::from(limit.messages_per_second),
            bytes: limit.bytes_per_second as f64,
            last: now,
        }
    }

    /// Takes one message of `len` bytes; `false` if either rate is exceeded.
    pub fn admit(&mut self, now: Instant, len: usize) -> bool {
        if self.limit.is_unlimited() {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let refill = |level: f64, rate: f64| (level + elapsed * rate).min(rate);
        let (mps, bps) = (
            f64::from(self.limit.messages_per_second),
            self.limit.bytes_per_second as f64,
        );
        let mut ok = true;
        if mps > 0.0 {
            self.messages = refill(self.messages, mps) - 1.0;
            ok &= self.messages >= 0.0;
        }
        if bps > 0.0 {
            self.bytes = refill(self.bytes, bps) - len as f64;
            ok &= self.bytes >= 0.0;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            RateLimit {
                messages_per_second: 10,
                bytes_per_second: 0,
            },
            t0,
        );
        assert!((0..10).all(|_| b.admit(t0, 1)), "a second's burst");
        assert!(!b.admit(t0, 1));
        let mut b = Bucket::new(b.limit, t0);
        for i in 1..=100 {
            assert!(b.admit(t0 + Duration::from_millis(100 * i), 1), "{i}");
        }
    }

    #[test]
    fn bytes() {
        let t0 = Instant::now();
        let limit = RateLimit {
            messages_per_second: 0,
            bytes_per_second: 1000,
        };
        let mut b = Bucket::new(limit, t0);
        assert!(b.admit(t0, 600));
        assert!(!b.admit(t0, 600));
        assert!(Bucket::new(RateLimit::default(), t0).admit(t0, usize::MAX));
    }
}
