// Wharf's JavaScript runtime: QuickJS (quickjs-ng) bridged to the world
// `packed-words-handler-world` of wit/websocket.wit.
//
// build.sh compiles this file with the handler's ES module embedded and
// the C bindings `componentize c-bindings` generates. The module sees the WIT the way componentize-js/jco map it, so one handler
// source runs on either engine:
//
// - `export const handler = { onUpgrade, onOpen, onText, onBinary, onClose }`
//   (every method optional: a missing `onUpgrade` accepts) and optionally
//   `export const batchHandler = { onMessages(conn, messages) }`, which gets
//   the messages of one read (the host's `packed-words-handler` call) as
//   `{ tag, val }` objects; without it they go to onText/onBinary one by
//   one, still in one call into the component; and optionally
//   `export const textBatchHandler = { onTexts(conn, texts, lens) }`, which
//   gets each run of two or more consecutive texts of a read as one string
//   and a Uint32Array of their UTF-8 lengths (jco's mapping of the WIT's
//   `text-batch-handler`, cut as the host cuts it for that export), the
//   messages between runs going as above;
// - `conn`: `id()` (a BigInt), `sendText(string)`, `sendBinary(Uint8Array)`,
//   `close(code, reason)`; valid during the call that passed it;
// - variants are `{ tag, val }`, enums strings, options a value or
//   `undefined`, a `result` error is thrown as an Error whose `payload` is
//   the error code ("queue-full", ...);
// - the other interfaces are modules named `wharf:websocket/<name>` (with or
//   without `@<version>`): pubsub, attachment, config, peers, latin1,
//   batch-send, whose `send(conn, messages)` goes to the host packed
//   (`packed-words-send`), and text-batch-send (`send(conn, texts, lens)`).
//
// Why hand-written rather than generated: the call path is the product. A
// message costs one C-to-JS call and, per send, one JS-to-C call with a
// UTF-8 copy; no generated JavaScript runs per message.
//
// An uncaught exception (or a rejected promise) is printed to stderr (the
// host's log) and traps: the host closes that connection with 1011.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "packed_words_handler_world.h"
#include "quickjs.h"

typedef packed_words_handler_world_string_t string_t;
typedef packed_words_handler_world_list_u8_t bytes_t;
typedef wharf_websocket_connection_borrow_connection_t borrow_t;
typedef wharf_websocket_types_error_code_t error_code_t;
typedef wharf_websocket_types_close_code_t close_code_t;

// The handler's source, embedded by the compiler: build.sh copies it to
// handler.js in the build directory, its --embed-dir.
static const char handler_source[] = {
#embed "handler.js"
    , 0};

static JSRuntime *rt;
static JSContext *ctx;
static JSClassID conn_class;
static JSValue handler_obj = JS_UNDEFINED, batch_obj = JS_UNDEFINED, text_batch_obj = JS_UNDEFINED;
static JSValue str_text, str_binary;  // the message variant's tags
// Objects of the shapes every call makes (`{}`, `{ tag }` and `{ tag, val }`
// for each message, an empty connection object), held for the runtime's
// life: QuickJS frees a shape with its last object, so without them each
// call made and freed its own; held, they are found in its shape table.
static JSValue shapes[4];
// How far into a string's allocation its bytes start, for a string
// JS_ToCStringLen hands out as is (pure ASCII): measured at start, 0 if
// QuickJS did not (then every string is scanned).
static ptrdiff_t own_bytes_offset;
static JSAtom atom_tag, atom_val, atom_payload, atom_on_upgrade, atom_on_open, atom_on_text,
    atom_on_binary, atom_on_close, atom_on_messages, atom_on_texts;

// ---------------------------------------------------------------------------
// Failure: print and trap.

static void print_value(FILE *f, JSValueConst v) {
    const char *s = JS_ToCString(ctx, v);
    fputs(s ? s : "[value that cannot be printed]", f);
    JS_FreeCString(ctx, s);
}

// An exception escaped the handler: the connection cannot continue.
static _Noreturn void die(const char *during) {
    JSValue e = JS_GetException(ctx);
    fprintf(stderr, "wharf-js: uncaught exception in %s: ", during);
    print_value(stderr, e);
    fputc('\n', stderr);
    if (JS_IsError(e)) {
        JSValue stack = JS_GetPropertyStr(ctx, e, "stack");
        if (JS_IsString(stack)) print_value(stderr, stack);
        JS_FreeValue(ctx, stack);
    }
    fflush(stderr);
    abort();
}

// ---------------------------------------------------------------------------
// Values from the host to JavaScript.

static JSValue new_string(const string_t *s) { return JS_NewStringLen(ctx, (const char *)s->ptr, s->len); }

// Takes the host's string: copied into a JS string, then freed.
static JSValue take_string(string_t *s) {
    JSValue v = new_string(s);
    packed_words_handler_world_string_free(s);
    return v;
}

static void *realloc_host_buffer(JSRuntime *r, void *opaque, void *ptr, size_t size) {
    (void)r, (void)opaque;
    if (size == 0) {
        free(ptr);
        return NULL;
    }
    return realloc(ptr, size);
}

// Takes ownership of the host's buffer: no copy. (An empty list's pointer
// was never allocated: the canonical ABI passes a dangling one.)
static JSValue adopt_bytes(bytes_t *b) {
    if (b->len == 0) return JS_NewUint8ArrayCopy(ctx, NULL, 0);
    return JS_NewUint8Array(ctx, b->ptr, b->len, realloc_host_buffer, NULL, false);
}

// A connection object for one call; `expire_conn` ends it with the call, as
// the WIT's `borrow` does.
static JSValue new_conn(borrow_t b) {
    JSValue obj = JS_NewObjectClass(ctx, conn_class);
    if (JS_IsException(obj)) die("creating a connection object");
    // Stored as handle + 1: an expired object holds NULL.
    JS_SetOpaque(obj, (void *)(uintptr_t)((uint32_t)b.__handle + 1));
    return obj;
}

static void expire_conn(JSValue obj) {
    JS_SetOpaque(obj, NULL);
    JS_FreeValue(ctx, obj);
}

// ---------------------------------------------------------------------------
// Values from JavaScript to the host.

// A JS string as UTF-8 the host accepts: QuickJS writes an unpaired UTF-16
// surrogate as its 3-byte (WTF-8) form, which is not UTF-8 and which the
// component model refuses (a trap); it becomes U+FFFD, as TextEncoder does.
// Both are 3 bytes, so this is done in place.
// ASCII, the common case, needs no pass of ours: for a string that is pure
// ASCII QuickJS hands out its own bytes (having checked them), which is
// recognized by where they are (see `own_bytes_offset`). Otherwise one pass
// the compiler vectorizes finds ASCII.
static const char *to_utf8(JSValueConst v, size_t *len) {
    const char *s = JS_ToCStringLen(ctx, len, v);
    if (!s) return NULL;
    if (own_bytes_offset && JS_IsString(v) && s == (const char *)JS_VALUE_GET_PTR(v) + own_bytes_offset)
        return s;
    unsigned char *p = (unsigned char *)s, high = 0;
    size_t n = *len;
    for (size_t i = 0; i < n; i++) high |= p[i];
    if (high < 0x80) return s;
    for (size_t i = 0; i + 2 < n; i++) {
        if (p[i] == 0xED && p[i + 1] >= 0xA0) {
            p[i] = 0xEF, p[i + 1] = 0xBF, p[i + 2] = 0xBD;
            i += 2;
        }
    }
    return s;
}

// A JS string argument as the host's string, borrowed from `*owned` (free
// with JS_FreeCString).
static bool arg_string(JSValueConst v, const char *what, string_t *out, const char **owned) {
    if (!JS_IsString(v)) {
        JS_ThrowTypeError(ctx, "%s: expected a string", what);
        return false;
    }
    size_t len;
    *owned = to_utf8(v, &len);
    if (!*owned) return false;
    out->ptr = (uint8_t *)*owned;
    out->len = len;
    return true;
}

// Bytes from a Uint8Array (or any typed array or ArrayBuffer), borrowed from
// JS memory for the duration of the host call.
static bool arg_bytes(JSValueConst v, const char *what, bytes_t *out) {
    size_t len;
    uint8_t *p = JS_GetUint8Array(ctx, &len, v);
    if (!p) {
        JS_FreeValue(ctx, JS_GetException(ctx));
        size_t offset, bytes_per_element;
        JSValue buf = JS_GetTypedArrayBuffer(ctx, v, &offset, &len, &bytes_per_element);
        if (!JS_IsException(buf)) {
            size_t size;
            uint8_t *base = JS_GetArrayBuffer(ctx, &size, buf);
            JS_FreeValue(ctx, buf);
            p = base ? base + offset : NULL;
        } else {
            JS_FreeValue(ctx, JS_GetException(ctx));
            p = JS_GetArrayBuffer(ctx, &len, v);
        }
        if (!p) {
            JS_FreeValue(ctx, JS_GetException(ctx));
            JS_ThrowTypeError(ctx, "%s: expected a Uint8Array", what);
            return false;
        }
    }
    out->ptr = len ? p : (uint8_t *)1;  // a non-null pointer for an empty list
    out->len = len;
    return true;
}

static bool arg_conn(JSValueConst v, const char *what, borrow_t *out) {
    void *h = JS_GetOpaque(v, conn_class);
    if (!h) {
        JS_ThrowTypeError(ctx, "%s: expected the connection of the current call", what);
        return false;
    }
    out->__handle = (int32_t)((uintptr_t)h - 1);
    return true;
}

static bool arg_u64(JSValueConst v, const char *what, uint64_t *out) {
    if (JS_IsBigInt(v)) return JS_ToBigUint64(ctx, out, v) == 0;
    if (JS_ToIndex(ctx, out, v) == 0) return true;
    JS_FreeValue(ctx, JS_GetException(ctx));
    JS_ThrowTypeError(ctx, "%s: expected a connection id (BigInt)", what);
    return false;
}

static const char *const close_code_tags[] = {
    "normal",         "going-away",       "protocol-error", "unsupported-data", "invalid-payload",
    "policy-violation", "message-too-big", "internal-error", "application",
};

// `{ tag: "normal" }`, ..., `{ tag: "application", val: 4000 }`.
static bool arg_close_code(JSValueConst v, close_code_t *out) {
    if (!JS_IsObject(v)) {
        JS_ThrowTypeError(ctx, "close code: expected { tag, val }");
        return false;
    }
    JSValue tag = JS_GetProperty(ctx, v, atom_tag);
    const char *t = JS_IsString(tag) ? JS_ToCString(ctx, tag) : NULL;
    JS_FreeValue(ctx, tag);
    int found = -1;
    for (size_t i = 0; t && i < sizeof close_code_tags / sizeof *close_code_tags; i++)
        if (strcmp(t, close_code_tags[i]) == 0) found = (int)i;
    JS_FreeCString(ctx, t);
    if (found < 0) {
        JS_ThrowTypeError(ctx, "close code: unknown tag");
        return false;
    }
    out->tag = (uint8_t)found;
    if (found == WHARF_WEBSOCKET_TYPES_CLOSE_CODE_APPLICATION) {
        JSValue val = JS_GetProperty(ctx, v, atom_val);
        int32_t n;
        int r = JS_ToInt32(ctx, &n, val);
        JS_FreeValue(ctx, val);
        if (r < 0) return false;
        if (n < 0 || n > 0xFFFF) {
            JS_ThrowRangeError(ctx, "close code: application code out of range");
            return false;
        }
        out->val.application = (uint16_t)n;
    }
    return true;
}

static const char *const error_code_names[] = {
    "closed", "reason-too-long", "message-too-big", "queue-full", "invalid-code",
};

static const char *error_code_name(error_code_t code) {
    return code < sizeof error_code_names / sizeof *error_code_names ? error_code_names[code]
                                                                      : "unknown";
}

// A `result` error, thrown as jco does: an Error whose message is the
// error-code's name and whose `payload` is the error (taken).
static JSValue throw_refusal(error_code_t code, JSValue payload) {
    JSValue e = JS_NewError(ctx);
    JS_DefinePropertyValueStr(ctx, e, "message", JS_NewString(ctx, error_code_name(code)),
                              JS_PROP_WRITABLE | JS_PROP_CONFIGURABLE);
    JS_DefinePropertyValue(ctx, e, atom_payload, payload, JS_PROP_C_W_E);
    return JS_Throw(ctx, e);
}

// A `result<_, error-code>` error: the payload is the code's name.
static JSValue throw_error_code(error_code_t code) {
    return throw_refusal(code, JS_NewString(ctx, error_code_name(code)));
}

static JSValue result(bool ok, error_code_t err) { return ok ? JS_UNDEFINED : throw_error_code(err); }

// ---------------------------------------------------------------------------
// The connection resource's methods.
//
// Here and in the modules below, a function reads argv[0..length) without
// checking argc: QuickJS pads a native function's arguments with
// `undefined` up to the length its JS_CFUNC_DEF declares, and each
// argument is then checked for its type.

static JSValue conn_id(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)argc, (void)argv;
    borrow_t b;
    if (!arg_conn(this_val, "id", &b)) return JS_EXCEPTION;
    return JS_NewBigUint64(ctx, wharf_websocket_connection_method_connection_id(b));
}

static JSValue conn_send_text(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)argc;
    borrow_t b;
    string_t text;
    const char *owned;
    if (!arg_conn(this_val, "sendText", &b)) return JS_EXCEPTION;
    if (!arg_string(argv[0], "sendText", &text, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_connection_method_connection_send_text(b, &text, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static JSValue conn_send_binary(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)argc;
    borrow_t b;
    bytes_t data;
    if (!arg_conn(this_val, "sendBinary", &b)) return JS_EXCEPTION;
    if (!arg_bytes(argv[0], "sendBinary", &data)) return JS_EXCEPTION;
    error_code_t err;
    return result(wharf_websocket_connection_method_connection_send_binary(b, &data, &err), err);
}

static JSValue conn_close(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)argc;
    borrow_t b;
    close_code_t code;
    string_t reason;
    const char *owned;
    if (!arg_conn(this_val, "close", &b)) return JS_EXCEPTION;
    if (!arg_close_code(argv[0], &code)) return JS_EXCEPTION;
    if (!arg_string(argv[1], "close", &reason, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_connection_method_connection_close(b, &code, &reason, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static const JSCFunctionListEntry conn_methods[] = {
    JS_CFUNC_DEF("id", 0, conn_id),
    JS_CFUNC_DEF("sendText", 1, conn_send_text),
    JS_CFUNC_DEF("sendBinary", 1, conn_send_binary),
    JS_CFUNC_DEF("close", 2, conn_close),
};

// ---------------------------------------------------------------------------
// wharf:websocket/pubsub

static JSValue pubsub_subscribe(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    string_t topic;
    const char *owned;
    if (!arg_conn(argv[0], "subscribe", &b)) return JS_EXCEPTION;
    if (!arg_string(argv[1], "subscribe", &topic, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_pubsub_subscribe(b, &topic, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static JSValue pubsub_unsubscribe(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    string_t topic;
    const char *owned;
    if (!arg_conn(argv[0], "unsubscribe", &b)) return JS_EXCEPTION;
    if (!arg_string(argv[1], "unsubscribe", &topic, &owned)) return JS_EXCEPTION;
    wharf_websocket_pubsub_unsubscribe(b, &topic);
    JS_FreeCString(ctx, owned);
    return JS_UNDEFINED;
}

// publishText(topic, text, exclude?) and publishBinary(topic, data,
// exclude?): the number of subscribers reached.
static JSValue pubsub_publish(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv, int binary) {
    (void)c, (void)this_val, (void)argc;
    const char *what = binary ? "publishBinary" : "publishText";
    string_t topic, text;
    bytes_t data;
    const char *owned_topic, *owned_text = NULL;
    borrow_t exclude;
    JSValueConst ex = argv[2];
    bool has_exclude = !JS_IsUndefined(ex) && !JS_IsNull(ex);
    if (has_exclude && !arg_conn(ex, what, &exclude)) return JS_EXCEPTION;
    if (!arg_string(argv[0], what, &topic, &owned_topic)) return JS_EXCEPTION;
    bool ok = binary ? arg_bytes(argv[1], what, &data)
                     : arg_string(argv[1], what, &text, &owned_text);
    if (!ok) {
        JS_FreeCString(ctx, owned_topic);
        return JS_EXCEPTION;
    }
    uint32_t reached = 0;
    error_code_t err;
    ok = binary ? wharf_websocket_pubsub_publish_binary(&topic, &data, has_exclude ? &exclude : NULL,
                                                        &reached, &err)
                : wharf_websocket_pubsub_publish_text(&topic, &text, has_exclude ? &exclude : NULL,
                                                      &reached, &err);
    JS_FreeCString(ctx, owned_topic);
    JS_FreeCString(ctx, owned_text);
    return ok ? JS_NewUint32(ctx, reached) : throw_error_code(err);
}

static const JSCFunctionListEntry pubsub_funcs[] = {
    JS_CFUNC_DEF("subscribe", 2, pubsub_subscribe),
    JS_CFUNC_DEF("unsubscribe", 2, pubsub_unsubscribe),
    JS_CFUNC_MAGIC_DEF("publishText", 3, pubsub_publish, 0),
    JS_CFUNC_MAGIC_DEF("publishBinary", 3, pubsub_publish, 1),
};

// ---------------------------------------------------------------------------
// wharf:websocket/attachment

static JSValue attachment_set(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    bytes_t data;
    if (!arg_conn(argv[0], "set", &b)) return JS_EXCEPTION;
    if (!arg_bytes(argv[1], "set", &data)) return JS_EXCEPTION;
    error_code_t err;
    return result(wharf_websocket_attachment_set(b, &data, &err), err);
}

static JSValue attachment_get(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    if (!arg_conn(argv[0], "get", &b)) return JS_EXCEPTION;
    bytes_t data;
    wharf_websocket_attachment_get(b, &data);
    return adopt_bytes(&data);
}

static const JSCFunctionListEntry attachment_funcs[] = {
    JS_CFUNC_DEF("set", 2, attachment_set),
    JS_CFUNC_DEF("get", 1, attachment_get),
};

// ---------------------------------------------------------------------------
// wharf:websocket/config

static JSValue config_get(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    string_t key, value;
    const char *owned;
    if (!arg_string(argv[0], "get", &key, &owned)) return JS_EXCEPTION;
    bool some = wharf_websocket_config_get(&key, &value);
    JS_FreeCString(ctx, owned);
    if (!some) return JS_UNDEFINED;
    return take_string(&value);
}

// [[key, value], ...], in the order of the tenant's settings.
static JSValue config_get_all(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc, (void)argv;
    packed_words_handler_world_list_tuple2_string_string_t all;
    wharf_websocket_config_get_all(&all);
    JSValue arr = JS_NewArray(ctx);
    for (size_t i = 0; i < all.len; i++) {
        JSValue pair = JS_NewArray(ctx);
        JS_SetPropertyUint32(ctx, pair, 0, new_string(&all.ptr[i].f0));
        JS_SetPropertyUint32(ctx, pair, 1, new_string(&all.ptr[i].f1));
        JS_SetPropertyUint32(ctx, arr, (uint32_t)i, pair);
    }
    packed_words_handler_world_list_tuple2_string_string_free(&all);
    return arr;
}

static const JSCFunctionListEntry config_funcs[] = {
    JS_CFUNC_DEF("get", 1, config_get),
    JS_CFUNC_DEF("getAll", 0, config_get_all),
};

// ---------------------------------------------------------------------------
// wharf:websocket/peers: the tenant's other connections, by id.

static JSValue peers_send_text(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    uint64_t id;
    string_t text;
    const char *owned;
    if (!arg_u64(argv[0], "sendText", &id)) return JS_EXCEPTION;
    if (!arg_string(argv[1], "sendText", &text, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_peers_send_text(id, &text, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static JSValue peers_send_binary(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    uint64_t id;
    bytes_t data;
    if (!arg_u64(argv[0], "sendBinary", &id)) return JS_EXCEPTION;
    if (!arg_bytes(argv[1], "sendBinary", &data)) return JS_EXCEPTION;
    error_code_t err;
    return result(wharf_websocket_peers_send_binary(id, &data, &err), err);
}

static JSValue peers_close(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    uint64_t id;
    close_code_t code;
    string_t reason;
    const char *owned;
    if (!arg_u64(argv[0], "close", &id)) return JS_EXCEPTION;
    if (!arg_close_code(argv[1], &code)) return JS_EXCEPTION;
    if (!arg_string(argv[2], "close", &reason, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_peers_close(id, &code, &reason, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static const JSCFunctionListEntry peers_funcs[] = {
    JS_CFUNC_DEF("sendText", 2, peers_send_text),
    JS_CFUNC_DEF("sendBinary", 2, peers_send_binary),
    JS_CFUNC_DEF("close", 3, peers_close),
};

// ---------------------------------------------------------------------------
// wharf:websocket/latin1

static JSValue latin1_send_binary(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    string_t data;
    const char *owned;
    if (!arg_conn(argv[0], "sendBinary", &b)) return JS_EXCEPTION;
    if (!arg_string(argv[1], "sendBinary", &data, &owned)) return JS_EXCEPTION;
    error_code_t err;
    bool ok = wharf_websocket_latin1_send_binary(b, &data, &err);
    JS_FreeCString(ctx, owned);
    return result(ok, err);
}

static const JSCFunctionListEntry latin1_funcs[] = {
    JS_CFUNC_DEF("sendBinary", 2, latin1_send_binary),
};

// ---------------------------------------------------------------------------
// wharf:websocket/batch-send

// More messages than a batch ever holds (the host delivers at most 1024).
#define BATCH_SEND_MAX 65536

// A packed batch's span word (`packed.span-word`): a message's length in
// bits 0 to 30, bit 31 set for a binary one, so a text's word is its length.
typedef uint32_t span_t;
#define SPAN_BINARY 0x80000000u
#define SPAN_LEN(w) ((w) & ~SPAN_BINARY)
#define SPAN_TEXT(w) (((w) & SPAN_BINARY) == 0)

// One `{ tag: "text", val: string }` or `{ tag: "binary", val: Uint8Array }`
// (what onMessages gets): its span word and bytes, borrowed from `*owned`
// (text) or from the array holding it (binary).
static bool arg_outgoing(JSValueConst v, span_t *span, const uint8_t **bytes, const char **owned) {
    JSValue tag = JS_GetProperty(ctx, v, atom_tag);
    bool text = JS_IsStrictEqual(ctx, tag, str_text);
    bool binary = !text && JS_IsStrictEqual(ctx, tag, str_binary);
    JS_FreeValue(ctx, tag);
    if (!text && !binary) {
        JS_ThrowTypeError(ctx, "send: expected { tag: \"text\" | \"binary\", val }");
        return false;
    }
    JSValue val = JS_GetProperty(ctx, v, atom_val);
    bool ok;
    if (text) {
        string_t s = {0};
        ok = arg_string(val, "send", &s, owned);
        *bytes = s.ptr, *span = (span_t)s.len;
        if (ok && s.len > SPAN_LEN(UINT32_MAX)) ok = false, JS_ThrowRangeError(ctx, "send: a message of 2 GiB or more");
    } else {
        bytes_t b = {0};
        ok = arg_bytes(val, "send", &b);
        *bytes = b.ptr, *span = (span_t)b.len | SPAN_BINARY;
        if (ok && b.len > SPAN_LEN(UINT32_MAX)) ok = false, JS_ThrowRangeError(ctx, "send: a message of 2 GiB or more");
    }
    JS_FreeValue(ctx, val);
    return ok;
}

// A batched send stopped short: an Error whose `payload` is `{ queued,
// error }` (how many went, and the error-code of the next), as jco throws.
static JSValue throw_partial(const wharf_websocket_batch_send_partial_t *partial) {
    JSValue payload = JS_NewObject(ctx);
    JS_DefinePropertyValueStr(ctx, payload, "queued", JS_NewUint32(ctx, partial->queued), JS_PROP_C_W_E);
    JS_DefinePropertyValueStr(ctx, payload, "error", JS_NewString(ctx, error_code_name(partial->error)),
                              JS_PROP_C_W_E);
    return throw_refusal(partial->error, payload);
}

// send(conn, messages): queues every message in one call into the host, or
// throws at the first one refused, as jco does: an Error whose `payload` is
// `{ queued, error }` (how many went, and the error-code of the next). The
// messages go packed (`packed-words-send`: one buffer and a word per
// message), which the host reads in place.
static JSValue batch_send(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    int64_t n;
    if (!arg_conn(argv[0], "send", &b)) return JS_EXCEPTION;
    if (!JS_IsArray(argv[1])) return JS_ThrowTypeError(ctx, "send: expected an array of messages");
    if (JS_GetLength(ctx, argv[1], &n) < 0) return JS_EXCEPTION;
    if (n > BATCH_SEND_MAX) return JS_ThrowRangeError(ctx, "send: more than %d messages", BATCH_SEND_MAX);
    if (n == 0) return JS_UNDEFINED;
    span_t *spans = malloc((size_t)n * sizeof *spans);
    const uint8_t **bytes = malloc((size_t)n * sizeof *bytes);
    const char **owned = calloc((size_t)n, sizeof *owned);
    bool ok = spans && bytes && owned;
    if (!ok) JS_ThrowOutOfMemory(ctx);
    uint64_t total = 0;
    for (int64_t i = 0; ok && i < n; i++) {
        JSValue m = JS_GetPropertyUint32(ctx, argv[1], (uint32_t)i);
        ok = arg_outgoing(m, &spans[i], &bytes[i], &owned[i]);
        JS_FreeValue(ctx, m);
        total += ok ? SPAN_LEN(spans[i]) : 0;
    }
    // Above 4 GiB the 32-bit lengths would not add up; the host refuses
    // far less (its send queue).
    if (ok && total > UINT32_MAX) ok = false, JS_ThrowRangeError(ctx, "send: more than 4 GiB");
    uint8_t *payloads = ok ? malloc(total ? (size_t)total : 1) : NULL;
    if (ok && !payloads) ok = false, JS_ThrowOutOfMemory(ctx);
    wharf_websocket_packed_words_send_partial_t partial;
    bool sent = ok;
    if (ok) {
        uint8_t *q = payloads;
        for (int64_t i = 0; i < n; i++) {
            if (SPAN_LEN(spans[i])) memcpy(q, bytes[i], SPAN_LEN(spans[i]));
            q += SPAN_LEN(spans[i]);
        }
        bytes_t p = {.ptr = payloads, .len = (size_t)total};
        wharf_websocket_packed_words_send_list_span_word_t l = {.ptr = spans, .len = (size_t)n};
        sent = wharf_websocket_packed_words_send_send(b, &p, &l, &partial);
    }
    for (int64_t i = 0; owned && i < n; i++) JS_FreeCString(ctx, owned[i]);
    free(payloads);
    free(owned);
    free(bytes);
    free(spans);
    if (!ok) return JS_EXCEPTION;
    if (sent) return JS_UNDEFINED;
    return throw_partial(&partial);
}

static const JSCFunctionListEntry batch_send_funcs[] = {
    JS_CFUNC_DEF("send", 2, batch_send),
};

// ---------------------------------------------------------------------------
// wharf:websocket/text-batch-send

// send(conn, texts, lens): the texts `lens` (a Uint32Array, as onTexts
// gets it, or an array of numbers) cuts `texts`' UTF-8 into, queued in one
// call into the host; a refusal throws as batch-send's does.
static JSValue text_batch_send(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc;
    borrow_t b;
    string_t texts = {0};
    const char *owned = NULL;
    if (!arg_conn(argv[0], "send", &b)) return JS_EXCEPTION;
    uint32_t *lens = NULL, *copy = NULL;
    size_t n = 0;
    if (JS_GetTypedArrayType(argv[2]) == JS_TYPED_ARRAY_UINT32) {
        size_t offset, bytes, per;
        JSValue buf = JS_GetTypedArrayBuffer(ctx, argv[2], &offset, &bytes, &per);
        if (JS_IsException(buf)) return JS_EXCEPTION;
        size_t size;
        uint8_t *base = JS_GetArrayBuffer(ctx, &size, buf);
        JS_FreeValue(ctx, buf);
        if (!base) return JS_EXCEPTION;
        lens = (uint32_t *)(base + offset), n = bytes / sizeof *lens;
    } else if (JS_IsArray(argv[2])) {
        int64_t len;
        if (JS_GetLength(ctx, argv[2], &len) < 0) return JS_EXCEPTION;
        if (len > BATCH_SEND_MAX) return JS_ThrowRangeError(ctx, "send: more than %d messages", BATCH_SEND_MAX);
        n = (size_t)len;
        lens = copy = malloc(n ? n * sizeof *copy : 1);
        if (!copy) return JS_ThrowOutOfMemory(ctx);
        for (size_t i = 0; i < n; i++) {
            JSValue v = JS_GetPropertyUint32(ctx, argv[2], (uint32_t)i);
            int r = JS_ToUint32(ctx, &copy[i], v);
            JS_FreeValue(ctx, v);
            if (r < 0) return free(copy), JS_EXCEPTION;
        }
    } else {
        return JS_ThrowTypeError(ctx, "send: expected a Uint32Array of lengths");
    }
    if (!arg_string(argv[1], "send", &texts, &owned)) return free(copy), JS_EXCEPTION;
    packed_words_handler_world_list_u32_t l = {.ptr = n ? lens : (uint32_t *)4, .len = n};
    wharf_websocket_text_batch_send_partial_t partial;
    bool sent = wharf_websocket_text_batch_send_send(b, &texts, &l, &partial);
    JS_FreeCString(ctx, owned);
    free(copy);
    if (sent) return JS_UNDEFINED;
    return throw_partial(&partial);
}

static const JSCFunctionListEntry text_batch_send_funcs[] = {
    JS_CFUNC_DEF("send", 3, text_batch_send),
};

// ---------------------------------------------------------------------------
// Modules: `import { publishText } from "wharf:websocket/pubsub@0.1.6"`.

struct native_module {
    const char *name;  // the interface, without package or version
    const JSCFunctionListEntry *funcs;
    int count;
};

#define MODULE(n, f) {n, f, (int)(sizeof f / sizeof *f)}
static const struct native_module native_modules[] = {
    MODULE("pubsub", pubsub_funcs),   MODULE("attachment", attachment_funcs),
    MODULE("config", config_funcs),   MODULE("peers", peers_funcs),
    MODULE("latin1", latin1_funcs),   MODULE("batch-send", batch_send_funcs),
    MODULE("text-batch-send", text_batch_send_funcs),
    {"connection", NULL, 0},
    {"types", NULL, 0},
};

static int module_init(JSContext *c, JSModuleDef *m) {
    JSAtom name_atom = JS_GetModuleName(c, m);
    const char *name = JS_AtomToCString(c, name_atom);
    JS_FreeAtom(c, name_atom);
    int r = 0;
    for (size_t i = 0; name && i < sizeof native_modules / sizeof *native_modules; i++)
        if (strcmp(name, native_modules[i].name) == 0 && native_modules[i].count)
            r = JS_SetModuleExportList(c, m, native_modules[i].funcs, native_modules[i].count);
    JS_FreeCString(c, name);
    return r;
}

// "wharf:websocket/pubsub@0.1.6" (or without the version) names the module
// "pubsub"; anything else is not there: one source file per handler.
static char *normalize_module(JSContext *c, const char *base, const char *name, void *opaque) {
    (void)base, (void)opaque;
    static const char prefix[] = "wharf:websocket/";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0) {
        JS_ThrowReferenceError(c, "module '%s' is not available: bundle the handler into one file", name);
        return NULL;
    }
    const char *iface = name + sizeof prefix - 1;
    size_t len = strcspn(iface, "@");
    char *out = js_malloc(c, len + 1);
    if (!out) return NULL;
    memcpy(out, iface, len);
    out[len] = 0;
    return out;
}

static JSModuleDef *load_module(JSContext *c, const char *name, void *opaque) {
    (void)opaque;
    for (size_t i = 0; i < sizeof native_modules / sizeof *native_modules; i++) {
        const struct native_module *nm = &native_modules[i];
        if (strcmp(name, nm->name) != 0) continue;
        JSModuleDef *m = JS_NewCModule(c, name, module_init);
        if (m && nm->count) JS_AddModuleExportList(c, m, nm->funcs, nm->count);
        return m;
    }
    JS_ThrowReferenceError(c, "wharf:websocket/%s: no such interface", name);
    return NULL;
}

// ---------------------------------------------------------------------------
// console: the host's log (stdout for log/info/debug, stderr for warn/error).

static JSValue console_print(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv, int to_stderr) {
    (void)c, (void)this_val, (void)argc;
    FILE *f = to_stderr ? stderr : stdout;
    for (int i = 0; i < argc; i++) {
        if (i) fputc(' ', f);
        print_value(f, argv[i]);
    }
    fputc('\n', f);
    fflush(f);
    return JS_UNDEFINED;
}

static const JSCFunctionListEntry console_funcs[] = {
    JS_CFUNC_MAGIC_DEF("log", 1, console_print, 0),   JS_CFUNC_MAGIC_DEF("info", 1, console_print, 0),
    JS_CFUNC_MAGIC_DEF("debug", 1, console_print, 0), JS_CFUNC_MAGIC_DEF("warn", 1, console_print, 1),
    JS_CFUNC_MAGIC_DEF("error", 1, console_print, 1),
};

// ---------------------------------------------------------------------------
// Math.random: QuickJS seeds its generator from the clock; this one is
// seeded from WASI random on first use (xorshift128+, as V8 and
// SpiderMonkey use), so instances started in the same microsecond differ.

static uint64_t rng[2];

static JSValue math_random(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)c, (void)this_val, (void)argc, (void)argv;
    if ((rng[0] | rng[1]) == 0 && (getentropy(rng, sizeof rng) != 0 || (rng[0] | rng[1]) == 0))
        rng[0] = 0x9E3779B97F4A7C15u;  // no entropy: still a valid state
    uint64_t s1 = rng[0];
    const uint64_t s0 = rng[1];
    rng[0] = s0;
    s1 ^= s1 << 23;
    rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return JS_NewFloat64(ctx, (double)((rng[1] + s0) >> 11) * 0x1.0p-53);
}

// ---------------------------------------------------------------------------
// Start-up: at build time (wharf_js_initialize), or on the first call into
// an instance built without it.

static void run_jobs(const char *during) {
    JSContext *c;
    while (JS_IsJobPending(rt))
        if (JS_ExecutePendingJob(rt, &c) < 0) die(during);
}

// A handler method's value: an exception (or a rejected promise) is fatal.
static JSValue settle(JSValue v, const char *during) {
    if (JS_IsException(v)) die(during);
    run_jobs(during);
    if (JS_IsPromise(v) && JS_PromiseState(ctx, v) == JS_PROMISE_REJECTED) {
        JS_Throw(ctx, JS_PromiseResult(ctx, v));
        JS_FreeValue(ctx, v);
        die(during);
    }
    return v;
}

static void start(void) {
    rt = JS_NewRuntime();
    if (!rt) abort();
    ctx = JS_NewContext(rt);
    if (!ctx) abort();
    JS_SetModuleLoaderFunc(rt, normalize_module, load_module, NULL);

    JSClassDef def = {.class_name = "Connection"};
    JS_NewClassID(rt, &conn_class);
    JS_NewClass(rt, conn_class, &def);
    JSValue proto = JS_NewObject(ctx);
    JS_SetPropertyFunctionList(ctx, proto, conn_methods, sizeof conn_methods / sizeof *conn_methods);
    JS_SetClassProto(ctx, conn_class, proto);

    JSValue global = JS_GetGlobalObject(ctx);
    JSValue console = JS_NewObject(ctx);
    JS_SetPropertyFunctionList(ctx, console, console_funcs, sizeof console_funcs / sizeof *console_funcs);
    JS_SetPropertyStr(ctx, global, "console", console);
    JSValue math = JS_GetPropertyStr(ctx, global, "Math");
    JS_SetPropertyStr(ctx, math, "random", JS_NewCFunction(ctx, math_random, "random", 0));
    JS_FreeValue(ctx, math);
    JS_FreeValue(ctx, global);

    atom_tag = JS_NewAtom(ctx, "tag");
    atom_val = JS_NewAtom(ctx, "val");
    atom_payload = JS_NewAtom(ctx, "payload");
    atom_on_upgrade = JS_NewAtom(ctx, "onUpgrade");
    atom_on_open = JS_NewAtom(ctx, "onOpen");
    atom_on_text = JS_NewAtom(ctx, "onText");
    atom_on_binary = JS_NewAtom(ctx, "onBinary");
    atom_on_close = JS_NewAtom(ctx, "onClose");
    atom_on_messages = JS_NewAtom(ctx, "onMessages");
    atom_on_texts = JS_NewAtom(ctx, "onTexts");
    str_text = JS_NewString(ctx, "text");
    str_binary = JS_NewString(ctx, "binary");
    JSValue probe = JS_NewString(ctx, "ascii");
    const char *probe_bytes = JS_ToCString(ctx, probe);
    ptrdiff_t offset = probe_bytes - (const char *)JS_VALUE_GET_PTR(probe);
    // The string's header, not some other allocation.
    own_bytes_offset = offset > 0 && offset <= 64 ? offset : 0;
    JS_FreeCString(ctx, probe_bytes);
    JS_FreeValue(ctx, probe);
    for (int i = 0; i < 3; i++) {
        shapes[i] = JS_NewObject(ctx);
        if (i >= 1) JS_DefinePropertyValue(ctx, shapes[i], atom_tag, JS_UNDEFINED, JS_PROP_C_W_E);
        if (i == 2) JS_DefinePropertyValue(ctx, shapes[i], atom_val, JS_UNDEFINED, JS_PROP_C_W_E);
    }
    shapes[3] = JS_NewObjectClass(ctx, conn_class);

    JSValue fn = JS_Eval(ctx, handler_source, sizeof handler_source - 1, "handler.js",
                         JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
    if (JS_IsException(fn)) die("compiling handler.js");
    JSModuleDef *m = JS_VALUE_GET_PTR(fn);
    JS_FreeValue(ctx, settle(JS_EvalFunction(ctx, fn), "evaluating handler.js"));
    JSValue ns = JS_GetModuleNamespace(ctx, m);
    handler_obj = JS_GetPropertyStr(ctx, ns, "handler");
    batch_obj = JS_GetPropertyStr(ctx, ns, "batchHandler");
    text_batch_obj = JS_GetPropertyStr(ctx, ns, "textBatchHandler");
    JS_FreeValue(ctx, ns);
    if (!JS_IsObject(handler_obj)) {
        fputs("wharf-js: handler.js does not export a `handler` object\n", stderr);
        abort();
    }
}

// Run once at build time by Wizer (tools/wizer): the engine is started and
// the module evaluated there, and every instance starts from the memory
// this leaves. Math.random's state is cleared so that each instance seeds
// its own.
__attribute__((export_name("wizer-initialize"))) void wharf_js_initialize(void) {
    start();
    rng[0] = rng[1] = 0;
}

static inline void enter(void) {
    if (!ctx) start();
}

// Calls `obj[method](args...)` if the method exists; false if it does not.
static bool call(JSValueConst obj, JSAtom method, int argc, JSValueConst *argv, const char *during,
                 JSValue *ret) {
    JSValue f = JS_GetProperty(ctx, obj, method);
    if (JS_IsException(f)) die(during);
    if (JS_IsUndefined(f) || JS_IsNull(f)) return false;
    JSValue v = settle(JS_Call(ctx, f, obj, argc, argv), during);
    JS_FreeValue(ctx, f);
    if (ret) *ret = v;
    else JS_FreeValue(ctx, v);
    return true;
}

// ---------------------------------------------------------------------------
// The exports.

static JSValue header_list(const wharf_websocket_types_list_header_t *h) {
    JSValue arr = JS_NewArray(ctx);
    for (size_t i = 0; i < h->len; i++) {
        JSValue o = JS_NewObject(ctx);
        JS_SetPropertyStr(ctx, o, "name", new_string(&h->ptr[i].name));
        JS_SetPropertyStr(ctx, o, "value", new_string(&h->ptr[i].value));
        JS_SetPropertyUint32(ctx, arr, (uint32_t)i, o);
    }
    return arr;
}

static JSValue upgrade_request(const wharf_websocket_types_upgrade_request_t *r) {
    JSValue o = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, o, "method", new_string(&r->method));
    JS_SetPropertyStr(ctx, o, "path", new_string(&r->path));
    JS_SetPropertyStr(ctx, o, "query", r->query.is_some ? new_string(&r->query.val) : JS_UNDEFINED);
    JS_SetPropertyStr(ctx, o, "headers", header_list(&r->headers));
    JSValue protos = JS_NewArray(ctx);
    for (size_t i = 0; i < r->subprotocols.len; i++)
        JS_SetPropertyUint32(ctx, protos, (uint32_t)i, new_string(&r->subprotocols.ptr[i]));
    JS_SetPropertyStr(ctx, o, "subprotocols", protos);
    JS_SetPropertyStr(ctx, o, "remoteAddress", new_string(&r->remote_address));
    JS_SetPropertyStr(ctx, o, "tls", JS_NewBool(ctx, r->tls));
    return o;
}

// A string property as a malloc'd host string (the bindings free it after
// the call returns); `optional`: undefined/null gives is_some = false.
static bool prop_string(JSValueConst obj, const char *name, string_t *out, bool *is_some) {
    JSValue v = JS_GetPropertyStr(ctx, obj, name);
    if (is_some && (JS_IsUndefined(v) || JS_IsNull(v))) {
        *is_some = false;
        return true;
    }
    if (!JS_IsString(v)) {
        JS_FreeValue(ctx, v);
        JS_ThrowTypeError(ctx, "upgrade response: `%s` must be a string", name);
        return false;
    }
    size_t len;
    const char *s = to_utf8(v, &len);
    JS_FreeValue(ctx, v);
    if (!s) return false;
    packed_words_handler_world_string_dup_n(out, s, len);
    JS_FreeCString(ctx, s);
    if (is_some) *is_some = true;
    return true;
}

static bool prop_headers(JSValueConst obj, wharf_websocket_types_list_header_t *out) {
    out->ptr = NULL;
    out->len = 0;
    JSValue arr = JS_GetPropertyStr(ctx, obj, "headers");
    bool ok = true;
    if (!JS_IsUndefined(arr)) {
        int64_t n;
        if (!JS_IsArray(arr) || JS_GetLength(ctx, arr, &n) < 0) {
            JS_FreeValue(ctx, arr);
            JS_ThrowTypeError(ctx, "upgrade response: `headers` must be an array of { name, value }");
            return false;
        }
        // The host refuses more than 16 KiB of headers; this bounds the
        // allocation (and the cast to 32-bit size_t) well before that.
        out->ptr = n <= 4096 ? calloc((size_t)n ? (size_t)n : 1, sizeof *out->ptr) : NULL;
        if (!out->ptr) {
            JS_FreeValue(ctx, arr);
            JS_ThrowRangeError(ctx, "upgrade response: too many headers");
            return false;
        }
        for (int64_t i = 0; ok && i < n; i++) {
            JSValue h = JS_GetPropertyUint32(ctx, arr, (uint32_t)i);
            ok = prop_string(h, "name", &out->ptr[i].name, NULL) &&
                 prop_string(h, "value", &out->ptr[i].value, NULL);
            JS_FreeValue(ctx, h);
            out->len = (size_t)i + 1;
        }
    }
    JS_FreeValue(ctx, arr);
    return ok;
}

static bool upgrade_response(JSValueConst v, wharf_websocket_types_upgrade_response_t *ret) {
    memset(ret, 0, sizeof *ret);
    if (!JS_IsObject(v)) {
        JS_ThrowTypeError(ctx, "onUpgrade: expected { tag: \"accept\" | \"reject\", val }");
        return false;
    }
    JSValue tag = JS_GetProperty(ctx, v, atom_tag);
    const char *t = JS_IsString(tag) ? JS_ToCString(ctx, tag) : NULL;
    JS_FreeValue(ctx, tag);
    bool accept = t && strcmp(t, "accept") == 0, reject = t && strcmp(t, "reject") == 0;
    JS_FreeCString(ctx, t);
    if (!accept && !reject) {
        JS_ThrowTypeError(ctx, "onUpgrade: expected { tag: \"accept\" | \"reject\", val }");
        return false;
    }
    JSValue val = JS_GetProperty(ctx, v, atom_val);
    bool ok;
    if (accept) {
        ret->tag = WHARF_WEBSOCKET_TYPES_UPGRADE_RESPONSE_ACCEPT;
        wharf_websocket_types_accept_t *a = &ret->val.accept;
        ok = JS_IsUndefined(val) ||
             (prop_string(val, "subprotocol", &a->subprotocol.val, &a->subprotocol.is_some) &&
              prop_headers(val, &a->headers));
    } else {
        ret->tag = WHARF_WEBSOCKET_TYPES_UPGRADE_RESPONSE_REJECT;
        wharf_websocket_types_reject_t *r = &ret->val.reject;
        JSValue status = JS_GetPropertyStr(ctx, val, "status");
        int32_t s = 0;
        ok = JS_ToInt32(ctx, &s, status) == 0;
        JS_FreeValue(ctx, status);
        r->status = (uint16_t)(s < 0 || s > 0xFFFF ? 500 : s);
        bool body_given = false;
        ok = ok && prop_headers(val, &r->headers) && prop_string(val, "body", &r->body, &body_given);
    }
    JS_FreeValue(ctx, val);
    return ok;
}

void exports_wharf_websocket_handler_on_upgrade(borrow_t conn,
                                                wharf_websocket_types_upgrade_request_t *request,
                                                wharf_websocket_types_upgrade_response_t *ret) {
    enter();
    JSValue args[2] = {new_conn(conn), upgrade_request(request)};
    wharf_websocket_types_upgrade_request_free(request);
    JSValue v;
    if (call(handler_obj, atom_on_upgrade, 2, args, "onUpgrade", &v)) {
        if (!upgrade_response(v, ret)) die("onUpgrade's answer");
        JS_FreeValue(ctx, v);
    } else {
        memset(ret, 0, sizeof *ret);  // accept: no subprotocol, no headers
    }
    JS_FreeValue(ctx, args[1]);
    expire_conn(args[0]);
}

void exports_wharf_websocket_handler_on_open(borrow_t conn) {
    enter();
    JSValue c = new_conn(conn);
    call(handler_obj, atom_on_open, 1, &c, "onOpen", NULL);
    expire_conn(c);
}

void exports_wharf_websocket_handler_on_text(borrow_t conn, string_t *text) {
    enter();
    JSValue args[2] = {new_conn(conn), take_string(text)};
    call(handler_obj, atom_on_text, 2, args, "onText", NULL);
    JS_FreeValue(ctx, args[1]);
    expire_conn(args[0]);
}

void exports_wharf_websocket_handler_on_binary(borrow_t conn, bytes_t *data) {
    enter();
    JSValue args[2] = {new_conn(conn), adopt_bytes(data)};
    call(handler_obj, atom_on_binary, 2, args, "onBinary", NULL);
    JS_FreeValue(ctx, args[1]);
    expire_conn(args[0]);
}

void exports_wharf_websocket_handler_on_close(borrow_t conn, uint16_t code, string_t *reason, bool clean) {
    enter();
    JSValue args[4] = {new_conn(conn), JS_NewInt32(ctx, code), take_string(reason), JS_NewBool(ctx, clean)};
    call(handler_obj, atom_on_close, 4, args, "onClose", NULL);
    JS_FreeValue(ctx, args[2]);
    expire_conn(args[0]);
}

// One message of a packed batch: its text as a JS string, or a copy of its
// bytes (a view into the batch's buffer would show the other messages to
// whoever reads its `buffer`).
static JSValue span_value(const uint8_t *p, span_t s) {
    return SPAN_TEXT(s) ? JS_NewStringLen(ctx, (const char *)p, s) : JS_NewUint8ArrayCopy(ctx, p, SPAN_LEN(s));
}

// Messages of a read as batchHandler.onMessages takes them (without it,
// or for one message, one onText/onBinary call each): `n` spans from
// `spans`, their bytes from `p` on.
static void deliver_messages(JSValue c, JSValue f, const uint8_t *p, const span_t *spans, size_t n) {
    if (JS_IsFunction(ctx, f) && n > 1) {
        // batchHandler.onMessages(conn, [{ tag, val }, ...]); the host sends
        // at most 1024 messages a call.
        JSValue *items = malloc(n * sizeof *items);
        if (!items) die("onMessages (out of memory)");
        for (size_t i = 0; i < n; i++) {
            span_t s = spans[i];
            JSValue o = JS_NewObject(ctx);
            JS_DefinePropertyValue(ctx, o, atom_tag, JS_DupValue(ctx, SPAN_TEXT(s) ? str_text : str_binary),
                                   JS_PROP_C_W_E);
            JS_DefinePropertyValue(ctx, o, atom_val, span_value(p, s), JS_PROP_C_W_E);
            items[i] = o;
            p += SPAN_LEN(s);
        }
        // Takes the items; one allocation for the array, not a growth per item.
        JSValue arr = JS_NewArrayFrom(ctx, (int)n, items);
        free(items);
        if (JS_IsException(arr)) die("onMessages");
        JSValue args[2] = {c, arr};
        JS_FreeValue(ctx, settle(JS_Call(ctx, f, batch_obj, 2, args), "onMessages"));
        JS_FreeValue(ctx, arr);
    } else {
        // onText/onBinary per message, in this one call.
        for (size_t i = 0; i < n; i++) {
            span_t s = spans[i];
            bool text = SPAN_TEXT(s);
            JSValue args[2] = {c, span_value(p, s)};
            p += SPAN_LEN(s);
            call(handler_obj, text ? atom_on_text : atom_on_binary, 2, args, text ? "onText" : "onBinary",
                 NULL);
            JS_FreeValue(ctx, args[1]);
        }
    }
}

// A run of `n` texts as textBatchHandler.onTexts takes it: one string of
// their `bytes` bytes from `p` and a Uint32Array of their lengths, which
// are their span words.
static void deliver_texts(JSValue c, JSValue f, const uint8_t *p, size_t bytes, const span_t *spans, size_t n) {
    JSValue buf = JS_NewArrayBufferCopy(ctx, (const uint8_t *)spans, n * sizeof *spans);
    JSValue arr = JS_IsException(buf) ? buf : JS_NewTypedArray(ctx, 1, &buf, JS_TYPED_ARRAY_UINT32);
    JS_FreeValue(ctx, buf);
    if (JS_IsException(arr)) die("onTexts");
    JSValue args[3] = {c, JS_NewStringLen(ctx, (const char *)p, bytes), arr};
    JS_FreeValue(ctx, settle(JS_Call(ctx, f, text_batch_obj, 3, args), "onTexts"));
    JS_FreeValue(ctx, args[1]);
    JS_FreeValue(ctx, arr);
}

// Whether a run of two or more texts starts at span `i`.
static bool run_at(const exports_wharf_websocket_packed_words_handler_list_span_word_t *spans, size_t i) {
    return i + 1 < spans->len && SPAN_TEXT(spans->ptr[i]) && SPAN_TEXT(spans->ptr[i + 1]);
}

// The messages of one read, packed: the host lowers one buffer and one list
// of span words (two allocations here, each one copy) where a list of
// messages took one per message, and the JS strings are made straight from
// the buffer. With a
// textBatchHandler, each run of texts goes to onTexts and the rest as
// before.
void exports_wharf_websocket_packed_words_handler_on_packed_words(
    borrow_t conn, bytes_t *payloads, exports_wharf_websocket_packed_words_handler_list_span_word_t *spans) {
    enter();
    JSValue c = new_conn(conn);
    JSValue f = JS_IsObject(batch_obj) ? JS_GetProperty(ctx, batch_obj, atom_on_messages) : JS_UNDEFINED;
    JSValue t = JS_IsObject(text_batch_obj) ? JS_GetProperty(ctx, text_batch_obj, atom_on_texts) : JS_UNDEFINED;
    const uint8_t *p = payloads->ptr;
    if (JS_IsFunction(ctx, t)) {
        // Runs of two or more texts to onTexts, what lies between them as
        // one batch (as the host cuts a batch for `text-batch-handler`).
        for (size_t i = 0, j; i < spans->len; i = j) {
            size_t bytes = 0;
            if (run_at(spans, i)) {
                for (j = i; j < spans->len && SPAN_TEXT(spans->ptr[j]); j++) bytes += spans->ptr[j];
                deliver_texts(c, t, p, bytes, &spans->ptr[i], j - i);
            } else {
                j = i;
                do bytes += SPAN_LEN(spans->ptr[j++]);
                while (j < spans->len && !run_at(spans, j));
                deliver_messages(c, f, p, &spans->ptr[i], j - i);
            }
            p += bytes;
        }
    } else {
        deliver_messages(c, f, p, spans->ptr, spans->len);
    }
    JS_FreeValue(ctx, t);
    JS_FreeValue(ctx, f);
    packed_words_handler_world_list_u8_free(payloads);
    exports_wharf_websocket_packed_words_handler_list_span_word_free(spans);
    expire_conn(c);
}
