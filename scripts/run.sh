#!/usr/bin/env bash
# The README's run command: set-up, then the project's main job. Until the range-split demo
# is the range-split demo (3 nodes over gRPC, live splits, every acknowledged write verified).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
bash scripts/setup.sh
cargo run --release --example split_demo
