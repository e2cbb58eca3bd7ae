//! Handler components built from `plugins/` by the build script.

/// The echo handler `wharf serve` runs when no plugin is configured.
pub const ECHO: &[u8] = include_bytes!(concat!(env!("WHARF_PLUGIN_DIR"), "/echo.wasm"));

/// Where the build put every plugin of `plugins/` (`<name>.wasm`, dashes
/// turned into underscores). Used by the tests and the benchmarks.
pub const PLUGIN_DIR: &str = env!("WHARF_PLUGIN_DIR");
