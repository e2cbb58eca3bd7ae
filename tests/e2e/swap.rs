//! Hot swap under load. The server runs in this process, so the test calls
//! its control plane (`Tenants::deploy`, what the admin API calls) at a
//! chosen moment while hundreds of connections, over ws and wss, echo and
//! verify every message with the `swap-v1`/`swap-v2` test plugins (whose
//! replies name their version). `tests/e2e/admin.rs` covers the same
//! through the HTTP API and the CLI. Shared-mode migrations use the
//! `swap-shared-v1`/`swap-shared-v2` test plugins, whose one instance keeps
//! every connection's message count in memory and hands it over through
//! `wharf:websocket/snapshot`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wharf::config::Config;
use wharf::metrics::Metrics;
use wharf::server::Server;
use wharf::tenancy::swap::Policy;
use wharf::tenancy::{self, Tenants};

use crate::support::{self, Ws, cache_dir, plugin_path, self_signed};

struct Running {
    server: Option<Server>,
    tenants: Arc<Tenants>,
    metrics: Arc<Metrics>,
    ws: SocketAddr,
    wss: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

async fn start(mode: &str) -> Running {
    start_with(mode, "swap_v1").await
}

/// A server whose tenant "t" (`instance = mode`) runs `plugin` first.
async fn start_with(mode: &str, plugin: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let cert = self_signed();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, &cert.cert_pem).unwrap();
    std::fs::write(&key_path, &cert.key_pem).unwrap();
    let text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\ntls = {{ cert = {cert:?}, key = {key:?} }}\n\
         [server]\nrestart_window = \"500ms\"\n\
         [plugin]\ncache_dir = {cache:?}\nhibernate_after = \"100ms\"\n\
         [[tenant]]\nname = \"t\"\nplugin = {v1:?}\nroutes = [\"/\"]\ninstance = {mode:?}\n",
        cert = cert_path.display().to_string(),
        key = key_path.display().to_string(),
        cache = cache_dir().display().to_string(),
        v1 = plugin_path(plugin).display().to_string(),
    );
    let config: Config = toml::from_str(&text).unwrap();
    let (server, tenants, metrics) =
        support::in_process(&config, config.server.max_connections).await;
    let (ws, wss) = (server.bound()[0].address, server.bound()[1].address);
    Running {
        server: Some(server),
        tenants,
        metrics,
        ws,
        wss,
        client_tls: cert.client,
        _dir: dir,
    }
}

impl Running {
    async fn connect(&self, tls: bool) -> Ws {
        self.connect_path(tls, "/").await
    }

    async fn connect_path(&self, tls: bool, path: &str) -> Ws {
        let (addr, config) = if tls {
            (self.wss, Some(&self.client_tls))
        } else {
            (self.ws, None)
        };
        let scheme = if tls { "wss" } else { "ws" };
        let req = format!("{scheme}://localhost:{}{path}", addr.port())
            .into_client_request()
            .unwrap();
        support::connect(addr, config, req).await.unwrap().0
    }

    /// Deploys swap-v2 with `policy`, off the async workers as the admin
    /// API does (it compiles).
    async fn deploy_v2(&self, policy: Policy) {
        let tenants = self.tenants.clone();
        let bytes = std::fs::read(plugin_path("swap_v2")).unwrap();
        let outcome =
            tokio::task::spawn_blocking(move || tenants.deploy("t", "swap_v2", &bytes, policy))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(outcome.policy, policy, "{outcome:?}");
    }

    /// Deploys plugin `name` with `policy` and returns the answer.
    async fn deploy(&self, name: &'static str, policy: Policy) -> tenancy::DeployOutcome {
        let tenants = self.tenants.clone();
        let bytes = std::fs::read(plugin_path(name)).unwrap();
        tokio::task::spawn_blocking(move || tenants.deploy("t", name, &bytes, policy))
            .await
            .unwrap()
            .unwrap()
    }

    /// The value of one metric series (0 if absent).
    fn metric(&self, series: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// Waits (up to 5 s) for the tenant's versions to be `expected`: (state,
/// connections), the active one first.
async fn wait_versions(running: &Running, expected: &[(&str, usize)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let versions: Vec<(&str, usize)> = running.tenants.status()[0]
            .versions
            .iter()
            .map(|v| (v.state, v.connections))
            .collect();
        if versions == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "versions {versions:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ask(ws: &mut Ws, text: &str) -> String {
    support::send_text(ws, text).await;
    support::recv_text(ws).await
}

/// What one loaded connection saw.
#[derive(Debug, Default)]
struct Seen {
    v1: usize,
    v2: usize,
    /// A v1 reply after a v2 one: the connection went back.
    regressed: bool,
    close: Option<u16>,
}

/// Echoes numbered messages until `stop`, checking each reply: the text
/// sent, behind the version that answered. Returns what it saw; panics on
/// a lost, reordered or wrong reply.
async fn load(mut ws: Ws, conn: usize, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let text = format!("c{conn}-{n}");
        if ws.send(Message::text(text.clone())).await.is_err() {
            break;
        }
        let reply = match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
            Ok(Some(Ok(Message::Close(frame)))) => {
                seen.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                break;
            }
            other => panic!("connection {conn}, message {n}: {other:?}"),
        };
        match reply.split_once(':') {
            Some(("v1", t)) if t == text => {
                seen.regressed |= seen.v2 > 0;
                seen.v1 += 1;
            }
            Some(("v2", t)) if t == text => seen.v2 += 1,
            _ => panic!("connection {conn}, message {n}: sent {text:?}, got {reply:?}"),
        }
    }
    seen
}

/// Starts `count` loaded connections (every other one over wss), swaps to
/// v2 with `policy` after a while, lets the load run on, and returns what
/// each connection saw.
async fn swap_under_load(running: &Running, policy: Policy, count: usize) -> Vec<Seen> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for conn in 0..count {
        let ws = running.connect(conn % 2 == 1).await;
        tasks.push(tokio::spawn(load(ws, conn, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swapped = Instant::now();
    running.deploy_v2(policy).await;
    eprintln!("{policy:?}: deploy returned after {:?}", swapped.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await.expect("a load task panicked"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_connections_on_v1_and_gives_new_ones_v2() {
    let running = start("per-connection").await;
    let seen = swap_under_load(&running, Policy::Drain, 200).await;
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.v1 > 0 && s.v2 == 0 && s.close.is_none(),
            "connection {i}: {s:?}"
        );
    }
    let mut fresh = running.connect(true).await;
    assert_eq!(ask(&mut fresh, "hi").await, "v2:hi");
    // Once the old connections are gone, v1 stays only as the rollback target.
    wait_versions(&running, &[("active", 1), ("standby", 0)]).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_every_connection_with_its_state() {
    let running = start("per-connection").await;
    // Idle connections with state: they hibernate (100 ms) before the swap.
    let mut idle = Vec::new();
    for i in 0..20 {
        let mut ws = running.connect(i % 2 == 0).await;
        assert_eq!(ask(&mut ws, "count").await, "v1 count=1");
        idle.push(ws);
    }
    let seen = swap_under_load(&running, Policy::Migrate, 200).await;
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.v1 > 0 && s.v2 > 0 && !s.regressed && s.close.is_none(),
            "connection {i}: {s:?}"
        );
    }
    for (i, ws) in idle.iter_mut().enumerate() {
        assert_eq!(ask(ws, "count").await, "v2 count=2", "idle connection {i}");
    }
    // Nothing was left on v1: the load connections are closing, the idle
    // ones stay, on v2.
    wait_versions(&running, &[("active", 20), ("standby", 0)]).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_closes_with_1012_spread_and_clients_come_back_to_v2() {
    let running = start("per-connection").await;
    let seen = swap_under_load(&running, Policy::Restart, 100).await;
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.close, Some(1012), "connection {i}: {s:?}");
        assert_eq!(s.v2, 0, "connection {i}: {s:?}");
    }
    let mut back = running.connect(false).await;
    assert_eq!(ask(&mut back, "hi").await, "v2:hi");
    running.stop().await;
}

/// Echoes numbered messages until `stop` through the shared-mode test
/// plugin, checking each reply: the text sent, behind the version that
/// answered, and the count of this connection's messages the instance
/// holds, which must go on from v1 to v2 without a gap or a repeat.
async fn load_shared(mut ws: Ws, conn: usize, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let text = format!("c{conn}-{n}");
        if ws.send(Message::text(text.clone())).await.is_err() {
            break;
        }
        let reply = match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
            Ok(Some(Ok(Message::Close(frame)))) => {
                seen.close = Some(frame.map_or(1005, |f| u16::from(f.code)));
                break;
            }
            other => panic!("connection {conn}, message {n}: {other:?}"),
        };
        let expected = format!("{text} n={n}");
        match reply.split_once(':') {
            Some(("v1", t)) if t == expected => {
                seen.regressed |= seen.v2 > 0;
                seen.v1 += 1;
            }
            Some(("v2", t)) if t == expected => seen.v2 += 1,
            _ => panic!("connection {conn}: sent {text:?} (its message {n}), got {reply:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_shared_instance_with_its_state_under_load() {
    let running = start_with("shared", "swap_shared_v1").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for conn in 0..60 {
        let ws = running.connect(conn % 4 == 3).await;
        tasks.push(tokio::spawn(load_shared(ws, conn, stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let swapped = Instant::now();
    let outcome = running.deploy("swap_shared_v2", Policy::Migrate).await;
    eprintln!(
        "shared migrate: deploy returned after {:?}",
        swapped.elapsed()
    );
    assert_eq!(outcome.policy, Policy::Migrate, "{outcome:?}");
    assert_eq!(outcome.note, None, "{outcome:?}");
    // New connections get v2, with the one instance's memory: the total
    // counts v1's messages too.
    let mut fresh = running.connect(false).await;
    assert_eq!(ask(&mut fresh, "hi").await, "v2:hi n=1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.expect("a load task panicked");
        assert!(
            s.v1 > 0 && s.v2 > 0 && !s.regressed && s.close.is_none(),
            "connection {i}: {s:?}"
        );
        sent += s.v1 + s.v2;
    }
    // Every message counted once, across both versions.
    assert_eq!(
        ask(&mut fresh, "total").await,
        format!("v2 total={}", sent + 1)
    );
    assert_eq!(
        running.metric("wharf_migrations_total{tenant=\"t\"}"),
        60.0,
        "every member counted once"
    );
    // The load connections are closing; the fresh one stays, on v2, and
    // v1 is left as the rollback target.
    wait_versions(&running, &[("active", 1), ("standby", 0)]).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_falls_back_to_drain_for_a_shared_instance_without_snapshot() {
    // Neither version exports it, then only the running one does, then
    // only the new one.
    for (v1, v2, why) in [
        ("swap_v1", "swap_v2", "neither version exports it"),
        ("swap_shared_v1", "swap_v2", "the new version does not"),
        ("swap_v1", "swap_shared_v2", "the running version does not"),
    ] {
        let running = start_with("shared", v1).await;
        let mut old = running.connect(false).await;
        assert!(ask(&mut old, "a").await.starts_with("v1:a"));
        let outcome = running.deploy(v2, Policy::Migrate).await;
        assert_eq!(outcome.policy, Policy::Drain, "{v1} -> {v2}: {outcome:?}");
        let note = outcome.note.unwrap_or_default();
        assert!(
            note.contains("wharf:websocket/snapshot") && note.contains(why),
            "{v1} -> {v2}: {note}"
        );
        assert!(ask(&mut old, "b").await.starts_with("v1:b"));
        let mut new = running.connect(false).await;
        assert!(ask(&mut new, "c").await.starts_with("v2:c"));
        running.stop().await;
    }
}

/// Connections on swap-shared-v1, each having said one thing; then
/// `poison` sent by the first, and a migrate to v2.
async fn migrate_poisoned(poison: &str) -> (Running, Vec<Ws>, tenancy::DeployOutcome) {
    let running = start_with("shared", "swap_shared_v1").await;
    let mut conns = Vec::new();
    for i in 0..5 {
        let mut ws = running.connect(i % 2 == 1).await;
        assert_eq!(ask(&mut ws, "x").await, "v1:x n=1");
        conns.push(ws);
    }
    assert_eq!(ask(&mut conns[0], poison).await, "v1 poisoned");
    let outcome = running.deploy("swap_shared_v2", Policy::Migrate).await;
    (running, conns, outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_closes_the_moved_connections_with_1011() {
    // The new version's `restore` sends to every connection, then refuses.
    let (running, mut conns, outcome) = migrate_poisoned("poison-restore-sends").await;
    assert_eq!(outcome.policy, Policy::Migrate, "{outcome:?}");
    let note = outcome.note.unwrap_or_default();
    assert!(
        note.contains("restore failed") && note.contains("poisoned") && note.contains("1011"),
        "{note}"
    );
    for (i, ws) in conns.iter_mut().enumerate() {
        let (code, _) = support::recv_close_timeout(ws, Duration::from_secs(3)).await;
        assert_eq!(code, 1011, "connection {i}");
    }
    // The next connection starts a fresh instance of v2.
    let mut fresh = running.connect(false).await;
    assert_eq!(ask(&mut fresh, "y").await, "v2:y n=1");
    assert_eq!(ask(&mut fresh, "total").await, "v2 total=1");
    assert_eq!(
        running.metric("wharf_plugin_failures_total{tenant=\"t\",kind=\"restore\"}"),
        1.0
    );
    // What `restore` queued went with its instance, counted.
    assert_eq!(
        running.metric("wharf_sends_refused_total{reason=\"instance-failed\"}"),
        5.0
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_save_closes_the_old_instance_and_the_deploy_goes_on() {
    // The running version's `save` sends to every connection, then traps.
    let (running, mut conns, outcome) = migrate_poisoned("poison-save-sends").await;
    assert_eq!(outcome.policy, Policy::Migrate, "{outcome:?}");
    let note = outcome.note.unwrap_or_default();
    assert!(
        note.contains("save failed") && note.contains("1011"),
        "{note}"
    );
    for (i, ws) in conns.iter_mut().enumerate() {
        let (code, _) = support::recv_close_timeout(ws, Duration::from_secs(3)).await;
        assert_eq!(code, 1011, "connection {i}");
    }
    let mut fresh = running.connect(false).await;
    assert_eq!(ask(&mut fresh, "y").await, "v2:y n=1");
    assert_eq!(
        running.metric("wharf_plugin_failures_total{tenant=\"t\",kind=\"trap\"}"),
        1.0
    );
    assert_eq!(
        running.metric("wharf_sends_refused_total{reason=\"instance-failed\"}"),
        5.0
    );
    running.stop().await;
}

/// The connection whose call was the shared instance's last has left when
/// `save` fails: the salvage finds its entry gone and counts the others'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_save_after_the_last_caller_left_counts_the_rest() {
    let running = start_with("shared", "swap_shared_v1").await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut ws = running.connect(false).await;
        assert_eq!(ask(&mut ws, "x").await, "v1:x n=1");
        conns.push(ws);
    }
    let mut last = running.connect(false).await;
    assert_eq!(ask(&mut last, "poison-save-sends").await, "v1 poisoned");
    last.close(None).await.expect("close");
    // Its on-close ran (the instance's last call) and it left.
    while let Some(Ok(m)) = last.next().await {
        assert!(m.is_close(), "{m:?}");
    }
    let outcome = running.deploy("swap_shared_v2", Policy::Migrate).await;
    let note = outcome.note.unwrap_or_default();
    assert!(note.contains("save failed"), "{note}");
    for (i, ws) in conns.iter_mut().enumerate() {
        let (code, _) = support::recv_close_timeout(ws, Duration::from_secs(3)).await;
        assert_eq!(code, 1011, "connection {i}");
    }
    assert_eq!(
        running.metric("wharf_sends_refused_total{reason=\"instance-failed\"}"),
        4.0
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_chat_rooms_survive_a_migrate_deploy_and_a_rollback() {
    let running = start_with("shared", "shared_chat").await;
    let mut ann = running.connect_path(false, "/chat/lobby?nick=ann").await;
    assert_eq!(support::recv_text(&mut ann).await, "* ann joined lobby");
    let mut bob = running.connect_path(true, "/chat/lobby?nick=bob").await;
    assert_eq!(support::recv_text(&mut ann).await, "* bob joined lobby");
    assert_eq!(support::recv_text(&mut bob).await, "* bob joined lobby");
    let mut cy = running.connect_path(false, "/chat/attic?nick=cy").await;
    assert_eq!(support::recv_text(&mut cy).await, "* cy joined attic");
    let version = |r: &Running| r.tenants.status()[0].versions[0].sha256.clone();
    let first = version(&running);

    // A new version of the same plugin (what a rebuilt chat would be).
    let outcome = running.deploy("shared_chat", Policy::Migrate).await;
    assert_eq!((outcome.policy, outcome.note), (Policy::Migrate, None));
    assert_eq!(ask(&mut bob, "/who").await, "* in lobby: ann, bob");
    support::send_text(&mut ann, "still here").await;
    assert_eq!(support::recv_text(&mut ann).await, "ann: still here");
    assert_eq!(support::recv_text(&mut bob).await, "ann: still here");
    let mut dee = running.connect_path(false, "/chat/attic?nick=dee").await;
    assert_eq!(support::recv_text(&mut cy).await, "* dee joined attic");
    assert_eq!(support::recv_text(&mut dee).await, "* dee joined attic");

    // And back: a rollback migrates too, into a new instance of v1.
    let tenants = running.tenants.clone();
    let back = tokio::task::spawn_blocking(move || tenants.rollback("t", Policy::Migrate))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((back.policy, back.note), (Policy::Migrate, None));
    assert_eq!(version(&running), first);
    assert_eq!(ask(&mut cy, "/who").await, "* in attic: cy, dee");
    assert_eq!(ask(&mut ann, "/who").await, "* in lobby: ann, bob");
    running.stop().await;
}

#[tokio::test]
async fn a_broken_or_incomplete_component_is_refused_and_v1_keeps_serving() {
    let running = start("per-connection").await;
    let tenants = running.tenants.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let junk = tenants.deploy("t", "junk", b"not a component", Policy::Drain);
        let incomplete = std::fs::read(plugin_path("incomplete")).unwrap();
        let partial = tenants.deploy("t", "incomplete", &incomplete, Policy::Drain);
        let unknown = tenants.deploy("nobody", "x", b"", Policy::Drain);
        (
            junk.unwrap_err(),
            partial.unwrap_err(),
            unknown.unwrap_err(),
        )
    })
    .await
    .unwrap();
    assert_eq!(refused.0.status(), 422, "{}", refused.0);
    assert_eq!(refused.1.status(), 422);
    assert!(refused.1.to_string().contains("handler"), "{}", refused.1);
    assert_eq!(refused.2.status(), 404);
    let mut ws = running.connect(false).await;
    assert_eq!(ask(&mut ws, "still").await, "v1:still");
    running.stop().await;
}

#[tokio::test]
async fn a_watched_plugin_file_redeploys_its_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.wasm");
    std::fs::copy(plugin_path("swap_v1"), &file).unwrap();
    let mut opts = support::ServerOpts::new("");
    opts.extra = format!(
        "[[tenant]]\nname = \"app\"\nplugin = {:?}\nroutes = [\"/\"]\nwatch = true\n",
        file.display().to_string()
    );
    let server = support::Server::start(opts);
    let mut old = server.connect(false).await;
    assert_eq!(ask(&mut old, "a").await, "v1:a");
    // As a build does: write elsewhere, rename over.
    let tmp = dir.path().join("app.wasm.tmp");
    std::fs::copy(plugin_path("swap_v2"), &tmp).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut ws = server.connect(false).await;
        if ask(&mut ws, "b").await == "v2:b" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not redeployed:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Drained: the connection from before stays on v1.
    assert_eq!(ask(&mut old, "c").await, "v1:c");
    // A broken file is logged and ignored.
    std::fs::write(&file, b"not a component").unwrap();
    server
        .wait_log(&["cannot be deployed"], Duration::from_secs(10))
        .await;
    let mut ws = server.connect(false).await;
    assert_eq!(ask(&mut ws, "d").await, "v2:d");
}
