#!/usr/bin/env bash
# Builds the JavaScript echo handler (../js-echo/echo.js, the same source
# componentize-js builds) on Wharf's QuickJS runtime into
# OUT_DIR/quickjs_echo.wasm.
#
#   plugins/quickjs-echo/build.sh OUT_DIR
#
# See tools/quickjs/build.sh for the toolchain and docs/plugins/javascript.md
# for the choice between the two engines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
exec bash "$here/../../tools/quickjs/build.sh" "$here/../js-echo/echo.js" "$out/quickjs_echo.wasm"
