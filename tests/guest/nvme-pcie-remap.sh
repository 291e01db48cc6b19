#!/bin/sh
# Guest side of tests/nvme_pcie_remap_lab.rs; runs as /test.sh under busybox in
# the lab initramfs, in a guest (two CPUs) with one emulated NVMe controller
# (serial $PCIE_SERIAL) behind an emulated IOMMU. The initramfs holds
# bind-vfio.sh, vubd and blkcheck.
#
# 1. the kernel's nvme driver finds the controller; bind-vfio.sh hands it to
#    vfio-pci;
# 2. for one and for two queues, a vubd serves the namespace and blkcheck runs
#    write-verify with --remap: every few requests each queue maps a new
#    memory region (ADD_MEM_REG, which vubd DMA-maps) and removes its old one
#    (REM_MEM_REG) while its next batch is in flight; on two queues it then
#    writes a sector pattern the same way (smaller batches, more moves), which
#    the host finds in the image;
# 3. SIGTERM: vubd exits with status 0; its log lines about the guest memory
#    regions it DMA-mapped and unmapped are printed (REMAP<QUEUES>: lines),
#    with its errors and warnings.
# The host checks the lines and the image; this script fails on the first
# error.
set -u

LAB=nvme-pcie-remap
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

[ -n "${PCIE_SERIAL:-}" ] || fatal "PCIE_SERIAL must be set on the kernel command line"

# --- 1. the controller, to vfio-pci ---------------------------------------------------
take_controller "$PCIE_SERIAL"

# --- 2. regions added and removed during I/O ---------------------------------------------
sock=/tmp/vubd.sock
for queues in 1 2; do
    log=/tmp/vubd-$queues.log
    rm -f $sock
    vubd --socket-path $sock --disk "nvme-pcie:$bdf" --num-queues $queues >$log 2>&1 &
    vubd_pid=$!
    wait_for 100 test -S $sock || { cat $log; kill -KILL $vubd_pid; fatal "vubd did not create $sock"; }
    modes=write-verify
    [ $queues -eq 2 ] && modes="write-verify pattern"
    for mode in $modes; do
        # The pattern in batches of 4 (instead of one of 16 per queue), so that its
        # writes too come from regions added during the run.
        opts="--rounds 6 --remap 8 --linger-ms 300"
        [ "$mode" = pattern ] && opts="--depth 4 --remap 4 --linger-ms 300"
        # shellcheck disable=SC2086
        if ! blkcheck --socket $sock --queues $queues --seed "0x${queues}e" --size 4M \
            $opts $mode; then
            tail -n 30 $log
            kill -KILL $vubd_pid
            fatal "blkcheck $mode --remap through vubd on $queues queues"
        fi
    done
    # --- 3. SIGTERM, and the log ---------------------------------------------------------
    end_vubd $vubd_pid $log
    grep -E "guest memory region DMA-|frontend (connected|disconnected)|WARN|ERROR" $log |
        sed "s/^/REMAP$queues: /"
done
say "all steps passed"
