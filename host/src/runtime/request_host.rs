//! `wharf:websocket/request`: the upgrade request as a resource a handler
//! reads a field at a time (for `request-handler`, see
//! [`request_handler`](super::request_handler)), instead of a record
//! lowered whole into its memory.
//!
//! The host lends the handle for one `on-request` call: the entry is put
//! in the store's table before the call and taken out after it, whatever
//! the call did; the component model ends the guest's borrow when the call
//! returns, so no handle outlives it.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, Resource, ResourceType, WasmStr};

use super::HostState;
use super::bindings::{Header, UpgradeRequest};

const INTERFACE: &str = "wharf:websocket/request@0.1.10";

/// The request behind a `request` handle.
pub struct RequestEntry(pub UpgradeRequest);

type This = (Resource<RequestEntry>,);

/// The field of the request `this` names.
fn read<R>(
    store: &StoreContextMut<'_, HostState>,
    this: &Resource<RequestEntry>,
    field: impl FnOnce(&UpgradeRequest) -> R,
) -> wasmtime::Result<(R,)> {
    Ok((field(&store.data().table.get(this)?.0),))
}

/// The value of the first header named `name`, ASCII case ignored.
fn header(request: &UpgradeRequest, name: &str) -> Option<String> {
    request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(INTERFACE)?;
    // Plugins only ever receive borrowed handles; the host takes the entry
    // out of the table after the call it was lent to.
    inst.resource("request", ResourceType::host::<RequestEntry>(), |_, _| {
        Ok(())
    })?;
    inst.func_wrap("[method]request.method", |s, (this,): This| {
        read(&s, &this, |r| r.method.clone())
    })?;
    inst.func_wrap("[method]request.path", |s, (this,): This| {
        read(&s, &this, |r| r.path.clone())
    })?;
    inst.func_wrap("[method]request.query", |s, (this,): This| {
        read(&s, &this, |r| r.query.clone())
    })?;
    inst.func_wrap(
        "[method]request.header",
        |s: StoreContextMut<'_, HostState>, (this, name): (Resource<RequestEntry>, WasmStr)| {
            // Compared in place in the plugin's memory (a UTF-8 plugin's
            // name is not copied, whatever its length).
            let name = name.to_str(&s)?;
            read(&s, &this, |r| header(r, &name))
        },
    )?;
    inst.func_wrap("[method]request.headers", |s, (this,): This| {
        read(&s, &this, |r| -> Vec<Header> { r.headers.clone() })
    })?;
    inst.func_wrap("[method]request.subprotocols", |s, (this,): This| {
        read(&s, &this, |r| r.subprotocols.clone())
    })?;
    inst.func_wrap("[method]request.remote-address", |s, (this,): This| {
        read(&s, &this, |r| r.remote_address.clone())
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
    fn header_lookup_ignores_ascii_case_and_takes_the_first() {
        let h = |name: &str, value: &str| Header {
            name: name.into(),
            value: value.into(),
        };
        let request = UpgradeRequest {
            method: "GET".into(),
            path: "/".into(),
            query: None,
            headers: vec![h("Host", "a"), h("X-Token", "one"), h("x-token", "two")],
            subprotocols: Vec::new(),
            remote_address: "127.0.0.1:1".into(),
            tls: false,
        };
        assert_eq!(header(&request, "x-TOKEN").as_deref(), Some("one"));
        assert_eq!(header(&request, "host").as_deref(), Some("a"));
        assert_eq!(header(&request, "origin"), None);
    }
}
