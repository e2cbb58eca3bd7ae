//! `wharf:websocket/pubsub` through the chat example: rooms are topics, the
//! host fans each message out to the room's members.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    OP_TEXT, Server, ServerOpts, Ws, close_frame, describe, masked, recv_text, recv_timeout,
    send_text,
};

async fn join(server: &Server, room: &str, nick: &str) -> Ws {
    let mut ws = server
        .connect_path(false, &format!("/chat/{room}?nick={nick}"))
        .await;
    assert_eq!(recv_text(&mut ws).await, format!("* {nick} joined {room}"));
    ws
}

#[tokio::test]
async fn chat_rooms_are_topics_fanned_out_by_the_host() {
    let server = Server::start(ServerOpts::new("chat"));
    let mut alice = join(&server, "r1", "alice").await;
    let mut bob = join(&server, "r1", "bob").await;
    assert_eq!(recv_text(&mut alice).await, "* bob joined r1");
    let mut carol = join(&server, "r2", "carol").await;

    send_text(&mut alice, "hello").await;
    assert_eq!(recv_text(&mut alice).await, "alice: hello");
    assert_eq!(recv_text(&mut bob).await, "alice: hello");

    // Another room's traffic never reaches r1.
    send_text(&mut carol, "hi").await;
    assert_eq!(recv_text(&mut carol).await, "carol: hi");
    send_text(&mut alice, "again").await;
    assert_eq!(recv_text(&mut bob).await, "alice: again");
    assert_eq!(recv_text(&mut alice).await, "alice: again");

    send_text(&mut bob, "/nick robert").await;
    assert_eq!(recv_text(&mut alice).await, "* bob is now robert");
    assert_eq!(recv_text(&mut bob).await, "* bob is now robert");

    bob.close(None).await.expect("close");
    assert_eq!(recv_text(&mut alice).await, "* robert left");
    // Bob's subscription went with his connection: alice is alone in r1.
    send_text(&mut alice, "anyone?").await;
    assert_eq!(recv_text(&mut alice).await, "alice: anyone?");
    alice.send(Message::Close(None)).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publish_reaches_every_subscriber() {
    const MEMBERS: usize = 300;
    let server = Server::start(ServerOpts::new("chat"));
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        members.push(join(&server, "big", &format!("m{i}")).await);
    }
    send_text(&mut members[0], "fan out").await;
    for (i, ws) in members.iter_mut().enumerate() {
        // Skip the join notices of those who came later.
        loop {
            let text = recv_text(ws).await;
            if text == "m0: fan out" {
                break;
            }
            assert!(text.starts_with("* m"), "member {i} got {text:?}");
        }
    }
}

/// A member whose instance was released while idle (`hibernate_after`)
/// keeps its room and nick: the chat keeps them in the connection's
/// attachment, which the next instance reads. Its topic stays subscribed
/// meanwhile (the host keeps it), so it still hears the room.
#[tokio::test]
async fn a_hibernated_member_keeps_its_room_and_nick() {
    let server = Server::start(ServerOpts {
        plugin_limits: "hibernate_after = \"100ms\"",
        ..ServerOpts::new("chat")
    });
    let mut alice = join(&server, "r1", "alice").await;
    let mut bob = join(&server, "r1", "bob").await;
    assert_eq!(recv_text(&mut alice).await, "* bob joined r1");
    // Both idle past hibernate_after: their instances go.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_text(&mut bob, "still here").await;
    assert_eq!(recv_text(&mut alice).await, "bob: still here");
    assert_eq!(recv_text(&mut bob).await, "bob: still here");
    send_text(&mut bob, "/nick robert").await;
    assert_eq!(recv_text(&mut alice).await, "* bob is now robert");
    assert_eq!(recv_text(&mut bob).await, "* bob is now robert");
    // The new nick survives the next hibernation too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_text(&mut bob, "renamed").await;
    assert_eq!(recv_text(&mut alice).await, "robert: renamed");
    // Hibernated again when it closes: the leave notice has the nick too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.close(None).await.expect("close");
    assert_eq!(recv_text(&mut alice).await, "* robert left");
}

#[tokio::test]
async fn bad_names_are_rejected_before_the_upgrade() {
    let server = Server::start(ServerOpts::new("chat"));
    for path in ["/chat/r1?nick=a%20b", "/chat/bad%room", "/elsewhere"] {
        let mut raw = server.raw(false).await;
        raw.send(crate::support::upgrade_request(path, &[]).as_bytes())
            .await;
        let resp = raw.read_response().await;
        assert!(resp.status == 400 || resp.status == 404, "{path}: {resp:?}");
    }
}

/// `key=<number>` from a hostile "published ..." answer.
fn field(answer: &str, key: &str) -> u64 {
    answer
        .split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {answer:?}"))
}

/// The hostile plugin, its calls allowed 10 s (a nap counts as CPU time
/// once wasm runs again), with metrics.
fn hostile_server() -> Server {
    let mut opts = ServerOpts::new("hostile");
    opts.plugin_limits = "wall_time_per_event = \"10s\"\ncpu_time_per_event = \"10s\"";
    opts.extra = "[admin]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    Server::start(opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_subscriber_holds_its_byte_budget_not_every_message() {
    const MIB: u64 = 1 << 20;
    const MESSAGES: u64 = 200;
    let server = hostile_server();
    let mut a = server.connect(false).await;
    send_text(&mut a, "sub t").await;
    assert_eq!(recv_text(&mut a).await, "subscribed");
    let mut b = server.connect(false).await;
    // Warm up both paths (B's instance and buffers, A's delivery) with one
    // message A takes, so the baseline below is after their first use.
    send_text(&mut b, &format!("pub t 1 {MIB}")).await;
    assert_eq!(
        recv_text(&mut b).await,
        "published ok=1 reached=1 full=0 err=0"
    );
    match recv_timeout(&mut a, Duration::from_secs(5)).await {
        Message::Binary(data) => assert_eq!(data.len() as u64, MIB),
        other => panic!("expected the warm-up message, got {}", describe(&other)),
    }
    let before = server.rss_kib();

    // A's task is busy in a 5 s call: its mailbox is not drained meanwhile.
    send_text(&mut a, "nap 5000").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    send_text(&mut b, &format!("pub t {MESSAGES} {MIB}")).await;
    let answer = recv_text(&mut b).await;
    let publishing = started.elapsed();
    let after = server.rss_kib();
    eprintln!(
        "{answer} in {publishing:?}; server RSS {before} KiB -> {after} KiB (+{} KiB)",
        after.saturating_sub(before)
    );
    assert_eq!(field(&answer, "ok"), MESSAGES, "{answer}");
    let reached = field(&answer, "reached");
    // The default send_queue (4 MiB) holds 4 of these.
    assert!((1..=4).contains(&reached), "{answer}");
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "server RSS grew from {before} KiB to {after} KiB"
    );
    // Every missed delivery is counted...
    let missed = server
        .metric(r#"wharf_sends_refused_total{reason="mailbox-full"}"#)
        .await;
    assert_eq!(missed, (MESSAGES - reached) as f64);
    // ...and logged at most once a second.
    server
        .wait_log(
            &["missed by subscribers", "topic=t"],
            Duration::from_secs(5),
        )
        .await;
    let lines = server
        .log_lines()
        .iter()
        .filter(|l| l.contains("missed by subscribers"))
        .count() as u64;
    assert!(lines <= 1 + publishing.as_secs(), "{lines} log lines");

    // After its call, A gets what its mailbox held, whole.
    let (mut napped, mut got) = (false, 0);
    while !napped || got < reached {
        match recv_timeout(&mut a, Duration::from_secs(10)).await {
            Message::Text(t) if t.as_str() == "napped" => napped = true,
            Message::Binary(data) => {
                assert_eq!(data.len() as u64, MIB);
                got += 1;
            }
            other => panic!("unexpected {}", describe(&other)),
        }
    }
    // The stuck subscriber is still served once it drains.
    send_text(&mut b, "pub t 1 10").await;
    assert_eq!(
        recv_text(&mut b).await,
        "published ok=1 reached=1 full=0 err=0"
    );
    match recv_timeout(&mut a, Duration::from_secs(5)).await {
        Message::Binary(data) => assert_eq!(data.len(), 10),
        other => panic!("unexpected {}", describe(&other)),
    }
}

#[tokio::test]
async fn publishes_per_connection_are_capped_and_counted() {
    let server = hostile_server();
    let mut b = server.connect(false).await;
    // To a topic nobody hears: publishes count against the cap all the same.
    send_text(&mut b, "pub nobody 3000 1").await;
    let answer = recv_text(&mut b).await;
    let (ok, full) = (field(&answer, "ok"), field(&answer, "full"));
    assert_eq!(ok + full, 3000, "{answer}");
    assert_eq!(field(&answer, "reached"), 0, "{answer}");
    // The one-second burst, plus what refilled while the call ran.
    assert!((1000..2000).contains(&ok), "{answer}");
    let refused = server
        .metric(r#"wharf_sends_refused_total{reason="publish-rate"}"#)
        .await;
    assert_eq!(refused, full as f64);
    server
        .wait_log(&["per-connection rate refused"], Duration::from_secs(5))
        .await;
    // Another connection has its own allowance.
    let mut c = server.connect(false).await;
    send_text(&mut c, "pub nobody 10 1").await;
    assert_eq!(
        recv_text(&mut c).await,
        "published ok=10 reached=0 full=0 err=0"
    );
}

/// Messages published to a connection that stops being open before its
/// task reads them (here: its Close arrived with a message whose call is
/// still running) are dropped with its mailbox, and counted.
#[tokio::test]
async fn published_messages_left_in_a_closed_mailbox_are_counted() {
    let server = hostile_server();
    let mut a = server.raw_upgraded(false, "/").await;
    a.send(&masked(OP_TEXT, b"sub t")).await;
    assert_eq!(a.read_frame().await.payload, b"subscribed");
    // One write: the nap and the Close are read together, so the
    // connection is closing while the nap's call runs.
    let mut bytes = masked(OP_TEXT, b"nap 1500");
    bytes.extend(close_frame(1000, ""));
    a.send(&bytes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = server.connect(false).await;
    send_text(&mut b, "pub t 3 10").await;
    assert_eq!(
        recv_text(&mut b).await,
        "published ok=3 reached=3 full=0 err=0"
    );
    // The nap's reply comes before the Close; the published messages never.
    assert_eq!(a.read_frame().await.payload, b"napped");
    assert_eq!(a.read_close().await.0, 1000);
    a.expect_eof().await;
    let dropped = server
        .metric_reaches(
            r#"wharf_sends_refused_total{reason="closed"}"#,
            3.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(dropped, 3.0);
}
