//! `componentize`: the few steps of `wit-bindgen` and `wasm-tools` that the
//! C and Go echo handlers need, as one small binary.
//!
//! ```text
//! componentize c-bindings WIT_DIR WORLD OUT_DIR
//!     C bindings for WORLD (like `wit-bindgen c --autodrop-borrows yes
//!     --world WORLD --out-dir OUT_DIR`):
//!     <world>.h, <world>.c and <world>_component_type.o.
//! componentize new CORE.wasm OUT.wasm [--wit WIT_DIR WORLD] [--realloc-via-memory-grow]
//!     Turns a wasip1 core module (reactor) into a component, adapting its
//!     WASI preview1 imports with the reactor adapter (like `wasm-tools
//!     component new --adapt`). With --wit, first embeds WORLD's type
//!     information (like `wasm-tools component embed`), for modules that do
//!     not carry it already.
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};
use wit_bindgen_core::wit_parser::{Resolve, WorldId};
use wit_component::{ComponentEncoder, StringEncoding, embed_component_metadata};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("c-bindings") if args.len() == 4 => {
            c_bindings(Path::new(&args[1]), &args[2], Path::new(&args[3]))
        }
        Some("new") if args.len() >= 3 => {
            let (core, out) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
            let mut wit = None;
            let mut realloc_via_memory_grow = false;
            let mut rest = args[3..].iter();
            while let Some(arg) = rest.next() {
                match arg.as_str() {
                    "--wit" => {
                        let (Some(dir), Some(world)) = (rest.next(), rest.next()) else {
                            bail!("--wit needs WIT_DIR WORLD");
                        };
                        wit = Some((PathBuf::from(dir), world.clone()));
                    }
                    "--realloc-via-memory-grow" => realloc_via_memory_grow = true,
                    other => bail!("unknown option {other:?}"),
                }
            }
            new(&core, &out, wit, realloc_via_memory_grow)
        }
        _ => bail!(
            "usage:\n  componentize c-bindings WIT_DIR WORLD OUT_DIR\n  \
             componentize new CORE.wasm OUT.wasm [--wit WIT_DIR WORLD] [--realloc-via-memory-grow]"
        ),
    }
}

fn load_wit(dir: &Path, world: &str) -> Result<(Resolve, WorldId)> {
    let mut resolve = Resolve::default();
    let (pkg, _files) = resolve
        .push_path(dir)
        .with_context(|| format!("parsing WIT in {}", dir.display()))?;
    let world = resolve.select_world(&[pkg], Some(world))?;
    Ok((resolve, world))
}

fn c_bindings(wit: &Path, world: &str, out_dir: &Path) -> Result<()> {
    let (mut resolve, world) = load_wit(wit, world)?;
    let mut files = wit_bindgen_core::Files::default();
    // Like `wit-bindgen c --autodrop-borrows yes`: the generated export
    // wrappers drop the `borrow<connection>` handles after the handler
    // function returns (the canonical ABI requires every borrow lent to an
    // export call to be dropped before it returns).
    wit_bindgen_c::Opts {
        autodrop_borrows: wit_bindgen_c::Enabled::Yes,
        ..Default::default()
    }
    .build()
    .generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out_dir)?;
    for (name, contents) in files.iter() {
        let path = out_dir.join(name);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn new(
    core: &Path,
    out: &Path,
    wit: Option<(PathBuf, String)>,
    realloc_via_memory_grow: bool,
) -> Result<()> {
    let mut module = std::fs::read(core).with_context(|| format!("reading {}", core.display()))?;
    if let Some((dir, world)) = wit {
        let (resolve, world) = load_wit(&dir, &world)?;
        embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8, false)?;
    }
    let component = ComponentEncoder::default()
        .validate(true)
        .realloc_via_memory_grow(realloc_via_memory_grow)
        .module(&module)?
        .adapter(
            WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .encode()?;
    std::fs::write(out, component).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
