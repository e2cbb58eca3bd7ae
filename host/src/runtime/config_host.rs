//! The host side of `wharf:websocket/config`: the tenant's settings, the
//! same for all its instances and never another tenant's.

use super::HostState;
use super::bindings::wharf::websocket::config::Host;

impl Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.settings.get(&key).cloned())
    }

    fn get_all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}
