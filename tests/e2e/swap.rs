//! Hot swap under load. The server runs in this process, so the test calls
//! its control plane (`Tenants::deploy`, what the admin API calls) at a
//! chosen moment while hundreds of connections, over ws and wss, echo and
//! verify every message with the `swap-v1`/`swap-v2` test plugins (whose
//! replies name their version). `tests/e2e/admin.rs` covers the same
//! through the HTTP API and the CLI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use wharf::config::Config;
use wharf::metrics::Metrics;
use wharf::runtime::{Runtime, RuntimeConfig};
use wharf::server::Server;
use wharf::tenancy::swap::Policy;
use wharf::tenancy::{self, Tenants};

use crate::support::{self, Ws, cache_dir, plugin_path, self_signed};

struct Running {
    server: Option<Server>,
    tenants: Arc<Tenants>,
    ws: SocketAddr,
    wss: SocketAddr,
    client_tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

async fn start(mode: &str) -> Running {
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
        v1 = plugin_path("swap_v1").display().to_string(),
    );
    let config: Config = toml::from_str(&text).unwrap();
    config.validate().unwrap();
    let runtime = Runtime::new(RuntimeConfig {
        max_instances: config.server.max_connections,
        limits: tenancy::runtime_limits(&config),
        cache_dir: Some(cache_dir()),
        concurrency_support: false,
        keep_resident: 64 << 10,
    })
    .unwrap();
    let metrics = Metrics::new();
    let tenants = Arc::new(Tenants::load(&config, Arc::new(runtime), metrics.clone()).unwrap());
    let server = Server::start(&config, tenants.clone(), metrics)
        .await
        .unwrap();
    let (ws, wss) = (server.bound()[0].address, server.bound()[1].address);
    Running {
        server: Some(server),
        tenants,
        ws,
        wss,
        client_tls: cert.client,
        _dir: dir,
    }
}

impl Running {
    async fn connect(&self, tls: bool) -> Ws {
        let (addr, config) = if tls {
            (self.wss, Some(&self.client_tls))
        } else {
            (self.ws, None)
        };
        let scheme = if tls { "wss" } else { "ws" };
        let req = format!("{scheme}://localhost:{}/", addr.port())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_falls_back_to_drain_for_a_shared_instance() {
    let running = start("shared").await;
    let mut old = running.connect(false).await;
    assert_eq!(ask(&mut old, "a").await, "v1:a");
    let tenants = running.tenants.clone();
    let bytes = std::fs::read(plugin_path("swap_v2")).unwrap();
    let outcome = tokio::task::spawn_blocking(move || {
        tenants.deploy("t", "swap_v2", &bytes, Policy::Migrate)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outcome.policy, Policy::Drain);
    assert!(outcome.note.is_some());
    assert_eq!(ask(&mut old, "b").await, "v1:b");
    let mut new = running.connect(false).await;
    assert_eq!(ask(&mut new, "c").await, "v2:c");
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
