#!/bin/sh
# Guest side of tests/libvirt_lab.rs; runs as /test.sh under busybox in the lab
# initramfs, in a libvirt domain (tests/libvirt/vm1.xml: two CPUs, the root disk
# a vhostuser disk on vubd's socket, a second serial port as the control port
# on which the host says when it has done its part: see control_open).
#
# 1. The root disk (serial ROOT_SERIAL): 2 MiB of random data written at 1 MiB
#    with O_DIRECT, half from each CPU (so both queues carry requests), read
#    back after dropping the caches and compared. Then "WAITING for=attached".
# 2. The host kills vubd and starts it again (QEMU reconnects: <reconnect>),
#    attaches the data disk (serial DATA_SERIAL) with virsh attach-device
#    --live and says "attached". The guest finds the data disk, reads back what
#    step 1 wrote on the root disk (through the new vubd), writes and checks
#    2 MiB more on the root disk, and 2 MiB on the data disk. Then
#    "WAITING for=detach".
# 3. The host detaches the data disk (virsh detach-device --live); the guest
#    sees it go and says so, and the host, once libvirt is done with it, says
#    "finish" (a guest that powered off at once would end QEMU under libvirt's
#    detach). The guest writes and checks 2 MiB more on the root disk.
#
# Console lines (after "libvirt: "):
#   CONTROL-READY
#   DISK name=root dev=vdX bytes=B hw_queues=N
#   VERIFIED disk=root|data step=S offset=O bytes=N sha256=H
#                             the host checks the image holds it
#   REREAD disk=root step=boot sha256=H
#   WAITING for=attached|detach
#   DETACHED dev=vdX
#   FAIL ...
#
# Environment (from the kernel command line): ROOT_SERIAL, DATA_SERIAL.
set -u

LAB=libvirt
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

for v in ROOT_SERIAL DATA_SERIAL; do
    eval "val=\${$v:-}"
    [ -n "$val" ] || fatal "$v must be set on the kernel command line"
done

mib=1048576

# sum_dev DEV OFFSET BYTES: sha256 of a range of DEV, read with O_DIRECT.
sum_dev() {
    dd if="/dev/$1" bs=65536 skip=$(($2 / 65536)) count=$(($3 / 65536)) iflag=direct \
        2>/dev/null | sha256sum | cut -d' ' -f1
}

# verify NAME DEV STEP OFFSET: 2 MiB of random data (kept as /tmp/NAME-STEP)
# written to DEV at OFFSET with O_DIRECT, the first half from CPU 0 and the
# second from CPU 1, read back after dropping the caches; prints the VERIFIED
# line, fatal if the data read back differs.
verify() {
    pat=/tmp/$1-$3
    dd if=/dev/urandom of="$pat" bs=$mib count=2 2>/dev/null || fatal "making $pat"
    blocks=$(($4 / mib))
    taskset -c 0 dd if="$pat" of="/dev/$2" bs=$mib count=1 seek="$blocks" oflag=direct 2>/dev/null &
    first=$!
    taskset -c 1 dd if="$pat" of="/dev/$2" bs=$mib count=1 skip=1 seek=$((blocks + 1)) oflag=direct \
        2>/dev/null || fatal "writing the second half of $pat to $2"
    wait "$first" || fatal "writing the first half of $pat to $2"
    echo 3 >/proc/sys/vm/drop_caches
    want=$(sha256sum <"$pat" | cut -d' ' -f1)
    got=$(sum_dev "$2" "$4" $((2 * mib)))
    [ "$got" = "$want" ] || fatal "$1 ($2) reads back sha256 $got at $4, $want was written ($3)"
    say "VERIFIED disk=$1 step=$3 offset=$4 bytes=$((2 * mib)) sha256=$want"
}

# --- 1. boot ------------------------------------------------------------------
control_open
root=$(disk "$ROOT_SERIAL") || exit 1
hwq=$(find /sys/block/"$root"/mq -mindepth 1 -maxdepth 1 -type d | wc -l)
say "DISK name=root dev=$root bytes=$(($(cat /sys/block/"$root"/size) * 512)) hw_queues=$hwq"
verify root "$root" boot $mib

# --- 2. vubd restarted, the data disk attached ----------------------------------
say "WAITING for=attached"
host_says attached
data=$(disk "$DATA_SERIAL") || exit 1
wait_for 100 test -b "/dev/$data" || fatal "/dev/$data did not appear"
got=$(sum_dev "$root" $mib $((2 * mib)))
[ "$got" = "$(sha256sum </tmp/root-boot | cut -d' ' -f1)" ] ||
    fatal "after vubd's restart, the root disk reads back sha256 $got where step boot wrote"
say "REREAD disk=root step=boot sha256=$got"
verify root "$root" after-restart $((4 * mib))
verify data "$data" attached $mib

# --- 3. the data disk detached ----------------------------------------------------
say "WAITING for=detach"
wait_for 1200 test ! -e "/sys/block/$data" || fatal "$data is still there 120 s after the host was told"
say "DETACHED dev=$data"
host_says finish
verify root "$root" after-detach $((8 * mib))
say "all steps passed"
