#!/bin/sh
# Guest side of tests/migration_lab.rs; runs as /test.sh under busybox in the
# lab initramfs, in a guest (two CPUs) with one vhost-user-blk disk (vda, two
# queues) and a second serial port (ttyS1) on which the host talks to it. The
# initramfs holds migcheck.
#
# migcheck writes blocks of the disk and reads them back with O_DIRECT into
# buffers it checks right away and again after each pass, on both CPUs, until
# the host writes "end" on ttyS1: by then the guest has been live-migrated
# from QEMU to QEMU (once or more) while it ran. migcheck then reads every
# block back, flushes, and prints MIGCHECK-DONE with a digest of what the disk
# must hold, which the host checks in the image.
#
# Environment (from the kernel command line):
#   MIG_BLOCKS MIG_BLOCK_SIZE MIG_THREADS MIG_SLOTS   migcheck's settings
set -u

LAB=migration
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

for v in MIG_BLOCKS MIG_BLOCK_SIZE MIG_THREADS MIG_SLOTS; do
    eval "val=\${$v:-}"
    [ -n "$val" ] || fatal "$v must be set on the kernel command line"
done
wait_for 100 test -b /dev/vda || fatal "/dev/vda did not appear"
[ -c /dev/ttyS1 ] || fatal "no second serial port (/dev/ttyS1) to hear the host on"
stty -F /dev/ttyS1 raw -echo || fatal "cannot set /dev/ttyS1 to raw mode"

stop=/tmp/migcheck.stop
# The host's "end" stops migcheck; anything else on the port is an error.
(
    while read -r word; do
        [ "$word" = end ] && { touch $stop; exit 0; }
        say "FAIL unexpected word from the host: $word"
    done </dev/ttyS1
) &
reader=$!

rc=0
migcheck --device /dev/vda --blocks "$MIG_BLOCKS" --block-size "$MIG_BLOCK_SIZE" \
    --threads "$MIG_THREADS" --slots "$MIG_SLOTS" --stop-file $stop || rc=$?
kill "$reader" 2>/dev/null
[ "$rc" -eq 0 ] || fatal "migcheck exited with status $rc"
say "all blocks checked"
