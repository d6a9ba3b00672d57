# Shared helpers for the image scripts. Sourced, never run.
# Everything heavy lives in $ZAPGUARD_CACHE (outside the checkout) under a key that hashes its inputs,
# so a fresh clone reuses it and a changed input rebuilds it.

set -euo pipefail

: "${ZAPGUARD_CACHE:=${XDG_CACHE_HOME:-$HOME/.cache}/zapguard}"
export ZAPGUARD_CACHE
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export REPO_ROOT

log() { printf '[zapguard] %s\n' "$*" >&2; }
die() { printf '[zapguard] error: %s\n' "$*" >&2; exit 1; }

# sha256 over the named files' contents and names plus any extra strings, 16 hex digits.
hash_inputs() {
    {
        for f in "$@"; do
            if [ -f "$f" ]; then printf 'file %s\n' "${f#"$REPO_ROOT"/}"; cat "$f"; else printf 'str %s\n' "$f"; fi
        done
    } | sha256sum | cut -c1-16
}

# The Debian mirror the host already uses (never hard-coded: CI machines may point elsewhere).
debian_mirror() {
    local uri
    uri=$(grep -rhoE '^(URIs:|deb) +[a-z]+://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -v security | head -n1 | awk '{print $2}')
    [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"
    echo "${uri%/}"
}

# Run "$@" only as root, or through sudo when available.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        die "need root to run: $*"; fi
}

# Serialises every writer of one cache area (two `just` runs, or a run and a helper script, must
# never build the same kernel tree at once). Holds the lock until the calling script exits.
cache_lock() {
    mkdir -p "$ZAPGUARD_CACHE/locks"
    exec 9>"$ZAPGUARD_CACHE/locks/$1.lock"
    if ! flock -n 9; then
        log "waiting for another build holding the $1 lock"
        flock 9
    fi
}

# Atomically publish a finished build directory: build in $1.tmp, then rename.
publish_dir() {
    rm -rf "$1"
    mv "$1.tmp" "$1"
}
