//! A self-signed certificate for `localhost` written to a directory, and a
//! client configuration that trusts it: what the benches' wss servers and
//! their clients share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

pub struct SelfSigned {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client: Arc<rustls::ClientConfig>,
}

impl SelfSigned {
    /// Writes `cert.pem` and `key.pem` into `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .context("generate self-signed certificate")?;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).context("write cert")?;
        std::fs::write(&key, ck.signing_key.serialize_pem()).context("write key")?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).context("trust cert")?;
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            cert,
            key,
            client: Arc::new(client),
        })
    }
}
