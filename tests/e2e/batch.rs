//! Batched delivery (`packed-words-handler`, which the Rust echo plugin
//! exports, answering through `packed-words-send`; `packed-handler` and
//! `packed-send`, the `no_std` echo's): messages that arrive together reach
//! the plugin in one call, in order, whatever their kind or size, and
//! replies still precede the answer to a Close that followed them. The
//! `batch-handler` list path is the other languages' echoes' (`tests/languages`);
//! runs of texts (`text-batch-handler`) are the test plugin `text-runs`'s.

use crate::support::*;

const MASK: [u8; 4] = [1, 2, 3, 4];

/// What a burst of client frames should come back as: (opcode, payload).
fn burst() -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for i in 0..300u32 {
        let (opcode, payload) = match i % 5 {
            // Up to 200 bytes of multi-byte text: validated in 64-byte
            // blocks on the way in and on the way back.
            0 => (
                1,
                format!("text {i} ✓ {}", "Grüße κόσμε 𝄞 ".repeat(i as usize % 11)).into_bytes(),
            ),
            1 => (2, i.to_be_bytes().repeat(i as usize % 7)),
            2 => (1, Vec::new()),
            // Larger than what the host copies into a batch (16 KiB).
            3 if i % 60 == 3 => (2, vec![i as u8; 20_000]),
            _ => (2, vec![i as u8; 1000]),
        };
        wire.extend(masked(opcode, &payload));
        want.push((opcode, payload));
    }
    // A fragmented message with a ping between its fragments.
    wire.extend(frame(false, 0, 1, Some(MASK), b"frag"));
    wire.extend(frame(true, 0, 9, Some(MASK), b"ping"));
    wire.extend(frame(true, 0, 0, Some(MASK), b"mented"));
    want.push((1, b"fragmented".to_vec()));
    (wire, want)
}

async fn burst_echoes_in_order(plugin: &'static str, tls: bool) {
    let server = Server::start(ServerOpts {
        tls,
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..ServerOpts::new(plugin)
    });
    let mut raw = server.raw_upgraded(tls, "/").await;
    let (wire, want) = burst();
    raw.send(&wire).await;
    let mut pong = false;
    for (i, (opcode, payload)) in want.iter().enumerate() {
        let mut got = raw.read_frame().await;
        if got.opcode == 0xA {
            assert_eq!(got.payload, b"ping");
            pong = true;
            got = raw.read_frame().await;
        }
        assert!(got.fin, "message {i}: unfragmented echo");
        assert_eq!(got.opcode, *opcode, "message {i}");
        assert!(got.payload == *payload, "message {i}: payload differs");
    }
    if !pong {
        assert_eq!(raw.read_frame().await.opcode, 0xA);
    }
    let messages = want.len() as f64;
    assert_eq!(
        server
            .metric(r#"wharf_messages_sent_total{tenant="default",type="binary"}"#)
            .await
            + server
                .metric(r#"wharf_messages_sent_total{tenant="default",type="text"}"#)
                .await,
        messages
    );
    // on-upgrade, on-open, then far fewer calls than messages.
    let calls = server.metric("wharf_plugin_call_seconds_count").await - 2.0;
    assert!(
        calls >= 1.0 && calls <= messages / 4.0,
        "{calls} calls for {messages} messages"
    );
    // One write (so over TLS, one record) per message: the host takes the
    // records that are there together; whatever the grouping, in order.
    for (opcode, payload) in &want[..want.len() - 1] {
        raw.send(&masked(*opcode, payload)).await;
    }
    for (i, (opcode, payload)) in want[..want.len() - 1].iter().enumerate() {
        let got = raw.read_frame().await;
        assert_eq!(got.opcode, *opcode, "message {i}, sent alone");
        assert!(got.payload == *payload, "message {i}, sent alone");
    }
}

#[tokio::test]
async fn burst_echoes_in_order_ws() {
    burst_echoes_in_order("echo", false).await;
}

#[tokio::test]
async fn burst_echoes_in_order_wss() {
    burst_echoes_in_order("echo", true).await;
}

/// The same through `packed-handler`'s span records.
#[tokio::test]
async fn burst_echoes_in_order_as_span_records() {
    burst_echoes_in_order("lean_echo", false).await;
}

/// Three messages, then `last` in the same write: the three are echoed,
/// then the server's Close with `code`.
async fn replies_then_close(last: Vec<u8>, code: u16) {
    let server = Server::start(ServerOpts::new("echo"));
    let mut raw = server.raw_upgraded(false, "/").await;
    let mut wire = Vec::new();
    for text in ["one", "two", "three"] {
        wire.extend(masked(1, text.as_bytes()));
    }
    wire.extend(last);
    raw.send(&wire).await;
    for text in ["one", "two", "three"] {
        let f = raw.read_frame().await;
        assert_eq!((f.opcode, f.payload.as_slice()), (1, text.as_bytes()));
    }
    let close = raw.read_frame().await;
    assert_eq!(close.opcode, 8);
    assert_eq!(close.close_code().0, code);
}

#[tokio::test]
async fn replies_precede_the_answer_to_a_close_that_followed() {
    replies_then_close(close_frame(4321, "bye"), 4321).await;
}

#[tokio::test]
async fn replies_precede_the_close_for_a_violation_that_followed() {
    // RSV1 set without an extension: 1002.
    replies_then_close(frame(true, 4, 1, Some(MASK), b"rsv"), 1002).await;
}

#[tokio::test]
async fn goodbye_inside_a_batch_closes_after_the_replies_before_it() {
    let server = Server::start(ServerOpts::new("echo"));
    let mut raw = server.raw_upgraded(false, "/").await;
    let mut wire = Vec::new();
    for text in ["a", "b", "goodbye", "c"] {
        wire.extend(masked(1, text.as_bytes()));
    }
    raw.send(&wire).await;
    for text in ["a", "b"] {
        let f = raw.read_frame().await;
        assert_eq!((f.opcode, f.payload.as_slice()), (1, text.as_bytes()));
    }
    let close = raw.read_frame().await;
    assert_eq!(
        close.opcode,
        8,
        "{:?}",
        String::from_utf8_lossy(&close.payload)
    );
    assert_eq!(close.close_code(), (1000, "goodbye".to_owned()));
    // "c" came after the plugin started closing: its echo is refused, and
    // that is logged, not silent.
    server
        .wait_log(&["echo: connection"], std::time::Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn a_burst_resumes_a_hibernated_connection() {
    let server = Server::start(ServerOpts {
        plugin_limits: "hibernate_after = \"100ms\"",
        ..ServerOpts::new("echo")
    });
    let mut raw = server.raw_upgraded(false, "/").await;
    for round in 0..2 {
        // Idle past hibernate_after: the instance is released; the burst
        // (after the hibernated connection's small read buffer) resumes it.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let (wire, want) = burst();
        raw.send(&wire).await;
        for (i, (opcode, payload)) in want.iter().enumerate() {
            let mut got = raw.read_frame().await;
            if got.opcode == 0xA {
                got = raw.read_frame().await;
            }
            assert_eq!(got.opcode, *opcode, "round {round}, message {i}");
            assert!(got.payload == *payload, "round {round}, message {i}");
        }
    }
}

/// A plugin that takes runs of texts (`text-batch-handler`, the marked test
/// plugin `text-runs`, without `batch-handler`) gets each burst cut at its
/// runs: every message comes back in order, whatever the cut.
#[tokio::test]
async fn runs_of_texts_echo_in_order() {
    let server = Server::start(ServerOpts::new("text_runs"));
    let mut raw = server.raw_upgraded(false, "/").await;
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for i in 0..200u32 {
        let (opcode, payload) = match i % 7 {
            6 => (2, i.to_be_bytes().to_vec()),
            // Larger than what the host holds for a batch (16 KiB).
            3 if i % 70 == 3 => (1, "ü".repeat(10_000).into_bytes()),
            _ => (
                1,
                format!("run {i} ✓ {}", "κόσμε 𝄞 ".repeat(i as usize % 5)).into_bytes(),
            ),
        };
        wire.extend(masked(opcode, &payload));
        want.push((opcode, payload));
    }
    raw.send(&wire).await;
    for (i, (opcode, payload)) in want.iter().enumerate() {
        let got = raw.read_frame().await;
        assert_eq!(got.opcode, *opcode, "message {i}");
        assert!(got.payload == *payload, "message {i}: payload differs");
    }
}

/// When one call of a cut batch fails, the messages of the calls after it
/// never reach the plugin: they are counted as dropped with the instance,
/// not lost silently. What the plugin sent before it failed, in that call
/// and the ones before, goes out ahead of the 1011: a send the host
/// accepted is not taken back.
#[tokio::test]
async fn a_failed_run_counts_the_rest_of_its_batch() {
    let server = Server::start(ServerOpts {
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..ServerOpts::new("text_runs")
    });
    let mut raw = server.raw_upgraded(false, "/").await;
    // A binary alone, a run that traps at its second text, a binary alone
    // and a run of two: the last three never reach the plugin.
    let mut wire = masked(2, b"b");
    for (opcode, payload) in [(1, "t"), (1, "trap"), (2, "after"), (1, "x"), (1, "y")] {
        wire.extend(masked(opcode, payload.as_bytes()));
    }
    raw.send(&wire).await;
    for (opcode, payload) in [(2, "b"), (1, "t")] {
        let got = raw.read_frame().await;
        assert_eq!((got.opcode, &got.payload[..]), (opcode, payload.as_bytes()));
    }
    assert_eq!(raw.read_close().await.0, 1011);
    let dropped = "wharf_received_dropped_total{reason=\"instance-gone\"}";
    assert_eq!(
        server
            .metric_reaches(dropped, 3.0, std::time::Duration::from_secs(5))
            .await,
        3.0
    );
}
