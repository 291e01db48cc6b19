#!/bin/sh
# A private libvirt daemon for tests/libvirt_lab.rs: Debian's libvirtd, privileged as on any
# Debian host (QEMU runs as libvirt-qemu), with its configuration, state, cache, log and
# runtime directories in DIR, so that it neither reads nor changes the host's libvirt.
#
# Usage: libvirtd.sh DIR
#
# A privileged libvirtd has its paths built in, so it runs in a mount namespace of its own in
# which DIR/etc, DIR/lib, DIR/cache, DIR/log and DIR/run are bound over /etc/libvirt,
# /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /run/libvirt (a tmpfs covers
# /run there, so that /run/libvirt can be made without touching the host's /run). It also
# runs in a PID namespace whose init is this script: libvirt daemonizes QEMU (and its
# capability probes), and learns that one has ended when its zombie is reaped; in a container
# whose PID 1 reaps late, every domain shutdown and probe waits for it. The script's `wait`
# reaps them at once.
#
# Clients connect to DIR/run/libvirt-sock:
#   virsh -c 'qemu:///system?socket=DIR/run/libvirt-sock' ...
# The daemon's log is DIR/log/libvirtd.log, QEMU's DIR/log/qemu/DOMAIN.log. libvirtd stops
# when the script's standard input ends (the test closes it, or the test is gone), and every
# process left in the namespace (a QEMU still running) goes with the script, its init.
set -eu

[ $# -eq 1 ] || { echo "usage: libvirtd.sh DIR" >&2; exit 2; }
dir=$(cd "$1" && pwd)

if [ "${VUBD_LIBVIRTD_NS:-}" != 1 ]; then
    command -v libvirtd >/dev/null || { echo "libvirtd.sh: no libvirtd (libvirt-daemon-system)" >&2; exit 1; }
    for d in etc lib cache log run; do
        mkdir -p "$dir/$d"
        chmod 0755 "$dir/$d"
    done
    # Only root, the test, connects: no polkit, no group.
    cat >"$dir/etc/libvirtd.conf" <<'EOF'
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
    # QEMU runs as Debian's default user and group (libvirt-qemu), under the DAC driver. A
    # container has neither systemd nor a cgroup hierarchy libvirt may write, nor virtlogd:
    # no cgroups for QEMU, and libvirtd writes QEMU's output itself. The host's AppArmor, if
    # its kernel has it, stays out of the test (docs/libvirt.md says what it needs).
    cat >"$dir/etc/qemu.conf" <<'EOF'
cgroup_controllers = [ ]
stdio_handler = "file"
security_driver = "none"
EOF
    # --kill-child: should unshare be killed, the namespace goes with it.
    VUBD_LIBVIRTD_NS=1 exec unshare --mount --propagation private --pid --fork --kill-child --mount-proc \
        -- sh "$0" "$dir"
fi

mount --bind "$dir/etc" /etc/libvirt
mount --bind "$dir/lib" /var/lib/libvirt
mount --bind "$dir/cache" /var/cache/libvirt
mount --bind "$dir/log" /var/log/libvirt
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/libvirt
mount --bind "$dir/run" /run/libvirt

libvirtd --pid-file /run/libvirt/libvirtd.pid &
daemon=$!
# An asynchronous command's standard input is /dev/null unless given: hand it the script's.
exec 3<&0
(cat <&3 >/dev/null; kill -TERM "$daemon") &
# `wait` reaps every child of this init, QEMU and the probes included, while it waits.
wait "$daemon"
