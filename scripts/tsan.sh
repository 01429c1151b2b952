#!/usr/bin/env bash
# The test suite under ThreadSanitizer (swift test --sanitize=thread), in its own build folder.
# Needs SAGA_MYSQL_URL like the plain run (scripts/test.sh sets it and calls this script).
# Fails on any ThreadSanitizer report, not only on failed tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-tsan
swift build --build-tests --sanitize=thread --scratch-path "$scratch" 2>&1 | grep -E "error:|warning:|Build complete" || true
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
timeout 1800 swift test --skip-build --sanitize=thread --scratch-path "$scratch" >"$log" 2>&1 || status=$?
grep -E "Test run with|✘" "$log" || true
if grep -q "WARNING: ThreadSanitizer" "$log"; then
    echo "ThreadSanitizer reported:" >&2
    grep -A12 "WARNING: ThreadSanitizer" "$log" | head -80 >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    exit "$status"
fi
echo "ThreadSanitizer: no reports"
