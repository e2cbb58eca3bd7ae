//! The smallest useful Wharf handler: an echo server.
//!
//! Demonstrates the four things every handler does:
//! - generating Rust bindings from the WIT contract with `wit_bindgen::generate!`,
//! - implementing the generated `Guest` trait (one method per event),
//! - answering through the `conn` handle (`send_text`, `send_binary`, `close`),
//! - exporting the implementation with `export!`,
//!
//! and one optional thing: taking messages in batches (`batch-handler`) and
//! answering them in one call (`batch-send`), which saves a call into the
//! instance and one into the host per message when a client sends many at
//! once.
//!
//! Every text and binary message is sent straight back; the text "goodbye"
//! closes the connection with code 1000 instead.

// Reads ../../wit/websocket.wit and generates:
// - `exports::wharf::websocket::handler::Guest`, the trait we implement,
// - `wharf::websocket::connection::Connection`, the host's connection resource,
// - `wharf::websocket::types::*`, the shared records, variants and enums,
// - `exports::wharf::websocket::batch_handler::Guest`, the optional batch
//   export (`batch-handler-world` is `handler-world` plus it).
wit_bindgen::generate!({
    path: "../../wit",
    world: "batch-handler-world",
});

use exports::wharf::websocket::batch_handler::{Guest as BatchGuest, Message};
use exports::wharf::websocket::handler::Guest;
use wharf::websocket::batch_send::{self, Outgoing};
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, CloseCode, UpgradeRequest, UpgradeResponse};

/// Our handler. It has no state: the host passes the connection to every call.
struct Echo;

impl Guest for Echo {
    /// Accept every upgrade request, without picking a subprotocol or adding
    /// response headers.
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        echo_text(conn, &text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        echo_binary(conn, &data);
    }

    /// Nothing to clean up: the host drops this instance after the last call.
    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

/// With this export, the host delivers every message here (and no longer
/// calls `on_text`/`on_binary`): all that arrived together, in order.
impl BatchGuest for Echo {
    fn on_messages(conn: &Connection, messages: Vec<Message>) {
        // The echoes go back in one `batch-send` call. Moving each payload
        // into an `Outgoing` copies no bytes.
        let mut replies = Vec::with_capacity(messages.len());
        for message in messages {
            match message {
                Message::Text(text) if text == "goodbye" => {
                    // What came before the goodbye is echoed before the close.
                    send_all(conn, &std::mem::take(&mut replies));
                    echo_text(conn, &text);
                }
                Message::Text(text) => replies.push(Outgoing::Text(text)),
                Message::Binary(data) => replies.push(Outgoing::Binary(data)),
            }
        }
        send_all(conn, &replies);
    }
}

fn send_all(conn: &Connection, replies: &[Outgoing]) {
    if replies.is_empty() {
        return;
    }
    // On an error, the messages before `queued` went out and none after.
    if let Err(partial) = batch_send::send(conn, replies) {
        let dropped = replies.len() - partial.queued as usize;
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
