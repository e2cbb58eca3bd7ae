// The Wharf echo handler in C.
//
// Every text and binary message is sent straight back; the text "goodbye"
// closes the connection with code 1000 instead.
//
// `packed_words_handler_world.h` is generated from ../../wit by build.sh
// (the same output as `wit-bindgen c --autodrop-borrows yes ../../wit
// --world packed-words-handler-world`: the `conn` borrows are dropped for us after each
// call). Ownership follows the canonical ABI: strings and lists the host
// passes in are ours to free; what we pass to the host is only borrowed for
// the duration of the call.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "packed_words_handler_world.h"

typedef exports_wharf_websocket_handler_borrow_connection_t conn_t;

// Sends fail only in ordinary situations (the connection is closing, the
// peer reads too slowly, ...): log and carry on. stderr ends up in the
// host's log.
static void log_error(conn_t conn, wharf_websocket_connection_error_code_t err) {
    fprintf(stderr, "echo: connection %llu: error code %d\n",
            (unsigned long long)wharf_websocket_connection_method_connection_id(conn), err);
}

// Accept every upgrade request, without a subprotocol or extra headers.
void exports_wharf_websocket_handler_on_upgrade(
    conn_t conn, exports_wharf_websocket_handler_upgrade_request_t *request,
    exports_wharf_websocket_handler_upgrade_response_t *ret) {
    (void)conn;
    wharf_websocket_types_upgrade_request_free(request);
    memset(ret, 0, sizeof *ret);  // no subprotocol, empty header list
    ret->tag = WHARF_WEBSOCKET_TYPES_UPGRADE_RESPONSE_ACCEPT;
}

void exports_wharf_websocket_handler_on_open(conn_t conn) { (void)conn; }

void exports_wharf_websocket_handler_on_text(conn_t conn, packed_words_handler_world_string_t *text) {
    wharf_websocket_connection_error_code_t err;
    bool ok;
    if (text->len == 7 && memcmp(text->ptr, "goodbye", 7) == 0) {
        // Start the closing handshake; on_close follows when it ends.
        wharf_websocket_connection_close_code_t code = {
            .tag = WHARF_WEBSOCKET_TYPES_CLOSE_CODE_NORMAL};
        packed_words_handler_world_string_t reason;
        packed_words_handler_world_string_set(&reason, "goodbye");  // points at the literal
        ok = wharf_websocket_connection_method_connection_close(conn, &code, &reason, &err);
    } else {
        ok = wharf_websocket_connection_method_connection_send_text(conn, text, &err);
    }
    if (!ok) log_error(conn, err);
    packed_words_handler_world_string_free(text);
}

void exports_wharf_websocket_handler_on_binary(conn_t conn, packed_words_handler_world_list_u8_t *data) {
    wharf_websocket_connection_error_code_t err;
    if (!wharf_websocket_connection_method_connection_send_binary(conn, data, &err))
        log_error(conn, err);
    packed_words_handler_world_list_u8_free(data);
}

// Nothing to clean up: the host drops this instance after the last call.
void exports_wharf_websocket_handler_on_close(conn_t conn, uint16_t code,
                                              packed_words_handler_world_string_t *reason, bool clean) {
    (void)conn, (void)code, (void)clean;
    packed_words_handler_world_string_free(reason);
}

// Bit 31 of a span word (`packed.span-word`): the message is binary. A
// text's word is its length.
#define SPAN_BINARY 0x80000000u

// Queues the messages `spans[0..n)` cuts `payloads[0..len)` into, in one
// call into the host (`packed-words-send`, 0.1.12); the host only borrows
// both.
static void send_packed(conn_t conn, uint8_t *payloads, size_t len, uint32_t *spans, size_t n) {
    if (n == 0) return;
    packed_words_handler_world_list_u8_t p = {.ptr = payloads, .len = len};
    wharf_websocket_packed_words_send_list_span_word_t l = {.ptr = spans, .len = n};
    wharf_websocket_packed_words_send_partial_t partial;
    if (!wharf_websocket_packed_words_send_send(conn, &p, &l, &partial)) {
        // Messages from partial.queued on were not sent.
        fprintf(stderr, "echo: connection %llu: %zu replies not sent\n",
                (unsigned long long)wharf_websocket_connection_method_connection_id(conn),
                n - partial.queued);
        log_error(conn, partial.error);
    }
}

// The messages the host read at once, in order, in one call (the world's
// optional `packed-words-handler` export): their payloads back to back in
// `payloads`, and per message a span word, its length and kind. They go
// back as they came, in one call, but a "goodbye" closes: what came
// before it is echoed first. Both lists are ours to free.
void exports_wharf_websocket_packed_words_handler_on_packed_words(
    conn_t conn, packed_words_handler_world_list_u8_t *payloads,
    exports_wharf_websocket_packed_words_handler_list_span_word_t *spans) {
    size_t first_span = 0, first_byte = 0, offset = 0;
    for (size_t i = 0; i < spans->len; i++) {
        uint32_t word = spans->ptr[i];
        size_t end = offset + (word & ~SPAN_BINARY);
        // A text's word is its length: 7 for "goodbye".
        if (word == 7 && memcmp(payloads->ptr + offset, "goodbye", 7) == 0) {
            send_packed(conn, payloads->ptr + first_byte, offset - first_byte, spans->ptr + first_span,
                        i - first_span);
            packed_words_handler_world_string_t text;
            packed_words_handler_world_string_dup(&text, "goodbye");  // on_text frees it
            exports_wharf_websocket_handler_on_text(conn, &text);
            first_span = i + 1, first_byte = end;
        }
        offset = end;
    }
    send_packed(conn, payloads->ptr + first_byte, payloads->len - first_byte, spans->ptr + first_span,
                spans->len - first_span);
    packed_words_handler_world_list_u8_free(payloads);
    exports_wharf_websocket_packed_words_handler_list_span_word_free(spans);
}
