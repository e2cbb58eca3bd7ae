//! One connection's task: the upgrade handshake, then the loop that feeds
//! socket bytes to the protocol core, protocol events to the plugin, and the
//! plugin's sends and the core's output back to the socket.
//!
//! The task owns everything about its connection (socket, protocol state,
//! plugin instance), so connections share nothing but the engine and the
//! metrics, and a misbehaving plugin can only hurt its own connection.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, watch};
use wharf_protocol::{CloseCode, CloseInfo, Event, HandshakeError, Request, State, WebSocket};

use super::Shared;
use super::handler::Handler;
use super::inbox::{self, Inbox};
use super::pending::Handshake;
use crate::metrics::Tally;
use crate::runtime::batch_handler::Message;
use crate::runtime::bindings::{Header, UpgradeRequest, UpgradeResponse};
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::idle_pool;
use crate::runtime::pubsub_host::Mailbox;
use crate::runtime::{Plugin, PluginError, PluginInstance};
use crate::tenancy::Tenant;
use crate::tenancy::rate::Bucket;
use crate::tenancy::swap::{Current, Policy, Serving};

/// The most read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// What an open connection reads at a time until a read fills it: most
/// connections carry small messages, and a 64 KiB buffer for each would be
/// a large allocation (and free, with glibc's consolidation) per connection.
const FIRST_READ_CHUNK: usize = 4096;
/// The read buffer of a hibernated connection until bytes arrive again: ten
/// thousand idle 64 KiB buffers would be most of an idle server's memory.
const IDLE_READ_CHUNK: usize = 256;
/// Slices handed to one vectored write: the queue is a few chunks of at least
/// 16 KiB and a tail, so 16 carry plenty per call (and are cheap to set up).
const WRITE_SLICES: usize = 16;
/// 1011 reason sent when a plugin dies: says what happened, not why (the why
/// is in the host's log, not for the peer).
const PLUGIN_FAILED: &str = "handler failed";

pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    id: u64,
    shared: Arc<Shared>,
    handshake: Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    // The upgrade's futures (request parsing, instantiation, on-upgrade) are
    // large and finished with once the connection is open: boxed, an open
    // connection's task does not carry their space for its whole life.
    let open = Box::pin(open(
        &mut reader,
        &mut writer,
        peer,
        tls,
        id,
        &shared,
        handshake.deadline,
    ));
    // One deadline for all of it (the request has its own 408 at the same
    // moment; this one also bounds the plugin's upgrade and the 101).
    let opened = tokio::select! {
        biased;
        opened = open => opened,
        _ = shared.shutdown.cancelled() => None,
        _ = handshake.evicted.cancelled() => None,
        _ = tokio::time::sleep_until(handshake.deadline) => {
            shared.metrics.handshake_failed(0, "timeout");
            None
        }
    };
    drop(handshake);
    let Some((mut conn, buf, permits)) = opened else {
        return;
    };
    conn.drive(&mut reader, &mut writer, buf, tls).await;
    drop(permits);
}

/// An open connection's places: among the tenant's, and the server's.
type Permits = [OwnedSemaphorePermit; 2];

/// The opening handshake, up to `on-open`: the open connection, the bytes
/// read past the request, and the capacity it holds. The tenant is chosen,
/// and its origin rule and connection limit applied, before any plugin runs.
async fn open<R, W>(
    reader: &mut R,
    writer: &mut W,
    peer: SocketAddr,
    tls: bool,
    id: u64,
    shared: &Arc<Shared>,
    deadline: tokio::time::Instant,
) -> Option<(Conn, BytesMut, Permits)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
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

    let now = Instant::now();
    let mut conn = Conn {
        id,
        plugin: plugin.clone(),
        ws: WebSocket::new(tenant.ws.clone(), now),
        rate: Bucket::new(tenant.rate, now),
        rate_limited: false,
        tenant,
        handler,
        serving: version.serve(),
        swaps: Some(swaps),
        restart_at: None,
        last_event: Instant::now(),
        shared: shared.clone(),
        closed: None,
        mailbox: None,
        tally: Tally::default(),
        inbox: Inbox::default(),
        inbox_state: State::Open,
    };
    shared.metrics.connection_opened();
    shared.metrics.tenant_connection(&conn.tenant.name, 1);
    tracing::debug!(conn = id, tenant = %conn.tenant.name, path = %request.path, "open");
    // Messages the plugin sent from on-upgrade follow the 101.
    conn.after_call(Ok(())).await;
    conn.on_open().await;
    Some((conn, buf, [tenant_permit, permit]))
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

/// An open connection: protocol state and, while it is alive, its plugin instance.
struct Conn {
    id: u64,
    tenant: Arc<Tenant>,
    plugin: Arc<Plugin>,
    ws: WebSocket,
    /// The tenant's per-connection message and byte rates.
    rate: Bucket,
    /// Closed with 1008 for going over them: later messages are dropped.
    rate_limited: bool,
    /// Its instance, or its place in the tenant's shared one.
    handler: Handler,
    /// The version of the tenant's plugin it is served by.
    serving: Serving,
    /// The tenant's swaps; `None` once the tenant is gone.
    swaps: Option<watch::Receiver<Current>>,
    /// When to close with 1012 for a swap with the `restart` policy.
    restart_at: Option<Instant>,
    /// When the plugin last handled an event (for hibernation).
    last_event: Instant,
    shared: Arc<Shared>,
    /// How the connection ended, once it has.
    closed: Option<CloseInfo>,
    /// Published messages for this connection (pub/sub), delivered by the
    /// host without waking the plugin; there once the plugin subscribed.
    mailbox: Option<Mailbox>,
    /// Counts not yet added to the shared metrics: they go there when the
    /// connection next waits (and when it ends), not per message.
    tally: Tally,
    /// Messages waiting for one `on-messages` call (batched plugins only).
    inbox: Inbox,
    /// The protocol state when the inbox's first message was read.
    inbox_state: State,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared
            .metrics
            .absorb(&mut self.tally, &self.tenant.counters);
        self.shared.metrics.tenant_connection(&self.tenant.name, -1);
    }
}

impl Conn {
    /// Brings the plugin's view of the connection up to date before a call.
    fn sync_outbox(instance: &mut PluginInstance, backlog: usize, state: State) {
        instance
            .connection()
            .outbox
            .sync(backlog, state != State::Open);
    }

    /// Records a call's duration; its end is the connection's last event.
    fn record_call(&mut self, started: Instant) -> Instant {
        let now = Instant::now();
        self.tally.plugin_call(now - started);
        self.last_event = now;
        now
    }

    async fn on_open(&mut self) {
        let (backlog, state) = (self.ws.output_len(), self.ws.state());
        let started = Instant::now();
        let r = match self.handler.acquire(&self.plugin, self.id).await {
            Ok(Some(mut instance)) => {
                Self::sync_outbox(&mut instance, backlog, state);
                let r = instance.on_open().await;
                if r.is_err() {
                    instance.fail();
                }
                r
            }
            Ok(None) => return,
            Err(err) => Err(err),
        };
        self.record_call(started);
        self.after_call(r).await;
    }

    /// Hands the plugin's sends to the protocol, or buries a failed instance.
    async fn after_call(&mut self, result: Result<(), PluginError>) {
        match result {
            Ok(()) => self.flush_outbox().await,
            Err(err) => {
                // A hibernated connection that cannot wake for want of a
                // slot may retry later; anything else is the plugin's fault.
                let (code, reason) = match err {
                    PluginError::PoolExhausted => (CloseCode::TRY_AGAIN_LATER, "server busy"),
                    _ => (CloseCode::INTERNAL_ERROR, PLUGIN_FAILED),
                };
                tracing::error!(tenant = %self.tenant.name, conn = self.id, %err, code, "plugin failed; closing its connection");
                self.shared
                    .metrics
                    .plugin_failure(&self.tenant.name, err.kind());
                self.handler.bury();
                if self.ws.state() == State::Open {
                    let _ = self.ws.close(code, reason);
                }
            }
        }
    }

    /// Another connection's call queued sends for this one (a shared
    /// instance), or the shared instance failed.
    async fn peer_woke(&mut self) {
        if self.handler.current().await.is_some() {
            self.flush_outbox().await;
        } else if self.ws.state() == State::Open {
            tracing::debug!(conn = self.id, "shared instance failed; closing with 1011");
            let _ = self.ws.close(CloseCode::INTERNAL_ERROR, PLUGIN_FAILED);
        }
    }

    async fn flush_outbox(&mut self) {
        let Some(mut instance) = self.handler.current().await else {
            return;
        };
        let entry = instance.connection();
        if self.mailbox.is_none() {
            self.mailbox = entry.subscriptions.take_mailbox();
        }
        let outbox = &mut entry.outbox;
        if outbox.is_empty() {
            return;
        }
        if !outbox.frames.is_empty() {
            // Framed during the call straight from the plugin's memory; the
            // protocol takes the whole batch (exchanging buffers when its
            // queue is empty). Replies to messages read before a Close came
            // in go ahead of the answer to it: the outbox admitted them by
            // the state the messages were read in.
            let (text, binary) = outbox.frames.take_tally();
            match self.ws.send_batch_before_close(&mut outbox.frames) {
                Ok(()) => {
                    self.tally.messages_sent(false, text.messages, text.bytes);
                    self.tally
                        .messages_sent(true, binary.messages, binary.bytes);
                }
                Err(err) => {
                    // The outbox applies the protocol's own rules, so this is
                    // a race with a close; still, nothing is dropped unseen.
                    let dropped = text.messages + binary.messages;
                    tracing::warn!(conn = self.id, %err, dropped, "plugin sends dropped");
                    self.shared
                        .metrics
                        .sends_refused(send_error_label(&err), dropped);
                }
            }
        }
        if let Some((code, reason)) = outbox.close.take()
            && let Err(err) = self.ws.close(code, &reason)
        {
            tracing::warn!(conn = self.id, %err, "plugin close dropped");
            self.shared.metrics.sends_refused(send_error_label(&err), 1);
        }
    }

    /// When the idle instance is to be released, if hibernation is on.
    fn hibernate_at(&self) -> Option<Instant> {
        let after = self.shared.hibernate_after?;
        (self.handler.can_hibernate() && self.ws.state() == State::Open)
            .then(|| self.last_event + after)
    }

    /// Releases the instance, keeping what the next one resumes from.
    fn hibernate(&mut self) {
        if self.handler.can_hibernate() {
            if let Some(entry) = self.handler.hibernate() {
                entry.outbox.frames.release();
            }
            self.inbox.release();
            self.shared.released.add();
            tracing::debug!(conn = self.id, "hibernated");
        }
    }

    /// The tenant's plugin changed version: move by the swap's policy.
    async fn on_swap(&mut self) {
        let Some(current) = self.swaps.as_mut().map(|s| s.borrow_and_update().clone()) else {
            return;
        };
        // A shared member whose instance a migrate swap moved (which the
        // deploy did before publishing the version) now belongs to the
        // version that instance is; its next call goes there anyway.
        if let Some(instance) = self.handler.follow()
            && !self.serving.version().owns(instance)
            && let Some(version) =
                (self.tenant.plugin.versions().into_iter()).find(|v| v.owns(instance))
        {
            tracing::debug!(
                conn = self.id,
                sha256 = &version.plugin.hash()[..16],
                "migrated with its shared instance"
            );
            self.plugin = version.plugin.clone();
            self.serving = version.serve();
            self.shared.metrics.migrated(&self.tenant.name);
        }
        if Arc::ptr_eq(&current.version, self.serving.version()) {
            return;
        }
        match current.policy {
            Policy::Drain => {}
            Policy::Restart => {
                if self.restart_at.is_none() {
                    // Ids are a keyed permutation: spread evenly.
                    let at = (self.id % 1024) as f64 / 1024.0;
                    let delay = self.shared.restart_window.mul_f64(at);
                    self.restart_at = Some(Instant::now() + delay);
                }
            }
            Policy::Migrate => {
                let plugin = &current.version.plugin;
                match self.handler.migrate(plugin, self.id).await {
                    Ok(true) => {
                        tracing::debug!(conn = self.id, sha256 = &plugin.hash()[..16], "migrated");
                        self.plugin = plugin.clone();
                        self.serving = current.version.serve();
                        self.shared.metrics.migrated(&self.tenant.name);
                    }
                    // A shared member: its instance moved as a whole (above),
                    // or stays (the deploy fell back to drain).
                    Ok(false) => {}
                    Err(err) => self.after_call(Err(err)).await,
                }
            }
        }
    }

    /// Queues a message published to one of the connection's topics.
    fn deliver_published(&mut self, message: &wharf_protocol::Framed) {
        match self.ws.send_framed(message) {
            Ok(()) => {
                self.tally
                    .messages_sent(message.is_binary(), 1, message.payload_len() as u64)
            }
            Err(err) => {
                tracing::debug!(conn = self.id, %err, "published message dropped");
                self.shared.metrics.send_refused(send_error_label(&err));
            }
        }
    }

    /// The connection ended: tell the plugin (its last call) and release it.
    async fn finish(&mut self, info: CloseInfo) {
        if self.closed.is_some() {
            return;
        }
        tracing::debug!(conn = self.id, code = info.code, clean = info.clean, reason = %info.reason, "closed");
        self.shared.metrics.connection_closed(info.code, info.clean);
        let closed = self.closed.insert(info);
        let started = Instant::now();
        let r = match self.handler.acquire(&self.plugin, self.id).await {
            Ok(Some(mut instance)) => {
                Self::sync_outbox(&mut instance, 0, State::Closed);
                let r = instance
                    .on_close(closed.code, &closed.reason, closed.clean)
                    .await;
                if r.is_err() {
                    instance.fail();
                }
                Some(r)
            }
            Ok(None) => None,
            Err(err) => {
                tracing::error!(tenant = %self.tenant.name, conn = self.id, %err, "cannot resume plugin for on-close");
                self.shared
                    .metrics
                    .plugin_failure(&self.tenant.name, err.kind());
                None
            }
        };
        if let Some(r) = r {
            self.record_call(started);
            if let Err(err) = r {
                tracing::error!(tenant = %self.tenant.name, conn = self.id, %err, "plugin failed in on-close");
                self.shared
                    .metrics
                    .plugin_failure(&self.tenant.name, err.kind());
            }
        }
        // Free the pool slot (or the shared instance's entry) now rather
        // than after the lingering close.
        self.handler.release().await;
    }

    /// Feeds buffered input to the protocol and its events to the plugin:
    /// one call per message, or, for a plugin that takes batches, one call
    /// for the messages of a read (see [`Inbox`]).
    async fn process_input(&mut self, input: &[u8]) {
        let mut input = input;
        let batched = self.plugin.batched();
        // One clock read per event: the end of each call is the next one's now.
        let mut now = Instant::now();
        loop {
            // Read before the event borrows the protocol state; the pongs
            // `read` may queue are too small to matter to the send bound.
            let backlog = self.ws.output_len();
            let state = self.ws.state();
            let Some(event) = self.ws.read(&mut input, now) else {
                break;
            };
            let message = match event {
                Event::Text(text) => {
                    self.tally.message_received(false, text.len());
                    Message::Text(text)
                }
                Event::Binary(data) => {
                    self.tally.message_received(true, data.len());
                    Message::Binary(data)
                }
                Event::Closed(info) => {
                    if !info.clean && matches!(info.code, 1002 | 1007 | 1009) {
                        self.shared.metrics.protocol_violation(info.code);
                    }
                    // The messages read before the Close (or the violation)
                    // still get their replies, ahead of our Close frame.
                    now = self.deliver_inbox(now).await;
                    self.finish(info).await;
                    continue;
                }
            };
            if self.rate_limited || !self.rate.admit(now, message.len()) {
                self.over_rate();
                continue;
            }
            let started = now;
            // Small messages with more input behind them wait in the inbox
            // (batched plugins); the last one, or a large one, goes with
            // what waits, uncopied. A message on its own is a plain call.
            let hold = batched && !input.is_empty() && message.len() <= inbox::MESSAGE_MAX;
            if self.inbox.is_empty() {
                self.inbox_state = state;
            }
            let last = if hold {
                if !self.inbox.push(message) {
                    continue;
                }
                None
            } else {
                Some(message)
            };
            let count = self.inbox.len() + usize::from(last.is_some());
            let r = call_with(
                Woken::of(&mut self.handler, &self.plugin, &self.tenant.cpu, self.id),
                &self.inbox,
                last,
                backlog,
                self.inbox_state,
            )
            .await;
            self.inbox.clear();
            match r {
                Some(r) => {
                    now = self.record_call(started);
                    self.after_call(r).await;
                }
                None => self.instance_gone(count),
            }
        }
        // The input ended inside a frame: what is held goes now.
        self.deliver_inbox(now).await;
    }

    /// Messages that arrived after the connection's instance failed (its
    /// Close is on the way): dropped, and counted.
    fn instance_gone(&self, count: usize) {
        self.shared
            .metrics
            .received_dropped("instance-gone", count as u64);
    }

    /// A message the peer sent went over the tenant's rates. The first one
    /// closes the connection with 1008; it and every later one are dropped,
    /// and counted.
    fn over_rate(&mut self) {
        if !self.rate_limited {
            self.rate_limited = true;
            tracing::info!(conn = self.id, tenant = %self.tenant.name, "message rate limit exceeded; closing with 1008");
            self.shared
                .metrics
                .tenant_refused(&self.tenant.name, "rate-limit");
            if self.ws.state() == State::Open {
                let _ = self
                    .ws
                    .close(CloseCode::POLICY_VIOLATION, "rate limit exceeded");
            }
        }
        self.shared.metrics.received_dropped("rate-limit", 1);
    }

    /// Delivers what the inbox holds, if anything, in one call. Returns the
    /// clock at its end.
    async fn deliver_inbox(&mut self, now: Instant) -> Instant {
        if self.inbox.is_empty() {
            return now;
        }
        // The plugin sees the connection as it was when the messages came:
        // a Close read after them does not refuse their replies.
        let backlog = self.ws.output_len();
        let count = self.inbox.len();
        let r = call_with(
            Woken::of(&mut self.handler, &self.plugin, &self.tenant.cpu, self.id),
            &self.inbox,
            None,
            backlog,
            self.inbox_state,
        )
        .await;
        self.inbox.clear();
        match r {
            Some(r) => {
                let end = self.record_call(now);
                self.after_call(r).await;
                end
            }
            None => {
                self.instance_gone(count);
                now
            }
        }
    }

    /// The connection's main loop, until the close handshake is over and the
    /// output flushed (or the transport is gone).
    async fn drive<R, W>(
        &mut self,
        reader: &mut ReadHalf<R>,
        writer: &mut WriteHalf<W>,
        mut rbuf: BytesMut,
        tls: bool,
    ) where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        ReadHalf<R>: AsyncRead + Unpin,
        WriteHalf<W>: AsyncWrite + Unpin,
    {
        let mut shutting_down = false;
        let mut eof = false;
        let mut needs_flush = false;
        let mut flush_deadline: Option<Instant> = None;
        // Since when the send queue has been full.
        let mut slow_since: Option<Instant> = None;
        // The read buffer is the small one of a hibernated connection.
        let mut idle_buffer = false;
        // FIRST_READ_CHUNK until a read fills the buffer, then READ_CHUNK.
        let mut read_chunk = FIRST_READ_CHUNK;
        // Registered with the token once, not re-armed on every pass.
        let shutdown = self.shared.shutdown.clone().cancelled_owned();
        tokio::pin!(shutdown);
        // A shared instance's member is woken by other connections' calls.
        let peer_wake = self.handler.wake().cloned();
        // One timer for the connection's life. Activity only ever moves the
        // deadlines later, so it is re-armed only when a deadline comes
        // earlier than the armed one; firing early is harmless (every
        // deadline is checked against the clock when it fires), and saves
        // a timer-wheel insert and removal per message.
        let timer = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            if !rbuf.is_empty() {
                let input = rbuf.split();
                self.process_input(&input).await;
                rbuf = reuse(rbuf, input);
            }
            // Counted before it is sent: whoever sees a reply also sees it
            // in the metrics.
            self.shared
                .metrics
                .absorb(&mut self.tally, &self.tenant.counters);
            // What the input produced goes out now if the socket takes it,
            // without a round through the select below.
            if (self.ws.has_output() || needs_flush)
                && write_now(writer, &mut self.ws, &mut needs_flush).is_err()
            {
                self.transport_gone().await;
                return;
            }
            if self.ws.is_closed() && !self.ws.has_output() && !needs_flush {
                break;
            }
            let backed_up = self.ws.output_len() >= self.tenant.ws.send_queue_bytes;
            let want_read = !eof && !self.ws.is_closed() && !backed_up;
            // A peer that keeps the send queue full (it reads slower than
            // the plugin writes) has the grace period to catch up.
            let slow_deadline = match (backed_up && !self.ws.is_closed(), slow_since) {
                (false, _) => {
                    slow_since = None;
                    None
                }
                (true, Some(since)) => Some(since + self.shared.send_queue_grace),
                (true, None) => {
                    let now = Instant::now();
                    slow_since = Some(now);
                    Some(now + self.shared.send_queue_grace)
                }
            };
            // Once closed, what is left to write gets the close timeout, no
            // more: a peer that stopped reading must not pin the connection.
            if self.ws.is_closed() && flush_deadline.is_none() {
                flush_deadline = Some(Instant::now() + self.tenant.ws.close_timeout);
            }
            let hibernate_at = self.hibernate_at();
            let deadline = [
                self.ws.poll_timeout(),
                flush_deadline,
                hibernate_at,
                self.restart_at,
                slow_deadline,
            ]
            .into_iter()
            .flatten()
            .min();
            match (deadline, armed) {
                (Some(d), Some(a)) if d >= a => {}
                (Some(d), _) => {
                    timer.as_mut().reset(d.into());
                    armed = Some(d);
                }
                (None, _) => armed = None,
            }
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let filled = self.ws.output_slices(&mut slices);
            // A hibernated connection reads into its small buffer; once
            // anything arrives it gets a regular one again (a message may
            // be starting, and need not wake the plugin yet).
            let low_water = if idle_buffer { 1 } else { read_chunk / 4 };
            if want_read && rbuf.capacity() - rbuf.len() < low_water {
                rbuf.reserve(read_chunk);
            }
            let spare = rbuf.capacity() - rbuf.len();
            tokio::select! {
                biased;
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    if self.ws.state() == State::Open {
                        let _ = self.ws.close(1001, "server shutting down");
                    }
                }
                written = std::future::poll_fn(|cx| poll_write_or_flush(Pin::new(&mut *writer), cx, &slices[..filled])), if filled > 0 || needs_flush => {
                    if wrote(&mut self.ws, &mut needs_flush, written).is_err() {
                        self.transport_gone().await;
                        return;
                    }
                }
                swapped = next_swap(&mut self.swaps), if self.swaps.is_some() && !self.ws.is_closed() => {
                    if swapped {
                        self.on_swap().await;
                    } else {
                        self.swaps = None;
                    }
                }
                _ = peer_woke(peer_wake.as_deref()), if peer_wake.is_some() && !self.ws.is_closed() => {
                    self.peer_woke().await;
                }
                published = next_published(&mut self.mailbox), if self.mailbox.is_some() && !self.ws.is_closed() => {
                    match published {
                        Some(message) => {
                            self.deliver_published(&message);
                            // Drain what else is waiting: one write for the batch.
                            while let Some(Ok(message)) = self.mailbox.as_mut().map(|m| m.try_recv()) {
                                self.deliver_published(&message);
                            }
                        }
                        None => self.mailbox = None,
                    }
                }
                read = reader.read_buf(&mut rbuf), if want_read => {
                    match read {
                        Ok(0) | Err(_) => {
                            eof = true;
                            self.transport_gone().await;
                            if self.ws.is_closed() && !self.ws.has_output() {
                                return;
                            }
                            // The peer half-closed; whatever we still owe it
                            // is written below, then the socket is dropped.
                        }
                        Ok(n) => {
                            // TLS hands out a record per read: take the
                            // others already there too (plain TCP after a
                            // short read has nothing more).
                            let more = tls && !idle_buffer && read_ready(reader, &mut rbuf);
                            // A read that filled the buffer: large messages
                            // (or a burst); read them in full-sized chunks.
                            if n == spare || more {
                                read_chunk = READ_CHUNK;
                            }
                            idle_buffer = false;
                        }
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if slow_deadline.is_some_and(|d| d <= now) && self.ws.state() == State::Open {
                        tracing::info!(conn = self.id, tenant = %self.tenant.name, unsent = self.ws.output_len(), "peer not reading its messages; closing with 1008");
                        self.shared.metrics.tenant_refused(&self.tenant.name, "slow-consumer");
                        let _ = self.ws.close(CloseCode::POLICY_VIOLATION, "too slow");
                    }
                    if self.restart_at.is_some_and(|d| d <= now) {
                        self.restart_at = None;
                        if self.ws.state() == State::Open {
                            let _ = self.ws.close(CloseCode::SERVICE_RESTART, "new version");
                            self.shared.metrics.restart_closed(&self.tenant.name);
                        }
                    }
                    if hibernate_at.is_some_and(|d| d <= now) {
                        self.hibernate();
                        if rbuf.is_empty() {
                            rbuf = BytesMut::with_capacity(IDLE_READ_CHUNK);
                            idle_buffer = true;
                            read_chunk = FIRST_READ_CHUNK;
                        }
                    }
                    if flush_deadline.is_some_and(|d| d <= now) {
                        tracing::debug!(conn = self.id, unsent = self.ws.output_len(), "peer not reading; dropping connection");
                        return;
                    }
                    if let Some(info) = self.ws.handle_timeout(now) {
                        self.finish(info).await;
                    }
                }
            }
        }
        self.linger(reader, writer, &mut rbuf).await;
    }

    /// The transport is gone (EOF or error) before the close handshake ended.
    async fn transport_gone(&mut self) {
        if let Some(info) = self.ws.transport_closed() {
            self.finish(info).await;
        }
    }

    /// After our last byte: half-close (TLS close_notify, TCP FIN) and read
    /// until the peer closes too, so the kernel does not answer its in-flight
    /// data with a reset that could destroy our Close frame.
    async fn linger<R, W>(
        &mut self,
        reader: &mut ReadHalf<R>,
        writer: &mut WriteHalf<W>,
        rbuf: &mut BytesMut,
    ) where
        ReadHalf<R>: AsyncRead + Unpin,
        WriteHalf<W>: AsyncWrite + Unpin,
    {
        let timeout = self.tenant.ws.close_timeout;
        let _ = tokio::time::timeout(timeout, async {
            let _ = writer.shutdown().await;
            // What the peer still sends is discarded, into the read buffer
            // (not a stack array, which every task would carry).
            loop {
                rbuf.clear();
                rbuf.reserve(4096);
                match reader.read_buf(rbuf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

fn send_error_label(err: &wharf_protocol::SendError) -> &'static str {
    use wharf_protocol::SendError::*;
    match err {
        Closed => "closed",
        MessageTooBig => "too-big",
        QueueFull => "queue-full",
        ReasonTooLong => "reason-too-long",
        InvalidCode => "invalid-code",
    }
}

/// Gets the read buffer back after a pass over its contents, keeping its
/// allocation when nothing else holds it.
fn reuse(rbuf: BytesMut, mut consumed: BytesMut) -> BytesMut {
    consumed.clear();
    if rbuf.is_empty() {
        consumed.unsplit(rbuf);
        consumed
    } else {
        rbuf
    }
}

/// One step of writing: the queued slices, or, with none left, a flush of
/// what a TLS stream buffered. `Some(n)`: n bytes written; `None`: flushed.
fn poll_write_or_flush<W: AsyncWrite + Unpin>(
    writer: Pin<&mut W>,
    cx: &mut Context<'_>,
    slices: &[IoSlice<'_>],
) -> Poll<std::io::Result<Option<usize>>> {
    if slices.is_empty() {
        writer.poll_flush(cx).map_ok(|()| None)
    } else {
        writer.poll_write_vectored(cx, slices).map_ok(Some)
    }
}

/// Applies a write step's outcome to the output queue. `Err`: the
/// transport is gone.
fn wrote(
    ws: &mut WebSocket,
    needs_flush: &mut bool,
    written: std::io::Result<Option<usize>>,
) -> Result<(), ()> {
    match written {
        Err(_) | Ok(Some(0)) => return Err(()),
        Ok(Some(n)) => {
            ws.advance_output(n);
            *needs_flush = true;
        }
        Ok(None) => *needs_flush = false,
    }
    Ok(())
}

/// What a call needs: the connection's handler, its plugin, and its
/// tenant's CPU share, which a message event waits for.
struct Woken<'a> {
    handler: &'a mut Handler,
    plugin: &'a Plugin,
    share: &'a CpuShare,
    id: u64,
}

impl<'a> Woken<'a> {
    fn of(handler: &'a mut Handler, plugin: &'a Plugin, share: &'a CpuShare, id: u64) -> Self {
        Self {
            handler,
            plugin,
            share,
            id,
        }
    }
}

/// One call with what `inbox` holds, then `last`: `on-messages`, or for a
/// message on its own `on-text`/`on-binary`. `None`: the instance is gone
/// (it failed before), the messages are dropped.
async fn call_with(
    slots: Woken<'_>,
    inbox: &Inbox,
    last: Option<Message<'_>>,
    backlog: usize,
    state: State,
) -> Option<Result<(), PluginError>> {
    let wait = slots.share.wait();
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    // A tenant with a CPU share (a server with several) runs its calls so
    // that they can leave the workers; a message too large to copy cheaply
    // stays (its tenant's share still throttles it).
    let movable = slots.share.is_limited()
        && slots.handler.is_own()
        && last.is_none_or(|m| m.len() <= MOVABLE_MAX);
    let mut instance = match slots.handler.acquire(slots.plugin, slots.id).await {
        Err(err) => return Some(Err(err)),
        Ok(None) => return None,
        Ok(Some(instance)) => instance,
    };
    Conn::sync_outbox(&mut instance, backlog, state);
    if movable {
        drop(instance);
        let penalized = slots.share.penalized();
        return Some(call_movable(slots.handler, inbox, last, penalized).await);
    }
    let r = match last {
        Some(one) if inbox.is_empty() => instance.on_message(one).await,
        _ => instance.on_messages(&inbox.messages(last)).await,
    };
    if r.is_err() {
        instance.fail();
    }
    Some(r)
}

/// Largest message copied for a call that may move off the workers.
const MOVABLE_MAX: usize = 64 * 1024;

/// A call that may leave the workers for a
/// [lane](crate::runtime::idle_pool) of its own: the connection's own
/// instance and a copy of the messages go with it, and come back when it
/// is done. A tenant over its share of late (`penalized`) starts on the
/// idle lane; any other call starts here and moves at the first tick where
/// it has run long (to the long lane) or its tenant is over (idle lane).
async fn call_movable(
    handler: &mut Handler,
    inbox: &Inbox,
    last: Option<Message<'_>>,
    penalized: bool,
) -> Result<(), PluginError> {
    let Some(mut instance) = handler.lend() else {
        return Ok(());
    };
    let mut owned = Inbox::default();
    for message in inbox.messages(last) {
        owned.push(message);
    }
    let moved = instance.movable();
    let call = async move {
        let messages = owned.messages(None);
        let r = match messages.as_slice() {
            [one] => instance.on_message(*one).await,
            all => instance.on_messages(all).await,
        };
        // A failed instance is dropped where it ran: freeing what a hostile
        // one grew (its memory slot's reset, a large attachment) is work
        // the workers should not do for it.
        (r.is_ok().then_some(instance), r)
    };
    let done = if penalized {
        idle_pool::run(idle_pool::Lane::Idle, call).await
    } else {
        idle_pool::run_movable(call, moved).await
    };
    match done {
        Ok((instance, r)) => {
            if let Some(instance) = instance {
                handler.restore(instance);
            }
            r
        }
        // It panicked: the instance went with it.
        Err(err) => Err(PluginError::Trap(anyhow::anyhow!(
            "call on the idle pool failed: {err}"
        ))),
    }
}

/// `true` when the tenant's version changed; `false` if the tenant is gone.
async fn next_swap(swaps: &mut Option<watch::Receiver<Current>>) -> bool {
    match swaps {
        Some(s) => s.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

async fn peer_woke(wake: Option<&Notify>) {
    match wake {
        Some(w) => w.notified().await,
        None => std::future::pending().await,
    }
}

async fn next_published(mailbox: &mut Option<Mailbox>) -> Option<wharf_protocol::Framed> {
    match mailbox {
        Some(m) => m.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads what the transport hands over without waiting, into the buffer's
/// spare room; `true` if that filled it. For TLS, which hands out one
/// record per read: a burst of messages should reach the plugin as one
/// batch, not one per record.
fn read_ready<R: AsyncRead + Unpin>(reader: &mut R, rbuf: &mut BytesMut) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    while rbuf.len() < rbuf.capacity() {
        let read = std::pin::pin!(reader.read_buf(&mut *rbuf));
        match read.poll(&mut cx) {
            Poll::Ready(Ok(n)) if n > 0 => {}
            // Not now; or EOF or an error, which the next read sees again.
            _ => return false,
        }
    }
    true
}

/// Writes queued output, and flushes, as far as the socket takes it without
/// waiting; what is left is written by the driver's select. `Err`: the
/// transport is gone.
fn write_now<W: AsyncWrite + Unpin>(
    writer: &mut W,
    ws: &mut WebSocket,
    needs_flush: &mut bool,
) -> Result<(), ()> {
    // Polled with a waker that does nothing: `Pending` only means "not
    // now", and the select polls the same write with the task's waker.
    let mut cx = Context::from_waker(Waker::noop());
    while ws.has_output() || *needs_flush {
        let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
        let filled = ws.output_slices(&mut slices);
        match poll_write_or_flush(Pin::new(&mut *writer), &mut cx, &slices[..filled]) {
            Poll::Ready(written) => wrote(ws, needs_flush, written)?,
            Poll::Pending => break,
        }
    }
    Ok(())
}
