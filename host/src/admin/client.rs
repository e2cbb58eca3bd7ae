//! `wharf status`, `wharf deploy` and `wharf rollback`: the admin API's
//! command-line client.
//!
//! A plain `http://` client (hyper-util's, the stack the server runs on, so
//! no second HTTP implementation is linked in): the admin API is meant for
//! a private address. The token is sent as `Authorization: Bearer`, from
//! `--token-file`, else `WHARF_ADMIN_TOKEN`, else the `[admin] token_file`
//! of `--config`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::config::Config;
use crate::tenancy::swap::Policy;

/// The admin API's address when neither `--admin`, `WHARF_ADMIN` nor the
/// config's `[admin] listen` says.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9090";
/// Time to open the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a status or rollback request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a deploy may take (the server's own bound, 300 s, and a margin).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(330);
/// Largest response read.
const MAX_RESPONSE: usize = 16 << 20;

/// Where the admin API is and how to authenticate.
#[derive(clap::Args, Debug)]
pub struct Connection {
    /// The admin API's base URL [default: the config's admin.listen, else
    /// http://127.0.0.1:9090].
    #[arg(long, value_name = "URL", env = "WHARF_ADMIN")]
    pub admin: Option<String>,
    /// A file holding the admin token (else WHARF_ADMIN_TOKEN, else the
    /// config's admin.token_file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The server's configuration file, for its admin.listen and admin.token_file
    /// (default: $WHARF_CONFIG, else ./wharf.toml if it exists).
    #[arg(short, long, value_name = "FILE", env = "WHARF_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `wharf status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: Connection,
}

/// `wharf deploy`.
#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// The tenant ("default" when the config has no tenant tables).
    pub tenant: String,
    /// The handler component (.wasm) to upload.
    pub file: PathBuf,
    /// What happens to open connections: drain (they stay on the old
    /// version until they close), migrate (they move to the new one) or
    /// restart (they are closed with 1012, spread over
    /// server.restart_window).
    #[arg(long, default_value = "drain", value_name = "POLICY")]
    pub policy: Policy,
    #[command(flatten)]
    pub connection: Connection,
}

/// `wharf rollback`.
#[derive(clap::Args, Debug)]
pub struct RollbackArgs {
    /// The tenant.
    pub tenant: String,
    /// What happens to open connections (as for deploy).
    #[arg(long, default_value = "drain", value_name = "POLICY")]
    pub policy: Policy,
    #[command(flatten)]
    pub connection: Connection,
}

/// Prints the tenants and their loaded versions.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args.connection)?;
    let body = target.call(Method::GET, "/tenants", None, REQUEST_TIMEOUT)?;
    let tenants: Vec<Tenant> =
        serde_json::from_slice(&body).context("unexpected answer from GET /tenants")?;
    print!("{}", table(&tenants, SystemTime::now()));
    Ok(())
}

/// Uploads a component as the tenant's new version.
pub fn deploy(args: &DeployArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let target = Target::resolve(&args.connection)?;
    let path = format!(
        "/tenants/{}/plugin?policy={}&name={}",
        encode(&args.tenant),
        args.policy.as_str(),
        label(&args.file),
    );
    let body = target.call(Method::PUT, &path, Some(bytes.into()), DEPLOY_TIMEOUT)?;
    let outcome: Outcome =
        serde_json::from_slice(&body).context("unexpected answer to the deploy")?;
    print!(
        "{}",
        outcome.describe("deployed", &args.file.display().to_string())
    );
    Ok(())
}

/// Puts the tenant's previous version back.
pub fn rollback(args: &RollbackArgs) -> anyhow::Result<()> {
    let target = Target::resolve(&args.connection)?;
    let path = format!(
        "/tenants/{}/rollback?policy={}",
        encode(&args.tenant),
        args.policy.as_str()
    );
    let body = target.call(Method::POST, &path, None, REQUEST_TIMEOUT)?;
    let outcome: Outcome =
        serde_json::from_slice(&body).context("unexpected answer to the rollback")?;
    print!(
        "{}",
        outcome.describe("rolled back", "the previous version")
    );
    Ok(())
}

/// The resolved base URL and token.
struct Target {
    base: String,
    token: Option<String>,
}

impl Target {
    fn resolve(args: &Connection) -> anyhow::Result<Target> {
        let config = crate::config::locate(args.config.as_deref())
            .as_deref()
            .map(Config::load)
            .transpose()
            .context("cannot load the configuration")?;
        let base = match (&args.admin, config.as_ref().and_then(|c| c.admin.listen)) {
            (Some(url), _) => url.trim_end_matches('/').to_owned(),
            (None, Some(mut addr)) => {
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{addr}")
            }
            (None, None) => DEFAULT_ADMIN.to_owned(),
        };
        if !base.starts_with("http://") {
            bail!("the admin URL must start with http:// (got {base:?})");
        }
        let token = match (&args.token_file, std::env::var(super::TOKEN_ENV)) {
            (Some(path), _) => Some(read_token(path)?),
            (None, Ok(token)) if !token.trim().is_empty() => Some(token.trim().to_owned()),
            _ => match config.as_ref().and_then(|c| c.admin.token_file.as_deref()) {
                Some(path) => Some(read_token(path)?),
                None => None,
            },
        };
        Ok(Target { base, token })
    }

    /// One request; the body of a 2xx answer, or the server's error.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> anyhow::Result<Bytes> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method.clone()).uri(&url);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/wasm");
        }
        let request = request
            .body(Full::new(body.unwrap_or_default()))
            .with_context(|| format!("invalid admin URL {url:?}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, body) = runtime
            .block_on(async {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
                let client = Client::builder(TokioExecutor::new()).build(connector);
                let exchange = async {
                    let response = client.request(request).await?;
                    let status = response.status();
                    let body = Limited::new(response.into_body(), MAX_RESPONSE)
                        .collect()
                        .await
                        .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
                        .to_bytes();
                    anyhow::Ok((status, body))
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(result) => result,
                    Err(_) => bail!("no answer within {}s", timeout.as_secs()),
                }
            })
            .map_err(|e| anyhow::anyhow!("{method} {url}: {}", chain(&*e)))?;
        if status.is_success() {
            return Ok(body);
        }
        #[derive(Deserialize)]
        struct ErrorBody {
            error: String,
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(ErrorBody { error }) => error,
            Err(_) => String::from_utf8_lossy(&body).trim().to_owned(),
        };
        let hint = match status {
            StatusCode::UNAUTHORIZED if self.token.is_none() => {
                " (give the token with --token-file, WHARF_ADMIN_TOKEN or --config)"
            }
            _ => "",
        };
        bail!("{status}: {message}{hint}")
    }
}

/// An error and its causes, one line ("connection refused" is a cause).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out += ": ";
            out += &text;
        }
        source = cause.source();
    }
    out
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("the token file {} is empty", path.display());
    }
    Ok(token.to_owned())
}

/// Percent-encodes a path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// The name logs show for a file: its stem, within what the server accepts.
fn label(file: &Path) -> String {
    super::version_label(file, "upload")
}

#[derive(Deserialize)]
struct Tenant {
    name: String,
    routes: Vec<String>,
    instance: String,
    max_connections: u32,
    connections: usize,
    versions: Vec<Version>,
}

#[derive(Deserialize)]
struct Version {
    sha256: String,
    plugin: String,
    loaded_at: u64,
    connections: usize,
    state: String,
}

#[derive(Deserialize)]
struct Outcome {
    tenant: String,
    sha256: String,
    previous: String,
    policy: String,
    note: Option<String>,
    open_connections: usize,
    compile_ms: u64,
}

impl Outcome {
    fn describe(&self, verb: &str, what: &str) -> String {
        let mut out = format!(
            "{verb} {what} on tenant {}\n  sha256    {}\n  previous  {}\n  policy    {} ({} connection(s) on older versions)\n",
            self.tenant, self.sha256, self.previous, self.policy, self.open_connections,
        );
        if verb == "deployed" {
            out += &format!("  loaded in {} ms\n", self.compile_ms);
        }
        if let Some(note) = &self.note {
            out += &format!("  note: {note}\n");
        }
        out
    }
}

/// The status table: a row per version, the tenant's columns on its first.
fn table(tenants: &[Tenant], now: SystemTime) -> String {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut rows = vec![
        [
            "TENANT", "ROUTES", "INSTANCE", "CONNS", "VERSION", "PLUGIN", "STATE", "ON IT",
            "LOADED",
        ]
        .map(String::from),
    ];
    for t in tenants {
        let mut first = true;
        for v in &t.versions {
            let tenant_cols = if first {
                [
                    t.name.clone(),
                    t.routes.join(","),
                    t.instance.clone(),
                    format!("{}/{}", t.connections, t.max_connections),
                ]
            } else {
                Default::default()
            };
            first = false;
            let [a, b, c, d] = tenant_cols;
            rows.push([
                a,
                b,
                c,
                d,
                v.sha256.chars().take(12).collect(),
                v.plugin.clone(),
                v.state.clone(),
                v.connections.to_string(),
                ago(now.saturating_sub(v.loaded_at)),
            ]);
        }
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line += "  ";
            }
            line += &format!("{cell:<w$}");
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

fn ago(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table() {
        let tenants: Vec<Tenant> = serde_json::from_str(
            r#"[{"name":"default","routes":["/"],"instance":"per-connection",
                 "max_connections":100,"connections":2,"versions":[
                 {"sha256":"0123456789abcdef0123","plugin":"chaos","loaded_at":1000,"connections":1,"state":"active"},
                 {"sha256":"fedcba9876543210fedc","plugin":"echo","loaded_at":400,"connections":1,"state":"draining"}]},
                {"name":"b","routes":["a.example/x","/y"],"instance":"shared",
                 "max_connections":5,"connections":0,"versions":[
                 {"sha256":"aaaaaaaaaaaaaaaaaaaa","plugin":"chat","loaded_at":0,"connections":0,"state":"active"}]}]"#,
        )
        .unwrap();
        let out = table(&tenants, UNIX_EPOCH + Duration::from_secs(1030));
        assert_eq!(
            out,
            "\
TENANT   ROUTES          INSTANCE        CONNS  VERSION       PLUGIN  STATE     ON IT  LOADED
default  /               per-connection  2/100  0123456789ab  chaos   active    1      30s ago
                                                fedcba987654  echo    draining  1      10m ago
b        a.example/x,/y  shared          0/5    aaaaaaaaaaaa  chat    active    0      17m ago
"
        );
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(encode("default"), "default");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(label(Path::new("/x/my plugin.v2.wasm")), "my_plugin.v2");
        assert_eq!(label(Path::new("/")), "upload");
    }
}
