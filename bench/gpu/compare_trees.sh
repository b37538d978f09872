#!/bin/bash
# The CUDA forward of two source trees, side by side in one device call:
# each tree is built by its own bench/gpu/build.sh, then bench_cuda runs
# alternately (base, this tree, base, ...) for ROUNDS rounds (default 5),
# and the per-pattern medians over rounds and the ratio this/base are
# printed. A run that fails exits non-zero.
#   bench/gpu/compare_trees.sh BASE_TREE [--len S]
# BASE_TREE is a checkout of the base commit, e.g. made with
#   git worktree add .base <commit>   (.base is ignored by .git/info/exclude)
set -u
BASE=$(cd "$1" && pwd) || exit 2
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${ROUNDS:-5}
BB=/tmp/flexattn-base-build NB=/tmp/flexattn-gpu-build
LOG=$(mktemp -d)
BUILD=$BB bash "$BASE/bench/gpu/build.sh" >"$LOG/base-build.log" 2>&1 || { tail -30 "$LOG/base-build.log"; exit 1; }
BUILD=$NB bash "$ROOT/bench/gpu/build.sh" >"$LOG/new-build.log" 2>&1 || { tail -30 "$LOG/new-build.log"; exit 1; }
CB=$(mktemp -d) CN=$(mktemp -d)
for r in $(seq "$ROUNDS"); do
    FLEXATTN_CACHE_DIR=$CB timeout -k 5 120 "$BB/bench_cuda" --no-verify --iters 20 "$@" >"$LOG/base-$r.txt" 2>&1 || { cat "$LOG/base-$r.txt"; exit 1; }
    FLEXATTN_CACHE_DIR=$CN timeout -k 5 120 "$NB/bench_cuda" --no-verify --iters 20 "$@" >"$LOG/new-$r.txt" 2>&1 || { cat "$LOG/new-$r.txt"; exit 1; }
done
python3 - "$LOG" "$ROUNDS" <<'PY'
import statistics, sys
log, rounds = sys.argv[1], int(sys.argv[2])
def read(side):
    per = {}
    for r in range(1, rounds + 1):
        for line in open(f"{log}/{side}-{r}.txt"):
            f = line.split()
            if len(f) == 5 and f[3].replace(".", "", 1).isdigit():  # a pattern's row
                per.setdefault(f[0], []).append(float(f[3]))
    return {p: statistics.median(v) for p, v in per.items()}
base, new = read("base"), read("new")
print(f"{'pattern':24s} {'base TFLOP/s':>12s} {'this TFLOP/s':>12s} {'this/base':>9s}")
for p in base:
    if p in new:
        print(f"{p:24s} {base[p]:12.1f} {new[p]:12.1f} {new[p] / base[p]:9.3f}")
PY
