//! Test plugin (not an example): names the lifecycle calls it wants
//! (`lifecycle`, WIT 0.1.10) from its tenant's setting `wanted`, and traps
//! in any call it declined, for the end-to-end tests.
//!
//! - `wanted` answers the comma-separated calls of the setting (`upgrade`,
//!   `open`, `close`; empty: none) and counts how often it was asked;
//!   `trap` makes it trap.
//! - `on_upgrade` accepts with the header `X-On-Upgrade: called`;
//!   `on_open` sends the text "opened"; `on_close` publishes "closed CODE"
//!   to the topic "closes".
//! - A text "watch" subscribes the connection to "closes"; "asked" is
//!   answered with how often this instance's `wanted` was called; any
//!   other message is echoed.

wit_bindgen::generate!({
    path: "../../wit",
    world: "lifecycle-handler-world",
});

use std::sync::atomic::{AtomicU32, Ordering};

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::lifecycle::{Calls, Guest as LifecycleGuest};
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, Header, UpgradeRequest, UpgradeResponse};
use wharf::websocket::{config, pubsub};

/// How often this instance's `wanted` was called.
static ASKED: AtomicU32 = AtomicU32::new(0);

struct Probe;

/// The calls the tenant's setting names.
fn configured() -> Calls {
    let setting = config::get("wanted").unwrap_or_default();
    let mut calls = Calls::empty();
    for name in setting.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        calls |= match name {
            "upgrade" => Calls::UPGRADE,
            "open" => Calls::OPEN,
            "close" => Calls::CLOSE,
            other => panic!("lifecycle-probe: asked to trap in wanted ({other})"),
        };
    }
    calls
}

/// Traps unless the plugin said it wants `call`: the host must not make it.
fn expect(call: Calls, name: &str) {
    if !configured().contains(call) {
        panic!("lifecycle-probe: {name} called although declined");
    }
}

impl LifecycleGuest for Probe {
    fn wanted() -> Calls {
        ASKED.fetch_add(1, Ordering::Relaxed);
        configured()
    }
}

impl Guest for Probe {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        expect(Calls::UPGRADE, "on-upgrade");
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: vec![Header {
                name: "X-On-Upgrade".into(),
                value: "called".into(),
            }],
        })
    }

    fn on_open(conn: &Connection) {
        expect(Calls::OPEN, "on-open");
        let _ = conn.send_text("opened");
    }

    fn on_text(conn: &Connection, text: String) {
        let _ = match text.as_str() {
            "watch" => pubsub::subscribe(conn, "closes").and_then(|()| conn.send_text("watching")),
            "asked" => conn.send_text(&ASKED.load(Ordering::Relaxed).to_string()),
            _ => conn.send_text(&text),
        };
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }

    fn on_close(_conn: &Connection, code: u16, _reason: String, _clean: bool) {
        expect(Calls::CLOSE, "on-close");
        let _ = pubsub::publish_text("closes", &format!("closed {code}"), None);
    }
}

export!(Probe);
