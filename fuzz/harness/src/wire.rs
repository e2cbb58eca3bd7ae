//! Independent RFC 6455 wire helpers: building masked client frames, and
//! decoding and checking what the server emits.

/// Close codes a Close frame may carry on the wire (RFC 6455 section 7.4
/// and the IANA registry): 1000-1003, 1007-1014, 3000-4999.
pub fn sendable_code(code: u16) -> bool {
    (1000..=1003).contains(&code) || (1007..=1014).contains(&code) || (3000..=4999).contains(&code)
}

/// Appends a masked client frame (minimal length form unless `long16`).
pub fn client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// One frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (only defined ones get through [`decode_server`]).
    pub opcode: u8,
    /// Payload (never masked).
    pub payload: Vec<u8>,
}

/// Decodes server output, asserting each frame is valid: RSV bits clear,
/// defined opcode, no mask, minimal length encoding, 64-bit length MSB
/// clear, control frames final and at most 125 bytes, and no partial frame
/// at the end.
pub fn decode_server(mut bytes: &[u8]) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 2, "truncated server frame header {bytes:x?}");
        let (b0, b1) = (bytes[0], bytes[1]);
        assert_eq!(b0 & 0x70, 0, "server frame with RSV bits: {b0:#x}");
        let opcode = b0 & 0x0F;
        assert!(
            matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10),
            "server frame with reserved opcode {opcode:#x}"
        );
        assert_eq!(b1 & 0x80, 0, "masked server frame");
        let (len, hdr) = match b1 & 0x7F {
            126 => {
                assert!(bytes.len() >= 4, "truncated 16-bit length");
                let len = u64::from(u16::from_be_bytes([bytes[2], bytes[3]]));
                assert!(len >= 126, "non-minimal 16-bit length {len}");
                (len, 4)
            }
            127 => {
                assert!(bytes.len() >= 10, "truncated 64-bit length");
                let len = u64::from_be_bytes(bytes[2..10].try_into().unwrap());
                assert_eq!(len >> 63, 0, "64-bit length with MSB set");
                assert!(len > 0xFFFF, "non-minimal 64-bit length {len}");
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        let fin = b0 & 0x80 != 0;
        if opcode >= 8 {
            assert!(fin, "fragmented control frame");
            assert!(len <= 125, "control frame of {len} bytes");
        }
        let len = usize::try_from(len).unwrap();
        assert!(
            bytes.len() >= hdr + len,
            "server frame payload truncated: {} of {len}",
            bytes.len() - hdr
        );
        frames.push(ServerFrame {
            fin,
            opcode,
            payload: bytes[hdr..hdr + len].to_vec(),
        });
        bytes = &bytes[hdr + len..];
    }
    frames
}

/// What the server said, message by message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutMsg {
    /// A text message (reassembled).
    Text(String),
    /// A binary message (reassembled).
    Binary(Vec<u8>),
    /// A Ping and its payload.
    Ping(Vec<u8>),
    /// A Pong and its payload.
    Pong(Vec<u8>),
    /// A Close and its payload (already checked: empty, or a sendable code
    /// and a UTF-8 reason).
    Close(Vec<u8>),
}

/// Reassembles decoded server frames into messages, asserting the message
/// rules: continuations only inside a message, no new message inside one,
/// text is UTF-8, each data frame at most `fragment_size` when that is set,
/// Close payloads valid, and nothing
/// after a Close.
pub fn messages(frames: &[ServerFrame], fragment_size: Option<usize>) -> Vec<OutMsg> {
    let mut out = Vec::new();
    let mut open: Option<(u8, Vec<u8>)> = None;
    for f in frames {
        assert!(
            !matches!(out.last(), Some(OutMsg::Close(_))),
            "frame after the server's Close: {f:?}"
        );
        match f.opcode {
            8 => {
                match f.payload.as_slice() {
                    [] => {}
                    [_] => panic!("server Close with a 1-byte payload"),
                    [hi, lo, reason @ ..] => {
                        let code = u16::from_be_bytes([*hi, *lo]);
                        assert!(sendable_code(code), "server Close with code {code}");
                        assert!(
                            std::str::from_utf8(reason).is_ok(),
                            "server Close reason not UTF-8"
                        );
                    }
                }
                out.push(OutMsg::Close(f.payload.clone()));
            }
            9 => out.push(OutMsg::Ping(f.payload.clone())),
            10 => out.push(OutMsg::Pong(f.payload.clone())),
            op => {
                if let Some(size) = fragment_size {
                    assert!(
                        f.payload.len() <= size.max(1),
                        "fragment of {} bytes over fragment_size {size}",
                        f.payload.len()
                    );
                }
                let (kind, mut buf) = match (op, open.take()) {
                    (0, Some(open)) => open,
                    (0, None) => panic!("server continuation outside a message"),
                    (_, Some(_)) => panic!("server started a message inside another"),
                    (op, None) => (op, Vec::new()),
                };
                buf.extend_from_slice(&f.payload);
                if !f.fin {
                    open = Some((kind, buf));
                    continue;
                }
                out.push(if kind == 1 {
                    OutMsg::Text(String::from_utf8(buf).expect("server text not UTF-8"))
                } else {
                    OutMsg::Binary(buf)
                });
            }
        }
    }
    assert!(open.is_none(), "server message left unfinished");
    out
}

/// Everything the connection has queued, drained through `output_slices`
/// and `advance_output` in writes of at most `step` bytes.
pub fn drain(ws: &mut wharf_protocol::WebSocket, step: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while ws.has_output() {
        let mut slices = [std::io::IoSlice::new(&[]); 3];
        let n = ws.output_slices(&mut slices);
        assert!(n > 0, "output queued but no slice filled");
        let mut want = step.max(1);
        let before = got.len();
        for s in &slices[..n] {
            let take = s.len().min(want);
            got.extend_from_slice(&s[..take]);
            want -= take;
            if want == 0 {
                break;
            }
        }
        let wrote = got.len() - before;
        assert!(wrote > 0, "empty output slice");
        let len = ws.output_len();
        ws.advance_output(wrote);
        assert_eq!(ws.output_len(), len - wrote, "advance_output miscounted");
    }
    got
}
