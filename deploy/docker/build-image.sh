#!/bin/sh
# Builds the test image of rollout from scratch: no base image is pulled.
#
#   deploy/docker/build-image.sh [--bin-dir target/debug] [--tag rollout-test:latest]
#
# The root filesystem holds busybox-static (and a link per applet), the shared
# libraries `ldd` lists for rollout, rollout-agent and sample-service, those
# three binaries in /usr/local/bin, /etc/passwd (root, nobody), /etc/group,
# /etc/nsswitch.conf and /tmp. It is tarred and `docker import`ed with
# ENTRYPOINT ["/bin/sh"]. Runs as root (it may `apt-get install busybox-static`).
# Idempotent: the same binaries give the same image content; the previous image
# of the tag is removed when nothing uses it. Prints the tag on stdout; progress
# goes to stderr. See deploy/docker/README.md.
set -eu

BIN_DIR=target/debug
TAG=rollout-test:latest
BINARIES="rollout rollout-agent sample-service"

usage() {
    echo "usage: $0 [--bin-dir DIR] [--tag NAME:TAG]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) [ $# -ge 2 ] || usage; BIN_DIR=$2; shift 2 ;;
        --bin-dir=*) BIN_DIR=${1#*=}; shift ;;
        --tag) [ $# -ge 2 ] || usage; TAG=$2; shift 2 ;;
        --tag=*) TAG=${1#*=}; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done

log() { echo "build-image: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
for b in $BINARIES; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: run \`cargo build --workspace\` first"
done

# busybox-static: a static busybox at /bin/busybox.
is_static_busybox() {
    [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1
}
if ! is_static_busybox; then
    log "installing busybox-static"
    [ "$(id -u)" -eq 0 ] || die "busybox-static is missing and this is not root: apt-get install busybox-static"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2; then
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends busybox-static >&2
    fi
    is_static_busybox || die "/bin/busybox is still not a static binary"
fi

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/rollout-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT INT TERM

log "assembling the root filesystem in $ROOTFS"
for d in bin sbin usr/bin usr/sbin usr/local/bin etc root tmp var/lib var/tmp proc sys dev run; do
    mkdir -p "$ROOTFS/$d"
done
chmod 1777 "$ROOTFS/tmp" "$ROOTFS/var/tmp"
chmod 0700 "$ROOTFS/root"

cp /bin/busybox "$ROOTFS/bin/busybox"
for applet in $(/bin/busybox --list); do
    [ -e "$ROOTFS/bin/$applet" ] || ln -s busybox "$ROOTFS/bin/$applet"
done
for must in sh kill sleep cat df dd wget ps; do
    [ -e "$ROOTFS/bin/$must" ] || die "busybox has no $must applet"
done

# The shared libraries each binary needs, at the path the loader expects.
copy_lib() {
    src=$1
    [ -e "$ROOTFS$src" ] && return 0
    mkdir -p "$ROOTFS$(dirname "$src")"
    cp -L "$src" "$ROOTFS$src"
}
for b in $BINARIES; do
    # Lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
    libs=$(ldd "$BIN_DIR/$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    for lib in $libs; do
        copy_lib "$lib"
    done
    cp "$BIN_DIR/$b" "$ROOTFS/usr/local/bin/$b"
    # Debug builds carry DWARF line tables; symbols stay (names in backtraces).
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$ROOTFS/usr/local/bin/$b"
    fi
    chmod 0755 "$ROOTFS/usr/local/bin/$b"
done

cat >"$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOTFS/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
echo 'hosts: files dns' >"$ROOTFS/etc/nsswitch.conf"
# Docker bind-mounts its own /etc/hosts, /etc/hostname and /etc/resolv.conf.
: >"$ROOTFS/etc/hosts"
: >"$ROOTFS/etc/hostname"
: >"$ROOTFS/etc/resolv.conf"

OLD_ID=$(docker image inspect -f '{{.Id}}' "$TAG" 2>/dev/null || true)

log "importing as $TAG"
# Fixed owners, order and times: the same binaries give the same layer.
NEW_ID=$(tar -C "$ROOTFS" --sort=name --owner=0 --group=0 --numeric-owner \
        --mtime='2000-01-01 00:00:00Z' -c . |
    docker import \
        --change 'ENTRYPOINT ["/bin/sh"]' \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin' \
        --change 'WORKDIR /' \
        --change 'LABEL org.opencontainers.image.title=rollout-test' \
        --message "rollout test image from $BIN_DIR" \
        - "$TAG")
log "imported $NEW_ID"

if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$NEW_ID" ]; then
    # The tag moved; drop the old image unless a container still uses it.
    docker image rm "$OLD_ID" >/dev/null 2>&1 || true
fi

version=$(docker run --rm --network none "$TAG" -c 'rollout-agent --version') ||
    die "the image does not run rollout-agent --version"
log "checked: $version"
echo "$TAG"
