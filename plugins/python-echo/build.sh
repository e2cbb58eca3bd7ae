#!/usr/bin/env bash
# Builds the Python echo handler into OUT_DIR/python_echo.wasm.
#
#   plugins/python-echo/build.sh OUT_DIR
#
# The toolchain (componentize-py, from PyPI) is installed once into a venv
# under $WHARF_TOOLCHAINS/python (default <repo>/target/toolchains/python).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
tools="${WHARF_TOOLCHAINS:-$repo/target/toolchains}/python"
COMPONENTIZE_PY_VERSION=0.25.1

mkdir -p "$tools" "$out"
# One installer at a time (parallel test runs share the cache dir).
exec 9>"$tools/.lock"
flock 9
if [ ! -x "$tools/venv/bin/componentize-py" ] ||
   [ "$(cat "$tools/.version" 2>/dev/null)" != "$COMPONENTIZE_PY_VERSION" ]; then
    echo "build.sh: installing componentize-py $COMPONENTIZE_PY_VERSION into $tools/venv" >&2
    rm -rf "$tools/venv"
    python3 -m venv "$tools/venv"
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION"
    echo "$COMPONENTIZE_PY_VERSION" > "$tools/.version"
fi
flock -u 9

# componentize-py generates the `wit_world` bindings package from the WIT
# (world `text-batch-handler-world`: app.py also implements `BatchHandler`
# and `TextBatchHandler`),
# bundles CPython + app.py into one component and snapshots it after
# `import app` (so per-connection instantiation skips interpreter start-up).
# Built from a copy, so that no __pycache__ lands in the source tree.
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/app.py" "$work/"
cd "$work"
"$tools/venv/bin/componentize-py" -d "$repo/wit" -w text-batch-handler-world \
    componentize app -o "$out/python_echo.wasm.tmp" >&2
mv "$out/python_echo.wasm.tmp" "$out/python_echo.wasm"
echo "build.sh: built $out/python_echo.wasm" >&2
