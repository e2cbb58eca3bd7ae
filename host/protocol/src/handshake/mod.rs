//! The HTTP/1.1 opening handshake (RFC 6455 section 4, server side).
//!
//! Parsing and response building are separate so the host can look at the
//! [`Request`] (path, headers, offered subprotocols) and decide to accept or
//! reject before anything is written.

mod accept_key;
mod error;
mod request;
mod response;

pub use accept_key::accept_key;
pub use error::HandshakeError;
pub use request::{HandshakeLimits, HeadScanner, Request, parse_request};
pub use response::{InvalidHeader, accept_response, reject_response, validate_header};
