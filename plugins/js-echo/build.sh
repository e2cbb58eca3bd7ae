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
# instantiation skips engine start-up). The world is `text-batch-handler-world`:
# echo.js also exports `batchHandler` (the messages of one read in one call)
# and `textBatchHandler` (a run of texts as one string).
# Features `http` and `fetch-event` are left out: a WebSocket handler does
# not use WASI HTTP (with it the component would import wasi:http, which
# the host does not offer).
#
# This runs what the `componentize-js` command runs, with one fix to the
# JavaScript bindings it generates: their `_utf8AllocateAndEncode`, which
# lowers every string passed to the host (`sendText`, `close`'s reason, ...),
# counts the UTF-8 length in a JavaScript loop over the string's characters,
# interpreted (StarlingMonkey has no JIT in Wasm): ~0.3 µs a character, so
# 300 µs to send 1 KiB. The fix encodes with the engine's native TextEncoder
# and copies the bytes, and fails the build if the function is not found
# (a newer componentize-js: check whether it still needs the fix).
node --input-type=module - "$tools" "$here/echo.js" "$repo/wit" text-batch-handler-world \
    "$out/js_echo.wasm.tmp" >&2 <<'NODE'
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { pathToFileURL } from 'node:url';
const [tools, source, wit, world, out] = process.argv.slice(2);
const fsp = createRequire(import.meta.url)('node:fs/promises');
const writeFile = fsp.writeFile;
const slow = /function _utf8AllocateAndEncode\(s, realloc, memory\) \{\n[^]*?\n\}\n/;
const fast = `function _utf8AllocateAndEncode(s, realloc, memory) {
  if (typeof s !== 'string') {
    throw new TypeError('expected a string, received [' + typeof s + ']');
  }
  if (s.length === 0) { return { ptr: 1, len: 0 }; }
  // Encoded straight into the guest's memory: no intermediate array per
  // message for the collector to catch up with (with one, a long text
  // echo ran out of a 128 MiB limit on a loaded machine, whose collector
  // slices got less time). At most 3 bytes per UTF-16 unit.
  const max = s.length * 3;
  const ptr = realloc(0, 0, 1, max);
  const { written } = TEXT_ENCODER_UTF8.encodeInto(s, new Uint8Array(memory.buffer, ptr, max));
  return { ptr, len: written };
}
`;
// Its debug logging (`JCO_DEBUG`), two calls per host call each building
// an object and looking up `globalThis.process` even when off: removed.
const noDebugLog = /\n *_debugLog\((?:'[^'\n]*'|"[^"\n]*")(?:, \{[^{}]*\})?\);/g;
let patched = false;
fsp.writeFile = function (path, data, ...rest) {
  if (String(path).endsWith('initializer.js') && typeof data === 'string') {
    if (!slow.test(data)) throw new Error('build.sh: _utf8AllocateAndEncode not found in the bindings');
    data = data.replace(slow, fast).replace(noDebugLog, '');
    patched = true;
  }
  return writeFile.call(this, path, data, ...rest);
};
syncBuiltinESMExports();
const cjs = `${tools}/node_modules/@bytecodealliance/componentize-js/src/componentize.js`;
const { componentize } = await import(pathToFileURL(cjs));
const { component } = await componentize({
  sourcePath: source, witPath: wit, worldName: world,
  disableFeatures: ['http', 'fetch-event'],
});
if (!patched) throw new Error('build.sh: the bindings were not patched');
await writeFile(out, component);
NODE
mv "$out/js_echo.wasm.tmp" "$out/js_echo.wasm"
echo "build.sh: built $out/js_echo.wasm" >&2
