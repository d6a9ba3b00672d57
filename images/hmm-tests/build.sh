#!/usr/bin/env bash
# Builds the kernel's own HMM selftest, tools/testing/selftests/mm/hmm-tests.c (with vm_util.c and
# hugepage_settings.c), from the pinned kernel tree as a static binary, and prints its path.
# usage: build.sh KERNEL_TREE
# The test is compiled unmodified against the tree's own 7.3 uapi headers (`make headers` writes
# them to usr/include; bookworm's 6.1 headers lack what it uses). Its source lives only in the
# pinned kernel tarball, never in this repository. Cached by a hash of the sources it compiles.
source "$(dirname "$0")/../lib.sh"
[ $# -eq 1 ] || die "usage: $0 KERNEL_TREE"
tree=$1
st="$tree/tools/testing/selftests"
srcs=("$st/mm/hmm-tests.c" "$st/mm/vm_util.c" "$st/mm/hugepage_settings.c")
for f in "${srcs[@]}"; do [ -f "$f" ] || die "hmm-tests source missing: $f"; done

# By content, not path: every flavor's tree holds the same sources and shares one binary.
sources=$(cat "${srcs[@]}" "$st/mm/vm_util.h" "$st/mm/hugepage_settings.h" "$st/kselftest_harness.h" \
    "$st/kselftest.h" "$tree/lib/test_hmm_uapi.h" "$tree/mm/gup_test.h" \
    "$tree/include/uapi/linux/mman.h" "$tree/include/uapi/linux/userfaultfd.h" | sha256sum)
key=$(hash_inputs "$REPO_ROOT/images/hmm-tests/build.sh" "$sources" "$(gcc -dumpfullversion)")
out="$ZAPGUARD_CACHE/hmm-tests/$key/hmm-tests"
if [ -x "$out" ]; then echo "$out"; exit 0; fi
cache_lock hmm-tests
if [ -x "$out" ]; then echo "$out"; exit 0; fi

if [ ! -f "$tree/usr/include/linux/userfaultfd.h" ]; then
    log "hmm-tests: installing the tree's uapi headers (make headers)"
    make -s -C "$tree" LLVM=-19 headers >&2
fi
dir="$ZAPGUARD_CACHE/hmm-tests/$key"
mkdir -p "$dir.tmp"
log "hmm-tests: compiling $st/mm/hmm-tests.c (static)"
# The selftests Makefile's include paths: the tree root (lib/test_hmm_uapi.h, mm/gup_test.h),
# the selftests directory (mm/vm_util.h, kselftest_harness.h) and the installed uapi headers.
gcc -static -O2 -Wall -D_GNU_SOURCE -isystem "$tree/usr/include" -I "$tree" -I "$st" -I "$st/mm" \
    "${srcs[@]}" -o "$dir.tmp/hmm-tests" -lrt -lpthread -lm
publish_dir "$dir"
echo "$out"
