#!/bin/sh
# Guest side of tests/nvme_pcie_devices_lab.rs; runs as /test.sh under busybox
# in the lab initramfs, in a guest (two CPUs) with one emulated NVMe controller
# (serial $PCIE_SERIAL, namespaces 1 and 2) behind an emulated IOMMU. The
# initramfs holds bind-vfio.sh, vubd and blkcheck.
#
# 1. the kernel's nvme driver finds the controller; bind-vfio.sh hands it to
#    vfio-pci;
# 2. one vubd serves namespace 1 and namespace 2 as two devices (two --device,
#    two sockets, two queues each, so each of the two pollers serves a queue
#    of both and shares one I/O queue pair between them);
# 3. blkcheck runs write-verify on both devices at the same time, then again
#    (new frontend sessions); then a long write-verify on device 2 while
#    device 1's frontend connects, checks and disconnects three times; then a
#    different sector pattern on the first 4 MiB of each, at the same time;
# 4. SIGTERM: vubd exits with status 0; its log lines about the controller
#    and the shared channels are printed (VUBD-DEVICES lines).
# The host checks the lines and then that each image holds its own pattern.
set -u

LAB=nvme-pcie-devices
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

[ -n "${PCIE_SERIAL:-}" ] || fatal "PCIE_SERIAL must be set on the kernel command line"

# --- 1. the controller, to vfio-pci ---------------------------------------------------
take_controller "$PCIE_SERIAL"

# --- 2. one vubd, two devices -----------------------------------------------------------
s1=/tmp/ns1.sock
s2=/tmp/ns2.sock
log=/tmp/vubd.log
vubd --device "socket=$s1,disk=nvme-pcie:$bdf?nsid=1,num-queues=2" \
    --device "socket=$s2,disk=nvme-pcie:$bdf?nsid=2,num-queues=2" >$log 2>&1 &
vubd_pid=$!
stop_vubd() { kill -KILL "$vubd_pid" 2>/dev/null; }
both() { [ -S $s1 ] && [ -S $s2 ]; }
wait_for 100 both || { cat $log; stop_vubd; fatal "vubd did not create $s1 and $s2"; }

# --- 3. both devices at the same time ----------------------------------------------------
# at_once MODE SEED1 SEED2: blkcheck MODE on both devices concurrently.
at_once() {
    blkcheck --socket $s1 --queues 2 --seed "$2" --size 4M --rounds 4 "$1" >/tmp/b1.out 2>&1 &
    p1=$!
    blkcheck --socket $s2 --queues 2 --seed "$3" --size 4M --rounds 4 "$1" >/tmp/b2.out 2>&1 &
    p2=$!
    rc1=0
    rc2=0
    wait $p1 || rc1=$?
    wait $p2 || rc2=$?
    sed 's/^/DEVICE1 /' /tmp/b1.out
    sed 's/^/DEVICE2 /' /tmp/b2.out
    if [ "$rc1" -ne 0 ] || [ "$rc2" -ne 0 ]; then
        tail -n 30 $log
        stop_vubd
        fatal "blkcheck $1 on both devices: exit $rc1 and $rc2"
    fi
}
at_once write-verify 0x71 0x72
at_once write-verify 0x73 0x74
# Device 2 keeps its session for a long write-verify while device 1's frontend
# comes and goes three times: on each poller device 1 leaves the shared queue
# pair and joins it again with device 2's commands in flight.
blkcheck --socket $s2 --queues 2 --seed 0x75 --size 4M --rounds 24 write-verify >/tmp/b2.out 2>&1 &
p2=$!
for seed in 0x81 0x82 0x83; do
    if ! blkcheck --socket $s1 --queues 2 --seed $seed --size 1M --rounds 2 write-verify >/tmp/b1.out 2>&1; then
        cat /tmp/b1.out
        tail -n 30 $log
        stop_vubd
        fatal "blkcheck on device 1 while device 2 runs"
    fi
    sed 's/^/DEVICE1 /' /tmp/b1.out
    # Still running: the sessions of device 1 overlapped device 2's.
    [ -e /proc/$p2 ] && echo "DEVICE2-RUNNING after device 1 seed=$seed"
done
rc2=0
wait $p2 || rc2=$?
sed 's/^/DEVICE2 /' /tmp/b2.out
[ "$rc2" -eq 0 ] || { tail -n 30 $log; stop_vubd; fatal "blkcheck on device 2 while device 1 came and went"; }
at_once pattern 0x1d1 0x2d2

# --- 4. SIGTERM ----------------------------------------------------------------------------
end_vubd "$vubd_pid" $log
{ [ ! -e $s1 ] && [ ! -e $s2 ]; } || fatal "sockets left behind"
grep -E "NVMe controller|I/O channel shared|frontend (connected|disconnected)|NVMe I/O timeout|error" $log |
    sed 's/^/VUBD-DEVICES: /'
say "all steps passed"
