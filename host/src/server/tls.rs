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

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

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

/// Builds the acceptor for one listener.
pub fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates = Certificates::load(tls, &provider)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocol)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certificates));
    // WebSocket upgrades are HTTP/1.1 only (RFC 8441's HTTP/2 mode is not served).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener's certificates, by the server name they are served for.
struct Certificates {
    /// Exact names (normalized).
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Wildcards as their suffix (`*.example.com` is `.example.com`), longest
    /// first: the first one a name ends with is the most specific.
    wildcards: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl Certificates {
    fn load(tls: &TlsConfig, provider: &CryptoProvider) -> Result<Self, TlsError> {
        let default = load_pair(&tls.cert, &tls.key, provider)?;
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
        })
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

impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(client_hello.server_name()).clone())
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
        Certificates::load(tls, &rustls::crypto::ring::default_provider())
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
