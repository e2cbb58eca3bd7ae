//! Closing handshakes started by the client and by the plugin
//! (close-codes plugin).

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::support::*;

async fn client_close_is_echoed(tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        ..ServerOpts::new("close_codes")
    });
    for code in [1000u16, 3000, 4999] {
        let mut ws = server.connect(tls).await;
        let reason = format!("client {code}");
        within(
            IO_TIMEOUT,
            "close",
            ws.close(Some(CloseFrame {
                code: code.into(),
                reason: reason.clone().into(),
            })),
        )
        .await
        .expect("send close");
        let got = match within(IO_TIMEOUT, "the close reply", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => u16::from(f.code),
            other => panic!("expected the server's close frame, got {other:?}"),
        };
        assert_eq!(got, code, "server must echo the client's close code");
        // And then the server closes the TCP connection.
        let end = within(IO_TIMEOUT, "the end of the stream", ws.next()).await;
        assert!(!matches!(end, Some(Ok(_))), "message after close: {end:?}");
        // The plugin's on-close saw the code, the reason and a clean close.
        server
            .wait_log(
                &[
                    &format!("code={code} reason=\"{reason}\" clean=true"),
                    "stderr: close-codes",
                ],
                Duration::from_secs(2),
            )
            .await;
    }
}

#[tokio::test]
async fn client_close_codes_echoed_ws() {
    client_close_is_echoed(false).await;
}

#[tokio::test]
async fn client_close_codes_echoed_wss() {
    client_close_is_echoed(true).await;
}

#[tokio::test]
async fn plugin_close_codes() {
    let server = Server::start(ServerOpts::new("close_codes"));
    for (command, code, reason) in [
        ("kick", 1008u16, "kicked"),
        ("app", 4000, "app close"),
        ("bye", 1000, ""),
    ] {
        let mut ws = server.connect(false).await;
        send_text(&mut ws, command).await;
        assert_eq!(
            recv_close(&mut ws).await,
            (code, reason.to_owned()),
            "after {command:?}"
        );
    }

    // Refused closes leave the connection open and usable.
    let mut ws = server.connect(false).await;
    send_text(&mut ws, "bad-code").await;
    assert_eq!(recv_text(&mut ws).await, "invalid-code");
    send_text(&mut ws, "long-reason").await;
    assert_eq!(recv_text(&mut ws).await, "reason-too-long");
    send_text(&mut ws, "still open").await;
    assert_eq!(recv_text(&mut ws).await, "still open");
}

/// The server's Close in answer to a raw client's: same code, then EOF.
#[tokio::test]
async fn raw_close_handshake() {
    let server = Server::start(ServerOpts::new("close_codes"));
    let mut raw = server.raw_upgraded(false, "/").await;
    raw.send(&close_frame(4321, "raw")).await;
    assert_eq!(raw.read_close().await.0, 4321);
    raw.expect_eof().await;
    // A close code that may not be sent on the wire (1005) is a protocol error.
    let mut raw = server.raw_upgraded(false, "/").await;
    raw.send(&close_frame(1005, "")).await;
    assert_eq!(raw.read_close().await.0, 1002);
}
