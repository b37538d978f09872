#!/bin/sh
# Installs the build dependencies that are missing (Debian/Ubuntu, as root
# or with sudo). Safe to run again: it installs only what is absent.
set -eu
need=""
for pkg in gcc libc6-dev meson ninja-build pkg-config check; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need="$need $pkg"
done
if [ -n "$need" ]; then
    echo "installing:$need"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $need
fi
