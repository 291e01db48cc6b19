#!/bin/sh
# Guest side of qemu/nvmet-target.sh; runs as /test.sh under busybox in the
# lab initramfs (qemu/build-initramfs.sh), with lib.sh.
#
# Brings up the network (first non-loopback interface, 10.0.2.15/24, default
# route via 10.0.2.2: QEMU's user network), creates RAM-backed null_blk
# devices (memory_backed=1) and exports them through the kernel NVMe target
# (nvmet) on an NVMe/TCP port at 0.0.0.0:NVMET_TRSVCID (ipv4). Then prints
#   NVMET-READY port=4420 host_port=PORT nqn=NQN namespaces=N ns_mib=M block_size=B allow=any|HOSTNQN
# and stays up until QEMU is stopped. On any setup error it prints
#   nvmet: FAIL reason
# and exits non-zero (the guest then powers off with GUEST-RESULT: FAIL).
#
# With NVMET_RESIZABLE=1 the namespaces are loop devices over sparse files in
# the guest's RAM instead (a null_blk device cannot change size while it is
# on), 512-byte blocks only, and the host talks to the guest on its second
# serial port (ttyS1), one command a line:
#   resize NSID MIB   the namespace's file and loop device grow (or shrink)
#                     to MIB, then nvmet takes the new size (revalidate_size)
#                     and tells its hosts (a namespace attribute notice);
#                     answered on the console with
#                     NVMET-RESIZED nsid=NSID mib=MIB   or   nvmet: FAIL ...
#
# Environment (from the kernel command line):
#   NVMET_NQN         subsystem NQN
#   NVMET_NAMESPACES  number of namespaces, 1..32 (NSIDs 1..N)
#   NVMET_NS_MIB      size of each namespace in MiB
#   NVMET_BLOCK_SIZE  logical block size, 512 or 4096
#   NVMET_ALLOW_HOST  if set, the only host NQN allowed to connect;
#                     otherwise any host is allowed
#   NVMET_TRSVCID     TCP port in the guest (default 4420)
#   NVMET_HOST_PORT   the host port forwarded to it (only printed)
#   NVMET_RESIZABLE   1: loop devices that can be resized, and the commands on
#                     ttyS1
set -u

cfg=/sys/kernel/config
nqn=${NVMET_NQN:?}
count=${NVMET_NAMESPACES:?}
mib=${NVMET_NS_MIB:?}
bs=${NVMET_BLOCK_SIZE:?}
allow=${NVMET_ALLOW_HOST:-}
trsvcid=${NVMET_TRSVCID:-4420}
resizable=${NVMET_RESIZABLE:-0}

LAB=nvmet
# shellcheck source=tests/guest/lib.sh
. /usr/lib/vubd-lab/lib.sh

# --- network ---------------------------------------------------------------
ifname=''
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    for d in /sys/class/net/*; do
        n=${d##*/}
        [ "$n" = lo ] && continue
        ifname=$n
        break
    done
    [ -n "$ifname" ] && break
    sleep 0.5
done
[ -n "$ifname" ] || fatal "no network interface (is virtio-net attached?)"
ip link set "$ifname" up || fatal "ip link set $ifname up"
ip addr add 10.0.2.15/24 dev "$ifname" || fatal "ip addr add on $ifname"
ip route add default via 10.0.2.2 || fatal "ip route add default"
say "network: $ifname 10.0.2.15/24 via 10.0.2.2"

# --- RAM-backed block devices ----------------------------------------------
# dev N: the block device of the (N+1)-th namespace.
if [ "$resizable" = 1 ]; then
    [ "$bs" = 512 ] || fatal "resizable namespaces have 512-byte blocks only"
    modprobe loop max_loop="$count" || fatal "modprobe loop"
    mkdir -p /ns || fatal "mkdir /ns"
    dev() { echo "/dev/loop$1"; }
else
    modprobe null_blk nr_devices=0 || fatal "modprobe null_blk"
    [ -d $cfg/nullb ] || fatal "null_blk has no configfs directory"
    dev() { echo "/dev/nullb$1"; }
fi
i=0
while [ "$i" -lt "$count" ]; do
    if [ "$resizable" = 1 ]; then
        truncate -s "${mib}M" "/ns/ns$i.img" || fatal "truncate /ns/ns$i.img"
        wait_for 50 test -b "$(dev $i)" || fatal "$(dev $i) did not appear"
        losetup "$(dev $i)" "/ns/ns$i.img" || fatal "losetup $(dev $i)"
    else
        d=$cfg/nullb/nullb$i
        mkdir "$d" || fatal "mkdir $d"
        put 1 "$d/memory_backed"
        put "$bs" "$d/blocksize"
        put "$mib" "$d/size"
        put 1 "$d/power"
    fi
    i=$((i + 1))
done
# devtmpfs creates the nodes asynchronously.
i=0
while [ "$i" -lt "$count" ]; do
    b=$(dev $i)
    wait_for 50 test -b "$b" || fatal "$b did not appear"
    got=$(cat "/sys/block/${b#/dev/}/queue/logical_block_size")
    [ "$got" = "$bs" ] || fatal "${b#/dev/} has logical block size $got, not $bs"
    i=$((i + 1))
done
if [ "$resizable" = 1 ]; then
    say "$count loop device(s) of $mib MiB over files in RAM, $bs-byte blocks"
else
    say "$count null_blk device(s) of $mib MiB, $bs-byte blocks"
fi

# --- NVMe target -----------------------------------------------------------
modprobe nvmet || fatal "modprobe nvmet"
modprobe nvmet-tcp || fatal "modprobe nvmet-tcp"
t=$cfg/nvmet
[ -d $t/subsystems ] || fatal "nvmet has no configfs directory"
s=$t/subsystems/$nqn
mkdir "$s" || fatal "mkdir subsystem $nqn"
if [ -n "$allow" ]; then
    put 0 "$s/attr_allow_any_host"
    mkdir "$t/hosts/$allow" || fatal "mkdir host $allow"
    ln -s "$t/hosts/$allow" "$s/allowed_hosts/$allow" || fatal "allow host $allow"
else
    put 1 "$s/attr_allow_any_host"
fi
i=0
while [ "$i" -lt "$count" ]; do
    nsid=$((i + 1))
    mkdir "$s/namespaces/$nsid" || fatal "mkdir namespace $nsid"
    put "$(dev $i)" "$s/namespaces/$nsid/device_path"
    put 1 "$s/namespaces/$nsid/enable"
    i=$((i + 1))
done
p=$t/ports/1
mkdir "$p" || fatal "mkdir port"
put ipv4 "$p/addr_adrfam"
put tcp "$p/addr_trtype"
put 0.0.0.0 "$p/addr_traddr"
put "$trsvcid" "$p/addr_trsvcid"
# Linking enables the port: nvmet-tcp binds and listens here.
ln -s "$s" "$p/subsystems/$nqn" || fatal "link subsystem to port (listen on $trsvcid)"

# The listening socket shows in /proc/net/tcp (local port in hex, state 0A).
hexport=$(printf '%04X' "$trsvcid")
n=0
while ! grep -q ":$hexport 00000000:0000 0A" /proc/net/tcp && [ "$n" -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
grep -q ":$hexport 00000000:0000 0A" /proc/net/tcp || fatal "nothing listens on tcp port $trsvcid"

# --- the host's commands (resizable namespaces) -----------------------------
# resize_ns NSID MIB: see the header.
resize_ns() {
    case "$1$2" in *[!0-9]*|'') say "FAIL resize: bad arguments '$1' '$2'"; return ;; esac
    if [ "$1" -lt 1 ] || [ "$1" -gt "$count" ]; then
        say "FAIL resize: no namespace $1"
        return
    fi
    i=$(($1 - 1))
    if truncate -s "${2}M" "/ns/ns$i.img" && losetup -c "$(dev $i)" &&
        printf 1 >"$s/namespaces/$1/revalidate_size"; then
        echo "NVMET-RESIZED nsid=$1 mib=$2"
    else
        say "FAIL resize $1 to $2 MiB"
    fi
}
if [ "$resizable" = 1 ]; then
    [ -c /dev/ttyS1 ] || fatal "no second serial port (/dev/ttyS1) to hear the host on"
    stty -F /dev/ttyS1 raw -echo || fatal "cannot set /dev/ttyS1 to raw mode"
    (
        while read -r cmd a b; do
            case $cmd in
                resize) resize_ns "$a" "$b" ;;
                *) say "FAIL unknown command from the host: $cmd" ;;
            esac
        done </dev/ttyS1
    ) &
fi

echo "NVMET-READY port=$trsvcid host_port=${NVMET_HOST_PORT:-unknown} nqn=$nqn namespaces=$count ns_mib=$mib block_size=$bs allow=${allow:-any}"
# Serve until QEMU is stopped; the host bounds the guest's lifetime.
exec sleep 2147483647
