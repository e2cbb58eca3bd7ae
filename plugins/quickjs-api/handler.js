// TEST-ONLY (tests/languages, `quickjs_api`): exercises the API surface of
// Wharf's QuickJS runtime (tools/quickjs), one command per text message.
// Not an example to copy: plugins/js-echo is.

import { get, getAll } from "wharf:websocket/config@0.1.6";
import { subscribe, publishText } from "wharf:websocket/pubsub";
import * as attachment from "wharf:websocket/attachment";
import { sendText as peerSendText } from "wharf:websocket/peers";
import { send } from "wharf:websocket/batch-send@0.1.12";
import { send as sendTexts } from "wharf:websocket/text-batch-send";

let saved; // a connection object kept past its call

export const handler = {
  onUpgrade(conn, request) {
    if (request.path === "/reject") {
      return {
        tag: "reject",
        val: { status: 403, headers: [{ name: "x-why", value: "test" }], body: "no" },
      };
    }
    const proto = request.subprotocols.includes("chat.v1") ? "chat.v1" : undefined;
    return { tag: "accept", val: { subprotocol: proto, headers: [{ name: "x-engine", value: "quickjs" }] } };
  },

  onText(conn, text) {
    const [cmd, ...rest] = text.split(" ");
    const arg = rest.join(" ");
    switch (cmd) {
      case "random": {
        const a = Math.random(), b = Math.random();
        conn.sendText(`${a >= 0 && a < 1 && a !== b} ${a}`);
        break;
      }
      case "id":
        conn.sendText(`${typeof conn.id()} ${conn.id() > 0n}`);
        break;
      case "myid":
        conn.sendText(conn.id().toString());
        break;
      case "config":
        conn.sendText(`${get(arg)} ${get("missing")} ${JSON.stringify(getAll())}`);
        break;
      case "surrogate":
        conn.sendText("\uD800x");
        break;
      case "binary":
        conn.sendBinary(new Uint8Array([1, 2, 3]));
        conn.sendBinary(new Uint16Array([0x0201]).buffer);
        break;
      case "attach":
        attachment.set(conn, new TextEncoderLite().encode(arg));
        conn.sendText(String.fromCharCode(...attachment.get(conn)));
        break;
      case "subscribe":
        subscribe(conn, arg);
        conn.sendText("subscribed");
        break;
      case "publish":
        conn.sendText(`reached ${publishText(arg, "news", conn)}`);
        break;
      case "peer":
        peerSendText(BigInt(arg), "from a peer");
        break;
      case "keep":
        saved = conn;
        conn.sendText("kept");
        break;
      case "stale":
        try {
          saved.sendText("should not be sent");
        } catch (e) {
          conn.sendText(`${e.name}: ${e.message}`);
        }
        break;
      case "error-code": // error-code PEER: the refusal's payload goes to PEER
        conn.close({ tag: "normal" }, "bye");
        try {
          conn.sendText("after close");
        } catch (e) {
          peerSendText(BigInt(arg), `${e instanceof Error} payload ${e.payload}`);
        }
        break;
      case "batch": // batch PEER: two messages in one call, then a refusal's payload to PEER
        send(conn, [{ tag: "text", val: "b0" }, { tag: "binary", val: new Uint8Array([1]) }]);
        conn.close({ tag: "normal" }, "batched");
        try {
          send(conn, [{ tag: "text", val: "late" }]);
        } catch (e) {
          peerSendText(BigInt(arg), `${e instanceof Error} ${e.payload.queued} ${e.payload.error}`);
        }
        break;
      case "texts": // texts PEER: three texts in two calls (lengths as an array, then as
        // a Uint32Array), then a refusal's payload to PEER
        sendTexts(conn, "t0✓", [2, 3]);
        sendTexts(conn, "t2", new Uint32Array([2]));
        conn.close({ tag: "normal" }, "texted");
        try {
          sendTexts(conn, "late", [4]);
        } catch (e) {
          peerSendText(BigInt(arg), `${e instanceof Error} ${e.payload.queued} ${e.payload.error}`);
        }
        break;
      case "close":
        conn.close({ tag: "application", val: 4000 + Number(arg) }, "app");
        break;
      case "deep": {
        const f = (n) => f(n + 1); // traps on the call-stack limit (1011)
        f(0);
        break;
      }
      case "async":
        Promise.resolve().then(() => conn.sendText("from a job"));
        break;
      case "throw":
        throw new Error("as asked");
      default:
        conn.sendText(`unknown ${cmd}`);
    }
  },
};

// The runtime has no TextEncoder: ASCII is enough here.
class TextEncoderLite {
  encode(s) {
    return Uint8Array.from(s, (c) => c.charCodeAt(0));
  }
}
