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
# Environment (from the kernel command line):
#   NVMET_NQN         subsystem NQN
#   NVMET_NAMESPACES  number of namespaces, 1..32 (NSIDs 1..N)
#   NVMET_NS_MIB      size of each namespace in MiB
#   NVMET_BLOCK_SIZE  logical block size, 512 or 4096
#   NVMET_ALLOW_HOST  if set, the only host NQN allowed to connect;
#                     otherwise any host is allowed
#   NVMET_TRSVCID     TCP port in the guest (default 4420)
#   NVMET_HOST_PORT   the host port forwarded to it (only printed)
set -u

cfg=/sys/kernel/config
nqn=${NVMET_NQN:?}
count=${NVMET_NAMESPACES:?}
mib=${NVMET_NS_MIB:?}
bs=${NVMET_BLOCK_SIZE:?}
allow=${NVMET_ALLOW_HOST:-}
trsvcid=${NVMET_TRSVCID:-4420}

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
modprobe null_blk nr_devices=0 || fatal "modprobe null_blk"
[ -d $cfg/nullb ] || fatal "null_blk has no configfs directory"
i=0
while [ "$i" -lt "$count" ]; do
    d=$cfg/nullb/nullb$i
    mkdir "$d" || fatal "mkdir $d"
    put 1 "$d/memory_backed"
    put "$bs" "$d/blocksize"
    put "$mib" "$d/size"
    put 1 "$d/power"
    i=$((i + 1))
done
# devtmpfs creates the nodes asynchronously.
i=0
while [ "$i" -lt "$count" ]; do
    n=0
    while [ ! -b /dev/nullb$i ] && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    [ -b /dev/nullb$i ] || fatal "/dev/nullb$i did not appear"
    got=$(cat /sys/block/nullb$i/queue/logical_block_size)
    [ "$got" = "$bs" ] || fatal "nullb$i has logical block size $got, not $bs"
    i=$((i + 1))
done
say "$count null_blk device(s) of $mib MiB, $bs-byte blocks"

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
    put /dev/nullb$i "$s/namespaces/$nsid/device_path"
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

echo "NVMET-READY port=$trsvcid host_port=${NVMET_HOST_PORT:-unknown} nqn=$nqn namespaces=$count ns_mib=$mib block_size=$bs allow=${allow:-any}"
# Serve until QEMU is stopped; the host bounds the guest's lifetime.
exec sleep 2147483647
