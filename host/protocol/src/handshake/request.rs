//! Parsing and validating the client's opening handshake.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::HandshakeError;

/// Bounds on the request head, so a slow or hostile client can't make the
/// host buffer without limit before the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest request head accepted; an incomplete head past this is
    /// refused with 431 instead of waiting for more.
    pub max_request_bytes: usize,
    /// Size of the fixed header array handed to httparse; more lines than
    /// this are refused with 431.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_request_bytes: 16 * 1024,
            max_headers: 64,
        }
    }
}

/// A validated WebSocket upgrade request.
///
/// Owned strings, so the host can keep it (for routing, auth, logging)
/// after the read buffer is reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method; always `GET` once validated.
    pub method: String,
    /// The request target up to (not including) the first `?`.
    pub path: String,
    /// The part of the target after the first `?`, if there was one.
    pub query: Option<String>,
    /// Every header in arrival order; values are decoded lossily because
    /// HTTP allows opaque bytes there but the host wants text.
    pub headers: Vec<(String, String)>,
    /// The trimmed `Sec-WebSocket-Key`, to feed to
    /// [`accept_response`](super::accept_response).
    pub key: String,
    /// Offered subprotocols in preference order, from every
    /// `Sec-WebSocket-Protocol` header.
    pub subprotocols: Vec<String>,
}

impl Request {
    /// The first header named `name` (ASCII case-insensitive), since header
    /// names are case-insensitive on the wire.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Finds the end of a request head as bytes arrive, looking at each byte
/// about once: a driver parses ([`parse_request`]) only once the head is
/// complete or too large, not after every read (re-parsing from byte 0 on
/// each of a slow client's one-byte segments is quadratic in the head).
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Bytes of the buffer already looked at.
    scanned: usize,
}

impl HeadScanner {
    /// Whether `buf` (the bytes so far, from the start of the request)
    /// holds a blank line, the end of a head (`\n\n`, or `\n\r\n` as CRLF
    /// ends it; httparse accepts both).
    pub fn complete(&mut self, buf: &[u8]) -> bool {
        // Back up over a line ending that may have been cut by a read.
        let from = self.scanned.saturating_sub(2);
        self.scanned = buf.len();
        let Some(tail) = buf.get(from..) else {
            return false;
        };
        // Only line feeds can start the blank line: memchr finds them a
        // word or a vector at a time (a byte-pair window was 1.5k
        // instructions of a 200-byte head).
        memchr::memchr_iter(b'\n', tail)
            .any(|i| matches!(tail.get(i + 1..), Some([b'\n', ..] | [b'\r', b'\n', ..])))
    }
}

/// Parses the opening handshake from the start of `buf`.
///
/// `Ok(None)` means the head is not complete yet: read more and call again
/// with the whole buffer (a driver reading in pieces asks [`HeadScanner`]
/// first). `Ok(Some((req, n)))` means the request occupied
/// `buf[..n]`; bytes after `n` are WebSocket frames the client pipelined and
/// must be fed to the [`WebSocket`](crate::WebSocket).
pub fn parse_request(
    buf: &[u8],
    limits: &HandshakeLimits,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_request_bytes {
                return Err(HandshakeError::RequestTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    // Only the head counts: bytes after it are pipelined frames, which the
    // caller may well have read in the same chunk.
    if n > limits.max_request_bytes {
        return Err(HandshakeError::RequestTooLarge);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::UnsupportedHttpVersion);
    }
    let method = req.method.unwrap_or_default();
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed(method.to_owned()));
    }
    let target = req.path.unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut request = Request {
        method: method.to_owned(),
        path,
        query,
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        key: String::new(),
        subprotocols: Vec::new(),
    };
    validate(&mut request)?;
    Ok(Some((request, n)))
}

fn validate(req: &mut Request) -> Result<(), HandshakeError> {
    // One pass over the headers, then the checks in their fixed order (the
    // first failing one is the answer).
    let mut hosts = 0usize;
    let (mut upgrade, mut connection, mut body) = (false, false, false);
    let mut versions: (usize, Option<&str>) = (0, None);
    let mut keys: (usize, Option<&str>) = (0, None);
    let mut subprotocols = Vec::new();
    for (name, value) in &req.headers {
        let is = |wanted: &str| name.eq_ignore_ascii_case(wanted);
        if is("host") {
            hosts += 1;
        } else if is("upgrade") {
            upgrade |= has_token(value, "websocket");
        } else if is("connection") {
            connection |= has_token(value, "upgrade");
        } else if is("sec-websocket-version") {
            versions = (versions.0 + 1, Some(value));
        } else if is("sec-websocket-key") {
            keys = (keys.0 + 1, Some(value));
        } else if is("content-length") {
            body |= value.trim() != "0";
        } else if is("transfer-encoding") {
            body = true;
        } else if is("sec-websocket-protocol") {
            subprotocols.extend(
                value
                    .split(',')
                    .map(|p| p.trim_matches(is_ows))
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned),
            );
        }
    }
    match hosts {
        0 => return Err(HandshakeError::MissingHost),
        1 => {}
        _ => return Err(HandshakeError::DuplicateHost),
    }
    if !upgrade {
        return Err(HandshakeError::NotWebSocketUpgrade);
    }
    if !connection {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    match versions {
        (1, Some(v)) if v.trim() == "13" => {}
        _ => return Err(HandshakeError::UnsupportedWebSocketVersion),
    }
    let key = match keys {
        (0, _) | (_, None) => return Err(HandshakeError::MissingKey),
        (1, Some(k)) => k.trim(),
        _ => return Err(HandshakeError::DuplicateKey),
    };
    // 16 random bytes encode to exactly 24 characters; checking the length
    // first keeps a huge bogus key from being decoded at all.
    if key.len() != 24 || !matches!(STANDARD.decode(key), Ok(raw) if raw.len() == 16) {
        return Err(HandshakeError::InvalidKey);
    }
    if body {
        return Err(HandshakeError::UnexpectedBody);
    }
    req.key = key.to_owned();
    req.subprotocols = subprotocols;
    Ok(())
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Whether a comma-separated header value lists `token` (case-insensitive),
/// as `Connection: keep-alive, Upgrade` must count as an upgrade.
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim_matches(is_ows).eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_sent_byte_by_byte_is_parsed_once() {
        let head = format!(
            "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             X-Pad: {}\r\n\r\n",
            "p".repeat(2000)
        );
        let limits = HandshakeLimits::default();
        let (mut scanner, mut buf, mut parses) = (HeadScanner::default(), Vec::new(), 0);
        let mut done = None;
        for &b in head.as_bytes() {
            buf.push(b);
            if scanner.complete(&buf) || buf.len() > limits.max_request_bytes {
                parses += 1;
                done = parse_request(&buf, &limits).unwrap();
            }
        }
        assert_eq!(parses, 1);
        assert_eq!(done.expect("parsed").1, head.len());
        // Bare LF line endings end a head too; a CRLF cut between reads is
        // still found.
        let mut lf = HeadScanner::default();
        assert!(!lf.complete(b"GET / HTTP/1.1\nHost: x\n"));
        assert!(lf.complete(b"GET / HTTP/1.1\nHost: x\n\n"));
        let mut cut = HeadScanner::default();
        assert!(!cut.complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r"));
        assert!(cut.complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    }
}
