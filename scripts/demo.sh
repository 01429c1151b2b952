#!/usr/bin/env bash
# The main job: the AA trigger example on RocksDB + SQLite. Installs what is missing, builds,
# and runs `aa-demo` (no arguments: the unprotected/protected show). Arguments go to aa-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
swift build --product aa-demo 2>&1 | grep -v "^\[" || true
exec "$(swift build --show-bin-path)/aa-demo" "$@"
