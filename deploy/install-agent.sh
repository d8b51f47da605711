#!/usr/bin/env bash
# Installs, upgrades or removes rollout-agent on a Linux host.
#
#   sudo ./install-agent.sh --coordinator https://coordinator.internal:7443 \
#       --token "$(rollout token create ...)" --ca ca.pem --label role=web
#   sudo ./install-agent.sh                      # again later: upgrade in place
#   sudo ./install-agent.sh --uninstall [--purge]
#
# Run with --help for every option. Idempotent: re-running replaces the binary
# (atomically, with a rename) and restarts the agent, but keeps its state
# (/var/lib/rollout), its config (/etc/rollout/agent.toml) and its certificate.
set -euo pipefail

readonly PROG=install-agent.sh
readonly SERVICE=rollout-agent
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

usage() {
  cat <<EOF
Usage: $PROG [OPTIONS]
       $PROG --uninstall [--purge] [--root DIR] [--prefix DIR]

Installs rollout-agent to PREFIX/bin, creates /etc/rollout and /var/lib/rollout
(mode 0700) and a system user for services, joins the coordinator (only when no
agent certificate exists yet), writes /etc/rollout/agent.toml (kept when it
exists), installs the systemd unit and starts the agent.

Joining (needed once, until /etc/rollout/agent.pem exists):
  --coordinator URL     coordinator address, https://HOST:PORT
  --token TOKEN         one-time join token (rollout token create)
  --ca PATH             the coordinator's CA certificate (ca.pem)
  --host NAME           this host's name (default: $(uname -n))
  --label KEY=VALUE     a label for the coordinator's targets (repeatable);
                        only written into a new agent.toml
  --skip-join           do not join; install only (certificates provided by hand)

Installation:
  --binary PATH         the rollout-agent binary (default: rollout-agent next to
                        this script)
  --unit PATH           the systemd unit (default: systemd/rollout-agent.service
                        next to this script)
  --prefix DIR          install the binary to DIR/bin (default: /usr/local)
  --root DIR            install below DIR instead of / (DESTDIR-style, for
                        images and tests): no users are created and systemctl is
                        never run
  --no-service-user     do not create the 'rollout-svc' user and do not set
                        run_as (services then run as root)
  --no-start            do not enable or (re)start the agent

Removal:
  --uninstall           stop the agent, remove the binary and the unit; keeps
                        /var/lib/rollout and /etc/rollout
  --purge               with --uninstall: also stop the services the agent
                        supervised, delete its state, config and certificate
                        and the user rollout-svc

Without systemd (no /run/systemd/system) no unit is installed and the agent
is neither started nor stopped: the script prints the command to run under
your own supervisor, says when a running agent needs a restart to use a new
binary, warns on --uninstall when an agent still runs, and refuses --purge
until it is stopped.

  -h, --help            this help
EOF
}

log() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

binary="$SCRIPT_DIR/rollout-agent"
unit_src=""
root=""
prefix=/usr/local
coordinator=""
token=""
ca=""
host=""
labels=()
service_user=rollout-svc
create_user=1
start=1
skip_join=0
uninstall=0
purge=0

value_options=" --binary --unit --prefix --root --coordinator --token --ca --host --label "
while [ $# -gt 0 ]; do
  opt=$1
  shift
  inline=0
  case $opt in
    --*=*)
      set -- "${opt#*=}" "$@"
      opt=${opt%%=*}
      inline=1
      ;;
  esac
  value=""
  if [[ $value_options == *" $opt "* ]]; then
    if [ $# -eq 0 ] || [ -z "$1" ]; then
      die "$opt needs a value (see --help)"
    fi
    value=$1
    shift
  elif [ "$inline" = 1 ]; then
    die "$opt takes no value"
  fi
  case $opt in
    --binary) binary=$value ;;
    --unit) unit_src=$value ;;
    --prefix) prefix=$value ;;
    --root) root=$value ;;
    --coordinator) coordinator=$value ;;
    --token) token=$value ;;
    --ca) ca=$value ;;
    --host) host=$value ;;
    --label) labels+=("$value") ;;
    --skip-join) skip_join=1 ;;
    --no-service-user) create_user=0 ;;
    --no-start) start=0 ;;
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
done

[ "$(uname -s)" = Linux ] || die "rollout-agent runs on Linux only"
if [ "$purge" = 1 ] && [ "$uninstall" = 0 ]; then
  die "--purge only goes with --uninstall"
fi
case $prefix in
  /*) prefix=${prefix%/} ;;
  *) die "--prefix must be an absolute path, got $prefix" ;;
esac
if [ -n "$root" ]; then
  [ -d "$root" ] || die "--root $root is not a directory"
  root=$(cd "$root" && pwd)
  [ "$root" = / ] && root=""
fi
# live: acting on this machine (users, systemctl); never under --root.
live=1
[ -n "$root" ] && live=0
if [ "$live" = 1 ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo $PROG ...), or pass --root DIR to install below a directory"
fi

bin_dir="$root$prefix/bin"
installed_bin="$bin_dir/rollout-agent"
etc_dir="$root/etc/rollout"
config="$etc_dir/agent.toml"
data_dir="$root/var/lib/rollout"
unit_file="$root/etc/systemd/system/$SERVICE.service"
# What the installed files call these paths on the host itself.
real_bin="$prefix/bin/rollout-agent"
has_systemd=0
[ -d "$root/run/systemd/system" ] && has_systemd=1

systemctl_live() {
  if [ "$live" = 1 ] && [ "$has_systemd" = 1 ]; then
    systemctl "$@"
  fi
}

# Pids of running agents started from the installed binary (also of one that
# was replaced since: "... (deleted)"). Without systemd the script cannot stop
# or restart them itself: their supervisor is the operator's.
agent_pids() {
  local p exe
  [ "$live" = 1 ] || return 0
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case $exe in
      "$real_bin" | "$real_bin (deleted)") printf '%s\n' "${p#/proc/}" ;;
    esac
  done
}

# Pids of the services the agent supervises: processes of the service user,
# and processes working in the data directory (their release directories;
# readable for root's own processes even without CAP_SYS_PTRACE).
service_pids() {
  local p cwd owner
  [ "$live" = 1 ] || return 0
  for p in /proc/[0-9]*; do
    owner=$(stat -c %U "$p" 2>/dev/null) || continue
    if [ "$create_user" = 1 ] && [ "$owner" = "$service_user" ]; then
      printf '%s\n' "${p#/proc/}"
      continue
    fi
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    case $cwd in
      "$data_dir"/*) printf '%s\n' "${p#/proc/}" ;;
    esac
  done
}

# SIGTERM to each pid, SIGKILL to those still there after 10 s.
stop_pids() {
  local pid left i
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    left=0
    for pid in "$@"; do
      [ -d "/proc/$pid" ] && left=1
    done
    [ "$left" = 0 ] && return 0
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
}

# ---------------------------------------------------------------- uninstall
if [ "$uninstall" = 1 ]; then
  if [ -f "$unit_file" ] && [ "$live" = 1 ] && [ "$has_systemd" = 1 ]; then
    if [ "$purge" = 1 ]; then
      # KillMode=process leaves the supervised services running when the agent
      # stops; a purge deletes their releases, so stop them too.
      systemctl kill --kill-whom=all "$SERVICE" 2>/dev/null || true
    fi
    systemctl disable --now "$SERVICE" 2>/dev/null || true
  fi
  running=$(agent_pids | tr '\n' ' ')
  running=${running% }
  if [ "$purge" = 1 ] && [ -n "$running" ]; then
    die "rollout-agent is still running (pid $running): stop it in its supervisor first, then re-run with --uninstall --purge (nothing was removed)"
  fi
  removed=()
  for f in "$installed_bin" "$unit_file"; do
    if [ -e "$f" ] || [ -L "$f" ]; then
      rm -f "$f"
      removed+=("$f")
    fi
  done
  systemctl_live daemon-reload || true
  if [ "${#removed[@]}" -gt 0 ]; then
    log "removed ${removed[*]}"
  else
    log "rollout-agent was not installed (no $installed_bin, no $unit_file)"
  fi
  if [ -n "$running" ]; then
    warn "rollout-agent is still running (pid $running) from the removed binary: stop it in its supervisor and remove it from there"
  fi
  if [ "$purge" = 1 ]; then
    # Without systemd nothing stopped the services: their release
    # directories are about to go.
    mapfile -t services < <(service_pids)
    if [ "${#services[@]}" -gt 0 ]; then
      stop_pids "${services[@]}"
      log "stopped the services the agent supervised (pid ${services[*]})"
    fi
    case $data_dir in
      */var/lib/rollout) rm -rf "$data_dir" ;;
      *) die "refusing to delete unexpected data directory $data_dir" ;;
    esac
    # Only the agent's files: the coordinator may keep its own in /etc/rollout.
    rm -f "$etc_dir/agent.toml" "$etc_dir/agent.pem" "$etc_dir/agent.key" "$etc_dir/ca.pem"
    rmdir "$etc_dir" 2>/dev/null || true
    if [ "$live" = 1 ] && [ "$create_user" = 1 ] && getent passwd "$service_user" >/dev/null 2>&1; then
      userdel "$service_user" 2>/dev/null || warn "could not remove user $service_user"
    fi
    log "purged $data_dir and the agent's files in $etc_dir"
  else
    log "kept $data_dir (state, releases) and $etc_dir (config, certificate); --uninstall --purge deletes them"
    log "services the agent supervised keep running; reinstalling adopts them"
  fi
  exit 0
fi

# ---------------------------------------------------------------- preflight
# Everything is checked before anything is changed.
[ -f "$binary" ] || die "no rollout-agent binary at $binary; pass --binary PATH"
[ -x "$binary" ] || die "$binary is not executable"
"$binary" --version >/dev/null 2>&1 ||
  die "$binary --version failed: not a rollout-agent binary for this machine?"

if [ -z "$host" ]; then
  host=$(uname -n)
fi
[[ $host =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$ ]] ||
  die "host name '$host' must be 1-128 of A-Z a-z 0-9 . _ - (not starting with '.'); pass --host NAME"
for l in ${labels[@]+"${labels[@]}"}; do
  [[ $l =~ ^[A-Za-z0-9._-]+=[^\"\\]+$ ]] ||
    die "--label '$l' must be KEY=VALUE (key: A-Z a-z 0-9 . _ -; value without quotes or backslashes)"
done
if [ -n "$coordinator" ]; then
  [[ $coordinator =~ ^https://[^\"\\[:space:]]+$ ]] ||
    die "--coordinator must be https://HOST:PORT, got '$coordinator'"
fi

have_cert=0
if [ -s "$etc_dir/agent.pem" ] && [ -s "$etc_dir/agent.key" ]; then
  have_cert=1
fi
join=0
if [ "$have_cert" = 0 ] && [ "$skip_join" = 0 ]; then
  missing=""
  [ -n "$coordinator" ] || missing="$missing, --coordinator URL"
  [ -n "$token" ] || missing="$missing, --token TOKEN"
  [ -n "$ca" ] || missing="$missing, --ca PATH"
  if [ -n "$missing" ]; then
    die "no agent certificate in $etc_dir yet, so the agent must join its coordinator: missing ${missing#, } (create a token on the coordinator with 'rollout token create'; or pass --skip-join and provide agent.pem, agent.key and ca.pem by hand)"
  fi
  [ -f "$ca" ] || die "--ca $ca: no such file"
  join=1
elif [ "$have_cert" = 1 ] && [ -n "$token" ]; then
  log "an agent certificate already exists in $etc_dir: not joining again (remove agent.pem and agent.key to re-join)"
fi

if [ -z "$unit_src" ]; then
  for candidate in "$SCRIPT_DIR/systemd/$SERVICE.service" "$SCRIPT_DIR/$SERVICE.service"; do
    if [ -f "$candidate" ]; then
      unit_src=$candidate
      break
    fi
  done
fi
if [ "$has_systemd" = 1 ]; then
  if [ -z "$unit_src" ] || [ ! -f "$unit_src" ]; then
    die "systemd unit not found (${unit_src:-no systemd/$SERVICE.service next to this script}); pass --unit PATH"
  fi
  grep -q '^ExecStart=rollout-agent ' "$unit_src" ||
    die "$unit_src has no 'ExecStart=rollout-agent ...' line to point at $real_bin"
fi

run_as_user=""
if [ "$create_user" = 1 ]; then
  run_as_user=$service_user
  if [ "$live" = 1 ] && ! getent passwd "$service_user" >/dev/null 2>&1; then
    command -v useradd >/dev/null 2>&1 ||
      die "useradd not found: create the user $service_user yourself, or pass --no-service-user"
  fi
fi

# ---------------------------------------------------------------- install
install -d -m 0755 "$bin_dir" "$etc_dir"
if [ ! -d "$data_dir" ]; then
  install -d -m 0700 "$data_dir"
  log "created $data_dir (mode 0700)"
fi

if [ "$create_user" = 1 ]; then
  if [ "$live" = 0 ]; then
    log "not creating user $service_user below --root; create it on the host (useradd --system $service_user)"
  elif getent passwd "$service_user" >/dev/null 2>&1; then
    log "user $service_user exists"
  else
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$service_user"
    log "created system user $service_user (services, hooks and checks run as it)"
  fi
fi

binary_changed=0
if [ -f "$installed_bin" ] && cmp -s "$binary" "$installed_bin"; then
  log "$installed_bin is up to date"
else
  # A rename never disturbs a running agent (no "text file busy").
  install -m 0755 "$binary" "$bin_dir/.rollout-agent.new"
  mv -f "$bin_dir/.rollout-agent.new" "$installed_bin"
  binary_changed=1
  log "installed $installed_bin ($("$installed_bin" --version 2>/dev/null || echo unknown version))"
fi

if [ "$join" = 1 ]; then
  log "joining $coordinator as $host"
  "$installed_bin" join --coordinator "$coordinator" --token "$token" --ca "$ca" \
    --host "$host" --dir "$etc_dir" ||
    die "joining $coordinator failed (see above); a token is valid once and for a limited time: create a new one with 'rollout token create' and re-run"
  for f in agent.pem agent.key ca.pem; do
    [ -s "$etc_dir/$f" ] || die "rollout-agent join did not write $etc_dir/$f"
  done
fi
if [ -f "$etc_dir/agent.key" ]; then
  chmod 0600 "$etc_dir/agent.key"
fi

if [ -f "$config" ]; then
  log "kept $config"
  if [ "${#labels[@]}" -gt 0 ]; then
    warn "--label is only written into a new config: edit [labels] in $config"
  fi
else
  tmp="$config.tmp"
  {
    echo "# rollout-agent configuration, written by $PROG. Edit freely: re-running"
    echo "# the script keeps this file. Every key: the README's agent config reference."
    echo "host = \"$host\""
    echo "data_dir = \"/var/lib/rollout\""
    if [ -n "$run_as_user" ]; then
      echo "# Services, hooks and exec checks run as this user; the agent stays root."
      echo "run_as = \"$run_as_user\""
    else
      echo "# Services run as root; set run_as = \"USER\" to run them unprivileged."
    fi
    echo
    echo "[labels]"
    for l in ${labels[@]+"${labels[@]}"}; do
      echo "${l%%=*} = \"${l#*=}\""
    done
    echo
    if [ -n "$coordinator" ]; then
      echo "[coordinator]"
      echo "url = \"$coordinator\""
      echo "ca = \"/etc/rollout/ca.pem\""
      echo "cert = \"/etc/rollout/agent.pem\""
      echo "key = \"/etc/rollout/agent.key\""
    else
      echo "# No coordinator: the agent runs standalone (local admin commands only)."
      echo "# [coordinator]"
      echo "# url = \"https://coordinator.internal:7443\""
      echo "# ca = \"/etc/rollout/ca.pem\""
      echo "# cert = \"/etc/rollout/agent.pem\""
      echo "# key = \"/etc/rollout/agent.key\""
    fi
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$config"
  log "wrote $config"
fi

if [ "$has_systemd" = 0 ]; then
  log "systemd not found (no $root/run/systemd/system): no unit installed."
  running=$(agent_pids | tr '\n' ' ')
  running=${running% }
  if [ -n "$running" ]; then
    if [ "$binary_changed" = 1 ]; then
      log "rollout-agent is running (pid $running) from the previous binary: restart it in its"
      log "supervisor (SIGTERM to that pid; the services keep running and are adopted)."
    else
      log "rollout-agent is running (pid $running)."
    fi
    exit 0
  fi
  log "run the agent as root under your supervisor, restarting it when it exits:"
  log "  $real_bin run --config /etc/rollout/agent.toml"
  log "stop it with SIGTERM to the agent's pid only: the services it supervises run in"
  log "their own process groups and are adopted when it starts again."
  exit 0
fi

unit_changed=0
unit_text=$(sed "s|^ExecStart=rollout-agent |ExecStart=$real_bin |" "$unit_src")
if [ ! -f "$unit_file" ] || [ "$(cat "$unit_file")" != "$unit_text" ]; then
  install -d -m 0755 "$(dirname "$unit_file")"
  printf '%s\n' "$unit_text" >"$unit_file.tmp"
  chmod 0644 "$unit_file.tmp"
  mv -f "$unit_file.tmp" "$unit_file"
  unit_changed=1
  log "installed $unit_file"
fi

if [ "$live" = 0 ] || [ "$start" = 0 ]; then
  log "not starting the agent; on the host: systemctl enable --now $SERVICE"
  exit 0
fi
systemctl daemon-reload
systemctl enable --quiet "$SERVICE"
if systemctl is-active --quiet "$SERVICE"; then
  if [ "$binary_changed" = 1 ] || [ "$unit_changed" = 1 ]; then
    # KillMode=process: the services keep running and are adopted.
    systemctl restart "$SERVICE"
    log "restarted $SERVICE"
  else
    log "$SERVICE is running"
  fi
else
  systemctl start "$SERVICE"
  log "started $SERVICE"
fi
sleep 1
systemctl is-active --quiet "$SERVICE" ||
  die "$SERVICE is not running: see journalctl -u $SERVICE"
log "done: rollout-agent status shows this host; the coordinator lists it in rollout hosts"
