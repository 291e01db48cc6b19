#!/usr/bin/env bash
# Instructions per 4 KiB I/O of the NVMe PCIe driver's submit and completion paths, on a real
# (emulated) controller: the lab guest (TCG, QEMU's NVMe behind an emulated VT-d, the
# controller bound to vfio-pci) runs `examples/pcie_check.rs --bench N` under callgrind, at QD
# 32 and QD 1; the result goes into the pcie_callgrind section of docs/benchmarks.md, with the
# hardware-independent core (`examples/pcie_cost.rs`, on the host) for comparison.
#
# Usage: benches/pcie_callgrind.sh      (a few minutes; installs valgrind and QEMU if missing)
#
# pcie_check calls the driver through `bench_submit` (PcieIoQueue::submit, PRP build included),
# `bench_doorbell` (PcieIoQueue::ring_doorbell, once per batch) and `bench_poll`
# (PcieIoQueue::poll, CID lookup and CQ doorbell included), never inlined; callgrind collects
# only inside them (--toggle-collect), so the profile is the driver and nothing else. Polls
# that find nothing while the emulated controller works are counted by pcie_check and priced
# by a third run that only polls the empty queue; they are taken out of the poll column.
#
# One guest boot; the profiles come back through a second, kernel-driven NVMe controller whose
# image the guest writes a tar file to.
#
# Environment: IOS (3200 per queue depth), IDLE_POLLS (2000), BENCH_DIR (target/bench),
# GUEST_TIMEOUT (900 s).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

IOS=${IOS:-3200}
IDLE_POLLS=${IDLE_POLLS:-2000}
GUEST_TIMEOUT=${GUEST_TIMEOUT:-900}
CORE_IOS=${CORE_IOS:-1000000}
work=${BENCH_DIR:-target/bench}
PCIE_SERIAL=vubd-bench-1
OUT_SERIAL=vubd-bench-0
VG_LIB=/usr/libexec/valgrind
# The launcher itself (Debian's /usr/bin/valgrind is a shell wrapper around it).
VG_BIN=/usr/bin/valgrind.bin

need valgrind:valgrind callgrind_annotate:valgrind qemu-system-x86_64:qemu-system-x86 \
  python3:python3
[[ -x $VG_LIB/callgrind-amd64-linux && -x $VG_BIN ]] || die "no $VG_LIB/callgrind-amd64-linux or $VG_BIN"
build_release pcie_check pcie_cost
facts_now=$(machine_facts)

mkdir -p "$work/pcie_callgrind"
d=$(cd "$work/pcie_callgrind" && pwd)
rm -rf "${d:?}"/*
mkdir -p "$d/vglib" "$d/out"

# The valgrind pieces the guest needs: the launcher (with its libraries, via --bin), callgrind,
# the preloaded core library and the default suppressions.
cp "$VG_LIB/callgrind-amd64-linux" "$VG_LIB/vgpreload_core-amd64-linux.so" \
  "$VG_LIB/default.supp" "$d/vglib/"

cat >"$d/guest.sh" <<'EOF'
#!/bin/sh
# Guest side of benches/pcie_callgrind.sh (busybox sh).
set -u
LAB=pcie-callgrind
. /usr/lib/vubd-lab/lib.sh
take_controller "$PCIE_SERIAL"
wait_serial "$OUT_SERIAL"
out=/dev/$(basename "$(ctrl_of "$OUT_SERIAL")")n1
wait_for 100 test -b "$out" || fatal "no $out"
mkdir -p /tmp/cg
vg() {
    name=$1
    shift
    start=$(uptime_s)
    valgrind --tool=callgrind --callgrind-out-file="/tmp/cg/cg.$name" \
        --toggle-collect='*bench_submit*' --toggle-collect='*bench_doorbell*' \
        --toggle-collect='*bench_poll*' --toggle-collect='*bench_idle_poll*' \
        pcie_check "$bdf" "$@" >"/tmp/cg/$name.out" 2>"/tmp/cg/$name.err"
    rc=$?
    cat "/tmp/cg/$name.out"
    say "$name: status $rc, $start..$(uptime_s) s of uptime"
    [ "$rc" -eq 0 ] || { tail -n 20 "/tmp/cg/$name.err"; fatal "pcie_check $*"; }
}
vg qd32 --bench "$BENCH_IOS" --qd 32 --idle-polls 0
vg qd1 --bench "$BENCH_IOS" --qd 1 --idle-polls 0
vg idle --bench 32 --qd 32 --idle-polls "$IDLE_POLLS"
(cd /tmp && tar cf "$out" cg) || fatal "tar to $out"
sync
say "profiles written to $out"
EOF

log "building the initramfs"
qemu/build-initramfs.sh --output "$d/initrd.cpio.gz" --script "$d/guest.sh" \
  --bin "$top/target/release/examples/pcie_check:/usr/bin/pcie_check" --keep-debug \
  --bin "$VG_BIN:/usr/bin/valgrind" --add "$d/vglib:$VG_LIB" \
  --add "$top/tests/guest/bind-vfio.sh:/usr/bin/bind-vfio.sh" \
  --add "$top/tests/guest/lib.sh:/usr/lib/vubd-lab/lib.sh" >"$d/build.log" 2>&1 ||
  { tail -n 20 "$d/build.log" >&2; die "build-initramfs.sh failed"; }

truncate -s 64M "$d/ns.img"
truncate -s 64M "$d/out.img"
log "booting the lab guest (IOS=$IOS per queue depth)"
rc=0
timeout $((GUEST_TIMEOUT + 60)) qemu/run-guest.sh --initrd "$d/initrd.cpio.gz" --smp 2 --iommu \
  --nvme "$d/out.img,serial=$OUT_SERIAL" --nvme "$d/ns.img,serial=$PCIE_SERIAL" \
  --append "PCIE_SERIAL=$PCIE_SERIAL OUT_SERIAL=$OUT_SERIAL BENCH_IOS=$IOS IDLE_POLLS=$IDLE_POLLS" \
  --timeout "$GUEST_TIMEOUT" --no-echo --log "$d/console.log" >"$d/run-guest.log" 2>&1 || rc=$?
grep -E '^(PCIE-BENCH|pcie-callgrind:)' "$d/console.log" | tr -d '\r' >&2 || true
((rc == 0)) || { tail -n 30 "$d/console.log" >&2; die "the guest did not pass (status $rc)"; }
tar xf "$d/out.img" -C "$d/out" || die "no profiles in the output image"

# The hardware-independent core, natively under callgrind on the host.
for b in 32 1; do
  valgrind --tool=callgrind --callgrind-out-file="$d/core.$b" \
    "$top/target/release/examples/pcie_cost" "$CORE_IOS" "$b" >"$d/core.$b.log" 2>&1 ||
    { cat "$d/core.$b.log" >&2; die "pcie_cost failed"; }
done

# inclusive FILE FUNCTION: inclusive Ir of FUNCTION (the largest of its file:function entries,
# the one of the file that defines it; the others are code inlined into it).
inclusive() {
  callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$1" 2>/dev/null |
    awk -v f="$2" '$2 ~ /%\)$/ || $3 ~ /%\)$/ {
      line = $0; sub(/^ *[0-9,]+ *\( *[0-9.]+%\) +/, "", line); sub(/ \[.*$/, "", line)
      sub(/^[^:]*:/, "", line)
      if (line == f) { v = $1; gsub(",", "", v); if (v + 0 > max) max = v + 0 }
    } END { print max + 0 }'
}
# field FILE KEY: KEY=VALUE from the PCIE-BENCH line of the run's output.
field() { tr ' ' '\n' <"$1" | sed -n "s/^$2=//p"; }

results=$d/results.tsv
printf 'qd\tios\tbatches\tpolls\tempty_polls\tsubmit_ir\tdoorbell_ir\tpoll_ir\n' >"$results"
for qd in 32 1; do
  f=$d/out/cg/cg.qd$qd o=$d/out/cg/qd$qd.out
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$qd" "$(field "$o" ios)" "$(field "$o" batches)" \
    "$(field "$o" polls)" "$(field "$o" empty_polls)" "$(inclusive "$f" pcie_check::bench_submit)" \
    "$(inclusive "$f" pcie_check::bench_doorbell)" "$(inclusive "$f" pcie_check::bench_poll)" >>"$results"
done
idle_ir=$(inclusive "$d/out/cg/cg.idle" pcie_check::bench_idle_poll)
for b in 32 1; do
  printf 'core\t%s\t%s\t%s\t%s\n' "$b" "$CORE_IOS" "$(inclusive "$d/core.$b" pcie_cost::submit_batch)" \
    "$(inclusive "$d/core.$b" pcie_cost::complete_batch)" >>"$d/core.tsv"
done
# What dominates: each function's own Ir in the QD 32 profile (everything in it is the driver).
for qd in 32 1; do
  callgrind_annotate --threshold=100 --auto=no "$d/out/cg/cg.qd$qd" 2>/dev/null \
    >"$d/annotate.qd$qd.txt"
done

{
  echo "$facts_now"
  echo "qemu=$(qemu-system-x86_64 --version | head -1)"
  echo "guest_kernel=$(sed -n 's/^KERNEL_VERSION=//p' "${VUBD_LAB_CACHE:-$top/target/lab}/kernel.env")"
  echo "idle_polls=$IDLE_POLLS"
  echo "idle_ir=$idle_ir"
} >"$d/facts.txt"
python3 benches/pcie_callgrind_report.py "$d" docs/benchmarks.md "$top"
log "wrote docs/benchmarks.md"
