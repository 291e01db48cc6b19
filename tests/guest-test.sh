#!/usr/bin/env bash
# QEMU guest test of the vhost-user-blk back end: a Linux guest (Debian
# kernel, busybox initramfs, TCG) writes a known pattern to the disk and
# reads it back; the host then checks the image file.
#
# Usage: tests/guest-test.sh VUBD_BINARY
#        VUBD_GUEST_BACKEND=qsd tests/guest-test.sh
#
# For each case (default "1 auto") it:
#   1. creates a sparse raw image in a temporary directory;
#   2. starts the back end on a unix socket and waits for the socket:
#        vubd: VUBD_BINARY --socket-path SOCK --disk IMG --num-queues 2, or
#              in the auto case with no --num-queues (its default offer)
#        qsd:  qemu-storage-daemon exporting IMG as vhost-user-blk, the
#              reference back end, to check the test itself (num-queues=2,
#              or as many as the auto case's guest has CPUs: qsd offers 1
#              unless told);
#   3. boots the guest (qemu/run-guest.sh) with the disk attached, running
#      tests/guest/blk-data.sh, which must report GUEST-RESULT: PASS; a
#      numeric case N gives the device num-queues=N and the guest
#      VUBD_GUEST_SMP CPUs, the auto case gives it no num-queues (QEMU then
#      asks for one queue per vCPU) and the guest VUBD_GUEST_AUTO_SMP CPUs,
#      whose queues must all carry I/O;
#   4. stops the back end with SIGTERM, expects exit status 0 within 10 s
#      and the socket file gone;
#   5. checks with cmp that the image holds the pattern at the right offsets
#      and zeros everywhere else.
# It prints one line per case and "guest-test: N passed, N failed".
#
# Environment:
#   VUBD_GUEST_BACKEND   vubd (default) or qsd
#   VUBD_GUEST_QUEUES    cases: num-queues values, or auto (default "1 auto")
#   VUBD_GUEST_SMP       guest CPUs of the numeric cases (default 2)
#   VUBD_GUEST_AUTO_SMP  guest CPUs of the auto case (default 4)
#   VUBD_GUEST_TIMEOUT   seconds allowed per guest boot (default 120)
#   VUBD_GUEST_VERBOSE   1: show the guest console while it runs
#   VUBD_GUEST_KEEP      1: keep the temporary directory (logs, images)
#   VUBD_LAB_CACHE       kernel cache (default target/lab in the repository)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lab=$(cd "$here/../qemu" && pwd)
LAB_PROG=guest-test
# shellcheck source=qemu/lib.sh
source "$lab/lib.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && { usage; exit 0; }

backend=${VUBD_GUEST_BACKEND:-vubd}
queues=${VUBD_GUEST_QUEUES:-1 auto}
smp=${VUBD_GUEST_SMP:-2}
auto_smp=${VUBD_GUEST_AUTO_SMP:-4}
guest_timeout=${VUBD_GUEST_TIMEOUT:-120}
case $backend in
    vubd)
        [[ $# -eq 1 ]] || { usage >&2; exit 2; }
        vubd=$1
        [[ $vubd == */* ]] || vubd=$(command -v "$vubd" || true)
        [[ -n $vubd && -x $vubd ]] || die "VUBD_BINARY '$1' is not an executable file"
        vubd=$(cd "$(dirname "$vubd")" && pwd)/$(basename "$vubd")
        ;;
    qsd)
        [[ $# -le 1 ]] || { usage >&2; exit 2; }
        lab_need_cmd qemu-storage-daemon qemu-system-common
        ;;
    *) die "VUBD_GUEST_BACKEND must be vubd or qsd, not '$backend'" ;;
esac
lab_need_cmd cmp diffutils
lab_need_cmd truncate coreutils

mib=$((1024 * 1024))
disk_bytes=$((64 * mib))
pattern_bytes=$((8 * mib))
pattern_offset=$((1 * mib))
tail_bytes=$((512 * 1024))

work=$(mktemp -d "${TMPDIR:-/tmp}/vubd-guest.XXXXXX")
[[ $work != *,* ]] || die "temporary directory '$work' contains a comma, which QEMU options cannot take"
backend_pid='' guest_pid=''
cleanup() {
    if [[ -n $guest_pid ]]; then
        kill -TERM "$guest_pid" 2>/dev/null || true
        wait "$guest_pid" 2>/dev/null || true
    fi
    if [[ -n $backend_pid ]] && kill -0 "$backend_pid" 2>/dev/null; then
        kill -KILL -- "-$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
    fi
    if [[ ${VUBD_GUEST_KEEP:-0} == 1 ]]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

t_start=$SECONDS

# --- kernel, pattern, initramfs (shared by all cases) ------------------------
lab_load_kernel

# Every 512-byte sector is distinct: a header naming the sector, then text
# from a fixed pseudo-random pool, so misplaced sectors cannot go unseen.
pattern=$work/pattern.bin
awk -v sectors=$((pattern_bytes / 512)) 'BEGIN {
    seed = 20240601; pool = ""
    for (i = 0; i < 4096; i++) {
        seed = (seed * 69069 + 1) % 4294967296
        pool = pool sprintf("%c", 33 + int(seed / 65536) % 94)
    }
    for (s = 0; s < sectors; s++) {
        hdr = sprintf("vubd guest-test sector %08d\n", s)
        printf "%s%s\n", hdr, substr(pool, (s * 131) % 3500 + 1, 511 - length(hdr))
    }
}' >"$pattern"
[[ $(stat -c %s "$pattern") -eq $pattern_bytes ]] || die "pattern generator wrote the wrong size"

initrd=$work/initramfs.cpio.gz
"$lab/build-initramfs.sh" --modules-dir "$MODULES_DIR" --output "$initrd" \
    --script "$here/guest/blk-data.sh" --add "$here/guest/lib.sh:/usr/lib/vubd-lab/lib.sh" \
    --add "$pattern:/pattern.bin" 2>"$work/initramfs.log" ||
    { cat "$work/initramfs.log" >&2; die "building the initramfs failed"; }
log "kernel $(basename "$VMLINUZ"), initramfs ready in $((SECONDS - t_start)) s"

# --- one case ------------------------------------------------------------------
start_backend() { # DIR SOCK IMG CASE
    local log=$1/backend.log
    local vubd_queues=(--num-queues 2) qsd_queues=2
    if [[ $4 == auto ]]; then
        vubd_queues=()
        qsd_queues=$auto_smp
    fi
    case $backend in
        vubd)
            setsid "$vubd" --socket-path "$2" --disk "$3" "${vubd_queues[@]}" >"$log" 2>&1 &
            ;;
        qsd)
            setsid qemu-storage-daemon \
                --blockdev "driver=file,filename=$3,node-name=d0,cache.direct=on" \
                --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$2,writable=on,num-queues=$qsd_queues" \
                >"$log" 2>&1 &
            ;;
    esac
    # setsid: the back end leads its own process group, which the cleanup
    # can kill whole; SIGTERM for the shutdown check goes to it alone.
    backend_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -S $2 ]] && return 0
        kill -0 "$backend_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$backend_pid" 2>/dev/null; then
        kill -KILL -- "-$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
        echo "back end did not create $2 within 10 s"
    else
        local st=0
        wait "$backend_pid" || st=$?
        echo "back end exited with status $st before creating its socket"
    fi
    backend_pid=''
    return 1
}

# stop_backend SOCK: SIGTERM, then expects exit status 0 within 10 s.
stop_backend() {
    local st=0 i
    if ! kill -0 "$backend_pid" 2>/dev/null; then
        wait "$backend_pid" || st=$?
        backend_pid=''
        echo "back end exited on its own (status $st) before SIGTERM"
        return 1
    fi
    kill -TERM "$backend_pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$backend_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$backend_pid" 2>/dev/null; then
        kill -KILL -- "-$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
        backend_pid=''
        echo "back end still running 10 s after SIGTERM"
        return 1
    fi
    wait "$backend_pid" || st=$?
    backend_pid=''
    if [[ $st -ne 0 ]]; then
        echo "back end exited with status $st after SIGTERM, expected 0"
        return 1
    fi
    if [[ -e $1 ]]; then
        echo "back end left its socket file $1 behind"
        return 1
    fi
}

# same_bytes WHAT FILE IMG OFFSET LENGTH: IMG holds the first LENGTH bytes
# of FILE at OFFSET.
same_bytes() {
    local out
    out=$(cmp -n "$5" -i "0:$4" "$2" "$3" 2>&1) && return 0
    if [[ $out =~ differ:\ (char|byte)\ ([0-9]+) ]]; then
        echo "image: $1 differs, first at image byte $(($4 + BASH_REMATCH[2] - 1))"
    else
        echo "image: $1: $out"
    fi
    return 1
}

# check_image IMG: the pattern at both regions, zeros everywhere else.
check_image() {
    local img=$1 tail_off=$((disk_bytes - tail_bytes)) a_end=$((pattern_offset + pattern_bytes))
    local size
    size=$(stat -c %s "$img")
    [[ $size -eq $disk_bytes ]] || { echo "image is $size bytes, expected $disk_bytes"; return 1; }
    same_bytes "zeros before region A" /dev/zero "$img" 0 "$pattern_offset" &&
        same_bytes "region A (pattern)" "$pattern" "$img" "$pattern_offset" "$pattern_bytes" &&
        same_bytes "zeros between regions A and B" /dev/zero "$img" "$a_end" $((tail_off - a_end)) &&
        same_bytes "region B (pattern at the end)" "$pattern" "$img" "$tail_off" "$tail_bytes"
}

passed=0 failed=0

# start_backend must run in this shell (it sets backend_pid), so its message
# goes through a file rather than $(...).
run_case() {
    local nq=$1 dir=$work/nq$1 t0=$SECONDS rc=0 why=''
    mkdir -p "$dir"
    local sock=$dir/vubd.sock img=$dir/disk.img msg=$dir/why
    truncate -s "$disk_bytes" "$img"
    # The disk: run-guest.sh's --vhost-user-blk always names num-queues, so
    # the auto case attaches its own device, without it.
    local cpus=$smp expect=$nq disk=(--vhost-user-blk "$sock,num-queues=$nq")
    if [[ $nq == auto ]]; then
        cpus=$auto_smp expect=$auto_smp
        disk=(--qemu-arg -chardev --qemu-arg "socket,id=auto0,path=$sock"
            --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=auto0")
    fi

    if ! start_backend "$dir" "$sock" "$img" "$nq" >"$msg"; then
        why=$(<"$msg")
    else
        local echo_opt=(--no-echo)
        [[ ${VUBD_GUEST_VERBOSE:-0} == 1 ]] && echo_opt=()
        "$lab/run-guest.sh" --kernel "$VMLINUZ" --initrd "$initrd" --smp "$cpus" \
            "${disk[@]}" --timeout "$guest_timeout" \
            --log "$dir/console.log" "${echo_opt[@]}" \
            --append "DISK_BYTES=$disk_bytes EXPECT_QUEUES=$expect PATTERN_OFFSET=$pattern_offset TAIL_BYTES=$tail_bytes" \
            </dev/null 2>"$dir/run-guest.log" &
        # In the background so that a signal to this script is handled at
        # once (the EXIT trap stops the guest and the back end).
        guest_pid=$!
        wait "$guest_pid" || rc=$?
        guest_pid=''
        case $rc in
            0) ;;
            1) why="guest reported failure" ;;
            *) why="guest gave no result: $(sed -n 's/^run-guest.sh: //p' "$dir/run-guest.log" | head -n 1)" ;;
        esac
        if ! stop_backend "$sock" >"$msg"; then
            why+="${why:+; }$(<"$msg")"
        fi
        if [[ -z $why ]] && ! check_image "$img" >"$msg" 2>&1; then
            why=$(<"$msg")
        fi
    fi

    local label="num-queues=$nq backend=$backend smp=$cpus"
    if [[ -z $why ]]; then
        passed=$((passed + 1))
        echo "guest-test: PASS $label ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1))
        echo "guest-test: FAIL $label ($((SECONDS - t0)) s): $why"
        for f in console.log run-guest.log backend.log; do
            [[ -s $dir/$f ]] || continue
            echo "---- $f (last 60 lines) ----"
            # Drop carriage returns and the firmware's terminal escapes.
            tr -d '\r' <"$dir/$f" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g' | tail -n 60
        done
        echo "----"
    fi
}

for nq in $queues; do
    [[ $nq =~ ^[1-9][0-9]*$ || $nq == auto ]] ||
        die "VUBD_GUEST_QUEUES: '$nq' is neither a queue count nor auto"
    run_case "$nq"
done

echo "guest-test: total $((SECONDS - t_start)) s"
echo "guest-test: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
