#!/bin/bash
# The Python package on the GPU machine: builds the library, puts the package
# on PYTHONPATH, runs the parity tests on CUDA (python/tests with
# FLEXATTN_TEST_DEVICE=cuda), then trains examples/train_gpt.py for $STEPS
# steps (default 200) through flexattn.torch and through torch's
# flex_attention with the same seed, and prints both loss curves' summary
# and tokens/s. Needs torch and pytest installed (no network is needed).
#   bench/gpu/python_parity.sh            # logs under $OUT (default ./gpu-out)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-gpu-build}
OUT=${OUT:-$PWD/gpu-out}
STEPS=${STEPS:-200}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$ROOT" || exit 1
"$PY" -c "import torch, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0))" || { echo "torch with CUDA and pytest are needed"; exit 1; }
bash bench/gpu/build.sh > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
export FLEXATTN_LIBRARY="$BUILD/libflexattn.so"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$OUT/inductor-cache"

echo "== parity tests on CUDA"
(cd python/tests && FLEXATTN_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rfEx \
    --junitxml="$OUT/pytest-cuda.xml" . > "$OUT/pytest-cuda.log" 2>&1)
tests=$?
grep -E "^(FAILED|ERROR|XFAIL)|passed|failed" "$OUT/pytest-cuda.log" | tail -40

echo "== train_gpt, $STEPS steps, same seed: flexattn.torch and torch's flex_attention"
status=0
for impl in flexattn torch; do
    "$PY" examples/train_gpt.py --impl "$impl" --device cuda --steps "$STEPS" --dtype bfloat16 \
        --compile --seed 0 > "$OUT/train-$impl.log" 2>&1 ||
        { echo "train_gpt --impl $impl failed:"; tail -15 "$OUT/train-$impl.log"; status=1; }
done
"$PY" - "$OUT/train-flexattn.log" "$OUT/train-torch.log" <<'PYEOF'
import json, sys
runs = {}
for path in sys.argv[1:]:
    for line in open(path):
        if line.startswith("SUMMARY "):
            s = json.loads(line[8:])
            runs[s["impl"]] = s
for impl, s in runs.items():
    print(f"{impl:9s} loss {s['first_quarter_loss']:.4f} -> {s['last_quarter_loss']:.4f} "
          f"(final {s['final_loss']:.4f}), {s['tokens_per_s']:.0f} tokens/s")
if len(runs) == 2:
    a, b = runs["flexattn"]["losses"], runs["torch"]["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    tail = diffs[len(diffs) // 2:]
    print(f"loss curves: max |diff| {max(diffs):.4f}, mean |diff| over the second half "
          f"{sum(tail) / len(tail):.4f}; tokens/s flexattn/torch "
          f"{runs['flexattn']['tokens_per_s'] / runs['torch']['tokens_per_s']:.2f}")
PYEOF
[ "$tests" -eq 0 ] && exit $status
exit 1
