#!/usr/bin/env bash
# Prints the path of a qemu-system-x86_64 (>= 10.1, with vfio-user-pci) to use, provisioning one if
# the system's is missing or too old (Debian bookworm ships 7.2): an mmdebstrap'd trixie-backports
# rootfs in the cache, run in place through its own dynamic loader by a generated wrapper script.
source "$(dirname "$0")/../lib.sh"

has_vfio_user() { "$1" -device help 2>/dev/null | grep -q '"vfio-user-pci"'; }
new_enough() {
    local v; v=$("$1" --version 2>/dev/null | sed -nE '1s/.*version ([0-9]+)\.([0-9]+).*/\1 \2/p')
    [ -n "$v" ] && set -- $v && { [ "$1" -gt 10 ] || { [ "$1" -eq 10 ] && [ "$2" -ge 1 ]; }; }
}

if [ -n "${ZAPGUARD_QEMU:-}" ]; then
    has_vfio_user "$ZAPGUARD_QEMU" || die "ZAPGUARD_QEMU=$ZAPGUARD_QEMU lacks vfio-user-pci"
    echo "$ZAPGUARD_QEMU"; exit 0
fi
sys=$(command -v qemu-system-x86_64 || true)
if [ -n "$sys" ] && new_enough "$sys" && has_vfio_user "$sys"; then echo "$sys"; exit 0; fi

PKGS='qemu-system-x86/trixie-backports,seabios/trixie-backports,ipxe-qemu'
key=$(hash_inputs "$REPO_ROOT/images/qemu/provision.sh" "$PKGS")
dir="$ZAPGUARD_CACHE/qemu/$key"
wrapper="$dir/qemu-system-x86_64"
if [ -x "$wrapper" ] && has_vfio_user "$wrapper"; then echo "$wrapper"; exit 0; fi
cache_lock qemu
if [ -x "$wrapper" ] && has_vfio_user "$wrapper"; then echo "$wrapper"; exit 0; fi

command -v mmdebstrap >/dev/null || die "mmdebstrap missing: run images/provision-host.sh"
mirror=$(debian_mirror)
log "qemu: system QEMU ${sys:-absent} is too old or lacks vfio-user-pci; provisioning trixie-backports QEMU (~1 min, once)"
rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
if ! mmdebstrap --quiet --variant=essential --include="$PKGS" \
        --aptopt='APT::Default-Release "trixie-backports"' \
        trixie "$dir.tmp/root" "deb $mirror trixie main" "deb $mirror trixie-backports main" \
        > "$dir.tmp/mmdebstrap.log" 2>&1; then
    tail -n 20 "$dir.tmp/mmdebstrap.log" >&2
    die "mmdebstrap failed; log: $dir.tmp/mmdebstrap.log"
fi
# The wrapper resolves the rootfs relative to itself so the cache directory can be moved.
cat > "$dir.tmp/qemu-system-x86_64" <<'WRAP'
#!/bin/sh
R="$(dirname "$(readlink -f "$0")")/root"
export QEMU_MODULE_DIR="$R/usr/lib/x86_64-linux-gnu/qemu"
exec "$R/lib64/ld-linux-x86-64.so.2" --library-path "$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu" \
    "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" "$@"
WRAP
chmod +x "$dir.tmp/qemu-system-x86_64"
publish_dir "$dir"
has_vfio_user "$wrapper" || die "provisioned QEMU at $wrapper lacks vfio-user-pci"
log "qemu: $("$wrapper" --version | head -n1)"
echo "$wrapper"
