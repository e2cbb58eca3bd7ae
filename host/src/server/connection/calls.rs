//! Calls into the plugin for messages: on the worker, or movable to a
//! [lane](crate::runtime::idle_pool) when the tenant shares the server.

use wharf_protocol::State;

use super::conn::Conn;
use crate::runtime::batch_handler::Message;
use crate::runtime::cpu_share::CpuShare;
use crate::runtime::idle_pool;
use crate::runtime::{Plugin, PluginError, PluginInstance};
use crate::server::handler::Handler;
use crate::server::inbox::{self, Inbox};

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

/// What `inbox` holds, then `last`, to the plugin (see [`deliver`]);
/// `inbox` may be left holding `last` too. `None`: the instance is gone (it
/// failed before), the messages are dropped.
pub(super) async fn call_with(
    slots: Woken<'_>,
    inbox: &mut Inbox,
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
        // Where it starts: a tenant over its share of late on the idle
        // lane, one whose calls ran long of late on the long lane.
        let from = if slots.share.penalized() {
            Some(idle_pool::Lane::Idle)
        } else if slots.share.runs_long() {
            Some(idle_pool::Lane::Long)
        } else {
            None
        };
        return Some(call_movable(slots.handler, inbox, last, from).await);
    }
    let r = deliver(&mut instance, inbox, last).await;
    if r.is_err() {
        instance.fail();
    }
    Some(r)
}

/// A message on its own goes to `on-text` or `on-binary`; several go in one
/// batch call. `last`, which the inbox does not hold, joins the batch; one
/// too large to copy follows it in a call of its own.
async fn deliver(
    instance: &mut PluginInstance,
    inbox: &mut Inbox,
    last: Option<Message<'_>>,
) -> Result<(), PluginError> {
    let alone = match last {
        Some(one) if inbox.is_empty() => return instance.on_message(one).await,
        Some(one) if one.len() > inbox::MESSAGE_MAX || inbox.push(one).is_err() => Some(one),
        _ => None,
    };
    match inbox.only() {
        Some(one) => instance.on_message(one).await?,
        None => instance.on_batch(inbox.batch()).await?,
    }
    match alone {
        Some(one) => instance.on_message(one).await,
        None => Ok(()),
    }
}

/// Largest message copied for a call that may move off the workers.
const MOVABLE_MAX: usize = 64 * 1024;

/// A call that may leave the workers for a
/// [lane](crate::runtime::idle_pool) of its own: the connection's own
/// instance and a copy of the messages go with it, and come back when it
/// is done. It starts on `from` (`None`: here) and moves at the first tick
/// where it has run long (to the long lane) or its tenant is over (idle
/// lane).
async fn call_movable(
    handler: &mut Handler,
    inbox: &Inbox,
    last: Option<Message<'_>>,
    from: Option<idle_pool::Lane>,
) -> Result<(), PluginError> {
    // A copy goes with it, `last` included (at most `MOVABLE_MAX` bytes:
    // it fits in a batch).
    let mut owned = inbox.clone();
    if let Some(one) = last {
        owned.push(one).map_err(|e| PluginError::Trap(e.into()))?;
    }
    let Some(mut instance) = handler.lend() else {
        return Ok(());
    };
    let moved = instance.movable();
    let call = async move {
        let r = deliver(&mut instance, &mut owned, None).await;
        // A failed instance is dropped where it ran: freeing what a hostile
        // one grew (its memory slot's reset, a large attachment) is work
        // the workers should not do for it.
        (r.is_ok().then_some(instance), r)
    };
    let done = idle_pool::run_movable(call, moved, from).await;
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
