//! WebSocket state machine behaviour, driven by bytes and instants only.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use wharf_protocol::{CloseInfo, Config, Event, FrameBatch, SendError, State, WebSocket};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: `b0` is FIN/RSV/opcode, payload masked with `MASK`.
fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![b0];
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
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// A server (unmasked) frame as we expect to see it in the output.
fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![b0];
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

fn server_close(code: u16, reason: &str) -> Vec<u8> {
    server_frame(0x88, &close_payload(code, reason))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Closed(CloseInfo),
}

fn owned(e: Event<'_>) -> Ev {
    match e {
        Event::Text(t) => Ev::Text(t.to_owned()),
        Event::Binary(b) => Ev::Binary(b.to_vec()),
        Event::MaskedBinary(m) => Ev::Binary(m.unmask().to_vec()),
        Event::Closed(c) => Ev::Closed(c),
    }
}

fn feed_at(ws: &mut WebSocket, mut bytes: &[u8], now: Instant) -> Vec<Ev> {
    let mut evs = Vec::new();
    loop {
        match ws.read(&mut bytes, now) {
            Some(e) => evs.push(owned(e)),
            None if bytes.is_empty() => return evs,
            None => panic!("read returned None with input left"),
        }
    }
}

fn feed(ws: &mut WebSocket, bytes: &[u8]) -> Vec<Ev> {
    let now = Instant::now();
    feed_at(ws, bytes, now)
}

fn take_output(ws: &mut WebSocket) -> Vec<u8> {
    let mut all = Vec::new();
    while ws.has_output() {
        let mut slots = [IoSlice::new(&[]); 4];
        let n = ws.output_slices(&mut slots);
        let chunk: Vec<u8> = slots[..n].iter().flat_map(|s| s.iter().copied()).collect();
        let len = chunk.len();
        all.extend_from_slice(&chunk);
        ws.advance_output(len);
    }
    assert_eq!(ws.output_len(), 0);
    all
}

fn ws() -> WebSocket {
    WebSocket::new(Config::default(), Instant::now())
}

fn closed(code: u16, reason: &str, clean: bool) -> Ev {
    Ev::Closed(CloseInfo {
        code,
        reason: reason.to_owned(),
        clean,
    })
}

/// Feeds `bytes`, expects a failure with `code`, and checks the Close
/// frame queued for the peer carries that code and reason.
fn expect_fail(ws: &mut WebSocket, bytes: &[u8], code: u16) {
    let evs = feed(ws, bytes);
    let Some(Ev::Closed(info)) = evs.last() else {
        panic!("expected Closed, got {evs:?} for {bytes:x?}");
    };
    assert_eq!(info.code, code, "{info:?} for {bytes:x?}");
    assert!(!info.clean);
    assert!(!info.reason.is_empty());
    assert_eq!(take_output(ws), server_close(code, &info.reason));
    assert_eq!(ws.state(), State::Closed);
    // Later input is ignored and nothing more is sent.
    assert_eq!(feed(ws, &frame(0x81, b"ignored")), vec![]);
    assert!(!ws.has_output());
    assert_eq!(ws.transport_closed(), None);
}

fn fail_case(bytes: &[u8], code: u16) {
    expect_fail(&mut ws(), bytes, code);
}

#[test]
fn text_and_binary_messages() {
    let mut ws = ws();
    let mut input = frame(0x81, "héllo".as_bytes());
    input.extend(frame(0x82, &[0, 1, 2, 255]));
    input.extend(frame(0x81, b""));
    assert_eq!(
        feed(&mut ws, &input),
        vec![
            Ev::Text("héllo".into()),
            Ev::Binary(vec![0, 1, 2, 255]),
            Ev::Text(String::new())
        ]
    );
    assert!(!ws.has_output());
}

#[test]
fn medium_and_large_lengths() {
    let mut ws = ws();
    let medium: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    let large: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    let mut input = frame(0x82, &medium);
    input.extend(frame(0x82, &large));
    assert_eq!(
        feed(&mut ws, &input),
        vec![Ev::Binary(medium), Ev::Binary(large)]
    );
}

#[test]
fn non_minimal_length_encoding_is_accepted() {
    let mut ws = ws();
    let mut input = vec![0x82, 0x80 | 126, 0, 3];
    input.extend_from_slice(&MASK);
    input.extend([1 ^ MASK[0], 2 ^ MASK[1], 3 ^ MASK[2]]);
    input.extend([0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0, 1]);
    input.extend_from_slice(&MASK);
    input.push(9 ^ MASK[0]);
    assert_eq!(
        feed(&mut ws, &input),
        vec![Ev::Binary(vec![1, 2, 3]), Ev::Binary(vec![9])]
    );
}

/// A stream that exercises fragmentation, interleaved control frames,
/// multi-byte UTF-8 split across fragments, and all length forms.
fn rich_stream() -> (Vec<u8>, Vec<Ev>, Vec<u8>) {
    let text = "Grüße, 世界! 🎉";
    let bytes = text.as_bytes();
    let mut input = Vec::new();
    // Fragment inside the 4-byte emoji and inside a 3-byte CJK char.
    let cut1 = text.find('世').unwrap() + 1;
    let cut2 = text.find('🎉').unwrap() + 2;
    input.extend(frame(0x01, &bytes[..cut1]));
    input.extend(frame(0x89, b"ping!"));
    input.extend(frame(0x00, &bytes[cut1..cut2]));
    input.extend(frame(0x8A, b"pong"));
    input.extend(frame(0x80, &bytes[cut2..]));
    let bin: Vec<u8> = (0..200u32).map(|i| (i * 13) as u8).collect();
    input.extend(frame(0x82, &bin));
    input.extend(frame(0x88, &close_payload(1000, "bye")));
    let events = vec![
        Ev::Text(text.to_owned()),
        Ev::Binary(bin),
        closed(1000, "bye", true),
    ];
    let mut output = server_frame(0x8A, b"ping!");
    output.extend(server_frame(0x88, &1000u16.to_be_bytes()));
    (input, events, output)
}

#[test]
fn rich_stream_whole() {
    let (input, events, output) = rich_stream();
    let mut ws = ws();
    assert_eq!(feed(&mut ws, &input), events);
    assert_eq!(take_output(&mut ws), output);
}

#[test]
fn split_at_every_byte_one_at_a_time() {
    let (input, events, output) = rich_stream();
    let mut ws = ws();
    let mut evs = Vec::new();
    for b in &input {
        evs.extend(feed(&mut ws, std::slice::from_ref(b)));
    }
    assert_eq!(evs, events);
    assert_eq!(take_output(&mut ws), output);
}

#[test]
fn split_at_every_two_chunk_boundary() {
    let (input, events, output) = rich_stream();
    for cut in 0..=input.len() {
        let mut ws = ws();
        let mut evs = feed(&mut ws, &input[..cut]);
        evs.extend(feed(&mut ws, &input[cut..]));
        assert_eq!(evs, events, "cut at {cut}");
        assert_eq!(take_output(&mut ws), output, "cut at {cut}");
    }
}

/// Messages held and released at the end of each input, as the
/// connection driver batches them, come out the same at every split, and
/// a Close after them does not lose them.
#[test]
fn held_messages_are_the_messages_at_every_split() {
    let (input, events, output) = rich_stream();
    let now = Instant::now();
    let want: Vec<u8> = events
        .iter()
        .flat_map(|e| match e {
            Ev::Text(t) => t.as_bytes().to_vec(),
            Ev::Binary(b) => b.clone(),
            Ev::Closed(_) => Vec::new(),
        })
        .collect();
    for cut in 0..=input.len() {
        let mut ws = ws();
        let mut got = Vec::new();
        let mut close = None;
        for mut part in [&input[..cut], &input[cut..]] {
            while let Some(event) = ws.read(&mut part, now) {
                match event {
                    Event::Closed(info) => close = Some(info),
                    _ => ws.hold_message(),
                }
            }
            got.extend_from_slice(ws.held());
            ws.release_held();
        }
        assert_eq!(got, want, "cut at {cut}");
        assert_eq!(
            close.map(Ev::Closed).as_ref(),
            events.last(),
            "cut at {cut}"
        );
        assert_eq!(take_output(&mut ws), output, "cut at {cut}");
    }
}

#[test]
fn unmasked_frame_is_1002_after_two_bytes() {
    // Only the first two bytes: fail without waiting for the rest.
    fail_case(&[0x81, 0x05], 1002);
}

#[test]
fn reserved_bits_are_1002() {
    for rsv in [0x40, 0x20, 0x10] {
        fail_case(&frame(0x81 | rsv, b"x"), 1002);
    }
}

#[test]
fn reserved_opcodes_are_1002() {
    for op in (3..=7).chain(0xB..=0xF) {
        fail_case(&frame(0x80 | op, b""), 1002);
    }
}

#[test]
fn control_frame_too_long_is_1002() {
    for op in [0x88, 0x89, 0x8A] {
        // Announced 126 (16-bit form): rejected from the first two bytes.
        fail_case(&frame(op, &[0u8; 126])[..2], 1002);
    }
}

#[test]
fn fragmented_control_frame_is_1002() {
    for op in [0x08, 0x09, 0x0A] {
        fail_case(&frame(op, b""), 1002);
    }
}

#[test]
fn continuation_without_message_is_1002() {
    fail_case(&frame(0x80, b"x"), 1002);
    fail_case(&frame(0x00, b"x"), 1002);
    // Also after a complete message.
    let mut input = frame(0x81, b"done");
    input.extend(frame(0x80, b"x"));
    let mut ws = ws();
    let evs = feed(&mut ws, &input);
    assert_eq!(evs[0], Ev::Text("done".into()));
    assert!(matches!(&evs[1], Ev::Closed(c) if c.code == 1002));
}

#[test]
fn new_message_during_fragmented_is_1002() {
    let mut ws = ws();
    assert_eq!(feed(&mut ws, &frame(0x01, b"part")), vec![]);
    expect_fail(&mut ws, &frame(0x81, b"new"), 1002);
    let mut ws2 = WebSocket::new(Config::default(), Instant::now());
    assert_eq!(feed(&mut ws2, &frame(0x02, b"part")), vec![]);
    expect_fail(&mut ws2, &frame(0x02, b"new"), 1002);
}

#[test]
fn close_payload_one_byte_is_1002() {
    fail_case(&frame(0x88, &[0x03]), 1002);
}

#[test]
fn invalid_close_codes_are_1002() {
    for code in [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        fail_case(&frame(0x88, &close_payload(code, "")), 1002);
    }
}

#[test]
fn valid_close_codes_are_echoed() {
    for code in [1000, 1001, 1002, 1003, 1007, 1010, 1011, 1014, 3000, 4999] {
        let mut ws = ws();
        assert_eq!(
            feed(&mut ws, &frame(0x88, &close_payload(code, "r"))),
            vec![closed(code, "r", true)]
        );
        assert_eq!(take_output(&mut ws), server_close(code, ""));
        assert_eq!(ws.state(), State::Closed);
    }
}

#[test]
fn length_msb_set_is_1002() {
    let mut input = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
    input.extend_from_slice(&MASK);
    fail_case(&input, 1002);
}

#[test]
fn oversized_frame_is_1009_from_header_alone() {
    let config = Config {
        max_frame_size: 100,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    let full = frame(0x82, &[0u8; 101]);
    // Header only (2 + 2 + 4 bytes): no payload byte has arrived.
    expect_fail(&mut ws, &full[..8], 1009);
    // Exactly the limit is fine.
    let config = Config {
        max_frame_size: 100,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    assert_eq!(
        feed(&mut ws, &frame(0x82, &[0u8; 100])),
        vec![Ev::Binary(vec![0; 100])]
    );
}

#[test]
fn oversized_fragmented_message_is_1009_from_header() {
    let config = Config {
        max_message_size: 100,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    assert_eq!(feed(&mut ws, &frame(0x02, &[1u8; 60])), vec![]);
    let second = frame(0x80, &[2u8; 41]);
    expect_fail(&mut ws, &second[..6], 1009);
    // A message of exactly the limit passes.
    let config = Config {
        max_message_size: 100,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    let mut input = frame(0x02, &[1u8; 60]);
    input.extend(frame(0x80, &[2u8; 40]));
    assert_eq!(feed(&mut ws, &input).len(), 1);
}

#[test]
fn huge_announced_length_does_not_allocate() {
    // 2^62 bytes announced: must fail on the header, not try to buffer.
    let mut input = vec![0x82, 0x80 | 127, 0x40, 0, 0, 0, 0, 0, 0, 0];
    input.extend_from_slice(&MASK);
    fail_case(&input, 1009);
}

#[test]
fn invalid_utf8_fails_fast_in_incomplete_frame() {
    let mut ws = ws();
    // A 100-byte text frame whose 3rd byte is invalid; feed only 5 bytes
    // of payload.
    let mut payload = b"ab\xFFcd".to_vec();
    payload.resize(100, b'x');
    let full = frame(0x81, &payload);
    expect_fail(&mut ws, &full[..6 + 5], 1007);
}

#[test]
fn invalid_utf8_sequences_are_1007() {
    for bad in [
        &b"\xC0\x80"[..],
        b"\xED\xA0\x80",
        b"\xF4\x90\x80\x80",
        b"\xF8",
        b"ok\x80",
    ] {
        fail_case(&frame(0x81, bad), 1007);
    }
}

#[test]
fn utf8_code_point_split_across_fragments_and_chunks() {
    let euro = "€".as_bytes(); // E2 82 AC
    let mut input = frame(0x01, &euro[..1]);
    input.extend(frame(0x00, &euro[1..2]));
    input.extend(frame(0x89, b"")); // control frame in the middle
    input.extend(frame(0x80, &euro[2..]));
    for cut in 0..=input.len() {
        let mut ws = ws();
        let mut evs = feed(&mut ws, &input[..cut]);
        evs.extend(feed(&mut ws, &input[cut..]));
        assert_eq!(evs, vec![Ev::Text("€".into())]);
    }
}

#[test]
fn invalid_continuation_across_fragments_fails_at_that_fragment() {
    let mut ws = ws();
    assert_eq!(feed(&mut ws, &frame(0x01, b"\xE2")), vec![]);
    // 'A' can't continue a 3-byte sequence; fails in this non-final frame.
    expect_fail(&mut ws, &frame(0x00, b"A"), 1007);
}

#[test]
fn message_ending_mid_code_point_is_1007() {
    fail_case(&frame(0x81, b"abc\xE2\x82"), 1007);
    let mut ws = ws();
    assert_eq!(feed(&mut ws, &frame(0x01, b"\xF0\x9F")), vec![]);
    expect_fail(&mut ws, &frame(0x80, b"\x98"), 1007);
}

#[test]
fn binary_is_not_utf8_checked() {
    let mut ws = ws();
    assert_eq!(
        feed(&mut ws, &frame(0x82, b"\xFF\xFE")),
        vec![Ev::Binary(vec![0xFF, 0xFE])]
    );
}

#[test]
fn invalid_close_reason_is_1007() {
    let mut p = close_payload(1000, "");
    p.extend_from_slice(b"\xFF");
    fail_case(&frame(0x88, &p), 1007);
}

#[test]
fn ping_gets_pong_pong_gets_nothing() {
    let mut ws = ws();
    assert_eq!(feed(&mut ws, &frame(0x89, b"hello")), vec![]);
    assert_eq!(take_output(&mut ws), server_frame(0x8A, b"hello"));
    assert_eq!(feed(&mut ws, &frame(0x8A, b"x")), vec![]);
    assert!(!ws.has_output());
    let max = [7u8; 125];
    assert_eq!(feed(&mut ws, &frame(0x89, &max)), vec![]);
    assert_eq!(take_output(&mut ws), server_frame(0x8A, &max));
}

#[test]
fn pongs_do_not_grow_a_full_queue() {
    let config = Config {
        send_queue_bytes: 64,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    let mut input = Vec::new();
    for _ in 0..1000 {
        input.extend(frame(0x89, &[1u8; 30]));
    }
    assert_eq!(feed(&mut ws, &input), vec![]);
    assert!(ws.output_len() < 64 + 32, "{}", ws.output_len());
}

#[test]
fn close_without_code_echoes_empty_close() {
    let mut ws = ws();
    assert_eq!(
        feed(&mut ws, &frame(0x88, b"")),
        vec![closed(1005, "", true)]
    );
    assert_eq!(take_output(&mut ws), vec![0x88, 0x00]);
    assert!(ws.is_closed());
    assert_eq!(ws.send_text("x"), Err(SendError::Closed));
    assert_eq!(ws.transport_closed(), None);
}

#[test]
fn closing_handshake_initiated_by_us() {
    let t0 = Instant::now();
    let mut ws = WebSocket::new(Config::default(), t0);
    ws.close(1000, "done").unwrap();
    assert_eq!(ws.state(), State::Closing);
    assert_eq!(take_output(&mut ws), server_close(1000, "done"));
    assert_eq!(ws.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    assert_eq!(ws.send_text("late"), Err(SendError::Closed));
    assert_eq!(ws.send_ping(b""), Err(SendError::Closed));
    assert_eq!(ws.close(1000, ""), Err(SendError::Closed));
    // Data keeps being delivered; pings are not answered after our Close.
    assert_eq!(
        feed_at(&mut ws, &frame(0x81, b"still here"), t0),
        vec![Ev::Text("still here".into())]
    );
    assert_eq!(feed_at(&mut ws, &frame(0x89, b"p"), t0), vec![]);
    assert!(!ws.has_output());
    assert_eq!(
        feed_at(&mut ws, &frame(0x88, &close_payload(1000, "ok")), t0),
        vec![closed(1000, "ok", true)]
    );
    assert!(!ws.has_output());
    assert!(ws.is_closed());
    assert_eq!(ws.poll_timeout(), None);
    assert_eq!(ws.handle_timeout(t0 + Duration::from_secs(60)), None);
}

#[test]
fn protocol_error_while_closing_sends_no_second_close() {
    let mut ws = ws();
    ws.close(1001, "").unwrap();
    take_output(&mut ws);
    let evs = feed(&mut ws, &[0x81, 0x00]); // unmasked
    assert!(matches!(&evs[..], [Ev::Closed(c)] if c.code == 1002 && !c.clean));
    assert!(!ws.has_output());
}

#[test]
fn close_timeout_is_1006() {
    let t0 = Instant::now();
    let mut ws = WebSocket::new(Config::default(), t0);
    ws.close(4000, "bye").unwrap();
    let deadline = ws.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + Duration::from_secs(5));
    assert_eq!(ws.handle_timeout(deadline - Duration::from_millis(1)), None);
    let info = ws.handle_timeout(deadline).unwrap();
    assert_eq!((info.code, info.clean), (1006, false));
    assert!(ws.is_closed());
    assert_eq!(ws.transport_closed(), None);
    assert_eq!(ws.handle_timeout(deadline), None);
}

#[test]
fn idle_timeout_starts_1001_close() {
    let t0 = Instant::now();
    let config = Config {
        ping_interval: None,
        idle_timeout: Some(Duration::from_secs(10)),
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, t0);
    assert_eq!(ws.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    // Receiving data pushes the deadline back.
    let t1 = t0 + Duration::from_secs(8);
    feed_at(&mut ws, &frame(0x8A, b""), t1);
    assert_eq!(ws.poll_timeout(), Some(t1 + Duration::from_secs(10)));
    assert_eq!(ws.handle_timeout(t0 + Duration::from_secs(10)), None);
    assert!(!ws.has_output());
    let t2 = t1 + Duration::from_secs(10);
    assert_eq!(ws.handle_timeout(t2), None);
    assert_eq!(ws.state(), State::Closing);
    assert_eq!(take_output(&mut ws), server_close(1001, "idle timeout"));
    assert_eq!(ws.poll_timeout(), Some(t2 + Duration::from_secs(5)));
}

#[test]
fn ping_interval_sends_one_ping_until_data_arrives() {
    let t0 = Instant::now();
    let config = Config {
        ping_interval: Some(Duration::from_secs(30)),
        idle_timeout: Some(Duration::from_secs(120)),
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, t0);
    let due = t0 + Duration::from_secs(30);
    assert_eq!(ws.poll_timeout(), Some(due));
    assert_eq!(ws.handle_timeout(due - Duration::from_secs(1)), None);
    assert!(!ws.has_output());
    assert_eq!(ws.handle_timeout(due), None);
    assert_eq!(take_output(&mut ws), vec![0x89, 0x00]);
    // Outstanding: next timer is the idle deadline, no second ping.
    assert_eq!(ws.poll_timeout(), Some(t0 + Duration::from_secs(120)));
    assert_eq!(ws.handle_timeout(due + Duration::from_secs(40)), None);
    assert!(!ws.has_output());
    // Any data answers it and restarts the interval.
    let t1 = due + Duration::from_secs(41);
    feed_at(&mut ws, &frame(0x8A, b""), t1);
    assert_eq!(ws.poll_timeout(), Some(t1 + Duration::from_secs(30)));
}

#[test]
fn no_timers_when_disabled() {
    let config = Config {
        ping_interval: None,
        idle_timeout: None,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    assert_eq!(ws.poll_timeout(), None);
    assert_eq!(
        ws.handle_timeout(Instant::now() + Duration::from_secs(1000)),
        None
    );
    assert!(!ws.has_output());
}

#[test]
fn absurd_durations_do_not_panic() {
    let config = Config {
        ping_interval: Some(Duration::MAX),
        idle_timeout: Some(Duration::MAX),
        close_timeout: Duration::MAX,
        ..Config::default()
    };
    let t0 = Instant::now();
    let mut ws = WebSocket::new(config, t0);
    assert!(ws.poll_timeout().unwrap() > t0);
    assert_eq!(ws.handle_timeout(t0 + Duration::from_secs(1)), None);
    ws.close(1000, "").unwrap();
    assert!(ws.poll_timeout().unwrap() > t0);
}

#[test]
fn transport_closed_reports_1006_once() {
    let mut ws = ws();
    let info = ws.transport_closed().unwrap();
    assert_eq!((info.code, info.clean), (1006, false));
    assert!(ws.is_closed());
    assert_eq!(ws.transport_closed(), None);
    assert_eq!(feed(&mut ws, &frame(0x81, b"x")), vec![]);
}

#[test]
fn send_errors() {
    let config = Config {
        max_message_size: 10,
        send_queue_bytes: 20,
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    assert_eq!(ws.send_text("01234567890"), Err(SendError::MessageTooBig));
    assert_eq!(ws.send_binary(&[0; 11]), Err(SendError::MessageTooBig));
    assert_eq!(ws.send_ping(&[0; 126]), Err(SendError::MessageTooBig));
    assert!(!ws.has_output());
    ws.send_binary(&[0; 10]).unwrap(); // 12 bytes queued
    ws.send_text("0123456789").unwrap(); // 24: over the mark now
    assert_eq!(ws.send_text("x"), Err(SendError::QueueFull));
    assert_eq!(ws.send_ping(b""), Err(SendError::QueueFull));
    ws.advance_output(5);
    assert_eq!(ws.send_text("x"), Ok(()));
    for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 2999, 5000] {
        assert_eq!(ws.close(code, ""), Err(SendError::InvalidCode), "{code}");
    }
    assert_eq!(
        ws.close(1000, &"r".repeat(124)),
        Err(SendError::ReasonTooLong)
    );
    take_output(&mut ws);
    ws.close(1000, &"r".repeat(123)).unwrap();
    assert_eq!(take_output(&mut ws), server_close(1000, &"r".repeat(123)));
    assert_eq!(ws.send_binary(b""), Err(SendError::Closed));
}

#[test]
fn outgoing_frames_exact_bytes() {
    let mut ws = ws();
    ws.send_text("hi").unwrap();
    ws.send_binary(&[1, 2]).unwrap();
    ws.send_ping(b"p").unwrap();
    ws.send_text("").unwrap();
    let mut expect = server_frame(0x81, b"hi");
    expect.extend(server_frame(0x82, &[1, 2]));
    expect.extend(server_frame(0x89, b"p"));
    expect.extend(server_frame(0x81, b""));
    assert_eq!(take_output(&mut ws), expect);
    let medium = vec![3u8; 1000];
    let big = vec![4u8; 70_000];
    ws.send_binary(&medium).unwrap();
    ws.send_binary(&big).unwrap();
    let mut expect = server_frame(0x82, &medium);
    expect.extend(server_frame(0x82, &big));
    assert_eq!(take_output(&mut ws), expect);
}

#[test]
fn outgoing_fragmentation() {
    let config = Config {
        fragment_size: Some(4),
        ..Config::default()
    };
    let mut ws = WebSocket::new(config, Instant::now());
    ws.send_text("hello world").unwrap();
    ws.send_binary(&[1, 2, 3, 4]).unwrap(); // fits: one frame
    let mut expect = server_frame(0x01, b"hell");
    expect.extend(server_frame(0x00, b"o wo"));
    expect.extend(server_frame(0x80, b"rld"));
    expect.extend(server_frame(0x82, &[1, 2, 3, 4]));
    assert_eq!(take_output(&mut ws), expect);
}

#[test]
fn output_partial_writes() {
    let mut ws = ws();
    ws.send_text("first").unwrap();
    let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    ws.send_binary(&big).unwrap();
    ws.send_text("last").unwrap();
    let mut expect = server_frame(0x81, b"first");
    expect.extend(server_frame(0x82, &big));
    expect.extend(server_frame(0x81, b"last"));
    assert_eq!(ws.output_len(), expect.len());
    // Big payload gets its own slice.
    let mut slots = [IoSlice::new(&[]); 8];
    assert_eq!(ws.output_slices(&mut slots), 3);
    let mut got = Vec::new();
    let mut step = 1;
    while ws.has_output() {
        let mut slots = [IoSlice::new(&[]); 2];
        let n = ws.output_slices(&mut slots);
        let avail: Vec<u8> = slots[..n].iter().flat_map(|s| s.iter().copied()).collect();
        let w = step.min(avail.len());
        got.extend_from_slice(&avail[..w]);
        ws.advance_output(w);
        step = step * 3 + 1;
    }
    assert_eq!(got, expect);
    ws.advance_output(100); // nothing queued: no panic
}

#[test]
fn message_buffer_is_reused_between_messages() {
    let mut ws = ws();
    let mut input = frame(0x81, b"one");
    input.extend(frame(0x81, b"two"));
    let mut bytes = &input[..];
    let now = Instant::now();
    assert_eq!(ws.read(&mut bytes, now), Some(Event::Text("one")));
    assert_eq!(ws.read(&mut bytes, now), Some(Event::Text("two")));
    assert_eq!(ws.read(&mut bytes, now), None);
    assert!(bytes.is_empty());
}

/// xorshift64*: deterministic, dependency-free randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn fuzz_random_streams_never_panic_and_stay_bounded() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let config = Config {
        max_frame_size: 300,
        max_message_size: 1000,
        send_queue_bytes: 2000,
        ..Config::default()
    };
    let t0 = Instant::now();
    for iter in 0..3000 {
        let mut input = Vec::new();
        // Mostly well-formed frames with random corruption, sometimes pure noise.
        let frames = rng.below(8);
        for _ in 0..frames {
            let op = [0x0, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3][rng.below(7) as usize];
            let fin = if rng.below(3) == 0 { 0 } else { 0x80 };
            let cap = if rng.below(4) == 0 { 400 } else { 20 };
            let len = rng.below(cap) as usize;
            let payload: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.below(2) == 0 {
                        b'a' + rng.below(26) as u8
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            let mut f = frame(fin | op, &payload);
            if rng.below(10) == 0 && !f.is_empty() {
                let i = rng.below(f.len() as u64) as usize;
                f[i] = rng.next() as u8;
            }
            input.extend(f);
        }
        if iter % 5 == 0 {
            input.extend((0..rng.below(200)).map(|_| rng.next() as u8));
        }
        let mut ws = WebSocket::new(config.clone(), t0);
        let mut rest = &input[..];
        let mut closes = 0;
        let mut t = t0;
        while !rest.is_empty() {
            let n = (rng.below(40) as usize + 1).min(rest.len());
            let mut chunk = &rest[..n];
            rest = &rest[n..];
            t += Duration::from_millis(rng.below(2000));
            while let Some(ev) = ws.read(&mut chunk, t) {
                match ev {
                    Event::Text(s) => assert!(s.len() <= 1000),
                    Event::Binary(b) => assert!(b.len() <= 1000),
                    Event::MaskedBinary(m) => assert!(m.len() <= 1000),
                    Event::Closed(_) => closes += 1,
                }
            }
            assert!(chunk.is_empty());
            assert!(ws.output_len() <= 2000 + 200, "{}", ws.output_len());
            if rng.below(3) == 0 {
                let _ = ws.send_text("reply");
            }
            if rng.below(4) == 0 {
                let n = rng.below(ws.output_len() as u64 + 1) as usize;
                ws.advance_output(n);
            }
            if rng.below(5) == 0 && ws.handle_timeout(t).is_some() {
                closes += 1;
            }
        }
        if ws.transport_closed().is_some() {
            closes += 1;
        }
        assert_eq!(closes, 1, "exactly one close report (iter {iter})");
        assert!(ws.is_closed());
    }
}

#[test]
fn replies_to_messages_read_before_a_close_go_ahead_of_it() {
    let batch_of = |text: &str| {
        let mut batch = FrameBatch::new(None);
        batch.push_text(text);
        batch
    };
    // The peer's Close, and a violation, each answered by our Close.
    for (after, code) in [
        (frame(0x88, &close_payload(1000, "")), 1000u16),
        (frame(0xC1, b"rsv"), 1002),
    ] {
        let mut conn = ws();
        let mut input = frame(0x81, b"hi");
        input.extend(&after);
        let evs = feed(&mut conn, &input);
        assert_eq!(evs[0], Ev::Text("hi".into()));
        assert!(matches!(evs[1], Ev::Closed(_)), "{evs:?}");
        let mut batch = batch_of("hi");
        assert_eq!(conn.send_batch(&mut batch), Err(SendError::Closed));
        let mut batch = batch_of("hi");
        assert_eq!(conn.send_batch_before_close(&mut batch), Ok(()));
        assert!(batch.is_empty());
        let got = take_output(&mut conn);
        let (reply, close) = got.split_at(4);
        assert_eq!(reply, server_frame(0x81, b"hi"));
        assert_eq!(close[0], 0x88, "{got:?}");
        assert_eq!(close[2..4], code.to_be_bytes());
    }
    // Once a byte of the Close is written, nothing goes ahead of it.
    let mut conn = ws();
    feed(&mut conn, &frame(0x88, &[]));
    conn.advance_output(1);
    let mut batch = batch_of("late");
    assert_eq!(
        conn.send_batch_before_close(&mut batch),
        Err(SendError::Closed)
    );
    assert!(batch.is_empty());
    assert_eq!(take_output(&mut conn), server_frame(0x88, &[])[1..]);
    // While open, it is `send_batch`.
    let mut conn = ws();
    let mut batch = batch_of("open");
    assert_eq!(conn.send_batch_before_close(&mut batch), Ok(()));
    assert_eq!(take_output(&mut conn), server_frame(0x81, b"open"));
}
