//! A wss listener's certificate is reloaded while serving: when its files
//! are replaced, and on SIGHUP. New handshakes get the new certificate,
//! open connections carry on, and a bad pair is refused (with a warning
//! naming the file) while the previous one keeps serving.
//!
//! `Server::start` writes its own certificate where a test cannot change it,
//! so this test writes the whole config and starts `wharf serve` itself.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::*;

/// How long a change to the files may take to reach new handshakes.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

const NAME: &str = "reload.test";

/// A self-signed certificate for [`NAME`], as PEM, and its DER.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn pair() -> Pair {
    let ck = rcgen::generate_simple_self_signed(vec![NAME.to_string()]).expect("generate cert");
    Pair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

/// Replaces `path` the way ACME clients do: a new file renamed over it.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `wharf serve --config F`, stderr kept in a file; killed on drop.
struct Wharf {
    child: Child,
    stderr: PathBuf,
}

impl Wharf {
    /// One wss listener serving `cert`/`key`, and the echo plugin.
    fn spawn(dir: &Path, cert: &Path, key: &Path) -> Wharf {
        let config = dir.join("wharf.toml");
        std::fs::write(
            &config,
            format!(
                "[[listener]]\n\
                 address = \"127.0.0.1:0\"\n\
                 tls = {{ cert = {}, key = {} }}\n\
                 [plugin]\n\
                 path = {}\n\
                 cache_dir = {}\n",
                toml_path(cert),
                toml_path(key),
                toml_path(&plugin_path("echo")),
                toml_path(&cache_dir()),
            ),
        )
        .unwrap();
        let stderr = dir.join("stderr.log");
        let child = wharf_cmd()
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn wharf");
        Wharf { child, stderr }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Log lines holding every needle.
    fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits up to `timeout` for a log line holding every needle, beyond the
    /// first `seen` such lines; returns it.
    async fn wait_log(&self, needles: &[&str], seen: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log_lines(needles).into_iter().nth(seen) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no new log line with {needles:?} within {timeout:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of the one wss listener, from its "listening on" line.
    fn wss_addr(&mut self) -> SocketAddr {
        let stdout = self.child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once read, keep draining the pipe so wharf never blocks on it.
                let _ = tx.send(line);
            }
        });
        // Generous: the first start of a plugin compiles it.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on wss://") {
                        return addr.parse().expect("listener address");
                    }
                }
                Err(_) => panic!("wharf printed no wss listener; log:\n{}", self.log()),
            }
        }
    }

    fn sighup(&self) {
        let pid = i32::try_from(self.child.id()).expect("a pid");
        // SAFETY: signals the child this test spawned (and has not reaped).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "kill -HUP");
    }
}

impl Drop for Wharf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- wharf log ----\n{}\n-------------------", self.log());
        }
    }
}

/// A fresh TLS session to `addr` (a new client config each time, so never a
/// resumed session: the server always presents its certificate).
async fn tls_connect(addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let provider = wharf::server::tls::crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = within(IO_TIMEOUT, "TCP connect", TcpStream::connect(addr))
        .await
        .expect("TCP connect");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(NAME).expect("a DNS name");
    within(IO_TIMEOUT, "TLS handshake", connector.connect(name, tcp))
        .await
        .expect("TLS handshake")
}

/// The leaf certificate a new handshake gets.
async fn presented(addr: SocketAddr) -> CertificateDer<'static> {
    let tls = tls_connect(addr).await;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
        .clone()
}

/// Waits until new handshakes get `want`.
async fn wait_presented(addr: SocketAddr, want: &Pair, which: &str) {
    let deadline = Instant::now() + RELOAD_TIMEOUT;
    while presented(addr).await != want.der {
        assert!(
            Instant::now() < deadline,
            "new handshakes still do not get certificate {which} after {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_echoes(ws: &mut Ws, text: &str) {
    send_text(ws, text).await;
    assert_eq!(recv_text(ws).await, text);
}

#[tokio::test]
async fn wss_certificate_reloads_on_file_change_and_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (a, b) = (pair(), pair());
    std::fs::write(&cert, &a.cert_pem).unwrap();
    std::fs::write(&key, &a.key_pem).unwrap();
    let mut wharf = Wharf::spawn(dir.path(), &cert, &key);
    let addr = wharf.wss_addr();

    // A connection made under A, kept open throughout.
    let tls = tls_connect(addr).await;
    assert!(
        tls.get_ref().1.peer_certificates().unwrap()[0] == a.der,
        "the first connection did not get certificate A"
    );
    let req = format!("wss://{NAME}/").into_client_request().unwrap();
    let (mut old, resp) = within(
        IO_TIMEOUT,
        "websocket handshake",
        tokio_tungstenite::client_async(req, Stream::Tls(Box::new(tls))),
    )
    .await
    .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    assert_echoes(&mut old, "under A").await;

    // B renamed over both files, as an ACME client renews.
    const RELOADED: &[&str] = &["TLS certificates reloaded", "file change"];
    const REFUSED: &[&str] = &["WARN", "TLS certificates not reloaded"];
    const SIGHUP: &[&str] = &["TLS certificates reloaded", "SIGHUP"];
    replace(&cert, &b.cert_pem);
    replace(&key, &b.key_pem);
    wait_presented(addr, &b, "B").await;
    wharf.wait_log(RELOADED, 0, IO_TIMEOUT).await;
    assert_echoes(&mut old, "still here after B").await;

    // A bad pair (B's certificate, A's key): refused, B still served.
    let refused = wharf.log_lines(REFUSED).len();
    replace(&key, &a.key_pem);
    let warning = wharf.wait_log(REFUSED, refused, RELOAD_TIMEOUT).await;
    assert!(
        warning.contains(&format!(
            "private key {} does not match certificate {}",
            key.display(),
            cert.display()
        )),
        "the warning does not name the files: {warning}"
    );
    for _ in 0..3 {
        assert!(
            presented(addr).await == b.der,
            "a bad pair replaced certificate B"
        );
    }
    assert_echoes(&mut old, "still here after a bad pair").await;

    // A restored by a plain overwrite (its key is already there), then SIGHUP.
    std::fs::write(&cert, &a.cert_pem).unwrap();
    wharf.sighup();
    wait_presented(addr, &a, "A").await;
    wharf.wait_log(SIGHUP, 0, IO_TIMEOUT).await;
    assert_echoes(&mut old, "still here after SIGHUP").await;
    assert!(
        wharf.child.try_wait().unwrap().is_none(),
        "wharf exited on SIGHUP"
    );
}
