#!/bin/sh
# The CUDA backward main kernel's machine code for one configuration,
# without a GPU: flexattn-emit's source compiled by nvcc for sm_90a
# (ptxas -v: registers and spills on stderr), then cuobjdump -sass.
#
#   scripts/bwd_sass.sh BUILD_DIR OUT_PREFIX [flexattn-emit arguments...]
#
# writes OUT_PREFIX.cu, .cubin, .ptxas and .sass (flex_bwd_kernel only).
# NVCC defaults to /usr/local/cuda/bin/nvcc; cuobjdump is taken from PATH
# (the CUDA toolkit's, or PyPI's nvidia-cuda-cuobjdump).
set -eu
build=$1
out=$2
shift 2
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
"$build/tools/flexattn-emit" "$@" > "$out.cu"
"$nvcc" -arch=sm_90a -cubin -Xptxas -v -o "$out.cubin" "$out.cu" > "$out.ptxas" 2>&1
grep -A2 "Function properties for flex_bwd_kernel" "$out.ptxas" | tail -n 2
cuobjdump -sass -fun flex_bwd_kernel "$out.cubin" > "$out.sass"
