//! The host side of `wharf:websocket/pubsub`: topics, and the fan-out the
//! host does for them.
//!
//! A published message is framed once ([`Framed`]) and a reference to it is
//! put in each subscriber's mailbox; the subscriber's connection task queues
//! it for its socket. No receiving plugin instance runs, and the payload is
//! copied out of the publisher's memory once, whatever the audience.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc::{self, error::TrySendError};
use wasmtime::component::Resource;
use wharf_protocol::Framed;

use super::HostState;
use super::bindings::ErrorCode;
use super::bindings::wharf::websocket::pubsub::Host;
use super::connection_host::ConnectionEntry;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;
/// Topics one connection may be subscribed to at once.
pub const MAX_TOPICS_PER_CONNECTION: usize = 64;
/// Published messages waiting for one connection's task; beyond it the
/// subscriber misses messages (counted and logged).
pub const MAILBOX_CAPACITY: usize = 1024;

/// Where published messages wait for a connection's task.
pub type Mailbox = mpsc::Receiver<Framed>;

/// A topic, scoped to the plugin (tenant) that named it.
type TopicKey = (Arc<str>, String);

/// Every topic's subscribers, server-wide.
#[derive(Default)]
pub struct Broker {
    topics: Mutex<HashMap<TopicKey, HashMap<u64, mpsc::Sender<Framed>>>>,
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

    fn lock(&self) -> MutexGuard<'_, HashMap<TopicKey, HashMap<u64, mpsc::Sender<Framed>>>> {
        // A panic while holding the lock leaves a consistent map (every
        // mutation is one insert or remove), so poisoning is ignored.
        self.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn subscribe(&self, key: TopicKey, conn: u64, mailbox: mpsc::Sender<Framed>) {
        self.lock().entry(key).or_default().insert(conn, mailbox);
    }

    fn unsubscribe(&self, key: &TopicKey, conn: u64) {
        let mut topics = self.lock();
        if let Some(subs) = topics.get_mut(key) {
            subs.remove(&conn);
            if subs.is_empty() {
                topics.remove(key);
            }
        }
    }

    /// Queues `message` for every subscriber of `key` but `exclude`.
    pub fn publish(&self, key: &TopicKey, message: &Framed, exclude: Option<u64>) -> Reach {
        let mut reach = Reach::default();
        let mut topics = self.lock();
        let Some(subs) = topics.get_mut(key) else {
            return reach;
        };
        subs.retain(|&conn, mailbox| {
            if Some(conn) == exclude {
                return true;
            }
            match mailbox.try_send(message.clone()) {
                Ok(()) => reach.queued += 1,
                Err(TrySendError::Full(_)) => reach.missed += 1,
                // The connection's task is gone; its entry is being dropped.
                Err(TrySendError::Closed(_)) => return false,
            }
            true
        });
        reach
    }

    /// Subscribers of a topic (for tests and metrics).
    pub fn subscribers(&self, scope: &str, topic: &str) -> usize {
        self.lock()
            .get(&(Arc::from(scope), topic.to_owned()))
            .map_or(0, HashMap::len)
    }
}

/// One connection's subscriptions; leaving every topic when dropped (with
/// its store), so a closed connection never lingers in the broker.
pub struct Subscriptions {
    broker: Arc<Broker>,
    scope: Arc<str>,
    conn: u64,
    /// Made on the first subscription: most connections never subscribe,
    /// and their tasks then have no mailbox to allocate or to poll.
    mailbox: Option<mpsc::Sender<Framed>>,
    /// The receiving end, until the connection's task takes it.
    unclaimed: Option<Mailbox>,
    topics: HashSet<String>,
}

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("conn", &self.conn)
            .field("topics", &self.topics)
            .finish()
    }
}

impl Subscriptions {
    /// A connection's subscriptions (none yet).
    pub fn new(broker: Arc<Broker>, scope: Arc<str>, conn: u64) -> Self {
        Self {
            broker,
            scope,
            conn,
            mailbox: None,
            unclaimed: None,
            topics: HashSet::new(),
        }
    }

    /// The mailbox the connection's task reads, once there is one (after
    /// the first subscription); handed out once.
    pub fn take_mailbox(&mut self) -> Option<Mailbox> {
        self.unclaimed.take()
    }

    fn key(&self, topic: &str) -> TopicKey {
        (self.scope.clone(), topic.to_owned())
    }

    fn subscribe(&mut self, topic: String) -> Result<(), ErrorCode> {
        check_topic(&topic)?;
        if self.topics.contains(&topic) {
            return Ok(());
        }
        if self.topics.len() >= MAX_TOPICS_PER_CONNECTION {
            return Err(ErrorCode::QueueFull);
        }
        let mailbox = self.mailbox.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(MAILBOX_CAPACITY);
            self.unclaimed = Some(rx);
            tx
        });
        let mailbox = mailbox.clone();
        self.broker.subscribe(self.key(&topic), self.conn, mailbox);
        self.topics.insert(topic);
        Ok(())
    }

    fn unsubscribe(&mut self, topic: &str) {
        if self.topics.remove(topic) {
            self.broker.unsubscribe(&self.key(topic), self.conn);
        }
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for topic in std::mem::take(&mut self.topics) {
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
    fn publish(
        &mut self,
        topic: String,
        message: Result<Framed, usize>,
        exclude: Option<Resource<ConnectionEntry>>,
    ) -> wasmtime::Result<Result<u32, ErrorCode>> {
        let exclude = match exclude {
            Some(conn) => Some(self.table.get(&conn)?.id()),
            None => None,
        };
        if let Err(code) = check_topic(&topic) {
            return Ok(Err(code));
        }
        let message = match message {
            Ok(m) => m,
            Err(_too_big) => return Ok(Err(ErrorCode::MessageTooBig)),
        };
        let key = (self.tenant.clone(), topic);
        let reach = self.broker.publish(&key, &message, exclude);
        if reach.missed > 0 {
            tracing::warn!(tenant = %key.0, topic = %key.1, missed = reach.missed, queued = reach.queued,
                "published message dropped for subscribers whose mailbox is full");
        }
        Ok(Ok(reach.queued))
    }

    fn framed(&self, len: usize, frame: impl FnOnce() -> Framed) -> Result<Framed, usize> {
        if len > self.max_message_size {
            Err(len)
        } else {
            Ok(frame())
        }
    }
}

impl Host for HostState {
    fn subscribe(
        &mut self,
        conn: Resource<ConnectionEntry>,
        topic: String,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let entry = self.table.get_mut(&conn)?;
        if entry.outbox.is_closed() {
            return Ok(Err(ErrorCode::Closed));
        }
        Ok(entry.subscriptions.subscribe(topic))
    }

    fn unsubscribe(
        &mut self,
        conn: Resource<ConnectionEntry>,
        topic: String,
    ) -> wasmtime::Result<()> {
        self.table.get_mut(&conn)?.subscriptions.unsubscribe(&topic);
        Ok(())
    }

    fn publish_text(
        &mut self,
        topic: String,
        text: String,
        exclude: Option<Resource<ConnectionEntry>>,
    ) -> wasmtime::Result<Result<u32, ErrorCode>> {
        let message = self.framed(text.len(), || Framed::text(&text));
        self.publish(topic, message, exclude)
    }

    fn publish_binary(
        &mut self,
        topic: String,
        data: Vec<u8>,
        exclude: Option<Resource<ConnectionEntry>>,
    ) -> wasmtime::Result<Result<u32, ErrorCode>> {
        let message = self.framed(data.len(), || Framed::binary(&data));
        self.publish(topic, message, exclude)
    }
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
}
