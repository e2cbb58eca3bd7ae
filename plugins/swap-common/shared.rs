// Shared by the swap-shared-v1 and swap-shared-v2 test plugins (TEST-ONLY:
// the host's shared-mode hot-swap tests; not an example to copy). Each
// crate defines `VERSION` and includes this file, so the two components
// differ only in it. Meant for `instance = "shared"`: one instance keeps
// every connection's counter in its memory, and hands them to the next
// version through `wharf:websocket/snapshot`.
//
// - any text "X": counts it for its connection and answers
//   "<VERSION>:X n=<messages this connection sent so far>";
// - "total": answers "<VERSION> total=<messages every connection sent>"
//   (not counted);
// - "poison-restore": the next version's `restore` will refuse the state;
// - "poison-save": this version's next `save` traps;
// - "poison-restore-sends", "poison-save-sends": the same, and the failing
//   call first sends "lost" to every connection it counts (`peers`), which
//   the host can then not deliver and must count;
// - binary: echoed.

wit_bindgen::generate!({
    path: "../../wit",
    world: "snapshot-handler-world",
});

use std::cell::RefCell;
use std::collections::HashMap;

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::snapshot::Guest as Snapshot;
use wharf::websocket::connection::Connection;
use wharf::websocket::peers;
use wharf::websocket::types::{Accept, UpgradeRequest, UpgradeResponse};

/// The snapshot's format version.
const FORMAT: u8 = 1;
const POISON_RESTORE: u8 = 1;
const POISON_SAVE: u8 = 2;
const SENDS: u8 = 4;

#[derive(Default)]
struct Counters {
    /// Messages each connection sent, by id.
    per_conn: HashMap<u64, u64>,
    total: u64,
    flags: u8,
}

thread_local! {
    static STATE: RefCell<Counters> = RefCell::new(Counters::default());
}

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
        let reply = STATE.with_borrow_mut(|s| match text.as_str() {
            "total" => format!("{VERSION} total={}", s.total),
            "poison-restore" => {
                s.flags |= POISON_RESTORE;
                format!("{VERSION} poisoned")
            }
            "poison-save" => {
                s.flags |= POISON_SAVE;
                format!("{VERSION} poisoned")
            }
            "poison-restore-sends" => {
                s.flags |= POISON_RESTORE | SENDS;
                format!("{VERSION} poisoned")
            }
            "poison-save-sends" => {
                s.flags |= POISON_SAVE | SENDS;
                format!("{VERSION} poisoned")
            }
            _ => {
                let n = s.per_conn.entry(conn.id()).or_default();
                *n += 1;
                s.total += 1;
                format!("{VERSION}:{text} n={n}")
            }
        });
        if let Err(e) = conn.send_text(&reply) {
            eprintln!("{VERSION}: {e}");
        }
    }

    fn on_binary(conn: &Connection, data: Vec<u8>) {
        let _ = conn.send_binary(&data);
    }

    fn on_close(conn: &Connection, _code: u16, _reason: String, _clean: bool) {
        STATE.with_borrow_mut(|s| s.per_conn.remove(&conn.id()));
    }
}

impl Snapshot for Versioned {
    // [FORMAT][flags][total: u64 LE][(id: u64 LE, count: u64 LE)...]
    fn save() -> Vec<u8> {
        STATE.with_borrow(|s| {
            if s.flags & POISON_SAVE != 0 {
                send_lost(s);
                panic!("{VERSION}: poisoned save");
            }
            let mut out = Vec::with_capacity(10 + 16 * s.per_conn.len());
            out.extend([FORMAT, s.flags]);
            out.extend(s.total.to_le_bytes());
            for (id, n) in &s.per_conn {
                out.extend(id.to_le_bytes());
                out.extend(n.to_le_bytes());
            }
            out
        })
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        let [format, flags, rest @ ..] = state.as_slice() else {
            return Err("empty state".into());
        };
        if *format != FORMAT {
            return Err(format!("unknown format {format}"));
        }
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
        if rest.len() < 8 || (rest.len() - 8) % 16 != 0 {
            return Err(format!("truncated state ({} bytes)", state.len()));
        }
        let counters = Counters {
            total: word(&rest[..8]),
            per_conn: rest[8..]
                .chunks_exact(16)
                .map(|c| (word(&c[..8]), word(&c[8..])))
                .collect(),
            flags: *flags,
        };
        if flags & POISON_RESTORE != 0 {
            send_lost(&counters);
            return Err("poisoned".into());
        }
        STATE.set(counters);
        Ok(())
    }
}

/// With [`SENDS`] set: "lost" to every connection counted.
fn send_lost(s: &Counters) {
    if s.flags & SENDS != 0 {
        for id in s.per_conn.keys() {
            let _ = peers::send_text(*id, "lost");
        }
    }
}

export!(Versioned);
