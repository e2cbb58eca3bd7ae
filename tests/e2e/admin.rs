//! The admin API over HTTP, and the `wharf status|deploy|rollback` CLI:
//! health and readiness, the token, deploys (bytes or a server-side path),
//! refused components, rollbacks. Every request is bounded by a timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const TOKEN: &str = "e2e-admin-token-0123456789";
/// A deploy may compile (the first time a component is seen).
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// A server running `plugin` with the admin API, its token (if any) in a
/// file of the returned directory.
fn start(plugin: &'static str, token: Option<&str>) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut extra = String::from("[admin]\nlisten = \"127.0.0.1:0\"\n");
    if let Some(token) = token {
        let path = dir.path().join("admin-token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        extra += &format!("token_file = {:?}\n", path.display().to_string());
    }
    let server = Server::start(ServerOpts {
        server: r#"shutdown_timeout = "3s""#,
        extra,
        ..ServerOpts::new(plugin)
    });
    (server, dir)
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {self:?}"))
            .to_owned()
    }
}

/// One request on its own connection (`Connection: close`), read to EOF.
async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> Reply {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: wharf\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head += &format!("Authorization: Bearer {token}\r\n");
    }
    if let Some(content_type) = content_type {
        head += &format!("Content-Type: {content_type}\r\n");
    }
    head += "\r\n";
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await?;
        std::io::Result::Ok(out)
    };
    let raw = within(HTTP_TIMEOUT, "an admin API response", exchange)
        .await
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let reply = Reply {
        status,
        headers,
        body: body.to_owned(),
    };
    assert_ne!(
        reply.header("transfer-encoding"),
        Some("chunked"),
        "{reply:?}"
    );
    reply
}

async fn get(server: &Server, target: &str, token: Option<&str>) -> Reply {
    http(admin(server), "GET", target, token, None, b"").await
}

fn admin(server: &Server) -> SocketAddr {
    server.admin_addr.expect("admin configured")
}

/// `PUT /tenants/default/plugin?QUERY` with the bytes of `plugin`.
async fn deploy(server: &Server, query: &str, bytes: &[u8]) -> Reply {
    let target = format!("/tenants/default/plugin?{query}");
    http(
        admin(server),
        "PUT",
        &target,
        Some(TOKEN),
        Some("application/wasm"),
        bytes,
    )
    .await
}

async fn rollback(server: &Server, tenant: &str, query: &str) -> Reply {
    let target = format!("/tenants/{tenant}/rollback?{query}");
    http(admin(server), "POST", &target, Some(TOKEN), None, b"").await
}

/// The default tenant's versions, from `GET /tenants`.
async fn versions(server: &Server) -> Vec<Value> {
    let reply = get(server, "/tenants", Some(TOKEN)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let tenants = reply.json();
    let default = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "default")
        .unwrap_or_else(|| panic!("no default tenant in {tenants}"))
        .clone();
    default["versions"].as_array().unwrap().clone()
}

fn sha256_of(plugin: &str) -> String {
    hex::encode(Sha256::digest(std::fs::read(plugin_path(plugin)).unwrap()))
}

/// What a new connection's plugin answers to "setting x": chaos answers
/// "none", echo echoes.
async fn new_connection_answers(server: &Server) -> String {
    let mut ws = server.connect(false).await;
    send_text(&mut ws, "setting x").await;
    recv_text(&mut ws).await
}

#[tokio::test]
async fn health_readiness_status_and_the_token() {
    let (mut server, _dir) = start("echo", Some(TOKEN));

    let reply = get(&server, "/healthz", None).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
    let reply = get(&server, "/readyz", None).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let reply = get(&server, "/tenants", Some(TOKEN)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{reply:?}"
    );
    let tenants = reply.json();
    assert_eq!(tenants.as_array().unwrap().len(), 1, "{tenants}");
    assert_eq!(tenants[0]["name"], "default");
    let versions = tenants[0]["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{tenants}");
    assert_eq!(versions[0]["state"], "active");
    assert_eq!(versions[0]["plugin"], "echo");
    let sha = versions[0]["sha256"].as_str().unwrap();
    assert!(
        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha}"
    );
    assert_eq!(sha, sha256_of("echo"));

    // Without the token, or with a wrong one: 401 and a Bearer challenge.
    for token in [None, Some("wrong"), Some("e2e-admin-token-012345678")] {
        for (method, target) in [
            ("GET", "/tenants"),
            ("GET", "/metrics"),
            ("PUT", "/tenants/default/plugin"),
            ("POST", "/tenants/default/rollback"),
        ] {
            let reply = http(admin(&server), method, target, token, None, b"x").await;
            assert_eq!(reply.status, 401, "{method} {target} {token:?}: {reply:?}");
            assert!(
                reply
                    .header("www-authenticate")
                    .is_some_and(|v| v.starts_with("Bearer")),
                "{reply:?}"
            );
            assert!(!reply.error().is_empty());
        }
    }
    // With it, metrics too.
    let reply = get(&server, "/metrics", Some(TOKEN)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.ends_with("# EOF\n"));

    // A bad policy, an unknown tenant, an announced oversized upload.
    let reply = deploy(&server, "policy=sideways", b"x").await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.error().contains("sideways"), "{reply:?}");
    let reply = rollback(&server, "nobody", "").await;
    assert_eq!(reply.status, 404, "{reply:?}");
    let reply = rollback(&server, "default", "").await;
    assert_eq!(reply.status, 409, "nothing to roll back to: {reply:?}");
    let mut raw = TcpStream::connect(admin(&server)).await.unwrap();
    let head = format!(
        "PUT /tenants/default/plugin HTTP/1.1\r\nHost: wharf\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: {}\r\n\r\n",
        65 << 20
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = within(IO_TIMEOUT, "413", raw.read(&mut out)).await.unwrap();
    let text = String::from_utf8_lossy(&out[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // Shutdown began: not ready, still healthy, while a connection that
    // does not answer the 1001 close holds the server up.
    let _open = server.raw_upgraded(false, "/").await;
    server.sigterm();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reply = get(&server, "/readyz", None).await;
        if reply.status == 503 {
            break;
        }
        assert_eq!(reply.status, 200);
        assert!(Instant::now() < deadline, "/readyz still {reply:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&server, "/healthz", None).await.status, 200);
    assert!(
        server.wait_exit(Duration::from_secs(10)).await.is_some(),
        "the server did not exit"
    );
}

#[tokio::test]
async fn without_a_token_swaps_are_forbidden_and_reads_open() {
    let (server, _dir) = start("echo", None);
    let chaos = std::fs::read(plugin_path("chaos")).unwrap();
    for (method, target) in [
        ("PUT", "/tenants/default/plugin?policy=drain"),
        ("POST", "/tenants/default/rollback"),
    ] {
        let reply = http(admin(&server), method, target, Some(TOKEN), None, &chaos).await;
        assert_eq!(reply.status, 403, "{reply:?}");
        assert_eq!(
            reply.error(),
            "no admin token configured: mutating endpoints are off"
        );
    }
    assert_eq!(get(&server, "/tenants", None).await.status, 200);
    // The existing scrape (Server::metrics) works unchanged.
    assert!(server.metrics().await.ends_with("# EOF\n"));
    assert_eq!(new_connection_answers(&server).await, "setting x");
}

#[tokio::test]
async fn deploy_drains_old_connections_and_serves_new_ones_on_the_new_version() {
    let (server, _dir) = start("echo", Some(TOKEN));
    let mut old = server.connect(false).await;
    send_text(&mut old, "before").await;
    assert_eq!(recv_text(&mut old).await, "before");

    let chaos = std::fs::read(plugin_path("chaos")).unwrap();
    let reply = deploy(&server, "policy=drain&name=chaos", &chaos).await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", server.log_text());
    let outcome = reply.json();
    assert_eq!(outcome["tenant"], "default");
    assert_eq!(outcome["sha256"], sha256_of("chaos"));
    assert_eq!(outcome["previous"], sha256_of("echo"));
    assert_eq!(outcome["policy"], "drain");
    assert_eq!(outcome["open_connections"], 1);

    // The connection from before stays on echo; a new one gets chaos.
    send_text(&mut old, "setting x").await;
    assert_eq!(recv_text(&mut old).await, "setting x");
    let mut new = server.connect(false).await;
    send_text(&mut new, "setting x").await;
    assert_eq!(recv_text(&mut new).await, "none");

    let versions = versions(&server).await;
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0]["plugin"], "chaos");
    assert_eq!(versions[0]["state"], "active");
    assert_eq!(versions[0]["connections"], 1);
    assert_eq!(versions[1]["plugin"], "echo");
    assert_eq!(versions[1]["state"], "draining");
    assert_eq!(versions[1]["connections"], 1);
    // The same, per version, in /metrics.
    let scrape = get(&server, "/metrics", Some(TOKEN)).await.body;
    for (plugin, state) in [("chaos", "active"), ("echo", "draining")] {
        let series = format!(
            "wharf_version_connections_open{{tenant=\"default\",version=\"{}\",state=\"{state}\"}} 1",
            &sha256_of(plugin)[..16]
        );
        assert!(scrape.contains(&series), "{series} not in\n{scrape}");
    }

    // Once the old connection closes, only chaos serves (echo is kept,
    // without connections, for a rollback).
    old.close(None).await.unwrap();
    recv_close(&mut old).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let versions = self::versions(&server).await;
        let serving: Vec<&Value> = versions
            .iter()
            .filter(|v| v["state"] == "active" || v["state"] == "draining")
            .collect();
        if serving.len() == 1 {
            assert_eq!(serving[0]["plugin"], "chaos");
            assert!(
                versions[1..].iter().all(|v| v["connections"] == 0),
                "{versions:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "still draining: {versions:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(new);
}

#[tokio::test]
async fn broken_components_are_refused_and_the_running_version_keeps_serving() {
    let (server, _dir) = start("echo", Some(TOKEN));
    // Not a component at all (fixed pseudo-random bytes).
    let mut junk = vec![0u8; 4096];
    let mut x: u32 = 0x9e37_79b9;
    for b in &mut junk {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let reply = deploy(&server, "policy=drain", &junk).await;
    assert_eq!(reply.status, 422, "{reply:?}");
    assert!(reply.error().contains("not a valid component"), "{reply:?}");

    let incomplete = std::fs::read(plugin_path("incomplete")).unwrap();
    let reply = deploy(&server, "policy=migrate&name=incomplete", &incomplete).await;
    assert_eq!(reply.status, 422, "{reply:?}");
    assert!(reply.error().contains("on-close"), "{reply:?}");

    assert_eq!(new_connection_answers(&server).await, "setting x");
    let versions = versions(&server).await;
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0]["sha256"], sha256_of("echo"));
}

#[tokio::test]
async fn rollback_flips_between_the_last_two_versions() {
    let (server, _dir) = start("echo", Some(TOKEN));
    // Deploy by a path the server reads.
    let body = serde_json::json!({ "path": plugin_path("chaos") }).to_string();
    let reply = http(
        admin(&server),
        "PUT",
        "/tenants/default/plugin",
        Some(TOKEN),
        Some("application/json"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["sha256"], sha256_of("chaos"));
    assert_eq!(new_connection_answers(&server).await, "none");

    let reply = rollback(&server, "default", "policy=drain").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["sha256"], sha256_of("echo"));
    assert_eq!(reply.json()["previous"], sha256_of("chaos"));
    assert_eq!(new_connection_answers(&server).await, "setting x");

    // The previous version is now chaos again.
    let reply = rollback(&server, "default", "policy=restart").await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()["sha256"], sha256_of("chaos"));
    assert_eq!(reply.json()["policy"], "restart");
    assert_eq!(new_connection_answers(&server).await, "none");
}

/// Runs `wharf ARGS` (token in its environment), bounded in time.
async fn cli(args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = wharf_cmd();
    cmd.args(args)
        .env_remove("WHARF_ADMIN")
        .env_remove("WHARF_CONFIG")
        .env_remove("WHARF_ADMIN_TOKEN");
    if let Some(token) = token {
        cmd.env("WHARF_ADMIN_TOKEN", token);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    within(HTTP_TIMEOUT, "the wharf CLI", cmd.output())
        .await
        .expect("run wharf")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[tokio::test]
async fn cli_deploys_shows_status_and_reports_errors() {
    let (server, dir) = start("echo", Some(TOKEN));
    let url = format!("http://{}", admin(&server));
    let chaos = plugin_path("chaos");
    let chaos = chaos.to_str().unwrap();

    let out = cli(&["deploy", "default", chaos, "--admin", &url], Some(TOKEN)).await;
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains(&sha256_of("chaos")), "{stdout}");
    assert_eq!(new_connection_answers(&server).await, "none");

    // The token from a file this time.
    let token_file = dir.path().join("admin-token");
    let out = cli(
        &[
            "status",
            "--admin",
            &url,
            "--token-file",
            token_file.to_str().unwrap(),
        ],
        None,
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("default"), "{stdout}");
    assert!(stdout.contains(&sha256_of("chaos")[..12]), "{stdout}");
    assert!(stdout.contains(&sha256_of("echo")[..12]), "{stdout}");
    assert!(stdout.contains("active"), "{stdout}");

    // Not a component: the server's message, exit non-zero.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is not webassembly").unwrap();
    let out = cli(
        &["deploy", "default", junk.to_str().unwrap(), "--admin", &url],
        Some(TOKEN),
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("422"), "{stderr}");
    assert!(stderr.contains("not a valid component"), "{stderr}");

    // No token: 401, with a hint.
    let out = cli(&["status", "--admin", &url], None).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("401"), "{stderr}");

    // Rollback, then a usage error (exit 2).
    let out = cli(
        &["rollback", "default", "--admin", &url, "--policy", "drain"],
        Some(TOKEN),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&sha256_of("echo")));
    assert_eq!(new_connection_answers(&server).await, "setting x");
    let out = cli(
        &[
            "rollback", "default", "--admin", &url, "--policy", "sideways",
        ],
        Some(TOKEN),
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // Nobody there.
    let out = cli(&["status", "--admin", "http://127.0.0.1:1"], Some(TOKEN)).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
}
