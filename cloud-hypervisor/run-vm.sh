#!/usr/bin/env bash
# Boots a cloud-hypervisor VM whose disk is served by vubd.
#
# Usage: cloud-hypervisor/run-vm.sh --kernel VMLINUX --disk IMAGE [--rootfs ROOTFS_IMAGE]
#            [--queues N] [--cmdline "..."] [--vubd PATH] [--cloud-hypervisor PATH]
#
# cloud-hypervisor maps guest memory into vubd only when it is shared (`--memory shared=on`);
# the disk appears in the guest as /dev/vda (or /dev/vdb after a --rootfs disk).
set -euo pipefail

kernel= disk= rootfs= queues=1 cmdline="console=ttyS0 root=/dev/vda rw"
vubd=${VUBD:-vubd} ch=${CLOUD_HYPERVISOR:-cloud-hypervisor}
while (($#)); do
  case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --disk) disk=$2; shift 2 ;;
    --rootfs) rootfs=$2; shift 2 ;;
    --queues) queues=$2; shift 2 ;;
    --cmdline) cmdline=$2; shift 2 ;;
    --vubd) vubd=$2; shift 2 ;;
    --cloud-hypervisor) ch=$2; shift 2 ;;
    *) echo "run-vm.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $kernel && -n $disk ]] || { echo "run-vm.sh: --kernel and --disk are required" >&2; exit 2; }
command -v "$ch" >/dev/null || { echo "run-vm.sh: $ch not found" >&2; exit 2; }

dir=$(mktemp -d)
sock=$dir/vubd.sock
trap 'kill "$vubd_pid" 2>/dev/null; wait "$vubd_pid" 2>/dev/null; rm -rf "$dir"' EXIT
"$vubd" --socket-path "$sock" --disk "$disk" --num-queues "$queues" &
vubd_pid=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
[[ -S $sock ]] || { echo "run-vm.sh: vubd did not create $sock" >&2; exit 1; }

disks=()
[[ -n $rootfs ]] && disks+=(--disk "path=$rootfs")
"$ch" \
  --kernel "$kernel" --cmdline "$cmdline" \
  --cpus boot="$queues" --memory size=1G,shared=on \
  "${disks[@]}" --disk "vhost_user=on,socket=$sock,num_queues=$queues,queue_size=256" \
  --serial tty --console off
