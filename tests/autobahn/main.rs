//! Autobahn|Testsuite, the conformance suite every serious WebSocket server
//! runs: `wstest -m fuzzingclient` against `wharf serve` with the echo
//! plugin, cases 1.* to 11.* (12 and 13 are compression, not offered yet),
//! over ws and over wss. A case passes only with the verdict OK or
//! INFORMATIONAL, for its behaviour and for its close behaviour.
//!
//! The suite (Python 2.7) is installed on first use by `install.sh` into
//! `target/autobahn`; `run.py` runs it and summarises `index.json`.

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::Mutex;

use support::{Server, ServerOpts};

/// Both runs load the machine: one at a time, so timing-sensitive cases
/// (6.4.*, fail-fast UTF-8 with delays) see a responsive server.
static SERIAL: Mutex<()> = Mutex::new(());

fn conformance(tls: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let server = Server::start(ServerOpts {
        tls,
        ..ServerOpts::new("echo")
    });
    let transport = if tls { "wss" } else { "ws" };
    let outdir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("autobahn-{transport}"));
    support::autobahn(&server.url(tls), "wharf", &outdir);
}

#[test]
fn autobahn_cases_1_to_11_over_ws() {
    conformance(false);
}

#[test]
fn autobahn_cases_1_to_11_over_wss() {
    conformance(true);
}
