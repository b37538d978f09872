#!/bin/bash
# The CUDA backward under several FLEXATTN_DEBUG settings, one process each
# (the settings are read when the process's context is made), in rounds
# that alternate the settings, each beside torch's compiled flex_attention
# as bench/gpu/backward.py times it (gradients checked every time; nothing
# is written to bench/results). Prints each run's rows prefixed by the
# setting, then the median flexattn TFLOP/s per pattern and setting.
#   bench/gpu/backward_ab.sh [--rounds N] [--args "backward.py args"] "" "key=v,..." ...
# "" is the default kernel; e.g. "cuda_bwd_pipeline=0" turns one lever off
# (docs/debugging.md lists the cuda_bwd_* keys).
set -u
ROUNDS=2 ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --args) ARGS=$2; shift 2 ;;
    *) break ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export BUILD=${BUILD:-/tmp/flexattn-gpu-build}
LOG=$(mktemp -d)
bash "$ROOT/bench/gpu/build.sh" >"$LOG/build.log" 2>&1 || { tail -40 "$LOG/build.log"; exit 1; }
STATUS=0
for r in $(seq "$ROUNDS"); do
    i=0
    for v in "$@"; do
        # word splitting of ARGS is wanted: it holds backward.py's arguments
        # shellcheck disable=SC2086
        FLEXATTN_DEBUG="$v" PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" \
            FLEXATTN_LIBRARY="$BUILD/libflexattn.so" PYTHONUNBUFFERED=1 timeout -k 5 600 \
            python3 "$ROOT/bench/gpu/backward.py" --results '' $ARGS >"$LOG/run-$r-$i.txt" 2>&1 ||
            { echo "FAILED: '$v' round $r"; STATUS=1; }
        grep -v Warning "$LOG/run-$r-$i.txt" | sed "s/^/[$v] /"
        i=$((i + 1))
    done
done
python3 - "$LOG" "$ROUNDS" "$@" <<'PY'
import statistics, sys
log, rounds, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
tf = {}
for r in range(1, rounds + 1):
    for i, v in enumerate(variants):
        for line in open(f"{log}/run-{r}-{i}.txt"):
            f = line.split()
            # pattern, flexattn ms, torch ms, flexattn TF, torch TF, speedup, ...
            if len(f) >= 6 and f[0] != "pattern" and f[3].replace(".", "", 1).isdigit():
                tf.setdefault(f[0], {}).setdefault(v, []).append(float(f[3]))
print("median flexattn TFLOP/s per setting:")
print(f"{'pattern':16s} " + " ".join(f"{(v or 'default')[:24]:>24s}" for v in variants))
for p, per in tf.items():
    print(f"{p:16s} " + " ".join(
        f"{statistics.median(per[v]) if v in per else float('nan'):24.1f}" for v in variants))
PY
rm -rf "$LOG"
exit $STATUS
