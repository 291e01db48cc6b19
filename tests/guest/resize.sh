#!/bin/sh
# Guest side of tests/resize_lab.rs; runs as /test.sh under busybox in the lab
# initramfs (qemu/build-initramfs.sh).
#
# The disk (vda, a vhost-user-blk disk served by vubd) starts at OLD_BYTES.
# The script says so, then waits for the host to resize the device to
# NEW_BYTES with vubd's device_resize: the guest sees it in
# /sys/block/vda/size without a reboot. It then writes 64 KiB of 0x5a bytes
# at OLD_BYTES (past the old end: only the new space holds it) with O_DIRECT
# and reads them back.
#
# Console lines:
#   resize: size old=BYTES            the disk as it started
#   resize: size new=BYTES seconds=S  the disk after the resize, S after the first line
#   resize: ok|FAIL ...
#
# Environment (from the kernel command line): OLD_BYTES, NEW_BYTES.
set -u

LAB=resize
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

for v in OLD_BYTES NEW_BYTES; do
    eval "val=\${$v:-}"
    [ -n "$val" ] || fatal "$v is not set on the kernel command line"
done

blk=/dev/vda
wait_for 100 test -b "$blk" || fatal "no $blk"
bytes() { echo $(($(cat /sys/block/vda/size) * 512)); }

old=$(bytes)
[ "$old" -eq "$OLD_BYTES" ] || fatal "vda has $old bytes, expected $OLD_BYTES"
say "size old=$old"
start=$(uptime_s)

# The host resizes the device once it read the line above: at most 120 s.
grown() { [ "$(bytes)" -eq "$NEW_BYTES" ]; }
wait_for 1200 grown || fatal "vda still has $(bytes) bytes, expected $NEW_BYTES"
say "size new=$(bytes) seconds=$(awk -v a="$start" -v b="$(uptime_s)" 'BEGIN { print b - a }')"

# The new space is usable: 64 KiB past the old end, written and read back.
blocks=$((OLD_BYTES / 65536))
dd if=/dev/zero bs=65536 count=1 2>/dev/null | tr '\000' 'Z' >/tmp/pattern
dd if=/tmp/pattern of="$blk" bs=65536 seek="$blocks" count=1 oflag=direct 2>/dev/null ||
    fatal "write past the old end"
dd if="$blk" of=/tmp/back bs=65536 skip="$blocks" count=1 iflag=direct 2>/dev/null ||
    fatal "read past the old end"
cmp -s /tmp/pattern /tmp/back || fatal "what was read past the old end is not what was written"
say "ok new space written and read back"
