#!/bin/sh
# Installs the build dependencies that are missing (Debian/Ubuntu, as root
# or with sudo). Safe to run again: it installs only what is absent.
set -eu
need=""
for pkg in gcc libc6-dev meson ninja-build pkg-config check; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
# clang with the AMDGPU target compiles the HIP kernels in the tests
# (tests/test_hip_codegen.c): clang-16 knows gfx90a, gfx940 and gfx1100.
# Only the compiler: no ROCm runtime is needed to compile.
if ! command -v clang-16 >/dev/null 2>&1 && ! command -v clang-17 >/dev/null 2>&1 &&
    ! command -v clang-18 >/dev/null 2>&1; then
    need="$need clang-16"
fi
if [ -n "$need" ]; then
    echo "installing:$need"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
