#!/bin/sh
# Guest side of tests/vfio_lab.rs; runs as /test.sh under busybox in the lab
# initramfs, in a guest with an emulated NVMe controller behind an emulated
# IOMMU (qemu/run-guest.sh --iommu --nvme IMG). The initramfs holds
# bind-vfio.sh, vfio_probe, vubd and blkcheck in /usr/bin.
#
# 1. the kernel's nvme driver takes the controller: its namespace appears;
# 2. bind-vfio.sh hands it to vfio-pci (VFIO-BOUND line);
# 3. vfio_probe uses it from user space: config space, BAR0, CAP/VS, a DMA
#    map and one Identify command (VFIO-PROBE line);
# 4. bind-vfio.sh --release gives it back to nvme, and the namespace
#    appears again;
# 5. vubd serves a file on tmpfs and blkcheck, a libblkio client, checks it
#    through vhost-user on two queues (blkcheck: PASS lines); vubd then stops
#    cleanly on SIGTERM.
# The host checks the lines; this script fails on the first error.
#
# Environment (from the kernel command line):
#   NVME_BYTES   expected size of the controller's namespace 1 in bytes
set -u

LAB=vfio-lab
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

[ -n "${NVME_BYTES:-}" ] || fatal "NVME_BYTES is not set on the kernel command line"
say "script started at $(uptime_s) s of guest uptime"

# --- 1. the kernel driver -----------------------------------------------------
modprobe nvme || fatal "modprobe nvme"
wait_for 100 test -b /dev/nvme0n1 || fatal "/dev/nvme0n1 did not appear"
size=$(($(cat /sys/block/nvme0n1/size) * 512))
[ "$size" -eq "$NVME_BYTES" ] || fatal "nvme0n1 has $size bytes, expected $NVME_BYTES"
say "nvme0n1: $size bytes, serial $(sed 's/ *$//' /sys/block/nvme0n1/device/serial)"

# --- 2. to vfio-pci -------------------------------------------------------------
out=$(bind-vfio.sh) || fatal "bind-vfio.sh: $out"
echo "$out"
bdf=$(echo "$out" | sed -n 's/^VFIO-BOUND bdf=\([^ ]*\) .*/\1/p')
[ -n "$bdf" ] || fatal "no VFIO-BOUND line"
[ ! -e /dev/nvme0n1 ] || wait_for 50 test ! -e /dev/nvme0n1 || fatal "nvme0n1 still there after the unbind"

# --- 3. user space --------------------------------------------------------------
vfio_probe "$bdf" || fatal "vfio_probe $bdf"

# --- 4. back to nvme ------------------------------------------------------------
bind-vfio.sh --release "$bdf" || fatal "bind-vfio.sh --release $bdf"
wait_for 100 test -b /dev/nvme0n1 || fatal "/dev/nvme0n1 did not come back after the release"
say "nvme0n1 is back with the nvme driver"
say "VFIO steps done at $(uptime_s) s of guest uptime"

# --- 5. vhost-user inside the guest ----------------------------------------------
img=/tmp/disk.img
sock=/tmp/vubd.sock
truncate -s 32M $img || fatal "truncate $img"
vubd --socket-path $sock --disk $img --num-queues 2 >/tmp/vubd.log 2>&1 &
vubd_pid=$!
stop_vubd() { kill -KILL "$vubd_pid" 2>/dev/null; }
wait_for 100 test -S $sock || { cat /tmp/vubd.log; stop_vubd; fatal "vubd did not create $sock"; }
for mode in write-verify write-zeroes; do
    # Small: debug builds of vubd and blkcheck are slow under TCG.
    if ! blkcheck --socket $sock --queues 2 --seed 0x1ab --size 4M --rounds 4 $mode; then
        tail -n 20 /tmp/vubd.log
        stop_vubd
        fatal "blkcheck $mode"
    fi
done
end_vubd "$vubd_pid" /tmp/vubd.log
[ ! -e $sock ] || fatal "vubd left $sock behind"
say "vhost-user steps done at $(uptime_s) s of guest uptime"
say "all steps passed"
