#!/usr/bin/env bash
# Builds the JavaScript echo handler into OUT_DIR/js_echo.wasm.
#
#   plugins/js-echo/build.sh OUT_DIR
#
# The toolchain (componentize-js, from npm: the StarlingMonkey JS engine and
# the tool that bundles it with echo.js) is installed once into a local npm
# prefix, $WHARF_TOOLCHAINS/js (default <repo>/target/toolchains/js).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
tools="${WHARF_TOOLCHAINS:-$repo/target/toolchains}/js"
# componentize-js imports @bytecodealliance/preview2-shim at run time but only
# lists it as a dev dependency: install it alongside.
PACKAGES=(@bytecodealliance/componentize-js@0.23.0 @bytecodealliance/jco@1.35.0
          @bytecodealliance/preview2-shim@0.17.9)
cli="$tools/node_modules/.bin/componentize-js"

mkdir -p "$tools" "$out"
# One installer at a time (parallel test runs share the cache dir).
exec 9>"$tools/.lock"
flock 9
if [ ! -x "$cli" ] || [ "$(cat "$tools/.version" 2>/dev/null)" != "${PACKAGES[*]}" ]; then
    echo "build.sh: installing ${PACKAGES[*]} into $tools" >&2
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error --save-exact \
        "${PACKAGES[@]}" >&2
    echo "${PACKAGES[*]}" > "$tools/.version"
fi
flock -u 9

# StarlingMonkey + echo.js, snapshotted after the module is evaluated (so
# instantiation skips engine start-up). `-d http -d fetch-event` leaves out
# the WASI HTTP support, which a WebSocket handler does not use (with it the
# component would import wasi:http, which the host does not offer).
"$cli" "$here/echo.js" -w "$repo/wit" -n handler-world \
    -d http -d fetch-event -o "$out/js_echo.wasm.tmp" >&2
mv "$out/js_echo.wasm.tmp" "$out/js_echo.wasm"
echo "build.sh: built $out/js_echo.wasm" >&2
