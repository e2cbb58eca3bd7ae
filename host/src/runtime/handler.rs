//! `wharf:websocket/handler`: the export every plugin has, its five
//! functions looked up and type-checked once per plugin ([`FuncExport`]).
//!
//! `bindgen!`'s `HandlerWorldIndices::load` did both again for every
//! instance: five `Func::typed` checks, 3.5k of the 154k instructions a
//! connection cost (callgrind, 2026-12-04). Here an instance only looks
//! its five functions up.

use wasmtime::Store;
use wasmtime::component::{Func, Instance, InstancePre, Resource, TypedFunc};

use super::HostState;
use super::bindings::{UpgradeRequest, UpgradeResponse};
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches the other 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/handler@0.1.9";

type Conn = Resource<ConnectionEntry>;
type Upgrade<'a> = (Conn, &'a UpgradeRequest);
type Text<'a> = (Conn, &'a str);
type Binary<'a> = (Conn, &'a [u8]);
type Close<'a> = (Conn, u16, &'a str, bool);

/// The handler's functions in the plugin, checked against the types the
/// calls below lower and lift.
#[derive(Clone, Copy, Debug)]
pub struct HandlerExports {
    on_upgrade: FuncExport,
    on_open: FuncExport,
    on_text: FuncExport,
    on_binary: FuncExport,
    on_close: FuncExport,
}

/// The same functions in one instance.
#[derive(Clone, Copy)]
pub struct HandlerFuncs {
    on_upgrade: Func,
    on_open: Func,
    on_text: Func,
    on_binary: Func,
    on_close: Func,
}

impl HandlerExports {
    /// The plugin's handler export; an error if it is missing or a
    /// function has another type.
    pub fn find(pre: &InstancePre<HostState>) -> Result<Self, ExportError> {
        fn required<P, R>(
            pre: &InstancePre<HostState>,
            function: &'static str,
        ) -> Result<FuncExport, ExportError>
        where
            P: wasmtime::component::ComponentNamedList + wasmtime::component::Lower,
            R: wasmtime::component::ComponentNamedList + wasmtime::component::Lift,
        {
            FuncExport::find::<P, R>(pre, INTERFACE, function)?.ok_or(ExportError::Missing {
                interface: INTERFACE,
                function,
            })
        }
        Ok(Self {
            on_upgrade: required::<Upgrade<'_>, (UpgradeResponse,)>(pre, "on-upgrade")?,
            on_open: required::<(Conn,), ()>(pre, "on-open")?,
            on_text: required::<Text<'_>, ()>(pre, "on-text")?,
            on_binary: required::<Binary<'_>, ()>(pre, "on-binary")?,
            on_close: required::<Close<'_>, ()>(pre, "on-close")?,
        })
    }

    /// The functions in a fresh instance of the plugin `find` checked.
    pub fn resolve(
        &self,
        store: &mut Store<HostState>,
        instance: &Instance,
    ) -> Result<HandlerFuncs, ExportError> {
        let mut get = |export: &FuncExport, function: &'static str| {
            export
                .resolve(&mut *store, instance)
                .ok_or(ExportError::Missing {
                    interface: INTERFACE,
                    function,
                })
        };
        Ok(HandlerFuncs {
            on_upgrade: get(&self.on_upgrade, "on-upgrade")?,
            on_open: get(&self.on_open, "on-open")?,
            on_text: get(&self.on_text, "on-text")?,
            on_binary: get(&self.on_binary, "on-binary")?,
            on_close: get(&self.on_close, "on-close")?,
        })
    }
}

// SAFETY (every `new_unchecked` below): the `Func` is the export
// `HandlerExports::find` type-checked against exactly these parameter and
// result types, resolved in an instance of that same component.
impl HandlerFuncs {
    pub async fn on_upgrade(
        &self,
        store: &mut Store<HostState>,
        conn: Conn,
        request: &UpgradeRequest,
    ) -> wasmtime::Result<UpgradeResponse> {
        let typed =
            unsafe { TypedFunc::<Upgrade<'_>, (UpgradeResponse,)>::new_unchecked(self.on_upgrade) };
        let (response,) = typed.call_async(store, (conn, request)).await?;
        Ok(response)
    }

    pub async fn on_open(&self, store: &mut Store<HostState>, conn: Conn) -> wasmtime::Result<()> {
        let typed = unsafe { TypedFunc::<(Conn,), ()>::new_unchecked(self.on_open) };
        typed.call_async(store, (conn,)).await
    }

    pub async fn on_text(
        &self,
        store: &mut Store<HostState>,
        conn: Conn,
        text: &str,
    ) -> wasmtime::Result<()> {
        let typed = unsafe { TypedFunc::<Text<'_>, ()>::new_unchecked(self.on_text) };
        typed.call_async(store, (conn, text)).await
    }

    pub async fn on_binary(
        &self,
        store: &mut Store<HostState>,
        conn: Conn,
        data: &[u8],
    ) -> wasmtime::Result<()> {
        let typed = unsafe { TypedFunc::<Binary<'_>, ()>::new_unchecked(self.on_binary) };
        typed.call_async(store, (conn, data)).await
    }

    pub async fn on_close(
        &self,
        store: &mut Store<HostState>,
        conn: Conn,
        code: u16,
        reason: &str,
        clean: bool,
    ) -> wasmtime::Result<()> {
        let typed = unsafe { TypedFunc::<Close<'_>, ()>::new_unchecked(self.on_close) };
        typed.call_async(store, (conn, code, reason, clean)).await
    }
}
