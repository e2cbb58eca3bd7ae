//! Wharf: a WebSocket server whose application logic runs in sandboxed
//! WebAssembly components.
//!
//! - [`wharf_protocol`] (the `host/protocol` crate) is the sans-IO RFC 6455 core.
//! - [`runtime`] compiles plugins and runs one sandboxed instance per connection.
//! - [`server`] is the network driver: listeners, TLS, and the per-connection task
//!   that feeds the protocol core and the plugin.
//! - [`tenancy`] is the control plane's tenants: routes, origins, limits.
//! - [`config`] is `wharf.toml`; [`metrics`] and [`admin`] make it observable.

/// `wharf --version`: the host's version, the WIT package its plugins are
/// built against and the wasmtime that runs them (both read by `build.rs`).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (WIT ",
    env!("WHARF_WIT_PACKAGE"),
    ", wasmtime ",
    env!("WHARF_WASMTIME_VERSION"),
    ")"
);

/// A map keyed by numbers the server made itself (connection ids, which
/// are a keyed permutation of a counter, and watcher ids): no peer or
/// plugin picks its keys, so it needs no defence against chosen collisions
/// and takes foldhash, not std's SipHash (284 instructions a lookup of a
/// shared instance's connection, per call).
pub type IdMap<V> = std::collections::HashMap<u64, V, foldhash::fast::RandomState>;

pub mod admin;
pub mod beacon;
pub mod bundled;
pub mod config;
pub mod metrics;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod tenancy;
