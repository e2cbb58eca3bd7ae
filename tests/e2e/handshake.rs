//! The HTTP/1.1 opening handshake: what the host refuses by itself, and what
//! the request-filter plugin decides (from the request as a record) and the
//! request-probe plugin reads (from the request as a handle).

use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::shared::tenant;
use crate::support::*;

/// Sends `request` on a fresh connection and reads the response.
async fn respond(server: &Server, request: &str) -> HttpResponse {
    let mut raw = server.raw(false).await;
    raw.send(request.as_bytes()).await;
    raw.read_response().await
}

#[tokio::test]
async fn host_refuses_bad_upgrades() {
    let server = Server::start(ServerOpts::new("echo"));

    let plain = respond(&server, "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert_eq!(plain.status, 426, "plain GET: {plain:?}");
    assert_eq!(plain.header("upgrade"), Some("websocket"), "{plain:?}");

    let request =
        upgrade_request("/", &[]).replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let version = respond(&server, &request).await;
    assert_eq!(version.status, 426, "wrong version: {version:?}");
    assert_eq!(version.header("sec-websocket-version"), Some("13"));

    let request = upgrade_request("/", &[]).replace(SAMPLE_KEY, "bm90IDE2IGJ5dGVz");
    let key = respond(&server, &request).await;
    assert_eq!(key.status, 400, "bad key: {key:?}");

    let request = upgrade_request("/", &[]).replacen("GET", "POST", 1);
    let post = respond(&server, &request).await;
    assert_eq!(post.status, 405, "POST: {post:?}");
    assert_eq!(post.header("allow"), Some("GET"), "{post:?}");

    let big = "a".repeat(20 * 1024);
    let request = upgrade_request("/", &[("X-Padding", &big)]);
    let too_big = respond(&server, &request).await;
    assert_eq!(too_big.status, 431, "20 KiB of headers: {too_big:?}");

    // None of that hurt the server.
    let mut ws = server.connect(false).await;
    send_text(&mut ws, "ok").await;
    assert_eq!(recv_text(&mut ws).await, "ok");
}

#[tokio::test]
async fn request_filter_plugin() {
    // The plugin checks origins itself: the host's own rule lets every
    // origin through to it.
    let mut opts = ServerOpts::new("request_filter");
    opts.plugin_limits = "allowed_origins = [\"*\"]";
    let server = Server::start(opts);
    let origin = ("Origin", "http://localhost:8080");

    let wrong_path = respond(&server, &upgrade_request("/nope", &[origin])).await;
    assert_eq!(wrong_path.status, 404, "{wrong_path:?}");
    assert!(
        wrong_path.body.contains("no WebSocket endpoint"),
        "{wrong_path:?}"
    );

    let bad_origin = respond(
        &server,
        &upgrade_request("/ws", &[("Origin", "http://evil.example")]),
    )
    .await;
    assert_eq!(bad_origin.status, 403, "{bad_origin:?}");
    assert!(
        bad_origin.body.contains("origin not allowed"),
        "{bad_origin:?}"
    );

    let no_origin = respond(&server, &upgrade_request("/ws", &[])).await;
    assert_eq!(no_origin.status, 403, "{no_origin:?}");

    // Good path and origin, offering "chat" (among others): accepted, "chat" chosen.
    let mut req = format!("{}/ws", server.url(false))
        .into_client_request()
        .unwrap();
    let headers = req.headers_mut();
    headers.insert("Origin", HeaderValue::from_static(origin.1));
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("superchat, chat"),
    );
    let (mut ws, resp) = server
        .connect_request(false, req)
        .await
        .expect("accepted upgrade");
    assert_eq!(resp.status(), 101);
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("chat")
    );
    send_text(&mut ws, "filtered echo").await;
    assert_eq!(recv_text(&mut ws).await, "filtered echo");

    // Without an offer, no subprotocol is chosen.
    let mut raw = server.raw(false).await;
    raw.send(upgrade_request("/ws", &[origin]).as_bytes()).await;
    let resp = raw.read_response().await;
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("sec-websocket-protocol"), None, "{resp:?}");
}

/// A plugin exporting `request-handler` answers every upgrade in
/// `on-request` (its `on-upgrade` would refuse with 500) and reads each
/// field of the request through the handle: over ws and wss, with an
/// instance per connection and with a shared one.
#[tokio::test]
async fn request_handler_reads_the_request_through_a_handle() {
    let mut opts = ServerOpts::new("");
    opts.tls = true;
    opts.extra = tenant("own", "request_probe", &["/probe"], "per-connection")
        + &tenant("one", "request_probe", &["/shared"], "shared");
    let server = Server::start(opts);
    for (tls, path) in [(false, "/probe"), (true, "/probe"), (false, "/shared")] {
        let mut raw = server.raw(tls).await;
        let request = upgrade_request(
            &format!("{path}?a=1&b"),
            &[
                ("x-probe", "seen"),
                ("Sec-WebSocket-Protocol", "superchat, chat"),
            ],
        );
        raw.send(request.as_bytes()).await;
        let resp = raw.read_response().await;
        assert_eq!(resp.status, 101, "{path}, tls {tls}: {resp:?}");
        let frame = raw.read_frame().await;
        assert_eq!(frame.opcode, OP_TEXT, "{path}, tls {tls}");
        let report = String::from_utf8(frame.payload).unwrap();
        let lines: Vec<&str> = report.lines().collect();
        let path_line = format!("path={path}");
        let expected = [
            "method=GET",
            &path_line,
            "query=a=1&b",
            "x-probe=seen",
            "absent=None",
            // Host, Upgrade, Connection, the key, the version, the two above.
            "headers=7",
            "first=Host",
            "subprotocols=superchat,chat",
        ];
        assert_eq!(lines[..expected.len()], expected, "tls {tls}: {report}");
        let remote = lines.iter().find_map(|l| l.strip_prefix("remote="));
        assert!(
            remote.is_some_and(|r| r.starts_with("127.0.0.1:")),
            "{report}"
        );
        let tls_line = format!("tls={tls}");
        assert_eq!(lines.last(), Some(&tls_line.as_str()), "{report}");
        // An open connection like any other.
        raw.send_frame(true, OP_TEXT, b"after the probe").await;
        assert_eq!(raw.read_frame().await.payload, b"after the probe");
    }

    // A refusal from `on-request`: its status and body.
    let refused = respond(
        &server,
        &upgrade_request("/probe", &[("X-Reject", "teapot")]),
    )
    .await;
    assert_eq!(refused.status, 418, "{refused:?}");
    assert_eq!(refused.body, "teapot", "{refused:?}");

    // Each request lent to the shared instance is taken back out of its
    // table after the call: were they kept, its 1,024 handles would be gone
    // before these upgrades are.
    for i in 0..1_100 {
        let mut raw = server.raw(false).await;
        raw.send(upgrade_request("/shared", &[]).as_bytes()).await;
        let resp = raw.read_response().await;
        assert_eq!(resp.status, 101, "upgrade {i}: {resp:?}");
        assert_eq!(raw.read_frame().await.opcode, OP_TEXT, "upgrade {i}");
    }
}

/// A client that never finishes its request is answered 408 and dropped.
#[tokio::test]
async fn slow_request_times_out_with_408() {
    let server = Server::start(ServerOpts {
        server: r#"handshake_timeout = "300ms""#,
        ..ServerOpts::new("echo")
    });
    let mut raw = server.raw(false).await;
    let started = Instant::now();
    raw.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    let resp = raw.read_response().await;
    assert_eq!(resp.status, 408, "{resp:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "408 after {waited:?}"
    );
}

/// Past `max_connections`, upgrades get 503; a slot frees when a connection ends.
#[tokio::test]
async fn over_capacity_is_503() {
    let server = Server::start(ServerOpts {
        server: "max_connections = 1",
        ..ServerOpts::new("echo")
    });
    let mut first = server.connect(false).await;
    send_text(&mut first, "one").await;
    assert_eq!(recv_text(&mut first).await, "one");

    let busy = respond(&server, &upgrade_request("/", &[])).await;
    assert_eq!(busy.status, 503, "{busy:?}");

    send_text(&mut first, "goodbye").await;
    assert_eq!(recv_close(&mut first).await.0, 1000);
    drop(first);
    // The slot is released once the server has finished with the connection.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut raw = server.raw(false).await;
        raw.send(upgrade_request("/", &[]).as_bytes()).await;
        let status = raw.read_response().await.status;
        if status == 101 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sockets that connect and never speak cannot take every file descriptor:
/// past `server.max_pending_handshakes` the oldest is dropped, so with a
/// descriptor limit of 128 and 300 silent sockets a real client still gets
/// its 101 within a second (before the cap, `accept` failed with EMFILE
/// and the client waited in the backlog until a silent socket timed out).
#[tokio::test]
async fn silent_sockets_cannot_starve_a_real_client() {
    let server = Server::start(ServerOpts {
        server: "max_pending_handshakes = 50\nhandshake_timeout = \"30s\"",
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        max_open_files: Some(128),
        ..ServerOpts::new("echo")
    });
    let mut silent = Vec::new();
    // 300: within the test process's own descriptor limit (1024 on many
    // machines) alongside the tests running beside it.
    for _ in 0..300 {
        if let Ok(s) = tokio::net::TcpStream::connect(server.ws_addr).await {
            silent.push(s);
        }
    }
    // Let the server accept (and evict) them all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut ws = tokio::time::timeout(Duration::from_secs(1), server.connect(false))
        .await
        .expect("a real client is answered within a second");
    send_text(&mut ws, "still served").await;
    assert_eq!(recv_text(&mut ws).await, "still served");
    assert!(started.elapsed() < Duration::from_secs(1));
    let metrics = server.metrics().await;
    let pending: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wharf_handshakes_pending "))
        .and_then(|v| v.parse().ok())
        .expect("the pending gauge");
    assert!(pending <= 50.0, "{pending} pending");
    let evicted: f64 = metrics
        .lines()
        .find(|l| l.starts_with("wharf_handshake_failures_total{") && l.contains("evicted"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0.0);
    assert!(evicted >= 200.0, "{evicted} evicted\n{metrics}");
    drop(silent);
}

/// Static files are streamed, and at most `max_concurrent` are in flight:
/// 300 clients ask for an 8 MiB file and never read it; those over the cap
/// get 503 and the server's memory does not grow with them (read whole,
/// the files in flight alone would hold 400 MiB).
#[tokio::test]
async fn static_files_are_capped_and_streamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big.bin"), vec![7u8; 8 << 20]).unwrap();
    let server = Server::start(ServerOpts {
        extra: format!(
            "[static_files]\ndir = {:?}\nmax_file_size = \"16MiB\"\nmax_concurrent = 50\n",
            dir.path().display().to_string()
        ),
        server: "max_pending_per_address = 0",
        ..ServerOpts::new("echo")
    });
    let before = server.rss_kib();
    let mut clients = Vec::new();
    // 300 from one address: past the default per-address cap on pending
    // handshakes (256), which this test is not about.
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(server.ws_addr)
            .await
            .unwrap();
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        clients.push(s);
    }
    let (mut ok, mut busy) = (0, 0);
    for s in &mut clients {
        let mut head = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head))
            .await
            .expect("a status line within 5 s")
            .unwrap();
        match &head[9..12] {
            b"200" => ok += 1,
            b"503" => busy += 1,
            other => panic!("status {}", String::from_utf8_lossy(other)),
        }
    }
    let grown = server.rss_kib().saturating_sub(before);
    assert_eq!((ok, busy), (50, 250));
    assert!(grown < 64 * 1024, "RSS grew {grown} KiB");
    drop(clients);
}

/// Status of an upgrade request sent from `source` (another loopback
/// address than the tests' 127.0.0.1), and the socket, kept open; status 0
/// if the server closed the socket without a response.
async fn upgrade_from(server: &Server, source: &str) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(server.ws_addr).await.unwrap();
    if stream
        .write_all(upgrade_request("/", &[]).as_bytes())
        .await
        .is_err()
    {
        return (0, stream);
    }
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("answered in time");
        if !matches!(n, Ok(1)) {
            return (0, stream);
        }
        head.push(byte[0]);
    }
    let status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (status, stream)
}

/// One client address cannot hold every handshake place or every
/// connection: past `max_pending_per_address` its new sockets are closed at
/// once, past `max_connections_per_address` its upgrades get 503, and
/// another address is served meanwhile.
#[tokio::test]
async fn one_address_is_capped_and_the_others_are_served() {
    use tokio::io::AsyncReadExt;
    let server = Server::start(ServerOpts {
        server: "max_pending_per_address = 5\nmax_connections_per_address = 2\n\
                 handshake_timeout = \"30s\"",
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..ServerOpts::new("echo")
    });
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(
            tokio::net::TcpStream::connect(server.ws_addr)
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sixth = tokio::net::TcpStream::connect(server.ws_addr)
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(2), sixth.read(&mut [0u8; 16]))
        .await
        .expect("the sixth silent socket is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let (status, _other) = upgrade_from(&server, "127.0.0.2").await;
    assert_eq!(status, 101, "another address is served");

    drop(silent);
    // The silent sockets' places come back once the server sees them go.
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let (status, stream) = upgrade_from(&server, "127.0.0.1").await;
        if status == 101 {
            break stream;
        }
        assert!(Instant::now() < deadline, "places never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, _second) = upgrade_from(&server, "127.0.0.1").await;
    assert_eq!(status, 101);
    let (status, _) = upgrade_from(&server, "127.0.0.1").await;
    assert_eq!(status, 503, "a third open connection from one address");
    let (status, _) = upgrade_from(&server, "127.0.0.2").await;
    assert_eq!(status, 101, "another address is still served");
    drop(first);
    let metrics = server.metrics().await;
    for reason in ["address-pending", "address-capacity"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("wharf_handshake_failures_total{")
                    && l.contains(reason)
                    && !l.ends_with(" 0")),
            "{reason} counted\n{metrics}"
        );
    }
}
