#!/bin/sh
# Guest side of tests/nvme_pcie_lab.rs; runs as /test.sh under busybox in the
# lab initramfs, in a guest with two emulated NVMe controllers behind an
# emulated IOMMU: one with namespaces 1 and 2 (serial $PCIE_SERIAL), for the
# user-space driver, and one that stays with the kernel's nvme driver (serial
# $OTHER_SERIAL). The initramfs holds bind-vfio.sh, vubd, pcie_check, channel_check
# and blkcheck.
#
# 1. the kernel's nvme driver takes both controllers; their addresses are
#    found by serial number;
# 2. bind-vfio.sh hands the first to vfio-pci (VFIO-BOUND line);
# 3. `vubd nvme list` lists it with both namespaces (NVME-LIST lines);
# 4. `vubd nvme list --bdf` on the second says it is not bound to vfio-pci
#    (NVME-LIST-OTHER line, exit status 1);
# 5. pcie_check writes and reads back the pattern through an I/O queue: on
#    namespace 1 with SGLs, on namespace 1 at 4 MiB with bounce buffers, on
#    namespace 2 followed by a controller reset (PCIE-CHECK lines); on namespace 3 it reports the missing
#    namespace (PCIE-CHECK-FAILED line, exit status 1); then the IoChannel
#    conformance suite (channel_check) runs on namespace 1 from 16 MiB, with
#    and without interrupts (CHANNEL-CHECK lines);
# 6. vubd serves namespace 2 (--disk nvme-pcie:BDF?nsid=2, two queues, so two
#    pollers and two I/O queue pairs) and blkcheck checks it through
#    vhost-user: write-verify, write-zeroes, discard (Dataset Management;
#    QEMU's drive does not unmap, so discarded blocks may keep their data and
#    blkcheck runs without --discard-zeroes), then a sector pattern over the
#    first 4 MiB that the host finds in the image. Before that, a vubd with
#    the debug reset trigger runs write-verify across a controller reset
#    (VUBD-RESET lines), and before the last vubd (6c) step 7 runs;
# 7. interrupts: vubd with an adaptive poller that sleeps as soon as it is
#    idle (--poll adaptive --poll-idle-us 0) serves namespace 2 to blkcheck
#    write-verify, with MSI-X (the default) and with interrupts=0; the
#    interrupt counts of vubd's vfio-msix vectors (/proc/interrupts) and
#    vubd's CPU time (utime + stime, clock ticks) before and after are printed
#    (IRQ-CHECK lines), with the number of I/O timeouts and resets in vubd's log.
# The host checks the lines and then the images; this script fails on the
# first error.
set -u

LAB=nvme-pcie-lab
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

{ [ -n "${PCIE_SERIAL:-}" ] && [ -n "${OTHER_SERIAL:-}" ]; } ||
    fatal "PCIE_SERIAL and OTHER_SERIAL must be set on the kernel command line"
say "script started at $(uptime_s) s of guest uptime"

# --- 1. the kernel driver, and which controller is which ----------------------
modprobe nvme || fatal "modprobe nvme"
two_ctrls() { [ -e /sys/class/nvme/nvme0/address ] && [ -e /sys/class/nvme/nvme1/address ]; }
wait_for 100 two_ctrls || fatal "two NVMe controllers did not appear"
wait_serial "$PCIE_SERIAL"
bdf=$(bdf_of "$PCIE_SERIAL")
other=$(bdf_of "$OTHER_SERIAL") || fatal "no controller with serial $OTHER_SERIAL"
say "controllers: $bdf ($PCIE_SERIAL), $other ($OTHER_SERIAL)"

# --- 2. to vfio-pci -------------------------------------------------------------
bind_vfio "$bdf"

# --- 3. vubd nvme list ------------------------------------------------------------
out=$(vubd nvme list 2>&1) || { echo "$out"; fatal "vubd nvme list"; }
echo "$out" | sed 's/^/NVME-LIST: /'

# --- 4. a controller on another driver ---------------------------------------------
rc=0
out=$(vubd nvme list --bdf "$other" 2>&1) || rc=$?
echo "$out" | sed 's/^/NVME-LIST-OTHER: /'
[ "$rc" -eq 1 ] || fatal "vubd nvme list --bdf $other exited with $rc, expected 1"

# --- 5. I/O through the driver -------------------------------------------------------
pcie_check "$bdf" --nsid 1 --offset 0 --seed 0x1ab || fatal "pcie_check nsid 1 with SGLs"
pcie_check "$bdf" --nsid 1 --offset 4194304 --seed 0x1ab --no-sgl ||
    fatal "pcie_check nsid 1 with bounce buffers"
pcie_check "$bdf" --nsid 2 --offset 0 --seed 0x2cd --reset || fatal "pcie_check nsid 2 with a reset"
rc=0
pcie_check "$bdf" --nsid 3 || rc=$?
[ "$rc" -eq 1 ] || fatal "pcie_check on the missing namespace 3 exited with $rc, expected 1"
# The IoChannel conformance suite on namespace 1, in 16..24 MiB and its last 64 KiB (the
# host checks what pcie_check wrote below 5 MiB), with MSI-X and with polling.
for irq in 1 0; do
    channel_check --base 16777216 -- --disk "nvme-pcie:$bdf?nsid=1&interrupts=$irq" \
        --io-timeout 10 || fatal "channel_check on nsid 1 with interrupts=$irq"
done
say "driver steps done at $(uptime_s) s of guest uptime"

# --- 6. vubd serving namespace 2 to a vhost-user client ------------------------------
sock=/tmp/vubd.sock
vubd_pid=
stop_vubd() { kill -KILL "$vubd_pid" 2>/dev/null; }
# start_vubd LOG [QUEUES [ARG...]]: vubd on namespace 2 with QUEUES (2) queues and
# the extra arguments, its log in LOG.
start_vubd() {
    log_=$1
    queues_=${2:-2}
    shift
    [ $# -gt 0 ] && shift
    rm -f $sock
    vubd --socket-path $sock --disk "nvme-pcie:$bdf?nsid=2" --num-queues "$queues_" "$@" >"$log_" 2>&1 &
    vubd_pid=$!
    wait_for 100 test -S $sock || { cat "$log_"; stop_vubd; fatal "vubd did not create $sock"; }
}

# The sum of the per-CPU counts of every vfio-msix line (present while vubd has
# its vectors enabled).
msix_count() {
    awk '/vfio-msix/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i }
        END { print s + 0 }' /proc/interrupts
}
msix_lines() { grep -c vfio-msix /proc/interrupts; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

# 6a. A controller reset in the middle of write-verify (the debug trigger resets
# it once, after 40 commands on a channel): every request completes and the data
# verifies; the log shows the reset and the commands submitted again. The poller
# sleeps as soon as it is idle, so the completions after the reset come through
# the MSI-X vectors, which stay enabled across it (one reset only, no timeout).
export VUBD_DEBUG_NVME_RESET_AFTER=40
start_vubd /tmp/vubd-reset.log 2 --poll adaptive --poll-idle-us 0
unset VUBD_DEBUG_NVME_RESET_AFTER
if ! blkcheck --socket $sock --queues 2 --seed 0x4a1 --size 4M --rounds 4 write-verify; then
    tail -n 20 /tmp/vubd-reset.log
    stop_vubd
    fatal "blkcheck write-verify through vubd across a controller reset"
fi
echo "IRQ-RESET vectors=$(msix_lines) msix=$(msix_count)"
end_vubd "$vubd_pid" /tmp/vubd-reset.log
grep -E "NVMe controller reset|commands resubmitted|lost in a controller reset" /tmp/vubd-reset.log |
    sed 's/^/VUBD-RESET: /'

# 6b. One queue (one poller, one queue pair): write-verify.
start_vubd /tmp/vubd-1q.log 1
if ! blkcheck --socket $sock --queues 1 --seed 0x51 --size 4M --rounds 4 write-verify; then
    tail -n 20 /tmp/vubd-1q.log
    stop_vubd
    fatal "blkcheck write-verify through vubd on one queue"
fi
end_vubd "$vubd_pid" /tmp/vubd-1q.log

# 7. Interrupts (before 6c, whose pattern the host checks in the image).
for irq in 1 0; do
    log=/tmp/vubd-irq$irq.log
    rm -f $sock
    vubd --socket-path $sock --disk "nvme-pcie:$bdf?nsid=2&interrupts=$irq" --num-queues 2 \
        --poll adaptive --poll-idle-us 0 >$log 2>&1 &
    vubd_pid=$!
    wait_for 100 test -S $sock || { cat $log; stop_vubd; fatal "vubd did not create $sock"; }
    irq_before=$(msix_count)
    cpu_before=$(cpu_ticks "$vubd_pid")
    if ! blkcheck --socket $sock --queues 2 --seed "0x6$irq" --size 4M --rounds 4 write-verify; then
        tail -n 20 $log
        stop_vubd
        fatal "blkcheck write-verify through vubd with interrupts=$irq"
    fi
    irq_after=$(msix_count)
    cpu_after=$(cpu_ticks "$vubd_pid")
    vectors=$(msix_lines)
    end_vubd "$vubd_pid" $log
    # A lost wake-up would show as an I/O timeout and a reset.
    resets=$(grep -c -E "NVMe I/O timeout|NVMe controller reset" $log)
    echo "IRQ-CHECK interrupts=$irq vectors=$vectors msix_before=$irq_before" \
        "msix_after=$irq_after cpu_ticks_before=$cpu_before cpu_ticks_after=$cpu_after" \
        "resets=$resets"
    grep "NVMe controller opened" $log | sed 's/^/VUBD-IRQ: /'
done
say "interrupt steps done at $(uptime_s) s of guest uptime"

# 6c. Two queues: write-verify, write-zeroes, discard, then the pattern the host checks.
start_vubd /tmp/vubd.log
# The last mode leaves a pattern the host checks in the image.
for mode in write-verify write-zeroes discard pattern; do
    if ! blkcheck --socket $sock --queues 2 --seed 0x3ef --size 4M --rounds 4 $mode; then
        tail -n 20 /tmp/vubd.log
        stop_vubd
        fatal "blkcheck $mode through vubd on $bdf"
    fi
done
end_vubd "$vubd_pid" /tmp/vubd.log
grep -q "NVMe controller opened" /tmp/vubd.log || { cat /tmp/vubd.log; fatal "vubd log"; }
say "vubd steps done at $(uptime_s) s of guest uptime"

say "all steps passed"
