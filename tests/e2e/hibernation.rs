//! Hibernation: an idle connection's instance is released and a fresh one
//! takes the next event, getting its state back from the attachment. And
//! what idle connections free goes back to the OS.

use std::time::Duration;

use crate::support::{Server, ServerOpts, recv_text, send_text};

async fn resumes_with_its_state(tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        plugin_limits: "hibernate_after = \"150ms\"",
        ..ServerOpts::new("chaos")
    });
    let mut ws = server.connect(tls).await;
    send_text(&mut ws, "count").await;
    assert_eq!(recv_text(&mut ws).await, "count=1 instance=1");
    send_text(&mut ws, "count").await;
    assert_eq!(recv_text(&mut ws).await, "count=2 instance=2");
    // Idle past hibernate_after: the instance goes (its memory with it:
    // the in-instance counter restarts), the attachment stays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    send_text(&mut ws, "count").await;
    assert_eq!(recv_text(&mut ws).await, "count=3 instance=1");
    send_text(&mut ws, "count").await;
    assert_eq!(recv_text(&mut ws).await, "count=4 instance=2");
    // Ordinary echo still works, and the close reaches the resumed plugin.
    send_text(&mut ws, "still echoing").await;
    assert_eq!(recv_text(&mut ws).await, "still echoing");
    // A large message arriving at a hibernated connection (whose read
    // buffer shrank) resumes it whole.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let big: String = (0..1 << 20)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    send_text(&mut ws, &big).await;
    assert!(
        recv_text(&mut ws).await == big,
        "1 MiB echo after hibernation differs"
    );
    send_text(&mut ws, "count").await;
    assert_eq!(recv_text(&mut ws).await, "count=5 instance=1");
}

#[tokio::test]
async fn hibernated_connection_resumes_with_its_state_ws() {
    resumes_with_its_state(false).await;
}

#[tokio::test]
async fn hibernated_connection_resumes_with_its_state_wss() {
    resumes_with_its_state(true).await;
}

/// A hibernated connection that cannot wake because every instance slot is
/// taken is closed with 1013 (Try Again Later), counted as a `pool`
/// failure; the connection holding the slot is not disturbed. The server
/// runs in this process with a pool of one slot for two connections (in a
/// served configuration the pool follows `server.max_connections`, and
/// components with many core instances or memories exhaust it first).
#[tokio::test]
async fn a_hibernated_connection_that_cannot_wake_gets_1013() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use wharf::config::Config;

    use crate::support::{cache_dir, plugin_path};

    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [server]\nmax_connections = 2\n\
         [plugin]\npath = {echo:?}\ncache_dir = {cache:?}\nhibernate_after = \"100ms\"\n",
        echo = plugin_path("echo").display().to_string(),
        cache = cache_dir().display().to_string(),
    );
    let config: Config = toml::from_str(&text).unwrap();
    let (server, _tenants, metrics) = crate::support::in_process(&config, 1).await;
    let addr = server.bound()[0].address;
    let connect = || async move {
        let req = format!("ws://127.0.0.1:{}/", addr.port())
            .into_client_request()
            .unwrap();
        crate::support::connect(addr, None, req).await.unwrap().0
    };

    let mut sleeper = connect().await;
    send_text(&mut sleeper, "before").await;
    assert_eq!(recv_text(&mut sleeper).await, "before");
    // Past hibernate_after its slot is free, and the busy one takes it,
    // keeping it by never idling that long.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut busy = connect().await;
    let keep_busy = tokio::spawn(async move {
        for i in 0..40 {
            let text = format!("busy {i}");
            send_text(&mut busy, &text).await;
            assert_eq!(recv_text(&mut busy).await, text);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        busy
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    sleeper.send(Message::text("wake up")).await.unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), sleeper.next())
            .await
            .expect("an answer within 5 s")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(Message::Text(t))) => panic!("woke without a slot: {t}"),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Again, "{close:?}");
    // The connection with the slot kept being served throughout.
    let mut busy = keep_busy.await.unwrap();
    send_text(&mut busy, "after").await;
    assert_eq!(recv_text(&mut busy).await, "after");
    let text = metrics.render();
    assert!(
        text.lines()
            .any(|l| l.starts_with("wharf_plugin_failures_total{")
                && l.contains("kind=\"pool\"")
                && l.ends_with(" 1")),
        "{text}"
    );
    server.shutdown().await;
}

/// What idle connections free goes back to the OS. 200 members of a shared
/// instance (so no instance's memory comes or goes with them) each echo a
/// 60,000-byte message: host-side buffers of some 60 to 130 KiB each, kept
/// for the next message until the connection settles (idle 1 s). Freed
/// then, they would stay resident: jemalloc, the binary's allocator, gives
/// freed pages back only when the same arena allocates again, 10 s later,
/// and glibc's malloc not at all from the middle of its arenas. The heap
/// trimmer's pass after the settles must take the server back near where
/// it was before the messages.
#[tokio::test]
async fn settled_connections_give_their_buffers_back() {
    use crate::shared::{connect, tenant};
    use crate::support::OP_BINARY;

    const CONNECTIONS: usize = 200;
    let mut opts = ServerOpts::new("");
    opts.extra = tenant("echo", "echo", &["/"], "shared");
    let server = Server::start(opts);
    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        conns.push(connect(&server, "/").await);
    }
    let before = server.rss_kib();
    let message: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
    for raw in &mut conns {
        raw.send_frame(true, OP_BINARY, &message).await;
        let echo = raw.read_frame().await;
        assert!(echo.opcode == OP_BINARY && echo.payload == message);
    }
    let grown = server.rss_kib().saturating_sub(before);
    // 200 connections' buffers: at least 60,000 bytes each.
    assert!(grown >= 10 << 10, "RSS grew only {grown} KiB");
    // Settled after 1 s, trimmed at the next pass (every second at most).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        let left = server.rss_kib().saturating_sub(before);
        if left <= grown / 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "8 s after the messages, {left} KiB of the {grown} they grew are still resident"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(conns);
}
