#!/usr/bin/env bash
# A profile-guided build of wharf and of the echo bench's baselines.
#
#   host/benches/pgo.sh [--profile NAME] [--dir DIR] [-- ECHO-BENCH-ARGS]
#
# 1. Builds wharf and the echo bench (whose binary is also the
#    tokio-tungstenite and fastwebsockets servers and the load generator)
#    with `-Cprofile-generate`, into DIR/gen.
# 2. Trains them: the echo bench's every scenario, one short round, once
#    with an instance per connection and once `--shared`; each server
#    writes its profile when the bench stops it (WHARF_BENCH_TERMINATE).
# 3. Merges the profiles (llvm-profdata, from rustup's llvm-tools) and
#    builds everything again with `-Cprofile-use`, into DIR/use.
# 4. With ECHO-BENCH-ARGS, runs the echo bench from that build: every
#    server profile-guided, so the ratios compare like with like.
#
# wharf's binary is then DIR/use/TARGET/NAME/wharf. --profile: the Cargo
# profile (default dist, the one to deploy); --dir: default target/pgo.
# About 35 minutes on a 2-core VM, most of it the two builds. Every server
# is trained on the same load, which is what makes the comparison fair; a
# deployment trains on the bundled echo, whose host paths (the driver, the
# protocol, the call into the plugin) every handler shares.
set -euo pipefail

profile=dist
dir=""
bench_args=()
while (($#)); do
    case "$1" in
    --profile) profile=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --) shift; bench_args=("$@"); break ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/../.."
dir=${dir:-target/pgo}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [[ ! -x $profdata ]]; then
    rustup component add llvm-tools
fi

# Builds the echo bench (and with it wharf) with these RUSTFLAGS into
# $1/TARGET; prints the bench's executable (cargo reports wharf's too, in
# either order). --target keeps the flags off build scripts and proc
# macros, which would otherwise write profiles too.
build() {
    local into=$1 flags=$2
    CARGO_TARGET_DIR=$into RUSTFLAGS=$flags cargo bench --profile "$profile" --target "$host" \
        --bench echo --no-run --message-format=json-render-diagnostics |
        sed -n 's/.*"executable":"\([^"]*\/deps\/echo-[^"]*\)".*/\1/p' | grep .
}

echo "== building instrumented ($dir/gen)" >&2
rm -rf "$dir/raw"
gen=$(build "$dir/gen" "-Cprofile-generate=$dir/raw")
echo "== training: $gen" >&2
for mode in "" --shared; do
    WHARF_BENCH_TERMINATE=1 LLVM_PROFILE_FILE="$dir/raw/%m_%p.profraw" \
        "$gen" --bench --rounds 1 --duration 3 --warmup 1 $mode >"$dir/train${mode}.log"
done
"$profdata" merge -o "$dir/merged.profdata" "$dir"/raw/*.profraw
echo "== building with the profile ($dir/use)" >&2
use=$(build "$dir/use" "-Cprofile-use=$dir/merged.profdata")
echo "wharf: $dir/use/$host/$profile/wharf"
echo "echo bench: $use"
if ((${#bench_args[@]})); then
    "$use" --bench "${bench_args[@]}"
fi
