// The Wharf echo handler in C.
//
// Every text and binary message is sent straight back; the text "goodbye"
// closes the connection with code 1000 instead.
//
// `batch_handler_world.h` is generated from ../../wit by build.sh (the same
// output as `wit-bindgen c --autodrop-borrows yes ../../wit --world
// batch-handler-world`: the `conn` borrows are dropped for us after each
// call). Ownership follows the canonical ABI: strings and lists the host
// passes in are ours to free; what we pass to the host is only borrowed for
// the duration of the call.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "batch_handler_world.h"

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

void exports_wharf_websocket_handler_on_text(conn_t conn, batch_handler_world_string_t *text) {
    wharf_websocket_connection_error_code_t err;
    bool ok;
    if (text->len == 7 && memcmp(text->ptr, "goodbye", 7) == 0) {
        // Start the closing handshake; on_close follows when it ends.
        wharf_websocket_connection_close_code_t code = {
            .tag = WHARF_WEBSOCKET_TYPES_CLOSE_CODE_NORMAL};
        batch_handler_world_string_t reason;
        batch_handler_world_string_set(&reason, "goodbye");  // points at the literal
        ok = wharf_websocket_connection_method_connection_close(conn, &code, &reason, &err);
    } else {
        ok = wharf_websocket_connection_method_connection_send_text(conn, text, &err);
    }
    if (!ok) log_error(conn, err);
    batch_handler_world_string_free(text);
}

void exports_wharf_websocket_handler_on_binary(conn_t conn, batch_handler_world_list_u8_t *data) {
    wharf_websocket_connection_error_code_t err;
    if (!wharf_websocket_connection_method_connection_send_binary(conn, data, &err))
        log_error(conn, err);
    batch_handler_world_list_u8_free(data);
}

// Nothing to clean up: the host drops this instance after the last call.
void exports_wharf_websocket_handler_on_close(conn_t conn, uint16_t code,
                                              batch_handler_world_string_t *reason, bool clean) {
    (void)conn, (void)code, (void)clean;
    batch_handler_world_string_free(reason);
}

typedef wharf_websocket_batch_send_outgoing_t outgoing_t;

// Queues replies[0..n) in one call into the host (`batch-send`, 0.1.7),
// then frees their payloads (the host only borrowed them).
static void send_all(conn_t conn, outgoing_t *replies, size_t n) {
    if (n == 0) return;
    wharf_websocket_batch_send_list_outgoing_t list = {.ptr = replies, .len = n};
    wharf_websocket_batch_send_partial_t partial;
    if (!wharf_websocket_batch_send_send(conn, &list, &partial)) {
        // Replies from partial.queued on were not sent.
        fprintf(stderr, "echo: connection %llu: %zu replies not sent\n",
                (unsigned long long)wharf_websocket_connection_method_connection_id(conn),
                n - partial.queued);
        log_error(conn, partial.error);
    }
    for (size_t i = 0; i < n; i++) wharf_websocket_batch_send_outgoing_free(&replies[i]);
}

// The messages the host read at once, in order, in one call (the world's
// optional `batch-handler` export), answered in one call too: one call
// into the component and one out of it per read instead of one each per
// message. The replies reuse the messages' payloads, which are ours to
// free, as is the list itself.
void exports_wharf_websocket_batch_handler_on_messages(
    conn_t conn, exports_wharf_websocket_batch_handler_list_message_t *messages) {
    outgoing_t *replies = malloc(messages->len * sizeof *replies);
    size_t n = 0;
    for (size_t i = 0; i < messages->len; i++) {
        exports_wharf_websocket_batch_handler_message_t *m = &messages->ptr[i];
        bool text = m->tag == EXPORTS_WHARF_WEBSOCKET_BATCH_HANDLER_MESSAGE_TEXT;
        if (!replies || (text && m->val.text.len == 7 && memcmp(m->val.text.ptr, "goodbye", 7) == 0)) {
            // What came before a goodbye is echoed before the close (and
            // without memory for the list, each message on its own).
            send_all(conn, replies, n);
            n = 0;
            if (text)
                exports_wharf_websocket_handler_on_text(conn, &m->val.text);
            else
                exports_wharf_websocket_handler_on_binary(conn, &m->val.binary);
            continue;
        }
        replies[n].tag = text ? WHARF_WEBSOCKET_BATCH_SEND_OUTGOING_TEXT
                              : WHARF_WEBSOCKET_BATCH_SEND_OUTGOING_BINARY;
        if (text)
            replies[n].val.text = m->val.text;
        else
            replies[n].val.binary = m->val.binary;
        n++;
    }
    send_all(conn, replies, n);
    free(replies);
    if (messages->len) free(messages->ptr);
}
