//! The process and connection life cycle: `wharf check`, graceful shutdown,
//! keep-alive pings and the idle timeout.

use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test]
async fn check_refuses_incomplete_plugin() {
    let out = wharf_cmd()
        .args(["check", "--listen", "127.0.0.1:0", "--plugin"])
        .arg(plugin_path("incomplete"))
        .output()
        .expect("run wharf check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check accepted it; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("on-close"),
        "stderr does not name on-close:\n{stderr}"
    );

    // And the same command accepts a complete one.
    let out = wharf_cmd()
        .args(["check", "--listen", "127.0.0.1:0", "--plugin"])
        .arg(plugin_path("echo"))
        .output()
        .expect("run wharf check");
    assert!(
        out.status.success(),
        "check refused echo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_closes_connections_with_1001_and_exits_0() {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
    let mut server = Server::start(ServerOpts {
        tls: true,
        server: r#"shutdown_timeout = "3s""#,
        ..ServerOpts::new("echo")
    });
    let mut plain = server.connect(false).await;
    let mut secure = server.connect(true).await;
    send_text(&mut plain, "ws").await;
    assert_eq!(recv_text(&mut plain).await, "ws");
    send_text(&mut secure, "wss").await;
    assert_eq!(recv_text(&mut secure).await, "wss");

    let started = Instant::now();
    server.sigterm();
    let (a, b) = tokio::join!(recv_close(&mut plain), recv_close(&mut secure));
    assert_eq!(a.0, 1001, "ws connection: {a:?}");
    assert_eq!(b.0, 1001, "wss connection: {b:?}");
    // Closing handshakes done: hang up, as a client does once the server has
    // (the server lingers until our FIN, up to its close timeout).
    drop((plain, secure));

    let status = server
        .wait_exit(SHUTDOWN_TIMEOUT + Duration::from_secs(1))
        .await
        .expect("wharf still running after the shutdown timeout");
    assert!(status.success(), "exit status {status:?}");
    // Both clients finished their closing handshakes, so there was no need
    // to wait for the timeout.
    assert!(
        started.elapsed() < SHUTDOWN_TIMEOUT,
        "exit took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn silent_peer_is_pinged_then_dropped() {
    let server = Server::start(ServerOpts {
        websocket: "ping_interval = \"200ms\"\nidle_timeout = \"600ms\"",
        ..ServerOpts::new("echo")
    });
    let mut raw = server.raw_upgraded(false, "/").await;
    let opened = Instant::now();

    let ping = raw.read_frame_timeout(Duration::from_millis(400)).await;
    assert_eq!(ping.opcode, OP_PING, "expected a Ping first: {ping:?}");
    // We never answer it.
    let (code, _) = raw.read_close_timeout(Duration::from_millis(1500)).await;
    assert_eq!(code, 1001);
    let idle = opened.elapsed();
    assert!(
        idle >= Duration::from_millis(500) && idle < Duration::from_millis(1500),
        "closed after {idle:?}"
    );
}

#[tokio::test]
async fn answering_pings_keeps_the_connection() {
    let server = Server::start(ServerOpts {
        websocket: "ping_interval = \"200ms\"\nidle_timeout = \"600ms\"",
        ..ServerOpts::new("echo")
    });
    // tungstenite answers pings by itself while we read.
    let mut ws = server.connect(false).await;
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        let r = tokio::time::timeout(Duration::from_millis(100), recv(&mut ws)).await;
        if let Ok(m) = r {
            panic!("unexpected message while idle: {}", describe(&m));
        }
    }
    send_text(&mut ws, "alive").await;
    assert_eq!(recv_text(&mut ws).await, "alive");
}
