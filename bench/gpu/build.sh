#!/bin/bash
# Builds the library (release, no tests), bench_cuda and the GPU test
# programs (test_cuda_backward, test_cuda_decode, test_cuda_partial_bits) in $BUILD (default
# /tmp/flexattn-gpu-build); on an existing build only what changed. The
# test programs are built by hand because meson builds the
# tests only where the check library is, and GPU machines may lack it. The
# log goes to stdout; the exit status says whether all of them built.
#   bench/gpu/build.sh
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUILD=${BUILD:-/tmp/flexattn-gpu-build}
cd "$ROOT" || exit 1
if command -v meson >/dev/null 2>&1; then MESON=(meson); else MESON=(python3 -m mesonbuild.mesonmain); fi
[ -f "$BUILD/build.ninja" ] || { rm -rf "$BUILD"; "${MESON[@]}" setup "$BUILD" -Dtests=disabled -Dbuildtype=release; } &&
    ninja -C "$BUILD" &&
    cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude bench/gpu/bench_cuda.c -L"$BUILD" -lflexattn -lm \
        -Wl,-rpath,"$BUILD" -o "$BUILD/bench_cuda" &&
    for T in test_cuda_backward test_cuda_decode test_cuda_partial_bits; do
        cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude -Icore -I. -I"$BUILD" "tests/$T.c" \
            "$BUILD/libflexattn_internal.a" -fopenmp -lm -ldl -lpthread -o "$BUILD/$T" || exit 1
    done
