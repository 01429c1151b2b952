#!/usr/bin/env bash
# Installs what Saga needs on a fresh Debian machine (Debian's packages only), when missing.
set -euo pipefail

packages=(librocksdb-dev libsqlite3-dev libmariadb-dev pkg-config)
# The tests also need a MariaDB server (started by scripts/test.sh, never as a service).
# and a Galera cluster (galera-4 is the provider; rsync does the state transfer of a rejoining node).
[ "${SAGA_WITH_SERVER:-0}" = 1 ] && packages+=(mariadb-server galera-4 rsync)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "swift is not on PATH (Swift 6 toolchain needed)" >&2; exit 1; }
