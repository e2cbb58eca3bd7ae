#!/usr/bin/env bash
# Instructions per echoed message and per connection, wharf (bundled echo
# plugin) against the native tokio-tungstenite and fastwebsockets echo
# servers (host/benches/common/baseline.rs), counted by valgrind's
# callgrind: stable on a noisy machine, unlike timings.
#
#   host/benches/instructions.sh [--messages N1,N2] [--connections M1,M2]
#                                [--top K] [--keep DIR [--no-run]] [--valgrind PATH] [--rep-strings]
#                                [--plugin PATH] [--shared] [--in-place] [--tls]
#                                [--profile NAME] [--cache-sim] [--workers N [--per-core]]
#
# Each server runs under callgrind once with N1 and once with N2 operations;
# the figure is (I(N2) - I(N1)) / (N2 - N1), so start-up and shutdown cancel
# out (see `mod instructions` in host/benches/echo.rs). Then, from the same
# files, the functions the extra operations spent their instructions in
# (callgrind_annotate, self cost, per operation) and the same by crate.
# --no-run: only the profiles, from the files an earlier run left in --keep DIR.
# --plugin PATH: wharf serves that echo component (a language's, say) and
# only wharf is counted.
# --shared: wharf serves the echo from one shared instance (a connection
# without its instantiation).
# --in-place: wharf with plugin.memory_reset = "in-place".
# --tls: every load over wss (TLS 1.3, rustls on every side): what TLS adds.
# --profile NAME: every server built with that Cargo profile (the README's
# figures: dist); release without it.
# --cache-sim: callgrind simulates the caches and branch predictors too, and
# the first-level instruction-cache misses per operation follow the
# instructions (RESULTS.md, "The code a call runs").
# --workers N: wharf with N worker threads, all counted (valgrind runs one
# thread at a time); --per-core: each worker a runtime of its own
# (server.scheduling = "per-core"), else tokio's multi-thread runtime
# (RESULTS.md, "Thread per core").
# Needs valgrind (and callgrind_annotate, which comes with it).
set -eu

top=25
profile=()
keep=""
run=1
tls=""
pass=()
while (($#)); do
    case "$1" in
    --top) top=$2; shift 2 ;;
    --tls) tls="-tls"; pass+=("$1"); shift ;;
    --keep) keep=$2; shift 2 ;;
    --profile) profile=(--profile "$2"); shift 2 ;;
    --no-run) run=0; shift ;;
    -h | --help) sed -n '2,33p' "$0"; exit 0 ;;
    *) pass+=("$1"); shift ;;
    esac
done
if ((!run)) && [[ -z $keep ]]; then
    echo "--no-run needs --keep DIR" >&2
    exit 2
fi
out=${keep:-$(mktemp -d -t wharf-callgrind.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

cd "$(dirname "$0")/.."
if ((run)); then
    cargo bench ${profile[@]+"${profile[@]}"} --bench echo -- --instructions --keep "$out" ${pass[@]+"${pass[@]}"}
fi

# Self cost per function in one callgrind file, "count<TAB>function", signed.
annotate() {
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$1" 2>/dev/null |
        awk -v sign="$2" '
        /^ *[0-9,]+ \([ 0-9.]+%\)  / {
            n = $1; gsub(",", "", n)
            f = $0; sub(/^ *[0-9,]+ \([ 0-9.]+%\)  /, "", f)
            if (f ~ /PROGRAM TOTALS/) next
            sub(/ \[[^]]*\]$/, "", f)   # [object]
            sub(/^[^:]*:/, "", f)       # source file
            if (f ~ /^0x[0-9a-f]+$/) f = "(no symbol: JIT-compiled wasm and trampolines)"
            printf "%d\t%s\n", sign * n, f
        }'
}

# Crate (or library) of a function name, for the summary by crate.
crate_of='
    function crate(f,   c) {
        if (f ~ /^\(no symbol/) return "wasm JIT code"
        c = f
        # <(A, B) as Trait>::f, <[T] as Trait>::f, <&T as ...>: the trait
        if (c ~ /^<[(\[&*]/ && index(c, " as ") > 0) c = substr(c, index(c, " as ") + 4)
        sub(/^[<&*( ]+(dyn |mut |const )?/, "", c)
        if (c !~ /::/) return "libc / other C"
        sub(/::.*/, "", c)
        return c
    }'

# diff NAME TARGET SLUG: per-operation profile between the N1 and N2 runs.
diff_profile() {
    local name=$1 target=$2 slug=$3
    local counts n1 n2
    counts=$(ls "$out" | sed -n "s/^$target-$slug-\([0-9]*\)\.out$/\1/p" | sort -n)
    n1=$(head -1 <<<"$counts")
    n2=$(tail -1 <<<"$counts")
    [[ -n $n1 && $n1 != "$n2" ]] || return 0
    local d=$((n2 - n1))
    local both
    both=$({ annotate "$out/$target-$slug-$n1.out" -1; annotate "$out/$target-$slug-$n2.out" 1; })
    echo
    echo "== $target, $name: Ir per operation by function (self cost, runs $n1 and $n2), top $top"
    awk -F'\t' -v d="$d" '{ s[$2] += $1 } END { for (k in s) if (s[k] / d >= 0.5 || s[k] / d <= -0.5) printf "%10.0f  %s\n", s[k] / d, substr(k, 1, 150) }' <<<"$both" |
        sort -rn | head -n "$top"
    echo "-- by crate"
    awk -F'\t' -v d="$d" "$crate_of"' { s[crate($2)] += $1; t += $1 } END { for (k in s) if (s[k] / d >= 0.5) printf "%10.0f  %5.1f%%  %s\n", s[k] / d, 100 * s[k] / t, k }' <<<"$both" |
        sort -rn | head -n 15
}

for target in wharf tokio-tungstenite fastwebsockets; do
    diff_profile "32 B text echo" "$target" "text32$tls"
    diff_profile "1 KiB binary echo" "$target" "binary1k$tls"
    diff_profile "1 KiB binary echo, 16 pipelined" "$target" "pipelined1k$tls"
    diff_profile "1 KiB text echo, 16 pipelined" "$target" "pipelined1k-text$tls"
    diff_profile "connection" "$target" "connection$tls"
done
echo
echo "callgrind files: $out (callgrind_annotate FILE, or kcachegrind)"
