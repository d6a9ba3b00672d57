#!/usr/bin/env bash
# Builds the guest kernel (bzImage + modules) into the cache and prints the tree's path.
#
# Usage: build.sh [default|debug|kasan|kcsan]. A flavor adds its fragment on top of
# zapguard.config and is cached separately: debug.config (lockdep, might_sleep checks, DEBUG_VM),
# kasan.config (generic KASAN), kcsan.config (KCSAN).
#
# Key: the pinned source, our patches, the config fragment, this script and the toolchain versions.
# A hit costs nothing. A miss whose sources and patches match an earlier build starts from a copy of
# that tree, so a changed config fragment rebuilds incrementally (Kbuild tracks config per object).
# An interrupted build resumes in place: the tree only counts as done once its stamp exists.
source "$(dirname "$0")/../lib.sh"
here="$REPO_ROOT/images/kernel"
source "$here/pin.env"

# Fixed build identity (no date, user or host of this machine in the image): the same inputs give
# the same kernel, which `just image` relies on.
make_flags=(LLVM=-19 -j"$(nproc)" KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 2026"
            KBUILD_BUILD_USER=zapguard KBUILD_BUILD_HOST=zapguard)
toolchain="$(rustc --version) | $(bindgen --version 2>&1 | head -n1) | $(clang-19 --version | head -n1)"
patches=("$here"/patches/*.patch)
flavor=${1:-default}
fragments=("$here/zapguard.config")
case "$flavor" in
    default) suffix="" ;;
    debug|kasan|kcsan) suffix="-$flavor"; fragments+=("$here/$flavor.config") ;;
    *) die "unknown kernel flavor '$flavor' (default|debug|kasan|kcsan)" ;;
esac
src_key=$(hash_inputs "$here/pin.env" "${patches[@]}")
key=$(hash_inputs "$here/pin.env" "${patches[@]}" "${fragments[@]}" "$here/build.sh" "$toolchain")
root="$ZAPGUARD_CACHE/kernel"
tree="$root/$src_key-$key$suffix/linux"
stamp="$root/$src_key-$key$suffix/done"

if [ -f "$stamp" ]; then echo "$tree"; exit 0; fi
cache_lock kernel
if [ -f "$stamp" ]; then echo "$tree"; exit 0; fi
mkdir -p "$root"

if [ ! -f "$tree/Makefile" ]; then
    rm -rf "$tree"; mkdir -p "$(dirname "$tree")"
    # Seed from the newest finished tree of the same flavor (then of any): Kbuild rebuilds only
    # what the config change touches.
    seed=""
    if [ -n "$suffix" ]; then
        seed=$(ls -1dt "$root/$src_key"-*"$suffix"/done 2>/dev/null | head -n1 || true)
    fi
    if [ -z "$seed" ]; then
        seed=$(ls -1dt "$root/$src_key"-*/done 2>/dev/null | grep -Ev -- "-(debug|kasan|kcsan)/done" | head -n1 || true)
    fi
    if [ -n "$seed" ]; then
        log "kernel: config changed, rebuilding incrementally from $(dirname "$seed")"
        cp -a "$(dirname "$seed")/linux" "$tree"
    else
        deb=$("$here/fetch-source.sh")
        log "kernel: unpacking $KERNEL_PKG $KERNEL_DEB_VERSION"
        tmp=$(mktemp -d "$root/unpack.XXXXXX")
        dpkg-deb -x "$deb" "$tmp"
        tar -C "$tmp" -xf "$tmp/usr/src/$KERNEL_PKG.tar.xz"
        mv "$tmp/$KERNEL_PKG" "$tree"
        rm -rf "$tmp"
        for p in "${patches[@]}"; do
            log "kernel: applying $(basename "$p")"
            patch -d "$tree" -p1 --quiet --forward < "$p"
        done
    fi
fi

cd "$tree"
make "${make_flags[@]}" -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "${fragments[@]}" >/dev/null
make "${make_flags[@]}" -s olddefconfig
# A requested symbol that Kconfig dropped (unmet dependency, missing toolchain for RUST) is an error.
bad=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) grep -qxF "$line" .config || { log "kernel: config did not stick: $line"; bad=1; } ;; esac
done < <(cat "${fragments[@]}")
[ "$bad" -eq 0 ] || die "kernel config fragment not satisfied (see above); for CONFIG_RUST run 'make LLVM=-19 rustavailable' in $tree"

log "kernel: building bzImage + modules in $tree (~6-10 min from scratch, log: $tree/../build.log)"
make "${make_flags[@]}" bzImage modules > ../build.log 2>&1 &
pid=$!
start=$SECONDS next=60
# A minute-by-minute sign of life: elapsed time and the build steps Kbuild has logged so far.
while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    if [ $((SECONDS - start)) -ge "$next" ]; then
        log "kernel: building, $((next / 60)) min, $(grep -c '^  [A-Z]' ../build.log || true) build steps so far"
        next=$((next + 60))
    fi
done
if ! wait "$pid"; then
    tail -n 40 ../build.log >&2
    die "kernel build failed; full log: $tree/../build.log"
fi
log "kernel: built in $(((SECONDS - start) / 60)) min $(((SECONDS - start) % 60)) s"
touch "$stamp"
# Keep the two newest trees of each flavor: enough to seed an incremental rebuild, bounded on disk.
# (`|| true`: with pipefail, an empty glob must not fail the build that just succeeded.)
{ for f in debug kasan kcsan; do ls -1dt "$root"/*-"$f"/ 2>/dev/null | tail -n +3 || true; done
  ls -1dt "$root"/*/ 2>/dev/null | grep -Ev -- "-(debug|kasan|kcsan)/$" | tail -n +3 || true; } |
    while read -r old; do [ "$old" = "$(dirname "$tree")/" ] || rm -rf "$old"; done
echo "$tree"
