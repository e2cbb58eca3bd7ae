//! The host side of `wharf:websocket/peers`: sends to connections other
//! than the one a call is for, among those the instance serves (all of a
//! tenant's connections in a shared instance; in per-connection mode, only
//! its own). A connection another instance serves is not found, so a
//! plugin never reaches another tenant's.

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::wharf::websocket::peers::Host;
use super::bindings::{CloseCode, ErrorCode};
use super::connection_host::{ConnectionEntry, Outbox};

impl HostState {
    /// Runs `send` on connection `id`'s outbox, and wakes its task to write
    /// what was queued. `closed` if the instance does not serve `id`.
    fn queue_for(
        &mut self,
        id: u64,
        send: impl FnOnce(&mut Outbox) -> Result<(), ErrorCode>,
    ) -> Result<(), ErrorCode> {
        let Some(rep) = self.conns.get(id) else {
            return Err(ErrorCode::Closed);
        };
        let handle: Resource<ConnectionEntry> = Resource::new_borrow(rep);
        let Ok(entry) = self.table.get_mut(&handle) else {
            return Err(ErrorCode::Closed);
        };
        send(&mut entry.outbox)?;
        if let Some(wake) = &entry.wake {
            wake.fire();
        }
        Ok(())
    }
}

impl Host for HostState {
    fn send_text(&mut self, id: u64, text: String) -> wasmtime::Result<Result<(), ErrorCode>> {
        Ok(self.queue_for(id, |outbox| outbox.send_text(&text)))
    }

    fn send_binary(&mut self, id: u64, data: Vec<u8>) -> wasmtime::Result<Result<(), ErrorCode>> {
        Ok(self.queue_for(id, |outbox| outbox.send_binary(&data)))
    }

    fn close(
        &mut self,
        id: u64,
        code: CloseCode,
        reason: String,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        Ok(self.queue_for(id, |outbox| outbox.close(code, reason)))
    }
}
