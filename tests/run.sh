#!/usr/bin/env bash
# The whole vubd test suite, as CI runs it: installs what it needs on a Debian machine (as root
# or through sudo), then runs formatting and lint checks, unit and integration tests against
# real vhost-user frontends (libblkio) and against the Linux kernel's NVMe/TCP target in a QEMU
# guest, the QEMU guest test, and a bounded run of the NVMe/TCP receive-path fuzzer.
#
# Usage: tests/run.sh          (from anywhere; exits non-zero on the first failing stage)
#        tests/run.sh --long   the long variants too: VUBD_TEST_LONG=1 for the tests that have
#                              one (many-kill restart loops, repeated migrations) and a 10 minute
#                              fuzz run; about an hour more
set -euo pipefail

case ${1:-} in
  "") ;;
  --long)
    export VUBD_TEST_LONG=1
    export VUBD_FUZZ_SECS=${VUBD_FUZZ_SECS:-600}
    ;;
  -h | --help)
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
    ;;
  *)
    echo "tests/run.sh: unknown argument '$1' (try --help)" >&2
    exit 2
    ;;
esac

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

die() { echo "tests/run.sh: $*" >&2; exit 1; }

# --- what the suite needs -------------------------------------------------------------------
packages=(qemu-system-x86 qemu-system-common qemu-utils busybox-static cpio xz-utils kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    sudo=()
  elif command -v sudo >/dev/null; then
    sudo=(sudo)
  else
    die "packages ${missing[*]} are missing and neither root nor sudo is available to install them"
  fi
  "${sudo[@]}" apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
fi
command -v cargo >/dev/null || die "cargo is not installed (a stable Rust toolchain with rustfmt and clippy is required)"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt is missing from the Rust toolchain"
cargo clippy --version >/dev/null 2>&1 || die "clippy is missing from the Rust toolchain"

# --- stages ---------------------------------------------------------------------------------
passed=0
stage() {
  local name=$1
  shift
  echo "== $name"
  local start=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    echo "== $name: ok ($((SECONDS - start)) s)"
  else
    echo "== $name: FAILED"
    echo "suite: $passed passed, 1 failed"
    exit 1
  fi
}

# The fuzz target builds with cargo-fuzz on the stable toolchain (no sanitizer); installed
# once, then a bounded run on top of a short build.
fuzz() {
  if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --quiet || return 1
  fi
  cargo fuzz run --fuzz-dir fuzz --sanitizer none nvme_tcp_rx -- \
    -max_total_time="${VUBD_FUZZ_SECS:-30}" -rss_limit_mb=2048
}

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo fmt --check (fuzz)" cargo fmt --manifest-path fuzz/Cargo.toml -- --check
stage "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
stage "cargo test" cargo test --locked --all-targets
stage "QEMU guest test" tests/guest-test.sh "$top/target/debug/vubd"
stage "fuzz nvme_tcp_rx" fuzz

echo "suite: $passed passed, 0 failed"
