//! `Sec-WebSocket-Accept` derivation (RFC 6455 section 4.2.2, item 5.4).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

/// The fixed GUID the RFC appends so that a non-WebSocket server can't
/// produce a valid accept value by accident.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Computes the `Sec-WebSocket-Accept` value that proves to the client we
/// understood its `Sec-WebSocket-Key` (base64 of SHA-1 over key + GUID).
pub fn accept_key(client_key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(client_key.as_bytes());
    sha.update(WS_GUID);
    STANDARD.encode(sha.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_vector() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
