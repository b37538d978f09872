#!/bin/sh
# Builds flexattn and runs every test: once with -Wall -Wextra -Werror, once
# under AddressSanitizer and UndefinedBehaviorSanitizer, and once without the
# CUDA backend (-Dcuda=disabled); runs each fuzz harness for 30 s. Also
# checks that the installed library links from another program through
# pkg-config.
set -eu
cd "$(dirname "$0")/.."
sh scripts/deps.sh
jobs=$(nproc 2>/dev/null || echo 2)

# meson >= 1.1 reads meson.options, the meson 1.0 of Debian 12
# meson_options.txt: the latter is a symbolic link to the former.
[ "$(readlink meson_options.txt)" = meson.options ]

echo "== strict build (-Werror) and tests"
[ -f build-test/build.ninja ] || meson setup build-test -Dwerror=true -Dbuildtype=debugoptimized
ninja -C build-test
# deps.sh installed clang (clang-19 on Debian 12): the HIP compile checks must run, not skip.
FLEXATTN_REQUIRE_HIP_COMPILE=1 \
    meson test -C build-test --print-errorlogs --num-processes "$jobs" || true

echo "== AddressSanitizer + UndefinedBehaviorSanitizer build and tests"
[ -f build-asan/build.ninja ] || meson setup build-asan -Db_sanitize=address,undefined \
    -Db_lundef=false -Dbuildtype=debugoptimized -Dwerror=true
ninja -C build-asan
# (the HIP kernels are compiled by clang in its own process: the strict
# build's run covers them, this one skips them)
FLEXATTN_SKIP_HIP_COMPILE=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
    meson test -C build-asan --print-errorlogs --num-processes "$jobs" --timeout-multiplier 3 || true

echo "== build without the CUDA backend (-Dcuda=disabled) and tests"
[ -f build-nocuda/build.ninja ] || meson setup build-nocuda -Dcuda=disabled \
    -Dwerror=true -Dbuildtype=debugoptimized
ninja -C build-nocuda
meson test -C build-nocuda --print-errorlogs --num-processes "$jobs" || true

echo "== fuzzing: 30 s of each libFuzzer harness from a fixed seed (tests/fuzz, scripts/fuzz.sh)"
fuzz_status=0
FUZZ_FLAGS=-seed=1 sh scripts/fuzz.sh 30 || fuzz_status=1

echo "== install and link through pkg-config"
prefix=$(mktemp -d)
meson install -C build-test --destdir "$prefix" --quiet
libdir=$(find "$prefix" -name 'flexattn.pc' -exec dirname {} \; | head -n 1)
PKG_CONFIG_SYSROOT_DIR="$prefix" PKG_CONFIG_PATH="$libdir" \
    cc -std=c11 -Wall -Wextra -Werror examples/example.c -o "$prefix/example" \
    $(PKG_CONFIG_SYSROOT_DIR="$prefix" PKG_CONFIG_PATH="$libdir" pkg-config --cflags --libs flexattn) -lm
LD_LIBRARY_PATH="$(dirname "$(find "$prefix" -name 'libflexattn.so' | head -n 1)")" \
    FLEXATTN_BACKEND=cpu "$prefix/example"
rm -rf "$prefix"
echo "== Python package (pip install ./python into build-py/venv), tests and training example"
# torch, numpy and pytest come from PyPI once (about 5 GB with torch's CUDA
# wheels, 1.5 minutes here) and stay in the git-ignored build-py/venv.
# pip keeps no cache copy and unpacks under build-py/ rather than a /tmp
# that may be small; when the disk is short of room for torch, the object
# files of the builds whose tests have run go first (their test logs stay;
# a later run rebuilds them).
venv=build-py/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import torch, numpy, pytest" 2>/dev/null; then
    free_mb=$(df -Pm . | awk 'NR == 2 { print $4 }')
    if [ "$free_mb" -lt 12000 ]; then
        echo "$free_mb MB free: removing the object files of build-asan, build-nocuda and build-fuzz"
        for build in build-asan build-nocuda build-fuzz; do
            [ -f "$build/build.ninja" ] && ninja -C "$build" -t clean > /dev/null
        done
        df -Pm . | awk 'NR == 2 { print $4 " MB free" }'
    fi
    mkdir -p build-py/tmp
    TMPDIR="$PWD/build-py/tmp" "$venv/bin/pip" install -q --no-cache-dir torch numpy pytest
    rm -rf build-py/tmp
fi
"$venv/bin/pip" install -q --force-reinstall --no-deps ./python
(cd python/tests && TORCHINDUCTOR_CACHE_DIR="$(mktemp -d)" "../../$venv/bin/python" -m pytest \
    -q -p no:cacheprovider --junitxml=../../build-py/pytest.xml .) || true
if "$venv/bin/python" examples/train_gpt.py --device cpu --steps 20 --seq 128 --batch 4 \
    --layers 2 --width 128 --heads 4 --window 48 --vocab 64 --lr 3e-3 --expect-loss-drop \
    > build-py/train_gpt.log 2>&1; then
    echo "train_gpt: the loss fell ($(tail -n 1 build-py/train_gpt.log | cut -c1-120)...)"
    train=ok
else
    tail -n 20 build-py/train_gpt.log
    train=failed
fi

echo "== all suites, every build, and the Python tests"
[ "$fuzz_status" -eq 0 ] || echo "failed: the fuzz campaign found an input (build-fuzz/crash-*)"
python3 scripts/test_summary.py build-test build-asan build-nocuda build-py/pytest.xml "train_gpt=$train"
exit "$fuzz_status"
