#!/bin/bash
# One device call: bench/gpu/run.sh (build, check, time beside PyTorch) plus
# a tile sweep, with every log packed into $OUT/gpu-results.tgz (the
# individual files are many), the updated bench/results files copied to
# $OUT/results, and the summary printed last.
#   OUT=<dir> bench/gpu/device_round.sh [--backward] [--decode] ... (arguments go to run.sh)
set -u
FINAL=${OUT:-$PWD/gpu-out}
export OUT=$FINAL/r
mkdir -p "$OUT"
meson --version 2>&1 | sed 's/^/meson /'
export TILE_SWEEP=${TILE_SWEEP-"4x2x64 4x1x64"} # empty: no sweep
export SWEEP_PATTERNS=${SWEEP_PATTERNS:-"noop causal softcap_approx_causal"}
bash "$(dirname "$0")/run.sh" "$@" > "$OUT/run.out" 2>&1
status=$?
tar czf "$FINAL/gpu-results.tgz" -C "$OUT" .
cp "$OUT/cuda-forward.md" "$FINAL/" 2>/dev/null
# the results files run.sh updated, to be kept with the tree
RESULTS=${RESULTS_DIR-$(cd "$(dirname "$0")/../results" && pwd)}
mkdir -p "$FINAL/results" && cp "$RESULTS"/cuda-forward-*.md "$RESULTS"/cuda-forward-*.jsonl "$RESULTS"/cuda-backward-*.md "$RESULTS"/cuda-backward-*.jsonl "$RESULTS"/decode-*.md "$RESULTS"/decode-*.jsonl "$FINAL/results/" 2>/dev/null
grep -E "^==|check exit|passed|FAIL|ERROR" "$OUT/run.out" | head -60
cat "$OUT/sweep.log" 2>/dev/null
cat "$OUT/cuda-forward.md" 2>/dev/null || tail -40 "$OUT/run.out"
rm -rf "$OUT" # all of it is in the archive; fewer files to send back
[ "$status" -eq 0 ] || echo "FAILED: bench/gpu/run.sh exit $status; bench/results not updated"
exit $status
