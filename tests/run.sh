#!/usr/bin/env bash
# The whole vubd test suite, as CI runs it: installs what it needs on a Debian machine (as root
# or through sudo), then runs formatting and lint checks, unit and integration tests against
# real vhost-user frontends (libblkio) and against the Linux kernel's NVMe/TCP target in a QEMU
# guest, the QEMU guest test, and a bounded run of every fuzz target from its committed seeds
# (VUBD_FUZZ_SECS each, 30 s by default).
#
# Usage: tests/run.sh          (from anywhere; exits non-zero on the first failing stage)
#        tests/run.sh --long   the long variants too: VUBD_TEST_LONG=1 for the tests that have
#                              one (many-kill restart loops, repeated migrations) and 10 minutes
#                              of fuzzing per target; about an hour and a half more
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
# dpkg-dev: dpkg-shlibdeps, which gives the Debian package its Depends (tests/deb_package.rs).
packages=(qemu-system-x86 qemu-system-common qemu-utils busybox-static cpio xz-utils kmod systemd
  libvirt-daemon-system libvirt-clients dpkg-dev)
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
# cargo-deb builds the Debian package (dist/debian/build-deb.sh, tests/deb_package.rs).
if ! cargo deb --version >/dev/null 2>&1; then
  echo "== installing cargo-deb"
  cargo install cargo-deb --locked --quiet || die "cargo install cargo-deb failed"
fi

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

# The fuzz targets (fuzz/README.md) build with cargo-fuzz on the stable toolchain (no
# sanitizer), installed once. Their committed seeds must be what fuzz/examples/seeds.rs
# writes (it also checks each decodes back to its value); then each target runs for
# VUBD_FUZZ_SECS from its seeds, its corpus growing in fuzz/corpus/TARGET (not committed).
fuzz_targets=(nvme_tcp_rx virtio_blk_request vhost_user nvme_pcie_cq)

fuzz_seeds() {
  local out
  out=$(mktemp -d) || return 1
  cargo run --quiet --locked --manifest-path fuzz/Cargo.toml --example seeds -- "$out" >/dev/null &&
    diff -r "$out" fuzz/seeds
  local rc=$?
  rm -rf "$out"
  ((rc == 0)) || echo "fuzz/seeds differs from what the seed program writes: run it" >&2
  return "$rc"
}

fuzz_build() {
  if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked --quiet || return 1
  fi
  cargo fuzz build --fuzz-dir fuzz --sanitizer none
}

fuzz_run() {
  local target=$1
  mkdir -p "fuzz/corpus/$target" || return 1
  cargo fuzz run --fuzz-dir fuzz --sanitizer none "$target" \
    "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="${VUBD_FUZZ_SECS:-30}" -timeout=60 -rss_limit_mb=2048
}

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo fmt --check (fuzz)" cargo fmt --manifest-path fuzz/Cargo.toml -- --check
stage "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
stage "cargo test" cargo test --locked --all-targets
stage "QEMU guest test" tests/guest-test.sh "$top/target/debug/vubd"
stage "fuzz seeds" fuzz_seeds
stage "fuzz build" fuzz_build
for target in "${fuzz_targets[@]}"; do
  stage "fuzz $target" fuzz_run "$target"
done

echo "suite: $passed passed, 0 failed"
