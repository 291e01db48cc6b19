#!/usr/bin/env bash
# vubd's NVMe/TCP initiator on loopback: vubd serving the null namespace of the fake NVMe/TCP
# target (examples/fake_target.rs) on 127.0.0.1, driven by the load generator; IOPS, latency
# and the initiator's CPU time per I/O, written into docs/benchmarks.md.
#
# Usage: benches/nvme_tcp.sh       (about 12 minutes; installs valgrind, or strace, if missing)
#
# Three parties share two CPUs: the load generator (a libblkio client), vubd (its poller thread
# `vubd-poller-0` does the initiator's work: virtio ring, NVMe/TCP PDUs, sendmsg and readv on
# its own connection) and the fake target (one thread per connection, blocking reads). vubd's
# poller is always alone among vubd's threads on POLLER_CPU; two placements of the others:
#
#   shared  the target on POLLER_CPU with vubd, the client alone on OTHER_CPU
#   split   the target and the client on OTHER_CPU, vubd's poller alone on POLLER_CPU
#
# Workloads: 4 KiB random reads at QD 1 and 32, random writes at QD 32 (in-capsule data), with
# a poll-mode and an eventfd-mode client, against vubd --poll adaptive (the default) and
# --poll always; each run SECS seconds after WARMUP, in ROUNDS interleaved rounds (the poll
# modes alternating first), medians reported. The initiator's CPU per I/O is the CPU time
# (utime + stime from /proc/PID/task/TID/stat) of the thread named vubd-poller-0 over the I/Os
# the client completed; the rest of vubd (the supervisor's keep-alive, the vhost-user thread)
# is reported as the process total. The target's CPU time is measured over the same interval
# (loadgen --watch-pid) and does not count as other work on the machine.
#
# Then, unless PROFILE=0, where the poller's time goes (vubd --poll adaptive): its syscalls
# per I/O while the client sends IOS requests (each workload, shared placement with the poll
# client and split with the eventfd client), counted natively with perf's syscall tracepoints
# on the poller thread (or with `strace -c -f` where perf cannot); and its user-space
# instructions per I/O under `valgrind --tool=callgrind` for CG_IOS reads at QD 1 and 32
# (shared placement, poll client), with the functions they go to.
#
# The machine may be shared: as in compare.sh, each run waits for other processes to go quiet
# (bounded), a disturbed run is repeated once (at most RETRIES times in all), and the report
# says how much other work shared the machine.
#
# Environment: ROUNDS (3), SECS (4), WARMUP (1), POLLER_CPU (1), OTHER_CPU (0), PROFILE (1),
# IOS (200000), CG_IOS (100000), BENCH_DIR (target/bench; this script uses its nvme_tcp/),
# QUIET_WAIT (30), QUIET_BUDGET (120), RETRIES (12).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-4}
WARMUP=${WARMUP:-1}
POLLER_CPU=${POLLER_CPU:-1}
OTHER_CPU=${OTHER_CPU:-0}
IOS=${IOS:-200000}
CG_IOS=${CG_IOS:-100000}
PROFILE=${PROFILE:-1}
work=${BENCH_DIR:-target/bench}/nvme_tcp
NQN=nqn.2014-08.org.vubd:bench
NS_SIZE=16G
BLOCK_SIZE=4096
POLLER=vubd-poller-0

need taskset:util-linux python3:python3
((PROFILE == 0)) || need valgrind:valgrind callgrind_annotate:valgrind
(($(nproc) >= 2)) || die "needs two CPUs"
[[ $POLLER_CPU != "$OTHER_CPU" ]] || die "POLLER_CPU and OTHER_CPU must differ"
build_release fake_target
FAKE_TARGET=$top/target/release/examples/fake_target
facts_now=$(machine_facts) # describes the build that is measured

mkdir -p "$work"
work=$(cd "$work" && pwd)
rm -f "$work"/*.sock "$work"/*.log "$work"/cg.* "$work"/run-*
results=$work/results.jsonl
profile=$work/profile.tsv
: >"$results"
printf 'kind\tqd\tios\tname\tcalls\terrors\n' >"$profile"
trap stop_all_backends EXIT

# --- the targets and the backends -----------------------------------------------------------
placements=(shared split)
polls=(adaptive always)
declare -A TPORT=()
target_cpu() { if [[ $1 == shared ]]; then echo "$POLLER_CPU"; else echo "$OTHER_CPU"; fi; }

# start_target NAME CPU: a fake target with a null namespace on 127.0.0.1 (a free port), its
# connection threads pinned to CPU; sets TPORT[NAME].
start_target() {
  local name=$1 cpu=$2 log=$work/$1.log i port=""
  : >"$log"
  taskset -c "$cpu" "$FAKE_TARGET" --listen 127.0.0.1:0 --nqn "$NQN" --ns-size "$NS_SIZE" \
    --block-size "$BLOCK_SIZE" --null --cpus "$cpu" >"$log" 2>&1 &
  PIDS[$name]=$!
  for ((i = 0; i < 200; i++)); do
    port=$(sed -n 's/^LISTENING 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$log")
    [[ -n $port ]] && break
    kill -0 "${PIDS[$name]}" 2>/dev/null || { cat "$log" >&2; die "$name exited at start"; }
    sleep 0.05
  done
  [[ -n $port ]] || die "$name: not listening after 10 s"
  TPORT[$name]=$port
}

sock() { echo "$work/vubd-$1-$2.sock"; }
for p in "${placements[@]}"; do
  start_target "target-$p" "$(target_cpu "$p")"
  for poll in "${polls[@]}"; do
    start_backend "vubd-$p-$poll" "$(sock "$p" "$poll")" taskset -c "$POLLER_CPU" "$VUBD" \
      --socket-path "$(sock "$p" "$poll")" \
      --disk "nvme-tcp://127.0.0.1:${TPORT[target-$p]}/$NQN" --cpus "$POLLER_CPU" --poll "$poll"
  done
done
log "up: ${!PIDS[*]}"

# utime and stime (clock ticks) of vubd's poller thread.
poller_ticks() {
  local t
  for t in /proc/"$1"/task/*; do
    if [[ $(cat "$t/comm" 2>/dev/null) == "$POLLER" ]]; then
      sed 's/.*) //' "$t/stat" | awk '{print $12, $13}'
      return 0
    fi
  done
  die "no thread $POLLER in process $1"
}

# --- runs -----------------------------------------------------------------------------------
retries=${RETRIES:-12}
# Other processes' CPU use during a run (CPUs): the machine's busy time less the load
# generator's, vubd's and the target's.
other_load() {
  python3 -c 'import json, sys
r = json.loads(open(sys.argv[1]).read())
b = r["backend"]["cpu_s"] if r.get("backend") else 0.0
w = sum(x["cpu_s"] for x in r.get("watched", []))
print("%.2f" % (max(0.0, r["machine_cpu_s"] - r["client_cpu_s"] - b - w) / max(r["secs"], 1e-9)))' "$1"
}

# run_loadgen LABEL PLACEMENT POLL MODE RW QD [extra loadgen args]
run_loadgen() {
  local label=$1 p=$2 poll=$3 mode=$4 rw=$5 qd=$6
  shift 6
  local name=vubd-$p-$poll attempt other best="" best_other="" t0 t1
  local pid=${PIDS[$name]} cpu=$OTHER_CPU
  for attempt in 1 2; do
    wait_quiet
    t0=$(poller_ticks "$pid")
    "$LOADGEN" --socket "$(sock "$p" "$poll")" --rw "$rw" --bs 4k --qd "$qd" --queues 1 \
      --secs "$SECS" --warmup "$WARMUP" --mode "$mode" --backend-pid "$pid" \
      --backend-thread "$POLLER" --watch-pid "${PIDS[target-$p]}" --cpu "$cpu" --json \
      --label "$label" "$@" >"$work/run-$attempt.json" 2>"$work/run-$attempt.txt" || {
      cat "$work/run-$attempt.txt" >&2
      die "run $label failed"
    }
    t1=$(poller_ticks "$pid")
    # The poller's user and system ticks over the whole run (warm-up included).
    python3 -c 'import json, sys
r = json.loads(open(sys.argv[1]).read())
a, b = [list(map(int, x.split())) for x in sys.argv[2:4]]
r["poller_ticks"] = {"user": b[0] - a[0], "system": b[1] - a[1]}
open(sys.argv[1], "w").write(json.dumps(r) + "\n")' "$work/run-$attempt.json" "$t0" "$t1"
    other=$(other_load "$work/run-$attempt.json")
    if [[ -z $best ]] || awk -v a="$other" -v b="$best_other" 'BEGIN { exit !(a < b) }'; then
      best=$attempt best_other=$other
    fi
    if ! awk -v o="$other" 'BEGIN { exit !(o > 0.10) }' || ((retries == 0)); then
      break
    fi
    retries=$((retries - 1))
    log "$label: other processes used $other CPUs during the run; repeating it"
  done
  cat "$work/run-$best.json" >>"$results"
  python3 -c 'import json, sys
r = json.loads(open(sys.argv[1]).read())
t, l = r["backend"]["thread"], r["lat_ns"]
per = t["cpu_us_per_io"]
print("%-40s %8.0f IOPS, p50 %6.1f us, p99 %7.1f us, poller %3.0f%% = %s us per I/O (others: %s CPUs)"
      % (r["label"], r["iops"], l["p50"] / 1e3, l["p99"] / 1e3, t["cpu_pct"],
         "%.2f" % per if per is not None else "-", sys.argv[2]))' "$work/run-$best.json" \
    "$best_other" >&2
}

configs=("shared poll" "shared eventfd" "split eventfd" "split poll")
workloads=("randread 1" "randread 32" "randwrite 32")
start_time=$SECONDS
for ((round = 1; round <= ROUNDS; round++)); do
  log "round $round of $ROUNDS"
  for w in "${workloads[@]}"; do
    read -r rw qd <<<"$w"
    for c in "${configs[@]}"; do
      read -r p mode <<<"$c"
      for ((i = 0; i < ${#polls[@]}; i++)); do
        poll=${polls[$(((i + round - 1) % ${#polls[@]}))]}
        run_loadgen "$p/$mode/$rw/$qd/$poll/r$round" "$p" "$poll" "$mode" "$rw" "$qd"
      done
    done
  done
  # An idle client: a burst of reads attaches the queue, then nothing for SECS seconds.
  run_loadgen "shared/eventfd/idle/1/adaptive/r$round" shared adaptive eventfd randread 1 --idle
done
log "runs took $((SECONDS - start_time)) s"

# --- profile --------------------------------------------------------------------------------
poller_tid() {
  local t
  for t in /proc/"$1"/task/*; do
    [[ $(cat "$t/comm" 2>/dev/null) == "$POLLER" ]] && { echo "${t##*/}"; return 0; }
  done
  die "no thread $POLLER in process $1"
}

# Stops a counting tool with SIGINT (it then writes its summary) and waits for it, 10 s at most.
stop_counter() {
  local pid=$1 i
  kill -INT "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# The syscalls of vubd's poller while the client sends IOS requests (vubd --poll adaptive):
# counted natively with perf's syscall tracepoints on the poller thread, or, where perf cannot
# count them, by `strace -c -f` attached to the whole process (far slower: it changes the
# timing, so empty reads and batch sizes differ from a native run).
sc_names=(readv sendmsg epoll_wait write read)
counter=strace
if command -v perf >/dev/null && perf stat -e syscalls:sys_enter_readv true >/dev/null 2>&1; then
  counter=perf
fi
syscalls_run() { # PLACEMENT MODE RW QD
  local p=$1 mode=$2 rw=$3 qd=$4 label=$1/$2/$3/$4 pid tid out spid n ev=()
  pid=${PIDS[vubd-$p-adaptive]}
  out=$work/syscalls-${label//\//-}.txt
  tid=$(poller_tid "$pid")
  for n in "${sc_names[@]}"; do
    ev+=(-e "syscalls:sys_enter_$n" -e "syscalls:sys_exit_$n" --filter 'ret < 0')
  done
  wait_quiet
  if [[ $counter == perf ]]; then
    perf stat -x, -t "$tid" -o "$out" -e raw_syscalls:sys_enter "${ev[@]}" &
  else
    strace -c -f -q -p "$pid" -o "$out" &
  fi
  spid=$!
  sleep 1 # attached
  "$LOADGEN" --socket "$(sock "$p" adaptive)" --rw "$rw" --bs 4k --qd "$qd" --mode "$mode" \
    --ios "$IOS" --secs 600 --cpu "$OTHER_CPU" >"$out.loadgen" 2>&1 || {
    stop_counter "$spid"
    cat "$out.loadgen" >&2
    die "syscall count $label failed"
  }
  stop_counter "$spid"
  if [[ $counter == perf ]]; then
    # count,unit,event,...: a sys_exit line (filtered) counts the failed calls.
    awk -F, -v l="$label" -v ios="$IOS" 'BEGIN { OFS = "\t" }
      $3 == "raw_syscalls:sys_enter" { print "syscall", l, ios, "all", $1, 0 }
      $3 ~ /^syscalls:sys_enter_/ { n = substr($3, 20); calls[n] = $1; order[++k] = n }
      $3 ~ /^syscalls:sys_exit_/ { fails[substr($3, 19)] = $1 }
      END { for (i = 1; i <= k; i++) print "syscall", l, ios, order[i], calls[order[i]], fails[order[i]] + 0 }' \
      "$out" >>"$profile"
  else
    # "% time  seconds  usecs/call  calls  errors  syscall": errors may be empty.
    awk -v l="$label" -v ios="$IOS" 'BEGIN { OFS = "\t" }
      $NF == "total" { print "syscall", l, ios, "all", $(NF == 6 ? 4 : 4), 0 }
      $1 ~ /^[0-9.]+$/ && $NF ~ /^[a-z_0-9]+$/ && $NF != "total" {
        print "syscall", l, ios, $NF, $4, (NF == 6 ? $5 : 0) }' "$out" >>"$profile"
  fi
  log "syscalls ($counter), $label: $(awk -F'\t' -v l="$label" '$2 == l && $4 == "all" {print $5}' \
    "$profile") for $IOS I/Os"
}

# The poller under callgrind (adaptive, shared placement, poll client) while the client sends
# CG_IOS reads.
callgrind_run() { # QD
  local qd=$1 name=cg-qd$1 s=$work/cg-qd$1.sock f thread="" ir label=shared/poll/randread/$1
  wait_quiet
  START_TIMEOUT=60 start_backend "$name" "$s" taskset -c "$POLLER_CPU" valgrind \
    --tool=callgrind --separate-threads=yes --callgrind-out-file="$work/cg.$name.%p" "$VUBD" \
    --seccomp off --socket-path "$s" --disk "nvme-tcp://127.0.0.1:${TPORT[target-shared]}/$NQN" \
    --cpus "$POLLER_CPU" --poll adaptive
  local pid=${PIDS[$name]}
  "$LOADGEN" --socket "$s" --rw randread --bs 4k --qd "$qd" --mode poll --ios "$CG_IOS" \
    --secs 600 --connect-timeout 60 --cpu "$OTHER_CPU" >"$work/$name.loadgen.txt" 2>&1 || {
    cat "$work/$name.loadgen.txt" >&2
    die "$name: load generator failed"
  }
  stop_backend "$name"
  for f in "$work/cg.$name.$pid"-*; do
    grep -q 'poller::worker::Worker::run' "$f" && thread=$f
  done
  [[ -n $thread ]] || die "$name: no profile of the poller"
  ir=$(awk '/^(summary|totals):/{print $2; exit}' "$thread")
  printf 'ir\t%s\t%s\ttotal\t%s\t0\n' "$label" "$CG_IOS" "$ir" >>"$profile"
  # Empty passes of the loop: the spin-loop hint inlined into it, once per pass (as in
  # callgrind.sh).
  callgrind_annotate "$thread" 2>/dev/null | awk -v l="$label" -v ios="$CG_IOS" '
    /x86\/sse2.rs:vubd::poller::worker::Worker::run/ { gsub(",", "", $1); n += $1 }
    END { printf "ir\t%s\t%s\tspin\t%d\t0\n", l, ios, n }' >>"$profile"
  if ! callgrind_annotate --auto=no "$thread" >"$work/flat-qd$qd.txt" 2>/dev/null ||
    ! callgrind_annotate --tree=calling --inclusive=yes "$thread" \
      >"$work/annotate-qd$qd.txt" 2>/dev/null; then
    die "callgrind_annotate failed"
  fi
  python3 benches/report.py calls "$thread" "$label" "$CG_IOS" >>"$profile"
  log "$name: $((ir / CG_IOS)) Ir per I/O in the poller"
}

if ((PROFILE != 0)); then
  [[ $counter == perf ]] || need strace:strace
  for c in "shared poll" "split eventfd"; do
    read -r p mode <<<"$c"
    for w in "${workloads[@]}"; do
      read -r rw qd <<<"$w"
      syscalls_run "$p" "$mode" "$rw" "$qd"
    done
  done
  for qd in 1 32; do
    callgrind_run "$qd"
  done
fi
stop_all_backends

# --- report ---------------------------------------------------------------------------------
facts=$work/facts.txt
echo "$facts_now" >"$facts"
{
  echo "rounds=$ROUNDS"
  echo "secs=$SECS"
  echo "warmup=$WARMUP"
  echo "poller_cpu=$POLLER_CPU"
  echo "other_cpu=$OTHER_CPU"
  echo "ios=$IOS"
  echo "cg_ios=$CG_IOS"
  echo "counter=$counter"
  echo "perf=$(perf --version 2>/dev/null || echo "perf: none")"
  echo "ns_size=$NS_SIZE"
  echo "block_size=$BLOCK_SIZE"
  echo "nqn=$NQN"
} >>"$facts"
python3 benches/report.py nvme_tcp "$facts" "$results" "$work" docs/benchmarks.md
log "wrote docs/benchmarks.md"
