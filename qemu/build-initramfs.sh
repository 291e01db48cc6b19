#!/usr/bin/env bash
# Builds a small gzip-compressed cpio initramfs for the QEMU guest lab: a
# static busybox, a few kernel modules with their dependencies, an /init
# that runs one guest script and powers the guest off.
#
# Usage: build-initramfs.sh --output FILE [options]
#
#   --output FILE        where to write the .cpio.gz (required)
#   --modules-dir DIR    the kernel's lib/modules/<version> directory; by
#                        default fetch-kernel.sh is run on the lab cache
#                        ($VUBD_LAB_CACHE, default target/lab) to get one
#   --script FILE        guest script, installed as /test.sh and run by
#                        /init (with /bin/sh); without it /init starts an
#                        interactive shell on the console instead
#   --add SRC:DEST       copy host file or directory SRC to DEST (an
#                        absolute path) in the initramfs; repeatable
#   --bin PATH[:DEST]    copy the program PATH to DEST (default
#                        /usr/bin/NAME) with the shared libraries `ldd`
#                        lists for it, each at the path ldd names, the
#                        program loader included (symbolic links are
#                        followed: the guest gets plain files); a static
#                        program is copied alone; repeatable. The copy
#                        loses its debugging sections (strip
#                        --strip-debug; symbols stay): debug builds are
#                        large, and the guest unpacks them under TCG
#   --keep-debug         copy --bin programs whole
#   --module NAME        also include module NAME (and what it depends on);
#                        repeatable; the guest can load it with modprobe
#   --load NAME          include module NAME and load it at boot; repeatable
#   -h, --help           show this help
#
# Always included: virtio_pci virtio_blk virtio_net configfs (loaded at
# boot) and nvme nvme-tcp nvmet nvmet-tcp null_blk vfio vfio_iommu_type1
# vfio-pci crc32c_generic (for modprobe in the guest). Modules that
# the kernel has built in are skipped; unknown names are an error.
# Compressed modules (.ko.xz/.ko.zst/.ko.gz) are stored decompressed, since
# busybox insmod cannot read them.
#
# The guest's /init prints the test script's output on the serial console
# and ends with one of these lines, which run-guest.sh looks for:
#   GUEST-RESULT: PASS
#   GUEST-RESULT: FAIL rc=N     (N: the script's exit status; 125 when a
#                                boot module failed to load)
# Kernel command line words of the form NAME=VALUE (no dot in NAME) reach
# /init, and so the script, as environment variables.
set -euo pipefail

LAB_PROG=build-initramfs.sh
# shellcheck source=qemu/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

output='' moddir='' script='' keep_debug=0
adds=() bins=()
boot_modules=(virtio_pci virtio_blk virtio_net configfs)
extra_modules=(nvme nvme-tcp nvmet nvmet-tcp null_blk vfio vfio_iommu_type1 vfio-pci crc32c_generic)
need_value() { [[ $2 -ge 2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --output) need_value "$1" $#; output=$2; shift 2 ;;
        --modules-dir) need_value "$1" $#; moddir=$2; shift 2 ;;
        --script) need_value "$1" $#; script=$2; shift 2 ;;
        --add) need_value "$1" $#; adds+=("$2"); shift 2 ;;
        --bin) need_value "$1" $#; bins+=("$2"); shift 2 ;;
        --keep-debug) keep_debug=1; shift ;;
        --module) need_value "$1" $#; extra_modules+=("$2"); shift 2 ;;
        --load) need_value "$1" $#; boot_modules+=("$2"); shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unexpected argument '$1' (see --help)" ;;
    esac
done
[[ -n $output ]] || die "--output is required (see --help)"
[[ -z $script || -f $script ]] || die "guest script '$script' not found"
for a in "${adds[@]}"; do
    [[ $a == *:/* ]] || die "--add '$a': expected SRC:DEST with an absolute DEST"
    [[ -e ${a%:*} ]] || die "--add '$a': '${a%:*}' not found"
done
for b in "${bins[@]}"; do
    src=${b%%:*}
    [[ -f $src && -x $src ]] || die "--bin '$b': '$src' is not an executable file"
    [[ $b != *:* || ${b#*:} == /* ]] || die "--bin '$b': DEST must be an absolute path"
done

if [[ -z $moddir ]]; then
    lab_load_kernel
    moddir=$MODULES_DIR
fi
[[ -f $moddir/modules.dep ]] ||
    die "'$moddir' has no modules.dep; pass a lib/modules/<version> directory (after depmod)"
kver=$(basename "$moddir")

lab_need_cmd cpio cpio
[[ ${#bins[@]} -eq 0 || $keep_debug -eq 1 ]] || lab_need_cmd strip binutils
lab_need_cmd gzip gzip
# The initramfs has no libc, so busybox must be linked statically: the one
# from busybox-static is; the one from the "busybox" package is not.
busybox=/bin/busybox
is_static() { [[ -x $1 ]] && ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
is_static "$busybox" || lab_apt_install busybox-static
is_static "$busybox" || die "$busybox is missing or dynamically linked even after installing busybox-static"

staging=$(mktemp -d "${TMPDIR:-/tmp}/initramfs.XXXXXX")
trap 'rm -rf "$staging"' EXIT

# --- busybox ---------------------------------------------------------------
mkdir -p "$staging"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc/lab,root,mnt}
cp "$busybox" "$staging/bin/busybox"
while read -r applet; do
    [[ $applet == */* && ! -e $staging/$applet ]] || continue
    [[ -d $staging/${applet%/*} ]] || mkdir -p "$staging/${applet%/*}"
    ln -s /bin/busybox "$staging/$applet"
done < <("$busybox" --list-full)
[[ -L $staging/bin/sh && -L $staging/sbin/insmod && -L $staging/sbin/poweroff ]] ||
    die "$busybox lacks sh, insmod or poweroff"

# --- kernel modules --------------------------------------------------------
# norm PATH_OR_NAME: sets REPLY to the module name with '-' as '_'.
norm() { REPLY=${1##*/}; REPLY=${REPLY%%.ko*}; REPLY=${REPLY//-/_}; }

declare -A path_of=() deps_of=()
while IFS= read -r line; do
    mod=${line%%:*}
    norm "$mod"
    path_of[$REPLY]=$mod
    deps_of[$mod]=${line#*:}
done <"$moddir/modules.dep"
declare -A builtin=()
if [[ -f $moddir/modules.builtin ]]; then
    while IFS= read -r line; do norm "$line"; builtin[$REPLY]=1; done <"$moddir/modules.builtin"
fi

declare -A included=()   # module path -> 1
load_order=()            # paths of modules insmod'ed at boot, in order
include_order=()         # every included module path, in a loadable order

# add_module NAME BOOT: includes NAME and its dependencies; BOOT=1 also
# queues them for loading at boot.
declare -A queued=()
add_module() {
    local name path
    norm "$1"
    name=$REPLY
    path=${path_of[$name]:-}
    if [[ -z $path ]]; then
        if [[ -n ${builtin[$name]:-} ]]; then
            log "module $1 is built into $kver, skipping"
            return 0
        fi
        die "module '$1' not found in $moddir (neither loadable nor built in)"
    fi
    # modules.dep lists dependencies so that loading them in reverse
    # order works (as modprobe does).
    local -a deps
    read -r -a deps <<<"${deps_of[$path]}"
    local i
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
        add_path "${deps[i]}" "$2"
    done
    add_path "$path" "$2"
}
add_path() {
    if [[ -z ${included[$1]:-} ]]; then
        included[$1]=1
        include_order+=("$1")
    fi
    if [[ $2 == 1 && -z ${queued[$1]:-} ]]; then
        queued[$1]=1
        load_order+=("$1")
    fi
}
for m in "${boot_modules[@]}"; do add_module "$m" 1; done
for m in "${extra_modules[@]}"; do add_module "$m" 0; done

# Store modules decompressed (.ko) under the same relative paths.
kodir=$staging/lib/modules/$kver
mkdir -p "$kodir"
ko_path() { printf '%s.ko\n' "${1%%.ko*}"; }
for path in "${include_order[@]}"; do
    src=$moddir/$path
    dst=$kodir/$(ko_path "$path")
    mkdir -p "$(dirname "$dst")"
    case $path in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz) lab_need_cmd xz xz-utils; xz -dc "$src" >"$dst" ;;
        *.ko.zst) lab_need_cmd zstd zstd; zstd -qdc "$src" >"$dst" ;;
        *.ko.gz) gzip -dc "$src" >"$dst" ;;
        *) die "unsupported module file '$path'" ;;
    esac || die "cannot copy module $path"
done

# A modules.dep (and the matching aliases) restricted to what is included,
# so busybox modprobe works in the guest, also when the kernel itself asks
# for a module such as crypto-crc32c.
{
    for path in "${include_order[@]}"; do
        printf '%s:' "$(ko_path "$path")"
        read -r -a deps <<<"${deps_of[$path]}"
        for d in "${deps[@]}"; do printf ' %s' "$(ko_path "$d")"; done
        printf '\n'
    done
} >"$kodir/modules.dep"
if [[ -f $moddir/modules.alias ]]; then
    names=$(for path in "${include_order[@]}"; do norm "$path"; echo "$REPLY"; done)
    awk -v names="$names" '
        BEGIN { n = split(names, a, "\n"); for (i = 1; i <= n; i++) keep[a[i]] = 1 }
        $1 == "alias" && ($3 in keep)
    ' "$moddir/modules.alias" >"$kodir/modules.alias"
fi
[[ -f $moddir/modules.builtin ]] && cp "$moddir/modules.builtin" "$kodir/"
for path in "${load_order[@]}"; do
    printf '/lib/modules/%s/%s\n' "$kver" "$(ko_path "$path")"
done >"$staging/etc/lab/modules.load"
log "kernel $kver: ${#include_order[@]} modules included, ${#load_order[@]} loaded at boot"

# --- payload ---------------------------------------------------------------
if [[ -n $script ]]; then
    cp "$script" "$staging/test.sh"
    chmod 0755 "$staging/test.sh"
fi
for a in "${adds[@]}"; do
    src=${a%:*} dest=${a##*:}
    mkdir -p "$staging$(dirname "$dest")"
    cp -a "$src" "$staging$dest"
done

# --- programs and their shared libraries ----------------------------------
# ldd prints "NAME => /path (0x...)" for each library, "/path (0x...)" for
# the loader and "NAME (0x...)" for the vDSO; a static program makes it
# print "not a dynamic executable" (glibc) or "statically linked" and fail.
add_file() { # SRC DEST: copies the contents, through symbolic links.
    [[ -e $staging$2 ]] && return 0
    mkdir -p "$staging$(dirname "$2")"
    cp -L "$1" "$staging$2" || die "cannot copy $1 to $2"
}
for b in "${bins[@]}"; do
    src=${b%%:*} dest=/usr/bin/$(basename "${b%%:*}")
    [[ $b == *:* ]] && dest=${b#*:}
    rm -f "$staging$dest"   # a busybox applet of the same name gives way
    add_file "$src" "$dest"
    if [[ $keep_debug -eq 0 ]]; then
        strip --strip-debug "$staging$dest" || die "strip --strip-debug $src failed"
    fi
    if ! libs=$(LC_ALL=C ldd "$src" 2>&1); then
        [[ $libs == *'not a dynamic executable'* || $libs == *'statically linked'* ]] ||
            die "--bin $src: ldd failed: $libs"
        log "$src is static: copied alone to $dest"
        continue
    fi
    n=0
    while read -r first arrow path _; do
        lib=''
        if [[ $arrow == '=>' ]]; then
            [[ $path == /* ]] || die "--bin $src: ldd cannot find $first ($path)"
            lib=$path
        elif [[ $first == /* ]]; then
            lib=$first
        fi
        [[ -n $lib ]] || continue
        add_file "$lib" "$lib"
        n=$((n + 1))
    done <<<"$libs"
    log "$src copied to $dest with $n shared object(s)"
done

# --- /init -----------------------------------------------------------------
cat >"$staging/init" <<'INIT'
#!/bin/sh
# /init of the QEMU guest lab: mounts the basics, loads the boot modules,
# runs /test.sh and powers off. The host reads the GUEST-RESULT line.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null

finish() {
    sync
    echo "GUEST-RESULT: $1"
    poweroff -f
    # Should poweroff fail, a panic (panic=-1, QEMU -no-reboot) ends the VM.
    echo o >/proc/sysrq-trigger
    exit 1
}

failed=''
while read -r ko; do
    insmod "$ko" || failed="$failed ${ko##*/}"
done </etc/lab/modules.load
if [ -n "$failed" ]; then
    echo "init: cannot load boot modules:$failed"
    finish "FAIL rc=125"
fi
if [ -d /sys/kernel/config ]; then
    mount -t configfs configfs /sys/kernel/config
fi

if [ -f /test.sh ]; then
    echo "init: running /test.sh on $(uname -r), $(nproc) CPU(s)"
    /bin/sh /test.sh
    rc=$?
else
    echo "init: no /test.sh, starting a shell (its exit status is the result)"
    setsid cttyhack sh
    rc=$?
fi
if [ "$rc" -eq 0 ]; then finish PASS; else finish "FAIL rc=$rc"; fi
INIT
chmod 0755 "$staging/init"

# --- archive ---------------------------------------------------------------
mkdir -p "$(dirname "$output")"
(cd "$staging" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet) |
    gzip -6 >"$output.tmp" || die "cannot write $output"
mv "$output.tmp" "$output"
log "wrote $output ($(du -h "$output" | cut -f1))"
