//! Sans-IO core of the Wharf WebSocket server (RFC 6455, server role).
//!
//! Nothing here touches a socket, a clock or a thread: the host feeds bytes
//! and `Instant`s in and takes events and bytes out. That keeps every
//! protocol rule testable by feeding byte strings, and lets the host pick
//! its own I/O strategy (tokio, TLS, writev) without this crate caring.
//!
//! * [`handshake`] parses and validates the HTTP/1.1 upgrade request and
//!   builds the responses.
//! * [`protocol`] is the framing state machine that runs after the upgrade.
//!
//! ```
//! use std::time::Instant;
//! use wharf_protocol::{Config, Event, HandshakeLimits, WebSocket, accept_response, parse_request};
//!
//! // Bytes as read from the socket: the request, then a pipelined masked
//! // text frame "hi".
//! let mut buf = b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
//!     Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
//!     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec();
//! buf.extend_from_slice(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
//!
//! let (req, n) = match parse_request(&buf, &HandshakeLimits::default()) {
//!     Ok(Some(done)) => done,
//!     Ok(None) => unreachable!("would read more bytes"),
//!     Err(e) => { let _reply = e.response(); return; }
//! };
//! let reply = accept_response(req.key(), None, &[]).unwrap(); // write this first
//! assert!(reply.starts_with(b"HTTP/1.1 101"));
//!
//! let now = Instant::now();
//! let mut ws = WebSocket::new(Config::default(), now);
//! let mut input = &buf[n..];
//! let mut got = Vec::new();
//! while let Some(event) = ws.read(&mut input, now) {
//!     if let Event::Text(t) = event { got.push(t.to_owned()); }
//! }
//! assert_eq!(got, ["hi"]);
//! ws.send_text("hello").unwrap();
//! let mut slices = [std::io::IoSlice::new(&[]); 8];
//! let filled = ws.output_slices(&mut slices); // writev these...
//! let written: usize = slices[..filled].iter().map(|s| s.len()).sum();
//! ws.advance_output(written); // ...then report how much went out
//! assert!(!ws.has_output());
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod handshake;
pub mod protocol;

/// Internals the fuzz targets (`fuzz/`) and their corpus replay drive
/// directly; not part of the API, no stability promised.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::protocol::Buffered;
    pub use crate::protocol::frame::utf8::{InvalidUtf8, Utf8Validator};
}

pub use handshake::{
    HandshakeError, HandshakeLimits, HeadScanner, InvalidHeader, Request, accept_key,
    accept_response, parse_request, reject_response, validate_header,
};
pub use protocol::{
    CloseInfo, Config, Event, FrameBatch, Framed, MAX_CLOSE_REASON, Masked, Outgoing, PayloadRoom,
    ProtocolError, SendError, State, Tally, WebSocket, close::CloseCode, queue_full,
};
