//! `/metrics` counts what a connection did by the time its client sees the
//! replies (connections gather counts locally and add them in bulk).

use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

#[tokio::test]
async fn messages_and_calls_are_counted_before_the_replies_arrive() {
    let server = Server::start(ServerOpts {
        extra: "[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
        ..ServerOpts::new("echo")
    });
    let mut ws = server.connect(false).await;
    for text in ["one", "two", "three"] {
        send_text(&mut ws, text).await;
        assert_eq!(recv_text(&mut ws).await, text);
    }
    for size in [1000, 24] {
        send(&mut ws, Message::binary(vec![1u8; size])).await;
        assert!(matches!(recv(&mut ws).await, Message::Binary(b) if b.len() == size));
    }

    let m = server.metrics().await;
    for (series, value) in [
        (
            r#"wharf_messages_received_total{tenant="default",type="text"}"#,
            3.0,
        ),
        (
            r#"wharf_messages_received_total{tenant="default",type="binary"}"#,
            2.0,
        ),
        (
            r#"wharf_messages_sent_total{tenant="default",type="text"}"#,
            3.0,
        ),
        (
            r#"wharf_messages_sent_total{tenant="default",type="binary"}"#,
            2.0,
        ),
        (r#"wharf_received_bytes_total{tenant="default"}"#, 1035.0),
        (r#"wharf_sent_bytes_total{tenant="default"}"#, 1035.0),
        // One call per message: the bundled echo declines on-upgrade,
        // on-open and on-close (`lifecycle`).
        ("wharf_plugin_call_seconds_count", 5.0),
        (r#"wharf_plugin_call_seconds_bucket{le="+Inf"}"#, 5.0),
        // Pool slots decommitted (the default): nothing to be exposed.
        ("wharf_memory_reset_exposed", 0.0),
    ] {
        let got = m
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{m}"));
        assert_eq!(got.parse::<f64>().unwrap(), value, "{series} in:\n{m}");
    }

    ws.close(None).await.unwrap();
    assert_eq!(recv_close(&mut ws).await.0, 1005);
    // The close is counted once the connection ends, with no call.
    let closed = r#"wharf_websocket_closed_total{code="1005",clean="true"}"#;
    let mut m = String::new();
    for _ in 0..100 {
        m = server.metrics().await;
        if m.contains(closed) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(m.contains(&format!("{closed} 1\n")), "{m}");
    assert!(m.contains("wharf_plugin_call_seconds_count 5\n"), "{m}");
}
