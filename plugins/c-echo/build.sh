#!/usr/bin/env bash
# Builds the C echo handler into OUT_DIR/c_echo.wasm.
#
#   plugins/c-echo/build.sh OUT_DIR
#
# Toolchain: Debian's clang-19, lld-19 and wasi-libc (installed with apt-get
# if missing), plus tools/componentize (a small Rust binary doing what
# `wit-bindgen c` and `wasm-tools component new` do), built once into
# $WHARF_TOOLCHAINS/componentize (default <repo>/target/toolchains).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
toolchains="${WHARF_TOOLCHAINS:-$repo/target/toolchains}"
mkdir -p "$toolchains" "$out"
out="$(cd "$out" && pwd)"

# --- toolchain (one installer at a time) --------------------------------
apt_packages=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)
(
    flock 9
    missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "build.sh: apt-get install ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
) 9>"$toolchains/.apt.lock"
(
    flock 9
    cargo build --quiet --release --locked \
        --manifest-path "$repo/tools/componentize/Cargo.toml" \
        --target-dir "$toolchains/componentize"
) 9>"$toolchains/.componentize.lock"
componentize="$toolchains/componentize/release/componentize"

# --- build ------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 1. C bindings for the world: packed_words_handler_world.{h,c} and an object file that
#    carries the world's type information into the module.
"$componentize" c-bindings "$repo/wit" packed-words-handler-world "$work"
# 2. A wasip1 "reactor" module (a library: no main, exports called at will).
clang-19 --target=wasm32-wasi -mexec-model=reactor -Os -Wall -Wextra -Werror \
    -I "$work" "$here/echo.c" "$work/packed_words_handler_world.c" \
    "$work/packed_words_handler_world_component_type.o" -Wl,--strip-debug -o "$work/core.wasm"
# 3. The component: wasip1 imports adapted to WASI preview2.
"$componentize" new "$work/core.wasm" "$out/c_echo.wasm"
echo "build.sh: built $out/c_echo.wasm" >&2
