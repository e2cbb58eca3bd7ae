//! `wharf:websocket/batch-handler`: the optional export through which a
//! handler takes the messages of one read in one call.
//!
//! Wired by hand rather than by `bindgen!`: bindgen would lower a
//! `list<message>` from owned `String`s and `Vec`s, one allocation and copy
//! per message, where [`Message`] lowers straight from the host's buffers.
//! The export is looked up and type-checked once per plugin
//! ([`BatchExport::find`]) and resolved once per instance.
//!
//! What a batch still costs per message is the canonical ABI's: each
//! payload is its own allocation in the plugin, so lowering calls the
//! plugin's `cabi_realloc` once per message, a call into the instance
//! like any other. Callgrind, pipelined 1 KiB echo (4,319 instructions per
//! message in all, 2026-12-03): lowering 1,086 per message, of which that
//! realloc is 680; `batch-send` lifting and framing the replies 684.
//! [`packed_handler`](super::packed_handler) is the same batch for two
//! reallocs per call.

use wasmtime::component::{
    ComponentExportIndex, ComponentType, Func, Instance, InstancePre, Lower, Resource, TypedFunc,
};
use wasmtime::{AsContextMut, Store};

use super::HostState;
use super::connection_host::ConnectionEntry;
use super::export::{self, ExportError};

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

impl Message<'_> {
    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Message::Text(text) => text.len(),
            Message::Binary(data) => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Params<'a, 'b> = (Resource<ConnectionEntry>, &'a [Message<'b>]);

/// Where a plugin exports `on-messages`, once checked to have its type.
#[derive(Clone, Debug)]
pub struct BatchExport {
    index: ComponentExportIndex,
}

impl BatchExport {
    /// `None` if the plugin does not export the interface (it takes its
    /// messages one call each); an error if it exports it wrongly.
    pub fn find(pre: &InstancePre<HostState>) -> Result<Option<Self>, ExportError> {
        let index = export::find::<Params<'_, '_>, ()>(pre, INTERFACE, FUNCTION)?;
        Ok(index.map(|index| Self { index }))
    }

    /// The function in a fresh instance of the plugin `find` checked.
    pub fn resolve(&self, store: &mut Store<HostState>, instance: &Instance) -> Option<Func> {
        instance.get_func(store.as_context_mut(), self.index)
    }
}

/// Calls `on-messages` (resolved by [`BatchExport::resolve`]).
pub async fn call(
    store: &mut Store<HostState>,
    func: Func,
    conn: Resource<ConnectionEntry>,
    messages: &[Message<'_>],
) -> wasmtime::Result<()> {
    // SAFETY: `func` is the export `BatchExport::find` type-checked against
    // exactly these parameter and result types, resolved in an instance of
    // that same component.
    let typed = unsafe { TypedFunc::<Params<'_, '_>, ()>::new_unchecked(func) };
    typed.call_async(store, (conn, messages)).await
}
