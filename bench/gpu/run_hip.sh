#!/bin/bash
# For a machine with an AMD GPU and ROCm (the project has none: its HIP
# code is compiled, never run). One command: build, `flexattn check
# --backend hip`, then time the HIP forward (bf16) per pattern with
# `flexattn run --json`, beside PyTorch's compiled flex_attention and SDPA
# (bench/gpu/torch_reference.py; ROCm builds of PyTorch answer to "cuda")
# when PyTorch is installed. Logs go to $OUT (default ./hip-out). Only when
# every check passes is the table written to
# $RESULTS_DIR/hip-forward-<gpu>.md (default bench/results; the previous
# table is kept below the new one) and the records appended to
# hip-forward-<gpu>.jsonl; otherwise the run says FAILED and exits 1.
#   bench/gpu/run_hip.sh [--skip-torch] [--len S]
set -u
OUT=${OUT:-$PWD/hip-out}
mkdir -p "$OUT"
rm -f "$OUT/failures.txt"
FAILED=0
fail() {
    FAILED=1
    echo "FAILED: $*" | tee -a "$OUT/failures.txt" >&2
}
SKIP_TORCH=0 LEN=8192
while [ $# -gt 0 ]; do
    case "$1" in
    --skip-torch) SKIP_TORCH=1 ;;
    --len) LEN=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
    esac
    shift
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-hip-build}
cd "$ROOT" || exit 1
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
FLEXATTN=$BUILD/tools/flexattn

echo "== build" | tee "$OUT/build.log"
{ [ -f "$BUILD/build.ninja" ] || meson setup "$BUILD" -Dbuildtype=release -Dhip=enabled -Dtests=disabled; } \
    >>"$OUT/build.log" 2>&1 && ninja -C "$BUILD" >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
"$FLEXATTN" info | tee -a "$OUT/build.log"
(rocm-smi --showproductname 2>/dev/null || true) | tee -a "$OUT/build.log"

echo "== flexattn check --backend hip"
FLEXATTN_CACHE_DIR=off timeout -k 5 "${CHECK_TIMEOUT:-600}" "$FLEXATTN" check --backend hip >"$OUT/check.log" 2>&1
STATUS=$?
tail -1 "$OUT/check.log"
LAST=$(tail -1 "$OUT/check.log")
# At least one case passed (an unusable backend is "0 passed, 0 failed, 1
# skipped"), none failed.
if ! echo "$LAST" | grep -Eq '^[1-9][0-9]* passed, 0 failed, [0-9]+ skipped$' || [ "$STATUS" -ne 0 ]; then
    fail "flexattn check --backend hip: exit $STATUS: $LAST"
fi

echo "== flexattn HIP forward, bf16, B=4 H=16 S=$LEN D=128"
: >"$OUT/flexattn.jsonl"
for P in ${PATTERNS:-noop causal sliding_window prefix_lm document alibi softcap}; do
    timeout -k 5 300 "$FLEXATTN" run "$P" --backend hip --dtype bf16 -B 4 -H 16 -D 128 \
        --len "$LEN" --iters 20 --json >>"$OUT/flexattn.jsonl" 2>>"$OUT/run.log" ||
        fail "flexattn run $P --backend hip"
done
cat "$OUT/flexattn.jsonl"

rm -f "$OUT/torch.jsonl"
if [ "$SKIP_TORCH" = 0 ] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "== PyTorch"
    PYTHONUNBUFFERED=1 timeout -k 5 600 python3 bench/gpu/torch_reference.py --len "$LEN" \
        --json "$OUT/torch.jsonl" 2>&1 | grep -v Warning | tee "$OUT/torch.log"
fi

[ "$FAILED" = 0 ] && RESULTS_DIR=${RESULTS_DIR-$ROOT/bench/results} || RESULTS_DIR=
python3 - "$OUT" "$COMMIT" "$RESULTS_DIR" <<'PY'
import json, os, re, sys
out, commit, results_dir = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
runs, torch_rows = load("flexattn.jsonl"), load("torch.jsonl")
ref = {(r["pattern"], r["impl"]): r for r in torch_rows}
device = runs[0]["device"] if runs else "?"
lines = ["# HIP forward, bf16" + (f", B={runs[0]['B']} H={runs[0]['H']} S={runs[0]['q_len']} D={runs[0]['D']}" if runs else ""),
         "", f"device: {device}; commit {commit}; command: bench/gpu/run_hip.sh", "",
         "| pattern | flexattn TFLOP/s | torch flex TFLOP/s | ratio | SDPA flash | ratio |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
for r in runs:
    cells = [r["name"], f"{r['fw_tflops']:.1f}"]
    for impl in ("torch_flex", "sdpa_flash"):
        t = ref.get((r["name"], impl))
        cells += [f"{t['tflops']:.1f}", f"{r['fw_tflops'] / t['tflops']:.2f}"] if t else ["-", "-"]
    lines.append("| " + " | ".join(cells) + " |")
check = open(os.path.join(out, "check.log")).read().strip().splitlines()
lines += ["", "`flexattn check --backend hip` in the same run: " + (check[-1] if check else "not run") + ".",
          "TFLOP/s count 4*B*H*S*S*D times the block mask's density (flexattn run's median)."]
open(os.path.join(out, "hip-forward.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
m = re.search(r"\((gfx\w+)", device) or re.search(r"(MI\d+\w*)", device)
if results_dir and runs:
    name = re.search(r"(MI\d+\w*|RX\s?\d+\w*)", device)
    gpu = (name.group(1) if name else (m.group(1) if m else "amd")).replace(" ", "").lower()
    stem = os.path.join(results_dir, "hip-forward-" + gpu)
    old = open(stem + ".md").read() if os.path.exists(stem + ".md") else ""
    text = "\n".join(lines) + "\n"
    if old.strip():
        text += "\n## Earlier run\n\n" + old.split("\n", 1)[-1].lstrip("\n")
    open(stem + ".md", "w").write(text)
    with open(stem + ".jsonl", "a") as f:
        for r in runs: f.write(json.dumps(dict(r, commit=commit)) + "\n")
    print(f"results: {stem}.md, {stem}.jsonl")
PY
if [ "$FAILED" != 0 ]; then
    echo "FAILED: nothing written to the results folder; failures:" >&2
    cat "$OUT/failures.txt" >&2
    exit 1
fi
