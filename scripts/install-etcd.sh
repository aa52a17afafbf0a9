#!/usr/bin/env bash
# Installs Debian's etcd-server (the etcd that `cargo bench --bench compare` runs beside
# Flotilla) if `etcd` is not on the PATH. The benchmark calls this itself when etcd is missing.
set -euo pipefail
command -v etcd >/dev/null && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server
command -v etcd >/dev/null
