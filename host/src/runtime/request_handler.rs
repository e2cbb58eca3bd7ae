//! `wharf:websocket/request-handler`: the optional export through which a
//! handler answers an upgrade with the request lent as a handle
//! ([`request_host`](super::request_host)) rather than lowered as a record.

use wasmtime::Store;
use wasmtime::component::{Func, InstancePre, Resource, TypedFunc};

use super::HostState;
use super::bindings::UpgradeResponse;
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};
use super::request_host::RequestEntry;

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/request-handler@0.1.9";
const FUNCTION: &str = "on-request";

type Params = (Resource<ConnectionEntry>, Resource<RequestEntry>);

/// Where the plugin exports `on-request`, if it does; an error if it
/// exports the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<Params, (UpgradeResponse,)>(pre, INTERFACE, FUNCTION)
}

/// Calls `on-request` (resolved from [`find`]'s export) with `request`
/// lent for the call.
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    request: RequestEntry,
) -> wasmtime::Result<UpgradeResponse> {
    let entry = store.data_mut().table.push(request)?;
    let lent = Resource::new_borrow(entry.rep());
    // SAFETY: `func` is the export `find` type-checked against exactly
    // these parameter and result types, resolved in an instance of that
    // same component.
    let typed = unsafe { TypedFunc::<Params, (UpgradeResponse,)>::new_unchecked(func) };
    let result = typed.call_async(&mut *store, (conn, lent)).await;
    // Out of the table whatever the call did: a shared instance's table
    // serves every later connection.
    store.data_mut().table.delete(entry)?;
    result.map(|(response,)| response)
}
