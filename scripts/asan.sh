#!/usr/bin/env bash
# The test suite under AddressSanitizer (swift test --sanitize=address), in its own build folder.
# Needs SAGA_MYSQL_URL like the plain run (scripts/test.sh sets it and calls this script).
# Fails on any AddressSanitizer report, not only on failed tests.
#
# Leak detection is off for the suite: the test helpers that start servers and child processes
# use Foundation's Process and Pipe, which LeakSanitizer reports (FACTS.md); the library's own
# allocations are checked for memory errors like everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=.build-asan
swift build --build-tests --sanitize=address --scratch-path "$scratch" 2>&1 | grep -E "error:|warning:|Build complete" || true
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1 \
    timeout 1800 swift test --skip-build --sanitize=address --scratch-path "$scratch" >"$log" 2>&1 || status=$?
grep -E "Test run with|✘" "$log" || true
if grep -q "ERROR: AddressSanitizer" "$log"; then
    echo "AddressSanitizer reported:" >&2
    grep -A30 "ERROR: AddressSanitizer" "$log" | head -80 >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    exit "$status"
fi
echo "AddressSanitizer: no reports"
