//! `wss` listeners: rustls configured from PEM files, with the certificate
//! chosen per connection by the server name the client asks for (SNI).
//!
//! `tls.cert`/`tls.key` is the default; each `tls.sni` entry serves its own
//! certificate to clients asking for one of its names. A name is matched
//! case-insensitively, without a trailing dot: an exact name first, else the
//! longest matching wildcard (`*.example.com` covers one or more labels before
//! `example.com`, not `example.com` itself), else the default, which is also
//! what a client sending no name gets.
//!
//! Every file and name is checked when the listener is set up, so a bad
//! entry stops the server at start instead of failing handshakes later.
//!
//! The certificates can be reloaded while serving ([`TlsReloader`]): every
//! file is read and checked again exactly as at start, and only a wholly
//! valid set replaces the one in use; new handshakes then get the new
//! certificates, established connections keep their session. What triggers
//! a reload (file changes, SIGHUP) is in [`super::tls_reload`].

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why a TLS listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate chain {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("private key {key} does not match certificate {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error("{entry} lists no server names")]
    NoNames { entry: String },
    #[error("{entry}: invalid server name {name:?}: {problem}")]
    Name {
        entry: String,
        name: String,
        problem: &'static str,
    },
    #[error("server name {name:?} is listed twice: by {first} and by {second}")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
    #[error("cannot set up TLS: {0}")]
    Protocol(#[source] rustls::Error),
}

/// The cryptography of every TLS listener (and of the tests' clients):
/// aws-lc-rs, rustls's default, whose AES-GCM uses AVX-512 and VAES where
/// the CPU has them (16 KiB records seal 1.5× as fast as with ring; see
/// `host/benches/RESULTS.md`).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Builds the acceptor for one listener (its certificates as they are now:
/// what `wharf check` needs).
pub fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    reloadable_acceptor(tls).map(|(acceptor, _)| acceptor)
}

/// Builds the acceptor for one listener, and the handle that reloads the
/// certificates it serves.
pub fn reloadable_acceptor(tls: &TlsConfig) -> Result<(TlsAcceptor, TlsReloader), TlsError> {
    let provider = crypto_provider();
    let certificates = Certificates::load(tls, &provider)?;
    let certs = Arc::new(ReloadableCerts {
        current: ArcSwap::from_pointee(certificates),
        config: tls.clone(),
        provider: provider.clone(),
        reloading: Mutex::new(()),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    // WebSocket upgrades are HTTP/1.1 only (RFC 8441's HTTP/2 mode is not served).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), TlsReloader { certs }))
}

/// Reloads one listener's certificates; cheap to clone (all clones reload
/// the same listener).
#[derive(Clone)]
pub struct TlsReloader {
    certs: Arc<ReloadableCerts>,
}

/// What a successful [`TlsReloader::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Whether any certificate differs from the ones served before (if not,
    /// nothing was swapped).
    pub changed: bool,
    /// The soonest expiry (notAfter, as `YYYY-MM-DD HH:MM:SS UTC`) among the
    /// listener's leaf certificates now served, if it could be read.
    pub not_after: Option<String>,
}

impl TlsReloader {
    /// Reads and checks every certificate and key file of the listener again,
    /// exactly as at start-up, and serves them to new handshakes if they are
    /// all valid. On an error nothing changes: the previous certificates
    /// stay in use, and the error names the file at fault.
    ///
    /// Blocking (it reads files): from async code, call it in
    /// `spawn_blocking`. Concurrent calls take turns.
    pub fn reload(&self) -> Result<Reloaded, TlsError> {
        let certs = &self.certs;
        let _turn = certs.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = Certificates::load(&certs.config, &certs.provider)?;
        let changed = !fresh.same_certificates(&certs.current.load());
        let not_after = fresh.soonest_not_after();
        if changed {
            certs.current.store(Arc::new(fresh));
        }
        Ok(Reloaded { changed, not_after })
    }

    /// The listener's default certificate file, which names it in logs.
    pub fn cert(&self) -> &Path {
        &self.certs.config.cert
    }

    /// Every certificate and key file the listener reads, each once.
    pub fn files(&self) -> Vec<PathBuf> {
        let tls = &self.certs.config;
        let mut files: Vec<PathBuf> = Vec::new();
        let pairs = std::iter::once((&tls.cert, &tls.key))
            .chain(tls.sni.iter().map(|sni| (&sni.cert, &sni.key)));
        for (cert, key) in pairs {
            for file in [cert, key] {
                if !files.contains(file) {
                    files.push(file.clone());
                }
            }
        }
        files
    }

    /// The soonest notAfter among the leaf certificates served now.
    pub fn not_after(&self) -> Option<String> {
        self.certs.current.load().soonest_not_after()
    }
}

#[cfg(test)]
impl TlsReloader {
    /// The leaf served now to a client asking for `name`.
    pub(crate) fn serving(&self, name: Option<&str>) -> CertificateDer<'static> {
        self.certs.current.load().pick(name).cert[0].clone()
    }
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("cert", &self.cert())
            .field("serving", &**self.certs.current.load())
            .finish()
    }
}

/// The resolver a listener's rustls config holds: whichever [`Certificates`]
/// were loaded last.
struct ReloadableCerts {
    current: ArcSwap<Certificates>,
    config: TlsConfig,
    provider: Arc<CryptoProvider>,
    /// Held while reloading, so an older read never replaces a newer one.
    reloading: Mutex<()>,
}

impl ResolvesServerCert for ReloadableCerts {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(client_hello.server_name()).clone())
    }
}

impl fmt::Debug for ReloadableCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableCerts")
            .field("current", &**self.current.load())
            .finish_non_exhaustive()
    }
}

/// A listener's certificates, by the server name they are served for.
struct Certificates {
    /// Exact names (normalized).
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Wildcards as their suffix (`*.example.com` is `.example.com`), longest
    /// first: the first one a name ends with is the most specific.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
    /// Every pair, in the order of the configuration (the default first).
    pairs: Vec<Arc<CertifiedKey>>,
}

impl Certificates {
    fn load(tls: &TlsConfig, provider: &CryptoProvider) -> Result<Self, TlsError> {
        let default = load_pair(&tls.cert, &tls.key, provider)?;
        let mut pairs = vec![default.clone()];
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        // Normalized name -> the entry that listed it, to name both on a clash.
        let mut seen: HashMap<String, String> = HashMap::new();
        for (index, sni) in tls.sni.iter().enumerate() {
            let entry = format!("tls.sni[{index}] ({})", sni.cert.display());
            if sni.names.is_empty() {
                return Err(TlsError::NoNames { entry });
            }
            let mut patterns = Vec::with_capacity(sni.names.len());
            for name in &sni.names {
                let pattern = parse_name(name).map_err(|problem| TlsError::Name {
                    entry: entry.clone(),
                    name: name.clone(),
                    problem,
                })?;
                match seen.entry(pattern.normalized()) {
                    Entry::Occupied(first) => {
                        return Err(TlsError::DuplicateName {
                            name: name.clone(),
                            first: first.get().clone(),
                            second: entry,
                        });
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(entry.clone());
                    }
                }
                patterns.push(pattern);
            }
            let key = load_pair(&sni.cert, &sni.key, provider)?;
            pairs.push(key.clone());
            for pattern in patterns {
                match pattern {
                    Pattern::Exact(name) => {
                        exact.insert(name, key.clone());
                    }
                    Pattern::Wildcard(suffix) => wildcards.push((suffix, key.clone())),
                }
            }
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Ok(Self {
            exact,
            wildcards,
            default,
            pairs,
        })
    }

    /// Whether both hold the same certificate chains (for the same
    /// configuration, so for the same names).
    fn same_certificates(&self, other: &Certificates) -> bool {
        self.pairs.len() == other.pairs.len()
            && self
                .pairs
                .iter()
                .zip(&other.pairs)
                .all(|(a, b)| a.cert == b.cert)
    }

    /// The soonest notAfter among the leaves. The format sorts by time.
    fn soonest_not_after(&self) -> Option<String> {
        self.pairs
            .iter()
            .filter_map(|pair| not_after(pair.cert.first()?))
            .min()
    }

    /// The certificate for the server name a client sent, if any.
    fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        // rustls already lowercases the name and drops its trailing dot;
        // doing it again keeps this matcher correct on its own.
        let name = normalize(name);
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        self.wildcards
            .iter()
            // Longer than the suffix: at least one label precedes it.
            .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(suffix.as_str()))
            .map_or(&self.default, |(_, key)| key)
    }
}

// By hand: the derived form would print every certificate's DER bytes.
impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut exact: Vec<&String> = self.exact.keys().collect();
        exact.sort();
        let wildcards: Vec<String> = self
            .wildcards
            .iter()
            .map(|(s, _)| format!("*{s}"))
            .collect();
        f.debug_struct("Certificates")
            .field("exact", &exact)
            .field("wildcards", &wildcards)
            .finish_non_exhaustive()
    }
}

/// A configured server name, normalized.
#[derive(Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// The suffix after the `*`, leading dot included.
    Wildcard(String),
}

impl Pattern {
    fn normalized(&self) -> String {
        match self {
            Pattern::Exact(name) => name.clone(),
            Pattern::Wildcard(suffix) => format!("*{suffix}"),
        }
    }
}

fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

fn parse_name(name: &str) -> Result<Pattern, &'static str> {
    let name = normalize(name);
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.contains('/') {
        return Err("a server name is a host name, not a URL");
    }
    if name.contains(':') {
        return Err("a server name has no port");
    }
    let (wildcard, host) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name.as_str()),
    };
    if host.contains('*') {
        return Err("'*' may only be a whole first label, as in \"*.example.com\"");
    }
    // A client's name is a DNS name, so anything else could never match.
    // (DnsName would also accept, and drop, a second trailing dot.)
    if host.ends_with('.') || DnsName::try_from(host).is_err() {
        return Err("not a valid DNS name");
    }
    Ok(if wildcard {
        Pattern::Wildcard(format!(".{host}"))
    } else {
        Pattern::Exact(name)
    })
}

/// A certificate chain and its private key, checked to belong together.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let key_err = |reason: String| TlsError::Key {
        path: key.display().to_string(),
        reason,
    };
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => key_err("no PRIVATE KEY block found".into()),
        e => key_err(e.to_string()),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| key_err(e.to_string()))?;
    let pair = CertifiedKey::new(chain, signing_key);
    match pair.keys_match() {
        // Unknown: the key cannot tell its public half, so there is nothing to
        // compare; rustls's own `with_single_cert` accepts such keys too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            });
        }
        // Comparing parses the leaf, so this is a malformed certificate.
        Err(e) => {
            let reason = match e {
                rustls::Error::InvalidCertificate(why) => {
                    format!("the first certificate is not valid X.509 ({why:?})")
                }
                e => format!("the first certificate: {e}"),
            };
            return Err(TlsError::Cert {
                path: cert.display().to_string(),
                reason,
            });
        }
    }
    Ok(Arc::new(pair))
}

/// A certificate's notAfter, as `YYYY-MM-DD HH:MM:SS UTC`: just enough DER
/// reading to walk to the validity (the leaf was already parsed and checked
/// against its key, so this only fails on an unusual time format).
fn not_after(cert: &[u8]) -> Option<String> {
    /// The tag, the contents and what follows of the DER element at `der`.
    fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = der.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let len = bytes.iter().fold(0usize, |n, &b| n << 8 | usize::from(b));
            (len, rest)
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, certificate, _) = element(cert)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = element(certificate)? else {
        return None;
    };
    // [0] version (optional), serialNumber, signature, issuer; then validity.
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2;
    }
    for _ in 0..3 {
        tbs = element(tbs)?.2;
    }
    let (SEQUENCE, validity, _) = element(tbs)? else {
        return None;
    };
    let (tag, time, _) = element(element(validity)?.2)?;
    let time = std::str::from_utf8(time).ok()?;
    let digits = time.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        // UTCTime: YYMMDDHHMMSSZ, years 1950 to 2049 (RFC 5280).
        (0x17, 12) => {
            let yy: u32 = digits[..2].parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, &digits[2..])
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        (0x18, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    Some(format!(
        "{year:04}-{}-{} {}:{}:{} UTC",
        &rest[0..2],
        &rest[2..4],
        &rest[4..6],
        &rest[6..8],
        &rest[8..10]
    ))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Cert {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::SniCertificate;

    /// PEM files for a self-signed certificate, and its DER.
    struct Pem {
        cert: PathBuf,
        key: PathBuf,
        der: CertificateDer<'static>,
    }

    fn pem(dir: &Path, stem: &str, names: &[&str]) -> Pem {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
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

    fn sni(names: &[&str], pem: &Pem) -> SniCertificate {
        SniCertificate {
            names: names.iter().map(|n| n.to_string()).collect(),
            cert: pem.cert.clone(),
            key: pem.key.clone(),
        }
    }

    fn config(default: &Pem, sni: Vec<SniCertificate>) -> TlsConfig {
        TlsConfig {
            cert: default.cert.clone(),
            key: default.key.clone(),
            sni,
        }
    }

    fn load(tls: &TlsConfig) -> Result<Certificates, TlsError> {
        Certificates::load(tls, &crypto_provider())
    }

    fn load_err(tls: &TlsConfig) -> String {
        match load(tls) {
            Ok(c) => panic!("loaded {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts which certificate each server name gets.
    fn assert_picks(certs: &Certificates, cases: &[(Option<&str>, &Pem)]) {
        for (name, want) in cases {
            assert!(
                certs.pick(*name).cert[0] == want.der,
                "{name:?} did not get {}",
                want.cert.display()
            );
        }
    }

    #[test]
    fn exact_name_beats_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        let (default, wild, exact) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "wild", &["*.example.com"]),
            pem(dir.path(), "exact", &["a.example.com"]),
        );
        // The wildcard entry comes first: order in the file does not matter.
        let tls = config(
            &default,
            vec![
                sni(&["*.example.com"], &wild),
                sni(&["a.example.com"], &exact),
            ],
        );
        let certs = load(&tls).unwrap();
        assert_picks(
            &certs,
            &[
                (Some("a.example.com"), &exact),
                (Some("b.example.com"), &wild),
            ],
        );
    }

    #[test]
    fn longest_wildcard_wins() {
        let dir = tempfile::tempdir().unwrap();
        let (default, short, long) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "short", &["*.example.com"]),
            pem(dir.path(), "long", &["*.b.example.com"]),
        );
        let tls = config(
            &default,
            vec![
                sni(&["*.example.com"], &short),
                sni(&["*.b.example.com"], &long),
            ],
        );
        let certs = load(&tls).unwrap();
        assert_picks(
            &certs,
            &[
                (Some("x.b.example.com"), &long),
                (Some("x.y.b.example.com"), &long),
                (Some("x.c.example.com"), &short),
                // `*.b.example.com` does not cover `b.example.com` itself.
                (Some("b.example.com"), &short),
            ],
        );
    }

    #[test]
    fn wildcard_covers_several_labels_but_not_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let (default, wild) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "wild", &["*.example.com"]),
        );
        let certs = load(&config(&default, vec![sni(&["*.example.com"], &wild)])).unwrap();
        assert_picks(
            &certs,
            &[
                (Some("a.example.com"), &wild),
                (Some("a.b.example.com"), &wild),
                (Some("a.b.c.example.com"), &wild),
                (Some("example.com"), &default),
                // A suffix match must end at a label boundary.
                (Some("notexample.com"), &default),
                (Some("a.example.com.evil"), &default),
            ],
        );
    }

    #[test]
    fn no_name_or_no_match_gets_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        let certs = load(&config(
            &default,
            vec![sni(&["acme.test", "*.acme.test"], &acme)],
        ))
        .unwrap();
        assert_picks(
            &certs,
            &[
                (None, &default),
                (Some("other.test"), &default),
                (Some("acme.test.other"), &default),
                (Some("acme.test"), &acme),
            ],
        );
        // No entries at all: everyone gets the default.
        let certs = load(&config(&default, vec![])).unwrap();
        assert_picks(&certs, &[(None, &default), (Some("acme.test"), &default)]);
    }

    #[test]
    fn names_match_ignoring_case_and_trailing_dot() {
        let dir = tempfile::tempdir().unwrap();
        let (default, exact, wild) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "exact", &["acme.test"]),
            pem(dir.path(), "wild", &["*.wild.test"]),
        );
        let certs = load(&config(
            &default,
            vec![sni(&["Acme.TEST."], &exact), sni(&["*.Wild.Test"], &wild)],
        ))
        .unwrap();
        assert_picks(
            &certs,
            &[
                (Some("acme.test"), &exact),
                (Some("ACME.test."), &exact),
                (Some("x.wild.test"), &wild),
                (Some("X.WILD.TEST."), &wild),
            ],
        );
    }

    #[test]
    fn acceptor_keeps_http11_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        let acceptor = acceptor(&config(&default, vec![sni(&["acme.test"], &acme)])).unwrap();
        assert_eq!(acceptor.config().alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    fn reloadable(tls: &TlsConfig) -> TlsReloader {
        reloadable_acceptor(tls).unwrap().1
    }

    /// Asserts which certificate a reloader serves to each server name.
    fn assert_serves(reloader: &TlsReloader, cases: &[(Option<&str>, &CertificateDer<'_>, &str)]) {
        for (name, want, which) in cases {
            assert!(
                reloader.serving(*name) == **want,
                "{name:?} did not get the {which} certificate"
            );
        }
    }

    #[test]
    fn reload_serves_the_new_pair_for_the_same_name() {
        let dir = tempfile::tempdir().unwrap();
        let old = pem(dir.path(), "default", &["default.test"]);
        let reloader = reloadable(&config(&old, vec![]));
        assert_serves(&reloader, &[(Some("default.test"), &old.der, "old")]);
        // Unchanged files: nothing to swap.
        assert!(!reloader.reload().unwrap().changed);
        assert_serves(&reloader, &[(Some("default.test"), &old.der, "old")]);

        // The same paths, a new pair.
        let new = pem(dir.path(), "default", &["default.test"]);
        assert!(new.der != old.der);
        let reloaded = reloader.reload().unwrap();
        assert!(reloaded.changed);
        assert!(reloaded.not_after.is_some(), "{reloaded:?}");
        assert_serves(
            &reloader,
            &[
                (Some("default.test"), &new.der, "new"),
                (None, &new.der, "new"),
            ],
        );
    }

    #[test]
    fn reload_refuses_a_bad_pair_and_keeps_serving_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let old = pem(dir.path(), "default", &["default.test"]);
        let reloader = reloadable(&config(&old, vec![]));
        let old_key = std::fs::read(&old.key).unwrap();

        // A new certificate, its key not (yet) written: a mismatch.
        let new = pem(dir.path(), "default", &["default.test"]);
        std::fs::write(&new.key, &old_key).unwrap();
        let err = reloader.reload().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "private key {} does not match certificate {}",
                old.key.display(),
                new.cert.display()
            )
        );
        assert_serves(&reloader, &[(Some("default.test"), &old.der, "old")]);

        // A file gone, or garbage: refused the same way.
        std::fs::remove_file(&new.key).unwrap();
        let err = reloader.reload().unwrap_err().to_string();
        assert!(err.starts_with("cannot read private key"), "{err}");
        std::fs::write(&new.key, "not a key").unwrap();
        let err = reloader.reload().unwrap_err().to_string();
        assert!(err.contains("no PRIVATE KEY block found"), "{err}");
        assert_serves(&reloader, &[(Some("default.test"), &old.der, "old")]);

        // Once the pair matches again, it is served.
        let fixed = pem(dir.path(), "default", &["default.test"]);
        assert!(reloader.reload().unwrap().changed);
        assert_serves(&reloader, &[(Some("default.test"), &fixed.der, "fixed")]);
    }

    #[test]
    fn reload_covers_sni_entries_and_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme, wild) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
            pem(dir.path(), "wild", &["*.wild.test"]),
        );
        let reloader = reloadable(&config(
            &default,
            vec![sni(&["acme.test"], &acme), sni(&["*.wild.test"], &wild)],
        ));
        assert_serves(
            &reloader,
            &[
                (Some("acme.test"), &acme.der, "acme"),
                (Some("x.wild.test"), &wild.der, "wild"),
                (Some("other.test"), &default.der, "default"),
            ],
        );

        // Only an SNI entry's files change.
        let acme2 = pem(dir.path(), "acme", &["acme.test"]);
        assert!(reloader.reload().unwrap().changed);
        assert_serves(
            &reloader,
            &[
                (Some("acme.test"), &acme2.der, "new acme"),
                (Some("x.wild.test"), &wild.der, "wild"),
                (Some("other.test"), &default.der, "default"),
            ],
        );

        // A good new default with a bad wildcard entry: nothing is swapped,
        // not even the good part.
        let default_key = std::fs::read(&default.key).unwrap();
        let default2 = pem(dir.path(), "default", &["default.test"]);
        std::fs::write(&wild.key, &default_key).unwrap();
        let err = reloader.reload().unwrap_err().to_string();
        assert!(
            err.contains("does not match") && err.contains(&wild.cert.display().to_string()),
            "{err}"
        );
        assert_serves(
            &reloader,
            &[
                (Some("acme.test"), &acme2.der, "new acme"),
                (Some("x.wild.test"), &wild.der, "wild"),
                (Some("other.test"), &default.der, "old default"),
            ],
        );

        let wild2 = pem(dir.path(), "wild", &["*.wild.test"]);
        assert!(reloader.reload().unwrap().changed);
        assert_serves(
            &reloader,
            &[
                (Some("acme.test"), &acme2.der, "new acme"),
                (Some("a.b.wild.test"), &wild2.der, "new wild"),
                (Some("other.test"), &default2.der, "new default"),
            ],
        );
    }

    #[test]
    fn reloader_lists_every_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        let reloader = reloadable(&config(
            &default,
            vec![sni(&["acme.test"], &acme), sni(&["other.test"], &default)],
        ));
        assert_eq!(reloader.cert(), default.cert);
        assert_eq!(
            reloader.files(),
            vec![
                default.cert.clone(),
                default.key.clone(),
                acme.cert.clone(),
                acme.key.clone()
            ]
        );
    }

    #[test]
    fn not_after_is_read_from_the_leaf() {
        let cert = |not_after| {
            let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
            params.not_after = not_after;
            let key = rcgen::KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        // UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280).
        let t = rcgen::date_time_ymd(2031, 5, 17)
            + std::time::Duration::from_secs(13 * 3600 + 4 * 60 + 5);
        assert_eq!(
            not_after(&cert(t)).as_deref(),
            Some("2031-05-17 13:04:05 UTC")
        );
        assert_eq!(
            not_after(&cert(rcgen::date_time_ymd(2051, 1, 2))).as_deref(),
            Some("2051-01-02 00:00:00 UTC")
        );
        assert_eq!(
            not_after(&cert(rcgen::date_time_ymd(1999, 12, 31))).as_deref(),
            Some("1999-12-31 00:00:00 UTC")
        );
        for junk in [&b""[..], b"\x30", b"\x30\x05abc", b"\x04\x00"] {
            assert_eq!(not_after(junk), None);
        }

        // The soonest of a listener's leaves is reported.
        let dir = tempfile::tempdir().unwrap();
        let write = |stem: &str, year| {
            let mut params = rcgen::CertificateParams::new(vec![format!("{stem}.test")]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let (c, k) = (
                dir.path().join(format!("{stem}.pem")),
                dir.path().join(format!("{stem}-key.pem")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            Pem {
                cert: c,
                key: k,
                der: cert.der().clone(),
            }
        };
        let (late, soon) = (write("late", 2040), write("soon", 2030));
        let reloader = reloadable(&config(&late, vec![sni(&["soon.test"], &soon)]));
        assert_eq!(
            reloader.not_after().as_deref(),
            Some("2030-01-01 00:00:00 UTC")
        );
    }

    #[test]
    fn mismatched_key_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        let crossed = Pem {
            cert: acme.cert.clone(),
            key: default.key.clone(),
            der: acme.der.clone(),
        };
        let err = load_err(&config(&default, vec![sni(&["acme.test"], &crossed)]));
        assert_eq!(
            err,
            format!(
                "private key {} does not match certificate {}",
                default.key.display(),
                acme.cert.display()
            )
        );
        // The default pair is checked the same way.
        let err = load_err(&config(&crossed, vec![]));
        assert!(err.contains("does not match"), "{err}");
        assert!(err.contains(&acme.cert.display().to_string()), "{err}");
    }

    #[test]
    fn duplicate_name_is_refused_naming_both_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (default, a, b) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "a", &["a.test"]),
            pem(dir.path(), "b", &["b.test"]),
        );
        let err = load_err(&config(
            &default,
            vec![
                sni(&["a.test", "*.a.test"], &a),
                sni(&["b.test", "*.A.test."], &b),
            ],
        ));
        assert_eq!(
            err,
            format!(
                "server name \"*.A.test.\" is listed twice: by tls.sni[0] ({}) and by tls.sni[1] ({})",
                a.cert.display(),
                b.cert.display()
            )
        );
        let err = load_err(&config(&default, vec![sni(&["a.test", "A.TEST"], &a)]));
        assert!(err.contains("\"A.TEST\" is listed twice"), "{err}");
        // An exact name and a wildcard over it do not clash.
        load(&config(
            &default,
            vec![sni(&["a.test"], &a), sni(&["*.a.test"], &b)],
        ))
        .unwrap();
    }

    #[test]
    fn invalid_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        for (name, problem) in [
            ("", "it is empty"),
            (".", "it is empty"),
            ("acme.test:443", "has no port"),
            ("https://acme.test", "not a URL"),
            ("acme.test/chat", "not a URL"),
            ("*", "'*' may only be"),
            ("*.", "'*' may only be"),
            ("*acme.test", "'*' may only be"),
            ("a.*.acme.test", "'*' may only be"),
            ("*.*.acme.test", "'*' may only be"),
            ("acme.*", "'*' may only be"),
            ("acme..test", "not a valid DNS name"),
            ("acme.test..", "not a valid DNS name"),
            ("acme test", "not a valid DNS name"),
        ] {
            let err = load_err(&config(&default, vec![sni(&["ok.test", name], &acme)]));
            assert!(
                err.starts_with(&format!(
                    "tls.sni[0] ({}): invalid server name {name:?}: ",
                    acme.cert.display()
                )) && err.contains(problem),
                "{name:?}: {err}"
            );
        }
        let err = load_err(&config(&default, vec![sni(&[], &acme)]));
        assert!(err.ends_with(") lists no server names"), "{err}");
    }

    #[test]
    fn unreadable_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let (default, acme) = (
            pem(dir.path(), "default", &["default.test"]),
            pem(dir.path(), "acme", &["acme.test"]),
        );
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let not_x509 = dir.path().join("not-x509.pem");
        std::fs::write(
            &not_x509,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let with = |cert: &Path, key: &Path| {
            load_err(&config(
                &default,
                vec![SniCertificate {
                    names: vec!["acme.test".into()],
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                }],
            ))
        };
        let shows = |path: &Path| path.display().to_string();

        let err = with(&missing, &acme.key);
        assert!(
            err.starts_with(&format!(
                "cannot read certificate chain {}",
                shows(&missing)
            )),
            "{err}"
        );
        let err = with(&garbage, &acme.key);
        assert!(
            err.starts_with(&format!(
                "cannot read certificate chain {}",
                shows(&garbage)
            )),
            "{err}"
        );
        let err = with(&not_x509, &acme.key);
        assert!(
            err.starts_with(&format!(
                "cannot read certificate chain {}: the first certificate is not valid X.509",
                shows(&not_x509)
            )),
            "{err}"
        );
        // A key file holds no certificate: an empty chain.
        let err = with(&acme.key, &acme.key);
        assert_eq!(
            err,
            format!(
                "cannot read certificate chain {}: no CERTIFICATE block found",
                shows(&acme.key)
            )
        );
        let err = with(&acme.cert, &missing);
        assert!(
            err.starts_with(&format!("cannot read private key {}", shows(&missing))),
            "{err}"
        );
        // A certificate file holds no key.
        let err = with(&acme.cert, &acme.cert);
        assert_eq!(
            err,
            format!(
                "cannot read private key {}: no PRIVATE KEY block found",
                shows(&acme.cert)
            )
        );
    }
}
