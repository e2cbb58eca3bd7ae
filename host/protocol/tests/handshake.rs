//! Opening-handshake rules, each with the status it earns.

use wharf_protocol::{
    HandshakeError, HandshakeLimits, InvalidHeader, accept_key, accept_response, parse_request,
    reject_response, validate_header,
};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request_with(lines: &[&str]) -> Vec<u8> {
    let mut s = String::from("GET /chat?room=1&x=2 HTTP/1.1\r\n");
    for l in lines {
        s.push_str(l);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

fn base_lines() -> Vec<&'static str> {
    vec![
        "Host: example.com",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
}

/// The base request with the header starting with `drop` removed and
/// `add` appended.
fn variant(drop: &str, add: &[&str]) -> Vec<u8> {
    let mut lines: Vec<&str> = base_lines()
        .into_iter()
        .filter(|l| drop.is_empty() || !l.starts_with(drop))
        .collect();
    lines.extend_from_slice(add);
    request_with(&lines)
}

fn err_of(buf: &[u8]) -> HandshakeError {
    parse_request(buf, &HandshakeLimits::default()).expect_err("request should be refused")
}

fn ok_of(buf: &[u8]) -> wharf_protocol::Request {
    parse_request(buf, &HandshakeLimits::default())
        .expect("request should be accepted")
        .expect("request should be complete")
        .0
}

fn text(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

#[test]
fn rfc6455_accept_key_vector() {
    assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn parses_valid_request() {
    let buf = variant(
        "",
        &[
            "Sec-WebSocket-Protocol: chat, , superchat ",
            "X-Custom: caf\u{e9}",
            "sec-websocket-protocol: v2",
        ],
    );
    let (req, n) = parse_request(&buf, &HandshakeLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(n, buf.len());
    assert_eq!(req.method(), "GET");
    assert_eq!(req.path(), "/chat");
    assert_eq!(req.query(), Some("room=1&x=2"));
    assert_eq!(req.key(), KEY);
    assert!(req.subprotocols().eq(["chat", "superchat", "v2"]));
    assert_eq!(req.header("HOST"), Some("example.com"));
    assert_eq!(req.header("x-custom"), Some("caf\u{e9}"));
    assert_eq!(req.header("missing"), None);
    assert_eq!(req.headers().len(), 8);
    assert_eq!(req.headers().next(), Some(("Host", "example.com")));
}

#[test]
fn path_without_query() {
    let buf = text(&variant("", &[])).replace("/chat?room=1&x=2", "/");
    let req = ok_of(buf.as_bytes());
    assert_eq!(req.path(), "/");
    assert_eq!(req.query(), None);
}

#[test]
fn pipelined_frames_are_left_after_n() {
    let mut buf = variant("", &[]);
    let head = buf.len();
    buf.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
    let (_, n) = parse_request(&buf, &HandshakeLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(n, head);
    assert_eq!(&buf[n..], &[0x81, 0x80, 1, 2, 3, 4]);
}

#[test]
fn incomplete_request_needs_more() {
    let buf = variant("", &[]);
    for cut in 0..buf.len() {
        assert_eq!(
            parse_request(&buf[..cut], &HandshakeLimits::default()),
            Ok(None),
            "cut at {cut}"
        );
    }
}

#[test]
fn oversized_incomplete_request_is_431() {
    let limits = HandshakeLimits {
        max_request_bytes: 64,
        max_headers: 64,
    };
    let mut buf = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    buf.resize(65, b'a');
    let e = parse_request(&buf, &limits).unwrap_err();
    assert_eq!(e, HandshakeError::RequestTooLarge);
    assert_eq!(e.status(), 431);
    // Exactly at the limit we still wait.
    assert_eq!(parse_request(&buf[..64], &limits), Ok(None));
}

#[test]
fn complete_request_with_large_pipelined_tail_is_fine() {
    let limits = HandshakeLimits::default();
    let mut buf = variant("", &[]);
    let head = buf.len();
    buf.resize(head + limits.max_request_bytes * 2, 0x82);
    let (_, n) = parse_request(&buf, &limits).unwrap().unwrap();
    assert_eq!(n, head);
}

#[test]
fn too_many_headers_is_431() {
    let limits = HandshakeLimits {
        max_request_bytes: 16 * 1024,
        max_headers: 6,
    };
    let buf = variant("", &["X-A: 1", "X-B: 2"]);
    let e = parse_request(&buf, &limits).unwrap_err();
    assert_eq!(e, HandshakeError::TooManyHeaders);
    assert_eq!(e.status(), 431);
    assert!(parse_request(&variant("", &["X-A: 1"]), &limits).is_ok());
}

#[test]
fn garbage_is_400() {
    let e = err_of(b"\x00\x01\x02 nonsense\r\n\r\n");
    assert!(matches!(e, HandshakeError::Malformed(_)));
    assert_eq!(e.status(), 400);
    let e = err_of(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n");
    assert_eq!(e.status(), 400);
}

#[test]
fn http10_is_400() {
    let buf = text(&variant("", &[])).replace("HTTP/1.1", "HTTP/1.0");
    let e = err_of(buf.as_bytes());
    assert_eq!(e, HandshakeError::UnsupportedHttpVersion);
    assert_eq!(e.status(), 400);
}

#[test]
fn non_get_is_405_with_allow() {
    let buf = text(&variant("", &[])).replace("GET", "POST");
    let e = err_of(buf.as_bytes());
    assert_eq!(e, HandshakeError::MethodNotAllowed("POST".into()));
    assert_eq!(e.status(), 405);
    let resp = text(&e.response());
    assert!(
        resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{resp}"
    );
    assert!(resp.contains("\r\nAllow: GET\r\n"));
    assert!(resp.contains("\r\nConnection: close\r\n"));
}

#[test]
fn missing_or_duplicate_host_is_400() {
    let e = err_of(&variant("Host", &[]));
    assert_eq!(e, HandshakeError::MissingHost);
    assert_eq!(e.status(), 400);
    let e = err_of(&variant("", &["host: other"]));
    assert_eq!(e, HandshakeError::DuplicateHost);
    assert_eq!(e.status(), 400);
}

#[test]
fn upgrade_rules_426() {
    for add in [&[][..], &["Upgrade: h2c"][..], &["Upgrade: websocketx"][..]] {
        let e = err_of(&variant("Upgrade", add));
        assert_eq!(e, HandshakeError::NotWebSocketUpgrade);
        assert_eq!(e.status(), 426);
        let resp = text(&e.response());
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }
    ok_of(&variant("Upgrade", &["Upgrade: h2c, WebSocket"]));
    ok_of(&variant(
        "Upgrade",
        &["upgrade: foo", "UPGRADE:  WEBSOCKET "],
    ));
}

#[test]
fn connection_rules_400() {
    for add in [
        &[][..],
        &["Connection: keep-alive"][..],
        &["Connection: upgraded"][..],
    ] {
        let e = err_of(&variant("Connection", add));
        assert_eq!(e, HandshakeError::MissingConnectionUpgrade);
        assert_eq!(e.status(), 400);
    }
    ok_of(&variant("Connection", &["Connection: keep-alive, Upgrade"]));
    ok_of(&variant(
        "Connection",
        &["Connection: keep-alive", "connection: UPGRADE"],
    ));
}

#[test]
fn websocket_version_rules_426() {
    for add in [
        &[][..],
        &["Sec-WebSocket-Version: 12"][..],
        &["Sec-WebSocket-Version: 13, 8"][..],
        &["Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"][..],
    ] {
        let e = err_of(&variant("Sec-WebSocket-Version", add));
        assert_eq!(e, HandshakeError::UnsupportedWebSocketVersion);
        assert_eq!(e.status(), 426);
        let resp = text(&e.response());
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
    }
}

#[test]
fn key_rules_400() {
    let e = err_of(&variant("Sec-WebSocket-Key", &[]));
    assert_eq!(e, HandshakeError::MissingKey);
    assert_eq!(e.status(), 400);
    let e = err_of(&variant(
        "",
        &["Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA=="],
    ));
    assert_eq!(e, HandshakeError::DuplicateKey);
    assert_eq!(e.status(), 400);
    for bad in [
        "Sec-WebSocket-Key: ",
        "Sec-WebSocket-Key: abc",
        "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEBE=", // 17 bytes
        "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4P",     // 15 bytes
        "Sec-WebSocket-Key: !QIDBAUGBwgJCgsMDQ4PEA==", // not base64
    ] {
        let e = err_of(&variant("Sec-WebSocket-Key", &[bad]));
        assert_eq!(e, HandshakeError::InvalidKey, "{bad}");
        assert_eq!(e.status(), 400);
    }
}

#[test]
fn body_is_400() {
    for add in [
        "Content-Length: 5",
        "Content-Length: abc",
        "Transfer-Encoding: chunked",
    ] {
        let e = err_of(&variant("", &[add]));
        assert_eq!(e, HandshakeError::UnexpectedBody, "{add}");
        assert_eq!(e.status(), 400);
    }
    ok_of(&variant("", &["Content-Length: 0"]));
}

#[test]
fn error_response_is_complete_http() {
    let e = HandshakeError::MissingKey;
    let resp = text(&e.response());
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
    assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
    assert!(head.contains("\r\nContent-Type: text/plain; charset=utf-8"));
    assert!(head.ends_with("\r\nConnection: close"));
    assert!(body.contains("Sec-WebSocket-Key"));
}

#[test]
fn accept_response_exact_bytes() {
    let resp = accept_response(KEY, None, &[]).unwrap();
    assert_eq!(
        text(&resp),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    );
    let resp =
        accept_response(KEY, Some("chat"), &[("X-Served-By".into(), "wharf".into())]).unwrap();
    assert_eq!(
        text(&resp),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\
         X-Served-By: wharf\r\n\r\n"
    );
}

#[test]
fn accept_response_refuses_bad_headers() {
    assert!(matches!(
        accept_response(KEY, None, &[("Connection".into(), "close".into())]),
        Err(InvalidHeader::Reserved(_))
    ));
    assert!(matches!(
        accept_response(KEY, None, &[("X-A".into(), "a\r\nSet-Cookie: x".into())]),
        Err(InvalidHeader::InvalidValue(_))
    ));
    assert!(accept_response(KEY, Some("chat\r\nX: y"), &[]).is_err());
    assert!(accept_response(KEY, Some(""), &[]).is_err());
}

#[test]
fn reject_response_exact_bytes() {
    let resp = reject_response(403, &[("X-Reason".into(), "nope".into())], "forbidden\n").unwrap();
    assert_eq!(
        text(&resp),
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nX-Reason: nope\r\n\
         Content-Length: 10\r\nConnection: close\r\n\r\nforbidden\n"
    );
    let resp = reject_response(404, &[("content-type".into(), "text/html".into())], "").unwrap();
    let resp = text(&resp);
    assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\n"));
    assert!(!resp.contains("text/plain"));
    assert_eq!(
        reject_response(101, &[], ""),
        Err(InvalidHeader::InvalidStatus(101))
    );
    assert_eq!(
        reject_response(600, &[], ""),
        Err(InvalidHeader::InvalidStatus(600))
    );
    assert!(reject_response(400, &[("Content-Length".into(), "1".into())], "").is_err());
}

#[test]
fn validate_header_rules() {
    assert_eq!(validate_header("X-Ok", "fine\tvalue é"), Ok(()));
    assert_eq!(validate_header("Set-Cookie", "a=b; Path=/"), Ok(()));
    for name in ["", "Bad Name", "X:Y", "X\r\n", "Ümlaut", "(x)"] {
        assert!(
            matches!(
                validate_header(name, "v"),
                Err(InvalidHeader::InvalidName(_))
            ),
            "{name:?}"
        );
    }
    for value in ["a\rb", "a\nb", "a\0b", "a\x07b", "a\x7fb"] {
        assert!(
            matches!(
                validate_header("X", value),
                Err(InvalidHeader::InvalidValue(_))
            ),
            "{value:?}"
        );
    }
    for name in [
        "Upgrade",
        "connection",
        "SEC-WEBSOCKET-ACCEPT",
        "Sec-WebSocket-Protocol",
        "sec-websocket-anything",
        "Content-Length",
        "transfer-encoding",
    ] {
        assert!(
            matches!(validate_header(name, "v"), Err(InvalidHeader::Reserved(_))),
            "{name}"
        );
    }
}

#[test]
fn every_error_has_a_status_and_response() {
    let all = [
        HandshakeError::RequestTooLarge,
        HandshakeError::TooManyHeaders,
        HandshakeError::Malformed(httparse_error()),
        HandshakeError::UnsupportedHttpVersion,
        HandshakeError::MethodNotAllowed("PUT".into()),
        HandshakeError::MissingHost,
        HandshakeError::DuplicateHost,
        HandshakeError::NotWebSocketUpgrade,
        HandshakeError::MissingConnectionUpgrade,
        HandshakeError::UnsupportedWebSocketVersion,
        HandshakeError::MissingKey,
        HandshakeError::DuplicateKey,
        HandshakeError::InvalidKey,
        HandshakeError::UnexpectedBody,
    ];
    for e in all {
        let resp = text(&e.response());
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {} ", e.status())),
            "{resp}"
        );
        assert!(resp.ends_with(&format!("{e}\n")));
    }
}

fn httparse_error() -> httparse::Error {
    match err_of(b"\x00 / HTTP/1.1\r\n\r\n") {
        HandshakeError::Malformed(e) => e,
        other => panic!("{other:?}"),
    }
}

#[test]
fn plugin_chosen_headers_and_bodies_are_bounded() {
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let header = |i: usize| (format!("X-H{i}"), "v".repeat(1000));
    let fits: Vec<_> = (0..15).map(header).collect();
    assert!(wharf_protocol::accept_response(key, None, &fits).is_ok());
    let over: Vec<_> = (0..17).map(header).collect();
    assert!(matches!(
        wharf_protocol::accept_response(key, None, &over),
        Err(wharf_protocol::InvalidHeader::TooLarge {
            what: "headers",
            ..
        })
    ));
    assert!(matches!(
        wharf_protocol::reject_response(403, &over, "no"),
        Err(wharf_protocol::InvalidHeader::TooLarge {
            what: "headers",
            ..
        })
    ));
    assert!(wharf_protocol::reject_response(403, &[], &"b".repeat(64 * 1024)).is_ok());
    assert!(matches!(
        wharf_protocol::reject_response(403, &[], &"b".repeat(64 * 1024 + 1)),
        Err(wharf_protocol::InvalidHeader::TooLarge { what: "body", .. })
    ));
}
