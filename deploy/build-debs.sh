#!/usr/bin/env bash
# Builds the Debian packages of the agent and the coordinator into
# target/debian/: rollout-agent_<version>-1_<arch>.deb and
# rollout-coordinator_<version>-1_<arch>.deb (install with
# `apt install ./target/debian/rollout-agent_*.deb`).
#
# Each holds the release binary (the agent's built with the `agent` profile),
# its systemd unit (deploy/systemd; installed,
# not enabled), the example configs, man pages and shell completions generated
# from the binary. The metadata is [package.metadata.deb] in agent/Cargo.toml
# and coordinator/Cargo.toml; maintainer scripts are in deploy/debian/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "build-debs.sh: installing cargo-deb" >&2
  cargo install cargo-deb --locked
fi

target_dir=${CARGO_TARGET_DIR:-target}
# Each package on its own: the test-only `crash-points` feature the tests
# crate turns on must never reach a package. The agent is built with the
# size-tuned `agent` profile (Cargo.toml), into target/agent/.
cargo build --release --locked -p rollout-coordinator
cargo build --profile agent --locked -p rollout-agent

# package:binary:profile. cargo-deb reads the assets' target/release/ paths
# from the profile's directory.
for pkg_bin in rollout-agent:rollout-agent:agent rollout-coordinator:rollout:release; do
  pkg=${pkg_bin%%:*}
  rest=${pkg_bin#*:}
  bin=${rest%%:*}
  profile=${rest#*:}
  exe="$target_dir/$profile/$bin"
  dir="$target_dir/$profile/deb-extra/$pkg"
  rm -rf "$dir"
  mkdir -p "$dir/man" "$dir/completions"
  "$exe" man --out "$dir/man" >/dev/null
  gzip -9n "$dir/man/"*.1
  "$exe" completions bash >"$dir/completions/$bin"
  "$exe" completions zsh >"$dir/completions/_$bin"
  "$exe" completions fish >"$dir/completions/$bin.fish"
  mkdir -p "$target_dir/debian"
  cargo deb --package "$pkg" --profile "$profile" --no-build --output "$target_dir/debian/"
done
ls -l "$target_dir"/debian/*.deb
