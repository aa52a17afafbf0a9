#!/usr/bin/env bash
# The README's run command: set-up, then the project's main job. Until the range-split demo
# exists, that is the three-node cluster demo (kill a node, restart it, verify every write).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
bash scripts/setup.sh
cargo run --release --example cluster_demo
