#!/usr/bin/env bash
# Installs the Debian packages into a clean Debian container and checks them:
# both binaries run, the system users exist, config, unit and doc files are at
# their documented paths, nothing is enabled or started; then `apt remove`
# keeps state and config and `apt purge` deletes them, as
# deploy/debian/*/postrm document.
#
#   deploy/build-debs.sh              # target/debian/*.deb
#   deploy/docker/test-debs.sh [--deb-dir target/debian] [--image rollout-vm:bookworm]
#
# The container is a fresh one of the VM image (deploy/docker/build-vm-image.sh,
# built when missing) with --network none: the packages must install offline,
# their dependencies being part of a minimal Debian system. Exit 0 when every
# check passed; each failed check is printed.
set -euo pipefail

readonly PROG=test-debs.sh
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
deb_dir="$SCRIPT_DIR/../../target/debian"
image=rollout-vm:bookworm

usage() {
  sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --deb-dir) [ $# -ge 2 ] || usage; deb_dir=$2; shift 2 ;;
    --image) [ $# -ge 2 ] || usage; image=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) printf '%s: unknown argument %s\n' "$PROG" "$1" >&2; usage ;;
  esac
done

[ -d "$deb_dir" ] || die "no $deb_dir: build the packages first (deploy/build-debs.sh)"
deb_dir=$(cd "$deb_dir" && pwd)
newest() {
  # The most recently built package of that name.
  find "$deb_dir" -maxdepth 1 -name "$1_*.deb" -printf '%T@ %f\n' | sort -n | tail -n 1 | cut -d' ' -f2-
}
agent_deb=$(newest rollout-agent)
coordinator_deb=$(newest rollout-coordinator)
if [ -z "$agent_deb" ] || [ -z "$coordinator_deb" ]; then
  die "rollout-agent_*.deb or rollout-coordinator_*.deb missing in $deb_dir: run deploy/build-debs.sh"
fi

bash "$SCRIPT_DIR/build-vm-image.sh" --tag "$image" >/dev/null

echo "$PROG: installing $agent_deb and $coordinator_deb into a clean $image container (no network)"
# The checks run inside; the package names are passed as arguments.
docker run --rm -i --network none -v "$deb_dir:/debs:ro" \
  --label rollout-test-debs=1 "$image" bash -s -- "$agent_deb" "$coordinator_deb" <<'CHECKS'
set -uo pipefail
agent_deb=$1
coordinator_deb=$2
failed=0
ok() { printf '  ok: %s\n' "$*"; }
fail() {
  printf '  FAILED: %s\n' "$*"
  failed=1
}
check() {
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then ok "$what"; else fail "$what"; fi
}
mode_owner() { stat -c '%a %U' "$1" 2>/dev/null; }

cd /debs
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y "/debs/$agent_deb" "/debs/$coordinator_deb" >/tmp/apt.log 2>&1; then
  cat /tmp/apt.log
  echo "FAILED: apt-get install /debs/$agent_deb /debs/$coordinator_deb"
  exit 1
fi
ok "apt-get install /debs/$agent_deb /debs/$coordinator_deb"

check "rollout-agent --version" rollout-agent --version
check "rollout --version" rollout --version
check "rollout-agent --help" rollout-agent --help
check "rollout --help" rollout --help
echo "  $(rollout-agent --version), $(rollout --version)"
for f in /usr/bin/rollout-agent /usr/bin/rollout; do
  check "$f is executable" test -x "$f"
done
check "system user rollout-svc (services run as it)" getent passwd rollout-svc
check "system user rollout (the coordinator runs as it)" getent passwd rollout
for u in rollout-svc rollout; do
  shell=$(getent passwd "$u" | cut -d: -f7)
  uid=$(id -u "$u" 2>/dev/null || echo 0)
  if [ "$shell" = /usr/sbin/nologin ] && [ "$uid" -gt 0 ] && [ "$uid" -lt 1000 ]; then
    ok "$u: system uid $uid, no login shell"
  else
    fail "$u: uid $uid shell $shell"
  fi
done
[ "$(mode_owner /var/lib/rollout)" = "700 root" ] && ok "/var/lib/rollout 0700 root" ||
  fail "/var/lib/rollout: $(mode_owner /var/lib/rollout)"
[ "$(mode_owner /var/lib/rollout-coordinator)" = "700 rollout" ] &&
  ok "/var/lib/rollout-coordinator 0700 rollout" ||
  fail "/var/lib/rollout-coordinator: $(mode_owner /var/lib/rollout-coordinator)"
check "/etc/rollout exists" test -d /etc/rollout
unit_dir=""
for d in /lib/systemd/system /usr/lib/systemd/system; do
  [ -f "$d/rollout-agent.service" ] && unit_dir=$d
done
if [ -n "$unit_dir" ]; then
  ok "units in $unit_dir"
  check "rollout-coordinator.service" test -f "$unit_dir/rollout-coordinator.service"
  check "rollout-agent.service runs /etc/rollout/agent.toml" \
    grep -q '^ExecStart=rollout-agent run --config /etc/rollout/agent.toml' "$unit_dir/rollout-agent.service"
else
  fail "no rollout-agent.service in /lib/systemd/system or /usr/lib/systemd/system"
fi
check "units not enabled" bash -c '! ls /etc/systemd/system/*.wants/rollout-* 2>/dev/null | grep -q .'
for f in \
  /usr/share/doc/rollout-agent/README.Debian \
  /usr/share/doc/rollout-agent/examples/agent.toml \
  /usr/share/doc/rollout-coordinator/README.Debian \
  /usr/share/doc/rollout-coordinator/examples/coordinator.toml \
  /usr/share/doc/rollout-coordinator/examples/web.toml \
  /usr/share/man/man1/rollout-agent.1.gz \
  /usr/share/man/man1/rollout.1.gz \
  /usr/share/bash-completion/completions/rollout-agent \
  /usr/share/bash-completion/completions/rollout \
  /usr/share/zsh/vendor-completions/_rollout \
  /usr/share/fish/vendor_completions.d/rollout.fish; do
  check "$f" test -s "$f"
done
# The packaged example config is valid for the packaged agent's config parser
# up to the host-specific parts: it names the documented paths.
check "example agent.toml names /var/lib/rollout" \
  grep -q '/var/lib/rollout' /usr/share/doc/rollout-agent/examples/agent.toml

# State and config the operator made: kept by remove, deleted by purge.
echo 'host = "x"' >/etc/rollout/agent.toml
echo 'listen = "0.0.0.0:7443"' >/etc/rollout/coordinator.toml
touch /var/lib/rollout/state /var/lib/rollout-coordinator/state
if apt-get remove -y rollout-agent rollout-coordinator >/tmp/apt.log 2>&1; then
  ok "apt remove"
else
  cat /tmp/apt.log
  fail "apt remove"
fi
check "remove: /usr/bin/rollout-agent gone" test ! -e /usr/bin/rollout-agent
check "remove: /usr/bin/rollout gone" test ! -e /usr/bin/rollout
check "remove: agent state kept" test -e /var/lib/rollout/state
check "remove: coordinator state kept" test -e /var/lib/rollout-coordinator/state
check "remove: agent.toml kept" test -e /etc/rollout/agent.toml
if apt-get purge -y rollout-agent rollout-coordinator >/tmp/apt.log 2>&1; then
  ok "apt purge"
else
  cat /tmp/apt.log
  fail "apt purge"
fi
check "purge: /var/lib/rollout deleted" test ! -e /var/lib/rollout
check "purge: /var/lib/rollout-coordinator deleted" test ! -e /var/lib/rollout-coordinator
check "purge: agent.toml deleted" test ! -e /etc/rollout/agent.toml
check "purge: coordinator.toml (the operator's) kept" test -e /etc/rollout/coordinator.toml
check "purge: no package files left" bash -c '! dpkg -S /usr/bin/rollout-agent /usr/bin/rollout 2>/dev/null'
exit "$failed"
CHECKS
echo "$PROG: all checks passed"
