//! The host side of `wharf:websocket/attachment`: a small blob kept with the
//! connection, outside the instance, so it survives hibernation.

use wasmtime::component::Resource;

use super::HostState;
use super::bindings::ErrorCode;
use super::bindings::wharf::websocket::attachment::Host;
use super::connection_host::ConnectionEntry;

/// Largest attachment, in bytes: it is what an idle connection costs.
pub const MAX_ATTACHMENT: usize = 4096;

impl Host for HostState {
    fn set(
        &mut self,
        conn: Resource<ConnectionEntry>,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<(), ErrorCode>> {
        let entry = self.table.get_mut(&conn)?;
        if data.len() > MAX_ATTACHMENT {
            return Ok(Err(ErrorCode::MessageTooBig));
        }
        entry.attachment = data;
        Ok(Ok(()))
    }

    fn get(&mut self, conn: Resource<ConnectionEntry>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&conn)?.attachment.clone())
    }
}
