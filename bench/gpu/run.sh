#!/bin/bash
# One device call: build, `flexattn check --backend cuda`, then time the CUDA
# forward beside PyTorch (compiled flex_attention, SDPA flash and cuDNN).
# Every GPU program runs under a timeout (CHECK_TIMEOUT, default 240 s, for
# each check): a kernel that hangs ends its step, not the device call.
# Logs and results go to $OUT (default ./gpu-out): check.log, bench.log,
# torch.log, cuda-forward.jsonl, cuda-forward.md. The run's table and ratios
# also go to $RESULTS_DIR (default bench/results; empty: not written):
# cuda-forward-<gpu>.md gets them on top (the previous top becomes "Earlier
# run at commit ..."), cuda-forward-<gpu>.jsonl one JSON line per pattern.
# When any check or the benchmark's verification fails (or crashes, or
# times out), the run says FAILED, writes nothing into $RESULTS_DIR and
# exits 1. Every check summary line reads "N passed, N failed, N skipped".
# The check also runs the GPU test programs test_cuda_backward,
# test_cuda_decode (the CUDA backward and decode against the CPU's) and
# test_cuda_partial_bits (the forward with partial-block bit masks against
# the forward evaluating the mask, bit for bit); --backward adds bench/gpu/backward.py (the backward beside
# torch's, its gradients checked; cuda-backward-<gpu>.md and .jsonl);
# --decode adds bench/gpu/decode.py (decode beside torch flex, SDPA flash
# and cuDNN, its outputs checked; decode-<gpu>.md and .jsonl);
# --skip-forward leaves out the forward's timing (bench_cuda, torch).
# BENCH_TIMEOUT (default 300) bounds each of those Python benchmarks in seconds.
#   bench/gpu/run.sh [--skip-check] [--skip-torch] [--skip-forward] [--backward] [--decode]
#                    [--len S]
set -u
FAILED=0
# Records a failed step: its name on stderr and in $OUT/failures.txt.
fail() {
    FAILED=1
    echo "FAILED: $*" | tee -a "$OUT/failures.txt" >&2
}
# One check run's summary from its log and exit status: the log's last line
# when it is the "N passed, N failed, N skipped" count, else a failure
# (a crash or a timeout leaves no count).
check_summary() { # LOG STATUS LABEL
    local last
    last=$(tail -1 "$1")
    if ! echo "$last" | grep -Eq '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$'; then
        fail "$3: no summary (exit $2): $last"
        last="no summary (exit $2)"
    elif [ "$2" -ne 0 ]; then
        fail "$3: exit $2: $last"
    elif echo "$last" | grep -Eq '^0 passed'; then
        fail "$3: nothing passed: $last"
    fi
    echo "$3: $last" >>"$OUT/check-summary.txt"
}
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
rm -f "$OUT/failures.txt"
SKIP_CHECK=0 SKIP_TORCH=0 SKIP_FORWARD=0 BACKWARD=0 DECODE=0 LEN=8192
while [ $# -gt 0 ]; do
    case "$1" in
    --skip-check) SKIP_CHECK=1 ;;
    --skip-torch) SKIP_TORCH=1 ;;
    --backward) BACKWARD=1 ;;
    --decode) DECODE=1 ;;
    --skip-forward) SKIP_FORWARD=1; SKIP_TORCH=1 ;;
    --len) LEN=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
    esac
    shift
done
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-gpu-build}
cd "$ROOT" || exit 1
COMMIT=${FLEXATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

echo "== build" | tee "$OUT/build.log"
BUILD=$BUILD bash bench/gpu/build.sh >>"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/build.log"

RESULTS_DIR=${RESULTS_DIR-$ROOT/bench/results}
: >"$OUT/check-summary.txt"
if [ "$SKIP_CHECK" = 0 ]; then
    # CHECK_TILES: "default" and/or FLEXATTN_DEBUG cuda_tile values
    # (WARPSxMTILESxKVSTEP, e.g. 4x2x64) to check with.
    for T in ${CHECK_TILES:-default}; do
        echo "== flexattn check --backend cuda (tiles: $T)"
        T0=$(date +%s)
        if [ "$T" = default ]; then DEBUG=; else DEBUG=cuda_tile=$T; fi
        FLEXATTN_DEBUG=$DEBUG FLEXATTN_CACHE_DIR=off timeout -k 5 "${CHECK_TIMEOUT:-240}" "$BUILD/tools/flexattn" check --backend cuda ${CHECK_ARGS:-} >"$OUT/check-$T.log" 2>&1
        STATUS=$?
        echo "check exit $STATUS in $(( $(date +%s) - T0 )) s"
        grep -E "FAIL|ERROR|error" "$OUT/check-$T.log" | head -20
        tail -1 "$OUT/check-$T.log"
        check_summary "$OUT/check-$T.log" "$STATUS" "tiles $T"
    done
    # CHECK_ENVS: more checks, each under one FLEXATTN_DEBUG value
    # (comma-separated key=value settings, docs/debugging.md); the default
    # makes every CTA of the persistent grid walk many tiles, then checks
    # the forward with the cuts of its step (cuda_step_cuts), on one tile a
    # CTA and on the persistent grid.
    for E in ${CHECK_ENVS-cuda_persistent=1,cuda_ctas=3 cuda_step_cuts=1 cuda_step_cuts=1,cuda_persistent=1,cuda_ctas=3}; do
        ENV_TAG=$(printf '%s' "$E" | tr ',=' '_-')
        echo "== flexattn check --backend cuda (FLEXATTN_DEBUG=$E)"
        T0=$(date +%s)
        FLEXATTN_DEBUG=$E FLEXATTN_CACHE_DIR=off timeout -k 5 "${CHECK_TIMEOUT:-240}" "$BUILD/tools/flexattn" check --backend cuda \
            ${CHECK_ARGS:-} >"$OUT/check-env-$ENV_TAG.log" 2>&1
        STATUS=$?
        echo "check exit $STATUS in $(( $(date +%s) - T0 )) s"
        grep -E "FAIL|ERROR|error" "$OUT/check-env-$ENV_TAG.log" | head -20
        tail -1 "$OUT/check-env-$ENV_TAG.log"
        check_summary "$OUT/check-env-$ENV_TAG.log" "$STATUS" "$E"
    done
    # The GPU test programs: PASS and FAIL lines; exit 77 (no GPU) fails here.
    for T in test_cuda_backward test_cuda_decode test_cuda_partial_bits; do
        echo "== $T"
        T0=$(date +%s)
        FLEXATTN_CACHE_DIR=off timeout -k 5 "${CHECK_TIMEOUT:-240}" "$BUILD/$T" >"$OUT/$T.log" 2>&1
        STATUS=$?
        echo "$T exit $STATUS in $(( $(date +%s) - T0 )) s"
        grep -E "^(FAIL|SKIPPED)" "$OUT/$T.log" | head -20
        P=$(grep -c "^PASS" "$OUT/$T.log") F=$(grep -c "^FAIL" "$OUT/$T.log")
        S=0
        [ "$STATUS" -eq 77 ] && S=1
        echo "$T: $P passed, $F failed, $S skipped" >>"$OUT/check-summary.txt"
        [ "$STATUS" -eq 0 ] || fail "$T: exit $STATUS ($P passed, $F failed, $S skipped)"
    done
fi

if [ "$SKIP_FORWARD" = 0 ]; then
echo "== flexattn CUDA forward (cold cache, then warm cache in a new process)"
CACHE=$(mktemp -d)
rm -f "$OUT/flexattn-cold.jsonl" "$OUT/flexattn-warm.jsonl" "$OUT/torch.jsonl"
# Cold means no compiled kernel anywhere: NVRTC (CUDA 12.9 and later) keeps
# its own cache of compiled programs under $HOME/.nv/ComputeCache, so the
# cold process gets a fresh HOME as well as a fresh flexattn cache.
COLD_HOME=$(mktemp -d)
# The cold run also verifies each pattern against the CPU backend; it exits
# 1 when one fails.
HOME=$COLD_HOME XDG_CACHE_HOME=$COLD_HOME/.cache FLEXATTN_CACHE_DIR=$CACHE timeout -k 5 180 "$BUILD/bench_cuda" \
    --len "$LEN" --json "$OUT/flexattn-cold.jsonl" 2>&1 | tee "$OUT/bench.log"
STATUS=${PIPESTATUS[0]}
[ "$STATUS" -eq 0 ] || fail "bench_cuda (cold, with verification): exit $STATUS"
FLEXATTN_CACHE_DIR=$CACHE timeout -k 5 120 "$BUILD/bench_cuda" --no-verify --len "$LEN" --json "$OUT/flexattn-warm.jsonl" 2>&1 | tee -a "$OUT/bench.log"
STATUS=${PIPESTATUS[0]}
[ "$STATUS" -eq 0 ] || fail "bench_cuda (warm): exit $STATUS"
fi

if [ -n "${TILE_SWEEP:-}" ] && [ "$SKIP_FORWARD" = 0 ]; then
    echo "== tile sweep (FLEXATTN_DEBUG=cuda_tile=WARPSxM-TILES PER WARPxKV STEP)"
    for T in $TILE_SWEEP; do
        for P in ${SWEEP_PATTERNS:-causal}; do
            echo -n "tile $T: "
            FLEXATTN_DEBUG=cuda_tile=$T FLEXATTN_CACHE_DIR=$CACHE timeout -k 5 60 "$BUILD/bench_cuda" --no-verify --len "$LEN" --only "$P" --iters 10 2>&1 | tail -1
        done
    done | tee "$OUT/sweep.log"
fi

if [ "$SKIP_TORCH" = 0 ]; then
    echo "== PyTorch"
    PYTHONUNBUFFERED=1 timeout -k 5 300 python3 bench/gpu/torch_reference.py --len "$LEN" --json "$OUT/torch.jsonl" 2>&1 \
        | grep -v Warning | tee "$OUT/torch.log"
fi

# bench/gpu/NAME.py beside PyTorch with the library just built, its log in
# $OUT/NAME.log; its result files only when every check so far passed.
python_bench() {
    local name=$1 results=$RESULTS_DIR
    shift
    [ "$FAILED" = 0 ] || results=
    PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" FLEXATTN_LIBRARY="$BUILD/libflexattn.so" \
        FLEXATTN_COMMIT=$COMMIT PYTHONUNBUFFERED=1 timeout -k 5 "${BENCH_TIMEOUT:-300}" python3 "bench/gpu/$name.py" \
        "$@" --results "$results" 2>&1 | grep -v Warning | tee "$OUT/$name.log"
    local status=${PIPESTATUS[0]}
    [ "$status" -eq 0 ] || fail "bench/gpu/$name.py: exit $status"
}

if [ "$BACKWARD" = 1 ]; then
    echo "== CUDA backward beside PyTorch (bench/gpu/backward.py)"
    python_bench backward --len "$LEN"
fi

if [ "$DECODE" = 1 ]; then
    echo "== decode beside PyTorch (bench/gpu/decode.py)"
    python_bench decode
fi

[ "$FAILED" = 0 ] || RESULTS_DIR=
python3 - "$OUT" "$COMMIT" "$RESULTS_DIR" <<'PY'
import json, os, re, sys
out, commit, results_dir = sys.argv[1], sys.argv[2], sys.argv[3]
def load(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
cold, warm, torch_rows = load("flexattn-cold.jsonl"), load("flexattn-warm.jsonl"), load("torch.jsonl")
ref = {(r["pattern"], r["impl"]): r for r in torch_rows}
cold_first = {r["pattern"]: r["first_call_ms"] for r in cold}
cold_verify = {r["pattern"]: r.get("verify_rel", -1) for r in cold}  # the warm run does not verify
device = warm[0]["device"] if warm else "?"
lines = [f"# CUDA forward, bf16, B={warm[0]['B']} H={warm[0]['H']} S={warm[0]['S']} D={warm[0]['D']}" if warm else "# CUDA forward",
         "", f"device: {device}; commit {commit}; command: bench/gpu/run.sh", "",
         "| pattern | flexattn TFLOP/s | torch flex TFLOP/s | ratio | SDPA flash | ratio | cuDNN | ratio | first call cold ms | first call warm ms |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
records = []
for r in warm:
    p = r["pattern"]
    base = "softcap_causal" if p == "softcap_approx_causal" else p
    cells = [p, f"{r['tflops']:.1f}"]
    for impl in ("torch_flex", "sdpa_flash", "sdpa_cudnn"):
        t = ref.get((base, impl))
        cells += [f"{t['tflops']:.1f}", f"{r['tflops'] / t['tflops']:.2f}"] if t else ["-", "-"]
    cells += [f"{cold_first.get(p, float('nan')):.0f}", f"{r['first_call_ms']:.1f}"]
    lines.append("| " + " | ".join(cells) + " |")
    rec = dict(r, commit=commit, first_call_cold_ms=cold_first.get(p), verify_rel=cold_verify.get(p, -1))
    for impl in ("torch_flex", "sdpa_flash", "sdpa_cudnn"):
        t = ref.get((base, impl))
        if t: rec[impl + "_tflops"] = t["tflops"]
    records.append(rec)
checked = [f"{r['pattern']} {r['verify_rel']:.1e}" for r in cold if r.get("verify_rel", -1) >= 0]
lines += ["", "Output of the last (batch, head) against the CPU backend's, max |gpu - cpu| / max |cpu| "
          "(bench_cuda's check; at most 1e-2 passes): " + (", ".join(checked) if checked else "not run") + "."]
checks = [l.strip() for l in open(os.path.join(out, "check-summary.txt")) if l.strip()]
lines += ["", "`flexattn check --backend cuda` in the same run: " + ("; ".join(checks) if checks else "not run") + "."]
lines += ["", "softcap_approx_causal is compared with PyTorch's exact-tanh soft-cap (the same pattern).",
          "TFLOP/s count 4*B*H*S*S*D times the block mask's density; medians of 20 runs."]
open(os.path.join(out, "cuda-forward.md"), "w").write("\n".join(lines) + "\n")
with open(os.path.join(out, "cuda-forward.jsonl"), "w") as f:
    for rec in records: f.write(json.dumps(rec) + "\n")
print("\n".join(lines))
# The results folder: this run's table on top of the GPU's file, the
# previous top demoted to an earlier run; the records appended.
model = re.search(r"NVIDIA\s+(\S+)", device)
if results_dir and records and model:
    stem = os.path.join(results_dir, "cuda-forward-" + model.group(1).lower())
    old = open(stem + ".md").read() if os.path.exists(stem + ".md") else ""
    if old.startswith("# "):
        old = old.split("\n", 1)[1] if "\n" in old else ""
    old_commit = re.search(r"commit (\w+)", old)
    text = "\n".join(lines) + "\n"
    if old.strip():
        text += "\n## Earlier run at commit " + (old_commit.group(1) if old_commit else "?") + "\n\n" + old.lstrip("\n")
    open(stem + ".md", "w").write(text)
    with open(stem + ".jsonl", "a") as f:
        for rec in records: f.write(json.dumps(rec) + "\n")
    print(f"results: {stem}.md, {stem}.jsonl")
PY
if [ "$FAILED" != 0 ]; then
    echo "FAILED: nothing written to the results folder; failures:" >&2
    cat "$OUT/failures.txt" >&2
    exit 1
fi
