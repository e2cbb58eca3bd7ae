// The Wharf echo handler in Go.
//
// Every text and binary message is sent straight back; the text "goodbye"
// closes the connection with code 1000 instead.
//
// The handler is the Handler value below: one method per event of the WIT
// `handler` interface. bindings.go connects it to the component model (what
// a bindings generator would write). Text and data passed to a method live
// in a per-call buffer: they are valid until the method returns, so copy
// them (strings.Clone, slices.Clone) to keep them.
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

// OnMessages gets the messages of one read (BatchHandler) and sends them
// back in one call into the host; a "goodbye" among them closes after the
// echoes of those before it.
func (e echo) OnMessages(conn Connection, messages []Message) {
	start := 0
	for i, m := range messages {
		if !m.Binary && string(m.Data) == "goodbye" {
			sendAll(conn, messages[start:i])
			e.OnText(conn, "goodbye")
			start = i + 1
		}
	}
	sendAll(conn, messages[start:])
}

func sendAll(conn Connection, messages []Message) {
	if queued, err := conn.SendBatch(messages); err != nil {
		fmt.Fprintf(os.Stderr, "echo: connection %d: %d replies not sent: %v\n",
			conn.ID(), len(messages)-queued, err)
	}
}

// Nothing to clean up: the host drops this instance after the last call.
func (echo) OnClose(conn Connection, code uint16, reason string, clean bool) {}

// Handler is the value the exported functions in bindings.go call.
var Handler handler = echo{}

// A c-shared (reactor) module: main is never called.
func main() {}
