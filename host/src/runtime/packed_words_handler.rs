//! `wharf:websocket/packed-words-handler`: `packed-handler` with each span
//! as one `u32` (`packed.span-word`), lowered with the payloads as two
//! copies, where a list of `span` records is lowered a field at a time
//! (about 180 instructions a message in wasmtime 48).

use wasmtime::Store;
use wasmtime::component::{Func, InstancePre, Resource, TypedFunc};

use super::HostState;
use super::batch::{BatchRef, SpanWord};
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/packed-words-handler@0.1.12";
const FUNCTION: &str = "on-packed-words";

type Params<'a> = (Resource<ConnectionEntry>, &'a [u8], &'a [u32]);

/// Where the plugin exports `on-packed-words`, if it does; an error if it
/// exports the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<Params<'_>, ()>(pre, INTERFACE, FUNCTION)
}

/// Calls `on-packed-words` (resolved from [`find`]'s export) with `batch`.
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    batch: BatchRef<'_>,
) -> wasmtime::Result<()> {
    // SAFETY: `func` is the export `find` type-checked against
    // exactly these parameter and result types, resolved in an instance of
    // that same component.
    let typed = unsafe { TypedFunc::<Params<'_>, ()>::new_unchecked(func) };
    let (payloads, words) = batch.packed();
    typed
        .call_async(store, (conn, payloads, SpanWord::as_wire(words)))
        .await
}
