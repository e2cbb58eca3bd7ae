//! The per-instance sandbox limits: linear memory, tables, and CPU per call.

use std::time::Duration;

use wasmtime::ResourceLimiter;

use super::engine::{CORE_INSTANCES_PER_COMPONENT, MEMORIES_PER_COMPONENT, TABLES_PER_COMPONENT};

/// Which limit an instance ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Memory,
    Table,
    Cpu,
}

/// The error a limit raises inside wasm; it surfaces as the call's error.
#[derive(Debug, thiserror::Error)]
#[error("plugin exceeded its {what} limit ({limit})")]
pub struct LimitExceeded {
    pub what: &'static str,
    pub limit: String,
}

/// Linear memory and table caps for one store; records the first limit hit
/// so the host can say why an instance died.
#[derive(Debug)]
pub struct SandboxLimiter {
    memory: usize,
    table_elements: usize,
    pub hit: Option<LimitHit>,
}

impl SandboxLimiter {
    pub fn new(memory: usize, table_elements: usize) -> Self {
        Self {
            memory,
            table_elements,
            hit: None,
        }
    }
}

impl ResourceLimiter for SandboxLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = Some(LimitHit::Memory);
            // An error (not `Ok(false)`) traps at once: a guest allocator that
            // ignores a failed grow must not limp on.
            return Err(LimitExceeded {
                what: "memory",
                limit: format!("{} bytes", self.memory),
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = Some(LimitHit::Table);
            return Err(LimitExceeded {
                what: "table",
                limit: format!("{} elements", self.table_elements),
            }
            .into());
        }
        Ok(true)
    }

    // The pool's per-component caps, so both agree on what fits.
    fn instances(&self) -> usize {
        CORE_INSTANCES_PER_COMPONENT as usize
    }

    fn tables(&self) -> usize {
        TABLES_PER_COMPONENT as usize
    }

    fn memories(&self) -> usize {
        MEMORIES_PER_COMPONENT as usize
    }
}

/// The time one event call may take: `cpu` counts while the call runs
/// (wasm and the host calls it makes), checked every epoch tick; `wall`
/// counts everything, waits included.
#[derive(Debug, Clone, Copy)]
pub struct CpuBudget {
    pub cpu: Duration,
    pub wall: Duration,
}
