//! Shared instance mode: one instance serves all of a tenant's connections,
//! one event at a time; `wharf:websocket/peers` reaches the tenant's other
//! connections and nobody else's; a failure closes them all with 1011 and
//! the next connection gets a fresh instance.

use std::time::Duration;

use crate::support::{OP_TEXT, RawClient, Server, ServerOpts, plugin_path, upgrade_request_to};

/// A `[[tenant]]` of `plugin` at `routes`, in instance `mode`.
pub(crate) fn tenant(name: &str, plugin: &str, routes: &[&str], mode: &str) -> String {
    format!(
        "[[tenant]]\nname = {name:?}\nplugin = {:?}\nroutes = {routes:?}\ninstance = {mode:?}\n",
        plugin_path(plugin).display().to_string()
    )
}

fn start(tenants: &[String]) -> Server {
    let mut opts = ServerOpts::new("");
    opts.extra = tenants.concat() + "[admin]\nlisten = \"127.0.0.1:0\"\n";
    Server::start(opts)
}

/// A raw client upgraded at `path`.
pub(crate) async fn connect(server: &Server, path: &str) -> RawClient {
    let mut raw = server.raw(false).await;
    raw.send(upgrade_request_to("x", path, &[]).as_bytes())
        .await;
    let resp = raw.read_response().await;
    assert_eq!(resp.status, 101, "{path}: {resp:?}");
    raw
}

async fn say(raw: &mut RawClient, text: &str) {
    raw.send_frame(true, OP_TEXT, text.as_bytes()).await;
}

async fn hear(raw: &mut RawClient) -> String {
    let frame = raw.read_frame().await;
    assert_eq!(frame.opcode, OP_TEXT, "{frame:?}");
    String::from_utf8(frame.payload).unwrap()
}

async fn ask(raw: &mut RawClient, text: &str) -> String {
    say(raw, text).await;
    hear(raw).await
}

#[tokio::test]
async fn shared_chat_keeps_rooms_in_memory() {
    let server = start(&[tenant("chat", "shared_chat", &["/chat"], "shared")]);
    let mut ann = connect(&server, "/chat/lobby?nick=ann").await;
    assert_eq!(hear(&mut ann).await, "* ann joined lobby");
    let mut bob = connect(&server, "/chat/lobby?nick=bob").await;
    assert_eq!(hear(&mut ann).await, "* bob joined lobby");
    assert_eq!(hear(&mut bob).await, "* bob joined lobby");
    let mut cy = connect(&server, "/chat/attic?nick=cy").await;
    assert_eq!(hear(&mut cy).await, "* cy joined attic");

    say(&mut ann, "hello").await;
    assert_eq!(hear(&mut ann).await, "ann: hello");
    assert_eq!(hear(&mut bob).await, "ann: hello");
    assert_eq!(ask(&mut bob, "/who").await, "* in lobby: ann, bob");
    assert_eq!(ask(&mut cy, "/who").await, "* in attic: cy");

    bob.send(&crate::support::close_frame(1000, "")).await;
    assert_eq!(bob.read_close().await.0, 1000);
    assert_eq!(hear(&mut ann).await, "* bob left");
    assert_eq!(ask(&mut ann, "/who").await, "* in lobby: ann");
    // cy heard none of the lobby.
    assert_eq!(ask(&mut cy, "/who").await, "* in attic: cy");
}

#[tokio::test]
async fn one_instance_serves_every_connection_and_peers_stay_in_the_tenant() {
    let server = start(&[
        tenant("one", "chaos", &["/one"], "shared"),
        tenant("two", "chaos", &["/two"], "shared"),
        tenant("own", "chaos", &["/own"], "per-connection"),
    ]);
    let mut a = connect(&server, "/one").await;
    let mut b = connect(&server, "/one").await;
    // The same memory: the in-instance counter goes on across connections.
    assert_eq!(ask(&mut a, "count").await, "count=1 instance=1");
    assert_eq!(ask(&mut b, "count").await, "count=1 instance=2");
    let b_id = ask(&mut b, "id").await;
    assert_eq!(ask(&mut a, &format!("peer {b_id} psst")).await, "peer ok");
    assert_eq!(hear(&mut b).await, "psst");

    // Another tenant's shared instance cannot reach b, nor can a
    // per-connection instance.
    let mut c = connect(&server, "/two").await;
    assert!(
        ask(&mut c, &format!("peer {b_id} hi"))
            .await
            .starts_with("peer err=")
    );
    let mut d = connect(&server, "/own").await;
    assert!(
        ask(&mut d, &format!("peer {b_id} hi"))
            .await
            .starts_with("peer err=")
    );
    let d_id = ask(&mut d, "id").await;
    // To itself: queued in order with the reply that follows it.
    assert_eq!(ask(&mut d, &format!("peer {d_id} self")).await, "self");
    assert_eq!(hear(&mut d).await, "peer ok");
    // b heard nothing of it: its next message is its own echo.
    assert_eq!(ask(&mut b, "ping").await, "ping");
}

#[tokio::test]
async fn a_failed_shared_instance_closes_its_connections_and_is_replaced() {
    let server = start(&[
        tenant("one", "chaos", &["/one"], "shared"),
        tenant("other", "chaos", &["/other"], "shared"),
    ]);
    let mut a = connect(&server, "/one").await;
    let mut b = connect(&server, "/one").await;
    let mut other = connect(&server, "/other").await;
    assert_eq!(ask(&mut a, "count").await, "count=1 instance=1");
    say(&mut b, "trap").await;
    assert_eq!(b.read_close().await.0, 1011);
    let (code, _) = tokio::time::timeout(Duration::from_secs(3), a.read_close())
        .await
        .expect("a closed too");
    assert_eq!(code, 1011);
    // A new connection gets a new instance: its memory starts afresh.
    let mut c = connect(&server, "/one").await;
    assert_eq!(ask(&mut c, "count").await, "count=1 instance=1");
    // The other tenant's shared instance never noticed.
    assert_eq!(ask(&mut other, "still").await, "still");
    assert_eq!(
        server
            .metric("wharf_plugin_failures_total{tenant=\"one\",kind=\"trap\"}")
            .await,
        1.0
    );
}

/// A call that queued sends and then failed: its own connection gets what
/// it sent ahead of the 1011; what it queued for another connection goes
/// with the instance, counted.
#[tokio::test]
async fn a_failed_call_delivers_its_own_sends_and_counts_the_others() {
    let server = start(&[tenant("one", "chaos", &["/one"], "shared")]);
    let mut a = connect(&server, "/one").await;
    let mut b = connect(&server, "/one").await;
    let b_id = ask(&mut b, "id").await;
    say(&mut a, &format!("peer-trap {b_id}")).await;
    assert_eq!(hear(&mut a).await, "to me");
    assert_eq!(a.read_close().await.0, 1011);
    assert_eq!(b.read_close().await.0, 1011);
    let lost = "wharf_sends_refused_total{reason=\"instance-failed\"}";
    assert_eq!(
        server
            .metric_reaches(lost, 1.0, Duration::from_secs(5))
            .await,
        1.0
    );
}

/// The same with an instance per connection on a server of several
/// tenants, whose calls may move off the workers (`idle_pool`): the
/// instance is dropped where the call ran, and its sends come back first.
#[tokio::test]
async fn a_failed_movable_call_delivers_its_sends() {
    let server = start(&[
        tenant("one", "chaos", &["/one"], "per-connection"),
        tenant("two", "chaos", &["/two"], "per-connection"),
    ]);
    let mut a = connect(&server, "/one").await;
    say(&mut a, "peer-trap 0").await;
    assert_eq!(hear(&mut a).await, "to me");
    assert_eq!(a.read_close().await.0, 1011);
    let mut b = connect(&server, "/two").await;
    assert_eq!(ask(&mut b, "still").await, "still");
}

/// A connection that closes while another's call queues a message for it
/// (the call holds the shared instance, so the closing connection's
/// `on-close` waits for it): the message can never be sent, and is
/// counted when the connection leaves the instance.
#[tokio::test]
async fn a_send_to_a_connection_closing_meanwhile_is_counted() {
    let mut opts = ServerOpts::new("");
    opts.plugin_limits = "cpu_time_per_event = \"5s\"";
    opts.extra =
        tenant("one", "chaos", &["/one"], "shared") + "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let server = Server::start(opts);
    let mut a = connect(&server, "/one").await;
    let mut b = connect(&server, "/one").await;
    let b_id = ask(&mut b, "id").await;
    say(&mut a, &format!("peer-sleep {b_id} 1000")).await;
    // Into a's call (it holds the instance for a second), not before it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.send(&crate::support::close_frame(1000, "")).await;
    assert_eq!(b.read_close().await.0, 1000);
    assert_eq!(hear(&mut a).await, "peer ok");
    let dropped = "wharf_sends_refused_total{reason=\"closed\"}";
    assert_eq!(
        server
            .metric_reaches(dropped, 1.0, Duration::from_secs(5))
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_spinning_event_in_a_shared_instance_is_cut() {
    let mut opts = ServerOpts::new("");
    opts.plugin_limits = "cpu_time_per_event = \"100ms\"";
    opts.extra = tenant("one", "chaos", &["/one"], "shared");
    let server = Server::start(opts);
    let mut a = connect(&server, "/one").await;
    let mut b = connect(&server, "/one").await;
    say(&mut a, "loop").await;
    assert_eq!(a.read_close().await.0, 1011);
    assert_eq!(b.read_close().await.0, 1011);
    let mut c = connect(&server, "/one").await;
    assert_eq!(ask(&mut c, "back").await, "back");
}
