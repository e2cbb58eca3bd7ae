//! `wharf new`: scaffolds a self-contained plugin project.
//!
//! `wharf new <language> <name> [--dir PATH]` writes an echo handler
//! equivalent to the repository's tested example for that language, a copy
//! of the WIT contract, a build command and a README. Everything is embedded
//! in the binary at compile time, from the sources the tests build:
//!
//! - the WIT is `wit/websocket.wit` itself, so a scaffold always targets the
//!   contract of the host that wrote it;
//! - handler sources and `build.sh` scripts are the examples in `plugins/`
//!   (`echo`, `python-echo`, `js-echo`, `c-echo`, `go-echo`) with their
//!   repository paths and names substituted. Every substitution must apply
//!   (the unit tests generate every language), so an example that changes in
//!   a way the scaffold does not expect fails the tests instead of drifting;
//! - the C, Go and JavaScript projects carry the source of
//!   `tools/componentize`, which their `build.sh` builds with cargo as the
//!   examples do; the JavaScript one also carries `tools/quickjs/wharf_js.c`
//!   (the QuickJS runtime), `tools/wizer` and `tools/quickjs/build.sh` as
//!   its `build.sh`;
//! - only what has no example to copy (the Rust `Cargo.toml`, the READMEs)
//!   is a template under `host/templates/`.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The contract every plugin implements: the scaffold's `wit/websocket.wit`.
pub const WIT: &str = include_str!("../../wit/websocket.wit");

/// Where toolchains go when `WHARF_TOOLCHAINS` is not set (a scaffolded
/// `build.sh` installs into `${WHARF_TOOLCHAINS:-$HOME/.cache/wharf/toolchains}`).
pub const DEFAULT_TOOLCHAINS: &str = "$HOME/.cache/wharf/toolchains";

/// A handler language `wharf new` can scaffold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Language {
    Rust,
    Python,
    #[value(alias = "js")]
    Javascript,
    C,
    Go,
}

impl Language {
    pub const ALL: [Language; 5] = [
        Language::Rust,
        Language::Python,
        Language::Javascript,
        Language::C,
        Language::Go,
    ];

    /// "Rust", "Python", "JavaScript", "C", "Go".
    pub fn title(self) -> &'static str {
        match self {
            Language::Rust => "Rust",
            Language::Python => "Python",
            Language::Javascript => "JavaScript",
            Language::C => "C",
            Language::Go => "Go",
        }
    }

    /// The command that builds a scaffolded project, run in its directory.
    pub fn build_command(self) -> &'static str {
        match self {
            Language::Rust => "cargo build --release --target wasm32-wasip2",
            _ => "./build.sh",
        }
    }

    /// The component the build command writes, relative to the project
    /// directory (for Rust: unless `CARGO_TARGET_DIR` moves `target/`).
    pub fn wasm_path(self, name: &str) -> PathBuf {
        let file = format!("{}.wasm", file_stem(name));
        match self {
            Language::Rust => Path::new("target/wasm32-wasip2/release").join(file),
            _ => Path::new("target").join(file),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// `wharf new` arguments.
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// Language of the handler: rust, python, javascript (or js), c or go.
    #[arg(value_enum, ignore_case = true)]
    pub language: Language,
    /// Name of the plugin: lowercase letters, digits, '-' and '_', starting
    /// with a letter (a valid Cargo package name). The component is
    /// NAME.wasm, with '-' turned into '_'.
    pub name: String,
    /// Directory to create (default: ./NAME). Must not exist or be empty.
    #[arg(short, long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
}

/// Runs `wharf new`: writes the project and prints how to build and run it.
pub fn run(args: &NewArgs) -> anyhow::Result<()> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    create(args.language, &args.name, &dir)?;
    println!(
        "created {} plugin {:?} in {}",
        args.language,
        args.name,
        dir.display()
    );
    // Each line runs as written, one after the other: the paths after `cd`
    // are the project's own.
    println!("next:");
    println!("  cd {}", dir.display());
    println!("  {}", args.language.build_command());
    println!(
        "  {} serve --plugin {}",
        wharf_command(),
        args.language.wasm_path(&args.name).display()
    );
    println!("(see {} for more)", dir.join("README.md").display());
    Ok(())
}

/// How to run this binary again: `wharf` if that is what `PATH` finds,
/// else its own path (run through `cargo run` or from `target/release`,
/// `wharf` alone would be "command not found" or another version).
fn wharf_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "wharf".to_owned();
    };
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .filter_map(|dir| dir.join("wharf").canonicalize().ok())
            .next()
            .is_some_and(|found| found == me)
    });
    if on_path {
        "wharf".to_owned()
    } else {
        me.display().to_string()
    }
}

/// One file of a scaffold.
#[derive(Clone, Debug)]
pub struct File {
    /// Relative to the project directory, `/`-separated.
    pub path: &'static str,
    pub contents: String,
    /// A script to mark executable.
    pub executable: bool,
}

/// Writes the project for `language` named `name` into `dir`, which must not
/// exist or be an empty directory. Returns the files written.
pub fn create(language: Language, name: &str, dir: &Path) -> anyhow::Result<Vec<File>> {
    let files = files(language, name)?;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "refusing to overwrite {}: the directory is not empty",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if dir.exists() => {
            bail!("cannot use {} for the project: {e}", dir.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    for file in &files {
        let path = dir.join(file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // create_new: never clobber a file that appeared meanwhile.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, file.contents.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        if file.executable {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
    }
    Ok(files)
}

// ---------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------

/// Checks that `name` can name the plugin in every language: a Cargo
/// package name that is also a file name, a Go module path and (with '-'
/// turned into '_') a Rust crate name.
pub fn validate_name(name: &str) -> anyhow::Result<()> {
    const KEYWORDS: &[&str] = &[
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
        "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
        "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
        "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
        "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    ];
    // Cargo refuses these: the standard library's crates, and the names of
    // its own output directories.
    const RESERVED: &[&str] = &[
        "std",
        "core",
        "alloc",
        "proc_macro",
        "test",
        "deps",
        "examples",
        "build",
        "incremental",
    ];
    let Some(first) = name.chars().next() else {
        bail!("the plugin name is empty");
    };
    if name.len() > 64 {
        bail!("invalid plugin name {name:?}: longer than 64 characters");
    }
    if !first.is_ascii_lowercase() {
        bail!("invalid plugin name {name:?}: it must start with a lowercase ASCII letter");
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'))
    {
        bail!(
            "invalid plugin name {name:?}: {c:?} is not allowed \
             (use lowercase ASCII letters, digits, '-' and '_')"
        );
    }
    let ident = file_stem(name);
    if KEYWORDS.contains(&ident.as_str()) || RESERVED.contains(&ident.as_str()) {
        bail!("invalid plugin name {name:?}: reserved by Rust or Cargo");
    }
    Ok(())
}

/// The component's file stem: the name with '-' turned into '_' (as Cargo
/// names a cdylib).
pub fn file_stem(name: &str) -> String {
    name.replace('-', "_")
}

// ---------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------

/// Sources embedded from the repository.
mod src {
    pub const RUST_LIB: &str = include_str!("../../plugins/echo/src/lib.rs");
    pub const PLUGINS_CARGO_TOML: &str = include_str!("../../plugins/Cargo.toml");
    pub const PLUGINS_CARGO_LOCK: &str = include_str!("../../plugins/Cargo.lock");

    pub const PYTHON_APP: &str = include_str!("../../plugins/python-echo/app.py");
    pub const PYTHON_BUILD: &str = include_str!("../../plugins/python-echo/build.sh");

    pub const JS_ECHO: &str = include_str!("../../plugins/js-echo/echo.js");
    pub const QUICKJS_BUILD: &str = include_str!("../../tools/quickjs/build.sh");
    pub const QUICKJS_RUNTIME: &str = include_str!("../../tools/quickjs/wharf_js.c");
    pub const WIZER_CARGO_TOML: &str = include_str!("../../tools/wizer/Cargo.toml");
    pub const WIZER_CARGO_LOCK: &str = include_str!("../../tools/wizer/Cargo.lock");
    pub const WIZER_MAIN: &str = include_str!("../../tools/wizer/src/main.rs");

    pub const C_ECHO: &str = include_str!("../../plugins/c-echo/echo.c");
    pub const C_BUILD: &str = include_str!("../../plugins/c-echo/build.sh");

    pub const GO_ECHO: &str = include_str!("../../plugins/go-echo/echo.go");
    pub const GO_BINDINGS: &str = include_str!("../../plugins/go-echo/bindings.go");
    pub const GO_MOD: &str = include_str!("../../plugins/go-echo/go.mod");
    pub const GO_BUILD: &str = include_str!("../../plugins/go-echo/build.sh");

    pub const COMPONENTIZE_CARGO_TOML: &str = include_str!("../../tools/componentize/Cargo.toml");
    pub const COMPONENTIZE_CARGO_LOCK: &str = include_str!("../../tools/componentize/Cargo.lock");
    pub const COMPONENTIZE_MAIN: &str = include_str!("../../tools/componentize/src/main.rs");

    pub const RUST_CARGO_TOML: &str = include_str!("../templates/rust/Cargo.toml");
    pub const README_RUST: &str = include_str!("../templates/rust/README.md");
    pub const README_PYTHON: &str = include_str!("../templates/python/README.md");
    pub const README_JS: &str = include_str!("../templates/javascript/README.md");
    pub const README_C: &str = include_str!("../templates/c/README.md");
    pub const README_GO: &str = include_str!("../templates/go/README.md");
}

/// Applies `edits` (each `(from, to)`, all occurrences) to `source`; every
/// `from` must occur. A panic here means an example in `plugins/` changed in
/// a way the scaffold does not know: the unit tests catch it.
fn edit(what: &str, source: &str, edits: &[(&str, &str)]) -> String {
    let mut text = source.to_owned();
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "scaffold out of step with the repository: {what} no longer contains {from:?}"
        );
        text = text.replace(from, to);
    }
    text
}

/// Fills a `host/templates/` file's `{{key}}` placeholders (a template need
/// not use them all, but none may be left).
fn fill(what: &str, template: &str, values: &[(&str, &str)]) -> String {
    let mut text = template.to_owned();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    assert!(!text.contains("{{"), "{what}: unfilled placeholder");
    text
}

/// The example's `build.sh`, made standalone: the WIT and the sources come
/// from the project directory, output goes to `target/` unless an OUT_DIR is
/// given, and toolchains to `$WHARF_TOOLCHAINS` (default
/// `$HOME/.cache/wharf/toolchains`) instead of the repository's `target/`.
/// The pinned toolchain versions are the example's.
fn build_sh(
    language: Language,
    example_dir: &str,
    example_file: &str,
    name: &str,
    source: &str,
    extra: &[(&str, &str)],
) -> String {
    let file = file_stem(name);
    let header_from = format!(
        "# Builds the {language} echo handler into OUT_DIR/{example_file}.wasm.\n\
         #\n#   plugins/{example_dir}/build.sh OUT_DIR\n"
    );
    let header_to = format!(
        "# Builds the {language} Wharf plugin {name} into target/{file}.wasm\n\
         # (generated by `wharf new` from the Wharf repository's plugins/{example_dir}).\n\
         #\n#   ./build.sh [OUT_DIR]      # writes OUT_DIR/{file}.wasm (default: target/)\n"
    );
    let example_wasm = format!("{example_file}.wasm");
    let wasm = format!("{file}.wasm");
    let mut edits: Vec<(&str, &str)> = vec![
        (&header_from, &header_to),
        ("repo=\"$(cd \"$here/../..\" && pwd)\"\n", ""),
        (
            "out=\"${1:?usage: build.sh OUT_DIR}\"",
            "out=\"${1:-$here/target}\"",
        ),
        (
            "${WHARF_TOOLCHAINS:-$repo/target/toolchains}",
            "${WHARF_TOOLCHAINS:-$HOME/.cache/wharf/toolchains}",
        ),
        ("<repo>/target/toolchains", DEFAULT_TOOLCHAINS),
        ("\"$repo/wit\"", "\"$here/wit\""),
        (&example_wasm, &wasm),
    ];
    edits.extend_from_slice(extra);
    let text = edit(&format!("plugins/{example_dir}/build.sh"), source, &edits);
    assert!(
        !text.contains("$repo") && !text.contains("<repo>"),
        "plugins/{example_dir}/build.sh: a repository path is left in the scaffold"
    );
    text
}

/// `tools/quickjs/build.sh` (the JavaScript runtime's build, which takes a
/// handler and an output path) made the project's `build.sh`: the handler is
/// `handler.js`, the runtime's source is under `tools/quickjs/`, output and
/// toolchains go where the other scaffolds' do.
fn quickjs_build_sh(name: &str) -> String {
    let file = file_stem(name);
    let header = format!(
        "# Builds the JavaScript Wharf plugin {name} (handler.js) into\n\
         # target/{file}.wasm, on QuickJS (quickjs-ng) bridged to the WIT by\n\
         # tools/quickjs/wharf_js.c (generated by `wharf new` from the Wharf\n\
         # repository's tools/quickjs).\n\
         #\n#   ./build.sh [OUT_DIR]      # writes OUT_DIR/{file}.wasm (default: target/)\n"
    );
    let out = format!("js=\"$here/handler.js\"\nout=\"${{1:-$here/target}}/{file}.wasm\"\n");
    let text = edit(
        "tools/quickjs/build.sh",
        src::QUICKJS_BUILD,
        &[
            (
                "# Builds a JavaScript handler (one ES module) into a Wharf component running\n\
                 # on QuickJS (quickjs-ng), bridged to the WIT by wharf_js.c.\n\
                 #\n#   tools/quickjs/build.sh HANDLER.js OUT.wasm\n",
                &header,
            ),
            ("repo=\"$(cd \"$here/../..\" && pwd)\"\n", ""),
            (
                "js=\"${1:?usage: build.sh HANDLER.js OUT.wasm}\"\n\
                 out=\"${2:?usage: build.sh HANDLER.js OUT.wasm}\"\n",
                &out,
            ),
            (
                "${WHARF_TOOLCHAINS:-$repo/target/toolchains}",
                "${WHARF_TOOLCHAINS:-$HOME/.cache/wharf/toolchains}",
            ),
            ("<repo>/target/toolchains", DEFAULT_TOOLCHAINS),
            (
                "\"$repo/tools/$1/Cargo.toml\"",
                "\"$here/tools/$1/Cargo.toml\"",
            ),
            ("\"$repo/wit\"", "\"$here/wit\""),
            ("\"$here/wharf_js.c\"", "\"$here/tools/quickjs/wharf_js.c\""),
        ],
    );
    assert!(
        !text.contains("$repo") && !text.contains("<repo>"),
        "tools/quickjs/build.sh: a repository path is left in the scaffold"
    );
    text
}

/// The source of `tools/componentize`, for the C, Go and JavaScript projects.
fn componentize_files() -> Vec<File> {
    vec![
        file(
            "tools/componentize/Cargo.toml",
            edit(
                "tools/componentize/Cargo.toml",
                src::COMPONENTIZE_CARGO_TOML,
                &[(
                    "used by plugins/c-echo/build.sh, plugins/go-echo/build.sh and\n\
                     # tools/quickjs/build.sh",
                    "used by build.sh (copied from the Wharf repository)",
                )],
            ),
        ),
        file(
            "tools/componentize/Cargo.lock",
            src::COMPONENTIZE_CARGO_LOCK.into(),
        ),
        file(
            "tools/componentize/src/main.rs",
            src::COMPONENTIZE_MAIN.into(),
        ),
    ]
}

fn file(path: &'static str, contents: String) -> File {
    File {
        path,
        contents,
        executable: false,
    }
}

fn script(path: &'static str, contents: String) -> File {
    File {
        path,
        contents,
        executable: true,
    }
}

/// The WIT path the examples use, relative to their source.
const EXAMPLE_WIT: &str = "../../wit";

/// Every file of the project for `language` named `name`.
pub fn files(language: Language, name: &str) -> anyhow::Result<Vec<File>> {
    validate_name(name)?;
    let stem = file_stem(name);
    let wasm = language.wasm_path(name).display().to_string();
    let readme_values = [("name", name), ("wasm", wasm.as_str()), ("file", &stem)];
    let mut files = vec![
        file("wit/websocket.wit", WIT.into()),
        file(".gitignore", "/target/\n".into()),
    ];
    match language {
        Language::Rust => {
            let wit_bindgen = src::PLUGINS_CARGO_TOML
                .lines()
                .find(|l| l.starts_with("wit-bindgen ="))
                .expect("plugins/Cargo.toml pins wit-bindgen");
            let profile = src::PLUGINS_CARGO_TOML
                .find("[profile.release]")
                .map(|at| src::PLUGINS_CARGO_TOML[at..].trim_end())
                .expect("plugins/Cargo.toml has a release profile");
            files.push(file(
                "Cargo.toml",
                fill(
                    "host/templates/rust/Cargo.toml",
                    src::RUST_CARGO_TOML,
                    &[
                        ("name", name),
                        ("wit-bindgen", wit_bindgen),
                        ("profile", profile),
                    ],
                ),
            ));
            // The examples' lock file: the same wit-bindgen release as the
            // tested examples (Cargo drops the entries this crate does not use).
            files.push(file("Cargo.lock", src::PLUGINS_CARGO_LOCK.into()));
            files.push(file(
                "src/lib.rs",
                edit(
                    "plugins/echo/src/lib.rs",
                    src::RUST_LIB,
                    &[(EXAMPLE_WIT, "wit")],
                ),
            ));
            files.push(file(
                "README.md",
                fill(
                    "host/templates/rust/README.md",
                    src::README_RUST,
                    &readme_values,
                ),
            ));
        }
        Language::Python => {
            files.push(file(
                "app.py",
                edit(
                    "plugins/python-echo/app.py",
                    src::PYTHON_APP,
                    &[(EXAMPLE_WIT, "wit")],
                ),
            ));
            files.push(script(
                "build.sh",
                build_sh(
                    language,
                    "python-echo",
                    "python_echo",
                    name,
                    src::PYTHON_BUILD,
                    &[],
                ),
            ));
            files.push(file(
                "README.md",
                fill(
                    "host/templates/python/README.md",
                    src::README_PYTHON,
                    &readme_values,
                ),
            ));
        }
        Language::Javascript => {
            files.push(file("handler.js", src::JS_ECHO.into()));
            files.push(script("build.sh", quickjs_build_sh(name)));
            files.push(file(
                "tools/quickjs/wharf_js.c",
                src::QUICKJS_RUNTIME.into(),
            ));
            files.extend(componentize_files());
            files.push(file(
                "tools/wizer/Cargo.toml",
                edit(
                    "tools/wizer/Cargo.toml",
                    src::WIZER_CARGO_TOML,
                    &[("Used by tools/quickjs/build.sh", "Used by build.sh")],
                ),
            ));
            files.push(file("tools/wizer/Cargo.lock", src::WIZER_CARGO_LOCK.into()));
            files.push(file("tools/wizer/src/main.rs", src::WIZER_MAIN.into()));
            files.push(file(
                "README.md",
                fill(
                    "host/templates/javascript/README.md",
                    src::README_JS,
                    &readme_values,
                ),
            ));
        }
        Language::C => {
            files.push(file(
                "handler.c",
                edit(
                    "plugins/c-echo/echo.c",
                    src::C_ECHO,
                    &[(EXAMPLE_WIT, "wit")],
                ),
            ));
            files.push(script(
                "build.sh",
                build_sh(
                    language,
                    "c-echo",
                    "c_echo",
                    name,
                    src::C_BUILD,
                    &[
                        ("\"$here/echo.c\"", "\"$here/handler.c\""),
                        (
                            "\"$repo/tools/componentize/Cargo.toml\"",
                            "\"$here/tools/componentize/Cargo.toml\"",
                        ),
                    ],
                ),
            ));
            files.extend(componentize_files());
            files.push(file(
                "README.md",
                fill("host/templates/c/README.md", src::README_C, &readme_values),
            ));
        }
        Language::Go => {
            files.push(file("handler.go", src::GO_ECHO.into()));
            files.push(file("bindings.go", src::GO_BINDINGS.into()));
            files.push(file(
                "go.mod",
                edit(
                    "plugins/go-echo/go.mod",
                    src::GO_MOD,
                    &[("module wharf.example/go-echo", &format!("module {name}"))],
                ),
            ));
            files.push(script(
                "build.sh",
                build_sh(
                    language,
                    "go-echo",
                    "go_echo",
                    name,
                    src::GO_BUILD,
                    &[(
                        "\"$repo/tools/componentize/Cargo.toml\"",
                        "\"$here/tools/componentize/Cargo.toml\"",
                    )],
                ),
            ));
            files.extend(componentize_files());
            files.push(file(
                "README.md",
                fill(
                    "host/templates/go/README.md",
                    src::README_GO,
                    &readme_values,
                ),
            ));
        }
    }
    Ok(files)
}

/// The WIT package version: `X.Y.Z` of `wit/websocket.wit`'s
/// `package wharf:websocket@X.Y.Z;`.
pub fn wit_version() -> &'static str {
    WIT.lines()
        .find_map(|l| l.strip_prefix("package wharf:websocket@"))
        .and_then(|v| v.strip_suffix(';'))
        .expect("wit/websocket.wit declares package wharf:websocket@VERSION")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["echo", "my-plugin", "my_plugin2", "a", "chat-v2_x"] {
            validate_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("", "empty"),
            ("My-Plugin", "lowercase"),
            ("2fast", "start with"),
            ("-x", "start with"),
            ("_x", "start with"),
            ("my plugin", "' '"),
            ("my.plugin", "'.'"),
            ("../evil", "start with"),
            ("a/b", "'/'"),
            ("café", "'é'"),
            ("fn", "reserved"),
            ("self", "reserved"),
            ("test", "reserved"),
            ("std", "reserved"),
            ("proc-macro", "reserved"),
            ("build", "reserved"),
        ] {
            let err = validate_name(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        validate_name(&"x".repeat(64)).unwrap();
        assert!(validate_name(&"x".repeat(65)).is_err());
        assert!(files(Language::Rust, "Bad").is_err());
    }

    #[test]
    fn every_language_generates() {
        for lang in Language::ALL {
            let files = files(lang, "my-plugin").unwrap();
            let get = |path: &str| {
                files
                    .iter()
                    .find(|f| f.path == path)
                    .unwrap_or_else(|| panic!("{lang}: no {path}"))
            };
            assert_eq!(get("wit/websocket.wit").contents, WIT);
            let readme = &get("README.md").contents;
            let wasm = lang.wasm_path("my-plugin").display().to_string();
            assert!(wasm.ends_with("my_plugin.wasm"));
            assert!(
                readme.contains(&format!("wharf serve --plugin {wasm}")),
                "{lang}: README does not say how to run"
            );
            assert!(
                readme.contains(lang.build_command()),
                "{lang}: README build"
            );
            for f in &files {
                assert!(!f.contents.contains("../../wit"), "{lang}: {}", f.path);
                assert!(!f.contents.contains("{{"), "{lang}: {}", f.path);
            }
            if lang != Language::Rust {
                let build = get("build.sh");
                assert!(build.executable);
                assert!(build.contents.contains("my_plugin.wasm"));
                assert!(
                    build
                        .contents
                        .contains("${WHARF_TOOLCHAINS:-$HOME/.cache/wharf/toolchains}")
                );
                assert!(build.contents.contains("\"$here/wit\""));
            }
            if lang == Language::Javascript {
                // The QuickJS runtime's build, on handler.js, with its source.
                let build = &get("build.sh").contents;
                assert!(build.contains("js=\"$here/handler.js\""), "{build}");
                assert!(build.contains("/my_plugin.wasm\""), "{build}");
                assert!(build.contains("\"$here/tools/quickjs/wharf_js.c\""));
                assert!(get("tools/quickjs/wharf_js.c").contents.contains("#embed"));
            }
        }
        let rust = files(Language::Rust, "my-plugin").unwrap();
        let toml = &rust
            .iter()
            .find(|f| f.path == "Cargo.toml")
            .unwrap()
            .contents;
        assert!(toml.contains("name = \"my-plugin\""));
        assert!(toml.contains("wit-bindgen = "));
        assert!(toml.contains("[workspace]"));
        let go = files(Language::Go, "my-plugin").unwrap();
        let gomod = &go.iter().find(|f| f.path == "go.mod").unwrap().contents;
        assert!(gomod.starts_with("module my-plugin\n"));
    }

    /// The Go bindings are hand-written for one WIT version: they must name
    /// the version the scaffold's WIT declares.
    #[test]
    fn go_bindings_match_the_wit() {
        let version = wit_version();
        let at = format!("wharf:websocket/handler@{version}#on-text");
        assert!(
            src::GO_BINDINGS.contains(&at),
            "plugins/go-echo/bindings.go does not target WIT {version}"
        );
        for line in src::GO_BINDINGS.lines() {
            if let Some(i) = line.find("wharf:websocket/") {
                let rest = &line[i..];
                let v = rest.split('@').nth(1).unwrap_or("");
                assert!(v.starts_with(version), "stale WIT version in: {line}");
            }
        }
    }

    #[test]
    fn refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        // A missing directory and an empty one are fine.
        let dir = tmp.path().join("new");
        create(Language::Python, "p", &dir).unwrap();
        assert!(dir.join("build.sh").is_file());
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        create(Language::Go, "g", &empty).unwrap();
        // A non-empty directory is left alone.
        let full = tmp.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("keep.txt"), "mine").unwrap();
        let err = create(Language::Rust, "r", &full).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read_dir(&full).unwrap().count(), 1);
        assert_eq!(
            std::fs::read_to_string(full.join("keep.txt")).unwrap(),
            "mine"
        );
        // So is a file.
        let err = create(Language::C, "c", &full.join("keep.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep.txt"), "{err}");
        assert_eq!(
            std::fs::read_to_string(full.join("keep.txt")).unwrap(),
            "mine"
        );
        // A bad name writes nothing.
        let none = tmp.path().join("none");
        assert!(create(Language::Rust, "Bad Name", &none).is_err());
        assert!(!none.exists());
    }
}
