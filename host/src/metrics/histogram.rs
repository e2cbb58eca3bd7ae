//! `wharf_plugin_call_seconds`: a histogram of call durations whose buckets
//! are fixed powers of two, so an observation finds its bucket with one
//! `leading_zeros` and connections can gather observations locally (see
//! [`super::Tally`]) and add them in bulk. `prometheus_client`'s own
//! `Histogram` takes a write lock and scans its buckets per observation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::histogram::exponential_buckets;

/// Upper bound of the lowest bucket, in nanoseconds (1 µs).
const FIRST_BUCKET_NS: u64 = 1_000;
/// Finite buckets, 1 µs × 2ⁿ for n = 0..23 (to ~8.4 s); one more is `+Inf`.
pub(crate) const FINITE_BUCKETS: usize = 24;
/// Every bucket, `+Inf` included.
pub(crate) const BUCKETS: usize = FINITE_BUCKETS + 1;

/// The bucket a call of `d` falls in: the first whose upper bound is ≥ `d`.
pub(crate) fn bucket_of(d: Duration) -> usize {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    // Whole microseconds, rounded up: bucket n holds (2ⁿ⁻¹, 2ⁿ] µs.
    let us = ns.div_ceil(FIRST_BUCKET_NS);
    let n = if us <= 1 {
        0
    } else {
        (u64::BITS - (us - 1).leading_zeros()) as usize
    };
    n.min(FINITE_BUCKETS)
}

/// Observations gathered away from the shared histogram.
#[derive(Debug, Clone, Default)]
pub(crate) struct LocalCalls {
    buckets: [u32; BUCKETS],
    /// Bit n set: bucket n is not zero (most flushes touch one or two).
    touched: u32,
    count: u32,
    sum_ns: u64,
}

impl LocalCalls {
    pub(crate) fn observe(&mut self, d: Duration) {
        let n = bucket_of(d);
        self.buckets[n] = self.buckets[n].saturating_add(1);
        self.touched |= 1 << n;
        self.count = self.count.saturating_add(1);
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }
}

#[derive(Debug, Default)]
struct Inner {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// The shared histogram; clones share the counts (one goes to the registry).
#[derive(Debug, Clone, Default)]
pub(crate) struct CallHistogram {
    inner: Arc<Inner>,
}

impl CallHistogram {
    pub(crate) fn observe(&self, d: Duration) {
        let mut one = LocalCalls::default();
        one.observe(d);
        self.take_from(&mut one);
    }

    /// Adds what a connection gathered (one atomic add per bucket it
    /// touched) and empties it.
    pub(crate) fn take_from(&self, local: &mut LocalCalls) {
        if local.count == 0 {
            return;
        }
        let inner = &*self.inner;
        let mut touched = std::mem::take(&mut local.touched);
        while touched != 0 {
            let n = touched.trailing_zeros() as usize;
            touched &= touched - 1;
            let count = std::mem::take(&mut local.buckets[n]);
            inner.buckets[n].fetch_add(u64::from(count), Ordering::Relaxed);
        }
        inner.count.fetch_add(
            u64::from(std::mem::take(&mut local.count)),
            Ordering::Relaxed,
        );
        inner
            .sum_ns
            .fetch_add(std::mem::take(&mut local.sum_ns), Ordering::Relaxed);
    }
}

impl EncodeMetric for CallHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        // The same bounds `prometheus_client` would print for these buckets;
        // f64::MAX is how it marks `+Inf`.
        let bounds = exponential_buckets(FIRST_BUCKET_NS as f64 / 1e9, 2.0, FINITE_BUCKETS as u16)
            .chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&inner.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        // Readers may see a bucket added before the count; the exposition
        // takes the count from the buckets so the two always agree.
        let count = buckets.iter().map(|&(_, n)| n).sum();
        let sum = inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_inclusive_powers_of_two_microseconds() {
        let us = Duration::from_micros;
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1)), 0);
        assert_eq!(bucket_of(us(1)), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1_001)), 1);
        assert_eq!(bucket_of(us(2)), 1);
        assert_eq!(bucket_of(Duration::from_nanos(2_001)), 2);
        assert_eq!(bucket_of(us(4)), 2);
        assert_eq!(bucket_of(us(5)), 3);
        assert_eq!(bucket_of(us(1 << 23)), 23);
        assert_eq!(bucket_of(us((1 << 23) + 1)), FINITE_BUCKETS);
        assert_eq!(bucket_of(Duration::MAX), FINITE_BUCKETS);
    }
}
