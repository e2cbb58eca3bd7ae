//! `wizer IN.wasm OUT.wasm`: pre-initializes a core Wasm module with
//! Wasmtime's Wizer. The module's `_initialize` (a WASI reactor's
//! constructors) and its `wizer-initialize` export run once here, with WASI
//! preview 1 (stderr only) and every other import a trap; the memory and
//! globals they leave become the output module's initial state, and both
//! exports are removed from it.

use wasmtime::error::Context as _;
use wasmtime::{Engine, Linker, Result, Store, bail};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::{self, WasiP1Ctx};
use wasmtime_wizer::Wizer;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        bail!("usage: wizer IN.wasm OUT.wasm");
    };
    let wasm = std::fs::read(input).with_context(|| format!("read {input}"))?;
    let engine = Engine::default();
    let wasi = WasiCtxBuilder::new().inherit_stderr().build_p1();
    let mut store = Store::new(&engine, wasi);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let initialized = runtime.block_on(Wizer::new().run(
        &mut store,
        &wasm,
        async |store: &mut Store<WasiP1Ctx>, module| {
            let mut linker = Linker::new(store.engine());
            p1::add_to_linker_async(&mut linker, |t| t)?;
            linker.define_unknown_imports_as_traps(module)?;
            linker.instantiate_async(store, module).await
        },
    ))?;
    std::fs::write(output, initialized).with_context(|| format!("write {output}"))?;
    Ok(())
}
