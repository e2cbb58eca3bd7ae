//! The default configuration holds 10,000 concurrent connections, each with
//! its own plugin instance (the pool and the per-instance memory reservation
//! are sized for it).

use std::time::Duration;

use crate::support::{Server, ServerOpts};

const CONNECTIONS: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_connections_with_default_config() {
    // The test process needs a socket per connection too.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    let server = Server::start(ServerOpts::new("echo"));
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let mut raw = server.raw_upgraded(false, "/").await;
        // One round trip each: the instance has really run.
        raw.send_frame(true, 0x1, format!("c{i}").as_bytes()).await;
        let frame = raw.read_frame().await;
        assert_eq!(frame.payload, format!("c{i}").as_bytes(), "connection {i}");
        clients.push(raw);
    }
    // All of them are still served, first to last.
    for (i, raw) in clients.iter_mut().enumerate().step_by(997) {
        raw.send_frame(true, 0x1, b"still here").await;
        let frame = raw.read_frame_timeout(Duration::from_secs(5)).await;
        assert_eq!(frame.payload, b"still here", "connection {i}");
    }
    assert!(
        server.log_line(&["ERROR"]).is_none(),
        "errors in the server log:\n{}",
        server.log_text()
    );
}
