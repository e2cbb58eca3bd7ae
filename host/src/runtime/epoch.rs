//! The engine's epoch clock: what interrupts a running plugin call, so that
//! its CPU time is checked and its worker thread given back at every tick.
//!
//! Ticks only matter while wasm runs, so the clock stops once no call has
//! begun and no tick has reached a running call for [`IDLE_TICKS`]: an idle
//! server does not wake a thousand times a second for nothing (an idle
//! `wharf serve` took 83 ms of CPU in 10 s before, 1.3–1.7 ms since:
//! RESULTS.md, "The epoch clock stops while no call runs"). The next call
//! to begin starts it again ([`EpochUse::mark`]).
//!
//! A call can also be waiting in a host future (a blocked `wasi:io/poll`)
//! while the clock stops, and run wasm again later. Its deadline was armed
//! when it last marked the clock (one tick ahead), and the clock ticked at
//! least [`IDLE_TICKS`] times since: the deadline has passed, so at its
//! first epoch check the call reaches its callback, which marks the clock
//! and starts it.

use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use wasmtime::Engine;

/// One epoch tick: the granularity of CPU deadlines and of the yields that
/// keep a busy plugin from holding a worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Ticks with no call begun and none reached before the clock stops.
/// A stop and a start cost a wake-up of the clock's thread, which ticking
/// pays every millisecond.
pub const IDLE_TICKS: u32 = 100;

/// Advances its engine's epoch every [`EPOCH_TICK`] on a thread of its own
/// while plugin calls run; stops when none has for [`IDLE_TICKS`].
pub struct EpochClock {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What calls tell the clock (see [`EpochUse::mark`]); cheap to clone.
#[derive(Clone)]
pub struct EpochUse(Arc<Shared>);

struct Shared {
    /// A call began, or a tick reached a running one, since the clock's
    /// last look.
    used: AtomicBool,
    /// The clock is ticking (`false` once it has decided to stop).
    awake: AtomicBool,
    stop: AtomicBool,
    /// Epoch increments so far.
    #[cfg(test)]
    ticks: AtomicU64,
    thread: std::sync::OnceLock<Thread>,
}

impl EpochClock {
    /// Fails if its thread cannot be made: without it no call could be
    /// interrupted.
    pub fn start(engine: &Engine) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            used: AtomicBool::new(false),
            awake: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            #[cfg(test)]
            ticks: AtomicU64::new(0),
            thread: std::sync::OnceLock::new(),
        });
        let engine = engine.clone();
        let ticking = shared.clone();
        let thread = std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn(move || ticking.run(&engine))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The handle calls mark the clock with.
    pub fn user(&self) -> EpochUse {
        EpochUse(self.shared.clone())
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl EpochUse {
    /// A call begins, or a tick reached a running one: the clock must tick.
    /// Two loads when it does already (a store once per tick at most).
    #[inline]
    pub fn mark(&self) {
        let shared = &*self.0;
        if !shared.used.load(Ordering::Relaxed) {
            shared.used.store(true, Ordering::SeqCst);
        }
        // After `used` is set: the clock sets `awake` before it looks at
        // `used` a last time, so one of the two sees the other.
        if !shared.awake.load(Ordering::SeqCst) {
            shared.wake();
        }
    }

    /// Epoch increments so far.
    #[cfg(test)]
    fn ticks(&self) -> u64 {
        self.0.ticks.load(Ordering::Relaxed)
    }

    /// Whether the clock has stopped for want of calls.
    #[cfg(test)]
    fn is_stopped(&self) -> bool {
        !self.0.awake.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn run(&self, engine: &Engine) {
        // Before it can stop: a wake must find the thread to unpark.
        let _ = self.thread.set(std::thread::current());
        let mut idle = 0;
        while !self.stop.load(Ordering::Relaxed) {
            std::thread::sleep(EPOCH_TICK);
            self.tick(engine);
            if self.used.swap(false, Ordering::SeqCst) {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < IDLE_TICKS {
                continue;
            }
            idle = 0;
            self.awake.store(false, Ordering::SeqCst);
            if self.used.load(Ordering::SeqCst) {
                // A call began meanwhile; it may have seen `awake` still
                // set, so the clock must go on.
                self.awake.store(true, Ordering::SeqCst);
                continue;
            }
            tracing::trace!("epoch clock stopped");
            while !self.awake.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
            tracing::trace!("epoch clock started");
        }
    }

    fn tick(&self, engine: &Engine) {
        engine.increment_epoch();
        #[cfg(test)]
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }

    #[cold]
    fn wake(&self) {
        if !self.awake.swap(true, Ordering::SeqCst)
            && let Some(thread) = self.thread.get()
        {
            thread.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use wasmtime::{Config, Instance, Module, Store};

    /// Waits up to 5 s for `cond`.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let began = Instant::now();
        while !cond() {
            assert!(began.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(EPOCH_TICK);
        }
    }

    fn engine() -> Engine {
        let mut config = Config::new();
        config.epoch_interruption(true);
        Engine::new(&config).unwrap()
    }

    #[test]
    fn the_clock_stops_when_unused_and_a_call_starts_it() {
        let engine = engine();
        let clock = EpochClock::start(&engine).unwrap();
        let user = clock.user();
        eventually("the unused clock stops", || user.is_stopped());
        let stopped_at = user.ticks();
        std::thread::sleep(EPOCH_TICK * 20);
        assert_eq!(user.ticks(), stopped_at, "a stopped clock ticks");
        user.mark();
        assert!(!user.is_stopped());
        eventually("a marked clock ticks", || user.ticks() >= stopped_at + 3);
        // Marked at every tick (as a running call's callback does), it
        // keeps ticking well past IDLE_TICKS.
        let marking = Instant::now();
        while marking.elapsed() < EPOCH_TICK * (IDLE_TICKS * 2) {
            user.mark();
            assert!(!user.is_stopped(), "stopped while in use");
            std::thread::sleep(EPOCH_TICK / 2);
        }
        eventually("the clock stops again", || user.is_stopped());
        drop(clock);
    }

    /// A call armed before the clock stopped, that runs wasm again only
    /// after (as one waiting in a host future does), still reaches its
    /// deadline: the idle ticks before the stop passed it.
    #[test]
    fn a_deadline_armed_before_the_stop_still_interrupts() {
        let engine = engine();
        let clock = EpochClock::start(&engine).unwrap();
        let user = clock.user();
        let wat = r#"(module (func (export "spin") (loop br 0)))"#;
        let module = Module::new(&engine, wat::parse_str(wat).unwrap()).unwrap();
        let mut store = Store::new(&engine, ());
        let instance = Instance::new(&mut store, &module, &[]).unwrap();
        let spin = instance
            .get_typed_func::<(), ()>(&mut store, "spin")
            .unwrap();
        user.mark();
        store.set_epoch_deadline(1);
        // The call "waits in the host" until the clock has stopped...
        eventually("the clock stops", || user.is_stopped());
        // ...then spins, with nothing marking the clock: its deadline has
        // passed, so it traps at once.
        let (done, waited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(spin.call(&mut store, ()).is_err());
        });
        let trapped = waited.recv_timeout(Duration::from_secs(5));
        assert_eq!(trapped, Ok(true), "the spinning call was not interrupted");
    }
}
