//! The host side of `wharf:websocket/attachment`: a small blob kept with the
//! connection, outside the instance, so it survives hibernation.
//!
//! Wired by hand rather than by `bindgen!`: bindgen would copy the whole
//! list out of the plugin's memory before this code could refuse it, so a
//! plugin calling `set` with 32 MiB in a loop made the host copy 32 MiB per
//! call (milliseconds each, with no epoch check in between). Here the
//! length is checked first and only an attachment that fits is copied.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList};

use super::HostState;
use super::bindings::ErrorCode;
use super::connection_host::ConnectionEntry;

/// Largest attachment, in bytes: it is what an idle connection costs.
pub const MAX_ATTACHMENT: usize = 4096;

const INTERFACE: &str = "wharf:websocket/attachment@0.1.12";

/// Adds `wharf:websocket/attachment` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(INTERFACE)?;
    inst.func_wrap(
        "set",
        |mut store: StoreContextMut<'_, HostState>,
         (conn, data): (Resource<ConnectionEntry>, WasmList<u8>)| {
            if data.len() > MAX_ATTACHMENT {
                return Ok((Err(ErrorCode::MessageTooBig),));
            }
            let bytes = data.as_le_slice(&store).to_vec();
            store.data_mut().table.get_mut(&conn)?.attachment = bytes;
            Ok((Ok(()),))
        },
    )?;
    inst.func_wrap(
        "get",
        |store: StoreContextMut<'_, HostState>, (conn,): (Resource<ConnectionEntry>,)| {
            Ok((store.data().table.get(&conn)?.attachment.clone(),))
        },
    )?;
    Ok(())
}
