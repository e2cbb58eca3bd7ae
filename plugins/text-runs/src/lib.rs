//! TEST-ONLY (`tests/e2e/batch.rs`): echoes texts and binaries, taking runs
//! of texts through `text-batch-handler` alone (no `batch-handler`, so the
//! messages between runs come one call each). The text "trap" traps,
//! wherever it comes. Not an example to copy: `python-echo` is one of a
//! `text-batch-handler`.

wit_bindgen::generate!({
    path: "../../wit",
    // `handler-world` plus `text-batch-handler`, without the
    // `batch-handler` that `text-batch-handler-world` includes.
    inline: "
        package wharf:text-runs;
        world text-runs {
            include wharf:websocket/handler-world@0.1.12;
            export wharf:websocket/text-batch-handler@0.1.12;
        }
    ",
    world: "wharf:text-runs/text-runs",
    generate_all,
});

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::text_batch_handler::Guest as TextBatchGuest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, UpgradeRequest, UpgradeResponse};

struct TextRuns;

fn echo(conn: &Connection, text: &str) {
    if text == "trap" {
        panic!("text-runs: trapping as asked");
    }
    if let Err(e) = conn.send_text(text) {
        eprintln!("text-runs: connection {}: {e:?}", conn.id());
    }
}

impl Guest for TextRuns {
    fn on_upgrade(_conn: &Connection, _request: UpgradeRequest) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        })
    }

    fn on_open(_conn: &Connection) {}

    fn on_text(conn: &Connection, text: String) {
        echo(conn, &text);
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        if let Err(e) = conn.send_binary(&data) {
            eprintln!("text-runs: connection {}: {e:?}", conn.id());
        }
    }

    fn on_close(_conn: &Connection, _code: u16, _reason: String, _clean: bool) {}
}

impl TextBatchGuest for TextRuns {
    fn on_texts(conn: &Connection, texts: String, lens: Vec<u32>) {
        let mut rest = texts.as_str();
        for len in lens {
            let (text, after) = rest.split_at(len as usize);
            rest = after;
            echo(conn, text);
        }
    }
}

export!(TextRuns);
