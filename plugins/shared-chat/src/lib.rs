//! Chat rooms kept in the handler's own memory: the chat example for a
//! tenant in shared instance mode (`instance = "shared"` in its
//! `[[tenant]]` table), where one instance serves all of the tenant's
//! connections, one event at a time.
//!
//! The instance keeps every room's members and nicknames in a table keyed
//! by connection id, and fans a message out itself with
//! `wharf:websocket/peers` (no topics), so it can also answer questions
//! about the room ("/who"). The protocol is the chat example's: connect to
//! `/chat/<room>?nick=<name>`; text messages go to the room as
//! "<nick>: <text>"; "/nick NEW" renames; "/who" lists the room; joins,
//! renames and leaves are announced as "* ...".
//!
//! Served per connection, each instance would see only its own connection:
//! the rooms would be empty. If the shared instance fails, the host closes
//! every connection with 1011 and the next ones start a new, empty one.

wit_bindgen::generate!({
    path: "../../wit",
    world: "handler-world",
});

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use exports::wharf::websocket::handler::Guest;
use wharf::websocket::connection::Connection;
use wharf::websocket::peers;
use wharf::websocket::types::{Accept, CloseCode, Header, Reject, UpgradeRequest, UpgradeResponse};

/// Longest nickname or room name, in bytes.
const MAX_NAME: usize = 32;

struct Member {
    room: String,
    nick: String,
}

#[derive(Default)]
struct Rooms {
    /// Every connection this instance serves, by id.
    members: HashMap<u64, Member>,
    /// Each room's connection ids, in joining order.
    rooms: BTreeMap<String, Vec<u64>>,
}

thread_local! {
    static ROOMS: RefCell<Rooms> = RefCell::new(Rooms::default());
}

impl Rooms {
    /// Sends `text` to everyone in `room` but `except`.
    fn say(&self, room: &str, text: &str, except: Option<u64>) {
        for &id in self.rooms.get(room).into_iter().flatten() {
            if Some(id) != except
                && let Err(e) = peers::send_text(id, text)
            {
                // A slow member misses it (queue-full); a closing one too.
                eprintln!("shared-chat: to {id}: {e}");
            }
        }
    }

    fn leave(&mut self, id: u64) -> Option<Member> {
        let member = self.members.remove(&id)?;
        if let Some(ids) = self.rooms.get_mut(&member.room) {
            ids.retain(|&m| m != id);
            if ids.is_empty() {
                self.rooms.remove(&member.room);
            }
        }
        Some(member)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

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

struct SharedChat;

impl Guest for SharedChat {
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
            .unwrap_or_else(|| format!("guest-{}", conn.id() % 10_000));
        if !valid_name(room) || !valid_name(&nick) {
            return reject(400, "room and nick: 1 to 32 of A-Z a-z 0-9 - _".to_owned());
        }
        ROOMS.with_borrow_mut(|r| {
            r.members.insert(
                conn.id(),
                Member {
                    room: room.to_owned(),
                    nick,
                },
            )
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
        ROOMS.with_borrow_mut(|r| {
            let Some(m) = r.members.get(&conn.id()) else {
                return;
            };
            let (room, notice) = (m.room.clone(), format!("* {} joined {}", m.nick, m.room));
            r.rooms.entry(room.clone()).or_default().push(conn.id());
            r.say(&room, &notice, None);
        });
    }

    fn on_text(conn: &Connection, text: String) {
        ROOMS.with_borrow_mut(|r| {
            let Some(m) = r.members.get_mut(&conn.id()) else {
                return;
            };
            let room = m.room.clone();
            let line = match text.strip_prefix("/nick ") {
                Some(new) if valid_name(new.trim()) => {
                    let new = new.trim().to_owned();
                    let line = format!("* {} is now {new}", m.nick);
                    m.nick = new;
                    line
                }
                Some(_) => format!("* {}: invalid nick", m.nick),
                None if text == "/who" => {
                    let nicks: Vec<&str> = r.rooms[&room]
                        .iter()
                        .filter_map(|id| r.members.get(id).map(|m| m.nick.as_str()))
                        .collect();
                    let _ = conn.send_text(&format!("* in {room}: {}", nicks.join(", ")));
                    return;
                }
                None => format!("{}: {text}", m.nick),
            };
            r.say(&room, &line, None);
        });
    }

    fn on_binary(conn: &Connection, _data: Vec<u8>) {
        let _ = conn.close(CloseCode::UnsupportedData, "text only");
    }

    fn on_close(conn: &Connection, _code: u16, _reason: String, _clean: bool) {
        ROOMS.with_borrow_mut(|r| {
            if let Some(m) = r.leave(conn.id()) {
                r.say(&m.room, &format!("* {} left", m.nick), None);
            }
        });
    }
}

export!(SharedChat);
