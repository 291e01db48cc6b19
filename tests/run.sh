#!/usr/bin/env bash
# The whole vubd test suite, as CI runs it: installs what it needs on a Debian machine (as root
# or through sudo), then runs formatting and lint checks, unit and integration tests against
# real vhost-user frontends (libblkio), and the QEMU guest test.
#
# Usage: tests/run.sh          (from anywhere; exits non-zero on the first failing stage)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

die() { echo "tests/run.sh: $*" >&2; exit 1; }

# --- what the suite needs -------------------------------------------------------------------
packages=(qemu-system-x86 qemu-system-common busybox-static cpio xz-utils kmod)
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

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --all-targets --locked -- -D warnings
stage "cargo test" cargo test --locked --all-targets
stage "QEMU guest test" tests/guest-test.sh "$top/target/debug/vubd"

echo "suite: $passed passed, 0 failed"
