#!/bin/sh
# Installs the build dependencies that are missing (Debian/Ubuntu, as root
# or with sudo). Safe to run again: it installs only what is absent.
set -eu
need=""
for pkg in gcc libc6-dev meson ninja-build pkg-config check; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
# clang with the AMDGPU target compiles the HIP kernels in the tests
# (tests/test_hip_codegen.c) for gfx90a, gfx942 and gfx1100; gfx942 (MI300)
# needs clang 17 or newer, so the newest packaged clang is taken (Debian 12
# has clang-19; clang-16 knows gfx940 only). Only the compiler: no ROCm
# runtime is needed to compile.
want_clang=1
for v in 17 18 19 20 21; do
    command -v "clang-$v" >/dev/null 2>&1 && want_clang=0
done
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ -n "$need" ] || [ "$want_clang" -eq 1 ]; then
    $SUDO apt-get update -qq
fi
if [ "$want_clang" -eq 1 ]; then
    for v in 19 18 17 16; do
        if apt-cache show "clang-$v" >/dev/null 2>&1; then
            command -v "clang-$v" >/dev/null 2>&1 || need="$need clang-$v"
            break
        fi
    done
fi
if [ -n "$need" ]; then
    echo "installing:$need"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
