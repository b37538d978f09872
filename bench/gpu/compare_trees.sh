#!/bin/bash
# Two source trees side by side in one device call: each tree is built by
# its own bench/gpu/build.sh, then bench_cuda runs alternately (base, this
# tree, base, ...) for ROUNDS rounds (default 5), and the per-pattern
# medians over rounds and the ratio this/base are printed. With CASES set
# (lever_ab.py cases, e.g. "noop:64,zoo/t5_bucketed_bias:64"), lever_ab.py
# also times them with this tree's library against the base's (LEVER_ARGS:
# more arguments, e.g. "--forward --rounds 2"; its children check this
# tree's results against the base's). With CHECK=1 (the default) `flexattn
# check --backend cuda` of this tree runs last. Anything that fails makes
# the script exit non-zero. Logs go to $OUT/compare (a temporary folder
# without OUT).
#   [CASES=...] [CHECK=0] bench/gpu/compare_trees.sh BASE_TREE [--len S]
# BASE_TREE is a checkout of the base commit, e.g. made with
#   mkdir .base && git archive <commit> | tar -x -C .base
set -u
BASE=$(cd "$1" && pwd) || exit 2
shift
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
ROUNDS=${ROUNDS:-5}
BB=/tmp/flexattn-base-build NB=/tmp/flexattn-gpu-build
LOG=${OUT:+$OUT/compare}
LOG=${LOG:-$(mktemp -d)}
mkdir -p "$LOG"
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
[ $? -eq 0 ] || exit 1
if [ -n "${CASES:-}" ]; then
    # shellcheck disable=SC2086
    PYTHONPATH="$ROOT/python" FLEXATTN_LIBRARY="$NB/libflexattn.so" timeout -k 5 "${LEVER_TIMEOUT:-300}" \
        python3 "$ROOT/bench/gpu/lever_ab.py" ${LEVER_ARGS:---forward} --cases "$CASES" "" "@$BB/libflexattn.so" \
        >"$LOG/lever.txt" 2>&1
    status=$?
    grep -A 100 "^median" "$LOG/lever.txt" || tail -20 "$LOG/lever.txt"
    [ "$status" -eq 0 ] || { echo "FAILED: lever_ab.py exit $status"; exit 1; }
fi
if [ "${CHECK:-1}" = 1 ]; then
    FLEXATTN_CACHE_DIR=off timeout -k 5 "${CHECK_TIMEOUT:-240}" "$NB/tools/flexattn" check --backend cuda >"$LOG/check.txt" 2>&1
    status=$?
    grep -E "FAIL|ERROR" "$LOG/check.txt" | head -20
    tail -1 "$LOG/check.txt"
    [ "$status" -eq 0 ] || { echo "FAILED: flexattn check --backend cuda exit $status"; exit 1; }
fi
