#!/bin/sh
# A CUDA kernel's machine code for one configuration, without a GPU:
# flexattn-emit's source compiled by nvcc for sm_90a (ptxas -v: registers,
# stack frame and spills on stderr), then cuobjdump -sass. The backward's
# main kernel by default; with --forward among the arguments, the forward.
#
#   scripts/kernel_sass.sh BUILD_DIR OUT_PREFIX [flexattn-emit arguments...]
#
# writes OUT_PREFIX.cu, .cubin, .ptxas and .sass (the one kernel) and
# prints the kernel's ptxas summary and its SASS instruction count.
# NVCC defaults to /usr/local/cuda/bin/nvcc; cuobjdump is taken from PATH
# (the CUDA toolkit's, or PyPI's nvidia-cuda-cuobjdump).
set -eu
build=$1
out=$2
shift 2
nvcc=${NVCC:-/usr/local/cuda/bin/nvcc}
kernel=flex_bwd_kernel
for a in "$@"; do [ "$a" = --forward ] && kernel=flex_forward_kernel; done
"$build/tools/flexattn-emit" "$@" > "$out.cu"
"$nvcc" -arch=sm_90a -cubin -Xptxas -v -o "$out.cubin" "$out.cu" > "$out.ptxas" 2>&1
grep -A2 "Function properties for $kernel" "$out.ptxas" | tail -n 2
cuobjdump -sass -fun "$kernel" "$out.cubin" > "$out.sass"
echo "$(grep -cE '^ +/\*[0-9a-f]+\*/' "$out.sass") SASS instructions"
