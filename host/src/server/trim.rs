//! Hands the heap memory freed by idle connections back to the OS.
//!
//! A hibernating connection frees its instance's host-side state (store,
//! tables, buffers: tens of KiB), and one that settles frees the buffers a
//! larger message grew, but an allocator keeps freed pages resident until
//! something reuses them: jemalloc (the `wharf` binary's) returns them only
//! from an allocation in the same arena, ten seconds after they were freed,
//! and glibc's malloc (which C code such as aws-lc uses either way) only
//! from the top of each arena. So an idle server would not shrink. A pass
//! purges every jemalloc arena and runs `malloc_trim(0)`; it walks the
//! arenas, so it runs at most once per interval, on a blocking thread, and
//! only after such releases happened.

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
/// if a pass is [`due`].
pub(crate) async fn run(released: Arc<Released>, interval: Duration, shutdown: CancellationToken) {
    let mut seen = 0;
    let mut last = 0;
    let mut wait = interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let now = released.0.load(Ordering::Relaxed);
        let pass = due(now.saturating_sub(seen), now.saturating_sub(last));
        last = now;
        if pass {
            seen = now;
            let took = tokio::task::spawn_blocking(trim).await.unwrap_or_default();
            tracing::debug!(?took, "heap trimmed");
            wait = next_wait(interval, took);
        }
    }
}

/// Whether a pass is due, from the bytes released since the last pass and
/// since the last look: at least [`MIN_TRIM`], or any once releases have
/// stopped. Without the second, the tail of a burst of hibernations (the
/// last second's, under [`MIN_TRIM`]) stayed resident until the next burst:
/// 10,000 hibernated connections measured 4.9 KiB each where the pass after
/// them makes it 3.5–3.9.
fn due(since_pass: u64, since_look: u64) -> bool {
    since_pass >= MIN_TRIM || (since_pass > 0 && since_look == 0)
}

fn next_wait(interval: Duration, took: Duration) -> Duration {
    interval.max(took.saturating_mul(PACE))
}

fn trim() -> Duration {
    let started = Instant::now();
    purge_jemalloc();
    trim_glibc();
    started.elapsed()
}

#[cfg(unix)]
fn purge_jemalloc() {
    // Arena 4096 is `MALLCTL_ARENAS_ALL`: every arena's unused pages, dirty
    // and muzzy, given back now. Where jemalloc is not the global allocator
    // (the library's tests), its arenas are empty and this costs nothing.
    let all = c"arena.4096.purge";
    // SAFETY: a `purge` takes and returns no value, so every pointer is
    // null and the length 0; the name is NUL-terminated. mallctl is
    // thread-safe.
    let failed = unsafe {
        tikv_jemalloc_sys::mallctl(
            all.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if failed != 0 {
        tracing::warn!(errno = failed, "jemalloc purge failed");
    }
}

#[cfg(not(unix))]
fn purge_jemalloc() {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_glibc() {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks
    // each arena); 0 keeps no padding at the top of the heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_is_due_for_enough_or_once_releases_stop() {
        assert!(!due(0, 0), "nothing released: no pass");
        assert!(due(MIN_TRIM, 1), "enough since the last pass");
        assert!(!due(MIN_TRIM - 1, 1), "a little, still coming");
        assert!(due(1, 0), "a little, and no more since the last look");
    }

    #[test]
    fn a_slow_pass_puts_off_the_next() {
        let second = Duration::from_secs(1);
        assert_eq!(next_wait(second, Duration::from_millis(2)), second);
        assert_eq!(next_wait(second, Duration::from_millis(30)), 3 * second);
    }
}
