//! Size limits and protocol violations: the server fails the connection with
//! the RFC 6455 close code, then hangs up.

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const MIB: usize = 1 << 20;

fn one_mib_server() -> Server {
    Server::start(ServerOpts {
        websocket: r#"max_message_size = "1MiB""#,
        ..ServerOpts::new("echo")
    })
}

#[tokio::test]
async fn message_over_limit_is_1009() {
    let server = one_mib_server();
    let mut ws = server.connect(false).await;
    // Exactly the limit is fine...
    send(&mut ws, Message::binary(vec![7u8; MIB])).await;
    match recv(&mut ws).await {
        Message::Binary(b) => assert_eq!(b.len(), MIB),
        other => panic!("expected the 1 MiB echo, got {}", describe(&other)),
    }
    // ...one byte more is not.
    send(&mut ws, Message::binary(vec![7u8; MIB + 1])).await;
    let (code, _) = recv_close(&mut ws).await;
    assert_eq!(code, 1009);
}

/// A message split into frames that are each under the limit but add up to
/// more than it.
#[tokio::test]
async fn fragmented_message_over_limit_is_1009() {
    let server = one_mib_server();
    let mut raw = server.raw_upgraded(false, "/").await;
    let half = vec![b'x'; MIB / 2];
    raw.send_frame(false, OP_TEXT, &half).await;
    raw.send_frame(false, OP_CONT, &half).await;
    raw.send_frame(true, OP_CONT, b"!").await;
    assert_eq!(raw.read_close().await.0, 1009);
    raw.finish_close(1000).await;
}

/// Only a header announcing 2 MiB: the server must refuse it from the
/// header alone, without waiting for (or buffering) the payload.
#[tokio::test]
async fn announced_length_over_limit_is_1009_at_once() {
    let server = one_mib_server();
    let mut raw = server.raw_upgraded(false, "/").await;
    let started = Instant::now();
    raw.send(&frame_header(
        true,
        0,
        OP_BINARY,
        Some([1, 2, 3, 4]),
        2 * MIB as u64,
    ))
    .await;
    let (code, _) = raw.read_close_timeout(Duration::from_secs(1)).await;
    assert_eq!(code, 1009);
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// Opens a raw connection, sends `bytes`, and returns the server's close code
/// after checking it hangs up once we answer.
async fn violation(server: &Server, bytes: &[u8]) -> u16 {
    let mut raw = server.raw_upgraded(false, "/").await;
    raw.send(bytes).await;
    let (code, _) = raw.read_close().await;
    raw.finish_close(code).await;
    code
}

#[tokio::test]
async fn protocol_violations() {
    let server = Server::start(ServerOpts::new("echo"));
    // Not UTF-8 (0xC3 starts a 2-byte sequence that 0x28 does not continue).
    assert_eq!(
        violation(&server, &masked(OP_TEXT, &[b'o', b'k', 0xC3, 0x28])).await,
        1007,
        "invalid UTF-8 text"
    );
    // Invalid UTF-8 split across fragments.
    let mut split = frame(false, 0, OP_TEXT, Some([9, 9, 9, 9]), &[0xE2, 0x82]);
    split.extend(frame(true, 0, OP_CONT, Some([9, 9, 9, 9]), &[0x41]));
    assert_eq!(
        violation(&server, &split).await,
        1007,
        "invalid UTF-8 across fragments"
    );
    assert_eq!(
        violation(&server, &frame(true, 0, OP_TEXT, None, b"unmasked")).await,
        1002,
        "unmasked client frame"
    );
    assert_eq!(
        violation(&server, &masked(0x3, b"reserved")).await,
        1002,
        "reserved data opcode 0x3"
    );
    assert_eq!(
        violation(&server, &masked(0xB, b"")).await,
        1002,
        "reserved control opcode 0xB"
    );
    assert_eq!(
        violation(
            &server,
            &frame(true, 0b100, OP_TEXT, Some([1, 2, 3, 4]), b"rsv1")
        )
        .await,
        1002,
        "RSV1 without an extension"
    );
    assert_eq!(
        violation(&server, &masked(OP_CONT, b"orphan")).await,
        1002,
        "continuation with no message started"
    );
    assert_eq!(
        violation(&server, &masked(OP_PING, &[b'p'; 126])).await,
        1002,
        "control frame payload over 125 bytes"
    );
    assert_eq!(
        violation(
            &server,
            &frame(false, 0, OP_PING, Some([5, 6, 7, 8]), b"half")
        )
        .await,
        1002,
        "fragmented control frame"
    );
    let mut interleaved = frame(false, 0, OP_TEXT, Some([1, 1, 1, 1]), b"first");
    interleaved.extend(masked(OP_TEXT, b"second"));
    assert_eq!(
        violation(&server, &interleaved).await,
        1002,
        "new data message before the fragmented one ended"
    );
    // The server is still fine afterwards.
    let mut ws = server.connect(false).await;
    send_text(&mut ws, "still here").await;
    assert_eq!(recv_text(&mut ws).await, "still here");
}
