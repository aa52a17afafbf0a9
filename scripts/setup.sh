#!/usr/bin/env bash
# Installs what building Flotilla needs on a fresh Debian/Ubuntu machine: clang and libclang
# (RocksDB's bindings), protoc (raft-rs's and our .proto files), and what its tests and benches
# run against: redis-cli and redis-benchmark (redis-tools), redis-server (the Redis bench's
# reference). Skips apt when all are there.
set -euo pipefail
need=()
command -v clang >/dev/null || need+=(clang)
command -v protoc >/dev/null || need+=(protobuf-compiler)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang libclang-dev protobuf-compiler redis-tools redis-server
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
