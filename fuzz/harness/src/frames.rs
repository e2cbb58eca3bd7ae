//! Target `frames`: the frame decoder and message assembly.
//!
//! Input: `max_frame_size` (u16 BE), `max_message_size` (u16 BE), a byte for
//! `send_queue_bytes` (x2), a byte for `fragment_size` (0 = none), a byte
//! whose low 3 bits are `k`, next 2 bits the [`Echo`] mode and top 3 bits
//! how many times the echo repeats the message (1, or 7, 64 or 400 times,
//! so that big payloads take the output queue's own-chunk path), `k` chunk
//! lengths, then the client's wire bytes.
//!
//! The wire bytes are fed in one piece, in the chunk lengths given (once
//! through `read` alone, once as a driver does that reads a frame's payload
//! into the room `split_io` lends), and one byte at a time; each message is
//! echoed back. Checked:
//!
//! * the four feedings give the same events (and, but for the deferred
//!   echo, the same output bytes);
//! * the events and the output equal those of an independent reference
//!   reader written from RFC 6455 (so a failure closes with the RFC's code:
//!   1002 for protocol errors, 1007 for bad UTF-8, 1009 for too big);
//! * every byte the server emits decodes as valid unmasked server frames
//!   forming valid messages, with nothing after its Close;
//! * after every `read`, the buffered message is within `max_message_size`,
//!   a partial header within 14 bytes, a control payload within 125, and the
//!   output queue within `send_queue_bytes` plus one Pong and one Close
//!   (plus what a batch added, which the host bounds);
//! * `read` returns `None` only with its input consumed, reports `Closed`
//!   once and last, and `transport_closed` reports 1006 only if no close was
//!   reported.

use std::time::Instant;

use wharf_protocol::{CloseInfo, Config, Event, FrameBatch, Framed, SendError, WebSocket};

use crate::wire::{self, OutMsg};

/// An owned [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// The end (the last event).
    Closed(CloseInfo),
}

/// How messages are echoed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// `send_text` / `send_binary` right after the event.
    Send,
    /// A [`FrameBatch`] of one message, `send_batch` right after the event.
    Batch,
    /// [`Framed`] (one unfragmented frame), `send_framed`.
    Framed,
    /// The messages of one `read` call collected in a batch and queued with
    /// `send_batch_before_close` once `read` has nothing more (the plugin
    /// host's pattern): they must go out ahead of a Close read later in the
    /// same input, and nothing may follow the Close.
    Deferred,
}

/// What one feeding of the input produced.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    events: Vec<Ev>,
    echoes: Vec<Result<(), SendError>>,
    output: Vec<u8>,
}

/// Parsed fuzz input.
pub struct Input<'a> {
    /// The connection's configuration.
    pub config: Config,
    /// How messages are echoed.
    pub echo: Echo,
    /// How many copies of a message its echo holds.
    pub repeat: usize,
    /// Chunk lengths for the split feeding.
    pub lens: &'a [u8],
    /// The client's bytes.
    pub wire: &'a [u8],
}

/// Splits the fuzz input into configuration, chunk lengths and wire bytes.
pub fn parse(data: &[u8]) -> Option<Input<'_>> {
    let (head, rest) = data.split_first_chunk::<7>()?;
    let k = usize::from(head[6] & 7);
    let echo =
        [Echo::Send, Echo::Batch, Echo::Framed, Echo::Deferred][usize::from(head[6] >> 3 & 3)];
    let repeat = match head[6] >> 5 {
        5 => 7,
        6 => 64,
        7 => 400,
        _ => 1,
    };
    if rest.len() < k {
        return None;
    }
    let (lens, wire) = rest.split_at(k);
    let config = Config {
        max_frame_size: usize::from(u16::from_be_bytes([head[0], head[1]])),
        max_message_size: usize::from(u16::from_be_bytes([head[2], head[3]])),
        send_queue_bytes: usize::from(head[4]) * 2,
        fragment_size: (head[5] != 0).then_some(usize::from(head[5])),
        ..Config::default()
    };
    Some(Input {
        config,
        echo,
        repeat,
        lens,
        wire,
    })
}

/// The target's check.
pub fn check(data: &[u8]) {
    let Some(input) = parse(data) else {
        return;
    };
    let (config, echo, repeat) = (&input.config, input.echo, input.repeat);
    let step = input.lens.first().map_or(64, |&l| usize::from(l) + 1);
    let whole = run(config, echo, repeat, &[input.wire], step, false);
    let pieces = crate::chunks(input.wire, input.lens);
    let mut runs = vec![
        run(config, echo, repeat, &pieces, step + 7, false),
        run(config, echo, repeat, &pieces, step + 7, true),
        // Binary messages of one frame (from some length on) delivered
        // masked, unmasked into a copy: the same events and output.
        run(
            &Config {
                deliver_masked_from: Some(step % 128),
                ..config.clone()
            },
            echo,
            repeat,
            &pieces,
            step + 7,
            true,
        ),
    ];
    if input.wire.len() <= 4096 {
        let bytes: Vec<&[u8]> = input.wire.chunks(1).collect();
        runs.push(run(config, echo, repeat, &bytes, 1, false));
    }
    let expect = reference(config, echo, repeat, input.wire);
    // Framed messages are never fragmented.
    let fragment_size = config.fragment_size.filter(|_| echo != Echo::Framed);
    for (i, r) in std::iter::once(&whole).chain(&runs).enumerate() {
        assert_eq!(
            r.events, whole.events,
            "feeding {i}: events differ from whole"
        );
        assert_eq!(
            r.echoes, whole.echoes,
            "feeding {i}: echoes differ from whole"
        );
        if echo != Echo::Deferred {
            assert_eq!(
                r.output, whole.output,
                "feeding {i}: output differs from whole"
            );
        }
        let got = wire::messages(&wire::decode_server(&r.output), fragment_size);
        if echo == Echo::Deferred {
            deferred_output(&got, &expect);
        } else {
            assert_eq!(
                normalize(&got),
                normalize(&expect.out),
                "output differs from the reference"
            );
        }
    }
    assert_eq!(
        normalize_events(&whole.events),
        expect.events,
        "events differ from the reference"
    );
}

/// With deferred echoes, where the Pongs fall among the echoes (and how
/// many the queue's mark lets through) depends on the reads; the echoes
/// themselves, their order, and the Close at the very end do not.
fn deferred_output(got: &[OutMsg], expect: &Expect) {
    let data = |out: &[OutMsg]| -> Vec<OutMsg> {
        out.iter()
            .filter(|m| matches!(m, OutMsg::Text(_) | OutMsg::Binary(_)))
            .cloned()
            .collect()
    };
    assert_eq!(data(got), data(&expect.out), "deferred echoes");
    let mut pings = expect.pings.iter();
    for m in got {
        if let OutMsg::Pong(p) = m {
            assert!(
                pings.any(|q| q == p),
                "Pong {p:x?} answers no Ping in order"
            );
        }
    }
    let close = |out: &[OutMsg]| -> Vec<OutMsg> {
        normalize(out)
            .into_iter()
            .filter(|m| matches!(m, OutMsg::Close(_)))
            .collect()
    };
    assert_eq!(close(got), close(&expect.out), "Close");
}

/// Close payloads compare by code only: our failure reasons are our own
/// wording, not the RFC's.
fn normalize(out: &[OutMsg]) -> Vec<OutMsg> {
    out.iter()
        .map(|m| match m {
            OutMsg::Close(p) => OutMsg::Close(p.iter().take(2).copied().collect()),
            m => m.clone(),
        })
        .collect()
}

/// `lend`: each piece goes into the room `split_io` lends for a frame's
/// payload, as far as it reaches, and the rest through `read`.
fn run(
    config: &Config,
    echo: Echo,
    repeat: usize,
    pieces: &[&[u8]],
    step: usize,
    lend: bool,
) -> Run {
    let now = Instant::now();
    let mut ws = WebSocket::new(config.clone(), now);
    let mut r = Run {
        events: Vec::new(),
        echoes: Vec::new(),
        output: Vec::new(),
    };
    let mut deferred = FrameBatch::new(config.fragment_size);
    let mut batched = 0;
    for &piece in pieces {
        let mut rest = piece;
        while !rest.is_empty() {
            let mut input = next_input(&mut ws, &mut rest, lend);
            loop {
                let ev = ws.read(&mut input, now).map(|e| match e {
                    Event::Text(t) => Ev::Text(t.to_owned()),
                    Event::Binary(b) => Ev::Binary(b.to_vec()),
                    Event::MaskedBinary(m) => {
                        let mut copy = vec![0; m.len()];
                        m.unmask_into(&mut copy);
                        Ev::Binary(copy)
                    }
                    Event::Closed(c) => Ev::Closed(c),
                });
                check_limits(&ws, config, batched);
                let Some(ev) = ev else {
                    assert!(input.is_empty(), "read returned None with input left");
                    break;
                };
                assert!(
                    !matches!(r.events.last(), Some(Ev::Closed(_))),
                    "event after Closed: {ev:?}"
                );
                if echo != Echo::Deferred {
                    r.output.extend(wire::drain(&mut ws, step));
                }
                let (text, bytes) = match &ev {
                    Ev::Text(t) => (true, t.as_bytes()),
                    Ev::Binary(b) => (false, b.as_slice()),
                    Ev::Closed(_) => {
                        assert!(
                            ws.is_closed(),
                            "Closed reported but state is {:?}",
                            ws.state()
                        );
                        assert_eq!(ws.send_text("late"), Err(SendError::Closed));
                        r.events.push(ev);
                        continue;
                    }
                };
                assert!(bytes.len() <= config.max_message_size);
                let copies = bytes.repeat(repeat);
                let bytes = copies.as_slice();
                let as_text = || std::str::from_utf8(bytes).expect("text is UTF-8");
                match echo {
                    Echo::Send if text => r.echoes.push(ws.send_text(as_text())),
                    Echo::Send => r.echoes.push(ws.send_binary(bytes)),
                    Echo::Batch => {
                        let mut batch = FrameBatch::new(config.fragment_size);
                        if text {
                            batch.push_text(as_text());
                        } else {
                            batch.push_binary(bytes);
                        }
                        r.echoes.push(ws.send_batch(&mut batch));
                        assert!(batch.is_empty());
                    }
                    Echo::Framed if text => r.echoes.push(ws.send_framed(&Framed::text(as_text()))),
                    Echo::Framed => r.echoes.push(ws.send_framed(&Framed::binary(bytes))),
                    Echo::Deferred if text => deferred.push_text(as_text()),
                    Echo::Deferred => deferred.push_binary(bytes),
                }
                if echo != Echo::Deferred {
                    r.output.extend(wire::drain(&mut ws, step));
                }
                r.events.push(ev);
            }
            if !deferred.is_empty() {
                batched += deferred.len();
                r.echoes.push(ws.send_batch_before_close(&mut deferred));
                assert!(deferred.is_empty());
            }
        }
    }
    let closed = matches!(r.events.last(), Some(Ev::Closed(_)));
    match ws.transport_closed() {
        Some(info) => {
            assert!(!closed, "transport_closed reported a second close");
            assert_eq!((info.code, info.clean), (1006, false));
            r.events.push(Ev::Closed(info));
        }
        None => assert!(closed, "transport_closed reported nothing, and nothing was"),
    }
    assert!(ws.transport_closed().is_none());
    let mut rest: &[u8] = b"\x81\x80\0\0\0\0";
    assert_eq!(ws.read(&mut rest, now), None, "event after close");
    r.output.extend(wire::drain(&mut ws, step));
    if echo == Echo::Deferred {
        // How many batches depends on the reads; that each was taken does not.
        assert!(r.echoes.iter().all(Result::is_ok), "{:?}", r.echoes);
        r.echoes.clear();
    }
    r
}

/// The next input for `read`: with `lend`, as much of `rest` as the room
/// lent for a frame's payload takes goes there, and `read` is given
/// nothing (it takes in what the room holds); else all of `rest`.
fn next_input<'a>(ws: &mut WebSocket, rest: &mut &'a [u8], lend: bool) -> &'a [u8] {
    if lend {
        // The room may be lent again before a read (a driver's wait that
        // ended for something else); what it then takes follows on.
        let _ = ws.split_io(1, 3);
        if let (_, Some(mut room)) = ws.split_io(1, usize::MAX) {
            let n = room.limit().min(rest.len());
            let (into, after) = rest.split_at(n);
            room.get_mut().extend_from_slice(into);
            *rest = after;
            return &[];
        }
    }
    std::mem::take(rest)
}

fn check_limits(ws: &WebSocket, config: &Config, batched: usize) {
    let b = ws.buffered();
    assert!(
        b.message <= config.max_message_size,
        "buffered message of {} bytes over max_message_size {}",
        b.message,
        config.max_message_size
    );
    assert!(b.header <= 14, "partial header of {} bytes", b.header);
    assert!(b.control <= 125, "control payload of {} bytes", b.control);
    assert!(
        ws.output_len() <= config.send_queue_bytes + 2 * 127 + batched,
        "output queue of {} bytes over send_queue_bytes {}",
        ws.output_len(),
        config.send_queue_bytes
    );
}

/// What the reference reader expects.
pub struct Expect {
    /// Events, ending with `Closed` (1006 when the input just stops).
    pub events: Vec<Ev>,
    /// The server's output, message by message.
    pub out: Vec<OutMsg>,
    /// Every complete Ping's payload, answered or not.
    pub pings: Vec<Vec<u8>>,
}

/// An independent reader of the client's bytes, straight from RFC 6455
/// sections 5 and 7, for the same server: what it must deliver and send.
pub fn reference(config: &Config, echo: Echo, repeat: usize, wire: &[u8]) -> Expect {
    let mut e = Expect {
        events: Vec::new(),
        out: Vec::new(),
        pings: Vec::new(),
    };
    // A batch is not held to the queue's mark nor to max_message_size (its
    // host admits it).
    let echoed = |len: usize| {
        matches!(echo, Echo::Batch | Echo::Deferred)
            || (config.send_queue_bytes > 0 && len * repeat <= config.max_message_size)
    };
    // Output queued since the last drain (the harness drains after events).
    let mut queued = 0usize;
    let mut msg: Option<(u8, Vec<u8>)> = None;
    let mut rest = wire;
    let fail = |e: &mut Expect, code: u16| {
        e.out.push(OutMsg::Close(code.to_be_bytes().to_vec()));
        e.events.push(Ev::Closed(CloseInfo {
            code,
            reason: String::new(),
            clean: false,
        }));
    };
    while let [b0, b1, ..] = *rest {
        let (fin, opcode, masked, len7) = (b0 & 0x80 != 0, b0 & 0x0F, b1 & 0x80 != 0, b1 & 0x7F);
        let control = opcode >= 8;
        if b0 & 0x70 != 0
            || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10)
            || !masked
            || (control && (!fin || len7 > 125))
        {
            fail(&mut e, 1002);
            return e;
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if rest.len() < 2 + ext + 4 {
            break;
        }
        let len = match len7 {
            126 => u64::from(u16::from_be_bytes([rest[2], rest[3]])),
            127 => u64::from_be_bytes(rest[2..10].try_into().unwrap()),
            n => u64::from(n),
        };
        if len >> 63 != 0 {
            fail(&mut e, 1002);
            return e;
        }
        let mask: [u8; 4] = rest[2 + ext..6 + ext].try_into().unwrap();
        rest = &rest[6 + ext..];
        if !control {
            match (opcode, &msg) {
                (0, None) | (1 | 2, Some(_)) => {
                    fail(&mut e, 1002);
                    return e;
                }
                _ => {}
            }
            let so_far = msg.as_ref().map_or(0, |(_, m)| m.len()) as u64;
            if len > config.max_frame_size as u64 || so_far + len > config.max_message_size as u64 {
                fail(&mut e, 1009);
                return e;
            }
        }
        let avail = usize::try_from(len).unwrap_or(usize::MAX).min(rest.len());
        let payload: Vec<u8> = rest[..avail]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        rest = &rest[avail..];
        let complete = avail as u64 == len;
        if !control {
            let (kind, buf) = msg.get_or_insert_with(|| (opcode, Vec::new()));
            buf.extend_from_slice(&payload);
            let kind = *kind;
            if kind == 1 {
                // Fail fast: a prefix that no continuation can fix.
                if let Err(err) = std::str::from_utf8(buf)
                    && (err.error_len().is_some() || (complete && fin))
                {
                    fail(&mut e, 1007);
                    return e;
                }
            }
            if !complete {
                break;
            }
            if fin {
                let (_, buf) = msg.take().unwrap();
                let ev = if kind == 1 {
                    Ev::Text(String::from_utf8(buf).unwrap())
                } else {
                    Ev::Binary(buf)
                };
                // Drained, echoed, drained.
                let len = match &ev {
                    Ev::Text(t) => t.len(),
                    Ev::Binary(b) => b.len(),
                    Ev::Closed(_) => unreachable!(),
                };
                if echoed(len) {
                    e.out.push(match &ev {
                        Ev::Text(t) => OutMsg::Text(t.repeat(repeat)),
                        Ev::Binary(b) => OutMsg::Binary(b.repeat(repeat)),
                        Ev::Closed(_) => unreachable!(),
                    });
                }
                queued = 0;
                e.events.push(ev);
            }
            continue;
        }
        if !complete {
            break;
        }
        if opcode == 9 {
            e.pings.push(payload.clone());
        }
        match opcode {
            // A Pong only while the queue is under its mark.
            9 if queued < config.send_queue_bytes => {
                queued += 2 + payload.len();
                e.out.push(OutMsg::Pong(payload));
            }
            8 => {
                let (code, reason) = match payload.as_slice() {
                    [] => (None, String::new()),
                    [_] => {
                        fail(&mut e, 1002);
                        return e;
                    }
                    [hi, lo, reason @ ..] => {
                        let code = u16::from_be_bytes([*hi, *lo]);
                        if !wire::sendable_code(code) {
                            fail(&mut e, 1002);
                            return e;
                        }
                        let Ok(reason) = std::str::from_utf8(reason) else {
                            fail(&mut e, 1007);
                            return e;
                        };
                        (Some(code), reason.to_owned())
                    }
                };
                e.out.push(OutMsg::Close(
                    code.map_or(Vec::new(), |c| c.to_be_bytes().to_vec()),
                ));
                e.events.push(Ev::Closed(CloseInfo {
                    code: code.unwrap_or(1005),
                    reason,
                    clean: true,
                }));
                return e;
            }
            _ => {}
        }
    }
    e.events.push(Ev::Closed(CloseInfo {
        code: 1006,
        reason: String::new(),
        clean: false,
    }));
    e
}

/// A failure's reason is the server's own wording, not the RFC's: compare
/// failures by code.
fn normalize_events(events: &[Ev]) -> Vec<Ev> {
    events
        .iter()
        .map(|ev| match ev {
            Ev::Closed(info) if !info.clean => Ev::Closed(CloseInfo {
                reason: String::new(),
                ..info.clone()
            }),
            ev => ev.clone(),
        })
        .collect()
}
