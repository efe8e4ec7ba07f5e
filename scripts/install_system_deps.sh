#!/usr/bin/env bash
# System packages some tests need: headless Chromium + ChromeDriver (the chat page test), openssh-server and
# iproute2 (the two-node network-namespace cluster). Installed with apt where we are root; elsewhere the tests that
# need them skip with a printed reason.
set -u
PKGS=(chromium chromium-driver openssh-server openssh-client iproute2)
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: not root or no apt-get; not installing ${missing[*]} (browser and two-node tests will skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "error: apt-get install ${missing[*]} failed" >&2; exit 1; }
