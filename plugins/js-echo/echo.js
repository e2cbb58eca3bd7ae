// The Wharf echo handler in JavaScript.
//
// Every text and binary message is sent straight back; the text "goodbye"
// closes the connection with code 1000 instead.
//
// componentize-js maps the WIT to JavaScript as jco does: the exported
// `handler` interface is an exported object with one camelCase method per
// event; `conn` is the host's `connection` resource, with `id()`,
// `sendText(string)`, `sendBinary(Uint8Array)` and `close(code, reason)`;
// variants are `{ tag, val }` objects, an `option` is a value or
// `undefined`, and a `result` error is thrown (its `payload` is the
// `error-code`, a string such as "queue-full").
//
// It is built for `batch-handler-world`, so it also exports `batchHandler`:
// when a client sends several messages at once, they come in one
// `onMessages` call instead of one `onText`/`onBinary` call each (a call
// into the JS engine costs ~10 µs, more than echoing 1 KiB).

import { send } from "wharf:websocket/batch-send@0.1.11";

function echoText(conn, text) {
  try {
    if (text === "goodbye") {
      // Start the closing handshake; onClose follows when it ends.
      conn.close({ tag: "normal" }, "goodbye");
    } else {
      conn.sendText(text);
    }
  } catch (e) {
    logError(conn, e);
  }
}

function echoBinary(conn, data) {
  try {
    conn.sendBinary(data);
  } catch (e) {
    logError(conn, e);
  }
}

function logError(conn, e) {
  // Anything written to stderr (console.error) ends up in the host's log.
  console.error(`echo: connection ${conn.id()}: ${e.payload ?? e}`);
}

export const handler = {
  // Accept every upgrade request, without a subprotocol or extra headers.
  onUpgrade(conn, request) {
    return { tag: "accept", val: { subprotocol: undefined, headers: [] } };
  },

  onOpen(conn) {},

  onText(conn, text) {
    echoText(conn, text);
  },

  onBinary(conn, data) {
    echoBinary(conn, data);
  },

  // Nothing to clean up: the host drops this instance after this call.
  onClose(conn, code, reason, clean) {},
};

// The messages the host read at once, in order: each one `{ tag: "text",
// val: string }` or `{ tag: "binary", val: Uint8Array }`, the shape
// `batch-send` takes too, so the batch goes straight back in one call into
// the host; a "goodbye" closes after the echoes of those before it.
export const batchHandler = {
  onMessages(conn, messages) {
    let start = 0;
    // Only a text's `val` is a string: one comparison per message.
    for (let i = 0, n = messages.length; i < n; i++) {
      if (messages[i].val === "goodbye") {
        sendAll(conn, messages.slice(start, i));
        echoText(conn, "goodbye");
        start = i + 1;
      }
    }
    sendAll(conn, start === 0 ? messages : messages.slice(start));
  },
};

function sendAll(conn, messages) {
  if (messages.length === 0) return;
  try {
    send(conn, messages);
  } catch (e) {
    // e.payload: { queued, error }; the messages from `queued` on were not sent.
    const p = e.payload;
    console.error(`echo: connection ${conn.id()}: ${p ? `${messages.length - p.queued} replies not sent: ${p.error}` : e}`);
  }
}
