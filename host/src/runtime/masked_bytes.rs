//! A binary message still masked ([`Masked`]) passed to a plugin as the
//! `list<u8>` it takes, unmasked as it is copied into the plugin's memory.
//!
//! Lowering a `&[u8]` is one copy, after the protocol's unmasking in place
//! was another pass over the payload; this lowering is one pass, the
//! unmasking copy. For a 64 KiB message the pass saved costs about what
//! the copy does (RESULTS.md, "Unmasked into the plugin's memory").
//!
//! It implements wasmtime's lowering traits by hand, whose required
//! methods and `LowerContext` are `#[doc(hidden)]`: wasmtime is pinned to
//! one version (`host/Cargo.toml`), and this follows its own lowering of
//! `[u8]` (`func/typed.rs`: `lower_list`, `lower_pointer_pair_to_*`).

use std::mem::MaybeUninit;

use wasmtime::ValRaw;
use wasmtime::component::__internal::{
    CanonicalAbiInfo, InstanceType, InterfaceType, LowerContext,
};
use wasmtime::component::{ComponentType, Lower};
use wharf_protocol::Masked;

/// A masked payload lowered as `list<u8>`.
#[derive(Debug)]
pub struct MaskedBytes<'a>(pub Masked<'a>);

impl MaskedBytes<'_> {
    /// Allocates the list in the plugin's memory with its `realloc` and
    /// writes the payload there, unmasked; returns where and how long.
    fn store<T>(&self, cx: &mut LowerContext<'_, T>) -> wasmtime::Result<(usize, usize)> {
        let len = self.0.len();
        let ptr = cx.realloc(0, 0, 1, len)?;
        let dst = cx
            .as_slice_mut()
            .get_mut(ptr..)
            .and_then(|rest| rest.get_mut(..len))
            .ok_or_else(|| wasmtime::format_err!("realloc return: beyond end of memory"))?;
        self.0.unmask_into(dst);
        Ok((ptr, len))
    }
}

// SAFETY: the same representation as `[u8]`'s (a pointer and a length),
// checked against the same interface type, and lowered below as wasmtime
// lowers `[u8]`.
unsafe impl ComponentType for MaskedBytes<'_> {
    type Lower = [ValRaw; 2];

    const ABI: CanonicalAbiInfo = <[u8] as ComponentType>::ABI;

    fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
        <[u8] as ComponentType>::typecheck(ty, types)
    }
}

// SAFETY: writes only within the allocation the plugin's `realloc` made
// for these bytes (bounds-checked above), and the pointer pair as
// `[u8]`'s lowering does: both halves as 64-bit values when flat, 32-bit
// in memory.
unsafe impl Lower for MaskedBytes<'_> {
    fn linear_lower_to_flat<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        dst: &mut MaybeUninit<[ValRaw; 2]>,
    ) -> wasmtime::Result<()> {
        let (ptr, len) = self.store(cx)?;
        dst.write([ValRaw::i64(ptr as i64), ValRaw::i64(len as i64)]);
        Ok(())
    }

    fn linear_lower_to_memory<T>(
        &self,
        cx: &mut LowerContext<'_, T>,
        _ty: InterfaceType,
        offset: usize,
    ) -> wasmtime::Result<()> {
        let (ptr, len) = self.store(cx)?;
        *cx.get::<4>(offset) = u32::try_from(ptr)?.to_le_bytes();
        *cx.get::<4>(offset + 4) = u32::try_from(len)?.to_le_bytes();
        Ok(())
    }
}
