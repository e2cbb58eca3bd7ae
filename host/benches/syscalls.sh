#!/usr/bin/env bash
# System calls per echoed message and per connection, wharf (bundled echo
# plugin) against the tokio-tungstenite and fastwebsockets echo servers:
# the loads of host/benches/instructions.sh, each server run under
# `strace -f -c` instead of callgrind.
#
#   host/benches/syscalls.sh [--keep DIR] [--messages N1,N2] [--connections M1,M2]
#                            [--profile NAME]
#
# Each server runs once with N1 and once with N2 operations; a figure is
# (calls(N2) - calls(N1)) / (N2 - N1), so start-up and shutdown cancel out
# (the per-second ones, the epoch clock's `clock_nanosleep`, do not quite).
# strace slows each call down, not what a server calls. --profile NAME:
# the servers built with that Cargo profile (release without it). Needs
# strace.
set -eu

profile=()
keep=""
pass=()
while (($#)); do
    case "$1" in
    --keep) keep=$2; shift 2 ;;
    --profile) profile=(--profile "$2"); shift 2 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
    esac
done
command -v strace >/dev/null || { echo "syscalls.sh needs strace" >&2; exit 2; }
out=${keep:-$(mktemp -d -t wharf-syscalls.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# The bench starts each server under `--valgrind PATH --tool=callgrind
# --callgrind-out-file=F ...` and reads the total from F: this stand-in
# runs it under strace and writes the number of calls there instead.
wrapper="$out/strace-as-valgrind"
cat >"$wrapper" <<'EOF'
#!/usr/bin/env bash
if [[ ${1:-} == --version ]]; then echo "strace -f -c"; exit 0; fi
out="" tool="" args=()
for a in "$@"; do
    case "$a" in
    --tool=*) tool=${a#--tool=} ;;
    --callgrind-out-file=*) out=${a#--callgrind-out-file=} ;;
    --smc-check=*) ;;
    *) args+=("$a") ;;
    esac
done
[[ $tool == callgrind ]] || exec "${args[@]}"
strace -f -c -o "$out.strace" "${args[@]}" &
pid=$!
trap 'kill -TERM $(pgrep -P $pid) 2>/dev/null' TERM INT
wait $pid || wait $pid
echo "totals: $(awk '$NF == "total" { print $4 }' "$out.strace")" >"$out"
EOF
chmod +x "$wrapper"

cd "$(dirname "$0")/.."
cargo bench ${profile[@]+"${profile[@]}"} --bench echo -- --instructions --valgrind "$wrapper" --keep "$out" ${pass[@]+"${pass[@]}"} |
    sed -e 's/Instructions per operation (callgrind Ir, whole server process, user space only)/System calls per operation (strace -f -c, whole server process)/' \
        -e '/^RESULT instructions/s/^RESULT instructions/RESULT syscalls/' \
        -e '/rep stosb/d'

# By call, per operation: "name count" from one strace -c summary.
calls() { awk 'NF >= 5 && $1 ~ /^[0-9.]+$/ && $NF != "total" { print $NF, $4 }' "$1" | sort; }
echo
echo "By system call, per operation (at least 0.05):"
for f in "$out"/*.strace; do
    base=${f%.out.strace}
    n=${base##*-}
    stem=${base%-*}
    # Pair each run with the smaller run of the same server and load.
    small=$(ls "$stem"-*.out.strace | sed -n "s|^$stem-\([0-9]*\)\.out\.strace$|\1|p" | sort -n | head -1)
    [[ $n == "$small" ]] && continue
    line=$(join -a1 -e 0 -o 0,1.2,2.2 <(calls "$f") <(calls "$stem-$small.out.strace") |
        awk -v d=$((n - small)) '{ r = ($2 - $3) / d; if (r >= 0.05) printf " %s %.2f", $1, r }')
    echo "  $(basename "$stem"):$line"
done
