//! Deciding who may connect: inspecting the upgrade request in `on_upgrade`.
//!
//! A port of the request-filter example of a Pony WebSocket library. The
//! handler accepts only requests for the path `/ws` whose `Origin` header
//! names one of `ALLOWED_ORIGINS`, and refuses everything else with a plain
//! HTTP response:
//! - another path: 404 "no WebSocket endpoint at <path>",
//! - a missing or unknown origin: 403 "origin not allowed: <origin or (none)>".
//!
//! It also shows subprotocol negotiation (it picks "chat" when the client
//! offers it). Accepted connections echo every message back.
//!
//! The host checks `Origin` too, before any plugin runs (same-origin unless
//! `allowed_origins` says otherwise): to let this handler decide, serve it
//! with `allowed_origins = ["*"]`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, Reject, UpgradeRequest, UpgradeResponse};

/// The only path that serves WebSocket connections.
const ENDPOINT: &str = "/ws";

/// Pages allowed to open a connection (browsers send their origin in the
/// `Origin` header; this stops other sites from using a visitor's browser
/// to connect).
const ALLOWED_ORIGINS: &[&str] = &["http://localhost:8080", "http://127.0.0.1:8080"];

/// The subprotocol we speak, if the client offers it.
const SUBPROTOCOL: &str = "chat";

struct RequestFilter;

/// Builds a rejection with a text body and no extra headers.
fn reject(status: u16, body: String) -> UpgradeResponse {
    UpgradeResponse::Reject(Reject {
        status,
        headers: Vec::new(),
        body,
    })
}

impl Guest for RequestFilter {
    fn on_upgrade(_conn: &Connection, request: UpgradeRequest) -> UpgradeResponse {
        if request.path != ENDPOINT {
            return reject(404, format!("no WebSocket endpoint at {}", request.path));
        }

        // Header names keep the client's spelling: compare them ignoring case.
        let origin = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("origin"))
            .map(|h| h.value.as_str());
        match origin {
            Some(origin) if ALLOWED_ORIGINS.contains(&origin) => {}
            _ => {
                let shown = origin.unwrap_or("(none)");
                return reject(403, format!("origin not allowed: {shown}"));
            }
        }

        // Only answer with a subprotocol the client offered; naming any other
        // one is a handler bug the host answers with 500.
        let subprotocol = request
            .subprotocols
            .iter()
            .find(|p| *p == SUBPROTOCOL)
            .cloned();
        UpgradeResponse::Accept(Accept {
            subprotocol,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        if let Err(e) = conn.send_text(&text) {
            eprintln!("request-filter: connection {}: {e}", conn.id());
        }
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        if let Err(e) = conn.send_binary(&data) {
            eprintln!("request-filter: connection {}: {e}", conn.id());
        }
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

export!(RequestFilter);
