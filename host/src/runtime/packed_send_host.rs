//! The host side of `wharf:websocket/packed-send`: the messages of one
//! buffer queued in one call.
//!
//! `batch-send` lifts one `outgoing` per message, each its own string or
//! list in the plugin's memory. Here the payloads are one list, read in
//! place, and the spans are lifted `CHUNK` at a time into a fixed buffer
//! (the payloads cannot be read while a lifting iterator holds the store),
//! so nothing in the host grows with what the plugin passes.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList};

use super::HostState;
use super::batch_handler::Message;
use super::bindings::wharf::websocket::batch_send::Partial;
use super::bindings::wharf::websocket::packed::{Kind, Span};
use super::connection_host::{ConnectionEntry, Outbox, with_outbox};

/// The interface this implements (older 0.1.x plugins are matched to it by
/// semver).
const INTERFACE: &str = "wharf:websocket/packed-send@0.1.12";

/// Spans lifted at once: a batch the host delivered (at most 1024
/// messages) comes back in a few chunks, on the stack of the plugin's call.
pub(super) const CHUNK: usize = 256;

/// A plugin's spans that do not describe its payloads: a trap.
#[derive(Debug, thiserror::Error)]
pub(super) enum Malformed {
    #[error("span {index} runs past the end of the payloads")]
    PastTheEnd { index: usize },
    #[error("the spans leave {left} bytes of the payloads unused")]
    Unused { left: usize },
    #[error("span {index} is text but not valid UTF-8")]
    NotUtf8 { index: usize },
}

/// Message `index` of a send: the `len` bytes of `payloads` from `offset`
/// on, which moves past them.
pub(super) fn cut<'a>(
    payloads: &'a [u8],
    offset: &mut usize,
    text: bool,
    len: usize,
    index: usize,
) -> Result<Message<'a>, Malformed> {
    let payload = offset
        .checked_add(len)
        .and_then(|end| payloads.get(*offset..end))
        .ok_or(Malformed::PastTheEnd { index })?;
    *offset += len;
    Ok(if text {
        Message::Text(
            simdutf8::basic::from_utf8(payload).map_err(|_| Malformed::NotUtf8 { index })?,
        )
    } else {
        Message::Binary(payload)
    })
}

/// The spans ended at `offset`: they must have used every byte.
pub(super) fn all_used(payloads: usize, offset: usize) -> Result<(), Malformed> {
    match payloads - offset {
        0 => Ok(()),
        left => Err(Malformed::Unused { left }),
    }
}

/// Lifts `spans[start..]` into `out`, as many as fit; how many.
fn lift_chunk(
    store: &mut StoreContextMut<'_, HostState>,
    spans: &WasmList<Span>,
    start: usize,
    out: &mut [Span; CHUNK],
) -> wasmtime::Result<usize> {
    let count = out.len().min(spans.len() - start);
    if start == 0 {
        // One lifting context for the chunk. An iterator cannot resume
        // where a dropped one stopped without lifting what came before,
        // so the (rare) later chunks are lifted one span at a time.
        for (slot, span) in out[..count].iter_mut().zip(spans.iter(&mut *store)?) {
            *slot = span?;
        }
    } else {
        for (offset, slot) in out[..count].iter_mut().enumerate() {
            let span = spans.get(&mut *store, start + offset);
            *slot = span.ok_or(Malformed::PastTheEnd {
                index: start + offset,
            })??;
        }
    }
    Ok(count)
}

/// Queues the messages `spans` cuts `payloads` into, in order, until one is
/// refused; a send of few enough messages may be written at once instead
/// (`Outbox::write_through`). Malformed spans trap, as invalid UTF-8
/// does in `send-text`, before any message of their chunk is queued.
fn queue_all(
    store: &mut StoreContextMut<'_, HostState>,
    outbox: &mut Outbox,
    payloads: &WasmList<u8>,
    spans: &WasmList<Span>,
) -> wasmtime::Result<Result<(), Partial>> {
    let mut chunk = [Span {
        kind: Kind::Binary,
        len: 0,
    }; CHUNK];
    let mut index = 0;
    let mut offset = 0usize;
    while index < spans.len() {
        let count = lift_chunk(store, spans, index, &mut chunk)?;
        let bytes = payloads.as_le_slice(&*store);
        let mut messages = [Message::Binary(&[]); CHUNK];
        for (i, (span, message)) in chunk[..count].iter().zip(&mut messages).enumerate() {
            let text = matches!(span.kind, Kind::Text);
            *message = cut(bytes, &mut offset, text, span.len as usize, index + i)?;
        }
        let whole = index == 0 && count == spans.len() && offset == bytes.len();
        if let Err(partial) = queue_chunk(outbox, &messages[..count], whole, &mut index)? {
            return Ok(Err(partial));
        }
    }
    all_used(payloads.len(), offset)?;
    Ok(Ok(()))
}

/// Queues one chunk of a send's messages, checked, until one is refused;
/// `index` counts those queued from the send's first. `whole`: the chunk
/// is the whole send, well-formed, so it is offered at once if it may be.
pub(super) fn queue_chunk(
    outbox: &mut Outbox,
    messages: &[Message<'_>],
    whole: bool,
    index: &mut usize,
) -> wasmtime::Result<Result<(), Partial>> {
    if whole && outbox.write_through(messages) {
        *index += messages.len();
        return Ok(Ok(()));
    }
    for message in messages {
        let queued = match *message {
            Message::Text(text) => outbox.send_text(text),
            Message::Binary(data) => outbox.send_binary(data),
        };
        if let Err(error) = queued {
            return Ok(Err(Partial {
                // Below the list's length, which the canonical ABI keeps
                // within 32 bits.
                queued: u32::try_from(*index)?,
                error,
            }));
        }
        *index += 1;
    }
    Ok(Ok(()))
}

/// `packed` declares types only.
impl super::bindings::wharf::websocket::packed::Host for HostState {}

/// Adds `wharf:websocket/packed-send` to the linker.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.instance(INTERFACE)?.func_wrap(
        "send",
        |store: StoreContextMut<'_, HostState>,
         (this, payloads, spans): (Resource<ConnectionEntry>, WasmList<u8>, WasmList<Span>)| {
            with_outbox(store, &this, |store, outbox| {
                Ok((queue_all(store, outbox, &payloads, &spans)?,))
            })
        },
    )?;
    Ok(())
}
