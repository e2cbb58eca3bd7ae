#!/usr/bin/env bash
# Installs Debian's Chromium (for the headless-browser test) if it is missing.
# Idempotent; one installer at a time. Prints the browser's path.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mkdir -p "$repo/target"
(
    flock 9
    if ! command -v chromium >/dev/null 2>&1; then
        echo "install.sh: apt-get install chromium" >&2
        export DEBIAN_FRONTEND=noninteractive
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
    fi
) 9>"$repo/target/.chromium.lock"
command -v chromium
