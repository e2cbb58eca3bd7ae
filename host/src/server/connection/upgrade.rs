//! The opening handshake: the request read and answered, the tenant chosen
//! and its rules applied before any plugin runs, the instance created and
//! asked (`on-upgrade`), the 101 written, and `on-open` called.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use wharf_protocol::{HandshakeError, Request};

use super::Shared;
use super::conn::Conn;
use crate::runtime::PluginError;
use crate::runtime::bindings::{Header, UpgradeRequest, UpgradeResponse};
use crate::server::handler::Handler;
use crate::server::per_address::AddressPlace;

/// An open connection's places: among the tenant's, the server's and its
/// client address's connections. Held for its life.
pub(super) struct Permits {
    _tenant: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
    _address: Option<AddressPlace>,
}

/// What is known of a connection when its request is read.
pub(super) struct Accepted {
    pub peer: SocketAddr,
    pub tls: bool,
    pub id: u64,
    /// The handshake's whole deadline (see [`Handshake`](crate::server::pending::Handshake)).
    pub deadline: tokio::time::Instant,
    /// Its place among its address's connections.
    pub address: Option<AddressPlace>,
}

/// The opening handshake, up to `on-open`: the open connection, the bytes
/// read past the request, and the capacity it holds. The tenant is chosen,
/// and its origin rule and connection limit applied, before any plugin runs.
pub(super) async fn open<R, W>(
    reader: &mut R,
    writer: &mut W,
    accepted: Accepted,
    shared: &Arc<Shared>,
) -> Option<(Conn, BytesMut, Permits)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Accepted {
        peer,
        tls,
        id,
        deadline,
        mut address,
    } = accepted;
    let mut buf = BytesMut::with_capacity(4096);
    let (mut request, consumed) = read_request(reader, writer, &mut buf, shared, deadline).await?;
    buf.advance(consumed);
    let host = request.header("host");
    let Some(tenant) = shared.tenants.route(host, &request.path).cloned() else {
        tracing::debug!(conn = id, host, path = %request.path, "no route");
        shared.metrics.handshake_failed(404, "no-route");
        respond_error(writer, 404, "no WebSocket endpoint here").await;
        return None;
    };
    if !tenant.origins.allows(request.header("origin"), host) {
        tracing::debug!(conn = id, tenant = %tenant.name, origin = request.header("origin"), "origin not allowed");
        shared.metrics.tenant_refused(&tenant.name, "origin");
        shared.metrics.handshake_failed(403, "origin");
        respond_error(writer, 403, "origin not allowed").await;
        return None;
    }
    // Capacity is taken once the request is in: answering earlier would
    // close the socket with the request unread, which the kernel turns into
    // a reset that can destroy the 503 before the client reads it.
    if tenant.cpu.exhausted() {
        shared.metrics.tenant_refused(&tenant.name, "cpu-share");
        shared.metrics.handshake_failed(503, "tenant-cpu");
        respond_error(writer, 503, "busy, try again later").await;
        return None;
    }
    let Some(tenant_permit) = tenant.admit() else {
        shared.metrics.tenant_refused(&tenant.name, "capacity");
        shared.metrics.handshake_failed(503, "tenant-capacity");
        respond_error(writer, 503, "at capacity, try again later").await;
        return None;
    };
    let Some(permit) = shared.capacity.clone().try_acquire_owned().ok() else {
        shared.metrics.handshake_failed(503, "capacity");
        respond_error(writer, 503, "server at capacity, try again later").await;
        return None;
    };
    if address.as_mut().is_some_and(|a| !a.open()) {
        tracing::debug!(conn = id, %peer, "too many connections from this address; 503");
        shared.metrics.handshake_failed(503, "address-capacity");
        respond_error(writer, 503, "too many connections from your address").await;
        return None;
    }

    // Subscribed before the version is read: a swap made in between is
    // seen as one.
    let mut swaps = tenant.plugin.subscribe();
    let version = swaps.borrow_and_update().version.clone();
    let plugin = version.plugin.clone();
    let started = Instant::now();
    let created = match &version.shared {
        None => plugin.instantiate(id).await.map(Handler::own),
        Some(shared) => Handler::join(shared, id).await,
    };
    let mut handler = match created {
        Ok(h) => h,
        Err(PluginError::PoolExhausted) => {
            tracing::warn!(tenant = %tenant.name, conn = id, "no instance slot free; 503");
            shared.metrics.handshake_failed(503, "pool");
            respond_error(writer, 503, "server at capacity, try again later").await;
            return None;
        }
        Err(err) => {
            tracing::error!(tenant = %tenant.name, conn = id, %err, "cannot instantiate plugin");
            shared.metrics.plugin_failure(&tenant.name, err.kind());
            shared.metrics.handshake_failed(500, "plugin-error");
            respond_error(writer, 500, "handler unavailable").await;
            return None;
        }
    };
    let upgrade = upgrade_request(&mut request, peer, tls);
    let response = match handler.acquire(&plugin, id).await {
        Ok(Some(mut instance)) => {
            let r = instance.on_upgrade(&upgrade).await;
            if r.is_err() {
                instance.fail();
            }
            r
        }
        Ok(None) => Err(PluginError::Instantiate(anyhow::anyhow!(
            "the shared instance failed"
        ))),
        Err(err) => Err(err),
    };
    shared.metrics.plugin_call(started.elapsed());
    let reply = match response {
        Ok(UpgradeResponse::Accept(accept)) => {
            if let Some(p) = &accept.subprotocol
                && !request.subprotocols.contains(p)
            {
                tracing::error!(tenant = %tenant.name, conn = id, subprotocol = %p, "plugin chose a subprotocol the client did not offer");
                shared.metrics.handshake_failed(500, "plugin-error");
                respond_error(writer, 500, "handler error").await;
                return None;
            }
            match wharf_protocol::accept_response(
                &request.key,
                accept.subprotocol.as_deref(),
                &headers(accept.headers),
            ) {
                Ok(r) => r,
                Err(err) => {
                    tracing::error!(tenant = %tenant.name, conn = id, %err, "plugin's 101 headers refused");
                    shared.metrics.handshake_failed(500, "plugin-error");
                    respond_error(writer, 500, "handler error").await;
                    return None;
                }
            }
        }
        Ok(UpgradeResponse::Reject(reject)) => {
            let status = if (400..=599).contains(&reject.status) {
                reject.status
            } else {
                tracing::error!(
                    tenant = %tenant.name,
                    conn = id,
                    status = reject.status,
                    "plugin rejected with a status outside 400-599"
                );
                500
            };
            let resp =
                wharf_protocol::reject_response(status, &headers(reject.headers), &reject.body)
                    .unwrap_or_else(|err| {
                        tracing::error!(tenant = %tenant.name, conn = id, %err, "plugin's reject headers refused");
                        wharf_protocol::reject_response(500, &[], "handler error\n")
                            .unwrap_or_default()
                    });
            shared.metrics.handshake_failed(status, "plugin-reject");
            tracing::debug!(conn = id, status, path = %request.path, "upgrade rejected by plugin");
            let _ = write_and_close(writer, &resp).await;
            return None;
        }
        Err(err) => {
            tracing::error!(tenant = %tenant.name, conn = id, %err, "plugin failed in on-upgrade");
            shared.metrics.plugin_failure(&tenant.name, err.kind());
            shared.metrics.handshake_failed(500, "plugin-error");
            respond_error(writer, 500, "handler error").await;
            return None;
        }
    };
    if writer.write_all(&reply).await.is_err() {
        shared.metrics.handshake_failed(101, "io");
        return None;
    }

    let mut conn = Conn::new(
        id,
        tenant,
        plugin.clone(),
        handler,
        version.serve(),
        swaps,
        shared.clone(),
    );
    shared.metrics.connection_opened();
    shared.metrics.tenant_connection(&conn.tenant.name, 1);
    tracing::debug!(conn = id, tenant = %conn.tenant.name, path = %request.path, "open");
    // Messages the plugin sent from on-upgrade follow the 101.
    conn.after_call(Ok(())).await;
    conn.on_open().await;
    let permits = Permits {
        _tenant: tenant_permit,
        _server: permit,
        _address: address,
    };
    Some((conn, buf, permits))
}

/// Reads until a complete upgrade request; answers and drops the connection
/// on a malformed one, a timeout, or shutdown.
async fn read_request<R, W>(
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Option<(Request, usize)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Parsed once the head is complete (or too large), not per read.
    let mut head = wharf_protocol::HeadScanner::default();
    loop {
        let ready = head.complete(buf) || buf.len() > shared.handshake.max_request_bytes;
        match ready.then(|| wharf_protocol::parse_request(buf, &shared.handshake)) {
            None | Some(Ok(None)) => {}
            Some(Ok(Some(done))) => return Some(done),
            Some(Err(err)) => {
                // A plain GET/HEAD (a browser asking for the page) may be
                // answered from static_files.dir: the complete head is in `buf`.
                let not_upgrade = matches!(
                    err,
                    HandshakeError::NotWebSocketUpgrade | HandshakeError::MethodNotAllowed(_)
                );
                if not_upgrade
                    && let Some(files) = &shared.static_files
                    && let Some(resp) = files.respond(buf).await
                {
                    shared.metrics.static_response(resp.status);
                    // Streamed; bounded by the handshake's deadline (see `run`).
                    if resp.write_to(writer).await.is_ok() {
                        let _ = writer.shutdown().await;
                    }
                } else {
                    handshake_refused(writer, &err, shared).await;
                }
                return None;
            }
        }
        let read = tokio::select! {
            _ = shared.shutdown.cancelled() => return None,
            _ = tokio::time::sleep_until(deadline) => {
                shared.metrics.handshake_failed(408, "timeout");
                respond_error(writer, 408, "upgrade request not received in time").await;
                return None;
            }
            read = reader.read_buf(buf) => read,
        };
        match read {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    shared.metrics.handshake_failed(0, "io");
                }
                return None;
            }
            Ok(_) => {}
        }
    }
}

async fn handshake_refused<W: AsyncWrite + Unpin>(
    writer: &mut W,
    err: &HandshakeError,
    shared: &Shared,
) {
    tracing::debug!(%err, status = err.status(), "upgrade request refused");
    shared
        .metrics
        .handshake_failed(err.status(), "invalid-request");
    let _ = write_and_close(writer, &err.response()).await;
}

async fn respond_error<W: AsyncWrite + Unpin>(writer: &mut W, status: u16, body: &str) {
    if let Ok(resp) = wharf_protocol::reject_response(status, &[], &format!("{body}\n")) {
        let _ = write_and_close(writer, &resp).await;
    }
}

async fn write_and_close<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    // Bounded: a client that does not read its error response is dropped.
    let write = async {
        writer.write_all(bytes).await?;
        writer.shutdown().await
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), write)
        .await
        .unwrap_or(Ok(()))
}

/// What the plugin sees of the request. The headers are moved, not copied:
/// nothing after `on-upgrade` reads them.
fn upgrade_request(request: &mut Request, peer: SocketAddr, tls: bool) -> UpgradeRequest {
    UpgradeRequest {
        method: request.method.clone(),
        path: request.path.clone(),
        query: request.query.clone(),
        headers: std::mem::take(&mut request.headers)
            .into_iter()
            .map(|(name, value)| Header { name, value })
            .collect(),
        subprotocols: request.subprotocols.clone(),
        remote_address: peer.to_string(),
        tls,
    }
}

fn headers(list: Vec<Header>) -> Vec<(String, String)> {
    list.into_iter().map(|h| (h.name, h.value)).collect()
}
