//! The optional exports the host calls by hand rather than through
//! `bindgen!`'s bindings (`batch-handler`, `packed-handler`, `snapshot`):
//! each function is looked up and type-checked once per plugin, against
//! the Rust types its calls lower and lift, so that a call can skip the
//! check ([`wasmtime::component::TypedFunc::new_unchecked`]).

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    ComponentExportIndex, ComponentNamedList, Func, Instance, InstancePre, Lift, Lower,
};
use wasmtime::{AsContextMut, Store};

use super::HostState;

/// Why an exported interface cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{interface} has no function {function}")]
    Missing {
        interface: &'static str,
        function: &'static str,
    },
    #[error("{interface}#{function} is not a function")]
    NotAFunction {
        interface: &'static str,
        function: &'static str,
    },
    #[error("{interface}#{function} has the wrong type: {source:#}")]
    WrongType {
        interface: &'static str,
        function: &'static str,
        source: wasmtime::Error,
    },
}

/// A function a plugin exports, checked once per plugin.
#[derive(Clone, Copy, Debug)]
pub struct FuncExport {
    index: ComponentExportIndex,
}

impl FuncExport {
    /// `function` of the exported `interface`, checked to take `P` and
    /// return `R`. `None` if the plugin does not export the interface; an
    /// error if it exports it without the function or with another type.
    pub fn find<P, R>(
        pre: &InstancePre<HostState>,
        interface: &'static str,
        function: &'static str,
    ) -> Result<Option<Self>, ExportError>
    where
        P: ComponentNamedList + Lower,
        R: ComponentNamedList + Lift,
    {
        let component = pre.component();
        let Some(exported) = component.get_export_index(None, interface) else {
            return Ok(None);
        };
        let (item, index) =
            component
                .get_export(Some(&exported), function)
                .ok_or(ExportError::Missing {
                    interface,
                    function,
                })?;
        let ComponentItem::ComponentFunc(func) = item else {
            return Err(ExportError::NotAFunction {
                interface,
                function,
            });
        };
        func.typecheck::<P, R>(&pre.instance_type())
            .map_err(|source| ExportError::WrongType {
                interface,
                function,
                source,
            })?;
        Ok(Some(Self { index }))
    }

    /// The function in a fresh instance of the plugin `find` checked.
    pub fn resolve(&self, store: &mut Store<HostState>, instance: &Instance) -> Option<Func> {
        instance.get_func(store.as_context_mut(), self.index)
    }
}
