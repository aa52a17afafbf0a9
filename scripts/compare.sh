#!/usr/bin/env bash
# The comparison benchmark in one command on a fresh Debian/Ubuntu machine: build
# prerequisites, etcd (Debian's etcd-server), then `cargo bench --bench compare` (a bare tonic
# echo, a 3-member etcd and a 3-node Flotilla, side by side; see benches/compare.rs for the
# environment variables, e.g. COMPARE_SECS=3 for a quick run).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
bash scripts/setup.sh
bash scripts/install-etcd.sh
cargo bench --bench compare
