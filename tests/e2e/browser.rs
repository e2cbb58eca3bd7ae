//! The chat example in a real browser: Wharf serves the page
//! (`plugins/chat/static/index.html`, via `[static_files]`) and the chat
//! plugin; two headless Chromium pages load it, connect with the browser's
//! own WebSocket API (ws:// from an http:// page, wss:// from https://) and
//! talk through the host's pub/sub fan-out. Chromium is driven over the
//! DevTools protocol (a WebSocket too), typing into the page's form and
//! reading what the page shows.
//!
//! Debian's Chromium is installed on first use by `tests/browser/install.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{Server, ServerOpts};

/// Page loads, connects and messages crossing two pages: generous, since the
/// machine also runs the other tests.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chat_static_dir() -> PathBuf {
    repo_root()
        .join("plugins/chat/static")
        .canonicalize()
        .expect("plugins/chat/static")
}

fn chat_server() -> Server {
    Server::start(ServerOpts {
        tls: true,
        extra: format!(
            "[static_files]\ndir = {:?}\n",
            chat_static_dir().display().to_string()
        ),
        ..ServerOpts::new("chat")
    })
}

/// Installs Chromium if needed; its path.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("WHARF_CHROMIUM") {
        return path.into();
    }
    let out = Command::new("bash")
        .arg(repo_root().join("tests/browser/install.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/browser/install.sh");
    assert!(out.status.success(), "tests/browser/install.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A headless Chromium with a fresh profile, driven over the DevTools protocol.
struct Browser {
    child: Child,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    profile: tempfile::TempDir,
}

/// One tab, attached with a flat session.
#[derive(Clone)]
struct Page {
    target: String,
    session: String,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(profile.path().join("chromium.log")).unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // The wss listener's certificate is a fresh self-signed one.
                "--ignore-certificate-errors",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromium");
        // Chromium writes its DevTools port and browser endpoint here.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not start; its log:\n{}",
                std::fs::read_to_string(profile.path().join("chromium.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (devtools, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .expect("connect to chromium's DevTools endpoint");
        Browser {
            child,
            devtools,
            next_id: 1,
            profile,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }

    /// One DevTools command; its `result`. Events arriving meanwhile are skipped.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.devtools
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to DevTools");
        let reply = tokio::time::timeout(BROWSER_TIMEOUT, async {
            loop {
                let frame = self.devtools.next().await;
                let Some(Ok(Message::Text(text))) = frame else {
                    match frame {
                        Some(Ok(_)) => continue,
                        other => panic!("DevTools connection ended: {other:?}"),
                    }
                };
                let value: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if value["id"] == json!(id) {
                    break value;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no DevTools answer to {method}"));
        if let Some(err) = reply.get("error") {
            panic!("DevTools {method} failed: {err}");
        }
        reply["result"].clone()
    }

    async fn open(&mut self, url: &str) -> Page {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": url }))
            .await["targetId"]
            .as_str()
            .expect("targetId")
            .to_owned();
        let session = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target, "flatten": true }),
            )
            .await["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        Page { target, session }
    }

    async fn close(&mut self, page: &Page) {
        self.call(
            None,
            "Target.closeTarget",
            json!({ "targetId": page.target }),
        )
        .await;
    }

    /// Evaluates a JavaScript expression in the page; its value.
    async fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let result = self
            .call(
                Some(&page.session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// The lines the page shows in its chat log.
    async fn lines(&mut self, page: &Page) -> Vec<String> {
        let v = self
            .eval(
                page,
                "[...document.querySelectorAll('#log li')].map(li => li.textContent)",
            )
            .await;
        serde_json::from_value(v).unwrap_or_default()
    }

    async fn status(&mut self, page: &Page) -> String {
        self.eval(
            page,
            "document.getElementById('status') ? document.getElementById('status').textContent : ''",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Waits until the page's chat log shows `line`.
    async fn wait_line(&mut self, page: &Page, line: &str) {
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        loop {
            let lines = self.lines(page).await;
            if lines.iter().any(|l| l == line) {
                return;
            }
            if Instant::now() > deadline {
                let status = self.status(page).await;
                panic!(
                    "page never showed {line:?}; it shows {lines:?}, status {status:?}; chromium log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the page says it is connected; that status line.
    async fn wait_connected(&mut self, page: &Page) -> String {
        let deadline = Instant::now() + BROWSER_TIMEOUT;
        loop {
            let status = self.status(page).await;
            if status.starts_with("connected") {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "page never connected; status {status:?}; chromium log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Types `text` into the page's input and presses its Send button.
    async fn say(&mut self, page: &Page, text: &str) {
        let text = serde_json::to_string(text).unwrap();
        self.eval(
            page,
            &format!(
                "document.getElementById('text').value = {text}; \
                 document.getElementById('button').click(); true"
            ),
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn two_pages_chat(tls: bool) {
    let server = chat_server();
    let base = format!(
        "{}://{}",
        if tls { "https" } else { "http" },
        server.addr(tls)
    );
    let room = if tls { "secure" } else { "plain" };
    let mut browser = Browser::launch().await;

    let alice = browser
        .open(&format!("{base}/?room={room}&nick=alice"))
        .await;
    let status = browser.wait_connected(&alice).await;
    let scheme = if tls { "wss" } else { "ws" };
    assert!(
        status.starts_with(&format!(
            "connected to {scheme}://{}/chat/{room}",
            server.addr(tls)
        )),
        "{status}"
    );
    browser
        .wait_line(&alice, &format!("* alice joined {room}"))
        .await;

    let bob = browser.open(&format!("{base}/?room={room}&nick=bob")).await;
    browser.wait_connected(&bob).await;
    browser
        .wait_line(&bob, &format!("* bob joined {room}"))
        .await;
    browser
        .wait_line(&alice, &format!("* bob joined {room}"))
        .await;

    browser.say(&alice, "hello from alice").await;
    browser.wait_line(&bob, "alice: hello from alice").await;
    browser.wait_line(&alice, "alice: hello from alice").await;

    browser.say(&bob, "hi alice, ünïcödé 👋").await;
    browser.wait_line(&alice, "bob: hi alice, ünïcödé 👋").await;

    browser.say(&bob, "/nick robert").await;
    browser.wait_line(&alice, "* bob is now robert").await;

    // Closing the tab closes its WebSocket; the others hear of it.
    browser.close(&bob).await;
    browser.wait_line(&alice, "* robert left").await;

    // The server saw real browser upgrades, and every one of them opened.
    assert!(
        server.log_text().lines().all(|l| !l.contains("ERROR")),
        "server log has errors:\n{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_between_two_chromium_pages_ws() {
    two_pages_chat(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_between_two_chromium_pages_wss() {
    two_pages_chat(true).await;
}

/// The static route itself, without a browser: the page, and nothing
/// outside the directory; upgrades on the same port still reach the plugin.
#[tokio::test]
async fn static_page_is_served_beside_the_socket() {
    let server = chat_server();
    for tls in [false, true] {
        let mut raw = server.raw(tls).await;
        raw.send(b"GET /?room=x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let resp = raw.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        let page = std::fs::read(chat_static_dir().join("index.html")).unwrap();
        assert_eq!(resp.body.as_bytes(), page);

        let mut raw = server.raw(tls).await;
        raw.send(b"GET /../Cargo.toml HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        assert_eq!(raw.read_response().await.status, 404);

        // POST is neither a page nor an upgrade.
        let mut raw = server.raw(tls).await;
        raw.send(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            .await;
        assert_eq!(raw.read_response().await.status, 405);

        let mut ws = server.connect_path(tls, "/chat/static?nick=ann").await;
        assert_eq!(
            crate::support::recv_text(&mut ws).await,
            "* ann joined static"
        );
    }
}
