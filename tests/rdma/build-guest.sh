#!/bin/bash
# Build (or reuse) the Soft-RoCE test guest for `make test-rdma`.
# Adapted from the rxe-vm recipe: a Debian bookworm kernel (downloaded and
# extracted, the host kernel is untouched) + a minbase rootfs with rdma-core,
# ibverbs-providers and python3-pyverbs, packed whole as an initramfs.
#
# Output in $MEMKV_RXE_CACHE (default ~/.cache/memkv-rxe): vmlinuz, rootfs.cpio.
# Cached: the kernel and the debootstrapped rootfs are reused; only the cpio is
# repacked when guest-init.sh changes.  Needs root and the Debian archive.
# Exit 0 = image ready; exit 3 = cannot build here (reason on stderr).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${MEMKV_RXE_CACHE:-$HOME/.cache/memkv-rxe}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
mkdir -p "$WORK"
cd "$WORK"
t0=$(date +%s)
log() { echo "[rxe-build +$(( $(date +%s) - t0 ))s] $*" >&2; }
skip() { echo "SKIP: $*" >&2; exit 3; }

# 1. host tools
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v cpio >/dev/null || ! command -v debootstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || skip "qemu-system-x86_64/cpio/debootstrap missing and not root to install them"
    log "installing qemu-system-x86 cpio debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends qemu-system-x86 cpio debootstrap; } \
        >"$WORK/apt.log" 2>&1 || skip "cannot install qemu-system-x86/cpio/debootstrap (see $WORK/apt.log)"
fi

stamp_in=$(cat "$HERE/guest-init.sh" "$HERE/build-guest.sh" | sha256sum | cut -c1-16)
if [ -f rootfs.cpio ] && [ -f vmlinuz ] && [ "$(cat image.stamp 2>/dev/null)" = "$stamp_in" ]; then
    log "cached guest image in $WORK"
    exit 0
fi
[ "$(id -u)" = 0 ] || skip "building the guest image needs root (debootstrap, chroot)"

# 2. Debian kernel (download + extract only)
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || skip "apt-cache knows no linux-image-amd64 (no Debian archive?)"
KV=${KPKG#linux-image-}
if [ ! -f "kernel/boot/vmlinuz-$KV" ]; then
    log "downloading $KPKG"
    mkdir -p debs && (cd debs && apt-get download "$KPKG" >/dev/null 2>&1) || skip "cannot download $KPKG from the Debian archive"
    rm -rf kernel && mkdir kernel
    dpkg -x debs/"${KPKG}"_*.deb kernel
fi
cp "kernel/boot/vmlinuz-$KV" vmlinuz

# 3. rootfs
if [ ! -x rootfs/usr/bin/python3 ] || [ ! -d rootfs/usr/lib/python3/dist-packages/pyverbs ]; then
    log "debootstrap bookworm (minbase + rdma-core + pyverbs), ~2 min"
    rm -rf rootfs
    debootstrap --variant=minbase \
        --include=rdma-core,ibverbs-providers,ibverbs-utils,python3,python3-pyverbs,iproute2,kmod,procps \
        bookworm rootfs "$MIRROR" > debootstrap.log 2>&1 || skip "debootstrap failed (no archive?), see $WORK/debootstrap.log"
fi

# 4. kernel modules: only what Soft-RoCE and the 9p share need
rm -rf "rootfs/lib/modules/$KV"
mkdir -p rootfs/lib/modules
cp -a "kernel/lib/modules/$KV" rootfs/lib/modules/
chroot rootfs depmod "$KV"
NEEDED=$(for m in rdma_rxe ib_uverbs rdma_ucm crc32_generic crc32_pclmul veth virtio_pci 9pnet_virtio 9p; do
           chroot rootfs modprobe -S "$KV" --show-depends "$m"; done | awk '$1=="insmod"{print $2}' | sort -u)
keep=$(mktemp -d)
for f in $NEEDED; do mkdir -p "$keep$(dirname "$f")"; cp "rootfs$f" "$keep$f"; done
rm -rf "rootfs/lib/modules/$KV/kernel"
cp -a "$keep/lib/modules/$KV/kernel" "rootfs/lib/modules/$KV/"
rm -rf "$keep"
chroot rootfs depmod "$KV"

# 5. init + pack
install -m 0755 "$HERE/guest-init.sh" rootfs/init
rm -rf rootfs/var/cache/apt/archives/*.deb rootfs/var/cache/apt/*.bin rootfs/var/lib/apt/lists/* \
       rootfs/usr/share/doc/* rootfs/usr/share/man/* rootfs/usr/share/info/* rootfs/usr/share/locale/*
(cd rootfs && find . -xdev -print0 | cpio --null -o -H newc --quiet) > rootfs.cpio.tmp
mv rootfs.cpio.tmp rootfs.cpio
echo "$stamp_in" > image.stamp
log "guest image ready: $(du -h rootfs.cpio | cut -f1) in $WORK"
