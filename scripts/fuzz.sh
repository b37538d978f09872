#!/bin/sh
# Builds the libFuzzer harnesses of tests/fuzz/ with clang (the library
# instrumented for coverage, AddressSanitizer and UndefinedBehaviorSanitizer)
# and runs each for a while.
#
#   sh scripts/fuzz.sh [SECONDS] [HARNESS...]
#
# SECONDS per harness (default 30); HARNESS among mod and npy (default
# both). New inputs go to build-fuzz/corpus/NAME (the seeds in
# tests/fuzz/corpus/NAME are read, never written); a failing input is saved
# as build-fuzz/crash-* and the script exits non-zero. Extra libFuzzer
# flags may come in FUZZ_FLAGS (e.g. FUZZ_FLAGS=-runs=1000000). Each run's
# execution count is printed at the end.
set -eu
cd "$(dirname "$0")/.."
seconds=${1:-30}
[ $# -gt 0 ] && shift
harnesses=${*:-mod npy}

sh scripts/deps.sh
need=""
command -v clang >/dev/null 2>&1 || need="$need clang"
# libFuzzer's runtime ships with clang's compiler-rt
if ! clang -print-file-name=libclang_rt.fuzzer-x86_64.a | grep -q /; then
    v=$(clang -dumpversion | cut -d. -f1)
    need="$need libclang-rt-$v-dev"
fi
if [ -n "$need" ]; then
    echo "installing:$need"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi

# The library: clang, coverage for libFuzzer, both sanitizers, no OpenMP
# (one thread, deterministic), no CUDA.
if [ ! -f build-fuzz/build.ninja ]; then
    CC=clang meson setup build-fuzz -Dbuildtype=debugoptimized -Db_sanitize=address,undefined \
        -Db_lundef=false -Dopenmp=disabled -Dcuda=disabled -Dtests=disabled \
        -Dc_args='-fsanitize=fuzzer-no-link -fno-sanitize-recover=undefined'
fi
ninja -C build-fuzz libflexattn_internal.a

flags="-std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -D_POSIX_C_SOURCE=200809L -Iinclude -Icore -I. -Ibuild-fuzz -Itests -Itools"
for h in $harnesses; do
    case $h in
    mod) srcs="tests/fuzz/fuzz_mod.c tests/oracle.c tests/oracle_backward.c tests/oracle_mod.c tests/refmod.c tests/tolerance.c" ;;
    npy) srcs="tests/fuzz/fuzz_npy.c tools/npy.c" ;;
    *) echo "unknown harness $h (mod, npy)" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    clang $flags $srcs build-fuzz/libflexattn_internal.a -lm -ldl -lpthread -o "build-fuzz/fuzz_$h"
done

status=0
for h in $harnesses; do
    mkdir -p "build-fuzz/corpus/$h"
    dict=""
    [ -f "tests/fuzz/$h.dict" ] && dict="-dict=tests/fuzz/$h.dict"
    log="build-fuzz/fuzz_$h.log"
    echo "== fuzz_$h for ${seconds}s"
    # shellcheck disable=SC2086
    if ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
        FLEXATTN_CACHE_DIR=off "build-fuzz/fuzz_$h" -max_total_time="$seconds" -max_len=2048 \
        -timeout=20 -print_final_stats=1 -artifact_prefix=build-fuzz/ $dict ${FUZZ_FLAGS:-} \
        "build-fuzz/corpus/$h" "tests/fuzz/corpus/$h" >"$log" 2>&1; then
        runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
        echo "fuzz_$h: ${runs:-?} executions, no finding"
    else
        status=1
        echo "fuzz_$h: FAILED (log: $log)"
        tail -n 40 "$log"
    fi
done
exit $status
