#!/usr/bin/env bash
# The whole test suite. Installs what is missing, builds warning-free, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "==> swift build (warnings are errors here)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
swift build --build-tests 2>&1 | tee "$log" | grep -E "error|warning:|Compiling|Build complete" | grep -v "^\[.*Compiling" || true
if grep -E "^/.*(warning|error):" "$log" >/dev/null; then
    echo "build produced warnings or errors:" >&2
    grep -E "^/.*(warning|error):" "$log" >&2
    exit 1
fi
grep -q "Build complete" "$log" || { echo "build failed" >&2; tail -30 "$log" >&2; exit 1; }

echo "==> swift test"
# The library's own log lines (expected warnings from injected failures) are left out.
swift test --skip-build 2>&1 | grep -v "^[0-9-]*T[0-9:+]* \(notice\|warning\|info\) "
