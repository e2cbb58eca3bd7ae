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
    try {
      if (text === "goodbye") {
        // Start the closing handshake; onClose follows when it ends.
        conn.close({ tag: "normal" }, "goodbye");
      } else {
        // Passing a string to the host costs about 0.3 µs per byte in
        // componentize-js 0.23 (binary data is cheap): large text messages
        // need a larger `plugin.cpu_time_per_event` than the default.
        conn.sendText(text);
      }
    } catch (e) {
      logError(conn, e);
    }
  },

  onBinary(conn, data) {
    try {
      conn.sendBinary(data);
    } catch (e) {
      logError(conn, e);
    }
  },

  // Nothing to clean up: the host drops this instance after this call.
  onClose(conn, code, reason, clean) {},
};
