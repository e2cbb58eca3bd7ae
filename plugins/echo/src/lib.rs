//! The smallest useful Wharf handler: an echo server.
//!
//! Demonstrates the four things every handler does:
//! - generating Rust bindings from the WIT contract with `wit_bindgen::generate!`,
//! - implementing the generated `Guest` trait (one method per event),
//! - answering through the `conn` handle (`send_text`, `send_binary`, `close`),
//! - exporting the implementation with `export!`,
//!
//! and two optional things:
//! - taking messages in batches and answering them in one call, which saves
//!   a call into the instance and one into the host per message when a
//!   client sends many at once. This echo takes them packed
//!   (`packed-words-handler`: one buffer of payloads and one list of span
//!   words, each a message's length and, in its top bit, whether it is
//!   binary) and sends them back the same way (`packed-words-send`), which
//!   also saves an allocation per message; `packed-handler` and
//!   `packed-send` are the same with a record per span, and `batch-handler`
//!   and `batch-send` with a list of messages, simpler to write for a
//!   handler that looks at each one;
//! - naming the lifecycle calls it wants (`lifecycle`): none. It accepts
//!   every upgrade as it is, has nothing to do when a connection opens and
//!   nothing to clean up when it closes, so the host makes none of those
//!   three calls, which saves about a seventh of what setting up a
//!   connection costs (a quarter with a shared instance). `on_upgrade`,
//!   `on_open` and `on_close` are still exported: hosts older than WIT
//!   0.1.10 call them. A handler that reads the request (`request-handler`
//!   lends it as a handle read on demand) or keeps state per connection
//!   names the calls it needs.
//!
//! Every text and binary message is sent straight back; the text "goodbye"
//! closes the connection with code 1000 instead.

// Reads ../../wit/websocket.wit and generates:
// - `exports::wharf::websocket::handler::Guest`, the trait we implement,
// - `wharf::websocket::connection::Connection`, the host's connection resource,
// - `wharf::websocket::types::*`, the shared records, variants and enums,
// - `exports::wharf::websocket::packed_words_handler::Guest`, the optional
//   batch export, and `exports::wharf::websocket::lifecycle::Guest`, the
//   optional export naming the lifecycle calls wanted
//   (`packed-words-lifecycle-handler-world` is `handler-world` plus both).
wit_bindgen::generate!({
    path: "../../wit",
    world: "packed-words-lifecycle-handler-world",
});

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::lifecycle::{Calls, Guest as LifecycleGuest};
use exports::wharf::websocket::packed_words_handler::Guest as PackedGuest;
use wharf::websocket::connection::Connection;
use wharf::websocket::packed_words_send;
use wharf::websocket::types::{Accept, CloseCode, UpgradeRequest, UpgradeResponse};

/// Our handler. It has no state: the host passes the connection to every call.
struct Echo;

impl Guest for Echo {
    /// Only hosts older than WIT 0.1.10 call this (see `wanted`): accept
    /// every upgrade request, without picking a subprotocol or adding
    /// response headers, which is what newer hosts do without asking.
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    /// Only hosts older than WIT 0.1.10 call this.
    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        echo_text(conn, &text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        echo_binary(conn, &data);
    }

    /// Only hosts older than WIT 0.1.10 call this. Nothing to clean up:
    /// the host drops this instance after the last call.
    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

/// Bit 31 of a span word: the message is binary. A text's word is its
/// length.
const BINARY: u32 = 1 << 31;

/// With this export, the host delivers the messages that arrive together
/// here, in order: message `i` is `spans[i]`, its payload the next
/// `spans[i] & !BINARY` bytes of `payloads`. (A message that arrives on its
/// own still goes to `on_text` or `on_binary`.)
impl PackedGuest for Echo {
    fn on_packed_words(conn: &Connection, payloads: Vec<u8>, spans: Vec<u32>) {
        // Everything goes back as it came, in one `packed-words-send` call,
        // but a "goodbye" closes: what came before it is echoed first.
        let (mut first_span, mut first_byte, mut offset) = (0, 0, 0);
        for (i, &span) in spans.iter().enumerate() {
            let end = offset + (span & !BINARY) as usize;
            // A text's word is its length: 7 for "goodbye".
            if span == 7 && &payloads[offset..end] == b"goodbye" {
                send_packed(conn, &payloads[first_byte..offset], &spans[first_span..i]);
                echo_text(conn, "goodbye");
                (first_span, first_byte) = (i + 1, end);
            }
            offset = end;
        }
        send_packed(conn, &payloads[first_byte..], &spans[first_span..]);
    }
}

impl LifecycleGuest for Echo {
    /// None of `on_upgrade`, `on_open` and `on_close`: asked once per
    /// deployed version, so the answer must not change.
    fn wanted() -> Calls {
        Calls::empty()
    }
}

fn send_packed(conn: &Connection, payloads: &[u8], spans: &[u32]) {
    if spans.is_empty() {
        return;
    }
    // On an error, the messages before `queued` went out and none after.
    if let Err(partial) = packed_words_send::send(conn, payloads, spans) {
        let dropped = spans.len() - partial.queued as usize;
        eprintln!(
            "echo: connection {}: {dropped} replies not sent: {}",
            conn.id(),
            partial.error
        );
    }
}

fn echo_text(conn: &Connection, text: &str) {
    let result = if text == "goodbye" {
        // Start the closing handshake; `on_close` follows when it ends.
        conn.close(CloseCode::Normal, "goodbye")
    } else {
        conn.send_text(text)
    };
    // Sends fail only in ordinary situations (the connection is closing, the
    // peer reads too slowly, ...). Log and carry on: anything written to
    // stderr ends up in the host's log.
    if let Err(e) = result {
        eprintln!("echo: connection {}: {e}", conn.id());
    }
}

fn echo_binary(conn: &Connection, data: &[u8]) {
    if let Err(e) = conn.send_binary(data) {
        eprintln!("echo: connection {}: {e}", conn.id());
    }
}

// Tell wit-bindgen which type implements the exported interfaces.
export!(Echo);
