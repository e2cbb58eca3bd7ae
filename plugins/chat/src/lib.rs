//! Chat rooms: the seed library's chat example as a Wharf handler.
//!
//! Demonstrates `wharf:websocket/pubsub`: each connection subscribes to its
//! room's topic, and a message is published once to the topic; the host
//! fans it out to every member without calling their handlers.
//!
//! Connect to `/chat/<room>?nick=<name>` (room "lobby" and nick "guest-<id>"
//! by default). Text messages go to the room as "<nick>: <text>"; "/nick NEW"
//! renames; joins, renames and leaves are announced as "* ...". Binary
//! messages are refused with 1003 (unsupported data).
//!
//! The room and nick are also kept in the connection's attachment
//! (`wharf:websocket/attachment`), so the chat works with hibernation
//! (`plugin.hibernate_after`): an idle member's instance is released, its
//! subscription stays with the host, and the instance that takes its next
//! event reads them back.

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use std::cell::RefCell;

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::types::{Accept, CloseCode, Header, Reject, UpgradeRequest, UpgradeResponse};
use wharf::websocket::{attachment, pubsub};

/// Longest nickname, in bytes.
const MAX_NICK: usize = 32;

/// This connection's state: the host runs one instance per connection.
struct Member {
    room: String,
    nick: String,
}

thread_local! {
    static MEMBER: RefCell<Option<Member>> = const { RefCell::new(None) };
}

impl Member {
    /// Saved as "room nick" (neither can hold a space) for an instance
    /// woken from hibernation, which starts with `MEMBER` empty.
    fn save(&self, conn: &Connection) {
        let saved = format!("{} {}", self.room, self.nick);
        if let Err(e) = attachment::set(conn, saved.as_bytes()) {
            eprintln!("chat: saving the member: {e}");
        }
    }

    fn load(conn: &Connection) -> Option<Member> {
        let saved = attachment::get(conn);
        let (room, nick) = std::str::from_utf8(&saved).ok()?.split_once(' ')?;
        Some(Member {
            room: room.to_owned(),
            nick: nick.to_owned(),
        })
    }
}

/// Runs `f` with this connection's member: this instance's, or the one
/// saved in the attachment if the instance is new since (hibernation).
fn with_member(conn: &Connection, f: impl FnOnce(&mut Member)) {
    MEMBER.with_borrow_mut(|m| {
        if m.is_none() {
            *m = Member::load(conn);
        }
        if let Some(m) = m {
            f(m);
        }
    });
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NICK
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The value of `key` in a query string (no percent-decoding: names are
/// restricted to characters that need none).
fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
}

fn reject(status: u16, body: String) -> UpgradeResponse {
    UpgradeResponse::Reject(Reject {
        status,
        headers: Vec::new(),
        body,
    })
}

/// Sends `text` to everyone in the room (the sender included).
fn announce(room: &str, text: &str) {
    if let Err(e) = pubsub::publish_text(room, text, None) {
        eprintln!("chat: publish to {room}: {e}");
    }
}

struct Chat;

impl Guest for Chat {
    fn on_upgrade(conn: &Connection, request: UpgradeRequest) -> UpgradeResponse {
        let room = match request.path.strip_prefix("/chat") {
            Some("" | "/") => "lobby",
            Some(rest) => rest.trim_start_matches('/'),
            None => {
                return reject(
                    404,
                    format!("no chat at {}; try /chat/<room>", request.path),
                );
            }
        };
        let nick = query_param(request.query.as_deref(), "nick")
            .map(str::to_owned)
            .unwrap_or_else(|| format!("guest-{}", conn.id()));
        if !valid_name(room) || !valid_name(&nick) {
            return reject(400, "room and nick: 1 to 32 of A-Z a-z 0-9 - _".to_owned());
        }
        MEMBER.with_borrow_mut(|m| {
            *m = Some(Member {
                room: room.to_owned(),
                nick,
            })
        });
        UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: vec![Header {
                name: "X-Chat-Room".into(),
                value: room.to_owned(),
            }],
        })
    }

    fn on_open(conn: &Connection) {
        MEMBER.with_borrow(|m| {
            let Some(m) = m else { return };
            if let Err(e) = pubsub::subscribe(conn, &m.room) {
                eprintln!("chat: subscribe to {}: {e}", m.room);
                let _ = conn.close(CloseCode::InternalError, "cannot join the room");
                return;
            }
            m.save(conn);
            announce(&m.room, &format!("* {} joined {}", m.nick, m.room));
        });
    }

    fn on_text(conn: &Connection, text: String) {
        with_member(conn, |m| match text.strip_prefix("/nick ") {
            Some(new) if valid_name(new.trim()) => {
                let new = new.trim().to_owned();
                announce(&m.room, &format!("* {} is now {new}", m.nick));
                m.nick = new;
                m.save(conn);
            }
            Some(_) => announce(&m.room, &format!("* {}: invalid nick", m.nick)),
            None => announce(&m.room, &format!("{}: {text}", m.nick)),
        });
    }

    fn on_binary(conn: &Connection, _data: Vec<u8>) {
        let _ = conn.close(CloseCode::UnsupportedData, "text only");
    }

    fn on_close(conn: &Connection, _code: u16, _reason: String, _clean: bool) {
        // The host unsubscribes a closed connection itself; only the notice
        // is ours to send, to everyone else.
        with_member(conn, |m| {
            let notice = format!("* {} left", m.nick);
            if let Err(e) = pubsub::publish_text(&m.room, &notice, Some(conn)) {
                eprintln!("chat: publish to {}: {e}", m.room);
            }
        });
    }
}

export!(Chat);
