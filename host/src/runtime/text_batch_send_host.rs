//! The host side of `wharf:websocket/text-batch-send`: the text messages
//! of one string queued in one call.
//!
//! `packed-send` for texts, in the two types that bindings which make an
//! object per record (componentize-py's) still pass as one object each: a
//! string and a `list<u32>`. Both are read in place from the plugin's
//! memory, and the messages are cut `CHUNK` at a time into a fixed buffer,
//! so nothing in the host grows with what the plugin passes.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList, WasmStr};

use super::HostState;
use super::batch_handler::Message;
use super::bindings::wharf::websocket::batch_send::Partial;
use super::connection_host::{ConnectionEntry, Outbox, with_outbox};
use super::packed_send_host::{CHUNK, queue_chunk};

/// The interface this implements (later 0.1.x plugins are matched to it by
/// semver).
const INTERFACE: &str = "wharf:websocket/text-batch-send@0.1.12";

/// A plugin's lengths that do not cut its string into messages: a trap.
#[derive(Debug, thiserror::Error)]
enum Malformed {
    #[error("length {index} runs past the end of the texts")]
    PastTheEnd { index: usize },
    #[error("length {index} ends inside a character")]
    SplitsACharacter { index: usize },
    #[error("the lengths leave {left} bytes of the texts unused")]
    Unused { left: usize },
}

/// Queues the texts `lens` cuts `texts` into, in order, until one is
/// refused; a send of few enough may be written at once instead
/// (`Outbox::write_through`). Malformed lengths trap before any message
/// of their chunk is queued.
fn queue_all(
    store: &StoreContextMut<'_, HostState>,
    outbox: &mut Outbox,
    texts: &WasmStr,
    lens: &WasmList<u32>,
) -> wasmtime::Result<Result<(), Partial>> {
    // UTF-8 checked once, for the whole string; each cut is then checked
    // to fall between characters.
    let texts = texts.to_str(store)?;
    let lens = lens.as_le_slice(store);
    let mut rest: &str = &texts;
    let mut index = 0;
    for chunk in lens.chunks(CHUNK) {
        let mut messages = [Message::Text(""); CHUNK];
        for (i, (len, slot)) in chunk.iter().zip(&mut messages).enumerate() {
            let at = index + i;
            let len = u32::from_le(*len) as usize;
            if len > rest.len() {
                return Err(Malformed::PastTheEnd { index: at }.into());
            }
            let (text, after) = rest
                .split_at_checked(len)
                .ok_or(Malformed::SplitsACharacter { index: at })?;
            *slot = Message::Text(text);
            rest = after;
        }
        let whole = index == 0 && chunk.len() == lens.len() && rest.is_empty();
        if let Err(partial) = queue_chunk(outbox, &messages[..chunk.len()], whole, &mut index)? {
            return Ok(Err(partial));
        }
    }
    if !rest.is_empty() {
        return Err(Malformed::Unused { left: rest.len() }.into());
    }
    Ok(Ok(()))
}

/// Adds `wharf:websocket/text-batch-send` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.instance(INTERFACE)?.func_wrap(
        "send",
        |store: StoreContextMut<'_, HostState>,
         (this, texts, lens): (Resource<ConnectionEntry>, WasmStr, WasmList<u32>)| {
            with_outbox(store, &this, |store, outbox| {
                Ok((queue_all(store, outbox, &texts, &lens)?,))
            })
        },
    )?;
    Ok(())
}
