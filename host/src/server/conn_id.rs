//! Connection ids: unique on the server, and opaque. Plugins see them (and
//! so do other tenants' plugins, in their own connections' ids), so a
//! counter would tell every tenant how busy the server is; a keyed
//! permutation of the counter is as unique and says nothing.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

/// Feistel rounds: four make a keyed pseudo-random permutation.
const ROUNDS: u32 = 4;

pub struct ConnIds {
    next: AtomicU64,
    /// Keyed per process (SipHash with random keys).
    key: RandomState,
}

impl ConnIds {
    pub fn new() -> Self {
        Self {
            next: AtomicU64::new(1),
            key: RandomState::new(),
        }
    }

    pub fn next(&self) -> u64 {
        self.permute(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// A bijection on u64 (a Feistel network over its halves), so distinct
    /// counters give distinct ids.
    fn permute(&self, n: u64) -> u64 {
        let (mut left, mut right) = ((n >> 32) as u32, n as u32);
        for round in 0..ROUNDS {
            let f = self.key.hash_one((round, right)) as u32;
            (left, right) = (right, left ^ f);
        }
        (u64::from(left) << 32) | u64::from(right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_and_not_sequential() {
        let ids = ConnIds::new();
        let taken: Vec<u64> = (0..100_000).map(|_| ids.next()).collect();
        let mut sorted = taken.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), taken.len());
        let steps = taken.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(steps < 10, "{steps} sequential pairs");
        // Another server (another key) numbers differently.
        assert_ne!(ConnIds::new().next(), ConnIds::new().next());
    }
}
