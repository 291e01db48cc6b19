#!/bin/sh
# Guest side of tests/guest-test.sh; runs as /test.sh under busybox in the
# lab initramfs (qemu/build-initramfs.sh).
#
# Writes /pattern.bin (shipped in the initramfs) to the vhost-user-blk disk
# and reads it back with O_DIRECT after dropping caches:
#   region A: at PATTERN_OFFSET bytes, the whole pattern, in one part per
#             CPU written concurrently, each from its own CPU, so that every
#             request queue carries I/O
#   region B: the last TAIL_BYTES bytes of the disk, the start of the
#             pattern, written through the page cache and then flushed
# The host checks the image file holds the same bytes afterwards.
#
# Environment (from the kernel command line):
#   DISK_BYTES      expected capacity of the disk in bytes
#   EXPECT_QUEUES   num-queues the frontend was given
#   PATTERN_OFFSET  byte offset of region A (multiple of 64 KiB)
#   TAIL_BYTES      size of region B (multiple of 64 KiB)
set -u

dev=vda
blk=/dev/$dev
pattern=/pattern.bin
bs=65536
failures=0

LAB=guest
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh
ok() { say "ok   $*"; }
bad() { say "FAIL $*"; failures=$((failures + 1)); }

for v in DISK_BYTES EXPECT_QUEUES PATTERN_OFFSET TAIL_BYTES; do
    eval "val=\${$v:-}"
    [ -n "$val" ] || fatal "$v is not set on the kernel command line"
done

# --- the device -------------------------------------------------------------
i=0
while [ ! -b "$blk" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "$blk" ] || fatal "$blk did not appear (virtio_blk loaded: $(grep -c virtio_blk /proc/modules))"
ok "$blk present"

size=$(( $(cat /sys/block/$dev/size) * 512 ))
if [ "$size" -eq "$DISK_BYTES" ]; then ok "capacity $size bytes"; else
    fatal "capacity is $size bytes, expected $DISK_BYTES"; fi

cpus=$(nproc)
want_hwq=$EXPECT_QUEUES
[ "$cpus" -lt "$want_hwq" ] && want_hwq=$cpus
hwq=$(find /sys/block/$dev/mq -mindepth 1 -maxdepth 1 -type d | wc -l)
if [ "$hwq" -eq "$want_hwq" ]; then ok "$hwq hardware queue(s) for $cpus CPU(s)"; else
    bad "$hwq hardware queue(s), expected $want_hwq (num-queues=$EXPECT_QUEUES, $cpus CPUs)"; fi

if [ "$(cat /sys/block/$dev/ro)" = 0 ]; then ok "writable"; else fatal "device is read-only"; fi

pbytes=$(wc -c <"$pattern")
blocks=$((pbytes / bs))
if [ $((pbytes % bs)) -ne 0 ] || [ "$blocks" -lt "$cpus" ]; then
    fatal "pattern size $pbytes is not $cpus or more blocks of $bs bytes"
fi
if [ $((PATTERN_OFFSET % bs)) -ne 0 ] || [ $((TAIL_BYTES % bs)) -ne 0 ]; then
    fatal "PATTERN_OFFSET and TAIL_BYTES must be multiples of $bs"
fi
[ $((PATTERN_OFFSET + pbytes + TAIL_BYTES)) -le "$size" ] || fatal "disk too small for the test"
tail_off=$((size - TAIL_BYTES))

# sum_dev OFFSET LENGTH: sha256 of a range of the device, read with O_DIRECT.
sum_dev() {
    dd if=$blk bs=$bs skip=$(($1 / bs)) count=$(($2 / bs)) iflag=direct 2>/dev/null |
        sha256sum | cut -d' ' -f1
}
# sum_file FILE LENGTH: sha256 of the first LENGTH bytes of FILE.
sum_file() { head -c "$2" "$1" | sha256sum | cut -d' ' -f1; }

irqs() { grep -E 'virtio[0-9]+-req\.' /proc/interrupts || true; }

# --- reads of a fresh disk ----------------------------------------------------
zero_sum=$(sum_file /dev/zero "$pbytes")
if [ "$(sum_dev "$PATTERN_OFFSET" "$pbytes")" = "$zero_sum" ]; then ok "region A reads as zeros before writing"; else
    bad "region A of the fresh disk is not all zeros"; fi

# --- writes -------------------------------------------------------------------
before=$(irqs)
t0=$(date +%s)
w() { # w CPU SKIP_BLOCKS SEEK_BLOCKS COUNT_BLOCKS [dd flags]
    cpu=$1; shift
    if [ "$cpus" -ge 2 ]; then set -- taskset -c "$cpu" dd "$@"; else set -- dd "$@"; fi
    "$@"
}
# Part p of region A is blocks [p * blocks / cpus, (p + 1) * blocks / cpus).
pids=''
p=0
while [ $p -lt "$cpus" ]; do
    first=$((p * blocks / cpus))
    next=$(((p + 1) * blocks / cpus))
    w $p if=$pattern of=$blk bs=$bs skip=$first seek=$((PATTERN_OFFSET / bs + first)) \
        count=$((next - first)) oflag=direct 2>/dev/null &
    pids="$pids $!"
    p=$((p + 1))
done
p=0
for pid in $pids; do
    if wait "$pid"; then ok "region A part $p written (O_DIRECT, CPU $p)"; else bad "writing region A part $p"; fi
    p=$((p + 1))
done

if dd if=$pattern of=$blk bs=$bs seek=$((tail_off / bs)) count=$((TAIL_BYTES / bs)) 2>/dev/null &&
    sync && blockdev --flushbufs $blk; then
    ok "region B written through the page cache and flushed"
else
    bad "writing region B"
fi
say "writes took $(($(date +%s) - t0)) s"

# --- read back ----------------------------------------------------------------
echo 3 >/proc/sys/vm/drop_caches
want=$(sum_file $pattern "$pbytes")
got=$(sum_dev "$PATTERN_OFFSET" "$pbytes")
if [ "$got" = "$want" ]; then ok "region A reads back ($pbytes bytes, sha256 $want)"; else
    bad "region A reads back as sha256 $got, expected $want"; fi
want=$(sum_file $pattern "$TAIL_BYTES")
got=$(sum_dev "$tail_off" "$TAIL_BYTES")
if [ "$got" = "$want" ]; then ok "region B reads back ($TAIL_BYTES bytes at $tail_off)"; else
    bad "region B reads back as sha256 $got, expected $want"; fi

# --- both queues used -----------------------------------------------------------
after=$(irqs)
say "request-queue interrupts before/after:"
echo "$before" | sed 's/^/guest:   before /'
echo "$after" | sed 's/^/guest:   after  /'
if [ "$want_hwq" -ge 2 ]; then
    # Every request queue must have taken interrupts during the test: sum
    # the per-CPU counters of each req.N line, before and after.
    nlines=$(echo "$after" | grep -c 'req\.')
    idle=$({ echo "$before" | sed 's/^/B /'; echo "$after" | sed 's/^/A /'; } | awk -v n="$cpus" '
        NF > n + 2 { s = 0; for (i = 3; i <= n + 2; i++) s += $i
                     if ($1 == "B") b[$NF] = s; else a[$NF] = s }
        END { for (q in a) if (a[q] - b[q] <= 0) print q }')
    if [ "$nlines" -ne "$want_hwq" ]; then
        bad "$nlines request-queue interrupt lines in /proc/interrupts, expected $want_hwq"
    elif [ -n "$idle" ]; then bad "queue(s) without interrupts during the test: $idle"
    else ok "all $want_hwq request queues completed I/O during the test"; fi
fi

if [ "$failures" -ne 0 ]; then say "$failures check(s) failed"; exit 1; fi
say "all checks passed"
