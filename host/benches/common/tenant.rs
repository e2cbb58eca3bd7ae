//! Configuration the benches share, so that each measures the same thing:
//! an echo served from one `shared` instance, the pool's reset settings,
//! and which build of the servers a run measured.

// Each bench that includes this file uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The `[[tenant]]` table that serves an echo component (`plugin`, else the
/// bundled one) to every route from one shared instance. (`plugin.path`
/// beside a `[[tenant]]` is refused: the tenant names its plugin.)
pub fn shared_echo(plugin: Option<&Path>) -> String {
    let bundled = PathBuf::from(wharf::bundled::PLUGIN_DIR).join("echo.wasm");
    format!(
        "[[tenant]]\nname = \"echo\"\nplugin = {:?}\nroutes = [\"/\"]\ninstance = \"shared\"\n",
        plugin.unwrap_or(&bundled).display().to_string()
    )
}

/// The `[plugin]` line of `--keep-resident SIZE`.
pub fn keep_resident(size: &str) -> String {
    format!("keep_resident = {size:?}\n")
}

/// The `[plugin]` line of `--in-place`: pool slots reset in place.
pub const IN_PLACE: &str = "memory_reset = \"in-place\"\n";

/// The `[plugin]` line of `--wide-slots`: 4 GiB slots, no bounds checks.
pub const WIDE_SLOTS: &str = "memory_slots = \"wide\"\n";

/// The Cargo profile every server of this run was built with: the
/// directory cargo put the wharf binary in (`release`, or `dist` for the
/// README's figures). The baselines are in this bench's binary, built with
/// the same profile.
pub fn build_profile() -> &'static str {
    std::path::Path::new(env!("CARGO_BIN_EXE_wharf"))
        .parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
        .unwrap_or("unknown")
}
