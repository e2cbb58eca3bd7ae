//! Plugin versions and swaps: which version a tenant's new connections get,
//! and how its open ones move when that changes.
//!
//! A swap publishes the new version on the tenant's [`PluginSlot`] (a
//! `watch` channel every connection holds a receiver of) with a
//! [`Policy`]. New connections take the new version at once. An open
//! connection sees the swap between two events, in its own task, so every
//! message is delivered, in order, to exactly one version:
//! - `drain`: it stays on its version until it closes; a version is
//!   unloaded when its last connection ends.
//! - `migrate`: its instance is replaced by one of the new version, handed
//!   the connection's entry (attachment, topics) as waking from
//!   hibernation is: no `on-upgrade` or `on-open` again. A hibernated
//!   connection simply wakes on the new version. A shared instance's state
//!   lives in its memory: when both versions export
//!   `wharf:websocket/snapshot`, the deploy moves the running version's
//!   shared instance as a whole, between two events (see
//!   [`SharedInstance::migrate_to`]): `save` on the old one, every
//!   connection's entry into a new one, `restore` there; each member
//!   follows on its next event. Otherwise a shared tenant falls back to
//!   `drain`, and the deploy's answer says so. Members of versions older
//!   than the running one stay where they are (drained).
//! - `restart`: it is closed with 1012 (Service Restart) at a moment spread
//!   over `server.restart_window`, so clients do not all reconnect at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::beacon::{Beacon, Watcher};
use crate::runtime::Plugin;
use crate::runtime::shared::SharedInstance;

/// How a tenant's open connections move to a new version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Drain,
    Migrate,
    Restart,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Drain => "drain",
            Policy::Migrate => "migrate",
            Policy::Restart => "restart",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drain" => Ok(Policy::Drain),
            "migrate" => Ok(Policy::Migrate),
            "restart" => Ok(Policy::Restart),
            other => Err(format!(
                "unknown policy {other:?} (drain, migrate or restart)"
            )),
        }
    }
}

/// One loaded version of a tenant's plugin.
pub struct Version {
    pub plugin: Arc<Plugin>,
    /// In shared mode: the instance this version's connections share.
    pub shared: Option<Arc<SharedInstance>>,
    pub loaded_at: SystemTime,
    /// Connections open on this version.
    connections: AtomicUsize,
}

impl Version {
    pub fn new(plugin: Plugin, shared_mode: bool) -> Arc<Self> {
        Self::of(Arc::new(plugin), shared_mode)
    }

    fn of(plugin: Arc<Plugin>, shared_mode: bool) -> Arc<Self> {
        Arc::new(Self {
            shared: shared_mode.then(|| Arc::new(SharedInstance::new(plugin.clone()))),
            plugin,
            loaded_at: SystemTime::now(),
            connections: AtomicUsize::new(0),
        })
    }

    /// A new version of the same plugin, with a shared instance of its
    /// own (not started): what a rollback installs when this one's shared
    /// instance cannot serve the tenant's connections again (it moved
    /// away, or the rollback moves the current state into it).
    pub fn fresh(&self) -> Arc<Self> {
        Self::of(self.plugin.clone(), self.shared.is_some())
    }

    /// Whether its shared instance moved to another version (a migrate
    /// swap): it will not serve again.
    pub fn retired(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.is_retired())
    }

    /// Whether `shared` is this version's shared instance.
    pub fn owns(&self, shared: &Arc<SharedInstance>) -> bool {
        self.shared.as_ref().is_some_and(|s| Arc::ptr_eq(s, shared))
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// A connection is now served by this version, until the guard drops.
    pub fn serve(self: &Arc<Self>) -> Serving {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Serving {
            version: self.clone(),
            counted: true,
        }
    }
}

/// A connection's hold on its version: counted, and kept loaded.
pub struct Serving {
    version: Arc<Version>,
    /// Still in the version's count of connections.
    counted: bool,
}

impl Serving {
    pub fn version(&self) -> &Arc<Version> {
        &self.version
    }

    /// The connection's WebSocket has closed: it no longer counts as served
    /// by the version (a draining version is done with it), though its
    /// socket may linger for the peer's half of the TCP close.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.version.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.release();
    }
}

/// What a tenant's connections are told when its version changes.
#[derive(Clone)]
pub struct Current {
    pub version: Arc<Version>,
    pub policy: Policy,
}

/// A connection's view of its tenant's swaps.
pub struct Swaps {
    watcher: Watcher,
    current: watch::Receiver<Current>,
}

impl Swaps {
    /// The current version and policy, marked seen.
    pub fn borrow_and_update(&mut self) -> watch::Ref<'_, Current> {
        self.current.borrow_and_update()
    }

    /// Ready at the next swap: `true`, or `false` if the tenant is gone.
    pub fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            if self.watcher.is_closed() {
                return Poll::Ready(false);
            }
            match self.current.has_changed() {
                Ok(true) => return Poll::Ready(true),
                Err(_) => return Poll::Ready(false),
                Ok(false) => std::task::ready!(self.watcher.poll_fired(cx)),
            }
        }
    }
}

impl Drop for PluginSlot {
    fn drop(&mut self) {
        // Its connections' `changed` sees the tenant gone.
        self.swapped.close();
    }
}

/// The version a tenant's new connections get, the one before it (for
/// rollback), and every version still serving connections.
pub struct PluginSlot {
    current: watch::Sender<Current>,
    /// Fired at every swap, and when the slot goes (its tenant was removed).
    swapped: Arc<Beacon>,
    previous: Mutex<Option<Arc<Version>>>,
    /// Versions loaded so far that may still serve connections.
    loaded: Mutex<Vec<std::sync::Weak<Version>>>,
}

impl PluginSlot {
    pub fn new(version: Arc<Version>) -> Self {
        let loaded = Mutex::new(vec![Arc::downgrade(&version)]);
        let (current, _) = watch::channel(Current {
            version,
            policy: Policy::Drain,
        });
        Self {
            current,
            swapped: Beacon::new(),
            previous: Mutex::new(None),
            loaded,
        }
    }

    pub fn current(&self) -> Arc<Version> {
        self.current.borrow().version.clone()
    }

    /// A receiver of swaps, for a connection.
    pub fn subscribe(&self) -> Swaps {
        Swaps {
            watcher: self.swapped.watch(),
            current: self.current.subscribe(),
        }
    }

    /// Makes `version` the current one; the one it replaces becomes the
    /// previous (kept loaded for rollback).
    pub fn swap(&self, version: Arc<Version>, policy: Policy) -> Arc<Version> {
        lock(&self.loaded).push(Arc::downgrade(&version));
        let old = self.current.send_replace(Current { version, policy });
        self.swapped.fire();
        *lock(&self.previous) = Some(old.version.clone());
        old.version
    }

    /// The version before the current one.
    pub fn previous(&self) -> Option<Arc<Version>> {
        lock(&self.previous).clone()
    }

    /// Every version still loaded (the current one first).
    pub fn versions(&self) -> Vec<Arc<Version>> {
        let current = self.current();
        let mut loaded = lock(&self.loaded);
        loaded.retain(|v| v.strong_count() > 0);
        let mut out = vec![current.clone()];
        out.extend(
            loaded
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|v| !Arc::ptr_eq(v, &current)),
        );
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
