#!/usr/bin/env bash
# Builds the Debian packages of the agent and the coordinator into
# target/debian/: rollout-agent_<version>-1_<arch>.deb and
# rollout-coordinator_<version>-1_<arch>.deb (install with
# `apt install ./target/debian/rollout-agent_*.deb`).
#
# Each holds the release binary, its systemd unit (deploy/systemd; installed,
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
# Only these two packages: the test-only `crash-points` feature the tests
# crate turns on must never reach a package.
cargo build --release --locked -p rollout-agent -p rollout-coordinator

extra="$target_dir/release/deb-extra"
rm -rf "$extra"
for pkg_bin in rollout-agent:rollout-agent rollout-coordinator:rollout; do
  pkg=${pkg_bin%%:*}
  bin=${pkg_bin#*:}
  dir="$extra/$pkg"
  mkdir -p "$dir/man" "$dir/completions"
  "$target_dir/release/$bin" man --out "$dir/man" >/dev/null
  gzip -9n "$dir/man/"*.1
  "$target_dir/release/$bin" completions bash >"$dir/completions/$bin"
  "$target_dir/release/$bin" completions zsh >"$dir/completions/_$bin"
  "$target_dir/release/$bin" completions fish >"$dir/completions/$bin.fish"
done

mkdir -p "$target_dir/debian"
for pkg in rollout-agent rollout-coordinator; do
  cargo deb --package "$pkg" --no-build --output "$target_dir/debian/"
done
ls -l "$target_dir"/debian/*.deb
