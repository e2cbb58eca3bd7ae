//! `wharf:websocket/text-batch-handler`: the optional export through which
//! a handler takes each run of consecutive text messages of a batch as one
//! string and one list of lengths
//! ([`BatchRef::texts`](super::batch::BatchRef::texts)).
//!
//! Bindings such as componentize-py's make an object per list element of a
//! `list<message>` and per record of a packed batch's spans, which cost a
//! Python handler more than the host's whole message; a string and a
//! `list<u32>` are one object and a list of integers.

use wasmtime::Store;
use wasmtime::component::{Func, InstancePre, Resource, TypedFunc};

use super::HostState;
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/text-batch-handler@0.1.12";
const FUNCTION: &str = "on-texts";

type Params<'a> = (Resource<ConnectionEntry>, &'a str, &'a [u32]);

/// Where the plugin exports `on-texts`, if it does; an error if it exports
/// the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<Params<'_>, ()>(pre, INTERFACE, FUNCTION)
}

/// Calls `on-texts` (resolved from [`find`]'s export) with a run of texts
/// (see [`BatchRef::texts`](super::batch::BatchRef::texts)).
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    texts: &str,
    lens: &[u32],
) -> wasmtime::Result<()> {
    // SAFETY: `func` is the export `find` type-checked against
    // exactly these parameter and result types, resolved in an instance of
    // that same component.
    let typed = unsafe { TypedFunc::<Params<'_>, ()>::new_unchecked(func) };
    typed.call_async(store, (conn, texts, lens)).await
}
