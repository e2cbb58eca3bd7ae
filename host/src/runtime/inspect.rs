//! What a plugin file is, read before anything is compiled: a first
//! compile of an interpreter component (componentize-js, componentize-py)
//! takes 15-20 s, so the mistakes that can be seen from its outline are
//! told at once, in words, and cost no compile and no cache entry:
//!
//! - not WebAssembly at all (a README, an `app.py`);
//! - a core module, not a component (built for `wasm32-wasip1` or
//!   `wasm32-unknown-unknown`, or not componentized);
//! - an import this host does not serve (`wasi:http/...`, a
//!   `wharf:websocket` of another minor version);
//! - no `wharf:websocket/handler` export (a command component, a library).
//!
//! Only the component's outermost sections are read (its nested modules
//! and components are skipped over), so this costs little even for a
//! 12 MB JavaScript component. Whether an import is served is asked of the
//! runtime's own [`Linker`], by wasmtime's semver rules (an import of
//! `wasi:io/streams@0.2.3` is served by WASI 0.2.12): its package must be
//! one this host serves, at a compatible version, and the linker must
//! define that interface. The exact types are checked after the compile,
//! by `instantiate_pre`, as before.

use std::collections::BTreeSet;

use wasmparser::{Chunk, Encoding, Parser, Payload};
use wasmtime::component::Linker;

use super::LoadError;

/// The WIT package (and version) a plugin's `wharf:websocket` imports and
/// its handler export are resolved against.
pub const WIT_PACKAGE: &str = env!("WHARF_WIT_PACKAGE");

/// Which packages this host serves, as an error message lists them.
pub fn served() -> String {
    let minor = WIT_PACKAGE
        .rsplit_once('@')
        .and_then(|(_, v)| v.rsplit_once('.'))
        .map_or("0.1", |(minor, _)| minor);
    format!(
        "{WIT_PACKAGE} (imports of any {minor}.x link to it) and wasi:cli, wasi:clocks, \
         wasi:filesystem, wasi:io, wasi:random and wasi:sockets @0.2.x (WASI 0.2, \
         as wasmtime {} serves it); nothing else, e.g. no wasi:http",
        env!("WHARF_WASMTIME_VERSION")
    )
}

/// The outline of a component: its outermost imports and exports.
#[derive(Debug, Default)]
pub struct Outline {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

/// What the first bytes of a file say it is.
#[derive(Debug)]
pub enum Kind {
    NotWasm,
    CoreModule,
    /// A component, with its outline; `None` if its outermost sections do
    /// not parse (the compile then says what is wrong).
    Component(Option<Outline>),
}

/// Reads `bytes`' kind and, for a component, its outline.
pub fn read(bytes: &[u8]) -> Kind {
    if !bytes.starts_with(b"\0asm") {
        return Kind::NotWasm;
    }
    match outline(bytes) {
        Ok(Some(outline)) => Kind::Component(Some(outline)),
        Ok(None) => Kind::CoreModule,
        Err(_) => Kind::Component(None),
    }
}

/// The outermost imports and exports of a component; `None` for a core
/// module.
fn outline(bytes: &[u8]) -> wasmparser::Result<Option<Outline>> {
    let mut parser = Parser::new(0);
    let mut at = 0;
    let mut outline = Outline::default();
    loop {
        let (payload, consumed) = match parser.parse(&bytes[at..], true)? {
            Chunk::Parsed { payload, consumed } => (payload, consumed),
            // With `eof` set the parser errs rather than asks for more.
            Chunk::NeedMoreData(_) => return Ok(Some(outline)),
        };
        at += consumed;
        match payload {
            Payload::Version {
                encoding: Encoding::Module,
                ..
            } => return Ok(None),
            Payload::ComponentImportSection(reader) => {
                for import in reader {
                    outline.imports.push(import?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader {
                    outline.exports.push(export?.name.name.to_owned());
                }
            }
            // A nested module or component: its bytes follow, and the
            // parser already counts them as read.
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => {
                at = unchecked_range.end.min(bytes.len());
            }
            Payload::End(_) => return Ok(Some(outline)),
            _ => {}
        }
    }
}

/// Refuses what can be seen to be wrong with plugin `name` before it is
/// compiled (see the module's documentation).
pub fn check<T: 'static>(linker: &Linker<T>, name: &str, bytes: &[u8]) -> Result<(), LoadError> {
    let outline = match read(bytes) {
        Kind::NotWasm => return Err(LoadError::NotWasm { name: name.into() }),
        Kind::CoreModule => return Err(LoadError::CoreModule { name: name.into() }),
        Kind::Component(None) => return Ok(()),
        Kind::Component(Some(outline)) => outline,
    };
    let missing = missing_imports(linker, &outline.imports);
    if !missing.is_empty() {
        return Err(LoadError::MissingImports {
            name: name.into(),
            missing,
        });
    }
    let handler = WIT_PACKAGE
        .split_once('@')
        .map_or(WIT_PACKAGE, |(package, _)| package)
        .to_owned()
        + "/handler";
    let exports_handler = outline.exports.iter().any(|export| {
        export == &handler
            || export
                .strip_prefix(handler.as_str())
                .is_some_and(|rest| rest.starts_with('@'))
    });
    if !exports_handler {
        return Err(LoadError::NoHandler {
            name: name.into(),
            exports: outline.exports,
        });
    }
    Ok(())
}

/// The WASI 0.2 release wasmtime-wasi defines its interfaces with.
const WASI_VERSION: &str = "0.2.12";

/// The packages this host serves, each with the exact version its
/// interfaces are defined with in the runtime's linker.
fn served_packages() -> [(&'static str, &'static str); 7] {
    let (wharf, version) = WIT_PACKAGE.split_once('@').unwrap_or((WIT_PACKAGE, ""));
    [
        (wharf, version),
        ("wasi:cli", WASI_VERSION),
        ("wasi:clocks", WASI_VERSION),
        ("wasi:filesystem", WASI_VERSION),
        ("wasi:io", WASI_VERSION),
        ("wasi:random", WASI_VERSION),
        ("wasi:sockets", WASI_VERSION),
    ]
}

/// The imports in `names` that `linker` does not define.
fn missing_imports<T: 'static>(linker: &Linker<T>, names: &[String]) -> Vec<String> {
    let names: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    names
        .into_iter()
        .filter(|name| !serves(linker, name))
        .map(str::to_owned)
        .collect()
}

/// Whether `linker` serves an import named `name`, by wasmtime's rules: an
/// exact name, or the same interface at a semver-compatible version
/// (`0.2.3` and `0.2.12`, `1.2.0` and `1.5.1`; not `0.1.x` and `0.2.y`).
fn serves<T: 'static>(linker: &Linker<T>, name: &str) -> bool {
    let Some((path, version)) = name.split_once('@') else {
        // The linker defines only versioned interfaces.
        return false;
    };
    let Some((package, _interface)) = path.split_once('/') else {
        return false;
    };
    served_packages()
        .iter()
        .find(|(served, _)| *served == package)
        .is_some_and(|(_, served)| {
            compatible(version, served) && defines(linker, &format!("{path}@{served}"))
        })
}

/// Whether `linker` defines exactly `name`. A [`Linker`] cannot be asked
/// (it lists nothing), but refuses to define a name twice: a copy of it is
/// given a function of that name, and refusing it means it has one.
fn defines<T: 'static>(linker: &Linker<T>, name: &str) -> bool {
    let mut copy = linker.clone();
    copy.root()
        .func_wrap(name, |_: wasmtime::StoreContextMut<'_, T>, (): ()| Ok(()))
        .is_err()
}

/// wasmtime's semver compatibility of versions `a` and `b`: the same
/// major if it is not 0, else the same minor if that is not 0, else equal;
/// a pre-release only equal.
fn compatible(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64, bool)> {
        let v = v.split('+').next()?;
        let (v, pre) = match v.split_once('-') {
            Some((v, _)) => (v, true),
            None => (v, false),
        };
        let mut parts = v.split('.').map(|p| p.parse::<u64>().ok());
        let version = (parts.next()??, parts.next()??, parts.next()??, pre);
        parts.next().is_none().then_some(version)
    };
    match (parse(a), parse(b)) {
        (Some(a), Some(b)) if a.3 || b.3 => a == b,
        (Some((0, 0, a, _)), Some((0, 0, b, _))) => a == b,
        (Some((0, a, _, _)), Some((0, b, _, _))) => a == b,
        (Some((a, _, _, _)), Some((b, _, _, _))) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::connection_host::SendLimits;
    use crate::runtime::limits::CpuBudget;
    use crate::runtime::{InstanceLimits, Runtime, RuntimeConfig};

    fn runtime() -> Runtime {
        Runtime::new(RuntimeConfig {
            max_instances: 2,
            limits: InstanceLimits {
                memory: 16 << 20,
                cpu: CpuBudget {
                    cpu: std::time::Duration::from_millis(100),
                    wall: std::time::Duration::from_secs(1),
                },
                send: SendLimits {
                    max_message_size: 1 << 20,
                    send_queue: 1 << 20,
                    fragment_size: None,
                },
            },
            cache_dir: None,
            concurrency_support: false,
            memory_reset: crate::runtime::engine::MemoryReset::Decommit { keep_resident: 0 },
            wide_slots: false,
        })
        .unwrap()
    }

    fn wat(text: &str) -> Vec<u8> {
        wat::parse_str(text).unwrap()
    }

    #[test]
    fn tells_the_kinds_apart() {
        assert!(matches!(read(b"# README\n"), Kind::NotWasm));
        assert!(matches!(read(&wat("(module)")), Kind::CoreModule));
        assert!(matches!(
            read(b"\0asm\x0d\x00\x01\x00\xff"),
            Kind::Component(None)
        ));
        let Kind::Component(Some(outline)) = read(crate::bundled::ECHO) else {
            panic!("echo is a component");
        };
        assert!(
            outline
                .exports
                .iter()
                .any(|e| e.starts_with("wharf:websocket/handler@")),
            "{outline:?}"
        );
        assert!(
            outline
                .imports
                .iter()
                .any(|i| i.starts_with("wharf:websocket/connection@")),
            "{outline:?}"
        );
    }

    #[test]
    fn nested_modules_imports_are_not_the_components() {
        let bytes = wat(r#"(component
            (core module (import "wasi:http/types@0.2.0" "f" (func)))
            (component (import "wasi:http/types@0.2.0" (instance)))
            (import "wasi:io/error@0.2.0" (instance))
        )"#);
        let Kind::Component(Some(outline)) = read(&bytes) else {
            panic!()
        };
        assert_eq!(outline.imports, ["wasi:io/error@0.2.0"]);
    }

    #[test]
    fn compatible_is_wasmtimes_semver() {
        assert!(compatible("0.2.3", "0.2.12"));
        assert!(compatible("0.2.0+abc", "0.2.12"));
        assert!(!compatible("0.3.0", "0.2.12"));
        assert!(!compatible("0.1.4", "0.2.0"));
        assert!(compatible("1.2.0", "1.5.1"));
        assert!(!compatible("2.0.0", "1.5.1"));
        assert!(compatible("0.0.1", "0.0.1"));
        assert!(!compatible("0.0.1", "0.0.2"));
        assert!(!compatible("0.2.0-rc1", "0.2.0"));
        assert!(!compatible("0.2", "0.2.0"));
    }

    /// Every served package is at the version the linker defines it with
    /// (a wasmtime upgrade that moves WASI fails here first).
    #[test]
    fn served_packages_are_defined_at_their_versions() {
        let rt = runtime();
        let (wharf, version) = WIT_PACKAGE.split_once('@').unwrap();
        for name in [
            format!("{wharf}/connection@{version}"),
            format!("{wharf}/pubsub@{version}"),
            format!("wasi:cli/environment@{WASI_VERSION}"),
            format!("wasi:clocks/monotonic-clock@{WASI_VERSION}"),
            format!("wasi:filesystem/types@{WASI_VERSION}"),
            format!("wasi:io/streams@{WASI_VERSION}"),
            format!("wasi:random/random@{WASI_VERSION}"),
            format!("wasi:sockets/tcp@{WASI_VERSION}"),
        ] {
            assert!(defines(&rt.linker, &name), "{name}");
        }
        assert!(!defines(&rt.linker, "wasi:io/streams@0.2.0"));
        assert!(!defines(&rt.linker, "wasi:http/types@0.2.12"));
    }

    /// The list [`served`] prints is what the linker serves, semver rules
    /// included, and what it says is not served is not.
    #[test]
    fn served_is_what_the_linker_serves() {
        let rt = runtime();
        let wharf = WIT_PACKAGE.split_once('@').unwrap();
        let (major_minor, _) = wharf.1.rsplit_once('.').unwrap();
        let names = [
            format!("{}/connection@{}", wharf.0, wharf.1),
            format!("{}/pubsub@{major_minor}.0", wharf.0),
            "wasi:cli/environment@0.2.0".into(),
            "wasi:clocks/monotonic-clock@0.2.3".into(),
            "wasi:filesystem/types@0.2.0".into(),
            "wasi:io/streams@0.2.6".into(),
            "wasi:random/random@0.2.0".into(),
            "wasi:sockets/tcp@0.2.0".into(),
        ];
        let served_text = served();
        for name in &names {
            let package = name.split('/').next().unwrap();
            assert!(served_text.contains(package), "{package} in {served_text}");
        }
        assert!(missing_imports(&rt.linker, &names).is_empty());
        let unserved = [
            "wasi:http/types@0.2.0".to_owned(),
            format!("{}/connection@0.99.0", wharf.0),
            "wasi:io/streams@0.3.0".into(),
            "wasi:io/nonesuch@0.2.0".into(),
            "wasi:io/streams".into(),
            "log".into(),
        ];
        let all: Vec<String> = names.iter().chain(&unserved).cloned().collect();
        let mut missing = missing_imports(&rt.linker, &all);
        missing.sort();
        let mut expected = unserved.to_vec();
        expected.sort();
        assert_eq!(missing, expected);
    }

    #[test]
    fn check_refuses_each_kind_with_its_own_error() {
        let rt = runtime();
        let check = |bytes: &[u8]| check(&rt.linker, "p", bytes);
        assert!(matches!(check(b"hello"), Err(LoadError::NotWasm { .. })));
        assert!(matches!(
            check(&wat("(module)")),
            Err(LoadError::CoreModule { .. })
        ));
        let err = check(&wat(
            r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#,
        ))
        .unwrap_err();
        let LoadError::MissingImports { missing, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(missing, &["wasi:http/outgoing-handler@0.2.0"]);
        let text = err.to_string();
        assert!(text.contains(WIT_PACKAGE), "{text}");
        assert!(
            matches!(check(&wat("(component)")), Err(LoadError::NoHandler { .. })),
            "a component without the handler export"
        );
        assert!(check(crate::bundled::ECHO).is_ok());
    }
}
