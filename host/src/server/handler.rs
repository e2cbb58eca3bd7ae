//! Which plugin instance a connection's events go to: its own (created at
//! the upgrade, released while it hibernates, re-created from what it
//! parked), or its tenant's shared one, locked for each call.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::beacon::{Beacon, Watcher};
use crate::runtime::connection_host::{ConnectionEntry, Parked};
use crate::runtime::shared::{self, Held, SharedInstance};
use crate::runtime::{Plugin, PluginError, PluginInstance, Salvage};

pub(super) enum Handler {
    /// Per-connection mode.
    Own {
        /// `None` once it failed, or while the connection hibernates.
        /// Boxed: inline, its 224 bytes would stay in a hibernated
        /// connection's task, most of an idle server's connections.
        instance: Option<Box<PluginInstance>>,
        /// While hibernating: what the next instance resumes from. Inline
        /// (200 bytes of every connection): boxed, it was allocated as the
        /// instance was freed, in the middle of the freed memory, whose
        /// pages it then kept resident.
        parked: Option<Parked>,
    },
    /// Shared mode.
    Shared(Member),
}

/// A connection's place in its tenant's shared instance.
pub(super) struct Member {
    shared: Arc<SharedInstance>,
    id: u64,
    /// The instance it joined (or followed a migration to); a later one
    /// is not its.
    generation: u64,
    /// Ready when another connection's call queued sends for this one,
    /// or when the instance failed; made before joining, so that no fire
    /// is missed, and taken by the connection's driver.
    watcher: Option<Watcher>,
    left: bool,
}

/// An instance ready for a call.
pub(super) enum Acquired<'a> {
    Own(&'a mut PluginInstance),
    Shared(Held),
}

impl Handler {
    pub fn own(instance: PluginInstance) -> Self {
        Handler::Own {
            instance: Some(Box::new(instance)),
            parked: None,
        }
    }

    /// Joins `shared` for connection `id`.
    pub async fn join(shared: &Arc<SharedInstance>, id: u64) -> Result<Self, PluginError> {
        let wake = Beacon::new();
        let watcher = wake.watch();
        let (shared, generation) = shared.join(id, wake).await?;
        Ok(Handler::Shared(Member {
            shared,
            id,
            generation,
            watcher: Some(watcher),
            left: false,
        }))
    }

    /// The instance for the next call: a hibernated connection's is
    /// re-created, a shared one locked. `None`: it is gone (it failed).
    pub async fn acquire(
        &mut self,
        plugin: &Plugin,
        id: u64,
    ) -> Result<Option<Acquired<'_>>, PluginError> {
        match self {
            Handler::Own { instance, parked } => {
                if instance.is_none()
                    && let Some(entry) = parked.take()
                {
                    // Boxed: resuming is rare, and its state (a store being
                    // built) would otherwise add ~320 bytes to every
                    // connection's task.
                    let entry = plugin.unpark(entry);
                    *instance = Some(Box::new(
                        Box::pin(plugin.instantiate_with(id, Some(entry))).await?,
                    ));
                    tracing::debug!(conn = id, "resumed from hibernation");
                }
                Ok(instance.as_deref_mut().map(Acquired::Own))
            }
            Handler::Shared(m) => Ok(m.lock().await.map(Acquired::Shared)),
        }
    }

    /// The live instance, without resuming a hibernated one: for handing
    /// over what a call queued. `None`: there is none.
    pub async fn current(&mut self) -> Option<Acquired<'_>> {
        match self {
            Handler::Own { instance, .. } => instance.as_deref_mut().map(Acquired::Own),
            Handler::Shared(m) => m.lock().await.map(Acquired::Shared),
        }
    }

    /// Per-connection mode.
    pub fn is_own(&self) -> bool {
        matches!(self, Handler::Own { .. })
    }

    /// The connection's own live instance, taken out for a call that runs
    /// on another runtime (the idle pool); [`Handler::restore`] puts it
    /// back. `None` in shared mode, or with no live instance.
    pub fn lend(&mut self) -> Option<Box<PluginInstance>> {
        match self {
            Handler::Own { instance, .. } => instance.take(),
            Handler::Shared(_) => None,
        }
    }

    pub fn restore(&mut self, lent: Box<PluginInstance>) {
        if let Handler::Own { instance, .. } = self {
            *instance = Some(lent);
        }
    }

    /// After a failed call: a connection's own instance is dropped (a
    /// shared one was dropped while held, see [`Acquired::fail`]).
    pub fn bury(&mut self) {
        if let Handler::Own { instance, .. } = self {
            *instance = None;
        }
    }

    /// Whether the connection has its own live instance to hibernate.
    pub fn can_hibernate(&self) -> bool {
        matches!(
            self,
            Handler::Own {
                instance: Some(_),
                ..
            }
        )
    }

    /// Whether the connection is hibernated: its instance released, what
    /// the next one resumes from kept.
    pub fn is_parked(&self) -> bool {
        matches!(
            self,
            Handler::Own {
                parked: Some(_),
                ..
            }
        )
    }

    /// Releases the connection's own instance, keeping what the next one
    /// resumes from.
    pub fn hibernate(&mut self) {
        if let Handler::Own { instance, parked } = self
            && let Some(live) = instance.take()
        {
            *parked = live.hibernate().map(ConnectionEntry::park);
        }
    }

    /// The connection ended: its own instance is released, or it leaves
    /// the shared one. Returns the messages left queued for it that will
    /// never be sent (see [`Held::leave`]; an own instance's outbox is
    /// emptied after every call).
    pub async fn release(&mut self) -> u64 {
        match self {
            Handler::Own { instance, .. } => {
                *instance = None;
                0
            }
            Handler::Shared(m) => {
                m.left = true;
                match m.lock().await {
                    Some(mut held) => held.leave(m.id),
                    None => 0,
                }
            }
        }
    }

    /// Moves a connection's own instance to `plugin` (between two events):
    /// a live one is replaced by a new instance given its entry, as waking
    /// from hibernation is; a hibernated one will wake on `plugin`.
    /// `false`: a shared member, whose instance moves as a whole (see
    /// [`Handler::follow`]).
    pub async fn migrate(&mut self, plugin: &Plugin, id: u64) -> Result<bool, PluginError> {
        let Handler::Own { instance, .. } = self else {
            return Ok(false);
        };
        if let Some(old) = instance.take()
            && let Some(entry) = old.hibernate()
        {
            *instance = Some(Box::new(
                Box::pin(plugin.instantiate_with(id, Some(entry))).await?,
            ));
        }
        Ok(true)
    }

    /// A shared member's instance after a migrate swap moved it to
    /// another version (the connection's entry went with it); `None` in
    /// per-connection mode.
    pub fn follow(&mut self) -> Option<&Arc<SharedInstance>> {
        match self {
            Handler::Shared(m) => {
                shared::forward(&mut m.shared, &mut m.generation);
                Some(&m.shared)
            }
            Handler::Own { .. } => None,
        }
    }

    /// The shared member's wait for other connections' calls, taken once
    /// by the connection's driver.
    pub fn take_peer_watcher(&mut self) -> Option<Watcher> {
        match self {
            Handler::Shared(m) => m.watcher.take(),
            Handler::Own { .. } => None,
        }
    }
}

impl Member {
    /// Its instance, locked and selected for it, wherever a migration
    /// moved it.
    async fn lock(&mut self) -> Option<Held> {
        shared::follow(&mut self.shared, &mut self.generation, self.id).await
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if !self.left {
            // A task that ended without `release` (its transport failed
            // mid-upgrade, say): leave from a task of its own.
            let (shared, id, generation) = (self.shared.clone(), self.id, self.generation);
            tokio::spawn(shared::leave(shared, id, generation));
        }
    }
}

impl Acquired<'_> {
    /// The call just made failed: what its outboxes hold is taken, and a
    /// shared instance is dropped at once, before another connection calls
    /// into it (an own one goes at [`Handler::bury`]).
    pub fn fail(&mut self) -> Salvage {
        let salvage = self.salvage();
        if let Acquired::Shared(held) = self {
            held.fail();
        }
        salvage
    }
}

impl Deref for Acquired<'_> {
    type Target = PluginInstance;

    fn deref(&self) -> &PluginInstance {
        match self {
            Acquired::Own(i) => i,
            Acquired::Shared(h) => h,
        }
    }
}

impl DerefMut for Acquired<'_> {
    fn deref_mut(&mut self) -> &mut PluginInstance {
        match self {
            Acquired::Own(i) => i,
            Acquired::Shared(h) => h,
        }
    }
}
