//! Wharf: a WebSocket server whose application logic runs in sandboxed
//! WebAssembly components.
//!
//! - [`wharf_protocol`] (the `host/protocol` crate) is the sans-IO RFC 6455 core.
//! - [`runtime`] compiles plugins and runs one sandboxed instance per connection.
//! - [`server`] is the network driver: listeners, TLS, and the per-connection task
//!   that feeds the protocol core and the plugin.
//! - [`tenancy`] is the control plane's tenants: routes, origins, limits.
//! - [`config`] is `wharf.toml`; [`metrics`] and [`admin`] make it observable.

pub mod admin;
pub mod bundled;
pub mod config;
pub mod metrics;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod tenancy;
