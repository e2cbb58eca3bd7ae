// Shared by the swap-v1 and swap-v2 test plugins (TEST-ONLY: the host's
// hot-swap tests; not an example to copy). Each crate defines `VERSION`
// and includes this file, so the two components differ only in it.
//
// - any text "X": answers "<VERSION>:X";
// - "count": adds one to a counter kept in the connection's attachment
//   (so it survives a migration to the other version) and answers
//   "<VERSION> count=<n>";
// - binary: echoed.

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::attachment;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, UpgradeRequest, UpgradeResponse};

struct Versioned;

impl Guest for Versioned {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        let reply = if text == "count" {
            let stored = attachment::get(conn);
            let n = u64::from_le_bytes(stored.try_into().unwrap_or([0; 8])) + 1;
            let _ = attachment::set(conn, &n.to_le_bytes());
            format!("{VERSION} count={n}")
        } else {
            format!("{VERSION}:{text}")
        };
        if let Err(e) = conn.send_text(&reply) {
            eprintln!("{VERSION}: {e}");
        }
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

export!(Versioned);
