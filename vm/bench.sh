#!/usr/bin/env bash
# Acceptance figures of the NVMe paths: inside one QEMU guest, `ctxkv bench --compare-fio`
# on the emulated namespace runs fio's io_uring_cmd engine, ctxkv on passthrough and
# ctxkv on the block layer, interleaved round by round. TCG emulates every instruction,
# so the absolute figures are tiny; the ratios are what to read.
# usage: vm/bench.sh [OUTPUT_FILE]   (default: bench/results/nvme-vm.txt)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUTPUT=${1:-$REPO/bench/results/nvme-vm.txt}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/job" <<JOB
set -eu
cd $REPO
# fio's buffers from hugetlb pages, like ctxkv's pool (see engine/bench/fio.py).
echo 64 >/proc/sys/vm/nr_hugepages
for rw in read write; do
    # 512k: the MDTS, the most one NVMe command (and so one fio io_uring_cmd I/O) carries.
    .venv/bin/ctxkv bench --compare-fio --rounds 5 --rw \$rw --bs 512k --iodepth 16 --size 256M /dev/nvme0n1
done
.venv/bin/ctxkv bench --compare-fio --rounds 5 --rw randread --bs 4k --iodepth 32 --runtime 5 \
    --time-based /dev/nvme0n1
JOB
status=0
CTXKV_VM_TIMEOUT_S=${CTXKV_VM_TIMEOUT_S:-590} "$HERE/run.sh" "$work" || status=$?
mkdir -p "$(dirname "$OUTPUT")"
{
    echo "# vm/bench.sh, $(date -u +%Y-%m-%dT%H:%MZ), QEMU TCG guest, emulated NVMe (MDTS 512 KiB)"
    cat "$work/log"
} >"$OUTPUT"
cat "$OUTPUT"
exit "$status"
