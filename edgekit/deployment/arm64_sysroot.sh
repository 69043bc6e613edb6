#!/bin/sh
# Assemble a minimal arm64 (aarch64) Debian bookworm userland with CPython 3.11, to run a Raspberry Pi / Jetson
# bundle's runner on an x86_64 machine under qemu-user, without binfmt_misc and without root for the sysroot:
#
#   sh edgekit/deployment/arm64_sysroot.sh [DEST]        # prints DEST on its last line
#   sh edgekit/deployment/arm64_sysroot.sh --cpu-files DIR   # only DIR/proc/cpuinfo and DIR/sys/.../cpu (see below)
#   qemu-aarch64-static -L DEST DEST/usr/bin/python3.11 -c 'import platform; print(platform.machine())'
#
# DEST defaults to ${EDGEKIT_SYSROOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekit}/arm64-sysroot-bookworm.
# Packages come from Debian's arm64 archive through apt-get with a private state folder (the machine's own dpkg
# architectures and package lists are not touched): apt-get download + dpkg-deb -x, no maintainer scripts run.
# The sysroot is built in a temporary folder and renamed when complete; a complete one is reused (a stamp file
# names the package set). qemu-user-static is apt-installed when missing and this runs as root.
set -eu

PACKAGES="libc6 libgcc-s1 libstdc++6 gcc-12-base zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libcrypt1
libuuid1 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal"
STAMP_TEXT="edgekit arm64 sysroot v2: bookworm: $(echo $PACKAGES)"

CACHE="${EDGEKIT_SYSROOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekit}"
DEST="${1:-$CACHE/arm64-sysroot-bookworm}"
STAMP="$DEST/.edgekit-sysroot"

say() { echo "arm64_sysroot: $*" >&2; }
die() { say "error: $*"; exit 1; }

# A Raspberry Pi 4's CPU description (4x Cortex-A72). qemu-user 7.2 passes /proc/cpuinfo and /sys through from
# the x86 host unless the -L prefix has the file; ONNX Runtime's cpuinfo library parses them as ARM and
# crashes (SIGSEGV) on x86 text. Files under the prefix win, so the emulated programs see an arm64 CPU.
# (also written alone, into a container image's filesystem, by --cpu-files DIR)
fake_cpu() {
    root=$1  # the loop's set -- reuses the positional parameters
    N=4
    mkdir -p "$root/proc" "$root/sys/devices/system/cpu"
    : > "$root/proc/cpuinfo"
    i=0
    while [ $i -lt $N ]; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' \
            $i >> "$root/proc/cpuinfo"
        c="$root/sys/devices/system/cpu/cpu$i"
        mkdir -p "$c/topology" "$c/cpufreq" "$c/cache/index0" "$c/cache/index1" "$c/cache/index2"
        echo 0 > "$c/topology/physical_package_id"; echo 0 > "$c/topology/cluster_id"; echo $i > "$c/topology/core_id"
        for f in cluster_cpus_list core_siblings_list package_cpus_list; do echo "0-$((N - 1))" > "$c/topology/$f"; done
        for f in thread_siblings_list core_cpus_list; do echo $i > "$c/topology/$f"; done
        echo 1500000 > "$c/cpufreq/cpuinfo_max_freq"; echo 600000 > "$c/cpufreq/cpuinfo_min_freq"
        for j in 0 1 2; do
            case $j in 0) set -- 1 Data 32K $i;; 1) set -- 1 Instruction 48K $i;; 2) set -- 2 Unified 1024K "0-$((N - 1))";; esac
            echo "$1" > "$c/cache/index$j/level"; echo "$2" > "$c/cache/index$j/type"
            echo "$3" > "$c/cache/index$j/size"; echo "$4" > "$c/cache/index$j/shared_cpu_list"
        done
        i=$((i + 1))
    done
    printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B (emulated by qemu-user)\n' >> "$root/proc/cpuinfo"
    for f in possible present online; do echo "0-$((N - 1))" > "$root/sys/devices/system/cpu/$f"; done
    echo 255 > "$root/sys/devices/system/cpu/kernel_max"
}

if [ "${1:-}" = "--cpu-files" ]; then
    [ -n "${2:-}" ] || die "--cpu-files needs a folder"
    fake_cpu "$2"
    exit 0
fi

# ---- qemu-user ---------------------------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null 2>&1 && ! command -v qemu-aarch64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing qemu-user-static"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static >&2 || {
            apt-get update -q >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static >&2
        } || die "cannot install qemu-user-static"
    else
        die "qemu-aarch64(-static) not found: run 'apt-get install qemu-user-static' as root"
    fi
fi

# ---- the sysroot -------------------------------------------------------------------------------------------
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ] && [ -x "$DEST/usr/bin/python3.11" ]; then
    say "reusing $DEST"
    echo "$DEST"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "apt-get is needed to fetch Debian's arm64 packages"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is needed to unpack Debian's arm64 packages"

APT_DIR="$CACHE/arm64-apt"
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/debs" "$(dirname "$DEST")"
: > "$APT_DIR/status"
SOURCES="$APT_DIR/sources.list"
# The machine's Debian mirror when it has one (a proxy or mirror set up there keeps working), else deb.debian.org.
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\/\?\) *$/\1/p; s/^deb  *\(http[^ ]*debian\/\?\)  *bookworm .*/\1/p' \
         /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY="http://deb.debian.org/debian-security"
cat > "$SOURCES" <<EOF
deb [arch=arm64] ${MIRROR%/} bookworm main
deb [arch=arm64] ${MIRROR%/} bookworm-updates main
deb [arch=arm64] $SECURITY bookworm-security main
EOF
apt_() {
    apt-get -q -o Dir::State::Lists="$APT_DIR/lists" -o Dir::Cache="$APT_DIR/cache" \
        -o Dir::State::status="$APT_DIR/status" -o Dir::Etc::SourceList="$SOURCES" \
        -o Dir::Etc::SourceParts=/nonexistent -o APT::Architecture=arm64 -o APT::Architectures::=arm64 \
        -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)" "$@"
}
say "fetching Debian bookworm arm64 package lists"
apt_ update >&2 || die "apt-get update for arm64 failed (no network to the Debian archive?)"
say "downloading $(echo $PACKAGES | wc -w) arm64 packages"
(cd "$APT_DIR/debs" && rm -f ./*.deb && apt_ download $PACKAGES >&2) || die "apt-get download failed"

TMP=$(mktemp -d "$DEST.tmp-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
for deb in "$APT_DIR"/debs/*.deb; do
    dpkg-deb -x "$deb" "$TMP"
done
# Debian's merged /usr: the ELF interpreter is /lib/ld-linux-aarch64.so.1, libraries are under /usr/lib.
for d in lib bin sbin; do
    if [ -d "$TMP/$d" ] && [ ! -L "$TMP/$d" ]; then
        mkdir -p "$TMP/usr/$d" && cp -a "$TMP/$d/." "$TMP/usr/$d/" && rm -rf "${TMP:?}/$d"
    fi
    [ -e "$TMP/$d" ] || ln -s "usr/$d" "$TMP/$d"
done
[ -x "$TMP/usr/bin/python3.11" ] || die "python3.11 is missing from the unpacked packages"
ln -sf python3.11 "$TMP/usr/bin/python3"

fake_cpu "$TMP"
echo "$STAMP_TEXT" > "$TMP/.edgekit-sysroot"
chmod 755 "$TMP"
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT
say "built $DEST ($(du -sh "$DEST" | cut -f1))"
echo "$DEST"
