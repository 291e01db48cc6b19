#!/usr/bin/env bash
# Instructions per I/O: each backend serving a null device under callgrind, driven by the
# load generator for a fixed count of 4 KiB random reads; the result goes into the callgrind
# section of docs/benchmarks.md.
#
# Usage: benches/callgrind.sh      (about 5 minutes; installs valgrind and QEMU if missing)
#
# The backend runs under `valgrind --tool=callgrind --separate-threads=yes` (vubd with
# `--seccomp off`: valgrind cannot run a filtered program), pinned to
# BACKEND_CPU; callgrind writes one profile per thread. The count is the instructions (Ir) of
# the thread that does the I/O (vubd's `vubd-poller-0`, recognised by its loop function;
# qemu-storage-daemon's main thread) divided by the number of I/Os. vubd runs with
# `--poll always` (every empty poll while waiting for the client counts too) and
# `--poll never` (no empty polls, but a sleep and a wake-up per batch).
#
# With `--poll always`, the empty polls are counted and taken out: the spin-loop hint executes
# once per empty pass of the poller's loop, so its count (from the line-level profile) is the
# number of empty passes, and a run with an idle client (nothing but empty passes) gives what
# one costs.
#
# Environment: IOS (200000 per run), BACKEND_CPU (1), CLIENT_CPU (0), BENCH_DIR (target/bench),
# QUIET_WAIT and QUIET_BUDGET as for compare.sh, VUBD_ARGS (more arguments for every vubd run,
# e.g. `--metrics off`; the report names them).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

IOS=${IOS:-200000}
BACKEND_CPU=${BACKEND_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
work=${BENCH_DIR:-target/bench}
read -r -a vubd_args <<<"${VUBD_ARGS:-}"
NULL_BYTES=$((16 << 30))

need valgrind:valgrind callgrind_annotate:valgrind qemu-storage-daemon:qemu-system-common \
  taskset:util-linux python3:python3
(($(nproc) >= 2)) || die "needs two CPUs (one for the backend, one for the load generator)"
build_release
facts_now=$(machine_facts) # describes the build that is measured
grep -q '^debug = "line-tables-only"' Cargo.toml ||
  log "note: [profile.release] has no line tables; function names only"

mkdir -p "$work/callgrind"
cg=$(cd "$work/callgrind" && pwd)
work=$cg
rm -f "$cg"/cg.* "$cg"/*.sock "$cg"/*.log
results=$cg/results.tsv
printf 'backend\tmode\tqd\tios\tthread_ir\tprocess_ir\tspin_ir\twarm_ir\tprofile\n' >"$results"
trap stop_all_backends EXIT
START_TIMEOUT=60 # valgrind starts slowly

# Total Ir of one callgrind output file.
file_ir() { awk '/^(summary|totals):/{print $2; exit}' "$1"; }

# Ir of the spin-loop hint (`pause`, from core::hint::spin_loop) inlined into the poller loop.
spin_ir() {
  callgrind_annotate "$1" 2>/dev/null |
    awk '/x86\/sse2.rs:vubd::poller::worker::Worker::run/ {gsub(",", "", $1); n += $1} END {print n + 0}'
}

# Ir of the prefetches the poller makes in the first empty passes after a request (poller::warm,
# never inlined): waiting, like the empty polls, not serving.
warm_ir() {
  callgrind_annotate --inclusive=yes "$1" 2>/dev/null |
    awk '/vubd::poller::warm::Warm::warm_lines/ {gsub(",", "", $1); n += $1} END {print n + 0}'
}

# run_one NAME LABEL KIND MODE QD LOADGEN-ARGS -- CMD...: one backend instance under
# callgrind, one workload.
run_one() {
  local name=$1 label=$2 kind=$3 mode=$4 qd=$5
  shift 5
  local extra=()
  while [[ $1 != -- ]]; do
    extra+=("$1")
    shift
  done
  shift
  local sock=$cg/$name.sock out=$cg/cg.$name
  wait_quiet
  start_backend "$name" "$sock" taskset -c "$BACKEND_CPU" valgrind --tool=callgrind \
    --separate-threads=yes --callgrind-out-file="$out.%p" "$@"
  local pid=${PIDS[$name]}
  "$LOADGEN" --socket "$sock" --rw randread --bs 4k --qd "$qd" --mode "$mode" "${extra[@]}" \
    --connect-timeout 60 --cpu "$CLIENT_CPU" --backend-pid "$pid" \
    >"$cg/$name.loadgen.txt" 2>&1 || { cat "$cg/$name.loadgen.txt" >&2; die "$name: load generator failed"; }
  stop_backend "$name"
  local f thread="" total=0 ir
  for f in "$out.$pid"-*; do
    ir=$(file_ir "$f")
    total=$((total + ir))
    case $kind in
    vubd) grep -q 'poller::worker::Worker::run' "$f" && thread=$f ;;
    qsd) grep -q '^thread: 1$' "$f" && thread=$f ;;
    esac
  done
  [[ -n $thread ]] || die "$name: no profile of the I/O thread among $out.$pid-*"
  ir=$(file_ir "$thread")
  local spin=0 warm=0
  [[ $kind == vubd ]] && spin=$(spin_ir "$thread") && warm=$(warm_ir "$thread")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$mode" "$qd" "$IOS" "$ir" "$total" \
    "$spin" "$warm" "${thread##*/}" >>"$results"
  log "$name: $((ir / IOS)) Ir per I/O in the I/O thread, $((total / IOS)) in the process," \
    "$((spin / IOS)) empty polls per I/O"
}

IO=(--ios "$IOS" --secs 600)

# What one empty poll costs: an always-polling vubd whose client attached its queue with a
# burst of 1000 reads and then went idle for a few seconds.
name=vubd-always-idle
run_one "$name" "idle" vubd eventfd 1 --idle --secs 3 -- "$VUBD" --seccomp off \
  --socket-path "$cg/$name.sock" --disk null:16G --cpus "$BACKEND_CPU" --poll always \
  "${vubd_args[@]}"
for poll in always never; do
  for mode in eventfd poll; do
    for qd in 1 32; do
      name=vubd-$poll-$mode-$qd
      run_one "$name" "vubd --poll $poll" vubd "$mode" "$qd" "${IO[@]}" -- "$VUBD" --seccomp off \
        --socket-path "$cg/$name.sock" --disk null:16G --cpus "$BACKEND_CPU" --poll "$poll" \
        "${vubd_args[@]}"
    done
  done
done
for mode in eventfd poll; do
  for qd in 1 32; do
    name=qsd-$mode-$qd
    run_one "$name" "qsd null-co" qsd "$mode" "$qd" "${IO[@]}" -- qemu-storage-daemon \
      --blockdev "driver=null-co,node-name=n0,size=$NULL_BYTES,read-zeroes=off" \
      --export "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path=$cg/$name.sock,writable=on"
  done
done

# Where the poller's instructions go: its callees, inclusive (poll client, QD 32).
profile=$(awk -F'\t' '$1 == "vubd --poll always" && $2 == "poll" && $3 == 32 {print $9}' "$results")
callgrind_annotate --tree=calling --inclusive=yes "$cg/$profile" >"$cg/annotate.txt" 2>/dev/null ||
  die "callgrind_annotate failed"

facts=$cg/facts.txt
echo "$facts_now" >"$facts"
echo "backend_cpu=$BACKEND_CPU" >>"$facts"
echo "vubd_args=${vubd_args[*]}" >>"$facts"
python3 benches/report.py callgrind "$facts" "$results" docs/benchmarks.md
log "wrote docs/benchmarks.md"
