//! The configuration the benches use to serve an echo from one `shared`
//! instance, so that each measures the same thing.

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
