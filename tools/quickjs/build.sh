#!/usr/bin/env bash
# Builds a JavaScript handler (one ES module) into a Wharf component running
# on QuickJS (quickjs-ng), bridged to the WIT by wharf_js.c.
#
#   tools/quickjs/build.sh HANDLER.js OUT.wasm
#
# Toolchain: Debian's clang-19, lld-19 and wasi-libc (installed with apt-get
# if missing, as for C), tools/componentize, tools/wizer (Wasmtime's
# pre-initializer; its first build takes a few minutes), and the quickjs-ng
# sources vendored in the crates.io package rquickjs-sys (pinned by version
# and SHA-256), compiled once into $WHARF_TOOLCHAINS/quickjs (default
# <repo>/target/toolchains).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
js="${1:?usage: build.sh HANDLER.js OUT.wasm}"
out="${2:?usage: build.sh HANDLER.js OUT.wasm}"
[ -f "$js" ] || { echo "build.sh: $js: no such file" >&2; exit 1; }
toolchains="${WHARF_TOOLCHAINS:-$repo/target/toolchains}"
mkdir -p "$toolchains" "$(dirname "$out")"

# quickjs-ng 0.16.2, as vendored by rquickjs-sys 0.14.0.
crate=rquickjs-sys-0.14.0
crate_sha256=cee271d0eeba64f0915b846cb7ae02e16faf3dfdffdca91731101d9d30fe3423
qjs="$toolchains/quickjs/$crate"
# -O2 as quickjs-ng's own release build; unsigned char as it requires;
# Wasm SIMD, which Wasmtime runs natively, so that the compiler vectorizes
# the byte loops of string conversion (JS_NewStringLen's share of a 1 KiB
# text echo's profile fell from 11.5% to 4.4%); bulk memory, so that
# memcpy and memset are one instruction each (Wasmtime's own memmove)
# instead of wasi-libc's loops.
wasm_features=(-msimd128 -mbulk-memory)
qjs_cflags=(--target=wasm32-wasi -O2 "${wasm_features[@]}" -D_GNU_SOURCE -funsigned-char -w)
qjs_objects=(dtoa libregexp libunicode quickjs)
# JS_ToCStringLen2 (every string a handler sends) counts a string's
# non-ASCII bytes in a loop clang vectorizes only 4 bytes wide: 11% of a
# 1 KiB text echo's server time. An OR over the bytes first, 16 wide, as
# quickjs-ng's own utf8_scan does, skips the count for ASCII. Part of the
# build's stamp, so a cached build without it is rebuilt.
ascii_scan() {
    perl -0pi -e 's/(        count = 0;\n)(        for \(pos = 0; pos < len; pos\+\+\) \{\n            count \+= src\[pos\] >> 7;\n        \})/$1        uint8_t any = 0;\n        for (pos = 0; pos < len; pos++)\n            any |= src[pos];\n        if (any >= 0x80)\n$2/' "$1"
    grep -q 'any |= src\[pos\]' "$1" || { echo "build.sh: the ASCII-scan patch no longer applies to $1" >&2; exit 1; }
}
stamp="${qjs_cflags[*]} ascii-scan"

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
# tools/NAME, built with cargo into the toolchains (one build at a time).
build_tool() {
    (
        flock 9
        cargo build --quiet --release --locked \
            --manifest-path "$repo/tools/$1/Cargo.toml" \
            --target-dir "$toolchains/$1"
    ) 9>"$toolchains/.$1.lock"
}
build_tool componentize
componentize="$toolchains/componentize/release/componentize"
build_tool wizer
wizer="$toolchains/wizer/release/wizer"
(
    flock 9
    if [ "$(cat "$qjs/.built" 2>/dev/null)" != "$stamp" ]; then
        echo "build.sh: fetching and compiling quickjs-ng ($crate from crates.io)" >&2
        rm -rf "$qjs" && mkdir -p "$qjs"
        curl -sSfL --retry 3 -o "$qjs.crate" "https://static.crates.io/crates/rquickjs-sys/$crate.crate"
        echo "$crate_sha256  $qjs.crate" | sha256sum -c --quiet -
        tar xzf "$qjs.crate" -C "$qjs" --strip-components=1 "$crate/quickjs"
        rm "$qjs.crate"
        ascii_scan "$qjs/quickjs/quickjs.c"
        for o in "${qjs_objects[@]}"; do
            clang-19 "${qjs_cflags[@]}" -c "$qjs/quickjs/$o.c" -o "$qjs/$o.o" &
        done
        wait
        echo "$stamp" > "$qjs/.built"
    fi
) 9>"$toolchains/.quickjs.lock"

# --- build ------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# 1. C bindings for packed-words-handler-world (handler-world plus the packed
#    batch export: the runtime routes a read's messages to onText/onBinary
#    when the module has no batchHandler).
"$componentize" c-bindings "$repo/wit" packed-words-handler-world "$work"
# 2. The runtime with the handler's source embedded (#embed "handler.js"),
#    linked with QuickJS into a wasip1 reactor. A 1 MiB stack placed first,
#    so that overflowing it traps instead of overwriting data (QuickJS has
#    no recursion limit on WASI: runaway recursion traps, on Wasmtime's
#    call-stack limit first).
cp "$js" "$work/handler.js"
objects=()
for o in "${qjs_objects[@]}"; do objects+=("$qjs/$o.o"); done
clang-19 --target=wasm32-wasi -mexec-model=reactor -std=gnu23 -O2 "${wasm_features[@]}" -Wall -Wextra -Werror \
    -I "$work" --embed-dir="$work" -I "$qjs/quickjs" "$here/wharf_js.c" "$work/packed_words_handler_world.c" \
    "$work/packed_words_handler_world_component_type.o" "${objects[@]}" \
    -Wl,-z,stack-size=1048576 -Wl,--stack-first -Wl,--strip-debug -lm -o "$work/core.wasm"
# 3. Pre-initialized: the engine started and handler.js evaluated once, here
#    (wharf_js_initialize), instead of on every instance's first call.
"$wizer" "$work/core.wasm" "$work/core.init.wasm"
# 4. The component: wasip1 imports adapted to WASI preview2.
"$componentize" new "$work/core.init.wasm" "$out.tmp"
mv "$out.tmp" "$out"
echo "build.sh: built $out" >&2
