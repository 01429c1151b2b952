#!/usr/bin/env bash
# The test suite under a sanitizer, in its own build folder:
#   scripts/sanitize.sh thread|address
# Needs SAGA_MYSQL_URL like the plain run (scripts/test.sh sets it). Fails on any report of the
# sanitizer, not only on failed tests. scripts/tsan.sh and scripts/asan.sh call this.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: sanitize.sh thread|address}
case "$kind" in
thread) scratch=.build-tsan; name=ThreadSanitizer; report="WARNING: ThreadSanitizer" ;;
address) scratch=.build-asan; name=AddressSanitizer; report="ERROR: AddressSanitizer"
    # The test helpers that start servers and child processes use Foundation's Process and
    # Pipe, which LeakSanitizer reports (measured on this setup): leak detection is off for the suite; the
    # library's memory errors are reported like everything else.
    export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 ;;
*) echo "usage: sanitize.sh thread|address" >&2; exit 2 ;;
esac
swift build --build-tests --sanitize="$kind" --scratch-path "$scratch" 2>&1 | grep -E "error:|warning:|Build complete" || true
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
timeout 2700 swift test --skip-build --sanitize="$kind" --scratch-path "$scratch" >"$log" 2>&1 || status=$?
grep -E "Test run with|✘" "$log" || true
if grep -q "$report" "$log"; then
    echo "$name reported:" >&2
    grep -A30 "$report" "$log" | head -80 >&2
    exit 1
fi
if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    exit "$status"
fi
echo "$name: no reports"
