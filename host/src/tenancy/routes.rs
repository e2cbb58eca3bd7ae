//! Which tenant serves a request: routes (`HOST/PATH-PREFIX` or
//! `/PATH-PREFIX`) and the most specific match.
//!
//! A host is exact (`acme.example.com`), a wildcard (`*.acme.example.com`:
//! one or more labels before the suffix), or absent (any host). Hosts
//! compare case-insensitively, without the port or a trailing dot. A path
//! prefix matches on segment boundaries: `/chat` takes `/chat` and
//! `/chat/room`, not `/chatter`. The most specific route wins: an exact
//! host over a wildcard (the longer wildcard first) over any host, then the
//! longer path prefix. Two tenants claiming the same route is an error.

use std::cmp::Reverse;
use std::fmt;

use crate::config::ResolvedTenant;

/// The host part of a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Any host.
    Any,
    /// `*.SUFFIX`: the suffix, lowercase, without the `*.`.
    Wildcard(String),
    /// One host, lowercase.
    Exact(String),
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
        }
    }

    /// Exact over wildcard over any; among wildcards, the longer suffix.
    fn specificity(&self) -> (u8, usize) {
        match self {
            HostPattern::Any => (0, 0),
            HostPattern::Wildcard(s) => (1, s.len()),
            HostPattern::Exact(_) => (2, 0),
        }
    }
}

/// One route, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub host: HostPattern,
    /// Starts with `/`; no trailing `/` except for the root.
    pub prefix: String,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostPattern::Any => {}
            HostPattern::Exact(h) => f.write_str(h)?,
            HostPattern::Wildcard(s) => write!(f, "*.{s}")?,
        }
        f.write_str(&self.prefix)
    }
}

/// Why a route was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?} of tenant {tenant}: {problem}")]
    Syntax {
        tenant: String,
        route: String,
        problem: &'static str,
    },
    #[error("route {route} is claimed by both tenant {first} and tenant {second}")]
    Conflict {
        route: String,
        first: String,
        second: String,
    },
    #[error("tenant {tenant} has no routes")]
    NoRoutes { tenant: String },
}

impl Route {
    pub fn parse(text: &str) -> Result<Route, &'static str> {
        let (host, path) = match text.find('/') {
            Some(i) => text.split_at(i),
            None => (text, "/"),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let host = if host.is_empty() {
            HostPattern::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            check_host(suffix)?;
            HostPattern::Wildcard(suffix.to_owned())
        } else {
            check_host(&host)?;
            HostPattern::Exact(host)
        };
        if path.contains(['?', '#', '*']) || path.contains("//") {
            return Err("a path prefix has no '?', '#', '*' or empty segment");
        }
        let prefix = match path.trim_end_matches('/') {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        Ok(Route { host, prefix })
    }

    fn matches_path(&self, path: &str) -> bool {
        self.prefix == "/"
            || path
                .strip_prefix(self.prefix.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }
}

fn check_host(host: &str) -> Result<(), &'static str> {
    if host.contains(':') && !host.starts_with('[') {
        return Err("a route names a host without its port (routes match any port)");
    }
    let ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':'));
    if !ok || host.is_empty() || host.split('.').any(str::is_empty) {
        return Err("the host is not a valid name (a `*.` wildcard may only lead)");
    }
    Ok(())
}

/// Every tenant's routes, most specific first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// (route, tenant index), sorted most specific first.
    routes: Vec<(Route, usize)>,
}

impl RouteTable {
    /// Parses every tenant's routes; refuses bad syntax and conflicts.
    pub fn build(tenants: &[ResolvedTenant]) -> Result<RouteTable, RouteError> {
        let mut routes: Vec<(Route, usize)> = Vec::new();
        for (index, tenant) in tenants.iter().enumerate() {
            if tenant.routes.is_empty() {
                return Err(RouteError::NoRoutes {
                    tenant: tenant.name.clone(),
                });
            }
            for text in &tenant.routes {
                let route = Route::parse(text).map_err(|problem| RouteError::Syntax {
                    tenant: tenant.name.clone(),
                    route: text.clone(),
                    problem,
                })?;
                if let Some((_, other)) = routes.iter().find(|(r, _)| *r == route) {
                    return Err(RouteError::Conflict {
                        route: route.to_string(),
                        first: tenants[*other].name.clone(),
                        second: tenant.name.clone(),
                    });
                }
                routes.push((route, index));
            }
        }
        routes.sort_by_key(|(r, _)| (Reverse(r.host.specificity()), Reverse(r.prefix.len())));
        Ok(RouteTable { routes })
    }

    /// The tenant (its index in the list given to [`build`](Self::build))
    /// serving `host` (the `Host` header, port and all) and `path`.
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<usize> {
        let host = host.map(normalize_host).unwrap_or_default();
        self.routes
            .iter()
            .find(|(r, _)| r.host.matches(&host) && r.matches_path(path))
            .map(|&(_, i)| i)
    }

    /// Most specific first, for `wharf check` and the logs.
    pub fn routes(&self) -> impl Iterator<Item = (&Route, usize)> {
        self.routes.iter().map(|(r, i)| (r, *i))
    }
}

/// A `Host` header's host, lowercase, without port or trailing dot.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let host = if host.starts_with('[') {
        // [v6]:port
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn table(tenants: &[(&str, &[&str])]) -> Result<RouteTable, RouteError> {
        let mut text = String::new();
        for (name, routes) in tenants {
            text +=
                &format!("[[tenant]]\nname = {name:?}\nplugin = \"x.wasm\"\nroutes = {routes:?}\n");
        }
        let config: Config = toml::from_str(&text).unwrap();
        RouteTable::build(&config.resolved_tenants())
    }

    fn who(t: &RouteTable, host: &str, path: &str) -> Option<usize> {
        t.lookup(Some(host), path)
    }

    #[test]
    fn most_specific_wins() {
        let t = table(&[
            ("any", &["/"]),
            ("acme", &["acme.example.com/", "/acme"]),
            ("wild", &["*.acme.example.com/chat"]),
            ("deep", &["*.eu.acme.example.com/"]),
        ])
        .unwrap();
        assert_eq!(who(&t, "acme.example.com", "/x"), Some(1));
        assert_eq!(
            who(&t, "ACME.Example.com:8443", "/x"),
            Some(1),
            "case, port"
        );
        assert_eq!(who(&t, "acme.example.com.", "/x"), Some(1), "trailing dot");
        assert_eq!(who(&t, "other.test", "/acme/room"), Some(1));
        assert_eq!(who(&t, "other.test", "/acmex"), Some(0), "segment boundary");
        assert_eq!(who(&t, "a.acme.example.com", "/chat/x"), Some(2));
        assert_eq!(
            who(&t, "a.b.acme.example.com", "/chat"),
            Some(2),
            "several labels"
        );
        assert_eq!(who(&t, "a.acme.example.com", "/chatter"), Some(0));
        assert_eq!(
            who(&t, "x.eu.acme.example.com", "/chat"),
            Some(3),
            "longer wildcard"
        );
        // exact host beats a longer path on any host
        assert_eq!(who(&t, "acme.example.com", "/acme"), Some(1));
        assert_eq!(who(&t, "[::1]:80", "/"), Some(0));
        assert_eq!(t.lookup(None, "/acme"), Some(1));
    }

    #[test]
    fn no_match_is_none() {
        let t = table(&[("acme", &["acme.example.com/", "/acme"])]).unwrap();
        assert_eq!(who(&t, "other.test", "/"), None);
        assert_eq!(who(&t, "other.test", "http://x/acme"), None);
        assert_eq!(who(&t, "example.com", "/"), None);
    }

    #[test]
    fn conflict_names_both_tenants() {
        let err = table(&[("a", &["/chat/"]), ("b", &["/chat"])]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "route /chat is claimed by both tenant a and tenant b"
        );
        let err = table(&[("a", &["X.test/"]), ("b", &["x.test"])]).unwrap_err();
        assert!(err.to_string().contains("tenant a and tenant b"), "{err}");
    }

    #[test]
    fn bad_routes_are_refused() {
        for bad in [
            "x.test:80/",
            "*x.test/",
            "a.*.test/",
            "/a//b",
            "/a?b",
            "a..b/",
            "",
        ] {
            let err = table(&[("a", &[bad])]);
            if bad.is_empty() {
                // "" is any host, the root: valid.
                assert!(err.is_ok());
                continue;
            }
            assert!(
                matches!(err, Err(RouteError::Syntax { .. })),
                "{bad:?}: {err:?}"
            );
        }
        assert!(matches!(
            table(&[("a", &[])]),
            Err(RouteError::NoRoutes { .. })
        ));
    }
}
