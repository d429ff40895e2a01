#!/usr/bin/env bash
# Makes the guest of the NVMe test tier, once, in a cache folder outside git:
#   Debian's linux-image-6.12 unpacked (never installed into /boot), its modules.dep
#   built with busybox depmod (the host has no kmod), and a busybox initramfs that
#   mounts the host root over 9p (vm/init). Prints the cache folder's KEY=VALUE facts.
# Each step is skipped when its output exists, so a second run costs nothing.
set -euo pipefail

KERNEL_PACKAGE=${CTXKV_VM_KERNEL_PACKAGE:-linux-image-6.12.117+deb12-amd64}
CACHE=${CTXKV_VM_CACHE:-/var/cache/ctxkv-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
KVER=${KERNEL_PACKAGE#linux-image-}
KDIR=$CACHE/$KERNEL_PACKAGE
BUSYBOX=$(command -v busybox || echo /bin/busybox)

mkdir -p "$CACHE"
cd "$CACHE"

if ! ls "$KERNEL_PACKAGE"_*.deb >/dev/null 2>&1; then
    echo "vm: downloading $KERNEL_PACKAGE into $CACHE" >&2
    apt-get download -q "$KERNEL_PACKAGE" >&2 2>/dev/null || {
        apt-get update -qq >&2 && apt-get download -q "$KERNEL_PACKAGE" >&2
    }
fi

if [ ! -f "$KDIR/.unpacked" ]; then
    echo "vm: unpacking $KERNEL_PACKAGE" >&2
    rm -rf "$KDIR"
    dpkg -x "$KERNEL_PACKAGE"_*.deb "$KDIR"
    touch "$KDIR/.unpacked"
fi

MODDIR=$KDIR/lib/modules/$KVER
if [ ! -s "$MODDIR/modules.dep" ]; then
    echo "vm: building modules.dep (busybox depmod, ~30 s)" >&2
    "$BUSYBOX" depmod -b "$KDIR" "$KVER"
fi

INITRD=$CACHE/initrd-$KVER-$(sha1sum "$HERE/init" | cut -c1-12).cpio.gz
if [ ! -s "$INITRD" ]; then
    echo "vm: building $INITRD" >&2
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,newroot,modules}
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    # The modules that reach the host root and lay the overlay, in dependency order (modules.dep lists
    # each module's dependencies; insmod needs them loaded first).
    : >"$root/modules/order"
    add_module() {
        local name=$1 line path dep
        line=$(grep -E "(^|/)$name\.ko(\.xz)?:" "$MODDIR/modules.dep" | head -1 || true)
        if [ -z "$line" ]; then
            grep -qE "/$name\.ko$" "$MODDIR/modules.builtin" && return 0
            echo "vm: module $name is neither in modules.dep nor built in" >&2
            exit 1
        fi
        path=${line%%:*}
        for dep in ${line#*:}; do
            add_module "$(basename "${dep%.ko*}")"
        done
        grep -qx "$name.ko" "$root/modules/order" && return 0
        # Decompressed here: busybox insmod need not know the kernel's compression.
        case $path in
        *.xz) xz -dc "$MODDIR/$path" >"$root/modules/$name.ko" ;;
        *) cp "$MODDIR/$path" "$root/modules/$name.ko" ;;
        esac
        echo "$name.ko" >>"$root/modules/order"
    }
    for module in virtio_pci 9pnet_virtio 9p overlay; do
        add_module "$module"
    done
    cp "$HERE/init" "$root/init"
    chmod +x "$root/init"
    (cd "$root" && find . | "$BUSYBOX" cpio -o -H newc | gzip -1) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    # Those of an earlier vm/init are never used again.
    for stale in "$CACHE"/initrd-"$KVER"-*.cpio.gz; do
        [ "$stale" = "$INITRD" ] || rm -f "$stale"
    done
fi

echo "KVER=$KVER"
echo "KDIR=$KDIR"
echo "VMLINUZ=$KDIR/boot/vmlinuz-$KVER"
echo "INITRD=$INITRD"
