//! `wharf:websocket/packed-handler`: the optional export through which a
//! handler takes a batch as one buffer of payloads and one list of spans
//! ([`Batch::packed`]).
//!
//! Lowering a `list<message>` calls the plugin's `cabi_realloc` once per
//! message (see [`batch_handler`](super::batch_handler)); lowering a packed
//! batch calls it twice, whatever the batch's length.

use wasmtime::component::{ComponentExportIndex, Func, Instance, InstancePre, Resource, TypedFunc};
use wasmtime::{AsContextMut, Store};

use super::HostState;
use super::batch::Batch;
use super::bindings::wharf::websocket::packed::Span;
use super::connection_host::ConnectionEntry;
use super::export::{self, ExportError};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/packed-handler@0.1.8";
const FUNCTION: &str = "on-packed";

type Params<'a> = (Resource<ConnectionEntry>, &'a [u8], &'a [Span]);

/// Where a plugin exports `on-packed`, once checked to have its type.
#[derive(Clone, Debug)]
pub struct PackedExport {
    index: ComponentExportIndex,
}

impl PackedExport {
    /// `None` if the plugin does not export the interface; an error if it
    /// exports it wrongly.
    pub fn find(pre: &InstancePre<HostState>) -> Result<Option<Self>, ExportError> {
        let index = export::find::<Params<'_>, ()>(pre, INTERFACE, FUNCTION)?;
        Ok(index.map(|index| Self { index }))
    }

    /// The function in a fresh instance of the plugin `find` checked.
    pub fn resolve(&self, store: &mut Store<HostState>, instance: &Instance) -> Option<Func> {
        instance.get_func(store.as_context_mut(), self.index)
    }
}

/// Calls `on-packed` (resolved by [`PackedExport::resolve`]) with `batch`.
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    batch: &Batch,
) -> wasmtime::Result<()> {
    // SAFETY: `func` is the export `PackedExport::find` type-checked against
    // exactly these parameter and result types, resolved in an instance of
    // that same component.
    let typed = unsafe { TypedFunc::<Params<'_>, ()>::new_unchecked(func) };
    let (payloads, spans) = batch.packed();
    typed.call_async(store, (conn, payloads, spans)).await
}
