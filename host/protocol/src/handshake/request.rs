//! Parsing and validating the client's opening handshake.

use std::mem::MaybeUninit;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::HandshakeError;

/// Bounds on the request head, so a slow or hostile client can't make the
/// host buffer without limit before the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest request head accepted; an incomplete head past this is
    /// refused with 431 instead of waiting for more. Heads over 1 GiB are
    /// refused whatever this says (a [`Request`]'s fields are 32-bit
    /// offsets into its text).
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
/// Owned, so the host can keep it (for routing, auth, logging) after the
/// read buffer is reused: one string holds the head's text (method,
/// target, every header name and value, each decoded once) and the fields
/// are spans of it. A handshake makes two allocations, not two per header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    text: String,
    method: Span,
    path: Span,
    query: Option<Span>,
    headers: Vec<(Span, Span)>,
    key: Span,
    subprotocols: Vec<Span>,
}

/// Where a field lies in [`Request`]'s text.
type Span = (u32, u32);

impl Request {
    fn at(&self, (from, to): Span) -> &str {
        // Spans are made with this same text, at char boundaries.
        &self.text[from as usize..to as usize]
    }

    /// The request whose text is `text`, with each field's span given by
    /// `span` (which may append the field to the text).
    fn from_pieces(
        mut text: String,
        req: &httparse::Request<'_, '_>,
        path: &str,
        query: Option<&str>,
        mut span: impl FnMut(&mut String, &[u8]) -> Span,
    ) -> Request {
        let method = span(&mut text, req.method.unwrap_or_default().as_bytes());
        let path = span(&mut text, path.as_bytes());
        let query = query.map(|q| span(&mut text, q.as_bytes()));
        let headers = req
            .headers
            .iter()
            .map(|h| (span(&mut text, h.name.as_bytes()), span(&mut text, h.value)))
            .collect();
        Request {
            text,
            method,
            path,
            query,
            headers,
            key: (0, 0),
            subprotocols: Vec::new(),
        }
    }

    /// The request method; always `GET` once validated.
    pub fn method(&self) -> &str {
        self.at(self.method)
    }

    /// The request target up to (not including) the first `?`.
    pub fn path(&self) -> &str {
        self.at(self.path)
    }

    /// The part of the target after the first `?`, if there was one.
    pub fn query(&self) -> Option<&str> {
        self.query.map(|q| self.at(q))
    }

    /// Every header in arrival order, as (name, value); values are decoded
    /// lossily.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone {
        self.headers.iter().map(|&(n, v)| (self.at(n), self.at(v)))
    }

    /// The first header named `name` (ASCII case-insensitive), since header
    /// names are case-insensitive on the wire.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The trimmed `Sec-WebSocket-Key`, to feed to
    /// [`accept_response`](super::accept_response).
    pub fn key(&self) -> &str {
        self.at(self.key)
    }

    /// Offered subprotocols in preference order, from every
    /// `Sec-WebSocket-Protocol` header.
    pub fn subprotocols(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.subprotocols.iter().map(|&p| self.at(p))
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
    // httparse needs room for every header line up front; on the stack for
    // the usual limits, so a handshake does not allocate and zero it.
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let room = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut heap[..]
    };
    let max = limits.max_request_bytes.min(MAX_HEAD);
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, room) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max {
                return Err(HandshakeError::RequestTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => return Err(HandshakeError::Malformed(e)),
    };
    // Only the head counts: bytes after it are pipelined frames, which the
    // caller may well have read in the same chunk.
    if n > max {
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
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let head = &buf[..n];
    let mut request = match std::str::from_utf8(head) {
        // The usual head (ASCII) is kept whole: every field is where
        // httparse found it. Both point into `buf`.
        Ok(text) => Request::from_pieces(text.to_owned(), &req, path, query, |_, piece| {
            span_in(head, piece)
        }),
        Err(_) => Request::from_pieces(String::with_capacity(n), &req, path, query, push_lossy),
    };
    validate(&mut request)?;
    Ok(Some((request, n)))
}

/// The span of `part` within `whole`, of which it is a subslice.
fn span_in(whole: &[u8], part: &[u8]) -> Span {
    // A subslice's offset is exact; both ends are at most `whole`'s length,
    // which `MAX_HEAD` keeps inside u32.
    let from = part.as_ptr() as usize - whole.as_ptr() as usize;
    (from as u32, (from + part.len()) as u32)
}

/// Appends `bytes` to `text`, decoded lossily (HTTP allows opaque bytes in
/// header values, and the host wants text), and returns their span.
fn push_lossy(text: &mut String, bytes: &[u8]) -> Span {
    let from = text.len();
    text.push_str(&String::from_utf8_lossy(bytes));
    // The head is at most `MAX_HEAD` long, and a lossy replacement
    // triples at most one byte: inside u32.
    (from as u32, text.len() as u32)
}

/// The longest head parsed, whatever the limits say: decoded lossily it
/// is at most three times as long, and its spans must fit in u32.
const MAX_HEAD: usize = 1 << 30;

/// Header lines httparse gets room for on the stack (the default limit).
const STACK_HEADERS: usize = 64;

fn validate(req: &mut Request) -> Result<(), HandshakeError> {
    // One pass over the headers, then the checks in their fixed order (the
    // first failing one is the answer).
    let mut hosts = 0usize;
    let (mut upgrade, mut connection, mut body) = (false, false, false);
    let mut versions: (usize, Option<&str>) = (0, None);
    let mut keys: (usize, Option<Span>) = (0, None);
    let mut subprotocols = Vec::new();
    let text = req.text.as_bytes();
    for &(name_at, value_at) in &req.headers {
        let (name, value) = (req.at(name_at), req.at(value_at));
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
            keys = (keys.0 + 1, Some(span_in(text, value.trim().as_bytes())));
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
                    .map(|p| span_in(text, p.as_bytes())),
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
        (1, Some(k)) => k,
        _ => return Err(HandshakeError::DuplicateKey),
    };
    // 16 random bytes encode to exactly 24 characters; checking the length
    // first keeps a huge bogus key from being decoded at all.
    let text = req.at(key);
    if text.len() != 24 || !matches!(STANDARD.decode(text), Ok(raw) if raw.len() == 16) {
        return Err(HandshakeError::InvalidKey);
    }
    if body {
        return Err(HandshakeError::UnexpectedBody);
    }
    req.key = key;
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
    fn fields_are_spans_of_the_decoded_head() {
        // Opaque bytes in values, padding around the key and the
        // subprotocols: each span must land on the decoded text.
        let mut head = b"GET /a%20b?x=\xc3\xa9 HTTP/1.1\r\nHost: h\r\nX-Bin: \xff\xfe!\r\n\
            Upgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Protocol: \xffa ,, \t b\t,c\r\n\
            Sec-WebSocket-Key:   dGhlIHNhbXBsZSBub25jZQ==  \r\nSec-WebSocket-Version: 13\r\n"
            .to_vec();
        head.extend_from_slice(b"sec-websocket-protocol: d\r\n\r\n");
        let (req, n) = parse_request(&head, &HandshakeLimits::default())
            .unwrap()
            .expect("complete");
        assert_eq!(n, head.len());
        assert_eq!(
            (req.method(), req.path(), req.query()),
            ("GET", "/a%20b", Some("x=\u{e9}"))
        );
        assert_eq!(req.header("x-bin"), Some("\u{fffd}\u{fffd}!"));
        assert_eq!(req.key(), "dGhlIHNhbXBsZSBub25jZQ==");
        let offered: Vec<&str> = req.subprotocols().collect();
        assert_eq!(offered, ["\u{fffd}a", "b", "c", "d"]);
        assert_eq!(req.headers().len(), 8);
        assert_eq!(req.headers().last(), Some(("sec-websocket-protocol", "d")));
    }

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
