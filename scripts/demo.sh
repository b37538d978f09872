#!/bin/sh
# Builds flexattn and runs the demo on the default backend (FLEXATTN_BACKEND,
# else the best usable one): document-causal masking with an ALiBi score mod,
# the block mask, the time, and the error against the fp64 oracle.
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
./build/tools/flexattn info
./build/tools/flexattn run alibi --mask document_causal --docs 6 -B 1 -H 8 --len 2048 -D 64 \
    --dtype f32 --check
