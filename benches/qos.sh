#!/usr/bin/env bash
# Rate limits and fair turns (docs/control-api.md, `device_set_qos`), measured in one run; the
# results go into the QoS section of docs/benchmarks.md.
#
# Usage: benches/qos.sh      (about 12 minutes; installs valgrind if missing)
#
# 1. Accuracy: one vubd, one poller on BACKEND_CPU, three null devices: one without a limit
#    (the reference), one limited to 50,000 IOPS, one to 200 MB/s (200,000,000 bytes a
#    second). The load generator (eventfd client on CLIENT_CPU) reads at QD 32, 4 KiB for the
#    IOPS limit and 64 KiB for the byte rate, for SECS seconds after a second of warm-up (which
#    spends the burst allowance); the measured rate is reported as a ratio of the limit.
# 2. Noisy neighbour: one vubd, one poller, a victim device read at QD 1 (4 KiB) and a
#    neighbour device read at QD 32 at the same time, both clients on CLIENT_CPU in eventfd
#    mode. Three cases, interleaved over ROUNDS rounds: the victim alone, with the neighbour
#    unlimited, with the neighbour limited to NEIGHBOUR_IOPS. The victim's p99 in each case is
#    reported against its p99 alone (medians over the rounds). With two CPUs the two clients
#    share one, where each wake-up of the neighbour's client would delay the victim's as much
#    as anything the backend does: the neighbour's client runs under SCHED_IDLE (`chrt
#    --idle`), so that it takes the CPU only while the victim's client waits, as two guests'
#    vCPUs on CPUs of their own would. NEIGHBOUR_SCHED=other runs it as an ordinary thread.
# 3. Instructions per I/O (callgrind): vubd under `valgrind --tool=callgrind` with
#    `--poll never` (no empty polls to price), the eventfd client at QD 1 and 32, IOS reads,
#    in three configurations: metrics and QoS off (`--metrics off`, no limit), metrics on, and
#    metrics with a limit that never holds back (1e9 IOPS: every pass is admitted and
#    charged); with BASE_REF set (a commit), also that commit's vubd, built in a worktree
#    under BENCH_DIR. The count is the poller thread's instructions over the I/Os; the lines
#    of src/qos (inlined into the poller) are also counted on their own.
#
# PARTS (default `accuracy neighbour callgrind`) runs some of the three; the results of the
# others are kept from the last run, and the report names the commit each part ran on.
#
# Environment: PARTS, SECS (5), ROUNDS (3), NEIGHBOUR_IOPS (50000), NEIGHBOUR_SCHED (idle), IOS
# (100000), BASE_REF (none),
# BACKEND_CPU (1), CLIENT_CPU (0), BENCH_DIR (target/bench), QUIET_WAIT and QUIET_BUDGET as for
# compare.sh.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
NEIGHBOUR_IOPS=${NEIGHBOUR_IOPS:-50000}
IOS=${IOS:-100000}
BASE_REF=${BASE_REF:-}
BACKEND_CPU=${BACKEND_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
work=${BENCH_DIR:-target/bench}

need valgrind:valgrind callgrind_annotate:valgrind taskset:util-linux python3:python3
(($(nproc) >= 2)) || die "needs two CPUs (one for vubd, one for the clients)"
build_release
facts_now=$(machine_facts)

mkdir -p "$work/qos"
work=$(cd "$work/qos" && pwd)
rm -f "$work"/*.sock "$work"/*.log "$work"/cg.*
results=$work/results.jsonl
facts=$work/facts.txt
PARTS=${PARTS:-accuracy neighbour callgrind}
commit=$(git rev-parse --short HEAD)
touch "$results" "$facts"
# fact KEY VALUE: records a fact of the run in $facts, replacing an earlier value.
fact() {
  grep -v "^$1=" "$facts" >"$facts.keep" || true
  echo "$1=$2" >>"$facts.keep"
  mv "$facts.keep" "$facts"
}
# part NAME: whether to run it; if so, forgets its earlier results (their labels start with
# the part's prefix) and records the commit it runs on.
part() {
  [[ " $PARTS " == *" $1 "* ]] || return 1
  local prefix=$2
  grep -v "\"label\": *\"$prefix" "$results" >"$results.keep" || true
  mv "$results.keep" "$results"
  fact "commit_$1" "$commit"
}
trap stop_all_backends EXIT

# load LABEL SOCKET ARGS...: one load generator run; its JSON line goes to the results.
load() {
  local label=$1 sock=$2
  shift 2
  "$LOADGEN" --socket "$sock" --mode eventfd --cpu "$CLIENT_CPU" --json --label "$label" "$@" \
    >>"$results" 2>"$work/$label.loadgen.txt" ||
    { cat "$work/$label.loadgen.txt" >&2; die "$label: load generator failed"; }
}

# vubd with one poller and the devices given as --device arguments (sockets in $work).
start_vubd() {
  local name=$1 first=$2
  shift 2
  local devices=() d
  for d in "$@"; do
    devices+=(--device "socket=$work/${d%%,*}.sock,name=${d%%,*},disk=null:16G${d#"${d%%,*}"}")
  done
  start_backend "$name" "$work/$first.sock" taskset -c "$BACKEND_CPU" "$VUBD" \
    --cpus "$BACKEND_CPU" "${devices[@]}"
  local i
  for d in "$@"; do
    for ((i = 0; i < 200; i++)); do
      [[ -S $work/${d%%,*}.sock ]] && break
      sleep 0.05
    done
  done
}

if part accuracy accuracy-; then
log "accuracy"
fact accuracy_secs "$SECS"
wait_quiet
start_vubd accuracy free free iops,iops-total=50000 bps,bps-total=200000000
for run in free:4k iops:4k free:64k bps:64k; do
  dev=${run%:*} bs=${run#*:}
  load "accuracy-$dev-$bs" "$work/$dev.sock" --rw randread --bs "$bs" --qd 32 --secs "$SECS" \
    --warmup 1
done
stop_backend accuracy
fi

if part neighbour '\(victim\|neighbour\)-'; then
log "noisy neighbour"
fact neighbour_secs "$SECS"
fact rounds "$ROUNDS"
fact neighbour_iops "$NEIGHBOUR_IOPS"
fact neighbour_sched "${NEIGHBOUR_SCHED:-idle}"
case ${NEIGHBOUR_SCHED:-idle} in
  idle) neighbour_sched=(chrt --idle 0) ;;
  other) neighbour_sched=() ;;
  *) die "NEIGHBOUR_SCHED: idle or other" ;;
esac
wait_quiet
start_vubd neighbour victim victim hog "hogl,iops-total=$NEIGHBOUR_IOPS"
for ((round = 1; round <= ROUNDS; round++)); do
  for case in alone hog hogl; do
    pid=
    if [[ $case != alone ]]; then
      "${neighbour_sched[@]}" "$LOADGEN" --socket "$work/$case.sock" --mode eventfd \
        --cpu "$CLIENT_CPU" --json \
        --label "neighbour-$case-$round-load" --rw randread --bs 4k --qd 32 \
        --secs "$((SECS + 2))" >>"$results" 2>"$work/neighbour-$case.loadgen.txt" &
      pid=$!
      sleep 1
    fi
    load "victim-$case-$round" "$work/victim.sock" --rw randread --bs 4k --qd 1 --secs "$SECS"
    [[ -z $pid ]] || wait "$pid" || die "neighbour $case: load generator failed"
  done
done
stop_backend neighbour
fi

# cg_run NAME QD BINARY VUBD-ARGS...: one callgrind run; appends a JSON line to the results.
cg_run() {
  local name=$1 qd=$2 bin=$3
  shift 3
  local sock=$work/$name.sock out=$work/cg.$name
  wait_quiet
  START_TIMEOUT=60 start_backend "$name" "$sock" taskset -c "$BACKEND_CPU" valgrind \
    --tool=callgrind --separate-threads=yes --callgrind-out-file="$out.%p" "$bin" --seccomp off \
    --cpus "$BACKEND_CPU" --poll never "$@"
  local pid=${PIDS[$name]}
  "$LOADGEN" --socket "$sock" --rw randread --bs 4k --qd "$qd" --mode eventfd --ios "$IOS" \
    --secs 600 --connect-timeout 60 --cpu "$CLIENT_CPU" >"$work/$name.loadgen.txt" 2>&1 ||
    { cat "$work/$name.loadgen.txt" >&2; die "$name: load generator failed"; }
  stop_backend "$name"
  local f thread=""
  for f in "$out.$pid"-*; do
    grep -q 'poller::worker::Worker::run' "$f" && thread=$f
  done
  [[ -n $thread ]] || die "$name: no profile of the poller among $out.$pid-*"
  local ir qos_ir
  ir=$(awk '/^(summary|totals):/{print $2; exit}' "$thread")
  qos_ir=$(callgrind_annotate --auto=no --threshold=100 "$thread" 2>/dev/null |
    awk '/src\/qos\// {gsub(",", "", $1); n += $1} END {print n + 0}')
  printf '{"label":"cg-%s","qd":%s,"ios":%s,"ir":%s,"qos_ir":%s}\n' "$name" "$qd" "$IOS" "$ir" \
    "$qos_ir" >>"$results"
  log "$name: $((ir / IOS)) Ir per I/O in the poller, $((qos_ir / IOS)) in src/qos"
}

if part callgrind cg-; then
base_bin=
if [[ -n $BASE_REF ]]; then
  log "building $BASE_REF"
  base_tree=$work/base-tree
  git worktree remove --force "$base_tree" 2>/dev/null || rm -rf "$base_tree"
  git worktree add --detach "$base_tree" "$BASE_REF" >&2
  (cd "$base_tree" && env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS \
    cargo build --release --locked --bin vubd >&2) || die "build of $BASE_REF failed"
  base_bin=$base_tree/target/release/vubd
fi
for qd in 1 32; do
  [[ -z $base_bin ]] ||
    cg_run "base-$qd" "$qd" "$base_bin" --socket-path "$work/base-$qd.sock" --disk null:16G \
      --metrics off
  cg_run "off-$qd" "$qd" "$VUBD" --socket-path "$work/off-$qd.sock" --disk null:16G --metrics off
  cg_run "metrics-$qd" "$qd" "$VUBD" --socket-path "$work/metrics-$qd.sock" --disk null:16G
  cg_run "qos-$qd" "$qd" "$VUBD" \
    --device "socket=$work/qos-$qd.sock,disk=null:16G,iops-total=1000000000"
done
if [[ -n $BASE_REF ]]; then
  git worktree remove --force "$base_tree" || true
fi
fact base_ref "$BASE_REF"
fact ios "$IOS"
fi

while IFS= read -r line; do
  fact "${line%%=*}" "${line#*=}"
done <<<"$facts_now"
fact backend_cpu "$BACKEND_CPU"
fact client_cpu "$CLIENT_CPU"
python3 benches/report.py qos "$facts" "$results" docs/benchmarks.md
log "wrote docs/benchmarks.md"
