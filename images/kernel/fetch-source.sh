#!/usr/bin/env bash
# Downloads the pinned linux-source .deb into the cache with a private apt configuration (the host's
# apt sources and pins are never touched), verifies its sha256, and prints the .deb's path.
source "$(dirname "$0")/../lib.sh"
source "$REPO_ROOT/images/kernel/pin.env"

dir="$ZAPGUARD_CACHE/downloads"
deb="$dir/${KERNEL_PKG}_${KERNEL_DEB_VERSION//:/%3a}_all.deb"
verify() { echo "$KERNEL_DEB_SHA256  $1" | sha256sum --quiet -c - 2>/dev/null; }
if [ -f "$deb" ] && verify "$deb"; then echo "$deb"; exit 0; fi

mkdir -p "$dir"
apt_root="$ZAPGUARD_CACHE/apt-trixie"
mkdir -p "$apt_root/lists/partial" "$apt_root/archives/partial"
mirror=$(debian_mirror)
cat > "$apt_root/sources.list" <<SRC
deb $mirror trixie main
deb $mirror $KERNEL_SUITE main
SRC
apt_opts=(-o Dir::Etc::SourceList="$apt_root/sources.list" -o Dir::Etc::SourceParts=/nonexistent
          -o Dir::State::Lists="$apt_root/lists" -o Dir::Cache="$apt_root" -o Dir::Cache::archives="$apt_root/archives"
          -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o APT::Get::List-Cleanup=0 -o Dir::State::status=/dev/null)
log "fetching $KERNEL_PKG=$KERNEL_DEB_VERSION from $mirror ($KERNEL_SUITE)"
apt-get -qq "${apt_opts[@]}" update >&2
( cd "$dir" && apt-get -qq "${apt_opts[@]}" download "$KERNEL_PKG=$KERNEL_DEB_VERSION" >&2 )
[ -f "$deb" ] || die "download of $KERNEL_PKG=$KERNEL_DEB_VERSION produced no $deb"
if ! verify "$deb"; then
    got=$(sha256sum "$deb" | cut -d' ' -f1)
    rm -f "$deb"
    die "sha256 mismatch for $KERNEL_PKG $KERNEL_DEB_VERSION: expected $KERNEL_DEB_SHA256, got $got"
fi
echo "$deb"
