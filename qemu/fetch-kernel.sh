#!/usr/bin/env bash
# Fetches a Debian kernel image and its modules into a cache directory,
# without installing anything into /boot or /lib/modules.
#
# Usage: fetch-kernel.sh [--refresh] [--package NAME] CACHE_DIR
#
# Resolves the metapackage (default linux-image-amd64) to the versioned
# package it depends on (linux-image-<ver>-amd64, possibly -unsigned),
# downloads it with `apt-get download` into CACHE_DIR/debs, unpacks it with
# `dpkg-deb -x` into CACHE_DIR/root and runs depmod there (the package
# itself ships no modules.dep). A later run reuses the cache;
# --refresh resolves the metapackage again (e.g. after a kernel update).
#
# On success prints shell assignments on stdout (also kept in
# CACHE_DIR/kernel.env):
#   KERNEL_VERSION=6.1.0-NN-amd64
#   VMLINUZ=CACHE_DIR/root/boot/vmlinuz-<ver>
#   MODULES_DIR=CACHE_DIR/root/lib/modules/<ver>
set -euo pipefail

LAB_PROG=fetch-kernel.sh
# shellcheck source=qemu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

refresh=0
meta=linux-image-amd64
while [[ $# -gt 0 ]]; do
    case $1 in
        --refresh) refresh=1; shift ;;
        --package) [[ $# -ge 2 ]] || die "--package needs a value"; meta=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || { usage >&2; exit 2; }
mkdir -p "$1" || die "cannot create cache directory '$1'"
cache=$(cd "$1" && pwd)
env_file=$cache/kernel.env

# One fetch at a time per cache; a second run waits, then reuses the result.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/.lock"
    flock 9 || die "cannot lock $cache/.lock"
fi

print_env() {
    printf 'KERNEL_VERSION=%q\nVMLINUZ=%q\nMODULES_DIR=%q\n' "$1" "$2" "$3"
}

# Reuse a complete earlier fetch.
if [[ $refresh -eq 0 && -f $env_file ]]; then
    KERNEL_VERSION='' VMLINUZ='' MODULES_DIR=''
    # shellcheck source=/dev/null
    source "$env_file"
    if [[ -n $KERNEL_VERSION && -f $VMLINUZ && -f $MODULES_DIR/modules.dep ]]; then
        log "reusing kernel $KERNEL_VERSION from $cache"
        print_env "$KERNEL_VERSION" "$VMLINUZ" "$MODULES_DIR"
        exit 0
    fi
    log "cache in $cache is incomplete, fetching again"
fi

lab_need_cmd apt-get apt
lab_need_cmd apt-cache apt
lab_need_cmd dpkg-deb dpkg
lab_need_cmd depmod kmod

# Package lists are empty on a fresh machine: update once if the
# metapackage is unknown.
if ! apt-cache show "$meta" >/dev/null 2>&1; then
    lab_apt_update
    apt-cache show "$meta" >/dev/null 2>&1 ||
        die "package '$meta' is unknown to apt even after apt-get update"
fi

# Follows the metapackage's Depends to a package that carries a kernel
# image, i.e. one named linux-image-<digit>... (signed or -unsigned).
resolve() {
    local pkg=$1 depth=0 next
    while [[ ! $pkg =~ ^linux-image-[0-9] ]]; do
        ((depth += 1))
        [[ $depth -le 3 ]] || die "gave up resolving '$1': dependency chain too deep"
        # Real (non-virtual) dependencies only; alternatives start with '|'.
        next=$(apt-cache depends --important "$pkg" 2>/dev/null |
            awk '$1 ~ /^\|?Depends:$/ && $2 ~ /^linux-image-/ { print $2; exit }')
        [[ -n $next ]] || die "'$pkg' has no linux-image-* dependency; cannot find the kernel package"
        pkg=$next
    done
    printf '%s\n' "$pkg"
}
pkg=$(resolve "$meta")
version=$(apt-cache policy "$pkg" | awk '$1 == "Candidate:" { print $2 }')
[[ -n $version && $version != "(none)" ]] ||
    die "package '$pkg' (needed by $meta) has no installable candidate"
log "$meta resolves to $pkg $version"

mkdir -p "$cache/debs"
# apt writes an epoch's colon as %3a in file names.
find_deb() { find "$cache/debs" -maxdepth 1 -name "${pkg}_${version//:/%3a}_*.deb" -print -quit; }
deb=$(find_deb)
if [[ -z $deb ]]; then
    apt_opts=(-q)
    # As root apt drops to the _apt user and warns when that user cannot
    # write the target directory; the download itself is the same.
    [[ $EUID -eq 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
    log "downloading $pkg=$version"
    (cd "$cache/debs" && apt-get "${apt_opts[@]}" download "$pkg=$version" >&2) ||
        die "apt-get download $pkg=$version failed"
    deb=$(find_deb)
    [[ -n $deb ]] || die "apt-get download succeeded but no ${pkg}_${version}_*.deb is in $cache/debs"
fi

log "unpacking $(basename "$deb")"
rm -rf "$cache/root.tmp"
dpkg-deb -x "$deb" "$cache/root.tmp" || die "dpkg-deb -x $deb failed"

# Debian's postinst generates modules.dep with depmod; do the same here.
# depmod -b looks under BASE/lib/modules, so point lib at usr/lib when the
# package only has the /usr-merged layout.
if [[ ! -e $cache/root.tmp/lib && -d $cache/root.tmp/usr/lib/modules ]]; then
    ln -s usr/lib "$cache/root.tmp/lib"
fi
vmlinuz=$(find "$cache/root.tmp/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
[[ -n $vmlinuz ]] || die "$(basename "$deb") has no boot/vmlinuz-*; is '$pkg' really a kernel image?"
kver=${vmlinuz##*/vmlinuz-}
[[ -d $cache/root.tmp/lib/modules/$kver ]] || die "$(basename "$deb") has no modules for $kver"
depmod -b "$cache/root.tmp" "$kver" || die "depmod for $kver failed"
[[ -s $cache/root.tmp/lib/modules/$kver/modules.dep ]] || die "depmod wrote no modules.dep for $kver"
moddir_rel=lib/modules/$kver

rm -rf "$cache/root"
mv "$cache/root.tmp" "$cache/root"
# Packages of earlier kernels are no longer needed.
find "$cache/debs" -maxdepth 1 -name '*.deb' ! -path "$deb" -delete
print_env "$kver" "$cache/root/boot/vmlinuz-$kver" "$cache/root/$moddir_rel" >"$env_file.tmp"
mv "$env_file.tmp" "$env_file"
log "kernel $kver ready in $cache"
cat "$env_file"
