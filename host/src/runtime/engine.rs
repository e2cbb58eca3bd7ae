//! The one wasmtime `Engine` every plugin is compiled for (its epoch clock
//! is [`super::epoch`]).

use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Sizing of the engine's instance pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolSizing {
    /// Plugin instances alive at once (one per connection).
    pub instances: u32,
    /// Linear memory cap per instance; each memory slot reserves
    /// [`reservation`] of it.
    pub memory_limit: usize,
    /// Component-model-async bookkeeping on every call. Off unless a plugin
    /// needs async (none can in WIT 0.1): on, a 32 B echo took 23.1k
    /// instructions instead of 13.9k (wasmtime 48; RESULTS.md, "Runs AS
    /// to AV"). Kept switchable to measure it.
    pub concurrency_support: bool,
    /// How a freed slot's linear memory is made fresh for its next
    /// instance (`plugin.memory_reset`, `plugin.keep_resident`).
    pub memory_reset: MemoryReset,
    /// Slots of [`WIDE_RESERVATION`] where they fit (`plugin.memory_slots
    /// = "wide"`), else of [`reservation`].
    pub wide_slots: bool,
}

impl PoolSizing {
    /// Memory slots in the pool: two an instance, as a component may have
    /// more than one memory.
    fn memories(&self) -> u32 {
        self.instances.saturating_mul(2)
    }
}

/// How a pool slot's linear memory is made fresh for the slot's next
/// instance once its instance is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryReset {
    /// Its pages go back to the OS (`madvise`, in batches), but for the
    /// first `keep_resident` bytes, zeroed by a memset of all of them; the
    /// next instance faults in every page it touches again (4 faults per
    /// instance of the bundled echo).
    Decommit { keep_resident: usize },
    /// The pages the instance wrote are found with `PAGEMAP_SCAN` (Linux
    /// 6.7) and restored in place, up to `budget` bytes of them; pages
    /// beyond the budget go back to the OS. No page faults and no `madvise`
    /// for a plugin that writes less than the budget, at the price of
    /// keeping those pages resident in every slot used so far. Only for a
    /// process that cannot swap ([`super::swap`]).
    InPlace { budget: usize },
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
/// Each store's fiber stack, guard page included: 1 MiB. Every live
/// instance touches the top of its own, and stacks of wasmtime's default 2
/// MiB each needed a page-table page of their own; two of these share
/// one (page tables per live connection 9.8 → 7.8 KiB, density bench).
/// wasm frames still get wasmtime's default 512 KiB (`max_wasm_stack`);
/// host functions called from them, on the same stack, the other 508 KiB
/// (the whole e2e and languages suites pass with 64 KiB of it).
const ASYNC_STACK: usize = (1 << 20) - 4096;
/// Bytes of a freed slot's tables zeroed in place rather than returned to
/// the OS: only a table's used size is reset, a few KiB for most plugins,
/// and refaulting it was most of what separated instantiations with and
/// without `keep_resident` (the runtime bench, echo plugin: 17.4 µs
/// against 11.8).
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Builds the engine: component model, epoch interruption, pooling allocator
/// with copy-on-write memory images, and no component-model-async
/// bookkeeping (it doubles the cost of a trivial call). Its memory slots
/// are [`reservation`], or [`WIDE_RESERVATION`] if asked for
/// ([`PoolSizing::wide_slots`]), the pool's fit in [`WIDE_BUDGET`] and the
/// system lets the pool reserve them (an `RLIMIT_AS`, or valgrind, may
/// not).
pub fn build(pool: PoolSizing) -> anyhow::Result<Engine> {
    build_reserving(pool).map(|(engine, _)| engine)
}

/// [`build`], and the slots' reservation it chose.
fn build_reserving(pool: PoolSizing) -> anyhow::Result<(Engine, u64)> {
    let memories = pool.memories();
    let narrow = reservation(pool.memory_limit, memories);
    if !pool.wide_slots || u64::from(memories).saturating_mul(WIDE_RESERVATION) > WIDE_BUDGET {
        return Ok((build_with(pool, narrow)?, narrow));
    }
    match build_with(pool, WIDE_RESERVATION) {
        Ok(engine) => Ok((engine, WIDE_RESERVATION)),
        Err(wide) => {
            // Told only if the slots were the trouble: a failure of any
            // other setting fails this build too, and is the error.
            let engine = build_with(pool, narrow)?;
            tracing::warn!(
                memories,
                "cannot reserve 4 GiB memory slots ({wide:#}); plugins' memory accesses are bounds-checked"
            );
            Ok((engine, narrow))
        }
    }
}

/// [`build`] with slots of `reservation` bytes.
fn build_with(pool: PoolSizing, reservation: u64) -> anyhow::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.concurrency_support(pool.concurrency_support);
    config.memory_init_cow(true);
    config.async_stack_size(ASYNC_STACK);
    // `WHARF_PERF_MAP=1`: write /tmp/perf-PID.map, so that `perf report`
    // names the plugins' compiled functions (profiling only; it costs a
    // few writes per compiled or loaded plugin).
    if std::env::var_os("WHARF_PERF_MAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let memories = pool.memories();
    config.memory_reservation(reservation);
    // With 4 GiB slots, an access whose static offset is under the guard
    // cannot leave its slot unchecked; smaller slots check every access.
    config.memory_guard_size(64 << 10);
    config.memory_reservation_for_growth(0);

    let n = pool.instances;
    let mut pooling = PoolingAllocationConfig::new();
    pooling
        .total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_SLOT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(memories)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_memory_size(pool.memory_limit)
        .total_tables(n.saturating_mul(TABLES_PER_SLOT))
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .table_elements(TABLE_ELEMENTS)
        // One async fiber stack per store: stores cache their stack.
        .total_stacks(n)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .decommit_batch_size(DECOMMIT_BATCH);
    // The scan only where asked for: it is safe only in a process that
    // cannot swap, which `serve` checks (see `super::swap`).
    match pool.memory_reset {
        MemoryReset::Decommit { keep_resident } => pooling
            .linear_memory_keep_resident(keep_resident)
            .pagemap_scan(Enabled::No),
        MemoryReset::InPlace { budget } => pooling
            .linear_memory_keep_resident(budget)
            .pagemap_scan(Enabled::Yes),
    };
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config).map_err(anyhow::Error::from)
}

/// Whether this kernel has `PAGEMAP_SCAN` (Linux 6.7), which
/// [`MemoryReset::InPlace`] needs.
pub fn in_place_available() -> bool {
    PoolingAllocationConfig::is_pagemap_scan_available()
}

/// A memory slot that a 32-bit index cannot leave: Cranelift then drops
/// the bounds check from every load and store whose offset the guard
/// covers. An interpreter's loop is loads and stores: 6% less CPU a
/// message for the QuickJS echo in a shared instance, 10% for Python's
/// (RESULTS.md, "Evening of 2026-12-05"). Not the default: each slot then
/// needs page-table pages of its own, 3 KiB more of the kernel's memory
/// per live instance.
pub const WIDE_RESERVATION: u64 = 4 << 30;

/// The address space 4 GiB slots may take: three quarters of the 128 TiB a
/// process may map (never touched, `PROT_NONE`: address space, not memory).
/// The default 10,000 connections' 20,000 slots take 80 TiB; past about
/// 12,000 connections the slots are [`reservation`]'s.
pub const WIDE_BUDGET: u64 = 96 << 40;

/// The smallest compact memory slot ([`reservation`]), the default.
pub const MIN_RESERVATION: u64 = 256 << 20;

/// The address space the memory pool may reserve before its slots shrink
/// to the memory limit itself: a quarter of the 128 TiB a process may map.
const POOL_ADDRESS_BUDGET: u64 = 32 << 40;

/// Each of `memories` pool slots' reservation for instances of at most
/// `memory_limit` bytes of linear memory: the limit rounded up to a power
/// of two, at least [`MIN_RESERVATION`]; the limit itself if that would
/// reserve more than `POOL_ADDRESS_BUDGET` in all.
///
/// Compiled code is tied to the reservation (wasmtime puts it in the
/// engine's compatibility hash, so in the cache's file names, and refuses
/// to load code compiled for another), though not to the limit itself,
/// which the pool (`max_memory_size`) and each store's limiter enforce. So
/// the reservation is not the limit: with it rounded, raising or lowering
/// `memory_limit` (64 MiB by default, 128 MiB as the guides suggest for
/// interpreters, anything up to 256 MiB) reuses the code already cached
/// instead of compiling every plugin again (18 s for a JavaScript one on
/// 2 cores). The price is address space, not memory: reserved, never
/// touched slots (`PROT_NONE`), 20,000 of them (two per instance) at the
/// default `max_connections`, 4.9 TiB (VmSize) where slots of exactly
/// 64 MiB took 1.25 TiB, the same RSS. Larger limits round to 512 MiB,
/// 1 GiB, ... and get their own code.
pub fn reservation(memory_limit: usize, memories: u32) -> u64 {
    let limit = memory_limit as u64;
    let rounded = limit
        .max(MIN_RESERVATION)
        .checked_next_power_of_two()
        .unwrap_or(limit);
    if rounded.saturating_mul(u64::from(memories)) <= POOL_ADDRESS_BUDGET {
        rounded
    } else {
        limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_does_not_follow_every_limit() {
        let mib = |n: usize| n << 20;
        for limit in [1, 16, 64, 128, 256] {
            assert_eq!(reservation(mib(limit), 20_000), 256 << 20, "{limit} MiB");
        }
        assert_eq!(reservation(mib(300), 20_000), 512 << 20);
        assert_eq!(reservation(mib(1024), 20_000), 1 << 30);
        // Past the budget, slots are the limit itself.
        assert_eq!(reservation(mib(64), 1_000_000), 64 << 20);
    }

    #[test]
    fn slots_are_4_gib_where_they_fit() {
        let pool = |instances, wide_slots| PoolSizing {
            instances,
            memory_limit: 64 << 20,
            concurrency_support: false,
            memory_reset: MemoryReset::Decommit { keep_resident: 0 },
            wide_slots,
        };
        let (_, reserved) = build_reserving(pool(8, false)).unwrap();
        assert_eq!(reserved, reservation(64 << 20, 16));
        // The default 10,000 connections: 80 TiB, within the budget.
        const { assert!(10_000 * 2 * WIDE_RESERVATION <= WIDE_BUDGET) };
        let (_, reserved) = build_reserving(pool(8, true)).unwrap();
        assert_eq!(reserved, WIDE_RESERVATION);
        // Past the budget the pool is not even tried (it would fail).
        let (_, reserved) = build_reserving(pool(20_000, true)).unwrap();
        assert_eq!(reserved, reservation(64 << 20, 40_000));
    }

    #[test]
    fn an_in_place_engine_needs_the_scan() {
        let pool = |memory_reset| PoolSizing {
            instances: 4,
            memory_limit: 1 << 20,
            concurrency_support: false,
            memory_reset,
            wide_slots: false,
        };
        build(pool(MemoryReset::Decommit { keep_resident: 0 })).unwrap();
        let in_place = build(pool(MemoryReset::InPlace { budget: 64 << 10 }));
        assert_eq!(
            in_place.is_ok(),
            in_place_available(),
            "{:?}",
            in_place.err()
        );
    }
}
