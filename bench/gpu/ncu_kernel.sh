#!/bin/bash
# Nsight Compute on one CUDA main kernel, bf16, B4 H16 S$LEN (default
# 8192): the backward's (flex_bwd_kernel) by default, the forward's
# (flex_forward_kernel) with --forward first. Speed of light, warp stall
# reasons, pipe utilisation, shared-memory and L2 traffic, and the stall
# samples of every SASS instruction. For finding where a step's time goes,
# not for timings. Full reports go to $OUT/ncu-KIND-PATTERN-dD.txt, the
# per-instruction table to $OUT/ncu-KIND-PATTERN-dD-sass.csv.gz.
#   bench/gpu/ncu_kernel.sh [--forward] [PATTERN:D ...]   (default noop:128 causal:128 noop:64)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-gpu-build}
cd "$ROOT" || exit 1
LOGS=${OUT:-$PWD/gpu-out}
mkdir -p "$LOGS"
KIND=backward KERNEL=flex_bwd_kernel
if [ "${1:-}" = --forward ]; then
    KIND=forward KERNEL=flex_forward_kernel
    shift
fi
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}" FLEXATTN_LIBRARY="$BUILD/libflexattn.so"
for CASE in ${@:-noop:128 causal:128 noop:64}; do
    P=${CASE%%:*} D=${CASE##*:}
    NAME="$LOGS/ncu-$KIND-$P-d$D"
    echo "== $KIND $P D=$D S=${LEN:-8192} ${FLEXATTN_DEBUG:+(FLEXATTN_DEBUG=$FLEXATTN_DEBUG)}"
    timeout -k 5 180 ncu --kernel-name "$KERNEL" --launch-skip 1 --launch-count 1 \
        --set full --import-source no -f -o "$NAME" \
        python3 - "$P" "$D" "$KIND" "${LEN:-8192}" <<'PY' >"$NAME.log" 2>&1
import sys, torch
import flexattn.torch as fa
pat, D, kind, S = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
B, H = 4, 16
q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
bm = None
if pat == "causal":
    bm = fa.create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device="cuda")
for _ in range(2):
    out = fa.flex_attention(q, k, v, block_mask=bm)
    if kind == "backward":
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
torch.cuda.synchronize()
PY
    ncu --import "$NAME.ncu-rep" --print-details all > "$NAME.txt" 2>&1
    ncu --import "$NAME.ncu-rep" --page source --print-source sass --csv 2>&1 | gzip > "$NAME-sass.csv.gz"
    rm -f "$NAME.ncu-rep"
    # the report repeats some lines once per section (SM Frequency): each once
    grep -E "Stall|stall|Duration|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Eligible Warps|No Eligible|Warp Cycles Per Issued|gmma|bank_conflicts|pcsamp|L2 Hit|Mem Pipes|Shared Memory Configuration Size|SM Frequency" "$NAME.txt" | sed 's/  */ /g' | awk '!seen[$0]++' | head -60
done
