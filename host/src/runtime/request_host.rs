//! `wharf:websocket/request`: the upgrade request as a resource a handler
//! reads a field at a time (for `request-handler`, see
//! [`request_handler`](super::request_handler)), instead of a record
//! lowered whole into its memory.
//!
//! The host lends the handle for one `on-request` call: the entry is put
//! in the store's table before the call and taken out after it, whatever
//! the call did; the component model ends the guest's borrow when the call
//! returns, so no handle outlives it.

use std::net::SocketAddr;

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceType, WasmStr};
use wharf_protocol::Request;

use super::HostState;
use super::bindings::{Header, UpgradeRequest};

const INTERFACE: &str = "wharf:websocket/request@0.1.12";

/// The request behind a `request` handle: the parsed head as the
/// protocol keeps it, each field copied out only when the plugin asks.
pub struct RequestEntry {
    request: Request,
    peer: SocketAddr,
    tls: bool,
}

impl RequestEntry {
    pub fn new(request: Request, peer: SocketAddr, tls: bool) -> Self {
        Self { request, peer, tls }
    }

    /// The whole request as the `upgrade-request` record, for a handler
    /// that takes it in `on-upgrade`.
    pub fn record(&self) -> UpgradeRequest {
        let r = &self.request;
        UpgradeRequest {
            method: r.method().to_owned(),
            path: r.path().to_owned(),
            query: r.query().map(str::to_owned),
            headers: headers(r),
            subprotocols: r.subprotocols().map(str::to_owned).collect(),
            remote_address: self.peer.to_string(),
            tls: self.tls,
        }
    }
}

fn headers(request: &Request) -> Vec<Header> {
    request
        .headers()
        .map(|(name, value)| Header {
            name: name.to_owned(),
            value: value.to_owned(),
        })
        .collect()
}

type This = (Resource<RequestEntry>,);

/// The field of the request `this` names.
fn read<R>(
    store: &StoreContextMut<'_, HostState>,
    this: &Resource<RequestEntry>,
    field: impl FnOnce(&RequestEntry) -> R,
) -> wasmtime::Result<(R,)> {
    Ok((field(store.data().table.get(this)?),))
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(INTERFACE)?;
    // Plugins only ever receive borrowed handles; the host takes the entry
    // out of the table after the call it was lent to.
    inst.resource("request", ResourceType::host::<RequestEntry>(), |_, _| {
        Ok(())
    })?;
    inst.func_wrap("[method]request.method", |s, (this,): This| {
        read(&s, &this, |r| r.request.method().to_owned())
    })?;
    inst.func_wrap("[method]request.path", |s, (this,): This| {
        read(&s, &this, |r| r.request.path().to_owned())
    })?;
    inst.func_wrap("[method]request.query", |s, (this,): This| {
        read(&s, &this, |r| r.request.query().map(str::to_owned))
    })?;
    inst.func_wrap(
        "[method]request.header",
        |s: StoreContextMut<'_, HostState>, (this, name): (Resource<RequestEntry>, WasmStr)| {
            // Compared in place in the plugin's memory (a UTF-8 plugin's
            // name is not copied, whatever its length).
            let name = name.to_str(&s)?;
            read(&s, &this, |r| r.request.header(&name).map(str::to_owned))
        },
    )?;
    inst.func_wrap("[method]request.headers", |s, (this,): This| {
        read(&s, &this, |r| headers(&r.request))
    })?;
    inst.func_wrap("[method]request.subprotocols", |s, (this,): This| {
        read(&s, &this, |r| {
            r.request
                .subprotocols()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
    })?;
    inst.func_wrap("[method]request.remote-address", |s, (this,): This| {
        read(&s, &this, |r| r.peer.to_string())
    })?;
    inst.func_wrap("[method]request.tls", |s, (this,): This| {
        read(&s, &this, |r| r.tls)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_carries_every_field_of_the_request() {
        let head = b"GET /room?id=7 HTTP/1.1\r\nHost: a\r\nX-Token: one\r\n\
            Upgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
            Sec-WebSocket-Protocol: chat, v2\r\n\r\n";
        let limits = wharf_protocol::HandshakeLimits::default();
        let (request, _) = wharf_protocol::parse_request(head, &limits)
            .unwrap()
            .unwrap();
        let entry = RequestEntry::new(request, "127.0.0.1:1".parse().unwrap(), true);
        let record = entry.record();
        assert_eq!(
            (record.method.as_str(), record.path.as_str()),
            ("GET", "/room")
        );
        assert_eq!(record.query.as_deref(), Some("id=7"));
        assert_eq!(record.headers.len(), 7);
        assert_eq!(
            (
                record.headers[1].name.as_str(),
                record.headers[1].value.as_str()
            ),
            ("X-Token", "one")
        );
        assert_eq!(record.subprotocols, ["chat", "v2"]);
        assert_eq!(
            (record.remote_address.as_str(), record.tls),
            ("127.0.0.1:1", true)
        );
    }
}
