// Hand-written component-model bindings for wharf:websocket@0.1.12
// (world packed-words-handler-world): what a bindings generator would
// produce, kept small. echo.go only uses the Go API at the top of this file.
//
// How it works (the "canonical ABI"):
//   - The host calls the exported functions below (//go:wasmexport) with
//     flattened arguments: a string or list is a (pointer, length) pair into
//     this module's linear memory (the length counts elements: bytes for a
//     string or list<u8>, u32s for a list<u32>), a borrowed connection an
//     i32 handle.
//   - Before the call, the host copies strings and lists in through
//     cabi_realloc. It must not touch the Go heap (a garbage collection
//     there would call the WASI clock, which is not allowed while the host
//     is copying arguments in), so it hands out space in a static arena,
//     reset after each call: that is how the arguments are freed.
//   - The host functions are plain wasm imports (//go:wasmimport), taking
//     lists the same way (the host only reads them during the call);
//     results that do not fit in one value are written to a return area
//     we pass as the last argument.
//   - The borrowed `conn` handle must be dropped before each call returns.
//   - The WASI preview1 adapter (which turns the Go runtime's wasip1 calls
//     into WASI preview2) gets its state and stack from cabi_realloc_adapter,
//     in a static block: memory the Go runtime never hands out.
package main

import "unsafe"

// ---------------------------------------------------------------------------
// The Go API
// ---------------------------------------------------------------------------

// Connection is the host's connection resource, borrowed for one call.
type Connection int32

// ErrorCode is why a Connection method refused to act (WIT `error-code`).
type ErrorCode uint8

const (
	ErrClosed ErrorCode = iota
	ErrReasonTooLong
	ErrMessageTooBig
	ErrQueueFull
	ErrInvalidCode
)

func (e ErrorCode) Error() string {
	switch e {
	case ErrClosed:
		return "closed"
	case ErrReasonTooLong:
		return "reason-too-long"
	case ErrMessageTooBig:
		return "message-too-big"
	case ErrQueueFull:
		return "queue-full"
	case ErrInvalidCode:
		return "invalid-code"
	}
	return "unknown error code"
}

// CloseCode is a close code a handler may send (WIT `close-code`).
type CloseCode struct {
	tag uint8
	app uint16
}

var (
	CloseNormal          = CloseCode{tag: 0} // 1000
	CloseGoingAway       = CloseCode{tag: 1} // 1001
	CloseProtocolError   = CloseCode{tag: 2} // 1002
	CloseUnsupportedData = CloseCode{tag: 3} // 1003
	CloseInvalidPayload  = CloseCode{tag: 4} // 1007
	ClosePolicyViolation = CloseCode{tag: 5} // 1008
	CloseMessageTooBig   = CloseCode{tag: 6} // 1009
	CloseInternalError   = CloseCode{tag: 7} // 1011
)

// CloseApplication is a code in 3000..=4999.
func CloseApplication(code uint16) CloseCode { return CloseCode{tag: 8, app: code} }

type Header struct{ Name, Value string }

// UpgradeRequest is the client's HTTP upgrade request (WIT `upgrade-request`).
type UpgradeRequest struct {
	Method        string
	Path          string
	Query         *string // nil: no query string
	Headers       []Header
	Subprotocols  []string
	RemoteAddress string
	TLS           bool
}

// UpgradeResponse is Accept or Reject.
type UpgradeResponse interface{ isUpgradeResponse() }

type Accept struct {
	Subprotocol *string // nil: none
	Headers     []Header
}

type Reject struct {
	Status  uint16
	Headers []Header
	Body    string
}

func (Accept) isUpgradeResponse() {}
func (Reject) isUpgradeResponse() {}

// handler is what echo.go implements: one method per WIT event.
type handler interface {
	OnUpgrade(conn Connection, req UpgradeRequest) UpgradeResponse
	OnOpen(conn Connection)
	OnText(conn Connection, text string)
	OnBinary(conn Connection, data []byte)
	OnClose(conn Connection, code uint16, reason string, clean bool)
}

func (c Connection) ID() uint64 { return uint64(connID(int32(c))) }

func (c Connection) SendText(text string) error {
	connSendText(int32(c), ptrOf(unsafe.StringData(text)), uint32(len(text)), ptrOf(&retArea[0]))
	return result()
}

func (c Connection) SendBinary(data []byte) error {
	connSendBinary(int32(c), ptrOf(unsafe.SliceData(data)), uint32(len(data)), ptrOf(&retArea[0]))
	return result()
}

// SpanBinary is bit 31 of a span word (WIT `packed.span-word`): set for a
// binary message. Bits 0 to 30 are the message's length, so a text's word
// is its length.
const SpanBinary uint32 = 1 << 31

// PackedWordsHandler is optional: a Handler that implements it gets the
// messages of one read in one OnPackedWords call, packed: their payloads
// back to back in payloads, and one span word per message in spans, in
// order (message i is the next spans[i]&^SpanBinary bytes of payloads).
// Without it each goes to OnText or OnBinary. Both slices live in the
// per-call buffer, like OnText's text. A message that arrives on its own
// still goes to OnText or OnBinary.
type PackedWordsHandler interface {
	OnPackedWords(conn Connection, payloads []byte, spans []uint32)
}

// SendPackedWords queues the messages spans cuts payloads into, in order,
// with one call into the host (WIT `packed-words-send`), each as SendText
// or SendBinary would, and stops at the first one refused: it returns how
// many were queued, and why the next was not. Spans that do not add up to
// len(payloads), or a text that is not UTF-8, trap.
func (c Connection) SendPackedWords(payloads []byte, spans []uint32) (queued int, err error) {
	if len(spans) == 0 {
		return 0, nil
	}
	packedWordsSend(int32(c), ptrOf(unsafe.SliceData(payloads)), uint32(len(payloads)),
		ptrOf(unsafe.SliceData(spans)), uint32(len(spans)), ptrOf(&partialRet[0]))
	if partialRet[0]&0xff == 0 {
		return len(spans), nil
	}
	return int(partialRet[1]), ErrorCode(partialRet[2])
}

func (c Connection) Close(code CloseCode, reason string) error {
	connClose(int32(c), uint32(code.tag), uint32(code.app),
		ptrOf(unsafe.StringData(reason)), uint32(len(reason)), ptrOf(&retArea[0]))
	return result()
}

// ---------------------------------------------------------------------------
// Imports: the connection resource's methods
// ---------------------------------------------------------------------------

//go:wasmimport wharf:websocket/connection@0.1.12 [method]connection.id
func connID(self int32) uint64

//go:wasmimport wharf:websocket/connection@0.1.12 [method]connection.send-text
func connSendText(self int32, ptr, len uint32, ret uint32)

//go:wasmimport wharf:websocket/connection@0.1.12 [method]connection.send-binary
func connSendBinary(self int32, ptr, len uint32, ret uint32)

//go:wasmimport wharf:websocket/connection@0.1.12 [method]connection.close
func connClose(self int32, codeTag, codeApp uint32, ptr, len uint32, ret uint32)

//go:wasmimport wharf:websocket/connection@0.1.12 [resource-drop]connection
func connDrop(self int32)

// payloads: list<u8> and spans: list<span-word> as two (pointer, length)
// pairs, then the return area.
//
//go:wasmimport wharf:websocket/packed-words-send@0.1.12 send
func packedWordsSend(conn int32, payloadsPtr, payloadsLen, spansPtr, spansLen uint32, ret uint32)

// partialRet receives a `result<_, partial>` (12 bytes, aligned to 4): the
// tag in byte 0 (1 for an error), then partial's `queued` (a u32 at 4) and
// `error` (an error-code, a byte at 8).
var partialRet [3]uint32

// retArea receives a `result<_, error-code>`: byte 0 is 1 for an error,
// byte 1 the error code.
var retArea [8]byte

func result() error {
	if retArea[0] == 0 {
		return nil
	}
	return ErrorCode(retArea[1])
}

// ---------------------------------------------------------------------------
// Exports: the handler interface
// ---------------------------------------------------------------------------

//go:wasmexport wharf:websocket/handler@0.1.12#on-upgrade
func exportOnUpgrade(conn int32,
	methodPtr, methodLen, pathPtr, pathLen, queryTag, queryPtr, queryLen,
	headersPtr, headersLen, protosPtr, protosLen, remotePtr, remoteLen, tls uint32) uint32 {
	req := UpgradeRequest{
		Method:        liftString(methodPtr, methodLen),
		Path:          liftString(pathPtr, pathLen),
		Headers:       liftHeaders(headersPtr, headersLen),
		RemoteAddress: liftString(remotePtr, remoteLen),
		TLS:           tls != 0,
	}
	if queryTag != 0 {
		q := liftString(queryPtr, queryLen)
		req.Query = &q
	}
	for i := uint32(0); i < protosLen; i++ {
		p := protosPtr + 8*i
		req.Subprotocols = append(req.Subprotocols, liftString(load32(p), load32(p+4)))
	}
	resp := Handler.OnUpgrade(Connection(conn), req)
	connDrop(conn)
	// The response is returned in memory (too big for one value): a variant
	// tag at 0, its payload at 4. Its strings and lists are copied into the
	// arena, which is reset once the host has read them (post-return).
	clear(upgradeRet[:])
	switch r := resp.(type) {
	case Accept:
		if r.Subprotocol != nil {
			upgradeRet[1] = 1
			upgradeRet[2], upgradeRet[3] = lowerString(*r.Subprotocol)
		}
		upgradeRet[4], upgradeRet[5] = lowerHeaders(r.Headers)
	case Reject:
		upgradeRet[0] = 1
		upgradeRet[1] = uint32(r.Status)
		upgradeRet[2], upgradeRet[3] = lowerHeaders(r.Headers)
		upgradeRet[4], upgradeRet[5] = lowerString(r.Body)
	}
	return ptrOf(&upgradeRet[0])
}

// upgrade-response as six 32-bit words (tag, then the case's fields).
var upgradeRet [6]uint32

//go:wasmexport cabi_post_wharf:websocket/handler@0.1.12#on-upgrade
func postOnUpgrade(uint32) { arenaUsed = 0 }

//go:wasmexport wharf:websocket/handler@0.1.12#on-open
func exportOnOpen(conn int32) {
	Handler.OnOpen(Connection(conn))
	done(conn)
}

//go:wasmexport wharf:websocket/handler@0.1.12#on-text
func exportOnText(conn int32, ptr, len uint32) {
	Handler.OnText(Connection(conn), liftString(ptr, len))
	done(conn)
}

//go:wasmexport wharf:websocket/handler@0.1.12#on-binary
func exportOnBinary(conn int32, ptr, len uint32) {
	Handler.OnBinary(Connection(conn), unsafe.Slice((*byte)(addr(ptr)), len))
	done(conn)
}

//go:wasmexport wharf:websocket/handler@0.1.12#on-close
func exportOnClose(conn int32, code uint32, ptr, len uint32, clean uint32) {
	Handler.OnClose(Connection(conn), uint16(code), liftString(ptr, len), clean != 0)
	done(conn)
}

// ---------------------------------------------------------------------------
// Exports: the packed-words-handler interface (world packed-words-handler-world)
// ---------------------------------------------------------------------------

// exportOnPackedWords takes the messages the host read at once, in order,
// in one call instead of one call each: payloads (a list<u8>: the messages'
// payloads back to back) and spans (a list<span-word>: a u32 per message),
// each a (pointer, length) pair into the arena, where the host copied them
// through cabi_realloc. They go to the Handler's OnPackedWords if it has
// one, else each to OnText or OnBinary; done frees both lists.
// The host bounds a batch (64 KiB of small messages, or one large one), so
// it fits the argument arena as a single message does.
//
//go:wasmexport wharf:websocket/packed-words-handler@0.1.12#on-packed-words
func exportOnPackedWords(conn int32, payloadsPtr, payloadsLen, spansPtr, spansLen uint32) {
	c := Connection(conn)
	payloads := unsafe.Slice((*byte)(addr(payloadsPtr)), payloadsLen)
	spans := unsafe.Slice((*uint32)(addr(spansPtr)), spansLen)
	if h, ok := Handler.(PackedWordsHandler); ok {
		h.OnPackedWords(c, payloads, spans)
	} else {
		offset := uint32(0)
		for _, word := range spans {
			end := offset + (word &^ SpanBinary)
			data := payloads[offset:end]
			if word&SpanBinary != 0 {
				Handler.OnBinary(c, data)
			} else {
				Handler.OnText(c, unsafe.String(unsafe.SliceData(data), len(data)))
			}
			offset = end
		}
	}
	done(conn)
}

// done ends an export call: drop the borrowed handle, free the arguments.
func done(conn int32) {
	connDrop(conn)
	arenaUsed = 0
}

// ---------------------------------------------------------------------------
// Memory: the argument arena and (pointer, length) helpers
// ---------------------------------------------------------------------------

// Room for the largest message the host delivers (its max_message_size,
// 16 MiB by default) plus an upgrade request's headers.
const arenaSize = 16<<20 + 1<<20

var (
	arena     [arenaSize]byte
	arenaUsed uintptr
)

//go:wasmexport cabi_realloc
func cabiRealloc(oldPtr, oldSize, align, newSize uint32) uint32 {
	if oldPtr != 0 && newSize <= oldSize {
		return oldPtr
	}
	base := uintptr(unsafe.Pointer(&arena[0]))
	start := (base + arenaUsed + uintptr(align) - 1) &^ (uintptr(align) - 1)
	if start+uintptr(newSize) > base+arenaSize {
		panic("cabi_realloc: argument arena exhausted")
	}
	arenaUsed = start + uintptr(newSize) - base
	if oldPtr != 0 {
		copy(unsafe.Slice((*byte)(unsafe.Pointer(start)), oldSize),
			unsafe.Slice((*byte)(addr(oldPtr)), oldSize))
	}
	return uint32(start)
}

// The WASI adapter's memory: its state and its shadow stack, 64 KiB each,
// asked for once per instance (the first WASI call, during the Go runtime's
// start) and kept. Not from memory.grow: the Go runtime assumes it alone
// grows linear memory (runtime/mem_wasm.go sbrk: it counts from its own
// idea of the end and ignores what memory.grow returns), so pages grown by
// anyone else end up inside its heap and are overwritten once the heap has
// grown over them; a long-lived (shared) instance then traps in the
// adapter's next call ("assertion failed": its state's canary is gone).
var (
	adapterMemory [2<<16 + 64]byte
	adapterUsed   uintptr
)

// cabiReallocAdapter is the adapter's allocator. It runs inside a WASI call
// of the runtime (re-entered from the adapter, before the runtime is fully
// up): no allocation, no stack growth, nothing but arithmetic.
//
//go:wasmexport cabi_realloc_adapter
//go:nosplit
func cabiReallocAdapter(oldPtr, oldSize, align, newSize uint32) uint32 {
	base := uintptr(unsafe.Pointer(&adapterMemory[0]))
	start := (base + adapterUsed + uintptr(align) - 1) &^ (uintptr(align) - 1)
	if oldPtr != 0 || start+uintptr(newSize) > base+uintptr(len(adapterMemory)) {
		panic("cabi_realloc_adapter: adapter memory exhausted")
	}
	adapterUsed = start + uintptr(newSize) - base
	return uint32(start)
}

func addr(p uint32) unsafe.Pointer { return unsafe.Pointer(uintptr(p)) }

func ptrOf[T any](p *T) uint32 { return uint32(uintptr(unsafe.Pointer(p))) }

func load32(p uint32) uint32 { return *(*uint32)(addr(p)) }

// liftString views arena bytes as a string (no copy; valid for this call).
func liftString(ptr, len uint32) string {
	return unsafe.String((*byte)(addr(ptr)), len)
}

func liftHeaders(ptr, n uint32) []Header {
	headers := make([]Header, n)
	for i := range headers {
		h := ptr + 16*uint32(i) // name (ptr, len), value (ptr, len)
		headers[i] = Header{liftString(load32(h), load32(h+4)), liftString(load32(h+8), load32(h+12))}
	}
	return headers
}

func lowerString(s string) (ptr, n uint32) {
	n = uint32(len(s))
	ptr = cabiRealloc(0, 0, 1, n)
	copy(unsafe.Slice((*byte)(addr(ptr)), n), s)
	return ptr, n
}

func lowerHeaders(headers []Header) (ptr, n uint32) {
	ptr = cabiRealloc(0, 0, 4, 16*uint32(len(headers)))
	for i, h := range headers {
		words := (*[4]uint32)(addr(ptr + 16*uint32(i)))
		words[0], words[1] = lowerString(h.Name)
		words[2], words[3] = lowerString(h.Value)
	}
	return ptr, uint32(len(headers))
}
