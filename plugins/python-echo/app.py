"""The Wharf echo handler in Python.

Every text and binary message is sent straight back; the text "goodbye"
closes the connection with code 1000 instead.

componentize-py generates the `wit_world` package from ../../wit at build
time (run `componentize-py -d ../../wit -w text-batch-handler-world bindings
gen` to read it). The exported `handler` interface is implemented by a class named
`Handler` in this module, one method per event. The host creates one
instance of the component per connection, so module globals would be
per-connection state.

It is built for `text-batch-handler-world`, so it also implements
`BatchHandler` and `TextBatchHandler`: when a client sends several messages
at once, they come in one call instead of one `on_text`/`on_binary` call
each (a call into CPython costs several µs, more than echoing 1 KiB). A run
of texts comes to `on_texts` as one string and each one's length, so that
echoing it makes no Python object per message.
"""

import sys

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports.batch_handler import Message, Message_Text
from wit_world.imports import batch_send, latin1, text_batch_send
from wit_world.imports.batch_send import Outgoing_Text
from wit_world.imports.connection import Connection
from wit_world.imports.types import (
    Accept,
    CloseCode_Normal,
    UpgradeRequest,
    UpgradeResponse,
    UpgradeResponse_Accept,
)


def echo_text(conn: Connection, text: str) -> None:
    # A `result<_, error-code>` the host returns as an error is raised
    # as `Err(error_code)`: an ordinary event (closing, queue full, ...).
    try:
        if text == "goodbye":
            # Start the closing handshake; `on_close` follows when it ends.
            conn.close(CloseCode_Normal(), "goodbye")
        else:
            conn.send_text(text)
    except Err as e:
        # stderr ends up in the host's log.
        print(f"echo: connection {conn.id()}: {e.value}", file=sys.stderr)


def echo_binary(conn: Connection, data: bytes) -> None:
    # Sent as a latin-1 string (`wharf:websocket/latin1`): componentize-py
    # 0.25.1 never frees the buffer it lowers a `bytes` argument into, so
    # `conn.send_binary(data)` would leak its size in every call until the
    # instance ends; a `str` argument is freed. The host turns each code
    # point (U+0000-U+00FF) back into its byte.
    try:
        latin1.send_binary(conn, data.decode("latin-1"))
    except Err as e:
        print(f"echo: connection {conn.id()}: {e.value}", file=sys.stderr)


class Handler(exports.Handler):
    def on_upgrade(self, conn: Connection, request: UpgradeRequest) -> UpgradeResponse:
        # Accept every upgrade: no subprotocol, no extra response headers.
        return UpgradeResponse_Accept(Accept(subprotocol=None, headers=[]))

    def on_open(self, conn: Connection) -> None:
        pass

    def on_text(self, conn: Connection, text: str) -> None:
        echo_text(conn, text)

    def on_binary(self, conn: Connection, data: bytes) -> None:
        echo_binary(conn, data)

    def on_close(self, conn: Connection, code: int, reason: str, clean: bool) -> None:
        # Nothing to clean up: the host drops this instance after this call.
        pass


class BatchHandler(exports.BatchHandler):
    def on_messages(self, conn: Connection, messages: list[Message]) -> None:
        # The messages the host read at once, in order; treated exactly as
        # on_text/on_binary would. A run of texts goes back in one
        # batch-send call (a call into the host costs microseconds from
        # Python); binaries go one by one through latin1 (see echo_binary:
        # a `bytes` argument to the host would leak).
        texts: list[Outgoing_Text] = []
        for m in messages:
            if isinstance(m, Message_Text) and m.value != "goodbye":
                texts.append(Outgoing_Text(m.value))
                continue
            send_texts(conn, texts)
            texts = []
            if isinstance(m, Message_Text):
                echo_text(conn, m.value)
            else:
                echo_binary(conn, m.value)
        send_texts(conn, texts)


def send_texts(conn: Connection, texts: list[Outgoing_Text]) -> None:
    if not texts:
        return
    try:
        batch_send.send(conn, texts)
    except Err as e:
        # e.value: how many were queued, and why the next was refused.
        print(
            f"echo: connection {conn.id()}: {len(texts) - e.value.queued} replies not sent: {e.value.error}",
            file=sys.stderr,
        )


class TextBatchHandler(exports.TextBatchHandler):
    def on_texts(self, conn: Connection, texts: str, lens: list[int]) -> None:
        # Consecutive texts the host read at once: `texts` is their
        # payloads back to back and `lens` the UTF-8 length of each. With
        # no "goodbye" among them they go back as they came, in one call.
        # (No message of its length, 7 bytes: no "goodbye"; a search of the
        # string would cost more than the rest of the call.)
        if 7 not in lens:
            try:
                text_batch_send.send(conn, texts, lens)
            except Err as e:
                print(
                    f"echo: connection {conn.id()}: {len(lens) - e.value.queued} replies not sent: {e.value.error}",
                    file=sys.stderr,
                )
            return
        # Otherwise one at a time, in order. `lens` counts UTF-8 bytes; an
        # ASCII string's characters are its bytes.
        encoded = None if texts.isascii() else texts.encode()
        start = 0
        for n in lens:
            if encoded is None:
                text = texts[start : start + n]
            else:
                text = encoded[start : start + n].decode()
            start += n
            echo_text(conn, text)
