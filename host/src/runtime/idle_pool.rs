//! Where the message calls of a tenant over its CPU share run: one thread
//! at the kernel's idle priority (`SCHED_IDLE` on Linux), so that they
//! use only CPU nobody else wants.
//!
//! The CPU share alone caps how much a tenant runs, not where: a tenant
//! that spins within its share still runs its slices on the workers that
//! serve everyone, and every connection queued behind one of those slices
//! waits for it (the neighbour benchmark saw p99 double). Moved here, the
//! slices run on a thread the kernel preempts as soon as a worker (or
//! anything else on the machine) wants the core, so the tenants within
//! their share keep their latency.
//!
//! A call here is charged the CPU time its thread used, not the wall time
//! it took: at idle priority on a busy machine most of that is waiting.
//! The pool has one thread, so a call never moves between threads and its
//! thread's CPU clock measures it.

use std::cell::Cell;
use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Instant;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinError;

thread_local! {
    static ON_IDLE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// The pool's runtime, started on first use and kept for the process's
/// life (like the epoch clock, it serves every plugin).
pub fn handle() -> &'static Handle {
    static POOL: OnceLock<Runtime> = OnceLock::new();
    POOL.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wharf-idle")
            .enable_all()
            .on_thread_start(|| {
                lower_priority();
                ON_IDLE_THREAD.with(|on| on.set(true));
            })
            .build()
            .expect("a one-thread tokio runtime builds")
    })
    .handle()
}

/// Runs `call` on the pool.
pub async fn run<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
) -> Result<T, JoinError> {
    handle().spawn(call).await
}

/// Runs `call` here until it returns pending with `moved` set, then
/// finishes it on the pool: a call that starts on a worker and turns out
/// to be long moves at its next yield (a suspended fiber may be resumed
/// on any thread).
pub async fn run_movable<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
    moved: &AtomicBool,
) -> Result<T, JoinError> {
    let mut call = Box::pin(call);
    let here = std::future::poll_fn(|cx| match call.as_mut().poll(cx) {
        Poll::Ready(done) => Poll::Ready(Some(done)),
        Poll::Pending if moved.load(Ordering::Relaxed) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await;
    match here {
        Some(done) => Ok(done),
        None => run(call).await,
    }
}

/// Whether the calling thread is the pool's.
pub fn on_idle_thread() -> bool {
    ON_IDLE_THREAD.with(Cell::get)
}

/// The clock a call's slices are measured with, in microseconds: the
/// thread's CPU time on the idle thread, monotonic wall time elsewhere
/// (on the workers a call that runs is a call that has the core).
pub fn slice_clock_micros() -> u64 {
    if on_idle_thread() {
        thread_cpu_micros()
    } else {
        monotonic_micros()
    }
}

fn monotonic_micros() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(target_os = "linux")]
fn thread_cpu_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return monotonic_micros();
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000)
        .saturating_add(ts.tv_nsec as u64 / 1000)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_micros() -> u64 {
    monotonic_micros()
}

/// Puts the calling thread in the idle scheduling class; lowering one's
/// own priority needs no privilege. Where that fails (or off Linux) the
/// pool still takes the slices off the workers, at normal priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: 0 is the calling thread; `param` is valid for the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::warn!(
                err = %std::io::Error::last_os_error(),
                "could not lower the idle pool's priority; tenants over their CPU share run at normal priority"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_thread_is_idle_class_and_measures_cpu() {
        let (policy, on_idle) = handle().block_on(async {
            handle()
                .spawn(async {
                    // SAFETY: querying the calling thread's policy.
                    let policy = unsafe { libc::sched_getscheduler(0) };
                    (policy, on_idle_thread())
                })
                .await
                .expect("the task runs")
        });
        assert!(on_idle);
        #[cfg(target_os = "linux")]
        assert_eq!(policy, libc::SCHED_IDLE);
        let _ = policy;
        // Off the pool the clock is wall time: a sleep advances it.
        let before = slice_clock_micros();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(slice_clock_micros() - before >= 5000);
    }

    #[tokio::test]
    async fn a_call_moves_at_its_first_pending_once_flagged() {
        let moved = std::sync::Arc::new(AtomicBool::new(false));
        let flag = moved.clone();
        let threads = run_movable(
            async move {
                let first = on_idle_thread();
                flag.store(true, Ordering::Relaxed);
                tokio::task::yield_now().await;
                (first, on_idle_thread())
            },
            &moved,
        )
        .await
        .expect("the call finishes");
        assert_eq!(threads, (false, true));
        // Unflagged, it stays.
        let stays = run_movable(
            async {
                tokio::task::yield_now().await;
                on_idle_thread()
            },
            &AtomicBool::new(false),
        )
        .await
        .expect("the call finishes");
        assert!(!stays);
    }
}
