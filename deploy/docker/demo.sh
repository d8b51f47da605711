#!/usr/bin/env bash
# The containerised demo: a coordinator and N agent hosts, each its own
# container on a private network, over mutual TLS with join tokens. Rolls the
# sample service out v1 -> v2 with the CLI's live progress, then a deliberately
# unhealthy v3 that is rolled back automatically, and leaves the fleet running.
#
#   cargo build --workspace
#   deploy/docker/demo.sh [--agents 5] [--bin-dir target/debug] [--name rollout-demo]
#   deploy/docker/demo.sh --down [--name rollout-demo]
#
# Images are built from scratch from the binaries in --bin-dir
# (deploy/docker/build-image.sh, tag rollout-demo:latest); nothing is pulled.
# Every container and the network carry the label rollout-demo=NAME (plus any
# --label KEY=VALUE), and --down removes them and the demo's files. Runs as
# root (or a user in the docker group). See deploy/docker/README.md.
set -euo pipefail

readonly PROG=demo.sh
readonly IMAGE=rollout-demo:latest
readonly PORT=7443
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR

agents=5
bin_dir="$SCRIPT_DIR/../../target/debug"
name=rollout-demo
labels=()
down=0

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}
log() { printf '==> %s\n' "$*"; }
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case $1 in
    --agents) [ $# -ge 2 ] || usage; agents=$2; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || usage; bin_dir=$2; shift 2 ;;
    --name) [ $# -ge 2 ] || usage; name=$2; shift 2 ;;
    --label) [ $# -ge 2 ] || usage; labels+=(--label "$2"); shift 2 ;;
    --down) down=1; shift ;;
    -h | --help) usage 0 ;;
    *) printf '%s: unknown argument %s\n' "$PROG" "$1" >&2; usage ;;
  esac
done
[[ $name =~ ^[a-z0-9][a-z0-9_.-]{0,40}$ ]] ||
  die "--name '$name' must be 1-41 of a-z 0-9 _ . - (a Docker name prefix)"
[[ $agents =~ ^[1-9][0-9]?$ ]] || die "--agents must be 1-99, got '$agents'"

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed): start it, or run as a user who may use it"

work="${TMPDIR:-/tmp}/rollout-demo-$name"
filter="label=rollout-demo=$name"
coordinator="$name-coordinator"

teardown() {
  local ids
  ids=$(docker ps -aq --filter "$filter")
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086 # one id per word
    docker rm -f -v $ids >/dev/null
  fi
  ids=$(docker network ls -q --filter "$filter")
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    docker network rm $ids >/dev/null
  fi
  rm -rf "$work"
}

if [ "$down" = 1 ]; then
  teardown
  log "removed the demo $name (containers, network, $work)"
  exit 0
fi

if [ -n "$(docker ps -aq --filter "$filter")" ]; then
  die "a demo named $name is already running: remove it with $0 --down --name $name, or pick another --name"
fi
for b in rollout rollout-agent sample-service; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: run \`cargo build --workspace\` first, or pass --bin-dir DIR"
done
bin_dir=$(cd "$bin_dir" && pwd)

# Anything failing from here on leaves nothing behind.
trap 'status=$?; if [ "$status" -ne 0 ]; then echo "$PROG: failed; removing the demo" >&2; teardown; fi' EXIT

log "building the image $IMAGE from $bin_dir"
bash "$SCRIPT_DIR/build-image.sh" --bin-dir "$bin_dir" --tag "$IMAGE" >/dev/null

log "creating a CA and certificates (rollout certs init) in $work/pki"
rm -rf "$work"
mkdir -p "$work/shared"
"$bin_dir/rollout" certs init --dir "$work/pki" --name coordinator >/dev/null
cat >"$work/shared/coordinator.toml" <<EOF
listen = "0.0.0.0:$PORT"
data_dir = "/var/lib/rollout-coordinator"
[tls]
ca = "/pki/ca.pem"
cert = "/pki/coordinator.pem"
key = "/pki/coordinator.key"
# Signs the certificates of agents that join with a token.
ca_key = "/pki/ca.key"
EOF

common=(--label "rollout-demo=$name" ${labels[@]+"${labels[@]}"})
docker network create --internal "${common[@]}" "$name" >/dev/null
run() {
  local host=$1
  shift
  docker run -d --init --name "$name-$host" --hostname "$host" --network "$name" \
    --network-alias "$host" --memory 512m "${common[@]}" "$@" >/dev/null
}

# The operator CLI, in the coordinator's container, with the operator certificate.
cli() {
  docker exec "$coordinator" rollout --coordinator "https://127.0.0.1:$PORT" --certs /pki "$@"
}

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

log "starting the coordinator (mutual TLS, joining on)"
run coordinator -v "$work/pki:/pki:ro" -v "$work/shared:/shared" "$IMAGE" \
  -c "exec rollout serve --config /shared/coordinator.toml"
wait_for 30 cli hosts || die "the coordinator did not answer within 30 s: docker logs $coordinator"

log "starting $agents agent hosts; each joins with its own one-time token"
for i in $(seq 1 "$agents"); do
  token=$(cli token create --ttl 10m --label role=web 2>/dev/null)
  token=${token%%$'\n'*}
  [ -n "$token" ] || die "rollout token create printed no token"
  # Joins once (the certificate stays in the container), then runs the agent.
  run "h$i" -v "$work/pki/ca.pem:/ca.pem:ro" "$IMAGE" -c "
    [ -s /etc/rollout/agent.pem ] ||
      rollout-agent join --coordinator https://coordinator:$PORT --token $token \
        --ca /ca.pem --host h$i --dir /etc/rollout --config /etc/rollout/agent.toml ||
      exit 1
    exec rollout-agent run --config /etc/rollout/agent.toml"
done
connected() {
  [ "$(cli --output json hosts | grep -o '"connected": *true' | wc -l)" -ge "$agents" ]
}
wait_for 60 connected || die "not every agent connected within 60 s: docker logs $name-h1"
cli hosts

# A release of the sample service: service.conf in a tar.gz, and its spec.
release() {
  local version=$1 healthy=$2 dir
  dir=$(mktemp -d "$work/art.XXXXXX")
  printf 'version=%s\nhealthy=%s\n' "$version" "$healthy" >"$dir/service.conf"
  tar -C "$dir" -czf "$work/shared/web-$version.tar.gz" service.conf
  rm -rf "$dir"
  cat >"$work/shared/$version.toml" <<EOF
# The sample service, release $version.
service = "web"
release = "$version"

[artifact]
path = "web-$version.tar.gz"

[run]
exec = ["/usr/local/bin/sample-service", "--port", "8080"]
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:8080/health"
interval = "250ms"
timeout = "1s"
failure_threshold = 2

[targets]
labels = { role = "web" }

[strategy]
batch_size = 2
max_unavailable = 2
max_failures = 0
min_healthy_time = "1s"
healthy_deadline = "5s"
commit_deadline = "5m"
EOF
}

# rollout deploy --wait, with its live progress; the rollout id (the first
# line) goes to $work/VERSION.id.
deploy() {
  local version=$1 status=0
  cli deploy --wait "/shared/$version.toml" | tee "$work/$version.out" || status=$?
  head -n 1 "$work/$version.out" >"$work/$version.id"
  return "$status"
}

# The rollout's state, from the first line of `rollout status ID`:
# "rollout ID  SERVICE RELEASE  state STATE  batch ...".
state_of() {
  local out
  out=$(cli status "$1") || return 1
  sed -n '1s/.*  state \([a-z_]*\) .*/\1/p' <<<"$out"
}

release v1 true
release v2 true
release v3 false
log "deploying v1"
deploy v1 || die "v1 did not succeed"
log "rolling out v2 (batches of 2)"
deploy v2 || die "v2 did not succeed"
log "rolling out v3, which fails its health check: the rollout stops and rolls back"
if deploy v3; then
  die "v3 succeeded although it is unhealthy"
fi

v2_state=$(state_of "$(cat "$work/v2.id")") || v2_state=unknown
v3_state=$(state_of "$(cat "$work/v3.id")") || v3_state=unknown
v3_deadline=$((SECONDS + 60))
while [ "$v3_state" != rolled_back ] && [ "$SECONDS" -lt "$v3_deadline" ]; do
  sleep 0.5
  v3_state=$(state_of "$(cat "$work/v3.id")") || v3_state=unknown
done

log "what each host serves now"
for i in $(seq 1 "$agents"); do
  served=$(docker exec "$name-h$i" sh -c 'timeout 3 wget -q -O - http://127.0.0.1:8080/version' || echo "nothing")
  echo "  h$i: $served"
done
echo "result: v2 $v2_state, v3 $v3_state"
if [ "$v2_state" != succeeded ] || [ "$v3_state" != rolled_back ]; then
  die "expected v2 succeeded and v3 rolled_back"
fi

trap - EXIT
cat <<EOF

The fleet keeps running. Try:
  docker exec $coordinator rollout --certs /pki hosts
  docker exec $coordinator rollout --certs /pki history web
  docker exec $coordinator rollout --certs /pki events $(cat "$work/v3.id")
  docker exec $name-h1 rollout-agent releases web
Remove it all with: $0 --down --name $name
EOF
