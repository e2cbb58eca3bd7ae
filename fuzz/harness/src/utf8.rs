//! Target `utf8`: the incremental UTF-8 validator against
//! `std::str::from_utf8`.
//!
//! Input: a byte `k`, `k % 8` chunk lengths, then the bytes to validate.
//! Checked, for the pieces given and for one byte at a time:
//!
//! * the validator, fed piece by piece, refuses a piece exactly when the
//!   bytes so far stop being a prefix of valid UTF-8 (fail-fast, never
//!   early), and `finish` accepts exactly when std accepts the whole;
//! * a connection fed a text message fragmented at the same points (and
//!   read in other pieces) delivers exactly the bytes when std accepts
//!   them, and otherwise fails with 1007 and sends a Close with 1007.

use std::time::Instant;

use wharf_protocol::fuzzing::Utf8Validator;
use wharf_protocol::{Config, Event, WebSocket};

use crate::wire;

/// The target's check.
pub fn check(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let (lens, text) = rest.split_at(k);
    let pieces = crate::chunks(text, lens);
    let expect = std::str::from_utf8(text).is_ok();

    validator(text, &pieces, expect);
    let bytewise: Vec<&[u8]> = text.chunks(1).collect();
    validator(text, &bytewise, expect);

    // The same through a connection: one frame per piece.
    let mut frames = Vec::new();
    let mask = [0x37, 0xFA, 0x21, 0x3D];
    if pieces.is_empty() {
        wire::client_frame(&mut frames, true, 1, &[], mask);
    }
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { 1 } else { 0 };
        wire::client_frame(&mut frames, i + 1 == pieces.len(), op, piece, mask);
    }
    let reads = [
        vec![&frames[..]],
        crate::chunks(&frames, &[3, 1, 7]),
        crate::chunks(&frames, lens),
    ];
    for read in reads {
        connection(text, &read, expect);
    }
}

fn validator(text: &[u8], pieces: &[&[u8]], expect: bool) {
    let mut v = Utf8Validator::default();
    let mut seen = 0;
    for piece in pieces {
        seen += piece.len();
        let prefix_ok = match std::str::from_utf8(&text[..seen]) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        };
        let fed = v.feed(piece).is_ok();
        assert_eq!(fed, prefix_ok, "feed after {seen} bytes of {text:x?}");
        if !fed {
            assert!(!expect);
            return;
        }
    }
    assert_eq!(v.finish().is_ok(), expect, "finish of {text:x?}");
    // Reusable after finish (and reset) for the next message.
    v.reset();
    assert!(v.feed(b"ok").is_ok() && v.finish().is_ok());
}

fn connection(text: &[u8], reads: &[&[u8]], expect: bool) {
    let now = Instant::now();
    let mut ws = WebSocket::new(Config::default(), now);
    let mut got = None;
    for read in reads {
        let mut input: &[u8] = read;
        while let Some(ev) = ws.read(&mut input, now) {
            assert!(got.is_none(), "second event: {ev:?}");
            got = Some(match ev {
                Event::Text(t) => Ok(t.as_bytes().to_vec()),
                Event::Binary(_) | Event::MaskedBinary(_) => panic!("text arrived as binary"),
                Event::Closed(info) => Err(info),
            });
        }
    }
    let out = wire::messages(&wire::decode_server(&wire::drain(&mut ws, 4096)), None);
    match got {
        Some(Ok(bytes)) => {
            assert!(expect, "invalid UTF-8 delivered as text: {text:x?}");
            assert_eq!(bytes, text);
            assert!(out.is_empty());
        }
        Some(Err(info)) => {
            assert!(!expect, "valid UTF-8 refused: {text:x?}");
            assert_eq!((info.code, info.clean), (1007, false));
            assert_eq!(out.len(), 1);
            assert!(matches!(&out[0], wire::OutMsg::Close(p) if p[..2] == [0x03, 0xEF]));
        }
        None => panic!("complete message neither delivered nor refused"),
    }
}
