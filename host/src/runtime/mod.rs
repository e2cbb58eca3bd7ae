//! The plugin runtime: one wasmtime engine, plugins compiled once, and one
//! store and instance per connection, each with its own memory and CPU limits.

pub mod attachment_host;
pub mod batch;
pub mod batch_handler;
pub mod batch_send_host;
pub mod bindings;
pub mod cache;
pub mod config_host;
pub mod connection_host;
pub mod cpu_share;
pub mod engine;
pub mod epoch;
pub mod export;
pub mod handler;
pub mod idle_pool;
pub mod inspect;
pub mod latin1_host;
pub mod lifecycle;
pub mod limits;
pub mod log_stream;
pub mod masked_bytes;
pub mod packed_handler;
pub mod packed_send_host;
pub mod packed_words_handler;
pub mod packed_words_send_host;
pub mod peers_host;
pub mod pubsub_host;
pub mod request_handler;
pub mod request_host;
pub mod shared;
pub mod snapshot;
pub mod swap;
pub mod text_batch_handler;
pub mod text_batch_send_host;
pub mod wall;

use anyhow::Context as _;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Func, HasSelf, InstancePre, Linker, Resource, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wharf_protocol::{FrameBatch, Masked};

use self::batch::BatchRef;
use self::batch_handler::Message;
use self::bindings::UpgradeResponse;
use self::connection_host::{ConnectionEntry, Parked, SendLimits};
use self::cpu_share::CpuShare;
use self::engine::PoolSizing;
use self::epoch::{EpochClock, EpochUse};
use self::export::FuncExport;
use self::handler::{HandlerExports, HandlerFuncs};
use self::lifecycle::{Calls, Wanted};
use self::limits::{CpuBudget, LimitExceeded, LimitHit, SandboxLimiter};
use self::log_stream::{LogBudget, LogStream};
use self::pubsub_host::{Broker, Subscriptions};
use self::request_host::RequestEntry;
use self::snapshot::{SnapshotExport, SnapshotFuncs};
use crate::IdMap;

/// What every plugin instance is limited to.
#[derive(Debug, Clone, Copy)]
pub struct InstanceLimits {
    pub memory: usize,
    pub cpu: CpuBudget,
    pub send: SendLimits,
}

/// Whose plugin is loaded, and what its instances get.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The tenant: the scope of the plugin's topics and its label in logs
    /// and metrics.
    pub tenant: Arc<str>,
    pub limits: InstanceLimits,
    /// What `wharf:websocket/config` answers.
    pub settings: Arc<BTreeMap<String, String>>,
    /// The tenant's log lines per second, shared by all its instances.
    pub log: Arc<LogBudget>,
    /// The tenant's share of the CPU, shared by all its instances.
    pub cpu_share: Arc<CpuShare>,
    /// WASI capabilities beyond clocks and random.
    pub wasi: Arc<WasiGrants>,
}

/// WASI capabilities an instance is granted beyond the monotonic clock and
/// random.
#[derive(Debug, Clone)]
pub struct WasiGrants {
    /// Environment variables, names and values.
    pub env: Vec<(String, String)>,
    /// A directory readable (only) at [`WASI_DIR`].
    pub dir: Option<std::path::PathBuf>,
    /// `false`: the wall clock is frozen at the Unix epoch.
    pub wall_clock: bool,
}

impl Default for WasiGrants {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            dir: None,
            wall_clock: true,
        }
    }
}

/// The wall clock of a plugin not granted one: always the Unix epoch.
struct Epoch;

impl wasmtime_wasi::HostWallClock for Epoch {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// Where a granted directory appears to the plugin.
pub const WASI_DIR: &str = "/data";

/// Settings fixed when the runtime starts.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub max_instances: u32,
    /// What [`Runtime::load`] gives a plugin; `limits.memory` is also the
    /// size of every pool slot, so no plugin may be given more.
    pub limits: InstanceLimits,
    pub cache_dir: Option<std::path::PathBuf>,
    /// See [`engine::PoolSizing::concurrency_support`]; `false` in production.
    pub concurrency_support: bool,
    /// See [`engine::MemoryReset`] (`plugin.memory_reset`, `plugin.keep_resident`).
    pub memory_reset: engine::MemoryReset,
    /// See [`engine::PoolSizing::wide_slots`] (`plugin.memory_slots`).
    pub wide_slots: bool,
}

/// The engine, the host functions every plugin is linked against, and the
/// epoch clock that enforces CPU deadlines.
pub struct Runtime {
    engine: Engine,
    broker: Arc<Broker>,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    /// The cap on `config.cache_dir`'s compiled plugins (0: no cache).
    cache_max_size: u64,
    clock: EpochClock,
}

/// Why a plugin could not be loaded. Each is told before the plugin is
/// compiled if its outline shows it (see [`inspect`]); none is cached.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A README, an `app.py`, an HTML error page saved as `.wasm`: said in
    /// words before wasmtime's parser would print its first bytes.
    #[error(
        "plugin {name} is not a valid component: it is not WebAssembly at all (a .wasm \
         file starts with \"\\0asm\"); give the file the plugin's build wrote"
    )]
    NotWasm { name: String },
    #[error(
        "plugin {name} is not a valid component: this is a core WebAssembly module, not a \
         component; build for wasm32-wasip2 or componentize it (e.g. `wasm-tools component \
         new`; see docs/plugins)"
    )]
    CoreModule { name: String },
    #[error(
        "plugin {name} imports {}, which this host does not provide{}; this host serves {}",
        .missing.join(", "),
        wit_hint(.missing),
        inspect::served()
    )]
    MissingImports { name: String, missing: Vec<String> },
    #[error(
        "plugin {name} is not a Wharf handler: it does not export {}/handler (its exports: {}); \
         build it against the handler-world of wit/websocket.wit",
        inspect::WIT_PACKAGE.split('@').next().unwrap_or_default(),
        if .exports.is_empty() { "none".to_owned() } else { .exports.join(", ") }
    )]
    NoHandler { name: String, exports: Vec<String> },
    #[error("plugin {name} is not a valid component: {source:#}")]
    Compile { name: String, source: anyhow::Error },
    #[error("plugin {name} does not implement the wharf:websocket/handler-world world: {source:#}")]
    World { name: String, source: anyhow::Error },
}

/// For an unserved import of this host's own package (another minor
/// version): what to do about it.
fn wit_hint(missing: &[String]) -> String {
    let package = inspect::WIT_PACKAGE.split('@').next().unwrap_or_default();
    match missing
        .iter()
        .find_map(|m| m.strip_prefix(package)?.split_once('@'))
    {
        Some((_, version)) => format!(
            " (the plugin was built against {package}@{version}; rebuild it with the WIT \
             this host serves, wit/websocket.wit, or run a Wharf that serves {version})"
        ),
        None => String::new(),
    }
}

/// Why a call into a plugin instance failed. Every variant kills the instance:
/// its connection is closed with 1011.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("instantiation failed: {0:#}")]
    Instantiate(anyhow::Error),
    #[error("trapped: {0:#}")]
    Trap(anyhow::Error),
    #[error("exceeded its CPU time per event")]
    CpuLimit,
    #[error("exceeded its wall-clock time per event")]
    WallTime,
    #[error("no instance slot free (the pool is exhausted)")]
    PoolExhausted,
    #[error("exceeded its memory limit")]
    MemoryLimit,
    #[error("exceeded its table limit")]
    TableLimit,
    /// `snapshot#restore` refused the state it was given.
    #[error("refused the state to restore: {0}")]
    Restore(String),
}

impl PluginError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Instantiate(_) => "instantiate",
            PluginError::Trap(_) => "trap",
            PluginError::CpuLimit => "cpu",
            PluginError::WallTime => "wall-time",
            PluginError::PoolExhausted => "pool",
            PluginError::MemoryLimit => "memory",
            PluginError::TableLimit => "table",
            PluginError::Restore(_) => "restore",
        }
    }
}

/// Makes the plugin's copy-on-write memory images (on Linux, a memfd per
/// memory, written and sealed) at load, not in the first connection's
/// instantiation, which paid for them (milliseconds for a large data image,
/// as Python's) and answered 500 when the kernel refused the seals for a
/// moment: `F_ADD_SEALS` fails with EBUSY while a page of the memfd is
/// briefly pinned (seen once in CI, 2026-12-03). A few tries; wasmtime makes
/// them again at an instantiation if all of these failed.
fn prepare_memory_images(component: &Component, tenant: &str, name: &str) {
    const TRIES: u32 = 3;
    for attempt in 1..=TRIES {
        match component.initialize_copy_on_write_image() {
            Ok(()) => return,
            Err(e) if attempt < TRIES => {
                tracing::debug!(tenant, plugin = name, error = %e, attempt, "memory image not made; trying again");
                std::thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
            }
            Err(e) => tracing::warn!(
                tenant,
                plugin = name,
                error = %e,
                "cannot make the plugin's memory image now; its first instantiation will try again"
            ),
        }
    }
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        let engine = engine::build(PoolSizing {
            instances: config.max_instances,
            memory_limit: config.limits.memory,
            concurrency_support: config.concurrency_support,
            memory_reset: config.memory_reset,
            wide_slots: config.wide_slots,
        })?;
        let mut linker = Linker::new(&engine);
        // WASI is linked so that components built by ordinary toolchains
        // (which import clocks, random, stdio, ...) instantiate; the context
        // each store gets grants no files, sockets, environment or arguments.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // The world's interfaces one by one: `connection`, `attachment`,
        // `pubsub`, `batch-send`, `packed-send` and `text-batch-send` are this
        // crate's own (see their modules), the others `bindgen!`'s.
        use self::bindings::wharf::websocket::{config, latin1, packed, peers, types};
        types::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        packed::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        config::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        peers::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        latin1::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        connection_host::add_to_linker(&mut linker)?;
        pubsub_host::add_to_linker(&mut linker)?;
        attachment_host::add_to_linker(&mut linker)?;
        batch_send_host::add_to_linker(&mut linker)?;
        packed_send_host::add_to_linker(&mut linker)?;
        packed_words_send_host::add_to_linker(&mut linker)?;
        text_batch_send_host::add_to_linker(&mut linker)?;
        request_host::add_to_linker(&mut linker)?;
        let clock = EpochClock::start(&engine).context("starting the epoch clock's thread")?;
        Ok(Self {
            engine,
            broker: Broker::new(),
            linker,
            config,
            cache_max_size: cache::DEFAULT_MAX_SIZE,
            clock,
        })
    }

    /// Caps the compiled-plugin cache at `bytes` (`plugin.cache_max_size`;
    /// default [`cache::DEFAULT_MAX_SIZE`]); 0: no cache at all.
    pub fn set_cache_max_size(&mut self, bytes: u64) {
        self.cache_max_size = bytes;
    }

    /// The topics of `wharf:websocket/pubsub`, shared by every plugin loaded here.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Reads, compiles (or loads from the cache) and checks a plugin.
    pub fn load_file(&self, path: &Path) -> Result<Plugin, LoadError> {
        let (name, bytes) = read_plugin(path)?;
        self.load(&name, &bytes)
    }

    /// Compiles (or loads from the cache) and checks a plugin from its
    /// bytes, with the runtime's default limits and its name as its scope.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Plugin, LoadError> {
        let spec = PluginSpec {
            tenant: name.into(),
            limits: self.config.limits,
            settings: Arc::default(),
            log: LogBudget::new(DEFAULT_LOG_LINES_PER_SECOND, Default::default()),
            cpu_share: Arc::new(CpuShare::new(0.0)),
            wasi: Arc::default(),
        };
        self.load_for(spec, name, bytes)
    }

    /// [`load`](Self::load) for a tenant: its limits, settings and scope.
    /// Its memory limit is capped at the runtime's (the pool slot size).
    pub fn load_for(
        &self,
        mut spec: PluginSpec,
        name: &str,
        bytes: &[u8],
    ) -> Result<Plugin, LoadError> {
        spec.limits.memory = spec.limits.memory.min(self.config.limits.memory);
        let started = Instant::now();
        // What the outline shows is refused before any compile, and so
        // never cached.
        inspect::check(&self.linker, name, bytes)?;
        let hash = cache::content_hash(bytes);
        let cache = match &self.config.cache_dir {
            Some(dir) if self.cache_max_size > 0 => {
                cache::PluginCache::open(dir, self.cache_max_size)
            }
            _ => None,
        };
        let (component, artifact) = match cache.as_ref().and_then(|c| c.get(&self.engine, &hash)) {
            Some(component) => (component, None),
            None => {
                let (artifact, component) =
                    self.compile(&spec.tenant, name, &hash, bytes, cache.is_some())?;
                (component, Some(artifact))
            }
        };
        let world_error = |source: wasmtime::Error| LoadError::World {
            name: name.into(),
            source: source.into(),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(world_error)?;
        let handler = HandlerExports::find(&pre).map_err(|e| world_error(e.into()))?;
        let batch = batch_handler::find(&pre).map_err(|e| world_error(e.into()))?;
        let packed = packed_handler::find(&pre).map_err(|e| world_error(e.into()))?;
        let words = packed_words_handler::find(&pre).map_err(|e| world_error(e.into()))?;
        let texts = text_batch_handler::find(&pre).map_err(|e| world_error(e.into()))?;
        let snapshot = SnapshotExport::find(&pre).map_err(|e| world_error(e.into()))?;
        let request = request_handler::find(&pre).map_err(|e| world_error(e.into()))?;
        let lifecycle = lifecycle::find(&pre).map_err(|e| world_error(e.into()))?;
        let wasi = component
            .component_type()
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("wasi:"));
        prepare_memory_images(&component, &spec.tenant, name);
        // Accepted: only now is it worth caching.
        if let (Some(cache), Some(artifact)) = (&cache, &artifact) {
            cache.put(&self.engine, &hash, artifact);
        }
        let elapsed = started.elapsed();
        let (origin, message) = match artifact {
            Some(_) => ("compiled", "compiled"),
            None => ("cache", "loaded from the cache"),
        };
        let plugin = Plugin {
            name: name.into(),
            hash,
            pre,
            handler,
            batch,
            packed,
            words,
            texts,
            snapshot,
            request,
            lifecycle,
            wanted: Wanted::default(),
            spec,
            broker: self.broker.clone(),
            clock: self.clock.user(),
        };
        tracing::info!(
            tenant = %plugin.spec.tenant,
            plugin = name,
            sha256 = &plugin.hash[..16],
            origin,
            batched = plugin.batched(),
            packed = plugin.packed.is_some() || plugin.words.is_some(),
            span_words = plugin.words.is_some(),
            text_batches = plugin.texts.is_some(),
            snapshots = plugin.snapshot.is_some(),
            lazy_request = plugin.request.is_some(),
            lifecycle = plugin.lifecycle.is_some(),
            wasi,
            elapsed_ms = elapsed.as_millis() as u64,
            "plugin {name} {message} in {:.1?}",
            elapsed
        );
        Ok(plugin)
    }
}

impl Runtime {
    /// Compiles plugin `name` (the caller checked the cache), saying so
    /// first and every [`COMPILE_PROGRESS`] until done: an interpreter
    /// component takes 15-20 s on 2 cores, which is not a hang.
    fn compile(
        &self,
        tenant: &str,
        name: &str,
        hash: &str,
        bytes: &[u8],
        cached_afterwards: bool,
    ) -> Result<(Vec<u8>, wasmtime::component::Component), LoadError> {
        let note = if cached_afterwards {
            "first time; cached afterwards"
        } else {
            "no cache: compiled at every start"
        };
        tracing::info!(
            tenant,
            plugin = name,
            sha256 = &hash[..16],
            size = bytes.len(),
            "compiling plugin {name} ({note})"
        );
        let started = Instant::now();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    wait.recv_timeout(COMPILE_PROGRESS)
                {
                    tracing::info!(
                        tenant,
                        plugin = name,
                        "still compiling plugin {name} ({} s so far)",
                        started.elapsed().as_secs()
                    );
                }
            });
            let compiled = cache::compile(&self.engine, bytes);
            drop(done);
            compiled
        })
        .map_err(|source| LoadError::Compile {
            name: name.into(),
            source,
        })
    }
}

/// How often a long compile says it is still at it.
const COMPILE_PROGRESS: Duration = Duration::from_secs(5);

/// A plugin file's bytes and its name (the file stem).
pub fn read_plugin(path: &Path) -> Result<(String, Vec<u8>), LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    Ok((name, bytes))
}

/// A compiled, checked plugin, ready to be instantiated for connections.
pub struct Plugin {
    name: Arc<str>,
    hash: String,
    pre: InstancePre<HostState>,
    handler: HandlerExports,
    /// Set if the plugin takes its messages in batches, as a list...
    batch: Option<FuncExport>,
    /// ...or packed (which it gets if it exports both)...
    packed: Option<FuncExport>,
    /// ...or packed with span words (which it gets if it exports it).
    words: Option<FuncExport>,
    /// Set if it takes runs of texts as one string (`on-texts`).
    texts: Option<FuncExport>,
    /// Set if its shared instance's state can move to another version.
    snapshot: Option<SnapshotExport>,
    /// Set if it takes the upgrade request as a handle (`on-request`).
    request: Option<FuncExport>,
    /// Set if it names the lifecycle calls it wants (`lifecycle#wanted`)...
    lifecycle: Option<FuncExport>,
    /// ...and what it answered, once its first instance has been asked.
    wanted: Wanted,
    spec: PluginSpec,
    broker: Arc<Broker>,
    clock: EpochUse,
}

impl Plugin {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tenant the plugin serves.
    pub fn tenant(&self) -> &Arc<str> {
        &self.spec.tenant
    }

    pub fn cpu_share(&self) -> &Arc<CpuShare> {
        &self.spec.cpu_share
    }

    /// The SHA-256 of the component, hex: the plugin's version identity.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether the plugin exports `batch-handler`, `packed-handler`,
    /// `packed-words-handler` or `text-batch-handler` (see
    /// [`PluginInstance::on_batch`]).
    pub fn batched(&self) -> bool {
        self.batch.is_some()
            || self.packed.is_some()
            || self.words.is_some()
            || self.texts.is_some()
    }

    /// Whether the plugin exports `snapshot` (see
    /// [`PluginInstance::save`]).
    pub fn snapshots(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Whether the host makes lifecycle call `call` (`lifecycle#wanted`):
    /// yes unless the plugin declined it. Known from the plugin's first
    /// instance on, so always by the time a connection has one.
    pub fn wants(&self, call: Calls) -> bool {
        self.wanted.wants(call)
    }

    /// What the host keeps for a new connection, outside any instance.
    pub fn new_entry(&self, conn_id: u64) -> ConnectionEntry {
        // What waits in its mailbox is bounded like its send queue.
        let subscriptions =
            Subscriptions::new(self.broker.clone(), self.spec.tenant.clone(), conn_id)
                .with_mailbox_budget(self.spec.limits.send.send_queue);
        ConnectionEntry::new(conn_id, self.spec.limits.send, subscriptions)
    }

    /// The entry a hibernated connection resumes on this plugin with.
    pub fn unpark(&self, parked: Parked) -> ConnectionEntry {
        ConnectionEntry::unpark(parked, self.spec.limits.send)
    }

    /// Creates the store and instance that will serve connection `conn_id`.
    pub async fn instantiate(&self, conn_id: u64) -> Result<PluginInstance, PluginError> {
        self.instantiate_with(conn_id, None).await
    }

    /// Instantiates for a connection: a new one, or (`parked`) one whose
    /// previous instance was released by [`PluginInstance::hibernate`], which
    /// keeps its topics and attachment.
    pub async fn instantiate_with(
        &self,
        conn_id: u64,
        parked: Option<ConnectionEntry>,
    ) -> Result<PluginInstance, PluginError> {
        let limits = self.spec.limits;
        let wasi_source = WasiSource {
            grants: self.spec.wasi.clone(),
            log: self.spec.log.clone(),
            conn: conn_id,
        };
        // Built at the first WASI call (see `WasiSource`), except where
        // building can fail: a directory that cannot be opened refuses the
        // instance now, not at a call that cannot say so.
        let wasi = match &self.spec.wasi.dir {
            Some(_) => Some(Box::new(
                wasi_source
                    .build(&self.spec.tenant)
                    .map_err(|e| PluginError::Instantiate(e.into()))?,
            )),
            None => None,
        };
        // Room for the connection alone: the default first allocation holds
        // four entries (192 bytes of every live connection), which most
        // handlers never use.
        let mut table = ResourceTable::with_capacity(1);
        // A handler holds a handful of host resources (its connection, a
        // few streams); each costs host memory outside its memory limit.
        table.set_max_capacity(MAX_HOST_RESOURCES);
        let entry = parked.unwrap_or_else(|| self.new_entry(conn_id));
        let conn = table
            .push(entry)
            .map_err(|e| PluginError::Instantiate(e.into()))?;
        let mut conns = Conns::default();
        conns.insert(conn_id, conn.rep());
        let state = HostState {
            wasi,
            wasi_source,
            table,
            broker: self.broker.clone(),
            clock: self.clock.clone(),
            tenant: self.spec.tenant.clone(),
            settings: self.spec.settings.clone(),
            max_message_size: limits.send.max_message_size,
            limiter: SandboxLimiter::new(limits.memory, engine::TABLE_ELEMENTS),
            cpu: limits.cpu,
            cpu_used: Duration::ZERO,
            running_since: Arc::new(AtomicU64::new(0)),
            ticked: false,
            movable: false,
            moved: Arc::new(AtomicU8::new(0)),
            share: self.spec.cpu_share.clone(),
            conns,
            current: conn_id,
        };
        let mut store = Store::new(self.pre.component().engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|mut ctx| {
            let state = ctx.data_mut();
            // A running call: the clock must go on.
            state.clock.mark();
            // Time since the call started or last came back from a yield:
            // the wasm it ran and the host calls it made, not the time
            // other connections had the thread.
            state.settle();
            if state.cpu_used >= state.cpu.cpu {
                state.limiter.hit = Some(LimitHit::Cpu);
                return Err(LimitExceeded {
                    what: "CPU time per event",
                    limit: format!("{:?}", state.cpu.cpu),
                }
                .into());
            }
            // Give the worker thread back between ticks, so a plugin that
            // spins cannot starve other connections' I/O. A call that can
            // move leaves for its lane (see `idle_pool`) at once; otherwise
            // a tenant over its CPU share sleeps for about what it ran over.
            let here = idle_pool::current_lane();
            if here == Some(idle_pool::Lane::Long) && state.cpu_used >= idle_pool::LONG_TENANT {
                state.share.ran_long();
            }
            let lane = if !state.movable || here == Some(idle_pool::Lane::Idle) {
                None
            } else if state.share.penalized() {
                Some(idle_pool::Lane::Idle)
            } else if here.is_none() && state.cpu_used >= idle_pool::LONG_CALL {
                Some(idle_pool::Lane::Long)
            } else {
                None
            };
            let pause = match lane {
                Some(lane) => {
                    state.moved.store(lane.flag(), Ordering::Relaxed);
                    Duration::ZERO
                }
                None => state.share.wait().min(MAX_THROTTLE),
            };
            // From here on the call's slices are read off the thread's CPU
            // clock: a call this long is worth a clock read per tick, and on
            // a machine busy with other processes the wall clock would charge
            // it for time the kernel gave them (a 16 MiB echo was cut so).
            state.ticked = true;
            let resumed = state.running_since.clone();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    if pause.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(pause).await;
                    }
                    resumed.store(idle_pool::thread_cpu_micros(), Ordering::Relaxed);
                }),
            ))
        });
        store.set_epoch_deadline(1);
        store.data_mut().begin_call();
        let instance = wall::within(limits.cpu.wall, || self.pre.instantiate_async(&mut store))
            .await
            .map_err(|_| PluginError::WallTime)?
            .map_err(|e| classify(&store, e, PluginError::Instantiate))?;
        let handler = self
            .handler
            .resolve(&mut store, &instance)
            .map_err(|e| PluginError::Instantiate(e.into()))?;
        let on_batch = match (&self.words, &self.packed, &self.batch) {
            (Some(words), _, _) => words.resolve(&mut store, &instance).map(BatchFunc::Words),
            (None, Some(packed), _) => packed.resolve(&mut store, &instance).map(BatchFunc::Packed),
            (None, None, Some(batch)) => batch.resolve(&mut store, &instance).map(BatchFunc::List),
            (None, None, None) => None,
        };
        let on_texts = self
            .texts
            .and_then(|export| export.resolve(&mut store, &instance));
        let snapshot = self
            .snapshot
            .as_ref()
            .and_then(|s| s.resolve(&mut store, &instance));
        let on_request = self
            .request
            .and_then(|export| export.resolve(&mut store, &instance));
        let ask = self
            .lifecycle
            .filter(|_| !self.wanted.known())
            .and_then(|export| export.resolve(&mut store, &instance));
        let mut instance = PluginInstance {
            store,
            handler,
            on_batch,
            on_texts,
            undelivered: 0,
            snapshot,
            on_request,
            conn,
        };
        if let Some(func) = ask {
            let calls = instance.wanted(func).await?;
            tracing::debug!(tenant = %self.spec.tenant, plugin = %self.name, ?calls, "lifecycle calls wanted");
            self.wanted.set(calls);
        }
        Ok(instance)
    }
}

/// Largest `wasi:random` request: enough for any seed, too small to make a
/// host call that runs for long.
const MAX_RANDOM_BYTES: u64 = 64 * 1024;
/// Longest a running call over its tenant's CPU share sleeps at one tick.
const MAX_THROTTLE: Duration = Duration::from_millis(20);
/// Log lines per second of a plugin loaded with [`Runtime::load`].
const DEFAULT_LOG_LINES_PER_SECOND: u32 = 1000;
/// Host resources (connection, streams, pollables) one instance may hold,
/// besides the handles of a shared instance's other connections.
pub const MAX_HOST_RESOURCES: usize = 1024;

/// Everything a plugin instance's store holds.
pub struct HostState {
    /// `None` until the plugin's first WASI call (see [`WasiSource`]).
    wasi: Option<Box<WasiCtx>>,
    wasi_source: WasiSource,
    table: ResourceTable,
    /// Topics, shared by every instance of every plugin.
    broker: Arc<Broker>,
    /// Told of each call, which the clock must tick for.
    clock: EpochUse,
    /// The plugin's tenant: the scope of its topics.
    tenant: Arc<str>,
    /// The tenant's settings (`wharf:websocket/config`).
    settings: Arc<BTreeMap<String, String>>,
    max_message_size: usize,
    limiter: SandboxLimiter,
    cpu: CpuBudget,
    /// CPU time the current call has used, as of its last epoch check.
    cpu_used: Duration,
    /// When the current call last started running: on
    /// [`idle_pool::slice_clock_micros`] until its first tick, on
    /// [`idle_pool::thread_cpu_micros`] after (see `ticked`); shared with
    /// the yield future, which resets it on resuming.
    running_since: Arc<AtomicU64>,
    /// Whether the current call has reached an epoch tick: its slices
    /// since are read off the thread's CPU clock, not the slice clock.
    ticked: bool,
    /// Whether the current call may move to the idle pool (see
    /// [`PluginInstance::movable`]).
    movable: bool,
    /// Set at the tick where a movable call should move: the
    /// [`idle_pool::Lane::flag`] of where to.
    moved: Arc<AtomicU8>,
    /// The tenant's CPU share, charged with what the calls run.
    share: Arc<CpuShare>,
    /// The connections this instance serves (one, unless it is shared):
    /// connection id to its entry's handle, for `wharf:websocket/peers`.
    conns: Conns,
    /// The connection the current call is for (its publishes are charged
    /// to its rate).
    current: u64,
}

/// The connections an instance serves, connection id to its entry's
/// handle: the first inline (an own instance serves one, and a map of one
/// would be an allocation in every live connection), a shared instance's
/// others in a map.
#[derive(Default)]
struct Conns {
    first: Option<(u64, u32)>,
    rest: IdMap<u32>,
}

impl Conns {
    fn get(&self, id: u64) -> Option<u32> {
        match self.first {
            Some((first, rep)) if first == id => Some(rep),
            _ => self.rest.get(&id).copied(),
        }
    }

    fn insert(&mut self, id: u64, rep: u32) {
        match self.first {
            None if !self.rest.contains_key(&id) => self.first = Some((id, rep)),
            Some((first, _)) if first == id => self.first = Some((id, rep)),
            _ => {
                self.rest.insert(id, rep);
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<u32> {
        match self.first {
            Some((first, rep)) if first == id => {
                self.first = None;
                Some(rep)
            }
            _ => self.rest.remove(&id),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn reps(&self) -> impl Iterator<Item = u32> + '_ {
        self.first
            .map(|(_, rep)| rep)
            .into_iter()
            .chain(self.rest.values().copied())
    }
}

impl HostState {
    /// Starts a call's accounting: no CPU time used, on the slice clock.
    fn begin_call(&mut self) {
        self.clock.mark();
        self.cpu_used = Duration::ZERO;
        self.ticked = false;
        self.running_since
            .store(self.clock_micros(), Ordering::Relaxed);
    }

    /// The current call's clock, in microseconds (see `ticked`).
    fn clock_micros(&self) -> u64 {
        if self.ticked {
            idle_pool::thread_cpu_micros()
        } else {
            idle_pool::slice_clock_micros()
        }
    }

    /// Adds the time run since the call started or resumed to the call's
    /// CPU time and to the tenant's share.
    fn settle(&mut self) {
        let now = self.clock_micros();
        let since = self.running_since.swap(now, Ordering::Relaxed);
        let ran = Duration::from_micros(now.saturating_sub(since));
        self.cpu_used += ran;
        self.share.charge(ran);
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let (source, tenant) = (&self.wasi_source, &self.tenant);
        WasiCtxView {
            ctx: self.wasi.get_or_insert_with(|| {
                // Only a directory grant can fail, and that context was
                // built with the instance; were that ever not so, a
                // context that grants nothing.
                Box::new(source.build(tenant).unwrap_or_else(|_| {
                    let mut none = WasiCtx::builder();
                    none.wall_clock(Epoch).max_random_size(0);
                    none.build()
                }))
            }),
            table: &mut self.table,
        }
    }
}

/// What a store's WASI context is built from, at the plugin's first WASI
/// call: a handler that makes none (most handlers, on most connections:
/// the bundled echo on all) spares its connection the context's log
/// streams, random generators and clocks, about 20 allocations and their
/// frees.
struct WasiSource {
    grants: Arc<WasiGrants>,
    log: Arc<LogBudget>,
    /// The connection whose log lines the streams tag (a shared instance's
    /// first).
    conn: u64,
}

impl WasiSource {
    /// The context: what the tenant grants, and no more.
    fn build(&self, tenant: &Arc<str>) -> wasmtime::Result<WasiCtx> {
        let (stdout, stderr) = LogStream::pair(tenant.clone(), self.conn, self.log.clone());
        let mut wasi = WasiCtx::builder();
        wasi.stdout(stdout)
            .stderr(stderr)
            // A handler needs a few random bytes (hash seeds), not a host
            // call that copies megabytes.
            .max_random_size(MAX_RANDOM_BYTES)
            .envs(&self.grants.env);
        if !self.grants.wall_clock {
            wasi.wall_clock(Epoch);
        }
        if let Some(dir) = &self.grants.dir {
            wasi.preopened_dir(dir, WASI_DIR, wasmtime_wasi::FsPerms::ReadOnly)?;
        }
        Ok(wasi.build())
    }
}

/// Turns a failed call's error into why the instance died.
fn classify(
    store: &Store<HostState>,
    err: wasmtime::Error,
    other: fn(anyhow::Error) -> PluginError,
) -> PluginError {
    match store.data().limiter.hit {
        Some(LimitHit::Cpu) => PluginError::CpuLimit,
        Some(LimitHit::Memory) => PluginError::MemoryLimit,
        Some(LimitHit::Table) => PluginError::TableLimit,
        None if err.is::<wasmtime::PoolConcurrencyLimitError>() => PluginError::PoolExhausted,
        None => other(anyhow::Error::from(err)),
    }
}

/// The export a batch goes to.
#[derive(Clone, Copy, Debug)]
enum BatchFunc {
    /// `batch-handler#on-messages`.
    List(Func),
    /// `packed-handler#on-packed`.
    Packed(Func),
    /// `packed-words-handler#on-packed-words`.
    Words(Func),
}

/// What a failed instance leaves ([`PluginInstance::salvage`]): the
/// calling connection's queued frames, which the driver delivers ahead of
/// its 1011 (sends the host accepted are not taken back, and a frame a
/// large send began on the wire must be finished or the stream is
/// corrupt), how many messages it had queued for the other connections
/// of a shared instance, lost with it and counted, and how many messages
/// of the batch it was given never reached it (a batch the host cut into
/// several calls, after the one that failed), counted as dropped.
#[derive(Debug, Default)]
pub struct Salvage {
    pub frames: FrameBatch,
    pub lost: u64,
    pub undelivered: usize,
}

impl Salvage {
    /// Every send it holds, for a caller that can deliver none.
    pub fn messages(mut self) -> u64 {
        let (text, binary) = self.frames.take_tally();
        text.messages + binary.messages + self.lost
    }
}

/// One connection's plugin instance: its store, its exports and its
/// connection handle.
pub struct PluginInstance {
    store: Store<HostState>,
    handler: HandlerFuncs,
    /// How the plugin takes a batch, if it takes batches...
    on_batch: Option<BatchFunc>,
    /// ...and a batch's runs of texts, if it takes them as one string.
    on_texts: Option<Func>,
    /// Messages the last failed batch left undelivered.
    undelivered: usize,
    /// `snapshot#save` and `#restore`, if the plugin exports them.
    snapshot: Option<SnapshotFuncs>,
    /// `request-handler#on-request`, if the plugin exports it.
    on_request: Option<Func>,
    conn: Resource<ConnectionEntry>,
}

impl PluginInstance {
    /// Releases the instance (its store, memory and pool slot), keeping what
    /// the connection needs to resume: topics, attachment (see
    /// [`Plugin::instantiate_with`]).
    pub fn hibernate(mut self) -> Option<ConnectionEntry> {
        self.store.data_mut().table.delete(self.conn).ok()
    }

    /// Serves another connection too (a shared instance): its entry joins
    /// the store. `false` if the store has no room for it.
    pub fn attach(&mut self, entry: ConnectionEntry) -> bool {
        let id = entry.id();
        let state = self.store.data_mut();
        // Each member brings its own handle: the cap is on what the plugin
        // makes itself, and the tenant's connection limit bounds members.
        state
            .table
            .set_max_capacity(MAX_HOST_RESOURCES + state.conns.len());
        match state.table.push(entry) {
            Ok(conn) => {
                state.conns.insert(id, conn.rep());
                true
            }
            Err(_) => false,
        }
    }

    /// Makes connection `id` the one the next calls are for; `false` if
    /// the instance does not serve it.
    pub fn select(&mut self, id: u64) -> bool {
        let state = self.store.data_mut();
        match state.conns.get(id) {
            Some(rep) => {
                state.current = id;
                self.conn = Resource::new_own(rep);
                true
            }
            None => false,
        }
    }

    /// Stops serving connection `id` (a shared instance): its entry leaves
    /// the store, with its topics.
    pub fn detach(&mut self, id: u64) -> Option<ConnectionEntry> {
        let state = self.store.data_mut();
        let rep = state.conns.remove(id)?;
        state
            .table
            .set_max_capacity(MAX_HOST_RESOURCES + state.conns.len().saturating_sub(1));
        state.table.delete(Resource::new_own(rep)).ok()
    }

    /// The instance failed and is about to be dropped; what its outboxes
    /// hold is taken first. See [`Salvage`].
    pub fn salvage(&mut self) -> Salvage {
        let current = self.conn.rep();
        let state = self.store.data_mut();
        let (mut frames, mut lost) = (FrameBatch::default(), 0);
        for rep in state.conns.reps() {
            let Ok(entry) = state
                .table
                .get_mut(&Resource::<ConnectionEntry>::new_own(rep))
            else {
                continue;
            };
            // The last call's connection, unless it has left the (shared)
            // instance since: a migrate salvages between calls.
            if rep == current {
                frames = entry.outbox.take_frames();
            } else {
                lost += entry.outbox.discard();
            }
        }
        Salvage {
            frames,
            lost,
            undelivered: self.undelivered,
        }
    }

    /// The connection's queued sends, with the driver's view of the socket.
    pub fn connection(&mut self) -> &mut ConnectionEntry {
        // An own instance's entry lives as long as its store; a shared
        // instance's current one is the connection just selected, under
        // the lock, for the call being made (members that left are gone,
        // which is why `salvage` does not come through here).
        self.store
            .data_mut()
            .table
            .get_mut(&self.conn)
            .expect("connection entry lives as long as its store")
    }

    /// Lets the next call move off the workers at a tick (see
    /// [`idle_pool`]): to the idle lane once its tenant is over its CPU
    /// share, to the long lane once it has run [`idle_pool::LONG_CALL`].
    /// The caller owns the call's future and runs it with
    /// [`idle_pool::run_movable`] and the flag returned.
    pub fn movable(&mut self) -> Arc<AtomicU8> {
        let state = self.store.data_mut();
        state.movable = true;
        state.moved.store(0, Ordering::Relaxed);
        state.moved.clone()
    }

    fn arm(&mut self) -> Resource<ConnectionEntry> {
        self.store.data_mut().begin_call();
        self.store.set_epoch_deadline(1);
        Resource::new_borrow(self.conn.rep())
    }

    fn finish<R>(&mut self, result: wasmtime::Result<R>) -> Result<R, PluginError> {
        result.map_err(|e| classify(&self.store, e, PluginError::Trap))
    }

    fn finish_within<R>(
        &mut self,
        result: Result<wasmtime::Result<R>, wall::Elapsed>,
    ) -> Result<R, PluginError> {
        match result {
            Ok(r) => {
                // The time since the last tick, for the tenant's CPU share.
                let state = self.store.data_mut();
                state.settle();
                state.movable = false;
                self.finish(r)
            }
            // Abandoned: it was waiting (a blocked wasi:io/poll), since a
            // running call is checked at every tick.
            Err(_) => Err(PluginError::WallTime),
        }
    }

    /// The wall-clock bound of one call: past it the call is abandoned
    /// (wasmtime unwinds its fiber) and the instance must not be used again.
    fn wall(&self) -> Duration {
        self.store.data().cpu.wall
    }

    /// `lifecycle#wanted`, under the limits of one event.
    async fn wanted(&mut self, func: Func) -> Result<Calls, PluginError> {
        self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || lifecycle::call(&mut self.store, func)).await;
        self.finish_within(r)
    }

    /// The upgrade: `on-request` with the request lent as a handle if the
    /// plugin exports it, else `on-upgrade` with it lowered as a record.
    pub async fn on_upgrade(
        &mut self,
        request: RequestEntry,
    ) -> Result<UpgradeResponse, PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let (store, handler, on_request) = (&mut self.store, self.handler, self.on_request);
        let r = wall::within(wall, || async move {
            match on_request {
                Some(func) => request_handler::call(store, func, conn, request).await,
                None => handler.on_upgrade(store, conn, &request.record()).await,
            }
        })
        .await;
        self.finish_within(r)
    }

    pub async fn on_open(&mut self) -> Result<(), PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || self.handler.on_open(&mut self.store, conn)).await;
        self.finish_within(r)
    }

    pub async fn on_text(&mut self, text: &str) -> Result<(), PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || self.handler.on_text(&mut self.store, conn, text)).await;
        self.finish_within(r)
    }

    pub async fn on_binary(&mut self, data: &[u8]) -> Result<(), PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || self.handler.on_binary(&mut self.store, conn, data)).await;
        self.finish_within(r)
    }

    /// `on-binary` with a payload still masked, unmasked as it is copied
    /// into the plugin's memory.
    pub async fn on_masked_binary(&mut self, data: Masked<'_>) -> Result<(), PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || {
            self.handler.on_masked_binary(&mut self.store, conn, data)
        })
        .await;
        self.finish_within(r)
    }

    /// One message: `on-text` or `on-binary`.
    pub async fn on_message(&mut self, message: Message<'_>) -> Result<(), PluginError> {
        match message {
            Message::Text(text) => self.on_text(text).await,
            Message::Binary(data) => self.on_binary(data).await,
        }
    }

    /// Messages that arrived together. A plugin that exports
    /// `text-batch-handler` gets each run of two or more texts in one
    /// `on-texts` call and the messages between runs as below; a batch of
    /// one message is one `on-text`/`on-binary` call.
    /// If a call fails, how many messages of the batch it left undelivered
    /// and the replies of the calls before it, and its own, are what
    /// [`salvage`](Self::salvage) takes.
    pub async fn on_batch(&mut self, batch: BatchRef<'_>) -> Result<(), PluginError> {
        self.undelivered = 0;
        let Some(func) = self.on_texts.filter(|_| batch.len() > 1) else {
            return self.on_messages(batch).await;
        };
        let mut left = batch.len();
        for (texts, run) in batch.runs() {
            left -= run.len();
            let r = if texts {
                self.on_texts(func, run).await
            } else {
                self.on_messages(run).await
            };
            if r.is_err() {
                self.undelivered += left;
                return r;
            }
        }
        Ok(())
    }

    /// A run of texts, in one `on-texts` call.
    async fn on_texts(&mut self, func: Func, run: BatchRef<'_>) -> Result<(), PluginError> {
        let (texts, lens) = run.texts().map_err(|e| {
            self.undelivered += run.len();
            PluginError::Trap(e.into())
        })?;
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || {
            text_batch_handler::call(&mut self.store, func, conn, texts, lens)
        })
        .await;
        self.finish_within(r)
    }

    /// Messages in one call: `on-packed-words`, `on-packed` or
    /// `on-messages`. A plugin without
    /// either export, or a batch of one message, gets one
    /// `on-text`/`on-binary` call each.
    async fn on_messages(&mut self, batch: BatchRef<'_>) -> Result<(), PluginError> {
        let func = self.on_batch.filter(|_| batch.len() > 1);
        // Cut before any call starts: a batch put together wrongly is the
        // host's failure, not the call's.
        let messages = match func {
            Some(BatchFunc::Packed(_) | BatchFunc::Words(_)) => Vec::new(),
            _ => batch.messages().map_err(|e| {
                self.undelivered += batch.len();
                PluginError::Trap(e.into())
            })?,
        };
        let Some(func) = func else {
            let mut left = messages.len();
            for message in messages {
                left -= 1;
                if let Err(err) = self.on_message(message).await {
                    self.undelivered += left;
                    return Err(err);
                }
            }
            return Ok(());
        };
        let conn = self.arm();
        let wall = self.wall();
        let r = match func {
            BatchFunc::Packed(func) => {
                wall::within(wall, || {
                    packed_handler::call(&mut self.store, func, conn, batch)
                })
                .await
            }
            BatchFunc::Words(func) => {
                wall::within(wall, || {
                    packed_words_handler::call(&mut self.store, func, conn, batch)
                })
                .await
            }
            BatchFunc::List(func) => {
                wall::within(wall, || {
                    batch_handler::call(&mut self.store, func, conn, &messages)
                })
                .await
            }
        };
        self.finish_within(r)
    }

    pub async fn on_close(
        &mut self,
        code: u16,
        reason: &str,
        clean: bool,
    ) -> Result<(), PluginError> {
        let conn = self.arm();
        let wall = self.wall();
        let r = wall::within(wall, || {
            self.handler
                .on_close(&mut self.store, conn, code, reason, clean)
        })
        .await;
        self.finish_within(r)
    }
}

#[cfg(test)]
mod tests {
    use super::Conns;

    #[test]
    fn conns_keep_the_first_inline_and_the_rest_mapped() {
        let mut conns = Conns::default();
        conns.insert(7, 1);
        assert!(conns.rest.is_empty());
        conns.insert(8, 2);
        conns.insert(9, 3);
        assert_eq!(
            (conns.get(7), conns.get(8), conns.get(9)),
            (Some(1), Some(2), Some(3))
        );
        assert_eq!(conns.len(), 3);
        // The first leaves; a later one takes its place only if new.
        assert_eq!(conns.remove(7), Some(1));
        assert_eq!(conns.get(7), None);
        conns.insert(8, 4);
        assert_eq!((conns.first, conns.get(8)), (None, Some(4)));
        conns.insert(10, 5);
        assert_eq!(conns.first, Some((10, 5)));
        assert_eq!(conns.remove(8), Some(4));
        assert_eq!(conns.remove(8), None);
        assert_eq!(conns.len(), 2);
    }
}
