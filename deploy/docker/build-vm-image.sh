#!/usr/bin/env bash
# Builds a clean Debian "VM" image from scratch: a debootstrapped bookworm
# userland (variant minbase, plus adduser), nothing of rollout in it. The
# install tests copy the agent binary and deploy/install-agent.sh into a
# container of it, as an operator would onto a fresh VM, and install the
# .deb packages into it.
#
#   deploy/docker/build-vm-image.sh [--tag rollout-vm:bookworm] [--mirror URL]
#                                   [--suite bookworm] [--rebuild]
#
# Idempotent: an existing image with the tag is reused unless --rebuild. Runs
# as root (debootstrap; it is apt-get installed when missing). The mirror
# defaults to the first Debian mirror this machine's apt sources name, else
# http://deb.debian.org/debian. Prints the tag on stdout; progress goes to
# stderr. See deploy/docker/README.md.
set -euo pipefail

readonly PROG=build-vm-image.sh
tag=rollout-vm:bookworm
suite=bookworm
mirror=""
rebuild=0

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --tag) [ $# -ge 2 ] || usage; tag=$2; shift 2 ;;
    --tag=*) tag=${1#*=}; shift ;;
    --mirror) [ $# -ge 2 ] || usage; mirror=$2; shift 2 ;;
    --mirror=*) mirror=${1#*=}; shift ;;
    --suite) [ $# -ge 2 ] || usage; suite=$2; shift 2 ;;
    --suite=*) suite=${1#*=}; shift ;;
    --rebuild) rebuild=1; shift ;;
    -h | --help) usage 0 ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

if [ "$rebuild" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  log "reusing $tag (--rebuild builds it again)"
  echo "$tag"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root: run as root (sudo $0)"
if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  if ! apt-get install -y -qq --no-install-recommends debootstrap >&2; then
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends debootstrap >&2
  fi
fi

# The mirror apt uses here (deb822 "URIs:" or one-line "deb URL suite ...").
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
    /etc/apt/sources.list.d/*.sources 2>/dev/null |
    awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }
         /^deb / { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' |
    grep -E '/debian/?$' | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/rollout-vm-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT INT TERM

log "debootstrap --variant=minbase $suite from $mirror (a minute or two)"
started=$SECONDS
# adduser: the .deb packages depend on it (their postinst creates users).
debootstrap --variant=minbase --include=adduser "$suite" "$rootfs" "$mirror" >&2 ||
  die "debootstrap failed (see above); is $mirror reachable? pass --mirror URL"

# A container gets its own /etc/hosts, /etc/hostname and /etc/resolv.conf.
: >"$rootfs/etc/hostname"
# No downloaded package lists or cached .debs in the image: apt works offline
# only on local files (apt install ./x.deb), like on a freshly installed VM.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb

old_id=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
log "importing as $tag"
new_id=$(tar -C "$rootfs" --numeric-owner -c . |
  docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'WORKDIR /root' \
    --change "LABEL org.opencontainers.image.title=rollout-vm org.opencontainers.image.version=$suite" \
    --message "clean Debian $suite (debootstrap minbase) for rollout's install tests" \
    - "$tag")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  docker image rm "$old_id" >/dev/null 2>&1 || true
fi
docker run --rm --network none "$tag" bash -c 'command -v adduser useradd apt >/dev/null' ||
  die "the image lacks bash, adduser, useradd or apt"
log "built $tag in $((SECONDS - started)) s"
echo "$tag"
