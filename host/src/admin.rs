//! The admin API: health, readiness, metrics, the tenants' status and the
//! hot swap of their plugins. [axum]'s router on [hyper]'s HTTP/1.1 server.
//!
//! | request | auth | response |
//! |---|---|---|
//! | `GET /healthz` | never | 200 `ok` |
//! | `GET /readyz` | never | 200 once the listeners serve; 503 before, and once shutdown began |
//! | `GET /metrics` | if a token is configured | 200, OpenMetrics text |
//! | `GET /tenants` | if a token is configured | 200, JSON array of [`TenantStatus`] |
//! | `PUT /tenants/{name}/plugin?policy=P` | always | 200, [`DeployOutcome`] JSON |
//! | `POST /tenants/{name}/rollback?policy=P` | always | 200, [`DeployOutcome`] JSON |
//!
//! A deploy's body is the component's bytes, or (`Content-Type:
//! application/json`) `{"path": "..."}`, a file the server reads. `policy`
//! is `drain` (the default), `migrate` or `restart`; a deploy may also pass
//! `name=...`, the label logs and the status show (default `upload`, or
//! the file's stem). Errors are `{"error": "..."}` with the status: 400
//! (bad query or body), 401 (missing or wrong token, with
//! `WWW-Authenticate: Bearer`), 403 (no token configured: deploys and
//! rollbacks are off), 404 (no such tenant or path), 409 (nothing to roll
//! back to), 413 (over [`Limits::max_upload`]), 422 (not a valid
//! component, or a missing export: the message names it), 503 (timed out).
//!
//! **Auth.** `Authorization: Bearer <token>`. The token is hashed (SHA-256)
//! and the digests compared in constant time with [`subtle`], so neither
//! the token's bytes nor its length leak through timing.
//!
//! **Bounds.** It is meant for a private address, but still bounds what a
//! client can take: at most [`MAX_CONNECTIONS`] connections (more are closed
//! at once, logged at debug level), a request head of at most
//! [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`] headers (else 431) that must
//! arrive within [`Limits::header_read_timeout`] (else the connection is
//! closed; this also ends idle keep-alive connections), a whole request
//! within [`Limits::request_timeout`] (reads) or [`Limits::deploy_timeout`]
//! (uploads and compiles), and one deploy or rollback at a time, so at most
//! one upload is buffered.

pub mod client;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::AdminConfig;
use crate::metrics::Metrics;
use crate::tenancy::swap::Policy;
use crate::tenancy::{DeployError, DeployOutcome, TenantStatus, Tenants};

/// Largest accepted request head (request line and headers); larger is 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers accepted in a request; more is 431.
pub const MAX_HEADERS: usize = 64;
/// Connections served at once; more are closed immediately.
pub const MAX_CONNECTIONS: usize = 64;
/// Largest JSON body (`{"path": ...}`).
const MAX_JSON_BODY: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// On shutdown, how long requests in flight may take to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The environment variable holding the admin token (overrides
/// `[admin] token_file`; the CLI reads it too).
pub const TOKEN_ENV: &str = "WHARF_ADMIN_TOKEN";

/// The `Content-Type` of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// What the API needs of the control plane (implemented by [`Tenants`]).
pub trait ControlPlane: Send + Sync + 'static {
    fn status(&self) -> Vec<TenantStatus>;
    /// Blocking: may compile for seconds.
    fn deploy(
        &self,
        tenant: &str,
        name: &str,
        bytes: &[u8],
        policy: Policy,
    ) -> Result<DeployOutcome, DeployError>;
    fn rollback(&self, tenant: &str, policy: Policy) -> Result<DeployOutcome, DeployError>;
}

impl ControlPlane for Tenants {
    fn status(&self) -> Vec<TenantStatus> {
        Tenants::status(self)
    }

    fn deploy(
        &self,
        tenant: &str,
        name: &str,
        bytes: &[u8],
        policy: Policy,
    ) -> Result<DeployOutcome, DeployError> {
        Tenants::deploy(self, tenant, name, bytes, policy)
    }

    fn rollback(&self, tenant: &str, policy: Policy) -> Result<DeployOutcome, DeployError> {
        Tenants::rollback(self, tenant, policy)
    }
}

/// The bearer token the API asks for. Only its SHA-256 is kept.
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// The token `secret` (trimmed); `None` if that is empty.
    pub fn new(secret: &str) -> Option<Self> {
        let secret = secret.trim();
        (!secret.is_empty()).then(|| Self {
            digest: Sha256::digest(secret.as_bytes()).into(),
        })
    }

    /// Whether `presented` is the token, in time independent of both.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }

    /// The token of `[admin]`: `WHARF_ADMIN_TOKEN` if set, else the content
    /// of `token_file`, else none.
    pub fn load(config: &AdminConfig) -> anyhow::Result<Option<AdminToken>> {
        Self::load_from(std::env::var(TOKEN_ENV).ok(), config.token_file.as_deref())
    }

    /// [`AdminToken::load`] with the environment variable's value given.
    pub fn load_from(
        env: Option<String>,
        token_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<AdminToken>> {
        if let Some(value) = env {
            let token =
                Self::new(&value).with_context(|| format!("{TOKEN_ENV} is set but empty"))?;
            if let Some(path) = token_file {
                tracing::warn!(path = %path.display(), "{TOKEN_ENV} overrides [admin] token_file");
            }
            return Ok(Some(token));
        }
        token_file.map(Self::from_file).transpose()
    }

    /// The trimmed content of `path`. Refused if unreadable or empty;
    /// a file others can read is accepted with a warning.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<AdminToken> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read admin.token_file {}", path.display()))?;
        let token = Self::new(&text)
            .with_context(|| format!("admin.token_file {} is empty", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(meta) = std::fs::metadata(path) {
                let mode = meta.permissions().mode();
                if mode & 0o044 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:03o}", mode & 0o777),
                        "the admin token file is readable by group or others; chmod 600 it"
                    );
                }
            }
        }
        Ok(token)
    }
}

/// The API's time and size bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a request head may take to arrive (and a keep-alive connection
    /// may stay idle).
    pub header_read_timeout: Duration,
    /// Time a `GET` may take.
    pub request_timeout: Duration,
    /// Time a deploy or rollback may take: waiting for the one before,
    /// the upload and the compile.
    pub deploy_timeout: Duration,
    /// Largest component a deploy may upload or name; larger is 413.
    pub max_upload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            deploy_timeout: Duration::from_secs(300),
            max_upload: 64 << 20,
        }
    }
}

impl Limits {
    /// The defaults, with `[admin]`'s `max_upload_size`.
    pub fn from_config(config: &AdminConfig) -> Self {
        Self {
            max_upload: usize::try_from(config.max_upload_size.as_u64()).unwrap_or(usize::MAX),
            ..Self::default()
        }
    }
}

/// Everything the API serves from.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub tenants: Arc<dyn ControlPlane>,
    /// `None`: deploys and rollbacks answer 403, the rest is open.
    pub token: Option<AdminToken>,
    /// What `/readyz` reports; the server sets it once it serves and
    /// clears it when shutdown begins.
    pub ready: Arc<AtomicBool>,
    pub limits: Limits,
    /// The wss listeners' certificates, for `POST /reload-tls`.
    pub tls: Vec<crate::server::tls::TlsReloader>,
}

struct AppState {
    admin: Admin,
    /// One deploy or rollback at a time (held through the compile).
    swap_lock: Arc<Mutex<()>>,
}

type Shared = Arc<AppState>;

/// The API as an axum [`Router`] (what [`serve`] serves).
pub fn router(admin: Admin) -> Router {
    let state: Shared = Arc::new(AppState {
        admin,
        swap_lock: Arc::new(Mutex::new(())),
    });
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/tenants", get(tenants))
        .route("/tenants/{name}/plugin", put(deploy))
        .route("/tenants/{name}/rollback", post(rollback))
        .route("/reload-tls", post(reload_tls))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), bound))
        .with_state(state)
}

/// Serve the API on `listener` until `shutdown` is cancelled.
///
/// On cancellation it stops accepting, lets requests in flight finish for
/// up to 5 s (idle connections are closed at once), aborts the rest and
/// returns. Never panics; I/O errors only affect their connection and are
/// logged at debug level.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "admin endpoint listening"),
        Err(error) => tracing::info!(%error, "admin endpoint listening (address unknown)"),
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(admin.limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES);
    let app = router(admin);
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin endpoint: accept failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        while tasks.try_join_next().is_some() {}
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, "admin endpoint: too many connections, closing");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                log_connection_error(peer, &error);
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("admin endpoint: requests still in flight at shutdown, aborting them");
    }
    tasks.shutdown().await;
    tracing::info!("admin endpoint stopped");
}

fn log_connection_error(peer: SocketAddr, error: &hyper::Error) {
    if error.is_timeout() {
        tracing::debug!(%peer, "admin endpoint: request head timed out");
    } else {
        tracing::debug!(%peer, %error, "admin endpoint: connection failed");
    }
}

// ---------------------------------------------------------------------------
// Middleware
// ---------------------------------------------------------------------------

/// Bounds every request's time and marks every response uncacheable.
async fn bound(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let limits = &state.admin.limits;
    let reading = matches!(*request.method(), Method::GET | Method::HEAD);
    let limit = if reading {
        limits.request_timeout
    } else {
        limits.deploy_timeout
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_elapsed) => {
            tracing::warn!(%method, %path, ?limit, "admin endpoint: request timed out");
            let mut message = format!("request timed out after {}s", limit.as_secs_f64());
            if !reading {
                message += "; a deploy already compiling still completes: see GET /tenants";
            }
            error(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "admin endpoint: request");
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The token check of every route but `/healthz` and `/readyz`.
async fn authorize(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let mutating = !matches!(*request.method(), Method::GET | Method::HEAD);
    let Some(token) = &state.admin.token else {
        if mutating {
            return error(
                StatusCode::FORBIDDEN,
                "no admin token configured: mutating endpoints are off",
            );
        }
        return next.run(request).await;
    };
    match bearer(request.headers()) {
        Some(presented) if token.matches(presented) => next.run(request).await,
        presented => {
            tracing::debug!(
                path = request.uri().path(),
                token_sent = presented.is_some(),
                "admin endpoint: unauthorized"
            );
            let challenge = if presented.is_some() {
                r#"Bearer realm="wharf", error="invalid_token""#
            } else {
                r#"Bearer realm="wharf""#
            };
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
            response
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, Json(body)).into_response()
}

fn text(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<Shared>) -> Response {
    if state.admin.ready.load(Ordering::SeqCst) {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

async fn metrics(State(state): State<Shared>) -> Response {
    let status = state.admin.tenants.status();
    let body = crate::metrics::version_series(
        state.admin.metrics.render(),
        status.iter().flat_map(|t| {
            t.versions.iter().map(|v| crate::metrics::LoadedVersion {
                tenant: &t.name,
                sha256: &v.sha256,
                state: v.state,
                connections: v.connections,
            })
        }),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        body,
    )
        .into_response()
}

async fn tenants(State(state): State<Shared>) -> Response {
    Json(state.admin.tenants.status()).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployQuery {
    policy: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackQuery {
    policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathBody {
    path: PathBuf,
}

fn policy(value: Option<&str>) -> Result<Policy, Refusal> {
    value
        .map_or(Ok(Policy::default()), str::parse)
        .map_err(|message: String| Refusal(StatusCode::BAD_REQUEST, message))
}

/// A request refused before it reached the control plane: its status and
/// message (answered as `{"error": message}`).
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }

    fn too_large(limit: usize) -> Self {
        Self(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the component is larger than the {limit}-byte limit"),
        )
    }
}

/// A plugin name as logs and the status show it.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads `body`, at most `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Refusal::too_large(limit))
        }
        Err(err) => Err(Refusal::bad_request(format!(
            "cannot read the request body: {err}"
        ))),
    }
}

fn outcome(result: Result<Result<DeployOutcome, DeployError>, tokio::task::JoinError>) -> Response {
    match result {
        Ok(Ok(outcome)) => Json(outcome).into_response(),
        Ok(Err(err)) => {
            let status =
                StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(status, err.to_string())
        }
        Err(join) => internal(&join),
    }
}

fn internal(join: &tokio::task::JoinError) -> Response {
    tracing::error!(%join, "admin endpoint: deploy task failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the deploy failed unexpectedly (see the server log)",
    )
}

/// The tenant of the path and the query, or why they are bad.
fn target<Q>(
    tenant: Result<Path<String>, PathRejection>,
    query: Result<Query<Q>, QueryRejection>,
) -> Result<(String, Q), Refusal> {
    let Path(tenant) = tenant.map_err(|e| Refusal::bad_request(e.body_text()))?;
    let Query(query) = query.map_err(|e| Refusal::bad_request(e.body_text()))?;
    Ok((tenant, query))
}

async fn deploy(
    State(state): State<Shared>,
    tenant: Result<Path<String>, PathRejection>,
    query: Result<Query<DeployQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let (tenant, query) = target(tenant, query)?;
    let policy = policy(query.policy.as_deref())?;
    if let Some(name) = &query.name
        && !valid_name(name)
    {
        return Err(Refusal::bad_request(
            "name must be 1 to 64 characters among A-Z a-z 0-9 . _ -",
        ));
    }
    let limit = state.admin.limits.max_upload;
    let json = is_json(&headers);
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !json && announced.is_some_and(|n| n > limit as u64) {
        return Err(Refusal::too_large(limit));
    }

    // One swap at a time: at most one upload is buffered, and two deploys
    // of one tenant cannot interleave.
    let guard = Arc::clone(&state.swap_lock).lock_owned().await;
    let (name, bytes) = if json {
        let raw = read_body(body, MAX_JSON_BODY).await?;
        let PathBody { path } = serde_json::from_slice(&raw).map_err(|err| {
            Refusal::bad_request(format!("expected {{\"path\": \"...\"}}: {err}"))
        })?;
        let read = tokio::task::spawn_blocking(move || read_component(&path, limit)).await;
        match read {
            Ok(read) => {
                let (stem, bytes) = read?;
                (query.name.unwrap_or(stem), Bytes::from(bytes))
            }
            Err(join) => return Ok(internal(&join)),
        }
    } else {
        let bytes = read_body(body, limit).await?;
        (query.name.unwrap_or_else(|| "upload".to_owned()), bytes)
    };
    tracing::info!(
        %tenant,
        plugin = %name,
        bytes = bytes.len(),
        policy = policy.as_str(),
        "admin endpoint: deploy"
    );
    let tenants = Arc::clone(&state.admin.tenants);
    let result = tokio::task::spawn_blocking(move || {
        // Held until the compile and the swap are done, even if the
        // request is abandoned (timed out) meanwhile.
        let _guard = guard;
        tenants.deploy(&tenant, &name, &bytes, policy)
    })
    .await;
    Ok(outcome(result))
}

/// A component file named by a deploy: its stem (as a valid name) and bytes.
fn read_component(path: &std::path::Path, limit: usize) -> Result<(String, Vec<u8>), Refusal> {
    use std::io::Read as _;
    let unreadable = |err: std::io::Error| {
        Refusal(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("cannot read plugin {}: {err}", path.display()),
        )
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() > limit {
        return Err(Refusal::too_large(limit));
    }
    Ok((version_label(path, "plugin"), bytes))
}

/// The name a version goes by in logs and the status, from its file: the
/// stem, in the characters a `name=` may have (others become `_`), at
/// most 64; `fallback` when nothing is left. One rule for the server and
/// the CLI, so both name an upload alike.
pub(crate) fn version_label(file: &std::path::Path, fallback: &str) -> String {
    let label: String = file
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if label.is_empty() {
        fallback.to_owned()
    } else {
        label
    }
}

async fn rollback(
    State(state): State<Shared>,
    tenant: Result<Path<String>, PathRejection>,
    query: Result<Query<RollbackQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let (tenant, query) = target(tenant, query)?;
    let policy = policy(query.policy.as_deref())?;
    let guard = Arc::clone(&state.swap_lock).lock_owned().await;
    tracing::info!(%tenant, policy = policy.as_str(), "admin endpoint: rollback");
    let tenants = Arc::clone(&state.admin.tenants);
    let result = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        tenants.rollback(&tenant, policy)
    })
    .await;
    Ok(outcome(result))
}

/// `POST /reload-tls`: every wss listener re-reads its certificate and key
/// files; a bad pair is refused (the listener keeps its current one).
/// 200 if every listener reloaded, 422 otherwise, with one entry each.
async fn reload_tls(State(state): State<Shared>) -> Response {
    let reloaders = state.admin.tls.clone();
    let results =
        tokio::task::spawn_blocking(move || crate::server::tls_reload::reload_all(&reloaders))
            .await
            .unwrap_or_default();
    let all_ok = results.iter().all(Result::is_ok);
    let report: Vec<serde_json::Value> = state
        .admin
        .tls
        .iter()
        .zip(&results)
        .map(|(reloader, result)| match result {
            Ok(r) => serde_json::json!({
                "cert": reloader.cert().display().to_string(),
                "changed": r.changed,
                "not_after": r.not_after,
            }),
            Err(err) => serde_json::json!({
                "cert": reloader.cert().display().to_string(),
                "error": err.to_string(),
            }),
        })
        .collect();
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, Json(report)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex as StdMutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;
    use tower::ServiceExt as _;

    use crate::runtime::LoadError;

    const TOKEN: &str = "s3cret-token";

    /// A control plane with one tenant, "default", whose deploys succeed
    /// unless the bytes are "bad"; it records what it was asked.
    #[derive(Default)]
    struct Fake {
        calls: StdMutex<Vec<String>>,
    }

    impl Fake {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn outcome(tenant: &str, policy: Policy) -> DeployOutcome {
            DeployOutcome {
                tenant: tenant.to_owned(),
                sha256: "a".repeat(64),
                previous: "b".repeat(64),
                policy,
                note: None,
                open_connections: 0,
                compile_ms: 1,
            }
        }
    }

    impl ControlPlane for Fake {
        fn status(&self) -> Vec<TenantStatus> {
            vec![TenantStatus {
                name: "default".into(),
                routes: vec!["/".into()],
                instance: "per-connection",
                max_connections: 10,
                connections: 0,
                versions: Vec::new(),
            }]
        }

        fn deploy(
            &self,
            tenant: &str,
            name: &str,
            bytes: &[u8],
            policy: Policy,
        ) -> Result<DeployOutcome, DeployError> {
            self.calls.lock().unwrap().push(format!(
                "deploy {tenant} {name} {} {}",
                bytes.len(),
                policy.as_str()
            ));
            if tenant != "default" {
                return Err(DeployError::UnknownTenant(tenant.into()));
            }
            if bytes == b"bad" {
                return Err(DeployError::Invalid(LoadError::World {
                    name: name.into(),
                    source: anyhow::anyhow!("missing export on-close"),
                }));
            }
            Ok(Self::outcome(tenant, policy))
        }

        fn rollback(&self, tenant: &str, policy: Policy) -> Result<DeployOutcome, DeployError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("rollback {tenant} {}", policy.as_str()));
            if tenant != "default" {
                return Err(DeployError::UnknownTenant(tenant.into()));
            }
            Err(DeployError::NoPrevious(tenant.into()))
        }
    }

    fn admin(token: Option<&str>, fake: &Arc<Fake>) -> Admin {
        Admin {
            metrics: Metrics::new(),
            tenants: fake.clone(),
            token: token.and_then(AdminToken::new),
            ready: Arc::new(AtomicBool::new(true)),
            tls: Vec::new(),
            limits: Limits {
                max_upload: 1024,
                ..Limits::default()
            },
        }
    }

    struct Reply {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    impl Reply {
        fn json(&self) -> serde_json::Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }

        fn error(&self) -> String {
            self.json()["error"].as_str().expect("an error").to_owned()
        }
    }

    #[tokio::test]
    async fn reload_tls_reloads_every_listener_and_reports_a_bad_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, a.signing_key.serialize_pem()).unwrap();
        let tls = crate::config::TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            sni: Vec::new(),
        };
        let (_, reloader) = crate::server::tls::reloadable_acceptor(&tls).unwrap();
        let fake = Arc::new(Fake::default());
        let mut with_tls = admin(Some(TOKEN), &fake);
        with_tls.tls = vec![reloader];
        let app = router(with_tls);
        let reply = call(&app, request("POST", "/reload-tls", None, "")).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        let reply = call(&app, request("POST", "/reload-tls", Some(TOKEN), "")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.json()[0]["changed"], false);
        // Another key than the certificate's: refused, the old pair stays.
        let b = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        let reply = call(&app, request("POST", "/reload-tls", Some(TOKEN), "")).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            reply.body
        );
        let error = reply.json()[0]["error"].as_str().unwrap().to_owned();
        assert!(error.contains("does not match"), "{error}");
    }

    async fn call(app: &Router, request: axum::http::Request<Body>) -> Reply {
        let response = app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    fn request(
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: impl Into<Body>,
    ) -> axum::http::Request<Body> {
        let mut builder = axum::http::Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.body(body.into()).unwrap()
    }

    #[tokio::test]
    async fn health_and_readiness_need_no_token() {
        let fake = Arc::new(Fake::default());
        let admin = admin(Some(TOKEN), &fake);
        let ready = admin.ready.clone();
        let app = router(admin);
        let reply = call(&app, request("GET", "/healthz", None, Body::empty())).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "ok\n");
        assert_eq!(reply.headers["cache-control"], "no-store");
        assert_eq!(
            call(&app, request("GET", "/readyz", None, Body::empty()))
                .await
                .status,
            StatusCode::OK
        );
        ready.store(false, Ordering::SeqCst);
        let reply = call(&app, request("GET", "/readyz", None, Body::empty())).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn token_guards_everything_else() {
        let fake = Arc::new(Fake::default());
        let app = router(admin(Some(TOKEN), &fake));
        for (method, uri) in [
            ("GET", "/metrics"),
            ("GET", "/tenants"),
            ("PUT", "/tenants/default/plugin"),
            ("POST", "/tenants/default/rollback"),
        ] {
            for token in [None, Some("wrong"), Some(""), Some("s3cret-token-and-more")] {
                let reply = call(&app, request(method, uri, token, "x")).await;
                assert_eq!(
                    reply.status,
                    StatusCode::UNAUTHORIZED,
                    "{method} {uri} {token:?}"
                );
                let challenge = reply.headers["www-authenticate"].to_str().unwrap();
                assert!(challenge.starts_with("Bearer"), "{challenge}");
                assert_eq!(reply.error(), "missing or wrong admin token");
            }
        }
        // Not a bearer scheme.
        let mut req = request("GET", "/tenants", None, Body::empty());
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_static("Basic s3cret-token"),
        );
        assert_eq!(call(&app, req).await.status, StatusCode::UNAUTHORIZED);
        assert!(fake.calls().is_empty());

        // The scheme is case-insensitive.
        let mut req = request("GET", "/tenants", None, Body::empty());
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_static("bearer  s3cret-token "),
        );
        assert_eq!(call(&app, req).await.status, StatusCode::OK);

        let reply = call(&app, request("GET", "/metrics", Some(TOKEN), Body::empty())).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["content-type"], OPENMETRICS_CONTENT_TYPE);
        assert!(reply.body.ends_with("# EOF\n"), "{}", reply.body);

        let reply = call(&app, request("GET", "/tenants", Some(TOKEN), Body::empty())).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.json()[0]["name"], "default");
    }

    #[tokio::test]
    async fn without_a_token_reads_are_open_and_swaps_off() {
        let fake = Arc::new(Fake::default());
        let app = router(admin(None, &fake));
        for uri in ["/metrics", "/tenants"] {
            let reply = call(&app, request("GET", uri, None, Body::empty())).await;
            assert_eq!(reply.status, StatusCode::OK, "{uri}");
        }
        for (method, uri) in [
            ("PUT", "/tenants/default/plugin"),
            ("POST", "/tenants/default/rollback"),
        ] {
            // Whatever token is sent.
            for token in [None, Some(TOKEN)] {
                let reply = call(&app, request(method, uri, token, "wasm")).await;
                assert_eq!(reply.status, StatusCode::FORBIDDEN);
                assert_eq!(
                    reply.error(),
                    "no admin token configured: mutating endpoints are off"
                );
            }
        }
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn deploy_maps_outcomes_and_errors() {
        let fake = Arc::new(Fake::default());
        let app = router(admin(Some(TOKEN), &fake));
        let uri = "/tenants/default/plugin?policy=migrate&name=chat-2.wasm";
        let reply = call(&app, request("PUT", uri, Some(TOKEN), "component")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        assert_eq!(reply.json()["policy"], "migrate");
        assert_eq!(reply.json()["sha256"], "a".repeat(64));

        let reply = call(
            &app,
            request("PUT", "/tenants/default/plugin", Some(TOKEN), "bad"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(reply.error().contains("on-close"), "{}", reply.error());

        let reply = call(
            &app,
            request("PUT", "/tenants/nope/plugin", Some(TOKEN), "x"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert!(reply.error().contains("nope"), "{}", reply.error());

        let reply = call(
            &app,
            request(
                "POST",
                "/tenants/default/rollback?policy=restart",
                Some(TOKEN),
                "",
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CONFLICT);
        assert_eq!(
            fake.calls(),
            [
                "deploy default chat-2.wasm 9 migrate",
                "deploy default upload 3 drain",
                "deploy nope upload 1 drain",
                "rollback default restart",
            ]
        );
    }

    #[tokio::test]
    async fn bad_queries_and_bodies_are_400_or_413() {
        let fake = Arc::new(Fake::default());
        let app = router(admin(Some(TOKEN), &fake));
        for (method, uri) in [
            ("PUT", "/tenants/default/plugin?policy=yolo"),
            ("PUT", "/tenants/default/plugin?polcy=restart"),
            ("PUT", "/tenants/default/plugin?name=../../etc"),
            ("PUT", "/tenants/default/plugin?name="),
            ("POST", "/tenants/default/rollback?policy=Drain"),
            ("POST", "/tenants/default/rollback?name=x"),
        ] {
            let reply = call(&app, request(method, uri, Some(TOKEN), "x")).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{uri}: {}",
                reply.body
            );
            assert!(!reply.error().is_empty());
        }
        let reply = call(
            &app,
            request(
                "PUT",
                "/tenants/default/plugin?policy=yolo",
                Some(TOKEN),
                "x",
            ),
        )
        .await;
        assert!(reply.error().contains("yolo"), "{}", reply.error());

        // Over the cap: announced, or streamed without a length.
        let reply = call(
            &app,
            request(
                "PUT",
                "/tenants/default/plugin",
                Some(TOKEN),
                vec![0u8; 1025],
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        let chunks = futures_stream(vec![vec![0u8; 600], vec![0u8; 600]]);
        let reply = call(
            &app,
            request("PUT", "/tenants/default/plugin", Some(TOKEN), chunks),
        )
        .await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        // Exactly at the cap is fine.
        let reply = call(
            &app,
            request(
                "PUT",
                "/tenants/default/plugin",
                Some(TOKEN),
                vec![0u8; 1024],
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);

        // A JSON body that is not {"path": ...}.
        let mut req = request(
            "PUT",
            "/tenants/default/plugin",
            Some(TOKEN),
            r#"{"file": "x"}"#,
        );
        req.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(call(&app, req).await.status, StatusCode::BAD_REQUEST);
        assert_eq!(fake.calls().len(), 1);
    }

    /// A body of `chunks` without a Content-Length.
    fn futures_stream(chunks: Vec<Vec<u8>>) -> Body {
        let chunks = chunks.into_iter().map(Ok::<_, std::io::Error>);
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn deploy_by_path_reads_the_file_server_side() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("my plugin.wasm");
        std::fs::write(&path, b"component").unwrap();
        let big = dir.path().join("big.wasm");
        std::fs::write(&big, vec![0u8; 2000]).unwrap();
        let fake = Arc::new(Fake::default());
        let app = router(admin(Some(TOKEN), &fake));
        let json = |p: &std::path::Path| {
            let body = serde_json::json!({ "path": p }).to_string();
            let mut req = request(
                "PUT",
                "/tenants/default/plugin?policy=restart",
                Some(TOKEN),
                body,
            );
            req.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            req
        };
        let reply = call(&app, json(&path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
        let reply = call(&app, json(&big)).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        let reply = call(&app, json(&dir.path().join("missing.wasm"))).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(reply.error().contains("missing.wasm"), "{}", reply.error());
        assert_eq!(fake.calls(), ["deploy default my_plugin 9 restart"]);
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let fake = Arc::new(Fake::default());
        let app = router(admin(None, &fake));
        for uri in [
            "/",
            "/metricsx",
            "/healthz/",
            "/tenants/default",
            "/nope?metrics",
        ] {
            let reply = call(&app, request("GET", uri, None, Body::empty())).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(reply.error(), "not found");
        }
        // Authorized (the token is checked before the method).
        let app = router(admin(Some(TOKEN), &fake));
        for (method, uri) in [
            ("POST", "/metrics"),
            ("PUT", "/healthz"),
            ("GET", "/tenants/default/plugin"),
            ("DELETE", "/tenants"),
        ] {
            let reply = call(&app, request(method, uri, Some(TOKEN), "x")).await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri}"
            );
            assert!(reply.headers.contains_key("allow"), "{method} {uri}");
        }
        // HEAD is GET without the body.
        let reply = call(&app, request("HEAD", "/healthz", None, Body::empty())).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.body.is_empty());
    }

    #[test]
    fn tokens() {
        assert!(AdminToken::new("  \n").is_none());
        let token = AdminToken::new(" abc\n").unwrap();
        assert!(token.matches(b"abc"));
        assert!(!token.matches(b"abd"));
        assert!(!token.matches(b"abc "));
        assert!(!token.matches(b""));
        assert_eq!(format!("{token:?}"), "AdminToken(..)");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        let loaded = AdminToken::load_from(None, Some(&file)).unwrap().unwrap();
        assert!(loaded.matches(b"from-file"));
        let loaded = AdminToken::load_from(Some("from-env".into()), Some(&file))
            .unwrap()
            .unwrap();
        assert!(loaded.matches(b"from-env"));
        assert!(AdminToken::load_from(None, None).unwrap().is_none());
        let err = AdminToken::load_from(Some(" ".into()), None).unwrap_err();
        assert!(err.to_string().contains(TOKEN_ENV), "{err}");

        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = AdminToken::load_from(None, Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let err = AdminToken::load_from(None, Some(&dir.path().join("none"))).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    // -----------------------------------------------------------------------
    // Over real sockets: the HTTP/1.1 bounds and the shutdown.
    // -----------------------------------------------------------------------

    struct Server {
        addr: SocketAddr,
        shutdown: CancellationToken,
        task: JoinHandle<()>,
    }

    async fn start(header_read_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let fake = Arc::new(Fake::default());
        let mut admin = admin(None, &fake);
        admin.limits.header_read_timeout = header_read_timeout;
        let task = tokio::spawn(serve(listener, admin, shutdown.clone()));
        Server {
            addr,
            shutdown,
            task,
        }
    }

    impl Server {
        async fn stop(self) {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("serve returns after shutdown")
                .expect("serve does not panic");
        }
    }

    /// Sends `raw`, reads until EOF (within 10 s): the status (0 if the
    /// server answered nothing) and the whole response text.
    async fn exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // A server that refuses the connection may have closed it already.
        let _ = stream.write_all(raw).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("response within 10 s");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .strip_prefix("HTTP/1.")
            .and_then(|t| t.get(2..5))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    #[tokio::test]
    async fn serves_http_1_1() {
        let server = start(Duration::from_secs(5)).await;
        let (status, text) = exchange(
            server.addr,
            b"GET /metrics HTTP/1.1\r\nHost: wharf\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains(OPENMETRICS_CONTENT_TYPE), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        // HTTP/1.0, and a query string.
        let (status, text) = exchange(server.addr, b"GET /healthz?x=1 HTTP/1.0\r\n\r\n").await;
        assert_eq!(status, 200, "{text}");
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_is_400_and_oversized_431() {
        let server = start(Duration::from_secs(5)).await;
        for request in [
            &b"NOT A REQUEST\r\n\r\n"[..],
            b"\x00\x01\x02\x03\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            let (status, text) = exchange(server.addr, request).await;
            assert_eq!(status, 400, "{text}");
        }
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Filler: ".to_vec();
        request.resize(MAX_HEAD_BYTES + 1000, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let (status, text) = exchange(server.addr, &request).await;
        assert_eq!(status, 431, "{text}");

        let mut request = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            request.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        request.extend_from_slice(b"\r\n");
        assert!(request.len() < MAX_HEAD_BYTES);
        let (status, text) = exchange(server.addr, &request).await;
        assert_eq!(status, 431, "{text}");
        server.stop().await;
    }

    #[tokio::test]
    async fn slow_or_idle_clients_are_closed() {
        let server = start(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let (status, _) = exchange(server.addr, b"GET /metr").await;
        assert_eq!(status, 0, "no response, the connection is closed");
        assert!(started.elapsed() < Duration::from_secs(5));
        // An idle keep-alive connection is closed too.
        let (status, text) =
            exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, 200, "{text}");
        server.stop().await;
    }

    #[tokio::test]
    async fn too_many_connections_are_closed() {
        let server = start(Duration::from_secs(5)).await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(server.addr).await.expect("connect"));
        }
        // Let the server accept them all, then one more is closed at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = exchange(server.addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, 0);
        drop(idle);
        let mut status = 0;
        for _ in 0..50 {
            status = exchange(
                server.addr,
                b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .0;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, 200);
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_returns_with_idle_connection_open() {
        let server = start(Duration::from_secs(30)).await;
        let addr = server.addr;
        let mut idle = TcpStream::connect(addr).await.expect("connect");
        // Make sure the idle connection has been accepted before shutting down.
        let (status, _) =
            exchange(addr, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert_eq!(status, 200);
        server.stop().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut out))
            .await
            .expect("idle connection closed by shutdown");
        assert!(read.is_err() || out.is_empty());
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
