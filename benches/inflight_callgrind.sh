#!/usr/bin/env bash
# What inflight I/O tracking and dirty page logging add per I/O: vubd serving a null device
# under callgrind, driven by examples/vhost_frontend_load.rs for a fixed count of 4 KiB reads
# with INFLIGHT_SHMFD negotiated (vubd records every pop and completion in the region) or not,
# and, with tracking on, with a migration's dirty log on (LOG_SHMFD, SET_LOG_BASE, LOG_ALL:
# vubd marks the pages every read wrote) or not; the results go into the inflight and the
# dirty log sections of docs/benchmarks.md.
#
# Usage: benches/inflight_callgrind.sh      (10 to 15 minutes; installs valgrind if missing)
#        SETS=dirty_log benches/inflight_callgrind.sh   (only what the dirty log section needs)
#
# vubd runs on one pinned poller under `valgrind --tool=callgrind --separate-threads=yes`
# (with `--seccomp off`: valgrind cannot run a filtered program); the
# count is the instructions (Ir) of the poller thread divided by the number of I/Os. The client
# spins on the used ring and asks for no interrupts. Two poll modes:
# - `--poll always`, measured as benches/callgrind.sh measures: less the empty polls (the
#   spin-loop hint's line counts the empty passes, and a run whose client went idle after a
#   burst prices one) and the prefetches of the first empty passes after a request
#   (`poller::warm`). On a busy machine the client is often descheduled, empty polls become
#   most of the count, and the difference between two runs is only as good as their pricing:
#   a run with more than 2 % of empty polls is made again, up to 3 times.
# - `--poll never`: no empty polls; the poller sleeps when it finds no work and the client's
#   kick wakes it. How often it tries to sleep depends on the timing of the client, like the
#   empty polls, but each try costs far less than a pass of `--poll always` under valgrind.
# Where the added instructions are (`--poll never`): the poller's instructions by source file
# of the (inlined) code, on less off, and the lines of src/virtio_blk/inflight.rs (or of
# src/mem/dirty_log.rs and src/poller/dirty.rs) line by line.
#
# Environment: SETS (`inflight dirty_log`: the comparisons to run), IOS (200000 per run),
# BACKEND_CPU (1), CLIENT_CPU (0), BENCH_DIR (target/bench), QUIET_WAIT and QUIET_BUDGET as for
# compare.sh.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

SETS=${SETS:-inflight dirty_log}
IOS=${IOS:-200000}
BACKEND_CPU=${BACKEND_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
work=${BENCH_DIR:-target/bench}

need valgrind:valgrind callgrind_annotate:valgrind taskset:util-linux python3:python3
(($(nproc) >= 2)) || die "needs two CPUs (one for vubd, one for the client)"
build_release vhost_frontend_load
LOAD=$top/target/release/examples/vhost_frontend_load
facts_now=$(machine_facts)
grep -q '^debug = "line-tables-only"' Cargo.toml ||
  die "[profile.release] has no line tables: the per-line counts need them"

mkdir -p "$work/inflight_callgrind"
cg=$(cd "$work/inflight_callgrind" && pwd)
work=$cg
rm -f "$cg"/cg.* "$cg"/*.sock "$cg"/*.log "$cg"/*.txt "$cg"/*.tsv
results=$cg/results.tsv
printf 'run\tpoll\tinflight\tdirty_log\tqd\tios\tthread_ir\tprocess_ir\tspin_ir\twarm_ir\tinflight_ir\tprofile\n' \
  >"$results"
trap stop_all_backends EXIT
START_TIMEOUT=60 # valgrind starts slowly

# Total Ir of one callgrind output file.
file_ir() { awk '/^(summary|totals):/{print $2; exit}' "$1"; }

# Ir of the spin-loop hint (`pause`, from core::hint::spin_loop) inlined into the poller loop.
spin_ir() {
  callgrind_annotate --threshold=100 "$1" 2>/dev/null |
    awk '/x86\/sse2.rs:vubd::poller::worker::Worker::run/ {gsub(",", "", $1); n += $1} END {print n + 0}'
}

# Ir of the prefetches of the poller's first empty passes after a request (poller::warm).
warm_ir() {
  callgrind_annotate --inclusive=yes --threshold=100 "$1" 2>/dev/null |
    awk '/vubd::poller::warm::Warm::warm_lines/ {gsub(",", "", $1); n += $1} END {print n + 0}'
}

# Ir of the source lines of src/virtio_blk/inflight.rs, whichever function they were inlined
# into (the region's stores and loads, and recover when a queue starts).
inflight_ir() {
  callgrind_annotate --threshold=100 "$1" 2>/dev/null |
    awk '/virtio_blk\/inflight\.rs:/ {gsub(",", "", $1); n += $1} END {print n + 0}'
}

# run_one NAME POLL INFLIGHT DIRTY-LOG QD CLIENT-ARGS...: vubd under callgrind, one client run.
run_one() {
  local name=$1 poll=$2 inflight=$3 dirty_log=$4 qd=$5
  shift 5
  local sock=$cg/$name.sock out=$cg/cg.$name
  wait_quiet
  start_backend "$name" "$sock" taskset -c "$BACKEND_CPU" valgrind --tool=callgrind \
    --separate-threads=yes --callgrind-out-file="$out.%p" "$VUBD" \
    --seccomp off --socket-path "$sock" --disk null:16G --cpus "$BACKEND_CPU" --poll "$poll"
  local pid=${PIDS[$name]}
  "$LOAD" --socket "$sock" --qd "$qd" --inflight "$inflight" --dirty-log "$dirty_log" --cpu "$CLIENT_CPU" \
    --connect-timeout 60 "$@" >"$cg/$name.client.txt" 2>&1 ||
    { cat "$cg/$name.client.txt" >&2; die "$name: client failed"; }
  stop_backend "$name"
  local f thread="" total=0 ir
  for f in "$out.$pid"-*; do
    ir=$(file_ir "$f")
    total=$((total + ir))
    grep -q 'poller::worker::Worker::run' "$f" && thread=$f
  done
  [[ -n $thread ]] || die "$name: no profile of the poller among $out.$pid-*"
  ir=$(file_ir "$thread")
  # The poller's instructions by file:function, exclusive (the report subtracts off from on).
  callgrind_annotate --threshold=100 --auto=no "$thread" >"$cg/$name.functions.txt" 2>/dev/null ||
    die "$name: callgrind_annotate failed"
  local ios
  ios=$(sed -n 's/.*reads=\([0-9]*\).*/\1/p' "$cg/$name.client.txt")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$poll" "$inflight" "$dirty_log" \
    "$qd" "$ios" "$ir" \
    "$total" "$(spin_ir "$thread")" "$(warm_ir "$thread")" "$(inflight_ir "$thread")" \
    "${thread##*/}" >>"$results"
  log "$name: $((ir / ios)) Ir per I/O in the poller ($(cat "$cg/$name.client.txt"))"
}

# What one empty poll costs: a client that read a burst of 1000 and went idle for 3 s.
run_one idle always off off 1 --idle 3
per_spin=$(awk -F'\t' '$1 == "idle" && $9 > 0 {print $7 / $9}' "$results")

# The share (%) of the last run's poller count that went to empty polls.
empty_share() {
  awk -F'\t' -v per="${per_spin:-0}" 'END {printf "%.1f", ($9 * per + $10) / $7 * 100}' "$results"
}

# The configurations (inflight tracking:dirty log): tracking off and on, log off; with the
# log on, compared with tracking on and the log off.
configs=(on:off)
[[ " $SETS " == *" inflight "* ]] && configs=(off:off "${configs[@]}")
[[ " $SETS " == *" dirty_log "* ]] && configs+=(on:on)
for poll in always never; do
  for qd in 1 32; do
    for config in "${configs[@]}"; do
      inflight=${config%:*} dirty_log=${config#*:}
      tag=$poll-$inflight
      [[ $dirty_log == off ]] || tag+=-log
      # With --poll always, up to 3 runs while empty polls are more than 2 % of the count (a
      # busy machine descheduled the client); the report keeps the run with the fewest.
      for attempt in 1 2 3; do
        run_one "$tag-$qd-$attempt" "$poll" "$inflight" "$dirty_log" "$qd" --ios "$IOS"
        [[ $poll == always ]] || break
        share=$(empty_share)
        awk -v s="$share" 'BEGIN { exit !(s <= 2) }' && break
        log "$tag-$qd: $share % of the count were empty polls"
      done
    done
  done
done

# The poller's profiles annotated line by line (`--poll never`, QD 1): tracking on for the lines
# of inflight.rs, the log on for those of dirty_log.rs and poller/dirty.rs.
annotate() {
  local profile
  profile=$(awk -F'\t' -v run="$1" '$1 == run {print $12}' "$results")
  [[ -n $profile ]] || return 0
  callgrind_annotate "$cg/$profile" >"$cg/$2" 2>/dev/null || die "callgrind_annotate failed"
}
annotate never-on-1-1 annotate.txt
annotate never-on-log-1-1 annotate_log.txt
# The inclusive counts of the poller's calls into the log (`--poll never`, log on).
for qd in 1 32; do
  profile=$(awk -F'\t' -v run="never-on-log-$qd-1" '$1 == run {print $12}' "$results")
  [[ -z $profile ]] || callgrind_annotate --inclusive=yes --threshold=100 "$cg/$profile" >"$cg/inclusive_log_$qd.txt" \
    2>/dev/null || die "callgrind_annotate failed"
done

facts=$cg/facts.txt
echo "$facts_now" >"$facts"
echo "backend_cpu=$BACKEND_CPU" >>"$facts"
python3 benches/report.py inflight "$facts" "$results" docs/benchmarks.md
log "wrote docs/benchmarks.md"
