#!/bin/sh
# Make the Dockerfile's Python bases from Debian packages and import them into podman, for machines that reach
# Debian's archive but no container registry:
#
#   sh docker/make-bases.sh [--arch amd64] [--arch arm64] [--binfmt | --no-binfmt] [--prefix NAME] [--force]
#
# Each base is Debian bookworm (minbase) with python3, python3-pip and ca-certificates, made by mmdebstrap and
# imported with `podman import` as localhost/edgekit-base:bookworm-<arch>; it stands in for python:3.11-slim-bookworm
# (the Dockerfile's default PYTHON_BASE): pip installs into the system Python, so Debian's EXTERNALLY-MANAGED marker
# is removed. Both arches are made by default. A base whose label names the same recipe is reused (--force remakes).
#
# A foreign arch (arm64 on x86_64) runs its packages' maintainer scripts through qemu-user, which needs binfmt_misc
# with qemu registered with the F flag (the interpreter is opened at registration, so it works inside chroots).
# --binfmt registers it from qemu-user-static's /usr/lib/binfmt.d/qemu-<arch>.conf where it is missing (root, and
# binfmt_misc mounted or mountable): a machine-wide change, the same as docker's tonistiigi/binfmt --install.
# Without binfmt the base is made with mmdebstrap's `extract` variant instead: the packages' files, no maintainer
# scripts, no shell step possible, so only the Dockerfile's `runtime-cross` target builds on it. --no-binfmt makes
# foreign bases that way even where binfmt is registered (tests/test_containers.py checks that path with it, under
# --prefix localhost/edgekit-base-extract; the images are named PREFIX:bookworm-<arch>).
#
# stdout: one line per base, "<arch> <image> <mode>" (mode: full or extract). Progress and reasons go to stderr.
set -eu

SUITE=bookworm
# libstdc++6 and libgcc-s1 come with minbase (apt needs them); listed for the extract variant, which has only what
# is named and its dependencies: manylinux wheels (numpy, onnxruntime) expect them on the system.
PACKAGES="python3,python3-pip,python-is-python3,ca-certificates,libstdc++6,libgcc-s1"
PREFIX="localhost/edgekit-base"
RECIPE="v1"   # bump when the commands below change, so existing bases are remade

say() { echo "make-bases: $*" >&2; }
die() { say "error: $*"; exit 1; }

ARCHES=""
BINFMT=0
FORCE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) [ $# -ge 2 ] || die "--arch needs amd64 or arm64"; ARCHES="$ARCHES $2"; shift 2 ;;
        --binfmt) BINFMT=1; shift ;;
        --no-binfmt) BINFMT=-1; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs an image name"; PREFIX="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
ARCHES="${ARCHES:-amd64 arm64}"

for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (apt-get install mmdebstrap podman)"
done
case "$(uname -m)" in
    x86_64) HOST=amd64 ;;
    aarch64|arm64) HOST=arm64 ;;
    *) HOST=$(uname -m) ;;
esac

# The machine's Debian mirror when it has one (a proxy or mirror set up there keeps working), else deb.debian.org.
MIRROR=$(sed -n 's/^URIs: *\(http[^ ]*debian\/\?\) *$/\1/p; s/^deb  *\(http[^ ]*debian\/\?\)  *bookworm .*/\1/p' \
         /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n 1)
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
MIRROR="${MIRROR%/}"

qemu_arch() { case "$1" in arm64) echo aarch64 ;; amd64) echo x86_64 ;; *) echo "$1" ;; esac; }

# binfmt_ok ARCH: qemu is registered for ARCH, enabled, with the F flag.
binfmt_ok() {
    entry="/proc/sys/fs/binfmt_misc/qemu-$(qemu_arch "$1")"
    [ -r "$entry" ] && grep -qx enabled "$entry" && grep -q '^flags:.*F' "$entry"
}

register_binfmt() {
    q=$(qemu_arch "$1")
    conf="/usr/lib/binfmt.d/qemu-$q.conf"
    [ -r "$conf" ] || { say "no $conf: apt-get install qemu-user-static"; return 1; }
    [ "$(id -u)" = 0 ] || { say "registering binfmt needs root"; return 1; }
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>&1 | sed 's/^/make-bases: /' >&2 || true
        [ -e /proc/sys/fs/binfmt_misc/register ] || { say "cannot mount binfmt_misc here"; return 1; }
    fi
    if [ -e "/proc/sys/fs/binfmt_misc/qemu-$q" ]; then
        say "qemu-$q is registered without the F flag (or disabled): $(tr '\n' ' ' < "/proc/sys/fs/binfmt_misc/qemu-$q")"
        return 1
    fi
    cat "$conf" > /proc/sys/fs/binfmt_misc/register 2>/dev/null || { say "the kernel refused $conf"; return 1; }
    say "registered $conf with binfmt_misc"
}

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/edgekit-bases.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

for ARCH in $ARCHES; do
    case "$ARCH" in amd64|arm64) ;; *) die "--arch $ARCH: amd64 or arm64" ;; esac
    IMAGE="$PREFIX:$SUITE-$ARCH"
    MODE=full
    if [ "$ARCH" != "$HOST" ] && [ "$BINFMT" = -1 ]; then
        MODE=extract
        say "--no-binfmt: making the $ARCH base without maintainer scripts"
    elif [ "$ARCH" != "$HOST" ] && ! binfmt_ok "$ARCH"; then
        if [ "$BINFMT" = 1 ]; then
            register_binfmt "$ARCH" || true
        fi
        if ! binfmt_ok "$ARCH"; then
            MODE=extract
            say "no qemu binfmt for $ARCH on this machine$([ "$BINFMT" = 1 ] || echo ' (pass --binfmt to register it)'):" \
                "making the $ARCH base without maintainer scripts (RUN steps cannot run on it; build runtime-cross)"
        fi
    fi
    STAMP="$RECIPE;$SUITE;$ARCH;$MODE;$PACKAGES;$MIRROR"
    if [ "$FORCE" = 0 ] && [ "$(podman image inspect --format '{{index .Labels "org.edgekit.base"}}' "$IMAGE" \
            2>/dev/null)" = "$STAMP" ]; then
        say "reusing $IMAGE ($MODE)"
        echo "$ARCH $IMAGE $MODE"
        continue
    fi
    OLD=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
    say "making $IMAGE ($MODE) from $MIRROR"
    start=$(date +%s)
    TAR="$WORK/$ARCH.tar"
    set -- --architectures="$ARCH" --include="$PACKAGES" \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
    if [ "$MODE" = full ]; then
        set -- "$@" --variant=minbase
    else
        set -- "$@" --variant=extract --mode=chrootless
    fi
    mmdebstrap -q "$@" "$SUITE" "$TAR" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
        "deb http://deb.debian.org/debian-security $SUITE-security main" >&2 \
        || die "mmdebstrap failed for $ARCH"
    podman import -q --arch "$ARCH" --os linux \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        --change "LABEL org.edgekit.base=\"$STAMP\"" \
        "$TAR" "$IMAGE" >/dev/null || die "podman import failed for $ARCH"
    rm -f "$TAR"
    # the base this one replaces, once nothing uses it (an image built on it keeps it)
    if [ -n "$OLD" ] && [ "$OLD" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
        podman rmi "$OLD" >/dev/null 2>&1 || true
    fi
    say "made $IMAGE in $(( $(date +%s) - start )) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
    echo "$ARCH $IMAGE $MODE"
done
