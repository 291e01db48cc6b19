#!/bin/sh
# Hands an NVMe controller to vfio-pci, so that a user-space driver can own
# it through VFIO. POSIX sh: it runs under busybox in the lab guest
# (qemu/build-initramfs.sh) and as well on an ordinary Linux machine.
#
# Usage: bind-vfio.sh [BDF]          bind BDF, or the first NVMe controller
#        bind-vfio.sh --list         list the NVMe controllers
#        bind-vfio.sh --release BDF  give BDF back to its kernel driver
#        bind-vfio.sh --help
#
# NVMe controllers are the PCI functions of class 0x010802. Binding:
#   1. loads vfio-pci (modprobe) unless its driver is registered;
#   2. checks that BDF has an IOMMU group and that the group is viable:
#      every other device in /sys/kernel/iommu_groups/N/devices is unbound,
#      bound to vfio-pci or pci-stub, or a PCI bridge;
#   3. writes vfio-pci to driver_override, unbinds the current driver (nvme,
#      usually) and asks the PCI core to probe again (drivers_probe);
#   4. loads vfio_iommu_type1 (the container's IOMMU back end, which nothing
#      loads on demand), waits (at most 5 s) for the driver to be vfio-pci
#      and /dev/vfio/N to appear, and prints one line
#        VFIO-BOUND bdf=BDF group=N dev=/dev/vfio/N id=VVVV:DDDD was=DRIVER|none
# --release clears driver_override, unbinds vfio-pci and probes again, and
# prints "VFIO-RELEASED bdf=BDF driver=DRIVER|none".
# Errors print "VFIO-FAILED reason" and exit 1. Needs root.
set -eu

NVME_CLASS=0x010802
pci=/sys/bus/pci

say() { echo "bind-vfio: $*"; }
fail() { echo "VFIO-FAILED $*"; exit 1; }
usage() { sed -n '2,/^set -eu/{/^#/s/^# \{0,1\}//p}' "$0"; }

# driver_of DEV_DIR: the name of the bound driver, or "none".
driver_of() {
    if [ -L "$1/driver" ]; then basename "$(readlink "$1/driver")"; else echo none; fi
}

# nvme_list: one BDF per line, every PCI function of class NVMe.
nvme_list() {
    for d in "$pci"/devices/*; do
        [ -f "$d/class" ] || continue
        [ "$(cat "$d/class")" = "$NVME_CLASS" ] && basename "$d"
    done
    return 0
}

# set_bdf BDF: sets bdf to BDF with the PCI domain, which may be left out
# (01:00.0).
set_bdf() {
    case $1 in
        *:*:*.*) bdf=$1 ;;
        *:*.*) bdf=0000:$1 ;;
        *) fail "'$1' is not a PCI address such as 0000:01:00.0" ;;
    esac
}

# put VALUE FILE: a sysfs write that fails loudly.
put() { printf '%s' "$1" >"$2" 2>/dev/null || fail "cannot write '$1' to $2"; }

# wait_until TENTHS CMD...: runs CMD every 0.1 s until it succeeds, at most
# TENTHS times.
wait_until() {
    n=$1
    shift
    while [ "$n" -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    "$@"
}

is_driver() { [ "$(driver_of "$1")" = "$2" ]; }

# check_group DEV_DIR GROUP: every other member of the group must leave the
# group viable for VFIO.
check_group() {
    for m in /sys/kernel/iommu_groups/"$2"/devices/*; do
        [ "$(basename "$m")" = "$(basename "$1")" ] && continue
        drv=$(driver_of "$m")
        case $drv in none | vfio-pci | pci-stub | pcieport) continue ;; esac
        # A bridge (class 0x0604xx) does not take part in DMA isolation.
        case $(cat "$m/class" 2>/dev/null) in 0x0604*) continue ;; esac
        fail "IOMMU group $2 is not viable: $(basename "$m") is bound to $drv (bind it to vfio-pci too, or unbind it)"
    done
}

bind() {
    set_bdf "$1"
    dev=$pci/devices/$bdf
    [ -d "$dev" ] || fail "no PCI device $bdf"
    class=$(cat "$dev/class")
    [ "$class" = "$NVME_CLASS" ] || fail "$bdf has class $class, not an NVMe controller ($NVME_CLASS)"
    [ -L "$dev/iommu_group" ] ||
        fail "$bdf has no IOMMU group: is an IOMMU on (intel_iommu=on or amd_iommu=on; in QEMU -device intel-iommu)?"
    group=$(basename "$(readlink "$dev/iommu_group")")
    id="$(sed 's/^0x//' "$dev/vendor"):$(sed 's/^0x//' "$dev/device")"
    was=$(driver_of "$dev")
    if [ "$was" != vfio-pci ]; then
        if [ ! -d "$pci/drivers/vfio-pci" ]; then
            modprobe vfio-pci || fail "modprobe vfio-pci"
        fi
        [ -d "$pci/drivers/vfio-pci" ] || fail "vfio-pci is loaded but not registered"
        check_group "$dev" "$group"
        put vfio-pci "$dev/driver_override"
        if [ "$was" != none ]; then
            say "unbinding $bdf from $was"
            put "$bdf" "$dev/driver/unbind"
        fi
        put "$bdf" "$pci/drivers_probe"
        wait_until 50 is_driver "$dev" vfio-pci ||
            fail "$bdf is bound to $(driver_of "$dev"), not vfio-pci, after drivers_probe"
    fi
    # The container's IOMMU back end; nothing loads it on demand.
    if [ ! -d /sys/module/vfio_iommu_type1 ]; then
        modprobe vfio_iommu_type1 || fail "modprobe vfio_iommu_type1"
    fi
    # devtmpfs (or udev) creates the group's node asynchronously.
    wait_until 50 test -c "/dev/vfio/$group" || fail "/dev/vfio/$group did not appear"
    [ -c /dev/vfio/vfio ] || fail "/dev/vfio/vfio (the container device) is missing"
    echo "VFIO-BOUND bdf=$bdf group=$group dev=/dev/vfio/$group id=$id was=$was"
}

release() {
    set_bdf "$1"
    dev=$pci/devices/$bdf
    [ -d "$dev" ] || fail "no PCI device $bdf"
    # A lone newline clears the override.
    printf '\n' >"$dev/driver_override" 2>/dev/null || fail "cannot clear $dev/driver_override"
    if [ "$(driver_of "$dev")" = vfio-pci ]; then
        put "$bdf" "$dev/driver/unbind"
    fi
    put "$bdf" "$pci/drivers_probe"
    echo "VFIO-RELEASED bdf=$bdf driver=$(driver_of "$dev")"
}

case ${1:-} in
    -h | --help) usage ;;
    --list)
        for bdf in $(nvme_list); do
            d=$pci/devices/$bdf
            g=none
            [ -L "$d/iommu_group" ] && g=$(basename "$(readlink "$d/iommu_group")")
            echo "$bdf group=$g driver=$(driver_of "$d")"
        done
        ;;
    --release)
        [ $# -eq 2 ] || fail "--release needs a BDF"
        release "$2"
        ;;
    -*) fail "unknown option '$1' (see --help)" ;;
    '')
        first=$(nvme_list | head -n 1)
        [ -n "$first" ] || fail "no NVMe controller (PCI class $NVME_CLASS) found"
        bind "$first"
        ;;
    *)
        [ $# -eq 1 ] || fail "one BDF at a time"
        bind "$1"
        ;;
esac
