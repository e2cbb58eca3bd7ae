//! Test plugin (not an example): reports what it reads through the
//! `request` handle of `request-handler` (WIT 0.1.9), for the end-to-end
//! tests.
//!
//! `on_request` reads every field and sends one text message, written right
//! after the 101: a line `name=value` per field. A request with an
//! `X-Reject` header is refused with 418 and that header's value as the
//! body. `on_upgrade` refuses with 500: a host that exports
//! `request-handler` must never call it.

wit_bindgen::generate!({
    path: "../../wit",
    world: "request-handler-world",
});

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::request_handler::Guest as RequestGuest;
use wharf::websocket::connection::Connection;
use wharf::websocket::request::Request;
use wharf::websocket::types::{Accept, Reject, UpgradeRequest, UpgradeResponse};

struct Probe;

impl RequestGuest for Probe {
    fn on_request(conn: &Connection, request: &Request) -> UpgradeResponse {
        if let Some(why) = request.header("x-reject") {
            return UpgradeResponse::Reject(Reject {
                status: 418,
                headers: Vec::new(),
                body: why,
            });
        }
        let headers = request.headers();
        let report = [
            format!("method={}", request.method()),
            format!("path={}", request.path()),
            format!("query={}", request.query().unwrap_or_else(|| "-".into())),
            format!("x-probe={}", request.header("X-PROBE").unwrap_or_default()),
            format!("absent={:?}", request.header("x-absent")),
            format!("headers={}", headers.len()),
            format!("first={}", headers.first().map_or("", |h| h.name.as_str())),
            format!("subprotocols={}", request.subprotocols().join(",")),
            format!("remote={}", request.remote_address()),
            format!("tls={}", request.tls()),
        ]
        .join("\n");
        if let Err(e) = conn.send_text(&report) {
            eprintln!("request-probe: {e}");
        }
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }
}

impl Guest for Probe {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Reject(Reject {
            status: 500,
            headers: Vec::new(),
            body: "on-upgrade called although on-request is exported".into(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        let _ = conn.send_text(&text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

export!(Probe);
