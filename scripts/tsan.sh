#!/usr/bin/env bash
# The test suite under ThreadSanitizer (swift test --sanitize=thread) in .build-tsan; fails on any
# report. Needs SAGA_MYSQL_URL like the plain run (scripts/test.sh sets it and calls this script).
exec bash "$(dirname "$0")/sanitize.sh" thread
