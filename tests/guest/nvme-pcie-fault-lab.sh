#!/bin/sh
# Guest side of tests/nvme_pcie_fault_lab.rs; runs as /test.sh under busybox in
# the lab initramfs (with bind-vfio.sh, vubd and blkcheck). FAULT_MODE on the
# kernel command line picks the guest:
#
# FAULT_MODE=iommu: an emulated IOMMU, a controller at $HANG_BDF whose drive
# the host throttles to 1 byte/s from boot, one at $EIO_BDF whose drive
# (blkdebug) fails the first read of sector 1000 with EIO, and two controllers behind a
# PCIe-to-PCI bridge (serials $GRP0_SERIAL, $GRP1_SERIAL), one IOMMU group.
#   1. $HANG_BDF goes to vfio-pci (the kernel's nvme driver is not loaded yet,
#      so nothing reads the throttled drive) and vubd serves it with
#      --io-timeout 3; its log is copied to the console as it grows, where the
#      host watches for the first controller reset and then lifts the
#      throttle. blkcheck write-verify must pass across the timeout, Abort and
#      reset, and a second blkcheck after it (the daemon keeps serving). The
#      log's recovery lines are printed as HANG-LOG lines.
#   1b. $EIO_BDF to vfio-pci, vubd on it: the first blkcheck must fail on a
#      read with EIO (EIO-FIRST line: its summary), the second must pass.
#   2. vubd as user nobody on the same controller: PERM-ERROR line(s) and a
#      PERM-RC line with its exit status.
#   3. the nvme driver takes the bridged controllers; the first goes to
#      vfio-pci by hand (bind-vfio.sh would refuse the group), the second stays
#      on nvme: vubd prints GROUP-ERROR line(s) and a GROUP-RC line.
# FAULT_MODE=no-iommu: no IOMMU, a controller at $NVME_BDF. vfio-pci is asked
#   to take it (its probe fails without an IOMMU group) and vubd prints
#   NOIOMMU-ERROR line(s) and a NOIOMMU-RC line.
# FAULT_MODE=queues: an emulated IOMMU, two CPUs, a controller at $QP_BDF
#   that grants one I/O queue pair (max_ioqpairs=1) with namespaces 1 and 2,
#   and one at $ONE_BDF with namespace 1 only. Both go to vfio-pci.
#   1. `vubd nvme list` (NVME-LIST lines).
#   2. vubd with two pollers (--cpus 0,1) and one device per namespace of
#      $QP_BDF: QP-DEVICES-ERROR / QP-DEVICES-RC lines; the single-device
#      form with two queues (two pollers by default on two CPUs): QP-DISK-*.
#      These and the runs of 4. log warnings and errors only (VUBD_LOG=warn),
#      so their output is what a user sees of the failure, and are stopped
#      after 60 s (a vubd that starts instead of failing).
#   3. the same two devices on one poller (--cpus 0) start: QP-ONE-POLLER-OK.
#   4. a namespace the controller does not have: NS9-* ($QP_BDF?nsid=9) and
#      NS2-* ($ONE_BDF?nsid=2), inactive identifiers within the controller's
#      count (Identify Namespace answers zeros), and NSBIG-* (nsid=100000,
#      beyond it).
# The host checks the lines; this script fails on the first unexpected error.
set -u

LAB=nvme-pcie-fault-lab
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

driver_of() {
    if [ -L "/sys/bus/pci/devices/$1/driver" ]; then
        basename "$(readlink "/sys/bus/pci/devices/$1/driver")"
    else
        echo none
    fi
}
is_driver() { [ "$(driver_of "$1")" = "$2" ]; }
# to_vfio BDF: driver_override, unbind, probe (no viability check).
to_vfio() {
    echo vfio-pci >"/sys/bus/pci/devices/$1/driver_override"
    if [ -L "/sys/bus/pci/devices/$1/driver" ]; then
        echo "$1" >"/sys/bus/pci/devices/$1/driver/unbind"
    fi
    echo "$1" >/sys/bus/pci/drivers_probe 2>/dev/null || true
}
# try NAME CMD...: runs CMD, prints its output as NAME-ERROR lines and its exit
# status as a NAME-RC line.
try() {
    name_=$1
    shift
    rc=0
    out=$("$@" 2>&1) || rc=$?
    echo "$out" | sed "s/^/$name_-ERROR: /"
    echo "$name_-RC rc=$rc"
}

case ${FAULT_MODE:-} in
no-iommu)
    [ -n "${NVME_BDF:-}" ] || fatal "NVME_BDF must be set"
    modprobe vfio-pci || fatal "modprobe vfio-pci"
    [ -e "/sys/bus/pci/devices/$NVME_BDF/iommu_group" ] && fatal "$NVME_BDF has an IOMMU group"
    to_vfio "$NVME_BDF"
    say "$NVME_BDF is bound to $(driver_of "$NVME_BDF") after the vfio-pci probe"
    try NOIOMMU vubd --socket-path /tmp/vubd.sock --disk "nvme-pcie:$NVME_BDF"
    say "all steps passed"
    exit 0 ;;
queues)
    { [ -n "${QP_BDF:-}" ] && [ -n "${ONE_BDF:-}" ]; } || fatal "QP_BDF and ONE_BDF must be set"
    for b in "$QP_BDF" "$ONE_BDF"; do
        bind_vfio "$b"
    done
    out=$(vubd nvme list 2>&1) || { echo "$out"; fatal "vubd nvme list"; }
    echo "$out" | sed 's/^/NVME-LIST: /'
    try QP-DEVICES timeout 60 env VUBD_LOG=warn vubd --cpus 0,1 \
        --device "socket=/tmp/qp1.sock,disk=nvme-pcie:$QP_BDF?nsid=1" \
        --device "socket=/tmp/qp2.sock,disk=nvme-pcie:$QP_BDF?nsid=2"
    try QP-DISK timeout 60 env VUBD_LOG=warn vubd --socket-path /tmp/qp.sock --disk "nvme-pcie:$QP_BDF" --num-queues 2
    log=/tmp/vubd-one-poller.log
    vubd --cpus 0 \
        --device "socket=/tmp/qp1.sock,disk=nvme-pcie:$QP_BDF?nsid=1" \
        --device "socket=/tmp/qp2.sock,disk=nvme-pcie:$QP_BDF?nsid=2" >$log 2>&1 &
    vubd_pid=$!
    wait_for 100 test -S /tmp/qp2.sock || { cat $log; fatal "vubd on one poller did not start"; }
    kill -TERM "$vubd_pid"
    rc=0
    wait "$vubd_pid" || rc=$?
    [ "$rc" -eq 0 ] || { cat $log; fatal "vubd on one poller exited with status $rc"; }
    say "QP-ONE-POLLER-OK"
    try NS9 timeout 60 env VUBD_LOG=warn vubd --socket-path /tmp/ns.sock --disk "nvme-pcie:$QP_BDF?nsid=9"
    try NS2 timeout 60 env VUBD_LOG=warn vubd --socket-path /tmp/ns.sock --disk "nvme-pcie:$ONE_BDF?nsid=2"
    try NSBIG timeout 60 env VUBD_LOG=warn vubd --socket-path /tmp/ns.sock --disk "nvme-pcie:$QP_BDF?nsid=100000"
    say "all steps passed"
    exit 0 ;;
iommu) ;;
*) fatal "FAULT_MODE must be iommu, no-iommu or queues" ;;
esac

for v in "${HANG_BDF:-}" "${EIO_BDF:-}" "${GRP0_SERIAL:-}" "${GRP1_SERIAL:-}"; do
    [ -n "$v" ] || fatal "HANG_BDF, EIO_BDF, GRP0_SERIAL and GRP1_SERIAL must be set"
done

# --- 1. a hung command: timeout, Abort, reset ------------------------------------
bind_vfio "$HANG_BDF"
sock=/tmp/vubd.sock
log=/tmp/vubd-hang.log
vubd --socket-path $sock --disk "nvme-pcie:$HANG_BDF" --num-queues 1 --io-timeout 3 >$log 2>&1 &
vubd_pid=$!
wait_for 100 test -S $sock || { cat $log; fatal "vubd did not create $sock"; }
tail -f $log &
tail_pid=$!
say "HANG-READY: the drive is throttled, blkcheck starts"
for seed in 0x71 0x72; do
    if ! blkcheck --socket $sock --queues 1 --seed $seed --size 1M --rounds 2 write-verify; then
        kill "$tail_pid"
        kill -KILL "$vubd_pid"
        fatal "blkcheck write-verify seed $seed through vubd on the hung controller"
    fi
done
kill "$tail_pid"
kill -TERM "$vubd_pid"
rc=0
wait "$vubd_pid" || rc=$?
[ "$rc" -eq 0 ] || { tail -n 20 $log; fatal "vubd exited with status $rc"; }
grep -E "NVMe I/O timeout|NVMe Abort|NVMe controller reset|resubmitted|submitted again|cannot be brought back" $log |
    sed 's/^/HANG-LOG: /'

# --- 1b. a read that fails: an error status, and the daemon keeps serving ---------
bind_vfio "$EIO_BDF"
log=/tmp/vubd-eio.log
rm -f $sock
vubd --socket-path $sock --disk "nvme-pcie:$EIO_BDF" --num-queues 1 >$log 2>&1 &
vubd_pid=$!
wait_for 100 test -S $sock || { cat $log; fatal "vubd did not create $sock"; }
rc=0
out=$(blkcheck --socket $sock --queues 1 --seed 0x81 --size 1M --rounds 1 write-verify) || rc=$?
echo "$out" | sed 's/^/EIO-FIRST: /'
[ "$rc" -eq 1 ] || { kill -KILL "$vubd_pid"; fatal "blkcheck on the failing drive exited with $rc, expected 1"; }
if ! blkcheck --socket $sock --queues 1 --seed 0x82 --size 1M --rounds 2 write-verify; then
    kill -KILL "$vubd_pid"
    fatal "blkcheck write-verify after the failed read"
fi
kill -TERM "$vubd_pid"
rc=0
wait "$vubd_pid" || rc=$?
[ "$rc" -eq 0 ] || { tail -n 20 $log; fatal "vubd exited with status $rc"; }
grep -E "NVMe controller reset|NVMe I/O timeout" $log | sed 's/^/EIO-LOG: /'

# --- 2. no permission on /dev/vfio/N ------------------------------------------------
grep -q '^nobody:' /etc/passwd 2>/dev/null || echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>/etc/passwd
grep -q '^nogroup:' /etc/group 2>/dev/null || echo 'nogroup:x:65534:' >>/etc/group
# The initramfs root comes from a private (0700) staging directory: open it up so
# that nobody reaches the programs.
chmod 755 /
mkdir -p /tmp/nobody && chmod 777 /tmp/nobody
ls -l /dev/vfio
try PERM su -s /bin/sh nobody -c "vubd --socket-path /tmp/nobody/vubd.sock --disk nvme-pcie:$HANG_BDF"

# --- 3. an IOMMU group shared with a device on a host driver --------------------------
modprobe nvme || fatal "modprobe nvme"
wait_serial "$GRP0_SERIAL"
wait_serial "$GRP1_SERIAL"
grp0=$(bdf_of "$GRP0_SERIAL")
grp1=$(bdf_of "$GRP1_SERIAL")
g0=$(basename "$(readlink "/sys/bus/pci/devices/$grp0/iommu_group")")
g1=$(basename "$(readlink "/sys/bus/pci/devices/$grp1/iommu_group")")
echo "GROUPS grp0=$grp0 grp1=$grp1 group0=$g0 group1=$g1"
[ "$g0" = "$g1" ] || fatal "the bridged controllers are in groups $g0 and $g1"
to_vfio "$grp0"
wait_for 50 is_driver "$grp0" vfio-pci || fatal "$grp0 is on $(driver_of "$grp0"), not vfio-pci"
is_driver "$grp1" nvme || fatal "$grp1 is on $(driver_of "$grp1"), not nvme"
try GROUP vubd --socket-path /tmp/vubd-group.sock --disk "nvme-pcie:$grp0"

say "all steps passed"
