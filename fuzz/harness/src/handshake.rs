//! Target `handshake`: the opening handshake parser and the response
//! builders.
//!
//! Input: the bytes a client sends before the upgrade (raw, so corpus files
//! read as HTTP). Checked:
//!
//! * `parse_request` never panics; it waits (`Ok(None)`) only while the
//!   buffer is within `max_request_bytes`; bytes after the head (pipelined
//!   frames) change nothing; tighter limits never accept what looser ones
//!   refuse;
//! * an accepted request is a GET whose head ends in a blank line and
//!   passes an independent check of RFC 6455 section 4.2.1: one Host, an
//!   `Upgrade` listing `websocket`, a `Connection` listing `upgrade`, one
//!   `Sec-WebSocket-Version: 13`, one key that is base64 of 16 bytes, no
//!   body; its path and headers are the ones on the wire;
//! * the 101 response parses as HTTP with exactly the headers it must have
//!   and a `Sec-WebSocket-Accept` computed here from SHA-1 and base64;
//! * a refusal has a 4xx status and parses as a complete HTTP response;
//! * the response builders refuse, rather than emit, a header or
//!   subprotocol that would inject another line (names and values taken
//!   from the input);
//! * [`HeadScanner`] fed the input in pieces finds the end of the head
//!   exactly when a blank line has arrived.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};
use wharf_protocol::{
    HandshakeError, HandshakeLimits, HeadScanner, Request, accept_response, parse_request,
    reject_response, validate_header,
};

/// The target's check.
pub fn check(data: &[u8]) {
    scanner(data);
    let limits = HandshakeLimits::default();
    let result = parse_request(data, &limits);
    match &result {
        Ok(None) => assert!(data.len() <= limits.max_request_bytes),
        Ok(Some((req, n))) => accepted(data, req, *n, &limits),
        Err(e) => refused(e),
    }

    // Pipelined frame bytes after a complete head change nothing.
    if let Ok(Some((req, n))) = &result {
        let mut more = data[..*n].to_vec();
        more.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, b'h', b'e', b'l', b'l', b'o']);
        assert_eq!(
            parse_request(&more, &limits),
            Ok(Some((req.clone(), *n))),
            "pipelined bytes changed the parse"
        );
    }

    // Tighter limits: never accept what the defaults refuse.
    let tight = HandshakeLimits {
        max_request_bytes: 256,
        max_headers: 8,
    };
    match parse_request(data, &tight) {
        Ok(Some(done)) => assert_eq!(result, Ok(Some(done)), "tight limits accepted more"),
        Ok(None) => assert!(data.len() <= tight.max_request_bytes),
        Err(e) => refused(&e),
    }

    builders(data);
}

fn scanner(data: &[u8]) {
    let naive =
        |buf: &[u8]| buf.windows(2).any(|w| w == b"\n\n") || buf.windows(3).any(|w| w == b"\n\r\n");
    let lens = [1u8, 5, 2, 13, 3];
    let mut s = HeadScanner::default();
    let mut end = 0;
    for piece in crate::chunks(data, &lens) {
        end += piece.len();
        let buf = &data[..end];
        let complete = s.complete(buf);
        assert_eq!(complete, naive(buf), "HeadScanner after {end} bytes");
        if complete {
            break;
        }
    }
}

fn headers<'a>(req: &'a Request, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn lists(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn accepted(data: &[u8], req: &Request, n: usize, limits: &HandshakeLimits) {
    assert!(n <= data.len() && n <= limits.max_request_bytes);
    let head = &data[..n];
    assert!(
        head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
        "head does not end in a blank line"
    );
    assert_eq!(req.method(), "GET");
    assert!(contains(head, b"GET "), "no GET on the wire");
    let target = match req.query() {
        Some(q) => format!("{}?{q}", req.path()),
        None => req.path().to_owned(),
    };
    assert!(
        contains(head, format!(" {target} HTTP/1.1").as_bytes()),
        "target {target:?} is not the one on the wire"
    );
    assert!(req.headers().len() <= limits.max_headers);
    for (name, value) in req.headers() {
        assert!(
            contains(head, name.as_bytes()),
            "header {name:?} not on the wire"
        );
        if !value.contains('\u{FFFD}') {
            assert!(
                contains(head, value.as_bytes()),
                "value {value:?} not on the wire"
            );
        }
        assert!(!name.contains([':', '\r', '\n']) && !value.contains(['\r', '\n']));
    }

    // RFC 6455 section 4.2.1, checked again here.
    assert_eq!(headers(req, "host").count(), 1, "Host");
    assert!(
        headers(req, "upgrade").any(|v| lists(v, "websocket")),
        "Upgrade"
    );
    assert!(
        headers(req, "connection").any(|v| lists(v, "upgrade")),
        "Connection"
    );
    let versions: Vec<_> = headers(req, "sec-websocket-version").collect();
    assert!(
        matches!(versions[..], [v] if v.trim() == "13"),
        "version {versions:?}"
    );
    let keys: Vec<_> = headers(req, "sec-websocket-key").collect();
    assert!(
        matches!(keys[..], [k] if k.trim() == req.key()),
        "key {keys:?}"
    );
    assert_eq!(STANDARD.decode(req.key()).map(|k| k.len()), Ok(16), "key");
    assert!(headers(req, "content-length").all(|v| v.trim() == "0"));
    assert_eq!(headers(req, "transfer-encoding").count(), 0);
    for p in req.subprotocols() {
        assert!(!p.is_empty() && !p.contains(','), "subprotocol {p:?}");
        assert_eq!(p.trim_matches([' ', '\t']), p);
    }

    let mut sha = Sha1::new();
    sha.update(req.key().as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = STANDARD.encode(sha.finalize());
    let reply = accept_response(req.key(), None, &[]).expect("a valid key is accepted");
    let want = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-accept", accept.as_str()),
    ];
    assert_eq!(
        response(&reply, 101),
        want.map(|(n, v)| (n.into(), v.into()))
    );

    // Echoing an offered subprotocol: accepted iff a token, and then it is
    // exactly one more header.
    for p in req.subprotocols() {
        let token = p.bytes().all(is_tchar);
        match accept_response(req.key(), Some(p), &[]) {
            Ok(reply) => {
                assert!(token, "non-token subprotocol {p:?} accepted");
                let got = response(&reply, 101);
                assert_eq!(got.len(), 4);
                assert_eq!(got[3], ("sec-websocket-protocol".into(), p.to_owned()));
            }
            Err(_) => assert!(!token, "token subprotocol {p:?} refused"),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn refused(e: &HandshakeError) {
    let status = e.status();
    assert!(matches!(status, 400 | 405 | 426 | 431), "status {status}");
    let got = response(&e.response(), status);
    assert!(got.contains(&("connection".into(), "close".into())));
}

/// Parses a complete response with httparse: the status, and the headers
/// (lower-cased names) in order; the body must be exactly Content-Length.
fn response(bytes: &[u8], status: u16) -> Vec<(String, String)> {
    let mut hdrs = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut hdrs);
    let n = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("response does not parse: {other:?}: {bytes:x?}"),
    };
    assert_eq!(resp.code, Some(status));
    assert_eq!(resp.version, Some(1));
    let got: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            let v = std::str::from_utf8(h.value).expect("header value is text");
            (h.name.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    let body = bytes.len() - n;
    if status != 101 {
        let len = got.iter().find(|(n, _)| n == "content-length");
        assert_eq!(len.map(|(_, v)| v.parse::<usize>()), Some(Ok(body)));
    } else {
        assert_eq!(body, 0);
    }
    got
}

/// Header names and values from the input (split at the first `:`, or the
/// middle) go through the builders: refused, or written as exactly that one
/// header.
fn builders(data: &[u8]) {
    let text = String::from_utf8_lossy(&data[..data.len().min(512)]);
    let (name, value) = text
        .split_once(':')
        .unwrap_or_else(|| text.split_at(text.floor_char_boundary(text.len() / 2)));
    let extra = vec![(name.to_owned(), value.to_owned())];
    let valid = validate_header(name, value).is_ok();
    let lower = name.to_ascii_lowercase();
    let reserved = matches!(
        lower.as_str(),
        "upgrade" | "connection" | "content-length" | "transfer-encoding"
    ) || lower.starts_with("sec-websocket-");
    let expect_valid = !name.is_empty()
        && name.bytes().all(is_tchar)
        && !reserved
        && !value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7F);
    assert_eq!(valid, expect_valid, "validate_header({name:?}, {value:?})");

    let body = text.get(..text.floor_char_boundary(40)).unwrap_or("");
    match reject_response(403, &extra, body) {
        Ok(reply) => {
            assert!(valid);
            let got = response(&reply, 403);
            let v = value.trim_matches([' ', '\t']);
            assert!(
                got.contains(&(lower.clone(), v.to_owned())),
                "{name:?}: {value:?} not written as one header: {got:?}"
            );
        }
        Err(_) => assert!(!valid),
    }
    match accept_response("dGhlIHNhbXBsZSBub25jZQ==", None, &extra) {
        Ok(reply) => {
            assert!(valid);
            let got = response(&reply, 101);
            assert_eq!(got.len(), 4, "{got:?}");
        }
        Err(_) => assert!(!valid),
    }
}
