#!/usr/bin/env bash
# Boots a QEMU guest (TCG, no KVM) from a kernel and an initramfs built by
# build-initramfs.sh, optionally with vhost-user-blk disks, emulated NVMe
# controllers and an emulated IOMMU, and reports the guest's GUEST-RESULT
# line as the exit status.
#
# Usage: run-guest.sh --initrd FILE [options] [-- QEMU_ARGS...]
#
#   --initrd FILE          initramfs (required)
#   --kernel FILE          kernel image; by default fetch-kernel.sh is run on
#                          the lab cache ($VUBD_LAB_CACHE, default target/lab)
#   --vhost-user-blk SOCK[,num-queues=N][,reconnect=S][,PROP=VALUE...]
#                          attach a vhost-user-blk-pci disk served on the unix
#                          socket SOCK (num-queues defaults to 1; reconnect=S
#                          goes to the socket's -chardev: QEMU connects again
#                          every S seconds after the back end went away;
#                          other properties go to -device as they are);
#                          repeatable, the guest sees them as vda, vdb, ... in
#                          order
#   --control SOCK         a second serial port, the guest's /dev/ttyS1, on
#                          the unix socket SOCK, which QEMU creates and
#                          listens on: a way for the host to talk to the
#                          guest script while it runs
#   --iommu                an emulated Intel IOMMU (VT-d), needed for VFIO in
#                          the guest: machine q35, -device intel-iommu
#                          (intremap=on, caching-mode=on, aw-bits=48) ahead
#                          of every other device, and "intel_iommu=on
#                          iommu=pt no_timer_check" on the kernel command
#                          line
#   --nvme IMG[,serial=S][,PROP=VALUE...]
#                          an emulated NVMe controller whose namespace 1 is
#                          the raw image IMG (serial defaults to vubd-nvmeN;
#                          other properties go to -device nvme as they are,
#                          except drive.OPT=VALUE, which goes to its -drive
#                          as OPT=VALUE: drive.throttling.bps-total=1, say);
#                          repeatable, one controller each; the Nth (from 0)
#                          has the drive (block backend) nvmeN
#   --nvme-ctrl ID[,serial=S][,PROP=VALUE...]
#                          an emulated NVMe controller without namespaces,
#                          named ID (letters, digits, '_'), for --nvme-ns
#   --nvme-ns ID:IMG[,nsid=N][,PROP=VALUE...]
#                          a namespace on controller ID backed by the raw
#                          image IMG; nsid defaults to one more than the
#                          controller's previous namespace (1 for the
#                          first); other properties go to -device nvme-ns
#                          as they are
#   --pci-bridge ID        a PCIe-to-PCI bridge (pcie-pci-bridge; needs
#                          --iommu, which makes the machine q35) named ID,
#                          created before the NVMe controllers so that they
#                          can sit behind it (bus=ID,addr=N): devices behind
#                          it share one IOMMU group
#   --monitor SOCK         the QEMU monitor (HMP) on the unix socket SOCK,
#                          which QEMU creates (qemu-io, block_set_io_throttle)
#   --smp N                guest CPUs (default 1; virtio-blk uses at most one
#                          queue per CPU, so num-queues=2 needs --smp 2)
#   --memory SIZE          guest memory, shared memfd (default 512M)
#   --append STR           extra kernel command line; NAME=VALUE words reach
#                          the guest script as environment variables
#   --timeout SEC          stop the guest after SEC seconds (default 300,
#                          or $VUBD_LAB_TIMEOUT)
#   --log FILE             also keep the serial console output in FILE
#   --no-echo              do not copy the console to stdout (needs --log
#                          to be of any use)
#   --interactive          give QEMU this terminal (for an initramfs built
#                          without --script, whose /init starts a shell);
#                          Ctrl-A x quits QEMU
#   --qemu-arg ARG         one extra QEMU argument; repeatable (or put them
#                          after --)
#   --dry-run              print the QEMU command line and exit
#   -h, --help             show this help
#
# Exit status: 0 the guest printed "GUEST-RESULT: PASS"; 1 it printed
# "GUEST-RESULT: FAIL ..."; 3 no result line (QEMU failed, the guest
# crashed, or the timeout hit); 2 bad usage.
set -euo pipefail

LAB_PROG=run-guest.sh
# shellcheck source=qemu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
usage_error() { printf '%s: error: %s (see --help)\n' "$LAB_PROG" "$*" >&2; exit 2; }

kernel='' initrd='' smp=1 memory=512M append='' log='' echo_console=1 dry_run=0 interactive=0
timeout_s=${VUBD_LAB_TIMEOUT:-300}
disks=() extra=() nvmes=() nvme_ctrls=() nvme_nss=() iommu=0 bridges=() monitor='' control=''
need_value() { [[ $2 -ge 2 ]] || usage_error "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --initrd) need_value "$1" $#; initrd=$2; shift 2 ;;
        --kernel) need_value "$1" $#; kernel=$2; shift 2 ;;
        --vhost-user-blk) need_value "$1" $#; disks+=("$2"); shift 2 ;;
        --iommu) iommu=1; shift ;;
        --pci-bridge) need_value "$1" $#; bridges+=("$2"); shift 2 ;;
        --monitor) need_value "$1" $#; monitor=$2; shift 2 ;;
        --control) need_value "$1" $#; control=$2; shift 2 ;;
        --nvme) need_value "$1" $#; nvmes+=("$2"); shift 2 ;;
        --nvme-ctrl) need_value "$1" $#; nvme_ctrls+=("$2"); shift 2 ;;
        --nvme-ns) need_value "$1" $#; nvme_nss+=("$2"); shift 2 ;;
        --smp) need_value "$1" $#; smp=$2; shift 2 ;;
        --memory) need_value "$1" $#; memory=$2; shift 2 ;;
        --append) need_value "$1" $#; append+=" $2"; shift 2 ;;
        --timeout) need_value "$1" $#; timeout_s=$2; shift 2 ;;
        --log) need_value "$1" $#; log=$2; shift 2 ;;
        --no-echo) echo_console=0; shift ;;
        --interactive) interactive=1; shift ;;
        --qemu-arg) need_value "$1" $#; extra+=("$2"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra+=("$@"); break ;;
        *) usage_error "unexpected argument '$1'" ;;
    esac
done
[[ -n $initrd ]] || usage_error "--initrd is required"
[[ -f $initrd ]] || usage_error "initramfs '$initrd' not found"
[[ $smp =~ ^[1-9][0-9]*$ ]] || usage_error "--smp wants a positive number, not '$smp'"
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout wants seconds, not '$timeout_s'"
[[ $memory =~ ^[1-9][0-9]*[MG]$ ]] || usage_error "--memory wants a size such as 512M or 1G, not '$memory'"

if [[ -z $kernel ]]; then
    lab_load_kernel
    kernel=$VMLINUZ
fi
[[ -f $kernel ]] || usage_error "kernel '$kernel' not found"

lab_need_cmd qemu-system-x86_64 qemu-system-x86
lab_need_cmd timeout coreutils

# The IOMMU: VT-d on q35, ahead of every PCI device so that they all sit
# behind it. What VFIO in the guest needs of it:
# - intremap=on: without interrupt remapping vfio_iommu_type1 refuses the
#   container (EPERM; allow_unsafe_interrupts is off). Under TCG it is on
#   by default; explicit here. kernel-irqchip=split is for KVM only.
# - aw-bits=48: 48-bit IOVAs, so that a user-space driver can map a buffer
#   at IOVA = its virtual address (user addresses reach 2^47); with the
#   default, 39, that map fails with EINVAL.
# - intel_iommu=on: the kernel would turn VT-d on by itself (Debian's
#   kernel has INTEL_IOMMU_DEFAULT_ON_INTGPU_OFF) but older ones do not.
# - iommu=pt: not needed; it keeps the guest's own drivers (virtio, nvme)
#   on identity mappings, VFIO domains are translated all the same.
# - caching-mode=on: not needed for emulated devices; QEMU wants it as soon
#   as a host device is passed through to the lab guest.
# - no_timer_check: with interrupt remapping on, a boot whose IO-APIC timer
#   check misses a tick (TCG on a busy host, one boot in a few with --smp 2)
#   panics ("timer doesn't work through Interrupt-remapped IO-APIC")
#   instead of falling back; the check is skipped.
iommu_append='' machine=()
[[ ${#bridges[@]} -eq 0 || $iommu -eq 1 ]] || usage_error "--pci-bridge needs --iommu (machine q35)"
[[ $monitor != *,* ]] || usage_error "--monitor: '$monitor' contains a comma"
[[ $control != *,* ]] || usage_error "--control: '$control' contains a comma"
if [[ $iommu -eq 1 ]]; then
    iommu_append=' intel_iommu=on iommu=pt no_timer_check'
    # shellcheck disable=SC2054 # the commas are inside option values
    machine=(-machine q35 -device intel-iommu,intremap=on,caching-mode=on,aw-bits=48)
fi

# need_image WHAT IMG: IMG names an existing file (unless --dry-run) and
# has no comma, which would end the QEMU option value.
need_image() {
    [[ -n $2 ]] || usage_error "$1: no image"
    [[ $2 != *,* ]] || usage_error "$1: '$2' contains a comma, which QEMU options cannot take"
    [[ -f $2 || $dry_run -eq 1 ]] || usage_error "$1: image '$2' not found"
}

# Nested KVM is not dependable where this lab runs, so always TCG. The
# guest RAM is a shared memfd: vhost-user back ends map it.
# shellcheck disable=SC2054 # the commas are inside option values
qemu=(qemu-system-x86_64
    -accel tcg
    "${machine[@]}"
    -nodefaults -nographic -no-reboot
    -serial mon:stdio
    -smp "$smp"
    -m "$memory"
    -object "memory-backend-memfd,id=mem,size=$memory,share=on"
    -numa node,memdev=mem
    -kernel "$kernel" -initrd "$initrd"
    -append "console=ttyS0 panic=-1 quiet${iommu_append}${append}")

if [[ -n $monitor ]]; then
    qemu+=(-monitor "unix:$monitor,server=on,wait=off")
fi
# The second 16550 UART of a PC (I/O port 0x2f8, IRQ 3): ttyS1 in the guest.
if [[ -n $control ]]; then
    # shellcheck disable=SC2054 # the commas are inside option values
    qemu+=(-chardev "socket,id=control,path=$control,server=on,wait=off"
        -device isa-serial,chardev=control)
fi
for id in "${bridges[@]}"; do
    [[ $id =~ ^[A-Za-z][A-Za-z0-9_]*$ ]] || usage_error "--pci-bridge '$id': letters, digits and '_'"
    qemu+=(-device "pcie-pci-bridge,id=$id")
done

n=0
for spec in "${disks[@]}"; do
    IFS=, read -r -a fields <<<"$spec"
    sock=${fields[0]}
    [[ -n $sock ]] || usage_error "--vhost-user-blk '$spec': no socket path"
    [[ -S $sock || $dry_run -eq 1 ]] ||
        die "--vhost-user-blk: '$sock' is not a unix socket (is the back end listening?)"
    props="chardev=vub$n" have_nq=0 chardev_opts=''
    for f in "${fields[@]:1}"; do
        [[ $f == *=* ]] || usage_error "--vhost-user-blk '$spec': '$f' is not PROP=VALUE"
        if [[ $f == reconnect=* ]]; then
            [[ ${f#reconnect=} =~ ^[1-9][0-9]*$ ]] ||
                usage_error "--vhost-user-blk '$spec': reconnect wants seconds"
            chardev_opts+=",$f"
            continue
        fi
        [[ $f == num-queues=* ]] && have_nq=1
        props+=",$f"
    done
    [[ $have_nq -eq 1 ]] || props+=",num-queues=1"
    qemu+=(-chardev "socket,id=vub$n,path=$sock$chardev_opts"
        -device "vhost-user-blk-pci,$props")
    n=$((n + 1))
done

# NVMe controllers: raw images, one drive each.
n=0
for spec in "${nvmes[@]}"; do
    IFS=, read -r -a fields <<<"$spec"
    img=${fields[0]:-}
    need_image "--nvme '$spec'" "$img"
    props="drive=nvme$n" have_serial=0 drive_opts=''
    for f in "${fields[@]:1}"; do
        [[ $f == *=* ]] || usage_error "--nvme '$spec': '$f' is not PROP=VALUE"
        [[ $f == serial=* ]] && have_serial=1
        [[ $f != drive=* ]] || usage_error "--nvme '$spec': the drive is the image"
        if [[ $f == drive.* ]]; then
            drive_opts+=",${f#drive.}"
            continue
        fi
        props+=",$f"
    done
    [[ $have_serial -eq 1 ]] || props+=",serial=vubd-nvme$n"
    qemu+=(-drive "file=$img,if=none,id=nvme$n,format=raw$drive_opts"
        -device "nvme,$props")
    n=$((n + 1))
done
declare -A ctrl_nsid=()
for spec in "${nvme_ctrls[@]}"; do
    IFS=, read -r -a fields <<<"$spec"
    id=${fields[0]}
    [[ $id =~ ^[A-Za-z][A-Za-z0-9_]*$ ]] ||
        usage_error "--nvme-ctrl '$spec': the ID must be letters, digits and '_', starting with a letter"
    [[ -z ${ctrl_nsid[$id]:-} ]] || usage_error "--nvme-ctrl: ID '$id' given twice"
    ctrl_nsid[$id]=0
    props="id=$id" have_serial=0
    for f in "${fields[@]:1}"; do
        [[ $f == *=* ]] || usage_error "--nvme-ctrl '$spec': '$f' is not PROP=VALUE"
        [[ $f == serial=* ]] && have_serial=1
        props+=",$f"
    done
    [[ $have_serial -eq 1 ]] || props+=",serial=vubd-$id"
    qemu+=(-device "nvme,$props")
done
n=0
for spec in "${nvme_nss[@]}"; do
    [[ $spec == *:* ]] || usage_error "--nvme-ns '$spec': expected ID:IMG[,nsid=N][,PROP=VALUE...]"
    id=${spec%%:*}
    IFS=, read -r -a fields <<<"${spec#*:}"
    [[ -n ${ctrl_nsid[$id]:-} ]] || usage_error "--nvme-ns '$spec': no --nvme-ctrl $id"
    img=${fields[0]:-}
    need_image "--nvme-ns '$spec'" "$img"
    nsid=$((ctrl_nsid[$id] + 1))
    props="drive=nvmens$n,bus=$id"
    for f in "${fields[@]:1}"; do
        [[ $f == *=* ]] || usage_error "--nvme-ns '$spec': '$f' is not PROP=VALUE"
        case $f in
            nsid=*)
                nsid=${f#nsid=}
                [[ $nsid =~ ^[1-9][0-9]*$ ]] || usage_error "--nvme-ns '$spec': bad nsid" ;;
            drive=*|bus=*) usage_error "--nvme-ns '$spec': '${f%%=*}' is set from ID:IMG" ;;
            *) props+=",$f" ;;
        esac
    done
    ctrl_nsid[$id]=$nsid
    qemu+=(-drive "file=$img,if=none,id=nvmens$n,format=raw"
        -device "nvme-ns,$props,nsid=$nsid")
    n=$((n + 1))
done
qemu+=("${extra[@]}")

if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "${qemu[@]}"
    printf '\n'
    exit 0
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/run-guest.XXXXXX")
[[ -n $log ]] || log=$workdir/console.log
mkdir -p "$(dirname "$log")"
: >"$log"

qemu_pid='' tail_pid=''
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    if [[ -n $qemu_pid ]]; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    if [[ -n $tail_pid ]]; then
        kill "$tail_pid" 2>/dev/null || true
        wait "$tail_pid" 2>/dev/null || true
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'log "interrupted, stopping the guest"; exit 130' INT TERM HUP

start=$SECONDS
status=0
if [[ $interactive -eq 1 ]]; then
    # In the foreground process group, so that QEMU can read the terminal.
    set +o errexit
    timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -o errexit
else
    # timeout sends SIGTERM to QEMU, then SIGKILL 10 s later if needed. QEMU
    # reads its stdin for the serial console; keep it off the caller's.
    timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null >>"$log" 2>&1 &
    qemu_pid=$!
    if [[ $echo_console -eq 1 ]]; then
        tail -n +1 -s 0.2 -f --pid="$qemu_pid" "$log" &
        tail_pid=$!
    fi
    wait "$qemu_pid" || status=$?
    qemu_pid=''
    if [[ -n $tail_pid ]]; then
        wait "$tail_pid" 2>/dev/null || true
        tail_pid=''
    fi
fi
elapsed=$((SECONDS - start))

# The marker may follow other output on the same line; the last one counts.
result=$(tr -d '\r' <"$log" | grep -a -o 'GUEST-RESULT: .*' | tail -n 1 || true)
if [[ $status -eq 124 || $status -eq 137 ]]; then
    log "guest timed out after ${timeout_s} s"
elif [[ $status -ne 0 ]]; then
    log "QEMU exited with status $status after ${elapsed} s"
fi
case $result in
    'GUEST-RESULT: PASS')
        log "guest passed in ${elapsed} s"
        exit 0 ;;
    'GUEST-RESULT: FAIL'*)
        log "guest failed (${result#GUEST-RESULT: }) in ${elapsed} s"
        exit 1 ;;
    *)
        log "no GUEST-RESULT line in the console output; last lines:"
        tr -d '\r' <"$log" | tail -n 15 | sed 's/^/    /' >&2
        exit 3 ;;
esac
