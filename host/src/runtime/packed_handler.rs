//! `wharf:websocket/packed-handler`: the optional export through which a
//! handler takes a batch as one buffer of payloads and one list of `span`
//! records ([`BatchRef::packed`], each word made a record).
//!
//! Lowering a `list<message>` calls the plugin's `cabi_realloc` once per
//! message (see [`batch_handler`](super::batch_handler)); lowering a packed
//! batch calls it twice, whatever the batch's length. Its records are still
//! lowered one field at a time, which
//! [`packed_words_handler`](super::packed_words_handler) avoids.

use wasmtime::Store;
use wasmtime::component::{Func, InstancePre, Resource, TypedFunc};

use super::HostState;
use super::batch::BatchRef;
use super::bindings::wharf::websocket::packed::Span;
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/packed-handler@0.1.8";
const FUNCTION: &str = "on-packed";

type Params<'a> = (Resource<ConnectionEntry>, &'a [u8], &'a [Span]);

/// Where the plugin exports `on-packed`, if it does; an error if it
/// exports the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<Params<'_>, ()>(pre, INTERFACE, FUNCTION)
}

/// Calls `on-packed` (resolved from [`find`]'s export) with `batch`.
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
    let spans: Vec<Span> = words.iter().map(|w| w.span()).collect();
    typed.call_async(store, (conn, payloads, &spans)).await
}
