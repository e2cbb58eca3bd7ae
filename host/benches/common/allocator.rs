//! The allocator of the benches whose figures are rates and CPU: jemalloc,
//! as the `wharf` binary's (its `main.rs`), for the native baselines served
//! from this binary (`--serve-baseline`) and its load generator alike.
//! With glibc's malloc a connection cost tokio-tungstenite 48.7k
//! instructions against 45.7k with jemalloc, fastwebsockets 39.7k against
//! 35.2k (callgrind, `release`, 2026-12-07); an echo allocates nothing in
//! either and counts the same. So each baseline is measured at its faster.
//!
//! The density bench keeps glibc's: with jemalloc an idle
//! tokio-tungstenite connection held 22.7 KiB against 18.5, and there the
//! smaller is the baseline to beat.

#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
