#!/usr/bin/env bash
# Installs the host tools the build needs on a Debian bookworm machine that has only rustup, gcc,
# python3 and apt. Idempotent and quiet when everything is already there.
source "$(dirname "$0")/lib.sh"

APT_PKGS=(clang-19 lld-19 llvm-19 libclang-19-dev flex bison libelf-dev bc cpio kmod
          busybox-static mmdebstrap dpkg-dev zstd xz-utils
          libc6-dev)  # static glibc: hmm-tests and the C examples are linked -static
BINDGEN_VERSION=0.73.2

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

rustup component list --installed 2>/dev/null | grep -q '^rust-src' || { log "rustup: adding rust-src"; rustup component add rust-src; }
rustup target list --installed 2>/dev/null | grep -q '^x86_64-unknown-linux-musl$' || {
    log "rustup: adding x86_64-unknown-linux-musl"; rustup target add x86_64-unknown-linux-musl; }

if ! bindgen --version 2>/dev/null | grep -q " $BINDGEN_VERSION\$"; then
    log "cargo: installing bindgen-cli $BINDGEN_VERSION (about 2 minutes, once)"
    cargo install --quiet --locked bindgen-cli --version "$BINDGEN_VERSION"
fi
