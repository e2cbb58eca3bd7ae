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

// The messages the host read at once, in order, in one call (the world's
// optional `batch-handler` export): one call into the component per read
// instead of one per message, ~0.9x instead of ~0.8x the Rust echo's
// messages per second on 16 pipelined 1 KiB texts. Each is handled as
// on_text/on_binary would, which free it; the list itself is ours to free.
void exports_wharf_websocket_batch_handler_on_messages(
    conn_t conn, exports_wharf_websocket_batch_handler_list_message_t *messages) {
    for (size_t i = 0; i < messages->len; i++) {
        exports_wharf_websocket_batch_handler_message_t *m = &messages->ptr[i];
        if (m->tag == EXPORTS_WHARF_WEBSOCKET_BATCH_HANDLER_MESSAGE_TEXT)
            exports_wharf_websocket_handler_on_text(conn, &m->val.text);
        else
            exports_wharf_websocket_handler_on_binary(conn, &m->val.binary);
    }
    if (messages->len) free(messages->ptr);
}
