//! Which web pages may open a tenant's connections: the defence against
//! cross-site WebSocket hijacking. A browser sends the page's origin in
//! `Origin` and lets any page connect anywhere, with the user's cookies;
//! the server must refuse origins it does not serve.
//!
//! A request without `Origin` did not come from a browser page, and a
//! non-browser client can send whatever it likes, so it is allowed.

/// An origin a tenant allows, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// `"*"`: any origin.
    Any,
    /// `scheme://host[:port]`, lowercase.
    Exact(String),
    /// `scheme://*.suffix[:port]`: the scheme and `suffix[:port]`.
    Wildcard { scheme: String, suffix: String },
}

/// A tenant's origin rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OriginPolicy {
    /// `Origin`'s host and port must be the request's `Host` (as
    /// gorilla/websocket does by default): a page served by the same host
    /// may connect, other sites' pages may not.
    #[default]
    SameOrigin,
    /// One of these.
    List(Vec<Allowed>),
}

impl OriginPolicy {
    /// `allowed_origins` from the configuration.
    pub fn parse(entries: &[String]) -> Result<OriginPolicy, String> {
        let mut list = Vec::new();
        for entry in entries {
            let e = entry.trim().trim_end_matches('/').to_ascii_lowercase();
            if e == "*" {
                list.push(Allowed::Any);
                continue;
            }
            let Some((scheme, authority)) = e.split_once("://") else {
                return Err(format!(
                    "{entry:?} is not an origin (scheme://host[:port] or \"*\")"
                ));
            };
            let valid_scheme = !scheme.is_empty()
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
            if !valid_scheme || authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
                return Err(format!(
                    "{entry:?} is not an origin (scheme://host[:port] or \"*\")"
                ));
            }
            match authority.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                    list.push(Allowed::Wildcard {
                        scheme: scheme.to_owned(),
                        suffix: suffix.to_owned(),
                    })
                }
                None if !authority.contains('*') => list.push(Allowed::Exact(e)),
                _ => {
                    return Err(format!(
                        "{entry:?}: a `*.` wildcard may only stand first in the host"
                    ));
                }
            }
        }
        Ok(OriginPolicy::List(list))
    }

    /// Whether a request with this `Origin` (and `Host`) may upgrade.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        let origin = origin.trim().to_ascii_lowercase();
        match self {
            OriginPolicy::SameOrigin => {
                let authority = origin.split_once("://").map(|(_, a)| a);
                matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h.trim()))
            }
            OriginPolicy::List(list) => list.iter().any(|allowed| match allowed {
                Allowed::Any => true,
                Allowed::Exact(o) => *o == origin,
                Allowed::Wildcard { scheme, suffix } => origin
                    .strip_prefix(scheme.as_str())
                    .and_then(|rest| rest.strip_prefix("://"))
                    .and_then(|authority| authority.strip_suffix(suffix.as_str()))
                    .and_then(|head| head.strip_suffix('.'))
                    .is_some_and(|label| !label.is_empty() && !label.contains(['/', '@'])),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn same_origin_by_default() {
        let p = OriginPolicy::default();
        assert!(
            p.allows(None, Some("chat.test")),
            "no Origin: not a browser"
        );
        assert!(p.allows(Some("https://chat.test"), Some("chat.test")));
        assert!(p.allows(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080")));
        assert!(p.allows(Some("https://Chat.Test"), Some("chat.test")));
        assert!(!p.allows(Some("https://evil.test"), Some("chat.test")));
        assert!(!p.allows(Some("http://127.0.0.1:9999"), Some("127.0.0.1:8080")));
        assert!(!p.allows(Some("null"), Some("chat.test")));
        assert!(!p.allows(Some("https://chat.test"), None));
    }

    #[test]
    fn lists_exact_and_wildcard() {
        let p = policy(&["https://app.example.com", "https://*.acme.test:8443/"]);
        assert!(p.allows(Some("https://app.example.com"), Some("x")));
        assert!(
            !p.allows(Some("http://app.example.com"), Some("x")),
            "scheme"
        );
        assert!(
            !p.allows(Some("https://app.example.com:444"), Some("x")),
            "port"
        );
        assert!(p.allows(Some("https://a.acme.test:8443"), Some("x")));
        assert!(p.allows(Some("https://a.b.acme.test:8443"), Some("x")));
        assert!(!p.allows(Some("https://acme.test:8443"), Some("x")));
        assert!(!p.allows(Some("https://evilacme.test:8443"), Some("x")));
        assert!(!p.allows(Some("https://a.acme.test"), Some("x")));
        assert!(policy(&["*"]).allows(Some("https://anything.test"), Some("x")));
        assert!(!policy(&[]).allows(Some("https://anything.test"), Some("x")));
        assert!(policy(&[]).allows(None, Some("x")));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://a.*.b",
            "*.x",
        ] {
            assert!(OriginPolicy::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
