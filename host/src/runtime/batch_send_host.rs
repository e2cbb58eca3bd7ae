//! The host side of `wharf:websocket/batch-send`: many sends in one call.
//!
//! A call from a plugin into the host costs wasmtime's fixed entry and exit,
//! about 1,000 instructions: a fifth of what a pipelined 1 KiB echo cost
//! when each reply was its own `send-binary` call (callgrind: 5,284
//! instructions per message, 4,319 with one `send` per batch of 16). Here
//! one call queues them all. Like `connection`'s sends, it is wired by hand:
//! `bindgen!` would lift the whole list into owned `String`s and `Vec`s
//! first (host memory in proportion to what the plugin passes, and a copy
//! per payload); here each payload is read in place from the plugin's
//! memory and framed straight into the outbox, one element at a time.

use wasmtime::StoreContextMut;
use wasmtime::component::{ComponentType, Lift, Linker, Resource, WasmList, WasmStr};

use super::HostState;
use super::bindings::wharf::websocket::batch_send::Partial;
use super::connection_host::{ConnectionEntry, Outbox, with_outbox};

/// The interface this implements (older 0.1.x plugins are matched to it by
/// semver).
const INTERFACE: &str = "wharf:websocket/batch-send@0.1.12";

/// One `outgoing` message, still in the plugin's memory.
#[derive(ComponentType, Lift)]
#[component(variant)]
enum Outgoing {
    #[component(name = "text")]
    Text(WasmStr),
    #[component(name = "binary")]
    Binary(WasmList<u8>),
}

/// Queues `messages` in order until one is refused. A malformed element
/// (out of bounds, invalid UTF-8) traps, as it would in `send-text`.
fn queue_all(
    store: &mut StoreContextMut<'_, HostState>,
    outbox: &mut Outbox,
    messages: &WasmList<Outgoing>,
) -> wasmtime::Result<Result<(), Partial>> {
    // One element lifted at a time: the list's length is the plugin's to
    // choose, so nothing here grows with it.
    for index in 0..messages.len() {
        let Some(message) = messages.get(&mut *store, index) else {
            break;
        };
        let queued = match message? {
            Outgoing::Text(text) => outbox.send_text(&text.to_str(&*store)?),
            Outgoing::Binary(data) => outbox.send_binary(data.as_le_slice(&*store)),
        };
        if let Err(error) = queued {
            return Ok(Err(Partial {
                // Below the list's length, which the canonical ABI keeps
                // within 32 bits.
                queued: u32::try_from(index)?,
                error,
            }));
        }
    }
    Ok(Ok(()))
}

/// Adds `wharf:websocket/batch-send` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.instance(INTERFACE)?.func_wrap(
        "send",
        |store: StoreContextMut<'_, HostState>,
         (this, messages): (Resource<ConnectionEntry>, WasmList<Outgoing>)| {
            with_outbox(store, &this, |store, outbox| {
                Ok((queue_all(store, outbox, &messages)?,))
            })
        },
    )?;
    Ok(())
}
