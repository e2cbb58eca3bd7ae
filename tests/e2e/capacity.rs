//! The default configuration holds 10,000 concurrent connections, each with
//! its own plugin instance (the pool and the per-instance memory reservation
//! are sized for it); a shared instance holds more connections than the
//! host resources one instance may make itself.

use std::time::Duration;

use crate::support::{RawClient, Server, ServerOpts};

const CONNECTIONS: usize = 10_000;

/// `n` more connections, each with one round trip (`tag` and its index),
/// so that its instance has really run.
async fn open_echoing(server: &Server, clients: &mut Vec<RawClient>, n: usize, tag: &str) {
    for i in 0..n {
        let mut raw = server.raw_upgraded(false, "/").await;
        let text = format!("{tag}{i}");
        raw.send_frame(true, 0x1, text.as_bytes()).await;
        let frame = raw.read_frame().await;
        assert_eq!(frame.payload, text.as_bytes(), "connection {tag}{i}");
        clients.push(raw);
    }
}

/// Every `step`th connection, first to last, is still served; and the
/// server logged no error.
async fn still_served(server: &Server, clients: &mut [RawClient], step: usize) {
    for (i, raw) in clients.iter_mut().enumerate().step_by(step) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_connections_with_default_config() {
    // The test process needs a socket per connection too.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    let server = Server::start(ServerOpts::new("echo"));
    let mut clients = Vec::with_capacity(CONNECTIONS);
    open_echoing(&server, &mut clients, CONNECTIONS, "c").await;
    still_served(&server, &mut clients, 997).await;
}

/// Each member of a shared instance holds a handle in its store, beyond the
/// [`wharf::runtime::MAX_HOST_RESOURCES`] the plugin may make itself: the
/// 1,025th connection was once refused with a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_instance_holds_more_connections_than_its_resource_cap() {
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    let connections = wharf::runtime::MAX_HOST_RESOURCES + 200;
    let mut opts = ServerOpts::new("");
    opts.extra = crate::shared::tenant("one", "echo", &["/"], "shared");
    let server = Server::start(opts);
    let mut clients = Vec::with_capacity(connections);
    open_echoing(&server, &mut clients, connections, "c").await;
    // Members leave and others join: the cap follows the members.
    clients.drain(..100);
    tokio::time::sleep(Duration::from_millis(200)).await;
    open_echoing(&server, &mut clients, 150, "d").await;
    still_served(&server, &mut clients, 97).await;
}
