//! Thread per core (`server.scheduling = "per-core"`): with several
//! workers, each is a current-thread runtime of its own, and each runs an
//! accept loop on every listener's address, on a socket of its own
//! (`SO_REUSEPORT`: the kernel spreads new connections over the sockets by
//! their addresses). A connection's task, its timer and its socket's
//! readiness stay on the thread that accepted it: no work-stealing
//! scheduler keeps statistics and queues for it, which on two workers is
//! 4.5% of the instructions of a small echo (RESULTS.md, "Thread per
//! core"). The first worker is the thread `serve` blocks on, which also
//! runs the control plane (admin API, file watches, certificate reloads,
//! the heap trimmer).
//!
//! Not the default: a connection never moves to another worker, so while
//! the OS runs something else on a worker's core (another process, or the
//! lanes of `runtime::idle_pool`), that worker's connections wait for it,
//! where work stealing would have another worker take them; with the
//! workers sharing their cores, the neighbours bench's quiet p99 was 1.4
//! and 3.1 times work stealing's in two runs (its throughput 11% and 19%
//! higher). It suits workers that have their cores to themselves.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};
use tokio_util::sync::CancellationToken;

use crate::config::Scheduling;

/// How long a worker's runtime waits for its tasks once `serve` is done
/// with them (they were given `server.shutdown_timeout` already).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// The worker threads: `TOKIO_WORKER_THREADS` (tokio's own variable) if
/// set to a number, else one per core.
pub fn workers() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1)
}

/// Whether `workers` workers under `scheduling` run one runtime each.
pub fn per_core(scheduling: Scheduling, workers: usize) -> bool {
    workers > 1 && scheduling == Scheduling::PerCore
}

/// The workers past the first, each a thread with its own current-thread
/// runtime. Dropped, they stop (after a second for what they still
/// run) and are joined.
#[derive(Default)]
pub struct Cores {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
    stop: CancellationToken,
}

impl Cores {
    /// Starts `extra` workers (none: the caller's runtime is the only one).
    pub fn start(extra: usize) -> io::Result<Self> {
        let mut cores = Self::default();
        for _ in 0..extra {
            let (tx, rx) = mpsc::sync_channel(1);
            let stop = cores.stop.clone();
            let thread = std::thread::Builder::new()
                .name("wharf-worker".into())
                .spawn(move || {
                    let built = Builder::new_current_thread()
                        .enable_all()
                        .thread_name("wharf-blocking")
                        .build();
                    let runtime = match built {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = tx.send(Err(err));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(stop.cancelled());
                    runtime.shutdown_timeout(STOP_GRACE);
                })?;
            cores.threads.push(thread);
            let handle = rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended at start"))??;
            cores.handles.push(handle);
        }
        Ok(cores)
    }

    /// The extra workers' runtimes, where [`Server`](super::Server) runs an
    /// accept loop per listener each.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        self.stop.cancel();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
