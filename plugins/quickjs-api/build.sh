#!/usr/bin/env bash
# TEST-ONLY: builds handler.js on Wharf's QuickJS runtime into
# OUT_DIR/quickjs_api.wasm (tests/languages, `quickjs_api`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
exec bash "$here/../../tools/quickjs/build.sh" "$here/handler.js" "$out/quickjs_api.wasm"
