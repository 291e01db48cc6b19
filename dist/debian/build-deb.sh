#!/usr/bin/env bash
# Builds vubd's Debian package with cargo-deb (`cargo install cargo-deb --locked`):
# target/debian/vubd_VERSION-1_ARCH.deb, its contents in Cargo.toml's [package.metadata.deb].
#
# cargo-deb only copies files, so what the package holds that is made rather than kept in the
# repository is made here first, every time, in target/deb-assets/:
# - the man page, vubd.1, rendered from the clap definition (examples/manpage.rs), so it always
#   lists the options of the binary beside it;
# - the systemd units of dist/systemd and the QEMU descriptor qemu/50-vubd.json, with the
#   packaged binary's path /usr/bin/vubd where the repository's copies name /usr/local/bin/vubd,
#   a from-source install's.
# Then the release profile is built and cargo-deb packages it (`cargo deb --no-build`), with
# the binary stripped, as Debian ships binaries.
#
# Usage: dist/debian/build-deb.sh [--binary PATH] [--output DIR] [-- CARGO-DEB-OPTION...]
#   --binary PATH   package this vubd instead of building the release profile, and render the
#                   man page with the dev profile: the tests package the debug build the suite
#                   has already made instead of spending minutes on an optimised one
#   --output DIR    where the .deb goes (default: target/debian)
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$top"

die() { echo "build-deb.sh: $*" >&2; exit 1; }

binary=
output=
while (($#)); do
  case $1 in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --output) output=${2:?--output needs a directory}; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
done
[[ -z $binary || -x $binary ]] || die "--binary $binary is not an executable file"
cargo deb --version >/dev/null 2>&1 ||
  die "cargo-deb is not installed: cargo install cargo-deb --locked"

# Where cargo puts its builds (CARGO_TARGET_DIR and cargo's configuration may move it).
target=$(cargo metadata --format-version 1 --no-deps --locked |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[[ -n $target ]] || die "cargo metadata names no target directory"
output=${output:-$target/debian}

# Cargo.toml names these paths relative to the package, as cargo-deb reads every asset but
# the built binary: they are here whatever the target directory.
assets=$top/target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/systemd"

profile=(--release)
[[ -z $binary ]] || profile=()
cargo run --quiet --locked "${profile[@]}" --example manpage >"$assets/vubd.1"

# The path of a from-source install, replaced by the package's. A service or descriptor that
# no longer names it would keep a wrong one silently, so each must (a socket names none).
packaged_path() {
  local from=$1 to=$2
  [[ $from == *.socket ]] || grep -q '/usr/local/bin/vubd' "$from" ||
    die "$from no longer names /usr/local/bin/vubd"
  sed 's|/usr/local/bin/vubd|/usr/bin/vubd|g' "$from" >"$to"
}
for unit in dist/systemd/*; do
  packaged_path "$unit" "$assets/systemd/${unit##*/}"
done
packaged_path qemu/50-vubd.json "$assets/50-vubd.json"

# cargo-deb takes the binary from target/release/ of the target directory cargo metadata
# names: a --binary is put there in a directory of its own, never over a real release build.
deb_env=()
if [[ -n $binary ]]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  mkdir "$stage/release"
  cp "$binary" "$stage/release/vubd"
  deb_env=(env "CARGO_TARGET_DIR=$stage")
else
  cargo build --locked --release --bin vubd
fi
mkdir -p "$output"
"${deb_env[@]}" cargo deb --locked --no-build --strip --output "$output" "$@"
