//! `wharf:websocket/batch-handler`: the optional export through which a
//! handler takes the messages of one read in one call.
//!
//! Wired by hand rather than by `bindgen!`: bindgen would lower a
//! `list<message>` from owned `String`s and `Vec`s, one allocation and copy
//! per message, where [`Message`] lowers straight from the host's buffers.
//! The export is looked up and type-checked once per plugin
//! ([`find`]) and resolved once per instance.
//!
//! What a batch still costs per message is the canonical ABI's: each
//! payload is its own allocation in the plugin, so lowering calls the
//! plugin's `cabi_realloc` once per message, a call into the instance
//! like any other. Callgrind, pipelined 1 KiB echo (4,319 instructions per
//! message in all, 2026-12-03): lowering 1,086 per message, of which that
//! realloc is 680; `batch-send` lifting and framing the replies 684.
//! [`packed_handler`](super::packed_handler) is the same batch for two
//! reallocs per call.

use wasmtime::Store;
use wasmtime::component::{ComponentType, Func, InstancePre, Lower, Resource, TypedFunc};

use super::HostState;
use super::connection_host::ConnectionEntry;
use super::export::{ExportError, FuncExport};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/batch-handler@0.1.5";
const FUNCTION: &str = "on-messages";

/// One message of a batch, borrowed from the host's buffers.
#[derive(ComponentType, Lower, Clone, Copy, Debug, PartialEq, Eq)]
#[component(variant)]
pub enum Message<'a> {
    #[component(name = "text")]
    Text(&'a str),
    #[component(name = "binary")]
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The payload.
    pub fn bytes(&self) -> &'a [u8] {
        match *self {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(data) => data,
        }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Params<'a, 'b> = (Resource<ConnectionEntry>, &'a [Message<'b>]);

/// Where the plugin exports `on-messages`, if it does; an error if it
/// exports the interface wrongly.
pub fn find(pre: &InstancePre<HostState>) -> Result<Option<FuncExport>, ExportError> {
    FuncExport::find::<Params<'_, '_>, ()>(pre, INTERFACE, FUNCTION)
}

/// Calls `on-messages` (resolved from [`find`]'s export).
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    messages: &[Message<'_>],
) -> wasmtime::Result<()> {
    // SAFETY: `func` is the export `find` type-checked against
    // exactly these parameter and result types, resolved in an instance of
    // that same component.
    let typed = unsafe { TypedFunc::<Params<'_, '_>, ()>::new_unchecked(func) };
    typed.call_async(store, (conn, messages)).await
}
