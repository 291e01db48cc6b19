# shellcheck shell=bash disable=SC2034,SC2154
# Shared by benches/compare.sh, benches/callgrind.sh and benches/nvme_tcp.sh: tool checks, the
# release build, and starting and stopping backends. Sourced, not run; uses the caller's $top
# and $work, and sets VUBD and LOADGEN for it.

die() { echo "${0##*/}: $*" >&2; exit 1; }
log() { echo "== $*" >&2; }

# Installs the Debian packages that provide missing commands: need CMD:PACKAGE...
need() {
  local missing=() spec
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null || missing+=("${spec#*:}")
  done
  ((${#missing[@]})) || return 0
  log "installing ${missing[*]}"
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "${missing[*]} missing, and neither root nor sudo to install them"
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
  for spec in "$@"; do
    command -v "${spec%%:*}" >/dev/null || die "${spec%%:*} still missing after installing ${spec#*:}"
  done
}

# The release build of vubd and the load generator (and of the examples named as arguments),
# for the baseline x86-64 target (no target-cpu=native from the environment).
# shellcheck disable=SC2120 # the examples are optional
build_release() {
  local ex extra=()
  for ex in "$@"; do
    extra+=(--example "$ex")
  done
  log "cargo build --release --bin vubd --example loadgen ${extra[*]}"
  env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS \
    cargo build --release --locked --bin vubd --example loadgen "${extra[@]}" >&2 ||
    die "build failed"
  VUBD=$top/target/release/vubd
  LOADGEN=$top/target/release/examples/loadgen
}

# start_backend NAME SOCKET CMD...: runs CMD in the background (logging to $work/NAME.log),
# waits up to START_TIMEOUT (10) seconds for SOCKET to appear, records the pid in PIDS[NAME].
declare -A PIDS=()
start_backend() {
  local name=$1 sock=$2
  shift 2
  rm -f "$sock"
  "$@" >"$work/$name.log" 2>&1 &
  PIDS[$name]=$!
  local i
  for ((i = 0; i < ${START_TIMEOUT:-10} * 20; i++)); do
    [[ -S $sock ]] && return 0
    kill -0 "${PIDS[$name]}" 2>/dev/null || { cat "$work/$name.log" >&2; die "$name exited at start"; }
    sleep 0.05
  done
  die "$name: no socket $sock after ${START_TIMEOUT:-10} s"
}

# Stops one backend: SIGTERM, then SIGKILL after 5 s.
stop_backend() {
  local name=$1 pid=${PIDS[$1]:-}
  [[ -n $pid ]] || return 0
  unset "PIDS[$name]"
  kill "$pid" 2>/dev/null || return 0
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.05
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

stop_all_backends() {
  local name
  for name in "${!PIDS[@]}"; do
    stop_backend "$name"
  done
}

# Busy CPU (all CPUs, in CPUs) over the next half second, from /proc/stat.
machine_busy() {
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  sleep 0.5
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9; exit}' /proc/stat)
  awk -v a="$a" -v b="$b" -v n="$(nproc)" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    t = y[2] - x[2]; printf "%.2f\n", (t > 0 ? (y[1] - x[1]) / t * n : 0) }'
}

# Waits (at most QUIET_WAIT seconds, and while the QUIET_BUDGET lasts) until other processes
# use less than a tenth of a CPU, so that a run does not share the machine.
quiet_budget=${QUIET_BUDGET:-120}
wait_quiet() {
  local start=$SECONDS busy
  while :; do
    busy=$(machine_busy)
    awk -v b="$busy" 'BEGIN { exit !(b < 0.10) }' && return 0
    if ((SECONDS - start >= ${QUIET_WAIT:-30} || quiet_budget <= 0)); then
      log "machine still busy (${busy} CPUs in use by others); running anyway"
      return 0
    fi
    sleep 1
    quiet_budget=$((quiet_budget - 1))
  done
}

# Machine facts for the report, as KEY=VALUE lines.
machine_facts() {
  echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cpus=$(nproc)"
  echo "cpuid=$(lscpu | awk -F': *' '/^CPU family:/{f=$2} /^Model:/{m=$2} /^Stepping:/{s=$2}
    END {print "family " f ", model " m ", stepping " s}')"
  echo "hypervisor=$(lscpu | sed -n 's/^Hypervisor vendor: *//p' | head -1)"
  echo "kernel=$(uname -r)"
  echo "rustc=$(rustc --version)"
  echo "qsd=$(qemu-storage-daemon --version | head -1)"
  echo "fio=$(fio --version 2>/dev/null || echo none)"
  echo "valgrind=$(valgrind --version 2>/dev/null || echo none)"
  echo "blkio=$(awk '/^name = "blkio"/{getline; print $3}' "$top/Cargo.lock" | tr -d '"')"
  echo "commit=$(git -C "$top" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  # Uncommitted changes that went into the build.
  echo "dirty=$(git -C "$top" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null |
    awk '{print $2}' | paste -sd ' ')"
  echo "date=$(date -u +%Y-%m-%d)"
}
