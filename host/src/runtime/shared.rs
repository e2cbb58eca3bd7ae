//! One instance serving all of a tenant's connections (`instance =
//! "shared"`), one event at a time: each connection's task takes the
//! instance's lock for a call, selects its own connection handle, and
//! calls. A handler can keep rooms, presence and counters in its memory,
//! and reach its other connections through `wharf:websocket/peers`.
//!
//! An instance that fails (a trap, a limit) is dropped: every connection it
//! served is woken, finds it gone and closes with 1011; the next connection
//! to arrive gets a new instance.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard, Notify};

use super::{Plugin, PluginError, PluginInstance};

/// A tenant's shared instance, made on its first connection.
pub struct SharedInstance {
    plugin: Arc<Plugin>,
    state: Mutex<SharedState>,
}

struct SharedState {
    instance: Option<PluginInstance>,
    /// Counts the instances made: a connection that joined an earlier one
    /// has lost it.
    generation: u64,
    /// The wakers of the connections the current instance serves.
    members: HashMap<u64, Arc<Notify>>,
}

/// The instance, locked and selected for one connection.
pub struct Held<'a> {
    state: MutexGuard<'a, SharedState>,
}

impl SharedInstance {
    pub fn new(plugin: Arc<Plugin>) -> Self {
        Self {
            plugin,
            state: Mutex::new(SharedState {
                instance: None,
                generation: 0,
                members: HashMap::new(),
            }),
        }
    }

    /// Connection `id` joins the instance (made now if there is none);
    /// `wake` is notified when another call queues sends for it or the
    /// instance fails. Returns the generation it joined.
    pub async fn join(&self, id: u64, wake: Arc<Notify>) -> Result<u64, PluginError> {
        let mut state = self.state.lock().await;
        let mut entry = self.plugin.new_entry(id);
        entry.wake = Some(wake.clone());
        match state.instance.as_mut() {
            Some(instance) => {
                if !instance.attach(entry) {
                    return Err(PluginError::TableLimit);
                }
            }
            None => {
                // Boxed: rare, and its future is large.
                let instance = Box::pin(self.plugin.instantiate_with(id, Some(entry))).await?;
                state.instance = Some(instance);
                state.generation += 1;
                tracing::info!(tenant = %self.plugin.tenant(), generation = state.generation, "shared instance started");
            }
        }
        state.members.insert(id, wake);
        Ok(state.generation)
    }

    /// The instance, selected for connection `id`, if it is still the one
    /// `id` joined in `generation`; `None` once that one failed.
    pub async fn lock(&self, id: u64, generation: u64) -> Option<Held<'_>> {
        let mut state = self.state.lock().await;
        if state.generation != generation {
            return None;
        }
        if !state.instance.as_mut()?.select(id) {
            return None;
        }
        Some(Held { state })
    }

    /// Connection `id` of `generation` is gone: its entry leaves the
    /// instance, unless that instance is already gone.
    pub async fn leave(&self, id: u64, generation: u64) {
        if let Some(mut held) = self.lock(id, generation).await {
            held.leave(id);
        }
    }
}

impl Held<'_> {
    /// The instance failed: it is dropped, and every connection it served
    /// is woken to find it gone.
    pub fn fail(&mut self) {
        self.state.instance = None;
        for (_, wake) in self.state.members.drain() {
            wake.notify_one();
        }
    }

    /// Connection `id` ended: its entry (and its topics) leave the instance.
    pub fn leave(&mut self, id: u64) {
        self.state.members.remove(&id);
        if let Some(instance) = self.state.instance.as_mut() {
            instance.detach(id);
        }
    }
}

impl Deref for Held<'_> {
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

impl DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut PluginInstance {
        self.state
            .instance
            .as_mut()
            .expect("a held shared instance is live")
    }
}
