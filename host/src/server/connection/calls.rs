//! Calls into the plugin for messages: on the worker, or movable to a
//! [lane](crate::runtime::idle_pool) when the tenant shares the server.

use std::sync::Arc;

use wharf_protocol::{Masked, State};

use super::conn::Conn;
use crate::runtime::batch::{Batch, BatchRef};
use crate::runtime::batch_handler::Message;
use crate::runtime::connection_host::DirectWrite;
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::idle_pool;
use crate::runtime::{Plugin, PluginError, Salvage};
use crate::server::handler::Handler;

/// What a call needs: the connection's handler, its plugin, and its
/// tenant's CPU share, which a message event waits for.
pub(super) struct Woken<'a> {
    handler: &'a mut Handler,
    plugin: &'a Plugin,
    share: &'a CpuShare,
    id: u64,
}

impl<'a> Woken<'a> {
    pub(super) fn of(
        handler: &'a mut Handler,
        plugin: &'a Plugin,
        share: &'a CpuShare,
        id: u64,
    ) -> Self {
        Self {
            handler,
            plugin,
            share,
            id,
        }
    }
}

/// What a call delivers: one message, or a batch of them.
#[derive(Debug)]
pub(super) enum Delivery<'a> {
    One(Message<'a>),
    /// One binary message still masked, unmasked as it is copied into the
    /// plugin's memory.
    Masked(Masked<'a>),
    Batch(BatchRef<'a>),
}

impl Delivery<'_> {
    /// Payload bytes.
    fn bytes(&self) -> usize {
        match self {
            Delivery::One(message) => message.len(),
            Delivery::Masked(masked) => masked.len(),
            Delivery::Batch(batch) => batch.bytes(),
        }
    }
}

/// What a delivery came to: the calls' result, and what a failed
/// instance left.
pub(super) struct Called {
    pub(super) result: Result<(), PluginError>,
    pub(super) salvage: Salvage,
}

impl From<Result<(), PluginError>> for Called {
    fn from(result: Result<(), PluginError>) -> Self {
        Self {
            result,
            salvage: Salvage::default(),
        }
    }
}

/// `delivery` to the plugin: `on-text`/`on-binary` for one message, a
/// batch call for several. `None`: the instance is gone (it failed
/// before), the messages are dropped.
pub(super) async fn call_with(
    slots: Woken<'_>,
    delivery: Delivery<'_>,
    backlog: usize,
    state: State,
    direct: Option<&Arc<dyn DirectWrite>>,
) -> Option<Called> {
    let wait = slots.share.wait();
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    // A tenant with a CPU share (a server with several) runs its calls so
    // that they can leave the workers; messages too large to copy cheaply
    // stay (its tenant's share still throttles them).
    let movable =
        slots.share.is_limited() && slots.handler.is_own() && delivery.bytes() <= MOVABLE_MAX;
    let mut instance = match slots.handler.acquire(slots.plugin, slots.id).await {
        Err(err) => return Some(Err(err).into()),
        Ok(None) => return None,
        Ok(Some(instance)) => instance,
    };
    Conn::sync_outbox(&mut instance, backlog, state, direct);
    if movable {
        drop(instance);
        // Where it starts: a tenant over its share of late on the idle
        // lane, one whose calls ran long of late on the long lane.
        let from = if slots.share.penalized() {
            Some(idle_pool::Lane::Idle)
        } else if slots.share.runs_long() {
            Some(idle_pool::Lane::Long)
        } else {
            None
        };
        return Some(call_movable(slots.handler, delivery, from).await);
    }
    let result = match delivery {
        Delivery::One(message) => instance.on_message(message).await,
        Delivery::Masked(masked) => instance.on_masked_binary(masked).await,
        Delivery::Batch(batch) => instance.on_batch(batch).await,
    };
    let salvage = match result {
        Ok(()) => Salvage::default(),
        Err(_) => instance.fail(),
    };
    Some(Called { result, salvage })
}

/// Most payload bytes copied for a call that may move off the workers.
const MOVABLE_MAX: usize = 128 * 1024;

/// A call that may leave the workers for a
/// [lane](crate::runtime::idle_pool) of its own: the connection's own
/// instance and a copy of the messages go with it, and come back when it
/// is done. It starts on `from` (`None`: here) and moves at the first tick
/// where it has run long (to the long lane) or its tenant is over (idle
/// lane).
async fn call_movable(
    handler: &mut Handler,
    delivery: Delivery<'_>,
    from: Option<idle_pool::Lane>,
) -> Called {
    let owned = match delivery {
        Delivery::One(message) => Batch::of_one(message),
        Delivery::Masked(masked) => Batch::of_one(Message::Binary(masked.unmask())),
        Delivery::Batch(batch) => Ok(batch.to_owned()),
    };
    let owned = match owned {
        Ok(owned) => owned,
        Err(e) => return Err(PluginError::Trap(e.into())).into(),
    };
    let Some(mut instance) = handler.lend() else {
        return Ok(()).into();
    };
    let moved = instance.movable();
    let call = async move {
        let result = instance.on_batch(owned.as_ref()).await;
        // A failed instance is dropped where it ran: freeing what a hostile
        // one grew (its memory slot's reset, a large attachment) is work
        // the workers should not do for it.
        let salvage = match result {
            Ok(()) => Salvage::default(),
            Err(_) => instance.salvage(),
        };
        let called = Called { result, salvage };
        (called.result.is_ok().then_some(instance), called)
    };
    let done = idle_pool::run_movable(call, moved, from).await;
    match done {
        Ok((instance, called)) => {
            if let Some(instance) = instance {
                handler.restore(instance);
            }
            called
        }
        // It panicked: the instance went with it.
        Err(err) => Err(PluginError::Trap(anyhow::anyhow!(
            "call on the idle pool failed: {err}"
        )))
        .into(),
    }
}
