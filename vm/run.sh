#!/usr/bin/env bash
# Boots the NVMe test guest once and runs RESULTS_DIR/job inside it (as bash, chrooted
# into the host root, read-only underneath a tmpfs overlay). The guest writes the job's
# output to RESULTS_DIR/log and its exit status to RESULTS_DIR/exit_status; the serial
# console goes to RESULTS_DIR/console. Exit status: the job's, or 124 on timeout.
#
# The guest has one emulated NVMe controller (serial CTXKV_VM_SERIAL, model QEMU NVMe
# Ctrl) with one namespace backed by a sparse file of CTXKV_VM_DISK_MB in RESULTS_DIR.
set -euo pipefail

RESULTS_DIR=$(cd "${1:?usage: vm/run.sh RESULTS_DIR}" && pwd)
TIMEOUT_S=${CTXKV_VM_TIMEOUT_S:-330}
DISK_MB=${CTXKV_VM_DISK_MB:-1024}
SERIAL=${CTXKV_VM_SERIAL:-ctxkv0001}
# Maximum data transfer size as a power of two of 4 KiB pages: 7 = 512 KiB, so a 4 MiB
# extent is split into 8 commands on the passthrough path.
MDTS=${CTXKV_VM_MDTS:-7}
HERE=$(cd "$(dirname "$0")" && pwd)

[ -f "$RESULTS_DIR/job" ] || { echo "vm: $RESULTS_DIR/job is missing" >&2; exit 2; }
eval "$("$HERE/prepare.sh")"

rm -f "$RESULTS_DIR/exit_status" "$RESULTS_DIR/log"
disk=$RESULTS_DIR/nvme0.img
rm -f "$disk"
truncate -s "${DISK_MB}M" "$disk"

status=0
timeout --kill-after=10 "$TIMEOUT_S" qemu-system-x86_64 \
    -accel tcg -cpu max -smp 2 -m 2G -nographic -no-reboot \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 ctxkv.kdir=$KDIR" \
    -drive "file=$disk,if=none,id=nvm,format=raw,cache=unsafe,discard=unmap" \
    -device "nvme,serial=$SERIAL,drive=nvm,mdts=$MDTS" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$RESULTS_DIR,mount_tag=results,security_model=none" \
    -nic none >"$RESULTS_DIR/console" 2>&1 </dev/null || status=$?
rm -f "$disk"
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "vm: the guest ran past ${TIMEOUT_S}s; killed" >&2
    exit 124
fi
if [ ! -f "$RESULTS_DIR/exit_status" ]; then
    echo "vm: the guest stopped without finishing its job (qemu exit $status); console:" >&2
    tail -30 "$RESULTS_DIR/console" >&2
    exit 1
fi
exit "$(cat "$RESULTS_DIR/exit_status")"
