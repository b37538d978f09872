#!/bin/bash
# Nsight Compute on one CUDA backward main kernel (flex_bwd_kernel), bf16,
# B4 H16 S8192, for the patterns and head dims given: speed of light, warp
# stall reasons, pipe utilisation, shared-memory and L2 traffic. For
# finding where a backward step's time goes, not for timings. Full reports
# go to $OUT/ncu-PATTERN-dD.txt.
#   bench/gpu/ncu_backward.sh [PATTERN:D ...]    (default noop:128 causal:128 noop:64)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-gpu-build}
cd "$ROOT" || exit 1
LOGS=${OUT:-$PWD/gpu-out}
mkdir -p "$LOGS"
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" FLEXATTN_LIBRARY="$BUILD/libflexattn.so"
for CASE in ${@:-noop:128 causal:128 noop:64}; do
    P=${CASE%%:*} D=${CASE##*:}
    echo "== $P D=$D ${FLEXATTN_DEBUG:+(FLEXATTN_DEBUG=$FLEXATTN_DEBUG)}"
    timeout -k 5 180 ncu --kernel-name flex_bwd_kernel --launch-skip 1 --launch-count 1 \
        --set full --print-details all \
        python3 - "$P" "$D" <<'PY' >"$LOGS/ncu-$P-d$D.txt" 2>&1
import sys, torch
import flexattn.torch as fa
pat, D = sys.argv[1], int(sys.argv[2])
B, H, S = 4, 16, 8192
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
bm = None
if pat == "causal":
    bm = fa.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device="cuda")
for _ in range(2):
    out = fa.flex_attention(q, k, v, block_mask=bm)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
torch.cuda.synchronize()
PY
    grep -E "Stall|stall|Duration|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Eligible Warps|No Eligible|Warp Cycles Per Issued|gmma|bank_conflicts|pcsamp|L2 Hit|Mem Pipes|Shared Memory Configuration Size" "$LOGS/ncu-$P-d$D.txt" | sed 's/  */ /g' | head -60
done
