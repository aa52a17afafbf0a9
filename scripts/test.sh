#!/usr/bin/env bash
# The README's test command: set-up, then every test of the workspace (release profile, so the
# bundled RocksDB is built once and shared with the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
bash scripts/setup.sh
# Process tests run other packages' binaries (flotilla-ctl beside flotilla-node): build them all.
cargo build --release --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast
else
  cargo test --release --workspace --no-fail-fast
fi
