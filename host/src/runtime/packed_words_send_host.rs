//! The host side of `wharf:websocket/packed-words-send`: `packed-send`
//! with each span as one `u32` (`packed.span-word`), so the spans are read
//! where the plugin wrote them, as the payloads are, instead of lifted a
//! record at a time.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList};

use super::HostState;
use super::batch::SpanWord;
use super::batch_handler::Message;
use super::bindings::wharf::websocket::batch_send::Partial;
use super::connection_host::{ConnectionEntry, Outbox, with_outbox};
use super::packed_send_host::{CHUNK, all_used, cut, queue_chunk};

/// The interface this implements (later 0.1.x plugins are matched to it by
/// semver).
const INTERFACE: &str = "wharf:websocket/packed-words-send@0.1.12";

/// Queues the messages `spans` cuts `payloads` into, in order, until one is
/// refused, `CHUNK` at a time (a send of one chunk may be written at once:
/// `Outbox::write_through`). Malformed spans trap, before any message of
/// their chunk is queued.
fn queue_all(
    store: &StoreContextMut<'_, HostState>,
    outbox: &mut Outbox,
    payloads: &WasmList<u8>,
    spans: &WasmList<u32>,
) -> wasmtime::Result<Result<(), Partial>> {
    let bytes = payloads.as_le_slice(store);
    let words = spans.as_le_slice(store);
    let (mut index, mut offset) = (0, 0usize);
    for chunk in words.chunks(CHUNK) {
        let mut messages = [Message::Binary(&[]); CHUNK];
        for (i, (&word, message)) in chunk.iter().zip(&mut messages).enumerate() {
            let word = SpanWord::from_wire(word);
            *message = cut(
                bytes,
                &mut offset,
                word.is_text(),
                word.payload_len(),
                index + i,
            )?;
        }
        let whole = index == 0 && chunk.len() == words.len() && offset == bytes.len();
        if let Err(partial) = queue_chunk(outbox, &messages[..chunk.len()], whole, &mut index)? {
            return Ok(Err(partial));
        }
    }
    all_used(bytes.len(), offset)?;
    Ok(Ok(()))
}

/// Adds `wharf:websocket/packed-words-send` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.instance(INTERFACE)?.func_wrap(
        "send",
        |store: StoreContextMut<'_, HostState>,
         (this, payloads, spans): (Resource<ConnectionEntry>, WasmList<u8>, WasmList<u32>)| {
            with_outbox(store, &this, |store, outbox| {
                Ok((queue_all(store, outbox, &payloads, &spans)?,))
            })
        },
    )?;
    Ok(())
}
