//! Where message calls run when they should not hold a worker: those of a
//! tenant over its CPU share on one thread at the kernel's idle priority
//! (`SCHED_IDLE` on Linux), so that they use only CPU nobody else wants;
//! a call that simply runs long (past [`LONG_CALL`] on a worker) on one
//! thread at a low priority (nice [`LONG_NICE`]) and with a short time
//! slice, where the kernel preempts it for the workers as soon as they
//! wake but still gives it a fair part of a core.
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
//! it took: at a low priority on a busy machine most of that is waiting.
//! Each pool has one thread, so a call never moves between threads and its
//! thread's CPU clock measures it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;
use std::time::Duration;
use std::time::Instant;

use tokio::runtime::{Builder, Handle, Runtime};
use tokio::task::JoinError;

thread_local! {
    /// The [`Lane::flag`] of the lane this thread serves; 0 on a worker.
    static LANE: Cell<u8> = const { Cell::new(0) };
}

/// How long a call may run on a worker before it moves to the long lane.
pub const LONG_CALL: Duration = Duration::from_millis(2);
/// CPU time after which a call on the long lane marks its tenant as
/// running long (its next calls start on the long lane, see
/// [`CpuShare::runs_long`](super::cpu_share::CpuShare::runs_long)). Only
/// on the long lane, where the clock is the thread's CPU time: on a worker
/// a short call preempted by the kernel can look long by the wall clock,
/// and a well-behaved tenant must not be sent off the workers for that.
/// Past `LONG_CALL` on a worker plus at least 2 ms measured here.
pub const LONG_TENANT: Duration = Duration::from_millis(5);
/// The long lane's priority: about a tenth of a normal thread's weight.
pub const LONG_NICE: i32 = 10;

/// Where a moved call goes; a call moves only to a lower priority (from a
/// worker to `Long`, from either to `Idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lane {
    /// It ran long: low priority.
    Long = 1,
    /// Its tenant is over its CPU share: idle priority.
    Idle = 2,
}

impl Lane {
    /// The value a [`run_movable`] flag holds for it (0: a worker).
    pub fn flag(self) -> u8 {
        self as u8
    }

    fn of(flag: u8) -> Option<Lane> {
        match flag {
            1 => Some(Lane::Long),
            2 => Some(Lane::Idle),
            _ => None,
        }
    }
}

/// The lane's runtime, started on first use and kept for the process's
/// life (like the epoch clock, it serves every plugin).
pub fn handle(lane: Lane) -> &'static Handle {
    static IDLE: OnceLock<Runtime> = OnceLock::new();
    static LONG: OnceLock<Runtime> = OnceLock::new();
    let (pool, name) = match lane {
        Lane::Idle => (&IDLE, "wharf-idle"),
        Lane::Long => (&LONG, "wharf-long"),
    };
    pool.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || {
                lower_priority(lane);
                LANE.with(|l| l.set(lane.flag()));
            })
            .build()
            .expect("a one-thread tokio runtime builds")
    })
    .handle()
}

/// Runs `call` on `lane`.
pub async fn run<T: Send + 'static>(
    lane: Lane,
    call: impl Future<Output = T> + Send + 'static,
) -> Result<T, JoinError> {
    handle(lane).spawn(call).await
}

/// Runs `call` from `from` (`None`: here, on the calling worker) until it
/// returns pending with `moved` set to a lane below the one it runs on
/// ([`Lane::flag`]), then goes on on that lane (and from `Long` to `Idle`
/// the same way): a call that starts on a worker and turns out long, or
/// whose tenant goes over its share, moves at its next yield (a suspended
/// fiber may be resumed on any thread).
pub async fn run_movable<T: Send + 'static>(
    call: impl Future<Output = T> + Send + 'static,
    moved: Arc<AtomicU8>,
    from: Option<Lane>,
) -> Result<T, JoinError> {
    let call = Box::pin(call);
    let (lane, call) = match from {
        Some(lane) => (lane, call),
        None => match poll_until_moved(call, &moved, 0).await {
            Ok(done) => return Ok(done),
            Err(moved_to) => moved_to,
        },
    };
    match lane {
        Lane::Idle => run(Lane::Idle, call).await,
        Lane::Long => run(Lane::Long, on_long_lane(call, moved)).await?,
    }
}

/// The part of a movable call that runs on the long lane: until it is done
/// or flagged for the idle lane.
async fn on_long_lane<F: Future + Unpin + Send + 'static>(
    call: F,
    moved: Arc<AtomicU8>,
) -> Result<F::Output, JoinError>
where
    F::Output: Send + 'static,
{
    match poll_until_moved(call, &moved, Lane::Long.flag()).await {
        Ok(done) => Ok(done),
        Err((lane, call)) => run(lane, call).await,
    }
}

/// Polls `call` on this thread until it is done, or pending with `moved`
/// naming a lane below `here`.
async fn poll_until_moved<F: Future + Unpin>(
    mut call: F,
    moved: &AtomicU8,
    here: u8,
) -> Result<F::Output, (Lane, F)> {
    let polled = std::future::poll_fn(|cx| match Pin::new(&mut call).poll(cx) {
        Poll::Ready(done) => Poll::Ready(Ok(done)),
        Poll::Pending => match Lane::of(moved.load(Ordering::Relaxed)) {
            Some(to) if to.flag() > here => Poll::Ready(Err(to)),
            _ => Poll::Pending,
        },
    })
    .await;
    polled.map_err(|to| (to, call))
}

/// The lane the calling thread serves; `None` on a worker.
pub fn current_lane() -> Option<Lane> {
    Lane::of(LANE.with(Cell::get))
}

/// The clock a call's first slice is measured with, in microseconds: the
/// thread's CPU time on a lane's thread, monotonic wall time on a worker
/// (a vDSO read, where the CPU clock is a system call: most calls end
/// within their first slice, and a worker's call that runs has the core
/// unless other processes want it). Slices after the first tick are read
/// off [`thread_cpu_micros`] wherever they run.
pub fn slice_clock_micros() -> u64 {
    if current_lane().is_some() {
        thread_cpu_micros()
    } else {
        monotonic_micros()
    }
}

/// Microseconds of the monotonic clock. Read directly (the vDSO) rather
/// than as `Instant::elapsed` since a start: that added a once-check, a
/// second subtraction and 128-bit arithmetic to each of the two readings
/// every plugin call takes.
fn monotonic_micros() -> u64 {
    #[cfg(target_os = "linux")]
    if let Some(us) = clock_micros(libc::CLOCK_MONOTONIC) {
        return us;
    }
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `clock`'s reading in microseconds, if it can be read.
#[cfg(target_os = "linux")]
fn clock_micros(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000)
            .saturating_add(ts.tv_nsec as u64 / 1000),
    )
}

/// Microseconds of CPU time the calling thread has used.
#[cfg(target_os = "linux")]
pub fn thread_cpu_micros() -> u64 {
    clock_micros(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_else(monotonic_micros)
}

#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_micros() -> u64 {
    monotonic_micros()
}

/// Lowers the calling thread's priority for `lane` (lowering one's own
/// needs no privilege). Where that fails (or off Linux) the lane still
/// takes the calls off the workers, at normal priority.
fn lower_priority(lane: Lane) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: 0 is the calling thread; `param` is valid for the call.
        let failed = match lane {
            Lane::Idle => {
                let param = libc::sched_param { sched_priority: 0 };
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 }
            }
            Lane::Long => unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LONG_NICE) != 0 },
        };
        if !failed && lane == Lane::Long {
            shorten_slice();
        }
        if failed {
            tracing::warn!(
                err = %std::io::Error::last_os_error(),
                ?lane,
                "could not lower a plugin lane's priority; its calls run at normal priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = lane;
}

/// The long lane's time slice: the shortest the kernel takes.
#[cfg(target_os = "linux")]
const LONG_SLICE_NANOS: u64 = 100_000;

/// Asks for a short time slice (Linux 6.12 and later; older kernels ignore
/// `sched_runtime` for normal threads): a low weight alone lets the lane
/// keep a core for a whole default slice (about 3 ms here) before a woken
/// worker gets it, which every connection waiting on that worker sees as
/// latency; with a short slice a waking worker preempts it at once.
#[cfg(target_os = "linux")]
fn shorten_slice() {
    /// `struct sched_attr` (include/uapi/linux/sched/types.h), first version.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice: LONG_NICE,
        priority: 0,
        runtime: LONG_SLICE_NANOS,
        deadline: 0,
        period: 0,
    };
    // SAFETY: 0 is the calling thread; `attr` is a valid, sized sched_attr.
    if unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) } != 0 {
        tracing::debug!(err = %std::io::Error::last_os_error(), "no short slice for the long lane");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_thread_is_idle_class_and_measures_cpu() {
        let (policy, lane) = handle(Lane::Idle).block_on(async {
            handle(Lane::Idle)
                .spawn(async {
                    // SAFETY: querying the calling thread's policy.
                    let policy = unsafe { libc::sched_getscheduler(0) };
                    (policy, current_lane())
                })
                .await
                .expect("the task runs")
        });
        assert_eq!(lane, Some(Lane::Idle));
        #[cfg(target_os = "linux")]
        assert_eq!(policy, libc::SCHED_IDLE);
        let _ = policy;
        // Off the pool the clock is wall time: a sleep advances it.
        let before = slice_clock_micros();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(slice_clock_micros() - before >= 5000);
    }

    /// The calling thread's (nice, slice in ns), by `sched_getattr`.
    #[cfg(target_os = "linux")]
    fn nice_and_slice() -> (i32, u64) {
        let mut attr = [0u64; 7];
        // SAFETY: 56 writable bytes, the size of the first sched_attr.
        let r = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, attr.as_mut_ptr(), 56, 0) };
        assert_eq!(r, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        // size, policy | flags | nice, priority | runtime (the slice) | ...
        ((attr[2] & 0xffff_ffff) as u32 as i32, attr[3])
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_long_lane_is_niced_with_a_short_slice() {
        let (nice, slice) = handle(Lane::Long).block_on(async {
            handle(Lane::Long)
                .spawn(async { nice_and_slice() })
                .await
                .expect("the task runs")
        });
        assert_eq!(nice, LONG_NICE);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut version = release.split(|c: char| !c.is_ascii_digit());
        let major: u32 = version.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let minor: u32 = version.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        // Custom slices for normal threads came with Linux 6.12.
        if (major, minor) >= (6, 12) {
            assert_eq!(slice, LONG_SLICE_NANOS);
        }
    }

    #[tokio::test]
    async fn a_call_moves_at_its_first_pending_once_flagged() {
        let moved = Arc::new(AtomicU8::new(0));
        let flag = moved.clone();
        let lanes = run_movable(
            async move {
                let first = current_lane();
                flag.store(Lane::Long.flag(), Ordering::Relaxed);
                tokio::task::yield_now().await;
                let second = current_lane();
                flag.store(Lane::Idle.flag(), Ordering::Relaxed);
                tokio::task::yield_now().await;
                (first, second, current_lane())
            },
            moved,
            None,
        )
        .await
        .expect("the call finishes");
        assert_eq!(lanes, (None, Some(Lane::Long), Some(Lane::Idle)));
        // Unflagged, it stays.
        let stays = run_movable(
            async {
                tokio::task::yield_now().await;
                current_lane()
            },
            Arc::new(AtomicU8::new(0)),
            None,
        )
        .await
        .expect("the call finishes");
        assert_eq!(stays, None);
        // Started on the long lane, it runs there from its first poll.
        let long = run_movable(
            async { current_lane() },
            Arc::new(AtomicU8::new(0)),
            Some(Lane::Long),
        )
        .await
        .expect("the call finishes");
        assert_eq!(long, Some(Lane::Long));
    }
}
