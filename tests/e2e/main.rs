//! End-to-end tests: the real `wharf` binary, real sockets (ws and wss), real
//! plugin components from `plugins/`.
//!
//! Every test starts its own server (port 0) so tests run in parallel.

#[path = "../support/mod.rs"]
mod support;

mod admin;
mod batch;
mod browser;
mod capacity;
mod chaos;
mod cli;
mod close;
mod echo;
mod handshake;
mod hibernation;
mod hostile;
mod lifecycle;
mod limits;
mod metrics;
mod pubsub;
mod shared;
mod sni;
mod swap;
mod tenants;
mod tls_reload;
