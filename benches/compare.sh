#!/usr/bin/env bash
# vubd against qemu-storage-daemon (and, for a file, against fio), measured on this machine and
# written into docs/benchmarks.md.
#
# Usage: benches/compare.sh        (about 10 minutes; installs fio and QEMU with apt-get if missing)
#
# Every backend runs pinned to BACKEND_CPU, vubd with one poller on it; the load generator
# (examples/loadgen.rs, a libblkio client) runs pinned to CLIENT_CPU. Backends: vubd
# --poll always, vubd --poll adaptive and qemu-storage-daemon, each serving a null device and
# a file. Workloads: 4 KiB random reads at QD 1 and 32 with a poll-mode and an eventfd-mode
# client, each run SECS seconds after WARMUP seconds, in ROUNDS interleaved rounds (every
# backend once per workload per round, the order rotating), medians reported. fio on the same
# file, pinned to BACKEND_CPU, gives the kernel's own ceiling. Last, the CPU an idle backend
# burns with a connected client that went quiet. Each round also measures the round trip of a
# cache line between the two CPUs (examples/pingpong.rs): no request can complete faster.
#
# The machine may be shared: before each run the script waits for other processes to go quiet
# (bounded), and a run during which they used more than a tenth of a CPU is repeated once (at
# most RETRIES times in all); the quieter attempt counts. The report says how much other work
# shared the machine.
#
# Environment: ROUNDS (3), SECS (4), WARMUP (1), FILE_SIZE (4G), BENCH_DIR (target/bench, on a
# real file system), BACKEND_CPU (1), CLIENT_CPU (0), QUIET_WAIT (30: seconds to wait before a
# run for other processes to go quiet), QUIET_BUDGET (120: all such waits together), RETRIES
# (12).
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
# shellcheck source=benches/lib.sh
. benches/lib.sh

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-4}
WARMUP=${WARMUP:-1}
FILE_SIZE=${FILE_SIZE:-4G}
BACKEND_CPU=${BACKEND_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
work=${BENCH_DIR:-target/bench}
NULL_BYTES=$((16 << 30))

need qemu-storage-daemon:qemu-system-common fio:fio taskset:util-linux fallocate:util-linux \
  python3:python3
(($(nproc) >= 2)) || die "needs two CPUs (one for the backend, one for the load generator)"
build_release pingpong
facts_now=$(machine_facts) # describes the build that is measured

mkdir -p "$work"
work=$(cd "$work" && pwd)
img=$work/bench.img
fstype=$(findmnt -n -o FSTYPE -T "$work" 2>/dev/null || stat -f -c %T "$work")
[[ $fstype != tmpfs && $fstype != ramfs ]] || die "$work is on $fstype; set BENCH_DIR to a real file system"
want=$(numfmt --from=iec "$FILE_SIZE")
if [[ ! -f $img || $(stat -c %s "$img") -ne $want ]]; then
  rm -f "$img"
  fallocate -l "$want" "$img" || die "fallocate $img failed"
fi
results=$work/results.jsonl
: >"$results"
trap stop_all_backends EXIT

# --- backends -------------------------------------------------------------------------------
backends=(vubd-always vubd-adaptive qsd)
sock() { echo "$work/$1-$2.sock"; }
# Sets BCMD to the command line of backend $1 serving disk $2 (null or file).
backend_cmd() {
  local b=$1 disk=$2 s vdisk=null:16G
  s=$(sock "$1" "$2")
  [[ $disk == file ]] && vdisk=$img
  case $b in
  vubd-always | vubd-adaptive)
    BCMD=(taskset -c "$BACKEND_CPU" "$VUBD" --socket-path "$s" --disk "$vdisk"
      --cpus "$BACKEND_CPU" --poll "${b#vubd-}")
    ;;
  qsd)
    local node=n0 blockdev="driver=null-co,node-name=n0,size=$NULL_BYTES,read-zeroes=off"
    if [[ $disk == file ]]; then
      node=f0
      blockdev="driver=file,filename=$img,node-name=f0,aio=io_uring,cache.direct=on"
    fi
    BCMD=(taskset -c "$BACKEND_CPU" qemu-storage-daemon --blockdev "$blockdev" --export
      "type=vhost-user-blk,id=e0,node-name=$node,addr.type=unix,addr.path=$s,writable=on")
    ;;
  esac
}
for disk in null file; do
  for b in "${backends[@]}"; do
    backend_cmd "$b" "$disk"
    start_backend "$b-$disk" "$(sock "$b" "$disk")" "${BCMD[@]}"
  done
done
log "backends up: ${!PIDS[*]}"

# --- runs -----------------------------------------------------------------------------------
retries=${RETRIES:-12}
# Other processes' CPU use during a run (CPUs), from the load generator's JSON line.
other_load() {
  python3 -c 'import json, sys
r = json.loads(open(sys.argv[1]).read())
b = r["backend"]["cpu_s"] if r.get("backend") else 0.0
print("%.2f" % (max(0.0, r["machine_cpu_s"] - r["client_cpu_s"] - b) / max(r["secs"], 1e-9)))' "$1"
}

run_loadgen() { # label backend disk mode qd [extra loadgen args]
  local label=$1 b=$2 disk=$3 mode=$4 qd=$5
  shift 5
  local size=() attempt other best="" best_other=""
  [[ $disk == file ]] && size=(--size "$FILE_SIZE")
  for attempt in 1 2; do
    wait_quiet
    "$LOADGEN" --socket "$(sock "$b" "$disk")" --rw randread --bs 4k --qd "$qd" --queues 1 \
      --secs "$SECS" --warmup "$WARMUP" --mode "$mode" "${size[@]}" \
      --backend-pid "${PIDS[$b-$disk]}" --cpu "$CLIENT_CPU" --json --label "$label" "$@" \
      >"$work/run-$attempt.json" 2>"$work/run-$attempt.txt" || {
      cat "$work/run-$attempt.txt" >&2
      die "run $label failed"
    }
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
  sed -n 3p "$work/run-$best.txt" | awk -v l="$label" -v o="$best_other" \
    '{printf "%-40s %s IOPS, p50 %s us, p99 %s us (others: %s CPUs)\n", l, $1, $5, $7, o}' >&2
}

run_fio() { # qd round
  local qd=$1 round=$2 out=$work/fio-qd$1-r$2.json
  wait_quiet
  taskset -c "$BACKEND_CPU" fio --name=ceiling --filename="$img" --ioengine=io_uring --direct=1 \
    --rw=randread --bs=4k --iodepth="$qd" --numjobs=1 --size="$FILE_SIZE" --time_based \
    --runtime="$SECS" --ramp_time="$WARMUP" --norandommap --randrepeat=0 --lat_percentiles=1 \
    --output-format=json --output="$out" || die "fio failed"
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["read"];
print("%-40s %.0f IOPS, p50 %.2f us, p99 %.2f us" % (sys.argv[2], j["iops"],
 j["lat_ns"]["percentile"]["50.000000"]/1e3, j["lat_ns"]["percentile"]["99.000000"]/1e3))' \
    "$out" "file/fio/-/$qd/r$round" >&2
}

# The machine's floor for a request between the two CPUs: one cache-line round trip.
run_pingpong() { # round
  local out=$work/pingpong-r$1.json
  wait_quiet
  "$top/target/release/examples/pingpong" --cpus "$CLIENT_CPU,$BACKEND_CPU" --json >"$out" ||
    die "pingpong failed"
  python3 -c 'import json,sys; print("%-40s round trip %.1f ns" % (sys.argv[2],
 json.load(open(sys.argv[1]))["round_trip_ns"]))' "$out" "pingpong/r$1" >&2
}

start_time=$SECONDS
for ((round = 1; round <= ROUNDS; round++)); do
  log "round $round of $ROUNDS"
  run_pingpong "$round"
  for disk in null file; do
    for mode in poll eventfd; do
      for qd in 1 32; do
        for ((i = 0; i < ${#backends[@]}; i++)); do
          b=${backends[$(((i + round - 1) % ${#backends[@]}))]}
          run_loadgen "$disk/$b/$mode/$qd/r$round" "$b" "$disk" "$mode" "$qd"
        done
      done
    done
  done
  for qd in 1 32; do
    run_fio "$qd" "$round"
  done
  # An idle client: a burst of I/O attaches the queue, then nothing for SECS seconds.
  for b in "${backends[@]}"; do
    run_loadgen "null/$b/idle/1/r$round" "$b" null eventfd 1 --idle
  done
done
log "runs took $((SECONDS - start_time)) s"
stop_all_backends

# --- report ---------------------------------------------------------------------------------
facts=$work/facts.txt
echo "$facts_now" >"$facts"
{
  echo "rounds=$ROUNDS"
  echo "secs=$SECS"
  echo "warmup=$WARMUP"
  echo "file_size=$FILE_SIZE"
  echo "fstype=$(findmnt -n -o FSTYPE -T "$work" 2>/dev/null || stat -f -c %T "$work")"
  echo "backend_cpu=$BACKEND_CPU"
  echo "client_cpu=$CLIENT_CPU"
} >>"$facts"
python3 benches/report.py compare "$facts" "$results" "$work" docs/benchmarks.md
log "wrote docs/benchmarks.md"
