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
// It is built for `text-batch-handler-world`, so it also exports
// `batchHandler` and `textBatchHandler`: when a client sends several
// messages at once, they come in one call instead of one `onText`/`onBinary`
// call each (a call into the JS engine costs ~10 µs, more than echoing
// 1 KiB), and a run of texts comes to `onTexts` as one string and a
// Uint32Array of lengths, no object per message.

import { send } from "wharf:websocket/batch-send@0.1.12";
import { send as sendTexts } from "wharf:websocket/text-batch-send@0.1.12";

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

// Consecutive texts the host read at once: `texts` is their payloads back to
// back and `lens` (a Uint32Array) the UTF-8 length of each. With no
// "goodbye" among them (no message of its length, 7 bytes) they go back as
// they came, in one call.
export const textBatchHandler = {
  onTexts(conn, texts, lens) {
    if (!lens.includes(7)) {
      try {
        sendTexts(conn, texts, lens);
      } catch (e) {
        const p = e.payload;
        console.error(`echo: connection ${conn.id()}: ${p ? `${lens.length - p.queued} replies not sent: ${p.error}` : e}`);
      }
      return;
    }
    // Otherwise one at a time, in order, cut by their UTF-8 lengths.
    let at = 0;
    for (const n of lens) {
      const start = at;
      for (let bytes = 0; bytes < n; ) {
        const c = texts.codePointAt(at);
        bytes += c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
        at += c > 0xffff ? 2 : 1;
      }
      echoText(conn, texts.slice(start, at));
    }
  },
};
