//! The wall-clock bound of one plugin call, with no timer for the calls
//! that do not need one.
//!
//! A running call is already checked at every epoch tick, so a timer only
//! matters once the call is pending: waiting in a host future (a blocked
//! `wasi:io/poll`) or yielding at a tick. Most calls finish within their
//! first poll; `tokio::time::timeout` would still build a timer entry for
//! each (a runtime handle, its deadline, one more move of the large call
//! future). Here the timer is made at the first pending poll, counted from
//! when the call began.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The call ran past its wall-clock bound; it was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs the future `call` makes for at most `wall` of wall-clock time.
/// (Made here, not passed in: a wasmtime call's future is over a KiB, and
/// made in place it is not copied on its way in.)
pub async fn within<F: Future>(
    wall: Duration,
    call: impl FnOnce() -> F,
) -> Result<F::Output, Elapsed> {
    let began = Instant::now();
    let mut call = pin!(call());
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    poll_fn(|cx| {
        if let Poll::Ready(done) = call.as_mut().poll(cx) {
            return Poll::Ready(Ok(done));
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(began + wall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_ready_call_needs_no_timer_and_a_waiting_one_is_cut() {
        assert_eq!(within(Duration::ZERO, || async { 7 }).await, Ok(7));
        let waits = within(50 * MS, || tokio::time::sleep(10_000 * MS));
        assert_eq!(waits.await, Err(Elapsed));
        let quick = within(10_000 * MS, || async {
            tokio::time::sleep(20 * MS).await;
            1
        });
        assert_eq!(quick.await, Ok(1));
    }

    #[tokio::test]
    async fn the_bound_counts_from_the_call_s_start() {
        let began = Instant::now();
        let r = within(500 * MS, || async {
            // Busy (not pending) for 400 ms first: the timer made at the
            // first pending poll still ends the call 500 ms after its
            // start, not 500 ms after being made (900 ms).
            std::thread::sleep(400 * MS);
            tokio::time::sleep(10_000 * MS).await;
        })
        .await;
        assert_eq!(r, Err(Elapsed));
        let took = began.elapsed();
        assert!(took >= 500 * MS && took < 850 * MS, "{took:?}");
    }
}
