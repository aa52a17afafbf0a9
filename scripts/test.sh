#!/usr/bin/env bash
# The README's test command: set-up, then every test of the workspace (release profile, so the
# bundled RocksDB is built once and shared with the benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
bash scripts/setup.sh
# Process tests run other packages' binaries (flotilla-ctl beside flotilla-node): build them all,
# and the examples (README's "Using it" is examples/using_it.rs: it runs, in a few seconds).
cargo build --release --workspace --bins --examples
cargo run --release --example using_it
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --workspace --no-fail-fast
else
  cargo test --release --workspace --no-fail-fast
fi
