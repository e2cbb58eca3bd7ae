//! Hibernation: an idle connection's instance is released and a fresh one
//! takes the next event, getting its state back from the attachment.

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
