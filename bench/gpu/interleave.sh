#!/bin/bash
# Interleaved rounds of bench_cuda under several FLEXATTN_DEBUG settings, in
# one device call, for A/B decisions (the GPU's clocks drift by ~5% over a
# run, so variants are measured side by side, round after round).
#   bench/gpu/interleave.sh [--rounds N] "key=a" "key=b,other=c" "" ...
# Each argument is one variant: a FLEXATTN_DEBUG value (comma-separated
# key=value settings, docs/debugging.md; "" runs the defaults). Builds
# first (bench/gpu/build.sh: only what changed, so the tree's current
# kernels are the ones measured).
set -u
ROUNDS=3
if [ "${1:-}" = --rounds ]; then ROUNDS=$2; shift 2; fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export BUILD=${BUILD:-/tmp/flexattn-gpu-build}
LOG=$(mktemp)
bash "$ROOT/bench/gpu/build.sh" >"$LOG" 2>&1 || { tail -40 "$LOG"; echo "build failed"; exit 1; }
rm -f "$LOG"
CACHE=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
    for v in "$@"; do
        printf 'round %s %s: ' "$r" "$v"
        FLEXATTN_DEBUG="$v" FLEXATTN_CACHE_DIR="$CACHE" timeout -k 5 120 "$BUILD/bench_cuda" --no-verify --iters 20 2>&1 |
            awk 'NF == 5 && $4 + 0 > 0 { printf "%s %s  ", $1, $4 } END { print "" }'
    done
done
rm -rf "$CACHE"
