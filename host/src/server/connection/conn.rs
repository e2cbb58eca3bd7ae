//! An open connection and what each of its events does: a message read
//! (to the plugin, under the tenant's rates), the plugin's sends (to the
//! protocol), a publish, a swap, hibernation, the close.

use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::net::TcpStream;

use wharf_protocol::{CloseCode, CloseInfo, Event, FrameBatch, Masked, State, WebSocket};

use super::Shared;
use super::calls::{Called, Delivery, Woken, call_with};
use super::transport::DirectTcp;
use crate::metrics::Tally;
use crate::runtime::batch_handler::Message;
use crate::runtime::connection_host::DirectWrite;
use crate::runtime::lifecycle::Calls;
use crate::runtime::pubsub_host::Mailbox;
use crate::runtime::{Plugin, PluginError, PluginInstance, Salvage};
use crate::server::budget::Held;
use crate::server::handler::Handler;
use crate::server::inbox::{self, Inbox};
use crate::server::trim;
use crate::tenancy::Tenant;
use crate::tenancy::rate::Bucket;
use crate::tenancy::swap::{Policy, Serving, Swaps};

/// 1011 reason sent when a plugin dies: says what happened, not why (the why
/// is in the host's log, not for the peer).
const PLUGIN_FAILED: &str = "handler failed";

/// A message as the protocol delivered it: a binary one of one frame
/// comes still masked, and is unmasked where it goes (the plugin's memory,
/// or in place when it is held).
enum Incoming<'a> {
    Plain(Message<'a>),
    Masked(Masked<'a>),
}

impl Incoming<'_> {
    fn len(&self) -> usize {
        match self {
            Incoming::Plain(message) => message.len(),
            Incoming::Masked(masked) => masked.len(),
        }
    }
}

/// An open connection: protocol state and, while it is alive, its plugin instance.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) tenant: Arc<Tenant>,
    pub(super) plugin: Arc<Plugin>,
    pub(super) ws: WebSocket,
    /// The tenant's per-connection message and byte rates.
    pub(super) rate: Bucket,
    /// Closed with 1008 for going over them: later messages are dropped.
    pub(super) rate_limited: bool,
    /// Its instance, or its place in the tenant's shared one.
    pub(super) handler: Handler,
    /// The version of the tenant's plugin it is served by.
    pub(super) serving: Serving,
    /// The tenant's swaps; `None` once the tenant is gone.
    pub(super) swaps: Option<Swaps>,
    /// When to close with 1012 for a swap with the `restart` policy.
    pub(super) restart_at: Option<Instant>,
    /// When the plugin last handled an event (for hibernation).
    pub(super) last_event: Instant,
    pub(super) shared: Arc<Shared>,
    /// How the connection ended, once it has.
    pub(super) closed: Option<CloseInfo>,
    /// Published messages for this connection (pub/sub), delivered by the
    /// host without waking the plugin; there once the plugin subscribed.
    pub(super) mailbox: Option<Mailbox>,
    /// Counts not yet added to the shared metrics: they go there when the
    /// connection next waits (and when it ends), not per message. Boxed on
    /// first use and freed when it hibernates: inline, its 176 bytes would
    /// be part of every idle connection.
    tally: Option<Box<Tally>>,
    /// Messages waiting for one `on-messages` call (batched plugins only).
    pub(super) inbox: Inbox,
    /// The protocol state when the inbox's first message was read.
    pub(super) inbox_state: State,
    /// Its part of the server's budget of bytes held for peers.
    pub(super) held: Held,
    /// Its socket, for plugins' large sends, when it is plain TCP.
    direct: Option<Arc<dyn DirectWrite>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // What the connection took on for its peer and never passed on is
        // counted, however its task ended: published messages still in its
        // mailbox (not read once the connection stops being open), and
        // frames queued but not written.
        let waiting = self.mailbox.take().map_or(0, Mailbox::close);
        if waiting > 0 {
            self.shared.metrics.sends_refused("closed", waiting as u64);
        }
        let unwritten = self.ws.output_len();
        if unwritten > 0 {
            tracing::debug!(
                conn = self.id,
                unwritten,
                "connection ended with output unwritten"
            );
            self.shared
                .metrics
                .unwritten(&self.tenant.name, unwritten as u64);
        }
        self.publish_counts();
        self.tenant.counters.connection(-1);
    }
}

impl Conn {
    pub(super) fn new(
        id: u64,
        tenant: Arc<Tenant>,
        plugin: Arc<Plugin>,
        handler: Handler,
        serving: Serving,
        swaps: Swaps,
        shared: Arc<Shared>,
    ) -> Self {
        let now = Instant::now();
        let held = shared.budget.held();
        // Given back in `drop`.
        tenant.counters.connection(1);
        Self {
            id,
            held,
            ws: WebSocket::new(tenant.ws.clone(), now),
            rate: Bucket::new(tenant.rate, now),
            rate_limited: false,
            tenant,
            plugin,
            handler,
            serving,
            swaps: Some(swaps),
            restart_at: None,
            last_event: now,
            shared,
            closed: None,
            mailbox: None,
            tally: None,
            inbox: Inbox::default(),
            inbox_state: State::Open,
            direct: None,
        }
    }

    /// Lets the plugin's large sends be written to `socket` during its
    /// calls (see [`DirectWrite`]).
    pub(super) fn write_through(&mut self, socket: Option<Weak<TcpStream>>) {
        self.direct = socket.map(|stream| {
            Arc::new(DirectTcp {
                stream,
                tenant: self.tenant.clone(),
            }) as Arc<dyn DirectWrite>
        });
    }

    /// The socket for a call's large sends, when the connection was open
    /// with nothing queued (`backlog`, `state`: as the call's messages were
    /// read; a Pong the read queued since goes behind, see
    /// `WebSocket::send_batch`). The counts so far go out first, as they do
    /// before the driver writes. Fields, not `self`: a message being
    /// delivered still borrows the protocol.
    fn direct_for_call<'a>(
        direct: &'a Option<Arc<dyn DirectWrite>>,
        tally: &mut Option<Box<Tally>>,
        shared: &Shared,
        tenant: &Tenant,
        backlog: usize,
        state: State,
    ) -> Option<&'a Arc<dyn DirectWrite>> {
        let direct = direct
            .as_ref()
            .filter(|_| backlog == 0 && state == State::Open)?;
        if let Some(tally) = tally {
            shared.metrics.absorb(tally, &tenant.counters);
        }
        Some(direct)
    }

    /// Brings the plugin's view of the connection up to date before a call.
    pub(super) fn sync_outbox(
        instance: &mut PluginInstance,
        backlog: usize,
        state: State,
        direct: Option<&Arc<dyn DirectWrite>>,
    ) {
        instance
            .connection()
            .outbox
            .sync(backlog, state != State::Open, direct);
    }

    /// The counts go to the shared metrics.
    pub(super) fn publish_counts(&mut self) {
        if let Some(tally) = &mut self.tally {
            self.shared.metrics.absorb(tally, &self.tenant.counters);
        }
    }

    /// Records a call's duration; its end is the connection's last event.
    fn record_call(&mut self, started: Instant) -> Instant {
        let now = Instant::now();
        self.tally
            .get_or_insert_default()
            .plugin_call(now - started);
        self.last_event = now;
        now
    }

    pub(super) async fn on_open(&mut self) {
        if !self.plugin.wants(Calls::OPEN) {
            return;
        }
        let (backlog, state) = (self.ws.output_len(), self.ws.state());
        let started = Instant::now();
        let (r, salvage) = match self.handler.acquire(&self.plugin, self.id).await {
            Ok(Some(mut instance)) => {
                Self::sync_outbox(&mut instance, backlog, state, None);
                let r = instance.on_open().await;
                let salvage = match r {
                    Ok(()) => Salvage::default(),
                    Err(_) => instance.fail(),
                };
                (r, salvage)
            }
            Ok(None) => return,
            Err(err) => (Err(err), Salvage::default()),
        };
        self.record_call(started);
        self.salvaged(salvage);
        self.after_call(r).await;
    }

    /// What a failed instance left: the connection's frames go to the
    /// protocol ahead of the 1011 [`after_call`](Self::after_call) queues;
    /// other connections' messages, and those of the batch it never got,
    /// are counted as lost.
    pub(super) fn salvaged(&mut self, mut salvage: Salvage) {
        if salvage.undelivered > 0 {
            self.instance_gone(salvage.undelivered);
        }
        if salvage.lost > 0 {
            tracing::warn!(
                conn = self.id,
                dropped = salvage.lost,
                "sends to other connections of a failed shared instance dropped"
            );
            self.shared
                .metrics
                .sends_refused("instance-failed", salvage.lost);
        }
        if !salvage.frames.is_empty() {
            Self::hand_over(
                &mut self.ws,
                &mut self.tally,
                &self.shared,
                self.id,
                &mut salvage.frames,
            );
        }
    }

    /// Hands the plugin's sends to the protocol, or buries a failed instance.
    pub(super) async fn after_call(&mut self, result: Result<(), PluginError>) {
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
    pub(super) async fn peer_woke(&mut self) {
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
        entry.outbox.disarm();
        if self.mailbox.is_none() {
            self.mailbox = entry.subscriptions.take_mailbox();
        }
        let outbox = &mut entry.outbox;
        if outbox.is_empty() {
            return;
        }
        if !outbox.frames.is_empty() {
            Self::hand_over(
                &mut self.ws,
                &mut self.tally,
                &self.shared,
                self.id,
                &mut outbox.frames,
            );
        }
        if let Some((code, reason)) = outbox.close.take()
            && let Err(err) = self.ws.close(code, &reason)
        {
            tracing::warn!(conn = self.id, %err, "plugin close dropped");
            self.shared.metrics.sends_refused(send_error_label(&err), 1);
        }
    }

    /// Hands frames a call queued to the protocol, counted as sent. Framed
    /// during the call straight from the plugin's memory; the protocol
    /// takes the whole batch (exchanging buffers when its queue is empty).
    /// Replies to messages read before a Close came in go ahead of the
    /// answer to it: the outbox admitted them by the state the messages
    /// were read in. Fields, not `self`: the outbox is in the instance the
    /// handler lends.
    fn hand_over(
        ws: &mut WebSocket,
        tally: &mut Option<Box<Tally>>,
        shared: &Shared,
        id: u64,
        frames: &mut FrameBatch,
    ) {
        let (text, binary) = frames.take_tally();
        match ws.send_batch_before_close(frames) {
            Ok(()) => {
                let tally = tally.get_or_insert_default();
                tally.messages_sent(false, text.messages, text.bytes);
                tally.messages_sent(true, binary.messages, binary.bytes);
            }
            Err(err) => {
                // The outbox applies the protocol's own rules, so this is
                // a race with a close; still, nothing is dropped unseen.
                let dropped = text.messages + binary.messages;
                tracing::warn!(conn = id, %err, dropped, "plugin sends dropped");
                shared
                    .metrics
                    .sends_refused(send_error_label(&err), dropped);
            }
        }
    }

    /// When the idle instance is to be released, if hibernation is on.
    pub(super) fn hibernate_at(&self) -> Option<Instant> {
        let after = self.shared.hibernate_after?;
        (self.handler.can_hibernate() && self.ws.state() == State::Open)
            .then(|| self.last_event + after)
    }

    /// The connection went idle: its counts go out, and the boxes that
    /// hold them and its batch of messages are freed, with its message and
    /// output buffers and its mailbox's room if they hold nothing (idle
    /// connections are most of an idle server's memory; the next event
    /// allocates them again). Returns the buffers' bytes freed.
    pub(super) fn settle(&mut self) -> usize {
        self.publish_counts();
        self.tally = None;
        if self.inbox.is_empty() {
            self.inbox.release();
        }
        if let Some(mailbox) = &mut self.mailbox {
            mailbox.release_idle();
        }
        self.ws.release_idle()
    }

    /// Frees the instance's send buffer for this connection if it holds
    /// nothing, as [`settle`](Self::settle) does the connection's own (a
    /// shared instance is locked for it); returns the bytes freed.
    pub(super) async fn release_send_buffer(&mut self) -> usize {
        match self.handler.current().await {
            Some(mut instance) => instance.connection().outbox.frames.release_idle(),
            None => 0,
        }
    }

    /// Releases the instance, keeping what the next one resumes from.
    pub(super) fn hibernate(&mut self) {
        if self.handler.can_hibernate() {
            self.handler.hibernate();
            let freed = self.settle();
            self.shared.released.add(trim::HIBERNATED + freed);
            tracing::debug!(conn = self.id, "hibernated");
        }
    }

    /// The tenant's plugin changed version: move by the swap's policy.
    pub(super) async fn on_swap(&mut self) {
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
    pub(super) fn deliver_published(&mut self, message: &wharf_protocol::Framed) {
        match self.ws.send_framed(message) {
            Ok(()) => self.tally.get_or_insert_default().messages_sent(
                message.is_binary(),
                1,
                message.payload_len() as u64,
            ),
            Err(err) => {
                tracing::debug!(conn = self.id, %err, "published message dropped");
                self.shared.metrics.send_refused(send_error_label(&err));
            }
        }
    }

    /// The connection ended: tell the plugin (its last call) and release it.
    pub(super) async fn finish(&mut self, info: CloseInfo) {
        if self.closed.is_some() {
            return;
        }
        // Boxed: it runs once, and every step that can end the connection
        // awaits it, so inline its plugin call's state would be carried by
        // every connection for its whole life (hibernated ones too).
        Box::pin(self.close_call(info)).await
    }

    /// `on-close`, and the instance released.
    async fn close_call(&mut self, info: CloseInfo) {
        tracing::debug!(conn = self.id, code = info.code, clean = info.clean, reason = %info.reason, "closed");
        self.shared.metrics.connection_closed(info.code, info.clean);
        let closed = self.closed.insert(info);
        let started = Instant::now();
        // Declined (`lifecycle`): nothing to tell, so a hibernated
        // connection is not woken for it.
        let acquired = match self.plugin.wants(Calls::CLOSE) {
            true => self.handler.acquire(&self.plugin, self.id).await,
            false => Ok(None),
        };
        let r = match acquired {
            Ok(Some(mut instance)) => {
                Self::sync_outbox(&mut instance, 0, State::Closed, None);
                let r = instance
                    .on_close(closed.code, &closed.reason, closed.clean)
                    .await;
                if r.is_err() {
                    // Sends are refused once closed: only a shared
                    // instance's other connections can have lost any.
                    let salvage = instance.fail();
                    self.salvaged(salvage);
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
        let dropped = self.handler.release().await;
        if dropped > 0 {
            tracing::debug!(
                conn = self.id,
                dropped,
                "sends queued for a closed connection dropped"
            );
            self.shared.metrics.sends_refused("closed", dropped);
        }
    }

    /// Feeds buffered input to the protocol and its events to the plugin:
    /// one call per message, or, for a plugin that takes batches, one call
    /// for the messages of a read (see [`Inbox`]).
    pub(super) async fn process_input(&mut self, input: &[u8]) {
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
                    self.tally
                        .get_or_insert_default()
                        .message_received(false, text.len());
                    Incoming::Plain(Message::Text(text))
                }
                Event::Binary(data) => {
                    self.tally
                        .get_or_insert_default()
                        .message_received(true, data.len());
                    Incoming::Plain(Message::Binary(data))
                }
                Event::MaskedBinary(data) => {
                    self.tally
                        .get_or_insert_default()
                        .message_received(true, data.len());
                    Incoming::Masked(data)
                }
                Event::Closed(info) => {
                    if !info.clean
                        && matches!(
                            info.code,
                            CloseCode::PROTOCOL_ERROR
                                | CloseCode::INVALID_PAYLOAD
                                | CloseCode::MESSAGE_TOO_BIG
                        )
                    {
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
            // Small messages with more input behind them are held where the
            // protocol read them (batched plugins); the last one, or a large
            // one, joins them and the batch goes, uncopied. A message on its
            // own is a plain call.
            let hold = batched && !input.is_empty() && message.len() <= inbox::MESSAGE_MAX;
            if !hold && self.inbox.is_empty() {
                let delivery = match message {
                    Incoming::Plain(message) => Delivery::One(message),
                    Incoming::Masked(masked) => Delivery::Masked(masked),
                };
                let direct = Self::direct_for_call(
                    &self.direct,
                    &mut self.tally,
                    &self.shared,
                    &self.tenant,
                    backlog,
                    state,
                );
                let r = call_with(
                    Woken::of(&mut self.handler, &self.plugin, &self.tenant.cpu, self.id),
                    delivery,
                    backlog,
                    state,
                    direct,
                )
                .await;
                now = self.called(r, 1, now).await;
                continue;
            }
            if self.inbox.is_empty() {
                self.inbox_state = state;
            }
            let message = match message {
                Incoming::Plain(message) => message,
                // Held where the protocol read it, so unmasked there.
                Incoming::Masked(masked) => Message::Binary(masked.unmask()),
            };
            if let Err(err) = self.inbox.push(message) {
                // Past what a plugin's 32-bit memory could take in any call.
                tracing::warn!(conn = self.id, "message dropped: {err}");
                self.shared.metrics.received_dropped("too-large", 1);
                continue;
            }
            self.ws.hold_message();
            if hold && !self.inbox.is_full() {
                continue;
            }
            now = self.deliver_inbox(now).await;
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
        let direct = Self::direct_for_call(
            &self.direct,
            &mut self.tally,
            &self.shared,
            &self.tenant,
            backlog,
            self.inbox_state,
        );
        let r = call_with(
            Woken::of(&mut self.handler, &self.plugin, &self.tenant.cpu, self.id),
            Delivery::Batch(self.inbox.batch(self.ws.held())),
            backlog,
            self.inbox_state,
            direct,
        )
        .await;
        self.inbox.clear();
        self.ws.release_held();
        self.called(r, count, now).await
    }

    /// After a call that delivered `count` messages (started at `now`):
    /// its time recorded and its result acted on (the messages a failed
    /// batch left undelivered counted as lost), or the messages counted as
    /// lost with the instance. Returns the clock at its end.
    async fn called(&mut self, r: Option<Called>, count: usize, now: Instant) -> Instant {
        match r {
            Some(called) => {
                let end = self.record_call(now);
                self.salvaged(called.salvage);
                self.after_call(called.result).await;
                end
            }
            None => {
                self.instance_gone(count);
                now
            }
        }
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
