//! The process and connection life cycle: `wharf check`, graceful shutdown,
//! keep-alive pings, the idle timeout, and the lifecycle calls a handler
//! declines (`lifecycle`).

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

/// CPU ticks (user and system) each thread of `pid` has used, by thread
/// id, with its name.
fn thread_ticks(pid: u32) -> std::collections::HashMap<String, (String, u64)> {
    let mut ticks = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // The name is in parentheses and may hold spaces: count fields after it.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_string();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let used = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks.insert(
            task.file_name().to_string_lossy().into_owned(),
            (name, used),
        );
    }
    ticks
}

/// `scheduling = "per-core"`: each worker accepts on each listener's
/// address (ws and wss) with a socket of its own and serves what it
/// accepted; both serve, and a SIGTERM still closes every connection with
/// 1001 and ends the process.
#[tokio::test]
async fn per_core_workers_each_serve_and_shut_down() {
    let mut server = Server::start(ServerOpts {
        tls: true,
        server: "scheduling = \"per-core\"\nshutdown_timeout = \"3s\"",
        workers: Some(2),
        ..ServerOpts::new("echo")
    });
    let before = thread_ticks(server.pid());
    // One worker's thread is the process's main thread (named as the
    // process), the other `wharf-worker`.
    let workers: Vec<String> = before
        .iter()
        .filter(|(tid, (name, _))| name == "wharf-worker" || **tid == server.pid().to_string())
        .map(|(tid, _)| tid.clone())
        .collect();
    assert_eq!(workers.len(), 2, "{before:?}");
    // 40 connections, half over TLS: the kernel spreads each listener's
    // over its two sockets by their ports (all on one worker: a chance of
    // 2^-39).
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(server.connect(i % 2 == 1).await);
    }
    let echoes = clients.into_iter().enumerate().map(|(i, mut ws)| {
        tokio::spawn(async move {
            for n in 0..600 {
                let text = format!("{i}:{n}");
                send_text(&mut ws, &text).await;
                assert_eq!(recv_text(&mut ws).await, text);
            }
            ws
        })
    });
    let mut clients = Vec::new();
    for echo in echoes {
        clients.push(echo.await.unwrap());
    }
    let after = thread_ticks(server.pid());
    for tid in &workers {
        let used = after[tid].1 - before[tid].1;
        assert!(
            used > 0,
            "worker {tid} served nothing: {before:?} -> {after:?}"
        );
    }

    server.sigterm();
    for ws in &mut clients {
        assert_eq!(recv_close(ws).await.0, 1001);
    }
    drop(clients);
    let status = server
        .wait_exit(Duration::from_secs(4))
        .await
        .expect("wharf still running after the shutdown timeout");
    assert!(status.success(), "exit status {status:?}");
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

/// A tenant of the lifecycle-probe plugin (which traps in any call it
/// declined) wanting `wanted`.
fn probe_tenant(name: &str, mode: &str, wanted: &str) -> String {
    format!(
        "[[tenant]]\nname = {name:?}\nplugin = {:?}\nroutes = [\"/{name}\"]\ninstance = {mode:?}\nsettings = {{ wanted = {wanted:?} }}\n",
        plugin_path("lifecycle_probe").display().to_string()
    )
}

/// The handler's answer to `lifecycle#wanted` is what the host calls: a
/// declined `on-upgrade` (the upgrade taken as it is), `on-open` or
/// `on-close` is never made (the plugin would trap), a wanted one is, the
/// question is asked once per version, and a `wanted` that traps fails the
/// upgrade with 500 and is counted.
#[tokio::test]
async fn declined_lifecycle_calls_are_not_made() {
    let mut opts = ServerOpts::new("");
    opts.tls = true;
    opts.extra = [
        probe_tenant("none", "per-connection", ""),
        probe_tenant("shared", "shared", ""),
        probe_tenant("some", "per-connection", "open"),
        probe_tenant("all", "per-connection", "upgrade,open,close"),
        probe_tenant("broken", "per-connection", "trap"),
    ]
    .concat()
        + "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(opts);
    let open = async |tls: bool, path: &str| {
        let mut raw = server.raw(tls).await;
        let offer = ("Sec-WebSocket-Protocol", "chat");
        raw.send(upgrade_request(path, &[offer]).as_bytes()).await;
        let resp = raw.read_response().await;
        assert_eq!(resp.status, 101, "{path}: {resp:?}");
        // Declined, the upgrade is accepted with no subprotocol.
        assert_eq!(resp.header("sec-websocket-protocol"), None, "{resp:?}");
        (raw, resp.header("x-on-upgrade").map(str::to_owned))
    };
    let ask = async |raw: &mut RawClient, text: &str| {
        raw.send_frame(true, OP_TEXT, text.as_bytes()).await;
        String::from_utf8(raw.read_frame().await.payload).unwrap()
    };
    let close = async |mut raw: RawClient| {
        raw.send(&close_frame(1000, "")).await;
        assert_eq!(raw.read_close().await.0, 1000);
        raw.expect_eof().await;
    };

    // None wanted, per connection, over ws and wss: the first instance was
    // asked, later ones are not.
    for (i, tls) in [false, true, false].into_iter().enumerate() {
        let (mut raw, upgrade) = open(tls, "/none").await;
        assert_eq!(upgrade, None);
        assert_eq!(ask(&mut raw, "echo me").await, "echo me");
        let asked = if i == 0 { "1" } else { "0" };
        assert_eq!(ask(&mut raw, "asked").await, asked, "connection {i}");
        close(raw).await;
    }
    // None wanted, one shared instance, asked once for both connections.
    let (mut a, _) = open(false, "/shared").await;
    let (mut b, _) = open(false, "/shared").await;
    assert_eq!(ask(&mut a, "asked").await, "1");
    assert_eq!(ask(&mut b, "asked").await, "1");
    close(a).await;
    assert_eq!(ask(&mut b, "still here").await, "still here");
    close(b).await;

    // Only on-open wanted: it is the first thing the connection gets.
    let (mut raw, upgrade) = open(false, "/some").await;
    assert_eq!(upgrade, None);
    assert_eq!(raw.read_frame().await.payload, b"opened");
    assert_eq!(ask(&mut raw, "x").await, "x");
    close(raw).await;

    // All wanted: on-upgrade's header, on-open's text, on-close's publish
    // (seen by another connection of the tenant).
    let (mut watcher, upgrade) = open(false, "/all").await;
    assert_eq!(upgrade.as_deref(), Some("called"));
    assert_eq!(watcher.read_frame().await.payload, b"opened");
    assert_eq!(ask(&mut watcher, "watch").await, "watching");
    let (mut raw, _) = open(true, "/all").await;
    assert_eq!(raw.read_frame().await.payload, b"opened");
    close(raw).await;
    assert_eq!(watcher.read_frame().await.payload, b"closed 1000");

    // A `wanted` that traps: 500, counted, and asked again next time.
    for _ in 0..2 {
        let mut raw = server.raw(false).await;
        raw.send(upgrade_request("/broken", &[]).as_bytes()).await;
        assert_eq!(raw.read_response().await.status, 500);
    }
    assert_eq!(
        server
            .metric("wharf_plugin_failures_total{tenant=\"broken\",kind=\"trap\"}")
            .await,
        2.0
    );
    // A declined call made anyway would have trapped: none did. (Each
    // connection's last call ran before its socket closed; the settle is
    // for the failure's count, made just after.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let metrics = server.metrics().await;
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("wharf_plugin_failures_total{") && !l.contains("broken"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        server.log_line(&["called although declined"]).is_none(),
        "{}",
        server.log_text()
    );
}
