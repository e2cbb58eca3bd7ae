//! A component that does NOT implement Wharf's `handler-world`, for the host's
//! tests. Do not copy it.
//!
//! It is built from its own `wit/world.wit`, a copy of the contract whose
//! `handler` interface lacks `on-close`. The host's load-time check must refuse
//! it and name the missing export (`wharf:websocket/handler@0.1.0#on-close`).

wit_bindgen::generate!({
    path: "wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, UpgradeRequest, UpgradeResponse};

struct Incomplete;

impl Guest for Incomplete {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        let _ = conn.send_text(&text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }
}

export!(Incomplete);
