//! The chaos plugin: a plugin that traps, spins or eats memory loses its own
//! connection (1011) and nothing else.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn chaos_server() -> Server {
    Server::start(ServerOpts {
        plugin_limits: "cpu_time_per_event = \"100ms\"\nmemory_limit = \"16MiB\"",
        ..ServerOpts::new("chaos")
    })
}

/// Sends `text` on `ws` and times the echo.
async fn round_trip(ws: &mut Ws, text: &str) -> Duration {
    let started = Instant::now();
    send_text(ws, text).await;
    assert_eq!(recv_text(ws).await, text);
    started.elapsed()
}

#[tokio::test]
async fn trap_closes_only_its_connection() {
    let server = chaos_server();
    let mut bystander = server.connect(false).await;
    round_trip(&mut bystander, "before").await;

    let mut victim = server.connect(false).await;
    send_text(&mut victim, "trap").await;
    assert_eq!(recv_close(&mut victim).await.0, 1011);

    round_trip(&mut bystander, "after the trap").await;
    let line = server
        .wait_log(
            &["ERROR", "tenant=default", "err=trapped"],
            Duration::from_secs(2),
        )
        .await;
    assert!(line.contains("plugin failed"), "{line}");
}

#[tokio::test]
async fn endless_loop_is_interrupted_and_does_not_stall_others() {
    let server = chaos_server();
    let mut bystander = server.connect(false).await;
    round_trip(&mut bystander, "warm-up").await;

    let mut looper = server.connect(false).await;
    let started = Instant::now();
    send_text(&mut looper, "loop").await;
    // Let the loop get going (the server has ~100 ms before it interrupts it).
    tokio::time::sleep(Duration::from_millis(15)).await;
    let during = round_trip(&mut bystander, "during the loop").await;
    let closed = recv_timeout(&mut looper, Duration::from_secs(2)).await;
    let interrupted = started.elapsed();
    match closed {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1011),
        other => panic!("expected Close 1011, got {}", describe(&other)),
    }
    assert!(
        interrupted < Duration::from_secs(1),
        "loop interrupted only after {interrupted:?}"
    );
    assert!(
        during < Duration::from_millis(90),
        "another connection's echo took {during:?} while a plugin looped"
    );

    round_trip(&mut bystander, "after the loop").await;
    server
        .wait_log(
            &["ERROR", "tenant=default", "err=exceeded its CPU time"],
            Duration::from_secs(2),
        )
        .await;
}

#[tokio::test]
async fn memory_hog_is_stopped() {
    let server = chaos_server();
    let mut bystander = server.connect(false).await;
    let mut hog = server.connect(false).await;
    send_text(&mut hog, "alloc").await;
    assert_eq!(recv_close(&mut hog).await.0, 1011);
    round_trip(&mut bystander, "after the hog").await;
    server
        .wait_log(
            &["ERROR", "tenant=default", "err=exceeded its memory limit"],
            Duration::from_secs(2),
        )
        .await;
}

#[tokio::test]
async fn trap_in_on_upgrade_is_500() {
    let server = chaos_server();
    let mut raw = server.raw(false).await;
    raw.send(upgrade_request("/reject-trap", &[]).as_bytes())
        .await;
    let resp = raw.read_response().await;
    assert_eq!(resp.status, 500, "{resp:?}");
    server
        .wait_log(
            &["ERROR", "tenant=default", "failed in on-upgrade", "trapped"],
            Duration::from_secs(2),
        )
        .await;
}

/// The number right after `name` in a plugin's report (`ok=12 full=3`).
fn count_after(line: &str, name: &str) -> usize {
    let at = line.find(name).unwrap() + name.len();
    let digits: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().unwrap()
}

/// The plugin sends far more than the send queue holds: the overflow is
/// refused (`queue-full`) instead of buffered, and every send the plugin was
/// told succeeded arrives, complete and in order. (The plugin's outbox and
/// the protocol's queue apply one high-water rule, `wharf_protocol::queue_full`,
/// to the same framed bytes, so a send admitted by one is never refused by
/// the other.)
#[tokio::test]
async fn flood_is_bounded_by_the_send_queue() {
    const N: usize = 100_000;
    let server = Server::start(ServerOpts {
        websocket: r#"send_queue = "64KiB""#,
        ..ServerOpts::new("chaos")
    });
    let mut ws = server.connect(false).await;
    send_text(&mut ws, &format!("flood {N}")).await;

    // The plugin's report in the log means the flood call has returned:
    // everything it will ever send is queued by now.
    let line = server
        .wait_log(&["stderr:", "flooded ok="], Duration::from_secs(3))
        .await;
    let field = |name: &str| count_after(&line, name);
    // Read until the server has nothing more to say (500 ms of silence).
    let mut received = 0;
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
        match next {
            Some(Ok(Message::Text(t))) if t.starts_with("flooded ok=") => {}
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), format!("m{received}"), "gap or reorder");
                received += 1;
            }
            other => panic!("unexpected {other:?} after {received} messages"),
        }
    }
    // The connection still works.
    send_text(&mut ws, "done").await;
    assert_eq!(recv_text(&mut ws).await, "done");

    let (ok, full) = (field("ok="), field("full="));
    assert!(full > 0, "the queue never filled: {line}");
    assert_eq!(ok + full, N, "{line}");
    assert!(received > 0 && received < N, "received {received}");
    assert_eq!(
        received, ok,
        "the plugin was told {ok} sends succeeded but {received} arrived"
    );
}

/// Message `i` of the chaos plugin's batches: text "b<i>" or binary [1]
/// (`texts`: always text).
async fn expect_batched(ws: &mut Ws, i: usize, texts: bool) {
    let want = if texts || i.is_multiple_of(2) {
        Message::Text(format!("b{i}").into())
    } else {
        Message::Binary(vec![1].into())
    };
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(
        matches!(&got, Ok(Some(Ok(m))) if *m == want),
        "message {i}: {got:?}"
    );
}

/// `batch-send`, `packed-send`, `packed-words-send` and `text-batch-send`
/// (`command` "batch", "packed", "words" or "texts"): one call
/// queues many messages, in order, each framed as its own send; the call
/// stops at the first message refused and says how many went, and exactly
/// those arrive (the same queue bound and message limit as single sends).
async fn batch_queues_in_order_and_stops_at_a_refusal(command: &str) {
    let server = Server::start(ServerOpts {
        websocket: "send_queue = \"64KiB\"\nmax_message_size = \"1KiB\"",
        ..ServerOpts::new("chaos")
    });
    let texts = command == "texts";
    let mut ws = server.connect(false).await;
    send_text(&mut ws, &format!("{command} 5")).await;
    for i in 0..5 {
        expect_batched(&mut ws, i, texts).await;
    }
    assert_eq!(recv_text(&mut ws).await, "batched all");

    // Message 1 is over max_message_size: message 0 goes, nothing after it.
    send_text(&mut ws, &format!("{command}-big 1025")).await;
    expect_batched(&mut ws, 0, texts).await;
    assert_eq!(
        recv_text(&mut ws).await,
        "batched queued=1 error=message-too-big"
    );

    // Far more than the send queue holds: the count the plugin is given
    // is what arrives.
    send_text(&mut ws, &format!("{command} 100000")).await;
    let line = server
        .wait_log(
            &["stderr:", "batched queued=", "error=queue-full"],
            Duration::from_secs(3),
        )
        .await;
    let queued = count_after(&line, "queued=");
    assert!(queued > 0 && queued < 100_000, "{line}");
    for i in 0..queued {
        expect_batched(&mut ws, i, texts).await;
    }
    // Then at most the report (if the queue had room for it), and the
    // connection still works.
    send_text(&mut ws, "done").await;
    let mut next = recv_text(&mut ws).await;
    if next.starts_with("batched queued=") {
        next = recv_text(&mut ws).await;
    }
    assert_eq!(next, "done");
}

#[tokio::test]
async fn batch_send_queues_in_order_and_stops_at_a_refusal() {
    batch_queues_in_order_and_stops_at_a_refusal("batch").await;
}

#[tokio::test]
async fn packed_send_queues_in_order_and_stops_at_a_refusal() {
    batch_queues_in_order_and_stops_at_a_refusal("packed").await;
}

#[tokio::test]
async fn packed_words_send_queues_in_order_and_stops_at_a_refusal() {
    batch_queues_in_order_and_stops_at_a_refusal("words").await;
}

#[tokio::test]
async fn text_batch_send_queues_in_order_and_stops_at_a_refusal() {
    batch_queues_in_order_and_stops_at_a_refusal("texts").await;
}

/// A batched send the plugin got wrong (`command` with each case's `how`)
/// traps: its connection closes with 1011 and the failure (`why`) is
/// logged. The messages before the bad one (`before`, as `kind` makes
/// them) may have been queued: what arrives ahead of the Close is a prefix
/// of them, since a send the host accepted goes out even when the call
/// then fails.
async fn malformed_send_traps(
    command: &str,
    cases: [(&str, &str, &[&str]); 3],
    kind: fn(&str) -> Message,
) {
    let server = Server::start(ServerOpts::new("chaos"));
    for (how, why, before) in cases {
        let mut ws = server.connect(false).await;
        send_text(&mut ws, &format!("{command} {how}")).await;
        let mut queued = before.iter().map(|m| kind(m));
        loop {
            match recv(&mut ws).await {
                Message::Close(Some(f)) => {
                    assert_eq!(u16::from(f.code), 1011, "{how}");
                    break;
                }
                got => assert_eq!(Some(got), queued.next(), "{how}"),
            }
        }
        server.wait_log(&[why], Duration::from_secs(5)).await;
    }
    assert!(!server.log_text().contains("was not refused"));
}

/// `text-batch-send` with lengths that do not cut its string into texts
/// (past its end, short of it, inside a character).
#[tokio::test]
async fn malformed_text_batch_lengths_trap() {
    let cases: [(&str, &str, &[&str]); 3] = [
        ("past", "length 1 runs past the end of the texts", &["ok"]),
        (
            "unused",
            "the lengths leave 1 bytes of the texts unused",
            &["ok", "1"],
        ),
        ("split", "length 1 ends inside a character", &["ok"]),
    ];
    malformed_send_traps("texts-bad", cases, |m| Message::Text(m.into())).await;
}

/// `packed-send` and `packed-words-send` with spans that do not describe
/// their payloads (past their end, short of it, text that is not UTF-8).
#[tokio::test]
async fn malformed_packed_spans_trap() {
    malformed_spans_trap("packed-bad").await;
    malformed_spans_trap("words-bad").await;
}

async fn malformed_spans_trap(command: &str) {
    let cases: [(&str, &str, &[&str]); 3] = [
        ("past", "span 1 runs past the end of the payloads", &["ok"]),
        (
            "unused",
            "the spans leave 1 bytes of the payloads unused",
            &["ok", "1"],
        ),
        ("utf8", "span 1 is text but not valid UTF-8", &["ok"]),
    ];
    malformed_send_traps(command, cases, |m| {
        Message::Binary(m.as_bytes().to_vec().into())
    })
    .await;
}

/// A large send goes to the socket during the call, and what the socket
/// does not take waits in the outbox: when the call then traps, the rest
/// of that frame still goes out ahead of the 1011 (the frame is begun on
/// the wire; a Close in its middle would corrupt the stream).
#[tokio::test]
async fn a_trap_after_a_large_send_finishes_its_frame_first() {
    let server = chaos_server();
    let mut raw = server.raw_upgraded(false, "/").await;
    // More than loopback's socket buffers hold while nobody reads.
    let size = 12 << 20;
    raw.send(&masked(0x1, format!("big-trap {size}").as_bytes()))
        .await;
    server
        .wait_log(&["trapping after a large send"], Duration::from_secs(10))
        .await;
    let frame = raw.read_frame().await;
    assert_eq!((frame.opcode, frame.payload.len()), (0x2, size));
    assert!(frame.payload.iter().all(|b| *b == 7));
    assert_eq!(raw.read_close().await.0, 1011);
}

/// Messages that arrive after the connection's instance failed (here in
/// the same read as the one that trapped it) are dropped and counted, not
/// lost silently.
#[tokio::test]
async fn messages_after_a_trap_are_counted() {
    let server = Server::start(ServerOpts {
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..ServerOpts::new("chaos")
    });
    let mut raw = server.raw_upgraded(false, "/").await;
    let mut wire = masked(0x1, b"trap");
    wire.extend(masked(0x1, b"after 1"));
    wire.extend(masked(0x1, b"after 2"));
    raw.send(&wire).await;
    assert_eq!(raw.read_close().await.0, 1011);
    let series = "wharf_received_dropped_total{reason=\"instance-gone\"} 2";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = server.metrics().await;
        if metrics.contains(series) {
            break;
        }
        assert!(Instant::now() < deadline, "{series} not in\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
