//! The opening handshake: the request read and answered, the tenant chosen
//! and its rules applied before any plugin runs, the instance created and
//! asked (`on-upgrade`), the 101 written, and `on-open` called.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use wharf_protocol::{CloseCode, HandshakeError, Request};

use super::Shared;
use super::conn::Conn;
use crate::runtime::PluginError;
use crate::runtime::bindings::{Accept, Header, UpgradeResponse};
use crate::runtime::lifecycle::Calls;
use crate::runtime::request_host::RequestEntry;
use crate::server::handler::Handler;
use crate::server::per_address::AddressPlace;

/// 503 body when the server or the instance pool is full.
const BUSY: &str = "server at capacity, try again later";
/// 500 body when the plugin failed or answered what cannot be sent.
const HANDLER_ERROR: &str = "handler error";

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

/// An opened connection, the bytes read past its request, and the capacity
/// it holds. Boxed when returned: the task that takes it keeps a slot of
/// its size for life, and would carry the connection there twice.
pub(super) struct Opened {
    conn: Conn,
    buf: BytesMut,
    permits: Permits,
}

impl Opened {
    /// The parts, and the box freed now: a box moved out of by
    /// destructuring is freed only at the end of its scope, which for the
    /// connection's task is the connection's whole life.
    pub(super) fn into_parts(self: Box<Self>) -> (Conn, BytesMut, Permits) {
        let Opened { conn, buf, permits } = *self;
        (conn, buf, permits)
    }
}

/// The opening handshake, up to `on-open`. The tenant is chosen,
/// and its origin rule and connection limit applied, before any plugin runs.
pub(super) async fn open<R, W>(
    reader: &mut R,
    writer: &mut W,
    accepted: Accepted,
    shared: &Arc<Shared>,
) -> Option<Box<Opened>>
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
    let (request, consumed) = read_request(reader, writer, &mut buf, shared, deadline).await?;
    buf.advance(consumed);
    let host = request.header("host");
    let Some(tenant) = shared.tenants.route(host, request.path()).cloned() else {
        tracing::debug!(conn = id, host, path = request.path(), "no route");
        return refuse(
            writer,
            shared,
            404,
            "no-route",
            "no WebSocket endpoint here",
        )
        .await;
    };
    if !tenant.origins.allows(request.header("origin"), host) {
        tracing::debug!(conn = id, tenant = %tenant.name, origin = request.header("origin"), "origin not allowed");
        shared.metrics.tenant_refused(&tenant.name, "origin");
        return refuse(writer, shared, 403, "origin", "origin not allowed").await;
    }
    // Capacity is taken once the request is in: answering earlier would
    // close the socket with the request unread, which the kernel turns into
    // a reset that can destroy the 503 before the client reads it.
    if tenant.cpu.exhausted() {
        shared.metrics.tenant_refused(&tenant.name, "cpu-share");
        return refuse(writer, shared, 503, "tenant-cpu", "busy, try again later").await;
    }
    let Some(tenant_permit) = tenant.admit() else {
        shared.metrics.tenant_refused(&tenant.name, "capacity");
        return refuse(
            writer,
            shared,
            503,
            "tenant-capacity",
            "at capacity, try again later",
        )
        .await;
    };
    let Some(permit) = shared.capacity.clone().try_acquire_owned().ok() else {
        return refuse(writer, shared, 503, "capacity", BUSY).await;
    };
    if address.as_mut().is_some_and(|a| !a.open()) {
        tracing::debug!(conn = id, %peer, "too many connections from this address; 503");
        let body = "too many connections from your address";
        return refuse(writer, shared, 503, "address-capacity", body).await;
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
            return refuse(writer, shared, 503, "pool", BUSY).await;
        }
        Err(err) => {
            tracing::error!(tenant = %tenant.name, conn = id, %err, "cannot instantiate plugin");
            shared.metrics.plugin_failure(&tenant.name, err.kind());
            return refuse(writer, shared, 500, "plugin-error", "handler unavailable").await;
        }
    };
    let response = if plugin.wants(Calls::UPGRADE) {
        // A copy (two allocations): `decide` reads the request after the call.
        let upgrade = RequestEntry::new(request.clone(), peer, tls);
        let response = match handler.acquire(&plugin, id).await {
            Ok(Some(mut instance)) => {
                let r = instance.on_upgrade(upgrade).await;
                if r.is_err() {
                    // Refused with a 500: there is no connection to
                    // deliver the sends it queued to.
                    let dropped = instance.fail().messages();
                    if dropped > 0 {
                        shared.metrics.sends_refused("instance-failed", dropped);
                    }
                }
                r
            }
            Ok(None) => Err(PluginError::Instantiate(anyhow::anyhow!(
                "the shared instance failed"
            ))),
            Err(err) => Err(err),
        };
        shared.metrics.plugin_call(started.elapsed());
        response
    } else {
        // Declined (`lifecycle`): every upgrade that got this far is taken.
        Ok(UpgradeResponse::Accept(Accept {
            subprotocol: None,
            headers: Vec::new(),
        }))
    };
    let reply = match response.map(|r| decide(&request, r)) {
        Ok(Decision::Accept(reply)) => reply,
        Ok(Decision::Reject {
            status,
            response,
            complaint,
        }) => {
            if let Some(complaint) = complaint {
                tracing::error!(tenant = %tenant.name, conn = id, "{complaint}");
            }
            shared.metrics.handshake_failed(status, "plugin-reject");
            tracing::debug!(
                conn = id,
                status,
                path = request.path(),
                "upgrade rejected by plugin"
            );
            let _ = write_and_close(writer, &response).await;
            return None;
        }
        Ok(Decision::Invalid(complaint)) => {
            tracing::error!(tenant = %tenant.name, conn = id, "{complaint}");
            return refuse(writer, shared, 500, "plugin-error", HANDLER_ERROR).await;
        }
        Err(err) => {
            tracing::error!(tenant = %tenant.name, conn = id, %err, "plugin failed in on-upgrade");
            shared.metrics.plugin_failure(&tenant.name, err.kind());
            return refuse(writer, shared, 500, "plugin-error", HANDLER_ERROR).await;
        }
    };
    // Counted open before the 101 is written: a client that has read it
    // (and a test that then scrapes the metrics) must find itself counted.
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
    if writer.write_all(&reply).await.is_err() {
        // The peer left as the 101 went out, as it may just after: 1006.
        shared.metrics.connection_closed(CloseCode::ABNORMAL, false);
        return None;
    }
    tracing::debug!(conn = id, tenant = %conn.tenant.name, path = request.path(), "open");
    // Messages the plugin sent from on-upgrade follow the 101.
    conn.after_call(Ok(())).await;
    conn.on_open().await;
    let permits = Permits {
        _tenant: tenant_permit,
        _server: permit,
        _address: address,
    };
    Some(Box::new(Opened { conn, buf, permits }))
}

/// What the plugin's answer to an upgrade means for the client.
#[derive(Debug)]
enum Decision {
    /// The 101, to write.
    Accept(Vec<u8>),
    /// The plugin's refusal, to write; `complaint`: what was wrong with it
    /// (a status outside 400-599 or headers that cannot be sent, answered
    /// with a plain 500 instead).
    Reject {
        status: u16,
        response: Vec<u8>,
        complaint: Option<String>,
    },
    /// The plugin accepted in a way that cannot be sent (a subprotocol the
    /// client did not offer, invalid headers): 500.
    Invalid(String),
}

/// Checks the plugin's answer against the request and builds the response.
fn decide(request: &Request, response: UpgradeResponse) -> Decision {
    match response {
        UpgradeResponse::Accept(accept) => {
            if let Some(p) = &accept.subprotocol
                && !request.subprotocols().any(|offered| offered == p)
            {
                return Decision::Invalid(format!(
                    "plugin chose a subprotocol the client did not offer: {p:?}"
                ));
            }
            match wharf_protocol::accept_response(
                request.key(),
                accept.subprotocol.as_deref(),
                &headers(accept.headers),
            ) {
                Ok(reply) => Decision::Accept(reply),
                Err(err) => Decision::Invalid(format!("plugin's 101 headers refused: {err}")),
            }
        }
        UpgradeResponse::Reject(reject) => {
            let mut complaint = None;
            let status = if (400..=599).contains(&reject.status) {
                reject.status
            } else {
                complaint = Some(format!(
                    "plugin rejected with status {}, outside 400-599",
                    reject.status
                ));
                500
            };
            let (status, response) = match wharf_protocol::reject_response(
                status,
                &headers(reject.headers),
                &reject.body,
            ) {
                Ok(response) => (status, response),
                Err(err) => {
                    complaint = Some(format!("plugin's reject headers refused: {err}"));
                    let plain = wharf_protocol::reject_response(500, &[], "handler error\n");
                    (500, plain.unwrap_or_default())
                }
            };
            Decision::Reject {
                status,
                response,
                complaint,
            }
        }
    }
}

/// Refuses the upgrade with `status` (counted as `reason`) and `body`.
async fn refuse<W: AsyncWrite + Unpin, T>(
    writer: &mut W,
    shared: &Shared,
    status: u16,
    reason: &'static str,
    body: &str,
) -> Option<T> {
    shared.metrics.handshake_failed(status, reason);
    respond_error(writer, status, body).await;
    None
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

fn headers(list: Vec<Header>) -> Vec<(String, String)> {
    list.into_iter().map(|h| (h.name, h.value)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::bindings::{Accept, Reject};

    fn request(subprotocols: &[&str]) -> Request {
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
            if subprotocols.is_empty() {
                String::new()
            } else {
                format!("Sec-WebSocket-Protocol: {}\r\n", subprotocols.join(", "))
            }
        );
        let limits = wharf_protocol::HandshakeLimits::default();
        wharf_protocol::parse_request(head.as_bytes(), &limits)
            .unwrap()
            .unwrap()
            .0
    }

    fn accept(subprotocol: Option<&str>, headers: &[(&str, &str)]) -> UpgradeResponse {
        UpgradeResponse::Accept(Accept {
            subprotocol: subprotocol.map(str::to_owned),
            headers: headers
                .iter()
                .map(|(n, v)| Header {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        })
    }

    #[test]
    fn an_accept_becomes_the_101_unless_it_cannot_be_sent() {
        let req = request(&["chat"]);
        let Decision::Accept(reply) = decide(&req, accept(Some("chat"), &[("X-A", "1")])) else {
            panic!("accepted");
        };
        let text = String::from_utf8(reply).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"), "{text}");
        assert!(matches!(
            decide(&req, accept(Some("other"), &[])),
            Decision::Invalid(_)
        ));
        assert!(matches!(
            decide(&req, accept(None, &[("Upgrade", "x")])),
            Decision::Invalid(_)
        ));
    }

    #[test]
    fn a_reject_keeps_its_status_within_400_599_and_is_500_otherwise() {
        let req = request(&[]);
        let reject = |status, headers: Vec<Header>| {
            decide(
                &req,
                UpgradeResponse::Reject(Reject {
                    status,
                    headers,
                    body: "no".into(),
                }),
            )
        };
        let Decision::Reject {
            status, complaint, ..
        } = reject(401, vec![])
        else {
            panic!("rejected");
        };
        assert_eq!((status, complaint), (401, None));
        let Decision::Reject {
            status,
            response,
            complaint,
        } = reject(200, vec![])
        else {
            panic!("rejected");
        };
        assert_eq!(status, 500);
        assert!(response.starts_with(b"HTTP/1.1 500"));
        assert!(complaint.is_some());
        let bad = Header {
            name: "Bad Name".into(),
            value: "x".into(),
        };
        let Decision::Reject {
            status,
            response,
            complaint,
        } = reject(403, vec![bad])
        else {
            panic!("rejected");
        };
        assert_eq!(status, 500, "counted as what was sent");
        assert!(response.starts_with(b"HTTP/1.1 500"), "the plain 500");
        assert!(complaint.is_some());
    }
}
