// The Wharf echo handler in Go.
//
// Every text and binary message is sent straight back; the text "goodbye"
// closes the connection with code 1000 instead.
//
// The handler is the Handler value below: one method per event of the WIT
// `handler` interface, and OnPackedWords for the messages a client sends
// several at once (`packed-words-handler`). bindings.go connects it to the
// component model (what a bindings generator would write). Text and data
// passed to a method live in a per-call buffer: they are valid until the
// method returns, so copy them (strings.Clone, slices.Clone) to keep them.
package main

import (
	"fmt"
	"os"
)

type echo struct{}

// Accept every upgrade request, without a subprotocol or extra headers.
func (echo) OnUpgrade(conn Connection, req UpgradeRequest) UpgradeResponse {
	return Accept{}
}

func (echo) OnOpen(conn Connection) {}

func (echo) OnText(conn Connection, text string) {
	var err error
	if text == "goodbye" {
		// Start the closing handshake; OnClose follows when it ends.
		err = conn.Close(CloseNormal, "goodbye")
	} else {
		err = conn.SendText(text)
	}
	if err != nil {
		// Sends fail only in ordinary situations (closing, the peer reads
		// too slowly, ...). Log and carry on: stderr goes to the host's log.
		fmt.Fprintf(os.Stderr, "echo: connection %d: %v\n", conn.ID(), err)
	}
}

func (echo) OnBinary(conn Connection, data []byte) {
	if err := conn.SendBinary(data); err != nil {
		fmt.Fprintf(os.Stderr, "echo: connection %d: %v\n", conn.ID(), err)
	}
}

// OnPackedWords gets the messages of one read (PackedWordsHandler): their
// payloads back to back, and per message a span word, its length and kind.
// They go back as they came, in one call into the host, but a "goodbye"
// closes: what came before it is echoed first.
func (e echo) OnPackedWords(conn Connection, payloads []byte, spans []uint32) {
	firstSpan, firstByte, offset := 0, 0, 0
	for i, word := range spans {
		end := offset + int(word&^SpanBinary)
		// A text's word is its length: 7 for "goodbye".
		if word == 7 && string(payloads[offset:end]) == "goodbye" {
			sendPacked(conn, payloads[firstByte:offset], spans[firstSpan:i])
			e.OnText(conn, "goodbye")
			firstSpan, firstByte = i+1, end
		}
		offset = end
	}
	sendPacked(conn, payloads[firstByte:], spans[firstSpan:])
}

func sendPacked(conn Connection, payloads []byte, spans []uint32) {
	// On an error, the messages before `queued` went out and none after.
	if queued, err := conn.SendPackedWords(payloads, spans); err != nil {
		fmt.Fprintf(os.Stderr, "echo: connection %d: %d replies not sent: %v\n",
			conn.ID(), len(spans)-queued, err)
	}
}

// Nothing to clean up: the host drops this instance after the last call.
func (echo) OnClose(conn Connection, code uint16, reason string, clean bool) {}

// Handler is the value the exported functions in bindings.go call.
var Handler handler = echo{}

// A c-shared (reactor) module: main is never called.
func main() {}
