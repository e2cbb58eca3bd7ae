//! Target `close`: Close frame parsing and the closing handshake.
//!
//! Input: a flags byte, then the Close payload the client sends (over 125
//! bytes it is sent with a 16-bit length, which the RFC forbids). Checked:
//!
//! * an open connection answers as RFC 6455 section 7 says: an empty
//!   payload is a clean 1005 echoed empty; one byte, a length over 125 or a
//!   code outside 1000-1003/1007-1014/3000-4999 fails with 1002; a reason
//!   that is not UTF-8 fails with 1007; otherwise the close is clean with
//!   the peer's code and reason and the code is echoed;
//! * when we closed first (`close` with a code and reason from the input),
//!   `close` accepts exactly the sendable codes and reasons up to 123
//!   bytes, the Close it queues carries them, and the peer's Close ends the
//!   connection without a second Close from us;
//! * reading the frame in one piece or a byte at a time is the same.

use std::time::Instant;

use wharf_protocol::{CloseInfo, Config, Event, SendError, WebSocket};

use crate::wire::{self, OutMsg};

/// The target's check.
pub fn check(data: &[u8]) {
    let Some((&flags, payload)) = data.split_first() else {
        return;
    };
    let mut frame = Vec::new();
    let mask = [flags, 0x5A, flags ^ 0xFF, 0x01];
    wire::client_frame(&mut frame, true, 8, payload, mask);
    if flags & 1 == 1 {
        // A Ping first: answered with a Pong before the Close.
        let mut ping = Vec::new();
        wire::client_frame(&mut ping, true, 9, b"p", mask);
        frame.splice(0..0, ping);
    }

    let expect = expected(payload);
    let whole = peer_closes(&frame, &[&frame]);
    let bytewise: Vec<&[u8]> = frame.chunks(1).collect();
    assert_eq!(whole, peer_closes(&frame, &bytewise));

    // Open connection: the peer closes.
    let (info, out) = whole;
    let mut want_out = Vec::new();
    if flags & 1 == 1 {
        want_out.push(OutMsg::Pong(b"p".to_vec()));
    }
    match &expect {
        Ok((code, reason)) => {
            assert_eq!(
                info,
                CloseInfo {
                    code: code.unwrap_or(1005),
                    reason: reason.clone(),
                    clean: true
                }
            );
            want_out.push(OutMsg::Close(
                code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec()),
            ));
            assert_eq!(out, want_out);
        }
        Err(code) => {
            assert_eq!((info.code, info.clean), (*code, false), "{payload:x?}");
            assert_eq!(out.len(), want_out.len() + 1);
            assert!(
                matches!(out.last(), Some(OutMsg::Close(p)) if p[..2] == code.to_be_bytes()),
                "{out:?}"
            );
        }
    }

    // We close first, with a code and reason from the input.
    let now = Instant::now();
    let mut ws = WebSocket::new(Config::default(), now);
    let code = u16::from_be_bytes([payload.first().copied().unwrap_or(0), flags]);
    let reason = String::from_utf8_lossy(payload.get(1..).unwrap_or_default());
    let sent = ws.close(code, &reason);
    let want = if !wire::sendable_code(code) {
        Err(SendError::InvalidCode)
    } else if reason.len() > 123 {
        Err(SendError::ReasonTooLong)
    } else {
        Ok(())
    };
    assert_eq!(sent, want, "close({code}, {} bytes)", reason.len());
    let mut ours = Vec::new();
    if sent.is_ok() {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        ours.push(OutMsg::Close(p));
        assert_eq!(ws.close(1000, ""), Err(SendError::Closed));
    }
    let mut input: &[u8] = &frame;
    let mut events = Vec::new();
    while let Some(ev) = ws.read(&mut input, now) {
        events.push(match ev {
            Event::Closed(info) => info,
            other => panic!("unexpected {other:?}"),
        });
    }
    let out = wire::messages(&wire::decode_server(&wire::drain(&mut ws, 50)), None);
    assert_eq!(events.len(), 1);
    assert!(ws.is_closed());
    if sent.is_ok() {
        // Nothing after our Close: no Pong, no second Close.
        assert_eq!(out, ours);
        match &expect {
            Ok((code, reason)) => assert_eq!(
                events[0],
                CloseInfo {
                    code: code.unwrap_or(1005),
                    reason: reason.clone(),
                    clean: true
                }
            ),
            Err(code) => assert_eq!((events[0].code, events[0].clean), (*code, false)),
        }
    }
}

/// What RFC 6455 says of this Close payload: `Ok((code, reason))` for a
/// clean close, `Err(code)` for the code the connection fails with.
fn expected(payload: &[u8]) -> Result<(Option<u16>, String), u16> {
    if payload.len() > 125 {
        return Err(1002);
    }
    match payload {
        [] => Ok((None, String::new())),
        [_] => Err(1002),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !wire::sendable_code(code) {
                return Err(1002);
            }
            match std::str::from_utf8(reason) {
                Ok(r) => Ok((Some(code), r.to_owned())),
                Err(_) => Err(1007),
            }
        }
    }
}

/// An open connection reads `pieces` (which concatenate to `frame`).
fn peer_closes(frame: &[u8], pieces: &[&[u8]]) -> (CloseInfo, Vec<OutMsg>) {
    assert_eq!(pieces.concat(), frame);
    let now = Instant::now();
    let mut ws = WebSocket::new(Config::default(), now);
    let mut info = None;
    for piece in pieces {
        let mut input: &[u8] = piece;
        while let Some(ev) = ws.read(&mut input, now) {
            assert!(info.is_none(), "second event");
            info = Some(match ev {
                Event::Closed(info) => info,
                other => panic!("unexpected {other:?}"),
            });
        }
    }
    assert!(ws.is_closed());
    assert_eq!(ws.transport_closed(), None);
    let out = wire::messages(&wire::decode_server(&wire::drain(&mut ws, 7)), None);
    (info.expect("a Close frame ends the connection"), out)
}
