#!/usr/bin/env bash
# Runs a Linux NVMe/TCP target (the kernel's nvmet + nvmet-tcp) in a QEMU
# guest (TCG), reachable from the host at 127.0.0.1:PORT through QEMU's user
# network, for testing NVMe/TCP initiators without touching the host kernel.
#
# Usage: nvmet-target.sh [options]
#
#   --port PORT            host TCP port forwarded to the target's port 4420
#                          in the guest (default 4420); only 127.0.0.1
#   --nqn NQN              subsystem NQN (default nqn.2014-08.org.vubd:test)
#   --namespaces N         number of namespaces, NSIDs 1..N (default 1,
#                          at most 32)
#   --ns-size MIB          size of each namespace in MiB (default 64)
#   --block-size B         logical block size, 512 or 4096 (default 512)
#   --allow-host NQN       allow only this host NQN to connect (default: any
#                          host, attr_allow_any_host=1)
#   --resizable            namespaces that can change size: loop devices over
#                          sparse files in guest memory (512-byte blocks only),
#                          resized by commands on the --control port
#   --control SOCK         a second serial port on the unix socket SOCK (QEMU
#                          listens): with --resizable, "resize NSID MIB" grows
#                          or shrinks a namespace, and nvmet tells its hosts;
#                          the console answers NVMET-RESIZED nsid=NSID mib=MIB
#   --qmp SOCK             QMP unix socket (server, no wait), e.g. to
#                          `stop`/`cont` the guest: a stalled target
#   --pidfile FILE         QEMU writes its process id to FILE
#   --log FILE             also keep the serial console output in FILE
#   --no-echo              do not copy the console to stdout
#   --timeout SEC          stop QEMU after SEC seconds, boot included
#                          (default 600, or $VUBD_LAB_TIMEOUT)
#   --memory SIZE          guest memory (default 512M); the namespaces live
#                          in it and must fit, with 192 MiB to spare
#   --smp N                guest CPUs (default 1)
#   --initrd FILE          use this initramfs, made earlier with
#                          --build-initrd, instead of building one
#   --build-initrd FILE    only build the target's initramfs into FILE and
#                          exit (the options above do not change it: they
#                          reach the guest on the kernel command line)
#   --dry-run              print the QEMU command line and exit
#   -h, --help             show this help
#
# The namespaces are null_blk devices with memory_backed=1 (or, with
# --resizable, loop devices over files): RAM in the guest, zero-filled at
# start, keeping their data while the guest runs.
# The discovery subsystem (nqn.2014-08.org.nvmexpress.discovery) answers on
# the same port.
#
# Once the target listens, the guest prints one console line
#   NVMET-READY port=4420 host_port=PORT nqn=NQN namespaces=N ns_mib=M block_size=B allow=any|HOSTNQN
# and then serves until QEMU is stopped (a signal, or the timeout); a setup
# error prints "nvmet: FAIL reason" and the guest powers off. Wait for the
# READY line, not for the host port: QEMU's user network accepts a TCP
# connection on PORT before anything listens in the guest (and then closes
# it).
#
# Exit status (from run-guest.sh): 1 the target could not be set up in the
# guest; 3 QEMU failed, was stopped, or the timeout hit; 2 bad usage.
set -euo pipefail

LAB_PROG=nvmet-target.sh
# shellcheck source=qemu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
usage_error() { printf '%s: error: %s (see --help)\n' "$LAB_PROG" "$*" >&2; exit 2; }

lab=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
port=4420 nqn=nqn.2014-08.org.vubd:test namespaces=1 ns_mib=64 block_size=512
allow_host='' resizable=0 control='' qmp='' pidfile='' log='' echo_console=1 memory=512M smp=1 initrd='' build_only=''
dry_run=0
timeout_s=${VUBD_LAB_TIMEOUT:-600}
need_value() { [[ $2 -ge 2 ]] || usage_error "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --port) need_value "$1" $#; port=$2; shift 2 ;;
        --nqn) need_value "$1" $#; nqn=$2; shift 2 ;;
        --namespaces) need_value "$1" $#; namespaces=$2; shift 2 ;;
        --ns-size) need_value "$1" $#; ns_mib=$2; shift 2 ;;
        --block-size) need_value "$1" $#; block_size=$2; shift 2 ;;
        --allow-host) need_value "$1" $#; allow_host=$2; shift 2 ;;
        --resizable) resizable=1; shift ;;
        --control) need_value "$1" $#; control=$2; shift 2 ;;
        --qmp) need_value "$1" $#; qmp=$2; shift 2 ;;
        --pidfile) need_value "$1" $#; pidfile=$2; shift 2 ;;
        --log) need_value "$1" $#; log=$2; shift 2 ;;
        --no-echo) echo_console=0; shift ;;
        --timeout) need_value "$1" $#; timeout_s=$2; shift 2 ;;
        --memory) need_value "$1" $#; memory=$2; shift 2 ;;
        --smp) need_value "$1" $#; smp=$2; shift 2 ;;
        --initrd) need_value "$1" $#; initrd=$2; shift 2 ;;
        --build-initrd) need_value "$1" $#; build_only=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage_error "unexpected argument '$1'" ;;
    esac
done

build_initrd() {
    local guest=$lab/../tests/guest
    "$lab/build-initramfs.sh" --script "$guest/nvmet-target.sh" \
        --add "$guest/lib.sh:/usr/lib/vubd-lab/lib.sh" --module loop --output "$1" ||
        die "cannot build the target's initramfs"
}
if [[ -n $build_only ]]; then
    [[ -z $initrd ]] || usage_error "--build-initrd and --initrd exclude each other"
    build_initrd "$build_only"
    exit 0
fi

# NQNs: at most 223 bytes (NVMe base spec); these characters only, since the
# NQN travels on the kernel command line and names configfs directories.
nqn_ok() { [[ ${#1} -le 223 && $1 =~ ^nqn\.[A-Za-z0-9._:-]+$ ]]; }
[[ $port =~ ^[1-9][0-9]*$ && $port -le 65535 ]] || usage_error "--port wants a TCP port, not '$port'"
nqn_ok "$nqn" || usage_error "--nqn '$nqn' is not an NQN this lab takes (nqn.*, [A-Za-z0-9._:-], <= 223 bytes)"
[[ $nqn != nqn.2014-08.org.nvmexpress.discovery ]] || usage_error "--nqn: that is the discovery NQN"
[[ -z $allow_host ]] || nqn_ok "$allow_host" ||
    usage_error "--allow-host '$allow_host' is not an NQN this lab takes"
[[ $namespaces =~ ^[1-9][0-9]*$ && $namespaces -le 32 ]] ||
    usage_error "--namespaces wants 1..32, not '$namespaces'"
[[ $ns_mib =~ ^[1-9][0-9]*$ ]] || usage_error "--ns-size wants MiB, not '$ns_mib'"
[[ $block_size == 512 || $block_size == 4096 ]] ||
    usage_error "--block-size wants 512 or 4096, not '$block_size'"
[[ $memory =~ ^([1-9][0-9]*)([MG])$ ]] || usage_error "--memory wants a size such as 512M or 1G, not '$memory'"
mem_mib=${BASH_REMATCH[1]}
[[ ${BASH_REMATCH[2]} == G ]] && mem_mib=$((mem_mib * 1024))
((namespaces * ns_mib + 192 <= mem_mib)) ||
    usage_error "$namespaces namespace(s) of $ns_mib MiB do not fit in $memory of guest memory (192 MiB are kept for the kernel); raise --memory"
[[ $qmp != *,* ]] || usage_error "--qmp: QEMU cannot take a path with a comma"
[[ $resizable -eq 0 || $block_size == 512 ]] || usage_error "--resizable namespaces have 512-byte blocks"
[[ $resizable -eq 0 || -n $control ]] || usage_error "--resizable needs --control (the port its commands come on)"

workdir=''
if [[ -z $initrd ]]; then
    workdir=$(mktemp -d "${TMPDIR:-/tmp}/nvmet-target.XXXXXX")
    trap 'rm -rf "$workdir"' EXIT
    initrd=$workdir/nvmet-target.cpio.gz
    build_initrd "$initrd"
fi
[[ -f $initrd ]] || usage_error "initramfs '$initrd' not found"

append="NVMET_NQN=$nqn NVMET_NAMESPACES=$namespaces NVMET_NS_MIB=$ns_mib"
append+=" NVMET_BLOCK_SIZE=$block_size NVMET_TRSVCID=4420 NVMET_HOST_PORT=$port"
[[ -z $allow_host ]] || append+=" NVMET_ALLOW_HOST=$allow_host"
[[ $resizable -eq 0 ]] || append+=" NVMET_RESIZABLE=1"

args=(--initrd "$initrd" --smp "$smp" --memory "$memory" --timeout "$timeout_s" --append "$append")
[[ -z $log ]] || args+=(--log "$log")
[[ -z $control ]] || args+=(--control "$control")
[[ $echo_console -eq 1 ]] || args+=(--no-echo)
[[ $dry_run -eq 0 ]] || args+=(--dry-run)
# restrict=on: the guest reaches nothing outside; the forward still works.
# romfile= : no PXE option ROM (the kernel is booted directly), so the
# ipxe-qemu ROM files are not needed.
# shellcheck disable=SC2054 # the commas are inside option values
qemu_args=(-netdev "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:$port-:4420"
    -device virtio-net-pci,netdev=n0,romfile=)
[[ -z $qmp ]] || qemu_args+=(-qmp "unix:$qmp,server=on,wait=off")
[[ -z $pidfile ]] || qemu_args+=(-pidfile "$pidfile")

log "target $nqn: $namespaces x $ns_mib MiB, $block_size-byte blocks, host 127.0.0.1:$port -> guest 4420"
if [[ -z $workdir ]]; then
    exec "$lab/run-guest.sh" "${args[@]}" -- "${qemu_args[@]}"
fi
# The initramfs built above is removed at exit, so run-guest.sh runs as a
# child; a signal is passed on to it (it stops QEMU) before this exits.
"$lab/run-guest.sh" "${args[@]}" -- "${qemu_args[@]}" &
guest_pid=$!
trap 'kill -TERM "$guest_pid" 2>/dev/null || true; wait "$guest_pid" || true; exit 130' INT TERM HUP
status=0
wait "$guest_pid" || status=$?
exit "$status"
