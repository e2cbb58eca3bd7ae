//! The echo plugin: every kind of message comes back byte for byte, over ws
//! and wss.

use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

/// 16 MiB: the default `max_message_size` (and `max_frame_size`).
const BIG: usize = 16 << 20;

async fn echo_all_kinds(tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        ..ServerOpts::new("echo")
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
    echo_all_kinds(false).await;
}

#[tokio::test]
async fn echo_wss() {
    echo_all_kinds(true).await;
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
