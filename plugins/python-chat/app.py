"""Chat rooms in Python: plugins/chat (Rust) as a componentize-py handler.

Demonstrates `wharf:websocket/pubsub` from an interpreted language: each
connection subscribes to its room's topic, and a message is published once
to the topic; the host fans it out to every member without calling their
handlers.

Connect to `/chat/<room>?nick=<name>` (room "lobby" and nick "guest-<id>"
by default). Text messages go to the room as "<nick>: <text>"; "/nick NEW"
renames; joins, renames and leaves are announced as "* ...". Binary
messages are refused with 1003 (unsupported data). Every reply, header and
status is the same as the Rust chat's, byte for byte.

componentize-py generates the `wit_world` package from ../../wit at build
time (run `componentize-py -d ../../wit -w handler-world bindings gen` to
read it). The host creates one instance of the component per connection,
so the module global `member` is this connection's state. It is also kept
in the connection's attachment (`wharf:websocket/attachment`), so the chat
works with hibernation (`plugin.hibernate_after`): an idle member's
instance is released, its subscription stays with the host, and the
instance that takes its next event reads the room and nick back.
"""

import sys

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import attachment, pubsub
from wit_world.imports.connection import Connection
from wit_world.imports.types import (
    Accept,
    CloseCode_InternalError,
    CloseCode_UnsupportedData,
    ErrorCode,
    Header,
    Reject,
    UpgradeRequest,
    UpgradeResponse,
    UpgradeResponse_Accept,
    UpgradeResponse_Reject,
)

# Longest nickname (and room name), in bytes.
MAX_NICK = 32

# The characters a name may use. Spelled out: `str.isalnum` also accepts
# non-ASCII letters and digits, which the Rust chat refuses.
NAME_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)

# What Rust's `str::trim` removes (Unicode White_Space). Python's bare
# `str.strip()` also removes U+001C..U+001F, so "/nick \x1cbob" would be a
# valid rename here and an invalid one in Rust.
WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
    "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class Member:
    """This connection's room and nickname."""

    def __init__(self, room: str, nick: str) -> None:
        self.room = room
        self.nick = nick

    def save(self, conn: Connection) -> None:
        """Saved as "room nick" (neither can hold a space) for an instance
        woken from hibernation, which starts with `member` unset."""
        try:
            attachment.set(conn, f"{self.room} {self.nick}".encode())
        except Err as e:
            print(f"chat: saving the member: {describe(e)}", file=sys.stderr)


# Set by on_upgrade; None until then (and if the upgrade was refused), and
# in an instance woken from hibernation until `current` reads it back.
member: Member | None = None


def current(conn: Connection) -> Member | None:
    """This connection's member: this instance's, or the one saved in the
    attachment if the instance is new since (hibernation)."""
    global member
    if member is None:
        room, _, nick = bytes(attachment.get(conn)).decode(errors="replace").partition(" ")
        if nick:
            member = Member(room, nick)
    return member


def valid_name(s: str) -> bool:
    return 0 < len(s) <= MAX_NICK and all(c in NAME_CHARS for c in s)


def query_param(query: str | None, key: str) -> str | None:
    """The value of `key` in a query string (no percent-decoding: names are
    restricted to characters that need none)."""
    if query is None:
        return None
    prefix = key + "="
    for pair in query.split("&"):
        if pair.startswith(prefix):
            return pair[len(prefix):]
    return None


def reject(status: int, body: str) -> UpgradeResponse:
    return UpgradeResponse_Reject(Reject(status=status, headers=[], body=body))


def describe(e: Err) -> str:
    """An `error-code` as wit-bindgen's Display prints it in Rust."""
    code: ErrorCode = e.value
    return f"{code.name.lower().replace('_', '-')} (error {code.value})"


def publish(room: str, text: str, exclude: Connection | None) -> None:
    """Sends `text` to everyone in the room but `exclude` (if given)."""
    try:
        pubsub.publish_text(room, text, exclude)
    except Err as e:
        # stderr ends up in the host's log.
        print(f"chat: publish to {room}: {describe(e)}", file=sys.stderr)


def announce(room: str, text: str) -> None:
    """Sends `text` to everyone in the room (the sender included)."""
    publish(room, text, None)


class Handler(exports.Handler):
    def on_upgrade(self, conn: Connection, request: UpgradeRequest) -> UpgradeResponse:
        global member
        path = request.path
        if not path.startswith("/chat"):
            return reject(404, f"no chat at {path}; try /chat/<room>")
        rest = path[len("/chat"):]
        room = "lobby" if rest in ("", "/") else rest.lstrip("/")
        nick = query_param(request.query, "nick")
        if nick is None:
            nick = f"guest-{conn.id()}"
        if not valid_name(room) or not valid_name(nick):
            return reject(400, "room and nick: 1 to 32 of A-Z a-z 0-9 - _")
        member = Member(room, nick)
        return UpgradeResponse_Accept(
            Accept(subprotocol=None, headers=[Header(name="X-Chat-Room", value=room)])
        )

    def on_open(self, conn: Connection) -> None:
        m = member
        if m is None:
            return
        try:
            pubsub.subscribe(conn, m.room)
        except Err as e:
            print(f"chat: subscribe to {m.room}: {describe(e)}", file=sys.stderr)
            try:
                conn.close(CloseCode_InternalError(), "cannot join the room")
            except Err:
                pass
            return
        m.save(conn)
        announce(m.room, f"* {m.nick} joined {m.room}")

    def on_text(self, conn: Connection, text: str) -> None:
        m = current(conn)
        if m is None:
            return
        if text.startswith("/nick "):
            new = text[len("/nick "):].strip(WHITESPACE)
            if valid_name(new):
                announce(m.room, f"* {m.nick} is now {new}")
                m.nick = new
                m.save(conn)
            else:
                announce(m.room, f"* {m.nick}: invalid nick")
        else:
            announce(m.room, f"{m.nick}: {text}")

    def on_binary(self, conn: Connection, data: bytes) -> None:
        try:
            conn.close(CloseCode_UnsupportedData(), "text only")
        except Err:
            pass

    def on_close(self, conn: Connection, code: int, reason: str, clean: bool) -> None:
        # The host unsubscribes a closed connection itself; only the notice
        # is ours to send, to everyone else (`exclude` is an
        # `option<borrow<connection>>`: the Connection itself, or None).
        m = current(conn)
        if m is None:
            return
        publish(m.room, f"* {m.nick} left", conn)
