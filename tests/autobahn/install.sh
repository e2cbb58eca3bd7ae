#!/usr/bin/env bash
# Install Autobahn|Testsuite (wstest 0.8.2, Python 2) for Wharf's conformance harness.
#
#   tests/autobahn/install.sh [DIR]
#
# DIR defaults to $WHARF_AUTOBAHN_DIR, else <repo>/target/autobahn. Afterwards wstest is
# DIR/venv27/bin/wstest (the path is printed on the last line of stdout, alone).
#
# Layout:  DIR/boot     Python 3 venv holding virtualenv==20.21.1 (the last release that can
#                       still create Python 2.7 environments)
#          DIR/venv27   Python 2.7 virtualenv with requirements-py27.lock + accel-py27.lock
#          DIR/.stamp   hash of both lock files + the recipe version, written last; if it matches and
#                       wstest imports, the script exits 0 at once (idempotent, ~0.3 s)
#          DIR/.lock    flock(1) file, so two concurrent callers don't race (the second waits,
#                       then finds the stamp and returns)
#
# Python 2.7: $WHARF_PYTHON27, else $(pyenv root)/versions/2.7.*/bin/python2.7 (pyenv root
# falling back to ~/.pyenv), else python2.7 on PATH. Nothing is needed from outside the
# repository but PyPI, gcc and those Python 2.7 headers (for wsaccel/ujson, built from sdists).
#
# pip under Python 2: virtualenv 20.21.1 seeds pip 20.3.4, setuptools 44.1.1, wheel 0.37.1 -
# the last py2 releases. The locks are installed with --no-deps (a lock, no resolver) and
# --no-build-isolation, so sdists (Twisted, wsaccel, ujson, ...) build with that seeded
# setuptools/wheel instead of pip fetching build deps into an isolated env (which for
# PEP 517 projects can pull a py3-only setuptools_scm/setuptools). ujson 2.0.3 needs
# setuptools_scm at build time, so a py2-compatible one is pinned below and installed first.
#
# Where the time goes (per-step timings are printed to stderr as "[autobahn-install] STEP: N s").
# Measured 2026-11-24 on the 2-core machine under load ~4, empty pip cache, total 42 s:
#   python3 -m venv boot                  5 s   (ensurepip)
#   pip install virtualenv==20.21.1       2 s
#   virtualenv -p python2.7 venv27        1 s   (seeds pip/setuptools/wheel from its bundle)
#   setuptools_scm build pin              1 s
#   requirements-py27.lock               14 s   (downloads; Twisted's sdist -> wheel; byte-compiling)
#   accel-py27.lock                      20 s   (gcc: ujson 2.0.3 and wsaccel 0.6.6 from sdists)
# With pip's wheel cache warm (~/.cache/pip) the same install takes ~21 s (accel 1 s).
# Already installed: ~0.5 s (one python2.7 import check).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
DIR="${1:-${WHARF_AUTOBAHN_DIR:-$repo/target/autobahn}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

# Build-time-only pins for Python 2.7 (not part of wstest's runtime set):
# setuptools_scm 5.0.2 is the last release supporting Python 2.7 (ujson's setup_requires).
PY27_BUILD_PINS=(setuptools_scm==5.0.2)
VIRTUALENV_PIN="virtualenv==20.21.1"
# Bump when the install recipe changes in a way that needs existing installs redone.
INSTALL_LAYOUT="wharf-autobahn-install v1 ${PY27_BUILD_PINS[*]} $VIRTUALENV_PIN"

log() { printf '[autobahn-install] %s\n' "$*" >&2; }
die() { printf '[autobahn-install] ERROR: %s\n' "$*" >&2; exit 1; }

WSTEST="$DIR/venv27/bin/wstest"
PY27VENV="$DIR/venv27/bin/python"

stamp_value() {
    { echo "$INSTALL_LAYOUT"; cat "$here/requirements-py27.lock" "$here/accel-py27.lock"; } \
        | sha256sum | cut -d' ' -f1
}

# "Works": the stamp matches and the venv's python imports wstest's package and the accel
# modules (cheaper than `wstest --help`, which imports Twisted's reactor machinery too).
installed_ok() {
    [[ -x "$WSTEST" && -x "$PY27VENV" && -f "$DIR/.stamp" ]] || return 1
    [[ "$(cat "$DIR/.stamp")" == "$(stamp_value)" ]] || return 1
    "$PY27VENV" -W ignore -c 'import autobahntestsuite, autobahn, twisted, wsaccel, ujson' >/dev/null 2>&1
}

if installed_ok; then
    log "already installed in $DIR"
    echo "$WSTEST"
    exit 0
fi

command -v flock >/dev/null || die "flock(1) not found (util-linux)"
exec 9>"$DIR/.lock"
if ! flock -n 9; then
    log "another install into $DIR is running; waiting for its lock"
    flock 9
fi
# Someone else may have finished while we waited.
if installed_ok; then
    log "already installed in $DIR (by a concurrent caller)"
    echo "$WSTEST"
    exit 0
fi

# ---- find CPython 2.7 ---------------------------------------------------------------------
find_python27() {
    if [[ -n "${WHARF_PYTHON27:-}" ]]; then echo "$WHARF_PYTHON27"; return 0; fi
    local root=""
    if command -v pyenv >/dev/null 2>&1; then root="$(pyenv root 2>/dev/null || true)"; fi
    local cands=()
    for r in "$root" "${PYENV_ROOT:-}" "$HOME/.pyenv"; do
        [[ -n "$r" ]] || continue
        cands+=("$r"/versions/2.7.18/bin/python2.7 "$r"/versions/2.7*/bin/python2.7)
    done
    command -v python2.7 >/dev/null 2>&1 && cands+=("$(command -v python2.7)")
    local c
    for c in "${cands[@]}"; do
        if [[ -x "$c" ]] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    return 1
}

if [[ -n "${WHARF_PYTHON27:-}" ]] && ! "$WHARF_PYTHON27" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
    die "WHARF_PYTHON27=$WHARF_PYTHON27 is not a working CPython 2.7"
fi
PY27="$(find_python27)" || die "CPython 2.7 not found. wstest (Autobahn|Testsuite 0.8.2) is Python 2.
  Looked for: \$WHARF_PYTHON27, \$(pyenv root)/versions/2.7*/bin/python2.7, ~/.pyenv/versions/2.7*/bin/python2.7, python2.7 on PATH.
  Fix: install it (e.g. 'pyenv install 2.7.18') or point WHARF_PYTHON27 at a python2.7."
log "python2.7: $PY27"

py27_inc="$("$PY27" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[[ -f "$py27_inc/Python.h" ]] || die "Python 2.7 headers missing ($py27_inc/Python.h); needed to build wsaccel/ujson"
command -v gcc >/dev/null || command -v cc >/dev/null || die "no C compiler (gcc) to build wsaccel/ujson"

PY3=""
for c in python3 python3.12 python3.11 python3.10 python3.9 python3.8; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 7))' 2>/dev/null; then
        PY3="$(command -v "$c")"; break
    fi
done
[[ -n "$PY3" ]] || die "python3 (>= 3.7, with venv) not found; needed to run virtualenv==20.21.1"

# Quiet pip: no version check, no "Python 2.7 reached end of life" banner, no script-location
# warnings, no progress bars.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PIP_NO_WARN_SCRIPT_LOCATION=1 \
       PIP_PROGRESS_BAR=off PIP_NO_INPUT=1
# Don't let a caller's PYTHONPATH/PYTHONHOME or an active venv leak into the py2 venv.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV || true
PIPQ=(--disable-pip-version-check -q)

t_all=$SECONDS
step() {  # step NAME cmd...
    local name="$1"; shift
    local t0=$SECONDS
    "$@"
    log "$name: $((SECONDS - t0)) s"
}

# A half-done previous attempt (no stamp) is thrown away rather than patched up.
rm -f "$DIR/.stamp"
rm -rf "$DIR/venv27"

if ! "$DIR/boot/bin/python" -c 'import virtualenv, sys; sys.exit(virtualenv.__version__ != "20.21.1")' >/dev/null 2>&1; then
    rm -rf "$DIR/boot"
    step "boot venv (python3 -m venv)" "$PY3" -m venv "$DIR/boot"
    step "pip install $VIRTUALENV_PIN (py3)" "$DIR/boot/bin/pip" install "${PIPQ[@]}" "$VIRTUALENV_PIN"
fi
# --no-periodic-update: don't spawn a background seed-wheel updater; --no-download: use the
# pip/setuptools/wheel bundled in virtualenv 20.21.1 (pip 20.3.4, setuptools 44.1.1, wheel 0.37.1).
step "virtualenv -p python2.7 venv27" "$DIR/boot/bin/virtualenv" -q --no-periodic-update --no-download \
    -p "$PY27" "$DIR/venv27"

P27=("$DIR/venv27/bin/python" -m pip)
step "pip install build pins (py27)" "${P27[@]}" install "${PIPQ[@]}" --no-deps "${PY27_BUILD_PINS[@]}"
step "pip install -r requirements-py27.lock (py27)" "${P27[@]}" install "${PIPQ[@]}" --no-deps \
    --no-build-isolation -r "$here/requirements-py27.lock"
step "pip install -r accel-py27.lock (py27, gcc)" "${P27[@]}" install "${PIPQ[@]}" --no-deps \
    --no-build-isolation -r "$here/accel-py27.lock"

"$PY27VENV" -W ignore -c 'import autobahntestsuite, autobahn, twisted, wsaccel, ujson' \
    || die "install finished but wstest's modules don't import"
[[ -x "$WSTEST" ]] || die "install finished but $WSTEST is missing"
stamp_value >"$DIR/.stamp"
log "total: $((SECONDS - t_all)) s; wstest installed in $DIR"
echo "$WSTEST"
