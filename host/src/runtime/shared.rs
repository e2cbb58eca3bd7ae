//! One instance serving all of a tenant's connections (`instance =
//! "shared"`), one event at a time: each connection's task takes the
//! instance's lock for a call, selects its own connection handle, and
//! calls. A handler can keep rooms, presence and counters in its memory,
//! and reach its other connections through `wharf:websocket/peers`.
//!
//! An instance that fails (a trap, a limit) is dropped: every connection it
//! served is woken, finds it gone and closes with 1011; the next connection
//! to arrive gets a new instance.
//!
//! A `migrate` deploy moves the instance to the next version
//! ([`SharedInstance::migrate_to`]): under the old one's lock, its state is
//! saved (`wharf:websocket/snapshot`), its connections' entries move to a
//! new instance of the next version, which restores the state. The old
//! [`SharedInstance`] is then retired: it keeps a forward pointer
//! ([`Moved`]) that its members follow on their next call, and that a
//! connection joining it late (it read the old version just before the
//! swap) follows too. A retired instance never serves again.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::{Plugin, PluginError, PluginInstance};
use crate::IdMap;
use crate::beacon::Beacon;

/// A tenant's shared instance, made on its first connection.
pub struct SharedInstance {
    plugin: Arc<Plugin>,
    state: Arc<Mutex<SharedState>>,
    /// Set once, under the lock, when a migrate swap retired it.
    moved: OnceLock<Moved>,
}

/// Where a retired shared instance's connections went.
pub struct Moved {
    /// The instance they now belong to.
    pub to: Arc<SharedInstance>,
    /// The generation whose members moved (members of an earlier, failed
    /// one stay behind, and find their instance gone).
    pub from: u64,
    /// Their generation in `to`.
    pub generation: u64,
}

struct SharedState {
    instance: Option<PluginInstance>,
    /// Counts the instances made: a connection that joined an earlier one
    /// has lost it.
    generation: u64,
    /// The wakers of the connections the current instance serves.
    members: IdMap<Arc<Beacon>>,
}

/// The instance, locked and selected for one connection.
pub struct Held {
    state: OwnedMutexGuard<SharedState>,
}

/// What [`SharedInstance::migrate_to`] did.
#[derive(Debug)]
pub enum Migration {
    /// No instance was running (none started yet, or it had failed):
    /// there was no state to move.
    Idle,
    /// The state and every connection moved.
    Moved { connections: usize, bytes: usize },
    /// `save` failed: the old instance was dropped, its connections are
    /// closed with 1011. `lost`: the messages it had queued for them.
    SaveFailed {
        error: PluginError,
        connections: usize,
        lost: u64,
    },
    /// The new instance could not be made, or `restore` failed: it was
    /// dropped, the moved connections are closed with 1011. `lost`: the
    /// messages queued for them (before the move, or by `restore`).
    RestoreFailed {
        error: PluginError,
        connections: usize,
        lost: u64,
    },
}

/// Entry id of the placeholder a new instance is made with when no
/// connection moves to it; detached before anyone can join.
const PLACEHOLDER: u64 = u64::MAX;

impl SharedInstance {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self {
            plugin,
            state: Arc::new(Mutex::new(SharedState {
                instance: None,
                generation: 0,
                members: IdMap::default(),
            })),
            moved: OnceLock::new(),
        }
    }

    /// Whether a migrate swap moved this instance to another version: it
    /// serves no one any more.
    pub fn is_retired(&self) -> bool {
        self.moved.get().is_some()
    }

    /// Where members of `generation` went, if they moved.
    fn moved_for(&self, generation: u64) -> Option<&Moved> {
        self.moved.get().filter(|m| m.from == generation)
    }

    /// Connection `id` joins the instance (made now if there is none);
    /// `wake` fires when another call queues sends for it or the instance
    /// fails. A retired instance passes it on to the one it moved
    /// to. Returns the instance it joined and its generation.
    pub async fn join(
        self: &Arc<Self>,
        id: u64,
        wake: Arc<Beacon>,
    ) -> Result<(Arc<SharedInstance>, u64), PluginError> {
        let mut shared = self.clone();
        loop {
            let mut state = shared.state.clone().lock_owned().await;
            if let Some(moved) = shared.moved.get() {
                let next = moved.to.clone();
                drop(state);
                shared = next;
                continue;
            }
            let mut entry = shared.plugin.new_entry(id);
            entry.wake = Some(wake.clone());
            match state.instance.as_mut() {
                Some(instance) => {
                    if !instance.attach(entry) {
                        return Err(PluginError::TableLimit);
                    }
                }
                None => {
                    // Boxed: rare, and its future is large.
                    let instance =
                        Box::pin(shared.plugin.instantiate_with(id, Some(entry))).await?;
                    state.instance = Some(instance);
                    state.generation += 1;
                    tracing::info!(tenant = %shared.plugin.tenant(), generation = state.generation, "shared instance started");
                }
            }
            state.members.insert(id, wake);
            let generation = state.generation;
            drop(state);
            return Ok((shared, generation));
        }
    }

    /// The instance, selected for connection `id`, if it is still the one
    /// `id` joined in `generation`; `None` once that one failed or moved
    /// (see [`follow`]).
    async fn lock(&self, id: u64, generation: u64) -> Option<Held> {
        let mut state = self.state.clone().lock_owned().await;
        if state.generation != generation {
            return None;
        }
        if !state.instance.as_mut()?.select(id) {
            return None;
        }
        Some(Held { state })
    }

    /// Moves this (the running version's) instance to `to` (the new
    /// version's, never used yet), between two events: the state `save`
    /// returns is handed to `restore` in a new instance of `to`'s plugin
    /// that serves every connection this one served. This one is retired
    /// whatever happens, so that its members and late joiners follow to
    /// `to`. Each step is bounded by the limits of one event; the lock is
    /// held throughout, so no call for any member runs meanwhile.
    pub async fn migrate_to(&self, to: &Arc<SharedInstance>) -> Migration {
        let mut old_guard = self.state.lock().await;
        let mut new_guard = to.state.lock().await;
        let (old, new): (&mut SharedState, &mut SharedState) = (&mut old_guard, &mut new_guard);
        let from = old.generation;
        let retire = |generation: u64| Moved {
            to: to.clone(),
            from,
            generation,
        };
        if self.moved.get().is_some() || new.instance.is_some() {
            // Not the running version's, or not a fresh target: the
            // caller's mistake; leave both as they are.
            return Migration::Idle;
        }
        let Some(instance) = old.instance.as_mut() else {
            let _ = self.moved.set(retire(new.generation));
            return Migration::Idle;
        };
        let saved = Box::pin(instance.save()).await;
        let connections = old.members.len();
        let state = match saved {
            Ok(state) => state,
            Err(error) => {
                let lost = instance.salvage().messages();
                let moved = retire(new.generation);
                fail(old);
                let _ = self.moved.set(moved);
                return Migration::SaveFailed {
                    error,
                    connections,
                    lost,
                };
            }
        };
        // The entries leave the old store (which goes, freeing its slot
        // before the new one takes one) and join the new one.
        let mut entries: Vec<_> = old
            .members
            .keys()
            .filter_map(|&id| instance.detach(id))
            .collect();
        old.instance = None;
        // What the entries bring queued for their connections, lost if no
        // instance takes them.
        let pending: u64 = entries.iter().map(|e| e.outbox.queued()).sum();
        let first = entries.pop();
        let first_id = first.as_ref().map_or(PLACEHOLDER, |e| e.id());
        let made = Box::pin(to.plugin.instantiate_with(first_id, first)).await;
        let restored = match made {
            Ok(mut instance) => {
                if first_id == PLACEHOLDER {
                    instance.detach(PLACEHOLDER);
                }
                // Once the instance refuses an entry, that one and the
                // rest are dropped, with their sends.
                let (mut all_in, mut refused) = (true, 0);
                for entry in entries {
                    let queued = entry.outbox.queued();
                    all_in = all_in && instance.attach(entry);
                    if !all_in {
                        refused += queued;
                    }
                }
                let r = if all_in {
                    Box::pin(instance.restore(&state)).await
                } else {
                    Err(PluginError::TableLimit)
                };
                match r {
                    Ok(()) => Ok(instance),
                    Err(error) => Err((error, instance.salvage().messages() + refused)),
                }
            }
            Err(error) => Err((error, pending)),
        };
        match restored {
            Ok(instance) => {
                new.instance = Some(instance);
                new.generation += 1;
                new.members = std::mem::take(&mut old.members);
                let _ = self.moved.set(retire(new.generation));
                tracing::info!(tenant = %to.plugin.tenant(), generation = new.generation, connections, bytes = state.len(), "shared instance migrated");
                Migration::Moved {
                    connections,
                    bytes: state.len(),
                }
            }
            Err((error, lost)) => {
                // The members follow to `to` and find no instance of
                // theirs there: woken, they close with 1011.
                let moved = retire(new.generation);
                fail(old);
                let _ = self.moved.set(moved);
                Migration::RestoreFailed {
                    error,
                    connections,
                    lost,
                }
            }
        }
    }
}

/// The instance for member `id` of `generation` in `shared`, following a
/// migrated instance to the one it moved to (`shared` and `generation` are
/// updated). `None`: its instance is gone (it failed).
pub async fn follow(
    shared: &mut Arc<SharedInstance>,
    generation: &mut u64,
    id: u64,
) -> Option<Held> {
    loop {
        forward(shared, generation);
        if let Some(held) = shared.lock(id, *generation).await {
            return Some(held);
        }
        // It may have moved while this waited for the lock.
        shared.moved_for(*generation)?;
    }
}

/// Follows the forward pointers of a migrated instance, without locking.
/// `true` if it moved.
pub fn forward(shared: &mut Arc<SharedInstance>, generation: &mut u64) -> bool {
    let mut moved = false;
    while let Some(m) = shared.moved_for(*generation) {
        let next = m.to.clone();
        *generation = m.generation;
        *shared = next;
        moved = true;
    }
    moved
}

/// Connection `id` of `generation` is gone: its entry leaves the instance
/// (wherever it moved), unless that instance is already gone.
pub async fn leave(mut shared: Arc<SharedInstance>, id: u64, mut generation: u64) {
    if let Some(mut held) = follow(&mut shared, &mut generation, id).await {
        let dropped = held.leave(id);
        if dropped > 0 {
            // No metrics reach here (a task that ended without `release`);
            // the log says it instead.
            tracing::warn!(
                conn = id,
                dropped,
                "sends for a connection that ended dropped"
            );
        }
    }
}

/// Drops a failed instance and wakes every connection it served, to find
/// it gone.
fn fail(state: &mut SharedState) {
    state.instance = None;
    for (_, wake) in state.members.drain() {
        wake.fire();
    }
}

impl Held {
    /// The instance failed: it is dropped, and every connection it served
    /// is woken to find it gone.
    pub fn fail(&mut self) {
        fail(&mut self.state);
    }

    /// Connection `id` ended: its entry (and its topics) leave the
    /// instance. Returns how many messages other connections' calls had
    /// queued for it that it never took (it was closing while they ran),
    /// for the caller to count.
    pub fn leave(&mut self, id: u64) -> u64 {
        self.state.members.remove(&id);
        match self.state.instance.as_mut().and_then(|i| i.detach(id)) {
            Some(mut entry) => entry.outbox.discard(),
            None => 0,
        }
    }
}

impl Deref for Held {
    type Target = PluginInstance;

    fn deref(&self) -> &PluginInstance {
        // A `Held` is only made over a live instance (see `lock`), and
        // `fail` consumes the caller's use of it.
        self.state
            .instance
            .as_ref()
            .expect("a held shared instance is live")
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut PluginInstance {
        self.state
            .instance
            .as_mut()
            .expect("a held shared instance is live")
    }
}
