#!/bin/sh
# Guest side of tests/restart_lab.rs; runs as /test.sh under busybox in the lab
# initramfs, in a guest (two CPUs) whose vhost-user-blk disks reconnect to their
# back end when it comes back (-chardev ...,reconnect=1). The host kills and
# restarts the back end while this runs. The initramfs holds genwrite.
#
# The host talks to this script on the control port, /dev/ttyS1 (run-guest.sh
# --control): one word per line, each the answer to a line this script printed.
#
# 1. (WCE_SERIAL set) the write cache case, on the disk with that serial: the
#    disk starts write-back; 16 O_DIRECT writes (WCE-WRITTEN step=write-back),
#    then "write through" into its cache_type (virtio-blk CONFIG_WCE: QEMU
#    passes the new value on to the back end) and 16 more (step=write-through);
#    the host kills and restarts the back end and says "restarted" once QEMU is
#    connected again; the guest reads cache_type and writes 16 more
#    (step=after-restart). After each step the host says "next". What the
#    guest reads in cache_type is QEMU's copy of the configuration space, which
#    QEMU fills from the back end only when the device is created: the host
#    tells whether the back end still runs write-through by what reaches its
#    disk (see tests/restart_lab.rs).
# 2. genwrite on the disk with serial WRITERS_SERIAL: WRITERS writers (one
#    region of REGION_BLOCKS blocks each, writes of 1 to MAX_EXTENT blocks)
#    until the host says "stop" (or
#    MAX_S seconds), HANG_S seconds before an operation counts as hung; then
#    the final read of every region. The host kills and restarts the back end
#    while the writers run.
# 3. The kernel log: every "is not a head" (a request the device completed
#    twice) and "I/O error" line, and their counts (DMESG-SUMMARY).
# The script fails if genwrite does, or if the kernel logged either message.
set -u

LAB=restart-lab
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

for v in WRITERS_SERIAL WRITERS REGION_BLOCKS MAX_EXTENT MAX_S HANG_S SEED; do
    eval "val=\${$v:-}"
    [ -n "$val" ] || fatal "$v must be set on the kernel command line"
done

control_open

# --- 1. the write cache --------------------------------------------------------
if [ -n "${WCE_SERIAL:-}" ]; then
    wd=$(disk "$WCE_SERIAL")
    ct=/sys/block/$wd/cache_type
    step=0
    # wce_step NAME: 16 O_DIRECT writes of 4 KiB to the disk, then the line the
    # host waits for, then the host's answer.
    wce_step() {
        dd if=/dev/urandom of="/dev/$wd" bs=4096 count=16 seek=$((step * 16)) oflag=direct 2>/dev/null ||
            fatal "writing to /dev/$wd ($1)"
        step=$((step + 1))
        echo "WCE-WRITTEN step=$1 cache_type=\"$(cat "$ct")\""
        host_says "$2"
    }
    [ "$(cat "$ct")" = "write back" ] || fatal "$wd starts as '$(cat "$ct")', not write back"
    wce_step write-back next
    echo "write through" >"$ct" || fatal "cannot write $ct"
    wce_step write-through restarted
    wce_step after-restart next
fi

# --- 2. the writers ------------------------------------------------------------
vd=$(disk "$WRITERS_SERIAL")
hwq=$(find /sys/block/"$vd"/mq -mindepth 1 -maxdepth 1 -type d | wc -l)
say "WRITERS-DISK disk=$vd hw_queues=$hwq cpus=$(nproc)"
report=/tmp/genwrite.report
genwrite --device "/dev/$vd" --writers "$WRITERS" --region-blocks "$REGION_BLOCKS" \
    --max-extent "$MAX_EXTENT" --seed "$SEED" --max-seconds "$MAX_S" --hang-seconds "$HANG_S" \
    --stop-on-stdin --report $report <&3 &
gw=$!
# Not `wait`: a writer stuck in a write that never completes keeps genwrite
# from exiting. Its report comes once the stuck ones are reported.
limit=$(((MAX_S + 2 * HANG_S + 120) * 10))
wait_for "$limit" test -s $report || say "FAIL genwrite gave no report"
# From here on the kernel's messages stay in its log, out of the report's lines
# on the console (they would cut into them).
dmesg -n 1
cat $report
verdict=$(sed -n 's/^GENWRITE-RESULT verdict=\([A-Z]*\) .*/\1/p' $report 2>/dev/null)
gone "$gw" || say "genwrite is still running (a thread is stuck in the kernel)"

# --- 3. the kernel log ---------------------------------------------------------
dmesg | grep -E 'is not a head|I/O error|virtio_blk|blocked for more than' | head -n 40 |
    sed 's/^/DMESG: /'
heads=$(dmesg | grep -c 'is not a head')
ioerr=$(dmesg | grep -c 'I/O error')
echo "DMESG-SUMMARY not_a_head=$heads io_errors=$ioerr"

[ "$verdict" = PASS ] || fatal "genwrite: ${verdict:-no result}"
[ "$heads" -eq 0 ] && [ "$ioerr" -eq 0 ] || fatal "the kernel logged device errors"
say "all steps passed"
