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
//!
//! The rooms survive a redeploy: the handler exports
//! `wharf:websocket/snapshot` (it targets `snapshot-handler-world`), so a
//! `migrate` deploy (`wharf deploy chat NEW.wasm --policy migrate`) hands
//! them to the new version with `save` and `restore` (below), between two
//! events, and every connection stays in its room. Keep the format
//! readable by the next version you deploy: its first byte here is a
//! format number, which `restore` checks.

wit_bindgen::generate!({
    path: "../../wit",
    world: "snapshot-handler-world",
});

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use exports::wharf::websocket::handler::Guest;
use exports::wharf::websocket::snapshot::Guest as Snapshot;
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

/// The snapshot's format: this byte, then one line per room,
/// "<room> <id>:<nick> <id>:<nick>...\n" (members in joining order), then
/// one line "- <id>:<room>:<nick>" per connection that has not joined its
/// room yet (between `on-upgrade` and `on-open`). Names never hold a space,
/// a colon or a newline (see `valid_name`).
const FORMAT: u8 = 1;

impl Snapshot for SharedChat {
    fn save() -> Vec<u8> {
        use std::fmt::Write as _;
        ROOMS.with_borrow(|r| {
            let mut text = String::new();
            let mut joined = std::collections::HashSet::new();
            for (room, ids) in &r.rooms {
                text.push_str(room);
                for id in ids {
                    if let Some(m) = r.members.get(id) {
                        let _ = write!(text, " {id}:{}", m.nick);
                        joined.insert(*id);
                    }
                }
                text.push('\n');
            }
            for (id, m) in &r.members {
                if !joined.contains(id) {
                    let _ = writeln!(text, "- {id}:{}:{}", m.room, m.nick);
                }
            }
            let mut out = vec![FORMAT];
            out.extend(text.into_bytes());
            out
        })
    }

    fn restore(state: Vec<u8>) -> Result<(), String> {
        let (&format, text) = state.split_first().ok_or("empty state")?;
        if format != FORMAT {
            return Err(format!("unknown snapshot format {format}"));
        }
        let text = std::str::from_utf8(text).map_err(|e| e.to_string())?;
        let bad = |line: &str| format!("bad snapshot line {line:?}");
        let mut rooms = Rooms::default();
        for line in text.lines() {
            let mut words = line.split(' ');
            let head = words.next().unwrap_or_default();
            if head == "-" {
                let entry = words.next().ok_or_else(|| bad(line))?;
                let mut parts = entry.splitn(3, ':');
                let (Some(id), Some(room), Some(nick)) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad(line));
                };
                let id = id.parse().map_err(|_| bad(line))?;
                rooms.members.insert(
                    id,
                    Member {
                        room: room.to_owned(),
                        nick: nick.to_owned(),
                    },
                );
                continue;
            }
            let ids = rooms.rooms.entry(head.to_owned()).or_default();
            for entry in words {
                let (id, nick) = entry.split_once(':').ok_or_else(|| bad(line))?;
                let id = id.parse().map_err(|_| bad(line))?;
                ids.push(id);
                rooms.members.insert(
                    id,
                    Member {
                        room: head.to_owned(),
                        nick: nick.to_owned(),
                    },
                );
            }
        }
        ROOMS.set(rooms);
        Ok(())
    }
}

export!(SharedChat);
