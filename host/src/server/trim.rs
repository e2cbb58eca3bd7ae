//! Hands the heap memory freed by idle connections back to the OS.
//!
//! A hibernating connection frees its instance's host-side state (store,
//! tables, buffers: tens of KiB), and one that settles frees the buffers a
//! larger message grew, but glibc's allocator keeps freed pages in the
//! middle of its arenas resident until something reuses them, so an idle
//! server would not shrink. `malloc_trim(0)` releases every free page; it
//! walks the arenas, so it runs at most once per interval, on a blocking
//! thread, and only after such releases happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// What a hibernation frees of the heap, counted rather than measured: the
/// instance's host-side state (wasmtime's store and instances, about 9 KiB
/// by massif).
pub(crate) const HIBERNATED: usize = 8 << 10;

/// Bytes freed since the last pass before the next: a walk of every arena
/// to give back less is not worth the pause it makes. (Small releases count
/// too: many of them free whole pages together.)
const MIN_TRIM: u64 = 256 << 10;

/// A pass holds each arena's lock while it walks it, so allocations wait:
/// the next pass comes no sooner than this many times as long as the last
/// one took, so the trimmer takes at most 1% of the time. (Measured: 0.1
/// to 12 ms a pass with 10,000 connections idle.)
const PACE: u32 = 100;

/// Bytes freed by idle connections (hibernations, and the buffers of
/// settled ones); the trimmer acts when it grew enough.
#[derive(Debug, Default)]
pub(crate) struct Released(AtomicU64);

impl Released {
    pub fn add(&self, bytes: usize) {
        if bytes > 0 {
            self.0.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// Runs until `shutdown`: every `interval` (or longer, see [`PACE`]), trims
/// if at least [`MIN_TRIM`] was released since the last pass.
pub(crate) async fn run(released: Arc<Released>, interval: Duration, shutdown: CancellationToken) {
    let mut seen = 0;
    let mut wait = interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let now = released.0.load(Ordering::Relaxed);
        if now.saturating_sub(seen) >= MIN_TRIM {
            seen = now;
            let took = tokio::task::spawn_blocking(trim).await.unwrap_or_default();
            tracing::debug!(?took, "heap trimmed");
            wait = next_wait(interval, took);
        }
    }
}

fn next_wait(interval: Duration, took: Duration) -> Duration {
    interval.max(took.saturating_mul(PACE))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> Duration {
    let started = Instant::now();
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks
    // each arena); 0 keeps no padding at the top of the heap.
    unsafe {
        libc::malloc_trim(0);
    }
    started.elapsed()
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_pass_puts_off_the_next() {
        let second = Duration::from_secs(1);
        assert_eq!(next_wait(second, Duration::from_millis(2)), second);
        assert_eq!(next_wait(second, Duration::from_millis(30)), 3 * second);
    }
}
