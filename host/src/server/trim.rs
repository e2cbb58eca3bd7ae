//! Hands the heap memory freed by hibernation back to the OS.
//!
//! A hibernating connection frees its instance's host-side state (store,
//! tables, buffers: tens of KiB), but glibc's allocator keeps freed pages in
//! the middle of its arenas resident until something reuses them, so an idle
//! server would not shrink. `malloc_trim(0)` releases every free page; it
//! walks the arenas, so it runs at most once per interval, on a blocking
//! thread, and only after hibernations happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Counts hibernations; the trimmer acts when it moved.
#[derive(Debug, Default)]
pub(crate) struct Released(AtomicU64);

impl Released {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs until `shutdown`: every `interval`, trims if anything was released.
pub(crate) async fn run(released: Arc<Released>, interval: Duration, shutdown: CancellationToken) {
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = released.0.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it locks
    // each arena); 0 keeps no padding at the top of the heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
