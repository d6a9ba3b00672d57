#!/usr/bin/env bash
# Builds the guest initramfs and prints its path.
# usage: build.sh KERNEL_TREE ZAPGUARD_KO GUEST_TESTS_BIN [EXTRA_BIN...]
# Contents: busybox-static, init, zapguard.ko, test_hmm.ko, the guest test binary and the extra
# static binaries (the kernel's hmm-tests, the C examples) in /bin under their own names. Cached
# by a hash of exactly those inputs, so unchanged ones reuse the image.
source "$(dirname "$0")/../lib.sh"
[ $# -ge 3 ] || die "usage: $0 KERNEL_TREE ZAPGUARD_KO GUEST_TESTS_BIN [EXTRA_BIN...]"
tree=$1 ko=$2 tests=$3
shift 3
extras=("$@")
busybox=/bin/busybox
[ -x "$busybox" ] || die "busybox-static missing: run images/provision-host.sh"
hmm="$tree/lib/test_hmm.ko"
for f in "$ko" "$hmm" "$tests" "${extras[@]}"; do [ -f "$f" ] || die "initramfs input missing: $f"; done
init="$REPO_ROOT/images/initramfs/init"

key=$(hash_inputs "$init" "$REPO_ROOT/images/initramfs/build.sh" "$busybox" "$ko" "$hmm" "$tests" "${extras[@]}")
out="$ZAPGUARD_CACHE/initramfs/$key.cpio"
if [ -f "$out" ]; then echo "$out"; exit 0; fi
cache_lock initramfs
if [ -f "$out" ]; then echo "$out"; exit 0; fi

mkdir -p "$ZAPGUARD_CACHE/initramfs"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib/modules}
# mktemp -d makes the stage 0700, which would be the guest's / : unprivileged processes (the uAPI
# fuzzer's uid 65534 child, users' programs that drop privileges) could not resolve any path.
chmod 0755 "$stage"
chmod 1777 "$stage/tmp"
install -m 0755 "$busybox" "$stage/bin/busybox"
install -m 0755 "$init" "$stage/init"
install -m 0644 "$ko" "$hmm" "$stage/lib/modules/"
install -m 0755 "$tests" "$stage/bin/zapguard-guest-tests"
for f in "${extras[@]}"; do install -m 0755 "$f" "$stage/bin/$(basename "$f")"; done
# Fixed times, owners and order: the same inputs give the same bytes (`just image` relies on it).
find "$stage" -exec touch -h -d @0 {} +
( cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0 --reproducible ) > "$out.tmp"
mv "$out.tmp" "$out"
# Old images are cheap to rebuild: keep the newest five.
ls -1t "$ZAPGUARD_CACHE"/initramfs/*.cpio | tail -n +6 | xargs -r rm -f
echo "$out"
