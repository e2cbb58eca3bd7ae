//! A wss listener with several certificates: the one presented is chosen by
//! the server name the client asks for (SNI), with `tls.cert` as the default.
//!
//! `Server::start` writes its own listeners and waits for exactly those, so
//! these tests write the whole config and start `wharf serve` themselves.

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

/// PEM files for a self-signed certificate, and its DER.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn pem(dir: &Path, stem: &str, names: &[&str]) -> Pem {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("generate cert");
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Pem {
        cert,
        key,
        der: ck.cert.der().clone(),
    }
}

/// A config with one wss listener: `default` for any name, and `acme` (with
/// `acme_key`) for `acme.test` and `*.acme.test`.
fn config(dir: &Path, default: &Pem, acme_cert: &Path, acme_key: &Path) -> PathBuf {
    let config = format!(
        "[[listener]]\n\
         address = \"127.0.0.1:0\"\n\
         tls = {{ cert = {}, key = {}, sni = [\n  \
           {{ names = [\"acme.test\", \"*.acme.test\"], cert = {}, key = {} }},\n\
         ] }}\n\
         [plugin]\n\
         path = {}\n\
         cache_dir = {}\n",
        toml_path(&default.cert),
        toml_path(&default.key),
        toml_path(acme_cert),
        toml_path(acme_key),
        toml_path(&plugin_path("echo")),
        toml_path(&cache_dir()),
    );
    let path = dir.join("wharf.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// `wharf serve --config F`, stderr kept in a file; killed on drop.
struct Wharf {
    child: Child,
    stderr: PathBuf,
}

impl Wharf {
    fn spawn(config: &Path) -> Wharf {
        let stderr = config.with_file_name("stderr.log");
        let child = wharf_cmd()
            .arg("serve")
            .arg("--config")
            .arg(config)
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

    /// Waits up to `timeout` for wharf to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wharf still running after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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

fn client_config(send_sni: bool) -> Arc<rustls::ClientConfig> {
    let provider = wharf::server::tls::crypto_provider();
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.enable_sni = send_sni;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS session to `addr` for server name `name` (sent as SNI unless
/// `send_sni` is false).
async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    send_sni: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = within(IO_TIMEOUT, "TCP connect", TcpStream::connect(addr))
        .await
        .expect("TCP connect");
    let connector = tokio_rustls::TlsConnector::from(client_config(send_sni));
    let name = ServerName::try_from(name.to_owned()).expect("a DNS name");
    within(IO_TIMEOUT, "TLS handshake", connector.connect(name, tcp))
        .await
        .expect("TLS handshake")
}

fn presented(tls: &tokio_rustls::client::TlsStream<TcpStream>) -> &CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server presented a certificate")
}

#[tokio::test]
async fn wss_certificate_is_chosen_by_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let default = pem(dir.path(), "default", &["default.test"]);
    let acme = pem(dir.path(), "acme", &["acme.test", "*.acme.test"]);
    let mut wharf = Wharf::spawn(&config(dir.path(), &default, &acme.cert, &acme.key));
    let addr = wharf.wss_addr();

    for (name, send_sni, want, which) in [
        ("acme.test", true, &acme, "acme"),
        ("Acme.TEST", true, &acme, "acme"),
        ("x.acme.test", true, &acme, "acme"),
        ("x.y.acme.test", true, &acme, "acme"),
        ("other.test", true, &default, "default"),
        ("notacme.test", true, &default, "default"),
        // No SNI at all: the name the client had in mind cannot matter.
        ("acme.test", false, &default, "default"),
    ] {
        let tls = tls_connect(addr, name, send_sni).await;
        assert!(
            presented(&tls) == &want.der,
            "{name} (SNI sent: {send_sni}) did not get the {which} certificate"
        );
    }

    // The connection that got the acme certificate serves WebSockets.
    let tls = tls_connect(addr, "x.y.acme.test", true).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let req = "wss://x.y.acme.test/".into_client_request().unwrap();
    let (mut ws, resp) = within(
        IO_TIMEOUT,
        "websocket handshake",
        tokio_tungstenite::client_async(req, Stream::Tls(Box::new(tls))),
    )
    .await
    .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    send_text(&mut ws, "hello acme").await;
    assert_eq!(recv_text(&mut ws).await, "hello acme");
}

#[test]
fn sni_key_not_matching_its_certificate_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let default = pem(dir.path(), "default", &["default.test"]);
    let acme = pem(dir.path(), "acme", &["acme.test", "*.acme.test"]);
    // acme.pem with the default certificate's key.
    let mut wharf = Wharf::spawn(&config(dir.path(), &default, &acme.cert, &default.key));
    let status = wharf.wait_exit(Duration::from_secs(60));
    let log = wharf.log();
    assert!(!status.success(), "wharf started; log:\n{log}");
    let want = format!(
        "private key {} does not match certificate {}",
        default.key.display(),
        acme.cert.display()
    );
    assert!(log.contains(&want), "no {want:?} in the log:\n{log}");
}
