//! The one wasmtime `Engine` every plugin is compiled for, and its epoch clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// One epoch tick: the granularity of CPU deadlines and of the yields that
/// keep a busy plugin from holding a worker thread.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Sizing of the engine's instance pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolSizing {
    /// Plugin instances alive at once (one per connection).
    pub instances: u32,
    /// Linear memory cap per instance, which is also each memory slot's size.
    pub memory_limit: usize,
    /// Component-model-async bookkeeping on every call. Off unless a plugin
    /// needs async (none can in WIT 0.1); kept switchable to measure it.
    pub concurrency_support: bool,
    /// Bytes of a freed slot's linear memory (and tables) kept mapped and
    /// reset in place rather than returned to the OS.
    pub keep_resident: usize,
}

/// Core instances a component may hold: Rust/C components need a handful,
/// interpreters (componentize-py) a few dozen.
pub const CORE_INSTANCES_PER_COMPONENT: u32 = 64;
/// Average core instances per component the pool is sized for.
const CORE_INSTANCES_PER_SLOT: u32 = 8;
pub const MEMORIES_PER_COMPONENT: u32 = 4;
/// Freed slots whose memory is returned to the OS with one batch of madvise
/// calls (per CPU shard): fewer system calls on the connection path, at most
/// this many slots' memory pending per shard.
const DECOMMIT_BATCH: usize = 32;
pub const TABLES_PER_COMPONENT: u32 = 16;
/// Table slots per instance on average.
const TABLES_PER_SLOT: u32 = 4;
/// Elements per table, in the pool and in each store's limiter.
pub const TABLE_ELEMENTS: usize = 20_000;

/// Builds the engine: component model, epoch interruption, pooling allocator
/// with copy-on-write memory images, and no component-model-async
/// bookkeeping (it doubles the cost of a trivial call).
pub fn build(pool: PoolSizing) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.concurrency_support(pool.concurrency_support);
    config.memory_init_cow(true);
    // Slots only as large as the memory cap: 10,000 slots of 4 GiB each would
    // exhaust the address space. Bounds checks become explicit, which costs
    // little for handler code.
    let reservation = pool.memory_limit as u64;
    config.memory_reservation(reservation);
    config.memory_guard_size(64 << 10);
    config.memory_reservation_for_growth(0);

    let n = pool.instances;
    let mut pooling = PoolingAllocationConfig::new();
    pooling
        .total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SLOT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(n.saturating_mul(2))
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_memory_size(pool.memory_limit)
        .total_tables(n.saturating_mul(TABLES_PER_SLOT))
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .table_elements(TABLE_ELEMENTS)
        // One async fiber stack per store: stores cache their stack.
        .total_stacks(n)
        // A freed slot keeps its first `keep_resident` bytes mapped, reset
        // in place: the next instance in that slot starts without an
        // madvise and page faults, which is most of what instantiation
        // costs beyond wasmtime's own bookkeeping. The rest goes back to
        // the OS, in batches. The reset is a full memset, not PAGEMAP_SCAN:
        // wasmtime 48's scan resets only pages that are present, so a
        // dirty page swapped out would reach the slot's next instance,
        // maybe another tenant's (bytecodealliance/wasmtime#14357).
        .linear_memory_keep_resident(pool.keep_resident)
        .table_keep_resident(pool.keep_resident)
        .pagemap_scan(Enabled::No)
        .decommit_batch_size(DECOMMIT_BATCH);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config).map_err(anyhow::Error::from)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a dedicated thread.
pub struct EpochClock {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochClock {
    pub fn start(engine: &Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = engine.clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wharf-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
