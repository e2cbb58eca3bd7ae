//! Several tenants on one server: routing by host and path, origins,
//! per-tenant limits, settings, and isolation between tenants.

use std::time::{Duration, Instant};

use crate::support::{
    OP_TEXT, RawClient, Server, ServerOpts, plugin_path, upgrade_request_to, wharf_cmd,
};

/// A `[[tenant]]` table running the built plugin `plugin`.
fn tenant(name: &str, plugin: &str, routes: &[&str], more: &str) -> String {
    format!(
        "[[tenant]]\nname = {name:?}\nplugin = {:?}\nroutes = {routes:?}\n{more}\n",
        plugin_path(plugin).display().to_string()
    )
}

fn start(tenants: &[String]) -> Server {
    start_with(tenants, "")
}

fn start_with(tenants: &[String], server: &'static str) -> Server {
    let mut opts = ServerOpts::new("");
    opts.server = server;
    opts.extra = tenants.concat() + "[admin]\nlisten = \"127.0.0.1:0\"\n";
    Server::start(opts)
}

/// An upgrade to `host` and `path`: the client, and the response status.
async fn upgrade(
    server: &Server,
    host: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> (RawClient, u16) {
    let mut raw = server.raw(false).await;
    raw.send(upgrade_request_to(host, path, extra).as_bytes())
        .await;
    let status = raw.read_response().await.status;
    (raw, status)
}

async fn ask(raw: &mut RawClient, text: &str) -> String {
    raw.send_frame(true, OP_TEXT, text.as_bytes()).await;
    let frame = raw.read_frame().await;
    String::from_utf8(frame.payload).expect("text reply")
}

/// Which tenant answered: chaos tenants answer "setting who" with their
/// `who` setting; the echo tenant echoes it.
async fn who(server: &Server, host: &str, path: &str) -> String {
    let (mut raw, status) = upgrade(server, host, path, &[]).await;
    if status != 101 {
        return status.to_string();
    }
    ask(&mut raw, "setting who").await
}

fn routing_tenants() -> Vec<String> {
    vec![
        tenant("fallback", "echo", &["/"], ""),
        tenant(
            "acme",
            "chaos",
            &["acme.test/", "/acme"],
            "[tenant.settings]\nwho = \"acme\"\n",
        ),
        tenant(
            "wild",
            "chaos",
            &["*.acme.test/chat"],
            "[tenant.settings]\nwho = \"wild\"\n",
        ),
    ]
}

#[tokio::test]
async fn routes_pick_the_most_specific_tenant() {
    let server = start(&routing_tenants());
    let cases = [
        ("acme.test", "/", "acme"),
        ("ACME.test:8080", "/room", "acme"),
        ("other.test", "/acme/x", "acme"),
        ("other.test", "/acmex", "setting who"),
        ("a.acme.test", "/chat/lobby", "wild"),
        ("a.b.acme.test", "/chat", "wild"),
        ("a.acme.test", "/other", "setting who"),
        ("acme.test", "/chat", "acme"),
        ("127.0.0.1", "/", "setting who"),
    ];
    for (host, path, expected) in cases {
        assert_eq!(who(&server, host, path).await, expected, "{host}{path}");
    }
}

#[tokio::test]
async fn no_route_is_404_before_any_plugin_runs() {
    let server = start(&[tenant("acme", "chaos", &["acme.test/"], "")]);
    let (mut acme, status) = upgrade(&server, "acme.test", "/", &[]).await;
    assert_eq!(status, 101);
    assert_eq!(ask(&mut acme, "setting who").await, "none");
    let calls = "wharf_plugin_call_seconds_count";
    let before = server.metric(calls).await;
    assert_eq!(who(&server, "other.test", "/").await, "404");
    assert_eq!(server.metric(calls).await, before, "a plugin ran");
    let refused = server
        .metric("wharf_handshake_failures_total{status=\"404\",reason=\"no-route\"}")
        .await;
    assert_eq!(refused, 1.0);
}

#[tokio::test]
async fn settings_reach_only_their_tenant() {
    let server = start(&[
        tenant(
            "a",
            "chaos",
            &["/a"],
            "[tenant.settings]\ncolour = \"red\"\nsize = \"9\"\n",
        ),
        tenant(
            "b",
            "chaos",
            &["/b"],
            "[tenant.settings]\ncolour = \"blue\"\n",
        ),
    ]);
    let (mut a, _) = upgrade(&server, "x", "/a", &[]).await;
    let (mut b, _) = upgrade(&server, "x", "/b", &[]).await;
    assert_eq!(ask(&mut a, "settings").await, "colour=red;size=9");
    assert_eq!(ask(&mut b, "settings").await, "colour=blue");
    assert_eq!(ask(&mut b, "setting size").await, "none");
}

#[test]
fn conflicting_routes_are_a_config_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    let text = tenant("one", "echo", &["acme.test/chat/"], "")
        + &tenant("two", "echo", &["ACME.test/chat"], "");
    std::fs::write(&config, text).unwrap();
    let stderr = crate::support::check_refuses(&config);
    assert!(
        stderr.contains("route acme.test/chat is claimed by both tenant one and tenant two"),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_route_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("wharf.toml");
    std::fs::write(&config, routing_tenants().concat()).unwrap();
    let out = wharf_cmd()
        // Port 0: `check` binds the listeners (the default 8080 may be taken).
        .args(["check", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(&str, &str)> = stdout
        .lines()
        .skip(2)
        .map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next().unwrap(), cols.next().unwrap())
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("acme.test/", "acme"),
            ("*.acme.test/chat", "wild"),
            ("/acme", "acme"),
            ("/", "fallback")
        ],
        "{stdout}"
    );
}

#[tokio::test]
async fn origins_same_origin_by_default_and_allow_lists() {
    let server = start(&[
        tenant("strict", "echo", &["/strict"], ""),
        tenant(
            "listed",
            "echo",
            &["/listed"],
            "allowed_origins = [\"https://app.test\", \"https://*.app.test\"]",
        ),
    ]);
    let status = |path: &'static str, host: &'static str, origin: Option<&'static str>| {
        let server = &server;
        async move {
            let extra: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            upgrade(server, host, path, &extra).await.1
        }
    };
    assert_eq!(
        status("/strict", "chat.test", None).await,
        101,
        "not a browser"
    );
    assert_eq!(
        status("/strict", "chat.test", Some("https://chat.test")).await,
        101
    );
    assert_eq!(
        status("/strict", "chat.test", Some("https://evil.test")).await,
        403
    );
    assert_eq!(
        status("/listed", "x.test", Some("https://app.test")).await,
        101
    );
    assert_eq!(
        status("/listed", "x.test", Some("https://eu.app.test")).await,
        101
    );
    assert_eq!(
        status("/listed", "x.test", Some("https://evil.test")).await,
        403
    );
    assert_eq!(
        status("/listed", "x.test", Some("http://app.test")).await,
        403
    );
    let refused = server
        .metric("wharf_tenant_refusals_total{tenant=\"listed\",reason=\"origin\"}")
        .await;
    assert_eq!(refused, 2.0);
}

#[tokio::test]
async fn tenant_connection_limit_is_503_and_leaves_others_alone() {
    let server = start(&[
        tenant(
            "small",
            "echo",
            &["/small"],
            "[tenant.limits]\nmax_connections = 2",
        ),
        tenant("big", "echo", &["/big"], ""),
    ]);
    let (_a, s1) = upgrade(&server, "x", "/small", &[]).await;
    let (_b, s2) = upgrade(&server, "x", "/small", &[]).await;
    let (_c, s3) = upgrade(&server, "x", "/small", &[]).await;
    assert_eq!((s1, s2, s3), (101, 101, 503));
    let (mut big, status) = upgrade(&server, "x", "/big", &[]).await;
    assert_eq!(status, 101);
    assert_eq!(ask(&mut big, "hello").await, "hello");
    assert_eq!(
        server
            .metric("wharf_tenant_connections_open{tenant=\"small\"}")
            .await,
        2.0
    );
    drop(_a);
    // The place is given back once the first connection is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_d, status) = upgrade(&server, "x", "/small", &[]).await;
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn server_limit_is_503_across_tenants() {
    let server = start_with(
        &[
            tenant("a", "echo", &["/a"], ""),
            tenant("b", "echo", &["/b"], ""),
        ],
        "max_connections = 2",
    );
    let (_a, s1) = upgrade(&server, "x", "/a", &[]).await;
    let (_b, s2) = upgrade(&server, "x", "/b", &[]).await;
    let (_c, s3) = upgrade(&server, "x", "/b", &[]).await;
    assert_eq!((s1, s2, s3), (101, 101, 503));
}

#[tokio::test]
async fn message_rate_limit_closes_with_1008() {
    let server = start(&[tenant(
        "slow",
        "echo",
        &["/"],
        "[tenant.limits]\nmessages_per_second = 5",
    )]);
    let (mut raw, status) = upgrade(&server, "x", "/", &[]).await;
    assert_eq!(status, 101);
    // A second's burst is allowed; the sixth message at once is over.
    let mut burst = Vec::new();
    for i in 0..20 {
        burst.extend(crate::support::masked(OP_TEXT, format!("m{i}").as_bytes()));
    }
    raw.send(&burst).await;
    let mut echoed = 0;
    let code = loop {
        let frame = raw.read_frame().await;
        match frame.opcode {
            0x1 => echoed += 1,
            0x8 => break frame.close_code().0,
            op => panic!("unexpected opcode {op}"),
        }
    };
    assert_eq!((echoed, code), (5, 1008));
    // The 15 over the rate are all counted, though those the server reads
    // after its Close went out are counted after the test has seen it.
    let dropped = "wharf_received_dropped_total{reason=\"rate-limit\"}";
    assert_eq!(
        server
            .metric_reaches(dropped, 15.0, Duration::from_secs(5))
            .await,
        15.0
    );
}

#[tokio::test]
async fn byte_rate_limit_closes_with_1008() {
    let server = start(&[tenant(
        "thin",
        "echo",
        &["/"],
        "[tenant.limits]\nbytes_per_second = \"1KiB\"",
    )]);
    let (mut raw, _) = upgrade(&server, "x", "/", &[]).await;
    assert_eq!(ask(&mut raw, &"a".repeat(600)).await.len(), 600);
    raw.send_frame(true, OP_TEXT, "b".repeat(600).as_bytes())
        .await;
    assert_eq!(raw.read_close().await.0, 1008);
}

#[tokio::test]
async fn per_tenant_message_size() {
    let server = start(&[
        tenant(
            "tiny",
            "echo",
            &["/tiny"],
            "[tenant.limits]\nmax_message_size = \"1KiB\"",
        ),
        tenant("roomy", "echo", &["/roomy"], ""),
    ]);
    let big = "x".repeat(4096);
    let (mut roomy, _) = upgrade(&server, "x", "/roomy", &[]).await;
    assert_eq!(ask(&mut roomy, &big).await, big);
    let (mut tiny, _) = upgrade(&server, "x", "/tiny", &[]).await;
    tiny.send_frame(true, OP_TEXT, big.as_bytes()).await;
    assert_eq!(tiny.read_close().await.0, 1009);
}

#[tokio::test]
async fn wasi_grants_are_per_tenant_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hi from the host").unwrap();
    let granted = format!(
        "[tenant.wasi]\nenv = [\"RUST_LOG\", \"WHARF_NOT_SET_ANYWHERE\"]\ndir = {:?}\nwall_clock = false\n",
        dir.path().display().to_string()
    );
    let server = start(&[
        tenant("granted", "chaos", &["/granted"], &granted),
        tenant("plain", "chaos", &["/plain"], ""),
    ]);
    let (mut g, _) = upgrade(&server, "x", "/granted", &[]).await;
    let (mut p, _) = upgrade(&server, "x", "/plain", &[]).await;
    // The test harness runs the server with RUST_LOG=info.
    assert_eq!(ask(&mut g, "env RUST_LOG").await, "info");
    assert_eq!(ask(&mut g, "env HOME").await, "none");
    assert_eq!(ask(&mut g, "env WHARF_NOT_SET_ANYWHERE").await, "none");
    assert_eq!(
        ask(&mut g, "read /data/hello.txt").await,
        "hi from the host"
    );
    assert_eq!(ask(&mut g, "write /data/new.txt").await, "err");
    assert!(!dir.path().join("new.txt").exists());
    assert_eq!(ask(&mut g, "read /etc/passwd").await, "err");
    assert_eq!(ask(&mut p, "env RUST_LOG").await, "none");
    assert_eq!(ask(&mut p, "read /data/hello.txt").await, "err");
    // The wall clock: withheld (the epoch) and granted (today).
    assert_eq!(ask(&mut g, "now").await, "0");
    let now: u64 = ask(&mut p, "now").await.parse().unwrap();
    assert!(now > 1_700_000_000, "{now}");
}

#[tokio::test]
async fn a_peer_that_does_not_read_is_closed_after_the_grace_period() {
    let mut opts = ServerOpts::new("hostile");
    opts.websocket =
        "send_queue = \"64KiB\"\nsend_queue_grace = \"300ms\"\nclose_timeout = \"500ms\"";
    opts.extra = "[admin]\nlisten = \"127.0.0.1:0\"\n".into();
    let server = Server::start(opts);
    let (mut raw, _) = upgrade(&server, "127.0.0.1", "/", &[]).await;
    let series = "wharf_tenant_refusals_total{tenant=\"default\",reason=\"slow-consumer\"}";
    // The plugin answers each request with 1 MiB; the client asks on and
    // never reads, so the kernel's buffers fill and then the send queue.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        raw.send_frame(true, OP_TEXT, b"big-reply 1").await;
        if server.metrics().await.contains(&format!("{series} 1")) {
            break;
        }
        assert!(Instant::now() < deadline, "not closed for being slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The line is logged before the refusal is counted, but reaches the
    // test through the log's pipe and reader thread: it may come later.
    server
        .wait_log(
            &["peer not reading its messages; closing with 1008"],
            Duration::from_secs(5),
        )
        .await;
}
