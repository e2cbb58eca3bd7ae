//! Closing a connection: the `close-code` variant and the errors `close` returns.
//!
//! A port of the close-codes example. Text commands:
//! - "kick": close with 1008 (policy violation), reason "kicked",
//! - "bye": close with 1000 (normal),
//! - "app": close with the application code 4000, reason "app close",
//! - "bad-code": try the code 1234, which the host refuses with
//!   `error-code::invalid-code`; we answer "invalid-code",
//! - "long-reason": try a 200-byte reason (the limit is 123 bytes), which the
//!   host refuses with `error-code::reason-too-long`; we answer
//!   "reason-too-long".
//!
//! Anything else is echoed. `on_close` logs how the connection ended.

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, CloseCode, ErrorCode, UpgradeRequest, UpgradeResponse};

struct CloseCodes;

/// Logs a failed send or close; the handler keeps going either way.
fn log_err(conn: &Connection, result: Result<(), ErrorCode>) {
    if let Err(e) = result {
        eprintln!("close-codes: connection {}: {e}", conn.id());
    }
}

impl Guest for CloseCodes {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        // `CloseCode` is a WIT variant, so a Rust enum: named codes are unit
        // variants and `Application` carries a u16 the host range-checks.
        let result = match text.as_str() {
            "kick" => conn.close(CloseCode::PolicyViolation, "kicked"),
            "bye" => conn.close(CloseCode::Normal, ""),
            "app" => conn.close(CloseCode::Application(4000), "app close"),
            "bad-code" => match conn.close(CloseCode::Application(1234), "") {
                // The host refused the code and the connection stays open,
                // so we can still tell the client.
                Err(ErrorCode::InvalidCode) => conn.send_text("invalid-code"),
                other => other,
            },
            "long-reason" => match conn.close(CloseCode::Normal, &"x".repeat(200)) {
                Err(ErrorCode::ReasonTooLong) => conn.send_text("reason-too-long"),
                other => other,
            },
            _ => conn.send_text(&text),
        };
        log_err(conn, result);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        log_err(conn, conn.send_binary(&data));
    }

    /// `code` is what the peer sent (or 1005/1006/... see the WIT docs) and
    /// `clean` says whether both close frames were exchanged.
    fn on_close(conn: &Connection, code: u16, reason: String, clean: bool) {
        eprintln!(
            "close-codes: connection {} closed: code={code} reason={reason:?} clean={clean}",
            conn.id()
        );
    }
}

export!(CloseCodes);
