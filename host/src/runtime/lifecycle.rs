//! `wharf:websocket/lifecycle`: the optional export through which a handler
//! names the lifecycle calls it wants (`on-upgrade`, `on-open`,
//! `on-close`), so that the connection driver skips the others.
//!
//! The answer is asked once per plugin version, on its first instance (see
//! [`Plugin::instantiate_with`](super::Plugin::instantiate_with)), and kept
//! in the plugin ([`Wanted`]).

use std::sync::OnceLock;

use wasmtime::Store;
use wasmtime::component::{Func, InstancePre, TypedFunc};

use super::HostState;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/lifecycle@0.1.12";
const FUNCTION: &str = "wanted";

// `lifecycle.calls`: the calls a handler may do without.
wasmtime::component::flags! {
    Calls {
        #[component(name = "upgrade")]
        const UPGRADE;
        #[component(name = "open")]
        const OPEN;
        #[component(name = "close")]
        const CLOSE;
    }
}

/// Where the plugin exports `wanted`, if it does; an error if it exports
/// the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<(), (Calls,)>(pre, INTERFACE, FUNCTION)
}

/// Calls `wanted` (resolved from [`find`]'s export).
pub async fn call(store: &mut Store<HostState>, func: Func) -> wasmtime::Result<Calls> {
    // SAFETY: `func` is the export `find` type-checked against exactly
    // these parameter and result types, resolved in an instance of that
    // same component.
    let typed = unsafe { TypedFunc::<(), (Calls,)>::new_unchecked(func) };
    typed.call_async(store, ()).await.map(|(calls,)| calls)
}

/// What a plugin version answered to `wanted`, once it has: until then
/// (and for a plugin without the export) every call is wanted.
#[derive(Debug, Default)]
pub struct Wanted(OnceLock<Calls>);

impl Wanted {
    /// Whether the plugin's answer is in.
    pub fn known(&self) -> bool {
        self.0.get().is_some()
    }

    /// Keeps the first answer: two first instances asked at once must
    /// agree, and a later one changes nothing.
    pub fn set(&self, calls: Calls) {
        let _ = self.0.set(calls);
    }

    /// Whether the host makes `call`: yes unless the plugin said otherwise.
    pub fn wants(&self, call: Calls) -> bool {
        self.0.get().is_none_or(|calls| calls.contains(call))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_is_wanted_until_the_first_answer_is_in() {
        let all = [Calls::UPGRADE, Calls::OPEN, Calls::CLOSE];
        let wanted = Wanted::default();
        assert!(!wanted.known());
        assert!(all.iter().all(|&call| wanted.wants(call)));
        wanted.set(Calls::OPEN);
        assert!(wanted.known());
        assert!(!wanted.wants(Calls::UPGRADE));
        assert!(wanted.wants(Calls::OPEN));
        assert!(!wanted.wants(Calls::CLOSE));
        // The first answer holds.
        wanted.set(Calls::UPGRADE | Calls::CLOSE);
        assert!(!wanted.wants(Calls::UPGRADE));
        assert!(wanted.wants(Calls::OPEN));

        let none = Wanted::default();
        none.set(Calls::empty());
        assert!(all.iter().all(|&call| !none.wants(call)));
    }
}
