# shellcheck shell=bash
# Helpers shared by the qemu/ lab scripts. Source it; do not run it.

# Program name used in messages; the sourcing script may set it first.
: "${LAB_PROG:=$(basename "$0")}"

log() { printf '%s: %s\n' "$LAB_PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$LAB_PROG" "$*" >&2; exit 1; }

# Root of the repository this file lives in (one level above qemu/).
lab_repo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd); }

# Cache directory for kernels and initramfs images, overridable by
# VUBD_LAB_CACHE. The default lives under target/, which git ignores.
lab_cache_dir() { printf '%s\n' "${VUBD_LAB_CACHE:-$(lab_repo_root)/target/lab}"; }

# Runs `apt-get update` at most once per process tree: the exported marker
# keeps child lab scripts from repeating it.
lab_apt_update() {
    [[ ${VUBD_LAB_APT_UPDATED:-} == 1 ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found: this lab needs a Debian-like host (or install the packages by hand)"
    [[ $EUID -eq 0 ]] || die "apt-get update needs root; install the missing packages by hand"
    log "running apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    export VUBD_LAB_APT_UPDATED=1
}

# lab_apt_install PKG...: installs Debian packages, failing loudly.
lab_apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "cannot install '$*': apt-get not found (install it by hand)"
    [[ $EUID -eq 0 ]] || die "cannot install '$*': not root (install it by hand)"
    lab_apt_update
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2 ||
        die "apt-get install $* failed"
}

# lab_need_cmd CMD PKG: makes sure CMD is on PATH, installing PKG when not.
lab_need_cmd() {
    local cmd=$1 pkg=$2
    command -v "$cmd" >/dev/null 2>&1 && return 0
    log "'$cmd' not found, installing package $pkg"
    lab_apt_install "$pkg"
    command -v "$cmd" >/dev/null 2>&1 ||
        die "package $pkg is installed but '$cmd' is still not on PATH"
}

# Sets KERNEL_VERSION, VMLINUZ and MODULES_DIR from fetch-kernel.sh run on
# the lab cache (a no-op fetch once the cache is filled).
lab_load_kernel() {
    local out
    out=$("$(dirname "${BASH_SOURCE[0]}")/fetch-kernel.sh" "$(lab_cache_dir)") ||
        die "cannot get a kernel (fetch-kernel.sh failed)"
    # shellcheck disable=SC2034 # set for the caller
    KERNEL_VERSION='' VMLINUZ='' MODULES_DIR=''
    eval "$out"
    [[ -f $VMLINUZ && -d $MODULES_DIR ]] || die "fetch-kernel.sh gave no usable kernel"
}
