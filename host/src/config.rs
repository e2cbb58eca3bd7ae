//! `wharf.toml`: what a server listens on, its protocol limits and its plugin.
//!
//! Every key has a default, so an empty file (or none at all) is a working
//! server. Unknown keys are errors: a typo must not silently fall back to a
//! default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Sockets to accept WebSocket connections on (`[[listener]]` tables).
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Server-wide limits (`[server]`).
    pub server: ServerConfig,
    /// RFC 6455 protocol limits and timers (`[websocket]`).
    pub websocket: WebSocketConfig,
    /// The handler component and its sandbox limits (`[plugin]`).
    pub plugin: PluginConfig,
    /// The admin API: health, metrics, tenants and hot swap (`[admin]`).
    pub admin: AdminConfig,
    /// Files served to plain HTTP GETs on the WebSocket listeners (`[static_files]`).
    pub static_files: StaticFilesConfig,
    /// Tenants (`[[tenant]]` tables): each its own plugin, routes, limits and
    /// settings. None: one tenant named `default`, on every route, running
    /// `[plugin]`'s handler.
    #[serde(rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
}

/// The name of the tenant `[plugin]` describes when there are no `[[tenant]]`s.
pub const DEFAULT_TENANT: &str = "default";

/// One tenant: whose handler serves which routes, within which limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// `[a-z0-9-]{1,63}`, unique: the tenant's name in logs, metrics and
    /// the admin API, and the scope of its topics.
    pub name: String,
    /// The tenant's handler component (`.wasm`).
    pub plugin: PathBuf,
    /// `HOST/PATH-PREFIX` or `/PATH-PREFIX` (any host); see the README.
    pub routes: Vec<String>,
    /// One instance per connection, or one for all of them.
    #[serde(default)]
    pub instance: InstanceMode,
    /// Origins whose pages may open connections (exact, or `*.` wildcards,
    /// or `"*"` for any). Unset: `[plugin]`'s, by default same-origin.
    pub allowed_origins: Option<Vec<String>>,
    /// Overrides of the server-wide defaults, key by key.
    #[serde(default)]
    pub limits: TenantLimits,
    /// Read by the plugin through `wharf:websocket/config`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// WASI capabilities granted beyond the defaults. Unset: `[plugin]`'s.
    pub wasi: Option<WasiGrants>,
    /// Redeploy the tenant (policy `drain`) when its plugin file changes
    /// (`serve --watch` does it for every tenant).
    #[serde(default)]
    pub watch: bool,
}

/// WASI capabilities a tenant's plugin is granted. By default no
/// environment variables and no files; the clocks and random (capped) are
/// there, since every language runtime reads them as it starts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WasiGrants {
    /// Environment variables the plugin sees, by name, with the server's
    /// values (a name the server does not have is left out).
    pub env: Vec<String>,
    /// A directory the plugin may read (not write), as `/data`.
    pub dir: Option<PathBuf>,
    /// `false`: the wall clock reads the Unix epoch, always (the monotonic
    /// clock, which timeouts need, still runs), so a plugin cannot learn
    /// the date or stamp anything with it.
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

/// How a tenant's connections map onto plugin instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceMode {
    /// Each connection its own instance (its globals are its state).
    #[default]
    PerConnection,
    /// One instance serves all of the tenant's connections.
    Shared,
}

/// How a finished instance's pool slot is made fresh for the next
/// instance (`plugin.memory_reset`; see `runtime::engine::MemoryReset`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryResetMode {
    /// Return the slot's pages to the OS; the next instance faults them in.
    #[default]
    Decommit,
    /// Restore the pages the instance wrote where they are (`PAGEMAP_SCAN`,
    /// Linux 6.7); only for a process that cannot swap.
    InPlace,
}

/// How much address space each pool slot of plugin memory reserves
/// (`plugin.memory_slots`; see `runtime::engine::WIDE_RESERVATION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemorySlotsMode {
    /// The memory limit rounded up (256 MiB at least): every access is
    /// bounds-checked.
    #[default]
    Compact,
    /// 4 GiB: no bounds checks, more page tables.
    Wide,
}

/// How connections are spread over the worker threads
/// (`server.scheduling`; see `server::cores`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduling {
    /// One runtime whose workers take queued tasks from each other
    /// (tokio's multi-thread runtime): a worker the OS preempts does not
    /// hold up its connections.
    #[default]
    WorkStealing,
    /// Each worker a runtime of its own with its own accept loops: a
    /// connection stays on the worker that accepted it. Less work per
    /// message, for workers that have their cores to themselves.
    PerCore,
}

/// A tenant's limits. Each key unset takes the server-wide value of the
/// same name (`[plugin]`, `[websocket]`, `[server]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// `[plugin] memory_limit`.
    pub memory_limit: Option<ByteSize>,
    /// `[plugin] cpu_time_per_event`.
    #[serde(with = "humantime_serde::option")]
    pub cpu_time_per_event: Option<Duration>,
    /// `[plugin] wall_time_per_event`.
    #[serde(with = "humantime_serde::option")]
    pub wall_time_per_event: Option<Duration>,
    /// `[server] max_connections`: the tenant's open connections.
    pub max_connections: Option<u32>,
    /// `[websocket] max_message_size`.
    pub max_message_size: Option<ByteSize>,
    /// `[websocket] max_frame_size`.
    pub max_frame_size: Option<ByteSize>,
    /// `[websocket] send_queue`.
    pub send_queue: Option<ByteSize>,
    /// `[websocket] messages_per_second`.
    pub messages_per_second: Option<u32>,
    /// `[websocket] bytes_per_second`.
    pub bytes_per_second: Option<ByteSize>,
    /// `[plugin] log_lines_per_second`.
    pub log_lines_per_second: Option<u32>,
    /// `[plugin] cpu_share`.
    pub cpu_share: Option<f64>,
}

/// One listening socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `ip:port` to bind, e.g. `"127.0.0.1:8080"` or `"[::]:443"`.
    #[serde(deserialize_with = "socket_addr::deserialize")]
    pub address: SocketAddr,
    /// Serve `wss://` with this certificate and key; plain `ws://` if absent.
    pub tls: Option<TlsConfig>,
}

/// PEM files for a `wss` listener: the default certificate, and more chosen
/// by the name the client asks for (SNI).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first (PEM); served when no `sni` entry
    /// matches the client's server name (or it sent none).
    pub cert: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Further certificates, each for the server names it lists.
    #[serde(default)]
    pub sni: Vec<SniCertificate>,
}

/// A certificate served to clients that ask for one of its names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// Server names, e.g. `"acme.example.com"` or `"*.acme.example.com"`
    /// (one or more labels). Matched case-insensitively: an exact name
    /// first, then the longest matching wildcard.
    pub names: Vec<String>,
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Server-wide limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Connections served at once (each holds one plugin instance); further
    /// upgrade requests are answered 503.
    pub max_connections: u32,
    /// Time a connection has from its accept to being open: the TLS
    /// handshake, the upgrade request, the plugin's upgrade and the 101.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections in their handshake at once; past it the oldest is
    /// dropped, so sockets that never speak cannot take every file
    /// descriptor. Keep it well under the process's descriptor limit.
    pub max_pending_handshakes: usize,
    /// Handshakes at once from one client address (an IPv6 client by its
    /// /64); past it a new connection from that address is closed at once.
    /// `0`: no cap.
    pub max_pending_per_address: usize,
    /// Open connections from one client address (an IPv6 client by its
    /// /64); past it the upgrade gets 503. `0` (the default): no cap, as
    /// many clients can share one address behind a NAT.
    pub max_connections_per_address: usize,
    /// Bytes all connections together may hold for their peers: read
    /// buffers, messages being assembled, send queues. Past it, a
    /// connection holding more than 128 KiB stops reading until it falls
    /// below again (backpressure); one that waits longer than
    /// `buffered_wait` is closed with 1013. `"0B"`: no budget.
    pub max_buffered: ByteSize,
    /// How long a connection may wait for the `max_buffered` budget.
    #[serde(with = "humantime_serde")]
    pub buffered_wait: Duration,
    /// Largest upgrade request (request line and headers) accepted; larger is 431.
    pub max_request_size: ByteSize,
    /// Most header lines in an upgrade request; more is 431.
    pub max_request_headers: usize,
    /// On SIGINT/SIGTERM, time given to connections to finish their closing
    /// handshakes (after 1001 "going away") before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A swap with the `restart` policy closes open connections with 1012
    /// at moments spread over this long, so clients do not all reconnect
    /// at once.
    #[serde(with = "humantime_serde")]
    pub restart_window: Duration,
    /// How connections are spread over the worker threads when there are
    /// several.
    pub scheduling: Scheduling,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            max_pending_handshakes: 1024,
            max_pending_per_address: 256,
            max_connections_per_address: 0,
            max_buffered: ByteSize::gib(1),
            buffered_wait: Duration::from_secs(10),
            max_request_size: ByteSize::kib(16),
            max_request_headers: 64,
            shutdown_timeout: Duration::from_secs(10),
            restart_window: Duration::from_secs(10),
            scheduling: Scheduling::WorkStealing,
        }
    }
}

/// RFC 6455 limits and timers, per connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest frame payload accepted; a larger announced length closes with 1009
    /// before any of the payload is buffered.
    pub max_frame_size: ByteSize,
    /// Largest message (all fragments) accepted, and largest a plugin may send;
    /// over it: 1009 (incoming) or `message-too-big` (outgoing).
    pub max_message_size: ByteSize,
    /// Outgoing messages longer than this are sent as several frames. Unset: never.
    pub fragment_size: Option<ByteSize>,
    /// High-water mark of a connection's unsent output; while it is exceeded the
    /// plugin's sends fail with `queue-full` and the host stops reading.
    pub send_queue: ByteSize,
    /// How long a connection's send queue may stay full (the peer reads
    /// slower than the plugin writes; the plugin's sends get `queue-full`
    /// meanwhile), or its queued output wait with none of it written (the
    /// peer reads nothing), before the connection is closed with 1008.
    #[serde(with = "humantime_serde")]
    pub send_queue_grace: Duration,
    /// Send a Ping after this long without hearing from the peer. `"0s"`: never.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Close with 1001 after this long without hearing from the peer. `"0s"`: never.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time the peer has to answer our Close frame before the socket is dropped.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Messages a connection may send per second, with a burst of one
    /// second's worth (token bucket); over it: close 1008. `0`: no limit.
    pub messages_per_second: u32,
    /// Payload bytes a connection may send per second, likewise. `"0B"`: no limit.
    pub bytes_per_second: ByteSize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            max_frame_size: ByteSize::mib(16),
            max_message_size: ByteSize::mib(16),
            fragment_size: None,
            send_queue: ByteSize::mib(4),
            send_queue_grace: Duration::from_secs(30),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            close_timeout: Duration::from_secs(5),
            messages_per_second: 0,
            bytes_per_second: ByteSize::b(0),
        }
    }
}

/// The handler component.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginConfig {
    /// Path to the handler component (`.wasm`). Unset: the bundled echo handler.
    pub path: Option<PathBuf>,
    /// Most linear memory one instance (one connection) may use; growing past
    /// it traps, which closes that connection with 1011.
    pub memory_limit: ByteSize,
    /// CPU time one event call (`on-text`, …) may use, host calls it makes
    /// included, before it is interrupted and its connection closed with 1011.
    #[serde(with = "humantime_serde")]
    pub cpu_time_per_event: Duration,
    /// Wall-clock time one event call may take, waits included (a plugin
    /// blocked in `wasi:io/poll`, e.g. a sleep, uses no CPU); over it the
    /// call is abandoned and its connection closed with 1011. Unset: twice
    /// `cpu_time_per_event`, and at least 1 s.
    #[serde(with = "humantime_serde::option")]
    pub wall_time_per_event: Option<Duration>,
    /// CPU a tenant's plugin calls may use across all its connections, in
    /// cores (CPU seconds per second, a one-second burst): over it, its
    /// events wait and its new upgrades get 503. `0`: no limit. Unset:
    /// none with one tenant; with several, half the machine's cores (at
    /// least one) each, so that no tenant can take them all.
    pub cpu_share: Option<f64>,
    /// Lines a tenant's instances may write to stdout and stderr per
    /// second, all together; the rest are dropped and counted
    /// (`wharf_plugin_log_dropped_total`).
    pub log_lines_per_second: u32,
    /// Origins whose pages may open connections: exact origins
    /// (`"https://app.example.com"`), `*.` wildcards
    /// (`"https://*.example.com"`), or `"*"` for any. Unset: same-origin
    /// (see the README). A request without `Origin` (not from a browser)
    /// is always allowed.
    pub allowed_origins: Option<Vec<String>>,
    /// Settings of the `default` tenant (with no `[[tenant]]`s), read by the
    /// plugin through `wharf:websocket/config`.
    pub settings: BTreeMap<String, String>,
    /// WASI capabilities every tenant's plugin is granted, unless its own
    /// `[tenant.wasi]` says otherwise. Default: none.
    pub wasi: WasiGrants,
    /// Release a connection's instance after this long without an event
    /// (hibernation): the host keeps the socket, the protocol state, the
    /// topics and the attachment, and instantiates afresh on the next event.
    /// `"0s"`: never.
    #[serde(with = "humantime_serde")]
    pub hibernate_after: Duration,
    /// How a finished instance's linear memory is made fresh for the next
    /// instance in its pool slot (maybe another tenant's); one setting for
    /// the whole server, whose tenants share the pool. `"decommit"`
    /// (default): the pages go back to the OS and the next instance faults
    /// in again each page it touches (4 faults for the bundled echo).
    /// `"in-place"`: the pages the instance wrote are found
    /// (`PAGEMAP_SCAN`, Linux 6.7 or later) and restored where they are, no
    /// fault and no `madvise`: about a fifth less server CPU per
    /// connection (`cargo bench --bench echo -- --scenario connect
    /// --in-place`), but each slot used so far keeps up to `keep_resident`
    /// of written pages resident, so RSS after a peak of instances stays
    /// up by that much per instance of the peak. Refused at start-up
    /// unless the process cannot swap (no swap device, or a cgroup with
    /// `memory.swap.max = 0`): wasmtime 48's scan misses a written page
    /// that was swapped out, and the next instance would read it.
    pub memory_reset: MemoryResetMode,
    /// With `"decommit"`, how many bytes from the start of a finished
    /// instance's linear memory its slot keeps mapped and zeroes in place
    /// (a memset of all of them, touched or not); default 0: a plugin
    /// whose stack comes first (Rust's and wasm-ld's usual layout) never
    /// touches its first 64 KiB, so keeping them only adds RSS. With
    /// `"in-place"`, the most bytes of written pages a slot keeps and
    /// restores (the rest go back to the OS); default 256 KiB. Tables are
    /// kept either way (see the engine).
    pub keep_resident: Option<ByteSize>,
    /// How much address space each slot of the instance pool reserves for
    /// a plugin's linear memory; one setting for the whole server.
    /// `"compact"` (default): `memory_limit` rounded up to a power of two,
    /// at least 256 MiB, and the compiled code checks every memory access
    /// against the bound. `"wide"`: 4 GiB, which a 32-bit index cannot
    /// leave, so the code checks none: 6% less CPU a message for the
    /// QuickJS echo and 10% for Python's (shared instances; compiled Rust
    /// gains little), for 3 KiB more of the kernel's page tables per live
    /// instance (each slot its own) and 8 GiB of address space per
    /// connection (`VmSize` 80 TiB at 10,000; never touched). Past about
    /// 12,000 `max_connections`, or if the system refuses to reserve that
    /// much (an `RLIMIT_AS`), slots are compact, with a warning.
    pub memory_slots: MemorySlotsMode,
    /// Where compiled plugins are cached. Unset: `$XDG_CACHE_HOME/wharf`,
    /// else `$HOME/.cache/wharf`, else no cache. Only the server may write here:
    /// a cached artifact is trusted native code.
    pub cache_dir: Option<PathBuf>,
    /// Most the cache directory may hold: after each compile, the least
    /// recently used plugins are removed until the rest fit. `"0B"`: no
    /// cache (every start compiles).
    pub cache_max_size: ByteSize,
}

impl PluginConfig {
    /// `keep_resident`, or its default for `memory_reset`.
    pub fn keep_resident(&self) -> ByteSize {
        self.keep_resident.unwrap_or(match self.memory_reset {
            MemoryResetMode::Decommit => ByteSize::b(0),
            MemoryResetMode::InPlace => ByteSize::kib(256),
        })
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            path: None,
            memory_limit: ByteSize::mib(64),
            cpu_time_per_event: Duration::from_millis(200),
            wall_time_per_event: None,
            log_lines_per_second: 1000,
            cpu_share: None,
            allowed_origins: None,
            settings: BTreeMap::new(),
            wasi: WasiGrants::default(),
            hibernate_after: Duration::ZERO,
            memory_reset: MemoryResetMode::Decommit,
            keep_resident: None,
            memory_slots: MemorySlotsMode::Compact,
            cache_dir: None,
            cache_max_size: ByteSize::gib(1),
        }
    }
}

/// The admin API (`crate::admin`): health and readiness, `GET /metrics`
/// (OpenMetrics), the tenants' status and the hot swap of their plugins.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `ip:port` to serve it on. Unset: no admin endpoint.
    #[serde(deserialize_with = "socket_addr::deserialize_option")]
    pub listen: Option<SocketAddr>,
    /// A file whose content (trimmed) is the bearer token the API asks for;
    /// the environment variable `WHARF_ADMIN_TOKEN` overrides it. With
    /// neither, deploys and rollbacks are refused (403) and `/tenants` and
    /// `/metrics` are open. An unreadable or empty file stops start-up.
    pub token_file: Option<PathBuf>,
    /// Largest component a deploy may upload (or name); larger is 413.
    pub max_upload_size: ByteSize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            token_file: None,
            max_upload_size: ByteSize::mib(64),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listeners: vec![ListenerConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 8080)),
                tls: None,
            }],
            server: ServerConfig::default(),
            websocket: WebSocketConfig::default(),
            plugin: PluginConfig::default(),
            admin: AdminConfig::default(),
            static_files: StaticFilesConfig::default(),
            tenants: Vec::new(),
        }
    }
}

/// A directory whose files answer plain HTTP `GET`/`HEAD` requests (those
/// without `Upgrade: websocket`) on every listener, e.g. the page that opens
/// the WebSocket. Unset: such requests get 426 Upgrade Required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StaticFilesConfig {
    /// The directory. Paths resolve under it only (no `..`, no hidden
    /// files, no symlinks leading out).
    pub dir: Option<PathBuf>,
    /// File served for a directory's path (`/` included).
    pub index: String,
    /// Largest file served; larger ones are answered 403.
    pub max_file_size: ByteSize,
    /// Files being sent at once; more requests are answered 503. Each one
    /// holds an open file and a connection until its client has read it.
    pub max_concurrent: usize,
}

impl Default for StaticFilesConfig {
    fn default() -> Self {
        Self {
            dir: None,
            index: "index.html".to_owned(),
            max_file_size: ByteSize::mib(1),
            max_concurrent: 256,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: `{key}` {problem}")]
    Invalid { key: String, problem: String },
}

/// The file `serve`, `check` and the admin commands read when neither
/// `--config` nor `WHARF_CONFIG` names one, if it exists in the working
/// directory.
pub const DEFAULT_FILE: &str = "wharf.toml";

/// The configuration file to read: the one named (`--config`, else
/// `WHARF_CONFIG`: clap folds the two), else `./wharf.toml` if there is
/// one, else none (the built-in defaults).
pub fn locate(named: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = named {
        return Some(path.to_owned());
    }
    let default = Path::new(DEFAULT_FILE);
    default.is_file().then(|| default.to_owned())
}

/// `ip:port` (`127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:443`), for the
/// listeners and the admin API, in the file and on the command line alike.
/// Host names are refused rather than resolved: `localhost` may resolve to
/// `::1` and `127.0.0.1` both, and binding only one of them would surprise
/// whoever connects to the other.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!(
            "{text:?} is not an IP:PORT address (host names such as localhost are \
             not resolved): write e.g. 127.0.0.1:8080, [::1]:8080 or 0.0.0.0:8080"
        )
    })
}

/// serde glue for [`parse_socket_addr`].
mod socket_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, de::Error};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        super::parse_socket_addr(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn deserialize_option<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SocketAddr>, D::Error> {
        deserialize(d).map(Some)
    }
}

impl Config {
    /// Reads and validates a TOML file. Relative paths in it are taken
    /// relative to the file's directory (see [`resolve_paths`](Self::resolve_paths)).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        // `absolute` first, so that `wharf.toml`'s directory is the working
        // directory's full path rather than "" (and errors name a full path).
        let dir = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_default();
        config.resolve_paths(&dir);
        config.validate()?;
        Ok(config)
    }

    /// Makes every relative path of the file relative to `dir`, the file's
    /// directory, as most servers do: the same file means the same files
    /// whatever directory the server starts in. Paths given on the command
    /// line are not passed through here: they stay relative to the working
    /// directory, like any command's arguments.
    ///
    /// The destructuring names every field, so that a new field fails to
    /// compile here until someone decides whether it is a path.
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        };
        let fix_some = |path: &mut Option<PathBuf>| {
            if let Some(path) = path {
                fix(path);
            }
        };
        let fix_wasi = |wasi: &mut WasiGrants| {
            let WasiGrants {
                env: _,
                dir,
                wall_clock: _,
            } = wasi;
            fix_some(dir);
        };
        let Config {
            listeners,
            server: _,
            websocket: _,
            plugin,
            admin,
            static_files,
            tenants,
        } = self;
        for tls in listeners.iter_mut().filter_map(|l| l.tls.as_mut()) {
            let TlsConfig { cert, key, sni } = tls;
            fix(cert);
            fix(key);
            for SniCertificate {
                names: _,
                cert,
                key,
            } in sni
            {
                fix(cert);
                fix(key);
            }
        }
        let PluginConfig {
            path,
            memory_limit: _,
            cpu_time_per_event: _,
            wall_time_per_event: _,
            cpu_share: _,
            log_lines_per_second: _,
            allowed_origins: _,
            settings: _,
            wasi,
            hibernate_after: _,
            memory_reset: _,
            keep_resident: _,
            memory_slots: _,
            cache_dir,
            cache_max_size: _,
        } = plugin;
        fix_some(path);
        fix_some(cache_dir);
        fix_wasi(wasi);
        let AdminConfig {
            listen: _,
            token_file,
            max_upload_size: _,
        } = admin;
        fix_some(token_file);
        let StaticFilesConfig {
            dir: static_dir,
            index: _,
            max_file_size: _,
            max_concurrent: _,
        } = static_files;
        fix_some(static_dir);
        for tenant in tenants {
            let TenantConfig {
                name: _,
                plugin,
                routes: _,
                instance: _,
                allowed_origins: _,
                limits: _,
                settings: _,
                wasi,
                watch: _,
            } = tenant;
            fix(plugin);
            if let Some(wasi) = wasi {
                fix_wasi(wasi);
            }
        }
    }

    /// Checks the relations between keys that serde cannot see.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key.to_owned(),
                problem: problem.to_owned(),
            })
        };
        if self.listeners.is_empty() {
            return invalid("listener", "must name at least one listener");
        }
        if self.server.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if self.server.max_request_headers == 0 {
            return invalid("server.max_request_headers", "must be at least 1");
        }
        if self.server.max_request_size.as_u64() < 256 {
            return invalid("server.max_request_size", "must be at least 256 B");
        }
        if self.server.restart_window > Duration::from_secs(24 * 3600) {
            return invalid("server.restart_window", "must be at most 24h");
        }
        if self.server.handshake_timeout.is_zero() {
            return invalid("server.handshake_timeout", "must be more than 0s");
        }
        if self.server.max_pending_handshakes == 0 {
            return invalid("server.max_pending_handshakes", "must be at least 1");
        }
        if self.server.buffered_wait.is_zero() {
            return invalid("server.buffered_wait", "must be more than 0s");
        }
        // A deadline is now plus a duration: one too large to add to the
        // clock would panic the connection that computes it.
        let day = Duration::from_secs(24 * 3600);
        let ws = &self.websocket;
        for (key, duration) in [
            (
                "server.handshake_timeout",
                Some(self.server.handshake_timeout),
            ),
            (
                "server.shutdown_timeout",
                Some(self.server.shutdown_timeout),
            ),
            ("server.buffered_wait", Some(self.server.buffered_wait)),
            ("websocket.ping_interval", Some(ws.ping_interval)),
            ("websocket.idle_timeout", Some(ws.idle_timeout)),
            ("websocket.close_timeout", Some(ws.close_timeout)),
            ("plugin.hibernate_after", Some(self.plugin.hibernate_after)),
            (
                "plugin.cpu_time_per_event",
                Some(self.plugin.cpu_time_per_event),
            ),
            (
                "plugin.wall_time_per_event",
                self.plugin.wall_time_per_event,
            ),
        ]
        .into_iter()
        .chain(self.tenants.iter().flat_map(|t| {
            [
                (
                    "tenant.limits.cpu_time_per_event",
                    t.limits.cpu_time_per_event,
                ),
                (
                    "tenant.limits.wall_time_per_event",
                    t.limits.wall_time_per_event,
                ),
            ]
        })) {
            if duration.is_some_and(|d| d > day) {
                return invalid(key, "must be at most 24h");
            }
        }
        if ws.fragment_size.is_some_and(|f| f.as_u64() == 0) {
            return invalid("websocket.fragment_size", "must be more than 0 when set");
        }
        if ws.send_queue_grace.is_zero() || ws.send_queue_grace > Duration::from_secs(24 * 3600) {
            return invalid("websocket.send_queue_grace", "must be between 0s and 24h");
        }
        if ws.close_timeout.is_zero() {
            return invalid("websocket.close_timeout", "must be more than 0s");
        }
        if self.plugin.path.is_some() && !self.tenants.is_empty() {
            return invalid(
                "plugin.path",
                "names the default tenant's handler; with [[tenant]] tables, give each its `plugin`",
            );
        }
        let mut names = std::collections::HashSet::new();
        for tenant in &self.tenants {
            let name = &tenant.name;
            let valid = (1..=63).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(ConfigError::Invalid {
                    key: "tenant.name".into(),
                    problem: format!("{name:?} must be 1 to 63 of a-z, 0-9 and -"),
                });
            }
            if !names.insert(name.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "tenant.name".into(),
                    problem: format!("{name:?} names two tenants"),
                });
            }
        }
        let mut largest_memory = 0;
        for tenant in self.resolved_tenants() {
            tenant.limits.validate(&tenant.key_prefix)?;
            if let Some(dir) = &tenant.wasi.dir
                && !dir.is_dir()
            {
                return Err(ConfigError::Invalid {
                    key: format!("{}wasi.dir", tenant.key_prefix.replace("limits.", "")),
                    problem: format!("{} is not a directory", dir.display()),
                });
            }
            if let Some(origins) = &tenant.allowed_origins {
                crate::tenancy::origin::OriginPolicy::parse(origins).map_err(|problem| {
                    ConfigError::Invalid {
                        key: format!("{}allowed_origins", tenant.key_prefix),
                        problem,
                    }
                })?;
            }
            largest_memory = largest_memory.max(tenant.limits.memory_limit.as_u64());
        }
        crate::tenancy::routes::RouteTable::build(&self.resolved_tenants()).map_err(|problem| {
            ConfigError::Invalid {
                key: "tenant.routes".into(),
                problem: problem.to_string(),
            }
        })?;
        let index = &self.static_files.index;
        if index.is_empty() || index.contains(['/', '\\']) || index.starts_with('.') {
            return invalid("static_files.index", "must be a plain file name");
        }
        if self.plugin.keep_resident().as_u64() > largest_memory {
            return invalid(
                "plugin.keep_resident",
                "must not exceed the largest memory_limit",
            );
        }
        Ok(())
    }

    /// Every tenant with its limits resolved: the `[[tenant]]`s, or the
    /// `default` one `[plugin]` describes.
    pub fn resolved_tenants(&self) -> Vec<ResolvedTenant> {
        let limits = |o: &TenantLimits| {
            let cpu = o
                .cpu_time_per_event
                .unwrap_or(self.plugin.cpu_time_per_event);
            Limits {
                memory_limit: o.memory_limit.unwrap_or(self.plugin.memory_limit),
                cpu_time_per_event: cpu,
                wall_time_per_event: o
                    .wall_time_per_event
                    .or(self.plugin.wall_time_per_event)
                    .unwrap_or_else(|| (cpu * 2).max(Duration::from_secs(1))),
                max_connections: o.max_connections.unwrap_or(self.server.max_connections),
                max_message_size: o
                    .max_message_size
                    .unwrap_or(self.websocket.max_message_size),
                max_frame_size: o.max_frame_size.unwrap_or(self.websocket.max_frame_size),
                send_queue: o.send_queue.unwrap_or(self.websocket.send_queue),
                messages_per_second: o
                    .messages_per_second
                    .unwrap_or(self.websocket.messages_per_second),
                bytes_per_second: o
                    .bytes_per_second
                    .unwrap_or(self.websocket.bytes_per_second),
                log_lines_per_second: o
                    .log_lines_per_second
                    .unwrap_or(self.plugin.log_lines_per_second),
                cpu_share: o
                    .cpu_share
                    .or(self.plugin.cpu_share)
                    .unwrap_or_else(|| default_cpu_share(self.tenants.len())),
            }
        };
        if self.tenants.is_empty() {
            return vec![ResolvedTenant {
                name: DEFAULT_TENANT.to_owned(),
                key_prefix: String::new(),
                plugin: self.plugin.path.clone(),
                routes: vec!["/".to_owned()],
                instance: InstanceMode::PerConnection,
                allowed_origins: self.plugin.allowed_origins.clone(),
                limits: limits(&TenantLimits::default()),
                settings: self.plugin.settings.clone(),
                wasi: self.plugin.wasi.clone(),
                watch: false,
            }];
        }
        self.tenants
            .iter()
            .map(|t| ResolvedTenant {
                name: t.name.clone(),
                key_prefix: format!("tenant.{}.limits.", t.name),
                plugin: Some(t.plugin.clone()),
                routes: t.routes.clone(),
                instance: t.instance,
                allowed_origins: t
                    .allowed_origins
                    .clone()
                    .or_else(|| self.plugin.allowed_origins.clone()),
                limits: limits(&t.limits),
                settings: t.settings.clone(),
                wasi: t.wasi.clone().unwrap_or_else(|| self.plugin.wasi.clone()),
                watch: t.watch,
            })
            .collect()
    }
}

/// A tenant as the server runs it: every default applied.
#[derive(Debug, Clone)]
pub struct ResolvedTenant {
    pub name: String,
    /// Where its limit keys live, for error messages (`""`: the global keys).
    key_prefix: String,
    /// `None`: the bundled echo handler.
    pub plugin: Option<PathBuf>,
    pub routes: Vec<String>,
    pub instance: InstanceMode,
    pub allowed_origins: Option<Vec<String>>,
    pub limits: Limits,
    pub settings: BTreeMap<String, String>,
    pub wasi: WasiGrants,
    pub watch: bool,
}

/// One tenant's limits, resolved.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_limit: ByteSize,
    pub cpu_time_per_event: Duration,
    pub wall_time_per_event: Duration,
    pub max_connections: u32,
    pub max_message_size: ByteSize,
    pub max_frame_size: ByteSize,
    pub send_queue: ByteSize,
    pub messages_per_second: u32,
    pub bytes_per_second: ByteSize,
    pub log_lines_per_second: u32,
    /// Cores; 0: unlimited.
    pub cpu_share: f64,
}

/// `cpu_share` unset: no limit for a lone tenant; with several, half the
/// cores each (at least one).
fn default_cpu_share(tenants: usize) -> f64 {
    if tenants <= 1 {
        return 0.0;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores as f64 / 2.0).max(1.0)
}

impl Limits {
    /// The rules every tenant's limits obey; `prefix` says where the keys
    /// are (`"tenant.acme.limits."`), `""` for the server-wide ones.
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |global: &str| {
            let (section, name) = global.split_once('.').unwrap_or(("", global));
            if prefix.is_empty() {
                format!("{section}.{name}")
            } else {
                format!("{prefix}{name}")
            }
        };
        let invalid = |global: &str, problem: &str| {
            Err(ConfigError::Invalid {
                key: key(global),
                problem: problem.to_owned(),
            })
        };
        let memory = self.memory_limit.as_u64();
        if memory < 1 << 20 {
            return invalid("plugin.memory_limit", "must be at least 1 MiB");
        }
        if memory > 4 << 30 {
            return invalid(
                "plugin.memory_limit",
                "must be at most 4 GiB (32-bit linear memory)",
            );
        }
        if self.cpu_time_per_event < Duration::from_millis(1) {
            return invalid("plugin.cpu_time_per_event", "must be at least 1ms");
        }
        if self.wall_time_per_event < self.cpu_time_per_event {
            return invalid(
                "plugin.wall_time_per_event",
                "must be at least cpu_time_per_event",
            );
        }
        if self.wall_time_per_event > Duration::from_secs(24 * 3600) {
            return invalid("plugin.wall_time_per_event", "must be at most 24h");
        }
        if self.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if self.max_frame_size.as_u64() < 125 {
            return invalid(
                "websocket.max_frame_size",
                "must be at least 125 B (a control frame)",
            );
        }
        if self.max_message_size.as_u64() == 0 {
            return invalid("websocket.max_message_size", "must be more than 0");
        }
        if self.send_queue.as_u64() == 0 {
            return invalid("websocket.send_queue", "must be more than 0");
        }
        if !self.cpu_share.is_finite() || self.cpu_share < 0.0 {
            return invalid("plugin.cpu_share", "must be a number of cores, 0 or more");
        }
        Ok(())
    }
}

/// Byte sizes as `usize`, saturating on 32-bit targets.
pub fn bytes(size: ByteSize) -> usize {
    usize::try_from(size.as_u64()).unwrap_or(usize::MAX)
}

/// `"0s"` means "off" for optional timers.
pub fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default_server() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.port(), 8080);
        assert_eq!(c.server.max_connections, 10_000);
    }

    /// The README's configuration reference writes out every default: it
    /// must parse and say exactly what the code does.
    #[test]
    fn the_readme_reference_is_the_defaults() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split_once("## Configuration reference")
            .expect("the README has a configuration reference")
            .1;
        let block = section
            .split_once("```toml\n")
            .and_then(|(_, rest)| rest.split_once("```"))
            .expect("the reference is a toml block")
            .0;
        let documented: Config = toml::from_str(block).expect("the reference parses");
        documented.validate().expect("the reference is valid");
        let (readme, code) = (
            format!("{documented:#?}"),
            format!("{:#?}", Config::default()),
        );
        for (r, c) in readme.lines().zip(code.lines()) {
            assert_eq!(r.trim(), c.trim(), "the README and the code disagree");
        }
        assert_eq!(readme.lines().count(), code.lines().count());
    }

    #[test]
    fn full_file_parses() {
        let c: Config = toml::from_str(
            r#"
            [[listener]]
            address = "127.0.0.1:9001"
            [[listener]]
            address = "127.0.0.1:9443"
            tls = { cert = "c.pem", key = "k.pem" }
            [server]
            max_connections = 5
            handshake_timeout = "3s"
            [websocket]
            max_message_size = "1MiB"
            fragment_size = "64KiB"
            idle_timeout = "0s"
            [plugin]
            path = "x.wasm"
            memory_limit = "32MiB"
            cpu_time_per_event = "50ms"
            [admin]
            listen = "127.0.0.1:9090"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.websocket.max_message_size, ByteSize::mib(1));
        assert_eq!(nonzero(c.websocket.idle_timeout), None);
        assert!(c.listeners[1].tls.is_some());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<Config>("[websocket]\nmax_mesage_size = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_mesage_size"), "{err}");
    }

    #[test]
    fn bad_value_is_named() {
        let err =
            toml::from_str::<Config>("[plugin]\ncpu_time_per_event = \"fast\"\n").unwrap_err();
        assert!(err.to_string().contains("cpu_time_per_event"), "{err}");
        let c: Config = toml::from_str("[plugin]\nmemory_limit = \"1KiB\"\n").unwrap();
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("plugin.memory_limit"), "{err}");
    }

    #[test]
    fn memory_slots_are_compact_unless_wide() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.plugin.memory_slots, MemorySlotsMode::Compact);
        let c: Config = toml::from_str("[plugin]\nmemory_slots = \"wide\"\n").unwrap();
        assert_eq!(c.plugin.memory_slots, MemorySlotsMode::Wide);
        let err = toml::from_str::<Config>("[plugin]\nmemory_slots = \"4GiB\"\n").unwrap_err();
        assert!(err.to_string().contains("compact"), "{err}");
    }

    #[test]
    fn keep_resident_defaults_by_memory_reset() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.plugin.memory_reset, MemoryResetMode::Decommit);
        assert_eq!(c.plugin.keep_resident(), ByteSize::b(0));
        let c: Config = toml::from_str("[plugin]\nmemory_reset = \"in-place\"\n").unwrap();
        assert_eq!(c.plugin.keep_resident(), ByteSize::kib(256));
        let c: Config =
            toml::from_str("[plugin]\nmemory_reset = \"in-place\"\nkeep_resident = \"1MiB\"\n")
                .unwrap();
        assert_eq!(c.plugin.keep_resident(), ByteSize::mib(1));
        let err = toml::from_str::<Config>("[plugin]\nmemory_reset = \"scan\"\n").unwrap_err();
        assert!(err.to_string().contains("in-place"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let file = dir.path().join("wharf.toml");
        std::fs::write(
            &file,
            r#"
            [[listener]]
            address = "127.0.0.1:0"
            tls = { cert = "c.pem", key = "/abs/k.pem", sni = [{ names = ["a.test"], cert = "s.pem", key = "s-key.pem" }] }
            [plugin]
            path = "plugins/app.wasm"
            cache_dir = "cache"
            wasi = { dir = "data" }
            [admin]
            token_file = "secret/token"
            [static_files]
            dir = "static"
            "#,
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        let d = dir.path();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert, d.join("c.pem"));
        assert_eq!(tls.key, Path::new("/abs/k.pem"), "absolute paths stay");
        assert_eq!(tls.sni[0].cert, d.join("s.pem"));
        assert_eq!(tls.sni[0].key, d.join("s-key.pem"));
        assert_eq!(c.plugin.path.as_deref(), Some(&*d.join("plugins/app.wasm")));
        assert_eq!(c.plugin.cache_dir.as_deref(), Some(&*d.join("cache")));
        assert_eq!(c.plugin.wasi.dir.as_deref(), Some(&*data));
        assert_eq!(
            c.admin.token_file.as_deref(),
            Some(&*d.join("secret/token"))
        );
        assert_eq!(c.static_files.dir.as_deref(), Some(&*d.join("static")));

        let mut c: Config = toml::from_str(
            "[[tenant]]\nname = \"a\"\nplugin = \"a.wasm\"\nroutes = [\"/\"]\nwasi = { dir = \"w\" }\n",
        )
        .unwrap();
        c.resolve_paths(Path::new("/etc/wharf"));
        assert_eq!(c.tenants[0].plugin, Path::new("/etc/wharf/a.wasm"));
        let wasi = c.tenants[0].wasi.as_ref().unwrap();
        assert_eq!(wasi.dir.as_deref(), Some(Path::new("/etc/wharf/w")));
    }

    #[test]
    fn errors_name_the_resolved_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wharf.toml");
        std::fs::write(&file, "[plugin.wasi]\ndir = \"missing\"\n").unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        let resolved = dir.path().join("missing").display().to_string();
        assert!(err.contains(&resolved), "{err}");
    }

    #[test]
    fn host_names_are_refused_with_a_hint() {
        let err = toml::from_str::<Config>("[[listener]]\naddress = \"localhost:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("IP:PORT") && err.contains("127.0.0.1:8080"),
            "{err}"
        );
        let err = toml::from_str::<Config>("[admin]\nlisten = \"localhost:9090\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("IP:PORT"), "{err}");
        let c: Config = toml::from_str("[admin]\nlisten = \"[::1]:9090\"\n").unwrap();
        assert_eq!(c.admin.listen, Some("[::1]:9090".parse().unwrap()));
    }
}
