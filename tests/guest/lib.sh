# shellcheck shell=sh
# The one library of the lab's guest scripts: sourced by every script in
# tests/guest/ (and the guest side of benches/pcie_callgrind.sh), whose
# initramfs has this file as /usr/lib/vubd-lab/lib.sh (tests/common/lab.rs,
# tests/guest-test.sh and qemu/nvmet-target.sh add it). The script sets LAB,
# the prefix of its console lines, before it sources this file. The exception
# is bind-vfio.sh, a tool that also runs outside the lab and so stands alone.

say() { echo "$LAB: $*"; }
fatal() { say "FAIL $*"; exit 1; }

# put VALUE FILE: a sysfs or configfs write that is fatal when it fails.
put() { printf '%s' "$1" >"$2" 2>/dev/null || fatal "cannot write '$1' to $2"; }

# wait_for TENTHS CMD...: runs CMD every 0.1 s until it succeeds, at most
# TENTHS times.
wait_for() {
    n=$1
    shift
    while [ "$n" -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    "$@"
}

# uptime_s: the guest's uptime in seconds.
uptime_s() { cut -d' ' -f1 /proc/uptime; }

# gone PID: the process has exited (a zombie until `wait` reaps it, and
# kill -0 still reaches a zombie).
gone() { [ ! -e "/proc/$1" ] || grep -q ') Z ' "/proc/$1/stat" 2>/dev/null; }

# end_vubd PID LOG: SIGTERM to the vubd started in the background as PID,
# which must exit within 10 s (else SIGKILL) with status 0 (else the end of
# its LOG is printed); fatal otherwise.
end_vubd() {
    kill -TERM "$1"
    if ! wait_for 100 gone "$1"; then
        kill -KILL "$1" 2>/dev/null
        fatal "vubd still running 10 s after SIGTERM"
    fi
    rc=0
    wait "$1" || rc=$?
    [ "$rc" -eq 0 ] || { tail -n 30 "$2"; fatal "vubd exited with status $rc"; }
}

# disk_of SERIAL: the name (vdX) of the virtio disk with that serial number.
disk_of() {
    for d in /sys/block/vd*; do
        [ -e "$d/serial" ] || continue
        [ "$(cat "$d/serial")" = "$1" ] && basename "$d" && return 0
    done
    return 1
}

# disk SERIAL: waits (10 s at most) for the disk; fatal if it does not appear.
disk() {
    wait_for 100 disk_of "$1" >/dev/null || fatal "no virtio disk with serial $1"
    disk_of "$1"
}

# control_open: opens the control port, the guest's second serial port
# (/dev/ttyS1: run-guest.sh --control, or a libvirt <serial> on port 1), on
# which the host sends one word a line, as fd 3; then says CONTROL-READY.
control_open() {
    stty -F /dev/ttyS1 raw -echo || fatal "cannot set up the control port /dev/ttyS1"
    exec 3</dev/ttyS1
    say "CONTROL-READY"
}

# host_says WORD: the host's next line on the control port must be WORD (10
# minutes at most).
host_says() {
    line=''
    # shellcheck disable=SC3045 # busybox's read has -t
    read -r -t 600 line <&3 || fatal "no word from the host (waiting for '$1')"
    [ "$line" = "$1" ] || fatal "the host said '$line', not '$1'"
}

# ctrl_of SERIAL: the sysfs directory of the nvme controller with that serial
# number.
ctrl_of() {
    for c in /sys/class/nvme/nvme*; do
        [ -e "$c/serial" ] || continue
        [ "$(sed 's/ *$//' "$c/serial")" = "$1" ] && echo "$c" && return 0
    done
    return 1
}

# bdf_of SERIAL: the PCI address of the nvme controller with that serial
# number.
bdf_of() {
    c=$(ctrl_of "$1") && cat "$c/address"
}

# wait_serial SERIAL: waits (10 s at most) for the nvme driver to find the
# controller with that serial number; fatal if it does not.
wait_serial() {
    wait_for 100 bdf_of "$1" >/dev/null || fatal "no controller with serial $1"
}

# bind_vfio BDF: bind-vfio.sh hands the controller to vfio-pci; its output
# (the VFIO-BOUND line) is printed.
bind_vfio() {
    out=$(bind-vfio.sh "$1") || fatal "bind-vfio.sh: $out"
    echo "$out"
}

# take_controller SERIAL: loads the nvme driver, waits for the controller with
# that serial number and hands it to vfio-pci (printing the VFIO-BOUND line);
# sets bdf to its PCI address.
take_controller() {
    modprobe nvme || fatal "modprobe nvme"
    wait_serial "$1"
    bdf=$(bdf_of "$1")
    bind_vfio "$bdf"
}
