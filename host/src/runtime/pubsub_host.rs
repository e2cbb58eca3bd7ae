//! The host side of `wharf:websocket/pubsub`: topics, and the fan-out the
//! host does for them.
//!
//! A published message is framed once ([`Framed`]) and a reference to it is
//! put in each subscriber's mailbox; the subscriber's connection task queues
//! it for its socket. No receiving plugin instance runs, and the payload is
//! framed once whatever the audience, and not at all when there is none.
//!
//! What bounds it:
//! - A connection's mailbox holds at most its byte budget of payload (the
//!   connection's `send_queue`, [`DEFAULT_MAILBOX_BYTES`] unless set with
//!   [`Subscriptions::with_mailbox_budget`]) and [`MAILBOX_CAPACITY`]
//!   messages; an empty mailbox takes any one message. A subscriber whose
//!   task does not drain it (busy in a long plugin call) misses what does
//!   not fit, so it pins at most the larger of its budget and one message.
//! - A connection's handler may publish [`PUBLISHES_PER_SECOND`] times a
//!   second (a one-second burst); over it `publish-*` fails with
//!   `queue-full`.
//! - Every missed delivery and every refused publish is counted
//!   (`wharf_sends_refused_total{reason="mailbox-full"|"publish-rate"}`, see
//!   [`Broker::set_counters`]) and logged at most once a second per topic
//!   (missed deliveries) or per connection (refused publishes), with the
//!   count since the previous line.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc::error::TryRecvError;
use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, WasmList, WasmStr};
use wharf_protocol::Framed;

use super::HostState;
use super::bindings::ErrorCode;
use super::connection_host::ConnectionEntry;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Topics one connection may be subscribed to at once.
pub const MAX_TOPICS_PER_CONNECTION: usize = 64;
/// Published messages waiting for one connection's task, whatever their
/// size (the byte budget bounds the big ones); beyond it the subscriber
/// misses messages (counted and logged).
pub const MAILBOX_CAPACITY: usize = 1024;
/// Payload bytes waiting for one connection's task, unless its budget is set
/// with [`Subscriptions::with_mailbox_budget`]: the default `[websocket]
/// send_queue` (4 MiB). Beyond it the subscriber misses messages (counted
/// and logged); an empty mailbox still takes one message of any size, as an
/// empty send queue does.
pub const DEFAULT_MAILBOX_BYTES: usize = 4 << 20;
/// Publishes (`publish-text` and `publish-binary` together) one
/// connection's handler may make per second, with a burst of as many (one
/// second's worth): a handler may publish 1000 messages at once, then 1000
/// more each second. Over it a publish fails with `queue-full` before its
/// payload is framed; the refusal is counted
/// (`wharf_sends_refused_total{reason="publish-rate"}`) and logged at most
/// once a second per connection. A publish to a topic nobody else is
/// subscribed to counts too (lifting its payload out of the instance is the
/// cost being bounded).
pub const PUBLISHES_PER_SECOND: u32 = 1000;
/// Publishes a connection may make at once: one second's worth.
pub const PUBLISH_BURST: u32 = PUBLISHES_PER_SECOND;
/// The `reason` label of a delivery missed because a mailbox was full.
pub const MAILBOX_FULL: &str = "mailbox-full";
/// The `reason` label of a publish refused over [`PUBLISHES_PER_SECOND`].
pub const PUBLISH_RATE: &str = "publish-rate";

/// Time between two publishes at the steady rate.
const PUBLISH_INTERVAL: Duration =
    Duration::from_nanos(1_000_000_000 / PUBLISHES_PER_SECOND as u64);
/// How far ahead of now a connection's publishes may run: the burst.
const PUBLISH_WINDOW: Duration =
    Duration::from_nanos(1_000_000_000 / PUBLISHES_PER_SECOND as u64 * PUBLISH_BURST as u64);
/// Shortest time between two log lines about one topic's missed deliveries
/// or one connection's refused publishes.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What a message costs in a mailbox's byte budget.
fn cost(message: &Framed) -> usize {
    message.payload_len()
}

/// A mailbox's queue and the ends' state, behind one lock (short sections:
/// a push or a pop). Not a `tokio` channel: one of those allocates its
/// shared state and a block of 32 slots with the first subscription, held
/// by every subscribed connection however idle (1.9 KiB per hibernated
/// chat connection, measured); this holds its queue's room only while
/// messages wait (see [`Mailbox::release_idle`]).
#[derive(Debug, Default)]
struct Slots {
    queue: VecDeque<Framed>,
    /// Payload bytes waiting.
    bytes: usize,
    /// The connection's task, waiting for a message.
    waker: Option<Waker>,
    /// [`Outlet`]s alive: none, and nothing more can arrive.
    senders: usize,
    /// The [`Mailbox`] was dropped: offers fail with [`Offered::Gone`].
    closed: bool,
}

type Shared = Arc<Mutex<Slots>>;

fn lock(slots: &Shared) -> MutexGuard<'_, Slots> {
    // A panic while holding it cannot leave the queue inconsistent (each
    // section is one push or pop and its counts).
    slots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where published messages wait for a connection's task.
#[derive(Debug)]
pub struct Mailbox {
    slots: Shared,
}

impl Mailbox {
    /// Ready with the next message; `None` once no topic can send to it
    /// any more and nothing is waiting.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Framed>> {
        let mut slots = lock(&self.slots);
        if let Some(message) = slots.pop() {
            return Poll::Ready(Some(message));
        }
        if slots.senders == 0 {
            return Poll::Ready(None);
        }
        if !slots
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            slots.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Result<Framed, TryRecvError> {
        let mut slots = lock(&self.slots);
        match slots.pop() {
            Some(message) => Ok(message),
            None if slots.senders == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Closes the mailbox (its topics' offers fail from now on); returns
    /// how many messages were still waiting, which its connection never
    /// sends.
    pub fn close(self) -> usize {
        let waiting = lock(&self.slots).queue.len();
        drop(self);
        waiting
    }

    /// Payload bytes waiting.
    #[cfg(test)]
    fn queued(&self) -> usize {
        lock(&self.slots).bytes
    }

    /// The connection is idle: an empty queue's room is freed.
    pub fn release_idle(&mut self) {
        let mut slots = lock(&self.slots);
        if slots.queue.is_empty() {
            slots.queue = VecDeque::new();
        }
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        slots.closed = true;
        slots.queue = VecDeque::new();
        slots.bytes = 0;
    }
}

impl Slots {
    fn pop(&mut self) -> Option<Framed> {
        let message = self.queue.pop_front()?;
        self.bytes -= cost(&message);
        Some(message)
    }
}

/// The sending end of a connection's mailbox (cloned for each of its topics).
#[derive(Debug)]
struct Outlet {
    slots: Shared,
    budget: usize,
}

/// A new mailbox of `budget` payload bytes, and its first sending end.
fn mailbox(budget: usize) -> (Outlet, Mailbox) {
    let slots = Arc::new(Mutex::new(Slots {
        senders: 1,
        ..Slots::default()
    }));
    let mailbox = Mailbox {
        slots: slots.clone(),
    };
    (Outlet { slots, budget }, mailbox)
}

impl Clone for Outlet {
    fn clone(&self) -> Self {
        lock(&self.slots).senders += 1;
        Self {
            slots: self.slots.clone(),
            budget: self.budget,
        }
    }
}

impl Drop for Outlet {
    fn drop(&mut self) {
        let mut slots = lock(&self.slots);
        slots.senders -= 1;
        let waker = (slots.senders == 0).then(|| slots.waker.take()).flatten();
        drop(slots);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// What became of a message offered to a mailbox.
enum Offered {
    Queued,
    /// Over the byte budget or the message count: missed.
    Missed,
    /// The connection's task is gone.
    Gone,
}

impl Outlet {
    fn offer(&self, message: &Framed) -> Offered {
        let cost = cost(message);
        let mut slots = lock(&self.slots);
        if slots.closed {
            return Offered::Gone;
        }
        // An empty mailbox takes any one message, as an empty send queue does.
        if (slots.bytes > 0 && slots.bytes.saturating_add(cost) > self.budget)
            || slots.queue.len() >= MAILBOX_CAPACITY
        {
            return Offered::Missed;
        }
        slots.queue.push_back(message.clone());
        slots.bytes += cost;
        let waker = slots.waker.take();
        drop(slots);
        if let Some(waker) = waker {
            waker.wake();
        }
        Offered::Queued
    }
}

/// A topic, scoped to the plugin (tenant) that named it.
type TopicKey = (Arc<str>, String);

/// One topic's subscribers, and what is left to log about it.
#[derive(Default)]
struct Topic {
    subscribers: crate::IdMap<Outlet>,
    /// Deliveries missed since the last log line about them.
    unlogged: u64,
    /// When that line was written.
    logged_at: Option<Instant>,
}

impl Topic {
    /// Adds `missed` deliveries; the count to log now, if a line is due
    /// (the first, then at most one per [`LOG_INTERVAL`]).
    fn note_missed(&mut self, missed: u32, now: Instant) -> Option<u64> {
        self.unlogged += u64::from(missed);
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_INTERVAL);
        due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        })
    }
}

fn log_missed(key: &TopicKey, missed: u64) {
    if missed > 0 {
        tracing::warn!(tenant = %key.0, topic = %key.1, missed,
            "published messages missed by subscribers whose mailbox was full (since the last such line)");
    }
}

/// Where missed deliveries and refused publishes are counted.
#[derive(Debug)]
struct Refusals {
    mailbox_full: Counter,
    publish_rate: Counter,
}

/// Every topic's subscribers, server-wide.
#[derive(Default)]
pub struct Broker {
    topics: Mutex<HashMap<TopicKey, Topic>>,
    refusals: OnceLock<Refusals>,
}

/// What a publish reached.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// Subscribers it was queued for.
    pub queued: u32,
    /// Subscribers whose mailbox was full.
    pub missed: u32,
}

impl Broker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts missed deliveries ([`MAILBOX_FULL`]) and refused publishes
    /// ([`PUBLISH_RATE`]) in `counter(reason)` (main.rs passes
    /// `wharf_sends_refused_total`'s series). The first call sets them;
    /// later ones are ignored. Until then they are only logged.
    pub fn set_counters(&self, counter: impl Fn(&'static str) -> Counter) {
        let _ = self.refusals.set(Refusals {
            mailbox_full: counter(MAILBOX_FULL),
            publish_rate: counter(PUBLISH_RATE),
        });
    }

    fn count(&self, which: fn(&Refusals) -> &Counter, n: u64) {
        if n > 0
            && let Some(refusals) = self.refusals.get()
        {
            which(refusals).inc_by(n);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicKey, Topic>> {
        // A panic while holding the lock leaves a consistent map (every
        // mutation is one insert or remove), so poisoning is ignored.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self, key: TopicKey, conn: u64, mailbox: Outlet) {
        self.lock()
            .entry(key)
            .or_default()
            .subscribers
            .insert(conn, mailbox);
    }

    fn unsubscribe(&self, key: &TopicKey, conn: u64) {
        let mut topics = self.lock();
        let Some(topic) = topics.get_mut(key) else {
            return;
        };
        topic.subscribers.remove(&conn);
        if topic.subscribers.is_empty() {
            let unlogged = topic.unlogged;
            topics.remove(key);
            drop(topics);
            log_missed(key, unlogged);
        }
    }

    /// Queues `message` for every subscriber of `key` but `exclude`.
    pub fn publish(&self, key: &TopicKey, message: &Framed, exclude: Option<u64>) -> Reach {
        self.publish_with(key, exclude, || message.clone())
    }

    /// Queues the message `frame` makes for every subscriber of `key` but
    /// `exclude`; `frame` is not called (nothing is copied) when there is
    /// none. It runs outside the lock, which a big copy would otherwise
    /// hold for every topic of every tenant.
    pub fn publish_with(
        &self,
        key: &TopicKey,
        exclude: Option<u64>,
        frame: impl FnOnce() -> Framed,
    ) -> Reach {
        if !self.has_audience(key, exclude) {
            return Reach::default();
        }
        let message = frame();
        self.deliver(key, &message, exclude)
    }

    /// Whether `key` has a subscriber besides `exclude`.
    pub fn has_audience(&self, key: &TopicKey, exclude: Option<u64>) -> bool {
        self.lock()
            .get(key)
            .is_some_and(|topic| topic.subscribers.keys().any(|&c| Some(c) != exclude))
    }

    fn deliver(&self, key: &TopicKey, message: &Framed, exclude: Option<u64>) -> Reach {
        let mut reach = Reach::default();
        let to_log = {
            let mut topics = self.lock();
            let Some(topic) = topics.get_mut(key) else {
                return reach;
            };
            topic.subscribers.retain(|&conn, mailbox| {
                if Some(conn) == exclude {
                    return true;
                }
                match mailbox.offer(message) {
                    Offered::Queued => reach.queued += 1,
                    Offered::Missed => reach.missed += 1,
                    // Its entry is being dropped, which would remove it too.
                    Offered::Gone => return false,
                }
                true
            });
            let mut to_log = None;
            if reach.missed > 0 {
                to_log = topic.note_missed(reach.missed, Instant::now());
            }
            if topic.subscribers.is_empty() {
                to_log = Some(topic.unlogged);
                topics.remove(key);
            }
            to_log
        };
        self.count(|r| &r.mailbox_full, u64::from(reach.missed));
        if let Some(missed) = to_log {
            log_missed(key, missed);
        }
        reach
    }

    /// Subscribers of a topic (for tests and metrics).
    pub fn subscribers(&self, scope: &str, topic: &str) -> usize {
        self.lock()
            .get(&(Arc::from(scope), topic.to_owned()))
            .map_or(0, |topic| topic.subscribers.len())
    }
}

/// A connection's publishes against [`PUBLISHES_PER_SECOND`] (a GCRA: the
/// time its publishes have been paid up to may run at most the burst's
/// worth ahead of now).
#[derive(Debug)]
struct PublishRate {
    paid_until: Instant,
    /// Refusals since the last log line about them, and when that was.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl PublishRate {
    fn new(now: Instant) -> Self {
        Self {
            paid_until: now,
            unlogged: 0,
            logged_at: None,
        }
    }

    /// Takes one publish; `false` if over the rate.
    fn take(&mut self, now: Instant) -> bool {
        let next = self.paid_until.max(now) + PUBLISH_INTERVAL;
        if next.duration_since(now) > PUBLISH_WINDOW {
            return false;
        }
        self.paid_until = next;
        true
    }

    /// Adds a refusal; the count to log now, if a line is due.
    fn note_refused(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_INTERVAL);
        due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        })
    }
}

/// One connection's subscriptions; leaving every topic when dropped (with
/// its store), so a closed connection never lingers in the broker.
pub struct Subscriptions {
    broker: Arc<Broker>,
    scope: Arc<str>,
    conn: u64,
    /// Payload bytes its mailbox may hold.
    budget: usize,
    /// Made on the first subscription or publish: most connections do
    /// neither, and then carry no room for them (120 bytes of every
    /// connection, hibernated ones too).
    active: Option<Box<Active>>,
}

/// What a connection that subscribed or published has.
struct Active {
    /// Made on the first subscription: a connection that only publishes
    /// has no mailbox to allocate or to poll.
    mailbox: Option<Outlet>,
    /// The receiving end, until the connection's task takes it.
    unclaimed: Option<Mailbox>,
    topics: HashSet<String>,
    /// Its handler's publishes (here, so hibernation does not reset them).
    rate: PublishRate,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("conn", &self.conn)
            .field("topics", &self.active.as_ref().map(|a| &a.topics))
            .finish()
    }
}

impl Subscriptions {
    /// A connection's subscriptions (none yet), its mailbox's byte budget
    /// [`DEFAULT_MAILBOX_BYTES`].
    pub fn new(broker: Arc<Broker>, scope: Arc<str>, conn: u64) -> Self {
        Self {
            broker,
            scope,
            conn,
            budget: DEFAULT_MAILBOX_BYTES,
            active: None,
        }
    }

    /// What it has once it subscribed or published; `now`: the time of
    /// that first act, from which its publish rate counts.
    fn active(&mut self, now: Instant) -> &mut Active {
        self.active.get_or_insert_with(|| {
            Box::new(Active {
                mailbox: None,
                unclaimed: None,
                topics: HashSet::new(),
                rate: PublishRate::new(now),
            })
        })
    }

    /// Sets its mailbox's byte budget (the connection's `send_queue`); for
    /// a new value, before the first subscription makes the mailbox.
    pub fn with_mailbox_budget(mut self, bytes: usize) -> Self {
        self.budget = bytes;
        self
    }

    /// The mailbox the connection's task reads, once there is one (after
    /// the first subscription); handed out once.
    pub fn take_mailbox(&mut self) -> Option<Mailbox> {
        self.active.as_mut()?.unclaimed.take()
    }

    fn key(&self, topic: &str) -> TopicKey {
        (self.scope.clone(), topic.to_owned())
    }

    fn subscribe(&mut self, topic: String) -> Result<(), ErrorCode> {
        check_topic(&topic)?;
        let key = self.key(&topic);
        let budget = self.budget;
        let active = self.active(Instant::now());
        if active.topics.contains(&topic) {
            return Ok(());
        }
        if active.topics.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(ErrorCode::QueueFull);
        }
        let mailbox = active.mailbox.get_or_insert_with(|| {
            let (outlet, mailbox) = mailbox(budget);
            active.unclaimed = Some(mailbox);
            outlet
        });
        let mailbox = mailbox.clone();
        active.topics.insert(topic);
        self.broker.subscribe(key, self.conn, mailbox);
        Ok(())
    }

    fn unsubscribe(&mut self, topic: &str) {
        if self.active.as_mut().is_some_and(|a| a.topics.remove(topic)) {
            self.broker.unsubscribe(&self.key(topic), self.conn);
        }
    }

    /// Takes one publish of the connection's handler; `false` (counted, and
    /// logged at most once a second) when over [`PUBLISHES_PER_SECOND`].
    fn admit_publish(&mut self, now: Instant) -> bool {
        let rate = &mut self.active(now).rate;
        if rate.take(now) {
            return true;
        }
        let refused = rate.note_refused(now);
        self.broker.count(|r| &r.publish_rate, 1);
        if let Some(refused) = refused {
            tracing::warn!(tenant = %self.scope, conn = self.conn, refused,
                limit = PUBLISHES_PER_SECOND,
                "publishes over the per-connection rate refused with queue-full (since the last such line)");
        }
        false
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        for topic in active.topics {
            self.broker.unsubscribe(&self.key(&topic), self.conn);
        }
    }
}

fn check_topic(topic: &str) -> Result<(), ErrorCode> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        Err(ErrorCode::MessageTooBig)
    } else {
        Ok(())
    }
}

impl HostState {
    /// The connection a publish is charged to ([`PUBLISHES_PER_SECOND`]):
    /// the one the current call is for (in a shared instance too).
    fn publisher(&mut self) -> Option<&mut ConnectionEntry> {
        let rep = self.conns.get(self.current)?;
        self.table
            .get_mut(&Resource::<ConnectionEntry>::new_borrow(rep))
            .ok()
    }

    /// The cheap refusals of a publish of `len` payload bytes to `topic`
    /// (size, rate), before its payload is read: where it goes, or `None`
    /// when the topic has no subscriber besides `exclude` (nothing to do).
    fn admit_publish(
        &mut self,
        topic: String,
        len: usize,
        exclude: Option<Resource<ConnectionEntry>>,
    ) -> wasmtime::Result<Result<Option<Publish>, ErrorCode>> {
        let exclude = match exclude {
            Some(conn) => Some(self.table.get(&conn)?.id()),
            None => None,
        };
        if len > self.max_message_size {
            return Ok(Err(ErrorCode::MessageTooBig));
        }
        // The current call's connection always has an entry; should it
        // not, the publish is refused rather than left without a bound.
        let admitted = self
            .publisher()
            .is_some_and(|entry| entry.subscriptions.admit_publish(Instant::now()));
        if !admitted {
            return Ok(Err(ErrorCode::QueueFull));
        }
        let key = (self.tenant.clone(), topic);
        if !self.broker.has_audience(&key, exclude) {
            return Ok(Ok(None));
        }
        Ok(Ok(Some(Publish {
            broker: self.broker.clone(),
            key,
            exclude,
        })))
    }
}

/// An admitted publish with an audience, waiting for its frame.
struct Publish {
    broker: Arc<Broker>,
    key: TopicKey,
    exclude: Option<u64>,
}

const INTERFACE: &str = "wharf:websocket/pubsub@0.1.12";

/// A topic read from the plugin's memory (in place for a UTF-8 plugin),
/// copied only once its length is checked.
fn topic_of(
    store: &StoreContextMut<'_, HostState>,
    topic: &WasmStr,
) -> wasmtime::Result<Result<String, ErrorCode>> {
    let topic = topic.to_str(store)?;
    Ok(check_topic(&topic).map(|()| topic.into_owned()))
}

/// A publish to `topic` of a payload `len` measures: the cheap refusals
/// and the audience first, then `frame` (which reads the payload from the
/// plugin's memory) only for a message that will be delivered.
fn publish(
    mut store: StoreContextMut<'_, HostState>,
    topic: &WasmStr,
    len: impl FnOnce(&StoreContextMut<'_, HostState>) -> wasmtime::Result<usize>,
    exclude: Option<Resource<ConnectionEntry>>,
    frame: impl FnOnce(&StoreContextMut<'_, HostState>) -> wasmtime::Result<Framed>,
) -> wasmtime::Result<(Result<u32, ErrorCode>,)> {
    let topic = match topic_of(&store, topic)? {
        Ok(topic) => topic,
        Err(code) => return Ok((Err(code),)),
    };
    let len = len(&store)?;
    Ok(
        (match store.data_mut().admit_publish(topic, len, exclude)? {
            Err(code) => Err(code),
            Ok(None) => Ok(0),
            Ok(Some(p)) => {
                let framed = frame(&store)?;
                Ok(p.broker.publish(&p.key, &framed, p.exclude).queued)
            }
        },),
    )
}

/// Adds `wharf:websocket/pubsub` to the linker. Wired by hand rather than
/// by `bindgen!`, which copies every argument out of the plugin's memory
/// before the host sees it: a 16 MiB publish over the rate, or to a topic
/// nobody reads, cost a 16 MiB copy (milliseconds with no epoch check).
/// Here the payload is copied only once the publish is admitted and has an
/// audience, framed straight from the plugin's memory (a text is validated
/// in place first, for its length).
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(INTERFACE)?;
    inst.func_wrap(
        "subscribe",
        |mut store: StoreContextMut<'_, HostState>,
         (conn, topic): (Resource<ConnectionEntry>, WasmStr)| {
            let topic = match topic_of(&store, &topic)? {
                Ok(topic) => topic,
                Err(code) => return Ok((Err(code),)),
            };
            let entry = store.data_mut().table.get_mut(&conn)?;
            if entry.outbox.is_closed() {
                return Ok((Err(ErrorCode::Closed),));
            }
            Ok((entry.subscriptions.subscribe(topic),))
        },
    )?;
    inst.func_wrap(
        "unsubscribe",
        |mut store: StoreContextMut<'_, HostState>,
         (conn, topic): (Resource<ConnectionEntry>, WasmStr)| {
            if let Ok(topic) = topic_of(&store, &topic)? {
                store
                    .data_mut()
                    .table
                    .get_mut(&conn)?
                    .subscriptions
                    .unsubscribe(&topic);
            }
            Ok(())
        },
    )?;
    inst.func_wrap(
        "publish-text",
        |store: StoreContextMut<'_, HostState>,
         (topic, text, exclude): (WasmStr, WasmStr, Option<Resource<ConnectionEntry>>)| {
            // Validated in place (transcoded, for a UTF-16 plugin) for its
            // length; read again only if it is to be framed.
            let len = |store: &StoreContextMut<'_, HostState>| Ok(text.to_str(store)?.len());
            publish(store, &topic, len, exclude, |store| {
                Ok(Framed::text(&text.to_str(store)?))
            })
        },
    )?;
    inst.func_wrap(
        "publish-binary",
        |store: StoreContextMut<'_, HostState>,
         (topic, data, exclude): (WasmStr, WasmList<u8>, Option<Resource<ConnectionEntry>>)| {
            let len = data.len();
            publish(store, &topic, |_| Ok(len), exclude, |store| {
                Ok(Framed::binary(data.as_le_slice(store)))
            })
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_shares_one_frame_and_cleans_up() {
        let broker = Broker::new();
        let scope: Arc<str> = Arc::from("chat");
        let mut conns: Vec<_> = (0..3)
            .map(|id| {
                let mut subs = Subscriptions::new(broker.clone(), scope.clone(), id);
                assert!(
                    subs.take_mailbox().is_none(),
                    "no mailbox before a subscription"
                );
                subs.subscribe("room".into()).unwrap();
                let rx = subs
                    .take_mailbox()
                    .expect("a mailbox after the first subscription");
                (subs, rx)
            })
            .collect();
        // Another tenant's topic of the same name is another topic.
        let mut other = Subscriptions::new(broker.clone(), Arc::from("x"), 9);
        other.subscribe("room".into()).unwrap();
        let mut other_rx = other.take_mailbox().unwrap();
        assert!(other.take_mailbox().is_none(), "handed out once");
        let key = (scope.clone(), "room".to_owned());
        let reach = broker.publish(&key, &Framed::text("hi"), Some(0));
        assert_eq!(
            reach,
            Reach {
                queued: 2,
                missed: 0
            }
        );
        assert!(conns[0].1.try_recv().is_err());
        assert_eq!(conns[1].1.try_recv().unwrap().payload_len(), 2);
        assert!(other_rx.try_recv().is_err());
        assert_eq!(broker.subscribers("chat", "room"), 3);
        conns.pop();
        assert_eq!(broker.subscribers("chat", "room"), 2);
        conns[1].0.unsubscribe("room");
        assert_eq!(broker.subscribers("chat", "room"), 1);
    }

    #[test]
    fn limits() {
        let broker = Broker::new();
        let mut subs = Subscriptions::new(broker.clone(), Arc::from("p"), 1);
        assert_eq!(subs.subscribe(String::new()), Err(ErrorCode::MessageTooBig));
        assert_eq!(
            subs.subscribe("x".repeat(MAX_TOPIC_LEN + 1)),
            Err(ErrorCode::MessageTooBig)
        );
        for i in 0..MAX_TOPICS_PER_CONNECTION {
            subs.subscribe(format!("t{i}")).unwrap();
        }
        assert_eq!(subs.subscribe("one more".into()), Err(ErrorCode::QueueFull));
        // A full mailbox misses messages rather than growing.
        let key = (Arc::from("p"), "t0".to_owned());
        for _ in 0..MAILBOX_CAPACITY {
            broker.publish(&key, &Framed::text("m"), None);
        }
        let reach = broker.publish(&key, &Framed::text("m"), None);
        assert_eq!(
            reach,
            Reach {
                queued: 0,
                missed: 1
            }
        );
    }

    /// A broker whose refusals are counted: (broker, mailbox-full, publish-rate).
    fn counted_broker() -> (Arc<Broker>, Counter, Counter) {
        let broker = Broker::new();
        let (full, rate) = (Counter::default(), Counter::default());
        broker.set_counters(|reason| match reason {
            MAILBOX_FULL => full.clone(),
            PUBLISH_RATE => rate.clone(),
            other => panic!("unexpected reason {other}"),
        });
        (broker, full, rate)
    }

    fn subscribed(broker: &Arc<Broker>, conn: u64, topic: &str) -> (Subscriptions, Mailbox) {
        let mut subs = Subscriptions::new(broker.clone(), Arc::from("p"), conn);
        subs.subscribe(topic.into()).unwrap();
        let rx = subs.take_mailbox().unwrap();
        (subs, rx)
    }

    #[test]
    fn mailbox_is_bounded_in_bytes_and_misses_are_counted() {
        const MIB: usize = 1 << 20;
        let (broker, full, _) = counted_broker();
        // One subscriber whose task is stuck (never drains), one that drains.
        let (_stuck, mut stuck_rx) = subscribed(&broker, 1, "t");
        let (_live, mut live_rx) = subscribed(&broker, 2, "t");
        let key = (Arc::from("p"), "t".to_owned());
        let message = Framed::binary(&vec![7; MIB]);
        let fit = DEFAULT_MAILBOX_BYTES / MIB;
        assert_eq!(fit, 4);
        let mut missed = 0;
        for _ in 0..20 {
            missed += broker.publish(&key, &message, None).missed;
            assert_eq!(live_rx.try_recv().unwrap().payload_len(), MIB);
        }
        // The stuck one got what fits in its budget, and missed the rest.
        assert_eq!(missed as usize, 20 - fit);
        assert_eq!(full.get(), (20 - fit) as u64);
        // Draining frees budget: one out, one more in.
        assert_eq!(stuck_rx.try_recv().unwrap().payload_len(), MIB);
        let reach = broker.publish(&key, &message, None);
        assert_eq!(
            reach,
            Reach {
                queued: 2,
                missed: 0
            }
        );
        let reach = broker.publish(&key, &message, None);
        assert_eq!(
            reach,
            Reach {
                queued: 1,
                missed: 1
            }
        );
        assert_eq!(full.get(), (20 - fit + 1) as u64);
        let mut held = 0;
        while stuck_rx.try_recv().is_ok() {
            held += 1;
        }
        assert_eq!(held, fit);
        assert_eq!(stuck_rx.queued(), 0);
    }

    #[test]
    fn an_empty_mailbox_takes_one_message_over_its_budget() {
        let broker = Broker::new();
        let mut subs =
            Subscriptions::new(broker.clone(), Arc::from("p"), 1).with_mailbox_budget(100);
        subs.subscribe("t".into()).unwrap();
        let mut rx = subs.take_mailbox().unwrap();
        let key = (Arc::from("p"), "t".to_owned());
        let big = Framed::binary(&[0; 1000]);
        assert_eq!(broker.publish(&key, &big, None).queued, 1);
        assert_eq!(broker.publish(&key, &Framed::text("x"), None).missed, 1);
        assert_eq!(rx.try_recv().unwrap().payload_len(), 1000);
        assert_eq!(broker.publish(&key, &Framed::text("x"), None).queued, 1);
        // Small ones fill it up to the budget, not beyond.
        for _ in 0..99 {
            broker.publish(&key, &Framed::text("x"), None);
        }
        assert_eq!(rx.queued(), 100);
        assert_eq!(broker.publish(&key, &Framed::text("x"), None).missed, 1);
    }

    #[test]
    fn a_waiting_task_is_woken_by_an_offer_and_told_when_no_topic_is_left() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let (outlet, mut rx) = mailbox(100);
        let second = outlet.clone();
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert!(matches!(outlet.offer(&Framed::text("a")), Offered::Queued));
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
        let got = rx.poll_recv(&mut cx);
        assert!(matches!(got, Poll::Ready(Some(m)) if m.payload_len() == 1));
        // Its room is kept while busy, freed once idle.
        assert!(lock(&rx.slots).queue.capacity() > 0);
        rx.release_idle();
        assert_eq!(lock(&rx.slots).queue.capacity(), 0);
        // One topic's end gone: still open; the last: done, once drained.
        assert!(rx.poll_recv(&mut cx).is_pending());
        assert!(matches!(second.offer(&Framed::text("b")), Offered::Queued));
        drop(outlet);
        drop(second);
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(Some(_))));
        assert!(matches!(rx.poll_recv(&mut cx), Poll::Ready(None)));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
        // And the other way: a mailbox gone refuses offers.
        let (outlet, rx) = mailbox(100);
        drop(rx);
        assert!(matches!(outlet.offer(&Framed::text("c")), Offered::Gone));
        // Closed, it tells how many it held, which no one will take.
        let (outlet, rx) = mailbox(100);
        assert!(matches!(outlet.offer(&Framed::text("d")), Offered::Queued));
        assert!(matches!(outlet.offer(&Framed::text("e")), Offered::Queued));
        assert_eq!(rx.close(), 2);
        assert!(matches!(outlet.offer(&Framed::text("f")), Offered::Gone));
    }

    #[tokio::test]
    async fn a_message_taken_frees_the_budget_too() {
        let broker = Broker::new();
        let (_subs, mut rx) = subscribed(&broker, 1, "t");
        let key = (Arc::from("p"), "t".to_owned());
        broker.publish(&key, &Framed::text("hello"), None);
        assert_eq!(rx.queued(), 5);
        let message = std::future::poll_fn(|cx| rx.poll_recv(cx)).await;
        assert_eq!(message.unwrap().payload_len(), 5);
        assert_eq!(rx.queued(), 0);
    }

    #[test]
    fn publishes_per_connection_are_rate_limited_and_counted() {
        let (broker, _, refused) = counted_broker();
        let mut a = Subscriptions::new(broker.clone(), Arc::from("p"), 1);
        let mut b = Subscriptions::new(broker.clone(), Arc::from("p"), 2);
        let t0 = Instant::now();
        let admitted = (0..PUBLISH_BURST + 500)
            .filter(|_| a.admit_publish(t0))
            .count();
        assert_eq!(admitted, PUBLISH_BURST as usize);
        assert_eq!(refused.get(), 500);
        // Another connection has its own rate.
        assert!(b.admit_publish(t0));
        // The rate refills at PUBLISHES_PER_SECOND.
        let t1 = t0 + Duration::from_millis(10);
        let admitted = (0..100).filter(|_| a.admit_publish(t1)).count();
        assert_eq!(admitted, 10);
        // A second is a whole burst again, and no more.
        let t2 = t1 + Duration::from_secs(5);
        let admitted = (0..2 * PUBLISH_BURST)
            .filter(|_| a.admit_publish(t2))
            .count();
        assert_eq!(admitted, PUBLISH_BURST as usize);
        // A steady rate at the limit is never refused.
        let before = refused.get();
        let mut t = t2 + Duration::from_secs(1);
        for _ in 0..5000 {
            t += PUBLISH_INTERVAL;
            assert!(a.admit_publish(t));
        }
        assert_eq!(refused.get(), before);
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second_with_the_count() {
        let t0 = Instant::now();
        let mut rate = PublishRate::new(t0);
        assert_eq!(rate.note_refused(t0), Some(1));
        for _ in 0..99 {
            assert_eq!(rate.note_refused(t0 + Duration::from_millis(500)), None);
        }
        assert_eq!(rate.note_refused(t0 + LOG_INTERVAL), Some(100));
        let mut topic = Topic::default();
        assert_eq!(topic.note_missed(3, t0), Some(3));
        assert_eq!(topic.note_missed(4, t0 + Duration::from_millis(999)), None);
        assert_eq!(topic.note_missed(5, t0 + LOG_INTERVAL), Some(9));
        assert_eq!(topic.note_missed(1, t0 + LOG_INTERVAL), None);
    }

    #[test]
    fn no_frame_is_built_for_a_topic_nobody_else_hears() {
        let broker = Broker::new();
        let key = (Arc::from("p"), "t".to_owned());
        let nobody = || -> Framed { panic!("framed for nobody") };
        // No such topic.
        assert_eq!(broker.publish_with(&key, None, nobody), Reach::default());
        // Only the excluded publisher is subscribed.
        let (_me, mut my_rx) = subscribed(&broker, 1, "t");
        assert_eq!(broker.publish_with(&key, Some(1), nobody), Reach::default());
        // Another subscriber: framed once.
        let (_other, mut other_rx) = subscribed(&broker, 2, "t");
        let mut framed = 0;
        let reach = broker.publish_with(&key, Some(1), || {
            framed += 1;
            Framed::text("hi")
        });
        assert_eq!((framed, reach.queued), (1, 1));
        assert!(my_rx.try_recv().is_err());
        assert_eq!(other_rx.try_recv().unwrap().payload_len(), 2);
    }

    #[test]
    fn a_topic_whose_subscribers_are_gone_is_removed() {
        let broker = Broker::new();
        let (_subs, rx) = subscribed(&broker, 1, "t");
        drop(rx); // the connection's task ended first
        let key = (Arc::from("p"), "t".to_owned());
        assert_eq!(
            broker.publish(&key, &Framed::text("x"), None),
            Reach::default()
        );
        assert_eq!(broker.subscribers("p", "t"), 0);
    }
}
