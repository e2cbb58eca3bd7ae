//! `wharf:websocket/snapshot`: the optional export through which a shared
//! instance hands its in-memory state to the next version of its handler
//! (a `migrate` deploy, see [`crate::tenancy::swap`]).
//!
//! Wired by hand, as `batch_handler` is: the exports are looked up and
//! type-checked once per plugin ([`SnapshotExport::find`]) and resolved
//! once per instance; the calls have the limits of one event.

use wasmtime::Store;
use wasmtime::component::{Func, Instance, InstancePre, TypedFunc};

use super::export::{ExportError, FuncExport};
use super::{HostState, PluginError, PluginInstance};

/// The interface's name; wasmtime matches later 0.1.x exports to it.
pub const INTERFACE: &str = "wharf:websocket/snapshot@0.1.5";
const SAVE: &str = "save";
const RESTORE: &str = "restore";

type SaveParams = ();
type SaveResults = (Vec<u8>,);
type RestoreParams<'a> = (&'a [u8],);
type RestoreResults = (Result<(), String>,);

/// Where a plugin exports `save` and `restore`, once checked to have
/// their types.
#[derive(Clone, Debug)]
pub struct SnapshotExport {
    save: FuncExport,
    restore: FuncExport,
}

/// `save` and `restore` in one instance.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotFuncs {
    save: Func,
    restore: Func,
}

impl SnapshotExport {
    /// `None` if the plugin does not export the interface (its shared
    /// instance's state cannot move: a `migrate` deploy drains instead);
    /// an error if it exports it wrongly.
    pub fn find(pre: &InstancePre<HostState>) -> Result<Option<Self>, ExportError> {
        let save = FuncExport::find::<SaveParams, SaveResults>(pre, INTERFACE, SAVE)?;
        let restore =
            FuncExport::find::<RestoreParams<'_>, RestoreResults>(pre, INTERFACE, RESTORE)?;
        Ok(save
            .zip(restore)
            .map(|(save, restore)| Self { save, restore }))
    }

    /// The functions in a fresh instance of the plugin `find` checked.
    pub fn resolve(
        &self,
        store: &mut Store<HostState>,
        instance: &Instance,
    ) -> Option<SnapshotFuncs> {
        Some(SnapshotFuncs {
            save: self.save.resolve(store, instance)?,
            restore: self.restore.resolve(store, instance)?,
        })
    }
}

impl PluginInstance {
    /// Whether the instance exports `snapshot`.
    pub fn snapshots(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Calls `save`: the instance's state, under the limits of one event.
    pub async fn save(&mut self) -> Result<Vec<u8>, PluginError> {
        let Some(funcs) = self.snapshot else {
            return Err(PluginError::Trap(anyhow::anyhow!(
                "{INTERFACE} is not exported"
            )));
        };
        // SAFETY: `funcs.save` is the export `SnapshotExport::find`
        // type-checked against exactly these types, resolved in an
        // instance of that same component.
        let typed = unsafe { TypedFunc::<SaveParams, SaveResults>::new_unchecked(funcs.save) };
        self.arm();
        let wall = self.wall();
        let r = super::wall::within(wall, || typed.call_async(&mut self.store, ())).await;
        self.finish_within(r).map(|(state,)| state)
    }

    /// Calls `restore` with what the previous version's `save` returned,
    /// under the limits of one event. An error it returns is
    /// [`PluginError::Restore`].
    pub async fn restore(&mut self, state: &[u8]) -> Result<(), PluginError> {
        let Some(funcs) = self.snapshot else {
            return Err(PluginError::Trap(anyhow::anyhow!(
                "{INTERFACE} is not exported"
            )));
        };
        // SAFETY: as in `save`.
        let typed =
            unsafe { TypedFunc::<RestoreParams<'_>, RestoreResults>::new_unchecked(funcs.restore) };
        self.arm();
        let wall = self.wall();
        let r = super::wall::within(wall, || typed.call_async(&mut self.store, (state,))).await;
        match self.finish_within(r)? {
            (Ok(()),) => Ok(()),
            (Err(why),) => Err(PluginError::Restore(why)),
        }
    }
}
