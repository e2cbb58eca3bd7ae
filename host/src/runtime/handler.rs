//! `wharf:websocket/handler`: the export every plugin has, its five
//! functions looked up and type-checked once per plugin ([`FuncExport`]).
//!
//! `bindgen!`'s `HandlerWorldIndices::load` did both again for every
//! instance: five `Func::typed` checks, 3.5k of the 154k instructions a
//! connection cost (callgrind, 2026-12-04). Here an instance only looks
//! its five functions up.

use wasmtime::Store;
use wasmtime::component::{
    ComponentNamedList, Func, Instance, InstancePre, Lift, Lower, Resource, TypedFunc,
};
use wharf_protocol::Masked;

use super::HostState;
use super::bindings::{UpgradeRequest, UpgradeResponse};
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};
use super::masked_bytes::MaskedBytes;

/// The interface's name; wasmtime matches the other 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/handler@0.1.12";

type Conn = Resource<ConnectionEntry>;
type Upgrade<'a> = (Conn, &'a UpgradeRequest);
type Text<'a> = (Conn, &'a str);
type Binary<'a> = (Conn, &'a [u8]);
/// `Binary`'s representation, lowered unmasking.
type MaskedBinary<'a> = (Conn, MaskedBytes<'a>);
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
            P: ComponentNamedList + Lower,
            R: ComponentNamedList + Lift,
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

impl HandlerFuncs {
    pub async fn on_upgrade(
        &self,
        store: &mut Store<HostState>,
        conn: Conn,
        request: &UpgradeRequest,
    ) -> wasmtime::Result<UpgradeResponse> {
        let (response,) =
            call::<Upgrade<'_>, (UpgradeResponse,)>(store, self.on_upgrade, (conn, request))
                .await?;
        Ok(response)
    }

    // The calls below return `call`'s future rather than awaiting it in
    // async fns of their own: each async layer moves the 1.3 KiB call
    // future into its own state, 330 instructions per event.
    pub fn on_open<'a>(
        &self,
        store: &'a mut Store<HostState>,
        conn: Conn,
    ) -> impl Future<Output = wasmtime::Result<()>> + Send + use<'a> {
        call::<(Conn,), ()>(store, self.on_open, (conn,))
    }

    pub fn on_text<'a>(
        &self,
        store: &'a mut Store<HostState>,
        conn: Conn,
        text: &'a str,
    ) -> impl Future<Output = wasmtime::Result<()>> + Send + use<'a> {
        call::<Text<'a>, ()>(store, self.on_text, (conn, text))
    }

    pub fn on_binary<'a>(
        &self,
        store: &'a mut Store<HostState>,
        conn: Conn,
        data: &'a [u8],
    ) -> impl Future<Output = wasmtime::Result<()>> + Send + use<'a> {
        call::<Binary<'a>, ()>(store, self.on_binary, (conn, data))
    }

    /// `on-binary` with a payload unmasked as it is lowered.
    pub fn on_masked_binary<'a>(
        &self,
        store: &'a mut Store<HostState>,
        conn: Conn,
        data: Masked<'a>,
    ) -> impl Future<Output = wasmtime::Result<()>> + Send + use<'a> {
        call::<MaskedBinary<'a>, ()>(store, self.on_binary, (conn, MaskedBytes(data)))
    }

    pub fn on_close<'a>(
        &self,
        store: &'a mut Store<HostState>,
        conn: Conn,
        code: u16,
        reason: &'a str,
        clean: bool,
    ) -> impl Future<Output = wasmtime::Result<()>> + Send + use<'a> {
        call::<Close<'a>, ()>(store, self.on_close, (conn, code, reason, clean))
    }
}

/// Calls `func`, one of [`HandlerFuncs`]' functions, as taking `P` and
/// returning `R`: the types [`HandlerExports::find`] checked it against,
/// which each method above names again for its own function.
fn call<'a, P, R>(
    store: &'a mut Store<HostState>,
    func: Func,
    params: P,
) -> impl Future<Output = wasmtime::Result<R>> + Send + use<'a, P, R>
where
    P: ComponentNamedList + Lower + Send + Sync + 'a,
    R: ComponentNamedList + Lift + Send + Sync + 'static,
{
    // SAFETY: `func` is the export `HandlerExports::find` type-checked
    // against exactly `P` and `R` (the caller's turbofish matches `find`'s,
    // or, for `MaskedBinary`, a type of the same representation and check),
    // resolved in an instance of that same component.
    let typed = unsafe { TypedFunc::<P, R>::new_unchecked(func) };
    async move { typed.call_async(store, params).await }
}
