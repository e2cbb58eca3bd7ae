//! Why an opening handshake was refused, and what HTTP answer that earns.

use super::response::write_response;

/// A reason to refuse the client's opening handshake.
///
/// Each variant maps to one HTTP status ([`HandshakeError::status`]) so the
/// host can answer with [`HandshakeError::response`] and close the
/// connection without inventing its own wording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request head grew past `max_request_bytes` (431).
    #[error("request header section too large")]
    RequestTooLarge,
    /// More header lines than `max_headers` (431).
    #[error("too many request headers")]
    TooManyHeaders,
    /// httparse could not make sense of the request head (400).
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
    /// Only HTTP/1.1 can carry an upgrade (400).
    #[error("HTTP/1.1 is required for a WebSocket upgrade")]
    UnsupportedHttpVersion,
    /// The opening handshake must be a GET (405).
    #[error("method {0} not allowed, use GET")]
    MethodNotAllowed(String),
    /// HTTP/1.1 requires a Host header (400).
    #[error("missing Host header")]
    MissingHost,
    /// Two Host headers make the target ambiguous (400).
    #[error("duplicate Host header")]
    DuplicateHost,
    /// No `Upgrade: websocket` (426, so the client learns what we speak).
    #[error("expected Upgrade: websocket")]
    NotWebSocketUpgrade,
    /// No `upgrade` token in any Connection header (400).
    #[error("Connection header must contain the upgrade token")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13 (426).
    #[error("Sec-WebSocket-Version must be 13")]
    UnsupportedWebSocketVersion,
    /// No `Sec-WebSocket-Key` header (400).
    #[error("missing Sec-WebSocket-Key header")]
    MissingKey,
    /// More than one `Sec-WebSocket-Key` header (400).
    #[error("duplicate Sec-WebSocket-Key header")]
    DuplicateKey,
    /// The key is not base64 of exactly 16 bytes (400).
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes")]
    InvalidKey,
    /// The request announces a body, which an upgrade GET must not have
    /// (400): its bytes would be mistaken for WebSocket frames.
    #[error("upgrade request must not have a body")]
    UnexpectedBody,
}

impl HandshakeError {
    /// The HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::RequestTooLarge | HandshakeError::TooManyHeaders => 431,
            HandshakeError::MethodNotAllowed(_) => 405,
            HandshakeError::NotWebSocketUpgrade | HandshakeError::UnsupportedWebSocketVersion => {
                426
            }
            HandshakeError::Malformed(_)
            | HandshakeError::UnsupportedHttpVersion
            | HandshakeError::MissingHost
            | HandshakeError::DuplicateHost
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::MissingKey
            | HandshakeError::DuplicateKey
            | HandshakeError::InvalidKey
            | HandshakeError::UnexpectedBody => 400,
        }
    }

    /// A complete HTTP/1.1 response (status line, headers, short text body)
    /// ending with `Connection: close`, ready to write before closing.
    ///
    /// Includes the headers the RFCs ask for: `Allow: GET` on 405, and
    /// `Upgrade`/`Sec-WebSocket-Version` on 426 so the client can retry.
    pub fn response(&self) -> Vec<u8> {
        let extra: &[(&str, &str)] = match self {
            HandshakeError::MethodNotAllowed(_) => &[("Allow", "GET")],
            HandshakeError::NotWebSocketUpgrade => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            HandshakeError::UnsupportedWebSocketVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        };
        let mut body = self.to_string();
        body.push('\n');
        write_response(self.status(), extra.iter().map(|(n, v)| (*n, *v)), &body)
    }
}
