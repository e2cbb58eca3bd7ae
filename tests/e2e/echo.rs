//! The echo plugins: every kind of message comes back byte for byte, over
//! ws and wss, from the bundled echo and from `lean-echo` (no WASI).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// 16 MiB: the default `max_message_size` (and `max_frame_size`).
const BIG: usize = 16 << 20;

async fn echo_all_kinds(plugin: &'static str, tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        ..ServerOpts::new(plugin)
    });
    let mut ws = server.connect(tls).await;

    send_text(&mut ws, "hello wharf ✓").await;
    assert_eq!(recv_text(&mut ws).await, "hello wharf ✓");

    send(&mut ws, Message::binary(vec![0u8, 1, 2, 255, 254])).await;
    match recv(&mut ws).await {
        Message::Binary(b) => assert_eq!(&b[..], &[0u8, 1, 2, 255, 254]),
        other => panic!("expected binary, got {}", describe(&other)),
    }

    send_text(&mut ws, "").await;
    match recv(&mut ws).await {
        Message::Text(t) => assert_eq!(t.as_str(), ""),
        other => panic!("expected empty text, got {}", describe(&other)),
    }

    send(&mut ws, Message::binary(Vec::new())).await;
    match recv(&mut ws).await {
        Message::Binary(b) => assert!(b.is_empty()),
        other => panic!("expected empty binary, got {}", describe(&other)),
    }

    // 16 MiB of text and of binary, each echoed byte for byte.
    let text: String = (0..BIG).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    send(&mut ws, Message::text(text.clone())).await;
    match recv_timeout(&mut ws, Duration::from_secs(15)).await {
        Message::Text(t) => {
            assert_eq!(t.len(), BIG);
            assert!(t.as_str() == text, "16 MiB text echo differs");
        }
        other => panic!("expected 16 MiB text, got {}", describe(&other)),
    }
    let mut x: u32 = 0x1234_5678;
    let binary: Vec<u8> = (0..BIG)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    send(&mut ws, Message::binary(binary.clone())).await;
    match recv_timeout(&mut ws, Duration::from_secs(15)).await {
        Message::Binary(b) => {
            assert_eq!(b.len(), BIG);
            assert!(b[..] == binary[..], "16 MiB binary echo differs");
        }
        other => panic!("expected 16 MiB binary, got {}", describe(&other)),
    }

    // A text message the client splits into three frames, with a Ping
    // between two of them (control frames may interleave with fragments).
    let mut raw = server.raw_upgraded(tls, "/").await;
    raw.send_frame(false, OP_TEXT, "Hello, ".as_bytes()).await;
    raw.send_frame(false, OP_CONT, "fragmented ".as_bytes())
        .await;
    raw.send_frame(true, OP_PING, b"mid").await;
    raw.send_frame(true, OP_CONT, "wörld".as_bytes()).await;
    let pong = raw.read_frame().await;
    assert_eq!(
        (pong.opcode, &pong.payload[..]),
        (OP_PONG, &b"mid"[..]),
        "{pong:?}"
    );
    let echoed = raw.read_frame().await;
    assert!(echoed.fin && echoed.opcode == OP_TEXT, "{echoed:?}");
    assert_eq!(
        String::from_utf8(echoed.payload).unwrap(),
        "Hello, fragmented wörld"
    );
    // The same for binary, split at a byte boundary.
    raw.send_frame(false, OP_BINARY, &[1, 2]).await;
    raw.send_frame(true, OP_CONT, &[3]).await;
    let echoed = raw.read_frame().await;
    assert_eq!((echoed.opcode, echoed.payload), (OP_BINARY, vec![1, 2, 3]));
}

#[tokio::test]
async fn echo_ws() {
    echo_all_kinds("echo", false).await;
}

#[tokio::test]
async fn echo_wss() {
    echo_all_kinds("echo", true).await;
}

/// The `no_std` echo serves like the bundled one (its batches, taken
/// packed, too), and its component imports none of WASI.
#[tokio::test]
async fn lean_echo_echoes_and_imports_no_wasi() {
    echo_all_kinds("lean_echo", false).await;
    echo_all_kinds("lean_echo", true).await;

    let server = Server::start(ServerOpts::new("lean_echo"));
    let mut raw = server.raw_upgraded(false, "/").await;
    let batch: Vec<u8> = (0..16u8)
        .flat_map(|i| masked(OP_BINARY, &[i; 100]))
        .collect();
    raw.send(&batch).await;
    for i in 0..16u8 {
        let frame = raw.read_frame().await;
        assert_eq!((frame.opcode, frame.payload), (OP_BINARY, vec![i; 100]));
    }

    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::from_file(&engine, plugin_path("lean_echo"))
        .expect("lean_echo compiles");
    let imports: Vec<String> = component
        .component_type()
        .imports(&engine)
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(!imports.is_empty(), "no imports at all?");
    assert!(
        imports
            .iter()
            .all(|name| name.starts_with("wharf:websocket/")),
        "{imports:?}"
    );
}

async fn goodbye_closes_normally(tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        ..ServerOpts::new("echo")
    });
    let mut ws = server.connect(tls).await;
    send_text(&mut ws, "goodbye").await;
    assert_eq!(recv_close(&mut ws).await, (1000, "goodbye".to_owned()));
}

#[tokio::test]
async fn goodbye_ws() {
    goodbye_closes_normally(false).await;
}

#[tokio::test]
async fn goodbye_wss() {
    goodbye_closes_normally(true).await;
}

/// The request line, headers and a first frame in a single write: the
/// frame must not be lost with the handshake's read buffer.
#[tokio::test]
async fn pipelined_frame_after_handshake() {
    let server = Server::start(ServerOpts::new("echo"));
    let mut raw = server.raw(false).await;
    let mut bytes = upgrade_request("/", &[]).into_bytes();
    bytes.extend(masked(OP_TEXT, b"pipelined"));
    raw.send(&bytes).await;
    let resp = raw.read_response().await;
    assert_eq!(resp.status, 101, "{resp:?}");
    let f = raw.read_frame().await;
    assert_eq!((f.opcode, &f.payload[..]), (OP_TEXT, &b"pipelined"[..]));
}

/// Large echoes are written to the socket while the plugin's memory is
/// still readable, and only what the socket does not take is queued. To
/// a client whose receive buffer is small and who reads late, most such
/// writes are partial: every echo must still arrive whole and in order,
/// with the Pongs for the Pings sent between them (which the server may
/// queue while an echo is half written) between frames, never inside one,
/// and each echo counted once.
#[tokio::test]
async fn large_echoes_to_a_slow_reader_stay_whole_and_in_order() {
    // 8 MiB: twice what the server's socket may buffer (`tcp_wmem`'s
    // usual maximum).
    slow_reader_echoes(64, 128 * 1024, true).await;
}

/// The same for small messages that arrive together: the plugin answers a
/// batch with one packed send, whose frames (16 KiB or more of payload)
/// are written in one go from the plugin's memory, and a write the full
/// socket cuts short leaves the rest, from inside a frame, queued.
#[tokio::test]
async fn packed_echoes_to_a_slow_reader_stay_whole_and_in_order() {
    slow_reader_echoes(8192, 1024, false).await;
}

/// `count` messages of `size` bytes, text and binary in turn, sent at once
/// to the echo by a client that reads late through a small receive
/// buffer; `pings`: each in two fragments with a Ping between them.
async fn slow_reader_echoes(count: usize, size: usize, pings: bool) {
    // Within the send queue configured below, so that no echo is refused
    // for the backlog.
    let server = Server::start(ServerOpts {
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        websocket: "send_queue = \"32MiB\"",
        ..ServerOpts::new("echo")
    });
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut tcp = within(
        IO_TIMEOUT,
        "TCP connect",
        socket.connect(server.addr(false)),
    )
    .await
    .expect("TCP connect");
    tcp.write_all(upgrade_request("/", &[]).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = within(IO_TIMEOUT, "101", tcp.read(&mut chunk))
            .await
            .unwrap();
        assert!(n > 0, "closed before the 101");
        buf.extend_from_slice(&chunk[..n]);
    };
    assert!(buf.starts_with(b"HTTP/1.1 101"), "{buf:?}");
    buf.drain(..head_end);

    // Message i: text (even i) or binary, `size` bytes of a pattern of i.
    let payload =
        |i: usize| -> Vec<u8> { (0..size).map(|j| b'a' + ((i + j) % 26) as u8).collect() };
    let mut wire = Vec::new();
    let mask = Some([1, 2, 3, 4]);
    for i in 0..count {
        let op = if i % 2 == 0 { OP_TEXT } else { OP_BINARY };
        let message = payload(i);
        if pings {
            // In two fragments with the Ping between them: the Pong is
            // queued by the read that completes the message, just before
            // its echo.
            let (first, last) = message.split_at(size - 10);
            wire.extend(frame(false, 0, op, mask, first));
            wire.extend(frame(true, 0, OP_PING, mask, &[i as u8]));
            wire.extend(frame(true, 0, OP_CONT, mask, last));
        } else {
            wire.extend(frame(true, 0, op, mask, &message));
        }
    }
    let (mut read, mut write) = tcp.into_split();
    let writer = tokio::spawn(async move { write.write_all(&wire).await.map(|()| write) });
    // Late, so that the server's writes meet a full receive buffer.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let want_pongs = if pings { count } else { 0 };
    let (mut echoes, mut pongs) = (0, 0);
    while echoes < count || pongs < want_pongs {
        let frame = loop {
            if let Some((frame, used)) = parse_frame(&buf) {
                buf.drain(..used);
                break frame;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = within(Duration::from_secs(10), "a frame", read.read(&mut chunk))
                .await
                .unwrap();
            assert!(n > 0, "closed after {echoes} echoes and {pongs} pongs");
            buf.extend_from_slice(&chunk[..n]);
        };
        assert!(frame.fin, "{frame:?}");
        if frame.opcode == OP_PONG {
            assert!(pings, "a Pong nobody asked for");
            assert_eq!(frame.payload, [pongs as u8], "pongs in order");
            pongs += 1;
            continue;
        }
        let op = if echoes % 2 == 0 { OP_TEXT } else { OP_BINARY };
        assert_eq!(frame.opcode, op, "echo {echoes}");
        assert!(frame.payload == payload(echoes), "echo {echoes} differs");
        echoes += 1;
    }
    let _write = writer.await.unwrap().expect("client writes");
    // Counted once each, written directly or not.
    let half = count as f64 / 2.0;
    for kind in ["text", "binary"] {
        let series = format!(r#"wharf_messages_sent_total{{tenant="default",type="{kind}"}}"#);
        assert_eq!(server.metric(&series).await, half, "{series}");
    }
    let bytes = (count * size) as f64;
    assert_eq!(
        server
            .metric(r#"wharf_sent_bytes_total{tenant="default"}"#)
            .await,
        bytes
    );
}
